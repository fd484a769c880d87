//! `create_index`: `CREATE [UNIQUE] INDEX CONCURRENTLY`, alone in its step
//! (it cannot run in a transaction); an INVALID index left by a failed attempt
//! is dropped before the retry.

use super::add_column::schema_qualified;
use super::common::{Fields, index_step, table_sql};
use super::{Gen, Refusal, object_name};
use crate::ident::{Ident, QualifiedName};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub columns: Vec<Ident>,
    pub name: Ident,
    pub unique: bool,
    pub where_: Option<String>,
    pub method: Option<String>,
    pub include: Vec<Ident>,
}

const METHODS: [&str; 6] = ["btree", "hash", "gist", "spgist", "gin", "brin"];

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(
        r,
        node,
        "create_index",
        &["table", "columns"],
        &["name", "unique", "where", "method", "include"],
    )?;
    let table = f.table(r, "table")?;
    let columns = f.columns(r, "columns")?;
    let name = match f.has("name") {
        true => f.column(r, "name")?,
        false => Ident(object_name(
            "",
            &format!(
                "{}_{}_idx",
                table.name.as_str(),
                columns
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
                    .join("_")
            ),
        )),
    };
    let method = match f.string(r, "method") {
        Some(m) if METHODS.contains(&m.to_ascii_lowercase().as_str()) => {
            Some(m.to_ascii_lowercase())
        }
        Some(m) => {
            r.error(
                f.node("method")?.pos,
                "value",
                format!("`{m}` is not an index method"),
                Some(format!("write one of: {}", METHODS.join(", "))),
            );
            return None;
        }
        None => None,
    };
    Some(Spec {
        table,
        columns,
        name,
        unique: f.flag(r, "unique"),
        where_: f.optional_expression(r, "where")?,
        method,
        include: if f.has("include") {
            f.columns(r, "include")?
        } else {
            Vec::new()
        },
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let t = table_sql(&s.table);
    let name = s.name.quoted();
    let list = |c: &[Ident]| c.iter().map(|c| c.quoted()).collect::<Vec<_>>().join(", ");
    let mut sql = format!(
        "CREATE {}INDEX CONCURRENTLY IF NOT EXISTS {name} ON {t}{} ({})",
        if s.unique { "UNIQUE " } else { "" },
        s.method
            .as_deref()
            .map(|m| format!(" USING {m}"))
            .unwrap_or_default(),
        list(&s.columns)
    );
    if !s.include.is_empty() {
        sql.push_str(&format!(" INCLUDE ({})", list(&s.include)));
    }
    if let Some(w) = &s.where_ {
        sql.push_str(&format!(" WHERE {w}"));
    }
    let step = index_step(
        g,
        Phase::Expand,
        "create",
        sql,
        &schema_qualified(&s.table, &name),
        "built without blocking writes",
    );
    g.push(step);
    Ok(())
}
