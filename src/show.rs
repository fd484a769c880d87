//! `plan show`: the steps in execution order with the exact SQL each will run.
//!
//! Pure rendering of a validated plan; no database.

use std::fmt::Write;

use crate::exec::trigger;
use crate::plan::{self, BackfillSet, Plan, Rollback, Severity, StepKind};

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
        plan::duration::format(s.lock_timeout),
        plan::duration::format(s.statement_timeout),
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
        let mode = match &step.kind {
            StepKind::Sql(b) if !b.transactional => "no transaction (runs alone, retried safely)",
            StepKind::Sql(_) | StepKind::Trigger(_) | StepKind::DropTrigger(_) => {
                "one transaction, with its success mark"
            }
            StepKind::Backfill(_) => "one transaction per batch, with its checkpoint",
            StepKind::Check(_) => "read-only",
            StepKind::Gate(_) => "stops the plan until `pgshift resume`",
            StepKind::Run(_) => "shell command",
        };
        let _ = writeln!(
            out,
            "\n{:>3}. {} [{}] — {}",
            step.position + 1,
            step.name,
            step.kind.name(),
            mode
        );
        if matches!(
            step.kind,
            StepKind::Sql(_) | StepKind::Trigger(_) | StepKind::DropTrigger(_)
        ) {
            let _ = writeln!(
                out,
                "     lock_timeout {}, statement_timeout {}, up to {} retries",
                plan::duration::format(step.lock_timeout),
                plan::duration::format(step.statement_timeout),
                step.retries
            );
        }
        let body = describe(plan, step);
        for line in body.lines() {
            let _ = writeln!(out, "     | {line}");
        }
        match (&step.rollback, &step.kind) {
            (Some(Rollback::Sql(b)), _) => {
                let _ = writeln!(out, "     rollback:");
                for st in &b.statements {
                    for line in format!("{};", st.text).lines() {
                        let _ = writeln!(out, "     | {line}");
                    }
                }
            }
            (Some(Rollback::Run(c)), _) => {
                let _ = writeln!(out, "     rollback: run `{}`", c.command);
            }
            (None, StepKind::Trigger(t)) => {
                let _ = writeln!(
                    out,
                    "     rollback (generated: drops the trigger and function):"
                );
                let sql = sql_lines(&trigger::rollback_statements(&plan.id, &step.name, t));
                for line in sql.lines() {
                    let _ = writeln!(out, "     | {line}");
                }
            }
            (None, StepKind::DropTrigger(d)) => {
                let _ = writeln!(
                    out,
                    "     rollback (generated: re-creates the trigger of step `{}`):",
                    d.step
                );
                let sql = sql_lines(&trigger::statements(&plan.id, &d.step, &d.trigger));
                for line in sql.lines() {
                    let _ = writeln!(out, "     | {line}");
                }
            }
            (None, StepKind::Check(_) | StepKind::Gate(_)) => {}
            (None, StepKind::Backfill(_)) => {
                let _ = writeln!(
                    out,
                    "     rollback: none needed (the rollback of the step that added the columns removes the data)"
                );
            }
            (None, _) => {
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

/// Generated statements as a script: each ends with `;`.
fn sql_lines(statements: &[String]) -> String {
    statements
        .iter()
        .map(|s| format!("{s};"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The SQL (or command, or message) a step runs, as text.
pub fn describe(plan: &Plan, step: &plan::Step) -> String {
    let _ = plan;
    match &step.kind {
        StepKind::Sql(b) => b
            .statements
            .iter()
            .map(|s| format!("{};", s.text))
            .collect::<Vec<_>>()
            .join("\n"),
        StepKind::Check(c) => match c.wait {
            Some(w) => format!(
                "{}\n(must return true; polled every {} for up to {})",
                c.query,
                plan::duration::format(c.interval),
                plan::duration::format(w)
            ),
            None => format!("{}\n(must return true)", c.query),
        },
        StepKind::Gate(msg) => format!("{msg}\n(continue with: pgshift resume {})", plan.id),
        StepKind::Run(c) => format!(
            "$ {}\n(timeout {})",
            c.command,
            plan::duration::format(c.timeout)
        ),
        StepKind::Trigger(t) => sql_lines(&trigger::statements(&plan.id, &step.name, t)),
        StepKind::DropTrigger(d) => {
            sql_lines(&trigger::rollback_statements(&plan.id, &d.step, &d.trigger))
        }
        StepKind::Backfill(b) => {
            let mut s = format!(
                "backfill {} in batches of {} ({} worker(s))\n",
                b.table, b.batch_size, b.workers
            );
            match &b.set {
                BackfillSet::Columns(cols) => {
                    for (c, e) in cols {
                        let _ = writeln!(s, "  set {c} = {e}");
                    }
                }
                BackfillSet::Clause(c) => {
                    let _ = writeln!(s, "  set {c}");
                }
            }
            if let Some(w) = &b.where_ {
                let _ = writeln!(s, "  where {w}");
            }
            let t = &b.throttle;
            let _ = writeln!(
                s,
                "  throttle: sleep {}, batch size {}..{}{}{}{}{}",
                plan::duration::format(t.sleep),
                t.min_batch_size,
                t.max_batch_size,
                t.target_batch_time
                    .map(|d| format!(", target batch time {}", plan::duration::format(d)))
                    .unwrap_or_default(),
                t.max_rows_per_sec
                    .map(|r| format!(", at most {r} rows/s"))
                    .unwrap_or_default(),
                t.max_replica_lag
                    .map(|d| format!(", pause while replica lag > {}", plan::duration::format(d)))
                    .unwrap_or_default(),
                t.throttle_query
                    .as_ref()
                    .map(|q| format!(", pause while `{q}`"))
                    .unwrap_or_default(),
            );
            let (key, note) = match &b.key {
                Some(k) => (k.clone(), String::new()),
                None => (
                    vec![crate::ident::Ident("id".into())],
                    " (the key is the primary key, read from the catalog when the step starts; shown here as \"id\")".to_string(),
                ),
            };
            let _ = writeln!(
                s,
                "each batch, in one transaction with its checkpoint{note}:"
            );
            s.push_str(&crate::backfill::batch_sql(b, &key));
            s
        }
    }
}
