//! `pgshift fleet`: one plan over many databases and tenant schemas, on the
//! local server and on clusters of the test's own, through the built binary.
//!
//! Every target gets the same small table, `items`, whose BEFORE UPDATE
//! trigger counts each update of a row in `n`, and a `side_effects` table that
//! the plan's transactional steps write to in their own transaction: a batch
//! or a step committed twice on any target shows as `n = 2`, `bf_hits = 2` or
//! two `side_effects` rows. Databases are named `<prefix>fleet_*` (see `harness::prefix`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::cluster::Cluster;
use crate::harness::*;

/// `items` with `rows` rows, the update counter, and `side_effects`.
fn items_setup(rows: i64) -> String {
    format!(
        "CREATE TABLE side_effects (step text NOT NULL);
         CREATE TABLE items (id bigint PRIMARY KEY, src text NOT NULL, bf_hits integer NOT NULL DEFAULT 0, n integer NOT NULL DEFAULT 0);
         INSERT INTO items (id, src) SELECT g, 'row ' || g FROM generate_series(1, {rows}) g;
         CREATE FUNCTION count_updates() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.n := OLD.n + 1; RETURN NEW; END $$;
         CREATE TRIGGER a_count_updates BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION count_updates();"
    )
}

/// The plan: a transactional expand step, the dual-write trigger, a throttled
/// backfill (no `where`: only its checkpoint keeps a batch from running twice),
/// and, with `gate`, a gate before the contract phase.
fn plan_yaml(id: &str, batch: u32, sleep: &str, gate: bool) -> String {
    let gate = if gate {
        "    - name: deployed\n      gate: Deploy the app that reads items.v\n"
    } else {
        ""
    };
    format!(
        "id: {id}
settings: {{ lock_timeout: 500ms, retries: 10 }}
phases:
  expand:
    - name: add_v
      sql: |
        INSERT INTO side_effects VALUES ('add_v');
        ALTER TABLE items ADD COLUMN v text
      rollback: ALTER TABLE items DROP COLUMN IF EXISTS v
  dual_write:
    - name: sync_v
      trigger:
        table: items
        set: {{ v: \"md5(NEW.src)\" }}
  backfill:
    - name: fill_v
      backfill:
        table: items
        set: \"v = md5(src), bf_hits = bf_hits + 1\"
        batch_size: {batch}
        throttle: {{ sleep: {sleep} }}
  contract:
{gate}    - name: all_filled
      check: SELECT NOT EXISTS (SELECT FROM items WHERE v IS NULL)
    - name: v_present
      sql: |
        INSERT INTO side_effects VALUES ('v_present');
        ALTER TABLE items ADD CONSTRAINT items_v_present CHECK (v IS NOT NULL) NOT VALID
      rollback: ALTER TABLE items DROP CONSTRAINT IF EXISTS items_v_present
"
    )
}

/// `n` test databases `<run prefix>fleet_<prefix>_NN`, each with `items` of
/// `rows(i)` rows (or none where `rows(i)` is 0: a target whose table is missing).
async fn databases(prefix: &str, n: usize, rows: impl Fn(usize) -> i64) -> Vec<TestDb> {
    let mut out = Vec::new();
    for i in 0..n {
        let db = TestDb::create(&format!("fleet_{prefix}_{i:02}")).await;
        match rows(i) {
            0 => {
                db.exec("CREATE TABLE side_effects (step text NOT NULL)")
                    .await
            }
            r => db.exec(&items_setup(r)).await,
        }
        out.push(db);
    }
    out
}

/// The discover query that finds the databases of `prefix`.
fn discover_query(prefix: &str) -> String {
    let like = format!("{}fleet_{prefix}_", crate::harness::prefix()).replace('_', "\\_");
    format!("SELECT datname FROM pg_database WHERE datname LIKE '{like}%' ORDER BY datname")
}

/// The name of test database `fleet_<name>` under this run's prefix.
fn fdb(name: &str) -> String {
    format!("{}fleet_{name}", crate::harness::prefix())
}

/// Runs `pgshift` with `FLEET_ADMIN_URL` naming the local server, plus `env`.
fn fleet(args: &[&str], env: &[(&str, &str)]) -> Output {
    let admin = server_url();
    let mut all = vec![("FLEET_ADMIN_URL", admin.as_str())];
    all.extend_from_slice(env);
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    for (k, v) in all {
        cmd.env(k, v);
    }
    cmd.output().expect("run pgshift")
}

/// Starts `pgshift fleet apply PLAN --targets TARGETS` in the background, as
/// [`fleet`] runs it, with stderr kept for the test.
fn spawn_fleet_apply(plan: &Path, targets: &Path) -> std::process::Child {
    Command::new(bin())
        .args(["fleet", "apply", s(plan), "--targets", s(targets)])
        .env_remove("DATABASE_URL")
        .env("FLEET_ADMIN_URL", server_url())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Every row updated exactly once by the backfill and set right, and each
/// transactional step's side effect committed once (`v_present` only when `finished`).
async fn assert_right(c: &Client, what: &str, rows: i64, finished: bool) {
    let one = |sql: &str| {
        let sql = sql.to_string();
        async move {
            c.query_one(&sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{what}: {sql}: {e}"))
                .get::<_, i64>(0)
        }
    };
    let bad = one(
        "SELECT count(*) FROM items WHERE n <> 1 OR bf_hits <> 1 OR v IS DISTINCT FROM md5(src)",
    )
    .await;
    assert_eq!(
        bad, 0,
        "{what}: {bad} rows not updated exactly once and right"
    );
    assert_eq!(one("SELECT count(*) FROM items").await, rows, "{what}");
    assert_eq!(
        one("SELECT count(*) FROM side_effects WHERE step = 'add_v'").await,
        1,
        "{what}: add_v committed more than once"
    );
    assert_eq!(
        one("SELECT count(*) FROM side_effects WHERE step = 'v_present'").await,
        i64::from(finished),
        "{what}: v_present"
    );
}

/// The plan's status on one database (`None`: never ran there).
async fn plan_status(c: &Client, schema: &str, plan: &str) -> Option<String> {
    let exists: bool = c
        .query_one(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("\"{schema}\".plans")],
        )
        .await
        .unwrap()
        .get(0);
    if !exists {
        return None;
    }
    c.query_opt(
        &format!("SELECT status FROM \"{schema}\".plans WHERE id = $1"),
        &[&plan],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

/// Attempts over all steps and the number of events: what a re-run would change.
async fn footprint(c: &Client) -> (i64, i64) {
    let r = c
        .query_one(
            "SELECT (SELECT coalesce(sum(attempts), 0)::bigint FROM pgshift.steps), (SELECT count(*) FROM pgshift.events)",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1))
}

/// `fleet status --format json`, parsed.
fn status_json(plan: &Path, targets: &Path, env: &[(&str, &str)]) -> serde_json::Value {
    let o = fleet(
        &[
            "fleet",
            "status",
            s(plan),
            "--targets",
            s(targets),
            "--format",
            "json",
        ],
        env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    serde_json::from_str(&stdout(&o)).expect("fleet status JSON")
}

async fn cluster_app(c: &Cluster) -> Client {
    let admin = connect_retrying(&c.url("postgres")).await;
    admin.batch_execute("CREATE DATABASE app").await.unwrap();
    connect_retrying(&c.url("app")).await
}

async fn connect_retrying(url: &str) -> Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return client;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot connect to {url}: {e}"),
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn write(test: &str, name: &str, text: &str) -> PathBuf {
    plan_file(test, name, text)
}

// The issue's first bar: 30 databases on the local server (discovered by a
// query) and 2 clusters started here (listed, URLs from the environment, one
// with a password that must never be printed). `fleet apply` brings every
// target to the gate; `fleet resume` off a terminal keeps the gate closed;
// `--yes fleet resume` finishes all; every row of every target is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_databases_and_two_clusters_reach_the_gate_then_resume_yes_finishes_all() {
    let t0 = Instant::now();
    // The two clusters start while the 30 databases are created.
    let clusters = std::thread::spawn(|| {
        let b = std::thread::spawn(|| Cluster::primary("fleet_b"));
        let a = Cluster::primary("fleet_a");
        (a, b.join().unwrap())
    });
    let dbs = databases("apply", 30, |i| 100 + i as i64).await;
    eprintln!("30 databases: {:?}", t0.elapsed());
    let (a, b) = clusters.join().unwrap();
    eprintln!("2 clusters: {:?}", t0.elapsed());
    let (ca, cb) = (cluster_app(&a).await, cluster_app(&b).await);
    ca.batch_execute(&items_setup(250)).await.unwrap();
    cb.batch_execute(&items_setup(260)).await.unwrap();
    let plan = write(
        "fleet_apply",
        "plan.yaml",
        &plan_yaml("fleet_apply", 40, "5ms", true),
    );
    let targets = write(
        "fleet_apply",
        "targets.yaml",
        &format!(
            "parallel: 8\ncanary: 1\nmax_failures: 1\ntargets:\n  - name: cluster_a\n    url_env: FLEET_A_URL\n  - name: cluster_b\n    url_env: FLEET_B_URL\ndiscover:\n  url_env: FLEET_ADMIN_URL\n  query: {}\n",
            discover_query("apply")
        ),
    );
    // trust authentication ignores the password; pgshift must still never print it.
    let url_a = a.url("app").replace("postgres@", "postgres:s3cret-pw@");
    let url_b = b.url("app");
    let env = [
        ("FLEET_A_URL", url_a.as_str()),
        ("FLEET_B_URL", url_b.as_str()),
    ];
    eprintln!("setup: {:?}", t0.elapsed());

    let t = Instant::now();
    let o = fleet(
        &["fleet", "apply", s(&plan), "--targets", s(&targets)],
        &env,
    );
    let err = stderr(&o);
    eprintln!("fleet apply of 32 targets (parallel 8): {:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(!err.contains("s3cret-pw"), "a password was printed:\n{err}");
    assert!(err.contains("32 at gate"), "{err}");
    assert!(err.contains("[cluster_a] "), "{err}");
    assert!(
        err.contains(&format!(
            "[{p}fleet_apply_29] ",
            p = crate::harness::prefix()
        )),
        "{err}"
    );
    // The canary ran alone: it reached the gate before any other target started.
    let canary_gate = err.find("[cluster_a] waits at gate").expect(&err);
    for line in err.lines().filter(|l| l.starts_with('[')) {
        if !line.starts_with("[cluster_a]") {
            let at = err.find(line).unwrap();
            assert!(at > canary_gate, "{line} before the canary ended:\n{err}");
        }
    }
    let st = status_json(&plan, &targets, &env);
    let all = st["targets"].as_array().unwrap();
    assert_eq!(all.len(), 32);
    for tg in all {
        assert_eq!(tg["status"], "waiting", "{tg}");
        assert_eq!(tg["step"], "deployed", "{tg}");
    }
    assert_eq!(st["total"]["by_status"]["waiting"], 32, "{st}");
    assert_eq!(
        st["total"]["rows_done"],
        250 + 260 + (100..130).sum::<i64>(),
        "{st}"
    );

    // Off a terminal and without --yes, resume must not walk through the gate.
    let o = fleet(
        &["fleet", "resume", s(&plan), "--targets", s(&targets)],
        &env,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("passes a gate only with --yes"), "{err}");
    assert!(err.contains("pgshift --yes fleet resume"), "{err}");
    for d in &dbs {
        assert_eq!(
            plan_status(&d.client, "pgshift", "fleet_apply")
                .await
                .as_deref(),
            Some("waiting"),
            "{}",
            d.name
        );
        let gate_tries = d
            .scalar_i64("SELECT attempts::bigint FROM pgshift.steps WHERE name = 'deployed'")
            .await;
        assert_eq!(gate_tries, 1, "{}: the gate ran again", d.name);
    }

    let t = Instant::now();
    let o = fleet(
        &[
            "--yes",
            "fleet",
            "resume",
            s(&plan),
            "--targets",
            s(&targets),
        ],
        &env,
    );
    let err = stderr(&o);
    eprintln!("fleet resume --yes of 32 targets: {:?}", t.elapsed());
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("32 done"), "{err}");
    assert!(!err.contains("s3cret-pw"), "a password was printed:\n{err}");
    for (i, d) in dbs.iter().enumerate() {
        assert_right(&d.client, &d.name, 100 + i as i64, true).await;
        assert_eq!(
            plan_status(&d.client, "pgshift", "fleet_apply")
                .await
                .as_deref(),
            Some("succeeded")
        );
    }
    assert_right(&ca, "cluster_a", 250, true).await;
    assert_right(&cb, "cluster_b", 260, true).await;

    // The table a person reads: one line per target and a total.
    let o = fleet(
        &["fleet", "status", s(&plan), "--targets", s(&targets)],
        &env,
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        out.lines().filter(|l| l.contains("succeeded")).count(),
        33,
        "{out}"
    );
    assert!(out.contains("total: 32 target(s): 32 succeeded"), "{out}");
    assert!(!out.contains("s3cret-pw"), "{out}");
    eprintln!("whole test: {:?}", t0.elapsed());
}

// One target down and one whose table is missing: both named, the others
// finish, the exit code is the worst (1: a failed step beats 3: unreachable).
// After the table is created, `fleet resume` finishes that target and re-runs
// nothing on the others: their attempts and events do not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_target_and_a_missing_table_are_named_the_others_finish_and_resume_reruns_nothing()
 {
    let dbs = databases("fail", 6, |i| if i == 3 { 0 } else { 120 }).await;
    let plan = write(
        "fleet_fail",
        "plan.yaml",
        &plan_yaml("fleet_fail", 50, "0ms", false),
    );
    let down = format!("postgres://postgres@127.0.0.1:{}/gone", free_port());
    let targets = write(
        "fleet_fail",
        "targets.yaml",
        &format!(
            // Two discover queries (as for two servers): their targets are interleaved.
            "parallel: 3\ncanary: 0\nmax_failures: 5\ntargets:\n  - name: down\n    url: {down}\ndiscover:\n  - url_env: FLEET_ADMIN_URL\n    query: {}\n  - url_env: FLEET_ADMIN_URL\n    query: {}\n",
            discover_query("fail").replace("ORDER BY", "AND right(datname, 1)::int < 3 ORDER BY"),
            discover_query("fail").replace("ORDER BY", "AND right(datname, 1)::int >= 3 ORDER BY"),
        ),
    );
    let o = fleet(&["fleet", "apply", s(&plan), "--targets", s(&targets)], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("[down] unreachable: cannot connect"), "{err}");
    assert!(
        err.contains(&format!(
            "[{p}fleet_fail_03] failed: step `add_v` failed",
            p = crate::harness::prefix()
        )),
        "{err}"
    );
    assert!(err.contains("relation \"items\" does not exist"), "{err}");
    assert!(err.contains("pgshift fleet resume"), "{err}");
    assert!(err.contains("5 done"), "{err}");
    let mut before = Vec::new();
    for (i, d) in dbs.iter().enumerate() {
        if i == 3 {
            assert_eq!(
                plan_status(&d.client, "pgshift", "fleet_fail")
                    .await
                    .as_deref(),
                Some("failed")
            );
            continue;
        }
        assert_right(&d.client, &d.name, 120, true).await;
        before.push(footprint(&d.client).await);
    }
    let st = status_json(&plan, &targets, &[]);
    let order: Vec<&str> = st["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        order,
        [
            "down".to_string(),
            fdb("fail_00"),
            fdb("fail_03"),
            fdb("fail_01"),
            fdb("fail_04"),
            fdb("fail_02"),
            fdb("fail_05"),
        ]
    );
    let by_name = |n: &str| {
        st["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == n)
            .unwrap()
            .clone()
    };
    assert_eq!(by_name("down")["status"], "unreachable");
    let failed = by_name(&fdb("fail_03"));
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["step"], "add_v", "{failed}");
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{failed}"
    );

    dbs[3].exec("DROP TABLE side_effects").await;
    dbs[3].exec(&items_setup(120)).await;
    let o = fleet(
        &["fleet", "resume", s(&plan), "--targets", s(&targets)],
        &[],
    );
    let err = stderr(&o);
    // `down` is still down: the worst left is 3.
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains(&format!(
            "[{p}fleet_fail_03] done",
            p = crate::harness::prefix()
        )),
        "{err}"
    );
    assert!(err.contains("[down] unreachable"), "{err}");
    assert!(err.contains("5 already done"), "{err}");
    assert_right(&dbs[3].client, &dbs[3].name, 120, true).await;
    let mut after = Vec::new();
    for (i, d) in dbs.iter().enumerate() {
        if i != 3 {
            after.push(footprint(&d.client).await);
        }
    }
    assert_eq!(
        before, after,
        "fleet resume re-ran something on a finished target"
    );
}

/// Waits until one of `dbs` is in the middle of plan `plan`'s backfill (40 rows
/// committed, not done), while the fleet runner `child` still runs.
async fn mid_backfill(dbs: &[TestDb], plan: &str, child: &mut std::process::Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "no backfill got going");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the fleet ended before the backfill was under way"
        );
        for d in dbs {
            if plan_status(&d.client, "pgshift", plan).await.is_some()
                && d.scalar_i64(
                    "SELECT count(*) FROM pgshift.steps s WHERE name = 'fill_v' AND status = 'running'
                       AND (SELECT coalesce(sum(r.rows_done), 0) FROM pgshift.backfill_ranges r
                            WHERE r.plan_id = s.plan_id AND r.step = s.name) >= 40",
                )
                .await
                    > 0
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// kill -9 of the fleet runner while targets are mid-backfill and others have
// not started; then `fleet resume` (to the gate) and `--yes fleet resume`:
// every target ends right, and no step and no batch committed twice anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_fleet_runner_then_resume_ends_every_target_right_with_no_step_committed_twice()
 {
    let dbs = databases("kill", 8, |_| 300).await;
    let plan = write(
        "fleet_kill",
        "plan.yaml",
        &plan_yaml("fleet_kill", 20, "30ms", true),
    );
    let targets = write(
        "fleet_kill",
        "targets.yaml",
        &format!(
            "parallel: 3\ncanary: 1\ndiscover:\n  url_env: FLEET_ADMIN_URL\n  query: {}\n",
            discover_query("kill")
        ),
    );
    let mut child = spawn_fleet_apply(&plan, &targets);
    // Wait until a target after the canary is in the middle of its backfill.
    mid_backfill(&dbs[1..], "fleet_kill", &mut child).await;
    child.kill().unwrap(); // SIGKILL
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), None, "killed by a signal");
    let mut states = Vec::new();
    for d in &dbs {
        states.push(plan_status(&d.client, "pgshift", "fleet_kill").await);
    }
    eprintln!("after kill -9: {states:?}");
    assert!(
        states.iter().any(Option::is_none),
        "every target had started: {states:?}"
    );
    assert!(
        states.iter().any(|s| s.as_deref() == Some("running")),
        "no target was mid-run: {states:?}"
    );
    // The killed runner's sessions end with it; the server notices at once here.
    let admin = connect(&server_url()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgshift' AND datname LIKE 'pgshift\\_t\\_fleet\\_kill\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        assert!(Instant::now() < deadline, "the killed runner's sessions stayed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let o = fleet(
        &["fleet", "resume", s(&plan), "--targets", s(&targets)],
        &[],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("8 at gate"), "{err}");
    let o = fleet(
        &[
            "--yes",
            "fleet",
            "resume",
            s(&plan),
            "--targets",
            s(&targets),
        ],
        &[],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    for d in &dbs {
        assert_right(&d.client, &d.name, 300, true).await;
        // The interrupted step was found and continued, not started over.
        let restarted = d
            .scalar_i64("SELECT count(*) FROM pgshift.events WHERE event = 'plan_registered'")
            .await;
        assert_eq!(restarted, 1, "{}", d.name);
    }
}

// SIGTERM stops every running target resumably and starts no new one; the
// fleet exits 3, and `fleet resume` continues each from its checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_every_target_resumably_and_resume_continues() {
    let dbs = databases("term", 5, |_| 300).await;
    let plan = write(
        "fleet_term",
        "plan.yaml",
        &plan_yaml("fleet_term", 20, "40ms", false),
    );
    let targets = write(
        "fleet_term",
        "targets.yaml",
        &format!(
            "parallel: 2\ncanary: 0\ndiscover:\n  url_env: FLEET_ADMIN_URL\n  query: {}\n",
            discover_query("term")
        ),
    );
    let mut child = spawn_fleet_apply(&plan, &targets);
    mid_backfill(&dbs, "fleet_term", &mut child).await;
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert!(
        err.contains("not started (interrupted before it started)"),
        "{err}"
    );
    let mut states = Vec::new();
    for d in &dbs {
        states.push(plan_status(&d.client, "pgshift", "fleet_term").await);
    }
    assert!(
        states
            .iter()
            .all(|s| matches!(s.as_deref(), None | Some("interrupted") | Some("succeeded"))),
        "a target was left running: {states:?}"
    );
    assert!(
        states.iter().any(|s| s.as_deref() == Some("interrupted")),
        "{states:?}"
    );
    let o = fleet(
        &["fleet", "resume", s(&plan), "--targets", s(&targets)],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for d in &dbs {
        assert_right(&d.client, &d.name, 300, true).await;
    }
}

// Schema per tenant: 20 tenant schemas in one database, discovered by a query,
// plus one whose `items` is missing, and a decoy `public.items`. Each tenant
// runs with search_path set to its own schema: the 20 end right, the one
// without a table fails instead of reaching `public.items`, the decoy is
// untouched, every generated trigger function sits in its tenant's schema, and
// each tenant has a control schema of its own. Then `fleet rollback`: refused
// off a terminal without --yes, and with it undoes every tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_tenant_schemas_discovered_by_a_query_each_end_right_and_touch_only_their_own_tables()
 {
    let db = TestDb::create("fleet_tenants").await;
    let mut setup = String::new();
    for i in 0..20 {
        setup.push_str(&format!(
            "CREATE SCHEMA tenant_{i:02}; SET search_path = tenant_{i:02}; {}\n",
            items_setup(40 + i)
        ));
    }
    setup.push_str("CREATE SCHEMA tenant_nodata; SET search_path = tenant_nodata; CREATE TABLE side_effects (step text NOT NULL);\n");
    setup.push_str("SET search_path = public; ");
    setup.push_str(&items_setup(7));
    db.exec(&setup).await;

    let plan = write(
        "fleet_tenants",
        "plan.yaml",
        &plan_yaml("fleet_tenants", 10, "0ms", true),
    );
    let targets = write(
        "fleet_tenants",
        "targets.yaml",
        "parallel: 6\ncanary: 1\nmax_failures: 3\ndiscover:\n  url_env: TENANTS_URL\n  query: SELECT nspname FROM pg_namespace WHERE nspname LIKE 'tenant\\_%' ORDER BY nspname\n  mode: schemas\n",
    );
    let env = [("TENANTS_URL", db.url.as_str())];
    let o = fleet(
        &["fleet", "apply", s(&plan), "--targets", s(&targets)],
        &env,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("20 at gate"), "{err}");
    assert!(
        err.contains(
            "[tenant_nodata] failed: step `add_v` failed: relation \"items\" does not exist"
        ),
        "{err}"
    );
    let o = fleet(
        &[
            "--yes",
            "fleet",
            "resume",
            s(&plan),
            "--targets",
            s(&targets),
        ],
        &env,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("20 done"), "{err}");

    for i in 0..20i64 {
        let url = format!(
            "{}{}options=-c%20search_path%3Dtenant_{i:02}",
            db.url,
            if db.url.contains('?') { "&" } else { "?" }
        );
        let c = connect(&url).await;
        let tenant = format!("tenant_{i:02}");
        assert_right(&c, &tenant, 40 + i, true).await;
        assert_eq!(
            plan_status(&c, &format!("pgshift_{tenant}"), "fleet_tenants")
                .await
                .as_deref(),
            Some("succeeded")
        );
    }
    // The decoy in public: no column added, no row touched, no side effect.
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' AND table_name = 'items' AND column_name = 'v'")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM public.items WHERE n <> 0 OR bf_hits <> 0")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM public.side_effects")
            .await,
        0
    );
    // Each tenant's generated trigger function is in its own schema, and none elsewhere.
    let placed = db
        .scalar_i64(
            "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.proname LIKE 'pgshift\\_%' AND n.nspname LIKE 'tenant\\_%' AND n.nspname <> 'tenant_nodata'",
        )
        .await;
    let all = db
        .scalar_i64("SELECT count(*) FROM pg_proc WHERE proname LIKE 'pgshift\\_%'")
        .await;
    assert_eq!((placed, all), (20, 20));
    // One trigger per tenant table, none on the decoy.
    let triggers = db
        .scalar_i64(
            "SELECT count(*) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.tgname LIKE 'pgshift\\_%' AND n.nspname = 'public'",
        )
        .await;
    assert_eq!(triggers, 0);
    // 21 control schemas (the failed tenant's too), and a second discovery leaves them out.
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'pgshift\\_tenant\\_%'"
        )
        .await,
        21
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgshift'")
            .await,
        0
    );

    // Rollback: off a terminal, refused without --yes, nothing changed.
    let o = fleet(
        &["fleet", "rollback", s(&plan), "--targets", s(&targets)],
        &env,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("refused: off a terminal"), "{err}");
    assert!(err.contains("on 21 of 21 target(s)"), "{err}");
    let o = fleet(
        &[
            "--yes",
            "fleet",
            "rollback",
            s(&plan),
            "--targets",
            s(&targets),
        ],
        &env,
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("21 rolled back"), "{err}");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' AND column_name = 'v'")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_proc WHERE proname LIKE 'pgshift\\_%'")
            .await,
        0
    );
}

// A target whose plan another runner holds is named and exits 4 while the
// others finish; a plan file changed after it ran is refused on the targets
// that ran it (exit 5, worse than 4) — never reported "already done" — and
// `fleet resume --accept-changed` runs only what is new there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_target_exits_4_and_a_changed_plan_exits_5_until_accepted() {
    let dbs = databases("held", 3, |_| 30).await;
    let text = plan_yaml("fleet_held", 50, "0ms", false);
    let plan = write("fleet_held", "plan.yaml", &text);
    let targets = write(
        "fleet_held",
        "targets.yaml",
        &format!(
            "parallel: 3\ncanary: 0\nmax_failures: 3\ndiscover:\n  url_env: FLEET_ADMIN_URL\n  query: {}\n",
            discover_query("held")
        ),
    );
    // Another runner: the plan's advisory lock, held on target 01.
    let other = connect(&dbs[1].url).await;
    other
        .execute(
            "SELECT pg_advisory_lock(hashtextextended('pgshift/pgshift/fleet_held', 0))",
            &[],
        )
        .await
        .unwrap();
    let o = fleet(&["fleet", "apply", s(&plan), "--targets", s(&targets)], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains(&format!(
            "[{p}fleet_held_01] held: another runner holds plan `fleet_held`",
            p = crate::harness::prefix()
        )),
        "{err}"
    );
    assert!(err.contains("2 done"), "{err}");
    drop(other);

    // The file changes: a step is added at the end.
    std::fs::write(
        &plan,
        format!("{text}    - name: still_filled\n      check: SELECT NOT EXISTS (SELECT FROM items WHERE v IS NULL)\n"),
    )
    .unwrap();
    let o = fleet(&["fleet", "apply", s(&plan), "--targets", s(&targets)], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(
        err.contains(&format!(
            "[{p}fleet_held_00] plan `fleet_held` changed since it started",
            p = crate::harness::prefix()
        )),
        "{err}"
    );
    assert!(err.contains("--accept-changed"), "{err}");
    assert!(
        err.contains(&format!(
            "[{p}fleet_held_01] done",
            p = crate::harness::prefix()
        )),
        "{err}"
    );
    assert!(!err.contains("already done"), "{err}");
    let o = fleet(
        &[
            "fleet",
            "resume",
            s(&plan),
            "--targets",
            s(&targets),
            "--accept-changed",
        ],
        &[],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    for d in &dbs {
        assert_right(&d.client, &d.name, 30, true).await;
        assert_eq!(
            d.scalar_i64("SELECT count(*) FROM pgshift.steps WHERE name = 'still_filled' AND status = 'succeeded'")
                .await,
            1,
            "{}",
            d.name
        );
    }
}

// A canary that fails stops the fleet before any other target starts: no
// other database has so much as a control schema afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_stops_the_fleet_before_any_other_target_starts() {
    let dbs = databases("canary", 5, |i| if i == 0 { 0 } else { 50 }).await;
    let plan = write(
        "fleet_canary",
        "plan.yaml",
        &plan_yaml("fleet_canary", 50, "0ms", true),
    );
    let targets = write(
        "fleet_canary",
        "targets.yaml",
        &format!(
            "parallel: 4\ncanary: 1\nmax_failures: 10\ndiscover:\n  url_env: FLEET_ADMIN_URL\n  query: {}\n",
            discover_query("canary")
        ),
    );
    let o = fleet(&["fleet", "apply", s(&plan), "--targets", s(&targets)], &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "[{p}fleet_canary_00] failed",
            p = crate::harness::prefix()
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "not started (the canary `{}` did not reach done or its gate",
            fdb("canary_00")
        )),
        "{err}"
    );
    assert!(err.contains("4 not started"), "{err}");
    for d in &dbs[1..] {
        assert_eq!(
            d.scalar_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgshift'")
                .await,
            0,
            "{} was touched",
            d.name
        );
        assert_eq!(
            d.scalar_i64("SELECT count(*) FROM side_effects").await,
            0,
            "{}",
            d.name
        );
    }
}

// Targets files with mistakes: each mistake reported as `file:line:col`, exit 2,
// and nothing touched (the database they name gets no control schema). A
// password in the file is refused without being printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targets_files_are_refused_with_file_line_col_and_exit_2_touching_nothing() {
    let db = TestDb::create("fleet_bad").await;
    db.exec(&items_setup(10)).await;
    let plan = write(
        "fleet_bad",
        "plan.yaml",
        &plan_yaml("fleet_bad", 50, "0ms", true),
    );
    let url = db.url.clone();
    let with_pw = url.replace("postgres@", "postgres:hunter2@");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "misspelled_key.yaml",
            format!("paralel: 4\ntargets:\n  - name: a\n    url: {url}\n"),
            vec![
                ":1:1: error[unknown-key]: unknown key `paralel`",
                "did you mean `parallel`?",
            ],
        ),
        (
            "password.yaml",
            format!("targets:\n  - name: a\n    url: {with_pw}\n"),
            vec![":3:10: error[password-in-file]: target `a`: the URL carries a password"],
        ),
        (
            "unset_env.yaml",
            "targets:\n  - name: a\n    url_env: PGSHIFT_T_FLEET_NOT_SET\n".to_string(),
            vec![
                ":3:14: error[env]: target `a`: environment variable `PGSHIFT_T_FLEET_NOT_SET` is not set",
            ],
        ),
        (
            "duplicate.yaml",
            format!("targets:\n  - name: a\n    url: {url}\n  - name: a\n    url: {url}\n"),
            vec![":4:11: error[duplicate-name]: target name `a` is used twice (first at line 2)"],
        ),
        (
            "zero_parallel.yaml",
            format!("parallel: 0\ntargets:\n  - name: a\n    url: {url}\n"),
            vec![":1:11: error[range]: `parallel` is 0; it must be between 1 and 256"],
        ),
        (
            "bad_mode.yaml",
            "discover:\n  url_env: FLEET_ADMIN_URL\n  query: SELECT 'x'\n  mode: tenants\n"
                .to_string(),
            vec![":4:9: error[value]: `discover.mode` is `tenants`"],
        ),
        (
            "syntax.yaml",
            format!("targets:\n  - name: a\n    url: {url}\n  - [\n"),
            vec![":4:5: error[syntax]: unclosed bracket"],
        ),
        (
            "no_url.yaml",
            "targets:\n  - name: a\n".to_string(),
            vec![":2:5: error[missing-key]: target `a` has no `url` or `url_env`"],
        ),
    ];
    for (name, text, wants) in &cases {
        let file = write("fleet_bad", name, text);
        for args in [
            vec!["fleet", "apply", s(&plan), "--targets", s(&file)],
            vec!["fleet", "validate", "--targets", s(&file)],
        ] {
            let o = fleet(&args, &[]);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(2), "{name}: {err}");
            // The first is where the mistake is; the others are said somewhere.
            for (k, want) in wants.iter().enumerate() {
                let want = if k == 0 {
                    format!("{}{want}", file.display())
                } else {
                    want.to_string()
                };
                assert!(err.contains(&want), "{name}: expected `{want}` in:\n{err}");
            }
            assert!(err.contains("nothing was changed"), "{name}: {err}");
            assert!(
                !err.contains("hunter2"),
                "{name}: a password was printed:\n{err}"
            );
        }
    }
    // A discover query that cannot run, or returns two columns: exit 2, with where it is written.
    for (name, query, want) in [
        (
            "bad_query.yaml",
            "SELEC datname FROM pg_database",
            "the discover query failed: syntax error",
        ),
        (
            "two_columns.yaml",
            "SELECT datname, oid FROM pg_database",
            "returns 2 columns",
        ),
        (
            "writes.yaml",
            "CREATE TABLE fleet_oops (x int)",
            "read-only transaction",
        ),
    ] {
        let file = write(
            "fleet_bad",
            name,
            &format!("discover:\n  url_env: FLEET_ADMIN_URL\n  query: {query}\n"),
        );
        let o = fleet(&["fleet", "apply", s(&plan), "--targets", s(&file)], &[]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(
            err.contains(&format!("{}:2:3", file.display())),
            "{name}: {err}"
        );
        assert!(err.contains(want), "{name}: {err}");
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgshift'")
            .await,
        0,
        "a refused targets file touched the database"
    );
}

/// The ```yaml blocks of the README that are targets files.
fn targets_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match &mut current {
            None if line.trim_start() == "```yaml" => current = Some((i + 2, String::new())),
            Some(_) if line.trim_start() == "```" => {
                let (at, text) = current.take().unwrap_or_default();
                if text
                    .lines()
                    .any(|l| l.starts_with("targets:") || l.starts_with("discover:"))
                {
                    out.push((at, text));
                }
            }
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
            None => {}
        }
    }
    out
}

// The README's targets files are valid (with the variables they name set), so
// the example cannot drift from what pgshift accepts.
#[test]
fn the_readme_targets_files_validate() {
    let text = std::fs::read_to_string(project_file("README.md")).unwrap();
    let blocks = targets_blocks(&text);
    assert!(!blocks.is_empty(), "the README has no targets file example");
    for (line, yaml) in blocks {
        let file = write("fleet_readme", &format!("targets_{line}.yaml"), &yaml);
        let o = pgshift_with_env(
            &["fleet", "validate", "--targets", s(&file)],
            &[
                (
                    "EU_1_DATABASE_URL",
                    "postgres://migrator:pw@eu-1.internal/app",
                ),
                (
                    "FLEET_ADMIN_URL",
                    "postgres://migrator:pw@tenants.internal/postgres",
                ),
            ],
        );
        assert_eq!(o.status.code(), Some(0), "README.md:{line}: {}", stderr(&o));
    }
}
