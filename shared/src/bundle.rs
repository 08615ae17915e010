//! A site bundle: everything a new line's gateway needs to join the mesh, in one file.
//!
//! `cloud-hub site add NAME` writes it; `edge-agent bootstrap BUNDLE` installs it. It is a plain (uncompressed)
//! tar archive whose entries are laid out as the Debian package expects under `/etc/meshbridge`, so an operator
//! without the `bootstrap` command can also run `tar -C /etc/meshbridge -xf line3.bundle.tar`:
//!
//! ```text
//! agent.toml        the agent's config; TLS paths relative to it, so it works wherever it is extracted
//! agent/ca.pem      the CA the hub's certificate chains to (and that signed the site's)
//! agent/site.pem    the site's client certificate (CN = site name: its identity at the hub)
//! agent/site.key    its private key (mode 0600 in the archive)
//! ```
//!
//! Why a fixed set of names: the archive crosses from the hub's operator to a gateway, often by hand. The
//! decoder accepts exactly these regular files, so a bundle cannot write anywhere else (no `../`, links or
//! devices), and refuses anything larger than [`MAX_BUNDLE_BYTES`]. A later format would add a manifest entry,
//! which this decoder refuses by name rather than ignores.
//!
//! Encoding and decoding work on byte buffers only; reading and writing the file is the programs' business.

use std::io::{Cursor, Read};

use crate::config::{Capture, RetainHandling, Route};

/// Entry name of the agent's config.
pub const AGENT_TOML: &str = "agent.toml";
/// Entry name of the CA certificate.
pub const CA_PEM: &str = "agent/ca.pem";
/// Entry name of the site's certificate.
pub const SITE_PEM: &str = "agent/site.pem";
/// Entry name of the site's private key.
pub const SITE_KEY: &str = "agent/site.key";
/// The directory the TLS files sit in, relative to `agent.toml`.
pub const TLS_DIR: &str = "agent";

/// Largest bundle accepted: four small text files fit many times over; anything bigger is not a bundle.
pub const MAX_BUNDLE_BYTES: usize = 1024 * 1024;

/// Where the Debian package keeps the agent's state; the default `data_dir` of a bundle's config.
pub const DEFAULT_AGENT_DATA_DIR: &str = "/var/lib/meshbridge/agent";

/// The four files of a bundle, as text.
#[derive(Clone, PartialEq, Eq)]
pub struct Bundle {
    /// `agent.toml`.
    pub agent_toml: String,
    /// `agent/ca.pem`.
    pub ca_pem: String,
    /// `agent/site.pem`.
    pub site_pem: String,
    /// `agent/site.key` (secret: never printed by `Debug`).
    pub site_key: String,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("agent_toml", &self.agent_toml)
            .field("ca_pem", &self.ca_pem)
            .field("site_pem", &self.site_pem)
            .field("site_key", &"<redacted>")
            .finish()
    }
}

/// Why bytes are not a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Larger than [`MAX_BUNDLE_BYTES`].
    #[error("{size} bytes is larger than any bundle (at most {MAX_BUNDLE_BYTES})")]
    TooLarge {
        /// Its size.
        size: usize,
    },
    /// Not a readable tar archive.
    #[error("not a tar archive: {0}")]
    Archive(#[from] std::io::Error),
    /// An entry other than the four a bundle holds (or not a regular file).
    #[error("unexpected entry {name:?} (a bundle holds exactly {AGENT_TOML}, {CA_PEM}, {SITE_PEM} and {SITE_KEY}; made by a newer cloud-hub?)")]
    UnexpectedEntry {
        /// The entry's name as stored.
        name: String,
    },
    /// The same entry twice.
    #[error("entry {name} appears twice")]
    Duplicate {
        /// The entry's name.
        name: &'static str,
    },
    /// One of the four entries is missing.
    #[error("entry {name} is missing")]
    Missing {
        /// The entry's name.
        name: &'static str,
    },
    /// An entry is not UTF-8 text.
    #[error("entry {name} is not text")]
    NotText {
        /// The entry's name.
        name: &'static str,
    },
}

impl Bundle {
    /// The tar archive. Entries have fixed modes (the key 0600, the rest 0644), owner 0 and time 0, so the
    /// same files always give the same bytes.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        builder.mode(tar::HeaderMode::Deterministic);
        let add_dir = |builder: &mut tar::Builder<Vec<u8>>, name: &str| {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o750);
            header.set_size(0);
            header.set_mtime(0);
            builder
                .append_data(&mut header, name, std::io::empty())
                .expect("invariant: writing into a Vec cannot fail");
        };
        let add_file = |builder: &mut tar::Builder<Vec<u8>>, name: &str, text: &str, mode: u32| {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(mode);
            header.set_size(text.len() as u64);
            header.set_mtime(0);
            builder
                .append_data(&mut header, name, text.as_bytes())
                .expect("invariant: writing into a Vec cannot fail");
        };
        add_file(&mut builder, AGENT_TOML, &self.agent_toml, 0o644);
        add_dir(&mut builder, &format!("{TLS_DIR}/"));
        add_file(&mut builder, CA_PEM, &self.ca_pem, 0o644);
        add_file(&mut builder, SITE_PEM, &self.site_pem, 0o644);
        add_file(&mut builder, SITE_KEY, &self.site_key, 0o600);
        builder
            .into_inner()
            .expect("invariant: writing into a Vec cannot fail")
    }

    /// Reads a bundle archive.
    ///
    /// # Errors
    /// [`BundleError`]: too large, not tar, an unexpected, repeated, missing or non-text entry.
    pub fn decode(bytes: &[u8]) -> Result<Self, BundleError> {
        if bytes.len() > MAX_BUNDLE_BYTES {
            return Err(BundleError::TooLarge { size: bytes.len() });
        }
        const NAMES: [&str; 4] = [AGENT_TOML, CA_PEM, SITE_PEM, SITE_KEY];
        let mut found: [Option<String>; 4] = Default::default();
        let mut archive = tar::Archive::new(Cursor::new(bytes));
        for entry in archive.entries()? {
            let mut entry = entry?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let name = raw.strip_prefix("./").unwrap_or(&raw);
            let kind = entry.header().entry_type();
            if kind == tar::EntryType::Directory && name.trim_end_matches('/') == TLS_DIR {
                continue;
            }
            let slot = NAMES
                .iter()
                .position(|n| *n == name)
                .filter(|_| kind == tar::EntryType::Regular)
                .ok_or_else(|| BundleError::UnexpectedEntry { name: raw.clone() })?;
            if found[slot].is_some() {
                return Err(BundleError::Duplicate { name: NAMES[slot] });
            }
            let mut data = Vec::new();
            entry.read_to_end(&mut data)?;
            let text =
                String::from_utf8(data).map_err(|_| BundleError::NotText { name: NAMES[slot] })?;
            found[slot] = Some(text);
        }
        let [agent_toml, ca_pem, site_pem, site_key] = found;
        let take = |v: Option<String>, name| v.ok_or(BundleError::Missing { name });
        Ok(Self {
            agent_toml: take(agent_toml, AGENT_TOML)?,
            ca_pem: take(ca_pem, CA_PEM)?,
            site_pem: take(site_pem, SITE_PEM)?,
            site_key: take(site_key, SITE_KEY)?,
        })
    }
}

/// What the agent config of a new site is made from.
#[derive(Debug, Clone)]
pub struct AgentTemplate<'a> {
    /// The site's name (its certificate's CN).
    pub site: &'a str,
    /// The hub as the gateway reaches it, `host:port` (UDP).
    pub hub: &'a str,
    /// A name in the hub's certificate.
    pub server_name: &'a str,
    /// The site's captures as the hub computes them (`EffectiveConfig::for_site`): the bootstrap routes the
    /// agent forwards before the hub's first push, so a gateway that starts while the hub is unreachable
    /// already queues what the hub will ask for.
    pub captures: &'a [Capture],
    /// `data_dir`, absolute ([`DEFAULT_AGENT_DATA_DIR`] for the package).
    pub data_dir: &'a str,
}

impl AgentTemplate<'_> {
    /// The config text: commented, with TLS paths relative to the file ([`TLS_DIR`]).
    #[must_use]
    pub fn render(&self) -> String {
        let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
        let mut out = format!(
            "# edge-agent for site {site}, made by `cloud-hub site add {site}`; installed by `edge-agent bootstrap`.\n\
             # Paths are relative to this file. The hub pushes this site's routes when the agent connects and\n\
             # the agent keeps the last push in data_dir; the [[routes]] below only bridge the time before that.\n\
             site = {site_q}\n\
             data_dir = {data_dir}\n\
             log = \"info\"\n\
             \n\
             # The line's MQTT broker, embedded. Only on loopback until you open it: set listen to the line's\n\
             # LAN address (and consider [[broker.listeners]] with TLS and a password_file; README, \"Security\").\n\
             [broker]\n\
             kind = \"embedded\"\n\
             listen = \"127.0.0.1:1883\"\n\
             \n\
             # Prometheus metrics (and `edge-agent health`).\n\
             [metrics]\n\
             listen = \"127.0.0.1:9601\"\n\
             \n\
             [uplink]\n\
             hub = {hub}\n\
             server_name = {server_name}\n\
             ca = {ca}\n\
             cert = {cert}\n\
             key = {key}\n",
            site = self.site,
            site_q = q(self.site),
            data_dir = q(self.data_dir),
            hub = q(self.hub),
            server_name = q(self.server_name),
            ca = q(CA_PEM),
            cert = q(SITE_PEM),
            key = q(SITE_KEY),
        );
        for capture in self.captures {
            let route = Route {
                filter: capture.filter.clone(),
                qos: capture.qos,
                retain: capture.retain == RetainHandling::Keep,
            };
            out.push_str("\n[[routes]]\n");
            out.push_str(&format!("filter = {}\n", q(&route.filter)));
            if let Some(qos) = route.qos {
                out.push_str(&format!("qos = {qos}\n"));
            }
            if !route.retain {
                out.push_str("retain = false\n");
            }
        }
        out
    }
}

/// Replaces the top-level `data_dir = ...` line of a config [`AgentTemplate::render`] made (bootstrap's
/// `--state-dir`). `None` when the text has no such line (not a bundle's config).
#[must_use]
pub fn with_data_dir(agent_toml: &str, data_dir: &str) -> Option<String> {
    let mut replaced = false;
    let mut out = String::with_capacity(agent_toml.len() + data_dir.len());
    for line in agent_toml.split_inclusive('\n') {
        if !replaced && line.starts_with("data_dir = ") {
            out.push_str("data_dir = ");
            out.push_str(&toml::Value::String(data_dir.to_owned()).to_string());
            out.push('\n');
            replaced = true;
        } else if line.starts_with('[') && !replaced {
            // Past the top-level keys: a data_dir further down belongs to a table.
            return None;
        } else {
            out.push_str(line);
        }
    }
    replaced.then_some(out)
}

/// A hub config's text with a `[[sites]]` entry appended (`cloud-hub site add`). Appending keeps every
/// comment and the layout of what is there; TOML lets an array of tables continue after other tables. The
/// caller loads the result with every rule before using it (an inline `sites = [...]` makes it invalid).
#[must_use]
pub fn hub_config_with_site(text: &str, site: &str, namespace: &str) -> String {
    let q = |s: &str| toml::Value::String(s.to_owned()).to_string();
    let mut out = text.to_owned();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!(
        "\n# Added by `cloud-hub site add {site}`.\n[[sites]]\nname = {}\nnamespace = {}\n",
        q(site),
        q(namespace)
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Bundle {
        Bundle {
            agent_toml: "site = \"line3\"\n".to_owned(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n".to_owned(),
            site_pem: "-----BEGIN CERTIFICATE-----\nSITE\n-----END CERTIFICATE-----\n".to_owned(),
            site_key: "-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n".to_owned(),
        }
    }

    #[test]
    fn a_bundle_round_trips_and_its_bytes_are_deterministic() {
        let bundle = sample();
        let bytes = bundle.encode();
        assert_eq!(bytes, bundle.encode());
        assert_eq!(Bundle::decode(&bytes).expect("decodes"), bundle);
    }

    #[test]
    fn the_key_is_private_in_the_archive_and_hidden_from_debug() {
        let bytes = sample().encode();
        let mut archive = tar::Archive::new(Cursor::new(&bytes[..]));
        let modes: Vec<(String, u32)> = archive
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                (
                    e.path().expect("path").display().to_string(),
                    e.header().mode().expect("mode"),
                )
            })
            .collect();
        assert!(modes.contains(&(SITE_KEY.to_owned(), 0o600)), "{modes:?}");
        assert!(modes.contains(&(AGENT_TOML.to_owned(), 0o644)), "{modes:?}");
        assert!(!format!("{:?}", sample()).contains("KEY"));
    }

    fn archive_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            if *kind == tar::EntryType::Symlink {
                header.set_size(0);
                builder
                    .append_link(&mut header, name, "/etc/shadow")
                    .expect("link");
            } else {
                // `append_data` refuses `..` in names, so set the raw name for the hostile cases.
                let bytes = name.as_bytes();
                header.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
                header.set_cksum();
                builder.append(&header, *data).expect("append");
            }
        }
        builder.into_inner().expect("finish")
    }

    #[test]
    fn entries_outside_the_four_are_refused_by_name() {
        let ok = sample();
        let files: [(&str, &[u8]); 4] = [
            (AGENT_TOML, ok.agent_toml.as_bytes()),
            (CA_PEM, ok.ca_pem.as_bytes()),
            (SITE_PEM, ok.site_pem.as_bytes()),
            (SITE_KEY, ok.site_key.as_bytes()),
        ];
        let regular = |extra: Option<(&'static str, tar::EntryType)>| {
            let mut entries: Vec<(&str, tar::EntryType, &[u8])> = files
                .iter()
                .map(|(n, d)| (*n, tar::EntryType::Regular, *d))
                .collect();
            if let Some((name, kind)) = extra {
                entries.push((name, kind, b"x"));
            }
            archive_of(&entries)
        };
        Bundle::decode(&regular(None)).expect("the four files alone are a bundle");
        for (name, kind) in [
            ("../etc/cron.d/evil", tar::EntryType::Regular),
            ("/etc/passwd", tar::EntryType::Regular),
            ("agent/../../x", tar::EntryType::Regular),
            ("bundle.toml", tar::EntryType::Regular),
            ("agent/link", tar::EntryType::Symlink),
        ] {
            match Bundle::decode(&regular(Some((name, kind)))) {
                Err(BundleError::UnexpectedEntry { name: got }) => assert_eq!(got, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        // The right name as a link, not a file.
        let mut entries: Vec<(&str, tar::EntryType, &[u8])> = files[..3]
            .iter()
            .map(|(n, d)| (*n, tar::EntryType::Regular, *d))
            .collect();
        entries.push((SITE_KEY, tar::EntryType::Symlink, b""));
        assert!(matches!(
            Bundle::decode(&archive_of(&entries)),
            Err(BundleError::UnexpectedEntry { .. })
        ));
        let missing = archive_of(
            &files[..3]
                .iter()
                .map(|(n, d)| (*n, tar::EntryType::Regular, *d))
                .collect::<Vec<_>>(),
        );
        assert!(matches!(
            Bundle::decode(&missing),
            Err(BundleError::Missing { name: SITE_KEY })
        ));
        let twice = archive_of(&[
            (AGENT_TOML, tar::EntryType::Regular, b"a"),
            (AGENT_TOML, tar::EntryType::Regular, b"b"),
        ]);
        assert!(matches!(
            Bundle::decode(&twice),
            Err(BundleError::Duplicate { name: AGENT_TOML })
        ));
        assert!(matches!(
            Bundle::decode(&vec![0u8; MAX_BUNDLE_BYTES + 1]),
            Err(BundleError::TooLarge { .. })
        ));
    }

    #[test]
    fn data_dir_is_replaced_only_at_the_top_level() {
        let captures = [Capture {
            filter: "telemetry/#".to_owned(),
            qos: Some(1),
            retain: RetainHandling::Clear,
            priority: 0,
            ttl: None,
            routes: vec!["telemetry".to_owned()],
        }];
        let text = AgentTemplate {
            site: "line3",
            hub: "hub.example:4433",
            server_name: "hub.example",
            captures: &captures,
            data_dir: DEFAULT_AGENT_DATA_DIR,
        }
        .render();
        assert!(text.contains("filter = \"telemetry/#\"\nqos = 1\nretain = false\n"));
        let moved = with_data_dir(&text, "/srv/x \"y\"").expect("has data_dir");
        let table: toml::Table = toml::from_str(&moved).expect("still TOML");
        assert_eq!(table["data_dir"].as_str(), Some("/srv/x \"y\""), "{moved}");
        assert_eq!(
            moved.matches("data_dir").count(),
            2,
            "the comment and the key"
        );
        assert_eq!(with_data_dir("[x]\ndata_dir = \"a\"\n", "/b"), None);
    }

    proptest! {
        #[test]
        fn any_text_round_trips(
            agent in "\\PC{0,300}",
            ca in "[ -~\n]{0,300}",
            cert in "[ -~\n]{0,300}",
            key in "[ -~\n]{0,300}",
        ) {
            let bundle = Bundle { agent_toml: agent, ca_pem: ca, site_pem: cert, site_key: key };
            prop_assert_eq!(Bundle::decode(&bundle.encode()).expect("decodes"), bundle);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = Bundle::decode(&bytes);
        }
    }
}
