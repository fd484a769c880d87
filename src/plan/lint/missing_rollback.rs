//! `missing-rollback`: a step before the contract phase whose undo the plan
//! must write (`sql`, `run`) has none, so `pgshift rollback` could not undo it
//! if a later step failed.

use super::Finding;
use crate::kind::Undo;
use crate::plan::{Phase, Step};

pub(super) fn check(step: &Step) -> Option<Finding> {
    let needs =
        step.kind.undo() == Undo::Plan && step.phase != Phase::Contract && step.rollback.is_none();
    needs.then(|| Finding {
        pos: step.pos,
        rule: "missing-rollback".into(),
        message: format!(
            "{} step in phase `{}` has no rollback: if a later step fails, `pgshift rollback` cannot undo this one",
            step.kind.name(),
            step.phase
        ),
        help: Some(
            "add `rollback:` with the SQL (or `run:` command) that undoes this step; steps before contract must be reversible"
                .into(),
        ),
    })
}
