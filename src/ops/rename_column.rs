//! `rename_column`: the new name arrives as a twin column of the same type,
//! kept in step both ways by a trigger (either application version may write
//! either name), backfilled, and given the column's NOT NULL, default,
//! indexes and constraints. After the gate (the new version reads and writes
//! only the new name) the old column is renamed aside, not dropped: a trigger
//! keeps it equal to the new one, so `pgshift rollback` still works after the
//! plan is done, until `pgshift finalize`.

use super::common::{Fields, table_sql};
use super::drop_table::retired;
use super::{Gen, GenKind, Refusal, twin};
use crate::ident::{Ident, QualifiedName, quote_ident};
use crate::kind::trigger::{self, TriggerSpec};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub column: Ident,
    pub to: Ident,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "rename_column", &["table", "column", "to"], &[])?;
    Some(Spec {
        table: f.table(r, "table")?,
        column: f.column(r, "column")?,
        to: f.column(r, "to")?,
    })
}

/// The copy's name: the old column's name in it replaced by the new one, or a suffix.
fn renamed(old_object: &str, from: &str, to: &str) -> String {
    let name = if old_object.contains(from) {
        old_object.replacen(from, to, 1)
    } else {
        format!("{old_object}_{to}")
    };
    super::object_name("", &name)
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let facts = g.table(&s.table)?;
    let (from, to) = (s.column.as_str(), s.to.as_str());
    let col = facts.column(from).ok_or_else(|| {
        Refusal::Finding(format!(
            "column {} does not exist in {}",
            s.column.quoted(),
            s.table
        ))
    })?;
    if facts.column(to).is_some() {
        return Err(Refusal::Finding(format!(
            "{} already has a column {}",
            s.table,
            s.to.quoted()
        )));
    }
    twin::check_copyable(facts, col)?;
    if col.identity.is_some() || col.sequence.is_some() {
        return Err(Refusal::Finding(format!(
            "{}.{} draws from a sequence (identity or serial); both names would draw from it. Rename it by hand with a view, or keep the name",
            s.table,
            s.column.quoted()
        )));
    }
    if !facts.references_to(from).is_empty()
        || facts.constraints_on(from).iter().any(|c| c.kind == "p")
    {
        return Err(Refusal::Finding(format!(
            "{}.{} is a primary key or is referenced by foreign keys; pgshift does not rename those yet",
            s.table,
            s.column.quoted()
        )));
    }
    let t = table_sql(&s.table);
    let (c, n) = (s.column.quoted(), s.to.quoted());
    let step = g
        .step(
            Phase::Expand,
            "add",
            GenKind::Sql(format!("ALTER TABLE {t} ADD COLUMN {n} {}", col.type_sql)),
            "the new name, as a nullable twin of the same type: catalog-only",
        )
        .rollback(format!("ALTER TABLE {t} DROP COLUMN IF EXISTS {n}"));
    g.push(step);
    if let Some(d) = &col.default {
        let step = g
            .step(
                Phase::Expand,
                "default",
                GenKind::Sql(format!("ALTER TABLE {t} ALTER COLUMN {n} SET DEFAULT {d}")),
                "the column's default, for rows written with the new name only",
            )
            .rollback(format!("ALTER TABLE {t} ALTER COLUMN {n} DROP DEFAULT"));
        g.push(step);
    }
    let step = g.step(
        Phase::DualWrite,
        "sync",
        GenKind::Trigger {
            table: s.table.clone(),
            set: vec![(s.to.clone(), format!("NEW.{c}"))],
            reverse: vec![(s.column.clone(), format!("NEW.{n}"))],
        },
        "either name, written by either version, reaches the other",
    );
    g.push(step);
    let step = g.step(
        Phase::Backfill,
        "fill",
        GenKind::Backfill {
            table: s.table.clone(),
            set: vec![(s.to.clone(), c.clone())],
            where_: Some(format!("{n} IS DISTINCT FROM {c}")),
        },
        "the rows written before the trigger",
    );
    g.push(step);
    let (steps, _) = twin::copies(g, facts, col, to, "copy", &|old| renamed(old, from, to));
    for step in steps {
        g.push(step);
    }
    g.requires(format!(
        "reads and writes `{to}`, not `{from}`, in {}",
        s.table
    ));
    // After the gate: the old name goes aside in the same transaction that turns
    // the two-way trigger into one that keeps the retired column equal to the new.
    let aside = retired(from);
    let aq = quote_ident(&aside);
    let sync_name = g.name("sync");
    let retire_name = g.name("set_aside");
    let sync = TriggerSpec {
        table: s.table.clone(),
        set: vec![(s.to.clone(), format!("NEW.{c}"))],
        reverse: vec![(s.column.clone(), format!("NEW.{n}"))],
        when: None,
    };
    let retire = TriggerSpec {
        table: s.table.clone(),
        set: vec![(Ident(aside.clone()), format!("NEW.{n}"))],
        reverse: vec![],
        when: None,
    };
    let mut forward = trigger::rollback_statements(g.plan_id, &sync_name, &sync);
    forward.push(format!("ALTER TABLE {t} RENAME COLUMN {c} TO {aq}"));
    forward.extend(trigger::statements(g.plan_id, &retire_name, &retire));
    let mut undo = trigger::rollback_statements(g.plan_id, &retire_name, &retire);
    undo.push(format!("ALTER TABLE {t} RENAME COLUMN {aq} TO {c}"));
    undo.extend(trigger::statements(g.plan_id, &sync_name, &sync));
    let mut finalize = trigger::rollback_statements(g.plan_id, &retire_name, &retire);
    finalize.push(format!("ALTER TABLE {t} DROP COLUMN IF EXISTS {aq}"));
    let step = g
        .step(
            Phase::Contract,
            "set_aside",
            GenKind::Sql(forward.join(";\n")),
            "the old name goes aside with its data, kept equal to the new one, until `pgshift finalize`",
        )
        .rollback(undo.join(";\n"))
        .finalize(finalize.join(";\n"))
        .allow("renaming-column", "the old column is renamed aside after the gate, when no application version uses it; rollback renames it back")
        .allow("ban-drop-function", "the two-way trigger's function is replaced by the one that keeps the retired column, in the same transaction");
    g.push(step);
    Ok(())
}
