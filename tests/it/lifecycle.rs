//! The lifecycle every step kind goes through against the real server: apply
//! (to its gate, or to the end), roll back, find the catalog and the data
//! exactly as they were, apply again, pass the gates, finish. The operations of
//! `changes:` go through the same harness.

use std::path::Path;

use crate::executor::{expect_code, run, status_json, step_status, work_dir, write_plan};
use crate::harness::*;

/// What one plan's lifecycle saw.
pub(crate) struct Lifecycle {
    /// The catalog before the plan, and after it finished.
    pub before: String,
    pub done: String,
}

/// The data `queries` return, one text per query, for comparing before and after.
async fn data(db: &TestDb, queries: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for q in queries {
        out.push(rows_text(db, q).await);
    }
    out
}

/// Runs `resume --yes` until the plan is done (it stops at each gate once).
fn finish(db: &TestDb, id: &str) {
    for _ in 0..10 {
        let o = run(db, &["--progress", "never", "--yes", "resume", id]);
        match o.status.code() {
            Some(0) => return,
            Some(3) => continue,
            _ => panic!("resume of `{id}` failed: {}", stderr(&o)),
        }
    }
    panic!("plan `{id}` did not finish after 10 resumes");
}

/// Apply → rollback → (catalog and data as before) → apply again → finish.
///
/// `data_queries` read the rows the plan must leave as they were when rolled back.
pub(crate) async fn lifecycle(
    db: &TestDb,
    plan: &Path,
    id: &str,
    data_queries: &[&str],
) -> Lifecycle {
    let file = plan.to_str().unwrap();
    let before = catalog(db).await;
    let rows_before = data(db, data_queries).await;

    let o = run(db, &["--progress", "never", "plan", "apply", file]);
    assert!(
        matches!(o.status.code(), Some(0 | 3)),
        "first apply of `{id}`: {}",
        stderr(&o)
    );
    let o = run(db, &["--progress", "never", "--yes", "rollback", id]);
    expect_code(&o, 0, "rollback");
    assert_eq!(
        catalog(db).await,
        before,
        "rollback of `{id}` did not restore the catalog"
    );
    assert_eq!(
        data(db, data_queries).await,
        rows_before,
        "rollback of `{id}` did not restore the data"
    );
    assert_eq!(status_json(db, id)["status"], "rolled_back");

    let o = run(db, &["--progress", "never", "plan", "apply", file]);
    assert!(
        matches!(o.status.code(), Some(0 | 3)),
        "second apply of `{id}`: {}",
        stderr(&o)
    );
    finish(db, id);
    let p = status_json(db, id);
    assert_eq!(p["status"], "succeeded", "{p:#}");
    Lifecycle {
        before,
        done: catalog(db).await,
    }
}

const LEADS: &str = "CREATE TABLE leads (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, email text NOT NULL);
     INSERT INTO leads (email) SELECT 'user' || g || '@example.com' FROM generate_series(1, 2000) g;";
const LEADS_ROWS: &str = "SELECT id, email FROM leads ORDER BY id";

#[tokio::test]
async fn sql_steps_in_a_transaction_and_alone() {
    let db = TestDb::create("lc_sql").await;
    db.exec(LEADS).await;
    let dir = work_dir("lc_sql");
    let plan = write_plan(
        &dir,
        "lc_sql",
        "id: lc_sql
phases:
  expand:
    - name: add_col
      sql: ALTER TABLE leads ADD COLUMN note text
      rollback: ALTER TABLE leads DROP COLUMN IF EXISTS note
    - name: add_idx
      sql: CREATE INDEX CONCURRENTLY IF NOT EXISTS leads_note_idx ON leads (note)
      rollback: DROP INDEX CONCURRENTLY IF EXISTS leads_note_idx
",
    );
    let l = lifecycle(&db, &plan, "lc_sql", &[LEADS_ROWS]).await;
    assert!(l.done.contains("public.leads.note text"), "{}", l.done);
    assert!(l.done.contains("leads_note_idx"), "{}", l.done);
    assert!(!l.done.contains("INVALID"), "{}", l.done);
    assert_ne!(l.before, l.done);
}

/// The trigger, backfill and drop_trigger kinds, with a gate and a check.
#[tokio::test]
async fn trigger_backfill_gate_check_and_drop_trigger() {
    let db = TestDb::create("lc_dual").await;
    db.exec(LEADS).await;
    let dir = work_dir("lc_dual");
    let plan = write_plan(
        &dir,
        "lc_dual",
        "id: lc_dual
phases:
  expand:
    - name: add_lower
      sql: ALTER TABLE leads ADD COLUMN email_lower text
      rollback: ALTER TABLE leads DROP COLUMN IF EXISTS email_lower
  dual_write:
    - name: sync_lower
      trigger: { table: leads, set: { email_lower: lower(NEW.email) } }
  backfill:
    - name: fill_lower
      backfill: { table: leads, set: { email_lower: lower(email) }, where: email_lower IS NULL, batch_size: 300 }
  contract:
    - name: app_reads_lower
      gate: Deploy the app that reads email_lower
    - name: all_filled
      check: SELECT count(*) = 0 FROM leads WHERE email_lower IS NULL
    - name: stop_sync
      drop_trigger: sync_lower
",
    );
    let l = lifecycle(&db, &plan, "lc_dual", &[LEADS_ROWS]).await;
    assert!(
        l.done.contains("public.leads.email_lower text"),
        "{}",
        l.done
    );
    // The trigger and its function are gone once drop_trigger ran.
    assert!(!l.done.contains("trigger pgshift_"), "{}", l.done);
    assert!(!l.done.contains("function public.pgshift_"), "{}", l.done);
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM leads WHERE email_lower IS DISTINCT FROM lower(email)")
            .await,
        0
    );
    let p = status_json(&db, "lc_dual");
    for s in [
        "sync_lower",
        "fill_lower",
        "app_reads_lower",
        "all_filled",
        "stop_sync",
    ] {
        assert_eq!(step_status(&p, s), "succeeded", "{s}: {p:#}");
    }
}

/// A `run` step and its `run:` rollback: the command's effect is undone and redone.
#[tokio::test]
async fn run_step_with_a_command_rollback() {
    let db = TestDb::create("lc_run").await;
    db.exec(LEADS).await;
    let dir = work_dir("lc_run");
    let flag = dir.join("flag");
    let plan = write_plan(
        &dir,
        "lc_run",
        &format!(
            "id: lc_run
phases:
  expand:
    - name: flip_flag
      run: touch {flag}
      rollback: {{ run: rm -f {flag} }}
",
            flag = flag.display()
        ),
    );
    let l = lifecycle(&db, &plan, "lc_run", &[LEADS_ROWS]).await;
    assert_eq!(l.before, l.done, "a run step changes no catalog");
    assert!(flag.exists(), "the command ran again after the rollback");
}
