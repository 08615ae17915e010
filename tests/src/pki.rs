//! Certificates for a test: a fresh private CA, the hub certificate and site certificates, made with the
//! same code as `cloud-hub pki`, plus the certificates the hub must refuse.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloud_hub::pki::{self, Ca, PkiPaths, SiteCertPaths, SiteId, Validity};
use time::OffsetDateTime;

/// How long the good site certificates of a test are valid.
const SITE_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A certificate and its key on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

impl From<SiteCertPaths> for CertFiles {
    fn from(p: SiteCertPaths) -> Self {
        Self {
            cert: p.cert,
            key: p.key,
        }
    }
}

/// A PKI directory: CA, hub certificate (for `hub.meshbridge.local`, `localhost`, `127.0.0.1`) and one
/// certificate per site given to [`Pki::new`].
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
    paths: PkiPaths,
}

impl Pki {
    /// Creates the CA and hub certificate in `dir` (created if needed) and a certificate for each site.
    pub fn new(dir: &Path, sites: &[&str]) -> Self {
        let paths = pki::init(dir, &[]).expect("create the test CA and hub certificate");
        let pki = Self {
            dir: dir.to_path_buf(),
            paths,
        };
        for site in sites {
            pki.site(site);
        }
        pki
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate both sides trust.
    pub fn ca(&self) -> &Path {
        &self.paths.ca_cert
    }

    /// The hub's certificate and key.
    pub fn hub(&self) -> CertFiles {
        CertFiles {
            cert: self.paths.hub_cert.clone(),
            key: self.paths.hub_key.clone(),
        }
    }

    /// A valid certificate for `site` (issued now, replacing an earlier one).
    pub fn site(&self, site: &str) -> CertFiles {
        pki::issue_site(&self.dir, site, SITE_LIFETIME)
            .expect("issue a site certificate")
            .into()
    }

    /// A certificate for `site` signed by this CA that expired an hour ago.
    pub fn expired_site(&self, site: &str) -> CertFiles {
        let now = OffsetDateTime::now_utc();
        let validity = Validity::new(
            now - time::Duration::days(2),
            now - time::Duration::hours(1),
        )
        .expect("a valid window");
        self.write_site(&self.load_ca(), site, validity, "expired")
    }

    /// A certificate for `site` signed by this CA that becomes valid only tomorrow.
    pub fn not_yet_valid_site(&self, site: &str) -> CertFiles {
        let now = OffsetDateTime::now_utc();
        let validity = Validity::new(now + time::Duration::days(1), now + time::Duration::days(2))
            .expect("a valid window");
        self.write_site(&self.load_ca(), site, validity, "future")
    }

    /// A server certificate from this CA for `names` (DNS names or IPs), written as `server-<tag>.pem`/`.key`:
    /// for the brokers' TLS ports.
    pub fn server(&self, names: &[&str], tag: &str) -> CertFiles {
        let now = OffsetDateTime::now_utc();
        let validity = Validity::starting_at(now, SITE_LIFETIME).expect("a valid window");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let issued = self
            .load_ca()
            .issue_server(&names, validity)
            .expect("issue a server certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("server-{tag}.pem")),
            key: self.dir.join(format!("server-{tag}.key")),
        };
        issued
            .write(&files.cert, &files.key)
            .expect("write the certificate");
        files
    }

    /// A currently valid certificate for `site` signed by an unrelated CA the hub does not trust.
    pub fn foreign_site(&self, site: &str) -> CertFiles {
        let now = OffsetDateTime::now_utc();
        let validity = Validity::starting_at(now, SITE_LIFETIME).expect("a valid window");
        let other = Ca::generate("some other CA", validity).expect("generate another CA");
        self.write_site(&other, site, validity, "foreign")
    }

    /// A self-signed certificate naming `site` (its own issuer, trusted by nobody).
    pub fn self_signed_site(&self, site: &str) -> CertFiles {
        let now = OffsetDateTime::now_utc();
        let validity = Validity::starting_at(now, SITE_LIFETIME).expect("a valid window");
        let own = Ca::generate(site, validity).expect("generate a self-signed certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("self-signed-{site}.pem")),
            key: self.dir.join(format!("self-signed-{site}.key")),
        };
        own.write_new(&files.cert, &files.key)
            .expect("write the certificate");
        files
    }

    /// A certificate for `site` signed by this CA, valid now, but for TLS *servers* only (extended key
    /// usage serverAuth, no clientAuth): not a client identity.
    pub fn server_only_site(&self, site: &str) -> CertFiles {
        let now = OffsetDateTime::now_utc();
        let validity = Validity::starting_at(now, SITE_LIFETIME).expect("a valid window");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, site);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let issued = self
            .load_ca()
            .issue_custom(params, validity)
            .expect("issue a server-only certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("server-only-{site}.pem")),
            key: self.dir.join(format!("server-only-{site}.key")),
        };
        issued
            .write(&files.cert, &files.key)
            .expect("write the certificate");
        files
    }

    fn load_ca(&self) -> Ca {
        Ca::load(&self.paths.ca_cert, &self.paths.ca_key).expect("load the test CA")
    }

    fn write_site(&self, ca: &Ca, site: &str, validity: Validity, tag: &str) -> CertFiles {
        let id = SiteId::new(site).expect("a valid site name");
        let issued = ca
            .issue_site(&id, validity)
            .expect("issue a site certificate");
        let files = CertFiles {
            cert: self.dir.join(format!("{tag}-{site}.pem")),
            key: self.dir.join(format!("{tag}-{site}.key")),
        };
        issued
            .write(&files.cert, &files.key)
            .expect("write the certificate");
        files
    }
}
