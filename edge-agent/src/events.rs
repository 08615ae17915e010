//! Every event the agent reports about its messages and its link, in one place (the model is Vector's
//! `internal_events`): each event is one type whose `emit` writes its log line and moves its counter
//! together, so a metric cannot drift from the log that explains it. Emitted inside the task's `tracing`
//! span (`uplink{hub, lane}` for link events), which every log line then carries.
//!
//! A new event goes here, with its counter in `metrics.rs` and its row in the README's metrics table.

use std::time::Duration;

use tracing::{debug, error, info, warn};

use crate::metrics::LaneCounters;

/// Messages committed to a lane's queue (the publishers' acks follow).
pub(crate) struct Committed {
    pub(crate) lane: u8,
    pub(crate) first_seq: u64,
    pub(crate) last_seq: u64,
    /// Older messages the queue dropped to make room (`queue.full_policy = "drop-oldest"`).
    pub(crate) dropped: u64,
}

impl Committed {
    pub(crate) fn emit(self, counters: &LaneCounters) {
        if self.dropped > 0 {
            warn!(
                lane = self.lane,
                dropped = self.dropped,
                "queue full: dropped the oldest queued messages (full_policy = drop-oldest)"
            );
        }
        debug!(
            lane = self.lane,
            first_seq = self.first_seq,
            last_seq = self.last_seq,
            "committed"
        );
        counters
            .committed
            .inc_by(self.last_seq + 1 - self.first_seq);
    }
}

/// Entries written to the link (a resend on a new connection counts again).
pub(crate) struct Sent {
    pub(crate) from: u64,
    pub(crate) to: u64,
    pub(crate) count: u64,
}

impl Sent {
    pub(crate) fn emit(self, counters: &LaneCounters) {
        debug!(from = self.from, to = self.to, count = self.count, "sent");
        counters.sent.inc_by(self.count);
    }
}

/// The hub acknowledged entries; the queue forgot them.
pub(crate) struct Acknowledged {
    pub(crate) upto: u64,
    pub(crate) count: u64,
    pub(crate) rtt: Duration,
}

impl Acknowledged {
    pub(crate) fn emit(self, counters: &LaneCounters) {
        debug!(
            upto = self.upto,
            count = self.count,
            "acknowledged by the hub"
        );
        counters.acknowledged.inc_by(self.count);
        counters.rtt.set(self.rtt.as_secs_f64());
    }
}

/// A message the hub refused for good, filed in the dead-letter store.
pub(crate) struct DeadLettered<'a> {
    pub(crate) lane: u8,
    pub(crate) seq: u64,
    pub(crate) reason_code: u8,
    pub(crate) detail: &'a str,
}

impl DeadLettered<'_> {
    pub(crate) fn emit(self, counters: &LaneCounters) {
        warn!(
            lane = self.lane,
            seq = self.seq,
            reason_code = format_args!("{:#04x}", self.reason_code),
            detail = %self.detail,
            "message refused for good: moved to the dead-letter store (edge-agent dead-letters list)"
        );
        counters
            .dead_lettered
            .get_or_create(&crate::metrics::DeadLetterLabel {
                lane: self.lane.to_string(),
                reason: format!("{:#04x}", self.reason_code),
            })
            .inc();
    }
}

/// The hub welcomed a connection.
pub(crate) struct LinkUp<'a> {
    pub(crate) hub: std::net::SocketAddr,
    /// The protocol version agreed.
    pub(crate) protocol: u16,
    /// The hub's software version (empty from a hub at protocol version 2).
    pub(crate) hub_version: &'a str,
    pub(crate) depth: u64,
    pub(crate) acked: u64,
    pub(crate) hub_high_water: u64,
    pub(crate) rtt: Duration,
}

impl LinkUp<'_> {
    pub(crate) fn emit(self, counters: &LaneCounters) {
        info!(
            hub = %self.hub,
            protocol = self.protocol,
            hub_version = if self.hub_version.is_empty() { "unknown (protocol 2)" } else { self.hub_version },
            depth = self.depth,
            acked = self.acked,
            hub_high_water = self.hub_high_water,
            "uplink connected"
        );
        counters.connects.inc();
        counters.connected.set(1);
        counters.protocol_version.set(self.protocol.into());
        counters.rtt.set(self.rtt.as_secs_f64());
    }
}

/// How bad a lost connection is, for its log level.
pub(crate) enum DownKind {
    /// Only an operator can fix it (certificates, a refused site): error.
    NeedsOperator,
    /// A working link broke: warn.
    Lost,
    /// The hub said no for now (`GoAway`): info.
    Refused,
    /// It never came up (hub unreachable): info.
    Unreachable,
}

/// A connection ended, or an attempt failed; the next attempt is in `retry_in`.
pub(crate) struct LinkDown<'a> {
    pub(crate) kind: DownKind,
    pub(crate) cause: &'a dyn std::error::Error,
    pub(crate) chain: &'a dyn std::fmt::Display,
    pub(crate) retry_in: Duration,
    pub(crate) depth: u64,
    /// The stuck-link watchdog replaced it.
    pub(crate) stalled: bool,
}

impl LinkDown<'_> {
    pub(crate) fn emit(self, counters: &LaneCounters) {
        let (cause, chain, retry_in, depth) = (self.cause, self.chain, self.retry_in, self.depth);
        match self.kind {
            DownKind::NeedsOperator => {
                error!(cause = %cause, chain = %chain, ?retry_in, depth, "uplink down");
            }
            DownKind::Lost => {
                warn!(cause = %cause, chain = %chain, ?retry_in, depth, "uplink down");
            }
            DownKind::Refused => info!(cause = %cause, ?retry_in, depth, "hub refused the uplink"),
            DownKind::Unreachable => {
                info!(cause = %cause, chain = %chain, ?retry_in, depth, "hub unreachable");
            }
        }
        counters.connected.set(0);
        if self.stalled {
            counters.stalls.inc();
        }
    }
}

/// The agent applied, or refused, a config the hub pushed.
pub(crate) struct ConfigPushed<'a> {
    pub(crate) version: u64,
    /// The refusal's reason and detail; `None`: applied.
    pub(crate) refused: Option<(&'a str, &'a str)>,
}

impl ConfigPushed<'_> {
    pub(crate) fn emit(self, counters: &LaneCounters) {
        match self.refused {
            None => {
                info!(version = self.version, "applied the config the hub pushed");
                counters.configs_applied.inc();
            }
            Some((reason, detail)) => {
                warn!(version = self.version, %reason, %detail, "refused the config the hub pushed; the running one stays");
                counters.configs_refused.inc();
            }
        }
    }
}
