//! The table lock a statement takes, read from squawk's parse of it: what
//! `plan show` prints beside each statement, so that an operator sees before
//! the run which step holds ACCESS EXCLUSIVE (every query on the table waits)
//! and which only SHARE UPDATE EXCLUSIVE (reads and writes go on).
//!
//! The modes are PostgreSQL's (15; the table "Conflicting Lock Modes" and each
//! command's page); where a statement takes several, the strongest is given.

use squawk_syntax::ast::AstNode;
use squawk_syntax::{SourceFile, SyntaxKind, SyntaxNode};

/// PostgreSQL's table lock modes, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Mode {
    AccessShare,
    RowShare,
    RowExclusive,
    ShareUpdateExclusive,
    Share,
    ShareRowExclusive,
    Exclusive,
    AccessExclusive,
}

impl Mode {
    /// The mode as PostgreSQL names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::AccessShare => "ACCESS SHARE",
            Mode::RowShare => "ROW SHARE",
            Mode::RowExclusive => "ROW EXCLUSIVE",
            Mode::ShareUpdateExclusive => "SHARE UPDATE EXCLUSIVE",
            Mode::Share => "SHARE",
            Mode::ShareRowExclusive => "SHARE ROW EXCLUSIVE",
            Mode::Exclusive => "EXCLUSIVE",
            Mode::AccessExclusive => "ACCESS EXCLUSIVE",
        }
    }

    /// What the application notices while the lock is held.
    pub fn effect(self) -> &'static str {
        match self {
            Mode::AccessExclusive => "every read and write of it waits while held",
            Mode::Exclusive | Mode::ShareRowExclusive | Mode::Share => {
                "writes to it wait while held; reads go on"
            }
            Mode::ShareUpdateExclusive => "reads and writes go on; other DDL and VACUUM wait",
            Mode::RowExclusive | Mode::RowShare => "reads and writes go on",
            Mode::AccessShare => "only ACCESS EXCLUSIVE waits",
        }
    }

    fn parse(words: &str) -> Option<Mode> {
        let w = words.split_whitespace().collect::<Vec<_>>().join(" ");
        [
            Mode::AccessShare,
            Mode::RowShare,
            Mode::RowExclusive,
            Mode::ShareUpdateExclusive,
            Mode::Share,
            Mode::ShareRowExclusive,
            Mode::Exclusive,
            Mode::AccessExclusive,
        ]
        .into_iter()
        .find(|m| m.as_str().eq_ignore_ascii_case(&w))
    }
}

/// The lock a statement takes, and on what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    pub mode: Mode,
    /// `leads`, `public.leads`, or `the table of index leads_idx`.
    pub on: String,
}

impl std::fmt::Display for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} on {}: {}",
            self.mode.as_str(),
            self.on,
            self.mode.effect()
        )
    }
}

/// The strongest lock the statement takes on a table that exists before it
/// runs; `None` for statements that lock none (`CREATE TABLE`, `CREATE
/// FUNCTION`, `GRANT`, …) or that this table does not know.
pub fn lock_of(statement: &str) -> Option<Lock> {
    let file = SourceFile::parse(statement);
    let stmt = file.tree().stmts().next()?;
    let node = stmt.syntax();
    let concurrently = has_token(node, SyntaxKind::CONCURRENTLY_KW);
    let table = || first_path(node);
    let (mode, on) = match node.kind() {
        SyntaxKind::ALTER_TABLE => (alter_table(node), table()?),
        SyntaxKind::CREATE_INDEX if concurrently => (Mode::ShareUpdateExclusive, table()?),
        SyntaxKind::CREATE_INDEX => (Mode::Share, table()?),
        SyntaxKind::DROP_INDEX => (
            if concurrently {
                Mode::ShareUpdateExclusive
            } else {
                Mode::AccessExclusive
            },
            format!("the table of index {}", table()?),
        ),
        SyntaxKind::ALTER_INDEX => (
            if child(node, SyntaxKind::INDEX_RENAME_TO).is_some() {
                Mode::ShareUpdateExclusive
            } else {
                Mode::AccessExclusive
            },
            format!("index {}", table()?),
        ),
        SyntaxKind::REINDEX if concurrently => (Mode::ShareUpdateExclusive, table()?),
        SyntaxKind::REINDEX => (Mode::Share, table()?),
        SyntaxKind::CREATE_TRIGGER => (Mode::ShareRowExclusive, on_relation(node)?),
        SyntaxKind::DROP_TRIGGER
        | SyntaxKind::CREATE_POLICY
        | SyntaxKind::DROP_POLICY
        | SyntaxKind::CREATE_RULE
        | SyntaxKind::DROP_RULE => (Mode::AccessExclusive, on_relation(node)?),
        SyntaxKind::DROP_TABLE
        | SyntaxKind::TRUNCATE
        | SyntaxKind::CLUSTER
        | SyntaxKind::DROP_MATERIALIZED_VIEW
        | SyntaxKind::DROP_VIEW => (Mode::AccessExclusive, table()?),
        SyntaxKind::REFRESH if concurrently => (Mode::Exclusive, table()?),
        SyntaxKind::REFRESH => (Mode::AccessExclusive, table()?),
        SyntaxKind::VACUUM if has_token(node, SyntaxKind::FULL_KW) => {
            (Mode::AccessExclusive, table()?)
        }
        SyntaxKind::VACUUM | SyntaxKind::ANALYZE | SyntaxKind::CREATE_STATISTICS => {
            (Mode::ShareUpdateExclusive, table()?)
        }
        SyntaxKind::COMMENT_ON => (Mode::ShareUpdateExclusive, table()?),
        SyntaxKind::UPDATE | SyntaxKind::DELETE | SyntaxKind::INSERT | SyntaxKind::MERGE => {
            (Mode::RowExclusive, table()?)
        }
        SyntaxKind::LOCK => {
            let mode = child(node, SyntaxKind::LOCK_MODE_CLAUSE)
                .and_then(|c| {
                    let t = c.text().to_string().to_ascii_uppercase();
                    let inner = t
                        .trim()
                        .strip_prefix("IN")?
                        .trim_end()
                        .strip_suffix("MODE")?;
                    Mode::parse(inner)
                })
                .unwrap_or(Mode::AccessExclusive);
            (mode, table()?)
        }
        _ => return None,
    };
    Some(Lock { mode, on })
}

/// The strongest lock of an `ALTER TABLE`'s actions.
fn alter_table(node: &SyntaxNode) -> Mode {
    node.children()
        .filter(|a| a.kind() != SyntaxKind::TABLE_RELATION_NAME)
        .map(|a| match a.kind() {
            SyntaxKind::VALIDATE_CONSTRAINT
            | SyntaxKind::CLUSTER_ON
            | SyntaxKind::SET_WITHOUT_CLUSTER
            | SyntaxKind::SET_OPTIONS
            | SyntaxKind::RESET_OPTIONS
            | SyntaxKind::ATTACH_PARTITION => Mode::ShareUpdateExclusive,
            SyntaxKind::ALTER_COLUMN
                if a.children().any(|c| {
                    matches!(
                        c.kind(),
                        SyntaxKind::SET_STATISTICS
                            | SyntaxKind::SET_OPTIONS
                            | SyntaxKind::RESET_OPTIONS
                    )
                }) =>
            {
                Mode::ShareUpdateExclusive
            }
            SyntaxKind::DETACH_PARTITION
                if child(&a, SyntaxKind::DETACH_CONCURRENTLY).is_some() =>
            {
                Mode::ShareUpdateExclusive
            }
            SyntaxKind::ADD_CONSTRAINT
                if child(&a, SyntaxKind::FOREIGN_KEY_CONSTRAINT).is_some() =>
            {
                Mode::ShareRowExclusive
            }
            SyntaxKind::ENABLE_TRIGGER
            | SyntaxKind::ENABLE_ALWAYS_TRIGGER
            | SyntaxKind::ENABLE_REPLICA_TRIGGER
            | SyntaxKind::DISABLE_TRIGGER => Mode::ShareRowExclusive,
            _ => Mode::AccessExclusive,
        })
        .max()
        .unwrap_or(Mode::AccessExclusive)
}

fn child(node: &SyntaxNode, kind: SyntaxKind) -> Option<SyntaxNode> {
    node.children().find(|c| c.kind() == kind)
}

fn has_token(node: &SyntaxNode, kind: SyntaxKind) -> bool {
    node.descendants_with_tokens().any(|t| t.kind() == kind)
}

/// The first name of a table (or index, view) in the statement, as written.
fn first_path(node: &SyntaxNode) -> Option<String> {
    node.descendants()
        .find(|d| d.kind() == SyntaxKind::PATH_REF)
        .map(|p| p.text().to_string().trim().to_string())
}

/// The table after `ON` (triggers, policies, rules).
fn on_relation(node: &SyntaxNode) -> Option<String> {
    child(node, SyntaxKind::ON_RELATION)
        .and_then(|r| first_path(&r))
        .or_else(|| first_path(node))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(sql: &str) -> Option<(&'static str, String)> {
        lock_of(sql).map(|l| (l.mode.as_str(), l.on))
    }

    #[test]
    fn alter_table_takes_access_exclusive_unless_it_only_validates() {
        assert_eq!(
            mode("ALTER TABLE leads ADD COLUMN h text"),
            Some(("ACCESS EXCLUSIVE", "leads".into()))
        );
        assert_eq!(
            mode("ALTER TABLE public.leads VALIDATE CONSTRAINT c"),
            Some(("SHARE UPDATE EXCLUSIVE", "public.leads".into()))
        );
        assert_eq!(
            mode("ALTER TABLE leads ADD CONSTRAINT c CHECK (h IS NOT NULL) NOT VALID"),
            Some(("ACCESS EXCLUSIVE", "leads".into()))
        );
        assert_eq!(
            mode(
                "ALTER TABLE leads ADD CONSTRAINT f FOREIGN KEY (p) REFERENCES personas (id) NOT VALID"
            ),
            Some(("SHARE ROW EXCLUSIVE", "leads".into()))
        );
        // The strongest action wins.
        assert_eq!(
            mode("ALTER TABLE leads VALIDATE CONSTRAINT c, ALTER COLUMN h SET NOT NULL"),
            Some(("ACCESS EXCLUSIVE", "leads".into()))
        );
        assert_eq!(
            mode("ALTER TABLE leads ALTER COLUMN h SET STATISTICS 500"),
            Some(("SHARE UPDATE EXCLUSIVE", "leads".into()))
        );
        assert_eq!(
            mode("ALTER TABLE events DETACH PARTITION events_2020 CONCURRENTLY"),
            Some(("SHARE UPDATE EXCLUSIVE", "events".into()))
        );
    }

    #[test]
    fn indexes_built_or_dropped_concurrently_let_writes_go_on() {
        assert_eq!(
            mode("CREATE INDEX CONCURRENTLY IF NOT EXISTS i ON leads (h)"),
            Some(("SHARE UPDATE EXCLUSIVE", "leads".into()))
        );
        assert_eq!(
            mode("CREATE INDEX i ON leads (h)"),
            Some(("SHARE", "leads".into()))
        );
        assert_eq!(
            mode("DROP INDEX CONCURRENTLY IF EXISTS i"),
            Some(("SHARE UPDATE EXCLUSIVE", "the table of index i".into()))
        );
        assert_eq!(
            mode("DROP INDEX i"),
            Some(("ACCESS EXCLUSIVE", "the table of index i".into()))
        );
        assert_eq!(
            mode("REINDEX INDEX CONCURRENTLY i"),
            Some(("SHARE UPDATE EXCLUSIVE", "i".into()))
        );
    }

    #[test]
    fn triggers_data_and_explicit_locks() {
        assert_eq!(
            mode("CREATE TRIGGER t BEFORE UPDATE ON leads FOR EACH ROW EXECUTE FUNCTION f()"),
            Some(("SHARE ROW EXCLUSIVE", "leads".into()))
        );
        assert_eq!(
            mode("DROP TRIGGER IF EXISTS t ON leads"),
            Some(("ACCESS EXCLUSIVE", "leads".into()))
        );
        assert_eq!(
            mode("UPDATE leads SET h = NULL"),
            Some(("ROW EXCLUSIVE", "leads".into()))
        );
        assert_eq!(
            mode("LOCK TABLE leads IN SHARE MODE"),
            Some(("SHARE", "leads".into()))
        );
        assert_eq!(
            mode("TRUNCATE leads"),
            Some(("ACCESS EXCLUSIVE", "leads".into()))
        );
        assert_eq!(
            mode("VACUUM FULL leads"),
            Some(("ACCESS EXCLUSIVE", "leads".into()))
        );
        assert_eq!(
            mode("VACUUM leads"),
            Some(("SHARE UPDATE EXCLUSIVE", "leads".into()))
        );
    }

    #[test]
    fn new_objects_lock_no_existing_table() {
        assert_eq!(mode("CREATE TABLE t (id int)"), None);
        assert_eq!(
            mode(
                "CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$"
            ),
            None
        );
        assert_eq!(mode("GRANT SELECT ON leads TO app"), None);
    }
}
