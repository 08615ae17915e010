//! Which local messages go up, and how: the configured routes, validated once through `shared::topic` and
//! matched against `&str` topics with `TopicFilter::matches_str` (no allocation per message on the hot path).

use std::sync::{Arc, RwLock};

use shared::config::{EffectiveConfig, RetainHandling};
use shared::envelope::QoS;
use shared::topic::TopicFilter;
use tokio::sync::watch;

use crate::error::AgentError;

/// What a matching route does to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rule {
    /// Highest QoS carried upstream; `None` keeps the message's own.
    pub(crate) qos_cap: Option<QoS>,
    /// Keep the retain flag.
    pub(crate) retain: bool,
    /// The priority lane the message is queued in (see [`crate::lanes`]).
    pub(crate) lane: u8,
}

impl Rule {
    /// The QoS the message is forwarded with.
    pub(crate) fn qos(self, published: QoS) -> QoS {
        self.qos_cap.map_or(published, |cap| published.min(cap))
    }
}

/// The uplink routes in config order; the first match decides.
#[derive(Debug, Clone)]
pub(crate) struct Routes {
    routes: Vec<(TopicFilter, Rule)>,
    /// The lanes above 0 the config uses: its captures' priorities and the lanes the hub delivers on.
    lanes: Vec<u8>,
}

impl Routes {
    /// Validates and compiles the routes of an agent's own file (the tests' shorthand for
    /// [`Self::from_effective`] of the bootstrap config).
    #[cfg(test)]
    pub(crate) fn new(routes: &[shared::config::Route]) -> Result<Self, AgentError> {
        let routes = routes
            .iter()
            .map(|route| {
                let filter = TopicFilter::parse(&route.filter).map_err(|source| {
                    AgentError::InvalidRoute {
                        filter: route.filter.clone(),
                        source,
                    }
                })?;
                let qos_cap = route.qos.and_then(|q| QoS::try_from(q).ok());
                Ok((
                    filter,
                    Rule {
                        qos_cap,
                        retain: route.retain,
                        lane: 0,
                    },
                ))
            })
            .collect::<Result<_, AgentError>>()?;
        Ok(Self {
            routes,
            lanes: Vec::new(),
        })
    }

    /// The rule of the first route whose filter matches `topic`.
    pub(crate) fn decide(&self, topic: &str) -> Option<Rule> {
        self.routes
            .iter()
            .find(|(filter, _)| filter.matches_str(topic))
            .map(|(_, rule)| *rule)
    }

    /// The lanes above 0 this config needs open (sorted, no duplicates).
    pub(crate) fn lanes(&self) -> &[u8] {
        &self.lanes
    }

    /// The route filters, for subscribing to an external broker.
    pub(crate) fn filters(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|(filter, _)| filter.as_str())
    }

    /// The captures of a config pushed by the hub (or the bootstrap one made from the agent's own file).
    /// The hub applies each route's own QoS cap and retain handling again when it routes, so a capture
    /// only needs to be at least as permissive as its routes: a retain-dropping route still captures the
    /// message, and the hub drops it.
    pub(crate) fn from_effective(config: &EffectiveConfig) -> Result<Self, AgentError> {
        let routes = config
            .capture
            .iter()
            .map(|capture| {
                let filter = TopicFilter::parse(&capture.filter).map_err(|source| {
                    AgentError::InvalidRoute {
                        filter: capture.filter.clone(),
                        source,
                    }
                })?;
                Ok((
                    filter,
                    Rule {
                        qos_cap: capture.qos.and_then(|q| QoS::try_from(q).ok()),
                        retain: capture.retain != RetainHandling::Clear,
                        lane: capture.priority,
                    },
                ))
            })
            .collect::<Result<_, AgentError>>()?;
        let mut lanes: Vec<u8> = config
            .capture
            .iter()
            .map(|c| c.priority)
            .chain(config.lanes.iter().copied())
            .filter(|&l| l > 0)
            .collect();
        lanes.sort_unstable();
        lanes.dedup();
        Ok(Self { routes, lanes })
    }
}

/// The routes in force, swapped whole when the hub pushes a new config, without stopping the local
/// broker, the queue or the link. Readers take a read lock for one match: uncontended, it costs a few
/// tens of nanoseconds, and a swap is rare.
#[derive(Debug)]
pub(crate) struct LiveRoutes {
    current: RwLock<Arc<Routes>>,
    /// The version of the pushed config in force (0: the bootstrap routes of the agent's own file); an
    /// external broker's subscriptions follow its changes.
    version: watch::Sender<u64>,
}

impl LiveRoutes {
    /// `routes` in force at `version`.
    pub(crate) fn new(routes: Routes, version: u64) -> Self {
        Self {
            current: RwLock::new(Arc::new(routes)),
            version: watch::Sender::new(version),
        }
    }

    /// The rule of the first route whose filter matches `topic`, in the routes in force.
    pub(crate) fn decide(&self, topic: &str) -> Option<Rule> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .decide(topic)
    }

    /// The routes in force.
    pub(crate) fn load(&self) -> Arc<Routes> {
        Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The version in force.
    pub(crate) fn version(&self) -> u64 {
        *self.version.borrow()
    }

    /// Follows version changes (external mode resubscribes on each).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Puts `routes` in force as `version`.
    pub(crate) fn replace(&self, routes: Routes, version: u64) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(routes);
        self.version.send_replace(version);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::config::Route;
    use shared::topic::TopicName;

    #[test]
    fn matching_agrees_with_shared_topic() {
        let cases: &[(&str, &str, bool)] = &[
            ("telemetry/#", "telemetry/robot5/temp", true),
            ("telemetry/#", "telemetry", true),
            ("telemetry/#", "telemetryx/a", false),
            ("telemetry/+/temp", "telemetry/robot5/temp", true),
            ("telemetry/+/temp", "telemetry/robot5/hum", false),
            ("telemetry/+", "telemetry/a/b", false),
            ("+/x", "/x", true),
            ("#", "$SYS/broker", false),
            ("+/broker", "$SYS/broker", false),
            ("$SYS/#", "$SYS/broker", true),
            ("a/b", "a/b", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("#", "a", true),
        ];
        for &(filter, topic, expected) in cases {
            let filter = TopicFilter::parse(filter).expect("valid filter");
            assert_eq!(filter.matches_str(topic), expected, "{filter} vs {topic}");
            let parsed = TopicName::parse(topic).expect("valid name");
            assert_eq!(filter.matches(&parsed), expected, "{filter} vs {topic}");
        }
    }

    #[test]
    fn first_route_decides_and_caps_qos() {
        let routes = Routes::new(&[
            Route {
                filter: "telemetry/alarms/#".into(),
                qos: Some(0),
                retain: false,
            },
            Route {
                filter: "telemetry/#".into(),
                qos: None,
                retain: true,
            },
        ])
        .expect("valid routes");
        let alarm = routes.decide("telemetry/alarms/x").expect("match");
        assert_eq!(alarm.qos(QoS::ExactlyOnce), QoS::AtMostOnce);
        assert!(!alarm.retain);
        let other = routes.decide("telemetry/t").expect("match");
        assert_eq!(other.qos(QoS::AtLeastOnce), QoS::AtLeastOnce);
        assert!(other.retain);
        assert_eq!(routes.decide("status/x"), None);
        assert_eq!(
            routes.filters().collect::<Vec<_>>(),
            ["telemetry/alarms/#", "telemetry/#"]
        );
    }
}
