//! Every event the hub reports about a site's messages and links, in one place (the model is Vector's
//! `internal_events`): each event is one type whose `emit` writes its log line and moves its counter
//! together, so a metric cannot drift from the log that explains it. Emitted inside the connection's
//! `tracing` span (site, agent, lane), which every log line then carries.
//!
//! A new event goes here, with its counter in `metrics.rs` and its row in the README's metrics table.

use std::time::Duration;

use tracing::{debug, error, info, warn};

use crate::metrics::SiteCounters;
use crate::publisher::Refusals;

/// One batch from an agent, through dedup and routing, handed to the cloud publisher.
pub(crate) struct BatchHandled {
    pub(crate) upto: u64,
    /// Entries the batch held.
    pub(crate) received: u64,
    /// Entries the dedup window dropped (resends).
    pub(crate) duplicates: u64,
    /// Messages handed to the cloud broker.
    pub(crate) forwarded: u64,
    /// Entries no route sends anywhere (acknowledged, not published).
    pub(crate) unroutable: u64,
    /// Entries whose origin named another site (published under this site's namespace).
    pub(crate) foreign_origin: u64,
}

impl BatchHandled {
    pub(crate) fn emit(self, counters: &SiteCounters) {
        if self.duplicates > 0 {
            debug!(
                count = self.duplicates,
                upto = self.upto,
                "replayed messages dropped by dedup"
            );
        }
        if self.unroutable > 0 {
            debug!(
                count = self.unroutable,
                "entries no route sends anywhere (or already delivered here); acknowledged"
            );
        }
        if self.foreign_origin > 0 {
            warn!(
                count = self.foreign_origin,
                "entries claimed another origin; published under this site's namespace"
            );
        }
        counters.received.inc_by(self.received);
        counters.duplicates.inc_by(self.duplicates);
        counters.forwarded.inc_by(self.forwarded);
    }
}

/// A batch's refusals, reported once, where they are handled (the agent files them as dead letters
/// before the `Ack` lets its queue forget them).
pub(crate) struct Refused<'a> {
    pub(crate) refusals: &'a Refusals,
}

impl Refused<'_> {
    pub(crate) fn emit(self, counters: &SiteCounters) {
        let refused = self.refusals;
        if refused.is_empty() {
            return;
        }
        let codes: Vec<String> = refused
            .iter()
            .map(|r| format!("{:#04x}", r.reason_code))
            .collect();
        warn!(
            count = refused.len(),
            first_seq = refused.first().map(|r| r.seq),
            reason_codes = %codes.join(","),
            first_detail = refused.first().map(|r| r.detail.as_str()),
            "messages refused for good; reported to the agent's dead-letter store"
        );
        counters.refused.inc_by(refused.len() as u64);
    }
}

/// An agent's connection was admitted (`Welcome` sent).
pub(crate) struct AgentConnected {
    pub(crate) connection: u64,
    pub(crate) version: u16,
    pub(crate) incarnation: u64,
    pub(crate) agent_last_acked: u64,
    pub(crate) hub_high_water: u64,
    pub(crate) serves_downlink: bool,
}

impl AgentConnected {
    pub(crate) fn emit(self, counters: &SiteCounters) {
        info!(
            connection = self.connection,
            version = self.version,
            incarnation = self.incarnation,
            agent_last_acked = self.agent_last_acked,
            hub_high_water = self.hub_high_water,
            serves_downlink = self.serves_downlink,
            "agent connected"
        );
        counters.connects.inc();
    }
}

/// The downlink's stuck-link watchdog closed a connection.
pub(crate) struct DownlinkStalled {
    pub(crate) after: Duration,
    pub(crate) unacked_frames: usize,
}

impl DownlinkStalled {
    pub(crate) fn emit(self, counters: &SiteCounters) {
        warn!(after = ?self.after, unacked_frames = self.unacked_frames, "stuck link: downlink unacknowledged on a live connection; closing it so the agent reconnects");
        counters.downlink_stalls.inc();
    }
}

/// The site's agent applied, or refused, the config the hub pushed.
pub(crate) struct ConfigAnswered<'a> {
    pub(crate) version: u64,
    /// The refusal's reason and detail; `None`: applied.
    pub(crate) refused: Option<(&'a dyn std::fmt::Display, &'a str)>,
}

impl ConfigAnswered<'_> {
    pub(crate) fn emit(self, counters: &SiteCounters) {
        match self.refused {
            None => {
                info!(version = self.version, "agent applied the pushed config");
                counters.configs_applied.inc();
            }
            Some((reason, detail)) => {
                error!(
                    version = self.version,
                    %reason,
                    %detail,
                    "agent refused the pushed config and keeps running its previous one"
                );
                counters.configs_refused.inc();
            }
        }
    }
}

/// An admitted agent's certificate: its expiry is exposed per site, and warned about within
/// [`meshbridge_tls::EXPIRY_WARNING_SECS`] of it.
pub(crate) struct CertificateSeen<'a> {
    pub(crate) serial: &'a crate::crl::Serial,
    /// `notAfter`, Unix seconds.
    pub(crate) not_after: i64,
    /// The wall clock, Unix seconds.
    pub(crate) now: i64,
}

impl CertificateSeen<'_> {
    pub(crate) fn emit(self, counters: &SiteCounters) {
        let left = self.not_after.saturating_sub(self.now);
        if left < meshbridge_tls::EXPIRY_WARNING_SECS {
            warn!(
                serial = %self.serial,
                days = left / 86_400,
                "the site's certificate expires soon; renew it with `cloud-hub pki renew-site`"
            );
        } else {
            debug!(serial = %self.serial, days = left / 86_400, "site certificate");
        }
        counters.cert_expiry.set(self.not_after);
    }
}
