//! The agent↔hub link protocol as two pure state machines, one per end, that the async shells drive.
//!
//! [`crate::wire`] says what the frames are; this module says what each end does with them: the handshake
//! (`Hello`/`Welcome`, version and capability negotiation, the hub's limits), the uplink send window and
//! its cumulative `Ack`s, `Refused` before the `Ack` that covers it, resume from the hub's high-water mark
//! (including the "restored data directory" rule), `GoAway` with `Unavailable` and a retry-after, `Ping`/
//! `Pong` liveness, config push (`ConfigPush`/`ConfigAck`) and the downlink (`Downlink`/`DownlinkAck`).
//!
//! # Shape
//! In the way of quinn-proto under quinn: no sockets, no disk, no clock. The shell feeds what happened in
//! (`handle_frame(.., now)`, `handle_timeout(now)`, and calls such as "entries are available", "committed
//! up to", "config applied") and acts on what comes out (`poll_transmit()` frames to write, `poll_action()`
//! / `poll_event()` work for the queue, the publisher or the local broker, `poll_timeout()` when to call
//! `handle_timeout` next). Time is an [`Instant`](std::time::Instant) passed in, so the pair harness
//! (`shared/tests/link_pair.rs`) runs both ends under a virtual clock with faults injected.
//!
//! - [`agent::AgentLink`] lives as long as the agent process and sees its connections come and go: each
//!   [`agent::AgentLink::connect`] returns a [`ConnId`], and input tagged with an older id is ignored, so
//!   nothing a dead connection said can move the queue.
//! - [`hub::HubConn`] is one connection at the hub, from the first byte to its `GoAway`. What a site keeps
//!   across its connections (the committed high-water mark, the config it should run, the downlink queue)
//!   is the shell's, handed in at [`hub::HubConn::welcome`].
//!
//! The machines deal in seqs, not bytes, where bytes are hot: the agent's shell encodes `Batch` frames
//! straight from queue records ([`crate::wire::BatchEncoder`]) and only tells the machine which seqs went
//! out ([`agent::AgentLink::batches_sent`]); the hub's shell likewise encodes `Downlink` frames.

pub mod agent;
pub mod hub;
pub mod lane;

#[cfg(test)]
mod tests;

use std::time::Duration;

use crate::wire::{FrameType, GoAwayCode};

/// Identifies one connection of an [`agent::AgentLink`]; input for any other connection is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

/// Optional application-level liveness: a `Ping` every `interval` once the link is up, and the connection
/// is given up if its `Pong` does not come within `timeout`. QUIC's own idle timeout covers the shells
/// today, so they leave it off; the pair harness turns it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Time between the answer to one `Ping` and the next `Ping`.
    pub interval: Duration,
    /// How long a `Pong` may take.
    pub timeout: Duration,
}

/// An uplink entry the hub will never publish, reported to the agent with `Refused` before the `Ack` that
/// covers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The entry's seq.
    pub seq: u64,
    /// MQTT 5 reason code (see [`crate::wire::Frame::Refused`]).
    pub reason_code: u8,
    /// Human-readable detail.
    pub detail: String,
}

/// Something the peer did that the protocol forbids. The machine answers it with
/// `GoAway{ProtocolError}` (the `Display` text is the reason) and ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolViolation {
    /// A frame this end never accepts in its current state (e.g. a `Batch` sent to the agent, an `Ack`
    /// before `Welcome`, a `ConfigPush` when `CONFIG_PUSH` was not negotiated).
    #[error("unexpected {frame} frame while {state}")]
    Unexpected {
        /// The frame received.
        frame: FrameType,
        /// What the machine was doing.
        state: &'static str,
    },
    /// `Welcome` named a version the agent does not speak.
    #[error("hub chose protocol version {version}, which this agent does not speak")]
    UnsupportedVersion {
        /// The version in `Welcome`.
        version: u16,
    },
    /// The hub acknowledged a seq the agent never sent on this connection (acking it would delete unsent
    /// messages).
    #[error("hub acknowledged up to {upto} but only {sent} was sent")]
    AckBeyondSent {
        /// The ack received.
        upto: u64,
        /// Highest seq sent (or acknowledged before).
        sent: u64,
    },
    /// The hub refused a seq the agent never sent on this connection.
    #[error("hub refused seq {seq} but only {sent} was sent")]
    RefusedBeyondSent {
        /// The refused seq.
        seq: u64,
        /// Highest seq sent.
        sent: u64,
    },
    /// Entries of a `Batch` or `Downlink` did not come in strictly increasing seq order after the ones
    /// before them (resume never goes backwards within a connection).
    #[error("seq {seq} does not follow {after}")]
    SeqNotIncreasing {
        /// The offending seq.
        seq: u64,
        /// The seq it should have exceeded.
        after: u64,
    },
    /// The agent acknowledged a downlink seq the hub never sent on this connection.
    #[error("agent acknowledged downlink up to {upto} but only {sent} was sent")]
    DownlinkAckBeyondSent {
        /// The ack received.
        upto: u64,
        /// Highest downlink seq sent.
        sent: u64,
    },
    /// The agent answered a config version the hub never pushed on this connection.
    #[error("agent answered config version {version}, which was not pushed on this connection")]
    ConfigAckUnknown {
        /// The version in `ConfigAck`.
        version: u64,
    },
}

impl ProtocolViolation {
    /// The `GoAway` code this violation is answered with.
    pub const fn code(&self) -> GoAwayCode {
        GoAwayCode::ProtocolError
    }
}

/// Checks that `seqs` are strictly increasing and all above `after`; returns the last one.
fn increasing(
    seqs: impl IntoIterator<Item = u64>,
    after: u64,
) -> Result<Option<u64>, ProtocolViolation> {
    let mut last = after;
    let mut any = None;
    for seq in seqs {
        if seq <= last {
            return Err(ProtocolViolation::SeqNotIncreasing { seq, after: last });
        }
        last = seq;
        any = Some(seq);
    }
    Ok(any)
}

/// Keepalive state of one open connection.
#[derive(Debug, Clone)]
struct Liveness {
    cfg: Option<Keepalive>,
    next_ping: Option<std::time::Instant>,
    awaiting: Option<(u64, std::time::Instant)>,
    nonce: u64,
}

impl Liveness {
    fn new(cfg: Option<Keepalive>, now: std::time::Instant) -> Self {
        Self {
            cfg,
            next_ping: cfg.map(|k| now + k.interval),
            awaiting: None,
            nonce: 0,
        }
    }

    /// The next instant this needs attention.
    fn deadline(&self) -> Option<std::time::Instant> {
        match self.awaiting {
            Some((_, deadline)) => Some(deadline),
            None => self.next_ping,
        }
    }

    /// `Err(())` if the peer missed its `Pong`; `Ok(Some(nonce))` if a `Ping` is due.
    fn on_timeout(&mut self, now: std::time::Instant) -> Result<Option<u64>, TimedOut> {
        let Some(cfg) = self.cfg else { return Ok(None) };
        match self.awaiting {
            Some((_, deadline)) if now >= deadline => Err(TimedOut),
            Some(_) => Ok(None),
            None if self.next_ping.is_some_and(|at| now >= at) => {
                self.nonce += 1;
                self.awaiting = Some((self.nonce, now + cfg.timeout));
                self.next_ping = None;
                Ok(Some(self.nonce))
            }
            None => Ok(None),
        }
    }

    fn on_pong(&mut self, nonce: u64, now: std::time::Instant) {
        if let (Some(cfg), Some((want, _))) = (self.cfg, self.awaiting) {
            if want == nonce {
                self.awaiting = None;
                self.next_ping = Some(now + cfg.interval);
            }
        }
    }
}

/// The peer missed a `Pong`.
#[derive(Debug, Clone, Copy)]
struct TimedOut;
