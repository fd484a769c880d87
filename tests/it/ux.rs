//! What the operator sees off a terminal (CI logs, `| tee`, a deploy pipeline),
//! through the built binary: JSON lines that parse, text without escape codes,
//! connection failures that say nothing was changed, hints that carry the
//! options of the run, what a changed plan file changed, a rollback that stops
//! where it must, and the smaller promises of `status`, `validate` and `show`.

use std::time::Duration;

use serde_json::Value as Json;

use crate::executor::{
    SECRET, expect_code, run, secret_url, signal, spawn, wait_output, wait_until,
};
use crate::harness::*;

const PLAN: &str = "id: ux
phases:
  expand:
    - name: add_h
      sql: ALTER TABLE items ADD COLUMN IF NOT EXISTS h text
      rollback: ALTER TABLE items DROP COLUMN IF EXISTS h
  dual_write:
    - name: sync_h
      trigger: { table: items, set: { h: \"md5(NEW.email)\" } }
  backfill:
    - name: fill_h
      backfill:
        table: items
        set: { h: \"md5(email)\" }
        where: h IS NULL
        batch_size: 200
  contract:
    - name: deployed
      gate: Deploy the reader of h
";

async fn items(name: &str, rows: i64) -> TestDb {
    let db = TestDb::create(name).await;
    db.exec(&format!("CREATE TABLE items (id int PRIMARY KEY, email text NOT NULL); INSERT INTO items SELECT g, 'u' || g || '@x.test' FROM generate_series(1, {rows}) g;")).await;
    db
}

fn is_rfc3339_utc(t: &str) -> bool {
    let b = t.as_bytes();
    t.len() >= 20
        && t.ends_with('Z')
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && t[..4].chars().all(|c| c.is_ascii_digit())
}

/// Every line of `stderr` is one JSON object of the documented shape.
fn json_lines(stderr: &str) -> Vec<Json> {
    stderr
        .lines()
        .map(|l| {
            let v: Json = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\nin:\n{stderr}"));
            for key in [
                "timestamp",
                "level",
                "event",
                "plan",
                "step",
                "target",
                "message",
                "fields",
            ] {
                assert!(v.get(key).is_some(), "no `{key}` in {l}");
            }
            let ts = v["timestamp"].as_str().unwrap_or_default();
            assert!(is_rfc3339_utc(ts), "timestamp {ts:?} in {l}");
            v
        })
        .collect()
}

fn events(lines: &[Json]) -> Vec<&str> {
    lines.iter().filter_map(|l| l["event"].as_str()).collect()
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_and_text_logs_have_no_escape_codes() {
    let db = items("ux_json", 3000).await;
    let file = plan_file("ux_json", "ux.yaml", PLAN);
    let f = file.to_str().unwrap();

    let o = db.pgshift(&["--log-format", "json", "-vv", "plan", "apply", f]);
    expect_code(&o, 3, "apply to the gate, JSON logs");
    let lines = json_lines(&stderr(&o));
    let ev = events(&lines);
    for e in [
        "plan_started",
        "step_started",
        "backfill_ended",
        "gate_waiting",
        "next",
    ] {
        assert!(ev.contains(&e), "no `{e}` event in {ev:?}");
    }
    let started = lines.iter().find(|l| l["event"] == "step_started").unwrap();
    assert_eq!(started["plan"], "ux");
    assert_eq!(started["step"], "add_h");
    assert!(started["target"].as_str().unwrap().contains(&db.name));
    let ended = lines
        .iter()
        .find(|l| l["event"] == "backfill_ended")
        .unwrap();
    assert_eq!(ended["fields"]["rows_done"], 3000);
    assert_eq!(ended["fields"]["end"], "done");
    let gate = lines.iter().find(|l| l["event"] == "gate_waiting").unwrap();
    assert_eq!(gate["fields"]["message"], "Deploy the reader of h");

    // Off a terminal, JSON mode asks nothing, and a refusal is a JSON line too.
    let o = db.pgshift(&["--log-format", "json", "resume", "ux"]);
    expect_code(&o, 3, "resume without --yes");
    assert!(events(&json_lines(&stderr(&o))).contains(&"gate_closed"));
    // A usage error and a connection that never opened: JSON lines as well.
    let o = db.pgshift(&["--log-format", "json", "status", "--no-such-flag"]);
    expect_code(&o, 2, "usage error");
    assert_eq!(json_lines(&stderr(&o))[0]["event"], "usage_error");
    let o = pgshift(&[
        "--log-format",
        "json",
        "--database-url",
        &url_for(&server_url(), &format!("{}nowhere", prefix())),
        "status",
    ]);
    expect_code(&o, 2, "missing database");
    assert_eq!(json_lines(&stderr(&o))[0]["event"], "cannot_connect");

    // Text at -vv off a terminal: timestamps, and not one escape code anywhere.
    let o = db.pgshift(&["-vv", "--yes", "resume", "ux"]);
    expect_code(&o, 0, "resume past the gate, text at -vv");
    let err = stderr(&o);
    assert!(
        !err.contains('\x1b') && !stdout(&o).contains('\x1b'),
        "{err:?}"
    );
    let first = err.lines().next().unwrap_or_default();
    assert!(
        is_rfc3339_utc(first.split(' ').next().unwrap_or_default()),
        "{err}"
    );
    // Without -v: no timestamps.
    let o = db.pgshift(&["--yes", "resume", "ux"]);
    expect_code(&o, 0, "resume of a finished plan");
    assert!(stderr(&o).starts_with("pgshift: "), "{}", stderr(&o));
    assert!(!stderr(&o).contains('\x1b'));
}

#[tokio::test]
async fn a_connection_that_never_opened_says_nothing_was_changed() {
    let db = items("ux_connect", 10).await;
    let file = plan_file("ux_connect", "ux.yaml", PLAN);
    let f = file.to_str().unwrap();
    let missing = url_for(&secret_url(&db), &format!("{}no_such_db", prefix()));
    let cases = [
        // The server answers and refuses: a retry cannot help, exit 2.
        (missing.clone(), 2, "does not exist"),
        (
            secret_url(&db).replacen(
                &format!("postgres:{SECRET}@"),
                &format!("ux_no_such_role:{SECRET}@"),
                1,
            ),
            2,
            "role \"ux_no_such_role\" does not exist",
        ),
        // Nothing answers: a retry later may, exit 3.
        (
            "postgres://postgres:s3cretpw@127.0.0.1:1/postgres".to_string(),
            3,
            "nothing answered at 127.0.0.1:1",
        ),
    ];
    for (url, code, why) in cases {
        for args in [vec!["plan", "apply", f], vec!["status"]] {
            let mut all = vec!["--database-url", url.as_str()];
            all.extend(args.iter().copied());
            let o = pgshift(&all);
            expect_code(&o, code, &format!("{args:?} on {why}"));
            let err = stderr(&o);
            assert!(
                err.contains("cannot connect to") && err.contains("nothing was changed"),
                "{err}"
            );
            assert!(err.contains(why), "{err}");
            assert!(
                !err.contains("lost the connection") && !err.contains("resume"),
                "{err}"
            );
            assert!(!err.contains(SECRET), "the password in:\n{err}");
        }
    }
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgshift'")
            .await,
        0
    );
}

#[tokio::test]
async fn hints_carry_the_control_schema_and_the_database_url() {
    let db = items("ux_hints", 100).await;
    let file = plan_file("ux_hints", "ux.yaml", PLAN);
    let f = file.to_str().unwrap();
    let o = pgshift(&[
        "--database-url",
        &db.url,
        "--control-schema",
        "ux_ops",
        "plan",
        "apply",
        f,
    ]);
    expect_code(&o, 3, "apply to the gate");
    let want = format!(
        "pgshift resume ux --control-schema ux_ops --database-url {}",
        db.url
    );
    assert!(
        stderr(&o).contains(&want),
        "no `{want}` in:\n{}",
        stderr(&o)
    );

    // A bare status names the database and the schema it looked in.
    let o = pgshift(&[
        "--database-url",
        &db.url,
        "--control-schema",
        "ux_ops",
        "status",
    ]);
    expect_code(&o, 0, "status");
    assert!(
        stdout(&o).contains(&format!("plans recorded in schema `ux_ops` of {}", db.url)),
        "{}",
        stdout(&o)
    );
    let o = pgshift(&["--database-url", &db.url, "status"]);
    assert!(
        stdout(&o).contains(&format!(
            "no plans recorded in schema `pgshift` of {}",
            db.url
        )),
        "{}",
        stdout(&o)
    );

    // A URL with a password is never repeated: the hint says to pass the same one.
    let secret = secret_url(&db);
    let o = pgshift(&[
        "--database-url",
        &secret,
        "--control-schema",
        "ux_ops",
        "resume",
        "ux",
    ]);
    expect_code(&o, 3, "resume without --yes");
    let err = stderr(&o);
    assert!(!err.contains(SECRET), "{err}");
    assert!(
        err.contains("pgshift --yes resume ux --control-schema ux_ops  # with the same --database-url as this run"),
        "{err}"
    );
}

#[tokio::test]
async fn backfill_says_what_is_left_of_the_plan_and_throttle_says_when_nothing_runs() {
    let db = items("ux_backfill_end", 6000).await;
    let slow = PLAN.replace(
        "batch_size: 200",
        "batch_size: 100\n        throttle: { sleep: 40ms }",
    );
    let file = plan_file("ux_backfill_end", "ux.yaml", &slow);
    let f = file.to_str().unwrap();
    let child = spawn(&db, &["--progress", "never", "plan", "apply", f]);
    wait_until(
        &db,
        "SELECT to_regclass('pgshift.steps') IS NOT NULL",
        Duration::from_secs(30),
    )
    .await;
    wait_until(
        &db,
        "SELECT coalesce((SELECT rows_done > 0 FROM pgshift.steps WHERE name = 'fill_h'), false)",
        Duration::from_secs(30),
    )
    .await;
    signal(&child, "INT");
    let o =
        tokio::task::spawn_blocking(move || wait_output(child, Duration::from_secs(30), "apply"))
            .await
            .unwrap();
    expect_code(&o, 3, "interrupted apply");
    let err = stderr(&o);
    assert!(err.contains("fill_h: interrupted at "), "{err}");

    let o = db.pgshift(&["throttle", "ux", "--sleep", "0"]);
    expect_code(&o, 0, "throttle while nothing runs");
    assert!(
        stderr(&o).contains("no backfill of it is running now (plan status: interrupted)"),
        "{}",
        stderr(&o)
    );

    let o = db.pgshift(&["--progress", "never", "backfill", f]);
    expect_code(&o, 0, "the rest of the backfill");
    let err = stderr(&o);
    assert!(
        !err.lines().any(|l| l == "pgshift: plan `ux` done"),
        "{err}"
    );
    assert!(
        err.contains("the backfill steps of plan `ux` done; the plan is not: 1 step(s) remain, from `deployed`"),
        "{err}"
    );
    assert!(
        err.contains("continue the plan with:\n  pgshift resume ux"),
        "{err}"
    );
    let o = db.pgshift(&["--progress", "never", "backfill", f]);
    assert!(
        stderr(&o).contains("had nothing left to do"),
        "{}",
        stderr(&o)
    );
    let o = db.pgshift(&["throttle", "ux", "--pause"]);
    expect_code(&o, 0, "throttle of a finished backfill");
    assert!(
        stderr(&o).contains("its backfill has already finished (`fill_h` succeeded)"),
        "{}",
        stderr(&o)
    );
}

const CHANGING: &str = "id: changing
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
      rollback: DELETE FROM runs WHERE step = 's2'
";

#[tokio::test]
async fn exit_5_names_what_changed_and_a_step_that_ran_needs_force() {
    let db = TestDb::create("ux_changed").await;
    db.exec("CREATE TABLE runs (step text NOT NULL)").await;
    let file = plan_file("ux_changed", "changing.yaml", CHANGING);
    let f = file.to_str().unwrap();
    expect_code(&run(&db, &["plan", "apply", f]), 3, "apply to the gate");

    // status says what the gate asks.
    let o = run(&db, &["status", "changing"]);
    assert!(
        stdout(&o).contains("waiting at gate `deployed`, which asks:\n  Deploy the app"),
        "{}",
        stdout(&o)
    );
    let v: Json = serde_json::from_str(&stdout(&run(
        &db,
        &["status", "changing", "--format", "json"],
    )))
    .unwrap();
    assert_eq!(v["plans"][0]["gate"]["message"], "Deploy the app");
    assert!(
        is_rfc3339_utc(v["plans"][0]["started_at"].as_str().unwrap()),
        "{v:#}"
    );
    assert!(
        is_rfc3339_utc(v["plans"][0]["steps"][0]["finished_at"].as_str().unwrap()),
        "{v:#}"
    );

    // A step that has not run changed: named, with its diff; --accept-changed takes it.
    std::fs::write(&file, CHANGING.replace("VALUES ('s2')", "VALUES ('s2b')")).unwrap();
    let o = run(&db, &["--yes", "resume", "changing"]);
    expect_code(&o, 5, "changed pending step");
    let err = stderr(&o);
    assert!(
        err.contains("step `s2` (pending): what it does changed:"),
        "{err}"
    );
    assert!(
        err.contains("- INSERT INTO runs VALUES ('s2')")
            && err.contains("+ INSERT INTO runs VALUES ('s2b')"),
        "{err}"
    );
    assert!(err.contains("rerun with --accept-changed"), "{err}");
    let o = run(&db, &["--yes", "resume", "changing", "--accept-changed"]);
    expect_code(&o, 0, "accepted");

    // A step that ran now does something else: refused even with --accept-changed.
    let ran = CHANGING
        .replace("VALUES ('s2')", "VALUES ('s2b')")
        .replace("VALUES ('s1')", "VALUES ('s1b')");
    std::fs::write(&file, &ran).unwrap();
    let o = run(&db, &["--yes", "resume", "changing", "--accept-changed"]);
    expect_code(&o, 5, "changed step that ran");
    let err = stderr(&o);
    assert!(
        err.contains("step `s1` (succeeded: it already ran): what it does changed:"),
        "{err}"
    );
    assert!(
        err.contains("--accept-changed is refused: `s1` already ran"),
        "{err}"
    );
    assert!(err.contains("--accept-changed --force"), "{err}");
    let o = run(
        &db,
        &["--yes", "resume", "changing", "--accept-changed", "--force"],
    );
    expect_code(&o, 0, "forced");
    // Only a rollback changed: a step that ran may still take it without --force.
    std::fs::write(
        &file,
        ran.replace("WHERE step = 's1'", "WHERE step IN ('s1', 's1b')"),
    )
    .unwrap();
    let o = run(&db, &["--yes", "resume", "changing", "--accept-changed"]);
    expect_code(&o, 0, "a changed rollback");
    assert!(
        stderr(&o).contains("step `s1` (succeeded: it already ran): its rollback changed:"),
        "{}",
        stderr(&o)
    );
}

const NO_RETURN: &str = "id: no_return
phases:
  expand:
    - name: add_new
      sql: ALTER TABLE t ADD COLUMN IF NOT EXISTS new text
      rollback: ALTER TABLE t DROP COLUMN IF EXISTS new
  contract:
    - name: deployed
      gate: deploy
    - name: drop_old
      sql: ALTER TABLE t DROP COLUMN old
      allow: { ban-drop-column: \"test\" }
    - name: add_index
      sql: CREATE INDEX CONCURRENTLY IF NOT EXISTS t_new_idx ON t (new)
      rollback: DROP INDEX CONCURRENTLY IF EXISTS t_new_idx
";

#[tokio::test]
async fn rollback_stopped_by_a_step_without_rollback_says_what_was_undone_and_what_stays() {
    let db = TestDb::create("ux_no_return").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, old text)")
        .await;
    let file = plan_file("ux_no_return", "no_return.yaml", NO_RETURN);
    let f = file.to_str().unwrap();
    expect_code(&run(&db, &["plan", "apply", f]), 3, "to the gate");
    expect_code(&run(&db, &["--yes", "resume", "no_return"]), 0, "past it");

    // Off a terminal, the preview says where it will stop; nothing changes.
    let o = run(&db, &["rollback", "no_return"]);
    expect_code(&o, 2, "refused without --yes");
    assert!(
        stderr(&o).contains("and stop at `drop_old`: the plan gives it no rollback"),
        "{}",
        stderr(&o)
    );

    let o = run(&db, &["--yes", "rollback", "no_return"]);
    expect_code(&o, 1, "rollback stopped");
    let err = stderr(&o);
    assert!(!err.contains("failed"), "{err}");
    assert!(
        err.contains(
            "rollback of plan `no_return` stopped at step `drop_old`: the plan gives it no rollback"
        ),
        "{err}"
    );
    assert!(err.contains("Undone: `add_index`."), "{err}");
    assert!(
        err.contains("Still applied: `drop_old`, `deployed`, `add_new`."),
        "{err}"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_indexes WHERE indexname = 't_new_idx'")
            .await,
        0
    );
    let next = stdout(&run(&db, &["status", "no_return"]));
    assert!(next.contains("a rollback stopped partway"), "{next}");
}

#[tokio::test]
async fn status_gives_the_sqlstate_once() {
    let db = TestDb::create("ux_sqlstate").await;
    let file = plan_file(
        "ux_sqlstate",
        "fails.yaml",
        "id: fails\nphases:\n  expand:\n    - name: broken\n      sql: ALTER TABLE missing ADD COLUMN c bigint\n      rollback: ALTER TABLE missing DROP COLUMN c\n",
    );
    let o = db.pgshift(&["plan", "apply", file.to_str().unwrap()]);
    expect_code(&o, 1, "the step fails");
    assert!(
        stderr(&o).contains("see which step failed and why:\n  pgshift status fails"),
        "{}",
        stderr(&o)
    );
    let out = stdout(&db.pgshift(&["status", "fails"]));
    assert_eq!(out.matches("SQLSTATE 42P01").count(), 1, "{out}");
}

#[test]
fn validate_lists_allowed_findings_only_when_asked() {
    let file = plan_file(
        "ux_validate",
        "allowed.yaml",
        "id: allowed\nphases:\n  contract:\n    - name: deployed\n      gate: deploy\n    - name: drop_old\n      sql: ALTER TABLE t DROP COLUMN old\n      allow: { ban-drop-column: \"the app stopped reading it\" }\n",
    );
    let f = file.to_str().unwrap();
    let o = pgshift(&["plan", "validate", f]);
    expect_code(&o, 0, "validate");
    assert!(!stderr(&o).contains("ban-drop-column"), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("1 allowed finding(s): -v lists them"),
        "{}",
        stdout(&o)
    );
    let o = pgshift(&["-v", "plan", "validate", f]);
    assert!(
        stderr(&o).contains("(allowed: the app stopped reading it)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn plan_show_names_the_lock_each_statement_takes() {
    let o = pgshift(&[
        "plan",
        "show",
        project_file("plans/clarivum/0002_leads_email_hash.yaml")
            .to_str()
            .unwrap(),
    ]);
    expect_code(&o, 0, "plan show");
    let out = stdout(&o);
    for want in [
        "lock: ACCESS EXCLUSIVE on \"public\".\"leads\": every read and write of it waits while held",
        "lock: SHARE UPDATE EXCLUSIVE on \"public\".\"leads\": reads and writes go on",
        "lock: ROW EXCLUSIVE on",
    ] {
        assert!(out.contains(want), "no `{want}` in:\n{out}");
    }
}

#[tokio::test]
async fn the_blocker_line_names_pid_state_age_and_query() {
    let db = TestDb::create("ux_blocker").await;
    db.exec("CREATE TABLE t (id bigint PRIMARY KEY)").await;
    // Another session holds a lock on `t` and sits idle in its transaction.
    let blocker = connect(&db.url).await;
    let pid: i32 = blocker
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    blocker
        .batch_execute("BEGIN; SELECT count(*) FROM t")
        .await
        .unwrap();
    let file = plan_file(
        "ux_blocker",
        "blocked.yaml",
        "id: blocked\nsettings: { lock_timeout: 1s, retries: 1 }\nphases:\n  expand:\n    - name: add_c\n      sql: ALTER TABLE t ADD COLUMN c text\n      rollback: ALTER TABLE t DROP COLUMN c\n",
    );
    let o = db.pgshift(&["plan", "apply", file.to_str().unwrap()]);
    expect_code(&o, 1, "the lock never comes");
    let err = stderr(&o);
    assert!(
        err.contains(&format!("blocked by pid {pid}, idle in transaction for ")),
        "{err}"
    );
    assert!(err.contains("SELECT count(*) FROM t"), "{err}");
    drop(blocker);
}
