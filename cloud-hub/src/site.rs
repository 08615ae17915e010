//! `cloud-hub site add NAME`: a new factory line in one command at the hub.
//!
//! It issues the site's certificate from the hub's CA, adds the site to the hub's config file and writes a
//! bundle ([`shared::bundle`]) with the agent's config, certificate, key and the CA, which the gateway installs
//! with `edge-agent bootstrap BUNDLE`. A running hub picks the new site up from its config file within a
//! second (`crate::reload`), so nothing needs a restart.
//!
//! Order of work, so a failure leaves nothing half done that matters:
//! 1. everything that can be refused is checked first: the name, a site of that name already in the config,
//!    the config with the site added (written beside the original and loaded with every rule), an uplink route
//!    that captures something at the new site (an agent with nothing to forward is refused by its own
//!    config rules), the hub address and server name the agent will use;
//! 2. the certificate is issued (a rerun after a later failure issues another; the first is simply unused);
//! 3. the bundle is written (mode 0600: it holds the site's private key);
//! 4. only then the new config replaces the old by a rename, keeping the original's mode and owner.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use shared::bundle::{AgentTemplate, Bundle, DEFAULT_AGENT_DATA_DIR};
use shared::config::{ConfigError, EffectiveConfig, HostPort};

use crate::pki::{self, PkiError, SiteId, SiteNameError};

/// What `site add` is asked to do.
#[derive(Debug, Clone)]
pub struct SiteAdd<'a> {
    /// The hub's config file (it is edited in place).
    pub config: &'a Path,
    /// The new site's name.
    pub site: &'a str,
    /// The hub as the gateway reaches it (`host:port`); default: `listen.quic` unless it is a wildcard.
    pub hub_address: Option<&'a str>,
    /// The name the agent checks in the hub's certificate; default: the certificate's first alternative name.
    pub server_name: Option<&'a str>,
    /// The site's namespace pattern; default: the one every existing site shares.
    pub namespace: Option<&'a str>,
    /// Validity of the site's certificate.
    pub lifetime: Duration,
    /// Where to write the bundle.
    pub out: &'a Path,
    /// Replace an existing file at `out`.
    pub overwrite: bool,
}

/// What `site add` did.
#[derive(Debug, Clone)]
pub struct SiteAdded {
    /// The bundle written.
    pub bundle: PathBuf,
    /// The site's certificate, as kept in the PKI directory.
    pub cert: PathBuf,
    /// The hub address in the agent's config.
    pub hub: String,
    /// The server name in the agent's config.
    pub server_name: String,
    /// The namespace the site publishes under.
    pub namespace: String,
    /// The filters the agent forwards before the hub's first push.
    pub filters: Vec<String>,
}

/// Why `site add` refused or failed; nothing in the config has changed when it returns one.
#[derive(Debug, thiserror::Error)]
pub enum SiteAddError {
    /// Not a valid site name.
    #[error("invalid site name {name:?}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Which rule it breaks.
        #[source]
        source: SiteNameError,
    },
    /// The hub config does not load as it is.
    #[error("the hub config {path} does not load")]
    Config {
        /// The config file.
        path: PathBuf,
        /// Every problem found.
        #[source]
        source: ConfigError,
    },
    /// The config with the site added does not load (for example `sites` written as an inline array).
    #[error("the hub config with site {site:?} added does not load; add it by hand")]
    Edited {
        /// The site.
        site: String,
        /// Every problem found.
        #[source]
        source: ConfigError,
    },
    /// The site is already in the config.
    #[error("site {site:?} is already in {path}; `cloud-hub pki renew-site {site}` issues it a new certificate")]
    Exists {
        /// The site.
        site: String,
        /// The config file.
        path: PathBuf,
    },
    /// The existing sites do not agree on a namespace to copy, or there are none.
    #[error("{}; give --namespace (e.g. \"acme/plant1/{{site}}\")", if found.is_empty() { "there is no site yet to copy a namespace from".to_owned() } else { format!("the existing sites use different namespaces ({found})") })]
    NamespaceNeeded {
        /// The namespaces found (empty without sites).
        found: String,
    },
    /// No uplink or site-to-site route captures anything at the new site.
    #[error("no route forwards anything from site {site:?} (an agent needs at least one filter); add an uplink route with from = \"*\" or from = \"{site}\" first")]
    NothingToForward {
        /// The site.
        site: String,
    },
    /// The hub listens on a wildcard address the gateway cannot use.
    #[error("the hub listens on {listen}; give --hub-address HOST:PORT as the gateway reaches it")]
    HubAddressNeeded {
        /// `listen.quic`.
        listen: std::net::SocketAddr,
    },
    /// `--hub-address` is not `host:port`.
    #[error("--hub-address {given:?} is not HOST:PORT")]
    BadHubAddress {
        /// What was given.
        given: String,
    },
    /// The hub certificate names nothing the agent could check.
    #[error(
        "cannot take a server name from the hub certificate {path} ({why}); give --server-name"
    )]
    ServerNameNeeded {
        /// `tls.cert`.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Issuing the certificate failed.
    #[error("cannot issue the certificate of site {site:?}")]
    Pki {
        /// The site.
        site: String,
        /// The PKI error.
        #[source]
        source: PkiError,
    },
    /// The bundle file exists.
    #[error("{path} exists; remove it or give --force")]
    BundleExists {
        /// The bundle path.
        path: PathBuf,
    },
    /// Reading or writing a file failed.
    #[error("I/O error on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SiteAddError + '_ {
    move |source| SiteAddError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Adds a site: see the module documentation.
///
/// # Errors
/// [`SiteAddError`]; the hub config is unchanged whenever one is returned.
pub fn add(request: &SiteAdd<'_>) -> Result<SiteAdded, SiteAddError> {
    let site = SiteId::new(request.site).map_err(|source| SiteAddError::InvalidName {
        name: request.site.to_owned(),
        source,
    })?;
    let config_path = request.config;
    let current = shared::config::load_hub(config_path).map_err(|source| SiteAddError::Config {
        path: config_path.to_owned(),
        source,
    })?;
    if current.sites.iter().any(|s| s.name == site.as_str()) {
        return Err(SiteAddError::Exists {
            site: site.to_string(),
            path: config_path.to_owned(),
        });
    }
    let namespace = match request.namespace {
        Some(ns) => ns.to_owned(),
        None => {
            let mut namespaces: Vec<&str> =
                current.sites.iter().map(|s| s.namespace.as_str()).collect();
            namespaces.sort_unstable();
            namespaces.dedup();
            match namespaces.as_slice() {
                [one] => (*one).to_owned(),
                [] => {
                    return Err(SiteAddError::NamespaceNeeded {
                        found: String::new(),
                    })
                }
                many => {
                    return Err(SiteAddError::NamespaceNeeded {
                        found: many.join(", "),
                    })
                }
            }
        }
    };
    let hub = match request.hub_address {
        Some(given) => HostPort::try_from(given.to_owned())
            .map_err(|_| SiteAddError::BadHubAddress {
                given: given.to_owned(),
            })?
            .to_string(),
        None if current.listen.quic.ip().is_unspecified() => {
            return Err(SiteAddError::HubAddressNeeded {
                listen: current.listen.quic,
            })
        }
        None => current.listen.quic.to_string(),
    };
    let server_name = match request.server_name {
        Some(name) => name.to_owned(),
        None => first_server_name(&current.tls.cert)?,
    };

    // The edited config, beside the original so its relative paths mean the same, checked in full.
    let text = fs::read_to_string(config_path).map_err(io(config_path))?;
    let edited = shared::bundle::hub_config_with_site(&text, site.as_str(), &namespace);
    let file_name = config_path
        .file_name()
        .map_or_else(|| "hub.toml".into(), |n| n.to_string_lossy().into_owned());
    let candidate = config_path.with_file_name(format!(".{file_name}.site-add"));
    let candidate_guard = RemoveOnDrop(candidate.clone());
    write_new(&candidate, edited.as_bytes(), 0o600, true)?;
    let updated = shared::config::load_hub(&candidate).map_err(|source| SiteAddError::Edited {
        site: site.to_string(),
        source,
    })?;
    let captures = EffectiveConfig::for_all_sites(&updated)
        .ok()
        .and_then(|all| all.into_iter().find(|c| c.site == site.as_str()))
        .map(|c| c.capture)
        .unwrap_or_default();
    if captures.is_empty() {
        return Err(SiteAddError::NothingToForward {
            site: site.to_string(),
        });
    }

    let pki_dir = current
        .tls
        .ca
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let pki_error = |source| SiteAddError::Pki {
        site: site.to_string(),
        source,
    };
    let paths = pki::issue_site(&pki_dir, site.as_str(), request.lifetime).map_err(pki_error)?;
    let read = |path: &Path| fs::read_to_string(path).map_err(io(path));
    let bundle = Bundle {
        agent_toml: AgentTemplate {
            site: site.as_str(),
            hub: &hub,
            server_name: &server_name,
            captures: &captures,
            data_dir: DEFAULT_AGENT_DATA_DIR,
        }
        .render(),
        ca_pem: read(&current.tls.ca)?,
        site_pem: read(&paths.cert)?,
        site_key: read(&paths.key)?,
    };
    write_new(request.out, &bundle.encode(), 0o600, request.overwrite)?;

    // Keep the original's mode and owner: the hub's service user must still be able to read it.
    let meta = fs::metadata(config_path).map_err(io(config_path))?;
    fs::set_permissions(&candidate, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(io(&candidate))?;
    match std::os::unix::fs::chown(&candidate, Some(meta.uid()), Some(meta.gid())) {
        // Not root: the file stays ours, which is who could write the directory anyway.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        other => other.map_err(io(&candidate))?,
    }
    fs::rename(&candidate, config_path).map_err(io(config_path))?;
    std::mem::forget(candidate_guard);
    Ok(SiteAdded {
        bundle: request.out.to_owned(),
        cert: paths.cert,
        hub,
        server_name,
        namespace,
        filters: captures.into_iter().map(|c| c.filter).collect(),
    })
}

fn first_server_name(cert: &Path) -> Result<String, SiteAddError> {
    let needed = |why: String| SiteAddError::ServerNameNeeded {
        path: cert.to_owned(),
        why,
    };
    let chain = meshbridge_tls::load_certs(cert).map_err(|e| needed(e.to_string()))?;
    let names = meshbridge_tls::server::leaf_subject_alt_names(&chain)
        .map_err(|e| needed(e.to_string()))?;
    names
        .into_iter()
        .next()
        .ok_or_else(|| needed("it has no DNS name or IP address".to_owned()))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32, overwrite: bool) -> Result<(), SiteAddError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).mode(mode);
    if overwrite {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            SiteAddError::BundleExists {
                path: path.to_owned(),
            }
        } else {
            SiteAddError::Io {
                path: path.to_owned(),
                source: e,
            }
        }
    })?;
    // An existing file keeps its mode through `open`; a bundle holds a private key.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(path))?;
    file.write_all(bytes).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// Removes the edited copy when `add` returns early.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HUB: &str = r#"# my hub
data_dir = "state"

[listen]
quic = "127.0.0.1:4433"

[tls]
ca = "pki/ca.pem"
cert = "pki/hub.pem"
key = "pki/hub.key"

[broker]
kind = "embedded"
listen = "127.0.0.1:1883"
allow_anonymous = true

[[sites]]
name = "line1"
namespace = "acme/plant1/{site}"

[[routes]]
name = "telemetry"
kind = "uplink"
from = "*"
filter = "telemetry/#"
"#;

    fn hub_dir(config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init(&dir.path().join("pki"), &pki::default_hub_names()).expect("pki");
        fs::write(dir.path().join("hub.toml"), config).expect("config");
        dir
    }

    fn request<'a>(dir: &'a Path, out: &'a Path) -> SiteAdd<'a> {
        SiteAdd {
            config: dir,
            site: "line3",
            hub_address: None,
            server_name: None,
            namespace: None,
            lifetime: Duration::from_secs(86_400),
            out,
            overwrite: false,
        }
    }

    #[test]
    fn a_site_is_added_with_its_bundle_and_the_config_keeps_its_comments() {
        let dir = hub_dir(HUB);
        let config = dir.path().join("hub.toml");
        let out = dir.path().join("line3.tar");
        let added = add(&request(&config, &out)).expect("added");
        assert_eq!(added.hub, "127.0.0.1:4433");
        assert_eq!(added.server_name, "hub.meshbridge.local");
        assert_eq!(added.namespace, "acme/plant1/{site}");
        assert_eq!(added.filters, ["telemetry/#"]);
        let text = fs::read_to_string(&config).expect("read");
        assert!(text.starts_with(HUB), "the original text is kept as it was");
        let cfg = shared::config::load_hub(&config).expect("loads");
        assert_eq!(
            cfg.sites
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>(),
            ["line1", "line3"]
        );
        let bundle = Bundle::decode(&fs::read(&out).expect("bundle")).expect("decodes");
        assert_eq!(
            bundle.ca_pem,
            fs::read_to_string(dir.path().join("pki/ca.pem")).expect("ca")
        );
        assert_eq!(
            bundle.site_pem,
            fs::read_to_string(&added.cert).expect("cert")
        );
        assert!(bundle.agent_toml.contains("hub = \"127.0.0.1:4433\""));
        assert_eq!(fs::metadata(&out).expect("meta").mode() & 0o777, 0o600);
        // No edited copy is left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().contains("site-add"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");

        // Twice is refused, and so is a second bundle over the first.
        assert!(matches!(
            add(&request(&config, &out)),
            Err(SiteAddError::Exists { .. })
        ));
        let mut other = request(&config, &out);
        other.site = "line4";
        assert!(matches!(
            add(&other),
            Err(SiteAddError::BundleExists { .. })
        ));
        assert!(!fs::read_to_string(&config).expect("read").contains("line4"));
    }

    #[test]
    fn refusals_leave_the_config_as_it_was() {
        // A wildcard listen address needs --hub-address.
        let dir = hub_dir(&HUB.replace("127.0.0.1:4433", "0.0.0.0:4433"));
        let config = dir.path().join("hub.toml");
        let out = dir.path().join("b.tar");
        let before = fs::read_to_string(&config).expect("read");
        assert!(matches!(
            add(&request(&config, &out)),
            Err(SiteAddError::HubAddressNeeded { .. })
        ));
        let mut bad = request(&config, &out);
        bad.hub_address = Some("no-port");
        assert!(matches!(add(&bad), Err(SiteAddError::BadHubAddress { .. })));
        let mut bad = request(&config, &out);
        bad.site = "bad/name";
        assert!(matches!(add(&bad), Err(SiteAddError::InvalidName { .. })));
        // A namespace the validator refuses is reported as the edited config's problem.
        let mut bad = request(&config, &out);
        bad.hub_address = Some("hub.example:4433");
        bad.namespace = Some("acme/#");
        assert!(matches!(add(&bad), Err(SiteAddError::Edited { .. })));
        assert_eq!(fs::read_to_string(&config).expect("read"), before);
        assert!(!out.exists());

        // A route set that forwards nothing from the new site.
        let dir = hub_dir(&HUB.replace("from = \"*\"", "from = \"line1\""));
        let config = dir.path().join("hub.toml");
        let before = fs::read_to_string(&config).expect("read");
        assert!(matches!(
            add(&request(&config, &out)),
            Err(SiteAddError::NothingToForward { .. })
        ));
        assert_eq!(fs::read_to_string(&config).expect("read"), before);

        // Sites that disagree on a namespace.
        let two = format!("{HUB}\n[[sites]]\nname = \"line2\"\nnamespace = \"other/{{site}}\"\n");
        let dir = hub_dir(&two);
        let config = dir.path().join("hub.toml");
        match add(&request(&config, &out)) {
            Err(SiteAddError::NamespaceNeeded { found }) => {
                assert_eq!(found, "acme/plant1/{site}, other/{site}");
            }
            other => panic!("{other:?}"),
        }
    }
}
