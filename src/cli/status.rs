//! `pgshift status`: plans and steps from the control table, as a table or as
//! JSON (a stable format that scripts and monitoring read; the README documents it).
//!
//! What it shows is what is true now: a backfill the operator paused is
//! `paused` (with no rate), a plan at a gate says what the gate asks, and
//! timestamps are RFC 3339 in UTC.

use serde_json::{Value as Json, json};
use tokio_postgres::Client;

use super::StatusFormat;
use super::hint;
use crate::control::{PlanRow, Status, StepRow, TriggerFailure};
use crate::db::{self, OneTrip};
use crate::exec::{self, Context};
use crate::exit::Exit;

/// One plan as `status` shows it.
struct Shown {
    plan: PlanRow,
    steps: Vec<StepRow>,
    events: Option<Vec<crate::control::EventRow>>,
    /// A runner holds the plan's lock now.
    alive: bool,
    /// What the gate the plan waits at asks, if it waits at one.
    gate: Option<(String, String)>,
    /// What the contract set aside, and why a pre-flight stopped the plan.
    extra: Extra,
}

/// Prints every plan, or one plan's steps.
pub async fn print(
    cx: &Context,
    plan: Option<&str>,
    format: StatusFormat,
    events: bool,
) -> Result<Exit, exec::Error> {
    let c = db::connect(&cx.target).await?;
    // This connection is status's own: UTC and ISO make every timestamp read alike.
    c.batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'")
        .await
        .map_err(db::Error::from)?;
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
                    "no plan `{id}` is recorded in schema `{}` of {}; check --database-url and --control-schema",
                    cx.control.schema, cx.target.display
                )));
            }
        },
        None if exists => cx.control.plans(&c).await?,
        None => Vec::new(),
    };
    let mut out = Vec::new();
    for p in plans {
        out.push(shown(cx, &c, p, events).await?);
    }
    match format {
        StatusFormat::Json => {
            let plans: Vec<Json> = out.iter().map(plan_json).collect();
            let doc = json!({
                "version": 1,
                "database": cx.target.display,
                "control_schema": cx.control.schema,
                "plans": plans,
            });
            println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        }
        StatusFormat::Table if plan.is_none() => print_all(cx, &out),
        StatusFormat::Table => {
            for s in &out {
                print_plan(s);
            }
        }
    }
    Ok(Exit::Ok)
}

async fn shown(
    cx: &Context,
    c: &Client,
    plan: PlanRow,
    events: bool,
) -> Result<Shown, exec::Error> {
    let steps = cx.control.steps(c, &plan.id).await?;
    // A recorded runner whose lock is gone crashed or was killed (kill -9, lost host).
    let alive = plan.runner.is_some() && cx.control.lock_holder(c, &plan.id).await?.is_some();
    let events = if events {
        Some(cx.control.events(c, &plan.id).await?)
    } else {
        None
    };
    let gate = match steps.iter().find(|s| s.status == Status::Waiting) {
        Some(s) => Some((
            s.name.clone(),
            gate_message(cx, c, &plan.id, &s.name).await?,
        )),
        None => None,
    };
    let extra = extra(cx, c, &plan, &steps).await;
    Ok(Shown {
        plan,
        steps,
        events,
        alive,
        gate,
        extra,
    })
}

/// What the gate said when the plan stopped at it (its last `gate_waiting` event).
async fn gate_message(
    cx: &Context,
    c: &Client,
    plan: &str,
    step: &str,
) -> Result<String, exec::Error> {
    let row = c
        .row_opt(
            &cx.control.sql(
                "SELECT detail->>'message' FROM __SCHEMA__.events
                 WHERE plan_id = $1 AND step = $2 AND event = 'gate_waiting' ORDER BY id DESC LIMIT 1",
            ),
            &[&plan, &step],
        )
        .await
        .map_err(db::Error::from)?;
    Ok(row.and_then(|r| r.get(0)).unwrap_or_default())
}

/// Every plan, one line each, under the database and schema they were read from.
fn print_all(cx: &Context, out: &[Shown]) {
    if out.is_empty() {
        println!(
            "no plans recorded in schema `{}` of {} yet; start one with `{}`",
            cx.control.schema,
            cx.target.display,
            hint::command("plan apply FILE")
        );
        return;
    }
    println!(
        "plans recorded in schema `{}` of {}:\n",
        cx.control.schema, cx.target.display
    );
    for s in out {
        let done = s
            .steps
            .iter()
            .filter(|x| x.status == Status::Succeeded)
            .count();
        println!(
            "{:<32} {:<12} {done}/{} steps  updated {}",
            s.plan.id,
            plan_status(s),
            s.steps.len(),
            table_time(&s.plan.updated_at)
        );
    }
    println!(
        "\n`{}` shows one plan's steps",
        hint::command("status PLAN_ID")
    );
}

/// A step as it is now: `paused` when it runs but the operator paused it.
fn step_status(s: &StepRow, alive: bool) -> &'static str {
    if is_paused(s, alive) {
        "paused"
    } else {
        s.status.as_str()
    }
}

fn is_paused(s: &StepRow, alive: bool) -> bool {
    alive && s.status == Status::Running && s.overrides.paused == Some(true)
}

fn plan_status(s: &Shown) -> &'static str {
    if s.steps.iter().any(|x| is_paused(x, s.alive)) {
        "paused"
    } else {
        s.plan.status.as_str()
    }
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

/// Rows per second: a running backfill's rate over the last seconds (the
/// average since the start is wrong for a run that was paused or throttled),
/// none while paused (it is not moving), else the average of its run.
fn rate(s: &StepRow, alive: bool) -> Option<f64> {
    if is_paused(s, alive) {
        return None;
    }
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

/// `2025-03-01 04:05:06.123456+00` (ISO, UTC) as RFC 3339: `2025-03-01T04:05:06.123456Z`.
pub fn rfc3339(pg: &str) -> String {
    let t = pg.trim();
    let t = t.strip_suffix("+00").unwrap_or(t);
    format!("{}Z", t.replacen(' ', "T", 1))
}

/// The same instant for the table: `2025-03-01 04:05:06 UTC`.
fn table_time(pg: &str) -> String {
    let t = pg.trim().trim_end_matches("+00");
    let t = t.split('.').next().unwrap_or(t);
    format!("{t} UTC")
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

async fn extra(cx: &Context, c: &Client, p: &PlanRow, steps: &[StepRow]) -> Extra {
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
                .row(
                    "SELECT now() - $1::text::timestamptz >= make_interval(secs => $2)",
                    &[&since, &secs],
                )
                .await
                .map(|r| r.get::<_, bool>(0))
                .unwrap_or(false),
            None => false,
        };
        out.retained.push((step.name.clone(), rfc3339(&since), due));
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
            println!(
                "\nfinalized at {}: what the contract phase set aside is dropped",
                rfc3339(at)
            );
        }
        if !self.retained.is_empty() {
            println!(
                "\nset aside by the contract phase, kept until `{}` (rollback still works until then):",
                hint::command(&format!("finalize {id}"))
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
        v["finalized_at"] = json!(self.finalized_at.as_deref().map(rfc3339));
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

fn print_plan(s: &Shown) {
    let p = &s.plan;
    println!(
        "plan {}  status {}  checksum {}",
        p.id,
        plan_status(s),
        &p.checksum.trim_start_matches("sha256:")[..12.min(p.checksum.len())]
    );
    println!(
        "  file {}\n  started {} by {}",
        p.file,
        table_time(&p.started_at),
        p.applied_by
    );
    match &p.runner {
        Some(r) if s.alive => println!("  running now: {r}"),
        Some(r) => println!("  last runner: {r} (gone: it no longer holds the plan's lock)"),
        None => {}
    }
    // The step column fits the longest name (generated names run long), from 28 to 64.
    let w = s
        .steps
        .iter()
        .map(|x| x.name.chars().count())
        .max()
        .unwrap_or(0)
        .clamp(28, 64);
    println!(
        "\n  {:>2}  {:<10} {:<w$} {:<12} {:<11} {:>3} {:>9}  rows",
        "#", "phase", "step", "kind", "status", "try", "time"
    );
    let no_return = point_of_no_return(p);
    for st in &s.steps {
        if no_return.as_deref() == Some(st.name.as_str()) {
            println!(
                "      -- point of no return: `{}` has no rollback; past it `pgshift rollback` cannot undo the plan --",
                st.name
            );
        }
        print_step(st, s.alive, &p.id, w);
    }
    if let Some((gate, message)) = &s.gate {
        println!("\nwaiting at gate `{gate}`, which asks:\n  {message}");
    }
    s.extra.print(&p.id);
    println!("\nnext: {}", next_command(s));
    if let Some(evs) = &s.events {
        println!("\nevents:");
        for (at, step, event, detail) in evs.iter() {
            println!(
                "  {}  {:<20} {:<22} {detail}",
                table_time(at),
                step.as_deref().unwrap_or("-"),
                event
            );
        }
    }
}

fn print_step(s: &StepRow, alive: bool, plan: &str, w: usize) {
    let time = s
        .duration_secs
        .map(|d| format!("{d:.1}s"))
        .unwrap_or_default();
    let rows = match (s.rows_done, s.rows_total, rate(s, alive)) {
        (0, None, _) => String::new(),
        (d, Some(t), Some(r)) => format!("{d}/~{t} ({r:.0}/s)"),
        (d, Some(t), None) => format!("{d}/~{t}"),
        (d, None, _) => d.to_string(),
    };
    println!(
        "  {:>2}  {:<10} {:<w$} {:<12} {:<11} {:>3} {:>9}  {rows}",
        s.position + 1,
        s.phase,
        s.name,
        s.kind,
        step_status(s, alive),
        s.attempts,
        time
    );
    if is_paused(s, alive) {
        println!(
            "      paused by the operator; `{}` lets it continue",
            hint::command(&format!("throttle {plan} --unpause"))
        );
    }
    if let Some(e) = &s.last_error
        && s.status != Status::Succeeded
    {
        // The message of a server error already ends with its SQLSTATE: say it once.
        let state = match s.last_sqlstate.as_deref() {
            Some(x) if !e.contains(&format!("SQLSTATE {x}")) => format!(" [SQLSTATE {x}]"),
            _ => String::new(),
        };
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
            "      live overrides (pgshift throttle; they win over the plan and earlier flags): {}; clear with `{}`",
            s.overrides.describe(),
            hint::command(&format!("throttle {plan} --clear"))
        );
    }
}

/// The first contract step without a rollback, read from the plan file the plan started from
/// (`None` when the file is gone, invalid, or the plan is fully reversible).
fn point_of_no_return(p: &PlanRow) -> Option<String> {
    let plan = crate::plan::load(std::path::Path::new(&p.file)).ok()?;
    plan.point_of_no_return().map(|s| s.name.clone())
}

/// The command an operator most likely runs next.
fn next_command(s: &Shown) -> String {
    let (p, steps) = (&s.plan, &s.steps);
    let cmd = |args: String| format!("`{}`", hint::command(&args));
    if s.alive {
        if steps.iter().any(|x| is_paused(x, true)) {
            return format!(
                "it is paused by the operator; let it continue with {}",
                cmd(format!("throttle {} --unpause", p.id))
            );
        }
        return format!(
            "it is running; watch it with {} (retune with `pgshift throttle {} …`)",
            cmd(format!("status {}", p.id)),
            p.id
        );
    }
    if p.status == Status::Running {
        return format!(
            "its runner{} stopped without recording it (killed or crashed); continue with {}",
            p.runner
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            cmd(format!("resume {}", p.id))
        );
    }
    let rolled_back = steps.iter().any(|x| x.status == Status::RolledBack);
    let applied = steps.iter().any(|x| x.status == Status::Succeeded);
    if rolled_back && applied && p.status != Status::RolledBack {
        return format!(
            "a rollback stopped partway: the steps marked rolled_back are undone, those marked succeeded are not. Apply the plan again with {}, or give the step that stopped it a rollback and run {}",
            cmd(format!("resume {}", p.id)),
            cmd(format!("rollback {} --accept-changed", p.id))
        );
    }
    match p.status {
        Status::Succeeded => "nothing: the plan is done".into(),
        Status::RolledBack => format!(
            "nothing, or apply it again: {}",
            cmd(format!("plan apply {}", p.file))
        ),
        Status::Waiting => {
            let gate = s.gate.as_ref().map(|(g, _)| g.as_str()).unwrap_or_default();
            format!(
                "do what gate `{gate}` asks, then {}",
                cmd(format!("resume {}", p.id))
            )
        }
        Status::Failed => {
            let failed = steps
                .iter()
                .find(|s| s.status == Status::Failed)
                .map(|s| s.name.clone())
                .unwrap_or_default();
            format!(
                "fix what made `{failed}` fail, then {}; or undo with {}",
                cmd(format!("resume {}", p.id)),
                cmd(format!("rollback {}", p.id))
            )
        }
        _ => cmd(format!("resume {}", p.id)),
    }
}

fn plan_json(s: &Shown) -> Json {
    let p = &s.plan;
    let time = |t: &Option<String>| t.as_deref().map(rfc3339);
    let mut v = json!({
        "id": p.id,
        "status": plan_status(s),
        "checksum": p.checksum,
        "file": p.file,
        "applied_by": p.applied_by,
        "runner": p.runner,
        "runner_alive": s.alive,
        "started_at": rfc3339(&p.started_at),
        "updated_at": rfc3339(&p.updated_at),
        "next": next_command(s),
        "irreversible_after": point_of_no_return(p),
        "gate": s.gate.as_ref().map(|(g, m)| json!({"step": g, "message": m})),
        "steps": s.steps.iter().map(|st| json!({
            "position": st.position + 1,
            "phase": st.phase,
            "name": st.name,
            "kind": st.kind,
            "status": step_status(st, s.alive),
            "attempts": st.attempts,
            "started_at": time(&st.started_at),
            "finished_at": time(&st.finished_at),
            "duration_secs": st.duration_secs,
            "rows_done": st.rows_done,
            "rows_total": st.rows_total,
            "rows_per_sec": rate(st, s.alive),
            "last_error": st.last_error,
            "last_sqlstate": st.last_sqlstate,
            "checkpoint": st.checkpoint,
            "overrides": st.overrides,
            "progress": st.progress,
        })).collect::<Vec<_>>(),
    });
    s.extra.add_to(&mut v);
    if let Some(evs) = &s.events {
        v["events"] = evs
            .iter()
            .map(|(at, step, event, detail)| json!({"at": rfc3339(at), "step": step, "event": event, "detail": detail}))
            .collect();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_timestamps_become_rfc3339() {
        assert_eq!(
            rfc3339("2025-03-01 04:05:06.123456+00"),
            "2025-03-01T04:05:06.123456Z"
        );
        assert_eq!(rfc3339("2025-03-01 04:05:06+00"), "2025-03-01T04:05:06Z");
        assert_eq!(
            table_time("2025-03-01 04:05:06.123456+00"),
            "2025-03-01 04:05:06 UTC"
        );
    }
}
