//! From the positioned YAML tree to a [`Plan`], collecting every error on the way.
//!
//! Each check reports with the position of the offending key or value, the step
//! it belongs to, what is wrong, and what would be valid. Nothing stops at the
//! first error: a plan author fixes the whole file in one pass. The body of each
//! step is read in `steps.rs` (its body by its kind, `crate::kind`); this
//! module reads the rest and puts the plan together.

use std::collections::BTreeMap;
use std::path::Path;

use super::raw::{self, Node, Pos, Value};
use super::read::Reader;
use super::steps::{check_names, resolve_drop_triggers, step};
use super::*;
use crate::kind::run;
use crate::ops::{self, Catalog};

/// Validates the text of a plan file read from `path`, with no catalog: the
/// operations of `changes:` that need one are left pending (see [`Plan::pending`]).
pub fn validate(path: &Path, text: &str) -> Result<Plan, Error> {
    validate_with(path, text, None)
}

/// Validates the text of a plan file, expanding its operations with `catalog`.
pub fn validate_with(path: &Path, text: &str, catalog: Option<&Catalog>) -> Result<Plan, Error> {
    let mut v = Reader::new(path.to_path_buf());
    let plan = plan(&mut v, path, text, catalog);
    let mut notes = Vec::new();
    if let Some(mut plan) = plan.filter(|_| !v.has_errors()) {
        for d in lint::lint(&plan) {
            if d.severity == Severity::Error {
                v.diags.push(d);
            } else {
                notes.push(d);
            }
        }
        if !v.has_errors() {
            plan.notes = notes;
            plan.notes.extend(v.diags);
            return Ok(plan);
        }
    }
    v.diags
        .sort_by_key(|d| (d.pos, d.severity == Severity::Warning));
    Err(Error::Invalid {
        file: path.to_path_buf(),
        diagnostics: v.diags,
    })
}

fn plan(r: &mut Reader, path: &Path, text: &str, catalog: Option<&Catalog>) -> Option<Plan> {
    let root = root(r, text)?;
    let top = top_level(r, &root);
    let id = plan_id(r, top.id, top.id_pos, path);
    let expansion = ops::expand(&id, &top.changes, catalog, has_gate(&top.written));
    for (pos, finding) in &expansion.refused {
        r.step = None;
        r.error(
            *pos,
            "operation",
            finding.clone(),
            Some(
                "change the operation as the message says, or write its steps by hand in `phases:`"
                    .into(),
            ),
        );
    }
    // Generated steps first in each phase, then the hand-written ones.
    let mut merged: PhaseNodes = BTreeMap::new();
    for g in &expansion.steps {
        merged
            .entry(g.phase)
            .or_default()
            .push(ops::to_node(g, g.pos));
    }
    for (phase, nodes) in top.written {
        merged.entry(phase).or_default().extend(nodes);
    }
    let generated: Vec<&str> = expansion.steps.iter().map(|g| g.name.as_str()).collect();
    let mut steps: Vec<Step> = Vec::new();
    for (phase, nodes) in &merged {
        for node in nodes {
            if let Some(mut step) = step(r, node, *phase, &top.settings, steps.len()) {
                step.generated = generated.contains(&step.name.as_str());
                steps.push(step);
            }
        }
    }
    if steps.is_empty() && expansion.pending.is_empty() && !r.has_errors() {
        r.error(
            root.pos,
            "empty",
            "the plan has no steps",
            Some("add at least one step under a phase, or an operation under `changes`".into()),
        );
    }
    check_names(r, &steps);
    resolve_drop_triggers(r, &mut steps);
    let expanded = expanded_tree(&root, &merged);
    Some(Plan {
        id,
        description: top.description,
        file: path.to_path_buf(),
        checksum: checksum::Checksum::of(text),
        settings: top.settings,
        hooks: top.hooks,
        steps,
        notes: Vec::new(),
        changes: top.changes,
        pending: expansion.pending,
        text: text.to_string(),
        expanded,
    })
}

/// The YAML tree of the file, or why there is none.
fn root(r: &mut Reader, text: &str) -> Option<Node> {
    // The same bound as a plan file's (`plan::read`), for text from anywhere else:
    // parsing and linting cost grows with it.
    if text.len() as u64 > MAX_PLAN_BYTES {
        r.error(
            Pos { line: 1, col: 1 },
            "file",
            format!(
                "the plan is {} bytes; a plan is limited to {MAX_PLAN_BYTES} bytes (is this the right file?)",
                text.len()
            ),
            None,
        );
        return None;
    }
    let root = match raw::parse(text) {
        Ok(n) => n,
        Err(e) => {
            let help = yaml_help(&e.message);
            r.error(
                e.pos,
                "yaml",
                format!("not valid YAML: {}", e.message),
                Some(help),
            );
            return None;
        }
    };
    if matches!(root.value, Value::Null) {
        r.error(
            Pos { line: 1, col: 1 },
            "empty",
            "the plan file is empty",
            Some("a plan needs `phases:` with at least one step, or `changes:`".into()),
        );
        return None;
    }
    Some(root)
}

/// The top-level keys of a plan, read.
struct Top {
    id: Option<String>,
    id_pos: Pos,
    description: Option<String>,
    settings: Settings,
    hooks: Hooks,
    written: PhaseNodes,
    changes: Vec<ops::Change>,
}

fn top_level(r: &mut Reader, root: &Node) -> Top {
    let mut top = Top {
        id: None,
        id_pos: Pos { line: 1, col: 1 },
        description: None,
        settings: Settings::default(),
        hooks: Hooks::default(),
        written: BTreeMap::new(),
        changes: Vec::new(),
    };
    let mut saw_phases = false;
    let mut saw_changes = false;
    let entries = r.entries(
        root,
        "the plan",
        &[
            "id",
            "description",
            "settings",
            "hooks",
            "changes",
            "phases",
        ],
    );
    // Settings first: steps inherit them wherever `settings` is written.
    let ordered = entries
        .iter()
        .filter(|e| e.0 == "settings")
        .chain(entries.iter().filter(|e| e.0 != "settings"));
    for (key, _, val) in ordered {
        let val = *val;
        match key.as_str() {
            "id" => {
                top.id_pos = val.pos;
                top.id = r.string(val, "id");
            }
            "description" => top.description = r.string(val, "description"),
            "settings" => read_settings(r, val, &mut top.settings),
            "hooks" => top.hooks = read_hooks(r, val),
            "changes" => {
                saw_changes = true;
                top.changes = ops::parse(r, val);
            }
            "phases" => {
                saw_phases = true;
                top.written = phase_nodes(r, val);
            }
            _ => {}
        }
    }
    if !saw_phases && !saw_changes && matches!(root.value, Value::Map(_)) {
        r.error(
            root.pos,
            "missing",
            "the plan has no `phases` and no `changes`",
            Some(
                "add `changes:` with an operation, or `phases:` with at least one of expand, dual_write, backfill, contract".into(),
            ),
        );
    }
    top
}

/// The plan's id: `id:`, else the file's name; an error when it is not one.
fn plan_id(r: &mut Reader, id: Option<String>, pos: Pos, path: &Path) -> String {
    let id = match id {
        Some(id) => id,
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    if !is_plan_id(&id) {
        r.step = None;
        r.error(pos, "id", format!("plan id `{id}` is not valid"), Some("an id has 1–63 characters: letters, digits, `_`, `-`, `.`; set `id:` in the file when the file name is not one".into()));
    }
    id
}

/// The steps of each phase, as nodes of the YAML tree.
type PhaseNodes = BTreeMap<Phase, Vec<Node>>;

/// True when a hand-written gate stops the plan before its contract phase.
fn has_gate(written: &PhaseNodes) -> bool {
    written
        .iter()
        .filter(|(p, _)| **p < Phase::Contract)
        .flat_map(|(_, nodes)| nodes)
        .any(|n| match &n.value {
            Value::Map(entries) => entries
                .iter()
                .any(|(k, _)| matches!(&k.value, Value::Str(s) if s == "gate")),
            _ => false,
        })
}

/// The plan as `plan expand` prints it: the same keys, no `changes`, and every
/// phase with its generated steps before its hand-written ones.
fn expanded_tree(root: &Node, merged: &PhaseNodes) -> Node {
    let key = |s: &str| Node {
        pos: root.pos,
        value: Value::Str(s.to_string()),
    };
    let mut entries = Vec::new();
    if let Value::Map(top) = &root.value {
        for (k, v) in top {
            match &k.value {
                Value::Str(s) if s == "changes" || s == "phases" => {}
                _ => entries.push((k.clone(), v.clone())),
            }
        }
    }
    let phases = merged
        .iter()
        .map(|(p, nodes)| {
            (
                key(p.as_str()),
                Node {
                    pos: root.pos,
                    value: Value::Seq(nodes.clone()),
                },
            )
        })
        .collect();
    entries.push((
        key("phases"),
        Node {
            pos: root.pos,
            value: Value::Map(phases),
        },
    ));
    Node {
        pos: root.pos,
        value: Value::Map(entries),
    }
}

/// The plan's `settings`, which every step inherits.
fn read_settings(r: &mut Reader, node: &Node, settings: &mut Settings) {
    let val = node;
    for (key, _, val) in r.entries(
        val,
        "settings",
        &["lock_timeout", "statement_timeout", "retries", "retain"],
    ) {
        match key.as_str() {
            "retain" => settings.retain = r.duration(val, "retain"),
            "lock_timeout" => {
                if let Some(d) = r.duration(val, "lock_timeout") {
                    if d.is_zero() {
                        r.error(val.pos, "range", "lock_timeout 0 means wait forever: every application query could queue behind a DDL", Some("use a short timeout such as `500ms`; pgshift retries".into()));
                    }
                    settings.lock_timeout = d;
                }
            }
            "statement_timeout" => {
                if let Some(d) = r.duration(val, "statement_timeout") {
                    settings.statement_timeout = d;
                }
            }
            "retries" => {
                if let Some(n) = r.integer(val, "retries", 0, 1000) {
                    settings.retries = n as u32;
                }
            }
            _ => {}
        }
    }
}

/// The `phases` map: each phase's list of steps, in execution order.
fn phase_nodes(r: &mut Reader, node: &Node) -> PhaseNodes {
    let names: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
    let mut last: Option<Phase> = None;
    let mut out = BTreeMap::new();
    for (key, kn, list) in r.entries(node, "phases", &names) {
        let phase = Phase::parse(&key).expect("filtered by entries");
        if let Some(l) = last.filter(|l| *l > phase) {
            r.warning(kn.pos, "phase-order", format!("phase `{phase}` is written after `{l}` but runs before it"), Some("phases always run expand → dual_write → backfill → contract; write them in that order".into()));
        }
        last = Some(phase);
        match &list.value {
            Value::Seq(items) => {
                out.insert(phase, items.clone());
            }
            Value::Null => {}
            other => r.error(
                list.pos,
                "type",
                format!(
                    "phase `{phase}` must be a list of steps (`- name: …`), not {}",
                    other.describe()
                ),
                None,
            ),
        }
    }
    out
}

fn read_hooks(r: &mut Reader, node: &Node) -> Hooks {
    let mut hooks = Hooks::default();
    for (key, _, val) in r.entries(
        node,
        "hooks",
        &["on_gate", "on_failure", "on_success", "before", "after"],
    ) {
        match key.as_str() {
            "on_gate" => hooks.on_gate = run::parse_commands(r, val, "hook `on_gate`"),
            "on_failure" => hooks.on_failure = run::parse_commands(r, val, "hook `on_failure`"),
            "on_success" => hooks.on_success = run::parse_commands(r, val, "hook `on_success`"),
            "before" | "after" => {
                let names: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
                for (phase, _, cmd) in r.entries(val, &format!("hooks.{key}"), &names) {
                    let phase = Phase::parse(&phase).expect("filtered");
                    let cmds = run::parse_commands(r, cmd, &format!("hook `{key}.{phase}`"));
                    if key == "before" {
                        hooks.before.insert(phase, cmds);
                    } else {
                        hooks.after.insert(phase, cmds);
                    }
                }
            }
            _ => {}
        }
    }
    hooks
}

/// What to do about a YAML error, by what the parser said.
fn yaml_help(message: &str) -> String {
    if message.contains("appears twice") {
        "remove one of the two: YAML keeps a single value per key, and pgshift will not guess which one you meant".into()
    } else if message.contains("nested") || message.contains("alias") {
        "a plan is shallow: `phases:` → phase → list of steps → the step's keys; write it out without deep nesting or aliases".into()
    } else if message.contains("tab") {
        "indent with spaces: YAML does not allow tabs for indentation".into()
    } else {
        "check the indentation and quoting at this line; a plan is one YAML document, a map with `id`, `description`, `settings`, `hooks` and `phases`".into()
    }
}

fn is_plan_id(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_over_the_plan_size_limit_is_refused_before_parsing() {
        let text = format!("id: big\n#{}\n", "x".repeat(MAX_PLAN_BYTES as usize));
        let Err(Error::Invalid { diagnostics, .. }) = validate(Path::new("big.yaml"), &text) else {
            panic!("a plan over the limit was accepted")
        };
        assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
        let d = &diagnostics[0];
        assert_eq!((d.pos.line, d.pos.col, d.rule.as_str()), (1, 1, "file"));
        assert!(
            d.message.contains("a plan is limited to 1048576 bytes"),
            "{}",
            d.message
        );
    }
}
