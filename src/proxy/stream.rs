//! The streams a connection forwards between: the accepted client and the dialled
//! upstream, each plain TCP or TLS, and what forwarding needs of them.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A stream we can forward and, when a peer resets, abort.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send {
    fn tcp(&self) -> &TcpStream;
    /// The socket itself when nothing (TLS) sits on top of it: such pairs splice.
    fn plain(&self) -> Option<&TcpStream> {
        None
    }
}

impl Transport for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
    fn plain(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

/// TLS streams stay in the box the listener or the dial put them in.
impl<T: Transport + ?Sized> Transport for Box<T> {
    fn tcp(&self) -> &TcpStream {
        (**self).tcp()
    }
    fn plain(&self) -> Option<&TcpStream> {
        (**self).plain()
    }
}

impl Transport for tokio_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

/// The accepted client: plain TCP, or TLS when the listener terminates TLS.
pub(crate) enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ClientStream {
    pub(super) fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(stream) => stream,
            ClientStream::Tls(stream) => stream.get_ref().0,
        }
    }
}

/// The dialled upstream: plain TCP, or TLS when the listener originates TLS.
pub(crate) enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}
