//! `sql`: statements the operations do not cover (a type, an extension, a
//! function), with the statements that undo them: `up` in the expand phase,
//! `down` its rollback.

use super::common::Fields;
use super::{Gen, GenKind, Refusal};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub up: String,
    pub down: Option<String>,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "sql", &["up"], &["down"])?;
    Some(Spec {
        up: f.string(r, "up")?,
        down: if f.has("down") {
            Some(f.string(r, "down")?)
        } else {
            None
        },
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let mut step = g.step(
        Phase::Expand,
        "up",
        GenKind::Sql(s.up.clone()),
        "as written in the plan",
    );
    if let Some(d) = &s.down {
        step = step.rollback(d.clone());
    }
    g.push(step);
    Ok(())
}
