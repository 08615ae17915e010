//! The cloud hub's config: where it listens, which sites it accepts, and where their messages are published.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::agent::FRAME_OVERHEAD;
use super::broker::BrokerConfig;
use super::load::{lenient, load_file, load_text, resolve, ConfigError, Model};
use super::route::{compile_routes, RouteConfig};
use super::units::ByteSize;
use super::validate::{
    check_namespace_template, check_site_name, expand_namespace, level_prefix, FieldError, Problem,
    Report, TopicTextError,
};

/// The whole cloud-hub config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// Directory for the hub's own state (per-site queues, config versions); relative to the config file.
    pub data_dir: PathBuf,
    /// Default `tracing` env-filter directive, used when `RUST_LOG` is not set.
    #[serde(default = "default_log", deserialize_with = "lenient::string")]
    pub log: String,
    /// `text` (default) or `json` (one object per line).
    #[serde(default)]
    pub log_format: super::LogFormat,
    /// Threads of the hub's async runtime; 0: one per core. The default is 1. With two workers on this
    /// project's 2-core test machine, the second was woken for almost every message to find little to
    /// steal: one worker cut the hub's CPU per message by 20–30 % at 1,000 msg/s, in fan-in and in the
    /// 1,000-site scenario, and delivered the same throughput with 1 and with 10 publishers (README,
    /// "Performance"). One worker is tokio's current-thread scheduler, which cost about 13 % less again
    /// than a multi-thread scheduler with one worker. Disk work runs on the blocking pool either way.
    /// Raise it for a hub whose one worker nears a full core (its CPU use, or delivery falling behind
    /// under load).
    #[serde(default = "default_worker_threads")]
    pub worker_threads: u16,
    /// Where agents connect.
    pub listen: ListenConfig,
    /// The hub's certificate and the CA that agent certificates must chain to.
    pub tls: HubTls,
    /// The cloud broker messages are published into.
    pub broker: BrokerConfig,
    /// Duplicate suppression for messages resent after a reconnect.
    #[serde(default)]
    pub dedup: DedupConfig,
    /// Size limits enforced on what agents send.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// The sites allowed to connect. An agent whose certificate names no site here is refused. May be
    /// empty: a freshly installed hub runs with none until `cloud-hub site add` appends the first, and the
    /// running hub admits sites as they are added.
    #[serde(default)]
    pub sites: Vec<SiteConfig>,
    /// What flows where: uplink, downlink and site-to-site routes (see [`RouteConfig`] for the shape). Each
    /// site's share is pushed to its agent ([`EffectiveConfig`](super::EffectiveConfig)). Optional, so
    /// configs written before routes existed still load.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// The durable per-site queues of messages bound for sites (downlink and site-to-site routes).
    #[serde(default)]
    pub downlink: DownlinkConfig,
    /// The Prometheus endpoint; off unless `metrics.listen` is set.
    #[serde(default)]
    pub metrics: super::MetricsConfig,
    /// The status topic (README, "Status topics").
    #[serde(default)]
    pub status: super::StatusConfig,
}

/// Bounds of each site's downlink queue at the hub (`data_dir/downlink/<site>.redb`), which holds what is
/// bound for a site until its agent has handed it to the site broker, across an offline site and a hub
/// restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkConfig {
    /// Most bytes queued per site.
    #[serde(default = "default_downlink_max_bytes")]
    pub max_bytes: ByteSize,
    /// Messages older than this are dropped (and counted) instead of delivered; a route's `ttl` may be
    /// shorter.
    #[serde(default = "default_downlink_max_age", with = "humantime_serde")]
    pub max_age: std::time::Duration,
    /// What happens when a site's queue is full: `block` stops taking messages from the cloud broker
    /// (which keeps them, or drops them by its own policy); `drop-oldest` makes room, counted.
    #[serde(default)]
    pub full_policy: super::FullPolicy,
    /// The stuck-link watchdog of the downlink: a connection on which downlink frames stay
    /// unacknowledged this long (the site's broker stopped accepting, a wedged agent) is logged, counted
    /// (`meshbridge_downlink_stalls_total`) and closed; the agent reconnects and they are sent again.
    /// Longer than the agent's own 30 s limit for its local broker's answer.
    #[serde(default = "default_downlink_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: std::time::Duration,
}

fn default_downlink_ack_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(60)
}

impl Default for DownlinkConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_downlink_max_bytes(),
            max_age: default_downlink_max_age(),
            full_policy: super::FullPolicy::Block,
            ack_timeout: default_downlink_ack_timeout(),
        }
    }
}

fn default_downlink_max_bytes() -> ByteSize {
    ByteSize::mib(64)
}

fn default_downlink_max_age() -> std::time::Duration {
    std::time::Duration::from_secs(7 * 24 * 3600)
}

/// The QUIC listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// UDP address of the QUIC endpoint.
    pub quic: SocketAddr,
    /// Most concurrent agent connections. A slot is taken once the handshake completed (half-open
    /// handshakes never hold one); an agent beyond it is closed with `Overloaded` and retries later.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Most QUIC handshakes in flight at once; a validated attempt beyond it is refused (the agent
    /// retries). See `shared/src/policy/admission.rs`.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: u32,
    /// Handshakes in flight above which an attempt whose source address is not yet proven gets a QUIC
    /// Retry (address validation, one extra round trip) instead of a handshake, so forged Initials cannot
    /// fill the handshake slots. 0: validate every attempt. Must be below `max_handshakes`.
    #[serde(default = "default_retry_above")]
    pub retry_above: u32,
    /// Most handshakes in flight from one (proven) source address. Agents behind one NAT share it;
    /// handshakes take milliseconds, so a few dozen covers a plant reconnecting at once.
    #[serde(default = "default_max_handshakes_per_source")]
    pub max_handshakes_per_source: u32,
    /// How long a handshake may take before the hub drops it and frees its slot.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: std::time::Duration,
    /// Newest agent↔hub protocol version spoken (2 or 3). Each release speaks its own version and the one
    /// before, so agents one release older or newer connect by themselves; set 2 only to hold an upgraded
    /// hub to it, for example while it might be rolled back. Default: the newest this build speaks
    /// (`PROTOCOL_VERSION` in shared/src/wire/version.rs, 3).
    #[serde(default = "default_max_protocol_version")]
    pub max_protocol_version: u16,
}

/// The hub's mutual-TLS material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubTls {
    /// PEM CA bundle that agent client certificates must chain to; relative to the config file.
    pub ca: PathBuf,
    /// PEM certificate chain the hub presents; relative to the config file.
    pub cert: PathBuf,
    /// PEM private key of `cert`; relative to the config file.
    pub key: PathBuf,
    /// PEM certificate revocation list signed by `ca` (`cloud-hub pki revoke` keeps `crl.pem` in the PKI
    /// directory); relative to the config file. Revoked site certificates are refused at the handshake,
    /// and the links they hold are closed when the file changes (re-read within 2 s). Unset: nothing is
    /// revoked.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// Duplicate suppression.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Per-origin window of sequence numbers remembered to drop duplicates arriving out of order; memory is
    /// proportional to it times the number of origins.
    #[serde(default = "default_dedup_window")]
    pub window: u32,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self {
            window: default_dedup_window(),
        }
    }
}

/// Limits on agent traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame accepted from an agent; agents' `uplink.max_frame_size` should not exceed it.
    #[serde(default = "default_max_frame_size")]
    pub max_frame_size: ByteSize,
    /// Largest single message payload accepted; larger ones are rejected and counted.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: ByteSize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_size: default_max_frame_size(),
            max_message_size: default_max_message_size(),
        }
    }
}

/// One site allowed to connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    /// Site name; must equal the site name in the agent's client certificate. One topic level.
    #[serde(deserialize_with = "lenient::string")]
    pub name: String,
    /// Namespace template under which the site's messages are published; `{site}` expands to `name`. Expanded
    /// namespaces of two sites must not overlap (neither may be a level-prefix of the other), or one site could
    /// publish into the other's tree.
    pub namespace: String,
}

impl SiteConfig {
    /// The expanded namespace (`acme/plant1/line1`). Always `Ok` on a validated config.
    pub fn expanded_namespace(&self) -> Result<String, TopicTextError> {
        expand_namespace(&self.namespace, &self.name)
    }
}

const fn default_worker_threads() -> u16 {
    1
}

fn default_log() -> String {
    "info".to_owned()
}
fn default_max_connections() -> u32 {
    1024
}
fn default_max_handshakes() -> u32 {
    256
}
fn default_retry_above() -> u32 {
    64
}
fn default_max_handshakes_per_source() -> u32 {
    32
}
fn default_max_protocol_version() -> u16 {
    crate::wire::PROTOCOL_VERSION
}
fn default_handshake_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(10)
}
fn default_dedup_window() -> u32 {
    4096
}
fn default_max_frame_size() -> ByteSize {
    ByteSize::mib(8)
}
fn default_max_message_size() -> ByteSize {
    ByteSize::kib(256)
}

/// Loads and validates a hub config file, with `MESHBRIDGE_*` environment overrides; relative paths in it are
/// resolved against the file's directory.
pub fn load_hub(path: &Path) -> Result<HubConfig, ConfigError> {
    load_file(path)
}

impl HubConfig {
    /// Parses and validates hub config text, resolving relative paths against `base_dir`, without environment
    /// overrides.
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        load_text(text, base_dir)
    }

    /// Reports every problem in the config, each with its key path.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut report = Report::default();
        report.path("data_dir", &self.data_dir);
        report.text("log", &self.log);
        report.int_range("worker_threads", self.worker_threads.into(), 0, 1024);
        report.path("tls.ca", &self.tls.ca);
        report.path("tls.cert", &self.tls.cert);
        report.path("tls.key", &self.tls.key);
        if let Some(crl) = &self.tls.crl {
            report.path("tls.crl", crl);
        }
        report.int_range(
            "listen.max_connections",
            self.listen.max_connections.into(),
            1,
            1_000_000,
        );
        let listen = &self.listen;
        report.int_range(
            "listen.max_handshakes",
            listen.max_handshakes.into(),
            1,
            100_000,
        );
        if listen.retry_above >= listen.max_handshakes {
            report.push(
                "listen.retry_above",
                Problem::NotBelow {
                    value: listen.retry_above.into(),
                    other: "listen.max_handshakes".to_owned(),
                    other_value: listen.max_handshakes.into(),
                },
            );
        }
        report.int_range(
            "listen.max_protocol_version",
            listen.max_protocol_version.into(),
            crate::wire::OLDEST_SUPPORTED.into(),
            crate::wire::PROTOCOL_VERSION.into(),
        );
        report.int_range(
            "listen.max_handshakes_per_source",
            listen.max_handshakes_per_source.into(),
            1,
            100_000,
        );
        report.duration_range(
            "listen.handshake_timeout",
            listen.handshake_timeout,
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(600),
        );
        self.broker.validate("broker", &mut report);
        if let BrokerConfig::Embedded(embedded) = &self.broker {
            if embedded.password_file.is_none() && embedded.allow_anonymous != Some(true) {
                report.push("broker.allow_anonymous", Problem::Unauthenticated);
            }
        }
        report.int_range("dedup.window", self.dedup.window.into(), 1, 1_048_576);
        report.size_range(
            "limits.max_frame_size",
            self.limits.max_frame_size,
            ByteSize(0),
            ByteSize::gib(1),
        );
        report.size_range(
            "limits.max_message_size",
            self.limits.max_message_size,
            ByteSize(1),
            ByteSize::mib(256),
        );
        let needed = ByteSize(
            self.limits
                .max_message_size
                .0
                .saturating_add(FRAME_OVERHEAD.0),
        );
        if self.limits.max_frame_size < needed {
            report.push(
                "limits.max_frame_size",
                Problem::SizeTooSmall {
                    value: self.limits.max_frame_size,
                    needed,
                    reason: format!("limits.max_message_size + {FRAME_OVERHEAD} overhead"),
                },
            );
        }
        self.validate_sites(&mut report);
        let _ = compile_routes(self, &mut report);
        report.size_range(
            "downlink.max_bytes",
            self.downlink.max_bytes,
            ByteSize::mib(1),
            ByteSize::gib(1024),
        );
        self.status.validate(&mut report);
        report.duration_range(
            "downlink.ack_timeout",
            self.downlink.ack_timeout,
            std::time::Duration::from_millis(500),
            std::time::Duration::from_secs(24 * 3600),
        );
        report.duration_range(
            "downlink.max_age",
            self.downlink.max_age,
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(10 * 365 * 24 * 3600),
        );
        report.finish()
    }

    fn validate_sites(&self, report: &mut Report) {
        // (index, expanded namespace) of every site whose template is valid, for the overlap check.
        let mut expanded: Vec<(usize, String)> = Vec::with_capacity(self.sites.len());
        for (i, site) in self.sites.iter().enumerate() {
            let key = format!("sites[{i}]");
            if let Err(reason) = check_site_name(&site.name) {
                report.push(
                    format!("{key}.name"),
                    Problem::InvalidSiteName {
                        name: site.name.clone(),
                        reason,
                    },
                );
                // Without a usable name the namespace cannot be expanded; still check the template itself.
                if let Err(reason) = check_namespace_template(&site.namespace) {
                    report.push(
                        format!("{key}.namespace"),
                        Problem::InvalidNamespace {
                            template: site.namespace.clone(),
                            reason,
                        },
                    );
                }
                continue;
            }
            if let Some(first) = self.sites[..i].iter().position(|s| s.name == site.name) {
                report.push(
                    format!("{key}.name"),
                    Problem::Duplicate {
                        first: format!("sites[{first}].name"),
                    },
                );
            }
            match site.expanded_namespace() {
                Err(reason) => report.push(
                    format!("{key}.namespace"),
                    Problem::InvalidNamespace {
                        template: site.namespace.clone(),
                        reason,
                    },
                ),
                Ok(namespace) => {
                    for (j, other) in &expanded {
                        let other_key = format!("sites[{j}].namespace");
                        if *other == namespace {
                            report.push(
                                format!("{key}.namespace"),
                                Problem::Duplicate { first: other_key },
                            );
                        } else if level_prefix(other, &namespace) || level_prefix(&namespace, other)
                        {
                            report.push(
                                format!("{key}.namespace"),
                                Problem::NamespaceOverlap {
                                    namespace: namespace.clone(),
                                    other: other_key,
                                    other_namespace: other.clone(),
                                },
                            );
                        }
                    }
                    expanded.push((i, namespace));
                }
            }
        }
    }
}

impl Model for HubConfig {
    const PROGRAM: super::load::Program = super::load::Program::Hub;

    fn normalize(&mut self, base: &Path) {
        resolve(base, &mut self.data_dir);
        resolve(base, &mut self.tls.ca);
        resolve(base, &mut self.tls.cert);
        resolve(base, &mut self.tls.key);
        if let Some(crl) = &mut self.tls.crl {
            resolve(base, crl);
        }
        self.broker.normalize(base, "meshbridge-hub");
    }

    fn check(&self) -> Result<(), Vec<FieldError>> {
        self.validate()
    }
}
