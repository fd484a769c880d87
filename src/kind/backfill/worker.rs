//! The workers of a backfill: each runs batches over its own key range on a
//! connection of its own, reads the operator's live overrides and the throttle
//! signals between batches, reconnects after a lost connection, and stops
//! between batches when cancelled.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio_postgres::GenericClient;
use tokio_util::sync::CancellationToken;

use super::BackfillSpec;
use super::batch;
use super::narrow;
use super::ranges::{Range, Settings};
use super::throttle::{self, ReadError, Signal, Sizer};
use crate::control::{Event, Overrides};
use crate::db;
use crate::engine::{BackfillProgress, Error, StepCx};

/// What the workers of one run share.
pub struct Shared {
    pub sx: StepCx,
    pub spec: BackfillSpec,
    pub sql_first: String,
    pub sql_next: String,
    /// Cancelled by the operator's token, or by the first worker that fails.
    pub stop: CancellationToken,
    pub workers: u32,
    pub rows_done: AtomicU64,
    pub rows_at_start: u64,
    pub rows_total: Option<u64>,
    pub started: Instant,
    pub settings: Settings,
    /// The overrides last seen by any worker, so a change is logged once.
    pub live: Mutex<Option<Overrides>>,
    pub signals: Vec<Signal>,
}

/// How a worker ended without an error.
pub enum End {
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
    pub fn name(&self) -> &str {
        &self.sx.step
    }

    fn db_error(&self, e: db::Error) -> Error {
        self.sx.db_error(e)
    }

    /// Records `event` on `c`; a failure is only logged (it must not stop the batches).
    pub async fn event(&self, c: &impl GenericClient, event: &Event) {
        if let Err(e) = self.sx.record(c, event).await {
            tracing::warn!(step = self.name(), "cannot record an event: {e}");
        }
    }

    /// Applies the operator's live overrides over the run's settings; logs a change once.
    async fn overrides(&self, c: &impl GenericClient) -> Result<Live, db::Error> {
        let ov = self
            .sx
            .cx
            .control
            .overrides(c, &self.sx.plan, self.name())
            .await?;
        let changed = {
            let mut seen = self.live.lock().unwrap_or_else(|p| p.into_inner());
            let changed = seen.as_ref() != Some(&ov);
            let first = seen.is_none();
            *seen = Some(ov.clone());
            // Overrides already present at start are applied too, and said once.
            changed && !(first && ov.is_empty())
        };
        if changed {
            self.sx.cx.reporter.message(&format!(
                "step `{}`: operator overrides applied: {}",
                self.name(),
                ov.to_json()
            ));
            self.event(c, &Event::OverrideApplied(ov.clone())).await;
        }
        Ok(Live {
            paused: ov.paused.unwrap_or(false),
            batch_size: ov
                .batch_size
                .filter(|n| *n > 0)
                .map(|n| n.min(crate::plan::defaults::BATCH_SIZE_LIMIT)),
            sleep: ov
                .sleep_ms
                .map(Duration::from_millis)
                .unwrap_or(self.settings.sleep),
            max_rows_per_sec: match ov.max_rows_per_sec {
                Some(0) => None,
                Some(n) => Some(n),
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
        self.sx.cx.reporter.backfill(
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
    async fn reconnect(&self, lost: db::Error) -> Result<Option<deadpool_postgres::Object>, Error> {
        let since = Instant::now();
        let mut last = lost;
        let mut attempt = 0;
        let cx = &self.sx.cx;
        cx.reporter.message(&format!(
            "step `{}`: lost the connection ({last}); reconnecting for up to {}s",
            self.name(),
            cx.options.reconnect_timeout.as_secs()
        ));
        loop {
            if since.elapsed() >= cx.options.reconnect_timeout {
                return Err(Error::ConnectionLost {
                    step: self.name().to_string(),
                    source: last,
                });
            }
            attempt += 1;
            if !self.sleep(db::backoff(attempt)).await {
                return Ok(None);
            }
            match db::get(&cx.pool, &cx.target).await {
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
                &self.sx.cx.control.sql(
                    "SELECT last_key, done FROM __SCHEMA__.backfill_ranges WHERE plan_id = $1 AND step = $2 AND worker = $3",
                ),
                &[&self.sx.plan, &self.name(), &worker],
            )
            .await?;
        Ok((r.get(0), r.get(1)))
    }
}

/// Why a worker's loop must get a new connection or stop.
enum Interrupt {
    Lost(db::Error),
    Stopped,
    Error(Error),
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
    let mut conn = match db::get(&sh.sx.cx.pool, &sh.sx.cx.target).await {
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
            (sh.sx.lock_timeout, sh.sx.statement_timeout),
            (&sh.sx.plan, sh.name(), st.worker, size as i64),
        )
        .await;
        let applied = match result {
            Ok(a) => a,
            Err(e) if e.is_connection_lost() => return Err(Interrupt::Lost(e)),
            Err(e) if e.is_canceled() || e.is_retryable() => {
                timeouts += 1;
                if timeouts > sh.sx.retries {
                    return Err(Interrupt::Error(narrow::gave_up(sh, e, timeouts, size)));
                }
                // A timeout says the batch is too big for the moment; a deadlock or
                // serialization failure just needs another try.
                let timed_out = e.is_canceled() || e.sqlstate() == Some("55P03");
                if timed_out {
                    st.sizer.shrink();
                }
                let wait = db::backoff(timeouts);
                sh.sx.cx.reporter.message(&format!(
                    "step `{}`: batch of {size} rows failed ({e}); retry {timeouts} of {} in {}ms with {} rows",
                    sh.name(),
                    sh.sx.retries,
                    wait.as_millis(),
                    st.sizer.size()
                ));
                let retry = Event::BatchRetry {
                    worker: st.worker,
                    sqlstate: e.sqlstate().map(str::to_string),
                    error: e.to_string(),
                    attempt: timeouts,
                    batch_size: size,
                    next_batch_size: st.sizer.size(),
                };
                sh.event(client, &retry).await;
                if !sh.sleep(wait).await {
                    return Err(Interrupt::Stopped);
                }
                continue;
            }
            // A row's data failed the batch: find that row (see narrow.rs).
            Err(e) if narrow::is_row_error(&e) => {
                match narrow::narrow(sh, conn, e, size, st.worker, st.from_start).await {
                    Ok(narrow::Narrowed::Row(err)) => return Err(Interrupt::Error(err)),
                    Ok(narrow::Narrowed::Passed { done: true, .. }) => return Ok(End::Done),
                    Ok(narrow::Narrowed::Passed { moved, .. }) => st.from_start &= !moved,
                    Err(e) => return Err(classify(sh, e)),
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
                    let released = Event::ThrottleReleased {
                        worker: st.worker,
                        was,
                    };
                    sh.event(client, &released).await;
                }
                return Ok(live);
            }
            Some(why) => {
                if st.held.as_deref().map(hold_kind) != Some(hold_kind(&why)) {
                    sh.sx.cx.reporter.message(&format!(
                        "step `{}` worker {}: holding: {why}",
                        sh.name(),
                        st.worker
                    ));
                    let hold = Event::ThrottleHold {
                        worker: st.worker,
                        reason: why.clone(),
                    };
                    sh.event(client, &hold).await;
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
