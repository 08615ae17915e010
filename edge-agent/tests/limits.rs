//! The path's size limits on the agent (issue 7, "acknowledged, then dropped"): the hub's announced
//! maximum message size is enforced at PUBLISH time, persisted, and still enforced by an agent restarted
//! while the hub is down. Real agent, fake hub on loopback, ephemeral ports.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::mqttbytes::QoS as MqttQoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use shared::queue::{Queue, RedbQueue};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use common::*;

const LONG: Duration = Duration::from_secs(30);
/// What the fake hub announces as its maximum message size.
const HUB_MAX: u32 = 1000;

struct Agent {
    stop: CancellationToken,
    task: JoinHandle<Result<(), edge_agent::AgentError>>,
}

impl Agent {
    async fn start(text: &str, base: &Path, mqtt_port: u16) -> Result<Self> {
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

async fn v5_connect(port: u16, id: &str) -> Result<(AsyncClient, EventLoop)> {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    tokio::time::timeout(LONG, async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                return anyhow::Ok(());
            }
        }
    })
    .await??;
    Ok((client, eventloop))
}

/// Publishes QoS 1 and returns the PUBACK's reason.
async fn publish(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
    len: usize,
) -> Result<PubAckReason> {
    client
        .publish(topic, MqttQoS::AtLeastOnce, false, vec![b'p'; len])
        .await?;
    tokio::time::timeout(LONG, async {
        loop {
            match eventloop.poll().await? {
                Event::Incoming(Packet::PubAck(ack)) => return anyhow::Ok(ack.reason),
                Event::Incoming(Packet::Disconnect(d)) => bail!("disconnected: {d:?}"),
                _ => {}
            }
        }
    })
    .await?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_limit_is_refused_at_publish_time_and_remembered_across_a_restart() -> Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let state = FakeHub::new_state(AckMode::All, 0);
    state.lock().expect("lock").limits = (HUB_MAX, 65_535 - 18);
    let hub = FakeHub::start(&pki, 0, Arc::clone(&state)).await?;
    let mqtt = free_tcp_port()?;
    let data = dir.path().join("data");
    // The agent's own limit (default 256 KiB) is larger than the hub's: the hub's must win.
    let text = agent_toml(&data, &pki, hub.addr.port(), &embedded_broker(mqtt));
    let agent = Agent::start(&text, dir.path(), mqtt).await?;
    let limits_file = data.join(edge_agent::limits::LIMITS_FILE);
    wait_until("the hub's limits persisted", LONG, || limits_file.exists()).await?;

    let (client, mut eventloop) = v5_connect(mqtt, "big").await?;
    let over = publish(
        &client,
        &mut eventloop,
        "telemetry/big",
        HUB_MAX as usize + 1,
    )
    .await?;
    assert_eq!(over, PubAckReason::ImplementationSpecificError);
    let at = publish(&client, &mut eventloop, "telemetry/ok", HUB_MAX as usize).await?;
    assert_eq!(at, PubAckReason::Success);
    // Unrouted topics are the local broker's business: not limited by the hub.
    let local = publish(&client, &mut eventloop, "local/big", HUB_MAX as usize + 1).await?;
    assert_eq!(local, PubAckReason::Success);
    wait_until("the message at the hub", LONG, || {
        !hub.received_seqs().is_empty()
    })
    .await?;
    {
        let s = state.lock().expect("lock");
        let got: Vec<(&str, usize)> = s
            .received
            .iter()
            .map(|e| (e.topic.as_str(), e.payload.len()))
            .collect();
        // Seq 1 is the message at the limit: the refused one was never queued.
        assert_eq!(got, [("telemetry/ok", HUB_MAX as usize)]);
        assert_eq!(s.received[0].seq, 1);
    }
    drop(client);
    agent.shutdown().await?;
    hub.stop().await;

    // Restarted with the hub gone: the persisted announcement still applies.
    let agent = Agent::start(&text, dir.path(), mqtt).await?;
    let (client, mut eventloop) = v5_connect(mqtt, "big-again").await?;
    let over = publish(
        &client,
        &mut eventloop,
        "telemetry/big",
        HUB_MAX as usize + 1,
    )
    .await?;
    assert_eq!(over, PubAckReason::ImplementationSpecificError);
    let at = publish(&client, &mut eventloop, "telemetry/ok2", HUB_MAX as usize).await?;
    assert_eq!(at, PubAckReason::Success);
    drop(client);
    agent.shutdown().await?;
    let queue = RedbQueue::open(data.join(edge_agent::QUEUE_FILE), Default::default())?;
    let queued = queue.read(queue.stats().acked + 1, 100, usize::MAX)?;
    let topics: Vec<String> = queued
        .iter()
        .map(|e| {
            shared::envelope::Envelope::decode_body(e.seq, e.body.clone()).map(|env| env.topic)
        })
        .collect::<Result<_, _>>()?;
    assert_eq!(
        topics,
        ["telemetry/ok2"],
        "only the message at the limit is queued"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_config_limit_applies_before_any_hub_was_reached() -> Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let mqtt = free_tcp_port()?;
    let data = dir.path().join("data");
    // No hub listens on this port; the agent's own limit is 2 KiB.
    let hub_port = free_udp_port()?;
    let text = agent_toml(&data, &pki, hub_port, &embedded_broker(mqtt))
        .replace("[uplink]\n", "[uplink]\nmax_message_size = \"2KiB\"\n");
    let agent = Agent::start(&text, dir.path(), mqtt).await?;
    let (client, mut eventloop) = v5_connect(mqtt, "cfg").await?;
    let over = publish(&client, &mut eventloop, "telemetry/big", 2049).await?;
    assert_eq!(over, PubAckReason::ImplementationSpecificError);
    let at = publish(&client, &mut eventloop, "telemetry/ok", 2048).await?;
    assert_eq!(at, PubAckReason::Success);
    drop(client);
    agent.shutdown().await?;
    let queue = RedbQueue::open(data.join(edge_agent::QUEUE_FILE), Default::default())?;
    assert_eq!(
        queue.stats().depth,
        1,
        "only the message at the limit is queued"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_mode_drops_what_the_hub_cannot_carry_without_wedging() -> Result<()> {
    init_logs();
    let have_mosquitto = std::process::Command::new("sh")
        .args(["-c", "command -v mosquitto"])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_mosquitto {
        eprintln!("skipped: mosquitto not installed (scripts/install-test-deps.sh)");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let port = free_tcp_port()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\npersistence false\n"),
    )?;
    let _mosquitto = tokio::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawn mosquitto")?;
    wait_listening(port, LONG).await?;

    let state = FakeHub::new_state(AckMode::All, 0);
    state.lock().expect("lock").limits = (HUB_MAX, 65_535 - 18);
    let hub = FakeHub::start(&pki, 0, Arc::clone(&state)).await?;
    let data = dir.path().join("data");
    let broker = format!(
        "kind = \"external\"\naddress = \"127.0.0.1:{port}\"\nclient_id = \"meshbridge-limits-line1\""
    );
    let cfg = parse_config(
        &agent_toml(&data, &pki, hub.addr.port(), &broker),
        dir.path(),
    )?;
    let stop = CancellationToken::new();
    let agent = tokio::spawn(edge_agent::run(cfg, stop.clone()));
    let limits_file = data.join(edge_agent::limits::LIMITS_FILE);
    wait_until("the hub's limits persisted", LONG, || limits_file.exists()).await?;

    let (client, mut eventloop) = v5_connect(port, "ext-pub").await?;
    // Until the agent's subscription is in place, probes are not forwarded; publish until one arrives.
    tokio::time::timeout(LONG, async {
        while hub.received_seqs().is_empty() {
            let reason = publish(&client, &mut eventloop, "telemetry/probe", 1).await?;
            anyhow::ensure!(reason == PubAckReason::Success, "probe {reason:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::Ok(())
    })
    .await??;
    // Mosquitto acknowledges both to the publisher; the agent cannot refuse, so it drops the big one
    // (logged and counted) and acknowledges it to Mosquitto, and the next message still flows.
    let over = publish(
        &client,
        &mut eventloop,
        "telemetry/big",
        HUB_MAX as usize + 1,
    )
    .await?;
    assert_eq!(over, PubAckReason::Success);
    let at = publish(&client, &mut eventloop, "telemetry/ok", HUB_MAX as usize).await?;
    assert_eq!(at, PubAckReason::Success);
    wait_until(
        "the message after the oversize one at the hub",
        LONG,
        || {
            state
                .lock()
                .expect("lock")
                .received
                .iter()
                .any(|e| e.topic == "telemetry/ok")
        },
    )
    .await?;
    {
        let s = state.lock().expect("lock");
        assert!(
            s.received.iter().all(|e| e.topic != "telemetry/big"),
            "the oversize message must not be queued"
        );
        assert_eq!(
            s.received.last().map(|e| e.topic.as_str()),
            Some("telemetry/ok")
        );
    }
    drop(client);
    stop.cancel();
    tokio::time::timeout(LONG, agent)
        .await
        .context("agent did not stop")??
        .context("agent failed")?;
    hub.stop().await;
    Ok(())
}
