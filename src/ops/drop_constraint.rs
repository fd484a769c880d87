//! `drop_constraint`: `ALTER TABLE … DROP CONSTRAINT`, a brief lock. Its undo
//! re-adds the constraint without a scan under ACCESS EXCLUSIVE, in two steps
//! that a rollback runs latest first: a check or foreign key comes back
//! `NOT VALID` and is then validated; a unique or primary key constraint gets
//! its index back CONCURRENTLY and then takes it over. The definition is read
//! from the catalog.

use super::common::{Fields, table_sql, undo_only};
use super::{Gen, GenKind, Refusal};
use crate::ident::{Ident, QualifiedName, quote_ident};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub name: Ident,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "drop_constraint", &["table", "name"], &[])?;
    Some(Spec {
        table: f.table(r, "table")?,
        name: f.column(r, "name")?,
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let facts = g.table(&s.table)?;
    let Some(con) = facts.constraints.iter().find(|c| c.name == s.name.as_str()) else {
        return Err(Refusal::Finding(format!(
            "{} has no constraint {}",
            s.table,
            s.name.quoted()
        )));
    };
    let t = table_sql(&s.table);
    let name = s.name.quoted();
    let drop = format!("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {name}");
    match con.kind.as_str() {
        "c" | "f" => {
            let validate = undo_only(
                g,
                Phase::Expand,
                "undo_validate",
                format!("ALTER TABLE {t} VALIDATE CONSTRAINT {name}"),
                "on rollback it validates the constraint again, under SHARE UPDATE EXCLUSIVE",
            );
            g.push(validate);
            let step = g
                .step(Phase::Expand, "drop", GenKind::Sql(drop), "a brief lock, no scan")
                .rollback(format!("ALTER TABLE {t} ADD CONSTRAINT {name} {} NOT VALID", con.definition))
                .allow("ban-drop-constraint", "the plan asks for it (drop_constraint); its rollback adds it back NOT VALID and validates it");
            g.push(step);
        }
        "u" | "p" => {
            let index = facts
                .indexes
                .iter()
                .find(|i| i.constraint.as_deref() == Some(con.name.as_str()))
                .ok_or_else(|| {
                    Refusal::Finding(format!("the index of constraint {name} was not found"))
                })?;
            let kind = if con.kind == "p" {
                "PRIMARY KEY"
            } else {
                "UNIQUE"
            };
            if con.kind == "p" && !facts.referenced_by.is_empty() {
                return Err(Refusal::Finding(format!(
                    "the primary key {name} of {} is referenced by foreign keys ({}); drop those first",
                    s.table,
                    facts
                        .referenced_by
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let adopt = undo_only(
                g,
                Phase::Expand,
                "undo_adopt",
                format!(
                    "ALTER TABLE {t} ADD CONSTRAINT {name} {kind} USING INDEX {}",
                    quote_ident(&index.name)
                ),
                "on rollback the constraint takes its rebuilt index over, without a scan",
            );
            g.push(adopt);
            let rebuild =
                index
                    .definition
                    .replacen(" INDEX ", " INDEX CONCURRENTLY IF NOT EXISTS ", 1);
            let step = g
                .step(Phase::Expand, "drop", GenKind::Sql(drop), "a brief lock; its index goes with it")
                .rollback(rebuild)
                .allow("ban-drop-constraint", "the plan asks for it (drop_constraint); its rollback rebuilds the index CONCURRENTLY and re-adds the constraint on it");
            g.push(step);
        }
        other => {
            return Err(Refusal::Finding(format!(
                "constraint {name} is of a kind (`{other}`) drop_constraint cannot restore on rollback; use a `sql` operation with its `down`"
            )));
        }
    }
    Ok(())
}
