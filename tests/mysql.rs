//! MariaDB through legate, with the real `mariadb` command-line client:
//! - a simple query;
//! - a multi-megabyte result, compared with the server's own SHA-256 of it;
//! - a table written and read back through the proxy;
//! - a `mysql` health check (the server's greeting) makes the listener ready.

mod common;

use common::*;
use std::time::Duration;

fn query(addr: std::net::SocketAddr, sql: &str) -> String {
    let output = mariadb_query(addr, sql);
    assert!(
        output.status.success(),
        "mariadb client failed on {sql:?} via {addr}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

#[test]
fn queries_and_a_multi_megabyte_result_through_legate() {
    let db = MariaDb::start();
    let mut legate = Legate::builder()
        .listener(Listener::new("mysql").upstream(db.addr()).set(
            "health",
            r#"{ check = "mysql", interval = "500ms", timeout = "1s" }"#,
        ))
        .start();
    // Ready after the first `mysql` check (every 500 ms, 1 s timeout) of a running MariaDB:
    // about a second; 20 s is a loaded machine's slack.
    legate.wait_ready(Duration::from_secs(20));
    let via = legate.addr("mysql");

    assert_eq!(query(via, "SELECT 40 + 2").trim(), "42");

    // 6 MB in one column; the server also tells us its hash, computed before the bytes moved.
    let out = query(
        via,
        "SELECT SHA2(REPEAT('legate', 1000000), 256), REPEAT('legate', 1000000)",
    );
    let line = out.strip_suffix('\n').unwrap_or(&out);
    let (server_hash, value) = line.split_once('\t').expect("two columns");
    assert_eq!(value.len(), 6_000_000);
    assert_eq!(sha256_hex(value.as_bytes()), server_hash);

    let out = query(via, "SELECT REPEAT('x', 4000000)");
    assert_eq!(out.len(), 4_000_001);
    assert!(out.trim_end().bytes().all(|b| b == b'x'));

    // Write through legate, read back through legate.
    query(
        via,
        "CREATE DATABASE t; CREATE TABLE t.rows (id INT PRIMARY KEY, v LONGTEXT); \
         INSERT INTO t.rows WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < 500) \
         SELECT n, REPEAT(CHAR(65 + n % 26), 10000) FROM s",
    );
    let out = query(via, "SELECT COUNT(*), SUM(LENGTH(v)) FROM t.rows");
    assert_eq!(out.trim(), "500\t5000000");
    let out = query(via, "SELECT v FROM t.rows ORDER BY id");
    assert_eq!(out.lines().count(), 500);
    assert_eq!(out.len(), 500 * 10_001);

    // Many short connections in a row, like a pool warming up.
    for i in 0..20 {
        assert_eq!(query(via, &format!("SELECT {i}")).trim(), i.to_string());
    }
}
