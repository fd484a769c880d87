//! `add_unique`: `CREATE UNIQUE INDEX CONCURRENTLY` (writes go on while it is
//! built), then `ADD CONSTRAINT … UNIQUE USING INDEX`, which takes the index
//! over without a scan. Duplicates are counted by the pre-flight.

use super::add_column::schema_qualified;
use super::common::{Fields, index_step, table_sql};
use super::{Gen, GenKind, Refusal, object_name};
use crate::ident::{Ident, QualifiedName};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub columns: Vec<Ident>,
    pub name: Ident,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "add_unique", &["table", "columns"], &["name"])?;
    let table = f.table(r, "table")?;
    let columns = f.columns(r, "columns")?;
    let name = match f.has("name") {
        true => f.column(r, "name")?,
        false => Ident(object_name(
            "",
            &format!(
                "{}_{}_key",
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
        name,
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let t = table_sql(&s.table);
    let name = s.name.quoted();
    let cols = s
        .columns
        .iter()
        .map(|c| c.quoted())
        .collect::<Vec<_>>()
        .join(", ");
    let step = index_step(
        g,
        Phase::Expand,
        "index",
        format!("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {t} ({cols})"),
        &schema_qualified(&s.table, &name),
        "the unique index, built without blocking writes",
    );
    g.push(step);
    let step = g
        .step(
            Phase::Expand,
            "constraint",
            GenKind::Sql(format!(
                "ALTER TABLE {t} ADD CONSTRAINT {name} UNIQUE USING INDEX {name}"
            )),
            "the constraint takes the index over: no scan",
        )
        .rollback(format!("ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {name}"));
    g.push(step);
    Ok(())
}
