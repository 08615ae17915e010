//! Revoking site certificates (issue 11 item 6): the PKI directory's certificate revocation list, kept by
//! `cloud-hub pki revoke` / `renew-site --revoke-old` and read by the hub (`tls.crl`).
//!
//! Why a CRL, not a list of site names in the hub's config: a site that must be locked out (a stolen
//! gateway) usually gets a new certificate afterwards, and a name list would lock that one out too. A CRL
//! names certificates by serial, so revoking and re-issuing are independent, and rustls checks it in the
//! handshake itself (`WebPkiClientVerifier::with_crls`). The hub re-reads the file when it changes and
//! closes the live links of revoked certificates (`crate::revocation`).
//!
//! Which serials `revoke SITE` revokes: every certificate issued for the site that the issuance log
//! (`issued.txt`, one line per `issue-site` / `renew-site`: serial, site, expiry) lists, plus the one in
//! `site-<name>.pem`, so a site renewed several times loses all of its certificates at once.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use rustls::pki_types::CertificateRevocationListDer;
use time::OffsetDateTime;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::pki::{Ca, PkiError, PkiPaths, SiteCertPaths, SiteId};

/// File name of the revocation list inside a PKI directory.
pub const CRL_FILE: &str = "crl.pem";
/// File name of the issuance log inside a PKI directory.
pub const ISSUED_FILE: &str = "issued.txt";
/// How long a written CRL says it is current. The hub does not enforce it (a CRL only grows here, and an
/// expired one must not let revoked sites back in); other verifiers reading the file may.
const CRL_LIFETIME: time::Duration = time::Duration::days(365);

/// A serial number, big-endian without leading zero bytes (how certificates and CRLs are compared).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// From big-endian bytes (leading zeros dropped).
    #[must_use]
    pub fn from_be(bytes: &[u8]) -> Self {
        let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
        Self(bytes[start..].to_vec())
    }

    /// From hex as `pki` prints it (colons allowed, as `openssl` prints serials).
    ///
    /// # Errors
    /// [`PkiError::InvalidSerial`] when it is not hex.
    pub fn from_hex(text: &str) -> Result<Self, PkiError> {
        let digits: String = text.chars().filter(|c| *c != ':').collect();
        let invalid = || PkiError::InvalidSerial {
            text: text.to_owned(),
        };
        if digits.is_empty() || digits.len() > 40 || digits.len() % 2 != 0 {
            return Err(invalid());
        }
        let bytes = (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).map_err(|_| invalid()))
            .collect::<Result<Vec<u8>, _>>()?;
        Ok(Self::from_be(&bytes))
    }

    /// Lower-case hex.
    #[must_use]
    pub fn hex(&self) -> String {
        meshbridge_tls::server::hex(&self.0)
    }

    /// The bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Display for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.hex())
    }
}

/// What a CRL file says: its number and the revoked serials with their revocation times.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revoked {
    /// The CRL number (grows with every rewrite).
    pub number: u64,
    /// Revoked serials and when they were revoked (Unix seconds).
    pub serials: BTreeMap<Serial, i64>,
}

/// A CRL read for the hub: what rustls checks, and the serials to close live links of.
#[derive(Debug, Clone)]
pub struct LoadedCrl {
    /// The DER CRL for the verifier.
    pub der: CertificateRevocationListDer<'static>,
    /// What it revokes.
    pub revoked: Revoked,
}

/// Reads and parses the PEM CRL at `path`.
///
/// # Errors
/// [`PkiError::Io`] when it cannot be read, [`PkiError::Crl`] when it is not one PEM CRL.
pub fn load(path: &Path) -> Result<LoadedCrl, PkiError> {
    let pem = fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    let bad = |why: String| PkiError::Crl {
        path: path.to_owned(),
        why,
    };
    let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).map_err(|e| bad(e.to_string()))?;
    if parsed.label != "X509 CRL" {
        return Err(bad(format!(
            "a PEM {:?} block, not an X509 CRL",
            parsed.label
        )));
    }
    let (_, crl) =
        CertificateRevocationList::from_der(&parsed.contents).map_err(|e| bad(e.to_string()))?;
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n.clone()).ok())
        .unwrap_or(0);
    let serials = crl
        .iter_revoked_certificates()
        .map(|r| {
            (
                Serial::from_be(&r.serial().to_bytes_be()),
                r.revocation_date.timestamp(),
            )
        })
        .collect();
    Ok(LoadedCrl {
        der: CertificateRevocationListDer::from(parsed.contents.clone()),
        revoked: Revoked { number, serials },
    })
}

/// Signs and writes `revoked` as the PKI directory's CRL, atomically.
fn write(dir: &Path, ca: &Ca, revoked: &Revoked, now: OffsetDateTime) -> Result<PathBuf, PkiError> {
    let revoked_certs = revoked
        .serials
        .iter()
        .map(|(serial, at)| RevokedCertParams {
            serial_number: SerialNumber::from_slice(serial.as_bytes()),
            revocation_time: OffsetDateTime::from_unix_timestamp(*at).unwrap_or(now),
            reason_code: None,
            invalidity_date: None,
        })
        .collect();
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + CRL_LIFETIME,
        crl_number: SerialNumber::from(revoked.number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let pem = ca.sign_crl(&params)?;
    let path = dir.join(CRL_FILE);
    crate::pki::write_replace(&path, pem.as_bytes(), 0o644)?;
    Ok(path)
}

/// The CRL of `dir` as it is now; an empty one when there is no file yet.
fn current(dir: &Path) -> Result<Revoked, PkiError> {
    let path = dir.join(CRL_FILE);
    if path.exists() {
        Ok(load(&path)?.revoked)
    } else {
        Ok(Revoked::default())
    }
}

/// Writes an empty CRL into `dir` unless it has one (`pki init` does, so a hub config can name it from the
/// start).
///
/// # Errors
/// [`PkiError`] when the CA cannot be loaded or the file cannot be written.
pub fn ensure(dir: &Path, now: OffsetDateTime) -> Result<PathBuf, PkiError> {
    let path = dir.join(CRL_FILE);
    if path.exists() {
        return Ok(path);
    }
    let pki = PkiPaths::in_dir(dir);
    let ca = Ca::load(&pki.ca_cert, &pki.ca_key)?;
    write(dir, &ca, &Revoked::default(), now)
}

/// Adds `serials` to the CRL of `dir` (signed by its CA) and returns those that were not revoked yet.
///
/// # Errors
/// [`PkiError`] when the CA or the current CRL cannot be read, or the file cannot be written.
pub fn revoke_serials(
    dir: &Path,
    serials: &[Serial],
    now: OffsetDateTime,
) -> Result<Vec<Serial>, PkiError> {
    let pki = PkiPaths::in_dir(dir);
    let ca = Ca::load(&pki.ca_cert, &pki.ca_key)?;
    let mut revoked = current(dir)?;
    let added: Vec<Serial> = serials
        .iter()
        .filter(|s| !revoked.serials.contains_key(s))
        .cloned()
        .collect();
    if added.is_empty() && dir.join(CRL_FILE).exists() {
        return Ok(added);
    }
    for serial in &added {
        revoked.serials.insert(serial.clone(), now.unix_timestamp());
    }
    revoked.number += 1;
    write(dir, &ca, &revoked, now)?;
    Ok(added)
}

/// Revokes every certificate issued for `site` (the issuance log and the current `site-<name>.pem`).
/// Returns the serials it revoked now, and those it found already revoked.
///
/// # Errors
/// [`PkiError::NothingToRevoke`] when no certificate of the site is known; otherwise as
/// [`revoke_serials`].
pub fn revoke_site(
    dir: &Path,
    site: &SiteId,
    now: OffsetDateTime,
) -> Result<(Vec<Serial>, Vec<Serial>), PkiError> {
    let mut serials: Vec<Serial> = issued(dir)?
        .into_iter()
        .filter(|entry| entry.site == site.as_str())
        .map(|entry| entry.serial)
        .collect();
    let file = SiteCertPaths::in_dir(dir, site).cert;
    if file.exists() {
        serials.push(serial_of_file(&file)?);
    }
    serials.sort();
    serials.dedup();
    if serials.is_empty() {
        return Err(PkiError::NothingToRevoke {
            site: site.to_string(),
        });
    }
    let added = revoke_serials(dir, &serials, now)?;
    let already = serials.into_iter().filter(|s| !added.contains(s)).collect();
    Ok((added, already))
}

/// The serial of the leaf certificate in the PEM file `path`.
///
/// # Errors
/// [`PkiError::Io`] or [`PkiError::Crl`]-style parse errors naming the file.
pub fn serial_of_file(path: &Path) -> Result<Serial, PkiError> {
    let chain = meshbridge_tls::load_certs(path).map_err(|e| PkiError::Certificate {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    let facts = meshbridge_tls::server::leaf_facts(&chain).map_err(|e| PkiError::Certificate {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    Ok(Serial::from_be(&facts.serial))
}

/// One line of the issuance log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedEntry {
    /// The certificate's serial.
    pub serial: Serial,
    /// The site it was issued to.
    pub site: String,
    /// Its `notAfter`, Unix seconds.
    pub not_after: i64,
}

/// Appends a line for a certificate just issued to the issuance log of `dir`.
///
/// # Errors
/// [`PkiError::Io`] when the log cannot be written.
pub fn log_issued(dir: &Path, entry: &IssuedEntry) -> Result<(), PkiError> {
    let path = dir.join(ISSUED_FILE);
    let io = |source| PkiError::Io {
        path: path.clone(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io)?;
    writeln!(file, "{} {} {}", entry.serial, entry.site, entry.not_after).map_err(io)?;
    file.sync_all().map_err(io)
}

/// The issuance log of `dir` (empty when there is none); lines that do not parse are skipped.
///
/// # Errors
/// [`PkiError::Io`] when the log exists but cannot be read.
pub fn issued(dir: &Path) -> Result<Vec<IssuedEntry>, PkiError> {
    let path = dir.join(ISSUED_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(PkiError::Io { path, source }),
    };
    Ok(text
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let serial = Serial::from_hex(fields.next()?).ok()?;
            let site = fields.next()?.to_owned();
            let not_after = fields.next()?.parse().ok()?;
            Some(IssuedEntry {
                serial,
                site,
                not_after,
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn serials_parse_from_hex_with_or_without_colons() {
        let s = Serial::from_hex("00:1a:2B").expect("hex");
        assert_eq!(s.as_bytes(), &[0x1a, 0x2b]);
        assert_eq!(s.hex(), "1a2b");
        assert_eq!(Serial::from_hex("1a2b").expect("hex"), s);
        for bad in ["", "1", "zz", "1a2"] {
            assert!(Serial::from_hex(bad).is_err(), "{bad:?}");
        }
    }

    /// `init` writes an empty CRL; `revoke SITE` revokes every certificate the site was issued (the
    /// renewed one and the one before), once; another site's stays valid; the CRL is signed by the CA
    /// (rustls's verifier accepts it as one of its CRLs).
    #[test]
    fn revoking_a_site_revokes_all_of_its_certificates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path();
        crate::pki::init(dir, &[]).expect("init");
        assert_eq!(
            load(&dir.join(CRL_FILE)).expect("empty CRL").revoked,
            Revoked::default()
        );
        let year = Duration::from_secs(365 * 24 * 3600);
        let line1 = SiteId::new("line1").expect("site");
        let first = crate::pki::issue_site(dir, "line1", year).expect("issue");
        let first = serial_of_file(&first.cert).expect("serial");
        let (paths, _) = crate::pki::renew_site(dir, "line1", year, false).expect("renew");
        let second = serial_of_file(&paths.cert).expect("serial");
        let other = crate::pki::issue_site(dir, "line2", year).expect("issue");
        let other = serial_of_file(&other.cert).expect("serial");
        assert_ne!(first, second);

        let now = OffsetDateTime::now_utc();
        let (added, already) = revoke_site(dir, &line1, now).expect("revoke");
        let mut expected = vec![first.clone(), second.clone()];
        expected.sort();
        assert_eq!((added, already), (expected.clone(), Vec::new()));
        let (added, already) = revoke_site(dir, &line1, now).expect("again");
        assert_eq!((added, already), (Vec::new(), expected));
        let crl = load(&dir.join(CRL_FILE)).expect("CRL");
        assert!(crl.revoked.serials.contains_key(&first));
        assert!(crl.revoked.serials.contains_key(&second));
        assert!(!crl.revoked.serials.contains_key(&other));
        assert_eq!(
            crl.revoked.number, 1,
            "init wrote number 0; the second revoke changed nothing"
        );
        let roots = meshbridge_tls::load_roots(&dir.join(crate::pki::CA_CERT_FILE)).expect("roots");
        rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            meshbridge_tls::provider(),
        )
        .with_crls([crl.der])
        .build()
        .expect("a verifier with the CRL");
        let unknown = SiteId::new("line9").expect("site");
        assert!(matches!(
            revoke_site(dir, &unknown, now),
            Err(PkiError::NothingToRevoke { .. })
        ));
    }
}
