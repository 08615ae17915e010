//! The load: MQTT publishers at the edge and one subscriber at the cloud, all in this process.
//!
//! Every message carries its publisher id, sequence number and send time (nanoseconds since the bench
//! started, one clock for both ends because both ends are here), padded to [`PAYLOAD_LEN`] bytes. Each
//! publisher records which sequence numbers got a PUBACK, so a message the system acknowledged and then lost
//! is told apart from one that was never accepted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;

/// Payload size of every message, bytes.
pub(crate) const PAYLOAD_LEN: usize = 200;

/// Publisher id of the probe messages that check the path end to end before a measurement.
const PROBE_ID: u32 = u32::MAX;

/// MQTT keep-alive of the bench clients.
const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Nanoseconds since the bench started: the one clock of send and receive times.
pub(crate) fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

pub(crate) fn encode(publisher: u32, seq: u64, sent_ns: u64) -> Vec<u8> {
    let mut payload = vec![b'.'; PAYLOAD_LEN];
    payload[0..4].copy_from_slice(&publisher.to_le_bytes());
    payload[4..12].copy_from_slice(&seq.to_le_bytes());
    payload[12..20].copy_from_slice(&sent_ns.to_le_bytes());
    payload
}

fn decode(payload: &[u8]) -> Option<(u32, u64, u64)> {
    let publisher = u32::from_le_bytes(payload.get(0..4)?.try_into().ok()?);
    let seq = u64::from_le_bytes(payload.get(4..12)?.try_into().ok()?);
    let sent = u64::from_le_bytes(payload.get(12..20)?.try_into().ok()?);
    Some((publisher, seq, sent))
}

fn options(id: &str, addr: SocketAddr, clean: bool, inflight: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(clean)
        .set_inflight(inflight)
        .set_max_packet_size(1 << 20, 1 << 20);
    opts
}

/// One received message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Receipt {
    /// Publisher id.
    pub(crate) publisher: u32,
    /// Sequence number within the publisher.
    pub(crate) seq: u64,
    /// Send time, [`now_ns`].
    pub(crate) sent_ns: u64,
    /// Receive time, [`now_ns`].
    pub(crate) recv_ns: u64,
}

/// The cloud-side subscriber: reconnects by itself when the cloud broker goes away and comes back.
pub(crate) struct Subscriber {
    receipts: Arc<Mutex<Vec<Receipt>>>,
    received: Arc<AtomicU64>,
    probe_seen: Arc<AtomicU64>,
    stop: Arc<tokio::sync::Notify>,
    task: JoinHandle<()>,
}

impl Subscriber {
    /// Connects to `addr`, subscribes to `filter` at QoS 1 (again after every reconnect) and waits for the
    /// first SUBACK. The session is persistent (`clean_session = false`) so that a broker that keeps
    /// sessions across a restart queues for it while it is away.
    pub(crate) async fn start(addr: SocketAddr, filter: &str) -> Result<Self> {
        let opts = options("bench-sub", addr, false, 100);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let receipts = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let received = Arc::new(AtomicU64::new(0));
        let probe_seen = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(tokio::sync::Notify::new());
        let subscribed = Arc::new(tokio::sync::Notify::new());
        let task = {
            let (receipts, received, probe_seen, stop, subscribed) = (
                Arc::clone(&receipts),
                Arc::clone(&received),
                Arc::clone(&probe_seen),
                Arc::clone(&stop),
                Arc::clone(&subscribed),
            );
            let filter = filter.to_owned();
            tokio::spawn(async move {
                loop {
                    let event = tokio::select! {
                        () = stop.notified() => break,
                        event = eventloop.poll() => event,
                    };
                    match event {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            if client
                                .try_subscribe(filter.as_str(), QoS::AtLeastOnce)
                                .is_err()
                            {
                                eprintln!("  warning: subscriber could not queue its SUBSCRIBE");
                            }
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => subscribed.notify_one(),
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let recv_ns = now_ns();
                            let Some((publisher, seq, sent_ns)) = decode(&p.payload) else {
                                continue;
                            };
                            if publisher == PROBE_ID {
                                probe_seen.store(seq, Ordering::Relaxed);
                                continue;
                            }
                            if let Ok(mut all) = receipts.lock() {
                                all.push(Receipt {
                                    publisher,
                                    seq,
                                    sent_ns,
                                    recv_ns,
                                });
                            }
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        // The cloud broker is away: poll() reconnects on the next call.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    }
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(20), subscribed.notified())
            .await
            .context("subscriber got no SUBACK within 20 s")?;
        Ok(Self {
            receipts,
            received,
            probe_seen,
            stop,
            task,
        })
    }

    /// Messages received so far (duplicates included).
    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Sends probe messages from a separate client at `edge` until one arrives here: the path is up end to
    /// end (the agent connected to the hub, the bridge to the cloud broker).
    pub(crate) async fn probe(&self, edge: SocketAddr, topic: &str) -> Result<()> {
        let (client, mut eventloop) = AsyncClient::new(options("bench-probe", edge, true, 10), 10);
        // Keeps polling through errors: rumqttc reconnects on the next poll.
        let poller = tokio::spawn(async move {
            loop {
                if eventloop.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut n = 0u64;
        let result = loop {
            n += 1;
            // A full request channel (the connection is being re-established) is not fatal: try again.
            let _ = client.try_publish(
                topic,
                QoS::AtLeastOnce,
                false,
                encode(PROBE_ID, n, now_ns()),
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            if self.probe_seen.load(Ordering::Relaxed) > 0 {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(anyhow::anyhow!(
                    "no probe message reached the subscriber within 30 s"
                ));
            }
        };
        // Let the probe's PUBACKs come back before disconnecting (Mosquitto logs otherwise).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let _ = client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        poller.abort();
        result
    }

    /// Stops and returns everything received, in arrival order.
    pub(crate) async fn finish(self) -> Vec<Receipt> {
        self.stop.notify_one();
        let _ = self.task.await;
        self.receipts
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }
}

/// How publishers send.
#[derive(Debug, Clone)]
pub(crate) struct LoadSpec {
    /// Number of publishers (one MQTT connection each, own topic `telemetry/p<i>`).
    pub(crate) publishers: u32,
    /// Messages per second per publisher; `None` = as fast as the in-flight window allows.
    pub(crate) rate: Option<f64>,
    /// How long they publish.
    pub(crate) duration: Duration,
    /// Unacknowledged QoS 1 messages per publisher.
    pub(crate) inflight: u16,
}

/// What one publisher did.
#[derive(Debug, Clone, Default)]
pub(crate) struct Published {
    /// Messages handed to the connection (seq `0..sent`).
    pub(crate) sent: u64,
    /// `acked[seq]`: the broker sent a PUBACK for it.
    pub(crate) acked: Vec<bool>,
}

/// Running publishers.
pub(crate) struct Publishers {
    tasks: Vec<JoinHandle<Result<Published>>>,
}

impl Publishers {
    /// Connects every publisher (waiting for each CONNACK), then starts them all at once.
    pub(crate) async fn start(edge: SocketAddr, spec: &LoadSpec) -> Result<Self> {
        let go = Arc::new(tokio::sync::Barrier::new(spec.publishers as usize + 1));
        let mut tasks = Vec::with_capacity(spec.publishers as usize);
        let mut connected = Vec::with_capacity(spec.publishers as usize);
        for id in 0..spec.publishers {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            connected.push(ready_rx);
            tasks.push(tokio::spawn(crate::publisher::run(
                id,
                edge,
                spec.clone(),
                Arc::clone(&go),
                ready_tx,
            )));
        }
        for ready in connected {
            if tokio::time::timeout(Duration::from_secs(20), ready)
                .await
                .is_err()
            {
                bail!("a publisher did not connect within 20 s");
            }
        }
        go.wait().await;
        Ok(Self { tasks })
    }

    /// Waits for every publisher to finish its duration and collect its outstanding PUBACKs (up to
    /// `ack_wait` after the end), or to lose its connection.
    pub(crate) async fn finish(self) -> Result<Vec<Published>> {
        let mut out = Vec::with_capacity(self.tasks.len());
        for task in self.tasks {
            out.push(task.await??);
        }
        Ok(out)
    }
}
