//! The command line: clap types, output formats, and the glue from arguments to
//! library calls. The only module (with `main.rs`) that prints.

mod fleet;
pub mod report;
mod status;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::control::Control;
use crate::db;
use crate::exec::{self, runner};
use crate::exit::{Exit, ExitStatus};
use crate::plan::{self, Diagnostic, Plan, Severity};

/// Zero-downtime PostgreSQL schema changes: expand, dual-write, backfill, contract.
#[derive(Debug, Parser)]
#[command(name = "pgshift", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Args, Clone)]
pub struct Global {
    /// PostgreSQL connection URL (postgres://user@host:5432/db?sslmode=require).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Schema holding pgshift's control tables.
    #[arg(long, default_value = "pgshift", global = true)]
    pub control_schema: String,
    /// Progress bars on stderr: auto shows them only on a terminal.
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto, global = true)]
    pub progress: ProgressMode,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// More logging (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less output: only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Do not ask for confirmation.
    #[arg(long, global = true)]
    pub yes: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ProgressMode {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate, show or apply a plan file.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// Continue an interrupted, failed-then-fixed, or gated plan from its last checkpoint.
    Resume {
        /// The plan id (its file is found through the control table) or the plan file.
        plan: String,
        /// Continue although the plan file changed since the plan started.
        #[arg(long)]
        accept_changed: bool,
        #[command(flatten)]
        reconnect: Reconnect,
    },
    /// Plans and steps from the control table: status, attempts, rows, last error, next command.
    Status {
        /// One plan's steps; without it, every plan.
        plan: Option<String>,
        #[arg(long, value_enum, default_value_t = StatusFormat::Table)]
        format: StatusFormat,
        /// Also print the plan's event log.
        #[arg(long)]
        events: bool,
    },
    /// Run the rollbacks of the plan's completed steps in reverse order.
    Rollback {
        /// The plan id or the plan file.
        plan: String,
        /// Roll back although the plan file changed since the plan started.
        #[arg(long)]
        accept_changed: bool,
    },
    /// Run or continue only the backfill steps of a started plan, with your throttles.
    Backfill {
        file: PathBuf,
        /// Only this backfill step.
        #[arg(long)]
        step: Option<String>,
        #[arg(long)]
        batch_size: Option<u32>,
        /// Pause between batches (`20ms`, `1s`).
        #[arg(long, value_parser = parse_duration)]
        sleep: Option<Duration>,
        #[arg(long)]
        max_rows_per_sec: Option<u32>,
        /// Adapt the batch size so each batch takes about this long.
        #[arg(long, value_parser = parse_duration)]
        target_batch_time: Option<Duration>,
        /// Parallel key ranges (used when the step starts; a started step keeps its split).
        #[arg(long)]
        workers: Option<u32>,
        #[command(flatten)]
        reconnect: Reconnect,
    },
    /// Retune or pause a running backfill from another terminal.
    Throttle {
        plan: String,
        /// Only this backfill step (default: every backfill step of the plan).
        #[arg(long)]
        step: Option<String>,
        #[arg(long)]
        batch_size: Option<u32>,
        #[arg(long, value_parser = parse_duration)]
        sleep: Option<Duration>,
        #[arg(long)]
        max_rows_per_sec: Option<u32>,
        /// Pause the backfill after its batch in flight.
        #[arg(long, conflicts_with = "unpause")]
        pause: bool,
        #[arg(long)]
        unpause: bool,
    },
    /// One plan over many databases or tenant schemas, from a targets file.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// The whole flow on the bundled Clarivum plans and fixtures, against a demo database.
    Demo {
        /// Drop and recreate the demo database first.
        #[arg(long)]
        fresh: bool,
        /// Number of leads the fixtures generate.
        #[arg(long, default_value_t = 200_000)]
        leads: u32,
    },
}

#[derive(Debug, Args, Clone)]
pub struct Reconnect {
    /// After a lost connection, keep reconnecting this long before stopping (exit 3).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub reconnect_timeout: Duration,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum StatusFormat {
    Table,
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    plan::duration::parse(s)
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Parse, check and lint plan files; touches no database. Exit 2 on any error.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// `human` (compiler style) or `json` (for CI).
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        format: OutputFormat,
    },
    /// The steps in execution order, each with the exact SQL it will run.
    Show { file: PathBuf },
    /// Run the plan from its first unfinished step; stops at a gate, a failure or an interrupt.
    Apply {
        file: PathBuf,
        #[command(flatten)]
        reconnect: Reconnect,
    },
}

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
    match cli.command {
        Command::Plan(PlanCommand::Apply { file, reconnect }) => with_runtime(
            &g,
            |cx| async move {
                let plan = load_or_report(&file)?;
                announce(&cx, &plan);
                finish(&plan.id, runner::run(&cx, &plan, runner::Mode::Apply).await)
            },
            reconnect.reconnect_timeout,
            Default::default(),
            false,
        ),
        Command::Resume {
            plan,
            accept_changed,
            reconnect,
        } => {
            let yes = g.yes;
            with_runtime(
                &g,
                move |cx| async move {
                    let plan = resolve_plan(&cx, &plan).await?;
                    if !yes
                        && let Some(gate) = waiting_gate(&cx, &plan).await
                        && !confirm_gate(&plan, &gate)
                    {
                        return Ok(Exit::Resumable);
                    }
                    announce(&cx, &plan);
                    finish(
                        &plan.id,
                        runner::run(&cx, &plan, runner::Mode::Resume).await,
                    )
                },
                reconnect.reconnect_timeout,
                Default::default(),
                accept_changed,
            )
        }
        Command::Rollback {
            plan,
            accept_changed,
        } => with_runtime(
            &g,
            move |cx| async move {
                let plan = resolve_plan(&cx, &plan).await?;
                if !cx.options.yes && !confirm_rollback(&cx, &plan).await? {
                    return Ok(Exit::Invalid);
                }
                match runner::rollback(&cx, &plan).await {
                    Ok(()) => {
                        eprintln!(
                            "pgshift: plan `{}` rolled back; `pgshift status {}` shows each step",
                            plan.id, plan.id
                        );
                        Ok(Exit::Ok)
                    }
                    Err(e) => Err(e),
                }
            },
            Duration::from_secs(60),
            Default::default(),
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
            let overrides = exec::BackfillOverrides {
                step,
                batch_size,
                sleep,
                max_rows_per_sec,
                target_batch_time,
                workers,
            };
            with_runtime(
                &g,
                move |cx| async move {
                    let plan = load_or_report(&file)?;
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
                    record_overrides(&cx, &plan).await?;
                    finish(
                        &plan.id,
                        runner::run(&cx, &plan, runner::Mode::BackfillOnly).await,
                    )
                },
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
        } => with_runtime(
            &g,
            move |cx| async move {
                throttle(
                    &cx,
                    &plan,
                    step.as_deref(),
                    batch_size,
                    sleep,
                    max_rows_per_sec,
                    pause,
                    unpause,
                )
                .await
            },
            Duration::from_secs(60),
            Default::default(),
            false,
        ),
        Command::Status {
            plan,
            format,
            events,
        } => with_runtime(
            &g,
            move |cx| async move { status::print(&cx, plan.as_deref(), format, events).await },
            Duration::from_secs(60),
            Default::default(),
            false,
        ),
        Command::Fleet(cmd) => fleet::run(&g, cmd),
        Command::Demo { fresh, leads } => crate::demo::run(&g, fresh, leads),
        Command::Plan(PlanCommand::Validate { files, format }) => {
            validate(&files, format, cli.global.quiet)
        }
        Command::Plan(PlanCommand::Show { file }) => match plan::load(&file) {
            Ok(p) => {
                print!("{}", crate::show::render(&p));
                Exit::Ok
            }
            Err(e) => {
                print_diagnostics(&e.diagnostics());
                Exit::Invalid
            }
        },
    }
}

/// Builds the runtime and the execution context, installs the signal handlers,
/// runs `f`, and turns its result into an exit code.
fn with_runtime<F, Fut>(
    g: &Global,
    f: F,
    reconnect_timeout: Duration,
    backfill: exec::BackfillOverrides,
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
pub fn install_signals(cancel: CancellationToken, reporter: Arc<dyn exec::Reporter>) {
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

/// The name of the gate step the plan waits at, if it waits at one.
async fn waiting_gate(cx: &exec::Context, plan: &Plan) -> Option<String> {
    let c = db::get(&cx.pool, &cx.target).await.ok()?;
    let rows = cx.control.steps(&**c, &plan.id).await.ok()?;
    rows.into_iter()
        .find(|r| r.kind == "gate" && r.status == crate::control::status::WAITING)
        .map(|r| r.name)
}

/// Asks on a terminal before passing a gate. Off a terminal nothing can answer, so the
/// gate stays closed: a script that retries `resume` must never walk through a gate.
fn confirm_gate(plan: &Plan, gate: &str) -> bool {
    use std::io::{BufRead, IsTerminal, Write};
    let message = match plan.step(gate).map(|s| &s.kind) {
        Some(plan::StepKind::Gate(m)) => m.clone(),
        _ => String::new(),
    };
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "pgshift: plan `{}` waits at gate `{gate}`:\n  {message}\nthe gate stays closed: off a terminal, resume passes a gate only with --yes. When that is done, continue with:\n  pgshift --yes resume {}",
            plan.id, plan.id
        );
        return false;
    }
    eprint!(
        "The plan waits at gate `{gate}`: {message}\nHas that been done? Continue past the gate [y/N] "
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let yes = matches!(line.trim(), "y" | "Y" | "yes");
    if !yes {
        eprintln!("not resumed: the gate stays closed");
    }
    yes
}

/// Shows what `rollback` would undo, on which database, and asks on a terminal.
/// Off a terminal it refuses without `--yes` and changes nothing.
async fn confirm_rollback(cx: &exec::Context, plan: &Plan) -> Result<bool, exec::Error> {
    use std::io::{BufRead, IsTerminal, Write};
    let undo = runner::rollback_preview(cx, plan).await?;
    let dbname = cx.target.config.get_dbname().unwrap_or("postgres");
    let mut text = format!(
        "rollback of plan `{}` on {} (database `{dbname}`) would undo, in this order:\n",
        plan.id, cx.target.display
    );
    if undo.is_empty() {
        text.push_str("  nothing: no step of it has run here\n");
    }
    for (step, how) in &undo {
        text.push_str(&format!("  {step}:\n"));
        for h in how {
            let first = h.lines().next().unwrap_or_default();
            let more = if h.lines().count() > 1 { " …" } else { "" };
            text.push_str(&format!("    {first}{more}\n"));
        }
    }
    eprint!("{text}");
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "refused: off a terminal, rollback runs only with --yes; nothing was changed. To roll back:\n  pgshift --yes rollback {}",
            plan.id
        );
        return Ok(false);
    }
    eprint!("Roll back plan `{}`? [y/N] ", plan.id);
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    if matches!(line.trim(), "y" | "Y" | "yes") {
        Ok(true)
    } else {
        eprintln!("not rolled back; nothing was changed");
        Ok(false)
    }
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
    let detail = serde_json::json!({
        "batch_size": o.batch_size, "sleep_ms": o.sleep.map(|d| d.as_millis() as u64),
        "max_rows_per_sec": o.max_rows_per_sec, "target_batch_time_ms": o.target_batch_time.map(|d| d.as_millis() as u64),
        "workers": o.workers, "step": o.step, "by": runner::whoami(),
    });
    cx.control
        .event(&c, &plan.id, o.step.as_deref(), "cli_overrides", detail)
        .await?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn throttle(
    cx: &exec::Context,
    plan: &str,
    step: Option<&str>,
    batch_size: Option<u32>,
    sleep: Option<Duration>,
    max_rows_per_sec: Option<u32>,
    pause: bool,
    unpause: bool,
) -> Result<Exit, exec::Error> {
    let mut patch = serde_json::Map::new();
    if let Some(b) = batch_size {
        if b == 0 || b > plan::defaults::BATCH_SIZE_LIMIT {
            return Err(exec::Error::Usage(format!(
                "--batch-size must be between 1 and {}",
                plan::defaults::BATCH_SIZE_LIMIT
            )));
        }
        patch.insert("batch_size".into(), b.into());
    }
    if let Some(s) = sleep {
        patch.insert("sleep_ms".into(), (s.as_millis() as u64).into());
    }
    if let Some(m) = max_rows_per_sec {
        patch.insert("max_rows_per_sec".into(), m.into());
    }
    if pause {
        patch.insert("paused".into(), true.into());
    }
    if unpause {
        patch.insert("paused".into(), false.into());
    }
    if patch.is_empty() {
        return Err(exec::Error::Usage("nothing to change: give --batch-size, --sleep, --max-rows-per-sec, --pause or --unpause".into()));
    }
    let c = db::connect(&cx.target).await?;
    if !cx.control.exists(&c).await? || cx.control.plan_row(&c, plan).await?.is_none() {
        return Err(exec::Error::Usage(format!(
            "no plan `{plan}` is recorded in {}",
            cx.control.schema
        )));
    }
    let patch = serde_json::Value::Object(patch);
    let n = cx.control.merge_overrides(&c, plan, step, &patch).await?;
    if n == 0 {
        return Err(exec::Error::Usage(format!(
            "plan `{plan}` has no backfill step{}",
            step.map(|s| format!(" named `{s}`")).unwrap_or_default()
        )));
    }
    cx.control
        .event(
            &c,
            plan,
            step,
            "override_set",
            serde_json::json!({"set": patch, "by": runner::whoami()}),
        )
        .await?;
    println!(
        "set {patch} on {n} backfill step(s) of `{plan}`; a running backfill applies it at its next batch"
    );
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
                | exec::Error::Paused { .. } => format!("continue with: pgshift resume {plan}"),
                exec::Error::Step { .. } | exec::Error::Failed { .. } => format!(
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
