//! From the positioned YAML tree to a [`Plan`], collecting every error on the way.
//!
//! Each check reports with the position of the offending key or value, the step
//! it belongs to, what is wrong, and what would be valid. Nothing stops at the
//! first error: a plan author fixes the whole file in one pass.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::{self, Node, Pos, Value};
use super::*;
use crate::ident;

/// Step kind keys, in the order the docs list them.
pub const KIND_KEYS: [&str; 7] = [
    "sql",
    "trigger",
    "backfill",
    "check",
    "gate",
    "run",
    "drop_trigger",
];
const STEP_KEYS: [&str; 15] = [
    "name",
    "sql",
    "trigger",
    "backfill",
    "check",
    "gate",
    "run",
    "drop_trigger",
    "rollback",
    "lock_timeout",
    "statement_timeout",
    "retries",
    "timeout",
    "allow",
    "description",
];

/// Validates the text of a plan file read from `path`.
pub fn validate(path: &Path, text: &str) -> Result<Plan, Error> {
    let mut v = Validator {
        file: path.to_path_buf(),
        diags: Vec::new(),
        step: None,
    };
    let plan = v.plan(path, text);
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

struct Validator {
    file: PathBuf,
    diags: Vec<Diagnostic>,
    step: Option<String>,
}

impl Validator {
    fn has_errors(&self) -> bool {
        self.diags.iter().any(|d| d.severity == Severity::Error)
    }

    fn error(&mut self, pos: Pos, rule: &str, message: impl Into<String>, help: Option<String>) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            pos,
            severity: Severity::Error,
            rule: rule.to_string(),
            step: self.step.clone(),
            message: message.into(),
            help,
        });
    }

    fn warning(&mut self, pos: Pos, rule: &str, message: impl Into<String>, help: Option<String>) {
        self.error(pos, rule, message, help);
        if let Some(last) = self.diags.last_mut() {
            last.severity = Severity::Warning;
        }
    }

    /// The entries of a map node, reporting keys outside `allowed` (with a suggestion).
    fn entries<'n>(
        &mut self,
        node: &'n Node,
        what: &str,
        allowed: &[&str],
    ) -> Vec<(String, &'n Node, &'n Node)> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.pos,
                "type",
                format!(
                    "{what} must be a map of keys to values, not {}",
                    node.value.describe()
                ),
                Some(format!("valid keys here: {}", allowed.join(", "))),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, val) in entries {
            let Value::Str(key) = &k.value else {
                self.error(
                    k.pos,
                    "type",
                    format!("keys in {what} must be names, not {}", k.value.describe()),
                    None,
                );
                continue;
            };
            if !allowed.is_empty() && !allowed.contains(&key.as_str()) {
                let help = match suggest(key, allowed) {
                    Some(s) => format!(
                        "did you mean `{s}`? valid keys here: {}",
                        allowed.join(", ")
                    ),
                    None => format!("valid keys here: {}", allowed.join(", ")),
                };
                self.error(
                    k.pos,
                    "unknown-key",
                    format!("unknown key `{key}` in {what}"),
                    Some(help),
                );
                continue;
            }
            out.push((key.clone(), k, val));
        }
        out
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.value {
            Value::Str(s) if !s.trim().is_empty() => Some(s.clone()),
            Value::Str(_) | Value::Null => {
                self.error(node.pos, "empty", format!("{what} is empty"), None);
                None
            }
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            other => {
                self.error(
                    node.pos,
                    "type",
                    format!("{what} must be a string, not {}", other.describe()),
                    None,
                );
                None
            }
        }
    }

    fn duration(&mut self, node: &Node, what: &str) -> Option<Duration> {
        let text = match &node.value {
            Value::Str(s) => s.clone(),
            Value::Int(0) => "0".to_string(),
            Value::Int(i) => {
                self.error(
                    node.pos,
                    "duration",
                    format!("{what} `{i}` has no unit"),
                    Some(format!("write `{i}ms` or `{i}s`")),
                );
                return None;
            }
            other => {
                self.error(
                    node.pos,
                    "duration",
                    format!(
                        "{what} must be a duration like `500ms` or `2s`, not {}",
                        other.describe()
                    ),
                    None,
                );
                return None;
            }
        };
        match duration::parse(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.error(node.pos, "duration", format!("{what}: {e}"), None);
                None
            }
        }
    }

    fn integer(&mut self, node: &Node, what: &str, min: i64, max: i64) -> Option<i64> {
        let n = match &node.value {
            Value::Int(i) => *i,
            Value::Str(s) if s.replace('_', "").parse::<i64>().is_ok() => {
                s.replace('_', "").parse().unwrap_or(0)
            }
            other => {
                self.error(
                    node.pos,
                    "type",
                    format!("{what} must be a whole number, not {}", other.describe()),
                    None,
                );
                return None;
            }
        };
        if n < min || n > max {
            self.error(
                node.pos,
                "range",
                format!(
                    "{what} is {}; it must be between {} and {}",
                    thousands(n),
                    thousands(min),
                    thousands(max)
                ),
                range_help(what),
            );
            return None;
        }
        Some(n)
    }

    /// An SQL body (one or more statements), with every statement's position in the file.
    fn sql_body(&mut self, node: &Node, what: &str) -> Option<SqlBody> {
        let text = self.string(node, what)?;
        let statements = match sql::split(&text) {
            Ok(s) => s,
            Err(errors) => {
                // One error per bad statement: the parser reports every token it
                // could not place after the first, which only buries the real one.
                let mut resume_at = 0;
                let mut reported = 0;
                for e in &errors {
                    if e.offset < resume_at || reported == 3 {
                        continue;
                    }
                    resume_at = text[e.offset..]
                        .find(';')
                        .map(|i| e.offset + i + 1)
                        .unwrap_or(text.len() + 1);
                    reported += 1;
                    let pos = pos_in_scalar(node, &text, e.offset);
                    let near = first_words(&text[e.offset.min(text.len())..]);
                    self.error(
                        pos,
                        "sql-syntax",
                        format!("{what} does not parse at `{near}`: {}", e.message),
                        Some(
                            "fix the statement at this line (PostgreSQL syntax); separate statements with `;`"
                                .into(),
                        ),
                    );
                }
                return None;
            }
        };
        let mut statements: Vec<Statement> = statements
            .into_iter()
            .map(|mut s| {
                s.pos = pos_in_scalar(node, &text, s.offset);
                s
            })
            .collect();
        if statements.is_empty() {
            self.error(
                node.pos,
                "empty",
                format!("{what} has no SQL statement"),
                None,
            );
            return None;
        }
        let mut ok = true;
        for s in &statements {
            if s.transaction_control {
                self.error(
                    s.pos,
                    "transaction-control",
                    format!("{what} contains `{}`: pgshift runs each step in its own transaction (or none, when a statement requires it)", first_words(&s.text)),
                    Some("remove BEGIN/COMMIT/SAVEPOINT from the plan; split work that must commit separately into separate steps".into()),
                );
                ok = false;
            }
        }
        let non_tx: Vec<&Statement> = statements
            .iter()
            .filter(|s| s.non_transactional.is_some())
            .collect();
        if !non_tx.is_empty() && statements.len() > 1 {
            for s in non_tx {
                self.error(
                    s.pos,
                    "non-transactional-mixed",
                    format!(
                        "`{}…`: {}, so it must be the only statement of its step; this step has {} statements",
                        first_words(&s.text),
                        s.non_transactional.unwrap_or_default(),
                        statements.len()
                    ),
                    Some("move this statement into a step of its own; the other statements keep their transaction".into()),
                );
            }
            ok = false;
        }
        if !ok {
            return None;
        }
        let transactional = statements.iter().all(|s| s.non_transactional.is_none());
        for s in &mut statements {
            s.text = s.text.trim_end_matches(';').trim().to_string();
        }
        Some(SqlBody {
            text,
            statements,
            transactional,
        })
    }

    fn expression(&mut self, node: &Node, what: &str) -> Option<String> {
        let text = self.string(node, what)?;
        if let Err(e) = sql::check_expression_at(&text) {
            self.error(
                pos_in_value(node, &text, e.offset),
                "sql-syntax",
                format!("{what} `{text}` is not a valid SQL expression: {}", e.message),
                Some("write one PostgreSQL expression, such as `lower(email)` or `email_hash IS NULL`".into()),
            );
            return None;
        }
        Some(text)
    }

    fn query(&mut self, node: &Node, what: &str) -> Option<String> {
        let text = self.string(node, what)?;
        if let Err(e) = sql::check_single_query_at(&text) {
            let near = first_words(&text[e.offset.min(text.len())..]);
            self.error(
                pos_in_value(node, &text, e.offset),
                "sql-syntax",
                if near.is_empty() {
                    format!("{what} does not parse: {}", e.message)
                } else {
                    format!("{what} does not parse at `{near}`: {}", e.message)
                },
                Some("write one PostgreSQL query, such as `SELECT count(*) = 0 FROM leads WHERE email_hash IS NULL`".into()),
            );
            return None;
        }
        Some(text.trim().trim_end_matches(';').trim().to_string())
    }

    fn table(&mut self, node: &Node, what: &str) -> Option<ident::QualifiedName> {
        let text = self.string(node, what)?;
        match ident::parse_qualified(&text) {
            Ok(q) => Some(q),
            Err(e) => {
                self.error(node.pos, "identifier", format!("{what} `{text}`: {e}"), Some("write `table`, `schema.table`, or a double-quoted name such as `\"Lead Emails\"`".into()));
                None
            }
        }
    }

    fn column(&mut self, node: &Node, what: &str) -> Option<ident::Ident> {
        let text = self.string(node, what)?;
        match ident::parse_ident(&text) {
            Ok(i) => Some(i),
            Err(e) => {
                self.error(node.pos, "identifier", format!("{what} `{text}`: {e}"), Some("write a column name, double-quoted if it has capitals, spaces or punctuation".into()));
                None
            }
        }
    }

    /// A `column: expression` map; must not be empty.
    fn assignments(&mut self, node: &Node, what: &str) -> Option<Vec<(ident::Ident, String)>> {
        let entries = self.entries(node, what, &[]);
        if entries.is_empty() {
            if matches!(node.value, Value::Map(_)) {
                self.error(
                    node.pos,
                    "empty",
                    format!("{what} is empty"),
                    Some("give at least one `column: expression`".into()),
                );
            }
            return None;
        }
        let mut out = Vec::new();
        let mut ok = true;
        let mut seen = HashMap::new();
        for (_, k, val) in entries {
            let col = self.column(k, &format!("column in {what}"));
            let expr = self.expression(val, &format!("expression for `{}`", key_text(k)));
            match (col, expr) {
                (Some(c), Some(e)) => {
                    if seen.insert(c.clone(), k.pos).is_some() {
                        self.error(
                            k.pos,
                            "duplicate",
                            format!("column {c} appears twice in {what}"),
                            None,
                        );
                        ok = false;
                    }
                    out.push((c, e));
                }
                _ => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn command(&mut self, node: &Node, what: &str, default_timeout: Duration) -> Option<Command> {
        match &node.value {
            Value::Str(_) => Some(Command {
                command: self.string(node, what)?,
                timeout: default_timeout,
                env: BTreeMap::new(),
                pass_env: Vec::new(),
            }),
            Value::Map(_) => {
                let mut cmd = Command {
                    command: String::new(),
                    timeout: default_timeout,
                    env: BTreeMap::new(),
                    pass_env: Vec::new(),
                };
                let mut ok = true;
                for (key, _, val) in
                    self.entries(node, what, &["command", "timeout", "env", "pass_env"])
                {
                    match key.as_str() {
                        "command" => match self.string(val, &format!("{what}'s command")) {
                            Some(c) => cmd.command = c,
                            None => ok = false,
                        },
                        "timeout" => match self.duration(val, "timeout") {
                            Some(d) => cmd.timeout = d,
                            None => ok = false,
                        },
                        "env" => {
                            for (k, kn, vn) in self.entries(val, "env", &[]) {
                                if !is_env_name(&k) {
                                    self.error(kn.pos, "env", format!("`{k}` is not a valid environment variable name"), Some("use letters, digits and `_`, not starting with a digit".into()));
                                    ok = false;
                                }
                                let v = match &vn.value {
                                    Value::Null => String::new(),
                                    _ => self.string(vn, &format!("env `{k}`")).unwrap_or_default(),
                                };
                                cmd.env.insert(k, v);
                            }
                        }
                        "pass_env" => match &val.value {
                            Value::Seq(items) => {
                                for item in items {
                                    if let Some(name) = self.string(item, "pass_env entry") {
                                        cmd.pass_env.push(name);
                                    }
                                }
                            }
                            other => {
                                self.error(
                                    val.pos,
                                    "type",
                                    format!(
                                        "pass_env must be a list of variable names, not {}",
                                        other.describe()
                                    ),
                                    None,
                                );
                                ok = false;
                            }
                        },
                        _ => {}
                    }
                }
                if cmd.command.is_empty() {
                    self.error(
                        node.pos,
                        "missing",
                        format!("{what} has no `command`"),
                        None,
                    );
                    ok = false;
                }
                ok.then_some(cmd)
            }
            other => {
                self.error(node.pos, "type", format!("{what} must be a shell command (a string) or a map with `command`, `timeout`, `env`, not {}", other.describe()), None);
                None
            }
        }
    }

    fn commands(&mut self, node: &Node, what: &str) -> Vec<Command> {
        match &node.value {
            Value::Seq(items) => items
                .iter()
                .filter_map(|i| self.command(i, what, defaults::HOOK_TIMEOUT))
                .collect(),
            _ => self
                .command(node, what, defaults::HOOK_TIMEOUT)
                .into_iter()
                .collect(),
        }
    }

    fn plan(&mut self, path: &Path, text: &str) -> Option<Plan> {
        let root = match raw::parse(text) {
            Ok(n) => n,
            Err(e) => {
                let help = yaml_help(&e.message);
                self.error(
                    e.pos,
                    "yaml",
                    format!("not valid YAML: {}", e.message),
                    Some(help),
                );
                return None;
            }
        };
        if matches!(root.value, Value::Null) {
            self.error(
                Pos { line: 1, col: 1 },
                "empty",
                "the plan file is empty",
                Some("a plan needs at least `phases:` with one step".into()),
            );
            return None;
        }
        let mut id = None;
        let mut id_pos = Pos { line: 1, col: 1 };
        let mut description = None;
        let mut settings = Settings::default();
        let mut hooks = Hooks::default();
        let mut steps: Vec<Step> = Vec::new();
        let mut step_nodes: Vec<&Node> = Vec::new();
        let mut saw_phases = false;
        let top = self.entries(
            &root,
            "the plan",
            &["id", "description", "settings", "hooks", "phases"],
        );
        // Settings first: steps inherit them wherever `settings` is written.
        let ordered = top
            .iter()
            .filter(|e| e.0 == "settings")
            .chain(top.iter().filter(|e| e.0 != "settings"));
        for (key, k, val) in ordered {
            let (k, val) = (*k, *val);
            match key.as_str() {
                "id" => {
                    id_pos = val.pos;
                    id = self.string(val, "id");
                }
                "description" => description = self.string(val, "description"),
                "settings" => {
                    for (key, _, val) in self.entries(
                        val,
                        "settings",
                        &["lock_timeout", "statement_timeout", "retries"],
                    ) {
                        match key.as_str() {
                            "lock_timeout" => {
                                if let Some(d) = self.duration(val, "lock_timeout") {
                                    if d.is_zero() {
                                        self.error(val.pos, "range", "lock_timeout 0 means wait forever: every application query could queue behind a DDL", Some("use a short timeout such as `500ms`; pgshift retries".into()));
                                    }
                                    settings.lock_timeout = d;
                                }
                            }
                            "statement_timeout" => {
                                if let Some(d) = self.duration(val, "statement_timeout") {
                                    settings.statement_timeout = d;
                                }
                            }
                            "retries" => {
                                if let Some(n) = self.integer(val, "retries", 0, 1000) {
                                    settings.retries = n as u32;
                                }
                            }
                            _ => {}
                        }
                    }
                }
                "hooks" => hooks = self.hooks(val),
                "phases" => {
                    saw_phases = true;
                    let names: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
                    let mut last: Option<Phase> = None;
                    for (key, kn, list) in self.entries(val, "phases", &names) {
                        let phase = Phase::parse(&key).expect("filtered by entries");
                        if last.is_some_and(|l| l > phase) {
                            self.warning(kn.pos, "phase-order", format!("phase `{phase}` is written after `{}` but runs before it", last.unwrap()), Some("phases always run expand → dual_write → backfill → contract; write them in that order".into()));
                        }
                        last = Some(phase);
                        match &list.value {
                            Value::Seq(items) => {
                                for item in items {
                                    if let Some(step) =
                                        self.step(item, phase, &settings, steps.len())
                                    {
                                        steps.push(step);
                                        step_nodes.push(item);
                                    }
                                }
                            }
                            Value::Null => {}
                            other => self.error(
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
                }
                _ => {
                    let _ = k;
                }
            }
        }
        if !saw_phases && matches!(root.value, Value::Map(_)) {
            self.error(
                root.pos,
                "missing",
                "the plan has no `phases`",
                Some(
                    "add `phases:` with at least one of expand, dual_write, backfill, contract"
                        .into(),
                ),
            );
        } else if steps.is_empty() && !self.has_errors() {
            self.error(
                root.pos,
                "empty",
                "the plan has no steps",
                Some("add at least one step under a phase".into()),
            );
        }
        // Per-step settings were read before `settings` when written first; apply plan defaults now.
        let id = match id {
            Some(id) => id,
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        if !is_plan_id(&id) {
            self.step = None;
            self.error(id_pos, "id", format!("plan id `{id}` is not valid"), Some("an id has 1–63 characters: letters, digits, `_`, `-`, `.`; set `id:` in the file when the file name is not one".into()));
        }
        self.check_names(&steps, &step_nodes);
        self.resolve_drop_triggers(&mut steps);
        Some(Plan {
            id,
            description,
            file: path.to_path_buf(),
            checksum: checksum::Checksum::of(text),
            settings,
            hooks,
            steps,
            notes: Vec::new(),
        })
    }

    fn hooks(&mut self, node: &Node) -> Hooks {
        let mut hooks = Hooks::default();
        for (key, _, val) in self.entries(
            node,
            "hooks",
            &["on_gate", "on_failure", "on_success", "before", "after"],
        ) {
            match key.as_str() {
                "on_gate" => hooks.on_gate = self.commands(val, "hook `on_gate`"),
                "on_failure" => hooks.on_failure = self.commands(val, "hook `on_failure`"),
                "on_success" => hooks.on_success = self.commands(val, "hook `on_success`"),
                "before" | "after" => {
                    let names: Vec<&str> = Phase::ALL.iter().map(|p| p.as_str()).collect();
                    for (phase, _, cmd) in self.entries(val, &format!("hooks.{key}"), &names) {
                        let phase = Phase::parse(&phase).expect("filtered");
                        let cmds = self.commands(cmd, &format!("hook `{key}.{phase}`"));
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

    fn step(
        &mut self,
        node: &Node,
        phase: Phase,
        settings: &Settings,
        position: usize,
    ) -> Option<Step> {
        self.step = None;
        // Find the name first so that every error below names the step.
        if let Value::Map(entries) = &node.value {
            for (k, v) in entries {
                if matches!(&k.value, Value::Str(s) if s == "name")
                    && let Value::Str(n) = &v.value
                {
                    self.step = Some(n.clone());
                }
            }
        }
        let entries = self.entries(node, &format!("a step of phase `{phase}`"), &STEP_KEYS);
        if !matches!(node.value, Value::Map(_)) {
            return None;
        }
        let errors_before = self.error_count();
        let mut name = None;
        let mut kinds: Vec<(&str, &Node, &Node)> = Vec::new();
        let mut rollback_node = None;
        let mut lock_timeout = settings.lock_timeout;
        let mut statement_timeout = settings.statement_timeout;
        let mut retries = settings.retries;
        let mut timeout = None;
        let mut allow = BTreeMap::new();
        for (key, k, val) in &entries {
            match key.as_str() {
                "name" => {
                    if let Some(n) = self.string(val, "step name") {
                        if !is_step_name(&n) {
                            let example = snake_case(&n);
                            let example = if is_step_name(&example) {
                                example
                            } else {
                                "add_email_hash".into()
                            };
                            self.error(val.pos, "name", format!("step name `{n}` is not snake_case"), Some(format!("a step name has 1–63 characters: lower-case letters, digits and `_`, starting with a letter (e.g. `{example}`)")));
                        }
                        name = Some(n);
                    }
                }
                "description" => {
                    self.string(val, "description");
                }
                k2 if KIND_KEYS.contains(&k2) => {
                    let kk = KIND_KEYS
                        .iter()
                        .find(|x| **x == k2)
                        .copied()
                        .unwrap_or("sql");
                    kinds.push((kk, k, val));
                }
                "rollback" => rollback_node = Some((k.pos, *val)),
                "lock_timeout" => {
                    if let Some(d) = self.duration(val, "lock_timeout") {
                        if d.is_zero() {
                            self.error(val.pos, "range", "lock_timeout 0 means wait forever: every application query could queue behind this step", Some("use a short timeout such as `500ms`; pgshift retries".into()));
                        }
                        lock_timeout = d;
                    }
                }
                "statement_timeout" => {
                    if let Some(d) = self.duration(val, "statement_timeout") {
                        statement_timeout = d;
                    }
                }
                "retries" => {
                    if let Some(n) = self.integer(val, "retries", 0, 1000) {
                        retries = n as u32;
                    }
                }
                "timeout" => timeout = self.duration(val, "timeout"),
                "allow" => allow = self.allow(val),
                _ => {}
            }
        }
        if name.is_none() {
            self.error(
                node.pos,
                "missing",
                format!("a step of phase `{phase}` has no `name`"),
                Some("give every step a unique snake_case `name:`".into()),
            );
        }
        let kind = match kinds.as_slice() {
            [] => {
                self.error(
                    node.pos,
                    "kind",
                    "the step has no kind key",
                    Some(format!("give it exactly one of: {}", KIND_KEYS.join(", "))),
                );
                None
            }
            [(kind, k, val)] => self.kind(kind, k, val, phase, timeout),
            [_, (second, k, _), ..] => {
                let all: Vec<&str> = kinds.iter().map(|k| k.0).collect();
                self.error(
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
        };
        let rollback = match (rollback_node, &kind) {
            (None, _) => None,
            (Some((at, _)), Some(StepKind::Check(_) | StepKind::Gate(_))) => {
                self.error(
                    at,
                    "rollback",
                    "a check or gate step changes nothing, so it has no rollback",
                    Some("remove `rollback` from this step".into()),
                );
                None
            }
            (Some((at, _)), Some(StepKind::Trigger(_) | StepKind::DropTrigger(_))) => {
                self.error(at, "rollback", "trigger steps get a generated rollback", Some("remove `rollback`: pgshift drops (or re-creates) the trigger and function itself".into()));
                None
            }
            (Some((_, r)), _) => self.rollback(r),
        };
        if self.error_count() > errors_before {
            return None;
        }
        Some(Step {
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

    fn error_count(&self) -> usize {
        self.diags
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }

    fn allow(&mut self, node: &Node) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for (rule, k, reason) in self.entries(node, "allow", &[]) {
            if !lint::is_known_rule(&rule) {
                let known = lint::known_rules();
                let help = match suggest(
                    &rule,
                    &known.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
                ) {
                    Some(s) => format!(
                        "did you mean `{s}`? rules are squawk's (https://squawkhq.com/docs/rules) and pgshift's: {}",
                        lint::PGSHIFT_RULES.join(", ")
                    ),
                    None => format!(
                        "rules are squawk's (https://squawkhq.com/docs/rules) and pgshift's: {}",
                        lint::PGSHIFT_RULES.join(", ")
                    ),
                };
                self.error(
                    k.pos,
                    "allow",
                    format!("`{rule}` is not a lint rule"),
                    Some(help),
                );
                continue;
            }
            match self.string(reason, &format!("the reason for allowing `{rule}`")) {
                Some(r) => {
                    out.insert(rule, r);
                }
                None => {
                    if let Some(last) = self.diags.last_mut() {
                        last.help = Some(format!(
                            "write why `{rule}` is safe here: `{rule}: \"the table is new and empty\"`"
                        ));
                    }
                }
            }
        }
        out
    }

    fn rollback(&mut self, node: &Node) -> Option<Rollback> {
        match &node.value {
            Value::Str(_) => self.sql_body(node, "rollback").map(Rollback::Sql),
            Value::Map(_) => {
                let entries = self.entries(node, "rollback", &["sql", "run"]);
                match entries.as_slice() {
                    [(k, _, val)] if k == "sql" => {
                        self.sql_body(val, "rollback").map(Rollback::Sql)
                    }
                    [(_, _, val)] => self
                        .command(val, "rollback command", defaults::RUN_TIMEOUT)
                        .map(Rollback::Run),
                    [] => {
                        self.error(node.pos, "rollback", "rollback needs `sql` or `run`", None);
                        None
                    }
                    _ => {
                        self.error(
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
                self.error(
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

    fn kind(
        &mut self,
        kind: &str,
        key: &Node,
        val: &Node,
        phase: Phase,
        timeout: Option<Duration>,
    ) -> Option<StepKind> {
        let only_in = |want: Phase| -> Option<String> {
            (phase != want)
                .then(|| format!("a `{kind}` step belongs in phase `{want}`, not `{phase}`"))
        };
        let misplaced = match kind {
            "trigger" => only_in(Phase::DualWrite),
            "backfill" => only_in(Phase::Backfill),
            "drop_trigger" => only_in(Phase::Contract),
            _ => None,
        };
        if let Some(msg) = misplaced {
            self.error(
                key.pos,
                "phase",
                msg,
                Some(
                    "phases run expand → dual_write → backfill → contract; each kind has its place"
                        .into(),
                ),
            );
            return None;
        }
        match kind {
            "sql" => self.sql_body(val, "sql").map(StepKind::Sql),
            "gate" => self.string(val, "gate message").map(StepKind::Gate),
            "run" => self
                .command(val, "run", timeout.unwrap_or(defaults::RUN_TIMEOUT))
                .map(StepKind::Run),
            "check" => self.check(val, timeout).map(StepKind::Check),
            "trigger" => self.trigger(val).map(StepKind::Trigger),
            "backfill" => self.backfill(val).map(StepKind::Backfill),
            "drop_trigger" => {
                let step = self.string(val, "drop_trigger")?;
                // Resolved against the trigger steps once all steps are read.
                Some(StepKind::DropTrigger(DropTriggerSpec {
                    step,
                    trigger: TriggerSpec {
                        table: ident::parse_qualified("unresolved").ok()?,
                        set: vec![],
                        reverse: vec![],
                        when: None,
                    },
                }))
            }
            _ => None,
        }
    }

    fn check(&mut self, node: &Node, timeout: Option<Duration>) -> Option<CheckSpec> {
        match &node.value {
            Value::Map(_) => {
                let mut spec = CheckSpec {
                    query: String::new(),
                    wait: timeout,
                    interval: defaults::CHECK_INTERVAL,
                };
                let mut ok = true;
                for (key, _, val) in self.entries(node, "check", &["query", "wait", "interval"]) {
                    match key.as_str() {
                        "query" => match self.query(val, "check query") {
                            Some(q) => spec.query = q,
                            None => ok = false,
                        },
                        "wait" => spec.wait = self.duration(val, "wait"),
                        "interval" => match self.duration(val, "interval") {
                            Some(d) if !d.is_zero() => spec.interval = d,
                            Some(_) => {
                                self.error(val.pos, "range", "interval must be longer than 0", None)
                            }
                            None => ok = false,
                        },
                        _ => {}
                    }
                }
                if spec.query.is_empty() && ok {
                    self.error(
                        node.pos,
                        "missing",
                        "check has no `query`",
                        Some(
                            "write `check: SELECT …` or `check: { query: SELECT …, wait: 10m }`"
                                .into(),
                        ),
                    );
                    return None;
                }
                ok.then_some(spec)
            }
            _ => Some(CheckSpec {
                query: self.query(node, "check query")?,
                wait: timeout,
                interval: defaults::CHECK_INTERVAL,
            }),
        }
    }

    fn trigger(&mut self, node: &Node) -> Option<TriggerSpec> {
        let mut table = None;
        let mut set = None;
        let mut reverse = Some(Vec::new());
        let mut when = None;
        let mut ok = true;
        let mut saw_set = false;
        let errors_before = self.error_count();
        for (key, _, val) in self.entries(node, "trigger", &["table", "set", "reverse", "when"]) {
            match key.as_str() {
                "table" => table = self.table(val, "trigger table"),
                "set" => {
                    saw_set = true;
                    set = self.assignments(val, "trigger `set`");
                }
                "reverse" => reverse = self.assignments(val, "trigger `reverse`"),
                "when" => {
                    when = self.expression(val, "trigger `when`");
                    ok &= when.is_some();
                }
                _ => {}
            }
        }
        // Only when `table` is absent, not when it was present and already reported
        // (and only this step's errors count: an earlier step's must not hide this one).
        let table_reported = self.diags[..]
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .skip(errors_before)
            .any(|d| d.rule == "identifier" || d.rule == "empty");
        if table.is_none() && matches!(node.value, Value::Map(_)) && !table_reported {
            self.error(
                node.pos,
                "missing",
                "trigger has no `table`",
                Some("name the table the trigger keeps in step: `table: leads`".into()),
            );
        }
        if !saw_set && matches!(node.value, Value::Map(_)) {
            self.error(node.pos, "missing", "trigger has no `set`", Some("give the new columns and how to compute them: `set: { email_hash: \"md5(NEW.email)\" }`".into()));
        }
        let (table, set, reverse) = (table?, set?, reverse?);
        if let Some((c, _)) = set
            .iter()
            .find(|(c, _)| reverse.iter().any(|(r, _)| r == c))
        {
            self.error(
                node.pos,
                "trigger",
                format!("column {c} is in both `set` and `reverse`"),
                Some("`set` names the new columns, `reverse` the old ones".into()),
            );
            return None;
        }
        ok.then_some(TriggerSpec {
            table,
            set,
            reverse,
            when,
        })
    }

    fn backfill(&mut self, node: &Node) -> Option<BackfillSpec> {
        let mut table = None;
        let mut key = None;
        let mut set = None;
        let mut where_ = None;
        let mut batch_size = None;
        let mut workers = defaults::WORKERS;
        let mut verify = None;
        let mut throttle = Throttle::default();
        let mut explicit_min = None;
        let mut explicit_max = None;
        let errors_before = self.error_count();
        let mut saw_set = false;
        for (k, kn, val) in self.entries(
            node,
            "backfill",
            &[
                "table",
                "key",
                "set",
                "where",
                "batch_size",
                "workers",
                "verify",
                "throttle",
            ],
        ) {
            let _ = kn;
            match k.as_str() {
                "table" => table = self.table(val, "backfill table"),
                "key" => {
                    key = match &val.value {
                        Value::Seq(items) if !items.is_empty() => items
                            .iter()
                            .map(|i| self.column(i, "key column"))
                            .collect::<Option<Vec<_>>>(),
                        Value::Seq(_) => {
                            self.error(
                                val.pos,
                                "empty",
                                "key is an empty list",
                                Some("leave `key` out to use the primary key".into()),
                            );
                            None
                        }
                        _ => self.column(val, "key column").map(|c| vec![c]),
                    }
                }
                "set" => {
                    saw_set = true;
                    set = match &val.value {
                        Value::Str(_) => {
                            let clause = self.string(val, "backfill `set`");
                            if let Some(c) = &clause
                                && let Err(e) =
                                    sql::check_single_query(&format!("UPDATE t SET {c}"))
                            {
                                self.error(
                                    val.pos,
                                    "sql-syntax",
                                    format!("backfill `set` clause does not parse: {e}"),
                                    None,
                                );
                            }
                            clause.map(BackfillSet::Clause)
                        }
                        _ => self
                            .assignments(val, "backfill `set`")
                            .map(BackfillSet::Columns),
                    }
                }
                "where" => where_ = self.expression(val, "backfill `where`"),
                "batch_size" => {
                    batch_size = self
                        .integer(val, "batch_size", 1, defaults::BATCH_SIZE_LIMIT as i64)
                        .map(|n| n as u32)
                }
                "workers" => {
                    workers = self
                        .integer(val, "workers", 1, defaults::WORKERS_LIMIT as i64)
                        .map(|n| n as u32)
                        .unwrap_or(1)
                }
                "verify" => verify = self.query(val, "backfill `verify`"),
                "throttle" => {
                    for (k, _, val) in self.entries(
                        val,
                        "throttle",
                        &[
                            "sleep",
                            "max_rows_per_sec",
                            "target_batch_time",
                            "min_batch_size",
                            "max_batch_size",
                            "max_replica_lag",
                            "throttle_query",
                        ],
                    ) {
                        match k.as_str() {
                            "sleep" => {
                                throttle.sleep = self.duration(val, "sleep").unwrap_or_default()
                            }
                            "max_rows_per_sec" => {
                                throttle.max_rows_per_sec = self
                                    .integer(val, "max_rows_per_sec", 1, 100_000_000)
                                    .map(|n| n as u32)
                            }
                            "target_batch_time" => {
                                throttle.target_batch_time =
                                    self.duration(val, "target_batch_time");
                                if throttle
                                    .target_batch_time
                                    .is_some_and(|d| d < Duration::from_millis(10))
                                {
                                    self.error(
                                        val.pos,
                                        "range",
                                        "target_batch_time must be at least 10ms",
                                        None,
                                    );
                                }
                            }
                            "min_batch_size" => {
                                explicit_min = self
                                    .integer(
                                        val,
                                        "min_batch_size",
                                        1,
                                        defaults::BATCH_SIZE_LIMIT as i64,
                                    )
                                    .map(|n| n as u32)
                            }
                            "max_batch_size" => {
                                explicit_max = self
                                    .integer(
                                        val,
                                        "max_batch_size",
                                        1,
                                        defaults::BATCH_SIZE_LIMIT as i64,
                                    )
                                    .map(|n| n as u32)
                            }
                            "max_replica_lag" => {
                                throttle.max_replica_lag = self.duration(val, "max_replica_lag")
                            }
                            "throttle_query" => {
                                throttle.throttle_query = self.query(val, "throttle_query")
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        if !matches!(node.value, Value::Map(_)) {
            return None;
        }
        if table.is_none() && self.error_count() == errors_before {
            self.error(
                node.pos,
                "missing",
                "backfill has no `table`",
                Some("name the table to update: `table: leads`".into()),
            );
        }
        if !saw_set {
            self.error(
                node.pos,
                "missing",
                "backfill has no `set`",
                Some("give the columns to fill: `set: { email_hash: \"md5(email)\" }`".into()),
            );
        }
        let batch_size = batch_size.unwrap_or(defaults::BATCH_SIZE);
        throttle.min_batch_size = explicit_min.unwrap_or(defaults::MIN_BATCH_SIZE.min(batch_size));
        throttle.max_batch_size = explicit_max.unwrap_or(defaults::MAX_BATCH_SIZE.max(batch_size));
        if throttle.min_batch_size > throttle.max_batch_size
            || batch_size < throttle.min_batch_size
            || batch_size > throttle.max_batch_size
        {
            self.error(node.pos, "range", format!("batch_size {batch_size} must lie within min_batch_size {} and max_batch_size {}", throttle.min_batch_size, throttle.max_batch_size), None);
        }
        if self.error_count() > errors_before {
            return None;
        }
        Some(BackfillSpec {
            table: table?,
            key,
            set: set?,
            where_,
            batch_size,
            workers,
            verify,
            throttle,
        })
    }

    /// Names are unique, and reported at the second use with a pointer to the first.
    fn check_names(&mut self, steps: &[Step], _nodes: &[&Node]) {
        let mut seen: HashMap<&str, Pos> = HashMap::new();
        for s in steps {
            if let Some(first) = seen.get(s.name.as_str()) {
                self.step = Some(s.name.clone());
                self.error(
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

    fn resolve_drop_triggers(&mut self, steps: &mut [Step]) {
        let triggers: HashMap<String, TriggerSpec> = steps
            .iter()
            .filter_map(|s| match &s.kind {
                StepKind::Trigger(t) => Some((s.name.clone(), t.clone())),
                _ => None,
            })
            .collect();
        for s in steps.iter_mut() {
            if let StepKind::DropTrigger(d) = &mut s.kind {
                match triggers.get(&d.step) {
                    Some(t) => d.trigger = t.clone(),
                    None => {
                        self.step = Some(s.name.clone());
                        let names: Vec<&str> = triggers.keys().map(|k| k.as_str()).collect();
                        let help = if names.is_empty() {
                            "the plan has no `trigger` step in dual_write to drop".to_string()
                        } else {
                            format!("name one of the plan's trigger steps: {}", names.join(", "))
                        };
                        self.error(
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
        }
    }
}

/// Like [`pos_in_scalar`] for values that may be quoted or folded: exact for
/// plain one-line values and literal blocks, the value's start otherwise.
fn pos_in_value(node: &Node, text: &str, offset: usize) -> Pos {
    if text.contains('\n') || offset == 0 {
        // A folded or multi-line flow scalar does not map line for line onto the file.
        return if text.trim_end().contains('\n') {
            pos_in_scalar(node, text, offset)
        } else {
            node.pos
        };
    }
    pos_in_scalar(node, text, offset)
}

/// The position of byte `offset` of a scalar's text in the file.
fn pos_in_scalar(node: &Node, text: &str, offset: usize) -> Pos {
    let offset = offset.min(text.len());
    // Skip leading whitespace so the position names the statement, not the blank before it.
    let skipped = text[offset..].len() - text[offset..].trim_start().len();
    let before = &text[..offset + skipped];
    let line_off = before.matches('\n').count() as u32;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col_in_line = before[line_start..].chars().count() as u32;
    Pos {
        line: node.pos.line + line_off,
        col: node.pos.col + col_in_line,
    }
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

/// Advice for a number outside its range, naming the default where there is one.
fn range_help(what: &str) -> Option<String> {
    match what {
        "batch_size" => Some(format!(
            "the default is {}; batches of a few thousand rows keep each lock short",
            thousands(defaults::BATCH_SIZE as i64)
        )),
        "workers" => Some(format!(
            "the default is {} worker; more workers split the key range in parallel",
            defaults::WORKERS
        )),
        "retries" => Some(format!("the default is {}", defaults::RETRIES)),
        _ => None,
    }
}

/// `2000000` as `2,000,000`.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

fn first_words(sql: &str) -> String {
    let words: Vec<&str> = sql.split_whitespace().take(4).collect();
    words.join(" ")
}

fn key_text(node: &Node) -> String {
    match &node.value {
        Value::Str(s) => s.clone(),
        other => other.describe().to_string(),
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

fn is_plan_id(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn is_env_name(n: &str) -> bool {
    !n.is_empty()
        && !n.starts_with(|c: char| c.is_ascii_digit())
        && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The closest valid word to a misspelled one, if it is close enough to be a typo.
pub fn suggest<'a>(word: &str, valid: &[&'a str]) -> Option<&'a str> {
    let w = word.to_ascii_lowercase().replace('-', "_");
    valid
        .iter()
        .map(|v| (levenshtein(&w, &v.replace('-', "_")), *v))
        .filter(|(d, v)| *d <= 2.max(v.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur.push((prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
