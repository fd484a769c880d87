//! `create_table`: the plan's `CREATE TABLE`, as written; its rollback drops
//! the table it names (read from the statement).

use squawk_syntax::ast::AstNode;

use super::common::Fields;
use super::{Gen, GenKind, Refusal};
use crate::ident::QualifiedName;
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub sql: String,
    pub table: QualifiedName,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "create_table", &["sql"], &[])?;
    let sql = f.string(r, "sql")?;
    let at = f.node("sql")?.pos;
    match created_table(&sql) {
        Some(table) => Some(Spec {
            sql: sql.trim().trim_end_matches(';').to_string(),
            table,
        }),
        None => {
            r.error(
                at,
                "value",
                "`create_table` sql must be one `CREATE TABLE name (…)` statement",
                Some("other statements go in a `sql` operation, with their `down`".into()),
            );
            None
        }
    }
}

/// The table one `CREATE TABLE` statement creates.
fn created_table(sql: &str) -> Option<QualifiedName> {
    let parse = squawk_syntax::SourceFile::parse(sql);
    if !parse.errors().is_empty() {
        return None;
    }
    let stmts: Vec<_> = parse.tree().stmts().collect();
    let [stmt] = stmts.as_slice() else {
        return None;
    };
    let node = stmt.syntax();
    if node.kind() != squawk_syntax::SyntaxKind::CREATE_TABLE {
        return None;
    }
    let path = node
        .children()
        .find(|c| c.kind() == squawk_syntax::SyntaxKind::TABLE_NAME)?
        .descendants()
        .find(|c| c.kind() == squawk_syntax::SyntaxKind::PATH)?;
    crate::ident::parse_qualified(path.text().to_string().trim()).ok()
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let step = g
        .step(
            Phase::Expand,
            "create",
            GenKind::Sql(s.sql.clone()),
            "the new table",
        )
        .rollback(format!("DROP TABLE IF EXISTS {}", s.table.quoted()));
    g.push(step);
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_created_table_is_read_from_the_statement() {
        let t = super::created_table(
            "CREATE TABLE tags (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL)",
        );
        assert_eq!(t.map(|t| t.to_string()).as_deref(), Some("\"tags\""));
        let t = super::created_table("CREATE TABLE app.\"Tags\" (id int)");
        assert_eq!(
            t.map(|t| t.to_string()).as_deref(),
            Some("\"app\".\"Tags\"")
        );
        assert!(super::created_table("CREATE INDEX i ON t (c)").is_none());
    }
}
