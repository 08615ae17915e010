//! Embedded mode: rumqttd on internal listeners, the front on `broker.listen`, and the group-commit loop.

use std::sync::Arc;

use meshbridge_broker::embedded::{EmbeddedBroker, EmbeddedSettings, InternalLogin};
use meshbridge_broker::front::{self, FrontOptions, Select};
use shared::config::EmbeddedBroker as EmbeddedConfig;
use shared::envelope::Envelope;
use shared::queue::RetainedStore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::deliver::Deliverer;

use crate::error::AgentError;
use crate::ingest::Ingest;

/// Room in a packet beyond the payload: topic, properties, headers. The front and rumqttd check whole
/// packets, while the config bounds the payload.
const PACKET_OVERHEAD: usize = 64 * 1024 + 16;
/// Commit requests the front may queue while a commit runs (each is one client read, many messages).
const COMMIT_CHANNEL: usize = 1024;

/// Publishes the stored retained messages into the fresh broker (its internal port, so the front does
/// not capture them again), waiting for each QoS 1/2 one to be accepted.
async fn restore_retained(
    store: &Arc<RetainedStore>,
    broker: std::net::SocketAddr,
    login: &InternalLogin,
    site: &str,
) -> Result<(), AgentError> {
    let store = Arc::clone(store);
    let rows = tokio::task::spawn_blocking(move || store.all())
        .await
        .map_err(|source| AgentError::TaskPanicked {
            task: "retained restore",
            source,
        })?
        .map_err(AgentError::Retained)?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut envelopes = Vec::with_capacity(rows.len());
    for (topic, body) in rows {
        match Envelope::decode_body(0, body) {
            Ok(mut envelope) => {
                envelope.retain = true;
                envelopes.push(envelope);
            }
            Err(cause) => warn!(%topic, %cause, "unreadable retained message on disk; skipped"),
        }
    }
    let mut deliverer = Deliverer::new(
        &format!("meshbridge-{site}-retained"),
        &broker.ip().to_string(),
        broker.port(),
        Some(internal_credentials(login)),
        None,
    );
    let restored = deliverer
        .deliver(&envelopes, crate::ingest::now_ms())
        .await
        .map_err(|e| AgentError::RetainedRestore(e.to_string()))?;
    deliverer.close().await;
    info!(
        restored,
        stored = envelopes.len(),
        "retained messages restored into the broker"
    );
    Ok(())
}

/// Serves MQTT clients until `shutdown`, then returns after every commit taken has been answered.
pub(crate) async fn run(
    cfg: &EmbeddedConfig,
    ingest: Ingest,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    // Without a password file the site broker is open, as a fresh Mosquitto on loopback is.
    let opened = meshbridge_broker::listeners::open(
        cfg,
        cfg.password_file.is_none() && cfg.username.is_none(),
        Arc::clone(&ingest.auth_counters),
    )
    .await?;
    let listen = opened.addrs[0];
    let max_packet_size = cfg.max_payload.as_usize().saturating_add(PACKET_OVERHEAD);
    let settings = EmbeddedSettings {
        max_packet_size,
        max_connections: usize::try_from(cfg.max_connections).unwrap_or(usize::MAX),
        ..EmbeddedSettings::default()
    }
    .with_log_per_filter(cfg.max_log_per_filter.as_usize());
    let broker = EmbeddedBroker::start(&settings).await?;
    if let Some(auth) = &opened.auth {
        tokio::spawn(Arc::clone(auth).reload_loop(shutdown.clone()));
    }
    let options = FrontOptions {
        max_packet_size,
        credentials: cfg
            .username
            .as_ref()
            .zip(cfg.password.as_ref())
            .map(|(u, p)| (u.clone(), p.expose().to_owned())),
        limits: Some(Arc::clone(&ingest.limits)),
        capture_retained: ingest.retained.is_some(),
        sessions: ingest.sessions.clone(),
        // The agent's own connections to the internal port: downlink delivery (one per lane, `-p<N>`),
        // status and retained restore. Not `-replay`: `dead-letters replay` publishes through this port.
        reserved_client_ids: ["downlink", "status", "retained"]
            .iter()
            .map(|what| format!("meshbridge-{}-{what}", ingest.site))
            .collect(),
        // Those own connections only publish, so every subscriber of rumqttd comes through the front.
        answer_unsubscribed: true,
        ..FrontOptions::default()
    };
    if let Some(store) = &ingest.retained {
        // Before any client is served (the listener is bound, but nothing accepts until `serve`).
        restore_retained(store, broker.v5_addr, broker.login(), &ingest.site).await?;
    }
    let (commits_tx, commits_rx) = mpsc::channel(COMMIT_CHANNEL);
    let routes = Arc::clone(&ingest.routes);
    let select: Select = Arc::new(move |topic: &str| routes.decide(topic).is_some());
    let site = Arc::clone(&ingest.site);
    // Downlink messages go to rumqttd's internal port, behind the front, so they are never captured again.
    ingest
        .downlink_target
        .send_replace(Some(super::deliver::Target {
            client_id: format!("meshbridge-{site}-downlink"),
            host: broker.v5_addr.ip().to_string(),
            port: broker.v5_addr.port(),
            credentials: Some(internal_credentials(broker.login())),
            transport: None,
        }));
    // Ends by itself once the front (the only sender) is gone, after answering every request it took. A
    // task on the worker that blocks it for each commit (`Ingest::run_front_commits` says why).
    let commits = tokio::spawn(ingest.run_front_commits(commits_rx));
    // The internal addresses are logged for diagnosis; they take only the per-start internal login.
    info!(%listen, ports = opened.addrs.len(), internal_v4 = %broker.v4_addr, internal_v5 = %broker.v5_addr, %site, mode = "embedded", "ready");
    meshbridge_metrics::systemd::ready(&format!("site {site}: serving MQTT on {listen}"));
    let served = front::serve_listeners(
        opened.listeners,
        broker.upstreams(),
        select,
        commits_tx,
        options,
        shutdown,
    )
    .await;
    let joined = commits.await;
    broker.stop().await;
    joined.map_err(|source| AgentError::TaskPanicked {
        task: "commit",
        source,
    })?;
    served.map_err(AgentError::from)
}

/// The login of the embedded broker's internal listeners, for the agent's own clients there.
fn internal_credentials(login: &InternalLogin) -> (String, String) {
    (login.user().to_owned(), login.secret().to_owned())
}
