//! Backfill steps against the real server: exactly-once batches, resume after a
//! cancel, key shapes, parallel workers, concurrent inserts, live overrides,
//! adaptive batch size, fail-closed throttles and the final verification.
//!
//! Most tables carry a `touched` column incremented by a BEFORE UPDATE trigger:
//! a row with `touched = 1` was updated exactly once.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgshift::control::Control;
use pgshift::control::Status;
use pgshift::db::{self, Target};
use pgshift::engine::{self as exec, BackfillProgress, Context, Options, Outcome, Reporter};
use pgshift::exec::runner;
use pgshift::plan::{Plan, StepKind};
use tokio_util::sync::CancellationToken;

use crate::harness::*;

/// A reporter that records what it is told and can cancel the run after N batches.
#[derive(Default)]
pub(crate) struct Recorder {
    pub(crate) batches: AtomicUsize,
    cancel_after: Option<usize>,
    pub(crate) cancel: CancellationToken,
    pub(crate) messages: Mutex<Vec<String>>,
    pub(crate) progress: Mutex<Vec<BackfillProgress>>,
}

impl Reporter for Recorder {
    fn message(&self, text: &str) {
        self.messages.lock().unwrap().push(text.to_string());
    }
    fn lock_wait(&self, _: &str, _: &str, _: u32, _: u32, _: Option<&str>) {}
    fn lock_done(&self, _: &str) {}
    fn backfill(&self, _: &str, p: &BackfillProgress) {
        self.progress.lock().unwrap().push(p.clone());
        // A report while held is not a batch (a rate-capped batch is).
        if p.held {
            return;
        }
        let n = self.batches.fetch_add(1, Ordering::SeqCst) + 1;
        if self.cancel_after == Some(n) {
            self.cancel.cancel();
        }
    }
    fn backfill_done(&self, _: &str) {}
}

impl Recorder {
    pub(crate) fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }
    fn cancelling_after(n: usize) -> Arc<Recorder> {
        Arc::new(Recorder {
            cancel_after: Some(n),
            ..Recorder::default()
        })
    }
    fn batch_sizes(&self) -> Vec<u32> {
        self.progress
            .lock()
            .unwrap()
            .iter()
            .filter(|p| !p.held)
            .map(|p| p.batch_size)
            .collect()
    }
}

/// A plan with one backfill step `fill` whose body is `body` (YAML, indented 8 spaces).
pub(crate) fn plan(body: &str) -> Plan {
    let indented: String = body.lines().map(|l| format!("        {l}\n")).collect();
    let yaml = format!(
        "id: bf\nphases:\n  backfill:\n    - name: fill\n      allow: {{ backfill-without-dual-write: \"test: no application writes\" }}\n      lock_timeout: 200ms\n      retries: 10\n      backfill:\n{indented}"
    );
    pgshift::plan::validate::validate(Path::new("t.yaml"), &yaml)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// Creates the control schema and registers the plan.
pub(crate) async fn register(db: &TestDb, plan: &Plan) {
    let mut c = connect(&db.url).await;
    register_on(&mut c, plan).await;
}

/// Creates the control schema on `c`'s database and records `plan` there.
pub(crate) async fn register_on(c: &mut tokio_postgres::Client, plan: &Plan) {
    let control = Control::new("pgshift");
    control.ensure(c).await.unwrap();
    control
        .register(c, &runner::record(plan), "test@host")
        .await
        .unwrap();
}

/// One bigint from `sql`, panicking with the query when it fails.
pub(crate) async fn i64_of(c: &tokio_postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Rows done as the batches of step `fill` committed them: each batch commits its
/// own range's count (`steps.rows_done` is the coordinator's copy, written about
/// once a second, and stale when the server went away before it could write it).
pub(crate) async fn rows_done(c: &tokio_postgres::Client) -> i64 {
    i64_of(
        c,
        "SELECT coalesce(sum(rows_done), 0)::int8 FROM pgshift.backfill_ranges WHERE step = 'fill'",
    )
    .await
}

/// Runs the plan's backfill step once, as the runner would.
pub(crate) async fn run(
    url: String,
    plan: Plan,
    reporter: Arc<Recorder>,
    options: Options,
) -> Result<Outcome, exec::Error> {
    let target = Target::parse(&url).unwrap();
    let pool = db::pool(&target, 8).unwrap();
    let cx = Context {
        target,
        pool,
        control: Control::new("pgshift"),
        cancel: reporter.cancel.clone(),
        reporter: reporter.clone(),
        options,
    };
    let step = plan.step("fill").unwrap().clone();
    let StepKind::Backfill(spec) = &step.kind else {
        panic!("not a backfill")
    };
    let sx = runner::step_cx(&cx, &plan, &step, Status::Pending);
    pgshift::kind::backfill::run(&sx, spec).await
}

async fn run_to_end(db: &TestDb, plan: &Plan) -> Arc<Recorder> {
    let r = Recorder::new();
    let out = run(db.url.clone(), plan.clone(), r.clone(), Options::default())
        .await
        .unwrap_or_else(|e| panic!("backfill failed: {e}"));
    assert_eq!(out, Outcome::Done);
    r
}

/// `items(id bigint pk, v, h, n, touched)` with `rows` rows and the touch counter.
async fn items(db: &TestDb, rows: i64) {
    db.exec(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, v int NOT NULL, h text, n int NOT NULL DEFAULT 0, touched int NOT NULL DEFAULT 0);
         {TOUCH}
         CREATE TRIGGER touch BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION touch();
         INSERT INTO items (id, v) SELECT g, g FROM generate_series(1, {rows}) g;"
    ))
    .await;
}

pub(crate) const TOUCH: &str = "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.touched := OLD.touched + 1; RETURN NEW; END $$;";

async fn events(db: &TestDb, event: &str) -> i64 {
    db.scalar_i64(&format!(
        "SELECT count(*) FROM pgshift.events WHERE event = '{event}'"
    ))
    .await
}

/// Polls `sql` (a boolean query) until true, or panics after `secs`.
async fn wait_until(db: &TestDb, sql: &str, secs: u64) {
    let start = Instant::now();
    loop {
        let ok: bool = db.client.query_one(sql, &[]).await.unwrap().get(0);
        if ok {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out waiting for: {sql}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_run_sets_every_row_exactly_once() {
    let db = TestDb::create("bf_full_run").await;
    items(&db, 5000).await;
    let p = plan(
        "table: items\nset: { h: \"md5(v::text)\" }\nwhere: h IS NULL\nbatch_size: 700\nverify: SELECT count(*) FROM items WHERE h IS DISTINCT FROM md5(v::text)",
    );
    register(&db, &p).await;
    let r = run_to_end(&db, &p).await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE touched <> 1 OR h <> md5(v::text)")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT rows_done FROM pgshift.steps WHERE name = 'fill'")
            .await,
        5000
    );
    assert_eq!(
        db.scalar_i64("SELECT rows_total FROM pgshift.steps WHERE name = 'fill'")
            .await,
        5000
    );
    assert_eq!(
        db.scalar_string("SELECT upper_key::text FROM pgshift.backfill_ranges")
            .await
            .unwrap(),
        r#"{"id": 5000}"#
    );
    assert_eq!(
        db.scalar_i64("SELECT batches FROM pgshift.backfill_ranges")
            .await,
        8
    );
    assert_eq!(events(&db, "backfill_range_fixed").await, 1);
    assert_eq!(events(&db, "backfill_finished").await, 1);
    assert_eq!(r.batches.load(Ordering::SeqCst), 8);
    let last = r.progress.lock().unwrap().last().cloned().unwrap();
    assert_eq!((last.rows_done, last.rows_total), (5000, Some(5000)));

    // A second run finds every range done and changes nothing.
    let again = run_to_end(&db, &p).await;
    assert_eq!(again.batches.load(Ordering::SeqCst), 0);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE touched <> 1")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_after_three_batches_resumes_without_repeating_any() {
    let db = TestDb::create("bf_cancel_resume").await;
    items(&db, 4000).await;
    // Not idempotent on purpose: a replayed batch would show as n = 2.
    let p = plan("table: items\nset: n = n + 1\nbatch_size: 500");
    register(&db, &p).await;
    let r = Recorder::cancelling_after(3);
    let out = run(db.url.clone(), p.clone(), r.clone(), Options::default())
        .await
        .unwrap();
    assert_eq!(out, Outcome::Cancelled);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n = 1")
            .await,
        1500
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n > 1")
            .await,
        0
    );
    assert_eq!(
        db.scalar_string("SELECT last_key::text FROM pgshift.backfill_ranges")
            .await
            .unwrap(),
        r#"{"id": 1500}"#
    );

    run_to_end(&db, &p).await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1 OR touched <> 1")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT rows_done FROM pgshift.steps WHERE name = 'fill'")
            .await,
        4000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn composite_key_batches_cross_its_first_column() {
    let db = TestDb::create("bf_composite_key").await;
    db.exec(&format!(
        "CREATE TABLE orders (tenant int, id int, n int NOT NULL DEFAULT 0, touched int NOT NULL DEFAULT 0, PRIMARY KEY (tenant, id));
         {TOUCH}
         CREATE TRIGGER touch BEFORE UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION touch();
         INSERT INTO orders (tenant, id) SELECT t, i FROM generate_series(1, 30) t, generate_series(1, 100) i;"
    ))
    .await;
    let p = plan("table: orders\nset: n = n + 1\nbatch_size: 70");
    register(&db, &p).await;
    let r = Recorder::cancelling_after(5);
    assert_eq!(
        run(db.url.clone(), p.clone(), r, Options::default())
            .await
            .unwrap(),
        Outcome::Cancelled
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE n = 1")
            .await,
        350
    );
    run_to_end(&db, &p).await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE n <> 1 OR touched <> 1")
            .await,
        0
    );
    assert_eq!(
        db.scalar_string("SELECT upper_key::text FROM pgshift.backfill_ranges")
            .await
            .unwrap(),
        r#"{"id": 100, "tenant": 30}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uuid_keys_random_and_time_ordered() {
    let db = TestDb::create("bf_uuid_key").await;
    db.exec(&format!(
        "CREATE TABLE docs (id uuid PRIMARY KEY, n int NOT NULL DEFAULT 0, touched int NOT NULL DEFAULT 0);
         {TOUCH}
         CREATE TRIGGER touch BEFORE UPDATE ON docs FOR EACH ROW EXECUTE FUNCTION touch();
         INSERT INTO docs (id) SELECT gen_random_uuid() FROM generate_series(1, 1500);
         -- v7-shaped: 48-bit time prefix, version 7, variant 8.
         INSERT INTO docs (id) SELECT (lpad(to_hex(g), 12, '0') || '7000' || '8000' || lpad(to_hex(g), 12, '0'))::uuid FROM generate_series(1, 1500) g;"
    ))
    .await;
    let p = plan("table: docs\nset: n = n + 1\nbatch_size: 256\nworkers: 2");
    cancel_resume_and_check_once(&db, &p, 4, "docs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_keys_with_quotes_and_non_ascii() {
    let db = TestDb::create("bf_text_key").await;
    db.exec(&format!(
        "CREATE TABLE tags (name text PRIMARY KEY, n int NOT NULL DEFAULT 0, touched int NOT NULL DEFAULT 0);
         {TOUCH}
         CREATE TRIGGER touch BEFORE UPDATE ON tags FOR EACH ROW EXECUTE FUNCTION touch();
         INSERT INTO tags (name) SELECT 'tag-' || g FROM generate_series(1, 1000) g;
         INSERT INTO tags (name) SELECT 'o''brien \"' || g || '\" ü€' FROM generate_series(1, 500) g;
         INSERT INTO tags (name) VALUES (''), (' '), ('\\'), ('{{\"a\": 1}}');"
    ))
    .await;
    let p = plan("table: tags\nset: n = n + 1\nbatch_size: 97");
    cancel_resume_and_check_once(&db, &p, 7, "tags").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_cover_the_range_exactly_once() {
    let db = TestDb::create("bf_four_workers").await;
    items(&db, 10_000).await;
    let p = plan("table: items\nset: n = n + 1\nbatch_size: 300\nworkers: 4");
    register(&db, &p).await;
    let r = Recorder::cancelling_after(10);
    assert_eq!(
        run(db.url.clone(), p.clone(), r, Options::default())
            .await
            .unwrap(),
        Outcome::Cancelled
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n > 1")
            .await,
        0
    );
    run_to_end(&db, &p).await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1 OR touched <> 1")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pgshift.backfill_ranges WHERE done")
            .await,
        4
    );
    assert_eq!(
        db.scalar_i64("SELECT sum(rows_done)::bigint FROM pgshift.backfill_ranges")
            .await,
        10_000
    );
    assert_eq!(
        db.scalar_i64("SELECT rows_done FROM pgshift.steps WHERE name = 'fill'")
            .await,
        10_000
    );
    // Contiguous: each range starts where the previous one ends.
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM pgshift.backfill_ranges a JOIN pgshift.backfill_ranges b ON b.worker = a.worker + 1
             WHERE b.lower_key IS DISTINCT FROM a.upper_key"
        )
        .await,
        0
    );
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM pgshift.backfill_ranges WHERE worker = 0 AND lower_key IS NULL"
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_inserted_after_the_start_are_left_to_the_trigger() {
    let db = TestDb::create("bf_concurrent_inserts").await;
    items(&db, 3000).await;
    // Slow batches, so that the inserts overlap the whole run.
    db.exec(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.02); RETURN NULL; END $$;
         CREATE TRIGGER slow AFTER UPDATE ON items FOR EACH STATEMENT EXECUTE FUNCTION slow();",
    )
    .await;
    let p = plan("table: items\nset: { h: \"md5(v::text)\" }\nwhere: h IS NULL\nbatch_size: 200");
    register(&db, &p).await;
    let url = db.url.clone();
    let stop = CancellationToken::new();
    let inserter = {
        let stop = stop.clone();
        let db_url = db.url.clone();
        tokio::spawn(async move {
            let c = connect(&db_url).await;
            // Wait for the range to be fixed, then insert beyond it until the backfill ends.
            loop {
                let fixed: bool = c
                    .query_one("SELECT to_regclass('pgshift.backfill_ranges') IS NOT NULL AND EXISTS (SELECT 1 FROM pgshift.backfill_ranges)", &[])
                    .await
                    .unwrap()
                    .get(0);
                if fixed {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut id = 1_000_000i64;
            let mut inserted = 0;
            while !stop.is_cancelled() {
                c.execute("INSERT INTO items (id, v) SELECT g, g FROM generate_series($1::bigint, $1::bigint + 49) g", &[&id])
                    .await
                    .unwrap();
                id += 50;
                inserted += 50;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            inserted
        })
    };
    let out = run(url, p.clone(), Recorder::new(), Options::default())
        .await
        .unwrap();
    stop.cancel();
    let inserted = inserter.await.unwrap();
    assert_eq!(out, Outcome::Done);
    assert!(inserted > 0, "the inserts did not overlap the backfill");
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM items WHERE id <= 3000 AND (touched <> 1 OR h IS NULL)"
        )
        .await,
        0
    );
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM items WHERE id > 3000 AND (touched <> 0 OR h IS NOT NULL)"
        )
        .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE id > 3000")
            .await,
        inserted
    );
}

/// A statement-level trigger that makes every batch take at least `secs`.
async fn slow_batches(db: &TestDb, table: &str, secs: f64) {
    db.exec(&format!(
        "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep({secs}); RETURN NULL; END $$;
         CREATE TRIGGER slow AFTER UPDATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION slow();"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_batch_size_override_is_picked_up_and_logged() {
    let db = TestDb::create("bf_live_override").await;
    items(&db, 3000).await;
    slow_batches(&db, "items", 0.03).await;
    let p = plan("table: items\nset: n = n + 1\nbatch_size: 100");
    register(&db, &p).await;
    let task = tokio::spawn(run(
        db.url.clone(),
        p.clone(),
        Recorder::new(),
        Options::default(),
    ));
    wait_until(
        &db,
        "SELECT coalesce((SELECT batches >= 3 FROM pgshift.backfill_ranges), false)",
        20,
    )
    .await;
    db.exec(r#"UPDATE pgshift.steps SET overrides = overrides || '{"batch_size": 37, "sleep_ms": 1}' WHERE name = 'fill'"#)
        .await;
    assert_eq!(task.await.unwrap().unwrap(), Outcome::Done);
    assert_eq!(
        db.scalar_i64("SELECT batch_size::bigint FROM pgshift.backfill_ranges")
            .await,
        37
    );
    assert_eq!(events(&db, "override_applied").await, 1);
    assert_eq!(
        db.scalar_i64("SELECT (detail->>'batch_size')::bigint FROM pgshift.events WHERE event = 'override_applied'").await,
        37
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_by_operator_holds_until_unpaused() {
    let db = TestDb::create("bf_operator_pause").await;
    items(&db, 1000).await;
    let p = plan("table: items\nset: n = n + 1\nbatch_size: 100");
    register(&db, &p).await;
    db.exec(r#"UPDATE pgshift.steps SET overrides = '{"paused": true}' WHERE name = 'fill'"#)
        .await;
    let r = Recorder::new();
    let task = tokio::spawn(run(
        db.url.clone(),
        p.clone(),
        r.clone(),
        Options::default(),
    ));
    wait_until(&db, "SELECT EXISTS (SELECT 1 FROM pgshift.events WHERE event = 'throttle_hold' AND detail->>'reason' LIKE 'paused by operator%')", 20).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n > 0")
            .await,
        0
    );
    db.exec(r#"UPDATE pgshift.steps SET overrides = overrides || '{"paused": false}' WHERE name = 'fill'"#).await;
    assert_eq!(task.await.unwrap().unwrap(), Outcome::Done);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1")
            .await,
        0
    );
    assert_eq!(events(&db, "throttle_released").await, 1);
    assert!(r.progress.lock().unwrap().iter().any(|p| {
        p.throttled
            .as_deref()
            .is_some_and(|t| t.starts_with("paused by operator"))
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_batch_time_shrinks_slow_batches() {
    let db = TestDb::create("bf_target_batch_time").await;
    items(&db, 3000).await;
    db.exec(
        "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.0005); RETURN NEW; END $$;
         CREATE TRIGGER slow_row BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION slow_row();",
    )
    .await;
    let p = plan(
        "table: items\nset: n = n + 1\nbatch_size: 800\nthrottle: { target_batch_time: 40ms, min_batch_size: 20, max_batch_size: 2000 }",
    );
    register(&db, &p).await;
    let r = run_to_end(&db, &p).await;
    let sizes = r.batch_sizes();
    assert!(sizes.len() >= 4, "{sizes:?}");
    // Bounded steps: never below half of the previous size.
    assert_eq!(sizes[0], 400, "{sizes:?}");
    assert!(sizes.windows(2).all(|w| w[1] * 2 >= w[0]), "{sizes:?}");
    assert!(*sizes.last().unwrap() < 200, "{sizes:?}");
    assert!(
        db.scalar_i64("SELECT batch_size::bigint FROM pgshift.backfill_ranges")
            .await
            < 200
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_query_true_holds_and_false_releases() {
    let db = TestDb::create("bf_throttle_query").await;
    items(&db, 1000).await;
    db.exec("CREATE TABLE brake (hold bool NOT NULL); INSERT INTO brake VALUES (true);")
        .await;
    let p = plan(
        "table: items\nset: n = n + 1\nbatch_size: 100\nthrottle: { throttle_query: SELECT hold FROM brake }",
    );
    register(&db, &p).await;
    let task = tokio::spawn(run(
        db.url.clone(),
        p.clone(),
        Recorder::new(),
        Options::default(),
    ));
    wait_until(&db, "SELECT EXISTS (SELECT 1 FROM pgshift.events WHERE event = 'throttle_hold' AND detail->>'reason' = 'throttle_query returned true')", 20).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n > 0")
            .await,
        0
    );
    db.exec("UPDATE brake SET hold = false").await;
    assert_eq!(task.await.unwrap().unwrap(), Outcome::Done);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttle_query_that_fails_holds_fail_closed() {
    let db = TestDb::create("bf_throttle_fail_closed").await;
    items(&db, 1000).await;
    let p = plan(
        "table: items\nset: n = n + 1\nbatch_size: 100\nthrottle: { throttle_query: SELECT hold FROM brake_not_yet }",
    );
    register(&db, &p).await;
    let r = Recorder::new();
    let task = tokio::spawn(run(
        db.url.clone(),
        p.clone(),
        r.clone(),
        Options::default(),
    ));
    wait_until(&db, "SELECT EXISTS (SELECT 1 FROM pgshift.events WHERE event = 'throttle_hold' AND detail->>'reason' LIKE 'cannot read throttle_query%brake_not_yet%')", 20).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n > 0")
            .await,
        0
    );
    assert!(
        r.messages
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("holding") && m.contains("brake_not_yet"))
    );
    db.exec("CREATE TABLE brake_not_yet (hold bool); INSERT INTO brake_not_yet VALUES (false);")
        .await;
    assert_eq!(task.await.unwrap().unwrap(), Outcome::Done);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_fails_when_set_does_not_clear_where() {
    let db = TestDb::create("bf_verify_fails").await;
    items(&db, 1200).await;
    // The plan's mistake: it fills `h` but its `where` tests `v`, which it never changes.
    let p = plan("table: items\nset: { h: \"'x'\" }\nwhere: v > 1000\nbatch_size: 500");
    register(&db, &p).await;
    let err = run(
        db.url.clone(),
        p.clone(),
        Recorder::new(),
        Options::default(),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, exec::Error::VerifyFailed { missed: 200, .. }),
        "{msg}"
    );
    assert!(msg.contains("200 row(s) missed"), "{msg}");
    assert!(msg.contains("v > 1000"), "{msg}");
    assert_eq!(events(&db, "verify_failed").await, 1);
    // The batches themselves ran, each row once.
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE h = 'x' AND touched = 1")
            .await,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_usable_key_is_named() {
    let db = TestDb::create("bf_no_key").await;
    db.exec("CREATE TABLE heap (a int, n int); INSERT INTO heap VALUES (1, 0);")
        .await;
    let p = plan("table: heap\nset: n = 1");
    register(&db, &p).await;
    let err = run(
        db.url.clone(),
        p.clone(),
        Recorder::new(),
        Options::default(),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(r#""heap" has no primary key"#), "{msg}");
    let p = plan("table: heap\nkey: a\nset: n = 1");
    let err = run(db.url.clone(), p, Recorder::new(), Options::default())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("not the leading part of any valid btree index"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_timeout_retries_the_batch_smaller() {
    let db = TestDb::create("bf_lock_timeout_retry").await;
    items(&db, 2000).await;
    let p = plan("table: items\nset: n = n + 1\nbatch_size: 400");
    register(&db, &p).await;
    // Another session holds row 10 until the first batch has hit lock_timeout
    // (200ms) and been retried smaller.
    let locker = connect(&db.url).await;
    locker
        .batch_execute("BEGIN; SELECT * FROM items WHERE id = 10 FOR UPDATE")
        .await
        .unwrap();
    let release = tokio::spawn({
        let watcher = connect(&db.url).await;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let has_control = "SELECT to_regclass('pgshift.events') IS NOT NULL";
            let counted = "SELECT EXISTS (SELECT FROM pgshift.events WHERE event = 'batch_retry')";
            loop {
                let control: bool = watcher.query_one(has_control, &[]).await.unwrap().get(0);
                if control
                    && watcher
                        .query_one(counted, &[])
                        .await
                        .unwrap()
                        .get::<_, bool>(0)
                {
                    break;
                }
                assert!(Instant::now() < deadline, "no batch_retry in 30 s");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            locker.batch_execute("COMMIT").await.unwrap();
        }
    });
    let r = run_to_end(&db, &p).await;
    release.await.unwrap();
    assert!(events(&db, "batch_retry").await >= 1);
    assert_eq!(
        db.scalar_string("SELECT detail->>'sqlstate' FROM pgshift.events WHERE event = 'batch_retry' ORDER BY id LIMIT 1").await.as_deref(),
        Some("55P03")
    );
    // Halved per timeout, not below min_batch_size (100 here).
    let first = r.batch_sizes()[0];
    assert!((100..=200).contains(&first), "{first}");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1")
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_connection_reconnects_and_repeats_nothing() {
    let db = TestDb::create("bf_connection_killed").await;
    items(&db, 3000).await;
    slow_batches(&db, "items", 0.03).await;
    let p = plan("table: items\nset: n = n + 1\nbatch_size: 100\nworkers: 2");
    register(&db, &p).await;
    let task = tokio::spawn(run(
        db.url.clone(),
        p.clone(),
        Recorder::new(),
        Options::default(),
    ));
    wait_until(
        &db,
        "SELECT coalesce((SELECT sum(batches) >= 4 FROM pgshift.backfill_ranges), false)",
        20,
    )
    .await;
    // Kill pgshift's connections, mid-batch or between batches.
    let killed = db
        .scalar_i64("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'pgshift'")
        .await;
    assert!(killed >= 1);
    assert_eq!(task.await.unwrap().unwrap(), Outcome::Done);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1 OR touched <> 1")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT rows_done FROM pgshift.steps WHERE name = 'fill'")
            .await,
        3000
    );
}

/// Registers the plan, cancels its backfill after `batches` progress reports, runs it
/// again to the end, and checks that every row of `table` was updated exactly once.
async fn cancel_resume_and_check_once(db: &TestDb, p: &Plan, batches: usize, table: &str) {
    register(db, p).await;
    let r = Recorder::cancelling_after(batches);
    assert_eq!(
        run(db.url.clone(), p.clone(), r, Options::default())
            .await
            .unwrap(),
        Outcome::Cancelled
    );
    run_to_end(db, p).await;
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM {table} WHERE n <> 1 OR touched <> 1"
        ))
        .await,
        0
    );
}
