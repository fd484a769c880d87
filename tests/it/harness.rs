//! Test harness: a fresh database per test on the real server, and the built binary.
//!
//! `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`) names the
//! server. Each test creates its own database, named after the test, dropping any
//! leftover from an earlier run first, so tests run in parallel and a failed test
//! leaves its database behind to inspect. If no server answers, the test fails with
//! a message that says how to start one.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

use tokio_postgres::{Client, NoTls};

/// The server URL tests use.
pub fn server_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// The prefix of every database (and role) a test creates: `pgshift_t_`, or
/// `PGSHIFT_TEST_PREFIX` so that two checkouts can run their suites on one server
/// at once without dropping each other's databases.
pub fn prefix() -> String {
    std::env::var("PGSHIFT_TEST_PREFIX").unwrap_or_else(|_| "pgshift_t_".to_string())
}

/// `url` with its database replaced by `db`.
pub fn url_for(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = match tokio_postgres::connect(url, NoTls).await {
        Ok(c) => c,
        Err(e) => panic!(
            "cannot connect to PostgreSQL at {url}: {e}\n\
             start the local server with `pg_ctlcluster --skip-systemctl-redirect 15 main start` \
             (or point DATABASE_URL at one)"
        ),
    };
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A database of its own for one test.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

impl TestDb {
    /// Creates (after dropping any leftover) the database `pgshift_t_<name>`.
    pub async fn create(name: &str) -> TestDb {
        let db = format!("{}{name}", prefix());
        assert!(db.len() <= 63, "test database name too long: {db}");
        let admin = connect(&server_url()).await;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"))
            .await
            .expect("drop leftover test database");
        admin
            .batch_execute(&format!("CREATE DATABASE \"{db}\""))
            .await
            .expect("create test database");
        let url = url_for(&server_url(), &db);
        let client = connect(&url).await;
        TestDb {
            name: db,
            url,
            client,
        }
    }

    pub async fn exec(&self, sql: &str) {
        self.client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        self.client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    pub async fn scalar_string(&self, sql: &str) -> Option<String> {
        self.client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Runs the built `pgshift` binary against this database.
    pub fn pgshift(&self, args: &[&str]) -> Output {
        pgshift_with_env(args, &[("DATABASE_URL", self.url.as_str())])
    }
}

/// The built binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pgshift"))
}

/// Runs `pgshift` with `args` (no database unless the env gives one).
pub fn pgshift(args: &[&str]) -> Output {
    pgshift_with_env(args, &[])
}

pub fn pgshift_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = std::process::Command::new(bin());
    cmd.args(args)
        .env_remove("DATABASE_URL")
        .env("NO_COLOR", "1");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run pgshift")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A file under `tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// A file of the project (`plans/…`, `README.md`).
pub fn project_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Writes a plan file for a test into a directory of its own and returns its path.
pub fn plan_file(test: &str, name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("pgshift-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The user-visible catalog of the database, outside pgshift's control schema and
/// the system schemas, as sorted text: columns (type, nullability, default,
/// identity), indexes (and whether valid), constraints (and whether validated),
/// triggers, functions, sequences, views. Two databases with the same schema
/// give the same text; a rollback must give back the text of before.
pub async fn catalog(db: &TestDb) -> String {
    const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast', 'pgshift') AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'";
    let queries = [
        format!(
            "SELECT n.nspname || '.' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                    || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
                    || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
                    || CASE a.attidentity WHEN 'a' THEN ' identity always' WHEN 'd' THEN ' identity by default' ELSE '' END
                    || CASE a.attgenerated WHEN 's' THEN ' generated' ELSE '' END
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND {USER_SCHEMAS}"
        ),
        format!(
            "SELECT pg_get_indexdef(i.indexrelid) || CASE WHEN i.indisvalid THEN '' ELSE ' INVALID' END
             FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE {USER_SCHEMAS}"
        ),
        format!(
            "SELECT con.conrelid::regclass || ' ' || con.conname || ' ' || pg_get_constraintdef(con.oid)
                    || CASE WHEN con.convalidated THEN '' ELSE ' (not validated)' END
             FROM pg_constraint con JOIN pg_namespace n ON n.oid = con.connamespace WHERE {USER_SCHEMAS}"
        ),
        format!(
            "SELECT t.tgrelid::regclass || ' trigger ' || t.tgname
             FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE NOT t.tgisinternal AND {USER_SCHEMAS}"
        ),
        format!(
            "SELECT 'function ' || n.nspname || '.' || p.proname
             FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE {USER_SCHEMAS}"
        ),
        format!(
            "SELECT 'sequence ' || n.nspname || '.' || c.relname || coalesce(' owned by ' || (
                        SELECT d.refobjid::regclass || '.' || a.attname FROM pg_depend d
                        JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
                        WHERE d.objid = c.oid AND d.deptype IN ('a', 'i') LIMIT 1), '')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'S' AND {USER_SCHEMAS}"
        ),
        format!(
            "SELECT 'view ' || n.nspname || '.' || c.relname || ': ' || pg_get_viewdef(c.oid)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind IN ('v', 'm') AND {USER_SCHEMAS}"
        ),
    ];
    let mut out = Vec::new();
    for q in &queries {
        let rows = db
            .client
            .query(q.as_str(), &[])
            .await
            .unwrap_or_else(|e| panic!("{q}: {e}"));
        let mut lines: Vec<String> = rows.iter().map(|r| r.get::<_, String>(0)).collect();
        lines.sort();
        out.extend(lines);
        out.push("--".to_string());
    }
    out.join("\n")
}

/// The rows `query` returns, as text (each row's text form, one per line), to
/// compare two moments or two databases.
pub async fn rows_text(db: &TestDb, query: &str) -> String {
    let sql = format!("SELECT coalesce(string_agg(q::text, E'\\n'), '') FROM ({query}) AS q");
    db.client
        .query_one(&sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// Samples, every 5 ms until [`WaitSampler::finish`], what the backends of one
/// database wait on, so that a slow application statement can be told apart:
/// queued on a lock (pgshift's DDL or a batch's rows: what its lock timeout
/// bounds) or on the server's WAL and disk (which stall commits on a busy or
/// slow disk with no pgshift running at all).
pub struct WaitSampler {
    stop: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<Vec<Wait>>,
}

/// One backend seen waiting: ms from the sampler's epoch, its pid, `type/event`.
pub struct Wait {
    pub at_ms: f64,
    pub pid: i32,
    pub what: String,
}

impl WaitSampler {
    /// Starts sampling the database of `url`; times count from `epoch`.
    pub async fn start(url: &str, epoch: std::time::Instant) -> WaitSampler {
        let c = connect(url).await;
        let q = c
            .prepare(
                "SELECT pid, wait_event_type || '/' || wait_event FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND wait_event IS NOT NULL AND wait_event_type NOT IN ('Activity', 'Client')",
            )
            .await
            .unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        let until = stop.clone();
        let handle = tokio::spawn(async move {
            let mut out = Vec::new();
            while !until.is_cancelled() {
                let at_ms = epoch.elapsed().as_secs_f64() * 1e3;
                if let Ok(rows) = c.query(&q, &[]).await {
                    out.extend(rows.iter().map(|r| Wait {
                        at_ms,
                        pid: r.get(0),
                        what: r.get(1),
                    }));
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            out
        });
        WaitSampler { stop, handle }
    }

    pub async fn finish(self) -> Waits {
        self.stop.cancel();
        Waits(self.handle.await.unwrap())
    }
}

/// Everything a [`WaitSampler`] saw.
pub struct Waits(pub Vec<Wait>);

impl Waits {
    /// What backend `pid` was seen waiting on from `from_ms` to `to_ms`, each
    /// with how many samples saw it.
    pub fn of(&self, pid: i32, from_ms: f64, to_ms: f64) -> Vec<(String, usize)> {
        let mut seen: Vec<(String, usize)> = Vec::new();
        for w in self
            .0
            .iter()
            .filter(|w| w.pid == pid && w.at_ms >= from_ms && w.at_ms <= to_ms)
        {
            match seen.iter_mut().find(|(what, _)| *what == w.what) {
                Some((_, n)) => *n += 1,
                None => seen.push((w.what.clone(), 1)),
            }
        }
        seen
    }
}

/// Whether any of `seen` is a wait on a heavyweight lock (a table, a row, a
/// transaction), as opposed to the WAL, the disk or the CPU.
pub fn on_a_lock(seen: &[(String, usize)]) -> bool {
    seen.iter().any(|(what, _)| what.starts_with("Lock/"))
}
