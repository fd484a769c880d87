//! `drop-column-under-trigger`: a contract step drops a column that a live
//! dual-write trigger of the plan still reads or writes.

use squawk_syntax::ast::AstNode;
use squawk_syntax::{SourceFile, SyntaxKind};

use super::{Finding, norm, statement_at, table_of};
use crate::kind::{SqlBody, StepKind};
use crate::plan::{Plan, Step};

/// `drop-column-under-trigger`: an `ALTER TABLE … DROP COLUMN` of a column that a
/// dual-write trigger still reads or writes (no `drop_trigger` of it before this step).
/// Either PostgreSQL refuses the drop (the trigger fires `UPDATE OF` that column), or,
/// worse, it succeeds and every later write to the table fails inside the trigger.
pub(super) fn check(plan: &Plan, step: &Step, body: &SqlBody) -> Vec<Finding> {
    let file = SourceFile::parse(&body.text);
    let mut out = Vec::new();
    for stmt in file.tree().stmts() {
        let node = stmt.syntax();
        if node.kind() != SyntaxKind::ALTER_TABLE {
            continue;
        }
        let Some(table) = table_of(node, SyntaxKind::TABLE_RELATION_NAME) else {
            continue;
        };
        let table_name = table.rsplit('.').next().unwrap_or(&table).to_string();
        let dropped: Vec<String> = node
            .children()
            .filter(|a| a.kind() == SyntaxKind::DROP_COLUMN)
            .filter_map(|a| {
                a.descendants()
                    .find(|d| d.kind() == SyntaxKind::COLUMN_NAME_REF)
            })
            .map(|c| norm(&c.text().to_string()))
            .collect();
        for trig in plan.steps.iter().filter(|t| t.position < step.position) {
            let StepKind::Trigger(spec) = &trig.kind else {
                continue;
            };
            if spec.table.name.as_str() != table_name {
                continue;
            }
            let removed = plan.steps.iter().any(|d| {
                d.position > trig.position
                    && d.position < step.position
                    && matches!(&d.kind, StepKind::DropTrigger(x) if x.step == trig.name)
            });
            if removed {
                continue;
            }
            let mut used: Vec<String> = spec
                .set
                .iter()
                .chain(&spec.reverse)
                .map(|(c, _)| c.as_str().to_string())
                .collect();
            match crate::kind::trigger::update_columns(spec) {
                Some(cols) => used.extend(cols.iter().map(|c| c.as_str().to_string())),
                None => used.extend(dropped.iter().cloned()),
            }
            for col in dropped.iter().filter(|c| used.contains(c)) {
                let pos = statement_at(body, usize::from(node.text_range().start()))
                    .map(|s| s.pos)
                    .unwrap_or(step.pos);
                out.push(Finding {
                    pos,
                    rule: "drop-column-under-trigger".into(),
                    message: format!(
                        "drops column `{col}` of `{table}` while the dual-write trigger of step `{}` still uses it: PostgreSQL either refuses the drop, or accepts it and every later write to `{table}` fails inside the trigger",
                        trig.name
                    ),
                    help: Some(format!("add a step `drop_trigger: {}` before this one", trig.name)),
                });
            }
        }
    }
    out
}
