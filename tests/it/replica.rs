//! Backfills against a private cluster: real streaming-replica lag (a replica
//! whose replay is paused holds the backfill until it catches up; a lag the role
//! cannot read holds it too), and a server that goes away mid-backfill (a short
//! restart is survived, a long outage stops resumably and `resume` finishes).
//!
//! Every table carries the `touched` counter of `backfill.rs`: after the run,
//! `touched = 1` on every row proves each row was updated exactly once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgshift::exec::{self, Options, Outcome};
use tokio_postgres::Client;

use crate::backfill::{Recorder, TOUCH, i64_of, plan, register_on, rows_done, run};
use crate::cluster::Cluster;
use crate::harness::*;

const ROWS: i64 = 30_000;

/// `items` with `ROWS` rows and the touch counter; then the control schema and the plan.
async fn setup(url: &str, p: &pgshift::plan::Plan) -> Client {
    let mut c = connect(url).await;
    c.batch_execute(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL, h text, touched int NOT NULL DEFAULT 0);
         {TOUCH}
         CREATE TRIGGER touch BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION touch();
         INSERT INTO items (id, v) SELECT g, g FROM generate_series(1, {ROWS}) g;
         CREATE TABLE app (id int PRIMARY KEY, n int NOT NULL);
         INSERT INTO app VALUES (1, 0);"
    ))
    .await
    .unwrap();
    register_on(&mut c, p).await;
    c
}

/// Every row updated exactly once, to the right value.
async fn assert_all_rows_once(c: &Client) {
    assert_eq!(
        i64_of(
            c,
            "SELECT count(*) FROM items WHERE touched <> 1 OR h IS DISTINCT FROM md5(v::text)"
        )
        .await,
        0,
        "every row updated exactly once"
    );
}

/// Waits until the primary's only standby has replayed everything written so far.
async fn wait_caught_up(primary: &Client) {
    let start = Instant::now();
    loop {
        let ok: bool = primary
            .query_one(
                "SELECT coalesce(bool_and(replay_lsn >= pg_current_wal_lsn()), false) FROM pg_stat_replication",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the replica did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first hold reason the reporter saw that contains `needle`, waiting up to `secs`.
async fn wait_for_hold(r: &Recorder, needle: &str, secs: u64) -> String {
    let start = Instant::now();
    loop {
        if let Some(why) = r
            .progress
            .lock()
            .unwrap()
            .iter()
            .filter_map(|p| p.throttled.clone())
            .find(|w| w.contains(needle))
        {
            return why;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "no hold mentioning {needle:?} within {secs}s; saw: {:?}",
            r.progress
                .lock()
                .unwrap()
                .iter()
                .filter_map(|p| p.throttled.clone())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn hold_reasons(c: &Client) -> Vec<String> {
    c.query(
        "SELECT detail->>'reason' FROM pgshift.events WHERE event = 'throttle_hold' ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_lag_holds_the_backfill_until_replay_catches_up() {
    let primary = Cluster::primary("replag");
    let replica = Cluster::replica_of(&primary, "replag-r");
    let p = plan(
        "table: items\nset: { h: \"md5(v::text)\" }\nwhere: h IS NULL\nbatch_size: 500\nthrottle: { sleep: 50ms, max_replica_lag: 1s }",
    );
    let url = primary.url("postgres");
    let c = setup(&url, &p).await;
    wait_caught_up(&c).await;
    let standby = connect(&replica.url("postgres")).await;
    standby
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .unwrap();

    // The application keeps writing all along: the lag figure changes every second.
    let app_stop = Arc::new(AtomicBool::new(false));
    let app = {
        let stop = app_stop.clone();
        let app = connect(&url).await;
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                app.execute("UPDATE app SET n = n + 1 WHERE id = 1", &[])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    let r = Recorder::new();
    let task = tokio::spawn(run(url.clone(), p, r.clone(), Options::default()));

    let why = wait_for_hold(&r, "behind", 60).await;
    assert!(
        why.contains("replays") && why.contains("s behind (limit 1.0s)"),
        "the reason names the lag and the limit: {why}"
    );
    // Held: no batch runs while the replica stays behind.
    let held_at = rows_done(&c).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rows_done(&c).await, held_at, "rows advanced while held");
    assert!(
        held_at < ROWS,
        "the backfill finished before the lag built up"
    );
    assert!(!task.is_finished());
    // One hold, one event: the changing figure does not log a new hold every second.
    let holds = hold_reasons(&c).await;
    assert!(
        !holds.is_empty() && holds.len() <= 2,
        "throttle_hold events: {holds:?}"
    );
    assert!(holds[0].contains("behind"), "{holds:?}");

    // The application goes quiet, then replay resumes: the backfill continues as soon
    // as the replica has caught up, not when the server forgets the stale lag figure
    // it keeps showing for an idle standby (up to wal_receiver_status_interval, 10 s).
    app_stop.store(true, Ordering::Relaxed);
    app.await.unwrap();
    let batches_before = r.batches.load(Ordering::SeqCst);
    let resumed = Instant::now();
    standby
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .unwrap();
    while r.batches.load(Ordering::SeqCst) == batches_before {
        assert!(
            resumed.elapsed() < Duration::from_secs(6),
            "the backfill did not continue within 6 s of the replica catching up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = tokio::time::timeout(Duration::from_secs(90), task)
        .await
        .expect("the backfill finishes after replay resumes")
        .unwrap()
        .unwrap_or_else(|e| panic!("backfill failed: {e}"));
    assert_eq!(out, Outcome::Done);
    assert_all_rows_once(&c).await;
    assert!(
        i64_of(
            &c,
            "SELECT count(*) FROM pgshift.events WHERE event = 'throttle_released'"
        )
        .await
            >= 1
    );
    // The replica has the backfilled rows too.
    wait_caught_up(&c).await;
    assert_eq!(
        i64_of(&standby, "SELECT count(*) FROM items WHERE h IS NOT NULL").await,
        ROWS
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_replica_lag_holds_the_backfill_until_it_can_be_read() {
    let primary = Cluster::primary("replag-unread");
    let _replica = Cluster::replica_of(&primary, "replag-unread-r");
    let admin = connect(&primary.url("postgres")).await;
    for sql in ["CREATE ROLE low LOGIN", "CREATE DATABASE lowdb OWNER low"] {
        admin.batch_execute(sql).await.unwrap();
    }
    // A role that owns its database but lacks pg_monitor: pg_stat_replication shows
    // it that a standby exists, and nothing about its lag.
    let url = format!(
        "postgres://low@127.0.0.1:{}/lowdb?sslmode=disable",
        primary.port
    );
    let p = plan(
        "table: items\nset: { h: \"md5(v::text)\" }\nwhere: h IS NULL\nbatch_size: 2000\nthrottle: { max_replica_lag: 1s }",
    );
    let c = setup(&url, &p).await;

    let r = Recorder::new();
    let task = tokio::spawn(run(url.clone(), p, r.clone(), Options::default()));
    let why = wait_for_hold(&r, "pg_monitor", 30).await;
    assert!(
        why.contains("cannot read the lag of replica") && why.contains("holding"),
        "the reason says why and that it holds: {why}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(rows_done(&c).await, 0, "no batch ran on an unreadable lag");
    assert!(!task.is_finished());
    let holds = hold_reasons(&c).await;
    assert_eq!(holds.len(), 1, "{holds:?}");
    assert!(holds[0].contains("pg_monitor"), "{holds:?}");

    admin
        .batch_execute("GRANT pg_monitor TO low")
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the backfill continues once the lag can be read")
        .unwrap()
        .unwrap_or_else(|e| panic!("backfill failed: {e}"));
    assert_eq!(out, Outcome::Done);
    assert_all_rows_once(&c).await;
}

/// Waits until the recorder has seen `n` batches.
async fn wait_batches(r: &Recorder, n: usize) {
    let start = Instant::now();
    while r.batches.load(Ordering::SeqCst) < n {
        assert!(start.elapsed() < Duration::from_secs(60), "no batches ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_survives_a_server_restart_mid_run() {
    let server = Arc::new(Cluster::primary("restart"));
    let url = server.url("postgres");
    let p = plan(
        "table: items\nset: { h: \"md5(v::text)\" }\nwhere: h IS NULL\nbatch_size: 300\nworkers: 2\nthrottle: { sleep: 20ms }",
    );
    let c = setup(&url, &p).await;
    drop(c);

    let r = Recorder::new();
    let options = Options {
        reconnect_timeout: Duration::from_secs(30),
        ..Options::default()
    };
    let task = tokio::spawn(run(url.clone(), p, r.clone(), options));
    wait_batches(&r, 6).await;
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.restart_after(Duration::from_secs(2)))
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(90), task)
        .await
        .expect("the backfill finishes after the restart")
        .unwrap()
        .unwrap_or_else(|e| panic!("backfill failed: {e}"));
    assert_eq!(out, Outcome::Done);
    assert!(
        r.messages
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("lost the connection")),
        "the restart happened mid-run: {:?}",
        r.messages.lock().unwrap()
    );
    let c = connect(&url).await;
    assert_all_rows_once(&c).await;
    assert_eq!(rows_done(&c).await, ROWS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_stops_resumably_when_the_server_stays_down_then_resume_finishes() {
    let server = Arc::new(Cluster::primary("down"));
    let url = server.url("postgres");
    let yaml = "id: down\nphases:\n  backfill:\n    - name: fill\n      allow: { backfill-without-dual-write: \"test: no application writes\" }\n      backfill:\n        table: items\n        set: { h: \"md5(v::text)\" }\n        where: h IS NULL\n        batch_size: 300\n        throttle: { sleep: 20ms }\n";
    let dir = std::env::temp_dir().join(format!("pgshift-it-down-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("down.yaml");
    std::fs::write(&file, yaml).unwrap();
    let p = pgshift::plan::validate::validate(&file, yaml).unwrap();
    let c = setup(&url, &p).await;

    // In-process: the outage outlasts reconnect_timeout, so the step stops with ConnectionLost.
    let r = Recorder::new();
    let options = Options {
        reconnect_timeout: Duration::from_secs(3),
        ..Options::default()
    };
    let task = tokio::spawn(run(url.clone(), p.clone(), r.clone(), options));
    wait_batches(&r, 5).await;
    drop(c);
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    let stopped = Instant::now();
    let result = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the backfill gives up after reconnect_timeout")
        .unwrap();
    assert!(
        matches!(result, Err(exec::Error::ConnectionLost { .. })),
        "{result:?}"
    );
    assert!(
        stopped.elapsed() >= Duration::from_secs(2),
        "gave up too early"
    );

    // Through the binary: the same outage is exit 3, and `resume` finishes it.
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.start())
        .await
        .unwrap();
    let c = connect(&url).await;
    let before = rows_done(&c).await;
    assert!(before > 0 && before < ROWS, "rows done before: {before}");
    let apply = {
        let env_url = url.clone();
        let f = file.clone();
        std::thread::spawn(move || {
            pgshift_with_env(
                &[
                    "--progress",
                    "never",
                    "--yes",
                    "resume",
                    f.to_str().unwrap(),
                    "--reconnect-timeout",
                    "3s",
                ],
                &[("DATABASE_URL", env_url.as_str())],
            )
        })
    };
    let start = Instant::now();
    while rows_done(&c).await == before {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "resume ran no batch"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    let s = server.clone();
    tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    let o = tokio::task::spawn_blocking(move || apply.join().unwrap())
        .await
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "exit 3 on a lost connection; stderr: {}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("resume"),
        "says how to continue: {}",
        stderr(&o)
    );

    let s = server.clone();
    tokio::task::spawn_blocking(move || s.start())
        .await
        .unwrap();
    let o = pgshift_with_env(
        &[
            "--progress",
            "never",
            "--yes",
            "resume",
            file.to_str().unwrap(),
        ],
        &[("DATABASE_URL", url.as_str())],
    );
    assert_eq!(o.status.code(), Some(0), "resume: {}", stderr(&o));
    let c = connect(&url).await;
    assert_all_rows_once(&c).await;
    assert_eq!(rows_done(&c).await, ROWS);
    let _ = std::fs::remove_dir_all(&dir);
}
