//! Endpoint files (`file:PATH` targets): watched, debounced, validated whole.
//!
//! Every way a file is updated is seen (see `crate::watch`). A zero-byte file is taken
//! as a write in progress and ignored; a file whose bytes did not change is not
//! re-applied; a malformed, oversized, unreadable or deleted file keeps the last good
//! set, logs `PATH:LINE: what is wrong` once per distinct problem, and counts
//! `legate_reloads_total{source="file",result="error"}`. A file that does not exist yet
//! is not a start-up error: the target stays unresolved (and `/ready` says so) until
//! the file appears.

use super::dns::DnsResolver;
use super::endpoint_file::{parse_endpoint_file, EndpointLine, Host, MAX_ENDPOINT_FILE_BYTES};
use super::EndpointSpec;
use crate::state::{ListenerState, Shared};
use crate::watch::{read_capped, FileWatch, LastContents, LastProblem};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Backstop re-read period for when inotify events are lost.
const POLL: Duration = Duration::from_secs(10);

/// Keep `listener`'s endpoints for `target` (`file:PATH`) in line with the file at `path`
/// until cancelled.
pub(crate) async fn run(
    resolver: Arc<DnsResolver>,
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    target: String,
    path: PathBuf,
    token: CancellationToken,
) {
    let mut watch = FileWatch::new(&path, POLL);
    let mut reader = Reader {
        resolver,
        listener,
        shared,
        target,
        path,
        contents: LastContents::default(),
        problem: LastProblem::default(),
    };
    loop {
        reader.read().await;
        tokio::select! {
            _ = token.cancelled() => return,
            _ = watch.changed() => {}
        }
    }
}

/// One endpoint file's reader: what it feeds, and what it remembers between reads.
struct Reader {
    resolver: Arc<DnsResolver>,
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    target: String,
    path: PathBuf,
    /// Bytes of the last file we acted on (applied or refused), to skip re-reads.
    contents: LastContents<Vec<u8>>,
    /// The last problem reported, so a persisting problem is logged once.
    problem: LastProblem,
}

impl Reader {
    /// Read the file and apply it if it changed and is valid whole.
    async fn read(&mut self) {
        let path = self.path.display();
        let bytes = match read_capped(&self.path, MAX_ENDPOINT_FILE_BYTES) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                let message =
                    format!("{path}: larger than {MAX_ENDPOINT_FILE_BYTES} bytes; refused");
                return self.problem(message, None);
            }
            Err(error) => {
                let what = if error.kind() == std::io::ErrorKind::NotFound {
                    "does not exist".to_string()
                } else {
                    format!("cannot be read: {error}")
                };
                let message = format!("{path}: {what}");
                self.contents.set(None);
                return self.problem(message, None);
            }
        };
        if bytes.is_empty() {
            tracing::debug!(path = %path, "zero-byte endpoint file: a write in progress; ignored");
            return;
        }
        if self.contents.is(&bytes) {
            return;
        }
        let lines = match parse(&bytes) {
            Ok(lines) => lines,
            Err(message) => {
                let message = format!("{path}:{message}");
                return self.problem(message, Some(bytes));
            }
        };
        let specs = match resolve(&self.resolver, lines).await {
            Ok(specs) => specs,
            Err(error) => {
                let message = format!("{}: cannot resolve {error}", self.path.display());
                return self.problem(message, None);
            }
        };
        let count = specs.len();
        let changed = self.listener.endpoints.update(&self.target, specs);
        self.shared.metrics.reload("file", true);
        self.contents.set(Some(bytes));
        self.problem.clear();
        if changed {
            tracing::info!(listener = %self.listener.name, path = %self.path.display(), endpoints = count, "endpoint file applied");
            self.shared.readiness_changed.notify_one();
        }
    }

    /// The file is refused (`bytes`: its contents, when they are the problem): keep the
    /// last good set, and log and count the problem unless it is the one last reported.
    fn problem(&mut self, message: String, bytes: Option<Vec<u8>>) {
        if bytes.is_some() {
            self.contents.set(bytes);
        }
        self.listener
            .endpoints
            .source_failed(&self.target, message.clone());
        if !self.problem.is_new(&message) {
            return;
        }
        self.shared.metrics.reload("file", false);
        tracing::warn!(listener = %self.listener.name, error = %message, "endpoint file refused; keeping the last good set");
        self.shared.readiness_changed.notify_one();
    }
}

/// The file's lines, or what is wrong with them (`LINE: what`, or just `what` for the file
/// as a whole).
fn parse(bytes: &[u8]) -> Result<Vec<EndpointLine>, String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|error| format!("not UTF-8 text (at byte {})", error.valid_up_to()))?;
    parse_endpoint_file(text).map_err(|error| {
        if error.line == 0 {
            error.message
        } else {
            format!("{}: {}", error.line, error.message)
        }
    })
}

/// The endpoints the lines name, host names resolved; an address named twice is kept
/// once, with its first line's weight and backup flag.
async fn resolve(
    resolver: &DnsResolver,
    lines: Vec<EndpointLine>,
) -> Result<Vec<EndpointSpec>, String> {
    let mut specs = Vec::with_capacity(lines.len());
    for line in lines {
        let addrs: Vec<SocketAddr> = match &line.host {
            Host::Ip(ip) => vec![SocketAddr::new(*ip, line.port)],
            Host::Name(name) => resolver.addresses(name, line.port).await?,
        };
        for addr in addrs {
            if !specs.iter().any(|s: &EndpointSpec| s.addr == addr) {
                specs.push(EndpointSpec {
                    addr,
                    weight: line.weight,
                    backup: line.backup,
                });
            }
        }
    }
    Ok(specs)
}
