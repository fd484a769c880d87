//! The `backfill` step: a keyset-batched, checkpointed UPDATE over a key range
//! fixed when the step starts, run by one or more workers, throttled, and
//! verified at the end.
//!
//! Lifecycle of a step:
//! 1. The key is resolved (the plan's `key`, else the primary key) and must lead a
//!    valid btree index: a batch walks that index, never the heap.
//! 2. First run only: the largest key becomes the upper bound, the range is split
//!    into one contiguous sub-range per worker, and the `backfill_ranges` rows are
//!    written, all in one transaction before the first batch. Rows inserted later
//!    lie beyond the bound: they are the dual-write trigger's job, so a backfill
//!    under heavy inserts still finishes.
//! 3. Each worker runs batches (see `batch.rs`): each batch and its checkpoint
//!    commit together, so a crash at any instant loses nothing and repeats nothing.
//! 4. After the last batch, `verify` (or the count of rows in the range that still
//!    match `where`) must be zero.
//!
//! Pausing: the live override `paused: true` holds the workers between batches
//! (reported as "paused by operator") until it is lifted or the run is
//! cancelled; the step does not end, so `pgshift throttle --unpause` continues
//! it in place.

pub mod batch;
mod key;
mod narrow;
mod ranges;
mod spec;
pub mod throttle;
mod worker;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value as Json;
use tokio_postgres::GenericClient;

use crate::control::{Checkpoint, Event, Status};
use crate::db;
use crate::engine::{Error, Outcome, StepCx};
use crate::ident::Ident;
use crate::plan::phase::Phase;
use batch::Bound;
use ranges::Settings;
pub use spec::{BackfillSet, BackfillSpec, Throttle, describe, parse};
use throttle::Signal;
use worker::{End, Shared};

/// The kind's key in the plan file.
pub const KEY: &str = "backfill";

/// A backfill runs after the dual-write trigger exists and before contract.
pub const PHASES: &[Phase] = &[Phase::Backfill];

/// The exact statement of one batch, for `plan show` (control schema `pgshift`).
///
/// `key` is the key the run will use: `spec.key`, or the table's primary key.
/// Parameters: `$1` plan id, `$2` step, `$3` worker, `$4` batch size.
pub fn batch_sql(spec: &BackfillSpec, key: &[Ident]) -> String {
    batch::statement(
        spec,
        key,
        Bound::AfterCheckpoint,
        &crate::ident::quote_ident("pgshift"),
    )
}

/// Runs (or continues) a backfill step until its range is done and verified,
/// or it is cancelled.
pub async fn run(sx: &StepCx, spec: &BackfillSpec) -> Result<Outcome, Error> {
    let cx = &sx.cx;
    let fail = |e: db::Error| sx.db_error(e);
    let mut conn = db::get(&cx.pool, &cx.target).await.map_err(fail)?;
    if sx.previous == Status::Failed {
        restart_finished_pass(sx, &**conn).await.map_err(fail)?;
    }
    let key = key::resolve_key(&**conn, spec)
        .await
        .map_err(|e| e.into_error(sx))?;
    let settings = Settings::new(sx, spec);
    let ranges = ranges::fix_ranges(sx, &mut conn, spec, &key, &settings)
        .await
        .map_err(fail)?;
    let rows_total: Option<i64> = conn
        .query_one(
            &cx.control
                .sql("SELECT rows_total FROM __SCHEMA__.steps WHERE plan_id = $1 AND name = $2"),
            &[&sx.plan, &sx.step],
        )
        .await
        .map_err(|e| fail(e.into()))?
        .get(0);
    drop(conn);

    let rows_at_start: u64 = ranges.iter().map(|r| r.rows_done).sum();
    let control = cx.control.quoted();
    let shared = Arc::new(Shared {
        sx: sx.clone(),
        spec: spec.clone(),
        sql_first: batch::statement(spec, &key, Bound::FromStart, control),
        sql_next: batch::statement(spec, &key, Bound::AfterCheckpoint, control),
        stop: cx.cancel.child_token(),
        workers: ranges.len() as u32,
        rows_done: AtomicU64::new(rows_at_start),
        rows_at_start,
        rows_total: rows_total.map(|n| n.max(0) as u64),
        started: Instant::now(),
        settings,
        live: Mutex::new(None),
        signals: signals(spec),
    });

    let mut tasks = tokio::task::JoinSet::new();
    for range in ranges {
        let sh = shared.clone();
        tasks.spawn(async move { worker::work(sh, range).await });
    }
    let mut first_error = None;
    let mut all_done = true;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.unwrap_or_else(|e| {
            Err(Error::Internal {
                step: sx.step.clone(),
                message: format!("a backfill worker stopped unexpectedly: {e}"),
            })
        });
        match result {
            Ok(End::Done) => {}
            Ok(End::Stopped) => all_done = false,
            Err(e) => {
                all_done = false;
                // The first hard error stops every other worker after its current batch.
                shared.stop.cancel();
                first_error.get_or_insert(e);
            }
        }
    }
    cx.reporter.backfill_done(&sx.step);
    if let Some(e) = first_error {
        return Err(e);
    }
    if !all_done {
        return Ok(Outcome::Cancelled);
    }
    verify(&shared).await?;
    Ok(Outcome::Done)
}

/// A backfill that failed after its last batch (its verify found missed rows) would,
/// on resume, only verify again. Start a fresh pass instead: batches are idempotent,
/// so rows already right are skipped, and the rows the fix now reaches get filled.
async fn restart_finished_pass(sx: &StepCx, c: &impl GenericClient) -> Result<(), db::Error> {
    let ctl = &sx.cx.control;
    let all_done: Option<bool> = c
        .query_one(
            &ctl.sql("SELECT bool_and(done) FROM __SCHEMA__.backfill_ranges WHERE plan_id = $1 AND step = $2"),
            &[&sx.plan, &sx.step],
        )
        .await?
        .get(0);
    if all_done == Some(true) {
        ctl.reset_backfill_ranges(c, &sx.plan, &sx.step).await?;
        let restarted = Event::BackfillPassRestarted {
            why: "the previous pass finished its range but failed verification".into(),
        };
        sx.record(c, &restarted).await?;
        sx.cx.reporter.message(&format!("`{}` finished its range last time but failed verification; starting a fresh pass (rows already right are skipped)", sx.step));
    }
    Ok(())
}

/// Undoes the step for `rollback`: forgets its ranges and checkpoint, so that it
/// starts afresh if the plan runs again (the data goes with its columns).
pub async fn reset(sx: &StepCx) -> Result<(), Error> {
    let c = db::get(&sx.cx.pool, &sx.cx.target)
        .await
        .map_err(|e| sx.db_error(e))?;
    sx.cx
        .control
        .reset_backfill_ranges(&**c, &sx.plan, &sx.step)
        .await
        .map_err(|e| sx.db_error(e))
}

/// The signals that can hold the backfill, from the plan.
fn signals(spec: &BackfillSpec) -> Vec<Signal> {
    let mut s = Vec::new();
    if let Some(lag) = spec.throttle.max_replica_lag {
        s.push(Signal::ReplicaLag(lag));
    }
    if let Some(q) = &spec.throttle.throttle_query {
        s.push(Signal::Query(q.clone()));
    }
    s
}

/// After the last batch: the plan's `verify` query, or the rows of the range
/// that still match `where`, must count zero.
async fn verify(sh: &Shared) -> Result<(), Error> {
    let sx = &sh.sx;
    let fail = |e: db::Error| sx.db_error(e);
    let mut conn = db::get(&sx.cx.pool, &sx.cx.target).await.map_err(fail)?;
    let ctl = &sx.cx.control;
    let cp: Option<Json> = conn
        .query_one(
            &ctl.sql("SELECT checkpoint FROM __SCHEMA__.steps WHERE plan_id = $1 AND name = $2"),
            &[&sx.plan, &sx.step],
        )
        .await
        .map_err(|e| fail(e.into()))?
        .get(0);
    let cp = cp
        .as_ref()
        .and_then(Checkpoint::from_json)
        .unwrap_or_default();
    let upper = cp.upper_key.filter(|v| !v.is_null());
    let key: Vec<Ident> = cp.key.into_iter().map(Ident).collect();
    let table = sh.spec.table.quoted();
    let (sql, what) = match (&sh.spec.verify, &sh.spec.where_, &upper) {
        (Some(q), _, _) => (
            format!("SELECT ({q})::bigint"),
            "the `verify` query counts".to_string(),
        ),
        (None, Some(w), Some(_)) if !key.is_empty() => {
            let cols = key
                .iter()
                .map(|k| k.quoted())
                .collect::<Vec<_>>()
                .join(", ");
            let decoded = key
                .iter()
                .map(|k| format!("pgshift_k.{}", k.quoted()))
                .collect::<Vec<_>>()
                .join(", ");
            (
                // `IS NOT TRUE` also counts rows whose key is NULL: no batch ever visits them.
                format!(
                    "SELECT count(*) FROM {table} WHERE (({cols}) > (SELECT {decoded} FROM jsonb_populate_record(NULL::{table}, $1::jsonb) AS pgshift_k)) IS NOT TRUE AND ({w})"
                ),
                format!(
                    "rows of {} within the backfilled key range still match `where` ({w})",
                    sh.spec.table
                ),
            )
        }
        _ => {
            finish(sh, &**conn, None).await;
            return Ok(());
        }
    };
    let client: &mut tokio_postgres::Client = &mut conn;
    let tx = client.transaction().await.map_err(|e| fail(e.into()))?;
    db::set_local_timeouts(&tx, sx.lock_timeout, sx.statement_timeout)
        .await
        .map_err(fail)?;
    let row = if sh.spec.verify.is_some() {
        tx.query_one(&sql, &[]).await
    } else {
        tx.query_one(&sql, &[&upper]).await
    };
    let missed: Option<i64> = row.map_err(|e| fail(e.into()))?.get(0);
    tx.commit().await.map_err(|e| fail(e.into()))?;
    let missed = missed.unwrap_or(0);
    if missed != 0 {
        sh.event(&**conn, &Event::VerifyFailed { missed }).await;
        return Err(Error::VerifyFailed {
            step: sx.step.clone(),
            missed,
            what,
        });
    }
    finish(sh, &**conn, Some(missed)).await;
    Ok(())
}

async fn finish(sh: &Shared, c: &impl GenericClient, verified: Option<i64>) {
    let finished = Event::BackfillFinished {
        rows_done: sh.rows_done.load(Ordering::Relaxed),
        verified_missed: verified,
    };
    sh.event(c, &finished).await;
}
