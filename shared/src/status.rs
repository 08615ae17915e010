//! Status topics, as Mosquitto's `$SYS` tree and its bridge notifications: a retained JSON message that says
//! whether a link is up and how far behind it is, for dashboards and alerting that read MQTT rather than
//! Prometheus.
//!
//! - The hub keeps one per site in the cloud namespace, `<namespace>/$meshbridge/status` ([`SiteStatus`]).
//! - The agent keeps its own on its local broker, `$meshbridge/status` by default ([`AgentStatus`]).
//!   A `$` topic is not matched by `#` (MQTT 3.1.1 §4.7.2, 5.0 §4.7.2), so it never rides an uplink route
//!   or reaches wildcard consumers unasked.
//!
//! Both are published when their state changes and again every interval (the timestamps alone do not
//! count as a change): [`Publication`] decides, without a clock of its own.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::topic::{Namespace, TopicError, TopicName};

/// The topic level under a site's namespace (hub) or at the root of the local broker (agent).
pub const STATUS_TOPIC: &str = "$meshbridge/status";

/// The cloud topic of `namespace`'s status.
///
/// # Errors
/// [`TopicError`] if the namespace leaves no room for the status level.
pub fn site_status_topic(namespace: &Namespace) -> Result<TopicName, TopicError> {
    namespace.apply(&TopicName::parse(STATUS_TOPIC)?)
}

/// One site as the hub sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteStatus {
    /// The site.
    pub site: String,
    /// At least one agent connection of the site is admitted.
    pub connected: bool,
    /// Admitted connections (one per agent and priority lane).
    pub connections: u32,
    /// While connected, the time of this status; otherwise when the last connection ended (ms since the
    /// Unix epoch; `None` if no agent connected since the hub started).
    pub last_seen_ms: Option<u64>,
    /// Downlink messages waiting at the hub for the site, over its priority lanes.
    pub downlink_backlog: u64,
    /// The config version the site's agent last reported running (`Hello` or applied push).
    pub config_version: Option<u64>,
    /// The agent's software version, from its `Hello`.
    pub agent_version: Option<String>,
    /// The hub's software version.
    pub hub_version: String,
}

/// One priority lane of an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaneStatus {
    /// The lane (0 = default).
    pub lane: u8,
    /// Its uplink connection is welcomed by the hub.
    pub connected: bool,
    /// Messages waiting in its disk queue.
    pub queued: u64,
    /// Bytes they take.
    pub queued_bytes: u64,
    /// Age of the oldest one, in seconds (0 when empty).
    pub oldest_age_s: u64,
}

/// An agent as it sees itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The site.
    pub site: String,
    /// The agent's name (a member of a redundant pair), or the site.
    pub agent_name: String,
    /// Software version.
    pub agent_version: String,
    /// The hub it uplinks to.
    pub hub: String,
    /// Every lane's uplink is connected.
    pub connected: bool,
    /// The config version it runs.
    pub config_version: u64,
    /// Per priority lane.
    pub lanes: Vec<LaneStatus>,
    /// When this status was made (ms since the Unix epoch).
    pub at_ms: u64,
}

/// What a status compares on: its state without the timestamps.
pub trait StatusState: Serialize {
    /// A copy with the fields that change by themselves (timestamps, ages) cleared.
    #[must_use]
    fn state(&self) -> Self;
}

impl StatusState for SiteStatus {
    fn state(&self) -> Self {
        Self {
            last_seen_ms: if self.connected {
                None
            } else {
                self.last_seen_ms
            },
            ..self.clone()
        }
    }
}

impl StatusState for AgentStatus {
    fn state(&self) -> Self {
        Self {
            at_ms: 0,
            lanes: self
                .lanes
                .iter()
                .map(|l| LaneStatus {
                    oldest_age_s: 0,
                    ..l.clone()
                })
                .collect(),
            ..self.clone()
        }
    }
}

/// The JSON payload of a status.
#[must_use]
pub fn payload<S: Serialize>(status: &S) -> Vec<u8> {
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_vec(status).unwrap_or_default()
}

/// Decides when a status is published: on a change of its state, and every `interval` regardless.
#[derive(Debug, Clone)]
pub struct Publication<S> {
    interval: Duration,
    last: Option<(S, Duration)>,
}

impl<S: StatusState + PartialEq + Clone> Publication<S> {
    /// Publishes at least every `interval`.
    #[must_use]
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
        }
    }

    /// Whether `status`, seen at `now` (any monotonic clock's reading), is to be published.
    #[must_use]
    pub fn due(&self, status: &S, now: Duration) -> bool {
        match &self.last {
            None => true,
            Some((last, at)) => *last != status.state() || now.saturating_sub(*at) >= self.interval,
        }
    }

    /// Records that `status` was published at `now`.
    pub fn published(&mut self, status: &S, now: Duration) {
        self.last = Some((status.state(), now));
    }

    /// Forgets what was published (after the broker lost it, say), so the next status goes out.
    pub fn reset(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(connected: bool, last_seen_ms: Option<u64>, backlog: u64) -> SiteStatus {
        SiteStatus {
            site: "line1".into(),
            connected,
            connections: u32::from(connected),
            last_seen_ms,
            downlink_backlog: backlog,
            config_version: Some(3),
            agent_version: Some("0.1.0".into()),
            hub_version: "0.1.0".into(),
        }
    }

    #[test]
    fn published_on_change_and_on_interval_but_not_for_timestamps() {
        let mut p = Publication::new(Duration::from_secs(30));
        let s = Duration::from_secs;
        let up = site(true, Some(1_000), 0);
        assert!(p.due(&up, s(0)), "the first status goes out");
        p.published(&up, s(0));
        assert!(
            !p.due(&site(true, Some(9_000), 0), s(5)),
            "a connected site's last-seen moves by itself"
        );
        assert!(
            p.due(&site(true, Some(9_000), 4), s(5)),
            "a backlog is a change"
        );
        assert!(
            p.due(&site(false, Some(9_000), 0), s(5)),
            "so is a disconnect"
        );
        assert!(p.due(&up, s(30)), "and the interval");
        p.published(&site(false, Some(9_000), 0), s(6));
        assert!(
            p.due(&site(false, Some(12_000), 0), s(7)),
            "a new disconnect time is a change"
        );
        p.reset();
        assert!(p.due(&up, s(8)));
    }

    #[test]
    fn the_topic_is_under_the_namespace_and_the_payload_is_json() {
        let ns = Namespace::parse("acme/plant1/line1").expect("namespace");
        assert_eq!(
            site_status_topic(&ns).expect("topic").as_str(),
            "acme/plant1/line1/$meshbridge/status"
        );
        let json: serde_json::Value =
            serde_json::from_slice(&payload(&site(true, Some(5), 2))).expect("json");
        assert_eq!(json["connected"], true);
        assert_eq!(json["downlink_backlog"], 2);
        assert_eq!(json["agent_version"], "0.1.0");
    }
}
