//! `pgshift backfill` and `pgshift throttle` through the binary: the operator's
//! command-line throttles, and the order of phases it insists on.

use std::time::Duration;

use crate::executor::{signal, spawn, wait_output, wait_until};
use crate::harness::*;

const PLAN: &str = "id: bf_cli
phases:
  expand:
    - name: add_h
      sql: ALTER TABLE items ADD COLUMN IF NOT EXISTS h text
      rollback: ALTER TABLE items DROP COLUMN IF EXISTS h
  dual_write:
    - name: sync_h
      trigger: { table: items, set: { h: \"md5(NEW.email)\" } }
  backfill:
    - name: fill_h
      backfill:
        table: items
        set: { h: \"md5(email)\" }
        where: h IS NULL
        batch_size: 100
        throttle: { sleep: 40ms }
  contract:
    - name: deployed
      gate: deploy the reader of h
";

#[tokio::test]
async fn backfill_command_refuses_to_run_before_earlier_phases_then_applies_operator_throttles() {
    let db = TestDb::create("bf_cli").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, email text NOT NULL); INSERT INTO items SELECT g, 'u' || g || '@x.test' FROM generate_series(1, 6000) g;").await;
    let file = plan_file("bf_cli", "bf_cli.yaml", PLAN);
    let f = file.to_str().unwrap();

    // Before the plan has run: the backfill would run without its column and trigger.
    let o = db.pgshift(&["--progress", "never", "backfill", f]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("has not started") && stderr(&o).contains("pgshift plan apply"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pgshift.plans").await,
        0,
        "a refused backfill recorded the plan"
    );
    assert_eq!(db.scalar_i64("SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' AND column_name = 'h'").await, 0);

    // Apply, interrupted in the (deliberately slow) backfill.
    let child = spawn(&db, &["--progress", "never", "plan", "apply", f]);
    wait_until(
        &db,
        "SELECT coalesce((SELECT rows_done > 0 FROM pgshift.steps WHERE name = 'fill_h'), false)",
        Duration::from_secs(20),
    )
    .await;
    signal(&child, "INT");
    let o = tokio::task::spawn_blocking(move || {
        wait_output(child, Duration::from_secs(20), "interrupted apply")
    })
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let done_before = db
        .scalar_i64("SELECT rows_done FROM pgshift.steps WHERE name = 'fill_h'")
        .await;
    assert!(
        done_before < 6000,
        "the backfill finished before the interrupt ({done_before} rows)"
    );

    // The operator continues only the backfill, faster than the plan says.
    let o = db.pgshift(&[
        "--progress",
        "never",
        "backfill",
        f,
        "--step",
        "fill_h",
        "--batch-size",
        "1000",
        "--sleep",
        "0",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE h IS DISTINCT FROM md5(email)")
            .await,
        0
    );
    assert_eq!(
        db.scalar_i64(
            "SELECT max(batch_size)::bigint FROM pgshift.backfill_ranges WHERE step = 'fill_h'"
        )
        .await,
        1000
    );
    let overrides = db
        .scalar_string("SELECT detail::text FROM pgshift.events WHERE event = 'cli_overrides'")
        .await
        .unwrap();
    assert!(overrides.contains("\"batch_size\": 1000"), "{overrides}");
    // Only the backfill ran: the contract's gate is still ahead, and resume reaches it.
    assert_eq!(
        db.scalar_string("SELECT status FROM pgshift.steps WHERE name = 'deployed'")
            .await
            .as_deref(),
        Some("pending")
    );
    let o = db.pgshift(&["--progress", "never", "resume", "bf_cli"]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("stopped at gate `deployed`"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test]
async fn throttle_command_validates_and_records_its_change() {
    let db = TestDb::create("bf_cli_throttle").await;
    db.exec("CREATE TABLE items (id int PRIMARY KEY, email text NOT NULL); INSERT INTO items SELECT g, 'u' || g FROM generate_series(1, 10) g;").await;
    let file = plan_file("bf_cli_throttle", "bf_cli.yaml", PLAN);
    let o = db.pgshift(&[
        "--progress",
        "never",
        "plan",
        "apply",
        file.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));

    let o = db.pgshift(&["throttle", "bf_cli"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "nothing to change is a usage error: {}",
        stderr(&o)
    );
    let o = db.pgshift(&["throttle", "no_such_plan", "--pause"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no plan `no_such_plan`"),
        "{}",
        stderr(&o)
    );
    let o = db.pgshift(&[
        "throttle",
        "bf_cli",
        "--batch-size",
        "250",
        "--sleep",
        "5ms",
        "--pause",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let ov = db
        .scalar_string("SELECT overrides::text FROM pgshift.steps WHERE name = 'fill_h'")
        .await
        .unwrap();
    assert!(
        ov.contains("\"batch_size\": 250")
            && ov.contains("\"sleep_ms\": 5")
            && ov.contains("\"paused\": true"),
        "{ov}"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pgshift.events WHERE event = 'override_set'")
            .await,
        1
    );
}

/// The backfill's committed rows (its ranges commit with every batch; the
/// step's own count is refreshed about once a second), 0 before the control
/// schema exists.
async fn rows_done(db: &TestDb) -> i64 {
    let has_control = db
        .scalar_i64("SELECT (to_regclass('pgshift.steps') IS NOT NULL)::int::bigint")
        .await
        == 1;
    if !has_control {
        return 0;
    }
    db.scalar_i64(
        "SELECT coalesce(sum(rows_done), 0)::bigint FROM pgshift.backfill_ranges WHERE step = 'fill_h'",
    )
    .await
}

/// Kill -9 the runner at random batches, 20 times, resuming after each: every row
/// ends correct and was updated exactly once (a counter trigger proves it).
#[tokio::test]
async fn kill_9_at_random_batches_then_resume_updates_each_row_once() {
    let db = TestDb::create("bf_cli_kill9").await;
    db.exec(
        "CREATE TABLE items (id int PRIMARY KEY, email text NOT NULL, n int NOT NULL DEFAULT 0);
         INSERT INTO items SELECT g, 'u' || g || '@x.test', 0 FROM generate_series(1, 40000) g;
         CREATE FUNCTION count_fill() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.h IS DISTINCT FROM OLD.h THEN NEW.n := OLD.n + 1; END IF; RETURN NEW; END $$;
         -- Created before the plan adds `h`: PL/pgSQL resolves NEW.h only when it runs,
         -- and nothing updates the table before then.
         CREATE TRIGGER count_fill BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION count_fill();",
    )
    .await;
    let plan = PLAN
        .replace("id: bf_cli", "id: bf_kill9")
        .replace("batch_size: 100", "batch_size: 200")
        .replace("throttle: { sleep: 40ms }", "throttle: { sleep: 25ms }");
    let file = plan_file("bf_cli_kill9", "bf_kill9.yaml", &plan);
    let f = file.to_str().unwrap();
    // The expand step adds `h`; count every change of it from then on.
    let o = db.pgshift(&["--progress", "never", "plan", "validate", f]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    let seed: u64 = std::env::var("PGSHIFT_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("backfill kill -9 seed: {seed} (replay with PGSHIFT_TEST_SEED={seed})");
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };

    let mut kills = 0;
    let mut first = true;
    let mut last_done = -1i64;
    while kills < 20 {
        let args: Vec<&str> = if first {
            vec!["--progress", "never", "plan", "apply", f]
        } else {
            vec!["--progress", "never", "resume", f]
        };
        let mut child = spawn(&db, &args);
        first = false;
        // Wait for this run to commit a batch of its own, then let it go on for
        // a random 0–100 ms and kill it without warning: every kill lands in
        // the backfill, however fast the machine. The plan's 25 ms sleep after
        // each of its 200 batches keeps the backfill longer than 20 such runs.
        let progressed = loop {
            if child.try_wait().unwrap().is_some() {
                break false;
            }
            if rows_done(&db).await > last_done.max(0) {
                break true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        if progressed {
            tokio::time::sleep(Duration::from_millis(next() % 100)).await;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        let _ = child.kill();
        let _ = child.wait();
        kills += 1;
        let done = rows_done(&db).await;
        assert!(
            done >= last_done,
            "rows_done went backwards: {last_done} -> {done}"
        );
        last_done = done;
    }
    // Finish: resume to the gate (exit 3), or past it when a run already stopped there (exit 0).
    let o = db.pgshift(&["--progress", "never", "resume", f]);
    assert!(matches!(o.status.code(), Some(0 | 3)), "{}", stderr(&o));
    assert_eq!(
        db.scalar_string("SELECT status FROM pgshift.steps WHERE name = 'fill_h'")
            .await
            .as_deref(),
        Some("succeeded")
    );
    println!("backfill kill -9: {kills} kills, 40000 rows");
    assert!(
        kills == 20,
        "the backfill finished after {kills} kills, before 20 landed"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM items WHERE h IS DISTINCT FROM md5(email)")
            .await,
        0
    );
    // Every row was changed exactly once.
    let spread = db.scalar_string("SELECT string_agg(n || ':' || c, ', ') FROM (SELECT n, count(*) c FROM items GROUP BY n ORDER BY n) x").await;
    assert_eq!(
        spread.as_deref(),
        Some("1:40000"),
        "rows by number of updates (n:rows)"
    );
}
