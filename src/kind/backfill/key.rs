//! The backfill's key: the plan's `key`, or the table's primary key, checked to
//! lead a valid btree index so that every batch walks the index, never the heap.

use tokio_postgres::GenericClient;

use super::BackfillSpec;
use super::batch::Key;
use crate::db::{self, OneTrip};
use crate::engine::{Error, StepCx};
use crate::ident::{Ident, quote_ident};

/// Why the key cannot be used.
pub enum KeyError {
    Db(db::Error),
    Unusable(String),
}

impl From<tokio_postgres::Error> for KeyError {
    fn from(e: tokio_postgres::Error) -> Self {
        KeyError::Db(e.into())
    }
}

impl KeyError {
    /// The step's error for this key problem.
    pub fn into_error(self, sx: &StepCx) -> Error {
        match self {
            KeyError::Db(e) => sx.db_error(e),
            KeyError::Unusable(reason) => Error::UnusableKey {
                step: sx.step.clone(),
                reason,
            },
        }
    }
}

/// The key columns: the plan's, or the primary key; they must lead a valid btree index.
/// The key is unique when a valid unique index covers only key columns.
pub async fn resolve_key(c: &impl GenericClient, spec: &BackfillSpec) -> Result<Key, KeyError> {
    let table = spec.table.quoted();
    let exists: bool = c
        .row("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?
        .get(0);
    if !exists {
        return Err(KeyError::Unusable(format!(
            "backfill table {} does not exist (check the name and the search_path)",
            spec.table
        )));
    }
    let key = match &spec.key {
        Some(k) => k.clone(),
        None => {
            let rows = c
                .rows(
                    "SELECT a.attname::text
                     FROM pg_index i
                     CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                     WHERE i.indrelid = to_regclass($1) AND i.indisprimary
                     ORDER BY k.ord",
                    &[&table],
                )
                .await?;
            if rows.is_empty() {
                return Err(KeyError::Unusable(format!(
                    "backfill table {} has no primary key; name an indexed, unique, non-null key with `key:` (one column or a list)",
                    spec.table
                )));
            }
            rows.iter().map(|r| Ident(r.get(0))).collect()
        }
    };
    let names: Vec<String> = key.iter().map(|k| k.0.clone()).collect();
    let missing: Vec<String> = c
        .rows(
            "SELECT n FROM unnest($2::text[]) AS n
             WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = to_regclass($1)
                               AND a.attname = n AND a.attnum > 0 AND NOT a.attisdropped)",
            &[&table, &names],
        )
        .await?
        .iter()
        .map(|r| quote_ident(r.get(0)))
        .collect();
    if !missing.is_empty() {
        return Err(KeyError::Unusable(format!(
            "backfill key column(s) {} not found in table {}",
            missing.join(", "),
            spec.table
        )));
    }
    let indexed: bool = c
        .row(
            "SELECT EXISTS (
               SELECT 1 FROM pg_index i
               JOIN pg_class ic ON ic.oid = i.indexrelid
               JOIN pg_am am ON am.oid = ic.relam
               WHERE i.indrelid = to_regclass($1) AND i.indisvalid AND am.amname = 'btree'
                 AND i.indpred IS NULL
                 AND (SELECT array_agg(a.attname::text ORDER BY k.ord)
                      FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                      WHERE k.ord <= cardinality($2::text[])) = $2::text[])",
            &[&table, &names],
        )
        .await?
        .get(0);
    if !indexed {
        let cols = key
            .iter()
            .map(|k| k.quoted())
            .collect::<Vec<_>>()
            .join(", ");
        return Err(KeyError::Unusable(format!(
            "backfill key ({cols}) of table {} is not the leading part of any valid btree index: every batch would scan the whole table; create one in the expand phase (CREATE INDEX CONCURRENTLY … ON {} ({cols})) or name an indexed key",
            spec.table, spec.table
        )));
    }
    let unique: bool = c
        .row(
            "SELECT EXISTS (
               SELECT 1 FROM pg_index i
               WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indisvalid AND i.indpred IS NULL
                 AND i.indexprs IS NULL
                 AND (SELECT bool_and(a.attname::text = ANY($2::text[]))
                      FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
                      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                      WHERE k.ord <= i.indnkeyatts))",
            &[&table, &names],
        )
        .await?
        .get(0);
    Ok(Key { cols: key, unique })
}
