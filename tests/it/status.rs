//! `pgshift status`: where a plan becomes irreversible, read from its plan file.

use crate::harness::*;

#[tokio::test]
async fn status_marks_the_point_of_no_return() {
    let db = TestDb::create("status_point_of_no_return").await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, old text)")
        .await;
    let file = plan_file(
        "status",
        "irreversible.yaml",
        "id: irreversible\nphases:\n  expand:\n    - name: add_new\n      sql: ALTER TABLE t ADD COLUMN IF NOT EXISTS new text\n      rollback: ALTER TABLE t DROP COLUMN IF EXISTS new\n  contract:\n    - name: deployed\n      gate: deploy\n    - name: drop_old\n      sql: ALTER TABLE t DROP COLUMN old\n      allow: { ban-drop-column: \"test\" }\n",
    );
    let o = db.pgshift(&[
        "--progress",
        "never",
        "plan",
        "apply",
        file.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let o = db.pgshift(&["status", "irreversible"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("point of no return: `drop_old`"),
        "{}",
        stdout(&o)
    );
    let o = db.pgshift(&["status", "irreversible", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["plans"][0]["irreversible_after"], "drop_old");
    assert_eq!(v["plans"][0]["status"], "waiting");
}

/// `status` and a `throttle` of an unknown plan are read-only: on a database pgshift
/// never ran against, they create no control schema.
#[tokio::test]
async fn read_only_commands_create_no_control_schema() {
    let db = TestDb::create("status_read_only").await;
    let o = db.pgshift(&["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("no plans recorded"), "{}", stdout(&o));
    let o = db.pgshift(&["status", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["plans"], serde_json::json!([]));
    let o = db.pgshift(&["status", "nothing_here"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = db.pgshift(&["throttle", "nothing_here", "--pause"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let o = db.pgshift(&["resume", "nothing_here"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_namespace WHERE nspname = 'pgshift'")
            .await,
        0
    );
}
