//! The questions pgshift asks before it does something an operator must
//! confirm: passing a gate, rolling a plan back. Off a terminal nothing can
//! answer, so the answer is no unless `--yes` was given; with
//! `--log-format json` (a pipeline reads stderr) pgshift never asks either.

use std::io::{BufRead, IsTerminal, Write};

use super::hint;
use super::output::{self, Level, Line};
use crate::control::Status;
use crate::db;
use crate::exec::{self, rollback};
use crate::plan::{self, Plan};

/// The name of the gate step the plan waits at, if it waits at one.
pub async fn waiting_gate(cx: &exec::Context, plan: &Plan) -> Option<String> {
    let c = db::get(&cx.pool, &cx.target).await.ok()?;
    let rows = cx.control.steps(&**c, &plan.id).await.ok()?;
    rows.into_iter()
        .find(|r| r.kind == "gate" && r.status == Status::Waiting)
        .map(|r| r.name)
}

/// True when a person can answer a question here.
fn can_ask() -> bool {
    std::io::stdin().is_terminal() && !output::is_json()
}

/// Reads a `y`/`yes` from the terminal (anything else, or nothing, is no).
fn answer_yes(question: &str) -> bool {
    let mut err = std::io::stderr();
    let _ = write!(err, "{question} [y/N] ");
    let _ = err.flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    matches!(line.trim(), "y" | "Y" | "yes")
}

/// Asks on a terminal before passing a gate. Off a terminal nothing can answer, so the
/// gate stays closed: a script that retries `resume` must never walk through a gate.
pub fn confirm_gate(plan: &Plan, gate: &str) -> bool {
    let message = match plan.step(gate).map(|s| &s.kind) {
        Some(plan::StepKind::Gate(m)) => m.clone(),
        _ => String::new(),
    };
    if !can_ask() {
        Line::info(
            "gate_closed",
            format!(
                "plan `{}` waits at gate `{gate}`:\n  {message}\nthe gate stays closed: off a terminal, resume passes a gate only with --yes. When that is done, continue with:\n  {}",
                plan.id,
                hint::command(&format!("--yes resume {}", plan.id))
            ),
        )
        .step(gate)
        .field("gate", gate)
        .field("message", &message)
        .emit();
        return false;
    }
    let yes = answer_yes(&format!(
        "The plan waits at gate `{gate}`: {message}\nHas that been done? Continue past the gate"
    ));
    if !yes {
        Line::info("gate_closed", "not resumed: the gate stays closed").emit();
    }
    yes
}

/// Shows what `rollback` would undo, on which database, and asks on a terminal.
/// Off a terminal it refuses without `--yes` and changes nothing.
pub async fn confirm_rollback(cx: &exec::Context, plan: &Plan) -> Result<bool, exec::Error> {
    let undo = rollback::preview(cx, plan).await?;
    let dbname = cx.target.config.get_dbname().unwrap_or("postgres");
    let mut text = format!(
        "rollback of plan `{}` on {} (database `{dbname}`) would undo, in this order:\n",
        plan.id, cx.target.display
    );
    if undo.is_empty() {
        text.push_str("  nothing: no step of it has run here\n");
    }
    for (step, how) in &undo {
        text.push_str(&format!("  {step}:\n"));
        for h in how {
            let first = h.lines().next().unwrap_or_default();
            let more = if h.lines().count() > 1 { " …" } else { "" };
            text.push_str(&format!("    {first}{more}\n"));
        }
    }
    if let Some((last, _)) = undo.last()
        && plan.step(last).is_some_and(|s| s.is_irreversible())
    {
        text.push_str(&format!(
            "  and stop at `{last}`: the plan gives it no rollback, so it and the steps before it stay\n"
        ));
    }
    Line::plain(Level::Info, "rollback_preview", text.trim_end())
        .field(
            "steps",
            undo.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>(),
        )
        .emit();
    if !can_ask() {
        Line::info(
            "rollback_refused",
            format!(
                "refused: off a terminal, rollback runs only with --yes; nothing was changed. To roll back:\n  {}",
                hint::command(&format!("--yes rollback {}", plan.id))
            ),
        )
        .emit();
        return Ok(false);
    }
    if answer_yes(&format!("Roll back plan `{}`?", plan.id)) {
        Ok(true)
    } else {
        Line::info("rollback_refused", "not rolled back; nothing was changed").emit();
        Ok(false)
    }
}
