//! Fault suite, DNS answer churn and oversized answers (NXDOMAIN, REFUSED and timeouts are
//! tests/faults_discovery.rs and tests/dns.rs; README.md's "Fault coverage" table lists
//! them all). Ends with the shared checker.
//!
//! dnsmasq answers `churn.test.local` from a hosts file with TTL 0 (`--local-ttl=0`) and logs
//! every query, so the test counts how often legate asks. A TXT record for the name makes
//! an empty hosts file a successful-but-empty answer (NOERROR, no address), not NXDOMAIN.

mod common;

use common::dns::Dnsmasq;
use common::fault::{delta, Expect, Probe};
use common::*;
use serde_json::Value;
use std::io::Write;
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};

const NAME: &str = "churn.test.local";
/// src/discovery/dns.rs `MAX_ENDPOINTS`.
const MAX_ENDPOINTS: usize = 1024;
/// src/discovery/dns.rs `MIN_REFRESH`.
const MIN_REFRESH: Duration = Duration::from_millis(250);
/// The bound on the set following a rewrite: the answers have TTL 0, so the next lookup is
/// MIN_REFRESH (250 ms) away, a failed one backs off at most max_ttl (2 s here), and an
/// oversized answer goes on over TCP; 10 s covers two lookups with a loaded machine's slack.
const FOLLOW: Duration = Duration::from_secs(10);
/// The real backend: the first address of every non-empty answer. The others
/// (127.1.x.y) have no listener: nothing but the held connections reaches them.
const BACKEND_IP: &str = "127.0.0.2";

/// dnsmasq answering `NAME` from a hosts file only, TTL 0, logging each query. The name
/// exists (a TXT record), so a hosts file without it answers NOERROR with no address rather
/// than NXDOMAIN.
fn start_dnsmasq(hosts: &str) -> Dnsmasq {
    Dnsmasq::start(
        hosts,
        0,
        "test.local",
        &[
            format!("--txt-record={NAME},legate-fault-test"),
            "--log-queries".to_string(),
        ],
    )
}

/// Replaces the hosts file (atomically, with a SIGHUP to reread it) and ends dnsmasq's TCP
/// children.
///
/// dnsmasq answers each TCP connection in a child forked with a copy of its data, and
/// the resolver keeps its TCP connection open (it is pooled): without this, every
/// answer too large for UDP would come from the hosts file as it was when that
/// connection was opened, for as long as it stays open. A real server does not do that;
/// the resolver reconnects when the connection is closed under it.
fn rewrite_hosts(dns: &Dnsmasq, hosts: &str) {
    dns.set_hosts(hosts);
    // The reread happens in dnsmasq's event loop, right after the signal: 10 ms for it. On a
    // loaded machine it may come later; then a child forked meanwhile keeps the old copy
    // only until the next rewrite (100 ms on) ends it, which nothing checked here minds.
    thread::sleep(Duration::from_millis(10));
    for child in children(dns.proc.pid()) {
        // SAFETY: kill(2) has no memory-safety preconditions; a child that already
        // exited is no error worth reporting.
        unsafe { libc::kill(child as libc::pid_t, libc::SIGKILL) };
    }
}

/// The query log's length now, to count what is logged after it.
fn log_offset(dns: &Dnsmasq) -> usize {
    std::fs::metadata(dns.log_path()).map_or(0, |m| m.len() as usize)
}

/// `query[TYPE] churn.test.local` lines logged between two offsets (TCP queries are
/// answered by forked children that log to the same file).
fn queries(dns: &Dnsmasq, qtype: &str, from: usize, to: usize) -> usize {
    let log = std::fs::read(dns.log_path()).unwrap_or_default();
    let to = to.min(log.len());
    let needle = format!("query[{qtype}] {NAME} ");
    String::from_utf8_lossy(&log[from.min(to)..to])
        .matches(&needle)
        .count()
}

/// The processes whose parent is `pid` (from /proc/*/stat).
fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            let stat =
                std::fs::read_to_string(format!("/proc/{candidate}/stat")).unwrap_or_default();
            // Fields after the command name (which may hold spaces): state, ppid, ...
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            ppid == Some(pid)
        })
        .collect()
}

/// A hosts file giving `NAME` `count` A records: the backend first, then 127.1.x.y.
fn hosts(count: usize) -> String {
    let mut text = String::new();
    for i in 0..count {
        if i == 0 {
            text.push_str(&format!("{BACKEND_IP} {NAME}\n"));
        } else {
            text.push_str(&format!("127.1.{}.{} {NAME}\n", i / 250, i % 250 + 1));
        }
    }
    text
}

/// The listener's published endpoints from `/endpoints`: (address, active connections).
fn endpoints(legate: &Legate) -> Vec<(String, u64)> {
    let (status, body) = legate.get("/endpoints");
    assert_eq!(status, 200, "/endpoints: {body}");
    let json: Value = serde_json::from_str(&body).expect("/endpoints is JSON");
    let listener = json["listeners"]
        .as_array()
        .and_then(|all| all.iter().find(|l| l["name"] == "churn"))
        .expect("listener churn in /endpoints")
        .clone();
    listener["endpoints"]
        .as_array()
        .expect("endpoints array")
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap_or_default().to_string(),
                e["active_connections"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn echo_on(stream: &mut TcpStream, line: &str) -> String {
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    read_line(stream).unwrap()
}

/// For 4 s the name's answer flips between 0, 1 and 500 A records with a SIGHUP to
/// dnsmasq every 100 ms, then turns to 1 100 records, then back to one.
/// - lookups have a floor: dnsmasq sees at most one per 250 ms (+ slack);
/// - the empty answer keeps the last set (`/endpoints` never shows 0 endpoints after the
///   first answer) and counts `legate_reloads_total{source="dns",result="error"}`;
/// - a 500-record answer arrives whole (dnsmasq truncates it over UDP; the resolver asks
///   again over TCP);
/// - 1 100 records are capped at 1 024 endpoints, every capped lookup counts
///   `legate_dns_truncated_total{listener}`, and the warning is logged once;
/// - connections opened to the real backend before the churn survive it: that endpoint is in
///   every answer, so it never leaves the set and keeps its state (its open-connection count);
/// - the shared checker: alive, `/ready` 200, fds/RSS/threads back near the baseline.
#[test]
fn dns_answer_churn_and_oversized_answers() {
    const HELD: usize = 8;
    let backend = TcpBackend::start_on(&format!("{BACKEND_IP}:0"), |mut stream| {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = std::io::Read::read(&mut stream, &mut buf) {
            if stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let port = backend.addr().port();
    let dns = start_dnsmasq(&hosts(1));
    let mut legate = Legate::builder()
        .raw(&dns.legate_table("0s", "2s"))
        .listener(
            Listener::new("churn")
                .upstream(format!("dns:{NAME}:{port}"))
                .set("health", r#"{ check = "none" }"#),
        )
        .start();
    // One lookup (milliseconds); 15 s is a loaded machine's slack.
    legate.wait_ready(Duration::from_secs(15));
    let backend_addr = format!("{BACKEND_IP}:{port}");
    assert_eq!(
        endpoints(&legate),
        [(backend_addr.clone(), 0)],
        "one record, one endpoint"
    );

    // Connections to the real backend, open across the whole churn.
    let mut held: Vec<TcpStream> = (0..HELD)
        .map(|i| {
            let mut stream = connect(legate.addr("churn"));
            assert_eq!(
                echo_on(&mut stream, &format!("before {i}")),
                format!("before {i}")
            );
            stream
        })
        .collect();
    assert_eq!(endpoints(&legate), [(backend_addr.clone(), HELD as u64)]);
    let probe = Probe::start(&legate);

    // Churn: every 100 ms a new file (0, 1, 500 records in turn) and a SIGHUP.
    let started = Instant::now();
    let from = log_offset(&dns);
    let period = Duration::from_secs(4);
    let (mut ticks, mut seen_sizes) = (0usize, std::collections::BTreeSet::new());
    // A new size at random each time (never the same twice in a row), so lookups every
    // ~250 ms do not alias with a fixed 300 ms cycle.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    eprintln!("churn seed {seed}");
    let mut size = 1;
    while started.elapsed() < period {
        let tick_start = Instant::now();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        size = match (size, seed % 2) {
            (0, 0) | (500, 0) => 1,
            (0, _) | (1, 0) => 500,
            _ => 0,
        };
        rewrite_hosts(&dns, &hosts(size));
        ticks += 1;
        assert_eq!(legate.get("/live").0, 200, "/live during the churn");
        let set = endpoints(&legate);
        assert!(
            !set.is_empty(),
            "the set emptied after {:?} of churn",
            started.elapsed()
        );
        let real = set.iter().find(|(addr, _)| *addr == backend_addr);
        assert_eq!(
            real.map(|(_, active)| *active),
            Some(HELD as u64),
            "the real backend left the set or lost its state after {:?}",
            started.elapsed()
        );
        seen_sizes.insert(set.len());
        if let Some(rest) = Duration::from_millis(100).checked_sub(tick_start.elapsed()) {
            thread::sleep(rest);
        }
    }
    let elapsed = started.elapsed();
    let to = log_offset(&dns);
    legate.assert_running();
    // AAAA answers are always empty and small (UDP only): one per lookup. A queries also
    // count the TCP retries of truncated answers.
    let lookups = queries(&dns, "AAAA", from, to);
    let a_queries = queries(&dns, "A", from, to);
    let floor_bound = (elapsed.as_millis() / MIN_REFRESH.as_millis()) as usize + 3;
    eprintln!(
        "churn: {ticks} rewrites in {elapsed:?}; {lookups} lookups ({a_queries} A queries, UDP and \
         TCP); bound {floor_bound}; set sizes seen {seen_sizes:?}"
    );
    assert!(
        lookups <= floor_bound,
        "{lookups} lookups in {elapsed:?}: more than one per {MIN_REFRESH:?} (bound {floor_bound})"
    );
    assert!(
        lookups >= 4,
        "legate stopped asking: {lookups} lookups in {elapsed:?}"
    );
    assert!(
        seen_sizes.contains(&500),
        "the 500-record answer (truncated over UDP, asked again over TCP) was never \
         published whole; sizes seen: {seen_sizes:?}"
    );

    // An empty answer held: the last good set stays, and each lookup is an error.
    let errors = |l: &Legate| {
        l.metrics().value(
            "legate_reloads_total",
            &[("source", "dns"), ("result", "error")],
        )
    };
    rewrite_hosts(&dns, &hosts(1));
    eventually(FOLLOW, "back to one endpoint", || {
        endpoints(&legate).len() == 1
    });
    let before = errors(&legate);
    rewrite_hosts(&dns, &hosts(0));
    eventually(FOLLOW, "an empty answer counted", || {
        errors(&legate) >= before + 2.0
    });
    assert_eq!(endpoints(&legate), [(backend_addr.clone(), HELD as u64)]);
    let (_, body) = legate.get("/endpoints");
    assert!(body.contains("no records"), "/endpoints: {body}");
    assert_eq!(legate.get("/ready").0, 200);

    // 1 100 records: capped at 1 024, every capped lookup counted, warned once.
    let truncated = |l: &Legate| {
        l.metrics()
            .value("legate_dns_truncated_total", &[("listener", "churn")])
    };
    let truncated_before = truncated(&legate);
    rewrite_hosts(&dns, &hosts(1100));
    eventually(FOLLOW, "1 024 endpoints", || {
        endpoints(&legate).len() == MAX_ENDPOINTS
    });
    // Once capped, the next lookup is MIN_REFRESH away (TTL 0): 5 s is a loaded machine's
    // slack for the second.
    eventually(Duration::from_secs(5), "two capped lookups counted", || {
        truncated(&legate) >= truncated_before + 2.0
    });
    let set = endpoints(&legate);
    assert_eq!(set.len(), MAX_ENDPOINTS);
    assert!(
        set.contains(&(backend_addr.clone(), HELD as u64)),
        "the lowest addresses are kept, the backend among them"
    );
    let warnings = legate.log().matches("DNS answer too large").count();
    assert_eq!(
        warnings,
        1,
        "one warning per state change:\n{}",
        legate.log()
    );

    // Back to the one real record: the rest leave, the held connections still work.
    rewrite_hosts(&dns, &hosts(1));
    eventually(FOLLOW, "back to one endpoint", || {
        endpoints(&legate) == [(backend_addr.clone(), HELD as u64)]
    });
    assert!(legate.log().contains("DNS answer fits again"));
    for (i, stream) in held.iter_mut().enumerate() {
        assert_eq!(echo_on(stream, &format!("after {i}")), format!("after {i}"));
    }
    assert_eq!(
        echo_roundtrip(legate.addr("churn"), "new").unwrap(),
        "new",
        "a new connection after the churn"
    );

    let after = probe.finish(
        &mut legate,
        Expect {
            moved: &[
                (
                    "legate_reloads_total",
                    &[("source", "dns"), ("result", "error")],
                ),
                (
                    "legate_reloads_total",
                    &[("source", "dns"), ("result", "ok")],
                ),
                ("legate_dns_truncated_total", &[("listener", "churn")]),
            ],
            // The resolver's TCP connection to dnsmasq (pooled, opened for the first answer
            // too large for UDP) and its UDP socket may stay open.
            fd_slack: 4,
            ..Expect::default()
        },
    );
    eprintln!(
        "dns errors +{}, dns answers +{}, truncated +{}",
        delta(
            &probe.before,
            &after,
            "legate_reloads_total",
            &[("source", "dns"), ("result", "error")]
        ),
        delta(
            &probe.before,
            &after,
            "legate_reloads_total",
            &[("source", "dns"), ("result", "ok")]
        ),
        delta(
            &probe.before,
            &after,
            "legate_dns_truncated_total",
            &[("listener", "churn")]
        ),
    );
    drop(held);
}
