//! TLS with rustls: origination toward upstreams (`client`), termination from clients
//! (`server`), PEM loading and expiry (`certs`), the handshakes of a proxied connection
//! with their metrics (`handshake`), and reload of both sides when their files change.
//!
//! Each listener's material sits behind `ArcSwapOption`s: a handshake `load`s the
//! current connector or acceptor once, so a reload affects new handshakes only and
//! open connections are untouched. A broken new file (no key, a key that does not
//! match, an expired certificate, a half-written PEM) keeps the old material and counts
//! `legate_reloads_total{source="tls",result="error"}`.

pub(crate) mod certs;
pub(crate) mod client;
pub(crate) mod handshake;
pub(crate) mod server;

use crate::config::{ListenerConfig, TlsClientConfig, TlsVersion};
use crate::metrics::Metrics;
use arc_swap::ArcSwapOption;
use certs::CertError;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long a client gets to finish its handshake on a `tls_server` listener.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The notAfter of one certificate in use, for `legate_tls_cert_expiry_timestamp_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expiry {
    pub(crate) role: &'static str,
    pub(crate) not_after: i64,
}

impl Expiry {
    /// The expiry of `role`'s certificates, when they have one.
    pub(crate) fn of(role: &'static str, not_after: Option<i64>) -> Option<Expiry> {
        not_after.map(|not_after| Expiry { role, not_after })
    }
}

static TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// rustls speaks nothing below TLS 1.2, so "1.2" means every version it has.
pub(crate) fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    match min {
        TlsVersion::Tls12 => rustls::ALL_VERSIONS,
        TlsVersion::Tls13 => TLS13_ONLY,
    }
}

/// Origination: the connector plus the settings that pick the server name.
pub(crate) struct ClientSide {
    pub(crate) connector: tokio_rustls::TlsConnector,
    pub(crate) config: TlsClientConfig,
}

pub(crate) struct ServerSide {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

#[derive(Default)]
pub(crate) struct ListenerTls {
    pub(crate) client: ArcSwapOption<ClientSide>,
    pub(crate) server: ArcSwapOption<ServerSide>,
}

impl ListenerTls {
    /// Build the material `config` asks for (none when it has no TLS).
    pub(crate) fn build(config: &ListenerConfig) -> Result<(ListenerTls, Vec<Expiry>), CertError> {
        let tls = ListenerTls::default();
        let expiries = tls.rebuild(config)?;
        Ok((tls, expiries))
    }

    /// Replace the material from `config`; on error nothing changes.
    pub(crate) fn rebuild(&self, config: &ListenerConfig) -> Result<Vec<Expiry>, CertError> {
        let mut expiries = Vec::new();
        let client = match &config.tls {
            Some(tls) => {
                let (client, found) = client::build(tls, &config.name)?;
                expiries.extend(found);
                Some(Arc::new(ClientSide {
                    connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
                    config: tls.clone(),
                }))
            }
            None => None,
        };
        let server = match &config.tls_server {
            Some(tls) => {
                let (server, found) = server::build(tls)?;
                expiries.extend(found);
                Some(Arc::new(ServerSide {
                    acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
                }))
            }
            None => None,
        };
        self.client.store(client);
        self.server.store(server);
        Ok(expiries)
    }
}

impl ListenerTls {
    /// Take over `other`'s material (a reload built and checked it already).
    pub(crate) fn replace_with(&self, other: ListenerTls) {
        self.client.store(other.client.load_full());
        self.server.store(other.server.load_full());
    }
}

/// Every file a listener's TLS settings read.
pub(crate) fn files(config: &ListenerConfig) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Some(tls) = &config.tls {
        files.extend(tls.ca.iter().chain(&tls.cert).chain(&tls.key).cloned());
    }
    if let Some(tls) = &config.tls_server {
        files.extend([tls.cert.clone(), tls.key.clone()]);
        files.extend(tls.client_ca.iter().cloned());
    }
    files
}

/// `legate_tls_cert_expiry_timestamp_seconds` for each certificate of `listener`.
pub(crate) fn publish_expiries(metrics: &Metrics, listener: &str, expiries: &[Expiry]) {
    for expiry in expiries {
        metrics
            .tls_cert_expiry
            .with_label_values(&[listener, expiry.role])
            .set(expiry.not_after as f64);
    }
}

/// A short, stable label for why a handshake failed (never the peer's raw text).
pub(crate) fn failure_reason(error: &io::Error) -> &'static str {
    if error.kind() == io::ErrorKind::TimedOut {
        return "timeout";
    }
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match error.kind() {
            io::ErrorKind::UnexpectedEof => "eof",
            io::ErrorKind::InvalidData => "bad_record",
            _ => "io",
        };
    };
    use rustls::CertificateError as C;
    match tls {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::UnknownIssuer => "unknown_issuer",
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
            C::NotValidForName | C::NotValidForNameContext { .. } => "name_mismatch",
            C::BadSignature => "bad_signature",
            C::Revoked => "revoked",
            _ => "bad_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::AlertReceived(_) => "alert",
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "bad_record"
        }
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::PeerMisbehaved(_) => "misbehaved",
        _ => "other",
    }
}
