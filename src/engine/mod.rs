//! The machinery every step kind runs on: the context a run carries (where to
//! connect, where to record, when to stop, whom to tell), a step's view of it
//! ([`StepCx`]), how a step ends ([`Outcome`]) or fails ([`Error`]), and DDL
//! under a short lock timeout with retries (`ddl`).
//!
//! It knows nothing of plans: the runner (`exec`) turns a plan's step into a
//! [`StepCx`] and hands it, with the step's spec, to the step's kind (`kind`).

pub mod ddl;
mod error;

pub use error::{Error, Unfixed};

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use tokio_postgres::GenericClient;

use crate::control::{Control, Event, Status};
use crate::db;

/// How a step ended when it did not fail.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Finished; the runner marks it succeeded (a transactional step already has).
    Done,
    /// A gate: the plan waits for an operator.
    Gate(String),
    /// Interrupted (signal) between batches or while waiting; resumable.
    Cancelled,
}

/// `user@host` of whoever runs pgshift, for the plan record.
pub fn whoami() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .or_else(user_from_passwd)
        .unwrap_or_else(|| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{user}@{host}")
}

/// The login name of this process's uid, from /etc/passwd (when USER is not set, as under cron).
fn user_from_passwd() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid).then(|| f[0].to_string())
    })
}

/// Operator overrides of a backfill's throttles, from the command line.
#[derive(Debug, Clone, Default)]
pub struct BackfillOverrides {
    pub step: Option<String>,
    pub batch_size: Option<u32>,
    pub sleep: Option<Duration>,
    pub max_rows_per_sec: Option<u32>,
    pub target_batch_time: Option<Duration>,
    pub workers: Option<u32>,
}

/// Live figures of one backfill worker, for progress bars and logs.
#[derive(Debug, Clone, Default)]
pub struct BackfillProgress {
    pub worker: u32,
    pub workers: u32,
    /// The step's rows done (all workers).
    pub rows_done: u64,
    pub rows_total: Option<u64>,
    /// The step's rate over the last few seconds (not an average since the start).
    pub rows_per_sec: f64,
    pub batch_size: u32,
    /// Why the backfill is slowed or paused right now, if it is (the rows/s cap,
    /// the WAL rate, a signal, the operator's pause).
    pub throttled: Option<String>,
    /// True when no batch runs until `throttled` clears; false when it only slows.
    pub held: bool,
    /// Time left: rows left at the current rate, never sooner than the rows/s cap
    /// allows; `None` while held or before the rate is known.
    pub eta: Option<Duration>,
}

/// A step (or its undo) begins: what the reporter needs to attribute what follows.
#[derive(Debug, Clone)]
pub struct StepStart<'a> {
    pub plan: &'a str,
    pub step: &'a str,
    /// The line for the operator (`expand add_email_hash [sql]`, `rolling back …`).
    pub text: &'a str,
    /// Rows the step had done before this run (a resumed backfill), for its closing line.
    pub rows_done: u64,
}

/// How a step the runner ran ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEnd {
    Done,
    /// Interrupted by the operator or a lost connection; resumable.
    Interrupted,
    Failed,
    /// A gate: the plan waits.
    Waiting,
}

/// Where the library reports what it is doing; `cli.rs` draws it (indicatif or log lines).
pub trait Reporter: Send + Sync {
    /// A line for the operator (a gate passed, a retry, …).
    fn message(&self, text: &str);
    /// A step begins; the lines until it ends belong to it.
    fn step_started(&self, start: &StepStart<'_>) {
        self.message(start.text);
    }
    /// The step that began last has ended.
    fn step_ended(&self, _step: &str, _end: StepEnd) {}
    /// A statement waits for its lock: attempt `attempt` of `max`, who blocks it.
    fn lock_wait(&self, step: &str, relation: &str, attempt: u32, max: u32, blocker: Option<&str>);
    /// The lock wait is over (acquired or given up).
    fn lock_done(&self, step: &str);
    /// New figures for a backfill worker.
    fn backfill(&self, step: &str, progress: &BackfillProgress);
    /// The backfill step is over; remove its bars.
    fn backfill_done(&self, step: &str);
}

/// A reporter that reports nothing (tests, `--quiet`).
pub struct Silent;

impl Reporter for Silent {
    fn message(&self, _: &str) {}
    fn lock_wait(&self, _: &str, _: &str, _: u32, _: u32, _: Option<&str>) {}
    fn lock_done(&self, _: &str) {}
    fn backfill(&self, _: &str, _: &BackfillProgress) {}
    fn backfill_done(&self, _: &str) {}
}

/// What every step gets: where to connect, where to record, when to stop, whom to tell.
#[derive(Clone)]
pub struct Context {
    pub target: db::Target,
    pub pool: db::Pool,
    pub control: Control,
    pub cancel: CancellationToken,
    pub reporter: Arc<dyn Reporter>,
    pub options: Options,
}

/// Choices of the operator for this run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Pass a waiting gate without asking (`resume --yes`).
    pub yes: bool,
    /// Continue although the plan file changed (`resume --accept-changed`).
    pub accept_changed: bool,
    /// With `accept_changed`: accept it even for steps that already ran (`--force`).
    pub force_changed: bool,
    /// Pass gates on the operator's behalf (`pgshift demo` only).
    pub auto_gates: bool,
    pub backfill: BackfillOverrides,
    /// How long to keep reconnecting after a lost connection before stopping (exit 3).
    pub reconnect_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            yes: false,
            accept_changed: false,
            force_changed: false,
            auto_gates: false,
            backfill: BackfillOverrides::default(),
            reconnect_timeout: Duration::from_secs(60),
        }
    }
}

/// What fences a runner: the epoch it took with the plan's lock (every backfill
/// batch checks it inside its own statement) and a token cancelled when the
/// connection that holds the lock is gone.
#[derive(Debug, Clone)]
pub struct Fence {
    pub epoch: i64,
    pub lost: CancellationToken,
}

/// One step as its kind's code sees it: the run's context, the plan and step it
/// belongs to, and the limits it runs under. The runner builds it from the plan.
#[derive(Clone)]
pub struct StepCx {
    pub cx: Context,
    pub plan: String,
    pub step: String,
    /// The phase's key (`expand`, …), for hooks' environment.
    pub phase: &'static str,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    /// Lock-timeout retries per statement.
    pub retries: u32,
    /// The step's status before this run reached it (`failed` after a failure, …).
    pub previous: Status,
    /// The runner's fence; `None` when the step runs without the runner (tests).
    pub fence: Option<Fence>,
}

impl StepCx {
    /// Appends `event` to the log, on `c` (inside the caller's transaction, if any).
    pub async fn record(&self, c: &impl GenericClient, event: &Event) -> Result<(), db::Error> {
        self.cx
            .control
            .event(c, &self.plan, Some(&self.step), event)
            .await
    }

    /// Appends `event` to the log on a pooled connection; a failure is only logged.
    pub async fn note(&self, event: &Event) {
        let result = match db::get(&self.cx.pool, &self.cx.target).await {
            Ok(c) => self.record(&**c, event).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(step = %self.step, "cannot record an event: {e}");
        }
    }

    /// A database error of this step: a lost connection is resumable, anything else fails it.
    pub fn db_error(&self, e: db::Error) -> Error {
        if e.is_statement_timeout() {
            Error::StatementTimeout {
                plan: self.plan.clone(),
                step: self.step.clone(),
                limit: self.statement_timeout,
                batch: None,
                source: Box::new(e),
            }
        } else if e.is_connection_lost() {
            Error::ConnectionLost {
                step: self.step.clone(),
                source: e,
            }
        } else {
            Error::Database {
                step: self.step.clone(),
                source: e,
            }
        }
    }
}
