//! `contract-before-gate`: a contract step that changes something, with no
//! gate or check before it in the contract phase to confirm that the
//! application has moved on from what the step removes.

use super::Finding;
use crate::plan::{Phase, Plan, Step};

pub(super) fn check(plan: &Plan, step: &Step) -> Option<Finding> {
    if step.phase != Phase::Contract || step.kind.is_guard() {
        return None;
    }
    let guarded = plan
        .steps
        .iter()
        .take_while(|s| s.position < step.position)
        .any(|s| s.phase == Phase::Contract && s.kind.is_guard());
    (!guarded).then(|| Finding {
        pos: step.pos,
        rule: "contract-before-gate".into(),
        message: "contract step before any gate or check: it removes what the running application may still use, with nothing confirming the application has moved on".into(),
        help: Some("start the contract phase with a `gate:` (deploy the new application) and/or a `check:` (no rows left to migrate)".into()),
    })
}
