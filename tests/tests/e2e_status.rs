//! Issue 9, status topics: the hub keeps a retained JSON status per site at `<namespace>/$meshbridge/status`
//! and the agent its own at `$meshbridge/status` on its local broker, updated on change and at
//! `status.interval` (see `shared/src/status.rs`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshbridge_tests::mesh::{restart, Mesh, STOP_TIMEOUT};
use meshbridge_tests::mqtt::Collector;
use meshbridge_tests::spec::BrokerSpec;
use serde_json::Value;

const CLOUD_STATUS: &str = "acme/plant1/line1/$meshbridge/status";
const EDGE_STATUS: &str = "$meshbridge/status";
const WAIT: Duration = Duration::from_secs(15);

/// Subscribes to `topic` at `broker` until a status for which `pred` holds arrives; returns it and
/// whether it came retained.
async fn status_where(
    broker: SocketAddr,
    client_id: &str,
    topic: &str,
    pred: impl Fn(&Value) -> bool,
) -> (Value, bool) {
    let sub = Collector::start(broker, client_id, &[topic], false).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let found = sub.received().into_iter().find_map(|m| {
            let value: Value = serde_json::from_slice(&m.payload).ok()?;
            pred(&value).then_some((value, m.retain))
        });
        if let Some(found) = found {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "no status on {topic} as expected within {WAIT:?}; got {:?}",
            sub.received()
                .iter()
                .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_and_agent_keep_retained_status_topics() {
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    hub_spec.status_interval = Some(Duration::from_secs(1));
    let mut hub = mesh.start_hub(&hub_spec).await;
    let mut spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    spec.tail = vec!["[status]\ninterval = \"1s\"\n".to_owned()];
    let mut agent = mesh.start_agent("line1", &spec).await;
    let cloud = hub_spec.broker.client_addr();
    let edge = spec.broker.client_addr();

    // Connected, as the hub sees it: retained for a subscriber that comes later.
    let (up, _) = status_where(cloud, "dash-1", CLOUD_STATUS, |s| s["connected"] == true).await;
    assert_eq!(up["site"], "line1", "{up}");
    assert_eq!(up["connections"], 1, "{up}");
    assert_eq!(
        up["agent_version"],
        env!("CARGO_PKG_VERSION"),
        "from the agent's Hello: {up}"
    );
    assert!(up["config_version"].is_u64(), "{up}");
    assert!(up["last_seen_ms"].as_u64().is_some_and(|t| t > 0), "{up}");
    let (_, retained) =
        status_where(cloud, "dash-2", CLOUD_STATUS, |s| s["connected"] == true).await;
    assert!(retained, "a late subscriber gets the status retained");

    // As the agent sees itself, on its local broker.
    status_where(edge, "hmi-1", EDGE_STATUS, |s| s["connected"] == true).await;
    let (own, retained) =
        status_where(edge, "hmi-2", EDGE_STATUS, |s| s["connected"] == true).await;
    assert!(retained, "a late subscriber gets it retained: {own}");
    assert_eq!(own["site"], "line1", "{own}");
    assert_eq!(own["lanes"][0]["lane"], 0, "{own}");
    assert_eq!(own["lanes"][0]["connected"], true, "{own}");
    assert_eq!(own["hub"], hub_spec.quic.to_string(), "{own}");

    // The agent goes: the hub says so, with the time it was last seen.
    agent.terminate(STOP_TIMEOUT).await;
    let (down, retained) =
        status_where(cloud, "dash-3", CLOUD_STATUS, |s| s["connected"] == false).await;
    assert!(retained, "{down}");
    assert_eq!(down["connections"], 0, "{down}");
    assert!(
        down["last_seen_ms"].as_u64().is_some_and(|t| t > 0),
        "{down}"
    );

    // The hub goes: the agent says its uplink is down.
    restart(&mut agent, &spec.broker).await;
    status_where(edge, "hmi-3", EDGE_STATUS, |s| s["connected"] == true).await;
    hub.terminate(STOP_TIMEOUT).await;
    let (alone, _) = status_where(edge, "hmi-4", EDGE_STATUS, |s| s["connected"] == false).await;
    assert_eq!(alone["lanes"][0]["connected"], false, "{alone}");
    drop(agent);
}
