//! The hub's metrics (Prometheus, `metrics.listen`; see the README's metrics table).
//!
//! Per-site event counters live in each [`crate::agent_conn::Site`], cloned out of their families once, so
//! a batch adds to atomics and nothing else; connection and downlink state is read when a scrape renders.

use std::sync::{Mutex, PoisonError};

use meshbridge_metrics::{set, Registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::agent_conn::Hub;

/// A site as a label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SiteLabel {
    site: String,
}

/// A site's downlink queue (one per priority lane) as labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct QueueLabel {
    site: String,
    lane: String,
}

/// One site's event counters.
#[derive(Debug, Clone, Default)]
pub(crate) struct SiteCounters {
    /// Entries received from the site's agents (duplicates included).
    pub(crate) received: Counter,
    /// Entries dropped as duplicates by the link's (origin, seq) dedup.
    pub(crate) duplicates: Counter,
    /// Messages handed to the cloud broker.
    pub(crate) forwarded: Counter,
    /// Entries refused for good (dead-lettered at the agent).
    pub(crate) refused: Counter,
    /// Agent connections admitted.
    pub(crate) connects: Counter,
    /// Connections the downlink's stuck-link watchdog closed (`downlink.ack_timeout`).
    pub(crate) downlink_stalls: Counter,
    /// Pushed configs the site's agent applied.
    pub(crate) configs_applied: Counter,
    /// Pushed configs the site's agent refused.
    pub(crate) configs_refused: Counter,
    /// When the certificate of the site's last admitted agent expires.
    pub(crate) cert_expiry: CertExpiry,
}

/// A site's certificate-expiry gauge, created when first set: a site no agent has connected for has no
/// series (a 0 would read as "expired in 1970" to an alert on it).
#[derive(Debug, Clone, Default)]
pub(crate) struct CertExpiry {
    family: Family<SiteLabel, Gauge>,
    site: String,
}

impl CertExpiry {
    /// Sets the expiry, Unix seconds.
    pub(crate) fn set(&self, not_after: i64) {
        let gauge = self.family.get_or_create(&SiteLabel {
            site: self.site.clone(),
        });
        gauge.set(not_after);
    }
}

/// A site and what became of a pushed config, as labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PushLabel {
    site: String,
    result: &'static str,
}

/// An outcome as a label (`outcome` or `result`, per family).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabel {
    outcome: &'static str,
}

/// What the QUIC accept loop counts (see `crate::accept`).
#[derive(Debug, Clone, Default)]
pub(crate) struct AcceptCounters {
    /// Attempts given a handshake.
    pub(crate) handshake: Counter,
    /// Attempts answered with a QUIC Retry (address validation).
    pub(crate) retry: Counter,
    /// Validated attempts refused: too many handshakes in flight.
    pub(crate) refused_busy: Counter,
    /// Validated attempts refused: their source has too many handshakes in flight.
    pub(crate) refused_source: Counter,
    /// Handshakes that completed.
    pub(crate) completed: Counter,
    /// Handshakes that failed (TLS refusal, wrong certificate, peer gone).
    pub(crate) failed: Counter,
    /// Handshakes dropped at `listen.handshake_timeout`.
    pub(crate) timed_out: Counter,
    /// Completed handshakes closed because `listen.max_connections` agents were connected.
    pub(crate) over_limit: Counter,
    /// Handshakes in flight now.
    pub(crate) in_flight: Gauge,
}

/// Every metric of the hub.
#[derive(Debug)]
pub(crate) struct HubMetrics {
    registry: Registry,
    received: Family<SiteLabel, Counter>,
    duplicates: Family<SiteLabel, Counter>,
    forwarded: Family<SiteLabel, Counter>,
    refused: Family<SiteLabel, Counter>,
    connects: Family<SiteLabel, Counter>,
    downlink_stalls: Family<SiteLabel, Counter>,
    config_pushes: Family<PushLabel, Counter>,
    connected: Family<SiteLabel, Gauge>,
    downlink_depth: Family<QueueLabel, Gauge>,
    cloud_broker_connected: Gauge,
    config_offered: Family<SiteLabel, Gauge>,
    config_applied: Family<SiteLabel, Gauge>,
    cert_expiry: Family<SiteLabel, Gauge>,
    quic_attempts: Family<OutcomeLabel, Counter>,
    quic_handshakes: Family<OutcomeLabel, Counter>,
    handshakes_in_flight: Gauge,
    /// The embedded cloud broker's refusals (`broker/src/auth.rs`) and their metrics.
    auth: std::sync::Arc<meshbridge_broker::auth::AuthCounters>,
    auth_metrics: meshbridge_metrics::BrokerAuthMetrics,
    /// The embedded cloud broker's subscriber pressure (see `cloud-hub/src/publisher.rs`), once started.
    pressure: std::sync::OnceLock<std::sync::Arc<meshbridge_broker::embedded::SubscriberPressure>>,
    pressure_held: Gauge,
    subscriber_lost: Counter,
    rendering: Mutex<()>,
}

impl HubMetrics {
    /// Registers every metric.
    pub(crate) fn new() -> Self {
        let mut registry = meshbridge_metrics::registry("cloud-hub", env!("CARGO_PKG_VERSION"));
        let auth_metrics =
            meshbridge_metrics::BrokerAuthMetrics::register(&mut registry, "embedded cloud broker");
        let m = Self {
            registry: Registry::default(),
            received: Family::default(),
            duplicates: Family::default(),
            forwarded: Family::default(),
            refused: Family::default(),
            connects: Family::default(),
            downlink_stalls: Family::default(),
            config_pushes: Family::default(),
            connected: Family::default(),
            downlink_depth: Family::default(),
            cloud_broker_connected: Gauge::default(),
            config_offered: Family::default(),
            config_applied: Family::default(),
            cert_expiry: Family::default(),
            quic_attempts: Family::default(),
            quic_handshakes: Family::default(),
            handshakes_in_flight: Gauge::default(),
            auth: std::sync::Arc::default(),
            auth_metrics,
            pressure: std::sync::OnceLock::new(),
            pressure_held: Gauge::default(),
            subscriber_lost: Counter::default(),
            rendering: Mutex::new(()),
        };
        registry.register(
            "messages_received",
            "Entries received from a site's agents, duplicates included",
            m.received.clone(),
        );
        registry.register(
            "messages_duplicate",
            "Entries dropped by the link's dedup (a resend after a lost ack or a restart)",
            m.duplicates.clone(),
        );
        registry.register(
            "messages_forwarded",
            "Messages handed to the cloud broker",
            m.forwarded.clone(),
        );
        registry.register(
            "messages_refused",
            "Entries refused for good (too large, invalid topic once mapped): dead-lettered at the agent",
            m.refused.clone(),
        );
        registry.register(
            "agent_connects",
            "Agent connections admitted; more than one per agent means reconnects",
            m.connects.clone(),
        );
        registry.register(
            "downlink_stalls",
            "Agent connections the downlink's stuck-link watchdog closed: downlink unacknowledged for downlink.ack_timeout",
            m.downlink_stalls.clone(),
        );
        registry.register(
            "agents_connected",
            "Live agent connections (one per agent and priority lane)",
            m.connected.clone(),
        );
        registry.register(
            "downlink_queue_depth_messages",
            "Messages waiting at the hub for a site's agent, per priority lane",
            m.downlink_depth.clone(),
        );
        registry.register(
            "cloud_broker_connected",
            "1 while the hub's publisher is connected to the cloud broker",
            m.cloud_broker_connected.clone(),
        );
        registry.register(
            "config_pushes",
            "Pushed configs a site's agent answered: result=applied, or result=refused (it keeps its previous one)",
            m.config_pushes.clone(),
        );
        registry.register(
            "site_config_offered_version",
            "Version of the config the hub's routes make for a site (0: the hub declares no routes)",
            m.config_offered.clone(),
        );
        registry.register(
            "site_config_applied_version",
            "Version of the config a site's agent last reported in force (absent until it connected); behind the offered version while a push is pending or was refused",
            m.config_applied.clone(),
        );
        registry.register(
            "site_certificate_expiry_timestamp_seconds",
            "When the certificate of the site's last admitted agent expires (Unix seconds; absent until one connected); renew with cloud-hub pki renew-site",
            m.cert_expiry.clone(),
        );
        registry.register(
            "quic_attempts",
            "QUIC connection attempts by what the hub did: outcome=handshake, retry (address validation under load), refused_busy, refused_source",
            m.quic_attempts.clone(),
        );
        registry.register(
            "quic_handshakes",
            "QUIC handshakes by how they ended: outcome=completed, failed, timed_out, over_connection_limit (closed: listen.max_connections reached)",
            m.quic_handshakes.clone(),
        );
        registry.register(
            "quic_handshakes_in_flight",
            "QUIC handshakes in progress",
            m.handshakes_in_flight.clone(),
        );
        registry.register(
            "cloud_broker_subscribers_held",
            "1 while the hub holds new messages because a subscriber of its embedded cloud broker is falling behind (the agents' queues take the wait)",
            m.pressure_held.clone(),
        );
        registry.register(
            "cloud_broker_subscriber_messages_lost",
            "Messages subscribers of the embedded cloud broker missed because its log dropped them unread (QoS 0 subscriptions, disconnected persistent sessions, a subscriber that read nothing for 5 s)",
            m.subscriber_lost.clone(),
        );
        Self { registry, ..m }
    }

    /// Reports the embedded cloud broker's subscriber pressure from now on (`None`: external broker).
    pub(crate) fn watch_pressure(
        &self,
        pressure: Option<std::sync::Arc<meshbridge_broker::embedded::SubscriberPressure>>,
    ) {
        if let Some(pressure) = pressure {
            let _ = self.pressure.set(pressure);
        }
    }

    /// The counters the embedded cloud broker's password file and ACL move.
    pub(crate) fn auth_counters(&self) -> std::sync::Arc<meshbridge_broker::auth::AuthCounters> {
        std::sync::Arc::clone(&self.auth)
    }

    /// The accept loop's counters (every outcome listed at 0 from the start).
    pub(crate) fn accept(&self) -> AcceptCounters {
        // One statement each (see `site`).
        let attempt = |outcome| {
            let counter = self
                .quic_attempts
                .get_or_create(&OutcomeLabel { outcome })
                .clone();
            counter
        };
        let handshake = |outcome| {
            let counter = self
                .quic_handshakes
                .get_or_create(&OutcomeLabel { outcome })
                .clone();
            counter
        };
        AcceptCounters {
            handshake: attempt("handshake"),
            retry: attempt("retry"),
            refused_busy: attempt("refused_busy"),
            refused_source: attempt("refused_source"),
            completed: handshake("completed"),
            failed: handshake("failed"),
            timed_out: handshake("timed_out"),
            over_limit: handshake("over_connection_limit"),
            in_flight: self.handshakes_in_flight.clone(),
        }
    }

    /// The event counters of `site` (created at 0).
    pub(crate) fn site(&self, site: &str) -> SiteCounters {
        let label = SiteLabel {
            site: site.to_owned(),
        };
        // Listed at 0 from the start, not only once an agent connected.
        let _ = self.connected.get_or_create(&label);
        // One statement each: a family's handle holds its read lock until the statement ends, and a
        // second `get_or_create` in the same expression would wait for it to insert (a deadlock).
        let pushes = |result| {
            let counter = self
                .config_pushes
                .get_or_create(&PushLabel {
                    site: site.to_owned(),
                    result,
                })
                .clone();
            counter
        };
        SiteCounters {
            received: self.received.get_or_create(&label).clone(),
            duplicates: self.duplicates.get_or_create(&label).clone(),
            forwarded: self.forwarded.get_or_create(&label).clone(),
            refused: self.refused.get_or_create(&label).clone(),
            connects: self.connects.get_or_create(&label).clone(),
            downlink_stalls: self.downlink_stalls.get_or_create(&label).clone(),
            configs_applied: pushes("applied"),
            configs_refused: pushes("refused"),
            cert_expiry: CertExpiry {
                family: self.cert_expiry.clone(),
                site: site.to_owned(),
            },
        }
    }

    /// Reads the connection and queue state from `hub`, then encodes everything.
    pub(crate) fn render(&self, hub: &Hub) -> String {
        let _one = self
            .rendering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (site, live) in hub.connections_per_site() {
            set(&self.connected.get_or_create(&SiteLabel { site }), live);
        }
        for (key, depth) in hub.downlinks.depths() {
            let (site, lane) = match key.split_once(shared::link::lane::LANE_SEPARATOR) {
                Some((site, lane)) => (site.to_owned(), lane.trim_start_matches('p').to_owned()),
                None => (key, "0".to_owned()),
            };
            set(
                &self
                    .downlink_depth
                    .get_or_create(&QueueLabel { site, lane }),
                depth,
            );
        }
        self.cloud_broker_connected
            .set(i64::from(hub.publisher.is_connected()));
        if let Some(pressure) = self.pressure.get() {
            use std::sync::atomic::Ordering::Relaxed;
            self.pressure_held
                .set(i64::from(pressure.held.load(Relaxed)));
            let lost = pressure.lost.load(Relaxed);
            // Rendering is serialised (`rendering`), so the difference is added once.
            self.subscriber_lost
                .inc_by(lost.saturating_sub(self.subscriber_lost.get()));
        }
        {
            use std::sync::atomic::Ordering::Relaxed;
            let auth = &self.auth;
            self.auth_metrics.observe(
                auth.logins_refused.load(Relaxed),
                auth.publish_denied.load(Relaxed),
                auth.subscribe_denied.load(Relaxed),
            );
        }
        let table = std::sync::Arc::clone(&hub.routes.borrow());
        for site in hub.sites.names() {
            let offered = crate::agent_conn::offer(&table, &site).map_or(0, |o| o.version);
            let applied = hub.status.config_version(&site);
            let label = SiteLabel { site };
            set(&self.config_offered.get_or_create(&label), offered);
            if let Some(applied) = applied {
                set(&self.config_applied.get_or_create(&label), applied);
            }
        }
        meshbridge_metrics::render(&self.registry)
    }
}
