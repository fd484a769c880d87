//! The first connection of a command, opened before anything else, so that a
//! connection that never opened is reported as what it is: nothing was changed,
//! here is the server's reason, here is what to check. (A connection lost
//! later, mid-run, is the runner's business: it reconnects or stops resumably.)
//!
//! Exit codes: when the server answered and refused (a wrong password, an
//! unknown role, a database that does not exist, a TLS setup it rejects), a
//! retry cannot help: exit 2, like any other usage error. When nothing answered
//! (the server is down or restarting, the host unreachable, no free connection
//! slot), a retry later may: exit 3.

use tokio_postgres::config::Host;

use super::output::{Level, Line};
use crate::db;
use crate::exit::Exit;

/// Opens and closes one connection to `target`; on failure says why and what to
/// check, and returns the exit code.
pub async fn probe(target: &db::Target) -> Result<(), Exit> {
    match db::connect(target).await {
        Ok(_client) => Ok(()),
        Err(e) => Err(report(target, &e)),
    }
}

/// Reports a connection that could not be opened; returns its exit code.
pub fn report(target: &db::Target, e: &db::Error) -> Exit {
    let (reason, sqlstate) = match e {
        db::Error::Connect(f) => (f.reason.clone(), f.sqlstate.clone()),
        other => (other.to_string(), None),
    };
    let (check, code) = advice(target, &reason, sqlstate.as_deref());
    Line::error(
        "cannot_connect",
        format!(
            "cannot connect to {}: {reason}; nothing was changed",
            target.display
        ),
    )
    .field("sqlstate", &sqlstate)
    .field("retry_may_help", code == Exit::Resumable)
    .emit();
    Line::plain(Level::Error, "next", check).emit();
    code
}

/// What to check, and whether a retry may help (exit 3) or not (exit 2).
fn advice(target: &db::Target, reason: &str, sqlstate: Option<&str>) -> (String, Exit) {
    let user = target.config.get_user().unwrap_or("(your login name)");
    let dbname = target.config.get_dbname().unwrap_or(user);
    let at = address(target);
    let url = "--database-url or DATABASE_URL";
    match sqlstate {
        Some("28P01") => (
            format!(
                "check the password of user `{user}` in {url}; a retry will not help until it is right"
            ),
            Exit::Invalid,
        ),
        Some(s) if s.starts_with("28") => (
            format!(
                "check the user name `{user}` in {url}, and that the server's pg_hba.conf lets it connect to database `{dbname}` from this host; a retry will not help until that is fixed"
            ),
            Exit::Invalid,
        ),
        Some("3D000") => (
            format!(
                "database `{dbname}` does not exist on {at}: check the name at the end of {url} (`psql -l` lists the databases); a retry will not help"
            ),
            Exit::Invalid,
        ),
        Some("53300") | Some("57P03") | Some("57P01") => (
            format!(
                "the server at {at} is busy, starting or shutting down; run the same command again in a moment"
            ),
            Exit::Resumable,
        ),
        Some(_) => (
            format!("the server at {at} refused the connection; check {url}"),
            Exit::Invalid,
        ),
        None if reason.contains("TLS") || reason.to_lowercase().contains("certificate") => (
            format!(
                "the TLS handshake with {at} failed: check sslmode in {url} (and sslrootcert for verify-ca or verify-full); a retry will not help"
            ),
            Exit::Invalid,
        ),
        None => (
            format!(
                "nothing answered at {at}: check that the server is up and that the host and port in {url} are right (`pg_isready -h {} -p {}`); once it answers, run the same command again",
                host(target),
                target.port()
            ),
            Exit::Resumable,
        ),
    }
}

fn host(target: &db::Target) -> String {
    match target.config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    }
}

fn address(target: &db::Target) -> String {
    format!("{}:{}", host(target), target.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> db::Target {
        db::Target::parse("postgres://app:secret@db.internal:6432/shop").unwrap()
    }

    #[test]
    fn a_refusal_is_not_worth_a_retry() {
        let (check, code) = advice(&target(), "password authentication failed", Some("28P01"));
        assert_eq!(code, Exit::Invalid);
        assert!(check.contains("password of user `app`"), "{check}");
        let (check, code) = advice(&target(), "database \"shop\" does not exist", Some("3D000"));
        assert_eq!(code, Exit::Invalid);
        assert!(
            check.contains("database `shop` does not exist on db.internal:6432"),
            "{check}"
        );
        assert!(!check.contains("secret"));
    }

    #[test]
    fn silence_may_pass() {
        let (check, code) = advice(
            &target(),
            "error connecting to server: Connection refused",
            None,
        );
        assert_eq!(code, Exit::Resumable);
        assert!(
            check.contains("pg_isready -h db.internal -p 6432"),
            "{check}"
        );
        let (_, code) = advice(
            &target(),
            "error performing TLS handshake: invalid peer certificate",
            None,
        );
        assert_eq!(code, Exit::Invalid);
    }
}
