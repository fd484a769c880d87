//! A control schema of version 1 (as the first pgshift left it, with a backfill
//! under way) is upgraded in place by this pgshift: by two `status` commands at
//! once, then `resume` finishes the backfill from the version-1 checkpoint,
//! every row updated exactly once, and the rows version 1 counted are kept.

use pgshift::control::Status;

use crate::executor::expect_code;
use crate::harness::*;

/// The version-1 schema: `schema.sql` is that version's script, kept as the baseline.
fn v1_schema() -> String {
    include_str!("../../src/control/schema.sql")
        .replace("__SCHEMA__", "\"pgshift\"")
        .replace("__STATUSES__", &Status::sql_list())
        .replace("__RUNNING__", Status::Running.as_str())
}

const PLAN: &str = "id: up\nphases:\n  backfill:\n    - name: fill\n      allow: { backfill-without-dual-write: \"test: no application writes\" }\n      backfill:\n        table: items\n        set: \"v = md5(src), n = n + 1\"\n        batch_size: 100\n";

#[tokio::test]
async fn a_version_1_schema_with_a_backfill_under_way_is_upgraded_in_place_and_resumes() {
    let db = TestDb::create("upgrade_v1").await;
    db.exec(
        "CREATE TABLE items (id bigint PRIMARY KEY, src text NOT NULL, v text, n int NOT NULL DEFAULT 0);
         INSERT INTO items (id, src) SELECT g, 'row ' || g FROM generate_series(1, 3000) g;
         -- What version 1's batches did before it stopped: rows 1..1200, each once.
         UPDATE items SET v = md5(src), n = 1 WHERE id <= 1200;",
    )
    .await;
    db.exec(&v1_schema()).await;
    let file = plan_file("upgrade_v1", "up.yaml", PLAN);
    let plan = pgshift::plan::load(&file).unwrap();
    db.client
        .execute(
            "INSERT INTO pgshift.plans (id, checksum, file, status, applied_by) VALUES ('up', $1, $2, 'interrupted', 'v1@host')",
            &[&plan.checksum.0, &file.to_str().unwrap()],
        )
        .await
        .unwrap();
    db.exec(
        r#"INSERT INTO pgshift.steps (plan_id, position, phase, name, kind, status, attempts, checkpoint, rows_done, rows_total)
           VALUES ('up', 0, 'backfill', 'fill', 'backfill', 'interrupted', 1,
                   '{"key": ["id"], "upper_key": {"id": 3000}, "workers": 1, "batch_size": 100, "rows_updated": 1200}', 1200, 3000);
           INSERT INTO pgshift.backfill_ranges (plan_id, step, worker, lower_key, upper_key, last_key, rows_done, batches, batch_size, done)
           VALUES ('up', 'fill', 0, NULL, '{"id": 3000}', '{"id": 1200}', 1200, 12, 100, false);"#,
    )
    .await;
    assert_eq!(
        db.scalar_string("SELECT value FROM pgshift.meta WHERE key = 'schema_version'")
            .await
            .as_deref(),
        Some("1")
    );

    // Two read-only commands at once both upgrade (one of them does, under the lock).
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| db.pgshift(&["status", "up"]));
        let b = s.spawn(|| db.pgshift(&["status", "up", "--format", "json"]));
        (a.join().unwrap(), b.join().unwrap())
    });
    expect_code(&a, 0, "status");
    expect_code(&b, 0, "status --format json");
    assert!(stdout(&a).contains("1200/~3000"), "{}", stdout(&a));
    assert_eq!(
        db.scalar_string("SELECT value FROM pgshift.meta WHERE key = 'schema_version'")
            .await
            .as_deref(),
        Some("3")
    );
    // Version 1's count of changed rows moved to the range that made them.
    assert_eq!(
        db.scalar_i64("SELECT rows_updated FROM pgshift.backfill_ranges")
            .await,
        1200
    );

    let o = db.pgshift(&[
        "--progress",
        "never",
        "--yes",
        "resume",
        file.to_str().unwrap(),
    ]);
    expect_code(&o, 0, "resume");
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE n <> 1 OR v IS DISTINCT FROM md5(src)")
            .await,
        0,
        "every row updated exactly once across the upgrade"
    );
    assert_eq!(
        db.scalar_i64("SELECT rows_done FROM pgshift.steps").await,
        3000
    );
    assert!(
        db.scalar_i64("SELECT min(epoch) FROM pgshift.backfill_ranges")
            .await
            >= 1
    );
    // Running it again changes nothing: the upgrade is done once.
    let o = db.pgshift(&["status", "up"]);
    expect_code(&o, 0, "status after");
    assert_eq!(
        db.scalar_string("SELECT value FROM pgshift.meta WHERE key = 'schema_version'")
            .await
            .as_deref(),
        Some("3")
    );
}
