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
//! it in place. A batch that starts after the pause commits applies nothing.
//!
//! The parts: `batch.rs` (the one statement of a batch), `worker.rs` (a worker's
//! loop on its own connection), `coordinator.rs` (one task per step: signals,
//! totals, progress, events), `signals.rs` (what can hold a backfill),
//! `throttle.rs` (settings, limits, batch size, pacing), `ranges.rs` and `key.rs`.

pub mod batch;
mod checkpoints;
mod coordinator;
mod key;
mod narrow;
mod ranges;
mod signals;
mod spec;
pub mod throttle;
mod worker;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value as Json;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::control::{Checkpoint, Event, Overrides, Status};
use crate::db::{self, OneTrip};
use crate::engine::{Error, Fence, Outcome, StepCx};
use crate::ident::Ident;
use crate::plan::phase::Phase;
use batch::{Bound, Key};
use coordinator::{Coordinator, Gate};
pub use spec::{BackfillSet, BackfillSpec, Throttle, describe, is_slot_name, parse};
use throttle::Settings;
use worker::{End, Figures, Shared};

/// The kind's key in the plan file.
pub const KEY: &str = "backfill";

/// A backfill runs after the dual-write trigger exists and before contract.
pub const PHASES: &[Phase] = &[Phase::Backfill];

/// The exact statement of one batch, for `plan show` (control schema `pgshift`).
///
/// `key` is the key the run will use: `spec.key`, or the table's primary key.
/// Parameters: `$1` plan id, `$2` step, `$3` worker, `$4` batch size, `$5` run epoch.
pub fn batch_sql(spec: &BackfillSpec, key: &[Ident]) -> String {
    let key = Key {
        cols: key.to_vec(),
        unique: true,
    };
    batch::statement(
        spec,
        &key,
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
    let fence = match &sx.fence {
        Some(f) => f.clone(),
        // Run without the runner (tests): a run of its own, fenced like any other.
        None => Fence {
            epoch: cx
                .control
                .take_epoch(&**conn, &sx.plan)
                .await
                .map_err(fail)?,
            lost: CancellationToken::new(),
        },
    };
    let settings = Settings::new(sx, spec);
    let Some(ranges) = ranges::fix_ranges(sx, &mut conn, spec, &key, &settings, fence.epoch)
        .await
        .map_err(fail)?
    else {
        return Err(Error::LockLost {
            plan: sx.plan.clone(),
            step: sx.step.clone(),
            why: "another runner took the plan over".into(),
        });
    };
    let (rows_total, overrides): (Option<i64>, Json) = {
        let r = conn
            .row(
                &cx.control.sql(
                    "SELECT rows_total, overrides FROM __SCHEMA__.steps WHERE plan_id = $1 AND name = $2",
                ),
                &[&sx.plan, &sx.step],
            )
            .await
            .map_err(|e| fail(e.into()))?;
        (r.get(0), r.get(1))
    };
    drop(conn);
    if Overrides::from_json(&overrides).paused == Some(true) {
        cx.reporter.message(&format!(
            "step `{}` is paused by an operator's override; it starts when `pgshift throttle {} --unpause` (or --clear) lifts it",
            sx.step, sx.plan
        ));
    }

    let rows_at_start: u64 = ranges.iter().map(|r| r.rows_done).sum();
    let control = cx.control.quoted();
    let (tx, rx) = Gate::channel(settings.limits(&Overrides::default()));
    let shared = Arc::new(Shared {
        sx: sx.clone(),
        spec: spec.clone(),
        sql_first: batch::statement(spec, &key, Bound::FromStart, control),
        sql_next: batch::statement(spec, &key, Bound::AfterCheckpoint, control),
        stop: cx.cancel.child_token(),
        fence,
        workers: ranges.len() as u32,
        settings,
        rows_done: AtomicU64::new(rows_at_start),
        rows_total: rows_total.map(|n| n.max(0) as u64),
        wal: AtomicU64::new(0),
        batch_size: AtomicU32::new(0),
        figures: Mutex::new(Figures::default()),
        started: (Instant::now(), rows_at_start),
        slowed: Mutex::new(None),
        episode: Mutex::new(None),
        gate: rx,
    });
    let coordinator = Coordinator::start(shared.clone(), tx).await;
    let sampling = CancellationToken::new();
    let coordinating = tokio::spawn(coordinator.run(sampling.clone()));
    let result = run_workers(&shared, ranges).await;
    sampling.cancel();
    let _ = coordinating.await;
    cx.reporter.backfill_done(&sx.step);
    match result? {
        false => Ok(Outcome::Cancelled),
        true => {
            verify(&shared).await?;
            Ok(Outcome::Done)
        }
    }
}

/// Runs one worker per range; true when every range is done.
async fn run_workers(shared: &Arc<Shared>, ranges: Vec<ranges::Range>) -> Result<bool, Error> {
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
                step: shared.sx.step.clone(),
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
    match first_error {
        Some(e) => Err(e),
        None => Ok(all_done),
    }
}

/// A backfill that failed after its last batch (its verify found missed rows) would,
/// on resume, only verify again. Start a fresh pass instead: batches are idempotent,
/// so rows already right are skipped, and the rows the fix now reaches get filled.
async fn restart_finished_pass(sx: &StepCx, c: &impl GenericClient) -> Result<(), db::Error> {
    let ctl = &sx.cx.control;
    let all_done: Option<bool> = c
        .row(
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

/// After the last batch: the plan's `verify` query, or the rows of the range
/// that still match `where`, must count zero.
async fn verify(sh: &Shared) -> Result<(), Error> {
    let sx = &sh.sx;
    let fail = |e: db::Error| sx.db_error(e);
    let mut conn = db::get(&sx.cx.pool, &sx.cx.target).await.map_err(fail)?;
    let ctl = &sx.cx.control;
    let cp: Option<Json> = conn
        .row(
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
            finish(sh, &**conn, None, None).await;
            return Ok(());
        }
    };
    let started = Instant::now();
    let client: &mut tokio_postgres::Client = &mut conn;
    let tx = client.transaction().await.map_err(|e| fail(e.into()))?;
    db::set_local_timeouts(&tx, sx.lock_timeout, sx.statement_timeout)
        .await
        .map_err(fail)?;
    // The scan sets hint bits on every page the batches wrote, and so writes them
    // out again: the same writeback as the workers' (`worker::WRITEBACK_AFTER`),
    // for this transaction only.
    tx.batch_execute(&format!(
        "SET LOCAL backend_flush_after = '{}'",
        worker::WRITEBACK_AFTER
    ))
    .await
    .map_err(|e| fail(e.into()))?;
    let row = if sh.spec.verify.is_some() {
        tx.row(&sql, &[]).await
    } else {
        tx.row(&sql, &[&upper]).await
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
    finish(sh, &**conn, Some(missed), Some(started)).await;
    Ok(())
}

async fn finish(
    sh: &Shared,
    c: &impl GenericClient,
    verified: Option<i64>,
    verify_started: Option<Instant>,
) {
    let totals = c
        .row(
            &sh.sx.cx.control.sql(
                "SELECT coalesce(sum(rows_done), 0)::int8 FROM __SCHEMA__.backfill_ranges WHERE plan_id = $1 AND step = $2",
            ),
            &[&sh.sx.plan, &sh.name()],
        )
        .await;
    let done = match totals {
        Ok(r) => r.get::<_, i64>(0).max(0) as u64,
        Err(_) => sh.rows_done.load(Ordering::Relaxed),
    };
    let finished = Event::BackfillFinished {
        rows_done: done,
        verified_missed: verified,
        verify_ms: verify_started.map(|t| t.elapsed().as_millis() as u64),
    };
    sh.event(c, &finished).await;
}
