//! pgshift: zero-downtime PostgreSQL schema changes from a YAML plan.
//!
//! The plan is validated whole before anything touches the database
//! (`plan`), then executed step by step (`exec`, `backfill`) with every step
//! recorded in a control schema (`control`) so that an interrupted run resumes
//! exactly where it stopped.

pub mod backfill;
pub mod cli;
pub mod control;
pub mod db;
pub mod demo;
pub mod exec;
pub mod exit;
pub mod fleet;
pub mod ident;
pub mod plan;
pub mod show;
