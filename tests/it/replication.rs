//! Replication-aware throttles against clusters the tests start: a logical slot
//! that falls behind holds the backfill until its consumer catches up (and the lag
//! never passes the limit by more than a batch's WAL); `max_wal_rate` paces the
//! batches to the limit; a named slot that disappears holds until an operator
//! retunes the plan with `pgshift throttle`; an anti-wraparound autovacuum of the
//! table holds the backfill while it runs.
//!
//! Every table logs its batches from a statement-level trigger (WAL position and
//! clock at the end of each batch), so the figures come from the server itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use pgshift::engine::{BackfillProgress, Options, Outcome};
use tokio_postgres::Client;

use crate::backfill::{Recorder, i64_of, plan, register_on, rows_done, run};
use crate::cluster::Cluster;
use crate::harness::*;

/// `items` with `rows` rows, an update counter, and `batch_log` (WAL position and
/// clock at the end of each batch); then the control schema and the plan.
async fn setup(url: &str, rows: i64, p: &pgshift::plan::Plan) -> Client {
    let mut c = connect(url).await;
    c.batch_execute(&format!(
        "CREATE TABLE items (id bigint PRIMARY KEY, src text NOT NULL, v text, n int NOT NULL DEFAULT 0);
         INSERT INTO items (id, src) SELECT g, repeat('row ' || g, 8) FROM generate_series(1, {rows}) g;
         CREATE FUNCTION count_update() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.n := OLD.n + 1; RETURN NEW; END $$;
         CREATE TRIGGER count_update BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION count_update();
         CREATE TABLE batch_log (id serial PRIMARY KEY, wal pg_lsn NOT NULL, at timestamptz NOT NULL);
         CREATE FUNCTION log_batch() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO batch_log (wal, at) VALUES (pg_current_wal_insert_lsn(), clock_timestamp()); RETURN NULL; END $$;
         CREATE TRIGGER log_batch AFTER UPDATE ON items FOR EACH STATEMENT EXECUTE FUNCTION log_batch();"
    ))
    .await
    .unwrap();
    register_on(&mut c, p).await;
    c
}

async fn assert_all_rows_once(c: &Client) {
    assert_eq!(
        i64_of(
            c,
            "SELECT count(*) FROM items WHERE n <> 1 OR v IS DISTINCT FROM md5(src)"
        )
        .await,
        0,
        "every row updated exactly once"
    );
}

/// The first hold reason the reporter saw that contains `needle`.
async fn wait_for_hold(r: &Recorder, needle: &str, secs: u64) -> BackfillProgress {
    let start = Instant::now();
    loop {
        if let Some(p) = r
            .progress
            .lock()
            .unwrap()
            .iter()
            .find(|p| p.held && p.throttled.as_deref().is_some_and(|t| t.contains(needle)))
        {
            return p.clone();
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The largest WAL one batch (and whatever came between it and the previous one) wrote.
async fn max_batch_wal(c: &Client) -> i64 {
    i64_of(
        c,
        "SELECT coalesce(max(d), 0)::int8 FROM (SELECT (wal - lag(wal) OVER (ORDER BY id))::int8 AS d FROM batch_log) s",
    )
    .await
}

const LIMIT: i64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logical_slot_behind_holds_the_backfill_until_its_consumer_catches_up() {
    let server = Cluster::primary_with("slotlag", "wal_level = logical\nmax_replication_slots = 4");
    let url = server.url("postgres");
    let p = plan(
        "table: items\nset: { v: \"md5(src)\" }\nwhere: v IS NULL\nbatch_size: 200\nthrottle: { max_slot_lag: 1MB }",
    );
    let c = setup(&url, 20_000, &p).await;
    c.batch_execute("SELECT pg_create_logical_replication_slot('realtime', 'test_decoding')")
        .await
        .unwrap();
    // The test watches the slot's lag all along, every few milliseconds.
    let watching = Arc::new(AtomicBool::new(true));
    let worst = Arc::new(AtomicI64::new(0));
    let watcher = {
        let (watching, worst, url) = (watching.clone(), worst.clone(), url.clone());
        tokio::spawn(async move {
            let w = connect(&url).await;
            while watching.load(Ordering::Relaxed) {
                let lag = i64_of(&w, "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 FROM pg_replication_slots WHERE slot_name = 'realtime'").await;
                worst.fetch_max(lag, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let r = Recorder::new();
    let task = tokio::spawn(run(url.clone(), p, r.clone(), Options::default()));

    // No consumer reads the slot: the backfill runs until the slot is a limit behind, then holds.
    let held = wait_for_hold(&r, "replication slot `realtime`", 60).await;
    let why = held.throttled.unwrap();
    assert!(
        why.contains("(max_slot_lag 1MB)") && why.contains("no consumer connected"),
        "{why}"
    );
    let at_hold = rows_done(&c).await;
    assert!(
        at_hold > 0 && at_hold < 20_000,
        "rows at the hold: {at_hold}"
    );
    assert!(!task.is_finished());

    // A slow consumer: 256 kB of the slot every 50 ms. The backfill follows it.
    let consuming = Arc::new(AtomicBool::new(true));
    let consumer = {
        let (consuming, url) = (consuming.clone(), url.clone());
        tokio::spawn(async move {
            let k = connect(&url).await;
            while consuming.load(Ordering::Relaxed) {
                k.batch_execute("SELECT pg_replication_slot_advance('realtime', least(pg_current_wal_lsn(), (SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'realtime') + 262144))").await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let out = tokio::time::timeout(Duration::from_secs(180), task)
        .await
        .expect("the backfill follows the consumer to the end")
        .unwrap()
        .unwrap_or_else(|e| panic!("backfill failed: {e}"));
    assert_eq!(out, Outcome::Done);
    consuming.store(false, Ordering::Relaxed);
    watching.store(false, Ordering::Relaxed);
    consumer.await.unwrap();
    watcher.await.unwrap();
    assert_all_rows_once(&c).await;
    let batch = max_batch_wal(&c).await;
    let worst = worst.load(Ordering::Relaxed);
    eprintln!("slot lag: worst {worst} bytes, limit {LIMIT}, largest batch {batch} bytes");
    assert!(
        worst <= LIMIT + batch,
        "the slot fell {worst} bytes behind (limit {LIMIT}, one batch {batch})"
    );
    let holds: Vec<String> = c
        .query("SELECT event || ': ' || detail::text FROM pgshift.events WHERE event LIKE 'throttle%' ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        holds
            .iter()
            .any(|h| h.starts_with("throttle_hold") && h.contains("realtime")),
        "{holds:?}"
    );
    assert!(
        i64_of(
            &c,
            "SELECT count(*) FROM pgshift.events WHERE event = 'throttle_released'"
        )
        .await
            >= 1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_wal_rate_paces_the_batches_to_the_limit() {
    let server = Cluster::primary("walrate");
    let url = server.url("postgres");
    let p = plan(
        "table: items\nset: { v: \"md5(src)\" }\nwhere: v IS NULL\nbatch_size: 200\nthrottle: { max_wal_rate: 1MB/s }",
    );
    let c = setup(&url, 12_000, &p).await;
    let r = Recorder::new();
    let out = run(url.clone(), p, r.clone(), Options::default())
        .await
        .unwrap();
    assert_eq!(out, Outcome::Done);
    assert_all_rows_once(&c).await;
    // From the end of the first batch to the end of the last one, as the server saw it.
    let row = c
        .query_one(
            "SELECT (max(wal) - min(wal))::float8, extract(epoch FROM max(at) - min(at))::float8, count(*) FROM batch_log",
            &[],
        )
        .await
        .unwrap();
    let (bytes, secs, batches): (f64, f64, i64) = (row.get(0), row.get(1), row.get(2));
    let rate = bytes / secs;
    eprintln!("WAL rate: {rate:.0} bytes/s over {secs:.1}s and {batches} batches (limit {LIMIT})");
    assert!(secs > 2.0, "too short to measure a rate: {secs}s");
    assert!(
        (0.9 * LIMIT as f64..=1.1 * LIMIT as f64).contains(&rate),
        "{rate:.0} bytes/s is not within 10% of {LIMIT}"
    );
    assert!(
        r.progress
            .lock()
            .unwrap()
            .iter()
            .any(
                |p| p.throttled.as_deref() == Some("WAL rate cap 1MB/s (max_wal_rate)") && !p.held
            )
    );
}

/// The WAL cap counts what the server writes while a batch runs. An application
/// that by itself writes far more than the cap must not stop the backfill: its
/// WAL during the pauses once made each pause longer than the one before, so
/// that after three or four batches the backfill slept for hours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_writing_more_wal_than_the_cap_does_not_stop_the_backfill() {
    let server = Cluster::primary("walbusy");
    let url = server.url("postgres");
    let p = plan(
        "table: items\nset: { v: \"md5(src)\" }\nwhere: v IS NULL\nbatch_size: 200\nthrottle: { max_wal_rate: 1MB/s }",
    );
    let c = setup(&url, 4_000, &p).await;
    c.batch_execute("CREATE TABLE app_log (id bigserial PRIMARY KEY, body text NOT NULL)")
        .await
        .unwrap();
    // The application: rows of 1kB, as fast as it can, all through the backfill.
    let writing = Arc::new(AtomicBool::new(true));
    let app = {
        let writing = writing.clone();
        let w = connect(&url).await;
        tokio::spawn(async move {
            while writing.load(Ordering::Relaxed) {
                w.batch_execute(
                    "INSERT INTO app_log (body) SELECT repeat(md5(g::text), 32) FROM generate_series(1, 200) g",
                )
                .await
                .unwrap();
            }
        })
    };
    let lsn = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8";
    let wal_before = i64_of(&c, lsn).await;
    let start = Instant::now();
    let r = Recorder::new();
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        run(url.clone(), p, r.clone(), Options::default()),
    )
    .await
    .expect("the backfill finishes while the application writes")
    .unwrap_or_else(|e| panic!("backfill failed: {e}"));
    let secs = start.elapsed().as_secs_f64();
    let server_rate = (i64_of(&c, lsn).await - wal_before) as f64 / secs;
    writing.store(false, Ordering::Relaxed);
    app.await.unwrap();
    assert_eq!(out, Outcome::Done);
    assert_all_rows_once(&c).await;
    eprintln!(
        "20 batches in {secs:.1}s while the server wrote {server_rate:.0} bytes/s (cap {LIMIT})"
    );
    // The test means something only if the application alone was over the cap.
    assert!(
        server_rate > 4.0 * LIMIT as f64,
        "the application wrote too little WAL to test this: {server_rate:.0} bytes/s"
    );
    // The batches were still paced by the cap: the backfill did not run flat out.
    assert!(
        r.progress
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.throttled.as_deref() == Some("WAL rate cap 1MB/s (max_wal_rate)")),
        "no batch was paced by the cap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_slot_that_disappears_holds_until_the_plan_is_retuned() {
    let server =
        Cluster::primary_with("slotgone", "wal_level = logical\nmax_replication_slots = 4");
    let url = server.url("postgres");
    let p = plan(
        "table: items\nset: { v: \"md5(src)\" }\nwhere: v IS NULL\nbatch_size: 100\nthrottle: { max_slot_lag: 1GB, slots: [debezium], sleep: 20ms }",
    );
    let c = setup(&url, 20_000, &p).await;
    c.batch_execute("SELECT pg_create_logical_replication_slot('debezium', 'test_decoding')")
        .await
        .unwrap();
    let r = Recorder::new();
    let task = tokio::spawn(run(url.clone(), p, r.clone(), Options::default()));
    let start = Instant::now();
    while rows_done(&c).await < 500 {
        assert!(start.elapsed() < Duration::from_secs(60), "no batches ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.batch_execute("SELECT pg_drop_replication_slot('debezium')")
        .await
        .unwrap();
    let held = wait_for_hold(&r, "does not exist", 30).await;
    let why = held.throttled.unwrap();
    assert!(
        why.contains("replication slot `debezium` (named in `slots`) does not exist")
            && why.contains("pgshift throttle"),
        "{why}"
    );
    let at_hold = rows_done(&c).await;
    assert!(!task.is_finished() && at_hold < 20_000);

    // The operator retunes it live: watch every logical slot (there are none left).
    let o = pgshift_with_env(
        &["throttle", "bf", "--slots", "all"],
        &[("DATABASE_URL", url.as_str())],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("the backfill continues once retuned")
        .unwrap()
        .unwrap_or_else(|e| panic!("backfill failed: {e}"));
    assert_eq!(out, Outcome::Done);
    assert_all_rows_once(&c).await;
    let applied: Vec<String> = c
        .query(
            "SELECT detail::text FROM pgshift.events WHERE event = 'override_applied' ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(applied, vec![r#"{"slots": []}"#.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anti_wraparound_autovacuum_of_the_table_holds_the_backfill_while_it_runs() {
    let server = Cluster::primary_with(
        "wraparound",
        "autovacuum_freeze_max_age = 100000\nautovacuum_naptime = 1s\nautovacuum_max_workers = 1",
    );
    let url = server.url("postgres");
    let p = plan(
        "table: items\nset: { v: \"md5(src)\" }\nwhere: v IS NULL\nbatch_size: 100\nthrottle: { pause_on_autovacuum: true }",
    );
    let c = setup(&url, 3000, &p).await;
    // A slow vacuum of this table (a page or so per 50 ms), and the table's age past
    // autovacuum_freeze_max_age: autovacuum must vacuum it to prevent wraparound.
    c.batch_execute(
        "ALTER TABLE items SET (autovacuum_vacuum_cost_delay = 50, autovacuum_vacuum_cost_limit = 1);
         CREATE PROCEDURE burn(n int) LANGUAGE plpgsql AS $$ BEGIN FOR i IN 1..n LOOP PERFORM txid_current(); COMMIT; END LOOP; END $$;",
    )
    .await
    .unwrap();
    // On its own: a procedure commits only outside a transaction block.
    c.batch_execute("CALL burn(110000)").await.unwrap();
    let running = "SELECT EXISTS (SELECT 1 FROM pg_stat_activity a JOIN pg_stat_progress_vacuum p ON p.pid = a.pid WHERE p.relid = 'items'::regclass AND a.query LIKE '%to prevent wraparound%')";
    let start = Instant::now();
    while !c.query_one(running, &[]).await.unwrap().get::<_, bool>(0) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "autovacuum never started on items"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = Recorder::new();
    let task = tokio::spawn(run(url.clone(), p, r.clone(), Options::default()));
    let held = wait_for_hold(&r, "to prevent wraparound", 30).await;
    let why = held.throttled.unwrap();
    assert!(
        why.contains("items") && why.contains("pause_on_autovacuum"),
        "{why}"
    );
    // While the vacuum runs (seen in the same query as the rows), no batch applies.
    let check = format!(
        "SELECT ({running}), (SELECT coalesce(sum(rows_done), 0)::int8 FROM pgshift.backfill_ranges)"
    );
    loop {
        let row = c.query_one(&check, &[]).await.unwrap();
        let (av, done): (bool, i64) = (row.get(0), row.get(1));
        if !av {
            break;
        }
        assert_eq!(
            done, 0,
            "a batch applied while the anti-wraparound autovacuum ran"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = tokio::time::timeout(Duration::from_secs(120), task)
        .await
        .expect("the backfill continues after the vacuum")
        .unwrap()
        .unwrap_or_else(|e| panic!("backfill failed: {e}"));
    assert_eq!(out, Outcome::Done);
    assert_all_rows_once(&c).await;
    assert_eq!(
        i64_of(&c, "SELECT count(*) FROM pgshift.events WHERE event = 'throttle_hold' AND detail->>'reason' LIKE '%prevent wraparound%'").await,
        1
    );
}

/// A backfill whose WAL makes the server checkpoint every few seconds says so,
/// once, with the settings that would space the checkpoints out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_forced_by_the_backfill_are_said_once_with_what_to_do() {
    // The smallest max_wal_size the server takes: a checkpoint every ~17MB of WAL.
    let server = Cluster::primary_with(
        "ckpt",
        "max_wal_size = 32MB\nmin_wal_size = 32MB\ncheckpoint_timeout = 1h",
    );
    let url = server.url("postgres");
    let p = plan(
        "table: items\nset: { v: \"md5(src)\" }\nwhere: v IS NULL\nbatch_size: 500\nthrottle: { sleep: 15ms }",
    );
    // 300 batches and their pauses: long enough (about 6s) for the coordinator,
    // which reads the count every 2s, to see the checkpoints come.
    let c = setup(&url, 150_000, &p).await;
    let r = Recorder::new();
    let out = run(url.clone(), p, r.clone(), Options::default())
        .await
        .unwrap_or_else(|e| panic!("backfill failed: {e}"));
    assert_eq!(out, Outcome::Done);
    assert_all_rows_once(&c).await;
    let said: Vec<String> = r
        .messages
        .lock()
        .unwrap()
        .iter()
        .filter(|m| m.contains("checkpoints in"))
        .cloned()
        .collect();
    assert_eq!(said.len(), 1, "said once: {said:?}");
    assert!(
        said[0].contains("max_wal_size = 32MB")
            && said[0].contains("ALTER SYSTEM SET max_wal_size")
            && said[0].contains("pgshift throttle bf --max-wal-rate"),
        "{}",
        said[0]
    );
    let recorded = i64_of(
        &c,
        "SELECT count(*) FROM pgshift.events WHERE event = 'checkpoint_pressure' AND detail->>'max_wal_size' = '32MB' AND (detail->>'checkpoints')::int >= 3",
    )
    .await;
    assert_eq!(recorded, 1);
}
