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
