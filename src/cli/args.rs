//! The command line as clap sees it: every command, flag and its help.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// Lines on stderr: text, or one JSON object per line (for log pipelines).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// More logging, with timestamps (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less output: only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Do not ask for confirmation: pass a waiting gate on resume, roll back without asking.
    #[arg(long, global = true)]
    pub yes: bool,
}

/// When to draw progress bars.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ProgressMode {
    /// Only when stderr is a terminal.
    Auto,
    /// Even when stderr is not a terminal.
    Always,
    /// Never: plain lines instead.
    Never,
}

/// How lines on stderr are written.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// For a person (timestamps from -v on; never escape codes off a terminal).
    Text,
    /// One JSON object per line, with RFC 3339 timestamps; no bars, no prompts.
    Json,
}

/// How `plan validate` reports.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum OutputFormat {
    /// Compiler-style diagnostics on stderr.
    Human,
    /// One JSON document on stdout, for CI.
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
        /// Continue although the plan file changed since the plan started (steps that have not run yet).
        #[arg(long)]
        accept_changed: bool,
        /// With --accept-changed: accept it even where a step that already ran changed.
        #[arg(long, requires = "accept_changed")]
        force: bool,
        #[command(flatten)]
        reconnect: Reconnect,
    },
    /// Plans and steps from the control table: status, attempts, rows, last error, next command.
    Status {
        /// One plan's steps; without it, every plan.
        plan: Option<String>,
        /// `table` for a person, `json` for scripts and monitoring (a stable format).
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
        /// Roll back although the plan file changed since the plan started (say, to add a missing rollback).
        #[arg(long)]
        accept_changed: bool,
        /// With --accept-changed: accept it even where what a step that already ran does changed.
        #[arg(long, requires = "accept_changed")]
        force: bool,
    },
    /// Run or continue only the backfill steps of a started plan, with your throttles.
    Backfill {
        /// The plan file (its earlier phases must have run).
        file: PathBuf,
        /// Only this backfill step.
        #[arg(long)]
        step: Option<String>,
        /// Rows per batch, instead of the plan's.
        #[arg(long)]
        batch_size: Option<u32>,
        /// Pause between batches (`20ms`, `1s`), instead of the plan's.
        #[arg(long, value_parser = parse_duration)]
        sleep: Option<Duration>,
        /// Cap on rows updated per second, across workers.
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
        /// The plan id, as `status` lists it.
        plan: String,
        /// Only this backfill step (default: every backfill step of the plan).
        #[arg(long)]
        step: Option<String>,
        /// Rows per batch from the next batch on.
        #[arg(long)]
        batch_size: Option<u32>,
        /// Pause between batches (`20ms`, `1s`) from the next batch on.
        #[arg(long, value_parser = parse_duration)]
        sleep: Option<Duration>,
        /// Cap on rows updated per second (0 lifts the plan's cap).
        #[arg(long)]
        max_rows_per_sec: Option<u32>,
        /// Pause the backfill after its batch in flight.
        #[arg(long, conflicts_with = "unpause")]
        pause: bool,
        /// Let a paused backfill continue.
        #[arg(long)]
        unpause: bool,
        /// Remove every live override first (back to the plan's and the command line's throttles).
        #[arg(long)]
        clear: bool,
        /// Hold while a watched replication slot is further behind than this (`512MB`; `off` lifts it).
        #[arg(long, value_parser = parse_size_or_off, value_name = "SIZE|off")]
        max_slot_lag: Option<u64>,
        /// The slots --max-slot-lag watches (`a,b`; `all`: every logical slot).
        #[arg(long, value_parser = parse_slots, value_name = "NAMES|all")]
        slots: Option<SlotList>,
        /// Whether a slot with no consumer connected may hold the backfill.
        #[arg(long, value_parser = parse_on_off, value_name = "on|off")]
        ignore_inactive_slots: Option<bool>,
        /// Pause after each batch for the WAL the server wrote while it ran, at
        /// this many bytes per second (`16MB`; `off` lifts it).
        #[arg(long, value_parser = parse_size_or_off, value_name = "SIZE|off")]
        max_wal_rate: Option<u64>,
        /// Hold while an anti-wraparound autovacuum works the table.
        #[arg(long, value_parser = parse_on_off, value_name = "on|off")]
        pause_on_autovacuum: Option<bool>,
    },
    /// One plan over many databases or tenant schemas, from a targets file.
    #[command(subcommand)]
    Fleet(super::fleet::FleetCommand),
    /// Drop what a finished plan's contract phase set aside (a retired column or table):
    /// the end of its retention window, after which rollback cannot undo those steps.
    Finalize {
        /// The plan id or the plan file.
        plan: String,
    },
    /// The whole flow on the bundled Clarivum plans and fixtures, against a demo database.
    Demo {
        /// Drop and recreate the demo database first.
        #[arg(long)]
        fresh: bool,
        /// Number of leads the fixtures generate.
        #[arg(long, default_value_t = 200_000)]
        leads: u32,
        /// The database the demo creates on the server (and drops and recreates with --fresh).
        #[arg(long, default_value = "pgshift_demo")]
        database: String,
    },
}

#[derive(Debug, Args, Clone)]
pub struct Reconnect {
    /// After a lost connection, keep reconnecting this long before stopping (exit 3).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub reconnect_timeout: Duration,
}

/// How `status` prints.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum StatusFormat {
    /// A table for a person.
    Table,
    /// A stable JSON document for scripts.
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    crate::duration::parse(s)
}

/// A size (`512MB`, `16MB/s`), or `off` (stored as 0: lifts the plan's limit).
fn parse_size_or_off(s: &str) -> Result<u64, String> {
    match s.trim() {
        "off" | "0" => Ok(0),
        t => crate::bytes::parse(t.strip_suffix("/s").unwrap_or(t)),
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s.trim() {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        other => Err(format!("`{other}` is not on or off")),
    }
}

/// Replication slot names given as one value (`a,b`); empty: every logical slot.
#[derive(Debug, Clone)]
pub struct SlotList(pub Vec<String>);

/// `a,b` (replication slot names), or `all` (empty: every logical slot).
fn parse_slots(s: &str) -> Result<SlotList, String> {
    if s.trim() == "all" {
        return Ok(SlotList(Vec::new()));
    }
    s.split(',')
        .map(|n| {
            let n = n.trim();
            if crate::kind::backfill::is_slot_name(n) {
                Ok(n.to_string())
            } else {
                Err(format!(
                    "`{n}` is not a replication slot name (1 to 63 lowercase letters, digits and underscores)"
                ))
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(SlotList)
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Parse, check and lint plan files; touches no database. Exit 2 on any error.
    Validate {
        /// The plan files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// `human` (compiler style) or `json` (for CI).
        #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
        format: OutputFormat,
    },
    /// The steps in execution order, each with the exact SQL it will run.
    ///
    /// Operations of `changes:` that need the live catalog are expanded from
    /// the database (`--database-url`), read-only.
    Show {
        /// The plan file.
        file: PathBuf,
    },
    /// Print the plan with every operation of `changes:` expanded into plain
    /// steps: a plan of its own that does the same.
    Expand {
        /// The plan file.
        file: PathBuf,
    },
    /// Run the plan from its first unfinished step; stops at a gate, a failure or an interrupt.
    Apply {
        /// The plan file.
        file: PathBuf,
        #[command(flatten)]
        reconnect: Reconnect,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `--help` describes every argument and every value of every command.
    #[test]
    fn every_argument_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", cmd.get_name());
            if cmd.get_about().is_none() {
                missing.push(format!("{path}: the command"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path}: {id}"));
                }
                let values = if arg.get_action().takes_values() {
                    arg.get_possible_values()
                } else {
                    Vec::new()
                };
                for v in values {
                    if v.get_help().is_none() {
                        missing.push(format!("{path}: {id}={}", v.get_name()));
                    }
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &path, missing);
                }
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "no description: {missing:#?}");
    }
}
