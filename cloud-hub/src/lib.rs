//! cloud-hub: accepts agents over QUIC + mutual TLS, identifies each site by its client certificate, and publishes
//! their messages into the cloud broker under the site's namespace.
//!
//! # Layout
//! - [`run`]: starts everything from a [`HubConfig`] and serves until the shutdown token is cancelled.
//! - `accept`: the QUIC accept loop: the handshake gate (Retry, per-source limits), then the connection cap.
//! - [`crl`], `revocation`: revoked site certificates, and following the revocation list while running.
//! - `agent_conn`: one agent connection (handshake checks, Hello/Welcome, the batch → publish → ack pipeline).
//! - `publisher`: the MQTT 5 client into the cloud broker, with one completion per batch.
//! - `cloud_broker`: the embedded cloud broker (rumqttd + front) or the external broker's client options.
//! - [`store`]: dedup state persisted in redb (`data_dir/hub.redb`).
//! - `endpoint_key`: the QUIC endpoint's secret (`data_dir/quic-endpoint.key`), kept across restarts so a
//!   restarted hub resets the agents' old connections at once.
//! - [`pki`], [`tls`]: the private CA, certificates, and the QUIC server's TLS.
//!
//! # Guarantees
//! An `Ack{upto}` is sent only after every message of the batch was accepted by the cloud broker (PUBACK for
//! QoS 1, PUBCOMP for QoS 2, written for QoS 0) *and* the site's dedup state recording those seqs was committed.
//! So a restarted hub drops every replay of something it acknowledged, and nothing acknowledged is missing from
//! the broker (as far as the broker itself keeps it: the embedded rumqttd keeps nothing on disk).

mod accept;
mod agent_conn;
mod cloud_broker;
pub mod crl;
mod downlink;
mod endpoint_key;
mod error;
mod events;
mod metrics;
pub mod pki;
mod publisher;
mod reload;
mod revocation;
pub mod site;
mod sites;
mod status;
pub mod store;
pub mod tls;
mod traced;

use std::fs;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::Endpoint;
use shared::config::{BrokerConfig, HubConfig};
use shared::policy::admission::GateLimits;
use shared::policy::route::RouteTable;
use shared::policy::route_dedup::{RouteDedups, RouteDedupsSnapshot};
use shared::queue::QueueLimits;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use agent_conn::MESHBRIDGE_ID;
pub use error::HubError;
pub use publisher::PublishError;

use agent_conn::{Hub, Stops};
use cloud_broker::RunningEmbedded;
use downlink::DownlinkStore;
use publisher::Publisher;
use store::DedupStore;

/// How long the hub waits for its own client to connect to the embedded cloud broker at startup.
const EMBEDDED_CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long it waits for an external cloud broker before serving anyway (batches then fail until it is up).
const EXTERNAL_CONNECT_WAIT: Duration = Duration::from_secs(5);
/// At shutdown, how long the closed QUIC endpoint may take to finish closing its connections.
const ENDPOINT_IDLE_WAIT: Duration = Duration::from_secs(3);
/// After shutdown starts, how long connections may spend draining in-flight batches.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Runs the hub until `shutdown` is cancelled, then shuts down gracefully: stops accepting, lets each
/// connection finish its in-flight batches (acks and dedup persisted, bounded by a deadline), sends
/// `GoAway{ShuttingDown}`, disconnects from the cloud broker and waits for the QUIC endpoint to go idle.
///
/// Logs `info!` "ready" (fields `quic`, `broker`) once agents can connect and, with an embedded cloud broker,
/// once its MQTT port accepts clients.
///
/// # Errors
/// [`HubError`] when something needed at startup is unusable (data dir, dedup store, TLS files, ports, the
/// embedded broker), or when the embedded broker's client port fails while running.
pub async fn run(cfg: HubConfig, shutdown: CancellationToken) -> Result<(), HubError> {
    run_reloading(None, cfg, shutdown).await
}

/// [`run`], also reloading the config from `config_file` (when given) on SIGHUP and when the file
/// changes: routes take effect live, a config that fails validation is refused with every problem logged
/// and the running one stays (see `reload.rs`).
///
/// # Errors
/// As [`run`].
pub async fn run_reloading(
    config_file: Option<std::path::PathBuf>,
    cfg: HubConfig,
    shutdown: CancellationToken,
) -> Result<(), HubError> {
    fs::create_dir_all(&cfg.data_dir).map_err(|source| HubError::DataDir {
        path: cfg.data_dir.clone(),
        source,
    })?;
    let data_dir = cfg.data_dir.clone();
    let (store, restored, refusals) = tokio::task::spawn_blocking(move || {
        let (store, restored) = DedupStore::open(&data_dir)?;
        let refusals = store.refusals()?;
        Ok::<_, store::StoreError>((store, restored, refusals))
    })
    .await
    .map_err(|e| HubError::Store(store::StoreError::Join(e)))??;

    let metrics = Arc::new(metrics::HubMetrics::new());
    // Bound before anything else starts, so a bad address stops the hub at once.
    let metrics_listener = match cfg.metrics.listen {
        Some(addr) => Some(meshbridge_metrics::bind(addr).await?),
        None => None,
    };
    let sites = Arc::new(sites::Sites::new(
        &cfg,
        restored,
        refusals,
        Arc::clone(&metrics),
    )?);

    let tls_files = revocation::TlsFiles {
        ca: cfg.tls.ca.clone(),
        cert: cfg.tls.cert.clone(),
        key: cfg.tls.key.clone(),
        crl: cfg.tls.crl.clone(),
    };
    let crl = tls_files.load_crl()?;
    let server_config = tls_files.server_config(crl.as_ref())?;
    own_certificate_expiry(&cfg.tls.cert);
    let max_message_size = cfg.limits.max_message_size.as_usize();

    let tracker = TaskTracker::new();
    let publisher_stop = CancellationToken::new();
    let (mut embedded, publisher) = match &cfg.broker {
        BrokerConfig::Embedded(config) => {
            let running =
                RunningEmbedded::start(config, max_message_size, metrics.auth_counters()).await?;
            let pressure = running.pressure();
            metrics.watch_pressure(Some(Arc::clone(&pressure)));
            let (links, client_id) = running.publisher_links();
            // An eighth of the log per filter: the router holds with half of it left
            // (`cloud-hub/src/publisher/local.rs`).
            let publisher = Publisher::spawn_local(
                links,
                client_id,
                pressure,
                config.max_log_per_filter.as_usize() / 8,
                &tracker,
                publisher_stop.clone(),
            );
            (Some(running), publisher)
        }
        BrokerConfig::External(external) => {
            let options = cloud_broker::external_options(external)?;
            (
                None,
                Publisher::spawn(options, &tracker, publisher_stop.clone()),
            )
        }
    };

    // Routes: compiled once here (the config was validated at load), swapped whole on a reload.
    let table = RouteTable::new(&cfg).map_err(|errors| HubError::Routes {
        errors: errors.iter().map(ToString::to_string).collect(),
    })?;
    let route_dedups = match store.load_route_dedup() {
        Ok(Some(bytes)) => match RouteDedupsSnapshot::decode(&bytes) {
            Ok(snapshot) => RouteDedups::restore(&snapshot, |r| table.dedup_config(r)),
            Err(e) => {
                warn!(cause = %e, "the routes' saved dedup state is unreadable; starting empty");
                RouteDedups::new()
            }
        },
        Ok(None) => RouteDedups::new(),
        Err(e) => {
            warn!(cause = %e, "cannot read the routes' saved dedup state; starting empty");
            RouteDedups::new()
        }
    };
    let (routes_tx, routes) = watch::channel(Arc::new(table));
    let dedups = Arc::new(Mutex::new(route_dedups));
    // Writes the sites' dedup rows in one durable commit every 100 ms (`store.rs` says why the Acks need not
    // wait for it); the last flush runs after the connections drained, when `publisher_stop` is cancelled.
    tracker.spawn(sites::flush_until(
        Arc::clone(&sites),
        store.clone(),
        publisher_stop.clone(),
    ));
    tracker.spawn(save_route_dedups(
        store.clone(),
        Arc::clone(&dedups),
        publisher_stop.clone(),
    ));
    let downlinks = Arc::new(DownlinkStore::new(
        &cfg.data_dir.join("downlink"),
        QueueLimits {
            max_bytes: cfg.downlink.max_bytes.0,
            max_age: Some(cfg.downlink.max_age),
            full_policy: cfg.downlink.full_policy,
        },
    ));
    {
        let store = Arc::clone(&downlinks);
        let names: Vec<String> = cfg.sites.iter().map(|s| s.name.clone()).collect();
        let opened = tokio::task::spawn_blocking(move || store.open_lanes_blocking(&names))
            .await
            .map_err(HubError::Join)??;
        if opened > 0 {
            info!(opened, "opened the downlink queues of priority lanes");
        }
    }
    let subscriber_options = match (&cfg.broker, &embedded) {
        (_, Some(running)) => running.subscriber_options(),
        (BrokerConfig::External(external), None) => {
            cloud_broker::external_subscriber_options(external)?
        }
        (BrokerConfig::Embedded(_), None) => {
            unreachable!("an embedded broker config always starts one")
        }
    };
    if let Some(path) = config_file {
        tracker.spawn(reload::follow(
            path,
            cfg.clone(),
            (routes_tx.clone(), Arc::clone(&sites)),
            publisher_stop.clone(),
        ));
    }
    downlink::spawn_subscriber(
        subscriber_options,
        routes.clone(),
        Arc::clone(&dedups),
        Arc::clone(&downlinks),
        &tracker,
        publisher_stop.clone(),
    );
    let served = serve(
        &cfg,
        (server_config, tls_files),
        &publisher,
        embedded.as_mut(),
        Routing {
            sites,
            routes,
            dedups,
            downlinks,
            metrics: (metrics, metrics_listener),
        },
        &shutdown,
    )
    .await;

    publisher_stop.cancel();
    drop(routes_tx);
    tracker.close();
    tracker.wait().await;
    let stopped = match embedded {
        Some(embedded) => embedded.stop().await,
        None => Ok(()),
    };
    info!("stopped");
    served.and(stopped)
}

/// Waits for the cloud broker, binds the QUIC endpoint, accepts agents until shutdown, then drains.
/// How often the routes' dedup sets are saved (when they changed): a hub crash forgets at most this much
/// of what they had seen, so a duplicate within that time may pass once.
const ROUTE_DEDUP_SAVE: Duration = Duration::from_secs(1);

/// How often the routes' dedup counters are logged (when they changed), until metrics export them.
const ROUTE_DEDUP_REPORT: Duration = Duration::from_secs(10);

/// Saves the routes' dedup sets every [`ROUTE_DEDUP_SAVE`] while they change, and once more at `stop`;
/// logs their counters (what each route passed and dropped) every [`ROUTE_DEDUP_REPORT`] when they
/// changed, and at `stop`.
async fn save_route_dedups(
    store: DedupStore,
    dedups: Arc<Mutex<RouteDedups>>,
    stop: CancellationToken,
) {
    let mut last: Vec<u8> = Vec::new();
    let mut reported = Vec::new();
    let mut last_report = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(ROUTE_DEDUP_SAVE);
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let (snapshot, stats) = {
            let dedups = dedups
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (dedups.snapshot().encode(), dedups.stats())
        };
        if stats != reported && (stopping || last_report.elapsed() >= ROUTE_DEDUP_REPORT) {
            for (route, s) in &stats {
                info!(
                    %route,
                    passed = s.passed,
                    dropped = s.dropped,
                    unkeyed = s.unkeyed,
                    forgotten_early = s.forgotten_early,
                    "route dedup counters"
                );
            }
            reported = stats;
            last_report = tokio::time::Instant::now();
        }
        if snapshot != last {
            let saving = store.clone();
            let bytes = snapshot.clone();
            match tokio::task::spawn_blocking(move || saving.save_route_dedup_blocking(&bytes))
                .await
            {
                Ok(Ok(())) => last = snapshot,
                Ok(Err(e)) => warn!(cause = %e, "cannot save the routes' dedup state"),
                Err(e) => warn!(cause = %e, "saving the routes' dedup state failed"),
            }
        }
        if stopping {
            return;
        }
    }
}

/// The sites and what the connections route by.
struct Routing {
    sites: Arc<sites::Sites>,
    routes: watch::Receiver<Arc<RouteTable>>,
    dedups: Arc<Mutex<RouteDedups>>,
    downlinks: Arc<DownlinkStore>,
    /// The metrics, and where to serve them if configured.
    metrics: (Arc<metrics::HubMetrics>, Option<tokio::net::TcpListener>),
}

async fn serve(
    cfg: &HubConfig,
    (server_config, tls_files): (quinn::ServerConfig, revocation::TlsFiles),
    publisher: &Publisher,
    mut embedded: Option<&mut RunningEmbedded>,
    routing: Routing,
    shutdown: &CancellationToken,
) -> Result<(), HubError> {
    let Routing {
        sites,
        routes,
        dedups,
        downlinks,
        metrics: (metrics, metrics_listener),
    } = routing;
    match &embedded {
        Some(_) => {
            if !publisher.wait_connected(EMBEDDED_CONNECT_WAIT).await {
                return Err(HubError::BrokerNotReady {
                    waited: EMBEDDED_CONNECT_WAIT,
                });
            }
        }
        None => {
            if !publisher.wait_connected(EXTERNAL_CONNECT_WAIT).await {
                warn!(
                    waited = ?EXTERNAL_CONNECT_WAIT,
                    "the external cloud broker is not reachable yet; agents are refused (Unavailable, retry after 1 s) until it is"
                );
            }
        }
    }

    let endpoint_config = endpoint_key::endpoint_config(&cfg.data_dir)?;
    let bind_error = |source| HubError::QuicBind {
        addr: cfg.listen.quic,
        source,
    };
    let socket = std::net::UdpSocket::bind(cfg.listen.quic).map_err(bind_error)?;
    let endpoint = Endpoint::new(
        endpoint_config,
        Some(server_config),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)?;
    let quic = endpoint.local_addr().map_err(|source| HubError::QuicBind {
        addr: cfg.listen.quic,
        source,
    })?;
    let hub = Arc::new(Hub::new(
        sites,
        publisher.clone(),
        (
            cfg.limits.max_frame_size.as_usize(),
            cfg.limits.max_message_size.as_usize(),
            cfg.downlink.ack_timeout,
            shared::wire::VersionRange::supported_up_to(cfg.listen.max_protocol_version),
        ),
        (routes, dedups, downlinks),
    ));
    let accept_counters = metrics.accept();
    if let Some(listener) = metrics_listener {
        let hub = Arc::clone(&hub);
        let render: meshbridge_metrics::Render = Arc::new(move || metrics.render(&hub));
        tokio::spawn(meshbridge_metrics::serve(
            listener,
            render,
            shutdown.clone(),
        ));
    }
    let status_stop = CancellationToken::new();
    let status_task = cfg.status.enabled.then(|| {
        tokio::spawn(status::run(
            Arc::clone(&hub),
            cfg.status.interval,
            status_stop.clone(),
        ))
    });
    let broker = match (&embedded, &cfg.broker) {
        (Some(e), _) => format!("mqtt://{}", e.listen),
        (None, BrokerConfig::External(x)) => format!("external {}", x.address),
        (None, BrokerConfig::Embedded(e)) => format!("mqtt://{}", e.listen),
    };
    info!(%quic, %broker, sites = cfg.sites.len(), "ready");
    if cfg.sites.is_empty() {
        warn!("no sites are configured yet: every agent is refused until one is added (`cloud-hub site add NAME`)");
    }
    meshbridge_metrics::systemd::ready(&format!("QUIC on {quic}, cloud broker {broker}"));

    let stops = Stops {
        shutdown: shutdown.child_token(),
        hard: CancellationToken::new(),
    };
    let connections = TaskTracker::new();
    connections.spawn(revocation::follow(
        tls_files,
        endpoint.clone(),
        Arc::clone(&hub),
        stops.shutdown.clone(),
    ));
    let listen = &cfg.listen;
    let limits = accept::AcceptLimits {
        max_connections: usize::try_from(listen.max_connections).unwrap_or(usize::MAX),
        gate: GateLimits::new(
            usize::try_from(listen.max_handshakes).unwrap_or(usize::MAX),
            usize::try_from(listen.retry_above).unwrap_or(usize::MAX),
            usize::try_from(listen.max_handshakes_per_source).unwrap_or(usize::MAX),
        )
        .map_err(HubError::Admission)?,
        handshake_timeout: listen.handshake_timeout,
    };
    let accepting = accept::accept_loop(
        &endpoint,
        &hub,
        limits,
        accept_counters,
        &stops,
        &connections,
    );
    let result = match embedded.as_mut() {
        Some(embedded) => {
            tokio::select! {
                () = accepting => Ok(()),
                front = embedded.front_task() => match front {
                    Ok(Err(error)) => Err(HubError::Front(error)),
                    // Ended without error (only on its own stop) or panicked: nothing to add.
                    Ok(Ok(())) | Err(_) => Ok(()),
                },
            }
        }
        None => {
            accepting.await;
            Ok(())
        }
    };

    // Shutdown: no new agents; every connection drains, then says GoAway.
    endpoint.set_server_config(None);
    stops.shutdown.cancel();
    connections.close();
    if tokio::time::timeout(DRAIN_DEADLINE, connections.wait())
        .await
        .is_err()
    {
        warn!(deadline = ?DRAIN_DEADLINE, "agent connections did not drain in time; abandoning in-flight batches");
        stops.hard.cancel();
        connections.wait().await;
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"hub stopped");
    // Bounded, as in the agent (`edge-agent/src/uplink.rs`): the wait only lets closing connections
    // repeat their CONNECTION_CLOSE. In the bench's crash scenario, after a restarted agent abandoned a
    // handshake ("agent handshake failed: aborted by peer"), it never returned, and the hub ignored
    // SIGTERM until it was killed (3 of 3 such runs; not reproduced by abandoning a handshake alone).
    if tokio::time::timeout(ENDPOINT_IDLE_WAIT, endpoint.wait_idle())
        .await
        .is_err()
    {
        warn!(waited = ?ENDPOINT_IDLE_WAIT, "the QUIC endpoint did not finish closing its connections; stopping anyway");
    }
    // The connections have ended: the last statuses say so, before the publisher stops.
    status_stop.cancel();
    if let Some(task) = status_task {
        let _ = tokio::time::timeout(STATUS_FINAL_WAIT, task).await;
    }
    result
}

/// How long the last status messages may take at shutdown.
const STATUS_FINAL_WAIT: Duration = Duration::from_secs(3);

/// Logs the hub's own certificate's expiry at start, as a warning within
/// [`meshbridge_tls::EXPIRY_WARNING_SECS`]. A file that does not parse was refused by the TLS setup already.
fn own_certificate_expiry(path: &std::path::Path) {
    let Some((_, left)) = meshbridge_tls::server::certificate_file_expiry(path) else {
        return;
    };
    let days = left / 86_400;
    if left < meshbridge_tls::EXPIRY_WARNING_SECS {
        warn!(cert = %path.display(), days, "the hub's certificate expires soon; renew it (agents refuse an expired one)");
    } else {
        info!(cert = %path.display(), days, "hub certificate");
    }
}
