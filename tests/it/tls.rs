//! TLS: a server of the test's own that refuses unencrypted connections, and
//! `sslmode=require`, `verify-ca` and `verify-full` (with `sslrootcert`) through rustls.

use std::process::Command;

use crate::cluster::Cluster;
use crate::harness::*;

fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is needed to make test certificates (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, and a server certificate it signs for `localhost` and 127.0.0.1.
fn certificates(dir: &std::path::Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=pgshift test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.crt",
        ],
    );
    // A second, unrelated CA: verification against it must fail.
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=someone else",
            "-keyout",
            "other.key",
            "-out",
            "other.crt",
        ],
    );
}

#[test]
fn tls_modes_connect_and_verify() {
    let cluster = Cluster::primary("tls");
    let data = cluster.data();
    certificates(&cluster.dir);
    for f in ["server.crt", "server.key"] {
        std::fs::copy(cluster.dir.join(f), data.join(f)).unwrap();
    }
    let _ = Command::new("chown")
        .args([
            "postgres",
            data.join("server.crt").to_str().unwrap(),
            data.join("server.key").to_str().unwrap(),
        ])
        .status();
    let _ = Command::new("chmod")
        .args(["600", data.join("server.key").to_str().unwrap()])
        .status();
    let mut conf = std::fs::read_to_string(data.join("postgresql.auto.conf")).unwrap();
    conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    std::fs::write(data.join("postgresql.auto.conf"), conf).unwrap();
    // Refuse every unencrypted TCP connection.
    let hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
    std::fs::write(
        data.join("pg_hba.conf"),
        format!("hostnossl all all 127.0.0.1/32 reject\n{hba}"),
    )
    .unwrap();
    cluster.restart_after(std::time::Duration::from_millis(100));

    let ca = cluster.dir.join("ca.crt");
    let other = cluster.dir.join("other.crt");
    let base = format!(
        "postgres://postgres:tls-secret@127.0.0.1:{}/postgres",
        cluster.port
    );
    let local = format!(
        "postgres://postgres:tls-secret@localhost:{}/postgres",
        cluster.port
    );
    let run = |url: &str| pgshift_with_env(&["status"], &[("DATABASE_URL", url)]);

    let o = run(&format!("{base}?sslmode=disable"));
    assert_ne!(
        o.status.code(),
        Some(0),
        "the server should refuse unencrypted connections"
    );
    assert!(!stderr(&o).contains("tls-secret"), "{}", stderr(&o));

    for url in [
        format!("{base}?sslmode=require"),
        format!("{base}?sslmode=verify-ca&sslrootcert={}", ca.display()),
        format!("{local}?sslmode=verify-full&sslrootcert={}", ca.display()),
    ] {
        let o = run(&url);
        assert_eq!(o.status.code(), Some(0), "{url}: {}", stderr(&o));
        assert!(!stdout(&o).contains("tls-secret") && !stderr(&o).contains("tls-secret"));
    }

    // The wrong CA, and the right CA with a host name the certificate does not carry.
    let o = run(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}",
        other.display()
    ));
    assert_ne!(
        o.status.code(),
        Some(0),
        "an untrusted certificate was accepted"
    );
    // `hostaddr` reaches the same server under a name the certificate does not carry:
    // verify-full refuses it, verify-ca (chain only) accepts it.
    let wrong_name = format!(
        "postgres://postgres@wrong-name.test:{}/postgres?hostaddr=127.0.0.1",
        cluster.port
    );
    let o = run(&format!(
        "{wrong_name}&sslmode=verify-full&sslrootcert={}",
        ca.display()
    ));
    assert_ne!(
        o.status.code(),
        Some(0),
        "a certificate for another host name was accepted"
    );
    assert!(
        stderr(&o).to_lowercase().contains("certificate"),
        "{}",
        stderr(&o)
    );
    let o = run(&format!(
        "{wrong_name}&sslmode=verify-ca&sslrootcert={}",
        ca.display()
    ));
    assert_eq!(
        o.status.code(),
        Some(0),
        "verify-ca checks the chain, not the name: {}",
        stderr(&o)
    );
}
