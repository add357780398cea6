//! Entry points for the cargo-fuzz targets in `fuzz/` and for `tests/fuzz_corpus.rs`, which
//! replays their seed corpora and every crash they found on stable `cargo test`.
//!
//! Hidden from the docs and not part of legate's interface: the parsers stay private to
//! their modules, and this module is the one door the fuzzers use. Each function takes the
//! bytes a fuzzer made up, runs them through the same code legate runs on such input (a
//! file's text, a backend's reply, a DNS response, an admin request) and says whether the
//! input was accepted. None of them may panic, whatever the bytes.

use crate::admin::server::serve_connection;
use crate::config::{Config, ListenerConfig, Target};
use crate::discovery::EndpointSpec;
use crate::health::{mysql, redis};
use crate::state::{ListenerState, Shared};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// A config file's text (`legate check`, `legate run -c`, every reload). Like
/// `Config::load`, bytes that are not UTF-8 are refused before parsing.
pub fn config(data: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|error| error.to_string())?;
    let config = Config::parse(text, Path::new("fuzz.toml")).map_err(|error| error.to_string())?;
    // A valid config's targets print back as entries that parse to the same target.
    for listener in &config.listeners {
        for target in &listener.upstream {
            round_trip(target);
        }
    }
    Ok(())
}

/// One upstream target (`--upstream` and the file's `upstream` entries).
pub fn target(data: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|error| error.to_string())?;
    let target = text.parse::<Target>().map_err(|error| error.to_string())?;
    round_trip(&target);
    Ok(())
}

/// `Target`'s `Display` is the form `/endpoints` and the logs show; it must read back.
fn round_trip(target: &Target) {
    let shown = target.to_string();
    assert_eq!(
        shown.parse::<Target>().as_ref(),
        Ok(target),
        "{target:?} displays as {shown:?}, which does not parse back"
    );
}

/// A duration as written in the config (`250ms`, `2s`, `5m`).
pub fn duration(data: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|error| error.to_string())?;
    crate::config::duration::parse_duration(text).map(|_| ())
}

/// An endpoint file's contents (`file:PATH` targets); non-UTF-8 is refused first, as the
/// file watcher does.
pub fn endpoint_file(data: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(data).map_err(|error| error.to_string())?;
    crate::discovery::endpoint_file::parse_endpoint_file(text)
        .map(|_| ())
        .map_err(|error| error.to_string())
}

/// A DNS response as a server sent it: decoded by hickory, then turned into endpoints by
/// the same functions a live A/AAAA or SRV lookup uses. Accepted when it gives endpoints.
pub fn dns_answer(data: &[u8]) -> Result<(), String> {
    let message =
        hickory_resolver::proto::op::Message::from_vec(data).map_err(|error| error.to_string())?;
    let endpoints = crate::discovery::dns::endpoints_from_response(
        &message.answers,
        &message.additionals,
        6379,
    );
    if endpoints.is_empty() {
        return Err("no endpoints in the response".into());
    }
    Ok(())
}

/// What a Redis server sent to a health check: every reply in the bytes (pipelined after
/// `AUTH`), each judged as a `PING` and as a `ROLE` answer. Accepted when the bytes are
/// whole replies.
pub fn redis_reply(data: &[u8]) -> Result<(), String> {
    let mut rest = data;
    while !rest.is_empty() {
        let Some((reply, used)) = redis::parse(rest).map_err(|error| error.to_string())? else {
            return Err("incomplete reply".into());
        };
        // Formatting the verdicts exercises the reasons /endpoints would show.
        let _ = format!("{:?}", redis::judge_ping(reply.clone()));
        let _ = format!("{:?}", redis::judge_role(reply));
        rest = &rest[used..];
    }
    Ok(())
}

/// The first packet a MySQL or MariaDB server sent to a health check; the same bytes as
/// a reply to the check's login (`health.user`).
pub fn mysql_greeting(data: &[u8]) -> Result<(), String> {
    let _ = format!("{:?}", mysql::parse_login_reply(data));
    match mysql::parse(data)? {
        Some(greeting) => {
            let _ = format!("{greeting:?}");
            Ok(())
        }
        None => Err("incomplete greeting".into()),
    }
}

/// A frame arriving on the handoff socket (a newcomer's or the running legate's message).
pub fn handover_message(data: &[u8]) -> Result<(), String> {
    use crate::lifecycle::handover::protocol;
    let message = protocol::decode(data).map_err(|error| error.to_string())?;
    // What decodes must encode back to a frame that decodes the same.
    if protocol::decode(&protocol::encode(&message)).as_ref() != Ok(&message) {
        panic!("{message:?} does not survive a round trip");
    }
    Ok(())
}

/// Bytes sent to the admin port by a loopback peer, served by the real hyper connection
/// and router over an in-memory pipe against a process with one listener; returns what
/// the admin server wrote back. Panics if the connection is still open 10s after the
/// peer finished sending.
pub fn admin_request(data: &[u8]) -> Vec<u8> {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => panic!("cannot build a tokio runtime: {error}"),
    };
    runtime.block_on(async {
        let shared = Arc::new(one_listener());
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer = SocketAddr::from(([127, 0, 0, 1], 40000));
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let send = async {
            // The server may close first (a 400, say): then the rest is not read.
            let _ = to_server.write_all(data).await;
            // Like a client waiting for its answers before it closes: hyper drops a
            // connection at once when it reads EOF (no half-close), unanswered. Everything
            // is in memory on one thread, so a few turns let the server answer all it can.
            for _ in 0..64 {
                tokio::task::yield_now().await;
            }
            let _ = to_server.shutdown().await;
        };
        let mut response = Vec::new();
        let receive = from_server.read_to_end(&mut response);
        let exchange = async {
            let (_, _, _) = tokio::join!(serve_connection(server, shared, peer), send, receive);
        };
        if tokio::time::timeout(Duration::from_secs(10), exchange)
            .await
            .is_err()
        {
            panic!("the admin connection was still open 10s after the request ended");
        }
        response
    })
}

/// A process state with one listener and one endpoint, so `/ready`, `/endpoints` and
/// `/metrics` have something to render.
fn one_listener() -> Shared {
    let shared = Shared::new(None);
    let backend = SocketAddr::from(([192, 0, 2, 10], 6379));
    let upstream = Target::Static(backend);
    let config = ListenerConfig::with_defaults(
        "redis".into(),
        SocketAddr::from(([127, 0, 0, 1], 6380)),
        vec![upstream.clone()],
    );
    let token = CancellationToken::new();
    let state = ListenerState::new(config, Default::default(), &shared.metrics, &token, &token);
    state
        .endpoints
        .update(&upstream.to_string(), vec![EndpointSpec::plain(backend)]);
    shared.listeners.store(Arc::new(vec![Arc::new(state)]));
    shared
}
