//! Every operation of `changes:` through the lifecycle harness, against the real
//! server, while an application works: the old version runs from the first
//! step; at the gate the new version runs beside it; the plan finishes; and
//! rollback, at the gate and after the plan is done, gives back the catalog and
//! the rows of before. Asserted all along: no application statement failed, and
//! none waited longer than the lock timeout plus one batch.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::executor::{status_json, work_dir, write_plan};
use crate::harness::*;

/// The plans' `lock_timeout`: the longest an application statement may queue behind a step.
const LOCK_TIMEOUT_MS: u64 = 300;
/// Plus one batch, plus scheduling on a shared two-core machine.
const WAIT_BOUND: Duration = Duration::from_millis(LOCK_TIMEOUT_MS + 1200);

/// What one application version did.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub statements: u64,
    pub errors: Vec<String>,
    pub worst: Duration,
}

/// An application version running its statements in a loop on a connection of
/// its own. `{id}` in a statement is a random id among the rows it may change.
pub(crate) struct App {
    stop: Arc<AtomicBool>,
    ran: Arc<std::sync::atomic::AtomicU64>,
    handle: tokio::task::JoinHandle<Stats>,
}

impl App {
    pub(crate) async fn start(url: &str, statements: &[&str], ids: (i64, i64)) -> App {
        let client = connect(url).await;
        let stop = Arc::new(AtomicBool::new(false));
        let statements: Vec<String> = statements.iter().map(|s| s.to_string()).collect();
        let flag = stop.clone();
        let ran = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = ran.clone();
        let handle = tokio::spawn(async move {
            let mut stats = Stats::default();
            let mut n: u64 = 0x2545_F491_4F6C_DD1D;
            while !flag.load(Ordering::Relaxed) {
                for s in &statements {
                    n ^= n << 13;
                    n ^= n >> 7;
                    n ^= n << 17;
                    let id = ids.0 + (n % (ids.1 - ids.0 + 1) as u64) as i64;
                    let sql = s.replace("{id}", &id.to_string());
                    let t = Instant::now();
                    let r = client.simple_query(&sql).await;
                    let took = t.elapsed();
                    stats.worst = stats.worst.max(took);
                    stats.statements += 1;
                    count.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = r {
                        if stats.errors.len() < 5 {
                            stats.errors.push(format!("{sql}: {e:?}"));
                        } else {
                            stats.errors.push(String::new());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            stats
        });
        App { stop, ran, handle }
    }

    /// Waits until this version has run `n` more statements: side by side
    /// means each did real work, however fast or slow the machine is.
    pub(crate) async fn runs(&self, n: u64) {
        let from = self.ran.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.ran.load(Ordering::Relaxed) < from + n {
            assert!(
                Instant::now() < deadline && !self.handle.is_finished(),
                "the application ran {} of {n} statements in 60 s",
                self.ran.load(Ordering::Relaxed) - from
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub(crate) async fn stop(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.unwrap()
    }
}

fn check(stats: &Stats, what: &str) {
    let shown: Vec<&String> = stats.errors.iter().filter(|e| !e.is_empty()).collect();
    assert!(
        stats.errors.is_empty(),
        "{what}: {} of {} statements failed: {shown:#?}",
        stats.errors.len(),
        stats.statements
    );
    assert!(stats.statements > 0, "{what}: the application never ran");
    assert!(
        stats.worst <= WAIT_BOUND,
        "{what}: a statement waited {:?} (bound {WAIT_BOUND:?})",
        stats.worst
    );
}

/// Runs pgshift off the async runtime, so that the applications keep going.
async fn pgshift_bg(db: &TestDb, args: &[&str]) -> std::process::Output {
    let url = db.url.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        pgshift_with_env(&a, &[("DATABASE_URL", url.as_str())])
    })
    .await
    .unwrap()
}

fn code(o: &std::process::Output, want: &[i32], what: &str) -> i32 {
    let c = o.status.code().unwrap_or(-1);
    assert!(
        want.contains(&c),
        "{what}: exit {c}, expected {want:?}\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
    c
}

/// One operation's case.
pub(crate) struct Case {
    pub name: &'static str,
    pub setup: &'static str,
    /// The `changes:` of the plan (indented as list items).
    pub changes: &'static str,
    /// Statements of the old application version (`{id}`: a row it may change).
    pub old: &'static [&'static str],
    /// Statements of the new version, which runs from the gate on.
    pub new: &'static [&'static str],
    /// The plan stops at a (generated) gate.
    pub gate: bool,
    /// Lines the catalog holds once the plan is done, and lines it no longer holds.
    pub has: &'static [&'static str],
    pub lacks: &'static [&'static str],
    /// A query returning true when the data is right once the plan is done.
    pub data_ok: &'static str,
    /// The rows the applications never change (rollback must give them back as they were).
    pub fixed_rows: &'static str,
}

/// The ids the applications change: the upper half of the table.
const MUTABLE: (i64, i64) = (1001, 2000);

pub(crate) fn plan_text(case: &Case) -> String {
    format!(
        "id: op_{}\nsettings:\n  lock_timeout: {LOCK_TIMEOUT_MS}ms\n  retries: 60\nchanges:\n{}",
        case.name, case.changes
    )
}

async fn fixed(db: &TestDb, case: &Case) -> String {
    rows_text(db, case.fixed_rows).await
}

/// Apply (with the old version working), to the gate: returns the exit code.
async fn apply(db: &TestDb, file: &str, case: &Case, what: &str) {
    let app = App::start(&db.url, case.old, MUTABLE).await;
    let o = pgshift_bg(db, &["--progress", "never", "plan", "apply", file]).await;
    let stats = app.stop().await;
    let c = code(&o, &[0, 3], what);
    assert_eq!(
        c == 3,
        case.gate,
        "{what}: stopped at a gate? {}",
        stderr(&o)
    );
    check(&stats, &format!("{what}: old version"));
}

pub(crate) async fn lifecycle(case: &Case) {
    let db = TestDb::create(&format!("op_{}", case.name)).await;
    db.exec(case.setup).await;
    let dir = work_dir(&format!("op_{}", case.name));
    let file = write_plan(&dir, &format!("op_{}", case.name), &plan_text(case));
    let file = file.to_str().unwrap();
    let id = format!("op_{}", case.name);
    let before = catalog(&db).await;
    let rows = fixed(&db, case).await;

    // Apply to the gate with the old version working; there, both versions side by side.
    apply(&db, file, case, "first apply").await;
    if case.gate {
        let old = App::start(&db.url, case.old, MUTABLE).await;
        let new = App::start(&db.url, case.new, MUTABLE).await;
        old.runs(100).await;
        new.runs(100).await;
        check(&new.stop().await, "at the gate: new version");
        check(&old.stop().await, "at the gate: old version");
    }
    // Rollback (at the gate, or after a plan without one) gives back the catalog.
    let o = pgshift_bg(&db, &["--progress", "never", "--yes", "rollback", &id]).await;
    code(&o, &[0], "rollback at the gate");
    assert_eq!(
        catalog(&db).await,
        before,
        "rollback at the gate: catalog differs"
    );
    assert_eq!(
        fixed(&db, case).await,
        rows,
        "rollback at the gate: rows differ"
    );

    // Again, to the end: the new version runs from the gate on.
    apply(&db, file, case, "second apply").await;
    if case.gate {
        let old = App::start(&db.url, case.old, MUTABLE).await;
        let new = App::start(&db.url, case.new, MUTABLE).await;
        old.runs(50).await;
        new.runs(50).await;
        check(&old.stop().await, "at the gate again: old version");
        let o = pgshift_bg(&db, &["--progress", "never", "--yes", "resume", &id]).await;
        check(&new.stop().await, "contract: new version");
        code(&o, &[0], "resume past the gate");
    }
    let done = catalog(&db).await;
    for line in case.has {
        assert!(
            done.contains(line),
            "{}: the catalog lacks `{line}`:\n{done}",
            case.name
        );
    }
    for line in case.lacks {
        assert!(
            !done.contains(line),
            "{}: the catalog still has `{line}`:\n{done}",
            case.name
        );
    }
    assert!(
        !done.contains(" INVALID"),
        "an index is left INVALID:\n{done}"
    );
    assert!(
        !done.contains("(not validated)"),
        "a constraint is left unvalidated:\n{done}"
    );
    let ok: bool = db.client.query_one(case.data_ok, &[]).await.unwrap().get(0);
    assert!(ok, "{}: the data is not right: {}", case.name, case.data_ok);
    assert_eq!(status_json(&db, &id)["status"], "succeeded");

    // Rollback after the plan is done: the catalog and the rows of before.
    let o = pgshift_bg(&db, &["--progress", "never", "--yes", "rollback", &id]).await;
    code(&o, &[0], "rollback after done");
    assert_eq!(
        catalog(&db).await,
        before,
        "rollback after done: catalog differs"
    );
    assert_eq!(
        fixed(&db, case).await,
        rows,
        "rollback after done: rows differ"
    );
}

// ---- the cases ------------------------------------------------------------

const ORDERS: &str = "CREATE TABLE orders (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, note text, qty integer NOT NULL DEFAULT 1);
INSERT INTO orders (note, qty) SELECT 'n' || g, g % 7 + 1 FROM generate_series(1, 2000) g;";
const LEADS: &str = "CREATE TABLE personas (id int PRIMARY KEY, key text NOT NULL UNIQUE);
INSERT INTO personas VALUES (1, 'unknown'), (2, 'founder'), (3, 'marketer');
CREATE TABLE leads (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, email text NOT NULL, persona_id int, source text NOT NULL DEFAULT 'web', legacy text NOT NULL);
INSERT INTO leads (email, persona_id, legacy) SELECT 'User' || g || '@Example.com', CASE WHEN g % 3 = 0 THEN NULL ELSE g % 3 + 1 END, 'l' || g FROM generate_series(1, 2000) g;";

const FIXED_ORDERS: &str = "SELECT id, note, qty FROM orders WHERE id <= 1000 ORDER BY id";
const FIXED_LEADS: &str = "SELECT id, email, persona_id FROM leads WHERE id <= 1000 ORDER BY id";

pub(crate) const CASES: &[Case] = &[
    Case {
        name: "add_column_default",
        setup: ORDERS,
        changes: "  - add_column: { table: orders, column: status, type: text, default: \"'new'\", not_null: true, index: true }\n",
        old: &["INSERT INTO orders (note) VALUES ('o')", "UPDATE orders SET note = 'u' WHERE id = {id}", "SELECT id, note FROM orders WHERE id = {id}"],
        new: &["INSERT INTO orders (note, status) VALUES ('n', 'paid')", "SELECT status FROM orders WHERE id = {id}"],
        gate: false,
        has: &["public.orders.status text not null default 'new'::text", "orders_status_idx"],
        lacks: &[],
        data_ok: "SELECT count(*) = 0 FROM orders WHERE status IS NULL",
        fixed_rows: FIXED_ORDERS,
    },
    Case {
        name: "add_column_up",
        setup: LEADS,
        changes: "  - add_column: { table: leads, column: email_hash, type: text, up: \"encode(sha256(lower(email)::bytea), 'hex')\", not_null: true, index: true }\n",
        old: &["INSERT INTO leads (email, legacy) VALUES ('a@B.com', 'x')", "UPDATE leads SET email = 'c' || id || '@d.com' WHERE id = {id}", "SELECT email FROM leads WHERE id = {id}"],
        new: &["INSERT INTO leads (email, legacy, email_hash) VALUES ('n@x.com', 'x', encode(sha256('n@x.com'::bytea), 'hex'))", "UPDATE leads SET email = 'e' || id || '@f.com', email_hash = encode(sha256(('e' || id || '@f.com')::bytea), 'hex') WHERE id = {id}"],
        gate: true,
        has: &["public.leads.email_hash text not null", "leads_email_hash_idx"],
        lacks: &["trigger pgshift_"],
        data_ok: "SELECT count(*) = 0 FROM leads WHERE email_hash IS DISTINCT FROM encode(sha256(lower(email)::bytea), 'hex')",
        fixed_rows: FIXED_LEADS,
    },
    Case {
        name: "drop_column",
        setup: LEADS,
        changes: "  - drop_column: { table: leads, column: legacy, down: \"'none'\" }\n",
        old: &["INSERT INTO leads (email, legacy) VALUES ('o@x.com', 'old')", "UPDATE leads SET legacy = 'u' WHERE id = {id}", "SELECT legacy FROM leads WHERE id = {id}"],
        new: &["INSERT INTO leads (email) VALUES ('n@x.com')", "SELECT email FROM leads WHERE id = {id}"],
        gate: true,
        has: &["public.leads.pgshift_retired_legacy text not null"],
        lacks: &["public.leads.legacy "],
        data_ok: "SELECT count(*) = 0 FROM leads WHERE pgshift_retired_legacy IS NULL",
        fixed_rows: FIXED_LEADS,
    },
    Case {
        name: "rename_column",
        setup: "CREATE TABLE customers (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, fullname text NOT NULL CHECK (length(fullname) > 0));
CREATE INDEX customers_fullname_idx ON customers (fullname);
INSERT INTO customers (fullname) SELECT 'Name ' || g FROM generate_series(1, 2000) g;",
        changes: "  - rename_column: { table: customers, column: fullname, to: display_name }\n",
        old: &["INSERT INTO customers (fullname) VALUES ('old')", "UPDATE customers SET fullname = 'o' || id WHERE id = {id}", "SELECT fullname FROM customers WHERE id = {id}"],
        new: &["INSERT INTO customers (display_name) VALUES ('new')", "UPDATE customers SET display_name = 'n' || id WHERE id = {id}", "SELECT display_name FROM customers WHERE id = {id}"],
        gate: true,
        has: &["public.customers.display_name text not null", "customers_display_name_idx", "public.customers.pgshift_retired_fullname text not null"],
        lacks: &["public.customers.fullname "],
        data_ok: "SELECT count(*) = 0 FROM customers WHERE display_name IS DISTINCT FROM pgshift_retired_fullname",
        fixed_rows: "SELECT id FROM customers WHERE id <= 1000 ORDER BY id",
    },
    Case {
        name: "change_type_pk",
        setup: "CREATE TABLE orders (id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, qty integer NOT NULL DEFAULT 1 CHECK (qty > 0));
CREATE TABLE lines (id serial PRIMARY KEY, order_id integer NOT NULL REFERENCES orders (id) ON DELETE CASCADE, sku text);
CREATE INDEX lines_order_id_idx ON lines (order_id);
INSERT INTO orders (qty) SELECT g % 9 + 1 FROM generate_series(1, 2000) g;
INSERT INTO lines (order_id, sku) SELECT g % 2000 + 1, 's' || g FROM generate_series(1, 4000) g;",
        changes: "  - change_type: { table: orders, column: id, type: bigint }\n",
        old: &["WITH o AS (INSERT INTO orders (qty) VALUES (2) RETURNING id) INSERT INTO lines (order_id, sku) SELECT id, 'x' FROM o", "UPDATE orders SET qty = qty + 1 WHERE id = {id}", "SELECT l.sku FROM orders o JOIN lines l ON l.order_id = o.id WHERE o.id = {id}"],
        new: &[],
        gate: false,
        has: &["public.orders.id bigint not null identity by default", "public.lines.order_id bigint not null", "orders_pkey PRIMARY KEY (id)", "lines_order_id_fkey FOREIGN KEY (order_id) REFERENCES orders(id) ON DELETE CASCADE", "lines_order_id_idx"],
        lacks: &["public.orders.id integer"],
        data_ok: "SELECT count(*) = 0 FROM orders WHERE id IS DISTINCT FROM pgshift_retired_id",
        fixed_rows: "SELECT id, qty FROM orders WHERE id <= 1000 ORDER BY id",
    },
    Case {
        name: "set_not_null",
        setup: LEADS,
        changes: "  - set_not_null: { table: leads, column: persona_id, fill: \"(SELECT id FROM personas WHERE key = 'unknown')\" }\n",
        old: &["INSERT INTO leads (email, legacy) VALUES ('o@x.com', 'l')", "SELECT persona_id FROM leads WHERE id = {id}"],
        new: &["INSERT INTO leads (email, legacy, persona_id) VALUES ('n@x.com', 'l', 2)"],
        gate: true,
        has: &["public.leads.persona_id integer not null"],
        lacks: &["trigger pgshift_"],
        data_ok: "SELECT count(*) = 0 FROM leads WHERE persona_id IS NULL",
        fixed_rows: "SELECT id, email FROM leads WHERE id <= 1000 ORDER BY id",
    },
    Case {
        name: "drop_not_null",
        setup: LEADS,
        changes: "  - drop_not_null: { table: leads, column: legacy }\n",
        old: &["INSERT INTO leads (email, legacy) VALUES ('o@x.com', 'l')", "SELECT legacy FROM leads WHERE id = {id}"],
        new: &[],
        gate: false,
        has: &["public.leads.legacy text\n"],
        lacks: &["public.leads.legacy text not null"],
        data_ok: "SELECT true",
        fixed_rows: FIXED_LEADS,
    },
    Case {
        name: "set_default",
        setup: LEADS,
        changes: "  - set_default: { table: leads, column: source, default: \"'app'\" }\n",
        old: &["INSERT INTO leads (email, legacy) VALUES ('o@x.com', 'l')"],
        new: &[],
        gate: false,
        has: &["public.leads.source text not null default 'app'::text"],
        lacks: &[],
        data_ok: "SELECT true",
        fixed_rows: "SELECT id, email, source FROM leads WHERE id <= 1000 ORDER BY id",
    },
    Case {
        name: "drop_default",
        setup: LEADS,
        changes: "  - drop_default: { table: leads, column: source }\n",
        old: &["INSERT INTO leads (email, legacy) VALUES ('o@x.com', 'l')"],
        new: &["INSERT INTO leads (email, legacy, source) VALUES ('n@x.com', 'l', 'app')"],
        gate: true,
        has: &["public.leads.source text not null\n"],
        lacks: &["default 'web'"],
        data_ok: "SELECT true",
        fixed_rows: "SELECT id, email, source FROM leads WHERE id <= 1000 ORDER BY id",
    },
    Case {
        name: "add_check",
        setup: "CREATE TABLE entitlements (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, starts_at timestamptz NOT NULL, ends_at timestamptz);
INSERT INTO entitlements (starts_at, ends_at) SELECT now(), CASE WHEN g % 2 = 0 THEN now() + interval '1 day' END FROM generate_series(1, 2000) g;",
        changes: "  - add_check: { table: entitlements, name: ends_after_start, check: \"ends_at IS NULL OR ends_at > starts_at\" }\n",
        old: &["INSERT INTO entitlements (starts_at) VALUES (now())", "UPDATE entitlements SET ends_at = starts_at + interval '2 days' WHERE id = {id}"],
        new: &[],
        gate: false,
        has: &["ends_after_start CHECK (((ends_at IS NULL) OR (ends_at > starts_at)))"],
        lacks: &[],
        data_ok: "SELECT true",
        fixed_rows: "SELECT id, starts_at FROM entitlements WHERE id <= 1000 ORDER BY id",
    },
    Case {
        name: "add_unique",
        setup: "CREATE TABLE users (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, email text NOT NULL);
INSERT INTO users (email) SELECT 'u' || g || '@x.com' FROM generate_series(1, 2000) g;",
        changes: "  - add_unique: { table: users, columns: [email], name: users_email_key }\n",
        old: &["INSERT INTO users (email) VALUES ('new-' || gen_random_uuid() || '@x.com')", "SELECT email FROM users WHERE id = {id}"],
        new: &[],
        gate: false,
        has: &["users_email_key UNIQUE (email)"],
        lacks: &[],
        data_ok: "SELECT true",
        fixed_rows: "SELECT id, email FROM users WHERE id <= 1000 ORDER BY id",
    },
    Case {
        name: "add_foreign_key",
        setup: LEADS,
        changes: "  - add_foreign_key: { table: leads, columns: [persona_id], references: { table: personas, columns: [id] }, on_delete: set_null }\n",
        old: &["INSERT INTO leads (email, legacy, persona_id) VALUES ('o@x.com', 'l', 3)", "SELECT persona_id FROM leads WHERE id = {id}"],
        new: &[],
        gate: false,
        has: &["leads_persona_id_fkey FOREIGN KEY (persona_id) REFERENCES personas(id) ON DELETE SET NULL", "leads_persona_id_idx"],
        lacks: &[],
        data_ok: "SELECT true",
        fixed_rows: FIXED_LEADS,
    },
    Case {
        name: "drop_constraint",
        setup: "CREATE TABLE items (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, sku text NOT NULL CONSTRAINT items_sku_check CHECK (sku <> ''), code text CONSTRAINT items_code_key UNIQUE);
INSERT INTO items (sku, code) SELECT 's' || g, 'c' || g FROM generate_series(1, 2000) g;",
        changes: "  - drop_constraint: { table: items, name: items_sku_check }\n  - drop_constraint: { table: items, name: items_code_key }\n",
        old: &["INSERT INTO items (sku) VALUES ('x')", "UPDATE items SET sku = 'y' WHERE id = {id}"],
        new: &[],
        gate: false,
        has: &[],
        lacks: &["items_sku_check", "items_code_key"],
        data_ok: "SELECT true",
        fixed_rows: "SELECT id, code FROM items WHERE id <= 1000 ORDER BY id",
    },
    Case {
        name: "create_index",
        setup: LEADS,
        changes: "  - create_index: { table: leads, columns: [email], where: \"persona_id IS NOT NULL\", include: [source] }\n",
        old: &["INSERT INTO leads (email, legacy) VALUES ('o@x.com', 'l')", "SELECT email FROM leads WHERE id = {id}"],
        new: &[],
        gate: false,
        has: &["CREATE INDEX leads_email_idx ON public.leads USING btree (email) INCLUDE (source) WHERE (persona_id IS NOT NULL)"],
        lacks: &[],
        data_ok: "SELECT true",
        fixed_rows: FIXED_LEADS,
    },
    Case {
        name: "drop_index",
        setup: "CREATE TABLE events (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, kind text NOT NULL);
CREATE INDEX events_kind_idx ON events (kind) WHERE kind <> 'noise';
INSERT INTO events (kind) SELECT 'k' || g % 10 FROM generate_series(1, 2000) g;",
        changes: "  - drop_index: { name: events_kind_idx }\n",
        old: &["INSERT INTO events (kind) VALUES ('k1')", "SELECT kind FROM events WHERE id = {id}"],
        new: &[],
        gate: false,
        has: &[],
        lacks: &["events_kind_idx"],
        data_ok: "SELECT true",
        fixed_rows: "SELECT id, kind FROM events WHERE id <= 1000 ORDER BY id",
    },
    Case {
        name: "create_table",
        setup: ORDERS,
        changes: "  - create_table: { sql: \"CREATE TABLE tags (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, name text NOT NULL)\" }\n",
        old: &["SELECT id FROM orders WHERE id = {id}"],
        new: &[],
        gate: false,
        has: &["public.tags.name text not null"],
        lacks: &[],
        data_ok: "SELECT true",
        fixed_rows: FIXED_ORDERS,
    },
    Case {
        name: "drop_table",
        setup: "CREATE TABLE old_things (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, v text);
INSERT INTO old_things (v) SELECT 'v' || g FROM generate_series(1, 2000) g;
CREATE TABLE keep (id int PRIMARY KEY); INSERT INTO keep SELECT generate_series(1, 2000);",
        changes: "  - drop_table: { table: old_things }\n",
        old: &["INSERT INTO old_things (v) VALUES ('x')", "SELECT v FROM old_things WHERE id = {id}"],
        new: &["SELECT id FROM keep WHERE id = {id}"],
        gate: true,
        has: &["public.pgshift_retired_old_things.v text"],
        lacks: &["public.old_things."],
        data_ok: "SELECT count(*) >= 2000 FROM pgshift_retired_old_things",
        fixed_rows: "SELECT id, v FROM old_things WHERE id <= 1000 ORDER BY id",
    },
    Case {
        name: "rename_table",
        setup: "CREATE TABLE persons (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, name text NOT NULL);
INSERT INTO persons (name) SELECT 'p' || g FROM generate_series(1, 2000) g;",
        changes: "  - rename_table: { table: persons, to: people }\n",
        old: &["INSERT INTO persons (name) VALUES ('old')", "UPDATE persons SET name = 'o' WHERE id = {id}", "SELECT name FROM persons WHERE id = {id}"],
        new: &["INSERT INTO people (name) VALUES ('new')", "UPDATE people SET name = 'n' WHERE id = {id}", "SELECT name FROM people WHERE id = {id}"],
        gate: true,
        has: &["public.people.name text not null"],
        lacks: &["public.persons.", "view public.persons"],
        data_ok: "SELECT count(*) >= 2000 FROM people",
        fixed_rows: "SELECT id FROM persons WHERE id <= 1000 ORDER BY id",
    },
    Case {
        name: "sql",
        setup: ORDERS,
        changes: "  - sql: { up: \"CREATE TYPE mood AS ENUM ('ok', 'sad')\", down: \"DROP TYPE mood\" }\n",
        old: &["SELECT id FROM orders WHERE id = {id}"],
        new: &[],
        gate: false,
        has: &[],
        lacks: &[],
        data_ok: "SELECT count(*) = 1 FROM pg_type WHERE typname = 'mood'",
        fixed_rows: FIXED_ORDERS,
    },
];

fn case(name: &str) -> &'static Case {
    CASES
        .iter()
        .find(|c| c.name == name)
        .expect("a case of that name")
}

macro_rules! lifecycle_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 3)]
            async fn $name() {
                lifecycle(case(stringify!($name))).await;
            }
        )*
    };
}

mod lifecycle_of {
    use super::*;
    lifecycle_tests!(
        add_column_default,
        add_column_up,
        drop_column,
        rename_column,
        change_type_pk,
        set_not_null,
        drop_not_null,
        set_default,
        drop_default,
        add_check,
        add_unique,
        add_foreign_key,
        drop_constraint,
        create_index,
        drop_index,
        create_table,
        drop_table,
        rename_table,
        sql,
    );
}

/// The seed of the kill instants: `PGSHIFT_TEST_SEED`, else the clock (printed, to replay).
fn seed() -> u64 {
    std::env::var("PGSHIFT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// The plan run to the end without interruption, and run again with `kill -9` at
/// random instants (then resumed): both databases end with the same catalog and data.
pub(crate) async fn killed(case: &Case) {
    let kills = if std::env::var("PGSHIFT_LONG").is_ok() {
        10
    } else {
        3
    };
    let seed = seed();
    eprintln!("{}: kill -9 campaign, PGSHIFT_TEST_SEED={seed}", case.name);
    let reference = TestDb::create(&format!("opk_{}_ref", case.name)).await;
    let db = TestDb::create(&format!("opk_{}", case.name)).await;
    let dir = work_dir(&format!("opk_{}", case.name));
    let file = write_plan(&dir, &format!("op_{}", case.name), &plan_text(case));
    let file = file.to_str().unwrap().to_string();
    let id = format!("op_{}", case.name);
    for d in [&reference, &db] {
        d.exec(case.setup).await;
    }
    // Exit 4 right after a kill: the killed runner's backend still holds the
    // plan while it finishes the statement it was running (it notices its
    // client is gone only when it next talks to it). An operator waits and
    // runs resume again; so does this, for up to 15 s.
    let finish = |d: &TestDb| {
        let mut last = None;
        let mut retries = 0;
        let held_until = Instant::now() + Duration::from_secs(15);
        while retries < 10 {
            let o = pgshift_with_env(
                &["--progress", "never", "--yes", "resume", &file],
                &[("DATABASE_URL", d.url.as_str())],
            );
            match o.status.code() {
                Some(0) => return,
                Some(3) => {
                    retries += 1;
                    last = Some(o);
                }
                Some(4) if Instant::now() < held_until => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                _ => panic!("{}: resume failed: {}", case.name, stderr(&o)),
            }
        }
        panic!(
            "{}: did not finish: {}",
            case.name,
            last.map(|o| stderr(&o)).unwrap_or_default()
        );
    };
    finish(&reference);
    let mut rng = seed | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for k in 0..kills {
        let args = ["--progress", "never", "--yes", "resume", &file];
        let mut child = std::process::Command::new(bin())
            .args(args)
            .env("DATABASE_URL", &db.url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let after = Duration::from_millis(20 + next() % 500);
        std::thread::sleep(after);
        if child.try_wait().unwrap().is_some() {
            eprintln!("{}: run {k} ended before its kill at {after:?}", case.name);
            continue;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    finish(&db);
    assert_eq!(
        catalog(&db).await,
        catalog(&reference).await,
        "{}: killed and resumed, the catalog differs from an uninterrupted run (seed {seed})",
        case.name
    );
    let ok: bool = db.client.query_one(case.data_ok, &[]).await.unwrap().get(0);
    assert!(
        ok,
        "{}: data not right after the kills (seed {seed})",
        case.name
    );
    assert_eq!(status_json(&db, &id)["status"], "succeeded");
}

macro_rules! kill_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                killed(case(stringify!($name))).await;
            }
        )*
    };
}

mod killed_during {
    use super::*;
    kill_tests!(
        add_column_default,
        add_column_up,
        drop_column,
        rename_column,
        change_type_pk,
        set_not_null,
        drop_not_null,
        set_default,
        drop_default,
        add_check,
        add_unique,
        add_foreign_key,
        drop_constraint,
        create_index,
        drop_index,
        create_table,
        drop_table,
        rename_table,
        sql,
    );
}

// ---- the plan around the operations -----------------------------------------

const MIXED: &str = "id: mixed_ops
settings:
  lock_timeout: 300ms
changes:
  - add_column: { table: leads, column: email_hash, type: text, up: \"encode(sha256(lower(email)::bytea), 'hex')\", not_null: true, index: true }
  - rename_column: { table: customers, column: fullname, to: display_name }
  - change_type: { table: orders, column: id, type: bigint }
  - drop_column: { table: leads, column: legacy, down: \"'none'\" }
  - create_index: { table: leads, columns: [persona_id] }
phases:
  contract:
    - name: note
      sql: COMMENT ON TABLE leads IS 'migrated'
      rollback: COMMENT ON TABLE leads IS NULL
";

const MIXED_SETUP: &str = "CREATE TABLE customers (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, fullname text NOT NULL);
INSERT INTO customers (fullname) SELECT 'c' || g FROM generate_series(1, 500) g;
CREATE TABLE orders (id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, qty int NOT NULL);
CREATE TABLE lines (id int GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, order_id int NOT NULL REFERENCES orders (id));
INSERT INTO orders (qty) SELECT g FROM generate_series(1, 500) g;
INSERT INTO lines (order_id) SELECT g FROM generate_series(1, 500) g;";

/// The gate says what the new version must do, built from the operations that
/// need a deploy (and nothing for `change_type` or `create_index`, which need none);
/// `plan show` names the operation each step came from.
#[tokio::test]
async fn the_generated_gate_says_what_the_new_version_must_do() {
    let db = TestDb::create("op_gate_message").await;
    db.exec(LEADS).await;
    db.exec(MIXED_SETUP).await;
    let dir = work_dir("op_gate_message");
    let file = write_plan(&dir, "mixed_ops", MIXED);
    let f = file.to_str().unwrap();
    let o = db.pgshift(&["plan", "show", f]);
    code(&o, &[0], "plan show");
    let shown = stdout(&o);
    assert!(
        shown.contains("(changes[3] change_type \"orders\".\"id\" to bigint: ")
            && shown.contains("deploy_new_version [gate]"),
        "{shown}"
    );
    let o = db.pgshift(&["--progress", "never", "plan", "apply", f]);
    code(&o, &[3], "apply to the gate");
    let e = stderr(&o);
    let gate = e
        .lines()
        .skip_while(|l| !l.contains("stopped at gate `deploy_new_version`"))
        .nth(1)
        .unwrap_or_else(|| panic!("no gate message:\n{e}"));
    assert!(
        gate.contains("writes `email_hash` of \"leads\" itself")
            && gate.contains("reads and writes `display_name`, not `fullname`, in \"customers\"")
            && gate.contains("no longer reads or writes `legacy` of \"leads\"")
            && !gate.contains("orders")
            && !gate.contains("persona_id"),
        "{gate}"
    );
}

/// `plan expand` prints a plan of plain steps that does the same: applied to an
/// identical database, it ends with the same catalog and data.
#[tokio::test]
async fn plan_expand_prints_a_plan_that_does_the_same() {
    let a = TestDb::create("op_expand_a").await;
    let b = TestDb::create("op_expand_b").await;
    for d in [&a, &b] {
        d.exec(LEADS).await;
        d.exec(MIXED_SETUP).await;
    }
    let dir = work_dir("op_expand");
    let file = write_plan(&dir, "mixed_ops", MIXED);
    let f = file.to_str().unwrap();
    // Expanded against B's catalog (read-only), before anything runs there.
    let o = b.pgshift(&["plan", "expand", f]);
    code(&o, &[0], "plan expand");
    let expanded = stdout(&o);
    assert!(!expanded.contains("changes:"), "{expanded}");
    let plain = write_plan(&dir, "mixed_ops_expanded", &expanded);
    let p = plain.to_str().unwrap();
    let v = pgshift(&["plan", "validate", p]);
    code(&v, &[0], "the expanded plan validates");
    for (d, file) in [(&a, f), (&b, p)] {
        let o = d.pgshift(&["--progress", "never", "plan", "apply", file]);
        code(&o, &[3], "apply to the gate");
        let o = d.pgshift(&["--progress", "never", "--yes", "resume", "mixed_ops"]);
        code(&o, &[0], "resume to the end");
    }
    assert_eq!(
        catalog(&a).await,
        catalog(&b).await,
        "the two plans left different catalogs"
    );
    for q in [
        "SELECT id, email, email_hash, persona_id FROM leads ORDER BY id",
        "SELECT id, display_name FROM customers ORDER BY id",
        "SELECT id, qty FROM orders ORDER BY id",
    ] {
        assert_eq!(rows_text(&a, q).await, rows_text(&b, q).await, "{q}");
    }
}

/// Bad operation input: a mistake in the file gets its line and column; one the
/// catalog reveals gets a pre-flight finding; either way nothing changes.
#[tokio::test]
async fn bad_operations_are_refused_before_anything_changes() {
    let dir = work_dir("op_bad");
    let static_cases = [
        (
            "  - add_column: { table: leads, column: c, typ: text }\n",
            "5:44",
            "unknown key `typ` in `add_column`",
            "did you mean `type`?",
        ),
        (
            "  - add_colum: { table: leads, column: c, type: text }\n",
            "5:5",
            "unknown operation `add_colum`",
            "did you mean `add_column`?",
        ),
        (
            "  - change_type: { table: leads, column: id, type: \"big int;\" }\n",
            "5:52",
            "is not a type name",
            "bigint",
        ),
        (
            "  - add_foreign_key: { table: leads, columns: [persona_id], references: { table: personas }, on_delete: explode }\n",
            "5:105",
            "`explode` is not a referential action",
            "set_null",
        ),
    ];
    for (i, (change, at, says, help)) in static_cases.iter().enumerate() {
        let f = write_plan(
            &dir,
            &format!("bad_{i}"),
            &format!("id: bad_{i}\nsettings:\n  lock_timeout: 300ms\nchanges:\n{change}"),
        );
        let o = pgshift(&["plan", "validate", f.to_str().unwrap()]);
        code(&o, &[2], "validate");
        let e = stderr(&o);
        assert!(
            e.contains(&format!("bad_{i}.yaml:{at}:")) && e.contains(says) && e.contains(help),
            "{change}\n{e}"
        );
    }
    let db = TestDb::create("op_bad_preflight").await;
    db.exec(LEADS).await;
    db.exec("ALTER TABLE leads ADD COLUMN note text; UPDATE leads SET note = CASE WHEN id % 500 = 0 THEN 'x' || id ELSE id::text END; CREATE TABLE empty (id int PRIMARY KEY);").await;
    let before = catalog(&db).await;
    let runtime_cases = [
        (
            "  - set_not_null: { table: leads, column: persona_idd }\n",
            "column \"persona_idd\" does not exist in \"public\".\"leads\"",
        ),
        (
            "  - add_column: { table: leads, column: score, type: bigint, not_null: true }\n",
            "`not_null` without `default` or `up`, and \"public\".\"leads\" has rows",
        ),
        (
            "  - change_type: { table: leads, column: persona_id, type: uuid }\n",
            "`up` (\"persona_id\"::uuid) does not work from integer",
        ),
        (
            "  - change_type: { table: leads, column: note, type: bigint }\n",
            "converting the existing rows with `up`",
        ),
        (
            "  - set_not_null: { table: leads, column: persona_id }\n",
            "row(s) hold NULL; give `fill:`",
        ),
        (
            "  - add_column: { table: nope, column: c, type: text }\n",
            "table \"nope\" does not exist",
        ),
    ];
    for (i, (change, says)) in runtime_cases.iter().enumerate() {
        let id = format!("pre_{i}");
        let f = write_plan(
            &dir,
            &id,
            &format!("id: {id}\nsettings:\n  lock_timeout: 300ms\nchanges:\n{change}"),
        );
        let o = db.pgshift(&["--progress", "never", "plan", "apply", f.to_str().unwrap()]);
        code(&o, &[1], "apply with a pre-flight finding");
        let e = stderr(&o);
        assert!(
            e.contains("pre-flight") && e.contains(says) && e.contains("nothing was changed"),
            "{change}\n{e}"
        );
        assert_eq!(
            catalog(&db).await,
            before,
            "{change}: the pre-flight changed the catalog"
        );
        let s = db.pgshift(&["status", &id]);
        assert!(
            stdout(&s).contains("pre-flight found") && stdout(&s).contains(says),
            "{}",
            stdout(&s)
        );
    }
}

/// After the plan is done, what the contract set aside is shown as retained;
/// with `retain` past, finalize is due; finalize drops it, and a rollback after
/// it is refused with nothing changed.
#[tokio::test]
async fn retained_until_finalize() {
    let db = TestDb::create("op_finalize").await;
    db.exec(LEADS).await;
    let dir = work_dir("op_finalize");
    let file = write_plan(
        &dir,
        "fin",
        "id: fin\nsettings:\n  lock_timeout: 300ms\n  retain: 1s\nchanges:\n  - drop_column: { table: leads, column: legacy, down: \"'none'\" }\n",
    );
    let f = file.to_str().unwrap();
    code(
        &db.pgshift(&["--progress", "never", "plan", "apply", f]),
        &[3],
        "apply",
    );
    code(
        &db.pgshift(&["--progress", "never", "--yes", "resume", "fin"]),
        &[0],
        "resume",
    );
    let s = stdout(&db.pgshift(&["status", "fin"]));
    assert!(
        s.contains("kept until `pgshift finalize fin`")
            && s.contains("c1_drop_column_leads_legacy_set_aside"),
        "{s}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let j: serde_json::Value =
        serde_json::from_str(&stdout(&db.pgshift(&["status", "fin", "--format", "json"]))).unwrap();
    assert_eq!(j["plans"][0]["retained"][0]["finalize_due"], true, "{j:#}");
    let o = db.pgshift(&["finalize", "fin"]);
    code(&o, &[0], "finalize");
    assert!(!catalog(&db).await.contains("pgshift_retired_legacy"));
    assert!(!catalog(&db).await.contains("trigger pgshift_"));
    let before = catalog(&db).await;
    let o = db.pgshift(&["--yes", "rollback", "fin"]);
    code(&o, &[2], "rollback after finalize");
    assert!(stderr(&o).contains("was finalized"), "{}", stderr(&o));
    assert_eq!(catalog(&db).await, before);
}

/// `integer → bigint` on a primary key referenced by a foreign key, on a big
/// table, while four application clients work: every row right, no statement
/// failed, none waited past the bound; the figures are printed
/// (`cargo test --test it ops::change_type_of -- --nocapture`; 1,000,000 rows
/// with `PGSHIFT_LONG=1`, 100,000 otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn change_type_of_a_referenced_primary_key_under_load() {
    let rows: i64 = if std::env::var("PGSHIFT_LONG").is_ok() {
        1_000_000
    } else {
        100_000
    };
    let db = TestDb::create("op_change_type_big").await;
    db.exec(&format!(
        "CREATE TABLE orders (id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, qty integer NOT NULL, note text);
         CREATE TABLE order_lines (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, order_id integer NOT NULL REFERENCES orders (id), sku text NOT NULL);
         CREATE INDEX order_lines_order_id_idx ON order_lines (order_id);
         INSERT INTO orders (qty, note) SELECT g % 10 + 1, 'order ' || g FROM generate_series(1, {rows}) g;
         INSERT INTO order_lines (order_id, sku) SELECT g, 'sku-' || g FROM generate_series(1, {rows}) g;
         ANALYZE orders; ANALYZE order_lines;"
    ))
    .await;
    let dir = work_dir("op_change_type_big");
    let file = write_plan(
        &dir,
        "widen_orders_id",
        "id: widen_orders_id\nsettings:\n  lock_timeout: 300ms\n  retries: 60\n  statement_timeout: 30m\nchanges:\n  - change_type: { table: orders, column: id, type: bigint }\n",
    );
    let statements: &[&str] = &[
        "WITH o AS (INSERT INTO orders (qty, note) VALUES (1, 'new') RETURNING id) INSERT INTO order_lines (order_id, sku) SELECT id, 'n' FROM o",
        "UPDATE orders SET qty = qty + 1 WHERE id = {id}",
        "SELECT o.qty, l.sku FROM orders o JOIN order_lines l ON l.order_id = o.id WHERE o.id = {id}",
    ];
    let mut apps = Vec::new();
    for _ in 0..4 {
        apps.push(App::start(&db.url, statements, (1, rows)).await);
    }
    let t0 = Instant::now();
    let o = pgshift_bg(
        &db,
        &[
            "--progress",
            "never",
            "plan",
            "apply",
            file.to_str().unwrap(),
        ],
    )
    .await;
    let wall = t0.elapsed();
    let mut total = Stats::default();
    for app in apps {
        let s = app.stop().await;
        total.statements += s.statements;
        total.worst = total.worst.max(s.worst);
        total.errors.extend(s.errors);
    }
    code(&o, &[0], "apply");
    check(&total, "the application during the type change");
    let swap: f64 = db
        .scalar_string("SELECT extract(epoch FROM finished_at - started_at)::text FROM pgshift.steps WHERE name LIKE '%_swap'")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let attempts = db
        .scalar_i64("SELECT attempts::bigint FROM pgshift.steps WHERE name LIKE '%_swap'")
        .await;
    eprintln!(
        "change_type integer → bigint, {rows} orders + {rows} lines: {:.1}s wall; swap step {:.0} ms ({attempts} attempt(s)); {} application statements, worst wait {} ms",
        wall.as_secs_f64(),
        swap * 1000.0,
        total.statements,
        total.worst.as_millis()
    );
    assert_eq!(
        db.scalar_string("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'orders'::regclass AND attname = 'id'").await.as_deref(),
        Some("bigint")
    );
    assert_eq!(
        db.scalar_string("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = 'order_lines'::regclass AND attname = 'order_id'").await.as_deref(),
        Some("bigint")
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM orders WHERE id IS DISTINCT FROM pgshift_retired_id")
            .await,
        0
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM order_lines WHERE order_id IS DISTINCT FROM pgshift_retired_order_id").await, 0);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM pg_constraint WHERE conname = 'order_lines_order_id_fkey' AND convalidated").await, 1);
    // The identity goes on from where it was: a new order gets the next id.
    let max: i64 = db.scalar_i64("SELECT max(id) FROM orders").await;
    let next: i64 = db
        .scalar_i64("INSERT INTO orders (qty) VALUES (1) RETURNING id")
        .await;
    assert!(next > max, "the identity restarted: {next} after {max}");
}
