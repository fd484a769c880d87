//! The `gate` step kind: stops the plan (exit 3) with its message until an
//! operator resumes it. Which runs may pass a waiting gate is the runner's
//! decision (`resume` passes the one that waits, `demo` passes it on the
//! operator's behalf); this module records the passing.

use crate::control::Event;
use crate::engine::{Error, Outcome, StepCx};
use crate::plan::raw::Node;
use crate::plan::read::Reader;

/// The kind's key in the plan file.
pub const KEY: &str = "gate";

/// Reads the gate's message.
pub fn parse(r: &mut Reader, node: &Node) -> Option<String> {
    r.string(node, "gate message")
}

/// The message and how to continue, as `plan show` prints it.
pub fn describe(message: &str, plan_id: &str) -> String {
    format!("{message}\n(continue with: pgshift resume {plan_id})")
}

/// Stops at the gate, or passes it when `passed_by` says who passes it.
pub async fn execute(
    sx: &StepCx,
    message: &str,
    passed_by: Option<&str>,
) -> Result<Outcome, Error> {
    let Some(by) = passed_by else {
        return Ok(Outcome::Gate(message.to_string()));
    };
    let c = crate::db::get(&sx.cx.pool, &sx.cx.target)
        .await
        .map_err(|e| sx.db_error(e))?;
    let passed = Event::GatePassed {
        by: by.to_string(),
        who: crate::engine::whoami(),
    };
    sx.record(&**c, &passed).await.map_err(|e| sx.db_error(e))?;
    sx.cx
        .reporter
        .message(&format!("gate `{}` passed by {by}", sx.step));
    Ok(Outcome::Done)
}
