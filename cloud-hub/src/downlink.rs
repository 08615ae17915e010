//! Downlink: messages bound for sites, from the cloud or from other sites, kept at the hub in a durable
//! queue per site until that site's agent has handed them to its local broker.
//!
//! # Where downlink messages come from
//! One MQTT client of the cloud broker ([`spawn_subscriber`]) subscribes to every filter the routes ask
//! for (downlink routes under a site's namespace, site-to-site routes under the source site's namespace)
//! and asks a [`DownlinkRouter`] where each message goes. Site-to-site messages therefore travel through
//! the cloud broker too: the source site's hub publishes them like any uplink message and whichever hub
//! serves the destination site picks them up, so sites sharded across hubs still reach each other.
//!
//! # Durability
//! A message is acknowledged to the cloud broker (manual acks, persistent session) only after it is
//! committed to the destination sites' queues, exactly as the agent treats its site broker in external
//! mode: a hub crash between the two makes the broker resend it, never lose it. Each site's queue is the
//! same [`RedbQueue`] the agents use (`data_dir/downlink/<site>.redb`), bounded by `downlink.max_bytes`
//! and `downlink.max_age`; a full queue with the `block` policy stops acknowledging the broker, which then
//! holds (or, by its own policy, drops) what follows: back-pressure, never a silent drop at the hub.
//!
//! # Retained messages
//! The subscriptions ask for Retain As Published and for retained messages only when a subscription is
//! new (MQTT 5 Retain Handling 1), so a retained command under a downlink route is queued once for a site
//! that connects later, and is published retained at the site.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, RetainForwardRule};
use rumqttc::v5::mqttbytes::QoS as MqttQoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use shared::envelope::{Envelope, Properties, QoS};
use shared::policy::path::CLOUD;
use shared::policy::route::{Delivery, Message, RouteTable, Target};
use shared::policy::route_dedup::RouteDedups;
use shared::queue::{AppendOutcome, Queue, QueueLimits, RedbQueue};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::HubError;

/// Subscriber's session expiry: the cloud broker keeps its subscriptions and queued messages across a
/// hub restart for this long.
const SESSION_EXPIRY_SECS: u32 = 24 * 3600;
/// Most unacknowledged downlink publishes the broker may send at once (MQTT 5 Receive Maximum).
const RECEIVE_MAXIMUM: u16 = 256;
/// Wait before retrying an append that failed (full queue, disk error): the broker keeps the message.
const APPEND_RETRY: Duration = Duration::from_millis(500);
/// Wait before polling a failed broker connection again.
const RECONNECT_WAIT: Duration = Duration::from_millis(500);

/// A message as the cloud broker delivered it.
#[derive(Debug, Clone)]
pub(crate) struct CloudMessage {
    /// Cloud topic.
    pub(crate) topic: String,
    /// Payload.
    pub(crate) payload: Bytes,
    /// QoS of the delivery.
    pub(crate) qos: QoS,
    /// Retain flag (as published, thanks to Retain As Published).
    pub(crate) retain: bool,
    /// Properties, user properties included.
    pub(crate) properties: Properties,
}

impl CloudMessage {
    /// The routing engine's view of it.
    fn as_route_message(&self) -> Message<'_> {
        Message {
            topic: &self.topic,
            qos: self.qos,
            retain: self.retain,
            payload: &self.payload,
            user: &self.properties.user,
            seq: None,
        }
    }
}

/// The compiled routes in force (swapped whole on a config reload) and the routes' dedup state.
pub(crate) type Routes = watch::Receiver<Arc<RouteTable>>;
/// Per-route dedup sets, shared by the uplink and downlink paths.
pub(crate) type Dedups = Arc<Mutex<RouteDedups>>;

/// One site's downlink queue and the signal that it grew.
#[derive(Debug)]
pub(crate) struct SiteDownlink {
    /// The durable queue (seqs are the site's downlink seqs).
    pub(crate) queue: RedbQueue,
    /// Notified after every append, so the site's connection sends without polling.
    pub(crate) grew: Notify,
}

/// Every site's downlink queue, opened on first use.
#[derive(Debug)]
pub(crate) struct DownlinkStore {
    dir: PathBuf,
    limits: QueueLimits,
    sites: Mutex<HashMap<String, Arc<SiteDownlink>>>,
}

impl DownlinkStore {
    /// A store under `dir` (created on first use) with `limits` per site.
    pub(crate) fn new(dir: &Path, limits: QueueLimits) -> Self {
        Self {
            dir: dir.to_path_buf(),
            limits,
            sites: Mutex::new(HashMap::new()),
        }
    }

    /// The queue of `site`, opening (or creating) its file if this is the first use. Blocking: call from
    /// a blocking context.
    ///
    /// # Errors
    /// [`HubError::DataDir`] or [`HubError::DownlinkQueue`] when its file cannot be created or opened.
    pub(crate) fn site_blocking(&self, site: &str) -> Result<Arc<SiteDownlink>, HubError> {
        if let Some(found) = lock(&self.sites).get(site) {
            return Ok(Arc::clone(found));
        }
        std::fs::create_dir_all(&self.dir).map_err(|source| HubError::DataDir {
            path: self.dir.clone(),
            source,
        })?;
        let queue = RedbQueue::open(self.dir.join(format!("{site}.redb")), self.limits).map_err(
            |source| HubError::DownlinkQueue {
                site: site.to_owned(),
                source: Box::new(source),
            },
        )?;
        let mut sites = lock(&self.sites);
        let entry = sites.entry(site.to_owned()).or_insert_with(|| {
            Arc::new(SiteDownlink {
                queue,
                grew: Notify::new(),
            })
        });
        Ok(Arc::clone(entry))
    }

    /// Opens every priority lane's queue file (`<site>+p<N>.redb`) of the configured `sites` found in the
    /// directory (blocking). Lane queues otherwise open on first use, and a lane's backlog left from before
    /// a restart must be visible from the start: a lower lane waits for it (see `shared::link::lane`).
    ///
    /// # Errors
    /// As [`Self::site_blocking`].
    pub(crate) fn open_lanes_blocking(&self, sites: &[String]) -> Result<usize, HubError> {
        let Ok(dir) = std::fs::read_dir(&self.dir) else {
            return Ok(0);
        };
        let mut opened = 0;
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "redb") {
                continue;
            }
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let lane_of_site = sites.iter().any(|site| {
                shared::link::lane::from_file_stem(stem, site).is_some_and(|lane| lane > 0)
            });
            if lane_of_site {
                self.site_blocking(stem)?;
                opened += 1;
            }
        }
        Ok(opened)
    }

    /// Every open downlink queue's key and depth (no I/O).
    pub(crate) fn depths(&self) -> Vec<(String, u64)> {
        lock(&self.sites)
            .iter()
            .map(|(key, d)| (key.clone(), d.queue.depth()))
            .collect()
    }

    /// The queue of `key` if it is open (no I/O).
    pub(crate) fn opened(&self, key: &str) -> Option<Arc<SiteDownlink>> {
        lock(&self.sites).get(key).cloned()
    }

    /// [`Self::site_blocking`] from async code.
    ///
    /// # Errors
    /// As [`Self::site_blocking`].
    pub(crate) async fn site(self: &Arc<Self>, site: &str) -> Result<Arc<SiteDownlink>, HubError> {
        let store = Arc::clone(self);
        let site = site.to_owned();
        tokio::task::spawn_blocking(move || store.site_blocking(&site))
            .await
            .map_err(HubError::Join)?
    }

    /// Commits `bodies` (encoded envelope bodies) to `site`'s queue and wakes its sender.
    ///
    /// # Errors
    /// [`HubError::DownlinkQueue`] (full with the `block` policy, disk full, storage).
    pub(crate) async fn append(
        self: &Arc<Self>,
        site: &str,
        bodies: Vec<Bytes>,
    ) -> Result<AppendOutcome, HubError> {
        let name = site.to_owned();
        let site = self.site(site).await?;
        let queue = Arc::clone(&site);
        let outcome = tokio::task::spawn_blocking(move || queue.queue.append(&bodies, now_ms()))
            .await
            .map_err(HubError::Join)?
            .map_err(|source| HubError::DownlinkQueue {
                site: name,
                source: Box::new(source),
            })?;
        site.grew.notify_waiters();
        site.grew.notify_one();
        Ok(outcome)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Unix milliseconds now.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The envelope body a site's agent receives for a message routed to it: the delivery's site-local
/// topic, QoS and retain flag, the message's properties with the delivery's path (so the site never sends
/// it back), and a message expiry no later than the route's time to live. `origin` is the first place on
/// the path (`$cloud` for a cloud publisher's message, the source site for a site-to-site one).
pub(crate) fn encode_delivery(
    payload: &Bytes,
    properties: &Properties,
    delivery: &Delivery,
    captured_at_ms: u64,
) -> Result<Bytes, shared::wire::EncodeError> {
    let mut properties = properties.clone();
    properties.user = delivery.user_properties(&properties.user);
    if let Some(ttl) = delivery.ttl {
        let ttl = u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX).max(1);
        properties.message_expiry = Some(properties.message_expiry.map_or(ttl, |own| own.min(ttl)));
    }
    let envelope = Envelope {
        origin: delivery
            .path
            .places()
            .first()
            .cloned()
            .unwrap_or_else(|| CLOUD.to_owned()),
        seq: 0,
        topic: delivery.topic.as_str().to_owned(),
        payload: payload.clone(),
        qos: delivery.qos,
        retain: delivery.retain,
        properties,
        trace: None,
        enqueued_at_ms: captured_at_ms,
    };
    let mut buf = BytesMut::with_capacity(envelope.encoded_body_len());
    envelope.encode_body(&mut buf)?;
    Ok(buf.freeze())
}

/// Starts the cloud subscriber: it follows `router` (resubscribing when it changes), commits every message
/// to its destinations' queues in `store`, then acknowledges it to the broker.
pub(crate) fn spawn_subscriber(
    mut options: MqttOptions,
    routes: Routes,
    dedups: Dedups,
    store: Arc<DownlinkStore>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    options
        .set_manual_acks(true)
        .set_clean_start(false)
        .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
        .set_receive_maximum(Some(RECEIVE_MAXIMUM));
    tracker.spawn(subscriber(options, routes, dedups, store, stop));
}

/// What the cloud broker connection reports to the committing loop.
enum FromBroker {
    /// (Re)connected: subscribe again.
    Connected,
    /// A message to commit, then acknowledge.
    Publish(Publish),
    /// The connection failed; the poller retries after [`RECONNECT_WAIT`].
    Lost(rumqttc::v5::ConnectionError),
}

/// Polls the broker connection without pause and forwards what matters. Acknowledgements and
/// subscriptions go out through the client's request channel, which only `poll` drains: polled from the
/// committing loop instead, a burst of messages (more than the channel holds) left every later `ack` waiting
/// for a `poll` that waited for the `ack`, and the downlink stalled for good. The channel to the committer
/// is unbounded because the broker bounds it: it sends no more QoS 1 messages than its in-flight window
/// (our Receive Maximum, [`RECEIVE_MAXIMUM`], or its own `max_inflight_count`) until they are acknowledged.
async fn poll_broker(
    mut eventloop: rumqttc::v5::EventLoop,
    to_committer: tokio::sync::mpsc::UnboundedSender<FromBroker>,
) {
    loop {
        let forwarded = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => to_committer.send(FromBroker::Connected),
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                to_committer.send(FromBroker::Publish(publish))
            }
            Ok(_) => Ok(()),
            Err(e) => {
                let sent = to_committer.send(FromBroker::Lost(e));
                tokio::time::sleep(RECONNECT_WAIT).await;
                sent
            }
        };
        if forwarded.is_err() {
            return;
        }
    }
}

async fn subscriber(
    options: MqttOptions,
    mut routes: Routes,
    dedups: Dedups,
    store: Arc<DownlinkStore>,
    stop: CancellationToken,
) {
    let (client, eventloop) = AsyncClient::new(options, 64);
    let (to_committer, mut from_broker) = tokio::sync::mpsc::unbounded_channel();
    let poller = tokio::spawn(poll_broker(eventloop, to_committer));
    let mut subscribed: BTreeSet<String> = BTreeSet::new();
    let mut connected = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            changed = routes.changed() => {
                if changed.is_err() {
                    break;
                }
                if connected {
                    let wanted = filters(&routes.borrow());
                    resubscribe(&client, &mut subscribed, &wanted).await;
                }
            }
            event = from_broker.recv() => match event {
                None => break,
                Some(FromBroker::Connected) => {
                    connected = true;
                    // Subscriptions survive in a resumed session, but the broker may have lost it (an
                    // embedded broker restarted with the hub): subscribe again; Retain Handling 1 keeps
                    // retained messages from being sent twice for a subscription that already existed.
                    subscribed.clear();
                    let wanted = filters(&routes.borrow());
                    resubscribe(&client, &mut subscribed, &wanted).await;
                    info!(filters = subscribed.len(), "downlink subscriber connected to the cloud broker");
                }
                Some(FromBroker::Publish(publish)) => {
                    let message = cloud_message(&publish);
                    let table = Arc::clone(&routes.borrow());
                    if !commit(&store, &table, &dedups, &message, &stop).await {
                        break;
                    }
                    if let Err(e) = client.ack(&publish).await {
                        warn!(cause = %e, "downlink: acknowledging to the cloud broker failed; it will resend");
                    }
                }
                Some(FromBroker::Lost(e)) => {
                    if connected {
                        warn!(cause = %e, "downlink subscriber lost the cloud broker; reconnecting");
                    }
                    connected = false;
                }
            }
        }
    }
    let _ = client.try_disconnect();
    poller.abort();
}

/// The cloud filters `table`'s downlink routes need.
fn filters(table: &RouteTable) -> BTreeSet<String> {
    table
        .cloud_filters()
        .into_iter()
        .map(|(filter, _)| filter.as_str().to_owned())
        .collect()
}

/// Subscribes to what `wanted` adds and unsubscribes from what it drops.
async fn resubscribe(
    client: &AsyncClient,
    subscribed: &mut BTreeSet<String>,
    wanted: &BTreeSet<String>,
) {
    let added: Vec<Filter> = wanted
        .difference(subscribed)
        .map(|f| {
            let mut filter = Filter::new(f.clone(), MqttQoS::AtLeastOnce);
            filter.preserve_retain = true;
            filter.retain_forward_rule = RetainForwardRule::OnNewSubscribe;
            filter
        })
        .collect();
    let removed: Vec<String> = subscribed.difference(wanted).cloned().collect();
    if !added.is_empty() {
        debug!(count = added.len(), "downlink: subscribing");
        if let Err(e) = client.subscribe_many(added).await {
            warn!(cause = %e, "downlink: subscribing failed");
            return;
        }
    }
    for filter in removed {
        if let Err(e) = client.unsubscribe(filter.clone()).await {
            warn!(cause = %e, %filter, "downlink: unsubscribing failed");
        }
    }
    subscribed.clone_from(wanted);
}

fn cloud_message(publish: &Publish) -> CloudMessage {
    let properties = publish
        .properties
        .as_ref()
        .map(|p| Properties {
            user: p.user_properties.clone(),
            content_type: p.content_type.clone(),
            response_topic: p.response_topic.clone(),
            correlation_data: p.correlation_data.clone(),
            message_expiry: p.message_expiry_interval,
            payload_format_utf8: p.payload_format_indicator == Some(1),
        })
        .unwrap_or_default();
    CloudMessage {
        topic: String::from_utf8_lossy(&publish.topic).into_owned(),
        payload: publish.payload.clone(),
        qos: match publish.qos {
            MqttQoS::AtMostOnce => QoS::AtMostOnce,
            MqttQoS::AtLeastOnce => QoS::AtLeastOnce,
            MqttQoS::ExactlyOnce => QoS::ExactlyOnce,
        },
        retain: publish.retain,
        properties,
    }
}

/// Commits `message` to every destination's queue, retrying while a queue refuses (full, disk error);
/// `false` if the hub is stopping (the message is then not acknowledged and the broker keeps it).
async fn commit(
    store: &Arc<DownlinkStore>,
    table: &RouteTable,
    dedups: &Dedups,
    message: &CloudMessage,
    stop: &CancellationToken,
) -> bool {
    let now = now_ms();
    let decision = {
        let mut dedups = lock(dedups);
        table.from_cloud(&message.as_route_message(), &mut dedups, now)
    };
    let decision = match decision {
        Ok(decision) => decision,
        Err(e) => {
            warn!(topic = %message.topic, cause = %e, "cloud message not routable; acknowledged and dropped");
            return true;
        }
    };
    for skipped in &decision.skipped {
        debug!(topic = %message.topic, route = %skipped.route, reason = ?skipped.reason, "downlink route skipped");
    }
    for delivery in decision.deliveries {
        let Target::Site(site) = &delivery.target else {
            continue;
        };
        // A reply the site sends goes up under its namespace: only a response topic inside it is kept.
        let mut properties = message.properties.clone();
        if let Some(global) = properties.response_topic.take() {
            properties.response_topic = table
                .site(site)
                .and_then(|s| s.namespace.strip_response_topic(&global));
            if properties.response_topic.is_none() {
                debug!(topic = %message.topic, %site, response_topic = %global, "response topic outside the site's namespace: not passed on");
            }
        }
        let body = match encode_delivery(&message.payload, &properties, &delivery, now) {
            Ok(body) => body,
            Err(e) => {
                warn!(topic = %message.topic, %site, cause = %e, "downlink message cannot be encoded; not delivered");
                continue;
            }
        };
        // The site's downlink queue of the route's priority lane (see `shared::link::lane`).
        let queue = shared::link::lane::origin(site, delivery.priority);
        loop {
            match store.append(&queue, vec![body.clone()]).await {
                Ok(outcome) => {
                    debug!(%site, topic = %delivery.topic.as_str(), seq = outcome.first_seq, "downlink queued");
                    if outcome.dropped > 0 {
                        warn!(%site, dropped = outcome.dropped, "downlink queue full: oldest messages dropped (downlink.full_policy = drop-oldest)");
                    }
                    break;
                }
                Err(e) => {
                    warn!(%site, cause = %e, "downlink queue refused a message; the cloud broker keeps it until it fits");
                    tokio::select! {
                        () = stop.cancelled() => return false,
                        () = tokio::time::sleep(APPEND_RETRY) => {}
                    }
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_queues_left_on_disk_are_opened_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = QueueLimits::default();
        {
            let store = DownlinkStore::new(dir.path(), limits);
            for key in ["line1", "line1+p7", "line10+p3", "gone+p2"] {
                store.site_blocking(key).expect("create");
            }
        }
        let store = DownlinkStore::new(dir.path(), limits);
        let sites = ["line1".to_owned(), "line10".to_owned()];
        assert_eq!(store.open_lanes_blocking(&sites).expect("open"), 2);
        assert!(store.opened("line1+p7").is_some());
        assert!(store.opened("line10+p3").is_some());
        assert!(
            store.opened("line1").is_none(),
            "lane 0 opens when its site connects, as before"
        );
        assert!(
            store.opened("gone+p2").is_none(),
            "a site no longer configured is left alone"
        );
    }
}
