//! The command line: clap types, output formats, and the glue from arguments to
//! library calls. The only module (with `main.rs`) that prints.

mod args;
mod prompt;
pub mod report;
mod status;

pub use args::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::control::Control;
use crate::control::{Event, Overrides};
use crate::db;
use crate::engine;
use crate::exec::{self, rollback, runner};
use crate::exit::{Exit, ExitStatus};
use crate::plan::{self, Diagnostic, Plan, Severity};

/// Parses the arguments, runs the command, and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => Exit::Invalid.code(),
            };
        }
    };
    init_tracing(&cli.global);
    run(cli).code()
}

fn init_tracing(g: &Global) {
    let level = if g.quiet {
        "error"
    } else {
        match g.verbose {
            0 => "warn",
            1 => "info",
            _ => "debug",
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGSHIFT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("pgshift={level}")));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match g.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn run(cli: Cli) -> Exit {
    let g = cli.global.clone();
    let minute = Duration::from_secs(60);
    let none = engine::BackfillOverrides::default;
    match cli.command {
        Command::Plan(PlanCommand::Apply { file, reconnect }) => with_runtime(
            &g,
            |cx| async move { apply(&cx, &file).await },
            reconnect.reconnect_timeout,
            none(),
            false,
        ),
        Command::Resume {
            plan,
            accept_changed,
            reconnect,
        } => with_runtime(
            &g,
            move |cx| async move { resume(&cx, &plan).await },
            reconnect.reconnect_timeout,
            none(),
            accept_changed,
        ),
        Command::Rollback {
            plan,
            accept_changed,
        } => with_runtime(
            &g,
            move |cx| async move { roll_back(&cx, &plan).await },
            minute,
            none(),
            accept_changed,
        ),
        Command::Backfill {
            file,
            step,
            batch_size,
            sleep,
            max_rows_per_sec,
            target_batch_time,
            workers,
            reconnect,
        } => {
            let overrides = engine::BackfillOverrides {
                step,
                batch_size,
                sleep,
                max_rows_per_sec,
                target_batch_time,
                workers,
            };
            with_runtime(
                &g,
                move |cx| async move { backfill(&cx, &file).await },
                reconnect.reconnect_timeout,
                overrides,
                false,
            )
        }
        Command::Throttle {
            plan,
            step,
            batch_size,
            sleep,
            max_rows_per_sec,
            pause,
            unpause,
            clear,
            max_slot_lag,
            slots,
            ignore_inactive_slots,
            max_wal_rate,
            pause_on_autovacuum,
        } => {
            let patch = Overrides {
                batch_size,
                sleep_ms: sleep.map(|s| s.as_millis() as u64),
                max_rows_per_sec,
                paused: (pause || unpause).then_some(pause),
                max_slot_lag,
                slots: slots.map(|s| s.0),
                ignore_inactive_slots,
                max_wal_rate,
                pause_on_autovacuum,
            };
            with_runtime(
                &g,
                move |cx| async move { throttle(&cx, &plan, step.as_deref(), &patch, clear).await },
                minute,
                none(),
                false,
            )
        }
        Command::Status {
            plan,
            format,
            events,
        } => with_runtime(
            &g,
            move |cx| async move { status::print(&cx, plan.as_deref(), format, events).await },
            minute,
            none(),
            false,
        ),
        Command::Demo { fresh, leads } => crate::demo::run(&g, fresh, leads),
        Command::Plan(PlanCommand::Validate { files, format }) => {
            validate(&files, format, cli.global.quiet)
        }
        Command::Plan(PlanCommand::Show { file }) => show(&file),
    }
}

/// `plan apply FILE`.
async fn apply(cx: &exec::Context, file: &Path) -> Result<Exit, exec::Error> {
    let plan = load_or_report(file)?;
    announce(cx, &plan);
    finish(&plan.id, runner::run(cx, &plan, runner::Mode::Apply).await)
}

/// `resume PLAN`: a waiting gate passes only when the operator confirms it.
async fn resume(cx: &exec::Context, arg: &str) -> Result<Exit, exec::Error> {
    let plan = resolve_plan(cx, arg).await?;
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
async fn roll_back(cx: &exec::Context, arg: &str) -> Result<Exit, exec::Error> {
    let plan = resolve_plan(cx, arg).await?;
    if !cx.options.yes && !prompt::confirm_rollback(cx, &plan).await? {
        return Ok(Exit::Invalid);
    }
    rollback::rollback(cx, &plan).await?;
    eprintln!(
        "pgshift: plan `{}` rolled back; `pgshift status {}` shows each step",
        plan.id, plan.id
    );
    Ok(Exit::Ok)
}

/// `backfill FILE`: only the backfill steps, with the operator's throttles.
async fn backfill(cx: &exec::Context, file: &Path) -> Result<Exit, exec::Error> {
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
    finish(
        &plan.id,
        runner::run(cx, &plan, runner::Mode::BackfillOnly).await,
    )
}

/// `plan show FILE`.
fn show(file: &Path) -> Exit {
    match plan::load(file) {
        Ok(p) => {
            print!("{}", crate::show::render(&p));
            Exit::Ok
        }
        Err(e) => {
            print_diagnostics(&e.diagnostics());
            Exit::Invalid
        }
    }
}

/// Builds the runtime and the execution context, installs the signal handlers,
/// runs `f`, and turns its result into an exit code.
fn with_runtime<F, Fut>(
    g: &Global,
    f: F,
    reconnect_timeout: Duration,
    backfill: engine::BackfillOverrides,
    accept_changed: bool,
) -> Exit
where
    F: FnOnce(exec::Context) -> Fut,
    Fut: std::future::Future<Output = Result<Exit, exec::Error>>,
{
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let url = g
        .database_url
        .clone()
        .unwrap_or_else(|| db::DEFAULT_URL.to_string());
    let target = match db::Target::parse(&url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::Invalid;
        }
    };
    let options = exec::Options {
        yes: g.yes,
        accept_changed,
        auto_gates: false,
        backfill,
        reconnect_timeout,
    };
    rt.block_on(async move {
        let cx = match context(g, target, options) {
            Ok(cx) => cx,
            Err(e) => {
                eprintln!("error: {e}");
                return Exit::Invalid;
            }
        };
        install_signals(cx.cancel.clone(), cx.reporter.clone());
        match f(cx).await {
            Ok(code) => code,
            Err(e) => report_error(&e),
        }
    })
}

/// The async runtime every database command runs on.
pub fn runtime() -> Result<tokio::runtime::Runtime, Exit> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: cannot start the async runtime: {e}");
            Exit::StepFailed
        })
}

/// The execution context for `target`.
pub fn context(
    g: &Global,
    target: db::Target,
    options: exec::Options,
) -> Result<exec::Context, db::Error> {
    let pool = db::pool(&target, 16)?;
    Ok(exec::Context {
        target,
        pool,
        control: Control::new(&g.control_schema),
        cancel: CancellationToken::new(),
        reporter: Arc::new(report::Terminal::new(g.progress, g.quiet)),
        options,
    })
}

/// First SIGINT/SIGTERM: stop after the batch or statement in flight. Second SIGINT: exit at once.
pub fn install_signals(cancel: CancellationToken, reporter: Arc<dyn engine::Reporter>) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        reporter.message("interrupted: cancelling the statement in flight and saving progress (press Ctrl-C again to quit at once)");
        cancel.cancel();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!(
            "pgshift: second interrupt, exiting now; `pgshift resume` continues from the last committed step or batch"
        );
        std::process::exit(Exit::Resumable.code());
    });
}

fn announce(cx: &exec::Context, plan: &Plan) {
    cx.reporter.message(&format!(
        "plan `{}` ({} steps) on {}",
        plan.id,
        plan.steps.len(),
        cx.target.display
    ));
}

/// Loads a plan file; on errors prints every diagnostic and returns a usage error.
fn load_or_report(file: &Path) -> Result<Plan, exec::Error> {
    plan::load(file).map_err(|e| {
        print_diagnostics(&e.diagnostics());
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
            "no plan `{arg}` is recorded in {} (known: {}); pass the plan file instead",
            cx.control.schema,
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
            "plan `{arg}` was started from {}, which no longer exists here; pass the plan file: `pgshift resume path/to/{arg}.yaml`",
            row.file
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

/// `throttle PLAN`: stores a patch of live overrides for the plan's backfill steps
/// (after removing every stored one, with `--clear`).
async fn throttle(
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
            "no plan `{plan}` is recorded in {}",
            cx.control.schema
        )));
    }
    if clear {
        let before = cx
            .control
            .replace_overrides(&c, plan, step, |_| Overrides::default())
            .await?;
        for (name, old) in before.into_iter().filter(|(_, o)| !o.is_empty()) {
            println!("cleared on `{name}`: {}", old.describe());
            let cleared = Event::OverridesCleared {
                cleared: old,
                by: engine::whoami(),
            };
            cx.control.event(&c, plan, Some(&name), &cleared).await?;
        }
    }
    let n = if patch.is_empty() {
        cx.control
            .replace_overrides(&c, plan, step, Overrides::clone)
            .await?
            .len() as u64
    } else {
        cx.control.merge_overrides(&c, plan, step, patch).await?
    };
    if n == 0 {
        return Err(exec::Error::Usage(format!(
            "plan `{plan}` has no backfill step{}",
            step.map(|s| format!(" named `{s}`")).unwrap_or_default()
        )));
    }
    if !patch.is_empty() {
        let set = Event::OverrideSet {
            set: patch.clone(),
            by: engine::whoami(),
        };
        cx.control.event(&c, plan, step, &set).await?;
        println!(
            "set {} on {n} backfill step(s) of `{plan}`; a running backfill applies it at its next batch",
            patch.describe()
        );
    } else {
        println!(
            "no live overrides left on {n} backfill step(s) of `{plan}`: the plan's throttles (and the flags of the `pgshift backfill` running it) apply from its next batch"
        );
    }
    Ok(Exit::Ok)
}

/// Maps a run's result to the exit code, printing what happened and what to do next.
fn finish(plan: &str, r: Result<(), exec::Error>) -> Result<Exit, exec::Error> {
    match r {
        Ok(()) => {
            eprintln!("pgshift: plan `{plan}` done");
            Ok(Exit::Ok)
        }
        Err(exec::Error::Gate {
            plan,
            step,
            message,
        }) => {
            eprintln!(
                "pgshift: plan `{plan}` stopped at gate `{step}`:\n  {message}\nwhen that is done, continue with:\n  pgshift resume {plan}"
            );
            Ok(Exit::Resumable)
        }
        // The runner's own connection (the one holding the plan's lock and writing
        // the control table) was lost between steps or after a backfill's workers
        // reconnected: nothing is half-done, the plan continues where it stopped.
        Err(exec::Error::Db(e)) if e.is_connection_lost() => {
            eprintln!(
                "error: lost the connection to the database ({e}); plan `{plan}` stopped, and every step that committed is recorded"
            );
            eprintln!("once the server answers again, continue with: pgshift resume {plan}");
            Ok(Exit::Resumable)
        }
        Err(e) => {
            let code = report_error(&e);
            let next = match &e {
                exec::Error::Cancelled { .. }
                | exec::Error::ConnectionLost { .. }
                | exec::Error::LockLost { .. } => {
                    format!("continue with: pgshift resume {plan}")
                }
                e if e.is_step_failure() => format!(
                    "see `pgshift status {plan}`; fix the cause, then `pgshift resume {plan}` (or undo with `pgshift rollback {plan}`)"
                ),
                _ => String::new(),
            };
            if !next.is_empty() {
                eprintln!("{next}");
            }
            Ok(code)
        }
    }
}

/// The `status` table of one plan (used by the demo).
pub async fn print_status(cx: &exec::Context, plan: Option<&str>) -> Result<Exit, exec::Error> {
    status::print(cx, plan, StatusFormat::Table, false).await
}

fn report_error(e: &exec::Error) -> Exit {
    eprintln!("error: {e}");
    e.exit()
}

fn validate(files: &[PathBuf], format: OutputFormat, quiet: bool) -> Exit {
    let mut all = Vec::new();
    let mut failed = false;
    let mut summaries = Vec::new();
    for file in files {
        match plan::load(file) {
            Ok(p) => {
                summaries.push(serde_json::json!({"file": file, "id": p.id, "valid": true, "steps": p.steps.len()}));
                if format == OutputFormat::Human && !quiet {
                    let warnings = p.notes.clone();
                    print_diagnostics(&warnings);
                    println!(
                        "ok: {} (plan `{}`, {} steps)",
                        file.display(),
                        p.id,
                        p.steps.len()
                    );
                }
                all.extend(p.notes);
            }
            Err(e) => {
                failed = true;
                let diags = e.diagnostics();
                summaries.push(serde_json::json!({"file": file, "valid": false}));
                if format == OutputFormat::Human {
                    print_diagnostics(&diags);
                    let n = diags
                        .iter()
                        .filter(|d| d.severity == Severity::Error)
                        .count();
                    eprintln!("{}: {n} error(s); nothing was changed", file.display());
                }
                all.extend(diags);
            }
        }
    }
    if format == OutputFormat::Json {
        let out = serde_json::json!({
            "valid": !failed,
            "files": summaries,
            "diagnostics": all.iter().map(diagnostic_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    }
    if failed { Exit::Invalid } else { Exit::Ok }
}

/// The JSON form of a diagnostic (stable: CI scripts read it).
pub fn diagnostic_json(d: &Diagnostic) -> serde_json::Value {
    serde_json::json!({
        "file": d.file,
        "line": d.pos.line,
        "column": d.pos.col,
        "severity": match d.severity { Severity::Error => "error", Severity::Warning => "warning" },
        "rule": d.rule,
        "step": d.step,
        "message": d.message,
        "help": d.help,
    })
}

fn print_diagnostics(diags: &[Diagnostic]) {
    for d in diags {
        eprintln!("{d}");
    }
}
