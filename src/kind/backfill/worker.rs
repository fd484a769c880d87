//! The workers of a backfill: each runs batches over its own key range on a
//! connection of its own (session timeouts set once, both forms of the batch
//! statement prepared once), one round trip per batch. Between batches a worker
//! reads only memory: the signals its step's coordinator sampled, and the
//! overrides its last batch returned. It reconnects after a lost connection,
//! stops between batches when cancelled, and stops for good when fenced.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio::sync::watch;
use tokio_postgres::{Client, GenericClient, Statement};
use tokio_util::sync::CancellationToken;

use super::BackfillSpec;
use super::batch::{self, Applied, Outcome};
use super::coordinator::{Gate, INTERVAL};
use super::narrow;
use super::ranges::Range;
use super::throttle::{self, Limits, Settings, Sizer};
use crate::control::{Event, Overrides};
use crate::db::{self, OneTrip};
use crate::engine::{BackfillProgress, Error, Fence, StepCx};

/// What the workers and the coordinator of one run share.
pub struct Shared {
    pub sx: StepCx,
    pub spec: BackfillSpec,
    /// The batch statement from the start of a range, and after a checkpoint.
    pub sql_first: String,
    pub sql_next: String,
    /// Cancelled by the operator's token, or by the first worker that fails.
    pub stop: CancellationToken,
    pub fence: Fence,
    pub workers: u32,
    pub settings: Settings,
    /// The step's counts as the batches report them (the ranges hold the truth).
    pub rows_done: AtomicU64,
    pub rows_total: Option<u64>,
    /// The highest WAL insert position a batch reached, projected (for the slot lag).
    pub wal: AtomicU64,
    /// The batch size last used.
    pub batch_size: AtomicU32,
    /// Rate and ETA over the recent window, computed by the coordinator.
    pub figures: Mutex<Figures>,
    /// When this run started, and the rows done then (the rate before the window fills).
    pub started: (Instant, u64),
    /// The cap that set the last pause, if one did (rows/s, WAL rate).
    pub slowed: Mutex<Option<String>>,
    /// A worker held for a reason of its own since the coordinator's last sample
    /// (a slot's lag projected with our batches' WAL, a stale sample): the
    /// coordinator records it.
    pub episode: Mutex<Option<String>>,
    pub gate: watch::Receiver<Gate>,
}

/// The step's current rate and ETA.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    pub rows_per_sec: f64,
    pub eta: Option<Duration>,
}

/// How a worker ended without an error.
pub enum End {
    /// Its range is finished.
    Done,
    /// Cancelled (or stopped because another worker failed) between batches.
    Stopped,
}

impl Shared {
    pub fn name(&self) -> &str {
        &self.sx.step
    }

    /// Records `event` on `c`; a failure is only logged (it must not stop the batches).
    pub async fn event(&self, c: &impl GenericClient, event: &Event) {
        if let Err(e) = self.sx.record(c, event).await {
            tracing::warn!(step = self.name(), "cannot record an event: {e}");
        }
    }

    /// Tells the reporter where the step stands; `throttled` with `held` when no batch runs.
    pub fn report(&self, worker: i32, batch_size: u32, throttled: Option<String>, held: bool) {
        let mut f = *self.figures.lock().unwrap_or_else(|p| p.into_inner());
        let done = self.rows_done.load(Ordering::Relaxed);
        let (t0, d0) = self.started;
        if f.rows_per_sec == 0.0 && t0.elapsed() < 2 * INTERVAL && done > d0 {
            // Before the coordinator's first window: the rate since the start.
            f.rows_per_sec = (done - d0) as f64 / t0.elapsed().as_secs_f64().max(1e-3);
        }
        self.sx.cx.reporter.backfill(
            self.name(),
            &BackfillProgress {
                worker: worker.max(0) as u32,
                workers: self.workers,
                rows_done: done,
                rows_total: self.rows_total,
                rows_per_sec: f.rows_per_sec,
                batch_size,
                throttled,
                held,
                eta: if held { None } else { f.eta },
            },
        );
    }

    fn lock_lost(&self, why: &str) -> Error {
        Error::LockLost {
            plan: self.sx.plan.clone(),
            step: self.name().to_string(),
            why: why.to_string(),
        }
    }

    /// Stops when the run is cancelled or its lock is gone; otherwise waits for `d`.
    async fn sleep(&self, d: Duration) -> Result<(), Interrupt> {
        tokio::select! {
            _ = self.stop.cancelled() => Err(Interrupt::Stopped),
            _ = self.fence.lost.cancelled() => Err(Interrupt::Error(self.lock_lost("its lock connection is gone"))),
            _ = tokio::time::sleep(d) => Ok(()),
        }
    }
}

/// A worker's connection: its own, with the session set up and the statements prepared.
pub(super) struct Conn {
    pub(super) client: Client,
    pub(super) first: Statement,
    pub(super) next: Statement,
}

/// Opens the worker's connection. Session settings are safe here: the
/// connection is the worker's alone and is closed when the worker ends.
async fn open(sh: &Shared) -> Result<Conn, db::Error> {
    let client = db::connect(&sh.sx.cx.target).await?;
    client
        .batch_execute(&session_sql(
            sh.sx.lock_timeout,
            sh.sx.statement_timeout,
            sh.settings.target_batch_time,
        ))
        .await?;
    let first = client.prepare(&sh.sql_first).await?;
    let next = client.prepare(&sh.sql_next).await?;
    Ok(Conn {
        client,
        first,
        next,
    })
}

/// The worker session's settings. Values are integers rendered here: nothing
/// from a plan is spliced into this text.
///
/// A generic plan: the batch statement is planned once per connection, not per
/// batch.
///
/// Fixed-size batches commit with `synchronous_commit = off`: a batch does not
/// wait for its commit to reach the disk before the next one starts (20-35 % of
/// a 1,000-row batch on the benchmark's machine). Nothing is lost by it: a batch
/// and its checkpoint are one transaction, so a server crash can only drop a
/// tail of whole batches together with their checkpoints (at most 3 ×
/// wal_writer_delay, 600 ms by default), which resume redoes; and the step's
/// `succeeded` mark, committed synchronously after the last batch, flushes every
/// batch before it. Decoding and streaming replication only ever see flushed
/// WAL. https://www.postgresql.org/docs/current/wal-async-commit.html
///
/// With a target batch time the batches commit as the server, database or role
/// says (synchronously, unless an operator chose otherwise). A batch of tens of
/// milliseconds writes megabytes of WAL and its flush costs it a few percent;
/// left to the WAL writer, those megabytes sit in front of every commit the
/// application makes, and it is the application's commits that then wait
/// (on the benchmark's 10M-row runs, together with [`WRITEBACK_AFTER`], the
/// application's operations slower than 50 ms fell from 66 to 19 per run).
fn session_sql(
    lock_timeout: Duration,
    statement_timeout: Duration,
    target: Option<Duration>,
) -> String {
    let commit = if target.is_some() {
        ""
    } else {
        "; SET synchronous_commit = off"
    };
    format!(
        "SET lock_timeout = '{}ms'; SET statement_timeout = '{}ms'; SET plan_cache_mode = force_generic_plan; SET backend_flush_after = '{WRITEBACK_AFTER}'{commit}",
        lock_timeout.as_millis(),
        statement_timeout.as_millis(),
    )
}

/// A backfill dirties every page of its table once, far more than shared
/// buffers hold, so its backend keeps writing pages out to make room. By default
/// those writes wait in the kernel's page cache until the next checkpoint's
/// fsync, which must then push hundreds of megabytes to the disk at once, and
/// every commit waits behind it. With `backend_flush_after` the kernel is asked
/// to write them back as they go, 256kB at a time. A page the backfill has
/// written out it does not dirty again, so starting its writeback early costs
/// nothing. Any role may set it, on every supported version (0 to 2MB).
/// https://www.postgresql.org/docs/current/runtime-config-resource.html#GUC-BACKEND-FLUSH-AFTER
pub(super) const WRITEBACK_AFTER: &str = "256kB";

/// Why a worker's loop must get a new connection or stop.
enum Interrupt {
    Lost(db::Error),
    Stopped,
    Error(Error),
}

struct WorkerState {
    worker: i32,
    from_start: bool,
    sizer: Sizer,
    /// The operator's batch size last applied.
    pinned: Option<u32>,
    /// The limits in force, and when the overrides they come from were read.
    limits: Limits,
    limits_at: Instant,
    /// A batch found the step paused at this gate tick: wait for a newer one.
    paused_at: Option<u64>,
    /// The WAL insert position when the previous batch on this connection started.
    wal_start: Option<u64>,
}

impl WorkerState {
    /// Applies overrides read at `at`, unless newer ones were applied already.
    fn apply(&mut self, settings: &Settings, ov: &Overrides, at: Instant) {
        if at < self.limits_at {
            return;
        }
        self.limits = settings.limits(ov);
        self.limits_at = at;
        if self.limits.batch_size != self.pinned {
            self.pinned = self.limits.batch_size;
            self.sizer.pin(self.pinned);
        }
    }
}

/// One worker: batches over its range until done, stopped, or failed.
pub async fn work(sh: Arc<Shared>, range: Range) -> Result<End, Error> {
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
    let gate = sh.gate.borrow().clone();
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
        limits: gate.limits.clone(),
        limits_at: gate.at,
        paused_at: None,
        wal_start: None,
    };
    st.apply(&sh.settings, &gate.overrides, gate.at);
    let mut lost = None;
    loop {
        let conn = match lost.take() {
            None => match open(&sh).await {
                Ok(c) => c,
                Err(e) if e.is_connection_lost() => match reconnect(&sh, e).await? {
                    Some(c) => c,
                    None => return Ok(End::Stopped),
                },
                Err(e) => return Err(sh.sx.db_error(e)),
            },
            Some(e) => match reconnect(&sh, e).await? {
                Some(c) => c,
                None => return Ok(End::Stopped),
            },
        };
        match run_worker(&sh, &conn, &mut st).await {
            Ok(end) => return Ok(end),
            Err(Interrupt::Stopped) => return Ok(End::Stopped),
            Err(Interrupt::Error(e)) => return Err(e),
            Err(Interrupt::Lost(e)) => {
                drop(conn);
                lost = Some(e);
            }
        }
    }
}

/// A connection again after `lost`, retrying with backoff for up to
/// `reconnect_timeout`; the worker's checkpoint is read again on it (the truth
/// may differ from memory). `Ok(None)`: stopped while waiting.
async fn reconnect(sh: &Shared, lost: db::Error) -> Result<Option<Conn>, Error> {
    let since = Instant::now();
    let mut last = lost;
    let mut attempt = 0;
    let cx = &sh.sx.cx;
    cx.reporter.message(&format!(
        "step `{}`: lost the connection ({last}); reconnecting for up to {}s",
        sh.name(),
        cx.options.reconnect_timeout.as_secs()
    ));
    loop {
        if since.elapsed() >= cx.options.reconnect_timeout {
            return Err(Error::ConnectionLost {
                step: sh.name().to_string(),
                source: last,
            });
        }
        attempt += 1;
        match sh.sleep(db::backoff(attempt)).await {
            Ok(()) => {}
            Err(Interrupt::Error(e)) => return Err(e),
            Err(_) => return Ok(None),
        }
        match open(sh).await {
            Ok(c) => return Ok(Some(c)),
            Err(e) if e.is_connection_lost() => last = e,
            Err(e) => return Err(sh.sx.db_error(e)),
        }
    }
}

fn classify(sh: &Shared, e: db::Error) -> Interrupt {
    if e.is_connection_lost() {
        Interrupt::Lost(e)
    } else {
        Interrupt::Error(sh.sx.db_error(e))
    }
}

/// The batch loop on one connection; returns on the end of the range or an interruption.
async fn run_worker(sh: &Shared, conn: &Conn, st: &mut WorkerState) -> Result<End, Interrupt> {
    let mut failures = 0u32;
    let mut missed = 0u32;
    // A statement the server never answers is cancelled (and the connection replaced).
    let backstop = sh.sx.statement_timeout + Duration::from_secs(30);
    loop {
        if sh.stop.is_cancelled() {
            return Err(Interrupt::Stopped);
        }
        if sh.fence.lost.is_cancelled() {
            return Err(Interrupt::Error(
                sh.lock_lost("its lock connection is gone"),
            ));
        }
        wait_clear(sh, st).await?;
        let size = st.sizer.size();
        let stmt = if st.from_start {
            &conn.first
        } else {
            &conn.next
        };
        let params = (
            sh.sx.plan.as_str(),
            sh.name(),
            st.worker,
            size as i64,
            sh.fence.epoch,
        );
        let at = Instant::now();
        let mut applied = match batch::apply(&conn.client, stmt, params, backstop).await {
            Ok(Outcome::Applied(a)) => a,
            Ok(Outcome::Paused(ov)) => {
                st.apply(&sh.settings, &ov, at);
                st.paused_at = Some(sh.gate.borrow().tick);
                continue;
            }
            Ok(Outcome::Fenced) => return Err(fenced(sh, &conn.client, st.worker).await),
            Ok(Outcome::Missed(ov)) => {
                st.apply(&sh.settings, &ov, at);
                missed += 1;
                match recheck(sh, &conn.client, st, missed).await? {
                    Some(end) => return Ok(end),
                    None => continue,
                }
            }
            Err(e) if e.is_connection_lost() => return Err(Interrupt::Lost(e)),
            Err(e) if e.is_canceled() || e.is_retryable() => {
                failures += 1;
                retry(sh, &conn.client, st, e, size, failures).await?;
                continue;
            }
            // A row's data failed the batch: find that row (see narrow.rs).
            Err(e) if narrow::is_row_error(&e) && st.pinned.is_none() => {
                match narrow::narrow(sh, conn, e, size, st.worker, st.from_start).await {
                    Ok(narrow::Narrowed::Row(err)) => return Err(Interrupt::Error(err)),
                    Ok(narrow::Narrowed::Passed { done: true, .. }) => return Ok(End::Done),
                    Ok(narrow::Narrowed::Passed { moved, .. }) => st.from_start &= !moved,
                    Err(e) => return Err(classify(sh, e)),
                }
                continue;
            }
            Err(e) => return Err(Interrupt::Error(sh.sx.db_error(e))),
        };
        failures = 0;
        missed = 0;
        if after_batch(sh, st, &mut applied, at) {
            return Ok(End::Done);
        }
        if st.limits.max_wal_rate.is_some() {
            applied.wal_bytes = wal_of_batch(sh, &conn.client, &applied).await?;
        }
        pace(sh, st, &applied).await?;
    }
}

/// Books a committed batch; true when the worker's range is finished.
fn after_batch(sh: &Shared, st: &mut WorkerState, a: &mut Applied, at: Instant) -> bool {
    if a.last_key.is_some() {
        st.from_start = false;
    }
    a.wal_bytes = st
        .wal_start
        .map_or(0, |before| a.wal_start.saturating_sub(before));
    st.wal_start = Some(a.wal_start);
    st.apply(&sh.settings, &a.overrides, at);
    st.sizer.observe(a.picked, a.elapsed);
    sh.rows_done.fetch_add(a.picked, Ordering::Relaxed);
    // Where the WAL is now, about: this batch wrote about as much as the one before.
    sh.wal
        .fetch_max(a.wal_start + a.wal_bytes, Ordering::Relaxed);
    sh.batch_size.store(a.size, Ordering::Relaxed);
    let slowed = sh.slowed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    sh.report(st.worker, st.sizer.size(), slowed, false);
    tracing::debug!(
        step = sh.name(),
        worker = st.worker,
        picked = a.picked,
        wal = a.wal_bytes,
        ms = a.elapsed.as_millis() as u64,
        "batch committed"
    );
    a.done
}

/// The WAL the server wrote while the batch ran, from its start to its commit
/// (the application's, at the same time, included), for the WAL rate cap: one
/// more round trip per batch, only while a cap is in force.
///
/// Not the WAL from one batch's start to the next: that would also count what
/// the application writes during the pause, and an application that alone
/// writes more than the cap would make every pause longer than the one before
/// it, without end, long after it had calmed down.
async fn wal_of_batch(sh: &Shared, c: &Client, a: &Applied) -> Result<u64, Interrupt> {
    match c
        .row(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8",
            &[],
        )
        .await
    {
        Ok(r) => Ok((r.get::<_, i64>(0).max(0) as u64).saturating_sub(a.wal_start)),
        Err(e) => Err(classify(sh, e.into())),
    }
}

/// Waits after a batch as the sleep and the caps ask; a change of the operator's
/// overrides (seen by the coordinator) re-computes the wait at once, so lifting a
/// cap or pausing does not wait for a long pause to run out.
async fn pace(sh: &Shared, st: &mut WorkerState, a: &Applied) -> Result<(), Interrupt> {
    let ended = Instant::now();
    let mut rx = sh.gate.clone();
    rx.borrow_and_update();
    loop {
        let (pause, why) = throttle::pace(a, &st.limits, sh.workers);
        {
            let mut slowed = sh.slowed.lock().unwrap_or_else(|p| p.into_inner());
            if *slowed != why {
                *slowed = why;
            }
        }
        let left = pause.saturating_sub(ended.elapsed());
        if left.is_zero() {
            return Ok(());
        }
        tokio::select! {
            _ = sh.stop.cancelled() => return Err(Interrupt::Stopped),
            _ = sh.fence.lost.cancelled() => return Err(Interrupt::Error(sh.lock_lost("its lock connection is gone"))),
            _ = tokio::time::sleep(left) => return Ok(()),
            changed = rx.changed() => {
                if changed.is_err() {
                    tokio::time::sleep(left).await;
                    return Ok(());
                }
                let g = rx.borrow_and_update().clone();
                st.apply(&sh.settings, &g.overrides, g.at);
                if g.hold.is_some() {
                    return Ok(());
                }
            }
        }
    }
}

/// Waits while anything holds the worker: the coordinator's signals (or their
/// sample growing stale), the slot lag projected with our own batches' WAL, or a
/// pause this worker's last batch found.
async fn wait_clear(sh: &Shared, st: &mut WorkerState) -> Result<(), Interrupt> {
    let mut rx = sh.gate.clone();
    let mut shown: Option<String> = None;
    loop {
        let g = rx.borrow_and_update().clone();
        st.apply(&sh.settings, &g.overrides, g.at);
        let Some(why) = hold_reason(sh, st, &g) else {
            return Ok(());
        };
        if shown.as_deref() != Some(why.as_str()) {
            sh.report(st.worker, st.sizer.size(), Some(why.clone()), true);
            shown = Some(why.clone());
        }
        if g.hold.is_none() {
            *sh.episode.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        }
        tokio::select! {
            _ = sh.stop.cancelled() => return Err(Interrupt::Stopped),
            _ = sh.fence.lost.cancelled() => return Err(Interrupt::Error(sh.lock_lost("its lock connection is gone"))),
            _ = rx.changed() => {}
            _ = tokio::time::sleep(INTERVAL) => {}
        }
    }
}

fn hold_reason(sh: &Shared, st: &mut WorkerState, g: &Gate) -> Option<String> {
    if let Some(tick) = st.paused_at {
        if g.tick <= tick {
            return Some(super::coordinator::PAUSED.to_string());
        }
        st.paused_at = None;
    }
    if let Some(h) = &g.hold {
        return Some(h.clone());
    }
    let age = g.at.elapsed();
    if st.limits.has_signals() && age > 2 * INTERVAL {
        return Some(format!(
            "the throttle signals were last read {:.1}s ago (their sampler is slow or reconnecting); holding until they are read again",
            age.as_secs_f64()
        ));
    }
    if let Some(w) = &g.slot {
        let lag = w.lag(sh.wal.load(Ordering::Relaxed));
        if lag > w.max_lag {
            return Some(w.reason(lag));
        }
    }
    None
}

/// The batch hit a timeout, a deadlock or a serialization failure: wait and retry,
/// smaller after a timeout. Errors out after the step's retries.
async fn retry(
    sh: &Shared,
    client: &Client,
    st: &mut WorkerState,
    e: db::Error,
    size: u32,
    failures: u32,
) -> Result<(), Interrupt> {
    if failures > sh.sx.retries {
        return Err(Interrupt::Error(narrow::gave_up(sh, e, failures, size)));
    }
    // A timeout says the batch is too big for the moment; a deadlock or
    // serialization failure just needs another try.
    if e.is_canceled() || e.sqlstate() == Some("55P03") {
        st.sizer.shrink();
    }
    let wait = db::backoff(failures);
    sh.sx.cx.reporter.message(&format!(
        "step `{}`: batch of {size} rows failed ({e}); retry {failures} of {} in {}ms with {} rows",
        sh.name(),
        sh.sx.retries,
        wait.as_millis(),
        st.sizer.size()
    ));
    let retry = Event::BatchRetry {
        worker: st.worker,
        sqlstate: e.sqlstate().map(str::to_string),
        error: e.to_string(),
        attempt: failures,
        batch_size: size,
        next_batch_size: st.sizer.size(),
    };
    sh.event(client, &retry).await;
    sh.sleep(wait).await
}

/// A newer run owns the plan or this range: record it, and stop for good.
async fn fenced(sh: &Shared, client: &Client, worker: i32) -> Interrupt {
    let event = Event::BackfillFenced {
        worker,
        epoch: sh.fence.epoch,
    };
    sh.event(client, &event).await;
    Interrupt::Error(sh.lock_lost("another runner took the plan over"))
}

/// The statement applied nothing and the step is not paused: read the worker's range.
/// `Some(Done)` when it is finished; `None` to continue with the right form.
async fn recheck(
    sh: &Shared,
    client: &Client,
    st: &mut WorkerState,
    missed: u32,
) -> Result<Option<End>, Interrupt> {
    let row = client
        .row_opt(
            &sh.sx.cx.control.sql(
                "SELECT last_key, done, epoch FROM __SCHEMA__.backfill_ranges WHERE plan_id = $1 AND step = $2 AND worker = $3",
            ),
            &[&sh.sx.plan, &sh.name(), &st.worker],
        )
        .await
        .map_err(|e| classify(sh, e.into()))?;
    let Some(row) = row else {
        return Err(Interrupt::Error(sh.lock_lost(
            "its range is gone from the control table (the step was rolled back or reset)",
        )));
    };
    let (last, done, epoch): (Option<Json>, bool, i64) = (row.get(0), row.get(1), row.get(2));
    if done {
        return Ok(Some(End::Done));
    }
    if epoch != sh.fence.epoch {
        return Err(fenced(sh, client, st.worker).await);
    }
    if missed > 2 {
        return Err(Interrupt::Error(Error::Internal {
            step: sh.name().to_string(),
            message: format!(
                "worker {}'s batch applied nothing three times in a row although its range is not done (checkpoint {last:?})",
                st.worker
            ),
        }));
    }
    st.from_start = last.is_none();
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_commit_asynchronously_only_without_a_target_batch_time() {
        let ms = Duration::from_millis;
        let fixed = session_sql(ms(2000), ms(30000), None);
        assert!(fixed.contains("SET synchronous_commit = off"), "{fixed}");
        assert!(fixed.contains("SET lock_timeout = '2000ms'"), "{fixed}");
        assert!(
            fixed.contains("SET statement_timeout = '30000ms'"),
            "{fixed}"
        );
        assert!(fixed.contains("force_generic_plan"), "{fixed}");
        assert!(
            fixed.contains("SET backend_flush_after = '256kB'"),
            "{fixed}"
        );
        let adaptive = session_sql(ms(2000), ms(30000), Some(ms(50)));
        // Under a target, the server's own setting (on by default, or the operator's choice).
        assert!(!adaptive.contains("synchronous_commit"), "{adaptive}");
        assert!(adaptive.contains("force_generic_plan"), "{adaptive}");
    }
}
