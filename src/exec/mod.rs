//! Executing a plan: the SQL each step kind runs, generated from the validated plan.

pub mod trigger;
