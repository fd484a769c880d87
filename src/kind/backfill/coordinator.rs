//! The step's coordinator: one task per backfill step, on a connection of its
//! own, that every [`INTERVAL`] reads the operator's overrides, samples the
//! signals in force, and publishes the result (the [`Gate`]) to the workers,
//! which read it from memory. About once a second it writes the step's totals,
//! derived from the workers' ranges, and its progress (rate over a moving
//! window, ETA, throttle reason) to the step's row, for `status`: the only
//! writer of that row while the backfill runs. It records the hold and release
//! of the backfill and the overrides it applies in the events log.
//!
//! When it cannot read (its connection is lost, a query hangs) it publishes
//! nothing, the workers see the sample age, and past two intervals they hold:
//! the backfill fails closed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio::sync::watch;
use tokio_postgres::Client;

use super::checkpoints;
use super::signals::{self, SlotWatch};
use super::throttle::Limits;
use super::worker::{Figures, Shared};
use crate::control::{Event, LiveProgress, Overrides};
use crate::db::{self, OneTrip};

/// How often the signals are sampled; a sample older than two intervals holds.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// The hold reason of an operator's pause.
pub const PAUSED: &str = "paused by operator (pgshift throttle PLAN --unpause to continue)";

/// How long the rate is averaged over.
const WINDOW: Duration = Duration::from_secs(10);

/// What the coordinator last sampled, as the workers read it.
#[derive(Debug, Clone)]
pub struct Gate {
    /// Increases with every sample.
    pub tick: u64,
    /// When the sample was taken: its age is how stale it is.
    pub at: Instant,
    pub overrides: Overrides,
    pub limits: Limits,
    /// Why every worker must hold, if they must.
    pub hold: Option<String>,
    pub slot: Option<SlotWatch>,
}

/// The coordinator's state between ticks.
pub struct Coordinator {
    sh: Arc<Shared>,
    tx: watch::Sender<Gate>,
    conn: Option<Client>,
    tick: u64,
    seen: Option<Overrides>,
    held: Option<String>,
    rates: VecDeque<(Instant, u64)>,
    started: (Instant, u64),
    checkpoints: checkpoints::Watch,
}

/// Ticks between two readings of the server's checkpoint count.
const CHECKPOINT_TICKS: u64 = 4;

impl Gate {
    /// The gate before the first sample: as old as can be, so it holds if signals are in force.
    pub fn channel(limits: Limits) -> (watch::Sender<Gate>, watch::Receiver<Gate>) {
        let now = Instant::now();
        watch::channel(Gate {
            tick: 0,
            at: now.checked_sub(Duration::from_secs(3600)).unwrap_or(now),
            overrides: Overrides::default(),
            limits,
            hold: None,
            slot: None,
        })
    }
}

/// What a tick does with the step's row.
enum Write<'a> {
    /// Only read the operator's overrides.
    Read,
    /// Write the totals and this progress.
    Progress(&'a LiveProgress),
    /// Write the totals; the step is no longer running (no progress).
    Final,
}

impl Coordinator {
    /// The coordinator, after its first sample (taken before any worker starts).
    pub async fn start(sh: Arc<Shared>, tx: watch::Sender<Gate>) -> Coordinator {
        let started = sh.started;
        let mut c = Coordinator {
            sh,
            tx,
            conn: None,
            tick: 0,
            seen: None,
            held: None,
            rates: VecDeque::new(),
            started,
            checkpoints: checkpoints::Watch::default(),
        };
        c.sample().await;
        c
    }

    /// Samples every [`INTERVAL`] until `done`, then writes the final totals.
    pub async fn run(mut self, done: tokio_util::sync::CancellationToken) {
        let mut every = tokio::time::interval(INTERVAL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = done.cancelled() => break,
                _ = every.tick() => {}
            }
            self.sample().await;
        }
        self.finish().await;
    }

    async fn connect(&mut self) -> Option<&Client> {
        if self.conn.as_ref().is_some_and(|c| c.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            let sx = &self.sh.sx;
            let c = db::connect(&sx.cx.target).await.ok()?;
            // A signal query that hangs must not keep the sample from going stale for long.
            let limit = sx.statement_timeout.min(Duration::from_secs(30));
            let set = format!(
                "SET statement_timeout = '{}ms'; SET lock_timeout = '{}ms'",
                limit.as_millis(),
                limit.as_millis()
            );
            c.batch_execute(&set).await.ok()?;
            self.conn = Some(c);
        }
        self.conn.as_ref()
    }

    /// One tick: overrides (and, every other tick, the totals), the signals, the gate.
    async fn sample(&mut self) {
        self.tick += 1;
        let at = Instant::now();
        self.window(at);
        let progress = self.progress();
        let write = if self.tick % 2 == 1 {
            Write::Progress(&progress)
        } else {
            Write::Read
        };
        let sh = self.sh.clone();
        let Some(c) = self.connect().await else {
            return;
        };
        let ov = match totals(&sh, c, write).await {
            Ok(ov) => ov,
            Err(e) => {
                tracing::debug!(step = sh.name(), "coordinator: {e}");
                self.conn = None;
                return;
            }
        };
        let limits = sh.settings.limits(&ov);
        let wal = sh.wal.load(Ordering::Relaxed);
        let sample = if limits.has_signals() {
            match signals::sample(c, &limits, &sh.spec.table, wal).await {
                Ok(s) => s,
                Err(_) => {
                    self.conn = None;
                    return;
                }
            }
        } else {
            signals::Sample::default()
        };
        let hold = if limits.paused {
            Some(PAUSED.to_string())
        } else {
            sample.hold
        };
        self.tx.send_replace(Gate {
            tick: self.tick,
            at,
            overrides: ov.clone(),
            limits,
            hold: hold.clone(),
            slot: sample.slot,
        });
        // A worker held between two samples (its own projection of a slot's lag, or a
        // stale sample): the log and `status` say so too, though the gate does not.
        let episode = sh.episode.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.record_changes(ov, hold.or(episode)).await;
        if self.tick % CHECKPOINT_TICKS == 1 {
            self.watch_checkpoints().await;
        }
    }

    /// Says once when the server's checkpoints come close together (see
    /// `checkpoints.rs`). Advice only: a failure to read is logged, nothing holds.
    async fn watch_checkpoints(&mut self) {
        let sh = self.sh.clone();
        let Some(c) = self.conn.as_ref() else { return };
        match self.checkpoints.check(c).await {
            Ok(Some(p)) => {
                sh.sx.cx.reporter.message(&p.advice(sh.name(), &sh.sx.plan));
                let event = Event::CheckpointPressure {
                    checkpoints: p.checkpoints,
                    seconds: p.over.as_secs(),
                    max_wal_size: p.max_wal_size.clone(),
                };
                sh.event(c, &event).await;
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(step = sh.name(), "cannot read the checkpoint count: {e}"),
        }
    }

    /// Logs the overrides once when they change, and the hold and release of the backfill.
    async fn record_changes(&mut self, ov: Overrides, hold: Option<String>) {
        let sh = self.sh.clone();
        let first = self.seen.is_none();
        let changed = self.seen.as_ref() != Some(&ov) && !(first && ov.is_empty());
        self.seen = Some(ov.clone());
        let mut events = Vec::new();
        if changed {
            let said = if ov.is_empty() {
                "none (cleared)".to_string()
            } else {
                ov.describe()
            };
            sh.sx.cx.reporter.message(&format!(
                "step `{}`: operator overrides in force: {said}",
                sh.name()
            ));
            events.push(Event::OverrideApplied(ov));
        }
        let kind = |w: &Option<String>| w.as_deref().map(hold_kind);
        if kind(&hold) != kind(&self.held) {
            if let Some(was) = self.held.take() {
                events.push(Event::ThrottleReleased { worker: None, was });
            }
            if let Some(why) = &hold {
                sh.sx
                    .cx
                    .reporter
                    .message(&format!("step `{}`: holding: {why}", sh.name()));
                events.push(Event::ThrottleHold {
                    worker: None,
                    reason: why.clone(),
                });
            }
        }
        self.held = hold.clone();
        if let Some(why) = hold.filter(|_| self.tx.borrow().hold.is_some()) {
            sh.report(0, sh.batch_size.load(Ordering::Relaxed), Some(why), true);
        }
        if let Some(c) = self.conn.as_ref() {
            for e in &events {
                sh.event(c, e).await;
            }
        }
    }

    /// Moves the rate window on to `now` and recomputes the rate and ETA.
    fn window(&mut self, now: Instant) {
        let sh = &self.sh;
        let done = sh.rows_done.load(Ordering::Relaxed);
        self.rates.push_back((now, done));
        while self
            .rates
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
        {
            self.rates.pop_front();
        }
        let (t0, d0) = match self.rates.front() {
            Some(&(t, d)) if now.duration_since(t) >= Duration::from_secs(1) => (t, d),
            // Less than a second of window yet: since the run started.
            _ => self.started,
        };
        let secs = now.duration_since(t0).as_secs_f64();
        let rate = if secs > 0.0 {
            done.saturating_sub(d0) as f64 / secs
        } else {
            0.0
        };
        let cap = self.tx.borrow().limits.max_rows_per_sec;
        let eta = eta(sh.rows_total, done, rate, cap);
        *sh.figures.lock().unwrap_or_else(|p| p.into_inner()) = Figures {
            rows_per_sec: rate,
            eta,
        };
    }

    fn progress(&self) -> LiveProgress {
        let sh = &self.sh;
        let f = *sh.figures.lock().unwrap_or_else(|p| p.into_inner());
        let held = self.held.is_some();
        let throttled = self
            .held
            .clone()
            .or_else(|| sh.slowed.lock().unwrap_or_else(|p| p.into_inner()).clone());
        LiveProgress {
            rows_per_sec: f.rows_per_sec,
            eta_secs: f.eta.filter(|_| !held).map(|d| d.as_secs()),
            batch_size: sh.batch_size.load(Ordering::Relaxed),
            workers: sh.workers,
            throttled,
            held,
            at: None,
        }
    }

    /// The step's final totals from its ranges, and no live progress any more.
    async fn finish(mut self) {
        let sh = self.sh.clone();
        let ov = match self.connect().await {
            Some(c) => totals(&sh, c, Write::Final).await.ok(),
            None => None,
        };
        if ov.is_none() {
            // The coordinator's own connection is gone: one try on a pooled one.
            if let Ok(c) = db::get(&sh.sx.cx.pool, &sh.sx.cx.target).await {
                let _ = totals(&sh, &**c, Write::Final).await;
            }
        }
        if let Some(ov) = ov {
            // The run is over: nothing holds it any more.
            self.record_changes(ov, None).await;
        }
    }
}

/// Writes the step's totals from its ranges and its progress, as `write` says;
/// returns the operator's overrides.
async fn totals(
    sh: &Shared,
    c: &impl tokio_postgres::GenericClient,
    write: Write<'_>,
) -> Result<Overrides, db::Error> {
    let ctl = &sh.sx.cx.control;
    let live: Option<Json> = match write {
        Write::Read => {
            let row = c
                .row(
                    &ctl.sql(
                        "SELECT overrides FROM __SCHEMA__.steps WHERE plan_id = $1 AND name = $2",
                    ),
                    &[&sh.sx.plan, &sh.name()],
                )
                .await?;
            return Ok(Overrides::from_json(&row.get::<_, Json>(0)));
        }
        Write::Progress(p) => Some(serde_json::to_value(p).unwrap_or(Json::Null)),
        Write::Final => None,
    };
    let row = c
        .row(
            &ctl.sql(
                "UPDATE __SCHEMA__.steps AS s
                 SET rows_done = t.done,
                     progress = $3::jsonb || jsonb_build_object('at', now())
                 FROM (SELECT coalesce(sum(rows_done), 0)::int8 AS done
                       FROM __SCHEMA__.backfill_ranges WHERE plan_id = $1 AND step = $2) AS t
                 WHERE s.plan_id = $1 AND s.name = $2
                 RETURNING s.overrides",
            ),
            &[&sh.sx.plan, &sh.name(), &live],
        )
        .await?;
    Ok(Overrides::from_json(&row.get::<_, Json>(0)))
}

/// Time left at `rate` rows/s, never sooner than the rows/s cap allows.
pub fn eta(total: Option<u64>, done: u64, rate: f64, cap: Option<u32>) -> Option<Duration> {
    let left = total?.saturating_sub(done);
    let rate = match cap {
        Some(c) if c > 0 => rate.min(c as f64),
        _ => rate,
    };
    (rate > 0.0).then(|| Duration::from_secs_f64(left as f64 / rate))
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
    use super::*;

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

    #[test]
    fn the_eta_never_beats_the_rate_cap() {
        // 860,000 rows left; a burst measured 6,340 rows/s, but the cap is 100 rows/s.
        let e = eta(Some(1_000_000), 140_000, 6340.0, Some(100)).unwrap();
        assert_eq!(crate::duration::human(e), "2h23m");
        assert_eq!(eta(Some(1000), 0, 0.0, None), None);
        assert_eq!(eta(None, 0, 10.0, None), None);
        assert_eq!(
            eta(Some(1000), 500, 100.0, None),
            Some(Duration::from_secs(5))
        );
    }
}
