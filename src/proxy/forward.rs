//! Moving bytes both ways between a client and its upstream.
//!
//! Each direction is a small state machine — running, then (on end of stream) shutting
//! the destination's write side, then done — so a half-close travels as a half-close.
//! The connection ends when both directions are done, when one side resets (the other
//! side is then reset too, so a truncated stream never looks complete), on
//! `idle_timeout` (counted from the last byte either way), or when the drain deadline
//! cancels it.
//!
//! Plaintext TCP on Linux moves bytes with splice(2) (`splice.rs`); if the kernel
//! refuses splice for a socket the direction falls back to a buffered copy. Bytes of a
//! plaintext connection never pass through user space: the README promises zero-copy,
//! so even small requests splice (a recv+send path measured 13% less CPU per small
//! request, but it copies; see the README's Performance notes).

use super::ending::{DirectionError, End, Outcome, Progress, Side, SALVAGE};
use super::stream::{ClientStream, Transport, UpstreamStream};
use crate::clock::monotonic_ms;
use crate::metrics::ListenerMetrics;
use prometheus::IntCounter;
use socket2::SockRef;
use std::future::Future;
use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

#[cfg(target_os = "linux")]
use super::splice;

/// [`forward`] for whichever streams the listener produced.
pub(crate) async fn forward_any(
    client: ClientStream,
    upstream: UpstreamStream,
    metrics: &ListenerMetrics,
    idle_timeout: Option<Duration>,
    cancel: &CancellationToken,
) -> Outcome {
    use ClientStream as C;
    use UpstreamStream as U;
    // The TLS forwards (streams, buffers and all) live in a box of their own, so every
    // connection task is sized for plaintext (an idle proxied connection measured 3.2 KiB
    // of RSS instead of 7.5 KiB with them inline).
    match (client, upstream) {
        (C::Plain(c), U::Plain(u)) => forward(c, u, metrics, idle_timeout, cancel).await,
        (C::Plain(c), U::Tls(u)) => Box::pin(forward(c, u, metrics, idle_timeout, cancel)).await,
        (C::Tls(c), U::Plain(u)) => Box::pin(forward(c, u, metrics, idle_timeout, cancel)).await,
        (C::Tls(c), U::Tls(u)) => Box::pin(forward(c, u, metrics, idle_timeout, cancel)).await,
    }
}

/// Forward until the connection ends; bytes are added to `metrics` as they move.
/// Plaintext on both sides splices; anything with TLS copies through buffers.
pub(crate) async fn forward<C: Transport, U: Transport>(
    mut client: C,
    mut upstream: U,
    metrics: &ListenerMetrics,
    idle_timeout: Option<Duration>,
    cancel: &CancellationToken,
) -> Outcome {
    let activity = idle_timeout.map(|_| AtomicU64::new(monotonic_ms()));
    let up = Progress::default();
    let down = Progress::default();
    let end = {
        let transfer = async {
            #[cfg(target_os = "linux")]
            if let (Some(client), Some(upstream)) = (client.plain(), upstream.plain()) {
                return splice_both(client, upstream, metrics, &up, &down, activity.as_ref()).await;
            }
            super::copy::copy_bidirectional(
                &mut client,
                &mut upstream,
                (&metrics.bytes_upstream, &up),
                (&metrics.bytes_downstream, &down),
                activity.as_ref(),
            )
            .await
        };
        let idle = idle_watch(activity.as_ref(), idle_timeout);
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        tokio::select! {
            end = transfer => end,
            _ = idle => End::IdleTimeout,
            _ = quiet(cancelled) => End::Cancelled,
        }
    };
    if let End::Reset { from, .. } = &end {
        // Linger 0 makes close() send RST: the reset travels on instead of a FIN that
        // would make a truncated stream look complete.
        super::reset_on_close(client.tcp());
        super::reset_on_close(upstream.tcp());
        match from {
            Side::Client => metrics.resets_from_client.inc(),
            Side::Upstream => metrics.resets_from_upstream.inc(),
        }
    }
    if matches!(end, End::IdleTimeout) {
        metrics.idle_timeouts.inc();
    }
    let spliced = up.spliced.load(Relaxed) + down.spliced.load(Relaxed);
    if spliced > 0 {
        metrics.splice_bytes.inc_by(spliced);
    }
    Outcome {
        end,
        upstream_bytes: up.moved.load(Relaxed),
        downstream_bytes: down.moved.load(Relaxed),
    }
}

/// Both directions of a plaintext connection, polled together in this task.
#[cfg(target_os = "linux")]
async fn splice_both(
    client: &TcpStream,
    upstream: &TcpStream,
    metrics: &ListenerMetrics,
    up: &Progress,
    down: &Progress,
    activity: Option<&AtomicU64>,
) -> End {
    // Set once the connection is ending with a reset: from then on an end of stream is
    // not passed on as a half-close, since the reset follows.
    let ending = AtomicBool::new(false);
    let to_upstream = one_way(
        client,
        upstream,
        &metrics.bytes_upstream,
        up,
        activity,
        &ending,
    );
    let to_client = one_way(
        upstream,
        client,
        &metrics.bytes_downstream,
        down,
        activity,
        &ending,
    );
    tokio::pin!(to_upstream, to_client);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            result = &mut to_upstream, if !up_done => match result {
                Ok(()) => up_done = true,
                Err(error) => {
                    if error.is_write() && !down_done {
                        salvage(&ending, &mut to_client).await;
                    }
                    return error.end(Side::Client, Side::Upstream);
                }
            },
            result = &mut to_client, if !down_done => match result {
                Ok(()) => down_done = true,
                Err(error) => {
                    if error.is_write() && !up_done {
                        salvage(&ending, &mut to_upstream).await;
                    }
                    return error.end(Side::Upstream, Side::Client);
                }
            },
        }
        if up_done && down_done {
            return End::Closed;
        }
    }
}

/// The connection is ending with a reset from the side `other` reads: let `other` deliver
/// what that side sent before it (see [`DirectionError::is_write`]), within [`SALVAGE`].
#[cfg(target_os = "linux")]
async fn salvage<F: Future + Unpin>(ending: &AtomicBool, other: F) {
    ending.store(true, Relaxed);
    let _ = tokio::time::timeout(SALVAGE, other).await;
}

/// `fut` (a cancellation signal), polled only on the first poll and after its own
/// waker fired. Polling a `cancelled()` future locks the token's mutex and its Notify's
/// waiter list, both shared by every connection waiting on that token; without this,
/// every data wakeup of every connection would take those locks.
pub(super) fn quiet<F: Future>(fut: Pin<&mut F>) -> Quiet<'_, F> {
    let flag = Arc::new(Flag {
        woken: AtomicBool::new(true),
        task: Mutex::new(None),
    });
    Quiet {
        inner: fut,
        waker: Waker::from(Arc::clone(&flag)),
        flag,
        task: None,
    }
}

pub(super) struct Quiet<'a, F> {
    inner: Pin<&'a mut F>,
    flag: Arc<Flag>,
    /// The waker the inner future registers: `flag`'s.
    waker: Waker,
    /// The task's waker as last given to `flag`, to notice (cheaply) if it changes.
    task: Option<Waker>,
}

pub(super) struct Flag {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, SeqCst);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl<F: Future> Future for Quiet<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let task = cx.waker().clone();
            *this
                .flag
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(task.clone());
            this.task = Some(task);
            this.flag.woken.store(true, SeqCst);
        }
        if !this.flag.woken.swap(false, SeqCst) {
            return Poll::Pending;
        }
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

async fn idle_watch(activity: Option<&AtomicU64>, idle_timeout: Option<Duration>) {
    let (Some(activity), Some(idle)) = (activity, idle_timeout) else {
        return std::future::pending().await;
    };
    let idle_ms = idle.as_millis() as u64;
    loop {
        let deadline = activity.load(Relaxed) + idle_ms;
        let now = monotonic_ms();
        if now >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(deadline - now)).await;
    }
}

/// Forward `src` → `dst` until end of stream, then half-close `dst` (unless `ending`).
#[cfg(target_os = "linux")]
async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &IntCounter,
    progress: &Progress,
    activity: Option<&AtomicU64>,
    ending: &AtomicBool,
) -> Result<(), DirectionError> {
    match splice_one_way(src, dst, bytes, progress, activity, ending).await {
        Err(DirectionError::Read(error))
            if error.raw_os_error() == Some(libc::EINVAL)
                && progress.spliced.load(Relaxed) == 0 =>
        {
            tracing::debug!("splice refused by the kernel, using a buffered copy");
        }
        other => return other,
    }
    copy_one_way(src, dst, bytes, progress, activity, ending).await
}

#[cfg(target_os = "linux")]
fn record(bytes: &IntCounter, progress: &Progress, activity: Option<&AtomicU64>, moved: usize) {
    bytes.inc_by(moved as u64);
    progress.moved.fetch_add(moved as u64, Relaxed);
    if let Some(activity) = activity {
        activity.store(monotonic_ms(), Relaxed);
    }
}

/// End of stream from the source: pass it on as a half-close, unless the connection is
/// already ending with a reset (a FIN before the reset would make the cut look clean).
#[cfg(target_os = "linux")]
fn half_close(dst: &TcpStream, ending: &AtomicBool) {
    if ending.load(Relaxed) {
        return;
    }
    // ENOTCONN here means the peer is already gone; the other direction will see it.
    let _ = SockRef::from(dst).shutdown(Shutdown::Write);
}

#[cfg(target_os = "linux")]
async fn splice_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &IntCounter,
    progress: &Progress,
    activity: Option<&AtomicU64>,
    ending: &AtomicBool,
) -> Result<(), DirectionError> {
    loop {
        // Wait for data without holding a pipe, then take one for this burst.
        src.readable().await.map_err(DirectionError::Read)?;
        let pipe = splice::take().map_err(DirectionError::Read)?;
        let mut in_pipe = 0;
        // Fill, drain, and keep filling while the source has more, so a busy stream
        // keeps its pipe and pays no readiness round trip per chunk.
        loop {
            while in_pipe > 0 {
                dst.writable().await.map_err(DirectionError::Write)?;
                match dst.try_io(Interest::WRITABLE, || pipe.drain_to(dst, in_pipe)) {
                    Ok(moved) => {
                        in_pipe -= moved;
                        progress.spliced.fetch_add(moved as u64, Relaxed);
                        record(bytes, progress, activity, moved);
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    // The pipe still holds bytes: drop (close) it rather than pool it.
                    Err(error) => return Err(DirectionError::Write(error)),
                }
            }
            match src.try_io(Interest::READABLE, || pipe.fill_from(src, splice::CHUNK)) {
                Ok(0) => {
                    splice::give_back(pipe);
                    half_close(dst, ending);
                    return Ok(());
                }
                Ok(filled) => in_pipe = filled,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    splice::give_back(pipe);
                    break;
                }
                Err(error) => {
                    splice::give_back(pipe);
                    return Err(DirectionError::Read(error));
                }
            }
        }
    }
}

/// Where the kernel refuses splice: a bounded buffer, allocated on first data so idle connections
/// cost nothing.
#[cfg(target_os = "linux")]
async fn copy_one_way(
    src: &TcpStream,
    dst: &TcpStream,
    bytes: &IntCounter,
    progress: &Progress,
    activity: Option<&AtomicU64>,
    ending: &AtomicBool,
) -> Result<(), DirectionError> {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        src.readable().await.map_err(DirectionError::Read)?;
        if buffer.is_empty() {
            buffer = vec![0; 16 * 1024];
        }
        let filled = match src.try_read(&mut buffer) {
            Ok(0) => {
                half_close(dst, ending);
                return Ok(());
            }
            Ok(filled) => filled,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(DirectionError::Read(error)),
        };
        let mut written = 0;
        while written < filled {
            dst.writable().await.map_err(DirectionError::Write)?;
            match dst.try_write(&buffer[written..filled]) {
                Ok(moved) => {
                    written += moved;
                    record(bytes, progress, activity, moved);
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(error) => return Err(DirectionError::Write(error)),
            }
        }
    }
}
