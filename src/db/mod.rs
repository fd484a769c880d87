//! Connections: parsing the URL (TLS modes included), the pool, the dedicated
//! connection that holds a plan's lock, per-transaction timeouts, and the
//! classification of errors into retry, resume or stop.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, Config, GenericClient};

mod typed;
pub use typed::{OneTrip, Param, PgType};

/// Why talking to the database failed, classified for the caller.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid database URL: {0}")]
    Url(String),
    #[error("cannot connect to {}: {}", .0.target, .0.reason)]
    Connect(Box<ConnectFailure>),
    #[error("{0}")]
    Refused(String),
    #[error("{}", describe(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Pool(String),
}

/// A connection that could not be opened: where to, why, and the server's
/// SQLSTATE when it answered and refused (a bad password, no such database).
#[derive(Debug)]
pub struct ConnectFailure {
    pub target: String,
    pub reason: String,
    pub sqlstate: Option<String>,
}

impl Error {
    /// The SQLSTATE of a server error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Error::Postgres(e) => e.code().map(|c| c.code()),
            _ => None,
        }
    }

    /// Lock not available, deadlock, serialization failure: worth another try after a pause.
    pub fn is_retryable(&self) -> bool {
        matches!(self.sqlstate(), Some("55P03" | "40P01" | "40001"))
    }

    /// The statement was cancelled (statement_timeout or a cancel request).
    pub fn is_canceled(&self) -> bool {
        self.sqlstate() == Some("57014")
    }

    /// The server cancelled the statement because it ran past `statement_timeout`
    /// (57014 is also a cancel request: the server's message tells them apart).
    pub fn is_statement_timeout(&self) -> bool {
        match self {
            Error::Postgres(e) => e.as_db_error().is_some_and(|d| {
                d.code() == &SqlState::QUERY_CANCELED && d.message().contains("statement timeout")
            }),
            _ => false,
        }
    }

    /// The connection is gone (server restart, network cut, backend terminated).
    ///
    /// Only what a reconnect can cure counts: a closed socket, an I/O error or a
    /// timeout talking to the server, SQLSTATE class 08, and 57P01–57P03 (the server
    /// shut down or is starting). A wrong row count, a value of the wrong type, a
    /// syntax or permission error is the step's own failure: retrying it would
    /// fail the same way forever.
    pub fn is_connection_lost(&self) -> bool {
        match self {
            Error::Postgres(e) => {
                if let Some(c) = e.code() {
                    return c == &SqlState::ADMIN_SHUTDOWN
                        || c == &SqlState::CRASH_SHUTDOWN
                        || c == &SqlState::CANNOT_CONNECT_NOW
                        || c.code().starts_with("08");
                }
                e.is_closed()
                    || std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
                    || matches!(
                        e.to_string().as_str(),
                        "error communicating with the server"
                            | "error connecting to server"
                            | "timeout waiting for server"
                    )
            }
            Error::Connect(_) => true,
            Error::Pool(_) => true,
            _ => false,
        }
    }
}

/// A server error in one line: message, SQLSTATE, and detail/hint when the server gives them.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(&format!("; detail: {d}"));
            }
            if let Some(h) = db.hint() {
                s.push_str(&format!("; hint: {h}"));
            } else if db.code() == &SqlState::INSUFFICIENT_PRIVILEGE {
                // The server names the object; say which privilege pgshift's work needs on it.
                s.push_str(
                    "; pgshift needs ownership of every table a plan changes, CREATE on the schema \
                     where a trigger step puts its function, and CREATE on the database (or \
                     ownership of the control schema); see README, Privileges",
                );
            }
            s
        }
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s.push_str(&format!(": {inner}"));
                src = inner.source();
            }
            s
        }
    }
}

/// How to secure the connection, as libpq's `sslmode` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A parsed database URL: the driver config, the TLS mode, and a printable form.
#[derive(Clone)]
pub struct Target {
    pub config: Config,
    pub ssl: SslMode,
    pub root_cert: Option<String>,
    /// The URL with its password replaced by `***`: the only form that is ever printed.
    pub display: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// The server to use when neither `--database-url` nor `DATABASE_URL` is given.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

impl Target {
    /// Parses a `postgres://` URL or a `key=value` connection string.
    pub fn parse(url: &str) -> Result<Target, Error> {
        let display = redact(url);
        let mut ssl = SslMode::Prefer;
        let mut root_cert = None;
        let rest = strip_params(url, |k, v| match k {
            "sslmode" => {
                ssl = match v {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    _ => {
                        return Some(format!(
                            "sslmode `{v}` is not one of disable, allow, prefer, require, verify-ca, verify-full"
                        ));
                    }
                };
                None
            }
            "sslrootcert" => {
                root_cert = Some(v.to_string());
                None
            }
            _ => None,
        })?;
        let mut config: Config = rest.parse().map_err(|e: tokio_postgres::Error| {
            Error::Url(format!("{} ({display})", describe(&e)))
        })?;
        if config.get_application_name().is_none() {
            config.application_name("pgshift");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.keepalives_idle(Duration::from_secs(30));
        config.ssl_mode(match ssl {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        Ok(Target {
            config,
            ssl,
            root_cert,
            display,
        })
    }

    /// The port the URL names (5432 if none).
    pub fn port(&self) -> u16 {
        self.config.get_ports().first().copied().unwrap_or(5432)
    }

    /// The same server, another database.
    pub fn with_dbname(&self, db: &str) -> Target {
        let mut t = self.clone();
        t.config.dbname(db);
        let (base, q) = match t.display.split_once('?') {
            Some((b, q)) => (b.to_string(), Some(q.to_string())),
            None => (t.display.clone(), None),
        };
        if let Some(i) = base.find("://") {
            let host_start = i + 3;
            let end = base[host_start..]
                .find('/')
                .map(|j| host_start + j)
                .unwrap_or(base.len());
            t.display = format!(
                "{}/{db}{}",
                &base[..end],
                q.map(|q| format!("?{q}")).unwrap_or_default()
            );
        }
        t
    }

    /// Refuses a transaction-mode pooler, where a session advisory lock means nothing.
    pub fn check_not_transaction_pooler(&self) -> Result<(), Error> {
        if self.port() == 6543 {
            return Err(Error::Refused(format!(
                "{} uses port 6543, Supabase's transaction-mode pooler: session advisory locks and SET LOCAL do not survive it, so pgshift cannot guarantee one runner per plan; use the direct connection on port 5432 (Supabase: Project Settings → Database → Connection string → Direct)",
                self.display
            )));
        }
        Ok(())
    }
}

/// Removes `key=value` parameters that the driver does not understand, handing each to `take`.
fn strip_params(
    url: &str,
    mut take: impl FnMut(&str, &str) -> Option<String>,
) -> Result<String, Error> {
    if url.contains("://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok(url.to_string());
        };
        let mut keep = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if matches!(k, "sslmode" | "sslrootcert") {
                if let Some(err) = take(k, v) {
                    return Err(Error::Url(err));
                }
            } else {
                keep.push(pair);
            }
        }
        Ok(if keep.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", keep.join("&"))
        })
    } else {
        let mut keep = Vec::new();
        for pair in url.split_whitespace() {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if matches!(k, "sslmode" | "sslrootcert") {
                if let Some(err) = take(k, v.trim_matches('\'')) {
                    return Err(Error::Url(err));
                }
            } else {
                keep.push(pair);
            }
        }
        Ok(keep.join(" "))
    }
}

/// The URL with any password replaced by `***`.
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let auth_start = scheme_end + 3;
        let host_end = out[auth_start..]
            .find(['/', '?'])
            .map(|i| auth_start + i)
            .unwrap_or(out.len());
        if let Some(at) = out[auth_start..host_end].rfind('@') {
            let userinfo = &out[auth_start..auth_start + at];
            if let Some(colon) = userinfo.find(':') {
                out.replace_range(auth_start + colon + 1..auth_start + at, "***");
            }
        }
    }
    // `password=…` in a query string or a key=value string.
    let mut result = String::new();
    let mut rest = out.as_str();
    while let Some(i) = rest.find("password=") {
        result.push_str(&rest[..i + 9]);
        rest = &rest[i + 9..];
        let end = rest.find(['&', ' ']).unwrap_or(rest.len());
        result.push_str("***");
        rest = &rest[end..];
    }
    result.push_str(rest);
    result
}

mod tls {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, Error, SignatureScheme};

    /// `sslmode=require`/`prefer`: encrypted, the certificate not checked (libpq's meaning).
    #[derive(Debug)]
    pub struct AcceptAny(pub Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `sslmode=verify-ca`: the chain must lead to a trusted root; the host name is not checked.
    #[derive(Debug)]
    pub struct ChainOnly(pub Arc<rustls::client::WebPkiServerVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            e: &CertificateDer<'_>,
            i: &[CertificateDer<'_>],
            n: &ServerName<'_>,
            o: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match self.0.verify_server_cert(e, i, n, o, now) {
                Err(Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
                | Err(Error::InvalidCertificate(
                    rustls::CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }
        fn verify_tls12_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(m, c, d)
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &CertificateDer<'_>,
            d: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(m, c, d)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

/// The TLS connector for `target`'s sslmode.
pub fn tls_connector(target: &Target) -> Result<tokio_postgres_rustls::MakeRustlsConnect, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Url(format!("TLS setup: {e}")))?;
    let config = match target.ssl {
        SslMode::Disable | SslMode::Prefer | SslMode::Require
            if target.root_cert.is_none() || target.ssl != SslMode::Require =>
        {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(tls::AcceptAny(provider)))
                .with_no_client_auth()
        }
        _ => {
            let mut roots = rustls::RootCertStore::empty();
            match &target.root_cert {
                Some(path) => {
                    use rustls::pki_types::pem::PemObject;
                    let certs =
                        rustls::pki_types::CertificateDer::pem_file_iter(path).map_err(|e| {
                            Error::Url(format!("cannot read sslrootcert `{path}`: {e}"))
                        })?;
                    for c in certs {
                        let c = c.map_err(|e| {
                            Error::Url(format!("cannot read sslrootcert `{path}`: {e}"))
                        })?;
                        roots
                            .add(c)
                            .map_err(|e| Error::Url(format!("sslrootcert `{path}`: {e}")))?;
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let roots = Arc::new(roots);
            if target.ssl == SslMode::VerifyFull {
                builder.with_root_certificates(roots).with_no_client_auth()
            } else {
                let v =
                    rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider)
                        .build()
                        .map_err(|e| Error::Url(format!("TLS setup: {e}")))?;
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(tls::ChainOnly(v)))
                    .with_no_client_auth()
            }
        }
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// Opens one connection (not from the pool): for the plan lock and for cancel requests.
pub async fn connect(target: &Target) -> Result<Client, Error> {
    let tls = tls_connector(target)?;
    let (client, conn) = target
        .config
        .connect(tls)
        .await
        .map_err(|e| connect_error(target, &e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("connection closed: {e}");
        }
    });
    Ok(client)
}

fn connect_error(target: &Target, e: &tokio_postgres::Error) -> Error {
    Error::Connect(Box::new(ConnectFailure {
        target: target.display.clone(),
        reason: describe(e),
        sqlstate: e.code().map(|c| c.code().to_string()),
    }))
}

/// Opens one connection (not from the pool) and a token cancelled as soon as the
/// connection is gone (closed by the server, the network, or dropped): the plan's
/// lock lives and dies with it.
pub async fn connect_watched(
    target: &Target,
) -> Result<(Client, tokio_util::sync::CancellationToken), Error> {
    let tls = tls_connector(target)?;
    let (client, conn) = target
        .config
        .connect(tls)
        .await
        .map_err(|e| connect_error(target, &e))?;
    let gone = tokio_util::sync::CancellationToken::new();
    let token = gone.clone();
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("connection closed: {e}");
        }
        token.cancel();
    });
    Ok((client, gone))
}

/// The connection pool for step and batch work.
pub type Pool = deadpool_postgres::Pool;

/// Builds a pool of at most `size` connections to `target`.
pub fn pool(target: &Target, size: usize) -> Result<Pool, Error> {
    let tls = tls_connector(target)?;
    // Fast recycling does not reset session state: pgshift never sets session state
    // on a pooled connection (timeouts are SET LOCAL, per transaction).
    let mgr = deadpool_postgres::Manager::from_config(
        target.config.clone(),
        tls,
        deadpool_postgres::ManagerConfig {
            recycling_method: deadpool_postgres::RecyclingMethod::Fast,
        },
    );
    Pool::builder(mgr)
        .max_size(size)
        .build()
        .map_err(|e| Error::Pool(e.to_string()))
}

/// Takes a connection from the pool, saying which server could not be reached.
pub async fn get(pool: &Pool, target: &Target) -> Result<deadpool_postgres::Object, Error> {
    pool.get().await.map_err(|e| match e {
        deadpool_postgres::PoolError::Backend(e) => connect_error(target, &e),
        other => Error::Pool(format!("cannot connect to {}: {other}", target.display)),
    })
}

/// Sets `lock_timeout` and `statement_timeout` for the current transaction only.
///
/// `SET LOCAL` semantics through `set_config(…, true)`: the settings end with the
/// transaction, so a pooled connection never carries them into other work.
pub async fn set_local_timeouts(
    tx: &impl GenericClient,
    lock_timeout: Duration,
    statement_timeout: Duration,
) -> Result<(), Error> {
    tx.exec(
        "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true)",
        &[
            &format!("{}ms", lock_timeout.as_millis()),
            &format!("{}ms", statement_timeout.as_millis()),
        ],
    )
    .await?;
    Ok(())
}

/// The first wait between retries of a statement (lock timeout, lost connection).
pub const RETRY_BACKOFF_FIRST: Duration = Duration::from_millis(200);
/// The longest wait between retries.
pub const RETRY_BACKOFF_CAP: Duration = Duration::from_secs(10);

/// The wait before retry number `attempt` (1-based): doubling from the first
/// backoff to the cap, then a random part so that retries of several runners spread out.
pub fn backoff(attempt: u32) -> Duration {
    let first = RETRY_BACKOFF_FIRST.as_millis() as u64;
    let cap = RETRY_BACKOFF_CAP.as_millis() as u64;
    let exp = first
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
        .min(cap);
    // "Equal jitter": half fixed, half random.
    let jitter = rand::random_range(0..=exp / 2);
    Duration::from_millis(exp / 2 + jitter)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_survive_redaction() {
        assert_eq!(
            redact("postgres://u:s3cret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redact("postgres://u:p%40ss@h/db?sslmode=require"),
            "postgres://u:***@h/db?sslmode=require"
        );
        assert_eq!(
            redact("host=h user=u password=s3cret dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert_eq!(
            redact("postgres://h/db?password=s3cret&x=1"),
            "postgres://h/db?password=***&x=1"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
    }

    #[test]
    fn ssl_modes_parse_including_verify_full() {
        for (mode, want) in [
            ("disable", SslMode::Disable),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            let t = Target::parse(&format!("postgres://u:pw@h:5432/db?sslmode={mode}")).unwrap();
            assert_eq!(t.ssl, want);
            assert!(!t.display.contains("pw"));
        }
        assert!(Target::parse("postgres://h/db?sslmode=bogus").is_err());
    }

    #[test]
    fn transaction_pooler_port_is_refused() {
        let t = Target::parse("postgres://u@db.example.supabase.co:6543/postgres").unwrap();
        let e = t.check_not_transaction_pooler().unwrap_err().to_string();
        assert!(e.contains("5432"), "{e}");
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff(1) <= Duration::from_millis(200));
        assert!(backoff(1) >= Duration::from_millis(100));
        for a in 1..40 {
            assert!(backoff(a) <= RETRY_BACKOFF_CAP);
        }
        assert!(backoff(30) >= RETRY_BACKOFF_CAP / 2);
    }

    #[test]
    fn with_dbname_keeps_the_rest() {
        let t = Target::parse("postgres://u:pw@h:5433/postgres?sslmode=disable")
            .unwrap()
            .with_dbname("demo");
        assert_eq!(t.display, "postgres://u:***@h:5433/demo?sslmode=disable");
        assert_eq!(t.config.get_dbname(), Some("demo"));
    }
}
