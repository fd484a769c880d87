//! `pgshift demo`, the README's main-job command: on the default server, and on
//! a throwaway cluster when no server answers.

use crate::harness::*;

/// With the server at hand (the tests' DATABASE_URL): the demo runs to its summary.
#[test]
fn demo_runs_to_the_end_on_the_server() {
    let database = format!("{}demo", prefix());
    let o = pgshift_with_env(
        &[
            "--progress",
            "never",
            "demo",
            "--fresh",
            "--leads",
            "3000",
            "--database",
            &database,
        ],
        &[("DATABASE_URL", &server_url())],
    );
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stdout(&o), stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("3000 of 3000 leads carry the right email_hash"),
        "{out}"
    );
    let err = stderr(&o);
    assert!(
        err.contains("passed by pgshift demo, on the operator's behalf"),
        "{err}"
    );
    // Loading the fixtures says what it loads while it does.
    assert!(
        err.contains("fixtures 1/") && err.contains(": leads ("),
        "{err}"
    );
    assert!(
        out.contains("3. this run: the backfill went through 3000 rows"),
        "{out}"
    );
    // The next command, as it can be run from here (no `pgshift` on the PATH).
    let exe = bin().canonicalize().unwrap();
    let cwd = std::env::current_dir().unwrap().canonicalize().unwrap();
    let program = match exe.strip_prefix(&cwd) {
        Ok(rel) => format!("./{}", rel.display()),
        Err(_) => exe.display().to_string(),
    };
    assert!(
        out.contains(&format!("{program} status 0002_leads_email_hash --events")),
        "{out}"
    );
    // A second run reuses the database and finds both plans done.
    let o = pgshift_with_env(
        &[
            "--progress",
            "never",
            "demo",
            "--leads",
            "3000",
            "--database",
            &database,
        ],
        &[("DATABASE_URL", &server_url())],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("has already succeeded"),
        "{}",
        stderr(&o)
    );
    // It does not claim that a backfill ran.
    assert!(
        stdout(&o)
            .contains("3. nothing ran this time: 0002_leads_email_hash had already succeeded here"),
        "{}",
        stdout(&o)
    );
    assert!(
        !stdout(&o).contains("this run: the backfill went through"),
        "{}",
        stdout(&o)
    );
}

/// No DATABASE_URL and nothing at 127.0.0.1:5432 (a network namespace of its own,
/// where the loopback has no server): the demo starts and removes a throwaway cluster.
#[test]
fn demo_starts_a_throwaway_server_when_none_answers() {
    let script = format!(
        "ip link set lo up && exec {} --progress never demo --leads 2000",
        bin().display()
    );
    let o = std::process::Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .env_remove("DATABASE_URL")
        .output()
        .expect("run unshare");
    let err = stderr(&o);
    assert!(
        !err.contains("unshare failed") && !err.contains("Operation not permitted"),
        "this test needs `unshare -n` (root, or user namespaces) to hide the local server: {err}"
    );
    assert_eq!(o.status.code(), Some(0), "{}\n{err}", stdout(&o));
    assert!(err.contains("started a throwaway PostgreSQL"), "{err}");
    assert!(
        stdout(&o).contains("2000 of 2000 leads carry the right email_hash"),
        "{}",
        stdout(&o)
    );
}
