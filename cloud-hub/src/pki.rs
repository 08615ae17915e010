//! A small private PKI for meshbridge: one CA, the hub's server certificate and one client certificate per site.
//!
//! Why a private CA: the hub takes a site's identity *only* from the client certificate it presents (mutual TLS
//! over QUIC, see [`crate::tls`]). Whoever can make the CA sign a certificate with `CN = line1` *is* `line1` as far
//! as the hub is concerned, so the CA key is the root of trust and is written with mode `0600`, never overwritten.
//!
//! On-disk layout of a PKI directory (names are the `*_FILE` constants below):
//!
//! ```text
//! ca.pem   ca.key           private CA (10 years), created once by `init`
//! hub.pem  hub.key          hub server certificate for its DNS names / IPs
//! site-<name>.pem/.key      one client certificate per site (CN = site name)
//! crl.pem                   revoked certificates, signed by the CA (see `crate::crl`)
//! issued.txt                one line per site certificate issued: serial, site, expiry
//! ```
//!
//! Everything that needs the current time takes it as a parameter ([`Validity`]) except the two file-level
//! conveniences [`init`]/[`ensure_init`]/[`issue_site`], which read the clock once so the dev script stays short.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

pub use shared::site::{SiteId, SiteNameError, MAX_SITE_NAME_LEN, SITE_SAN_SUFFIX};

/// File name of the CA certificate inside a PKI directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a PKI directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the hub server certificate inside a PKI directory.
pub const HUB_CERT_FILE: &str = "hub.pem";
/// File name of the hub server private key inside a PKI directory.
pub const HUB_KEY_FILE: &str = "hub.key";

/// How long the CA is valid. Rotating a CA means re-issuing every site certificate, so it is long.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// How long the hub server certificate issued by [`init`] / [`ensure_init`] is valid.
pub const HUB_CERT_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

/// How far `not_before` is moved into the past by [`Validity::starting_at`], so a peer whose clock runs a little
/// behind ours does not reject a freshly issued certificate as not yet valid.
pub const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Names put in the hub certificate when [`init`] is given none: the conventional hub name plus loopback, which is
/// what the dev script and the tests connect to.
pub fn default_hub_names() -> Vec<String> {
    vec![
        "hub.meshbridge.local".to_owned(),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ]
}

/// Errors from creating, loading or writing PKI material.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// [`init`] found an existing CA certificate or key; a CA is never overwritten because every site certificate
    /// issued by it would silently stop working.
    #[error("refusing to overwrite existing CA file {path}")]
    CaExists {
        /// The CA file that already exists.
        path: PathBuf,
    },
    /// [`ensure_init`] found hub files but no CA to go with them: the directory is inconsistent and needs a human.
    #[error("PKI directory is inconsistent: {path} is missing but other PKI files exist")]
    CaMissing {
        /// The CA file that is missing.
        path: PathBuf,
    },
    /// Reading or writing a PKI file failed.
    #[error("I/O error on {path}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A CA certificate or key on disk could not be parsed.
    #[error("cannot parse {path}")]
    Parse {
        /// The file that failed to parse.
        path: PathBuf,
        /// What rcgen reported.
        #[source]
        source: rcgen::Error,
    },
    /// Key generation or certificate signing failed inside rcgen.
    #[error("cannot generate the {what}")]
    Generate {
        /// Which object was being generated (for example "site certificate").
        what: &'static str,
        /// What rcgen reported.
        #[source]
        source: rcgen::Error,
    },
    /// A hub name is neither an IP address nor a valid DNS name.
    #[error("invalid hub name {name:?}")]
    InvalidHubName {
        /// The rejected name.
        name: String,
        /// What rcgen reported.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate's file name part would leave the PKI directory or be hidden.
    #[error("invalid certificate file name {name:?}: no `/`, `\\` or leading `.`")]
    InvalidFileName {
        /// The rejected name.
        name: String,
    },
    /// A site name does not follow the site-name rules (see [`SiteId`]).
    #[error("invalid site name {name:?}")]
    InvalidSiteName {
        /// The rejected name.
        name: String,
        /// Which rule it broke.
        #[source]
        source: SiteNameError,
    },
    /// A validity window is empty, inverted or out of the representable range.
    #[error(
        "invalid validity window: not_before {not_before} must be before not_after {not_after}"
    )]
    InvalidValidity {
        /// Requested start.
        not_before: OffsetDateTime,
        /// Requested end.
        not_after: OffsetDateTime,
    },
    /// A serial number is not hex.
    #[error("invalid serial number {text:?}: expected hex, e.g. 3f:a0:... or 3fa0...")]
    InvalidSerial {
        /// What was given.
        text: String,
    },
    /// A CRL file is not one PEM-encoded X.509 CRL.
    #[error("cannot read the revocation list {path}: {why}")]
    Crl {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A certificate file cannot be read as a certificate.
    #[error("cannot read the certificate {path}: {why}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// `revoke` found no certificate issued for the site (no issuance log line, no `site-<name>.pem`).
    #[error("no certificate of site {site:?} is known in this PKI directory (give --serial to revoke one by its serial)")]
    NothingToRevoke {
        /// The site.
        site: String,
    },
    /// A lifetime added to the current time overflows the calendar.
    #[error("certificate lifetime {lifetime:?} is too large")]
    LifetimeTooLarge {
        /// The requested lifetime.
        lifetime: Duration,
    },
}

/// A certificate's validity window. Time is a parameter so tests can issue expired and not-yet-valid
/// certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// First instant the certificate is valid.
    pub not_before: OffsetDateTime,
    /// Last instant the certificate is valid.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// An explicit window; fails unless `not_before < not_after`.
    pub fn new(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Result<Self, PkiError> {
        if not_before >= not_after {
            return Err(PkiError::InvalidValidity {
                not_before,
                not_after,
            });
        }
        Ok(Self {
            not_before,
            not_after,
        })
    }

    /// A window of `lifetime` from `now`, with `not_before` backdated by [`CLOCK_SKEW_ALLOWANCE`].
    pub fn starting_at(now: OffsetDateTime, lifetime: Duration) -> Result<Self, PkiError> {
        let too_large = || PkiError::LifetimeTooLarge { lifetime };
        let not_after = time::Duration::try_from(lifetime)
            .ok()
            .and_then(|d| now.checked_add(d))
            .ok_or_else(too_large)?;
        let skew = time::Duration::try_from(CLOCK_SKEW_ALLOWANCE).map_err(|_| too_large())?;
        let not_before = now.checked_sub(skew).ok_or_else(too_large)?;
        Self::new(not_before, not_after)
    }
}

/// A freshly issued certificate and its private key, both PEM, not yet on disk.
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM. Secret.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key, even at debug level.
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Writes the certificate and key (key with mode `0600`), replacing existing files atomically.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_replace(key_path, self.key_pem.as_bytes(), 0o600)?;
        write_replace(cert_path, self.cert_pem.as_bytes(), 0o644)
    }
}

/// A certificate authority able to sign hub and site certificates, held in memory.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Generates a new self-signed CA with the given common name, valid for `validity`.
    ///
    /// Besides [`init`], tests use this to make an *unrelated* CA whose site certificates the hub must refuse.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(|source| PkiError::Generate {
            what: "CA key",
            source,
        })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "meshbridge");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        // Path length 0: this CA signs end-entity certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params
            .self_signed(&key)
            .map_err(|source| PkiError::Generate {
                what: "CA certificate",
                source,
            })?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and PEM private key.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_pem = read_to_string(cert_path)?;
        let key_pem = read_to_string(key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|source| PkiError::Parse {
            path: key_path.to_owned(),
            source,
        })?;
        let issuer =
            Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| PkiError::Parse {
                path: cert_path.to_owned(),
                source,
            })?;
        Ok(Self { cert_pem, issuer })
    }

    /// Signs a certificate revocation list with the CA's key; returns it as PEM.
    pub fn sign_crl(
        &self,
        params: &rcgen::CertificateRevocationListParams,
    ) -> Result<String, PkiError> {
        let what = "revocation list";
        params
            .signed_by(&self.issuer)
            .and_then(|crl| crl.pem())
            .map_err(|source| PkiError::Generate { what, source })
    }

    /// The CA certificate, PEM (what agents and the hub put in their trust roots).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Writes the CA certificate and key (key with mode `0600`). Fails with [`PkiError::CaExists`] if either file
    /// exists: a CA is never overwritten.
    pub fn write_new(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        for path in [cert_path, key_path] {
            if path.exists() {
                return Err(PkiError::CaExists {
                    path: path.to_owned(),
                });
            }
        }
        write_new(
            key_path,
            self.issuer.key().serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new(cert_path, self.cert_pem.as_bytes(), 0o644)
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses; the first is also the CN).
    pub fn issue_server(
        &self,
        names: &[String],
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name
                    .as_str()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(|source| PkiError::InvalidHubName {
                        name: name.clone(),
                        source,
                    }),
            })
            .collect::<Result<_, _>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign_leaf(params, validity, "server certificate")
    }

    /// Issues a client certificate for `site`: CN = site name, SAN DNS `<site>.sites.meshbridge`, client-auth EKU.
    pub fn issue_site(&self, site: &SiteId, validity: Validity) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, site.as_str());
        let san = site
            .san_dns_name()
            .try_into()
            .map_err(|source| PkiError::Generate {
                what: "site SAN",
                source,
            })?;
        params.subject_alt_names = vec![SanType::DnsName(san)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign_leaf(params, validity, "site certificate")
    }

    /// Issues a leaf certificate from caller-built parameters (tests use it for odd subjects, for example two
    /// CNs or none). Validity, key usage and the authority key identifier are filled in here.
    pub fn issue_custom(
        &self,
        params: CertificateParams,
        validity: Validity,
    ) -> Result<IssuedCert, PkiError> {
        self.sign_leaf(params, validity, "custom certificate")
    }

    fn sign_leaf(
        &self,
        mut params: CertificateParams,
        validity: Validity,
        what: &'static str,
    ) -> Result<IssuedCert, PkiError> {
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(|source| PkiError::Generate { what, source })?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Generate { what, source })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Paths of the CA and hub files in a PKI directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiPaths {
    /// CA certificate (`ca.pem`).
    pub ca_cert: PathBuf,
    /// CA private key (`ca.key`).
    pub ca_key: PathBuf,
    /// Hub server certificate (`hub.pem`).
    pub hub_cert: PathBuf,
    /// Hub server private key (`hub.key`).
    pub hub_key: PathBuf,
}

impl PkiPaths {
    /// The standard file names inside `dir`; touches nothing on disk.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            ca_cert: dir.join(CA_CERT_FILE),
            ca_key: dir.join(CA_KEY_FILE),
            hub_cert: dir.join(HUB_CERT_FILE),
            hub_key: dir.join(HUB_KEY_FILE),
        }
    }
}

/// Paths of one site's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteCertPaths {
    /// Site certificate (`site-<name>.pem`).
    pub cert: PathBuf,
    /// Site private key (`site-<name>.key`).
    pub key: PathBuf,
}

impl SiteCertPaths {
    /// The standard file names for `site` inside `dir`; touches nothing on disk.
    pub fn in_dir(dir: &Path, site: &SiteId) -> Self {
        Self {
            cert: dir.join(format!("site-{site}.pem")),
            key: dir.join(format!("site-{site}.key")),
        }
    }
}

/// Creates `dir` (if needed), a new CA and the hub certificate for `hub_names` ([`default_hub_names`] if empty).
///
/// Refuses with [`PkiError::CaExists`] if a CA is already there.
pub fn init(dir: &Path, hub_names: &[String]) -> Result<PkiPaths, PkiError> {
    let paths = PkiPaths::in_dir(dir);
    for path in [&paths.ca_cert, &paths.ca_key] {
        if path.exists() {
            return Err(PkiError::CaExists { path: path.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let now = OffsetDateTime::now_utc();
    let ca = Ca::generate(
        "meshbridge private CA",
        Validity::starting_at(now, CA_LIFETIME)?,
    )?;
    ca.write_new(&paths.ca_cert, &paths.ca_key)?;
    write_hub(&ca, &paths, hub_names, now)?;
    crate::crl::ensure(dir, now)?;
    Ok(paths)
}

/// Like [`init`], but reuses what exists: returns the paths untouched when CA and hub files are all present,
/// issues only the hub certificate when the CA exists without it, and runs [`init`] on an empty directory.
///
/// An existing hub certificate is kept as is even if `hub_names` differ from the names it covers.
pub fn ensure_init(dir: &Path, hub_names: &[String]) -> Result<PkiPaths, PkiError> {
    let paths = PkiPaths::in_dir(dir);
    match (paths.ca_cert.exists(), paths.ca_key.exists()) {
        (true, true) if paths.hub_cert.exists() && paths.hub_key.exists() => {
            crate::crl::ensure(dir, OffsetDateTime::now_utc())?;
            Ok(paths)
        }
        (true, true) => {
            let ca = Ca::load(&paths.ca_cert, &paths.ca_key)?;
            write_hub(&ca, &paths, hub_names, OffsetDateTime::now_utc())?;
            crate::crl::ensure(dir, OffsetDateTime::now_utc())?;
            Ok(paths)
        }
        // Hub files signed by a CA that is gone: minting a new CA would hide the problem.
        (false, false) if paths.hub_cert.exists() || paths.hub_key.exists() => {
            Err(PkiError::CaMissing {
                path: paths.ca_cert,
            })
        }
        (false, false) => init(dir, hub_names),
        (true, false) => Err(PkiError::CaMissing { path: paths.ca_key }),
        (false, true) => Err(PkiError::CaMissing {
            path: paths.ca_cert,
        }),
    }
}

/// Issues a site certificate valid for `lifetime` from now, signed by the CA in `dir`, and writes it as
/// `site-<site>.pem` / `site-<site>.key` (replacing an earlier one for the same site).
pub fn issue_site(dir: &Path, site: &str, lifetime: Duration) -> Result<SiteCertPaths, PkiError> {
    issue_site_with_validity(
        dir,
        site,
        Validity::starting_at(OffsetDateTime::now_utc(), lifetime)?,
    )
}

/// Issues a TLS server certificate for `names` (DNS names or IPs) valid for `lifetime` from now, signed
/// by the CA in `dir`, written as `server-<file>.pem` / `server-<file>.key` (replacing an earlier pair).
/// For the brokers' TLS ports (`broker.tls`, `[[broker.listeners]]`).
pub fn issue_server(
    dir: &Path,
    file: &str,
    names: &[String],
    lifetime: Duration,
) -> Result<SiteCertPaths, PkiError> {
    if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
        return Err(PkiError::InvalidFileName {
            name: file.to_owned(),
        });
    }
    let pki = PkiPaths::in_dir(dir);
    let ca = Ca::load(&pki.ca_cert, &pki.ca_key)?;
    let issued = ca.issue_server(
        names,
        Validity::starting_at(OffsetDateTime::now_utc(), lifetime)?,
    )?;
    let paths = SiteCertPaths {
        cert: dir.join(format!("server-{file}.pem")),
        key: dir.join(format!("server-{file}.key")),
    };
    issued.write(&paths.cert, &paths.key)?;
    Ok(paths)
}

/// Like [`issue_site`] with an explicit validity window (tests issue expired and not-yet-valid certificates).
pub fn issue_site_with_validity(
    dir: &Path,
    site: &str,
    validity: Validity,
) -> Result<SiteCertPaths, PkiError> {
    let site_id = SiteId::new(site).map_err(|source| PkiError::InvalidSiteName {
        name: site.to_owned(),
        source,
    })?;
    let pki = PkiPaths::in_dir(dir);
    let ca = Ca::load(&pki.ca_cert, &pki.ca_key)?;
    let issued = ca.issue_site(&site_id, validity)?;
    let paths = SiteCertPaths::in_dir(dir, &site_id);
    issued.write(&paths.cert, &paths.key)?;
    crate::crl::log_issued(
        dir,
        &crate::crl::IssuedEntry {
            serial: crate::crl::serial_of_file(&paths.cert)?,
            site: site_id.to_string(),
            not_after: validity.not_after.unix_timestamp(),
        },
    )?;
    Ok(paths)
}

/// Issues a new certificate for `site` (as [`issue_site`]) in place of its current `site-<name>.pem`,
/// and with `revoke_old` revokes the certificate it replaces. The agent presents the new one from its next
/// connection without a restart (`edge-agent/src/tls.rs`); revoking the old one makes the hub close the
/// link that still uses it, so the agent reconnects with the new one at once.
///
/// Returns the new files and the serial revoked, if any.
pub fn renew_site(
    dir: &Path,
    site: &str,
    lifetime: Duration,
    revoke_old: bool,
) -> Result<(SiteCertPaths, Option<crate::crl::Serial>), PkiError> {
    let site_id = SiteId::new(site).map_err(|source| PkiError::InvalidSiteName {
        name: site.to_owned(),
        source,
    })?;
    let current = SiteCertPaths::in_dir(dir, &site_id).cert;
    let old = if current.exists() {
        Some(crate::crl::serial_of_file(&current)?)
    } else {
        None
    };
    let paths = issue_site(dir, site, lifetime)?;
    let revoked = match old {
        Some(old) if revoke_old => {
            crate::crl::revoke_serials(dir, std::slice::from_ref(&old), OffsetDateTime::now_utc())?;
            Some(old)
        }
        _ => None,
    };
    Ok((paths, revoked))
}

fn write_hub(
    ca: &Ca,
    paths: &PkiPaths,
    hub_names: &[String],
    now: OffsetDateTime,
) -> Result<(), PkiError> {
    let defaults;
    let names = if hub_names.is_empty() {
        defaults = default_hub_names();
        &defaults[..]
    } else {
        hub_names
    };
    let issued = ca.issue_server(names, Validity::starting_at(now, HUB_CERT_LIFETIME)?)?;
    issued.write(&paths.hub_cert, &paths.hub_key)
}

fn read_to_string(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

fn open_options(mode: u32) -> fs::OpenOptions {
    let mut opts = fs::OpenOptions::new();
    opts.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    opts
}

/// Creates `path` (failing if it exists) with `mode`, writes `bytes` and syncs.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let io_err = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = open_options(mode)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                PkiError::CaExists {
                    path: path.to_owned(),
                }
            } else {
                io_err(e)
            }
        })?;
    file.write_all(bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)
}

/// Writes `bytes` to a sibling temporary file with `mode`, then renames it over `path`, so a reader never sees a
/// half-written key and an existing file's looser permissions are not inherited.
/// Writes `bytes` to `path` through a temporary file and a rename, so readers see the old or the new file.
pub(crate) fn write_replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut tmp_name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let io_err = |source| PkiError::Io {
        path: tmp.clone(),
        source,
    };
    let mut file = open_options(mode)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err)?;
    // A stale temporary file keeps its old mode despite `mode()` above: set it explicitly.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io_err)?;
    }
    file.write_all(bytes).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_san_is_under_sites_suffix() {
        let id = SiteId::new("line1").expect("valid");
        assert_eq!(id.san_dns_name(), "line1.sites.meshbridge");
        assert_eq!(id.to_string(), "line1");
        assert_eq!("line1".parse::<SiteId>(), Ok(id));
    }

    #[test]
    fn validity_windows() {
        let t = OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000);
        let day = Duration::from_secs(86_400);
        let v = Validity::starting_at(t, day).expect("valid window");
        assert_eq!(v.not_before, t - time::Duration::minutes(5));
        assert_eq!(v.not_after, t + time::Duration::days(1));
        assert!(matches!(
            Validity::new(t, t),
            Err(PkiError::InvalidValidity { .. })
        ));
        assert!(matches!(
            Validity::new(t + time::Duration::SECOND, t),
            Err(PkiError::InvalidValidity { .. })
        ));
        assert!(matches!(
            Validity::starting_at(t, Duration::from_secs(u64::MAX)),
            Err(PkiError::LifetimeTooLarge { .. })
        ));
    }

    #[test]
    fn init_writes_files_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = init(dir.path(), &[]).expect("init");
        assert_eq!(paths, PkiPaths::in_dir(dir.path()));
        for p in [
            &paths.ca_cert,
            &paths.ca_key,
            &paths.hub_cert,
            &paths.hub_key,
        ] {
            assert!(p.is_file(), "{} missing", p.display());
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [&paths.ca_key, &paths.hub_key] {
                let mode = fs::metadata(key).expect("stat").permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", key.display());
            }
        }
        let ca_before = fs::read(&paths.ca_key).expect("read");
        assert!(matches!(
            init(dir.path(), &[]),
            Err(PkiError::CaExists { .. })
        ));
        // ensure_init is idempotent and keeps the CA.
        assert_eq!(ensure_init(dir.path(), &[]).expect("ensure_init"), paths);
        assert_eq!(fs::read(&paths.ca_key).expect("read"), ca_before);
        // A missing hub certificate is re-issued from the existing CA.
        fs::remove_file(&paths.hub_cert).expect("rm");
        ensure_init(dir.path(), &[]).expect("ensure_init reissues hub");
        assert!(paths.hub_cert.is_file());
        assert_eq!(fs::read(&paths.ca_key).expect("read"), ca_before);
        // Hub files without a CA: refuse, do not mint a new CA silently.
        fs::remove_file(&paths.ca_key).expect("rm");
        assert!(matches!(
            ensure_init(dir.path(), &[]),
            Err(PkiError::CaMissing { .. })
        ));
    }

    #[test]
    fn ensure_init_on_empty_dir_creates_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("pki");
        let paths = ensure_init(&sub, &["hub.example".to_owned()]).expect("ensure_init");
        assert!(paths.ca_cert.is_file() && paths.hub_key.is_file());
    }

    #[test]
    fn issue_site_validates_name_and_writes_0600_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), &[]).expect("init");
        let day = Duration::from_secs(86_400);
        let err = issue_site(dir.path(), "bad/name", day).expect_err("bad name");
        assert!(matches!(
            err,
            PkiError::InvalidSiteName {
                source: SiteNameError::InvalidChar { ch: '/', .. },
                ..
            }
        ));
        let paths = issue_site(dir.path(), "line1", day).expect("issue");
        assert_eq!(
            paths,
            SiteCertPaths::in_dir(dir.path(), &SiteId::new("line1").expect("valid"))
        );
        // Re-issuing replaces the files.
        let first = fs::read(&paths.cert).expect("read");
        issue_site(dir.path(), "line1", day).expect("reissue");
        assert_ne!(fs::read(&paths.cert).expect("read"), first);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&paths.key).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn issue_site_without_ca_is_an_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = issue_site(dir.path(), "line1", Duration::from_secs(60)).expect_err("no CA");
        assert!(matches!(err, PkiError::Io { ref path, .. } if path.ends_with(CA_CERT_FILE)));
    }

    #[test]
    fn invalid_hub_name_is_reported() {
        let now = OffsetDateTime::now_utc();
        let ca = Ca::generate(
            "test CA",
            Validity::starting_at(now, CA_LIFETIME).expect("window"),
        )
        .expect("ca");
        let err = ca
            .issue_server(
                &["bad\u{e9}name".to_owned()],
                Validity::starting_at(now, HUB_CERT_LIFETIME).expect("w"),
            )
            .expect_err("non-ASCII DNS name");
        assert!(matches!(err, PkiError::InvalidHubName { .. }));
    }
}
