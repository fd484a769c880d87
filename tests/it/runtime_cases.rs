//! The cases of the runtime corpus (see `runtime.rs`): one plan each that
//! passes `plan validate` and then fails against the database it meets. Here
//! the shared tables and plans, and the cases where the server refuses a step
//! or a timeout ends it; the data's own failures (backfill rows, dual writes)
//! and changes made by someone else are in `runtime_data.rs`. Keep both in step
//! with RELIABILITY.md, "Runtime failures".

use crate::runtime::{Case, Fix};

/// `leads`: 2,000 rows; `touched` counts the writes of `q` (a backfill must write each row once).
macro_rules! leads {
    () => {
        "CREATE TABLE leads (id bigint PRIMARY KEY, email text NOT NULL, a bigint NOT NULL, b bigint NOT NULL, q bigint, touched int NOT NULL DEFAULT 0);
         INSERT INTO leads (id, email, a, b) SELECT g, 'u' || g || '@example.com', g, 1 FROM generate_series(1, 2000) g;
         CREATE FUNCTION count_fill() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.q IS DISTINCT FROM OLD.q THEN NEW.touched := OLD.touched + 1; END IF; RETURN NEW; END $$;
         CREATE TRIGGER count_fill BEFORE UPDATE ON leads FOR EACH ROW EXECUTE FUNCTION count_fill();
"
    };
}

/// The usual plan over `leads`, from its dual write on: `q` = `a / b`.
macro_rules! fill_q {
    ($set:literal, $new:literal) => {
        concat!(
            "  dual_write:
    - name: sync_q
      trigger:
        table: leads
        set: { q: \"",
            $new,
            "\" }
  backfill:
    - name: fill_q
      backfill:
        table: leads
        set: { q: \"",
            $set,
            "\" }
        where: q IS NULL
        batch_size: 200
"
        )
    };
}

/// A gate, then one contract step that needs the table's owner.
macro_rules! contract {
    () => {
        "  contract:
    - name: deployed
      gate: Deploy the application that reads q
    - name: comment_q
      sql: COMMENT ON COLUMN leads.q IS 'a / b'; INSERT INTO runs VALUES ('comment_q')
      rollback: COMMENT ON COLUMN leads.q IS NULL
"
    };
}

/// The whole usual plan: a marker step, `fill_q!`, `contract!`.
macro_rules! usual {
    ($set:literal, $new:literal) => {
        concat!(
            "id: {id}
phases:
  expand:
    - name: mark
      sql: INSERT INTO runs VALUES ('mark')
      rollback: DELETE FROM runs WHERE step = 'mark'
",
            fill_q!($set, $new),
            contract!()
        )
    };
}

/// The `leads` table of most cases (for tests outside the table).
pub const LEADS: &str = leads!();

/// The usual plan with id `id` (for tests outside the table).
pub fn usual_plan(id: &str) -> String {
    usual!("a / b", "NEW.a / NEW.b").replace("{id}", id)
}

pub const ALL_Q: &str = "SELECT count(*) = 2000 FROM leads WHERE q = a / b";

pub const fn case(name: &'static str, setup: &'static str, plan: &'static str) -> Case {
    Case {
        name,
        setup,
        plan,
        as_role: false,
        at_gate: None,
        hold: None,
        code: 1,
        secs: 5,
        says: &[],
        status_says: &[],
        statuses: &[],
        then: "",
        fix: Fix::None,
        fixed: "",
    }
}

pub const CASES: &[Case] = &[
    // --- honest error classes: a check of the wrong shape fails, never "reconnects" ---
    Case {
        says: &["step `is_ready`", "one boolean column", "type int4"],
        statuses: &[("is_ready", "failed")],
        then: "SELECT last_error LIKE '%one boolean column%' FROM pgshift.steps WHERE name = 'is_ready'",
        fix: Fix::Plan("check: SELECT 1", "check: SELECT true"),
        ..case(
            "check_returns_an_integer",
            "",
            "id: {id}\nphases:\n  contract:\n    - name: is_ready\n      check: SELECT 1\n",
        )
    },
    Case {
        says: &["step `no_orphans`", "returned no row"],
        statuses: &[("no_orphans", "failed")],
        fix: Fix::Plan("SELECT true FROM pg_class WHERE false", "SELECT true"),
        ..case(
            "check_returns_no_row",
            "",
            "id: {id}\nphases:\n  contract:\n    - name: no_orphans\n      check: SELECT true FROM pg_class WHERE false\n",
        )
    },
    Case {
        says: &["step `both`", "returns 2 columns", "SELECT count(*) = 0 FROM"],
        statuses: &[("both", "failed")],
        fix: Fix::Plan("SELECT true, false", "SELECT true"),
        ..case(
            "check_returns_two_columns",
            "",
            "id: {id}\nphases:\n  contract:\n    - name: both\n      check: SELECT true, false\n",
        )
    },
    Case {
        says: &["step `none_null`", "check returned false", "Fix the data"],
        statuses: &[("none_null", "failed")],
        fix: Fix::Sql("UPDATE leads SET q = a"),
        fixed: "SELECT count(*) = 0 FROM leads WHERE q IS NULL",
        ..case(
            "check_is_false_until_the_data_is_fixed",
            leads!(),
            "id: {id}\nphases:\n  contract:\n    - name: none_null\n      check: SELECT count(*) = 0 FROM leads WHERE q IS NULL\n",
        )
    },
    // --- what the server refuses: a step failure naming the object, exit 1 ---
    Case {
        says: &[
            "step `add_note` failed",
            "relation \"lead\" does not exist",
            "42P01",
            "The plan expected it to exist",
        ],
        statuses: &[("add_note", "failed")],
        then: "SELECT last_sqlstate = '42P01' FROM pgshift.steps WHERE name = 'add_note'",
        fix: Fix::Sql("CREATE TABLE lead (id bigint PRIMARY KEY)"),
        fixed: "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'lead'::regclass AND attname = 'note')",
        ..case(
            "sql_names_a_table_that_does_not_exist",
            "",
            "id: {id}
phases:
  expand:
    - name: add_note
      sql: ALTER TABLE lead ADD COLUMN IF NOT EXISTS note text; INSERT INTO runs VALUES ('add_note')
      rollback: ALTER TABLE lead DROP COLUMN IF EXISTS note
",
        )
    },
    Case {
        says: &["step `add_mood` failed", "type \"mood_t\" does not exist", "42704"],
        statuses: &[("add_mood", "failed")],
        then: "SELECT NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'leads'::regclass AND attname = 'mood')",
        fix: Fix::Sql("CREATE TYPE mood_t AS ENUM ('ok', 'sad')"),
        fixed: "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'leads'::regclass AND attname = 'mood')",
        ..case(
            "sql_names_a_type_that_does_not_exist",
            leads!(),
            "id: {id}
phases:
  expand:
    - name: add_mood
      sql: ALTER TABLE leads ADD COLUMN IF NOT EXISTS mood mood_t; INSERT INTO runs VALUES ('add_mood')
      rollback: ALTER TABLE leads DROP COLUMN IF EXISTS mood
",
        )
    },
    Case {
        says: &[
            "step `number_b` failed",
            "invalid input syntax for type bigint: \"u1\"",
            "22P02",
        ],
        statuses: &[("number_b", "failed")],
        then: "SELECT count(*) = 0 FROM runs",
        fix: Fix::Sql("UPDATE leads SET email = id || '@example.com' WHERE id <= 3"),
        fixed: "SELECT count(*) = 3 FROM leads WHERE id <= 3 AND b = id",
        ..case(
            "sql_cast_fails_on_a_row",
            leads!(),
            "id: {id}
phases:
  expand:
    - name: number_b
      sql: UPDATE leads SET b = split_part(email, '@', 1)::bigint WHERE id <= 3; INSERT INTO runs VALUES ('number_b')
      rollback: UPDATE leads SET b = 1 WHERE id <= 3
",
        )
    },
    Case {
        says: &[
            "step `email_key` failed",
            "could not create unique index \"leads_email_key\"",
            "Key (email)=(dup@example.com) is duplicated",
            "23505",
        ],
        statuses: &[("email_key", "failed")],
        // Nothing INVALID is left for the application's planner.
        then: "SELECT to_regclass('leads_email_key') IS NULL",
        fix: Fix::Sql("UPDATE leads SET email = 'other@example.com' WHERE id = 9"),
        fixed: "SELECT indisvalid FROM pg_index WHERE indexrelid = 'leads_email_key'::regclass",
        ..case(
            "unique_index_meets_duplicates",
            concat!(leads!(), "UPDATE leads SET email = 'dup@example.com' WHERE id IN (5, 9);"),
            "id: {id}
phases:
  expand:
    - name: email_key
      sql: CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS leads_email_key ON leads (email)
      rollback: DROP INDEX CONCURRENTLY IF EXISTS leads_email_key
",
        )
    },
    Case {
        as_role: true,
        says: &[
            "step `add_note` failed",
            "must be owner of table leads",
            "42501",
            "pgshift needs ownership of every table a plan changes",
        ],
        statuses: &[("add_note", "failed")],
        fix: Fix::Sql("ALTER TABLE leads OWNER TO {role}"),
        fixed: "SELECT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'leads'::regclass AND attname = 'note')",
        ..case(
            "not_the_owner_of_the_table",
            concat!(leads!(), "GRANT INSERT ON runs TO {role};"),
            "id: {id}
phases:
  expand:
    - name: add_note
      sql: ALTER TABLE leads ADD COLUMN IF NOT EXISTS note text; INSERT INTO runs VALUES ('add_note')
      rollback: ALTER TABLE leads DROP COLUMN IF EXISTS note
",
        )
    },
    // --- timeouts are named, with the setting to raise ---
    Case {
        says: &[
            "step `slow` failed",
            "a statement ran past its statement_timeout of 300ms",
            "raise the step's `statement_timeout`",
            "--accept-changed",
        ],
        statuses: &[("slow", "failed")],
        then: "SELECT last_sqlstate = '57014' FROM pgshift.steps WHERE name = 'slow'",
        fix: Fix::Plan("statement_timeout: 300ms", "statement_timeout: 5s"),
        ..case(
            "sql_past_its_statement_timeout",
            "",
            "id: {id}
phases:
  expand:
    - name: slow
      statement_timeout: 300ms
      sql: SELECT pg_sleep(1); INSERT INTO runs VALUES ('slow')
      rollback: DELETE FROM runs WHERE step = 'slow'
",
        )
    },
    Case {
        says: &[
            "step `settled` failed",
            "ran past its statement_timeout of 200ms",
            "statement_timeout",
        ],
        statuses: &[("settled", "failed")],
        fix: Fix::Plan("statement_timeout: 200ms", "statement_timeout: 5s"),
        ..case(
            "check_past_its_statement_timeout",
            "",
            "id: {id}
phases:
  contract:
    - name: settled
      statement_timeout: 200ms
      check: SELECT pg_sleep(0.5) IS NOT NULL
",
        )
    },
    Case {
        hold: Some("LOCK TABLE leads IN ACCESS SHARE MODE"),
        secs: 10,
        says: &[
            "step `add_note` failed",
            "did not get its lock in 3 attempts of 100ms",
            "pgshift status",
        ],
        statuses: &[("add_note", "failed")],
        then: "SELECT count(*) = 2 FROM pgshift.events WHERE event = 'retry'",
        fix: Fix::Sql("SELECT 1"),
        ..case(
            "lock_retries_run_out",
            leads!(),
            "id: {id}
settings: { lock_timeout: 100ms, retries: 2 }
phases:
  expand:
    - name: add_note
      sql: ALTER TABLE leads ADD COLUMN IF NOT EXISTS note text; INSERT INTO runs VALUES ('add_note')
      rollback: ALTER TABLE leads DROP COLUMN IF EXISTS note
",
        )
    },
    Case {
        says: &[
            "step `suicide` failed",
            "lost the connection 6 times in a row",
            "Check the server log",
        ],
        statuses: &[("suicide", "failed")],
        then: "SELECT count(*) = 5 FROM pgshift.events WHERE event = 'reconnected'",
        fix: Fix::Plan("pg_terminate_backend(pg_backend_pid())", "pg_backend_pid()"),
        ..case(
            "step_that_kills_its_own_connection",
            "",
            "id: {id}
phases:
  expand:
    - name: suicide
      sql: SELECT pg_terminate_backend(pg_backend_pid())
      rollback: SELECT 1
",
        )
    },
    Case {
        says: &[
            "step `notify` failed",
            "was killed with its process group after its timeout of 500ms",
            "raise the step's `timeout`",
        ],
        statuses: &[("notify", "failed")],
        // The background child of the command was killed with it (gone, or a zombie).
        then: "SELECT pg_stat_file('/proc/' || trim(pg_read_file('{dir}/child.pid')), true) IS NULL
                   OR pg_read_file('/proc/' || trim(pg_read_file('{dir}/child.pid')) || '/stat') LIKE '%) Z %'",
        fix: Fix::Plan("sleep 30 &", "sleep 0 &"),
        ..case(
            "run_command_past_its_timeout",
            "",
            "id: {id}
phases:
  expand:
    - name: notify
      run: { command: \"sleep 30 & echo $! > {dir}/child.pid; wait\", timeout: 500ms }
      rollback: { run: \"true\" }
",
        )
    },
];

/// Every case of the corpus: these, then those of `runtime_data.rs`.
pub fn all() -> impl Iterator<Item = &'static Case> {
    CASES.iter().chain(crate::runtime_data::CASES)
}
