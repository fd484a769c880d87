//! What the operations need to know of the live catalog, as plain data.
//!
//! Some operations cannot be expanded from the plan file alone: a type change
//! rebuilds the column's indexes and constraints, a rename copies the column's
//! type, a dropped index is re-created by its rollback from its definition.
//! These facts are read once, at the plan's first run (`exec::preflight`),
//! recorded in the control schema, and read back on every later run, so that
//! the expansion of a started plan never changes under it, even after the
//! catalog has (the swap of a type change renames columns, for one).
//!
//! This module only describes the facts; it reads no database.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The facts of every table the plan's operations name, keyed by `schema.table`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub tables: BTreeMap<String, Table>,
    /// The server's `server_version_num`.
    #[serde(default)]
    pub server_version: i32,
}

/// One table as the catalog describes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
    pub indexes: Vec<Index>,
    pub constraints: Vec<Constraint>,
    /// Foreign keys of other tables (or this one) that point at this table.
    pub referenced_by: Vec<Constraint>,
    /// True when the table held at least one row when it was read.
    pub has_rows: bool,
    /// Privileges granted on the table: (grantee, privilege), `PUBLIC` for everyone.
    #[serde(default)]
    pub grants: Vec<(String, String)>,
    /// Row-level security is enabled.
    #[serde(default)]
    pub row_security: bool,
    /// Views, rules, policies, publications, generated columns and triggers
    /// that depend on each column (by column name).
    #[serde(default)]
    pub dependents: BTreeMap<String, Vec<Dependent>>,
}

/// One column.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Column {
    pub name: String,
    /// `format_type`: `integer`, `character varying(20)`, `bigint`, …
    pub type_sql: String,
    pub not_null: bool,
    /// `pg_get_expr` of the default, if any (`nextval('orders_id_seq'::regclass)`).
    pub default: Option<String>,
    /// `a` (ALWAYS) or `d` (BY DEFAULT) for an identity column.
    pub identity: Option<String>,
    /// The sequence an identity or serial column draws from (`schema.name`).
    pub sequence: Option<String>,
    pub generated: bool,
}

/// One index.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Index {
    pub name: String,
    /// `pg_get_indexdef`: `CREATE UNIQUE INDEX orders_pkey ON public.orders USING btree (id)`.
    pub definition: String,
    /// Key columns in order; `None` for an expression.
    pub columns: Vec<Option<String>>,
    pub include: Vec<String>,
    pub method: String,
    pub unique: bool,
    pub primary: bool,
    /// The predicate of a partial index.
    pub predicate: Option<String>,
    /// The constraint the index backs (primary key, unique, exclusion).
    pub constraint: Option<String>,
    pub valid: bool,
}

/// One constraint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Constraint {
    pub name: String,
    /// `p`, `u`, `c`, `f`, `x`, `n` as in `pg_constraint.contype`.
    pub kind: String,
    /// `pg_get_constraintdef`: `FOREIGN KEY (order_id) REFERENCES orders(id) ON DELETE CASCADE`.
    pub definition: String,
    /// The table the constraint is on (`schema.table`).
    pub table: String,
    pub columns: Vec<String>,
    pub validated: bool,
    /// For a foreign key: the table and columns it references.
    pub ref_table: Option<String>,
    pub ref_columns: Vec<String>,
}

/// Something in the database that depends on a column an operation changes,
/// and would break or block it: a view, rule, policy, publication, generated
/// column or trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dependent {
    pub kind: String,
    pub name: String,
}

impl Catalog {
    /// The table named `schema.table` (or `table` in any schema, when unqualified).
    pub fn table(&self, schema: Option<&str>, name: &str) -> Option<&Table> {
        match schema {
            Some(s) => self.tables.get(&format!("{s}.{name}")),
            None => self
                .tables
                .values()
                .find(|t| t.name == name && t.schema == "public")
                .or_else(|| self.tables.values().find(|t| t.name == name)),
        }
    }
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// `"schema"."table"`.
    pub fn quoted(&self) -> String {
        format!(
            "{}.{}",
            crate::ident::quote_ident(&self.schema),
            crate::ident::quote_ident(&self.name)
        )
    }

    /// The indexes whose key, included columns or predicate involve `column`.
    pub fn indexes_on(&self, column: &str) -> Vec<&Index> {
        self.indexes
            .iter()
            .filter(|i| {
                i.columns.iter().any(|c| c.as_deref() == Some(column))
                    || i.include.iter().any(|c| c == column)
            })
            .collect()
    }

    /// The constraints of this table on `column`.
    pub fn constraints_on(&self, column: &str) -> Vec<&Constraint> {
        self.constraints
            .iter()
            .filter(|c| c.columns.iter().any(|x| x == column))
            .collect()
    }

    /// The foreign keys that reference `column` of this table.
    pub fn references_to(&self, column: &str) -> Vec<&Constraint> {
        self.referenced_by
            .iter()
            .filter(|c| c.ref_columns.iter().any(|x| x == column))
            .collect()
    }
}
