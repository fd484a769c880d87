//! The runtime corpus: plans that pass `plan validate` but fail against the
//! database they meet. Each case (in `runtime_cases.rs` and `runtime_data.rs`) prepares a database,
//! applies its plan (stopping at a gate first when someone must change the
//! database meanwhile), and asserts how the run ends: the exit code, a time
//! bound, the message (the step, the object, the next command), the control
//! table afterwards, and, where a fix exists, that `resume` after the fix
//! finishes with no step or batch applied twice. A case without a test
//! fails `every_case_has_a_test`, so the table and the tests cannot drift apart.

use std::time::{Duration, Instant};

use crate::executor::{expect_code, run, status_json, step_status, work_dir, write_plan};
use crate::harness::*;
use crate::runtime_cases::all;

/// What a case does after the failure, to make it pass.
pub enum Fix {
    /// Nothing can: the plan itself must change (its assertions end at the failure).
    None,
    /// SQL that repairs the database; then `resume`.
    Sql(&'static str),
    /// Text of the plan file to replace (from, to); then `resume --accept-changed`.
    Plan(&'static str, &'static str),
}

/// One plan that validates and then fails against a prepared database.
pub struct Case {
    /// The test's name; the plan id and database are `rt_<name>`.
    pub name: &'static str,
    /// SQL that prepares the database (`{role}`, `{db}` and `{dir}` are replaced).
    pub setup: &'static str,
    /// The plan (`{id}` and `{dir}` are replaced).
    pub plan: &'static str,
    /// Run pgshift as a role of its own (`{role}`), not as the superuser.
    pub as_role: bool,
    /// SQL run while the plan waits at its gate (the first run must stop there, exit 3);
    /// the failing run is then `resume --yes`.
    pub at_gate: Option<&'static str>,
    /// SQL run in a transaction held open during the failing run (a blocker).
    pub hold: Option<&'static str>,
    pub code: i32,
    /// The failing run ends within this many seconds.
    pub secs: u64,
    /// Pieces of the message (stderr) of the failing run.
    pub says: &'static [&'static str],
    /// Pieces of `pgshift status PLAN` (the table) afterwards.
    pub status_says: &'static [&'static str],
    /// Steps and their status in `pgshift status` afterwards.
    pub statuses: &'static [(&'static str, &'static str)],
    /// A boolean query over the database (control tables included) that must be true afterwards.
    pub then: &'static str,
    pub fix: Fix,
    /// A boolean query that must be true once the fixed plan has finished.
    pub fixed: &'static str,
}

/// The role a case runs as.
fn role_name(case: &Case) -> String {
    format!("{}{}", prefix(), case.name)
}

fn fill(text: &str, case: &Case, db: &TestDb, dir: &std::path::Path) -> String {
    text.replace("{id}", &format!("rt_{}", case.name))
        .replace("{role}", &role_name(case))
        .replace("{db}", &db.name)
        .replace("{dir}", &dir.display().to_string())
}

async fn truth(db: &TestDb, sql: &str, what: &str) {
    if sql.is_empty() {
        return;
    }
    let ok: bool = db
        .client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{what}: {sql}: {e}"))
        .get(0);
    assert!(ok, "{what}: not true: {sql}");
}

/// Runs pgshift against the case's database, as its role if it has one.
fn pgshift_as(case: &Case, db: &TestDb, args: &[&str]) -> std::process::Output {
    if case.as_role {
        let url = db
            .url
            .replacen("postgres@", &format!("{}@", role_name(case)), 1);
        pgshift_with_env(args, &[("DATABASE_URL", url.as_str())])
    } else {
        run(db, args)
    }
}

/// Runs one case of the corpus from a fresh database.
pub async fn run_case(name: &str) {
    let case = all()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case `{name}` in runtime_cases.rs"));
    let id = format!("rt_{}", case.name);
    let db = TestDb::create(&id).await;
    let dir = work_dir(&id);
    if case.as_role {
        let r = role_name(case);
        db.exec(&format!(
            "DROP ROLE IF EXISTS {r}; CREATE ROLE {r} LOGIN NOSUPERUSER; GRANT CREATE ON DATABASE \"{}\" TO {r}; GRANT CREATE ON SCHEMA public TO {r}",
            db.name
        ))
        .await;
    }
    db.exec("CREATE TABLE runs (step text NOT NULL)").await;
    db.exec(&fill(case.setup, case, &db, &dir)).await;
    let file = write_plan(&dir, &id, &fill(case.plan, case, &db, &dir));
    let f = file.to_str().unwrap();
    let v = pgshift(&["plan", "validate", f]);
    assert_eq!(
        v.status.code(),
        Some(0),
        "{id} must validate: {}",
        stderr(&v)
    );

    // A blocker holds its lock in a transaction kept open during the failing run.
    let blocker = match case.hold {
        Some(sql) => {
            let c = connect(&db.url).await;
            c.batch_execute(&format!("BEGIN; {sql}")).await.unwrap();
            Some(c)
        }
        None => None,
    };
    let t = Instant::now();
    let mut o = pgshift_as(case, &db, &["--progress", "never", "plan", "apply", f]);
    let mut took = t.elapsed();
    if let Some(sql) = case.at_gate {
        expect_code(&o, 3, &format!("{id}: the first run stops at the gate"));
        db.exec(&fill(sql, case, &db, &dir)).await;
        let t = Instant::now();
        o = pgshift_as(case, &db, &["--progress", "never", "--yes", "resume", &id]);
        took = t.elapsed();
    }
    check_end(case, &o, took);
    if let Some(c) = blocker {
        c.batch_execute("COMMIT").await.unwrap();
    }
    let table = stdout(&run(&db, &["status", &id]));
    for piece in case.status_says {
        assert!(
            table.contains(piece),
            "{id}: no `{piece}` in status:\n{table}"
        );
    }
    let plan = status_json(&db, &id);
    for (step, status) in case.statuses {
        assert_eq!(
            step_status(&plan, step),
            *status,
            "{id}: step `{step}` afterwards; status:\n{plan:#}"
        );
    }
    truth(
        &db,
        &fill(case.then, case, &db, &dir),
        &format!("{id} after the failure"),
    )
    .await;

    let resume: Vec<&str> = match &case.fix {
        Fix::None => return finish(case, &db).await,
        Fix::Sql(sql) => {
            db.exec(&fill(sql, case, &db, &dir)).await;
            vec!["--progress", "never", "--yes", "resume", &id]
        }
        Fix::Plan(from, to) => {
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(text.contains(from), "{id}: the plan has no `{from}` to fix");
            std::fs::write(&file, text.replace(from, to)).unwrap();
            vec![
                "--progress",
                "never",
                "--yes",
                "resume",
                &id,
                "--accept-changed",
            ]
        }
    };
    // A gate after the failed step stops the first resume; the next one passes it.
    let mut o = pgshift_as(case, &db, &resume);
    for _ in 0..3 {
        if o.status.code() != Some(3) || !stderr(&o).contains("stopped at gate") {
            break;
        }
        o = pgshift_as(case, &db, &["--progress", "never", "--yes", "resume", &id]);
    }
    expect_code(&o, 0, &format!("{id}: resume after the fix"));
    let plan = status_json(&db, &id);
    assert_eq!(plan["status"], "succeeded", "{id}: {plan:#}");
    truth(
        &db,
        &fill(case.fixed, case, &db, &dir),
        &format!("{id} after the fix"),
    )
    .await;
    // No step ran twice: every sql step of the corpus writes its name once into `runs`.
    truth(
        &db,
        "SELECT to_regclass('runs') IS NULL OR (SELECT count(*) = count(DISTINCT step) FROM runs)",
        &format!("{id}: a step ran twice"),
    )
    .await;
    // No batch was applied twice: the corpus's tables count the writes of each row's filled column.
    let counted = db
        .scalar_i64("SELECT count(*) FROM pg_attribute WHERE attrelid = to_regclass('leads') AND attname = 'touched'")
        .await;
    if counted == 1 {
        truth(
            &db,
            "SELECT NOT EXISTS (SELECT FROM leads WHERE touched > 1)",
            &format!("{id}: a row was filled twice"),
        )
        .await;
    }
    finish(case, &db).await;
}

/// How the failing run ended: code, time, message.
fn check_end(case: &Case, o: &std::process::Output, took: Duration) {
    let id = format!("rt_{}", case.name);
    expect_code(o, case.code, &id);
    assert!(
        took < Duration::from_secs(case.secs),
        "{id}: took {took:?}, bound {}s",
        case.secs
    );
    eprintln!(
        "runtime corpus: {id}: exit {}, {:.2}s",
        case.code,
        took.as_secs_f64()
    );
    let e = stderr(o);
    for piece in case.says {
        assert!(e.contains(piece), "{id}: no `{piece}` in:\n{e}");
    }
    assert!(
        e.contains(&format!("pgshift resume {id}"))
            || e.contains(&format!("pgshift --yes resume {id}")),
        "{id}: the message names no next command:\n{e}"
    );
    if !case.says.iter().any(|s| s.contains("lost the connection")) {
        assert!(
            !e.contains("reconnect"),
            "{id}: taken for a lost connection:\n{e}"
        );
    }
}

/// Drops the case's role, if it made one (the database stays, to inspect).
async fn finish(case: &Case, db: &TestDb) {
    let r = role_name(case);
    db.exec(&format!(
        "DO $$ BEGIN
           IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{r}') THEN
             EXECUTE 'DROP OWNED BY {r} CASCADE';
             EXECUTE 'REVOKE ALL ON DATABASE \"{d}\" FROM {r}';
             EXECUTE 'REVOKE ALL ON SCHEMA public FROM {r}';
             EXECUTE 'DROP ROLE {r}';
           END IF;
         END $$",
        d = db.name
    ))
    .await;
}

macro_rules! corpus {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                run_case(stringify!($name)).await;
            }
        )*
        const TESTED: &[&str] = &[$(stringify!($name)),*];
    };
}

corpus!(
    check_returns_an_integer,
    check_returns_no_row,
    check_returns_two_columns,
    check_is_false_until_the_data_is_fixed,
    sql_names_a_table_that_does_not_exist,
    sql_names_a_type_that_does_not_exist,
    sql_cast_fails_on_a_row,
    unique_index_meets_duplicates,
    not_the_owner_of_the_table,
    sql_past_its_statement_timeout,
    check_past_its_statement_timeout,
    lock_retries_run_out,
    step_that_kills_its_own_connection,
    run_command_past_its_timeout,
    backfill_divides_by_zero_on_one_row,
    backfill_cast_fails_on_a_composite_key,
    backfill_breaks_a_check_constraint,
    backfill_breaks_a_unique_index,
    backfill_meets_a_trigger_that_raises,
    backfill_of_300k_rows_fails_near_the_end,
    backfill_batches_past_their_statement_timeout,
    backfill_calls_a_function_that_does_not_exist,
    dual_write_fails_for_rows_then_the_gate_holds,
    dual_write_fails_for_the_application_role,
    dual_write_failure_keeps_contract_closed,
    dual_write_failure_that_cannot_be_checked_again,
    table_renamed_at_the_gate,
    column_dropped_at_the_gate,
    index_dropped_at_the_gate,
    trigger_disabled_at_the_gate,
    ownership_taken_away_at_the_gate,
    backfill_column_renamed_at_the_gate,
);

#[test]
fn every_case_has_a_test() {
    let names: Vec<&str> = all().map(|c| c.name).collect();
    for n in &names {
        assert!(TESTED.contains(n), "case `{n}` has no test in runtime.rs");
    }
    for t in TESTED {
        assert!(
            names.contains(t),
            "test `{t}` has no case in runtime_cases.rs"
        );
    }
    assert!(names.len() >= 25, "the corpus has {} cases", names.len());
}

/// Takes a version-3 control schema back to version 1 (schema.sql has not changed since).
const DOWNGRADE: &str = "DROP FUNCTION pgshift.record_dual_write_failure(text, text, oid, text, jsonb, text, text, boolean);
     DROP TABLE pgshift.trigger_failures, pgshift.dual_writes;
     REVOKE USAGE ON SCHEMA pgshift FROM PUBLIC;
     ALTER TABLE pgshift.plans DROP COLUMN run_epoch;
     ALTER TABLE pgshift.steps DROP COLUMN progress;
     ALTER TABLE pgshift.backfill_ranges DROP COLUMN epoch, DROP COLUMN rows_updated;
     UPDATE pgshift.meta SET value = '1' WHERE key = 'schema_version';";

async fn control_version(db: &TestDb) -> String {
    db.scalar_string("SELECT value FROM pgshift.meta WHERE key = 'schema_version'")
        .await
        .unwrap_or_default()
}

// A database where an earlier pgshift left a version-1 control schema, with a
// plan waiting at its gate: the first command, read-only or not, upgrades it in
// place, and the plan continues; two runners racing to upgrade apply the
// upgrade once.
#[tokio::test]
async fn a_version_1_control_schema_is_upgraded_in_place() {
    let db = TestDb::create("rt_upgrade").await;
    db.exec("CREATE TABLE runs (step text NOT NULL)").await;
    db.exec(crate::runtime_cases::LEADS).await;
    let dir = work_dir("rt_upgrade");
    let file = write_plan(
        &dir,
        "rt_upgrade",
        &crate::runtime_cases::usual_plan("rt_upgrade"),
    );
    let f = file.to_str().unwrap();
    let o = run(&db, &["--progress", "never", "plan", "apply", f]);
    expect_code(&o, 3, "the plan waits at its gate");
    db.exec(DOWNGRADE).await;
    let events_before = db.scalar_i64("SELECT count(*) FROM pgshift.events").await;

    // Version 1 has nowhere to report a failed dual write: the write still goes through.
    db.exec("INSERT INTO leads (id, email, a, b) VALUES (5001, 'x@example.com', 5001, 0)")
        .await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM leads WHERE id = 5001")
            .await,
        1
    );

    // Even a read-only command upgrades it (it reads the new columns), keeping
    // what was recorded; then the plan goes on.
    let o = run(&db, &["status", "rt_upgrade"]);
    expect_code(&o, 0, "status on a version-1 control schema");
    assert!(stdout(&o).contains("waiting"), "{}", stdout(&o));
    assert_eq!(control_version(&db).await, "3");
    let o = run(
        &db,
        &["--progress", "never", "--yes", "resume", "rt_upgrade"],
    );
    expect_code(&o, 0, "resume on an upgraded control schema");
    assert_eq!(control_version(&db).await, "3");
    assert!(
        db.scalar_i64("SELECT count(*) FROM pgshift.events").await > events_before,
        "the events of before are kept and the run added its own"
    );
    assert_eq!(
        step_status(&status_json(&db, "rt_upgrade"), "fill_q"),
        "succeeded"
    );
    // A trigger installed before the upgrade reports to the upgraded schema.
    db.exec("UPDATE leads SET b = 0 WHERE id = 9").await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pgshift.trigger_failures WHERE key = '{\"id\": 9}'")
            .await,
        1
    );

    // Two runners meet a version-1 schema at once: each plan runs, the upgrade happens once.
    db.exec("DELETE FROM pgshift.trigger_failures").await;
    db.exec(DOWNGRADE).await;
    let plans: Vec<_> = (1..=2)
        .map(|n| {
            write_plan(
                &dir,
                &format!("rt_upgrade_{n}"),
                &format!("id: rt_upgrade_{n}\nphases:\n  contract:\n    - name: ok\n      check: SELECT true\n"),
            )
        })
        .collect();
    let children: Vec<_> = plans
        .iter()
        .map(|p| {
            crate::executor::spawn(
                &db,
                &["--progress", "never", "plan", "apply", p.to_str().unwrap()],
            )
        })
        .collect();
    for (n, child) in children.into_iter().enumerate() {
        let o = crate::executor::wait_output(child, Duration::from_secs(30), "racing runner");
        expect_code(&o, 0, &format!("racing runner {}", n + 1));
    }
    assert_eq!(control_version(&db).await, "3");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_proc WHERE proname = 'record_dual_write_failure'")
            .await,
        1
    );
}

// After a rollback the plan's dual writes are gone: the rows they failed on hold
// nothing up any more (they are marked resolved, and why), and applying the
// plan again starts clean.
#[tokio::test]
async fn rollback_resolves_the_failures_of_its_dual_writes() {
    let db = TestDb::create("rt_rollback_failures").await;
    db.exec("CREATE TABLE runs (step text NOT NULL)").await;
    db.exec(crate::runtime_cases::LEADS).await;
    let dir = work_dir("rt_rollback_failures");
    let file = write_plan(
        &dir,
        "rt_rollback_failures",
        &crate::runtime_cases::usual_plan("rt_rollback_failures"),
    );
    let f = file.to_str().unwrap();
    expect_code(
        &run(&db, &["--progress", "never", "plan", "apply", f]),
        3,
        "to the gate",
    );
    db.exec("UPDATE leads SET b = 0 WHERE id = 3").await;
    let o = run(
        &db,
        &[
            "--progress",
            "never",
            "--yes",
            "rollback",
            "rt_rollback_failures",
        ],
    );
    expect_code(&o, 0, "rollback");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pgshift.trigger_failures WHERE resolved_at IS NOT NULL AND resolution = 'the plan was rolled back'")
            .await,
        1
    );
    db.exec("UPDATE leads SET b = 1 WHERE id = 3").await;
    let o = run(&db, &["--progress", "never", "--yes", "plan", "apply", f]);
    expect_code(&o, 3, "applied again, to the gate");
    let o = run(
        &db,
        &[
            "--progress",
            "never",
            "--yes",
            "resume",
            "rt_rollback_failures",
        ],
    );
    expect_code(&o, 0, "and past it: no failure left open");
}

// The failing trigger looks its recording function up by name; one planted under
// that name by another role must never receive the application's row (nor run
// with the writer's privileges): only the migrating role's SECURITY DEFINER one does.
#[tokio::test]
async fn a_function_planted_under_the_recorders_name_is_never_called() {
    let db = TestDb::create("rt_planted").await;
    let intruder = format!("{}intruder", prefix());
    db.exec("CREATE TABLE runs (step text NOT NULL)").await;
    db.exec(crate::runtime_cases::LEADS).await;
    db.exec(&format!(
        "DROP ROLE IF EXISTS {intruder}; CREATE ROLE {intruder} NOLOGIN;
         CREATE SCHEMA planted; CREATE TABLE planted.trigger_failures (row jsonb);
         GRANT USAGE ON SCHEMA planted TO PUBLIC; GRANT INSERT ON planted.trigger_failures TO PUBLIC;
         CREATE FUNCTION planted.record_dual_write_failure(text, text, oid, text, jsonb, text, text, boolean)
           RETURNS boolean LANGUAGE sql SECURITY DEFINER AS 'INSERT INTO planted.trigger_failures VALUES ($5) RETURNING true';
         ALTER FUNCTION planted.record_dual_write_failure(text, text, oid, text, jsonb, text, text, boolean) OWNER TO {intruder};
         GRANT EXECUTE ON FUNCTION planted.record_dual_write_failure(text, text, oid, text, jsonb, text, text, boolean) TO PUBLIC;"
    ))
    .await;
    let dir = work_dir("rt_planted");
    let file = write_plan(
        &dir,
        "rt_planted",
        &crate::runtime_cases::usual_plan("rt_planted"),
    );
    let o = run(
        &db,
        &[
            "--progress",
            "never",
            "plan",
            "apply",
            file.to_str().unwrap(),
        ],
    );
    expect_code(&o, 3, "to the gate");
    db.exec("INSERT INTO leads (id, email, a, b) VALUES (5001, 'x@example.com', 5001, 0)")
        .await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM planted.trigger_failures")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pgshift.trigger_failures")
            .await,
        1
    );
    db.exec(&format!(
        "DROP SCHEMA planted CASCADE; DROP ROLE {intruder}"
    ))
    .await;
}
