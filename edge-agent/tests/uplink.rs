//! End-to-end tests of the agent against an in-test fake hub, on loopback with ephemeral ports.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS as MqttQoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use shared::envelope::QoS;
use shared::queue::{Queue, RedbQueue};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use common::*;

const LONG: Duration = Duration::from_secs(30);

struct Agent {
    stop: CancellationToken,
    task: JoinHandle<Result<(), edge_agent::AgentError>>,
}

impl Agent {
    async fn start(text: &str, base: &std::path::Path, mqtt_port: u16) -> Result<Self> {
        let cfg = parse_config(text, base)?;
        let stop = CancellationToken::new();
        let task = tokio::spawn(edge_agent::run(cfg, stop.clone()));
        wait_listening(mqtt_port, LONG).await?;
        Ok(Self { stop, task })
    }

    async fn shutdown(self) -> Result<()> {
        self.stop.cancel();
        tokio::time::timeout(LONG, self.task)
            .await
            .context("agent did not stop in time")??
            .context("agent failed")
    }
}

fn queue_file(data: &std::path::Path) -> std::path::PathBuf {
    data.join(edge_agent::QUEUE_FILE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_reaches_hub_with_everything_kept_and_in_order() -> Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let state = FakeHub::new_state(AckMode::All, 0);
    let hub = FakeHub::start(&pki, 0, Arc::clone(&state)).await?;
    let mqtt = free_tcp_port()?;
    let data = dir.path().join("data");
    let text = agent_toml(&data, &pki, hub.addr.port(), &embedded_broker(mqtt));
    let agent = Agent::start(&text, dir.path(), mqtt).await?;

    // One retained QoS 1 message with v5 properties, through a v5 client.
    let mut options = MqttOptions::new("props", "127.0.0.1", mqtt);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let properties = PublishProperties {
        user_properties: vec![
            ("k".into(), "v".into()),
            (
                "traceparent".into(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            ),
        ],
        content_type: Some("text/plain".into()),
        ..PublishProperties::default()
    };
    client
        .publish_with_properties(
            "telemetry/robot5/temp",
            MqttQoS::AtLeastOnce,
            true,
            "21.5",
            properties,
        )
        .await?;
    client
        .publish("status/not-routed", MqttQoS::AtLeastOnce, false, "x")
        .await?;
    let mut acks = 0;
    tokio::time::timeout(LONG, async {
        while acks < 2 {
            if let Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_)) =
                eventloop.poll().await?
            {
                acks += 1;
            }
        }
        anyhow::Ok(())
    })
    .await??;
    wait_until("the first message at the hub", LONG, || {
        !hub.received_seqs().is_empty()
    })
    .await?;
    {
        let s = state.lock().expect("lock");
        let e = &s.received[0];
        assert_eq!(e.seq, 1);
        assert_eq!(e.origin, SITE);
        assert_eq!(e.topic, "telemetry/robot5/temp");
        assert_eq!(&e.payload[..], b"21.5");
        assert_eq!(e.qos, QoS::AtLeastOnce);
        assert!(e.retain);
        assert_eq!(e.properties.user, vec![("k".to_owned(), "v".to_owned())]);
        assert_eq!(e.properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(
            e.trace.as_ref().map(|t| t.traceparent.as_str()),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(s.hellos.len(), 1);
        assert_eq!(s.hellos[0].1, 0, "fresh queue: last_acked 0");
    }

    // Many messages from a second client: delivered with seq 2..=n+1, in publish order.
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let n = 300;
    tokio::time::timeout(LONG, publish_tracked(mqtt, "bulk", n, Arc::clone(&acked))).await??;
    wait_until("all messages at the hub", LONG, || {
        hub.received_seqs().len() == n + 1
    })
    .await?;
    {
        let s = state.lock().expect("lock");
        let seqs: Vec<u64> = s.received.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=n as u64 + 1).collect::<Vec<_>>());
        for (i, e) in s.received[1..].iter().enumerate() {
            assert_eq!(e.topic, format!("telemetry/t/{i}"));
            assert_eq!(e.payload, i.to_string().as_bytes());
            assert_eq!(e.properties.user, vec![("idx".to_owned(), i.to_string())]);
            assert!(!e.retain);
        }
    }
    agent.shutdown().await?;
    assert!(
        state.lock().expect("lock").saw_goaway_normal,
        "clean shutdown says GoAway Normal"
    );
    let queue = RedbQueue::open(queue_file(&data), Default::default())?;
    assert_eq!(
        queue.stats().depth,
        0,
        "everything acked by the hub is deleted"
    );
    assert_eq!(queue.stats().acked, n as u64 + 1);
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_down_queues_then_delivers_in_order_and_high_water_skips() -> Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let hub_port = free_udp_port()?;
    let mqtt = free_tcp_port()?;
    let data = dir.path().join("data");
    let text = agent_toml(&data, &pki, hub_port, &embedded_broker(mqtt));

    // No hub: publishers are still acknowledged (after commit) and the queue grows.
    let agent = Agent::start(&text, dir.path(), mqtt).await?;
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let n = 200;
    tokio::time::timeout(LONG, publish_tracked(mqtt, "p1", n, Arc::clone(&acked))).await??;
    agent.shutdown().await?;
    {
        let queue = RedbQueue::open(queue_file(&data), Default::default())?;
        let stats = queue.stats();
        assert_eq!(
            stats.depth, n as u64,
            "every acknowledged message is queued"
        );
        assert_eq!(stats.acked, 0);
        let entries = queue.read(1, n, usize::MAX)?;
        assert_eq!(entries.len(), n);
    }

    // The hub comes up and says it already has 1..=50 (of this incarnation): they are not resent.
    let state = FakeHub::new_state(AckMode::All, 50);
    let hub = FakeHub::start(&pki, hub_port, Arc::clone(&state)).await?;
    let agent = Agent::start(&text, dir.path(), mqtt).await?;
    wait_until("the backlog at the hub", LONG, || {
        hub.received_seqs().len() == n - 50
    })
    .await?;
    assert_eq!(hub.received_seqs(), (51..=n as u64).collect::<Vec<_>>());
    // Live traffic after the backlog continues the sequence with no gap.
    let more = Arc::new(Mutex::new(HashSet::new()));
    tokio::time::timeout(LONG, publish_tracked(mqtt, "p2", 20, Arc::clone(&more))).await??;
    wait_until("live messages at the hub", LONG, || {
        hub.received_seqs().len() == n - 50 + 20
    })
    .await?;
    assert_eq!(
        hub.received_seqs(),
        (51..=n as u64 + 20).collect::<Vec<_>>()
    );
    agent.shutdown().await?;
    let queue = RedbQueue::open(queue_file(&data), Default::default())?;
    assert_eq!(queue.stats().depth, 0);
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_batches_are_resent_after_reconnect() -> Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let hub_port = free_udp_port()?;
    let mqtt = free_tcp_port()?;
    let data = dir.path().join("data");
    let text = agent_toml(&data, &pki, hub_port, &embedded_broker(mqtt));
    let agent = Agent::start(&text, dir.path(), mqtt).await?;
    // Queue a backlog first, so the first connection fills its window with full batches.
    let n = 300;
    let acked = Arc::new(Mutex::new(HashSet::new()));
    tokio::time::timeout(LONG, publish_tracked(mqtt, "p", n, Arc::clone(&acked))).await??;
    // The hub takes at least 100 entries on the first connection, acks none, and drops the connection.
    let state = FakeHub::new_state(AckMode::DropFirstAfter(100), 0);
    let hub = FakeHub::start(&pki, hub_port, Arc::clone(&state)).await?;
    wait_until("a second connection delivering everything", LONG, || {
        let s = state.lock().expect("lock");
        s.per_connection.len() >= 2
            && s.per_connection
                .last()
                .is_some_and(|c| c.last() == Some(&(n as u64)))
    })
    .await?;
    {
        let s = state.lock().expect("lock");
        let first = &s.per_connection[0];
        assert!(
            first.len() >= 100,
            "first connection got {} entries",
            first.len()
        );
        let second = &s.per_connection[1];
        assert_eq!(
            second.first(),
            Some(&1),
            "nothing was acked: resend starts at 1"
        );
        assert_eq!(
            second,
            &(1..=n as u64).collect::<Vec<_>>(),
            "second connection: all, in order"
        );
        assert_eq!(s.hellos[1].1, 0, "second Hello: last_acked still 0");
    }
    agent.shutdown().await?;
    let queue = RedbQueue::open(queue_file(&data), Default::default())?;
    assert_eq!(queue.stats().depth, 0);
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_credentials_are_enforced() -> Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let state = FakeHub::new_state(AckMode::All, 0);
    let hub = FakeHub::start(&pki, 0, Arc::clone(&state)).await?;
    let mqtt = free_tcp_port()?;
    let data = dir.path().join("data");
    let broker = format!(
        "{}\nusername = \"site\"\npassword = \"s3cret\"",
        embedded_broker(mqtt)
    );
    let text = agent_toml(&data, &pki, hub.addr.port(), &broker);
    let agent = Agent::start(&text, dir.path(), mqtt).await?;

    for (credentials, accepted) in [
        (None, false),
        (Some(("site", "wrong")), false),
        (Some(("other", "s3cret")), false),
        (Some(("site", "s3cret")), true),
    ] {
        let mut options = MqttOptions::new("auth", "127.0.0.1", mqtt);
        options.set_keep_alive(Duration::from_secs(30));
        if let Some((u, p)) = credentials {
            options.set_credentials(u, p);
        }
        let (_client, mut eventloop) = AsyncClient::new(options, 4);
        let outcome = tokio::time::timeout(LONG, eventloop.poll()).await?;
        match (outcome, accepted) {
            (Ok(Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(ack))), true) => {
                assert_eq!(
                    ack.code,
                    rumqttc::v5::mqttbytes::v5::ConnectReturnCode::Success
                );
            }
            (Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)), false) => {
                assert_eq!(
                    code,
                    rumqttc::v5::mqttbytes::v5::ConnectReturnCode::BadUserNamePassword
                );
            }
            (other, accepted) => panic!("{credentials:?} (accepted: {accepted}): {other:?}"),
        }
    }
    agent.shutdown().await?;
    hub.stop().await;
    Ok(())
}

/// Issue 7, hole 10: with the default uplink settings, a hub that does not answer (down, or its port
/// filtered) gets a fresh QUIC Initial at least every ~0.3 s, so the agent finds it promptly once it is back,
/// and no more than a few datagrams per second, so it is not hammered. One handshake attempt kept alive for
/// the whole backoff (up to 10 s by default) used to leave gaps of seconds between Initials (quinn resends
/// them after 0.3 s, 0.9 s, 2.1 s, ...), which is what made resuming after an outage take 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_hub_is_probed_promptly_and_at_a_bounded_pace() -> Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    // A "hub" that never answers: a bound UDP port where nothing speaks QUIC.
    let silent = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let port = silent.local_addr()?.port();
    let mqtt = free_tcp_port()?;
    let data = dir.path().join("data");
    // Every timer at its default.
    let text = agent_toml(&data, &pki, port, &embedded_broker(mqtt))
        .lines()
        .filter(|l| {
            !["reconnect_", "keep_alive", "idle_timeout"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let agent = Agent::start(&text, dir.path(), mqtt).await?;

    let window = Duration::from_secs(10);
    let start = tokio::time::Instant::now();
    let mut arrivals = Vec::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let left = window.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, silent.recv_from(&mut buf)).await {
            Ok(received) => {
                received?;
                arrivals.push(start.elapsed());
            }
            Err(_) => break,
        }
    }
    agent.shutdown().await?;

    let mut gaps: Vec<Duration> = arrivals.windows(2).map(|w| w[1] - w[0]).collect();
    if let Some(first) = arrivals.first() {
        gaps.push(*first);
    }
    let max_gap = gaps.iter().max().copied().unwrap_or(window);
    let rate = arrivals.len() as f64 / window.as_secs_f64();
    eprintln!(
        "silent hub: {} datagrams in {window:?} ({rate:.1}/s), longest gap {max_gap:?}",
        arrivals.len()
    );
    assert!(
        max_gap <= Duration::from_millis(700),
        "a silent hub went {max_gap:?} without a handshake attempt"
    );
    assert!(
        rate <= 10.0,
        "the agent hammers a silent hub: {rate:.1} datagrams/s"
    );
    Ok(())
}
