//! `rename_table`: the table takes its new name and, in the same transaction,
//! a view with the old name takes its place, so the old application version
//! reads and writes through the view (a simple view is updatable) while the new
//! one uses the new name. The view runs with its caller's rights
//! (`security_invoker`, PostgreSQL 15+), so row-level security still applies,
//! and it gets the table's grants. After the gate the view goes.

use super::common::{Fields, table_sql};
use super::{Gen, GenKind, Refusal};
use crate::ident::{Ident, QualifiedName, quote_ident};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub to: Ident,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "rename_table", &["table", "to"], &[])?;
    Some(Spec {
        table: f.table(r, "table")?,
        to: f.column(r, "to")?,
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let facts = g.table(&s.table)?;
    let server = g.catalog.map(|c| c.server_version).unwrap_or_default();
    let invoker = server >= 150000;
    if facts.row_security && !invoker {
        return Err(Refusal::Finding(format!(
            "{} has row-level security, and before PostgreSQL 15 a view cannot run with its caller's rights: the old name would bypass the policies. Rename it by hand with a gate instead",
            s.table
        )));
    }
    let old = table_sql(&s.table);
    let schema = quote_ident(&facts.schema);
    let new = format!("{schema}.{}", s.to.quoted());
    let with = if invoker {
        " WITH (security_invoker = true)"
    } else {
        ""
    };
    let mut forward = vec![
        format!("ALTER TABLE {old} RENAME TO {}", s.to.quoted()),
        format!("CREATE VIEW {old}{with} AS SELECT * FROM {new}"),
    ];
    for (grantee, privilege) in &facts.grants {
        let who = if grantee == "PUBLIC" {
            "PUBLIC".to_string()
        } else {
            quote_ident(grantee)
        };
        forward.push(format!("GRANT {privilege} ON {old} TO {who}"));
    }
    let undo = format!(
        "DROP VIEW IF EXISTS {old};\nALTER TABLE {new} RENAME TO {}",
        s.table.name.quoted()
    );
    let step = g
        .step(
            Phase::Expand,
            "rename",
            GenKind::Sql(forward.join(";\n")),
            "the new name, and a view under the old one for the old application version, in one transaction",
        )
        .rollback(undo)
        .allow(
            "renaming-table",
            "a view under the old name takes the table's place in the same transaction: the old application version sees no change",
        );
    g.push(step);
    g.requires(format!("uses table {new}, not {old}"));
    let mut recreate = vec![format!("CREATE VIEW {old}{with} AS SELECT * FROM {new}")];
    for (grantee, privilege) in &facts.grants {
        let who = if grantee == "PUBLIC" {
            "PUBLIC".to_string()
        } else {
            quote_ident(grantee)
        };
        recreate.push(format!("GRANT {privilege} ON {old} TO {who}"));
    }
    let step = g
        .step(
            Phase::Contract,
            "drop_view",
            GenKind::Sql(format!("DROP VIEW IF EXISTS {old}")),
            "the old name goes: no application version uses it any more",
        )
        .rollback(recreate.join(";\n"))
        .allow("ban-drop-view", "after the gate no application version uses the old name; the rollback creates the view again");
    g.push(step);
    Ok(())
}
