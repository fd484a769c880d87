//! `set_default`: `ALTER COLUMN … SET DEFAULT`, a catalog-only change that
//! applies to rows written from then on; its rollback restores the default the
//! column had (read from the catalog), or drops it.

use super::common::{Fields, table_sql};
use super::{Gen, GenKind, Refusal};
use crate::ident::{Ident, QualifiedName};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub column: Ident,
    pub default: String,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "set_default", &["table", "column", "default"], &[])?;
    Some(Spec {
        table: f.table(r, "table")?,
        column: f.column(r, "column")?,
        default: f.expression(r, "default")?,
    })
}

/// `SET DEFAULT old`, or `DROP DEFAULT` when there was none.
pub fn restore(table: &str, column: &str, old: Option<&str>) -> String {
    match old {
        Some(d) => format!("ALTER TABLE {table} ALTER COLUMN {column} SET DEFAULT {d}"),
        None => format!("ALTER TABLE {table} ALTER COLUMN {column} DROP DEFAULT"),
    }
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
    let t = table_sql(&s.table);
    let c = s.column.quoted();
    let step = g
        .step(
            Phase::Expand,
            "set",
            GenKind::Sql(format!(
                "ALTER TABLE {t} ALTER COLUMN {c} SET DEFAULT {}",
                s.default
            )),
            "for the rows written from now on; existing rows keep their values",
        )
        .rollback(restore(&t, &c, col.default.as_deref()));
    g.push(step);
    Ok(())
}
