//! TLS termination from the client (`tls_server = { ... }`): our certificate and key,
//! and with `client_ca` a required, verified client certificate.

use super::certs::{self, CertError};
use super::Expiry;
use crate::config::TlsServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use std::sync::Arc;

pub fn build(config: &TlsServerConfig) -> Result<(ServerConfig, Vec<Expiry>), CertError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(super::versions(config.min_version))
        .map_err(|error| CertError::Config(error.to_string()))?;
    let mut expiries = Vec::new();
    let builder = match &config.client_ca {
        Some(path) => {
            let cas = certs::load_certs(path)?;
            if let Some(expiry) = certs::earliest_expiry(&cas) {
                expiries.push(Expiry {
                    role: "ca",
                    not_after: expiry,
                });
            }
            let mut roots = RootCertStore::empty();
            for ca in cas {
                roots.add(ca).map_err(|error| CertError::BadCertificate {
                    path: path.clone(),
                    message: error.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|error| CertError::Config(format!("{}: {error}", path.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let chain = certs::load_certs(&config.cert)?;
    certs::check_not_expired(&config.cert, &chain)?;
    if let Some(expiry) = certs::earliest_expiry(&chain[..1]) {
        expiries.push(Expiry {
            role: "server",
            not_after: expiry,
        });
    }
    let key = certs::load_key(&config.key)?;
    let server = builder
        .with_single_cert(chain, key)
        .map_err(|error| certs::key_error(&config.cert, &config.key, error))?;
    Ok((server, expiries))
}
