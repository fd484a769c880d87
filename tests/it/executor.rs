//! The executor against the real server, through the built binary: failures and
//! resume, crashes at random instants, lock-safe DDL, the one-runner lock, plan
//! changes, CREATE INDEX CONCURRENTLY failures, SIGINT, rollback, run steps and
//! hooks, password redaction, and the status JSON.
//!
//! Every run uses a DATABASE_URL with a password (the server's trust auth ignores
//! it), and every output and the events table are checked for it.

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use crate::harness::*;

/// How long an application query may queue behind a DDL's lock request: the
/// lock timeout of the lock-safe DDL test (200ms) and a 300 ms margin.
const LOCK_BOUND: Duration = Duration::from_millis(500);

pub(crate) const SECRET: &str = "s3cretpw";

/// The test database's URL with a password in it.
pub(crate) fn secret_url(db: &TestDb) -> String {
    let u = db
        .url
        .replacen("postgres@", &format!("postgres:{SECRET}@"), 1);
    assert!(u.contains(SECRET), "cannot put a password into {}", db.url);
    u
}

/// A directory of its own for one test's plan files and hook outputs.
pub(crate) fn work_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join("pgshift-exectests").join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub(crate) fn write_plan(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let p = dir.join(format!("{name}.yaml"));
    std::fs::write(&p, yaml).unwrap();
    p
}

pub(crate) fn no_secret(what: &str, text: &str) {
    assert!(
        !text.contains(SECRET),
        "the password appears in {what}:\n{text}"
    );
}

/// Runs pgshift with the password URL; checks the password is in neither stream.
pub(crate) fn run(db: &TestDb, args: &[&str]) -> Output {
    let url = secret_url(db);
    let o = pgshift_with_env(args, &[("DATABASE_URL", url.as_str())]);
    no_secret(&format!("stdout of {args:?}"), &stdout(&o));
    no_secret(&format!("stderr of {args:?}"), &stderr(&o));
    o
}

pub(crate) fn expect_code(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

/// Starts pgshift in the background (to kill or interrupt it); stdout and stderr piped.
pub(crate) fn spawn(db: &TestDb, args: &[&str]) -> Child {
    std::process::Command::new(bin())
        .args(args)
        .env("DATABASE_URL", secret_url(db))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn pgshift")
}

/// Waits for a spawned run (up to `limit`), checks its output for the password.
pub(crate) fn wait_output(child: Child, limit: Duration, what: &str) -> Output {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let o = match rx.recv_timeout(limit) {
        Ok(o) => o.expect("wait for pgshift"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{what}: pgshift did not exit within {limit:?}");
        }
    };
    no_secret(&format!("stdout of {what}"), &stdout(&o));
    no_secret(&format!("stderr of {what}"), &stderr(&o));
    o
}

pub(crate) fn signal(child: &Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {}", child.id());
}

/// `status PLAN --format json`, the plan's object.
pub(crate) fn status_json(db: &TestDb, plan: &str) -> Json {
    let o = run(db, &["status", plan, "--format", "json", "--events"]);
    expect_code(&o, 0, "status");
    let v: Json = serde_json::from_str(&stdout(&o))
        .unwrap_or_else(|e| panic!("status JSON: {e}\n{}", stdout(&o)));
    v["plans"][0].clone()
}

pub(crate) fn step<'a>(plan: &'a Json, name: &str) -> &'a Json {
    plan["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {plan:#}"))
}

pub(crate) fn step_status(plan: &Json, name: &str) -> String {
    step(plan, name)["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

pub(crate) fn events_named(plan: &Json, event: &str) -> Vec<Json> {
    plan["events"]
        .as_array()
        .map(|a| a.iter().filter(|e| e["event"] == event).cloned().collect())
        .unwrap_or_default()
}

/// The password is in no row of the control tables.
pub(crate) async fn control_tables_clean(db: &TestDb) {
    for table in ["events", "plans", "steps"] {
        let n = db
            .scalar_i64(&format!(
                "SELECT count(*) FROM pgshift.{table} t WHERE t::text LIKE '%{SECRET}%'"
            ))
            .await;
        assert_eq!(n, 0, "the password appears in pgshift.{table}");
    }
}

async fn runs_per_step(db: &TestDb) -> Vec<(String, i64)> {
    db.client
        .query(
            "SELECT step, count(*) FROM runs GROUP BY step ORDER BY step",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Polls `sql` (a boolean query) until true, for up to `limit`.
pub(crate) async fn wait_until(db: &TestDb, sql: &str, limit: Duration) {
    let start = Instant::now();
    loop {
        let v: bool = db.client.query_one(sql, &[]).await.unwrap().get(0);
        if v {
            return;
        }
        assert!(start.elapsed() < limit, "not true after {limit:?}: {sql}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// 1 + 10 + 11: a failure at step 3, the status JSON, resume without re-running steps 1–2.
#[tokio::test]
async fn failed_step_resumes_without_rerunning_earlier_steps() {
    let db = TestDb::create("ex_fail_resume").await;
    db.exec("CREATE TABLE runs (step text NOT NULL)").await;
    let dir = work_dir("fail_resume");
    let plan = write_plan(
        &dir,
        "fail_resume",
        "id: fail_resume
settings: { lock_timeout: 200ms, retries: 2 }
phases:
  expand:
    - name: s1
      sql: INSERT INTO runs VALUES ('s1')
      rollback: DELETE FROM runs WHERE step = 's1'
    - name: s2
      sql: INSERT INTO runs VALUES ('s2')
      rollback: DELETE FROM runs WHERE step = 's2'
    - name: s3
      sql: |
        INSERT INTO runs VALUES ('s3');
        INSERT INTO needed (id) VALUES (1)
      rollback: DELETE FROM runs WHERE step = 's3'
    - name: s4
      sql: INSERT INTO runs VALUES ('s4')
      rollback: DELETE FROM runs WHERE step = 's4'
",
    );
    let f = plan.to_str().unwrap();
    let o = run(&db, &["plan", "apply", f]);
    expect_code(&o, 1, "apply with a failing step 3");
    assert!(stderr(&o).contains("s3"), "{}", stderr(&o));

    let p = status_json(&db, "fail_resume");
    // 11: the documented fields.
    for key in ["id", "status", "steps", "next", "checksum", "file"] {
        assert!(p.get(key).is_some(), "status JSON lacks `{key}`: {p:#}");
    }
    assert_eq!(p["id"], "fail_resume");
    assert_eq!(p["status"], "failed");
    assert!(p["next"].as_str().unwrap().contains("resume"), "{p:#}");
    for s in p["steps"].as_array().unwrap() {
        for key in [
            "name",
            "status",
            "attempts",
            "last_error",
            "last_sqlstate",
            "rows_done",
            "phase",
            "kind",
            "position",
        ] {
            assert!(s.get(key).is_some(), "step JSON lacks `{key}`: {s:#}");
        }
    }
    assert_eq!(step_status(&p, "s1"), "succeeded");
    assert_eq!(step_status(&p, "s2"), "succeeded");
    assert_eq!(step_status(&p, "s3"), "failed");
    assert_eq!(step_status(&p, "s4"), "pending");
    let s3 = step(&p, "s3");
    assert_eq!(s3["last_sqlstate"], "42P01", "{s3:#}");
    assert!(
        s3["last_error"]
            .as_str()
            .unwrap()
            .contains("relation \"needed\" does not exist"),
        "{s3:#}"
    );
    assert_eq!(s3["attempts"], 1);
    // The failed step's insert was rolled back with it.
    assert_eq!(
        runs_per_step(&db).await,
        vec![("s1".into(), 1), ("s2".into(), 1)]
    );

    // Fix the database, resume by plan id.
    db.exec("CREATE TABLE needed (id bigint)").await;
    let o = run(&db, &["--yes", "resume", "fail_resume"]);
    expect_code(&o, 0, "resume after the fix");
    let p = status_json(&db, "fail_resume");
    assert_eq!(p["status"], "succeeded", "{p:#}");
    for s in ["s1", "s2", "s3", "s4"] {
        assert_eq!(step_status(&p, s), "succeeded");
    }
    assert_eq!(step(&p, "s1")["attempts"], 1, "s1 ran again");
    assert_eq!(step(&p, "s2")["attempts"], 1, "s2 ran again");
    assert_eq!(step(&p, "s3")["attempts"], 2);
    assert_eq!(
        runs_per_step(&db).await,
        vec![
            ("s1".into(), 1),
            ("s2".into(), 1),
            ("s3".into(), 1),
            ("s4".into(), 1)
        ]
    );
    // 10: the password is in no output (checked by `run`) and no control row.
    control_tables_clean(&db).await;
    let o = run(&db, &["status"]);
    expect_code(&o, 0, "status of every plan");
}

/// A small seeded generator (xorshift64*), so that a failing run can be replayed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

pub(crate) fn seed() -> u64 {
    std::env::var("PGSHIFT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

fn twenty_steps_plan(dir: &Path) -> PathBuf {
    let mut yaml = String::from(
        "id: crashy\nsettings: { lock_timeout: 500ms, retries: 5 }\nphases:\n  expand:\n",
    );
    for i in 1..=20 {
        yaml.push_str(&format!(
            "    - name: s{i:02}
      sql: |
        INSERT INTO runs VALUES ('s{i:02}');
        SELECT pg_sleep(0.05);
        ALTER TABLE items ADD COLUMN c{i:02} text
      rollback: ALTER TABLE items DROP COLUMN IF EXISTS c{i:02}
"
        ));
    }
    write_plan(dir, "crashy", &yaml)
}

async fn columns_of_items(db: &TestDb) -> String {
    db.scalar_string(
        "SELECT string_agg(column_name || ' ' || data_type, ', ' ORDER BY ordinal_position)
         FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'items'",
    )
    .await
    .unwrap_or_default()
}

// 2: SIGKILL at random instants; every step's SQL commits exactly once.
#[tokio::test]
async fn kill_9_at_random_instants_then_resume_commits_each_step_once() {
    let seed = seed();
    println!("kill -9 test seed: {seed} (rerun with PGSHIFT_TEST_SEED={seed})");
    let mut rng = Rng(seed);
    let setup =
        "CREATE TABLE runs (step text NOT NULL); CREATE TABLE items (id bigint PRIMARY KEY)";

    // The reference: one uninterrupted run.
    let reference = TestDb::create("ex_kill9_ref").await;
    reference.exec(setup).await;
    let dir = work_dir("kill9");
    let plan = twenty_steps_plan(&dir);
    let f = plan.to_str().unwrap();
    expect_code(
        &run(&reference, &["plan", "apply", f]),
        0,
        "uninterrupted run",
    );

    // Campaigns: each a fresh database, killed at random instants until a run
    // finishes by itself; then checked. Until 30 kills in all.
    let mut kills = 0;
    let mut campaign = 0;
    while kills < 30 {
        campaign += 1;
        assert!(
            campaign <= 12,
            "too few kills landed mid-plan (seed {seed})"
        );
        let db = TestDb::create(&format!("ex_kill9_{campaign}")).await;
        db.exec(setup).await;
        let mut first = true;
        let mut killed_here = 0;
        loop {
            let args: Vec<&str> = if first {
                vec!["plan", "apply", f]
            } else {
                vec!["--yes", "resume", f]
            };
            let mut child = spawn(&db, &args);
            let after = Duration::from_millis(rng.below(601));
            std::thread::sleep(after);
            if child.try_wait().unwrap().is_none() && kills < 30 {
                child.kill().unwrap(); // SIGKILL
                let _ = child.wait();
                kills += 1;
                killed_here += 1;
                if killed_here == 1 {
                    // Once the killed runner's backend is gone, status must not claim it runs.
                    wait_until(
                        &db,
                        "SELECT NOT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
                        Duration::from_secs(10),
                    )
                    .await;
                    // (Killed before it registered the plan: nothing to show yet.)
                    let registered = db
                        .scalar_i64("SELECT count(*) FROM pg_namespace n WHERE nspname = 'pgshift'")
                        .await
                        == 1
                        && db
                            .scalar_i64("SELECT count(*) FROM pgshift.plans WHERE id = 'crashy'")
                            .await
                            == 1;
                    let p = if registered {
                        status_json(&db, "crashy")
                    } else {
                        Json::Null
                    };
                    if p["status"] == "running" {
                        assert_eq!(p["runner_alive"], false, "{p:#}");
                        assert!(p["next"].as_str().unwrap().contains("resume"), "{p:#}");
                    }
                }
                first = false;
                continue;
            }
            let o = wait_output(child, Duration::from_secs(20), "run");
            match o.status.code() {
                Some(0) => break,
                // The killed runner's backend may hold the plan's lock a moment longer.
                Some(4) => std::thread::sleep(Duration::from_millis(100)),
                c => panic!(
                    "campaign {campaign}: exit {c:?} (seed {seed})\n{}",
                    stderr(&o)
                ),
            }
            first = false;
        }
        println!("kill -9 campaign {campaign}: {killed_here} kills");
        let p = status_json(&db, "crashy");
        assert_eq!(p["status"], "succeeded", "{p:#}");
        let counts = runs_per_step(&db).await;
        assert_eq!(counts.len(), 20, "{counts:?}");
        for (s, n) in &counts {
            assert_eq!(*n, 1, "step {s} committed {n} times (seed {seed})");
        }
        assert_eq!(counts, runs_per_step(&reference).await);
        assert_eq!(
            columns_of_items(&db).await,
            columns_of_items(&reference).await
        );
        for s in p["steps"].as_array().unwrap() {
            assert_eq!(s["status"], "succeeded", "{s:#}");
            assert_eq!(s["last_error"], Json::Null, "{s:#}");
        }
        control_tables_clean(&db).await;
    }
}

// 3: DDL under lock_timeout, retried; the application never queues longer than that.
#[tokio::test]
async fn ddl_waits_at_most_its_lock_timeout_and_retries_until_the_blocker_ends() {
    let db = TestDb::create("ex_lock_safe").await;
    db.exec("CREATE TABLE t (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text); INSERT INTO t (v) SELECT 'x' FROM generate_series(1, 100)").await;
    let dir = work_dir("lock_safe");
    let plan = write_plan(
        &dir,
        "lock_safe",
        "id: lock_safe
settings: { lock_timeout: 200ms, retries: 40 }
phases:
  expand:
    - name: add_col
      sql: ALTER TABLE t ADD COLUMN w text
      rollback: ALTER TABLE t DROP COLUMN IF EXISTS w
",
    );
    // The blocker: a transaction holding a lock the ALTER TABLE conflicts with.
    let blocker = connect(&db.url).await;
    let blocker_pid: i32 = blocker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    blocker
        .batch_execute("BEGIN; LOCK TABLE t IN ACCESS SHARE MODE")
        .await
        .unwrap();

    // The application: reads and writes in a loop, each timed; the statements
    // over the bound are kept with when they ran, to be matched with what the
    // application's backend waited on.
    let epoch = Instant::now();
    let sampler = WaitSampler::start(&db.url, epoch).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let app = tokio::spawn({
        let url = db.url.clone();
        let stop = stop.clone();
        async move {
            let c = connect(&url).await;
            let pid: i32 = c
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            let mut max = Duration::ZERO;
            let mut n = 0u32;
            let mut over = Vec::new();
            let mut took = |t0: Instant| {
                let d = t0.elapsed();
                max = max.max(d);
                if d >= LOCK_BOUND {
                    let from = (t0 - epoch).as_secs_f64() * 1e3;
                    over.push((from, from + d.as_secs_f64() * 1e3));
                }
            };
            while !stop.is_cancelled() {
                let t0 = Instant::now();
                c.query_one("SELECT count(*) FROM t", &[]).await.unwrap();
                took(t0);
                let t0 = Instant::now();
                c.execute("INSERT INTO t (v) VALUES ('app')", &[])
                    .await
                    .unwrap();
                took(t0);
                n += 2;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (max, n, pid, over)
        }
    });

    let child = spawn(&db, &["plan", "apply", plan.to_str().unwrap()]);
    // Wait for the runner to have given up on the lock three times.
    wait_until(
        &db,
        "SELECT to_regclass('pgshift.events') IS NOT NULL",
        Duration::from_secs(30),
    )
    .await;
    wait_until(
        &db,
        "SELECT count(*) >= 3 FROM pgshift.events WHERE event = 'retry'",
        Duration::from_secs(30),
    )
    .await;
    // Still waiting: the column is not there yet.
    let added = db
        .scalar_i64("SELECT count(*) FROM information_schema.columns WHERE table_name = 't' AND column_name = 'w'")
        .await;
    assert_eq!(
        added, 0,
        "the ALTER TABLE ran although the blocker holds its lock"
    );
    blocker.batch_execute("COMMIT").await.unwrap();
    let o = tokio::task::spawn_blocking(move || {
        wait_output(child, Duration::from_secs(30), "apply behind a blocker")
    })
    .await
    .unwrap();
    stop.cancel();
    let (max, n, pid, over) = app.await.unwrap();
    let waits = sampler.finish().await;
    expect_code(&o, 0, "apply behind a blocker");
    println!("lock-safe DDL: worst application wait {max:?} over {n} queries (lock_timeout 200ms)");
    // Queued behind the DDL's lock request: at most the lock timeout (+ 300 ms
    // margin). A statement that took longer waiting only on the server's WAL
    // or disk is said, and held to a looser bound.
    let mut on_locks = Vec::new();
    for (from, to) in over {
        let seen = waits.of(pid, from, to);
        println!(
            "lock-safe DDL: a query of {:.0} ms at {from:.0} ms waited on {seen:?}",
            to - from
        );
        if on_a_lock(&seen) {
            on_locks.push((to - from, seen));
        }
    }
    assert!(
        on_locks.is_empty(),
        "application queries waited on a lock longer than {LOCK_BOUND:?} (the lock timeout 200ms + 300ms margin): {on_locks:?}"
    );
    assert!(
        max < Duration::from_secs(3),
        "an application query waited {max:?} (3 s is the bound for waits on anything but a lock)"
    );

    let p = status_json(&db, "lock_safe");
    assert_eq!(step_status(&p, "add_col"), "succeeded", "{p:#}");
    let retries = events_named(&p, "retry");
    assert!(!retries.is_empty(), "no retry event: {p:#}");
    assert!(
        retries.iter().all(|e| e["detail"]["sqlstate"] == "55P03"),
        "{retries:#?}"
    );
    let waits = events_named(&p, "lock_wait");
    assert!(
        waits
            .iter()
            .any(|e| e["detail"]["blocker_pid"] == blocker_pid),
        "no lock_wait event names the blocker pid {blocker_pid}: {waits:#?}"
    );
    println!("lock-safe DDL: {} retries", retries.len());
    control_tables_clean(&db).await;
}

// 4: one runner per plan; the second exits 4 naming the holder.
#[tokio::test]
async fn a_second_runner_of_the_same_plan_exits_4_naming_the_holder() {
    let db = TestDb::create("ex_two_runners").await;
    db.exec("CREATE TABLE flag (ok boolean NOT NULL); INSERT INTO flag VALUES (false); CREATE TABLE runs (step text NOT NULL)").await;
    let dir = work_dir("two_runners");
    let plan = write_plan(
        &dir,
        "two_runners",
        "id: two_runners
phases:
  expand:
    - name: wait_flag
      check: { query: \"SELECT ok FROM flag\", wait: 20s, interval: 100ms }
    - name: s1
      sql: INSERT INTO runs VALUES ('s1')
      rollback: DELETE FROM runs WHERE step = 's1'
",
    );
    let f = plan.to_str().unwrap();
    let first = spawn(&db, &["plan", "apply", f]);
    // The first runner creates the control schema; the wait below queries it.
    wait_until(
        &db,
        "SELECT to_regclass('pgshift.steps') IS NOT NULL",
        Duration::from_secs(10),
    )
    .await;
    // The first one holds the plan once it records itself as the runner.
    wait_until(
        &db,
        "SELECT EXISTS (SELECT FROM pgshift.steps WHERE plan_id = 'two_runners' AND name = 'wait_flag' AND status = 'running')",
        Duration::from_secs(10),
    )
    .await;
    let holder_pid: i32 = db
        .client
        .query_one(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) AND granted",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let p = status_json(&db, "two_runners");
    assert_eq!(p["runner_alive"], true, "{p:#}");
    assert!(p["next"].as_str().unwrap().contains("running"), "{p:#}");
    let second = run(&db, &["plan", "apply", f]);
    expect_code(&second, 4, "second apply of a running plan");
    let err = stderr(&second);
    assert!(
        err.contains(&format!("pid {holder_pid}")),
        "stderr does not name the holder (backend pid {holder_pid}):\n{err}"
    );
    // …and the process: user@host and the first runner's own pid.
    assert!(
        err.contains(&format!("pid {}", first.id())),
        "stderr does not name the holding process (pid {}):\n{err}",
        first.id()
    );
    println!("second runner said: {}", err.trim());
    let resume = run(&db, &["--yes", "resume", f]);
    expect_code(&resume, 4, "resume of a running plan");

    db.exec("UPDATE flag SET ok = true").await;
    let o = tokio::task::spawn_blocking(move || {
        wait_output(first, Duration::from_secs(30), "first apply")
    })
    .await
    .unwrap();
    expect_code(&o, 0, "the first apply, after the flag");
    assert_eq!(runs_per_step(&db).await, vec![("s1".into(), 1)]);
    let p = status_json(&db, "two_runners");
    assert_eq!(p["status"], "succeeded");
    assert_eq!(p["runner"], Json::Null, "runner not cleared: {p:#}");
    control_tables_clean(&db).await;
}

// 5: a changed plan file is refused on resume unless accepted.
#[tokio::test]
async fn a_changed_plan_file_is_refused_on_resume_unless_accepted() {
    let db = TestDb::create("ex_changed").await;
    db.exec("CREATE TABLE runs (step text NOT NULL)").await;
    let dir = work_dir("changed");
    let original = "id: changed
phases:
  expand:
    - name: s1
      sql: INSERT INTO runs VALUES ('s1')
      rollback: DELETE FROM runs WHERE step = 's1'
  contract:
    - name: deployed
      gate: Deploy the app
    - name: s2
      sql: INSERT INTO runs VALUES ('s2')
";
    let plan = write_plan(&dir, "changed", original);
    let f = plan.to_str().unwrap();
    expect_code(&run(&db, &["plan", "apply", f]), 3, "apply up to the gate");
    let recorded = status_json(&db, "changed")["checksum"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::write(&plan, original.replace("('s2')", "('s2-changed')")).unwrap();

    let o = run(&db, &["--yes", "resume", f]);
    expect_code(&o, 5, "resume of a changed plan");
    let err = stderr(&o);
    assert!(
        err.contains(&recorded),
        "recorded checksum {recorded} not in:\n{err}"
    );
    let checksums: std::collections::BTreeSet<&str> = err
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == ':'))
        .filter(|w| w.starts_with("sha256:") && w.len() > 20)
        .collect();
    assert_eq!(checksums.len(), 2, "both checksums expected in:\n{err}");
    assert!(err.contains("--accept-changed"), "{err}");
    // Nothing ran.
    assert_eq!(runs_per_step(&db).await, vec![("s1".into(), 1)]);
    let by_id = run(&db, &["--yes", "resume", "changed"]);
    expect_code(&by_id, 5, "resume by id of a changed plan");

    let o = run(&db, &["--yes", "resume", f, "--accept-changed"]);
    expect_code(&o, 0, "resume --accept-changed");
    let p = status_json(&db, "changed");
    assert_eq!(p["status"], "succeeded");
    assert_ne!(p["checksum"].as_str().unwrap(), recorded);
    let accepted = events_named(&p, "plan_change_accepted");
    assert_eq!(accepted.len(), 1, "{p:#}");
    assert_eq!(accepted[0]["detail"]["recorded"], recorded.as_str());
    assert_eq!(
        runs_per_step(&db).await,
        vec![("s1".into(), 1), ("s2-changed".into(), 1)]
    );
    control_tables_clean(&db).await;
}

// 6: a failed CREATE UNIQUE INDEX CONCURRENTLY names the duplicate key and leaves no INVALID index.
#[tokio::test]
async fn failed_unique_index_concurrently_names_the_key_and_leaves_nothing_invalid() {
    let db = TestDb::create("ex_unique_cic").await;
    db.exec("CREATE TABLE u (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, x bigint); INSERT INTO u (x) VALUES (1), (2), (42), (42), (3)").await;
    let dir = work_dir("unique_cic");
    let plan = write_plan(
        &dir,
        "unique_cic",
        "id: unique_cic
phases:
  expand:
    - name: uniq_x
      sql: CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS u_x_key ON u (x)
      rollback: DROP INDEX CONCURRENTLY IF EXISTS u_x_key
",
    );
    let f = plan.to_str().unwrap();
    let o = run(&db, &["plan", "apply", f]);
    expect_code(&o, 1, "unique index over duplicates");
    let p = status_json(&db, "unique_cic");
    let s = step(&p, "uniq_x");
    assert_eq!(s["status"], "failed", "{s:#}");
    assert_eq!(s["last_sqlstate"], "23505", "{s:#}");
    let err = s["last_error"].as_str().unwrap();
    assert!(err.contains("Key (x)=(42) is duplicated"), "{err}");
    let left = db
        .scalar_i64("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'u_x_key'")
        .await;
    assert_eq!(left, 0, "an index (INVALID) was left behind");
    let invalid = db
        .scalar_i64("SELECT count(*) FROM pg_index WHERE NOT indisvalid")
        .await;
    assert_eq!(invalid, 0);

    db.exec("DELETE FROM u WHERE x = 42 AND id <> (SELECT min(id) FROM u WHERE x = 42)")
        .await;
    let o = run(&db, &["--yes", "resume", "unique_cic"]);
    expect_code(&o, 0, "resume after deleting the duplicates");
    let valid = db
        .scalar_i64("SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid WHERE c.relname = 'u_x_key' AND i.indisvalid AND i.indisunique")
        .await;
    assert_eq!(valid, 1);
    assert_eq!(
        step_status(&status_json(&db, "unique_cic"), "uniq_x"),
        "succeeded"
    );
    control_tables_clean(&db).await;
}

// 7: SIGINT during a long statement cancels it on the server; exit 3; resume completes.
#[tokio::test]
async fn sigint_cancels_the_statement_on_the_server_and_resume_completes() {
    let db = TestDb::create("ex_sigint").await;
    db.exec("CREATE TABLE flag (slow boolean NOT NULL); INSERT INTO flag VALUES (true); CREATE TABLE runs (step text NOT NULL)").await;
    let dir = work_dir("sigint");
    let plan = write_plan(
        &dir,
        "sigint",
        "id: sigint
settings: { statement_timeout: 60s }
phases:
  expand:
    - name: s1
      sql: INSERT INTO runs VALUES ('s1')
      rollback: DELETE FROM runs WHERE step = 's1'
    - name: slow
      sql: |
        INSERT INTO runs VALUES ('slow');
        SELECT pg_sleep(CASE WHEN (SELECT slow FROM flag) THEN 30 ELSE 0 END)
      rollback: DELETE FROM runs WHERE step = 'slow'
    - name: s3
      sql: INSERT INTO runs VALUES ('s3')
      rollback: DELETE FROM runs WHERE step = 's3'
",
    );
    let f = plan.to_str().unwrap();
    let child = spawn(&db, &["plan", "apply", f]);
    let sleeping = "SELECT EXISTS (SELECT FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%pg_sleep(CASE%' AND pid <> pg_backend_pid())";
    wait_until(&db, sleeping, Duration::from_secs(10)).await;
    let t0 = Instant::now();
    signal(&child, "INT");
    let o = tokio::task::spawn_blocking(move || {
        wait_output(child, Duration::from_secs(10), "interrupted apply")
    })
    .await
    .unwrap();
    let took = t0.elapsed();
    println!("SIGINT: pgshift exited {took:?} after the signal");
    expect_code(&o, 3, "apply interrupted by SIGINT");
    assert!(took < Duration::from_secs(5), "took {took:?} to stop");
    let still: bool = db.client.query_one(sleeping, &[]).await.unwrap().get(0);
    assert!(
        !still,
        "the statement still runs on the server after pgshift exited"
    );
    assert!(stderr(&o).contains("resume"), "{}", stderr(&o));
    let p = status_json(&db, "sigint");
    assert_eq!(step_status(&p, "s1"), "succeeded");
    assert_eq!(step_status(&p, "slow"), "interrupted", "{p:#}");
    assert_eq!(p["status"], "interrupted");
    assert_eq!(runs_per_step(&db).await, vec![("s1".into(), 1)]);

    db.exec("UPDATE flag SET slow = false").await;
    let o = run(&db, &["--yes", "resume", "sigint"]);
    expect_code(&o, 0, "resume after the interrupt");
    assert_eq!(
        runs_per_step(&db).await,
        vec![("s1".into(), 1), ("s3".into(), 1), ("slow".into(), 1)]
    );
    control_tables_clean(&db).await;
}

/// Columns, indexes and tables of schema `public`, in one string.
pub(crate) async fn catalog_snapshot(db: &TestDb) -> String {
    db.scalar_string(
        "SELECT coalesce((SELECT string_agg(table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' ' || coalesce(column_default, ''), E'\\n' ORDER BY table_name, ordinal_position)
                          FROM information_schema.columns WHERE table_schema = 'public'), '')
             || E'\\n--\\n' ||
             coalesce((SELECT string_agg(indexdef, E'\\n' ORDER BY indexname) FROM pg_indexes WHERE schemaname = 'public'), '')
             || E'\\n--\\n' ||
             coalesce((SELECT string_agg(conname || ' ' || pg_get_constraintdef(oid), E'\\n' ORDER BY conname) FROM pg_constraint WHERE connamespace = 'public'::regnamespace), '')",
    )
    .await
    .unwrap()
}

// 8: rollback of a plan stopped at a gate restores the prior schema.
#[tokio::test]
async fn rollback_at_a_gate_restores_the_prior_schema() {
    let db = TestDb::create("ex_rollback").await;
    db.exec("CREATE TABLE leads (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email text NOT NULL); INSERT INTO leads (email) VALUES ('a@x'), ('b@x')").await;
    let before = catalog_snapshot(&db).await;
    let dir = work_dir("rollback");
    let plan = write_plan(
        &dir,
        "rollback",
        "id: rollback
phases:
  expand:
    - name: add_col
      sql: ALTER TABLE leads ADD COLUMN email_hash text
      rollback: ALTER TABLE leads DROP COLUMN IF EXISTS email_hash
    - name: add_index
      sql: CREATE INDEX CONCURRENTLY IF NOT EXISTS leads_email_hash_idx ON leads (email_hash)
      rollback: DROP INDEX CONCURRENTLY IF EXISTS leads_email_hash_idx
    - name: add_table
      sql: CREATE TABLE lead_notes (id bigint PRIMARY KEY, note text)
      rollback: DROP TABLE IF EXISTS lead_notes
    - name: add_check
      sql: ALTER TABLE leads ADD CONSTRAINT leads_email_hash_len CHECK (length(email_hash) = 64) NOT VALID
      rollback: ALTER TABLE leads DROP CONSTRAINT IF EXISTS leads_email_hash_len
  contract:
    - name: deployed
      gate: Deploy the app that writes email_hash
    - name: drop_email
      sql: ALTER TABLE leads DROP COLUMN email
      allow: { ban-drop-column: the test drops it after the gate }
",
    );
    let f = plan.to_str().unwrap();
    let o = run(&db, &["plan", "apply", f]);
    expect_code(&o, 3, "apply up to the gate");
    let during = catalog_snapshot(&db).await;
    assert_ne!(before, during, "the plan changed nothing");
    assert!(
        during.contains("email_hash") && during.contains("lead_notes"),
        "{during}"
    );

    // Off a terminal, resume without --yes never passes the gate (a script retrying exit 3
    // must not walk through it), and rollback without --yes refuses: nothing changes.
    let o = run(&db, &["resume", "rollback"]);
    expect_code(&o, 3, "resume without --yes off a terminal");
    assert!(
        stderr(&o).contains("waits at gate `deployed`")
            && stderr(&o).contains("pgshift --yes resume rollback"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        step_status(&status_json(&db, "rollback"), "deployed"),
        "waiting"
    );
    let o = run(&db, &["rollback", "rollback"]);
    expect_code(&o, 2, "rollback without --yes off a terminal");
    let e = stderr(&o);
    assert!(
        e.contains(&format!("database `{}`", db.name))
            && e.contains("add_col:")
            && e.contains("ALTER TABLE leads DROP COLUMN IF EXISTS email_hash")
            && e.contains("nothing was changed")
            && e.contains("pgshift --yes rollback rollback"),
        "{e}"
    );
    // Undone latest first: the check constraint before the column it reads.
    assert!(e.find("add_check:") < e.find("add_col:"), "{e}");
    assert_eq!(
        catalog_snapshot(&db).await,
        during,
        "a refused rollback changed the schema"
    );
    assert_eq!(status_json(&db, "rollback")["status"], "waiting");

    let o = run(&db, &["--yes", "rollback", "rollback"]);
    expect_code(&o, 0, "rollback at the gate");
    let after = catalog_snapshot(&db).await;
    assert_eq!(before, after, "rollback did not restore the schema");
    let p = status_json(&db, "rollback");
    assert_eq!(p["status"], "rolled_back", "{p:#}");
    for s in ["add_col", "add_index", "add_table", "add_check"] {
        assert_eq!(step_status(&p, s), "rolled_back", "{s}: {p:#}");
    }
    assert_eq!(step_status(&p, "drop_email"), "pending");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM leads").await,
        2,
        "rows lost"
    );
    control_tables_clean(&db).await;
}

/// The lines a hook wrote to `dir/name.log` (one per firing).
fn hook_log(dir: &Path, name: &str) -> Vec<String> {
    std::fs::read_to_string(dir.join(format!("{name}.log")))
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

/// A hook command that appends its PGSHIFT_* variables to `dir/name.log` and its
/// whole environment to `dir/name.env`.
fn hook_cmd(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "\"echo \\\"$PGSHIFT_PLAN|$PGSHIFT_PHASE|$PGSHIFT_STEP|$PGSHIFT_STATUS|$PGSHIFT_ERROR\\\" | head -c 300 | tr '\\\\n' ' ' >> {d}/{name}.log; echo >> {d}/{name}.log; env >> {d}/{name}.env\""
    )
}

// 9: run steps and hooks.
#[tokio::test]
async fn run_steps_and_hooks_fire_once_with_their_environment() {
    let db = TestDb::create("ex_hooks").await;
    db.exec("CREATE TABLE runs (step text NOT NULL)").await;
    let dir = work_dir("hooks");
    let d = dir.display();
    let h = |n: &str| hook_cmd(&dir, n);

    // A failing run step: its exit code and output tail in status; on_failure fires once.
    let failing = write_plan(
        &dir,
        "hooks_fail",
        &format!(
            "id: hooks_fail
hooks:
  on_failure: {}
  on_success: {}
  before: {{ expand: {} }}
  after: {{ expand: {} }}
phases:
  expand:
    - name: s1
      sql: INSERT INTO runs VALUES ('s1')
      rollback: DELETE FROM runs WHERE step = 's1'
    - name: flip_flag
      run: \"echo first line; echo flag service unreachable >&2; test -f {d}/ok || exit 7\"
      rollback:
        run: \"true\"
",
            h("f_on_failure"),
            h("f_on_success"),
            h("f_before_expand"),
            h("f_after_expand"),
        ),
    );
    let o = run(&db, &["plan", "apply", failing.to_str().unwrap()]);
    expect_code(&o, 1, "apply with a failing run step");
    let p = status_json(&db, "hooks_fail");
    let s = step(&p, "flip_flag");
    assert_eq!(s["status"], "failed", "{s:#}");
    let err = s["last_error"].as_str().unwrap();
    assert!(err.contains("exited with code 7"), "{err}");
    assert!(
        err.contains("flag service unreachable") && err.contains("first line"),
        "{err}"
    );
    let fired = hook_log(&dir, "f_on_failure");
    assert_eq!(fired.len(), 1, "on_failure fired {fired:?}");
    assert!(
        fired[0].starts_with("hooks_fail|expand|flip_flag|failed|"),
        "{fired:?}"
    );
    assert!(
        fired[0].contains("code 7"),
        "PGSHIFT_ERROR lacks the failure: {fired:?}"
    );
    assert_eq!(
        hook_log(&dir, "f_before_expand"),
        vec!["hooks_fail|expand||running|".to_string()]
    );
    assert!(hook_log(&dir, "f_after_expand").is_empty());
    assert!(hook_log(&dir, "f_on_success").is_empty());

    // A plan through a gate to the end: every hook fires once in each run.
    let good = write_plan(
        &dir,
        "hooks_ok",
        &format!(
            "id: hooks_ok
hooks:
  on_gate: {}
  on_failure: {}
  on_success: {}
  before: {{ expand: {}, contract: {} }}
  after: {{ expand: {}, contract: {} }}
phases:
  expand:
    - name: s1
      sql: INSERT INTO runs VALUES ('ok1')
      rollback: DELETE FROM runs WHERE step = 'ok1'
    - name: notify
      run: \"echo \\\"$PGSHIFT_PLAN/$PGSHIFT_PHASE/$PGSHIFT_STEP\\\" > {d}/run_step.out\"
      rollback:
        run: \"true\"
  contract:
    - name: deployed
      gate: Deploy the app
    - name: s2
      sql: INSERT INTO runs VALUES ('ok2')
",
            h("on_gate"),
            h("on_failure"),
            h("on_success"),
            h("before_expand"),
            h("before_contract"),
            h("after_expand"),
            h("after_contract"),
        ),
    );
    let g = good.to_str().unwrap();
    expect_code(&run(&db, &["plan", "apply", g]), 3, "apply up to the gate");
    assert_eq!(
        std::fs::read_to_string(dir.join("run_step.out"))
            .unwrap()
            .trim(),
        "hooks_ok/expand/notify"
    );
    assert_eq!(
        hook_log(&dir, "before_expand"),
        vec!["hooks_ok|expand||running|"]
    );
    assert_eq!(
        hook_log(&dir, "after_expand"),
        vec!["hooks_ok|expand||running|"]
    );
    assert_eq!(
        hook_log(&dir, "before_contract"),
        vec!["hooks_ok|contract||running|"]
    );
    assert_eq!(
        hook_log(&dir, "on_gate"),
        vec!["hooks_ok|contract|deployed|waiting|"]
    );
    assert!(hook_log(&dir, "on_success").is_empty());

    expect_code(
        &run(&db, &["--yes", "resume", g]),
        0,
        "resume past the gate",
    );
    assert_eq!(hook_log(&dir, "on_gate").len(), 1, "on_gate fired again");
    assert_eq!(
        hook_log(&dir, "before_expand").len(),
        1,
        "before.expand fired again"
    );
    assert_eq!(
        hook_log(&dir, "after_expand").len(),
        1,
        "after.expand fired again"
    );
    assert_eq!(
        hook_log(&dir, "after_contract"),
        vec!["hooks_ok|contract||running|"]
    );
    assert_eq!(hook_log(&dir, "on_success"), vec!["hooks_ok|||succeeded|"]);
    // `before.contract` fires when the phase is entered, not again on the resume inside it.
    assert_eq!(
        hook_log(&dir, "before_contract").len(),
        1,
        "before.contract fired again on resume"
    );
    assert!(hook_log(&dir, "on_failure").is_empty());

    // No hook saw the password or DATABASE_URL.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_some_and(|e| e == "env" || e == "log" || e == "out")
        {
            let text = std::fs::read_to_string(&path).unwrap();
            no_secret(&path.display().to_string(), &text);
            assert!(!text.contains("DATABASE_URL"), "{}: {text}", path.display());
        }
    }
    assert!(dir.join("on_gate.env").exists());
    control_tables_clean(&db).await;
}
