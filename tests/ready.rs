//! Readiness and the other admin endpoints:
//! - `/ready` is 200 `ready` once the backend has passed its first check; `/live` is 200;
//!   `/startup` is 200;
//! - the only backend goes down: `/ready` 503 with a body naming the listener, `ready_file`
//!   removed, `/startup` stays 200 (a latch), `/live` stays 200; the backend returns: 200 again
//!   and the `ready_file` is back;
//! - a backend that is not there at start: legate starts anyway, `/startup` and `/ready` are 503
//!   (naming the listener) until it appears;
//! - `required = false`: a listener whose backend is down does not hold `/ready` back;
//! - `/endpoints` is JSON naming each listener and its endpoint;
//! - unknown paths are 404.

mod common;

use common::*;
use std::time::Duration;

/// The bound on every wait here: `/ready` and the `ready_file` follow a 200 ms health check
/// (unhealthy after 2 failures, so within about a second); 15 s adds a loaded 2-core
/// machine's slack.
const T: Duration = Duration::from_secs(15);

#[test]
fn ready_follows_the_backend_and_startup_latches() {
    let mut redis = RedisServer::start();
    let mut legate = Legate::builder()
        .ready_file()
        .listener(Listener::new("cache").upstream(redis.addr()).fast_health())
        .start();
    legate.wait_ready(T);
    let (status, body) = legate.get("/ready");
    assert_eq!(status, 200);
    assert_eq!(body.trim(), "ready");
    assert_eq!(legate.get("/live").0, 200);
    assert_eq!(legate.get("/startup").0, 200);
    eventually(T, "ready_file to exist while ready", || {
        legate.ready_file().exists()
    });

    redis.stop();
    legate.wait_not_ready(T);
    let (status, body) = legate.get("/ready");
    assert_eq!(status, 503);
    assert!(
        body.contains("cache"),
        "the 503 body should name the listener that is not ready, got: {body:?}"
    );
    eventually(T, "ready_file to be removed while not ready", || {
        !legate.ready_file().exists()
    });
    assert_eq!(
        legate.get("/startup").0,
        200,
        "/startup must stay 200 once ready"
    );
    assert_eq!(legate.get("/live").0, 200);

    redis.restart();
    legate.wait_ready(T);
    eventually(T, "ready_file to come back", || {
        legate.ready_file().exists()
    });
    assert_eq!(legate.get("/startup").0, 200);
}

#[test]
fn a_backend_missing_at_start_is_not_a_startup_error() {
    let mut redis = RedisServer::start();
    redis.stop();
    let mut legate = Legate::builder()
        .ready_file()
        .listener(Listener::new("late").upstream(redis.addr()).fast_health())
        .start();
    assert_eq!(legate.get("/live").0, 200);
    let (status, body) = legate.get("/ready");
    assert_eq!(status, 503);
    assert!(
        body.contains("late"),
        "503 body should name the listener: {body:?}"
    );
    assert_eq!(
        legate.get("/startup").0,
        503,
        "/startup before the first ready"
    );
    assert!(!legate.ready_file().exists());
    // The listener is bound even though the backend is not there.
    assert!(is_listening(legate.addr("late").port()));

    redis.restart();
    legate.wait_ready(T);
    assert_eq!(legate.get("/startup").0, 200);
    let mut con = redis_connect(legate.addr("late")).unwrap();
    let pong: String = redis::cmd("PING").query(&mut con).unwrap();
    assert_eq!(pong, "PONG");
}

#[test]
fn a_listener_that_is_not_required_does_not_hold_ready_back() {
    let live = TcpBackend::echo();
    let mut legate = Legate::builder()
        .listener(Listener::new("main").upstream(live.addr()).fast_health())
        .listener(
            Listener::new("optional")
                .upstream(local(free_port()))
                .set("required", "false")
                .fast_health(),
        )
        .start();
    legate.wait_ready(T);
    assert_eq!(legate.get("/ready").0, 200);
}

#[test]
fn endpoints_is_json_listing_listeners_and_endpoints() {
    let backend = TcpBackend::echo();
    let mut legate = Legate::builder()
        .listener(Listener::new("kv").upstream(backend.addr()))
        .start();
    legate.wait_ready(T);
    let (status, body) = legate.get("/endpoints");
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("/endpoints is not JSON ({e}): {body}"));
    let strings = all_strings(&json);
    assert!(
        strings.iter().any(|s| s == "kv"),
        "/endpoints should name the listener `kv`: {body}"
    );
    let endpoint = backend.addr().to_string();
    assert!(
        strings.iter().any(|s| s.contains(&endpoint)),
        "/endpoints should list the endpoint {endpoint}: {body}"
    );
}

#[test]
fn unknown_admin_path_is_404() {
    let backend = TcpBackend::echo();
    let legate = Legate::builder()
        .listener(Listener::new("kv").upstream(backend.addr()))
        .start();
    assert_eq!(legate.get("/no-such-thing").0, 404);
    assert_eq!(legate.get("/live").0, 200);
}

/// Every string in a JSON document, object keys included.
fn all_strings(value: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![value];
    while let Some(value) = stack.pop() {
        match value {
            serde_json::Value::String(s) => out.push(s.clone()),
            serde_json::Value::Array(items) => stack.extend(items),
            serde_json::Value::Object(map) => {
                out.extend(map.keys().cloned());
                stack.extend(map.values());
            }
            _ => {}
        }
    }
    out
}
