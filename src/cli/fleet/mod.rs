//! `pgshift fleet apply|resume|status|rollback|validate`: the command line of
//! one plan over many targets, and what the operator sees while it runs — on a
//! terminal one line per running target and an overall bar (indicatif), off a
//! terminal one line per target event, each starting with `[target]`.

mod status;
mod view;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use self::status::status;
use self::view::View;
use super::{Global, Reconnect, StatusFormat};
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
    super::on_interrupts(
        move || {
            view.message("interrupted: every running target stops after its statement or batch in flight and saves its progress; no new target starts (press Ctrl-C again to quit at once)");
            cancel.cancel();
        },
        move || {
            eprintln!(
                "pgshift: fleet: second interrupt, exiting now; each target continues from its last committed step or batch with `{}`",
                next.resume()
            );
        },
    );
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
