//! The effective config of one site: the part of the hub's routes its agent applies, pushed as TOML text in
//! a `ConfigPush` frame with a content-derived version.
//!
//! # Document
//! ```toml
//! format = 1
//! site = "line1"
//! # Priority lanes the hub delivers on (downlink and site-to-site routes with a priority); omitted if none.
//! lanes = [7]
//!
//! # Local filters the agent subscribes to and forwards to the hub (uplink and site-to-site routes).
//! # Routes sharing a filter are merged: the most permissive QoS cap and retain handling, the highest
//! # priority and the longest TTL, because the hub applies each route's own settings afterwards.
//! [[capture]]
//! filter = "handoff/#"
//! retain = "keep"
//! priority = 0
//! routes = ["handoff"]
//!
//! [[capture]]
//! filter = "telemetry/#"
//! qos = 1
//! retain = "keep"
//! priority = 0
//! routes = ["telemetry"]
//!
//! # Local topics the hub may deliver into (downlink and site-to-site routes), as filters: an agent may
//! # refuse a Downlink entry outside them. Informational otherwise; the hub has already applied QoS, retain
//! # and the topic template.
//! [[accept]]
//! filter = "cmd/#"
//! routes = ["commands"]
//! ```
//!
//! Entries are sorted by filter and route names within an entry are sorted, so the same routes written in
//! another order give the same text.
//!
//! # Version
//! [`version_of`] is the SipHash-2-4 ([`crate::hash`]) of the exact text, or 1 if that is 0 (0 means "no
//! config" on the wire). The text is a pure function of the sites and routes, so hubs reading the same file
//! agree, a restart does not change it, and an agent can check a push by hashing what it received.
//!
//! # Bootstrap
//! An agent's own file still lists `[[routes]]` filters. They are its bootstrap config
//! ([`EffectiveConfig::bootstrap`], version 0): used only until a config has been pushed, after which the
//! last-good pushed config (kept in `data_dir`) wins, on every start, even while the hub is unreachable.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::agent::Route;
use super::hub::HubConfig;
use super::load::{load_text, ConfigError, Model};
use super::route::{RetainHandling, RouteKind, MAX_PRIORITY, MAX_TTL, MIN_TTL};
use super::validate::{check_site_name, check_topic_filter, FieldError, Problem, Report};
use crate::hash::stable_hash;
use crate::policy::route::{CompiledRoute, RouteTable};
use crate::topic::{TemplateVars, TopicFilter};

/// The document format this build writes and reads.
pub const EFFECTIVE_FORMAT: u32 = 1;

/// One site's effective config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EffectiveConfig {
    /// Document format; [`EFFECTIVE_FORMAT`].
    pub format: u32,
    /// The site it is for.
    pub site: String,
    /// Priority lanes above 0 the hub delivers to this site on (downlink and site-to-site routes with a
    /// `priority`; see `crate::link::lane`): the agent keeps a connection open for each, because the hub
    /// queues such a message for its lane's connection only. Sorted, without duplicates; omitted when empty,
    /// so a config without priorities keeps the text (and version) it always had.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lanes: Vec<u8>,
    /// Local filters to capture and forward to the hub.
    #[serde(default)]
    pub capture: Vec<Capture>,
    /// Local topics the hub may deliver into.
    #[serde(default)]
    pub accept: Vec<Accept>,
}

/// A local filter the agent captures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capture {
    /// MQTT filter on the site broker.
    pub filter: String,
    /// QoS cap for the local subscription and the queue; unset keeps each message's QoS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<u8>,
    /// Retained message handling at capture (`drop`: retained messages need not be forwarded at all).
    #[serde(default)]
    pub retain: RetainHandling,
    /// Queue priority, 0..=9.
    #[serde(default)]
    pub priority: u8,
    /// Messages older than this need not be sent; unset: the queue's `max_age` only.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub ttl: Option<Duration>,
    /// Names of the hub routes this capture serves (for logs).
    #[serde(default)]
    pub routes: Vec<String>,
}

/// Local topics the hub may deliver into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Accept {
    /// MQTT filter covering the delivered topics.
    pub filter: String,
    /// Names of the hub routes delivering there.
    #[serde(default)]
    pub routes: Vec<String>,
}

/// A config ready to push: its version and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedConfig {
    /// [`version_of`] the text; never 0.
    pub version: u64,
    /// The TOML document.
    pub toml: String,
}

/// The version of a pushed config text: its stable hash, never 0.
#[must_use]
pub fn version_of(text: &str) -> u64 {
    match stable_hash(text.as_bytes()) {
        0 => 1,
        v => v,
    }
}

impl EffectiveConfig {
    /// The effective config of `site` under a compiled route table, or `None` for an unknown site.
    #[must_use]
    pub fn for_site(table: &RouteTable, site: &str) -> Option<Self> {
        let idx = table.sites().iter().position(|s| s.name == site)?;
        let mut capture: Vec<Capture> = Vec::new();
        let mut accept: Vec<Accept> = Vec::new();
        let mut lanes: Vec<u8> = Vec::new();
        for route in table.routes() {
            let delivered_here = matches!(route.kind, RouteKind::Downlink | RouteKind::SiteToSite)
                && route.to.binary_search(&idx).is_ok()
                && (route.kind == RouteKind::Downlink || route.from.iter().any(|&o| o != idx));
            if delivered_here && route.priority > 0 {
                lanes.push(route.priority);
            }
            let captured_here = route.from.binary_search(&idx).is_ok();
            match route.kind {
                RouteKind::Uplink if captured_here => merge_capture(&mut capture, route),
                RouteKind::SiteToSite => {
                    // Only worth capturing if some destination is another site.
                    if captured_here && route.to.iter().any(|&t| t != idx) {
                        merge_capture(&mut capture, route);
                    }
                    if route.to.binary_search(&idx).is_ok() {
                        for &origin in route.from.iter().filter(|&&o| o != idx) {
                            let filter = accept_filter(route, &table.sites()[origin].name);
                            merge_accept(&mut accept, filter, &route.name);
                        }
                    }
                }
                RouteKind::Downlink if route.to.binary_search(&idx).is_ok() => {
                    let filter = accept_filter(route, site);
                    merge_accept(&mut accept, filter, &route.name);
                }
                _ => {}
            }
        }
        capture.sort_by(|a, b| a.filter.cmp(&b.filter));
        accept.sort_by(|a, b| a.filter.cmp(&b.filter));
        for c in &mut capture {
            c.routes.sort();
        }
        for a in &mut accept {
            a.routes.sort();
        }
        lanes.sort_unstable();
        lanes.dedup();
        Some(Self {
            format: EFFECTIVE_FORMAT,
            site: site.to_owned(),
            lanes,
            capture,
            accept,
        })
    }

    /// The effective config of every site of a hub config, in site order, or every problem of the config.
    ///
    /// # Errors
    /// The problems `HubConfig::validate` reports.
    pub fn for_all_sites(config: &HubConfig) -> Result<Vec<Self>, Vec<FieldError>> {
        let table = RouteTable::new(config)?;
        Ok(table
            .sites()
            .iter()
            .filter_map(|s| Self::for_site(&table, &s.name))
            .collect())
    }

    /// The bootstrap config an agent runs before any push: its own file's `[[routes]]` as captures.
    #[must_use]
    pub fn bootstrap(site: &str, routes: &[Route]) -> Self {
        Self {
            format: EFFECTIVE_FORMAT,
            site: site.to_owned(),
            lanes: Vec::new(),
            capture: routes
                .iter()
                .map(|r| Capture {
                    filter: r.filter.clone(),
                    qos: r.qos,
                    retain: if r.retain {
                        RetainHandling::Keep
                    } else {
                        RetainHandling::Clear
                    },
                    priority: 0,
                    ttl: None,
                    routes: Vec::new(),
                })
                .collect(),
            accept: Vec::new(),
        }
    }

    /// The canonical TOML text.
    #[must_use]
    pub fn to_toml(&self) -> String {
        toml::to_string(self)
            .expect("invariant: plain strings, integers and lists always serialize")
    }

    /// The text and version to send in a `ConfigPush`.
    #[must_use]
    pub fn to_push(&self) -> PushedConfig {
        let toml = self.to_toml();
        PushedConfig {
            version: version_of(&toml),
            toml,
        }
    }

    /// Parses and validates a pushed document (the agent side). Refuse the push with the error's text as the
    /// reason if this fails; every validation problem is listed.
    ///
    /// # Errors
    /// [`ConfigError::Parse`] (not TOML, unknown key, wrong type) or [`ConfigError::Invalid`].
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        load_text(text, Path::new("/"))
    }

    /// Reports every problem in the document, each with its key path.
    pub fn validate(&self) -> Result<(), Vec<FieldError>> {
        let mut report = Report::default();
        report.int_range(
            "format",
            self.format.into(),
            EFFECTIVE_FORMAT.into(),
            EFFECTIVE_FORMAT.into(),
        );
        if let Err(reason) = check_site_name(&self.site) {
            report.push(
                "site",
                Problem::InvalidSiteName {
                    name: self.site.clone(),
                    reason,
                },
            );
        }
        for (i, c) in self.capture.iter().enumerate() {
            let key = format!("capture[{i}]");
            check_filter(&mut report, &format!("{key}.filter"), &c.filter);
            if let Some(first) = self.capture[..i].iter().position(|o| o.filter == c.filter) {
                report.push(
                    format!("{key}.filter"),
                    Problem::Duplicate {
                        first: format!("capture[{first}].filter"),
                    },
                );
            }
            if let Some(qos) = c.qos {
                report.int_range(&format!("{key}.qos"), qos.into(), 0, 2);
            }
            report.int_range(
                &format!("{key}.priority"),
                c.priority.into(),
                0,
                MAX_PRIORITY.into(),
            );
            if let Some(ttl) = c.ttl {
                report.duration_range(&format!("{key}.ttl"), ttl, MIN_TTL, MAX_TTL);
            }
        }
        for (i, a) in self.accept.iter().enumerate() {
            check_filter(&mut report, &format!("accept[{i}].filter"), &a.filter);
        }
        for (i, &lane) in self.lanes.iter().enumerate() {
            report.int_range(&format!("lanes[{i}]"), lane.into(), 1, MAX_PRIORITY.into());
        }
        report.finish()
    }

    /// Whether the hub may deliver `topic` here (it matches an `accept` filter).
    #[must_use]
    pub fn accepts(&self, topic: &str) -> bool {
        self.accept
            .iter()
            .any(|a| TopicFilter::parse(&a.filter).is_ok_and(|f| f.matches_str(topic)))
    }
}

fn check_filter(report: &mut Report, key: &str, filter: &str) {
    if let Err(reason) = check_topic_filter(filter) {
        report.push(
            key,
            Problem::InvalidTopicFilter {
                filter: filter.to_owned(),
                reason,
            },
        );
    }
}

impl Model for EffectiveConfig {
    // Only ever loaded from pushed text, never with environment overrides; the agent is its reader.
    const PROGRAM: super::load::Program = super::load::Program::Agent;

    fn normalize(&mut self, _base: &Path) {}

    fn check(&self) -> Result<(), Vec<FieldError>> {
        self.validate()
    }
}

/// Adds a route's capture, merging with an entry for the same filter: the most permissive settings win,
/// since the hub applies each route's own afterwards.
fn merge_capture(capture: &mut Vec<Capture>, route: &CompiledRoute) {
    let qos = route.qos.map(u8::from);
    let filter = route.filter.as_str();
    match capture.iter_mut().find(|c| c.filter == filter) {
        Some(c) => {
            c.qos = c.qos.zip(qos).map(|(a, b)| a.max(b));
            c.retain = c.retain.min(route.retain);
            c.priority = c.priority.max(route.priority);
            c.ttl = c.ttl.zip(route.ttl).map(|(a, b)| a.max(b));
            if !c.routes.contains(&route.name) {
                c.routes.push(route.name.clone());
            }
        }
        None => capture.push(Capture {
            filter: filter.to_owned(),
            qos,
            retain: route.retain,
            priority: route.priority,
            ttl: route.ttl,
            routes: vec![route.name.clone()],
        }),
    }
}

fn merge_accept(accept: &mut Vec<Accept>, filter: String, route: &str) {
    match accept.iter_mut().find(|a| a.filter == filter) {
        Some(a) => {
            if !a.routes.iter().any(|r| r == route) {
                a.routes.push(route.to_owned());
            }
        }
        None => accept.push(Accept {
            filter,
            routes: vec![route.to_owned()],
        }),
    }
}

/// A filter covering every local topic `route` can deliver for messages from (or, for downlink, to)
/// `site`: the template with `{topic}` replaced by the route's filter. When that is not a valid filter
/// (`{topic}` inside a level, or followed by more levels after a `#`), the literal levels before the first
/// placeholder followed by `#`: wider, never narrower.
fn accept_filter(route: &CompiledRoute, site: &str) -> String {
    let vars = TemplateVars {
        topic: route.filter.as_str(),
        site,
        namespace: "",
    };
    let exact = route.template.substitute(vars);
    if TopicFilter::parse(&exact).is_ok() {
        return exact;
    }
    let text = route.template.as_str();
    let literal = &text[..text.find('{').unwrap_or(text.len())];
    match literal.rfind('/') {
        Some(cut) => format!("{}/#", &literal[..cut]),
        None => "#".to_owned(),
    }
}
