//! A publisher that did not get its PUBACK sends the PUBLISH again, with DUP set and the same packet id
//! (MQTT 3.1.1 §4.4). Before, the agent committed every resend under a new seq, so the hub's dedup (by seq)
//! let it through and consumers saw it twice under two `meshbridge-id`s; across an agent `kill -9` a crash
//! test counted such duplicates. The agent now commits a mark (client id, packet id, content digest) with
//! each QoS 1/2 message and acknowledges a resend it recognises without queueing it again.

use std::net::SocketAddr;
use std::time::Duration;

use meshbridge_tests::faults::FaultMesh;
use meshbridge_tests::mesh::restart;
use meshbridge_tests::mqtt::Collector;
use meshbridge_tests::spec::BrokerSpec;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 60];
    body.extend_from_slice(&u16::try_from(client_id.len()).expect("short").to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut out = vec![0x10, u8::try_from(body.len()).expect("short")];
    out.extend_from_slice(&body);
    out
}

fn publish_qos1(topic: &str, packet_id: u16, payload: &[u8], dup: bool) -> Vec<u8> {
    publish(topic, packet_id, payload, 1, dup)
}

/// A 3.1.1 PUBLISH at QoS 1 or 2.
fn publish(topic: &str, packet_id: u16, payload: &[u8], qos: u8, dup: bool) -> Vec<u8> {
    let mut body = u16::try_from(topic.len())
        .expect("short")
        .to_be_bytes()
        .to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.extend_from_slice(payload);
    let first = 0x30 | (qos << 1) | if dup { 0x08 } else { 0 };
    let mut out = vec![first, u8::try_from(body.len()).expect("short")];
    out.extend_from_slice(&body);
    out
}

/// A persistent-session 3.1.1 client: connected, CONNACK read.
async fn client(addr: SocketAddr, id: &str) -> TcpStream {
    let mut s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect in time")
        .expect("connect");
    s.write_all(&connect_packet(id)).await.expect("CONNECT");
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut connack))
        .await
        .expect("CONNACK in time")
        .expect("CONNACK");
    assert_eq!(connack[0], 0x20, "CONNACK");
    assert_eq!(connack[3], 0, "accepted");
    s
}

/// Sends `packet` and waits for the PUBACK of `packet_id`.
async fn publish_acked(s: &mut TcpStream, packet: &[u8], packet_id: u16) {
    exchange(s, packet, 0x40, packet_id).await;
}

/// Sends `packet` and waits for the 4-byte answer `kind` (0x40 PUBACK, 0x50 PUBREC, 0x70 PUBCOMP) for
/// `packet_id`.
async fn exchange(s: &mut TcpStream, packet: &[u8], kind: u8, packet_id: u16) {
    s.write_all(packet).await.expect("write");
    let mut answer = [0u8; 4];
    tokio::time::timeout(WAIT, s.read_exact(&mut answer))
        .await
        .expect("answer in time")
        .expect("answer");
    let [hi, lo] = packet_id.to_be_bytes();
    assert_eq!(
        answer,
        [kind, 2, hi, lo],
        "answer {kind:#04x} for packet {packet_id}"
    );
}

fn count(cloud: &Collector, payload: &[u8]) -> usize {
    cloud
        .received()
        .iter()
        .filter(|r| r.payload.as_ref() == payload)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_publish_is_committed_once_even_across_an_agent_kill() {
    let FaultMesh {
        mesh,
        cloud_broker: _cloud_broker,
        cloud,
        hub_spec,
        hub: _hub,
    } = FaultMesh::start("line1").await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let mut agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr();
    let topic = "telemetry/robot7/pose";

    // Sent, acknowledged, and sent again as if the PUBACK had been lost.
    let mut c = client(edge, "robot-7").await;
    publish_acked(&mut c, &publish_qos1(topic, 7, b"first", false), 7).await;
    publish_acked(&mut c, &publish_qos1(topic, 7, b"first", true), 7).await;

    // The agent is killed after committing a message; the publisher reconnects and resends it.
    publish_acked(&mut c, &publish_qos1(topic, 8, b"second", false), 8).await;
    agent.kill9();
    drop(c);
    restart(&mut agent, &spec.broker).await;
    let mut c = client(edge, "robot-7").await;
    publish_acked(&mut c, &publish_qos1(topic, 8, b"second", true), 8).await;

    // A packet id reused for another message is a new message, even with DUP set.
    publish_acked(&mut c, &publish_qos1(topic, 7, b"third", true), 7).await;

    assert!(
        cloud
            .wait_until(WAIT * 3, |r| ["first", "second", "third"]
                .iter()
                .all(|p| r.iter().any(|m| m.payload.as_ref() == p.as_bytes())))
            .await,
        "all three arrive"
    );
    cloud
        .settle(Duration::from_secs(1), Duration::from_secs(5))
        .await;
    let counts = [
        count(&cloud, b"first"),
        count(&cloud, b"second"),
        count(&cloud, b"third"),
    ];
    println!(
        "scenario=publisher-retransmit first={} second={} third={}",
        counts[0], counts[1], counts[2]
    );
    assert_eq!(
        counts,
        [1, 1, 1],
        "each message reached the cloud exactly once"
    );
}

/// QoS 2 across an agent `kill -9` after PUBREC: the publisher resends the PUBLISH (DUP) to the restarted
/// agent, then completes with PUBREL/PUBCOMP; the message reaches the cloud once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_stays_exactly_once_across_an_agent_kill() {
    let FaultMesh {
        mesh,
        cloud_broker: _cloud_broker,
        cloud,
        hub_spec,
        hub: _hub,
    } = FaultMesh::start("line1").await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let mut agent = mesh.start_agent("line1", &spec).await;
    let edge = spec.broker.client_addr();
    let topic = "telemetry/robot9/batch";

    let mut c = client(edge, "robot-9").await;
    exchange(
        &mut c,
        &publish(topic, 21, b"exactly-once", 2, false),
        0x50,
        21,
    )
    .await;
    // PUBREC came (so the message is committed); the agent dies before the PUBREL.
    agent.kill9();
    drop(c);
    restart(&mut agent, &spec.broker).await;
    let mut c = client(edge, "robot-9").await;
    exchange(
        &mut c,
        &publish(topic, 21, b"exactly-once", 2, true),
        0x50,
        21,
    )
    .await;
    exchange(&mut c, &[0x62, 2, 0, 21], 0x70, 21).await;

    assert!(
        cloud
            .wait_until(WAIT * 3, |r| r
                .iter()
                .any(|m| m.payload.as_ref() == b"exactly-once"))
            .await,
        "it arrives"
    );
    cloud
        .settle(Duration::from_secs(1), Duration::from_secs(5))
        .await;
    let n = count(&cloud, b"exactly-once");
    println!("scenario=qos2-across-kill delivered={n}");
    assert_eq!(n, 1, "a QoS 2 message reached the cloud exactly once");
}
