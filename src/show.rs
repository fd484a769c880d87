//! `plan show`: the steps in execution order with the exact SQL each will run.
//!
//! Pure rendering of a validated plan; no database.

use std::fmt::Write;

use crate::duration;
use crate::kind::{Rollback, StepKind, Undo, sql};
use crate::plan::locks::{Lock, Mode, lock_of};
use crate::plan::{Plan, Severity, Step};

/// Renders `plan` for a person: every step, its transaction mode, SQL and rollback.
pub fn render(plan: &Plan) -> String {
    let mut out = String::new();
    let s = &plan.settings;
    let _ = writeln!(out, "plan {} ({})", plan.id, plan.file.display());
    if let Some(d) = &plan.description {
        let _ = writeln!(out, "  {d}");
    }
    let _ = writeln!(
        out,
        "  checksum {}  lock_timeout {}  statement_timeout {}  retries {}",
        plan.checksum.short(),
        duration::format(s.lock_timeout),
        duration::format(s.statement_timeout),
        s.retries
    );
    let point_of_no_return = plan.point_of_no_return().map(|s| s.position);
    let mut phase = None;
    for step in &plan.steps {
        if phase != Some(step.phase) {
            phase = Some(step.phase);
            let _ = writeln!(out, "\n== {} ==", step.phase);
        }
        if point_of_no_return == Some(step.position) {
            let _ = writeln!(
                out,
                "\n-- point of no return: `{}` has no rollback; `pgshift rollback` cannot undo it or anything before it once it has run --",
                step.name
            );
        }
        let mode = step.kind.mode();
        let _ = writeln!(
            out,
            "\n{:>3}. {} [{}] — {}",
            step.position + 1,
            step.name,
            step.kind.name(),
            mode
        );
        if let Some(d) = &step.description {
            let _ = writeln!(out, "     ({d})");
        }
        if step.kind.takes_locks() {
            let _ = writeln!(
                out,
                "     lock_timeout {}, statement_timeout {}, up to {} retries",
                duration::format(step.lock_timeout),
                duration::format(step.statement_timeout),
                step.retries
            );
        }
        let body = step.kind.describe(&plan.id, &step.name);
        for line in body.lines() {
            let _ = writeln!(out, "     | {line}");
        }
        locks(&mut out, step, &plan.id);
        match (&step.rollback, step.kind.undo()) {
            (Some(Rollback::Sql(b)), _) => {
                let _ = writeln!(out, "     rollback:");
                for st in &b.statements {
                    for line in format!("{};", st.text).lines() {
                        let _ = writeln!(out, "     | {line}");
                    }
                }
                lock_lines(&mut out, &b.texts(), "rollback lock");
            }
            (Some(Rollback::Run(c)), _) => {
                let _ = writeln!(out, "     rollback: run `{}`", c.command);
            }
            (None, Undo::Generated) => {
                let what = match &step.kind {
                    StepKind::DropTrigger(d) => {
                        format!("re-creates the trigger of step `{}`", d.step)
                    }
                    _ => "drops the trigger and function".to_string(),
                };
                let _ = writeln!(out, "     rollback (generated: {what}):");
                let statements = step
                    .kind
                    .generated_rollback(&plan.id, &step.name)
                    .unwrap_or_default();
                for line in sql::script(&statements).lines() {
                    let _ = writeln!(out, "     | {line}");
                }
            }
            (None, Undo::Nothing) => {}
            (None, Undo::Reset) => {
                let _ = writeln!(
                    out,
                    "     rollback: none needed (the rollback of the step that added the columns removes the data)"
                );
            }
            (None, Undo::Plan) => {
                let _ = writeln!(out, "     rollback: NONE — irreversible");
            }
        }
        for (rule, reason) in &step.allow {
            let _ = writeln!(out, "     allowed lint `{rule}`: {reason}");
        }
    }
    let warnings: Vec<_> = plan
        .notes
        .iter()
        .filter(|d| d.severity == Severity::Warning && d.rule != "unused-allow")
        .collect();
    if !warnings.is_empty() {
        let _ = writeln!(out);
        for w in warnings {
            let _ = writeln!(out, "{w}");
        }
    }
    match plan.point_of_no_return() {
        Some(s) => {
            let _ = writeln!(
                out,
                "\nirreversible past step `{}` (contract, no rollback)",
                s.name
            );
        }
        None => {
            let _ = writeln!(out, "\nfully reversible: every step has a rollback");
        }
    }
    out
}

/// The lock each statement of the step takes (a backfill: each batch's).
fn locks(out: &mut String, step: &Step, plan_id: &str) {
    match &step.kind {
        StepKind::Sql(_) | StepKind::Trigger(_) | StepKind::DropTrigger(_) => {
            let statements = step.kind.statements(plan_id, &step.name);
            lock_lines(out, &statements, "lock");
            let locking = statements.iter().filter(|s| lock_of(s).is_some()).count();
            if step.kind.marks_itself() && statements.len() > 1 && locking > 0 {
                let _ = writeln!(
                    out,
                    "     (one transaction: each lock is held until the step commits)"
                );
            }
        }
        StepKind::Backfill(b) => {
            let lock = Lock {
                mode: Mode::RowExclusive,
                on: b.table.to_string(),
            };
            let _ = writeln!(
                out,
                "     lock: {lock} (each batch, and row locks on its rows until it commits)"
            );
        }
        StepKind::Check(_) | StepKind::Gate(_) | StepKind::Run(_) => {}
    }
}

/// `lock: ACCESS EXCLUSIVE on leads: …`, one line per statement that takes one.
fn lock_lines(out: &mut String, statements: &[String], label: &str) {
    let several = statements.len() > 1;
    for (i, text) in statements.iter().enumerate() {
        let which = if several {
            format!(" of statement {}", i + 1)
        } else {
            String::new()
        };
        match lock_of(text) {
            Some(lock) => {
                let _ = writeln!(out, "     {label}{which}: {lock}");
            }
            None if several => {}
            None => {
                let _ = writeln!(out, "     {label}: none on an existing table");
            }
        }
    }
}
