//! The MQTT broker section shared by the edge agent (its site broker) and the cloud hub (its cloud broker).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::load::{lenient, resolve};
use super::units::{ByteSize, HostPort, Secret};
use super::validate::Report;

/// Which broker a program talks to, and how. A closed set dispatched by `match`: adding a kind means adding a
/// variant and handling it everywhere, which the compiler then enforces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BrokerConfig {
    /// Run an MQTT broker inside the process (rumqttd) that local clients connect to.
    Embedded(EmbeddedBroker),
    /// Join an existing broker (Mosquitto, EMQX, ...) as an MQTT client.
    External(ExternalBroker),
}

/// An in-process broker that listens for MQTT clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedBroker {
    /// Client-facing MQTT address. Defaults to loopback so that a fresh install exposes nothing.
    #[serde(default = "default_embedded_listen")]
    pub listen: SocketAddr,
    /// Username clients must present; set together with `password` or not at all.
    #[serde(
        default,
        deserialize_with = "lenient::opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub username: Option<String>,
    /// Password clients must present; set together with `username` or not at all. Kept in the config
    /// in plaintext: prefer `password_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Users and their salted, slow password hashes, in Mosquitto's format (`edge-agent passwd FILE USER`
    /// or `mosquitto_passwd` write it; a site's existing file works as it is). A client that presents a
    /// user name must present its password. Re-read when it changes, without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Topic ACLs in Mosquitto's `acl_file` format (`user`, `topic read|write|readwrite|deny`, `pattern`
    /// with `%u`/`%c`; lines before the first `user` apply to anonymous clients). Once set, a client may
    /// publish and subscribe only where it grants. Re-read when it changes, without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl_file: Option<PathBuf>,
    /// Whether clients without a user name (or with one but no `password_file` to check it) are let in.
    /// Unset: at the edge agent, yes without a `password_file` (the listener defaults to loopback) and no
    /// with one; at the hub, no: its cloud broker needs a `password_file` or an explicit
    /// `allow_anonymous = true`, so it is never open by accident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
    /// Serve MQTT over TLS with this certificate instead of plain TCP. The certificate and key are re-read
    /// when they change, without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// More client ports, e.g. plaintext on loopback for local tools and TLS with a required user on the
    /// plant network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<BrokerListener>,
    /// Largest PUBLISH payload accepted from a client for the local broker (a larger packet closes the
    /// connection). What goes to the hub is bounded separately, and refused at PUBLISH time with a reason,
    /// by `uplink.max_message_size` and the hub's announced limit.
    #[serde(default = "default_max_payload")]
    pub max_payload: ByteSize,
    /// Most concurrent client connections; protects the agent's memory from a misbehaving client fleet.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Memory the broker keeps per subscription filter. The embedded broker (rumqttd) holds everything
    /// published to a filter that has subscribers in one in-memory log, delivered or not, and trims only
    /// the oldest part of it; this bounds that log, counting each message as what it costs in memory
    /// (the entry and its properties, about 300 bytes beyond topic and payload), not only its bytes. At the edge, a subscriber (or an offline persistent
    /// session) more than this far behind loses the oldest messages, as Mosquitto drops beyond
    /// `max_queued_messages`. At the hub, a connected QoS 1/2 subscriber that falls this far behind holds
    /// the hub's publishing instead (the agents' queues take the wait), unless it reads nothing for 5 s.
    /// The hub's own cloud broker keeps one such log per filter its consumers use, so this is what a
    /// stalled consumer can cost the hub's memory. Before this bound existed, the log kept up to 1 GiB per
    /// filter (fault scenario 11 in `tests/tests/fault_slow.rs`).
    #[serde(default = "default_max_log_per_filter")]
    pub max_log_per_filter: ByteSize,
    /// Most messages kept for one persistent session (a `cleansession=0` / session-expiry client) while it
    /// is offline or behind, as Mosquitto's `max_queued_messages`; beyond it new messages for that session
    /// are dropped, counted (`meshbridge_session_messages_dropped_total`) and logged. 0 = no limit. The
    /// edge agent keeps them on disk (`sessions.redb`); the hub's cloud broker does not use this key.
    #[serde(default = "default_max_queued_messages")]
    pub max_queued_messages: u64,
    /// Most bytes kept for one persistent session, as Mosquitto's `max_queued_bytes`. 0 = no limit.
    #[serde(default = "default_max_queued_bytes")]
    pub max_queued_bytes: ByteSize,
    /// Most retained topics the edge agent keeps on disk (`retained.redb`); a retained PUBLISH beyond it
    /// is refused (MQTT 5: reason 0x97), counted and logged.
    #[serde(default = "default_max_retained_messages")]
    pub max_retained_messages: u64,
    /// Most bytes of retained messages the edge agent keeps on disk.
    #[serde(default = "default_max_retained_bytes")]
    pub max_retained_bytes: ByteSize,
}

fn default_max_queued_messages() -> u64 {
    10_000
}

fn default_max_queued_bytes() -> ByteSize {
    ByteSize::mib(64)
}

fn default_max_retained_messages() -> u64 {
    100_000
}

fn default_max_retained_bytes() -> ByteSize {
    ByteSize::mib(64)
}

/// An existing broker joined as a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExternalBroker {
    /// Broker address as `host:port`; resolved at every (re)connect.
    pub address: HostPort,
    /// MQTT client id. Defaults to `meshbridge-<site>` on the agent and `meshbridge-hub` on the hub (filled in at
    /// load time); it must be stable because the broker keeps the persistent session under it.
    #[serde(
        default,
        deserialize_with = "lenient::opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_id: Option<String>,
    /// Username to authenticate with; set together with `password` or not at all.
    #[serde(
        default,
        deserialize_with = "lenient::opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub username: Option<String>,
    /// Password to authenticate with; set together with `username` or not at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// Connect over TLS, verifying the broker against `ca`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
    /// MQTT keep-alive interval. MQTT counts it in whole seconds (1 to 65535); 0 would disable the broker's
    /// liveness check, which rumqttd refuses and which hides dead links, so it is rejected here.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
}

/// Certificate and key a listener presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTls {
    /// PEM certificate chain, leaf first; relative paths are resolved against the config file's directory.
    pub cert: PathBuf,
    /// PEM private key of `cert`; relative to the config file's directory.
    pub key: PathBuf,
    /// PEM CA bundle client certificates must chain to. Set: every client must present one, and its
    /// Common Name is its user name (Mosquitto's `require_certificate` + `use_identity_as_username`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

/// A further client port of an embedded broker (Mosquitto's `listener` blocks). Users and ACLs are the
/// broker's (`password_file`, `acl_file`); TLS and the anonymous rule are the port's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerListener {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Serve MQTT over TLS on this port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ServerTls>,
    /// Whether clients without a user name are let in on this port; unset: as `broker.allow_anonymous`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_anonymous: Option<bool>,
}

/// TLS settings for connecting to a broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTls {
    /// PEM CA bundle the broker's certificate must chain to; relative to the config file's directory.
    pub ca: PathBuf,
    /// Optional client certificate for brokers that require mutual TLS; set together with `key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    /// Private key of `cert`; set together with `cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

fn default_embedded_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1883))
}

fn default_max_payload() -> ByteSize {
    ByteSize::kib(256)
}

fn default_max_connections() -> u32 {
    1024
}

fn default_max_log_per_filter() -> ByteSize {
    ByteSize::mib(32)
}

fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}

/// MQTT's Remaining Length limit, the largest payload any broker can carry.
const MQTT_MAX_PACKET: ByteSize = ByteSize(268_435_455);

impl BrokerConfig {
    /// Resolves relative TLS paths against `base` and fills the default client id.
    pub(crate) fn normalize(&mut self, base: &std::path::Path, default_client_id: &str) {
        match self {
            Self::Embedded(embedded) => {
                let extra = embedded.listeners.iter_mut().filter_map(|l| l.tls.as_mut());
                for tls in embedded.tls.iter_mut().chain(extra) {
                    resolve(base, &mut tls.cert);
                    resolve(base, &mut tls.key);
                    if let Some(ca) = &mut tls.client_ca {
                        resolve(base, ca);
                    }
                }
                for path in [&mut embedded.password_file, &mut embedded.acl_file]
                    .into_iter()
                    .flatten()
                {
                    resolve(base, path);
                }
            }
            Self::External(external) => {
                if external.client_id.is_none() {
                    external.client_id = Some(default_client_id.to_owned());
                }
                if let Some(tls) = &mut external.tls {
                    resolve(base, &mut tls.ca);
                    for path in [&mut tls.cert, &mut tls.key].into_iter().flatten() {
                        resolve(base, path);
                    }
                }
            }
        }
    }

    /// Checks the section; `key` is the section's own path (`broker`).
    pub(crate) fn validate(&self, key: &str, report: &mut Report) {
        let prefix = format!("{key}.");
        match self {
            Self::Embedded(embedded) => {
                report.pair(
                    &prefix,
                    ("username", embedded.username.is_some()),
                    ("password", embedded.password.is_some()),
                );
                if let Some(username) = &embedded.username {
                    report.text(&format!("{prefix}username"), username);
                }
                if let Some(path) = &embedded.password_file {
                    report.path(&format!("{prefix}password_file"), path);
                    if embedded.username.is_some() {
                        report.push(
                            format!("{prefix}password_file"),
                            super::validate::Problem::Conflicts {
                                other: format!("{prefix}username"),
                                why: "the password file holds the users; drop username/password",
                            },
                        );
                    }
                }
                if let Some(path) = &embedded.acl_file {
                    report.path(&format!("{prefix}acl_file"), path);
                }
                if embedded.allow_anonymous.is_some() && embedded.username.is_some() {
                    report.push(
                        format!("{prefix}allow_anonymous"),
                        super::validate::Problem::Conflicts {
                            other: format!("{prefix}username"),
                            why: "with username/password every client must present them",
                        },
                    );
                }
                if embedded.username.is_some() && embedded.acl_file.is_some() {
                    report.push(
                        format!("{prefix}acl_file"),
                        super::validate::Problem::Conflicts {
                            other: format!("{prefix}username"),
                            why: "ACL users come from a password_file",
                        },
                    );
                }
                if let Some(tls) = &embedded.tls {
                    report.path(&format!("{prefix}tls.cert"), &tls.cert);
                    report.path(&format!("{prefix}tls.key"), &tls.key);
                }
                for (i, l) in embedded.listeners.iter().enumerate() {
                    let key = format!("{prefix}listeners[{i}]");
                    if let Some(tls) = &l.tls {
                        report.path(&format!("{key}.tls.cert"), &tls.cert);
                        report.path(&format!("{key}.tls.key"), &tls.key);
                    }
                    let first = std::iter::once((format!("{prefix}listen"), embedded.listen))
                        .chain(
                            embedded.listeners[..i]
                                .iter()
                                .enumerate()
                                .map(|(j, o)| (format!("{prefix}listeners[{j}].listen"), o.listen)),
                        )
                        .find(|(_, addr)| *addr == l.listen && addr.port() != 0);
                    if let Some((first, _)) = first {
                        report.push(
                            format!("{key}.listen"),
                            super::validate::Problem::Duplicate { first },
                        );
                    }
                }
                report.size_range(
                    &format!("{prefix}max_payload"),
                    embedded.max_payload,
                    ByteSize(1),
                    MQTT_MAX_PACKET,
                );
                report.int_range(
                    &format!("{prefix}max_connections"),
                    embedded.max_connections.into(),
                    1,
                    1_000_000,
                );
                report.size_range(
                    &format!("{prefix}max_log_per_filter"),
                    embedded.max_log_per_filter,
                    ByteSize::kib(256),
                    ByteSize::gib(16),
                );
                report.int_range(
                    &format!("{prefix}max_retained_messages"),
                    embedded.max_retained_messages,
                    1,
                    100_000_000,
                );
                report.size_range(
                    &format!("{prefix}max_retained_bytes"),
                    embedded.max_retained_bytes,
                    ByteSize(1),
                    ByteSize::gib(64),
                );
            }
            Self::External(external) => {
                if let Some(client_id) = &external.client_id {
                    report.text(&format!("{prefix}client_id"), client_id);
                }
                report.pair(
                    &prefix,
                    ("username", external.username.is_some()),
                    ("password", external.password.is_some()),
                );
                if let Some(username) = &external.username {
                    report.text(&format!("{prefix}username"), username);
                }
                if let Some(tls) = &external.tls {
                    report.path(&format!("{prefix}tls.ca"), &tls.ca);
                    for (name, path) in [("cert", &tls.cert), ("key", &tls.key)] {
                        if let Some(path) = path {
                            report.path(&format!("{prefix}tls.{name}"), path);
                        }
                    }
                    report.pair(
                        &format!("{prefix}tls."),
                        ("cert", tls.cert.is_some()),
                        ("key", tls.key.is_some()),
                    );
                }
                report.duration_range(
                    &format!("{prefix}keep_alive"),
                    external.keep_alive,
                    Duration::from_secs(1),
                    Duration::from_secs(u64::from(u16::MAX)),
                );
            }
        }
    }
}

/// The Prometheus metrics endpoint (`[metrics]`), the same for both programs.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served (e.g. `127.0.0.1:9601`); unset, the default: no endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
}

/// The status topic (`[status]`, see `shared::status`): the hub's per site in the cloud namespace, the
/// agent's on its local broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Publish status topics at all.
    #[serde(default = "default_status_enabled")]
    pub enabled: bool,
    /// Published on every change and at least this often.
    #[serde(default = "default_status_interval", with = "humantime_serde")]
    pub interval: std::time::Duration,
}

impl StatusConfig {
    pub(crate) fn validate(&self, report: &mut super::validate::Report) {
        report.duration_range(
            "status.interval",
            self.interval,
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(24 * 3600),
        );
    }
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            enabled: default_status_enabled(),
            interval: default_status_interval(),
        }
    }
}

const fn default_status_enabled() -> bool {
    true
}

const fn default_status_interval() -> std::time::Duration {
    std::time::Duration::from_secs(30)
}

/// How log lines are written (`log_format`), the same for both programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines (the default).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}
