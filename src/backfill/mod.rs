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
pub mod throttle;

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::control::Control;
use crate::db;
use crate::exec::{self, BackfillProgress, Context, Outcome};
use crate::ident::{Ident, quote_ident};
use crate::plan::{BackfillSpec, Plan, Step};
use batch::Bound;
use throttle::{ReadError, Signal, Sizer};

/// The exact statement of one batch, for `plan show` (control schema `pgshift`).
///
/// `key` is the key the run will use: `spec.key`, or the table's primary key.
/// Parameters: `$1` plan id, `$2` step, `$3` worker, `$4` batch size.
pub fn batch_sql(spec: &BackfillSpec, key: &[Ident]) -> String {
    Control::new("pgshift").sql(&batch::statement(spec, key, Bound::AfterCheckpoint))
}

/// Runs (or continues) a backfill step until its range is done and verified,
/// or it is cancelled.
pub async fn run(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    spec: &BackfillSpec,
) -> Result<Outcome, exec::Error> {
    let fail = |e: db::Error| db_error(&step.name, e);
    let mut conn = db::get(&cx.pool, &cx.target).await.map_err(fail)?;
    let key = resolve_key(&**conn, spec)
        .await
        .map_err(|e| e.into_exec(&step.name))?;
    let settings = Settings::new(cx, step, spec);
    let ranges = fix_ranges(cx, &mut conn, plan, step, spec, &key, &settings)
        .await
        .map_err(fail)?;
    let rows_total: Option<i64> = conn
        .query_one(
            &cx.control
                .sql("SELECT rows_total FROM __SCHEMA__.steps WHERE plan_id = $1 AND name = $2"),
            &[&plan.id, &step.name],
        )
        .await
        .map_err(|e| fail(e.into()))?
        .get(0);
    drop(conn);

    let rows_at_start: u64 = ranges.iter().map(|r| r.rows_done).sum();
    let shared = Arc::new(Shared {
        cx: cx.clone(),
        plan: plan.id.clone(),
        step: step.clone(),
        spec: spec.clone(),
        sql_first: cx
            .control
            .sql(&batch::statement(spec, &key, Bound::FromStart)),
        sql_next: cx
            .control
            .sql(&batch::statement(spec, &key, Bound::AfterCheckpoint)),
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
        tasks.spawn(async move { work(sh, range).await });
    }
    let mut first_error = None;
    let mut all_done = true;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.unwrap_or_else(|e| {
            Err(exec::Error::Failed {
                step: step.name.clone(),
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
    cx.reporter.backfill_done(&step.name);
    if let Some(e) = first_error {
        return Err(e);
    }
    if !all_done {
        return Ok(Outcome::Cancelled);
    }
    verify(&shared).await?;
    Ok(Outcome::Done)
}

/// A database error as the step's error: a lost connection is resumable.
fn db_error(step: &str, e: db::Error) -> exec::Error {
    if e.is_connection_lost() {
        exec::Error::ConnectionLost {
            step: step.to_string(),
            source: e,
        }
    } else {
        exec::Error::Step {
            step: step.to_string(),
            source: e,
        }
    }
}

/// Why the key cannot be used.
enum KeyError {
    Db(db::Error),
    Unusable(String),
}

impl From<tokio_postgres::Error> for KeyError {
    fn from(e: tokio_postgres::Error) -> Self {
        KeyError::Db(e.into())
    }
}

impl KeyError {
    fn into_exec(self, step: &str) -> exec::Error {
        match self {
            KeyError::Db(e) => db_error(step, e),
            KeyError::Unusable(message) => exec::Error::Failed {
                step: step.to_string(),
                message,
            },
        }
    }
}

/// The key columns: the plan's, or the primary key; they must lead a valid btree index.
async fn resolve_key(c: &impl GenericClient, spec: &BackfillSpec) -> Result<Vec<Ident>, KeyError> {
    let table = spec.table.quoted();
    let exists: bool = c
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0);
    if !exists {
        return Err(KeyError::Unusable(format!(
            "backfill table {} does not exist (check the name and the search_path)",
            spec.table
        )));
    }
    let key = match &spec.key {
        Some(k) => k.clone(),
        None => {
            let rows = c
                .query(
                    "SELECT a.attname::text
                     FROM pg_index i
                     CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                     WHERE i.indrelid = to_regclass($1) AND i.indisprimary
                     ORDER BY k.ord",
                    &[&table],
                )
                .await?;
            if rows.is_empty() {
                return Err(KeyError::Unusable(format!(
                    "backfill table {} has no primary key; name an indexed, unique, non-null key with `key:` (one column or a list)",
                    spec.table
                )));
            }
            rows.iter().map(|r| Ident(r.get(0))).collect()
        }
    };
    let names: Vec<String> = key.iter().map(|k| k.0.clone()).collect();
    let missing: Vec<String> = c
        .query(
            "SELECT n FROM unnest($2::text[]) AS n
             WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = to_regclass($1)
                               AND a.attname = n AND a.attnum > 0 AND NOT a.attisdropped)",
            &[&table, &names],
        )
        .await?
        .iter()
        .map(|r| quote_ident(r.get(0)))
        .collect();
    if !missing.is_empty() {
        return Err(KeyError::Unusable(format!(
            "backfill key column(s) {} not found in table {}",
            missing.join(", "),
            spec.table
        )));
    }
    let indexed: bool = c
        .query_one(
            "SELECT EXISTS (
               SELECT 1 FROM pg_index i
               JOIN pg_class ic ON ic.oid = i.indexrelid
               JOIN pg_am am ON am.oid = ic.relam
               WHERE i.indrelid = to_regclass($1) AND i.indisvalid AND am.amname = 'btree'
                 AND i.indpred IS NULL
                 AND (SELECT array_agg(a.attname::text ORDER BY k.ord)
                      FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                      WHERE k.ord <= cardinality($2::text[])) = $2::text[])",
            &[&table, &names],
        )
        .await?
        .get(0);
    if !indexed {
        let cols = key
            .iter()
            .map(|k| k.quoted())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(KeyError::Unusable(format!(
            "backfill key ({cols}) of table {} is not the leading part of any valid btree index: every batch would scan the whole table; create one in the expand phase (CREATE INDEX CONCURRENTLY … ON {} ({cols})) or name an indexed key",
            spec.table, spec.table
        )));
    }
    Ok(key)
}

/// One worker's share of the range, as stored.
#[derive(Debug, Clone)]
struct Range {
    worker: i32,
    last_key: Option<Json>,
    rows_done: u64,
    batch_size: Option<i32>,
    done: bool,
}

/// The throttle settings the run starts with: the plan's, overridden by the command line.
#[derive(Debug, Clone)]
struct Settings {
    batch_size: u32,
    /// The operator gave `--batch-size`: it wins over the size recorded by an earlier run.
    batch_size_from_cli: bool,
    sleep: Duration,
    max_rows_per_sec: Option<u32>,
    target_batch_time: Option<Duration>,
    workers: u32,
}

impl Settings {
    fn new(cx: &Context, step: &Step, spec: &BackfillSpec) -> Settings {
        let o = &cx.options.backfill;
        let applies = o.step.as_deref().is_none_or(|s| s == step.name);
        let cli = |v: Option<u32>| if applies { v } else { None };
        Settings {
            batch_size: cli(o.batch_size).unwrap_or(spec.batch_size),
            batch_size_from_cli: cli(o.batch_size).is_some(),
            sleep: o.sleep.filter(|_| applies).unwrap_or(spec.throttle.sleep),
            max_rows_per_sec: cli(o.max_rows_per_sec).or(spec.throttle.max_rows_per_sec),
            target_batch_time: o
                .target_batch_time
                .filter(|_| applies)
                .or(spec.throttle.target_batch_time),
            workers: cli(o.workers).unwrap_or(spec.workers).max(1),
        }
    }
}

/// Reads the ranges of a step that already started, or fixes them (first run).
async fn fix_ranges(
    cx: &Context,
    conn: &mut deadpool_postgres::Object,
    plan: &Plan,
    step: &Step,
    spec: &BackfillSpec,
    key: &[Ident],
    settings: &Settings,
) -> Result<Vec<Range>, db::Error> {
    let ctl = &cx.control;
    let read = ctl.sql(
        "SELECT worker, last_key, rows_done, batch_size, done FROM __SCHEMA__.backfill_ranges
         WHERE plan_id = $1 AND step = $2 ORDER BY worker",
    );
    let load = |rows: Vec<tokio_postgres::Row>| -> Vec<Range> {
        rows.iter()
            .map(|r| Range {
                worker: r.get(0),
                last_key: r.get(1),
                rows_done: r.get::<_, i64>(2).max(0) as u64,
                batch_size: r.get(3),
                done: r.get(4),
            })
            .collect()
    };
    let existing = load(conn.query(&read, &[&plan.id, &step.name]).await?);
    if !existing.is_empty() {
        if settings.workers as usize != existing.len() {
            cx.reporter.message(&format!(
                "step `{}`: continuing with the {} worker range(s) fixed when it started (workers cannot change mid-step)",
                step.name,
                existing.len()
            ));
        }
        return Ok(existing);
    }

    let table = spec.table.quoted();
    let client: &mut tokio_postgres::Client = &mut *conn;
    let tx = client.transaction().await?;
    db::set_local_timeouts(&tx, step.lock_timeout, step.statement_timeout).await?;
    tx.execute(
        &ctl.sql("SELECT 1 FROM __SCHEMA__.steps WHERE plan_id = $1 AND name = $2 FOR UPDATE"),
        &[&plan.id, &step.name],
    )
    .await?;
    let again = load(tx.query(&read, &[&plan.id, &step.name]).await?);
    if !again.is_empty() {
        tx.commit().await?;
        return Ok(again);
    }
    let not_null = key
        .iter()
        .map(|k| format!("{} IS NOT NULL", k.quoted()))
        .collect::<Vec<_>>()
        .join(" AND ");
    let upper: Option<Json> = tx
        .query_opt(
            &format!(
                "SELECT {} FROM {table} WHERE {not_null} ORDER BY {} LIMIT 1",
                batch::encode(key),
                batch::order(key, true)
            ),
            &[],
        )
        .await?
        .map(|r| r.get(0));

    // Size: the planner's estimate scaled to the table's current size, or an exact
    // count when the table is small or has never been analyzed.
    let size = tx
        .query_one(
            "SELECT reltuples::float8, relpages::int8,
                    pg_relation_size(oid) / current_setting('block_size')::int8
             FROM pg_class WHERE oid = to_regclass($1)",
            &[&table],
        )
        .await?;
    let (reltuples, relpages, pages): (f64, i64, i64) = (size.get(0), size.get(1), size.get(2));
    let rows_total: Option<i64> = if upper.is_none() {
        Some(0)
    } else if reltuples > 0.0 && relpages > 0 && reltuples >= 100_000.0 {
        Some((reltuples / relpages as f64 * pages.max(relpages) as f64) as i64)
    } else if pages <= 20_000 {
        Some(
            tx.query_one(&format!("SELECT count(*) FROM {table}"), &[])
                .await?
                .get(0),
        )
    } else {
        None
    };

    let boundaries = match (&upper, settings.workers) {
        (Some(upper), n) if n > 1 => {
            split(&tx, spec, key, upper, n, rows_total.unwrap_or(i64::MAX)).await?
        }
        _ => Vec::new(),
    };
    let count = boundaries.len() + 1;
    let mut ranges = Vec::with_capacity(count);
    for i in 0..count {
        let lower = if i == 0 {
            None
        } else {
            Some(boundaries[i - 1].clone())
        };
        let hi = if i + 1 == count {
            upper.clone()
        } else {
            Some(boundaries[i].clone())
        };
        let done = hi.is_none();
        tx.execute(
            &ctl.sql(
                "INSERT INTO __SCHEMA__.backfill_ranges (plan_id, step, worker, lower_key, upper_key, last_key, batch_size, done)
                 VALUES ($1, $2, $3, $4, $5, $4, $6, $7)",
            ),
            &[&plan.id, &step.name, &(i as i32), &lower, &hi, &(settings.batch_size as i32), &done],
        )
        .await?;
        ranges.push(Range {
            worker: i as i32,
            last_key: lower,
            rows_done: 0,
            batch_size: Some(settings.batch_size as i32),
            done,
        });
    }
    let key_names: Vec<&str> = key.iter().map(|k| k.as_str()).collect();
    let checkpoint = json!({
        "key": key_names,
        "upper_key": upper,
        "workers": count,
        "batch_size": settings.batch_size,
        "rows_updated": 0,
    });
    tx.execute(
        &ctl.sql(
            "UPDATE __SCHEMA__.steps SET rows_total = $3, rows_done = 0, checkpoint = $4
             WHERE plan_id = $1 AND name = $2",
        ),
        &[&plan.id, &step.name, &rows_total, &checkpoint],
    )
    .await?;
    let bounds: Vec<&Json> = boundaries.iter().collect();
    ctl.event(
        &tx,
        &plan.id,
        Some(&step.name),
        "backfill_range_fixed",
        json!({"key": key_names, "upper_key": upper, "boundaries": bounds, "workers": count, "rows_total": rows_total}),
    )
    .await?;
    tx.commit().await?;
    Ok(ranges)
}

/// Up to `workers - 1` increasing keys that cut `(start, upper]` into contiguous
/// parts: the largest key of each `ntile` of the keys (of a block sample when the
/// table is big). Any increasing list splits exactly, with no gap or overlap,
/// because range i is `(b[i-1], b[i]]`; the sample only makes the parts even.
async fn split(
    tx: &impl GenericClient,
    spec: &BackfillSpec,
    key: &[Ident],
    upper: &Json,
    workers: u32,
    rows: i64,
) -> Result<Vec<Json>, db::Error> {
    const SAMPLE_ROWS: f64 = 50_000.0;
    let sample = if rows as f64 > 2.0 * SAMPLE_ROWS {
        // Percent of blocks: a number formatted here, nothing from the plan.
        format!(
            " TABLESAMPLE SYSTEM ({:.4})",
            (100.0 * SAMPLE_ROWS / rows as f64).clamp(0.0001, 100.0)
        )
    } else {
        String::new()
    };
    let table = spec.table.quoted();
    let cols = key
        .iter()
        .map(|k| k.quoted())
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!(
        "SELECT DISTINCT ON (pgshift_tile) {encoded}
         FROM (SELECT {cols}, ntile($1) OVER (ORDER BY {asc}) AS pgshift_tile
               FROM {table}{sample}
               WHERE ({cols}) <= (SELECT {decoded} FROM jsonb_populate_record(NULL::{table}, $2::jsonb) AS pgshift_k)) AS s
         ORDER BY pgshift_tile, {desc}",
        encoded = batch::encode(key),
        asc = batch::order(key, false),
        desc = batch::order(key, true),
        decoded = key
            .iter()
            .map(|k| format!("pgshift_k.{}", k.quoted()))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let rows = tx.query(&sql, &[&(workers as i32), upper]).await?;
    let mut cuts: Vec<Json> = Vec::new();
    // The last tile ends at (or near) the upper bound, which closes the last range.
    for r in rows.iter().take(rows.len().saturating_sub(1)) {
        let k: Json = r.get(0);
        if cuts.last() != Some(&k) && &k != upper {
            cuts.push(k);
        }
    }
    Ok(cuts)
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

/// What the workers of one run share.
struct Shared {
    cx: Context,
    plan: String,
    step: Step,
    spec: BackfillSpec,
    sql_first: String,
    sql_next: String,
    /// Cancelled by the operator's token, or by the first worker that fails.
    stop: CancellationToken,
    workers: u32,
    rows_done: AtomicU64,
    rows_at_start: u64,
    rows_total: Option<u64>,
    started: Instant,
    settings: Settings,
    /// The overrides last seen by any worker, so a change is logged once.
    live: Mutex<Option<Json>>,
    signals: Vec<Signal>,
}

/// How a worker ended without an error.
enum End {
    /// Its range is finished.
    Done,
    /// Cancelled (or stopped because another worker failed) between batches.
    Stopped,
}

/// The limits in force for the next batch.
struct Live {
    paused: bool,
    batch_size: Option<u32>,
    sleep: Duration,
    max_rows_per_sec: Option<u32>,
}

impl Shared {
    fn name(&self) -> &str {
        &self.step.name
    }

    fn db_error(&self, e: db::Error) -> exec::Error {
        db_error(self.name(), e)
    }

    async fn event(&self, c: &impl GenericClient, event: &str, detail: Json) {
        if let Err(e) = self
            .cx
            .control
            .event(c, &self.plan, Some(self.name()), event, detail)
            .await
        {
            tracing::warn!(step = self.name(), "cannot record event `{event}`: {e}");
        }
    }

    /// Applies the operator's live overrides over the run's settings; logs a change once.
    async fn overrides(&self, c: &impl GenericClient) -> Result<Live, db::Error> {
        let ov = self
            .cx
            .control
            .overrides(c, &self.plan, self.name())
            .await?;
        let changed = {
            let mut seen = self.live.lock().unwrap_or_else(|p| p.into_inner());
            let changed = seen.as_ref() != Some(&ov);
            let first = seen.is_none();
            *seen = Some(ov.clone());
            // Overrides already present at start are applied too, and said once.
            changed && !(first && ov.as_object().is_none_or(|m| m.is_empty()))
        };
        if changed {
            self.cx.reporter.message(&format!(
                "step `{}`: operator overrides applied: {ov}",
                self.name()
            ));
            self.event(c, "override_applied", ov.clone()).await;
        }
        let uint = |k: &str| ov.get(k).and_then(Json::as_u64);
        Ok(Live {
            paused: ov.get("paused").and_then(Json::as_bool).unwrap_or(false),
            batch_size: uint("batch_size")
                .filter(|n| *n > 0)
                .map(|n| n.min(crate::plan::defaults::BATCH_SIZE_LIMIT as u64) as u32),
            sleep: uint("sleep_ms")
                .map(Duration::from_millis)
                .unwrap_or(self.settings.sleep),
            max_rows_per_sec: match ov.get("max_rows_per_sec") {
                Some(v) if v.as_u64() == Some(0) => None,
                Some(v) => v
                    .as_u64()
                    .map(|n| n.min(u32::MAX as u64) as u32)
                    .or(self.settings.max_rows_per_sec),
                None => self.settings.max_rows_per_sec,
            },
        })
    }

    fn report(&self, worker: i32, batch_size: u32, throttled: Option<String>) {
        let done = self.rows_done.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            done.saturating_sub(self.rows_at_start) as f64 / secs
        } else {
            0.0
        };
        self.cx.reporter.backfill(
            self.name(),
            &BackfillProgress {
                worker: worker as u32,
                workers: self.workers,
                rows_done: done,
                rows_total: self.rows_total,
                rows_per_sec: rate,
                batch_size,
                throttled,
            },
        );
    }

    /// Sleeps for `d` unless stopped first; false when stopped.
    async fn sleep(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }

    /// A pooled connection again after `lost`, retrying with backoff for up to
    /// `reconnect_timeout`. `Ok(None)`: stopped while waiting.
    async fn reconnect(
        &self,
        lost: db::Error,
    ) -> Result<Option<deadpool_postgres::Object>, exec::Error> {
        let since = Instant::now();
        let mut last = lost;
        let mut attempt = 0;
        self.cx.reporter.message(&format!(
            "step `{}`: lost the connection ({last}); reconnecting for up to {}s",
            self.name(),
            self.cx.options.reconnect_timeout.as_secs()
        ));
        loop {
            if since.elapsed() >= self.cx.options.reconnect_timeout {
                return Err(exec::Error::ConnectionLost {
                    step: self.name().to_string(),
                    source: last,
                });
            }
            attempt += 1;
            if !self.sleep(db::backoff(attempt)).await {
                return Ok(None);
            }
            match db::get(&self.cx.pool, &self.cx.target).await {
                Ok(c) => return Ok(Some(c)),
                Err(e) if e.is_connection_lost() => last = e,
                Err(e) => return Err(self.db_error(e)),
            }
        }
    }

    /// The worker's committed checkpoint (after a reconnect, the truth may differ from memory).
    async fn checkpoint(
        &self,
        c: &impl GenericClient,
        worker: i32,
    ) -> Result<(Option<Json>, bool), db::Error> {
        let r = c
            .query_one(
                &self.cx.control.sql(
                    "SELECT last_key, done FROM __SCHEMA__.backfill_ranges WHERE plan_id = $1 AND step = $2 AND worker = $3",
                ),
                &[&self.plan, &self.name(), &worker],
            )
            .await?;
        Ok((r.get(0), r.get(1)))
    }
}

/// Why a worker's loop must get a new connection or stop.
enum Interrupt {
    Lost(db::Error),
    Stopped,
    Error(exec::Error),
}

/// One worker: batches over its range until done, stopped, or failed.
async fn work(sh: Arc<Shared>, range: Range) -> Result<End, exec::Error> {
    if range.done {
        return Ok(End::Done);
    }
    let initial = if sh.settings.batch_size_from_cli {
        sh.settings.batch_size
    } else {
        range
            .batch_size
            .map(|n| n.max(1) as u32)
            .unwrap_or(sh.settings.batch_size)
    };
    let t = &sh.spec.throttle;
    let mut st = WorkerState {
        worker: range.worker,
        from_start: range.last_key.is_none(),
        sizer: Sizer::new(
            initial,
            t.min_batch_size,
            t.max_batch_size.max(initial),
            sh.settings.target_batch_time,
        ),
        pinned: None,
        held: None,
    };
    let mut conn = match db::get(&sh.cx.pool, &sh.cx.target).await {
        Ok(c) => c,
        Err(e) if e.is_connection_lost() => match sh.reconnect(e).await? {
            Some(c) => c,
            None => return Ok(End::Stopped),
        },
        Err(e) => return Err(sh.db_error(e)),
    };
    loop {
        match run_worker(&sh, &conn, &mut st).await {
            Ok(end) => return Ok(end),
            Err(Interrupt::Stopped) => return Ok(End::Stopped),
            Err(Interrupt::Error(e)) => return Err(e),
            Err(Interrupt::Lost(e)) => {
                drop(deadpool_postgres::Object::take(conn));
                conn = match sh.reconnect(e).await? {
                    Some(c) => c,
                    None => return Ok(End::Stopped),
                };
                match sh.checkpoint(&**conn, st.worker).await {
                    Ok((_, true)) => return Ok(End::Done),
                    Ok((last, false)) => st.from_start = last.is_none(),
                    Err(e) => return Err(sh.db_error(e)),
                }
            }
        }
    }
}

struct WorkerState {
    worker: i32,
    from_start: bool,
    sizer: Sizer,
    /// The live batch size override last applied.
    pinned: Option<u32>,
    /// Why the worker is held right now, if it is (a change is logged once).
    held: Option<String>,
}

fn classify(sh: &Shared, e: db::Error) -> Interrupt {
    if e.is_connection_lost() {
        Interrupt::Lost(e)
    } else {
        Interrupt::Error(sh.db_error(e))
    }
}

/// The batch loop on one connection; returns on the end of the range or an interruption.
async fn run_worker(
    sh: &Shared,
    conn: &deadpool_postgres::Object,
    st: &mut WorkerState,
) -> Result<End, Interrupt> {
    let client: &tokio_postgres::Client = conn;
    let mut timeouts = 0u32;
    loop {
        if sh.stop.is_cancelled() {
            return Err(Interrupt::Stopped);
        }
        let live = hold(sh, client, st).await?;
        if live.batch_size != st.pinned {
            st.pinned = live.batch_size;
            st.sizer.pin(live.batch_size);
        }
        let size = st.sizer.size();
        let sql = if st.from_start {
            &sh.sql_first
        } else {
            &sh.sql_next
        };
        let stmt = conn
            .prepare_cached(sql)
            .await
            .map_err(|e| classify(sh, e.into()))?;
        let result = batch::apply(
            client,
            &stmt,
            (sh.step.lock_timeout, sh.step.statement_timeout),
            (&sh.plan, sh.name(), st.worker, size as i64),
        )
        .await;
        let applied = match result {
            Ok(a) => a,
            Err(e) if e.is_connection_lost() => return Err(Interrupt::Lost(e)),
            Err(e) if e.is_canceled() || e.is_retryable() => {
                timeouts += 1;
                if timeouts > sh.step.retries {
                    return Err(Interrupt::Error(sh.db_error(e)));
                }
                // A timeout says the batch is too big for the moment; a deadlock or
                // serialization failure just needs another try.
                let timed_out = e.is_canceled() || e.sqlstate() == Some("55P03");
                if timed_out {
                    st.sizer.shrink();
                }
                let wait = db::backoff(timeouts);
                sh.cx.reporter.message(&format!(
                    "step `{}`: batch of {size} rows failed ({e}); retry {timeouts} of {} in {}ms with {} rows",
                    sh.name(),
                    sh.step.retries,
                    wait.as_millis(),
                    st.sizer.size()
                ));
                sh.event(
                    client,
                    "batch_retry",
                    json!({"worker": st.worker, "sqlstate": e.sqlstate(), "error": e.to_string(),
                           "attempt": timeouts, "batch_size": size, "next_batch_size": st.sizer.size()}),
                )
                .await;
                if !sh.sleep(wait).await {
                    return Err(Interrupt::Stopped);
                }
                continue;
            }
            Err(e) => return Err(Interrupt::Error(sh.db_error(e))),
        };
        timeouts = 0;
        if applied.last_key.is_some() {
            st.from_start = false;
        }
        st.sizer.observe(applied.picked, applied.elapsed);
        sh.rows_done.fetch_add(applied.picked, Ordering::Relaxed);
        sh.report(st.worker, st.sizer.size(), None);
        tracing::debug!(
            step = sh.name(),
            worker = st.worker,
            picked = applied.picked,
            changed = applied.changed,
            ms = applied.elapsed.as_millis() as u64,
            "batch committed"
        );
        if applied.done {
            return Ok(End::Done);
        }
        let pause = throttle::pause_after(
            applied.picked,
            applied.elapsed,
            live.sleep,
            live.max_rows_per_sec,
            sh.workers,
        );
        if !pause.is_zero() && !sh.sleep(pause).await {
            return Err(Interrupt::Stopped);
        }
    }
}

/// Reads the overrides and the signals; waits (re-checking every second) while
/// paused or held. Returns the limits for the next batch.
async fn hold(
    sh: &Shared,
    client: &tokio_postgres::Client,
    st: &mut WorkerState,
) -> Result<Live, Interrupt> {
    loop {
        let live = sh.overrides(client).await.map_err(|e| classify(sh, e))?;
        let mut reason = None;
        if live.paused {
            reason =
                Some("paused by operator (pgshift throttle --unpause to continue)".to_string());
        } else {
            for s in &sh.signals {
                match s.check(client).await {
                    Ok(None) => {}
                    Ok(Some(why)) => {
                        reason = Some(why);
                        break;
                    }
                    Err(ReadError::Unreadable(why)) => {
                        reason = Some(format!("{why}; holding until it can be read"));
                        break;
                    }
                    Err(ReadError::ConnectionLost(e)) => return Err(Interrupt::Lost(e)),
                }
            }
        }
        match reason {
            None => {
                if let Some(was) = st.held.take() {
                    sh.event(
                        client,
                        "throttle_released",
                        json!({"worker": st.worker, "was": was}),
                    )
                    .await;
                }
                return Ok(live);
            }
            Some(why) => {
                if st.held.as_deref().map(hold_kind) != Some(hold_kind(&why)) {
                    sh.cx.reporter.message(&format!(
                        "step `{}` worker {}: holding: {why}",
                        sh.name(),
                        st.worker
                    ));
                    sh.event(
                        client,
                        "throttle_hold",
                        json!({"worker": st.worker, "reason": why}),
                    )
                    .await;
                    st.held = Some(why.clone());
                }
                sh.report(st.worker, st.sizer.size(), Some(why));
                if !sh.sleep(Duration::from_secs(1)).await {
                    return Err(Interrupt::Stopped);
                }
            }
        }
    }
}

/// A hold reason without its figures, so that "replays 4.2s behind" then "replays
/// 5.3s behind" is one hold (one event, one message), not a new one every second.
fn hold_kind(why: &str) -> String {
    let mut out = String::with_capacity(why.len());
    for c in why.chars() {
        let in_number = out.ends_with('#');
        if c.is_ascii_digit() || (c == '.' && in_number) {
            if !in_number {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// After the last batch: the plan's `verify` query, or the rows of the range
/// that still match `where`, must count zero.
async fn verify(sh: &Shared) -> Result<(), exec::Error> {
    let fail = |e: db::Error| sh.db_error(e);
    let mut conn = db::get(&sh.cx.pool, &sh.cx.target).await.map_err(fail)?;
    let ctl = &sh.cx.control;
    let cp: Option<Json> = conn
        .query_one(
            &ctl.sql("SELECT checkpoint FROM __SCHEMA__.steps WHERE plan_id = $1 AND name = $2"),
            &[&sh.plan, &sh.name()],
        )
        .await
        .map_err(|e| fail(e.into()))?
        .get(0);
    let cp = cp.unwrap_or(Json::Null);
    let upper = cp.get("upper_key").cloned().filter(|v| !v.is_null());
    let key: Vec<Ident> = cp
        .get("key")
        .and_then(Json::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Json::as_str)
                .map(|s| Ident(s.to_string()))
                .collect()
        })
        .unwrap_or_default();
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
    db::set_local_timeouts(&tx, sh.step.lock_timeout, sh.step.statement_timeout)
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
        sh.event(&**conn, "verify_failed", json!({"missed": missed}))
            .await;
        return Err(exec::Error::Failed {
            step: sh.name().to_string(),
            message: format!(
                "verify after the last batch: {missed} row(s) missed ({what} {missed}, expected 0). \
                 Either `set` does not make `where` false, or rows were written without the dual-write \
                 trigger; fix the plan or the data, then resume"
            ),
        });
    }
    finish(sh, &**conn, Some(missed)).await;
    Ok(())
}

async fn finish(sh: &Shared, c: &impl GenericClient, verified: Option<i64>) {
    sh.event(
        c,
        "backfill_finished",
        json!({"rows_done": sh.rows_done.load(Ordering::Relaxed), "verified_missed": verified}),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::hold_kind;

    #[test]
    fn a_hold_whose_figure_changes_is_the_same_hold() {
        assert_eq!(
            hold_kind("replica r replays 4.2s behind (limit 1.0s)"),
            hold_kind("replica r replays 13.75s behind (limit 1.0s)")
        );
        assert_ne!(
            hold_kind("replica r replays 4.2s behind (limit 1.0s)"),
            hold_kind("throttle_query returned true")
        );
    }
}
