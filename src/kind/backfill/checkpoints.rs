//! Checkpoints the backfill forces. A backfill writes WAL faster than anything
//! else an operator runs, and once `max_wal_size` worth of it has been written
//! since the last checkpoint the server starts another one, long before
//! `checkpoint_timeout`. At the end of each checkpoint the server waits for
//! its data files to reach the disk, and while it does every commit waits
//! longer: on the benchmark's machine these are the only application waits
//! over 50 ms during a 10M-row backfill. pgshift cannot change the server's
//! settings, but it can see this happen and say what to do about it.
//!
//! The coordinator reads the server's count of requested checkpoints every few
//! seconds; once enough of them came close together since the step started,
//! it says so once, with the settings that would space them out.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::db::{self, OneTrip};

/// Requested checkpoints since the step started before anything is said.
const AT_LEAST: i64 = 3;
/// Checkpoints further apart than this on average are left unmentioned.
const CLOSER_THAN: Duration = Duration::from_secs(60);

/// What the server did while the step ran.
#[derive(Debug, Clone, PartialEq)]
pub struct Pressure {
    pub checkpoints: i64,
    pub over: Duration,
    /// The server's `max_wal_size`, as it shows it (`1GB`).
    pub max_wal_size: String,
}

impl Pressure {
    /// The average time between two of those checkpoints.
    pub fn every(&self) -> Duration {
        self.over / self.checkpoints.max(1) as u32
    }

    /// What the operator reads, once.
    pub fn advice(&self, step: &str, plan: &str) -> String {
        format!(
            "step `{step}`: the server has started {} checkpoints in {:.0}s, one every {:.1}s, most likely because of the WAL this backfill writes (max_wal_size = {}). At the end of each one, commits wait for the disk. If the application's writes slow down, raise max_wal_size (ALTER SYSTEM SET max_wal_size = '…'; SELECT pg_reload_conf(); no restart needed), or cap the WAL written while its batches run with `pgshift throttle {plan} --max-wal-rate 20MB`",
            self.checkpoints,
            self.over.as_secs_f64(),
            self.every().as_secs_f64(),
            self.max_wal_size
        )
    }
}

/// `checkpoints` requested since the step started, `over` its running time:
/// worth saying when there are enough of them and they came close together.
pub fn pressing(checkpoints: i64, over: Duration, max_wal_size: &str) -> Option<Pressure> {
    let p = Pressure {
        checkpoints,
        over,
        max_wal_size: max_wal_size.to_string(),
    };
    (checkpoints >= AT_LEAST && p.every() < CLOSER_THAN).then_some(p)
}

/// The watch kept by the coordinator.
#[derive(Debug, Default)]
pub struct Watch {
    /// The server's version and `max_wal_size`, read once.
    server: Option<(i32, String)>,
    /// The count when the step started, and when.
    start: Option<(Instant, i64)>,
    told: bool,
}

impl Watch {
    /// Reads the count; `Some` the first time it is worth saying (and never again).
    pub async fn check(&mut self, c: &Client) -> Result<Option<Pressure>, db::Error> {
        if self.told {
            return Ok(None);
        }
        let (version, max_wal_size) = match &self.server {
            Some(s) => s.clone(),
            None => {
                let r = c
                    .row(
                        "SELECT current_setting('server_version_num')::int, current_setting('max_wal_size')",
                        &[],
                    )
                    .await?;
                let s = (r.get::<_, i32>(0), r.get::<_, String>(1));
                self.server = Some(s.clone());
                s
            }
        };
        // PostgreSQL 17 moved the counts from pg_stat_bgwriter to pg_stat_checkpointer.
        let sql = if version >= 170000 {
            "SELECT num_requested FROM pg_stat_checkpointer"
        } else {
            "SELECT checkpoints_req FROM pg_stat_bgwriter"
        };
        let now: i64 = c.row(sql, &[]).await?.get(0);
        let Some((since, first)) = self.start else {
            self.start = Some((Instant::now(), now));
            return Ok(None);
        };
        let found = pressing(now - first, since.elapsed(), &max_wal_size);
        self.told = found.is_some();
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_checkpoints_are_said_with_what_to_do() {
        let secs = Duration::from_secs;
        // The benchmark's 10M-row run: one every 3.5s.
        let p = pressing(10, secs(35), "1GB").unwrap();
        assert_eq!(p.every(), Duration::from_millis(3500));
        let said = p.advice("fill", "leads_hash");
        assert!(
            said.contains("10 checkpoints in 35s, one every 3.5s"),
            "{said}"
        );
        assert!(said.contains("max_wal_size = 1GB"), "{said}");
        assert!(
            said.contains("pgshift throttle leads_hash --max-wal-rate"),
            "{said}"
        );
        // Too few, or far apart as checkpoint_timeout would have them: nothing to say.
        assert_eq!(pressing(2, secs(4), "1GB"), None);
        assert_eq!(pressing(3, secs(900), "1GB"), None);
        assert_eq!(pressing(0, secs(0), "1GB"), None);
    }
}
