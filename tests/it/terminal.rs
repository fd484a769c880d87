//! What an operator sees on a terminal, in a pseudo-terminal 80 columns wide:
//! the backfill's bar frozen where Ctrl-C stopped it, the reason a paused bar
//! gives, `status` saying paused, the line a finished bar leaves, and the
//! questions before a gate is passed and before a rollback.

use std::time::Duration;

use crate::harness::*;
use crate::pty::{Pty, bars_fit, plain};

const ROWS: i64 = 20_000;

/// A backfill slow enough (a rate cap) to be watched, paused and interrupted.
const PLAN: &str = "id: tty
phases:
  expand:
    - name: add_h
      sql: ALTER TABLE items ADD COLUMN IF NOT EXISTS h text
      rollback: ALTER TABLE items DROP COLUMN IF EXISTS h
  dual_write:
    - name: sync_h
      trigger: { table: items, set: { h: \"md5(NEW.email)\" } }
  backfill:
    - name: fill_items_with_their_email_hashes
      backfill:
        table: items
        set: { h: \"md5(email)\" }
        where: h IS NULL
        batch_size: 100
        throttle: { sleep: 0, max_rows_per_sec: 1000 }
  contract:
    - name: deployed
      gate: Deploy the reader of h
";

/// A database with `rows` items, and the plan (without its rate cap unless `capped`).
async fn setup(name: &str, rows: i64, capped: bool) -> (TestDb, String) {
    let db = TestDb::create(name).await;
    db.exec(&format!("CREATE TABLE items (id int PRIMARY KEY, email text NOT NULL); INSERT INTO items SELECT g, 'u' || g || '@x.test' FROM generate_series(1, {rows}) g;")).await;
    let plan = if capped {
        PLAN.to_string()
    } else {
        PLAN.replace(", max_rows_per_sec: 1000", "")
    };
    let file = plan_file(name, "tty.yaml", &plan);
    (db, file.to_str().unwrap().to_string())
}

fn env(db: &TestDb) -> Vec<(&str, &str)> {
    vec![("DATABASE_URL", db.url.as_str())]
}

async fn rows_done(db: &TestDb) -> i64 {
    db.scalar_i64(
        "SELECT rows_done FROM pgshift.steps WHERE name = 'fill_items_with_their_email_hashes'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bar_says_paused_then_freezes_where_ctrl_c_stopped_it_and_a_finished_one_leaves_a_line()
{
    let (db, file) = setup("tty_bar", ROWS, true).await;
    let mut t = Pty::spawn(&["plan", "apply", &file], &env(&db), 80);
    t.wait_for("rows/s", Duration::from_secs(60));

    // Paused from another terminal: the bar gives the reason, not a rate, and
    // status says paused (no rows/s) in the table and in JSON.
    let o = db.pgshift(&["throttle", "tty", "--pause"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the running backfill applies it at its next batch"),
        "{}",
        stderr(&o)
    );
    t.wait_for("held: paused by operator", Duration::from_secs(30));
    let table = stdout(&db.pgshift(&["status", "tty"]));
    let line = table
        .lines()
        .find(|l| l.contains("fill_items_with_their"))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains(" paused ") && !line.contains("/s)"),
        "{table}"
    );
    assert!(table.contains("status paused"), "{table}");
    assert!(table.contains("throttle tty --unpause"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&db.pgshift(&["status", "tty", "--format", "json"]))).unwrap();
    let plan = &json["plans"][0];
    assert_eq!(plan["status"], "paused", "{plan:#}");
    let step = &plan["steps"][2];
    assert_eq!(step["status"], "paused", "{step:#}");
    assert_eq!(step["rows_per_sec"], serde_json::Value::Null, "{step:#}");

    // Ctrl-C while paused: the bar freezes where it stopped, with the rows status has.
    t.ctrl_c();
    let (st, raw) = t.finish(Duration::from_secs(30));
    assert_eq!(st.code(), Some(3), "{}", plain(&raw));
    let done = rows_done(&db).await;
    assert!(done > 0 && done < ROWS, "{done}");
    let out = plain(&raw);
    let pct = done * 100 / ROWS;
    assert!(
        out.contains(&format!("interrupted at {done}/{ROWS} ({pct} %)")),
        "no frozen bar at {done}/{ROWS}:\n{out}"
    );
    assert!(!out.contains(&format!("{ROWS}/{ROWS}")), "{out}");
    assert!(out.contains("pgshift resume tty"), "{out}");
    bars_fit(&raw, "fill_items_with_their_e… [", 80);

    // Unpaused, the cap lifted, resumed: the finished bar leaves its closing line.
    let o = db.pgshift(&["throttle", "tty", "--unpause", "--max-rows-per-sec", "0"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("no backfill of it is running now"),
        "{}",
        stderr(&o)
    );
    let t = Pty::spawn(&["resume", "tty"], &env(&db), 80);
    let (st, raw) = t.finish(Duration::from_secs(60));
    assert_eq!(st.code(), Some(3), "stops at the gate: {}", plain(&raw));
    let out = plain(&raw);
    assert!(
        out.contains(&format!(
            "done: {ROWS} rows ({} in this run, in ",
            ROWS - done
        )),
        "{out}"
    );
    assert!(out.contains("rows/s)"), "{out}");
    bars_fit(&raw, "fill_items_with_their_e… [", 80);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_and_rollback_ask_on_a_terminal_and_no_means_nothing_changes() {
    let (db, file) = setup("tty_prompts", 2000, false).await;
    let o = db.pgshift(&["--progress", "never", "plan", "apply", &file, "--yes"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "apply stops at the gate: {}",
        stderr(&o)
    );

    // The gate: asked, and "n" (or Enter) keeps it closed.
    let mut t = Pty::spawn(&["resume", "tty"], &env(&db), 80);
    t.wait_for("Continue past the gate [y/N]", Duration::from_secs(30));
    t.type_text("n\n");
    let (st, raw) = t.finish(Duration::from_secs(30));
    assert_eq!(st.code(), Some(3), "{}", plain(&raw));
    assert!(
        plain(&raw).contains("the gate stays closed"),
        "{}",
        plain(&raw)
    );
    let gate = db
        .scalar_string("SELECT status FROM pgshift.steps WHERE name = 'deployed'")
        .await;
    assert_eq!(gate.as_deref(), Some("waiting"));

    // With JSON logs nothing is asked even on a terminal: the gate stays closed.
    let t = Pty::spawn(&["--log-format", "json", "resume", "tty"], &env(&db), 80);
    let (st, raw) = t.finish(Duration::from_secs(30));
    assert_eq!(st.code(), Some(3), "{}", plain(&raw));
    assert!(!raw.contains("[y/N]"), "{raw}");
    for line in raw.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line.trim_end_matches('\r'))
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert_eq!(v["plan"], "tty", "{line}");
    }

    // "y" passes it, and the plan finishes.
    let mut t = Pty::spawn(&["resume", "tty"], &env(&db), 80);
    t.wait_for("Deploy the reader of h", Duration::from_secs(30));
    t.wait_for("[y/N]", Duration::from_secs(30));
    t.type_text("y\n");
    let (st, raw) = t.finish(Duration::from_secs(30));
    assert_eq!(st.code(), Some(0), "{}", plain(&raw));
    assert!(
        plain(&raw).contains("gate `deployed` passed by the operator"),
        "{}",
        plain(&raw)
    );

    // Rollback: names the database, lists what it undoes, asks; "n" changes nothing.
    let mut t = Pty::spawn(&["rollback", "tty"], &env(&db), 80);
    let shown = t.wait_for("Roll back plan `tty`? [y/N]", Duration::from_secs(30));
    assert!(
        shown.contains(&format!("database `{}`", db.name)),
        "{shown}"
    );
    assert!(
        shown.contains("ALTER TABLE items DROP COLUMN IF EXISTS h"),
        "{shown}"
    );
    t.type_text("\n");
    let (st, raw) = t.finish(Duration::from_secs(30));
    assert_eq!(st.code(), Some(2), "{}", plain(&raw));
    assert!(
        plain(&raw).contains("nothing was changed"),
        "{}",
        plain(&raw)
    );
    let has_h = "SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' AND column_name = 'h'";
    assert_eq!(db.scalar_i64(has_h).await, 1);

    // "y" rolls it back.
    let mut t = Pty::spawn(&["rollback", "tty"], &env(&db), 80);
    t.wait_for("[y/N]", Duration::from_secs(30));
    t.type_text("y\n");
    let (st, raw) = t.finish(Duration::from_secs(60));
    assert_eq!(st.code(), Some(0), "{}", plain(&raw));
    assert!(
        plain(&raw).contains("plan `tty` rolled back"),
        "{}",
        plain(&raw)
    );
    assert_eq!(db.scalar_i64(has_h).await, 0);
}
