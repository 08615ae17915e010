//! Config files for the programs under test, written from small builders with absolute paths, in the
//! format of `shared::config` (the same keys as `configs/*.toml`). Only what the tests vary is exposed;
//! everything else keeps the program's defaults.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::pki::{CertFiles, Pki};

/// The MQTT broker a program uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerSpec {
    /// In-process broker listening for clients on this address.
    Embedded {
        /// Client-facing address.
        listen: SocketAddr,
    },
    /// An existing broker joined as a client.
    External {
        /// Broker address.
        address: SocketAddr,
        /// Client id (the persistent session is kept under it).
        client_id: String,
    },
}

impl BrokerSpec {
    /// An existing cloud broker at `address`, joined as the hub's usual client id (`meshbridge-hub`): how
    /// tests point a hub at a broker that outlives it (`crate::cloud::CloudBroker`) or at a Mosquitto.
    pub fn hub_client_of(address: SocketAddr) -> Self {
        Self::External {
            address,
            client_id: "meshbridge-hub".to_owned(),
        }
    }

    /// An embedded broker on a free loopback port.
    pub fn embedded() -> Self {
        Self::Embedded {
            listen: crate::net::free_tcp(),
        }
    }

    /// The address MQTT clients of this broker connect to.
    pub fn client_addr(&self) -> SocketAddr {
        match self {
            Self::Embedded { listen } => *listen,
            Self::External { address, .. } => *address,
        }
    }

    fn write(&self, out: &mut String) {
        match self {
            Self::Embedded { listen } => {
                let _ = writeln!(
                    out,
                    "[broker]\nkind = \"embedded\"\nlisten = \"{listen}\"\n"
                );
            }
            Self::External { address, client_id } => {
                let _ = writeln!(
                    out,
                    "[broker]\nkind = \"external\"\naddress = \"{address}\"\nclient_id = {}\nkeep_alive = \"5s\"\n",
                    quote(client_id)
                );
            }
        }
    }
}

/// A cloud-hub config.
#[derive(Debug, Clone)]
pub struct HubSpec {
    /// Hub state (dedup) directory.
    pub data_dir: PathBuf,
    /// QUIC (UDP) address.
    pub quic: SocketAddr,
    /// CA agents' certificates must chain to.
    pub ca: PathBuf,
    /// The hub's own certificate.
    pub cert: CertFiles,
    /// `tls.crl`: the revocation list the hub follows (e.g. the mesh PKI's `crl.pem`).
    pub crl: Option<PathBuf>,
    /// The cloud broker.
    pub broker: BrokerSpec,
    /// `(site, namespace template)` pairs.
    pub sites: Vec<(String, String)>,
    /// Extra `key = value` lines for the `[broker]` table (e.g. `max_log_per_filter = "4MiB"`).
    pub broker_extra: Vec<String>,
    /// Extra `key = value` lines for the `[listen]` table (e.g. `max_connections = 4`).
    pub listen_extra: Vec<String>,
    /// TOML appended at the end, e.g. `[[routes]]` tables.
    pub tail: Vec<String>,
    /// `tracing` filter.
    pub log: String,
    /// `metrics.listen`: where the hub serves `GET /metrics`.
    pub metrics: Option<SocketAddr>,
    /// `log_format = "json"` instead of text lines.
    pub json_logs: bool,
    /// `status.interval`; `None` turns the hub's status topics off (`[status] enabled = false`), because
    /// most tests subscribe to a whole namespace and count what arrives. `tests/tests/e2e_status.rs` sets it.
    pub status_interval: Option<Duration>,
}

impl HubSpec {
    /// A hub with state in `dir/hub`, QUIC on a free port, the certificates of `pki`, the given broker, and
    /// the sites `sites` under `acme/plant1/{site}`.
    pub fn new(dir: &Path, pki: &Pki, broker: BrokerSpec, sites: &[&str]) -> Self {
        // The tests' cloud consumers connect anonymously; the hub refuses an open embedded broker
        // unless the config says so.
        let broker_extra = match broker {
            BrokerSpec::Embedded { .. } => vec!["allow_anonymous = true".to_owned()],
            BrokerSpec::External { .. } => Vec::new(),
        };
        Self {
            data_dir: dir.join("hub"),
            quic: crate::net::free_udp(),
            ca: pki.ca().to_path_buf(),
            cert: pki.hub(),
            crl: None,
            broker,
            sites: sites
                .iter()
                .map(|s| ((*s).to_owned(), "acme/plant1/{site}".to_owned()))
                .collect(),
            broker_extra,
            listen_extra: Vec::new(),
            tail: Vec::new(),
            log: "info".to_owned(),
            metrics: None,
            json_logs: false,
            status_interval: None,
        }
    }

    /// The config text.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "data_dir = {}\nlog = {}\n\n[listen]\nquic = \"{}\"\n\n[tls]\nca = {}\ncert = {}\nkey = {}\n",
            quote_path(&self.data_dir),
            quote(&self.log),
            self.quic,
            quote_path(&self.ca),
            quote_path(&self.cert.cert),
            quote_path(&self.cert.key),
        );
        if let Some(crl) = &self.crl {
            let _ = writeln!(out, "crl = {}", quote_path(crl));
        }
        if !self.listen_extra.is_empty() {
            let quic = format!("quic = \"{}\"\n", self.quic);
            out = out.replacen(
                &quic,
                &format!("{quic}{}\n", self.listen_extra.join("\n")),
                1,
            );
        }
        if self.json_logs {
            // Top-level keys must come before the first table: put it right after `log`.
            out = out.replacen("\n\n[listen]", "\nlog_format = \"json\"\n\n[listen]", 1);
        }
        self.broker.write(&mut out);
        // Still inside `[broker]`: the broker's own lines end with a blank line, which TOML allows.
        for line in &self.broker_extra {
            let _ = writeln!(out, "{line}");
        }
        if let Some(addr) = self.metrics {
            let _ = writeln!(out, "[metrics]\nlisten = \"{addr}\"\n");
        }
        match self.status_interval {
            Some(interval) => {
                let _ = writeln!(out, "[status]\ninterval = \"{}ms\"\n", interval.as_millis());
            }
            None => {
                let _ = writeln!(out, "[status]\nenabled = false\n");
            }
        }
        for (name, namespace) in &self.sites {
            let _ = writeln!(
                out,
                "[[sites]]\nname = {}\nnamespace = {}\n",
                quote(name),
                quote(namespace)
            );
        }
        for block in &self.tail {
            let _ = writeln!(out, "{block}");
        }
        out
    }

    /// Writes the config to `path` and returns the path.
    pub fn write(&self, path: &Path) -> PathBuf {
        write_config(path, &self.to_toml(), |p| {
            shared::config::load_hub(p).map(drop)
        })
    }
}

/// An edge-agent config.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Site name the agent says it is (informational: the hub believes the certificate).
    pub site: String,
    /// Queue directory.
    pub data_dir: PathBuf,
    /// The local broker.
    pub broker: BrokerSpec,
    /// The hub's QUIC address.
    pub hub: SocketAddr,
    /// Name the hub certificate must carry.
    pub server_name: String,
    /// CA the hub certificate must chain to.
    pub ca: PathBuf,
    /// The agent's client certificate.
    pub cert: CertFiles,
    /// Uplink route filters.
    pub routes: Vec<String>,
    /// Messages per batch.
    pub batch_max_messages: u32,
    /// Batches in flight.
    pub window: u32,
    /// Longest reconnect delay; short in tests so a restarted hub is found quickly.
    pub reconnect_max: Duration,
    /// `queue.max_bytes` (at least `"1 MiB"`) with `full_policy = "block"`; the agent's default when `None`.
    pub queue_max_bytes: Option<String>,
    /// `tracing` filter.
    pub log: String,
    /// `agent_name`: set for the members of a redundant pair.
    pub agent_name: Option<String>,
    /// `metrics.listen`: where the agent serves `GET /metrics`.
    pub metrics: Option<SocketAddr>,
    /// `log_format = "json"` instead of text lines.
    pub json_logs: bool,
    /// Extra lines of the `[broker]` section (e.g. `max_queued_messages = 5`).
    pub broker_extra: Vec<String>,
    /// Text appended to the config (whole tables, e.g. `[status]`).
    pub tail: Vec<String>,
    /// `uplink.ack_timeout` (the stuck-link watchdog); the agent's default when `None`.
    pub ack_timeout: Option<Duration>,
}

impl AgentSpec {
    /// An agent for `site` with its queue in `dir/<site>`, `site`'s certificate from `pki`, the given local
    /// broker, routing `telemetry/#` to the hub at `hub`.
    pub fn new(dir: &Path, pki: &Pki, site: &str, broker: BrokerSpec, hub: SocketAddr) -> Self {
        Self {
            site: site.to_owned(),
            data_dir: dir.join(site),
            broker,
            hub,
            server_name: "hub.meshbridge.local".to_owned(),
            ca: pki.ca().to_path_buf(),
            cert: pki.site(site),
            routes: vec!["telemetry/#".to_owned()],
            batch_max_messages: 128,
            window: 4,
            reconnect_max: Duration::from_millis(500),
            queue_max_bytes: None,
            log: "info".to_owned(),
            agent_name: None,
            metrics: None,
            json_logs: false,
            broker_extra: Vec::new(),
            tail: Vec::new(),
            ack_timeout: None,
        }
    }

    /// The most messages one uplink window can hold: what a hub crash may make the agent resend.
    pub fn window_messages(&self) -> usize {
        self.batch_max_messages as usize * self.window as usize
    }

    /// The config text.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "site = {}\ndata_dir = {}\nlog = {}\n",
            quote(&self.site),
            quote_path(&self.data_dir),
            quote(&self.log)
        );
        if let Some(name) = &self.agent_name {
            let _ = writeln!(out, "agent_name = {}\n", quote(name));
        }
        if self.json_logs {
            let _ = writeln!(out, "log_format = \"json\"\n");
        }
        self.broker.write(&mut out);
        for line in &self.broker_extra {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(
            out,
            "[uplink]\nhub = \"{}\"\nserver_name = {}\nca = {}\ncert = {}\nkey = {}\n\
             batch_max_messages = {}\nwindow = {}\nreconnect_min = \"50ms\"\nreconnect_max = \"{}ms\"\n\
             shutdown_timeout = \"5s\"\n",
            self.hub,
            quote(&self.server_name),
            quote_path(&self.ca),
            quote_path(&self.cert.cert),
            quote_path(&self.cert.key),
            self.batch_max_messages,
            self.window,
            self.reconnect_max.as_millis().max(50),
        );
        if let Some(timeout) = self.ack_timeout {
            let _ = writeln!(out, "ack_timeout = \"{}ms\"\n", timeout.as_millis());
        }
        if let Some(max) = &self.queue_max_bytes {
            let _ = writeln!(
                out,
                "[queue]\nmax_bytes = {}\nfull_policy = \"block\"\n",
                quote(max)
            );
        }
        if let Some(addr) = self.metrics {
            let _ = writeln!(out, "[metrics]\nlisten = \"{addr}\"\n");
        }
        for filter in &self.routes {
            let _ = writeln!(out, "[[routes]]\nfilter = {}\n", quote(filter));
        }
        for text in &self.tail {
            let _ = writeln!(out, "{text}");
        }
        out
    }

    /// Writes the config to `path` and returns the path.
    pub fn write(&self, path: &Path) -> PathBuf {
        write_config(path, &self.to_toml(), |p| {
            shared::config::load_agent(p).map(drop)
        })
    }
}

/// Writes `text` and loads it back with the program's own loader, so a harness/config drift fails here
/// with the loader's message rather than as a program that exits at start.
fn write_config(
    path: &Path,
    text: &str,
    load: impl Fn(&Path) -> Result<(), shared::config::ConfigError>,
) -> PathBuf {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    if let Err(e) = load(path) {
        panic!("{} does not load: {e}\n{text}", path.display());
    }
    path.to_path_buf()
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn quote_path(p: &Path) -> String {
    quote(&p.to_string_lossy())
}
