//! The uplink: one QUIC connection to the hub at a time, streaming the durable queue forward.
//!
//! Per connection (the protocol is in `shared::wire` and the design contract): open one bidirectional
//! stream, send `Hello`, read `Welcome`, drop what the hub already has (`hub_high_water`), then read the
//! queue forward from `acked + 1` and send `Batch` frames built straight from the stored bytes with
//! [`BatchEncoder`], keeping at most `uplink.window` batches unacknowledged. Each `Ack{upto}` moves the
//! queue's watermark (`ack_upto`), which deletes the messages. A backlog after an outage and live traffic
//! are the same path: the reader only ever reads the queue forward, as fast as the window allows.
//!
//! Any failure (hub unreachable, refused, link lost, `GoAway`) ends the connection; the loop reconnects
//! with exponential backoff and jitter between `reconnect_min` and `reconnect_max`, resolving the hub's
//! address again each time. Nothing is lost: unacknowledged messages stay in the queue and are resent.
//! Three rules keep that loop quick without hammering the hub (issue 7):
//! - a hub that does not answer at all costs it nothing, so it is probed with fresh handshakes every
//!   250-500 ms ([`handshake`]) rather than waited for with the backoff;
//! - a hub that answers with a refusal carrying a retry-after (`GoAway{Unavailable}` while its cloud broker
//!   is down) is retried after that, plus jitter;
//! - the backoff returns to `reconnect_min` only after a session proved healthy (a batch acknowledged, or
//!   [`HEALTHY_AFTER`] up), not on `Welcome`.
//!
//! Shutdown: stop sending new batches, wait for the in-flight ones to be acknowledged (at most
//! `shutdown_timeout`), send `GoAway{Normal}`, close the connection with code 0 and wait for the endpoint
//! to be idle.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use meshbridge_metrics::timer::Deadline;
use quinn::{Endpoint, RecvStream, SendStream, VarInt};
use shared::config::UplinkConfig;
use shared::limits::SharedLimits;
use shared::link::agent::{AgentAction, AgentConfig, AgentEnd, AgentLink, QueueMarks};
use shared::link::lane;
use shared::link::ProtocolViolation;
use shared::queue::{
    DeadLetterLimits, DeadLetters, Entry, NewDeadLetter, Queue, QueueError, RedbQueue,
};
use shared::wire::{
    self, BatchEncoder, BatchKind, Capabilities, DecodeError, EncodeError, Frame, GoAwayCode,
};
use tokio::sync::{watch, Notify};

use crate::events;
use crate::local::deliver::Delivery;
use crate::pushed::Pushed;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn, Instrument};

/// How long the hub may take to answer `Hello` with `Welcome`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// While the hub does not answer, a fresh handshake attempt (a *probe*) is started every 250-500 ms (this,
/// jittered down to half). quinn resends an unanswered Initial packet only after 0.3 s, 0.9 s, 2.1 s, ...
/// (doubling), so one attempt kept alive notices a hub that came back later and later: with the attempt as
/// long as the backoff (up to `reconnect_max`, 10 s by default), first deliveries came 2 s after a 20 s
/// outage. A probe sends its Initial at once, so the hub is found within 0.5 s of being reachable.
const CONNECT_PROBE: Duration = Duration::from_millis(500);
/// A probe is abandoned after this, before quinn's first resend (~0.3 s with the uplink's 100 ms initial
/// RTT), so it costs exactly two datagrams (its Initial and the close): about 5 datagrams (6 KB) per second
/// per agent while the hub is down, plus the long attempt's.
const PROBE_LIFETIME: Duration = Duration::from_millis(250);
/// How often a *long* attempt, left to quinn's own handshake timeout (the idle timeout), is started. It is
/// the one that completes on a link whose round trip exceeds [`PROBE_LIFETIME`].
const LONG_ATTEMPT_EVERY: Duration = Duration::from_secs(5);
/// How long one connect phase keeps trying before the hub's address is resolved again (and the agent logs
/// that the hub is unreachable).
const CONNECT_PHASE: Duration = Duration::from_secs(10);
/// How long a welcomed session must stay up to count as healthy when the hub acknowledged nothing (an idle
/// site); an acknowledged batch counts at once. Only a healthy session resets the reconnect backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(5);
/// How long the end of shutdown waits for the endpoint to finish closing.
const IDLE_WAIT: Duration = Duration::from_secs(3);
/// How long the closing `GoAway` may take to be acknowledged before the connection is closed anyway.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);
/// Largest read from the stream at once.
const READ_CHUNK: usize = 64 * 1024;
/// After a `Welcome`, how long a lane waits for a higher lane with a backlog to connect before it sends
/// anyway: lanes reconnect independently (a probe every [`CONNECT_PROBE`]), and without it the lowest lane
/// could drain much of its backlog before the highest one is back. Bounded, so a higher lane the hub
/// refuses cannot hold the others for long.
const LANE_GRACE: Duration = Duration::from_secs(1);

/// Why one uplink connection ended. Logged by the reconnect loop; never fatal to the agent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UplinkError {
    /// The hub's host name did not resolve.
    #[error("cannot resolve hub address {hub}")]
    Resolve {
        /// `uplink.hub`.
        hub: String,
        /// The resolver error.
        #[source]
        source: std::io::Error,
    },
    /// The hub's host name resolved to no address.
    #[error("hub address {hub} resolved to nothing")]
    NoAddress {
        /// `uplink.hub`.
        hub: String,
    },
    /// The UDP socket of the QUIC client could not be bound.
    #[error("cannot bind the uplink's UDP socket on {addr}")]
    Bind {
        /// The local address tried.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// quinn refused to start the connection (e.g. an invalid server name).
    #[error("cannot start a QUIC connection")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed (handshake, TLS refusal, timeout, closed by the hub).
    #[error("QUIC connection failed")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to the stream failed.
    #[error("writing to the hub failed")]
    Write(#[from] quinn::WriteError),
    /// Reading from the stream failed.
    #[error("reading from the hub failed")]
    Read(#[from] quinn::ReadError),
    /// The hub finished its side of the stream.
    #[error("the hub closed the stream")]
    StreamClosed,
    /// The hub sent bytes that are not a valid frame.
    #[error("malformed frame from the hub")]
    Decode(#[from] DecodeError),
    /// A frame could not be encoded (cannot happen with sane limits).
    #[error("cannot encode a frame")]
    Encode(#[from] EncodeError),
    /// The hub said goodbye.
    #[error("hub sent GoAway {code:?}: {reason}")]
    GoAway {
        /// Its code.
        code: GoAwayCode,
        /// Its explanation.
        reason: String,
        /// How long the hub asked us to wait before the next attempt (honoured, plus jitter).
        retry_after: Option<Duration>,
    },
    /// The hub broke the link protocol (a frame out of place, an `Ack` beyond what was sent, ...); the
    /// link machine answered with `GoAway{ProtocolError}`.
    #[error("the hub broke the protocol")]
    Protocol(#[from] ProtocolViolation),
    /// A `Ping` went unanswered (only with a keepalive configured in the link machine).
    #[error("the hub stopped answering pings")]
    KeepaliveTimeout,
    /// The stuck-link watchdog (`uplink.ack_timeout`): connected, but no `Ack` for the batches in flight.
    #[error("stuck link: {unacked_batches} batch(es) unacknowledged for {after:?} on a live connection; replacing it")]
    Stalled {
        /// The timeout.
        after: Duration,
        /// Batches in flight.
        unacked_batches: usize,
    },
    /// The hub answered no QUIC handshake attempt of a whole connect phase (it is down or unreachable);
    /// retried at once, because the phase itself paced its attempts.
    #[error("no answer to the QUIC handshake within {after:?}")]
    ConnectTimeout {
        /// How long the attempt waited.
        after: Duration,
    },
    /// No `Welcome` in time.
    #[error("no Welcome within {after:?}")]
    HandshakeTimeout {
        /// The timeout.
        after: Duration,
    },
    /// The dead-letter store could not take a refused message; it stays in the queue and the session
    /// restarts, so nothing is lost (the refusal comes again).
    #[error("cannot file dead letters")]
    DeadLetters(#[source] QueueError),
    /// The hub has seen seqs of this queue's incarnation that this queue never wrote: the data directory
    /// was restored from a backup or snapshot (or copied to a second agent). The queue has started a new
    /// incarnation above the hub's mark ([`RedbQueue::restart_above`]); the next connection says so.
    #[error(
        "the hub has seen seq {hub_high_water} but this queue only ever wrote up to {written}: \
         data directory restored or copied? incarnation {old_incarnation:#x} is replaced by \
         {incarnation:#x}, numbered above the hub's mark"
    )]
    Restarted {
        /// The hub's high-water mark for the old incarnation.
        hub_high_water: u64,
        /// The highest seq this queue had written.
        written: u64,
        /// The incarnation the hub knew.
        old_incarnation: u64,
        /// The new incarnation.
        incarnation: u64,
    },
    /// The queue failed.
    #[error("queue failed")]
    Queue(#[from] QueueError),
    /// A blocking queue task panicked.
    #[error("queue task panicked")]
    Panicked(#[source] tokio::task::JoinError),

    /// The local broker did not take a downlink batch; the hub sends it again on the next connection.
    #[error("downlink delivery to the local broker failed")]
    Downlink(#[source] crate::local::deliver::DeliverError),
}

/// TLS alerts (RFC 8446 §6.2) that mean the hub refused our certificate: bad, unsupported, revoked,
/// expired, unknown, unknown CA, missing. Retrying will not help until the certificate is replaced.
const CERTIFICATE_ALERTS: [u8; 7] = [42, 43, 44, 45, 46, 48, 116];

impl UplinkError {
    /// Whether an operator must act (the hub refuses us for a reason retrying alone will not fix).
    fn needs_operator(&self) -> bool {
        matches!(
            self,
            Self::GoAway {
                code: GoAwayCode::Unauthorized | GoAwayCode::IncompatibleVersion,
                ..
            } | Self::DeadLetters(_)
                | Self::Queue(_)
                | Self::Connection(quinn::ConnectionError::TransportError(_))
        ) || peer_tls_alert(self).is_some_and(|alert| CERTIFICATE_ALERTS.contains(&alert))
    }
}

/// The TLS alert the hub closed the connection with (a QUIC crypto error, codes 0x100–0x1ff), found
/// anywhere in `error`'s source chain; a revoked certificate arrives this way (alert 44), wrapped in the
/// read that noticed the close.
fn peer_tls_alert(error: &(dyn std::error::Error + 'static)) -> Option<u8> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(quinn::ConnectionError::ConnectionClosed(close)) =
            e.downcast_ref::<quinn::ConnectionError>()
        {
            let code = u64::from(close.error_code);
            if (0x100..0x200).contains(&code) {
                return u8::try_from(code - 0x100).ok();
            }
        }
        next = e.source();
    }
    None
}

/// The uplink task's state across connections.
pub(crate) struct Uplink {
    cfg: UplinkConfig,
    /// The name `Hello` gives: the site's, or this member's in a redundant pair (`agent_name`).
    agent_name: Arc<str>,
    /// The priority lane this uplink carries (see [`crate::lanes`]).
    lane: u8,
    queue: Arc<RedbQueue>,
    appended: Arc<Notify>,
    /// The lane's event counters.
    counters: crate::metrics::LaneCounters,
    /// Which lanes are connected with something to send (bits of `shared::link::lane::bit`): a lane
    /// starts no batch while a higher one is busy.
    busy: Arc<watch::Sender<u16>>,
    /// Every lane of the agent, to see whether a higher one has a backlog while it is still connecting.
    lanes: std::sync::Weak<crate::lanes::Lanes>,
    /// The dead-letter store's file (opened only while filing; see `shared::queue::DeadLetters`).
    dead_letters: PathBuf,
    client_config: quinn::ClientConfig,
    endpoint: Option<Endpoint>,
    /// The path's limits, which every `Welcome` updates (see `crate::limits`).
    limits: Arc<SharedLimits>,
    /// Where the hub's last limits are persisted.
    data_dir: PathBuf,
    /// Configs the hub pushes: checked, kept, put in force.
    pushed: Arc<Pushed>,
    /// Publishes downlink messages into the local broker (one batch at a time).
    delivery: tokio::sync::Mutex<Delivery>,
}

/// Where what the hub sends down goes: its limits, its configs, its downlink messages.
pub(crate) struct FromHub {
    /// The path's limits, which every `Welcome` updates.
    pub(crate) limits: Arc<SharedLimits>,
    /// Pushed configs.
    pub(crate) pushed: Arc<Pushed>,
    /// Downlink delivery into the local broker.
    pub(crate) delivery: Delivery,
}

/// How a connection ended.
struct SessionEnd {
    /// The hub answered `Hello` with `Welcome` (for the log level only).
    welcomed: bool,
    /// The session proved the link works end to end (see [`Session::healthy`]), so the next reconnect starts
    /// from the shortest backoff.
    healthy: bool,
    /// `Ok` on a clean shutdown.
    result: Result<(), UplinkError>,
}

impl Uplink {
    /// Prepares the uplink; no I/O yet.
    #[allow(clippy::too_many_arguments)] // each is a distinct piece the lane's connection needs
    pub(crate) fn new(
        cfg: UplinkConfig,
        agent_name: Arc<str>,
        lane: &crate::lanes::Lane,
        lanes: std::sync::Weak<crate::lanes::Lanes>,
        busy: Arc<watch::Sender<u16>>,
        client_config: quinn::ClientConfig,
        data_dir: PathBuf,
        from_hub: FromHub,
    ) -> Self {
        let FromHub {
            limits,
            pushed,
            delivery,
        } = from_hub;
        Self {
            pushed,
            delivery: tokio::sync::Mutex::new(delivery),
            dead_letters: data_dir.join(crate::DEAD_LETTERS_FILE),
            cfg,
            agent_name,
            lane: lane.lane,
            queue: Arc::clone(&lane.queue),
            appended: Arc::clone(&lane.appended),
            counters: lane.counters.clone(),
            busy,
            lanes,
            client_config,
            endpoint: None,
            limits,
            data_dir,
        }
    }

    /// Connects, streams, reconnects, until `shutdown`; then drains as described in the module docs.
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = self.cfg.reconnect_min;
        let mut attempt: u64 = 0;
        // Lives across connections: the protocol state of the link (see `shared::link`).
        let mut link = AgentLink::new(
            AgentConfig {
                agent_name: self.agent_name.to_string(),
                lane: self.lane,
                // Lane 0 takes the site's config; every lane takes the downlink of its priority.
                capabilities: if self.lane == 0 {
                    Capabilities::RETRY_AFTER
                        .union(Capabilities::CONFIG_PUSH)
                        .union(Capabilities::DOWNLINK)
                } else {
                    Capabilities::RETRY_AFTER.union(Capabilities::DOWNLINK)
                },
                window: usize::try_from(self.cfg.window).unwrap_or(usize::MAX),
                handshake_timeout: HANDSHAKE_TIMEOUT,
                versions: shared::wire::VersionRange::supported_up_to(
                    self.cfg.max_protocol_version,
                ),
                keepalive: None,
                ack_timeout: Some(self.cfg.ack_timeout),
            },
            self.pushed.version(),
        );
        while !shutdown.is_cancelled() {
            attempt += 1;
            let end = self.connect_and_stream(&mut link, &shutdown, attempt).await;
            // Only a session that worked resets the backoff. A `Welcome` alone proves nothing: a hub whose
            // cloud broker is down used to welcome and then fail the first batch, and resetting on it made
            // every site re-handshake ~10 times a second.
            if end.healthy {
                backoff = self.cfg.reconnect_min;
            }
            let error = match end.result {
                Ok(()) => break,
                Err(error) => error,
            };
            let stats = self.queue.stats();
            let delay = match &error {
                // A connect phase paces its own attempts: start the next one at once.
                UplinkError::ConnectTimeout { .. } => Duration::ZERO,
                // A restarted queue must tell the hub at once.
                UplinkError::Restarted { .. } => Duration::ZERO,
                // The hub said when: at least that, plus up to half of it so refused sites spread out.
                UplinkError::GoAway {
                    retry_after: Some(after),
                    ..
                } => *after + jitter(*after / 2, attempt),
                _ => jitter(backoff, attempt),
            };
            let kind = if error.needs_operator() {
                events::DownKind::NeedsOperator
            } else if end.welcomed {
                events::DownKind::Lost
            } else if matches!(error, UplinkError::GoAway { .. }) {
                events::DownKind::Refused
            } else {
                events::DownKind::Unreachable
            };
            events::LinkDown {
                kind,
                cause: &error,
                chain: &Chain(&error),
                retry_in: delay,
                depth: stats.depth,
                stalled: matches!(error, UplinkError::Stalled { .. }),
            }
            .emit(&self.counters);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
            backoff = (backoff * 2).min(self.cfg.reconnect_max);
        }
        if let Some(endpoint) = self.endpoint.take() {
            // Bounded: a connection that cannot finish closing must not hold the process.
            let _ = tokio::time::timeout(IDLE_WAIT, endpoint.wait_idle()).await;
        }
    }

    /// The endpoint for `addr`'s address family, bound on first use.
    fn endpoint_for(&mut self, addr: SocketAddr) -> Result<Endpoint, UplinkError> {
        let local: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        if let Some(endpoint) = &self.endpoint {
            if endpoint
                .local_addr()
                .is_ok_and(|l| l.is_ipv4() == addr.is_ipv4())
            {
                return Ok(endpoint.clone());
            }
        }
        let mut endpoint = Endpoint::client(local).map_err(|source| UplinkError::Bind {
            addr: local,
            source,
        })?;
        endpoint.set_default_client_config(self.client_config.clone());
        self.endpoint = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// Whether a lane above this one holds messages (connected or not).
    fn higher_lane_has_backlog(&self) -> bool {
        self.lanes.upgrade().is_some_and(|lanes| {
            lanes
                .all()
                .iter()
                .any(|l| l.lane > self.lane && l.queue.depth() > 0)
        })
    }

    /// One connection: handshake (see [`handshake`]), then the session.
    async fn connect_and_stream(
        &mut self,
        link: &mut AgentLink,
        shutdown: &CancellationToken,
        attempt: u64,
    ) -> SessionEnd {
        let hub = self.cfg.hub.to_string();
        let addr = match tokio::net::lookup_host((self.cfg.hub.host(), self.cfg.hub.port())).await {
            Ok(mut addrs) => match addrs.next() {
                Some(addr) => addr,
                None => return not_welcomed(UplinkError::NoAddress { hub }),
            },
            Err(source) => return not_welcomed(UplinkError::Resolve { hub, source }),
        };
        let endpoint = match self.endpoint_for(addr) {
            Ok(endpoint) => endpoint,
            Err(error) => return not_welcomed(error),
        };
        let conn = match handshake(&endpoint, addr, &self.cfg.server_name, shutdown, attempt).await
        {
            Ok(Some(conn)) => conn,
            Ok(None) => {
                return SessionEnd {
                    welcomed: false,
                    healthy: false,
                    result: Ok(()),
                }
            }
            Err(error) => return not_welcomed(error),
        };
        let span = tracing::info_span!("uplink", hub = %addr, lane = self.lane);
        let mut session = Session {
            uplink: self,
            conn: conn.clone(),
            addr,
            welcomed: false,
            acked: false,
            started: Instant::now(),
            traced: VecDeque::new(),
        };
        let result = session.run(link, shutdown).instrument(span).await;
        self.counters.connected.set(0);
        let welcomed = session.welcomed;
        let healthy = session.healthy();
        match &result {
            Ok(()) => conn.close(VarInt::from_u32(0), b"agent shutting down"),
            Err(UplinkError::GoAway { .. } | UplinkError::Connection(_)) => {}
            Err(e) => {
                let code = match e {
                    UplinkError::Decode(_) | UplinkError::Protocol(_) => GoAwayCode::ProtocolError,
                    _ => GoAwayCode::Normal,
                };
                conn.close(VarInt::from(code.code()), e.to_string().as_bytes());
            }
        }
        SessionEnd {
            welcomed,
            healthy,
            result,
        }
    }
}

/// One connect phase: QUIC handshakes to `addr` until one completes (`Some`), the hub answers with a
/// refusal (the error), `shutdown` (`None`), or [`CONNECT_PHASE`] passes without an answer.
///
/// A probe every [`CONNECT_PROBE`] (jittered), each abandoned after [`PROBE_LIFETIME`], so a hub that
/// comes back receives a fresh Initial packet within 0.5 s; and a long attempt every
/// [`LONG_ATTEMPT_EVERY`], left to run until quinn gives it up, for links slower than a probe's lifetime.
/// At most one of each is alive, so a hub that comes back sees at most two handshakes per agent; the loser
/// is dropped (closed).
async fn handshake(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
    shutdown: &CancellationToken,
    attempt: u64,
) -> Result<Option<quinn::Connection>, UplinkError> {
    let start = Instant::now();
    let phase_end = start + CONNECT_PHASE;
    let mut long = Some(endpoint.connect(addr, server_name)?);
    let mut next_long = start + LONG_ATTEMPT_EVERY;
    let mut probe: Option<(quinn::Connecting, Instant)> = None;
    let mut probes: u64 = 0;
    // Jittered like the backoff, so that agents cut off together do not probe in lockstep.
    let mut probe_interval = || {
        probes += 1;
        jitter(
            CONNECT_PROBE,
            attempt.wrapping_mul(1_000).wrapping_add(probes),
        )
    };
    let mut next_probe = start + probe_interval();
    loop {
        let probe_end = probe.as_ref().map_or(phase_end, |(_, end)| *end);
        let wake = next_probe.min(probe_end).min(next_long).min(phase_end);
        tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            done = async { long.as_mut().expect("guarded by the condition").await }, if long.is_some() => {
                match done {
                    Ok(conn) => return Ok(Some(conn)),
                    // Unanswered for quinn's whole handshake timeout; the next one starts at `next_long`.
                    Err(quinn::ConnectionError::TimedOut) => long = None,
                    Err(refused) => return Err(refused.into()),
                }
            }
            done = async { (&mut probe.as_mut().expect("guarded by the condition").0).await }, if probe.is_some() => {
                match done {
                    Ok(conn) => return Ok(Some(conn)),
                    Err(quinn::ConnectionError::TimedOut) => probe = None,
                    Err(refused) => return Err(refused.into()),
                }
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if now >= phase_end {
                    return Err(UplinkError::ConnectTimeout { after: CONNECT_PHASE });
                }
                if probe.as_ref().is_some_and(|(_, end)| now >= *end) {
                    // Dropping it abandons it.
                    probe = None;
                }
                if now >= next_probe {
                    probe = Some((endpoint.connect(addr, server_name)?, now + PROBE_LIFETIME));
                    next_probe = now + probe_interval();
                }
                if now >= next_long {
                    if long.is_none() {
                        long = Some(endpoint.connect(addr, server_name)?);
                    }
                    next_long = now + LONG_ATTEMPT_EVERY;
                }
            }
        }
    }
}

fn not_welcomed(error: UplinkError) -> SessionEnd {
    SessionEnd {
        welcomed: false,
        healthy: false,
        result: Err(error),
    }
}

/// One connection's state.
struct Session<'a> {
    uplink: &'a Uplink,
    conn: quinn::Connection,
    addr: SocketAddr,
    welcomed: bool,
    /// The hub acknowledged at least one batch on this connection.
    acked: bool,
    /// When the QUIC handshake completed.
    started: Instant,
    /// Traced messages sent on this connection and not yet acknowledged (see `crate::traced`).
    traced: VecDeque<crate::traced::Sent>,
}

/// Frames read from the hub.
struct Reader {
    recv: RecvStream,
    buf: BytesMut,
    max_frame_size: usize,
}

impl Reader {
    /// The next frame; cancel-safe (a cancelled read loses no bytes).
    async fn next(&mut self) -> Result<Frame, UplinkError> {
        loop {
            if let Some(frame) = wire::decode(&mut self.buf, self.max_frame_size)? {
                return Ok(frame);
            }
            match self.recv.read_chunk(READ_CHUNK, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None => return Err(UplinkError::StreamClosed),
            }
        }
    }
}

impl Session<'_> {
    /// Drives the link machine over this connection: frames read go in, frames it transmits are written,
    /// its actions become queue and dead-letter operations, and its timeout is slept on.
    async fn run(
        &mut self,
        link: &mut AgentLink,
        shutdown: &CancellationToken,
    ) -> Result<(), UplinkError> {
        let cfg = &self.uplink.cfg;
        let queue = &self.uplink.queue;
        let (mut send, recv) = self.conn.open_bi().await?;
        let mut reader = Reader {
            recv,
            buf: BytesMut::with_capacity(READ_CHUNK),
            max_frame_size: cfg.max_frame_size.as_usize(),
        };
        let stats = queue.stats();
        let mut out = BytesMut::with_capacity(64 * 1024);
        let conn = link.connect(
            now(),
            QueueMarks {
                incarnation: queue.incarnation(),
                acked: stats.acked,
                written: stats.next_seq - 1,
            },
        );
        let batch_messages = usize::try_from(cfg.batch_max_messages).unwrap_or(usize::MAX);
        let batch_bytes = cfg.batch_max_bytes.as_usize();
        // The smaller of ours and the hub's, once welcomed.
        let mut max_frame_size = cfg.max_frame_size.as_usize();
        let mut batch_lasts: VecDeque<u64> = VecDeque::new();
        let mut stopping = false;
        // Strict priority between lanes (see `shared::link::lane`): this lane is busy while welcomed with
        // entries its hub has not acknowledged (unsent or in flight), and holds back while a higher lane is.
        let busy = BusyBit::new(&self.uplink.busy, self.uplink.lane);
        let mut higher = self.uplink.busy.subscribe();
        // Until then, a higher lane with a backlog that is still connecting holds this one back too.
        let mut grace_until: Option<Instant> = None;
        // Built once, not per turn of the loop: a future built inside `select!` registers with its token,
        // `Notify` or timer on every turn and unregisters when dropped, a turn or two per commit.
        let mut stop = std::pin::pin!(shutdown.cancelled());
        let appended = Arc::clone(&self.uplink.appended);
        let mut appended_wait = std::pin::pin!(appended.notified());
        let mut link_timer = Deadline::new();

        loop {
            while let Some(action) = link.poll_action() {
                match action {
                    AgentAction::Welcomed {
                        version,
                        limits,
                        hub_high_water,
                        hub_version,
                        ..
                    } => {
                        debug!(
                            version,
                            max_frame_size = limits.max_frame_size,
                            max_message_size = limits.max_message_size,
                            max_topic_len = limits.max_topic_len,
                            "welcomed"
                        );
                        crate::limits::announce(&self.uplink.limits, &self.uplink.data_dir, limits)
                            .await;
                        let hub_max = usize::try_from(limits.max_frame_size).unwrap_or(usize::MAX);
                        max_frame_size = hub_max.min(cfg.max_frame_size.as_usize());
                        self.welcomed = true;
                        grace_until = Some(Instant::now() + LANE_GRACE);
                        events::LinkUp {
                            hub: self.addr,
                            protocol: version,
                            hub_version: &hub_version,
                            depth: stats.depth,
                            acked: stats.acked.max(hub_high_water),
                            hub_high_water,
                            rtt: self.conn.rtt(),
                        }
                        .emit(&self.uplink.counters);
                    }
                    AgentAction::AckUpTo { upto } => {
                        // By the watermark: appends during the ack do not move it.
                        let before = queue.acked();
                        // In memory only (the next commit writes it): no blocking hop per ack.
                        queue.ack_upto(upto).map_err(UplinkError::Queue)?;
                        events::Acknowledged {
                            upto,
                            count: queue.acked().saturating_sub(before),
                            rtt: self.conn.rtt(),
                        }
                        .emit(&self.uplink.counters);
                        self.acked |= link.acked_any();
                        if let Some(traces) = meshbridge_metrics::otel::traces() {
                            crate::traced::acked(traces, upto, &mut self.traced);
                        }
                    }
                    AgentAction::DeadLetter {
                        seq,
                        reason_code,
                        detail,
                    } => self.dead_letter(seq, reason_code, detail).await?,
                    AgentAction::ApplyConfig { version, body } => {
                        let pushed = Arc::clone(&self.uplink.pushed);
                        let result =
                            tokio::task::spawn_blocking(move || pushed.apply(version, &body))
                                .await
                                .map_err(UplinkError::Panicked)?;
                        let reason = result.as_ref().err().map(|r| r.reason.to_string());
                        events::ConfigPushed {
                            version,
                            refused: result.as_ref().err().map(|r| {
                                (reason.as_deref().unwrap_or_default(), r.detail.as_str())
                            }),
                        }
                        .emit(&self.uplink.counters);
                        link.config_applied(version, result);
                    }
                    AgentAction::DeliverDownlink { conn, entries } => {
                        let Some(upto) = entries.last().map(|e| e.seq) else {
                            continue;
                        };
                        let published = self
                            .uplink
                            .delivery
                            .lock()
                            .await
                            .deliver(&entries, crate::ingest::now_ms())
                            .await
                            .map_err(UplinkError::Downlink)?;
                        debug!(
                            upto,
                            published, "downlink batch delivered to the local broker"
                        );
                        link.downlink_delivered(conn, upto);
                    }
                    AgentAction::Closed { end, .. } => {
                        flush(link, &mut out, &mut send).await?;
                        return self.closed(end, &mut send).await;
                    }
                }
            }

            // Fill the window straight from the queue, unless a higher lane has the link.
            let waiting_for_higher = grace_until.is_some_and(|t| Instant::now() < t)
                && self.uplink.higher_lane_has_backlog();
            let outranked = waiting_for_higher
                || lane::outranked(*higher.borrow_and_update(), self.uplink.lane);
            while let Some(from) = link.next_send().filter(|_| !outranked) {
                // Right behind the appends the entries are still in memory; a backlog comes from the file
                // on a blocking thread.
                let entries = match queue.read_cached(from, batch_messages, batch_bytes) {
                    Some(entries) => entries,
                    None => {
                        blocking(queue, move |q| q.read(from, batch_messages, batch_bytes)).await?
                    }
                };
                let Some(last) = entries.last().map(|e| e.seq) else {
                    link.queue_written(from - 1);
                    break;
                };
                if let Some(traces) = meshbridge_metrics::otel::traces() {
                    crate::traced::sending(traces, self.uplink.lane, &entries, &mut self.traced);
                }
                let too_large =
                    encode_batches(&entries, &mut out, max_frame_size, &mut batch_lasts)?;
                events::Sent {
                    from,
                    to: last,
                    count: entries.len() as u64,
                }
                .emit(&self.uplink.counters);
                link.batches_sent(now(), last, batch_lasts.drain(..));
                if !too_large.is_empty() {
                    let letters = too_large
                        .into_iter()
                        .map(|e| NewDeadLetter {
                            seq: e.seq,
                            reason_code: REASON_PACKET_TOO_LARGE,
                            detail: format!(
                                "{}-byte message does not fit the hub's frame limit of {max_frame_size} bytes",
                                e.body.len()
                            ),
                            body: e.body,
                        })
                        .collect();
                    self.file_dead_letters(letters).await?;
                }
            }
            flush(link, &mut out, &mut send).await?;
            busy.set(self.welcomed && queue.depth() > 0);

            link_timer.set(link.poll_timeout().map(Instant::from_std));
            tokio::select! {
                () = stop.as_mut(), if !stopping => {
                    if !link.is_open() {
                        // Still in the handshake: nothing in flight to wait for.
                        return Ok(());
                    }
                    stopping = true;
                    debug!(unacked_batches = link.inflight_batches(), "uplink draining for shutdown");
                    let at = now();
                    link.shutdown(at, at + cfg.shutdown_timeout);
                }
                () = link_timer.expired(), if link_timer.is_set() => link.handle_timeout(now()),
                () = appended_wait.as_mut(), if link.wants_data() => {
                    appended_wait.set(appended.notified());
                    // Read to find out how much: cheaper than asking the queue for its stats.
                    link.queue_written(u64::MAX);
                }
                () = sleep_until(grace_until), if waiting_for_higher => grace_until = None,
                changed = higher.changed(), if outranked => {
                    if changed.is_err() {
                        return Err(UplinkError::StreamClosed);
                    }
                }
                frame = reader.next() => link.handle_frame(conn, frame?, now()),
            }
        }
    }

    /// What the end of the connection means for the reconnect loop.
    async fn closed(&mut self, end: AgentEnd, send: &mut SendStream) -> Result<(), UplinkError> {
        match end {
            AgentEnd::Shutdown { unacked_batches } => {
                if unacked_batches > 0 {
                    warn!(
                        unacked_batches,
                        "shutdown timeout: closing with batches unacknowledged (they are resent next time)"
                    );
                }
                // Closing the connection discards unsent stream data, so give the GoAway a moment to be
                // delivered (the stream may already be reset by the hub: closing follows either way).
                if send.finish().is_ok() {
                    let _ = tokio::time::timeout(GOAWAY_GRACE, send.stopped()).await;
                }
                Ok(())
            }
            AgentEnd::GoAway {
                code,
                reason,
                retry_after,
            } => Err(UplinkError::GoAway {
                code,
                reason,
                retry_after,
            }),
            AgentEnd::Protocol(violation) => Err(UplinkError::Protocol(violation)),
            AgentEnd::HandshakeTimeout { after } => Err(UplinkError::HandshakeTimeout { after }),
            AgentEnd::KeepaliveTimeout => Err(UplinkError::KeepaliveTimeout),
            AgentEnd::Stalled {
                after,
                unacked_batches,
            } => Err(UplinkError::Stalled {
                after,
                unacked_batches,
            }),
            AgentEnd::Restarted {
                hub_high_water,
                written,
            } => {
                // Acknowledging up to the hub's mark would delete messages the hub never saw, and new ones
                // would reuse seqs it has: start over above its mark instead, and reconnect as the new
                // incarnation.
                let queue = &self.uplink.queue;
                let old_incarnation = queue.incarnation();
                let incarnation = blocking(queue, move |q| q.restart_above(hub_high_water)).await?;
                Err(UplinkError::Restarted {
                    hub_high_water,
                    written,
                    old_incarnation,
                    incarnation,
                })
            }
        }
    }

    /// Files the refused entry `seq` in the dead-letter store; it is still stored, because the `Ack` that
    /// covers it comes after the `Refused`.
    async fn dead_letter(
        &self,
        seq: u64,
        reason_code: u8,
        detail: String,
    ) -> Result<(), UplinkError> {
        let entry = blocking(&self.uplink.queue, move |q| q.read(seq, 1, usize::MAX))
            .await?
            .into_iter()
            .find(|e| e.seq == seq);
        match entry {
            Some(entry) => {
                self.file_dead_letters(vec![NewDeadLetter {
                    seq,
                    reason_code,
                    detail,
                    body: entry.body,
                }])
                .await
            }
            None => {
                warn!(seq, reason_code, %detail, "hub refused a message this queue no longer holds");
                Ok(())
            }
        }
    }

    /// Files refused messages in the dead-letter store (durably, before the queue may forget them), and
    /// says so.
    async fn file_dead_letters(&self, letters: Vec<NewDeadLetter>) -> Result<(), UplinkError> {
        let path = self.uplink.dead_letters.clone();
        let summary: Vec<(u64, u8, String)> = letters
            .iter()
            .map(|l| (l.seq, l.reason_code, l.detail.clone()))
            .collect();
        let lane = self.uplink.lane;
        let mut letters = letters;
        for letter in &mut letters {
            letter.seq = lane::dead_letter_seq(lane, letter.seq);
        }
        let evicted = tokio::task::spawn_blocking(move || {
            let store = DeadLetters::open(&path, DeadLetterLimits::default(), DEAD_LETTERS_WAIT)?;
            store.add(&letters, crate::ingest::now_ms())
        })
        .await
        .map_err(UplinkError::Panicked)?
        .map_err(UplinkError::DeadLetters)?;
        for (seq, reason_code, detail) in summary {
            events::DeadLettered {
                lane,
                seq,
                reason_code,
                detail: &detail,
            }
            .emit(&self.uplink.counters);
        }
        if evicted > 0 {
            error!(
                evicted,
                "dead-letter store full: its oldest letters were discarded"
            );
        }
        Ok(())
    }

    /// Whether this session proved the link works: the hub acknowledged a batch, or the session stayed up
    /// [`HEALTHY_AFTER`] after `Welcome` (an idle site has nothing to acknowledge).
    fn healthy(&self) -> bool {
        self.acked || (self.welcomed && self.started.elapsed() >= HEALTHY_AFTER)
    }
}

/// This lane's bit in the busy mask, cleared when the session ends however it ends.
struct BusyBit<'a> {
    mask: &'a watch::Sender<u16>,
    lane: u8,
}

impl<'a> BusyBit<'a> {
    const fn new(mask: &'a watch::Sender<u16>, lane: u8) -> Self {
        Self { mask, lane }
    }

    fn set(&self, busy: bool) {
        self.mask
            .send_if_modified(|mask| lane::mark(mask, self.lane, busy));
    }
}

impl Drop for BusyBit<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Writes every frame the machine has queued, in one write.
async fn flush(
    link: &mut AgentLink,
    out: &mut BytesMut,
    send: &mut SendStream,
) -> Result<(), UplinkError> {
    while let Some(frame) = link.poll_transmit() {
        frame.encode(out)?;
    }
    if !out.is_empty() {
        send.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// The machine's clock: tokio's, so that paused-time tests drive it too.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Sleeps until `at`; only polled when `at` is `Some`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Encodes `entries` into as many `Batch` frames as the frame limit needs, recording each frame's last
/// seq in `inflight`. Returns the entries that can never fit a frame (for the dead-letter store): they are
/// left out, and the next batch's `Ack` covers them.
fn encode_batches(
    entries: &[Entry],
    out: &mut BytesMut,
    max_frame_size: usize,
    inflight: &mut VecDeque<u64>,
) -> Result<Vec<Entry>, UplinkError> {
    let mut too_large = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let mut batch = BatchEncoder::new(out, BatchKind::Uplink, max_frame_size);
        let mut last = None;
        let mut taken = 0;
        for entry in rest {
            match batch.try_push(entry.seq, &entry.body) {
                Ok(()) => last = Some(entry.seq),
                Err(EncodeError::FrameTooLarge { .. }) if !batch.is_empty() => break,
                Err(EncodeError::FrameTooLarge { .. }) => too_large.push(entry.clone()),
                Err(e) => return Err(e.into()),
            }
            taken += 1;
        }
        if batch.is_empty() {
            // Dropping an unfinished encoder takes its header back out of `out`.
            drop(batch);
        } else {
            batch.finish();
        }
        if let Some(last) = last {
            inflight.push_back(last);
        }
        rest = &rest[taken..];
    }
    Ok(too_large)
}

/// MQTT 5 reason code "packet too large", for an entry that no frame can carry.
const REASON_PACKET_TOO_LARGE: u8 = 0x95;
/// How long filing a dead letter waits for an operator's `dead-letters` command to release the store.
const DEAD_LETTERS_WAIT: Duration = Duration::from_secs(5);

/// Runs a queue operation on the blocking pool.
async fn blocking<T: Send + 'static>(
    queue: &Arc<RedbQueue>,
    op: impl FnOnce(&RedbQueue) -> Result<T, QueueError> + Send + 'static,
) -> Result<T, UplinkError> {
    let queue = Arc::clone(queue);
    tokio::task::spawn_blocking(move || op(&queue))
        .await
        .map_err(UplinkError::Panicked)?
        .map_err(UplinkError::Queue)
}

/// A delay between half and all of `backoff`, so that many agents cut off together do not reconnect in
/// lock-step.
fn jitter(backoff: Duration, attempt: u64) -> Duration {
    let random = RandomState::new().hash_one(attempt);
    let half = backoff / 2;
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(if nanos == 0 { 0 } else { random % nanos })
}

/// An error with its sources, `a: b: c`, for one-line logs.
struct Chain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shared::envelope::{Envelope, Properties, QoS};

    fn body(seq: u64) -> Bytes {
        let envelope = Envelope {
            origin: "line1".into(),
            seq,
            topic: "telemetry/t".into(),
            payload: Bytes::from(vec![7u8; 80]),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Properties::default(),
            trace: None,
            enqueued_at_ms: 1,
        };
        let mut buf = BytesMut::new();
        envelope.encode_body(&mut buf).expect("encodes");
        buf.freeze()
    }

    #[test]
    fn jitter_stays_within_half_and_full() {
        for (backoff_ms, attempt) in [(100, 1), (100, 2), (10_000, 3), (1, 4), (0, 5)] {
            let backoff = Duration::from_millis(backoff_ms);
            let d = jitter(backoff, attempt);
            assert!(d >= backoff / 2 && d <= backoff, "{d:?} for {backoff:?}");
        }
    }

    #[test]
    fn batches_split_at_the_frame_limit() {
        let entries: Vec<Entry> = (1..=5)
            .map(|seq| Entry {
                seq,
                body: body(seq),
            })
            .collect();
        let len = entries[0].body.len();
        // Frame header 5, then 12 + len per entry: this limit fits two entries per frame.
        let limit = 5 + 2 * (12 + len) + 1;
        let mut out = BytesMut::new();
        let mut inflight = VecDeque::new();
        encode_batches(&entries, &mut out, limit, &mut inflight).expect("encodes");
        assert_eq!(inflight, [2, 4, 5]);
        let mut seqs = Vec::new();
        while let Some(frame) = wire::decode(&mut out, limit).expect("valid frames") {
            match frame {
                Frame::Batch { entries } => {
                    seqs.push(entries.iter().map(|e| e.seq).collect::<Vec<_>>())
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seqs, [vec![1, 2], vec![3, 4], vec![5]]);

        // Entries no frame can carry are handed back for the dead-letter store and left out; the ones around
        // them still go, and no empty frame is written.
        let mut mixed = entries.clone();
        mixed[2].body = Bytes::from(vec![0u8; 10 * len]);
        mixed[4].body = Bytes::from(vec![0u8; 10 * len]);
        let mut out = BytesMut::new();
        let mut inflight = VecDeque::new();
        let too_large = encode_batches(&mixed, &mut out, limit, &mut inflight).expect("encodes");
        assert_eq!(too_large.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 5]);
        assert_eq!(inflight, [2, 4]);
        let mut seqs = Vec::new();
        while let Some(frame) = wire::decode(&mut out, limit).expect("valid frames") {
            match frame {
                Frame::Batch { entries } => {
                    seqs.push(entries.iter().map(|e| e.seq).collect::<Vec<_>>())
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seqs, [vec![1, 2], vec![4]]);
    }
}
