//! `pgshift finalize`: ends a finished plan's retention window by dropping what
//! its contract phase only set aside (a retired column or table and the trigger
//! that kept it in step). After it, `rollback` can no longer undo those steps.

use std::collections::HashMap;

use super::lock::lock;
use super::runner::step_cx;
use crate::control::{Event, Status, StepRow};
use crate::engine::{Context, Error, Outcome, ddl, whoami};
use crate::plan::{Plan, Step};

/// What is set aside and waits for finalize: the succeeded steps with `finalize`.
pub fn retained<'a>(plan: &'a Plan, rows: &HashMap<String, StepRow>) -> Vec<&'a Step> {
    plan.steps
        .iter()
        .filter(|s| s.finalize.is_some())
        .filter(|s| {
            rows.get(&s.name)
                .is_some_and(|r| r.status == Status::Succeeded)
        })
        .collect()
}

/// Runs the `finalize` statements of every retained step, latest first, each in
/// a transaction of its own under the step's lock timeout; returns the steps.
pub async fn finalize(cx: &Context, plan: &Plan) -> Result<Vec<String>, Error> {
    let held = lock(cx, &plan.id).await?;
    let result = async {
        let Some(row) = cx.control.plan_row(&held.conn, &plan.id).await? else {
            return Err(Error::Usage(format!(
                "plan `{}` has never run against this database; there is nothing to finalize",
                plan.id
            )));
        };
        if row.status != Status::Succeeded {
            return Err(Error::Usage(format!(
                "plan `{}` is {}, not succeeded: finalize drops what a finished plan set aside. Finish it first (`pgshift resume {}`), or roll it back",
                plan.id, row.status, plan.id
            )));
        }
        if let Some((at, _)) = cx.control.last_event(&held.conn, &plan.id, "finalized").await? {
            return Err(Error::Usage(format!(
                "plan `{}` was already finalized at {at}; nothing to do",
                plan.id
            )));
        }
        let expanded = super::preflight::recorded(cx, plan, &held.conn).await?;
        let rows: HashMap<String, StepRow> = cx
            .control
            .steps(&held.conn, &plan.id)
            .await?
            .into_iter()
            .map(|r| (r.name.clone(), r))
            .collect();
        let steps = retained(&expanded, &rows);
        let mut done = Vec::new();
        for step in steps.into_iter().rev() {
            let body = step.finalize.as_ref().expect("filtered");
            cx.reporter
                .message(&format!("finalizing {}: dropping what it set aside", step.name));
            let sx = step_cx(cx, &expanded, step, Status::Succeeded);
            match ddl::run_transactional(&sx, &body.texts(), None).await? {
                Outcome::Done => done.push(step.name.clone()),
                _ => {
                    return Err(Error::Cancelled {
                        step: step.name.clone(),
                    });
                }
            }
        }
        let event = Event::Finalized {
            by: whoami(),
            steps: done.clone(),
        };
        cx.control.event(&held.conn, &plan.id, None, &event).await?;
        Ok(done)
    }
    .await;
    held.release(cx).await;
    result
}
