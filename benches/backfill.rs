//! Backfill throughput against a hand-written keyset loop at the same batch size.
//!
//! `cargo bench --bench backfill` (DATABASE_URL or the local server; `BENCH_ROWS`,
//! default 200000, and `BENCH_BATCH`, default 1000). Creates the database
//! `pgshift_bench_backfill`, fills two identical tables, backfills one with a loop of
//! `UPDATE … WHERE id IN (SELECT id … ORDER BY id LIMIT n)` (autocommit, prepared)
//! and the other with `pgshift::backfill::run`, and prints rows/s and the ratio.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use pgshift::control::Control;
use pgshift::db::{self, Target};
use pgshift::exec::{Context, Options, Outcome, Silent};
use pgshift::plan::StepKind;
use tokio_util::sync::CancellationToken;

fn env_or(name: &str, default: i64) -> i64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(conn);
    c
}

#[tokio::main]
async fn main() {
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let rows = env_or("BENCH_ROWS", 200_000);
    let batch = env_or("BENCH_BATCH", 1000);
    let admin = connect(&server).await;
    for sql in [
        "DROP DATABASE IF EXISTS pgshift_bench_backfill WITH (FORCE)",
        "CREATE DATABASE pgshift_bench_backfill",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let url = Target::parse(&server)
        .unwrap()
        .with_dbname("pgshift_bench_backfill");
    let url_text = match server.rsplit_once('/') {
        Some((base, _)) => format!("{base}/pgshift_bench_backfill"),
        None => server.clone(),
    };
    let mut c = connect(&url_text).await;
    for t in ["hand", "tool"] {
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, email text NOT NULL, h text);
             INSERT INTO {t} SELECT g, 'user' || g || '@example.com' FROM generate_series(1, {rows}) g;"
        ))
        .await
        .unwrap();
        c.batch_execute(&format!("VACUUM ANALYZE {t}"))
            .await
            .unwrap();
    }

    // The hand-written loop.
    let stmt = c
        .prepare(
            "WITH b AS (SELECT id FROM hand WHERE id > $1 ORDER BY id LIMIT $2),
                  u AS (UPDATE hand SET h = md5(email) WHERE id IN (SELECT id FROM b) AND h IS NULL)
             SELECT max(id) FROM b",
        )
        .await
        .unwrap();
    let start = Instant::now();
    let mut last = 0i64;
    loop {
        let next: Option<i64> = c.query_one(&stmt, &[&last, &batch]).await.unwrap().get(0);
        match next {
            Some(n) => last = n,
            None => break,
        }
    }
    let hand = rows as f64 / start.elapsed().as_secs_f64();

    // pgshift.
    let yaml = format!(
        "id: bench\nphases:\n  backfill:\n    - name: fill\n      allow: {{ backfill-without-dual-write: bench }}\n      backfill:\n        table: tool\n        set: {{ h: \"md5(email)\" }}\n        where: h IS NULL\n        batch_size: {batch}\n"
    );
    let plan = pgshift::plan::validate::validate(Path::new("bench.yaml"), &yaml).unwrap();
    let control = Control::new("pgshift");
    control.ensure(&mut c).await.unwrap();
    control.register(&mut c, &plan, "bench").await.unwrap();
    let cx = Context {
        pool: db::pool(&url, 4).unwrap(),
        target: url,
        control,
        cancel: CancellationToken::new(),
        reporter: Arc::new(Silent),
        options: Options::default(),
    };
    let step = plan.step("fill").unwrap();
    let StepKind::Backfill(spec) = &step.kind else {
        unreachable!()
    };
    let start = Instant::now();
    let out = pgshift::backfill::run(&cx, &plan, step, spec)
        .await
        .unwrap();
    assert_eq!(out, Outcome::Done);
    let tool = rows as f64 / start.elapsed().as_secs_f64();
    println!(
        "rows {rows}, batch {batch}: hand-written loop {hand:.0} rows/s, pgshift {tool:.0} rows/s, ratio {:.2}",
        tool / hand
    );
}
