//! Lint: squawk's rules on every SQL body, and the rules only a whole plan can see.
//!
//! A finding is an error unless the step's `allow` names its rule with a reason.
//! Some squawk rules are moot under pgshift and never raised:
//! - `require-lock-timeout`, `require-statement-timeout`, `require-timeout-settings`:
//!   pgshift sets both timeouts on every transaction it opens;
//! - `prefer-robust-stmts` on a transactional step: the step and its success mark
//!   commit together, so a retry never meets half-applied DDL;
//! - `transaction-nesting`, `ban-uncommitted-transaction`: plans may not contain
//!   BEGIN/COMMIT at all (validation refuses them), pgshift owns transactions;
//! - `ban-drop-*` on a rollback that drops exactly what its own step created
//!   (the point of a rollback).

use std::collections::HashSet;

use squawk_linter::{Linter, LinterSettings, Rule};
use squawk_syntax::ast::AstNode;
use squawk_syntax::{SourceFile, SyntaxKind, SyntaxNode};

use super::*;

/// pgshift's own rules.
pub const PGSHIFT_RULES: [&str; 5] = [
    "scan-under-exclusive-lock",
    "backfill-without-dual-write",
    "contract-before-gate",
    "missing-rollback",
    "drop-column-under-trigger",
];

const MOOT: [Rule; 6] = [
    Rule::RequireLockTimeout,
    Rule::RequireStatementTimeout,
    Rule::RequireTimeoutSettings,
    Rule::TransactionNesting,
    Rule::BanUncommittedTransaction,
    Rule::UnusedIgnore,
];

/// Every rule name an `allow` may use.
pub fn known_rules() -> Vec<String> {
    let mut rules: Vec<String> = squawk_rules(true).iter().map(|r| r.to_string()).collect();
    rules.extend(PGSHIFT_RULES.iter().map(|s| s.to_string()));
    rules
}

pub fn is_known_rule(name: &str) -> bool {
    PGSHIFT_RULES.contains(&name) || Rule::try_from(name).is_ok()
}

fn squawk_rules(transactional: bool) -> Vec<Rule> {
    let mut rules: Vec<Rule> = Linter::with_default_rules()
        .rules
        .into_iter()
        .filter(|r| !MOOT.contains(r))
        .collect();
    if transactional {
        rules.retain(|r| *r != Rule::PreferRobustStmts);
    }
    rules.sort_by_key(|r| r.to_string());
    rules
}

/// All findings of a plan; allowed ones come back as warnings that say so.
pub fn lint(plan: &Plan) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for step in &plan.steps {
        let mut found = Vec::new();
        if let StepKind::Sql(body) = &step.kind {
            let scans = scan_under_exclusive_lock(body);
            // squawk's `constraint-missing-not-valid` reports the same mistake as our
            // rule when NOT VALID and VALIDATE share a transaction; one finding is enough.
            found.extend(squawk(body, None).into_iter().filter(|f| {
                !(f.rule == "constraint-missing-not-valid" && scans.iter().any(|s| s.pos == f.pos))
            }));
            found.extend(scans);
        }
        if let Some(Rollback::Sql(body)) = &step.rollback {
            let created = match &step.kind {
                StepKind::Sql(fwd) => created_names(fwd),
                _ => HashSet::new(),
            };
            found.extend(squawk(body, Some(&created)).into_iter().map(|mut f| {
                f.message = format!("in the rollback: {}", f.message);
                f
            }));
        }
        found.extend(plan_rules(plan, step));
        let mut used = HashSet::new();
        for f in found {
            let mut d = Diagnostic {
                file: plan.file.clone(),
                pos: f.pos,
                severity: Severity::Error,
                rule: f.rule.clone(),
                step: Some(step.name.clone()),
                message: f.message,
                help: f.help,
            };
            if let Some(reason) = step.allow.get(&f.rule) {
                used.insert(f.rule);
                d.severity = Severity::Warning;
                d.message = format!("{} (allowed: {reason})", d.message);
                d.help = None;
            }
            out.push(d);
        }
        for rule in step.allow.keys().filter(|r| !used.contains(*r)) {
            out.push(Diagnostic {
                file: plan.file.clone(),
                pos: step.pos,
                severity: Severity::Warning,
                rule: "unused-allow".into(),
                step: Some(step.name.clone()),
                message: format!("`allow: {rule}` matches no finding in this step"),
                help: Some(
                    "remove the entry, so that a future finding of this rule is not silenced"
                        .into(),
                ),
            });
        }
    }
    out
}

struct Finding {
    pos: Pos,
    rule: String,
    message: String,
    help: Option<String>,
}

/// The statement of `body` that contains byte `offset`, for positions.
fn statement_at(body: &SqlBody, offset: usize) -> Option<&Statement> {
    body.statements.iter().rev().find(|s| s.offset <= offset)
}

fn squawk(body: &SqlBody, rollback_created: Option<&HashSet<String>>) -> Vec<Finding> {
    let file = SourceFile::parse(&body.text);
    let mut linter = Linter::from(squawk_rules(body.transactional));
    linter.settings = LinterSettings {
        pg_version: Default::default(),
        assume_in_transaction: body.transactional,
    };
    let stmts: Vec<SyntaxNode> = file.tree().stmts().map(|s| s.syntax().clone()).collect();
    let mut out = Vec::new();
    for v in linter.lint(&file, &body.text) {
        let offset = usize::from(v.text_range.start());
        if let Some(created) = rollback_created
            && is_drop_rule(v.code)
            && let Some(stmt) = stmts
                .iter()
                .find(|n| n.text_range().contains_inclusive(v.text_range.start()))
        {
            let dropped = dropped_names(stmt);
            if !dropped.is_empty() && dropped.iter().all(|d| created.contains(d)) {
                continue;
            }
        }
        let pos = statement_at(body, offset)
            .map(|s| s.pos)
            .unwrap_or_default();
        let help = match v.help {
            Some(h) => format!(
                "{}; or, if it is safe here, acknowledge it with `allow: {{ {}: \"why\" }}` (https://squawkhq.com/docs/{})",
                sentence_fragment(&h),
                v.code,
                v.code
            ),
            None => format!(
                "if it is safe here, acknowledge it with `allow: {{ {}: \"why\" }}` (https://squawkhq.com/docs/{})",
                v.code, v.code
            ),
        };
        out.push(Finding {
            pos,
            rule: v.code.to_string(),
            message: sentence_fragment(&v.message),
            help: Some(help),
        });
    }
    out
}

/// squawk writes sentences ("Dropping a column may break existing clients."); our
/// messages are lower-case fragments without a final period, like every other one.
fn sentence_fragment(text: &str) -> String {
    let t = text.trim().trim_end_matches('.');
    let mut chars = t.chars();
    match (chars.next(), chars.next()) {
        // Keep acronyms and SQL keywords (`NOT VALID`, `ADD COLUMN`) as written.
        (Some(first), Some(second)) if first.is_uppercase() && !second.is_uppercase() => {
            first.to_lowercase().collect::<String>() + &t[first.len_utf8()..]
        }
        _ => t.to_string(),
    }
}

fn is_drop_rule(rule: Rule) -> bool {
    rule.to_string().starts_with("ban-drop-") || rule == Rule::RequireConcurrentIndexDeletion
}

fn norm(text: &str) -> String {
    let t = text.trim();
    match t.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        Some(q) => q.replace("\"\"", "\""),
        None => t.to_ascii_lowercase(),
    }
}

/// Names that the statements of `body` define (tables, columns, indexes, constraints, …).
fn created_names(body: &SqlBody) -> HashSet<String> {
    let file = SourceFile::parse(&body.text);
    let mut out = HashSet::new();
    for node in file.syntax_node().descendants() {
        match node.kind() {
            SyntaxKind::COLUMN_NAME | SyntaxKind::CONSTRAINT_NAME => {
                out.insert(norm(&node.text().to_string()));
            }
            SyntaxKind::PATH => {
                if let Some(seg) = node
                    .descendants()
                    .filter(|d| d.kind() == SyntaxKind::PATH_SEGMENT)
                    .last()
                {
                    out.insert(norm(&seg.text().to_string()));
                }
            }
            _ => {}
        }
    }
    out
}

/// Names a DROP statement (or an ALTER TABLE … DROP action) removes.
fn dropped_names(stmt: &SyntaxNode) -> Vec<String> {
    let scopes: Vec<SyntaxNode> = if stmt.kind() == SyntaxKind::ALTER_TABLE {
        stmt.descendants()
            .filter(|d| {
                matches!(
                    d.kind(),
                    SyntaxKind::DROP_COLUMN | SyntaxKind::DROP_CONSTRAINT
                )
            })
            .collect()
    } else {
        vec![stmt.clone()]
    };
    let mut out = Vec::new();
    for scope in scopes {
        for d in scope.descendants() {
            let top_ref = match d.kind() {
                SyntaxKind::PATH_REF => d.parent().is_none_or(|p| p.kind() != SyntaxKind::PATH_REF),
                SyntaxKind::COLUMN_NAME_REF => {
                    !d.descendants().any(|x| x.kind() == SyntaxKind::PATH_REF)
                }
                _ => false,
            };
            if top_ref {
                let last = d
                    .descendants()
                    .filter(|x| x.kind() == SyntaxKind::PATH_SEGMENT_REF)
                    .last();
                let text = last
                    .map(|l| l.text().to_string())
                    .unwrap_or_else(|| d.text().to_string());
                out.push(norm(&text));
            }
        }
    }
    out
}

/// Table named by the first `kind` descendant of `node`, normalised.
fn table_of(node: &SyntaxNode, kind: SyntaxKind) -> Option<String> {
    let n = node.descendants().find(|d| d.kind() == kind)?;
    let path = n
        .descendants()
        .find(|d| d.kind() == SyntaxKind::PATH_REF)
        .unwrap_or(n);
    let text = path.text().to_string();
    Some(text.split('.').map(norm).collect::<Vec<_>>().join("."))
}

/// `scan-under-exclusive-lock`: a scan or rewrite of a table that an earlier statement
/// (or action) of the same transaction has already locked ACCESS EXCLUSIVE.
fn scan_under_exclusive_lock(body: &SqlBody) -> Vec<Finding> {
    if !body.transactional {
        return Vec::new();
    }
    let file = SourceFile::parse(&body.text);
    let mut locked: Vec<(String, Pos, String)> = Vec::new();
    let mut created: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for stmt in file.tree().stmts() {
        let node = stmt.syntax();
        let pos = statement_at(body, usize::from(node.text_range().start()))
            .map(|s| s.pos)
            .unwrap_or_default();
        let flag = |table: &str,
                    what: &str,
                    locked: &[(String, Pos, String)],
                    out: &mut Vec<Finding>| {
            if created.contains(table) {
                return;
            }
            if let Some((_, at, by)) = locked.iter().find(|(t, _, _)| t == table) {
                out.push(Finding {
                    pos,
                    rule: "scan-under-exclusive-lock".into(),
                    message: format!(
                        "{what} reads every row of `{table}` while this transaction still holds the ACCESS EXCLUSIVE lock taken by {by} (line {}): every query on `{table}` waits until the scan ends",
                        at.line
                    ),
                    help: Some("put the scan in a step of its own: first `ADD CONSTRAINT … NOT VALID` (brief lock, no scan), then `VALIDATE CONSTRAINT` in the next step (scans under SHARE UPDATE EXCLUSIVE, which lets reads and writes go on)".into()),
                });
            }
        };
        match node.kind() {
            SyntaxKind::CREATE_TABLE => {
                if let Some(seg) = node.children().find(|c| c.kind() == SyntaxKind::PATH) {
                    created.insert(
                        seg.text()
                            .to_string()
                            .split('.')
                            .map(norm)
                            .collect::<Vec<_>>()
                            .join("."),
                    );
                }
            }
            SyntaxKind::ALTER_TABLE => {
                let Some(table) = table_of(node, SyntaxKind::TABLE_RELATION_NAME) else {
                    continue;
                };
                for action in node.children() {
                    let scan = match action.kind() {
                        SyntaxKind::VALIDATE_CONSTRAINT => Some("`VALIDATE CONSTRAINT`"),
                        SyntaxKind::ADD_CONSTRAINT
                            if !action
                                .descendants()
                                .any(|d| d.kind() == SyntaxKind::NOT_VALID) =>
                        {
                            Some("`ADD CONSTRAINT` without NOT VALID")
                        }
                        SyntaxKind::ALTER_COLUMN
                            if action
                                .descendants()
                                .any(|d| d.kind() == SyntaxKind::SET_NOT_NULL) =>
                        {
                            Some("`SET NOT NULL`")
                        }
                        SyntaxKind::ALTER_COLUMN
                            if action
                                .descendants()
                                .any(|d| d.kind() == SyntaxKind::SET_TYPE) =>
                        {
                            Some("`ALTER COLUMN … TYPE` (a rewrite)")
                        }
                        _ => None,
                    };
                    if let Some(what) = scan {
                        flag(&table, what, &locked, &mut out);
                    }
                    let is_action = !matches!(
                        action.kind(),
                        SyntaxKind::TABLE_RELATION_NAME | SyntaxKind::VALIDATE_CONSTRAINT
                    );
                    if is_action && !locked.iter().any(|(t, _, _)| *t == table) {
                        let by = format!(
                            "`{}`",
                            action
                                .text()
                                .to_string()
                                .split_whitespace()
                                .take(3)
                                .collect::<Vec<_>>()
                                .join(" ")
                        );
                        locked.push((table.clone(), pos, by));
                    }
                }
            }
            SyntaxKind::CREATE_INDEX => {
                if let Some(table) = table_of(node, SyntaxKind::TABLE_RELATION_NAME) {
                    flag(&table, "`CREATE INDEX`", &locked, &mut out);
                }
            }
            SyntaxKind::UPDATE | SyntaxKind::DELETE => {
                if let Some(table) = table_of(node, SyntaxKind::RELATION_NAME) {
                    flag(
                        &table,
                        if node.kind() == SyntaxKind::UPDATE {
                            "`UPDATE`"
                        } else {
                            "`DELETE`"
                        },
                        &locked,
                        &mut out,
                    );
                }
            }
            _ => {}
        }
    }
    out
}

/// The rules about a step's place in the plan.
fn plan_rules(plan: &Plan, step: &Step) -> Vec<Finding> {
    let mut out = Vec::new();
    match &step.kind {
        StepKind::Backfill(b) => {
            let covered = plan.steps.iter().any(|s| matches!(&s.kind, StepKind::Trigger(t) if t.table.name == b.table.name && (t.table.schema == b.table.schema || t.table.schema.is_none() || b.table.schema.is_none())));
            if !covered {
                out.push(Finding {
                    pos: step.pos,
                    rule: "backfill-without-dual-write".into(),
                    message: format!("backfill of {} with no dual_write trigger on that table: rows the application writes while the backfill runs (behind its cursor) are never filled", b.table),
                    help: Some(format!("add a `trigger:` step for {} in phase dual_write, so the trigger fills new writes before the backfill fixes its key range", b.table)),
                });
            }
        }
        StepKind::Sql(_) | StepKind::Run(_)
            if step.phase != Phase::Contract && step.rollback.is_none() =>
        {
            out.push(Finding {
                pos: step.pos,
                rule: "missing-rollback".into(),
                message: format!("{} step in phase `{}` has no rollback: if a later step fails, `pgshift rollback` cannot undo this one", step.kind.name(), step.phase),
                help: Some("add `rollback:` with the SQL (or `run:` command) that undoes this step; steps before contract must be reversible".into()),
            });
        }
        _ => {}
    }
    if step.phase == Phase::Contract && !matches!(step.kind, StepKind::Gate(_) | StepKind::Check(_))
    {
        let guarded = plan
            .steps
            .iter()
            .take_while(|s| s.position < step.position)
            .any(|s| {
                s.phase == Phase::Contract
                    && matches!(s.kind, StepKind::Gate(_) | StepKind::Check(_))
            });
        if !guarded {
            out.push(Finding {
                pos: step.pos,
                rule: "contract-before-gate".into(),
                message: "contract step before any gate or check: it removes what the running application may still use, with nothing confirming the application has moved on".into(),
                help: Some("start the contract phase with a `gate:` (deploy the new application) and/or a `check:` (no rows left to migrate)".into()),
            });
        }
    }
    if let StepKind::Sql(body) = &step.kind {
        out.extend(drop_column_under_trigger(plan, step, body));
    }
    out
}

/// `drop-column-under-trigger`: an `ALTER TABLE … DROP COLUMN` of a column that a
/// dual-write trigger still reads or writes (no `drop_trigger` of it before this step).
/// Either PostgreSQL refuses the drop (the trigger fires `UPDATE OF` that column), or,
/// worse, it succeeds and every later write to the table fails inside the trigger.
fn drop_column_under_trigger(plan: &Plan, step: &Step, body: &SqlBody) -> Vec<Finding> {
    let file = SourceFile::parse(&body.text);
    let mut out = Vec::new();
    for stmt in file.tree().stmts() {
        let node = stmt.syntax();
        if node.kind() != SyntaxKind::ALTER_TABLE {
            continue;
        }
        let Some(table) = table_of(node, SyntaxKind::TABLE_RELATION_NAME) else {
            continue;
        };
        let table_name = table.rsplit('.').next().unwrap_or(&table).to_string();
        let dropped: Vec<String> = node
            .children()
            .filter(|a| a.kind() == SyntaxKind::DROP_COLUMN)
            .filter_map(|a| {
                a.descendants()
                    .find(|d| d.kind() == SyntaxKind::COLUMN_NAME_REF)
            })
            .map(|c| norm(&c.text().to_string()))
            .collect();
        for trig in plan.steps.iter().filter(|t| t.position < step.position) {
            let StepKind::Trigger(spec) = &trig.kind else {
                continue;
            };
            if spec.table.name.as_str() != table_name {
                continue;
            }
            let removed = plan.steps.iter().any(|d| {
                d.position > trig.position
                    && d.position < step.position
                    && matches!(&d.kind, StepKind::DropTrigger(x) if x.step == trig.name)
            });
            if removed {
                continue;
            }
            let mut used: Vec<String> = spec
                .set
                .iter()
                .chain(&spec.reverse)
                .map(|(c, _)| c.as_str().to_string())
                .collect();
            match crate::exec::trigger::update_columns(spec) {
                Some(cols) => used.extend(cols.iter().map(|c| c.as_str().to_string())),
                None => used.extend(dropped.iter().cloned()),
            }
            for col in dropped.iter().filter(|c| used.contains(c)) {
                let pos = statement_at(body, usize::from(node.text_range().start()))
                    .map(|s| s.pos)
                    .unwrap_or(step.pos);
                out.push(Finding {
                    pos,
                    rule: "drop-column-under-trigger".into(),
                    message: format!(
                        "drops column `{col}` of `{table}` while the dual-write trigger of step `{}` still uses it: PostgreSQL either refuses the drop, or accepts it and every later write to `{table}` fails inside the trigger",
                        trig.name
                    ),
                    help: Some(format!("add a step `drop_trigger: {}` before this one", trig.name)),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::plan::validate::validate;
    use std::path::Path;

    fn rules(yaml: &str) -> Vec<String> {
        match validate(Path::new("t.yaml"), yaml) {
            Ok(p) => p
                .notes
                .iter()
                .map(|d| format!("allowed:{}", d.rule))
                .collect(),
            Err(e) => e.diagnostics().iter().map(|d| d.rule.clone()).collect(),
        }
    }

    #[test]
    fn validate_in_same_step_as_not_valid_is_flagged() {
        let r = rules(
            "phases:\n  contract:\n    - name: g\n      gate: go\n    - name: c\n      sql: ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0) NOT VALID, VALIDATE CONSTRAINT c\n",
        );
        assert!(
            r.contains(&"scan-under-exclusive-lock".to_string()),
            "{r:?}"
        );
        let r = rules(
            "phases:\n  contract:\n    - name: g\n      gate: go\n    - name: c\n      sql: |\n        ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0) NOT VALID;\n        ALTER TABLE t VALIDATE CONSTRAINT c;\n",
        );
        assert!(
            r.contains(&"scan-under-exclusive-lock".to_string()),
            "{r:?}"
        );
    }

    #[test]
    fn split_not_valid_and_validate_pass() {
        let r = rules(
            "phases:\n  contract:\n    - name: g\n      gate: go\n    - name: c\n      sql: ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0) NOT VALID\n      rollback: ALTER TABLE t DROP CONSTRAINT IF EXISTS c\n    - name: v\n      sql: ALTER TABLE t VALIDATE CONSTRAINT c\n",
        );
        assert!(r.iter().all(|x| !x.starts_with("scan")), "{r:?}");
        assert!(!r.contains(&"contract-before-gate".to_string()), "{r:?}");
    }

    #[test]
    fn moot_rules_are_not_raised_and_own_drops_are_fine() {
        let r = rules(
            "phases:\n  expand:\n    - name: a\n      sql: ALTER TABLE leads ADD COLUMN IF NOT EXISTS email_hash text\n      rollback: ALTER TABLE leads DROP COLUMN IF EXISTS email_hash\n",
        );
        assert!(r.is_empty(), "{r:?}");
    }

    #[test]
    fn a_rollback_dropping_something_else_is_flagged() {
        let r = rules(
            "phases:\n  expand:\n    - name: a\n      sql: ALTER TABLE leads ADD COLUMN IF NOT EXISTS email_hash text\n      rollback: ALTER TABLE leads DROP COLUMN IF EXISTS email\n",
        );
        assert!(r.contains(&"ban-drop-column".to_string()), "{r:?}");
    }

    #[test]
    fn plan_level_rules() {
        let r = rules(
            "phases:\n  expand:\n    - name: a\n      sql: ALTER TABLE leads ADD COLUMN IF NOT EXISTS h text\n  backfill:\n    - name: b\n      backfill: { table: leads, set: { h: \"md5(email)\" } }\n  contract:\n    - name: c\n      sql: ALTER TABLE leads DROP COLUMN email\n",
        );
        for rule in [
            "missing-rollback",
            "backfill-without-dual-write",
            "contract-before-gate",
            "ban-drop-column",
        ] {
            assert!(r.contains(&rule.to_string()), "{rule} in {r:?}");
        }
    }

    #[test]
    fn dropping_a_column_the_trigger_uses_needs_drop_trigger_first() {
        let base = "phases:\n  expand:\n    - name: add\n      sql: ALTER TABLE c ADD COLUMN IF NOT EXISTS b text\n      rollback: ALTER TABLE c DROP COLUMN IF EXISTS b\n  dual_write:\n    - name: sync\n      trigger: { table: c, set: { b: NEW.a }, reverse: { a: NEW.b } }\n  contract:\n    - name: g\n      gate: go\n";
        let drop = "    - name: drop_a\n      sql: ALTER TABLE c DROP COLUMN a\n      allow: { ban-drop-column: \"test\" }\n";
        let r = rules(&format!("{base}{drop}"));
        assert!(
            r.contains(&"drop-column-under-trigger".to_string()),
            "{r:?}"
        );
        let r = rules(&format!(
            "{base}    - name: stop\n      drop_trigger: sync\n{drop}"
        ));
        assert!(
            !r.contains(&"drop-column-under-trigger".to_string()),
            "{r:?}"
        );
    }

    #[test]
    fn allow_turns_a_finding_into_a_note() {
        let r = rules(
            "phases:\n  contract:\n    - name: g\n      gate: go\n    - name: c\n      sql: ALTER TABLE leads DROP COLUMN email\n      allow: { ban-drop-column: \"the app stopped reading it in v42\" }\n",
        );
        assert_eq!(r, vec!["allowed:ban-drop-column"]);
    }
}
