//! No secret ever leaves legate: canary secrets are planted, legate runs at
//! `--log-level trace`, and every output is searched for them.
//!
//! Planted: the right Redis password (inline) of a `redis-server` with `requirepass`, a
//! wrong inline password, a wrong `password_file`'s contents, the private key of a TLS
//! termination listener and of an origination client certificate (their PEM bodies), and a
//! broken key file whose contents are a canary.
//! Exercised: traffic through the listeners (an `AUTH` through the proxy, a failing TLS
//! origination, garbage on the TLS port), failing health checks, `/endpoints`, `/metrics`,
//! `/ready`, `/startup`, four reloads that are refused (a broken key file, password and
//! password_file together, a password on a tcp check, a TOML syntax error right after
//! the password) and `legate check` on each of those files.
//! Searched: every admin answer, the whole log, and `legate check`'s output.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// The bound on waiting for legate: start-up, the first health verdicts (checked at once),
/// a SIGTERM drain with nothing open take milliseconds; 15 s is a loaded 2-core machine's
/// slack.
const T: Duration = Duration::from_secs(15);

/// The bound on a refused reload showing in the log and on `legate check`: milliseconds of
/// work, no start-up or health check to wait for; 10 s is a loaded machine's slack.
const RELOAD: Duration = Duration::from_secs(10);

const PASSWORD: &str = "CANARY-redis-password-4f1d7a";
const WRONG_PASSWORD: &str = "CANARY-wrong-password-9b2c1e";
const WRONG_PASSWORD_FILE: &str = "CANARY-password-file-7e3a90";
const BROKEN_KEY: &str = "CANARY-broken-key-contents-c0ffee";

struct Files {
    cert: String,
    key: String,
    broken_key: String,
    password_file: String,
    /// The base64 lines of the two real private keys.
    key_lines: Vec<String>,
}

fn write_files(dir: &Path) -> Files {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let server = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let client = rcgen::generate_simple_self_signed(vec!["client".to_string()]).unwrap();
    let server_key = server.signing_key.serialize_pem();
    let client_key = client.signing_key.serialize_pem();
    let key_lines = [&server_key, &client_key]
        .iter()
        .flat_map(|pem| pem.lines())
        .filter(|line| !line.starts_with("-----") && line.len() >= 16)
        .map(str::to_owned)
        .collect();
    let broken = format!(
        "-----BEGIN PRIVATE KEY-----\n{BROKEN_KEY}\n-----END PRIVATE KEY-----\n{BROKEN_KEY}\n"
    );
    write("client.pem", &client.cert.pem());
    write("client.key", &client_key);
    Files {
        cert: write("server.pem", &server.cert.pem()),
        key: write("server.key", &server_key),
        broken_key: write("broken.key", &broken),
        password_file: write("redis.password", &format!("{WRONG_PASSWORD_FILE}\n")),
        key_lines,
    }
}

struct Ports {
    admin: u16,
    redis: u16,
    wrong: u16,
    wrong_file: u16,
    tls_server: u16,
    tls_client: u16,
}

/// The running config; `broken` replaces one piece to make a reload fail.
fn config(dir: &Path, files: &Files, ports: &Ports, redis: &str, broken: Option<&str>) -> String {
    let health = |password: &str| {
        format!(
            "health = {{ check = \"redis\", password = \"{password}\", interval = \"200ms\", timeout = \"500ms\" }}"
        )
    };
    let good_health = health(PASSWORD);
    let redis_health = match broken {
        Some("both") => format!(
            "health = {{ check = \"redis\", password = \"{PASSWORD}\", password_file = \"{}\" }}",
            files.password_file
        ),
        Some("tcp") => format!("health = {{ check = \"tcp\", password = \"{PASSWORD}\" }}"),
        Some("syntax") => {
            format!("health = {{ check = \"redis\", password = \"{PASSWORD}\" oops }}")
        }
        _ => good_health,
    };
    let key = if broken == Some("key") {
        &files.broken_key
    } else {
        &files.key
    };
    let client = dir.join("client.pem").display().to_string();
    let client_key = dir.join("client.key").display().to_string();
    format!(
        r#"[admin]
listen = "127.0.0.1:{admin}"

[[listeners]]
name = "redis"
listen = "127.0.0.1:{p_redis}"
upstream = ["{redis}"]
{redis_health}

[[listeners]]
name = "wrong-password"
listen = "127.0.0.1:{p_wrong}"
upstream = ["{redis}"]
{wrong_health}

[[listeners]]
name = "wrong-password-file"
listen = "127.0.0.1:{p_wrong_file}"
upstream = ["{redis}"]
health = {{ check = "redis-primary", password_file = "{password_file}", interval = "200ms", timeout = "500ms" }}

[[listeners]]
name = "tls-termination"
listen = "127.0.0.1:{p_tls_server}"
upstream = ["{redis}"]
tls_server = {{ cert = "{cert}", key = "{key}" }}

[[listeners]]
name = "tls-origination"
listen = "127.0.0.1:{p_tls_client}"
upstream = ["{redis}"]
tls = {{ ca = "{cert}", cert = "{client}", key = "{client_key}", sni = "localhost" }}
"#,
        admin = ports.admin,
        p_redis = ports.redis,
        p_wrong = ports.wrong,
        p_wrong_file = ports.wrong_file,
        p_tls_server = ports.tls_server,
        p_tls_client = ports.tls_client,
        wrong_health = health(WRONG_PASSWORD),
        password_file = files.password_file,
        cert = files.cert,
    )
}

/// Replaces the config file in one rename, as an editor or a ConfigMap would.
fn replace(path: &Path, text: &str) {
    let staging = path.with_extension("staging");
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// Sends `request` and reads what comes back until the peer closes (or 2s pass: every
/// exchange here ends with a close from the server or legate within milliseconds, and the
/// answers' content is checked, not their time).
fn exchange(port: u16, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(local(port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

#[test]
fn canary_secrets_appear_in_no_output() {
    let redis = RedisServer::start();
    let mut con = redis_connect(redis.addr()).unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(PASSWORD)
        .query(&mut con)
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let files = write_files(dir.path());
    let ports = Ports {
        admin: free_port(),
        redis: free_port(),
        wrong: free_port(),
        wrong_file: free_port(),
        tls_server: free_port(),
        tls_client: free_port(),
    };
    let redis_addr = redis.addr().to_string();
    let config_path = dir.path().join("legate.toml");
    let good = config(dir.path(), &files, &ports, &redis_addr, None);
    std::fs::write(&config_path, &good).unwrap();

    let mut outputs: Vec<(String, String)> = Vec::new();
    let config_arg = config_path.display().to_string();
    let mut legate = Legate::spawn(
        tempfile::tempdir().unwrap(),
        &["run", "-c", &config_arg, "--log-level", "trace"],
        local(ports.admin),
    );
    legate.wait_live(T);

    // The right password makes its listener's endpoint healthy; the wrong ones fail.
    wait_for(T, "health verdicts in /endpoints", || {
        let (_, body) = legate.get("/endpoints");
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let listeners = json["listeners"].as_array()?;
        let health = |name: &str| {
            listeners
                .iter()
                .find(|l| l["name"] == name)
                .and_then(|l| l["endpoints"][0]["health"].as_str().map(str::to_owned))
        };
        let verdicts = (
            health("redis")?,
            health("wrong-password")?,
            health("wrong-password-file")?,
        );
        (verdicts == ("healthy".into(), "unhealthy".into(), "unhealthy".into())).then_some(())
    });

    // Traffic: an AUTH with the password through the proxy, a TLS origination to a
    // plaintext server (fails), garbage on the TLS termination port.
    let answer = exchange(
        ports.redis,
        format!(
            "*2\r\n$4\r\nAUTH\r\n${}\r\n{PASSWORD}\r\n*1\r\n$4\r\nQUIT\r\n",
            PASSWORD.len()
        )
        .as_bytes(),
    );
    assert!(
        answer.starts_with(b"+OK\r\n"),
        "AUTH through legate: {:?}",
        String::from_utf8_lossy(&answer)
    );
    exchange(ports.tls_client, b"*1\r\n$4\r\nPING\r\n");
    exchange(ports.tls_server, b"GET / HTTP/1.0\r\n\r\n");

    // Reloads that are refused, each also run through `legate check`.
    for broken in ["key", "both", "tcp", "syntax"] {
        let text = config(dir.path(), &files, &ports, &redis_addr, Some(broken));
        let refused_before = legate.log().matches("configuration refused").count();
        replace(&config_path, &text);
        legate.signal(libc::SIGHUP);
        eventually(
            RELOAD,
            &format!("the {broken:?} reload to be refused"),
            || legate.log().matches("configuration refused").count() > refused_before,
        );
        let check_path = dir.path().join(format!("check-{broken}.toml"));
        std::fs::write(&check_path, &text).unwrap();
        let mut check = legate_command();
        check.arg("check").arg("-c").arg(&check_path);
        let output = run_with_timeout(check, RELOAD);
        // `legate check` validates the file but does not load TLS material.
        if broken != "key" {
            assert!(!output.status.success(), "legate check accepted {broken:?}");
        }
        outputs.push((
            format!("legate check ({broken})"),
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        ));
    }
    replace(&config_path, &good);

    for path in ["/endpoints", "/metrics", "/ready", "/startup", "/live"] {
        let (status, body) = legate.get(path);
        outputs.push((format!("GET {path} ({status})"), body));
    }
    let (_, endpoints) = legate.get("/endpoints");
    assert!(
        endpoints.contains("WRONGPASS") || endpoints.contains("NOAUTH"),
        "the wrong passwords' failures should show in /endpoints: {endpoints}"
    );
    legate.signal(libc::SIGTERM);
    legate.wait_exit(T);
    let log = legate.log();
    assert!(
        log.contains("TRACE") || log.contains("trace"),
        "legate should have logged at trace level"
    );
    outputs.push(("the log".into(), log));

    let mut canaries: Vec<&str> = vec![PASSWORD, WRONG_PASSWORD, WRONG_PASSWORD_FILE, BROKEN_KEY];
    canaries.extend(files.key_lines.iter().map(String::as_str));
    let mut leaks = Vec::new();
    for (what, text) in &outputs {
        for canary in &canaries {
            if let Some(at) = text.find(canary) {
                let start = text[..at].rfind('\n').map_or(0, |n| n + 1);
                let end = text[at..].find('\n').map_or(text.len(), |n| at + n);
                leaks.push(format!("{what}: {}", &text[start..end]));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
}
