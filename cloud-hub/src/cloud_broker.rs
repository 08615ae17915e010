//! The cloud broker the hub publishes into: embedded rumqttd behind the pass-through front, or an external
//! broker joined as an MQTT 5 client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshbridge_broker::embedded::{EmbeddedBroker, EmbeddedSettings};
use meshbridge_broker::front::{self, CommitRequest, FrontError, FrontOptions};
use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};
use shared::config::{EmbeddedBroker as EmbeddedConfig, ExternalBroker};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::HubError;
use crate::publisher::base_options;

/// Client id of the hub's publisher on the embedded broker.
const EMBEDDED_CLIENT_ID: &str = "meshbridge-hub";
/// Keep-alive towards the embedded broker (loopback: only detects a wedged router).
const EMBEDDED_KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Room for the topic and properties on top of the largest payload.
const PACKET_OVERHEAD: usize = 64 * 1024;

/// A running embedded cloud broker and its client-facing front.
#[derive(Debug)]
pub(crate) struct RunningEmbedded {
    /// The address clients connect to (`broker.listen`, with the real port if it was 0).
    pub(crate) listen: SocketAddr,
    broker: EmbeddedBroker,
    front: JoinHandle<Result<(), FrontError>>,
    front_stop: CancellationToken,
    /// Never receives anything (`select` is always false) but must stay open for the front.
    _commits: mpsc::Receiver<CommitRequest>,
}

impl RunningEmbedded {
    /// Starts rumqttd and the front on `cfg.listen`; `max_message_size` is the hub's payload limit.
    pub(crate) async fn start(
        cfg: &EmbeddedConfig,
        max_message_size: usize,
        auth_counters: Arc<meshbridge_broker::auth::AuthCounters>,
    ) -> Result<Self, HubError> {
        if cfg.username.is_some() || cfg.password.is_some() {
            return Err(HubError::EmbeddedAuthUnsupported);
        }
        let max_packet_size = cfg
            .max_payload
            .as_usize()
            .max(max_message_size)
            .saturating_add(PACKET_OVERHEAD);
        let settings = EmbeddedSettings {
            max_packet_size,
            max_connections: usize::try_from(cfg.max_connections).unwrap_or(usize::MAX),
            // Every message the hub delivers crosses the router: as a task it costs no thread wakes.
            router_task: true,
            ..EmbeddedSettings::default()
        }
        .with_log_per_filter(cfg.max_log_per_filter.as_usize());
        let broker = EmbeddedBroker::start(&settings).await?;
        // For diagnosis; the internal listeners take only the broker's per-start login.
        tracing::info!(internal_v4 = %broker.v4_addr, internal_v5 = %broker.v5_addr, "embedded cloud broker started");
        // Closed unless the config opens it: config validation requires a password file or
        // `allow_anonymous = true` on the main port; further ports without one are closed.
        let opened = meshbridge_broker::listeners::open(cfg, false, auth_counters).await?;
        let listen = opened.addrs[0];
        let (commits_tx, commits) = mpsc::channel(1);
        let front_stop = CancellationToken::new();
        if let Some(auth) = &opened.auth {
            tokio::spawn(Arc::clone(auth).reload_loop(front_stop.clone()));
        }
        let options = FrontOptions {
            max_packet_size,
            // The hub's publisher and downlink subscriber (`meshbridge-hub`, `meshbridge-hub-downlink`).
            reserved_client_ids: vec![EMBEDDED_CLIENT_ID.to_owned()],
            ..FrontOptions::default()
        };
        // Pure pass-through: the cloud side has nothing to commit, the front only shares the port between
        // MQTT 3.1.1 and 5 clients.
        let front = tokio::spawn(front::serve_listeners(
            opened.listeners,
            broker.upstreams(),
            Arc::new(|_: &str| false),
            commits_tx,
            options,
            front_stop.clone(),
        ));
        Ok(Self {
            listen,
            broker,
            front,
            front_stop,
            _commits: commits,
        })
    }

    /// The embedded broker's subscriber pressure, which the hub's publisher obeys.
    pub(crate) fn pressure(&self) -> Arc<meshbridge_broker::embedded::SubscriberPressure> {
        self.broker.pressure()
    }

    /// In-process links to the router, and the client id the hub's publisher uses on one.
    pub(crate) fn publisher_links(
        &self,
    ) -> (meshbridge_broker::embedded::LocalLinks, &'static str) {
        (self.broker.local_links(), EMBEDDED_CLIENT_ID)
    }

    /// Options for the hub's downlink subscriber on this broker (its own client id and session).
    pub(crate) fn subscriber_options(&self) -> MqttOptions {
        self.internal_options(&format!("{EMBEDDED_CLIENT_ID}-downlink"))
    }

    /// Options for a client of the internal v5 listener, with the broker's per-start internal login.
    fn internal_options(&self, client_id: &str) -> MqttOptions {
        let addr = self.broker.v5_addr;
        let mut options = base_options(
            client_id,
            &addr.ip().to_string(),
            addr.port(),
            EMBEDDED_KEEP_ALIVE,
        );
        let login = self.broker.login();
        options.set_credentials(login.user(), login.secret());
        options
    }

    /// The front's task, to notice it failing.
    pub(crate) fn front_task(&mut self) -> &mut JoinHandle<Result<(), FrontError>> {
        &mut self.front
    }

    /// Stops the front and the listeners (rumqttd's router thread cannot be stopped).
    pub(crate) async fn stop(self) -> Result<(), HubError> {
        self.front_stop.cancel();
        let front = if self.front.is_finished() {
            // Its result was already taken by the caller's select; nothing more to report.
            Ok(())
        } else {
            match self.front.await {
                Ok(result) => result.map_err(HubError::from),
                Err(_) => Ok(()),
            }
        };
        self.broker.stop().await;
        front
    }
}

/// Client options for an external cloud broker: address, client id, credentials and TLS from the config.
pub(crate) fn external_options(cfg: &ExternalBroker) -> Result<MqttOptions, HubError> {
    external_options_as(cfg, cfg.client_id.as_deref().unwrap_or(EMBEDDED_CLIENT_ID))
}

/// Options for the hub's downlink subscriber on an external broker: the publisher's settings under the
/// client id `<client_id>-downlink`, so its persistent session is its own.
pub(crate) fn external_subscriber_options(cfg: &ExternalBroker) -> Result<MqttOptions, HubError> {
    let id = cfg.client_id.as_deref().unwrap_or(EMBEDDED_CLIENT_ID);
    external_options_as(cfg, &format!("{id}-downlink"))
}

fn external_options_as(cfg: &ExternalBroker, client_id: &str) -> Result<MqttOptions, HubError> {
    let mut options = base_options(
        client_id,
        cfg.address.host(),
        cfg.address.port(),
        cfg.keep_alive,
    );
    if let (Some(user), Some(password)) = (&cfg.username, &cfg.password) {
        options.set_credentials(user.clone(), password.expose().to_owned());
    }
    if let Some(tls) = &cfg.tls {
        let client_auth = tls.cert.as_deref().zip(tls.key.as_deref());
        let config = meshbridge_tls::mqtt_client_config(&tls.ca, client_auth)
            .map_err(HubError::BrokerTls)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(config),
        )));
    }
    Ok(options)
}
