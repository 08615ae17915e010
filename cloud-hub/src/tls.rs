//! The hub's side of mutual TLS over QUIC, and how a site's identity is read from its certificate.
//!
//! Trust model: a client must present a certificate chaining to our private CA (see [`crate::pki`]); the site it
//! speaks for is the certificate's single Common Name, validated as a [`SiteId`]. Nothing the agent says later
//! (for example in a `Hello` frame) can change that identity.
//!
//! Crypto provider: configs are built with [`provider`] (ring) passed explicitly through
//! `builder_with_provider`, so no process-wide default provider has to be installed and the "could not
//! determine the process-level CryptoProvider" panic cannot happen, whatever else is linked in.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use meshbridge_tls::{load_certs, load_key, load_roots};
pub use meshbridge_tls::{provider, PemError, ALPN};
use quinn::crypto::rustls::{NoInitialCipherSuite, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use rustls::server::{VerifierBuilderError, WebPkiClientVerifier};

use crate::pki::{SiteId, SiteNameError};

/// Errors building the hub's TLS configuration or reading a peer's identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate, key or CA file is unusable.
    #[error(transparent)]
    Pem(#[from] PemError),
    /// The client-certificate verifier could not be built (for example, no trust anchors).
    #[error("cannot build the client certificate verifier")]
    Verifier(#[from] VerifierBuilderError),
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
    /// The connection carries no peer identity (handshake not complete, or the peer sent no certificate).
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    /// The peer identity is not a rustls certificate chain (a different QUIC crypto backend).
    #[error("peer identity is not a certificate chain")]
    UnexpectedIdentityType,
    /// The leaf certificate does not name exactly one Common Name.
    #[error(transparent)]
    Identity(#[from] meshbridge_tls::server::IdentityError),
    /// The Common Name is not a valid site name.
    #[error("peer certificate Common Name {name:?} is not a valid site name")]
    InvalidSiteName {
        /// The Common Name as found.
        name: String,
        /// Which rule it broke.
        #[source]
        source: SiteNameError,
    },
}

/// QUIC transport knobs for the hub's side of each agent connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTransport {
    /// Close a connection after this long without any packet from the agent.
    pub idle_timeout: Duration,
    /// Send a keep-alive after this long without hearing from the agent. The agent pings too, but under
    /// heavy loss its own probes back off exponentially and it can go silent for longer than its idle
    /// timeout (2 s by default): the hub's pings then keep the link from being torn down and re-handshaken
    /// through the same loss (issue 7, hole 12: a 3.2 s stall at 30 % loss was exactly that). Costs nothing
    /// on a healthy link, where the agent's packets reset this timer.
    pub keep_alive_interval: Option<Duration>,
    /// Per-stream flow-control window in bytes. The agent pushes its whole backlog on one stream after a
    /// reconnect, so this bounds throughput to `window / RTT`: several MiB keeps a WAN link busy.
    pub stream_receive_window: u32,
    /// Connection-wide flow-control window in bytes (all streams of one agent).
    pub receive_window: u32,
    /// Bytes the hub may have in flight towards one agent (config pushes, acks).
    pub send_window: u64,
    /// How many bidirectional streams an agent may have open at once.
    pub max_concurrent_bidi_streams: u32,
    /// How many unidirectional streams an agent may have open at once.
    pub max_concurrent_uni_streams: u32,
    /// Largest ACK delay the hub asks each agent to use (QUIC ACK-frequency extension); it is part of the
    /// hub's probe timeout for its acks and config pushes. See the agent's `ClientTransport` for why 5 ms.
    pub max_ack_delay: Duration,
    /// How many ack-eliciting packets the agent may receive before it must acknowledge at once (QUIC
    /// ACK-frequency extension). See the agent's `ClientTransport` for why 8.
    pub ack_eliciting_threshold: u32,
}

impl Default for ServerTransport {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive_interval: Some(Duration::from_millis(500)),
            stream_receive_window: 8 << 20,
            receive_window: 16 << 20,
            send_window: 8 << 20,
            max_concurrent_bidi_streams: 16,
            max_concurrent_uni_streams: 16,
            max_ack_delay: Duration::from_millis(5),
            ack_eliciting_threshold: 8,
        }
    }
}

impl ServerTransport {
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
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_concurrent_bidi_streams))
            .max_concurrent_uni_streams(VarInt::from_u32(self.max_concurrent_uni_streams));
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.max_ack_delay(Some(self.max_ack_delay))
            .ack_eliciting_threshold(VarInt::from_u32(self.ack_eliciting_threshold));
        t.ack_frequency_config(Some(ack));
        Ok(t)
    }
}

/// Builds the hub's QUIC server configuration: TLS 1.3 only, client certificate **required** and verified against
/// the CA in `ca` and not revoked by any of `crls`, ALPN [`ALPN`], server certificate/key from `cert`/`key` (PEM).
///
/// Revocation is checked for the leaf only, and a leaf whose issuer has no CRL here passes (a CA bundle
/// being rotated may hold a CA whose list the hub was not given; `crate::crl` explains the model).
pub fn server_config(
    ca: &Path,
    cert: &Path,
    key: &Path,
    crls: Vec<CertificateRevocationListDer<'static>>,
    transport: &ServerTransport,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let roots = load_roots(ca)?;
    let mut builder =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    if !crls.is_empty() {
        builder = builder
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .allow_unknown_revocation_status();
    }
    let verifier = builder.build()?;
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport.to_quinn()?));
    Ok(config)
}

/// The site a connection speaks for, from its verified client certificate.
///
/// Only meaningful on connections accepted with [`server_config`], where the verifier has already checked the
/// chain, validity and client-auth usage before the connection is handed out.
pub fn site_identity(conn: &quinn::Connection) -> Result<SiteId, TlsError> {
    let identity = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::UnexpectedIdentityType)?;
    site_identity_from_chain(&chain)
}

/// The serial and expiry of a connection's verified client certificate.
pub fn peer_certificate(conn: &quinn::Connection) -> Result<PeerCertificate, TlsError> {
    let identity = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let chain = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| TlsError::UnexpectedIdentityType)?;
    let facts = meshbridge_tls::server::leaf_facts(&chain)?;
    Ok(PeerCertificate {
        serial: crate::crl::Serial::from_be(&facts.serial),
        not_after: facts.not_after,
    })
}

/// What the hub keeps of an agent's certificate: the serial a CRL may name, and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The certificate's serial.
    pub serial: crate::crl::Serial,
    /// Its `notAfter`, Unix seconds.
    pub not_after: i64,
}

/// [`site_identity`] on an already extracted chain (leaf first): the leaf's single Common Name as a [`SiteId`].
pub fn site_identity_from_chain(chain: &[CertificateDer<'_>]) -> Result<SiteId, TlsError> {
    if chain.is_empty() {
        return Err(TlsError::NoPeerCertificate);
    }
    let name = meshbridge_tls::server::leaf_common_name(chain)?;
    SiteId::new(&name).map_err(|source| TlsError::InvalidSiteName { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{Ca, Validity};
    use rcgen::{CertificateParams, DistinguishedName, DnType, DnValue};
    use rustls::pki_types::pem::PemObject;
    use std::fs;
    use time::OffsetDateTime;

    fn der_of(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("rcgen emits valid PEM")
    }

    fn cert_with_subject(ca: &Ca, dn: DistinguishedName) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn;
        let validity = Validity::starting_at(OffsetDateTime::now_utc(), Duration::from_secs(3600))
            .expect("window");
        der_of(&ca.issue_custom(params, validity).expect("issue").cert_pem)
    }

    fn dn(entries: &[(DnType, DnValue)]) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        for (ty, value) in entries {
            dn.push(ty.clone(), value.clone());
        }
        dn
    }

    #[test]
    fn identity_from_leaf_common_name() {
        let validity = Validity::starting_at(OffsetDateTime::now_utc(), Duration::from_secs(3600))
            .expect("window");
        let ca = Ca::generate("test CA", validity).expect("ca");
        // rcgen keys DN entries by type, so a second CN needs the CN OID spelled as a custom type.
        let cn_oid = DnType::CustomDnType(vec![2, 5, 4, 3]);
        let utf8 = |s: &str| DnValue::Utf8String(s.to_owned());
        type Check = fn(&Result<SiteId, TlsError>) -> bool;
        let cases: Vec<(&str, DistinguishedName, Check)> = vec![
            (
                "plain CN",
                dn(&[(DnType::CommonName, utf8("line1"))]),
                |r| matches!(r, Ok(id) if id == "line1"),
            ),
            (
                "CN with organisation",
                dn(&[
                    (DnType::OrganizationName, utf8("acme")),
                    (DnType::CommonName, utf8("plant-1.line_2")),
                ]),
                |r| matches!(r, Ok(id) if id == "plant-1.line_2"),
            ),
            (
                "printable string CN",
                dn(&[(
                    DnType::CommonName,
                    DnValue::PrintableString("line3".try_into().expect("printable")),
                )]),
                |r| matches!(r, Ok(id) if id == "line3"),
            ),
            (
                "no CN",
                dn(&[(DnType::OrganizationName, utf8("acme"))]),
                |r| {
                    matches!(
                        r,
                        Err(TlsError::Identity(
                            meshbridge_tls::server::IdentityError::NoCommonName
                        ))
                    )
                },
            ),
            ("empty subject", DistinguishedName::new(), |r| {
                matches!(
                    r,
                    Err(TlsError::Identity(
                        meshbridge_tls::server::IdentityError::NoCommonName
                    ))
                )
            }),
            (
                "two CNs",
                dn(&[(DnType::CommonName, utf8("line1")), (cn_oid, utf8("line2"))]),
                |r| {
                    matches!(
                        r,
                        Err(TlsError::Identity(
                            meshbridge_tls::server::IdentityError::MultipleCommonNames { count: 2 }
                        ))
                    )
                },
            ),
            (
                "CN with slash",
                dn(&[(DnType::CommonName, utf8("a/b"))]),
                |r| {
                    matches!(
                        r,
                        Err(TlsError::InvalidSiteName {
                            source: SiteNameError::InvalidChar { ch: '/', .. },
                            ..
                        })
                    )
                },
            ),
            ("empty CN", dn(&[(DnType::CommonName, utf8(""))]), |r| {
                matches!(
                    r,
                    Err(TlsError::InvalidSiteName {
                        source: SiteNameError::Empty,
                        ..
                    })
                )
            }),
        ];
        for (label, subject, check) in cases {
            let got = site_identity_from_chain(&[cert_with_subject(&ca, subject)]);
            assert!(check(&got), "{label}: got {got:?}");
        }
    }

    #[test]
    fn identity_errors_without_a_parseable_leaf() {
        assert!(matches!(
            site_identity_from_chain(&[]),
            Err(TlsError::NoPeerCertificate)
        ));
        let garbage = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        assert!(matches!(
            site_identity_from_chain(&[garbage]),
            Err(TlsError::Identity(
                meshbridge_tls::server::IdentityError::Parse(_)
            ))
        ));
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = crate::pki::init(dir.path(), &[]).expect("init");
        let missing = dir.path().join("missing.pem");
        let not_pem = dir.path().join("not.pem");
        fs::write(&not_pem, b"hello").expect("write");
        let t = ServerTransport::default();
        let err = server_config(&missing, &paths.hub_cert, &paths.hub_key, Vec::new(), &t)
            .expect_err("missing CA");
        assert!(
            matches!(err, TlsError::Pem(ref e @ PemError::Io { .. }) if e.path() == missing),
            "{err:?}"
        );
        let err = server_config(&not_pem, &paths.hub_cert, &paths.hub_key, Vec::new(), &t)
            .expect_err("no cert in CA file");
        assert!(
            matches!(err, TlsError::Pem(ref e @ PemError::NoCertificates { .. }) if e.path() == not_pem),
            "{err:?}"
        );
        let err = server_config(&paths.ca_cert, &paths.hub_cert, &not_pem, Vec::new(), &t)
            .expect_err("no key");
        assert!(
            matches!(
                err,
                TlsError::Pem(PemError::Pem {
                    what: "private key",
                    ..
                })
            ),
            "{err:?}"
        );
        // Hub certificate with the CA's key: rustls notices the mismatch.
        let err = server_config(
            &paths.ca_cert,
            &paths.hub_cert,
            &paths.ca_key,
            Vec::new(),
            &t,
        )
        .expect_err("key mismatch");
        assert!(matches!(err, TlsError::Rustls(_)), "{err:?}");
        let huge = ServerTransport {
            idle_timeout: Duration::from_secs(u64::MAX),
            ..ServerTransport::default()
        };
        let err = server_config(
            &paths.ca_cert,
            &paths.hub_cert,
            &paths.hub_key,
            Vec::new(),
            &huge,
        )
        .expect_err("idle");
        assert!(
            matches!(err, TlsError::IdleTimeoutTooLarge { .. }),
            "{err:?}"
        );
        server_config(
            &paths.ca_cert,
            &paths.hub_cert,
            &paths.hub_key,
            Vec::new(),
            &t,
        )
        .expect("valid config");
    }
}
