//! hyper 1 server for the admin port, with bounds on what it accepts: request line and
//! headers within 8 KiB (431 past that, 400 for garbage), at most `MAX_CONNECTIONS`
//! connections at once (503 and close past that), a header read timeout against
//! slowloris, and a few spare file descriptors so `/live` and `/metrics` still answer
//! while the data plane has used up the descriptor limit.

use super::{endpoints, ready};
use crate::state::Shared;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::fs::File;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Enough for every probe and scraper a Pod has, with room for stragglers; past it, 503.
const MAX_CONNECTIONS: usize = 256;
/// hyper's smallest allowed read buffer, and the contract's header limit.
const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Short: a silent connection holds a slot, and slots keep /live answering.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
const RESERVED_FDS: usize = 4;

/// Serve until `token` is cancelled.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, token: CancellationToken) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let reserve = Arc::new(std::sync::Mutex::new(Reserve::new()));
    loop {
        Reserve::refill_shared(&reserve);
        let accepted = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) if matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                // Out of descriptors: free one spare, right before the accept that takes
                // it (freeing them all left the rest to the data plane, which keeps what it
                // gets while its connections are held, and the admin port starved); the
                // connection gives it back the moment it closes.
                Reserve::release_one(&reserve);
                match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                }
            }
            Err(error) => {
                tracing::debug!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let shared = Arc::clone(&shared);
        let reserve = Arc::clone(&reserve);
        tokio::spawn(async move {
            let connection = serve_connection(stream, shared, peer);
            // Garbage, oversized or timed-out requests end here; hyper has already
            // answered 400/431 where it could. Nothing to do but debug-log.
            match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
                Ok(Err(error)) => tracing::debug!(%error, "admin connection ended"),
                Err(_) => tracing::debug!("admin connection closed after its lifetime"),
                Ok(Ok(())) => {}
            }
            // The connection's descriptor closed just now: take it back at once, before
            // the data plane's accept retries can.
            Reserve::refill_shared(&reserve);
            drop(permit);
        });
    }
}

/// One admin connection: HTTP/1 within the header limits above, each request answered by
/// [`route`]. Generic over the stream so the `admin_request` fuzz target (`fuzz/`) can
/// drive the real thing over an in-memory pipe.
pub(crate) async fn serve_connection<S>(
    stream: S,
    shared: Arc<Shared>,
    peer: SocketAddr,
) -> hyper::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { Ok::<_, Infallible>(route(&shared, &request, peer)) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        // A probe may send its request and shut its write side at once (`curl` with
        // `--http1.0`, `nc -N`): without this hyper can see the EOF before it answered
        // and close the connection with the answer unwritten.
        .half_close(true)
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .await
}

async fn refuse_busy(mut stream: TcpStream) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 24\r\nconnection: close\r\n\r\ntoo many admin requests\n",
        ),
    )
    .await;
}

fn route(shared: &Shared, request: &Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let method = request.method();
    let allowed = match path {
        "/quitquitquit" => Method::POST,
        "/ready" | "/startup" | "/live" | "/metrics" | "/endpoints" => Method::GET,
        _ => return text(StatusCode::NOT_FOUND, "not found\n"),
    };
    if method != allowed && !(allowed == Method::GET && method == Method::HEAD) {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response.headers_mut().insert(
            ALLOW,
            HeaderValue::from_static(if allowed == Method::POST {
                "POST"
            } else {
                "GET, HEAD"
            }),
        );
        return response;
    }
    match path {
        "/ready" => ready(shared),
        "/startup" => startup(shared),
        "/live" => text(StatusCode::OK, "live\n"),
        "/metrics" => typed(
            shared.metrics.render(),
            "text/plain; version=0.0.4; charset=utf-8",
        ),
        "/endpoints" => typed(endpoints::render(shared), "application/json"),
        "/quitquitquit" => quit(shared, peer),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `/ready`: 200, or 503 with one reason per line.
fn ready(shared: &Shared) -> Response<Full<Bytes>> {
    let reasons = ready::reasons(shared);
    let mut response = if reasons.is_empty() {
        ready::latch_started(shared);
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            &(reasons.join("\n") + "\n"),
        )
    };
    // Which SidecarSet container answers: `legate wait --handover` needs it.
    if let Some(version) = shared
        .sidecarset_version
        .as_deref()
        .and_then(|version| HeaderValue::from_str(version).ok())
    {
        response
            .headers_mut()
            .insert(crate::wait::VERSION_HEADER, version);
    }
    response
}

/// `/startup`: 200 from the first time the process was ready on.
fn startup(shared: &Shared) -> Response<Full<Bytes>> {
    if ready::reasons(shared).is_empty() {
        ready::latch_started(shared);
    }
    if shared.started.load(std::sync::atomic::Ordering::Relaxed) {
        text(StatusCode::OK, "started\n")
    } else {
        text(StatusCode::SERVICE_UNAVAILABLE, "not ready yet\n")
    }
}

/// `POST /quitquitquit`: drain and exit, as on SIGTERM.
fn quit(shared: &Shared, peer: SocketAddr) -> Response<Full<Bytes>> {
    // In a Pod the admin port listens on the Pod IP for the kubelet's probes;
    // only a process inside the Pod (loopback) may stop legate.
    if !peer.ip().is_loopback() {
        tracing::warn!(%peer, "POST /quitquitquit refused: not from loopback");
        return text(
            StatusCode::FORBIDDEN,
            "state-changing requests are accepted from loopback only\n",
        );
    }
    tracing::info!("shutdown requested on the admin port");
    shared.shutdown.cancel();
    text(StatusCode::OK, "draining\n")
}

/// A 200 with `body` of `content_type`.
fn typed(body: Vec<u8>, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Spare descriptors held open so the admin port can still accept under EMFILE.
struct Reserve(Vec<File>);

impl Reserve {
    fn new() -> Reserve {
        let mut reserve = Reserve(Vec::with_capacity(RESERVED_FDS));
        reserve.refill();
        reserve
    }

    fn refill(&mut self) {
        while self.0.len() < RESERVED_FDS {
            match File::open("/dev/null") {
                Ok(file) => self.0.push(file),
                Err(_) => break,
            }
        }
    }

    fn refill_shared(reserve: &std::sync::Mutex<Reserve>) {
        reserve
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .refill();
    }

    fn release_one(reserve: &std::sync::Mutex<Reserve>) {
        reserve
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .0
            .pop();
    }
}
