//! `drop_not_null`: `ALTER COLUMN … DROP NOT NULL`, a catalog-only change.
//!
//! Its undo must not scan under ACCESS EXCLUSIVE either, so it is spread over
//! three steps that a rollback runs latest first: the drop's rollback adds
//! `CHECK (c IS NOT NULL) NOT VALID`; the step before validates it (SHARE
//! UPDATE EXCLUSIVE); the first sets NOT NULL, which finds the validated check
//! and skips its scan, and drops the check. When the plan runs, the first two
//! do nothing.

use super::common::{Fields, table_sql, undo_only};
use super::{Gen, GenKind, Refusal, object_name};
use crate::ident::{Ident, QualifiedName, quote_ident};
use crate::plan::phase::Phase;
use crate::plan::raw::Node;
use crate::plan::read::Reader;

#[derive(Debug, Clone)]
pub struct Spec {
    pub table: QualifiedName,
    pub column: Ident,
}

pub fn parse(r: &mut Reader, node: &Node) -> Option<Spec> {
    let f = Fields::read(r, node, "drop_not_null", &["table", "column"], &[])?;
    Some(Spec {
        table: f.table(r, "table")?,
        column: f.column(r, "column")?,
    })
}

pub fn expand(s: &Spec, g: &mut Gen) -> Result<(), Refusal> {
    let t = table_sql(&s.table);
    let c = s.column.quoted();
    let check = quote_ident(&object_name(
        "pgshift_nn_",
        &format!("{}_{}", g.change.index, s.column.as_str()),
    ));
    let set_back = undo_only(
        g,
        Phase::Expand,
        "undo_set",
        format!("ALTER TABLE {t} ALTER COLUMN {c} SET NOT NULL;\nALTER TABLE {t} DROP CONSTRAINT IF EXISTS {check}"),
        "on rollback it sets NOT NULL again, without a scan thanks to the validated check",
    )
    .allow(
        "adding-not-nullable-field",
        "the rollback sets NOT NULL only after the check of the later steps is validated, so it skips its scan (PostgreSQL 12+)",
    )
    .allow(
        "ban-drop-constraint",
        "the rollback drops the CHECK it used, redundant once the column is NOT NULL again",
    );
    g.push(set_back);
    let validate_back = undo_only(
        g,
        Phase::Expand,
        "undo_validate",
        format!("ALTER TABLE {t} VALIDATE CONSTRAINT {check}"),
        "on rollback it validates the check under SHARE UPDATE EXCLUSIVE",
    );
    g.push(validate_back);
    let step = g
        .step(
            Phase::Expand,
            "drop",
            GenKind::Sql(format!("ALTER TABLE {t} ALTER COLUMN {c} DROP NOT NULL")),
            "a catalog-only change",
        )
        .rollback(format!(
            "ALTER TABLE {t} ADD CONSTRAINT {check} CHECK ({c} IS NOT NULL) NOT VALID"
        ))
        .allow(
            "ban-drop-not-null",
            "the plan asks for it (drop_not_null); its rollback restores NOT NULL without a scan",
        );
    g.push(step);
    Ok(())
}
