//! Before the first step of a plan with `changes:`: the live catalog is read,
//! every operation is checked against it and against the data (missing tables
//! and columns, what depends on a column being changed, rows that would
//! violate a new constraint, counted with a few shown), and the operations are
//! expanded with those facts. A finding stops the plan before anything changes.
//!
//! The facts are recorded in the control schema at the first run; every later
//! run (resume, rollback, status) expands the plan from the recorded facts, so
//! that a started plan never changes under it, even after the catalog has.

use tokio_postgres::GenericClient;

use crate::control::{Event, Status};
use crate::db::{self, OneTrip};
use crate::engine::{Context, Error};
use crate::ident::{Ident, QualifiedName, quote_ident};
use crate::ops::catalog::{Catalog, Table};
use crate::ops::{Change, Op};
use crate::plan::{self, Plan};

/// The plan, its operations expanded with the catalog's facts; for a plan
/// without `changes:`, the plan itself.
///
/// A plan whose steps have not started is checked first (pre-flight) and its
/// facts recorded; a started one is expanded from the facts recorded then.
pub async fn prepare(cx: &Context, plan: &Plan, conn: &impl GenericClient) -> Result<Plan, Error> {
    if plan.changes.is_empty() {
        return Ok(plan.clone());
    }
    let started = started(cx, plan, conn).await?;
    let stored = stored(cx, plan, conn).await?;
    let catalog = match (started, stored) {
        (true, Some(c)) => c,
        _ => {
            let catalog = crate::exec::catalog::read(conn, &plan.changes).await?;
            let findings = check(conn, plan, &catalog).await?;
            if !findings.is_empty() {
                record_failure(cx, plan, conn, &findings).await?;
                return Err(Error::Preflight {
                    plan: plan.id.clone(),
                    findings,
                });
            }
            catalog
        }
    };
    let expanded = expand(plan, &catalog)?;
    if !started {
        let event = Event::CatalogRead {
            catalog: serde_json::to_value(&catalog).unwrap_or_default(),
        };
        ensure_plan_row(cx, plan, conn).await?;
        cx.control.event(conn, &plan.id, None, &event).await?;
    }
    Ok(expanded)
}

/// The plan expanded from the facts recorded at its first run, for the commands
/// that read a started plan (rollback, status, finalize): no pre-flight.
pub async fn recorded(cx: &Context, plan: &Plan, conn: &impl GenericClient) -> Result<Plan, Error> {
    if plan.changes.is_empty() {
        return Ok(plan.clone());
    }
    match stored(cx, plan, conn).await? {
        Some(catalog) => expand(plan, &catalog),
        None => Err(Error::Usage(format!(
            "plan `{}` has operations whose steps come from the catalog facts recorded at its first run, and none are recorded here: it never started on this database",
            plan.id
        ))),
    }
}

/// Expands the plan's operations with `catalog` and checks the whole plan again.
pub fn expand(plan: &Plan, catalog: &Catalog) -> Result<Plan, Error> {
    plan::validate::validate_with(&plan.file, &plan.text, Some(catalog)).map_err(|e| {
        Error::Usage(format!(
            "{e}\n(the operations of `changes:` were expanded with the live catalog; `pgshift plan show {}` prints the steps)",
            plan.file.display()
        ))
    })
}

async fn started(cx: &Context, plan: &Plan, c: &impl GenericClient) -> Result<bool, Error> {
    if cx.control.plan_row(c, &plan.id).await?.is_none() {
        return Ok(false);
    }
    let rows = cx.control.steps(c, &plan.id).await?;
    Ok(rows
        .iter()
        .any(|r| !matches!(r.status, Status::Pending | Status::RolledBack)))
}

async fn stored(
    cx: &Context,
    plan: &Plan,
    c: &impl GenericClient,
) -> Result<Option<Catalog>, Error> {
    if !cx.control.exists_on(c).await? {
        return Ok(None);
    }
    let last = cx.control.last_event(c, &plan.id, "catalog_read").await?;
    Ok(last.and_then(|(_, d)| serde_json::from_value(d.get("catalog")?.clone()).ok()))
}

/// The plan's row, so that its events and status can be recorded.
async fn ensure_plan_row(cx: &Context, plan: &Plan, c: &impl GenericClient) -> Result<(), Error> {
    if cx.control.plan_row(c, &plan.id).await?.is_none() {
        let mut record = crate::exec::runner::record(plan);
        record.steps.clear();
        cx.control
            .insert_plan(c, &record, &crate::engine::whoami())
            .await?;
    }
    Ok(())
}

async fn record_failure(
    cx: &Context,
    plan: &Plan,
    c: &impl GenericClient,
    findings: &[String],
) -> Result<(), Error> {
    ensure_plan_row(cx, plan, c).await?;
    let event = Event::PreflightFailed {
        findings: findings.to_vec(),
    };
    cx.control.event(c, &plan.id, None, &event).await?;
    cx.control
        .set_plan_status(c, &plan.id, Status::Failed)
        .await?;
    Ok(())
}

/// Every finding of every operation, as sentences naming the change.
pub async fn check(
    c: &impl GenericClient,
    plan: &Plan,
    catalog: &Catalog,
) -> Result<Vec<String>, db::Error> {
    let mut out = Vec::new();
    for ch in &plan.changes {
        for f in check_one(c, ch, catalog).await? {
            out.push(format!(
                "changes[{}] {} (line {}): {f}",
                ch.index,
                ch.op.summary(),
                ch.pos.line
            ));
        }
    }
    // The expansion's own refusals (an index that backs a constraint, …).
    let expansion = crate::ops::expand(&plan.id, &plan.changes, Some(catalog), true);
    out.extend(expansion.refused.into_iter().map(|(_, f)| f));
    Ok(out)
}

fn find<'a>(catalog: &'a Catalog, t: &QualifiedName) -> Option<&'a Table> {
    catalog.table(t.schema.as_ref().map(|s| s.as_str()), t.name.as_str())
}

/// The table, or a finding that it is missing.
fn table<'a>(catalog: &'a Catalog, t: &QualifiedName, out: &mut Vec<String>) -> Option<&'a Table> {
    let found = find(catalog, t);
    if found.is_none() {
        out.push(format!(
            "table {t} does not exist (check the name and the search_path)"
        ));
    }
    found
}

fn column(t: &Table, c: &Ident, out: &mut Vec<String>) -> bool {
    let ok = t.column(c.as_str()).is_some();
    if !ok {
        out.push(format!(
            "column {} does not exist in {} (its columns: {})",
            c.quoted(),
            t.quoted(),
            t.columns
                .iter()
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    ok
}

fn dependents(t: &Table, c: &Ident, out: &mut Vec<String>) {
    if let Some(deps) = t.dependents.get(c.as_str()).filter(|d| !d.is_empty()) {
        out.push(format!(
            "{}.{} is used by {}; change or drop them first (a `sql` operation), or they keep the old column",
            t.quoted(),
            c.quoted(),
            deps.iter().map(|d| format!("{} {}", d.kind, d.name)).collect::<Vec<_>>().join(", ")
        ));
    }
}

async fn check_one(
    c: &impl GenericClient,
    ch: &Change,
    cat: &Catalog,
) -> Result<Vec<String>, db::Error> {
    let mut out = Vec::new();
    match &ch.op {
        Op::AddColumn(s) => {
            if let Some(t) = table(cat, &s.table, &mut out) {
                if t.column(s.column.as_str()).is_some() {
                    out.push(format!(
                        "{} already has a column {}",
                        t.quoted(),
                        s.column.quoted()
                    ));
                }
                if s.not_null && s.default.is_none() && s.up.is_none() && t.has_rows {
                    out.push(format!(
                        "`not_null` without `default` or `up`, and {} has rows: they would have no value. Give `default:` or `up:`",
                        t.quoted()
                    ));
                }
            }
            if let Some((rt, _)) = &s.references {
                table(cat, rt, &mut out);
            }
        }
        Op::DropColumn(s) => {
            if let Some(t) = table(cat, &s.table, &mut out)
                && column(t, &s.column, &mut out)
            {
                let col = t.column(s.column.as_str()).expect("checked");
                if col.not_null
                    && col.default.is_none()
                    && col.identity.is_none()
                    && s.down.is_none()
                {
                    out.push(format!(
                        "{}.{} is NOT NULL without a default: once the new version stops writing it, its inserts fail. Give `down:` (the value those rows get)",
                        t.quoted(),
                        s.column.quoted()
                    ));
                }
                for con in t.constraints_on(s.column.as_str()) {
                    if matches!(con.kind.as_str(), "p" | "u" | "x") {
                        out.push(format!(
                            "{}.{} is part of constraint {} ({}); drop it first (drop_constraint)",
                            t.quoted(),
                            s.column.quoted(),
                            con.name,
                            con.definition
                        ));
                    }
                }
                dependents(t, &s.column, &mut out);
            }
        }
        Op::RenameColumn(s) => {
            if let Some(t) = table(cat, &s.table, &mut out)
                && column(t, &s.column, &mut out)
            {
                dependents(t, &s.column, &mut out);
            }
        }
        Op::ChangeType(s) => {
            if let Some(t) = table(cat, &s.table, &mut out)
                && column(t, &s.column, &mut out)
            {
                dependents(t, &s.column, &mut out);
                conversion(c, t, s, &mut out).await?;
            }
        }
        Op::SetNotNull(s) => {
            if let Some(t) = table(cat, &s.table, &mut out)
                && column(t, &s.column, &mut out)
                && s.fill.is_none()
            {
                let cond = format!("{} IS NULL", s.column.quoted());
                violations(
                    c,
                    t,
                    &cond,
                    "row(s) hold NULL; give `fill:` (the value they get), or fix them first",
                    &mut out,
                )
                .await?;
            }
        }
        _ => check_more(c, ch, cat, &mut out).await?,
    }
    Ok(out)
}

/// The checks of the operations that add a constraint or touch a whole table.
async fn check_more(
    c: &impl GenericClient,
    ch: &Change,
    cat: &Catalog,
    out: &mut Vec<String>,
) -> Result<(), db::Error> {
    match &ch.op {
        Op::DropNotNull(s) => {
            if let Some(t) = table(cat, &s.table, out) {
                column(t, &s.column, out);
            }
        }
        Op::SetDefault(s) => {
            if let Some(t) = table(cat, &s.table, out) {
                column(t, &s.column, out);
            }
        }
        Op::DropDefault(s) => {
            if let Some(t) = table(cat, &s.table, out) {
                column(t, &s.column, out);
            }
        }
        Op::AddCheck(s) => {
            if let Some(t) = table(cat, &s.table, out) {
                let cond = format!("NOT ({})", s.check);
                violations(
                    c,
                    t,
                    &cond,
                    "row(s) violate the check; fix them first, or the validation fails",
                    out,
                )
                .await?;
            }
        }
        Op::AddUnique(s) => {
            if let Some(t) = table(cat, &s.table, out) {
                let cols: Vec<String> = s.columns.iter().map(|c| c.quoted()).collect();
                let all = s.columns.iter().all(|col| column(t, col, out));
                if all {
                    duplicates(c, t, &cols, out).await?;
                }
            }
        }
        Op::AddForeignKey(s) => {
            let here = table(cat, &s.table, out);
            let there = table(cat, &s.ref_table, out);
            if let (Some(t), Some(rt)) = (here, there) {
                let ok = s.columns.iter().all(|col| column(t, col, out))
                    && s.ref_columns.iter().all(|col| column(rt, col, out));
                if ok {
                    orphans(c, t, rt, &s.columns, &s.ref_columns, out).await?;
                }
            }
        }
        Op::CreateIndex(s) => {
            if let Some(t) = table(cat, &s.table, out) {
                for col in s.columns.iter().chain(&s.include) {
                    column(t, col, out);
                }
            }
        }
        Op::DropConstraint(s) => {
            table(cat, &s.table, out);
        }
        Op::DropTable(s) => {
            if let Some(t) = table(cat, &s.table, out) {
                let from_others: Vec<&str> = t
                    .referenced_by
                    .iter()
                    .filter(|f| f.table != format!("{}.{}", t.schema, t.name))
                    .map(|f| f.name.as_str())
                    .collect();
                if !from_others.is_empty() {
                    out.push(format!(
                        "{} is referenced by foreign keys of other tables ({}); drop them first (drop_constraint)",
                        t.quoted(),
                        from_others.join(", ")
                    ));
                }
            }
        }
        Op::RenameTable(s) => {
            if let Some(t) = table(cat, &s.table, out) {
                let taken: bool = c
                    .row(
                        "SELECT to_regclass($1) IS NOT NULL",
                        &[&format!("{}.{}", quote_ident(&t.schema), s.to.quoted())],
                    )
                    .await?
                    .get(0);
                if taken {
                    out.push(format!(
                        "{} already exists in schema {}",
                        s.to.quoted(),
                        t.schema
                    ));
                }
            }
        }
        Op::CreateTable(s) => {
            if find(cat, &s.table).is_some() {
                out.push(format!("table {} already exists", s.table));
            }
            let exists: bool = c
                .row("SELECT to_regclass($1) IS NOT NULL", &[&s.table.quoted()])
                .await?
                .get(0);
            if exists && find(cat, &s.table).is_none() {
                out.push(format!("table {} already exists", s.table));
            }
        }
        _ => {}
    }
    Ok(())
}

/// The first few keys of the rows matching `cond`, and how many there are.
async fn violations(
    c: &impl GenericClient,
    t: &Table,
    cond: &str,
    what: &str,
    out: &mut Vec<String>,
) -> Result<(), db::Error> {
    let key = key_of(t);
    let sql = format!(
        "SELECT count(*) OVER (), ({key})::text FROM {} WHERE {cond} LIMIT 5",
        t.quoted()
    );
    match c.rows(&sql, &[]).await {
        Ok(rows) if !rows.is_empty() => {
            let n: i64 = rows[0].get(0);
            let keys: Vec<String> = rows.iter().map(|r| r.get::<_, String>(1)).collect();
            out.push(format!("{n} {what} (first: {} = {})", key, keys.join(", ")));
        }
        Ok(_) => {}
        Err(e) => out.push(format!(
            "cannot check the rows of {}: {}",
            t.quoted(),
            db::Error::from(e)
        )),
    }
    Ok(())
}

/// The primary key's columns as a row expression, or `ctid` for a table without one.
fn key_of(t: &Table) -> String {
    t.indexes
        .iter()
        .find(|i| i.primary)
        .map(|i| {
            let cols: Vec<String> = i.columns.iter().flatten().map(|c| quote_ident(c)).collect();
            if cols.len() == 1 {
                cols[0].clone()
            } else {
                format!("({})", cols.join(", "))
            }
        })
        .unwrap_or_else(|| "ctid".to_string())
}

async fn duplicates(
    c: &impl GenericClient,
    t: &Table,
    cols: &[String],
    out: &mut Vec<String>,
) -> Result<(), db::Error> {
    let list = cols.join(", ");
    let sql = format!(
        "SELECT count(*) OVER (), ({list})::text FROM {} WHERE ({}) GROUP BY {list} HAVING count(*) > 1 LIMIT 5",
        t.quoted(),
        cols.iter()
            .map(|c| format!("{c} IS NOT NULL"))
            .collect::<Vec<_>>()
            .join(" AND ")
    );
    let rows = c.rows(&sql, &[]).await?;
    if !rows.is_empty() {
        let n: i64 = rows[0].get(0);
        let vals: Vec<String> = rows.iter().map(|r| r.get::<_, String>(1)).collect();
        out.push(format!(
            "{n} value(s) of ({list}) appear more than once (first: {}); remove the duplicates first, or the unique index fails",
            vals.join(", ")
        ));
    }
    Ok(())
}

async fn orphans(
    c: &impl GenericClient,
    t: &Table,
    rt: &Table,
    cols: &[Ident],
    ref_cols: &[Ident],
    out: &mut Vec<String>,
) -> Result<(), db::Error> {
    let here: Vec<String> = cols.iter().map(|c| format!("t.{}", c.quoted())).collect();
    let there: Vec<String> = ref_cols
        .iter()
        .map(|c| format!("r.{}", c.quoted()))
        .collect();
    let join: Vec<String> = here
        .iter()
        .zip(&there)
        .map(|(a, b)| format!("{b} = {a}"))
        .collect();
    let not_null: Vec<String> = here.iter().map(|a| format!("{a} IS NOT NULL")).collect();
    let cond = format!(
        "{} AND NOT EXISTS (SELECT FROM {} r WHERE {})",
        not_null.join(" AND "),
        rt.quoted(),
        join.join(" AND ")
    );
    let key = key_of(t);
    let key = if key == "ctid" {
        key
    } else {
        format!("t.{key}")
    };
    let sql = format!(
        "SELECT count(*) OVER (), ({key})::text FROM {} t WHERE {cond} LIMIT 5",
        t.quoted()
    );
    let rows = c.rows(&sql, &[]).await?;
    if !rows.is_empty() {
        let n: i64 = rows[0].get(0);
        let keys: Vec<String> = rows.iter().map(|r| r.get::<_, String>(1)).collect();
        out.push(format!(
            "{n} row(s) reference no row of {} (first: {}); fix them first, or the validation fails",
            rt.quoted(),
            keys.join(", ")
        ));
    }
    Ok(())
}

/// A type change needs a way from the old type to the new (a cast, or `up`) that
/// works on every row, and back (`down`).
async fn conversion(
    c: &impl GenericClient,
    t: &Table,
    s: &crate::ops::ChangeTypeSpec,
    out: &mut Vec<String>,
) -> Result<(), db::Error> {
    let col = match t.column(s.column.as_str()) {
        Some(col) => col,
        None => return Ok(()),
    };
    let quoted = s.column.quoted();
    let up =
        s.up.clone()
            .unwrap_or_else(|| format!("{quoted}::{}", s.type_sql));
    let down = s
        .down
        .clone()
        .unwrap_or_else(|| format!("{quoted}::{}", col.type_sql));
    // Both directions must at least make sense to the server.
    for (what, expr, from) in [
        ("up", &up, col.type_sql.as_str()),
        ("down", &down, s.type_sql.as_str()),
    ] {
        let probe = format!("SELECT ({expr}) FROM (SELECT NULL::{from} AS {quoted}) AS probe");
        if let Err(e) = c.rows(&probe, &[]).await {
            out.push(format!(
                "`{what}` ({expr}) does not work from {from}: {}; give `{what}:` explicitly",
                db::Error::from(e)
            ));
            return Ok(());
        }
    }
    // Every existing value must convert.
    // `count(v)` reads every converted value: the planner may not skip the expression.
    let scan = format!(
        "SELECT count(v) FROM (SELECT ({up}) AS v FROM {}) AS converted",
        t.quoted()
    );
    if let Err(e) = c.rows(&scan, &[]).await {
        out.push(format!(
            "converting the existing rows with `up` ({up}) fails: {}; fix those rows or give an `up` that handles them",
            db::Error::from(e)
        ));
    }
    Ok(())
}
