//! `pgshift rollback`: the undo of every step that ran, latest first, each
//! through its kind (a generated undo, a checkpoint reset, or the plan's own
//! `rollback`), under the plan's lock; and the preview the operator confirms.

use std::collections::HashMap;

use super::lock::{Held, lock};
use super::runner::step_cx;
use crate::control::{Event, Status, StepRow};
use crate::db;
use crate::engine::{Context, Error, Outcome, StepStart, whoami};
use crate::plan::{Plan, Step};

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
            let partly = matches!(
                r.status,
                Status::Failed | Status::Interrupted | Status::Running
            ) && !step.kind.marks_itself();
            matches!(r.status, Status::Succeeded | Status::Waiting) || partly
        })
        .collect()
}

async fn step_rows(
    cx: &Context,
    c: &impl tokio_postgres::GenericClient,
    plan: &Plan,
) -> Result<HashMap<String, StepRow>, Error> {
    Ok(cx
        .control
        .steps(c, &plan.id)
        .await?
        .into_iter()
        .map(|r| (r.name.clone(), r))
        .collect())
}

/// What `rollback` would do to each step, in order, read from the control
/// table without taking the plan's lock: for the operator's confirmation.
pub async fn preview(cx: &Context, plan: &Plan) -> Result<Vec<(String, Vec<String>)>, Error> {
    let c = db::connect(&cx.target).await?;
    if !cx.control.exists(&c).await? || cx.control.plan_row(&c, &plan.id).await?.is_none() {
        return Ok(Vec::new());
    }
    let expanded = super::preflight::recorded(cx, plan, &c).await?;
    let plan = &expanded;
    let rows = step_rows(cx, &c, plan).await?;
    let mut out = Vec::new();
    for step in to_undo(plan, &rows) {
        let how = step
            .kind
            .rollback_preview(&plan.id, &step.name, step.rollback.as_ref());
        if how.is_empty() {
            continue;
        }
        let stops = step.is_irreversible();
        out.push((step.name.clone(), how));
        if stops {
            break;
        }
    }
    Ok(out)
}

/// Runs the rollbacks of done (or partly done) steps in reverse order.
pub async fn rollback(cx: &Context, plan: &Plan) -> Result<(), Error> {
    let mut held = lock(cx, &plan.id).await?;
    let result = match super::preflight::recorded(cx, plan, &held.conn).await {
        Ok(expanded) => rollback_locked(cx, &expanded, &mut held).await,
        Err(e) => Err(e),
    };
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
    if row.checksum != plan.checksum.0 {
        super::changed::check(cx, &held.conn, plan, &row.checksum).await?;
    }
    let runner = format!("{} pid {} (rollback)", whoami(), std::process::id());
    cx.control
        .set_runner(&held.conn, &plan.id, Some(&runner))
        .await?;
    let rows = step_rows(cx, &held.conn, plan).await?;
    if let Some((at, _)) = cx
        .control
        .last_event(&held.conn, &plan.id, "finalized")
        .await?
    {
        let gone: Vec<&str> = to_undo(plan, &rows)
            .into_iter()
            .filter(|s| s.finalize.is_some())
            .map(|s| s.name.as_str())
            .collect();
        if !gone.is_empty() {
            return Err(Error::Usage(format!(
                "plan `{}` was finalized at {at}: what its steps {} set aside is dropped, so rollback cannot bring it back; nothing was changed",
                plan.id,
                gone.join(", ")
            )));
        }
    }
    let started = Event::RollbackStarted { by: whoami() };
    cx.control
        .event(&held.conn, &plan.id, None, &started)
        .await?;
    let undo = to_undo(plan, &rows);
    let mut undone: Vec<String> = Vec::new();
    for (i, step) in undo.iter().enumerate() {
        cx.reporter.step_started(&StepStart {
            plan: &plan.id,
            step: &step.name,
            text: &format!("rolling back {} [{}]", step.name, step.kind.name()),
            rows_done: 0,
        });
        let previous = rows
            .get(&step.name)
            .map(|r| r.status)
            .unwrap_or(Status::Pending);
        let sx = step_cx(cx, plan, step, previous);
        let (outcome, marked) = match step.kind.rollback(&sx, step.rollback.as_ref()).await {
            Ok(done) => done,
            Err(Error::NoRollback { .. }) => {
                cx.control
                    .event(
                        &held.conn,
                        &plan.id,
                        Some(&step.name),
                        &Event::RollbackBlocked {},
                    )
                    .await?;
                return Err(Error::RollbackStopped {
                    plan: plan.id.clone(),
                    step: step.name.clone(),
                    undone,
                    kept: undo[i..].iter().map(|s| s.name.clone()).collect(),
                });
            }
            Err(e) => return Err(e),
        };
        match outcome {
            Outcome::Done if !marked => {
                let c = db::get(&cx.pool, &cx.target).await?;
                cx.control
                    .step_status(&**c, &plan.id, &step.name, Status::RolledBack, None)
                    .await?;
                sx.record(&**c, &Event::RollbackDone { attempt: None })
                    .await?;
            }
            Outcome::Done => {}
            Outcome::Cancelled | Outcome::Gate(_) => {
                return Err(Error::Cancelled {
                    step: step.name.clone(),
                });
            }
        }
        undone.push(step.name.clone());
    }
    cx.control
        .set_plan_status(&held.conn, &plan.id, Status::RolledBack)
        .await?;
    // Its dual writes are gone: rows they failed on no longer hold anything up.
    cx.control
        .resolve_trigger_failures(&held.conn, &plan.id, "the plan was rolled back")
        .await?;
    cx.control
        .event(&held.conn, &plan.id, None, &Event::RollbackFinished {})
        .await?;
    Ok(())
}
