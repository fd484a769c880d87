//! The `check` step kind: a read-only query that must return true, once, or
//! polled until true for at most `wait`.

use std::time::Duration;

use crate::db::{self, OneTrip};
use crate::engine::{Error, Outcome, StepCx};
use crate::plan::defaults;
use crate::plan::raw::{Node, Value};
use crate::plan::read::Reader;

/// The kind's key in the plan file.
pub const KEY: &str = "check";

/// A query that must return true.
#[derive(Debug, Clone)]
pub struct CheckSpec {
    pub query: String,
    /// Poll until true for at most this long; `None` checks once.
    pub wait: Option<Duration>,
    pub interval: Duration,
}

/// Reads `check: QUERY` or `check: { query, wait, interval }`.
pub fn parse(r: &mut Reader, node: &Node, timeout: Option<Duration>) -> Option<CheckSpec> {
    match &node.value {
        Value::Map(_) => {
            let mut spec = CheckSpec {
                query: String::new(),
                wait: timeout,
                interval: defaults::CHECK_INTERVAL,
            };
            let mut ok = true;
            for (key, _, val) in r.entries(node, "check", &["query", "wait", "interval"]) {
                match key.as_str() {
                    "query" => match r.query(val, "check query") {
                        Some(q) => spec.query = q,
                        None => ok = false,
                    },
                    "wait" => spec.wait = r.duration(val, "wait"),
                    "interval" => match r.duration(val, "interval") {
                        Some(d) if !d.is_zero() => spec.interval = d,
                        Some(_) => {
                            r.error(val.pos, "range", "interval must be longer than 0", None)
                        }
                        None => ok = false,
                    },
                    _ => {}
                }
            }
            if spec.query.is_empty() && ok {
                r.error(
                    node.pos,
                    "missing",
                    "check has no `query`",
                    Some(
                        "write `check: SELECT …` or `check: { query: SELECT …, wait: 10m }`".into(),
                    ),
                );
                return None;
            }
            ok.then_some(spec)
        }
        _ => Some(CheckSpec {
            query: r.query(node, "check query")?,
            wait: timeout,
            interval: defaults::CHECK_INTERVAL,
        }),
    }
}

/// The query and what it must return, as `plan show` prints it.
pub fn describe(c: &CheckSpec) -> String {
    match c.wait {
        Some(w) => format!(
            "{}\n(must return true; polled every {} for up to {})",
            c.query,
            crate::duration::format(c.interval),
            crate::duration::format(w)
        ),
        None => format!("{}\n(must return true)", c.query),
    }
}

/// Runs the check (polling with `wait`): done when it returns true.
pub async fn execute(sx: &StepCx, check: &CheckSpec) -> Result<Outcome, Error> {
    let cx = &sx.cx;
    let deadline = check.wait.map(|w| tokio::time::Instant::now() + w);
    let mut polls = 0u32;
    loop {
        polls += 1;
        let value = match evaluate(sx, check).await {
            Ok(Ok(v)) => v,
            Ok(Err(shape)) => {
                return Err(Error::CheckShape {
                    plan: sx.plan.clone(),
                    step: sx.step.clone(),
                    query: check.query.clone(),
                    shape,
                });
            }
            // A lock it could not get in time: not true yet.
            Err(e) if e.is_retryable() => Some(false),
            Err(e) => return Err(sx.db_error(e)),
        };
        if value == Some(true) {
            return Ok(Outcome::Done);
        }
        match deadline {
            Some(d) if tokio::time::Instant::now() + check.interval <= d => {
                if polls == 1 {
                    cx.reporter.message(&format!(
                        "check `{}` is not true yet; polling every {} for up to {}",
                        sx.step,
                        crate::duration::format(check.interval),
                        crate::duration::format(check.wait.unwrap_or_default())
                    ));
                }
                tokio::select! {
                    _ = cx.cancel.cancelled() => return Ok(Outcome::Cancelled),
                    _ = tokio::time::sleep(check.interval) => {}
                }
            }
            _ => {
                return Err(Error::CheckFalse {
                    plan: sx.plan.clone(),
                    step: sx.step.clone(),
                    query: check.query.clone(),
                    got: if value == Some(false) {
                        "false"
                    } else {
                        "NULL"
                    },
                    polls,
                    waited: check.wait,
                });
            }
        }
    }
}

/// Runs the query once in a read-only transaction under the step's timeouts.
async fn evaluate(
    sx: &StepCx,
    check: &CheckSpec,
) -> Result<Result<Option<bool>, String>, db::Error> {
    let mut c = db::get(&sx.cx.pool, &sx.cx.target).await?;
    let raw: &mut tokio_postgres::Client = &mut c;
    let tx = raw.transaction().await?;
    db::set_local_timeouts(&tx, sx.lock_timeout, sx.statement_timeout).await?;
    tx.exec("SET TRANSACTION READ ONLY", &[]).await?;
    let rows = tx.rows(check.query.as_str(), &[]).await?;
    tx.commit().await?;
    Ok(check_value(&rows))
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
