//! A column's twin: the new column that `change_type` and `rename_column` add
//! beside an existing one, kept in step by a trigger, backfilled, and given the
//! old column's NOT NULL, indexes and constraints before it takes the old one's
//! place. This module builds those copies from the catalog's facts.

use super::catalog::{Column, Index, Table};
use super::common::{index_step, not_null_steps, validated_constraint};
use super::{Gen, GenStep, Refusal, expr, object_name};
use crate::ident::{Ident, quote_ident};
use crate::plan::phase::Phase;

/// An index of the old column and its twin's copy.
#[derive(Debug, Clone)]
pub struct IndexCopy {
    pub old: String,
    pub new: String,
    /// The constraint (`p` or `u`) the old index backs: the twin's index takes it over at the swap.
    pub constraint: Option<(String, String)>,
}

/// A constraint of the old column and its twin's copy (a check or a foreign key).
#[derive(Debug, Clone)]
pub struct ConstraintCopy {
    pub old: String,
    pub new: String,
}

/// What the twin was given, for the swap.
#[derive(Debug, Clone, Default)]
pub struct Copies {
    pub indexes: Vec<IndexCopy>,
    pub constraints: Vec<ConstraintCopy>,
}

/// The schema-qualified, quoted name of an object of `table`'s schema.
pub fn in_schema(table: &Table, name: &str) -> String {
    format!("{}.{}", quote_ident(&table.schema), quote_ident(name))
}

/// Refuses what the twin cannot copy faithfully.
pub fn check_copyable(table: &Table, column: &Column) -> Result<(), Refusal> {
    if column.generated {
        return Err(Refusal::Finding(format!(
            "{}.{} is a generated column; its expression would have to change too. Write the steps by hand (`pgshift plan expand` gives a start)",
            table.quoted(),
            quote_ident(&column.name)
        )));
    }
    if let Some(deps) = table.dependents.get(&column.name).filter(|d| !d.is_empty()) {
        return Err(Refusal::Finding(format!(
            "{}.{} is used by {}: they would keep the old column. Drop or change them first (a `sql` operation), then this one",
            table.quoted(),
            quote_ident(&column.name),
            deps.iter()
                .map(|d| format!("{} {}", d.kind, d.name))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for i in table.indexes_on(&column.name) {
        if i.columns.iter().any(Option::is_none) {
            return Err(Refusal::Finding(format!(
                "index {} of {} has an expression among its keys, which pgshift cannot yet rebuild for the new column; drop it first (drop_index) and create it again afterwards",
                i.name,
                table.quoted()
            )));
        }
    }
    Ok(())
}

/// `CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS new ON table …` with `from` replaced by `to`.
fn index_sql(table: &Table, index: &Index, name: &str, from: &str, to: &str) -> String {
    let swap = |c: &str| {
        if c == from {
            to.to_string()
        } else {
            c.to_string()
        }
    };
    let keys: Vec<String> = index
        .columns
        .iter()
        .flatten()
        .map(|c| quote_ident(&swap(c)))
        .collect();
    let mut sql = format!(
        "CREATE {}INDEX CONCURRENTLY IF NOT EXISTS {} ON {} USING {} ({})",
        if index.unique { "UNIQUE " } else { "" },
        quote_ident(name),
        table.quoted(),
        index.method,
        keys.join(", ")
    );
    if !index.include.is_empty() {
        let inc: Vec<String> = index
            .include
            .iter()
            .map(|c| quote_ident(&swap(c)))
            .collect();
        sql.push_str(&format!(" INCLUDE ({})", inc.join(", ")));
    }
    if let Some(p) = &index.predicate {
        sql.push_str(&format!(" WHERE {}", expr::rename_column(p, from, to)));
    }
    sql
}

/// The twin's NOT NULL, indexes and constraints, as steps of the backfill phase
/// (after the twin is filled). `name_for` names the twin's copy of an object.
pub fn copies(
    g: &Gen,
    table: &Table,
    column: &Column,
    twin: &str,
    tag: &str,
    name_for: &dyn Fn(&str) -> String,
) -> (Vec<GenStep>, Copies) {
    let t = table.quoted();
    let mut steps = Vec::new();
    let mut out = Copies::default();
    if column.not_null {
        steps.extend(not_null_steps(
            g,
            Phase::Backfill,
            &t,
            &Ident(twin.to_string()),
            tag,
        ));
    }
    for (k, index) in table.indexes_on(&column.name).into_iter().enumerate() {
        let new = name_for(&index.name);
        let sql = index_sql(table, index, &new, &column.name, twin);
        steps.push(index_step(
            g,
            Phase::Backfill,
            &format!("{tag}_index_{}", k + 1),
            sql,
            &in_schema(table, &new),
            &format!(
                "a copy of index {} for the new column, built without blocking writes",
                index.name
            ),
        ));
        let constraint = index.constraint.as_ref().and_then(|c| {
            table
                .constraints
                .iter()
                .find(|x| &x.name == c)
                .map(|x| (x.name.clone(), x.kind.clone()))
        });
        out.indexes.push(IndexCopy {
            old: index.name.clone(),
            new,
            constraint,
        });
    }
    for (k, con) in table
        .constraints_on(&column.name)
        .into_iter()
        .filter(|c| c.kind == "c" || c.kind == "f")
        .enumerate()
    {
        let new = name_for(&con.name);
        let definition = match con.kind.as_str() {
            "c" => expr::rename_column(&con.definition, &column.name, twin),
            _ => fk_definition(con, &column.name, twin),
        };
        steps.extend(validated_constraint(
            g,
            Phase::Backfill,
            &t,
            &quote_ident(&new),
            &definition,
            &format!("{tag}_constraint_{}", k + 1),
        ));
        out.constraints.push(ConstraintCopy {
            old: con.name.clone(),
            new,
        });
    }
    (steps, out)
}

/// A foreign key's definition with `from` replaced by `to` in its own column list
/// (not in the referenced one, which may use the same name).
fn fk_definition(con: &super::catalog::Constraint, from: &str, to: &str) -> String {
    let rest = con
        .definition
        .find(')')
        .map(|i| &con.definition[i + 1..])
        .unwrap_or("");
    let cols: Vec<String> = con
        .columns
        .iter()
        .map(|c| quote_ident(if c == from { to } else { c }))
        .collect();
    format!("FOREIGN KEY ({}){rest}", cols.join(", "))
}

/// The statements of the swap that exchange names: indexes and constraints of
/// the old column go aside (`retired_…`), the twin's take their names, and a
/// primary key or unique constraint moves onto the twin's index. `undo` gives
/// the statements that put everything back (the primary key or unique
/// constraint onto `kept`, the rebuilt index of the old column).
pub fn renames(
    table: &Table,
    copies: &Copies,
    undo: bool,
    kept: &dyn Fn(&str) -> String,
) -> Vec<String> {
    let t = table.quoted();
    let mut out = Vec::new();
    for ic in &copies.indexes {
        match &ic.constraint {
            Some((name, kind)) => {
                let what = if kind == "p" { "PRIMARY KEY" } else { "UNIQUE" };
                let onto = if undo { kept(&ic.old) } else { ic.new.clone() };
                out.push(format!(
                    "ALTER TABLE {t} DROP CONSTRAINT {}",
                    quote_ident(name)
                ));
                out.push(format!(
                    "ALTER TABLE {t} ADD CONSTRAINT {} {what} USING INDEX {}",
                    quote_ident(name),
                    quote_ident(&onto)
                ));
            }
            None => {
                let aside = object_name("pgshift_retired_", &ic.old);
                // Forward: old → aside, copy → old. Undo: old → copy, aside → old.
                let (first, second) = if undo {
                    ((&ic.old, &ic.new), (&aside, &ic.old))
                } else {
                    ((&ic.old, &aside), (&ic.new, &ic.old))
                };
                for (from, to) in [first, second] {
                    out.push(format!(
                        "ALTER INDEX {} RENAME TO {}",
                        in_schema(table, from),
                        quote_ident(to)
                    ));
                }
            }
        }
    }
    for cc in &copies.constraints {
        let aside = object_name("pgshift_retired_", &cc.old);
        if undo {
            out.push(format!(
                "ALTER TABLE {t} RENAME CONSTRAINT {} TO {}",
                quote_ident(&cc.old),
                quote_ident(&cc.new)
            ));
            out.push(format!(
                "ALTER TABLE {t} RENAME CONSTRAINT {} TO {}",
                quote_ident(&aside),
                quote_ident(&cc.old)
            ));
        } else {
            out.push(format!(
                "ALTER TABLE {t} RENAME CONSTRAINT {} TO {}",
                quote_ident(&cc.old),
                quote_ident(&aside)
            ));
            out.push(format!(
                "ALTER TABLE {t} RENAME CONSTRAINT {} TO {}",
                quote_ident(&cc.new),
                quote_ident(&cc.old)
            ));
        }
    }
    out
}

/// The index that a primary key or unique constraint of the old column returns
/// to on rollback: a copy of `index` on the old column under its retired name,
/// rebuilt CONCURRENTLY before the swap's undo needs it.
pub fn kept_index(table: &Table, index: &Index, column: &str, retired: &str, name: &str) -> String {
    index_sql(table, index, name, column, retired)
}
