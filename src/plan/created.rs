//! What an `sql` step creates that later steps count on: the indexes it builds
//! and the columns it adds, read from the syntax tree of its statements
//! (squawk's parser), never guessed from the text. The runner checks, when a
//! run starts, that what the finished steps created is still there: someone
//! may have dropped it while the plan waited at a gate.

use squawk_syntax::{SourceFile, SyntaxKind, SyntaxNode};

use crate::ident::{Ident, QualifiedName, parse_ident, parse_qualified};

/// An object a statement creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// `CREATE INDEX name ON table`: the index lives in the table's schema.
    Index { name: Ident, table: QualifiedName },
    /// `ALTER TABLE table ADD COLUMN column`.
    Column { table: QualifiedName, column: Ident },
}

impl Created {
    /// The name an operator knows it by: `index leads_q_idx on leads`.
    pub fn describe(&self) -> String {
        match self {
            Created::Index { name, table } => format!("index {name} on {table}"),
            Created::Column { table, column } => format!("column {column} of {table}"),
        }
    }

    /// The bare names of the object, for "does a later step mention it".
    pub fn names(&self) -> Vec<&str> {
        match self {
            Created::Index { name, .. } => vec![name.as_str()],
            Created::Column { column, .. } => vec![column.as_str()],
        }
    }
}

/// The indexes and columns that `statement` creates (none for anything else,
/// or when a name cannot be read with certainty).
pub fn created(statement: &str) -> Vec<Created> {
    let parse = SourceFile::parse(statement);
    if !parse.errors().is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for stmt in parse.syntax_node().children() {
        match stmt.kind() {
            SyntaxKind::CREATE_INDEX => {
                let name = child(&stmt, SyntaxKind::INDEX).and_then(|n| parse_ident(&n).ok());
                let table = relation(&stmt);
                if let (Some(name), Some(table)) = (name, table) {
                    out.push(Created::Index { name, table });
                }
            }
            SyntaxKind::ALTER_TABLE => {
                let Some(table) = relation(&stmt) else {
                    continue;
                };
                for add in stmt
                    .children()
                    .filter(|c| c.kind() == SyntaxKind::ADD_COLUMN)
                {
                    if let Some(column) =
                        child(&add, SyntaxKind::COLUMN_NAME).and_then(|n| parse_ident(&n).ok())
                    {
                        out.push(Created::Column {
                            table: table.clone(),
                            column,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The text of the first child node of `kind`.
fn child(node: &SyntaxNode, kind: SyntaxKind) -> Option<String> {
    node.children()
        .find(|c| c.kind() == kind)
        .map(|c| c.text().to_string().trim().to_string())
}

/// The table a statement works on (`ONLY` and `*` left out).
fn relation(node: &SyntaxNode) -> Option<QualifiedName> {
    let rel = node
        .children()
        .find(|c| c.kind() == SyntaxKind::TABLE_RELATION_NAME)?;
    let path = rel
        .descendants()
        .find(|c| c.kind() == SyntaxKind::PATH_REF)?;
    parse_qualified(path.text().to_string().trim()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_and_added_columns_are_read_from_the_tree() {
        assert_eq!(
            created(
                "CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS leads_q_idx ON app.\"Leads\" (q)"
            ),
            vec![Created::Index {
                name: Ident("leads_q_idx".into()),
                table: parse_qualified("app.\"Leads\"").unwrap(),
            }]
        );
        let cols =
            created("ALTER TABLE ONLY Leads ADD COLUMN IF NOT EXISTS q2 bigint, ADD \"Q3\" int");
        assert_eq!(
            cols.iter().map(Created::describe).collect::<Vec<_>>(),
            vec![
                "column \"q2\" of \"leads\"".to_string(),
                "column \"Q3\" of \"leads\"".to_string()
            ]
        );
    }

    #[test]
    fn everything_else_creates_nothing_we_track() {
        assert!(created("ALTER TABLE leads DROP COLUMN q").is_empty());
        assert!(created("UPDATE leads SET q = 1").is_empty());
        assert!(created("CREATE INDEX ON leads (q)").is_empty());
        assert!(created("not sql at all (").is_empty());
    }
}
