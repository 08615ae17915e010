//! The hub's status topics (`shared/src/status.rs`): one retained JSON message per site at
//! `<namespace>/$meshbridge/status`, published through the hub's own cloud-broker client on every change
//! (an agent connects or goes, its config version moves, the downlink backlog changes) and every
//! `status.interval`, like Mosquitto's bridge notifications and `$SYS` tree.
//!
//! The connections record what they learn on a [`StatusBoard`]; one task ([`run`]) turns it into
//! messages. When the hub stops, the last statuses it publishes say every site is disconnected (a crashed
//! hub cannot: a consumer that needs to know reads `last_seen_ms`, which then stops moving).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use shared::status::{self, Publication, SiteStatus};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::agent_conn::Hub;
use crate::publisher::OutMessage;

/// How long one status may take to be accepted by the cloud broker before it is tried again later.
const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// What the connections know about each site.
#[derive(Debug, Default)]
struct Tracked {
    connections: u32,
    last_seen_ms: Option<u64>,
    config_version: Option<u64>,
    agent_version: Option<String>,
}

/// The sites' link state, written by the connections, read by [`run`].
#[derive(Debug, Default)]
pub(crate) struct StatusBoard {
    sites: Mutex<HashMap<String, Tracked>>,
    changed: Notify,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl StatusBoard {
    fn update(&self, site: &str, change: impl FnOnce(&mut Tracked)) {
        change(
            self.sites
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(site.to_owned())
                .or_default(),
        );
        self.changed.notify_one();
    }

    /// A connection of `site` was admitted (its `Hello` said this config and software version).
    fn connected(&self, site: &str, config_version: u64, agent_version: &str) {
        self.update(site, |t| {
            t.connections += 1;
            t.config_version = Some(config_version);
            if !agent_version.is_empty() {
                t.agent_version = Some(agent_version.to_owned());
            }
        });
    }

    /// An admitted connection of `site` ended.
    fn disconnected(&self, site: &str) {
        self.update(site, |t| {
            t.connections = t.connections.saturating_sub(1);
            t.last_seen_ms = Some(now_ms());
        });
    }

    /// `site`'s agent applied a pushed config.
    pub(crate) fn config_applied(&self, site: &str, version: u64) {
        self.update(site, |t| t.config_version = Some(version));
    }

    /// The config version each site's agent last reported applying (`None`: not since the hub started).
    pub(crate) fn config_version(&self, site: &str) -> Option<u64> {
        self.sites
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(site)
            .and_then(|t| t.config_version)
    }

    fn status(&self, site: &str, downlink_backlog: u64) -> SiteStatus {
        let sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
        let t = sites.get(site);
        let connections = t.map_or(0, |t| t.connections);
        SiteStatus {
            site: site.to_owned(),
            connected: connections > 0,
            connections,
            last_seen_ms: if connections > 0 {
                Some(now_ms())
            } else {
                t.and_then(|t| t.last_seen_ms)
            },
            downlink_backlog,
            config_version: t.and_then(|t| t.config_version),
            agent_version: t.and_then(|t| t.agent_version.clone()),
            hub_version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }
}

/// An admitted connection on the board: connected when made, disconnected when dropped.
pub(crate) struct Presence<'a> {
    board: &'a StatusBoard,
    site: &'a str,
}

impl<'a> Presence<'a> {
    /// Records an admitted connection of `site`, whose `Hello` said this config and software version.
    pub(crate) fn new(
        board: &'a StatusBoard,
        site: &'a str,
        config_version: u64,
        agent_version: &str,
    ) -> Self {
        board.connected(site, config_version, agent_version);
        Self { board, site }
    }
}

impl Drop for Presence<'_> {
    fn drop(&mut self) {
        self.board.disconnected(self.site);
    }
}

/// Publishes the sites' statuses until `stop`, then once more (the connections have ended by then).
pub(crate) async fn run(hub: Arc<Hub>, interval: Duration, stop: CancellationToken) {
    let started = tokio::time::Instant::now();
    let mut publications: HashMap<String, Publication<SiteStatus>> = hub
        .sites
        .names()
        .into_iter()
        .map(|site| (site, Publication::new(interval)))
        .collect();
    // Checked at least this often, so the interval is kept whatever it is.
    let mut tick = tokio::time::interval(interval.min(Duration::from_secs(1)));
    loop {
        let stopping = tokio::select! {
            () = stop.cancelled() => true,
            () = hub.status.changed.notified() => false,
            _ = tick.tick() => false,
        };
        let mut backlog: HashMap<String, u64> = HashMap::new();
        for (key, depth) in hub.downlinks.depths() {
            let site = key
                .split_once(shared::link::lane::LANE_SEPARATOR)
                .map_or(key.as_str(), |(site, _)| site);
            *backlog.entry(site.to_owned()).or_default() += depth;
        }
        for (name, site) in &hub.sites.all() {
            let status = hub
                .status
                .status(name, backlog.get(name).copied().unwrap_or(0));
            let publication = publications
                .entry(name.clone())
                .or_insert_with(|| Publication::new(interval));
            let now = started.elapsed();
            if !publication.due(&status, now) {
                continue;
            }
            let topic = match status::site_status_topic(&site.namespace) {
                Ok(topic) => topic.into_string(),
                Err(cause) => {
                    warn!(site = %name, %cause, "no room for the status topic under the site's namespace");
                    continue;
                }
            };
            let message = OutMessage {
                topic,
                qos: QoS::AtLeastOnce,
                retain: true,
                payload: Bytes::from(status::payload(&status)),
                properties: PublishProperties {
                    content_type: Some("application/json".to_owned()),
                    ..PublishProperties::default()
                },
                seq: 0,
            };
            // Its own batch key, apart from the site's messages (whose seqs the publisher tracks).
            let done = hub
                .publisher
                .submit(&format!("$status/{name}"), vec![message])
                .await;
            match tokio::time::timeout(PUBLISH_WAIT, done).await {
                Ok(Ok(Ok(refusals))) if refusals.is_empty() => {
                    debug!(site = %name, connected = status.connected, "status published");
                    publication.published(&status, now);
                }
                Ok(Ok(Ok(refusals))) => {
                    warn!(site = %name, ?refusals, "the cloud broker refused the site's status");
                    publication.published(&status, now);
                }
                other => {
                    debug!(site = %name, outcome = ?other.map(|r| r.map(|r| r.map(drop))), "status not published; tried again later")
                }
            }
        }
        if stopping {
            return;
        }
    }
}
