//! Running one plan over the fleet: discovering targets, the canary, bounded
//! parallelism, `max_failures`, and reading each target's state back.
//!
//! Each target runs exactly as a single-database `plan apply`, `resume` or
//! `rollback` would, through [`on_target`] and [`read`]: the only two functions
//! that know how the single-database machinery is called. Everything else here
//! is scheduling. The fleet keeps no state of its own: what a target has done is
//! in its control schema, so a killed fleet runner loses nothing.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::targets::{Mode, Resolved, Targets};
use super::{End, Events, Target, tenant_control_schema};
use crate::control::{Control, PlanRow, Status, StepRow};
use crate::db::{self, OneTrip};
use crate::exec::{self, runner};
use crate::exit::{Exit, ExitStatus};
use crate::plan::{Plan, StepKind};

/// Why the fleet could not start at all. Nothing was changed on any target.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The discover query cannot be run or returned something unusable.
    #[error("{0}")]
    Discover(String),
    /// The admin connection of `discover` cannot be reached.
    #[error("{0}")]
    DiscoverUnreachable(String),
    /// The targets or the plan do not fit together.
    #[error("{0}")]
    Usage(String),
}

impl ExitStatus for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::DiscoverUnreachable(_) => Exit::Resumable,
            Error::Discover(_) | Error::Usage(_) => Exit::Invalid,
        }
    }
}

/// How long a discover query may run; it runs in a read-only transaction.
const DISCOVER_TIMEOUT: &str = "60s";

/// The fleet's targets: the listed ones in file order, then the discovered
/// ones in the order their queries return them, taking one from each query in
/// turn when there are several (so that `parallel` spreads over the servers
/// they search rather than working through one server at a time). Fails
/// before anything is changed.
pub async fn resolve(
    file: &Targets,
    resolved: &Resolved,
    control_schema: &str,
) -> Result<(Vec<Target>, Vec<String>), Error> {
    let mut out: Vec<Target> = resolved
        .targets
        .iter()
        .map(|e| match &e.schema {
            Some(s) => Target::tenant(&e.name, &e.target, s, control_schema),
            None => Target::database(&e.name, e.target.clone(), control_schema),
        })
        .collect();
    let mut names: HashSet<String> = out.iter().map(|t| t.name.clone()).collect();
    let mut notes = Vec::new();
    let mut found: Vec<VecDeque<Target>> = Vec::new();
    for (d, admin) in &resolved.discover {
        let at = format!("{}:{}", file.file.display(), d.pos);
        let rows = discover(admin, &d.query, d.mode, &at).await?;
        let (rows, skipped) = match d.mode {
            Mode::Databases => (rows, Vec::new()),
            Mode::Schemas => skip_control_schemas(admin, rows, control_schema).await?,
        };
        if !skipped.is_empty() {
            notes.push(format!(
                "discover: left out {} schema(s) that are pgshift's own control schemas: {}",
                skipped.len(),
                skipped.join(", ")
            ));
        }
        let mut these = VecDeque::new();
        for name in rows {
            if !names.insert(name.clone()) {
                return Err(Error::Discover(format!(
                    "{at}: the discover query returned `{name}`, which is already the name of a target (listed, or found by another query); a target must run once, and names must be unique: leave it out of one of them"
                )));
            }
            these.push_back(match d.mode {
                Mode::Databases => {
                    Target::database(&name, admin.with_dbname(&name), control_schema)
                }
                Mode::Schemas => Target::tenant(&name, admin, &name, control_schema),
            });
        }
        found.push(these);
    }
    while found.iter().any(|q| !q.is_empty()) {
        for q in &mut found {
            if let Some(t) = q.pop_front() {
                out.push(t);
            }
        }
    }
    // Two tenants recorded in one control schema would share each other's locks
    // and steps; two names never map to one, but say so rather than trust it.
    let mut seen = HashSet::new();
    for t in &out {
        let key = format!(
            "{:?}|{}|{}|{}",
            t.db.config.get_hosts(),
            t.db.port(),
            t.db.config.get_dbname().unwrap_or_default(),
            t.control_schema
        );
        if !seen.insert(key) {
            return Err(Error::Usage(format!(
                "target `{}` is the same database (and schema) as an earlier target; a target must run once",
                t.name
            )));
        }
    }
    if out.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no targets: the file lists none and no discover query returned a row; nothing was changed",
            file.file.display()
        )));
    }
    Ok((out, notes))
}

/// Runs the discover query read-only on the admin connection; its rows, in order.
async fn discover(
    admin: &db::Target,
    query: &str,
    mode: Mode,
    at: &str,
) -> Result<Vec<String>, Error> {
    let mut c = db::connect(admin).await.map_err(|e| {
        Error::DiscoverUnreachable(format!(
            "{at}: discover: {e}; nothing was started. Once it answers, run the command again"
        ))
    })?;
    let fail = |e: tokio_postgres::Error| {
        Error::Discover(format!(
            "{at}: the discover query failed: {}; nothing was started. Fix `discover.query` (it must return one text column of {} names)",
            db::describe(&e),
            mode.as_str().trim_end_matches('s')
        ))
    };
    // Read-only and bounded: the query only finds targets; it must never change anything.
    let tx = c.transaction().await.map_err(fail)?;
    tx.batch_execute(&format!(
        "SET TRANSACTION READ ONLY; SET LOCAL statement_timeout = '{DISCOVER_TIMEOUT}'"
    ))
    .await
    .map_err(fail)?;
    let rows = tx.rows(query, &[]).await.map_err(fail)?;
    let _ = tx.rollback().await;
    let mut names = Vec::new();
    let mut seen = HashSet::new();
    for (i, row) in rows.iter().enumerate() {
        if row.columns().len() != 1 {
            return Err(Error::Discover(format!(
                "{at}: the discover query returns {} columns; it must return one: the {} name",
                row.columns().len(),
                mode.as_str().trim_end_matches('s')
            )));
        }
        let name: Option<String> = row.try_get(0).map_err(|_| {
            Error::Discover(format!(
                "{at}: the discover query returns a column of type {}; it must return text (a {} name)",
                row.columns()[0].type_().name(),
                mode.as_str().trim_end_matches('s')
            ))
        })?;
        let Some(name) = name else {
            return Err(Error::Discover(format!(
                "{at}: the discover query returned NULL in row {}; filter it out",
                i + 1
            )));
        };
        if !seen.insert(name.clone()) {
            return Err(Error::Discover(format!(
                "{at}: the discover query returned `{name}` twice; a target must run once (add DISTINCT)"
            )));
        }
        names.push(name);
    }
    Ok(names)
}

/// Schema-per-tenant: leaves out discovered schemas that are pgshift's control
/// schemas (a broad query such as "every schema but public" finds them on the
/// second run), and refuses a tenant whose schema would be another's control schema.
async fn skip_control_schemas(
    admin: &db::Target,
    names: Vec<String>,
    base: &str,
) -> Result<(Vec<String>, Vec<String>), Error> {
    let c = db::connect(admin)
        .await
        .map_err(|e| Error::DiscoverUnreachable(format!("discover: {e}; nothing was started")))?;
    let control: HashSet<String> = c
        .rows(
            "SELECT n.nspname FROM pg_catalog.pg_namespace n
             WHERE (SELECT count(*) FROM pg_catalog.pg_class c
                    WHERE c.relnamespace = n.oid AND c.relname IN ('meta', 'plans', 'steps', 'events')) = 4",
            &[],
        )
        .await
        .map_err(|e| Error::Discover(format!("discover: {}", db::describe(&e))))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let derived: HashSet<String> = names
        .iter()
        .map(|n| tenant_control_schema(base, n))
        .collect();
    let (mut keep, mut skipped) = (Vec::new(), Vec::new());
    for n in names {
        if control.contains(&n) || n == base {
            skipped.push(n);
        } else if derived.contains(&n) {
            return Err(Error::Discover(format!(
                "discover: schema `{n}` is a tenant and also the control schema pgshift would use for another tenant; rename it, or exclude it from the query"
            )));
        } else {
            keep.push(n);
        }
    }
    Ok((keep, skipped))
}

/// Tables the plan names with a schema (`public.items`), step by step. Run
/// per tenant schema, such a step would change that one table once per tenant,
/// so schema-per-tenant fleets refuse them. (SQL text is the author's: only the
/// tables of generated steps, trigger and backfill, can be checked.)
pub fn qualified_tables(plan: &Plan) -> Vec<(String, String)> {
    plan.steps
        .iter()
        .filter_map(|s| {
            let table = match &s.kind {
                StepKind::Trigger(t) => &t.table,
                StepKind::Backfill(b) => &b.table,
                StepKind::DropTrigger(d) => &d.trigger.table,
                _ => return None,
            };
            table
                .schema
                .as_ref()
                .map(|_| (s.name.clone(), table.quoted()))
        })
        .collect()
}

/// What the fleet is asked to do on each target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Run from the first unfinished step; a waiting gate stays closed.
    Apply,
    /// The same; with `pass_gates`, a gate a target waits at is passed.
    Resume { pass_gates: bool },
    /// Run the rollbacks of every target that ran.
    Rollback,
}

/// How the fleet runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub parallel: u32,
    pub canary: u32,
    pub max_failures: u32,
    pub accept_changed: bool,
    pub reconnect_timeout: Duration,
}

/// How every target ended, in fleet order.
#[derive(Debug, Clone)]
pub struct Summary {
    pub ends: Vec<(String, End)>,
    pub elapsed: Duration,
}

impl Summary {
    /// The worst of the targets' exit codes (see [`super::severity`]).
    pub fn exit(&self) -> Exit {
        super::worst(self.ends.iter().map(|(_, e)| e))
    }

    /// How many targets ended each way, in a stable order.
    pub fn counts(&self) -> BTreeMap<&'static str, usize> {
        let mut m = BTreeMap::new();
        for (_, e) in &self.ends {
            *m.entry(e.label()).or_insert(0) += 1;
        }
        m
    }
}

/// Runs `action` on every target: the first `canary` alone (to done or to the
/// gate; if any ends otherwise, no other target starts), then the rest, at most
/// `parallel` at once, until `max_failures` targets failed or `cancel` fires.
/// A target that fails does not stop the ones already running.
pub async fn run(
    targets: &[Target],
    plan: Arc<Plan>,
    action: Action,
    opts: &Options,
    events: Arc<dyn Events>,
    cancel: &CancellationToken,
) -> Summary {
    tokio::task::LocalSet::new()
        .run_until(schedule(targets, plan, action, opts, events, cancel))
        .await
}

async fn schedule(
    targets: &[Target],
    plan: Arc<Plan>,
    action: Action,
    opts: &Options,
    events: Arc<dyn Events>,
    cancel: &CancellationToken,
) -> Summary {
    let started = Instant::now();
    let mut ends: Vec<Option<End>> = vec![None; targets.len()];
    let targets: Vec<Arc<Target>> = targets.iter().cloned().map(Arc::new).collect();
    let opts = Arc::new(opts.clone());
    let canary = match action {
        Action::Rollback => 0,
        _ => (opts.canary as usize).min(targets.len()),
    };
    let mut failures = 0u32;
    let mut stop: Option<String> = None;

    if canary > 0 {
        events.message(&format!(
            "canary: {} first ({canary} of {}), to done or to its gate",
            names(&targets[..canary]),
            targets.len()
        ));
    }
    // Stage 0: the canaries; stage 1: the rest, if every canary passed.
    for stage in [0, 1] {
        let mut queue: VecDeque<usize> = if stage == 0 {
            (0..canary).collect()
        } else {
            (canary..targets.len()).collect()
        };
        let mut running = tokio::task::JoinSet::new();
        loop {
            while running.len() < opts.parallel.max(1) as usize && stop.is_none() {
                if cancel.is_cancelled() {
                    stop = Some("interrupted before it started".into());
                    break;
                }
                let failed_canaries: Vec<String> = (0..canary)
                    .filter(|&i| ends[i].as_ref().is_some_and(|e| !e.canary_passed()))
                    .map(|i| format!("`{}`", targets[i].name))
                    .collect();
                if !failed_canaries.is_empty() {
                    stop = Some(format!(
                        "the canary {} did not reach done or its gate, so no other target was started; fix it, or start the rest without it with --canary 0",
                        failed_canaries.join(", ")
                    ));
                    break;
                }
                if failures >= opts.max_failures {
                    stop = Some(format!(
                        "{failures} target(s) failed (max_failures is {}), so no new target was started",
                        opts.max_failures
                    ));
                    break;
                }
                let Some(i) = queue.pop_front() else { break };
                let t = targets[i].clone();
                let span = tracing::info_span!("target", name = %t.name);
                let task = one(
                    t,
                    plan.clone(),
                    action,
                    opts.clone(),
                    events.clone(),
                    cancel.child_token(),
                )
                .instrument(span);
                // A panic in one target's task must not take the fleet down (the
                // target's own record says where it stopped): it runs in a task
                // of its own, awaited by one that knows which target it was.
                // Local tasks: the runner's future is not `Send` (it holds an
                // entered tracing span across awaits); what it spawns itself,
                // such as backfill workers, still runs on the runtime's threads.
                running.spawn_local(async move {
                    let end = tokio::task::spawn_local(task).await.unwrap_or_else(|e| {
                        End::Failed(format!("its run stopped unexpectedly: {e}"))
                    });
                    (i, end)
                });
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            let Ok((i, end)) = joined else { continue };
            if end.is_failure() {
                failures += 1;
            }
            events.ended(&targets[i].name, &end);
            ends[i] = Some(end);
        }
    }
    let reason = stop.unwrap_or_else(|| "not started".into());
    let ends = targets
        .iter()
        .zip(ends)
        .map(|(t, e)| {
            (
                t.name.clone(),
                e.unwrap_or_else(|| End::NotStarted(reason.clone())),
            )
        })
        .collect();
    Summary {
        ends,
        elapsed: started.elapsed(),
    }
}

fn names(targets: &[Arc<Target>]) -> String {
    let shown: Vec<String> = targets
        .iter()
        .take(5)
        .map(|t| format!("`{}`", t.name))
        .collect();
    let more = targets.len().saturating_sub(5);
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

/// One target: read where it stands, then run what is left (or roll back).
async fn one(
    t: Arc<Target>,
    plan: Arc<Plan>,
    action: Action,
    opts: Arc<Options>,
    events: Arc<dyn Events>,
    cancel: CancellationToken,
) -> End {
    events.started(&t.name);
    let state = match read(&t, &plan.id).await {
        Ok(s) => s,
        Err(end) => return end,
    };
    let reporter = events.target(&t.name);
    let plan_status = state.plan.as_ref().map(|p| p.status);
    let job = match action {
        Action::Apply | Action::Resume { .. } => {
            // Only a target that ran this very plan file may be skipped: a
            // changed file (a step added, say) goes to the runner, which
            // refuses it (exit 5) or, with --accept-changed, runs what is new.
            let same_file = state
                .plan
                .as_ref()
                .is_some_and(|p| p.checksum == plan.checksum.0);
            if same_file && plan_status == Some(Status::Succeeded) {
                return End::AlreadyDone;
            }
            let pass = matches!(action, Action::Resume { pass_gates: true });
            if let Some(gate) = state.waiting_gate()
                && !pass
                && same_file
            {
                let message = match plan.step(&gate).map(|s| &s.kind) {
                    Some(StepKind::Gate(m)) => m.clone(),
                    _ => String::new(),
                };
                return End::Gate {
                    step: gate,
                    message,
                };
            }
            Job::Run(if pass {
                runner::Mode::Resume
            } else {
                runner::Mode::Apply
            })
        }
        Action::Rollback => {
            if matches!(plan_status, None | Some(Status::RolledBack)) {
                return End::NothingToRollBack;
            }
            Job::Rollback
        }
    };
    match on_target(&t, &plan, job, &opts, cancel, reporter).await {
        Ok(()) if job == Job::Rollback => End::RolledBack,
        Ok(()) => End::Done,
        Err(e) => end_of(e),
    }
}

/// A single-database run's error as the target's end.
fn end_of(e: exec::Error) -> End {
    let text = e.to_string();
    match e {
        exec::Error::Gate { step, message, .. } => End::Gate { step, message },
        exec::Error::Cancelled { .. } | exec::Error::ConnectionLost { .. } => {
            End::Interrupted(text)
        }
        exec::Error::Db(db::Error::Connect { .. }) => End::Unreachable(text),
        exec::Error::Db(ref d) if d.is_connection_lost() => End::Interrupted(format!(
            "lost the connection ({d}); every step that committed is recorded"
        )),
        exec::Error::LockHeld { .. } => End::Held(text),
        exec::Error::PlanChanged { .. } => End::Changed(text),
        exec::Error::Usage(_) => End::Invalid(text),
        _ => End::Failed(text),
    }
}

/// Where the plan stands on one target, read from its control schema.
#[derive(Debug, Clone, Default)]
pub struct State {
    /// `None`: the plan never ran there (or the control schema does not exist).
    pub plan: Option<PlanRow>,
    pub steps: Vec<StepRow>,
    /// A runner holds the plan's lock now.
    pub alive: bool,
}

impl State {
    /// The gate step the plan waits at, if it does.
    pub fn waiting_gate(&self) -> Option<String> {
        self.steps
            .iter()
            .find(|r| r.kind == "gate" && r.status == Status::Waiting)
            .map(|r| r.name.clone())
    }

    /// The plan's status, with a recorded runner that is gone shown as interrupted.
    pub fn status(&self) -> &str {
        match &self.plan {
            None => "not started",
            Some(p) if p.status == Status::Running && !self.alive => Status::Interrupted.as_str(),
            Some(p) => p.status.as_str(),
        }
    }

    /// The step the plan is at: the first not succeeded (none once it succeeded).
    pub fn current_step(&self) -> Option<&StepRow> {
        if self
            .plan
            .as_ref()
            .is_none_or(|p| p.status == Status::Succeeded || p.status == Status::RolledBack)
        {
            return None;
        }
        self.steps.iter().find(|s| s.status != Status::Succeeded)
    }

    /// Rows the plan's backfills have done.
    pub fn rows_done(&self) -> i64 {
        self.steps
            .iter()
            .filter(|s| s.kind == "backfill")
            .map(|s| s.rows_done)
            .sum()
    }

    /// Rows per second over the backfills' running time.
    pub fn rows_per_sec(&self) -> Option<f64> {
        let secs: f64 = self
            .steps
            .iter()
            .filter(|s| s.kind == "backfill")
            .filter_map(|s| s.duration_secs)
            .sum();
        (secs > 0.0).then(|| self.rows_done() as f64 / secs)
    }

    /// The error that stops the plan (the current step's), or the latest one recorded.
    pub fn last_error(&self) -> Option<&str> {
        self.current_step()
            .and_then(|s| s.last_error.as_deref())
            .or_else(|| {
                self.steps
                    .iter()
                    .rev()
                    .find_map(|s| s.last_error.as_deref())
            })
    }
}

/// Reads every target's state, at most `concurrency` at once, in fleet order.
pub async fn read_all(
    targets: &[Target],
    plan_id: &str,
    concurrency: usize,
) -> Vec<Result<State, End>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, t) in targets.iter().enumerate() {
        let (t, id, sem) = (t.clone(), plan_id.to_string(), sem.clone());
        tasks.spawn(async move {
            let _permit = sem.acquire_owned().await;
            (i, read(&t, &id).await)
        });
    }
    let mut out: Vec<Result<State, End>> = vec![Err(End::NotStarted(String::new())); targets.len()];
    while let Some(r) = tasks.join_next().await {
        if let Ok((i, s)) = r {
            out[i] = s;
        }
    }
    out
}

/// What `fleet rollback` would undo on `t`, step by step (for the confirmation).
pub async fn rollback_preview(
    t: &Target,
    plan: &Plan,
) -> Result<Vec<(String, Vec<String>)>, exec::Error> {
    let cx = context(
        t,
        &Options {
            parallel: 1,
            canary: 0,
            max_failures: 1,
            accept_changed: false,
            reconnect_timeout: Duration::from_secs(10),
        },
        CancellationToken::new(),
        Arc::new(exec::Silent),
    )?;
    crate::exec::rollback::preview(&cx, plan).await
}

// ---------------------------------------------------------------------------
// The seam with the single-database machinery: the execution context of one
// target, one run (or rollback) on it, and one read of its control schema.
// Nothing else in the fleet calls `exec` or `control`.

/// What to run on a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Job {
    Run(runner::Mode),
    Rollback,
}

/// Connections one target's pool may open (opened only when used: a plan
/// without a parallel backfill uses two or three, plus the lock's own).
const POOL_SIZE: usize = 16;

fn context(
    t: &Target,
    opts: &Options,
    cancel: CancellationToken,
    reporter: Arc<dyn exec::Reporter>,
) -> Result<exec::Context, db::Error> {
    Ok(exec::Context {
        target: t.db.clone(),
        pool: db::pool(&t.db, POOL_SIZE)?,
        control: Control::new(&t.control_schema),
        cancel,
        reporter,
        options: exec::Options {
            yes: false,
            accept_changed: opts.accept_changed,
            auto_gates: false,
            backfill: exec::BackfillOverrides::default(),
            reconnect_timeout: opts.reconnect_timeout,
            force_changed: false,
        },
    })
}

/// Runs the plan (or its rollback) on one target exactly as `pgshift plan
/// apply|resume|rollback` would on that database alone: its own lock, control
/// schema, checksum check and resume point.
async fn on_target(
    t: &Target,
    plan: &Plan,
    job: Job,
    opts: &Options,
    cancel: CancellationToken,
    reporter: Arc<dyn exec::Reporter>,
) -> Result<(), exec::Error> {
    let cx = context(t, opts, cancel, reporter)?;
    match job {
        Job::Run(mode) => runner::run(&cx, plan, mode).await,
        Job::Rollback => crate::exec::rollback::rollback(&cx, plan).await,
    }
}

/// Reads where plan `plan_id` stands on `t`, without creating anything there.
/// An error is already the target's end: unreachable, or failed (a tenant
/// schema that does not exist, a control schema it cannot read).
pub async fn read(t: &Target, plan_id: &str) -> Result<State, End> {
    let c = db::connect(&t.db).await.map_err(|e| match e {
        db::Error::Connect { .. } => End::Unreachable(e.to_string()),
        other if other.is_connection_lost() => End::Unreachable(other.to_string()),
        other => End::Failed(other.to_string()),
    })?;
    let failed = |e: db::Error| {
        if e.is_connection_lost() {
            End::Unreachable(format!("lost the connection to {}: {e}", t.db.display))
        } else {
            End::Failed(format!("cannot read its control schema: {e}"))
        }
    };
    if let Some(schema) = &t.schema {
        let current: Option<String> = c
            .row("SELECT current_schema()::text", &[])
            .await
            .map_err(|e| failed(e.into()))?
            .get(0);
        if current.as_deref() != Some(schema.as_str()) {
            return Err(End::Failed(format!(
                "schema `{schema}` does not exist in database `{}` (or this role has no USAGE on it)",
                t.db.config.get_dbname().unwrap_or("?")
            )));
        }
    }
    let control = Control::new(&t.control_schema);
    if !control.exists(&c).await.map_err(failed)? {
        return Ok(State::default());
    }
    let Some(plan) = control.plan_row(&c, plan_id).await.map_err(failed)? else {
        return Ok(State::default());
    };
    let steps = control.steps(&c, plan_id).await.map_err(failed)?;
    let alive = plan.runner.is_some()
        && control
            .lock_holder(&c, plan_id)
            .await
            .map_err(failed)?
            .is_some();
    Ok(State {
        plan: Some(plan),
        steps,
        alive,
    })
}
