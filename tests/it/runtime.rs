//! Plans that pass `plan validate` but fail against the database they meet: each
//! must end fast, with exit 1, a message naming the step and the next command,
//! and never be taken for a lost connection.

use std::time::{Duration, Instant};

use crate::executor::{expect_code, run, status_json, step_status, work_dir, write_plan};
use crate::harness::*;

/// Applies `yaml` to a fresh database prepared with `setup`; returns the output and how long it took.
async fn apply(test: &str, setup: &str, yaml: &str) -> (TestDb, std::process::Output, Duration) {
    let db = TestDb::create(test).await;
    if !setup.is_empty() {
        db.exec(setup).await;
    }
    let dir = work_dir(test);
    let f = write_plan(&dir, test, yaml);
    let v = pgshift(&["plan", "validate", f.to_str().unwrap()]);
    assert_eq!(
        v.status.code(),
        Some(0),
        "the plan must validate: {}",
        stderr(&v)
    );
    let t = Instant::now();
    let o = run(
        &db,
        &["--progress", "never", "plan", "apply", f.to_str().unwrap()],
    );
    (db, o, t.elapsed())
}

// Regression: `check: SELECT 1` (an integer) was taken for a lost connection and
// printed "reconnected … continues from its last committed step" forever.
#[tokio::test]
async fn check_returning_an_integer_fails_the_step() {
    let plan = "id: rt_check_int
phases:
  contract:
    - name: is_ready
      check: SELECT 1
";
    let (db, o, took) = apply("rt_check_int", "", plan).await;
    expect_code(&o, 1, "a check of the wrong type");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let e = stderr(&o);
    assert!(
        e.contains("step `is_ready`")
            && e.contains("one boolean column")
            && e.contains("type int4")
            && e.contains("pgshift resume rt_check_int")
            && !e.contains("reconnect"),
        "{e}"
    );
    assert_eq!(
        step_status(&status_json(&db, "rt_check_int"), "is_ready"),
        "failed"
    );
}

#[tokio::test]
async fn check_returning_no_row_fails_the_step() {
    let plan = "id: rt_check_norow
phases:
  contract:
    - name: no_orphans
      check: SELECT true FROM pg_class WHERE false
";
    let (db, o, took) = apply("rt_check_norow", "", plan).await;
    expect_code(&o, 1, "a check that returns no row");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let e = stderr(&o);
    assert!(
        e.contains("step `no_orphans`")
            && e.contains("returned no row")
            && !e.contains("reconnect"),
        "{e}"
    );
    assert_eq!(
        step_status(&status_json(&db, "rt_check_norow"), "no_orphans"),
        "failed"
    );
}
