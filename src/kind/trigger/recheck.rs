//! The query that checks one row again after its dual write failed: does the
//! trigger's expression succeed for the row as it is now? Pure, like the rest
//! of the trigger's SQL; `exec::failures` runs it.

use super::{TriggerSpec, paren, uses_plpgsql_variables};
use crate::ident::{Ident, quote_ident};

/// A query over the row whose key is `$1` (jsonb, as the failure recorded it)
/// that evaluates every expression of the trigger the way the trigger does
/// (the table aliased `new`, and only when `when` holds). It returns no row
/// when the row is gone, one row when the expressions succeed, and raises
/// what the trigger would raise when they still fail.
///
/// `None` when an expression reads a PL/pgSQL variable (`OLD`, `TG_OP`, …)
/// that a plain query cannot see: such a row cannot be checked again here.
pub fn recheck_query(spec: &TriggerSpec, key: &[Ident]) -> Option<String> {
    let exprs: Vec<&String> = spec
        .set
        .iter()
        .chain(&spec.reverse)
        .map(|(_, e)| e)
        .collect();
    if key.is_empty()
        || exprs
            .iter()
            .copied()
            .chain(&spec.when)
            .any(|e| uses_plpgsql_variables(e))
    {
        return None;
    }
    let values = exprs
        .iter()
        .map(|e| paren(e))
        .collect::<Vec<_>>()
        .join(", ");
    let when = spec
        .when
        .as_deref()
        .map(paren)
        .unwrap_or_else(|| "true".into());
    let table = spec.table.quoted();
    let cols = key.iter().map(Ident::quoted).collect::<Vec<_>>().join(", ");
    let decoded = key
        .iter()
        .map(|k| format!("pgshift_k.{}", k.quoted()))
        .collect::<Vec<_>>()
        .join(", ");
    // CASE evaluates its branch only when the condition holds, as the trigger does.
    Some(format!(
        "SELECT CASE WHEN coalesce({when}, false) THEN ROW({values})::text END FROM {table} AS {new} \
         WHERE ({cols}) = (SELECT {decoded} FROM jsonb_populate_record(NULL::{table}, $1::jsonb) AS pgshift_k)",
        new = quote_ident("new"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::{parse_ident, parse_qualified};

    fn spec(when: Option<&str>, set: &str) -> TriggerSpec {
        TriggerSpec {
            table: parse_qualified("app.leads").unwrap(),
            set: vec![(parse_ident("q").unwrap(), set.into())],
            reverse: vec![],
            when: when.map(str::to_string),
        }
    }

    #[test]
    fn evaluates_the_expressions_over_the_row_by_key() {
        let key = vec![parse_ident("tenant").unwrap(), parse_ident("id").unwrap()];
        let q = recheck_query(&spec(Some("NEW.active"), "NEW.a / NEW.b"), &key).unwrap();
        assert_eq!(
            q,
            "SELECT CASE WHEN coalesce((NEW.active), false) THEN ROW((NEW.a / NEW.b))::text END \
             FROM \"app\".\"leads\" AS \"new\" WHERE (\"tenant\", \"id\") = (SELECT pgshift_k.\"tenant\", \
             pgshift_k.\"id\" FROM jsonb_populate_record(NULL::\"app\".\"leads\", $1::jsonb) AS pgshift_k)"
        );
    }

    #[test]
    fn plpgsql_variables_or_no_key_cannot_be_checked() {
        let key = vec![parse_ident("id").unwrap()];
        assert!(recheck_query(&spec(None, "CASE TG_OP WHEN 'INSERT' THEN 1 END"), &key).is_none());
        assert!(recheck_query(&spec(Some("OLD.a IS NULL"), "1"), &key).is_none());
        assert!(recheck_query(&spec(None, "NEW.a"), &[]).is_none());
    }
}
