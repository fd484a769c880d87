//! The plan's YAML tree written back as a YAML file: what `pgshift plan expand`
//! prints. Block style, keys in the order of the tree, multi-line SQL as
//! literal blocks, and a string quoted whenever it could read as anything but
//! itself, so that the printed plan parses back to the same tree (tested).

use crate::plan::raw::{Node, Value};

/// `node` as YAML text.
pub fn emit(node: &Node) -> String {
    let mut out = String::new();
    match &node.value {
        Value::Map(entries) if !entries.is_empty() => map(&mut out, entries, 0),
        Value::Seq(items) if !items.is_empty() => seq(&mut out, items, 0),
        _ => {
            out.push_str(&scalar(&node.value, 0));
            out.push('\n');
        }
    }
    out
}

fn pad(n: usize) -> String {
    " ".repeat(n)
}

fn map(out: &mut String, entries: &[(Node, Node)], indent: usize) {
    for (i, (k, v)) in entries.iter().enumerate() {
        let key = scalar(&k.value, indent);
        // The first key of a list item follows its `- ` on the same line.
        if !(i == 0 && out.ends_with("- ")) {
            out.push_str(&pad(indent));
        }
        out.push_str(&key);
        out.push(':');
        value(out, &v.value, indent);
    }
}

fn seq(out: &mut String, items: &[Node], indent: usize) {
    for item in items {
        out.push_str(&pad(indent));
        out.push_str("- ");
        match &item.value {
            Value::Map(entries) if !entries.is_empty() => map(out, entries, indent + 2),
            Value::Seq(inner) if !inner.is_empty() => {
                out.push('\n');
                seq(out, inner, indent + 2);
            }
            other => {
                out.push_str(&scalar(other, indent + 2));
                out.push('\n');
            }
        }
    }
}

/// The value after `key:` (a space and a scalar, or a nested block).
fn value(out: &mut String, v: &Value, indent: usize) {
    match v {
        Value::Map(entries) if !entries.is_empty() => {
            out.push('\n');
            map(out, entries, indent + 2);
        }
        Value::Seq(items) if !items.is_empty() => {
            out.push('\n');
            seq(out, items, indent + 2);
        }
        other => {
            out.push(' ');
            out.push_str(&scalar(other, indent));
            out.push('\n');
        }
    }
}

fn scalar(v: &Value, indent: usize) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Str(s) => string(s, indent),
        Value::Map(_) => "{}".into(),
        Value::Seq(_) => "[]".into(),
    }
}

/// A string as a plain scalar when that is unambiguous, as a literal block when
/// it has several lines, and double-quoted otherwise.
fn string(s: &str, indent: usize) -> String {
    if plain_ok(s) {
        return s.to_string();
    }
    let block_ok = s.contains('\n')
        && !s.starts_with([' ', '\t', '\n'])
        && !s.contains('\r')
        && s.chars().all(|c| c == '\n' || c == '\t' || !c.is_control());
    if block_ok {
        let (body, chomp) = match s.strip_suffix('\n') {
            Some(b) if !b.ends_with('\n') => (b, ""),
            _ => (s, "-"),
        };
        if !body.ends_with('\n') {
            let inner = pad(indent + 2);
            let lines: Vec<String> = body
                .split('\n')
                .map(|l| {
                    if l.is_empty() {
                        String::new()
                    } else {
                        format!("{inner}{l}")
                    }
                })
                .collect();
            return format!("|{chomp}\n{}", lines.join("\n"));
        }
    }
    quoted(s)
}

fn quoted(s: &str) -> String {
    let mut q = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\t' => q.push_str("\\t"),
            '\r' => q.push_str("\\r"),
            c if c.is_control() => q.push_str(&format!("\\x{:02x}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// True when `s` written bare reads back as the same string.
fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let reserved = [
        "true", "false", "yes", "no", "on", "off", "null", "y", "n", "~",
    ];
    !(s != s.trim()
        || "-?:,[]{}#&*!|>'\"%@`".contains(first)
        || s.contains(": ")
        || s.contains(" #")
        || s.ends_with(':')
        || s.chars().any(|c| c.is_control() || "{}[]".contains(c))
        || reserved.contains(&s.to_ascii_lowercase().as_str())
        || s.parse::<f64>().is_ok()
        || s.starts_with("0x")
        || s.starts_with("0o")
        || s.contains('\u{feff}'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::raw;

    fn same(a: &Node, b: &Node) -> bool {
        match (&a.value, &b.value) {
            (Value::Map(x), Value::Map(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y)
                        .all(|((k1, v1), (k2, v2))| same(k1, k2) && same(v1, v2))
            }
            (Value::Seq(x), Value::Seq(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same(p, q))
            }
            (Value::Str(x), Value::Str(y)) => x == y,
            (Value::Int(x), Value::Int(y)) => x == y,
            (Value::Bool(x), Value::Bool(y)) => x == y,
            (Value::Null, Value::Null) => true,
            (Value::Float(x), Value::Float(y)) => x == y,
            _ => false,
        }
    }

    #[test]
    fn what_is_printed_parses_back_to_the_same_tree() {
        let text = r#"id: t
description: "a: b # not a comment"
phases:
  expand:
    - name: a
      sql: |
        ALTER TABLE t ADD COLUMN c text;
          -- indented comment
        SELECT 'x: y'
      rollback: "ALTER TABLE t DROP COLUMN IF EXISTS c"
      allow: { ban-drop-column: "yes" }
    - name: b
      sql: "  leading spaces"
      check: "true"
      n: 5
      q: "5"
      e: ""
      tab: "a\tb"
      m: {}
      l: []
      quote: 'it''s "quoted"'
      back: "C:\\path"
      ends: "line\n"
      ends2: "line\n\n"
"#;
        let tree = raw::parse(text).unwrap();
        let printed = emit(&tree);
        let again = raw::parse(&printed).unwrap_or_else(|e| panic!("{e:?}\n{printed}"));
        assert!(same(&tree, &again), "{printed}");
    }
}
