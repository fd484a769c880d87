//! What a backfill step is: its spec, how it is read from the plan file, and
//! how `plan show` describes it.

use std::fmt::Write;
use std::time::Duration;

use crate::ident::{Ident, QualifiedName};
use crate::plan::defaults;
use crate::plan::raw::{Node, Value};
use crate::plan::read::Reader;
use crate::plan::sql;

/// The SET part of a backfill.
#[derive(Debug, Clone)]
pub enum BackfillSet {
    /// Column ← expression, one per column: lets pgshift skip rows already equal.
    Columns(Vec<(Ident, String)>),
    /// A raw SET clause, used as written.
    Clause(String),
}

/// A batched, checkpointed UPDATE over a key range.
#[derive(Debug, Clone)]
pub struct BackfillSpec {
    pub table: QualifiedName,
    /// The key columns; `None` means the primary key, read from the catalog.
    pub key: Option<Vec<Ident>>,
    pub set: BackfillSet,
    /// Rows that still need work.
    pub where_: Option<String>,
    pub batch_size: u32,
    pub workers: u32,
    /// A query returning the number of rows missed (must be 0 after the last batch).
    pub verify: Option<String>,
    pub throttle: Throttle,
}

/// How a backfill slows itself down.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttle {
    pub sleep: Duration,
    pub max_rows_per_sec: Option<u32>,
    pub target_batch_time: Option<Duration>,
    pub min_batch_size: u32,
    pub max_batch_size: u32,
    pub max_replica_lag: Option<Duration>,
    pub throttle_query: Option<String>,
    /// Hold while a watched replication slot is further behind than this many bytes.
    pub max_slot_lag: Option<u64>,
    /// The slots `max_slot_lag` watches; empty: every logical slot.
    pub slots: Vec<String>,
    /// A slot with no consumer connected does not hold the backfill.
    pub ignore_inactive_slots: bool,
    /// Pace batches so that their WAL stays under this many bytes per second.
    pub max_wal_rate: Option<u64>,
    /// Hold while an autovacuum to prevent wraparound works the table.
    pub pause_on_autovacuum: bool,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            sleep: defaults::SLEEP,
            max_rows_per_sec: None,
            target_batch_time: None,
            min_batch_size: defaults::MIN_BATCH_SIZE,
            max_batch_size: defaults::MAX_BATCH_SIZE,
            max_replica_lag: None,
            throttle_query: None,
            max_slot_lag: None,
            slots: Vec::new(),
            ignore_inactive_slots: false,
            max_wal_rate: None,
            pause_on_autovacuum: false,
        }
    }
}

/// Reads `backfill: { table, key, set, where, batch_size, workers, verify, throttle }`.
pub fn parse(r: &mut Reader, node: &Node) -> Option<BackfillSpec> {
    let mut table = None;
    let mut key = None;
    let mut set = None;
    let mut where_ = None;
    let mut batch_size = None;
    let mut workers = defaults::WORKERS;
    let mut verify = None;
    let mut throttle = Throttle::default();
    let mut explicit_min = None;
    let mut explicit_max = None;
    let errors_before = r.error_count();
    let mut saw_set = false;
    for (k, kn, val) in r.entries(
        node,
        "backfill",
        &[
            "table",
            "key",
            "set",
            "where",
            "batch_size",
            "workers",
            "verify",
            "throttle",
        ],
    ) {
        let _ = kn;
        match k.as_str() {
            "table" => table = r.table(val, "backfill table"),
            "key" => key = parse_key(r, val),
            "set" => {
                saw_set = true;
                set = parse_set(r, val);
            }
            "where" => where_ = r.expression(val, "backfill `where`"),
            "batch_size" => {
                batch_size = r
                    .integer(val, "batch_size", 1, defaults::BATCH_SIZE_LIMIT as i64)
                    .map(|n| n as u32)
            }
            "workers" => {
                workers = r
                    .integer(val, "workers", 1, defaults::WORKERS_LIMIT as i64)
                    .map(|n| n as u32)
                    .unwrap_or(1)
            }
            "verify" => verify = r.query(val, "backfill `verify`"),
            "throttle" => {
                (explicit_min, explicit_max) = parse_throttle(r, val, &mut throttle);
            }
            _ => {}
        }
    }
    if !matches!(node.value, Value::Map(_)) {
        return None;
    }
    if table.is_none() && r.error_count() == errors_before {
        r.error(
            node.pos,
            "missing",
            "backfill has no `table`",
            Some("name the table to update: `table: leads`".into()),
        );
    }
    if !saw_set {
        r.error(
            node.pos,
            "missing",
            "backfill has no `set`",
            Some("give the columns to fill: `set: { email_hash: \"md5(email)\" }`".into()),
        );
    }
    let batch_size = batch_size.unwrap_or(defaults::BATCH_SIZE);
    throttle.min_batch_size = explicit_min.unwrap_or(defaults::MIN_BATCH_SIZE.min(batch_size));
    throttle.max_batch_size = explicit_max.unwrap_or(defaults::MAX_BATCH_SIZE.max(batch_size));
    if throttle.min_batch_size > throttle.max_batch_size
        || batch_size < throttle.min_batch_size
        || batch_size > throttle.max_batch_size
    {
        r.error(
            node.pos,
            "range",
            format!(
                "batch_size {batch_size} must lie within min_batch_size {} and max_batch_size {}",
                throttle.min_batch_size, throttle.max_batch_size
            ),
            None,
        );
    }
    if r.error_count() > errors_before {
        return None;
    }
    Some(BackfillSpec {
        table: table?,
        key,
        set: set?,
        where_,
        batch_size,
        workers,
        verify,
        throttle,
    })
}

/// `key: id` or `key: [tenant, id]`.
fn parse_key(r: &mut Reader, val: &Node) -> Option<Vec<Ident>> {
    match &val.value {
        Value::Seq(items) if !items.is_empty() => items
            .iter()
            .map(|i| r.column(i, "key column"))
            .collect::<Option<Vec<_>>>(),
        Value::Seq(_) => {
            r.error(
                val.pos,
                "empty",
                "key is an empty list",
                Some("leave `key` out to use the primary key".into()),
            );
            None
        }
        _ => r.column(val, "key column").map(|c| vec![c]),
    }
}

/// `set: { col: expr, … }`, or a raw SET clause as a string.
fn parse_set(r: &mut Reader, val: &Node) -> Option<BackfillSet> {
    match &val.value {
        Value::Str(_) => {
            let clause = r.string(val, "backfill `set`");
            if let Some(c) = &clause
                && let Err(e) = sql::check_single_query(&format!("UPDATE t SET {c}"))
            {
                r.error(
                    val.pos,
                    "sql-syntax",
                    format!("backfill `set` clause does not parse: {e}"),
                    None,
                );
            }
            clause.map(BackfillSet::Clause)
        }
        _ => r
            .assignments(val, "backfill `set`")
            .map(BackfillSet::Columns),
    }
}

/// The `throttle` map, into `throttle`; returns the explicit min and max batch sizes.
fn parse_throttle(
    r: &mut Reader,
    node: &Node,
    throttle: &mut Throttle,
) -> (Option<u32>, Option<u32>) {
    let (mut explicit_min, mut explicit_max) = (None, None);
    for (k, _, val) in r.entries(
        node,
        "throttle",
        &[
            "sleep",
            "max_rows_per_sec",
            "target_batch_time",
            "min_batch_size",
            "max_batch_size",
            "max_replica_lag",
            "throttle_query",
            "max_slot_lag",
            "slots",
            "ignore_inactive_slots",
            "max_wal_rate",
            "pause_on_autovacuum",
        ],
    ) {
        match k.as_str() {
            "sleep" => throttle.sleep = r.duration(val, "sleep").unwrap_or_default(),
            "max_rows_per_sec" => {
                throttle.max_rows_per_sec = r
                    .integer(val, "max_rows_per_sec", 1, 100_000_000)
                    .map(|n| n as u32)
            }
            "target_batch_time" => {
                throttle.target_batch_time = r.duration(val, "target_batch_time");
                if throttle
                    .target_batch_time
                    .is_some_and(|d| d < Duration::from_millis(10))
                {
                    r.error(
                        val.pos,
                        "range",
                        "target_batch_time must be at least 10ms",
                        None,
                    );
                }
            }
            "min_batch_size" => {
                explicit_min = r
                    .integer(val, "min_batch_size", 1, defaults::BATCH_SIZE_LIMIT as i64)
                    .map(|n| n as u32)
            }
            "max_batch_size" => {
                explicit_max = r
                    .integer(val, "max_batch_size", 1, defaults::BATCH_SIZE_LIMIT as i64)
                    .map(|n| n as u32)
            }
            "max_replica_lag" => throttle.max_replica_lag = r.duration(val, "max_replica_lag"),
            "throttle_query" => throttle.throttle_query = r.query(val, "throttle_query"),
            "max_slot_lag" => throttle.max_slot_lag = size(r, val, "max_slot_lag", false),
            "slots" => throttle.slots = slot_names(r, val),
            "ignore_inactive_slots" => {
                throttle.ignore_inactive_slots = boolean(r, val, "ignore_inactive_slots")
            }
            "max_wal_rate" => throttle.max_wal_rate = size(r, val, "max_wal_rate", true),
            "pause_on_autovacuum" => {
                throttle.pause_on_autovacuum = boolean(r, val, "pause_on_autovacuum")
            }
            _ => {}
        }
    }
    if throttle.max_slot_lag.is_none()
        && (!throttle.slots.is_empty() || throttle.ignore_inactive_slots)
    {
        r.error(
            node.pos,
            "missing",
            "`slots` and `ignore_inactive_slots` refine `max_slot_lag`, which is not set",
            Some("add `max_slot_lag: 512MB` (or another size) to hold the backfill while those slots are behind".into()),
        );
    }
    (explicit_min, explicit_max)
}

/// A size in bytes (`512MB`); `per_second` also takes `16MB/s`.
fn size(r: &mut Reader, val: &Node, what: &str, per_second: bool) -> Option<u64> {
    let text = match &val.value {
        Value::Int(i) if *i > 0 => return Some(*i as u64),
        Value::Str(s) => s.clone(),
        other => {
            r.error(
                val.pos,
                "type",
                format!(
                    "{what} must be a size like `512MB`, not {}",
                    other.describe()
                ),
                None,
            );
            return None;
        }
    };
    let t = text.trim();
    let t = if per_second {
        t.strip_suffix("/s").unwrap_or(t)
    } else {
        t
    };
    match crate::bytes::parse(t) {
        Ok(0) => {
            r.error(
                val.pos,
                "range",
                format!("{what} must be more than 0 bytes"),
                Some(format!("leave `{what}` out for no limit")),
            );
            None
        }
        Ok(n) => Some(n),
        Err(e) => {
            r.error(val.pos, "size", format!("{what}: {e}"), None);
            None
        }
    }
}

fn boolean(r: &mut Reader, val: &Node, what: &str) -> bool {
    match val.value {
        Value::Bool(b) => b,
        ref other => {
            r.error(
                val.pos,
                "type",
                format!("{what} must be true or false, not {}", other.describe()),
                None,
            );
            false
        }
    }
}

/// `slots: [supabase_realtime, debezium]`: replication slot names as the server stores them.
fn slot_names(r: &mut Reader, val: &Node) -> Vec<String> {
    let items = match &val.value {
        Value::Seq(items) => items.iter().collect::<Vec<_>>(),
        _ => vec![val],
    };
    let mut names = Vec::new();
    for item in items {
        let Some(name) = r.string(item, "slot name") else {
            continue;
        };
        if is_slot_name(&name) {
            names.push(name);
        } else {
            r.error(
                item.pos,
                "slot-name",
                format!("`{name}` is not a replication slot name"),
                Some("slot names are 1 to 63 lowercase letters, digits and underscores, as `SELECT slot_name FROM pg_replication_slots` shows them".into()),
            );
        }
    }
    names
}

/// A name PostgreSQL accepts for a replication slot (`ReplicationSlotValidateName`).
pub fn is_slot_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The backfill in words and its batch statement, as `plan show` prints it.
pub fn describe(b: &BackfillSpec) -> String {
    let mut s = format!(
        "backfill {} in batches of {} ({} worker(s))\n",
        b.table, b.batch_size, b.workers
    );
    match &b.set {
        BackfillSet::Columns(cols) => {
            for (c, e) in cols {
                let _ = writeln!(s, "  set {c} = {e}");
            }
        }
        BackfillSet::Clause(c) => {
            let _ = writeln!(s, "  set {c}");
        }
    }
    if let Some(w) = &b.where_ {
        let _ = writeln!(s, "  where {w}");
    }
    let t = &b.throttle;
    let mut signals = String::new();
    if let Some(b) = t.max_slot_lag {
        let which = if t.slots.is_empty() {
            "any logical replication slot".to_string()
        } else {
            format!("slot {}", t.slots.join(", "))
        };
        let inactive = if t.ignore_inactive_slots {
            " (inactive slots ignored)"
        } else {
            ""
        };
        let _ = write!(
            signals,
            ", pause while {which} is more than {} behind{inactive}",
            crate::bytes::format(b)
        );
    }
    if let Some(b) = t.max_wal_rate {
        let _ = write!(signals, ", at most {}/s of WAL", crate::bytes::format(b));
    }
    if t.pause_on_autovacuum {
        signals.push_str(", pause while an anti-wraparound autovacuum works the table");
    }
    let _ = writeln!(
        s,
        "  throttle: sleep {}, batch size {}..{}{}{}{}{}{signals}",
        crate::duration::format(t.sleep),
        t.min_batch_size,
        t.max_batch_size,
        t.target_batch_time
            .map(|d| format!(", target batch time {}", crate::duration::format(d)))
            .unwrap_or_default(),
        t.max_rows_per_sec
            .map(|r| format!(", at most {r} rows/s"))
            .unwrap_or_default(),
        t.max_replica_lag
            .map(|d| format!(", pause while replica lag > {}", crate::duration::format(d)))
            .unwrap_or_default(),
        t.throttle_query
            .as_ref()
            .map(|q| format!(", pause while `{q}`"))
            .unwrap_or_default(),
    );
    let (key, note) = match &b.key {
        Some(k) => (k.clone(), String::new()),
        None => (
            vec![crate::ident::Ident("id".into())],
            " (the key is the primary key, read from the catalog when the step starts; shown here as \"id\")".to_string(),
        ),
    };
    let _ = writeln!(
        s,
        "each batch, one statement that is its own transaction, with its checkpoint{note}:"
    );
    s.push_str(&super::batch_sql(b, &key));
    s
}
