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
mod ranges;
pub mod throttle;
mod worker;

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio_postgres::GenericClient;

use crate::control::{Checkpoint, Event, Status};
use crate::db;
use crate::engine::{Error, Outcome, StepCx};
use crate::ident::{Ident, QualifiedName};
use crate::plan::defaults;
use crate::plan::phase::Phase;
use crate::plan::raw::{Node, Value};
use crate::plan::read::Reader;
use crate::plan::sql;
use batch::Bound;
use ranges::Settings;
use throttle::Signal;
use worker::{End, Shared};

/// The kind's key in the plan file.
pub const KEY: &str = "backfill";

/// A backfill runs after the dual-write trigger exists and before contract.
pub const PHASES: &[Phase] = &[Phase::Backfill];

/// The SET part of a backfill.
#[derive(Debug, Clone)]
pub enum BackfillSet {
    /// Column ← expression, one per column: lets pgshift skip rows already equal.
    Columns(Vec<(Ident, String)>),
    /// A raw SET clause, used as written.
    Clause(String),
}

/// A batched, checkpointed UPDATE over a key range.
#[derive(Debug, Clone)]
pub struct BackfillSpec {
    pub table: QualifiedName,
    /// The key columns; `None` means the primary key, read from the catalog.
    pub key: Option<Vec<Ident>>,
    pub set: BackfillSet,
    /// Rows that still need work.
    pub where_: Option<String>,
    pub batch_size: u32,
    pub workers: u32,
    /// A query returning the number of rows missed (must be 0 after the last batch).
    pub verify: Option<String>,
    pub throttle: Throttle,
}

/// How a backfill slows itself down.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttle {
    pub sleep: Duration,
    pub max_rows_per_sec: Option<u32>,
    pub target_batch_time: Option<Duration>,
    pub min_batch_size: u32,
    pub max_batch_size: u32,
    pub max_replica_lag: Option<Duration>,
    pub throttle_query: Option<String>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            sleep: defaults::SLEEP,
            max_rows_per_sec: None,
            target_batch_time: None,
            min_batch_size: defaults::MIN_BATCH_SIZE,
            max_batch_size: defaults::MAX_BATCH_SIZE,
            max_replica_lag: None,
            throttle_query: None,
        }
    }
}

/// Reads `backfill: { table, key, set, where, batch_size, workers, verify, throttle }`.
pub fn parse(r: &mut Reader, node: &Node) -> Option<BackfillSpec> {
    let mut table = None;
    let mut key = None;
    let mut set = None;
    let mut where_ = None;
    let mut batch_size = None;
    let mut workers = defaults::WORKERS;
    let mut verify = None;
    let mut throttle = Throttle::default();
    let mut explicit_min = None;
    let mut explicit_max = None;
    let errors_before = r.error_count();
    let mut saw_set = false;
    for (k, kn, val) in r.entries(
        node,
        "backfill",
        &[
            "table",
            "key",
            "set",
            "where",
            "batch_size",
            "workers",
            "verify",
            "throttle",
        ],
    ) {
        let _ = kn;
        match k.as_str() {
            "table" => table = r.table(val, "backfill table"),
            "key" => {
                key = match &val.value {
                    Value::Seq(items) if !items.is_empty() => items
                        .iter()
                        .map(|i| r.column(i, "key column"))
                        .collect::<Option<Vec<_>>>(),
                    Value::Seq(_) => {
                        r.error(
                            val.pos,
                            "empty",
                            "key is an empty list",
                            Some("leave `key` out to use the primary key".into()),
                        );
                        None
                    }
                    _ => r.column(val, "key column").map(|c| vec![c]),
                }
            }
            "set" => {
                saw_set = true;
                set = match &val.value {
                    Value::Str(_) => {
                        let clause = r.string(val, "backfill `set`");
                        if let Some(c) = &clause
                            && let Err(e) = sql::check_single_query(&format!("UPDATE t SET {c}"))
                        {
                            r.error(
                                val.pos,
                                "sql-syntax",
                                format!("backfill `set` clause does not parse: {e}"),
                                None,
                            );
                        }
                        clause.map(BackfillSet::Clause)
                    }
                    _ => r
                        .assignments(val, "backfill `set`")
                        .map(BackfillSet::Columns),
                }
            }
            "where" => where_ = r.expression(val, "backfill `where`"),
            "batch_size" => {
                batch_size = r
                    .integer(val, "batch_size", 1, defaults::BATCH_SIZE_LIMIT as i64)
                    .map(|n| n as u32)
            }
            "workers" => {
                workers = r
                    .integer(val, "workers", 1, defaults::WORKERS_LIMIT as i64)
                    .map(|n| n as u32)
                    .unwrap_or(1)
            }
            "verify" => verify = r.query(val, "backfill `verify`"),
            "throttle" => {
                for (k, _, val) in r.entries(
                    val,
                    "throttle",
                    &[
                        "sleep",
                        "max_rows_per_sec",
                        "target_batch_time",
                        "min_batch_size",
                        "max_batch_size",
                        "max_replica_lag",
                        "throttle_query",
                    ],
                ) {
                    match k.as_str() {
                        "sleep" => throttle.sleep = r.duration(val, "sleep").unwrap_or_default(),
                        "max_rows_per_sec" => {
                            throttle.max_rows_per_sec = r
                                .integer(val, "max_rows_per_sec", 1, 100_000_000)
                                .map(|n| n as u32)
                        }
                        "target_batch_time" => {
                            throttle.target_batch_time = r.duration(val, "target_batch_time");
                            if throttle
                                .target_batch_time
                                .is_some_and(|d| d < Duration::from_millis(10))
                            {
                                r.error(
                                    val.pos,
                                    "range",
                                    "target_batch_time must be at least 10ms",
                                    None,
                                );
                            }
                        }
                        "min_batch_size" => {
                            explicit_min = r
                                .integer(
                                    val,
                                    "min_batch_size",
                                    1,
                                    defaults::BATCH_SIZE_LIMIT as i64,
                                )
                                .map(|n| n as u32)
                        }
                        "max_batch_size" => {
                            explicit_max = r
                                .integer(
                                    val,
                                    "max_batch_size",
                                    1,
                                    defaults::BATCH_SIZE_LIMIT as i64,
                                )
                                .map(|n| n as u32)
                        }
                        "max_replica_lag" => {
                            throttle.max_replica_lag = r.duration(val, "max_replica_lag")
                        }
                        "throttle_query" => {
                            throttle.throttle_query = r.query(val, "throttle_query")
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if !matches!(node.value, Value::Map(_)) {
        return None;
    }
    if table.is_none() && r.error_count() == errors_before {
        r.error(
            node.pos,
            "missing",
            "backfill has no `table`",
            Some("name the table to update: `table: leads`".into()),
        );
    }
    if !saw_set {
        r.error(
            node.pos,
            "missing",
            "backfill has no `set`",
            Some("give the columns to fill: `set: { email_hash: \"md5(email)\" }`".into()),
        );
    }
    let batch_size = batch_size.unwrap_or(defaults::BATCH_SIZE);
    throttle.min_batch_size = explicit_min.unwrap_or(defaults::MIN_BATCH_SIZE.min(batch_size));
    throttle.max_batch_size = explicit_max.unwrap_or(defaults::MAX_BATCH_SIZE.max(batch_size));
    if throttle.min_batch_size > throttle.max_batch_size
        || batch_size < throttle.min_batch_size
        || batch_size > throttle.max_batch_size
    {
        r.error(
            node.pos,
            "range",
            format!(
                "batch_size {batch_size} must lie within min_batch_size {} and max_batch_size {}",
                throttle.min_batch_size, throttle.max_batch_size
            ),
            None,
        );
    }
    if r.error_count() > errors_before {
        return None;
    }
    Some(BackfillSpec {
        table: table?,
        key,
        set: set?,
        where_,
        batch_size,
        workers,
        verify,
        throttle,
    })
}

/// The backfill in words and its batch statement, as `plan show` prints it.
pub fn describe(b: &BackfillSpec) -> String {
    let mut s = format!(
        "backfill {} in batches of {} ({} worker(s))\n",
        b.table, b.batch_size, b.workers
    );
    match &b.set {
        BackfillSet::Columns(cols) => {
            for (c, e) in cols {
                let _ = writeln!(s, "  set {c} = {e}");
            }
        }
        BackfillSet::Clause(c) => {
            let _ = writeln!(s, "  set {c}");
        }
    }
    if let Some(w) = &b.where_ {
        let _ = writeln!(s, "  where {w}");
    }
    let t = &b.throttle;
    let _ = writeln!(
        s,
        "  throttle: sleep {}, batch size {}..{}{}{}{}{}",
        crate::duration::format(t.sleep),
        t.min_batch_size,
        t.max_batch_size,
        t.target_batch_time
            .map(|d| format!(", target batch time {}", crate::duration::format(d)))
            .unwrap_or_default(),
        t.max_rows_per_sec
            .map(|r| format!(", at most {r} rows/s"))
            .unwrap_or_default(),
        t.max_replica_lag
            .map(|d| format!(", pause while replica lag > {}", crate::duration::format(d)))
            .unwrap_or_default(),
        t.throttle_query
            .as_ref()
            .map(|q| format!(", pause while `{q}`"))
            .unwrap_or_default(),
    );
    let (key, note) = match &b.key {
        Some(k) => (k.clone(), String::new()),
        None => (
            vec![crate::ident::Ident("id".into())],
            " (the key is the primary key, read from the catalog when the step starts; shown here as \"id\")".to_string(),
        ),
    };
    let _ = writeln!(
        s,
        "each batch, in one transaction with its checkpoint{note}:"
    );
    s.push_str(&batch_sql(b, &key));
    s
}

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
