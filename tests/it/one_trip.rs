//! pgshift's own statements (`db::OneTrip`) cost one round trip each, where a
//! text query through tokio-postgres costs two; and every Rust type they bind
//! reaches the server as the type it is declared as.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use pgshift::db::OneTrip;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::*;

/// A relay between one client and the server that counts what the client sends:
/// the client sends again only after the server's answer, so each send the relay
/// reads is one round trip.
async fn counting_relay(server: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sends = Arc::new(AtomicUsize::new(0));
    let counter = sends.clone();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let upstream = TcpStream::connect(server).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut ur, mut uw) = upstream.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut ur, &mut cw).await;
        });
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    counter.fetch_add(1, Ordering::SeqCst);
                    if uw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    (addr, sends)
}

fn server_addr(url: &str) -> SocketAddr {
    let c: tokio_postgres::Config = url.parse().unwrap();
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) if h != "localhost" => h.clone(),
        _ => "127.0.0.1".into(),
    };
    format!("{host}:{port}")
        .parse()
        .expect("the test server's URL has a numeric host")
}

#[tokio::test]
async fn control_statements_cost_one_round_trip_each() {
    let db = TestDb::create("one_trip_rounds").await;
    db.exec("CREATE TABLE t (id int8 PRIMARY KEY, name text, doc jsonb)")
        .await;
    let (relay, sends) = counting_relay(server_addr(&db.url)).await;
    let c = connect(&format!(
        "postgres://postgres@{relay}/{}?sslmode=disable",
        db.name
    ))
    .await;
    // Each call below waits for its answer before the next starts.
    let trips = |before: usize| sends.load(Ordering::SeqCst) - before;

    let before = sends.load(Ordering::SeqCst);
    let n = c
        .exec(
            "INSERT INTO t VALUES ($1, $2, $3)",
            &[&7i64, &"seven", &json!({"k": 1})],
        )
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(trips(before), 1, "exec: one round trip");

    let before = sends.load(Ordering::SeqCst);
    let name: String = c
        .row("SELECT name FROM t WHERE id = $1", &[&7i64])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "seven");
    assert_eq!(trips(before), 1, "row: one round trip");

    let before = sends.load(Ordering::SeqCst);
    let none = c
        .row_opt("SELECT name FROM t WHERE id = $1", &[&8i64])
        .await
        .unwrap();
    assert!(none.is_none());
    assert_eq!(trips(before), 1, "row_opt: one round trip");

    let before = sends.load(Ordering::SeqCst);
    let rows = c.rows("SELECT id FROM t", &[]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(trips(before), 1, "rows: one round trip");

    // What the relay counts is real: a text query through the plain API
    // prepares first, and so costs a round trip more.
    let before = sends.load(Ordering::SeqCst);
    c.query_one("SELECT name FROM t WHERE id = $1", &[&7i64])
        .await
        .unwrap();
    assert!(
        trips(before) >= 2,
        "the plain API's prepare and execute: {} sends",
        trips(before)
    );
}

#[tokio::test]
async fn every_bound_type_reaches_the_server_as_declared() {
    let db = TestDb::create("one_trip_types").await;
    let c = &db.client;
    let text: String = "ü".into();
    let none: Option<String> = None;
    let list: Vec<String> = vec!["a".into(), "b".into()];
    let strs: Vec<&str> = vec!["c"];
    let ids: Vec<i64> = vec![1, 2];
    let doc = json!({"a": [1, 2]});
    let r = c
        .row(
            "SELECT pg_typeof($1)::text, pg_typeof($2)::text, pg_typeof($3)::text, pg_typeof($4)::text,
                    pg_typeof($5)::text, pg_typeof($6)::text, pg_typeof($7)::text, pg_typeof($8)::text,
                    pg_typeof($9)::text, pg_typeof($10)::text, pg_typeof($11)::text, pg_typeof($12)::text,
                    $1 || $2, $3 IS NULL, array_length($4, 1), $5 + $6 + $7, $8 * 2, $9, $10 -> 'a' ->> 1,
                    $11[1], $12[2]",
            &[
                &text,
                &"x",
                &none,
                &list,
                &3i16,
                &4i32,
                &5i64,
                &1.5f64,
                &true,
                &doc,
                &strs,
                &ids,
            ],
        )
        .await
        .unwrap();
    let types: Vec<String> = (0..12).map(|i| r.get(i)).collect();
    assert_eq!(
        types,
        [
            "text",
            "text",
            "text",
            "text[]",
            "smallint",
            "integer",
            "bigint",
            "double precision",
            "boolean",
            "jsonb",
            "text[]",
            "bigint[]"
        ]
    );
    assert_eq!(r.get::<_, String>(12), "üx");
    assert!(r.get::<_, bool>(13));
    assert_eq!(r.get::<_, i32>(14), 2);
    assert_eq!(r.get::<_, i64>(15), 12);
    assert_eq!(r.get::<_, f64>(16), 3.0);
    assert!(r.get::<_, bool>(17));
    assert_eq!(r.get::<_, String>(18), "2");
    assert_eq!(r.get::<_, String>(19), "c");
    assert_eq!(r.get::<_, i64>(20), 2);
    let oid: u32 = c
        .row("SELECT oid FROM pg_class WHERE relname = 'pg_class'", &[])
        .await
        .unwrap()
        .get(0);
    let name: String = c
        .row("SELECT relname::text FROM pg_class WHERE oid = $1", &[&oid])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "pg_class");
}
