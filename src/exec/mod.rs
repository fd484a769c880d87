//! Executing a plan: the runner (sequencing, gates, resume, reconnects), the
//! plan's lock, the hooks, and rollback. Each step is run by its kind
//! (`crate::kind`) on the machinery of `crate::engine`; everything is recorded
//! in the control schema (`crate::control`).

pub mod catalog;
pub mod changed;
pub mod drift;
pub mod failures;
pub mod finalize;
pub mod hooks;
pub mod lock;
pub mod preflight;
pub mod rollback;
pub mod runner;

pub use crate::engine::{
    BackfillOverrides, BackfillProgress, Context, Error, Options, Outcome, Reporter, Silent, whoami,
};
