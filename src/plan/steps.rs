//! Reading one step of a plan: its name, its one kind (read by `crate::kind`),
//! its rollback, limits and acknowledged lint rules; then the checks across
//! steps (unique names, the triggers a `drop_trigger` names).

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::raw::{Node, Pos, Value};
use super::read::{Reader, suggest};
use super::*;
use crate::kind::{ParseCx, Undo, drop_trigger, run, sql};

/// Keys a step may have besides its kind key.
const STEP_KEYS: [&str; 8] = [
    "rollback",
    "finalize",
    "lock_timeout",
    "statement_timeout",
    "retries",
    "timeout",
    "allow",
    "description",
];

/// Every key a step may have: its name, one kind key, and the rest.
fn step_keys() -> Vec<&'static str> {
    let mut keys = vec!["name"];
    keys.extend(StepKind::KEYS);
    keys.extend(STEP_KEYS);
    keys
}

pub(super) fn step(
    r: &mut Reader,
    node: &Node,
    phase: Phase,
    settings: &Settings,
    position: usize,
) -> Option<Step> {
    r.step = None;
    // Find the name first so that every error below names the step.
    if let Value::Map(entries) = &node.value {
        for (k, v) in entries {
            if matches!(&k.value, Value::Str(s) if s == "name")
                && let Value::Str(n) = &v.value
            {
                r.step = Some(n.clone());
            }
        }
    }
    let entries = r.entries(node, &format!("a step of phase `{phase}`"), &step_keys());
    if !matches!(node.value, Value::Map(_)) {
        return None;
    }
    let errors_before = r.error_count();
    let mut name = None;
    let mut kinds: Vec<(&str, &Node, &Node)> = Vec::new();
    let mut rollback_node = None;
    let mut description = None;
    let mut finalize = None;
    let mut lock_timeout = settings.lock_timeout;
    let mut statement_timeout = settings.statement_timeout;
    let mut retries = settings.retries;
    let mut timeout = None;
    let mut allow = BTreeMap::new();
    for (key, k, val) in &entries {
        match key.as_str() {
            "name" => name = read_name(r, val),
            "description" => description = r.string(val, "description"),
            "finalize" => {
                if phase != Phase::Contract {
                    r.error(
                        k.pos,
                        "phase",
                        "`finalize` belongs to a contract step: it drops what that step set aside",
                        Some("move the step into phase `contract`, or remove `finalize`".into()),
                    );
                }
                finalize = sql::parse_body(r, val, "finalize");
            }
            k2 if StepKind::KEYS.contains(&k2) => {
                let kk = StepKind::KEYS
                    .iter()
                    .find(|x| **x == k2)
                    .copied()
                    .unwrap_or("sql");
                kinds.push((kk, k, val));
            }
            "rollback" => rollback_node = Some((k.pos, *val)),
            "lock_timeout" => {
                if let Some(d) = r.duration(val, "lock_timeout") {
                    if d.is_zero() {
                        r.error(val.pos, "range", "lock_timeout 0 means wait forever: every application query could queue behind this step", Some("use a short timeout such as `500ms`; pgshift retries".into()));
                    }
                    lock_timeout = d;
                }
            }
            "statement_timeout" => {
                if let Some(d) = r.duration(val, "statement_timeout") {
                    statement_timeout = d;
                }
            }
            "retries" => {
                if let Some(n) = r.integer(val, "retries", 0, 1000) {
                    retries = n as u32;
                }
            }
            "timeout" => timeout = r.duration(val, "timeout"),
            "allow" => allow = read_allow(r, val),
            _ => {}
        }
    }
    if name.is_none() {
        r.error(
            node.pos,
            "missing",
            format!("a step of phase `{phase}` has no `name`"),
            Some("give every step a unique snake_case `name:`".into()),
        );
    }
    let kind = one_kind(r, node, &kinds, phase, timeout);
    let rollback = step_rollback(r, rollback_node, kind.as_ref());
    if r.error_count() > errors_before {
        return None;
    }
    Some(Step {
        description,
        finalize,
        generated: false,
        name: name?,
        phase,
        position,
        kind: kind?,
        rollback,
        lock_timeout,
        statement_timeout,
        retries,
        timeout,
        allow,
        pos: node.pos,
    })
}

/// A step's `name`: snake_case, so it reads well in the control table and in commands.
fn read_name(r: &mut Reader, val: &Node) -> Option<String> {
    if let Some(n) = r.string(val, "step name") {
        if !is_step_name(&n) {
            let example = snake_case(&n);
            let example = if is_step_name(&example) {
                example
            } else {
                "add_email_hash".into()
            };
            r.error(val.pos, "name", format!("step name `{n}` is not snake_case"), Some(format!("a step name has 1–63 characters: lower-case letters, digits and `_`, starting with a letter (e.g. `{example}`)")));
        }
        return Some(n);
    }
    None
}

/// The step's one kind key, read by its kind; an error for none or several.
fn one_kind(
    r: &mut Reader,
    node: &Node,
    kinds: &[(&str, &Node, &Node)],
    phase: Phase,
    timeout: Option<Duration>,
) -> Option<StepKind> {
    match kinds {
        [] => {
            r.error(
                node.pos,
                "kind",
                "the step has no kind key",
                Some(format!(
                    "give it exactly one of: {}",
                    StepKind::KEYS.join(", ")
                )),
            );
            None
        }
        [(key, k, val)] => read_kind(r, key, k, val, phase, timeout),
        [_, (second, k, _), ..] => {
            let all: Vec<&str> = kinds.iter().map(|k| k.0).collect();
            r.error(
                k.pos,
                "kind",
                format!(
                    "the step has {} kind keys ({}); a step does exactly one thing",
                    all.len(),
                    all.join(", ")
                ),
                Some(format!(
                    "split it into one step per kind; `{second}` starts here"
                )),
            );
            None
        }
    }
}

/// The step's `rollback`, refused where the kind has none or generates its own.
fn step_rollback(
    r: &mut Reader,
    rollback_node: Option<(Pos, &Node)>,
    kind: Option<&StepKind>,
) -> Option<Rollback> {
    match (rollback_node, kind.map(StepKind::undo)) {
        (None, _) => None,
        (Some((at, _)), Some(Undo::Nothing)) => {
            r.error(
                at,
                "rollback",
                "a check or gate step changes nothing, so it has no rollback",
                Some("remove `rollback` from this step".into()),
            );
            None
        }
        (Some((at, _)), Some(Undo::Generated)) => {
            r.error(at, "rollback", "trigger steps get a generated rollback", Some("remove `rollback`: pgshift drops (or re-creates) the trigger and function itself".into()));
            None
        }
        (Some((_, node)), _) => rollback(r, node),
    }
}

fn read_allow(r: &mut Reader, node: &Node) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (rule, k, reason) in r.entries(node, "allow", &[]) {
        if !lint::is_known_rule(&rule) {
            let known = lint::known_rules();
            let help = match suggest(&rule, &known.iter().map(|s| s.as_str()).collect::<Vec<_>>()) {
                Some(s) => format!(
                    "did you mean `{s}`? rules are squawk's (https://squawkhq.com/docs/rules) and pgshift's: {}",
                    lint::PGSHIFT_RULES.join(", ")
                ),
                None => format!(
                    "rules are squawk's (https://squawkhq.com/docs/rules) and pgshift's: {}",
                    lint::PGSHIFT_RULES.join(", ")
                ),
            };
            r.error(
                k.pos,
                "allow",
                format!("`{rule}` is not a lint rule"),
                Some(help),
            );
            continue;
        }
        match r.string(reason, &format!("the reason for allowing `{rule}`")) {
            Some(r) => {
                out.insert(rule, r);
            }
            None => {
                if let Some(last) = r.diags.last_mut() {
                    last.help = Some(format!(
                        "write why `{rule}` is safe here: `{rule}: \"the table is new and empty\"`"
                    ));
                }
            }
        }
    }
    out
}

fn rollback(r: &mut Reader, node: &Node) -> Option<Rollback> {
    match &node.value {
        Value::Str(_) => sql::parse_body(r, node, "rollback").map(Rollback::Sql),
        Value::Map(_) => {
            let entries = r.entries(node, "rollback", &["sql", "run"]);
            match entries.as_slice() {
                [(k, _, val)] if k == "sql" => {
                    sql::parse_body(r, val, "rollback").map(Rollback::Sql)
                }
                [(_, _, val)] => {
                    run::parse_command(r, val, "rollback command", defaults::RUN_TIMEOUT)
                        .map(Rollback::Run)
                }
                [] => {
                    r.error(node.pos, "rollback", "rollback needs `sql` or `run`", None);
                    None
                }
                _ => {
                    r.error(
                        node.pos,
                        "rollback",
                        "rollback has both `sql` and `run`; give one",
                        None,
                    );
                    None
                }
            }
        }
        other => {
            r.error(
                node.pos,
                "type",
                format!(
                    "rollback must be SQL (a string) or a map with `sql` or `run`, not {}",
                    other.describe()
                ),
                None,
            );
            None
        }
    }
}

fn read_kind(
    r: &mut Reader,
    kind: &str,
    key: &Node,
    val: &Node,
    phase: Phase,
    timeout: Option<Duration>,
) -> Option<StepKind> {
    let allowed = StepKind::phases(kind);
    if !allowed.contains(&phase) {
        r.error(
            key.pos,
            "phase",
            format!(
                "a `{kind}` step belongs in phase `{}`, not `{phase}`",
                allowed[0]
            ),
            Some(
                "phases run expand → dual_write → backfill → contract; each kind has its place"
                    .into(),
            ),
        );
        return None;
    }
    StepKind::parse(kind, r, val, ParseCx { phase, timeout })
}

/// Names are unique, and reported at the second use with a pointer to the first.
pub(super) fn check_names(r: &mut Reader, steps: &[Step]) {
    let mut seen: HashMap<&str, Pos> = HashMap::new();
    for s in steps {
        if let Some(first) = seen.get(s.name.as_str()) {
            r.step = Some(s.name.clone());
            r.error(
                s.pos,
                "duplicate",
                format!(
                    "step name `{}` is used twice (first at line {})",
                    s.name, first.line
                ),
                Some("step names identify steps in the control table; make each unique".into()),
            );
        } else {
            seen.insert(&s.name, s.pos);
        }
    }
}

pub(super) fn resolve_drop_triggers(r: &mut Reader, steps: &mut [Step]) {
    let triggers: Vec<(String, crate::kind::TriggerSpec)> = steps
        .iter()
        .filter_map(|s| match &s.kind {
            StepKind::Trigger(t) => Some((s.name.clone(), t.clone())),
            _ => None,
        })
        .collect();
    for s in steps.iter_mut() {
        if let StepKind::DropTrigger(d) = &mut s.kind
            && let Err(help) = drop_trigger::resolve(d, &triggers)
        {
            r.step = Some(s.name.clone());
            r.error(
                s.pos,
                "drop-trigger",
                format!(
                    "`drop_trigger: {}` names no trigger step of this plan",
                    d.step
                ),
                Some(help),
            );
        }
    }
}

/// `Add-Email Hash` as `add_email_hash`, to suggest a valid step name.
fn snake_case(n: &str) -> String {
    let mut out = String::new();
    for c in n.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out.trim_matches('_').chars().take(63).collect()
}

fn is_step_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.starts_with(|c: char| c.is_ascii_lowercase())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}
