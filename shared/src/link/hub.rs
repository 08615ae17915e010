//! The hub's end of one agent connection (see the [module docs](super)).
//!
//! Handshake: the first frame must be `Hello`; the site (from the client certificate, decided by the shell
//! before any byte arrives: [`Admission`]) must be one the hub serves; the versions must overlap. Then
//! [`HubEvent::Hello`] asks the shell to admit the agent ([`HubConn::welcome`], with what the site keeps
//! across connections: [`Resume`]) or to refuse it ([`HubConn::refuse`], e.g. `Unavailable` while the cloud
//! broker is down, with a retry-after only to an agent that announced `RETRY_AFTER`).
//!
//! Uplink: every `Batch` becomes [`HubEvent::PublishBatch`]; the shell publishes it and reports, in order,
//! [`HubConn::committed`] once the messages are published and the site's high-water mark is durable. Only
//! then does the machine write the batch's `Refused` frames followed by its `Ack`: nothing is acknowledged
//! that the hub did not commit first.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{increasing, Keepalive, Liveness, ProtocolViolation, Refusal};
use crate::envelope::Envelope;
use crate::wire::{
    negotiate, Capabilities, ConfigRejectReason, ConfigRejection, Frame, GoAwayCode,
};

/// How the hub's end behaves.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Largest frame the hub accepts, announced in `Welcome`.
    pub max_frame_size: u32,
    /// Largest payload the hub publishes, announced in `Welcome`.
    pub max_message_size: u32,
    /// Optional features this hub serves; `Welcome` carries their intersection with the agent's.
    pub capabilities: Capabilities,
    /// How long the agent may take to send `Hello`.
    pub hello_timeout: Duration,
    /// Protocol versions this hub speaks ([`crate::wire::SUPPORTED`], or capped by
    /// `listen.max_protocol_version` during a rolling upgrade).
    pub versions: crate::wire::VersionRange,
    /// The hub's software version, stated in `Welcome` from protocol version 3 on.
    pub software_version: String,
    /// Application-level liveness, if any.
    pub keepalive: Option<Keepalive>,
    /// `Downlink` frames in flight (sent, not acknowledged) at most.
    pub downlink_window: usize,
    /// The stuck-link watchdog of the downlink: how long `Downlink` frames may stay in flight without any
    /// `DownlinkAck` before the connection ends with [`HubEnd::Stalled`] (the agent reconnects and the
    /// frames are sent again). `None`: never.
    pub downlink_ack_timeout: Option<Duration>,
    /// How long a committed batch's `Ack` may wait for later batches to share it, while fewer than half
    /// of the agent's window wait for acknowledgement (`Hello`'s `window`). At a factory line's rate
    /// each batch holds one message, and an `Ack` per batch cost a packet and a wake-up of both
    /// programs per message. Zero, or an agent that did not state its window, acknowledges every batch
    /// at once.
    pub ack_delay: Duration,
}

/// What the client certificate says, decided by the shell when the connection is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// A site this hub serves.
    Site {
        /// Longest site-local topic the hub can publish for it (announced in `Welcome`).
        max_topic_len: u16,
    },
    /// No usable site: refused with `GoAway{Unauthorized}` once `Hello` arrives.
    Unauthorized {
        /// Why, for the agent's log.
        reason: String,
    },
}

/// A config the hub wants a site to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigOffer {
    /// Its version.
    pub version: u64,
    /// The TOML text.
    pub body: String,
}

/// What a site keeps across its connections, handed to [`HubConn::welcome`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resume {
    /// The durable high-water mark: `(incarnation, highest contiguous committed seq)`.
    pub committed: Option<(u64, u64)>,
    /// The config the site should run.
    pub config: Option<ConfigOffer>,
    /// A config version the agent refused; not pushed again until the offer changes.
    pub config_rejected: Option<u64>,
    /// The site's downlink queue: acknowledged watermark.
    pub downlink_acked: u64,
    /// The site's downlink queue: highest seq stored.
    pub downlink_written: u64,
}

/// What happened, for the hub's shell, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    /// A valid `Hello` from an authorized site with a common version: admit it with
    /// [`HubConn::welcome`] or refuse it with [`HubConn::refuse`].
    Hello {
        /// The agent's configured name (not trusted: the certificate names the site).
        agent_name: String,
        /// The version that will be spoken.
        version: u16,
        /// What the agent announced.
        capabilities: Capabilities,
        /// The agent's queue incarnation.
        incarnation: u64,
        /// The agent's acknowledged watermark.
        last_acked: u64,
        /// The config version the agent runs.
        config_version: u64,
        /// The priority lane the connection carries (see [`super::lane`]).
        lane: u8,
        /// The agent's software version (empty from an agent too old to say).
        agent_version: String,
    },
    /// The agent's queue has another incarnation than the committed mark: its numbering starts over.
    NewIncarnation {
        /// The incarnation the mark belonged to.
        old_incarnation: u64,
        /// That mark.
        old_high_water: u64,
        /// The agent's incarnation.
        incarnation: u64,
    },
    /// Publish these entries, then report [`HubConn::committed`] with the last seq, in order.
    PublishBatch {
        /// The entries, in seq order.
        entries: Vec<Envelope>,
    },
    /// The agent runs this config version now.
    ConfigApplied {
        /// The version.
        version: u64,
    },
    /// The agent refused this config version and keeps running its last-good one.
    ConfigRejected {
        /// The version.
        version: u64,
        /// Why.
        rejection: ConfigRejection,
    },
    /// The agent's broker accepted every downlink seq up to `upto`: acknowledge the site's downlink queue.
    DownlinkAcked {
        /// The new watermark.
        upto: u64,
    },
    /// The connection is over (any `GoAway` is queued): flush, then close with the code.
    Closed {
        /// Why.
        end: HubEnd,
    },
}

/// Why a hub connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEnd {
    /// The hub refused the agent at the handshake (`Unauthorized`, `IncompatibleVersion`,
    /// `Unavailable`, ...); the `GoAway` is queued.
    Refused {
        /// The code sent.
        code: GoAwayCode,
        /// The reason sent.
        reason: String,
    },
    /// The agent broke the protocol; `GoAway{ProtocolError}` is queued.
    Protocol(ProtocolViolation),
    /// No `Hello` in time.
    HelloTimeout,
    /// A `Ping` went unanswered.
    KeepaliveTimeout,
    /// `Downlink` frames stayed in flight without any `DownlinkAck` for
    /// [`HubConfig::downlink_ack_timeout`]; `GoAway{Normal}` is queued.
    Stalled {
        /// The timeout.
        after: Duration,
        /// Frames unacknowledged.
        unacked_frames: usize,
    },
    /// The agent said `GoAway`.
    PeerGoAway {
        /// Its code.
        code: GoAwayCode,
        /// Its reason.
        reason: String,
    },
    /// The hub closed the connection ([`HubConn::close`] or a finished [`HubConn::drain`]); the `GoAway`
    /// is queued.
    Closed {
        /// The code sent.
        code: GoAwayCode,
        /// The reason sent.
        reason: String,
    },
}

impl HubEnd {
    /// The QUIC close code matching the `GoAway` sent (or `Normal` when the agent ended it).
    pub const fn code(&self) -> GoAwayCode {
        match self {
            Self::Refused { code, .. } | Self::Closed { code, .. } => *code,
            Self::Protocol(_) | Self::HelloTimeout => GoAwayCode::ProtocolError,
            Self::KeepaliveTimeout | Self::Stalled { .. } | Self::PeerGoAway { .. } => {
                GoAwayCode::Normal
            }
        }
    }
}

/// The hub's end of one agent connection.
#[derive(Debug)]
pub struct HubConn {
    cfg: HubConfig,
    admission: Admission,
    phase: Phase,
    transmits: VecDeque<Frame>,
    events: VecDeque<HubEvent>,
}

#[derive(Debug)]
enum Phase {
    AwaitHello { deadline: Instant },
    AwaitAdmit(Hello),
    Open(Box<Open>),
    Closed,
}

#[derive(Debug, Clone, Copy)]
struct Hello {
    version: u16,
    capabilities: Capabilities,
    incarnation: u64,
    config_version: u64,
    window: u32,
}

#[derive(Debug)]
struct Open {
    capabilities: Capabilities,
    hub_high_water: u64,
    /// Last seq of every batch received and not yet committed, oldest first.
    uncommitted: VecDeque<u64>,
    /// The agent's uplink window (0: not stated, every batch acknowledged at once).
    window: u32,
    /// The last seq committed and not acknowledged yet, the number of batches it covers, and when its
    /// `Ack` is due at the latest (see [`HubConfig::ack_delay`]).
    ack_held: Option<(u64, usize, Instant)>,
    draining: Option<(GoAwayCode, String)>,
    config: Option<ConfigOffer>,
    config_rejected: Option<u64>,
    agent_config: u64,
    pushed: Vec<u64>,
    downlink_acked: u64,
    downlink_available: u64,
    downlink_cursor: u64,
    downlink_inflight: VecDeque<u64>,
    downlink_sent: u64,
    /// Since when the downlink frames in flight wait (the watchdog's base): the last `DownlinkAck` that
    /// acknowledged one, or the send that filled an empty window.
    downlink_progress_at: Instant,
    liveness: Liveness,
}

impl HubConn {
    /// A connection whose TLS handshake completed; it waits for `Hello` until `now + hello_timeout`.
    pub fn new(now: Instant, cfg: HubConfig, admission: Admission) -> Self {
        let deadline = now + cfg.hello_timeout;
        Self {
            cfg,
            admission,
            phase: Phase::AwaitHello { deadline },
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// A frame from the agent.
    pub fn handle_frame(&mut self, frame: Frame, now: Instant) {
        let result = match &mut self.phase {
            Phase::Closed => return,
            Phase::AwaitHello { .. } => self.on_hello(frame),
            Phase::AwaitAdmit(_) => Err(HubEnd::Protocol(ProtocolViolation::Unexpected {
                frame: frame.frame_type(),
                state: "admitting the agent",
            })),
            Phase::Open(_) => self.on_open(frame, now),
        };
        if let Err(end) = result {
            self.finish(end);
        }
    }

    fn on_hello(&mut self, frame: Frame) -> Result<(), HubEnd> {
        let Frame::Hello {
            versions,
            capabilities,
            agent_name,
            incarnation,
            last_acked,
            config_version,
            lane,
            agent_version,
            window,
        } = frame
        else {
            return Err(HubEnd::Protocol(ProtocolViolation::Unexpected {
                frame: frame.frame_type(),
                state: "waiting for Hello",
            }));
        };
        if let Admission::Unauthorized { reason } = &self.admission {
            return Err(HubEnd::Refused {
                code: GoAwayCode::Unauthorized,
                reason: reason.clone(),
            });
        }
        let version =
            negotiate(versions, self.cfg.versions).map_err(|mismatch| HubEnd::Refused {
                code: GoAwayCode::IncompatibleVersion,
                reason: mismatch.to_string(),
            })?;
        if lane > super::lane::MAX_LANE {
            return Err(HubEnd::Refused {
                code: GoAwayCode::ProtocolError,
                reason: format!(
                    "lane {lane} is above the highest priority, {}",
                    super::lane::MAX_LANE
                ),
            });
        }
        self.phase = Phase::AwaitAdmit(Hello {
            version,
            capabilities,
            incarnation,
            config_version,
            window,
        });
        self.events.push_back(HubEvent::Hello {
            agent_name,
            version,
            capabilities,
            incarnation,
            last_acked,
            config_version,
            lane,
            agent_version,
        });
        Ok(())
    }

    /// Refuses the agent after [`HubEvent::Hello`]. `retry_after` is sent only to an agent that announced
    /// [`Capabilities::RETRY_AFTER`] (an older one refuses the extra bytes).
    pub fn refuse(&mut self, code: GoAwayCode, reason: String, retry_after: Option<Duration>) {
        let retry_after_ms = match &self.phase {
            Phase::AwaitAdmit(hello) if hello.capabilities.contains(Capabilities::RETRY_AFTER) => {
                retry_after.map(|d| u32::try_from(d.as_millis()).unwrap_or(u32::MAX))
            }
            _ => None,
        };
        self.go_away(code, reason.clone(), retry_after_ms);
        self.finish(HubEnd::Refused { code, reason });
    }

    /// Admits the agent after [`HubEvent::Hello`]: queues `Welcome` (and a `ConfigPush` if the agent runs
    /// another version than `resume.config`). Returns the high-water mark announced.
    pub fn welcome(&mut self, now: Instant, max_topic_len: u16, resume: Resume) -> u64 {
        let Phase::AwaitAdmit(hello) = self.phase else {
            return 0;
        };
        let hub_high_water = match resume.committed {
            Some((known, hw)) if known == hello.incarnation => hw,
            Some((known, hw)) => {
                self.events.push_back(HubEvent::NewIncarnation {
                    old_incarnation: known,
                    old_high_water: hw,
                    incarnation: hello.incarnation,
                });
                0
            }
            None => 0,
        };
        let capabilities = hello.capabilities.intersection(self.cfg.capabilities);
        self.transmits.push_back(Frame::Welcome {
            version: hello.version,
            capabilities,
            max_frame_size: self.cfg.max_frame_size,
            hub_high_water,
            config_version: resume.config.as_ref().map_or(0, |c| c.version),
            max_message_size: self.cfg.max_message_size,
            max_topic_len,
            // Version 2's Welcome ends before it.
            hub_version: if hello.version >= 3 {
                self.cfg.software_version.clone()
            } else {
                String::new()
            },
        });
        self.phase = Phase::Open(Box::new(Open {
            capabilities,
            hub_high_water,
            uncommitted: VecDeque::new(),
            window: hello.window,
            ack_held: None,
            draining: None,
            config: None,
            config_rejected: resume.config_rejected,
            agent_config: hello.config_version,
            pushed: Vec::new(),
            downlink_acked: resume.downlink_acked,
            downlink_available: resume.downlink_written,
            downlink_cursor: resume.downlink_acked + 1,
            downlink_inflight: VecDeque::new(),
            downlink_sent: 0,
            downlink_progress_at: now,
            liveness: Liveness::new(self.cfg.keepalive, now),
        }));
        if let Some(offer) = resume.config {
            self.push_config(offer);
        }
        hub_high_water
    }

    fn on_open(&mut self, frame: Frame, now: Instant) -> Result<(), HubEnd> {
        let Phase::Open(open) = &mut self.phase else {
            unreachable!("invariant: called in the open phase")
        };
        let violation = |v| Err(HubEnd::Protocol(v));
        match frame {
            Frame::Batch { entries } => {
                if open.draining.is_some() {
                    // The shell stopped reading; whatever still arrives is resent on the next connection.
                    return Ok(());
                }
                // Seqs at or below ones already received (a replay after a lost `Ack`) are accepted: the
                // shell's dedup window drops them and the batch is acknowledged again.
                match increasing(entries.iter().map(|e| e.seq), 0) {
                    Err(v) => violation(v),
                    Ok(None) => Ok(()),
                    Ok(Some(last)) => {
                        open.uncommitted.push_back(last);
                        self.events.push_back(HubEvent::PublishBatch { entries });
                        Ok(())
                    }
                }
            }
            Frame::Ping { nonce } => {
                self.transmits.push_back(Frame::Pong { nonce });
                Ok(())
            }
            Frame::Pong { nonce } => {
                open.liveness.on_pong(nonce, now);
                Ok(())
            }
            Frame::GoAway { code, reason, .. } => Err(HubEnd::PeerGoAway { code, reason }),
            Frame::ConfigAck { version, result }
                if open.capabilities.contains(Capabilities::CONFIG_PUSH) =>
            {
                if !open.pushed.contains(&version) {
                    return violation(ProtocolViolation::ConfigAckUnknown { version });
                }
                match result {
                    Ok(()) => {
                        open.agent_config = open.agent_config.max(version);
                        self.events.push_back(HubEvent::ConfigApplied { version });
                    }
                    Err(rejection) => {
                        if rejection.reason != ConfigRejectReason::Stale {
                            open.config_rejected = Some(version);
                        }
                        self.events
                            .push_back(HubEvent::ConfigRejected { version, rejection });
                    }
                }
                Ok(())
            }
            Frame::DownlinkAck { upto } if open.capabilities.contains(Capabilities::DOWNLINK) => {
                if upto > open.downlink_sent.max(open.downlink_acked) {
                    return violation(ProtocolViolation::DownlinkAckBeyondSent {
                        upto,
                        sent: open.downlink_sent,
                    });
                }
                while open.downlink_inflight.front().is_some_and(|&l| l <= upto) {
                    open.downlink_inflight.pop_front();
                    open.downlink_progress_at = now;
                }
                if upto > open.downlink_acked {
                    open.downlink_acked = upto;
                    self.events.push_back(HubEvent::DownlinkAcked { upto });
                }
                Ok(())
            }
            other => violation(ProtocolViolation::Unexpected {
                frame: other.frame_type(),
                state: "streaming",
            }),
        }
    }

    /// The oldest batch not committed yet, ending at `upto` (the last seq of its
    /// [`HubEvent::PublishBatch`]), is published and its mark durable; `refusals` are its entries that will
    /// never be published. Queues their `Refused` frames, then the `Ack`, which may wait up to
    /// [`HubConfig::ack_delay`] to cover later batches too (see there). A report that is not about that
    /// batch is ignored.
    pub fn committed(&mut self, upto: u64, mut refusals: Vec<Refusal>, now: Instant) {
        let ack_delay = self.cfg.ack_delay;
        let Some(open) = self.open_mut() else { return };
        if open.uncommitted.front() != Some(&upto) {
            return;
        }
        open.uncommitted.pop_front();
        let (batches, due) = match open.ack_held {
            Some((_, batches, due)) => (batches + 1, due),
            None => (1, now + ack_delay),
        };
        open.ack_held = Some((upto, batches, due));
        // Batches the agent still counts in flight: committed but not acknowledged, and not committed.
        let waiting = batches + open.uncommitted.len();
        let half_window = usize::try_from(open.window / 2)
            .unwrap_or(usize::MAX)
            .max(1);
        let hold = !ack_delay.is_zero() && open.window > 0 && waiting < half_window;
        refusals.sort_by_key(|r| r.seq);
        for r in refusals {
            self.transmits.push_back(Frame::Refused {
                seq: r.seq,
                reason_code: r.reason_code,
                detail: r.detail,
            });
        }
        if !hold {
            self.send_held_ack();
        }
        self.drained_check();
    }

    /// Queues the `Ack` held back for later batches, if any.
    fn send_held_ack(&mut self) {
        if let Some(open) = self.open_mut() {
            if let Some((upto, _, _)) = open.ack_held.take() {
                self.transmits.push_back(Frame::Ack { upto });
            }
        }
    }

    /// Whether an `Ack` is held back for later batches (it is due by [`poll_timeout`](Self::poll_timeout)).
    pub fn ack_held(&self) -> bool {
        self.open().is_some_and(|o| o.ack_held.is_some())
    }

    /// The site should run this config: pushed now if the agent negotiated `CONFIG_PUSH` and does not run
    /// it (and did not refuse it), else at its next connection.
    pub fn push_config(&mut self, offer: ConfigOffer) {
        let Some(open) = self.open_mut() else { return };
        let push = open.capabilities.contains(Capabilities::CONFIG_PUSH)
            && open.agent_config != offer.version
            && open.config_rejected != Some(offer.version)
            && open.config.as_ref().map(|c| c.version) != Some(offer.version);
        if push {
            open.pushed.push(offer.version);
            self.transmits.push_back(Frame::ConfigPush {
                version: offer.version,
                body: offer.body.clone(),
            });
        }
        if let Some(open) = self.open_mut() {
            open.config = Some(offer);
        }
    }

    /// The site's downlink queue holds entries up to `upto`.
    pub fn downlink_written(&mut self, upto: u64) {
        if let Some(open) = self.open_mut() {
            open.downlink_available = upto;
        }
    }

    /// The downlink seq from which the shell should read and send a `Downlink` frame now, if the agent
    /// takes downlink, the window has room and the queue has something.
    pub fn next_downlink_send(&self) -> Option<u64> {
        let open = self.open()?;
        (open.capabilities.contains(Capabilities::DOWNLINK)
            && open.draining.is_none()
            && open.downlink_inflight.len() < self.cfg.downlink_window
            && open.downlink_cursor <= open.downlink_available)
            .then_some(open.downlink_cursor)
    }

    /// The shell read the downlink queue up to `read_upto` and sent frames ending at `frame_lasts`.
    pub fn downlink_sent(
        &mut self,
        now: Instant,
        read_upto: u64,
        frame_lasts: impl IntoIterator<Item = u64>,
    ) {
        if let Some(open) = self.open_mut() {
            open.downlink_cursor = open.downlink_cursor.max(read_upto + 1);
            for last in frame_lasts {
                if open.downlink_inflight.is_empty() {
                    open.downlink_progress_at = now;
                }
                open.downlink_inflight.push_back(last);
                open.downlink_sent = open.downlink_sent.max(last);
            }
        }
    }

    /// Ends the connection once every batch received is committed (replaced, shutting down): the shell
    /// stops reading, keeps committing, and the `GoAway` follows the last `Ack`.
    pub fn drain(&mut self, code: GoAwayCode, reason: String) {
        match self.open_mut() {
            Some(open) => {
                open.draining.get_or_insert((code, reason));
                self.drained_check();
            }
            None => self.close(code, reason),
        }
    }

    /// Ends the connection now with `GoAway{code}` (e.g. `Overloaded` when the cloud broker failed a
    /// batch: nothing uncommitted is acknowledged, so the agent resends it).
    pub fn close(&mut self, code: GoAwayCode, reason: String) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        self.go_away(code, reason.clone(), None);
        self.finish(HubEnd::Closed { code, reason });
    }

    /// The transport failed or the agent finished its stream.
    pub fn connection_lost(&mut self) {
        self.phase = Phase::Closed;
        self.transmits.clear();
    }

    /// Time passed; call at (or after) [`poll_timeout`](Self::poll_timeout).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self
            .open()
            .and_then(|o| o.ack_held)
            .is_some_and(|(_, _, due)| now >= due)
        {
            self.send_held_ack();
        }
        let end = match &mut self.phase {
            Phase::AwaitHello { deadline } if now >= *deadline => Some(HubEnd::HelloTimeout),
            Phase::Open(open) => match open.liveness.on_timeout(now) {
                Err(_) => Some(HubEnd::KeepaliveTimeout),
                Ok(ping) => {
                    if let Some(nonce) = ping {
                        self.transmits.push_back(Frame::Ping { nonce });
                    }
                    self.cfg
                        .downlink_ack_timeout
                        .filter(|&t| {
                            !open.downlink_inflight.is_empty()
                                && now >= open.downlink_progress_at + t
                        })
                        .map(|after| HubEnd::Stalled {
                            after,
                            unacked_frames: open.downlink_inflight.len(),
                        })
                }
            },
            _ => None,
        };
        if let Some(end) = end {
            if let HubEnd::Stalled { after, .. } = &end {
                self.go_away(
                    GoAwayCode::Normal,
                    format!("downlink unacknowledged for {after:?}; reconnect"),
                    None,
                );
            }
            self.finish(end);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::AwaitHello { deadline } => Some(*deadline),
            Phase::Open(open) => {
                let stall = self
                    .cfg
                    .downlink_ack_timeout
                    .filter(|_| !open.downlink_inflight.is_empty())
                    .map(|t| open.downlink_progress_at + t);
                let ack = open.ack_held.map(|(_, _, due)| due);
                [open.liveness.deadline(), stall, ack]
                    .into_iter()
                    .flatten()
                    .min()
            }
            _ => None,
        }
    }

    /// The next frame to write.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmits.pop_front()
    }

    /// The next event for the shell.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    /// Whether the connection is welcomed and not over.
    pub fn is_open(&self) -> bool {
        self.open().is_some()
    }

    /// Whether the connection is over.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// Whether the shell should stop reading (draining towards a `GoAway`).
    pub fn is_draining(&self) -> bool {
        self.open().is_some_and(|o| o.draining.is_some())
    }

    /// Uplink batches received and not committed yet.
    pub fn uncommitted_batches(&self) -> usize {
        self.open().map_or(0, |o| o.uncommitted.len())
    }

    /// The high-water mark announced in `Welcome`.
    pub fn hub_high_water(&self) -> Option<u64> {
        self.open().map(|o| o.hub_high_water)
    }

    fn open(&self) -> Option<&Open> {
        match &self.phase {
            Phase::Open(open) => Some(open),
            _ => None,
        }
    }

    fn open_mut(&mut self) -> Option<&mut Open> {
        match &mut self.phase {
            Phase::Open(open) => Some(open),
            _ => None,
        }
    }

    fn drained_check(&mut self) {
        let done = match self.open() {
            Some(open) if open.uncommitted.is_empty() => open.draining.clone(),
            _ => None,
        };
        if let Some((code, reason)) = done {
            self.close(code, reason);
        }
    }

    fn go_away(&mut self, code: GoAwayCode, reason: String, retry_after_ms: Option<u32>) {
        // What is committed is acknowledged before the connection ends, so the agent does not resend it.
        self.send_held_ack();
        self.transmits.push_back(Frame::GoAway {
            code,
            reason,
            retry_after_ms,
        });
    }

    fn finish(&mut self, end: HubEnd) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        match &end {
            HubEnd::Protocol(v) => self.go_away(v.code(), v.to_string(), None),
            HubEnd::Refused { code, reason } => {
                let already = matches!(self.transmits.back(), Some(Frame::GoAway { .. }));
                if !already {
                    self.go_away(*code, reason.clone(), None);
                }
            }
            _ => {}
        }
        self.phase = Phase::Closed;
        self.events.push_back(HubEvent::Closed { end });
    }
}
