//! `legate wait`: block until `/ready` answers 200, then exit 0 or become CMD (exec), so
//! an app's entrypoint can be `legate wait -- app` where there are no native sidecars.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const POLL: Duration = Duration::from_millis(100);

/// Returns the exit code (it only returns when not exec'ing, or when exec failed).
pub fn wait(admin: SocketAddr, timeout: Duration, command: &[String]) -> i32 {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match probe(
            admin,
            left.clamp(Duration::from_millis(50), Duration::from_secs(1)),
        ) {
            Ok((200, _)) => break,
            Ok((status, body)) => {
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
                crate::health::show(timeout)
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

fn probe(admin: SocketAddr, timeout: Duration) -> Result<(u16, String), String> {
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
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}
