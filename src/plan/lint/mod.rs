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

use squawk_linter::{Linter, Rule};
use squawk_syntax::{SyntaxKind, SyntaxNode};

use super::*;
use crate::kind::{SqlBody, StepKind};

mod backfill_without_dual_write;
mod contract_before_gate;
mod drop_column_under_trigger;
mod missing_rollback;
mod scan_under_exclusive_lock;
mod squawk;

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

pub(crate) fn squawk_rules(transactional: bool) -> Vec<Rule> {
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
            let scans = scan_under_exclusive_lock::check(body);
            // squawk's `constraint-missing-not-valid` reports the same mistake as our
            // rule when NOT VALID and VALIDATE share a transaction; one finding is enough.
            found.extend(squawk::check(body, None).into_iter().filter(|f| {
                !(f.rule == "constraint-missing-not-valid" && scans.iter().any(|s| s.pos == f.pos))
            }));
            found.extend(scans);
        }
        if let Some(Rollback::Sql(body)) = &step.rollback {
            let created = match &step.kind {
                StepKind::Sql(fwd) => squawk::created_names(fwd),
                _ => HashSet::new(),
            };
            found.extend(
                squawk::check(body, Some(&created))
                    .into_iter()
                    .map(|mut f| {
                        f.message = format!("in the rollback: {}", f.message);
                        f
                    }),
            );
        }
        found.extend(backfill_without_dual_write::check(plan, step));
        found.extend(missing_rollback::check(step));
        found.extend(contract_before_gate::check(plan, step));
        if let StepKind::Sql(body) = &step.kind {
            found.extend(drop_column_under_trigger::check(plan, step, body));
        }
        let mut used = HashSet::new();
        for f in found {
            let mut d = Diagnostic {
                file: plan.file.clone(),
                // A generated step's text is not in the file: point at its operation.
                pos: if step.generated { step.pos } else { f.pos },
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
        // A generated step carries the operation's `allow` for all its steps, and
        // pgshift's own acknowledgements: one that matches nothing here is no news.
        for rule in step
            .allow
            .keys()
            .filter(|r| !used.contains(*r) && !step.generated)
        {
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

/// One finding of a rule, before it becomes a diagnostic.
struct Finding {
    pos: Pos,
    rule: String,
    message: String,
    help: Option<String>,
}

/// The statement of `body` that contains byte `offset`, for positions.
pub(crate) fn statement_at(body: &SqlBody, offset: usize) -> Option<&Statement> {
    body.statements.iter().rev().find(|s| s.offset <= offset)
}

/// An identifier as the catalog stores it: quoted kept, unquoted folded.
fn norm(text: &str) -> String {
    let t = text.trim();
    match t.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        Some(q) => q.replace("\"\"", "\""),
        None => t.to_ascii_lowercase(),
    }
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
