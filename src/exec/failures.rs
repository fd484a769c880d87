//! The rows whose dual write failed, before the plan goes past them: a gate may
//! not be passed, and the contract phase not entered, while such a row is left
//! unfixed. Each recorded row is checked again first (its trigger's expressions
//! evaluated over the row as it is now): a row the operator fixed, or deleted,
//! is marked resolved; the rest stop the run (exit 1) with their keys and what
//! to do.

use crate::control::{Event, TriggerFailure};
use crate::db::{self, OneTrip};
use crate::engine::{Context, Error, Unfixed};
use crate::ident::Ident;
use crate::kind::StepKind;
use crate::kind::trigger::{TriggerSpec, recheck_query};
use crate::plan::{Plan, Step};

/// Rows named in the message; `status` lists them all.
const SHOWN: usize = 5;
/// Rows checked again per run; more stay open until the next run checks them.
const RECHECK_LIMIT: usize = 1000;

/// How checking a recorded row again came out.
enum Recheck {
    /// Fixed (or gone): why, as recorded in `resolution`.
    Fixed(String),
    /// The expression still raises: SQLSTATE and message.
    Failing(String, String),
    /// pgshift cannot evaluate it again by itself.
    Unchecked,
}

/// Refuses to go on to `step` (`at` says how: "pass gate `x`", "enter its
/// contract phase") while rows whose dual write failed are not fixed.
pub async fn guard(cx: &Context, plan: &Plan, step: &Step, at: &str) -> Result<(), Error> {
    let c = db::get(&cx.pool, &cx.target).await?;
    let open = cx.control.trigger_failures(&**c, &plan.id, true).await?;
    if open.is_empty() {
        return Ok(());
    }
    let mut left = Vec::new();
    let mut unchecked = 0;
    let mut fixed = 0;
    for (i, f) in open.into_iter().enumerate() {
        let outcome = if i < RECHECK_LIMIT {
            recheck(cx, plan, step, &f).await?
        } else {
            Recheck::Unchecked
        };
        match outcome {
            Recheck::Fixed(how) => {
                cx.control.resolve_trigger_failure(&**c, f.id, &how).await?;
                fixed += 1;
            }
            Recheck::Failing(state, error) => {
                cx.control
                    .refresh_trigger_failure(&**c, f.id, &state, &error)
                    .await?;
                left.push(TriggerFailure {
                    sqlstate: state,
                    error,
                    ..f
                });
            }
            Recheck::Unchecked => {
                unchecked += 1;
                left.push(f);
            }
        }
    }
    let event = Event::TriggerFailuresChecked {
        fixed,
        open: left.len(),
        unchecked,
    };
    cx.control
        .event(&**c, &plan.id, Some(&step.name), &event)
        .await?;
    if left.is_empty() {
        cx.reporter.message(&format!(
            "{fixed} row(s) whose dual write had failed are fixed now; plan `{}` goes on",
            plan.id
        ));
        return Ok(());
    }
    Err(Error::TriggerFailures {
        step: step.name.clone(),
        unfixed: Box::new(Unfixed {
            plan: plan.id.clone(),
            at: at.to_string(),
            total: left.len(),
            rows: left
                .iter()
                .take(SHOWN)
                .map(TriggerFailure::describe)
                .collect(),
            unchecked,
            control: cx.control.quoted().to_string(),
        }),
    })
}

/// Says, when a gate stops the plan, that rows need fixing before it can pass.
pub async fn note_at_gate(cx: &Context, plan: &Plan, gate: &str) {
    let Ok(c) = db::get(&cx.pool, &cx.target).await else {
        return;
    };
    let Ok(open) = cx.control.trigger_failures(&**c, &plan.id, true).await else {
        return;
    };
    if let Some(first) = open.first() {
        cx.reporter.message(&format!(
            "{} row(s) failed the dual-write trigger ({}{}); gate `{gate}` will not pass until they are fixed: `pgshift status {}` lists them",
            open.len(),
            first.describe(),
            if open.len() > 1 { ", …" } else { "" },
            plan.id
        ));
    }
}

/// The trigger step of `plan` whose generated trigger reported `f`.
fn trigger_of<'a>(plan: &'a Plan, f: &TriggerFailure) -> Option<&'a TriggerSpec> {
    plan.steps.iter().find_map(|s| match &s.kind {
        StepKind::Trigger(t) if s.name == f.step => Some(t),
        StepKind::DropTrigger(d) if d.step == f.step => Some(&d.trigger),
        _ => None,
    })
}

/// Evaluates the trigger's expressions over the recorded row as it is now.
async fn recheck(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    f: &TriggerFailure,
) -> Result<Recheck, Error> {
    let Some(spec) = trigger_of(plan, f) else {
        return Ok(Recheck::Unchecked);
    };
    let key: Vec<Ident> = match &f.key {
        Some(serde_json::Value::Object(m)) => m.keys().map(|k| Ident(k.clone())).collect(),
        _ => Vec::new(),
    };
    let Some(query) = recheck_query(spec, &key) else {
        return Ok(Recheck::Unchecked);
    };
    let mut c = db::get(&cx.pool, &cx.target).await?;
    let client: &mut tokio_postgres::Client = &mut c;
    let tx = client.transaction().await.map_err(db::Error::from)?;
    db::set_local_timeouts(&tx, step.lock_timeout, step.statement_timeout).await?;
    tx.batch_execute("SET TRANSACTION READ ONLY")
        .await
        .map_err(db::Error::from)?;
    let result = tx.row_opt(query.as_str(), &[&f.key]).await;
    let _ = tx.rollback().await;
    match result {
        Ok(None) => Ok(Recheck::Fixed("the row is gone".into())),
        Ok(Some(_)) => Ok(Recheck::Fixed(
            "the trigger's expression succeeds for the row now".into(),
        )),
        Err(e) => {
            let e = db::Error::from(e);
            if e.is_connection_lost() {
                return Err(Error::Db(e));
            }
            match e.sqlstate() {
                // The table (or a column) is gone: nothing is left to fix in it.
                Some("42P01") => Ok(Recheck::Fixed("the table is gone".into())),
                Some(state) => Ok(Recheck::Failing(state.to_string(), message(&e))),
                None => Ok(Recheck::Unchecked),
            }
        }
    }
}

/// The server's message without the SQLSTATE suffix that `db::describe` adds.
fn message(e: &db::Error) -> String {
    match e {
        db::Error::Postgres(p) => p
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string()),
        _ => e.to_string(),
    }
}
