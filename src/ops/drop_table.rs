//! `drop_table`: after the gate the table is renamed aside, not dropped, so
//! that `pgshift rollback` can give it back with every row; `pgshift finalize`
//! (or the end of `settings.retain`) drops it.

use super::common::{Fields, table_sql};
use super::{Gen, GenKind, Refusal, object_name};
use crate::ident::{QualifiedName, quote_ident};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "drop_table", &["table"], &[])?;
    Some(Spec {
        table: f.table(r, "table")?,
    })
}

/// The name a retired table or column is kept under until finalize.
pub fn retired(name: &str) -> String {
    object_name("pgshift_retired_", name)
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let t = table_sql(&s.table);
    let aside = retired(s.table.name.as_str());
    let aside_q = quote_ident(&aside);
    let aside_full = match &s.table.schema {
        Some(sc) => format!("{}.{aside_q}", sc.quoted()),
        None => aside_q.clone(),
    };
    g.requires(format!("no longer reads or writes table {}", s.table));
    let step = g
        .step(
            Phase::Contract,
            "set_aside",
            GenKind::Sql(format!("ALTER TABLE {t} RENAME TO {aside_q}")),
            "renamed aside with its rows, until `pgshift finalize`",
        )
        .rollback(format!("ALTER TABLE {aside_full} RENAME TO {}", s.table.name.quoted()))
        .finalize(format!("DROP TABLE IF EXISTS {aside_full}"))
        .allow(
            "renaming-table",
            "after the gate no application version uses the table; it is renamed aside, not dropped, and the rollback renames it back",
        );
    g.push(step);
    Ok(())
}
