//! The signals that can hold a backfill: replica lag, the plan's throttle query,
//! logical replication slots falling behind, and an anti-wraparound autovacuum
//! of the table. They are sampled by the step's coordinator (one task per step,
//! on its own connection), never by the workers before each batch.
//!
//! Signals fail closed: a signal that cannot be read holds the backfill, with
//! the reason, exactly like a signal that says "slow down". A backfill that
//! keeps writing while its brakes are unreadable is the one failure mode this
//! module exists to prevent.

use std::time::Duration;

use tokio_postgres::Client;

use super::throttle::{Limits, SlotLimit};
use crate::bytes;
use crate::db::{self, OneTrip};
use crate::ident::QualifiedName;

/// One sampling of every signal in force.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Why the backfill must hold, if it must (the first signal that says so).
    pub hold: Option<String>,
    /// The furthest-behind watched slot, for the workers to project its lag with
    /// the WAL their own batches write until the next sample.
    pub slot: Option<SlotWatch>,
}

/// The watched slot that is furthest behind, as of a sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotWatch {
    pub name: String,
    /// Its `confirmed_flush_lsn` (a physical slot's `restart_lsn`), as a byte position.
    pub confirmed: u64,
    /// The server's WAL position when sampled.
    pub current: u64,
    pub max_lag: u64,
    pub inactive: bool,
}

impl SlotWatch {
    /// Bytes behind once the WAL reaches `wal` (the newer of the sample and our batches).
    pub fn lag(&self, wal: u64) -> u64 {
        self.current.max(wal).saturating_sub(self.confirmed)
    }

    /// The hold reason when the slot is `lag` bytes behind (more than its limit).
    pub fn reason(&self, lag: u64) -> String {
        let behind = format!(
            "{} behind (max_slot_lag {})",
            bytes::format(lag),
            bytes::format(self.max_lag)
        );
        if self.inactive {
            format!(
                "replication slot `{}` has no consumer connected (inactive) and is {behind}: start its consumer, drop the slot if nothing reads it, or ignore inactive slots (`ignore_inactive_slots: true`, live: `pgshift throttle PLAN --ignore-inactive-slots on`)",
                self.name
            )
        } else {
            format!("replication slot `{}` is {behind}", self.name)
        }
    }
}

/// Samples every signal `limits` puts in force. `Err` only for a lost connection
/// (the caller reconnects); a signal that cannot be read is a hold.
pub async fn sample(
    c: &Client,
    limits: &Limits,
    table: &QualifiedName,
    our_wal: u64,
) -> Result<Sample, db::Error> {
    let mut out = Sample::default();
    let hold = |why: Option<String>, out: &mut Sample| {
        if out.hold.is_none() {
            out.hold = why;
        }
    };
    if limits.autovacuum {
        let r = fail_closed("autovacuum activity", autovacuum(c, table).await)?;
        hold(r, &mut out);
    }
    if let Some(max) = limits.replica_lag {
        let r = fail_closed("replica lag", replica_lag(c, max).await)?;
        hold(r, &mut out);
    }
    if let Some(slot) = &limits.slot {
        match slots(c, slot).await {
            Ok(watch) => {
                let why = watch.as_ref().and_then(|w| {
                    let lag = w.lag(our_wal);
                    (lag > w.max_lag).then(|| w.reason(lag))
                });
                out.slot = watch;
                hold(why, &mut out);
            }
            Err(e) => hold(fail_closed("replication slots", Err(e))?, &mut out),
        }
    }
    if let Some(q) = &limits.throttle_query {
        let r = fail_closed("throttle_query", throttle_query(c, q).await)?;
        hold(r, &mut out);
    }
    Ok(out)
}

/// Why a signal could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// The query failed or returned nothing usable: hold and say why.
    Unreadable(String),
    Db(db::Error),
}

impl From<tokio_postgres::Error> for ReadError {
    fn from(e: tokio_postgres::Error) -> Self {
        ReadError::Db(e.into())
    }
}

/// A reading as a hold reason; an unreadable signal holds, a lost connection is returned.
fn fail_closed(
    what: &str,
    r: Result<Option<String>, ReadError>,
) -> Result<Option<String>, db::Error> {
    match r {
        Ok(v) => Ok(v),
        Err(ReadError::Db(e)) if e.is_connection_lost() => Err(e),
        Err(ReadError::Db(e)) => Ok(Some(format!(
            "cannot read {what}: {e}; holding until it can be read"
        ))),
        Err(ReadError::Unreadable(why)) => Ok(Some(format!("{why}; holding until it can be read"))),
    }
}

/// The furthest-behind watched slot (`None`: no slot to watch).
///
/// Every logical slot, or the ones the plan names (any kind). A named slot that
/// does not exist is unreadable: its consumer may be about to reconnect, and a
/// slot dropped by mistake must not silently release the brake.
async fn slots(c: &Client, limit: &SlotLimit) -> Result<Option<SlotWatch>, ReadError> {
    let rows = c
        .rows(
            "SELECT slot_name::text, active, coalesce(wal_status, '') = 'lost',
                    (coalesce(confirmed_flush_lsn, restart_lsn) - '0/0'::pg_lsn)::int8,
                    (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8
             FROM pg_replication_slots
             WHERE CASE WHEN cardinality($1::text[]) = 0 THEN slot_type = 'logical'
                        ELSE slot_name = ANY($1::text[]) END",
            &[&limit.slots],
        )
        .await?;
    let missing: Vec<&String> = limit
        .slots
        .iter()
        .filter(|s| !rows.iter().any(|r| r.get::<_, String>(0) == **s))
        .collect();
    if let Some(name) = missing.first() {
        return Err(ReadError::Unreadable(format!(
            "replication slot `{name}` (named in `slots`) does not exist: it may have been dropped, or its name is wrong; retune with `pgshift throttle PLAN --slots …` (or `--max-slot-lag off`)"
        )));
    }
    let mut worst: Option<SlotWatch> = None;
    for r in &rows {
        let name: String = r.get(0);
        let active: bool = r.get(1);
        let lost: bool = r.get(2);
        let Some(confirmed) = r.get::<_, Option<i64>>(3) else {
            return Err(ReadError::Unreadable(format!(
                "replication slot `{name}` reports no position (it never reserved WAL)"
            )));
        };
        let current: i64 = r.get(4);
        let inactive = !active || lost;
        if inactive && limit.ignore_inactive {
            continue;
        }
        let w = SlotWatch {
            name,
            confirmed: confirmed.max(0) as u64,
            current: current.max(0) as u64,
            max_lag: limit.max_lag,
            inactive,
        };
        if worst.as_ref().is_none_or(|x| w.confirmed < x.confirmed) {
            worst = Some(w);
        }
    }
    Ok(worst)
}

/// An autovacuum that works the table to prevent wraparound: it cannot be
/// cancelled by the backfill's locks, and every row the backfill rewrites is
/// more work for it. An ordinary autovacuum does not hold the backfill.
async fn autovacuum(c: &Client, table: &QualifiedName) -> Result<Option<String>, ReadError> {
    let rows = c
        .rows(
            "SELECT a.pid, a.query, p.relid = to_regclass($1)
             FROM pg_stat_activity AS a
             LEFT JOIN pg_stat_progress_vacuum AS p ON p.pid = a.pid
             WHERE a.backend_type = 'autovacuum worker' AND a.datname = current_database()",
            &[&table.quoted()],
        )
        .await?;
    for r in &rows {
        let pid: i32 = r.get(0);
        let query: Option<String> = r.get(1);
        let ours: Option<bool> = r.get(2);
        match query.as_deref() {
            None | Some("<insufficient privilege>") => {
                return Err(ReadError::Unreadable(format!(
                    "an autovacuum worker (pid {pid}) is running and this role cannot see which table it works or why (grant it pg_read_all_stats)"
                )));
            }
            Some(q) if ours == Some(true) && q.contains("to prevent wraparound") => {
                return Ok(Some(format!(
                    "an autovacuum to prevent wraparound (pid {pid}) is working {table}; holding until it finishes (pause_on_autovacuum)"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(None)
}

async fn throttle_query(c: &Client, sql: &str) -> Result<Option<String>, ReadError> {
    let row = c.row_opt(sql, &[]).await?;
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
            "throttle_query returned no row or NULL".into(),
        )),
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
async fn replica_lag(c: &Client, max: Duration) -> Result<Option<String>, ReadError> {
    let rows = c
        .rows(
            "SELECT coalesce(application_name, '?') || coalesce(' at ' || host(client_addr), ''),
                    state,
                    extract(epoch FROM replay_lag)::float8,
                    pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::float8
             FROM pg_stat_replication",
            &[],
        )
        .await?;
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
    fn a_slot_lag_is_projected_with_our_own_wal_and_named_with_its_limit() {
        let w = SlotWatch {
            name: "realtime".into(),
            confirmed: 1000,
            current: 5000,
            max_lag: 8 << 20,
            inactive: false,
        };
        assert_eq!(w.lag(0), 4000);
        // Our batches wrote past the sampled position: the lag grows with them.
        assert_eq!(w.lag(9000), 8000);
        let why = w.reason(12 << 20);
        assert_eq!(
            why,
            "replication slot `realtime` is 12MB behind (max_slot_lag 8MB)"
        );
        let idle = SlotWatch {
            inactive: true,
            ..w
        };
        assert!(idle.reason(12 << 20).contains("no consumer connected"));
        assert!(idle.reason(12 << 20).contains("ignore_inactive_slots"));
    }
}
