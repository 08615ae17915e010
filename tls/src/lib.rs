//! meshbridge-tls: the TLS pieces the agent and the hub share, so there is one way to load a certificate and
//! one crypto provider in the whole mesh.
//!
//! - [`provider`]: ring, passed explicitly to every `builder_with_provider`, so no process-wide default is
//!   needed (rustls panics at config time when two providers are compiled in and none was installed).
//! - [`ALPN`]: the agent↔hub protocol id, one constant for both ends.
//! - [`load_certs`], [`load_key`], [`load_roots`]: PEM files to rustls types, every error naming its file.
//! - [`mqtt_client_config`]: TLS to an external MQTT broker (the site's Mosquitto, the cloud broker).
//! - [`server`]: TLS on the embedded brokers' client listeners (reloaded certificates, client
//!   certificates) and the leaf Common Name both the hub (site identity) and the brokers (user name) use.
//!
//! The QUIC configurations themselves stay with their programs (`edge_agent::tls`, `cloud_hub::tls`): they
//! differ in everything but these pieces.

pub mod server;

/// Certificates expiring within this many seconds (30 days) are warned about by both programs.
pub const EXPIRY_WARNING_SECS: i64 = 30 * 24 * 3600;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// ALPN protocol id of the meshbridge agent↔hub protocol, version 1.
pub const ALPN: &[u8] = b"meshbridge/1";

/// The one rustls crypto provider meshbridge uses (ring), for passing to `builder_with_provider`.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate, key or CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not valid PEM, or has no object of the expected kind.
    #[error("cannot parse {what} from {path}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected in it ("certificate", "private key").
        what: &'static str,
        /// The PEM parser's error.
        #[source]
        source: pem::Error,
    },
    /// A certificate file holds no certificate at all.
    #[error("no certificate in {path}")]
    NoCertificates {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate was rejected as a trust anchor.
    #[error("unusable CA certificate in {path}")]
    BadCaCertificate {
        /// The CA file.
        path: PathBuf,
        /// Why rustls rejected it.
        #[source]
        source: rustls::Error,
    },
}

impl PemError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            Self::Io { path, .. }
            | Self::Pem { path, .. }
            | Self::NoCertificates { path }
            | Self::BadCaCertificate { path, .. } => path,
        }
    }
}

/// Errors building an MQTT client TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file is unusable.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// rustls refused the configuration: the certificate does not match the key, or no protocol version fits.
    #[error("invalid TLS configuration")]
    Rustls(#[source] rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    fs::read(path).map_err(|source| PemError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Every certificate in a PEM file, in order (a chain: leaf first). An empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| PemError::Pem {
            path: path.to_owned(),
            what: "certificate",
            source,
        })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| PemError::Pem {
        path: path.to_owned(),
        what: "private key",
        source,
    })
}

/// A root store holding every certificate of a PEM file as a trust anchor.
pub fn load_roots(path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|source| PemError::BadCaCertificate {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(roots)
}

/// A rustls client configuration for MQTT over TLS to an external broker: the broker verified against the CA
/// in `ca`, and optionally a client certificate and key for brokers that require mutual TLS. TLS 1.2 is
/// allowed here (unlike the agent↔hub link, which is TLS 1.3 only), since site brokers often still run it.
pub fn mqtt_client_config(
    ca: &Path,
    client_auth: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let roots = load_roots(ca)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_root_certificates(roots);
    match client_auth {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(TlsError::Rustls),
        None => Ok(builder.with_no_client_auth()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, b"no pem here").expect("write");
        let bogus = dir.path().join("bogus.pem");
        fs::write(
            &bogus,
            b"-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n",
        )
        .expect("write");

        let e = load_roots(&missing).expect_err("missing");
        assert!(matches!(e, PemError::Io { .. }) && e.path() == missing);
        let e = load_roots(&empty).expect_err("empty");
        assert!(matches!(e, PemError::NoCertificates { .. }) && e.path() == empty);
        let e = load_roots(&bogus).expect_err("bogus");
        assert!(matches!(e, PemError::BadCaCertificate { .. }) && e.path() == bogus);
        let e = load_key(&empty).expect_err("no key");
        assert!(matches!(
            e,
            PemError::Pem {
                what: "private key",
                ..
            }
        ));
        assert!(e.to_string().contains("empty.pem"), "{e}");
        let e = mqtt_client_config(&missing, None).expect_err("missing CA");
        assert!(matches!(e, TlsError::Pem(PemError::Io { .. })));
    }
}
