//! Redis through legate, with a real Redis client:
//! - SET/GET (and a few other commands) round-trip through the proxy;
//! - a 32 MiB value written and read back, compared by SHA-256;
//! - a `redis` health check makes the listener ready.

mod common;

use common::*;
use std::time::Duration;

fn start(health: Option<&str>) -> (RedisServer, Legate) {
    let redis = RedisServer::start();
    let mut listener = Listener::new("redis").upstream(redis.addr());
    if let Some(health) = health {
        listener = listener.set("health", health);
    }
    let mut legate = Legate::builder().listener(listener).start();
    // Ready after the first check of a running redis-server: milliseconds; 15 s is a loaded
    // machine's slack.
    legate.wait_ready(Duration::from_secs(15));
    (redis, legate)
}

#[test]
fn set_and_get_through_legate() {
    let (_redis, legate) = start(None);
    let mut con = redis_connect(legate.addr("redis")).expect("connect through legate");
    let _: () = redis::cmd("SET")
        .arg("greeting")
        .arg("hello from legate")
        .query(&mut con)
        .expect("SET");
    let value: String = redis::cmd("GET")
        .arg("greeting")
        .query(&mut con)
        .expect("GET");
    assert_eq!(value, "hello from legate");
    let count: i64 = redis::cmd("INCRBY")
        .arg("n")
        .arg(41)
        .query(&mut con)
        .unwrap();
    let count2: i64 = redis::cmd("INCR").arg("n").query(&mut con).unwrap();
    assert_eq!((count, count2), (41, 42));

    // A second, independent connection sees the same data (it is the same server).
    let mut other = redis_connect(legate.addr("redis")).expect("second connection");
    let value: String = redis::cmd("GET").arg("greeting").query(&mut other).unwrap();
    assert_eq!(value, "hello from legate");
}

#[test]
fn a_32_mib_value_round_trips() {
    let (_redis, legate) = start(None);
    let value = payload(32 * 1024 * 1024, 0x5eed);
    let expected = sha256_hex(&value);
    let mut con = redis_connect(legate.addr("redis")).expect("connect through legate");
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg(&value[..])
        .query(&mut con)
        .expect("SET 32 MiB");
    let length: usize = redis::cmd("STRLEN").arg("big").query(&mut con).unwrap();
    assert_eq!(length, value.len());
    drop(value);
    let back: Vec<u8> = redis::cmd("GET")
        .arg("big")
        .query(&mut con)
        .expect("GET 32 MiB");
    assert_eq!(back.len(), 32 * 1024 * 1024);
    assert_eq!(sha256_hex(&back), expected, "the value came back changed");
}

#[test]
fn redis_health_check_makes_the_listener_ready() {
    let (_redis, legate) = start(Some(
        r#"{ check = "redis", interval = "200ms", timeout = "500ms" }"#,
    ));
    let mut con = redis_connect(legate.addr("redis")).unwrap();
    let pong: String = redis::cmd("PING").query(&mut con).unwrap();
    assert_eq!(pong, "PONG");
    let (status, _) = legate.get("/startup");
    assert_eq!(status, 200);
}
