//! The operations of `changes:`: the common schema changes, each expanded into
//! the ordinary steps of the four phases that make it safely.
//!
//! An operation never executes anything. It is a pure function from its spec
//! (and, for the operations that need them, facts of the live catalog: see
//! [`catalog`]) to steps, built as nodes of the plan's YAML tree with stable
//! generated names. They join the hand-written steps of their phase (generated
//! ones first) before validation, so they go through every check, lint rule
//! and guarantee that a hand-written step does; `plan expand` prints them as a
//! plan of their own (see [`yaml`]).
//!
//! The rules every operation keeps: both application versions keep working
//! between any two steps until the gate; no statement holds ACCESS EXCLUSIVE
//! while it scans or rewrites a table (NOT NULL goes through a validated CHECK,
//! constraints `NOT VALID` then `VALIDATE`, indexes `CONCURRENTLY`); what the
//! contract phase removes is set aside, not dropped, until `pgshift finalize`;
//! and one expression is written once.

pub mod catalog;
pub mod expr;
pub mod yaml;

mod add_check;
mod add_column;
mod add_foreign_key;
mod add_unique;
mod change_type;
mod common;
mod create_index;
mod create_table;
mod drop_column;
mod drop_constraint;
mod drop_default;
mod drop_index;
mod drop_not_null;
mod drop_table;
mod raw_sql;
mod rename_column;
mod rename_table;
mod set_default;
mod set_not_null;
mod twin;

use crate::ident::{Ident, QualifiedName, quote_ident};
use crate::plan::phase::Phase;
use crate::plan::raw::{Node, Pos, Value};
use crate::plan::read::{Reader, suggest};
pub use catalog::Catalog;
pub use change_type::Spec as ChangeTypeSpec;

/// One entry of `changes:`.
#[derive(Debug, Clone)]
pub struct Change {
    /// 1-based position in `changes:`, part of every generated step's name.
    pub index: usize,
    pub pos: Pos,
    pub op: Op,
    /// A requirement on the new application version, added to the generated gate.
    pub deploy: Option<String>,
    /// Lint rules acknowledged for every step the operation generates, with the reason.
    pub allow: Vec<(String, String)>,
    /// `batch_size`, `workers` and `throttle` for the backfills it generates, as
    /// written (checked with the backfill they join).
    pub backfill: Vec<(Node, Node)>,
}

/// The operations, each named after its key in the plan file.
#[derive(Debug, Clone)]
pub enum Op {
    AddColumn(add_column::Spec),
    DropColumn(drop_column::Spec),
    RenameColumn(rename_column::Spec),
    ChangeType(change_type::Spec),
    SetNotNull(set_not_null::Spec),
    DropNotNull(drop_not_null::Spec),
    SetDefault(set_default::Spec),
    DropDefault(drop_default::Spec),
    AddCheck(add_check::Spec),
    AddUnique(add_unique::Spec),
    AddForeignKey(add_foreign_key::Spec),
    DropConstraint(drop_constraint::Spec),
    CreateIndex(create_index::Spec),
    DropIndex(drop_index::Spec),
    CreateTable(create_table::Spec),
    DropTable(drop_table::Spec),
    RenameTable(rename_table::Spec),
    Sql(raw_sql::Spec),
}

/// Every operation key, in the order the docs list them.
pub const KEYS: [&str; 18] = [
    "add_column",
    "drop_column",
    "rename_column",
    "change_type",
    "set_not_null",
    "drop_not_null",
    "set_default",
    "drop_default",
    "add_check",
    "add_unique",
    "add_foreign_key",
    "drop_constraint",
    "create_index",
    "drop_index",
    "create_table",
    "drop_table",
    "rename_table",
    "sql",
];

impl Op {
    /// The operation's key in the plan file.
    pub fn key(&self) -> &'static str {
        match self {
            Op::AddColumn(_) => "add_column",
            Op::DropColumn(_) => "drop_column",
            Op::RenameColumn(_) => "rename_column",
            Op::ChangeType(_) => "change_type",
            Op::SetNotNull(_) => "set_not_null",
            Op::DropNotNull(_) => "drop_not_null",
            Op::SetDefault(_) => "set_default",
            Op::DropDefault(_) => "drop_default",
            Op::AddCheck(_) => "add_check",
            Op::AddUnique(_) => "add_unique",
            Op::AddForeignKey(_) => "add_foreign_key",
            Op::DropConstraint(_) => "drop_constraint",
            Op::CreateIndex(_) => "create_index",
            Op::DropIndex(_) => "drop_index",
            Op::CreateTable(_) => "create_table",
            Op::DropTable(_) => "drop_table",
            Op::RenameTable(_) => "rename_table",
            Op::Sql(_) => "sql",
        }
    }

    /// The table the operation works on (none for `sql`, `drop_index`, `create_table`).
    pub fn table(&self) -> Option<&QualifiedName> {
        match self {
            Op::AddColumn(s) => Some(&s.table),
            Op::DropColumn(s) => Some(&s.table),
            Op::RenameColumn(s) => Some(&s.table),
            Op::ChangeType(s) => Some(&s.table),
            Op::SetNotNull(s) => Some(&s.table),
            Op::DropNotNull(s) => Some(&s.table),
            Op::SetDefault(s) => Some(&s.table),
            Op::DropDefault(s) => Some(&s.table),
            Op::AddCheck(s) => Some(&s.table),
            Op::AddUnique(s) => Some(&s.table),
            Op::AddForeignKey(s) => Some(&s.table),
            Op::DropConstraint(s) => Some(&s.table),
            Op::CreateIndex(s) => Some(&s.table),
            Op::DropTable(s) => Some(&s.table),
            Op::RenameTable(s) => Some(&s.table),
            Op::DropIndex(_) | Op::CreateTable(_) | Op::Sql(_) => None,
        }
    }

    /// True when the expansion reads facts of the live catalog.
    pub fn needs_catalog(&self) -> bool {
        match self {
            Op::RenameColumn(_)
            | Op::ChangeType(_)
            | Op::SetDefault(_)
            | Op::DropDefault(_)
            | Op::AddForeignKey(_)
            | Op::DropConstraint(_)
            | Op::DropIndex(_)
            | Op::RenameTable(_) => true,
            Op::AddColumn(_)
            | Op::DropColumn(_)
            | Op::SetNotNull(_)
            | Op::DropNotNull(_)
            | Op::AddCheck(_)
            | Op::AddUnique(_)
            | Op::CreateIndex(_)
            | Op::CreateTable(_)
            | Op::DropTable(_)
            | Op::Sql(_) => false,
        }
    }

    /// A short description: `add_column orders.status`.
    pub fn summary(&self) -> String {
        let target = match self {
            Op::AddColumn(s) => format!("{}.{}", s.table, s.column.quoted()),
            Op::DropColumn(s) => format!("{}.{}", s.table, s.column.quoted()),
            Op::RenameColumn(s) => {
                format!("{}.{} to {}", s.table, s.column.quoted(), s.to.quoted())
            }
            Op::ChangeType(s) => format!("{}.{} to {}", s.table, s.column.quoted(), s.type_sql),
            Op::SetNotNull(s) => format!("{}.{}", s.table, s.column.quoted()),
            Op::DropNotNull(s) => format!("{}.{}", s.table, s.column.quoted()),
            Op::SetDefault(s) => format!("{}.{}", s.table, s.column.quoted()),
            Op::DropDefault(s) => format!("{}.{}", s.table, s.column.quoted()),
            Op::AddCheck(s) => format!("{} {}", s.table, s.name.quoted()),
            Op::AddUnique(s) => format!("{} {}", s.table, s.name.quoted()),
            Op::AddForeignKey(s) => format!("{} {}", s.table, s.name.quoted()),
            Op::DropConstraint(s) => format!("{} {}", s.table, s.name.quoted()),
            Op::CreateIndex(s) => format!("{} {}", s.table, s.name.quoted()),
            Op::DropIndex(s) => s.name.to_string(),
            Op::CreateTable(s) => s.table.to_string(),
            Op::DropTable(s) => s.table.to_string(),
            Op::RenameTable(s) => format!("{} to {}", s.table, s.to.quoted()),
            Op::Sql(_) => "sql".to_string(),
        };
        format!("{} {target}", self.key())
    }
}

/// Reads `changes:`: a list of one-key maps, each an operation and its spec.
pub fn parse(r: &mut Reader, node: &Node) -> Vec<Change> {
    let Value::Seq(items) = &node.value else {
        if !matches!(node.value, Value::Null) {
            r.error(
                node.pos,
                "type",
                format!(
                    "`changes` must be a list of operations (`- add_column: {{ … }}`), not {}",
                    node.value.describe()
                ),
                Some(format!("operations: {}", KEYS.join(", "))),
            );
        }
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        r.step = Some(format!("changes[{}]", i + 1));
        if let Some(change) = parse_one(r, item, i + 1) {
            out.push(change);
        }
    }
    r.step = None;
    out
}

fn parse_one(r: &mut Reader, item: &Node, index: usize) -> Option<Change> {
    let Value::Map(entries) = &item.value else {
        r.error(
            item.pos,
            "type",
            format!(
                "an entry of `changes` must be a map with one operation key, not {}",
                item.value.describe()
            ),
            Some(format!("operations: {}", KEYS.join(", "))),
        );
        return None;
    };
    let mut deploy = None;
    let mut allow = Vec::new();
    let mut backfill = Vec::new();
    let mut found: Option<(&str, &Node, &Node)> = None;
    for (k, v) in entries {
        let Value::Str(key) = &k.value else {
            r.error(k.pos, "type", "an operation's key must be a name", None);
            return None;
        };
        if key == "deploy" {
            deploy = r.string(v, "deploy");
            continue;
        }
        if key == "backfill" {
            for (_, k, v) in r.entries(v, "backfill", &["batch_size", "workers", "throttle"]) {
                backfill.push((k.clone(), v.clone()));
            }
            continue;
        }
        if key == "allow" {
            for (rule, _, reason) in r.entries(v, "allow", &[]) {
                if let Some(why) = r.string(reason, &format!("the reason for allowing `{rule}`")) {
                    allow.push((rule, why));
                }
            }
            continue;
        }
        let Some(known) = KEYS.iter().find(|x| **x == key.as_str()) else {
            let help = match suggest(key, &KEYS) {
                Some(s) => format!("did you mean `{s}`? operations: {}", KEYS.join(", ")),
                None => format!("operations: {}", KEYS.join(", ")),
            };
            r.error(
                k.pos,
                "unknown-key",
                format!("unknown operation `{key}`"),
                Some(help),
            );
            return None;
        };
        if let Some((first, _, _)) = found {
            r.error(
                k.pos,
                "kind",
                format!(
                    "this entry has two operations (`{first}` and `{key}`); write one per entry"
                ),
                Some("split it into two entries of `changes`".into()),
            );
            return None;
        }
        found = Some((known, k, v));
    }
    let Some((key, k, v)) = found else {
        r.error(
            item.pos,
            "kind",
            "this entry of `changes` has no operation",
            Some(format!("give it one of: {}", KEYS.join(", "))),
        );
        return None;
    };
    let op = match key {
        "add_column" => add_column::parse(r, v).map(Op::AddColumn),
        "drop_column" => drop_column::parse(r, v).map(Op::DropColumn),
        "rename_column" => rename_column::parse(r, v).map(Op::RenameColumn),
        "change_type" => change_type::parse(r, v).map(Op::ChangeType),
        "set_not_null" => set_not_null::parse(r, v).map(Op::SetNotNull),
        "drop_not_null" => drop_not_null::parse(r, v).map(Op::DropNotNull),
        "set_default" => set_default::parse(r, v).map(Op::SetDefault),
        "drop_default" => drop_default::parse(r, v).map(Op::DropDefault),
        "add_check" => add_check::parse(r, v).map(Op::AddCheck),
        "add_unique" => add_unique::parse(r, v).map(Op::AddUnique),
        "add_foreign_key" => add_foreign_key::parse(r, v).map(Op::AddForeignKey),
        "drop_constraint" => drop_constraint::parse(r, v).map(Op::DropConstraint),
        "create_index" => create_index::parse(r, v).map(Op::CreateIndex),
        "drop_index" => drop_index::parse(r, v).map(Op::DropIndex),
        "create_table" => create_table::parse(r, v).map(Op::CreateTable),
        "drop_table" => drop_table::parse(r, v).map(Op::DropTable),
        "rename_table" => rename_table::parse(r, v).map(Op::RenameTable),
        _ => raw_sql::parse(r, v).map(Op::Sql),
    }?;
    let _ = k;
    Some(Change {
        index,
        pos: item.pos,
        op,
        deploy,
        allow,
        backfill,
    })
}

/// What a step that an operation generates does.
#[derive(Debug, Clone)]
pub enum GenKind {
    Sql(String),
    Trigger {
        table: QualifiedName,
        set: Vec<(Ident, String)>,
        reverse: Vec<(Ident, String)>,
    },
    Backfill {
        table: QualifiedName,
        set: Vec<(Ident, String)>,
        where_: Option<String>,
    },
    Check(String),
    Gate(String),
    DropTrigger(String),
}

/// A step an operation generates.
#[derive(Debug, Clone)]
pub struct GenStep {
    pub phase: Phase,
    /// Where the operation that made it is written in the plan file.
    pub pos: Pos,
    pub name: String,
    pub description: String,
    pub kind: GenKind,
    pub rollback: Option<String>,
    pub finalize: Option<String>,
    pub allow: Vec<(String, String)>,
    /// Keys the operation's `backfill:` adds to a generated backfill.
    pub backfill: Vec<(Node, Node)>,
}

impl GenStep {
    pub fn rollback(mut self, sql: impl Into<String>) -> GenStep {
        self.rollback = Some(sql.into());
        self
    }

    pub fn finalize(mut self, sql: impl Into<String>) -> GenStep {
        self.finalize = Some(sql.into());
        self
    }

    pub fn allow(mut self, rule: &str, reason: impl Into<String>) -> GenStep {
        self.allow.push((rule.to_string(), reason.into()));
        self
    }
}

/// Why an operation cannot be expanded.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// It needs the live catalog, which is not at hand (offline validation).
    NeedsCatalog,
    /// The catalog says it cannot be done as written: what, and what to do.
    Finding(String),
}

/// What an operation's expansion builds: its steps, and what it asks of the new
/// application version (said in the generated gate).
pub struct Gen<'a> {
    pub plan_id: &'a str,
    pub change: &'a Change,
    pub catalog: Option<&'a Catalog>,
    pub steps: Vec<GenStep>,
    pub deploy: Vec<String>,
    target: String,
}

impl<'a> Gen<'a> {
    fn new(plan_id: &'a str, change: &'a Change, catalog: Option<&'a Catalog>) -> Gen<'a> {
        let target = match &change.op {
            Op::Sql(_) => String::new(),
            op => snake(&op.summary()[op.key().len()..]),
        };
        Gen {
            plan_id,
            change,
            catalog,
            steps: Vec::new(),
            deploy: Vec::new(),
            target,
        }
    }

    /// The catalog's facts of `table`, or why the expansion cannot go on.
    pub fn table(&self, table: &QualifiedName) -> Result<&'a catalog::Table, Refusal> {
        let cat = self.catalog.ok_or(Refusal::NeedsCatalog)?;
        cat.table(
            table.schema.as_ref().map(|s| s.as_str()),
            table.name.as_str(),
        )
        .ok_or_else(|| Refusal::Finding(format!("table {table} does not exist")))
    }

    /// The stable name of a generated step: `c<N>_<op>_<target>_<what>`, at most 63 bytes.
    pub fn name(&self, what: &str) -> String {
        let head = format!("c{}_{}", self.change.index, self.change.op.key());
        let full = if self.target.is_empty() {
            format!("{head}_{what}")
        } else {
            format!("{head}_{}_{what}", self.target)
        };
        if full.len() <= 63 {
            return full;
        }
        // Cut the target, keeping the head and what the step does, plus a hash of
        // the whole so that two long targets never share a name.
        let hash = short_hash(&full);
        let room = 63usize.saturating_sub(head.len() + what.len() + hash.len() + 3);
        let cut: String = self.target.chars().take(room).collect();
        format!("{head}_{cut}_{hash}_{what}")
    }

    /// Adds a step of `phase`.
    pub fn add(&mut self, phase: Phase, what: &str, kind: GenKind, describe: &str) -> &mut GenStep {
        let step = self.step(phase, what, kind, describe);
        self.steps.push(step);
        self.steps.last_mut().expect("just pushed")
    }

    /// Adds a finished step.
    pub fn push(&mut self, step: GenStep) {
        self.steps.push(step);
    }

    /// A step of `phase`, not yet added (to chain `rollback`, `allow`, … and `push`).
    pub fn step(&self, phase: Phase, what: &str, kind: GenKind, describe: &str) -> GenStep {
        GenStep {
            phase,
            pos: self.change.pos,
            name: self.name(what),
            description: format!(
                "changes[{}] {}: {describe}",
                self.change.index,
                self.change.op.summary()
            ),
            kind,
            rollback: None,
            finalize: None,
            allow: Vec::new(),
            backfill: Vec::new(),
        }
    }

    /// What the new application version must do before the contract phase:
    /// one clause of the generated gate's message.
    pub fn requires(&mut self, what: impl Into<String>) {
        self.deploy.push(what.into());
    }
}

/// A name safe in snake_case step names: lower-case letters, digits, `_`.
pub fn snake(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('_') && !out.is_empty() {
            out.push('_');
        }
    }
    out.trim_end_matches('_').to_string()
}

/// Ten hex digits of a hash of `text`.
pub fn short_hash(text: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().take(5).map(|b| format!("{b:02x}")).collect()
}

/// A generated object name (`prefix` + `base`) cut to 63 bytes with a hash when long.
pub fn object_name(prefix: &str, base: &str) -> String {
    let full = format!("{prefix}{base}");
    if full.len() <= 63 {
        return full;
    }
    let hash = short_hash(&full);
    let mut cut = 63 - hash.len() - 1;
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}_{hash}", &full[..cut])
}

/// The expansion of a plan's `changes:`.
#[derive(Debug, Default)]
pub struct Expansion {
    /// The generated steps, in phase order (within a phase, in change order).
    pub steps: Vec<GenStep>,
    /// Operations that need the live catalog and were left out (offline).
    pub pending: Vec<String>,
    /// Operations the catalog refuses, with the change's position.
    pub refused: Vec<(Pos, String)>,
}

/// Expands every change, adding the gate the new application version must pass.
///
/// `has_gate`: the plan's hand-written steps already stop at a gate before the
/// contract phase, so none is generated.
pub fn expand(
    plan_id: &str,
    changes: &[Change],
    catalog: Option<&Catalog>,
    has_gate: bool,
) -> Expansion {
    let mut out = Expansion::default();
    let mut requirements = Vec::new();
    for change in changes {
        let mut g = Gen::new(plan_id, change, catalog);
        let result = match &change.op {
            Op::AddColumn(s) => add_column::expand(s, &mut g),
            Op::DropColumn(s) => drop_column::expand(s, &mut g),
            Op::RenameColumn(s) => rename_column::expand(s, &mut g),
            Op::ChangeType(s) => change_type::expand(s, &mut g),
            Op::SetNotNull(s) => set_not_null::expand(s, &mut g),
            Op::DropNotNull(s) => drop_not_null::expand(s, &mut g),
            Op::SetDefault(s) => set_default::expand(s, &mut g),
            Op::DropDefault(s) => drop_default::expand(s, &mut g),
            Op::AddCheck(s) => add_check::expand(s, &mut g),
            Op::AddUnique(s) => add_unique::expand(s, &mut g),
            Op::AddForeignKey(s) => add_foreign_key::expand(s, &mut g),
            Op::DropConstraint(s) => drop_constraint::expand(s, &mut g),
            Op::CreateIndex(s) => create_index::expand(s, &mut g),
            Op::DropIndex(s) => drop_index::expand(s, &mut g),
            Op::CreateTable(s) => create_table::expand(s, &mut g),
            Op::DropTable(s) => drop_table::expand(s, &mut g),
            Op::RenameTable(s) => rename_table::expand(s, &mut g),
            Op::Sql(s) => raw_sql::expand(s, &mut g),
        };
        match result {
            Ok(()) => {
                for step in &mut g.steps {
                    for (rule, why) in &change.allow {
                        step.allow.push((rule.clone(), why.clone()));
                    }
                    if matches!(step.kind, GenKind::Backfill { .. }) {
                        step.backfill = change.backfill.clone();
                    }
                }
                requirements.extend(g.deploy);
                if let Some(d) = &change.deploy {
                    requirements.push(d.clone());
                }
                out.steps.extend(g.steps);
            }
            Err(Refusal::NeedsCatalog) => out.pending.push(change.op.summary()),
            Err(Refusal::Finding(f)) => out.refused.push((
                change.pos,
                format!("changes[{}] {}: {f}", change.index, change.op.summary()),
            )),
        }
    }
    if !requirements.is_empty() && !has_gate {
        let message = format!(
            "Deploy the application version that {}; retire every older version, then run `pgshift resume {plan_id}`",
            requirements.join("; that ")
        );
        let pos = changes.first().map(|c| c.pos).unwrap_or_default();
        out.steps.push(GenStep {
            phase: Phase::Contract,
            pos,
            name: "deploy_new_version".into(),
            description:
                "generated gate: what the new application version must do before the contract phase"
                    .into(),
            kind: GenKind::Gate(message),
            rollback: None,
            finalize: None,
            allow: Vec::new(),
            backfill: Vec::new(),
        });
    }
    // Phase order; within a phase the gate first, then change order (stable sort).
    out.steps
        .sort_by_key(|s| (s.phase, !matches!(s.kind, GenKind::Gate(_))));
    out
}

/// A name as the plan file writes it: bare when it folds to itself, else double-quoted.
pub fn spell(name: &Ident) -> String {
    let s = name.as_str();
    let bare = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if bare { s.to_string() } else { quote_ident(s) }
}

/// A relation name as the plan file writes it.
pub fn spell_qualified(q: &QualifiedName) -> String {
    match &q.schema {
        Some(s) => format!("{}.{}", spell(s), spell(&q.name)),
        None => spell(&q.name),
    }
}

/// A generated step as a node of the plan's YAML tree, positioned at `pos`.
pub fn to_node(step: &GenStep, pos: Pos) -> Node {
    let s = |text: &str| Node {
        pos,
        value: Value::Str(text.to_string()),
    };
    let map = |entries: Vec<(&str, Node)>| Node {
        pos,
        value: Value::Map(entries.into_iter().map(|(k, v)| (s(k), v)).collect()),
    };
    let pairs = |cols: &[(Ident, String)]| Node {
        pos,
        value: Value::Map(cols.iter().map(|(c, e)| (s(&spell(c)), s(e))).collect()),
    };
    let mut entries = vec![
        ("name", s(&step.name)),
        ("description", s(&step.description)),
    ];
    match &step.kind {
        GenKind::Sql(sql) => entries.push(("sql", s(sql))),
        GenKind::Trigger {
            table,
            set,
            reverse,
        } => {
            let mut t = vec![("table", s(&spell_qualified(table))), ("set", pairs(set))];
            if !reverse.is_empty() {
                t.push(("reverse", pairs(reverse)));
            }
            entries.push(("trigger", map(t)));
        }
        GenKind::Backfill { table, set, where_ } => {
            let mut b = vec![("table", s(&spell_qualified(table))), ("set", pairs(set))];
            if let Some(w) = where_ {
                b.push(("where", s(w)));
            }
            let mut node = map(b);
            if let Value::Map(entries) = &mut node.value {
                entries.extend(step.backfill.iter().cloned());
            }
            entries.push(("backfill", node));
        }
        GenKind::Check(q) => entries.push(("check", s(q))),
        GenKind::Gate(m) => entries.push(("gate", s(m))),
        GenKind::DropTrigger(t) => entries.push(("drop_trigger", s(t))),
    }
    if let Some(r) = &step.rollback {
        entries.push(("rollback", s(r)));
    }
    if let Some(f) = &step.finalize {
        entries.push(("finalize", s(f)));
    }
    if !step.allow.is_empty() {
        let allow = Node {
            pos,
            value: Value::Map(step.allow.iter().map(|(k, v)| (s(k), s(v))).collect()),
        };
        entries.push(("allow", allow));
    }
    map(entries)
}
