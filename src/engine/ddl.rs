//! Running SQL without stalling the application: every statement under a short
//! `lock_timeout`, retried with backoff, its blocker named while it waits, and
//! cancelled on the server (not just dropped) when the operator interrupts.

use std::time::Duration;

use tokio_postgres::{Client, GenericClient};

use super::{Context, Error, Outcome, StepCx};
use crate::control::{Event, Status};
use crate::db::{self, OneTrip};

/// Why one attempt ended without success.
pub enum Attempt {
    /// Retryable (lock timeout, deadlock, serialization failure).
    Retry(db::Error),
    /// Not retryable: the step fails with this.
    Fatal(db::Error),
    /// The operator interrupted; the server statement was cancelled.
    Cancelled,
}

/// Runs `work` under the step's retry policy: each retryable failure waits a
/// capped exponential backoff with jitter, recorded as an event.
pub async fn with_retries<F, Fut>(sx: &StepCx, mut work: F) -> Result<Outcome, Error>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<(), Attempt>>,
{
    let reporter = &sx.cx.reporter;
    let max = sx.retries + 1;
    let mut attempt = 1;
    loop {
        match work(attempt).await {
            Ok(()) => {
                reporter.lock_done(&sx.step);
                return Ok(Outcome::Done);
            }
            Err(Attempt::Cancelled) => {
                reporter.lock_done(&sx.step);
                return Ok(Outcome::Cancelled);
            }
            Err(Attempt::Fatal(e)) => {
                reporter.lock_done(&sx.step);
                return Err(sx.db_error(e));
            }
            Err(Attempt::Retry(e)) => {
                if attempt >= max {
                    reporter.lock_done(&sx.step);
                    sx.note(&Event::RetriesExhausted {
                        attempts: attempt,
                        error: e.to_string(),
                        sqlstate: e.sqlstate().map(str::to_string),
                    })
                    .await;
                    return Err(Error::RetriesExhausted {
                        plan: sx.plan.clone(),
                        step: sx.step.clone(),
                        attempts: attempt,
                        lock_timeout: sx.lock_timeout,
                        source: e,
                    });
                }
                let wait = db::backoff(attempt);
                sx.note(&Event::Retry {
                    attempt,
                    of: max,
                    error: e.to_string(),
                    sqlstate: e.sqlstate().map(str::to_string),
                    backoff_ms: wait.as_millis() as u64,
                })
                .await;
                tracing::info!(step = %sx.step, attempt, "retrying after {e}; waiting {wait:?}");
                tokio::select! {
                    _ = sx.cx.cancel.cancelled() => {
                        reporter.lock_done(&sx.step);
                        return Ok(Outcome::Cancelled);
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
                attempt += 1;
            }
        }
    }
}

fn classify(e: db::Error) -> Attempt {
    if e.is_retryable() {
        Attempt::Retry(e)
    } else {
        Attempt::Fatal(e)
    }
}

/// Runs one future on `client`'s backend; if the operator interrupts meanwhile, asks the
/// server to cancel the statement and waits for it to end.
pub async fn cancellable<T>(
    cx: &Context,
    token: &tokio_postgres::CancelToken,
    fut: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, Attempt> {
    tokio::pin!(fut);
    tokio::select! {
        r = &mut fut => r.map_err(|e| classify(e.into())),
        _ = cx.cancel.cancelled() => {
            if let Ok(tls) = db::tls_connector(&cx.target) {
                let _ = token.cancel_query(tls).await;
            }
            // The statement ends with 57014 (or finishes first); either way we stop.
            let _ = fut.await;
            Err(Attempt::Cancelled)
        }
    }
}

/// Watches `pid` while it runs and reports who blocks it (from `pg_blocking_pids`).
/// Returns when `done` fires.
pub async fn watch_blockers(
    sx: &StepCx,
    pid: i32,
    attempt: u32,
    done: tokio_util::sync::CancellationToken,
) {
    let cx = &sx.cx;
    let Ok(c) = db::get(&cx.pool, &cx.target).await else {
        return;
    };
    let mut reported = false;
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let rows = c
            .rows(
                "SELECT a.pid, coalesce(a.backend_type, ''), left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 120),
                        coalesce((SELECT string_agg(DISTINCT l.relation::regclass::text, ', ') FROM pg_locks l WHERE l.pid = $1 AND NOT l.granted AND l.relation IS NOT NULL), ''),
                        coalesce(a.state, ''), extract(epoch FROM now() - coalesce(a.state_change, a.backend_start))::float8
                 FROM pg_stat_activity a WHERE a.pid = ANY (pg_blocking_pids($1))",
                &[&pid],
            )
            .await;
        let Ok(rows) = rows else { return };
        if let Some(r) = rows.first() {
            let bpid: i32 = r.get(0);
            let btype: String = r.get(1);
            let query: String = r.get(2);
            let relation: String = r.get(3);
            let state: String = r.get(4);
            let age: Option<f64> = r.get(5);
            // `idle in transaction for 4m12s`: what the blocker is doing, and for how long.
            let doing = match (state.as_str(), age) {
                ("", _) => String::new(),
                (s, Some(secs)) if secs < 1.0 => format!(", {s} for under a second"),
                (s, Some(secs)) => format!(
                    ", {s} for {}",
                    crate::duration::format(Duration::from_secs(secs as u64))
                ),
                (s, None) => format!(", {s}"),
            };
            let who = if btype == "autovacuum worker" {
                format!(
                    "autovacuum (pid {bpid}{doing}): {query} — it yields only after deadlock_timeout; pgshift keeps retrying"
                )
            } else {
                format!("pid {bpid}{doing}: {query}")
            };
            cx.reporter
                .lock_wait(&sx.step, &relation, attempt, sx.retries + 1, Some(&who));
            if !reported {
                reported = true;
                let wait = Event::LockWait {
                    attempt,
                    relation,
                    blocker_pid: bpid,
                    blocker_type: btype,
                    blocker_query: query,
                };
                let _ = sx.record(&**c, &wait).await;
            }
        }
    }
}

/// Starts [`watch_blockers`] on `client`'s backend for one attempt; cancel the
/// returned token and await the handle when the attempt ends.
async fn start_watcher(
    sx: &StepCx,
    client: &Client,
    attempt: u32,
) -> Result<
    (
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    ),
    Attempt,
> {
    let pid: i32 = client
        .row("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|e| Attempt::Fatal(e.into()))?
        .get(0);
    let done = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn({
        let (sx, done) = (sx.clone(), done.clone());
        async move { watch_blockers(&sx, pid, attempt, done).await }
    });
    Ok((done, watcher))
}

/// Statements that set `deadlock_timeout` below the lock timeout where the role may,
/// so that an autovacuum blocking our DDL is cancelled before our lock timeout fires.
async fn lower_deadlock_timeout(tx: &impl GenericClient, lock_timeout: Duration) {
    let target = (lock_timeout / 2).max(Duration::from_millis(10));
    let allowed = tx
        .row(
            "SELECT current_setting('is_superuser') = 'on' OR (current_setting('server_version_num')::int >= 150000 AND has_parameter_privilege('deadlock_timeout', 'SET'))",
            &[],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false);
    if allowed {
        let _ = tx
            .exec(
                "SELECT set_config('deadlock_timeout', $1, true)",
                &[&format!("{}ms", target.as_millis())],
            )
            .await;
    }
}

/// Runs statements in one transaction together with the step's `mark`
/// (`succeeded`, or `rolled_back` for a rollback) and its event; with no mark
/// (`finalize`), the statements alone.
pub async fn run_transactional(
    sx: &StepCx,
    statements: &[String],
    mark: Option<Status>,
) -> Result<Outcome, Error> {
    let cx = &sx.cx;
    with_retries(sx, |attempt| async move {
        let mut client = db::get(&cx.pool, &cx.target)
            .await
            .map_err(Attempt::Fatal)?;
        let (done, watcher) = start_watcher(sx, &client, attempt).await?;
        let result = async {
            let raw: &mut tokio_postgres::Client = &mut client;
            let tx = raw
                .transaction()
                .await
                .map_err(|e| Attempt::Fatal(e.into()))?;
            let token = tx.cancel_token();
            db::set_local_timeouts(&tx, sx.lock_timeout, sx.statement_timeout)
                .await
                .map_err(Attempt::Fatal)?;
            lower_deadlock_timeout(&tx, sx.lock_timeout).await;
            for s in statements {
                cancellable(cx, &token, tx.batch_execute(s)).await?;
            }
            if let Some(mark) = mark {
                cx.control
                    .step_status(&tx, &sx.plan, &sx.step, mark, None)
                    .await
                    .map_err(Attempt::Fatal)?;
                let event = if mark == Status::RolledBack {
                    Event::RollbackDone {
                        attempt: Some(attempt),
                    }
                } else {
                    Event::StepSucceeded {
                        attempt: Some(attempt),
                    }
                };
                sx.record(&tx, &event).await.map_err(Attempt::Fatal)?;
            }
            if cx.cancel.is_cancelled() {
                // Dropping the transaction rolls it back: neither the change nor the mark.
                return Err(Attempt::Cancelled);
            }
            tx.commit().await.map_err(|e| classify(e.into()))
        }
        .await;
        done.cancel();
        let _ = watcher.await;
        result
    })
    .await
}

/// Runs one statement that cannot run in a transaction (CREATE INDEX CONCURRENTLY, …)
/// on a connection of its own with session timeouts, never a pooled one.
///
/// `index`: the index the statement builds, if it builds one. Before every attempt
/// an INVALID index of that name, left by an earlier failed or killed attempt, is
/// dropped: `IF NOT EXISTS` would otherwise keep it and report success.
pub async fn run_alone(
    sx: &StepCx,
    statement: &str,
    index: Option<&str>,
) -> Result<Outcome, Error> {
    let cx = &sx.cx;
    with_retries(sx, |attempt| async move {
        let client = db::connect(&cx.target).await.map_err(Attempt::Fatal)?;
        // Integers rendered here: nothing from a plan is spliced into this text.
        client
            .batch_execute(&format!(
                "SET lock_timeout = '{}ms'; SET statement_timeout = '{}ms'",
                sx.lock_timeout.as_millis(),
                sx.statement_timeout.as_millis()
            ))
            .await
            .map_err(|e| Attempt::Fatal(e.into()))?;
        if let Some(name) = index {
            drop_invalid_index(sx, &client, name).await?;
        }
        let (done, watcher) = start_watcher(sx, &client, attempt).await?;
        let token = client.cancel_token();
        let r = cancellable(cx, &token, client.batch_execute(statement)).await;
        done.cancel();
        let _ = watcher.await;
        if r.is_err()
            && let Some(name) = index
        {
            // Leave nothing INVALID behind for the application's planner to trip on.
            let _ = drop_invalid_index(sx, &client, name).await;
        }
        r
    })
    .await
}

async fn drop_invalid_index(sx: &StepCx, client: &Client, name: &str) -> Result<(), Attempt> {
    let (schema, rel) = match name.rsplit_once('.') {
        Some((s, r)) => (Some(unquote(s)), unquote(r)),
        None => (None, unquote(name)),
    };
    let rows = client
        .rows(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE NOT i.indisvalid AND c.relname = $1 AND ($2::text IS NULL AND n.oid = ANY (current_schemas(false)::regnamespace[]) OR n.nspname = $2)",
            &[&rel, &schema],
        )
        .await
        .map_err(|e| Attempt::Fatal(e.into()))?;
    for r in rows {
        let qualified: String = r.get(0);
        client
            .batch_execute(&format!("DROP INDEX CONCURRENTLY IF EXISTS {qualified}"))
            .await
            .map_err(|e| classify(e.into()))?;
        let dropped = Event::InvalidIndexDropped {
            index: qualified.clone(),
        };
        let _ = sx.record(client, &dropped).await;
        sx.cx.reporter.message(&format!(
            "dropped INVALID index {qualified} left by an earlier attempt of `{}`",
            sx.step
        ));
    }
    Ok(())
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    match s.strip_prefix('"').and_then(|x| x.strip_suffix('"')) {
        Some(q) => q.replace("\"\"", "\""),
        None => s.to_ascii_lowercase(),
    }
}
