//! How pgshift sets itself up to take locks: per-transaction timeouts, and a
//! deadlock_timeout below the lock timeout so that an autovacuum in the way yields.

use crate::harness::*;

/// Inside a step's transaction: lock_timeout and statement_timeout are the step's,
/// and deadlock_timeout is half the lock timeout (the role is a superuser here).
#[tokio::test]
async fn step_transactions_carry_their_own_timeouts() {
    let db = TestDb::create("locks_step_timeouts").await;
    db.exec("CREATE TABLE seen (lock_timeout text, statement_timeout text, deadlock_timeout text)")
        .await;
    let file = plan_file(
        "locks",
        "timeouts.yaml",
        "id: timeouts\nphases:\n  expand:\n    - name: record\n      lock_timeout: 400ms\n      statement_timeout: 7s\n      sql: INSERT INTO seen SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), current_setting('deadlock_timeout')\n      rollback: DELETE FROM seen\n",
    );
    let o = db.pgshift(&[
        "--progress",
        "never",
        "plan",
        "apply",
        file.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let row = db
        .client
        .query_one(
            "SELECT lock_timeout, statement_timeout, deadlock_timeout FROM seen",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "400ms");
    assert_eq!(row.get::<_, String>(1), "7s");
    assert_eq!(row.get::<_, String>(2), "200ms");
}
