//! `legate wait`: block until `/ready` answers 200, then exit 0 or become CMD (exec), so
//! an app's entrypoint can be `legate wait -- app` where there are no native sidecars.
//!
//! `--handover` is a SidecarSet hot upgrade's PostStart hook: it waits until the admin
//! port is answered by the legate of this container, told by the
//! `legate-sidecarset-version` header matching our own `SIDECARSET_VERSION`; until the
//! handover commits, the old container's legate answers with its own version.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(100);

/// The header `/ready` answers carry when the process has a `SIDECARSET_VERSION`.
pub(crate) const VERSION_HEADER: &str = "legate-sidecarset-version";

/// Returns the exit code (it only returns when not exec'ing, or when exec failed).
pub fn wait(admin: SocketAddr, timeout: Duration, handover: bool, command: &[String]) -> i32 {
    let ours = handover
        .then(|| std::env::var(crate::lifecycle::sidecarset::VERSION).ok())
        .flatten()
        .filter(|version| !version.is_empty());
    if ours.as_deref() == Some("0") {
        // The empty container of a hot upgrade: there is no legate here to wait for.
        return 0;
    }
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match probe(
            admin,
            left.clamp(Duration::from_millis(50), Duration::from_secs(1)),
        ) {
            Ok((200, _, version)) => match &ours {
                Some(ours) if version.as_deref() != Some(ours.as_str()) => {
                    last = format!(
                        "/ready is answered by the legate of SIDECARSET_VERSION {}, not ours ({ours}): the handover has not committed yet",
                        version.as_deref().unwrap_or("(none)")
                    );
                }
                _ => break,
            },
            Ok((status, body, _)) => {
                last = format!(
                    "/ready answered {status}: {}",
                    body.trim().replace('\n', "; ")
                )
            }
            Err(error) => last = error,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            eprintln!(
                "legate wait: http://{admin}/ready was not 200 within {}: {last}",
                crate::config::duration::show(timeout)
            );
            return 1;
        }
        std::thread::sleep(POLL.min(left));
    }
    let Some((program, args)) = command.split_first() else {
        return 0;
    };
    use std::os::unix::process::CommandExt;
    let error = std::process::Command::new(program).args(args).exec();
    eprintln!("legate wait: cannot run {program}: {error}");
    127
}

/// Status, body, and the `legate-sidecarset-version` header of one `/ready`.
fn probe(admin: SocketAddr, timeout: Duration) -> Result<(u16, String, Option<String>), String> {
    let mut stream = TcpStream::connect_timeout(&admin, timeout)
        .map_err(|error| format!("cannot connect to {admin}: {error}"))?;
    let io = |error: std::io::Error| format!("{admin}: {error}");
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream
        .write_all(b"GET /ready HTTP/1.1\r\nhost: legate\r\nconnection: close\r\n\r\n")
        .map_err(io)?;
    let mut response = Vec::new();
    stream
        .take(64 * 1024)
        .read_to_end(&mut response)
        .map_err(io)?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| format!("{admin} did not answer HTTP"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let version = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case(VERSION_HEADER)
            .then(|| value.trim().to_string())
    });
    Ok((status, body.to_string(), version))
}
