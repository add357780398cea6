//! Loading PEM certificates, keys and CA bundles, with errors that name the file and
//! say what is wrong with it, and the expiry times the metrics export.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum CertError {
    #[error("{path}: cannot read: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path}: no certificate found (expected a PEM block \"BEGIN CERTIFICATE\")")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no private key found (expected a PEM PRIVATE KEY block)")]
    NoKey { path: PathBuf },
    #[error("{path}: not valid PEM: {message}")]
    BadPem { path: PathBuf, message: String },
    #[error("{path}: certificate is not valid X.509: {message}")]
    BadCertificate { path: PathBuf, message: String },
    #[error("{path}: certificate expired at {not_after} (Unix time)")]
    Expired { path: PathBuf, not_after: i64 },
    #[error("{cert} and {key}: the key does not match the certificate")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{cert} and {key}: {message}")]
    Unusable {
        cert: PathBuf,
        key: PathBuf,
        message: String,
    },
    #[error("{0}")]
    Config(String),
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|error| CertError::Read {
        path: path.to_path_buf(),
        message: error.to_string(),
    })
}

/// Every certificate in a PEM file, in order (a chain, or a CA bundle).
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| CertError::BadPem {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert).map_err(|error| CertError::BadCertificate {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub(crate) fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|error| match error {
        rustls::pki_types::pem::Error::NoItemsFound => CertError::NoKey {
            path: path.to_path_buf(),
        },
        other => CertError::BadPem {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })
}

/// notAfter of a certificate, as Unix seconds.
pub(crate) fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    x509_parser::parse_x509_certificate(cert)
        .ok()
        .map(|(_, parsed)| parsed.validity().not_after.timestamp())
}

/// The earliest notAfter in a chain or bundle.
fn earliest_expiry(certs: &[CertificateDer<'_>]) -> Option<i64> {
    certs.iter().filter_map(not_after).min()
}

/// Refuse our own certificate when it has already expired: serving it would only fail
/// every handshake, and the old material (on reload) is better.
fn check_not_expired(path: &Path, certs: &[CertificateDer<'_>]) -> Result<(), CertError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match certs.first().and_then(not_after) {
        Some(not_after) if not_after < now => Err(CertError::Expired {
            path: path.to_path_buf(),
            not_after,
        }),
        _ => Ok(()),
    }
}

/// A CA bundle as a root store, with the bundle's earliest notAfter.
pub(crate) fn load_roots(path: &Path) -> Result<(rustls::RootCertStore, Option<i64>), CertError> {
    let cas = load_certs(path)?;
    let expiry = earliest_expiry(&cas);
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca).map_err(|error| CertError::BadCertificate {
            path: path.to_path_buf(),
            message: error.to_string(),
        })?;
    }
    Ok((roots, expiry))
}

/// Our own certificate chain (leaf first), refused when the leaf has expired, with the
/// leaf's notAfter.
pub(crate) fn load_own_chain(
    path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, Option<i64>), CertError> {
    let chain = load_certs(path)?;
    check_not_expired(path, &chain)?;
    let expiry = earliest_expiry(&chain[..1]);
    Ok((chain, expiry))
}

/// Map rustls's key-loading errors onto the file names.
pub(crate) fn key_error(cert: &Path, key: &Path, error: rustls::Error) -> CertError {
    match error {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            CertError::KeyMismatch {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
            }
        }
        other => CertError::Unusable {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            message: other.to_string(),
        },
    }
}

/// The subject of a peer's leaf certificate, for logs ("-" when there is none).
pub(crate) fn subject(chain: Option<&[CertificateDer<'_>]>) -> String {
    chain
        .and_then(|chain| chain.first())
        .and_then(|leaf| x509_parser::parse_x509_certificate(leaf).ok())
        .map(|(_, cert)| cert.subject().to_string())
        .unwrap_or_else(|| "-".to_string())
}
