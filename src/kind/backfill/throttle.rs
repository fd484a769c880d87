//! How fast a backfill may go: the batch size (fixed, or adapted toward a
//! target batch time), the pause between batches (a fixed sleep and a rows/s
//! cap), and the signals that hold it (replica lag, the plan's throttle query).
//!
//! Signals fail closed: a signal that cannot be read holds the backfill, with
//! the reason, exactly like a signal that says "slow down". A backfill that
//! keeps writing while its brakes are unreadable is the one failure mode this
//! module exists to prevent.

use std::time::Duration;

use tokio_postgres::Client;

use crate::db;

/// The batch size in use, and how it adapts.
#[derive(Debug, Clone)]
pub struct Sizer {
    size: u32,
    min: u32,
    max: u32,
    target: Option<Duration>,
    /// Smoothed seconds per row of recent batches.
    per_row: Option<f64>,
    /// An operator set the size live: adaptation stops until the override is removed.
    pinned: bool,
}

/// Weight of the newest batch in the moving average of time per row.
const EWMA_WEIGHT: f64 = 0.3;
/// The most the size may shrink or grow from one batch to the next.
const MIN_FACTOR: f64 = 0.5;
const MAX_FACTOR: f64 = 1.5;

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
            pinned: false,
        }
    }

    /// The size of the next batch.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// An operator's size (`pgshift throttle --batch-size`); `None` lifts the pin.
    pub fn pin(&mut self, size: Option<u32>) {
        match size {
            Some(n) => {
                self.size = n.max(1);
                self.pinned = true;
            }
            None => self.pinned = false,
        }
    }

    /// Learns from a committed batch: moves the size toward the target batch time,
    /// by at most ×0.5..×1.5 per batch, within [min, max].
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
        if self.pinned || per_row <= 0.0 {
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
        let floor = if self.pinned { 1 } else { self.min };
        let next = (self.size / 2).max(floor);
        let shrunk = next < self.size;
        self.size = next;
        shrunk
    }
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

/// A signal read before every batch that may hold the backfill.
#[derive(Debug, Clone)]
pub enum Signal {
    /// Hold while any replica replays further behind than this.
    ReplicaLag(Duration),
    /// Hold while the plan's query returns true.
    Query(String),
}

impl Signal {
    /// `Ok(None)`: go. `Ok(Some(reason))`: hold. `Err(reason)`: the signal cannot be read,
    /// which the caller treats as hold (fail closed).
    pub async fn check(&self, client: &Client) -> Result<Option<String>, ReadError> {
        match self {
            Signal::ReplicaLag(max) => replica_lag(client, *max).await,
            Signal::Query(sql) => {
                let row = client
                    .query_opt(sql.as_str(), &[])
                    .await
                    .map_err(|e| ReadError::from_db("throttle_query", e.into()))?;
                let value = row
                    .map(|r| r.try_get::<_, Option<bool>>(0))
                    .transpose()
                    .map_err(|e| {
                        ReadError::Unreadable(format!(
                            "throttle_query must return one boolean column: {e}"
                        ))
                    })?
                    .flatten();
                match value {
                    Some(false) => Ok(None),
                    Some(true) => Ok(Some("throttle_query returned true".into())),
                    None => Err(ReadError::Unreadable(
                        "throttle_query returned no row or NULL; holding until it returns false"
                            .into(),
                    )),
                }
            }
        }
    }
}

/// Why a signal could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The query failed or returned nothing usable: hold and say why.
    Unreadable(String),
    /// The connection is gone: the worker reconnects.
    ConnectionLost(db::Error),
}

impl ReadError {
    fn from_db(what: &str, e: db::Error) -> ReadError {
        if e.is_connection_lost() {
            ReadError::ConnectionLost(e)
        } else {
            ReadError::Unreadable(format!("cannot read {what}: {e}"))
        }
    }
}

/// Replication lag from `pg_stat_replication`, the primary's view of its standbys.
///
/// `replay_lag` is NULL both for an idle, caught-up standby and for one that has
/// not reported replay timing yet; the WAL position gap tells them apart, so a
/// streaming standby with NULL lag but unreplayed WAL holds the backfill too.
/// A role without `pg_monitor` sees NULL for every position: that is unreadable,
/// not "no lag".
///
/// The other way round, `replay_lag` goes stale: it is the lag of the last WAL
/// the standby replayed, and after a standby catches up the server keeps showing
/// that figure (seconds, after a long pause) until two replies in a row say
/// "fully replayed", up to `wal_receiver_status_interval` later. A standby that has
/// replayed everything the primary has written is not behind, whatever the
/// figure says, so it does not hold the backfill.
async fn replica_lag(client: &Client, max: Duration) -> Result<Option<String>, ReadError> {
    let rows = client
        .query(
            "SELECT coalesce(application_name, '?') || coalesce(' at ' || host(client_addr), ''),
                    state,
                    extract(epoch FROM replay_lag)::float8,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8
             FROM pg_stat_replication",
            &[],
        )
        .await
        .map_err(|e| ReadError::from_db("replica lag", e.into()))?;
    let max_secs = max.as_secs_f64();
    let mut worst: Option<(f64, String)> = None;
    for r in &rows {
        let name: String = r.get(0);
        let state: Option<String> = r.get(1);
        let lag: Option<f64> = r.get(2);
        let gap: Option<f64> = r.get(3);
        let Some(state) = state else {
            return Err(ReadError::Unreadable(format!(
                "cannot read the lag of replica {name}: the role sees no details in pg_stat_replication (grant it pg_monitor)"
            )));
        };
        match (lag, gap) {
            // Everything written has been replayed: a leftover `replay_lag` is stale.
            (_, Some(gap)) if gap <= 0.0 => {}
            (Some(lag), _) if lag > max_secs && worst.as_ref().is_none_or(|(w, _)| lag > *w) => {
                worst = Some((lag, name));
            }
            (None, Some(gap)) if state == "streaming" && gap > 0.0 => {
                return Ok(Some(format!(
                    "replica {name} has {} bytes of WAL not replayed and reports no replay lag yet",
                    gap as u64
                )));
            }
            (None, None) if state == "streaming" => {
                return Err(ReadError::Unreadable(format!(
                    "cannot read the lag of replica {name}: no replay position reported"
                )));
            }
            _ => {}
        }
    }
    Ok(worst.map(|(lag, name)| {
        format!("replica {name} replays {lag:.1}s behind (limit {max_secs:.1}s)")
    }))
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
        // Fast batches grow it by at most half.
        let mut f = Sizer::new(1000, 100, 50_000, Some(Duration::from_millis(100)));
        f.observe(1000, Duration::from_millis(1));
        assert_eq!(f.size(), 1500);
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
