//! edge-agent: wraps a site's MQTT broker, queues selected messages durably and streams them to the cloud hub
//! over QUIC + mutual TLS.
//!
//! # Layout
//! - [`run`]: wires the pieces together and owns shutdown.
//! - `local`: where messages come in: the embedded broker behind the ack-holding front, or an external
//!   broker joined with manual acks.
//! - `ingest`: group commit into the durable queue; publishers/brokers are acknowledged only after it.
//! - `uplink`: the QUIC link to the hub, reading the queue forward with a window of unacknowledged
//!   batches, reconnecting with backoff.
//! - [`tls`]: rustls configurations (uplink mTLS, external broker TLS).
//!
//! # Data flow and guarantees
//! publisher → (front | external client) → ingest → `RedbQueue::append` (durable) → ack to the publisher or
//! broker → uplink reads the queue → hub → `Ack{upto}` → `RedbQueue::ack_upto` (deleted). A message is deleted
//! only once the hub has it; an acknowledged message survives `kill -9` of the agent.

pub mod bootstrap;
pub mod dead_letters;
pub mod error;
mod events;
pub mod hangup;
pub mod tls;

mod ingest;
mod lanes;
pub mod limits;
mod local;
mod metrics;
mod pushed;
mod routes;
mod status;
mod traced;
mod uplink;

use std::sync::Arc;
use std::time::Duration;

use meshbridge_broker::sessions::{RetainedLookup, Sessions};
use shared::config::{AgentConfig, BrokerConfig};
use shared::queue::{
    Queue, QueueStats, RedbQueue, RetainedLimits, RetainedStore, SessionLimits, SessionStore,
};
use shared::topic::TopicFilter;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

pub use error::AgentError;

use crate::ingest::{now_ms, Ingest};
use crate::lanes::Lanes;
use crate::routes::LiveRoutes;
use crate::uplink::Uplink;

/// File name of the durable queue inside `data_dir`.
pub const QUEUE_FILE: &str = "queue.redb";
/// The embedded broker's retained messages in `data_dir` (see `shared::queue::RetainedStore`).
pub const RETAINED_FILE: &str = "retained.redb";
/// The embedded broker's persistent sessions, in the data directory (`shared::queue::SessionStore`).
pub const SESSIONS_FILE: &str = "sessions.redb";
/// The dead-letter store's file in `data_dir`: messages refused for good (by the cloud broker, or too large
/// for the path), listed and replayed with `edge-agent dead-letters`.
pub const DEAD_LETTERS_FILE: &str = "dead-letters.redb";

/// How often old messages are expired (`queue.max_age`) and the queue's state is logged at debug.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);

/// Runs the agent until `shutdown` is cancelled, then shuts down in order: stop taking messages, finish
/// the commits already taken, wait (up to `uplink.shutdown_timeout`) for in-flight batches to be
/// acknowledged, close the link.
///
/// Logs one `info!` line with the message `ready` once MQTT clients can connect (embedded mode: fields
/// `listen`, `site`, `mode = "embedded"`; external mode: after the first connection to the broker, fields
/// `broker`, `site`, `mode = "external"`).
///
/// # Errors
/// [`AgentError`] when something needed cannot be set up (data directory, queue, TLS files, listen address)
/// or the local broker side fails for good. An unreachable or refusing hub is not an error: the agent keeps
/// queueing and retrying.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    std::fs::create_dir_all(&cfg.data_dir).map_err(|source| AgentError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let metrics = Arc::new(metrics::AgentMetrics::new());
    // Bound before anything else starts, so a bad address stops the agent at once.
    let metrics_listener = match cfg.metrics.listen {
        Some(addr) => Some(meshbridge_metrics::bind(addr).await?),
        None => None,
    };
    let dir = cfg.data_dir.clone();
    let limits = cfg.queue.limits();
    let lane_metrics = Arc::clone(&metrics);
    let lanes =
        tokio::task::spawn_blocking(move || Lanes::open_blocking(&dir, limits, lane_metrics))
            .await
            .map_err(|source| AgentError::TaskPanicked {
                task: "queue open",
                source,
            })??;
    let lanes = Arc::new(lanes);
    let limits = limits::load(&cfg);
    let (routes, version) = pushed::initial_routes(&cfg.data_dir, &cfg.site, &cfg.routes)?;
    let routes = Arc::new(LiveRoutes::new(routes, version));
    let transport = tls::ClientTransport {
        idle_timeout: cfg.uplink.idle_timeout,
        keep_alive_interval: Some(cfg.uplink.keep_alive),
        ..tls::ClientTransport::default()
    };
    let expiry = metrics.certificate_expiry();
    certificate_in_force(&cfg.uplink.cert, &expiry, "in use");
    let hook: meshbridge_tls::server::ReloadHook = Arc::new(move |reloaded| match reloaded {
        Ok(path) => certificate_in_force(
            path,
            &expiry,
            "renewed: presented from the next connection on",
        ),
        Err(cause) => {
            warn!(%cause, "the site certificate's files changed but do not load; the running pair stays");
        }
    });
    let client_config = tls::client_config(
        &cfg.uplink.ca,
        &cfg.uplink.cert,
        &cfg.uplink.key,
        &transport,
        hook,
    )
    .map_err(AgentError::UplinkTls)?;
    let site: Arc<str> = Arc::from(cfg.site.as_str());
    let pushed = Arc::new(pushed::Pushed::new(
        &cfg.data_dir,
        &cfg.site,
        Arc::clone(&routes),
    ));
    let (downlink_target, downlink_target_rx) = tokio::sync::watch::channel(None);
    let (retained, sessions) = match &cfg.broker {
        BrokerConfig::Embedded(embedded) => {
            let (retained, sessions) = open_broker_state(&cfg.data_dir, embedded).await?;
            (Some(retained), Some(sessions))
        }
        BrokerConfig::External(_) => (None, None),
    };
    let retained_refused: Arc<std::sync::atomic::AtomicU64> = Arc::default();
    let ingest = Ingest {
        lanes: Arc::clone(&lanes),
        downlink_target: Arc::new(downlink_target),
        routes: Arc::clone(&routes),
        site: Arc::clone(&site),
        limits: Arc::clone(&limits),
        max_group_bytes: ingest::group_budget(cfg.queue.max_bytes.as_u64()),
        retained: retained.clone(),
        retained_refused: Arc::clone(&retained_refused),
        sessions: sessions.clone(),
        auth_counters: metrics.auth_counters(),
    };

    let tracker = TaskTracker::new();
    // The uplink outlives the local side: it is stopped only after the last commit, so it can drain.
    let uplink_stop = CancellationToken::new();
    let housekeeping_stop = CancellationToken::new();
    let uplinks: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
    let for_status = (
        Arc::clone(&pushed),
        downlink_target_rx.clone(),
        Arc::clone(&lanes),
    );
    let for_metrics = (
        Arc::clone(&lanes),
        Arc::clone(&limits),
        retained.clone(),
        sessions.clone(),
        Arc::clone(&routes),
    );
    {
        let uplink_cfg = cfg.uplink.clone();
        let agent_name: Arc<str> = Arc::from(cfg.agent_name.as_deref().unwrap_or(&cfg.site));
        let busy = Arc::new(tokio::sync::watch::Sender::new(0u16));
        let data_dir = cfg.data_dir.clone();
        let tracker = tracker.clone();
        let stop = uplink_stop.clone();
        let uplinks = Arc::clone(&uplinks);
        let all = Arc::downgrade(&lanes);
        lanes.start(Box::new(move |lane| {
            info!(lane = lane.lane, "starting the lane's uplink");
            let uplink = Uplink::new(
                uplink_cfg.clone(),
                Arc::clone(&agent_name),
                &lane,
                all.clone(),
                Arc::clone(&busy),
                client_config.clone(),
                data_dir.clone(),
                uplink::FromHub {
                    limits: Arc::clone(&limits),
                    pushed: Arc::clone(&pushed),
                    delivery: local::deliver::Delivery::new(
                        downlink_target_rx.clone(),
                        lane.lane,
                        retained.clone(),
                        sessions.clone(),
                    ),
                },
            );
            let task = tracker.spawn(uplink.run(stop.clone()));
            uplinks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(task);
        }));
    }
    tracker.spawn(keep_lanes_open(
        Arc::clone(&lanes),
        routes,
        housekeeping_stop.clone(),
    ));
    tracker.spawn(housekeeping(Arc::clone(&lanes), housekeeping_stop.clone()));
    if cfg.status.enabled {
        let (pushed, target, lanes) = for_status;
        let identity = status::Identity {
            site: cfg.site.clone(),
            agent_name: cfg.agent_name.clone().unwrap_or_else(|| cfg.site.clone()),
            hub: cfg.uplink.hub.to_string(),
        };
        tracker.spawn(status::run(
            identity,
            lanes,
            pushed,
            target,
            cfg.status.interval,
            housekeeping_stop.clone(),
        ));
    }
    if let Some(listener) = metrics_listener {
        let (lanes, limits, retained, sessions, routes) = for_metrics;
        let render: meshbridge_metrics::Render = Arc::new(move || {
            metrics.render(
                &lanes,
                &limits,
                retained.as_ref(),
                &retained_refused,
                sessions.as_ref(),
                routes.version(),
            )
        });
        tracker.spawn(meshbridge_metrics::serve(
            listener,
            render,
            housekeeping_stop.clone(),
        ));
    }
    tracker.close();

    let local = match &cfg.broker {
        BrokerConfig::Embedded(embedded) => local::embedded::run(embedded, ingest, shutdown).await,
        BrokerConfig::External(external) => local::external::run(external, ingest, shutdown).await,
    };
    debug!("local side stopped; draining the uplink");
    // The lanes the local side no longer needs stop opening before the uplinks stop (a lane opened after
    // would have nothing to drain).
    housekeeping_stop.cancel();
    uplink_stop.cancel();
    let tasks = std::mem::take(
        &mut *uplinks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    let mut uplink_joined = Ok(());
    for task in tasks {
        if let Err(source) = task.await {
            uplink_joined = Err(AgentError::TaskPanicked {
                task: "uplink",
                source,
            });
        }
    }
    tracker.wait().await;
    for lane in lanes.all() {
        let stats = lane.queue.stats();
        info!(
            lane = lane.lane,
            depth = stats.depth,
            acked = stats.acked,
            "stopped"
        );
    }
    local?;
    uplink_joined
}

/// Opens the lanes each config in force needs (the hub's pushed config lists the lanes it delivers on),
/// so a lane's connection is up before its first message, in either direction.
async fn keep_lanes_open(lanes: Arc<Lanes>, routes: Arc<LiveRoutes>, stop: CancellationToken) {
    let mut version = routes.subscribe();
    loop {
        for &lane in routes.load().lanes() {
            if let Err(cause) = lanes.ensure(lane).await {
                error!(lane, %cause, "cannot open a priority lane; its messages are refused until it opens");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = version.changed() => if changed.is_err() { return },
        }
    }
}

/// How long a publisher mark (client id + packet id of a committed QoS 1/2 PUBLISH) is kept to recognise a
/// resend: publishers resend right after reconnecting, so ten minutes covers an agent restart with room.
const MARK_RETENTION_MS: u64 = 10 * 60 * 1000;

/// Expires messages older than `queue.max_age`, forgets old publisher marks and logs each lane's state,
/// every [`HOUSEKEEPING_INTERVAL`].
async fn housekeeping(lanes: Arc<Lanes>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for lane in lanes.all() {
            housekeep(lane.lane, &lane.queue).await;
        }
    }
}

async fn housekeep(lane: u8, queue: &Arc<RedbQueue>) {
    {
        let q = Arc::clone(queue);
        match tokio::task::spawn_blocking(move || q.expire(now_ms())).await {
            Ok(Ok(0)) => {}
            Ok(Ok(expired)) => warn!(
                lane,
                expired, "dropped queued messages older than queue.max_age (never delivered)"
            ),
            Ok(Err(cause)) => warn!(%cause, "expiring old messages failed"),
            Err(cause) => warn!(%cause, "expiry task panicked"),
        }
        let q = Arc::clone(queue);
        let before = now_ms().saturating_sub(MARK_RETENTION_MS);
        match tokio::task::spawn_blocking(move || q.forget_marks(before)).await {
            Ok(Ok(forgotten)) => debug!(forgotten, "old publisher marks forgotten"),
            Ok(Err(cause)) => warn!(%cause, "forgetting old publisher marks failed"),
            Err(cause) => warn!(%cause, "mark cleanup task panicked"),
        }
        log_stats(lane, &queue.stats());
    }
}

fn log_stats(lane: u8, stats: &QueueStats) {
    debug!(
        lane,
        depth = stats.depth,
        bytes = stats.bytes,
        file_bytes = stats.file_bytes,
        oldest_age = ?stats.oldest_age(now_ms()),
        acked = stats.acked,
        dropped = stats.dropped,
        expired = stats.expired,
        "queue"
    );
}

/// Opens the embedded broker's retained store and persistent sessions (blocking work off the workers).
async fn open_broker_state(
    data_dir: &std::path::Path,
    cfg: &shared::config::EmbeddedBroker,
) -> Result<(Arc<RetainedStore>, Arc<Sessions>), AgentError> {
    let retained_path = data_dir.join(RETAINED_FILE);
    let sessions_path = data_dir.join(SESSIONS_FILE);
    let retained_limits = RetainedLimits {
        max_messages: cfg.max_retained_messages,
        max_bytes: cfg.max_retained_bytes.as_u64(),
    };
    let session_limits = SessionLimits {
        max_messages: cfg.max_queued_messages,
        max_bytes: cfg.max_queued_bytes.as_u64(),
    };
    let opened = tokio::task::spawn_blocking(move || {
        let retained =
            RetainedStore::open(retained_path, retained_limits).map_err(AgentError::Retained)?;
        let sessions =
            SessionStore::open(sessions_path, session_limits).map_err(AgentError::Sessions)?;
        Ok::<_, AgentError>((Arc::new(retained), Arc::new(sessions)))
    })
    .await
    .map_err(|source| AgentError::TaskPanicked {
        task: "broker state open",
        source,
    })??;
    let (retained, store) = opened;
    let (stored, bytes) = retained.stats();
    info!(stored, bytes, "retained store opened");
    let lookup_store = Arc::clone(&retained);
    let lookup: RetainedLookup = Arc::new(move |filter: &TopicFilter| {
        let rows = match lookup_store.all() {
            Ok(rows) => rows,
            Err(cause) => {
                warn!(%cause, "cannot read the retained store for a new subscription");
                return Vec::new();
            }
        };
        rows.into_iter()
            .filter(|(topic, _)| filter.matches_str(topic))
            .filter_map(|(_, body)| shared::envelope::Envelope::decode_body(0, body).ok())
            .map(|e| local::deliver::envelope_publish(&e, e.properties.message_expiry))
            .collect()
    });
    let sessions = tokio::task::spawn_blocking(move || Sessions::open(store, Some(lookup)))
        .await
        .map_err(|source| AgentError::TaskPanicked {
            task: "sessions open",
            source,
        })?
        .map_err(AgentError::Sessions)?;
    Ok((retained, sessions))
}

/// Logs the site certificate in `path` (serial and expiry; a warning when it expires within
/// [`meshbridge_tls::EXPIRY_WARNING`]) and sets the expiry gauge. A file that does not parse here was
/// already refused by the TLS loader, which reports why.
fn certificate_in_force(
    path: &std::path::Path,
    expiry: &prometheus_client::metrics::gauge::Gauge,
    what: &str,
) {
    let Some((facts, left)) = meshbridge_tls::server::certificate_file_expiry(path) else {
        return;
    };
    expiry.set(facts.not_after);
    let (days, serial) = (left / 86_400, facts.serial_hex());
    if left < meshbridge_tls::EXPIRY_WARNING_SECS {
        warn!(cert = %path.display(), %serial, days, "the site certificate expires soon ({what}); renew it with `cloud-hub pki renew-site`");
    } else {
        info!(cert = %path.display(), %serial, days, "site certificate {what}");
    }
}
