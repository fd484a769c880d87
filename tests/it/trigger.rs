//! The generated dual-write trigger against the real server: every insert and
//! update case, row by row, for `set` alone and for a rename with `reverse`.

use std::path::Path;

use pgshift::kind::TriggerSpec;
use pgshift::kind::trigger::{names, rollback_statements, statements};
use pgshift::plan::{Plan, StepKind};

use crate::harness::*;

/// Runs `stmts` in one transaction, as the runner does.
async fn run(db: &TestDb, stmts: &[String]) {
    let mut sql = String::from("BEGIN;\n");
    for s in stmts {
        sql.push_str(s);
        sql.push_str(";\n");
    }
    sql.push_str("COMMIT;");
    db.exec(&sql).await;
}

/// Validates a plan through the real parser.
fn plan(yaml: &str) -> Plan {
    pgshift::plan::validate::validate(Path::new("test.yaml"), yaml)
        .unwrap_or_else(|e| panic!("plan does not validate:\n{e}"))
}

/// The spec of trigger step `name` of `plan`.
fn trigger<'a>(plan: &'a Plan, name: &str) -> &'a TriggerSpec {
    match &plan.step(name).expect("step").kind {
        StepKind::Trigger(t) => t,
        other => panic!("step {name} is {}", other.name()),
    }
}

/// A plan with one trigger step `sync` (and a drop_trigger step `drop_sync`).
fn trigger_plan(id: &str, trigger_yaml: &str) -> Plan {
    plan(&format!(
        "id: {id}\nphases:\n  dual_write:\n    - name: sync\n      trigger:\n{trigger_yaml}\n  contract:\n    - name: deployed\n      gate: deploy\n    - name: drop_sync\n      drop_trigger: sync\n"
    ))
}

/// Two text columns of the row with `id`.
async fn pair(db: &TestDb, sql: &str, id: i32) -> (Option<String>, Option<String>) {
    let row = db
        .client
        .query_one(sql, &[&id])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    (row.get(0), row.get(1))
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

/// What the test trigger `'md5:' || lower(NEW.email)` derives from `v` (a cheap,
/// readable stand-in for a hash), computed by the server in its own locale.
async fn md5(db: &TestDb, v: &str) -> Option<String> {
    db.client
        .query_one("SELECT 'md5:' || lower($1::text)", &[&v])
        .await
        .unwrap()
        .get(0)
}

async fn count_generated(db: &TestDb) -> (i64, i64) {
    (
        db.scalar_i64("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'pgshift\\_%'")
            .await,
        db.scalar_i64("SELECT count(*) FROM pg_proc WHERE proname LIKE 'pgshift\\_%'")
            .await,
    )
}

const LEADS: &str =
    "CREATE TABLE leads (id int PRIMARY KEY, email text, email_hash text, note text)";
const HASH_TRIGGER: &str =
    "        table: leads\n        set: { email_hash: \"'md5:' || lower(NEW.email)\" }";
const LEAD: &str = "SELECT email, email_hash FROM leads WHERE id = $1";

#[tokio::test]
async fn set_only_insert_fills_the_new_column_unless_written() {
    let db = TestDb::create("trg_set_insert").await;
    db.exec(LEADS).await;
    let p = trigger_plan("p", HASH_TRIGGER);
    run(&db, &statements(&p.id, "sync", trigger(&p, "sync"))).await;

    db.exec(
        "INSERT INTO leads (id, email) VALUES (1, 'A@X.com'), (2, NULL), (3, ''), (4, 'ZOË@例え.JP');
         INSERT INTO leads (id, email, email_hash) VALUES (5, 'B@x', 'given'), (6, NULL, 'given')",
    )
    .await;
    assert_eq!(
        pair(&db, LEAD, 1).await,
        (s("A@X.com"), md5(&db, "a@x.com").await)
    );
    assert_eq!(pair(&db, LEAD, 2).await, (None, None));
    assert_eq!(pair(&db, LEAD, 3).await, (s(""), md5(&db, "").await));
    assert_eq!(
        pair(&db, LEAD, 4).await,
        (s("ZOË@例え.JP"), md5(&db, "zoë@例え.jp").await)
    );
    assert_eq!(pair(&db, LEAD, 5).await, (s("B@x"), s("given")));
    assert_eq!(pair(&db, LEAD, 6).await, (None, s("given")));
}

#[tokio::test]
async fn set_only_update_recomputes_unless_the_writer_wrote_the_new_column() {
    let db = TestDb::create("trg_set_update").await;
    db.exec(LEADS).await;
    let p = trigger_plan("p", HASH_TRIGGER);
    run(&db, &statements(&p.id, "sync", trigger(&p, "sync"))).await;
    db.exec("INSERT INTO leads (id, email) SELECT g, 'e' || g FROM generate_series(1, 6) g")
        .await;

    // Old side only: recomputed.
    db.exec("UPDATE leads SET email = 'C@x' WHERE id = 1").await;
    assert_eq!(pair(&db, LEAD, 1).await, (s("C@x"), md5(&db, "c@x").await));
    // Both sides: what the writer wrote stays.
    db.exec("UPDATE leads SET email = 'D', email_hash = 'both' WHERE id = 2")
        .await;
    assert_eq!(pair(&db, LEAD, 2).await, (s("D"), s("both")));
    // New side only: kept.
    db.exec("UPDATE leads SET email_hash = 'only-new' WHERE id = 3")
        .await;
    assert_eq!(pair(&db, LEAD, 3).await, (s("e3"), s("only-new")));
    // An unrelated column: nothing recomputed.
    db.exec("UPDATE leads SET note = 'x' WHERE id = 3").await;
    assert_eq!(pair(&db, LEAD, 3).await, (s("e3"), s("only-new")));
    // To NULL, to empty, to non-ASCII.
    db.exec("UPDATE leads SET email = NULL WHERE id = 4").await;
    assert_eq!(pair(&db, LEAD, 4).await, (None, None));
    db.exec("UPDATE leads SET email = '' WHERE id = 5").await;
    assert_eq!(pair(&db, LEAD, 5).await, (s(""), md5(&db, "").await));
    db.exec("UPDATE leads SET email = 'ÅSA@Straße.de' WHERE id = 6")
        .await;
    assert_eq!(
        pair(&db, LEAD, 6).await,
        (s("ÅSA@Straße.de"), md5(&db, "åsa@straße.de").await)
    );
    // The same value again: recomputed from the old side (it counts as not written).
    db.exec("UPDATE leads SET email = 'E', email_hash = email_hash WHERE id = 1")
        .await;
    assert_eq!(pair(&db, LEAD, 1).await, (s("E"), md5(&db, "e").await));
}

#[tokio::test]
async fn set_only_trigger_stays_out_of_the_backfill() {
    let db = TestDb::create("trg_set_backfill").await;
    db.exec(LEADS).await;
    db.exec("INSERT INTO leads (id, email) SELECT g, 'Mail' || g FROM generate_series(1, 100) g")
        .await;
    let p = trigger_plan("p", HASH_TRIGGER);
    let spec = trigger(&p, "sync");
    run(&db, &statements(&p.id, "sync", spec)).await;
    let function = names(&p.id, "sync").function;

    // Count the trigger function's calls inside one transaction.
    let calls = format!(
        "SELECT coalesce(pg_stat_get_xact_function_calls('{}'::regproc), 0)",
        function.quoted()
    );
    db.exec("BEGIN; SET LOCAL track_functions = 'pl'").await;
    db.exec("UPDATE leads SET email_hash = 'md5:' || lower(email) WHERE email_hash IS NULL")
        .await;
    assert_eq!(
        db.scalar_i64(&calls).await,
        0,
        "the backfill fired the trigger"
    );
    db.exec("UPDATE leads SET email = email || '!' WHERE id <= 3")
        .await;
    assert_eq!(db.scalar_i64(&calls).await, 3);
    db.exec("COMMIT").await;

    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM leads WHERE email_hash IS DISTINCT FROM 'md5:' || lower(email)"
        )
        .await,
        0
    );
    assert_eq!(
        pair(&db, LEAD, 2).await,
        (s("Mail2!"), md5(&db, "mail2!").await)
    );
}

const USERS: &str =
    "CREATE TABLE users (id int PRIMARY KEY, email text, contact_email text, name text)";
const RENAME: &str = "        table: users\n        set: { contact_email: NEW.email }\n        reverse: { email: NEW.contact_email }";
const USER: &str = "SELECT email, contact_email FROM users WHERE id = $1";

#[tokio::test]
async fn rename_insert_fills_whichever_side_was_left_null() {
    let db = TestDb::create("trg_rename_insert").await;
    db.exec(USERS).await;
    let p = trigger_plan("p", RENAME);
    run(&db, &statements(&p.id, "sync", trigger(&p, "sync"))).await;

    db.exec(
        "INSERT INTO users (id, email) VALUES (1, 'old@x'), (2, ''), (3, 'Jürgen@例え');
         INSERT INTO users (id, contact_email) VALUES (4, 'new@x'), (5, ''), (6, 'Ærø@x');
         INSERT INTO users (id, email, contact_email) VALUES (7, 'a', 'b');
         INSERT INTO users (id, name) VALUES (8, 'nobody')",
    )
    .await;
    assert_eq!(pair(&db, USER, 1).await, (s("old@x"), s("old@x")));
    assert_eq!(pair(&db, USER, 2).await, (s(""), s("")));
    assert_eq!(
        pair(&db, USER, 3).await,
        (s("Jürgen@例え"), s("Jürgen@例え"))
    );
    assert_eq!(pair(&db, USER, 4).await, (s("new@x"), s("new@x")));
    assert_eq!(pair(&db, USER, 5).await, (s(""), s("")));
    assert_eq!(pair(&db, USER, 6).await, (s("Ærø@x"), s("Ærø@x")));
    assert_eq!(pair(&db, USER, 7).await, (s("a"), s("b")));
    assert_eq!(pair(&db, USER, 8).await, (None, None));
}

#[tokio::test]
async fn rename_update_follows_the_side_the_writer_changed() {
    let db = TestDb::create("trg_rename_update").await;
    db.exec(USERS).await;
    let p = trigger_plan("p", RENAME);
    run(&db, &statements(&p.id, "sync", trigger(&p, "sync"))).await;
    db.exec("INSERT INTO users (id, email) SELECT g, 'u' || g FROM generate_series(1, 8) g")
        .await;

    // The old application writes the old column.
    db.exec("UPDATE users SET email = 'old2' WHERE id = 1")
        .await;
    assert_eq!(pair(&db, USER, 1).await, (s("old2"), s("old2")));
    // The new application writes the new column.
    db.exec("UPDATE users SET contact_email = 'new2' WHERE id = 2")
        .await;
    assert_eq!(pair(&db, USER, 2).await, (s("new2"), s("new2")));
    // Both written: kept as written.
    db.exec("UPDATE users SET email = 'o', contact_email = 'n' WHERE id = 3")
        .await;
    assert_eq!(pair(&db, USER, 3).await, (s("o"), s("n")));
    // NULL, empty and non-ASCII, from either side.
    db.exec("UPDATE users SET email = NULL WHERE id = 4").await;
    assert_eq!(pair(&db, USER, 4).await, (None, None));
    db.exec("UPDATE users SET contact_email = NULL WHERE id = 5")
        .await;
    assert_eq!(pair(&db, USER, 5).await, (None, None));
    db.exec("UPDATE users SET contact_email = '' WHERE id = 6")
        .await;
    assert_eq!(pair(&db, USER, 6).await, (s(""), s("")));
    db.exec("UPDATE users SET email = 'Ŝtefan@日本' WHERE id = 7")
        .await;
    assert_eq!(
        pair(&db, USER, 7).await,
        (s("Ŝtefan@日本"), s("Ŝtefan@日本"))
    );
    // An unrelated column changes nothing.
    db.exec("UPDATE users SET contact_email = 'n8', email = 'o8' WHERE id = 8; UPDATE users SET name = 'x' WHERE id = 8")
        .await;
    assert_eq!(pair(&db, USER, 8).await, (s("o8"), s("n8")));
}

#[tokio::test]
async fn rename_backfill_gets_what_the_trigger_would_write() {
    let db = TestDb::create("trg_rename_backfill").await;
    db.exec(USERS).await;
    db.exec(
        "INSERT INTO users (id, email) SELECT g, CASE g % 3 WHEN 0 THEN NULL WHEN 1 THEN '' ELSE 'Ü' || g END FROM generate_series(1, 90) g",
    )
    .await;
    let p = trigger_plan("p", RENAME);
    run(&db, &statements(&p.id, "sync", trigger(&p, "sync"))).await;
    let before = db
        .scalar_i64("SELECT count(*) FROM users WHERE email IS NOT NULL")
        .await;
    db.exec("UPDATE users SET contact_email = email WHERE contact_email IS DISTINCT FROM email")
        .await;
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM users WHERE contact_email IS DISTINCT FROM email")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM users WHERE email IS NOT NULL")
            .await,
        before
    );
    assert_eq!(pair(&db, USER, 5).await, (s("Ü5"), s("Ü5")));
}

#[tokio::test]
async fn when_limits_the_rows_maintained() {
    let db = TestDb::create("trg_when").await;
    db.exec("CREATE TABLE leads (id int PRIMARY KEY, kind text, email text, email_hash text)")
        .await;
    let p = trigger_plan(
        "p",
        "        table: leads\n        set: { email_hash: \"'md5:' || lower(NEW.email)\" }\n        when: NEW.kind = 'person'",
    );
    let spec = trigger(&p, "sync");
    run(&db, &statements(&p.id, "sync", spec)).await;
    assert!(statements(&p.id, "sync", spec)[3].contains("UPDATE OF \"email\", \"kind\""));

    db.exec(
        "INSERT INTO leads (id, kind, email) VALUES (1, 'person', 'A'), (2, 'org', 'B'), (3, NULL, 'C')",
    )
    .await;
    assert_eq!(pair(&db, LEAD, 1).await, (s("A"), md5(&db, "a").await));
    assert_eq!(pair(&db, LEAD, 2).await, (s("B"), None));
    assert_eq!(pair(&db, LEAD, 3).await, (s("C"), None));
    db.exec("UPDATE leads SET email = 'B2' WHERE id = 2").await;
    assert_eq!(pair(&db, LEAD, 2).await, (s("B2"), None));
    // The row comes into scope: maintained from then on.
    db.exec("UPDATE leads SET kind = 'person' WHERE id = 3")
        .await;
    assert_eq!(pair(&db, LEAD, 3).await, (s("C"), md5(&db, "c").await));
    db.exec("UPDATE leads SET kind = 'org', email = 'Z' WHERE id = 1")
        .await;
    assert_eq!(pair(&db, LEAD, 1).await, (s("Z"), md5(&db, "a").await));
}

#[tokio::test]
async fn hostile_names_are_quoted_and_inject_nothing() {
    let db = TestDb::create("trg_hostile").await;
    let long_col = "c".repeat(63);
    db.exec(&format!(
        r#"CREATE TABLE users (id int);
           CREATE SCHEMA "My ""Schema""";
           CREATE TABLE "My ""Schema"""."x""; DROP TABLE users; --" (
               id int PRIMARY KEY,
               "Email Address" text,
               "Hash ""Quoted"" Ü" text,
               "{long_col}" text,
               "MixedCase" text
           )"#
    ))
    .await;
    let id = "i".repeat(63);
    let step = format!("s{}", "_x".repeat(31));
    let yaml = format!(
        "id: {id}\nphases:\n  dual_write:\n    - name: {step}\n      trigger:\n        table: '\"My \"\"Schema\"\"\".\"x\"\"; DROP TABLE users; --\"'\n        set:\n          '\"Hash \"\"Quoted\"\" Ü\"': 'md5(NEW.\"Email Address\")'\n          '\"{long_col}\"': 'NEW.\"MixedCase\"'\n"
    );
    let p = plan(&yaml);
    let spec = trigger(&p, &step);
    let stmts = statements(&p.id, &step, spec);
    assert!(
        stmts[3].contains(r#"UPDATE OF "Email Address", "MixedCase" ON"#),
        "{}",
        stmts[3]
    );
    run(&db, &stmts).await;
    run(&db, &stmts).await;

    let table = r#""My ""Schema"""."x""; DROP TABLE users; --""#;
    db.exec(&format!(
        r#"INSERT INTO {table} (id, "Email Address", "MixedCase") VALUES (1, 'a@b', 'Mixed')"#
    ))
    .await;
    let row = db
        .client
        .query_one(
            &format!(r#"SELECT "Hash ""Quoted"" Ü", "{long_col}" FROM {table} WHERE id = 1"#),
            &[],
        )
        .await
        .unwrap();
    let hash: Option<String> = row.get(0);
    let copy: Option<String> = row.get(1);
    assert_eq!(
        hash,
        db.scalar_string("SELECT md5('a@b')").await,
        "the trigger did not fill the quoted column"
    );
    assert_eq!(copy, s("Mixed"));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM users").await, 0);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_tables WHERE tablename = 'users'")
            .await,
        1
    );

    // The names were cut to 63 bytes with a hash, and the rollback finds them.
    let n = names(&p.id, &step);
    assert_eq!(n.trigger.as_str().len(), 63);
    assert_eq!(
        db.scalar_i64(&format!(
            "SELECT count(*) FROM pg_trigger WHERE tgname = '{}'",
            n.trigger.as_str()
        ))
        .await,
        1
    );
    assert_eq!(
        db.scalar_i64(&format!(
            r#"SELECT count(*) FROM pg_proc WHERE proname = '{}' AND pronamespace = '"My ""Schema"""'::regnamespace"#,
            n.function.as_str()
        ))
        .await,
        1
    );
    run(&db, &rollback_statements(&p.id, &step, spec)).await;
    assert_eq!(count_generated(&db).await, (0, 0));
    assert_eq!(db.scalar_i64("SELECT count(*) FROM users").await, 0);
}

#[tokio::test]
async fn rollback_leaves_no_trigger_or_function_and_reruns_are_harmless() {
    let db = TestDb::create("trg_rollback").await;
    db.exec(USERS).await;
    let p = trigger_plan("p", RENAME);
    let spec = trigger(&p, "sync");

    // Rolling back what was never applied is harmless.
    run(&db, &rollback_statements(&p.id, "sync", spec)).await;
    assert_eq!(count_generated(&db).await, (0, 0));

    run(&db, &statements(&p.id, "sync", spec)).await;
    run(&db, &statements(&p.id, "sync", spec)).await;
    assert_eq!(count_generated(&db).await, (1, 1));
    db.exec("INSERT INTO users (id, email) VALUES (1, 'a')")
        .await;
    assert_eq!(pair(&db, USER, 1).await, (s("a"), s("a")));

    run(&db, &rollback_statements(&p.id, "sync", spec)).await;
    assert_eq!(count_generated(&db).await, (0, 0));
    run(&db, &rollback_statements(&p.id, "sync", spec)).await;
    db.exec("INSERT INTO users (id, email) VALUES (2, 'b')")
        .await;
    assert_eq!(pair(&db, USER, 2).await, (s("b"), None));
}

#[tokio::test]
async fn drop_trigger_step_drops_and_its_rollback_recreates() {
    let db = TestDb::create("trg_drop_step").await;
    db.exec("CREATE SCHEMA app").await;
    db.exec(&USERS.replace("TABLE users", "TABLE app.users"))
        .await;
    let p = trigger_plan("p", &RENAME.replace("table: users", "table: app.users"));
    let StepKind::DropTrigger(d) = &p.step("drop_sync").unwrap().kind else {
        panic!("drop_sync is not a drop_trigger step");
    };
    run(&db, &statements(&p.id, "sync", trigger(&p, "sync"))).await;
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'pgshift\\_%' AND pronamespace = 'app'::regnamespace"
        )
        .await,
        1
    );

    // The drop_trigger step runs the trigger step's rollback…
    run(&db, &rollback_statements(&p.id, &d.step, &d.trigger)).await;
    assert_eq!(count_generated(&db).await, (0, 0));
    // …and its own rollback re-creates it.
    run(&db, &statements(&p.id, &d.step, &d.trigger)).await;
    assert_eq!(count_generated(&db).await, (1, 1));
    db.exec("INSERT INTO app.users (id, contact_email) VALUES (1, 'n')")
        .await;
    assert_eq!(
        pair(
            &db,
            "SELECT email, contact_email FROM app.users WHERE id = $1",
            1
        )
        .await,
        (s("n"), s("n"))
    );
}

#[tokio::test]
async fn product_example_trigger_runs_as_shown() {
    let db = TestDb::create("trg_product_example").await;
    db.exec("CREATE TABLE leads (id int PRIMARY KEY, email text)")
        .await;
    let file = fixture("plans/good/product_example.yaml");
    let p = pgshift::plan::load(&file).expect("product example validates");
    let spec = trigger(&p, "sync_email_hash");
    // The plan's own expand step adds the column.
    let StepKind::Sql(add) = &p.step("add_email_hash").unwrap().kind else {
        panic!("add_email_hash is not sql");
    };
    db.exec(&add.statements[0].text).await;
    run(&db, &statements(&p.id, "sync_email_hash", spec)).await;
    db.exec("INSERT INTO leads (id, email) VALUES (1, 'Ann@Example.com')")
        .await;
    assert_eq!(
        db.scalar_string("SELECT email_hash FROM leads WHERE id = 1")
            .await,
        db.scalar_string("SELECT encode(sha256('ann@example.com'::bytea), 'hex')")
            .await
    );

    // `plan show` prints exactly these statements and the generated rollback.
    let o = pgshift(&["plan", "show", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    let shown: String = out
        .lines()
        .filter_map(|l| {
            l.trim_start()
                .strip_prefix("| ")
                .or(l.trim_start().strip_prefix("|"))
        })
        .collect::<Vec<_>>()
        .join("\n");
    for st in statements(&p.id, "sync_email_hash", spec)
        .iter()
        .chain(&rollback_statements(&p.id, "sync_email_hash", spec))
    {
        assert!(
            shown.contains(st.as_str()),
            "missing from plan show:\n{st}\n---\n{out}"
        );
    }
}

#[tokio::test]
async fn a_misspelled_column_fails_the_step_not_the_application() {
    let db = TestDb::create("trg_probe").await;
    db.exec(LEADS).await;
    let p = trigger_plan(
        "p",
        "        table: leads\n        set: { email_hash: \"md5(NEW.emial)\" }",
    );
    let stmts = statements(&p.id, "sync", trigger(&p, "sync"));
    let script = format!("BEGIN;\n{};\nCOMMIT;", stmts.join(";\n"));
    let err = db.client.batch_execute(&script).await.unwrap_err();
    assert!(
        err.to_string().contains("emial") || format!("{err:?}").contains("emial"),
        "{err:?}"
    );
    db.exec("ROLLBACK").await;
    assert_eq!(count_generated(&db).await, (0, 0));
    db.exec("INSERT INTO leads (id, email) VALUES (1, 'a')")
        .await;
}
