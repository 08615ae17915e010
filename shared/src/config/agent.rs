//! The edge agent's config: which site broker to wrap, what to send up, how to reach the hub, and how much
//! to keep on disk while the hub is unreachable.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::broker::BrokerConfig;
use super::load::{lenient, load_file, load_text, resolve, ConfigError, Model};
use super::units::{ByteSize, HostPort};
use super::validate::{check_site_name, check_topic_filter, FieldError, Problem, Report};
use crate::site::SiteId;

/// Room reserved in a frame for everything that is not message payload: frame header, batch fields and
/// per-message envelope fields (topic, properties). `uplink.max_frame_size` must be at least
/// `uplink.batch_max_bytes` plus this. Deliberately generous; `shared::wire` should confirm or tighten it.
pub const FRAME_OVERHEAD: ByteSize = ByteSize::kib(64);

/// The whole edge-agent config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Site name, for logs and the default MQTT client id. Informational: the hub identifies the site by the
    /// agent's TLS client certificate, never by this value.
    #[serde(deserialize_with = "lenient::string")]
    pub site: String,
    /// This agent's name within its site, for a redundant pair: two agents joined to one site broker, each
    /// with its own queue, both forwarding (a route's `dedup` at the hub lets each message through once).
    /// The hub keeps a link, a dedup window and a `meshbridge-id` prefix (`<site>/<agent_name>`) per name,
    /// and one of them serves the site's downlink at a time. Unset: the agent is the site's only one.
    /// The rules of a site name (1-64 of `A-Z a-z 0-9 - _ .`).
    #[serde(default)]
    pub agent_name: Option<String>,
    /// Directory for the durable queue and the last-good pushed config; relative to the config file.
    pub data_dir: PathBuf,
    /// Default `tracing` env-filter directive, used when `RUST_LOG` is not set.
    #[serde(default = "default_log", deserialize_with = "lenient::string")]
    pub log: String,
    /// `text` (default) or `json` (one object per line).
    #[serde(default)]
    pub log_format: super::LogFormat,
    /// Threads of the agent's async runtime; 0: one per core. The default is 1: a second worker mostly
    /// woke up to find nothing to steal, and on this project's 2-core test machine one worker instead of
    /// one per core cut the agent's CPU by 12 % at 1,000 msg/s and 22 % in fan-in, with the same
    /// throughput (README, "Performance"); one worker is tokio's current-thread scheduler, which cost
    /// 5–8 % less again than a multi-thread scheduler with one worker. The embedded broker's queue
    /// commits run on a worker and block it while they write; with more than one, the others go on
    /// serving the uplink and clients during a slow disk write.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: u16,
    /// The site broker the agent wraps or joins.
    pub broker: BrokerConfig,
    /// The QUIC link to the hub.
    pub uplink: UplinkConfig,
    /// The on-disk queue that holds messages until the hub acknowledges them.
    #[serde(default)]
    pub queue: QueueConfig,
    /// The Prometheus endpoint; off unless `metrics.listen` is set.
    #[serde(default)]
    pub metrics: super::MetricsConfig,
    /// The status topic (README, "Status topics").
    #[serde(default)]
    pub status: super::StatusConfig,
    /// Which local messages go up: the bootstrap config, used only until the hub has pushed one. Once a
    /// pushed config exists (kept as last-good in `data_dir`), it replaces these on every start, even while
    /// the hub is unreachable; see [`EffectiveConfig::bootstrap`](super::EffectiveConfig::bootstrap). At
    /// least one: an agent that forwards nothing before its first push is a misconfiguration.
    pub routes: Vec<Route>,
}

/// How the agent reaches the hub and paces what it sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Hub address as `host:port` (UDP); resolved at every reconnect.
    pub hub: HostPort,
    /// Name the hub's certificate must carry (DNS name or IP address).
    #[serde(deserialize_with = "lenient::string")]
    pub server_name: String,
    /// PEM CA bundle the hub's certificate must chain to; relative to the config file.
    pub ca: PathBuf,
    /// PEM certificate chain identifying this site to the hub; relative to the config file.
    pub cert: PathBuf,
    /// PEM private key of `cert`; relative to the config file.
    pub key: PathBuf,
    /// Most messages per batch (one batch = one queue read and one hub ack).
    #[serde(default = "default_batch_max_messages")]
    pub batch_max_messages: u32,
    /// Most payload bytes per batch; a single larger message still goes alone in its own batch.
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: ByteSize,
    /// Batches in flight (sent, not yet acknowledged). Bounds what is resent after a reconnect.
    #[serde(default = "default_window")]
    pub window: u32,
    /// First reconnect delay; doubles on each failure up to `reconnect_max`.
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// QUIC keep-alive interval: how long the link may be silent before the agent pings the hub, so NATs
    /// keep it open and a dead hub is noticed by `idle_timeout` even when the site sends nothing. Short by
    /// default (a ping and its ACK every 500 ms while idle, about 200 bytes/s) because it bounds how fast a
    /// dead link is noticed.
    #[serde(default = "default_uplink_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// The stuck-link watchdog: a connection on which batches stay unacknowledged this long, with no `Ack`
    /// at all, is logged, counted (`meshbridge_uplink_stalls_total`) and replaced by a new one. Longer than
    /// the hub's own 10 s limit for a cloud broker's answer, which closes the link from its side first.
    #[serde(default = "default_ack_timeout", with = "humantime_serde")]
    pub ack_timeout: Duration,
    /// QUIC idle timeout: the link is declared dead after this long without hearing from the hub, and the
    /// agent reconnects. Must exceed `keep_alive`, or an idle but healthy link is torn down between pings.
    /// The hub adopts the shorter of the two sides' timeouts. Default 2 s: with the 15 s it replaced, a hub
    /// killed and back 2 s later got data again only after 13 s (issue 7, hole 11); a restarted hub also
    /// resets old connections at once (`cloud-hub/src/endpoint_key.rs`), this is the fallback when no
    /// packet reaches it. Raise it on links that stall for seconds (QUIC never uses less than three probe
    /// timeouts, so a long round trip raises it by itself).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight batches to be acknowledged before closing the link.
    #[serde(default = "default_shutdown_timeout", with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Newest agent↔hub protocol version offered (2 or 3). Each release speaks its own version and the one
    /// before, so an agent and a hub one release apart agree on the older one by themselves; set 2 only to
    /// hold upgraded agents to it while hubs are rolled back or forward. Default: the newest this build speaks
    /// (`PROTOCOL_VERSION` in shared/src/wire/version.rs, 3).
    #[serde(default = "default_max_protocol_version")]
    pub max_protocol_version: u16,
    /// Largest frame sent or accepted on the link; must hold a full batch plus [`FRAME_OVERHEAD`], and the
    /// largest message (`max_message_size`) plus [`FRAME_OVERHEAD`].
    #[serde(default = "default_max_frame_size")]
    pub max_frame_size: ByteSize,
    /// Largest payload the agent accepts for the hub, in both broker modes. Messages the routes select
    /// that are larger are refused at PUBLISH time (MQTT 5: reason 0x83), never acknowledged and then
    /// dropped. The limit in force is the smaller of this and the hub's `limits.max_message_size`, which the
    /// hub announces when the agent connects (and the agent keeps in `data_dir`); see `shared::limits`.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: ByteSize,
}

/// Limits of the on-disk queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Most bytes the queue may hold; what happens beyond it is `full_policy`.
    #[serde(default = "default_queue_max_bytes")]
    pub max_bytes: ByteSize,
    /// Messages older than this are dropped unsent (and counted): data that old is assumed worthless.
    #[serde(default = "default_queue_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// What to do when the queue is full: `block` stops acknowledging publishers (nothing is lost, producers
    /// may stall); `drop-oldest` drops the oldest queued messages to make room (counted, never silent).
    #[serde(default)]
    pub full_policy: FullPolicy,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_queue_max_bytes(),
            max_age: default_queue_max_age(),
            full_policy: FullPolicy::default(),
        }
    }
}

/// Behaviour of a full queue: the queue's own policy type, so config and queue cannot drift apart.
pub use crate::queue::FullPolicy;

/// One uplink route: local messages matching `filter` are queued and sent to the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// MQTT topic filter on the site broker (`telemetry/#`); the hub prefixes the site's namespace.
    pub filter: String,
    /// Highest QoS carried upstream (0, 1 or 2): messages published above it are forwarded at this QoS.
    /// Unset keeps each message's own QoS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// Keep the retain flag of matching messages; `false` forwards them as ordinary messages.
    #[serde(default = "default_true")]
    pub retain: bool,
}

const fn default_worker_threads() -> u16 {
    1
}

fn default_log() -> String {
    "info".to_owned()
}
fn default_batch_max_messages() -> u32 {
    512
}
fn default_batch_max_bytes() -> ByteSize {
    ByteSize::mib(1)
}
fn default_max_protocol_version() -> u16 {
    crate::wire::PROTOCOL_VERSION
}
fn default_window() -> u32 {
    8
}
fn default_reconnect_min() -> Duration {
    Duration::from_millis(100)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(10)
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_uplink_keep_alive() -> Duration {
    Duration::from_millis(500)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_max_frame_size() -> ByteSize {
    ByteSize::mib(8)
}
fn default_max_message_size() -> ByteSize {
    ByteSize::kib(256)
}
fn default_queue_max_bytes() -> ByteSize {
    ByteSize::gib(1)
}
fn default_queue_max_age() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
const fn default_true() -> bool {
    true
}

/// Loads and validates an agent config file, with `MESHBRIDGE_*` environment overrides; relative paths in it
/// are resolved against the file's directory.
pub fn load_agent(path: &Path) -> Result<AgentConfig, ConfigError> {
    load_file(path)
}

impl AgentConfig {
    /// Parses and validates agent config text, resolving relative paths against `base_dir`. Environment
    /// overrides are not applied. (What the hub pushes is not an agent config but an
    /// [`EffectiveConfig`](super::EffectiveConfig).)
    pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        load_text(text, base_dir)
    }

    /// Reports every problem in the config, each with its key path.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut report = Report::default();
        self.status.validate(&mut report);
        report.int_range("worker_threads", self.worker_threads.into(), 0, 1024);
        if let Err(reason) = check_site_name(&self.site) {
            report.push(
                "site",
                Problem::InvalidSiteName {
                    name: self.site.clone(),
                    reason,
                },
            );
        }
        if let Some(name) = &self.agent_name {
            if let Err(reason) = SiteId::new(name) {
                report.push(
                    "agent_name",
                    Problem::InvalidAgentName {
                        name: name.clone(),
                        reason,
                    },
                );
            }
        }
        report.path("data_dir", &self.data_dir);
        report.text("log", &self.log);
        self.broker.validate("broker", &mut report);
        self.uplink.validate(&mut report);
        self.queue.validate(&mut report);
        if self.routes.is_empty() {
            report.push("routes", Problem::Empty);
        }
        for (i, route) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            if let Err(reason) = check_topic_filter(&route.filter) {
                report.push(
                    format!("{key}.filter"),
                    Problem::InvalidTopicFilter {
                        filter: route.filter.clone(),
                        reason,
                    },
                );
            }
            if let Some(first) = self.routes[..i]
                .iter()
                .position(|r| r.filter == route.filter)
            {
                report.push(
                    format!("{key}.filter"),
                    Problem::Duplicate {
                        first: format!("routes[{first}].filter"),
                    },
                );
            }
            if let Some(qos) = route.qos {
                report.int_range(&format!("{key}.qos"), qos.into(), 0, 2);
            }
        }
        report.finish()
    }
}

impl UplinkConfig {
    fn validate(&self, report: &mut Report) {
        report.text("uplink.server_name", &self.server_name);
        report.path("uplink.ca", &self.ca);
        report.path("uplink.cert", &self.cert);
        report.path("uplink.key", &self.key);
        report.int_range(
            "uplink.batch_max_messages",
            self.batch_max_messages.into(),
            1,
            65_536,
        );
        report.size_range(
            "uplink.batch_max_bytes",
            self.batch_max_bytes,
            ByteSize::kib(1),
            ByteSize::mib(256),
        );
        report.int_range("uplink.window", self.window.into(), 1, 1024);
        report.int_range(
            "uplink.max_protocol_version",
            self.max_protocol_version.into(),
            crate::wire::OLDEST_SUPPORTED.into(),
            crate::wire::PROTOCOL_VERSION.into(),
        );
        report.nonzero("uplink.reconnect_min", self.reconnect_min);
        report.nonzero("uplink.reconnect_max", self.reconnect_max);
        if self.reconnect_min > self.reconnect_max {
            report.push(
                "uplink.reconnect_min",
                Problem::ExceedsMaximum {
                    value: self.reconnect_min,
                    other: "uplink.reconnect_max".into(),
                    other_value: self.reconnect_max,
                },
            );
        }
        report.nonzero("uplink.keep_alive", self.keep_alive);
        report.duration_range(
            "uplink.ack_timeout",
            self.ack_timeout,
            Duration::from_millis(500),
            Duration::from_secs(24 * 3600),
        );
        if self.idle_timeout <= self.keep_alive {
            report.push(
                "uplink.idle_timeout",
                Problem::NotLongerThan {
                    value: self.idle_timeout,
                    other: "uplink.keep_alive".into(),
                    other_value: self.keep_alive,
                },
            );
        }
        report.nonzero("uplink.shutdown_timeout", self.shutdown_timeout);
        let needed = ByteSize(self.batch_max_bytes.0.saturating_add(FRAME_OVERHEAD.0));
        if self.max_frame_size < needed {
            report.push(
                "uplink.max_frame_size",
                Problem::SizeTooSmall {
                    value: self.max_frame_size,
                    needed,
                    reason: format!("uplink.batch_max_bytes + {FRAME_OVERHEAD} overhead"),
                },
            );
        }
        report.size_range(
            "uplink.max_message_size",
            self.max_message_size,
            ByteSize(1),
            ByteSize::mib(256),
        );
        // A message the agent accepts must fit one frame on its own, or it would wedge the queue.
        let needed = ByteSize(self.max_message_size.0.saturating_add(FRAME_OVERHEAD.0));
        if self.max_frame_size < needed {
            report.push(
                "uplink.max_frame_size",
                Problem::SizeTooSmall {
                    value: self.max_frame_size,
                    needed,
                    reason: format!("uplink.max_message_size + {FRAME_OVERHEAD} overhead"),
                },
            );
        }
        report.size_range(
            "uplink.max_frame_size",
            self.max_frame_size,
            ByteSize(0),
            ByteSize::gib(1),
        );
    }
}

impl QueueConfig {
    fn validate(&self, report: &mut Report) {
        // An empty redb file is already 1 MiB, so anything smaller could not hold a single message.
        if self.max_bytes < ByteSize::MIB {
            report.push(
                "queue.max_bytes",
                Problem::SizeTooSmall {
                    value: self.max_bytes,
                    needed: ByteSize::MIB,
                    reason: "the size of an empty queue file".into(),
                },
            );
        }
        report.nonzero("queue.max_age", self.max_age);
    }
}

impl Model for AgentConfig {
    const PROGRAM: super::load::Program = super::load::Program::Agent;

    fn normalize(&mut self, base: &Path) {
        resolve(base, &mut self.data_dir);
        resolve(base, &mut self.uplink.ca);
        resolve(base, &mut self.uplink.cert);
        resolve(base, &mut self.uplink.key);
        let default_client_id = format!("meshbridge-{}", self.site);
        self.broker.normalize(base, &default_client_id);
    }

    fn check(&self) -> Result<(), Vec<FieldError>> {
        self.validate()
    }
}

impl QueueConfig {
    /// The queue limits this config describes.
    pub fn limits(&self) -> crate::queue::QueueLimits {
        crate::queue::QueueLimits {
            max_bytes: self.max_bytes.0,
            max_age: Some(self.max_age),
            full_policy: self.full_policy,
        }
    }
}
