//! Buffered forwarding for connections that cannot splice (TLS on either side).
//!
//! Both directions are polled from one future that owns both streams (no split, no
//! lock), each a small state machine: running (read into its buffer, write it out,
//! flush when the reader has nothing more) → shutting down (`poll_shutdown`, which for
//! TLS sends close_notify before the TCP FIN) → done. Buffers are 16 KiB per direction,
//! allocated at the first byte, so an idle TLS connection holds none of its own.

use super::ending::{DirectionError, End, Progress, Side, SALVAGE};
use super::stream::Transport;
use crate::clock::monotonic_ms;
use prometheus::IntCounter;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const BUFFER: usize = 16 * 1024;

#[derive(Default)]
struct Direction {
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    unflushed: bool,
    shutting_down: bool,
    done: bool,
    /// The connection is ending with a reset: an end of stream is not passed on as a
    /// close (close_notify and FIN), since the reset follows.
    ending: bool,
    /// The reader failed (or, while `ending`, ended): what the writer still buffers
    /// (rustls holds records until flushed) goes out first, then this is reported.
    finishing: Option<Option<io::Error>>,
}

struct Accounting<'a> {
    bytes: &'a IntCounter,
    progress: &'a Progress,
    activity: Option<&'a AtomicU64>,
}

impl Direction {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        accounting: &Accounting<'_>,
    ) -> Poll<Result<(), DirectionError>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.finishing.is_some() {
                if self.unflushed {
                    // The writer's own failure is the other direction's to report.
                    let _ = ready!(writer.as_mut().poll_flush(cx));
                    self.unflushed = false;
                }
                match self.finishing.take().flatten() {
                    Some(error) => return Poll::Ready(Err(DirectionError::Read(error))),
                    None => {
                        self.done = true;
                        continue;
                    }
                }
            }
            if self.shutting_down {
                // The peer may already be gone; the other direction reports that.
                let _ = ready!(writer.as_mut().poll_shutdown(cx));
                self.done = true;
                continue;
            }
            if self.start < self.end {
                let written = ready!(writer
                    .as_mut()
                    .poll_write(cx, &self.buffer[self.start..self.end]))
                .map_err(DirectionError::Write)?;
                if written == 0 {
                    return Poll::Ready(Err(DirectionError::Write(
                        io::ErrorKind::WriteZero.into(),
                    )));
                }
                self.start += written;
                self.unflushed = true;
                accounting.bytes.inc_by(written as u64);
                accounting.progress.moved.fetch_add(written as u64, Relaxed);
                if let Some(activity) = accounting.activity {
                    activity.store(monotonic_ms(), Relaxed);
                }
                continue;
            }
            if self.buffer.is_empty() {
                self.buffer = vec![0; BUFFER];
            }
            let mut read = ReadBuf::new(&mut self.buffer);
            match reader.as_mut().poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) => {
                    let filled = read.filled().len();
                    if filled == 0 {
                        if self.ending {
                            self.finishing = Some(None);
                        } else {
                            self.shutting_down = true;
                        }
                    } else {
                        self.start = 0;
                        self.end = filled;
                    }
                }
                Poll::Ready(Err(error)) => self.finishing = Some(Some(error)),
                Poll::Pending => {
                    // Nothing more to read now: push out what the writer buffered
                    // (rustls keeps records until flushed).
                    if self.unflushed {
                        ready!(writer.as_mut().poll_flush(cx)).map_err(DirectionError::Write)?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copy both ways until both directions are done or one fails.
pub(super) async fn copy_bidirectional<C: Transport, U: Transport>(
    client: &mut C,
    upstream: &mut U,
    upstream_bytes: (&IntCounter, &Progress),
    downstream_bytes: (&IntCounter, &Progress),
    activity: Option<&AtomicU64>,
) -> End {
    let to_upstream = Accounting {
        bytes: upstream_bytes.0,
        progress: upstream_bytes.1,
        activity,
    };
    let to_client = Accounting {
        bytes: downstream_bytes.0,
        progress: downstream_bytes.1,
        activity,
    };
    let mut up = Direction::default();
    let mut down = Direction::default();
    // Which direction failed, how, and so which one is left to salvage.
    let failed = std::future::poll_fn(|cx| {
        if !up.done {
            if let Poll::Ready(Err(error)) = up.poll(
                cx,
                Pin::new(&mut *client),
                Pin::new(&mut *upstream),
                &to_upstream,
            ) {
                return Poll::Ready(Some((error, Side::Client, Side::Upstream)));
            }
        }
        if !down.done {
            if let Poll::Ready(Err(error)) = down.poll(
                cx,
                Pin::new(&mut *upstream),
                Pin::new(&mut *client),
                &to_client,
            ) {
                return Poll::Ready(Some((error, Side::Upstream, Side::Client)));
            }
        }
        if up.done && down.done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    })
    .await;
    let Some((error, from, to)) = failed else {
        return End::Closed;
    };
    if error.is_write() {
        // `to` reset or closed: deliver what it sent before that (see
        // `DirectionError::is_write`), then pass the reset on.
        let salvage = std::future::poll_fn(|cx| match to {
            Side::Upstream if !down.done => {
                down.ending = true;
                down.poll(
                    cx,
                    Pin::new(&mut *upstream),
                    Pin::new(&mut *client),
                    &to_client,
                )
            }
            Side::Client if !up.done => {
                up.ending = true;
                up.poll(
                    cx,
                    Pin::new(&mut *client),
                    Pin::new(&mut *upstream),
                    &to_upstream,
                )
            }
            _ => Poll::Ready(Ok(())),
        });
        let _ = tokio::time::timeout(SALVAGE, salvage).await;
    }
    error.end(from, to)
}
