//! Backfill benchmark: what a backfill costs, and what it costs the application.
//!
//! `cargo bench --bench backfill [-- --rows N --batch N --clients N]`
//! (or `BENCH_ROWS`, `BENCH_BATCH`, `BENCH_CLIENTS`; defaults 1,000,000 rows, batches
//! of 1,000, 4 application clients). `DATABASE_URL` names the server (default the
//! local one); the database `pgshift_bench_backfill` is dropped and recreated.
//!
//! The job is the README's: `email_hash = encode(sha256(lower(email)::bytea), 'hex')`
//! on a `leads` table. Each run gets a fresh, identical copy of the table, then one of:
//!
//! - `single UPDATE`: one statement over the whole table;
//! - `keyset loop`: a hand-written loop of `UPDATE … WHERE id IN (SELECT id … WHERE
//!   id > $last ORDER BY id LIMIT $batch)`, autocommit, prepared, no checkpoint;
//! - `pgshift`: the built binary, `pgshift plan apply` of a one-step backfill plan at
//!   the same batch size, in a child process (its wall time includes start-up,
//!   validation, the control schema, the checkpoint of every batch and the final
//!   verify), with its peak RSS (VmHWM) read from /proc.
//!
//! Each runs once on an idle server and once under an application workload: N
//! clients, each alternating a primary-key read and a single-row write of another
//! column at random ids, as fast as they can. The workload's latency during each run
//! (p50, p99, max) is what the application would have felt; "app alone" is the same
//! workload with no backfill, for reference.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

struct Args {
    rows: i64,
    batch: i64,
    clients: usize,
}

fn args() -> Args {
    let env_or = |name: &str, default: i64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.replace('_', "").parse().ok())
            .unwrap_or(default)
    };
    let mut a = Args {
        rows: env_or("BENCH_ROWS", 1_000_000),
        batch: env_or("BENCH_BATCH", 1000),
        clients: env_or("BENCH_CLIENTS", 4) as usize,
    };
    // `cargo bench` adds `--bench`; anything unknown is ignored.
    let argv: Vec<String> = std::env::args().collect();
    for (i, arg) in argv.iter().enumerate() {
        let value = || {
            argv.get(i + 1)
                .and_then(|v| v.replace('_', "").parse::<i64>().ok())
        };
        match arg.as_str() {
            "--rows" => a.rows = value().expect("--rows N"),
            "--batch" => a.batch = value().expect("--batch N"),
            "--clients" => a.clients = value().expect("--clients N") as usize,
            _ => {}
        }
    }
    a
}

async fn connect(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

const HASH: &str = "encode(sha256(lower(email)::bytea), 'hex')";

/// A fresh `leads` copied from the template, vacuumed and analyzed, and a clean
/// control schema.
async fn fresh_table(c: &Client) {
    for sql in [
        "DROP SCHEMA IF EXISTS pgshift CASCADE",
        "DROP TABLE IF EXISTS leads",
        "CREATE TABLE leads (id bigint PRIMARY KEY, email text NOT NULL, name text NOT NULL,
                             created_at timestamptz NOT NULL, email_hash text)",
        "INSERT INTO leads SELECT id, email, name, created_at, NULL FROM leads_src ORDER BY id",
        // VACUUM cannot share a transaction: one statement per call.
        "VACUUM ANALYZE leads",
        "CHECKPOINT",
    ] {
        c.batch_execute(sql).await.unwrap();
    }
}

/// The application: `clients` connections, each alternating a read and a write of
/// one random row, recording every latency in microseconds.
struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<u32>>>,
    started: Instant,
}

impl Workload {
    async fn start(url: &str, clients: usize, rows: i64) -> Workload {
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

    async fn finish(self) -> AppStats {
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

struct AppStats {
    ops_per_sec: f64,
    p50: u32,
    p99: u32,
    max: u32,
}

fn ms(us: u32) -> String {
    format!("{:.1}ms", us as f64 / 1000.0)
}

#[derive(Clone, Copy, PartialEq)]
enum Job {
    Update,
    Loop,
    Pgshift,
}

impl Job {
    fn name(self) -> &'static str {
        match self {
            Job::Update => "single UPDATE",
            Job::Loop => "keyset loop",
            Job::Pgshift => "pgshift",
        }
    }
}

struct Outcome {
    secs: f64,
    peak_rss_kib: Option<u64>,
}

async fn run_job(job: Job, c: &Client, url: &str, batch: i64, plan: &std::path::Path) -> Outcome {
    let start = Instant::now();
    let mut peak = None;
    match job {
        Job::Update => {
            c.batch_execute(&format!("UPDATE leads SET email_hash = {HASH}"))
                .await
                .unwrap();
        }
        Job::Loop => {
            let stmt = c
                .prepare(&format!(
                    "WITH b AS (SELECT id FROM leads WHERE id > $1 ORDER BY id LIMIT $2),
                          u AS (UPDATE leads SET email_hash = {HASH}
                                WHERE id IN (SELECT id FROM b) AND email_hash IS NULL)
                     SELECT max(id) FROM b"
                ))
                .await
                .unwrap();
            let mut last = 0i64;
            while let Some(n) = c
                .query_one(&stmt, &[&last, &batch])
                .await
                .unwrap()
                .get::<_, Option<i64>>(0)
            {
                last = n;
            }
        }
        Job::Pgshift => {
            let url = url.to_string();
            let plan = plan.to_path_buf();
            peak = tokio::task::spawn_blocking(move || {
                let mut child = Command::new(env!("CARGO_BIN_EXE_pgshift"))
                    .args(["--progress", "never", "-q", "--yes", "plan", "apply"])
                    .arg(&plan)
                    .env("DATABASE_URL", &url)
                    .stdout(std::process::Stdio::null())
                    .spawn()
                    .expect("run the pgshift binary");
                let status_file = format!("/proc/{}/status", child.id());
                let mut peak = 0u64;
                loop {
                    // VmHWM only grows: the last reading before exit is the peak.
                    if let Some(kib) = std::fs::read_to_string(&status_file).ok().and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("VmHWM:"))
                            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    }) {
                        peak = peak.max(kib);
                    }
                    if let Some(status) = child.try_wait().unwrap() {
                        assert!(status.success(), "pgshift plan apply: {status}");
                        return Some(peak);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
            .await
            .unwrap();
        }
    }
    Outcome {
        secs: start.elapsed().as_secs_f64(),
        peak_rss_kib: peak,
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin = connect(&server).await;
    let version: String = admin
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    for sql in [
        "DROP DATABASE IF EXISTS pgshift_bench_backfill WITH (FORCE)",
        "CREATE DATABASE pgshift_bench_backfill",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let url = match server.rsplit_once('/') {
        Some((base, _)) => format!("{base}/pgshift_bench_backfill"),
        None => server.clone(),
    };
    let c = connect(&url).await;
    let setup = Instant::now();
    c.batch_execute(&format!(
        "CREATE TABLE leads_src AS
           SELECT g::bigint AS id, 'User' || g || '@Example.com' AS email, 'name ' || g AS name,
                  now() - g * interval '1 second' AS created_at
           FROM generate_series(1, {}) g",
        a.rows
    ))
    .await
    .unwrap();
    let dir = std::env::temp_dir().join(format!("pgshift-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("bench_leads.yaml");
    std::fs::write(
        &plan,
        format!(
            "id: bench_leads\nphases:\n  backfill:\n    - name: fill_email_hash\n      allow: {{ backfill-without-dual-write: \"bench: the workload never writes email\" }}\n      backfill:\n        table: leads\n        set: {{ email_hash: \"{HASH}\" }}\n        where: email_hash IS NULL\n        batch_size: {}\n",
            a.batch
        ),
    )
    .unwrap();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "backfill benchmark: {} rows, batch {}, {} application clients; PostgreSQL {version}, {cores} cores (template built in {:.1}s)",
        a.rows,
        a.batch,
        a.clients,
        setup.elapsed().as_secs_f64()
    );

    fresh_table(&c).await;
    let app = Workload::start(&url, a.clients, a.rows).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let alone = app.finish().await;
    println!(
        "app alone: {:.0} ops/s, p50 {}, p99 {}, max {}",
        alone.ops_per_sec,
        ms(alone.p50),
        ms(alone.p99),
        ms(alone.max)
    );
    println!(
        "{:<14} {:<9} {:>8} {:>10} {:>8} | {:>9} {:>8} {:>8} {:>9} | {:>9}",
        "job",
        "app",
        "secs",
        "rows/s",
        "vs loop",
        "app ops/s",
        "app p50",
        "app p99",
        "app max",
        "peak RSS"
    );
    for with_app in [false, true] {
        let mut loop_rate = None;
        for job in [Job::Update, Job::Loop, Job::Pgshift] {
            fresh_table(&c).await;
            let app = if with_app {
                let w = Workload::start(&url, a.clients, a.rows).await;
                // Let the workload warm up before the job starts.
                tokio::time::sleep(Duration::from_millis(500)).await;
                Some(w)
            } else {
                None
            };
            let out = run_job(job, &c, &url, a.batch, &plan).await;
            let stats = match app {
                Some(w) => Some(w.finish().await),
                None => None,
            };
            let missed: i64 = c
                .query_one(
                    &format!("SELECT count(*) FROM leads WHERE email_hash IS DISTINCT FROM {HASH}"),
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(missed, 0, "{}: rows left wrong", job.name());
            let rate = a.rows as f64 / out.secs;
            if job == Job::Loop {
                loop_rate = Some(rate);
            }
            let ratio = match (job, loop_rate) {
                (Job::Pgshift, Some(l)) => format!("{:.2}", rate / l),
                _ => String::new(),
            };
            let (ops, p50, p99, max) = match &stats {
                Some(s) => (
                    format!("{:.0}", s.ops_per_sec),
                    ms(s.p50),
                    ms(s.p99),
                    ms(s.max),
                ),
                None => Default::default(),
            };
            println!(
                "{:<14} {:<9} {:>8.1} {:>10.0} {:>8} | {:>9} {:>8} {:>8} {:>9} | {:>9}",
                job.name(),
                if with_app { "workload" } else { "idle" },
                out.secs,
                rate,
                ratio,
                ops,
                p50,
                p99,
                max,
                out.peak_rss_kib
                    .map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                    .unwrap_or_default()
            );
        }
    }
    drop(c);
    let _ = admin
        .batch_execute("DROP DATABASE IF EXISTS pgshift_bench_backfill WITH (FORCE)")
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
