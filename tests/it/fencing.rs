//! Fencing: a runner that no longer owns the plan applies no further batch.
//!
//! Every row of these tables records, in a BEFORE UPDATE trigger, which backend
//! updated it and when that statement started (`statement_timestamp()`). Once the
//! test has seen the plan's run epoch move on and read the clock, any batch
//! statement of the old run that starts afterwards would see the new epoch: so no
//! row may show one of the old run's backends with a later start. This is an
//! ordering argument, not a timing one: no sleep decides the outcome.

use std::time::Duration;

use pgshift::engine::{self as exec, Options};

use crate::backfill::{Recorder, plan, register, run};
use crate::executor::{
    expect_code, spawn, status_json, wait_output, wait_until, work_dir, write_plan,
};
use crate::harness::*;

/// `items` with a per-row update counter and the backend and statement start of its last update.
fn items(rows: i64) -> String {
    format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, src text NOT NULL, v text, n int NOT NULL DEFAULT 0,
                             by_pid int, stmt_at timestamptz);
         INSERT INTO items (id, src) SELECT g, 'row ' || g FROM generate_series(1, {rows}) g;
         CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.n := OLD.n + 1; NEW.by_pid := pg_backend_pid(); NEW.stmt_at := statement_timestamp(); RETURN NEW; END $$;
         CREATE TRIGGER stamp BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION stamp();
         -- Batches of a few tens of milliseconds, so that runs overlap.
         CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.02); RETURN NULL; END $$;
         CREATE TRIGGER slow AFTER UPDATE ON items FOR EACH STATEMENT EXECUTE FUNCTION slow();"
    )
}

/// The epoch the plan's runs are at now.
async fn epoch(db: &TestDb) -> i64 {
    db.scalar_i64("SELECT run_epoch FROM pgshift.plans").await
}

/// Waits until the plan's epoch is past `old`, then reads the server's clock: any
/// statement that starts after that instant sees the new epoch.
async fn fenced_at(db: &TestDb, old: i64) -> String {
    wait_until(
        db,
        &format!("SELECT run_epoch > {old} FROM pgshift.plans"),
        Duration::from_secs(60),
    )
    .await;
    db.scalar_string("SELECT clock_timestamp()::text")
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_epoch_moved_on_applies_no_further_batch() {
    let db = TestDb::create("fence_epoch").await;
    db.exec(&items(20_000)).await;
    let p = plan(
        "table: items\nset: { v: \"md5(src)\" }\nwhere: v IS NULL\nbatch_size: 100\nworkers: 2",
    );
    register(&db, &p).await;
    let r = Recorder::new();
    let task = tokio::spawn(run(db.url.clone(), p, r.clone(), Options::default()));
    wait_until(
        &db,
        "SELECT coalesce((SELECT sum(batches) >= 6 FROM pgshift.backfill_ranges), false)",
        Duration::from_secs(60),
    )
    .await;
    let pids = db
        .scalar_string(
            "SELECT string_agg(DISTINCT by_pid::text, ',') FROM items WHERE by_pid IS NOT NULL",
        )
        .await
        .unwrap();
    // Another runner takes the plan: it bumps the epoch, as `lock` does.
    let old = epoch(&db).await;
    db.exec("UPDATE pgshift.plans SET run_epoch = run_epoch + 1")
        .await;
    let at = fenced_at(&db, old).await;

    let err = tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the fenced run stops")
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(&err, exec::Error::LockLost { why, .. } if why.contains("took the plan over")),
        "{err}"
    );
    let late = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM items WHERE by_pid IN ({pids}) AND stmt_at > '{at}'"
        ))
        .await;
    assert_eq!(late, 0, "rows updated by the fenced run after the fence");
    assert!(
        db.scalar_i64("SELECT count(*) FROM pgshift.events WHERE event = 'backfill_fenced'")
            .await
            >= 1
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n > 1")
            .await,
        0,
        "no row updated twice"
    );
}

// The known limit of RELIABILITY.md before the fence: a runner whose lock
// connection dropped could run a few more batches while a second runner worked.
#[tokio::test]
async fn lock_connection_lost_while_a_second_runner_takes_over_the_first_applies_no_further_batch()
{
    let db = TestDb::create("fence_takeover").await;
    let rows = 20_000;
    db.exec(&items(rows)).await;
    let dir = work_dir("fence_takeover");
    let file = write_plan(
        &dir,
        "takeover",
        "id: takeover\nphases:\n  backfill:\n    - name: fill_v\n      allow: { backfill-without-dual-write: \"test: no application writes\" }\n      backfill:\n        table: items\n        set: { v: \"md5(src)\" }\n        where: v IS NULL\n        batch_size: 100\n        workers: 2\n",
    );
    let f = file.to_str().unwrap();
    let first = spawn(&db, &["plan", "apply", f]);
    wait_until(
        &db,
        "SELECT to_regclass('pgshift.backfill_ranges') IS NOT NULL",
        Duration::from_secs(60),
    )
    .await;
    wait_until(
        &db,
        "SELECT coalesce((SELECT sum(batches) >= 6 FROM pgshift.backfill_ranges), false)",
        Duration::from_secs(60),
    )
    .await;
    // Every pgshift session now is the first runner's.
    let pids = db
        .scalar_string("SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'pgshift'")
        .await
        .unwrap();
    let old = epoch(&db).await;
    let killed = db
        .scalar_i64("SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
        .await;
    assert_eq!(killed, 1, "the first runner's lock connection");
    let second = spawn(&db, &["--yes", "resume", f]);
    let at = fenced_at(&db, old).await;

    let o1 = tokio::task::spawn_blocking(move || {
        wait_output(first, Duration::from_secs(120), "first runner")
    })
    .await
    .unwrap();
    let o2 = tokio::task::spawn_blocking(move || {
        wait_output(second, Duration::from_secs(120), "second runner")
    })
    .await
    .unwrap();
    let (c1, c2) = (o1.status.code(), o2.status.code());
    eprintln!("fence takeover: first runner exit {c1:?}, second exit {c2:?}");
    for (o, c) in [(&o1, c1), (&o2, c2)] {
        assert!(
            matches!(c, Some(0) | Some(3) | Some(4)),
            "exit {c:?}\n{}",
            stderr(o)
        );
    }
    if c1 != Some(0) && c2 != Some(0) {
        let o = spawn(&db, &["--yes", "resume", f]);
        let o =
            tokio::task::spawn_blocking(move || wait_output(o, Duration::from_secs(120), "resume"))
                .await
                .unwrap();
        expect_code(&o, 0, "resume");
    }
    let late = db
        .scalar_i64(&format!(
            "SELECT count(*) FROM items WHERE by_pid IN ({pids}) AND stmt_at > '{at}'"
        ))
        .await;
    assert_eq!(
        late, 0,
        "rows updated by the first runner's sessions after the epoch moved on"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1 OR v IS DISTINCT FROM md5(src)")
            .await,
        0,
        "every row updated exactly once"
    );
    let p = status_json(&db, "takeover");
    assert_eq!(p["status"], "succeeded", "{p:#}");
    assert_eq!(p["steps"][0]["rows_done"], rows);
}
