//! The zero-downtime proof: the example plans, run by the built binary against a
//! live workload of old and new application versions, and their rollback.
//!
//! `cargo test --test it proof -- --nocapture` prints the figures the README reports.

use std::collections::HashMap;
use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio::sync::Mutex as AsyncMutex;

use crate::harness::*;

const RENAME_PLAN: &str = "plans/examples/rename_column_by_hand.yaml";
const RENAME_ID: &str = "rename_customers_fullname";
const WIDEN_PLAN: &str = "plans/examples/widen_int_to_bigint_by_hand.yaml";
const ROWS: i64 = 100_000;
/// The rename plan's `lock_timeout`.
const LOCK_TIMEOUT_MS: f64 = 500.0;
/// Slack for scheduling on a shared, busy test machine.
const MARGIN_MS: f64 = 150.0;

fn expect_code(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

/// Runs pgshift off the async runtime, so the workload keeps going meanwhile.
async fn pgshift_async(db: &TestDb, args: &[&str]) -> (Output, Duration) {
    let url = db.url.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        let o = pgshift_with_env(&args, &[("DATABASE_URL", url.as_str())]);
        (o, t0.elapsed())
    })
    .await
    .unwrap()
}

/// The `ms` of every "batch committed" line of a `--log-format json -vv` run.
fn batch_durations_ms(stderr_text: &str) -> Vec<f64> {
    stderr_text
        .lines()
        .filter_map(|l| serde_json::from_str::<Json>(l).ok())
        .filter(|v| v["message"] == "batch committed")
        .filter_map(|v| v["fields"]["ms"].as_f64())
        .collect()
}

/// Columns, indexes, constraints, triggers and functions of schema `public`.
async fn catalog_snapshot(db: &TestDb) -> String {
    db.scalar_string(
        "SELECT coalesce((SELECT string_agg(table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, ''), E'\\n' ORDER BY table_name, ordinal_position)
                          FROM information_schema.columns WHERE table_schema = 'public'), '')
             || E'\\n--\\n' ||
             coalesce((SELECT string_agg(indexdef, E'\\n' ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'public'), '')
             || E'\\n--\\n' ||
             coalesce((SELECT string_agg(conname || ' ' || pg_get_constraintdef(oid), E'\\n' ORDER BY conname) FROM pg_constraint WHERE connamespace = 'public'::regnamespace), '')
             || E'\\n--\\n' ||
             coalesce((SELECT string_agg(tgrelid::regclass || ' ' || tgname, E'\\n' ORDER BY tgname) FROM pg_trigger WHERE NOT tgisinternal), '')
             || E'\\n--\\n' ||
             coalesce((SELECT string_agg(proname, E'\\n' ORDER BY proname) FROM pg_proc WHERE pronamespace = 'public'::regnamespace), '')",
    )
    .await
    .unwrap()
}

/// Generated triggers and functions left in the database.
async fn generated_objects(db: &TestDb) -> i64 {
    db.scalar_i64(
        "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgshift\\_%')
              + (SELECT count(*) FROM pg_proc WHERE proname LIKE 'pgshift\\_%')",
    )
    .await
}

async fn column_count(db: &TestDb, table: &str, column: &str) -> i64 {
    db.scalar_i64(&format!(
        "SELECT count(*) FROM information_schema.columns
         WHERE table_schema = 'public' AND table_name = '{table}' AND column_name = '{column}'"
    ))
    .await
}

/// Everything in the table, in one string (for "data intact").
async fn table_digest(db: &TestDb, sql: &str) -> String {
    db.scalar_string(&format!(
        "SELECT md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM ({sql}) t"
    ))
    .await
    .unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    OldWriter,
    NewWriter,
    Reader,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::OldWriter => "old writers",
            Kind::NewWriter => "new writers",
            Kind::Reader => "readers",
        }
    }
}

/// What one client saw.
#[derive(Default)]
struct ClientLog {
    latencies_ms: Vec<f64>,
    /// Errors, with whether the contract phase had begun when they happened.
    errors: Vec<(bool, String)>,
    /// The client's backend, to match its statements with what it waited on.
    pid: i32,
    /// Statements slower than [`SLOW_MS`]: start and end, in ms from `Shared::epoch`.
    slow: Vec<(f64, f64)>,
}

impl ClientLog {
    /// Records one statement that started at `t0`.
    fn took(&mut self, sh: &Shared, t0: Instant) {
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        self.latencies_ms.push(ms);
        if ms > SLOW_MS {
            let start = (t0 - sh.epoch).as_secs_f64() * 1e3;
            self.slow.push((start, start + ms));
        }
    }
}

/// Statements slower than this are kept with their interval, to be matched
/// with the sampled waits.
const SLOW_MS: f64 = 300.0;

/// State the clients share with the test.
struct Shared {
    stop_old: AtomicBool,
    stop_all: AtomicBool,
    contract_began: AtomicBool,
    /// Serialises writers of the same row, so "the last write" of a row is well defined.
    stripes: Vec<AsyncMutex<()>>,
    /// The last value written to each row, through either column.
    expected: std::sync::Mutex<HashMap<i64, String>>,
    counter: AtomicU64,
    /// Where the clients' and the sampler's times count from.
    epoch: Instant,
}

impl Shared {
    /// Waits until the writers have made `n` more writes, so that "the
    /// application kept working meanwhile" holds however fast the machine is.
    async fn writes(&self, n: u64) {
        let from = self.counter.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.counter.load(Ordering::SeqCst) < from + n {
            assert!(
                Instant::now() < deadline,
                "the writers made fewer than {n} writes in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn stripe(&self, id: i64) -> &AsyncMutex<()> {
        &self.stripes[(id as usize) % self.stripes.len()]
    }
}

/// A small deterministic generator (xorshift), one per client.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

async fn client_loop(url: String, kind: Kind, seed: u64, sh: Arc<Shared>) -> ClientLog {
    let c = connect(&url).await;
    let mut log = ClientLog {
        pid: c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0),
        ..ClientLog::default()
    };
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let column = match kind {
        Kind::OldWriter => "fullname",
        Kind::NewWriter => "display_name",
        Kind::Reader => "",
    };
    let insert = format!("INSERT INTO customers ({column}, email) VALUES ($1, $2) RETURNING id");
    let update = format!("UPDATE customers SET {column} = $1 WHERE id = $2");
    let mut mine: Vec<i64> = Vec::new();
    loop {
        if sh.stop_all.load(Ordering::SeqCst)
            || (kind == Kind::OldWriter && sh.stop_old.load(Ordering::SeqCst))
        {
            break;
        }
        let contract = sh.contract_began.load(Ordering::SeqCst);
        match kind {
            Kind::Reader => {
                let id = 1 + rng.below(ROWS as u64) as i64;
                let t0 = Instant::now();
                let r = c
                    .query_opt("SELECT id, email FROM customers WHERE id = $1", &[&id])
                    .await;
                log.took(&sh, t0);
                if let Err(e) = r {
                    log.errors.push((contract, e.to_string()));
                }
            }
            Kind::OldWriter | Kind::NewWriter => {
                let n = sh.counter.fetch_add(1, Ordering::SeqCst);
                let value = format!("{} {n}", if column == "fullname" { "old" } else { "new" });
                if rng.below(4) == 0 {
                    let email = format!("w{n}@example.com");
                    let t0 = Instant::now();
                    let r = c.query_one(&insert, &[&value, &email]).await;
                    log.took(&sh, t0);
                    match r {
                        Ok(row) => {
                            let id: i64 = row.get(0);
                            mine.push(id);
                            sh.expected.lock().unwrap().insert(id, value);
                        }
                        Err(e) => log.errors.push((contract, e.to_string())),
                    }
                } else {
                    let id = if !mine.is_empty() && rng.below(5) == 0 {
                        mine[rng.below(mine.len() as u64) as usize]
                    } else {
                        1 + rng.below(ROWS as u64) as i64
                    };
                    let _row = sh.stripe(id).lock().await;
                    let t0 = Instant::now();
                    let r = c.execute(&update, &[&value, &id]).await;
                    log.took(&sh, t0);
                    match r {
                        Ok(1) => {
                            sh.expected.lock().unwrap().insert(id, value);
                        }
                        Ok(n) => log
                            .errors
                            .push((contract, format!("update of id {id} touched {n} rows"))),
                        Err(e) => log.errors.push((contract, e.to_string())),
                    }
                }
            }
        }
        // An application is not a benchmark: leave the two cores some air.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    log
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

const OLD_WRITERS: u64 = 3;
const NEW_WRITERS: u64 = 3;
const READERS: u64 = 3;

// Issue 5: the rename example under 9 clients of both application versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proof_rename_under_load_loses_no_write_and_stalls_no_query() {
    let db = TestDb::create("proof_rename").await;
    db.exec(&format!(
        "CREATE TABLE customers (
             id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
             fullname text,
             email text NOT NULL,
             created_at timestamptz NOT NULL DEFAULT now());
         INSERT INTO customers (fullname, email)
             SELECT 'customer ' || g, 'c' || g || '@example.com' FROM generate_series(1, {ROWS}) g;"
    ))
    .await;
    db.exec("VACUUM ANALYZE customers").await;
    let plan = project_file(RENAME_PLAN);
    let plan = plan.to_str().unwrap();

    let sh = Arc::new(Shared {
        stop_old: AtomicBool::new(false),
        stop_all: AtomicBool::new(false),
        contract_began: AtomicBool::new(false),
        stripes: (0..64).map(|_| AsyncMutex::new(())).collect(),
        expected: std::sync::Mutex::new(HashMap::new()),
        counter: AtomicU64::new(0),
        epoch: Instant::now(),
    });
    let sampler = WaitSampler::start(&db.url, sh.epoch).await;
    let mut old = Vec::new();
    let mut others = Vec::new();
    for i in 0..OLD_WRITERS {
        old.push(tokio::spawn(client_loop(
            db.url.clone(),
            Kind::OldWriter,
            i + 1,
            sh.clone(),
        )));
    }
    for i in 0..READERS {
        others.push((
            Kind::Reader,
            tokio::spawn(client_loop(
                db.url.clone(),
                Kind::Reader,
                100 + i,
                sh.clone(),
            )),
        ));
    }
    // The new version is deployed once its column exists and the dual-write
    // trigger keeps the old version's column right: a write through
    // `display_name` before the trigger exists would not reach `fullname`, and
    // the backfill (fullname → display_name) would then overwrite it.
    let new_writers = tokio::spawn({
        let url = db.url.clone();
        let sh = sh.clone();
        async move {
            let c = connect(&url).await;
            loop {
                let ready: bool = c
                    .query_one(
                        "SELECT EXISTS (SELECT FROM information_schema.columns
                                         WHERE table_name = 'customers' AND column_name = 'display_name')
                            AND EXISTS (SELECT FROM pg_trigger
                                         WHERE tgrelid = 'customers'::regclass AND tgname LIKE 'pgshift\\_%')",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if ready || sh.stop_all.load(Ordering::SeqCst) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (0..NEW_WRITERS)
                .map(|i| {
                    tokio::spawn(client_loop(
                        url.clone(),
                        Kind::NewWriter,
                        200 + i,
                        sh.clone(),
                    ))
                })
                .collect::<Vec<_>>()
        }
    });
    // Let the workload reach its pace before the plan starts.
    sh.writes(100).await;

    let (o, apply_time) = pgshift_async(
        &db,
        &[
            "--progress",
            "never",
            "--log-format",
            "json",
            "-vv",
            "plan",
            "apply",
            plan,
        ],
    )
    .await;
    expect_code(&o, 3, "apply stops at the gate");
    let batches = batch_durations_ms(&stderr(&o));
    assert!(!batches.is_empty(), "no batch in the log:\n{}", stderr(&o));

    // At the gate both versions run; the trigger keeps the columns equal.
    let new_writers = new_writers.await.unwrap();
    assert_eq!(
        new_writers.len() as u64,
        NEW_WRITERS,
        "the new version never started"
    );
    sh.writes(100).await;
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM customers WHERE display_name IS DISTINCT FROM fullname"
        )
        .await,
        0,
        "columns disagree at the gate"
    );

    // The operator retires the old version, then passes the gate.
    sh.stop_old.store(true, Ordering::SeqCst);
    let mut logs: Vec<(Kind, ClientLog)> = Vec::new();
    for h in old {
        logs.push((Kind::OldWriter, h.await.unwrap()));
    }
    sh.contract_began.store(true, Ordering::SeqCst);
    let (o, resume_time) =
        pgshift_async(&db, &["--progress", "never", "--yes", "resume", RENAME_ID]).await;
    expect_code(&o, 0, "resume runs the contract");
    // The new version keeps running on the contracted table for a while.
    sh.writes(50).await;
    sh.stop_all.store(true, Ordering::SeqCst);
    for (k, h) in others {
        logs.push((k, h.await.unwrap()));
    }
    for h in new_writers {
        logs.push((Kind::NewWriter, h.await.unwrap()));
    }

    // The schema is contracted.
    assert_eq!(column_count(&db, "customers", "fullname").await, 0);
    assert_eq!(column_count(&db, "customers", "display_name").await, 1);
    assert_eq!(
        generated_objects(&db).await,
        0,
        "the dual-write trigger is left"
    );

    // Every row holds what was written last through either column.
    let expected = sh.expected.lock().unwrap().clone();
    let actual: HashMap<i64, Option<String>> = db
        .client
        .query("SELECT id, display_name FROM customers", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut wrong = Vec::new();
    for (id, want) in &expected {
        let got = actual.get(id).cloned().flatten();
        if got.as_deref() != Some(want.as_str()) {
            wrong.push(format!("id {id}: wrote {want:?}, display_name is {got:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} written rows lost their last write, e.g. {:?}",
        wrong.len(),
        expected.len(),
        &wrong[..wrong.len().min(5)]
    );
    // Rows nobody wrote during the run still hold their original name.
    let untouched_wrong = actual
        .iter()
        .filter(|(id, _)| !expected.contains_key(id))
        .filter(|(id, v)| v.as_deref() != Some(format!("customer {id}").as_str()))
        .count();
    assert_eq!(
        untouched_wrong, 0,
        "rows not written during the run changed"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM customers WHERE display_name IS NULL")
            .await,
        0
    );

    // Latencies and errors, per client kind.
    let batch_max = batches.iter().cloned().fold(0.0, f64::max);
    let bound = LOCK_TIMEOUT_MS + batch_max + MARGIN_MS;
    let mut all = Vec::new();
    let mut failures = Vec::new();
    println!(
        "proof: {ROWS} rows, {} clients ({OLD_WRITERS} old writers, {NEW_WRITERS} new writers, {READERS} readers), \
         {} rows written during the run",
        OLD_WRITERS + NEW_WRITERS + READERS,
        expected.len()
    );
    println!(
        "proof: plan wall time {:.2}s (apply to the gate {:.2}s, resume through the contract {:.2}s); \
         {} backfill batches, batch max {batch_max:.0} ms; latency bound {bound:.0} ms",
        (apply_time + resume_time).as_secs_f64(),
        apply_time.as_secs_f64(),
        resume_time.as_secs_f64(),
        batches.len()
    );
    for kind in [Kind::OldWriter, Kind::NewWriter, Kind::Reader] {
        let mut lat: Vec<f64> = Vec::new();
        let mut errors = 0;
        for (k, l) in logs.iter().filter(|(k, _)| *k == kind) {
            lat.extend(&l.latencies_ms);
            for (contract, e) in &l.errors {
                errors += 1;
                // Only an old-version statement after the contract began may fail.
                if !(*k == Kind::OldWriter && *contract) {
                    failures.push(format!("{}: {e}", k.label()));
                }
            }
        }
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "proof: {:<12} {:>7} statements, {errors} errors, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            kind.label(),
            lat.len(),
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            lat.last().copied().unwrap_or(0.0)
        );
        all.extend(lat);
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "proof: {:<12} {:>7} statements, {} errors, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        "total",
        all.len(),
        failures.len(),
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        all.last().copied().unwrap_or(0.0)
    );
    assert!(
        failures.is_empty(),
        "workload statements failed: {failures:?}"
    );
    for kind in [Kind::OldWriter, Kind::NewWriter, Kind::Reader] {
        assert!(
            logs.iter()
                .any(|(k, l)| *k == kind && !l.latencies_ms.is_empty()),
            "no {} statement ran",
            kind.label()
        );
    }
    // pgshift's part in a wait is a lock: its DDL queues for at most the lock
    // timeout, a batch holds its rows for at most one batch. A statement over
    // that bound fails the proof if its backend was seen waiting on a lock
    // meanwhile. One that waited on the server's WAL or disk instead (a busy or
    // slow disk stalls commits for hundreds of ms with no pgshift running at
    // all) is said, and held to the looser `IO_BOUND_MS`.
    let waits = sampler.finish().await;
    let mut on_locks = Vec::new();
    for (k, l) in &logs {
        for &(start, end) in l.slow.iter().filter(|(s, e)| e - s >= bound) {
            let seen = waits.of(l.pid, start, end);
            let line = format!(
                "{} statement of {:.0} ms at {:.0} ms, waiting on {seen:?}",
                k.label(),
                end - start,
                start
            );
            println!("proof: over the bound: {line}");
            if on_a_lock(&seen) {
                on_locks.push(line);
            }
        }
    }
    assert!(
        on_locks.is_empty(),
        "workload statements waited on a lock longer than the lock timeout plus one batch ({bound:.0} ms): {on_locks:?}"
    );
    let max = all.last().copied().unwrap_or(0.0);
    assert!(
        max < IO_BOUND_MS,
        "a workload statement waited {max:.0} ms (the bound for waits on anything but a lock is {IO_BOUND_MS:.0} ms)"
    );
}

/// The bound for a statement that did not wait on a lock.
const IO_BOUND_MS: f64 = 3000.0;

/// Applies `plan` (exit 3 at its gate).
async fn apply_to_gate(db: &TestDb, plan: &Path) {
    let o = db.pgshift(&[
        "--progress",
        "never",
        "plan",
        "apply",
        plan.to_str().unwrap(),
    ]);
    expect_code(&o, 3, "apply stops at the gate");
}

// Issue 5: rollback after dual write and backfill leaves the table as it was.
#[tokio::test]
async fn proof_rename_rolled_back_at_the_gate_restores_the_table() {
    let db = TestDb::create("proof_rename_rollback").await;
    db.exec(
        "CREATE TABLE customers (
             id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
             fullname text,
             email text NOT NULL);
         INSERT INTO customers (fullname, email)
             SELECT CASE WHEN g % 50 = 0 THEN NULL ELSE 'customer ' || g END, 'c' || g || '@example.com'
             FROM generate_series(1, 5000) g;",
    )
    .await;
    let before = catalog_snapshot(&db).await;
    apply_to_gate(&db, &project_file(RENAME_PLAN)).await;
    assert_eq!(column_count(&db, "customers", "display_name").await, 1);
    assert_eq!(generated_objects(&db).await, 2, "trigger and function");
    // Both versions write while the plan waits at its gate.
    db.exec(
        "UPDATE customers SET display_name = 'renamed by new' WHERE id = 7;
         UPDATE customers SET fullname = 'renamed by old' WHERE id = 8;
         INSERT INTO customers (id, display_name, email) VALUES (100001, 'inserted by new', 'n@example.com');
         INSERT INTO customers (id, fullname, email) VALUES (100002, 'inserted by old', 'o@example.com');",
    )
    .await;
    let data = "SELECT id, fullname, email FROM customers";
    let digest = table_digest(&db, data).await;

    let o = db.pgshift(&["--progress", "never", "--yes", "rollback", RENAME_ID]);
    expect_code(&o, 0, "rollback");
    assert_eq!(generated_objects(&db).await, 0, "trigger or function left");
    assert_eq!(column_count(&db, "customers", "display_name").await, 0);
    assert_eq!(
        catalog_snapshot(&db).await,
        before,
        "the table is not as before"
    );
    assert_eq!(table_digest(&db, data).await, digest, "data changed");
    assert_eq!(
        db.scalar_string("SELECT fullname FROM customers WHERE id = 7")
            .await
            .as_deref(),
        Some("renamed by new"),
        "a new-version write did not reach the old column"
    );
    assert_eq!(
        db.scalar_string("SELECT fullname FROM customers WHERE id = 100001")
            .await
            .as_deref(),
        Some("inserted by new")
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM customers").await, 5002);
}

// Issue 5: the int → bigint example end to end.
#[tokio::test]
async fn proof_widen_int_to_bigint_keeps_every_value() {
    let db = TestDb::create("proof_widen").await;
    db.exec(
        "CREATE TABLE orders (
             id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
             quantity integer,
             note text);
         INSERT INTO orders (quantity, note)
             SELECT CASE g % 7 WHEN 0 THEN NULL WHEN 1 THEN 2147483647 WHEN 2 THEN -2147483648 ELSE g * 37 END,
                    'order ' || g
             FROM generate_series(1, 20000) g;
         CREATE TABLE orders_before AS SELECT id, quantity FROM orders;",
    )
    .await;
    let plan = project_file(WIDEN_PLAN);
    apply_to_gate(&db, &plan).await;
    // Writers of both columns at the gate.
    db.exec(
        "UPDATE orders SET quantity = 5 WHERE id = 3;
         UPDATE orders SET quantity_big = 6 WHERE id = 4;
         UPDATE orders_before SET quantity = 5 WHERE id = 3;
         UPDATE orders_before SET quantity = 6 WHERE id = 4;",
    )
    .await;
    let o = db.pgshift(&[
        "--progress",
        "never",
        "--yes",
        "resume",
        "widen_orders_quantity",
    ]);
    expect_code(&o, 0, "resume through the contract");
    assert_eq!(
        db.scalar_string(
            "SELECT data_type FROM information_schema.columns
             WHERE table_name = 'orders' AND column_name = 'quantity_big'"
        )
        .await
        .as_deref(),
        Some("bigint")
    );
    assert_eq!(column_count(&db, "orders", "quantity").await, 0);
    assert_eq!(generated_objects(&db).await, 0);
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM orders o FULL JOIN orders_before b USING (id)
             WHERE o.id IS NULL OR b.id IS NULL OR o.quantity_big IS DISTINCT FROM b.quantity::bigint"
        )
        .await,
        0,
        "values differ after the type change"
    );
}
