//! The control schema: what pgshift records in the target database about every
//! plan, step and event, and the per-plan advisory lock.
//!
//! Every status change of a step is written here; a transactional step's
//! `succeeded` mark is written inside the step's own transaction, so the record
//! and the change commit together or not at all.

mod failures;
pub mod migrations;
pub mod types;

use serde_json::Value as Json;
use tokio_postgres::{Client, GenericClient, Row};

use crate::db::{Error, OneTrip};
use crate::ident::quote_ident;
pub use failures::{TriggerFailure, key_text};
pub use types::{Checkpoint, Event, LiveProgress, Overrides, Status, StepSnapshot};

/// The version of the control schema this pgshift writes: `schema.sql` creates
/// version 1, and each script of `migrations` brings it one version further.
pub const SCHEMA_VERSION: i32 = 3;

const SCHEMA_SQL: &str = include_str!("schema.sql");

/// What the control schema records of a plan when it first runs.
#[derive(Debug, Clone)]
pub struct PlanRecord {
    pub id: String,
    pub checksum: String,
    /// The plan file, as an absolute path where it can be made one.
    pub file: String,
    pub description: Option<String>,
    pub steps: Vec<StepRecord>,
}

/// One step of a [`PlanRecord`].
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub position: i32,
    pub phase: &'static str,
    pub name: String,
    pub kind: &'static str,
}

/// Access to the control tables of one control schema.
#[derive(Debug, Clone)]
pub struct Control {
    pub schema: String,
    quoted: String,
}

/// A row of `plans`.
#[derive(Debug, Clone)]
pub struct PlanRow {
    pub id: String,
    pub checksum: String,
    pub file: String,
    pub status: Status,
    pub applied_by: String,
    pub runner: Option<String>,
    pub started_at: String,
    pub updated_at: String,
}

/// One row of `events`: when, which step, what, details.
pub type EventRow = (String, Option<String>, String, Json);

/// A row of `steps`.
#[derive(Debug, Clone)]
pub struct StepRow {
    pub position: i32,
    pub phase: String,
    pub name: String,
    pub kind: String,
    pub status: Status,
    pub attempts: i32,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub duration_secs: Option<f64>,
    pub last_error: Option<String>,
    pub last_sqlstate: Option<String>,
    pub checkpoint: Option<Json>,
    pub rows_done: i64,
    pub rows_total: Option<i64>,
    pub overrides: Overrides,
    /// A backfill's own report (rate, ETA, throttle reason), as its coordinator last wrote it.
    pub progress: Option<LiveProgress>,
}

impl Control {
    pub fn new(schema: &str) -> Control {
        Control {
            schema: schema.to_string(),
            quoted: quote_ident(schema),
        }
    }

    /// The control schema's name, quoted for SQL.
    pub fn quoted(&self) -> &str {
        &self.quoted
    }

    /// `sql` with `__SCHEMA__` replaced by the quoted control schema.
    ///
    /// Only pgshift's own fixed text goes through here (hence `'static`): SQL
    /// that holds a plan's expressions takes the schema as a quoted identifier
    /// when it is generated, so that nothing a plan writes is ever rewritten.
    pub fn sql(&self, sql: &'static str) -> String {
        sql.replace("__SCHEMA__", &self.quoted)
    }

    /// Creates the control schema if needed; safe when several runners race to do it.
    /// True when the control schema exists (and is a version this pgshift reads);
    /// for the read-only commands, which must not create it.
    pub async fn exists(&self, client: &Client) -> Result<bool, Error> {
        let exists: bool = client
            .row(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&format!("{}.events", self.quoted)],
            )
            .await
            .map_err(|e| self.no_usage(e))?
            .get(0);
        if exists {
            self.bring_up_to_date(client).await?;
        }
        Ok(exists)
    }

    /// True when the control schema's tables exist (no version check).
    pub async fn exists_on(&self, c: &impl GenericClient) -> Result<bool, Error> {
        Ok(c.row(
            "SELECT to_regclass($1) IS NOT NULL",
            &[&format!("{}.events", self.quoted)],
        )
        .await?
        .get(0))
    }

    pub async fn ensure(&self, client: &mut Client) -> Result<(), Error> {
        // Fast path: already there and current.
        let exists: bool = client
            .row(
                "SELECT to_regclass($1) IS NOT NULL",
                &[&format!("{}.events", self.quoted)],
            )
            .await
            .map_err(|e| self.no_usage(e))?
            .get(0);
        if exists {
            return self.bring_up_to_date(client).await;
        }
        let tx = client.transaction().await?;
        tx.exec(migrations::LOCK_SQL, &[&self.schema]).await?;
        // Another runner may have created it while we waited for the lock. Running
        // the script again would not be a no-op: `CREATE INDEX IF NOT EXISTS`
        // takes a SHARE lock on its table before it finds the index there, and so
        // deadlocks with a runner already writing its plan and steps. (A plain
        // catalog query, not `to_regclass`: this transaction began before the
        // other runner committed, and its name lookups may still use a cache that
        // says the schema is not there; a query's snapshot is fresh.)
        let created: bool = tx
            .row(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                                WHERE n.nspname = $1 AND c.relname = 'events')",
                &[&self.schema],
            )
            .await?
            .get(0);
        if created {
            tx.commit().await?;
            return self.bring_up_to_date(client).await;
        }
        // The version 1 baseline; then the migrations, as for an upgraded schema,
        // so that they run on every fresh install too.
        let script = self
            .sql(SCHEMA_SQL)
            .replace("__STATUSES__", &Status::sql_list())
            .replace("__RUNNING__", Status::Running.as_str());
        tx.batch_execute(&script).await.map_err(|e| {
            let err = Error::from(e);
            match err.sqlstate() {
                Some("42501") => Error::Refused(format!(
                    "cannot create the control schema `{}`: permission denied ({}). pgshift needs CREATE on the database (or an existing schema `{}` it owns); grant it with `GRANT CREATE ON DATABASE <db> TO <role>`, or pass --control-schema naming a schema the role owns",
                    self.schema, err, self.schema
                )),
                _ => err,
            }
        })?;
        tx.commit().await?;
        self.bring_up_to_date(client).await
    }

    /// A permission error on the schema itself (it exists, owned by another role,
    /// and this role has no USAGE on it) in words that name the privilege.
    fn no_usage(&self, e: tokio_postgres::Error) -> Error {
        let err = Error::from(e);
        if err.sqlstate() != Some("42501") {
            return err;
        }
        Error::Refused(format!(
            "cannot use the control schema `{s}`: {err}. It exists but belongs to another role, and this role has no USAGE on it; nothing was changed. Make this role its owner (`ALTER SCHEMA {q} OWNER TO <role>`), or grant it USAGE and CREATE on the schema and SELECT, INSERT, UPDATE, DELETE on its tables, or pass --control-schema naming a schema of its own",
            s = self.schema,
            q = self.quoted
        ))
    }

    /// Appends an event to the log.
    pub async fn event(
        &self,
        c: &impl GenericClient,
        plan: &str,
        step: Option<&str>,
        event: &Event,
    ) -> Result<(), Error> {
        let (name, detail) = event.to_row();
        c.exec(
            &self.sql("INSERT INTO __SCHEMA__.events (plan_id, step, event, detail) VALUES ($1, $2, $3, $4)"),
            &[&plan, &step, &name, &detail],
        )
        .await?;
        Ok(())
    }

    /// Records the plan and its steps (first run), or returns the recorded plan (later runs).
    ///
    /// Steps are matched by name; steps added to an accepted changed plan are inserted,
    /// positions are updated to the file's order.
    pub async fn register(
        &self,
        client: &mut Client,
        plan: &PlanRecord,
        applied_by: &str,
    ) -> Result<Option<PlanRow>, Error> {
        let tx = client.transaction().await?;
        let existing = self.plan_row(&tx, &plan.id).await?;
        if existing.is_none() {
            tx.exec(
                &self.sql("INSERT INTO __SCHEMA__.plans (id, checksum, file, description, applied_by, application_name) VALUES ($1, $2, $3, $4, $5, 'pgshift')"),
                &[&plan.id, &plan.checksum, &plan.file, &plan.description, &applied_by],
            )
            .await?;
            let registered = Event::PlanRegistered {
                checksum: plan.checksum.clone(),
                file: plan.file.clone(),
                by: applied_by.to_string(),
                steps: plan.steps.len(),
            };
            self.event(&tx, &plan.id, None, &registered).await?;
        }
        self.sync_steps(&tx, plan).await?;
        tx.commit().await?;
        Ok(existing)
    }

    /// Records a plan that has no steps recorded yet (its pre-flight, say).
    pub async fn insert_plan(
        &self,
        c: &impl GenericClient,
        plan: &PlanRecord,
        applied_by: &str,
    ) -> Result<(), Error> {
        c.exec(
            &self.sql("INSERT INTO __SCHEMA__.plans (id, checksum, file, description, applied_by, application_name) VALUES ($1, $2, $3, $4, $5, 'pgshift') ON CONFLICT (id) DO NOTHING"),
            &[&plan.id, &plan.checksum, &plan.file, &plan.description, &applied_by],
        )
        .await?;
        let registered = Event::PlanRegistered {
            checksum: plan.checksum.clone(),
            file: plan.file.clone(),
            by: applied_by.to_string(),
            steps: plan.steps.len(),
        };
        self.event(c, &plan.id, None, &registered).await
    }

    /// Makes `steps` match the plan's steps (insert missing, update positions).
    pub async fn sync_steps(
        &self,
        tx: &impl GenericClient,
        plan: &PlanRecord,
    ) -> Result<(), Error> {
        // Positions move in two passes to keep UNIQUE (plan_id, position) satisfied.
        tx.exec(
            &self.sql(
                "UPDATE __SCHEMA__.steps SET position = -position - 1000000 WHERE plan_id = $1",
            ),
            &[&plan.id],
        )
        .await?;
        for s in &plan.steps {
            tx.exec(
                &self.sql(
                    "INSERT INTO __SCHEMA__.steps (plan_id, position, phase, name, kind) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (plan_id, name) DO UPDATE SET position = EXCLUDED.position, phase = EXCLUDED.phase, kind = EXCLUDED.kind",
                ),
                &[&plan.id, &s.position, &s.phase, &s.name, &s.kind],
            )
            .await?;
        }
        Ok(())
    }

    pub async fn plan_row(
        &self,
        c: &impl GenericClient,
        id: &str,
    ) -> Result<Option<PlanRow>, Error> {
        let row = c
            .row_opt(
                &self.sql("SELECT id, checksum, file, status, applied_by, runner, started_at::text, updated_at::text FROM __SCHEMA__.plans WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.map(|r| plan_row(&r)))
    }

    pub async fn plans(&self, c: &impl GenericClient) -> Result<Vec<PlanRow>, Error> {
        let rows = c
            .rows(&self.sql("SELECT id, checksum, file, status, applied_by, runner, started_at::text, updated_at::text FROM __SCHEMA__.plans ORDER BY started_at, id"), &[])
            .await?;
        Ok(rows.iter().map(plan_row).collect())
    }

    pub async fn steps(&self, c: &impl GenericClient, plan: &str) -> Result<Vec<StepRow>, Error> {
        let rows = c
            .rows(
                &self.sql(
                    // A backfill's rows done are derived from its ranges (each batch commits
                    // its own range's count); the step row's copy lags by up to a second.
                    "SELECT s.position, s.phase, s.name, s.kind, s.status, s.attempts, s.started_at::text, s.finished_at::text,
                            extract(epoch FROM coalesce(s.finished_at, CASE WHEN s.status = $2 THEN now() END) - s.started_at)::float8,
                            s.last_error, s.last_sqlstate, s.checkpoint,
                            coalesce((SELECT sum(r.rows_done)::int8 FROM __SCHEMA__.backfill_ranges r
                                      WHERE r.plan_id = s.plan_id AND r.step = s.name), s.rows_done),
                            s.rows_total, s.overrides, s.progress
                     FROM __SCHEMA__.steps s WHERE s.plan_id = $1 AND s.position >= 0 ORDER BY s.position",
                ),
                &[&plan, &Status::Running.as_str()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| StepRow {
                position: r.get(0),
                phase: r.get(1),
                name: r.get(2),
                kind: r.get(3),
                status: r.get(4),
                attempts: r.get(5),
                started_at: r.get(6),
                finished_at: r.get(7),
                duration_secs: r.get(8),
                last_error: r.get(9),
                last_sqlstate: r.get(10),
                checkpoint: r.get(11),
                rows_done: r.get(12),
                rows_total: r.get(13),
                overrides: Overrides::from_json(&r.get::<_, Json>(14)),
                progress: r
                    .get::<_, Option<Json>>(15)
                    .and_then(|p| serde_json::from_value(p).ok()),
            })
            .collect())
    }

    pub async fn set_plan_status(
        &self,
        c: &impl GenericClient,
        plan: &str,
        status: Status,
    ) -> Result<(), Error> {
        let ended = matches!(status, Status::Succeeded | Status::RolledBack);
        c.exec(
            &self.sql(
                "UPDATE __SCHEMA__.plans SET status = $2, updated_at = now(),
                   finished_at = CASE WHEN $3 THEN now() ELSE NULL END WHERE id = $1",
            ),
            &[&plan, &status.as_str(), &ended],
        )
        .await?;
        Ok(())
    }

    pub async fn set_checksum(
        &self,
        c: &impl GenericClient,
        plan: &str,
        checksum: &str,
    ) -> Result<(), Error> {
        c.exec(
            &self
                .sql("UPDATE __SCHEMA__.plans SET checksum = $2, updated_at = now() WHERE id = $1"),
            &[&plan, &checksum],
        )
        .await?;
        Ok(())
    }

    /// Marks a step running and counts the attempt.
    pub async fn step_running(
        &self,
        c: &impl GenericClient,
        plan: &str,
        step: &str,
    ) -> Result<(), Error> {
        c.exec(
            &self.sql(
                "UPDATE __SCHEMA__.steps SET status = $3, attempts = attempts + 1,
                   started_at = coalesce(CASE WHEN status IN ($4, $5) THEN NULL ELSE started_at END, now()),
                   finished_at = NULL WHERE plan_id = $1 AND name = $2",
            ),
            &[
                &plan,
                &step,
                &Status::Running.as_str(),
                &Status::Pending.as_str(),
                &Status::RolledBack.as_str(),
            ],
        )
        .await?;
        Ok(())
    }

    /// Sets a step's status; a final one ([`Status::is_final`]) also sets `finished_at`.
    pub async fn step_status(
        &self,
        c: &impl GenericClient,
        plan: &str,
        step: &str,
        status: Status,
        error: Option<(&str, Option<&str>)>,
    ) -> Result<(), Error> {
        let (msg, state) = match error {
            Some((m, s)) => (Some(m), s),
            None => (None, None),
        };
        let clears = status == Status::Succeeded;
        c.exec(
            &self.sql(
                "UPDATE __SCHEMA__.steps SET status = $3,
                   finished_at = CASE WHEN $6 THEN now() ELSE finished_at END,
                   last_error = CASE WHEN $4::text IS NOT NULL THEN $4 WHEN $7 THEN NULL ELSE last_error END,
                   last_sqlstate = CASE WHEN $4::text IS NOT NULL THEN $5 WHEN $7 THEN NULL ELSE last_sqlstate END
                 WHERE plan_id = $1 AND name = $2",
            ),
            &[&plan, &step, &status.as_str(), &msg, &state, &status.is_final(), &clears],
        )
        .await?;
        Ok(())
    }

    /// Resets a step that will run again (after a rollback, the rolled-back steps).
    pub async fn reset_backfill_ranges(
        &self,
        c: &impl GenericClient,
        plan: &str,
        step: &str,
    ) -> Result<(), Error> {
        c.exec(
            &self.sql("DELETE FROM __SCHEMA__.backfill_ranges WHERE plan_id = $1 AND step = $2"),
            &[&plan, &step],
        )
        .await?;
        c.exec(&self.sql("UPDATE __SCHEMA__.steps SET checkpoint = NULL, rows_done = 0, rows_total = NULL WHERE plan_id = $1 AND name = $2"), &[&plan, &step]).await?;
        Ok(())
    }

    /// Tries to take the plan's advisory lock on `conn`, a connection held for the whole run.
    pub async fn try_lock(&self, conn: &Client, plan: &str) -> Result<bool, Error> {
        Ok(conn
            .row(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
                &[&self.lock_name(plan)],
            )
            .await?
            .get(0))
    }

    pub async fn unlock(&self, conn: &Client, plan: &str) -> Result<(), Error> {
        conn.exec(
            "SELECT pg_advisory_unlock(hashtextextended($1, 0))",
            &[&self.lock_name(plan)],
        )
        .await?;
        Ok(())
    }

    fn lock_name(&self, plan: &str) -> String {
        format!("pgshift/{}/{}", self.schema, plan)
    }

    /// Who holds the plan's lock: `user@addr pid N (application), since T`.
    pub async fn lock_holder(
        &self,
        c: &impl GenericClient,
        plan: &str,
    ) -> Result<Option<String>, Error> {
        let row = c
            .row_opt(
                "SELECT a.pid, coalesce(a.usename, '?'), coalesce(host(a.client_addr), 'local socket'), coalesce(a.application_name, ''),
                        to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS TZ')
                 FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND ((l.classid::bigint << 32) | l.objid::bigint) = (hashtextextended($1, 0) & x'ffffffffffffffff'::bigint)",
                &[&self.lock_name(plan)],
            )
            .await?;
        Ok(row.map(|r| {
            let pid: i32 = r.get(0);
            let user: String = r.get(1);
            let addr: String = r.get(2);
            let app: String = r.get(3);
            let since: String = r.get(4);
            format!(
                "{user}@{addr} (backend pid {pid}, application `{app}`), connected since {since}"
            )
        }))
    }

    /// The runner recorded by the session that holds the plan's lock now
    /// (`user@host pid N`). A row written before that session started is a
    /// previous runner's (a killed runner leaves its row behind), so it is not
    /// returned; nor is anything while the holder has not recorded itself yet.
    pub async fn recorded_holder(
        &self,
        c: &impl GenericClient,
        plan: &str,
    ) -> Result<Option<String>, Error> {
        let row = c
            .row_opt(
                &self.sql(
                    "SELECT p.runner FROM __SCHEMA__.plans p
                     WHERE p.id = $1 AND p.runner IS NOT NULL
                       AND p.runner_since >= (
                           SELECT a.backend_start
                           FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                             AND ((l.classid::bigint << 32) | l.objid::bigint) = (hashtextextended($2, 0) & x'ffffffffffffffff'::bigint))",
                ),
                &[&plan, &self.lock_name(plan)],
            )
            .await?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// Records who runs the plan now (`None` when the run ends).
    pub async fn set_runner(
        &self,
        c: &impl GenericClient,
        plan: &str,
        runner: Option<&str>,
    ) -> Result<(), Error> {
        c.exec(
            &self.sql("UPDATE __SCHEMA__.plans SET runner = $2, runner_since = CASE WHEN $2::text IS NULL THEN NULL ELSE now() END WHERE id = $1"),
            &[&plan, &runner],
        )
        .await?;
        Ok(())
    }

    /// The operator's live overrides for a step (`pgshift throttle`).
    pub async fn overrides(
        &self,
        c: &impl GenericClient,
        plan: &str,
        step: &str,
    ) -> Result<Overrides, Error> {
        let row = c
            .row_opt(
                &self
                    .sql("SELECT overrides FROM __SCHEMA__.steps WHERE plan_id = $1 AND name = $2"),
                &[&plan, &step],
            )
            .await?;
        Ok(row
            .map(|r| Overrides::from_json(&r.get::<_, Json>(0)))
            .unwrap_or_default())
    }

    /// Merges `patch` into the overrides of every backfill step of the plan; returns how many.
    pub async fn merge_overrides(
        &self,
        c: &impl GenericClient,
        plan: &str,
        step: Option<&str>,
        patch: &Overrides,
    ) -> Result<u64, Error> {
        Ok(c
            .exec(
                &self.sql("UPDATE __SCHEMA__.steps SET overrides = overrides || $3 WHERE plan_id = $1 AND kind = 'backfill' AND ($2::text IS NULL OR name = $2)"),
                &[&plan, &step, &patch.to_json()],
            )
            .await?)
    }

    /// The details of the plan's latest event named `event`, if any.
    pub async fn last_event(
        &self,
        c: &impl GenericClient,
        plan: &str,
        event: &str,
    ) -> Result<Option<(String, Json)>, Error> {
        let row = c
            .row_opt(
                &self.sql("SELECT at::text, detail FROM __SCHEMA__.events WHERE plan_id = $1 AND event = $2 ORDER BY id DESC LIMIT 1"),
                &[&plan, &event],
            )
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    /// Replaces the overrides of the plan's backfill steps (all, or `step`) with
    /// `kept`; returns the overrides that were there before, per step.
    pub async fn replace_overrides(
        &self,
        c: &impl GenericClient,
        plan: &str,
        step: Option<&str>,
        edit: impl Fn(&Overrides) -> Overrides,
    ) -> Result<Vec<(String, Overrides)>, Error> {
        let rows = c
            .rows(
                &self.sql("SELECT name, overrides FROM __SCHEMA__.steps WHERE plan_id = $1 AND kind = 'backfill' AND ($2::text IS NULL OR name = $2) ORDER BY position FOR UPDATE"),
                &[&plan, &step],
            )
            .await?;
        let mut before = Vec::new();
        for r in rows {
            let name: String = r.get(0);
            let old = Overrides::from_json(&r.get::<_, Json>(1));
            let new = edit(&old);
            if new != old {
                c.exec(
                    &self.sql("UPDATE __SCHEMA__.steps SET overrides = $3 WHERE plan_id = $1 AND name = $2"),
                    &[&plan, &name, &new.to_json()],
                )
                .await?;
            }
            before.push((name, old));
        }
        Ok(before)
    }

    /// Takes the next run epoch of a registered plan (see `migrate_2.sql`).
    pub async fn take_epoch(&self, c: &impl GenericClient, plan: &str) -> Result<i64, Error> {
        Ok(c
            .row(
                &self.sql("UPDATE __SCHEMA__.plans SET run_epoch = run_epoch + 1 WHERE id = $1 RETURNING run_epoch"),
                &[&plan],
            )
            .await?
            .get(0))
    }

    /// Events of a plan, oldest first.
    pub async fn events(&self, c: &impl GenericClient, plan: &str) -> Result<Vec<EventRow>, Error> {
        let rows = c
            .rows(&self.sql("SELECT at::text, step, event, detail FROM __SCHEMA__.events WHERE plan_id = $1 ORDER BY id"), &[&plan])
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }
}

fn plan_row(r: &Row) -> PlanRow {
    PlanRow {
        id: r.get(0),
        checksum: r.get(1),
        file: r.get(2),
        status: r.get(3),
        applied_by: r.get(4),
        runner: r.get(5),
        started_at: r.get(6),
        updated_at: r.get(7),
    }
}
