//! The command line: clap types, output formats, and the glue from arguments to
//! library calls. The only module (with `main.rs`) that prints.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::exit::Exit;
use crate::plan::{self, Diagnostic, Severity};

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
    match cli.command {
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
