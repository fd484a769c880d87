//! The plan's lock: a session advisory lock on a connection of its own, held
//! for the whole run, so that one runner at a time works on a plan; taken
//! again after a lost connection; released explicitly on every path.

use std::time::Duration;

use tokio_postgres::Client;

use tokio_util::sync::CancellationToken;

use crate::control::Event;
use crate::db::{self, OneTrip};
use crate::engine::{Context, Error, Fence};

/// The held lock of one plan on its dedicated connection; released explicitly on every path.
pub struct Held {
    pub conn: Client,
    pub plan: String,
    /// Cancelled when `conn` is gone, and with it the lock.
    pub lost: CancellationToken,
    /// The run epoch taken with the lock ([`Held::take_epoch`]); 0 before.
    pub epoch: i64,
}

/// Opens the lock connection, creates the control schema, takes the plan's lock.
pub async fn lock(cx: &Context, plan_id: &str) -> Result<Held, Error> {
    cx.target.check_not_transaction_pooler()?;
    let (mut conn, lost) = db::connect_watched(&cx.target).await?;
    check_session_pooler(&conn).await?;
    cx.control.ensure(&mut conn).await?;
    // A runner killed a moment ago still holds the lock until its backend
    // notices the closed socket and exits; a holder that is gone by the time
    // it is looked up (or is already leaving `pg_stat_activity`) was such a
    // backend: try again for up to a second rather than report a runner that
    // no longer exists.
    let mut unnamed = 0;
    let held_by = loop {
        if cx.control.try_lock(&conn, plan_id).await? {
            break None;
        }
        match cx.control.lock_holder(&conn, plan_id).await? {
            Some(holder) => break Some(holder),
            None if unnamed < 20 => {
                unnamed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            None => break Some("a runner whose session could not be identified".into()),
        }
    };
    if let Some(holder) = held_by {
        // The session alone names a backend; the recorded runner names the person
        // and process. A holder that has just taken the lock records itself a
        // moment later (and until then the row may still name a killed runner):
        // wait a little for its own record rather than name the wrong process.
        let mut recorded = None;
        for _ in 0..40 {
            recorded = cx.control.recorded_holder(&conn, plan_id).await?;
            if recorded.is_some() || cx.control.lock_holder(&conn, plan_id).await?.is_none() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let holder = match recorded {
            Some(runner) => format!("{runner} (session {holder})"),
            None => holder,
        };
        return Err(Error::LockHeld {
            plan: plan_id.to_string(),
            holder,
        });
    }
    Ok(Held {
        conn,
        plan: plan_id.to_string(),
        lost,
        epoch: 0,
    })
}

/// Two statements on one connection served by two backends: a transaction-mode pooler.
async fn check_session_pooler(conn: &Client) -> Result<(), Error> {
    let a: i32 = conn
        .row("SELECT pg_backend_pid()", &[])
        .await
        .map_err(db::Error::from)?
        .get(0);
    let b: i32 = conn
        .row("SELECT pg_backend_pid()", &[])
        .await
        .map_err(db::Error::from)?
        .get(0);
    if a != b {
        return Err(Error::Usage(
            "this connection goes through a transaction-mode pooler (consecutive statements ran on different backends): session advisory locks cannot work there; connect directly to the server (port 5432 on Supabase)".into(),
        ));
    }
    Ok(())
}

impl Held {
    /// Takes a new run epoch for the plan (once it is registered) and records it:
    /// from this commit on, any batch of an earlier run applies nothing.
    pub async fn take_epoch(&mut self, cx: &Context, runner: &str) -> Result<(), Error> {
        self.epoch = cx.control.take_epoch(&self.conn, &self.plan).await?;
        let taken = Event::LockTaken {
            epoch: self.epoch,
            runner: runner.to_string(),
        };
        cx.control
            .event(&self.conn, &self.plan, None, &taken)
            .await?;
        Ok(())
    }

    /// What the steps of this run check to know it still owns the plan.
    pub fn fence(&self) -> Fence {
        Fence {
            epoch: self.epoch,
            lost: self.lost.clone(),
        }
    }

    pub async fn release(self, cx: &Context) {
        let _ = cx.control.set_runner(&self.conn, &self.plan, None).await;
        let _ = cx.control.unlock(&self.conn, &self.plan).await;
    }
}

/// Connects again and re-takes the plan's lock, retrying with backoff until
/// `--reconnect-timeout` runs out; another runner that took the plan meanwhile wins.
pub async fn relock(cx: &Context, plan_id: &str, held: Held) -> Result<Held, Error> {
    // Only a step's connection may have been lost: the lock connection, if it still
    // answers, still holds the plan (a new one would find the lock taken by it).
    if !held.conn.is_closed() && held.conn.simple_query("SELECT 1").await.is_ok() {
        return Ok(held);
    }
    drop(held);
    let deadline = tokio::time::Instant::now() + cx.options.reconnect_timeout;
    let mut attempt = 0;
    loop {
        attempt += 1;
        cx.reporter.message(&format!(
            "lost the connection to {}; reconnecting (attempt {attempt})",
            cx.target.display
        ));
        match lock(cx, plan_id).await {
            Ok(h) => return Ok(h),
            Err(e @ Error::LockHeld { .. }) => return Err(e),
            Err(e) => {
                let wait = db::backoff(attempt);
                if tokio::time::Instant::now() + wait > deadline {
                    return Err(e);
                }
                tokio::select! {
                    _ = cx.cancel.cancelled() => return Err(e),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
