//! The runner: takes the plan's lock, records the plan, and runs its steps from
//! the first one not succeeded; and the same machinery backwards for rollback.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::json;
use tokio_postgres::Client;

use super::{Context, Error, Outcome, run as command, sql};
use crate::control::{StepRow, status};
use crate::db;
use crate::plan::{Command, Phase, Plan, Rollback, Step, StepKind};

/// What the operator asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `plan apply`: run from the first unfinished step; a waiting gate stays closed.
    Apply,
    /// `resume`: the same, and a waiting gate is passed.
    Resume,
    /// `backfill`: only the backfill steps (earlier phases must have succeeded).
    BackfillOnly,
}

/// `user@host` of whoever runs pgshift, for the plan record.
pub fn whoami() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .or_else(user_from_passwd)
        .unwrap_or_else(|| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{user}@{host}")
}

/// The login name of this process's uid, from /etc/passwd (when USER is not set, as under cron).
fn user_from_passwd() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid).then(|| f[0].to_string())
    })
}

/// The held lock of one plan on its dedicated connection; released explicitly on every path.
pub struct Held {
    pub conn: Client,
    pub plan: String,
}

/// Opens the lock connection, creates the control schema, takes the plan's lock.
pub async fn lock(cx: &Context, plan_id: &str) -> Result<Held, Error> {
    cx.target.check_not_transaction_pooler()?;
    let mut conn = db::connect(&cx.target).await?;
    check_session_pooler(&conn).await?;
    cx.control.ensure(&mut conn).await?;
    if !cx.control.try_lock(&conn, plan_id).await? {
        let holder = cx
            .control
            .lock_holder(&conn, plan_id)
            .await?
            .unwrap_or_else(|| "a runner whose session could not be identified".into());
        // The session alone names a backend; the recorded runner names the person
        // and process. A holder that has just taken the lock records itself a
        // moment later (and until then the row may still name a killed runner):
        // wait a little for its own record rather than name the wrong process.
        let mut recorded = None;
        for _ in 0..40 {
            recorded = cx.control.recorded_holder(&conn, plan_id).await?;
            if recorded.is_some() || cx.control.lock_holder(&conn, plan_id).await?.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let holder = match recorded {
            Some(runner) => format!("{runner} (session {holder})"),
            None => holder,
        };
        return Err(Error::LockHeld {
            plan: plan_id.to_string(),
            holder,
        });
    }
    Ok(Held {
        conn,
        plan: plan_id.to_string(),
    })
}

/// Two statements on one connection served by two backends: a transaction-mode pooler.
async fn check_session_pooler(conn: &Client) -> Result<(), Error> {
    let a: i32 = conn
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(db::Error::from)?
        .get(0);
    let b: i32 = conn
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(db::Error::from)?
        .get(0);
    if a != b {
        return Err(Error::Usage(
            "this connection goes through a transaction-mode pooler (consecutive statements ran on different backends): session advisory locks cannot work there; connect directly to the server (port 5432 on Supabase)".into(),
        ));
    }
    Ok(())
}

impl Held {
    pub async fn release(self, cx: &Context) {
        let _ = cx.control.set_runner(&self.conn, &self.plan, None).await;
        let _ = cx.control.unlock(&self.conn, &self.plan).await;
    }
}

/// Runs the plan (apply, resume, or only its backfills). Releases the lock on every path.
pub async fn run(cx: &Context, plan: &Plan, mode: Mode) -> Result<(), Error> {
    let mut held = lock(cx, &plan.id).await?;
    // `None` once the lock connection is gone for good (reconnecting failed).
    let mut kept: Option<Held> = None;
    // Reconnects in a row during the same step: a step that loses its connection every
    // time (a statement that kills its own backend, say) must not loop forever.
    let mut lost_in: Option<String> = None;
    let mut losses = 0u32;
    let result = loop {
        let result = run_locked(cx, plan, mode, &mut held).await;
        if !is_lost(&result) || cx.cancel.is_cancelled() {
            kept = Some(held);
            break result;
        }
        let step = lost_step(&result);
        losses = if step == lost_in { losses + 1 } else { 1 };
        lost_in = step;
        if losses > MAX_RECONNECTS {
            kept = Some(held);
            break Err(Error::Failed {
                step: lost_in.unwrap_or_else(|| "(between steps)".into()),
                message: format!(
                    "lost the connection {losses} times in a row during this step, reconnecting each time; it does not look like an outage but like something in the step that ends its own connection. Check the server log, then `pgshift resume {}`",
                    plan.id
                ),
            });
        }
        // The server went away (restart, failover, network cut). Reconnect and take the
        // plan's lock again within --reconnect-timeout, then continue from the control
        // table: a step that was running is either committed with its mark or not at all.
        match relock(cx, plan, held).await {
            Ok(h) => {
                held = h;
                let _ = cx
                    .control
                    .event(
                        &held.conn,
                        &plan.id,
                        None,
                        "reconnected",
                        json!({"after": result.as_ref().err().map(|e| e.to_string())}),
                    )
                    .await;
                cx.reporter.message(&format!(
                    "reconnected to {} (reconnect {losses} of at most {MAX_RECONNECTS} in a row); plan `{}` continues from its last committed step",
                    cx.target.display, plan.id
                ));
            }
            Err(Error::LockHeld { plan, holder }) => break Err(Error::LockHeld { plan, holder }),
            Err(_) => break result,
        }
    };
    let Some(held) = kept else {
        // The server stayed unreachable: nothing more can be recorded; resume continues.
        return result;
    };
    let status = match &result {
        Ok(()) => None,
        Err(Error::Gate { .. }) => Some(status::WAITING),
        Err(Error::Cancelled { .. } | Error::ConnectionLost { .. } | Error::Paused { .. }) => {
            Some(status::INTERRUPTED)
        }
        Err(Error::Step { .. } | Error::Failed { .. }) => Some(status::FAILED),
        Err(_) => None,
    };
    if let Some(s) = status {
        let _ = cx.control.set_plan_status(&held.conn, &plan.id, s).await;
    }
    if let Err(e @ (Error::Step { .. } | Error::Failed { .. })) = &result {
        let step = match e {
            Error::Step { step, .. } | Error::Failed { step, .. } => step.clone(),
            _ => String::new(),
        };
        // The failed step's phase (none for a failed phase hook, whose name is not a step).
        let phase = plan.steps.iter().find(|s| s.name == step).map(|s| s.phase);
        hooks(
            cx,
            plan,
            &plan.hooks.on_failure,
            "on_failure",
            phase,
            Some(&step),
            "failed",
            Some(&e.to_string()),
        )
        .await;
    }
    held.release(cx).await;
    result
}

/// How many times in a row one step may lose its connection and be resumed.
const MAX_RECONNECTS: u32 = 5;

/// The step during which the connection was lost, when the error names one.
fn lost_step(result: &Result<(), Error>) -> Option<String> {
    match result {
        Err(Error::ConnectionLost { step, .. } | Error::Step { step, .. }) => Some(step.clone()),
        _ => None,
    }
}

/// True when `result` failed because the connection to the server was lost.
fn is_lost(result: &Result<(), Error>) -> bool {
    match result {
        Err(Error::ConnectionLost { .. }) => true,
        Err(Error::Db(e)) | Err(Error::Step { source: e, .. }) => e.is_connection_lost(),
        _ => false,
    }
}

/// Connects again and re-takes the plan's lock, retrying with backoff until
/// `--reconnect-timeout` runs out; another runner that took the plan meanwhile wins.
async fn relock(cx: &Context, plan: &Plan, held: Held) -> Result<Held, Error> {
    // Only a step's connection may have been lost: the lock connection, if it still
    // answers, still holds the plan (a new one would find the lock taken by it).
    if !held.conn.is_closed() && held.conn.simple_query("SELECT 1").await.is_ok() {
        return Ok(held);
    }
    drop(held);
    let deadline = tokio::time::Instant::now() + cx.options.reconnect_timeout;
    let mut attempt = 0;
    loop {
        attempt += 1;
        cx.reporter.message(&format!(
            "lost the connection to {}; reconnecting (attempt {attempt})",
            cx.target.display
        ));
        match lock(cx, &plan.id).await {
            Ok(h) => return Ok(h),
            Err(e @ Error::LockHeld { .. }) => return Err(e),
            Err(e) => {
                let wait = db::backoff(attempt);
                if tokio::time::Instant::now() + wait > deadline {
                    return Err(e);
                }
                tokio::select! {
                    _ = cx.cancel.cancelled() => return Err(e),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

async fn run_locked(cx: &Context, plan: &Plan, mode: Mode, held: &mut Held) -> Result<(), Error> {
    if mode == Mode::BackfillOnly && cx.control.plan_row(&held.conn, &plan.id).await?.is_none() {
        return Err(Error::Usage(format!(
            "plan `{}` has not started here; its backfill runs after its expand and dual_write steps. Run `pgshift plan apply {}` first",
            plan.id,
            plan.file.display()
        )));
    }
    let existing = cx.control.register(&mut held.conn, plan, &whoami()).await?;
    if let Some(row) = &existing
        && row.checksum != plan.checksum.0
    {
        if !cx.options.accept_changed {
            return Err(Error::PlanChanged {
                plan: plan.id.clone(),
                recorded: row.checksum.clone(),
                current: plan.checksum.0.clone(),
            });
        }
        cx.control
            .set_checksum(&held.conn, &plan.id, &plan.checksum.0)
            .await?;
        cx.control
            .event(
                &held.conn,
                &plan.id,
                None,
                "plan_change_accepted",
                json!({"recorded": row.checksum, "current": plan.checksum.0, "by": whoami()}),
            )
            .await?;
        cx.reporter.message(&format!(
            "plan `{}` changed since it started ({} → {}); continuing as you asked",
            plan.id,
            short(&row.checksum),
            plan.checksum.short()
        ));
    }
    let runner = format!("{} pid {}", whoami(), std::process::id());
    cx.control
        .set_runner(&held.conn, &plan.id, Some(&runner))
        .await?;
    let rows: HashMap<String, StepRow> = cx
        .control
        .steps(&held.conn, &plan.id)
        .await?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    if plan.steps.iter().all(|s| {
        rows.get(&s.name)
            .is_some_and(|r| r.status == status::SUCCEEDED)
    }) {
        cx.control
            .set_plan_status(&held.conn, &plan.id, status::SUCCEEDED)
            .await?;
        cx.reporter.message(&format!(
            "plan `{}` has already succeeded; nothing to do",
            plan.id
        ));
        return Ok(());
    }
    if mode == Mode::BackfillOnly
        && let Some(first) = plan.steps.iter().find(|s| {
            s.phase < Phase::Backfill
                && rows
                    .get(&s.name)
                    .is_none_or(|r| r.status != status::SUCCEEDED)
        })
    {
        return Err(Error::Usage(format!(
            "step `{}` ({}) has not succeeded yet; the backfill runs after it. Run `pgshift plan apply {}` first",
            first.name,
            first.phase,
            plan.file.display()
        )));
    }
    cx.control
        .set_plan_status(&held.conn, &plan.id, status::RUNNING)
        .await?;
    cx.control
        .event(
            &held.conn,
            &plan.id,
            None,
            if existing.is_some() {
                "run_resumed"
            } else {
                "run_started"
            },
            json!({"mode": format!("{mode:?}"), "runner": runner}),
        )
        .await?;
    let mut phase: Option<Phase> = None;
    let mut gate_passable = mode == Mode::Resume;
    for step in &plan.steps {
        if mode == Mode::BackfillOnly && step.phase != Phase::Backfill {
            continue;
        }
        if mode == Mode::BackfillOnly
            && cx
                .options
                .backfill
                .step
                .as_ref()
                .is_some_and(|n| n != &step.name)
        {
            continue;
        }
        let row = rows.get(&step.name);
        let st = row.map(|r| r.status.as_str()).unwrap_or(status::PENDING);
        if st == status::SUCCEEDED {
            continue;
        }
        if phase != Some(step.phase) {
            if let Some(prev) = phase
                && let Some(cmds) = plan.hooks.after.get(&prev)
            {
                run_hooks_strict(cx, plan, cmds, &format!("after.{prev}"), prev).await?;
            }
            phase = Some(step.phase);
            // `before` a phase fires when the phase is entered, not again on every resume inside it.
            let entered_before = plan
                .steps
                .iter()
                .filter(|s| s.phase == step.phase)
                .any(|s| {
                    rows.get(&s.name).is_some_and(|r| {
                        !matches!(r.status.as_str(), status::PENDING | status::ROLLED_BACK)
                    })
                });
            if let Some(cmds) = plan
                .hooks
                .before
                .get(&step.phase)
                .filter(|_| !entered_before)
            {
                run_hooks_strict(
                    cx,
                    plan,
                    cmds,
                    &format!("before.{}", step.phase),
                    step.phase,
                )
                .await?;
            }
        }
        if st == status::RUNNING {
            // The previous runner died mid-step (its lock went with its connection).
            cx.control
                .event(
                    &held.conn,
                    &plan.id,
                    Some(&step.name),
                    "found_interrupted",
                    json!({"previous_status": "running"}),
                )
                .await?;
        }
        let pass_gate = matches!(step.kind, StepKind::Gate(_))
            && (cx.options.auto_gates || (gate_passable && st == status::WAITING));
        if pass_gate {
            gate_passable = false;
        }
        if matches!(step.kind, StepKind::Backfill(_)) && st == status::FAILED {
            restart_finished_pass(cx, plan, step).await?;
        }
        run_step(cx, plan, step, pass_gate, row).await?;
    }
    if mode == Mode::BackfillOnly {
        cx.reporter
            .message("backfill steps done; continue the plan with `pgshift resume`");
        let _ = cx
            .control
            .set_plan_status(&held.conn, &plan.id, status::INTERRUPTED)
            .await;
        return Ok(());
    }
    if let Some(last) = phase
        && let Some(cmds) = plan.hooks.after.get(&last)
    {
        run_hooks_strict(cx, plan, cmds, &format!("after.{last}"), last).await?;
    }
    cx.control
        .set_plan_status(&held.conn, &plan.id, status::SUCCEEDED)
        .await?;
    cx.control
        .event(&held.conn, &plan.id, None, "plan_succeeded", json!({}))
        .await?;
    hooks(
        cx,
        plan,
        &plan.hooks.on_success,
        "on_success",
        None,
        None,
        "succeeded",
        None,
    )
    .await;
    Ok(())
}

/// A backfill that failed after its last batch (its verify found missed rows) would,
/// on resume, only verify again. Start a fresh pass instead: batches are idempotent,
/// so rows already right are skipped, and the rows the fix now reaches get filled.
async fn restart_finished_pass(cx: &Context, plan: &Plan, step: &Step) -> Result<(), Error> {
    let c = db::get(&cx.pool, &cx.target).await?;
    let all_done: Option<bool> = c
        .query_one(&cx.control.sql("SELECT bool_and(done) FROM __SCHEMA__.backfill_ranges WHERE plan_id = $1 AND step = $2"), &[&plan.id, &step.name])
        .await
        .map_err(db::Error::from)?
        .get(0);
    if all_done == Some(true) {
        cx.control
            .reset_backfill_ranges(&**c, &plan.id, &step.name)
            .await?;
        cx.control
            .event(
                &**c,
                &plan.id,
                Some(&step.name),
                "backfill_pass_restarted",
                json!({"why": "the previous pass finished its range but failed verification"}),
            )
            .await?;
        cx.reporter.message(&format!("`{}` finished its range last time but failed verification; starting a fresh pass (rows already right are skipped)", step.name));
    }
    Ok(())
}

fn short(checksum: &str) -> &str {
    let hex = checksum.strip_prefix("sha256:").unwrap_or(checksum);
    &hex[..hex.len().min(12)]
}

/// Runs one step and records how it ended.
async fn run_step(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    pass_gate: bool,
    row: Option<&StepRow>,
) -> Result<(), Error> {
    let _span = tracing::info_span!("step", plan = %plan.id, step = %step.name).entered();
    {
        let c = db::get(&cx.pool, &cx.target).await?;
        cx.control.step_running(&**c, &plan.id, &step.name).await?;
        cx.control.event(&**c, &plan.id, Some(&step.name), "step_started", json!({"kind": step.kind.name(), "phase": step.phase.as_str(), "attempt": row.map(|r| r.attempts + 1).unwrap_or(1)})).await?;
    }
    cx.reporter.message(&format!(
        "{} {} [{}]",
        step.phase,
        step.name,
        step.kind.name()
    ));
    let outcome = execute(cx, plan, step, pass_gate).await;
    let c = db::get(&cx.pool, &cx.target).await;
    let c = match c {
        Ok(c) => c,
        Err(e) => {
            return Err(match outcome {
                Err(err) => err,
                Ok(_) => Error::ConnectionLost {
                    step: step.name.clone(),
                    source: e,
                },
            });
        }
    };
    match outcome {
        Ok(Outcome::Done) => {
            // Transactional kinds marked themselves inside their own transaction.
            if !marks_itself(step) {
                cx.control
                    .step_status(&**c, &plan.id, &step.name, status::SUCCEEDED, None)
                    .await?;
                cx.control
                    .event(
                        &**c,
                        &plan.id,
                        Some(&step.name),
                        "step_succeeded",
                        json!({}),
                    )
                    .await?;
            }
            Ok(())
        }
        Ok(Outcome::Gate(message)) => {
            cx.control
                .step_status(&**c, &plan.id, &step.name, status::WAITING, None)
                .await?;
            cx.control
                .event(
                    &**c,
                    &plan.id,
                    Some(&step.name),
                    "gate_waiting",
                    json!({"message": message}),
                )
                .await?;
            drop(c);
            hooks(
                cx,
                plan,
                &plan.hooks.on_gate,
                "on_gate",
                Some(step.phase),
                Some(&step.name),
                "waiting",
                None,
            )
            .await;
            Err(Error::Gate {
                plan: plan.id.clone(),
                step: step.name.clone(),
                message,
            })
        }
        Ok(outcome @ (Outcome::Cancelled | Outcome::Paused)) => {
            let paused = outcome == Outcome::Paused;
            cx.control
                .step_status(&**c, &plan.id, &step.name, status::INTERRUPTED, None)
                .await?;
            let event = if paused { "paused" } else { "interrupted" };
            cx.control
                .event(&**c, &plan.id, Some(&step.name), event, json!({}))
                .await?;
            let step = step.name.clone();
            Err(if paused {
                Error::Paused { step }
            } else {
                Error::Cancelled { step }
            })
        }
        Err(e) => {
            let (msg, state) = match &e {
                Error::Step { source, .. } => {
                    (db_message(source), source.sqlstate().map(str::to_string))
                }
                Error::ConnectionLost { source, .. } => {
                    (source.to_string(), source.sqlstate().map(str::to_string))
                }
                other => (other.to_string(), None),
            };
            let st = match e {
                Error::ConnectionLost { .. } | Error::Cancelled { .. } => status::INTERRUPTED,
                _ => status::FAILED,
            };
            let _ = cx
                .control
                .step_status(
                    &**c,
                    &plan.id,
                    &step.name,
                    st,
                    Some((&msg, state.as_deref())),
                )
                .await;
            let _ = cx
                .control
                .event(
                    &**c,
                    &plan.id,
                    Some(&step.name),
                    if st == status::FAILED {
                        "step_failed"
                    } else {
                        "interrupted"
                    },
                    json!({"error": msg, "sqlstate": state}),
                )
                .await;
            Err(e)
        }
    }
}

fn db_message(e: &db::Error) -> String {
    e.to_string()
}

fn marks_itself(step: &Step) -> bool {
    match &step.kind {
        StepKind::Sql(b) => b.transactional,
        StepKind::Trigger(_) | StepKind::DropTrigger(_) => true,
        _ => false,
    }
}

/// Dispatches on the step's kind.
async fn execute(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    pass_gate: bool,
) -> Result<Outcome, Error> {
    match &step.kind {
        StepKind::Sql(body) if body.transactional => {
            sql::run_transactional(cx, plan, step, &sql::statements_of(body), status::SUCCEEDED)
                .await
        }
        StepKind::Sql(body) => {
            sql::run_non_transactional(cx, plan, step, &body.statements[0].text).await
        }
        StepKind::Trigger(spec) => {
            sql::run_transactional(
                cx,
                plan,
                step,
                &super::trigger::statements(&plan.id, &step.name, spec),
                status::SUCCEEDED,
            )
            .await
        }
        StepKind::DropTrigger(d) => {
            sql::run_transactional(
                cx,
                plan,
                step,
                &super::trigger::rollback_statements(&plan.id, &d.step, &d.trigger),
                status::SUCCEEDED,
            )
            .await
        }
        StepKind::Backfill(spec) => crate::backfill::run(cx, plan, step, spec).await,
        StepKind::Check(check) => run_check(cx, plan, step, check).await,
        StepKind::Gate(message) => {
            if pass_gate {
                let c = db::get(&cx.pool, &cx.target).await?;
                let by = if cx.options.auto_gates {
                    "pgshift demo, on the operator's behalf"
                } else {
                    "the operator (resume)"
                };
                cx.control
                    .event(
                        &**c,
                        &plan.id,
                        Some(&step.name),
                        "gate_passed",
                        json!({"by": by, "who": whoami()}),
                    )
                    .await?;
                cx.reporter
                    .message(&format!("gate `{}` passed by {by}", step.name));
                Ok(Outcome::Done)
            } else {
                Ok(Outcome::Gate(message.clone()))
            }
        }
        StepKind::Run(cmd) => run_command(cx, plan, step, cmd, "run").await,
    }
}

async fn run_check(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    check: &crate::plan::CheckSpec,
) -> Result<Outcome, Error> {
    let deadline = check.wait.map(|w| tokio::time::Instant::now() + w);
    let mut polls = 0u32;
    loop {
        polls += 1;
        let c = db::get(&cx.pool, &cx.target).await?;
        let value = {
            let tx_result = async {
                let mut c = c;
                let raw: &mut tokio_postgres::Client = &mut c;
                let tx = raw.transaction().await?;
                db::set_local_timeouts(&tx, step.lock_timeout, step.statement_timeout).await?;
                tx.execute("SET TRANSACTION READ ONLY", &[]).await?;
                let rows = tx.query(check.query.as_str(), &[]).await?;
                tx.commit().await?;
                Ok::<_, db::Error>(check_value(&rows))
            };
            match tx_result.await {
                Ok(Ok(v)) => v,
                Ok(Err(shape)) => {
                    return Err(Error::Failed {
                        step: step.name.clone(),
                        message: format!(
                            "a check must return one row with one boolean column, and `{}` {shape}. Write it as a condition (`SELECT count(*) = 0 FROM …`), then `pgshift resume {}`",
                            check.query, plan.id
                        ),
                    });
                }
                Err(e) if e.is_retryable() => Some(false),
                Err(e) if e.is_connection_lost() => {
                    return Err(Error::ConnectionLost {
                        step: step.name.clone(),
                        source: e,
                    });
                }
                Err(e) => {
                    return Err(Error::Step {
                        step: step.name.clone(),
                        source: e,
                    });
                }
            }
        };
        if value == Some(true) {
            return Ok(Outcome::Done);
        }
        match deadline {
            Some(d) if tokio::time::Instant::now() + check.interval <= d => {
                if polls == 1 {
                    cx.reporter.message(&format!(
                        "check `{}` is not true yet; polling every {} for up to {}",
                        step.name,
                        crate::plan::duration::format(check.interval),
                        crate::plan::duration::format(check.wait.unwrap_or_default())
                    ));
                }
                tokio::select! {
                    _ = cx.cancel.cancelled() => return Ok(Outcome::Cancelled),
                    _ = tokio::time::sleep(check.interval) => {}
                }
            }
            _ => {
                let got = match value {
                    Some(false) => "false",
                    _ => "NULL",
                };
                let waited = match check.wait {
                    Some(w) => format!(
                        " (polled {polls} times over {})",
                        crate::plan::duration::format(w)
                    ),
                    None => String::new(),
                };
                return Err(Error::Failed {
                    step: step.name.clone(),
                    message: format!(
                        "check returned {got}{waited}: `{}`. Fix the data (or wait for it), then `pgshift resume {}`",
                        check.query, plan.id
                    ),
                });
            }
        }
    }
}

/// The value of a check's result, or what is wrong with its shape.
fn check_value(rows: &[tokio_postgres::Row]) -> Result<Option<bool>, String> {
    let row = match rows {
        [] => return Err("returned no row".into()),
        [row] => row,
        more => return Err(format!("returned {} rows", more.len())),
    };
    match row.columns() {
        [col] if col.type_() == &tokio_postgres::types::Type::BOOL => {
            Ok(row.get::<_, Option<bool>>(0))
        }
        [col] => Err(format!("returns a value of type {}", col.type_().name())),
        cols => Err(format!("returns {} columns", cols.len())),
    }
}

fn env_for(
    plan: &Plan,
    phase: Option<Phase>,
    step: Option<&str>,
    status: &str,
    error: Option<&str>,
) -> BTreeMap<String, String> {
    let mut v = BTreeMap::new();
    v.insert("PGSHIFT_PLAN".to_string(), plan.id.clone());
    v.insert(
        "PGSHIFT_PHASE".to_string(),
        phase.map(|p| p.as_str().to_string()).unwrap_or_default(),
    );
    v.insert(
        "PGSHIFT_STEP".to_string(),
        step.unwrap_or_default().to_string(),
    );
    v.insert("PGSHIFT_STATUS".to_string(), status.to_string());
    v.insert(
        "PGSHIFT_ERROR".to_string(),
        error.unwrap_or_default().to_string(),
    );
    v
}

async fn run_command(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    cmd: &Command,
    what: &str,
) -> Result<Outcome, Error> {
    let vars = env_for(plan, Some(step.phase), Some(&step.name), "running", None);
    let ran = command::run(cmd, &vars, &cx.cancel)
        .await
        .map_err(|e| Error::Failed {
            step: step.name.clone(),
            message: format!("cannot start `{}`: {e}", cmd.command),
        })?;
    if let Ok(c) = db::get(&cx.pool, &cx.target).await {
        let _ = cx
            .control
            .event(&**c, &plan.id, Some(&step.name), &format!("{what}_output"), json!({"command": cmd.command, "code": ran.code, "timed_out": ran.timed_out, "elapsed_ms": ran.elapsed.as_millis() as u64, "output": ran.tail}))
            .await;
    }
    if ran.cancelled {
        return Ok(Outcome::Cancelled);
    }
    if !ran.success() {
        return Err(Error::Failed {
            step: step.name.clone(),
            message: ran.failure(&cmd.command, cmd.timeout),
        });
    }
    Ok(Outcome::Done)
}

/// Phase hooks: a failure stops the plan (they guard the phase).
async fn run_hooks_strict(
    cx: &Context,
    plan: &Plan,
    cmds: &[Command],
    name: &str,
    phase: Phase,
) -> Result<(), Error> {
    for cmd in cmds {
        let vars = env_for(plan, Some(phase), None, "running", None);
        let ran = command::run(cmd, &vars, &cx.cancel)
            .await
            .map_err(|e| Error::Failed {
                step: format!("hook {name}"),
                message: e.to_string(),
            })?;
        if let Ok(c) = db::get(&cx.pool, &cx.target).await {
            let _ = cx.control.event(&**c, &plan.id, None, "hook", json!({"hook": name, "command": cmd.command, "code": ran.code, "output": ran.tail})).await;
        }
        if ran.cancelled {
            return Err(Error::Cancelled {
                step: format!("hook {name}"),
            });
        }
        if !ran.success() {
            return Err(Error::Failed {
                step: format!("hook {name}"),
                message: ran.failure(&cmd.command, cmd.timeout),
            });
        }
    }
    Ok(())
}

/// Notification hooks: a failure is logged as an event and never hides the original outcome.
#[allow(clippy::too_many_arguments)]
async fn hooks(
    cx: &Context,
    plan: &Plan,
    cmds: &[Command],
    name: &str,
    phase: Option<Phase>,
    step: Option<&str>,
    status: &str,
    error: Option<&str>,
) {
    for cmd in cmds {
        let vars = env_for(plan, phase, step, status, error);
        let ran = command::run(cmd, &vars, &tokio_util::sync::CancellationToken::new()).await;
        let (code, tail, ok) = match &ran {
            Ok(r) => (r.code, r.tail.clone(), r.success()),
            Err(e) => (None, e.to_string(), false),
        };
        if let Ok(c) = db::get(&cx.pool, &cx.target).await {
            let _ = cx
                .control
                .event(
                    &**c,
                    &plan.id,
                    step,
                    if ok { "hook" } else { "hook_failed" },
                    json!({"hook": name, "command": cmd.command, "code": code, "output": tail}),
                )
                .await;
        }
        if !ok {
            cx.reporter.message(&format!(
                "hook {name} (`{}`) failed; see `pgshift status {}` events",
                cmd.command, plan.id
            ));
        }
    }
}

/// The steps `rollback` undoes, in the order it undoes them: those that
/// succeeded or wait (a gate), and those a failure or interrupt may have left
/// partly done (a non-transactional step: its transactional peers left nothing).
pub fn to_undo<'a>(plan: &'a Plan, rows: &HashMap<String, StepRow>) -> Vec<&'a Step> {
    plan.steps
        .iter()
        .rev()
        .filter(|step| {
            let Some(r) = rows.get(&step.name) else {
                return false;
            };
            let st = r.status.as_str();
            let partly = matches!(st, status::FAILED | status::INTERRUPTED | status::RUNNING)
                && !marks_itself(step);
            st == status::SUCCEEDED || st == status::WAITING || partly
        })
        .collect()
}

/// What `rollback` would do to each step, in order, read from the control
/// table without taking the plan's lock: for the operator's confirmation.
pub async fn rollback_preview(
    cx: &Context,
    plan: &Plan,
) -> Result<Vec<(String, Vec<String>)>, Error> {
    let c = db::connect(&cx.target).await?;
    if !cx.control.exists(&c).await? || cx.control.plan_row(&c, &plan.id).await?.is_none() {
        return Ok(Vec::new());
    }
    let rows: HashMap<String, StepRow> = cx
        .control
        .steps(&c, &plan.id)
        .await?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    let mut out = Vec::new();
    for step in to_undo(plan, &rows) {
        let how = match (&step.kind, &step.rollback) {
            (StepKind::Check(_) | StepKind::Gate(_), _) => continue,
            (StepKind::Backfill(_), _) => {
                vec!["forget its checkpoint (the rows it wrote stay as they are)".to_string()]
            }
            (StepKind::Trigger(spec), _) => {
                super::trigger::rollback_statements(&plan.id, &step.name, spec)
            }
            (StepKind::DropTrigger(d), _) => {
                super::trigger::statements(&plan.id, &d.step, &d.trigger)
            }
            (_, Some(Rollback::Sql(body))) => sql::statements_of(body),
            (_, Some(Rollback::Run(cmd))) => vec![format!("run `{}`", cmd.command)],
            (_, None) => {
                out.push((
                    step.name.clone(),
                    vec![
                        "no rollback: the rollback stops here, and the steps before it stay"
                            .to_string(),
                    ],
                ));
                break;
            }
        };
        out.push((step.name.clone(), how));
    }
    Ok(out)
}

/// Runs the rollbacks of done (or partly done) steps in reverse order.
pub async fn rollback(cx: &Context, plan: &Plan) -> Result<(), Error> {
    let mut held = lock(cx, &plan.id).await?;
    let result = rollback_locked(cx, plan, &mut held).await;
    held.release(cx).await;
    result
}

async fn rollback_locked(cx: &Context, plan: &Plan, held: &mut Held) -> Result<(), Error> {
    let Some(row) = cx.control.plan_row(&held.conn, &plan.id).await? else {
        return Err(Error::Usage(format!(
            "plan `{}` has never run against this database; there is nothing to roll back",
            plan.id
        )));
    };
    if row.checksum != plan.checksum.0 && !cx.options.accept_changed {
        return Err(Error::PlanChanged {
            plan: plan.id.clone(),
            recorded: row.checksum,
            current: plan.checksum.0.clone(),
        });
    }
    cx.control
        .set_runner(
            &held.conn,
            &plan.id,
            Some(&format!(
                "{} pid {} (rollback)",
                whoami(),
                std::process::id()
            )),
        )
        .await?;
    let rows: HashMap<String, StepRow> = cx
        .control
        .steps(&held.conn, &plan.id)
        .await?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    cx.control
        .event(
            &held.conn,
            &plan.id,
            None,
            "rollback_started",
            json!({"by": whoami()}),
        )
        .await?;
    for step in to_undo(plan, &rows) {
        cx.reporter.message(&format!(
            "rolling back {} [{}]",
            step.name,
            step.kind.name()
        ));
        // `marked`: the rollback committed its own `rolled_back` mark in its transaction.
        let (outcome, marked) = match (&step.kind, &step.rollback) {
            (StepKind::Check(_) | StepKind::Gate(_), _) => (Ok(Outcome::Done), false),
            (StepKind::Backfill(_), _) => {
                let c = db::get(&cx.pool, &cx.target).await?;
                cx.control
                    .reset_backfill_ranges(&**c, &plan.id, &step.name)
                    .await?;
                (Ok(Outcome::Done), false)
            }
            (StepKind::Trigger(spec), _) => (
                sql::run_transactional(
                    cx,
                    plan,
                    step,
                    &super::trigger::rollback_statements(&plan.id, &step.name, spec),
                    status::ROLLED_BACK,
                )
                .await,
                true,
            ),
            (StepKind::DropTrigger(d), _) => (
                sql::run_transactional(
                    cx,
                    plan,
                    step,
                    &super::trigger::statements(&plan.id, &d.step, &d.trigger),
                    status::ROLLED_BACK,
                )
                .await,
                true,
            ),
            (_, Some(Rollback::Sql(body))) if body.transactional => (
                sql::run_transactional(
                    cx,
                    plan,
                    step,
                    &sql::statements_of(body),
                    status::ROLLED_BACK,
                )
                .await,
                true,
            ),
            (_, Some(Rollback::Sql(body))) => (
                sql::run_non_transactional(cx, plan, step, &body.statements[0].text).await,
                false,
            ),
            (_, Some(Rollback::Run(cmd))) => {
                (run_command(cx, plan, step, cmd, "rollback").await, false)
            }
            (_, None) => {
                cx.control
                    .event(
                        &held.conn,
                        &plan.id,
                        Some(&step.name),
                        "rollback_blocked",
                        json!({}),
                    )
                    .await?;
                return Err(Error::Failed {
                    step: step.name.clone(),
                    message: format!(
                        "it has no rollback, so `pgshift rollback` stops here; the steps after it were rolled back. Undo it by hand if you must, then continue with a plan file that has its rollback and `pgshift rollback {} --accept-changed`",
                        plan.id
                    ),
                });
            }
        };
        match outcome? {
            Outcome::Done if !marked => {
                let c = db::get(&cx.pool, &cx.target).await?;
                cx.control
                    .step_status(&**c, &plan.id, &step.name, status::ROLLED_BACK, None)
                    .await?;
                cx.control
                    .event(&**c, &plan.id, Some(&step.name), "rollback_done", json!({}))
                    .await?;
            }
            Outcome::Done => {}
            Outcome::Cancelled | Outcome::Gate(_) | Outcome::Paused => {
                return Err(Error::Cancelled {
                    step: step.name.clone(),
                });
            }
        }
    }
    cx.control
        .set_plan_status(&held.conn, &plan.id, status::ROLLED_BACK)
        .await?;
    cx.control
        .event(&held.conn, &plan.id, None, "rollback_finished", json!({}))
        .await?;
    Ok(())
}
