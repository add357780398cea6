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
use super::endpoint_file::{parse_endpoint_file, Host, MAX_ENDPOINT_FILE_BYTES};
use super::EndpointSpec;
use crate::state::{ListenerState, Shared};
use crate::watch::{read_capped, FileWatch, LastContents, LastProblem};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Backstop re-read period for when inotify events are lost.
const POLL: Duration = Duration::from_secs(10);

pub(crate) async fn run(
    resolver: Arc<DnsResolver>,
    listener: Arc<ListenerState>,
    shared: Arc<Shared>,
    target: String,
    path: PathBuf,
    token: CancellationToken,
) {
    let mut watch = FileWatch::new(&path, POLL);
    let mut reader = Reader::default();
    loop {
        reader
            .read(&resolver, &listener, &shared, &target, &path)
            .await;
        tokio::select! {
            _ = token.cancelled() => return,
            _ = watch.changed() => {}
        }
    }
}

#[derive(Default)]
struct Reader {
    /// Bytes of the last file we acted on (applied or refused), to skip re-reads.
    contents: LastContents<Vec<u8>>,
    /// The last problem reported, so a persisting problem is logged once.
    problem: LastProblem,
}

impl Reader {
    async fn read(
        &mut self,
        resolver: &DnsResolver,
        listener: &ListenerState,
        shared: &Shared,
        target: &str,
        path: &Path,
    ) {
        let bytes = match read_capped(path, MAX_ENDPOINT_FILE_BYTES) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => {
                return self.problem(
                    listener,
                    shared,
                    target,
                    format!(
                        "{}: larger than {} bytes; refused",
                        path.display(),
                        MAX_ENDPOINT_FILE_BYTES
                    ),
                    None,
                )
            }
            Err(error) => {
                let what = if error.kind() == std::io::ErrorKind::NotFound {
                    "does not exist".to_string()
                } else {
                    format!("cannot be read: {error}")
                };
                self.contents.set(None);
                return self.problem(
                    listener,
                    shared,
                    target,
                    format!("{}: {what}", path.display()),
                    None,
                );
            }
        };
        if bytes.is_empty() {
            tracing::debug!(path = %path.display(), "zero-byte endpoint file: a write in progress; ignored");
            return;
        }
        if self.contents.is(&bytes) {
            return;
        }
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|error| format!("not UTF-8 text (at byte {})", error.valid_up_to()))
            .and_then(|text| {
                parse_endpoint_file(text).map_err(|error| {
                    if error.line == 0 {
                        error.message
                    } else {
                        format!("{}: {}", error.line, error.message)
                    }
                })
            });
        let lines = match parsed {
            Ok(lines) => lines,
            Err(message) => {
                return self.problem(
                    listener,
                    shared,
                    target,
                    format!("{}:{message}", path.display()),
                    Some(bytes),
                )
            }
        };
        let mut specs = Vec::with_capacity(lines.len());
        for line in lines {
            let addrs: Vec<SocketAddr> = match &line.host {
                Host::Ip(ip) => vec![SocketAddr::new(*ip, line.port)],
                Host::Name(name) => match resolver.addresses(name, line.port).await {
                    Ok(addrs) => addrs,
                    Err(error) => {
                        return self.problem(
                            listener,
                            shared,
                            target,
                            format!("{}: cannot resolve {error}", path.display()),
                            None,
                        )
                    }
                },
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
        let count = specs.len();
        let changed = listener.endpoints.update(target, specs);
        shared.metrics.reload("file", true);
        self.contents.set(Some(bytes));
        self.problem.clear();
        if changed {
            tracing::info!(listener = %listener.name, path = %path.display(), endpoints = count, "endpoint file applied");
            shared.readiness_changed.notify_one();
        }
    }

    fn problem(
        &mut self,
        listener: &ListenerState,
        shared: &Shared,
        target: &str,
        message: String,
        bytes: Option<Vec<u8>>,
    ) {
        if bytes.is_some() {
            self.contents.set(bytes);
        }
        listener.endpoints.source_failed(target, message.clone());
        if !self.problem.is_new(&message) {
            return;
        }
        shared.metrics.reload("file", false);
        tracing::warn!(listener = %listener.name, error = %message, "endpoint file refused; keeping the last good set");
        shared.readiness_changed.notify_one();
    }
}
