//! `set_not_null`: with `fill`, a trigger fills the NULLs every writer leaves
//! and the backfill fills the rows before it; after the gate, NOT NULL goes in
//! through a validated CHECK (no scan under ACCESS EXCLUSIVE), then the
//! trigger goes. Without `fill`, the pre-flight counts the NULL rows first.

use super::common::{Fields, not_null_steps, table_sql};
use super::{Gen, GenKind, Refusal, expr};
use crate::ident::{Ident, QualifiedName};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub column: Ident,
    pub fill: Option<String>,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "set_not_null", &["table", "column"], &["fill"])?;
    Some(Spec {
        table: f.table(r, "table")?,
        column: f.column(r, "column")?,
        fill: f.optional_expression(r, "fill")?,
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let t = table_sql(&s.table);
    let c = s.column.quoted();
    if let Some(fill) = &s.fill {
        let columns = g
            .catalog
            .and_then(|cat| {
                cat.table(
                    s.table.schema.as_ref().map(|x| x.as_str()),
                    s.table.name.as_str(),
                )
            })
            .map(|tb| {
                tb.columns
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>()
            });
        let value = format!("coalesce({c}, {fill})");
        let step = g.step(
            Phase::DualWrite,
            "fill_nulls",
            GenKind::Trigger {
                table: s.table.clone(),
                set: vec![(s.column.clone(), expr::over_new(&value, columns.as_deref()))],
                reverse: vec![],
            },
            "a NULL any writer leaves becomes `fill`",
        );
        g.push(step);
        let step = g.step(
            Phase::Backfill,
            "fill",
            GenKind::Backfill {
                table: s.table.clone(),
                set: vec![(s.column.clone(), fill.clone())],
                where_: Some(format!("{c} IS NULL")),
            },
            "the NULL rows written before the trigger",
        );
        g.push(step);
    }
    g.requires(format!(
        "never writes NULL into `{}` of {}",
        s.column.as_str(),
        s.table
    ));
    for step in not_null_steps(g, Phase::Contract, &t, &s.column, "") {
        g.push(step);
    }
    if s.fill.is_some() {
        let trigger = g.name("fill_nulls");
        let step = g.step(
            Phase::Contract,
            "stop_fill",
            GenKind::DropTrigger(trigger),
            "NOT NULL holds; the application writes a value itself",
        );
        g.push(step);
    }
    Ok(())
}
