//! Upgrading a control schema in place: an older pgshift's schema is brought to
//! this version the first time this version touches it, by the read-only
//! commands too (`status` right after an upgrade of the binary must work).
//!
//! Each migration is a script that takes version `n - 1` to `n`. They run in one
//! transaction under the same advisory lock that serialises the creation of the
//! schema, after re-reading the version under that lock, so two runners that
//! upgrade at once run each script once; every statement is written to be safe
//! to run twice as well.

use tokio_postgres::Client;

use super::Control;
use crate::db::Error;

/// Version → the script that produces it from the version before.
pub const MIGRATIONS: &[(i32, &str)] = &[(2, include_str!("migrate_2.sql"))];

/// The version after the last migration.
pub const CURRENT: i32 = 2;

/// How long an upgrade waits for the control tables' locks. An older pgshift
/// still running a plan holds them only for a statement at a time.
const UPGRADE_LOCK_TIMEOUT: &str = "10s";

impl Control {
    /// The schema's recorded version, or a refusal naming what is wrong with it.
    async fn version(&self, client: &Client) -> Result<i32, Error> {
        let v: Option<String> = client
            .query_opt(
                &self.sql("SELECT value FROM __SCHEMA__.meta WHERE key = 'schema_version'"),
                &[],
            )
            .await
            .map_err(|e| {
                let err = Error::from(e);
                if err.sqlstate() == Some("42501") {
                    Error::Refused(format!("cannot read the control schema `{}`: {err}. The role needs USAGE on the schema and SELECT/INSERT/UPDATE on its tables (usually: make it the owner)", self.schema))
                } else {
                    err
                }
            })?
            .map(|r| r.get(0));
        match v.as_deref().map(str::parse::<i32>) {
            Some(Ok(n)) if n > CURRENT => Err(Error::Refused(format!(
                "the control schema `{}` has version {n}, newer than this pgshift understands ({CURRENT}); upgrade pgshift",
                self.schema
            ))),
            Some(Ok(n)) if n >= 1 => Ok(n),
            _ => Err(Error::Refused(format!(
                "the control schema `{}` has no readable version; it was not created by pgshift",
                self.schema
            ))),
        }
    }

    /// Brings an existing control schema to [`CURRENT`]; a no-op when it is there.
    pub(super) async fn upgrade(&self, client: &Client) -> Result<(), Error> {
        if self.version(client).await? == CURRENT {
            return Ok(());
        }
        client.batch_execute("BEGIN").await?;
        let result = self.upgrade_in_transaction(client).await;
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = client.batch_execute(end).await;
        result?;
        ended?;
        Ok(())
    }

    async fn upgrade_in_transaction(&self, client: &Client) -> Result<(), Error> {
        client
            .execute(
                "SELECT pg_advisory_xact_lock(hashtextextended('pgshift control schema ' || $1, 0)), set_config('lock_timeout', $2, true)",
                &[&self.schema, &UPGRADE_LOCK_TIMEOUT],
            )
            .await?;
        // Another runner may have upgraded it while this one waited for the lock.
        let from = self.version(client).await?;
        for (to, script) in MIGRATIONS.iter().filter(|(to, _)| *to > from) {
            client.batch_execute(&self.sql(script)).await.map_err(|e| {
                let err = Error::from(e);
                Error::Refused(format!(
                    "cannot upgrade the control schema `{}` from version {} to {to}: {err}. Nothing was changed; the role needs to own the control schema's tables",
                    self.schema,
                    to - 1
                ))
            })?;
        }
        Ok(())
    }
}
