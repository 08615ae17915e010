//! MQTT clients for the tests (rumqttc, MQTT 5): a [`Publisher`] that records exactly which messages the
//! broker acknowledged, a [`Collector`] that records everything it receives, and the [`Report`] that
//! compares the two.
//!
//! The guarantee under test is "nothing a publisher saw acknowledged is lost", so the publisher tracks
//! acknowledgements per message: rumqttc emits `Outgoing::Publish(pkid)` in request order, so a FIFO of
//! submitted message numbers maps each packet id to its message, and `Incoming::PubAck(pkid)` then names the
//! message acknowledged. Messages in flight when the connection broke are `unconfirmed`: they may or may
//! not arrive, and are neither required nor counted as lost.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PubRecReason, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions, Request};
use rumqttc::Outgoing;
use tokio::task::JoinHandle;

/// The user property the hub adds to every message: `<site>/<seq>`.
pub const MESHBRIDGE_ID: &str = "meshbridge-id";

/// Identity of a test message: which publisher sent it and its number there.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MsgId {
    /// Publisher name.
    pub publisher: String,
    /// Message number, from 0.
    pub n: u64,
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.publisher, self.n)
    }
}

/// The payload of message `n` of `publisher`: `"<publisher>:<n>:"` then `pad` bytes of filler, so the
/// receiver can name the message and check the bytes arrived intact.
pub fn payload(publisher: &str, n: u64, pad: usize) -> Bytes {
    let mut p = format!("{publisher}:{n}:").into_bytes();
    let shift = (n % 26) as usize;
    p.extend((0..pad).map(|i| b'a' + ((shift + i % 26) % 26) as u8));
    Bytes::from(p)
}

/// The message a test payload belongs to, if it is one.
pub fn parse_payload(payload: &[u8]) -> Option<MsgId> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(3, ':');
    let publisher = parts.next()?.to_owned();
    let n = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(MsgId { publisher, n })
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishPlan {
    /// Publisher name: the MQTT client id and the first field of every payload.
    pub name: String,
    /// Number of messages.
    pub count: u64,
    /// Topic of every message.
    pub topic: String,
    /// QoS of every message.
    pub qos: QoS,
    /// Retain flag of every message.
    pub retain: bool,
    /// MQTT 5 user properties on every message.
    pub user_properties: Vec<(String, String)>,
    /// Messages per second; `None` publishes as fast as acknowledgements allow.
    pub rate: Option<u32>,
    /// Most unacknowledged messages in flight.
    pub window: u16,
    /// Filler bytes after the payload's header.
    pub pad: usize,
    /// Give up after this long (what is still in flight then is unconfirmed).
    pub deadline: Duration,
}

impl PublishPlan {
    /// `count` QoS 1 messages on `topic`, as fast as acknowledged, 16 in flight, 64 bytes of filler,
    /// within 60 s.
    pub fn new(name: &str, topic: &str, count: u64) -> Self {
        Self {
            name: name.to_owned(),
            count,
            topic: topic.to_owned(),
            qos: QoS::AtLeastOnce,
            retain: false,
            user_properties: Vec::new(),
            rate: None,
            window: 16,
            pad: 64,
            deadline: Duration::from_secs(60),
        }
    }

    /// Paces publishing at `per_second` messages per second.
    pub fn rate(mut self, per_second: u32) -> Self {
        self.rate = Some(per_second.max(1));
        self
    }

    /// Adds an MQTT 5 user property to every message.
    pub fn user_property(mut self, key: &str, value: &str) -> Self {
        self.user_properties
            .push((key.to_owned(), value.to_owned()));
        self
    }

    /// Sets the retain flag on every message.
    pub fn retain(mut self, retain: bool) -> Self {
        self.retain = retain;
        self
    }
}

/// What happened to each message of a [`PublishPlan`].
#[derive(Debug, Clone, Default)]
pub struct PublishOutcome {
    /// Publisher name.
    pub name: String,
    /// Messages the broker acknowledged (PUBACK with a success code): these must arrive.
    pub acked: BTreeSet<u64>,
    /// Messages in flight when the connection broke: they may or may not arrive.
    pub unconfirmed: BTreeSet<u64>,
    /// Messages the broker answered with an error reason code.
    pub refused: BTreeSet<u64>,
    /// Messages never sent (deadline reached first).
    pub unsent: u64,
    /// Connection failures seen (including failed reconnect attempts).
    pub connection_errors: u32,
}

impl PublishOutcome {
    /// The acknowledged messages as [`MsgId`]s.
    pub fn acked_ids(&self) -> impl Iterator<Item = MsgId> + '_ {
        self.acked.iter().map(|&n| MsgId {
            publisher: self.name.clone(),
            n,
        })
    }
}

/// Shared between the producer and event-loop tasks of a publisher.
#[derive(Debug, Default)]
struct Track {
    /// Submitted, not yet written (message numbers in request order).
    fifo: VecDeque<u64>,
    /// Written and awaiting an ack: packet id -> message number.
    inflight: HashMap<u16, u64>,
    outcome: PublishOutcome,
    producer_done: bool,
}

impl Track {
    /// Applies one event of a live connection: a written publish gets its packet id, an ack completes it.
    fn handle(&mut self, event: Event, acked: &AtomicU64) {
        match event {
            Event::Outgoing(Outgoing::Publish(pkid)) => {
                if let Some(n) = self.fifo.pop_front() {
                    if let Some(stale) = self.inflight.insert(pkid, n) {
                        self.outcome.unconfirmed.insert(stale);
                    }
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => {
                if let Some(n) = self.inflight.remove(&ack.pkid) {
                    if matches!(
                        ack.reason,
                        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                    ) {
                        self.outcome.acked.insert(n);
                        acked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.outcome.refused.insert(n);
                    }
                }
            }
            // QoS 2: the PUBREC is the broker's acceptance (the PUBREL/PUBCOMP that follow only release
            // the packet id, which rumqttc does not reuse before the PUBCOMP).
            Event::Incoming(Packet::PubRec(rec)) => {
                if let Some(n) = self.inflight.remove(&rec.pkid) {
                    if matches!(
                        rec.reason,
                        PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                    ) {
                        self.outcome.acked.insert(n);
                        acked.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.outcome.refused.insert(n);
                    }
                }
            }
            _ => {}
        }
    }
}

/// A running publisher.
#[derive(Debug)]
pub struct Publisher {
    acked: Arc<AtomicU64>,
    name: String,
    task: JoinHandle<PublishOutcome>,
}

impl Publisher {
    /// Connects to `addr` (reconnecting as needed) and publishes `plan` in the background.
    pub fn start(addr: SocketAddr, plan: PublishPlan) -> Self {
        let acked = Arc::new(AtomicU64::new(0));
        let name = plan.name.clone();
        let task = tokio::spawn(run_publisher(addr, plan, acked.clone()));
        Self { acked, name, task }
    }

    /// Messages acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` messages were acknowledged.
    ///
    /// # Panics
    /// After `timeout`.
    pub async fn wait_acked(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.acked() < n {
            assert!(
                Instant::now() < deadline,
                "{}: only {} of {n} messages acknowledged after {timeout:?}",
                self.name,
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the publisher to finish (every message answered, or its deadline) and returns the outcome.
    pub async fn finish(self) -> PublishOutcome {
        self.task.await.expect("the publisher task does not panic")
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn run_publisher(
    addr: SocketAddr,
    plan: PublishPlan,
    acked: Arc<AtomicU64>,
) -> PublishOutcome {
    let mut options = MqttOptions::new(plan.name.clone(), addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(10));
    options.set_outgoing_inflight_upper_limit(plan.window.max(1));
    options.set_clean_start(true);
    let (client, mut eventloop) = AsyncClient::new(options, usize::from(plan.window.max(1)));
    let track = Arc::new(Mutex::new(Track {
        outcome: PublishOutcome {
            name: plan.name.clone(),
            ..PublishOutcome::default()
        },
        ..Track::default()
    }));
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + plan.deadline;

    let producer = {
        let track = track.clone();
        let plan = plan.clone();
        tokio::spawn(async move {
            let properties = PublishProperties {
                user_properties: plan.user_properties.clone(),
                ..PublishProperties::default()
            };
            for n in 0..plan.count {
                if let Some(rate) = plan.rate {
                    let due = start + Duration::from_secs_f64(n as f64 / f64::from(rate));
                    tokio::time::sleep_until(due.into()).await;
                }
                lock(&track).fifo.push_back(n);
                let sent = client
                    .publish_with_properties(
                        plan.topic.clone(),
                        plan.qos,
                        plan.retain,
                        payload(&plan.name, n, plan.pad),
                        properties.clone(),
                    )
                    .await;
                if sent.is_err() {
                    // The event loop is gone (deadline); the rest counts as unsent.
                    lock(&track).fifo.pop_back();
                    break;
                }
            }
            lock(&track).producer_done = true;
            // Keep the request channel open until the event loop is done with it.
            client
        })
    };

    loop {
        {
            let t = lock(&track);
            if t.producer_done && t.fifo.is_empty() && t.inflight.is_empty() {
                break;
            }
        }
        let event = match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => break,
            Ok(event) => event,
        };
        let broken = {
            let mut t = lock(&track);
            match event {
                Ok(event) => {
                    t.handle(event, &acked);
                    false
                }
                Err(_) => {
                    t.outcome.connection_errors += 1;
                    // Events queued before the failure: acks that did arrive still count, but a publish
                    // reported as written may have died with the connection (rumqttc moves it to `pending`,
                    // which a clean session discards), so it is unconfirmed and never waited for.
                    for event in eventloop.state.events.drain(..) {
                        match event {
                            Event::Outgoing(Outgoing::Publish(_)) => {
                                if let Some(n) = t.fifo.pop_front() {
                                    t.outcome.unconfirmed.insert(n);
                                }
                            }
                            event => t.handle(event, &acked),
                        }
                    }
                    // A publish parked on a packet-id collision is the next one in request order; rumqttc
                    // keeps it parked across the reconnect and then waits forever for an ack that cannot
                    // come, blocking every later request, so it is taken out here.
                    if eventloop.state.collision.take().is_some() {
                        if let Some(n) = t.fifo.pop_front() {
                            t.outcome.unconfirmed.insert(n);
                        }
                    }
                    // rumqttc also moved the requests still in its channel to `pending` (packet id 0: never
                    // written); a clean session discards them at the reconnect, so they were never sent.
                    // They are the next ones in request order; taking them out keeps the FIFO aligned.
                    let never_sent = eventloop
                        .pending
                        .iter()
                        .filter(|r| matches!(r, Request::Publish(p) if p.pkid == 0))
                        .count();
                    for _ in 0..never_sent {
                        t.fifo.pop_front();
                    }
                    let lost_track: Vec<u64> = t.inflight.drain().map(|(_, n)| n).collect();
                    t.outcome.unconfirmed.extend(lost_track);
                    eventloop.pending.clear();
                    true
                }
            }
        };
        if broken {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    producer.abort();
    let mut t = lock(&track);
    let inflight: Vec<u64> = t.inflight.drain().map(|(_, n)| n).collect();
    t.outcome.unconfirmed.extend(inflight);
    // Everything not answered or in flight was never written (deadline, or the producer gave up).
    let answered = t.outcome.acked.len() + t.outcome.unconfirmed.len() + t.outcome.refused.len();
    t.outcome.unsent = plan.count.saturating_sub(answered as u64);
    std::mem::take(&mut t.outcome)
}

/// One message a [`Collector`] received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Topic.
    pub topic: String,
    /// Payload bytes.
    pub payload: Bytes,
    /// Retain flag as delivered.
    pub retain: bool,
    /// QoS as delivered (0, 1 or 2).
    pub qos: u8,
    /// MQTT 5 user properties.
    pub user_properties: Vec<(String, String)>,
}

impl Received {
    /// The `meshbridge-id` user property the hub added.
    pub fn meshbridge_id(&self) -> Option<&str> {
        self.user_property(MESHBRIDGE_ID)
    }

    /// The first user property named `key`.
    pub fn user_property(&self, key: &str) -> Option<&str> {
        self.user_properties
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The test message this is, if its payload is one.
    pub fn msg_id(&self) -> Option<MsgId> {
        parse_payload(&self.payload)
    }
}

/// A subscriber that records every message it receives.
#[derive(Debug)]
pub struct Collector {
    received: Arc<Mutex<Vec<Received>>>,
    task: JoinHandle<()>,
}

impl Collector {
    /// Connects to `addr` as `client_id`, subscribes to `filters` at QoS 1 (again after every reconnect) and
    /// returns once the first subscription was acknowledged. `persistent` keeps the session (clean start off,
    /// one-hour expiry) so a broker that stays up queues messages across a collector reconnect.
    ///
    /// # Panics
    /// If the subscription is not acknowledged within 15 s.
    pub async fn start(
        addr: SocketAddr,
        client_id: &str,
        filters: &[&str],
        persistent: bool,
    ) -> Self {
        Self::start_paced(addr, client_id, filters, persistent, None).await
    }

    /// [`Self::start`] for a slow consumer: after each message it waits `pause` before it reads on, so
    /// the broker's writes to it back up (TCP) once it falls behind.
    pub async fn start_paced(
        addr: SocketAddr,
        client_id: &str,
        filters: &[&str],
        persistent: bool,
        pause: Option<Duration>,
    ) -> Self {
        let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(10));
        if persistent {
            options.set_clean_start(false);
            options.set_session_expiry_interval(Some(3600));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let received = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(AtomicBool::new(false));
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
        let task = {
            let received = received.clone();
            let subscribed = subscribed.clone();
            tokio::spawn(async move {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            for f in &filters {
                                // The channel has room for every filter; a full one means a stuck loop.
                                let _ = client.try_subscribe(f.clone(), QoS::AtLeastOnce);
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            subscribed.store(true, Ordering::Release);
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let user_properties = p
                                .properties
                                .as_ref()
                                .map(|props| props.user_properties.clone())
                                .unwrap_or_default();
                            lock(&received).push(Received {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: p.payload.clone(),
                                retain: p.retain,
                                qos: p.qos as u8,
                                user_properties,
                            });
                            if let Some(pause) = pause {
                                tokio::time::sleep(pause).await;
                            }
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !subscribed.load(Ordering::Acquire) {
            assert!(
                Instant::now() < deadline,
                "collector {client_id}: no SUBACK from {addr} within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self { received, task }
    }

    /// Everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.received).clone()
    }

    /// Number of messages received so far.
    pub fn count(&self) -> usize {
        lock(&self.received).len()
    }

    /// Waits until `pred` holds for what was received; `false` after `timeout`.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&[Received]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&lock(&self.received)) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until at least `count` messages arrived; `false` after `timeout`.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, |r| r.len() >= count).await
    }

    /// Waits until every message in `expected` arrived (by payload identity); `false` after `timeout`.
    pub async fn wait_for_all(&self, expected: &BTreeSet<MsgId>, timeout: Duration) -> bool {
        self.wait_until(timeout, |r| {
            let got: HashSet<MsgId> = r.iter().filter_map(Received::msg_id).collect();
            expected.iter().all(|id| got.contains(id))
        })
        .await
    }

    /// Waits until nothing new arrived for `period` (late duplicates get their chance to show), at most
    /// `timeout`.
    pub async fn settle(&self, period: Duration, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = self.count();
        let mut since = Instant::now();
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.count();
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() >= period {
                return;
            }
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Delivery compared with what the publishers saw acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Messages received from the given publishers (duplicates included).
    pub received: usize,
    /// Distinct messages received.
    pub distinct: usize,
    /// Acknowledged messages that never arrived.
    pub lost: Vec<MsgId>,
    /// Receptions whose `meshbridge-id` had been seen before: duplicates the hub's dedup let through.
    pub duplicates_by_id: usize,
    /// Receptions whose payload (publisher, number) had been seen before: any duplicate, including a message
    /// the publisher sent twice because its first PUBACK was lost with a killed agent.
    pub duplicates_by_payload: usize,
    /// First receptions that arrived after a later message of the same publisher.
    pub reordered: usize,
    /// Receptions without a `meshbridge-id`.
    pub missing_id: usize,
}

impl Report {
    /// Compares `received` with the acknowledged messages of `outcomes`; receptions from other publishers
    /// (or not test messages at all) are ignored.
    pub fn new(outcomes: &[&PublishOutcome], received: &[Received]) -> Self {
        let publishers: HashSet<&str> = outcomes.iter().map(|o| o.name.as_str()).collect();
        let mut report = Self::default();
        let mut seen_ids = HashSet::new();
        let mut seen_msgs = HashSet::new();
        let mut highest: HashMap<String, u64> = HashMap::new();
        for r in received {
            let Some(id) = r.msg_id() else { continue };
            if !publishers.contains(id.publisher.as_str()) {
                continue;
            }
            report.received += 1;
            match r.meshbridge_id() {
                Some(mid) => {
                    if !seen_ids.insert(mid.to_owned()) {
                        report.duplicates_by_id += 1;
                    }
                }
                None => report.missing_id += 1,
            }
            if seen_msgs.contains(&id) {
                report.duplicates_by_payload += 1;
                continue;
            }
            let top = highest.entry(id.publisher.clone()).or_insert(id.n);
            if id.n < *top {
                report.reordered += 1;
            }
            *top = (*top).max(id.n);
            seen_msgs.insert(id);
        }
        report.distinct = seen_msgs.len();
        report.lost = outcomes
            .iter()
            .flat_map(|o| o.acked_ids())
            .filter(|id| !seen_msgs.contains(id))
            .collect();
        report
    }

    /// Panics with the report unless no acknowledged message was lost.
    pub fn assert_no_loss(&self) {
        assert!(self.lost.is_empty(), "acknowledged messages lost: {self}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "received {} ({} distinct), lost {}, duplicates {} by meshbridge-id / {} by payload, \
             reordered {}, without meshbridge-id {}",
            self.received,
            self.distinct,
            self.lost.len(),
            self.duplicates_by_id,
            self.duplicates_by_payload,
            self.reordered,
            self.missing_id
        )?;
        if !self.lost.is_empty() {
            let first: Vec<String> = self.lost.iter().take(10).map(ToString::to_string).collect();
            write!(f, " (first lost: {})", first.join(", "))?;
        }
        Ok(())
    }
}

/// Publishes one QoS 1 message from a fresh MQTT 5 client `client_id` at `broker` and waits for its PUBACK,
/// then disconnects.
///
/// # Panics
/// If the connection fails or no PUBACK comes within 20 s.
pub async fn publish_acked(
    broker: SocketAddr,
    client_id: &str,
    topic: &str,
    payload: &[u8],
    retain: bool,
    properties: PublishProperties,
) {
    const WAIT: Duration = Duration::from_secs(20);
    let mut options = MqttOptions::new(client_id, broker.ip().to_string(), broker.port());
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(options, 8);
    client
        .publish_with_properties(
            topic,
            QoS::AtLeastOnce,
            retain,
            payload.to_vec(),
            properties,
        )
        .await
        .expect("queue the publish");
    let acked = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return,
                Ok(_) => {}
                Err(e) => panic!("{client_id}: connection failed before the PUBACK: {e}"),
            }
        }
    })
    .await;
    assert!(
        acked.is_ok(),
        "{client_id}: no PUBACK for {topic} within {WAIT:?}"
    );
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rx(topic: &str, payload: Bytes, id: Option<&str>) -> Received {
        Received {
            topic: topic.to_owned(),
            payload,
            retain: false,
            qos: 1,
            user_properties: id
                .map(|v| vec![(MESHBRIDGE_ID.to_owned(), v.to_owned())])
                .unwrap_or_default(),
        }
    }

    #[test]
    fn payload_round_trips() {
        for (name, n, pad) in [("p", 0, 0), ("line1-pub", 12_345, 64), ("x", u64::MAX, 3)] {
            let p = payload(name, n, pad);
            assert_eq!(
                parse_payload(&p),
                Some(MsgId {
                    publisher: name.to_owned(),
                    n
                })
            );
        }
        assert_eq!(parse_payload(b"21.5"), None);
        assert_eq!(parse_payload(b"p:notanumber:"), None);
        assert_eq!(parse_payload(&[0xff, b':', b'1', b':']), None);
    }

    #[test]
    fn report_counts_loss_duplicates_and_reordering() {
        let outcome = PublishOutcome {
            name: "p".to_owned(),
            acked: (0..5).collect(),
            unconfirmed: [5].into_iter().collect(),
            ..PublishOutcome::default()
        };
        let received = vec![
            rx("t", payload("p", 0, 1), Some("s/1")),
            rx("t", payload("p", 2, 1), Some("s/3")),
            rx("t", payload("p", 1, 1), Some("s/2")),
            // Redelivered by the hub: same meshbridge-id.
            rx("t", payload("p", 2, 1), Some("s/3")),
            // Sent twice by the publisher: new meshbridge-id, same payload.
            rx("t", payload("p", 1, 1), Some("s/9")),
            // Unconfirmed messages may arrive; other publishers are ignored.
            rx("t", payload("p", 5, 1), Some("s/6")),
            rx("t", payload("q", 3, 1), Some("s/7")),
            rx("t", Bytes::from_static(b"21.5"), None),
        ];
        let report = Report::new(&[&outcome], &received);
        assert_eq!(
            report,
            Report {
                received: 6,
                distinct: 4,
                lost: vec![
                    MsgId {
                        publisher: "p".to_owned(),
                        n: 3
                    },
                    MsgId {
                        publisher: "p".to_owned(),
                        n: 4
                    }
                ],
                duplicates_by_id: 1,
                duplicates_by_payload: 2,
                reordered: 1,
                missing_id: 0,
            }
        );
        assert!(report.to_string().contains("first lost: p:3, p:4"));
    }
}
