//! The MQTT-aware front on the client port: a byte relay to the embedded broker that makes a
//! publisher's PUBACK/PUBREC mean "committed to disk".
//!
//! rumqttd acknowledges a QoS 1/2 PUBLISH as soon as it holds it in memory, with no hook. If the agent
//! died between that ack and our queue commit, an acknowledged message would be lost. So clients
//! connect here instead, and per connection the front:
//!
//! 1. reads the CONNECT and opens a connection to the broker's entrance for the client's protocol
//!    (3.1.1 or 5.0; an in-process pipe, see [`Upstreams`]); MQTT 3.1 and unknown levels are refused
//!    with CONNACK code 1, because rumqttd does not speak them. A keep-alive of 0 (allowed by MQTT,
//!    rejected by rumqttd) is rewritten to 65,535 s, the longest MQTT can express;
//! 2. relays client→broker bytes at once (the broker gets no extra latency), splitting them into
//!    packets on the way. Every PUBLISH whose (alias-resolved) topic the `select` predicate accepts is
//!    captured; the captures of one read form ONE [`CommitRequest`] (natural batching: a busy client
//!    gets big batches, an idle one gets low latency). QoS 0 captures are committed too, but there is
//!    no ack to hold;
//! 3. relays broker→client bytes, but holds the broker's PUBACK (QoS 1) / PUBREC (QoS 2) for a captured
//!    packet id until its commit finished. Then it releases the ack (success), or on a rejected commit
//!    sends a v5 client a PUBACK/PUBREC with reason 0x97 (quota exceeded) instead and closes a 3.1.1
//!    connection (3.1.1 has no negative ack: the client retransmits after reconnecting).
//!
//! Ordering: only acks are held; other broker→client packets (deliveries to the client as a
//! subscriber, SUBACK, PINGRESP) pass at once. Acks leave in the order the broker sent them: once one
//! is held, every later PUBACK/PUBREC queues behind it, even one that needed no commit, because MQTT
//! requires QoS 1 acks in PUBLISH order (3.1.1 §4.6, 5.0 §4.6). Commits of one connection are
//! awaited in that order as well.
//!
//! Ack matching is race-free without locks: both directions of a connection run in one task, and the
//! client→broker side registers the packet ids of a batch before it writes the batch's bytes to the
//! broker, so a broker ack can never be read before its registration is visible.
//!
//! Limits of the path (issue 7, "acknowledged, then dropped"): with [`FrontOptions::limits`] set, a
//! selected PUBLISH the path to the hub cannot carry (payload over the maximum message size, or topic too
//! long once the hub prefixes the site's namespace; see `shared::limits`) is refused at PUBLISH time: it
//! is neither committed nor forwarded to the broker, and the front answers the client itself. MQTT 5:
//! PUBACK/PUBREC with reason 0x83 (Implementation specific error; not 0x95, which MQTT 5 does not allow
//! in PUBACK/PUBREC: see `shared::limits`) or 0x90 (Topic Name invalid). MQTT 3.1.1 has no
//! negative ack; the front does what Mosquitto does with `message_size_limit`: it logs and discards the
//! message and still acknowledges it (PUBACK, or PUBREC then PUBCOMP for the client's PUBREL), so the
//! client's later messages keep flowing. Closing the connection instead would make the client resend the
//! same message after every reconnect and wedge it. QoS 0: logged and discarded. Every refusal is
//! counted ([`SharedLimits::refused`]). The front's own answers are queued behind acks it already
//! holds, but may overtake a broker ack of an earlier PUBLISH that the broker has not sent yet. A refused
//! v5 PUBLISH that defined a topic alias leaves the broker without it, so the next forwarded PUBLISH
//! naming only that alias is re-encoded with its topic (defining the alias for the broker).
//!
//! Retained messages ([`FrontOptions::capture_retained`]): every retained PUBLISH is captured as well,
//! selected or not, and its ack held the same way, so the pipeline can keep it on disk first.
//!
//! Protocol violations rumqttd lets through are closed here, before anything of the offending read
//! reaches the broker: a second CONNECT on a connection, a 3.1.1 PUBLISH with an empty topic name
//! (which rumqttd would acknowledge and route nowhere), and a SUBSCRIBE/UNSUBSCRIBE with a malformed
//! topic filter such as `a/#/b` (which rumqttd would grant). A v5 empty topic without a topic alias is a
//! topic alias error ([`FrontError::TopicAlias`]).
//!
//! Last wills (issue 7, hole 5): rumqttd publishes a client's will to local subscribers only, so the
//! front commits it for the uplink too, like any selected PUBLISH, when the client's connection ends without
//! a DISCONNECT (or with MQTT 5 reason 0x04, "disconnect with will message"): a crash, a dropped network,
//! a keep-alive timeout, or a protocol violation the front closed. An MQTT 5 Will Delay Interval is
//! honoured: the will waits, and is dropped if the same client id connects again meanwhile. A will is
//! not committed when the agent itself shuts down. Wills over the path's limits are logged and dropped.
//!
//! Unsubscribed topics ([`FrontOptions::answer_unsubscribed`], the edge agent's set-up): a QoS 0 or 1
//! PUBLISH that is not retained and that no subscription held in rumqttd could match is not handed to
//! rumqttd at all. The front answers it itself: the PUBACK of a captured message waits for its commit
//! like a broker's ack would, and one nobody captured is answered at once. At a factory line most
//! topics go to the hub and no local client reads them; the hand-off cost a socket round trip and a
//! wake-up of rumqttd's router per message. Which filters rumqttd holds is known here because every
//! subscription reaches it through the front (the agent's own internal connections only publish), and
//! a persistent session's are served by the front, not rumqttd; a filter is counted before its
//! SUBSCRIBE is forwarded and dropped at UNSUBSCRIBE or when its connection ends
//! (`shared::topic::SubscribedFilters`). Acks stay in PUBLISH order: a PUBLISH is answered by the front
//! only while every PUBLISH the connection forwarded earlier has its broker ack back
//! (`ForwardedAcks`), so no front-made PUBACK can overtake a broker's. Since rumqttd may then see no
//! packet of a busy publisher for a long time, the front enforces the client's keep-alive itself (1.5 ×
//! the interval, MQTT 3.1.1 §3.1.2.10, 5.0 §3.1.2.11) and gives rumqttd the longest one.
//!
//! Closing: either side closing closes the other; a gone commit pipeline (agent shutting down) or the
//! `shutdown` token closes every connection. Held acks are then dropped unsent, so clients retransmit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use meshbridge_metrics::timer::Deadline;
use shared::limits::{Refusal, SharedLimits};
use shared::mqtt::{
    self, Ack, AckKind, AliasError, Connect, DecodeError, FixedHeader, PacketType, ProtocolVersion,
    Publish, QoS, TopicAliases, Will, CONNACK_UNACCEPTABLE_PROTOCOL, REASON_QUOTA_EXCEEDED,
};
use shared::topic::SubscribedFilters;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use crate::sessions::{self, Attachment, ClientAck, LinkId, Sessions};

/// Read buffers grow in steps of this size; one read can then carry many small packets (a batch).
const READ_CHUNK: usize = 16 * 1024;
/// After the client closed, how long the broker side may take to finish (flush its last packets).
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long the front waits for a last will's commit before giving up on it (logged).
const WILL_COMMIT_WAIT: Duration = Duration::from_secs(10);
/// How often offline persistent sessions are checked for expiry.
const SESSION_EXPIRY_CHECK: Duration = Duration::from_secs(1);
/// Front-made packets (SUBACK, deliveries) queued for the client before the outbox waits.
const FRONT_OUT: usize = 64;
/// CONNACK code "server unavailable" (3.1.1 §3.2.2.3) / reason "server unavailable" (5.0 §3.2.2.2).
const CONNACK_V3_SERVER_UNAVAILABLE: u8 = 3;
const CONNACK_V5_SERVER_UNAVAILABLE: u8 = 0x88;
/// Keep-alive written instead of 0, which rumqttd rejects.
const KEEP_ALIVE_INSTEAD_OF_ZERO: u16 = u16::MAX;

/// The embedded broker's entrances, one per protocol version (rumqttd picks the protocol per listener, not
/// per connection), and the login they require.
///
/// The front reaches rumqttd inside the process: each client connection becomes an in-memory pipe that
/// rumqttd serves exactly like an accepted socket of its internal listener, with the same settings and
/// the same login check (`Server::in_process`, a patch of the vendored rumqttd: `vendor/rumqttd/PATCHED.md`).
/// Over loopback TCP, as before issue 10, every packet between the front and rumqttd was a `write`, a
/// readiness event and a `read`, and the readiness often woke the other runtime worker from `epoll_wait`,
/// which on this project's machine costs more CPU than the relaying itself (`README.md`, Performance).
/// Through the pipe, the front's write wakes rumqttd's connection task on the same worker, with no system
/// call. The loopback listeners stay for the program's own MQTT clients.
#[derive(Debug, Clone)]
pub struct Upstreams {
    /// The MQTT 3.1.1 listener's entrance.
    pub v4: rumqttd::InProcessAcceptor,
    /// The MQTT 5.0 listener's entrance.
    pub v5: rumqttd::InProcessAcceptor,
    /// Written into every CONNECT the front forwards, in place of the client's own login, which the
    /// front has checked itself (see `broker/src/embedded.rs`).
    pub login: Arc<crate::embedded::InternalLogin>,
}

/// Bytes the pipe to rumqttd holds in each direction before a writer waits: a large batch of small
/// packets in one write, as a loopback socket's buffer would take it.
const UPSTREAM_PIPE: usize = 256 * 1024;

/// Opens the connection to the embedded broker for a client of `version` (3.1.1 or 5.0).
fn connect_upstream(
    upstreams: &Upstreams,
    version: ProtocolVersion,
) -> (ReadHalf<DuplexStream>, WriteHalf<DuplexStream>) {
    let entrance = if version == ProtocolVersion::V5 {
        &upstreams.v5
    } else {
        &upstreams.v4
    };
    let (ours, theirs) = tokio::io::duplex(UPSTREAM_PIPE);
    entrance.accept(theirs);
    tokio::io::split(ours)
}

/// Limits of the front.
#[derive(Debug, Clone)]
pub struct FrontOptions {
    /// Largest packet accepted in either direction; a larger one closes the connection. Should not
    /// exceed the broker's own limit, so the front rejects first and says why.
    pub max_packet_size: usize,
    /// How long a new connection may take to send its CONNECT (idle sockets must not pile up).
    pub connect_timeout: Duration,
    /// Username and password every client must present in CONNECT; `None` lets anyone in. A client
    /// without them, or with others, is refused with CONNACK "not authorized" (3.1.1 code 5) / "bad user
    /// name or password" (5.0 reason 0x86) before anything reaches the broker. rumqttd's own static
    /// logins are not used because the front must answer before it has picked a broker listener.
    pub credentials: Option<(String, String)>,
    /// The limits a selected PUBLISH must meet to reach the hub; one that does not is refused at
    /// PUBLISH time (see the module docs). `None`: no check (the hub's own front, which selects nothing
    /// for a further hop).
    pub limits: Option<Arc<SharedLimits>>,
    /// Capture every retained PUBLISH too, whatever `select` says, so the commit pipeline keeps it on disk
    /// before its ack is released (rumqttd keeps retained messages in memory only). The pipeline tells the
    /// two kinds apart itself: a retained message `select` does not accept is stored, not queued.
    pub capture_retained: bool,
    /// Serve persistent sessions here, on disk, instead of in rumqttd's memory (see
    /// `broker/src/sessions.rs`); `None` leaves every session to the broker.
    pub sessions: Option<Arc<Sessions>>,
    /// Client ids that belong to the program's own connections to the broker (which use the internal
    /// listeners, not this port): a client presenting one of them, or an id starting with one, is refused
    /// with CONNACK "identifier rejected" (3.1.1 code 2, 5.0 reason 0x85). Otherwise it would take the id
    /// over, and the broker would disconnect the program's own publisher or subscriber (issue 11).
    pub reserved_client_ids: Vec<String>,
    /// Password file, anonymous access and topic ACL (see `crate::auth`); when set it decides who is let
    /// in, and `credentials` is not used. A PUBLISH the ACL denies is not forwarded (MQTT 5: PUBACK/PUBREC
    /// reason 0x87; 3.1.1: acknowledged and dropped, as Mosquitto does); a denied SUBSCRIBE filter is not
    /// subscribed and gets 0x87 (5.0) / 0x80 (3.1.1) in the SUBACK; a will whose topic the ACL denies
    /// refuses the CONNECT.
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// Answer QoS 0/1 PUBLISHes that no subscription in rumqttd could match in the front, without
    /// handing them to rumqttd (module docs, "Unsubscribed topics"). Only with `sessions` set, which makes
    /// every subscription rumqttd holds one that ends with its connection; ignored without. Not for a
    /// broker with other subscribers on its internal listeners (the hub's downlink subscriber).
    pub answer_unsubscribed: bool,
}

impl Default for FrontOptions {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            connect_timeout: Duration::from_secs(10),
            credentials: None,
            limits: None,
            capture_retained: false,
            sessions: None,
            reserved_client_ids: Vec::new(),
            auth: None,
            answer_unsubscribed: false,
        }
    }
}

/// One PUBLISH the uplink routes selected, as the front saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    /// The message: topic alias-resolved (the `topic_alias` property cleared), payload zero-copy,
    /// QoS, retain and v5 properties as sent by the client.
    pub publish: Publish,
    /// The client id of the connection it came on (with the packet id, what recognises a resend); empty
    /// for a 3.1.1 clean session, which never sees a resend.
    pub client: Arc<str>,
}

/// Why the commit pipeline refused a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommitRejected {
    /// The durable queue is full and its overflow policy is `block`.
    #[error("the outbound queue is full")]
    QueueFull,
    /// The disk is full.
    #[error("the storage is full")]
    StorageFull,
    /// The storage failed otherwise (the pipeline logged the cause).
    #[error("the storage failed")]
    StorageFailed,
}

/// A batch of captured messages to commit durably; the front holds the batch's acks until `done`
/// is answered. Dropping `done` unanswered means the pipeline is gone: the connection is closed.
#[derive(Debug)]
pub struct CommitRequest {
    /// The captured messages, in the order the client sent them.
    pub messages: Vec<Captured>,
    /// Answer once the messages are on disk (`Ok`) or will not be (`Err`).
    pub done: oneshot::Sender<Result<(), CommitRejected>>,
}

/// Why the front, or one of its connections, ended. Connection errors are logged by the connection
/// task; only [`FrontError::Accept`] is returned by [`serve`].
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// Accepting connections kept failing through the whole back-off (about two minutes).
    #[error("accepting client connections failed")]
    Accept {
        /// The last accept error.
        #[source]
        source: io::Error,
    },
    /// Reading from or writing to the client failed.
    #[error("client connection failed")]
    ClientIo {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The client sent nothing for 1.5 times its keep-alive (enforced by the front when it answers
    /// unsubscribed topics itself, see [`FrontOptions::answer_unsubscribed`]).
    #[error("the client sent nothing for {after:?} (1.5 × its keep-alive)")]
    KeepAliveExpired {
        /// How long the client was silent.
        after: Duration,
    },
    /// Reading from or writing to the broker failed.
    #[error("broker connection failed")]
    UpstreamIo {
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The client sent no complete CONNECT within [`FrontOptions::connect_timeout`].
    #[error("no CONNECT within {after:?}")]
    ConnectTimeout {
        /// The timeout that elapsed.
        after: Duration,
    },
    /// The client closed before sending a complete CONNECT.
    #[error("client closed before CONNECT")]
    ClosedBeforeConnect,
    /// The first packet was not a CONNECT.
    #[error("first packet was {found:?}, not CONNECT")]
    NotConnect {
        /// The packet type received.
        found: PacketType,
    },
    /// The client asked for a protocol level the broker does not speak (MQTT 3.1 or unknown); it was
    /// refused with CONNACK code 1.
    #[error("unsupported MQTT protocol level {level}")]
    UnsupportedProtocol {
        /// The CONNECT protocol level.
        level: u8,
    },
    /// The client's CONNECT did not carry the configured username and password; it was refused.
    #[error("client refused: wrong or missing username/password")]
    NotAuthorized,
    /// The TLS handshake failed (no or an untrusted client certificate, no common protocol, ...).
    #[error("TLS handshake failed")]
    Tls {
        /// The handshake's error.
        #[source]
        source: std::io::Error,
    },
    /// The client certificate does not name one identity.
    #[error("client certificate refused")]
    ClientIdentity {
        /// Why.
        #[source]
        source: meshbridge_tls::server::IdentityError,
    },
    /// The client's will names a topic the ACL does not let it publish to; it was refused.
    #[error("client refused: its will's topic {topic:?} is denied by the ACL")]
    WillDenied {
        /// The will's topic.
        topic: String,
    },
    /// The client asked for a client id of the program's own connections; it was refused.
    #[error("client refused: client ids starting with {reserved:?} are the program's own")]
    ReservedClientId {
        /// The reserved id (prefix).
        reserved: String,
    },
    /// The client sent bytes that are not valid MQTT.
    #[error("malformed packet from the client")]
    ClientDecode {
        /// What was wrong.
        #[source]
        source: DecodeError,
    },
    /// The broker sent bytes that are not valid MQTT.
    #[error("malformed packet from the broker")]
    UpstreamDecode {
        /// What was wrong.
        #[source]
        source: DecodeError,
    },
    /// The client misused a v5 topic alias (a protocol error).
    #[error("topic alias protocol error")]
    TopicAlias {
        /// What was wrong.
        #[source]
        source: AliasError,
    },
    /// The client's CONNECT could not be re-encoded with the internal login (it decoded, so this means
    /// a field the front does not parse was cut short).
    #[error("cannot forward the CONNECT")]
    ConnectRewrite {
        /// Why.
        #[source]
        source: mqtt::EncodeError,
    },
    /// The client sent a second CONNECT on its connection, a protocol violation (MQTT 3.1.1 §3.1,
    /// 5.0 §3.1): the connection is closed without forwarding it.
    #[error("second CONNECT on one connection")]
    SecondConnect,
    /// An MQTT 3.1.1 client sent a PUBLISH with an empty topic name, a protocol violation (3.1.1
    /// §4.7.3: topic names are at least one character); the connection is closed without forwarding it.
    /// (MQTT 5 allows an empty topic only with a topic alias; see [`FrontError::TopicAlias`].)
    #[error("PUBLISH with an empty topic name")]
    EmptyTopic,
    /// A SUBSCRIBE or UNSUBSCRIBE carries a malformed topic filter (e.g. `a/#/b`; MQTT 3.1.1 §4.7.1,
    /// 5.0 §4.7.1), which rumqttd would grant; the connection is closed without forwarding it.
    #[error("malformed topic filter {filter:?}")]
    InvalidTopicFilter {
        /// The filter as sent.
        filter: String,
        /// What is wrong with it.
        #[source]
        source: shared::topic::TopicError,
    },
    /// A client PUBLISH could not be re-encoded with its topic (after a refused PUBLISH had defined its
    /// topic alias). It was decoded from the wire, so this means a codec bug.
    #[error("cannot re-encode a PUBLISH")]
    Reencode {
        /// What the encoder refused.
        #[source]
        source: mqtt::EncodeError,
    },
    /// The persistent-session store failed at CONNECT; the client was refused with "server unavailable".
    #[error("the persistent session store failed")]
    SessionStore,
    /// The commit pipeline is gone (agent shutting down) or dropped a request unanswered.
    #[error("the commit pipeline is closed")]
    CommitPipelineClosed,
    /// A 3.1.1 client's message could not be committed; 3.1.1 has no negative ack, so the connection is
    /// closed and the client retransmits after reconnecting.
    #[error("commit of packet {packet_id} rejected; closing the 3.1.1 connection")]
    CommitRejected {
        /// The packet id whose ack was withheld.
        packet_id: u16,
        /// Why the commit was refused.
        #[source]
        source: CommitRejected,
    },
}

/// The topic predicate of the uplink routes: `true` captures the PUBLISH.
pub type Select = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What every connection task shares.
struct Shared {
    upstreams: Upstreams,
    select: Select,
    commits: mpsc::Sender<CommitRequest>,
    options: FrontOptions,
    /// Wills waiting out their delay, by client id (with a number telling waits apart); a new connection
    /// of that client cancels its will.
    pending_wills: std::sync::Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// Numbers the waits in `pending_wills`.
    will_waits: AtomicU64,
    /// The filters rumqttd's subscribers hold, when the front answers unsubscribed topics itself
    /// ([`FrontOptions::answer_unsubscribed`] with sessions); `None` hands every PUBLISH to rumqttd.
    subscribed: Option<std::sync::Mutex<SubscribedFilters>>,
}

impl Shared {
    /// Whether a subscription rumqttd holds could match `topic` (always when the front does not keep
    /// count).
    fn subscribed(&self, topic: &str) -> bool {
        self.subscribed.as_ref().is_none_or(|set| {
            set.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .matches(topic)
        })
    }
}

/// Accepts MQTT clients on `listener` and relays each to the broker listener of its protocol, capturing
/// the PUBLISH packets `select` accepts into [`CommitRequest`]s on `commits` (see the module docs).
///
/// Runs until `shutdown` is cancelled, then closes every connection and returns once their tasks ended.
///
/// # Errors
/// [`FrontError::Accept`] if accepting keeps failing through an exponential back-off (1 s to 64 s, as
/// mini-redis does); transient errors such as a full file table are retried.
pub async fn serve(
    listener: TcpListener,
    upstreams: Upstreams,
    select: Select,
    commits: mpsc::Sender<CommitRequest>,
    options: FrontOptions,
    shutdown: CancellationToken,
) -> Result<(), FrontError> {
    let listener = Listener {
        tcp: listener,
        tls: None,
        auth: options.auth.clone(),
    };
    serve_listeners(
        vec![listener],
        upstreams,
        select,
        commits,
        options,
        shutdown,
    )
    .await
}

/// One client port of the front.
pub struct Listener {
    /// The bound socket.
    pub tcp: TcpListener,
    /// TLS on this port (a handshake first, bounded by `connect_timeout`); `None`: plain MQTT.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Who is let in here and what they may do (the broker's files, this port's anonymous rule);
    /// `None`: everyone, or `FrontOptions::credentials`.
    pub auth: Option<Arc<crate::auth::Auth>>,
}

/// [`serve`] on several ports at once (Mosquitto's `listener` blocks: say, plain MQTT on loopback for
/// local tools and TLS on the plant network), sharing one broker, one commit pipeline and the sessions.
/// An accept loop that fails for good stops them all.
///
/// # Errors
/// As [`serve`].
pub async fn serve_listeners(
    listeners: Vec<Listener>,
    upstreams: Upstreams,
    select: Select,
    commits: mpsc::Sender<CommitRequest>,
    options: FrontOptions,
    shutdown: CancellationToken,
) -> Result<(), FrontError> {
    let shared = Arc::new(Shared {
        upstreams,
        select,
        commits,
        pending_wills: std::sync::Mutex::new(HashMap::new()),
        will_waits: AtomicU64::new(0),
        subscribed: (options.answer_unsubscribed && options.sessions.is_some())
            .then(|| std::sync::Mutex::new(SubscribedFilters::new())),
        options,
    });
    let connections = shutdown.child_token();
    let tracker = TaskTracker::new();
    if let Some(sessions) = shared.options.sessions.clone() {
        let stop = connections.clone();
        tracker.spawn(async move {
            let mut tick = tokio::time::interval(SESSION_EXPIRY_CHECK);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let sessions = Arc::clone(&sessions);
                let _ = tokio::task::spawn_blocking(move || sessions.expire()).await;
            }
        });
    }
    let mut loops = tokio::task::JoinSet::new();
    for listener in listeners {
        loops.spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            connections.clone(),
            tracker.clone(),
        ));
    }
    let mut result = Ok(());
    while let Some(ended) = loops.join_next().await {
        if let Ok(Err(error)) = ended {
            connections.cancel();
            result = Err(error);
        }
    }
    connections.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

async fn accept_loop(
    listener: Listener,
    shared: Arc<Shared>,
    connections: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), FrontError> {
    let mut backoff = Duration::from_secs(1);
    let auth = listener.auth;
    loop {
        let accepted = tokio::select! {
            () = connections.cancelled() => return Ok(()),
            accepted = listener.tcp.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_secs(1);
                let span = tracing::info_span!("front", %peer, client_id = tracing::field::Empty);
                let shared = Arc::clone(&shared);
                let token = connections.child_token();
                let auth = auth.clone();
                let tls = listener.tls.clone();
                tracker.spawn(
                    async move {
                        let ended = match tls {
                            None => {
                                connection(stream, &shared, auth.as_deref(), None, &token).await
                            }
                            Some(tls) => match handshake(&tls, stream, &shared).await {
                                Ok((stream, user)) => {
                                    connection(
                                        stream,
                                        &shared,
                                        auth.as_deref(),
                                        user.as_deref(),
                                        &token,
                                    )
                                    .await
                                }
                                Err(error) => Err(error),
                            },
                        };
                        match ended {
                            Ok(()) => debug!("connection closed"),
                            Err(error) => log_connection_end(&error),
                        }
                    }
                    .instrument(span),
                );
            }
            Err(source) => {
                if backoff > Duration::from_secs(64) {
                    return Err(FrontError::Accept { source });
                }
                warn!(cause = %source, retry_in = ?backoff, "accepting a client failed");
                tokio::select! {
                    () = connections.cancelled() => return Ok(()),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff *= 2;
            }
        }
    }
}

/// Logs why a connection ended, once, at a level that says whether an operator must act.
fn log_connection_end(error: &FrontError) {
    match error {
        FrontError::CommitRejected { .. } => warn!(cause = %error, "closing connection"),
        FrontError::ClientDecode { source } => {
            warn!(cause = %source, "closing connection: malformed packet from client");
        }
        FrontError::TopicAlias { source } => {
            warn!(cause = %source, "closing connection: topic alias misuse");
        }
        FrontError::ConnectRewrite { source } => {
            warn!(cause = %source, "closing connection: malformed CONNECT from client");
        }
        FrontError::ReservedClientId { .. } | FrontError::WillDenied { .. } => {
            warn!(cause = %error, "connection refused");
        }
        FrontError::KeepAliveExpired { .. } => info!(cause = %error, "closing connection"),
        FrontError::SecondConnect
        | FrontError::EmptyTopic
        | FrontError::InvalidTopicFilter { .. } => {
            warn!(cause = %error, "closing connection: protocol violation by the client");
        }
        FrontError::UpstreamDecode { .. } | FrontError::Reencode { .. } => {
            tracing::error!(cause = %error, "closing connection: broker side failed");
        }
        FrontError::CommitPipelineClosed => info!("closing connection: commit pipeline closed"),
        _ => info!(cause = %error, "connection ended"),
    }
}

/// The TLS handshake of a client on a TLS port, bounded by `connect_timeout`; with client certificates
/// required, the certificate's Common Name (the client's user name).
async fn handshake(
    tls: &tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    shared: &Shared,
) -> Result<(tokio_rustls::server::TlsStream<TcpStream>, Option<String>), FrontError> {
    let after = shared.options.connect_timeout;
    let stream = tokio::time::timeout(after, tls.accept(stream))
        .await
        .map_err(|_| FrontError::ConnectTimeout { after })?
        .map_err(|source| FrontError::Tls { source })?;
    let user = match stream.get_ref().1.peer_certificates() {
        Some(chain) => Some(
            meshbridge_tls::server::leaf_common_name(chain)
                .map_err(|source| FrontError::ClientIdentity { source })?,
        ),
        None => None,
    };
    Ok((stream, user))
}

/// A client connection the front can serve: plain TCP, or TLS over it.
trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    /// Its two directions, for the two halves of the relay.
    fn into_halves(self) -> (Self::Read, Self::Write);
    /// Turns Nagle off (MQTT packets are small and latency matters more than segment count).
    fn no_delay(&self);
}

impl ClientStream for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
    fn no_delay(&self) {
        // Best effort.
        let _ = self.set_nodelay(true);
    }
}

impl ClientStream for tokio_rustls::server::TlsStream<TcpStream> {
    type Read = tokio::io::ReadHalf<Self>;
    type Write = tokio::io::WriteHalf<Self>;
    fn into_halves(self) -> (Self::Read, Self::Write) {
        tokio::io::split(self)
    }
    fn no_delay(&self) {
        // Best effort.
        let _ = self.get_ref().0.set_nodelay(true);
    }
}

async fn connection<S: ClientStream>(
    mut client: S,
    shared: &Shared,
    auth: Option<&crate::auth::Auth>,
    cert_user: Option<&str>,
    shutdown: &CancellationToken,
) -> Result<(), FrontError> {
    let max = shared.options.max_packet_size;
    let mut from_client = BytesMut::with_capacity(READ_CHUNK);
    let connect_len = tokio::select! {
        () = shutdown.cancelled() => return Ok(()),
        read = tokio::time::timeout(
            shared.options.connect_timeout,
            read_frame(&mut client, &mut from_client, max),
        ) => read.map_err(|_| FrontError::ConnectTimeout { after: shared.options.connect_timeout })??,
    };
    let header = FixedHeader::parse(&from_client, max)
        .map_err(|source| FrontError::ClientDecode { source })?;
    if header.packet_type != PacketType::Connect {
        return Err(FrontError::NotConnect {
            found: header.packet_type,
        });
    }
    let mut connect = Connect::decode(&from_client[..connect_len])
        .map_err(|source| FrontError::ClientDecode { source })?;
    tracing::Span::current().record("client_id", connect.client_id.as_str());
    if let Some((_, pending)) = shared
        .pending_wills
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&connect.client_id)
    {
        // MQTT 5 §3.1.3.2.2: a reconnect within the Will Delay Interval means no will.
        pending.cancel();
    }
    let will = connect.will.take();
    let will_up = will.as_ref().is_some_and(|w| {
        connect
            .version()
            .is_some_and(|version| will_is_forwarded(shared, w, version))
    });
    let version = match connect.version() {
        Some(v @ (ProtocolVersion::V3_1_1 | ProtocolVersion::V5)) => v,
        Some(ProtocolVersion::V3_1) | None => {
            let mut refusal = BytesMut::with_capacity(4);
            mqtt::encode_connack_refusal(
                ProtocolVersion::V3_1,
                CONNACK_UNACCEPTABLE_PROTOCOL,
                &mut refusal,
            );
            client
                .write_all(&refusal)
                .await
                .map_err(|source| FrontError::ClientIo { source })?;
            // Best effort: the connection is being refused anyway.
            let _ = client.shutdown().await;
            return Err(FrontError::UnsupportedProtocol {
                level: connect.protocol_level,
            });
        }
    };
    let mut user: Option<Arc<str>> = None;
    if let Some(auth) = auth {
        let (username, password) =
            connect_credentials(&from_client[..connect_len]).unwrap_or((None, None));
        match auth.login(cert_user, username, password).await {
            crate::auth::Login::Admitted(name) => user = name.map(Arc::from),
            crate::auth::Login::Refused => {
                let codes = (CONNACK_V3_NOT_AUTHORIZED, CONNACK_V5_BAD_CREDENTIALS);
                refuse_connect(&mut client, version, codes).await?;
                return Err(FrontError::NotAuthorized);
            }
        }
        if let Some(w) = &will {
            let who = shared::auth::acl::Client {
                user: user.as_deref(),
                client_id: &connect.client_id,
            };
            if !auth.can_publish(who, &w.publish.topic) {
                let codes = (CONNACK_V3_NOT_AUTHORIZED, REASON_NOT_AUTHORIZED);
                refuse_connect(&mut client, version, codes).await?;
                return Err(FrontError::WillDenied {
                    topic: w.publish.topic.clone(),
                });
            }
        }
    } else if let Some((username, password)) = &shared.options.credentials {
        let presented = connect_credentials(&from_client[..connect_len]);
        let ok = presented
            .is_some_and(|(u, p)| u == Some(username.as_bytes()) && p == Some(password.as_bytes()));
        if !ok {
            let codes = (CONNACK_V3_NOT_AUTHORIZED, CONNACK_V5_BAD_CREDENTIALS);
            refuse_connect(&mut client, version, codes).await?;
            return Err(FrontError::NotAuthorized);
        }
    }
    if let Some(reserved) = shared
        .options
        .reserved_client_ids
        .iter()
        .find(|r| connect.client_id.starts_with(r.as_str()))
    {
        let codes = (
            CONNACK_V3_IDENTIFIER_REJECTED,
            CONNACK_V5_CLIENT_ID_NOT_VALID,
        );
        refuse_connect(&mut client, version, codes).await?;
        return Err(FrontError::ReservedClientId {
            reserved: reserved.clone(),
        });
    }
    // When the front answers PUBLISHes itself rumqttd may not hear from a busy client for long, so the
    // front watches the keep-alive and rumqttd gets the longest one.
    let watch_keep_alive = shared.subscribed.is_some();
    if connect.keep_alive == 0 || watch_keep_alive {
        // Fixed header, protocol name (2-byte length + name), level, flags, then the keep-alive.
        let at = header.header_len + 2 + connect.protocol_name.len() + 2;
        from_client[at..at + 2].copy_from_slice(&KEEP_ALIVE_INSTEAD_OF_ZERO.to_be_bytes());
    }
    let keep_alive = (watch_keep_alive && connect.keep_alive > 0)
        .then(|| Duration::from_secs(u64::from(connect.keep_alive)).mul_f32(1.5));
    // The broker's listeners take only the internal login; the client's own was checked above.
    let login = &shared.upstreams.login;
    let rest = from_client.split_off(connect_len);
    from_client = mqtt::replace_connect_login(
        &from_client,
        login.user().as_bytes(),
        login.secret().as_bytes(),
    )
    .map_err(|source| FrontError::ConnectRewrite { source })?;
    from_client.unsplit(rest);
    let attachment = match &shared.options.sessions {
        Some(sessions) => {
            let (sessions, id) = (Arc::clone(sessions), connect.client_id.clone());
            let (clean, expiry) = (connect.clean_start, connect.session_expiry);
            let attached =
                tokio::task::spawn_blocking(move || sessions.attach(&id, version, clean, expiry))
                    .await;
            match attached {
                Ok(Ok(attachment)) => Some(attachment),
                Ok(Err(cause)) => {
                    tracing::error!(%cause, "persistent session store failed; refusing the client");
                    let codes = (CONNACK_V3_SERVER_UNAVAILABLE, CONNACK_V5_SERVER_UNAVAILABLE);
                    // Best effort: the store's failure is what the caller hears about.
                    let _ = refuse_connect(&mut client, version, codes).await;
                    return Err(FrontError::SessionStore);
                }
                Err(_) => return Err(FrontError::SessionStore),
            }
        }
        None => None,
    };
    let (upstream_rd, upstream_wr) = connect_upstream(&shared.upstreams, version);
    debug!(?version, "relaying");
    // Best effort: MQTT packets are small and latency matters more than segment count.
    client.no_delay();

    let (client_rd, client_wr) = client.into_halves();
    let (registrations_tx, registrations_rx) = mpsc::unbounded_channel();
    let disconnected = AtomicBool::new(false);
    let forwarded = Arc::new(ForwardedAcks::default());
    // A session rumqttd keeps after the connection (only an MQTT 5 client without a client id and with a
    // session expiry: the front's store cannot name it) keeps its filters counted for good.
    let session_outlives = connect.client_id.is_empty()
        && version == ProtocolVersion::V5
        && connect.session_expiry > 0;
    // A persistent connection: the front serves its session (see `sessions.rs`).
    let mut persistent = None;
    let mut outbox = None;
    let mut front_out_rx = None;
    let mut session_present = None;
    if let (
        Some(sessions),
        Some(Attachment {
            session_present: present,
            link: Some(link),
        }),
    ) = (&shared.options.sessions, attachment)
    {
        let (out_tx, out_rx) = mpsc::channel(FRONT_OUT);
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        persistent = Some(Persistent {
            sessions: Arc::clone(sessions),
            id: link.id.clone(),
            acks: acks_tx,
            out: out_tx.clone(),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(sessions::run_outbox(
            Arc::clone(sessions),
            link,
            acks_rx,
            out_tx,
            stop.clone(),
        ));
        outbox = Some((stop, AbortOnDrop(task)));
        front_out_rx = Some(out_rx);
        session_present = Some(present);
    }
    let up = ClientToBroker {
        // Only a session that outlives the connection can see a resend (3.1.1 §4.4, 5.0 §4.4): a 3.1.1
        // clean session discards its in-flight messages, so it gets no resend marks (an empty client id
        // means none; marks cost a B-tree insert per message). MQTT 5 may keep a clean-start session by
        // its expiry interval, so every MQTT 5 client is marked.
        client_id: if connect.clean_start && version != ProtocolVersion::V5 {
            Arc::from("")
        } else {
            Arc::from(connect.client_id.as_str())
        },
        publisher: Arc::from(connect.client_id.as_str()),
        user,
        auth,
        disconnected: &disconnected,
        shared,
        version,
        aliases: TopicAliases::new(),
        registrations: registrations_tx,
        refused_qos2: HashSet::new(),
        connect_relayed: false,
        unknown_aliases: HashSet::new(),
        persistent: persistent.as_ref(),
        pending: Vec::new(),
        forwarded: Arc::clone(&forwarded),
        filters: HeldFilters {
            set: shared.subscribed.as_ref(),
            held: Vec::new(),
            keep: session_outlives,
        },
        keep_alive,
    }
    .run(client_rd, upstream_wr, from_client);
    let down = BrokerToClient::new(version, max, session_present, forwarded).run(
        upstream_rd,
        client_wr,
        registrations_rx,
        front_out_rx,
    );
    tokio::pin!(up, down);
    let result = tokio::select! {
        () = shutdown.cancelled() => Ok(()),
        result = &mut down => result,
        result = &mut up => {
            match result {
                // The client closed: let the broker flush what it still sends, briefly.
                Ok(()) => match tokio::time::timeout(CLOSE_GRACE, down).await {
                    Ok(result) => result,
                    Err(_) => Ok(()),
                },
                Err(e) => Err(e),
            }
        }
    };
    if let Some((stop, mut task)) = outbox {
        // The outbox applies the acknowledgements the client sent before it went, then ends.
        stop.cancel();
        let _ = tokio::time::timeout(CLOSE_GRACE, &mut task.0).await;
    }
    if let Some(p) = &persistent {
        let (sessions, id) = (Arc::clone(&p.sessions), p.id.clone());
        let _ = tokio::task::spawn_blocking(move || sessions.detach(&id)).await;
    }
    if shutdown.is_cancelled() {
        return Ok(());
    }
    if let Some(will) = will.filter(|_| !disconnected.load(Ordering::Relaxed)) {
        let id = connect.client_id.clone();
        commit_will(shared, &id, will, will_up, shutdown).await;
    }
    result
}

/// Answers a CONNECT with a refusing CONNACK, `codes` being the (3.1.1, 5.0) return/reason code, and
/// closes the client's side.
async fn refuse_connect<W: AsyncWrite + Unpin>(
    client: &mut W,
    version: ProtocolVersion,
    (v3, v5): (u8, u8),
) -> Result<(), FrontError> {
    let code = match version {
        ProtocolVersion::V5 => v5,
        _ => v3,
    };
    let mut refusal = BytesMut::with_capacity(5);
    mqtt::encode_connack_refusal(version, code, &mut refusal);
    client
        .write_all(&refusal)
        .await
        .map_err(|source| FrontError::ClientIo { source })?;
    // Best effort: the connection is being refused anyway.
    let _ = client.shutdown().await;
    Ok(())
}

/// Aborts a task when dropped: a connection's outbox ends with the connection.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the client→broker half of a persistent connection needs to serve its session.
struct Persistent {
    sessions: Arc<Sessions>,
    id: LinkId,
    /// The client's PUBACK/PUBREC/PUBCOMP of deliveries, to the outbox.
    acks: mpsc::UnboundedSender<ClientAck>,
    /// Packets the front sends the client (SUBACK, UNSUBACK), beside the outbox's deliveries.
    out: mpsc::Sender<Bytes>,
}

/// Whether a CONNECT's will goes up: its topic is selected and the path can carry it.
fn will_is_forwarded(shared: &Shared, will: &Will, version: ProtocolVersion) -> bool {
    let p = &will.publish;
    if !(shared.select)(&p.topic) {
        return false;
    }
    if let Some(limits) = &shared.options.limits {
        // The will's queue entry is bounded like that of the PUBLISH it becomes (with a packet id, as
        // the encoder requires for QoS > 0: two bytes more than the entry needs).
        let mut packet = BytesMut::new();
        let mut sized = p.clone();
        if sized.qos != QoS::AtMostOnce {
            sized.packet_id = Some(1);
        }
        let packet_len = match mqtt::encode_publish(&sized, version, &mut packet) {
            Ok(()) => packet.len(),
            Err(_) => usize::MAX / 2,
        };
        let entry = limits.entry_bound(packet_len, 0);
        if let Err(refusal) = limits.check(p.topic.len(), p.payload.len(), entry) {
            warn!(
                topic_len = p.topic.len(),
                payload_len = p.payload.len(),
                refused_total = limits.refused(),
                cause = ?refusal,
                "last will over the path's limits: it will reach local subscribers only"
            );
            return false;
        }
    }
    true
}

/// After its delay (unless the client reconnects or the agent stops meanwhile), commits a will for the
/// uplink (`up`) and hands it to the persistent sessions, which rumqttd's own will publishing cannot reach.
async fn commit_will(
    shared: &Shared,
    client_id: &str,
    will: Will,
    up: bool,
    shutdown: &CancellationToken,
) {
    if will.delay_secs > 0 {
        let cancelled = CancellationToken::new();
        let wait = shared.will_waits.fetch_add(1, Ordering::Relaxed);
        shared
            .pending_wills
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(client_id.to_owned(), (wait, cancelled.clone()));
        let delay = Duration::from_secs(u64::from(will.delay_secs));
        let waited = tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = cancelled.cancelled() => false,
            () = shutdown.cancelled() => false,
        };
        let mut pending = shared
            .pending_wills
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.get(client_id).is_some_and(|(w, _)| *w == wait) {
            pending.remove(client_id);
        }
        drop(pending);
        if !waited {
            debug!("last will cancelled: the client came back within its delay, or the agent is stopping");
            return;
        }
    }
    if let Some(sessions) = &shared.options.sessions {
        let (_, stored) = sessions.route(&[(&will.publish, client_id)]);
        if let Some(stored) = stored {
            match stored.await {
                Ok(Ok(())) => debug!("last will queued for persistent sessions"),
                _ => warn!("last will not queued for persistent sessions"),
            }
        }
    }
    if !up {
        return;
    }
    let (done, answer) = oneshot::channel();
    let request = CommitRequest {
        messages: vec![Captured {
            publish: will.publish,
            client: Arc::from(client_id),
        }],
        done,
    };
    if shared.commits.send(request).await.is_err() {
        warn!("last will not committed: the agent is stopping");
        return;
    }
    match tokio::time::timeout(WILL_COMMIT_WAIT, answer).await {
        Ok(Ok(Ok(()))) => {
            info!("connection ended without DISCONNECT: last will committed for the uplink")
        }
        Ok(Ok(Err(rejected))) => warn!(cause = %rejected, "last will not committed"),
        Ok(Err(_)) | Err(_) => warn!("last will not committed: no answer from the commit pipeline"),
    }
}

/// DISCONNECT reason "disconnect with will message" (MQTT 5.0 §3.14.2.1).
const DISCONNECT_WITH_WILL: u8 = 0x04;
/// CONNACK return code "identifier rejected" (MQTT 3.1.1 §3.2.2.3).
const CONNACK_V3_IDENTIFIER_REJECTED: u8 = 2;
/// CONNACK reason code "client identifier not valid" (MQTT 5.0 §3.2.2.2).
const CONNACK_V5_CLIENT_ID_NOT_VALID: u8 = 0x85;
/// CONNACK return code "not authorized" (MQTT 3.1.1 §3.2.2.3).
const CONNACK_V3_NOT_AUTHORIZED: u8 = 5;
/// CONNACK reason code "bad user name or password" (MQTT 5.0 §3.2.2.2).
const CONNACK_V5_BAD_CREDENTIALS: u8 = 0x86;
/// MQTT 5 reason "not authorized" (CONNACK, PUBACK/PUBREC, SUBACK).
const REASON_NOT_AUTHORIZED: u8 = 0x87;

/// The username and password a CONNECT carries, each `None` when absent.
type Credentials<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// The username and password fields of a whole CONNECT `frame`, each `None` when its flag is clear;
/// `None` overall if the packet is malformed.
fn connect_credentials(frame: &[u8]) -> Option<Credentials<'_>> {
    let at = mqtt::ConnectLogin::locate(frame).ok()?;
    Some((
        at.username.map(|r| &frame[r]),
        at.password.map(|r| &frame[r]),
    ))
}

/// Reads into `buf` until it starts with one complete packet; returns that packet's length.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<usize, FrontError> {
    loop {
        match mqtt::frame_len(buf, max) {
            Ok(len) => return Ok(len),
            Err(DecodeError::Incomplete) => {}
            Err(source) => return Err(FrontError::ClientDecode { source }),
        }
        buf.reserve(READ_CHUNK);
        let n = reader
            .read_buf(buf)
            .await
            .map_err(|source| FrontError::ClientIo { source })?;
        if n == 0 {
            return Err(FrontError::ClosedBeforeConnect);
        }
    }
}

/// Length of the complete packets at the start of `buf` (0 if none is complete yet).
fn complete_prefix(buf: &[u8], max: usize) -> Result<usize, DecodeError> {
    let mut at = 0;
    loop {
        match FixedHeader::parse(&buf[at..], max) {
            Ok(h) if buf.len() - at >= h.frame_len() => at += h.frame_len(),
            Ok(_) | Err(DecodeError::Incomplete) => return Ok(at),
            Err(e) => return Err(e),
        }
    }
}

/// Refuses a SUBSCRIBE/UNSUBSCRIBE with a malformed topic filter, which rumqttd would grant.
fn check_filters(frame: &[u8], version: ProtocolVersion) -> Result<mqtt::Filters, FrontError> {
    let packet = mqtt::Filters::decode(frame, version)
        .map_err(|source| FrontError::ClientDecode { source })?;
    for filter in &packet.filters {
        if let Err(source) = shared::topic::TopicFilter::parse(filter) {
            return Err(FrontError::InvalidTopicFilter {
                filter: filter.clone(),
                source,
            });
        }
    }
    Ok(packet)
}

/// Iterates over the packets of a chunk made of complete packets, as (offset, header, zero-copy frame).
fn frames(chunk: &Bytes) -> impl Iterator<Item = (usize, FixedHeader, Bytes)> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        // The chunk was validated by `complete_prefix`, so parsing again cannot fail.
        let header = FixedHeader::parse(&chunk[at..], usize::MAX).ok()?;
        let start = at;
        let frame = chunk.slice(start..start + header.frame_len());
        at += header.frame_len();
        Some((start, header, frame))
    })
}

/// What the client→broker half tells the broker→client half about one chunk of client packets. Sent
/// before the chunk's bytes reach the broker, so no broker answer to them can overtake it.
struct Registration {
    /// The chunk's commit batch: the packet ids whose broker acks must wait for `done`, if any.
    commit: Option<(Vec<u16>, CommitDone)>,
    /// The front's own answers and SUBACK edits, in client packet order.
    items: Vec<Item>,
}

/// Answered by the commit pipeline once a batch is on disk, or refused.
type CommitDone = oneshot::Receiver<Result<(), CommitRejected>>;

/// One entry of a [`Registration`].
enum Item {
    /// A packet the front answers itself (a refused PUBLISH's ack, or the PUBCOMP that ends a refused
    /// 3.1.1 QoS 2 exchange): sent after the acks already held.
    Answer { ack: Option<Ack>, frame: Bytes },
    /// The PUBACK of a QoS 1 PUBLISH the front kept from rumqttd (module docs, "Unsubscribed topics"):
    /// sent after the acks already held and, with `commit`, once the chunk's commit succeeded.
    Own { packet_id: u16, commit: bool },
    /// The broker's SUBACK for `packet_id` covers only the filters the ACL allowed: `denied` (positions
    /// in the client's SUBSCRIBE, ascending) get `code` inserted.
    Suback {
        packet_id: u16,
        denied: Vec<usize>,
        code: u8,
    },
}

/// How many QoS 1/2 PUBLISHes a connection handed to rumqttd still wait for rumqttd's PUBACK/PUBREC.
/// The front answers a QoS 1 PUBLISH itself only at zero: its PUBACK then follows every broker ack of an
/// earlier PUBLISH, which the broker→client half has already sorted (MQTT 3.1.1 §4.6, 5.0 §4.6).
#[derive(Debug, Default)]
struct ForwardedAcks(AtomicUsize);

impl ForwardedAcks {
    /// A QoS 1/2 PUBLISH is about to be written to the broker (before its bytes are).
    fn sent(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    /// The broker's PUBACK/PUBREC was read and sorted. Never below zero: an ack the front did not count
    /// (none is expected) leaves the count where it is.
    fn acked(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Whether every PUBLISH forwarded so far has its broker ack sorted.
    fn none(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }
}

/// The filters one connection's subscriptions in rumqttd hold, counted in the front's
/// [`SubscribedFilters`] while they last: removed at UNSUBSCRIBE and, unless rumqttd keeps the session
/// (`keep`), when the connection ends.
struct HeldFilters<'a> {
    set: Option<&'a std::sync::Mutex<SubscribedFilters>>,
    held: Vec<String>,
    keep: bool,
}

impl HeldFilters<'_> {
    fn with_set(&self, f: impl FnOnce(&mut SubscribedFilters)) {
        if let Some(set) = self.set {
            f(&mut set
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner));
        }
    }

    /// Counts `filters` (a SUBSCRIBE's, as forwarded); one the connection already holds is replaced in
    /// rumqttd, not added, so it is counted once.
    fn subscribe<'f>(&mut self, filters: impl Iterator<Item = &'f str>) {
        if self.set.is_none() {
            return;
        }
        let new: Vec<&str> = filters
            .filter(|f| !self.held.iter().any(|h| h == f))
            .collect();
        self.with_set(|set| new.iter().for_each(|f| set.add(f)));
        self.held.extend(new.into_iter().map(str::to_owned));
    }

    /// Stops counting `filters` (an UNSUBSCRIBE's) that this connection holds.
    fn unsubscribe<'f>(&mut self, filters: impl Iterator<Item = &'f str>) {
        let mut gone = Vec::new();
        for f in filters {
            if let Some(at) = self.held.iter().position(|h| h == f) {
                gone.push(self.held.swap_remove(at));
            }
        }
        self.with_set(|set| gone.iter().for_each(|f| set.remove(f)));
    }
}

impl Drop for HeldFilters<'_> {
    fn drop(&mut self) {
        if !self.keep {
            let held = std::mem::take(&mut self.held);
            self.with_set(|set| held.iter().for_each(|f| set.remove(f)));
        }
    }
}

/// The client→broker half: relays bytes, captures selected PUBLISHes, sends commit batches.
struct ClientToBroker<'a> {
    shared: &'a Shared,
    /// The connection's client id, for [`Captured::client`].
    client_id: Arc<str>,
    /// The client id as sent, for the persistent sessions' no-local option and the ACL's `%c`.
    publisher: Arc<str>,
    /// The authenticated user name, for the ACL (`None`: anonymous).
    user: Option<Arc<str>>,
    /// The listener's rules (the ACL is checked against them).
    auth: Option<&'a crate::auth::Auth>,
    /// Set for a persistent connection: the front serves its session.
    persistent: Option<&'a Persistent>,
    /// Set when the client sent DISCONNECT (other than MQTT 5's "with will message"): no will then.
    disconnected: &'a AtomicBool,
    version: ProtocolVersion,
    aliases: TopicAliases,
    registrations: mpsc::UnboundedSender<Registration>,
    /// Packet ids of refused 3.1.1 QoS 2 PUBLISHes answered with PUBREC: their PUBREL is answered by the
    /// front too (the broker never saw the PUBLISH).
    refused_qos2: HashSet<u16>,
    /// The client's CONNECT (the first packet of the buffer `run` starts with) went to the broker; any
    /// later CONNECT is a protocol violation.
    connect_relayed: bool,
    /// v5 topic aliases defined by a PUBLISH the front refused, so the broker never learnt them: the
    /// next forwarded PUBLISH that only names the alias is rewritten to carry the topic (and define the
    /// alias for the broker).
    unknown_aliases: HashSet<u16>,
    /// The current chunk's registration items, sent before its bytes go to the broker.
    pending: Vec<Item>,
    /// QoS 1/2 PUBLISHes forwarded whose broker ack is still to come.
    forwarded: Arc<ForwardedAcks>,
    /// This connection's subscription filters in rumqttd, counted for the whole front.
    filters: HeldFilters<'a>,
    /// When the front watches the client's keep-alive: how long the client may stay silent.
    keep_alive: Option<Duration>,
}

impl ClientToBroker<'_> {
    /// Returns `Ok` when the client closed its side.
    async fn run<R, W>(
        mut self,
        mut client: R,
        mut upstream: W,
        mut buf: BytesMut,
    ) -> Result<(), FrontError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let max = self.shared.options.max_packet_size;
        // One timer for the connection, moved forward cheaply on every read (a `timeout` per read would
        // register and drop a timer entry per packet of a busy publisher).
        let mut keep_alive = self.keep_alive.map(|after| (after, Deadline::new()));
        loop {
            let complete =
                complete_prefix(&buf, max).map_err(|source| FrontError::ClientDecode { source })?;
            if complete > 0 {
                let chunk = buf.split_to(complete).freeze();
                self.relay(chunk, &mut upstream).await?;
            }
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            let read = client.read_buf(&mut buf);
            let n = match &mut keep_alive {
                None => read.await,
                Some((after, deadline)) => {
                    deadline.set(Some(tokio::time::Instant::now() + *after));
                    tokio::select! {
                        biased;
                        read = read => read,
                        () = deadline.expired() => {
                            return Err(FrontError::KeepAliveExpired { after: *after });
                        }
                    }
                }
            }
            .map_err(|source| FrontError::ClientIo { source })?;
            if n == 0 {
                // Half-close towards the broker so it sees the end of the stream after the last packet.
                let _ = upstream.shutdown().await;
                return Ok(());
            }
        }
    }

    /// Forwards one chunk of complete packets and commits the selected PUBLISHes among them as one batch.
    async fn relay<W: AsyncWrite + Unpin>(
        &mut self,
        chunk: Bytes,
        upstream: &mut W,
    ) -> Result<(), FrontError> {
        let mut messages = Vec::new();
        let mut waits = Vec::new();
        // Packet ids of QoS 1 PUBLISHes the front answers itself (`Item::Own`).
        let mut answered: Vec<u16> = Vec::new();
        // Forwarded PUBLISHes, for the persistent sessions' subscriptions.
        let mut routed: Vec<(Publish, Arc<Sessions>)> = Vec::new();
        // Packets not forwarded as they are: dropped (`None`, the front answers them itself) or
        // replaced by other bytes.
        let mut edits: Vec<(Range<usize>, Option<Bytes>)> = Vec::new();
        for (start, header, frame) in frames(&chunk) {
            if header.packet_type == PacketType::Pubrel && !self.refused_qos2.is_empty() {
                let at = header.header_len;
                if let Some(&[hi, lo]) = frame.get(at..at + 2) {
                    let id = u16::from_be_bytes([hi, lo]);
                    if self.refused_qos2.remove(&id) {
                        edits.push((start..start + frame.len(), None));
                        self.answer(None, Bytes::copy_from_slice(&[0x70, 2, hi, lo]));
                    }
                }
                continue;
            }
            if header.packet_type == PacketType::Connect {
                if self.connect_relayed {
                    // Checked here because rumqttd ignores a second CONNECT; nothing of this chunk is
                    // forwarded, and packets before it got no ack, so the client resends them.
                    return Err(FrontError::SecondConnect);
                }
                self.connect_relayed = true;
                continue;
            }
            if header.packet_type == PacketType::Disconnect {
                // MQTT 5 reason 0x04 asks for the will anyway; no reason byte means 0x00.
                let with_will = self.version == ProtocolVersion::V5
                    && frame.get(header.header_len) == Some(&DISCONNECT_WITH_WILL);
                self.disconnected.store(!with_will, Ordering::Relaxed);
                continue;
            }
            if matches!(
                header.packet_type,
                PacketType::Subscribe | PacketType::Unsubscribe
            ) {
                let filters = check_filters(&frame, self.version)?;
                let denied = if header.packet_type == PacketType::Subscribe {
                    self.denied_filters(&filters)
                } else {
                    Vec::new()
                };
                if let Some(p) = self.persistent {
                    edits.push((start..start + frame.len(), None));
                    self.session_filters(p, header.packet_type, filters, &denied)
                        .await?;
                } else if header.packet_type == PacketType::Unsubscribe {
                    self.filters
                        .unsubscribe(filters.filters.iter().map(String::as_str));
                } else if !denied.is_empty() {
                    self.filters.subscribe(
                        filters
                            .filters
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| !denied.contains(i))
                            .map(|(_, f)| f.as_str()),
                    );
                    let range = start..start + frame.len();
                    let code = self.denied_code();
                    let keep: Vec<bool> = (0..filters.filters.len())
                        .map(|i| !denied.contains(&i))
                        .collect();
                    match mqtt::subscribe_keeping(&frame, self.version, &keep)
                        .map_err(|source| FrontError::ClientDecode { source })?
                    {
                        Some(kept) => {
                            // Registered before the bytes reach the broker: its SUBACK cannot overtake.
                            self.pending.push(Item::Suback {
                                packet_id: filters.packet_id,
                                denied,
                                code,
                            });
                            edits.push((range, Some(kept)));
                        }
                        None => {
                            // Every filter denied: the front answers alone.
                            let codes = vec![code; filters.filters.len()];
                            let mut ack = BytesMut::new();
                            mqtt::encode_suback(self.version, filters.packet_id, &codes, &mut ack)
                                .map_err(|source| FrontError::Reencode { source })?;
                            self.answer(None, ack.freeze());
                            edits.push((range, None));
                        }
                    }
                } else {
                    self.filters
                        .subscribe(filters.filters.iter().map(String::as_str));
                }
                continue;
            }
            if let (Some(p), PacketType::Puback | PacketType::Pubrec | PacketType::Pubcomp) =
                (self.persistent, header.packet_type)
            {
                // Acks of the front's deliveries: the broker sent this client nothing to ack.
                edits.push((start..start + frame.len(), None));
                let at = header.header_len;
                if let Some(&[hi, lo]) = frame.get(at..at + 2) {
                    let id = u16::from_be_bytes([hi, lo]);
                    let ack = match header.packet_type {
                        PacketType::Puback => ClientAck::Puback(id),
                        PacketType::Pubrec => ClientAck::Pubrec(id),
                        _ => ClientAck::Pubcomp(id),
                    };
                    // A send error means the outbox ended; the connection is closing anyway.
                    let _ = p.acks.send(ack);
                }
                continue;
            }
            if header.packet_type != PacketType::Publish {
                continue;
            }
            let mut publish = Publish::decode(&frame, self.version)
                .map_err(|source| FrontError::ClientDecode { source })?;
            if self.version != ProtocolVersion::V5 && publish.topic.is_empty() {
                // rumqttd acknowledges it (and routes it nowhere): an acknowledged, lost message.
                return Err(FrontError::EmptyTopic);
            }
            let alias = publish.properties.topic_alias;
            let names_alias_only = publish.topic.is_empty();
            if self.version == ProtocolVersion::V5 {
                self.aliases
                    .resolve(&mut publish)
                    .map_err(|source| FrontError::TopicAlias { source })?;
            }
            let range = start..start + frame.len();
            if !self.may_publish(&publish.topic) {
                self.refuse_denied(&publish);
                if let (Some(alias), false) = (alias, names_alias_only) {
                    self.unknown_aliases.insert(alias);
                }
                edits.push((range, None));
                continue;
            }
            let selected = (self.shared.select)(&publish.topic);
            if let (true, Some(limits)) = (selected, &self.shared.options.limits) {
                // An alias-only v5 PUBLISH carries no topic; its entry will.
                let extra = if names_alias_only {
                    publish.topic.len()
                } else {
                    0
                };
                let entry = limits.entry_bound(frame.len(), extra);
                if let Err(refusal) =
                    limits.check(publish.topic.len(), publish.payload.len(), entry)
                {
                    self.refuse(&publish, refusal, limits.refused());
                    if let (Some(alias), false) = (alias, names_alias_only) {
                        self.unknown_aliases.insert(alias);
                    }
                    edits.push((range, None));
                    continue;
                }
            }
            // Kept from rumqttd when no subscriber of its could want it (module docs, "Unsubscribed
            // topics"); a QoS 1 one only while no broker ack of this connection is outstanding.
            let answer_here = self.shared.subscribed.is_some()
                && !publish.retain
                && match publish.qos {
                    QoS::AtMostOnce => true,
                    QoS::AtLeastOnce => self.forwarded.none(),
                    QoS::ExactlyOnce => false,
                }
                && !self.shared.subscribed(&publish.topic);
            if answer_here {
                edits.push((range, None));
                if let (Some(alias), false) = (alias, names_alias_only) {
                    // The broker never learns this alias; a later forwarded PUBLISH that only names it
                    // is rewritten with its topic.
                    self.unknown_aliases.insert(alias);
                }
            } else {
                if let Some(alias) = alias.filter(|a| self.unknown_aliases.remove(a)) {
                    if names_alias_only {
                        edits.push((range, Some(self.with_topic(&publish, alias)?)));
                    }
                }
                if publish.qos != QoS::AtMostOnce {
                    self.forwarded.sent();
                }
            }
            if let Some(sessions) = self.shared.options.sessions.as_ref().filter(|s| s.active()) {
                routed.push((publish.clone(), Arc::clone(sessions)));
            }
            let keep_retained = publish.retain && self.shared.options.capture_retained;
            let captured = selected || keep_retained;
            if let (true, QoS::AtLeastOnce, Some(id)) =
                (answer_here, publish.qos, publish.packet_id)
            {
                // Waits for the commit when captured, or for a persistent session's (below).
                self.pending.push(Item::Own {
                    packet_id: id,
                    commit: captured,
                });
                answered.push(id);
            }
            if !captured {
                continue;
            }
            if let (false, QoS::AtLeastOnce | QoS::ExactlyOnce, Some(id)) =
                (answer_here, publish.qos, publish.packet_id)
            {
                waits.push(id);
            }
            messages.push(Captured {
                publish,
                client: Arc::clone(&self.client_id),
            });
        }
        let session_done = match routed.first() {
            None => None,
            Some((_, sessions)) => {
                let batch: Vec<(&Publish, &str)> =
                    routed.iter().map(|(p, _)| (p, &*self.publisher)).collect();
                let (stored, done) = sessions.route(&batch);
                for index in stored {
                    if let Some(id) = routed[index].0.packet_id {
                        if answered.contains(&id) {
                            for item in &mut self.pending {
                                if let Item::Own { packet_id, commit } = item {
                                    *commit |= *packet_id == id;
                                }
                            }
                        } else if !waits.contains(&id) {
                            waits.push(id);
                        }
                    }
                }
                done
            }
        };
        let (done, uplink_done) = if messages.is_empty() {
            (None, None)
        } else {
            let (done_tx, done_rx) = oneshot::channel();
            (Some(done_tx), Some(done_rx))
        };
        let all_done = match (uplink_done, session_done) {
            (Some(a), Some(b)) => Some(both(a, b)),
            (a, b) => a.or(b),
        };
        let own_waits = self
            .pending
            .iter()
            .any(|item| matches!(item, Item::Own { commit: true, .. }));
        let commit = all_done.filter(|_| !waits.is_empty() || own_waits);
        if commit.is_some() || !self.pending.is_empty() {
            // Registered before the bytes reach the broker: its ack cannot overtake this.
            // A send error means the broker half ended; the connection is closing anyway.
            let _ = self.registrations.send(Registration {
                commit: commit.map(|done| (waits, done)),
                items: std::mem::take(&mut self.pending),
            });
        }
        let forward = if edits.is_empty() {
            chunk
        } else {
            let mut kept = BytesMut::with_capacity(chunk.len());
            let mut at = 0;
            for (range, replacement) in edits {
                kept.extend_from_slice(&chunk[at..range.start]);
                if let Some(bytes) = replacement {
                    kept.extend_from_slice(&bytes);
                }
                at = range.end;
            }
            kept.extend_from_slice(&chunk[at..]);
            kept.freeze()
        };
        if !forward.is_empty() {
            upstream
                .write_all(&forward)
                .await
                .map_err(|source| FrontError::UpstreamIo { source })?;
        }
        if let Some(done) = done {
            debug!(messages = messages.len(), "commit batch");
            self.shared
                .commits
                .send(CommitRequest { messages, done })
                .await
                .map_err(|_| FrontError::CommitPipelineClosed)?;
        }
        Ok(())
    }
}

/// One outcome for two commits: success when both succeeded.
fn both(
    a: oneshot::Receiver<Result<(), CommitRejected>>,
    b: oneshot::Receiver<Result<(), CommitRejected>>,
) -> oneshot::Receiver<Result<(), CommitRejected>> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let outcome = match (a.await, b.await) {
            (Ok(Ok(())), Ok(Ok(()))) => Ok(()),
            (Ok(Err(e)), _) | (_, Ok(Err(e))) => Err(e),
            // A pipeline gone: dropping `tx` closes the connection, as for one commit.
            _ => return,
        };
        let _ = tx.send(outcome);
    });
    rx
}

impl ClientToBroker<'_> {
    /// Serves a persistent connection's SUBSCRIBE or UNSUBSCRIBE from its stored session: the change is
    /// on disk before the SUBACK/UNSUBACK is queued, and a new subscription's retained messages after it.
    async fn session_filters(
        &self,
        p: &Persistent,
        kind: PacketType,
        filters: mqtt::Filters,
        denied: &[usize],
    ) -> Result<(), FrontError> {
        let (sessions, id, version) = (Arc::clone(&p.sessions), p.id.clone(), self.version);
        let packet_id = filters.packet_id;
        let count = filters.filters.len();
        let denied_code = self.denied_code();
        let denied = denied.to_vec();
        let applied = tokio::task::spawn_blocking(move || {
            if kind == PacketType::Subscribe {
                let requested: Vec<(String, u8)> = filters
                    .filters
                    .into_iter()
                    .zip(filters.options)
                    .enumerate()
                    .filter(|(i, _)| !denied.contains(i))
                    .map(|(_, f)| f)
                    .collect();
                let (codes, retained) = if requested.is_empty() {
                    (Vec::new(), Vec::new())
                } else {
                    sessions.subscribe(&id, &requested)?
                };
                // The ACL's refusals go back in at their places.
                let mut allowed = codes.into_iter();
                let merged = (0..count)
                    .map(|i| {
                        if denied.contains(&i) {
                            denied_code
                        } else {
                            allowed.next().unwrap_or(denied_code)
                        }
                    })
                    .collect();
                Ok((merged, retained))
            } else {
                sessions
                    .unsubscribe(&id, &filters.filters)
                    .map(|codes| (codes, Vec::new()))
            }
        })
        .await
        .map_err(|_| FrontError::SessionStore)?;
        let (codes, retained) = applied.map_err(|cause| {
            tracing::error!(%cause, "persistent session store failed; closing the connection");
            FrontError::SessionStore
        })?;
        let mut frame = BytesMut::new();
        let encoded = if kind == PacketType::Subscribe {
            mqtt::encode_suback(version, packet_id, &codes, &mut frame)
        } else {
            mqtt::encode_unsuback(version, packet_id, &codes, &mut frame)
        };
        encoded.map_err(|source| FrontError::Reencode { source })?;
        p.out
            .send(frame.freeze())
            .await
            .map_err(|_| FrontError::CommitPipelineClosed)?;
        p.sessions.submit(retained);
        Ok(())
    }

    /// The ACL's view of this client.
    fn acl_client(&self) -> shared::auth::acl::Client<'_> {
        shared::auth::acl::Client {
            user: self.user.as_deref(),
            client_id: &self.publisher,
        }
    }

    /// Whether the ACL (if any) lets this client publish to `topic`.
    fn may_publish(&self, topic: &str) -> bool {
        self.auth
            .is_none_or(|auth| auth.can_publish(self.acl_client(), topic))
    }

    /// The positions of the SUBSCRIBE filters the ACL denies (logged).
    fn denied_filters(&self, filters: &mqtt::Filters) -> Vec<usize> {
        let Some(auth) = self.auth.filter(|a| a.has_acl()) else {
            return Vec::new();
        };
        let client = self.acl_client();
        let denied: Vec<usize> = filters
            .filters
            .iter()
            .enumerate()
            .filter(|(_, f)| !auth.can_subscribe(client, f))
            .map(|(i, _)| i)
            .collect();
        for &i in &denied {
            warn!(
                filter = %filters.filters[i],
                user = client.user,
                denied_total = auth.counters().subscribe_denied.load(Ordering::Relaxed),
                "subscription denied by the ACL"
            );
        }
        denied
    }

    /// The SUBACK code of a denied filter: 0x87 "not authorized" (5.0), 0x80 "failure" (3.1.1).
    fn denied_code(&self) -> u8 {
        if self.version == ProtocolVersion::V5 {
            REASON_NOT_AUTHORIZED
        } else {
            0x80
        }
    }

    /// Logs a PUBLISH the ACL denied and answers it: MQTT 5 with 0x87, 3.1.1 with a plain ack (as
    /// Mosquitto does: 3.1.1 has no negative ack, and the message is dropped).
    fn refuse_denied(&mut self, publish: &Publish) {
        let denied_total = self
            .auth
            .map_or(0, |a| a.counters().publish_denied.load(Ordering::Relaxed));
        warn!(
            topic = %publish.topic,
            user = self.user.as_deref(),
            qos = ?publish.qos,
            denied_total,
            "PUBLISH denied by the ACL: not forwarded"
        );
        self.answer_refused(publish, REASON_NOT_AUTHORIZED);
    }

    /// Logs a refused PUBLISH and answers it: MQTT 5 with the refusal's reason code, 3.1.1 with a plain
    /// ack (Mosquitto's `message_size_limit` behaviour; see the module docs). QoS 0 gets no answer.
    fn refuse(&mut self, publish: &Publish, refusal: Refusal, refused_total: u64) {
        warn!(
            topic_len = publish.topic.len(),
            payload_len = publish.payload.len(),
            qos = ?publish.qos,
            packet_id = publish.packet_id,
            cause = %refusal,
            kind = refusal.kind(),
            refused_total,
            "message refused at PUBLISH time: the path to the hub cannot carry it"
        );
        self.answer_refused(publish, refusal.v5_reason());
    }

    /// Answers a PUBLISH the front did not forward: MQTT 5 with `v5_reason`, 3.1.1 with a plain ack (and
    /// the PUBCOMP for a QoS 2 exchange's PUBREL later). QoS 0 gets no answer.
    fn answer_refused(&mut self, publish: &Publish, v5_reason: u8) {
        let kind = match (publish.qos, publish.packet_id) {
            (QoS::AtLeastOnce, Some(_)) => AckKind::Puback,
            (QoS::ExactlyOnce, Some(id)) => {
                if self.version != ProtocolVersion::V5 {
                    self.refused_qos2.insert(id);
                }
                AckKind::Pubrec
            }
            _ => return,
        };
        let Some(packet_id) = publish.packet_id else {
            return;
        };
        let reason = if self.version == ProtocolVersion::V5 {
            v5_reason
        } else {
            0
        };
        let mut frame = BytesMut::with_capacity(5);
        mqtt::encode_ack(kind, packet_id, reason, self.version, &mut frame);
        let ack = Ack {
            kind,
            packet_id,
            reason,
        };
        self.answer(Some(ack), frame.freeze());
    }

    /// `publish` (alias-resolved) re-encoded with its topic and `alias`, which defines the alias for the
    /// broker as the client once did in a PUBLISH the front refused.
    fn with_topic(&self, publish: &Publish, alias: u16) -> Result<Bytes, FrontError> {
        let mut packet = publish.clone();
        packet.properties.topic_alias = Some(alias);
        let mut out = BytesMut::new();
        mqtt::encode_publish(&packet, self.version, &mut out)
            .map_err(|source| FrontError::Reencode { source })?;
        Ok(out.freeze())
    }

    /// Queues a packet of the front's own for the client, registered with the current chunk.
    fn answer(&mut self, ack: Option<Ack>, frame: Bytes) {
        self.pending.push(Item::Answer { ack, frame });
    }
}

/// `chunk` with the session-present flag of its leading CONNACK set to `present` (when the CONNACK
/// accepts the connection; MQTT 3.1.1 §3.2.2.2, 5.0 §3.2.2.1.1).
fn with_session_present(chunk: Bytes, present: bool) -> Bytes {
    let Ok(header) = FixedHeader::parse(&chunk, usize::MAX) else {
        return chunk;
    };
    let at = header.header_len;
    if header.packet_type != PacketType::Connack || chunk.get(at + 1) != Some(&0) {
        return chunk;
    }
    let mut edited = BytesMut::from(&chunk[..]);
    edited[at] = (edited[at] & !1) | u8::from(present);
    edited.freeze()
}

/// A packet waiting to be sent to the client: a broker ack, or an answer of the front itself.
struct HeldAck {
    /// The commit batch it waits on; `None` if it only waits behind earlier held acks.
    batch: Option<u64>,
    /// The ack it is (`None`: a PUBCOMP of the front); needed to answer a rejected commit.
    ack: Option<Ack>,
    frame: Bytes,
}

/// A commit batch the broker→client half waits on.
struct Batch {
    done: oneshot::Receiver<Result<(), CommitRejected>>,
    outcome: Option<Result<(), CommitRejected>>,
    /// Held or expected acks that still refer to this batch; it is forgotten at 0.
    refs: usize,
}

/// The broker→client half: relays bytes, holding acks of uncommitted packets.
struct BrokerToClient {
    version: ProtocolVersion,
    max: usize,
    /// Packet id → batch, for captured packets whose broker ack has not arrived yet.
    waiting: HashMap<u16, u64>,
    batches: HashMap<u64, Batch>,
    next_batch: u64,
    held: VecDeque<HeldAck>,
    out: BytesMut,
    /// For a persistent connection, the session-present flag its CONNACK must carry: the front's store
    /// decides it, not rumqttd's memory.
    session_present: Option<bool>,
    /// SUBACKs to complete with the codes of filters the ACL denied: packet id → (positions, code).
    suback_edits: HashMap<u16, (Vec<usize>, u8)>,
    /// Counted down for every broker PUBACK/PUBREC sorted (see [`ForwardedAcks`]).
    forwarded: Arc<ForwardedAcks>,
}

impl BrokerToClient {
    fn new(
        version: ProtocolVersion,
        max: usize,
        session_present: Option<bool>,
        forwarded: Arc<ForwardedAcks>,
    ) -> Self {
        Self {
            forwarded,
            version,
            max,
            session_present,
            waiting: HashMap::new(),
            batches: HashMap::new(),
            next_batch: 0,
            held: VecDeque::new(),
            out: BytesMut::new(),
            suback_edits: HashMap::new(),
        }
    }

    /// Returns `Ok` when the broker closed its side.
    async fn run<R, W>(
        mut self,
        mut upstream: R,
        mut client: W,
        mut registrations: mpsc::UnboundedReceiver<Registration>,
        front_out: Option<mpsc::Receiver<Bytes>>,
    ) -> Result<(), FrontError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        let mut registrations_open = true;
        let mut front_open = front_out.is_some();
        let mut front_out = front_out.unwrap_or_else(|| mpsc::channel(1).1);
        loop {
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            let front_batch = self.held.front().and_then(|h| h.batch).filter(|b| {
                self.batches
                    .get(b)
                    .is_some_and(|batch| batch.outcome.is_none())
            });
            let batches = &mut self.batches;
            let wait_front = async {
                match front_batch.and_then(|b| batches.get_mut(&b)) {
                    Some(batch) => (&mut batch.done).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                read = upstream.read_buf(&mut buf) => {
                    let n = read.map_err(|source| FrontError::UpstreamIo { source })?;
                    if n == 0 {
                        let _ = client.shutdown().await;
                        return Ok(());
                    }
                    // Every registration sent before the bytes we just read is visible now.
                    while let Ok(registration) = registrations.try_recv() {
                        self.register(registration);
                    }
                    let complete = complete_prefix(&buf, self.max)
                        .map_err(|source| FrontError::UpstreamDecode { source })?;
                    if complete > 0 {
                        let mut chunk = buf.split_to(complete).freeze();
                        if let Some(present) = self.session_present.take() {
                            chunk = with_session_present(chunk, present);
                        }
                        if let Some(direct) = self.route(chunk)? {
                            client.write_all(&direct).await.map_err(|source| FrontError::ClientIo { source })?;
                        }
                    }
                }
                // Only after the CONNACK went out: nothing may precede it (MQTT 3.1.1 §3.2, 5.0 §3.2).
                frame = front_out.recv(), if front_open && self.session_present.is_none() => match frame {
                    Some(frame) => client
                        .write_all(&frame)
                        .await
                        .map_err(|source| FrontError::ClientIo { source })?,
                    None => front_open = false,
                },
                registration = registrations.recv(), if registrations_open => match registration {
                    Some(registration) => self.register(registration),
                    None => registrations_open = false,
                },
                outcome = wait_front => {
                    let b = front_batch.expect("invariant: wait_front only resolves for a front batch");
                    let outcome = outcome.map_err(|_| FrontError::CommitPipelineClosed)?;
                    if let Some(batch) = self.batches.get_mut(&b) {
                        batch.outcome = Some(outcome);
                    }
                }
            }
            // Acks released before a rejection still go out (they were committed).
            let released = self.release();
            if !self.out.is_empty() {
                client
                    .write_all(&self.out)
                    .await
                    .map_err(|source| FrontError::ClientIo { source })?;
                self.out.clear();
            }
            released?;
        }
    }

    fn register(&mut self, registration: Registration) {
        let Registration { commit, items } = registration;
        let batch = commit.map(|(waits, done)| {
            let id = self.next_batch;
            self.next_batch += 1;
            let own = items
                .iter()
                .filter(|item| matches!(item, Item::Own { commit: true, .. }))
                .count();
            let batch = Batch {
                done,
                outcome: None,
                refs: waits.len() + own,
            };
            self.batches.insert(id, batch);
            for &packet_id in &waits {
                if let Some(older) = self.waiting.insert(packet_id, id) {
                    // The client reused a packet id before its ack (possibly within this batch): the
                    // newest registration covers it, the older one no longer expects that ack.
                    self.unref(older);
                }
            }
            id
        });
        for item in items {
            match item {
                Item::Suback {
                    packet_id,
                    denied,
                    code,
                } => {
                    self.suback_edits.insert(packet_id, (denied, code));
                }
                Item::Answer { ack, frame } => self.hold(None, ack, frame),
                Item::Own { packet_id, commit } => {
                    let ack = Ack {
                        kind: AckKind::Puback,
                        packet_id,
                        reason: 0,
                    };
                    let mut frame = BytesMut::with_capacity(4);
                    mqtt::encode_ack(ack.kind, packet_id, 0, self.version, &mut frame);
                    self.hold(batch.filter(|_| commit), Some(ack), frame.freeze());
                }
            }
        }
    }

    /// Queues a packet of the front's own behind the acks already held; one that waits on no batch
    /// goes out at once when nothing is held.
    fn hold(&mut self, batch: Option<u64>, ack: Option<Ack>, frame: Bytes) {
        if batch.is_none() && self.held.is_empty() {
            self.out.extend_from_slice(&frame);
        } else {
            self.held.push_back(HeldAck { batch, ack, frame });
        }
    }

    fn unref(&mut self, batch: u64) {
        if let Some(b) = self.batches.get_mut(&batch) {
            b.refs = b.refs.saturating_sub(1);
            if b.refs == 0 {
                self.batches.remove(&batch);
            }
        }
    }

    /// Sorts a chunk of broker packets into held acks and pass-through bytes. Returns the chunk itself
    /// when nothing is held (the common case: no copy), else copies pass-through packets to `out`.
    fn route(&mut self, chunk: Bytes) -> Result<Option<Bytes>, FrontError> {
        let mut held_any = false;
        for (start, header, frame) in frames(&chunk) {
            if header.packet_type == PacketType::Suback && !self.suback_edits.is_empty() {
                if let Some(whole) = self.complete_suback(&frame)? {
                    if !held_any {
                        held_any = true;
                        self.out.extend_from_slice(&chunk[..start]);
                    }
                    self.out.extend_from_slice(&whole);
                    continue;
                }
            }
            let is_ack = matches!(header.packet_type, PacketType::Puback | PacketType::Pubrec);
            if is_ack {
                let ack = Ack::decode(&frame, self.version)
                    .map_err(|source| FrontError::UpstreamDecode { source })?;
                // Sorted below, before any registration read after this chunk.
                self.forwarded.acked();
                let batch = self.waiting.remove(&ack.packet_id);
                if batch.is_some() || !self.held.is_empty() {
                    if !held_any {
                        // Packets before this one in the chunk pass unchanged.
                        held_any = true;
                        self.out.extend_from_slice(&chunk[..start]);
                    }
                    self.held.push_back(HeldAck {
                        batch,
                        ack: Some(ack),
                        frame,
                    });
                    continue;
                }
            }
            if held_any {
                self.out.extend_from_slice(&frame);
            }
        }
        Ok((!held_any).then_some(chunk))
    }

    /// The client's SUBACK for a broker SUBACK that covers only the filters the ACL allowed: the denied
    /// filters' codes put back at their places. `None` when this SUBACK needs no edit.
    fn complete_suback(&mut self, frame: &[u8]) -> Result<Option<Bytes>, FrontError> {
        let (packet_id, codes) = mqtt::suback_codes(frame, self.version)
            .map_err(|source| FrontError::UpstreamDecode { source })?;
        let Some((denied, code)) = self.suback_edits.remove(&packet_id) else {
            return Ok(None);
        };
        let mut allowed = codes.into_iter();
        let total = denied.len() + allowed.len();
        let merged: Vec<u8> = (0..total)
            .map(|i| {
                if denied.contains(&i) {
                    code
                } else {
                    allowed.next().unwrap_or(code)
                }
            })
            .collect();
        let mut out = BytesMut::new();
        mqtt::encode_suback(self.version, packet_id, &merged, &mut out)
            .map_err(|source| FrontError::Reencode { source })?;
        Ok(Some(out.freeze()))
    }

    /// Moves held acks whose commits finished, in order, to `out`.
    fn release(&mut self) -> Result<(), FrontError> {
        while let Some(front) = self.held.front() {
            let outcome = match front.batch {
                None => Ok(()),
                Some(b) => match self.batches.get(&b).and_then(|batch| batch.outcome) {
                    Some(outcome) => outcome,
                    None => return Ok(()),
                },
            };
            let HeldAck { batch, ack, frame } =
                self.held.pop_front().expect("invariant: front() was Some");
            if let Some(b) = batch {
                self.unref(b);
            }
            // Only a broker ack (`Some`) can wait on a batch; the front's own answers pass as they are.
            let (source, ack) = match (outcome, ack) {
                (Ok(()), _) | (Err(_), None) => {
                    self.out.extend_from_slice(&frame);
                    continue;
                }
                (Err(source), Some(ack)) => (source, ack),
            };
            if self.version != ProtocolVersion::V5 {
                return Err(FrontError::CommitRejected {
                    packet_id: ack.packet_id,
                    source,
                });
            }
            warn!(packet_id = ack.packet_id, cause = %source, "commit rejected; answering quota exceeded");
            mqtt::encode_ack(
                ack.kind,
                ack.packet_id,
                REASON_QUOTA_EXCEEDED,
                self.version,
                &mut self.out,
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CONNECT with the given will (topic, payload) and credentials, built by hand.
    fn connect(
        version: ProtocolVersion,
        will: Option<(&str, &str)>,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Vec<u8> {
        let field = |out: &mut Vec<u8>, bytes: &[u8]| {
            out.extend_from_slice(&u16::try_from(bytes.len()).expect("short").to_be_bytes());
            out.extend_from_slice(bytes);
        };
        let mut flags = 0x02;
        if will.is_some() {
            flags |= 0x04;
        }
        if username.is_some() {
            flags |= 0x80;
        }
        if password.is_some() {
            flags |= 0x40;
        }
        let mut body = Vec::new();
        field(&mut body, b"MQTT");
        body.extend_from_slice(&[version.level(), flags, 0, 30]);
        let v5 = version == ProtocolVersion::V5;
        if v5 {
            body.extend_from_slice(&[5, 0x11, 0, 0, 0, 10]); // session expiry interval
        }
        field(&mut body, b"client-1");
        if let Some((topic, payload)) = will {
            if v5 {
                body.push(0);
            }
            field(&mut body, topic.as_bytes());
            field(&mut body, payload.as_bytes());
        }
        if let Some(u) = username {
            field(&mut body, u.as_bytes());
        }
        if let Some(p) = password {
            field(&mut body, p.as_bytes());
        }
        let mut packet = vec![0x10, u8::try_from(body.len()).expect("under 128 bytes")];
        packet.extend_from_slice(&body);
        packet
    }

    #[test]
    fn credentials_are_found_after_properties_and_will() {
        type Case = (
            ProtocolVersion,
            Option<(&'static str, &'static str)>,
            Option<&'static str>,
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            (ProtocolVersion::V3_1_1, None, None, None),
            (ProtocolVersion::V3_1_1, None, Some("site"), Some("pw")),
            (
                ProtocolVersion::V3_1_1,
                Some(("will/t", "bye")),
                Some("site"),
                Some("pw"),
            ),
            (ProtocolVersion::V3_1_1, None, Some("only-user"), None),
            (ProtocolVersion::V5, None, Some("site"), Some("pw")),
            (ProtocolVersion::V5, Some(("w", "x")), Some("u"), Some("")),
            (ProtocolVersion::V5, Some(("w", "x")), None, None),
        ];
        for &(version, will, username, password) in cases {
            let packet = connect(version, will, username, password);
            let got = connect_credentials(&packet);
            assert_eq!(
                got,
                Some((username.map(str::as_bytes), password.map(str::as_bytes))),
                "{version:?} will={will:?}"
            );
            assert_eq!(
                connect_credentials(&packet[..packet.len() - 1]),
                None,
                "a truncated packet is refused"
            );
        }
    }
}
