//! Upgrades of the control schema in place: each version after the first is
//! one SQL script, applied once, in order, in one transaction with the new
//! version number, under the advisory lock that also guards the schema's
//! creation. A database that a newer pgshift has not touched yet keeps working
//! with the version it has; the first run that writes brings it up to date.
//!
//! Every script is idempotent as well (`IF NOT EXISTS`, `CREATE OR REPLACE`):
//! the version row makes it run once, and running it again would change nothing.

use tokio_postgres::Client;

use super::{Control, SCHEMA_VERSION};
use crate::db::Error;

/// The scripts after version 1 (`schema.sql`), each with the version it brings.
pub const MIGRATIONS: &[(i32, &str)] = &[(2, include_str!("v2.sql"))];

/// The advisory lock (transaction-scoped) of the control schema's creation and upgrades.
pub const LOCK_SQL: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('pgshift control schema ' || $1, 0))";

/// The scripts that bring version `from` up to [`SCHEMA_VERSION`], in order.
pub fn pending(from: i32) -> impl Iterator<Item = &'static (i32, &'static str)> {
    MIGRATIONS
        .iter()
        .filter(move |(v, _)| *v > from && *v <= SCHEMA_VERSION)
}

impl Control {
    /// Brings the control schema from version `from` up to [`SCHEMA_VERSION`].
    ///
    /// Another runner may be upgrading at the same moment: the version is read
    /// again under the lock, so each script runs exactly once.
    pub(super) async fn upgrade(&self, client: &mut Client, from: i32) -> Result<(), Error> {
        let tx = client.transaction().await?;
        tx.execute(LOCK_SQL, &[&self.schema]).await?;
        let now: String = tx
            .query_one(
                &self.sql("SELECT value FROM __SCHEMA__.meta WHERE key = 'schema_version'"),
                &[],
            )
            .await?
            .get(0);
        let now: i32 = now.parse().unwrap_or(from);
        for (version, script) in pending(now) {
            tx.batch_execute(&self.sql(script))
                .await
                .map_err(|e| self.upgrade_refused(e.into(), *version))?;
            tx.execute(
                &self.sql("UPDATE __SCHEMA__.meta SET value = $1 WHERE key = 'schema_version'"),
                &[&version.to_string()],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    fn upgrade_refused(&self, err: Error, version: i32) -> Error {
        if err.sqlstate() != Some("42501") {
            return err;
        }
        Error::Refused(format!(
            "cannot upgrade the control schema `{}` to version {version}: {err}. Nothing was changed. The role that runs pgshift needs CREATE on that schema (usually: make it the owner, `ALTER SCHEMA {} OWNER TO <role>`), then run the command again",
            self.schema,
            self.quoted()
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
