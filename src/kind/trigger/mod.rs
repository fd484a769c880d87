//! The SQL of the `trigger` and `drop_trigger` step kinds: a generated PL/pgSQL
//! dual-write trigger that keeps the new columns (and, with `reverse`, the old
//! ones) in step while old and new application versions both write.
//!
//! Everything here is pure: it turns a validated [`TriggerSpec`] into SQL text
//! and touches no database, so `plan show` prints exactly what `apply` runs.
//! The runner executes [`statements`] (or [`rollback_statements`]) in one
//! transaction under the step's lock timeout. A `drop_trigger` step runs the
//! `rollback_statements` of the trigger step it names, and its own rollback is
//! that step's `statements`.
//!
//! # What the trigger does
//!
//! It is a `BEFORE INSERT OR UPDATE … FOR EACH ROW` trigger that only assigns
//! to `NEW`. "The new side" is the `set` columns; "the old side" is the
//! `reverse` columns (the columns the application used to write).
//!
//! - **INSERT**: each `set` column the writer left NULL is computed from its
//!   expression; then each `reverse` column left NULL is computed from its
//!   expression. An old application that only writes `email` gets
//!   `contact_email` filled in, a new one that only writes `contact_email` gets
//!   `email` filled in, and a writer that wrote both keeps both.
//! - **UPDATE, `set` only**: each `set` column the writer did not change
//!   (`NEW.c IS NOT DISTINCT FROM OLD.c`) is recomputed; a column the writer
//!   did change keeps the written value.
//! - **UPDATE, with `reverse`**: the decision is per side. If the writer did
//!   not change any `set` column, the new side is recomputed from the old one
//!   (this also covers "neither side changed": recomputing the new side is
//!   what the backfill does anyway). If the writer changed the new side but no
//!   `reverse` column, the old side is recomputed from the new one. If it
//!   changed both, what it wrote is kept.
//!
//! "Changed" means "differs from the row before the update": it is decided
//! from the values, not from the UPDATE's target list, which a row trigger
//! cannot see. So a writer that assigns the current value again to a column
//! counts as not having written it. We decide by the *target* columns of each
//! side rather than by the columns the expressions read: that needs no parsing,
//! and for the renames and type changes `reverse` is meant for, the columns
//! `set` reads are exactly the `reverse` targets.
//!
//! - **`when`**: rows for which the condition is not true (false or NULL) are
//!   left exactly as written.
//! - **No recursion**: a BEFORE ROW trigger that only modifies `NEW` issues no
//!   statement of its own, so nothing fires it again.
//! - **Backfill**: a batch `UPDATE t SET new = <the set expression over the
//!   row>` writes the new side itself. With `set` only, the trigger does not
//!   even fire for it (see below), so the written value stays. With `reverse`,
//!   the trigger fires (the new side is also read, by `reverse`) and sees the
//!   new side changed and the old side not, so it recomputes the old side from
//!   the value just written: for a rename or a lossless type change that is
//!   the value it already had.
//!
//! # When an expression raises
//!
//! A dual-write trigger must never fail an application's write: a division by
//! zero or a failing cast on one customer's row would otherwise fail that
//! customer's writes in production. The body runs in a block with an
//! `EXCEPTION` clause. When anything in it raises, the row is written as the
//! application wrote it (the columns already computed keep their values; the
//! one that failed keeps what the writer gave it, NULL on INSERT and its old
//! value on UPDATE), and the failure (table, key, error) is reported to the
//! control schema through its `record_dual_write_failure` function, a SECURITY
//! DEFINER function that any role may call (see `control/v2.sql`). The plan
//! cannot pass a gate or enter its contract phase while such a row is left
//! unfixed (`exec::failures`).
//!
//! The generated SQL does not know the control schema's name (one plan file
//! may run against several, one per tenant schema, in one database), so on
//! that rare path the trigger asks each control schema's function in turn:
//! first only the schema where the trigger step registered this trigger, then
//! any schema that records the plan. It calls only a SECURITY DEFINER function
//! of that name owned by the role that owns the trigger function (the role
//! that migrates): a function someone else planted under that name is never
//! called with the application's row and privileges. If none takes the report,
//! or reporting fails (no privilege, say), the trigger raises a WARNING and
//! still lets the write through.
//!
//! Cost: entering a block with an `EXCEPTION` clause starts a subtransaction
//! for every row. Since the block only assigns to `NEW`, the subtransaction
//! never gets an XID of its own, so it does not grow `pg_subtrans` or overflow
//! a backend's subtransaction cache; what it costs per write is measured by
//! `cargo bench --bench trigger` (RELIABILITY.md has the figures).
//!
//! # Which updates fire it
//!
//! The trigger fires `UPDATE OF` only the columns its expressions read
//! (`NEW.x` in `set`, `reverse` and `when`): an UPDATE that assigns none of them
//! cannot change what the trigger computes, and a backfill that writes only the
//! new columns then pays nothing for the trigger (PRODUCT.md measured 9 % for a
//! lean trigger). The references are collected from squawk's tokens of
//! `SELECT <expression>`. When they cannot be collected with certainty (the
//! row used as a whole, as in `to_jsonb(NEW)` or `(NEW).x`, an expression that
//! reads no column, a parse error) the trigger fires on every UPDATE instead:
//! firing too often costs time, firing too rarely loses writes.
//!
//! # Names
//!
//! Trigger and function share one name: `pgshift_<plan id>_<step>_<hash>`,
//! where the hash is 10 hex digits of SHA-256 over the plan id and step. The
//! hash is always there, not only when the name is too long: without it
//! plan `a_b` step `c` and plan `a` step `b_c` would share a function, and
//! `CREATE OR REPLACE FUNCTION` would silently replace another plan's trigger
//! body. A name longer than PostgreSQL's 63 bytes is cut (on a character
//! boundary) before the hash, which keeps long names distinct.
//!
//! The function lives in the table's schema when the plan qualifies the table
//! (`app.leads` → `"app"."pgshift_…"`). For an unqualified table it is created
//! unqualified, so it lands in the first schema of the session's `search_path`
//! (as the table is found through it); the rollback drops it through the same
//! `search_path`, so the runner must use the same one for both.
//!
//! # Failing early
//!
//! PL/pgSQL resolves names only when the body first runs, so [`statements`]
//! starts with a probe, `SELECT <every expression> FROM <table> AS "new" WHERE
//! false`: a misspelled column fails the step, not every application write.
//!
//! Every identifier goes through `crate::ident`; the plan's own expressions are
//! the only text spliced in verbatim, inside a dollar-quoted body whose tag is
//! checked not to occur anywhere in that body.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use squawk_syntax::{SourceFile, SyntaxKind};

use crate::ident::{Ident, MAX_IDENT_BYTES, QualifiedName, quote_ident, quote_literal};
use crate::plan::diag::Severity;
use crate::plan::phase::Phase;
use crate::plan::raw::{Node, Value};
use crate::plan::read::Reader;

/// The kind's key in the plan file.
pub const KEY: &str = "trigger";

/// A dual-write trigger belongs to the dual_write phase: after the columns it
/// writes exist (expand), before the backfill fixes its key range.
pub const PHASES: &[Phase] = &[Phase::DualWrite];

/// A dual-write trigger: new columns computed from the old ones, and optionally back.
#[derive(Debug, Clone)]
pub struct TriggerSpec {
    pub table: QualifiedName,
    /// New column ← expression over `NEW` (the old shape).
    pub set: Vec<(Ident, String)>,
    /// Old column ← expression over `NEW` (the new shape), for renames and type changes.
    pub reverse: Vec<(Ident, String)>,
    /// Optional condition (over `NEW`) limiting the rows the trigger maintains.
    pub when: Option<String>,
}

/// Reads `trigger: { table, set, reverse, when }`.
pub fn parse(r: &mut Reader, node: &Node) -> Option<TriggerSpec> {
    let mut table = None;
    let mut set = None;
    let mut reverse = Some(Vec::new());
    let mut when = None;
    let mut ok = true;
    let mut saw_set = false;
    let errors_before = r.error_count();
    for (key, _, val) in r.entries(node, "trigger", &["table", "set", "reverse", "when"]) {
        match key.as_str() {
            "table" => table = r.table(val, "trigger table"),
            "set" => {
                saw_set = true;
                set = r.assignments(val, "trigger `set`");
            }
            "reverse" => reverse = r.assignments(val, "trigger `reverse`"),
            "when" => {
                when = r.expression(val, "trigger `when`");
                ok &= when.is_some();
            }
            _ => {}
        }
    }
    // Only when `table` is absent, not when it was present and already reported
    // (and only this step's errors count: an earlier step's must not hide this one).
    let table_reported = r.diags[..]
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .skip(errors_before)
        .any(|d| d.rule == "identifier" || d.rule == "empty");
    if table.is_none() && matches!(node.value, Value::Map(_)) && !table_reported {
        r.error(
            node.pos,
            "missing",
            "trigger has no `table`",
            Some("name the table the trigger keeps in step: `table: leads`".into()),
        );
    }
    if !saw_set && matches!(node.value, Value::Map(_)) {
        r.error(node.pos, "missing", "trigger has no `set`", Some("give the new columns and how to compute them: `set: { email_hash: \"md5(NEW.email)\" }`".into()));
    }
    let (table, set, reverse) = (table?, set?, reverse?);
    if let Some((c, _)) = set
        .iter()
        .find(|(c, _)| reverse.iter().any(|(r, _)| r == c))
    {
        r.error(
            node.pos,
            "trigger",
            format!("column {c} is in both `set` and `reverse`"),
            Some("`set` names the new columns, `reverse` the old ones".into()),
        );
        return None;
    }
    ok.then_some(TriggerSpec {
        table,
        set,
        reverse,
        when,
    })
}

/// The prefix of every object pgshift generates.
pub const PREFIX: &str = "pgshift_";

/// Hex digits of the name hash.
const NAME_HASH_HEX: usize = 10;

/// The names of the function and trigger generated for one trigger step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// The trigger function, unqualified (see [`Names::function_in`]).
    pub function: Ident,
    /// The trigger, on the step's table.
    pub trigger: Ident,
}

impl Names {
    /// The function's name qualified like `table`: same schema, or none (search_path).
    pub fn function_in(&self, table: &QualifiedName) -> QualifiedName {
        QualifiedName {
            schema: table.schema.clone(),
            name: self.function.clone(),
        }
    }
}

/// Names of the generated objects for step `step` of plan `plan_id`.
pub fn names(plan_id: &str, step: &str) -> Names {
    let mut hasher = Sha256::new();
    hasher.update(plan_id.as_bytes());
    // A separator no id or step name contains, so ("a", "bc") and ("ab", "c") hash apart.
    hasher.update([0u8]);
    hasher.update(step.as_bytes());
    let hash = hex(&hasher.finalize());
    let mut base = format!("{PREFIX}{plan_id}_{step}");
    let room = MAX_IDENT_BYTES - 1 - NAME_HASH_HEX;
    if base.len() > room {
        let mut cut = room;
        while !base.is_char_boundary(cut) {
            cut -= 1;
        }
        base.truncate(cut);
    }
    let name = format!("{base}_{}", &hash[..NAME_HASH_HEX]);
    Names {
        function: Ident(name.clone()),
        trigger: Ident(name),
    }
}

/// The statements that create (or re-create) the trigger: safe to run again.
///
/// A probe that evaluates the expressions against the table (see the module docs),
/// then `CREATE OR REPLACE FUNCTION`, then `DROP TRIGGER IF EXISTS` and `CREATE
/// TRIGGER` (PostgreSQL 13 has no `CREATE OR REPLACE TRIGGER`). They belong in
/// one transaction, so no write ever sees the table without its trigger.
pub fn statements(plan_id: &str, step: &str, spec: &TriggerSpec) -> Vec<String> {
    let n = names(plan_id, step);
    let function = n.function_in(&spec.table).quoted();
    let table = spec.table.quoted();
    let trigger = n.trigger.quoted();
    let body = body(plan_id, step, spec);
    let tag = dollar_tag(&body);
    let events = match update_columns(spec) {
        Some(cols) => format!(
            "INSERT OR UPDATE OF {}",
            cols.iter()
                .map(|c| c.quoted())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        // The columns read could not be determined with certainty (see the module docs).
        None => "INSERT OR UPDATE".to_string(),
    };
    let mut out = Vec::new();
    if let Some(probe) = probe(spec) {
        out.push(probe);
    }
    out.extend([
        format!(
            "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS {tag}\n{body}{tag}"
        ),
        format!("DROP TRIGGER IF EXISTS {trigger} ON {table}"),
        format!(
            "CREATE TRIGGER {trigger} BEFORE {events} ON {table} FOR EACH ROW EXECUTE FUNCTION {function}()"
        ),
    ]);
    out
}

/// A query that evaluates every expression against the table, reading no row.
///
/// PL/pgSQL resolves names only when a body first runs, so a misspelled column
/// or function in `set` would otherwise pass `CREATE FUNCTION` and then fail
/// every application write to the table. Aliasing the table as `new` makes
/// `NEW.col` resolve the way it will in the trigger; `WHERE false` reads
/// nothing and takes only ACCESS SHARE. It runs first, before the statements
/// that take stronger locks. It is left out when an expression uses a PL/pgSQL
/// variable (`OLD`, `TG_OP`, …) that a plain query cannot see.
fn probe(spec: &TriggerSpec) -> Option<String> {
    let exprs: Vec<&String> = spec
        .set
        .iter()
        .chain(&spec.reverse)
        .map(|(_, e)| e)
        .chain(&spec.when)
        .collect();
    if exprs.iter().any(|e| uses_plpgsql_variables(e)) {
        return None;
    }
    let list = exprs
        .iter()
        .map(|e| paren(e))
        .collect::<Vec<_>>()
        .join(", ");
    Some(format!(
        "SELECT {list} FROM {} AS {} WHERE false",
        spec.table.quoted(),
        quote_ident("new")
    ))
}

/// True when `expr` names `OLD` or a `TG_…` variable (or cannot be tokenized).
fn uses_plpgsql_variables(expr: &str) -> bool {
    let parse = SourceFile::parse(&format!("SELECT {expr}"));
    if !parse.errors().is_empty() {
        return true;
    }
    parse
        .syntax_node()
        .descendants_with_tokens()
        .filter_map(|e| e.into_token())
        .any(|t| {
            let text = t.text().to_ascii_lowercase();
            let text = text.trim_matches('"');
            t.kind() == SyntaxKind::OLD_KW || text == "old" || text.starts_with("tg_")
        })
}

/// The statements that remove the trigger and its function: safe to run again.
pub fn rollback_statements(plan_id: &str, step: &str, spec: &TriggerSpec) -> Vec<String> {
    let n = names(plan_id, step);
    vec![
        format!(
            "DROP TRIGGER IF EXISTS {} ON {}",
            n.trigger.quoted(),
            spec.table.quoted()
        ),
        format!(
            "DROP FUNCTION IF EXISTS {}()",
            n.function_in(&spec.table).quoted()
        ),
    ]
}

/// The columns of the table the trigger reads, or `None` when they cannot be
/// determined with certainty (then it must fire on every UPDATE).
pub fn update_columns(spec: &TriggerSpec) -> Option<BTreeSet<Ident>> {
    let mut cols = BTreeSet::new();
    let exprs = spec
        .set
        .iter()
        .chain(&spec.reverse)
        .map(|(_, e)| e)
        .chain(&spec.when);
    for e in exprs {
        cols.extend(new_references(e)?);
    }
    // An expression set that reads no column (`now()`): any update may be the one
    // that should refresh it; do not guess which.
    (!cols.is_empty()).then_some(cols)
}

/// The columns an expression reads as `NEW.column`, or `None` when it uses `NEW`
/// in any other way (or does not parse).
fn new_references(expr: &str) -> Option<BTreeSet<Ident>> {
    let parse = SourceFile::parse(&format!("SELECT {expr}"));
    if !parse.errors().is_empty() {
        return None;
    }
    let tokens: Vec<(SyntaxKind, String)> = parse
        .syntax_node()
        .descendants_with_tokens()
        .filter_map(|e| e.into_token())
        .filter(|t| !t.kind().is_trivia())
        .map(|t| (t.kind(), t.text().to_string()))
        .collect();
    let mut cols = BTreeSet::new();
    for (i, (kind, text)) in tokens.iter().enumerate() {
        if !is_new(*kind, text) {
            continue;
        }
        // `t.new` is a field of something else, not the row variable.
        if i > 0 && tokens[i - 1].0 == SyntaxKind::DOT {
            continue;
        }
        match (tokens.get(i + 1), tokens.get(i + 2)) {
            (Some((SyntaxKind::DOT, _)), Some((k, name)))
                if *k == SyntaxKind::IDENT || k.is_keyword() =>
            {
                cols.insert(column_name(name)?);
            }
            // `NEW` alone, `(NEW).x`, `NEW.*`, `f(NEW)`: the whole row is read.
            _ => return None,
        }
    }
    Some(cols)
}

fn is_new(kind: SyntaxKind, text: &str) -> bool {
    kind == SyntaxKind::NEW_KW
        || (kind == SyntaxKind::IDENT && (text.eq_ignore_ascii_case("new") || text == "\"new\""))
}

/// The catalog name of one identifier token: unquoted names fold to lower case.
fn column_name(text: &str) -> Option<Ident> {
    if let Some(inner) = text.strip_prefix('"') {
        let inner = inner.strip_suffix('"')?;
        return Some(Ident(inner.replace("\"\"", "\"")));
    }
    // `U&"…"` and other forms we do not decode: give up rather than guess.
    if !text
        .chars()
        .all(|c| c.is_alphanumeric() || c == '_' || c == '$')
    {
        return None;
    }
    Some(Ident(text.to_ascii_lowercase()))
}

/// The PL/pgSQL body (between the dollar quotes).
fn body(plan_id: &str, step: &str, spec: &TriggerSpec) -> String {
    let mut b = String::new();
    // A line comment ends at a line break, so anything after one would be code: keep
    // the note on one line whatever the ids hold, and keep table and column names
    // (which may contain line breaks when quoted) out of it altogether.
    let note = format!("plan {plan_id}, step {step}").replace(['\n', '\r'], " ");
    b.push_str(&format!(
        "-- dual write generated by pgshift ({note})\n{DECLARE}BEGIN\n"
    ));
    if let Some(when) = &spec.when {
        b.push_str(&format!(
            "  IF NOT coalesce({}, false) THEN\n    RETURN NEW;\n  END IF;\n",
            paren(when)
        ));
    }
    b.push_str("  IF TG_OP = 'INSERT' THEN\n");
    for (col, expr) in spec.set.iter().chain(&spec.reverse) {
        let c = col.quoted();
        b.push_str(&format!(
            "    IF NEW.{c} IS NULL THEN\n      NEW.{c} := {};\n    END IF;\n",
            paren(expr)
        ));
    }
    if spec.reverse.is_empty() {
        b.push_str("  ELSE\n");
        for (col, expr) in &spec.set {
            let c = col.quoted();
            b.push_str(&format!(
                "    IF NEW.{c} IS NOT DISTINCT FROM OLD.{c} THEN\n      NEW.{c} := {};\n    END IF;\n",
                paren(expr)
            ));
        }
    } else {
        b.push_str(&format!(
            "  ELSIF {} THEN\n    -- the new side was not written: derive it from the old side\n",
            unchanged(&spec.set)
        ));
        for (col, expr) in &spec.set {
            b.push_str(&format!("    NEW.{} := {};\n", col.quoted(), paren(expr)));
        }
        b.push_str(&format!(
            "  ELSIF {} THEN\n    -- only the new side was written: derive the old side from it\n",
            unchanged(&spec.reverse)
        ));
        for (col, expr) in &spec.reverse {
            b.push_str(&format!("    NEW.{} := {};\n", col.quoted(), paren(expr)));
        }
        b.push_str("  -- both sides were written: keep what the writer wrote\n");
    }
    b.push_str("  END IF;\n  RETURN NEW;\n");
    b.push_str(&on_failure(plan_id, step));
    b.push_str("END;\n");
    b
}

/// The variables of the failure path (no initial values: nothing to evaluate on a write that succeeds).
const DECLARE: &str = "DECLARE\n  pgshift_sqlstate text;\n  pgshift_error text;\n  pgshift_schema regnamespace;\n  pgshift_strict boolean;\n  pgshift_kept boolean;\n";

/// The trigger's EXCEPTION clause: the application's write goes through as it
/// was written, and the row is reported to the control schema (see the module
/// docs, "When an expression raises").
fn on_failure(plan_id: &str, step: &str) -> String {
    let (plan, step) = (quote_literal(plan_id), quote_literal(step));
    format!(
        "EXCEPTION WHEN OTHERS THEN
  -- never fail the application's write: keep the row as written, report it
  GET STACKED DIAGNOSTICS pgshift_sqlstate = RETURNED_SQLSTATE, pgshift_error = MESSAGE_TEXT;
  pgshift_kept := false;
  BEGIN
    <<report>>
    FOREACH pgshift_strict IN ARRAY ARRAY[true, false] LOOP
      -- only a SECURITY DEFINER function of this trigger function's owner (a control schema's)
      FOR pgshift_schema IN
        SELECT p.pronamespace FROM pg_catalog.pg_proc AS p
        WHERE p.proname = 'record_dual_write_failure' AND p.prosecdef
          AND p.proowner = (SELECT f.proowner FROM pg_catalog.pg_trigger AS t
                            JOIN pg_catalog.pg_proc AS f ON f.oid = t.tgfoid
                            WHERE t.tgrelid = TG_RELID AND t.tgname = TG_NAME)
        ORDER BY p.pronamespace
      LOOP
        EXECUTE pg_catalog.format('SELECT %s.record_dual_write_failure($1, $2, $3, $4, $5, $6, $7, $8)', pgshift_schema)
          INTO pgshift_kept
          USING {plan}::text, {step}::text, TG_RELID, TG_NAME::text, pg_catalog.to_jsonb(NEW), pgshift_sqlstate, pgshift_error, pgshift_strict;
        EXIT report WHEN pgshift_kept;
      END LOOP;
    END LOOP;
    IF NOT pgshift_kept THEN
      RAISE WARNING 'pgshift dual write (plan %, step %) failed on %: % (SQLSTATE %); no control schema took the report', {plan}, {step}, TG_TABLE_NAME, pgshift_error, pgshift_sqlstate;
    END IF;
  EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'pgshift dual write (plan %, step %) failed on %: % (SQLSTATE %); reporting it failed too: %', {plan}, {step}, TG_TABLE_NAME, pgshift_error, pgshift_sqlstate, SQLERRM;
  END;
  RETURN NEW;
"
    )
}

/// `NEW.a IS NOT DISTINCT FROM OLD.a AND …` over the columns of one side.
fn unchanged(cols: &[(Ident, String)]) -> String {
    cols.iter()
        .map(|(c, _)| {
            let c = c.quoted();
            format!("NEW.{c} IS NOT DISTINCT FROM OLD.{c}")
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// A plan expression in parentheses. A `--` comment would swallow the closing
/// parenthesis, so then it goes on a line of its own.
fn paren(expr: &str) -> String {
    let expr = expr.trim();
    if expr.contains("--") {
        format!("(\n{expr}\n)")
    } else {
        format!("({expr})")
    }
}

/// A dollar-quote tag that occurs nowhere in `body`.
fn dollar_tag(body: &str) -> String {
    let mut salt = 0u32;
    loop {
        let mut hasher = Sha256::new();
        hasher.update(salt.to_be_bytes());
        hasher.update(body.as_bytes());
        let tag = format!("$pgshift_{}$", &hex(&hasher.finalize())[..12]);
        if !body.contains(&tag) {
            return tag;
        }
        salt += 1;
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

mod recheck;
pub use recheck::recheck_query;

#[cfg(test)]
mod tests;
