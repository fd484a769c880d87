//! `drop_column`: after the gate the column is renamed aside, not dropped:
//! `pgshift rollback` gives it back with its data until `pgshift finalize` (or
//! the end of `settings.retain`) drops it.
//!
//! With `down` (the value a row written by the new version gets, since that
//! version no longer writes the column), a trigger fills it from the dual-write
//! phase on: the new version's inserts then satisfy a NOT NULL it may carry,
//! and after the rename the same trigger, re-created in the same transaction
//! for the column's new name, keeps filling it, so a rollback finds every row.

use super::common::{Fields, table_sql};
use super::drop_table::retired;
use super::{Gen, GenKind, Refusal, expr};
use crate::ident::{Ident, QualifiedName, quote_ident};
use crate::kind::trigger::{self, TriggerSpec};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub column: Ident,
    pub down: Option<String>,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "drop_column", &["table", "column"], &["down"])?;
    Some(Spec {
        table: f.table(r, "table")?,
        column: f.column(r, "column")?,
        down: f.optional_expression(r, "down")?,
    })
}

/// A trigger that fills `column` with `down` when a writer leaves it NULL.
fn filler(
    table: &QualifiedName,
    column: &Ident,
    down: &str,
    columns: Option<&[String]>,
) -> TriggerSpec {
    let value = format!("coalesce({}, {down})", column.quoted());
    TriggerSpec {
        table: table.clone(),
        set: vec![(column.clone(), expr::over_new(&value, columns))],
        reverse: vec![],
        when: None,
    }
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let t = table_sql(&s.table);
    let c = s.column.quoted();
    let aside = Ident(retired(s.column.as_str()));
    let aside_q = quote_ident(aside.as_str());
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
    let keep = g.name("keep_filled");
    let retire = g.name("set_aside");
    let before = s
        .down
        .as_ref()
        .map(|d| filler(&s.table, &s.column, d, columns.as_deref()));
    if let Some(spec) = &before {
        let step = g.step(
            Phase::DualWrite,
            "keep_filled",
            GenKind::Trigger {
                table: s.table.clone(),
                set: spec.set.clone(),
                reverse: vec![],
            },
            "rows the new version writes without the column get `down`",
        );
        g.push(step);
    }
    g.requires(format!(
        "no longer reads or writes `{}` of {}",
        s.column.as_str(),
        s.table
    ));
    // Renamed aside, and its filler (if any) re-created for the new name, in one
    // transaction: no write ever meets a trigger that names a missing column.
    let mut forward = Vec::new();
    let mut undo = Vec::new();
    let mut finalize = Vec::new();
    let after = s.down.as_ref().map(|d| {
        let mut cols = columns.clone();
        if let Some(cols) = &mut cols {
            cols.push(aside.as_str().to_string());
        }
        let mut spec = filler(&s.table, &aside, d, cols.as_deref());
        // `down` reads other columns, never the dropped one.
        spec.set[0].1 = expr::over_new(&format!("coalesce({aside_q}, {d})"), cols.as_deref());
        spec
    });
    if let (Some(b), Some(a)) = (&before, &after) {
        forward.extend(trigger::rollback_statements(g.plan_id, &keep, b));
        forward.push(format!("ALTER TABLE {t} RENAME COLUMN {c} TO {aside_q}"));
        forward.extend(trigger::statements(g.plan_id, &retire, a));
        undo.extend(trigger::rollback_statements(g.plan_id, &retire, a));
        undo.push(format!("ALTER TABLE {t} RENAME COLUMN {aside_q} TO {c}"));
        undo.extend(trigger::statements(g.plan_id, &keep, b));
        finalize.extend(trigger::rollback_statements(g.plan_id, &retire, a));
    } else {
        forward.push(format!("ALTER TABLE {t} RENAME COLUMN {c} TO {aside_q}"));
        undo.push(format!("ALTER TABLE {t} RENAME COLUMN {aside_q} TO {c}"));
    }
    finalize.push(format!("ALTER TABLE {t} DROP COLUMN IF EXISTS {aside_q}"));
    let step = g
        .step(
            Phase::Contract,
            "set_aside",
            GenKind::Sql(forward.join(";\n")),
            "renamed aside with its data, until `pgshift finalize`",
        )
        .rollback(undo.join(";\n"))
        .finalize(finalize.join(";\n"))
        .allow(
            "renaming-column",
            "after the gate no application version uses the column; it is renamed aside, not dropped, and the rollback renames it back",
        );
    let step = if s.down.is_some() {
        step.allow(
            "ban-drop-function",
            "it replaces the filler trigger's function with one for the column's new name, in the same transaction",
        )
    } else {
        step
    };
    g.push(step);
    Ok(())
}
