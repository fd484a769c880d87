//! How fast a backfill may go: the settings a run starts with (the plan's, under
//! the command line's), the limits in force for each batch (those settings under
//! the operator's live overrides), the batch size (fixed, or adapted toward a
//! target batch time), and the pause after each batch (a fixed sleep, a rows/s
//! cap, a WAL rate cap). The signals that hold a backfill are in `signals.rs`.

use std::time::Duration;

use super::batch::Applied;
use super::spec::{BackfillSpec, Throttle};
use crate::control::Overrides;
use crate::engine::StepCx;

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
    /// The operator gave `--workers` (only a step's first run can use it).
    pub workers_from_cli: bool,
    /// The plan's throttle (its signals are not on the command line).
    pub plan: Throttle,
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
            workers_from_cli: cli(o.workers).is_some(),
            plan: spec.throttle.clone(),
        }
    }

    /// The limits in force under the operator's live overrides `ov`.
    pub fn limits(&self, ov: &Overrides) -> Limits {
        let t = &self.plan;
        // `0` in an override lifts the plan's limit.
        let lift = |o: Option<u64>, plan: Option<u64>| match o {
            Some(0) => None,
            Some(n) => Some(n),
            None => plan,
        };
        let slot = lift(ov.max_slot_lag, t.max_slot_lag).map(|max_lag| SlotLimit {
            max_lag,
            slots: ov.slots.clone().unwrap_or_else(|| t.slots.clone()),
            ignore_inactive: ov.ignore_inactive_slots.unwrap_or(t.ignore_inactive_slots),
        });
        Limits {
            paused: ov.paused.unwrap_or(false),
            batch_size: ov
                .batch_size
                .filter(|n| *n > 0)
                .map(|n| n.min(crate::plan::defaults::BATCH_SIZE_LIMIT)),
            sleep: ov.sleep_ms.map(Duration::from_millis).unwrap_or(self.sleep),
            max_rows_per_sec: lift(
                ov.max_rows_per_sec.map(u64::from),
                self.max_rows_per_sec.map(u64::from),
            )
            .map(|n| n.min(u32::MAX as u64) as u32),
            max_wal_rate: lift(ov.max_wal_rate, t.max_wal_rate),
            slot,
            autovacuum: ov.pause_on_autovacuum.unwrap_or(t.pause_on_autovacuum),
            replica_lag: t.max_replica_lag,
            throttle_query: t.throttle_query.clone(),
        }
    }
}

/// The limits in force for the next batch: the run's settings under the live overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub paused: bool,
    /// The operator's batch size (adaptation stops while it is set).
    pub batch_size: Option<u32>,
    pub sleep: Duration,
    pub max_rows_per_sec: Option<u32>,
    /// Bytes of WAL per second.
    pub max_wal_rate: Option<u64>,
    pub slot: Option<SlotLimit>,
    /// Hold during an anti-wraparound autovacuum of the table.
    pub autovacuum: bool,
    pub replica_lag: Option<Duration>,
    pub throttle_query: Option<String>,
}

impl Limits {
    /// Some signal must be sampled (and so a stale sample holds the backfill).
    pub fn has_signals(&self) -> bool {
        self.slot.is_some()
            || self.autovacuum
            || self.replica_lag.is_some()
            || self.throttle_query.is_some()
    }
}

/// What `max_slot_lag` watches.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotLimit {
    /// Bytes.
    pub max_lag: u64,
    /// Empty: every logical slot.
    pub slots: Vec<String>,
    pub ignore_inactive: bool,
}

/// The batch size in use, and how it adapts.
#[derive(Debug, Clone)]
pub struct Sizer {
    size: u32,
    min: u32,
    max: u32,
    target: Option<Duration>,
    /// Smoothed seconds per row of recent batches.
    per_row: Option<f64>,
    /// An operator set the size live (adaptation stops until the override is
    /// removed): the size in use before.
    before_pin: Option<u32>,
}

/// Weight of the newest batch in the moving average of time per row.
const EWMA_WEIGHT: f64 = 0.3;
/// The most the size may shrink or grow from one batch to the next.
const MIN_FACTOR: f64 = 0.5;
const MAX_FACTOR: f64 = 2.0;

impl Sizer {
    pub fn new(size: u32, min: u32, max: u32, target: Option<Duration>) -> Sizer {
        let min = min.max(1);
        let max = max.max(min);
        Sizer {
            size: size.clamp(min, max),
            min,
            max,
            target,
            per_row: None,
            before_pin: None,
        }
    }

    /// The size of the next batch.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// An operator's size (`pgshift throttle --batch-size`); `None` lifts the pin
    /// and returns to the size in use before it (the plan's, or where adaptation was).
    pub fn pin(&mut self, size: Option<u32>) {
        match size {
            Some(n) => {
                if self.before_pin.is_none() {
                    self.before_pin = Some(self.size);
                }
                self.size = n.max(1);
            }
            None => {
                if let Some(s) = self.before_pin.take() {
                    self.size = s;
                }
            }
        }
    }

    /// Learns from a committed batch: moves the size toward the target batch time,
    /// by at most ×0.5..×2 per batch (it reaches the size that meets the target within a few batches), within [min, max].
    pub fn observe(&mut self, rows: u64, elapsed: Duration) {
        let Some(target) = self.target else { return };
        if rows == 0 {
            return;
        }
        let sample = elapsed.as_secs_f64() / rows as f64;
        let per_row = match self.per_row {
            Some(avg) => avg + EWMA_WEIGHT * (sample - avg),
            None => sample,
        };
        self.per_row = Some(per_row);
        if self.before_pin.is_some() || per_row <= 0.0 {
            return;
        }
        let ideal = target.as_secs_f64() / per_row;
        let current = self.size as f64;
        let next = ideal.clamp(current * MIN_FACTOR, current * MAX_FACTOR);
        self.size = (next.round() as u32).clamp(self.min, self.max);
    }

    /// A batch hit a timeout: halve the size (not below the minimum, nor below 1 when pinned).
    /// Returns false when it cannot get any smaller.
    pub fn shrink(&mut self) -> bool {
        let floor = if self.before_pin.is_some() {
            1
        } else {
            self.min
        };
        let next = (self.size / 2).max(floor);
        let shrunk = next < self.size;
        self.size = next;
        shrunk
    }
}

/// How long to wait after a batch, and why when a cap (not the plain sleep) sets
/// the pause: the rows/s cap or the WAL rate cap, each this worker's share of it.
pub fn pace(a: &Applied, limits: &Limits, workers: u32) -> (Duration, Option<String>) {
    let rows = pause_after(
        a.picked,
        a.elapsed,
        Duration::ZERO,
        limits.max_rows_per_sec,
        workers,
    );
    let wal = match limits.max_wal_rate {
        Some(rate) if rate > 0 => {
            let share = rate as f64 / workers.max(1) as f64;
            Duration::from_secs_f64(a.wal_bytes as f64 / share).saturating_sub(a.elapsed)
        }
        _ => Duration::ZERO,
    };
    let pause = limits.sleep.max(rows).max(wal);
    let why = if pause.is_zero() || pause == limits.sleep {
        None
    } else if wal >= rows {
        limits
            .max_wal_rate
            .map(|r| format!("WAL rate cap {}/s (max_wal_rate)", crate::bytes::format(r)))
    } else {
        limits
            .max_rows_per_sec
            .map(|r| format!("rate cap {r} rows/s (max_rows_per_sec)"))
    };
    (pause, why)
}

/// How long to wait after a batch of `rows` that took `elapsed`: the fixed sleep,
/// or longer when the rows/s cap (this worker's share of it) demands.
pub fn pause_after(
    rows: u64,
    elapsed: Duration,
    sleep: Duration,
    max_rows_per_sec: Option<u32>,
    workers: u32,
) -> Duration {
    let paced = match max_rows_per_sec {
        Some(rate) if rate > 0 => {
            let share = rate as f64 / workers.max(1) as f64;
            let needed = Duration::from_secs_f64(rows as f64 / share);
            needed.saturating_sub(elapsed)
        }
        _ => Duration::ZERO,
    };
    sleep.max(paced)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_moves_toward_target_by_bounded_steps() {
        let mut s = Sizer::new(1000, 100, 50_000, Some(Duration::from_millis(100)));
        // 1000 rows in 1 s: ideal is 100 rows, but one step may only halve.
        s.observe(1000, Duration::from_secs(1));
        assert_eq!(s.size(), 500);
        // Fast batches at most double it.
        let mut f = Sizer::new(1000, 100, 50_000, Some(Duration::from_millis(100)));
        f.observe(1000, Duration::from_millis(1));
        assert_eq!(f.size(), 2000);
        // Never past the bounds.
        let mut b = Sizer::new(120, 100, 50_000, Some(Duration::from_millis(100)));
        b.observe(120, Duration::from_secs(10));
        assert_eq!(b.size(), 100);
    }

    #[test]
    fn without_a_target_or_when_pinned_the_size_stays() {
        let mut s = Sizer::new(1000, 100, 50_000, None);
        s.observe(1000, Duration::from_secs(5));
        assert_eq!(s.size(), 1000);
        let mut p = Sizer::new(1000, 100, 50_000, Some(Duration::from_millis(10)));
        p.pin(Some(700));
        p.observe(700, Duration::from_secs(5));
        assert_eq!(p.size(), 700);
        // Lifting the pin returns to the size in use before it.
        p.pin(Some(300));
        p.pin(None);
        assert_eq!(p.size(), 1000);
    }

    #[test]
    fn shrinking_halves_down_to_the_floor() {
        let mut s = Sizer::new(1000, 300, 5000, None);
        assert!(s.shrink());
        assert_eq!(s.size(), 500);
        assert!(s.shrink());
        assert_eq!(s.size(), 300);
        assert!(!s.shrink());
    }

    #[test]
    fn rate_cap_is_shared_among_workers_and_never_shorter_than_sleep() {
        let d = pause_after(
            1000,
            Duration::from_millis(100),
            Duration::ZERO,
            Some(2000),
            2,
        );
        assert_eq!(d, Duration::from_millis(900));
        let d = pause_after(
            1000,
            Duration::from_secs(2),
            Duration::from_millis(20),
            Some(2000),
            1,
        );
        assert_eq!(d, Duration::from_millis(20));
        assert_eq!(
            pause_after(1, Duration::ZERO, Duration::from_millis(5), None, 1),
            Duration::from_millis(5)
        );
    }
}
