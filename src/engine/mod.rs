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
    pub rows_done: u64,
    pub rows_total: Option<u64>,
    pub rows_per_sec: f64,
    pub batch_size: u32,
    /// Why the backfill is slowed or paused right now, if it is.
    pub throttled: Option<String>,
}

/// Where the library reports what it is doing; `cli.rs` draws it (indicatif or log lines).
pub trait Reporter: Send + Sync {
    /// A line for the operator (a step started, a gate passed, …).
    fn message(&self, text: &str);
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
            auto_gates: false,
            backfill: BackfillOverrides::default(),
            reconnect_timeout: Duration::from_secs(60),
        }
    }
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
