//! The agent's end of the link (see the [module docs](super)).
//!
//! Per connection: send `Hello`, wait for `Welcome` (at most `handshake_timeout`), apply the hub's
//! high-water mark, then keep at most `window` batches unacknowledged. The shell reads the queue and
//! encodes the bytes; this machine decides from which seq, and what the hub's answers mean for the queue.
//!
//! Three rules protect the queue, the product's promise:
//! - an `Ack` beyond what was sent on this connection is a protocol error, never a queue operation;
//! - a `Refused` becomes [`AgentAction::DeadLetter`] before the [`AgentAction::AckUpTo`] that covers it
//!   (actions come out in frame order, and the hub sends `Refused` first);
//! - a hub that has seen more of this incarnation than the queue ever wrote (the data directory was
//!   restored from a backup or copied) makes the connection end with [`AgentEnd::Restarted`]: the shell
//!   renumbers the queue above the hub's mark under a new incarnation instead of acknowledging unsent
//!   messages.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{increasing, ConnId, Keepalive, Liveness, ProtocolViolation};
use crate::envelope::Envelope;
use crate::limits::PathLimits;
use crate::wire::{Capabilities, ConfigRejection, Frame, GoAwayCode, VersionRange};

/// How the agent's end behaves; fixed for the machine's life.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The agent's name, sent in `Hello` (informational for the hub).
    pub agent_name: String,
    /// The priority lane this link carries (see [`super::lane`]); 0 for the default lane.
    pub lane: u8,
    /// Features announced in `Hello`. `CONFIG_PUSH` and `DOWNLINK` may only be announced by a shell that
    /// handles [`AgentAction::ApplyConfig`] and [`AgentAction::DeliverDownlink`].
    pub capabilities: Capabilities,
    /// Batches in flight (sent, not acknowledged) at most.
    pub window: usize,
    /// How long the hub may take to answer `Hello`.
    pub handshake_timeout: Duration,
    /// Protocol versions offered in `Hello` ([`crate::wire::SUPPORTED`], or capped by
    /// `uplink.max_protocol_version` during a rolling upgrade); a `Welcome` naming another is refused.
    pub versions: VersionRange,
    /// Application-level liveness, if any.
    pub keepalive: Option<Keepalive>,
    /// The stuck-link watchdog: how long batches may stay in flight without any `Ack` on an open
    /// connection before it ends with [`AgentEnd::Stalled`] (the shell reconnects and resends; the hub's
    /// dedup drops what it had). A link can stay connected, keep-alives answered, while nothing is
    /// acknowledged: a wedged hub task, a cloud broker that accepts TCP but never answers. `None`: never.
    pub ack_timeout: Option<Duration>,
}

/// The durable queue's marks at the start of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueMarks {
    /// The queue file's incarnation.
    pub incarnation: u64,
    /// Every seq at or below it is acknowledged (gone).
    pub acked: u64,
    /// The highest seq the queue ever assigned (`next_seq - 1`).
    pub written: u64,
}

/// Work for the agent's shell, in the order it must be done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAction {
    /// The hub accepted the connection; these are its limits (persist and enforce them).
    Welcomed {
        /// The connection.
        conn: ConnId,
        /// The negotiated protocol version.
        version: u16,
        /// The negotiated features.
        capabilities: Capabilities,
        /// The hub's limits as announced (its frame size, not yet combined with the agent's own).
        limits: PathLimits,
        /// The hub's committed high-water mark for this incarnation.
        hub_high_water: u64,
        /// The hub's software version (empty at protocol version 2).
        hub_version: String,
    },
    /// Acknowledge the queue up to and including `upto` (deletes those entries).
    AckUpTo {
        /// The new watermark.
        upto: u64,
    },
    /// Move entry `seq` to the dead-letter store now, before any later `AckUpTo` deletes it.
    DeadLetter {
        /// The refused entry.
        seq: u64,
        /// MQTT 5 reason code.
        reason_code: u8,
        /// Detail for the listing.
        detail: String,
    },
    /// Validate and apply this config, then report with [`AgentLink::config_applied`].
    ApplyConfig {
        /// Its version.
        version: u64,
        /// The TOML text.
        body: String,
    },
    /// Publish these hub-originated messages into the local broker, then report with
    /// [`AgentLink::downlink_delivered`].
    DeliverDownlink {
        /// The connection they came on (acknowledged on it only).
        conn: ConnId,
        /// The messages, in seq order.
        entries: Vec<Envelope>,
    },
    /// The connection is over (any `GoAway` to send is already queued): flush, close, reconnect or stop.
    Closed {
        /// The connection.
        conn: ConnId,
        /// Why.
        end: AgentEnd,
    },
}

/// Why an agent connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEnd {
    /// The hub sent `GoAway`.
    GoAway {
        /// Its code.
        code: GoAwayCode,
        /// Its explanation.
        reason: String,
        /// How long it asked us to wait before the next attempt.
        retry_after: Option<Duration>,
    },
    /// The hub broke the protocol; `GoAway{ProtocolError}` was queued.
    Protocol(ProtocolViolation),
    /// No `Welcome` within the handshake timeout.
    HandshakeTimeout {
        /// The timeout.
        after: Duration,
    },
    /// A `Ping` went unanswered.
    KeepaliveTimeout,
    /// Batches stayed in flight without any `Ack` for [`AgentConfig::ack_timeout`].
    Stalled {
        /// The timeout.
        after: Duration,
        /// Batches unacknowledged.
        unacked_batches: usize,
    },
    /// The hub has seen seqs of this incarnation that the queue never wrote (restored or copied data
    /// directory): renumber the queue above `hub_high_water` under a new incarnation and reconnect at once.
    Restarted {
        /// The hub's mark.
        hub_high_water: u64,
        /// The highest seq the queue wrote.
        written: u64,
    },
    /// Orderly shutdown finished; `GoAway{Normal}` was queued.
    Shutdown {
        /// Batches still unacknowledged when it ended (the shutdown deadline passed).
        unacked_batches: usize,
    },
}

/// The agent's end of the link.
#[derive(Debug)]
pub struct AgentLink {
    cfg: AgentConfig,
    next_conn: u64,
    conn: Option<Conn>,
    /// Version of the config the agent runs (its last-good).
    config_version: u64,
    /// Versions handed out with `ApplyConfig` and not reported yet.
    config_pending: Vec<u64>,
    transmits: VecDeque<Frame>,
    actions: VecDeque<AgentAction>,
}

#[derive(Debug)]
struct Conn {
    id: ConnId,
    marks: QueueMarks,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    AwaitWelcome { deadline: Instant },
    Open(Box<Open>),
    Closed,
}

#[derive(Debug)]
struct Open {
    capabilities: Capabilities,
    /// The queue's watermark as this connection moved it.
    acked: u64,
    /// Next seq to read from the queue.
    cursor: u64,
    /// Highest seq the shell said is stored.
    available: u64,
    /// Last seq of each unacknowledged batch, oldest first.
    inflight: VecDeque<u64>,
    /// Highest seq sent on this connection (0 before any).
    sent: u64,
    acked_any: bool,
    welcomed_at: Instant,
    /// Since when the batches in flight wait: the last `Ack` that acknowledged one, or the send that
    /// filled an empty window (the watchdog's base).
    progress_at: Instant,
    stopping: Option<Instant>,
    downlink_received: u64,
    downlink_acked: u64,
    liveness: Liveness,
}

impl AgentLink {
    /// A link that has no connection yet; `config_version` is the version of the config the agent runs.
    pub fn new(cfg: AgentConfig, config_version: u64) -> Self {
        Self {
            cfg,
            next_conn: 0,
            conn: None,
            config_version,
            config_pending: Vec::new(),
            transmits: VecDeque::new(),
            actions: VecDeque::new(),
        }
    }

    /// A new connection is up: forgets the previous one (and anything it had still to send) and queues
    /// `Hello`.
    pub fn connect(&mut self, now: Instant, marks: QueueMarks) -> ConnId {
        self.next_conn += 1;
        let id = ConnId(self.next_conn);
        self.transmits.clear();
        self.transmits.push_back(Frame::Hello {
            versions: self.cfg.versions,
            capabilities: self.cfg.capabilities,
            agent_name: self.cfg.agent_name.clone(),
            incarnation: marks.incarnation,
            last_acked: marks.acked,
            config_version: self.config_version,
            lane: self.cfg.lane,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            window: u32::try_from(self.cfg.window).unwrap_or(u32::MAX),
        });
        self.conn = Some(Conn {
            id,
            marks,
            phase: Phase::AwaitWelcome {
                deadline: now + self.cfg.handshake_timeout,
            },
        });
        id
    }

    /// The transport under `conn` failed or was closed; nothing more is sent on it.
    pub fn connection_lost(&mut self, conn: ConnId) {
        if let Some(c) = self.current(conn) {
            c.phase = Phase::Closed;
            self.transmits.clear();
        }
    }

    /// A frame from the hub on `conn`.
    pub fn handle_frame(&mut self, conn: ConnId, frame: Frame, now: Instant) {
        let Some(c) = self.current(conn) else { return };
        let result = match &mut c.phase {
            Phase::Closed => return,
            Phase::AwaitWelcome { .. } => self.on_handshake(frame, now),
            Phase::Open(_) => self.on_open(frame, now),
        };
        match result {
            Err(end) => self.close(end),
            // A shutdown waiting for its last `Ack` may be done now.
            Ok(()) => self.handle_timeout(now),
        }
    }

    fn on_handshake(&mut self, frame: Frame, now: Instant) -> Result<(), AgentEnd> {
        let (id, marks) = {
            let c = self
                .conn
                .as_ref()
                .expect("invariant: called with a connection");
            (c.id, c.marks)
        };
        match frame {
            Frame::Welcome {
                version,
                capabilities,
                max_frame_size,
                hub_high_water,
                config_version: _,
                max_message_size,
                max_topic_len,
                hub_version,
            } => {
                if !self.cfg.versions.contains(version) {
                    return Err(AgentEnd::Protocol(ProtocolViolation::UnsupportedVersion {
                        version,
                    }));
                }
                // Only what we announced may be used, whatever the hub says.
                let capabilities = capabilities.intersection(self.cfg.capabilities);
                self.actions.push_back(AgentAction::Welcomed {
                    conn: id,
                    version,
                    capabilities,
                    limits: PathLimits {
                        max_message_size,
                        max_topic_len,
                        max_frame_size,
                    },
                    hub_high_water,
                    hub_version,
                });
                if hub_high_water > marks.written {
                    return Err(AgentEnd::Restarted {
                        hub_high_water,
                        written: marks.written,
                    });
                }
                let mut acked = marks.acked;
                if hub_high_water > acked {
                    // The hub already has these: the queue may forget them without resending.
                    self.actions.push_back(AgentAction::AckUpTo {
                        upto: hub_high_water,
                    });
                    acked = hub_high_water;
                }
                let c = self
                    .conn
                    .as_mut()
                    .expect("invariant: called with a connection");
                c.phase = Phase::Open(Box::new(Open {
                    capabilities,
                    acked,
                    cursor: acked + 1,
                    available: marks.written,
                    inflight: VecDeque::new(),
                    sent: 0,
                    acked_any: false,
                    welcomed_at: now,
                    progress_at: now,
                    stopping: None,
                    downlink_received: 0,
                    downlink_acked: 0,
                    liveness: Liveness::new(self.cfg.keepalive, now),
                }));
                Ok(())
            }
            Frame::GoAway {
                code,
                reason,
                retry_after_ms,
            } => Err(go_away(code, reason, retry_after_ms)),
            other => Err(AgentEnd::Protocol(ProtocolViolation::Unexpected {
                frame: other.frame_type(),
                state: "waiting for Welcome",
            })),
        }
    }

    fn on_open(&mut self, frame: Frame, now: Instant) -> Result<(), AgentEnd> {
        let c = self
            .conn
            .as_mut()
            .expect("invariant: called with a connection");
        let id = c.id;
        let Phase::Open(open) = &mut c.phase else {
            unreachable!("invariant: called in the open phase")
        };
        let violation = |v| Err(AgentEnd::Protocol(v));
        match frame {
            Frame::Ack { upto } => {
                if upto > open.sent.max(open.acked) {
                    return violation(ProtocolViolation::AckBeyondSent {
                        upto,
                        sent: open.sent,
                    });
                }
                open.acked_any = true;
                while open.inflight.front().is_some_and(|&last| last <= upto) {
                    open.inflight.pop_front();
                    open.progress_at = now;
                }
                if upto > open.acked {
                    open.acked = upto;
                    self.actions.push_back(AgentAction::AckUpTo { upto });
                }
                Ok(())
            }
            Frame::Refused {
                seq,
                reason_code,
                detail,
            } => {
                if seq > open.sent.max(open.acked) {
                    return violation(ProtocolViolation::RefusedBeyondSent {
                        seq,
                        sent: open.sent,
                    });
                }
                self.actions.push_back(AgentAction::DeadLetter {
                    seq,
                    reason_code,
                    detail,
                });
                Ok(())
            }
            Frame::Ping { nonce } => {
                self.transmits.push_back(Frame::Pong { nonce });
                Ok(())
            }
            Frame::Pong { nonce } => {
                open.liveness.on_pong(nonce, now);
                Ok(())
            }
            Frame::GoAway {
                code,
                reason,
                retry_after_ms,
            } => Err(go_away(code, reason, retry_after_ms)),
            Frame::ConfigPush { version, body }
                if open.capabilities.contains(Capabilities::CONFIG_PUSH) =>
            {
                if self.config_pending.contains(&version) {
                    // A re-push (reconnect) of what is being applied: its outcome answers both.
                } else if version < self.config_version {
                    self.transmits.push_back(Frame::ConfigAck {
                        version,
                        result: Err(ConfigRejection {
                            reason: crate::wire::ConfigRejectReason::Stale,
                            detail: format!(
                                "this agent runs config version {}, newer than {version}",
                                self.config_version
                            ),
                        }),
                    });
                } else if version == self.config_version && self.config_pending.is_empty() {
                    self.transmits.push_back(Frame::ConfigAck {
                        version,
                        result: Ok(()),
                    });
                } else {
                    self.config_pending.push(version);
                    self.actions
                        .push_back(AgentAction::ApplyConfig { version, body });
                }
                Ok(())
            }
            Frame::Downlink { entries } if open.capabilities.contains(Capabilities::DOWNLINK) => {
                match increasing(entries.iter().map(|e| e.seq), open.downlink_received) {
                    Err(v) => violation(v),
                    Ok(None) => Ok(()),
                    Ok(Some(last)) => {
                        open.downlink_received = last;
                        self.actions
                            .push_back(AgentAction::DeliverDownlink { conn: id, entries });
                        Ok(())
                    }
                }
            }
            other => violation(ProtocolViolation::Unexpected {
                frame: other.frame_type(),
                state: "streaming",
            }),
        }
    }

    /// Time passed; call at (or after) [`poll_timeout`](Self::poll_timeout).
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(c) = self.conn.as_mut() else { return };
        let end = match &mut c.phase {
            Phase::Closed => None,
            Phase::AwaitWelcome { deadline } => {
                (now >= *deadline).then_some(AgentEnd::HandshakeTimeout {
                    after: self.cfg.handshake_timeout,
                })
            }
            Phase::Open(open) => match open.liveness.on_timeout(now) {
                Err(_) => Some(AgentEnd::KeepaliveTimeout),
                Ok(ping) => {
                    if let Some(nonce) = ping {
                        self.transmits.push_back(Frame::Ping { nonce });
                    }
                    let stalled = self
                        .cfg
                        .ack_timeout
                        .filter(|&t| !open.inflight.is_empty() && now >= open.progress_at + t);
                    match (open.stopping, stalled) {
                        (Some(deadline), _) if now >= deadline || open.inflight.is_empty() => {
                            Some(AgentEnd::Shutdown {
                                unacked_batches: open.inflight.len(),
                            })
                        }
                        (_, Some(after)) => Some(AgentEnd::Stalled {
                            after,
                            unacked_batches: open.inflight.len(),
                        }),
                        _ => None,
                    }
                }
            },
        };
        if let Some(end) = end {
            self.close(end);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let c = self.conn.as_ref()?;
        match &c.phase {
            Phase::Closed => None,
            Phase::AwaitWelcome { deadline } => Some(*deadline),
            Phase::Open(open) => {
                let mut at = open.liveness.deadline();
                if let Some(stop) = open.stopping {
                    at = Some(at.map_or(stop, |a| a.min(stop)));
                }
                if let (Some(t), false) = (self.cfg.ack_timeout, open.inflight.is_empty()) {
                    let stall = open.progress_at + t;
                    at = Some(at.map_or(stall, |a| a.min(stall)));
                }
                at
            }
        }
    }

    /// The next frame to write on the current connection.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmits.pop_front()
    }

    /// The next piece of work for the shell.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<AgentAction> {
        self.actions.pop_front()
    }

    /// The queue holds entries up to `upto` (its `next_seq - 1`, or less if a read found nothing;
    /// `u64::MAX` when new entries were appended and the shell would rather read than count them).
    pub fn queue_written(&mut self, upto: u64) {
        if let Some(open) = self.open_mut() {
            open.available = upto;
        }
    }

    /// The seq from which the shell should read and send a batch now, if the window has room and the queue
    /// has something; report what was sent with [`batches_sent`](Self::batches_sent).
    pub fn next_send(&self) -> Option<u64> {
        let open = self.open()?;
        (open.stopping.is_none()
            && open.inflight.len() < self.cfg.window
            && open.cursor <= open.available)
            .then_some(open.cursor)
    }

    /// The shell read the queue up to `read_upto` (entries it could not send, e.g. too large for any frame,
    /// included) and sent frames whose last seqs are `batch_lasts`, in order. Reading nothing at
    /// [`next_send`](Self::next_send)'s seq is reported with [`queue_written`](Self::queue_written).
    pub fn batches_sent(
        &mut self,
        now: Instant,
        read_upto: u64,
        batch_lasts: impl IntoIterator<Item = u64>,
    ) {
        if let Some(open) = self.open_mut() {
            open.cursor = open.cursor.max(read_upto + 1);
            for last in batch_lasts {
                if open.inflight.is_empty() {
                    open.progress_at = now;
                }
                open.inflight.push_back(last);
                open.sent = open.sent.max(last);
            }
        }
    }

    /// Stop sending new batches; once every batch in flight is acknowledged, or at `deadline`, queue
    /// `GoAway{Normal}` and end the connection with [`AgentEnd::Shutdown`]. Without an open connection
    /// nothing happens.
    pub fn shutdown(&mut self, now: Instant, deadline: Instant) {
        if let Some(open) = self.open_mut() {
            open.stopping.get_or_insert(deadline);
        }
        self.handle_timeout(now);
    }

    /// The shell applied (or refused) the config of an earlier [`AgentAction::ApplyConfig`].
    pub fn config_applied(&mut self, version: u64, result: Result<(), ConfigRejection>) {
        self.config_pending.retain(|&v| v != version);
        if result.is_ok() {
            self.config_version = self.config_version.max(version);
        }
        if self.open().is_some() {
            // Otherwise the next `Hello` carries the version it runs, and the hub pushes again.
            self.transmits
                .push_back(Frame::ConfigAck { version, result });
        }
    }

    /// The local broker accepted every downlink entry up to `upto` delivered on `conn`.
    pub fn downlink_delivered(&mut self, conn: ConnId, upto: u64) {
        if self.conn.as_ref().map(|c| c.id) != Some(conn) {
            return;
        }
        if let Some(open) = self.open_mut() {
            let upto = upto.min(open.downlink_received);
            if upto > open.downlink_acked {
                open.downlink_acked = upto;
                self.transmits.push_back(Frame::DownlinkAck { upto });
            }
        }
    }

    /// The current connection, if any.
    pub fn conn(&self) -> Option<ConnId> {
        self.conn
            .as_ref()
            .filter(|c| !matches!(c.phase, Phase::Closed))
            .map(|c| c.id)
    }

    /// Whether the current connection was welcomed.
    pub fn is_open(&self) -> bool {
        self.open().is_some()
    }

    /// Whether the current connection proved the link works: the hub acknowledged something, or it has been
    /// up `healthy_after` since `Welcome` (an idle site has nothing to acknowledge).
    pub fn is_healthy(&self, now: Instant, healthy_after: Duration) -> bool {
        self.open().is_some_and(|o| {
            o.acked_any || now.saturating_duration_since(o.welcomed_at) >= healthy_after
        })
    }

    /// Whether the hub acknowledged anything on the current connection.
    pub fn acked_any(&self) -> bool {
        self.open().is_some_and(|o| o.acked_any)
    }

    /// Whether the current connection could send more if the queue had more: open, not stopping, window
    /// not full. The shell waits for new entries only then.
    pub fn wants_data(&self) -> bool {
        self.open()
            .is_some_and(|o| o.stopping.is_none() && o.inflight.len() < self.cfg.window)
    }

    /// Batches sent and not yet acknowledged on the current connection.
    pub fn inflight_batches(&self) -> usize {
        self.open().map_or(0, |o| o.inflight.len())
    }

    /// Version of the config the agent runs.
    pub fn config_version(&self) -> u64 {
        self.config_version
    }

    fn current(&mut self, conn: ConnId) -> Option<&mut Conn> {
        self.conn.as_mut().filter(|c| c.id == conn)
    }

    fn open(&self) -> Option<&Open> {
        match &self.conn.as_ref()?.phase {
            Phase::Open(open) => Some(open),
            _ => None,
        }
    }

    fn open_mut(&mut self) -> Option<&mut Open> {
        match &mut self.conn.as_mut()?.phase {
            Phase::Open(open) => Some(open),
            _ => None,
        }
    }

    fn close(&mut self, end: AgentEnd) {
        let Some(c) = self.conn.as_mut() else { return };
        if matches!(c.phase, Phase::Closed) {
            return;
        }
        c.phase = Phase::Closed;
        let id = c.id;
        match &end {
            AgentEnd::Protocol(v) => self.transmits.push_back(Frame::GoAway {
                code: v.code(),
                reason: v.to_string(),
                retry_after_ms: None,
            }),
            AgentEnd::Shutdown { .. } => self.transmits.push_back(Frame::GoAway {
                code: GoAwayCode::Normal,
                reason: "agent shutting down".into(),
                retry_after_ms: None,
            }),
            _ => {}
        }
        self.actions
            .push_back(AgentAction::Closed { conn: id, end });
    }
}

fn go_away(code: GoAwayCode, reason: String, retry_after_ms: Option<u32>) -> AgentEnd {
    AgentEnd::GoAway {
        code,
        reason,
        retry_after: retry_after_ms.map(|ms| Duration::from_millis(ms.into())),
    }
}
