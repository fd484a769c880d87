//! The `sql` step kind: one or more statements, in one transaction with the
//! step's mark, or alone on a connection of their own when a statement cannot
//! run in a transaction (`CREATE INDEX CONCURRENTLY`, `VACUUM`, …: found by
//! parsing, see `plan::sql`).

use crate::control::Status;
use crate::engine::{Error, Outcome, StepCx, ddl};
use crate::plan::raw::Node;
use crate::plan::read::{Reader, first_words, pos_in_scalar};
use crate::plan::sql::{self, Statement};

/// The kind's key in the plan file.
pub const KEY: &str = "sql";

/// The statements of an `sql` step (or an SQL rollback), split and classified.
#[derive(Debug, Clone)]
pub struct SqlBody {
    pub text: String,
    pub statements: Vec<Statement>,
    /// False when the body is one statement that cannot run inside a transaction.
    pub transactional: bool,
}

impl SqlBody {
    /// The statements to send one by one.
    pub fn texts(&self) -> Vec<String> {
        self.statements.iter().map(|s| s.text.clone()).collect()
    }
}

/// Statements as a script: each ends with `;`.
pub fn script(statements: &[String]) -> String {
    statements
        .iter()
        .map(|s| format!("{s};"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An SQL body (one or more statements), with every statement's position in the file.
pub fn parse_body(r: &mut Reader, node: &Node, what: &str) -> Option<SqlBody> {
    let text = r.string(node, what)?;
    let statements = match sql::split(&text) {
        Ok(s) => s,
        Err(errors) => {
            // One error per bad statement: the parser reports every token it
            // could not place after the first, which only buries the real one.
            let mut resume_at = 0;
            let mut reported = 0;
            for e in &errors {
                if e.offset < resume_at || reported == 3 {
                    continue;
                }
                resume_at = text[e.offset..]
                    .find(';')
                    .map(|i| e.offset + i + 1)
                    .unwrap_or(text.len() + 1);
                reported += 1;
                let pos = pos_in_scalar(node, &text, e.offset);
                let near = first_words(&text[e.offset.min(text.len())..]);
                r.error(
                    pos,
                    "sql-syntax",
                    format!("{what} does not parse at `{near}`: {}", e.message),
                    Some(
                        "fix the statement at this line (PostgreSQL syntax); separate statements with `;`"
                            .into(),
                    ),
                );
            }
            return None;
        }
    };
    let mut statements: Vec<Statement> = statements
        .into_iter()
        .map(|mut s| {
            s.pos = pos_in_scalar(node, &text, s.offset);
            s
        })
        .collect();
    if statements.is_empty() {
        r.error(
            node.pos,
            "empty",
            format!("{what} has no SQL statement"),
            None,
        );
        return None;
    }
    let mut ok = true;
    for s in &statements {
        if s.transaction_control {
            r.error(
                s.pos,
                "transaction-control",
                format!("{what} contains `{}`: pgshift runs each step in its own transaction (or none, when a statement requires it)", first_words(&s.text)),
                Some("remove BEGIN/COMMIT/SAVEPOINT from the plan; split work that must commit separately into separate steps".into()),
            );
            ok = false;
        }
    }
    let non_tx: Vec<&Statement> = statements
        .iter()
        .filter(|s| s.non_transactional.is_some())
        .collect();
    if !non_tx.is_empty() && statements.len() > 1 {
        for s in non_tx {
            r.error(
                s.pos,
                "non-transactional-mixed",
                format!(
                    "`{}…`: {}, so it must be the only statement of its step; this step has {} statements",
                    first_words(&s.text),
                    s.non_transactional.unwrap_or_default(),
                    statements.len()
                ),
                Some("move this statement into a step of its own; the other statements keep their transaction".into()),
            );
        }
        ok = false;
    }
    if !ok {
        return None;
    }
    let transactional = statements.iter().all(|s| s.non_transactional.is_none());
    for s in &mut statements {
        s.text = s.text.trim_end_matches(';').trim().to_string();
    }
    Some(SqlBody {
        text,
        statements,
        transactional,
    })
}

/// Runs the step: in one transaction with its mark, or alone.
pub async fn execute(sx: &StepCx, body: &SqlBody) -> Result<Outcome, Error> {
    if body.transactional {
        ddl::run_transactional(sx, &body.texts(), Some(Status::Succeeded)).await
    } else {
        run_alone(sx, &body.statements[0].text).await
    }
}

/// Runs one statement that cannot run in a transaction, dropping first any
/// INVALID index an earlier attempt of it left behind.
pub async fn run_alone(sx: &StepCx, statement: &str) -> Result<Outcome, Error> {
    let index = concurrent_index_name(statement);
    ddl::run_alone(sx, statement, index.as_deref()).await
}

/// The index a `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name` statement creates.
pub fn concurrent_index_name(statement: &str) -> Option<String> {
    use squawk_syntax::ast::AstNode;
    let parse = squawk_syntax::SourceFile::parse(statement);
    let stmt = parse.tree().stmts().next()?;
    let node = stmt.syntax();
    if node.kind() != squawk_syntax::SyntaxKind::CREATE_INDEX {
        return None;
    }
    let path = node
        .descendants()
        .find(|d| d.kind() == squawk_syntax::SyntaxKind::PATH)?;
    let text = path.text().to_string();
    let parts = text
        .split('.')
        .map(|p| p.trim().to_string())
        .collect::<Vec<_>>();
    Some(parts.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_names_are_found() {
        assert_eq!(
            concurrent_index_name("CREATE INDEX CONCURRENTLY IF NOT EXISTS leads_h ON leads (h)")
                .as_deref(),
            Some("leads_h")
        );
        assert_eq!(
            concurrent_index_name("CREATE UNIQUE INDEX CONCURRENTLY s.\"Idx\" ON s.t (h)")
                .as_deref(),
            Some("s.\"Idx\"")
        );
        assert_eq!(concurrent_index_name("VACUUM t"), None);
    }
}
