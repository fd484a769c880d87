//! Backfill benchmark: pgshift against the honest baselines, in one run.
//!
//! `cargo bench --bench backfill [-- --rows 1000000,10000000 --reps 3 --batch 1000 --clients 4 --no-rtt]`
//! `[--jobs update,loop,loop-trigger,loop-async,fixed,adaptive] [--workload-only] [--slow MS]`
//! `[--set NAME=VALUE]… [--max-wal-rate RATE]`
//! (or `BENCH_ROWS`, `BENCH_REPS`, `BENCH_BATCH`, `BENCH_CLIENTS`; defaults 1,000,000
//! rows, 3 repetitions, batches of 1,000, 4 application clients). `DATABASE_URL`
//! names the server (default the local one); databases named `pgshift_bench_*`
//! are dropped and recreated.
//!
//! Every job runs `--reps` times, the jobs interleaved (all of them once, then all
//! again), so that a change of load on a shared machine falls on every job alike;
//! the table shows each job's median run and the spread of its rows/s. Every run
//! starts from a byte-identical copy of the table: a database created from a
//! template (`STRATEGY FILE_COPY`, vacuumed and analyzed, with or without the
//! trigger), then a CHECKPOINT.
//! `RESHAPE_BIN` adds Reshape (its `add_column` with `up`, which backfills).
//! `--set max_wal_size=8GB` (repeatable) measures a server setting, such as
//! pgshift's own advice when checkpoints crowd: it is set with `ALTER SYSTEM`
//! and a reload for the run and reset at the end; the header says what was in
//! force.
//! `--max-wal-rate 40MB` adds that cap to pgshift adaptive's throttle (the
//! lever pgshift offers when the application's commits wait on the WAL).
//!
//! The job is the README's: `email_hash = encode(sha256(lower(email)::bytea), 'hex')`
//! on a `leads` table, whose dual-write trigger is the one pgshift generates (lean:
//! `UPDATE OF email` only). Each run gets a fresh, identical copy of the table, then:
//!
//! - `single UPDATE`: one statement over the whole table: the physical limit, and
//!   the stall it causes;
//! - `plain loop`: `UPDATE leads SET … WHERE id >= $1 AND id < $1 + 1000`, one
//!   prepared statement per batch, autocommit, no checkpoint: the plainest loop
//!   that does the job, without and with the trigger;
//! - `pgshift fixed`: `pgshift plan apply` of a one-step backfill plan, batches of
//!   1,000, in a child process, over plain TCP as the baselines (`sslmode=disable`):
//!   its time includes start-up, validation, the control schema, a checkpoint with
//!   every batch and the final verify; its peak RSS (VmHWM) is read from /proc;
//! - `pgshift adaptive`: the same with `target_batch_time: 50ms`.
//!
//! Each runs on an idle server and under an application workload (N clients
//! alternating a primary-key read and a one-row write of another column). In
//! each repetition under the workload, the application also runs alone on a
//! fresh copy for as long as the longest job took: the waits a job is judged by
//! are read against the waits this server shows with no job at all. Then
//! the plain loop and pgshift fixed run again at a 2 ms round trip (see `net.rs`).

#[path = "backfill/net.rs"]
mod net;
#[path = "support/peak_rss.rs"]
mod peak_rss;
#[path = "backfill/report.rs"]
mod report;
#[path = "backfill/workload.rs"]
mod workload;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use report::{met, ms, print_table, targets, thousands};
use tokio_postgres::Client;
use workload::{AppStats, Workload, connect};

const HASH: &str = "encode(sha256(lower(email)::bytea), 'hex')";

struct Args {
    sizes: Vec<i64>,
    batch: i64,
    clients: usize,
    rtt: bool,
    reps: usize,
    /// Only these jobs (default: all).
    jobs: Option<Vec<Job>>,
    /// Skip the idle runs.
    workload_only: bool,
    /// Print each application operation slower than this many ms, with what the
    /// application's sessions were waiting on around it.
    slow_ms: Option<u32>,
    /// Server settings for the run (`ALTER SYSTEM`, reset at the end).
    settings: Vec<(String, String)>,
    /// A `max_wal_rate` for pgshift adaptive.
    max_wal_rate: Option<String>,
}

fn args() -> Args {
    let list = |v: &str| -> Vec<i64> {
        v.split(',')
            .filter_map(|n| n.trim().replace('_', "").parse().ok())
            .collect()
    };
    let env = |name: &str| std::env::var(name).ok();
    let mut a = Args {
        sizes: env("BENCH_ROWS")
            .map(|v| list(&v))
            .unwrap_or(vec![1_000_000]),
        batch: env("BENCH_BATCH")
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000),
        clients: env("BENCH_CLIENTS")
            .and_then(|v| v.parse().ok())
            .unwrap_or(4),
        rtt: true,
        reps: env("BENCH_REPS").and_then(|v| v.parse().ok()).unwrap_or(3),
        jobs: None,
        workload_only: false,
        slow_ms: None,
        settings: Vec::new(),
        max_wal_rate: None,
    };
    // `cargo bench` adds `--bench`; anything unknown is ignored.
    let argv: Vec<String> = std::env::args().collect();
    for (i, arg) in argv.iter().enumerate() {
        let value = || argv.get(i + 1).cloned().unwrap_or_default();
        match arg.as_str() {
            "--rows" => a.sizes = list(&value()),
            "--batch" => a.batch = value().parse().expect("--batch N"),
            "--clients" => a.clients = value().parse().expect("--clients N"),
            "--no-rtt" => a.rtt = false,
            "--reps" => a.reps = value().parse().expect("--reps N"),
            "--jobs" => {
                a.jobs = Some(
                    value()
                        .split(',')
                        .map(|j| Job::parse(j.trim()).unwrap_or_else(|| panic!("--jobs: unknown job `{j}` (update, loop, loop-trigger, loop-async, fixed, adaptive, reshape)")))
                        .collect(),
                )
            }
            "--workload-only" => a.workload_only = true,
            "--slow" => a.slow_ms = Some(value().parse().expect("--slow MS")),
            "--set" => {
                let v = value();
                let (name, val) = v
                    .split_once('=')
                    .filter(|(n, _)| {
                        !n.is_empty() && n.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    })
                    .unwrap_or_else(|| panic!("--set NAME=VALUE (a server setting), not `{v}`"));
                a.settings.push((name.to_string(), val.to_string()));
            }
            "--max-wal-rate" => a.max_wal_rate = Some(value()),
            _ => {}
        }
    }
    assert!(!a.sizes.is_empty(), "--rows N[,N…]");
    a
}

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Job {
    Update,
    Loop {
        trigger: bool,
    },
    /// The plain loop with the trigger, its commits not waiting for the disk (as pgshift's).
    LoopAsync,
    Fixed,
    Adaptive,
    Reshape,
    /// No job: the application alone, for as long as the longest job of the
    /// same repetition took, on a fresh copy like theirs. Its waits are the
    /// floor the jobs' are read against.
    Alone,
}

impl Job {
    pub fn name(self) -> &'static str {
        match self {
            Job::Update => "single UPDATE",
            Job::Loop { trigger: false } => "plain loop, no trigger",
            Job::Loop { trigger: true } => "plain loop + trigger",
            Job::LoopAsync => "plain loop + trigger, synchronous_commit off",
            Job::Fixed => "pgshift fixed 1000",
            Job::Adaptive => "pgshift adaptive 50ms",
            Job::Reshape => "Reshape",
            Job::Alone => "no job: the application alone",
        }
    }

    fn parse(name: &str) -> Option<Job> {
        Some(match name {
            "update" => Job::Update,
            "loop" => Job::Loop { trigger: false },
            "loop-trigger" => Job::Loop { trigger: true },
            "loop-async" => Job::LoopAsync,
            "fixed" => Job::Fixed,
            "adaptive" => Job::Adaptive,
            "reshape" => Job::Reshape,
            _ => return None,
        })
    }

    fn trigger(self) -> bool {
        !matches!(self, Job::Loop { trigger: false } | Job::Reshape)
    }
}

/// One measured run (or, in the tables, a job's median run).
pub struct Row {
    job: Job,
    app: Option<AppStats>,
    secs: f64,
    rows: i64,
    rss_kib: Option<u64>,
    verify_ms: Option<i64>,
    /// The slowest and fastest rows/s of the job's repetitions.
    spread: Option<(f64, f64)>,
}

impl Row {
    pub fn rate(&self) -> f64 {
        self.rows as f64 / self.secs
    }
}

/// Where the benchmark works: the server, the databases, the plans.
struct Bench {
    server: String,
    admin: Client,
    dir: PathBuf,
    trigger_sql: Vec<String>,
    batch: i64,
    reps: usize,
    jobs: Option<Vec<Job>>,
    workload_only: bool,
    slow_ms: Option<u32>,
    max_wal_rate: Option<String>,
}

/// The database each run works in: a fresh copy of a template.
const RUN_DB: &str = "pgshift_bench_run";

impl Bench {
    /// The URL of database `db` on the server.
    fn url(&self, db: &str) -> String {
        match self.server.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{db}"),
            None => self.server.clone(),
        }
    }

    async fn exec(&self, sql: &str) {
        self.admin
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// The two templates at this size: `leads` without the trigger, and with it.
    async fn templates(&self, rows: i64) {
        for (db, trigger) in [
            ("pgshift_bench_tpl", false),
            ("pgshift_bench_tpl_trigger", true),
        ] {
            self.exec(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await;
            let mut sql: Vec<String> = if trigger {
                self.exec(&format!(
                    "CREATE DATABASE {db} TEMPLATE pgshift_bench_tpl STRATEGY FILE_COPY"
                ))
                .await;
                self.trigger_sql.clone()
            } else {
                self.exec(&format!("CREATE DATABASE {db}")).await;
                vec![
                    "CREATE TABLE leads (id bigint NOT NULL, email text NOT NULL, name text NOT NULL,
                                         created_at timestamptz NOT NULL, email_hash text)"
                        .into(),
                    format!(
                        "INSERT INTO leads SELECT g, 'User' || g || '@Example.com', 'name ' || g,
                                '2026-01-01'::timestamptz - g * interval '1 second', NULL
                         FROM generate_series(1, {rows}) g"
                    ),
                    "ALTER TABLE leads ADD PRIMARY KEY (id)".into(),
                ]
            };
            // VACUUM cannot share a transaction: one statement per call.
            sql.push("VACUUM ANALYZE leads".into());
            let c = connect(&self.url(db)).await;
            for q in sql {
                c.batch_execute(&q)
                    .await
                    .unwrap_or_else(|e| panic!("{q}: {e}"));
            }
        }
    }

    /// A byte-identical copy of a template, checkpointed, and a connection to it.
    async fn fresh(&self, trigger: bool) -> Client {
        let tpl = if trigger {
            "pgshift_bench_tpl_trigger"
        } else {
            "pgshift_bench_tpl"
        };
        self.exec(&format!("DROP DATABASE IF EXISTS {RUN_DB} WITH (FORCE)"))
            .await;
        self.exec(&format!(
            "CREATE DATABASE {RUN_DB} TEMPLATE {tpl} STRATEGY FILE_COPY"
        ))
        .await;
        self.exec("CHECKPOINT").await;
        connect(&self.url(RUN_DB)).await
    }

    async fn drop_all(&self) {
        for db in [RUN_DB, "pgshift_bench_tpl_trigger", "pgshift_bench_tpl"] {
            let _ = self
                .admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await;
        }
    }
}

#[tokio::main]
async fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("--child-loop") {
        // Inside the network namespace: the plain loop, as its own process.
        let c = connect(&argv[2]).await;
        plain_loop(&c, argv[3].parse().unwrap()).await;
        return;
    }
    let a = args();
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin = connect(&server).await;
    let version: String = admin
        .query_one("SHOW server_version", &[])
        .await
        .unwrap()
        .get(0);
    let set = server_settings(&admin, &a.settings).await;
    let dir = std::env::temp_dir().join(format!("pgshift-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let b = Bench {
        server: server.clone(),
        admin,
        trigger_sql: trigger_sql(&dir),
        dir,
        batch: a.batch,
        reps: a.reps.max(1),
        jobs: a.jobs.clone(),
        workload_only: a.workload_only,
        slow_ms: a.slow_ms,
        max_wal_rate: a.max_wal_rate.clone(),
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cap = match &a.max_wal_rate {
        Some(r) => format!("; pgshift adaptive with max_wal_rate {r}"),
        None => String::new(),
    };
    println!(
        "backfill benchmark: batch {}, {} application clients, {} repetitions (medians); PostgreSQL {version}, {cores} cores, {set}{cap}",
        a.batch, a.clients, b.reps
    );
    let mut rss = Vec::new();
    for (i, &rows) in a.sizes.iter().enumerate() {
        let results = size(&b, rows, a.clients).await;
        let fixed = results.iter().find(|r| r.job == Job::Fixed);
        rss.push((rows, fixed.and_then(|r| r.rss_kib)));
        if i == 0 && a.rtt {
            rtt(&b, rows, &server).await;
        }
    }
    if let [(r1, Some(k1)), .., (rn, Some(kn))] = rss.as_slice() {
        let ratio = *kn as f64 / *k1 as f64;
        println!(
            "\npeak RSS of pgshift fixed: {:.1} MiB at {} rows, {:.1} MiB at {} rows: {ratio:.2}× (target ≤ 1.2×: {})",
            *k1 as f64 / 1024.0,
            thousands(*r1),
            *kn as f64 / 1024.0,
            thousands(*rn),
            met(ratio <= 1.2)
        );
    }
    b.drop_all().await;
    let _ = std::fs::remove_dir_all(&b.dir);
    for (name, _) in &a.settings {
        b.exec(&format!("ALTER SYSTEM RESET {name}")).await;
    }
    if !a.settings.is_empty() {
        b.exec("SELECT pg_reload_conf()").await;
    }
}

/// Sets the server settings asked for (a reload, no restart) and says what is
/// in force: those, and `max_wal_size` and `min_wal_size` always. A run that
/// panics leaves them set, and says how to reset them.
async fn server_settings(admin: &Client, set: &[(String, String)]) -> String {
    for (name, value) in set {
        let sql = format!("ALTER SYSTEM SET {name} = '{}'", value.replace('\'', "''"));
        admin
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    if !set.is_empty() {
        admin
            .batch_execute("SELECT pg_reload_conf()")
            .await
            .unwrap();
        let reset: String = set
            .iter()
            .map(|(n, _)| format!("ALTER SYSTEM RESET {n}; "))
            .collect();
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            hook(info);
            eprintln!(
                "the server settings of --set are still in force: {reset}SELECT pg_reload_conf();"
            );
        }));
        // The reload reaches the other processes a moment later.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut names: Vec<&str> = vec!["max_wal_size", "min_wal_size"];
    for (n, _) in set {
        if !names.contains(&n.as_str()) {
            names.push(n);
        }
    }
    let mut shown = Vec::new();
    for n in names {
        let v: String = admin
            .query_one(&format!("SHOW {n}"), &[])
            .await
            .unwrap_or_else(|e| panic!("SHOW {n}: {e}"))
            .get(0);
        shown.push(format!("{n} {v}"));
    }
    shown.join(", ")
}

/// Every job at one size, idle and under the workload, `reps` times interleaved;
/// prints the table of medians and the targets.
async fn size(b: &Bench, rows: i64, clients: usize) -> Vec<Row> {
    let setup = Instant::now();
    b.templates(rows).await;
    let url = b.url(RUN_DB);
    let _warm = b.fresh(true).await;
    let app = Workload::start(&url, clients, rows, None).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let warm = app.finish().await;
    println!(
        "\n{} rows (templates built in {:.1}s); the application alone for 5 s: {:.0} ops/s, p50 {}, p99 {}, max {}\n",
        thousands(rows),
        setup.elapsed().as_secs_f64(),
        warm.ops_per_sec,
        ms(warm.p50),
        ms(warm.p99),
        ms(warm.max)
    );
    let jobs = b.jobs.clone().unwrap_or_else(|| {
        let mut jobs = vec![
            Job::Update,
            Job::Loop { trigger: false },
            Job::Loop { trigger: true },
            Job::LoopAsync,
            Job::Fixed,
            Job::Adaptive,
        ];
        if std::env::var_os("RESHAPE_BIN").is_some() {
            jobs.push(Job::Reshape);
        }
        jobs
    });
    let modes: &[bool] = if b.workload_only {
        &[true]
    } else {
        &[false, true]
    };
    let mut all = Vec::new();
    for _ in 0..b.reps {
        for &with_app in modes {
            let mut longest: f64 = 0.0;
            for &job in &jobs {
                let r = measure(b, job, with_app.then_some(clients), rows).await;
                longest = longest.max(r.secs);
                all.push(r);
            }
            if with_app {
                all.push(alone(b, clients, rows, longest).await);
            }
        }
    }
    let mut out = Vec::new();
    for &with_app in modes {
        let alone = with_app.then_some(Job::Alone);
        for &job in jobs.iter().chain(alone.iter()) {
            let runs: Vec<Row> = all
                .extract_if(.., |r| r.job == job && r.app.is_some() == with_app)
                .collect();
            out.push(median(runs));
        }
    }
    print_table(&out);
    targets(&out, rows);
    out
}

/// One run of `job` on a fresh copy, under the workload when `clients` is given.
async fn measure(b: &Bench, job: Job, clients: Option<usize>, rows: i64) -> Row {
    let c = b.fresh(job.trigger()).await;
    let url = b.url(RUN_DB);
    let w = match clients {
        Some(n) => {
            let w = Workload::start(&url, n, rows, b.slow_ms).await;
            // Let the workload warm up before the job starts.
            tokio::time::sleep(Duration::from_millis(500)).await;
            Some(w)
        }
        None => None,
    };
    let (secs, rss_kib) = run_job(b, &c, job, &url, None).await;
    let app = match w {
        Some(w) => {
            let stats = w.finish().await;
            if b.slow_ms.is_some() {
                workload::print_slow(job.name(), &stats);
            }
            Some(stats)
        }
        None => None,
    };
    check(&c, job).await;
    Row {
        job,
        app,
        secs,
        rows,
        rss_kib,
        verify_ms: verify_ms(&c, job).await,
        spread: None,
    }
}

/// The application alone for `secs`, measured as a job under the workload is.
async fn alone(b: &Bench, clients: usize, rows: i64, secs: f64) -> Row {
    let _c = b.fresh(true).await;
    let w = Workload::start(&b.url(RUN_DB), clients, rows, b.slow_ms).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let secs = start.elapsed().as_secs_f64();
    let stats = w.finish().await;
    if b.slow_ms.is_some() {
        workload::print_slow(Job::Alone.name(), &stats);
    }
    Row {
        job: Job::Alone,
        app: Some(stats),
        secs,
        rows: 0,
        rss_kib: None,
        verify_ms: None,
        spread: None,
    }
}

/// The median run of a job's repetitions, with the spread of their rates, the
/// worst application latency any of them saw, the most operations over 100 ms
/// any of them saw, and the largest peak RSS.
fn median(mut runs: Vec<Row>) -> Row {
    runs.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let rates: Vec<f64> = runs.iter().map(Row::rate).collect();
    let worst = runs
        .iter()
        .filter_map(|r| r.app.as_ref().map(|a| a.max))
        .max();
    let most_over = runs
        .iter()
        .filter_map(|r| r.app.as_ref().map(|a| a.over_100ms))
        .max();
    let rss = runs.iter().filter_map(|r| r.rss_kib).max();
    let n = runs.len();
    let mut m = runs.swap_remove(n / 2);
    if let (Some(a), Some(w), Some(o)) = (m.app.as_mut(), worst, most_over) {
        a.max = w;
        a.over_100ms = o;
    }
    m.rss_kib = rss;
    m.spread = (n > 1 && m.job != Job::Alone).then(|| {
        (
            rates.iter().copied().fold(f64::INFINITY, f64::min),
            rates.iter().copied().fold(0.0, f64::max),
        )
    });
    m
}

/// The dual-write trigger pgshift generates for this job, from a plan's `trigger` step.
fn trigger_sql(dir: &Path) -> Vec<String> {
    let yaml = format!(
        "id: bench_trigger\nphases:\n  dual_write:\n    - name: sync_email_hash\n      trigger:\n        table: leads\n        set: {{ email_hash: \"{}\" }}\n",
        HASH.replace("email", "NEW.email")
    );
    let file = dir.join("bench_trigger.yaml");
    let plan = pgshift::plan::validate::validate(&file, &yaml).expect("the trigger plan is valid");
    let step = &plan.steps[0];
    let pgshift::plan::StepKind::Trigger(spec) = &step.kind else {
        panic!("not a trigger step")
    };
    pgshift::kind::trigger::statements(&plan.id, &step.name, spec)
}

/// The plan of a pgshift job.
fn plan(b: &Bench, job: Job) -> PathBuf {
    let throttle = match (job, &b.max_wal_rate) {
        (Job::Adaptive, None) => "\n        throttle: { target_batch_time: 50ms }".to_string(),
        (Job::Adaptive, Some(rate)) => {
            format!("\n        throttle: {{ target_batch_time: 50ms, max_wal_rate: \"{rate}\" }}")
        }
        _ => String::new(),
    };
    let path = b
        .dir
        .join(format!("bench_{job:?}.yaml").replace([' ', '{', '}', ':'], ""));
    std::fs::write(
        &path,
        format!(
            "id: bench_leads\nphases:\n  backfill:\n    - name: fill_email_hash\n      allow: {{ backfill-without-dual-write: \"bench: the setup creates the dual-write trigger\" }}\n      backfill:\n        table: leads\n        set: {{ email_hash: \"{HASH}\" }}\n        where: email_hash IS NULL\n        batch_size: {}{throttle}\n",
            b.batch
        ),
    )
    .unwrap();
    path
}

/// Runs one job against `url`; returns its seconds and, for a child process, its peak RSS.
async fn run_job(
    b: &Bench,
    c: &Client,
    job: Job,
    url: &str,
    rtt: Option<&net::Rtt>,
) -> (f64, Option<u64>) {
    let start = Instant::now();
    let mut peak = None;
    match job {
        Job::Update => {
            c.batch_execute(&format!("UPDATE leads SET email_hash = {HASH}"))
                .await
                .unwrap();
        }
        Job::Loop { .. } => match rtt.filter(|r| r.namespace.is_some()) {
            Some(r) => {
                let exe = std::env::current_exe().unwrap();
                let mut cmd = r.command(&exe);
                cmd.args(["--child-loop", url, &b.batch.to_string()]);
                child(cmd).await;
            }
            None => plain_loop(&connect(url).await, b.batch).await,
        },
        Job::LoopAsync => {
            let c = connect(url).await;
            c.batch_execute("SET synchronous_commit = off")
                .await
                .unwrap();
            plain_loop(&c, b.batch).await
        }
        Job::Fixed | Job::Adaptive => {
            let bin = Path::new(env!("CARGO_BIN_EXE_pgshift"));
            let mut cmd = match rtt {
                Some(r) => r.command(bin),
                None => Command::new(bin),
            };
            // The baselines connect without TLS (NoTls): so does pgshift here, so that
            // the comparison is of the backfills, not of the transports.
            cmd.args(["--progress", "never", "-q", "--yes", "plan", "apply"])
                .arg(plan(b, job))
                .env("DATABASE_URL", format!("{url}?sslmode=disable"));
            peak = child(cmd).await;
        }
        Job::Reshape => reshape(b, url).await,
        Job::Alone => unreachable!("the application alone runs no job: see `alone`"),
    }
    (start.elapsed().as_secs_f64(), peak)
}

/// The plainest loop that does the job: one autocommit statement per key range.
async fn plain_loop(c: &Client, batch: i64) {
    let r = c
        .query_one("SELECT min(id), max(id) FROM leads", &[])
        .await
        .unwrap();
    let (mut lo, hi): (i64, i64) = (r.get(0), r.get(1));
    let stmt = c
        .prepare(&format!(
            "UPDATE leads SET email_hash = {HASH} WHERE id >= $1 AND id < $1 + $2"
        ))
        .await
        .unwrap();
    while lo <= hi {
        c.execute(&stmt, &[&lo, &batch]).await.unwrap();
        lo += batch;
    }
}

/// Runs a child process to its end; returns its peak RSS.
async fn child(mut cmd: Command) -> Option<u64> {
    tokio::task::spawn_blocking(move || {
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start the child");
        let (out, peak) = peak_rss::wait(child);
        assert!(
            out.status.success(),
            "{cmd:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        (peak > 0).then_some(peak)
    })
    .await
    .unwrap()
}

/// Reshape's `add_column` with `up` (it backfills the new column through its trigger).
async fn reshape(b: &Bench, url: &str) {
    let bin = std::env::var("RESHAPE_BIN").unwrap();
    let dir = b.dir.join("reshape");
    std::fs::create_dir_all(dir.join("migrations")).unwrap();
    std::fs::write(
        dir.join("migrations/1_email_hash.toml"),
        format!(
            "[[actions]]\ntype = \"add_column\"\ntable = \"leads\"\nup = \"{HASH}\"\n\n\t[actions.column]\n\tname = \"email_hash2\"\n\ttype = \"TEXT\"\n"
        ),
    )
    .unwrap();
    let args = std::env::var("RESHAPE_ARGS").unwrap_or_else(|_| "migration start".into());
    let mut cmd = Command::new(bin);
    cmd.args(args.split_whitespace())
        .current_dir(&dir)
        .env("DB_URL", url)
        .env("DATABASE_URL", url);
    child(cmd).await;
}

/// Every row right after the job.
async fn check(c: &Client, job: Job) {
    let column = if job == Job::Reshape {
        "email_hash2"
    } else {
        "email_hash"
    };
    let missed: i64 = c
        .query_one(
            &format!("SELECT count(*) FROM leads WHERE {column} IS DISTINCT FROM {HASH}"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(missed, 0, "{}: rows left wrong", job.name());
}

/// How long pgshift's final verify took (from its events).
async fn verify_ms(c: &Client, job: Job) -> Option<i64> {
    if !matches!(job, Job::Fixed | Job::Adaptive) {
        return None;
    }
    c.query_opt(
        "SELECT (detail->>'verify_ms')::int8 FROM pgshift.events WHERE event = 'backfill_finished' ORDER BY id DESC LIMIT 1",
        &[],
    )
    .await
    .ok()
    .flatten()
    .and_then(|r| r.get(0))
}

/// The plain loop and pgshift fixed, idle, at a 2 ms round trip.
async fn rtt(b: &Bench, rows: i64, server: &str) {
    let r = net::Rtt::setup(server_addr(server));
    let url = format!("postgres://postgres@{}/{RUN_DB}", r.addr);
    println!(
        "\n2 ms round trip, {} rows, idle: {}\n",
        thousands(rows),
        r.how
    );
    let jobs = [Job::Loop { trigger: true }, Job::Fixed];
    let mut all = Vec::new();
    for _ in 0..b.reps {
        for job in jobs {
            let c = b.fresh(true).await;
            let (secs, rss_kib) = run_job(b, &c, job, &url, Some(&r)).await;
            check(&c, job).await;
            all.push(Row {
                job,
                app: None,
                secs,
                rows,
                rss_kib,
                verify_ms: verify_ms(&c, job).await,
                spread: None,
            });
        }
    }
    let out: Vec<Row> = jobs
        .iter()
        .map(|&j| median(all.extract_if(.., |r| r.job == j).collect()))
        .collect();
    print_table(&out);
    let ratio = out[1].rate() / out[0].rate();
    println!(
        "\ntarget at 2 ms: pgshift fixed ≥ 0.9× the plain loop: {ratio:.2}× ({})",
        met(ratio >= 0.9)
    );
}

/// The server's address from its URL (the benchmark's server is a TCP one).
fn server_addr(url: &str) -> std::net::SocketAddr {
    let c: tokio_postgres::Config = url.parse().expect("DATABASE_URL parses");
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) if h != "localhost" => h.clone(),
        _ => "127.0.0.1".into(),
    };
    format!("{host}:{port}").parse().expect("a numeric host")
}
