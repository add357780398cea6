//! The last-resort rule, against real `redis-server`s through the real binary:
//! - one Redis endpoint with the default health check: stop it, let clients fail for a
//!   while, start it again; the first connection through legate after Redis answers
//!   directly succeeds (no waiting for a check interval or an ejection back-off), and
//!   `/ready` stays 503 while the endpoint is down;
//! - a primary/replica pair under `redis-primary`: with the primary gone, connections are
//!   dialled to the primary as a last resort and fail, and none ever reaches the replica.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Readiness turning either way: the default check runs every 5 s and the failure needs
/// `unhealthy_after` 2 of them, so 10 s, plus slack for a loaded 2-core machine.
const READINESS: Duration = Duration::from_secs(15);
/// How long the backend stays down: long enough for clients to fail several times and
/// for the endpoint to be ejected (1 s first back-off), as in the issue's 3 s outage.
const OUTAGE: Duration = Duration::from_secs(3);
/// Only to report how late a recovery was, if the first connection failed: generous, it
/// never bounds a passing run.
const RECOVERY_REPORT: Duration = Duration::from_secs(30);

/// A fresh connection with timeouts short enough for a tight loop (2 s: a PING answers in
/// well under a millisecond; a dial through legate is bounded by its 1 s connect_timeout).
fn fresh(addr: SocketAddr) -> Result<redis::Connection, String> {
    let client = redis::Client::open(format!("redis://{addr}/")).map_err(|e| e.to_string())?;
    let con = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .map_err(|e| e.to_string())?;
    con.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    Ok(con)
}

/// One PING over a fresh connection.
fn ping(addr: SocketAddr) -> Result<(), String> {
    let mut con = fresh(addr)?;
    let pong: String = redis::cmd("PING")
        .query(&mut con)
        .map_err(|e| e.to_string())?;
    (pong == "PONG")
        .then_some(())
        .ok_or_else(|| format!("PING answered {pong:?}"))
}

/// The role (`master`/`slave`) of the server a fresh connection through `addr` reaches.
fn role(addr: SocketAddr) -> Result<String, String> {
    let mut con = fresh(addr)?;
    let role: redis::Value = redis::cmd("ROLE")
        .query(&mut con)
        .map_err(|e| e.to_string())?;
    match role {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::BulkString(bytes)) => Ok(String::from_utf8_lossy(bytes).into()),
            other => Err(format!("ROLE answered {other:?}")),
        },
        other => Err(format!("ROLE answered {other:?}")),
    }
}

#[test]
fn the_first_connection_after_a_lone_backend_returns_succeeds() {
    let mut redis = RedisServer::start();
    // No `health` key: the default `tcp` check at its default interval, as a user gets it.
    let mut legate = Legate::builder()
        .listener(Listener::new("redis").upstream(redis.addr()))
        .start();
    legate.wait_ready(READINESS);
    let through = legate.addr("redis");
    ping(through).expect("PING through legate before any outage");

    let mut recoveries = Vec::new();
    for cycle in 0..4 {
        redis.stop();
        // Clients keep trying while the backend is down: all fail (nothing answers), the
        // endpoint gets passively ejected and, at the next check, unhealthy.
        let down_since = Instant::now();
        let mut failed = 0;
        while down_since.elapsed() < OUTAGE {
            assert!(
                ping(through).is_err(),
                "cycle {cycle}: a PING through legate succeeded with Redis down"
            );
            failed += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(failed > 0);
        legate.wait_not_ready(READINESS);

        // `restart` returns once Redis answers PING directly.
        redis.restart();
        let answered_directly = Instant::now();
        let first = ping(through);
        let mut attempts = 1;
        let mut result = first.clone();
        while result.is_err() && answered_directly.elapsed() < RECOVERY_REPORT {
            std::thread::sleep(Duration::from_millis(10));
            result = ping(through);
            attempts += 1;
        }
        let recovery = answered_directly.elapsed();
        eprintln!(
            "cycle {cycle}: first PING through legate after Redis answered directly: {first:?}; \
             succeeded after {attempts} attempt(s), {recovery:?}"
        );
        assert!(
            first.is_ok(),
            "cycle {cycle}: the first connection after Redis came back failed ({first:?}); \
             it succeeded only after {attempts} attempts, {recovery:?}"
        );
        recoveries.push(recovery);
        legate.wait_ready(READINESS);
    }
    recoveries.sort();
    eprintln!(
        "recovery after an outage: median {:?}, worst {:?} over {} cycles",
        recoveries[recoveries.len() / 2],
        recoveries[recoveries.len() - 1],
        recoveries.len()
    );
    assert!(
        legate.metrics().value(
            "legate_last_resort_connections_total",
            &[("listener", "redis")]
        ) >= 1.0,
        "connections during the outages went through the last-resort path"
    );
}

#[test]
fn a_replica_is_never_a_last_resort() {
    let mut primary = RedisServer::start();
    let replica = RedisServer::start();
    {
        let mut con = redis_connect(replica.addr()).expect("connect to the replica");
        let _: () = redis::cmd("REPLICAOF")
            .arg(primary.addr().ip().to_string())
            .arg(primary.addr().port())
            .query(&mut con)
            .expect("REPLICAOF");
    }
    let mut legate = Legate::builder()
        .listener(
            Listener::new("redis")
                .upstream(primary.addr())
                .upstream(replica.addr())
                .set(
                    "health",
                    r#"{ check = "redis-primary", interval = "200ms", timeout = "500ms" }"#,
                ),
        )
        .start();
    legate.wait_ready(READINESS);
    let through = legate.addr("redis");
    assert_eq!(role(through).as_deref(), Ok("master"));

    primary.stop();
    legate.wait_not_ready(READINESS);
    let started = Instant::now();
    let mut tries = 0;
    while started.elapsed() < OUTAGE {
        tries += 1;
        match role(through) {
            Ok(role) => panic!("try {tries}: a connection through legate reached a {role}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let last_resort = legate.metrics().value(
        "legate_last_resort_connections_total",
        &[("listener", "redis")],
    );
    eprintln!("{tries} connections with the primary gone: none reached the replica; {last_resort} dialled the old primary as a last resort");
    assert!(
        last_resort >= 1.0,
        "the gone primary (it failed to connect) is a last-resort candidate"
    );
}
