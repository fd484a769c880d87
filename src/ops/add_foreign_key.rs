//! `add_foreign_key`: `NOT VALID` (a brief SHARE ROW EXCLUSIVE on both tables,
//! no scan), then `VALIDATE` in a step of its own; and an index on the
//! referencing columns when none leads with them, so that a delete in the
//! referenced table does not scan this one.

use super::add_column::schema_qualified;
use super::common::{Fields, index_step, table_sql, validated_constraint};
use super::{Gen, Refusal, object_name};
use crate::ident::{Ident, QualifiedName, quote_ident};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub columns: Vec<Ident>,
    pub ref_table: QualifiedName,
    pub ref_columns: Vec<Ident>,
    pub on_delete: Option<String>,
    pub on_update: Option<String>,
    pub name: Ident,
}

/// The referential actions PostgreSQL knows, as `on_delete`/`on_update` take them.
pub const ACTIONS: [(&str, &str); 5] = [
    ("cascade", "CASCADE"),
    ("restrict", "RESTRICT"),
    ("no_action", "NO ACTION"),
    ("set_null", "SET NULL"),
    ("set_default", "SET DEFAULT"),
];

/// `set_null` → `SET NULL`; anything else is an error.
pub fn action(r: &mut Reader, node: &Node, text: &str) -> Option<String> {
    let key = text.trim().to_ascii_lowercase().replace(' ', "_");
    match ACTIONS.iter().find(|(k, _)| *k == key) {
        Some((_, sql)) => Some(sql.to_string()),
        None => {
            r.error(
                node.pos,
                "value",
                format!("`{text}` is not a referential action"),
                Some(format!(
                    "write one of: {}",
                    ACTIONS
                        .iter()
                        .map(|(k, _)| *k)
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            );
            None
        }
    }
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(
        r,
        node,
        "add_foreign_key",
        &["table", "columns", "references"],
        &["on_delete", "on_update", "name"],
    )?;
    let refs = f.node("references")?;
    let rf = Fields::read(
        r,
        refs,
        "add_foreign_key references",
        &["table"],
        &["columns"],
    )?;
    let table = f.table(r, "table")?;
    let columns = f.columns(r, "columns")?;
    let ref_table = rf.table(r, "table")?;
    let ref_columns = if rf.has("columns") {
        rf.columns(r, "columns")?
    } else {
        vec![Ident("id".into())]
    };
    if ref_columns.len() != columns.len() {
        r.error(
            refs.pos,
            "value",
            format!(
                "{} referencing column(s) but {} referenced",
                columns.len(),
                ref_columns.len()
            ),
            Some("give as many `references.columns` as `columns`".into()),
        );
        return None;
    }
    let mut act = |key: &str| -> Option<Option<String>> {
        match f.string(r, key) {
            Some(a) => action(r, f.node(key)?, &a).map(Some),
            None => Some(None),
        }
    };
    let on_delete = act("on_delete")?;
    let on_update = act("on_update")?;
    let name = match f.has("name") {
        true => f.column(r, "name")?,
        false => Ident(object_name(
            "",
            &format!(
                "{}_{}_fkey",
                table.name.as_str(),
                columns
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join("_")
            ),
        )),
    };
    Some(Spec {
        table,
        columns,
        ref_table,
        ref_columns,
        on_delete,
        on_update,
        name,
    })
}

fn list(cols: &[Ident]) -> String {
    cols.iter()
        .map(|c| c.quoted())
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let facts = g.table(&s.table)?;
    let t = table_sql(&s.table);
    let cols = list(&s.columns);
    let names: Vec<&str> = s.columns.iter().map(|c| c.as_str()).collect();
    // An index whose leading key columns are the referencing columns serves the check.
    let indexed = facts.indexes.iter().any(|i| {
        i.valid
            && i.predicate.is_none()
            && i.columns.len() >= names.len()
            && i.columns
                .iter()
                .zip(&names)
                .all(|(a, b)| a.as_deref() == Some(*b))
    });
    if !indexed {
        let idx = quote_ident(&object_name(
            "",
            &format!("{}_{}_idx", s.table.name.as_str(), names.join("_")),
        ));
        let step = index_step(
            g,
            Phase::Expand,
            "index",
            format!("CREATE INDEX CONCURRENTLY IF NOT EXISTS {idx} ON {t} ({cols})"),
            &schema_qualified(&s.table, &idx),
            "no index leads with the referencing columns: one, built without blocking writes",
        );
        g.push(step);
    }
    let mut def = format!(
        "FOREIGN KEY ({cols}) REFERENCES {} ({})",
        s.ref_table.quoted(),
        list(&s.ref_columns)
    );
    if let Some(a) = &s.on_delete {
        def.push_str(&format!(" ON DELETE {a}"));
    }
    if let Some(a) = &s.on_update {
        def.push_str(&format!(" ON UPDATE {a}"));
    }
    for step in validated_constraint(g, Phase::Expand, &t, &s.name.quoted(), &def, "fk") {
        g.push(step);
    }
    Ok(())
}
