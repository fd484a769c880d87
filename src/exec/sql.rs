//! Running SQL without stalling the application: every statement under a short
//! `lock_timeout`, retried with backoff, its blocker named while it waits, and
//! cancelled on the server (not just dropped) when the operator interrupts.

use std::time::Duration;

use serde_json::json;
use tokio_postgres::{Client, GenericClient};

use super::{Context, Error, Outcome};
use crate::db;
use crate::plan::{Plan, SqlBody, Step};

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
pub async fn with_retries<F, Fut>(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    what: &str,
    mut work: F,
) -> Result<Outcome, Error>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<(), Attempt>>,
{
    let max = step.retries + 1;
    let mut attempt = 1;
    loop {
        match work(attempt).await {
            Ok(()) => {
                cx.reporter.lock_done(&step.name);
                return Ok(Outcome::Done);
            }
            Err(Attempt::Cancelled) => {
                cx.reporter.lock_done(&step.name);
                return Ok(Outcome::Cancelled);
            }
            Err(Attempt::Fatal(e)) => {
                cx.reporter.lock_done(&step.name);
                if e.is_connection_lost() {
                    return Err(Error::ConnectionLost {
                        step: step.name.clone(),
                        source: e,
                    });
                }
                return Err(Error::Step {
                    step: step.name.clone(),
                    source: e,
                });
            }
            Err(Attempt::Retry(e)) => {
                if attempt >= max {
                    cx.reporter.lock_done(&step.name);
                    let _ = record(cx, plan, step, "retries_exhausted", json!({"attempts": attempt, "error": e.to_string(), "sqlstate": e.sqlstate()})).await;
                    return Err(Error::Failed {
                        step: step.name.clone(),
                        message: format!(
                            "{what} did not get its lock in {attempt} attempts of {} each: {e}. The application was never blocked longer than that. Find the blocker with `pgshift status {}`, or retry later with `pgshift resume {}`",
                            crate::plan::duration::format(step.lock_timeout),
                            plan.id,
                            plan.id
                        ),
                    });
                }
                let wait = db::backoff(attempt);
                let _ = record(cx, plan, step, "retry", json!({"attempt": attempt, "of": max, "error": e.to_string(), "sqlstate": e.sqlstate(), "backoff_ms": wait.as_millis() as u64})).await;
                tracing::info!(step = %step.name, attempt, "retrying after {e}; waiting {wait:?}");
                tokio::select! {
                    _ = cx.cancel.cancelled() => {
                        cx.reporter.lock_done(&step.name);
                        return Ok(Outcome::Cancelled);
                    }
                    _ = tokio::time::sleep(wait) => {}
                }
                attempt += 1;
            }
        }
    }
}

async fn record(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    event: &str,
    detail: serde_json::Value,
) -> Result<(), db::Error> {
    let c = db::get(&cx.pool, &cx.target).await?;
    cx.control
        .event(&**c, &plan.id, Some(&step.name), event, detail)
        .await
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
    cx: &Context,
    plan: &Plan,
    step: &Step,
    pid: i32,
    attempt: u32,
    done: tokio_util::sync::CancellationToken,
) {
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
            .query(
                "SELECT a.pid, coalesce(a.backend_type, ''), left(regexp_replace(coalesce(a.query, ''), '\\s+', ' ', 'g'), 120),
                        coalesce((SELECT string_agg(DISTINCT l.relation::regclass::text, ', ') FROM pg_locks l WHERE l.pid = $1 AND NOT l.granted AND l.relation IS NOT NULL), '')
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
            let who = if btype == "autovacuum worker" {
                format!(
                    "autovacuum (pid {bpid}): {query} — it yields only after deadlock_timeout; pgshift keeps retrying"
                )
            } else {
                format!("pid {bpid}: {query}")
            };
            cx.reporter
                .lock_wait(&step.name, &relation, attempt, step.retries + 1, Some(&who));
            if !reported {
                reported = true;
                let _ = cx
                    .control
                    .event(&**c, &plan.id, Some(&step.name), "lock_wait", json!({"attempt": attempt, "relation": relation, "blocker_pid": bpid, "blocker_type": btype, "blocker_query": query}))
                    .await;
            }
        }
    }
}

/// Starts [`watch_blockers`] on `client`'s backend for one attempt; cancel the
/// returned token and await the handle when the attempt ends.
async fn start_watcher(
    cx: &Context,
    plan: &Plan,
    step: &Step,
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
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .map_err(|e| Attempt::Fatal(e.into()))?
        .get(0);
    let done = tokio_util::sync::CancellationToken::new();
    let watcher = tokio::spawn({
        let (cx, plan, step, done) = (cx.clone(), plan.clone(), step.clone(), done.clone());
        async move { watch_blockers(&cx, &plan, &step, pid, attempt, done).await }
    });
    Ok((done, watcher))
}

/// Statements that set `deadlock_timeout` below the lock timeout where the role may,
/// so that an autovacuum blocking our DDL is cancelled before our lock timeout fires.
async fn lower_deadlock_timeout(tx: &impl GenericClient, lock_timeout: Duration) {
    let target = (lock_timeout / 2).max(Duration::from_millis(10));
    let allowed = tx
        .query_one(
            "SELECT current_setting('is_superuser') = 'on' OR (current_setting('server_version_num')::int >= 150000 AND has_parameter_privilege('deadlock_timeout', 'SET'))",
            &[],
        )
        .await
        .map(|r| r.get::<_, bool>(0))
        .unwrap_or(false);
    if allowed {
        let _ = tx
            .execute(
                "SELECT set_config('deadlock_timeout', $1, true)",
                &[&format!("{}ms", target.as_millis())],
            )
            .await;
    }
}

/// Runs a transactional body: statements and the step's `succeeded` mark in one transaction.
pub async fn run_transactional(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    statements: &[String],
    mark_status: &str,
) -> Result<Outcome, Error> {
    let what = format!("step `{}`", step.name);
    with_retries(cx, plan, step, &what, |attempt| async move {
        let mut client = db::get(&cx.pool, &cx.target)
            .await
            .map_err(Attempt::Fatal)?;
        let (done, watcher) = start_watcher(cx, plan, step, &client, attempt).await?;
        let result = async {
            let raw: &mut tokio_postgres::Client = &mut client;
            let tx = raw
                .transaction()
                .await
                .map_err(|e| Attempt::Fatal(e.into()))?;
            let token = tx.cancel_token();
            db::set_local_timeouts(&tx, step.lock_timeout, step.statement_timeout)
                .await
                .map_err(Attempt::Fatal)?;
            lower_deadlock_timeout(&tx, step.lock_timeout).await;
            for s in statements {
                cancellable(cx, &token, tx.batch_execute(s)).await?;
            }
            cx.control
                .step_status(&tx, &plan.id, &step.name, mark_status, None)
                .await
                .map_err(Attempt::Fatal)?;
            let event = if mark_status == "rolled_back" {
                "rollback_done"
            } else {
                "step_succeeded"
            };
            cx.control
                .event(
                    &tx,
                    &plan.id,
                    Some(&step.name),
                    event,
                    json!({"attempt": attempt}),
                )
                .await
                .map_err(Attempt::Fatal)?;
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
/// Before every attempt an INVALID index of the same name, left by an earlier failed
/// or killed attempt, is dropped: `IF NOT EXISTS` would otherwise keep it and report success.
pub async fn run_non_transactional(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    statement: &str,
) -> Result<Outcome, Error> {
    let what = format!("step `{}`", step.name);
    let index = concurrent_index_name(statement);
    with_retries(cx, plan, step, &what, |attempt| {
        let index = index.clone();
        async move {
            let client = db::connect(&cx.target).await.map_err(Attempt::Fatal)?;
            client
                .batch_execute(&format!(
                    "SET lock_timeout = '{}ms'; SET statement_timeout = '{}ms'",
                    step.lock_timeout.as_millis(),
                    step.statement_timeout.as_millis()
                ))
                .await
                .map_err(|e| Attempt::Fatal(e.into()))?;
            if let Some(name) = &index {
                drop_invalid_index(cx, plan, step, &client, name).await?;
            }
            let (done, watcher) = start_watcher(cx, plan, step, &client, attempt).await?;
            let token = client.cancel_token();
            let r = cancellable(cx, &token, client.batch_execute(statement)).await;
            done.cancel();
            let _ = watcher.await;
            if r.is_err()
                && let Some(name) = &index
            {
                // Leave nothing INVALID behind for the application's planner to trip on.
                let _ = drop_invalid_index(cx, plan, step, &client, name).await;
            }
            r
        }
    })
    .await
}

/// The index a `CREATE [UNIQUE] INDEX CONCURRENTLY [IF NOT EXISTS] name` statement creates.
pub fn concurrent_index_name(statement: &str) -> Option<String> {
    use squawk_syntax::ast::AstNode;
    let parse = squawk_syntax::SourceFile::parse(statement);
    let stmt = parse.tree().stmts().next()?;
    let node = stmt.syntax();
    if node.kind() != squawk_syntax::SyntaxKind::CREATE_INDEX {
        return None;
    }
    let path = node
        .descendants()
        .find(|d| d.kind() == squawk_syntax::SyntaxKind::PATH)?;
    let text = path.text().to_string();
    let parts = text
        .split('.')
        .map(|p| p.trim().to_string())
        .collect::<Vec<_>>();
    Some(parts.join("."))
}

async fn drop_invalid_index(
    cx: &Context,
    plan: &Plan,
    step: &Step,
    client: &Client,
    name: &str,
) -> Result<(), Attempt> {
    let (schema, rel) = match name.rsplit_once('.') {
        Some((s, r)) => (Some(unquote(s)), unquote(r)),
        None => (None, unquote(name)),
    };
    let rows = client
        .query(
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
        let _ = cx
            .control
            .event(
                client,
                &plan.id,
                Some(&step.name),
                "invalid_index_dropped",
                json!({"index": qualified}),
            )
            .await;
        cx.reporter.message(&format!(
            "dropped INVALID index {qualified} left by an earlier attempt of `{}`",
            step.name
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

/// The SQL of a body as statements to send one by one.
pub fn statements_of(body: &SqlBody) -> Vec<String> {
    body.statements.iter().map(|s| s.text.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn index_names_are_found() {
        assert_eq!(
            concurrent_index_name("CREATE INDEX CONCURRENTLY IF NOT EXISTS leads_h ON leads (h)")
                .as_deref(),
            Some("leads_h")
        );
        assert_eq!(
            concurrent_index_name("CREATE UNIQUE INDEX CONCURRENTLY s.\"Idx\" ON s.t (h)")
                .as_deref(),
            Some("s.\"Idx\"")
        );
        assert_eq!(concurrent_index_name("VACUUM t"), None);
    }
}
