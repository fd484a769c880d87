//! The application while a job runs: `clients` connections, each alternating a
//! primary-key read and a one-row write of another column at random ids, as fast
//! as they can, recording every latency. What it saw is what the application
//! would have felt.

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
    tasks: Vec<tokio::task::JoinHandle<Vec<u32>>>,
    started: Instant,
}

/// What the application saw: throughput and latencies in microseconds.
pub struct AppStats {
    pub ops_per_sec: f64,
    pub p50: u32,
    pub p99: u32,
    pub max: u32,
}

impl Workload {
    pub async fn start(url: &str, clients: usize, rows: i64) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for n in 0..clients {
            let c = connect(url).await;
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
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    i += 1;
                }
                lat
            }));
        }
        Workload {
            stop,
            tasks,
            started: Instant::now(),
        }
    }

    pub async fn finish(self) -> AppStats {
        self.stop.store(true, Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64();
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.unwrap());
        }
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
        }
    }
}
