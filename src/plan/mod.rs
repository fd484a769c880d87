//! The validated plan: the only shape of a plan the rest of pgshift ever sees.
//!
//! `raw.rs` reads the YAML into a positioned tree; `validate.rs` walks it with
//! the toolkit of `read.rs`, each step kind (`crate::kind`) reading its own
//! body; `lint/` applies squawk's rules and pgshift's own; `sql.rs` splits and
//! classifies statements by parsing them. A `Plan` that exists has passed
//! every static check except the lint findings it was allowed, which travel
//! with it so that `show` can print them. Nothing here touches a database.

pub mod checksum;
pub mod created;
pub mod defaults;
pub mod diag;
pub mod lint;
pub mod locks;
pub mod phase;
pub mod raw;
pub mod read;
pub mod sql;
mod steps;
pub mod validate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::kind::run::Command;
pub use crate::kind::{Rollback, StepKind};
pub use diag::{Diagnostic, Error, Severity};
pub use phase::Phase;
pub use raw::Pos;
pub use sql::Statement;

/// Plan-wide settings, each overridable per step where it makes sense.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
    pub retries: u32,
    /// How long what the contract phase set aside is kept before finalize is due.
    pub retain: Option<Duration>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            lock_timeout: defaults::LOCK_TIMEOUT,
            statement_timeout: defaults::STATEMENT_TIMEOUT,
            retries: defaults::RETRIES,
            retain: None,
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
    /// The operations of `changes:`, as written.
    pub changes: Vec<crate::ops::Change>,
    /// Operations whose steps need the live catalog and are not in `steps` yet
    /// (validated offline); empty for a plan that can run.
    pub pending: Vec<String>,
    /// The file's text, to expand it again once the catalog is known.
    pub text: String,
    /// The plan with every operation expanded, as `plan expand` prints it.
    pub expanded: raw::Node,
}

impl Plan {
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.name == name)
    }

    /// True when the plan's operations read facts of the live catalog.
    pub fn needs_catalog(&self) -> bool {
        self.changes.iter().any(|c| c.op.needs_catalog())
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
    /// What the step is for; generated steps say which operation made them.
    pub description: Option<String>,
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
    /// What `pgshift finalize` runs to drop what this contract step set aside.
    pub finalize: Option<crate::kind::SqlBody>,
    /// Made by an operation of `changes:`: its findings point at that operation.
    pub generated: bool,
}

impl Step {
    /// True when no undo exists for this step and it changes something.
    pub fn is_irreversible(&self) -> bool {
        self.kind.undo() == crate::kind::Undo::Plan && self.rollback.is_none()
    }
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
