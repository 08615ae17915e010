//! Issue 11: the programs' own client ids cannot be taken over. The hub's publisher (`meshbridge-hub`) and
//! downlink subscriber, and the agent's downlink delivery, status and retained-restore connections, use
//! the embedded brokers' internal listeners; a client on the public port that presents one of those ids is
//! refused (3.1.1: CONNACK 2 "identifier rejected", 5.0: 0x85 "client identifier not valid") instead of
//! kicking the program's own connection off its broker.

use std::net::SocketAddr;
use std::time::Duration;

use meshbridge_tests::mesh::{prove_path, Mesh};
use meshbridge_tests::mqtt::Collector;
use meshbridge_tests::spec::BrokerSpec;

const WAIT: Duration = Duration::from_secs(10);

/// How the broker at `addr` answers an MQTT 5 CONNECT with `client_id`: `Ok` if accepted, else the error.
async fn connect_v5(addr: SocketAddr, client_id: &str) -> Result<(), String> {
    use rumqttc::v5::{AsyncClient, Event, Incoming, MqttOptions};
    let options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    let (_client, mut eventloop) = AsyncClient::new(options, 4);
    match tokio::time::timeout(WAIT, eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) => Ok(()),
        Ok(Ok(other)) => Err(format!("unexpected first event {other:?}")),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("no answer".to_owned()),
    }
}

/// The same with MQTT 3.1.1.
async fn connect_v4(addr: SocketAddr, client_id: &str) -> Result<(), String> {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions};
    let options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    let (_client, mut eventloop) = AsyncClient::new(options, 4);
    match tokio::time::timeout(WAIT, eventloop.poll()).await {
        Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) => Ok(()),
        Ok(Ok(other)) => Err(format!("unexpected first event {other:?}")),
        Ok(Err(e)) => Err(format!("{e:?}")),
        Err(_) => Err("no answer".to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_programs_own_client_ids_are_refused_on_the_public_ports() {
    let mesh = Mesh::new(&["line1"]);
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let hub = mesh.start_hub(&hub_spec).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let agent = mesh.start_agent("line1", &spec).await;
    let cloud = hub_spec.broker.client_addr();
    let edge = spec.broker.client_addr();
    let consumer =
        Collector::start(cloud, "consumer", &["acme/plant1/line1/telemetry/#"], false).await;

    for id in ["meshbridge-hub", "meshbridge-hub-downlink"] {
        let v5 = connect_v5(cloud, id).await;
        assert!(
            v5.as_ref()
                .is_err_and(|e| e.contains("ClientIdentifierNotValid")),
            "{id} (v5) at the hub's broker: {v5:?}"
        );
        let v4 = connect_v4(cloud, id).await;
        assert!(
            v4.as_ref().is_err_and(|e| e.contains("BadClientId")),
            "{id} (3.1.1) at the hub's broker: {v4:?}"
        );
    }
    for id in [
        "meshbridge-line1-downlink",
        "meshbridge-line1-downlink-p3",
        "meshbridge-line1-status",
        "meshbridge-line1-retained",
    ] {
        let v5 = connect_v5(edge, id).await;
        assert!(
            v5.as_ref()
                .is_err_and(|e| e.contains("ClientIdentifierNotValid")),
            "{id} at the agent's broker: {v5:?}"
        );
    }
    assert_eq!(
        connect_v5(edge, "meshbridge-line1-replay").await,
        Ok(()),
        "dead-letters replay publishes through the public port"
    );
    assert_eq!(connect_v5(cloud, "dashboard").await, Ok(()));

    // The hub's own publisher was never kicked off: the path still works.
    prove_path(
        edge,
        &consumer,
        "telemetry/after",
        "acme/plant1/line1/telemetry/after",
        Duration::from_secs(20),
    )
    .await;
    assert!(
        !hub.log_text().contains("cloud broker connection failed"),
        "the hub's publisher lost its connection:\n{}",
        hub.log_text()
    );
    drop(agent);
    drop(hub);
}

/// The `name=value` field of a log line, parsed as a socket address.
fn log_addr(line: &str, name: &str) -> SocketAddr {
    let at = line
        .find(&format!("{name}="))
        .unwrap_or_else(|| panic!("{name} in {line}"));
    let value = line[at + name.len() + 1..]
        .split(|c: char| c.is_whitespace() || c == ',')
        .next()
        .unwrap_or_default();
    value
        .trim_matches('"')
        .parse()
        .unwrap_or_else(|e| panic!("{name} in {line}: {e}"))
}

/// Issue 11 item 4: the embedded brokers' internal listeners are loopback ports any local process can
/// reach, so they take only a per-start login the programs keep to themselves. A client that connects
/// there directly (here: this test process, with the addresses the logs name) is refused, whatever client
/// id it uses, while the path through the front keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_internal_listeners_refuse_other_local_processes() {
    let mesh = Mesh::new(&["line1"]);
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let mut hub = mesh.start_hub(&hub_spec).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let mut agent = mesh.start_agent("line1", &spec).await;
    let consumer = Collector::start(
        hub_spec.broker.client_addr(),
        "consumer",
        &["acme/plant1/line1/telemetry/#"],
        false,
    )
    .await;
    let hub_line = hub.wait_log("embedded cloud broker started", WAIT).await;
    let agent_line = agent.wait_log("internal_v5=", WAIT).await;
    for (who, line) in [("hub", &hub_line), ("agent", &agent_line)] {
        let (v4, v5) = (log_addr(line, "internal_v4"), log_addr(line, "internal_v5"));
        for id in ["dashboard", "meshbridge-hub", "meshbridge-line1-downlink"] {
            let got = connect_v5(v5, id).await;
            assert!(got.is_err(), "{who}'s internal v5 listener let {id} in");
            let got = connect_v4(v4, id).await;
            assert!(got.is_err(), "{who}'s internal v4 listener let {id} in");
        }
    }
    prove_path(
        spec.broker.client_addr(),
        &consumer,
        "telemetry/front",
        "acme/plant1/line1/telemetry/front",
        Duration::from_secs(20),
    )
    .await;
    drop(agent);
    drop(hub);
}
