//! The hub end to end on loopback: `cloud_hub::run` with its embedded cloud broker, a fake agent speaking the
//! wire protocol over real QUIC + mTLS, and an MQTT 5 subscriber on the cloud broker.

use std::future::Future;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use cloud_hub::pki;
use edge_agent::tls::{client_config, ClientTransport};
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream};
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS as MqttQoS;
use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
use shared::config::HubConfig;
use shared::envelope::{Envelope, Properties, QoS, TraceContext};
use shared::wire::{self, Capabilities, Frame, GoAwayCode, VersionRange, SUPPORTED};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound for every test: everything is loopback, so hitting it means a hang.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to wait for one expected frame or message.
const STEP: Duration = Duration::from_secs(10);
/// How long to watch for a message that must NOT arrive.
const QUIET: Duration = Duration::from_millis(700);
const NAMESPACE: &str = "acme/plant1/{site}";

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test exceeded its time bound")
}

fn free_tcp() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn free_udp() -> anyhow::Result<SocketAddr> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

/// Certificates for line1, line2 (configured) and line3 (signed by the same CA, not configured).
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(root: &Path) -> anyhow::Result<Self> {
        let dir = root.join("pki");
        pki::init(&dir, &[])?;
        for site in ["line1", "line2", "line3"] {
            pki::issue_site(&dir, site, Duration::from_secs(3600))?;
        }
        Ok(Self { dir })
    }
}

/// One `run()` of the hub.
struct RunningHub {
    quic: SocketAddr,
    mqtt: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<Result<(), cloud_hub::HubError>>,
}

impl RunningHub {
    /// Starts the hub on fresh ports with `root/data` as its data dir, and waits until it is ready.
    async fn start(root: &Path) -> anyhow::Result<Self> {
        let mqtt = free_tcp()?;
        Self::start_with(
            root,
            mqtt,
            &format!(
                "[broker]\nkind = \"embedded\"\nlisten = \"{mqtt}\"\nallow_anonymous = true\n"
            ),
        )
        .await
    }

    /// Starts the hub with an external cloud broker at `broker` (a port where nothing listens, so the hub
    /// serves without one after its startup wait), and waits until its QUIC port is bound.
    async fn start_without_broker(root: &Path) -> anyhow::Result<Self> {
        // A port that stays ours and never answers MQTT: bound, never accepted. A port only probed free
        // could be taken meanwhile by another test's broker, which the hub would then connect to (seen
        // once in CI: the hub welcomed instead of refusing).
        let hold = std::net::TcpListener::bind("127.0.0.1:0")?;
        let broker = hold.local_addr()?;
        // Kept open until the test process ends; one descriptor.
        std::mem::forget(hold);
        Self::start_with(
            root,
            broker,
            &format!(
                "[broker]\nkind = \"external\"\naddress = \"{broker}\"\nclient_id = \"hub\"\n"
            ),
        )
        .await
    }

    async fn start_with(root: &Path, mqtt: SocketAddr, broker: &str) -> anyhow::Result<Self> {
        let quic = free_udp()?;
        let embedded = broker.contains("embedded");
        let text = format!(
            r#"
data_dir = "data"
log = "info"
[listen]
quic = "{quic}"
[tls]
ca = "pki/ca.pem"
cert = "pki/hub.pem"
key = "pki/hub.key"
{broker}
# The status topics have their own test (tests/tests/e2e_status.rs); here the subscriber counts every
# message under the namespace.
[status]
enabled = false
[[sites]]
name = "line1"
namespace = "{NAMESPACE}"
[[sites]]
name = "line2"
namespace = "{NAMESPACE}"
"#
        );
        let cfg = HubConfig::from_toml_str(&text, root)?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(cloud_hub::run(cfg, stop.clone()));
        let hub = Self {
            quic,
            mqtt,
            stop,
            task,
        };
        hub.wait_ready(embedded).await?;
        Ok(hub)
    }

    /// Ready = the broker port accepts TCP (embedded broker only) and the QUIC port is taken (the endpoint
    /// binds last).
    async fn wait_ready(&self, embedded: bool) -> anyhow::Result<()> {
        tokio::time::timeout(STEP, async {
            loop {
                if self.task.is_finished() {
                    bail!("hub ended during startup");
                }
                let mqtt_up = !embedded || tokio::net::TcpStream::connect(self.mqtt).await.is_ok();
                if mqtt_up && UdpSocket::bind(self.quic).is_err() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .context("hub not ready in time")?
    }

    /// Cancels the token and waits for `run()` to return.
    async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        tokio::time::timeout(STEP, self.task)
            .await
            .context("hub did not stop in time")???;
        Ok(())
    }
}

/// A minimal agent: one QUIC connection, one bidi stream, raw frames.
struct FakeAgent {
    /// The site its certificate names, which its `Hello` gives as its name (a single agent, not a member
    /// of a redundant pair).
    site: String,
    _endpoint: Endpoint,
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
    buf: BytesMut,
}

impl FakeAgent {
    async fn connect(hub: SocketAddr, pki: &Pki, site: &str) -> anyhow::Result<Self> {
        let config = client_config(
            &pki.dir.join("ca.pem"),
            &pki.dir.join(format!("site-{site}.pem")),
            &pki.dir.join(format!("site-{site}.key")),
            &ClientTransport::default(),
            std::sync::Arc::new(|_| {}),
        )?;
        let mut endpoint = Endpoint::client("127.0.0.1:0".parse()?)?;
        endpoint.set_default_client_config(config);
        let conn = endpoint.connect(hub, "localhost")?.await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Self {
            site: site.to_owned(),
            _endpoint: endpoint,
            conn,
            send,
            recv,
            buf: BytesMut::new(),
        })
    }

    async fn write(&mut self, frame: &Frame) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        frame.encode(&mut out)?;
        self.send.write_all(&out).await?;
        Ok(())
    }

    async fn hello(&mut self, versions: VersionRange, incarnation: u64) -> anyhow::Result<Frame> {
        self.hello_with(versions, Capabilities::EMPTY, incarnation)
            .await
    }

    async fn hello_with(
        &mut self,
        versions: VersionRange,
        capabilities: Capabilities,
        incarnation: u64,
    ) -> anyhow::Result<Frame> {
        self.hello_acked(versions, capabilities, incarnation, 0)
            .await
    }

    /// `Hello` saying the agent's queue acknowledged up to `last_acked`.
    async fn hello_acked(
        &mut self,
        versions: VersionRange,
        capabilities: Capabilities,
        incarnation: u64,
        last_acked: u64,
    ) -> anyhow::Result<Frame> {
        self.write(&Frame::Hello {
            versions,
            capabilities,
            agent_name: self.site.clone(),
            incarnation,
            last_acked,
            config_version: 0,
            lane: 0,
            agent_version: String::new(),
            window: 0,
        })
        .await?;
        self.next().await
    }

    /// Connects and completes Hello/Welcome; returns the Welcome's `hub_high_water`.
    async fn welcomed(
        hub: SocketAddr,
        pki: &Pki,
        site: &str,
        incarnation: u64,
    ) -> anyhow::Result<(Self, u64)> {
        let mut agent = Self::connect(hub, pki, site).await?;
        match agent.hello(SUPPORTED, incarnation).await? {
            Frame::Welcome {
                version,
                hub_high_water,
                max_frame_size,
                max_message_size,
                max_topic_len,
                ..
            } => {
                assert_eq!(version, wire::PROTOCOL_VERSION);
                assert!(max_frame_size > 0);
                // The hub's default limits.max_message_size, and the topic room its namespace leaves.
                assert_eq!(max_message_size, 256 * 1024);
                let prefix = NAMESPACE.replace("{site}", site);
                assert_eq!(usize::from(max_topic_len), 65_535 - prefix.len() - 1);
                Ok((agent, hub_high_water))
            }
            other => bail!("expected Welcome, got {other:?}"),
        }
    }

    async fn batch(&mut self, entries: Vec<Envelope>) -> anyhow::Result<()> {
        self.write(&Frame::Batch { entries }).await
    }

    /// The next frame from the hub (an error if none comes in time or the stream ends).
    async fn next(&mut self) -> anyhow::Result<Frame> {
        tokio::time::timeout(STEP, async {
            loop {
                if let Some(frame) = wire::decode(&mut self.buf, wire::DEFAULT_MAX_FRAME_SIZE)? {
                    return Ok(frame);
                }
                if self.recv.read_buf(&mut self.buf).await? == 0 {
                    bail!("hub finished the stream");
                }
            }
        })
        .await
        .context("no frame from the hub in time")?
    }

    async fn expect_ack(&mut self, upto: u64) -> anyhow::Result<()> {
        match self.next().await? {
            Frame::Ack { upto: got } if got == upto => Ok(()),
            other => bail!("expected Ack{{upto: {upto}}}, got {other:?}"),
        }
    }

    /// Expects `GoAway{code}` and then the connection closed with the same application code.
    async fn expect_go_away(&mut self, code: GoAwayCode) -> anyhow::Result<String> {
        let reason = match self.next().await? {
            Frame::GoAway {
                code: got, reason, ..
            } if got == code => reason,
            other => bail!("expected GoAway {code:?}, got {other:?}"),
        };
        let closed = tokio::time::timeout(STEP, self.conn.closed()).await?;
        match closed {
            ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code.into_inner(), u64::from(code.code()));
            }
            other => bail!("expected an application close, got {other}"),
        }
        Ok(reason)
    }
}

fn envelope(origin: &str, seq: u64, topic: &str, payload: &'static [u8], qos: QoS) -> Envelope {
    Envelope {
        origin: origin.to_owned(),
        seq,
        topic: topic.to_owned(),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        properties: Properties::default(),
        trace: None,
        enqueued_at_ms: 1,
    }
}

/// An MQTT 5 subscriber on the cloud broker, forwarding every PUBLISH it receives.
struct Subscriber {
    rx: mpsc::UnboundedReceiver<Publish>,
    task: JoinHandle<()>,
}

impl Subscriber {
    async fn start(broker: SocketAddr, id: &str, filter: &str) -> anyhow::Result<Self> {
        let mut options = MqttOptions::new(id, broker.ip().to_string(), broker.port());
        options.set_keep_alive(Duration::from_secs(10));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client.subscribe(filter, MqttQoS::ExactlyOnce).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let task = tokio::spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        if let Some(s) = subscribed_tx.take() {
                            let _ = s.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(STEP, subscribed)
            .await
            .context("no SUBACK in time")??;
        Ok(Self { rx, task })
    }

    async fn next(&mut self) -> anyhow::Result<Publish> {
        tokio::time::timeout(STEP, self.rx.recv())
            .await
            .context("no message in time")?
            .context("subscriber ended")
    }

    /// Fails if a message arrives within [`QUIET`].
    async fn expect_nothing(&mut self) -> anyhow::Result<()> {
        match tokio::time::timeout(QUIET, self.rx.recv()).await {
            Err(_) => Ok(()),
            Ok(p) => bail!("unexpected message: {p:?}"),
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn topic(p: &Publish) -> String {
    String::from_utf8_lossy(&p.topic).into_owned()
}

fn user_props(p: &Publish) -> Vec<(String, String)> {
    p.properties
        .as_ref()
        .map(|props: &PublishProperties| props.user_properties.clone())
        .unwrap_or_default()
}

fn meshbridge_id(p: &Publish) -> Option<String> {
    user_props(p)
        .into_iter()
        .find(|(k, _)| k == cloud_hub::MESHBRIDGE_ID)
        .map(|(_, v)| v)
}

#[tokio::test]
async fn batch_is_published_under_the_namespace_and_then_acked() -> anyhow::Result<()> {
    bounded(async {
        let root = tempfile::tempdir()?;
        let pki = Pki::new(root.path())?;
        let hub = RunningHub::start(root.path()).await?;
        let mut sub = Subscriber::start(hub.mqtt, "sub-live", "acme/#").await?;
        let (mut agent, high_water) = FakeAgent::welcomed(hub.quic, &pki, "line1", 7).await?;
        assert_eq!(high_water, 0, "fresh hub knows nothing of this site");

        let mut first = envelope(
            "line1",
            1,
            "telemetry/robot5/temp",
            b"21.5",
            QoS::AtLeastOnce,
        );
        first.properties = Properties {
            user: vec![
                ("unit".to_owned(), "C".to_owned()),
                ("unit".to_owned(), "again".to_owned()),
            ],
            content_type: Some("text/plain".to_owned()),
            response_topic: Some("replies/robot5".to_owned()),
            correlation_data: Some(Bytes::from_static(b"corr")),
            message_expiry: Some(3600),
            payload_format_utf8: true,
        };
        first.trace = Some(TraceContext {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned(),
            tracestate: Some("vendor=1".to_owned()),
        });
        let second = envelope("line1", 2, "telemetry/robot5/rpm", b"1200", QoS::AtMostOnce);
        let mut third = envelope("line1", 3, "status/robot5", b"online", QoS::ExactlyOnce);
        third.retain = true;
        agent.batch(vec![first, second, third]).await?;
        agent.expect_ack(3).await?;

        // The live subscriber got all three, in order, mapped into line1's namespace.
        let got: Vec<Publish> = vec![sub.next().await?, sub.next().await?, sub.next().await?];
        // rumqttd forwards every message at the subscription's QoS (routing.rs sets `publish.qos` from the
        // filter), so the QoS the hub published with is not observable here; the envelope -> PUBLISH mapping,
        // QoS included, is unit-tested in agent_conn.rs.
        let cases: &[(&str, &[u8], &str)] = &[
            (
                "acme/plant1/line1/telemetry/robot5/temp",
                b"21.5",
                "line1/1",
            ),
            ("acme/plant1/line1/telemetry/robot5/rpm", b"1200", "line1/2"),
            ("acme/plant1/line1/status/robot5", b"online", "line1/3"),
        ];
        for (p, &(want_topic, payload, id)) in got.iter().zip(cases) {
            assert_eq!(topic(p), want_topic);
            assert_eq!(&p.payload[..], payload, "{want_topic}");
            assert_eq!(meshbridge_id(p).as_deref(), Some(id), "{want_topic}");
        }
        let props = got[0]
            .properties
            .as_ref()
            .context("first message has properties")?;
        assert_eq!(
            props.user_properties,
            vec![
                ("unit".to_owned(), "C".to_owned()),
                ("unit".to_owned(), "again".to_owned()),
                (
                    "traceparent".to_owned(),
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned()
                ),
                ("tracestate".to_owned(), "vendor=1".to_owned()),
                ("meshbridge-id".to_owned(), "line1/1".to_owned()),
            ]
        );
        assert_eq!(props.content_type.as_deref(), Some("text/plain"));
        assert_eq!(
            props.response_topic.as_deref(),
            Some("acme/plant1/line1/replies/robot5"),
            "the response topic is mapped into the namespace like the topic"
        );
        assert_eq!(props.correlation_data.as_deref(), Some(&b"corr"[..]));
        assert_eq!(props.payload_format_indicator, Some(1));
        assert!(props
            .message_expiry_interval
            .is_some_and(|s| s <= 3600 && s > 3500));

        // The broker holds the retained one since before the Ack: a late subscriber gets it, flagged retained.
        let mut late =
            Subscriber::start(hub.mqtt, "sub-late", "acme/plant1/line1/status/#").await?;
        let retained = late.next().await?;
        assert_eq!(topic(&retained), "acme/plant1/line1/status/robot5");
        assert!(retained.retain, "retain flag kept");
        assert_eq!(&retained.payload[..], b"online");

        hub.stop().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn replayed_batch_is_acked_but_not_published_again() -> anyhow::Result<()> {
    bounded(async {
        let root = tempfile::tempdir()?;
        let pki = Pki::new(root.path())?;
        let hub = RunningHub::start(root.path()).await?;
        let mut sub = Subscriber::start(hub.mqtt, "sub", "acme/#").await?;
        let (mut agent, _) = FakeAgent::welcomed(hub.quic, &pki, "line1", 1).await?;
        let batch = |seqs: &[u64]| -> Vec<Envelope> {
            seqs.iter()
                .map(|&s| envelope("line1", s, "telemetry/x", b"v", QoS::AtLeastOnce))
                .collect()
        };
        agent.batch(batch(&[1, 2, 3])).await?;
        agent.expect_ack(3).await?;
        // The same seqs again (as after a lost ack), then one mixing old and new.
        agent.batch(batch(&[1, 2, 3])).await?;
        agent.expect_ack(3).await?;
        agent.batch(batch(&[3, 4])).await?;
        agent.expect_ack(4).await?;

        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(meshbridge_id(&sub.next().await?).context("meshbridge-id")?);
        }
        assert_eq!(ids, ["line1/1", "line1/2", "line1/3", "line1/4"]);
        sub.expect_nothing().await?;

        // A reconnect learns the high-water mark.
        drop(agent);
        let (_agent, high_water) = FakeAgent::welcomed(hub.quic, &pki, "line1", 1).await?;
        assert_eq!(high_water, 4);
        hub.stop().await?;
        Ok(())
    })
    .await
}

/// A refusal whose `Ack` never reached the agent is not lost with it: the hub keeps it (durably, across a
/// restart), resumes the agent just below it, refuses the resent entry again, and forgets it once the
/// agent's `Hello` shows it acknowledged past it. Without this the agent deleted the entry on resume
/// without dead-lettering it.
#[tokio::test]
async fn a_refusal_lost_with_the_connection_is_given_again() -> anyhow::Result<()> {
    bounded(async {
        let root = tempfile::tempdir()?;
        let pki = Pki::new(root.path())?;
        let entries = |seqs: &[u64]| -> Vec<Envelope> {
            seqs.iter()
                .map(|&seq| {
                    let mut e = envelope("line1", seq, "telemetry/x", b"v", QoS::AtLeastOnce);
                    if seq == 2 {
                        // Over the hub's 256 KiB limits.max_message_size: refused with 0x95.
                        e.payload = Bytes::from(vec![0u8; 300 * 1024]);
                    }
                    e
                })
                .collect()
        };
        let expect_refused = |frame: Frame| match frame {
            Frame::Refused {
                seq: 2,
                reason_code: 0x95,
                ..
            } => Ok(()),
            other => bail!("expected Refused{{seq: 2, 0x95}}, got {other:?}"),
        };

        let hub = RunningHub::start(root.path()).await?;
        let mut sub = Subscriber::start(hub.mqtt, "sub", "acme/#").await?;
        let (mut agent, high_water) = FakeAgent::welcomed(hub.quic, &pki, "line1", 1).await?;
        assert_eq!(high_water, 0);
        agent.batch(entries(&[1, 2, 3])).await?;
        expect_refused(agent.next().await?)?;
        agent.expect_ack(3).await?;
        let ids = [
            meshbridge_id(&sub.next().await?),
            meshbridge_id(&sub.next().await?),
        ];
        assert_eq!(
            ids,
            [Some("line1/1".to_owned()), Some("line1/3".to_owned())]
        );
        // The agent "lost" both frames with the connection, and the hub restarts.
        drop(agent);
        hub.stop().await?;

        let hub = RunningHub::start(root.path()).await?;
        let mut sub = Subscriber::start(hub.mqtt, "sub2", "acme/#").await?;
        let mut agent = FakeAgent::connect(hub.quic, &pki, "line1").await?;
        match agent.hello(SUPPORTED, 1).await? {
            Frame::Welcome { hub_high_water, .. } => assert_eq!(
                hub_high_water, 1,
                "resumed at the committed mark (3), past a refusal the agent never received"
            ),
            other => bail!("expected Welcome, got {other:?}"),
        }
        agent.batch(entries(&[2, 3])).await?;
        expect_refused(agent.next().await?)?;
        agent.expect_ack(3).await?;
        sub.expect_nothing().await?;

        // Once the agent says it acknowledged past it, the refusal is forgotten.
        drop(agent);
        let mut agent = FakeAgent::connect(hub.quic, &pki, "line1").await?;
        match agent
            .hello_acked(SUPPORTED, Capabilities::EMPTY, 1, 3)
            .await?
        {
            Frame::Welcome { hub_high_water, .. } => assert_eq!(hub_high_water, 3),
            other => bail!("expected Welcome, got {other:?}"),
        }
        hub.stop().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn dedup_survives_a_hub_restart() -> anyhow::Result<()> {
    bounded(async {
        let root = tempfile::tempdir()?;
        let pki = Pki::new(root.path())?;
        let batch = |seqs: &[u64]| -> Vec<Envelope> {
            seqs.iter()
                .map(|&s| envelope("line2", s, "telemetry/y", b"w", QoS::AtLeastOnce))
                .collect()
        };

        let hub = RunningHub::start(root.path()).await?;
        let (mut agent, _) = FakeAgent::welcomed(hub.quic, &pki, "line2", 42).await?;
        agent.batch(batch(&[1, 2, 3])).await?;
        agent.expect_ack(3).await?;
        // Graceful stop: the connected agent is told so.
        let stopping = tokio::spawn(hub.stop());
        agent.expect_go_away(GoAwayCode::ShuttingDown).await?;
        stopping.await??;

        // rumqttd's router thread cannot be stopped: the second run gets fresh ports (same data dir).
        let hub = RunningHub::start(root.path()).await?;
        let mut sub = Subscriber::start(hub.mqtt, "sub2", "acme/#").await?;
        let (mut agent, high_water) = FakeAgent::welcomed(hub.quic, &pki, "line2", 42).await?;
        assert_eq!(high_water, 3, "restored from hub.redb");
        agent.batch(batch(&[2, 3, 4])).await?;
        agent.expect_ack(4).await?;
        let p = sub.next().await?;
        assert_eq!(meshbridge_id(&p).as_deref(), Some("line2/4"));
        assert_eq!(topic(&p), "acme/plant1/line2/telemetry/y");
        sub.expect_nothing().await?;

        // A new incarnation of the agent's queue starts over: the hub does not claim to have its seqs.
        drop(agent);
        let (mut agent, high_water) = FakeAgent::welcomed(hub.quic, &pki, "line2", 43).await?;
        assert_eq!(high_water, 0);
        agent.batch(batch(&[1])).await?;
        agent.expect_ack(1).await?;
        assert_eq!(
            meshbridge_id(&sub.next().await?).as_deref(),
            Some("line2/1")
        );
        hub.stop().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn site_not_configured_is_refused() -> anyhow::Result<()> {
    bounded(async {
        let root = tempfile::tempdir()?;
        let pki = Pki::new(root.path())?;
        let hub = RunningHub::start(root.path()).await?;
        let mut agent = FakeAgent::connect(hub.quic, &pki, "line3").await?;
        agent
            .write(&Frame::Hello {
                versions: SUPPORTED,
                capabilities: Capabilities::EMPTY,
                // Claiming a configured name changes nothing: the certificate says line3.
                agent_name: "line1".to_owned(),
                incarnation: 1,
                last_acked: 0,
                config_version: 0,
                lane: 0,
                agent_version: String::new(),
                window: 0,
            })
            .await?;
        let reason = agent.expect_go_away(GoAwayCode::Unauthorized).await?;
        assert_eq!(reason, "site line3 is not configured on this hub");
        hub.stop().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn incompatible_version_is_refused() -> anyhow::Result<()> {
    bounded(async {
        let root = tempfile::tempdir()?;
        let pki = Pki::new(root.path())?;
        let hub = RunningHub::start(root.path()).await?;
        let mut agent = FakeAgent::connect(hub.quic, &pki, "line1").await?;
        let versions = VersionRange { min: 90, max: 99 };
        agent
            .write(&Frame::Hello {
                versions,
                capabilities: Capabilities::EMPTY,
                agent_name: "line1".to_owned(),
                incarnation: 1,
                last_acked: 0,
                config_version: 0,
                lane: 0,
                agent_version: String::new(),
                window: 0,
            })
            .await?;
        let reason = agent
            .expect_go_away(GoAwayCode::IncompatibleVersion)
            .await?;
        assert_eq!(
            reason,
            wire::negotiate(versions, SUPPORTED)
                .expect_err("disjoint")
                .to_string()
        );
        hub.stop().await?;
        Ok(())
    })
    .await
}

/// Issue 7, hole 9: while the cloud broker is not connected the hub refuses before `Welcome` (welcoming
/// and then failing the first batch made agents reset their backoff and storm). The retry-after goes only to
/// an agent that announced it can read it: an older agent gets the frozen `GoAway` layout, which its decoder
/// accepts (it refuses trailing bytes), and a code it logs as unknown.
#[tokio::test]
async fn hub_without_its_cloud_broker_refuses_before_welcome_with_a_retry_after(
) -> anyhow::Result<()> {
    bounded(async {
        let root = tempfile::tempdir()?;
        let pki = Pki::new(root.path())?;
        let hub = RunningHub::start_without_broker(root.path()).await?;

        let mut agent = FakeAgent::connect(hub.quic, &pki, "line1").await?;
        match agent
            .hello_with(SUPPORTED, Capabilities::RETRY_AFTER, 1)
            .await?
        {
            Frame::GoAway {
                code: GoAwayCode::Unavailable,
                retry_after_ms: Some(ms),
                ..
            } => assert_eq!(ms, 1000),
            other => bail!("expected GoAway Unavailable with a retry-after, got {other:?}"),
        }

        let mut old = FakeAgent::connect(hub.quic, &pki, "line1").await?;
        old.write(&Frame::Hello {
            versions: SUPPORTED,
            capabilities: Capabilities::EMPTY,
            agent_name: "line1".to_owned(),
            incarnation: 1,
            last_acked: 0,
            config_version: 0,
            lane: 0,
            agent_version: String::new(),
            window: 0,
        })
        .await?;
        // Raw bytes: exactly `u16 code, str16 reason`, nothing after it.
        let bytes = tokio::time::timeout(STEP, async {
            let mut all = Vec::new();
            while let Ok(Some(chunk)) = old.recv.read_chunk(usize::MAX, true).await {
                all.extend_from_slice(&chunk.bytes);
            }
            all
        })
        .await?;
        let reason = "the hub's cloud broker is not connected";
        let mut want = u32::try_from(1 + 2 + 2 + reason.len())?
            .to_be_bytes()
            .to_vec();
        want.extend_from_slice(&[0x0B, 0, 7]);
        want.extend_from_slice(&u16::try_from(reason.len())?.to_be_bytes());
        want.extend_from_slice(reason.as_bytes());
        assert_eq!(bytes, want);
        hub.stop().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn second_connection_replaces_the_first() -> anyhow::Result<()> {
    bounded(async {
        let root = tempfile::tempdir()?;
        let pki = Pki::new(root.path())?;
        let hub = RunningHub::start(root.path()).await?;
        let mut sub = Subscriber::start(hub.mqtt, "sub", "acme/#").await?;
        let (mut first, _) = FakeAgent::welcomed(hub.quic, &pki, "line1", 5).await?;
        first
            .batch(vec![envelope("line1", 1, "a", b"1", QoS::AtLeastOnce)])
            .await?;
        first.expect_ack(1).await?;

        let (mut second, high_water) = FakeAgent::welcomed(hub.quic, &pki, "line1", 5).await?;
        assert_eq!(high_water, 1);
        first.expect_go_away(GoAwayCode::Replaced).await?;
        // The new connection is served.
        second
            .batch(vec![envelope("line1", 2, "a", b"2", QoS::AtLeastOnce)])
            .await?;
        second.expect_ack(2).await?;
        assert_eq!(
            meshbridge_id(&sub.next().await?).as_deref(),
            Some("line1/1")
        );
        assert_eq!(
            meshbridge_id(&sub.next().await?).as_deref(),
            Some("line1/2")
        );
        hub.stop().await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn line1_certificate_cannot_publish_into_line2_namespace() -> anyhow::Result<()> {
    bounded(async {
        let root = tempfile::tempdir()?;
        let pki = Pki::new(root.path())?;
        let hub = RunningHub::start(root.path()).await?;
        let mut line2 = Subscriber::start(hub.mqtt, "sub-line2", "acme/plant1/line2/#").await?;
        let mut all = Subscriber::start(hub.mqtt, "sub-all", "acme/#").await?;
        let (mut agent, _) = FakeAgent::welcomed(hub.quic, &pki, "line1", 9).await?;
        // Bodies claiming line2, and topics trying to climb out of the prefix.
        agent
            .batch(vec![
                envelope("line2", 1, "telemetry/x", b"spoof", QoS::AtLeastOnce),
                envelope(
                    "line2",
                    2,
                    "/acme/plant1/line2/telemetry/x",
                    b"spoof",
                    QoS::AtLeastOnce,
                ),
                envelope("line2", 3, "$SYS/x", b"spoof", QoS::AtLeastOnce),
            ])
            .await?;
        agent.expect_ack(3).await?;
        let cases = [
            ("acme/plant1/line1/telemetry/x", "line1/1"),
            (
                "acme/plant1/line1//acme/plant1/line2/telemetry/x",
                "line1/2",
            ),
            ("acme/plant1/line1/$SYS/x", "line1/3"),
        ];
        for (want_topic, want_id) in cases {
            let p = all.next().await?;
            assert_eq!(topic(&p), want_topic);
            assert_eq!(meshbridge_id(&p).as_deref(), Some(want_id));
        }
        line2.expect_nothing().await?;
        hub.stop().await?;
        Ok(())
    })
    .await
}
