//! The agent's metrics (Prometheus, `metrics.listen`; see the README's metrics table).
//!
//! Events are counted where they happen, through handles kept per lane so the commit and uplink paths
//! add to an atomic and nothing else; state (queue depth, bytes, oldest age, retained store) is read
//! from its owner when a scrape renders ([`AgentMetrics::render`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use meshbridge_broker::sessions::Sessions;
use meshbridge_metrics::{set, Registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use shared::queue::{Queue, RetainedStore};

use crate::lanes::Lanes;

/// Why a persistent session's message was dropped, as a label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    reason: &'static str,
}

/// What became of a pushed config, as a label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ResultLabel {
    result: &'static str,
}

/// A dead letter's lane and MQTT 5 reason code (`0x95` too large, `0x90` topic invalid, ...) as labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DeadLetterLabel {
    pub(crate) lane: String,
    pub(crate) reason: String,
}

/// A priority lane as a label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LaneLabel {
    lane: String,
}

fn lane(lane: u8) -> LaneLabel {
    LaneLabel {
        lane: lane.to_string(),
    }
}

/// One lane's event counters, cloned out of their families once (a counter is an `Arc`'d atomic).
#[derive(Debug, Clone, Default)]
pub(crate) struct LaneCounters {
    /// Messages committed to the lane's queue.
    pub(crate) committed: Counter,
    /// Messages the hub acknowledged (deleted from the queue).
    pub(crate) acknowledged: Counter,
    /// Entries written to the link, resends included.
    pub(crate) sent: Counter,
    /// Configs the hub pushed that the agent applied (agent-wide: every lane's handle shares it).
    pub(crate) configs_applied: Counter,
    /// Configs the hub pushed that the agent refused (agent-wide).
    pub(crate) configs_refused: Counter,
    /// Connections the hub welcomed.
    pub(crate) connects: Counter,
    /// 1 while the lane's connection is welcomed.
    pub(crate) connected: Gauge,
    /// The protocol version the hub agreed on at the last welcome.
    pub(crate) protocol_version: Gauge,
    /// Connections the stuck-link watchdog replaced (`uplink.ack_timeout`).
    pub(crate) stalls: Counter,
    /// Messages moved to the dead-letter store, by lane and reason code (the whole family: the reason is
    /// known only when a letter is filed).
    pub(crate) dead_lettered: Family<DeadLetterLabel, Counter>,
    /// The connection's smoothed round-trip time (QUIC's estimate), in seconds.
    pub(crate) rtt: Gauge<f64, AtomicU64>,
}

/// Every metric of the agent.
#[derive(Debug)]
pub(crate) struct AgentMetrics {
    registry: Registry,
    committed: Family<LaneLabel, Counter>,
    acknowledged: Family<LaneLabel, Counter>,
    sent: Family<LaneLabel, Counter>,
    config_pushes: Family<ResultLabel, Counter>,
    connects: Family<LaneLabel, Counter>,
    connected: Family<LaneLabel, Gauge>,
    protocol_version: Family<LaneLabel, Gauge>,
    stalls: Family<LaneLabel, Counter>,
    dead_lettered: Family<DeadLetterLabel, Counter>,
    depth: Family<LaneLabel, Gauge>,
    bytes: Family<LaneLabel, Gauge>,
    oldest_age: Family<LaneLabel, Gauge>,
    expired: Family<LaneLabel, Gauge>,
    dropped: Family<LaneLabel, Gauge>,
    rtt: Family<LaneLabel, Gauge<f64, AtomicU64>>,
    drain: Family<LaneLabel, Gauge<f64, AtomicU64>>,
    /// Per lane, when the last render saw how many acknowledgements: the drain rate's base.
    acked_seen: Mutex<HashMap<u8, (Instant, u64)>>,
    refused: Counter,
    refused_seen: AtomicU64,
    retained_messages: Gauge,
    retained_bytes: Gauge,
    retained_refused: Counter,
    retained_refused_seen: AtomicU64,
    /// The embedded broker's refusals (`broker/src/auth.rs`), and their totals at the last render:
    /// logins refused, publishes denied, subscriptions denied.
    auth: Arc<meshbridge_broker::auth::AuthCounters>,
    auth_metrics: Option<meshbridge_metrics::BrokerAuthMetrics>,
    sessions: Gauge,
    sessions_online: Gauge,
    session_queued: Gauge,
    session_queued_bytes: Gauge,
    session_stored: Counter,
    session_acknowledged: Counter,
    session_dropped: Family<ReasonLabel, Counter>,
    sessions_expired: Counter,
    config_version: Gauge,
    cert_expiry: Gauge,
    /// Totals of the sessions' counters at the last render: stored, acknowledged, dropped full, dropped
    /// slow, expired.
    session_seen: [AtomicU64; 5],
    /// Serialises renders, so two scrapes never add the same delta twice.
    rendering: Mutex<()>,
}

impl AgentMetrics {
    /// Registers every metric.
    pub(crate) fn new() -> Self {
        let mut registry = meshbridge_metrics::registry("edge-agent", env!("CARGO_PKG_VERSION"));
        let m = Self {
            registry: Registry::default(),
            committed: Family::default(),
            acknowledged: Family::default(),
            sent: Family::default(),
            config_pushes: Family::default(),
            connects: Family::default(),
            connected: Family::default(),
            protocol_version: Family::default(),
            stalls: Family::default(),
            dead_lettered: Family::default(),
            depth: Family::default(),
            bytes: Family::default(),
            oldest_age: Family::default(),
            expired: Family::default(),
            dropped: Family::default(),
            rtt: Family::default(),
            drain: Family::default(),
            acked_seen: Mutex::new(HashMap::new()),
            refused: Counter::default(),
            refused_seen: AtomicU64::new(0),
            retained_messages: Gauge::default(),
            retained_bytes: Gauge::default(),
            retained_refused: Counter::default(),
            retained_refused_seen: AtomicU64::new(0),
            auth: Arc::default(),
            auth_metrics: None,
            sessions: Gauge::default(),
            sessions_online: Gauge::default(),
            session_queued: Gauge::default(),
            session_queued_bytes: Gauge::default(),
            session_stored: Counter::default(),
            session_acknowledged: Counter::default(),
            session_dropped: Family::default(),
            sessions_expired: Counter::default(),
            config_version: Gauge::default(),
            cert_expiry: Gauge::default(),
            session_seen: Default::default(),
            rendering: Mutex::new(()),
        };
        registry.register(
            "messages_committed",
            "Messages committed to the outbound queue (the publisher's PUBACK follows)",
            m.committed.clone(),
        );
        registry.register(
            "messages_acknowledged",
            "Messages the hub acknowledged (deleted from the outbound queue)",
            m.acknowledged.clone(),
        );
        registry.register(
            "uplink_connects",
            "Uplink connections the hub welcomed; more than one per lane means reconnects",
            m.connects.clone(),
        );
        registry.register(
            "uplink_stalls",
            "Uplink connections replaced by the stuck-link watchdog: batches unacknowledged for uplink.ack_timeout on a live connection",
            m.stalls.clone(),
        );
        registry.register(
            "uplink_connected",
            "1 while the lane's uplink connection is welcomed",
            m.connected.clone(),
        );
        registry.register(
            "uplink_protocol_version",
            "Agent-hub protocol version agreed at the lane's last welcome (the lower one when agent and hub are a release apart)",
            m.protocol_version.clone(),
        );
        registry.register(
            "messages_dead_lettered",
            "Messages refused for good and moved to the dead-letter store",
            m.dead_lettered.clone(),
        );
        registry.register(
            "queue_depth_messages",
            "Messages in the outbound queue not yet acknowledged by the hub",
            m.depth.clone(),
        );
        registry.register(
            "queue_bytes",
            "Bytes the outbound queue holds (counted against queue.max_bytes)",
            m.bytes.clone(),
        );
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the oldest message in the outbound queue (0 when empty)",
            m.oldest_age.clone(),
        );
        registry.register(
            "queue_expired_messages",
            "Messages dropped from the queue because they outlived queue.max_age, since it was created",
            m.expired.clone(),
        );
        registry.register(
            "queue_dropped_messages",
            "Messages dropped to make room (queue.full_policy = drop-oldest), since the queue was created",
            m.dropped.clone(),
        );
        registry.register(
            "uplink_rtt_seconds",
            "Round-trip time of the lane's connection to the hub (QUIC's smoothed estimate)",
            m.rtt.clone(),
        );
        registry.register(
            "queue_drain_estimate_seconds",
            "Time to empty the queue at the acknowledgement rate seen between the last two scrapes (+Inf: backlog and no acknowledgement)",
            m.drain.clone(),
        );
        registry.register(
            "messages_refused",
            "Messages refused at PUBLISH time because the path to the hub cannot carry them",
            m.refused.clone(),
        );
        registry.register(
            "retained_messages",
            "Retained messages the embedded broker keeps on disk",
            m.retained_messages.clone(),
        );
        registry.register(
            "retained_bytes",
            "Bytes of the retained messages kept on disk",
            m.retained_bytes.clone(),
        );
        registry.register(
            "retained_refused",
            "Retained publishes refused because the retained store was full",
            m.retained_refused.clone(),
        );
        registry.register(
            "sessions",
            "Persistent sessions (cleansession=0 / session expiry) the embedded broker keeps on disk",
            m.sessions.clone(),
        );
        registry.register(
            "sessions_online",
            "Persistent sessions whose client is connected",
            m.sessions_online.clone(),
        );
        registry.register(
            "session_messages_queued",
            "QoS 1/2 messages on disk for persistent sessions, not yet acknowledged by their subscriber",
            m.session_queued.clone(),
        );
        registry.register(
            "session_queued_bytes",
            "Bytes of the messages queued for persistent sessions",
            m.session_queued_bytes.clone(),
        );
        registry.register(
            "session_messages_stored",
            "QoS 1/2 messages stored for a persistent session (before the publisher's ack)",
            m.session_stored.clone(),
        );
        registry.register(
            "session_messages_acknowledged",
            "Deliveries to persistent sessions their subscriber acknowledged",
            m.session_acknowledged.clone(),
        );
        registry.register(
            "session_messages_dropped",
            "Messages for persistent sessions dropped: reason=full (broker.max_queued_messages / max_queued_bytes), reason=slow (QoS 0 to an online subscriber that did not read)",
            m.session_dropped.clone(),
        );
        registry.register(
            "sessions_expired",
            "Persistent sessions removed because their session expiry interval ran out",
            m.sessions_expired.clone(),
        );
        registry.register(
            "messages_sent",
            "Entries written to the link to the hub, resends on a new connection included",
            m.sent.clone(),
        );
        registry.register(
            "config_pushes",
            "Configs the hub pushed: result=applied, or result=refused (the running config stays)",
            m.config_pushes.clone(),
        );
        let auth_metrics = Some(meshbridge_metrics::BrokerAuthMetrics::register(
            &mut registry,
            "embedded broker",
        ));
        registry.register(
            "config_version",
            "Version of the routes in force: the config the hub pushed last, or the local file's (meshbridge_site_config_offered_version at the hub is what it should be)",
            m.config_version.clone(),
        );
        registry.register(
            "uplink_certificate_expiry_timestamp_seconds",
            "When the site certificate presented to the hub expires (Unix seconds); renew with cloud-hub pki renew-site, the agent picks it up without a restart",
            m.cert_expiry.clone(),
        );
        Self {
            registry,
            auth_metrics,
            ..m
        }
    }

    /// The gauge of the site certificate's expiry, set at start and at each reload of the certificate.
    pub(crate) fn certificate_expiry(&self) -> Gauge {
        self.cert_expiry.clone()
    }

    /// Where the embedded broker counts its refusals, for `broker::listeners::open`.
    pub(crate) fn auth_counters(&self) -> Arc<meshbridge_broker::auth::AuthCounters> {
        Arc::clone(&self.auth)
    }

    /// The event counters of `lane` (created at 0 the first time).
    pub(crate) fn lane(&self, l: u8) -> LaneCounters {
        let label = lane(l);
        // The reasons the hub itself refuses with (too large, topic invalid once mapped), listed at 0 from
        // the start so dashboards and alerts see the series before the first letter; a cloud broker's
        // other codes appear when they happen.
        for reason in ["0x95", "0x90"] {
            let _ = self.dead_lettered.get_or_create(&DeadLetterLabel {
                lane: l.to_string(),
                reason: reason.to_owned(),
            });
        }
        // One statement each: a family's handle holds its read lock until the statement ends, and a
        // second `get_or_create` in the same expression would wait for it to insert (a deadlock).
        let pushes = |result| {
            let counter = self
                .config_pushes
                .get_or_create(&ResultLabel { result })
                .clone();
            counter
        };
        LaneCounters {
            committed: self.committed.get_or_create(&label).clone(),
            acknowledged: self.acknowledged.get_or_create(&label).clone(),
            sent: self.sent.get_or_create(&label).clone(),
            configs_applied: pushes("applied"),
            configs_refused: pushes("refused"),
            connects: self.connects.get_or_create(&label).clone(),
            connected: self.connected.get_or_create(&label).clone(),
            protocol_version: self.protocol_version.get_or_create(&label).clone(),
            stalls: self.stalls.get_or_create(&label).clone(),
            dead_lettered: self.dead_lettered.clone(),
            rtt: self.rtt.get_or_create(&label).clone(),
        }
    }

    /// Reads the state metrics from their owners, then encodes everything.
    pub(crate) fn render(
        &self,
        lanes: &Lanes,
        limits: &shared::limits::SharedLimits,
        retained: Option<&Arc<RetainedStore>>,
        retained_refused: &AtomicU64,
        sessions: Option<&Arc<Sessions>>,
        config_version: u64,
    ) -> String {
        let _one = self
            .rendering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        set(&self.config_version, config_version);
        if let Some(auth_metrics) = &self.auth_metrics {
            let auth = &self.auth;
            auth_metrics.observe(
                auth.logins_refused.load(Ordering::Relaxed),
                auth.publish_denied.load(Ordering::Relaxed),
                auth.subscribe_denied.load(Ordering::Relaxed),
            );
        }
        let now = crate::ingest::now_ms();
        for l in lanes.all() {
            let stats = l.queue.stats();
            let label = lane(l.lane);
            set(&self.depth.get_or_create(&label), stats.depth);
            set(&self.bytes.get_or_create(&label), stats.bytes);
            set(
                &self.oldest_age.get_or_create(&label),
                stats.oldest_age(now).map_or(0, |a| a.as_secs()),
            );
            set(&self.expired.get_or_create(&label), stats.expired);
            set(&self.dropped.get_or_create(&label), stats.dropped);
            let acked = l.counters.acknowledged.get();
            let at = Instant::now();
            let before = self
                .acked_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(l.lane, (at, acked));
            let rate = before.and_then(|(then, acked_then)| {
                let secs = at.duration_since(then).as_secs_f64();
                (secs > 0.0).then(|| acked.saturating_sub(acked_then) as f64 / secs)
            });
            self.drain
                .get_or_create(&label)
                .set(drain_estimate(stats.depth, rate));
        }
        add_since(&self.refused, &self.refused_seen, limits.refused());
        if let Some(store) = retained {
            let (count, bytes) = store.stats();
            set(&self.retained_messages, count);
            set(&self.retained_bytes, bytes);
        }
        add_since(
            &self.retained_refused,
            &self.retained_refused_seen,
            retained_refused.load(Ordering::Relaxed),
        );
        if let Some(sessions) = sessions {
            let (stored, online) = sessions.counts();
            set(&self.sessions, stored as u64);
            set(&self.sessions_online, online as u64);
            let (queued, bytes) = sessions.store().totals();
            set(&self.session_queued, queued);
            set(&self.session_queued_bytes, bytes);
            let c = &sessions.counters;
            let full = self
                .session_dropped
                .get_or_create(&ReasonLabel { reason: "full" })
                .clone();
            let slow = self
                .session_dropped
                .get_or_create(&ReasonLabel { reason: "slow" })
                .clone();
            let seen = &self.session_seen;
            add_since(
                &self.session_stored,
                &seen[0],
                c.queued.load(Ordering::Relaxed),
            );
            add_since(
                &self.session_acknowledged,
                &seen[1],
                c.acknowledged.load(Ordering::Relaxed),
            );
            add_since(&full, &seen[2], c.dropped_full.load(Ordering::Relaxed));
            add_since(&slow, &seen[3], c.dropped_slow.load(Ordering::Relaxed));
            add_since(
                &self.sessions_expired,
                &seen[4],
                c.expired.load(Ordering::Relaxed),
            );
        }
        meshbridge_metrics::render(&self.registry)
    }
}

/// Seconds to drain `depth` messages at `rate` per second: 0 when empty, +Inf with a backlog and no
/// acknowledgements, and `None` (no rate yet, the first scrape) counted as no progress.
fn drain_estimate(depth: u64, rate: Option<f64>) -> f64 {
    match (depth, rate) {
        (0, _) => 0.0,
        (_, Some(rate)) if rate > 0.0 => depth as f64 / rate,
        _ => f64::INFINITY,
    }
}

/// Adds to `counter` what a running total grew by since the last render.
fn add_since(counter: &Counter, seen: &AtomicU64, total: u64) {
    let before = seen.swap(total, Ordering::Relaxed);
    counter.inc_by(total.saturating_sub(before));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_estimate_is_depth_over_rate() {
        assert_eq!(drain_estimate(0, None), 0.0);
        assert_eq!(drain_estimate(0, Some(0.0)), 0.0);
        assert_eq!(drain_estimate(500, Some(100.0)), 5.0);
        assert!(drain_estimate(500, Some(0.0)).is_infinite());
        assert!(drain_estimate(1, None).is_infinite());
    }
}
