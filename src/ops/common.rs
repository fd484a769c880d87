//! Pieces several operations share: reading a spec's fields, and the safe
//! sequences for NOT NULL, a constraint, and an index.

use std::collections::BTreeMap;

use super::{Gen, GenKind, GenStep};
use crate::ident::{Ident, QualifiedName, quote_ident};
use crate::plan::phase::Phase;
use crate::plan::raw::{Node, Value};
use crate::plan::read::Reader;

/// The fields of an operation's spec, read once, each by its kind of value.
pub struct Fields<'n> {
    pub pos: crate::plan::raw::Pos,
    values: BTreeMap<String, &'n Node>,
    op: &'static str,
}

impl<'n> Fields<'n> {
    /// Reads the map `node`, reporting unknown keys and missing `required` ones.
    pub fn read(
        r: &mut Reader,
        node: &'n Node,
        op: &'static str,
        required: &[&str],
        optional: &[&str],
    ) -> Option<Fields<'n>> {
        let allowed: Vec<&str> = required.iter().chain(optional).copied().collect();
        if !matches!(node.value, Value::Map(_)) {
            r.error(
                node.pos,
                "type",
                format!(
                    "`{op}` takes a map of its fields, not {}",
                    node.value.describe()
                ),
                Some(format!("fields of `{op}`: {}", allowed.join(", "))),
            );
            return None;
        }
        let mut values = BTreeMap::new();
        for (key, _, val) in r.entries(node, &format!("`{op}`"), &allowed) {
            values.insert(key, val);
        }
        let mut ok = true;
        for req in required {
            if !values.contains_key(*req) {
                r.error(
                    node.pos,
                    "missing",
                    format!("`{op}` has no `{req}`"),
                    Some(format!("fields of `{op}`: {}", allowed.join(", "))),
                );
                ok = false;
            }
        }
        ok.then_some(Fields {
            pos: node.pos,
            values,
            op,
        })
    }

    pub fn has(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    pub fn node(&self, key: &str) -> Option<&'n Node> {
        self.values.get(key).copied()
    }

    pub fn table(&self, r: &mut Reader, key: &str) -> Option<QualifiedName> {
        let n = self.node(key)?;
        r.table(n, &format!("`{}` {key}", self.op))
    }

    pub fn column(&self, r: &mut Reader, key: &str) -> Option<Ident> {
        let n = self.node(key)?;
        r.column(n, &format!("`{}` {key}", self.op))
    }

    pub fn columns(&self, r: &mut Reader, key: &str) -> Option<Vec<Ident>> {
        let n = self.node(key)?;
        match &n.value {
            Value::Seq(items) if !items.is_empty() => items
                .iter()
                .map(|i| r.column(i, &format!("`{}` {key}", self.op)))
                .collect(),
            Value::Seq(_) => {
                r.error(
                    n.pos,
                    "empty",
                    format!("`{}` {key} is an empty list", self.op),
                    None,
                );
                None
            }
            _ => r
                .column(n, &format!("`{}` {key}", self.op))
                .map(|c| vec![c]),
        }
    }

    pub fn string(&self, r: &mut Reader, key: &str) -> Option<String> {
        let n = self.node(key)?;
        r.string(n, &format!("`{}` {key}", self.op))
    }

    pub fn expression(&self, r: &mut Reader, key: &str) -> Option<String> {
        let n = self.node(key)?;
        r.expression(n, &format!("`{}` {key}", self.op))
    }

    /// An optional expression: `Some(None)` when `key` is absent, `None` when
    /// it is present but invalid (the error is reported).
    pub fn optional_expression(&self, r: &mut Reader, key: &str) -> Option<Option<String>> {
        if self.has(key) {
            self.expression(r, key).map(Some)
        } else {
            Some(None)
        }
    }

    /// A type name, checked by parsing `NULL::<type>`.
    pub fn type_sql(&self, r: &mut Reader, key: &str) -> Option<String> {
        let n = self.node(key)?;
        let t = r.string(n, &format!("`{}` {key}", self.op))?;
        if crate::plan::sql::check_expression(&format!("NULL::{t}")).is_err() || t.contains(';') {
            r.error(
                n.pos,
                "type",
                format!("`{t}` is not a type name"),
                Some(
                    "write a PostgreSQL type: `bigint`, `text`, `numeric(12,2)`, `timestamptz`"
                        .into(),
                ),
            );
            return None;
        }
        Some(t.trim().to_string())
    }

    pub fn flag(&self, r: &mut Reader, key: &str) -> bool {
        match self.node(key).map(|n| &n.value) {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                let pos = self.node(key).map(|n| n.pos).unwrap_or(self.pos);
                r.error(
                    pos,
                    "type",
                    format!(
                        "`{}` {key} must be true or false, not {}",
                        self.op,
                        other.describe()
                    ),
                    None,
                );
                false
            }
        }
    }
}

/// `ALTER TABLE t ADD CONSTRAINT name CHECK (c IS NOT NULL) NOT VALID`, then its
/// validation, then `SET NOT NULL` (which skips its scan thanks to the validated
/// check, PostgreSQL 12+) and dropping the check: three steps of `phase`.
pub fn not_null_steps(
    g: &Gen,
    phase: Phase,
    table: &str,
    column: &Ident,
    what: &str,
) -> Vec<GenStep> {
    let check = quote_ident(&super::object_name(
        "pgshift_nn_",
        &format!("{}_{}", g.change.index, column.as_str()),
    ));
    let col = column.quoted();
    let name = |step: &str| {
        if what.is_empty() {
            step.to_string()
        } else {
            format!("{what}_{step}")
        }
    };
    let add = g
        .step(
            phase,
            &name("nn_check"),
            GenKind::Sql(format!(
                "ALTER TABLE {table} ADD CONSTRAINT {check} CHECK ({col} IS NOT NULL) NOT VALID"
            )),
            &format!(
                "a CHECK ({col} IS NOT NULL) without a scan: new rows are checked from now on"
            ),
        )
        .rollback(format!(
            "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {check}"
        ));
    let validate = g
        .step(
            phase,
            &name("nn_validate"),
            GenKind::Sql(format!("ALTER TABLE {table} VALIDATE CONSTRAINT {check}")),
            "the scan, under SHARE UPDATE EXCLUSIVE: reads and writes go on",
        )
        .rollback(format!(
            "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {check}"
        ))
        .allow(
            "ban-drop-constraint",
            "the rollback drops the CHECK this sequence added, nothing older",
        );
    let set = g
        .step(
            phase,
            &name("nn_set"),
            GenKind::Sql(format!(
                "ALTER TABLE {table} ALTER COLUMN {col} SET NOT NULL;\nALTER TABLE {table} DROP CONSTRAINT {check}"
            )),
            "SET NOT NULL finds the validated check and skips its scan; the check is then redundant",
        )
        .rollback(format!("ALTER TABLE {table} ALTER COLUMN {col} DROP NOT NULL"))
        .allow(
            "adding-not-nullable-field",
            "the validated CHECK (… IS NOT NULL) of the previous steps lets SET NOT NULL skip its scan (PostgreSQL 12+)",
        )
        .allow(
            "ban-drop-constraint",
            "it drops the CHECK this sequence added, redundant once the column is NOT NULL",
        )
        .allow(
            "ban-drop-not-null",
            "the rollback drops the NOT NULL this step set, nothing older",
        );
    vec![add, validate, set]
}

/// `ADD CONSTRAINT … NOT VALID` (brief lock, no scan) and `VALIDATE` in a step of its own.
pub fn validated_constraint(
    g: &Gen,
    phase: Phase,
    table: &str,
    name: &str,
    definition: &str,
    what: &str,
) -> Vec<GenStep> {
    let add = g
        .step(
            phase,
            &format!("{what}_add"),
            GenKind::Sql(format!(
                "ALTER TABLE {table} ADD CONSTRAINT {name} {definition} NOT VALID"
            )),
            "added NOT VALID: a brief lock and no scan; new rows are checked from now on",
        )
        .rollback(format!(
            "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}"
        ));
    let validate = g
        .step(
            phase,
            &format!("{what}_validate"),
            GenKind::Sql(format!("ALTER TABLE {table} VALIDATE CONSTRAINT {name}")),
            "the scan, in a step of its own, under SHARE UPDATE EXCLUSIVE: reads and writes go on",
        )
        .rollback(format!(
            "ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}"
        ))
        .allow(
            "ban-drop-constraint",
            "the rollback drops the constraint the previous step added, nothing older",
        );
    vec![add, validate]
}

/// A `CREATE [UNIQUE] INDEX CONCURRENTLY` step and its rollback.
pub fn index_step(
    g: &Gen,
    phase: Phase,
    what: &str,
    create: String,
    index: &str,
    describe: &str,
) -> GenStep {
    g.step(phase, what, GenKind::Sql(create), describe)
        .rollback(format!("DROP INDEX CONCURRENTLY IF EXISTS {index}"))
}

/// A step that does nothing when the plan runs; its rollback is one part of
/// undoing a later step without a scan under ACCESS EXCLUSIVE (a rollback runs
/// latest first, so this one runs after the later step's).
pub fn undo_only(g: &Gen, phase: Phase, what: &str, rollback: String, describe: &str) -> GenStep {
    g.step(
        phase,
        what,
        GenKind::Sql("SELECT 1".into()),
        &format!("nothing when the plan runs; {describe}"),
    )
    .rollback(rollback)
}

/// The table as SQL: `"schema"."name"` as the plan wrote it.
pub fn table_sql(t: &QualifiedName) -> String {
    t.quoted()
}
