//! squawk's rules, run as a library on every SQL body, minus the ones that are
//! moot under pgshift, and minus the drop findings on a rollback that drops
//! exactly what its own step created.

use std::collections::HashSet;

use squawk_linter::{Linter, LinterSettings, Rule};
use squawk_syntax::ast::AstNode;
use squawk_syntax::{SourceFile, SyntaxKind, SyntaxNode};

use super::{Finding, norm, squawk_rules, statement_at};
use crate::kind::SqlBody;

/// squawk's findings on `body`; with `rollback_created`, the body is a rollback and
/// drops of those names are its purpose, not a finding.
pub(super) fn check(body: &SqlBody, rollback_created: Option<&HashSet<String>>) -> Vec<Finding> {
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

/// Names that the statements of `body` define (tables, columns, indexes, constraints, …).
pub(super) fn created_names(body: &SqlBody) -> HashSet<String> {
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
