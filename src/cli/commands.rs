//! The commands that run or change a plan: `plan apply`, `resume`, `rollback`,
//! `backfill` and `throttle`; how each one ends, and the next command to run.

use std::path::{Path, PathBuf};

use super::output::Line;
use super::{next, plan_cmd, prompt, report};
use crate::control::{Event, Overrides, Status};
use crate::db;
use crate::engine;
use crate::exec::{self, rollback, runner};
use crate::exit::{Exit, ExitStatus};
use crate::plan::{self, Plan};

/// `plan apply FILE`.
pub async fn apply(cx: &exec::Context, file: &Path) -> Result<Exit, exec::Error> {
    let plan = load_or_report(file)?;
    announce(cx, &plan);
    finish(&plan.id, runner::run(cx, &plan, runner::Mode::Apply).await)
}

/// `resume PLAN`: a waiting gate passes only when the operator confirms it.
pub async fn resume(cx: &exec::Context, arg: &str) -> Result<Exit, exec::Error> {
    let plan = resolve_plan(cx, arg).await?;
    super::output::set_plan(&plan.id);
    if !cx.options.yes
        && let Some(gate) = prompt::waiting_gate(cx, &plan).await
        && !prompt::confirm_gate(&plan, &gate)
    {
        return Ok(Exit::Resumable);
    }
    announce(cx, &plan);
    finish(&plan.id, runner::run(cx, &plan, runner::Mode::Resume).await)
}

/// `rollback PLAN`, once the operator has confirmed it.
pub async fn roll_back(cx: &exec::Context, arg: &str) -> Result<Exit, exec::Error> {
    let plan = resolve_plan(cx, arg).await?;
    super::output::set_plan(&plan.id);
    if !cx.options.yes && !prompt::confirm_rollback(cx, &plan).await? {
        return Ok(Exit::Invalid);
    }
    match rollback::rollback(cx, &plan).await {
        Ok(()) => {
            Line::info("rollback_done", format!("plan `{}` rolled back", plan.id)).emit();
            next("each step's state", &format!("status {}", plan.id));
            Ok(Exit::Ok)
        }
        Err(e @ exec::Error::RollbackStopped { .. }) => {
            // Not a failure of anything: the plan gives this step no undo.
            let code = e.exit();
            Line::error("rollback_stopped", e.to_string())
                .field("exit", code.code())
                .emit();
            next("see where each step stands", &format!("status {}", plan.id));
            Ok(code)
        }
        Err(e) => Err(e),
    }
}

/// `backfill FILE`: only the backfill steps, with the operator's throttles.
pub async fn backfill(cx: &exec::Context, file: &Path) -> Result<Exit, exec::Error> {
    let plan = load_or_report(file)?;
    if let Some(s) = &cx.options.backfill.step
        && !plan
            .steps
            .iter()
            .any(|x| &x.name == s && matches!(x.kind, plan::StepKind::Backfill(_)))
    {
        return Err(exec::Error::Usage(format!(
            "plan `{}` has no backfill step `{s}`",
            plan.id
        )));
    }
    record_overrides(cx, &plan).await?;
    announce(cx, &plan);
    let before = report::steps_started();
    let result = runner::run(cx, &plan, runner::Mode::BackfillOnly).await;
    if result.is_err() {
        return finish(&plan.id, result);
    }
    backfill_ended(cx, &plan, report::steps_started() > before).await
}

/// After `backfill`: what ran, what is left of the plan, and how to continue it.
async fn backfill_ended(cx: &exec::Context, plan: &Plan, ran: bool) -> Result<Exit, exec::Error> {
    let c = db::get(&cx.pool, &cx.target).await?;
    let rows = cx.control.steps(&**c, &plan.id).await?;
    let left: Vec<&str> = rows
        .iter()
        .filter(|r| r.status != Status::Succeeded)
        .map(|r| r.name.as_str())
        .collect();
    let which = match &cx.options.backfill.step {
        Some(s) => format!("backfill step `{s}`"),
        None => "the backfill steps".to_string(),
    };
    let what = if ran {
        format!("{which} of plan `{}` done", plan.id)
    } else {
        format!("{which} of plan `{}` had nothing left to do", plan.id)
    };
    if left.is_empty() {
        Line::info("backfill_done", format!("{what}; the plan is complete")).emit();
        return Ok(Exit::Ok);
    }
    Line::info(
        "backfill_done",
        format!(
            "{what}; the plan is not: {} step(s) remain, from `{}`",
            left.len(),
            left[0]
        ),
    )
    .field("steps_left", &left)
    .emit();
    next("continue the plan with", &format!("resume {}", plan.id));
    Ok(Exit::Ok)
}

/// `plan `X` (N steps) on URL`: the first line of a run.
fn announce(cx: &exec::Context, plan: &Plan) {
    super::output::set_plan(&plan.id);
    let size = if plan.pending.is_empty() {
        format!("{} steps", plan.steps.len())
    } else {
        format!(
            "{} steps, and those of {} operation(s) generated from the live catalog",
            plan.steps.len(),
            plan.pending.len()
        )
    };
    Line::info(
        "plan_started",
        format!("plan `{}` ({size}) on {}", plan.id, cx.target.display),
    )
    .field("steps", plan.steps.len())
    .emit();
}

/// Loads a plan file; on errors prints every diagnostic and returns a usage error.
pub fn load_or_report(file: &Path) -> Result<Plan, exec::Error> {
    plan::load(file).map_err(|e| {
        plan_cmd::print_diagnostics(&e.diagnostics());
        exec::Error::Usage(format!(
            "{}: the plan is invalid; nothing was changed",
            file.display()
        ))
    })
}

/// A plan given by file, or by id (its file recorded in the control table).
async fn resolve_plan(cx: &exec::Context, arg: &str) -> Result<Plan, exec::Error> {
    let path = Path::new(arg);
    if path.is_file() || arg.ends_with(".yaml") || arg.ends_with(".yml") {
        return load_or_report(path);
    }
    let c = db::connect(&cx.target).await?;
    let exists = cx.control.exists(&c).await?;
    let recorded = if exists {
        cx.control.plan_row(&c, arg).await?
    } else {
        None
    };
    let Some(row) = recorded else {
        let known: Vec<String> = if exists {
            cx.control
                .plans(&c)
                .await?
                .into_iter()
                .map(|p| p.id)
                .collect()
        } else {
            Vec::new()
        };
        return Err(exec::Error::Usage(format!(
            "no plan `{arg}` is recorded in schema `{}` of {} (known: {}); pass the plan file instead, or the --database-url and --control-schema it ran with",
            cx.control.schema,
            cx.target.display,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    };
    let file = PathBuf::from(&row.file);
    if !file.is_file() {
        return Err(exec::Error::Usage(format!(
            "plan `{arg}` was started from {}, which no longer exists here; pass the plan file: `{}`",
            row.file,
            super::hint::command(&format!("resume path/to/{arg}.yaml"))
        )));
    }
    load_or_report(&file)
}

async fn record_overrides(cx: &exec::Context, plan: &Plan) -> Result<(), exec::Error> {
    let o = &cx.options.backfill;
    if o.batch_size.is_none()
        && o.sleep.is_none()
        && o.max_rows_per_sec.is_none()
        && o.target_batch_time.is_none()
        && o.workers.is_none()
    {
        return Ok(());
    }
    let c = db::connect(&cx.target).await?;
    if !cx.control.exists(&c).await? || cx.control.plan_row(&c, &plan.id).await?.is_none() {
        return Ok(());
    }
    let given = Event::CliOverrides {
        batch_size: o.batch_size,
        sleep_ms: o.sleep.map(|d| d.as_millis() as u64),
        max_rows_per_sec: o.max_rows_per_sec,
        target_batch_time_ms: o.target_batch_time.map(|d| d.as_millis() as u64),
        workers: o.workers,
        step: o.step.clone(),
        by: engine::whoami(),
    };
    cx.control
        .event(&c, &plan.id, o.step.as_deref(), &given)
        .await?;
    // The newer instruction wins: a flag given now replaces a live override of the
    // same setting that an earlier `pgshift throttle` stored (and says so). A
    // `throttle` during this run replaces the flag in turn.
    let cli = Overrides {
        batch_size: o.batch_size,
        sleep_ms: o.sleep.map(|d| d.as_millis() as u64),
        max_rows_per_sec: o.max_rows_per_sec,
        ..Overrides::default()
    };
    let before = cx
        .control
        .replace_overrides(&c, &plan.id, o.step.as_deref(), |old| old.without(&cli).0)
        .await?;
    for (step, old) in before {
        let replaced = old.without(&cli).1;
        if replaced.is_empty() {
            continue;
        }
        cx.reporter.message(&format!(
            "step `{step}`: your flags replace the live override(s) set earlier with `pgshift throttle`: {}",
            replaced.describe()
        ));
        let superseded = Event::OverridesSuperseded {
            replaced,
            by: engine::whoami(),
        };
        cx.control
            .event(&c, &plan.id, Some(&step), &superseded)
            .await?;
    }
    Ok(())
}

/// `throttle PLAN`: stores a patch of live overrides for the plan's backfill
/// steps (after removing every stored one, with `--clear`), and says honestly
/// whether a backfill is running to pick it up.
pub async fn throttle(
    cx: &exec::Context,
    plan: &str,
    step: Option<&str>,
    patch: &Overrides,
    clear: bool,
) -> Result<Exit, exec::Error> {
    if let Some(b) = patch.batch_size
        && (b == 0 || b > plan::defaults::BATCH_SIZE_LIMIT)
    {
        return Err(exec::Error::Usage(format!(
            "--batch-size must be between 1 and {}",
            plan::defaults::BATCH_SIZE_LIMIT
        )));
    }
    if patch.is_empty() && !clear {
        return Err(exec::Error::Usage("nothing to change: give --batch-size, --sleep, --max-rows-per-sec, --max-slot-lag, --slots, --ignore-inactive-slots, --max-wal-rate, --pause-on-autovacuum, --pause, --unpause or --clear".into()));
    }
    let c = db::connect(&cx.target).await?;
    if !cx.control.exists(&c).await? || cx.control.plan_row(&c, plan).await?.is_none() {
        return Err(exec::Error::Usage(format!(
            "no plan `{plan}` is recorded in schema `{}` of {}; nothing was changed",
            cx.control.schema, cx.target.display
        )));
    }
    let steps: Vec<_> = cx
        .control
        .steps(&c, plan)
        .await?
        .into_iter()
        .filter(|s| s.kind == crate::kind::backfill::KEY && step.is_none_or(|n| n == s.name))
        .collect();
    if steps.is_empty() {
        return Err(exec::Error::Usage(format!(
            "plan `{plan}` has no backfill step{}; nothing was changed",
            step.map(|s| format!(" named `{s}`")).unwrap_or_default()
        )));
    }
    if clear {
        let before = cx
            .control
            .replace_overrides(&c, plan, step, |_| Overrides::default())
            .await?;
        for (name, old) in before.into_iter().filter(|(_, o)| !o.is_empty()) {
            Line::info(
                "overrides_cleared",
                format!("cleared on `{name}`: {}", old.describe()),
            )
            .emit();
            let cleared = Event::OverridesCleared {
                cleared: old,
                by: engine::whoami(),
            };
            cx.control.event(&c, plan, Some(&name), &cleared).await?;
        }
        if patch.is_empty() {
            Line::info(
                "throttle_cleared",
                format!("no live overrides left on {} backfill step(s) of `{plan}`: the plan's throttles (and the flags of the `pgshift backfill` running it) apply from its next batch", steps.len()),
            )
            .emit();
            return Ok(Exit::Ok);
        }
    }
    let n = cx.control.merge_overrides(&c, plan, step, patch).await?;
    let set = Event::OverrideSet {
        set: patch.clone(),
        by: engine::whoami(),
    };
    cx.control.event(&c, plan, step, &set).await?;
    let running = cx.control.lock_holder(&c, plan).await?.is_some()
        && steps.iter().any(|s| s.status == Status::Running);
    let finished = steps.iter().all(|s| s.status == Status::Succeeded);
    let what = patch.to_json();
    let set = format!(
        "set {} on {n} backfill step(s) of `{plan}`",
        patch.describe()
    );
    let (text, when) = if running {
        (
            format!("{set}; the running backfill applies it at its next batch"),
            "running",
        )
    } else if finished {
        (
            format!(
                "{set}, but its backfill has already finished ({}): the setting applies only if the step runs again, after a rollback",
                steps
                    .iter()
                    .map(|s| format!("`{}` succeeded", s.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "finished",
        )
    } else {
        let status = cx.control.plan_row(&c, plan).await?.map(|p| p.status);
        (
            format!(
                "{set}, but no backfill of it is running now (plan status: {}): it is stored, and applies from the first batch when the backfill runs again",
                status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "unknown".into())
            ),
            "not_running",
        )
    };
    Line::info("throttle_set", text)
        .field("set", &what)
        .field("backfill", when)
        .emit();
    if !running && !finished && patch.paused == Some(true) {
        next(
            "a backfill started later holds before its first batch; lift the pause with",
            &format!("throttle {plan} --unpause"),
        );
    }
    Ok(Exit::Ok)
}

/// Maps a run's result to the exit code, printing what happened and what to do next.
pub fn finish(plan: &str, r: Result<(), exec::Error>) -> Result<Exit, exec::Error> {
    let e = match r {
        Ok(()) => {
            Line::info("plan_done", format!("plan `{plan}` done")).emit();
            return Ok(Exit::Ok);
        }
        Err(e) => e,
    };
    match &e {
        exec::Error::Gate {
            plan,
            step,
            message,
        } => {
            Line::info(
                "gate_waiting",
                format!("plan `{plan}` stopped at gate `{step}`:\n  {message}"),
            )
            .step(step)
            .field("gate", step)
            .field("message", message)
            .emit();
            next(
                "when that is done, continue with",
                &format!("resume {plan}"),
            );
            Ok(Exit::Resumable)
        }
        // The runner's own connection (the one holding the plan's lock and writing
        // the control table) was lost between steps or after a backfill's workers
        // reconnected: nothing is half-done, the plan continues where it stopped.
        exec::Error::Db(db) if db.is_connection_lost() => {
            Line::error(
                "connection_lost",
                format!("lost the connection to the database ({db}); plan `{plan}` stopped, and every step that committed is recorded"),
            )
            .emit();
            next(
                "once the server answers again, continue with",
                &format!("resume {plan}"),
            );
            Ok(Exit::Resumable)
        }
        _ => {
            let code = super::report_error(&e);
            match &e {
                exec::Error::Cancelled { .. }
                | exec::Error::ConnectionLost { .. }
                | exec::Error::LockLost { .. } => next("continue with", &format!("resume {plan}")),
                exec::Error::PlanChanged { .. } => {}
                e if e.is_step_failure() => {
                    next("see which step failed and why", &format!("status {plan}"));
                    next(
                        "then fix the cause and continue (or undo the plan with `rollback`)",
                        &format!("resume {plan}"),
                    );
                }
                _ => {}
            }
            Ok(code)
        }
    }
}

/// `finalize PLAN`: drops what the finished plan's contract phase set aside.
pub async fn finalize(cx: &exec::Context, arg: &str) -> Result<Exit, exec::Error> {
    let plan = resolve_plan(cx, arg).await?;
    let done = crate::exec::finalize::finalize(cx, &plan).await?;
    let text = if done.is_empty() {
        format!("plan `{}` set nothing aside; it is finalized", plan.id)
    } else {
        format!(
            "plan `{}` finalized: dropped what {} set aside; rollback can no longer undo them",
            plan.id,
            done.join(", ")
        )
    };
    Line::info("finalized", text).emit();
    Ok(Exit::Ok)
}
