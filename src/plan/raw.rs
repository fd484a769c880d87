//! The plan file as YAML sees it: a tree of maps, lists and scalars, each with
//! the line and column where it was written, and nothing more.
//!
//! This is the only module that names the YAML crate. It deliberately does not
//! map the file onto typed structs with serde: serde stops at the first error,
//! and a plan author deserves every mistake in the file at once. `validate.rs`
//! walks this tree, collects all errors, and builds the typed plan.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// A position in the plan file, 1-based.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

/// One node of the YAML tree with the position it was written at.
#[derive(Debug, Clone)]
pub struct Node {
    pub pos: Pos,
    pub value: Value,
}

/// The shapes a YAML node can take.
#[derive(Debug, Clone)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Keys in file order; duplicate keys are rejected by the parser.
    Map(Vec<(Node, Node)>),
}

impl Value {
    /// How the value is described in error messages ("a map", "a string", …).
    pub fn describe(&self) -> &'static str {
        match self {
            Value::Null => "nothing (null)",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a map",
        }
    }
}

/// A YAML syntax error, with the position the parser reports.
#[derive(Debug, Clone)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

/// Structural limits for a plan file. A real plan is a few hundred nodes a few
/// levels deep; these bounds are far above that and far below what would take
/// noticeable time or memory, so an alias bomb or a file of 10,000 nested `[`
/// fails in milliseconds with a message instead of exhausting the machine.
pub const MAX_DEPTH: usize = 32;
pub const MAX_NODES: usize = 20_000;
pub const MAX_ALIASES: usize = 1_000;

/// Parses one YAML document into a positioned tree.
///
/// Duplicate keys are errors; alias expansion and nesting depth are bounded
/// (see [`MAX_DEPTH`], [`MAX_NODES`], [`MAX_ALIASES`]).
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let options = serde_saphyr::options! {
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        with_snippet: false,
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
            flow_nesting_limit: MAX_DEPTH,
            max_nodes: MAX_NODES,
            max_aliases: MAX_ALIASES,
        },
    };
    match serde_saphyr::from_str_with_options::<Spanned<Tree>>(text, options) {
        Ok(s) => Ok(into_node(s)),
        Err(e) => {
            let pos = e
                .location()
                .map(|l| Pos {
                    line: l.line() as u32,
                    col: l.column() as u32,
                })
                .unwrap_or(Pos { line: 1, col: 1 });
            let message = match &e {
                serde_saphyr::Error::Budget { breach, .. } => describe_breach(breach),
                _ => clean_message(&e.to_string()),
            };
            Err(SyntaxError { pos, message })
        }
    }
}

const DEPTH_MESSAGE: &str =
    "the document is nested more than {MAX_DEPTH} levels deep; a plan needs fewer than 10";
const NODES_MESSAGE: &str = "the document has more than {MAX_NODES} values once aliases are expanded (an alias bomb?); a plan needs far fewer";
const ALIASES_MESSAGE: &str = "the document uses more than {MAX_ALIASES} aliases (`*name`); write the plan out in full instead";

/// A budget breach in words a plan author can act on.
fn describe_breach(breach: &serde_saphyr::budget::BudgetBreach) -> String {
    use serde_saphyr::budget::BudgetBreach as B;
    match breach {
        B::Depth { .. } => DEPTH_MESSAGE.replace("{MAX_DEPTH}", &MAX_DEPTH.to_string()),
        B::Nodes { .. } => NODES_MESSAGE.replace("{MAX_NODES}", &MAX_NODES.to_string()),
        B::Aliases { .. } | B::AliasAnchorRatio { .. } => {
            ALIASES_MESSAGE.replace("{MAX_ALIASES}", &MAX_ALIASES.to_string())
        }
        other => format!("the document exceeds a size limit for plan files ({other:?})"),
    }
}

/// The parser's message without its own location suffix (we print ours), and
/// without advice about the parser's options, which a plan author cannot change.
fn clean_message(msg: &str) -> String {
    let first = msg.lines().next().unwrap_or(msg).trim();
    let first = match first.find(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    if let Some(rest) = first.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(", set ").next().unwrap_or(rest).trim();
        return format!("key `{key}` appears twice in the same map");
    }
    if first.contains("recursion limit exceeded") || first.contains("budget breached: Depth") {
        return DEPTH_MESSAGE.replace("{MAX_DEPTH}", &MAX_DEPTH.to_string());
    }
    // Some breaches reach us as text (wrapped by the deserializer), not as `Error::Budget`.
    if first.contains("budget breached: Nodes") {
        return NODES_MESSAGE.replace("{MAX_NODES}", &MAX_NODES.to_string());
    }
    if first.contains("budget breached: Alias") {
        return ALIASES_MESSAGE.replace("{MAX_ALIASES}", &MAX_ALIASES.to_string());
    }
    first.to_string()
}

fn into_node(s: Spanned<Tree>) -> Node {
    let pos = Pos {
        line: s.referenced.line() as u32,
        col: s.referenced.column() as u32,
    };
    let value = match s.value {
        Tree::Null => Value::Null,
        Tree::Bool(b) => Value::Bool(b),
        Tree::Int(i) => Value::Int(i),
        Tree::Float(f) => Value::Float(f),
        Tree::Str(t) => Value::Str(t),
        Tree::Seq(items) => Value::Seq(items.into_iter().map(into_node).collect()),
        Tree::Map(entries) => Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| (into_node(k), into_node(v)))
                .collect(),
        ),
    };
    Node { pos, value }
}

/// The serde-facing mirror of [`Value`], with positions on every child.
enum Tree {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Spanned<Tree>>),
    Map(Vec<(Spanned<Tree>, Spanned<Tree>)>),
}

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TreeVisitor)
    }
}

struct TreeVisitor;

impl<'de> Visitor<'de> for TreeVisitor {
    type Value = Tree;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E>(self) -> Result<Tree, E> {
        Ok(Tree::Null)
    }
    fn visit_none<E>(self) -> Result<Tree, E> {
        Ok(Tree::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Tree, D::Error> {
        Tree::deserialize(d)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Tree, E> {
        Ok(Tree::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Tree, E> {
        Ok(Tree::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Tree, E> {
        i64::try_from(v)
            .map(Tree::Int)
            .map_err(|_| E::custom("integer too large"))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Tree, E> {
        i64::try_from(v)
            .map(Tree::Int)
            .map_err(|_| E::custom("integer too large"))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Tree, E> {
        i64::try_from(v)
            .map(Tree::Int)
            .map_err(|_| E::custom("integer too large"))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Tree, E> {
        Ok(Tree::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Tree, E> {
        Ok(Tree::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Tree, E> {
        Ok(Tree::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Tree, E> {
        Err(E::custom("binary values are not allowed in a plan"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Tree>>()? {
            items.push(item);
        }
        Ok(Tree::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tree, A::Error> {
        let mut entries = Vec::new();
        while let Some(k) = map.next_key::<Spanned<Tree>>()? {
            let v = map.next_value::<Spanned<Tree>>()?;
            entries.push((k, v));
        }
        Ok(Tree::Map(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_keys_and_values() {
        let n =
            parse("id: x\nphases:\n  expand:\n    - name: a\n      sql: |\n        SELECT 1;\n")
                .unwrap();
        let Value::Map(top) = &n.value else { panic!() };
        assert_eq!(top[1].0.pos, Pos { line: 2, col: 1 });
        let Value::Map(ph) = &top[1].1.value else {
            panic!()
        };
        let Value::Seq(steps) = &ph[0].1.value else {
            panic!()
        };
        let Value::Map(step) = &steps[0].value else {
            panic!()
        };
        assert_eq!(step[1].0.pos, Pos { line: 5, col: 7 });
        eprintln!("{:?}", step[1].1.pos);
    }

    #[test]
    fn duplicate_keys_are_errors() {
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(e.pos.line, 2, "{e:?}");
    }

    #[test]
    fn alias_bomb_is_refused() {
        let mut y = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            y.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"));
        }
        assert!(parse(&y).is_err());
    }
}
