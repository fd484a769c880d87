//! The runtime corpus, continued (see `runtime_cases.rs`): a backfill that
//! fails on a row, a dual write that fails for a row, and a database someone
//! else changed while the plan waited at its gate.

use crate::runtime::{Case, Fix};
use crate::runtime_cases::{ALL_Q, case};

pub const CASES: &[Case] = &[
    // --- a backfill batch that fails on a row names the row, keeps its progress, resumes ---
    Case {
        says: &[
            "step `fill_q` failed on the row of \"leads\" where id = 1234",
            "division by zero",
            "22012",
            "continues from its checkpoint",
        ],
        statuses: &[("fill_q", "failed"), ("deployed", "pending")],
        then: "SELECT (SELECT (last_key->>'id')::int FROM pgshift.backfill_ranges WHERE step = 'fill_q') = 1233
                 AND (SELECT count(*) FROM leads WHERE q IS NOT NULL) = 1233
                 AND (SELECT last_sqlstate FROM pgshift.steps WHERE name = 'fill_q') = '22012'
                 AND (SELECT detail->'key' = '{\"id\": 1234}' FROM pgshift.events WHERE event = 'backfill_row_failed')",
        fix: Fix::Sql("UPDATE leads SET b = 2 WHERE id = 1234"),
        fixed: ALL_Q,
        ..case(
            "backfill_divides_by_zero_on_one_row",
            concat!(leads!(), "UPDATE leads SET b = 0 WHERE id = 1234;"),
            usual!("a / b", "NEW.a / NEW.b"),
        )
    },
    Case {
        says: &[
            "on the row of \"accounts\" where id = 17 AND tenant = 2",
            "invalid input syntax for type bigint: \"x17\"",
        ],
        statuses: &[("fill_amount", "failed")],
        then: "SELECT count(*) = 316 FROM accounts WHERE amount IS NOT NULL",
        fix: Fix::Sql("UPDATE accounts SET code = '17' WHERE (tenant, id) = (2, 17)"),
        fixed: "SELECT count(*) = 900 FROM accounts WHERE amount = id AND touched <= 1
                  AND (SELECT count(*) = 899 FROM accounts WHERE touched = 1)",
        ..case(
            "backfill_cast_fails_on_a_composite_key",
            "CREATE TABLE accounts (tenant int, id int, code text NOT NULL, amount bigint, touched int NOT NULL DEFAULT 0, PRIMARY KEY (tenant, id));
             INSERT INTO accounts (tenant, id, code) SELECT t, i, i::text FROM generate_series(1, 3) t, generate_series(1, 300) i;
             UPDATE accounts SET code = 'x17' WHERE (tenant, id) = (2, 17);
             CREATE FUNCTION count_amount() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.amount IS DISTINCT FROM OLD.amount THEN NEW.touched := OLD.touched + 1; END IF; RETURN NEW; END $$;
             CREATE TRIGGER count_amount BEFORE UPDATE ON accounts FOR EACH ROW EXECUTE FUNCTION count_amount();",
            "id: {id}
phases:
  dual_write:
    - name: sync_amount
      trigger:
        table: accounts
        set: { amount: NEW.code::bigint }
  backfill:
    - name: fill_amount
      backfill:
        table: accounts
        key: [tenant, id]
        set: { amount: code::bigint }
        where: amount IS NULL
        batch_size: 100
",
        )
    },
    Case {
        says: &[
            "on the row of \"leads\" where id = 1500",
            "violates check constraint \"q_small\"",
            "23514",
        ],
        statuses: &[("fill_q", "failed")],
        then: "SELECT count(*) = 1499 FROM leads WHERE q IS NOT NULL",
        fix: Fix::Sql("ALTER TABLE leads DROP CONSTRAINT q_small"),
        fixed: "SELECT count(*) = 2000 FROM leads WHERE q = a",
        ..case(
            "backfill_breaks_a_check_constraint",
            concat!(leads!(), "ALTER TABLE leads ADD CONSTRAINT q_small CHECK (q < 1500) NOT VALID;"),
            usual!("a", "NEW.a"),
        )
    },
    Case {
        says: &[
            "on the row of \"leads\" where id = 1001",
            "duplicate key value violates unique constraint \"leads_q_key\"",
        ],
        statuses: &[("fill_q", "failed")],
        then: "SELECT count(*) = 1000 FROM leads WHERE q IS NOT NULL",
        fix: Fix::Sql("DROP INDEX leads_q_key"),
        fixed: "SELECT count(*) = 2000 FROM leads WHERE q = a % 1000",
        ..case(
            "backfill_breaks_a_unique_index",
            concat!(leads!(), "CREATE UNIQUE INDEX leads_q_key ON leads (q);"),
            usual!("a % 1000", "NEW.a % 1000"),
        )
    },
    Case {
        says: &["on the row of \"leads\" where id = 1500", "lead 1500 is frozen", "P0001"],
        statuses: &[("fill_q", "failed")],
        fix: Fix::Sql("DROP TRIGGER frozen ON leads"),
        fixed: "SELECT count(*) = 2000 FROM leads WHERE q = a",
        ..case(
            "backfill_meets_a_trigger_that_raises",
            concat!(
                leads!(),
                "CREATE FUNCTION frozen() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.id = 1500 AND NEW.q IS NOT NULL THEN RAISE EXCEPTION 'lead % is frozen', NEW.id; END IF; RETURN NEW; END $$;
                 CREATE TRIGGER frozen BEFORE UPDATE ON leads FOR EACH ROW EXECUTE FUNCTION frozen();"
            ),
            usual!("a", "NEW.a"),
        )
    },
    Case {
        secs: 60,
        says: &["on the row of \"leads\" where id = 299990", "division by zero"],
        statuses: &[("fill_q", "failed")],
        then: "SELECT (SELECT (last_key->>'id')::int FROM pgshift.backfill_ranges WHERE step = 'fill_q') = 299989
                 AND (SELECT count(*) FROM leads WHERE q IS NOT NULL) = 299989",
        fix: Fix::Sql("UPDATE leads SET b = 1 WHERE id = 299990"),
        fixed: "SELECT count(*) = 300000 FROM leads WHERE q = a / b",
        ..case(
            "backfill_of_300k_rows_fails_near_the_end",
            "CREATE TABLE leads (id bigint PRIMARY KEY, email text NOT NULL, a bigint NOT NULL, b bigint NOT NULL, q bigint, touched int NOT NULL DEFAULT 0);
             INSERT INTO leads (id, email, a, b) SELECT g, 'u' || g || '@example.com', g, CASE WHEN g = 299990 THEN 0 ELSE 1 END FROM generate_series(1, 300000) g;
             CREATE FUNCTION count_fill() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF NEW.q IS DISTINCT FROM OLD.q THEN NEW.touched := OLD.touched + 1; END IF; RETURN NEW; END $$;
             CREATE TRIGGER count_fill BEFORE UPDATE ON leads FOR EACH ROW EXECUTE FUNCTION count_fill();
             ANALYZE leads;",
            "id: {id}
phases:
  dual_write:
    - name: sync_q
      trigger:
        table: leads
        set: { q: NEW.a / NEW.b }
  backfill:
    - name: fill_q
      backfill:
        table: leads
        set: { q: a / b }
        where: q IS NULL
        batch_size: 1000
",
        )
    },
    Case {
        secs: 10,
        says: &[
            "step `fill_q` failed: a batch ran past its statement_timeout of 150ms and the server cancelled it (3 times in a row, the last batch 125 rows)",
            "smaller batches",
            "--accept-changed",
        ],
        statuses: &[("fill_q", "failed")],
        then: "SELECT count(*) = 2 FROM pgshift.events WHERE event = 'batch_retry'",
        fix: Fix::Plan("statement_timeout: 150ms", "statement_timeout: 30s"),
        fixed: "SELECT count(*) = 2000 FROM leads WHERE q = a",
        ..case(
            "backfill_batches_past_their_statement_timeout",
            concat!(
                leads!(),
                "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.002); RETURN NEW; END $$;
                 CREATE TRIGGER slow BEFORE UPDATE OF q ON leads FOR EACH ROW EXECUTE FUNCTION slow();"
            ),
            "id: {id}
phases:
  dual_write:
    - name: sync_q
      trigger:
        table: leads
        set: { q: NEW.a }
  backfill:
    - name: fill_q
      statement_timeout: 150ms
      retries: 2
      backfill:
        table: leads
        set: { q: a }
        where: q IS NULL
        batch_size: 500
",
        )
    },
    Case {
        says: &[
            "step `fill_q` failed: function lead_score(bigint) does not exist",
            "42883",
            "The plan expected it to exist",
        ],
        statuses: &[("fill_q", "failed")],
        // Not a row's fault: nothing to narrow, no batch ran.
        then: "SELECT NOT EXISTS (SELECT FROM pgshift.events WHERE event = 'backfill_row_failed')
                 AND (SELECT count(*) FROM leads WHERE q IS NOT NULL) = 0",
        fix: Fix::Sql("CREATE FUNCTION lead_score(bigint) RETURNS bigint LANGUAGE sql IMMUTABLE AS 'SELECT $1'"),
        fixed: "SELECT count(*) = 2000 FROM leads WHERE q = a",
        ..case(
            "backfill_calls_a_function_that_does_not_exist",
            leads!(),
            usual!("lead_score(a)", "NEW.a"),
        )
    },
    // --- a dual-write trigger never fails the application's write ---
    Case {
        at_gate: Some(
            "INSERT INTO leads (id, email, a, b) VALUES (5001, 'x@example.com', 5001, 0);
             UPDATE leads SET b = 0 WHERE id = 7;",
        ),
        says: &[
            "step `deployed` failed: 2 row(s) failed the dual-write trigger",
            "cannot pass gate `deployed`",
            "public.leads where id = 7: division by zero (SQLSTATE 22012)",
            "public.leads where id = 5001",
        ],
        status_says: &["2 row(s) failed the dual-write trigger", "public.leads where id = 5001"],
        statuses: &[("deployed", "waiting"), ("comment_q", "pending")],
        then: "SELECT count(*) = 2 FROM pgshift.trigger_failures WHERE resolved_at IS NULL AND sqlstate = '22012'
                 AND (SELECT q IS NULL FROM leads WHERE id = 5001) AND (SELECT q = 7 FROM leads WHERE id = 7)",
        fix: Fix::Sql("UPDATE leads SET b = 1 WHERE id IN (7, 5001)"),
        fixed: "SELECT (SELECT q FROM leads WHERE id = 5001) = 5001
                  AND NOT EXISTS (SELECT FROM pgshift.trigger_failures WHERE resolved_at IS NULL)",
        ..case(
            "dual_write_fails_for_rows_then_the_gate_holds",
            leads!(),
            usual!("a / b", "NEW.a / NEW.b"),
        )
    },
    Case {
        at_gate: Some(
            "SET ROLE {role}; INSERT INTO leads (id, email, a, b) VALUES (5001, 'x@example.com', 5001, 0); RESET ROLE;",
        ),
        says: &["1 row(s) failed the dual-write trigger", "public.leads where id = 5001"],
        statuses: &[("deployed", "waiting")],
        // Recorded, although the application's role may not touch the control schema.
        then: "SELECT count(*) = 1 FROM pgshift.trigger_failures WHERE key = '{\"id\": 5001}'
                 AND NOT has_table_privilege('{role}', 'pgshift.trigger_failures', 'INSERT')
                 AND NOT has_table_privilege('{role}', 'pgshift.trigger_failures', 'SELECT')",
        fix: Fix::Sql("UPDATE leads SET b = 5001 WHERE id = 5001"),
        fixed: "SELECT q = 1 FROM leads WHERE id = 5001",
        ..case(
            "dual_write_fails_for_the_application_role",
            concat!(
                leads!(),
                "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} NOLOGIN; GRANT SELECT, INSERT, UPDATE ON leads TO {role};"
            ),
            usual!("a / b", "NEW.a / NEW.b"),
        )
    },
    Case {
        says: &[
            "step `has_rows` failed: 1 row(s) failed the dual-write trigger",
            "cannot enter its contract phase",
            "public.leads where id = 5001",
        ],
        statuses: &[("app_write", "succeeded"), ("has_rows", "failed")],
        fix: Fix::Sql("UPDATE leads SET b = 1 WHERE id = 5001"),
        fixed: "SELECT q = 5001 FROM leads WHERE id = 5001",
        ..case(
            "dual_write_failure_keeps_contract_closed",
            leads!(),
            concat!(
                "id: {id}\nphases:\n",
                fill_q!("a / b", "NEW.a / NEW.b"),
                "    - name: app_write
      sql: INSERT INTO leads (id, email, a, b) VALUES (5001, 'x@example.com', 5001, 0); INSERT INTO runs VALUES ('app_write')
      rollback: DELETE FROM leads WHERE id = 5001
  contract:
    - name: has_rows
      check: SELECT count(*) > 0 FROM leads
    - name: comment_q
      sql: COMMENT ON COLUMN leads.q IS 'a / b'; INSERT INTO runs VALUES ('comment_q')
      rollback: COMMENT ON COLUMN leads.q IS NULL
"
            ),
        )
    },
    Case {
        at_gate: Some("INSERT INTO leads (id, email, a, b) VALUES (5001, 'x@example.com', 5001, 0);"),
        says: &[
            "1 row(s) failed the dual-write trigger",
            "pgshift cannot check 1 of them again by itself",
            "UPDATE \"pgshift\".trigger_failures SET resolved_at = now()",
        ],
        statuses: &[("deployed", "waiting")],
        fix: Fix::Sql(
            "UPDATE leads SET q = 0 WHERE id = 5001;
             UPDATE pgshift.trigger_failures SET resolved_at = now(), resolution = 'fixed by hand' WHERE plan_id = '{id}' AND resolved_at IS NULL;",
        ),
        fixed: "SELECT q = 0 FROM leads WHERE id = 5001",
        ..case(
            "dual_write_failure_that_cannot_be_checked_again",
            leads!(),
            usual!("a / b", "CASE TG_OP WHEN 'INSERT' THEN NEW.a / NEW.b ELSE NEW.a END"),
        )
    },
    // --- someone else changed the database at the gate ---
    Case {
        at_gate: Some("ALTER TABLE leads RENAME TO leads_old"),
        says: &[
            "step `deployed` failed: table \"leads\" does not exist",
            "step `sync_q` put its dual-write trigger on it",
            "put it back as the plan expects",
        ],
        statuses: &[("deployed", "waiting")],
        then: "SELECT EXISTS (SELECT FROM pgshift.events WHERE event = 'drift_found') AND (SELECT status = 'waiting' FROM pgshift.plans)",
        fix: Fix::Sql("ALTER TABLE leads_old RENAME TO leads"),
        fixed: ALL_Q,
        ..case("table_renamed_at_the_gate", leads!(), usual!("a / b", "NEW.a / NEW.b"))
    },
    Case {
        at_gate: Some("ALTER TABLE leads DROP COLUMN score"),
        says: &[
            "column \"score\" of \"leads\" (made by step `add_score`) is gone",
            "the plan made it and its later steps count on it",
            "pgshift plan show",
        ],
        statuses: &[("deployed", "waiting"), ("comment_score", "pending")],
        fix: Fix::Sql("ALTER TABLE leads ADD COLUMN score bigint; UPDATE leads SET score = a"),
        fixed: "SELECT col_description('leads'::regclass, (SELECT attnum FROM pg_attribute WHERE attrelid = 'leads'::regclass AND attname = 'score')) = 'a'",
        ..case(
            "column_dropped_at_the_gate",
            leads!(),
            "id: {id}
phases:
  expand:
    - name: add_score
      sql: ALTER TABLE leads ADD COLUMN IF NOT EXISTS score bigint; INSERT INTO runs VALUES ('add_score')
      rollback: ALTER TABLE leads DROP COLUMN IF EXISTS score
  dual_write:
    - name: sync_score
      trigger:
        table: leads
        set: { score: NEW.a }
  backfill:
    - name: fill_score
      backfill:
        table: leads
        set: { score: a }
        where: score IS NULL
  contract:
    - name: deployed
      gate: Deploy the application that reads score
    - name: comment_score
      sql: COMMENT ON COLUMN leads.score IS 'a'; INSERT INTO runs VALUES ('comment_score')
      rollback: COMMENT ON COLUMN leads.score IS NULL
",
        )
    },
    Case {
        at_gate: Some("DROP INDEX leads_q_idx"),
        says: &[
            "index \"leads_q_idx\" on \"leads\" (made by step `index_q`) is gone",
            "Put it back with the SQL of step `index_q`",
        ],
        statuses: &[("deployed", "waiting")],
        fix: Fix::Sql("CREATE INDEX leads_q_idx ON leads (q)"),
        fixed: ALL_Q,
        ..case(
            "index_dropped_at_the_gate",
            leads!(),
            concat!(
                "id: {id}
phases:
  expand:
    - name: index_q
      sql: CREATE INDEX CONCURRENTLY IF NOT EXISTS leads_q_idx ON leads (q)
      rollback: DROP INDEX CONCURRENTLY IF EXISTS leads_q_idx
",
                fill_q!("a / b", "NEW.a / NEW.b"),
                contract!()
            ),
        )
    },
    Case {
        at_gate: Some(
            "DO $$ BEGIN EXECUTE (SELECT format('ALTER TABLE leads DISABLE TRIGGER %I', tgname) FROM pg_trigger WHERE tgname LIKE 'pgshift%'); END $$",
        ),
        says: &[
            "the dual-write trigger \"pgshift_rt_trigger_disabled_at_the_gate_sync_q",
            "(made by step `sync_q`) is disabled",
            "application writes since then did not reach the new columns",
        ],
        statuses: &[("deployed", "waiting")],
        fix: Fix::Sql(
            "DO $$ BEGIN EXECUTE (SELECT format('ALTER TABLE leads ENABLE TRIGGER %I', tgname) FROM pg_trigger WHERE tgname LIKE 'pgshift%'); END $$",
        ),
        fixed: ALL_Q,
        ..case("trigger_disabled_at_the_gate", leads!(), usual!("a / b", "NEW.a / NEW.b"))
    },
    Case {
        as_role: true,
        at_gate: Some("ALTER TABLE leads OWNER TO postgres"),
        says: &[
            "step `comment_q` failed",
            "must be owner of",
            "42501",
            "pgshift needs ownership of every table a plan changes",
        ],
        statuses: &[("deployed", "succeeded"), ("comment_q", "failed")],
        fix: Fix::Sql("ALTER TABLE leads OWNER TO {role}"),
        fixed: ALL_Q,
        ..case(
            "ownership_taken_away_at_the_gate",
            concat!(leads!(), "ALTER TABLE leads OWNER TO {role}; GRANT INSERT, DELETE ON runs TO {role};"),
            usual!("a / b", "NEW.a / NEW.b"),
        )
    },
    Case {
        at_gate: Some("ALTER TABLE leads RENAME COLUMN q TO q_old"),
        says: &[
            "step `fill_q` failed: column \"q\" of \"leads\" does not exist",
            "step `fill_q` writes it (its backfill)",
        ],
        statuses: &[("app_writes_q", "succeeded"), ("fill_q", "failed")],
        then: "SELECT count(*) = 0 FROM leads WHERE q_old IS NOT NULL",
        fix: Fix::Sql("ALTER TABLE leads RENAME COLUMN q_old TO q"),
        fixed: ALL_Q,
        ..case(
            "backfill_column_renamed_at_the_gate",
            leads!(),
            "id: {id}
phases:
  dual_write:
    - name: sync_q
      trigger:
        table: leads
        set: { q: NEW.a / NEW.b }
    - name: app_writes_q
      gate: Deploy the application that writes q
  backfill:
    - name: fill_q
      backfill:
        table: leads
        set: { q: a / b }
        where: q IS NULL
  contract:
    - name: all_filled
      check: SELECT count(*) = 0 FROM leads WHERE q IS NULL
    - name: comment_q
      sql: COMMENT ON COLUMN leads.q IS 'a / b'; INSERT INTO runs VALUES ('comment_q')
      rollback: COMMENT ON COLUMN leads.q IS NULL
",
        )
    },
];
