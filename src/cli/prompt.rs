//! The questions pgshift asks before it does something an operator must
//! confirm: passing a gate, rolling a plan back. Off a terminal nothing can
//! answer, so the answer is no unless `--yes` was given.

use std::io::{BufRead, IsTerminal, Write};

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

/// Asks on a terminal before passing a gate. Off a terminal nothing can answer, so the
/// gate stays closed: a script that retries `resume` must never walk through a gate.
pub fn confirm_gate(plan: &Plan, gate: &str) -> bool {
    let message = match plan.step(gate).map(|s| &s.kind) {
        Some(plan::StepKind::Gate(m)) => m.clone(),
        _ => String::new(),
    };
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "pgshift: plan `{}` waits at gate `{gate}`:\n  {message}\nthe gate stays closed: off a terminal, resume passes a gate only with --yes. When that is done, continue with:\n  pgshift --yes resume {}",
            plan.id, plan.id
        );
        return false;
    }
    eprint!(
        "The plan waits at gate `{gate}`: {message}\nHas that been done? Continue past the gate [y/N] "
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let yes = matches!(line.trim(), "y" | "Y" | "yes");
    if !yes {
        eprintln!("not resumed: the gate stays closed");
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
    eprint!("{text}");
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "refused: off a terminal, rollback runs only with --yes; nothing was changed. To roll back:\n  pgshift --yes rollback {}",
            plan.id
        );
        return Ok(false);
    }
    eprint!("Roll back plan `{}`? [y/N] ", plan.id);
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(true)
    } else {
        eprintln!("not rolled back; nothing was changed");
        Ok(false)
    }
}
