//! Someone else changed the database between two steps (while the plan waited
//! at a gate, say): before the first step of a run, what the finished steps
//! created (the dual-write triggers, the indexes and columns of `sql` steps)
//! must still be there; before a trigger or backfill step, the table and the
//! columns it works on must exist. A difference stops the run (exit 1) with
//! the object, what pgshift expected of it, and what to do; nothing runs.

use std::collections::HashMap;

use tokio_postgres::GenericClient;

use crate::control::{Event, Status, StepRow};
use crate::db::{self, OneTrip};
use crate::engine::{Context, Error};
use crate::ident::{Ident, QualifiedName};
use crate::kind::backfill::BackfillSet;
use crate::kind::{StepKind, trigger};
use crate::plan::created::{Created, created};
use crate::plan::{Plan, Step};

/// What was found of an object that pgshift expected.
struct Found {
    object: String,
    found: &'static str,
    expected: String,
    fix: String,
}

/// Before `next` (the first step this run executes): what the plan's finished
/// steps created is still there, and enabled.
pub async fn check_created(
    cx: &Context,
    plan: &Plan,
    rows: &HashMap<String, StepRow>,
    next: &Step,
) -> Result<(), Error> {
    let done: Vec<&Step> = plan
        .steps
        .iter()
        .filter(|s| {
            rows.get(&s.name)
                .is_some_and(|r| r.status == Status::Succeeded)
        })
        .collect();
    let c = db::get(&cx.pool, &cx.target).await?;
    for (i, s) in done.iter().enumerate() {
        // A later finished `sql` step that drops or renames something by that name
        // (an operation's contract step, say) changed it on purpose.
        let later: Vec<String> = done[i + 1..]
            .iter()
            .filter_map(|l| match &l.kind {
                StepKind::Sql(b) => Some(b.texts()),
                _ => None,
            })
            .flatten()
            .map(|t| t.to_lowercase())
            .filter(|t| t.contains("drop") || t.contains("rename"))
            .collect();
        let mentioned = |name: &str| {
            let n = name.to_lowercase();
            later.iter().any(|t| t.contains(&n))
        };
        let found = match &s.kind {
            StepKind::Trigger(t) => {
                let name = trigger::names(&plan.id, &s.name).trigger;
                if mentioned(name.as_str()) || dropped_by_step(&done, &s.name) {
                    continue;
                }
                missing_trigger(&**c, plan, s, &t.table, &name).await?
            }
            StepKind::Sql(body) => {
                let mut found = None;
                for object in body.texts().iter().flat_map(|t| created(t)) {
                    if object.names().iter().any(|n| mentioned(n)) {
                        continue;
                    }
                    found = missing_object(&**c, plan, s, &object).await?;
                    if found.is_some() {
                        break;
                    }
                }
                found
            }
            _ => None,
        };
        if let Some(f) = found {
            return Err(drifted(cx, &**c, plan, next, f).await);
        }
    }
    Ok(())
}

/// Before a trigger or backfill step: its table and the columns it writes exist.
pub async fn check_needs(cx: &Context, plan: &Plan, step: &Step) -> Result<(), Error> {
    let (table, columns): (&QualifiedName, Vec<&Ident>) = match &step.kind {
        StepKind::Trigger(t) => (
            &t.table,
            t.set.iter().chain(&t.reverse).map(|(c, _)| c).collect(),
        ),
        StepKind::Backfill(b) => {
            let mut cols: Vec<&Ident> = match &b.set {
                BackfillSet::Columns(c) => c.iter().map(|(c, _)| c).collect(),
                BackfillSet::Clause(_) => Vec::new(),
            };
            cols.extend(b.key.iter().flatten());
            (&b.table, cols)
        }
        _ => return Ok(()),
    };
    let c = db::get(&cx.pool, &cx.target).await?;
    let what = match &step.kind {
        StepKind::Trigger(_) => "its dual-write trigger",
        _ => "its backfill",
    };
    let found = if !table_exists(&**c, table).await? {
        Some(Found {
            object: format!("table {table}"),
            found: "does not exist",
            expected: format!("step `{}` puts {what} on it", step.name),
            fix: fix_missing(plan, "it"),
        })
    } else {
        let mut found = None;
        for col in columns {
            if !column_exists(&**c, table, col).await? {
                found = Some(Found {
                    object: format!("column {col} of {table}"),
                    found: "does not exist",
                    expected: format!("step `{}` writes it ({what})", step.name),
                    fix: fix_missing(plan, "it"),
                });
                break;
            }
        }
        found
    };
    match found {
        Some(f) => Err(drifted(cx, &**c, plan, step, f).await),
        None => Ok(()),
    }
}

fn fix_missing(plan: &Plan, it: &str) -> String {
    format!(
        "If it was renamed or dropped since the plan started, put {it} back as the plan expects, then `pgshift resume {id}`; or undo the plan with `pgshift rollback {id}`",
        id = plan.id
    )
}

/// True when a finished `drop_trigger` step removed the trigger of step `step`.
fn dropped_by_step(done: &[&Step], step: &str) -> bool {
    done.iter()
        .any(|s| matches!(&s.kind, StepKind::DropTrigger(d) if d.step == step))
}

async fn missing_trigger(
    c: &impl GenericClient,
    plan: &Plan,
    step: &Step,
    table: &QualifiedName,
    name: &Ident,
) -> Result<Option<Found>, Error> {
    if !table_exists(c, table).await? {
        return Ok(Some(Found {
            object: format!("table {table}"),
            found: "does not exist",
            expected: format!(
                "step `{}` put its dual-write trigger on it, and the plan's later steps work on it",
                step.name
            ),
            fix: fix_missing(plan, "it"),
        }));
    }
    let row = c
        .row_opt(
            "SELECT t.tgenabled::text FROM pg_catalog.pg_trigger t WHERE t.tgrelid = to_regclass($1) AND t.tgname = $2",
            &[&table.quoted(), &name.as_str()],
        )
        .await
        .map_err(db::Error::from)?;
    let found = match row.map(|r| r.get::<_, String>(0)) {
        None => "is gone",
        Some(e) if e == "D" => "is disabled",
        Some(_) => return Ok(None),
    };
    Ok(Some(Found {
        object: format!("the dual-write trigger {name} on {table} (made by step `{}`)", step.name),
        found,
        expected: "the plan keeps it until a later step drops it: without it, application writes since then did not reach the new columns".into(),
        fix: format!(
            "Put it back with the statements `pgshift plan show {}` prints for step `{}` (they are safe to run again), check the rows written meanwhile, then `pgshift resume {}`",
            plan.file.display(),
            step.name,
            plan.id
        ),
    }))
}

async fn missing_object(
    c: &impl GenericClient,
    plan: &Plan,
    step: &Step,
    object: &Created,
) -> Result<Option<Found>, Error> {
    let gone = match object {
        Created::Index { name, table } => {
            let qualified = QualifiedName {
                schema: table.schema.clone(),
                name: name.clone(),
            };
            !table_exists(c, &qualified).await?
        }
        Created::Column { table, column } => {
            table_exists(c, table).await? && !column_exists(c, table, column).await?
        }
    };
    Ok(gone.then(|| Found {
        object: format!("{} (made by step `{}`)", object.describe(), step.name),
        found: "is gone",
        expected: "the plan made it and its later steps count on it".into(),
        fix: format!(
            "Put it back with the SQL of step `{}` (`pgshift plan show {}` prints it), then `pgshift resume {}`; or undo the plan with `pgshift rollback {}`",
            step.name,
            plan.file.display(),
            plan.id,
            plan.id
        ),
    }))
}

async fn table_exists(c: &impl GenericClient, table: &QualifiedName) -> Result<bool, Error> {
    Ok(
        c.row("SELECT to_regclass($1) IS NOT NULL", &[&table.quoted()])
            .await
            .map_err(db::Error::from)?
            .get(0),
    )
}

async fn column_exists(
    c: &impl GenericClient,
    table: &QualifiedName,
    column: &Ident,
) -> Result<bool, Error> {
    Ok(c
        .row(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND a.attnum > 0 AND NOT a.attisdropped)",
            &[&table.quoted(), &column.as_str()],
        )
        .await
        .map_err(db::Error::from)?
        .get(0))
}

/// The error for `f`, recorded as an event of `step`.
async fn drifted(
    cx: &Context,
    c: &impl GenericClient,
    plan: &Plan,
    step: &Step,
    f: Found,
) -> Error {
    let event = Event::DriftFound {
        object: f.object.clone(),
        found: f.found.to_string(),
        expected: f.expected.clone(),
    };
    let _ = cx
        .control
        .event(c, &plan.id, Some(&step.name), &event)
        .await;
    Error::Drift {
        step: step.name.clone(),
        object: f.object,
        found: f.found,
        expected: f.expected,
        fix: f.fix,
    }
}
