//! `add_check`: `ADD CONSTRAINT … CHECK (…) NOT VALID` (no scan; new and
//! updated rows are checked from then on), then `VALIDATE` in a step of its own.
//! Rows that would violate it are counted by the pre-flight, before anything runs.

use super::common::{Fields, table_sql, validated_constraint};
use super::{Gen, Refusal};
use crate::ident::{Ident, QualifiedName};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub name: Ident,
    pub check: String,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "add_check", &["table", "name", "check"], &[])?;
    Some(Spec {
        table: f.table(r, "table")?,
        name: f.column(r, "name")?,
        check: f.expression(r, "check")?,
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let t = table_sql(&s.table);
    let def = format!("CHECK ({})", s.check);
    for step in validated_constraint(g, Phase::Expand, &t, &s.name.quoted(), &def, "check") {
        g.push(step);
    }
    Ok(())
}
