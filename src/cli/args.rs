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
        /// At most this much WAL per second from the batches (`16MB`; `off` lifts it).
        #[arg(long, value_parser = parse_size_or_off, value_name = "SIZE|off")]
        max_wal_rate: Option<u64>,
        /// Hold while an anti-wraparound autovacuum works the table.
        #[arg(long, value_parser = parse_on_off, value_name = "on|off")]
        pause_on_autovacuum: Option<bool>,
    },
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
