//! `drop_default`: after the gate (the new application version gives the
//! column a value itself; the old one may rely on the default),
//! `ALTER COLUMN … DROP DEFAULT`; the rollback sets the default it had again
//! (read from the catalog).

use super::common::{Fields, table_sql};
use super::set_default::restore;
use super::{Gen, GenKind, Refusal};
use crate::ident::{Ident, QualifiedName};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub column: Ident,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "drop_default", &["table", "column"], &[])?;
    Some(Spec {
        table: f.table(r, "table")?,
        column: f.column(r, "column")?,
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let facts = g.table(&s.table)?;
    let col = facts.column(s.column.as_str()).ok_or_else(|| {
        Refusal::Finding(format!(
            "column {} does not exist in {}",
            s.column.quoted(),
            s.table
        ))
    })?;
    let Some(old) = col.default.as_deref() else {
        return Err(Refusal::Finding(format!(
            "column {} of {} has no default to drop",
            s.column.quoted(),
            s.table
        )));
    };
    let t = table_sql(&s.table);
    let c = s.column.quoted();
    let step = g
        .step(
            Phase::Contract,
            "drop",
            GenKind::Sql(format!("ALTER TABLE {t} ALTER COLUMN {c} DROP DEFAULT")),
            "writers must give the value from now on",
        )
        .rollback(restore(&t, &c, Some(old)))
        .allow("ban-drop-default", "the plan asks for it (drop_default), after the gate: the new application version gives the value itself");
    g.push(step);
    g.requires(format!(
        "gives `{}` of {} a value in every insert (it has no default any more)",
        s.column.as_str(),
        s.table
    ));
    Ok(())
}
