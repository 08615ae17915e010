//! One agent connection: handshake checks, `Hello`/`Welcome`, then batches → dedup → namespace → publish →
//! persist dedup → `Ack`, pipelined and in order.
//!
//! The connection runs two futures in one task, joined:
//! - the *reader* decodes frames, filters each `Batch` through the site's dedup window, maps topics into the
//!   site's namespace and hands the batch to the publisher without waiting for the broker, so batch N+1 is
//!   being published while batch N waits for its PUBACKs;
//! - the *acker* takes the batches in arrival order, waits for each one's broker completion, groups every
//!   batch already complete behind it, marks their seqs in the dedup window, commits the site's dedup state
//!   once for the group, and only then writes their `Ack`s.
//!
//! Identity is the client certificate's ([`crate::tls::site_identity`]); the `origin` inside entry bodies
//! and the `agent_name` in `Hello` are never trusted (they are only logged when they disagree).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS as MqttQoS;
use shared::config::{EffectiveConfig, PushedConfig};
use shared::envelope::{Envelope, QoS};
use shared::policy::dedup::Dedup;
use shared::policy::route::{Message as RouteMessage, RouteTable, Target};
use shared::queue::Queue as _;
use shared::topic::{Namespace, TopicName};
use shared::wire::{self, Capabilities, DecodeError, Frame, GoAwayCode, SUPPORTED};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::downlink::{encode_delivery, Dedups, DownlinkStore, Routes};
use crate::publisher::{OutMessage, PublishError, Publisher, Refusal, Refusals};
use crate::store::DedupStore;
use crate::tls;

/// How long an agent may take to open its stream and send `Hello` after the handshake.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one batch may wait for the cloud broker before the agent connection is closed (`Overloaded`).
pub(crate) const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new connection waits for the one it replaces to finish its in-flight batches.
const REPLACE_WAIT: Duration = Duration::from_secs(5);
/// How long a `GoAway` gets to reach the agent before the connection is closed.
const GOAWAY_LINGER: Duration = Duration::from_secs(1);
/// Added to four round trips for a replaced connection's `GoAway` to be acknowledged: QUIC's default
/// maximum ACK delay (25 ms) with margin.
const REPLACED_ACK_SLACK: Duration = Duration::from_millis(50);
/// How long an agent refused with `Unavailable` (cloud broker not connected) is asked to wait before it
/// tries again. Welcoming it instead made every site re-handshake about ten times a second while the broker
/// was down: the first batch failed, and the agent took the `Welcome` as proof of a healthy link and reset its
/// backoff. One attempt per second per site (the agent adds up to half of it as jitter) is cheap for the hub,
/// and delivery resumes at most about this long after the broker is back.
const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// What the hub offers: config push and downlink (retry-after needs no answer).
const HUB_CAPABILITIES: Capabilities = Capabilities::CONFIG_PUSH.union(Capabilities::DOWNLINK);
/// Most messages in one `Downlink` frame.
const DOWNLINK_BATCH: usize = 256;
/// Batches read but not yet acknowledged, per connection; beyond it the reader stops (QUIC flow control).
const MAX_PENDING_BATCHES: usize = 64;
/// Read buffer growth step.
const READ_CHUNK: usize = 64 * 1024;
/// The user property naming a message's `(site, seq)`, so consumers can drop the rare duplicate.
pub const MESHBRIDGE_ID: &str = "meshbridge-id";

/// A configured site: its namespace and its dedup state, shared by its successive connections.
#[derive(Debug)]
pub(crate) struct Site {
    pub(crate) name: String,
    pub(crate) namespace: Namespace,
    /// A [`Dedup`] holding only this site, so its snapshot is the site's row in the store.
    pub(crate) dedup: Mutex<Dedup>,
}

/// The live connection of a site, as seen by a connection that replaces it.
#[derive(Debug)]
struct Live {
    id: u64,
    /// Cancelled to make the connection go away with `Replaced`.
    replaced: CancellationToken,
    /// Cancelled by the connection when its task is done (acks and dedup persisted).
    finished: CancellationToken,
}

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) sites: HashMap<String, Arc<Site>>,
    pub(crate) publisher: Publisher,
    pub(crate) store: DedupStore,
    pub(crate) max_frame_size: usize,
    pub(crate) max_message_size: usize,
    /// The routes in force (swapped on a config reload); empty: the agents' own files decide what is
    /// forwarded, and everything forwarded is published under the site's namespace.
    pub(crate) routes: Routes,
    /// Per-route dedup sets.
    pub(crate) dedups: Dedups,
    /// What waits for each site.
    pub(crate) downlinks: Arc<DownlinkStore>,
    live: Mutex<HashMap<String, Live>>,
    next_id: AtomicU64,
}

impl Hub {
    pub(crate) fn new(
        sites: HashMap<String, Arc<Site>>,
        publisher: Publisher,
        store: DedupStore,
        max_frame_size: usize,
        max_message_size: usize,
        (routes, dedups, downlinks): (Routes, Dedups, Arc<DownlinkStore>),
    ) -> Self {
        Self {
            sites,
            publisher,
            store,
            max_frame_size,
            max_message_size,
            routes,
            dedups,
            downlinks,
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }
}

/// Tokens that end a connection.
#[derive(Debug, Clone)]
pub(crate) struct Stops {
    /// Hub shutdown: drain, then `GoAway{ShuttingDown}`.
    pub(crate) shutdown: CancellationToken,
    /// Past the drain deadline: stop waiting for the broker.
    pub(crate) hard: CancellationToken,
}

/// Serves one accepted (not yet handshaken) connection to its end. Logs its own errors.
pub(crate) async fn serve(hub: Arc<Hub>, incoming: quinn::Incoming, stops: Stops) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(error) => {
            warn!(%remote, cause = %error, "agent handshake failed");
            return;
        }
    };
    let span = tracing::info_span!("agent", site = tracing::field::Empty, %remote);
    serve_connection(hub, conn, stops, span.clone())
        .instrument(span)
        .await;
}

async fn serve_connection(hub: Arc<Hub>, conn: Connection, stops: Stops, span: tracing::Span) {
    let opened = tokio::time::timeout(HELLO_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let hello = read_frame(&mut recv, &mut buf, hub.max_frame_size).await?;
        Ok::<_, SessionError>((send, recv, buf, hello))
    })
    .await;
    let (mut send, recv, buf, hello) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(error)) => {
            info!(cause = %error, "agent left before Hello");
            conn.close(code(GoAwayCode::ProtocolError), b"no Hello");
            return;
        }
        Err(_) => {
            warn!(timeout = ?HELLO_TIMEOUT, "agent sent no Hello in time");
            conn.close(code(GoAwayCode::ProtocolError), b"no Hello in time");
            return;
        }
    };
    let Some(Frame::Hello {
        versions,
        capabilities,
        agent_name,
        incarnation,
        last_acked,
        config_version,
    }) = hello
    else {
        let what = hello.map_or("end of stream", |f| f.frame_type().name());
        warn!(frame = what, "agent did not start with Hello");
        go_away(
            &mut send,
            &conn,
            GoAwayCode::ProtocolError,
            &format!("expected Hello, got {what}"),
        )
        .await;
        return;
    };

    // Identity: the certificate only.
    let site = match tls::site_identity(&conn) {
        Ok(site) => site,
        Err(error) => {
            error!(cause = %error, "agent certificate names no usable site");
            go_away(
                &mut send,
                &conn,
                GoAwayCode::Unauthorized,
                &format!("unusable client certificate: {error}"),
            )
            .await;
            return;
        }
    };
    span.record("site", site.as_str());
    let Some(site) = hub.sites.get(site.as_str()).cloned() else {
        let reason = format!("site {site} is not configured on this hub");
        error!(agent_name = %agent_name, "refusing agent: {reason}");
        go_away(&mut send, &conn, GoAwayCode::Unauthorized, &reason).await;
        return;
    };
    if agent_name != site.name {
        warn!(agent_name = %agent_name, "agent's configured name differs from its certificate; the certificate wins");
    }
    let version = match wire::negotiate(versions, SUPPORTED) {
        Ok(version) => version,
        Err(mismatch) => {
            error!(cause = %mismatch, "refusing agent: incompatible protocol version");
            go_away(
                &mut send,
                &conn,
                GoAwayCode::IncompatibleVersion,
                &mismatch.to_string(),
            )
            .await;
            return;
        }
    };

    // Refuse before `Welcome` while the cloud broker is away: the first batch would fail anyway.
    if !hub.publisher.is_connected() {
        let retry_after = capabilities
            .contains(Capabilities::RETRY_AFTER)
            .then(|| u32::try_from(UNAVAILABLE_RETRY_AFTER.as_millis()).unwrap_or(u32::MAX));
        debug!(
            retry_after_ms = retry_after,
            "refusing agent: the cloud broker is not connected"
        );
        go_away_with(
            &mut send,
            &conn,
            GoAwayCode::Unavailable,
            "the hub's cloud broker is not connected",
            retry_after,
            GOAWAY_LINGER,
        )
        .await;
        return;
    }

    // One live connection per site: the newest wins, after the old one finished what it had in flight.
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let replaced = CancellationToken::new();
    let finished = CancellationToken::new();
    let _finished_guard = finished.clone().drop_guard();
    let old = hub
        .live
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(
            site.name.clone(),
            Live {
                id,
                replaced: replaced.clone(),
                finished,
            },
        );
    if let Some(old) = old {
        warn!(
            old_connection = old.id,
            "site connected again; replacing its existing connection"
        );
        old.replaced.cancel();
        if tokio::time::timeout(REPLACE_WAIT, old.finished.cancelled())
            .await
            .is_err()
        {
            warn!(waited = ?REPLACE_WAIT, "replaced connection did not finish in time; serving the new one anyway");
        }
    }

    let hub_high_water = {
        let dedup = site.dedup.lock().unwrap_or_else(PoisonError::into_inner);
        match dedup.high_water(&site.name) {
            Some((known, hw)) if known == incarnation => hw,
            Some((known, hw)) => {
                // A new queue file (new disk, wiped data directory) or an agent that found its restored
                // copy behind this hub and renumbered above our mark: either way its numbering starts over.
                warn!(
                    old_incarnation = known,
                    old_high_water = hw,
                    incarnation,
                    "site's queue has a new incarnation: a new, wiped or restored data directory"
                );
                0
            }
            None => 0,
        }
    };
    let capabilities = capabilities.intersection(HUB_CAPABILITIES);
    let push = pushed_config(&hub.routes.borrow(), &site.name);
    let welcome = Frame::Welcome {
        version,
        capabilities,
        max_frame_size: u32::try_from(hub.max_frame_size).unwrap_or(u32::MAX),
        hub_high_water,
        config_version: push.as_ref().map_or(0, |p| p.version),
        // The limits `to_message` enforces, stated up front so the agent refuses at PUBLISH time what
        // would otherwise be acknowledged to its publisher and dropped here (see `shared::limits`).
        max_message_size: u32::try_from(hub.max_message_size).unwrap_or(u32::MAX),
        max_topic_len: u16::try_from(site.namespace.local_topic_room()).unwrap_or(u16::MAX),
    };
    let mut out = BytesMut::new();
    let mut pushed_version = config_version;
    let mut encoded = welcome.encode(&mut out);
    if let Some(push) = push.filter(|_| capabilities.contains(Capabilities::CONFIG_PUSH)) {
        if push.version != config_version && encoded.is_ok() {
            info!(
                version = push.version,
                agent_version = config_version,
                "pushing the site's config"
            );
            pushed_version = push.version;
            encoded = Frame::ConfigPush {
                version: push.version,
                body: push.toml,
            }
            .encode(&mut out);
        }
    }
    let sent = match encoded {
        Ok(()) => send.write_all(&out).await.map_err(SessionError::from),
        Err(e) => Err(SessionError::Encode(e)),
    };
    if let Err(error) = sent {
        info!(cause = %error, "agent left before Welcome");
    } else {
        info!(
            connection = id,
            version,
            incarnation,
            agent_last_acked = last_acked,
            hub_high_water,
            "agent connected"
        );
        let session = Session {
            hub: &hub,
            site: &site,
            incarnation,
            stops: &stops,
            replaced: &replaced,
            failed: CancellationToken::new(),
            capabilities,
            pushed_version: std::sync::atomic::AtomicU64::new(pushed_version),
            downlink_acked: tokio::sync::watch::Sender::new(0),
        };
        let end = session.run(recv, buf, &mut send).await;
        let (code, reason) = match &end {
            End::Stopped if replaced.is_cancelled() => (
                GoAwayCode::Replaced,
                "another connection for this site took over".to_owned(),
            ),
            End::Stopped => (
                GoAwayCode::ShuttingDown,
                "the hub is shutting down".to_owned(),
            ),
            End::PeerGone(error) => {
                info!(cause = %error, "agent disconnected");
                (GoAwayCode::Normal, String::new())
            }
            End::PeerGoAway { code, reason } => {
                info!(?code, %reason, "agent said GoAway");
                (GoAwayCode::Normal, String::new())
            }
            End::Protocol(error) => {
                warn!(cause = %error, "agent broke the protocol; closing");
                (GoAwayCode::ProtocolError, error.to_string())
            }
            End::Publish(error) => {
                warn!(cause = %error, "cloud broker did not accept a batch; closing the agent connection so it resends");
                (GoAwayCode::Overloaded, format!("cloud broker: {error}"))
            }
            End::PublishTimeout => {
                warn!(timeout = ?PUBLISH_TIMEOUT, "cloud broker did not acknowledge a batch in time; closing the agent connection");
                (
                    GoAwayCode::Overloaded,
                    "cloud broker did not acknowledge in time".to_owned(),
                )
            }
            End::Store(error) => {
                error!(cause = %error, "cannot persist dedup state; closing the agent connection without acking");
                (GoAwayCode::Overloaded, "hub storage failed".to_owned())
            }
            End::Downlink(error) => {
                error!(cause = %error, "a downlink queue failed; closing the agent connection without acking");
                (
                    GoAwayCode::Overloaded,
                    "hub downlink storage failed".to_owned(),
                )
            }
        };
        match end {
            End::PeerGone(_) | End::PeerGoAway { .. } => conn.close(VarInt::from_u32(0), b""),
            // The site's new connection waits for this one to finish, so linger only as long as a live
            // peer needs to acknowledge the GoAway. An agent that restarted is not there to read it, and
            // lingering the full `GOAWAY_LINGER` made every restarted agent wait that long to be served; a
            // peer still there that misses it learns the same code from the connection close.
            _ if code == GoAwayCode::Replaced => {
                let linger = (conn.rtt() * 4 + REPLACED_ACK_SLACK).min(GOAWAY_LINGER);
                go_away_with(&mut send, &conn, code, &reason, None, linger).await;
            }
            _ => go_away(&mut send, &conn, code, &reason).await,
        }
    }

    let mut live = hub.live.lock().unwrap_or_else(PoisonError::into_inner);
    if live.get(&site.name).is_some_and(|l| l.id == id) {
        live.remove(&site.name);
    }
}

/// The QUIC application close code for a GoAway code (the same number).
fn code(code: GoAwayCode) -> VarInt {
    VarInt::from_u32(code.code().into())
}

/// Sends `GoAway` as the stream's last frame, gives it a moment to arrive, then closes the connection with the
/// same code.
async fn go_away(send: &mut SendStream, conn: &Connection, goaway: GoAwayCode, reason: &str) {
    go_away_with(send, conn, goaway, reason, None, GOAWAY_LINGER).await;
}

/// [`go_away`] with a retry-after, which must be `None` unless the agent announced
/// [`Capabilities::RETRY_AFTER`] (an older agent refuses the extra bytes), and with how long the `GoAway`
/// may take to be read before the connection is closed.
async fn go_away_with(
    send: &mut SendStream,
    conn: &Connection,
    goaway: GoAwayCode,
    reason: &str,
    retry_after_ms: Option<u32>,
    linger: Duration,
) {
    let mut buf = BytesMut::new();
    // A reason can only be too long for its u16 prefix; then send none rather than no GoAway.
    let frame = |reason: &str| Frame::GoAway {
        code: goaway,
        reason: reason.to_owned(),
        retry_after_ms,
    };
    if frame(reason).encode(&mut buf).is_err() {
        let _ = frame("").encode(&mut buf);
    }
    if send.write_all(&buf).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(linger, async {
            tokio::select! {
                _ = send.stopped() => {}
                _ = conn.closed() => {}
            }
        })
        .await;
    }
    conn.close(code(goaway), reason.as_bytes());
}

/// Reads until one whole frame is decoded; `Ok(None)` when the peer finished the stream cleanly.
///
/// Cancel-safe: bytes already read stay in `buf`.
async fn read_frame(
    recv: &mut RecvStream,
    buf: &mut BytesMut,
    max_frame_size: usize,
) -> Result<Option<Frame>, SessionError> {
    loop {
        if let Some(frame) = wire::decode(buf, max_frame_size)? {
            return Ok(Some(frame));
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let n = recv.read_buf(buf).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(SessionError::Decode(DecodeError::Incomplete));
        }
    }
}

/// Errors inside a session (logged by the connection, never returned from `run`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SessionError {
    /// The QUIC connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Reading the stream failed.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// Reading the stream failed (through the tokio `AsyncRead` adapter).
    #[error("read: {0}")]
    Io(#[from] std::io::Error),
    /// Writing the stream failed.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The agent sent bytes that are not a frame.
    #[error("bad frame: {0}")]
    Decode(#[from] DecodeError),
    /// A frame could not be encoded.
    #[error("encode: {0}")]
    Encode(#[from] wire::EncodeError),
    /// The agent finished its stream (a clean end of the session from its side).
    #[error("the agent finished its stream")]
    Finished,
    /// A frame that is not allowed after `Hello`.
    #[error("unexpected {frame} frame")]
    Unexpected {
        /// Its type name.
        frame: &'static str,
    },
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// Shutdown or replacement; in-flight batches were drained.
    Stopped,
    /// The stream or connection ended under us.
    PeerGone(SessionError),
    /// The agent sent `GoAway`.
    PeerGoAway { code: GoAwayCode, reason: String },
    /// The agent broke the protocol.
    Protocol(SessionError),
    /// The cloud broker refused or lost a batch.
    Publish(PublishError),
    /// The cloud broker did not answer in time.
    PublishTimeout,
    /// The dedup state could not be committed.
    Store(crate::store::StoreError),
    /// A site's downlink queue failed.
    Downlink(crate::HubError),
}

/// A batch on its way through the pipeline.
#[derive(Debug)]
struct Pending {
    /// Every seq of the batch (published, duplicate or dropped): all are marked and acknowledged.
    seqs: Vec<u64>,
    /// Last seq of the batch: the `Ack` value.
    upto: u64,
    /// Refused before publishing (see [`Drops::refused`]).
    refused: Refusals,
    done: oneshot::Receiver<Result<Refusals, PublishError>>,
}

/// A published batch ready to be acknowledged: its seqs for dedup, its `Ack` value and its refusals.
type Done = (Vec<u64>, u64, Refusals);

impl Pending {
    fn finish(self, mut refused: Refusals) -> Done {
        // Both lists are usually empty.
        refused.extend(self.refused);
        (self.seqs, self.upto, refused)
    }
}

/// What the reader hands the acker, in stream order.
#[derive(Debug)]
enum Item {
    Batch(Pending),
    Pong(u64),
    /// Frames to write as they are, in stream order (config pushes, downlink batches).
    Frames(Vec<Frame>),
}

struct Session<'a> {
    hub: &'a Hub,
    site: &'a Site,
    incarnation: u64,
    stops: &'a Stops,
    replaced: &'a CancellationToken,
    /// Cancelled by the acker when it gives up, to stop the reader.
    failed: CancellationToken,
    /// What both sides support.
    capabilities: Capabilities,
    /// The config version last pushed on this connection (or the agent's, when none was needed).
    pushed_version: AtomicU64,
    /// The agent's cumulative `DownlinkAck` on this connection.
    downlink_acked: tokio::sync::watch::Sender<u64>,
}

/// Per-batch counters of messages not published, and the refusals the hub decided itself.
#[derive(Debug, Default)]
struct Drops {
    duplicates: usize,
    foreign_origin: usize,
    /// Entries that can never be published (too large, topic invalid once mapped): reported to the agent.
    refused: Refusals,
    /// Entries the routes send nowhere.
    unroutable: usize,
}

impl Session<'_> {
    async fn run(&self, recv: RecvStream, buf: BytesMut, send: &mut SendStream) -> End {
        let (tx, rx) = mpsc::channel(MAX_PENDING_BATCHES);
        let downlink_tx = tx.clone();
        let (reader_end, acker_end, ()) = tokio::join!(
            self.reader(recv, buf, tx),
            self.acker(rx, send),
            self.downlink(downlink_tx)
        );
        // The acker's failure is the root cause when both ended badly.
        match acker_end {
            Some(end) => end,
            None => reader_end,
        }
    }

    async fn reader(&self, mut recv: RecvStream, mut buf: BytesMut, tx: mpsc::Sender<Item>) -> End {
        let mut routes = self.hub.routes.clone();
        routes.mark_unchanged();
        loop {
            let step = async {
                let frame = read_frame(&mut recv, &mut buf, self.hub.max_frame_size).await;
                match frame {
                    Ok(Some(Frame::Batch { entries })) => match self.submit(entries).await {
                        Ok(Some(pending)) => {
                            // The acker only drops its receiver after failing; its End wins then.
                            let _ = tx.send(Item::Batch(pending)).await;
                            None
                        }
                        Ok(None) => None,
                        Err(end) => Some(end),
                    },
                    Ok(Some(Frame::Ping { nonce })) => {
                        let _ = tx.send(Item::Pong(nonce)).await;
                        None
                    }
                    Ok(Some(Frame::Pong { .. })) => None,
                    Ok(Some(Frame::ConfigAck { version, result })) => {
                        match result {
                            Ok(()) => info!(version, "agent applied the pushed config"),
                            Err(rejection) => error!(
                                version,
                                reason = %rejection.reason,
                                detail = %rejection.detail,
                                "agent refused the pushed config and keeps running its previous one"
                            ),
                        }
                        None
                    }
                    Ok(Some(Frame::DownlinkAck { upto })) => self.downlink_acked(upto).await,
                    Ok(Some(Frame::GoAway { code, reason, .. })) => {
                        Some(End::PeerGoAway { code, reason })
                    }
                    Ok(Some(other)) => Some(End::Protocol(SessionError::Unexpected {
                        frame: other.frame_type().name(),
                    })),
                    Ok(None) => Some(End::PeerGone(SessionError::Finished)),
                    Err(e @ SessionError::Decode(_)) => Some(End::Protocol(e)),
                    Err(e) => Some(End::PeerGone(e)),
                }
            };
            let end = tokio::select! {
                biased;
                () = self.stops.shutdown.cancelled() => Some(End::Stopped),
                () = self.replaced.cancelled() => Some(End::Stopped),
                () = self.failed.cancelled() => Some(End::Stopped),
                changed = routes.changed() => {
                    if changed.is_ok() {
                        let table = Arc::clone(&routes.borrow_and_update());
                        self.push_if_changed(&table, &tx).await;
                    }
                    None
                }
                end = step => end,
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Filters, routes and hands one batch to the publisher; `None` for an empty batch. What the routes
    /// send to other sites is committed to their downlink queues first, so the batch's `Ack` (which waits
    /// for the publisher) never covers a message that is neither published nor queued.
    async fn submit(&self, entries: Vec<Envelope>) -> Result<Option<Pending>, End> {
        let Some(upto) = entries.last().map(|e| e.seq) else {
            return Ok(None);
        };
        let mut seqs = Vec::with_capacity(entries.len());
        let mut out = Vec::with_capacity(entries.len());
        let mut drops = Drops::default();
        let table = Arc::clone(&self.hub.routes.borrow());
        let routed = !table.routes().is_empty();
        let mut to_sites: Vec<(String, bytes::Bytes)> = Vec::new();
        {
            let dedup = self
                .site
                .dedup
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let window = match dedup.high_water(&self.site.name) {
                Some((known, _)) if known == self.incarnation => dedup.window(&self.site.name),
                _ => None,
            };
            for env in entries {
                if window.is_some_and(|w| w.is_seen(env.seq)) {
                    drops.duplicates += 1;
                    debug!(seq = env.seq, "duplicate dropped");
                    continue;
                }
                seqs.push(env.seq);
                if routed {
                    self.route(env, &table, &mut out, &mut to_sites, &mut drops);
                } else if let Some(message) = to_message(
                    env,
                    &self.site.name,
                    &self.site.namespace,
                    self.hub.max_message_size,
                    &mut drops,
                ) {
                    out.push(message);
                }
            }
        }
        if drops.unroutable > 0 {
            debug!(
                count = drops.unroutable,
                "entries no route sends anywhere (or already delivered here); acknowledged"
            );
        }
        if !to_sites.is_empty() {
            to_sites.sort_by(|a, b| a.0.cmp(&b.0));
            let mut i = 0;
            while i < to_sites.len() {
                let dest = to_sites[i].0.clone();
                let bodies: Vec<bytes::Bytes> = to_sites[i..]
                    .iter()
                    .take_while(|(d, _)| *d == dest)
                    .map(|(_, b)| b.clone())
                    .collect();
                i += bodies.len();
                let count = bodies.len();
                if let Err(error) = self.hub.downlinks.append(&dest, bodies).await {
                    return Err(End::Downlink(error));
                }
                debug!(to = %dest, count, "queued for another site");
            }
        }
        if drops.foreign_origin > 0 {
            warn!(
                count = drops.foreign_origin,
                "entries claimed another origin; published under this site's namespace"
            );
        }

        if drops.duplicates > 0 {
            debug!(
                count = drops.duplicates,
                upto, "replayed messages dropped by dedup"
            );
        }
        let done = self.hub.publisher.submit(&self.site.name, out).await;
        Ok(Some(Pending {
            seqs,
            upto,
            refused: drops.refused,
            done,
        }))
    }

    /// Routes one entry by the hub's routes: cloud deliveries into `out`, other sites' into `to_sites`.
    fn route(
        &self,
        env: Envelope,
        table: &RouteTable,
        out: &mut Vec<OutMessage>,
        to_sites: &mut Vec<(String, bytes::Bytes)>,
        drops: &mut Drops,
    ) {
        if let Some(refusal) = oversize(&env, self.hub.max_message_size) {
            drops.refused.push(refusal);
            return;
        }
        let decision = {
            let mut dedups = self
                .hub
                .dedups
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            table.from_site(
                &self.site.name,
                &RouteMessage::from_envelope(&env),
                &mut dedups,
                crate::downlink::now_ms(),
            )
        };
        let decision = match decision {
            Ok(decision) => decision,
            Err(error) => {
                // A malformed or full path, or a message this site was itself delivered: never forwarded.
                debug!(seq = env.seq, cause = %error, "not routable");
                drops.unroutable += 1;
                return;
            }
        };
        if decision.deliveries.is_empty() {
            drops.unroutable += 1;
        }
        let id = format!("{}/{}", self.site.name, env.seq);
        for delivery in &decision.deliveries {
            match &delivery.target {
                Target::Cloud => {
                    let mut user = delivery.user_properties(&env.properties.user);
                    if let Some(trace) = &env.trace {
                        user.push(("traceparent".to_owned(), trace.traceparent.clone()));
                        if let Some(state) = &trace.tracestate {
                            user.push(("tracestate".to_owned(), state.clone()));
                        }
                    }
                    user.push((MESHBRIDGE_ID.to_owned(), id.clone()));
                    out.push(OutMessage {
                        topic: delivery.topic.as_str().to_owned(),
                        qos: mqtt_qos(delivery.qos),
                        retain: delivery.retain,
                        payload: env.payload.clone(),
                        properties: PublishProperties {
                            payload_format_indicator: env
                                .properties
                                .payload_format_utf8
                                .then_some(1),
                            message_expiry_interval: env.properties.message_expiry,
                            topic_alias: None,
                            response_topic: env.properties.response_topic.clone(),
                            correlation_data: env.properties.correlation_data.clone(),
                            user_properties: user,
                            subscription_identifiers: Vec::new(),
                            content_type: env.properties.content_type.clone(),
                        },
                        seq: env.seq,
                    });
                }
                Target::Site(dest) => {
                    let mut properties = env.properties.clone();
                    properties.user.push((MESHBRIDGE_ID.to_owned(), id.clone()));
                    match encode_delivery(&env.payload, &properties, delivery, env.enqueued_at_ms) {
                        Ok(body) => to_sites.push((dest.clone(), body)),
                        Err(error) => {
                            warn!(seq = env.seq, to = %dest, cause = %error, "cannot encode a message for another site; not delivered there");
                        }
                    }
                }
            }
        }
    }

    /// A config push for this connection if the routes changed this site's share.
    async fn push_if_changed(&self, table: &RouteTable, tx: &mpsc::Sender<Item>) {
        if !self.capabilities.contains(Capabilities::CONFIG_PUSH) {
            return;
        }
        let Some(push) = pushed_config(table, &self.site.name) else {
            return;
        };
        if self.pushed_version.swap(push.version, Ordering::Relaxed) == push.version {
            return;
        }
        info!(
            version = push.version,
            "routes changed; pushing the site's config"
        );
        let _ = tx
            .send(Item::Frames(vec![Frame::ConfigPush {
                version: push.version,
                body: push.toml,
            }]))
            .await;
    }

    /// The agent handed downlink messages up to `upto` to its broker: they leave the site's queue.
    async fn downlink_acked(&self, upto: u64) -> Option<End> {
        let site = match self.hub.downlinks.site(&self.site.name).await {
            Ok(site) => site,
            Err(error) => return Some(End::Downlink(error)),
        };
        let acked = tokio::task::spawn_blocking(move || site.queue.ack_upto(upto)).await;
        match acked {
            Ok(Ok(_)) => {}
            Ok(Err(source)) => {
                return Some(End::Downlink(crate::HubError::DownlinkQueue {
                    site: self.site.name.clone(),
                    source: Box::new(source),
                }))
            }
            Err(e) => return Some(End::Downlink(crate::HubError::Join(e))),
        }
        self.downlink_acked.send_replace(upto);
        None
    }

    /// Sends what waits in the site's downlink queue, one batch at a time, each after the previous one
    /// was acknowledged; returns when the connection ends.
    async fn downlink(&self, tx: mpsc::Sender<Item>) {
        if !self.capabilities.contains(Capabilities::DOWNLINK) {
            return;
        }
        let stopped = async {
            tokio::select! {
                () = self.stops.shutdown.cancelled() => {}
                () = self.replaced.cancelled() => {}
                () = self.failed.cancelled() => {}
                () = tx.closed() => {}
            }
        };
        tokio::select! {
            () = stopped => {}
            () = self.downlink_loop(&tx) => {}
        }
    }

    async fn downlink_loop(&self, tx: &mpsc::Sender<Item>) {
        let site = match self.hub.downlinks.site(&self.site.name).await {
            Ok(site) => site,
            Err(error) => {
                error!(cause = %error, "cannot open the site's downlink queue; nothing is sent down");
                return;
            }
        };
        let mut acked = self.downlink_acked.subscribe();
        let max_bytes = self.hub.max_frame_size / 2;
        let mut next = site.queue.stats().acked + 1;
        loop {
            let grew = site.grew.notified();
            let mut grew = std::pin::pin!(grew);
            grew.as_mut().enable();
            let reader = Arc::clone(&site);
            let read = tokio::task::spawn_blocking(move || {
                let now = crate::downlink::now_ms();
                let expired = reader.queue.expire(now).unwrap_or(0);
                let entries = reader.queue.read(next, DOWNLINK_BATCH, max_bytes);
                (expired, entries)
            })
            .await;
            let entries = match read {
                Ok((expired, Ok(entries))) => {
                    if expired > 0 {
                        warn!(
                            expired,
                            "downlink messages waited longer than downlink.max_age; dropped"
                        );
                    }
                    entries
                }
                Ok((_, Err(error))) => {
                    error!(cause = %error, "cannot read the site's downlink queue");
                    return;
                }
                Err(_) => return,
            };
            if entries.is_empty() {
                grew.await;
                continue;
            }
            let mut envelopes = Vec::with_capacity(entries.len());
            for entry in entries {
                match Envelope::decode_body(entry.seq, entry.body) {
                    Ok(env) => envelopes.push(env),
                    Err(error) => {
                        error!(seq = entry.seq, cause = %error, "unreadable downlink entry; skipped");
                    }
                }
            }
            let Some(upto) = envelopes.last().map(|e| e.seq) else {
                continue;
            };
            let count = envelopes.len();
            if tx
                .send(Item::Frames(vec![Frame::Downlink { entries: envelopes }]))
                .await
                .is_err()
            {
                return;
            }
            debug!(count, upto, "downlink batch sent");
            if acked.wait_for(|a| *a >= upto).await.is_err() {
                return;
            }
            next = upto + 1;
        }
    }

    /// Acknowledges batches in order; `None` when the reader ended and everything was drained.
    async fn acker(&self, mut rx: mpsc::Receiver<Item>, send: &mut SendStream) -> Option<End> {
        let end = self.ack_loop(&mut rx, send).await;
        if end.is_some() {
            self.failed.cancel();
        }
        end
    }

    async fn ack_loop(&self, rx: &mut mpsc::Receiver<Item>, send: &mut SendStream) -> Option<End> {
        let mut next: Option<Item> = None;
        let mut out = BytesMut::with_capacity(256);
        loop {
            let item = match next.take() {
                Some(item) => item,
                None => rx.recv().await?,
            };
            let mut group = match item {
                Item::Pong(nonce) => {
                    if let Err(end) = self.write(send, &mut out, &[Frame::Pong { nonce }]).await {
                        return Some(end);
                    }
                    continue;
                }
                Item::Frames(frames) => {
                    if let Err(end) = self.write(send, &mut out, &frames).await {
                        return Some(end);
                    }
                    continue;
                }
                Item::Batch(mut pending) => {
                    let waited = tokio::select! {
                        () = self.stops.hard.cancelled() => return Some(End::PublishTimeout),
                        waited = tokio::time::timeout(PUBLISH_TIMEOUT, &mut pending.done) => waited,
                    };
                    match waited {
                        Err(_) => return Some(End::PublishTimeout),
                        Ok(Err(_)) => return Some(End::Publish(PublishError::Stopped)),
                        Ok(Ok(Err(error))) => return Some(End::Publish(error)),
                        Ok(Ok(Ok(refused))) => vec![pending.finish(refused)],
                    }
                }
            };
            // Group every batch already complete behind it: one dedup commit for all of them.
            while let Ok(item) = rx.try_recv() {
                match item {
                    Item::Batch(mut pending) => match pending.done.try_recv() {
                        Ok(Ok(refused)) => group.push(pending.finish(refused)),
                        Ok(Err(error)) => return Some(End::Publish(error)),
                        Err(oneshot::error::TryRecvError::Closed) => {
                            return Some(End::Publish(PublishError::Stopped))
                        }
                        Err(oneshot::error::TryRecvError::Empty) => {
                            next = Some(Item::Batch(pending));
                            break;
                        }
                    },
                    other @ (Item::Pong(_) | Item::Frames(_)) => {
                        next = Some(other);
                        break;
                    }
                }
            }
            let snapshot = {
                let mut dedup = self
                    .site
                    .dedup
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                for (seqs, _, _) in &group {
                    for &seq in seqs {
                        let _ = dedup.observe(&self.site.name, self.incarnation, seq);
                    }
                }
                dedup.snapshot().encode()
            };
            if let Err(error) = self.hub.store.save(self.site.name.clone(), snapshot).await {
                return Some(End::Store(error));
            }
            // Each batch's refusals go before its Ack: the agent files them as dead letters before the Ack
            // lets its queue forget them.
            let mut frames = Vec::with_capacity(group.len());
            for (_, upto, refused) in group {
                if !refused.is_empty() {
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
                }
                let mut refused = refused;
                refused.sort_by_key(|r| r.seq);
                frames.extend(refused.into_iter().map(|r| Frame::Refused {
                    seq: r.seq,
                    reason_code: r.reason_code,
                    detail: r.detail,
                }));
                frames.push(Frame::Ack { upto });
            }
            if let Err(end) = self.write(send, &mut out, &frames).await {
                return Some(end);
            }
        }
    }

    async fn write(
        &self,
        send: &mut SendStream,
        out: &mut BytesMut,
        frames: &[Frame],
    ) -> Result<(), End> {
        out.clear();
        for frame in frames {
            frame
                .encode(out)
                .map_err(|e| End::Protocol(SessionError::Encode(e)))?;
        }
        send.write_all(out)
            .await
            .map_err(|e| End::PeerGone(SessionError::Write(e)))
    }
}

/// The cloud PUBLISH for one entry of `site`, or `None` if it must be dropped (counted in `drops`).
///
/// The topic goes under the site's namespace whatever the entry's `origin` says; QoS, retain, payload and the
/// MQTT 5 properties are kept; the trace context becomes `traceparent`/`tracestate` user properties and
/// `meshbridge-id = <site>/<seq>` is appended.
fn to_message(
    env: Envelope,
    site: &str,
    namespace: &Namespace,
    max_message_size: usize,
    drops: &mut Drops,
) -> Option<OutMessage> {
    if env.origin != site {
        drops.foreign_origin += 1;
    }
    if let Some(refusal) = oversize(&env, max_message_size) {
        drops.refused.push(refusal);
        return None;
    }
    let topic = match TopicName::parse(&env.topic).and_then(|t| namespace.apply(&t)) {
        Ok(topic) => topic.into_string(),
        Err(error) => {
            drops.refused.push(Refusal {
                seq: env.seq,
                reason_code: REASON_TOPIC_NAME_INVALID,
                detail: format!("topic {:?}: {error}", env.topic),
            });
            return None;
        }
    };
    let mut user = env.properties.user;
    user.reserve(3);
    if let Some(trace) = env.trace {
        user.push(("traceparent".to_owned(), trace.traceparent));
        if let Some(state) = trace.tracestate {
            user.push(("tracestate".to_owned(), state));
        }
    }
    user.push((MESHBRIDGE_ID.to_owned(), format!("{site}/{}", env.seq)));
    let properties = PublishProperties {
        payload_format_indicator: env.properties.payload_format_utf8.then_some(1),
        message_expiry_interval: env.properties.message_expiry,
        topic_alias: None,
        response_topic: env.properties.response_topic,
        correlation_data: env.properties.correlation_data,
        user_properties: user,
        subscription_identifiers: Vec::new(),
        content_type: env.properties.content_type,
    };
    Some(OutMessage {
        topic,
        qos: match env.qos {
            QoS::AtMostOnce => MqttQoS::AtMostOnce,
            QoS::AtLeastOnce => MqttQoS::AtLeastOnce,
            QoS::ExactlyOnce => MqttQoS::ExactlyOnce,
        },
        retain: env.retain,
        payload: env.payload,
        properties,
        seq: env.seq,
    })
}

/// The refusal of an entry whose payload is over the hub's limit.
fn oversize(env: &Envelope, max_message_size: usize) -> Option<Refusal> {
    (env.payload.len() > max_message_size).then(|| Refusal {
        seq: env.seq,
        reason_code: REASON_PACKET_TOO_LARGE,
        detail: format!(
            "{}-byte payload over the hub's limits.max_message_size of {max_message_size}",
            env.payload.len()
        ),
    })
}

fn mqtt_qos(qos: QoS) -> MqttQoS {
    match qos {
        QoS::AtMostOnce => MqttQoS::AtMostOnce,
        QoS::AtLeastOnce => MqttQoS::AtLeastOnce,
        QoS::ExactlyOnce => MqttQoS::ExactlyOnce,
    }
}

/// What the hub pushes to `site`: its share of the routes, or `None` when the hub has no routes at all
/// (the agents then run the routes of their own files, as before routes moved to the hub).
fn pushed_config(table: &RouteTable, site: &str) -> Option<PushedConfig> {
    if table.routes().is_empty() {
        return None;
    }
    EffectiveConfig::for_site(table, site).map(|c| c.to_push())
}

/// MQTT 5 reason codes for the refusals the hub decides itself.
const REASON_TOPIC_NAME_INVALID: u8 = 0x90;
const REASON_PACKET_TOO_LARGE: u8 = 0x95;

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shared::envelope::{Properties, TraceContext};

    fn env(origin: &str, topic: &str, payload: &'static [u8], qos: QoS, retain: bool) -> Envelope {
        Envelope {
            origin: origin.to_owned(),
            seq: 17,
            topic: topic.to_owned(),
            payload: Bytes::from_static(payload),
            qos,
            retain,
            properties: Properties::default(),
            trace: None,
            enqueued_at_ms: 0,
        }
    }

    #[test]
    fn entries_map_into_the_site_namespace() {
        let ns = Namespace::parse("acme/plant1/line1").expect("namespace");
        // (entry, expected topic or None if dropped, expected qos, retain)
        let cases: Vec<(Envelope, Option<&str>, MqttQoS, bool)> = vec![
            (
                env("line1", "t/a", b"x", QoS::AtMostOnce, false),
                Some("acme/plant1/line1/t/a"),
                MqttQoS::AtMostOnce,
                false,
            ),
            (
                env("line1", "t/b", b"x", QoS::AtLeastOnce, true),
                Some("acme/plant1/line1/t/b"),
                MqttQoS::AtLeastOnce,
                true,
            ),
            (
                env("line1", "t/c", b"x", QoS::ExactlyOnce, false),
                Some("acme/plant1/line1/t/c"),
                MqttQoS::ExactlyOnce,
                false,
            ),
            // Another origin in the body changes nothing.
            (
                env("line2", "t/d", b"x", QoS::AtLeastOnce, false),
                Some("acme/plant1/line1/t/d"),
                MqttQoS::AtLeastOnce,
                false,
            ),
            (
                env("line1", "$SYS/x", b"x", QoS::AtLeastOnce, false),
                Some("acme/plant1/line1/$SYS/x"),
                MqttQoS::AtLeastOnce,
                false,
            ),
            // Dropped: wildcard topic, empty topic, payload over the limit (8 bytes here).
            (
                env("line1", "t/+", b"x", QoS::AtLeastOnce, false),
                None,
                MqttQoS::AtLeastOnce,
                false,
            ),
            (
                env("line1", "", b"x", QoS::AtLeastOnce, false),
                None,
                MqttQoS::AtLeastOnce,
                false,
            ),
            (
                env("line1", "t/e", b"123456789", QoS::AtLeastOnce, false),
                None,
                MqttQoS::AtLeastOnce,
                false,
            ),
        ];
        let mut drops = Drops::default();
        for (entry, want_topic, want_qos, want_retain) in cases {
            let label = format!("{:?}", entry.topic);
            let got = to_message(entry, "line1", &ns, 8, &mut drops);
            match (got, want_topic) {
                (Some(m), Some(topic)) => {
                    assert_eq!(m.topic, topic, "{label}");
                    assert_eq!(m.qos, want_qos, "{label}");
                    assert_eq!(m.retain, want_retain, "{label}");
                    assert_eq!(
                        m.properties.user_properties,
                        vec![(MESHBRIDGE_ID.to_owned(), "line1/17".to_owned())],
                        "{label}"
                    );
                }
                (None, None) => {}
                (got, want) => panic!("{label}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(drops.foreign_origin, 1);
        // What cannot be published is refused with a reason, for the agent's dead-letter store.
        let codes: Vec<u8> = drops.refused.iter().map(|r| r.reason_code).collect();
        assert_eq!(
            codes
                .iter()
                .filter(|&&c| c == REASON_TOPIC_NAME_INVALID)
                .count(),
            2,
            "{:?}",
            drops.refused
        );
        assert_eq!(
            codes
                .iter()
                .filter(|&&c| c == REASON_PACKET_TOO_LARGE)
                .count(),
            1,
            "{:?}",
            drops.refused
        );
        assert!(drops.refused.iter().all(|r| r.seq == 17));
    }

    #[test]
    fn properties_and_trace_are_kept() {
        let ns = Namespace::parse("acme").expect("namespace");
        let mut entry = env("s", "t", b"p", QoS::AtLeastOnce, false);
        entry.properties = Properties {
            user: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            content_type: Some("ct".into()),
            response_topic: Some("rt".into()),
            correlation_data: Some(Bytes::from_static(b"cd")),
            message_expiry: Some(60),
            payload_format_utf8: true,
        };
        entry.trace = Some(TraceContext {
            traceparent: "tp".into(),
            tracestate: None,
        });
        let m = to_message(entry, "s", &ns, 1024, &mut Drops::default()).expect("published");
        let p = m.properties;
        assert_eq!(
            p.user_properties,
            vec![
                ("a".to_owned(), "1".to_owned()),
                ("a".to_owned(), "2".to_owned()),
                ("traceparent".to_owned(), "tp".to_owned()),
                (MESHBRIDGE_ID.to_owned(), "s/17".to_owned()),
            ]
        );
        assert_eq!(p.content_type.as_deref(), Some("ct"));
        assert_eq!(p.response_topic.as_deref(), Some("rt"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"cd"[..]));
        assert_eq!(p.message_expiry_interval, Some(60));
        assert_eq!(p.payload_format_indicator, Some(1));
        assert_eq!(p.topic_alias, None);
        assert_eq!(&m.payload[..], b"p");
    }
}
