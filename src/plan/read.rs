//! The toolkit that turns nodes of the YAML tree into checked values, recording
//! every problem as a diagnostic with its position, the step it belongs to, what
//! is wrong and what would be valid. `validate.rs` walks the plan with it, and
//! each step kind (`kind/`) reads its own body with it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use super::defaults;
use super::diag::{Diagnostic, Severity};
use super::raw::{Node, Pos, Value};
use super::sql;
use crate::duration;
use crate::ident;

/// Reads nodes of one plan file and collects what is wrong with them.
pub struct Reader {
    pub file: PathBuf,
    pub diags: Vec<Diagnostic>,
    /// The step being read, named in every diagnostic.
    pub step: Option<String>,
}

impl Reader {
    pub fn new(file: PathBuf) -> Reader {
        Reader {
            file,
            diags: Vec::new(),
            step: None,
        }
    }

    pub fn has_errors(&self) -> bool {
        self.diags.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn error(
        &mut self,
        pos: Pos,
        rule: &str,
        message: impl Into<String>,
        help: Option<String>,
    ) {
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

    pub fn warning(
        &mut self,
        pos: Pos,
        rule: &str,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        self.error(pos, rule, message, help);
        if let Some(last) = self.diags.last_mut() {
            last.severity = Severity::Warning;
        }
    }

    /// The entries of a map node, reporting keys outside `allowed` (with a suggestion).
    pub fn entries<'n>(
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

    pub fn string(&mut self, node: &Node, what: &str) -> Option<String> {
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

    pub fn duration(&mut self, node: &Node, what: &str) -> Option<Duration> {
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

    pub fn integer(&mut self, node: &Node, what: &str, min: i64, max: i64) -> Option<i64> {
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

    pub fn expression(&mut self, node: &Node, what: &str) -> Option<String> {
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

    pub fn query(&mut self, node: &Node, what: &str) -> Option<String> {
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

    pub fn table(&mut self, node: &Node, what: &str) -> Option<ident::QualifiedName> {
        let text = self.string(node, what)?;
        match ident::parse_qualified(&text) {
            Ok(q) => Some(q),
            Err(e) => {
                self.error(node.pos, "identifier", format!("{what} `{text}`: {e}"), Some("write `table`, `schema.table`, or a double-quoted name such as `\"Lead Emails\"`".into()));
                None
            }
        }
    }

    pub fn column(&mut self, node: &Node, what: &str) -> Option<ident::Ident> {
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
    pub fn assignments(&mut self, node: &Node, what: &str) -> Option<Vec<(ident::Ident, String)>> {
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

    pub fn error_count(&self) -> usize {
        self.diags
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .count()
    }
}

/// Like [`pos_in_scalar`] for values that may be quoted or folded: exact for
/// plain one-line values and literal blocks, the value's start otherwise.
pub fn pos_in_value(node: &Node, text: &str, offset: usize) -> Pos {
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
pub fn pos_in_scalar(node: &Node, text: &str, offset: usize) -> Pos {
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

/// Advice for a number outside its range, naming the default where there is one.
pub fn range_help(what: &str) -> Option<String> {
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
pub fn thousands(n: i64) -> String {
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

pub fn first_words(sql: &str) -> String {
    let words: Vec<&str> = sql.split_whitespace().take(4).collect();
    words.join(" ")
}

pub fn key_text(node: &Node) -> String {
    match &node.value {
        Value::Str(s) => s.clone(),
        other => other.describe().to_string(),
    }
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

pub fn levenshtein(a: &str, b: &str) -> usize {
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
