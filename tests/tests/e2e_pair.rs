//! A redundant pair (issue 8, point 4): two agents joined to one Mosquitto as the same site (one
//! certificate), each with its own name, queue and client id. Both forward everything the routes select;
//! a `topic-payload` dedup on the route lets each message reach the cloud once, the site's downlink is
//! served by one member at a time, and when a member dies the other carries on (uplink at once, downlink
//! after the hub noticed and handed it over).

use std::collections::HashSet;
use std::time::Duration;

use meshbridge_tests::mesh::{restart, Mesh, STOP_TIMEOUT};
use meshbridge_tests::mosquitto::{self, Mosquitto, MosquittoOptions};
use meshbridge_tests::mqtt::{Collector, PublishOutcome, PublishPlan, Publisher, Received, Report};
use meshbridge_tests::process::Proc;
use meshbridge_tests::spec::BrokerSpec;

/// How long a message may take to show up where the routes send it (a member's death is noticed by the
/// hub's idle timeout, 2 s, before the downlink moves).
const ARRIVE: Duration = Duration::from_secs(20);
/// After the expected deliveries, how long to keep watching for a second copy.
const SETTLE: Duration = Duration::from_secs(2);

const ROUTES: &str = r#"
[[routes]]
name = "telemetry"
kind = "uplink"
from = "*"
filter = "telemetry/#"
dedup = { key = "topic-payload", window = "10m" }

[[routes]]
name = "commands"
kind = "downlink"
to = "*"
filter = "cmd/#"
"#;

const CLOUD_TOPICS: &str = "acme/plant1/line1/telemetry/#";

/// `count` telemetry messages from publisher `name` at 400 msg/s.
fn plan(name: &str, count: u64) -> PublishPlan {
    PublishPlan::new(name, "telemetry/press/force", count).rate(400)
}

/// Publishes [`plan`] at the site broker and checks every message was acknowledged.
async fn publish_all(broker: std::net::SocketAddr, name: &str, count: u64) -> PublishOutcome {
    let outcome = Publisher::start(broker, plan(name, count)).finish().await;
    assert_eq!(outcome.acked.len() as u64, count, "{outcome:?}");
    outcome
}

/// Waits until the hub's log holds `n` "agent connected" lines.
async fn connected(hub: &Proc, n: usize) {
    let deadline = tokio::time::Instant::now() + ARRIVE;
    while hub.log_text().matches("agent connected").count() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the hub did not see {n} agent connections within {ARRIVE:?}\n{}",
            hub.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The members whose `meshbridge-id` prefixes the received messages carry.
fn members(received: &[Received]) -> HashSet<String> {
    received
        .iter()
        .filter_map(Received::meshbridge_id)
        .filter_map(|id| id.rsplit_once('/').map(|(origin, _)| origin.to_owned()))
        .collect()
}

/// Publishes one command on the cloud broker and checks it reaches the site broker exactly once.
async fn command_arrives_once(cloud: std::net::SocketAddr, site: &Collector, name: &str) {
    let topic = format!("acme/plant1/line1/cmd/{name}");
    let outcome = Publisher::start(cloud, PublishPlan::new(name, &topic, 1))
        .finish()
        .await;
    assert_eq!(outcome.acked.len(), 1, "{outcome:?}");
    let local = format!("cmd/{name}");
    let count = |r: &[Received]| r.iter().filter(|m| m.topic == local).count();
    assert!(
        site.wait_until(ARRIVE, |r| count(r) >= 1).await,
        "the command {local} never reached the site broker"
    );
    tokio::time::sleep(SETTLE).await;
    assert_eq!(
        count(&site.received()),
        1,
        "the command {local} reached the site broker more than once (both members delivered it?)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redundant_pair_on_one_mosquitto_delivers_each_message_once() {
    const NAME: &str = "a_redundant_pair_on_one_mosquitto_delivers_each_message_once";
    if mosquitto::skip(NAME) {
        return;
    }
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    hub_spec.tail = vec![ROUTES.to_owned()];
    let hub = mesh.start_hub(&hub_spec).await;
    let cloud = hub_spec.broker.client_addr();
    let mosquitto_dir = mesh.path().join("mosquitto");
    std::fs::create_dir_all(&mosquitto_dir).expect("mosquitto dir");
    let site_broker = Mosquitto::start(
        "line1-mosquitto",
        &mosquitto_dir,
        &MosquittoOptions::default(),
    )
    .await;

    let mut specs = Vec::new();
    let mut agents = Vec::new();
    for member in ["a", "b"] {
        let broker = BrokerSpec::External {
            address: site_broker.addr,
            client_id: format!("meshbridge-line1-{member}"),
        };
        let mut spec = mesh.agent_spec("line1", broker, &hub_spec);
        spec.agent_name = Some(member.to_owned());
        spec.data_dir = mesh.path().join(format!("line1-{member}"));
        let name = format!("line1-{member}");
        let mut agent = mesh.start_agent(&name, &spec).await;
        agent
            .wait_log("subscribed to the route filters in force", ARRIVE)
            .await;
        agents.push(agent);
        specs.push(spec);
    }
    connected(&hub, 2).await;
    let received = Collector::start(cloud, "cloud", &[CLOUD_TOPICS], false).await;
    let site_commands = Collector::start(site_broker.addr, "site-cmd", &["cmd/#"], false).await;

    // Both members up: each message once, and a command reaches the site broker once.
    let first = publish_all(site_broker.addr, "first", 200).await;
    command_arrives_once(cloud, &site_commands, "start").await;

    // Member a dies under load: b forwards everything from then on.
    let second = Publisher::start(site_broker.addr, plan("second", 400));
    second.wait_acked(100, ARRIVE).await;
    agents[0].kill9();
    let second = second.finish().await;
    assert_eq!(second.acked.len(), 400, "{second:?}");
    // The downlink moves to b once the hub noticed a is gone.
    command_arrives_once(cloud, &site_commands, "stop").await;

    // a comes back as the standby: still each message once.
    restart(&mut agents[0], &specs[0].broker).await;
    connected(&hub, 4).await;
    let third = publish_all(site_broker.addr, "third", 200).await;
    command_arrives_once(cloud, &site_commands, "resume").await;

    let outcomes = [&first, &second, &third];
    let expected: usize = outcomes.iter().map(|o| o.acked.len()).sum();
    assert!(
        received.wait_for(expected, ARRIVE).await,
        "only {} of {expected} messages reached the cloud",
        received.count()
    );
    tokio::time::sleep(SETTLE).await;
    let all = received.received();
    let report = Report::new(&outcomes, &all);
    eprintln!("redundant pair: {report}; members seen {:?}", members(&all));
    report.assert_no_loss();
    assert_eq!(
        report.duplicates_by_payload, 0,
        "both members' copies reached the cloud: {report}"
    );
    assert_eq!(report.missing_id, 0, "{report}");
    // Each member has its own ids: a consumer that drops by meshbridge-id never drops the other's.
    let seen = members(&all);
    assert!(
        seen.iter().all(|m| m == "line1/a" || m == "line1/b"),
        "ids outside the two members' origins: {seen:?}"
    );
    assert!(
        seen.contains("line1/b"),
        "b delivered nothing after a died: {seen:?}"
    );
    // The route's dedup counted what it dropped: one copy of every message both members forwarded (a's
    // queue after its restart may still resend some, so at least the messages published while both ran).
    drop(agents);
    let mut hub = hub;
    hub.terminate(STOP_TIMEOUT).await;
    let log = hub.log_text();
    let dropped: u64 = log
        .lines()
        .filter(|l| l.contains("route dedup counters") && l.contains("route=telemetry"))
        .filter_map(|l| l.split("dropped=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
        .unwrap_or_else(|| panic!("no route dedup counters logged for telemetry\n{log}"));
    assert!(
        dropped >= first.acked.len() as u64,
        "the route's dedup dropped {dropped}, fewer than the {} messages both members forwarded",
        first.acked.len()
    );
}
