//! `drop_index`: `DROP INDEX CONCURRENTLY` (writes go on); its rollback builds
//! the index again from its definition, CONCURRENTLY. An index that backs a
//! constraint is refused: that is `drop_constraint`'s.

use super::common::Fields;
use super::{Gen, GenKind, Refusal};
use crate::ident::QualifiedName;
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub name: QualifiedName,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "drop_index", &["name"], &[])?;
    Some(Spec {
        name: f.table(r, "name")?,
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let cat = g.catalog.ok_or(Refusal::NeedsCatalog)?;
    let want = s.name.name.as_str();
    let schema = s.name.schema.as_ref().map(|x| x.as_str());
    let found = cat.tables.values().find_map(|t| {
        t.indexes
            .iter()
            .find(|i| i.name == want && schema.is_none_or(|sc| sc == t.schema))
            .map(|i| (t, i))
    });
    let Some((table, index)) = found else {
        return Err(Refusal::Finding(format!("index {} does not exist", s.name)));
    };
    if let Some(con) = &index.constraint {
        return Err(Refusal::Finding(format!(
            "index {} backs the constraint `{con}` of {}: drop the constraint instead (`drop_constraint: {{ table: {}, name: {con} }}`)",
            s.name,
            table.quoted(),
            table.quoted()
        )));
    }
    let qualified = format!(
        "{}.{}",
        crate::ident::quote_ident(&table.schema),
        crate::ident::quote_ident(&index.name)
    );
    let create = index
        .definition
        .replacen(" INDEX ", " INDEX CONCURRENTLY IF NOT EXISTS ", 1);
    let step = g
        .step(
            Phase::Expand,
            "drop",
            GenKind::Sql(format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}")),
            "dropped without blocking writes; the rollback builds it again",
        )
        .rollback(create)
        .allow(
            "ban-drop-index",
            "the plan asks for it (drop_index); the rollback rebuilds it CONCURRENTLY from its definition",
        );
    g.push(step);
    Ok(())
}
