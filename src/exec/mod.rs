//! Executing a plan: the runner, the context every step gets, and the outcome
//! and error types that decide the exit code.
//!
//! The runner walks the plan's steps from the first one not succeeded. Each
//! kind lives in its own module (`sql`, `check`, `run`, `trigger`; `backfill`
//! has its own top-level module); they return an [`Outcome`] or a `db::Error`,
//! and the runner records both in the control schema.

pub mod run;
pub mod runner;
pub mod sql;
pub mod trigger;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::control::Control;
use crate::db;
use crate::exit::{Exit, ExitStatus};

/// How a step ended when it did not fail.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Finished; the runner marks it succeeded (a transactional step already has).
    Done,
    /// A gate: the plan waits for an operator.
    Gate(String),
    /// Interrupted (signal) between batches or while waiting; resumable.
    Cancelled,
    /// A backfill paused by the operator (`pgshift throttle --pause`); resumable.
    Paused,
}

/// Why a run stopped without finishing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("another runner holds plan `{plan}`: {holder}")]
    LockHeld { plan: String, holder: String },
    #[error(
        "plan `{plan}` changed since it started: the control table recorded {recorded}, the file now has {current}. Review the change; if it is intended, rerun with --accept-changed"
    )]
    PlanChanged {
        plan: String,
        recorded: String,
        current: String,
    },
    #[error("interrupted during step `{step}`; its progress is saved")]
    Cancelled { step: String },
    #[error("plan `{plan}` stopped at gate `{step}`: {message}")]
    Gate {
        plan: String,
        step: String,
        message: String,
    },
    #[error("step `{step}` is paused by an operator (pgshift throttle --unpause to continue)")]
    Paused { step: String },
    #[error("step `{step}` failed: {source}")]
    Step { step: String, source: db::Error },
    #[error("step `{step}` failed: {message}")]
    Failed { step: String, message: String },
    #[error("lost the connection during step `{step}`: {source}")]
    ConnectionLost { step: String, source: db::Error },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Db(#[from] db::Error),
    #[error(transparent)]
    Plan(#[from] crate::plan::Error),
}

impl ExitStatus for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::LockHeld { .. } => Exit::Locked,
            Error::PlanChanged { .. } => Exit::PlanChanged,
            Error::Cancelled { .. }
            | Error::Gate { .. }
            | Error::Paused { .. }
            | Error::ConnectionLost { .. } => Exit::Resumable,
            Error::Step { .. } | Error::Failed { .. } => Exit::StepFailed,
            Error::Usage(_) | Error::Plan(_) => Exit::Invalid,
            Error::Db(e) if e.is_connection_lost() => Exit::Resumable,
            Error::Db(_) => Exit::StepFailed,
        }
    }
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
