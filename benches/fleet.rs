//! Fleet benchmark: one plan over many small tenant databases, `parallel` 1 vs N.
//!
//! `cargo bench --bench fleet [-- --targets N --rows N --parallel 1,8 --schemas]`
//! (or `BENCH_TARGETS`, `BENCH_ROWS`, `BENCH_PARALLEL`, `BENCH_SCHEMAS=1`;
//! defaults 100 databases of 1,000 rows, parallel 1 and 8). `DATABASE_URL`
//! names the server (default the local one). The databases
//! `pgshift_bench_fleet_nNNN` are created from a template
//! (`pgshift_bench_fleet_template`) afresh before each run, so every run does
//! the same work; creating them is not timed. With `--schemas`, the tenants
//! are schemas `tNNNN` of one database, `pgshift_bench_fleet_schemas`,
//! recreated before each run.
//!
//! The plan is a small expand/contract change on every tenant: add a column,
//! the dual-write trigger, a backfill in batches of 500, and a check. Each run
//! is `pgshift fleet apply` of the built binary with the targets found by a
//! discover query; its wall time includes start-up, discovery, and on every
//! target the control schema, the plan's lock and every step. While it runs,
//! the number of pgshift's sessions on the server is sampled every 20 ms: the
//! peak is the fleet's real connection budget at that parallelism. The fleet
//! process's peak RSS (VmHWM) is read from /proc.

#[path = "support/peak_rss.rs"]
mod peak_rss;

use std::process::Command;
use std::time::{Duration, Instant};

use tokio_postgres::Client;

struct Args {
    targets: usize,
    rows: i64,
    parallel: Vec<u32>,
    schemas: bool,
}

fn args() -> Args {
    let env = |name: &str| std::env::var(name).ok();
    let mut a = Args {
        targets: env("BENCH_TARGETS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(100),
        rows: env("BENCH_ROWS")
            .and_then(|v| v.replace('_', "").parse().ok())
            .unwrap_or(1000),
        parallel: env("BENCH_PARALLEL")
            .map(|v| v.split(',').filter_map(|p| p.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1, 8]),
        schemas: env("BENCH_SCHEMAS").is_some_and(|v| v == "1"),
    };
    // `cargo bench` adds `--bench`; anything unknown is ignored.
    let argv: Vec<String> = std::env::args().collect();
    for (i, arg) in argv.iter().enumerate() {
        let value = || argv.get(i + 1).cloned().unwrap_or_default();
        match arg.as_str() {
            "--targets" => a.targets = value().parse().expect("--targets N"),
            "--schemas" => a.schemas = true,
            "--rows" => a.rows = value().replace('_', "").parse().expect("--rows N"),
            "--parallel" => {
                a.parallel = value()
                    .split(',')
                    .map(|p| p.trim().parse().expect("--parallel 1,8"))
                    .collect()
            }
            _ => {}
        }
    }
    a
}

fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

fn url_for(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[after..].find('/') {
        Some(i) => &base[..after + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
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

const TEMPLATE: &str = "pgshift_bench_fleet_template";
const SCHEMAS_DB: &str = "pgshift_bench_fleet_schemas";

fn target_name(i: usize) -> String {
    format!("pgshift_bench_fleet_n{i:03}")
}

const PLAN: &str = "id: bench_fleet
phases:
  expand:
    - name: add_v
      sql: ALTER TABLE items ADD COLUMN v text
      rollback: ALTER TABLE items DROP COLUMN IF EXISTS v
  dual_write:
    - name: sync_v
      trigger:
        table: items
        set: { v: \"md5(NEW.src)\" }
  backfill:
    - name: fill_v
      backfill:
        table: items
        set: { v: \"md5(src)\" }
        batch_size: 500
  contract:
    - name: all_filled
      check: SELECT NOT EXISTS (SELECT FROM items WHERE v IS NULL)
";

/// Drops and creates the target databases from the template.
async fn fresh_targets(admin: &Client, n: usize) {
    for i in 0..n {
        let db = target_name(i);
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await
            .unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE {db} TEMPLATE {TEMPLATE}"))
            .await
            .unwrap();
    }
}

/// Recreates the database of tenant schemas, each with its own `items`.
async fn fresh_schemas(admin: &Client, server: &str, n: usize, rows: i64) {
    for sql in [
        format!("DROP DATABASE IF EXISTS {SCHEMAS_DB} WITH (FORCE)"),
        format!("CREATE DATABASE {SCHEMAS_DB}"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    let c = connect(&url_for(server, SCHEMAS_DB)).await;
    for i in 0..n {
        c.batch_execute(&format!(
            "CREATE SCHEMA t{i:04}; CREATE TABLE t{i:04}.items (id bigint PRIMARY KEY, src text NOT NULL);
             INSERT INTO t{i:04}.items SELECT g, 'row ' || g FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    }
    c.batch_execute("VACUUM ANALYZE").await.unwrap();
}

#[tokio::main]
async fn main() {
    let a = args();
    let server = server_url();
    let admin = connect(&server).await;
    // One statement per call: DROP/CREATE DATABASE cannot share a transaction.
    for sql in [
        format!("DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)"),
        format!("CREATE DATABASE {TEMPLATE}"),
    ] {
        admin.batch_execute(&sql).await.unwrap();
    }
    {
        let t = connect(&url_for(&server, TEMPLATE)).await;
        t.batch_execute(&format!(
            "CREATE TABLE items (id bigint PRIMARY KEY, src text NOT NULL);
             INSERT INTO items SELECT g, 'row ' || g FROM generate_series(1, {}) g",
            a.rows
        ))
        .await
        .unwrap();
        t.batch_execute("VACUUM ANALYZE items").await.unwrap();
    }
    let dir = std::env::temp_dir().join(format!("pgshift-bench-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("plan.yaml");
    std::fs::write(&plan, PLAN).unwrap();
    let targets = dir.join("targets.yaml");
    let (discover, admin_url) = if a.schemas {
        (
            "SELECT nspname FROM pg_namespace WHERE nspname ~ '^t[0-9]{4}$' ORDER BY nspname\n  mode: schemas",
            url_for(&server, SCHEMAS_DB),
        )
    } else {
        (
            "SELECT datname FROM pg_database WHERE datname LIKE 'pgshift\\_bench\\_fleet\\_n%' ORDER BY datname",
            server.clone(),
        )
    };
    std::fs::write(
        &targets,
        format!("max_failures: 1\ndiscover:\n  url_env: FLEET_ADMIN_URL\n  query: {discover}\n"),
    )
    .unwrap();
    println!(
        "fleet benchmark: {} {} of {} rows, plan `bench_fleet` (4 steps), canary 1",
        a.targets,
        if a.schemas {
            "tenant schemas in one database"
        } else {
            "databases"
        },
        a.rows
    );
    println!(
        "{:>8}  {:>9}  {:>13}  {:>14}  {:>9}",
        "parallel", "wall", "per target", "peak sessions", "peak RSS"
    );
    let mut walls = Vec::new();
    for &p in &a.parallel {
        if a.schemas {
            fresh_schemas(&admin, &server, a.targets, a.rows).await;
        } else {
            fresh_targets(&admin, a.targets).await;
        }
        admin.batch_execute("CHECKPOINT").await.unwrap();
        // Sample pgshift's sessions on the server while the fleet runs.
        let sampler_client = connect(&server).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let sampler = tokio::spawn(async move {
            let mut peak = 0i64;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                let n: i64 = sampler_client
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgshift'",
                        &[],
                    )
                    .await
                    .map(|r| r.get(0))
                    .unwrap_or(0);
                peak = peak.max(n);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        });
        let started = Instant::now();
        let (status, stderr, rss_kib) = tokio::task::spawn_blocking({
            let (plan, targets, admin_url) = (plan.clone(), targets.clone(), admin_url.clone());
            move || {
                let child = Command::new(env!("CARGO_BIN_EXE_pgshift"))
                    .args(["fleet", "apply"])
                    .arg(&plan)
                    .arg("--targets")
                    .arg(&targets)
                    .args(["--parallel", &p.to_string(), "--progress", "never", "-q"])
                    .env("FLEET_ADMIN_URL", &admin_url)
                    .env_remove("DATABASE_URL")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("run pgshift");
                let (out, peak) = peak_rss::wait(child);
                (
                    out.status,
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                    peak,
                )
            }
        })
        .await
        .unwrap();
        let wall = started.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let peak = sampler.await.unwrap_or(0);
        assert!(
            status.success(),
            "fleet apply --parallel {p} failed: {stderr}"
        );
        println!(
            "{p:>8}  {:>8.1}s  {:>11.0}ms  {peak:>14}  {:>6.1} MiB",
            wall.as_secs_f64(),
            wall.as_secs_f64() * 1000.0 / a.targets as f64,
            rss_kib as f64 / 1024.0
        );
        walls.push((p, wall));
    }
    if let (Some((p0, w0)), Some((p1, w1))) = (walls.first(), walls.last())
        && p0 != p1
    {
        println!(
            "parallel {p1} is {:.1}x as fast as parallel {p0}",
            w0.as_secs_f64() / w1.as_secs_f64()
        );
    }
    for i in 0..a.targets {
        let _ = admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                target_name(i)
            ))
            .await;
    }
    for db in [TEMPLATE, SCHEMAS_DB] {
        let _ = admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
            .await;
    }
    let _ = std::fs::remove_dir_all(dir);
}
