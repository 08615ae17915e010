//! Issue 11 item 7: the hub under hostile traffic. Forged QUIC Initials (sent from sockets that never read
//! the hub's answers, as a spoofed source never sees them) must not lock real agents out: once
//! `listen.retry_above` handshakes are in flight, unproven sources get a QUIC Retry, and connection slots
//! (`listen.max_connections`) are taken only by completed handshakes.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshbridge_tests::mesh::{prove_path, Mesh};
use meshbridge_tests::metrics::{sample, scrape};
use meshbridge_tests::mqtt::Collector;
use meshbridge_tests::spec::BrokerSpec;
use tokio_util::sync::CancellationToken;

/// Forged attempts: far more than `max_handshakes`, each a fresh connection id.
const FORGED: usize = 400;
/// Sockets the forged Initials are sent from (several source ports on one address, like a NAT).
const SOURCES: usize = 16;

/// `count` QUIC Initial datagrams for `hub`, each opening a different connection (fresh connection ids),
/// with the ALPN and TLS a real agent offers so the hub starts a real handshake and then waits for the
/// client's answer, which never comes.
fn forged_initials(hub: SocketAddr, ca: &std::path::Path, count: usize) -> Vec<Vec<u8>> {
    let mut tls = meshbridge_tls::mqtt_client_config(ca, None).expect("a client TLS config");
    tls.alpn_protocols = vec![meshbridge_tls::ALPN.to_vec()];
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).expect("TLS 1.3 for QUIC");
    let config = quinn_proto::ClientConfig::new(Arc::new(crypto));
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = Instant::now();
    (0..count)
        .map(|_| {
            let (_, mut conn) = endpoint
                .connect(now, config.clone(), hub, "localhost")
                .expect("a client connection");
            let mut buf = Vec::new();
            let transmit = conn
                .poll_transmit(now, 1, &mut buf)
                .expect("the client's Initial");
            buf.truncate(transmit.size);
            buf
        })
        .collect()
}

/// Sends `initials` to `hub` from [`SOURCES`] sockets, again and again until `stop` (the hub keeps no
/// state for a Retried attempt, so a resent Initial is a new attempt to it). Nothing is ever read.
fn flood(
    hub: SocketAddr,
    initials: Vec<Vec<u8>>,
    stop: CancellationToken,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let sockets: Vec<UdpSocket> = (0..SOURCES)
            .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind a flood socket"))
            .collect();
        let mut sent = 0u64;
        while !stop.is_cancelled() {
            for (i, datagram) in initials.iter().enumerate() {
                // Best effort, like any flood: a full socket buffer just drops this one.
                let _ = sockets[i % SOURCES].send_to(datagram, hub);
                sent += 1;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        sent
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_initials_cannot_lock_agents_out() {
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let metrics = meshbridge_tests::net::free_tcp();
    hub_spec.metrics = Some(metrics);
    // Small limits and a long handshake timeout: without the gate, the forged handshakes would hold every
    // handshake and connection slot for the whole test.
    hub_spec.listen_extra = vec![
        "max_connections = 4".to_owned(),
        "max_handshakes = 32".to_owned(),
        "retry_above = 8".to_owned(),
        "handshake_timeout = \"60s\"".to_owned(),
    ];
    let hub = mesh.start_hub(&hub_spec).await;
    let consumer = Collector::start(
        hub_spec.broker.client_addr(),
        "consumer",
        &["acme/plant1/line1/telemetry/#"],
        false,
    )
    .await;

    let stop = CancellationToken::new();
    let flooder = flood(
        hub_spec.quic,
        forged_initials(hub_spec.quic, &hub_spec.ca, FORGED),
        stop.clone(),
    );
    // Let the flood fill what it can before the agent arrives.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let body = scrape(metrics).await;
        let retried = sample(&body, "meshbridge_quic_attempts_total{outcome=\"retry\"}");
        if retried.is_some_and(|n| n > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no Retry under the flood:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let agent = mesh.start_agent("line1", &spec).await;
    prove_path(
        spec.broker.client_addr(),
        &consumer,
        "telemetry/through-the-flood",
        "acme/plant1/line1/telemetry/through-the-flood",
        Duration::from_secs(20),
    )
    .await;

    let body = scrape(metrics).await;
    stop.cancel();
    let sent = flooder.join().expect("the flood thread");
    let value = |outcome: &str, family: &str| {
        sample(
            &body,
            &format!("meshbridge_{family}_total{{outcome=\"{outcome}\"}}"),
        )
        .unwrap_or(0)
    };
    let (handshakes, retried) = (
        value("handshake", "quic_attempts"),
        value("retry", "quic_attempts"),
    );
    let in_flight = sample(&body, "meshbridge_quic_handshakes_in_flight").unwrap_or(0);
    eprintln!("forged datagrams sent {sent}; handshakes started {handshakes}, Retries {retried}, in flight {in_flight}");
    assert!(retried > 0, "Retries under the flood:\n{body}");
    // The forged attempts got at most `retry_above` handshakes (none of them completes or times out within
    // the test); the rest were the agent's.
    assert!(
        handshakes <= 8 + 6,
        "forged attempts got handshakes beyond retry_above:\n{body}"
    );
    assert!(in_flight <= 32, "{body}");
    assert_eq!(
        value("over_connection_limit", "quic_handshakes"),
        0,
        "{body}"
    );
    drop(agent);
    drop(hub);
}

/// A connection slot is taken by a completed handshake: with `max_connections = 1`, a second site's
/// agent completes its handshake, is closed with `Overloaded` and counted, and gets in once the first
/// agent's slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_hub_closes_completed_handshakes_and_admits_later() {
    let mesh = Mesh::new(&["line1", "line2"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1", "line2"]);
    let metrics = meshbridge_tests::net::free_tcp();
    hub_spec.metrics = Some(metrics);
    hub_spec.listen_extra = vec!["max_connections = 1".to_owned()];
    let hub = mesh.start_hub(&hub_spec).await;
    let consumer = Collector::start(
        hub_spec.broker.client_addr(),
        "consumer",
        &["acme/plant1/+/telemetry/#"],
        false,
    )
    .await;
    let first = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let mut first_agent = mesh.start_agent("line1", &first).await;
    prove_path(
        first.broker.client_addr(),
        &consumer,
        "telemetry/first",
        "acme/plant1/line1/telemetry/first",
        Duration::from_secs(20),
    )
    .await;

    let second = mesh.agent_spec("line2", BrokerSpec::embedded(), &hub_spec);
    let second_agent = mesh.start_agent("line2", &second).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = scrape(metrics).await;
        let series = "meshbridge_quic_handshakes_total{outcome=\"over_connection_limit\"}";
        if sample(&body, series).is_some_and(|n| n > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "line2 was never turned away:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first_agent.terminate(Duration::from_secs(10)).await;
    prove_path(
        second.broker.client_addr(),
        &consumer,
        "telemetry/second",
        "acme/plant1/line2/telemetry/second",
        Duration::from_secs(30),
    )
    .await;
    drop(second_agent);
    drop(hub);
}
