//! `change_type`: a column changes its type and keeps its name, with no
//! rewrite under lock and no application change when the application can live
//! with the new type (`integer` → `bigint` before the ids run out).
//!
//! A twin column of the new type is added, kept in step by a trigger (`up`,
//! by default a cast), backfilled, and given the old column's NOT NULL,
//! indexes (built CONCURRENTLY) and constraints (NOT VALID, then validated).
//! Then one short transaction, under the lock timeout, swaps them by rename:
//! the old column goes aside, kept in step by a trigger in the other direction
//! (`down`, by default the reverse cast) so that a rollback finds every row
//! written meanwhile; the twin takes the old name, the old default, identity or
//! sequence, the old index and constraint names, and the primary key.
//!
//! A primary key referenced by foreign keys works too (pgroll's #375): each
//! referencing column gets the same treatment in the same plan, the foreign
//! keys are dropped and re-added `NOT VALID` inside the swap, and validated in
//! a step of their own right after it.

use super::catalog::{Column, Constraint, Table};
use super::common::{Fields, undo_only};
use super::drop_table::retired;
use super::twin::{self, Copies};
use super::{Gen, GenKind, Refusal, expr, object_name};
use crate::ident::{Ident, QualifiedName, quote_ident, quote_literal};
use crate::kind::trigger::{self, TriggerSpec};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub column: Ident,
    pub type_sql: String,
    /// The new value from the old one, over the row; default `column::type`.
    pub up: Option<String>,
    /// The old value from the new one (the column keeps its name); default the reverse cast.
    pub down: Option<String>,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(
        r,
        node,
        "change_type",
        &["table", "column", "type"],
        &["up", "down"],
    )?;
    Some(Spec {
        table: f.table(r, "table")?,
        column: f.column(r, "column")?,
        type_sql: f.type_sql(r, "type")?,
        up: f.optional_expression(r, "up")?,
        down: f.optional_expression(r, "down")?,
    })
}

/// One column that changes type: the plan's, or one that references it.
struct Side<'a> {
    facts: &'a Table,
    column: &'a Column,
    twin: String,
    retired: String,
    new_type: String,
    /// The new value, over the row with the old column (for the backfill and the check).
    up: String,
    /// The old value, over the row with the new column under the old name.
    down: String,
    copies: Copies,
    /// The foreign key (of this side, to the plan's column) re-created by the swap.
    fk: Option<&'a Constraint>,
}

impl Side<'_> {
    fn t(&self) -> String {
        self.facts.quoted()
    }

    fn columns(&self, extra: &str) -> Vec<String> {
        let mut c: Vec<String> = self.facts.columns.iter().map(|c| c.name.clone()).collect();
        c.push(extra.to_string());
        c
    }

    /// Before the swap: the twin follows the old column.
    fn sync(&self) -> TriggerSpec {
        TriggerSpec {
            table: qualified(self.facts),
            set: vec![(
                Ident(self.twin.clone()),
                expr::over_new(&self.up, Some(&self.columns(&self.twin))),
            )],
            reverse: vec![],
            when: None,
        }
    }

    /// After the swap: the retired column follows the new one.
    fn retire(&self) -> TriggerSpec {
        TriggerSpec {
            table: qualified(self.facts),
            set: vec![(
                Ident(self.retired.clone()),
                expr::over_new(&self.down, Some(&self.columns(&self.retired))),
            )],
            reverse: vec![],
            when: None,
        }
    }
}

fn qualified(t: &Table) -> QualifiedName {
    QualifiedName {
        schema: Some(Ident(t.schema.clone())),
        name: Ident(t.name.clone()),
    }
}

fn side<'a>(
    g: &Gen,
    facts: &'a Table,
    column: &str,
    new_type: &str,
    up: Option<&str>,
    down: Option<&str>,
) -> Result<Side<'a>, Refusal> {
    let col = facts.column(column).ok_or_else(|| {
        Refusal::Finding(format!(
            "column {} does not exist in {}",
            quote_ident(column),
            facts.quoted()
        ))
    })?;
    twin::check_copyable(facts, col)?;
    let c = quote_ident(column);
    let _ = g;
    Ok(Side {
        facts,
        column: col,
        twin: object_name("pgshift_new_", column),
        retired: retired(column),
        new_type: new_type.to_string(),
        up: up
            .map(str::to_string)
            .unwrap_or_else(|| format!("{c}::{new_type}")),
        down: down
            .map(str::to_string)
            .unwrap_or_else(|| format!("{c}::{}", col.type_sql)),
        copies: Copies::default(),
        fk: None,
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let facts = g.table(&s.table)?;
    let cat = g.catalog.ok_or(Refusal::NeedsCatalog)?;
    let mut sides = vec![side(
        g,
        facts,
        s.column.as_str(),
        &s.type_sql,
        s.up.as_deref(),
        s.down.as_deref(),
    )?];
    if sides[0].column.type_sql == s.type_sql {
        return Err(Refusal::Finding(format!(
            "{}.{} is already of type {}",
            s.table,
            s.column.quoted(),
            s.type_sql
        )));
    }
    for fk in facts.references_to(s.column.as_str()) {
        if fk.columns.len() != 1 {
            return Err(Refusal::Finding(format!(
                "foreign key {} on {} references {}.{} together with other columns; pgshift converts single-column references only",
                fk.name,
                fk.table,
                s.table,
                s.column.quoted()
            )));
        }
        let (schema, name) = fk.table.split_once('.').unwrap_or(("public", &fk.table));
        let rt = cat.table(Some(schema), name).ok_or_else(|| {
            Refusal::Finding(format!("the referencing table {} was not read", fk.table))
        })?;
        let mut sd = side(g, rt, &fk.columns[0], &s.type_sql, None, None)?;
        sd.fk = Some(fk);
        sides.push(sd);
    }
    expand_sides(s, g, &mut sides)
}

fn expand_sides(s: &Spec, g: &mut Gen, sides: &mut [Side]) -> Result<(), Refusal> {
    for (i, sd) in sides.iter().enumerate() {
        let t = sd.t();
        let tw = quote_ident(&sd.twin);
        let step = g
            .step(
                Phase::Expand,
                &tag("add_twin", i),
                GenKind::Sql(format!("ALTER TABLE {t} ADD COLUMN {tw} {}", sd.new_type)),
                &format!(
                    "the twin of {}.{} with the new type, nullable: catalog-only",
                    t,
                    quote_ident(&sd.column.name)
                ),
            )
            .rollback(format!("ALTER TABLE {t} DROP COLUMN IF EXISTS {tw}"));
        g.push(step);
    }
    for (i, sd) in sides.iter().enumerate() {
        let spec = sd.sync();
        let step = g.step(
            Phase::DualWrite,
            &tag("sync", i),
            GenKind::Trigger {
                table: spec.table,
                set: spec.set,
                reverse: vec![],
            },
            "every write of the old column reaches the twin",
        );
        g.push(step);
    }
    for (i, sd) in sides.iter().enumerate() {
        let step = g.step(
            Phase::Backfill,
            &tag("fill", i),
            GenKind::Backfill {
                table: qualified(sd.facts),
                set: vec![(Ident(sd.twin.clone()), sd.up.clone())],
                where_: Some(format!(
                    "{} IS DISTINCT FROM ({})",
                    quote_ident(&sd.twin),
                    sd.up
                )),
            },
            "the rows written before the trigger",
        );
        g.push(step);
    }
    let skip: Vec<String> = sides
        .iter()
        .filter_map(|sd| sd.fk.map(|f| f.name.clone()))
        .collect();
    for (i, sd) in sides.iter_mut().enumerate() {
        let mut facts = sd.facts.clone();
        // The references to the plan's column are re-created by the swap itself.
        facts.constraints.retain(|c| !skip.contains(&c.name));
        let prefix = format!("pgshift_{}_", g.change.index);
        let (steps, copies) =
            twin::copies(g, &facts, sd.column, &sd.twin, &tag("twin", i), &|old| {
                object_name(&prefix, old)
            });
        for step in steps {
            g.push(step);
        }
        sd.copies = copies;
    }
    contract(s, g, sides)
}

/// `name`, `name_2`, … for the plan's column and the referencing ones.
fn tag(what: &str, i: usize) -> String {
    if i == 0 {
        what.to_string()
    } else {
        format!("{what}_{}", i + 1)
    }
}

fn contract(s: &Spec, g: &mut Gen, sides: &[Side]) -> Result<(), Refusal> {
    let differ: Vec<String> = sides
        .iter()
        .map(|sd| {
            format!(
                "NOT EXISTS (SELECT FROM {} WHERE {} IS DISTINCT FROM ({}))",
                sd.t(),
                quote_ident(&sd.twin),
                sd.up
            )
        })
        .collect();
    let step = g.step(
        Phase::Contract,
        "in_step",
        GenKind::Check(format!("SELECT {}", differ.join(" AND "))),
        "every twin equals its column: nothing was missed",
    );
    g.push(step);
    let refs: Vec<(&Side, &Constraint)> = sides
        .iter()
        .filter_map(|sd| sd.fk.map(|f| (sd, f)))
        .collect();
    if !refs.is_empty() {
        let validate: Vec<String> = refs
            .iter()
            .map(|(sd, f)| {
                format!(
                    "ALTER TABLE {} VALIDATE CONSTRAINT {}",
                    sd.t(),
                    quote_ident(&f.name)
                )
            })
            .collect();
        let step = undo_only(
            g,
            Phase::Contract,
            "undo_validate_refs",
            validate.join(";\n"),
            "on rollback it validates the old foreign keys, which the undone swap re-adds NOT VALID",
        );
        g.push(step);
    }
    let swap_name = g.name("swap");
    let kept = |old: &str| object_name(&format!("pgshift_keep_{}_", g.change.index), old);
    let forward = swap_sql(g.plan_id, g, &swap_name, sides, false, &kept);
    let undo = swap_sql(g.plan_id, g, &swap_name, sides, true, &kept);
    let mut finalize = Vec::new();
    for (i, sd) in sides.iter().enumerate() {
        finalize.extend(trigger::rollback_statements(
            g.plan_id,
            &format!("{swap_name}_{i}"),
            &sd.retire(),
        ));
        finalize.push(format!(
            "ALTER TABLE {} DROP COLUMN IF EXISTS {}",
            sd.t(),
            quote_ident(&sd.retired)
        ));
    }
    let step = g
        .step(
            Phase::Contract,
            "swap",
            GenKind::Sql(forward.join(";\n")),
            "one short transaction: the twin takes the column's name, default, identity, indexes and constraints; the old column goes aside, kept in step for a rollback",
        )
        .rollback(undo.join(";\n"))
        .finalize(finalize.join(";\n"))
        .allow("renaming-column", "the swap renames the old column aside and the twin into its place in one transaction; no application sees a column missing")
        .allow("ban-drop-constraint", "the swap moves each constraint onto the twin in the same transaction")
        .allow("renaming-object", "the swap gives the twin's indexes the old names and sets the old ones aside, in one transaction")
        .allow("ban-drop-function", "the swap replaces the twin's trigger function with the one that keeps the retired column, in the same transaction");
    g.push(step);
    // Rebuilt on rollback before the swap's undo, which moves the primary key
    // (or unique constraint) back onto them.
    for (i, sd) in sides.iter().enumerate() {
        for (k, ic) in sd
            .copies
            .indexes
            .iter()
            .filter(|c| c.constraint.is_some())
            .enumerate()
        {
            let Some(index) = sd.facts.indexes.iter().find(|x| x.name == ic.old) else {
                continue;
            };
            let name = kept(&ic.old);
            let sql = twin::kept_index(sd.facts, index, &sd.column.name, &sd.retired, &name);
            let step = undo_only(
                g,
                Phase::Contract,
                &format!("{}_{}", tag("undo_keep_index", i), k + 1),
                sql,
                &format!(
                    "on rollback it rebuilds index {} on the old column, CONCURRENTLY, for the swap's undo",
                    ic.old
                ),
            );
            g.push(step);
        }
    }
    for (j, (sd, f)) in refs.iter().enumerate() {
        let step = g
            .step(
                Phase::Contract,
                &format!("validate_ref_{}", j + 1),
                GenKind::Sql(format!(
                    "ALTER TABLE {} VALIDATE CONSTRAINT {}",
                    sd.t(),
                    quote_ident(&f.name)
                )),
                "the re-pointed foreign key, validated under SHARE UPDATE EXCLUSIVE",
            )
            // Nothing to undo: the swap's rollback replaces this foreign key by the old one.
            .rollback("SELECT 1");
        g.push(step);
    }
    let _ = s;
    Ok(())
}

/// The swap (or, with `undo`, its exact reverse) as statements of one transaction.
fn swap_sql(
    plan_id: &str,
    g: &Gen,
    swap_name: &str,
    sides: &[Side],
    undo: bool,
    kept: &dyn Fn(&str) -> String,
) -> Vec<String> {
    let mut out = Vec::new();
    let tables: Vec<String> = {
        let mut t: Vec<String> = sides.iter().map(Side::t).collect();
        t.sort();
        t.dedup();
        t
    };
    // Every lock at once, in one order, under the step's lock timeout.
    out.push(format!(
        "LOCK TABLE {} IN ACCESS EXCLUSIVE MODE",
        tables.join(", ")
    ));
    for sd in sides {
        if let Some(f) = sd.fk {
            out.push(format!(
                "ALTER TABLE {} DROP CONSTRAINT {}",
                sd.t(),
                quote_ident(&f.name)
            ));
        }
    }
    for (i, sd) in sides.iter().enumerate() {
        let t = sd.t();
        let c = quote_ident(&sd.column.name);
        let tw = quote_ident(&sd.twin);
        let rt = quote_ident(&sd.retired);
        let sync_name = g.name(&tag("sync", i));
        let retire_name = format!("{swap_name}_{i}");
        if undo {
            out.extend(trigger::rollback_statements(
                plan_id,
                &retire_name,
                &sd.retire(),
            ));
            out.extend(twin::renames(sd.facts, &sd.copies, true, kept));
            out.push(format!("ALTER TABLE {t} RENAME COLUMN {c} TO {tw}"));
            out.push(format!("ALTER TABLE {t} RENAME COLUMN {rt} TO {c}"));
            out.extend(move_default(sd, &sd.twin, &sd.column.name, true));
            out.extend(trigger::statements(plan_id, &sync_name, &sd.sync()));
        } else {
            out.extend(trigger::rollback_statements(
                plan_id,
                &sync_name,
                &sd.sync(),
            ));
            out.push(format!("ALTER TABLE {t} RENAME COLUMN {c} TO {rt}"));
            out.push(format!("ALTER TABLE {t} RENAME COLUMN {tw} TO {c}"));
            out.extend(move_default(sd, &sd.retired, &sd.column.name, false));
            out.extend(twin::renames(sd.facts, &sd.copies, false, kept));
            out.extend(trigger::statements(plan_id, &retire_name, &sd.retire()));
        }
    }
    for sd in sides {
        if let Some(f) = sd.fk {
            out.push(format!(
                "ALTER TABLE {} ADD CONSTRAINT {} {} NOT VALID",
                sd.t(),
                quote_ident(&f.name),
                f.definition
            ));
        }
    }
    out
}

/// Moves the default, identity or sequence from column `from` to `to` (both named
/// as they are at that point of the swap). `undo`: moving back to the old type.
fn move_default(sd: &Side, from: &str, to: &str, undo: bool) -> Vec<String> {
    let t = sd.t();
    let (f, c) = (quote_ident(from), quote_ident(to));
    let col = sd.column;
    let mut out = Vec::new();
    if let Some(kind) = &col.identity {
        let generated = if kind == "a" { "ALWAYS" } else { "BY DEFAULT" };
        // The next value of the old sequence becomes the first of the new one: no
        // id is ever handed out twice. The table is locked: nobody draws meanwhile.
        out.push(format!(
            "DO $pgshift$\nDECLARE next bigint := nextval(pg_get_serial_sequence({}, {}));\nBEGIN\n  ALTER TABLE {t} ALTER COLUMN {f} DROP IDENTITY;\n  EXECUTE format('ALTER TABLE {} ALTER COLUMN {} ADD GENERATED {generated} AS IDENTITY (START WITH %s)', next);\nEND\n$pgshift$",
            quote_literal(&t),
            quote_literal(from),
            t.replace('\'', "''"),
            c.replace('\'', "''"),
        ));
        return out;
    }
    if let Some(d) = &col.default {
        out.push(format!("ALTER TABLE {t} ALTER COLUMN {f} DROP DEFAULT"));
        out.push(format!("ALTER TABLE {t} ALTER COLUMN {c} SET DEFAULT {d}"));
        if let Some(seq) = &col.sequence {
            out.push(format!("ALTER SEQUENCE {seq} OWNED BY {t}.{c}"));
            let wide = ["bigint", "int8"].contains(&sd.new_type.to_ascii_lowercase().as_str());
            let narrow = ["integer", "smallint"].contains(&col.type_sql.as_str());
            if wide && narrow {
                let ty = if undo {
                    col.type_sql.as_str()
                } else {
                    "bigint"
                };
                out.push(format!("ALTER SEQUENCE {seq} AS {ty}"));
            }
        }
    }
    out
}
