//! TLS origination toward the upstream (`tls = { ... }`).
//!
//! Verification is on by default, against the webpki roots or the `ca` bundle; `sni`
//! names the server to verify (default: the host name of a `dns:` target; an IP
//! target verifies the IP unless `sni` is set). A client certificate and key give mTLS.
//! `insecure_skip_verify` turns verification off, loudly, and is refused together with
//! a client certificate (that would hand our identity to whoever answers).

use super::certs::{self, CertError};
use super::Expiry;
use crate::config::{Target, TlsClientConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;

pub(crate) fn build(
    config: &TlsClientConfig,
    listener: &str,
) -> Result<(ClientConfig, Vec<Expiry>), CertError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(super::versions(config.min_version))
        .map_err(|error| CertError::Config(error.to_string()))?;
    let mut expiries = Vec::new();
    let builder = if config.insecure_skip_verify {
        if config.cert.is_some() {
            return Err(CertError::Config(format!(
                "listener {listener}: tls.insecure_skip_verify with a client certificate would hand the client identity to whoever answers; refused"
            )));
        }
        tracing::warn!(listener, "tls.insecure_skip_verify is set: upstream certificates are NOT verified; anyone on the path can read and change this traffic");
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
    } else {
        let roots = match &config.ca {
            Some(path) => {
                let (roots, expiry) = certs::load_roots(path)?;
                expiries.extend(Expiry::of("ca", expiry));
                roots
            }
            None => RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        };
        builder.with_root_certificates(roots)
    };
    let mut client = match (&config.cert, &config.key) {
        (Some(cert_path), Some(key_path)) => {
            let (chain, expiry) = certs::load_own_chain(cert_path)?;
            expiries.extend(Expiry::of("client", expiry));
            let key = certs::load_key(key_path)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|error| certs::key_error(cert_path, key_path, error))?
        }
        _ => builder.with_no_client_auth(),
    };
    client.alpn_protocols = config.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Ok((client, expiries))
}

/// The name to send and verify for an endpoint: `sni` when set, else the host name of
/// the `dns:` target the endpoint came from (`target`, as written), else its IP.
pub(crate) fn server_name(
    config: &TlsClientConfig,
    target: Option<&str>,
    ip: std::net::IpAddr,
) -> ServerName<'static> {
    let host = target.and_then(|target| match target.parse::<Target>() {
        Ok(Target::Dns { host, .. }) => Some(host),
        _ => None,
    });
    config
        .sni
        .as_deref()
        .or(host.as_deref())
        .and_then(|name| ServerName::try_from(name.to_string()).ok())
        .unwrap_or(ServerName::IpAddress(ip.into()))
}

#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
