//! Protocol-aware Redis health checks against real `redis-server`s, through the real binary:
//! - `redis-primary` over a primary/replica pair: writes through legate land on the primary and
//!   `/endpoints` shows the replica's role; after the roles switch (`REPLICAOF NO ONE` on the
//!   replica, `REPLICAOF` on the old primary) new writes with the same client settings succeed
//!   on the new primary within interval + timeout + 1s (the measured time is printed), and with
//!   `close_on_unhealthy` a client connection opened before the switch is closed;
//! - `redis`: a backend paused with SIGSTOP is marked unhealthy and new connections avoid it;
//!   after SIGCONT it is healthy again and gets traffic.

mod common;

use common::*;
use serde_json::Value;
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// legate is ready after the first check of a running redis-server: milliseconds; 10 s is a
/// loaded 2-core machine's slack.
const READY: Duration = Duration::from_secs(10);

/// The bound on a health verdict or on traffic following one: checks here run every 200 ms
/// (timeout 200 ms) and a state changes after at most two results (`unhealthy_after` 2), well
/// under a second; 5 s is a loaded machine's slack.
const VERDICT: Duration = Duration::from_secs(5);

/// The client settings used before and after a switch: short timeouts, a new connection each
/// time, as a pooled client reconnecting would. (2 s each: the server answers in
/// milliseconds, and the switch loop below retries a failed write rather than wait long.)
fn client(addr: SocketAddr) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    let con = client.get_connection_with_timeout(Duration::from_secs(2))?;
    con.set_read_timeout(Some(Duration::from_secs(2)))?;
    con.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(con)
}

fn replicaof(server: &RedisServer, primary: Option<SocketAddr>) {
    let mut con = redis_connect(server.addr()).expect("connect to redis-server");
    let mut cmd = redis::cmd("REPLICAOF");
    match primary {
        Some(primary) => cmd.arg(primary.ip().to_string()).arg(primary.port()),
        None => cmd.arg("NO").arg("ONE"),
    };
    let _: () = cmd.query(&mut con).expect("REPLICAOF");
}

fn get(addr: SocketAddr, key: &str) -> Option<String> {
    let mut con = redis_connect(addr).expect("connect to redis-server");
    redis::cmd("GET").arg(key).query(&mut con).expect("GET")
}

/// This endpoint's entry in `/endpoints` (listener `redis`).
fn endpoint(legate: &Legate, addr: SocketAddr) -> Value {
    let (status, body) = legate.get("/endpoints");
    assert_eq!(status, 200, "/endpoints: {body}");
    let json: Value = serde_json::from_str(&body).expect("/endpoints is JSON");
    json["listeners"]
        .as_array()
        .and_then(|listeners| listeners.iter().find(|l| l["name"] == "redis"))
        .and_then(|listener| listener["endpoints"].as_array())
        .and_then(|endpoints| endpoints.iter().find(|e| e["address"] == addr.to_string()))
        .cloned()
        .unwrap_or_else(|| panic!("{addr} not in /endpoints: {body}"))
}

fn endpoint_count(legate: &Legate, state: &str) -> f64 {
    legate.metrics().value(
        "legate_endpoints",
        &[("listener", "redis"), ("state", state)],
    )
}

/// The port of the redis-server a fresh connection through `addr` reaches.
fn served_by(addr: SocketAddr) -> redis::RedisResult<u16> {
    let mut con = client(addr)?;
    let answer: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("port")
        .query(&mut con)?;
    Ok(answer
        .get(1)
        .and_then(|port| port.parse().ok())
        .unwrap_or(0))
}

#[test]
fn redis_primary_follows_a_role_switch_and_closes_old_connections() {
    let primary = RedisServer::start();
    let replica = RedisServer::start();
    replicaof(&replica, Some(primary.addr()));
    let interval = Duration::from_millis(200);
    let timeout = Duration::from_millis(200);
    let mut legate = Legate::builder()
        .listener(
            Listener::new("redis")
                .upstream(primary.addr())
                .upstream(replica.addr())
                .set(
                    "health",
                    r#"{ check = "redis-primary", interval = "200ms", timeout = "200ms", close_on_unhealthy = true }"#,
                ),
        )
        .start();
    legate.wait_ready(READY);
    let through = legate.addr("redis");

    // The replica is "healthy but not eligible": unhealthy in the metric, its role shown.
    eventually(VERDICT, "replica shown with its role", || {
        let replica = endpoint(&legate, replica.addr());
        replica["health"] == "unhealthy" && replica["detail"] == "role: slave"
    });
    let shown = endpoint(&legate, replica.addr());
    assert!(
        shown["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("role: slave")),
        "{shown}"
    );
    assert_eq!(endpoint(&legate, primary.addr())["detail"], "role: master");
    // The gauges follow the live state `/endpoints` shows once the readiness task runs.
    eventually(
        VERDICT,
        "the gauges to count 1 healthy and 1 unhealthy",
        || endpoint_count(&legate, "healthy") == 1.0 && endpoint_count(&legate, "unhealthy") == 1.0,
    );

    // Every write through legate lands on the primary (a replica would answer READONLY).
    for i in 0..10 {
        let mut con = client(through).expect("connect through legate");
        let _: () = redis::cmd("SET")
            .arg(format!("before-{i}"))
            .arg(i)
            .query(&mut con)
            .unwrap_or_else(|e| panic!("SET #{i} through legate: {e}"));
    }
    assert_eq!(get(primary.addr(), "before-9").as_deref(), Some("9"));

    // A client connection open across the switch.
    let mut open = connect(through);
    open.write_all(b"PING\r\n").unwrap();
    assert_eq!(read_line(&mut open).unwrap().trim_end(), "+PONG");

    // The switch: promote the replica, demote the old primary.
    replicaof(&replica, None);
    replicaof(&primary, Some(replica.addr()));
    let switched = Instant::now();
    // What this test promises (see the module doc): one check interval and one check timeout
    // to notice the new roles, plus 1 s for the client's reconnects and a loaded machine.
    let budget = interval + timeout + Duration::from_secs(1);

    let mut attempts = 0;
    let mut last_error;
    let elapsed = loop {
        attempts += 1;
        let written = client(through).and_then(|mut con| {
            redis::cmd("SET")
                .arg("after-switch")
                .arg(attempts)
                .query::<()>(&mut con)
        });
        match written {
            Ok(()) => break switched.elapsed(),
            Err(error) => last_error = error.to_string(),
        }
        assert!(
            switched.elapsed() < budget,
            "no successful write through legate within {budget:?} of the switch \
             ({attempts} attempts, last error: {last_error})"
        );
        std::thread::sleep(Duration::from_millis(10)); // the first success, timed within 10 ms
    };
    println!(
        "redis-primary switch: first successful write through legate {} ms after the role switch \
         ({attempts} attempts; interval 200ms, timeout 200ms)",
        elapsed.as_millis()
    );
    assert!(elapsed < budget);
    assert_eq!(
        get(replica.addr(), "after-switch"),
        Some(attempts.to_string()),
        "the write landed on the new primary"
    );

    // close_on_unhealthy: the connection opened before the switch is closed.
    // Within the same budget as the write (the unhealthy verdict closes it), plus 100 ms for
    // the close to travel.
    let left = budget.saturating_sub(switched.elapsed()) + Duration::from_millis(100);
    assert!(
        closed_within(&mut open, left),
        "the connection opened before the switch is still open {:?} after it",
        switched.elapsed()
    );

    // /endpoints follows the new roles: the old primary's next 200 ms check at the latest,
    // since the new primary already took writes; 2 s is a loaded machine's slack.
    eventually(
        Duration::from_secs(2),
        "roles swapped in /endpoints",
        || {
            endpoint(&legate, primary.addr())["detail"] == "role: slave"
                && endpoint(&legate, replica.addr())["detail"] == "role: master"
        },
    );
    eventually(VERDICT, "the gauge to count 1 healthy", || {
        endpoint_count(&legate, "healthy") == 1.0
    });
}

#[test]
fn redis_check_avoids_a_paused_backend_and_readmits_it() {
    let first = RedisServer::start();
    let second = RedisServer::start();
    let mut legate = Legate::builder()
        .listener(
            Listener::new("redis")
                .upstream(first.addr())
                .upstream(second.addr())
                .set(
                    "health",
                    r#"{ check = "redis", interval = "200ms", timeout = "200ms" }"#,
                ),
        )
        .start();
    legate.wait_ready(READY);
    let through = legate.addr("redis");
    eventually(VERDICT, "both backends healthy", || {
        endpoint_count(&legate, "healthy") == 2.0
    });

    second.pause();
    eventually(VERDICT, "paused backend unhealthy", || {
        endpoint(&legate, second.addr())["health"] == "unhealthy"
    });
    let shown = endpoint(&legate, second.addr());
    assert!(
        shown["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("PING")),
        "{shown}"
    );
    // The gauges are published by the readiness task a moment after the state
    // `/endpoints` reads live.
    eventually(
        VERDICT,
        "the gauges to count 1 healthy and 1 unhealthy",
        || endpoint_count(&legate, "healthy") == 1.0 && endpoint_count(&legate, "unhealthy") == 1.0,
    );
    for i in 0..20 {
        let port = served_by(through)
            .unwrap_or_else(|e| panic!("connection #{i} while a backend is paused: {e}"));
        assert_eq!(
            port, first.port,
            "connection #{i} reached the paused backend"
        );
    }

    second.resume();
    eventually(VERDICT, "resumed backend healthy", || {
        endpoint_count(&legate, "healthy") == 2.0
    });
    eventually(VERDICT, "traffic reaches the resumed backend", || {
        served_by(through).ok() == Some(second.port)
    });
}
