//! The handover socket: where it is (an abstract name or a path), and frames with
//! descriptors attached (SCM_RIGHTS through rustix, so no `unsafe` here).
//!
//! Blocking sockets with timeouts: a handover is a short conversation between two
//! processes, run on a blocking thread, never on the runtime's workers.

use super::protocol::{self, Message, ProtocolError, HEADER_LEN, MAX_SOCKETS};
use crate::config::HandoffSocket;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    #[error("the other legate closed the handover connection")]
    Closed,
    #[error("no answer within {}", crate::config::duration::show(*.0))]
    TimedOut(Duration),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Protocol(#[from] ProtocolError),
    #[error("the descriptors sent with the message did not fit (MSG_CTRUNC)")]
    Truncated,
}

fn unix_addr(socket: &HandoffSocket) -> io::Result<UnixAddr> {
    match socket {
        HandoffSocket::Abstract(name) => UnixAddr::from_abstract_name(name.as_bytes()),
        HandoffSocket::Path(path) => UnixAddr::from_pathname(path),
    }
}

/// Reach the legate serving `socket`. `Ok(None)`: nobody serves it (no such path, or a
/// name or path nobody listens on).
pub(crate) fn connect(socket: &HandoffSocket) -> io::Result<Option<UnixStream>> {
    match UnixStream::connect_addr(&unix_addr(socket)?) {
        Ok(stream) => Ok(Some(stream)),
        Err(error)
            if matches!(
                error.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(error) => Err(error),
    }
}

/// Serve `socket`. A path left behind by a process that is gone (nobody accepts on it)
/// is removed and bound again; a live one is left alone.
pub(crate) fn bind(socket: &HandoffSocket) -> io::Result<UnixListener> {
    let addr = unix_addr(socket)?;
    match UnixListener::bind_addr(&addr) {
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
            let HandoffSocket::Path(path) = socket else {
                return Err(error);
            };
            if connect(socket)?.is_some() {
                return Err(error);
            }
            std::fs::remove_file(path)?;
            UnixListener::bind_addr(&addr)
        }
        bound => bound,
    }
}

/// Send `message` with `fds` attached.
pub(crate) fn send(
    stream: &UnixStream,
    message: &Message,
    fds: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let frame = protocol::encode(message);
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let sent = rustix::net::sendmsg(
        stream,
        &[IoSlice::new(&frame)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    // The descriptors went with the first bytes; the rest of a long frame follows plainly.
    let mut rest = stream;
    rest.write_all(&frame[sent..])
}

/// Receive one message and the descriptors that came with it, within `timeout`.
pub(crate) fn recv(
    stream: &UnixStream,
    timeout: Duration,
) -> Result<(Message, Vec<OwnedFd>), WireError> {
    // One deadline for the whole message: a peer dripping a byte at a time gets no more.
    let deadline = Instant::now() + timeout;
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    read_exact(stream, &mut header, &mut fds, deadline, timeout)?;
    let len = protocol::decode_header(&header)?;
    let mut payload = vec![0u8; len];
    read_exact(stream, &mut payload, &mut fds, deadline, timeout)?;
    let message = protocol::decode_payload(&payload)?;
    if fds.len() > MAX_SOCKETS {
        return Err(ProtocolError::TooManySockets(fds.len()).into());
    }
    Ok((message, fds))
}

fn read_exact(
    stream: &UnixStream,
    mut buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), WireError> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(WireError::TimedOut(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = rustix::net::recvmsg(
            stream,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        let received = match received {
            Ok(received) => received,
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => return Err(WireError::TimedOut(timeout)),
            Err(error) => return Err(io::Error::from(error).into()),
        };
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if received.flags.contains(ReturnFlags::CTRUNC) {
            return Err(WireError::Truncated);
        }
        if received.bytes == 0 {
            return Err(WireError::Closed);
        }
        buf = &mut buf[received.bytes..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::handover::protocol::{Offered, Role};
    use std::os::fd::AsFd;

    #[test]
    fn descriptors_travel_with_the_offer() {
        let (a, b) = UnixStream::pair().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let offer = Message::Offer {
            pid: 1,
            sockets: vec![Offered {
                role: Role::Listener,
                name: "x".into(),
                addr: addr.to_string(),
            }],
        };
        send(&a, &offer, &[listener.as_fd()]).unwrap();
        let (message, fds) = recv(&b, Duration::from_secs(5)).unwrap();
        assert_eq!(message, offer);
        assert_eq!(fds.len(), 1);
        let adopted = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        assert_eq!(adopted.local_addr().unwrap(), addr);
        // The same socket: a connection queued before is accepted through the copy.
        let _client = std::net::TcpStream::connect(addr).unwrap();
        drop(listener);
        adopted.accept().unwrap();
    }

    #[test]
    fn silence_times_out_and_a_close_is_told_apart() {
        let (a, b) = UnixStream::pair().unwrap();
        assert!(matches!(
            recv(&b, Duration::from_millis(50)),
            Err(WireError::TimedOut(_))
        ));
        drop(a);
        assert!(matches!(
            recv(&b, Duration::from_secs(5)),
            Err(WireError::Closed)
        ));
    }

    #[test]
    fn a_stale_path_is_taken_over_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let socket = HandoffSocket::Path(dir.path().join("h.sock"));
        let first = bind(&socket).unwrap();
        assert!(bind(&socket).is_err(), "a live socket is left alone");
        drop(first);
        let _second = bind(&socket).unwrap();
        assert!(connect(&socket).unwrap().is_some());
    }
}
