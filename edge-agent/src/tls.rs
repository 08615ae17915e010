//! The agent's side of mutual TLS over QUIC: trust only our private CA for the hub, and present the site's client
//! certificate, which is the *only* thing the hub believes about who we are.
//!
//! Configs are built with the ring provider passed explicitly (`builder_with_provider`), so no process-wide
//! default crypto provider is needed.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{NoInitialCipherSuite, QuicClientConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

/// ALPN protocol id of the meshbridge agent↔hub protocol, version 1; must equal the hub's.
pub const ALPN: &[u8] = b"meshbridge/1";

/// The one rustls crypto provider meshbridge uses (ring), for passing to `builder_with_provider`.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Errors building the agent's TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A certificate or key file is not valid PEM (or has no object of the expected kind).
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
    /// rustls refused the configuration: protocol versions, or the certificate does not match the key.
    #[error("invalid TLS configuration")]
    Rustls(#[source] rustls::Error),
    /// The rustls configuration has no cipher suite usable for QUIC's initial packets.
    #[error("TLS configuration unusable for QUIC")]
    NoInitialCipherSuite(#[from] NoInitialCipherSuite),
    /// The idle timeout does not fit in a QUIC varint of milliseconds.
    #[error("idle timeout {idle_timeout:?} is too large for QUIC")]
    IdleTimeoutTooLarge {
        /// The rejected value.
        idle_timeout: Duration,
    },
}

/// QUIC transport knobs for the agent's connection to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTransport {
    /// Declare the hub gone after this long without any packet from it.
    pub idle_timeout: Duration,
    /// Send a keep-alive after this long without traffic, so NAT bindings and the idle timer stay alive while
    /// the site has nothing to send. Must be well below `idle_timeout` (and below the hub's).
    pub keep_alive_interval: Option<Duration>,
    /// Per-stream flow-control window in bytes for data from the hub (acks, config pushes: small).
    pub stream_receive_window: u32,
    /// Connection-wide flow-control window in bytes.
    pub receive_window: u32,
    /// Bytes the agent may have in flight towards the hub. Uplink throughput is bounded by `window / RTT`, so a
    /// backlog drain after an outage needs several MiB here.
    pub send_window: u64,
    /// RTT assumed before the first measurement. It sets how soon an unanswered handshake packet is resent
    /// (about 3× this, doubling each time): with quinn's default (333 ms) a hub that comes back just after
    /// an attempt started is noticed only ~1 s later. A lower guess costs at most a few spurious resends of
    /// the first packet on a long-RTT link; the estimate is replaced by the first real sample.
    pub initial_rtt: Duration,
}

impl Default for ClientTransport {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Some(Duration::from_secs(5)),
            stream_receive_window: 1 << 20,
            receive_window: 4 << 20,
            send_window: 16 << 20,
            initial_rtt: Duration::from_millis(100),
        }
    }
}

impl ClientTransport {
    fn to_quinn(&self) -> Result<TransportConfig, TlsError> {
        let idle = IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            TlsError::IdleTimeoutTooLarge {
                idle_timeout: self.idle_timeout,
            }
        })?;
        let mut t = TransportConfig::default();
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(self.keep_alive_interval)
            .stream_receive_window(VarInt::from_u32(self.stream_receive_window))
            .receive_window(VarInt::from_u32(self.receive_window))
            .send_window(self.send_window)
            .initial_rtt(self.initial_rtt);
        Ok(t)
    }
}

/// Builds the agent's QUIC client configuration: TLS 1.3 only, the hub verified against the CA in `ca` (and the
/// server name given to `connect`), the site certificate/key from `cert`/`key` (PEM) presented for client auth,
/// ALPN [`ALPN`].
pub fn client_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    transport: &ClientTransport,
) -> Result<quinn::ClientConfig, TlsError> {
    let roots = load_roots(ca)?;
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport.to_quinn()?));
    Ok(config)
}

/// Builds a rustls client configuration for MQTT over TLS to an external broker: the broker verified against
/// the CA in `ca`, and optionally a client certificate/key for brokers that require mutual TLS. TLS 1.2 is
/// allowed here (unlike the uplink), since site brokers often still run it.
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

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            what: "certificate",
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|source| TlsError::Pem {
        path: path.to_owned(),
        what: "private key",
        source,
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|source| TlsError::BadCaCertificate {
                path: path.to_owned(),
                source,
            })?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_errors_name_the_file() {
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
        type Check = fn(&TlsError, &Path) -> bool;
        let cases: [(&Path, Check); 3] = [
            (
                &missing,
                |e, p| matches!(e, TlsError::Io { path, .. } if path == p),
            ),
            (
                &empty,
                |e, p| matches!(e, TlsError::NoCertificates { path } if path == p),
            ),
            (
                &bogus,
                |e, p| matches!(e, TlsError::BadCaCertificate { path, .. } if path == p),
            ),
        ];
        for (ca, check) in cases {
            let err = client_config(ca, &empty, &empty, &ClientTransport::default())
                .expect_err("must fail");
            assert!(check(&err, ca), "{}: {err:?}", ca.display());
        }
    }
}
