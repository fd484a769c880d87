//! `add_column`: a new column, with its default, NOT NULL, index, uniqueness,
//! reference and check, and optionally `up`: a value computed from the row's
//! other columns, kept by a trigger until the new application version writes it.
//!
//! - a constant default (and NOT NULL with it) is added with the column:
//!   PostgreSQL 11+ stores it once, with no rewrite;
//! - a computed default is set for new rows, and the existing rows backfilled;
//! - `up`: a dual-write trigger fills the column for every writer, the backfill
//!   fills the rows before it, and the contract phase (after the gate) drops the
//!   trigger: from then on the application writes the column itself;
//! - NOT NULL on a filled column goes through a validated CHECK; indexes and
//!   uniqueness are built CONCURRENTLY; references and checks NOT VALID, then
//!   validated in a step of their own.

use super::common::{Fields, index_step, not_null_steps, table_sql, validated_constraint};
use super::expr;
use super::{Gen, GenKind, Refusal, object_name};
use crate::ident::{Ident, QualifiedName, quote_ident};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub column: Ident,
    pub type_sql: String,
    pub default: Option<String>,
    pub not_null: bool,
    pub unique: bool,
    pub index: bool,
    pub references: Option<(QualifiedName, Ident)>,
    pub on_delete: Option<String>,
    pub check: Option<String>,
    pub up: Option<String>,
    /// A constraint that the column equals `up`: after the trigger goes, it rejects
    /// a writer that leaves the column out of step.
    pub check_up: bool,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(
        r,
        node,
        "add_column",
        &["table", "column", "type"],
        &[
            "default",
            "not_null",
            "unique",
            "index",
            "references",
            "on_delete",
            "check",
            "up",
            "check_up",
        ],
    )?;
    let references = match f.node("references") {
        Some(n) => {
            let rf = Fields::read(r, n, "add_column references", &["table"], &["column"])?;
            let t = rf.table(r, "table")?;
            let c = if rf.has("column") {
                rf.column(r, "column")?
            } else {
                Ident("id".into())
            };
            Some((t, c))
        }
        None => None,
    };
    let on_delete = match f.string(r, "on_delete") {
        Some(a) => Some(super::add_foreign_key::action(r, f.node("on_delete")?, &a)?),
        None => None,
    };
    Some(Spec {
        table: f.table(r, "table")?,
        column: f.column(r, "column")?,
        type_sql: f.type_sql(r, "type")?,
        default: f.optional_expression(r, "default")?,
        not_null: f.flag(r, "not_null"),
        unique: f.flag(r, "unique"),
        index: f.flag(r, "index"),
        references,
        on_delete,
        check: f.optional_expression(r, "check")?,
        up: f.optional_expression(r, "up")?,
        check_up: f.flag(r, "check_up"),
    })
    .filter(|s| {
        if s.check_up && s.up.is_none() {
            r.error(
                node.pos,
                "value",
                "`check_up` needs `up`: the constraint is that the column equals it",
                Some("give `up:`, or remove `check_up`".into()),
            );
            return false;
        }
        true
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let t = table_sql(&s.table);
    let c = s.column.quoted();
    let constant = s.default.as_deref().is_some_and(expr::is_constant) && s.up.is_none();
    // A constant default carries NOT NULL with it at no cost: every row has the default.
    let inline_nn = s.not_null && constant;
    let mut add = format!("ALTER TABLE {t} ADD COLUMN {c} {}", s.type_sql);
    if let Some(d) = s.default.as_deref().filter(|_| constant) {
        add.push_str(&format!(" DEFAULT {d}"));
    }
    if inline_nn {
        add.push_str(" NOT NULL");
    }
    let step = g
        .step(
            Phase::Expand,
            "add",
            GenKind::Sql(add),
            "the column, a catalog-only change",
        )
        .rollback(format!("ALTER TABLE {t} DROP COLUMN IF EXISTS {c}"));
    g.push(step);
    if let Some(d) = s.default.as_deref().filter(|_| !constant) {
        let step = g
            .step(
                Phase::Expand,
                "default",
                GenKind::Sql(format!("ALTER TABLE {t} ALTER COLUMN {c} SET DEFAULT {d}")),
                "the default, for the rows written from now on",
            )
            .rollback(format!("ALTER TABLE {t} ALTER COLUMN {c} DROP DEFAULT"));
        g.push(step);
    }
    if let Some(up) = &s.up {
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
        let over_new = expr::over_new(up, columns.as_deref());
        let step = g.step(
            Phase::DualWrite,
            "sync",
            GenKind::Trigger {
                table: s.table.clone(),
                set: vec![(s.column.clone(), over_new)],
                reverse: vec![],
            },
            "every writer's rows get the column computed from `up`",
        );
        g.push(step);
    }
    // `up`: every row must equal it (a replayed batch changes nothing, and the
    // verification after the last batch counts the rows that still differ); a
    // computed default (`now()`) is only wanted where there is none yet.
    let fill = match (&s.up, &s.default) {
        (Some(up), _) => Some((up.clone(), format!("{c} IS DISTINCT FROM ({up})"))),
        (None, Some(d)) if !constant => Some((d.clone(), format!("{c} IS NULL"))),
        _ => None,
    };
    if let Some((value, where_)) = fill {
        let step = g.step(
            Phase::Backfill,
            "fill",
            GenKind::Backfill {
                table: s.table.clone(),
                set: vec![(s.column.clone(), value)],
                where_: Some(where_),
            },
            "the rows written before the trigger (or the default) existed",
        );
        g.push(step);
    }
    constraints(s, g, &t, &c, inline_nn);
    if s.up.is_some() {
        let sync = g.name("sync");
        let step = g.step(
            Phase::Contract,
            "stop_sync",
            GenKind::DropTrigger(sync),
            "from here the application writes the column itself",
        );
        g.push(step);
        g.requires(format!(
            "writes `{}` of {} itself, in every insert and every update of the columns `up` reads",
            s.column.as_str(),
            s.table
        ));
    }
    Ok(())
}

/// NOT NULL, index, uniqueness, reference and check: after the column is filled.
fn constraints(s: &Spec, g: &mut Gen, t: &str, c: &str, inline_nn: bool) {
    let base = format!("{}_{}", s.table.name.as_str(), s.column.as_str());
    if s.not_null && !inline_nn {
        for step in not_null_steps(g, Phase::Backfill, t, &s.column, "") {
            g.push(step);
        }
    }
    if s.index && !s.unique {
        let idx = quote_ident(&object_name("", &format!("{base}_idx")));
        let step = index_step(
            g,
            Phase::Backfill,
            "index",
            format!("CREATE INDEX CONCURRENTLY IF NOT EXISTS {idx} ON {t} ({c})"),
            &schema_qualified(&s.table, &idx),
            "built without blocking writes",
        );
        g.push(step);
    }
    if s.unique {
        let name = quote_ident(&object_name("", &format!("{base}_key")));
        let step = index_step(
            g,
            Phase::Backfill,
            "unique_index",
            format!("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {t} ({c})"),
            &schema_qualified(&s.table, &name),
            "the unique index, built without blocking writes",
        );
        g.push(step);
        let step = g
            .step(
                Phase::Backfill,
                "unique",
                GenKind::Sql(format!(
                    "ALTER TABLE {t} ADD CONSTRAINT {name} UNIQUE USING INDEX {name}"
                )),
                "the constraint takes over the index: no scan",
            )
            .rollback(format!("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {name}"));
        g.push(step);
    }
    if let Some((rt, rc)) = &s.references {
        if !s.index && !s.unique {
            let idx = quote_ident(&object_name("", &format!("{base}_idx")));
            let step = index_step(
                g,
                Phase::Backfill,
                "fk_index",
                format!("CREATE INDEX CONCURRENTLY IF NOT EXISTS {idx} ON {t} ({c})"),
                &schema_qualified(&s.table, &idx),
                "an index on the referencing column, so that deletes in the referenced table do not scan this one",
            );
            g.push(step);
        }
        let name = quote_ident(&object_name("", &format!("{base}_fkey")));
        let mut def = format!(
            "FOREIGN KEY ({c}) REFERENCES {} ({})",
            rt.quoted(),
            rc.quoted()
        );
        if let Some(a) = &s.on_delete {
            def.push_str(&format!(" ON DELETE {a}"));
        }
        for step in validated_constraint(g, Phase::Backfill, t, &name, &def, "fk") {
            g.push(step);
        }
    }
    if let (true, Some(up)) = (s.check_up, &s.up) {
        let name = quote_ident(&object_name("", &format!("{base}_up")));
        let def = format!("CHECK ({c} = ({up}))");
        for step in validated_constraint(g, Phase::Backfill, t, &name, &def, "check_up") {
            g.push(step);
        }
    }
    if let Some(check) = &s.check {
        let name = quote_ident(&object_name("", &format!("{base}_check")));
        for step in validated_constraint(
            g,
            Phase::Backfill,
            t,
            &name,
            &format!("CHECK ({check})"),
            "check",
        ) {
            g.push(step);
        }
    }
}

/// An index name qualified by the table's schema (an index lives in its table's schema).
pub fn schema_qualified(table: &QualifiedName, quoted_name: &str) -> String {
    match &table.schema {
        Some(s) => format!("{}.{quoted_name}", s.quoted()),
        None => quoted_name.to_string(),
    }
}
