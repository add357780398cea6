//! TLS termination from the client (`tls_server = { ... }`): our certificate and key,
//! and with `client_ca` a required, verified client certificate.

use super::certs::{self, CertError};
use super::Expiry;
use crate::config::TlsServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use std::sync::Arc;

pub(crate) fn build(config: &TlsServerConfig) -> Result<(ServerConfig, Vec<Expiry>), CertError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(super::versions(config.min_version))
        .map_err(|error| CertError::Config(error.to_string()))?;
    let mut expiries = Vec::new();
    let builder = match &config.client_ca {
        Some(path) => {
            let (roots, expiry) = certs::load_roots(path)?;
            expiries.extend(Expiry::of("ca", expiry));
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| CertError::Config(format!("{}: {error}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let (chain, expiry) = certs::load_own_chain(&config.cert)?;
    expiries.extend(Expiry::of("server", expiry));
    let key = certs::load_key(&config.key)?;
    let server = builder
        .with_single_cert(chain, key)
        .map_err(|error| certs::key_error(&config.cert, &config.key, error))?;
    Ok((server, expiries))
}
