//! `scan-under-exclusive-lock`: a scan or rewrite of a table that an earlier
//! statement (or action) of the same transaction has already locked ACCESS
//! EXCLUSIVE: `ADD … NOT VALID` then `VALIDATE` in one step, say.

use std::collections::HashSet;

use squawk_syntax::ast::AstNode;
use squawk_syntax::{SourceFile, SyntaxKind};

use super::{Finding, norm, statement_at, table_of};
use crate::kind::SqlBody;
use crate::plan::Pos;

/// `scan-under-exclusive-lock`: a scan or rewrite of a table that an earlier statement
/// (or action) of the same transaction has already locked ACCESS EXCLUSIVE.
pub(super) fn check(body: &SqlBody) -> Vec<Finding> {
    if !body.transactional {
        return Vec::new();
    }
    let file = SourceFile::parse(&body.text);
    let mut locked: Vec<(String, Pos, String)> = Vec::new();
    let mut created: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for stmt in file.tree().stmts() {
        let node = stmt.syntax();
        let pos = statement_at(body, usize::from(node.text_range().start()))
            .map(|s| s.pos)
            .unwrap_or_default();
        let flag = |table: &str,
                    what: &str,
                    locked: &[(String, Pos, String)],
                    out: &mut Vec<Finding>| {
            if created.contains(table) {
                return;
            }
            if let Some((_, at, by)) = locked.iter().find(|(t, _, _)| t == table) {
                out.push(Finding {
                    pos,
                    rule: "scan-under-exclusive-lock".into(),
                    message: format!(
                        "{what} reads every row of `{table}` while this transaction still holds the ACCESS EXCLUSIVE lock taken by {by} (line {}): every query on `{table}` waits until the scan ends",
                        at.line
                    ),
                    help: Some(help(what).into()),
                });
            }
        };
        match node.kind() {
            SyntaxKind::CREATE_TABLE => {
                if let Some(seg) = node.children().find(|c| c.kind() == SyntaxKind::PATH) {
                    created.insert(
                        seg.text()
                            .to_string()
                            .split('.')
                            .map(norm)
                            .collect::<Vec<_>>()
                            .join("."),
                    );
                }
            }
            SyntaxKind::ALTER_TABLE => {
                let Some(table) = table_of(node, SyntaxKind::TABLE_RELATION_NAME) else {
                    continue;
                };
                for action in node.children() {
                    let scan = match action.kind() {
                        SyntaxKind::VALIDATE_CONSTRAINT => Some("`VALIDATE CONSTRAINT`"),
                        // `USING INDEX` takes an index built before over: no scan.
                        SyntaxKind::ADD_CONSTRAINT
                            if !action.descendants().any(|d| {
                                matches!(
                                    d.kind(),
                                    SyntaxKind::NOT_VALID
                                        | SyntaxKind::USING_INDEX
                                        | SyntaxKind::USING_INDEX_NAME
                                )
                            }) =>
                        {
                            Some("`ADD CONSTRAINT` without NOT VALID")
                        }
                        SyntaxKind::ALTER_COLUMN
                            if action
                                .descendants()
                                .any(|d| d.kind() == SyntaxKind::SET_NOT_NULL) =>
                        {
                            Some("`SET NOT NULL`")
                        }
                        SyntaxKind::ALTER_COLUMN
                            if action
                                .descendants()
                                .any(|d| d.kind() == SyntaxKind::SET_TYPE) =>
                        {
                            Some("`ALTER COLUMN … TYPE` (a rewrite)")
                        }
                        _ => None,
                    };
                    if let Some(what) = scan {
                        flag(&table, what, &locked, &mut out);
                    }
                    let is_action = !matches!(
                        action.kind(),
                        SyntaxKind::TABLE_RELATION_NAME | SyntaxKind::VALIDATE_CONSTRAINT
                    );
                    if is_action && !locked.iter().any(|(t, _, _)| *t == table) {
                        let by = format!(
                            "`{}`",
                            action
                                .text()
                                .to_string()
                                .split_whitespace()
                                .take(3)
                                .collect::<Vec<_>>()
                                .join(" ")
                        );
                        locked.push((table.clone(), pos, by));
                    }
                }
            }
            SyntaxKind::CREATE_INDEX => {
                if let Some(table) = table_of(node, SyntaxKind::TABLE_RELATION_NAME) {
                    flag(&table, "`CREATE INDEX`", &locked, &mut out);
                }
            }
            SyntaxKind::UPDATE | SyntaxKind::DELETE => {
                if let Some(table) = table_of(node, SyntaxKind::RELATION_NAME) {
                    flag(
                        &table,
                        if node.kind() == SyntaxKind::UPDATE {
                            "`UPDATE`"
                        } else {
                            "`DELETE`"
                        },
                        &locked,
                        &mut out,
                    );
                }
            }
            _ => {}
        }
    }
    out
}

/// What to do instead, for the kind of scan found.
fn help(what: &str) -> &'static str {
    if what == "`CREATE INDEX`" {
        "build the index in a step of its own with `CREATE INDEX CONCURRENTLY` (it runs outside any transaction, under SHARE UPDATE EXCLUSIVE, so reads and writes go on)"
    } else {
        "put the scan in a step of its own: first `ADD CONSTRAINT … NOT VALID` (brief lock, no scan), then `VALIDATE CONSTRAINT` in the next step (scans under SHARE UPDATE EXCLUSIVE, which lets reads and writes go on)"
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// An index built under the lock is told to build concurrently, not to use NOT VALID.
    #[test]
    fn an_index_under_the_lock_is_told_to_build_concurrently() {
        let yaml = "phases:\n  expand:\n    - name: s\n      sql: |\n        ALTER TABLE t ADD COLUMN c int;\n        CREATE INDEX i ON t (c);\n      rollback: ALTER TABLE t DROP COLUMN c\n";
        let e = crate::plan::validate::validate(Path::new("t.yaml"), yaml).unwrap_err();
        let d = e
            .diagnostics()
            .into_iter()
            .find(|d| d.rule == "scan-under-exclusive-lock")
            .expect("the finding");
        let help = d.help.unwrap_or_default();
        assert!(help.contains("CREATE INDEX CONCURRENTLY"), "{help}");
        assert!(!help.contains("NOT VALID"), "{help}");
    }
}
