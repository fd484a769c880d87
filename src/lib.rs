//! pgshift: zero-downtime PostgreSQL schema changes from a YAML plan.
//!
//! The plan is validated whole before anything touches the database
//! (`plan`), then executed step by step (`exec`), each step by its kind
//! (`kind`) on the machinery of `engine`, with every step recorded in a
//! control schema (`control`) so that an interrupted run resumes exactly where
//! it stopped.
//!
//! The layers, each using only those below it:
//! - `cli`, `demo`: the command line, the only code that prints;
//! - `exec`: the runner, the plan's lock, hooks, rollback;
//! - `plan` (with `lint`), `show`: the validated plan and what is said of it,
//!   pure, touching no database;
//! - `kind`: one module per step kind (spec, parsing, pure SQL, execution);
//! - `engine`: the context, outcomes and errors, DDL under lock timeouts;
//! - `control`: the control schema; `db`: connections and error classes;
//! - `ident`, `duration`, `exit`: leaves.

pub mod bytes;
pub mod cli;
pub mod control;
pub mod db;
pub mod demo;
pub mod duration;
pub mod engine;
pub mod exec;
pub mod exit;
pub mod fleet;
pub mod ident;
pub mod kind;
pub mod ops;
pub mod plan;
pub mod show;
