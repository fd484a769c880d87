//! `pgshift status`: plans and steps from the control table, as a table or as
//! JSON (a stable format that scripts and monitoring read; the README documents it).

use serde_json::{Value as Json, json};

use super::StatusFormat;
use crate::control::{EventRow, PlanRow, Status, StepRow};
use crate::db;
use crate::exec::{self, Context};
use crate::exit::Exit;

/// Prints every plan, or one plan's steps.
pub async fn print(
    cx: &Context,
    plan: Option<&str>,
    format: StatusFormat,
    events: bool,
) -> Result<Exit, exec::Error> {
    let c = db::connect(&cx.target).await?;
    // A read-only command: it never creates the control schema.
    let exists = cx.control.exists(&c).await?;
    let plans: Vec<PlanRow> = match plan {
        Some(id) => match if exists {
            cx.control.plan_row(&c, id).await?
        } else {
            None
        } {
            Some(p) => vec![p],
            None => {
                return Err(exec::Error::Usage(format!(
                    "no plan `{id}` is recorded in schema `{}` of {}",
                    cx.control.schema, cx.target.display
                )));
            }
        },
        None if exists => cx.control.plans(&c).await?,
        None => Vec::new(),
    };
    let mut out = Vec::new();
    for p in &plans {
        let steps = cx.control.steps(&c, &p.id).await?;
        // A recorded runner whose lock is gone crashed or was killed (kill -9, lost host).
        let alive = p.runner.is_some() && cx.control.lock_holder(&c, &p.id).await?.is_some();
        let evs = if events {
            Some(cx.control.events(&c, &p.id).await?)
        } else {
            None
        };
        out.push((p, steps, evs, alive));
    }
    match format {
        StatusFormat::Json => {
            let plans: Vec<Json> = out
                .iter()
                .map(|(p, steps, evs, alive)| plan_json(p, steps, evs.as_deref(), *alive))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &json!({"version": 1, "control_schema": cx.control.schema, "plans": plans})
                )
                .unwrap_or_default()
            );
        }
        StatusFormat::Table => {
            if out.is_empty() {
                println!(
                    "no plans recorded in schema `{}` yet; start one with `pgshift plan apply FILE`",
                    cx.control.schema
                );
            }
            for (p, steps, evs, alive) in &out {
                if plan.is_none() {
                    let done = steps
                        .iter()
                        .filter(|s| s.status == Status::Succeeded)
                        .count();
                    println!(
                        "{:<32} {:<12} {done}/{} steps  updated {}",
                        p.id,
                        p.status,
                        steps.len(),
                        p.updated_at
                    );
                    continue;
                }
                print_plan(p, steps, *alive);
                if let Some(evs) = evs {
                    println!("\nevents:");
                    for (at, step, event, detail) in evs.iter() {
                        println!(
                            "  {at}  {:<20} {:<22} {detail}",
                            step.as_deref().unwrap_or("-"),
                            event
                        );
                    }
                }
            }
            if plan.is_none() && !out.is_empty() {
                println!("\n`pgshift status PLAN_ID` shows one plan's steps");
            }
        }
    }
    Ok(Exit::Ok)
}

/// A running backfill's own report: current rate, ETA, batch size, and why it is throttled.
fn live_line(l: &crate::control::LiveProgress) -> String {
    let mut out = format!("{:.0} rows/s, batch {}", l.rows_per_sec, l.batch_size);
    if let Some(e) = l.eta_secs {
        out.push_str(&format!(
            ", ETA {}",
            crate::duration::human(std::time::Duration::from_secs(e))
        ));
    }
    match (&l.throttled, l.held) {
        (Some(t), true) => out.push_str(&format!(", held: {t}")),
        (Some(t), false) => out.push_str(&format!(", throttled: {t}")),
        _ => {}
    }
    out
}

fn rate(s: &StepRow) -> Option<f64> {
    // A running backfill reports its rate over the last seconds; the average since
    // the start is wrong for a run that was paused or throttled.
    if s.status == Status::Running
        && let Some(l) = &s.progress
    {
        return Some(l.rows_per_sec);
    }
    match s.duration_secs {
        Some(d) if d > 0.0 && s.rows_done > 0 => Some(s.rows_done as f64 / d),
        _ => None,
    }
}

fn print_plan(p: &PlanRow, steps: &[StepRow], alive: bool) {
    println!(
        "plan {}  status {}  checksum {}",
        p.id,
        p.status,
        &p.checksum.trim_start_matches("sha256:")[..12.min(p.checksum.len())]
    );
    println!(
        "  file {}\n  started {} by {}",
        p.file, p.started_at, p.applied_by
    );
    match &p.runner {
        Some(r) if alive => println!("  running now: {r}"),
        Some(r) => println!("  last runner: {r} (gone: it no longer holds the plan's lock)"),
        None => {}
    }
    println!(
        "\n  {:>2}  {:<10} {:<28} {:<12} {:<11} {:>3} {:>9}  rows",
        "#", "phase", "step", "kind", "status", "try", "time"
    );
    let no_return = point_of_no_return(p);
    for s in steps {
        if no_return.as_deref() == Some(s.name.as_str()) {
            println!(
                "      -- point of no return: `{}` has no rollback; past it `pgshift rollback` cannot undo the plan --",
                s.name
            );
        }
        let time = s
            .duration_secs
            .map(|d| format!("{d:.1}s"))
            .unwrap_or_default();
        let rows = match (s.rows_done, s.rows_total, rate(s)) {
            (0, None, _) => String::new(),
            (d, Some(t), Some(r)) => format!("{d}/~{t} ({r:.0}/s)"),
            (d, Some(t), None) => format!("{d}/~{t}"),
            (d, None, _) => d.to_string(),
        };
        println!(
            "  {:>2}  {:<10} {:<28} {:<12} {:<11} {:>3} {:>9}  {rows}",
            s.position + 1,
            s.phase,
            s.name,
            s.kind,
            s.status,
            s.attempts,
            time
        );
        if let Some(e) = &s.last_error
            && s.status != Status::Succeeded
        {
            let state = s
                .last_sqlstate
                .as_deref()
                .map(|x| format!(" [SQLSTATE {x}]"))
                .unwrap_or_default();
            let mut lines = e.lines();
            println!("      last error{state}: {}", lines.next().unwrap_or(""));
            for l in lines.take(12) {
                println!("        {l}");
            }
        }
        if let Some(live) = s.progress.as_ref().filter(|_| s.status == Status::Running) {
            println!("      now: {}", live_line(live));
        }
        if !s.overrides.is_empty() {
            println!(
                "      live overrides (pgshift throttle; they win over the plan and earlier flags): {}; clear with `pgshift throttle {} --clear`",
                s.overrides.describe(),
                p.id
            );
        }
    }
    println!("\nnext: {}", next_command(p, steps, alive));
}

/// The first contract step without a rollback, read from the plan file the plan started from
/// (`None` when the file is gone, invalid, or the plan is fully reversible).
fn point_of_no_return(p: &PlanRow) -> Option<String> {
    let plan = crate::plan::load(std::path::Path::new(&p.file)).ok()?;
    plan.point_of_no_return().map(|s| s.name.clone())
}

/// The command an operator most likely runs next. `alive`: a runner holds the plan's lock now.
pub fn next_command(p: &PlanRow, steps: &[StepRow], alive: bool) -> String {
    if alive {
        return format!(
            "it is running; watch it with `pgshift status {}` (retune with `pgshift throttle {}`)",
            p.id, p.id
        );
    }
    if p.status == Status::Running {
        return format!(
            "its runner{} stopped without recording it (killed or crashed); continue with `pgshift resume {}`",
            p.runner
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            p.id
        );
    }
    match p.status {
        Status::Succeeded => "nothing: the plan is done".into(),
        Status::RolledBack => format!(
            "nothing, or apply it again: `pgshift plan apply {}`",
            p.file
        ),
        Status::Waiting => {
            let gate = steps
                .iter()
                .find(|s| s.status == Status::Waiting)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            format!("do what gate `{gate}` asks, then `pgshift resume {}`", p.id)
        }
        Status::Failed => {
            let failed = steps
                .iter()
                .find(|s| s.status == Status::Failed)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            format!(
                "fix what made `{failed}` fail, then `pgshift resume {}`; or undo with `pgshift rollback {}`",
                p.id, p.id
            )
        }
        _ => format!("`pgshift resume {}`", p.id),
    }
}

fn plan_json(p: &PlanRow, steps: &[StepRow], events: Option<&[EventRow]>, alive: bool) -> Json {
    let mut v = json!({
        "id": p.id,
        "status": p.status,
        "checksum": p.checksum,
        "file": p.file,
        "applied_by": p.applied_by,
        "runner": p.runner,
        "runner_alive": alive,
        "started_at": p.started_at,
        "updated_at": p.updated_at,
        "next": next_command(p, steps, alive),
        "irreversible_after": point_of_no_return(p),
        "steps": steps.iter().map(|s| json!({
            "position": s.position + 1,
            "phase": s.phase,
            "name": s.name,
            "kind": s.kind,
            "status": s.status,
            "attempts": s.attempts,
            "started_at": s.started_at,
            "finished_at": s.finished_at,
            "duration_secs": s.duration_secs,
            "rows_done": s.rows_done,
            "rows_total": s.rows_total,
            "rows_per_sec": rate(s),
            "last_error": s.last_error,
            "last_sqlstate": s.last_sqlstate,
            "checkpoint": s.checkpoint,
            "overrides": s.overrides,
            "progress": s.progress,
        })).collect::<Vec<_>>(),
    });
    if let Some(evs) = events {
        v["events"] = evs.iter().map(|(at, step, event, detail)| json!({"at": at, "step": step, "event": event, "detail": detail})).collect();
    }
    v
}
