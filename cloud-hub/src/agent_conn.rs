//! One agent connection: handshake checks, `Hello`/`Welcome`, then batches → dedup → namespace → publish →
//! persist dedup → `Ack`, pipelined and in order.
//!
//! The protocol (which frame may come when, what is acknowledged, when to say `GoAway`) is the link
//! machine's, `shared::link::hub::HubConn`; this task moves bytes and does the hub's work for it, in one
//! `select!` loop:
//! - frames read go into the machine; each `PublishBatch` it emits is filtered through the site's dedup
//!   window, mapped into the site's namespace and handed to the publisher without waiting for the broker,
//!   so batch N+1 is being published while batch N waits for its PUBACKs;
//! - batches complete in arrival order; every batch already complete behind the first is grouped, their
//!   seqs are marked in the dedup window, the site's dedup state is committed once for the group (while
//!   reading goes on), and only then does the machine get `committed`, which writes the `Refused` frames
//!   and `Ack`s.
//!
//! Identity is the client certificate's ([`crate::tls::site_identity`]); the `origin` inside entry bodies
//! and the `agent_name` in `Hello` are never trusted (they are only logged when they disagree).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::BytesMut;
use meshbridge_metrics::timer::Deadline;
use quinn::{Connection, RecvStream, SendStream, VarInt};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS as MqttQoS;
use shared::config::EffectiveConfig;
use shared::envelope::{Envelope, QoS};
use shared::link::hub::{Admission, ConfigOffer, HubConfig, HubConn, HubEnd, HubEvent, Resume};
use shared::link::lane::{self, MAX_LANE};
use shared::link::{ProtocolViolation, Refusal as LinkRefusal};
use shared::policy::dedup::Dedup;
use shared::policy::route::{Message as RouteMessage, RouteTable, Target};
use shared::queue::Queue as _;
use shared::site::{SiteId, MAX_SITE_NAME_LEN};
use shared::topic::{Namespace, TopicName};
use shared::wire::{self, Capabilities, DecodeError, Frame, GoAwayCode};
use tokio::io::AsyncReadExt;
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn, Instrument};

use crate::downlink::{encode_delivery, Dedups, DownlinkStore, Routes, SiteDownlink};
use crate::events;
use crate::publisher::{OutMessage, PublishError, Publisher, Refusal, Refusals};
use crate::store::{PendingRefusals, MAX_PENDING_REFUSALS};
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
/// After a connection starts, how long its downlink lane waits for a higher lane of the site with a
/// backlog to connect before it sends anyway: an agent's lanes connect independently, and a bound keeps a
/// higher lane that never connects from holding the others.
const LANE_GRACE: Duration = Duration::from_secs(1);
/// `Downlink` frames in flight per connection before the agent's `DownlinkAck`.
const DOWNLINK_WINDOW: usize = 2;
/// How long an `Ack` may wait to cover later batches too (`shared::link::hub::HubConfig::ack_delay`):
/// the agent's QUIC ACK delay (`edge-agent/src/tls.rs`), so the transport's ACK and ours can share a
/// packet. At 1,000 msg/s about one `Ack` in five messages instead of one per message.
const ACK_DELAY: Duration = Duration::from_millis(5);
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
    /// A [`Dedup`] holding only this site's links (one origin per agent of the site: see [`origin`]), so
    /// its snapshot is the site's row in the store.
    pub(crate) dedup: Mutex<Dedup>,
    /// The connection that serves the site's downlink, if one does. At most one: the agents of a redundant
    /// pair share one site broker, and each command must reach it once. The others watch it and reconnect
    /// to take it over when it is released.
    ///
    /// One lease per priority lane (see `shared::link::lane`): each lane has its own downlink queue.
    pub(crate) downlink_lease: [watch::Sender<Option<u64>>; MAX_LANE as usize + 1],
    /// Which downlink lanes have a holder with messages to deliver (bits of `lane::bit`): a lane sends
    /// nothing new while a higher one is busy.
    pub(crate) downlink_busy: watch::Sender<u16>,
    /// Per origin, the refusals its agent may not have received (see [`PendingRefusals`]); saved with
    /// the dedup row.
    pub(crate) refusals: Mutex<HashMap<String, PendingRefusals>>,
    /// The site's event counters.
    pub(crate) counters: crate::metrics::SiteCounters,
    /// Cancelled when a config reload removed the site (`crate::sites`): its links drain and close with
    /// `Unauthorized`, and it is refused from then on.
    pub(crate) removed: CancellationToken,
    /// The dedup state or refusals changed since the store last took the site's row.
    pub(crate) dirty: AtomicBool,
}

impl Site {
    /// The site's row for the store if it changed since the last one taken: its dedup snapshot and, per
    /// origin, its pending refusals (`None`: none left, the row is removed). Taken under the dedup lock, so
    /// the snapshot and the refusals belong together.
    pub(crate) fn take_row(&self) -> Option<crate::store::SiteRow> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return None;
        }
        let dedup = self.dedup.lock().unwrap_or_else(PoisonError::into_inner);
        let refusals = self
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(origin, pending)| {
                let row = (!pending.by_seq.is_empty()).then(|| pending.encode());
                (origin.clone(), row)
            })
            .collect();
        Some(crate::store::SiteRow {
            site: self.name.clone(),
            snapshot: dedup.snapshot().encode(),
            refusals,
        })
    }

    /// A site with its restored dedup state.
    pub(crate) fn new(
        name: String,
        namespace: Namespace,
        dedup: Dedup,
        refusals: HashMap<String, PendingRefusals>,
        counters: crate::metrics::SiteCounters,
    ) -> Self {
        Self {
            name,
            namespace,
            dedup: Mutex::new(dedup),
            downlink_lease: std::array::from_fn(|_| watch::Sender::new(None)),
            downlink_busy: watch::Sender::new(0),
            refusals: Mutex::new(refusals),
            counters,
            removed: CancellationToken::new(),
            dirty: AtomicBool::new(false),
        }
    }

    /// The mark to resume `origin`'s agent from: the committed one, or just below the oldest refusal the
    /// agent may not have received (it did not acknowledge past it), so that entry is resent and refused
    /// again rather than deleted without being dead-lettered. Forgets the refusals the agent's `Hello`
    /// shows it acknowledged past, and all of another incarnation's.
    fn resume_mark(
        &self,
        origin: &str,
        incarnation: u64,
        last_acked: u64,
        committed: Option<(u64, u64)>,
    ) -> Option<(u64, u64)> {
        let mut all = self.refusals.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(pending) = all.get_mut(origin) else {
            return committed;
        };
        if pending.incarnation == incarnation {
            pending.by_seq.retain(|&seq, _| seq > last_acked);
        } else {
            pending.by_seq.clear();
        }
        let first = pending.by_seq.keys().next().copied();
        match (committed, first) {
            (Some((known, hw)), Some(first)) if known == incarnation && first <= hw => {
                info!(
                    first_seq = first,
                    count = pending.by_seq.len(),
                    hub_high_water = hw,
                    "resuming the agent below refusals it may not have received; they are refused again when resent"
                );
                Some((known, first - 1))
            }
            _ => committed,
        }
    }
}

/// The origin of one agent's link in the site's dedup state and in `meshbridge-id`: the site itself for
/// the usual single agent (whose `Hello` names the site), `<site>/<agent name>` for each member of a
/// redundant pair. Each agent has its own queue and numbering, so each needs its own window; the name is
/// only trusted within the site its certificate names, and follows a site name's rules ([`SiteId`]).
/// `None`: a name that cannot be an origin.
fn origin(site: &str, agent_name: &str) -> Option<String> {
    if agent_name == site {
        return Some(site.to_owned());
    }
    SiteId::new(agent_name)
        .is_ok()
        .then(|| format!("{site}/{agent_name}"))
}

/// Whether `origin` (see [`origin`]) is `site`'s: the site itself, one of its named agents, or a
/// priority lane of either (`shared::link::lane::origin`).
pub(crate) fn owned_by(site: &str, origin: &str) -> bool {
    origin.strip_prefix(site).is_some_and(|rest| {
        rest.is_empty() || rest.starts_with('/') || rest.starts_with(lane::LANE_SEPARATOR)
    })
}

/// Releases the site's downlink lease of a lane when the connection that holds it ends, however it ends.
struct LeaseGuard<'a> {
    site: &'a Site,
    lane: u8,
    id: u64,
}

impl Drop for LeaseGuard<'_> {
    fn drop(&mut self) {
        self.site
            .downlink_busy
            .send_if_modified(|mask| lane::mark(mask, self.lane, false));
        self.site.downlink_lease[usize::from(self.lane)].send_if_modified(|holder| {
            let mine = *holder == Some(self.id);
            if mine {
                *holder = None;
            }
            mine
        });
    }
}

/// The live connection of a site, as seen by a connection that replaces it.
#[derive(Debug)]
struct Live {
    id: u64,
    /// The serial of the certificate the connection was admitted with (what a CRL names).
    serial: crate::crl::Serial,
    /// Cancelled when the certificate was revoked: the connection closes with `Unauthorized`.
    revoked: CancellationToken,
    /// Cancelled to make the connection go away with `Replaced`.
    replaced: CancellationToken,
    /// Cancelled by the connection when its task is done (acks and dedup persisted).
    finished: CancellationToken,
}

/// State shared by every connection.
#[derive(Debug)]
pub(crate) struct Hub {
    /// The configured sites (changed by a config reload).
    pub(crate) sites: Arc<crate::sites::Sites>,
    pub(crate) publisher: Publisher,
    pub(crate) max_frame_size: usize,
    pub(crate) max_message_size: usize,
    /// `downlink.ack_timeout`: the downlink's stuck-link watchdog.
    pub(crate) downlink_ack_timeout: Duration,
    /// Protocol versions spoken (`listen.max_protocol_version` caps them).
    pub(crate) versions: shared::wire::VersionRange,
    /// The routes in force (swapped on a config reload); empty: the agents' own files decide what is
    /// forwarded, and everything forwarded is published under the site's namespace.
    pub(crate) routes: Routes,
    /// Per-route dedup sets.
    pub(crate) dedups: Dedups,
    /// What waits for each site.
    pub(crate) downlinks: Arc<DownlinkStore>,
    live: Mutex<HashMap<String, Live>>,
    next_id: AtomicU64,
    /// What the status topics say about each site (see `crate::status`).
    pub(crate) status: crate::status::StatusBoard,
}

impl Hub {
    /// Closes every live connection admitted with a certificate `revoked` names; returns how many.
    pub(crate) fn close_revoked(&self, revoked: &crate::crl::Revoked) -> usize {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        live.values()
            .filter(|l| revoked.serials.contains_key(&l.serial))
            .inspect(|l| l.revoked.cancel())
            .count()
    }

    /// Live connections per configured site (each agent and lane of a site counts once).
    pub(crate) fn connections_per_site(&self) -> Vec<(String, u64)> {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        self.sites
            .names()
            .into_iter()
            .map(|site| {
                let count = live.keys().filter(|origin| owned_by(&site, origin)).count();
                let count = count as u64;
                (site, count)
            })
            .collect()
    }

    pub(crate) fn new(
        sites: Arc<crate::sites::Sites>,
        publisher: Publisher,
        (max_frame_size, max_message_size, downlink_ack_timeout, versions): (
            usize,
            usize,
            Duration,
            shared::wire::VersionRange,
        ),
        (routes, dedups, downlinks): (Routes, Dedups, Arc<DownlinkStore>),
    ) -> Self {
        Self {
            sites,
            publisher,
            max_frame_size,
            max_message_size,
            downlink_ack_timeout,
            versions,
            routes,
            dedups,
            downlinks,
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            status: crate::status::StatusBoard::default(),
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
pub(crate) async fn serve(hub: Arc<Hub>, conn: Connection, stops: Stops) {
    let remote = conn.remote_address();
    let span = tracing::info_span!(
        "agent",
        site = tracing::field::Empty,
        lane = tracing::field::Empty,
        %remote
    );
    serve_connection(hub, conn, stops, span.clone())
        .instrument(span)
        .await;
}

async fn serve_connection(hub: Arc<Hub>, conn: Connection, stops: Stops, span: tracing::Span) {
    // Identity: the certificate only, known before any byte of the stream; the link machine answers
    // `Hello` with `GoAway{Unauthorized}` if it names no site we serve.
    let identity = tls::site_identity(&conn);
    let (admission, site) = match &identity {
        Ok(name) => {
            span.record("site", name.as_str());
            match hub.sites.get(name.as_str()) {
                Some(site) => (
                    Admission::Site {
                        max_topic_len: u16::try_from(site.namespace.local_topic_room())
                            .unwrap_or(u16::MAX),
                    },
                    Some(site),
                ),
                None => (
                    Admission::Unauthorized {
                        reason: format!("site {name} is not configured on this hub"),
                    },
                    None,
                ),
            }
        }
        Err(error) => (
            Admission::Unauthorized {
                reason: format!("unusable client certificate: {error}"),
            },
            None,
        ),
    };
    let mut link = HubConn::new(now(), link_config(&hub), admission);

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
    let Some(hello) = hello else {
        warn!(frame = "end of stream", "agent did not start with Hello");
        link.close(
            GoAwayCode::ProtocolError,
            "expected Hello, got end of stream".into(),
        );
        go_away(&mut send, &conn, &mut link, GOAWAY_LINGER).await;
        return;
    };
    link.handle_frame(hello, now());
    let (agent_name, version, capabilities, incarnation, last_acked, lane, running) = match link
        .poll_event()
    {
        Some(HubEvent::Hello {
            agent_name,
            version,
            capabilities,
            incarnation,
            last_acked,
            lane,
            config_version,
            agent_version,
        }) => (
            agent_name,
            version,
            capabilities,
            incarnation,
            last_acked,
            lane,
            (config_version, agent_version),
        ),
        other => {
            match other {
                Some(HubEvent::Closed {
                    end: HubEnd::Refused { code, reason },
                }) => match code {
                    GoAwayCode::IncompatibleVersion => {
                        error!(cause = %reason, "refusing agent: incompatible protocol version");
                    }
                    _ if identity.is_err() => {
                        error!(cause = %reason, "agent certificate names no usable site");
                    }
                    _ => error!("refusing agent: {reason}"),
                },
                Some(HubEvent::Closed {
                    end: HubEnd::Protocol(violation),
                }) => warn!(cause = %violation, "agent did not start with Hello"),
                _ => {}
            }
            go_away(&mut send, &conn, &mut link, GOAWAY_LINGER).await;
            return;
        }
    };
    let site = site.expect("invariant: admitted agents have a site");
    let Some(origin) = origin(&site.name, &agent_name) else {
        warn!(agent_name = %agent_name, "refusing agent: its name does not follow a site name's rules");
        link.refuse(
            GoAwayCode::ProtocolError,
            format!("agent name {agent_name:?} must be the site's name or follow a site name's rules (1-{MAX_SITE_NAME_LEN} of A-Z a-z 0-9 - _ .)"),
            None,
        );
        go_away(&mut send, &conn, &mut link, GOAWAY_LINGER).await;
        return;
    };
    if origin != site.name {
        info!(agent = %agent_name, "agent joins as a named member of the site (redundant pair): its own queue, window and ids");
    }
    let origin = lane::origin(&origin, lane).into_owned();
    // The downlink queue of this lane: the site's own for lane 0, `<site>+p<lane>` for the others.
    let downlink_key = lane::origin(&site.name, lane).into_owned();
    if lane > 0 {
        span.record("lane", lane);
    }

    // Refuse before `Welcome` while the cloud broker is away: the first batch would fail anyway.
    if !hub.publisher.is_connected() {
        debug!(
            retry_after_ms = capabilities
                .contains(Capabilities::RETRY_AFTER)
                .then_some(UNAVAILABLE_RETRY_AFTER.as_millis()),
            "refusing agent: the cloud broker is not connected"
        );
        link.refuse(
            GoAwayCode::Unavailable,
            "the hub's cloud broker is not connected".into(),
            Some(UNAVAILABLE_RETRY_AFTER),
        );
        go_away(&mut send, &conn, &mut link, GOAWAY_LINGER).await;
        return;
    }

    let certificate = match tls::peer_certificate(&conn) {
        Ok(certificate) => certificate,
        Err(error) => {
            // Cannot happen after `site_identity` read the same chain; refused rather than unchecked.
            warn!(cause = %error, "cannot read the agent's certificate; closing");
            conn.close(code(GoAwayCode::Unauthorized), b"unreadable certificate");
            return;
        }
    };
    events::CertificateSeen {
        serial: &certificate.serial,
        not_after: certificate.not_after,
        now: meshbridge_tls::server::unix_now(),
    }
    .emit(&site.counters);

    // One live connection per agent of a site: the newest wins, after the old one finished what it had in
    // flight. Two agents sharing one certificate and one name replace each other; a redundant pair names
    // its members.
    let id = hub.next_id.fetch_add(1, Ordering::Relaxed);
    let revoked = CancellationToken::new();
    let replaced = CancellationToken::new();
    let finished = CancellationToken::new();
    let _finished_guard = finished.clone().drop_guard();
    let old = hub
        .live
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(
            origin.clone(),
            Live {
                id,
                serial: certificate.serial.clone(),
                revoked: revoked.clone(),
                replaced: replaced.clone(),
                finished,
            },
        );
    if let Some(old) = old {
        warn!(
            old_connection = old.id,
            "agent connected again; replacing its existing connection"
        );
        old.replaced.cancel();
        if tokio::time::timeout(REPLACE_WAIT, old.finished.cancelled())
            .await
            .is_err()
        {
            warn!(waited = ?REPLACE_WAIT, "replaced connection did not finish in time; serving the new one anyway");
        }
    }

    let committed = site
        .dedup
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .high_water(&origin);
    let committed = site.resume_mark(&origin, incarnation, last_acked, committed);
    let max_topic_len = u16::try_from(site.namespace.local_topic_room()).unwrap_or(u16::MAX);
    let downlink = match hub.downlinks.site(&downlink_key).await {
        Ok(downlink) => downlink,
        Err(error) => {
            error!(cause = %error, "cannot open the site's downlink queue; refusing the agent for now");
            link.refuse(
                GoAwayCode::Overloaded,
                "hub downlink storage failed".into(),
                None,
            );
            let mut out = BytesMut::new();
            let _ = write_transmits(&mut link, &mut send, &mut out).await;
            conn.close(code(GoAwayCode::Overloaded), b"hub downlink storage failed");
            return;
        }
    };
    let serves_downlink = site.downlink_lease[usize::from(lane)].send_if_modified(|holder| {
        let free = holder.is_none();
        if free {
            *holder = Some(id);
        }
        free
    });
    let _lease = LeaseGuard {
        site: &site,
        lane,
        id,
    };
    if serves_downlink && downlink.queue.depth() > 0 {
        // Busy from the moment it holds the lease, so a lower lane's connection never sees a gap between
        // "nobody serves it" and "its holder is busy".
        site.downlink_busy
            .send_if_modified(|mask| lane::mark(mask, lane, true));
    }
    let downlink_stats = downlink.queue.stats();
    // A connection without the lease is told the queue is empty, and is never fed (see `Session`).
    let downlink_written = if serves_downlink {
        downlink_stats.next_seq.saturating_sub(1)
    } else {
        downlink_stats.acked
    };
    let hub_high_water = link.welcome(
        now(),
        max_topic_len,
        Resume {
            committed,
            config: offer(&hub.routes.borrow(), &site.name),
            config_rejected: None,
            downlink_acked: downlink_stats.acked,
            downlink_written,
        },
    );
    while let Some(event) = link.poll_event() {
        if let HubEvent::NewIncarnation {
            old_incarnation,
            old_high_water,
            incarnation,
        } = event
        {
            // A new queue file (new disk, wiped data directory) or an agent that found its restored copy
            // behind this hub and renumbered above our mark: either way its numbering starts over.
            warn!(
                old_incarnation,
                old_high_water,
                incarnation,
                "site's queue has a new incarnation: a new, wiped or restored data directory"
            );
        }
    }
    let mut out = BytesMut::new();
    if let Err(error) = write_transmits(&mut link, &mut send, &mut out).await {
        info!(cause = %error, "agent left before Welcome");
    } else {
        let _presence =
            crate::status::Presence::new(&hub.status, &site.name, running.0, &running.1);
        events::AgentConnected {
            connection: id,
            version,
            incarnation,
            agent_last_acked: last_acked,
            hub_high_water,
            serves_downlink,
        }
        .emit(&site.counters);
        let session = Session {
            hub: &hub,
            site: &site,
            incarnation,
            stops: &stops,
            replaced: &replaced,
            revoked: &revoked,
            downlink: &downlink,
            downlink_key: &downlink_key,
            lane,
            origin: &origin,
            serves_downlink,
        };
        let end = session.run(&mut link, recv, buf, &mut send).await;
        match &end {
            End::Stopped(_) => {}
            End::PeerGone(error) => info!(cause = %error, "agent disconnected"),
            End::PeerGoAway { code, reason } => info!(?code, %reason, "agent said GoAway"),
            End::Protocol(error) => warn!(cause = %error, "agent broke the protocol; closing"),
            End::Publish(error) => {
                warn!(cause = %error, "cloud broker did not accept a batch; closing the agent connection so it resends");
            }
            End::PublishTimeout => {
                warn!(timeout = ?PUBLISH_TIMEOUT, "cloud broker did not acknowledge a batch in time; closing the agent connection");
            }
            End::Downlink(error) => {
                error!(cause = %error, "a downlink queue failed; closing the agent connection without acking");
            }
            End::Stalled {
                after,
                unacked_frames,
            } => events::DownlinkStalled {
                after: *after,
                unacked_frames: *unacked_frames,
            }
            .emit(&site.counters),
        }
        match end {
            End::PeerGone(_) | End::PeerGoAway { .. } => conn.close(VarInt::from_u32(0), b""),
            // The site's new connection waits for this one to finish, so linger only as long as a live
            // peer needs to acknowledge the GoAway. An agent that restarted is not there to read it, and
            // lingering the full `GOAWAY_LINGER` made every restarted agent wait that long to be served; a
            // peer still there that misses it learns the same code from the connection close.
            End::Stopped(GoAwayCode::Replaced) => {
                let linger = (conn.rtt() * 4 + REPLACED_ACK_SLACK).min(GOAWAY_LINGER);
                go_away(&mut send, &conn, &mut link, linger).await;
            }
            _ => go_away(&mut send, &conn, &mut link, GOAWAY_LINGER).await,
        }
    }

    let mut live = hub.live.lock().unwrap_or_else(PoisonError::into_inner);
    if live.get(&origin).is_some_and(|l| l.id == id) {
        live.remove(&origin);
    }
}

/// The link machine's settings for this hub: config push and downlink offered.
fn link_config(hub: &Hub) -> HubConfig {
    HubConfig {
        max_frame_size: u32::try_from(hub.max_frame_size).unwrap_or(u32::MAX),
        // The limit `to_message` enforces, stated up front so the agent refuses at PUBLISH time what would
        // otherwise be acknowledged to its publisher and dropped here (see `shared::limits`).
        max_message_size: u32::try_from(hub.max_message_size).unwrap_or(u32::MAX),
        capabilities: Capabilities::CONFIG_PUSH.union(Capabilities::DOWNLINK),
        hello_timeout: HELLO_TIMEOUT,
        versions: hub.versions,
        software_version: env!("CARGO_PKG_VERSION").to_owned(),
        keepalive: None,
        downlink_window: DOWNLINK_WINDOW,
        downlink_ack_timeout: Some(hub.downlink_ack_timeout),
        ack_delay: ACK_DELAY,
    }
}

/// The link machine's clock: tokio's, so that paused-time tests drive it too.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// Writes every frame the link machine has queued, in one write.
async fn write_transmits(
    link: &mut HubConn,
    send: &mut SendStream,
    out: &mut BytesMut,
) -> Result<(), SessionError> {
    out.clear();
    while let Some(frame) = link.poll_transmit() {
        frame.encode(out)?;
    }
    if !out.is_empty() {
        send.write_all(out).await?;
    }
    Ok(())
}

/// The QUIC application close code for a GoAway code (the same number).
fn code(code: GoAwayCode) -> VarInt {
    VarInt::from_u32(code.code().into())
}

/// Writes what the closed link machine still has to say (its `GoAway`, last frame on the stream), gives it
/// `linger` to be read, then closes the connection with the `GoAway`'s code and reason.
async fn go_away(send: &mut SendStream, conn: &Connection, link: &mut HubConn, linger: Duration) {
    let mut buf = BytesMut::new();
    let mut close = (GoAwayCode::Normal, String::new());
    while let Some(frame) = link.poll_transmit() {
        if let Frame::GoAway { code, reason, .. } = &frame {
            close = (*code, reason.clone());
        }
        if let Err(error) = frame.encode(&mut buf) {
            // A reason can only be too long for its u16 prefix; then send none rather than no GoAway.
            if let Frame::GoAway {
                code,
                retry_after_ms,
                ..
            } = frame
            {
                let _ = Frame::GoAway {
                    code,
                    reason: String::new(),
                    retry_after_ms,
                }
                .encode(&mut buf);
            } else {
                debug!(cause = %error, "frame dropped at close");
            }
        }
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
    conn.close(code(close.0), close.1.as_bytes());
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
    /// The agent broke the link protocol (a frame out of place, seqs going backwards); the link machine
    /// answered with `GoAway{ProtocolError}`.
    #[error("{0}")]
    Protocol(#[from] ProtocolViolation),
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// Shutdown or replacement (the code says which); in-flight batches were drained.
    Stopped(GoAwayCode),
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
    /// A site's downlink queue failed.
    Downlink(crate::HubError),
    /// The downlink watchdog: frames unacknowledged on a live connection.
    Stalled {
        after: Duration,
        unacked_frames: usize,
    },
}

impl From<HubEnd> for End {
    fn from(end: HubEnd) -> Self {
        match end {
            HubEnd::Protocol(violation) => Self::Protocol(SessionError::Protocol(violation)),
            HubEnd::PeerGoAway { code, reason } => Self::PeerGoAway { code, reason },
            HubEnd::Stalled {
                after,
                unacked_frames,
            } => Self::Stalled {
                after,
                unacked_frames,
            },
            // Only `drain` closes an open link without the session choosing an `End` first.
            other => Self::Stopped(other.code()),
        }
    }
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
    /// The batch's traced messages, whose `publish` spans end when the cloud broker has them.
    traced: Vec<crate::traced::Publishing>,
}

/// A published batch ready to be acknowledged: its seqs for dedup, its `Ack` value and its refusals.
type Done = (Vec<u64>, u64, Refusals);

impl Pending {
    fn finish(self, mut refused: Refusals) -> Done {
        crate::traced::published(self.traced);
        // Both lists are usually empty.
        refused.extend(self.refused);
        (self.seqs, self.upto, refused)
    }
}

/// A dedup commit in progress, with the batches it covers.
struct Session<'a> {
    hub: &'a Hub,
    site: &'a Site,
    incarnation: u64,
    stops: &'a Stops,
    replaced: &'a CancellationToken,
    /// Cancelled when the connection's certificate was revoked (`crate::revocation`).
    revoked: &'a CancellationToken,
    /// The site's downlink queue of this connection's lane.
    downlink: &'a SiteDownlink,
    /// Its key in the downlink store.
    downlink_key: &'a str,
    /// The priority lane this connection carries.
    lane: u8,
    /// This agent's origin (see [`origin`]): its dedup window and its `meshbridge-id` prefix.
    origin: &'a str,
    /// Whether this connection holds the site's downlink lease.
    serves_downlink: bool,
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
    /// Drives the link machine: frames read go in; each `PublishBatch` is filtered, mapped and handed to
    /// the publisher without waiting for the broker (batch N+1 is published while batch N waits for its
    /// PUBACKs); completed batches are grouped, marked in the dedup window, committed once per group, and
    /// only then reported to the machine, which writes their `Refused` frames and `Ack`s.
    async fn run(
        &self,
        link: &mut HubConn,
        mut recv: RecvStream,
        mut buf: BytesMut,
        send: &mut SendStream,
    ) -> End {
        let mut out = BytesMut::with_capacity(256);
        let mut pending: VecDeque<Pending> = VecDeque::new();
        // When the batch at the head of `pending` must be done.
        let mut head_deadline: Option<tokio::time::Instant> = None;
        // Why the session ends, when the shell decided it (the machine's `Closed` follows).
        let mut end: Option<End> = None;
        let mut routes = self.hub.routes.clone();
        routes.mark_unchanged();
        let grew = self.downlink.grew.notified();
        let mut grew = std::pin::pin!(grew);
        grew.as_mut().enable();
        let mut lease = self.site.downlink_lease[usize::from(self.lane)].subscribe();
        lease.mark_unchanged();
        let mut higher = self.site.downlink_busy.subscribe();
        // Until then, a higher lane with a backlog and no connection yet holds this one back too: an
        // agent's lanes connect independently (see `LANE_GRACE`).
        let mut grace_until = Some(tokio::time::Instant::now() + LANE_GRACE);
        // Built once, not per turn of the loop: a future built inside `select!` registers with its token
        // or timer on every turn and unregisters when dropped, two or three turns per message.
        let mut shutdown = std::pin::pin!(self.stops.shutdown.cancelled());
        let mut hard_stop = std::pin::pin!(self.stops.hard.cancelled());
        let mut revoked = std::pin::pin!(self.revoked.cancelled());
        let mut removed = std::pin::pin!(self.site.removed.cancelled());
        let mut replaced = std::pin::pin!(self.replaced.cancelled());
        let mut publish_timer = Deadline::new();
        let mut link_timer = Deadline::new();
        loop {
            while let Some(event) = link.poll_event() {
                match event {
                    HubEvent::PublishBatch { entries } => match self.submit(entries).await {
                        Ok(Some(p)) => pending.push_back(p),
                        Ok(None) => {}
                        Err(error) => {
                            end = Some(End::Downlink(error));
                            link.close(
                                GoAwayCode::Overloaded,
                                "hub downlink storage failed".into(),
                            );
                        }
                    },
                    HubEvent::Closed { end: closed } => {
                        return end.take().unwrap_or_else(|| End::from(closed));
                    }
                    HubEvent::ConfigApplied { version } => {
                        events::ConfigAnswered {
                            version,
                            refused: None,
                        }
                        .emit(&self.site.counters);
                        self.hub.status.config_applied(&self.site.name, version);
                    }
                    HubEvent::ConfigRejected { version, rejection } => events::ConfigAnswered {
                        version,
                        refused: Some((&rejection.reason, &rejection.detail)),
                    }
                    .emit(&self.site.counters),
                    HubEvent::DownlinkAcked { upto } => {
                        if let Err(error) = self.downlink_acked(upto).await {
                            end = Some(End::Downlink(error));
                            link.close(
                                GoAwayCode::Overloaded,
                                "hub downlink storage failed".into(),
                            );
                        }
                    }
                    // Handled before the session started.
                    HubEvent::Hello { .. } | HubEvent::NewIncarnation { .. } => {}
                }
            }
            if pending.is_empty() {
                head_deadline = None;
            } else if head_deadline.is_none() {
                head_deadline = Some(tokio::time::Instant::now() + PUBLISH_TIMEOUT);
            }
            if link.is_closed() {
                // Closed by the shell: its `GoAway` is written by the caller.
                return end.take().unwrap_or(End::Stopped(GoAwayCode::Normal));
            }
            if matches!(end, Some(End::PeerGone(_))) && pending.is_empty() {
                // The agent left; what it had sent is published and marked seen (so its resend is
                // dropped as a duplicate), and there is nobody to tell.
                return end.take().expect("just matched");
            }
            let waiting_for_higher = self.serves_downlink
                && grace_until.is_some_and(|t| tokio::time::Instant::now() < t)
                && self.higher_downlink_waits();
            let outranked =
                waiting_for_higher || lane::outranked(*higher.borrow_and_update(), self.lane);
            if !self.serves_downlink || outranked {
                // Nothing to send: the lease holder serves the site's downlink, and a higher lane goes
                // first (strict priority, see `shared::link::lane`).
            } else if let Err(error) = self.send_downlink(link, send, &mut out).await {
                match error {
                    DownlinkSendError::Write(error) => return End::PeerGone(error),
                    DownlinkSendError::Queue(error) => {
                        end = Some(End::Downlink(error));
                        link.close(GoAwayCode::Overloaded, "hub downlink storage failed".into());
                    }
                }
            }
            if self.serves_downlink {
                let busy = self.downlink.queue.depth() > 0;
                self.site
                    .downlink_busy
                    .send_if_modified(|mask| lane::mark(mask, self.lane, busy));
            }
            if let Err(error) = write_transmits(link, send, &mut out).await {
                return End::PeerGone(error);
            }
            let reading =
                end.is_none() && !link.is_draining() && pending.len() < MAX_PENDING_BATCHES;
            publish_timer.set(head_deadline);
            link_timer.set(link.poll_timeout().map(tokio::time::Instant::from_std));
            tokio::select! {
                biased;
                () = shutdown.as_mut(), if !link.is_draining() => {
                    link.drain(GoAwayCode::ShuttingDown, "the hub is shutting down".into());
                }
                () = revoked.as_mut(), if !link.is_closed() => {
                    // No drain: a revoked site sends nothing more. What it had in flight stays in its
                    // queue (unacknowledged), and the dedup state drops it should it come back re-issued.
                    warn!("the site's certificate was revoked; closing its link");
                    link.close(GoAwayCode::Unauthorized, "certificate revoked".into());
                }
                () = removed.as_mut(), if !link.is_draining() => {
                    warn!("the site was removed from the hub's config; closing its link");
                    link.drain(GoAwayCode::Unauthorized, "site removed from the hub's config".into());
                }
                () = replaced.as_mut(), if !link.is_draining() => {
                    link.drain(GoAwayCode::Replaced, "another connection for this site took over".into());
                }
                changed = lease.changed(), if !self.serves_downlink && !link.is_draining() => {
                    // The member that served the site's downlink left: this one reconnects to take it
                    // over (its uplink resumes from its queue; nothing is lost).
                    if changed.is_ok() && lease.borrow_and_update().is_none() {
                        info!("the site's downlink is free; asking this agent to reconnect and serve it");
                        link.drain(GoAwayCode::Normal, "the site's downlink is free: reconnect to serve it".into());
                    }
                }
                () = hard_stop.as_mut(), if !pending.is_empty() => {
                    end = Some(End::PublishTimeout);
                    link.close(GoAwayCode::Overloaded, "cloud broker did not acknowledge in time".into());
                }
                done = async { (&mut pending.front_mut().expect("guarded by the condition").done).await }, if !pending.is_empty() => {
                    let head = pending.pop_front().expect("guarded by the condition");
                    head_deadline = None;
                    let mut group = match done {
                        Err(_) => vec![Err(PublishError::Stopped)],
                        Ok(Err(error)) => vec![Err(error)],
                        Ok(Ok(refused)) => vec![Ok(head.finish(refused))],
                    };
                    // Group every batch already complete behind it: one dedup commit for all of them.
                    while let Some(next) = pending.front_mut() {
                        let result = match next.done.try_recv() {
                            Ok(result) => result,
                            Err(oneshot::error::TryRecvError::Closed) => Err(PublishError::Stopped),
                            Err(oneshot::error::TryRecvError::Empty) => break,
                        };
                        let next = pending.pop_front().expect("just seen");
                        group.push(result.map(|refused| next.finish(refused)));
                    }
                    match group.into_iter().collect::<Result<Vec<Done>, PublishError>>() {
                        Err(error) => {
                            link.close(GoAwayCode::Overloaded, format!("cloud broker: {error}"));
                            end = Some(End::Publish(error));
                        }
                        Ok(group) => {
                            // Seen in memory now; the store flusher writes the site's row with its next
                            // group commit (`crate::store`, which says why the Ack need not wait for it).
                            self.observe(&group);
                            self.site.dirty.store(true, Ordering::Release);
                            for (_, upto, refused) in group {
                                events::Refused { refusals: &refused }.emit(&self.site.counters);
                                let refusals = refused
                                    .into_iter()
                                    .map(|r| LinkRefusal {
                                        seq: r.seq,
                                        reason_code: r.reason_code,
                                        detail: r.detail,
                                    })
                                    .collect();
                                link.committed(upto, refusals, now());
                            }
                        }
                    }
                }
                () = publish_timer.expired(), if publish_timer.is_set() => {
                    end = Some(End::PublishTimeout);
                    link.close(GoAwayCode::Overloaded, "cloud broker did not acknowledge in time".into());
                }
                () = link_timer.expired(), if link_timer.is_set() => link.handle_timeout(now()),
                changed = routes.changed() => {
                    if changed.is_ok() {
                        let table = Arc::clone(&routes.borrow_and_update());
                        if let Some(offer) = offer(&table, &self.site.name) {
                            info!(version = offer.version, "routes changed; offering the site's config");
                            link.push_config(offer);
                        }
                    }
                }
                () = sleep_until(grace_until), if waiting_for_higher => grace_until = None,
                changed = higher.changed(), if outranked && self.serves_downlink => {
                    // A higher lane finished (or left): this one may send again.
                    let _ = changed;
                }
                () = &mut grew => {
                    grew.set(self.downlink.grew.notified());
                    if self.serves_downlink {
                        link.downlink_written(self.downlink.queue.stats().next_seq.saturating_sub(1));
                    }
                }
                frame = read_frame(&mut recv, &mut buf, self.hub.max_frame_size), if reading => {
                    match frame {
                        Ok(Some(frame)) => link.handle_frame(frame, now()),
                        // Stop reading but finish the batches in flight, as for a shutdown.
                        Ok(None) => end = Some(End::PeerGone(SessionError::Finished)),
                        Err(error @ SessionError::Decode(_)) => {
                            link.drain(GoAwayCode::ProtocolError, error.to_string());
                            end = Some(End::Protocol(error));
                        }
                        Err(error) => end = Some(End::PeerGone(error)),
                    }
                }
            }
        }
    }

    /// Marks every seq of `group` in this agent's dedup window, and keeps its refusals until the agent
    /// shows it received them.
    fn observe(&self, group: &[Done]) {
        let mut dedup = self
            .site
            .dedup
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (seqs, _, _) in group {
            for &seq in seqs {
                let _ = dedup.observe(self.origin, self.incarnation, seq);
            }
        }
        // The dedup lock is held on while the refusals are updated: the store's flusher takes both under
        // it (`Site::take_row`), so no row has a seq marked seen without its refusal.
        if group.iter().all(|(_, _, refused)| refused.is_empty()) {
            return;
        }
        let mut all = self
            .site
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let pending = all.entry(self.origin.to_owned()).or_default();
        if pending.incarnation != self.incarnation {
            *pending = PendingRefusals {
                incarnation: self.incarnation,
                ..PendingRefusals::default()
            };
        }
        for r in group.iter().flat_map(|(_, _, refused)| refused) {
            pending
                .by_seq
                .insert(r.seq, (r.reason_code, r.detail.clone()));
        }
        while pending.by_seq.len() > MAX_PENDING_REFUSALS {
            pending.by_seq.pop_first();
        }
    }

    /// Filters, routes and hands one batch to the publisher; `None` for an empty batch. What the routes
    /// send to other sites is committed to their downlink queues first, so the batch's `Ack` (which waits
    /// for the publisher) never covers a message that is neither published nor queued.
    async fn submit(&self, entries: Vec<Envelope>) -> Result<Option<Pending>, crate::HubError> {
        let Some(upto) = entries.last().map(|e| e.seq) else {
            return Ok(None);
        };
        let received = entries.len() as u64;
        let traces = meshbridge_metrics::otel::traces();
        let received_at = std::time::SystemTime::now();
        let mut traced_out = Vec::new();
        let mut seqs = Vec::with_capacity(entries.len());
        let mut out = Vec::with_capacity(entries.len());
        let mut drops = Drops::default();
        let table = Arc::clone(&self.hub.routes.borrow());
        let routed = !table.routes().is_empty();
        let mut to_sites: Vec<(String, bytes::Bytes)> = Vec::new();
        // Refusals this agent may not have received: their entries are refused again, never published.
        let refuse_again = self
            .site
            .refusals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(self.origin)
            .filter(|p| p.incarnation == self.incarnation && !p.by_seq.is_empty())
            .map(|p| p.by_seq.clone());
        {
            let dedup = self
                .site
                .dedup
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let window = match dedup.high_water(self.origin) {
                Some((known, _)) if known == self.incarnation => dedup.window(self.origin),
                _ => None,
            };
            for mut env in entries {
                let traced = traces.and_then(|t| {
                    let context = t.continues(&env.trace.as_ref()?.traceparent)?;
                    Some((t, context))
                });
                if let Some((code, detail)) = refuse_again.as_ref().and_then(|r| r.get(&env.seq)) {
                    debug!(seq = env.seq, "entry refused before; refused again");
                    drops.refused.push(Refusal {
                        seq: env.seq,
                        reason_code: *code,
                        detail: detail.clone(),
                    });
                    seqs.push(env.seq);
                    continue;
                }
                if window.is_some_and(|w| w.is_seen(env.seq)) {
                    drops.duplicates += 1;
                    debug!(seq = env.seq, "duplicate dropped");
                    if let Some((traces, context)) = traced {
                        crate::traced::duplicate(
                            traces,
                            &context,
                            &self.site.name,
                            env.seq,
                            received_at,
                        );
                    }
                    continue;
                }
                seqs.push(env.seq);
                let before = out.len();
                let spans = traced.map(|(traces, context)| {
                    let spans = crate::traced::Receiving::new(traces, context, received_at);
                    // The cloud message continues from the hub's `publish` span.
                    if let Some(trace) = &mut env.trace {
                        trace.traceparent = spans.publish_context().header();
                    }
                    (traces, spans)
                });
                let (seq, topic) = match spans {
                    Some(_) => (env.seq, env.topic.clone()),
                    None => (env.seq, String::new()),
                };
                if routed {
                    self.route(env, &table, &mut out, &mut to_sites, &mut drops);
                } else if let Some(message) = to_message(
                    env,
                    (&self.site.name, self.origin),
                    &self.site.namespace,
                    self.hub.max_message_size,
                    &mut drops,
                ) {
                    out.push(message);
                }
                if let Some((traces, spans)) = spans {
                    let cloud = out.len() - before;
                    traced_out.extend(spans.routed(traces, &self.site.name, seq, topic, cloud));
                }
            }
        }
        to_sites.sort_by(|a, b| a.0.cmp(&b.0));
        let mut rest = to_sites.as_slice();
        while let Some((dest, _)) = rest.first() {
            let count = rest.iter().take_while(|(d, _)| d == dest).count();
            let bodies: Vec<bytes::Bytes> = rest[..count].iter().map(|(_, b)| b.clone()).collect();
            self.hub.downlinks.append(dest, bodies).await?;
            debug!(to = %dest, count, "queued for another site");
            rest = &rest[count..];
        }
        events::BatchHandled {
            upto,
            received,
            duplicates: drops.duplicates as u64,
            forwarded: out.len() as u64,
            unroutable: drops.unroutable as u64,
            foreign_origin: drops.foreign_origin as u64,
        }
        .emit(&self.site.counters);
        let handed_over = std::time::SystemTime::now();
        for t in &mut traced_out {
            t.handed_over(handed_over);
        }
        let done = self.hub.publisher.submit(&self.site.name, out).await;
        Ok(Some(Pending {
            seqs,
            upto,
            refused: drops.refused,
            done,
            traced: traced_out,
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
        // What goes to the cloud answers into the site's namespace, like the unrouted path (`to_message`).
        let mut cloud_props = env.properties.clone();
        if let Some(local) = cloud_props.response_topic.take() {
            match self.site.namespace.apply_response_topic(&local) {
                Ok(global) => cloud_props.response_topic = Some(global),
                Err(error) => {
                    drops.refused.push(Refusal {
                        seq: env.seq,
                        reason_code: REASON_TOPIC_NAME_INVALID,
                        detail: format!("response topic {local:?}: {error}"),
                    });
                    return;
                }
            }
        }
        let id = format!("{}/{}", self.origin, env.seq);
        for delivery in &decision.deliveries {
            match &delivery.target {
                Target::Cloud => out.push(OutMessage {
                    topic: delivery.topic.as_str().to_owned(),
                    qos: mqtt_qos(delivery.qos),
                    retain: delivery.retain,
                    payload: env.payload.clone(),
                    properties: cloud_properties(
                        &cloud_props,
                        delivery.user_properties(&env.properties.user),
                        env.trace.as_ref(),
                        id.clone(),
                    ),
                    seq: env.seq,
                }),
                Target::Site(dest) => {
                    let mut properties = env.properties.clone();
                    properties.user.push((MESHBRIDGE_ID.to_owned(), id.clone()));
                    match encode_delivery(&env.payload, &properties, delivery, env.enqueued_at_ms) {
                        // The destination's downlink queue of the route's priority lane.
                        Ok(body) => to_sites
                            .push((lane::origin(dest, delivery.priority).into_owned(), body)),
                        Err(error) => {
                            warn!(seq = env.seq, to = %dest, cause = %error, "cannot encode a message for another site; not delivered there");
                        }
                    }
                }
            }
        }
    }

    /// Whether a downlink lane of the site above this one holds messages and nobody serves it yet.
    fn higher_downlink_waits(&self) -> bool {
        (self.lane + 1..=MAX_LANE).any(|l| {
            self.site.downlink_lease[usize::from(l)].borrow().is_none()
                && self
                    .hub
                    .downlinks
                    .opened(&lane::origin(&self.site.name, l))
                    .is_some_and(|d| d.queue.depth() > 0)
        })
    }

    /// The agent handed downlink messages up to `upto` to its broker: they leave the site's queue.
    async fn downlink_acked(&self, upto: u64) -> Result<(), crate::HubError> {
        let site = self.downlink_key.to_owned();
        let downlink = Arc::clone(&self.hub.downlinks.site(&site).await?);
        tokio::task::spawn_blocking(move || downlink.queue.ack_upto(upto))
            .await
            .map_err(crate::HubError::Join)?
            .map_err(|source| crate::HubError::DownlinkQueue {
                site,
                source: Box::new(source),
            })?;
        Ok(())
    }

    /// Sends what the machine lets out of the site's downlink queue: `Downlink` frames read straight from
    /// the queue (expired batches dropped first), each at most half a frame limit.
    async fn send_downlink(
        &self,
        link: &mut HubConn,
        send: &mut SendStream,
        out: &mut BytesMut,
    ) -> Result<(), DownlinkSendError> {
        while let Some(from) = link.next_downlink_send() {
            let site = self.downlink_key.to_owned();
            let downlink = self
                .hub
                .downlinks
                .site(&site)
                .await
                .map_err(DownlinkSendError::Queue)?;
            let max_bytes = self.hub.max_frame_size / 2;
            let read = tokio::task::spawn_blocking(move || {
                let expired = downlink.queue.expire(crate::downlink::now_ms())?;
                Ok::<_, shared::queue::QueueError>((
                    expired,
                    downlink.queue.read(from, DOWNLINK_BATCH, max_bytes)?,
                ))
            })
            .await
            .map_err(|e| DownlinkSendError::Queue(crate::HubError::Join(e)))?
            .map_err(|source| {
                DownlinkSendError::Queue(crate::HubError::DownlinkQueue {
                    site: site.clone(),
                    source: Box::new(source),
                })
            })?;
            let (expired, entries) = read;
            if expired > 0 {
                warn!(
                    expired,
                    "downlink messages waited longer than downlink.max_age; dropped"
                );
            }
            let Some(read_upto) = entries.last().map(|e| e.seq) else {
                // Nothing stored from `from` on (expired): nothing to send until it grows.
                link.downlink_written(from.saturating_sub(1));
                break;
            };
            let mut envelopes = Vec::with_capacity(entries.len());
            for entry in entries {
                match Envelope::decode_body(entry.seq, entry.body) {
                    Ok(env) => envelopes.push(env),
                    Err(error) => {
                        error!(seq = entry.seq, cause = %error, "unreadable downlink entry; skipped");
                    }
                }
            }
            let last = envelopes.last().map(|e| e.seq);
            if last.is_some() {
                out.clear();
                Frame::Downlink { entries: envelopes }
                    .encode(out)
                    .map_err(|e| DownlinkSendError::Write(SessionError::Encode(e)))?;
                send.write_all(out)
                    .await
                    .map_err(|e| DownlinkSendError::Write(SessionError::Write(e)))?;
                out.clear();
            }
            debug!(from, read_upto, "downlink batch sent");
            link.downlink_sent(now(), read_upto, last);
        }
        Ok(())
    }
}

/// Why downlink sending stopped.
enum DownlinkSendError {
    /// The stream failed.
    Write(SessionError),
    /// The site's queue failed.
    Queue(crate::HubError),
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
pub(crate) fn offer(table: &RouteTable, site: &str) -> Option<ConfigOffer> {
    if table.routes().is_empty() {
        return None;
    }
    EffectiveConfig::for_site(table, site).map(|c| {
        let push = c.to_push();
        ConfigOffer {
            version: push.version,
            body: push.toml,
        }
    })
}

/// Sleeps until `at`; only polled when `at` is `Some`.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The MQTT 5 properties of a cloud PUBLISH of an entry with `props`: its own, with `user` as the user
/// properties (the entry's, or what a route made of them), then the trace context as
/// `traceparent`/`tracestate` and `meshbridge-id = <id>`.
fn cloud_properties(
    props: &shared::envelope::Properties,
    mut user: Vec<(String, String)>,
    trace: Option<&shared::envelope::TraceContext>,
    id: String,
) -> PublishProperties {
    user.reserve(3);
    if let Some(trace) = trace {
        user.push(("traceparent".to_owned(), trace.traceparent.clone()));
        if let Some(state) = &trace.tracestate {
            user.push(("tracestate".to_owned(), state.clone()));
        }
    }
    user.push((MESHBRIDGE_ID.to_owned(), id));
    PublishProperties {
        payload_format_indicator: props.payload_format_utf8.then_some(1),
        message_expiry_interval: props.message_expiry,
        topic_alias: None,
        response_topic: props.response_topic.clone(),
        correlation_data: props.correlation_data.clone(),
        user_properties: user,
        subscription_identifiers: Vec::new(),
        content_type: props.content_type.clone(),
    }
}

/// The cloud PUBLISH for one entry of `site`, or `None` if it must be dropped (counted in `drops`).
///
/// The topic goes under the site's namespace whatever the entry's `origin` says; QoS, retain, payload and the
/// MQTT 5 properties are kept; the trace context becomes `traceparent`/`tracestate` user properties and
/// `meshbridge-id = <origin>/<seq>` is appended (`origin`: the site, or `<site>/<agent>` for a member of a
/// redundant pair).
fn to_message(
    env: Envelope,
    (site, origin): (&str, &str),
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
    let mut props = env.properties;
    if let Some(local) = props.response_topic.take() {
        match namespace.apply_response_topic(&local) {
            Ok(global) => props.response_topic = Some(global),
            Err(error) => {
                drops.refused.push(Refusal {
                    seq: env.seq,
                    reason_code: REASON_TOPIC_NAME_INVALID,
                    detail: format!("response topic {local:?}: {error}"),
                });
                return None;
            }
        }
    }
    let user = std::mem::take(&mut props.user);
    let id = format!("{origin}/{}", env.seq);
    let properties = cloud_properties(&props, user, env.trace.as_ref(), id);
    Some(OutMessage {
        topic,
        qos: mqtt_qos(env.qos),
        retain: env.retain,
        payload: env.payload,
        properties,
        seq: env.seq,
    })
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
    fn a_named_member_of_a_site_has_its_own_origin() {
        assert_eq!(origin("line1", "line1").as_deref(), Some("line1"));
        assert_eq!(origin("line1", "a").as_deref(), Some("line1/a"));
        assert_eq!(
            origin("line1", "pair.b-2_x").as_deref(),
            Some("line1/pair.b-2_x")
        );
        for bad in [
            "",
            "a/b",
            "a b",
            "line2/#",
            &"x".repeat(MAX_SITE_NAME_LEN + 1),
        ] {
            assert_eq!(origin("line1", bad), None, "{bad:?}");
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
            let got = to_message(entry, ("line1", "line1"), &ns, 8, &mut drops);
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
        let m = to_message(entry, ("s", "s"), &ns, 1024, &mut Drops::default()).expect("published");
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
        assert_eq!(
            p.response_topic,
            Some(format!("{}/rt", ns.as_str())),
            "mapped into the namespace like the topic"
        );
        assert_eq!(p.correlation_data.as_deref(), Some(&b"cd"[..]));
        assert_eq!(p.message_expiry_interval, Some(60));
        assert_eq!(p.payload_format_indicator, Some(1));
        assert_eq!(p.topic_alias, None);
        assert_eq!(&m.payload[..], b"p");
    }
}
