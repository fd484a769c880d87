//! The command line: clap types, output formats, and the glue from arguments to
//! library calls. The only module (with `main.rs` and `demo`) that prints; every
//! line on stderr goes through `output`.

mod args;
mod commands;
pub mod connect;
pub mod fleet;
pub mod hint;
pub mod output;
mod plan_cmd;
mod prompt;
pub mod report;
mod status;

pub use args::*;
pub use commands::load_or_report;
pub use plan_cmd::print_diagnostics;

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::control::Control;
use crate::db;
use crate::engine;
use crate::exec;
use crate::exit::{Exit, ExitStatus};
use output::{Level, Line};

/// Parses the arguments, runs the command, and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    output::init(&cli.global);
    hint::init(&cli.global);
    init_tracing(&cli.global);
    run(cli).code()
}

/// A command line clap rejected (or `--help`): as clap prints it, or, when
/// `--log-format json` was asked for, as one JSON line.
fn usage_error(e: &clap::Error) -> i32 {
    let code = match e.kind() {
        clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
            let _ = e.print();
            return 0;
        }
        _ => Exit::Invalid.code(),
    };
    let args: Vec<String> = std::env::args().collect();
    let json = args
        .windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || args.iter().any(|a| a == "--log-format=json");
    if json {
        let line = serde_json::json!({
            "timestamp": output::rfc3339(std::time::SystemTime::now()),
            "level": "error",
            "event": "usage_error",
            "plan": null, "step": null, "target": null,
            "message": e.render().to_string().trim_end(),
            "fields": {"exit": code},
        });
        eprintln!("{line}");
    } else {
        let _ = e.print();
    }
    code
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
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(output::Forward)
        .try_init();
}

fn run(cli: Cli) -> Exit {
    let g = cli.global.clone();
    let none = engine::BackfillOverrides::default;
    let minute = Duration::from_secs(60);
    let plain = |accept: bool, force: bool| Setup {
        reconnect_timeout: minute,
        backfill: none(),
        accept_changed: accept,
        force_changed: force,
    };
    match cli.command {
        Command::Plan(PlanCommand::Apply { file, reconnect }) => with_runtime(
            &g,
            Setup {
                reconnect_timeout: reconnect.reconnect_timeout,
                ..plain(false, false)
            },
            |cx| async move { commands::apply(&cx, &file).await },
        ),
        Command::Resume {
            plan,
            accept_changed,
            force,
            reconnect,
        } => with_runtime(
            &g,
            Setup {
                reconnect_timeout: reconnect.reconnect_timeout,
                ..plain(accept_changed, force)
            },
            move |cx| async move { commands::resume(&cx, &plan).await },
        ),
        Command::Rollback {
            plan,
            accept_changed,
            force,
        } => with_runtime(&g, plain(accept_changed, force), move |cx| async move {
            commands::roll_back(&cx, &plan).await
        }),
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
            let backfill = engine::BackfillOverrides {
                step,
                batch_size,
                sleep,
                max_rows_per_sec,
                target_batch_time,
                workers,
            };
            let setup = Setup {
                reconnect_timeout: reconnect.reconnect_timeout,
                backfill,
                ..plain(false, false)
            };
            with_runtime(&g, setup, move |cx| async move {
                commands::backfill(&cx, &file).await
            })
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
            let patch = crate::control::Overrides {
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
            with_runtime(&g, plain(false, false), move |cx| async move {
                commands::throttle(&cx, &plan, step.as_deref(), &patch, clear).await
            })
        }
        Command::Status {
            plan,
            format,
            events,
        } => with_runtime(&g, plain(false, false), move |cx| async move {
            status::print(&cx, plan.as_deref(), format, events).await
        }),
        Command::Fleet(cmd) => fleet::run(&g, cmd),
        Command::Finalize { plan } => with_runtime(&g, plain(false, false), move |cx| async move {
            commands::finalize(&cx, &plan).await
        }),
        Command::Demo {
            fresh,
            leads,
            database,
        } => crate::demo::run(&g, fresh, leads, &database),
        Command::Plan(PlanCommand::Validate { files, format }) => {
            plan_cmd::validate(&files, format, &cli.global)
        }
        Command::Plan(PlanCommand::Show { file }) => plan_cmd::show(&g, &file, false),
        Command::Plan(PlanCommand::Expand { file }) => plan_cmd::show(&g, &file, true),
    }
}

/// What a database command runs with, besides the global options.
struct Setup {
    reconnect_timeout: Duration,
    backfill: engine::BackfillOverrides,
    accept_changed: bool,
    force_changed: bool,
}

/// Builds the runtime and the execution context, opens a first connection (so
/// that one that cannot open says so, and that nothing was changed), installs
/// the signal handlers, runs `f`, and turns its result into an exit code.
fn with_runtime<F, Fut>(g: &Global, setup: Setup, f: F) -> Exit
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
            Line::error("invalid_url", format!("{e}; nothing was changed")).emit();
            return Exit::Invalid;
        }
    };
    output::set_target(&target.display);
    let options = exec::Options {
        yes: g.yes,
        accept_changed: setup.accept_changed,
        force_changed: setup.force_changed,
        auto_gates: false,
        backfill: setup.backfill,
        reconnect_timeout: setup.reconnect_timeout,
    };
    rt.block_on(async move {
        if let Err(code) = connect::probe(&target).await {
            return code;
        }
        let cx = match context(g, target, options) {
            Ok(cx) => cx,
            Err(e) => {
                Line::error("error", format!("{e}; nothing was changed")).emit();
                return Exit::Invalid;
            }
        };
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
            Line::error("error", format!("cannot start the async runtime: {e}")).emit();
            Exit::StepFailed
        })
}

/// The execution context for `target`, with the terminal reporter, and the
/// signal handlers installed (call inside the runtime).
pub fn context(
    g: &Global,
    target: db::Target,
    options: exec::Options,
) -> Result<exec::Context, db::Error> {
    let pool = db::pool(&target, 16)?;
    let terminal = Arc::new(report::Terminal::new(g.progress, g.quiet));
    let cx = exec::Context {
        target,
        pool,
        control: Control::new(&g.control_schema),
        cancel: CancellationToken::new(),
        reporter: terminal.clone(),
        options,
    };
    install_signals(cx.cancel.clone(), terminal);
    Ok(cx)
}

/// First SIGINT/SIGTERM: stop after the batch or statement in flight. Second SIGINT: exit at once.
fn install_signals(cancel: CancellationToken, terminal: Arc<report::Terminal>) {
    on_interrupts(
        move || {
            terminal.interrupted();
            Line::info(
                "interrupted",
                "interrupted: cancelling the statement in flight and saving progress (press Ctrl-C again to quit at once)",
            )
            .emit();
            cancel.cancel();
        },
        || {
            Line::info(
                "exit_now",
                format!(
                    "second interrupt, exiting now; `{}` continues from the last committed step or batch",
                    hint::command("resume PLAN")
                ),
            )
            .emit();
        },
    );
}

/// Runs `first` at the first SIGINT or SIGTERM; at the second, runs `second`
/// and exits at once with exit 3 (what committed is recorded; resume continues).
pub(crate) fn on_interrupts(
    first: impl FnOnce() + Send + 'static,
    second: impl FnOnce() + Send + 'static,
) {
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
        first();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        second();
        std::process::exit(Exit::Resumable.code());
    });
}

/// Prints an error with its exit code; returns the code.
fn report_error(e: &exec::Error) -> Exit {
    let code = e.exit();
    Line::error("error", e.to_string())
        .field("exit", code.code())
        .field("failed_step", e.step())
        .emit();
    code
}

/// Prints the next command to run (`what: pgshift …`).
fn next(what: &str, args: &str) {
    let command = hint::command(args);
    Line::plain(Level::Info, "next", format!("{what}:\n  {command}"))
        .field("command", command)
        .emit();
}

/// The `status` table of one plan (used by the demo).
pub async fn print_status(cx: &exec::Context, plan: Option<&str>) -> Result<Exit, exec::Error> {
    status::print(cx, plan, StatusFormat::Table, false).await
}
