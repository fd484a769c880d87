//! One batch: the statement that updates the next key range, advances the
//! worker's checkpoint, counts, and reads the operator's live overrides, all in
//! one statement that is its own transaction: one round trip per batch.
//!
//! The statement reads the worker's checkpoint (`backfill_ranges.last_key`)
//! itself, under `FOR UPDATE`, instead of receiving it from the caller. Whatever
//! the runner believes after a lost connection or a crash, a batch always
//! starts right after the last committed one: a replay is impossible by
//! construction, not by bookkeeping.
//!
//! Fencing: the statement applies nothing unless the plan's run epoch is still
//! the caller's (`plans.run_epoch`, bumped by every runner that takes the plan's
//! lock) and the worker's range is still owned by that epoch
//! (`backfill_ranges.epoch`, claimed under the row lock when a run starts the
//! step). A runner that lost the plan to another one therefore applies no
//! further batch, even one it sends after losing the lock.
//!
//! The live overrides are read by the statement too: a batch that starts after
//! `pgshift throttle --pause` commits applies nothing, and one that starts after
//! `--batch-size N` commits is N keys long.
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
use tokio_postgres::{Client, Statement};

use super::{BackfillSet, BackfillSpec};
use crate::control::Overrides;
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

/// The key a batch walks: its columns, and whether a unique index makes it unique
/// (then a full batch of N keys is exactly N rows, and the batch need not count them).
#[derive(Debug, Clone)]
pub struct Key {
    pub cols: Vec<Ident>,
    pub unique: bool,
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
/// Parameters: `$1` plan id (text), `$2` step (text), `$3` worker (int4), `$4`
/// batch size (int8, unless the operator overrides it), `$5` run epoch (int8).
/// Returns one row, see [`Outcome::from_row`].
///
/// `pgshift_end` walks the key index from the checkpoint to the N-th key (keyset,
/// `OFFSET` inside the index walk, nothing materialised); the UPDATE then covers
/// the key range up to that key, or to the range's end when fewer keys remain,
/// so duplicates of a non-unique key never straddle two batches. The worker's
/// own range row is the only control row written: nothing is shared between
/// workers but rows they only read.
///
/// The UPDATE of the table returns nothing and nothing reads it: PostgreSQL
/// runs such a sub-statement to completion after the main query, in the same
/// statement and transaction. Counting its rows (`RETURNING 1` read by a
/// `count(*)`) passed every row through a tuple store and an aggregate, about
/// 5 % of a 1,000-row batch; so a batch reports the keys it visited, not the
/// rows it changed. For the same reason the WAL position it returns is the one
/// at its start: the worker measures a batch's WAL from one start to the next.
pub fn statement(spec: &BackfillSpec, key: &Key, bound: Bound, control: &str) -> String {
    let k = &key.cols;
    let table = spec.table.quoted();
    let row = format!("({})", list(k, |c| c.quoted()));
    let (lower, has_checkpoint) = match bound {
        Bound::FromStart => (String::new(), "IS NULL"),
        Bound::AfterCheckpoint => (
            format!("{row} > {} AND ", decode(spec, k, "last_key")),
            "IS NOT NULL",
        ),
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
    let cols = list(k, |c| c.quoted());
    // Keys the batch visited: N when the N-th key exists and the key is unique;
    // otherwise counted (the last batch of a range, or a key with duplicates).
    let counted = format!(
        "(SELECT count(*) FROM {table} WHERE {lower}{row} <= (SELECT {cols} FROM pgshift_stop))"
    );
    let picked = if key.unique {
        format!(
            "CASE WHEN EXISTS (SELECT 1 FROM pgshift_end) THEN (SELECT size FROM pgshift_live) ELSE {counted} END"
        )
    } else {
        counted
    };
    format!(
        "WITH pgshift_live AS MATERIALIZED (
    SELECT s.overrides,
           coalesce((s.overrides->>'paused')::boolean, false) AS paused,
           coalesce(nullif((s.overrides->>'batch_size')::int8, 0), $4) AS size,
           (SELECT p.run_epoch FROM {control}.plans AS p WHERE p.id = $1) = $5 AS current,
           pg_current_wal_insert_lsn() AS wal_start
    FROM {control}.steps AS s WHERE s.plan_id = $1 AND s.name = $2
), pgshift_range AS MATERIALIZED (
    SELECT r.last_key, r.upper_key FROM {control}.backfill_ranges AS r, pgshift_live AS l
    WHERE r.plan_id = $1 AND r.step = $2 AND r.worker = $3 AND r.epoch = $5
      AND NOT r.done AND r.last_key {has_checkpoint} AND l.current AND NOT l.paused
    FOR UPDATE OF r
), pgshift_end AS MATERIALIZED (
    SELECT {cols} FROM {table}
    WHERE {lower}{row} <= {upper}
    ORDER BY {asc}
    OFFSET (SELECT size - 1 FROM pgshift_live) LIMIT 1
), pgshift_stop AS MATERIALIZED (
    SELECT {cols} FROM (
        SELECT {cols}, 0 AS pgshift_o FROM pgshift_end
        UNION ALL
        SELECT {upper_cols}, 1 FROM pgshift_range, jsonb_populate_record(NULL::{table}, pgshift_range.upper_key) AS pgshift_k
    ) AS pgshift_s ORDER BY pgshift_o LIMIT 1
), pgshift_update AS (
    UPDATE {table} SET {assign}
    WHERE {lower}{row} <= (SELECT {cols} FROM pgshift_stop){filter}
), pgshift_counts AS MATERIALIZED (
    SELECT {picked} AS picked
), pgshift_checkpoint AS (
    UPDATE {control}.backfill_ranges AS r
    SET last_key = coalesce((SELECT {encoded} FROM pgshift_stop), r.last_key),
        rows_done = r.rows_done + c.picked,
        batches = r.batches + 1,
        batch_size = (SELECT size FROM pgshift_live),
        done = NOT EXISTS (SELECT 1 FROM pgshift_end),
        updated_at = now()
    FROM pgshift_counts AS c
    WHERE r.plan_id = $1 AND r.step = $2 AND r.worker = $3 AND EXISTS (SELECT 1 FROM pgshift_range)
    RETURNING r.last_key, r.done
)
SELECT l.current, l.paused, l.overrides, (SELECT count(*) FROM pgshift_checkpoint),
       k.last_key, k.done, c.picked,
       (l.wal_start - '0/0'::pg_lsn)::int8, l.size
FROM (SELECT) AS pgshift_one
LEFT JOIN pgshift_live AS l ON true
LEFT JOIN pgshift_counts AS c ON true
LEFT JOIN pgshift_checkpoint AS k ON true",
        upper = decode(spec, k, "upper_key"),
        upper_cols = list(k, |c| format!("pgshift_k.{}", c.quoted())),
        asc = order(k, false),
        encoded = encode(k),
    )
}

/// What one batch statement found and did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The batch committed with its checkpoint.
    Applied(Applied),
    /// The operator paused the step: nothing was applied.
    Paused(Overrides),
    /// A newer run owns the plan: nothing was applied, and nothing more may be.
    Fenced,
    /// The range row was not in the state this form of the statement expects (done,
    /// claimed by a newer run, or its checkpoint moved): read it again.
    Missed(Overrides),
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
    /// The batch size the statement used (the operator's override, if any).
    pub size: u32,
    /// The WAL insert position when the statement started.
    pub wal_start: u64,
    /// WAL written (by anyone) from the start of the worker's previous batch to
    /// the start of this one: about the previous batch's own; while a WAL rate
    /// cap is in force, from this batch's start to its commit. Set by the worker.
    pub wal_bytes: u64,
    pub elapsed: Duration,
    pub overrides: Overrides,
}

impl Outcome {
    fn from_row(row: &tokio_postgres::Row, elapsed: Duration) -> Result<Outcome, db::Error> {
        let current: Option<bool> = row.try_get(0)?;
        let paused: Option<bool> = row.try_get(1)?;
        let overrides = row
            .try_get::<_, Option<Json>>(2)?
            .map(|j| Overrides::from_json(&j))
            .unwrap_or_default();
        let applied: i64 = row.try_get(3)?;
        if current != Some(true) {
            return Ok(Outcome::Fenced);
        }
        if applied == 0 {
            return Ok(if paused == Some(true) {
                Outcome::Paused(overrides)
            } else {
                Outcome::Missed(overrides)
            });
        }
        let count = |i: usize| -> Result<u64, db::Error> {
            Ok(row.try_get::<_, Option<i64>>(i)?.unwrap_or(0).max(0) as u64)
        };
        Ok(Outcome::Applied(Applied {
            last_key: row.try_get(4)?,
            done: row.try_get::<_, Option<bool>>(5)?.unwrap_or(false),
            picked: count(6)?,
            wal_start: count(7)?,
            wal_bytes: 0,
            size: count(8)?.min(u32::MAX as u64) as u32,
            elapsed,
            overrides,
        }))
    }
}

/// Runs one batch: one statement, one round trip, its own transaction.
///
/// The connection is the worker's own, with its session timeouts already set;
/// `backstop` only guards against a server that stops answering (a statement
/// timeout is the server's job): when it fires the statement is cancelled on the
/// server and the error reads as a lost connection.
pub async fn apply(
    client: &Client,
    statement: &Statement,
    params: (&str, &str, i32, i64, i64),
    backstop: Duration,
) -> Result<Outcome, db::Error> {
    let started = Instant::now();
    let (plan, step, worker, size, epoch) = params;
    let values: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
        [&plan, &step, &worker, &size, &epoch];
    let row = match tokio::time::timeout(backstop, client.query_one(statement, &values)).await {
        Ok(row) => row?,
        Err(_) => {
            let _ = client
                .cancel_token()
                .cancel_query(tokio_postgres::NoTls)
                .await;
            return Err(db::Error::Connect(Box::new(db::ConnectFailure {
                target: "the server".into(),
                reason: format!("no answer to a batch within {}s", backstop.as_secs()),
                sqlstate: None,
            })));
        }
    };
    Outcome::from_row(&row, started.elapsed())
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

    fn key(cols: &[&str], unique: bool) -> Key {
        Key {
            cols: cols.iter().map(|c| parse_ident(c).unwrap()).collect(),
            unique,
        }
    }

    #[test]
    fn columns_set_uses_where_or_else_skips_rows_already_equal() {
        let s = spec(
            BackfillSet::Columns(vec![(parse_ident("h").unwrap(), "md5(email)".into())]),
            Some("h IS NULL"),
        );
        let k = key(&["id"], true);
        let sql = statement(&s, &k, Bound::AfterCheckpoint, "\"pgshift\"");
        assert!(
            sql.contains(r#"UPDATE "public"."leads" SET "h" = (md5(email))"#),
            "{sql}"
        );
        assert!(sql.contains("AND (h IS NULL)"), "{sql}");
        // `where` says which rows need work: no second evaluation of the expression.
        assert!(!sql.contains("IS DISTINCT FROM"), "{sql}");
        let no_where = statement(
            &spec(s.set.clone(), None),
            &k,
            Bound::AfterCheckpoint,
            "\"pgshift\"",
        );
        assert!(
            no_where.contains(r#"AND ("h" IS DISTINCT FROM (md5(email)))"#),
            "{no_where}"
        );
        assert!(sql.contains(r#"("id") > (SELECT pgshift_k."id" FROM pgshift_range, jsonb_populate_record(NULL::"public"."leads", pgshift_range.last_key)"#), "{sql}");
        assert!(sql.contains("r.last_key IS NOT NULL"), "{sql}");
        let first = statement(&s, &k, Bound::FromStart, "\"pgshift\"");
        assert!(!first.contains("last_key) AS"), "{first}");
        assert!(first.contains("r.last_key IS NULL"), "{first}");
    }

    #[test]
    fn one_statement_fences_reads_overrides_and_writes_only_its_own_range() {
        let s = spec(BackfillSet::Clause("n = n + 1".into()), None);
        let sql = statement(&s, &key(&["id"], true), Bound::AfterCheckpoint, "\"ctl\"");
        assert!(sql.contains("r.epoch = $5"), "{sql}");
        assert!(sql.contains("p.run_epoch FROM \"ctl\".plans"), "{sql}");
        assert!(sql.contains("s.overrides->>'paused'"), "{sql}");
        // The only control table written is the worker's range row.
        assert_eq!(sql.matches("UPDATE \"ctl\".").count(), 1, "{sql}");
        assert!(sql.contains("UPDATE \"ctl\".backfill_ranges"), "{sql}");
        assert!(
            !sql.contains("BEGIN") && !sql.contains("set_config"),
            "{sql}"
        );
        // A unique key counts nothing but the last batch of its range.
        assert!(
            sql.contains("CASE WHEN EXISTS (SELECT 1 FROM pgshift_end)"),
            "{sql}"
        );
        let dup = statement(&s, &key(&["id"], false), Bound::AfterCheckpoint, "\"ctl\"");
        assert!(!dup.contains("CASE WHEN EXISTS"), "{dup}");
    }

    #[test]
    fn composite_keys_compare_as_rows_and_encode_by_name() {
        let s = spec(BackfillSet::Clause("n = n + 1".into()), None);
        let k = key(&["tenant", "Id"], true);
        let sql = statement(&s, &k, Bound::AfterCheckpoint, "\"pgshift\"");
        assert!(sql.contains(r#"("tenant", "id") <= "#), "{sql}");
        assert!(sql.contains(r#"ORDER BY "tenant", "id""#), "{sql}");
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
        let sql = statement(&s, &key(&["id"], true), Bound::AfterCheckpoint, "\"ctl\"");
        assert!(sql.contains("('__SCHEMA__' || email)"), "{sql}");
        assert!(sql.contains("\"ctl\".backfill_ranges"), "{sql}");
        assert!(!sql.contains("\"ctl\" || email"), "{sql}");
    }
}
