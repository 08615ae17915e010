//! Which local messages go up, and how: the configured routes, validated once through `shared::topic` and
//! matched against `&str` topics with `TopicFilter::matches_str` (no allocation per message on the hot path).

use shared::config::Route;
use shared::envelope::QoS;
use shared::topic::TopicFilter;

use crate::error::AgentError;

/// What a matching route does to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rule {
    /// Highest QoS carried upstream; `None` keeps the message's own.
    pub(crate) qos_cap: Option<QoS>,
    /// Keep the retain flag.
    pub(crate) retain: bool,
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
}

impl Routes {
    /// Validates and compiles the configured routes.
    pub(crate) fn new(routes: &[Route]) -> Result<Self, AgentError> {
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
                    },
                ))
            })
            .collect::<Result<_, AgentError>>()?;
        Ok(Self { routes })
    }

    /// The rule of the first route whose filter matches `topic`.
    pub(crate) fn decide(&self, topic: &str) -> Option<Rule> {
        self.routes
            .iter()
            .find(|(filter, _)| filter.matches_str(topic))
            .map(|(_, rule)| *rule)
    }

    /// The route filters, for subscribing to an external broker.
    pub(crate) fn filters(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|(filter, _)| filter.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
