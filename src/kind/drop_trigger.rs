//! The `drop_trigger` step kind: removes the dual-write trigger (and its
//! function) that a `trigger` step of the same plan generated, named by that
//! step. Its statements are that trigger's rollback; its rollback re-creates it.

use crate::ident::parse_qualified;
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

use super::trigger::{self, TriggerSpec};

/// The kind's key in the plan file.
pub const KEY: &str = "drop_trigger";

/// The trigger goes once the application no longer needs both shapes kept in step.
pub const PHASES: &[Phase] = &[Phase::Contract];

/// Removal of a generated dual-write trigger, by the name of the step that made it.
#[derive(Debug, Clone)]
pub struct DropTriggerSpec {
    pub step: String,
    /// The trigger step's specification, so the drop can be undone by re-creating it.
    pub trigger: TriggerSpec,
}

/// Reads `drop_trigger: STEP`; the step is resolved once every step is read ([`resolve`]).
pub fn parse(r: &mut Reader, node: &Node) -> Option<DropTriggerSpec> {
    let step = r.string(node, "drop_trigger")?;
    Some(DropTriggerSpec {
        step,
        trigger: TriggerSpec {
            table: parse_qualified("unresolved").ok()?,
            set: vec![],
            reverse: vec![],
            when: None,
        },
    })
}

/// Fills in the spec of the trigger step it names, from the plan's trigger steps
/// (`(name, spec)`); `Err` with the names it could have meant.
pub fn resolve(d: &mut DropTriggerSpec, triggers: &[(String, TriggerSpec)]) -> Result<(), String> {
    match triggers.iter().find(|(n, _)| *n == d.step) {
        Some((_, t)) => {
            d.trigger = t.clone();
            Ok(())
        }
        None if triggers.is_empty() => {
            Err("the plan has no `trigger` step in dual_write to drop".to_string())
        }
        None => Err(format!(
            "name one of the plan's trigger steps: {}",
            triggers
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Drops the trigger and function of the named step.
pub fn statements(plan_id: &str, d: &DropTriggerSpec) -> Vec<String> {
    trigger::rollback_statements(plan_id, &d.step, &d.trigger)
}

/// Re-creates them.
pub fn rollback_statements(plan_id: &str, d: &DropTriggerSpec) -> Vec<String> {
    trigger::statements(plan_id, &d.step, &d.trigger)
}
