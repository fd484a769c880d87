//! The backfill's key range, fixed when the step first starts: the largest key
//! then is the upper bound (rows inserted later are the dual-write trigger's
//! job), split into one contiguous sub-range per worker, all written in one
//! transaction before the first batch. A step that already started reads the
//! ranges it fixed, and claims them for this run's epoch.

use serde_json::Value as Json;
use tokio_postgres::GenericClient;

use super::BackfillSpec;
use super::batch::{self, Key};
use super::throttle::Settings;
use crate::control::{Checkpoint, Event};
use crate::db::{self, OneTrip};
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

/// Reads and claims the ranges of a step that already started, or fixes them
/// (first run), for the run of `epoch`. `None`: a newer run owns them.
///
/// Claiming sets each range's epoch under its row lock, so it waits for a batch
/// of an earlier run still in flight, and no batch of that run applies after it.
pub async fn fix_ranges(
    sx: &StepCx,
    conn: &mut deadpool_postgres::Object,
    spec: &BackfillSpec,
    key: &Key,
    settings: &Settings,
    epoch: i64,
) -> Result<Option<Vec<Range>>, db::Error> {
    let ctl = &sx.cx.control;
    let (plan, step) = (&sx.plan, &sx.step);
    let client: &mut tokio_postgres::Client = &mut *conn;
    let tx = client.transaction().await?;
    // Only pgshift's own batches lock these rows: waiting for one costs the application nothing.
    db::set_local_timeouts(&tx, sx.statement_timeout, sx.statement_timeout).await?;
    tx.exec(
        &ctl.sql("SELECT 1 FROM __SCHEMA__.steps WHERE plan_id = $1 AND name = $2 FOR UPDATE"),
        &[plan, step],
    )
    .await?;
    let rows = tx
        .rows(
            &ctl.sql(
                "SELECT worker, last_key, rows_done, batch_size, done, epoch FROM __SCHEMA__.backfill_ranges
                 WHERE plan_id = $1 AND step = $2 ORDER BY worker FOR UPDATE",
            ),
            &[plan, step],
        )
        .await?;
    if !rows.is_empty() {
        let previous = rows.iter().map(|r| r.get::<_, i64>(5)).max().unwrap_or(0);
        if previous > epoch {
            return Ok(None);
        }
        tx.exec(
            &ctl.sql(
                "UPDATE __SCHEMA__.backfill_ranges SET epoch = $3 WHERE plan_id = $1 AND step = $2",
            ),
            &[plan, step, &epoch],
        )
        .await?;
        if previous != epoch && previous != 0 {
            sx.record(&tx, &Event::BackfillClaimed { epoch, previous })
                .await?;
        }
        let ranges: Vec<Range> = rows
            .iter()
            .map(|r| Range {
                worker: r.get(0),
                last_key: r.get(1),
                rows_done: r.get::<_, i64>(2).max(0) as u64,
                batch_size: r.get(3),
                done: r.get(4),
            })
            .collect();
        if settings.workers as usize != ranges.len() {
            workers_unchanged(sx, &tx, settings, ranges.len()).await?;
        }
        tx.commit().await?;
        return Ok(Some(ranges));
    }
    let ranges = insert_ranges(sx, &tx, spec, key, settings, epoch).await?;
    tx.commit().await?;
    Ok(Some(ranges))
}

/// A started step keeps the split it was fixed with: say so when the operator
/// (or a changed plan) asks for another number of workers.
async fn workers_unchanged(
    sx: &StepCx,
    tx: &impl GenericClient,
    settings: &Settings,
    fixed: usize,
) -> Result<(), db::Error> {
    let asked = if settings.workers_from_cli {
        format!("--workers {}", settings.workers)
    } else {
        format!("the plan's `workers: {}`", settings.workers)
    };
    sx.cx.reporter.message(&format!(
        "step `{}`: {asked} cannot take effect: the step started with {fixed} worker range(s), split when it first ran, and continues with them (a started step keeps its split)",
        sx.step
    ));
    let unchanged = Event::WorkersUnchanged {
        requested: settings.workers,
        fixed: fixed as u32,
    };
    sx.record(tx, &unchanged).await
}

/// First run: measures the range, splits it among the workers, and records it all.
async fn insert_ranges(
    sx: &StepCx,
    tx: &impl GenericClient,
    spec: &BackfillSpec,
    key: &Key,
    settings: &Settings,
    epoch: i64,
) -> Result<Vec<Range>, db::Error> {
    let ctl = &sx.cx.control;
    let (plan, step) = (&sx.plan, &sx.step);
    let key = &key.cols;
    let (upper, rows_total) = measure(tx, spec, key).await?;
    let boundaries = match (&upper, settings.workers) {
        (Some(upper), n) if n > 1 => {
            split(tx, spec, key, upper, n, rows_total.unwrap_or(i64::MAX)).await?
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
        tx.exec(
            &ctl.sql(
                "INSERT INTO __SCHEMA__.backfill_ranges (plan_id, step, worker, lower_key, upper_key, last_key, batch_size, done, epoch)
                 VALUES ($1, $2, $3, $4, $5, $4, $6, $7, $8)",
            ),
            &[plan, step, &(i as i32), &lower, &hi, &(settings.batch_size as i32), &done, &epoch],
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
    }
    .to_json();
    tx.exec(
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
    sx.record(tx, &fixed).await?;
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
        .row_opt(
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
        .row(
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
            tx.row(&format!("SELECT count(*) FROM {table}"), &[])
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
    let rows = tx.rows(&sql, &[&(workers as i32), upper]).await?;
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
