//! What an operator changes while a backfill runs, through the binary: a
//! `pgshift throttle` change takes effect at the very next batch, a pause stops
//! the next batch, `--clear` returns to the plan, the flags of `pgshift backfill`
//! replace older live overrides (and say so), `--workers` on a started step says
//! it cannot take effect, and the rate cap is named as the reason with an ETA
//! that counts with it.
//!
//! Each table logs its batches from a statement-level trigger: how many rows, and
//! when the statement started. A batch that started after a command returned
//! (its change committed) must show the change: an ordering, not a timing.

use std::time::Duration;

use pgshift::engine::Options;

use crate::backfill::{Recorder, plan, register, run};
use crate::executor::{spawn, status_json, wait_output, wait_until};
use crate::harness::*;

/// `items` with `rows` rows and a `batch_log` of every batch (rows, statement start).
fn items(rows: i64) -> String {
    format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, src text NOT NULL, v text);
         INSERT INTO items (id, src) SELECT g, 'row ' || g FROM generate_series(1, {rows}) g;
         CREATE TABLE batch_log (id serial PRIMARY KEY, rows int NOT NULL, started timestamptz NOT NULL);
         CREATE FUNCTION log_batch() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO batch_log (rows, started) SELECT count(*), statement_timestamp() FROM nt;
           PERFORM pg_sleep(0.02);
           RETURN NULL;
         END $$;
         CREATE TRIGGER log_batch AFTER UPDATE ON items REFERENCING NEW TABLE AS nt
           FOR EACH STATEMENT EXECUTE FUNCTION log_batch();"
    )
}

/// Runs `pgshift` with `args` to its end and returns the server's clock after it:
/// whatever it committed is visible to any statement that starts later.
async fn pgshift_then_now(db: &TestDb, args: &[&str]) -> String {
    let o = db.pgshift(args);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    db.scalar_string("SELECT clock_timestamp()::text")
        .await
        .unwrap()
}

async fn batches_after(db: &TestDb, at: &str, cond: &str) -> i64 {
    db.scalar_i64(&format!(
        "SELECT count(*) FROM batch_log WHERE started > '{at}' AND {cond}"
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_change_takes_effect_at_the_next_batch() {
    let db = TestDb::create("live_next_batch").await;
    db.exec(&items(6000)).await;
    let p = plan("table: items\nset: { v: \"md5(src)\" }\nwhere: v IS NULL\nbatch_size: 100");
    register(&db, &p).await;
    let task = tokio::spawn(run(db.url.clone(), p, Recorder::new(), Options::default()));
    wait_until(
        &db,
        "SELECT count(*) >= 5 FROM batch_log",
        Duration::from_secs(30),
    )
    .await;
    let at = pgshift_then_now(&db, &["throttle", "bf", "--batch-size", "37"]).await;
    task.await.unwrap().unwrap();
    // The last batch of the range takes what is left; every other one after the change is 37.
    let last = db.scalar_i64("SELECT max(id)::int8 FROM batch_log").await;
    assert_eq!(
        batches_after(&db, &at, &format!("rows <> 37 AND id < {last}")).await,
        0,
        "a batch that started after the change used another size"
    );
    assert!(batches_after(&db, &at, "rows = 37").await > 0);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE v IS DISTINCT FROM md5(src)")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pgshift.events WHERE event = 'override_set'")
            .await,
        1
    );
}

/// A one-step backfill plan `bf` over `items`, as a file.
fn plan_on_disk(test: &str, body: &str) -> std::path::PathBuf {
    plan_file(
        test,
        "bf.yaml",
        &format!(
            "id: bf\nphases:\n  backfill:\n    - name: fill\n      allow: {{ backfill-without-dual-write: \"test: no application writes\" }}\n      backfill:\n        table: items\n        set: {{ v: \"md5(src)\" }}\n        where: v IS NULL\n{body}"
        ),
    )
}

#[tokio::test]
async fn pause_holds_from_the_next_batch_status_shows_it_and_clear_returns_to_the_plan() {
    let db = TestDb::create("live_pause_clear").await;
    db.exec(&items(4000)).await;
    let file = plan_on_disk("live_pause_clear", "        batch_size: 100\n");
    let child = spawn(
        &db,
        &[
            "--progress",
            "never",
            "plan",
            "apply",
            file.to_str().unwrap(),
        ],
    );
    wait_until(
        &db,
        "SELECT count(*) >= 3 FROM batch_log",
        Duration::from_secs(30),
    )
    .await;
    let at = pgshift_then_now(&db, &["throttle", "bf", "--pause", "--batch-size", "60"]).await;
    // Held: the coordinator reports it, in status too.
    wait_until(
        &db,
        "SELECT coalesce((SELECT progress->>'throttled' LIKE 'paused by operator%' FROM pgshift.steps), false)",
        Duration::from_secs(30),
    )
    .await;
    // A statement that finds the step paused applies nothing (its statement trigger still logs 0 rows).
    assert_eq!(
        batches_after(&db, &at, "rows > 0").await,
        0,
        "a batch applied rows after the pause"
    );
    let s = db.pgshift(&["status", "bf"]);
    assert_eq!(s.status.code(), Some(0), "{}", stderr(&s));
    let out = stdout(&s);
    assert!(out.contains("held: paused by operator"), "{out}");
    assert!(
        out.contains("live overrides")
            && out.contains("batch size 60, paused")
            && out.contains("pgshift throttle bf --clear"),
        "{out}"
    );
    let j = status_json(&db, "bf");
    assert_eq!(j["steps"][0]["progress"]["held"], true, "{j:#}");

    let cleared = pgshift_then_now(&db, &["throttle", "bf", "--clear"]).await;
    let o =
        tokio::task::spawn_blocking(move || wait_output(child, Duration::from_secs(60), "apply"))
            .await
            .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let last = db.scalar_i64("SELECT max(id)::int8 FROM batch_log").await;
    assert_eq!(
        batches_after(&db, &cleared, &format!("rows <> 100 AND id < {last}")).await,
        0,
        "after --clear, the plan's batch size"
    );
    assert_eq!(
        db.scalar_string("SELECT overrides::text FROM pgshift.steps")
            .await
            .as_deref(),
        Some("{}")
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pgshift.events WHERE event = 'overrides_cleared' AND detail->'cleared'->>'paused' = 'true'").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_cap_is_named_as_the_reason_and_the_eta_counts_with_it() {
    let db = TestDb::create("live_rate_cap").await;
    db.exec(&items(3000)).await;
    let p = plan(
        "table: items\nset: { v: \"md5(src)\" }\nwhere: v IS NULL\nbatch_size: 100\nthrottle: { max_rows_per_sec: 1000 }",
    );
    register(&db, &p).await;
    let r = Recorder::new();
    run(db.url.clone(), p, r.clone(), Options::default())
        .await
        .unwrap();
    let reports = r.progress.lock().unwrap().clone();
    let capped: Vec<_> = reports
        .iter()
        .filter(|p| p.throttled.as_deref() == Some("rate cap 1000 rows/s (max_rows_per_sec)"))
        .collect();
    assert!(!capped.is_empty(), "the cap is never named: {reports:?}");
    assert!(
        capped.iter().all(|p| !p.held),
        "a cap slows, it does not hold"
    );
    // The ETA never promises more than the cap allows, whatever a burst measured.
    for p in reports.iter().filter(|p| p.eta.is_some()) {
        let left = p.rows_total.unwrap() - p.rows_done;
        let at_cap = Duration::from_secs_f64(left as f64 / 1000.0);
        assert!(p.eta.unwrap() + Duration::from_millis(1) >= at_cap, "{p:?}");
    }
}

#[tokio::test]
async fn flags_of_backfill_replace_older_live_overrides_and_a_started_split_says_so() {
    let db = TestDb::create("live_precedence").await;
    db.exec(&items(3000)).await;
    let dir = std::env::temp_dir().join(format!("pgshift-live-precedence-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("prec.yaml");
    std::fs::write(
        &file,
        "id: prec\nphases:\n  backfill:\n    - name: fill\n      allow: { backfill-without-dual-write: \"test: no application writes\" }\n      backfill:\n        table: items\n        set: { v: \"md5(src)\" }\n        where: v IS NULL\n        batch_size: 100\n        throttle: { max_rows_per_sec: 500 }\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();
    // Started, then interrupted: its ranges are fixed with one worker.
    let child = spawn(&db, &["--progress", "never", "plan", "apply", f]);
    wait_until(
        &db,
        "SELECT count(*) >= 2 FROM batch_log",
        Duration::from_secs(30),
    )
    .await;
    crate::executor::signal(&child, "INT");
    let o =
        tokio::task::spawn_blocking(move || wait_output(child, Duration::from_secs(30), "apply"))
            .await
            .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let o = db.pgshift(&[
        "throttle",
        "prec",
        "--max-rows-per-sec",
        "200",
        "--batch-size",
        "50",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let o = db.pgshift(&[
        "--progress",
        "never",
        "backfill",
        f,
        "--max-rows-per-sec",
        "100000",
        "--workers",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("your flags replace the live override(s) set earlier with `pgshift throttle`: at most 200 rows/s"),
        "{err}"
    );
    assert!(
        err.contains("--workers 3 cannot take effect: the step started with 1 worker range(s)"),
        "{err}"
    );
    // The flag replaced only the setting it names; the batch size override stays.
    assert_eq!(
        db.scalar_string("SELECT overrides::text FROM pgshift.steps")
            .await
            .as_deref(),
        Some(r#"{"batch_size": 50}"#)
    );
    for e in ["overrides_superseded", "workers_unchanged"] {
        assert_eq!(
            db.scalar_i64(&format!(
                "SELECT count(*) FROM pgshift.events WHERE event = '{e}'"
            ))
            .await,
            1,
            "{e}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
