//! The routing engine: given a message captured at a site, or one seen on the cloud broker, where does it
//! go? Pure: no I/O, no clock (dedup takes `now_ms` as a parameter).
//!
//! A [`RouteTable`] is compiled from a validated [`HubConfig`] (`[[routes]]`, see
//! [`crate::config::RouteConfig`] for the TOML shape). The hub's router calls
//! [`RouteTable::from_site`] for every message an agent forwards and [`RouteTable::from_cloud`] for every
//! message its downlink subscriptions ([`RouteTable::cloud_filters`]) receive, and acts on the
//! [`Delivery`]s: publish on the cloud broker, or queue for a site's `Downlink`.
//!
//! # Guarantees
//! - **No loops.** A message carries the places it has been ([`MeshPath`], the `meshbridge-path` user
//!   property); no place on it is ever a destination, and every delivery carries the path extended by its
//!   destination. See [`crate::policy::path`].
//! - **Namespaces.** An uplink delivery's topic always lies strictly inside the origin site's namespace (its
//!   template must start with `{namespace}/`); a downlink route only ever matches below its destination
//!   site's namespace; a site receives only what a route names it as a destination of.
//! - **No `$` topics.** Every produced topic is checked: one starting with `$` is skipped
//!   ([`SkipReason::InvalidTopic`]), whatever the templates and topics.
//! - **QoS and retain.** A delivery's QoS is the message's, capped by the route; retain follows the route's
//!   [`RetainHandling`].
//! - **One delivery per destination topic.** When several routes produce the same (target, topic), the
//!   first route in config order wins and the others are skipped ([`SkipReason::SameDestination`]), as
//!   the agent's own routes are "first match decides".

use std::collections::HashMap;
use std::time::Duration;

use thiserror::Error;

use super::dedup::Verdict;
use super::path::{MeshPath, PathError, CLOUD};
use super::route_dedup::{dedup_key, KeyInput, RouteDedups};
use crate::config::{HubConfig, RetainHandling, RouteDedupConfig, RouteKind};
use crate::envelope::{Envelope, QoS};
use crate::topic::{
    Namespace, Placeholder, TemplateVars, TopicError, TopicFilter, TopicName, TopicTemplate,
};

/// A configured site, as the table knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteEntry {
    /// Site name.
    pub name: String,
    /// Its expanded namespace.
    pub namespace: Namespace,
}

/// One compiled route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledRoute {
    /// Route name.
    pub name: String,
    /// Direction.
    pub kind: RouteKind,
    /// Indices (into [`RouteTable::sites`]) of the sites messages are captured at, ascending.
    pub from: Vec<usize>,
    /// Indices of the sites messages are delivered to, ascending.
    pub to: Vec<usize>,
    /// The filter; site-local, or below the destination namespace for downlink routes.
    pub filter: TopicFilter,
    /// The delivered topic.
    pub template: TopicTemplate,
    /// QoS cap.
    pub qos: Option<QoS>,
    /// Retained message handling.
    pub retain: RetainHandling,
    /// Priority, 0..=9.
    pub priority: u8,
    /// Time to live.
    pub ttl: Option<Duration>,
    /// Per-route dedup.
    pub dedup: Option<RouteDedupConfig>,
}

/// The placeholders each kind of route may use.
pub(crate) fn placeholders(kind: RouteKind) -> &'static [Placeholder] {
    match kind {
        RouteKind::Uplink => &[
            Placeholder::Topic,
            Placeholder::Site,
            Placeholder::Namespace,
        ],
        RouteKind::Downlink | RouteKind::SiteToSite => &[Placeholder::Topic, Placeholder::Site],
    }
}

/// The default topic template of each kind of route.
pub(crate) const fn default_template(kind: RouteKind) -> &'static str {
    match kind {
        RouteKind::Uplink => "{namespace}/{topic}",
        RouteKind::Downlink | RouteKind::SiteToSite => "{topic}",
    }
}

/// Where a delivery goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// The cloud broker.
    Cloud,
    /// A site's broker, through its agent's `Downlink`.
    Site(String),
}

impl Target {
    /// The place name of the target in a [`MeshPath`].
    #[must_use]
    pub fn place(&self) -> &str {
        match self {
            Self::Cloud => CLOUD,
            Self::Site(site) => site,
        }
    }
}

/// One message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The route that produced it.
    pub route: String,
    /// Where it goes.
    pub target: Target,
    /// The topic there: a cloud topic, or a topic on the site's broker.
    pub topic: TopicName,
    /// QoS to publish with (capped).
    pub qos: QoS,
    /// Retain flag to publish with.
    pub retain: bool,
    /// The route's priority.
    pub priority: u8,
    /// The route's time to live; see [`expires_at_ms`](Self::expires_at_ms).
    pub ttl: Option<Duration>,
    /// The path to set on the published message ([`MeshPath::set_on`]): the message's path, then the target.
    pub path: MeshPath,
}

impl Delivery {
    /// When the delivery stops being worth making, given when the message was captured (unix ms): a queue
    /// holding it for an offline site drops it after this.
    #[must_use]
    pub fn expires_at_ms(&self, captured_at_ms: u64) -> Option<u64> {
        self.ttl.map(|ttl| {
            captured_at_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
        })
    }

    /// The user properties to publish with: the message's own, with `meshbridge-path` set to [`Self::path`].
    #[must_use]
    pub fn user_properties(&self, original: &[(String, String)]) -> Vec<(String, String)> {
        let mut user = original.to_vec();
        self.path.set_on(&mut user);
        user
    }
}

/// Why a matching route produced no delivery to some destination; for counters and debug logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The destination is on the message's path: it has been there already.
    OnPath {
        /// The destination.
        target: Target,
    },
    /// The message is retained and the route drops retained messages.
    RetainedDropped,
    /// The route's dedup saw the message's key within its window.
    Duplicate,
    /// The template produced no valid topic, or a `$` topic.
    InvalidTopic {
        /// The destination.
        target: Target,
        /// Why.
        error: TopicError,
    },
    /// The path is full ([`MAX_PATH_LEN`](super::path::MAX_PATH_LEN)).
    PathFull {
        /// The destination.
        target: Target,
    },
    /// An earlier route already delivers to the same target and topic.
    SameDestination {
        /// The destination.
        target: Target,
        /// The earlier route.
        by: String,
    },
}

/// A route that matched but skipped a destination (or all of them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The route.
    pub route: String,
    /// Why.
    pub reason: SkipReason,
}

/// What to do with one message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decision {
    /// Messages to publish.
    pub deliveries: Vec<Delivery>,
    /// What matching routes left out, and why.
    pub skipped: Vec<Skipped>,
}

/// Why a whole message was refused before any route was considered.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RouteError {
    /// The origin is not a configured site (a certificate for a site removed from the config).
    #[error("unknown origin site {site:?}")]
    UnknownSite {
        /// The origin.
        site: String,
    },
    /// The topic is not a valid topic name.
    #[error("invalid topic {topic:?}: {error}")]
    InvalidTopic {
        /// The topic.
        topic: String,
        /// Why.
        error: TopicError,
    },
    /// The `meshbridge-path` property is malformed or full.
    #[error(transparent)]
    Path(#[from] PathError),
}

/// A message to route: what the engine needs of it.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    /// Its topic: site-local for [`RouteTable::from_site`], a cloud topic for [`RouteTable::from_cloud`].
    pub topic: &'a str,
    /// QoS as published.
    pub qos: QoS,
    /// Retain flag as published.
    pub retain: bool,
    /// Payload (for `topic-payload` dedup keys).
    pub payload: &'a [u8],
    /// User properties (the path, dedup properties).
    pub user: &'a [(String, String)],
    /// The origin's queue seq, if it came from an agent (for `meshbridge-id` dedup keys).
    pub seq: Option<u64>,
}

impl<'a> Message<'a> {
    /// The routing view of an envelope an agent forwarded.
    #[must_use]
    pub fn from_envelope(env: &'a Envelope) -> Self {
        Self {
            topic: &env.topic,
            qos: env.qos,
            retain: env.retain,
            payload: &env.payload,
            user: &env.properties.user,
            seq: Some(env.seq),
        }
    }
}

/// The compiled routes of a hub config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteTable {
    sites: Vec<SiteEntry>,
    by_name: HashMap<String, usize>,
    routes: Vec<CompiledRoute>,
}

impl RouteTable {
    /// Compiles the routes of a config.
    ///
    /// # Errors
    /// Every problem `HubConfig::validate` finds, if the config is not valid.
    pub fn new(config: &HubConfig) -> Result<Self, Vec<crate::config::FieldError>> {
        config.validate()?;
        crate::config::compile(config)
    }

    /// Builds a table from parts that are already checked (the config compiler).
    pub(crate) fn from_parts(sites: Vec<SiteEntry>, routes: Vec<CompiledRoute>) -> Self {
        let by_name = sites
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        Self {
            sites,
            by_name,
            routes,
        }
    }

    /// The sites, in config order.
    #[must_use]
    pub fn sites(&self) -> &[SiteEntry] {
        &self.sites
    }

    /// The compiled routes, in config order.
    #[must_use]
    pub fn routes(&self) -> &[CompiledRoute] {
        &self.routes
    }

    /// A site by name.
    #[must_use]
    pub fn site(&self, name: &str) -> Option<&SiteEntry> {
        self.by_name.get(name).map(|&i| &self.sites[i])
    }

    /// A route's dedup config by route name, for [`RouteDedups::restore`].
    #[must_use]
    pub fn dedup_config(&self, route: &str) -> Option<&RouteDedupConfig> {
        self.routes
            .iter()
            .find(|r| r.name == route)
            .and_then(|r| r.dedup.as_ref())
    }

    /// What the hub must subscribe to on the cloud broker for downlink routes: `(filter, QoS)`, one per
    /// (route, destination site), deduplicated with the highest QoS kept. Subscribing at the cap (or 2)
    /// lets the broker deliver each message at the QoS it will be forwarded with.
    #[must_use]
    pub fn cloud_filters(&self) -> Vec<(TopicFilter, QoS)> {
        let mut out: Vec<(TopicFilter, QoS)> = Vec::new();
        for route in self.routes.iter().filter(|r| r.kind == RouteKind::Downlink) {
            for &site in &route.to {
                let Ok(filter) = self.sites[site].namespace.apply_filter(&route.filter) else {
                    continue; // refused by validation; unreachable on a compiled table
                };
                let qos = route.qos.unwrap_or(QoS::ExactlyOnce);
                match out.iter_mut().find(|(f, _)| *f == filter) {
                    Some((_, q)) => *q = (*q).max(qos),
                    None => out.push((filter, qos)),
                }
            }
        }
        out
    }

    /// Routes a message captured at site `origin` (forwarded by its agent): uplink and site-to-site routes.
    ///
    /// # Errors
    /// [`RouteError`] if the origin is unknown, the topic invalid or the path malformed.
    pub fn from_site(
        &self,
        origin: &str,
        msg: &Message<'_>,
        dedups: &mut RouteDedups,
        now_ms: u64,
    ) -> Result<Decision, RouteError> {
        let Some(&origin_idx) = self.by_name.get(origin) else {
            return Err(RouteError::UnknownSite {
                site: origin.to_owned(),
            });
        };
        let topic = TopicName::parse(msg.topic).map_err(|error| RouteError::InvalidTopic {
            topic: msg.topic.to_owned(),
            error,
        })?;
        let mut path = MeshPath::from_properties(msg.user)?;
        path.visit(origin)?;
        let site = &self.sites[origin_idx];
        let mut decision = Decision::default();
        for route in &self.routes {
            if route.kind == RouteKind::Downlink
                || route.from.binary_search(&origin_idx).is_err()
                || !route.filter.matches(&topic)
            {
                continue;
            }
            let vars = TemplateVars {
                topic: topic.as_str(),
                site: &site.name,
                namespace: site.namespace.as_str(),
            };
            let targets: Vec<Target> = if route.kind == RouteKind::Uplink {
                vec![Target::Cloud]
            } else {
                route
                    .to
                    .iter()
                    .map(|&i| Target::Site(self.sites[i].name.clone()))
                    .collect()
            };
            let key = KeyInput {
                origin,
                topic: topic.as_str(),
                payload: msg.payload,
                user: msg.user,
                seq: msg.seq,
            };
            self.apply(
                route,
                msg,
                &key,
                vars,
                targets,
                &path,
                dedups,
                now_ms,
                &mut decision,
            );
        }
        Ok(decision)
    }

    /// Routes a message seen on the cloud broker: downlink routes whose filter matches it below a site's
    /// namespace. A topic outside every namespace matches nothing.
    ///
    /// # Errors
    /// [`RouteError`] if the topic is invalid or the path malformed.
    pub fn from_cloud(
        &self,
        msg: &Message<'_>,
        dedups: &mut RouteDedups,
        now_ms: u64,
    ) -> Result<Decision, RouteError> {
        let topic = TopicName::parse(msg.topic).map_err(|error| RouteError::InvalidTopic {
            topic: msg.topic.to_owned(),
            error,
        })?;
        let mut path = MeshPath::from_properties(msg.user)?;
        path.visit(CLOUD)?;
        let mut decision = Decision::default();
        // Namespaces never overlap, so at most one site's namespace holds the topic.
        let Some((site_idx, local)) = self
            .sites
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.namespace.strip(&topic).map(|local| (i, local)))
        else {
            return Ok(decision);
        };
        let site = &self.sites[site_idx];
        for route in &self.routes {
            if route.kind != RouteKind::Downlink
                || route.to.binary_search(&site_idx).is_err()
                || !route.filter.matches(&local)
            {
                continue;
            }
            let vars = TemplateVars {
                topic: local.as_str(),
                site: &site.name,
                namespace: site.namespace.as_str(),
            };
            let key = KeyInput {
                origin: CLOUD,
                topic: topic.as_str(),
                payload: msg.payload,
                user: msg.user,
                seq: msg.seq,
            };
            let targets = vec![Target::Site(site.name.clone())];
            self.apply(
                route,
                msg,
                &key,
                vars,
                targets,
                &path,
                dedups,
                now_ms,
                &mut decision,
            );
        }
        Ok(decision)
    }

    /// One matching route: retain handling, path exclusion, dedup, topic expansion.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        route: &CompiledRoute,
        msg: &Message<'_>,
        key: &KeyInput<'_>,
        vars: TemplateVars<'_>,
        targets: Vec<Target>,
        path: &MeshPath,
        dedups: &mut RouteDedups,
        now_ms: u64,
        decision: &mut Decision,
    ) {
        let skip = |decision: &mut Decision, reason| {
            decision.skipped.push(Skipped {
                route: route.name.clone(),
                reason,
            });
        };
        let retain = match (route.retain, msg.retain) {
            (RetainHandling::Drop, true) => {
                skip(decision, SkipReason::RetainedDropped);
                return;
            }
            (RetainHandling::Keep, r) => r,
            _ => false,
        };
        let mut eligible = Vec::with_capacity(targets.len());
        for target in targets {
            if path.contains(target.place()) {
                skip(decision, SkipReason::OnPath { target });
            } else {
                eligible.push(target);
            }
        }
        if eligible.is_empty() {
            return;
        }
        if let Some(config) = &route.dedup {
            if dedups.observe(&route.name, config, dedup_key(config, key), now_ms)
                == Verdict::Duplicate
            {
                skip(decision, SkipReason::Duplicate);
                return;
            }
        }
        let qos = route.qos.map_or(msg.qos, |cap| msg.qos.min(cap));
        for target in eligible {
            let site_name;
            let vars = match (&target, route.kind) {
                // A downlink's {site} is its destination, which is also the namespace's site.
                (Target::Site(name), RouteKind::Downlink) => {
                    site_name = name.clone();
                    TemplateVars {
                        site: &site_name,
                        ..vars
                    }
                }
                _ => vars,
            };
            let topic = match route.template.expand(vars) {
                Ok(topic) => topic,
                Err(error) => {
                    skip(decision, SkipReason::InvalidTopic { target, error });
                    continue;
                }
            };
            let Ok(out_path) = path.then(target.place()) else {
                skip(decision, SkipReason::PathFull { target });
                continue;
            };
            if let Some(by) = decision
                .deliveries
                .iter()
                .find(|d| d.target == target && d.topic == topic)
                .map(|d| d.route.clone())
            {
                skip(decision, SkipReason::SameDestination { target, by });
                continue;
            }
            decision.deliveries.push(Delivery {
                route: route.name.clone(),
                target,
                topic,
                qos,
                retain,
                priority: route.priority,
                ttl: route.ttl,
                path: out_path,
            });
        }
    }
}

#[cfg(test)]
mod tests;
