//! The runner: takes the plan's lock, records the plan, and runs its steps from
//! the first one not succeeded, each through its kind; it records how each step
//! ended, runs the phase hooks, reconnects after a lost connection, and decides
//! which gate a run may pass.

use std::collections::HashMap;

use tracing::Instrument;

use super::hooks::{self, Notice};
use super::lock::{Held, lock, relock};
use crate::control::{Event, PlanRecord, Status, StepRecord, StepRow};
use crate::db;
use crate::engine::{Context, Error, Fence, Outcome, StepCx, StepEnd, StepStart, whoami};
use crate::exit::ExitStatus;
use crate::plan::{Phase, Plan, Step};

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

/// How many times in a row one step may lose its connection and be resumed.
const MAX_RECONNECTS: u32 = 5;

/// What the control schema records of `plan`.
pub fn record(plan: &Plan) -> PlanRecord {
    // The absolute path, so that `resume PLAN_ID` finds the file from any directory.
    let file = std::fs::canonicalize(&plan.file).unwrap_or_else(|_| plan.file.clone());
    PlanRecord {
        id: plan.id.clone(),
        checksum: plan.checksum.0.clone(),
        file: file.display().to_string(),
        description: plan.description.clone(),
        steps: plan
            .steps
            .iter()
            .map(|s| StepRecord {
                position: s.position as i32,
                phase: s.phase.as_str(),
                name: s.name.clone(),
                kind: s.kind.name(),
            })
            .collect(),
    }
}

/// The step as its kind's code sees it.
pub fn step_cx(cx: &Context, plan: &Plan, step: &Step, previous: Status) -> StepCx {
    StepCx {
        cx: cx.clone(),
        plan: plan.id.clone(),
        step: step.name.clone(),
        phase: step.phase.as_str(),
        lock_timeout: step.lock_timeout,
        statement_timeout: step.statement_timeout,
        retries: step.retries,
        previous,
        fence: None,
    }
}

/// Runs the plan (apply, resume, or only its backfills). Releases the lock on every path.
pub async fn run(cx: &Context, plan: &Plan, mode: Mode) -> Result<(), Error> {
    let mut held = lock(cx, &plan.id).await?;
    // The plan's operations, expanded with the live catalog (checked by the
    // pre-flight before its first step) or with the facts recorded then.
    let prepared = match super::preflight::prepare(cx, plan, &held.conn).await {
        Ok(p) => p,
        Err(e) => {
            held.release(cx).await;
            return Err(e);
        }
    };
    let plan = &prepared;
    // `None` once the lock connection is gone for good (reconnecting failed).
    let mut kept: Option<Held> = None;
    // Reconnects in a row during the same step: a step that loses its connection every
    // time (a statement that kills its own backend, say) must not loop forever.
    let mut lost_in: Option<String> = None;
    let mut losses = 0u32;
    let result = loop {
        let result = run_locked(cx, plan, mode, &mut held).await;
        let lost = result.as_ref().err().filter(|e| e.is_connection_lost());
        let Some(error) = lost.filter(|_| !cx.cancel.is_cancelled()) else {
            kept = Some(held);
            break result;
        };
        let step = error.step().map(str::to_string);
        losses = if step == lost_in { losses + 1 } else { 1 };
        lost_in = step;
        if losses > MAX_RECONNECTS {
            let e = Error::Reconnects {
                plan: plan.id.clone(),
                step: lost_in.unwrap_or_else(|| "(between steps)".into()),
                losses,
            };
            // The step was recorded as interrupted each time; now it has failed.
            if let Some(step) = plan.step(e.step().unwrap_or_default()) {
                let sx = step_cx(cx, plan, step, Status::Interrupted);
                failed(&sx, &held.conn, &e).await;
            }
            kept = Some(held);
            break Err(e);
        }
        // The server went away (restart, failover, network cut). Reconnect and take the
        // plan's lock again within --reconnect-timeout, then continue from the control
        // table: a step that was running is either committed with its mark or not at all.
        match relock(cx, &plan.id, held).await {
            Ok(h) => {
                held = h;
                let after = Event::Reconnected {
                    after: Some(error.to_string()),
                };
                let _ = cx.control.event(&held.conn, &plan.id, None, &after).await;
                cx.reporter.message(&format!(
                    "reconnected to {} (reconnect {losses} of at most {MAX_RECONNECTS} in a row); plan `{}` continues from its last committed step",
                    cx.target.display, plan.id
                ));
            }
            Err(e @ Error::LockHeld { .. }) => break Err(e),
            Err(_) => break result,
        }
    };
    let Some(held) = kept else {
        // The server stayed unreachable: nothing more can be recorded; resume continues.
        return result;
    };
    if let Err(e) = &result {
        stopped(cx, plan, &held, e).await;
    }
    held.release(cx).await;
    result
}

/// Records why the run stopped on the plan, and tells the `on_failure` hooks of a failure.
async fn stopped(cx: &Context, plan: &Plan, held: &Held, e: &Error) {
    // A gate that what was found before passing keeps closed still waits.
    let at_gate = match (e, e.step()) {
        (Error::TriggerFailures { .. } | Error::Drift { .. }, Some(step)) => cx
            .control
            .steps(&held.conn, &plan.id)
            .await
            .ok()
            .and_then(|rows| rows.into_iter().find(|r| r.name == step))
            .is_some_and(|r| r.kind == "gate" && r.status == Status::Waiting),
        _ => false,
    };
    let status = match e {
        Error::Gate { .. } => Some(Status::Waiting),
        _ if at_gate => Some(Status::Waiting),
        Error::Cancelled { .. } | Error::ConnectionLost { .. } | Error::LockLost { .. } => {
            Some(Status::Interrupted)
        }
        e if e.is_step_failure() => Some(Status::Failed),
        _ => None,
    };
    if let Some(s) = status {
        let _ = cx.control.set_plan_status(&held.conn, &plan.id, s).await;
    }
    if status == Some(Status::Failed) {
        let step = e.step().unwrap_or_default();
        // The failed step's phase (none for a failed phase hook, whose name is not a step).
        let phase = plan.step(step).map(|s| s.phase);
        let message = e.to_string();
        let notice = Notice {
            phase,
            step: Some(step),
            status: "failed",
            error: Some(&message),
        };
        hooks::notify(cx, plan, &plan.hooks.on_failure, "on_failure", notice).await;
    }
}

/// Registers the plan (or checks the recorded one against the file) and the runner.
async fn start(cx: &Context, plan: &Plan, mode: Mode, held: &mut Held) -> Result<bool, Error> {
    if mode == Mode::BackfillOnly && cx.control.plan_row(&held.conn, &plan.id).await?.is_none() {
        return Err(Error::Usage(format!(
            "plan `{}` has not started here; its backfill runs after its expand and dual_write steps. Run `pgshift plan apply {}` first",
            plan.id,
            plan.file.display()
        )));
    }
    let existing = cx
        .control
        .register(&mut held.conn, &record(plan), &whoami())
        .await?;
    match &existing {
        // The steps as the file has them: what a changed file is compared against.
        None => super::changed::record(cx, &held.conn, plan).await?,
        Some(row) if row.checksum != plan.checksum.0 => {
            super::changed::check(cx, &held.conn, plan, &row.checksum).await?;
        }
        Some(_) => {}
    }
    Ok(existing.is_some())
}

async fn run_locked(cx: &Context, plan: &Plan, mode: Mode, held: &mut Held) -> Result<(), Error> {
    let resumed = start(cx, plan, mode, held).await?;
    let runner = format!("{} pid {}", whoami(), std::process::id());
    cx.control
        .set_runner(&held.conn, &plan.id, Some(&runner))
        .await?;
    held.take_epoch(cx, &runner).await?;
    let rows: HashMap<String, StepRow> = cx
        .control
        .steps(&held.conn, &plan.id)
        .await?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect();
    let status_of = |name: &str| rows.get(name).map(|r| r.status).unwrap_or(Status::Pending);
    if plan
        .steps
        .iter()
        .all(|s| status_of(&s.name) == Status::Succeeded)
    {
        cx.control
            .set_plan_status(&held.conn, &plan.id, Status::Succeeded)
            .await?;
        cx.reporter.message(&format!(
            "plan `{}` has already succeeded; nothing to do",
            plan.id
        ));
        return Ok(());
    }
    if mode == Mode::BackfillOnly
        && let Some(first) = plan
            .steps
            .iter()
            .find(|s| s.phase < Phase::Backfill && status_of(&s.name) != Status::Succeeded)
    {
        return Err(Error::Usage(format!(
            "step `{}` ({}) has not succeeded yet; the backfill runs after it. Run `pgshift plan apply {}` first",
            first.name,
            first.phase,
            plan.file.display()
        )));
    }
    cx.control
        .set_plan_status(&held.conn, &plan.id, Status::Running)
        .await?;
    let started = if resumed {
        Event::RunResumed {
            mode: format!("{mode:?}"),
            runner,
        }
    } else {
        Event::RunStarted {
            mode: format!("{mode:?}"),
            runner,
        }
    };
    cx.control
        .event(&held.conn, &plan.id, None, &started)
        .await?;
    let mut phase: Option<Phase> = None;
    let mut gate_passable = mode == Mode::Resume;
    let mut checked_created = false;
    // The contract phase is entered once one of its steps that changes something succeeded.
    let mut in_contract = plan.steps.iter().any(|s| {
        s.phase == Phase::Contract && !s.kind.is_guard() && status_of(&s.name) == Status::Succeeded
    });
    for step in &plan.steps {
        if mode == Mode::BackfillOnly
            && (step.phase != Phase::Backfill
                || cx
                    .options
                    .backfill
                    .step
                    .as_ref()
                    .is_some_and(|n| n != &step.name))
        {
            continue;
        }
        let st = status_of(&step.name);
        if st == Status::Succeeded {
            continue;
        }
        if phase != Some(step.phase) {
            enter_phase(cx, plan, phase, step.phase, &rows).await?;
            phase = Some(step.phase);
        }
        if st == Status::Running {
            // The previous runner died mid-step (its lock went with its connection).
            let found = Event::FoundInterrupted {
                previous_status: st,
            };
            cx.control
                .event(&held.conn, &plan.id, Some(&step.name), &found)
                .await?;
        }
        let is_gate = matches!(step.kind, crate::kind::StepKind::Gate(_));
        let pass_gate =
            is_gate && (cx.options.auto_gates || (gate_passable && st == Status::Waiting));
        if pass_gate {
            gate_passable = false;
        }
        let first = !std::mem::replace(&mut checked_created, true);
        if let Err(e) = before_step(cx, plan, step, &rows, first, pass_gate, in_contract).await {
            blocked(cx, plan, step, rows.get(&step.name), &e).await;
            return Err(e);
        }
        let fence = held.fence();
        run_step(cx, plan, step, pass_gate, rows.get(&step.name), fence).await?;
        in_contract |= step.phase == Phase::Contract && !step.kind.is_guard();
    }
    finish_run(cx, plan, mode, held, phase).await
}

/// What must hold before `step` runs: what the finished steps created is still
/// there (`first`: before the run's first step), what the step works on exists,
/// and no row whose dual write failed is left unfixed when a gate is passed or
/// the contract phase entered.
async fn before_step(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    rows: &HashMap<String, StepRow>,
    first: bool,
    pass_gate: bool,
    in_contract: bool,
) -> Result<(), Error> {
    if first {
        super::drift::check_created(cx, plan, rows, step).await?;
    }
    super::drift::check_needs(cx, plan, step).await?;
    let is_gate = matches!(step.kind, crate::kind::StepKind::Gate(_));
    if pass_gate {
        let at = format!("pass gate `{}`", step.name);
        super::failures::guard(cx, plan, step, &at).await?;
    } else if step.phase == Phase::Contract && !in_contract && !is_gate {
        super::failures::guard(cx, plan, step, "enter its contract phase").await?;
    } else if is_gate {
        super::failures::note_at_gate(cx, plan, &step.name).await;
    }
    Ok(())
}

/// Records why `step` did not start. A gate that rows of failed dual writes
/// keep closed stays `waiting` (with the reason as its last error), so that
/// passing it still takes the operator's word; any other step is failed.
async fn blocked(cx: &Context, plan: &Plan, step: &Step, row: Option<&StepRow>, e: &Error) {
    if e.is_connection_lost() {
        return;
    }
    let Ok(c) = db::get(&cx.pool, &cx.target).await else {
        return;
    };
    let previous = row.map(|r| r.status).unwrap_or(Status::Pending);
    let sx = step_cx(cx, plan, step, previous);
    if matches!(step.kind, crate::kind::StepKind::Gate(_)) && previous == Status::Waiting {
        let msg = e.to_string();
        let _ = cx
            .control
            .step_status(
                &**c,
                &plan.id,
                &step.name,
                Status::Waiting,
                Some((&msg, None)),
            )
            .await;
    } else {
        failed(&sx, &**c, e).await;
    }
}

/// After the last step: the last phase's `after` hooks, the plan's mark, `on_success`.
/// A `backfill` run leaves the plan interrupted: its other steps are still to run.
async fn finish_run(
    cx: &Context,
    plan: &Plan,
    mode: Mode,
    held: &Held,
    phase: Option<Phase>,
) -> Result<(), Error> {
    if mode == Mode::BackfillOnly {
        // The command line says what is left and how to continue.
        let _ = cx
            .control
            .set_plan_status(&held.conn, &plan.id, Status::Interrupted)
            .await;
        return Ok(());
    }
    if let Some(last) = phase
        && let Some(cmds) = plan.hooks.after.get(&last)
    {
        hooks::guard(cx, plan, cmds, &format!("after.{last}"), last).await?;
    }
    cx.control
        .set_plan_status(&held.conn, &plan.id, Status::Succeeded)
        .await?;
    cx.control
        .event(&held.conn, &plan.id, None, &Event::PlanSucceeded {})
        .await?;
    let notice = Notice {
        phase: None,
        step: None,
        status: "succeeded",
        error: None,
    };
    hooks::notify(cx, plan, &plan.hooks.on_success, "on_success", notice).await;
    Ok(())
}

/// Leaves phase `from` (its `after` hooks) and enters `to` (its `before` hooks,
/// which fire when the phase is entered, not again on every resume inside it).
async fn enter_phase(
    cx: &Context,
    plan: &Plan,
    from: Option<Phase>,
    to: Phase,
    rows: &HashMap<String, StepRow>,
) -> Result<(), Error> {
    if let Some(prev) = from
        && let Some(cmds) = plan.hooks.after.get(&prev)
    {
        hooks::guard(cx, plan, cmds, &format!("after.{prev}"), prev).await?;
    }
    let entered_before = plan.steps.iter().filter(|s| s.phase == to).any(|s| {
        rows.get(&s.name)
            .is_some_and(|r| !matches!(r.status, Status::Pending | Status::RolledBack))
    });
    if let Some(cmds) = plan.hooks.before.get(&to).filter(|_| !entered_before) {
        hooks::guard(cx, plan, cmds, &format!("before.{to}"), to).await?;
    }
    Ok(())
}

/// Runs one step and records how it ended.
async fn run_step(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    pass_gate: bool,
    row: Option<&StepRow>,
    fence: Fence,
) -> Result<(), Error> {
    let previous = row.map(|r| r.status).unwrap_or(Status::Pending);
    let mut sx = step_cx(cx, plan, step, previous);
    sx.fence = Some(fence);
    {
        let c = db::get(&cx.pool, &cx.target).await?;
        cx.control.step_running(&**c, &plan.id, &step.name).await?;
        let started = Event::StepStarted {
            kind: step.kind.name().to_string(),
            phase: step.phase.as_str().to_string(),
            attempt: row.map(|r| r.attempts + 1).unwrap_or(1),
        };
        sx.record(&**c, &started).await?;
    }
    cx.reporter.step_started(&StepStart {
        plan: &plan.id,
        step: &step.name,
        text: &format!("{} {} [{}]", step.phase, step.name, step.kind.name()),
        rows_done: row.map(|r| r.rows_done.max(0) as u64).unwrap_or(0),
    });
    let by = if cx.options.auto_gates {
        "pgshift demo, on the operator's behalf"
    } else {
        "the operator (resume)"
    };
    // A span for the step's logs; instrumenting (not entering) keeps the future Send.
    let span = tracing::info_span!("step", plan = %plan.id, step = %step.name);
    let outcome = step
        .kind
        .execute(&sx, pass_gate.then_some(by))
        .instrument(span)
        .await;
    cx.reporter.step_ended(
        &step.name,
        match &outcome {
            Ok(Outcome::Done) => StepEnd::Done,
            Ok(Outcome::Gate(_)) => StepEnd::Waiting,
            Ok(Outcome::Cancelled) => StepEnd::Interrupted,
            Err(e) if e.exit() == crate::exit::Exit::Resumable => StepEnd::Interrupted,
            Err(_) => StepEnd::Failed,
        },
    );
    let c = match db::get(&cx.pool, &cx.target).await {
        Ok(c) => c,
        Err(e) => {
            return Err(match outcome {
                Err(err) => err,
                Ok(_) => sx.db_error(e),
            });
        }
    };
    match outcome {
        Ok(Outcome::Done) => {
            // Transactional kinds marked themselves inside their own transaction.
            if !step.kind.marks_itself() {
                cx.control
                    .step_status(&**c, &plan.id, &step.name, Status::Succeeded, None)
                    .await?;
                sx.record(&**c, &Event::StepSucceeded { attempt: None })
                    .await?;
            }
            Ok(())
        }
        Ok(Outcome::Gate(message)) => {
            cx.control
                .step_status(&**c, &plan.id, &step.name, Status::Waiting, None)
                .await?;
            let waiting = Event::GateWaiting {
                message: message.clone(),
            };
            sx.record(&**c, &waiting).await?;
            drop(c);
            let notice = Notice {
                phase: Some(step.phase),
                step: Some(&step.name),
                status: "waiting",
                error: None,
            };
            hooks::notify(cx, plan, &plan.hooks.on_gate, "on_gate", notice).await;
            Err(Error::Gate {
                plan: plan.id.clone(),
                step: step.name.clone(),
                message,
            })
        }
        Ok(Outcome::Cancelled) => {
            cx.control
                .step_status(&**c, &plan.id, &step.name, Status::Interrupted, None)
                .await?;
            let interrupted = Event::Interrupted {
                error: None,
                sqlstate: None,
            };
            sx.record(&**c, &interrupted).await?;
            Err(Error::Cancelled {
                step: step.name.clone(),
            })
        }
        Err(e) => {
            failed(&sx, &**c, &e).await;
            Err(e)
        }
    }
}

/// Records a step that failed (or was cut off) with its error and SQLSTATE.
///
/// Not when the runner lost the plan's lock: the step may already belong to the
/// runner that took the plan over, and this one must write nothing more about it.
async fn failed(sx: &StepCx, c: &impl tokio_postgres::GenericClient, e: &Error) {
    if matches!(e, Error::LockLost { .. }) {
        return;
    }
    let (msg, state) = match e {
        Error::Database { source, .. } | Error::ConnectionLost { source, .. } => {
            (source.to_string(), source.sqlstate().map(str::to_string))
        }
        other => (
            other.to_string(),
            other
                .source_db()
                .and_then(|s| s.sqlstate())
                .map(str::to_string),
        ),
    };
    let status = match e {
        Error::ConnectionLost { .. } | Error::Cancelled { .. } | Error::LockLost { .. } => {
            Status::Interrupted
        }
        _ => Status::Failed,
    };
    let control = &sx.cx.control;
    let _ = control
        .step_status(
            c,
            &sx.plan,
            &sx.step,
            status,
            Some((&msg, state.as_deref())),
        )
        .await;
    let event = if status == Status::Failed {
        Event::StepFailed {
            error: msg,
            sqlstate: state,
        }
    } else {
        Event::Interrupted {
            error: Some(msg),
            sqlstate: state,
        }
    };
    let _ = sx.record(c, &event).await;
}
