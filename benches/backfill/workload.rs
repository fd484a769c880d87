//! The application while a job runs: `clients` connections, each alternating a
//! primary-key read and a one-row write of another column at random ids, as fast
//! as they can, recording every latency. What it saw is what the application
//! would have felt.
//!
//! With `--slow MS`, every operation slower than that is kept with when it
//! started, and a sampler reads `pg_stat_activity` every few milliseconds, so
//! that each slow operation can be printed with what the server's processes
//! were waiting on while it ran.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio_postgres::Client;

pub async fn connect(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<u32>, Vec<Slow>)>>,
    sampler: Option<tokio::task::JoinHandle<Vec<Sample>>>,
    started: Instant,
    /// The same instant on the wall clock (to read the server's log beside the timeline).
    wall: std::time::SystemTime,
}

/// An application operation slower than `--slow`.
pub struct Slow {
    /// Milliseconds from the workload's start to the operation's.
    pub at_ms: f64,
    pub lat_us: u32,
    pub write: bool,
}

/// One waiting process seen by the sampler.
pub struct Sample {
    pub at_ms: f64,
    pub what: String,
}

/// The application's sessions name themselves so that the sampler can tell them apart.
const APP_NAME: &str = "pgshift_bench_app";

/// What the application saw: throughput and latencies in microseconds.
pub struct AppStats {
    pub ops_per_sec: f64,
    pub p50: u32,
    pub p99: u32,
    pub max: u32,
    /// Operations slower than 100 ms (the bound), whatever `--slow` is.
    pub over_100ms: usize,
    pub slow: Vec<Slow>,
    pub samples: Vec<Sample>,
    /// Seconds since the epoch when the workload started.
    pub wall_start: f64,
}

impl Workload {
    pub async fn start(url: &str, clients: usize, rows: i64, slow_ms: Option<u32>) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let slow_us = slow_ms
            .map(|ms| ms.saturating_mul(1000))
            .unwrap_or(u32::MAX);
        let mut tasks = Vec::new();
        for n in 0..clients {
            let c = connect(url).await;
            c.batch_execute(&format!("SET application_name = '{APP_NAME}'"))
                .await
                .unwrap();
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let read = c
                    .prepare("SELECT id, email, name FROM leads WHERE id = $1")
                    .await
                    .unwrap();
                let write = c
                    .prepare("UPDATE leads SET name = $2 WHERE id = $1")
                    .await
                    .unwrap();
                // xorshift: deterministic per client, no dependency.
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ ((n as u64 + 1) << 32);
                let mut lat = Vec::with_capacity(1 << 16);
                let mut slow = Vec::new();
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let id = (seed % rows as u64) as i64 + 1;
                    let t = Instant::now();
                    if i.is_multiple_of(2) {
                        c.query_opt(&read, &[&id]).await.unwrap();
                    } else {
                        c.execute(&write, &[&id, &format!("name {i}")])
                            .await
                            .unwrap();
                    }
                    let us = t.elapsed().as_micros().min(u32::MAX as u128) as u32;
                    lat.push(us);
                    if us > slow_us {
                        slow.push(Slow {
                            at_ms: (t - started).as_secs_f64() * 1000.0,
                            lat_us: us,
                            write: !i.is_multiple_of(2),
                        });
                    }
                    i += 1;
                }
                (lat, slow)
            }));
        }
        let sampler = match slow_ms {
            Some(_) => Some(tokio::spawn(sample(
                connect(url).await,
                stop.clone(),
                started,
            ))),
            None => None,
        };
        Workload {
            stop,
            tasks,
            sampler,
            started,
            wall: std::time::SystemTime::now(),
        }
    }

    pub async fn finish(self) -> AppStats {
        self.stop.store(true, Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        let mut all = Vec::new();
        let mut slow = Vec::new();
        for t in self.tasks {
            let (lat, s) = t.await.unwrap();
            all.extend(lat);
            slow.extend(s);
        }
        slow.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
        let samples = match self.sampler {
            Some(s) => s.await.unwrap(),
            None => Vec::new(),
        };
        all.sort_unstable();
        let pct = |p: f64| {
            all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        AppStats {
            ops_per_sec: all.len() as f64 / secs,
            p50: pct(0.50),
            p99: pct(0.99),
            max: all.last().copied().unwrap_or(0),
            over_100ms: all.iter().filter(|&&us| us > 100_000).count(),
            slow,
            samples,
            wall_start: self
                .wall
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }
}

/// Reads every 5 ms which server processes wait, and on what (idle main loops left out).
async fn sample(c: Client, stop: Arc<AtomicBool>, started: Instant) -> Vec<Sample> {
    let q = c
        .prepare(
            "SELECT coalesce(nullif(application_name, ''), backend_type) || ': ' || wait_event_type || '/' || wait_event
                    || coalesce(' (' || left(regexp_replace(query, '\\s+', ' ', 'g'), 50) || ')', '')
             FROM pg_stat_activity
             WHERE pid <> pg_backend_pid() AND wait_event IS NOT NULL
               AND wait_event_type NOT IN ('Activity', 'Client', 'Extension')",
        )
        .await
        .unwrap();
    let mut out = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let at_ms = started.elapsed().as_secs_f64() * 1000.0;
        if let Ok(rows) = c.query(&q, &[]).await {
            out.extend(rows.iter().map(|r| Sample {
                at_ms,
                what: r.get(0),
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    out
}

/// Each slow operation, and what the server's processes waited on while it ran.
pub fn print_slow(job: &str, s: &AppStats) {
    println!(
        "{job}: {} application operations over the --slow bound (times from the workload's start, unix time {:.3})",
        s.slow.len(),
        s.wall_start
    );
    for op in &s.slow {
        let end = op.at_ms + op.lat_us as f64 / 1000.0;
        let mut seen: Vec<(&str, usize)> = Vec::new();
        for w in s
            .samples
            .iter()
            .filter(|w| w.at_ms >= op.at_ms && w.at_ms <= end)
        {
            match seen.iter_mut().find(|(what, _)| *what == w.what) {
                Some((_, n)) => *n += 1,
                None => seen.push((&w.what, 1)),
            }
        }
        println!(
            "  at {:>9.1} ms: {} {:.1} ms",
            op.at_ms,
            if op.write { "write" } else { "read " },
            op.lat_us as f64 / 1000.0
        );
        for (what, n) in seen {
            println!("      {n:>3}× {what}");
        }
    }
}
