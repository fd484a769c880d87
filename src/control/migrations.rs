//! Upgrades of the control schema in place: each version after the first is
//! one SQL script, applied once, in order, in one transaction with the new
//! version number, under the advisory lock that also guards the schema's
//! creation. A new schema takes the same path: `schema.sql` creates version 1,
//! and the scripts bring it up to date.
//!
//! The read-only commands upgrade too: `status` right after the binary was
//! upgraded reads the new columns. Every script is idempotent as well (`IF NOT
//! EXISTS`, `CREATE OR REPLACE`): the version row makes it run once, and running
//! it again would change nothing.

use tokio_postgres::Client;

use super::{Control, SCHEMA_VERSION};
use crate::db::{Error, OneTrip};

/// The scripts after version 1 (`schema.sql`), each with the version it brings.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (2, include_str!("migrate_2.sql")),
    (3, include_str!("migrate_3.sql")),
];

/// The advisory lock (transaction-scoped) of the control schema's creation and upgrades.
pub const LOCK_SQL: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('pgshift control schema ' || $1, 0))";

/// How long an upgrade waits for the control tables' locks. An older pgshift
/// still running a plan holds them only for a statement at a time.
const UPGRADE_LOCK_TIMEOUT: &str = "10s";

/// The scripts that bring version `from` up to [`SCHEMA_VERSION`], in order.
pub fn pending(from: i32) -> impl Iterator<Item = &'static (i32, &'static str)> {
    MIGRATIONS
        .iter()
        .filter(move |(v, _)| *v > from && *v <= SCHEMA_VERSION)
}

impl Control {
    /// Brings the control schema up to [`SCHEMA_VERSION`]; a no-op when it is there.
    pub(super) async fn bring_up_to_date(&self, client: &Client) -> Result<(), Error> {
        if self.check_version(client).await? == SCHEMA_VERSION {
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

    /// Another runner may be upgrading at the same moment: the version is read
    /// again under the lock, so each script runs exactly once.
    async fn upgrade_in_transaction(&self, client: &Client) -> Result<(), Error> {
        client.exec(LOCK_SQL, &[&self.schema]).await?;
        client
            .exec(
                "SELECT set_config('lock_timeout', $1, true)",
                &[&UPGRADE_LOCK_TIMEOUT],
            )
            .await?;
        let now = self.check_version(client).await?;
        for (version, script) in pending(now) {
            client
                .batch_execute(&self.sql(script))
                .await
                .map_err(|e| self.upgrade_refused(e.into(), *version))?;
            client
                .exec(
                    &self.sql("UPDATE __SCHEMA__.meta SET value = $1 WHERE key = 'schema_version'"),
                    &[&version.to_string()],
                )
                .await?;
        }
        Ok(())
    }

    /// The control schema's version: any this pgshift can read (1 up to [`SCHEMA_VERSION`]).
    pub(super) async fn check_version(&self, client: &Client) -> Result<i32, Error> {
        let v: Option<String> = client
            .row_opt(
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
            Some(Ok(n)) if (1..=SCHEMA_VERSION).contains(&n) => Ok(n),
            Some(Ok(n)) if n > SCHEMA_VERSION => Err(Error::Refused(format!(
                "the control schema `{}` has version {n}, newer than this pgshift understands ({SCHEMA_VERSION}); upgrade pgshift",
                self.schema
            ))),
            _ => Err(Error::Refused(format!(
                "the control schema `{}` has no readable version; it was not created by pgshift",
                self.schema
            ))),
        }
    }

    fn upgrade_refused(&self, err: Error, version: i32) -> Error {
        let why = match err.sqlstate() {
            Some("42501") => format!(
                "The role that runs pgshift needs to own the control schema and its tables (`ALTER SCHEMA {} OWNER TO <role>`), then run the command again",
                self.quoted()
            ),
            Some("55P03") => format!(
                "Something held a control table's lock for {UPGRADE_LOCK_TIMEOUT} (an older pgshift mid-statement?); run the command again"
            ),
            _ => return err,
        };
        Error::Refused(format!(
            "cannot upgrade the control schema `{}` to version {version}: {err}. Nothing was changed. {why}",
            self.schema
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_and_end_at_the_current_one() {
        let mut expect = 2;
        for (v, _) in MIGRATIONS {
            assert_eq!(*v, expect, "migrations must be numbered 2, 3, … in order");
            expect += 1;
        }
        assert_eq!(expect - 1, SCHEMA_VERSION);
        assert_eq!(pending(1).count(), MIGRATIONS.len());
        assert_eq!(pending(SCHEMA_VERSION).count(), 0);
    }

    #[test]
    fn scripts_take_the_schema_only_through_the_placeholder() {
        for (_, script) in MIGRATIONS {
            assert!(script.contains("__SCHEMA__"));
            assert!(
                !script.contains("pgshift."),
                "a script names a schema literally"
            );
        }
    }
}
