//! TLS for the MQTT client listeners of the embedded brokers (issue 11, item 1): a rustls server
//! configuration whose certificate is re-read when its files change, optional client-certificate
//! authentication, and the client certificate's Common Name as the MQTT user name.
//!
//! # Reload
//! Certificates are renewed while brokers run (a plant's IT rotates them; ACME clients do it every few
//! weeks). The resolver checks the certificate and key files' modification times at most every
//! [`RELOAD_CHECK`], during a handshake, and swaps in the new pair when both load and match; a pair that
//! does not load is reported through the caller's hook and the running one stays. Connections already
//! open keep their session.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, X509Certificate, X509Error};

use crate::{load_certs, load_key, load_roots, provider, TlsError};

/// How often, at most, the certificate files are checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// Called with what happened when the certificate files changed: `Ok` with the certificate file after a
/// reload, `Err` with why the new pair was refused.
pub type ReloadHook = Arc<dyn Fn(Result<&Path, &TlsError>) + Send + Sync>;

/// Where a listener's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFiles {
    /// PEM chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA bundle client certificates must chain to; `Some` requires one from every client.
    pub client_ca: Option<PathBuf>,
}

struct Current {
    stamps: Option<(SystemTime, SystemTime)>,
    checked: Instant,
    key: Arc<CertifiedKey>,
}

/// A certificate and key read from files and re-read when they change (see the module docs). Serves as
/// the certificate of a server (an MQTT listener) or of a client (the agent's site certificate towards
/// the hub, renewed with `cloud-hub pki renew-site` while the agent runs).
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    current: Mutex<Current>,
    hook: ReloadHook,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

fn stamps(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((modified(cert)?, modified(key)?))
}

fn certified(cert: &Path, key: &Path, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain = load_certs(cert)?;
    let key = load_key(key)?;
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(TlsError::Rustls)?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(TlsError::Rustls)?;
    Ok(certified)
}

impl ReloadingCert {
    /// Loads the pair now (an error here is the caller's start-up error); later changes go to `hook`.
    ///
    /// # Errors
    /// [`TlsError`] when a file cannot be used or the certificate does not match its key.
    pub fn new(cert: &Path, key: &Path, hook: ReloadHook) -> Result<Self, TlsError> {
        let provider = provider();
        let loaded = certified(cert, key, &provider)?;
        Ok(Self {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            current: Mutex::new(Current {
                stamps: stamps(cert, key),
                checked: Instant::now(),
                key: Arc::new(loaded),
            }),
            hook,
        })
    }

    /// The pair in force, after re-reading the files if [`RELOAD_CHECK`] has passed and they changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.checked.elapsed() >= RELOAD_CHECK {
            current.checked = Instant::now();
            let now = stamps(&self.cert, &self.key);
            if now != current.stamps {
                current.stamps = now;
                match certified(&self.cert, &self.key, &self.provider) {
                    Ok(key) => {
                        current.key = Arc::new(key);
                        (self.hook)(Ok(&self.cert));
                    }
                    Err(e) => (self.hook)(Err(&e)),
                }
            }
        }
        Arc::clone(&current.key)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ResolvesClientCert for ReloadingCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A rustls server configuration for an MQTT listener: TLS 1.2 and 1.3 (what MQTT clients in plants
/// speak), the certificate from `files` (re-read on change, reported to `hook`), and with
/// `files.client_ca` a client certificate required from every client and verified against it.
///
/// # Errors
/// [`TlsError`] when a file cannot be used or the certificate does not match its key.
pub fn mqtt_server_config(
    files: &ServerFiles,
    hook: ReloadHook,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let resolver = ReloadingCert::new(&files.cert, &files.key, hook)?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?;
    let config = match &files.client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(load_roots(ca)?), provider)
                    .build()
                    .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            builder
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(Arc::new(resolver))
        }
        None => builder
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver)),
    };
    Ok(Arc::new(config))
}

/// Why a certificate does not name one identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// No certificate was presented.
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The leaf certificate is not parseable X.509.
    #[error("cannot parse the peer's certificate")]
    Parse(#[source] X509Error),
    /// The leaf's subject has no Common Name.
    #[error("peer certificate has no Common Name")]
    NoCommonName,
    /// The subject has several Common Names; picking one would let a CA mistake choose the identity.
    #[error("peer certificate has {count} Common Names, expected exactly one")]
    MultipleCommonNames {
        /// How many CNs the subject has.
        count: usize,
    },
    /// The Common Name is not a UTF-8 string type.
    #[error("peer certificate Common Name is not a string")]
    NotString(#[source] X509Error),
}

/// The single Common Name of a verified chain's leaf (leaf first): the site's name at the hub, the MQTT
/// user name on a listener that requires client certificates.
///
/// # Errors
/// [`IdentityError`] when there is no leaf, it does not parse, or it has no or several CNs.
pub fn leaf_common_name(chain: &[CertificateDer<'_>]) -> Result<String, IdentityError> {
    let cert = parse_leaf(chain)?;
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next().ok_or(IdentityError::NoCommonName)?;
    let extra = cns.count();
    if extra > 0 {
        return Err(IdentityError::MultipleCommonNames { count: extra + 1 });
    }
    cn.as_str()
        .map(str::to_owned)
        .map_err(IdentityError::NotString)
}

/// The names a leaf certificate is valid for, in its order: the subject alternative names' DNS names and IP
/// addresses (as text). `cloud-hub site add` takes the first as the server name a new agent checks.
///
/// # Errors
/// [`IdentityError`] when the chain is empty or the leaf does not parse.
pub fn leaf_subject_alt_names(chain: &[CertificateDer<'_>]) -> Result<Vec<String>, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let cert = parse_leaf(chain)?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => names.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*bytes).expect("4 bytes"))
                            .to_string(),
                    ),
                    16 => names.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*bytes).expect("16 bytes"))
                            .to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Ok(names)
}

fn parse_leaf<'a>(chain: &'a [CertificateDer<'_>]) -> Result<X509Certificate<'a>, IdentityError> {
    let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| {
        IdentityError::Parse(match e {
            x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e) => e,
            x509_parser::nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
        })
    })?;
    Ok(cert)
}

/// What the hub and agent report about a certificate: its serial (what a CRL names) and the end of its
/// validity (what expiry warnings and metrics are made of).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFacts {
    /// The serial number, big-endian, without leading zero bytes.
    pub serial: Vec<u8>,
    /// `notAfter` as Unix seconds.
    pub not_after: i64,
}

impl LeafFacts {
    /// The serial as lower-case hex, colon-free (as `cloud-hub pki` prints and takes it).
    #[must_use]
    pub fn serial_hex(&self) -> String {
        hex(&self.serial)
    }

    /// Seconds from `now` (Unix seconds) until the certificate expires; negative once it has.
    #[must_use]
    pub const fn expires_in(&self, now: i64) -> i64 {
        self.not_after.saturating_sub(now)
    }
}

/// Lower-case hex of `bytes`.
#[must_use]
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            use std::fmt::Write as _;
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The serial and expiry of a chain's leaf (leaf first).
///
/// # Errors
/// [`IdentityError`] when there is no leaf or it does not parse.
pub fn leaf_facts(chain: &[CertificateDer<'_>]) -> Result<LeafFacts, IdentityError> {
    let cert = parse_leaf(chain)?;
    let serial = cert.tbs_certificate.serial.to_bytes_be();
    Ok(LeafFacts {
        serial,
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The serial and expiry of the PEM certificate at `path`, with the seconds left until it expires
/// (negative once it has); `None` when it does not load (the TLS setup reports why).
#[must_use]
pub fn certificate_file_expiry(path: &Path) -> Option<(LeafFacts, i64)> {
    let chain = load_certs(path).ok()?;
    let facts = leaf_facts(&chain).ok()?;
    let left = facts.expires_in(unix_now());
    Some((facts, left))
}

/// The wall clock as Unix seconds (certificate validity is a calendar matter; 0 before 1970).
#[must_use]
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}
