//! The backfill's key range, fixed when the step first starts: the largest key
//! then is the upper bound (rows inserted later are the dual-write trigger's
//! job), split into one contiguous sub-range per worker, all written in one
//! transaction before the first batch. A step that already started reads the
//! ranges it fixed.

use std::time::Duration;

use serde_json::Value as Json;
use tokio_postgres::GenericClient;

use super::{BackfillSpec, batch};
use crate::control::{Checkpoint, Event};
use crate::db;
use crate::engine::StepCx;
use crate::ident::Ident;

/// One worker's share of the range, as stored.
#[derive(Debug, Clone)]
pub struct Range {
    pub worker: i32,
    pub last_key: Option<Json>,
    pub rows_done: u64,
    pub batch_size: Option<i32>,
    pub done: bool,
}

/// The throttle settings the run starts with: the plan's, overridden by the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    pub batch_size: u32,
    /// The operator gave `--batch-size`: it wins over the size recorded by an earlier run.
    pub batch_size_from_cli: bool,
    pub sleep: Duration,
    pub max_rows_per_sec: Option<u32>,
    pub target_batch_time: Option<Duration>,
    pub workers: u32,
}

impl Settings {
    pub fn new(sx: &StepCx, spec: &BackfillSpec) -> Settings {
        let o = &sx.cx.options.backfill;
        let applies = o.step.as_deref().is_none_or(|s| s == sx.step);
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
pub async fn fix_ranges(
    sx: &StepCx,
    conn: &mut deadpool_postgres::Object,
    spec: &BackfillSpec,
    key: &[Ident],
    settings: &Settings,
) -> Result<Vec<Range>, db::Error> {
    let ctl = &sx.cx.control;
    let (plan, step) = (&sx.plan, &sx.step);
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
    let existing = load(conn.query(&read, &[plan, step]).await?);
    if !existing.is_empty() {
        if settings.workers as usize != existing.len() {
            sx.cx.reporter.message(&format!(
                "step `{}`: continuing with the {} worker range(s) fixed when it started (workers cannot change mid-step)",
                step,
                existing.len()
            ));
        }
        return Ok(existing);
    }

    let client: &mut tokio_postgres::Client = &mut *conn;
    let tx = client.transaction().await?;
    db::set_local_timeouts(&tx, sx.lock_timeout, sx.statement_timeout).await?;
    tx.execute(
        &ctl.sql("SELECT 1 FROM __SCHEMA__.steps WHERE plan_id = $1 AND name = $2 FOR UPDATE"),
        &[plan, step],
    )
    .await?;
    let again = load(tx.query(&read, &[plan, step]).await?);
    if !again.is_empty() {
        tx.commit().await?;
        return Ok(again);
    }
    let (upper, rows_total) = measure(&tx, spec, key).await?;
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
            &[plan, step, &(i as i32), &lower, &hi, &(settings.batch_size as i32), &done],
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
    let key_names: Vec<String> = key.iter().map(|k| k.as_str().to_string()).collect();
    let checkpoint = Checkpoint {
        key: key_names.clone(),
        upper_key: upper.clone(),
        workers: count as u32,
        batch_size: settings.batch_size,
        rows_updated: 0,
    }
    .to_json();
    tx.execute(
        &ctl.sql(
            "UPDATE __SCHEMA__.steps SET rows_total = $3, rows_done = 0, checkpoint = $4
             WHERE plan_id = $1 AND name = $2",
        ),
        &[plan, step, &rows_total, &checkpoint],
    )
    .await?;
    let fixed = Event::BackfillRangeFixed {
        key: key_names,
        upper_key: upper,
        boundaries,
        workers: count,
        rows_total,
    };
    sx.record(&tx, &fixed).await?;
    tx.commit().await?;
    Ok(ranges)
}

/// The range's end (the largest key now; `None` for an empty table) and the
/// estimated number of rows: the planner's estimate scaled to the table's
/// current size, or an exact count when the table is small or never analyzed.
async fn measure(
    tx: &impl GenericClient,
    spec: &BackfillSpec,
    key: &[Ident],
) -> Result<(Option<Json>, Option<i64>), db::Error> {
    let table = spec.table.quoted();
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

    Ok((upper, rows_total))
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
