//! The validated plan: the only shape of a plan the rest of pgshift ever sees.
//!
//! `raw.rs` reads the YAML into a positioned tree, `validate.rs` checks all of
//! it and builds these types, `lint.rs` applies squawk's rules and pgshift's
//! own, `sql.rs` splits and classifies statements by parsing them. A `Plan`
//! that exists has passed every static check except the lint findings, which
//! travel with it so that `apply` can refuse them and `show` can print them.

pub mod checksum;
pub mod duration;
pub mod lint;

pub mod raw;
pub mod sql;
pub mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ident::{Ident, QualifiedName};
pub use raw::Pos;
pub use sql::Statement;

/// The four phases, in the only order they ever run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    Expand,
    DualWrite,
    Backfill,
    Contract,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Expand,
        Phase::DualWrite,
        Phase::Backfill,
        Phase::Contract,
    ];

    /// The phase's key in the plan file and in the control table.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Expand => "expand",
            Phase::DualWrite => "dual_write",
            Phase::Backfill => "backfill",
            Phase::Contract => "contract",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Defaults for every setting a plan can leave out. This is the one place they live;
/// docs/plan-format.md repeats them for readers.
pub mod defaults {
    use std::time::Duration;
    /// The longest any application query may queue behind one of our DDL statements.
    pub const LOCK_TIMEOUT: Duration = Duration::from_millis(500);
    /// A statement that runs longer is cancelled (it is most likely scanning under a lock).
    pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
    /// Lock-timeout retries per statement before the step fails.
    pub const RETRIES: u32 = 30;
    /// Backoff between retries: doubles from the first to the cap, with jitter.
    pub const RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(200);
    pub const RETRY_BACKOFF_CAP: Duration = Duration::from_secs(10);
    /// A `run` step or hook that runs longer is killed.
    pub const RUN_TIMEOUT: Duration = Duration::from_secs(10 * 60);
    pub const HOOK_TIMEOUT: Duration = Duration::from_secs(60);
    /// How often a `check` with `wait` polls.
    pub const CHECK_INTERVAL: Duration = Duration::from_secs(5);
    /// Backfill batches.
    pub const BATCH_SIZE: u32 = 1000;
    pub const MIN_BATCH_SIZE: u32 = 100;
    pub const MAX_BATCH_SIZE: u32 = 50_000;
    pub const BATCH_SIZE_LIMIT: u32 = 1_000_000;
    pub const WORKERS: u32 = 1;
    pub const WORKERS_LIMIT: u32 = 32;
    pub const SLEEP: Duration = Duration::ZERO;
}

/// Plan-wide settings, each overridable per step where it makes sense.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub retries: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lock_timeout: defaults::LOCK_TIMEOUT,
            statement_timeout: defaults::STATEMENT_TIMEOUT,
            retries: defaults::RETRIES,
        }
    }
}

/// A validated plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub id: String,
    pub description: Option<String>,
    /// The file it was read from, as given on the command line.
    pub file: PathBuf,
    pub checksum: checksum::Checksum,
    pub settings: Settings,
    pub hooks: Hooks,
    /// Every step in execution order (phases concatenated).
    pub steps: Vec<Step>,
    /// Lint findings that an `allow` acknowledged (unacknowledged ones make the plan invalid),
    /// and warnings: `plan show` prints them.
    pub notes: Vec<Diagnostic>,
}

impl Plan {
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// The first contract step without a rollback: past it the plan cannot be undone.
    pub fn point_of_no_return(&self) -> Option<&Step> {
        self.steps
            .iter()
            .find(|s| s.phase == Phase::Contract && s.is_irreversible())
    }
}

/// Plan-level notification and phase hooks.
#[derive(Debug, Clone, Default)]
pub struct Hooks {
    pub on_gate: Vec<Command>,
    pub on_failure: Vec<Command>,
    pub on_success: Vec<Command>,
    pub before: BTreeMap<Phase, Vec<Command>>,
    pub after: BTreeMap<Phase, Vec<Command>>,
}

/// One step of a plan.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub phase: Phase,
    /// 0-based position in execution order.
    pub position: usize,
    pub kind: StepKind,
    pub rollback: Option<Rollback>,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub retries: u32,
    /// Overall limit for `run` and `check … wait` steps.
    pub timeout: Option<Duration>,
    /// Lint rules acknowledged for this step, with the reason given.
    pub allow: BTreeMap<String, String>,
    /// Where the step starts in the file.
    pub pos: Pos,
}

impl Step {
    /// True when no undo exists for this step and it changes something.
    pub fn is_irreversible(&self) -> bool {
        match self.kind {
            StepKind::Check(_) | StepKind::Gate(_) => false,
            StepKind::Trigger(_) | StepKind::DropTrigger(_) => false,
            StepKind::Backfill(_) => false,
            StepKind::Sql(_) | StepKind::Run(_) => self.rollback.is_none(),
        }
    }
}

/// What a step does: the one kind key it carries in the plan.
#[derive(Debug, Clone)]
pub enum StepKind {
    Sql(SqlBody),
    Trigger(TriggerSpec),
    Backfill(BackfillSpec),
    Check(CheckSpec),
    Gate(String),
    Run(Command),
    /// Drops the trigger and function generated by the named `trigger` step.
    DropTrigger(DropTriggerSpec),
}

impl StepKind {
    /// The kind's key in the plan file and the control table.
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Sql(_) => "sql",
            StepKind::Trigger(_) => "trigger",
            StepKind::Backfill(_) => "backfill",
            StepKind::Check(_) => "check",
            StepKind::Gate(_) => "gate",
            StepKind::Run(_) => "run",
            StepKind::DropTrigger(_) => "drop_trigger",
        }
    }
}

/// The statements of an `sql` step (or an SQL rollback), split and classified.
#[derive(Debug, Clone)]
pub struct SqlBody {
    pub text: String,
    pub statements: Vec<Statement>,
    /// False when the body is one statement that cannot run inside a transaction.
    pub transactional: bool,
}

/// How to undo a step.
#[derive(Debug, Clone)]
pub enum Rollback {
    Sql(SqlBody),
    Run(Command),
}

/// A dual-write trigger: new columns computed from the old ones, and optionally back.
#[derive(Debug, Clone)]
pub struct TriggerSpec {
    pub table: QualifiedName,
    /// New column ← expression over `NEW` (the old shape).
    pub set: Vec<(Ident, String)>,
    /// Old column ← expression over `NEW` (the new shape), for renames and type changes.
    pub reverse: Vec<(Ident, String)>,
    /// Optional condition (over `NEW`) limiting the rows the trigger maintains.
    pub when: Option<String>,
}

/// Removal of a generated dual-write trigger, by the name of the step that made it.
#[derive(Debug, Clone)]
pub struct DropTriggerSpec {
    pub step: String,
    /// The trigger step's specification, so the drop can be undone by re-creating it.
    pub trigger: TriggerSpec,
}

/// The SET part of a backfill.
#[derive(Debug, Clone)]
pub enum BackfillSet {
    /// Column ← expression, one per column: lets pgshift skip rows already equal.
    Columns(Vec<(Ident, String)>),
    /// A raw SET clause, used as written.
    Clause(String),
}

/// A batched, checkpointed UPDATE over a key range.
#[derive(Debug, Clone)]
pub struct BackfillSpec {
    pub table: QualifiedName,
    /// The key columns; `None` means the primary key, read from the catalog.
    pub key: Option<Vec<Ident>>,
    pub set: BackfillSet,
    /// Rows that still need work.
    pub where_: Option<String>,
    pub batch_size: u32,
    pub workers: u32,
    /// A query returning the number of rows missed (must be 0 after the last batch).
    pub verify: Option<String>,
    pub throttle: Throttle,
}

/// How a backfill slows itself down.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttle {
    pub sleep: Duration,
    pub max_rows_per_sec: Option<u32>,
    pub target_batch_time: Option<Duration>,
    pub min_batch_size: u32,
    pub max_batch_size: u32,
    pub max_replica_lag: Option<Duration>,
    pub throttle_query: Option<String>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            sleep: defaults::SLEEP,
            max_rows_per_sec: None,
            target_batch_time: None,
            min_batch_size: defaults::MIN_BATCH_SIZE,
            max_batch_size: defaults::MAX_BATCH_SIZE,
            max_replica_lag: None,
            throttle_query: None,
        }
    }
}

/// A query that must return true.
#[derive(Debug, Clone)]
pub struct CheckSpec {
    pub query: String,
    /// Poll until true for at most this long; `None` checks once.
    pub wait: Option<Duration>,
    pub interval: Duration,
}

/// A shell command: a `run` step, a `run:` rollback, or a hook.
#[derive(Debug, Clone)]
pub struct Command {
    pub command: String,
    pub timeout: Duration,
    /// Extra environment the plan passes explicitly.
    pub env: BTreeMap<String, String>,
    /// Variables of pgshift's own environment the plan lets through (nothing else is).
    pub pass_env: Vec<String>,
}

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem found in a plan file: where, in which step, what, and what would be valid.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub pos: Pos,
    pub severity: Severity,
    /// `syntax`, `unknown-key`, … or a lint rule name (squawk's or pgshift's).
    pub rule: String,
    pub step: Option<String>,
    pub message: String,
    pub help: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(
            f,
            "{}:{}: {sev}[{}]: ",
            self.file.display(),
            self.pos,
            self.rule
        )?;
        if let Some(step) = &self.step {
            write!(f, "step `{step}`: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

/// Why a plan could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot read plan file `{}`: {reason}", file.display())]
    Unreadable { file: PathBuf, reason: String },
    #[error("{}", render(diagnostics))]
    Invalid {
        file: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

impl Error {
    /// Every diagnostic the error carries (an unreadable file is one).
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        match self {
            Error::Unreadable { file, reason } => vec![Diagnostic {
                file: file.clone(),
                pos: Pos { line: 1, col: 1 },
                severity: Severity::Error,
                rule: "file".into(),
                step: None,
                message: format!("cannot read the plan file: {reason}"),
                help: None,
            }],
            Error::Invalid { diagnostics, .. } => diagnostics.clone(),
        }
    }
}

fn render(diags: &[Diagnostic]) -> String {
    let errors = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let mut s = diags
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("\n");
    s.push_str(&format!(
        "\n{errors} error(s) in the plan; nothing was changed"
    ));
    s
}

/// Largest plan file accepted: plans are hand-written; anything bigger is a mistake.
pub const MAX_PLAN_BYTES: u64 = 1024 * 1024;

/// Reads, parses, validates and lints a plan file. Touches no database.
///
/// Lint findings that no `allow` acknowledges are returned as an `Invalid` error too:
/// a plan with findings is not a plan pgshift will run.
pub fn load(path: &Path) -> Result<Plan, Error> {
    let text = read(path)?;
    validate::validate(path, &text)
}

/// Reads a plan file, refusing what cannot be a plan (a directory, a device, a huge file).
pub fn read(path: &Path) -> Result<String, Error> {
    let unreadable = |reason: String| Error::Unreadable {
        file: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| unreadable(e.to_string()))?;
    if meta.is_dir() {
        return Err(unreadable("it is a directory, not a YAML file".into()));
    }
    if !meta.is_file() {
        return Err(unreadable(
            "it is not a regular file (a device, socket or pipe?)".into(),
        ));
    }
    if meta.len() > MAX_PLAN_BYTES {
        return Err(unreadable(format!(
            "it is {} bytes; a plan is limited to {} bytes (is this the right file?)",
            meta.len(),
            MAX_PLAN_BYTES
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| unreadable(e.to_string()))?;
    String::from_utf8(bytes).map_err(|e| {
        unreadable(format!(
            "it is not UTF-8 text (invalid byte at offset {}); is it a binary file?",
            e.utf8_error().valid_up_to()
        ))
    })
}
