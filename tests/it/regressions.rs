//! Regression tests, each named after what broke.

use crate::harness::*;

/// A backfill that failed verification finished its range; resuming after fixing the
/// plan only re-ran the verify (and failed again) instead of making a new pass.
#[tokio::test]
async fn resume_after_failed_verify_makes_a_new_pass() {
    let db = TestDb::create("reg_failed_verify_new_pass").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL, h text); INSERT INTO items SELECT g, g, NULL FROM generate_series(1, 1200) g;").await;
    let body = |set: &str| {
        format!(
            "id: verify_pass\nphases:\n  backfill:\n    - name: fill\n      backfill:\n        table: items\n        set: {{ {set} }}\n        where: h IS NULL OR v > 1000\n        batch_size: 500\n      allow: {{ backfill-without-dual-write: \"test table, no writers\" }}\n"
        )
    };
    // The mistake: `where` also selects v > 1000, which `set` never changes.
    let file = plan_file("reg_verify", "verify_pass.yaml", &body("h: \"'x'\""));
    let o = db.pgshift(&[
        "--progress",
        "never",
        "plan",
        "apply",
        file.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("200 row(s) missed"), "{}", stderr(&o));
    // The fix: `set` now clears the condition for those rows too.
    plan_file(
        "reg_verify",
        "verify_pass.yaml",
        &body("h: \"'x'\", v: \"least(v, 1000)\""),
    );
    let o = db.pgshift(&[
        "--progress",
        "never",
        "resume",
        file.to_str().unwrap(),
        "--accept-changed",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("starting a fresh pass"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE h IS NULL OR v > 1000")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64(
            "SELECT count(*) FROM pgshift.events WHERE event = 'backfill_pass_restarted'"
        )
        .await,
        1
    );
}

/// A server restart in the middle of a transactional step stopped the whole run at
/// exit 3 (only the backfill workers reconnected). The runner now reconnects,
/// re-takes its lock and reruns the step, which had committed nothing.
#[tokio::test]
async fn server_restart_mid_step_reconnects_and_completes() {
    let cluster = crate::cluster::Cluster::primary("reg_reconnect");
    let admin = connect(&cluster.url("postgres")).await;
    admin
        .batch_execute("CREATE DATABASE reconnect")
        .await
        .unwrap();
    let url = cluster.url("reconnect");
    let c = connect(&url).await;
    c.batch_execute("CREATE TABLE side_effects (step text NOT NULL)")
        .await
        .unwrap();
    let file = plan_file(
        "reg_reconnect",
        "reconnect.yaml",
        "id: reconnect\nphases:\n  expand:\n    - name: slow\n      sql: |\n        INSERT INTO side_effects VALUES ('slow');\n        SELECT pg_sleep(2)\n      rollback: DELETE FROM side_effects WHERE step = 'slow'\n    - name: after\n      sql: INSERT INTO side_effects VALUES ('after')\n      rollback: DELETE FROM side_effects WHERE step = 'after'\n",
    );
    let child = std::process::Command::new(bin())
        .args([
            "--progress",
            "never",
            "plan",
            "apply",
            file.to_str().unwrap(),
        ])
        .env("DATABASE_URL", &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Restart while `slow` sleeps inside its transaction.
    let mut waited = 0;
    loop {
        let n: i64 = c
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgshift' AND query LIKE '%pg_sleep(2)%'", &[])
            .await
            .unwrap()
            .get(0);
        if n > 0 {
            break;
        }
        waited += 1;
        assert!(waited < 400, "the step never started");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    drop(c);
    cluster.restart_after(std::time::Duration::from_millis(300));
    let o = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("reconnected"), "{}", stderr(&o));
    let c = connect(&url).await;
    let rows: Vec<String> = c
        .query("SELECT step FROM side_effects ORDER BY step", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        rows,
        vec!["after", "slow"],
        "each step committed exactly once"
    );
    let reconnected: i64 = c
        .query_one(
            "SELECT count(*) FROM pgshift.events WHERE event = 'reconnected'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(reconnected, 1);
}
