//! The embedded edge broker: rumqttd 0.20 running in-process, reachable only through the front.
//!
//! rumqttd's `Broker::start` spawns one OS thread and runtime per listener, blocks, has no stop API and
//! returns `Ok` even when a listener failed to bind. So we use its lower-level parts instead: the router
//! (`Router::new(..).spawn()`, one OS thread) and one `Server` task per listener on *our* tokio runtime,
//! which we can abort. Both listeners are internal, on ephemeral `127.0.0.1` ports, and one per protocol
//! (rumqttd picks the protocol per listener, not per connection). Clients reach them through the front
//! ([`super::front`]), which hands each connection to the listener of its protocol inside the process
//! (`Server::in_process`, see [`Upstreams`]); the ports themselves serve the program's own MQTT clients.
//!
//! A loopback port is open to every local process, and the front's passwords, ACLs and reserved client
//! ids mean nothing to a client that connects there directly. So each start draws a fresh random
//! [`InternalLogin`] that the listeners require (rumqttd's own static login check, compared in constant
//! time): the front writes it into every CONNECT it forwards, and the program's own clients (the hub's
//! publisher, the agent's downlink) present it. It never leaves the process and is never logged.
//!
//! Limits that cannot be lifted:
//! - The router thread cannot be stopped (rumqttd has no shutdown at all). [`EmbeddedBroker::stop`]
//!   stops the listeners; connections already accepted run as tasks rumqttd spawned on our runtime and end
//!   when their socket closes (the front closes them) or when the runtime shuts down.
//! - rumqttd binds the address itself, so the ephemeral port is reserved by binding and releasing it;
//!   another process could take it in between. [`EmbeddedBroker::start`] therefore probes every listener
//!   with a real MQTT CONNECT and retries with a new port when the bind or the probe fails.
//!
//! Logs: every normal client disconnect makes rumqttd log `ERROR router-drop error=Recv(Disconnected)`
//! (target `rumqttd::server::broker`), which is noise, not a fault. Add [`QUIET_RUMQTTD_LOGS`] to the
//! `tracing_subscriber::EnvFilter` directives to hide it (that also hides rumqttd's other per-connection
//! errors, which the front reports itself).

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::local::LinkBuilder;
/// The in-process link's halves and error (see [`LocalLinks`]).
pub use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::Protocol;
/// The router's word on its subscribers (see [`EmbeddedBroker::pressure`]).
pub use rumqttd::SubscriberPressure;
use rumqttd::{
    ConnectionSettings, InProcessAcceptor, LinkType, Router, RouterConfig, Server, ServerSettings,
};
use shared::mqtt::{self, ProtocolVersion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::front::Upstreams;

/// The username of the internal login (the secret is what matters; the name shows up in rumqttd's logs).
pub const INTERNAL_USER: &str = "meshbridge-internal";

/// The login the internal listeners require, drawn at random for each start of the broker.
#[derive(Clone, PartialEq, Eq)]
pub struct InternalLogin {
    secret: String,
}

impl InternalLogin {
    /// A fresh login: 256 bits from the operating system's generator, hex-encoded (rumqttd compares
    /// logins as UTF-8 strings).
    ///
    /// # Errors
    /// [`EmbeddedError::Random`] when the operating system's generator fails.
    pub fn generate() -> Result<Self, EmbeddedError> {
        let mut bytes = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| EmbeddedError::Random)?;
        let secret = bytes.iter().fold(String::with_capacity(64), |mut s, b| {
            use std::fmt::Write as _;
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        });
        Ok(Self { secret })
    }

    /// The username to present.
    #[must_use]
    pub const fn user(&self) -> &'static str {
        INTERNAL_USER
    }

    /// The password to present. Keep it inside the process: anyone holding it bypasses the front.
    #[must_use]
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

impl std::fmt::Debug for InternalLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalLogin")
            .field("user", &INTERNAL_USER)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// `EnvFilter` directives that silence rumqttd's per-connection noise (`router-drop` on every normal
/// disconnect) and its router chatter, e.g. `EnvFilter::new(format!("info,{QUIET_RUMQTTD_LOGS}"))`.
pub const QUIET_RUMQTTD_LOGS: &str = "rumqttd::server::broker=off,rumqttd::router=warn";

/// How often a listener is tried on a fresh port before giving up.
const START_ATTEMPTS: u32 = 3;
/// How long one listener may take to answer the probe CONNECT.
const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// Limits of the embedded broker. The defaults are generous: the broker is only reachable through the
/// front, which enforces the packet size limit first.
#[derive(Debug, Clone)]
pub struct EmbeddedSettings {
    /// Largest packet a client may send (rumqttd's `max_payload_size`, checked on the whole packet).
    pub max_packet_size: usize,
    /// Most concurrent connections the router accepts.
    pub max_connections: usize,
    /// Most unacknowledged outgoing QoS 1/2 packets per connection.
    pub max_inflight_count: usize,
    /// How long a new connection may take to send CONNECT (rumqttd caps it at 65.535 s).
    pub connect_timeout: Duration,
    /// Size of one in-memory log segment per topic (bounds the offline backlog with the next field).
    pub max_segment_size: usize,
    /// Number of segments kept per topic, the one being written included; the oldest is dropped beyond
    /// it, read or not (see [`EmbeddedBroker::pressure`]).
    pub max_segment_count: usize,
    /// Runs rumqttd's router as a task on the runtime that serves the connections instead of on a thread
    /// of its own (`Router::spawn_task`, a vendored patch): no futex wake of the router and no
    /// cross-thread wake of the subscriber's connection per message. For a broker every message crosses
    /// (the hub's cloud broker); off by default.
    pub router_task: bool,
}

impl Default for EmbeddedSettings {
    fn default() -> Self {
        Self {
            max_packet_size: 1024 * 1024,
            max_connections: 10_000,
            max_inflight_count: 1_000,
            connect_timeout: Duration::from_secs(30),
            max_segment_size: DEFAULT_LOG_PER_FILTER / LOG_SEGMENTS,
            max_segment_count: LOG_SEGMENTS,
            router_task: false,
        }
    }
}

/// Segments of a filter's log: rumqttd keeps `max_segment_count` segments, the one being written
/// included, and drops the oldest whole segment when a new one starts. Sixteen, so that the subscriber
/// pressure of the patched router (`vendor/rumqttd/PATCHED.md`: held with 8 segments left before a
/// subscriber loses data, released at 11) has half the log as margin for what a publisher still has in
/// flight when it stops.
const LOG_SEGMENTS: usize = 16;
/// Default memory per subscription filter (the config's `broker.max_log_per_filter`).
const DEFAULT_LOG_PER_FILTER: usize = 32 * 1024 * 1024;

impl EmbeddedSettings {
    /// Bounds the in-memory log rumqttd keeps per subscription filter to about `bytes` (at least 4 KiB per
    /// segment, rumqttd's floor being 1 KiB). rumqttd keeps every message published to a subscribed
    /// filter in that log whether or not it was delivered, so this, not the subscribers' speed, is what
    /// bounds the broker's memory; its own default was 10 × 100 MiB per filter.
    #[must_use]
    pub fn with_log_per_filter(mut self, bytes: usize) -> Self {
        self.max_segment_size = (bytes / LOG_SEGMENTS).max(4096);
        self.max_segment_count = LOG_SEGMENTS;
        self
    }
}

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// The operating system's random generator failed, so no internal login could be drawn.
    #[error("the system random generator failed")]
    Random,
    /// No ephemeral loopback port could be reserved for a listener.
    #[error("could not reserve a loopback port")]
    ReservePort {
        /// The bind error.
        #[source]
        source: io::Error,
    },
    /// A listener did not answer an MQTT CONNECT on any of its attempts (bind failed or the port was
    /// taken by someone else); the cause of each attempt is logged at warn.
    #[error("the {version:?} listener did not start after {attempts} attempts")]
    ListenerNotReady {
        /// Protocol of the listener.
        version: ProtocolVersion,
        /// Attempts made, each on a fresh port.
        attempts: u32,
    },
    /// An in-process link to the router could not be opened ([`LocalLinks::open`]).
    #[error("could not open a link to the embedded broker's router: {0}")]
    Link(String),
}

/// A running embedded broker: the internal listener addresses and the listener tasks.
///
/// Dropping it stops the listeners too (see the module docs for what cannot be stopped).
#[derive(Debug)]
pub struct EmbeddedBroker {
    /// The internal MQTT 3.1.1 listener.
    pub v4_addr: SocketAddr,
    /// The internal MQTT 5.0 listener.
    pub v5_addr: SocketAddr,
    login: Arc<InternalLogin>,
    listeners: Vec<JoinHandle<()>>,
    pressure: Arc<SubscriberPressure>,
    links: LocalLinks,
    /// The listeners' in-process entrances and login: the front's way in.
    upstreams: Upstreams,
}

/// Opens in-process connections to the embedded broker's router: rumqttd's local links, which hand
/// packets to the router thread through shared buffers instead of a loopback socket. The hub's
/// publisher uses one (`cloud-hub/src/publisher/local.rs`): a batch of PUBLISHes becomes one push and
/// one wake-up of the router, with no MQTT encoding, no socket and no connection task of rumqttd's.
/// Nothing outside the process can reach a local link, so it needs no login.
#[derive(Clone)]
pub struct LocalLinks {
    /// rumqttd does not export the router handle's type, so the handle lives in a closure.
    open: Arc<OpenLink>,
}

/// Connects a client id to the router; the error is rumqttd's `LinkError`, as text (it is 800 bytes).
type OpenLink = dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync;

impl std::fmt::Debug for LocalLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLinks").finish_non_exhaustive()
    }
}

impl LocalLinks {
    /// Connects `client_id` to the router with a clean session and dynamic filters (a PUBLISH to a
    /// topic no subscription matches yet creates that topic's log instead of failing the connection,
    /// as the internal listeners are set up too).
    ///
    /// # Errors
    /// [`EmbeddedError::Link`] when the router is gone or refused the connection (its
    /// `max_connections`).
    pub async fn open(&self, client_id: &str) -> Result<(LinkTx, LinkRx), EmbeddedError> {
        let open = Arc::clone(&self.open);
        let client_id = client_id.to_owned();
        // rumqttd's link builder blocks on the router's CONNACK.
        tokio::task::spawn_blocking(move || open(&client_id))
            .await
            .map_err(|e| EmbeddedError::Link(e.to_string()))?
            .map_err(EmbeddedError::Link)
    }
}

impl EmbeddedBroker {
    /// Starts the router and both listeners on the current tokio runtime and returns once both answer an
    /// MQTT CONNECT.
    ///
    /// # Errors
    /// [`EmbeddedError`] when a port cannot be reserved or a listener never comes up.
    pub async fn start(settings: &EmbeddedSettings) -> Result<Self, EmbeddedError> {
        let router_config = RouterConfig {
            max_connections: settings.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: settings.max_segment_size,
            max_segment_count: settings.max_segment_count,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: rumqttd::Strategy::default(),
        };
        let login = Arc::new(InternalLogin::generate()?);
        // The router id is only meaningful in rumqttd's (unfinished) cluster mode.
        let router = Router::new(0, router_config);
        let pressure = router.pressure();
        let router_tx = if settings.router_task {
            router.spawn_task()
        } else {
            router.spawn()
        };
        let links = {
            let router_tx = router_tx.clone();
            LocalLinks {
                open: Arc::new(move |client_id: &str| {
                    LinkBuilder::new(client_id, router_tx.clone())
                        .clean_session(true)
                        .dynamic_filters(true)
                        .build()
                        .map(|(tx, rx, _connack)| (tx, rx))
                        .map_err(|e| e.to_string())
                }),
            }
        };
        let mut listeners = Vec::with_capacity(2);
        // rumqttd does not export the router handle's type, so each listener gets a constructor closure.
        let v4 = |s| Server::new(s, router_tx.clone(), V4);
        let v5 = |s| Server::new(s, router_tx.clone(), V5);
        let (v4_addr, v4_task, v4_in_process) =
            start_listener(v4, ProtocolVersion::V3_1_1, settings, &login).await?;
        listeners.push(v4_task);
        let (v5_addr, v5_task, v5_in_process) =
            match start_listener(v5, ProtocolVersion::V5, settings, &login).await {
                Ok(started) => started,
                Err(e) => {
                    listeners.iter().for_each(JoinHandle::abort);
                    return Err(e);
                }
            };
        listeners.push(v5_task);
        let upstreams = Upstreams {
            v4: v4_in_process,
            v5: v5_in_process,
            login: Arc::clone(&login),
        };
        Ok(Self {
            v4_addr,
            v5_addr,
            login,
            listeners,
            pressure,
            links,
            upstreams,
        })
    }

    /// What the router says about its subscribers: `held` while a connected QoS 1/2 subscriber is
    /// close to losing messages it has not read (rumqttd's log per filter drops its oldest segment
    /// whether or not it was read), and how many messages subscribers lost. A publisher that stops
    /// while `held` is set keeps its subscribers from losing anything: the hub's does
    /// (`cloud-hub/src/publisher.rs`), which moves the wait back to the agents' disk queues.
    #[must_use]
    pub fn pressure(&self) -> Arc<SubscriberPressure> {
        Arc::clone(&self.pressure)
    }

    /// Opens in-process connections to this broker's router.
    #[must_use]
    pub fn local_links(&self) -> LocalLinks {
        self.links.clone()
    }

    /// The listeners' in-process entrances and login, in the form the front takes.
    #[must_use]
    pub fn upstreams(&self) -> Upstreams {
        self.upstreams.clone()
    }

    /// The login the program's own clients present on the internal listeners.
    #[must_use]
    pub fn login(&self) -> &InternalLogin {
        &self.login
    }

    /// Stops accepting connections and waits for the listener tasks to end.
    pub async fn stop(mut self) {
        for task in std::mem::take(&mut self.listeners) {
            task.abort();
            // A cancelled JoinError is the expected outcome of abort.
            let _ = task.await;
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.listeners.iter().for_each(JoinHandle::abort);
    }
}

fn reserve_port() -> Result<SocketAddr, EmbeddedError> {
    let listener = StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|source| EmbeddedError::ReservePort { source })?;
    listener
        .local_addr()
        .map_err(|source| EmbeddedError::ReservePort { source })
}

fn server_settings(
    name: String,
    listen: SocketAddr,
    settings: &EmbeddedSettings,
    login: &InternalLogin,
) -> ServerSettings {
    let connection_timeout_ms =
        u16::try_from(settings.connect_timeout.as_millis()).unwrap_or(u16::MAX);
    ServerSettings {
        name,
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms,
            max_payload_size: settings.max_packet_size,
            max_inflight_count: settings.max_inflight_count,
            auth: Some(HashMap::from([(
                INTERNAL_USER.to_owned(),
                login.secret.clone(),
            )])),
            external_auth: None,
            dynamic_filters: true,
        },
    }
}

async fn start_listener<P>(
    new_server: impl Fn(ServerSettings) -> Server<P>,
    version: ProtocolVersion,
    settings: &EmbeddedSettings,
    login: &InternalLogin,
) -> Result<(SocketAddr, JoinHandle<()>, InProcessAcceptor), EmbeddedError>
where
    P: Protocol + Clone + Send + Sync + 'static,
{
    for attempt in 1..=START_ATTEMPTS {
        let addr = reserve_port()?;
        let name = format!("meshbridge-internal-{}", version.level());
        let mut server = new_server(server_settings(name, addr, settings, login));
        let in_process = server.in_process();
        let task = tokio::spawn(async move {
            if let Err(error) = server.start(LinkType::Remote).await {
                warn!(?error, %addr, "embedded broker listener ended");
            }
        });
        match probe(addr, version, login, &task).await {
            Ok(()) => {
                debug!(%addr, ?version, "embedded broker listener ready");
                return Ok((addr, task, in_process));
            }
            Err(error) => {
                warn!(%error, %addr, attempt, ?version, "embedded broker listener not ready; retrying");
                task.abort();
            }
        }
    }
    Err(EmbeddedError::ListenerNotReady {
        version,
        attempts: START_ATTEMPTS,
    })
}

/// Connects to `addr`, sends a CONNECT for `version` and expects a successful CONNACK, so we know our
/// rumqttd listener (not some other process that took the port) is there.
async fn probe(
    addr: SocketAddr,
    version: ProtocolVersion,
    login: &InternalLogin,
    task: &JoinHandle<()>,
) -> io::Result<()> {
    tokio::time::timeout(PROBE_DEADLINE, async {
        let mut stream = loop {
            if task.is_finished() {
                return Err(io::Error::other("listener task ended (bind failed?)"));
            }
            match TcpStream::connect(addr).await {
                Ok(stream) => break stream,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(e),
            }
        };
        stream
            .write_all(&probe_connect(version, addr.port(), login)?)
            .await?;
        let mut buf = BytesMut::with_capacity(64);
        let len = loop {
            match mqtt::frame_len(&buf, 1024) {
                Ok(len) => break len,
                Err(mqtt::DecodeError::Incomplete) => {
                    if stream.read_buf(&mut buf).await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        };
        // CONNACK: 0x20, length, session-present flags, return/reason code (0 = accepted).
        if len < 4 || buf[0] != 0x20 || buf[3] != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "probe CONNECT was not accepted",
            ));
        }
        stream.write_all(&[0xe0, 0x00]).await?; // DISCONNECT
        if task.is_finished() {
            return Err(io::Error::other("listener task ended"));
        }
        Ok(())
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// A clean-session CONNECT with client id `meshbridge-probe-<port>`, keep-alive 10 s and the internal
/// login.
fn probe_connect(
    version: ProtocolVersion,
    port: u16,
    login: &InternalLogin,
) -> io::Result<BytesMut> {
    let id = format!("meshbridge-probe-{port}");
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', version.level(), 0x02, 0, 10];
    if version.has_properties() {
        body.push(0); // empty property block
    }
    let id_len = u16::try_from(id.len()).expect("invariant: probe client id is short");
    body.extend_from_slice(&id_len.to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut packet = vec![
        0x10,
        u8::try_from(body.len()).expect("invariant: probe CONNECT < 128 bytes"),
    ];
    packet.extend_from_slice(&body);
    mqtt::replace_connect_login(&packet, login.user().as_bytes(), login.secret().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}
