//! `pgshift status`: plans and steps from the control table, as a table or as
//! JSON (a stable format that scripts and monitoring read; the README documents it).

use serde_json::{Value as Json, json};

use super::StatusFormat;
use crate::control::{EventRow, PlanRow, Status, StepRow, TriggerFailure};
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
        let extra = extra(cx, &c, p, &steps).await;
        out.push((p, steps, evs, alive, extra));
    }
    match format {
        StatusFormat::Json => {
            let plans: Vec<Json> = out
                .iter()
                .map(|(p, steps, evs, alive, extra)| {
                    let mut v = plan_json(p, steps, evs.as_deref(), *alive);
                    extra.add_to(&mut v);
                    v
                })
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
            for (p, steps, evs, alive, extra) in &out {
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
                extra.print(&p.id);
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

/// What the control table says beyond steps: what the contract phase set aside
/// (kept until `pgshift finalize`), and why a pre-flight stopped the plan.
#[derive(Default)]
struct Extra {
    /// (step, since, finalize is due by `settings.retain`).
    retained: Vec<(String, String, bool)>,
    finalized_at: Option<String>,
    preflight: Vec<String>,
    /// Rows whose dual write failed, fixed ones included.
    trigger_failures: Vec<TriggerFailure>,
}

async fn extra(cx: &Context, c: &tokio_postgres::Client, p: &PlanRow, steps: &[StepRow]) -> Extra {
    let mut out = Extra {
        trigger_failures: cx
            .control
            .trigger_failures(c, &p.id, false)
            .await
            .unwrap_or_default(),
        ..Extra::default()
    };
    if p.status == Status::Failed
        && !steps.iter().any(|s| s.status == Status::Failed)
        && let Ok(Some((_, d))) = cx.control.last_event(c, &p.id, "preflight_failed").await
    {
        out.preflight = d["findings"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
    }
    if let Ok(Some((at, _))) = cx.control.last_event(c, &p.id, "finalized").await {
        out.finalized_at = Some(at);
        return out;
    }
    if p.status != Status::Succeeded {
        return out;
    }
    let Ok(plan) = crate::plan::load(std::path::Path::new(&p.file)) else {
        return out;
    };
    let Ok(plan) = crate::exec::preflight::recorded(cx, &plan, c).await else {
        return out;
    };
    let retain_secs = plan.settings.retain.map(|d| d.as_secs_f64());
    for step in plan.steps.iter().filter(|s| s.finalize.is_some()) {
        let Some(row) = steps
            .iter()
            .find(|r| r.name == step.name && r.status == Status::Succeeded)
        else {
            continue;
        };
        let since = row.finished_at.clone().unwrap_or_default();
        let due = match retain_secs {
            Some(secs) => c
                .query_one(
                    "SELECT now() - $1::text::timestamptz >= make_interval(secs => $2)",
                    &[&since, &secs],
                )
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false),
            None => false,
        };
        out.retained.push((step.name.clone(), since, due));
    }
    out
}

impl Extra {
    fn print(&self, id: &str) {
        print_trigger_failures(&self.trigger_failures);
        if !self.preflight.is_empty() {
            println!("\npre-flight found (nothing was changed):");
            for f in &self.preflight {
                println!("  - {f}");
            }
        }
        if let Some(at) = &self.finalized_at {
            println!("\nfinalized at {at}: what the contract phase set aside is dropped");
        }
        if !self.retained.is_empty() {
            println!(
                "\nset aside by the contract phase, kept until `pgshift finalize {id}` (rollback still works until then):"
            );
            for (step, since, due) in &self.retained {
                let due = if *due {
                    "  -- finalize is due (settings.retain has passed)"
                } else {
                    ""
                };
                println!("  {step}, since {since}{due}");
            }
        }
    }

    fn add_to(&self, v: &mut Json) {
        v["retained"] = self
            .retained
            .iter()
            .map(|(step, since, due)| json!({"step": step, "since": since, "finalize_due": due}))
            .collect();
        v["finalized_at"] = json!(self.finalized_at);
        v["preflight_findings"] = json!(self.preflight);
        v["trigger_failures"] = json!(self.trigger_failures);
    }
}

/// The rows whose dual write failed and are not fixed yet (and how many were).
fn print_trigger_failures(all: &[TriggerFailure]) {
    const SHOWN: usize = 20;
    let open: Vec<&TriggerFailure> = all.iter().filter(|f| f.resolved_at.is_none()).collect();
    if open.is_empty() {
        return;
    }
    println!(
        "\n{} row(s) failed the dual-write trigger ({} fixed since); the application's writes went through, but these rows lack their new value, and the plan cannot pass a gate or enter its contract phase until they are fixed:",
        open.len(),
        all.len() - open.len()
    );
    for f in open.iter().take(SHOWN) {
        println!("  {}, last at {}", f.describe(), f.last_at);
    }
    if open.len() > SHOWN {
        println!("  … and {} more", open.len() - SHOWN);
    }
}

fn rate(s: &StepRow) -> Option<f64> {
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
        if !s.overrides.is_empty() {
            println!("      operator overrides: {}", s.overrides.to_json());
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
        })).collect::<Vec<_>>(),
    });
    if let Some(evs) = events {
        v["events"] = evs.iter().map(|(at, step, event, detail)| json!({"at": at, "step": step, "event": event, "detail": detail})).collect();
    }
    v
}
