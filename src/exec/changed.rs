//! A plan file that changed since the plan started (exit 5): which steps
//! differ, how (a short diff), and whether `--accept-changed` may accept it.
//!
//! The control schema keeps a snapshot of the steps as the file had them when
//! the plan started, and again at each accepted change (`plan_snapshot`
//! events). A changed step that has not run yet, a changed rollback or limit,
//! an added step: `--accept-changed` takes them. A step that already ran and
//! now does something else (or was removed) is refused even then, unless the
//! operator adds `--force`: the database holds what the old text did, and
//! `resume` will not run the new one.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use crate::control::{Event, Status, StepRow, StepSnapshot};
use crate::db::{self, OneTrip};
use crate::duration;
use crate::engine::{Context, Error, whoami};
use crate::kind::{Rollback, Undo, sql};
use crate::plan::{Plan, Step};

/// The steps of `plan` as a snapshot.
pub fn snapshot(plan: &Plan) -> Vec<StepSnapshot> {
    plan.steps.iter().map(|s| step_snapshot(plan, s)).collect()
}

fn step_snapshot(plan: &Plan, s: &Step) -> StepSnapshot {
    let rollback = match (&s.rollback, s.kind.undo()) {
        (Some(Rollback::Sql(b)), _) => sql::script(&b.texts()),
        (Some(Rollback::Run(c)), _) => format!("run: {}", c.command),
        (None, Undo::Generated) => sql::script(
            &s.kind
                .generated_rollback(&plan.id, &s.name)
                .unwrap_or_default(),
        ),
        (None, _) => String::new(),
    };
    StepSnapshot {
        name: s.name.clone(),
        phase: s.phase.as_str().to_string(),
        kind: s.kind.name().to_string(),
        body: s.kind.describe(&plan.id, &s.name),
        limits: format!(
            "lock_timeout {}, statement_timeout {}, retries {}",
            duration::format(s.lock_timeout),
            duration::format(s.statement_timeout),
            s.retries
        ),
        rollback,
    }
}

/// How one step differs between the recorded plan and the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub step: String,
    /// Its status in the control table (none for a step added to the file).
    pub status: Option<Status>,
    /// It already ran: its effect is in the database.
    pub ran: bool,
    /// What it does changed (or it was removed): the change that needs `--force` once it ran.
    pub does_other: bool,
    /// The first line, and the short diff under it.
    pub lines: Vec<String>,
}

/// A step has run when it finished: it succeeded, or its gate was reached. Its
/// work is in the database and `resume` will not run it again. A failed or
/// interrupted step has not: a transactional one left nothing, a failed index
/// build is dropped on retry, and a backfill's batches are idempotent (see
/// [`partly_done`]).
fn has_run(row: Option<&StepRow>) -> bool {
    row.is_some_and(|r| matches!(r.status, Status::Succeeded | Status::Waiting))
}

/// Rows a backfill that has not finished already wrote with the old text.
fn partly_done(row: Option<&StepRow>) -> Option<i64> {
    row.filter(|r| {
        r.kind == crate::kind::backfill::KEY
            && r.rows_done > 0
            && !matches!(r.status, Status::Succeeded | Status::RolledBack)
    })
    .map(|r| r.rows_done)
}

/// Compares the recorded steps with the file's, step by step, in the file's order.
pub fn compare(
    old: &[StepSnapshot],
    new: &[StepSnapshot],
    rows: &HashMap<String, StepRow>,
) -> Vec<Change> {
    let mut out = Vec::new();
    for n in new {
        let row = rows.get(&n.name);
        let status = row.map(|r| r.status);
        let ran = has_run(row);
        let state = match (status, ran) {
            (Some(s), true) => format!("{s}: it already ran"),
            (Some(s), false) => s.to_string(),
            (None, _) => "new".to_string(),
        };
        let Some(o) = old.iter().find(|o| o.name == n.name) else {
            out.push(Change {
                step: n.name.clone(),
                status,
                ran: false,
                does_other: false,
                lines: vec![format!(
                    "step `{}` was added ({} {})",
                    n.name, n.phase, n.kind
                )],
            });
            continue;
        };
        let mut lines = Vec::new();
        let does_other = o.body != n.body || o.kind != n.kind || o.phase != n.phase;
        if does_other {
            lines.push(format!(
                "step `{}` ({state}): what it does changed:",
                n.name
            ));
            if let Some(rows) = partly_done(row) {
                lines.push(format!(
                    "    ({rows} rows were done with the old text; the batches still to run use the new one, and rows its `where` no longer selects keep what the old one wrote)"
                ));
            }
            if o.kind != n.kind || o.phase != n.phase {
                lines.push(format!(
                    "    - {} {}\n    + {} {}",
                    o.phase, o.kind, n.phase, n.kind
                ));
            }
            lines.extend(short_diff(&o.body, &n.body, 8));
        }
        if o.rollback != n.rollback {
            lines.push(format!(
                "step `{}` ({state}): its rollback changed:",
                n.name
            ));
            lines.extend(short_diff(&o.rollback, &n.rollback, 6));
        }
        if o.limits != n.limits {
            lines.push(format!(
                "step `{}` ({state}): its limits changed: {} → {}",
                n.name, o.limits, n.limits
            ));
        }
        if !lines.is_empty() {
            out.push(Change {
                step: n.name.clone(),
                status,
                ran,
                does_other,
                lines,
            });
        }
    }
    for o in old.iter().filter(|o| !new.iter().any(|n| n.name == o.name)) {
        let row = rows.get(&o.name);
        let ran = has_run(row);
        let state = match row.map(|r| r.status) {
            Some(s) if ran => {
                format!(" ({s}: it already ran, and its change stays in the database)")
            }
            Some(s) => format!(" ({s})"),
            None => String::new(),
        };
        out.push(Change {
            step: o.name.clone(),
            status: row.map(|r| r.status),
            ran,
            does_other: true,
            lines: vec![format!("step `{}` was removed{state}", o.name)],
        });
    }
    out
}

/// At most `max` lines of a line diff from `old` to `new` (`-` removed, `+` added),
/// indented for a message; `…` when there is more.
pub fn short_diff(old: &str, new: &str, max: usize) -> Vec<String> {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    // Longest common subsequence, by table: plan steps are short.
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push(format!("    - {}", a[i]));
            i += 1;
        } else {
            out.push(format!("    + {}", b[j]));
            j += 1;
        }
    }
    if out.len() > max {
        let more = out.len() - max;
        out.truncate(max);
        out.push(format!("    … ({more} more changed line(s))"));
    }
    out
}

/// The last snapshot of the plan's steps, if one was recorded.
async fn recorded(
    cx: &Context,
    c: &impl GenericClient,
    plan: &str,
) -> Result<Option<Vec<StepSnapshot>>, db::Error> {
    let row = c
        .row_opt(
            &cx.control.sql(
                "SELECT detail FROM __SCHEMA__.events WHERE plan_id = $1 AND event = 'plan_snapshot' ORDER BY id DESC LIMIT 1",
            ),
            &[&plan],
        )
        .await?;
    let Some(detail) = row.map(|r| r.get::<_, serde_json::Value>(0)) else {
        return Ok(None);
    };
    Ok(match Event::from_row("plan_snapshot", &detail) {
        Some(Event::PlanSnapshot { steps, .. }) => Some(steps),
        _ => None,
    })
}

/// Records the plan's steps as the file has them now.
pub async fn record(cx: &Context, c: &impl GenericClient, plan: &Plan) -> Result<(), db::Error> {
    let snap = Event::PlanSnapshot {
        checksum: plan.checksum.0.clone(),
        steps: snapshot(plan),
    };
    cx.control.event(c, &plan.id, None, &snap).await
}

/// The plan file differs from the checksum `recorded`: refuses (exit 5) unless
/// the operator accepts the change, and refuses an accepted change to a step
/// that already ran unless forced. On acceptance records it (event and snapshot)
/// and tells the operator what was accepted.
pub async fn check(
    cx: &Context,
    c: &impl GenericClient,
    plan: &Plan,
    recorded_checksum: &str,
) -> Result<(), Error> {
    let rows: HashMap<String, StepRow> = cx
        .control
        .steps(c, &plan.id)
        .await?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    let old = recorded(cx, c, &plan.id).await?;
    let changes = match &old {
        Some(old) => compare(old, &snapshot(plan), &rows),
        None => Vec::new(),
    };
    let blocking: Vec<String> = changes
        .iter()
        .filter(|ch| ch.ran && ch.does_other)
        .map(|ch| ch.step.clone())
        .collect();
    let mut lines: Vec<String> = changes.iter().flat_map(|ch| ch.lines.clone()).collect();
    if old.is_none() {
        lines.push("the control schema holds no copy of the steps as they were (the plan was started by an older pgshift), so the changed steps cannot be named here: compare the file with its history in version control".into());
    } else if lines.is_empty() {
        lines.push(
            "no step differs: the change is in comments, the description, or settings no step uses"
                .into(),
        );
    }
    let accept = cx.options.accept_changed && (blocking.is_empty() || cx.options.force_changed);
    if !accept {
        return Err(Error::PlanChanged {
            plan: plan.id.clone(),
            recorded: recorded_checksum.to_string(),
            current: plan.checksum.0.clone(),
            changes: lines,
            ran: blocking,
            accepting: cx.options.accept_changed,
        });
    }
    cx.control
        .set_checksum(c, &plan.id, &plan.checksum.0)
        .await?;
    let accepted = Event::PlanChangeAccepted {
        recorded: recorded_checksum.to_string(),
        current: plan.checksum.0.clone(),
        by: whoami(),
    };
    cx.control.event(c, &plan.id, None, &accepted).await?;
    record(cx, c, plan).await?;
    cx.reporter.message(&format!(
        "plan `{}` changed since it started; accepted as you asked:\n  {}",
        plan.id,
        lines.join("\n  ")
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, body: &str, rollback: &str) -> StepSnapshot {
        StepSnapshot {
            name: name.into(),
            phase: "expand".into(),
            kind: "sql".into(),
            body: body.into(),
            limits: "lock_timeout 500ms".into(),
            rollback: rollback.into(),
        }
    }

    fn row(name: &str, status: Status) -> StepRow {
        StepRow {
            position: 0,
            phase: "expand".into(),
            name: name.into(),
            kind: "sql".into(),
            status,
            attempts: 1,
            started_at: None,
            finished_at: None,
            duration_secs: None,
            last_error: None,
            last_sqlstate: None,
            checkpoint: None,
            rows_done: 0,
            rows_total: None,
            overrides: Default::default(),
            progress: None,
        }
    }

    #[test]
    fn a_diff_shows_removed_and_added_lines() {
        let d = short_diff("a\nb\nc", "a\nB\nc\nd", 10);
        assert_eq!(d, vec!["    - b", "    + B", "    + d"]);
        let d = short_diff("", "1\n2\n3", 2);
        assert_eq!(d.len(), 3);
        assert!(d[2].contains("1 more"), "{d:?}");
    }

    #[test]
    fn changes_name_the_step_and_whether_it_ran() {
        let old = vec![snap("a", "ALTER 1", "UNDO 1"), snap("b", "ALTER 2", "")];
        let new = vec![
            snap("a", "ALTER 1", "UNDO 1 fixed"),
            snap("b", "ALTER 2 changed", ""),
            snap("c", "NEW", ""),
        ];
        let rows: HashMap<_, _> = [
            ("a".to_string(), row("a", Status::Succeeded)),
            ("b".to_string(), row("b", Status::Failed)),
        ]
        .into();
        let ch = compare(&old, &new, &rows);
        assert_eq!(ch.len(), 3);
        // `a` ran, but only its rollback changed: accepted without --force.
        assert!(ch[0].ran && !ch[0].does_other, "{ch:?}");
        assert!(ch[0].lines[0].contains("its rollback changed"), "{ch:?}");
        // `b` failed (nothing committed): its new text may run.
        assert!(!ch[1].ran && ch[1].does_other, "{ch:?}");
        assert_eq!(ch[1].lines[1], "    - ALTER 2");
        assert!(ch[2].lines[0].contains("was added"), "{ch:?}");
    }

    #[test]
    fn a_removed_step_that_ran_needs_force() {
        let old = vec![snap("a", "ALTER 1", "")];
        let rows: HashMap<_, _> = [("a".to_string(), row("a", Status::Succeeded))].into();
        let ch = compare(&old, &[], &rows);
        assert!(ch[0].ran && ch[0].does_other, "{ch:?}");
        assert!(ch[0].lines[0].contains("was removed"), "{ch:?}");
    }
}
