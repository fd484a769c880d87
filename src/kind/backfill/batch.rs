//! One batch: the statement that updates the next key range and records its
//! checkpoint, and the two round trips that run it in one transaction.
//!
//! The statement reads the worker's checkpoint (`backfill_ranges.last_key`)
//! itself, under `FOR UPDATE`, instead of receiving it from the caller. Whatever
//! the runner believes after a lost connection or a crash, a batch always
//! starts right after the last committed one: a replay is impossible by
//! construction, not by bookkeeping.
//!
//! Key encoding: a key travels as a jsonb object `{"column": value, …}` built
//! with `jsonb_build_object` (so `to_jsonb` of each value: numbers stay exact
//! numbers, uuids and timestamps become their text form). It is turned back
//! into typed values with `jsonb_populate_record(NULL::<table>, key)`, which
//! casts each field to the column's own type. No type name ever appears in the
//! generated SQL, and the stored checkpoint reads naturally in `status`:
//! `{"id": 41000}`.

use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio_postgres::Client;

use super::{BackfillSet, BackfillSpec};
use crate::db;
use crate::ident::{Ident, quote_literal};

/// Which of the two forms of the batch statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The worker's range starts at the smallest key (no checkpoint yet, no lower key).
    FromStart,
    /// Keys strictly after the checkpoint.
    AfterCheckpoint,
}

/// `("a", "b")`: the key columns as a row (parentheses around one column are harmless).
fn key_row(key: &[Ident]) -> String {
    format!("({})", list(key, |k| k.quoted()))
}

fn list(key: &[Ident], f: impl Fn(&Ident) -> String) -> String {
    key.iter().map(f).collect::<Vec<_>>().join(", ")
}

/// A scalar/row subquery decoding the key stored in `pgshift_range.<field>` into typed values.
fn decode(spec: &BackfillSpec, key: &[Ident], field: &str) -> String {
    format!(
        "(SELECT {} FROM pgshift_range, jsonb_populate_record(NULL::{}, pgshift_range.{field}) AS pgshift_k)",
        list(key, |k| format!("pgshift_k.{}", k.quoted())),
        spec.table.quoted()
    )
}

/// `jsonb_build_object('a', "a", 'b', "b")`: how a key row is stored.
pub fn encode(key: &[Ident]) -> String {
    format!(
        "jsonb_build_object({})",
        list(key, |k| format!(
            "{}, {}",
            quote_literal(k.as_str()),
            k.quoted()
        ))
    )
}

/// `"a", "b"` or `"a" DESC, "b" DESC`.
pub fn order(key: &[Ident], desc: bool) -> String {
    list(key, |k| {
        if desc {
            format!("{} DESC", k.quoted())
        } else {
            k.quoted()
        }
    })
}

/// The SET list and, for per-column sets, the condition that the row still differs.
fn set_parts(set: &BackfillSet) -> (String, Option<String>) {
    match set {
        BackfillSet::Columns(cols) => {
            let assign = cols
                .iter()
                .map(|(c, e)| format!("{} = ({e})", c.quoted()))
                .collect::<Vec<_>>()
                .join(", ");
            let differs = cols
                .iter()
                .map(|(c, e)| format!("{} IS DISTINCT FROM ({e})", c.quoted()))
                .collect::<Vec<_>>()
                .join(" OR ");
            (assign, Some(differs))
        }
        BackfillSet::Clause(c) => (c.clone(), None),
    }
}

/// The batch statement; `control` is the control schema's quoted name.
///
/// The schema goes in here, as an identifier, and is never substituted into
/// the text afterwards: the text holds the plan's own expressions, which may
/// contain anything.
///
/// Parameters: `$1` plan id (text), `$2` step name (text), `$3` worker (int4),
/// `$4` batch size (int8). Returns one row: the new `last_key` (jsonb), whether
/// the worker's range is finished (bool), keys visited (int8), rows changed (int8).
///
/// `pgshift_picked` walks the key index from the checkpoint (keyset, never
/// OFFSET); the UPDATE then covers the key range up to the last key picked, so
/// duplicates of a non-unique key never straddle two batches. The steps row is
/// updated last (its new value needs the row count, which needs the UPDATE to
/// finish), so parallel workers hold that shared row only while they commit.
pub fn statement(spec: &BackfillSpec, key: &[Ident], bound: Bound, control: &str) -> String {
    let table = spec.table.quoted();
    let row = key_row(key);
    let lower = match bound {
        Bound::FromStart => String::new(),
        Bound::AfterCheckpoint => format!("{row} > {} AND ", decode(spec, key, "last_key")),
    };
    let (assign, differs) = set_parts(&spec.set);
    let mut filter = String::new();
    if let Some(w) = &spec.where_ {
        filter.push_str(&format!("\n      AND ({w})"));
    }
    // Without `where`, "the row still differs" is what makes a replayed batch change
    // nothing. With `where`, that condition already says which rows need work, and
    // testing the difference too would compute every expression twice per row.
    if let (None, Some(d)) = (&spec.where_, differs) {
        filter.push_str(&format!("\n      AND ({d})"));
    }
    format!(
        "WITH pgshift_range AS MATERIALIZED (
    SELECT last_key, upper_key FROM {control}.backfill_ranges
    WHERE plan_id = $1 AND step = $2 AND worker = $3
    FOR UPDATE
), pgshift_picked AS MATERIALIZED (
    SELECT {cols} FROM {table}
    WHERE {lower}{row} <= {upper}
    ORDER BY {asc}
    LIMIT $4
), pgshift_last AS MATERIALIZED (
    SELECT {cols} FROM pgshift_picked ORDER BY {desc} LIMIT 1
), pgshift_changed AS (
    UPDATE {table} SET {assign}
    WHERE {lower}{row} <= (SELECT {cols} FROM pgshift_last){filter}
    RETURNING 1
), pgshift_counts AS MATERIALIZED (
    SELECT (SELECT count(*) FROM pgshift_picked) AS picked,
           (SELECT count(*) FROM pgshift_changed) AS changed
), pgshift_checkpoint AS (
    UPDATE {control}.backfill_ranges AS r
    SET last_key = coalesce((SELECT {encoded} FROM pgshift_last), r.last_key),
        rows_done = r.rows_done + c.picked,
        batches = r.batches + 1,
        batch_size = $4,
        done = c.picked < $4,
        updated_at = now()
    FROM pgshift_counts AS c
    WHERE r.plan_id = $1 AND r.step = $2 AND r.worker = $3
    RETURNING r.last_key, r.done
), pgshift_step AS (
    UPDATE {control}.steps AS s
    SET rows_done = s.rows_done + c.picked,
        checkpoint = coalesce(s.checkpoint, '{{}}'::jsonb) || jsonb_build_object(
            'rows_updated', coalesce((s.checkpoint->>'rows_updated')::bigint, 0) + c.changed)
    FROM pgshift_counts AS c
    WHERE s.plan_id = $1 AND s.name = $2
    RETURNING 1
)
SELECT k.last_key, k.done, c.picked, c.changed
FROM pgshift_checkpoint AS k, pgshift_counts AS c, (SELECT count(*) FROM pgshift_step) AS s",
        cols = list(key, |k| k.quoted()),
        upper = decode(spec, key, "upper_key"),
        asc = order(key, false),
        desc = order(key, true),
        encoded = encode(key),
    )
}

/// What one committed batch did.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The worker's checkpoint after the batch.
    pub last_key: Option<Json>,
    /// The worker's range is finished.
    pub done: bool,
    /// Keys visited (the batch's share of the range).
    pub picked: u64,
    /// Rows actually changed (matched `where` and differed).
    pub changed: u64,
    pub elapsed: Duration,
}

/// Runs one batch in one transaction: BEGIN and the transaction's timeouts are
/// pipelined with the batch statement (one round trip), then COMMIT (another).
///
/// On error the transaction is rolled back before returning, so the pooled
/// connection is clean; if even that fails the connection is lost and the caller
/// drops it.
pub async fn apply(
    client: &Client,
    statement: &tokio_postgres::Statement,
    limits: (Duration, Duration),
    params: (&str, &str, i32, i64),
) -> Result<Applied, db::Error> {
    let started = Instant::now();
    // Values are integers rendered here: nothing from a plan is spliced into this text.
    let begin = format!(
        "BEGIN; SELECT set_config('lock_timeout', '{}ms', true), set_config('statement_timeout', '{}ms', true)",
        limits.0.as_millis(),
        limits.1.as_millis()
    );
    let (plan, step, worker, size) = params;
    let values: [&(dyn tokio_postgres::types::ToSql + Sync); 4] = [&plan, &step, &worker, &size];
    // Both requests go out before either answer is awaited: tokio-postgres writes a
    // request when its future is first polled, and try_join polls them in order.
    let result = tokio::try_join!(
        client.batch_execute(&begin),
        client.query_one(statement, &values),
    );
    let row = match result {
        Ok((_, row)) => row,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e.into());
        }
    };
    if let Err(e) = client.batch_execute("COMMIT").await {
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(e.into());
    }
    let picked: i64 = row.get(2);
    let changed: i64 = row.get(3);
    Ok(Applied {
        last_key: row.get(0),
        done: row.get(1),
        picked: picked.max(0) as u64,
        changed: changed.max(0) as u64,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::Throttle;
    use super::*;
    use crate::ident::{parse_ident, parse_qualified};

    fn spec(set: BackfillSet, where_: Option<&str>) -> BackfillSpec {
        BackfillSpec {
            table: parse_qualified("public.Leads").unwrap(),
            key: None,
            set,
            where_: where_.map(str::to_string),
            batch_size: 1000,
            workers: 1,
            verify: None,
            throttle: Throttle::default(),
        }
    }

    #[test]
    fn columns_set_uses_where_or_else_skips_rows_already_equal() {
        let s = spec(
            BackfillSet::Columns(vec![(parse_ident("h").unwrap(), "md5(email)".into())]),
            Some("h IS NULL"),
        );
        let key = vec![parse_ident("id").unwrap()];
        let sql = statement(&s, &key, Bound::AfterCheckpoint, "\"pgshift\"");
        assert!(
            sql.contains(r#"UPDATE "public"."leads" SET "h" = (md5(email))"#),
            "{sql}"
        );
        assert!(sql.contains("AND (h IS NULL)"), "{sql}");
        // `where` says which rows need work: no second evaluation of the expression.
        assert!(!sql.contains("IS DISTINCT FROM"), "{sql}");
        let no_where = statement(
            &spec(s.set.clone(), None),
            &key,
            Bound::AfterCheckpoint,
            "\"pgshift\"",
        );
        assert!(
            no_where.contains(r#"AND ("h" IS DISTINCT FROM (md5(email)))"#),
            "{no_where}"
        );
        assert!(sql.contains(r#"("id") > (SELECT pgshift_k."id" FROM pgshift_range, jsonb_populate_record(NULL::"public"."leads", pgshift_range.last_key)"#), "{sql}");
        assert!(!sql.contains("OFFSET"));
        let first = statement(&s, &key, Bound::FromStart, "\"pgshift\"");
        assert!(!first.contains("last_key) AS"), "{first}");
    }

    #[test]
    fn composite_keys_compare_as_rows_and_encode_by_name() {
        let s = spec(BackfillSet::Clause("n = n + 1".into()), None);
        let key = vec![parse_ident("tenant").unwrap(), parse_ident("Id").unwrap()];
        let sql = statement(&s, &key, Bound::AfterCheckpoint, "\"pgshift\"");
        assert!(sql.contains(r#"("tenant", "id") <= "#), "{sql}");
        assert!(
            sql.contains(r#"ORDER BY "tenant" DESC, "id" DESC LIMIT 1"#),
            "{sql}"
        );
        assert!(
            sql.contains(r#"jsonb_build_object('tenant', "tenant", 'id', "id")"#),
            "{sql}"
        );
        assert!(sql.contains("SET n = n + 1\n"), "{sql}");
        assert!(!sql.contains("IS DISTINCT FROM"), "{sql}");
    }

    #[test]
    fn the_control_schema_is_never_substituted_into_the_plans_expressions() {
        // An expression that spells the old placeholder must reach the server as written.
        let s = spec(
            BackfillSet::Columns(vec![(
                parse_ident("note").unwrap(),
                "'__SCHEMA__' || email".into(),
            )]),
            None,
        );
        let key = vec![parse_ident("id").unwrap()];
        let sql = statement(&s, &key, Bound::AfterCheckpoint, "\"ctl\"");
        assert!(sql.contains("('__SCHEMA__' || email)"), "{sql}");
        assert!(sql.contains("\"ctl\".backfill_ranges"), "{sql}");
        assert!(!sql.contains("\"ctl\" || email"), "{sql}");
    }
}
