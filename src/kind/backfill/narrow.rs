//! A batch that fails on a row (a division by zero, a failing cast, a
//! constraint, a trigger that raises) is narrowed down to its first failing
//! row, so the operator reads which row, not only which batch.
//!
//! Narrowing runs the batch statement itself with smaller sizes, from the
//! worker's checkpoint: half the failing batch, then a half of whichever half
//! fails, down to one key. Each smaller batch that passes commits with its
//! checkpoint like any other batch (one transaction, so nothing is ever
//! committed twice, and a resume continues after it); each that fails rolls
//! back. When one key alone fails, the checkpoint sits right before it: that
//! key is the first failing row, and after the operator fixes it `resume`
//! continues from there. Finding it costs about 2·log2(batch size) statements.
//!
//! Only errors that a row's data can cause are narrowed (SQLSTATE classes 21,
//! 22, 23, 27, 2F, 38, 39, 44 and P0, and 54000): a missing column or a permission error
//! fails every batch alike. When the error does not come back in smaller
//! batches (it needed rows of two halves together), the worker goes on. The
//! operator's live batch size would override the smaller sizes, so the worker
//! does not narrow while one is set; a pause or a newer run ends narrowing,
//! and the worker sees either at its next batch.

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value as Json;
use tokio_postgres::Client;

use super::batch::{self, Outcome};
use super::worker::{Conn, Shared};
use crate::control::{Checkpoint, Event};
use crate::db::{self, OneTrip};
use crate::engine::Error;
use crate::ident::Ident;

/// How narrowing a failed batch ended.
pub enum Narrowed {
    /// One key alone fails: the step fails with this error, naming it.
    Row(Error),
    /// The failure did not come back; `moved`: batches committed meanwhile;
    /// `done`: the worker's range is finished.
    Passed { moved: bool, done: bool },
}

/// True for errors a row's data can cause, which narrowing can pin on a row.
pub fn is_row_error(e: &db::Error) -> bool {
    // 54000: a row too big for an index entry, say.
    e.sqlstate() == Some("54000")
        || matches!(
            e.sqlstate().map(|s| &s[..2]),
            Some("21" | "22" | "23" | "27" | "2F" | "38" | "39" | "44" | "P0")
        )
}

/// The error of a batch that timed out or waited for locks `attempts` times in
/// a row, the last time with `size` rows: counted, and the setting named.
pub fn gave_up(sh: &Shared, e: db::Error, attempts: u32, size: u32) -> Error {
    let sx = &sh.sx;
    if e.is_statement_timeout() {
        return Error::StatementTimeout {
            plan: sx.plan.clone(),
            step: sx.step.clone(),
            limit: sx.statement_timeout,
            batch: Some((attempts, size)),
            source: Box::new(e),
        };
    }
    if e.is_retryable() {
        return Error::RetriesExhausted {
            plan: sx.plan.clone(),
            step: sx.step.clone(),
            attempts,
            lock_timeout: sx.lock_timeout,
            source: e,
        };
    }
    sx.db_error(e)
}

/// Narrows the batch of `size` keys that failed with `failed`, from the
/// worker's checkpoint (`from_start`: it has none yet).
pub async fn narrow(
    sh: &Shared,
    conn: &Conn,
    failed: db::Error,
    size: u32,
    worker: i32,
    from_start: bool,
) -> Result<Narrowed, db::Error> {
    let narrowed = halve(sh, conn, failed, size, worker, from_start).await?;
    // The small batches recorded their size; a resume starts again at the size that was in use.
    conn.client.exec(
        &sh.sx.cx.control.sql(
            "UPDATE __SCHEMA__.backfill_ranges SET batch_size = $4 WHERE plan_id = $1 AND step = $2 AND worker = $3",
        ),
        &[&sh.sx.plan, &sh.name(), &worker, &(size as i32)],
    )
    .await?;
    Ok(narrowed)
}

async fn halve(
    sh: &Shared,
    conn: &Conn,
    failed: db::Error,
    size: u32,
    worker: i32,
    from_start: bool,
) -> Result<Narrowed, db::Error> {
    let client: &Client = &conn.client;
    let mut from_start = from_start;
    // The failing rows lie in the first `window` keys after the checkpoint;
    // `known`: a batch of exactly `window` keys failed with `last`.
    let mut window = u64::from(size.max(1));
    let mut known = true;
    let mut last = failed;
    let mut statements = 0u32;
    let mut moved = false;
    sh.sx.cx.reporter.message(&format!(
        "step `{}`: a batch of {size} rows failed ({last}); narrowing it down to its first failing row",
        sh.name()
    ));
    loop {
        if window <= 1 && known {
            return found(sh, client, worker, last, statements).await;
        }
        if sh.stop.is_cancelled() {
            return Ok(Narrowed::Passed { moved, done: false });
        }
        let n = if window > 1 { window / 2 } else { 1 };
        statements += 1;
        match run(sh, conn, from_start, worker, n).await? {
            Tried::Stop => return Ok(Narrowed::Passed { moved, done: false }),
            Tried::Applied(applied) => {
                moved = true;
                from_start &= applied.last_key.is_none();
                sh.rows_done.fetch_add(applied.picked, Ordering::Relaxed);
                if applied.done {
                    return Ok(Narrowed::Passed { moved, done: true });
                }
                if window <= 1 {
                    break;
                }
                window -= n;
                known = false;
            }
            Tried::Failed(e) => {
                last = e;
                window = n;
                known = true;
            }
        }
    }
    let passed = Event::BackfillNarrowed {
        worker,
        error: last.to_string(),
        statements,
    };
    sh.event(client, &passed).await;
    Ok(Narrowed::Passed { moved, done: false })
}

/// One key alone fails: it is the key right after the checkpoint.
async fn found(
    sh: &Shared,
    client: &Client,
    worker: i32,
    e: db::Error,
    statements: u32,
) -> Result<Narrowed, db::Error> {
    let key = next_key(sh, client, worker).await?;
    let event = Event::BackfillRowFailed {
        worker,
        key: key.clone(),
        error: e.to_string(),
        sqlstate: e.sqlstate().map(str::to_string),
        statements,
    };
    sh.event(client, &event).await;
    Ok(Narrowed::Row(Error::RowFailed {
        plan: sh.sx.plan.clone(),
        step: sh.sx.step.clone(),
        table: sh.spec.table.to_string(),
        key: crate::control::key_text(&key),
        source: Box::new(e),
    }))
}

/// How one smaller batch went.
enum Tried {
    /// Committed with its checkpoint.
    Applied(batch::Applied),
    /// Failed on the data, and rolled back.
    Failed(db::Error),
    /// Applied nothing: the step is paused, its range moved, or a newer run
    /// owns it; the worker finds out which at its next batch.
    Stop,
}

/// One batch of `n` keys. Lock timeouts and deadlocks are retried like any
/// batch's, up to the step's `retries`; other errors are returned.
async fn run(
    sh: &Shared,
    conn: &Conn,
    from_start: bool,
    worker: i32,
    n: u64,
) -> Result<Tried, db::Error> {
    let stmt = if from_start { &conn.first } else { &conn.next };
    let backstop = sh.sx.statement_timeout + Duration::from_secs(30);
    let mut attempt = 0;
    loop {
        let params = (
            sh.sx.plan.as_str(),
            sh.name(),
            worker,
            n as i64,
            sh.fence.epoch,
        );
        match batch::apply(&conn.client, stmt, params, backstop).await {
            Ok(Outcome::Applied(a)) => return Ok(Tried::Applied(a)),
            Ok(_) => return Ok(Tried::Stop),
            Err(e) if is_row_error(&e) => return Ok(Tried::Failed(e)),
            Err(e) if e.is_retryable() && attempt < sh.sx.retries => {
                attempt += 1;
                tokio::time::sleep(db::backoff(attempt)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The first key after the worker's checkpoint (within its range), as stored
/// in checkpoints: `{"id": 41001}`.
async fn next_key(sh: &Shared, client: &Client, worker: i32) -> Result<Json, db::Error> {
    let ctl = &sh.sx.cx.control;
    let cp: Option<Json> = client
        .row(
            &ctl.sql("SELECT checkpoint FROM __SCHEMA__.steps WHERE plan_id = $1 AND name = $2"),
            &[&sh.sx.plan, &sh.name()],
        )
        .await?
        .get(0);
    let key: Vec<Ident> = cp
        .as_ref()
        .and_then(Checkpoint::from_json)
        .map(|c| c.key.into_iter().map(Ident).collect())
        .unwrap_or_default();
    if key.is_empty() {
        return Ok(Json::Null);
    }
    let table = sh.spec.table.quoted();
    let cols = key.iter().map(Ident::quoted).collect::<Vec<_>>().join(", ");
    let decode = |field: &str| {
        format!(
            "(SELECT {} FROM jsonb_populate_record(NULL::{table}, r.{field}) AS pgshift_k)",
            key.iter()
                .map(|k| format!("pgshift_k.{}", k.quoted()))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // No checkpoint yet (`last_key` NULL): the comparison is NULL, and the range starts at the smallest key.
    let sql = format!(
        "SELECT {encoded} FROM {table}, {ctl}.backfill_ranges AS r
         WHERE r.plan_id = $1 AND r.step = $2 AND r.worker = $3
           AND (({cols}) > {lower}) IS NOT FALSE AND ({cols}) <= {upper}
         ORDER BY {asc} LIMIT 1",
        encoded = batch::encode(&key),
        ctl = ctl.quoted(),
        lower = decode("last_key"),
        upper = decode("upper_key"),
        asc = batch::order(&key, false),
    );
    let row = client
        .row_opt(&sql, &[&sh.sx.plan, &sh.name(), &worker])
        .await?;
    Ok(row.map(|r| r.get::<_, Json>(0)).unwrap_or(Json::Null))
}
