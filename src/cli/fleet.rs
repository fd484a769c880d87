//! `pgshift fleet apply|resume|status|rollback|validate`: the command line of
//! one plan over many targets, and what the operator sees while it runs — on a
//! terminal one line per running target and an overall bar (indicatif), off a
//! terminal one line per target event, each starting with `[target]`.

use std::collections::{BTreeMap, HashMap};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value as Json, json};
use tokio_util::sync::CancellationToken;

use super::{Global, ProgressMode, Reconnect, StatusFormat};
use crate::exec::{self, BackfillProgress};
use crate::exit::{Exit, ExitStatus};
use crate::fleet::run::{self, Action, State};
use crate::fleet::targets::{self, Resolved, Targets};
use crate::fleet::{End, Events, Target};
use crate::plan::Plan;

#[derive(Debug, Subcommand)]
pub enum FleetCommand {
    /// Run the plan on every target: the canary first, then the rest, at most `parallel` at once.
    Apply {
        /// The plan file.
        plan: PathBuf,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        reconnect: Reconnect,
    },
    /// Continue every unfinished target; pass the gate the targets wait at when
    /// confirmed (on a terminal) or with --yes.
    Resume {
        /// The plan file.
        plan: PathBuf,
        #[command(flatten)]
        run: RunArgs,
        /// Continue although the plan file changed since the plan started.
        #[arg(long)]
        accept_changed: bool,
        #[command(flatten)]
        reconnect: Reconnect,
    },
    /// One line per target (status, current step, rows, rate, last error) and a total.
    Status {
        /// The plan file, or the plan id.
        plan: String,
        /// The targets file.
        #[arg(long)]
        targets: PathBuf,
        /// `table` for people (one line per target and a total), `json` for scripts.
        #[arg(long, value_enum, default_value_t = StatusFormat::Table)]
        format: StatusFormat,
        /// Redraw the table until Ctrl-C: every 2 seconds, or less often for large
        /// fleets (each refresh reads every target; at most 50 a second).
        #[arg(long)]
        watch: bool,
    },
    /// Run the rollbacks on every target where the plan ran.
    Rollback {
        /// The plan file.
        plan: PathBuf,
        /// The targets file.
        #[arg(long)]
        targets: PathBuf,
        /// Targets at once (overrides the file's `parallel`).
        #[arg(long)]
        parallel: Option<u32>,
        /// Roll back although the plan file changed since the plan started.
        #[arg(long)]
        accept_changed: bool,
    },
    /// Check a targets file (and a plan); touches no database. Exit 2 on any error.
    Validate {
        /// A plan file to check with it.
        plan: Option<PathBuf>,
        /// The targets file.
        #[arg(long)]
        targets: PathBuf,
    },
}

/// How a fleet run is spread.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// The targets file.
    #[arg(long)]
    pub targets: PathBuf,
    /// Targets at once (overrides the file's `parallel`).
    #[arg(long)]
    pub parallel: Option<u32>,
    /// Targets run first, alone, to done or to the gate (overrides the file's `canary`).
    #[arg(long)]
    pub canary: Option<u32>,
}

/// Runs a `fleet` command and returns its exit code.
pub fn run(g: &Global, cmd: FleetCommand) -> Exit {
    match cmd {
        FleetCommand::Validate { plan, targets } => validate(g, plan.as_deref(), &targets),
        FleetCommand::Apply {
            plan,
            run,
            reconnect,
        } => execute(
            g,
            Kind::Apply,
            &plan,
            &run.targets,
            run.parallel,
            run.canary,
            false,
            reconnect.reconnect_timeout,
        ),
        FleetCommand::Resume {
            plan,
            run,
            accept_changed,
            reconnect,
        } => execute(
            g,
            Kind::Resume,
            &plan,
            &run.targets,
            run.parallel,
            run.canary,
            accept_changed,
            reconnect.reconnect_timeout,
        ),
        FleetCommand::Rollback {
            plan,
            targets,
            parallel,
            accept_changed,
        } => execute(
            g,
            Kind::Rollback,
            &plan,
            &targets,
            parallel,
            Some(0),
            accept_changed,
            Duration::from_secs(60),
        ),
        FleetCommand::Status {
            plan,
            targets,
            format,
            watch,
        } => status(g, &plan, &targets, format, watch),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Apply,
    Resume,
    Rollback,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Apply => "apply",
            Kind::Resume => "resume",
            Kind::Rollback => "rollback",
        }
    }
}

/// Reads and checks the targets file and its environment; prints every error.
fn load_targets(file: &Path) -> Result<(Targets, Resolved), Exit> {
    let report = |e: crate::plan::Error| {
        super::print_diagnostics(&e.diagnostics());
        eprintln!(
            "{}: the targets file is invalid; nothing was changed",
            file.display()
        );
        Exit::Invalid
    };
    let t = targets::load(file).map_err(report)?;
    let r = t.resolve(|v| std::env::var(v).ok()).map_err(report)?;
    Ok((t, r))
}

fn validate(g: &Global, plan: Option<&Path>, file: &Path) -> Exit {
    let (t, r) = match load_targets(file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    if let Some(p) = plan
        && super::load_or_report(p).is_err()
    {
        eprintln!("{}: the plan is invalid; nothing was changed", p.display());
        return Exit::Invalid;
    }
    if !g.quiet {
        let discover: String = t
            .discover
            .iter()
            .map(|d| format!(", {} from a query", d.mode.as_str()))
            .collect();
        println!(
            "ok: {} ({} listed target(s){discover}; parallel {}, canary {}, max_failures {})",
            file.display(),
            r.targets.len(),
            t.parallel,
            t.canary,
            t.max_failures
        );
    }
    Exit::Ok
}

/// The commands the operator runs next, spelled with the files they gave.
#[derive(Clone)]
struct Next {
    plan: String,
    targets: String,
    /// The command is `fleet rollback`: what continues a target is rollback again.
    rollback: bool,
}

impl Next {
    fn cmd(&self, what: &str) -> String {
        format!(
            "pgshift fleet {what} {} --targets {}",
            self.plan, self.targets
        )
    }
    /// What continues a target that stopped: resume, or (for a rollback) rollback again.
    fn resume(&self) -> String {
        if self.rollback {
            format!(
                "pgshift --yes fleet rollback {} --targets {}",
                self.plan, self.targets
            )
        } else {
            self.cmd("resume")
        }
    }
    fn status(&self) -> String {
        self.cmd("status")
    }
    fn resume_yes(&self) -> String {
        format!(
            "pgshift --yes fleet resume {} --targets {}",
            self.plan, self.targets
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn execute(
    g: &Global,
    kind: Kind,
    plan_file: &Path,
    targets_file: &Path,
    parallel: Option<u32>,
    canary: Option<u32>,
    accept_changed: bool,
    reconnect_timeout: Duration,
) -> Exit {
    let (file, resolved) = match load_targets(targets_file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let plan = match super::load_or_report(plan_file) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return Exit::Invalid;
        }
    };
    let parallel = parallel.unwrap_or(file.parallel);
    if parallel == 0 || parallel > targets::MAX_PARALLEL {
        eprintln!(
            "error: --parallel must be between 1 and {}; nothing was changed",
            targets::MAX_PARALLEL
        );
        return Exit::Invalid;
    }
    let opts = run::Options {
        parallel,
        canary: canary.unwrap_or(file.canary),
        max_failures: file.max_failures,
        accept_changed,
        reconnect_timeout,
    };
    let next = Next {
        plan: plan_file.display().to_string(),
        targets: targets_file.display().to_string(),
        rollback: kind == Kind::Rollback,
    };
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    rt.block_on(async move {
        let (fleet, notes) = match run::resolve(&file, &resolved, &g.control_schema).await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("error: {e}");
                return e.exit();
            }
        };
        if fleet.iter().any(|t| t.schema.is_some()) {
            let q = run::qualified_tables(&plan);
            if !q.is_empty() {
                for (step, table) in &q {
                    eprintln!(
                        "error: step `{step}` names table {table} with its schema; run per tenant schema it would change that one table once per tenant. Write the table without a schema (each tenant's search_path finds its own); nothing was changed"
                    );
                }
                return Exit::Invalid;
            }
        }
        let view = Arc::new(View::new(g.progress, g.quiet, fleet.len(), next.clone()));
        for n in &notes {
            view.message(n);
        }
        let cancel = CancellationToken::new();
        let action = match kind {
            Kind::Apply => Action::Apply,
            Kind::Rollback => {
                if !g.yes && !confirm_rollback(&fleet, &plan, opts.parallel, &next).await {
                    return Exit::Invalid;
                }
                Action::Rollback
            }
            Kind::Resume => Action::Resume {
                pass_gates: g.yes || confirm_gates(&fleet, &plan, opts.parallel).await,
            },
        };
        install_signals(cancel.clone(), view.clone(), next.clone());
        let canary = match kind {
            Kind::Rollback => String::new(),
            _ => format!(", canary {}", opts.canary.min(fleet.len() as u32)),
        };
        view.message(&format!(
            "{} of plan `{}` on {} target(s): at most {} at once{canary}, no new start after {} failure(s)",
            kind.word(),
            plan.id,
            fleet.len(),
            opts.parallel,
            opts.max_failures
        ));
        let plan = Arc::new(plan);
        let summary = run::run(&fleet, plan.clone(), action, &opts, view.clone(), &cancel).await;
        view.finish();
        conclude(g, kind, action, &plan, &summary, &next)
    })
}

/// The closing lines: how the targets ended, what to run next; the exit code.
fn conclude(
    g: &Global,
    kind: Kind,
    action: Action,
    plan: &Plan,
    summary: &run::Summary,
    next: &Next,
) -> Exit {
    let code = summary.exit();
    let counts: Vec<String> = summary
        .counts()
        .iter()
        .map(|(label, n)| format!("{n} {label}"))
        .collect();
    let line = format!(
        "pgshift: fleet {} of plan `{}`: {} target(s) in {:.1}s: {}; exit {} (the worst of the targets'; 0 < 3 < 4 < 5 < 1 < 2)",
        kind.word(),
        plan.id,
        summary.ends.len(),
        summary.elapsed.as_secs_f64(),
        counts.join(", "),
        code.code()
    );
    if !g.quiet || code != Exit::Ok {
        eprintln!("{line}");
    }
    let of = |pred: &dyn Fn(&End) -> bool| -> Vec<&str> {
        summary
            .ends
            .iter()
            .filter(|(_, e)| pred(e))
            .map(|(n, _)| n.as_str())
            .collect()
    };
    let list = |names: &[&str]| {
        let shown: Vec<&str> = names.iter().take(20).copied().collect();
        let more = names.len().saturating_sub(20);
        if more > 0 {
            format!("{} and {more} more", shown.join(", "))
        } else {
            shown.join(", ")
        }
    };
    let failed = of(&|e| e.is_failure());
    if !failed.is_empty() {
        eprintln!("  failed, unreachable or held: {}", list(&failed));
    }
    // One line per distinct reason the rest never started.
    let mut not_started: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (n, e) in &summary.ends {
        if let End::NotStarted(why) = e {
            not_started.entry(why.clone()).or_default().push(n);
        }
    }
    for (why, names) in &not_started {
        eprintln!("  not started ({why}): {}", list(names));
    }
    let mut gates: BTreeMap<(String, String), Vec<&str>> = BTreeMap::new();
    for (n, e) in &summary.ends {
        if let End::Gate { step, message } = e {
            gates
                .entry((step.clone(), message.clone()))
                .or_default()
                .push(n);
        }
    }
    for ((step, message), names) in &gates {
        eprintln!(
            "  {} target(s) wait at gate `{step}`: {message}",
            names.len()
        );
        if matches!(action, Action::Resume { pass_gates: false }) && !std::io::stdin().is_terminal()
        {
            eprintln!(
                "  the gate stays closed: off a terminal, fleet resume passes a gate only with --yes"
            );
        }
    }
    let resumable = summary
        .ends
        .iter()
        .any(|(_, e)| matches!(e, End::Interrupted(_) | End::NotStarted(_)));
    if kind == Kind::Rollback {
        if code != Exit::Ok {
            eprintln!(
                "next: see `{}`; fix the cause, then `{}` again",
                next.status(),
                next.resume()
            );
        }
        return code;
    }
    if !failed.is_empty() {
        eprintln!(
            "next: `{}` shows each error; fix the causes, then `{}` (it re-runs nothing that finished)",
            next.status(),
            next.resume()
        );
    } else if resumable {
        eprintln!("next: `{}`", next.resume());
    } else if !gates.is_empty() {
        eprintln!(
            "next: when that is done for every target waiting there, `{}`",
            next.resume_yes()
        );
    }
    code
}

/// First SIGINT/SIGTERM: every target stops after its batch or statement in
/// flight and no new target starts. Second: exit at once (exit 3).
fn install_signals(cancel: CancellationToken, view: Arc<View>, next: Next) {
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
        view.message("interrupted: every running target stops after its statement or batch in flight and saves its progress; no new target starts (press Ctrl-C again to quit at once)");
        cancel.cancel();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!(
            "pgshift: fleet: second interrupt, exiting now; each target continues from its last committed step or batch with `{}`",
            next.resume()
        );
        std::process::exit(Exit::Resumable.code());
    });
}

/// Asks, on a terminal, before passing the gate the targets wait at. Off a
/// terminal nothing can answer, so the gate stays closed (only --yes passes it).
async fn confirm_gates(fleet: &[Target], plan: &Plan, parallel: u32) -> bool {
    use std::io::BufRead;
    if !std::io::stdin().is_terminal() {
        return false;
    }
    let states = run::read_all(fleet, &plan.id, parallel as usize).await;
    let mut waiting: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for (t, s) in fleet.iter().zip(&states) {
        if let Some(g) = s.as_ref().ok().and_then(State::waiting_gate) {
            waiting.entry(g).or_default().push(&t.name);
        }
    }
    if waiting.is_empty() {
        return false;
    }
    for (gate, names) in &waiting {
        let message = match plan.step(gate).map(|s| &s.kind) {
            Some(crate::plan::StepKind::Gate(m)) => m.clone(),
            _ => String::new(),
        };
        eprintln!(
            "{} of {} target(s) wait at gate `{gate}`: {message}",
            names.len(),
            fleet.len()
        );
    }
    let n: usize = waiting.values().map(Vec::len).sum();
    eprint!("Has that been done for all of them? Pass the gate on all {n} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let yes = matches!(line.trim(), "y" | "Y" | "yes");
    if !yes {
        eprintln!("the gate stays closed; other unfinished targets continue up to it");
    }
    yes
}

/// Shows on which targets the plan would be rolled back, and what it undoes on
/// the first; asks on a terminal, refuses off one (only --yes rolls back there).
async fn confirm_rollback(fleet: &[Target], plan: &Plan, parallel: u32, next: &Next) -> bool {
    use std::io::BufRead;
    let states = run::read_all(fleet, &plan.id, parallel as usize).await;
    let ran: Vec<&Target> = fleet
        .iter()
        .zip(&states)
        .filter(|(_, s)| {
            s.as_ref().is_ok_and(|s| {
                s.plan
                    .as_ref()
                    .is_some_and(|p| p.status != crate::control::Status::RolledBack)
            })
        })
        .map(|(t, _)| t)
        .collect();
    let unreadable = states.iter().filter(|s| s.is_err()).count();
    let shown: Vec<&str> = ran.iter().take(10).map(|t| t.name.as_str()).collect();
    eprintln!(
        "fleet rollback of plan `{}` would undo it on {} of {} target(s){}{}",
        plan.id,
        ran.len(),
        fleet.len(),
        if shown.is_empty() {
            String::new()
        } else {
            format!(
                ": {}{}",
                shown.join(", "),
                if ran.len() > 10 { ", …" } else { "" }
            )
        },
        if unreadable > 0 {
            format!(" ({unreadable} could not be read now)")
        } else {
            String::new()
        }
    );
    if let Some(first) = ran.first()
        && let Ok(undo) = run::rollback_preview(first, plan).await
    {
        eprintln!("on `{}` it undoes, in this order:", first.name);
        for (step, how) in &undo {
            eprintln!("  {step}:");
            for h in how {
                let line = h.lines().next().unwrap_or_default();
                eprintln!("    {line}");
            }
        }
    }
    if !std::io::stdin().is_terminal() {
        eprintln!(
            "refused: off a terminal, fleet rollback runs only with --yes; nothing was changed. To roll back:\n  pgshift --yes fleet rollback {} --targets {}",
            next.plan, next.targets
        );
        return false;
    }
    eprint!(
        "Roll back plan `{}` on {} target(s)? [y/N] ",
        plan.id,
        ran.len()
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    if matches!(line.trim(), "y" | "Y" | "yes") {
        true
    } else {
        eprintln!("not rolled back; nothing was changed");
        false
    }
}

// ---------------------------------------------------------------------------
// `fleet status`

fn status(g: &Global, plan: &str, targets_file: &Path, format: StatusFormat, watch: bool) -> Exit {
    let (file, resolved) = match load_targets(targets_file) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let path = Path::new(plan);
    let id = if path.is_file() || plan.ends_with(".yaml") || plan.ends_with(".yml") {
        match super::load_or_report(path) {
            Ok(p) => p.id,
            Err(e) => {
                eprintln!("error: {e}");
                return Exit::Invalid;
            }
        }
    } else {
        plan.to_string()
    };
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let control_schema = g.control_schema.clone();
    rt.block_on(async move {
        let (fleet, _) = match run::resolve(&file, &resolved, &control_schema).await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("error: {e}");
                return e.exit();
            }
        };
        let concurrency = (file.parallel as usize).clamp(4, 32);
        let terminal = std::io::stdout().is_terminal();
        loop {
            let states = run::read_all(&fleet, &id, concurrency).await;
            let text = match format {
                StatusFormat::Json => serde_json::to_string_pretty(&status_json(
                    &id,
                    &control_schema,
                    &fleet,
                    &states,
                ))
                .unwrap_or_default(),
                StatusFormat::Table => status_table(&fleet, &states),
            };
            // Written, not printed: a closed pipe (`| head`) ends the output, not the process.
            let mut out = std::io::stdout().lock();
            if watch && terminal {
                let _ = write!(out, "\x1b[2J\x1b[H");
            }
            let _ = writeln!(out, "{text}");
            let _ = out.flush();
            drop(out);
            if !watch {
                return Exit::Ok;
            }
            // Each refresh reads every target: at most 50 targets a second.
            let every = Duration::from_secs(2).max(Duration::from_millis(20) * fleet.len() as u32);
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return Exit::Ok,
                _ = tokio::time::sleep(every) => {}
            }
        }
    })
}

/// One target's line of `fleet status`, whatever could be read.
struct Line {
    status: String,
    step: Option<String>,
    rows: i64,
    rate: Option<f64>,
    error: Option<String>,
    runner: Option<String>,
}

fn line_of(s: &Result<State, End>) -> Line {
    match s {
        Ok(st) => Line {
            status: st.status().to_string(),
            step: st
                .current_step()
                .map(|r| format!("{} ({})", r.name, r.status)),
            rows: st.rows_done(),
            rate: st.rows_per_sec(),
            error: st.last_error().map(str::to_string),
            runner: st
                .plan
                .as_ref()
                .and_then(|p| p.runner.clone())
                .filter(|_| st.alive),
        },
        Err(e) => Line {
            status: match e {
                End::Unreachable(_) => "unreachable".into(),
                _ => "unreadable".into(),
            },
            step: None,
            rows: 0,
            rate: None,
            error: Some(e.detail()),
            runner: None,
        },
    }
}

fn status_table(fleet: &[Target], states: &[Result<State, End>]) -> String {
    let w = fleet
        .iter()
        .map(|t| t.name.chars().count())
        .max()
        .unwrap_or(6)
        .clamp(6, 40);
    let mut out = format!(
        "{:<w$}  {:<12} {:<34} {:>10} {:>9}  last error\n",
        "target", "status", "step", "rows", "rows/s"
    );
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut rows = 0i64;
    for (t, s) in fleet.iter().zip(states) {
        let l = line_of(s);
        *by_status.entry(l.status.clone()).or_default() += 1;
        rows += l.rows;
        let mut err = l.error.unwrap_or_default().replace('\n', " ");
        if err.chars().count() > 100 {
            err = err.chars().take(99).collect::<String>() + "…";
        }
        out.push_str(&format!(
            "{:<w$}  {:<12} {:<34} {:>10} {:>9}  {err}\n",
            t.name,
            l.status,
            l.step.unwrap_or_else(|| "-".into()),
            l.rows,
            l.rate
                .map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into()),
        ));
    }
    let counts: Vec<String> = by_status.iter().map(|(s, n)| format!("{n} {s}")).collect();
    out.push_str(&format!(
        "total: {} target(s): {}; {rows} rows",
        fleet.len(),
        counts.join(", ")
    ));
    out
}

fn status_json(
    plan: &str,
    control_schema: &str,
    fleet: &[Target],
    states: &[Result<State, End>],
) -> Json {
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut rows = 0i64;
    let targets: Vec<Json> = fleet
        .iter()
        .zip(states)
        .map(|(t, s)| {
            let l = line_of(s);
            *by_status.entry(l.status.clone()).or_default() += 1;
            rows += l.rows;
            let step = s.as_ref().ok().and_then(|st| st.current_step());
            json!({
                "name": t.name,
                "database": t.db.config.get_dbname(),
                "schema": t.schema,
                "control_schema": t.control_schema,
                "status": l.status,
                "step": step.map(|r| r.name.clone()),
                "step_kind": step.map(|r| r.kind.clone()),
                "step_status": step.map(|r| r.status),
                "attempts": step.map(|r| r.attempts),
                "rows_done": l.rows,
                "rows_per_sec": l.rate,
                "last_error": l.error,
                "runner": l.runner,
            })
        })
        .collect();
    json!({
        "version": 1,
        "plan": plan,
        "control_schema": control_schema,
        "targets": targets,
        "total": {"targets": fleet.len(), "rows_done": rows, "by_status": by_status},
    })
}

// ---------------------------------------------------------------------------
// Progress

/// What the operator sees while a fleet runs.
struct View {
    inner: Arc<Inner>,
}

struct Inner {
    bars: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    quiet: bool,
    total: usize,
    next: Next,
    state: Mutex<ViewState>,
}

#[derive(Default)]
struct ViewState {
    lines: HashMap<String, ProgressBar>,
    running: usize,
    ended: usize,
    failed: usize,
    /// Rows done by each (target, backfill step) (as `fleet status` counts
    /// them: a resumed step's earlier rows included), and its current rate.
    rows: HashMap<(String, String), (u64, f64)>,
    last_line: HashMap<(String, String, u32), Instant>,
    last: HashMap<(String, String, u32), BackfillProgress>,
}

impl View {
    fn new(mode: ProgressMode, quiet: bool, total: usize, next: Next) -> View {
        let on = match mode {
            ProgressMode::Always => true,
            ProgressMode::Never => false,
            ProgressMode::Auto => std::io::stderr().is_terminal(),
        };
        let bars =
            (on && !quiet).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        let overall = bars.as_ref().map(|m| {
            let b = m.add(ProgressBar::new(total as u64));
            b.set_style(
                ProgressStyle::with_template(
                    "fleet [{bar:30}] {pos}/{len} targets ended ({elapsed}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.enable_steady_tick(Duration::from_millis(250));
            b
        });
        View {
            inner: Arc::new(Inner {
                bars,
                overall,
                quiet,
                total,
                next,
                state: Mutex::new(ViewState::default()),
            }),
        }
    }

    fn finish(&self) {
        let mut st = self.inner.state();
        for (_, l) in st.lines.drain() {
            l.finish_and_clear();
        }
        if let Some(o) = &self.inner.overall {
            o.finish();
        }
    }
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, ViewState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn line(&self, text: &str) {
        match &self.bars {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    fn overall(&self, st: &ViewState) {
        if let Some(o) = &self.overall {
            let rows: u64 = st.rows.values().map(|(r, _)| r).sum();
            // A fold from +0.0: an empty f64 sum is -0.0, printed "-0".
            let rate = st.rows.values().fold(0.0, |a, (_, r)| a + r);
            o.set_position(st.ended as u64);
            o.set_message(format!(
                "· {} running · {} failed · {rows} rows · {rate:.0} rows/s",
                st.running, st.failed
            ));
        }
    }

    /// Sets the running target's own line (terminal) or prints one (off a terminal).
    fn target_line(&self, name: &str, text: &str, print_off_terminal: bool) {
        if self.bars.is_some() {
            if let Some(l) = self.state().lines.get(name) {
                l.set_message(text.to_string());
            }
        } else if print_off_terminal && !self.quiet {
            eprintln!("[{name}] {text}");
        }
    }
}

impl Events for View {
    fn target(&self, name: &str) -> Arc<dyn exec::Reporter> {
        Arc::new(TargetView {
            name: name.to_string(),
            inner: self.inner.clone(),
        })
    }

    fn started(&self, name: &str) {
        let mut st = self.inner.state();
        st.running += 1;
        if let (Some(m), Some(o)) = (&self.inner.bars, &self.inner.overall) {
            let l = m.insert_before(o, ProgressBar::new_spinner());
            l.set_style(
                ProgressStyle::with_template("{spinner} [{prefix}] {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            l.set_prefix(name.to_string());
            l.set_message("connecting");
            l.enable_steady_tick(Duration::from_millis(120));
            st.lines.insert(name.to_string(), l);
        }
        self.inner.overall(&st);
    }

    fn ended(&self, name: &str, end: &End) {
        let mut st = self.inner.state();
        st.running = st.running.saturating_sub(1);
        st.ended += 1;
        if end.is_failure() {
            st.failed += 1;
        }
        if let Some(l) = st.lines.remove(name) {
            l.finish_and_clear();
        }
        for v in st.rows.iter_mut().filter(|((t, _), _)| t == name) {
            v.1.1 = 0.0;
        }
        self.inner.overall(&st);
        let ended = st.ended;
        drop(st);
        let next = &self.inner.next;
        let text = match end {
            End::Done => "done".to_string(),
            End::AlreadyDone => "already done; nothing ran".to_string(),
            End::Gate { step, .. } => format!("waits at gate `{step}`"),
            End::Interrupted(m) => format!("interrupted: {m}; continue with `{}`", next.resume()),
            End::NotStarted(m) => format!("not started: {m}"),
            End::Unreachable(m) => format!(
                "unreachable: {m}; once it answers, `{}` continues it",
                next.resume()
            ),
            End::Failed(m) => format!("failed: {m}; fix the cause, then `{}`", next.resume()),
            End::Held(m) => format!(
                "held: {m}; when that run ends, `{}` continues it",
                next.resume()
            ),
            End::Changed(m) => format!("{m} (`{} --accept-changed` after review)", next.resume()),
            End::Invalid(m) => format!("cannot run the plan: {m}"),
            End::RolledBack => "rolled back".to_string(),
            End::NothingToRollBack => "nothing to roll back: the plan has not run here".to_string(),
        };
        let bad = end.is_failure() || matches!(end, End::Interrupted(_));
        let quiet_ok = self.inner.quiet && !bad;
        // On a terminal, targets that went well show in the overall bar only.
        let terminal_ok = self.inner.bars.is_some() && !bad;
        if !quiet_ok && !terminal_ok {
            self.inner.line(&format!(
                "[{name}] {text} [{ended}/{} ended]",
                self.inner.total
            ));
        }
    }

    fn message(&self, text: &str) {
        if !self.inner.quiet {
            self.inner.line(&format!("pgshift: fleet: {text}"));
        }
    }
}

/// The reporter of one target's run: every line names the target.
struct TargetView {
    name: String,
    inner: Arc<Inner>,
}

impl exec::Reporter for TargetView {
    fn message(&self, text: &str) {
        self.inner.target_line(&self.name, text, true);
    }

    fn lock_wait(&self, step: &str, relation: &str, attempt: u32, max: u32, blocker: Option<&str>) {
        let on = if relation.is_empty() {
            String::new()
        } else {
            format!(" on {relation}")
        };
        self.inner.target_line(
            &self.name,
            &format!(
                "{step}: waiting for lock{on} (attempt {attempt}/{max}, blocked by {})",
                blocker.unwrap_or("another session")
            ),
            true,
        );
    }

    fn lock_done(&self, _: &str) {}

    fn backfill(&self, step: &str, p: &BackfillProgress) {
        let key = (self.name.clone(), step.to_string());
        let mut st = self.inner.state();
        let e = st.rows.entry(key).or_insert((0, 0.0));
        e.0 = e.0.max(p.rows_done);
        e.1 = p.rows_per_sec;
        self.inner.overall(&st);
        let total = p.rows_total.map(|t| format!("/~{t}")).unwrap_or_default();
        let text = format!(
            "{step}: {}{total} rows, {:.0} rows/s, batch {}{}",
            p.rows_done,
            p.rows_per_sec,
            p.batch_size,
            p.throttled
                .as_deref()
                .map(|t| format!(", throttled: {t}"))
                .unwrap_or_default()
        );
        if self.inner.bars.is_some() {
            if let Some(l) = st.lines.get(&self.name) {
                l.set_message(text);
            }
            return;
        }
        // Off a terminal: a line every 10 seconds per target and step.
        let k = (self.name.clone(), step.to_string(), p.worker);
        st.last.insert(k.clone(), p.clone());
        let due = st
            .last_line
            .get(&k)
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10));
        if due {
            st.last_line.insert(k, Instant::now());
            drop(st);
            self.inner.target_line(&self.name, &text, true);
        }
    }

    fn backfill_done(&self, step: &str) {
        let mut st = self.inner.state();
        if let Some(v) = st.rows.get_mut(&(self.name.clone(), step.to_string())) {
            v.1 = 0.0;
        }
        let last: Vec<BackfillProgress> = st
            .last
            .iter()
            .filter(|((t, s, _), _)| t == &self.name && s == step)
            .map(|(_, p)| p.clone())
            .collect();
        st.last
            .retain(|(t, s, _), _| !(t == &self.name && s == step));
        drop(st);
        if !last.is_empty() {
            let rows = last.iter().map(|p| p.rows_done).max().unwrap_or(0);
            let rate = last.iter().map(|p| p.rows_per_sec).fold(0.0, f64::max);
            self.inner.target_line(
                &self.name,
                &format!("{step}: done, {rows} rows, {rate:.0} rows/s"),
                true,
            );
        }
    }
}
