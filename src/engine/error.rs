//! Why a run or a step stopped without finishing, as variants a caller can
//! branch on (retry, resume, stop), each knowing its exit code.

use std::time::Duration;

use crate::db;
use crate::duration::format as human;
use crate::exit::{Exit, ExitStatus};

/// Why a run stopped without finishing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("another runner holds plan `{plan}`: {holder}")]
    LockHeld { plan: String, holder: String },
    /// The plan file differs from the one the plan started from (or whose change was accepted).
    #[error("{}", changed(plan, recorded, current, changes, ran, *accepting))]
    PlanChanged {
        plan: String,
        recorded: String,
        current: String,
        /// What differs, step by step, each with a short diff (lines of the message).
        changes: Vec<String>,
        /// Steps that already ran and now do something else (or were removed).
        ran: Vec<String>,
        /// The operator gave `--accept-changed` (and it was refused: `ran` needs `--force`).
        accepting: bool,
    },
    #[error("interrupted during step `{step}`; its progress is saved")]
    Cancelled { step: String },
    #[error("plan `{plan}` stopped at gate `{step}`: {message}")]
    Gate {
        plan: String,
        step: String,
        message: String,
    },
    /// The server refused or failed a statement of the step (not a lost connection).
    #[error("step `{step}` failed: {source}{}", missing_object(source))]
    Database { step: String, source: db::Error },
    /// A statement of the step ran past its `statement_timeout` and the server cancelled it.
    #[error(
        "step `{step}` failed: {} ran past its statement_timeout of {} and the server cancelled it{}. {}",
        if batch.is_some() { "a batch" } else { "a statement" },
        human(*limit),
        match batch { Some((n, b)) => format!(" ({n} times in a row, the last batch {b} rows)"), None => String::new() },
        if batch.is_some() {
            format!("Give the step a longer `statement_timeout` in the plan, or smaller batches (`batch_size`, `target_batch_time`), then `pgshift resume {plan} --accept-changed`")
        } else {
            format!("If the statement needs that long, raise the step's `statement_timeout` in the plan (or `settings.statement_timeout`), then `pgshift resume {plan} --accept-changed`")
        }
    )]
    StatementTimeout {
        plan: String,
        step: String,
        limit: Duration,
        /// For a backfill: attempts in a row, and the last batch's size.
        batch: Option<(u32, u32)>,
        source: Box<db::Error>,
    },
    /// A backfill batch failed on a row: the batch was narrowed down to its first failing row.
    #[error(
        "step `{step}` failed on the row of {table} where {key}: {source}. The rows before it are done and checkpointed. Fix that row (or the step's `set`), then `pgshift resume {plan}`: the backfill continues from its checkpoint, right before that row"
    )]
    RowFailed {
        plan: String,
        step: String,
        table: String,
        key: String,
        source: Box<db::Error>,
    },
    /// Rows whose dual write failed are not fixed: the plan may not pass a gate or enter contract.
    #[error("step `{step}` failed: {unfixed}")]
    TriggerFailures { step: String, unfixed: Box<Unfixed> },
    /// Someone changed the database: what the plan needs or created is gone or changed.
    #[error("step `{step}` failed: {object} {found}, but {expected}. {fix}")]
    Drift {
        step: String,
        object: String,
        found: &'static str,
        expected: String,
        fix: String,
    },
    #[error("lost the connection during step `{step}`: {source}")]
    ConnectionLost { step: String, source: db::Error },
    /// Every attempt timed out waiting for its lock (or deadlocked).
    #[error(
        "step `{step}` failed: step `{step}` did not get its lock in {attempts} attempts of {} each: {source}. The application was never blocked longer than that. Find the blocker with `pgshift status {plan}`, or retry later with `pgshift resume {plan}`",
        human(*lock_timeout)
    )]
    RetriesExhausted {
        plan: String,
        step: String,
        attempts: u32,
        lock_timeout: Duration,
        source: db::Error,
    },
    /// The connection dropped again and again during one step.
    #[error(
        "step `{step}` failed: lost the connection {losses} times in a row during this step, reconnecting each time; it does not look like an outage but like something in the step that ends its own connection. Check the server log, then `pgshift resume {plan}`"
    )]
    Reconnects {
        plan: String,
        step: String,
        losses: u32,
    },
    /// A check returned false or NULL (after polling, with `wait`).
    #[error(
        "step `{step}` failed: check returned {got}{}: `{query}`. Fix the data (or wait for it), then `pgshift resume {plan}`",
        match waited { Some(w) => format!(" (polled {polls} times over {})", human(*w)), None => String::new() }
    )]
    CheckFalse {
        plan: String,
        step: String,
        query: String,
        got: &'static str,
        polls: u32,
        waited: Option<Duration>,
    },
    /// A check's query did not return one row with one boolean.
    #[error(
        "step `{step}` failed: a check must return one row with one boolean column, and `{query}` {shape}. Write it as a condition (`SELECT count(*) = 0 FROM …`), then `pgshift resume {plan}`"
    )]
    CheckShape {
        plan: String,
        step: String,
        query: String,
        shape: String,
    },
    /// After the last batch, rows of the range still need work.
    #[error(
        "step `{step}` failed: verify after the last batch: {missed} row(s) missed ({what} {missed}, expected 0). Either `set` does not make `where` false, or rows were written without the dual-write trigger; fix the plan or the data, then resume"
    )]
    VerifyFailed {
        step: String,
        missed: i64,
        what: String,
    },
    /// The runner no longer holds the plan's lock: its lock connection is gone, or
    /// another runner took the plan over (a newer run epoch). Nothing more was applied.
    #[error(
        "lost the lock of plan `{plan}` during step `{step}` ({why}); this runner applied no further batch"
    )]
    LockLost {
        plan: String,
        step: String,
        why: String,
    },
    /// The backfill's key cannot drive keyset batches.
    #[error("step `{step}` failed: {reason}")]
    UnusableKey { step: String, reason: String },
    /// `rollback` reached a step that has none.
    #[error(
        "step `{step}` failed: it has no rollback, so `pgshift rollback` stops here; the steps after it were rolled back. Undo it by hand if you must, then continue with a plan file that has its rollback and `pgshift rollback {plan} --accept-changed`"
    )]
    NoRollback { plan: String, step: String },
    /// `rollback` undid what it could and stopped at a step that has no rollback.
    #[error(
        "rollback of plan `{plan}` stopped at step `{step}`: the plan gives it no rollback, so pgshift cannot undo it, and it stays applied with every step before it that ran. Undone: {}. Still applied: {}. To go further, undo `{step}` by hand, or write its `rollback:` into the plan file and run `pgshift rollback {plan} --accept-changed`; to apply the undone steps again instead, run `pgshift resume {plan}`",
        names(undone),
        names(kept)
    )]
    RollbackStopped {
        plan: String,
        step: String,
        /// Rolled back by this run, latest first.
        undone: Vec<String>,
        /// Still applied: the step that stopped it, and those before it.
        kept: Vec<String>,
    },
    /// A `run` step (or `run:` rollback) failed, timed out, or could not start.
    #[error("step `{step}` failed: {message}")]
    Command { step: String, message: String },
    /// A phase hook (`before`/`after`) failed: it guards its phase.
    #[error("step `hook {hook}` failed: {message}")]
    Hook { hook: String, message: String },
    /// Something in pgshift itself went wrong (a worker task panicked).
    #[error("step `{step}` failed: {message}")]
    Internal { step: String, message: String },
    /// The pre-flight of the plan's operations found what would fail; nothing changed.
    #[error(
        "plan `{plan}` did not start: its pre-flight against the live catalog found:\n{}\nnothing was changed; fix these (or the plan), then run it again",
        findings.iter().map(|f| format!("  - {f}")).collect::<Vec<_>>().join("\n")
    )]
    Preflight { plan: String, findings: Vec<String> },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Db(#[from] db::Error),
}

/// `` `a`, `b` `` (or "none").
fn names(list: &[String]) -> String {
    if list.is_empty() {
        return "none".into();
    }
    list.iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The message of [`Error::PlanChanged`]: what changed, and what the operator may do.
fn changed(
    plan: &str,
    recorded: &str,
    current: &str,
    changes: &[String],
    ran: &[String],
    accepting: bool,
) -> String {
    let mut s = format!(
        "plan `{plan}` changed since it started (the control table recorded {recorded}, the file has {current}):"
    );
    for line in changes {
        s.push_str(&format!("\n  {line}"));
    }
    let names = ran
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if accepting {
        s.push_str(&format!(
            "\n--accept-changed is refused: {names} already ran with what the file said then; accepting would leave the database different from what the file now says, and resume does not run a step twice. If that is what you want, rerun with --accept-changed --force; otherwise restore the file, or roll the plan back first"
        ));
    } else if ran.is_empty() {
        s.push_str("\nreview the change; if it is intended, rerun with --accept-changed");
    } else {
        s.push_str(&format!(
            "\nreview the change: {names} already ran, so accepting it takes --accept-changed --force; otherwise restore the file"
        ));
    }
    s
}

impl Error {
    /// The step the failure belongs to, if it belongs to one.
    pub fn step(&self) -> Option<&str> {
        match self {
            Error::Cancelled { step }
            | Error::Gate { step, .. }
            | Error::Database { step, .. }
            | Error::StatementTimeout { step, .. }
            | Error::RowFailed { step, .. }
            | Error::TriggerFailures { step, .. }
            | Error::Drift { step, .. }
            | Error::ConnectionLost { step, .. }
            | Error::RetriesExhausted { step, .. }
            | Error::Reconnects { step, .. }
            | Error::CheckFalse { step, .. }
            | Error::CheckShape { step, .. }
            | Error::VerifyFailed { step, .. }
            | Error::LockLost { step, .. }
            | Error::UnusableKey { step, .. }
            | Error::NoRollback { step, .. }
            | Error::RollbackStopped { step, .. }
            | Error::Command { step, .. }
            | Error::Internal { step, .. } => Some(step),
            _ => None,
        }
    }

    /// A step failed (exit 1): `status` says which and why.
    pub fn is_step_failure(&self) -> bool {
        self.exit() == Exit::StepFailed && !matches!(self, Error::Db(_))
    }

    /// True when the connection to the server was lost (a reconnect may cure it).
    /// A lost plan lock counts: the runner re-takes the lock, or finds who holds it.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Error::ConnectionLost { .. } | Error::LockLost { .. } => true,
            Error::Db(e) | Error::Database { source: e, .. } => e.is_connection_lost(),
            _ => false,
        }
    }
}

impl Error {
    /// The server error underneath, if there is one (for its SQLSTATE).
    pub fn source_db(&self) -> Option<&db::Error> {
        match self {
            Error::Database { source, .. }
            | Error::ConnectionLost { source, .. }
            | Error::RetriesExhausted { source, .. } => Some(source),
            Error::StatementTimeout { source, .. } | Error::RowFailed { source, .. } => {
                Some(source)
            }
            Error::Db(e) => Some(e),
            _ => None,
        }
    }
}

/// The rows of failed dual writes that keep a plan from going on, for [`Error::TriggerFailures`].
#[derive(Debug)]
pub struct Unfixed {
    pub plan: String,
    /// What the rows prevent: "pass gate `x`", "enter its contract phase".
    pub at: String,
    pub total: usize,
    /// The first few, described.
    pub rows: Vec<String>,
    /// How many of them pgshift cannot evaluate again by itself.
    pub unchecked: usize,
    /// The control schema, quoted.
    pub control: String,
}

impl std::fmt::Display for Unfixed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plan = &self.plan;
        write!(
            f,
            "{} row(s) failed the dual-write trigger and are not fixed, so the plan cannot {}: {}",
            self.total,
            self.at,
            self.rows.join("; ")
        )?;
        if self.total > self.rows.len() {
            write!(f, "; and {} more", self.total - self.rows.len())?;
        }
        write!(
            f,
            ". Those rows were written without their new value. Fix each row so that the trigger's expression succeeds for it (an UPDATE of the row runs the trigger again), or delete it, then `pgshift resume {plan}`; `pgshift status {plan}` lists them all"
        )?;
        if self.unchecked > 0 {
            write!(
                f,
                ". pgshift cannot check {} of them again by itself; once they are fixed, mark them so: `UPDATE {}.trigger_failures SET resolved_at = now(), resolution = 'fixed by hand' WHERE plan_id = {} AND resolved_at IS NULL`",
                self.unchecked,
                self.control,
                crate::ident::quote_literal(plan)
            )?;
        }
        Ok(())
    }
}

/// What to add when the server says an object does not exist: the plan expected it.
fn missing_object(e: &db::Error) -> &'static str {
    match e.sqlstate() {
        // undefined_table, undefined_column, undefined_object, undefined_function
        Some("42P01" | "42703" | "42704" | "42883") => {
            ". The plan expected it to exist: if it did when the plan started, someone dropped or renamed it since"
        }
        _ => "",
    }
}

impl ExitStatus for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::LockHeld { .. } => Exit::Locked,
            Error::PlanChanged { .. } => Exit::PlanChanged,
            Error::Cancelled { .. }
            | Error::Gate { .. }
            | Error::ConnectionLost { .. }
            | Error::LockLost { .. } => Exit::Resumable,
            Error::Database { .. }
            | Error::StatementTimeout { .. }
            | Error::RowFailed { .. }
            | Error::TriggerFailures { .. }
            | Error::Drift { .. }
            | Error::RetriesExhausted { .. }
            | Error::Reconnects { .. }
            | Error::CheckFalse { .. }
            | Error::CheckShape { .. }
            | Error::VerifyFailed { .. }
            | Error::UnusableKey { .. }
            | Error::NoRollback { .. }
            | Error::RollbackStopped { .. }
            | Error::Command { .. }
            | Error::Hook { .. }
            | Error::Preflight { .. }
            | Error::Internal { .. } => Exit::StepFailed,
            Error::Usage(_) => Exit::Invalid,
            Error::Db(e) if e.is_connection_lost() => Exit::Resumable,
            Error::Db(_) => Exit::StepFailed,
        }
    }
}
