//! Routes, declared once in the hub's config (`[[routes]]`) and pushed to every site they concern.
//!
//! # Shape
//! ```toml
//! # Uplink: site-local `telemetry/#` from every site into its cloud namespace (acme/plant1/line1/telemetry/..).
//! [[routes]]
//! name = "telemetry"
//! kind = "uplink"
//! from = "*"                      # every site; or "line1"; or ["line1", "line2"]
//! filter = "telemetry/#"          # MQTT filter on the site broker
//! # topic = "{namespace}/{topic}" # the default; a rename must still start with "{namespace}/"
//! qos = 1                         # QoS cap: published above it, forwarded at it
//! retain = "keep"                 # keep | clear | drop
//!
//! # Downlink: cloud `acme/plant1/<site>/cmd/#` arrives at <site>'s broker as `cmd/...`.
//! [[routes]]
//! name = "commands"
//! kind = "downlink"
//! to = "*"
//! filter = "cmd/#"                # below each destination site's namespace in the cloud
//! # topic = "{topic}"             # local topic; {topic} is the cloud topic below the namespace
//! ttl = "1h"                      # undelivered after an hour (site offline): dropped
//! priority = 7
//!
//! # Site-to-site: line1's `handoff/#` arrives at line2 as `from/line1/handoff/...`.
//! [[routes]]
//! name = "handoff"
//! kind = "site-to-site"
//! from = "line1"
//! to = "line2"
//! filter = "handoff/#"
//! topic = "from/{site}/{topic}"   # {site} is the site the message was captured at
//! ```
//!
//! The fields map onto what users of MQTT bridges know: Mosquitto's `topic <pattern> <direction> <qos>
//! <local-prefix> <remote-prefix>` line becomes `filter` + `kind` + `qos` + `topic` (a prefix rewrite is
//! `topic = "remote/prefix/{topic}"`); NanoMQ's and HiveMQ Edge's per-mapping `retain_as_published` /
//! "preserve retain" flag becomes `retain = "keep"` (alias `"as-published"`) or `"clear"`.
//!
//! Directions are named from the mesh's point of view: `from` lists the sites where messages are captured,
//! `to` the sites they are delivered to. An uplink route has only `from` (its destination is the cloud), a
//! downlink route only `to` (its source is the cloud), a site-to-site route both.
//!
//! # Why downlink filters are relative
//! A downlink `filter` is matched below each destination site's namespace (`cmd/#` becomes
//! `acme/plant1/line2/cmd/#` for line2), never against the whole cloud topic tree. Namespaces are refused
//! when they overlap (see `HubConfig::validate`), so a downlink route cannot select a topic of another
//! site's namespace, and no filter can match in two namespaces at once.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::hub::HubConfig;
use super::validate::{check_site_name, FieldError, Problem, Report};
use crate::envelope::QoS;
use crate::policy::route::{default_template, placeholders, CompiledRoute, RouteTable, SiteEntry};
use crate::site::SiteId;
use crate::topic::{Namespace, TopicFilter, TopicTemplate};

/// One route of the hub config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Unique name, used in diffs, logs, counters and dedup state. Same character rules as a site name.
    pub name: String,
    /// Which way messages flow.
    pub kind: RouteKind,
    /// Sites where messages are captured (uplink and site-to-site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<SiteSelector>,
    /// Sites messages are delivered to (downlink and site-to-site).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<SiteSelector>,
    /// MQTT topic filter selecting the messages: on the source site's broker for uplink and site-to-site
    /// routes, below the destination site's namespace on the cloud broker for downlink routes.
    pub filter: String,
    /// Template of the delivered topic; see the module docs. Default `{namespace}/{topic}` for uplink,
    /// `{topic}` otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Highest QoS delivered (0, 1 or 2); a message published above it is delivered at it. Unset keeps each
    /// message's own QoS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// What happens to retained messages.
    #[serde(default)]
    pub retain: RetainHandling,
    /// 0 (lowest, the default) to 9: when a link or queue has a backlog, higher priorities go first.
    #[serde(default)]
    pub priority: u8,
    /// Longest time a message may take from its capture to its delivery (humantime, `"1h"`); an older one is
    /// dropped and counted rather than delivered late. Unset: no limit beyond the queues' own `max_age`.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    /// Drop messages whose key was seen recently on this route (a redundant pair of agents on one site
    /// broker both forward every message). Unset: only the link's own (site, seq) dedup applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<RouteDedupConfig>,
}

/// The direction of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouteKind {
    /// Site broker → cloud broker, into the site's namespace.
    Uplink,
    /// Cloud broker (below a site's namespace) → that site's broker.
    Downlink,
    /// One site's broker → other sites' brokers, through the hub.
    SiteToSite,
}

impl RouteKind {
    /// The name as written in the config.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Uplink => "uplink",
            Self::Downlink => "downlink",
            Self::SiteToSite => "site-to-site",
        }
    }
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a route does with retained messages. The names follow MQTT 5's "Retain As Published" subscription
/// option, which bridges (Mosquitto, NanoMQ, HiveMQ Edge) expose per mapping.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum RetainHandling {
    /// Deliver with the retain flag as published (`retain_as_published = true`), so the destination broker
    /// keeps the last value for late subscribers. The default, as in Mosquitto's bridge.
    #[default]
    #[serde(alias = "as-published")]
    Keep,
    /// Deliver retained messages as ordinary ones (`retain_as_published = false`).
    Clear,
    /// Do not deliver retained messages at all; only live ones pass.
    Drop,
}

impl RetainHandling {
    /// The name as written in the config.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Clear => "clear",
            Self::Drop => "drop",
        }
    }
}

/// Which sites a route names: all of them (`"*"`), or a list (`"line1"` is a list of one).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SiteSelector {
    /// Every configured site, including sites added later.
    All,
    /// These sites, by name.
    List(Vec<String>),
}

impl SiteSelector {
    /// Whether `site` is selected.
    #[must_use]
    pub fn contains(&self, site: &str) -> bool {
        match self {
            Self::All => true,
            Self::List(sites) => sites.iter().any(|s| s == site),
        }
    }
}

impl fmt::Display for SiteSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("*"),
            Self::List(sites) => f.write_str(&sites.join(",")),
        }
    }
}

impl Serialize for SiteSelector {
    /// `"*"` or a list, so a serialized config reads back identical.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::All => serializer.serialize_str("*"),
            Self::List(sites) => sites.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for SiteSelector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SelectorVisitor;

        impl<'de> Visitor<'de> for SelectorVisitor {
            type Value = SiteSelector;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"*\", a site name, or a list of site names")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<SiteSelector, E> {
                Ok(if v == "*" {
                    SiteSelector::All
                } else {
                    SiteSelector::List(vec![v.to_owned()])
                })
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<SiteSelector, A::Error> {
                let mut sites = Vec::new();
                while let Some(site) = seq.next_element::<String>()? {
                    sites.push(site);
                }
                Ok(SiteSelector::List(sites))
            }
        }

        deserializer.deserialize_any(SelectorVisitor)
    }
}

/// Per-route dedup: drop a message whose key was seen on this route within `window`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteDedupConfig {
    /// What identifies a message.
    pub key: DedupKeyKind,
    /// The user property holding the key, with `key = "property"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub property: Option<String>,
    /// How long a key is remembered.
    #[serde(default = "default_dedup_window", with = "humantime_serde")]
    pub window: Duration,
    /// Most keys remembered at once; the oldest is forgotten first (a duplicate of it then passes).
    #[serde(default = "default_dedup_max_keys")]
    pub max_keys: u32,
}

/// What a per-route dedup compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DedupKeyKind {
    /// The `meshbridge-id` user property if the message has one, else `<origin>/<seq>`.
    MeshbridgeId,
    /// A hash of the topic and payload: what a redundant pair of agents on one site broker both forward.
    TopicPayload,
    /// A user property set by the publisher (named by `property`); messages without it are not deduplicated.
    Property,
}

impl DedupKeyKind {
    /// The name as written in the config.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MeshbridgeId => "meshbridge-id",
            Self::TopicPayload => "topic-payload",
            Self::Property => "property",
        }
    }
}

pub(crate) fn default_dedup_window() -> Duration {
    Duration::from_secs(60)
}

pub(crate) const fn default_dedup_max_keys() -> u32 {
    100_000
}

/// Highest route priority.
pub const MAX_PRIORITY: u8 = 9;
/// Shortest accepted route TTL.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest accepted route TTL.
pub const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// Longest accepted dedup window.
pub const MAX_DEDUP_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most keys a per-route dedup may hold (about 24 bytes each in memory and in the snapshot).
pub const MAX_DEDUP_KEYS: u32 = 4 * 1024 * 1024;

/// Checks every route of `config` (each problem into `report`, keyed `routes[i]...`) and compiles those
/// without problems. Sites whose name or namespace is invalid are left out of the table (their own problems
/// are reported by the site checks), but their names still count as known in `from`/`to`.
pub(crate) fn compile_routes(config: &HubConfig, report: &mut Report) -> RouteTable {
    let known: Vec<&str> = config.sites.iter().map(|s| s.name.as_str()).collect();
    let mut sites: Vec<SiteEntry> = Vec::with_capacity(config.sites.len());
    let mut index_of: HashMap<&str, usize> = HashMap::new();
    for site in &config.sites {
        if index_of.contains_key(site.name.as_str()) || check_site_name(&site.name).is_err() {
            continue;
        }
        if let Ok(namespace) = Namespace::from_template(&site.namespace, &site.name) {
            index_of.insert(&site.name, sites.len());
            sites.push(SiteEntry {
                name: site.name.clone(),
                namespace,
            });
        }
    }
    let sel = Selectors {
        known: &known,
        index_of: &index_of,
        count: sites.len(),
    };
    let mut routes = Vec::with_capacity(config.routes.len());
    for (i, route) in config.routes.iter().enumerate() {
        let before = report.len();
        if let Some(compiled) = compile_route(config, i, route, &sel, &sites, report) {
            if report.len() == before {
                routes.push(compiled);
            }
        }
    }
    RouteTable::from_parts(sites, routes)
}

/// [`compile_routes`] as a result: the table, or every problem.
pub(crate) fn compile(config: &HubConfig) -> Result<RouteTable, Vec<FieldError>> {
    let mut report = Report::default();
    let table = compile_routes(config, &mut report);
    report.finish().map(|()| table)
}

struct Selectors<'a> {
    known: &'a [&'a str],
    index_of: &'a HashMap<&'a str, usize>,
    count: usize,
}

impl Selectors<'_> {
    /// Checks `from` or `to` and resolves it to ascending site indices.
    fn resolve(
        &self,
        report: &mut Report,
        key: &str,
        selector: Option<&SiteSelector>,
        needed: bool,
        kind: RouteKind,
    ) -> Vec<usize> {
        let names = match (selector, needed) {
            (None, true) => {
                report.push(
                    key,
                    Problem::Required {
                        context: format!("for {kind} routes"),
                    },
                );
                return Vec::new();
            }
            (Some(_), false) => {
                report.push(
                    key,
                    Problem::NotUsed {
                        context: format!("by {kind} routes"),
                    },
                );
                return Vec::new();
            }
            (None, false) => return Vec::new(),
            (Some(SiteSelector::All), true) => return (0..self.count).collect(),
            (Some(SiteSelector::List(names)), true) => names,
        };
        if names.is_empty() {
            report.push(key, Problem::Empty);
        }
        let mut out = Vec::with_capacity(names.len());
        for (j, name) in names.iter().enumerate() {
            if let Some(first) = names[..j].iter().position(|n| n == name) {
                report.push(
                    format!("{key}[{j}]"),
                    Problem::Duplicate {
                        first: format!("{key}[{first}]"),
                    },
                );
            } else if !self.known.contains(&name.as_str()) {
                report.push(
                    format!("{key}[{j}]"),
                    Problem::UnknownSite { name: name.clone() },
                );
            } else if let Some(&idx) = self.index_of.get(name.as_str()) {
                out.push(idx);
            }
        }
        out.sort_unstable();
        out
    }
}

fn compile_route(
    config: &HubConfig,
    i: usize,
    route: &RouteConfig,
    sel: &Selectors<'_>,
    sites: &[SiteEntry],
    report: &mut Report,
) -> Option<CompiledRoute> {
    let key = format!("routes[{i}]");
    if let Err(reason) = SiteId::new(&route.name) {
        report.push(
            format!("{key}.name"),
            Problem::InvalidRouteName {
                name: route.name.clone(),
                reason,
            },
        );
    } else if let Some(first) = config.routes[..i].iter().position(|r| r.name == route.name) {
        report.push(
            format!("{key}.name"),
            Problem::Duplicate {
                first: format!("routes[{first}].name"),
            },
        );
    }
    let kind = route.kind;
    let (needs_from, needs_to) = match kind {
        RouteKind::Uplink => (true, false),
        RouteKind::Downlink => (false, true),
        RouteKind::SiteToSite => (true, true),
    };
    let from = sel.resolve(
        report,
        &format!("{key}.from"),
        route.from.as_ref(),
        needs_from,
        kind,
    );
    let to = sel.resolve(
        report,
        &format!("{key}.to"),
        route.to.as_ref(),
        needs_to,
        kind,
    );
    let filter = match TopicFilter::parse(&route.filter) {
        Ok(filter) => Some(filter),
        Err(error) => {
            report.push(
                format!("{key}.filter"),
                Problem::InvalidTopicFilter {
                    filter: route.filter.clone(),
                    reason: error.into(),
                },
            );
            None
        }
    };
    let text = route.topic.as_deref().unwrap_or(default_template(kind));
    let template = match TopicTemplate::parse(text, placeholders(kind)) {
        Ok(template) => Some(template),
        Err(reason) => {
            report.push(
                format!("{key}.topic"),
                Problem::InvalidTemplate {
                    template: text.to_owned(),
                    reason,
                },
            );
            None
        }
    };
    if let Some(template) = &template {
        if kind == RouteKind::Uplink && !template.is_inside_namespace() {
            report.push(
                format!("{key}.topic"),
                Problem::TemplateOutsideNamespace {
                    template: text.to_owned(),
                },
            );
        }
        // `{topic}` first and a filter whose first level is a literal `$...`: every delivery would be a
        // `$` topic. (A wildcard first level never matches `$` topics, and expansion re-checks anyway.)
        if template.starts_with_topic() && route.filter.starts_with('$') {
            report.push(
                format!("{key}.filter"),
                Problem::ReservedTopic {
                    filter: route.filter.clone(),
                },
            );
        }
    }
    if let (Some(filter), RouteKind::Downlink) = (&filter, kind) {
        for &site in &to {
            if let Err(error) = sites[site].namespace.apply_filter(filter) {
                report.push(
                    format!("{key}.filter"),
                    Problem::InvalidTopicFilter {
                        filter: route.filter.clone(),
                        reason: error.into(),
                    },
                );
                break;
            }
        }
    }
    let qos = route.qos.and_then(|q| {
        report.int_range(&format!("{key}.qos"), q.into(), 0, 2);
        QoS::try_from(q).ok()
    });
    report.int_range(
        &format!("{key}.priority"),
        route.priority.into(),
        0,
        MAX_PRIORITY.into(),
    );
    if let Some(ttl) = route.ttl {
        report.duration_range(&format!("{key}.ttl"), ttl, MIN_TTL, MAX_TTL);
    }
    if let Some(dedup) = &route.dedup {
        check_dedup(report, &format!("{key}.dedup"), dedup);
    }
    Some(CompiledRoute {
        name: route.name.clone(),
        kind,
        from,
        to,
        filter: filter?,
        template: template?,
        qos,
        retain: route.retain,
        priority: route.priority,
        ttl: route.ttl,
        dedup: route.dedup.clone(),
    })
}

fn check_dedup(report: &mut Report, key: &str, dedup: &RouteDedupConfig) {
    report.duration_range(
        &format!("{key}.window"),
        dedup.window,
        Duration::from_millis(1),
        MAX_DEDUP_WINDOW,
    );
    report.int_range(
        &format!("{key}.max_keys"),
        dedup.max_keys.into(),
        1,
        MAX_DEDUP_KEYS.into(),
    );
    match (dedup.key, &dedup.property) {
        (DedupKeyKind::Property, None) => report.push(
            format!("{key}.key"),
            Problem::MissingCompanion {
                missing: format!("{key}.property"),
            },
        ),
        (DedupKeyKind::Property, Some(property)) => {
            report.text(&format!("{key}.property"), property);
        }
        (other, Some(_)) => report.push(
            format!("{key}.property"),
            Problem::NotUsed {
                context: format!("with dedup key `{}`", other.as_str()),
            },
        ),
        (_, None) => {}
    }
}
