//! The first real workload: the Clarivum plans applied to a fresh database with
//! fixtures, the index plan's claims checked with EXPLAIN, and every command
//! line of the on-call runbook checked against the real command line.

use clap::Parser;

use crate::harness::*;

/// Each ```sql block of plans/clarivum/README.md directly followed by `index: NAME`.
fn index_plan_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(project_file("plans/clarivum/README.md")).unwrap();
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "```sql" {
            let mut sql = String::new();
            for l in lines.by_ref() {
                if l.trim() == "```" {
                    break;
                }
                sql.push_str(l);
                sql.push('\n');
            }
            if let Some(next) = lines.peek()
                && let Some(idx) = next.trim().strip_prefix("index:")
            {
                out.push((sql, idx.trim().to_string()));
            }
        }
    }
    out
}

#[tokio::test]
async fn clarivum_plans_apply_and_keep_their_promises() {
    let db = TestDb::create("clarivum").await;
    let p1 = project_file("plans/clarivum/0001_core_schema.yaml");
    let p2 = project_file("plans/clarivum/0002_leads_email_hash.yaml");

    let o = db.pgshift(&["--progress", "never", "plan", "apply", p1.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "0001: {}", stderr(&o));

    // Fixtures with the default 200,000 leads: the index plan is about that scale.
    db.exec(&std::fs::read_to_string(project_file("plans/clarivum/fixtures.sql")).unwrap())
        .await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM leads").await, 200_000);

    // The index plan: every primary query uses the index the README names.
    let queries = index_plan_queries();
    assert!(
        queries.len() >= 10,
        "the README lists {} indexed queries",
        queries.len()
    );
    for (sql, index) in &queries {
        let plan: serde_json::Value = db
            .client
            .query_one(&format!("EXPLAIN (FORMAT JSON) {sql}"), &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            plan.to_string()
                .contains(&format!("\"Index Name\":\"{index}\"")),
            "query does not use `{index}`:\n{sql}\nplan: {plan}"
        );
    }

    // 0002 stops at its gate (exit 3), then resume passes it.
    let o = db.pgshift(&["--progress", "never", "plan", "apply", p2.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(3), "0002 apply: {}", stderr(&o));
    assert!(
        stderr(&o).contains("pgshift resume 0002_leads_email_hash"),
        "{}",
        stderr(&o)
    );
    let o = db.pgshift(&[
        "--progress",
        "never",
        "--yes",
        "resume",
        "0002_leads_email_hash",
    ]);
    assert_eq!(o.status.code(), Some(0), "0002 resume: {}", stderr(&o));

    // Every lead has the right hash.
    assert_eq!(db.scalar_i64("SELECT count(*) FROM leads WHERE email_hash IS DISTINCT FROM encode(sha256(lower(email)::bytea), 'hex')").await, 0);
    assert_eq!(db.scalar_i64("SELECT count(*) FROM pg_constraint WHERE conname = 'leads_email_hash_up' AND convalidated").await, 1);

    // RLS hides soft-deleted rows from a non-owner role.
    let deleted = db
        .scalar_i64("SELECT count(*) FROM content_items WHERE deleted_at IS NOT NULL")
        .await;
    assert!(deleted > 0, "the fixtures soft-delete some content items");
    let visible_deleted = {
        let tx = db.client.simple_query("BEGIN; SET LOCAL ROLE authenticated; SELECT count(*) FROM content_items WHERE deleted_at IS NOT NULL; ROLLBACK").await.unwrap();
        tx.iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => {
                    r.get(0).map(|v| v.parse::<i64>().unwrap())
                }
                _ => None,
            })
            .unwrap()
    };
    assert_eq!(
        visible_deleted, 0,
        "soft-deleted content is visible to `authenticated`"
    );

    // UUID v7 keys sort by creation time: generated keys, in insertion order.
    // (Keys made within the same microsecond may tie-break randomly: the function says so.)
    db.exec(
        "CREATE TEMP TABLE seq (n int, id uuid);
         DO $$ BEGIN FOR i IN 1..50 LOOP INSERT INTO seq VALUES (i, uuid_generate_v7()); PERFORM pg_sleep(0.001); END LOOP; END $$;",
    )
    .await;
    assert_eq!(db.scalar_i64("SELECT count(*) FROM (SELECT n, lag(n) OVER (ORDER BY id) AS prev FROM seq) x WHERE prev > n").await, 0);
    // …and the fixture keys follow their created_at.
    assert_eq!(db.scalar_i64("SELECT count(*) FROM (SELECT created_at, lag(created_at) OVER (ORDER BY id) AS prev FROM leads) x WHERE prev > created_at").await, 0);

    // `revision` increments on every update.
    let before = db
        .scalar_i64("SELECT revision::bigint FROM personas ORDER BY key LIMIT 1")
        .await;
    db.exec("UPDATE personas SET description = description || '.' WHERE key = (SELECT key FROM personas ORDER BY key LIMIT 1)").await;
    db.exec("UPDATE personas SET description = description || '.' WHERE key = (SELECT key FROM personas ORDER BY key LIMIT 1)").await;
    assert_eq!(
        db.scalar_i64("SELECT revision::bigint FROM personas ORDER BY key LIMIT 1")
            .await,
        before + 2
    );
}

/// Every `pgshift …` line in the runbook's ```sh blocks parses as a real command
/// with real flags, and names files that exist.
#[test]
fn runbook_commands_exist_and_parse() {
    let text =
        std::fs::read_to_string(project_file("runbooks/zero-downtime-migrations.md")).unwrap();
    let mut in_sh = false;
    let mut checked = 0;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            in_sh = !in_sh && t == "```sh";
            continue;
        }
        if !in_sh || !t.starts_with("pgshift ") {
            continue;
        }
        let words = shell_words(t);
        let parsed = pgshift::cli::Cli::try_parse_from(&words);
        assert!(
            parsed.is_ok(),
            "runbook line does not parse: `{t}`: {}",
            parsed.err().map(|e| e.to_string()).unwrap_or_default()
        );
        for w in &words {
            if w.ends_with(".yaml") {
                assert!(
                    project_file(w).is_file(),
                    "runbook names a missing file: {w} (in `{t}`)"
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 10, "only {checked} runbook commands found");
}

/// The read-only runbook commands run for real and succeed.
#[test]
fn runbook_read_only_commands_run() {
    for args in [
        vec![
            "plan",
            "validate",
            "plans/clarivum/0002_leads_email_hash.yaml",
        ],
        vec!["plan", "show", "plans/clarivum/0002_leads_email_hash.yaml"],
    ] {
        let mut full = vec![];
        full.extend(args.iter().map(|a| {
            if a.ends_with(".yaml") {
                project_file(a).to_str().unwrap().to_string()
            } else {
                a.to_string()
            }
        }));
        let refs: Vec<&str> = full.iter().map(|s| s.as_str()).collect();
        let o = pgshift(&refs);
        assert_eq!(o.status.code(), Some(0), "pgshift {args:?}: {}", stderr(&o));
    }
}

/// Splits a command line as a POSIX shell would for simple quoting ('…' and "…").
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut has = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                has = true;
            }
            (None, c) if c.is_whitespace() => {
                if has || !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                    has = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if has || !cur.is_empty() {
        words.push(cur);
    }
    words
}

/// On a Supabase-like database (its own `auth` schema and `auth.uid()` already there),
/// 0001 uses what it finds, and rolling 0001 back leaves Supabase's objects alone.
#[tokio::test]
async fn clarivum_schema_respects_an_existing_supabase_auth() {
    let db = TestDb::create("clarivum_supabase_like").await;
    db.exec(
        "CREATE SCHEMA auth;
         CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE
           AS $$ SELECT nullif(current_setting('request.jwt.claim.sub', true), '')::uuid $$;
         COMMENT ON FUNCTION auth.uid() IS 'supabase: the platform''s own';",
    )
    .await;
    let p1 = project_file("plans/clarivum/0001_core_schema.yaml");
    let o = db.pgshift(&["--progress", "never", "plan", "apply", p1.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let comment = "SELECT obj_description('auth.uid()'::regprocedure, 'pg_proc')";
    assert_eq!(
        db.scalar_string(comment).await.as_deref(),
        Some("supabase: the platform's own")
    );
    // RLS policies call the platform's auth.uid(): of two users, a signed-in one sees only their own row.
    db.exec("INSERT INTO users (id, email, display_name) VALUES ('00000000-0000-7000-8000-000000000001', 'a@x.test', 'A'), ('00000000-0000-7000-8000-000000000002', 'b@x.test', 'B')").await;
    let seen = db
        .client
        .simple_query("BEGIN; SET LOCAL ROLE authenticated; SELECT set_config('request.jwt.claim.sub', '00000000-0000-7000-8000-000000000001', true); SELECT count(*) FROM users; ROLLBACK")
        .await
        .unwrap();
    let counts: Vec<String> = seen
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(counts.last().map(String::as_str), Some("1"), "{counts:?}");

    let o = db.pgshift(&[
        "--progress",
        "never",
        "--yes",
        "rollback",
        "0001_core_schema",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        db.scalar_string(comment).await.as_deref(),
        Some("supabase: the platform's own"),
        "rollback removed Supabase's auth.uid()"
    );
    assert_eq!(
        db.scalar_i64("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            .await,
        0
    );
}
