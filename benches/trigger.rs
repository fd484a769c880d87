//! What the dual-write trigger's guard costs an application write.
//!
//! `cargo bench --bench trigger [-- --rows N --statements N --rounds N]` (or
//! `BENCH_ROWS`, `BENCH_STATEMENTS`, `BENCH_ROUNDS`; defaults 100,000 rows,
//! 5,000 statements, 5 rounds). `DATABASE_URL` names the server (default the
//! local one); the database `pgshift_bench_trigger` is dropped and recreated.
//!
//! Three copies of one table, `(id bigint PRIMARY KEY, email text, email_hash text)`:
//! - `none`: no trigger;
//! - `lean`: the dual-write trigger pgshift generated before it caught errors
//!   (the generated body with its EXCEPTION clause and variables taken out);
//! - `guarded`: the trigger pgshift generates now (its body in a block with an
//!   EXCEPTION clause: a subtransaction per row).
//!
//! The trigger is the README's: `email_hash = encode(sha256(lower(NEW.email)::bytea), 'hex')`.
//! Two workloads, each run in every round on the three tables in turn (so that
//! the server's other load falls on all three alike), medians reported:
//! - bulk: one `INSERT … SELECT` of N rows (the trigger's cost per row, isolated);
//! - statements: N single-row INSERTs then N single-row UPDATEs of `email`, one
//!   round trip each, as an application writes.

use std::time::Instant;

use pgshift::ident::{parse_ident, parse_qualified};
use pgshift::kind::trigger::{TriggerSpec, statements};
use tokio_postgres::Client;

const TABLES: [&str; 3] = ["none", "lean", "guarded"];

struct Args {
    rows: i64,
    statements: i64,
    rounds: usize,
}

fn args() -> Args {
    let env_or = |name: &str, default: i64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.replace('_', "").parse().ok())
            .unwrap_or(default)
    };
    let mut a = Args {
        rows: env_or("BENCH_ROWS", 100_000),
        statements: env_or("BENCH_STATEMENTS", 5_000),
        rounds: env_or("BENCH_ROUNDS", 5) as usize,
    };
    let argv: Vec<String> = std::env::args().collect();
    for (i, arg) in argv.iter().enumerate() {
        let value = || {
            argv.get(i + 1)
                .and_then(|v| v.replace('_', "").parse::<i64>().ok())
                .unwrap_or_else(|| panic!("{arg} N"))
        };
        match arg.as_str() {
            "--rows" => a.rows = value(),
            "--statements" => a.statements = value(),
            "--rounds" => a.rounds = value() as usize,
            _ => {}
        }
    }
    a
}

async fn connect(url: &str) -> Client {
    let (c, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// The generated statements for table `t`, and the same without the guard.
fn triggers(table: &str) -> (Vec<String>, Vec<String>) {
    let spec = TriggerSpec {
        table: parse_qualified(table).unwrap(),
        set: vec![(
            parse_ident("email_hash").unwrap(),
            "encode(sha256(lower(NEW.email)::bytea), 'hex')".into(),
        )],
        reverse: vec![],
        when: None,
    };
    let guarded = statements("bench", table, &spec);
    let lean = guarded
        .iter()
        .map(|s| {
            let Some(start) = s.find("EXCEPTION WHEN OTHERS THEN") else {
                return s.clone();
            };
            let end = s.rfind("END;\n").expect("the body ends with END;");
            let declare = s
                .find("DECLARE\n")
                .expect("the guard declares its variables");
            let begin = s.find("BEGIN\n").expect("the body begins");
            format!("{}{}{}", &s[..declare], &s[begin..start], &s[end..])
        })
        .collect();
    (guarded, lean)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = args();
    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin = connect(&server).await;
    for sql in [
        "DROP DATABASE IF EXISTS pgshift_bench_trigger WITH (FORCE)",
        "CREATE DATABASE pgshift_bench_trigger",
    ] {
        admin.batch_execute(sql).await.unwrap();
    }
    let base = server.rsplit_once('/').map(|(b, _)| b).unwrap_or(&server);
    let c = connect(&format!("{base}/pgshift_bench_trigger")).await;
    for t in TABLES {
        c.batch_execute(&format!(
            "CREATE TABLE {t} (id bigint PRIMARY KEY, email text NOT NULL, email_hash text)"
        ))
        .await
        .unwrap();
    }
    let (guarded, _) = triggers("guarded");
    let (_, lean) = triggers("lean");
    assert!(guarded[1].contains("EXCEPTION WHEN OTHERS") && !lean[1].contains("EXCEPTION"));
    for s in guarded.iter().chain(&lean) {
        c.batch_execute(s).await.unwrap();
    }

    let mut bulk: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut ins: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut upd: Vec<Vec<f64>> = vec![Vec::new(); 3];
    for round in 0..a.rounds {
        for (i, t) in TABLES.iter().enumerate() {
            c.batch_execute(&format!("TRUNCATE {t}")).await.unwrap();
            c.batch_execute("CHECKPOINT").await.unwrap();
            let started = Instant::now();
            c.execute(
                &format!("INSERT INTO {t} (id, email) SELECT g, 'User' || g || '@Example.com' FROM generate_series(1, $1::bigint) g"),
                &[&a.rows],
            )
            .await
            .unwrap();
            bulk[i].push(started.elapsed().as_secs_f64() * 1e6 / a.rows as f64);

            c.batch_execute(&format!("TRUNCATE {t}")).await.unwrap();
            c.batch_execute(&format!("VACUUM ANALYZE {t}"))
                .await
                .unwrap();
            let insert = c
                .prepare(&format!("INSERT INTO {t} (id, email) VALUES ($1, $2)"))
                .await
                .unwrap();
            let update = c
                .prepare(&format!("UPDATE {t} SET email = $2 WHERE id = $1"))
                .await
                .unwrap();
            let started = Instant::now();
            for id in 1..=a.statements {
                c.execute(&insert, &[&id, &format!("user{id}@example.com")])
                    .await
                    .unwrap();
            }
            ins[i].push(started.elapsed().as_secs_f64() * 1e6 / a.statements as f64);
            let started = Instant::now();
            for id in 1..=a.statements {
                c.execute(&update, &[&id, &format!("other{id}@example.com")])
                    .await
                    .unwrap();
            }
            upd[i].push(started.elapsed().as_secs_f64() * 1e6 / a.statements as f64);
        }
        eprintln!("round {} of {} done", round + 1, a.rounds);
    }
    let hashed: i64 = c
        .query_one(
            "SELECT count(*) FROM guarded WHERE email_hash IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        hashed, a.statements,
        "the guarded trigger did not dual-write"
    );

    println!(
        "dual-write trigger cost per write (medians of {} rounds; µs)\n",
        a.rounds
    );
    println!(
        "{:<40} {:>10} {:>10} {:>10} {:>16}",
        "workload", "none", "lean", "guarded", "guard costs"
    );
    for (name, v) in [
        (
            format!("bulk INSERT … SELECT, per row ({} rows)", a.rows),
            &mut bulk,
        ),
        (
            format!("single-row INSERT ({} statements)", a.statements),
            &mut ins,
        ),
        (
            format!("single-row UPDATE ({} statements)", a.statements),
            &mut upd,
        ),
    ] {
        let m: Vec<f64> = v.iter_mut().map(|x| median(x)).collect();
        println!(
            "{name:<40} {:>10.2} {:>10.2} {:>10.2} {:>+9.2} ({:+.0} %)",
            m[0],
            m[1],
            m[2],
            m[2] - m[1],
            (m[2] - m[1]) / m[1] * 100.0
        );
    }
}
