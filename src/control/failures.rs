//! The failures of dual-write triggers (control schema version 2): the rows
//! whose new value a trigger could not compute, as its recording function left
//! them in `trigger_failures`, and the registry of installed triggers
//! (`dual_writes`) that tells a failing trigger which control schema is its own.

use serde::Serialize;
use serde_json::Value as Json;
use tokio_postgres::GenericClient;

use super::Control;
use crate::db::{Error, OneTrip};
use crate::ident::{Ident, QualifiedName, quote_literal};

/// One row of `trigger_failures`.
#[derive(Debug, Clone, Serialize)]
pub struct TriggerFailure {
    pub id: i64,
    pub plan_id: String,
    /// The step the trigger was generated for.
    pub step: String,
    #[serde(skip)]
    pub table_oid: u32,
    /// The table, schema-qualified, when the failure happened.
    pub table: String,
    /// The row's key (`{"id": 41}`), or `None` when the table has no key.
    pub key: Option<Json>,
    pub sqlstate: String,
    pub error: String,
    /// Writes of that row that failed.
    pub hits: i64,
    pub first_at: String,
    pub last_at: String,
    pub resolved_at: Option<String>,
    pub resolution: Option<String>,
}

/// A row's key as an operator writes it in a WHERE clause: `id = 41`,
/// `id = 17 AND tenant = 2`, `code = 'x7'`.
pub fn key_text(key: &Json) -> String {
    match key {
        Json::Object(m) if !m.is_empty() => m
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Json::String(s) => quote_literal(s),
                    Json::Null => "NULL".to_string(),
                    other => other.to_string(),
                };
                format!("{} = {v}", bare_or_quoted(k))
            })
            .collect::<Vec<_>>()
            .join(" AND "),
        other => other.to_string(),
    }
}

/// `id`, or `"Id"` when the name needs quotes to be read back.
fn bare_or_quoted(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        crate::ident::quote_ident(name)
    }
}

impl TriggerFailure {
    /// `public.leads where id = 41: division by zero (SQLSTATE 22012), 3 writes`.
    pub fn describe(&self) -> String {
        let key = match &self.key {
            Some(k) => format!("where {}", key_text(k)),
            None => "(a row of a table without a key)".to_string(),
        };
        let hits = if self.hits > 1 {
            format!(", {} writes", self.hits)
        } else {
            String::new()
        };
        format!(
            "{} {key}: {} (SQLSTATE {}){hits}",
            self.table, self.error, self.sqlstate
        )
    }
}

impl Control {
    /// The statement that registers a dual-write trigger in `dual_writes`; it
    /// runs in the trigger step's own transaction. The values are pgshift's own
    /// names, quoted as literals; the table is resolved like the trigger's.
    pub fn register_dual_write(
        &self,
        plan: &str,
        step: &str,
        table: &QualifiedName,
        trigger: &Ident,
    ) -> String {
        format!(
            "INSERT INTO {ctl}.dual_writes (table_oid, trigger, plan_id, step) VALUES ({t}::regclass, {g}, {p}, {s}) \
             ON CONFLICT (table_oid, trigger) DO UPDATE SET plan_id = EXCLUDED.plan_id, step = EXCLUDED.step, installed_at = now()",
            ctl = self.quoted(),
            t = quote_literal(&table.quoted()),
            g = quote_literal(trigger.as_str()),
            p = quote_literal(plan),
            s = quote_literal(step),
        )
    }

    /// True when the control schema has the tables of version 2 (an older one
    /// is read as it is by the commands that only read).
    pub async fn records_trigger_failures(&self, c: &impl GenericClient) -> Result<bool, Error> {
        Ok(c.row(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{}.trigger_failures", self.quoted())],
        )
        .await?
        .get(0))
    }

    /// The plan's trigger failures, oldest first; only those not yet resolved with `open`.
    pub async fn trigger_failures(
        &self,
        c: &impl GenericClient,
        plan: &str,
        open: bool,
    ) -> Result<Vec<TriggerFailure>, Error> {
        if !self.records_trigger_failures(c).await? {
            return Ok(Vec::new());
        }
        let rows = c
            .rows(
                &self.sql(
                    "SELECT id, plan_id, step, table_oid, table_name, key, sqlstate, error, hits,
                            first_at::text, last_at::text, resolved_at::text, resolution
                     FROM __SCHEMA__.trigger_failures
                     WHERE plan_id = $1 AND (NOT $2 OR resolved_at IS NULL) ORDER BY id",
                ),
                &[&plan, &open],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| TriggerFailure {
                id: r.get(0),
                plan_id: r.get(1),
                step: r.get(2),
                table_oid: r.get(3),
                table: r.get(4),
                key: r.get(5),
                sqlstate: r.get(6),
                error: r.get(7),
                hits: r.get(8),
                first_at: r.get(9),
                last_at: r.get(10),
                resolved_at: r.get(11),
                resolution: r.get(12),
            })
            .collect())
    }

    /// Marks a failure resolved, saying how it was found so.
    pub async fn resolve_trigger_failure(
        &self,
        c: &impl GenericClient,
        id: i64,
        resolution: &str,
    ) -> Result<(), Error> {
        c.exec(
            &self.sql("UPDATE __SCHEMA__.trigger_failures SET resolved_at = now(), resolution = $2 WHERE id = $1 AND resolved_at IS NULL"),
            &[&id, &resolution],
        )
        .await?;
        Ok(())
    }

    /// Marks every open failure of a plan resolved (the plan was rolled back).
    pub async fn resolve_trigger_failures(
        &self,
        c: &impl GenericClient,
        plan: &str,
        resolution: &str,
    ) -> Result<(), Error> {
        if !self.records_trigger_failures(c).await? {
            return Ok(());
        }
        c.exec(
            &self.sql("UPDATE __SCHEMA__.trigger_failures SET resolved_at = now(), resolution = $2 WHERE plan_id = $1 AND resolved_at IS NULL"),
            &[&plan, &resolution],
        )
        .await?;
        Ok(())
    }

    /// Records what a failure's expression raises now (when checked again and still failing).
    pub async fn refresh_trigger_failure(
        &self,
        c: &impl GenericClient,
        id: i64,
        sqlstate: &str,
        error: &str,
    ) -> Result<(), Error> {
        c.exec(
            &self.sql(
                "UPDATE __SCHEMA__.trigger_failures SET sqlstate = $2, error = $3 WHERE id = $1",
            ),
            &[&id, &sqlstate, &error],
        )
        .await?;
        Ok(())
    }
}
