//! Issue 9, metrics: both programs answer `GET /metrics` at `metrics.listen` in Prometheus text, and
//! their counters move with traffic: what the agent committed and the hub acknowledged, what the hub
//! received and forwarded, the queue depth back at 0, the connections up.

use std::time::Duration;

use meshbridge_tests::mesh::Mesh;
use meshbridge_tests::metrics::{sample, scrape};
use meshbridge_tests::mqtt::{Collector, PublishPlan, Publisher};
use meshbridge_tests::net::free_tcp;
use meshbridge_tests::spec::BrokerSpec;

const MESSAGES: u64 = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_programs_serve_metrics_that_move_with_traffic() {
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let hub_metrics = free_tcp();
    hub_spec.metrics = Some(hub_metrics);
    let hub = mesh.start_hub(&hub_spec).await;
    let mut spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let agent_metrics = free_tcp();
    spec.metrics = Some(agent_metrics);
    let agent = mesh.start_agent("line1", &spec).await;

    let before = scrape(agent_metrics).await;
    assert!(
        before.contains("meshbridge_build_info{program=\"edge-agent\","),
        "{before}"
    );
    assert!(before.trim_end().ends_with("# EOF"), "{before}");

    let cloud = Collector::start(hub_spec.broker.client_addr(), "cloud", &["acme/#"], false).await;
    let outcome = Publisher::start(
        spec.broker.client_addr(),
        PublishPlan::new("m", "telemetry/m", MESSAGES),
    )
    .finish()
    .await;
    assert_eq!(outcome.acked.len() as u64, MESSAGES, "{outcome:?}");
    assert!(
        cloud
            .wait_for(MESSAGES as usize, Duration::from_secs(30))
            .await,
        "the messages reached the cloud"
    );

    // The hub acknowledges after the cloud broker did: wait for the agent's queue to empty.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let agent_body = loop {
        let body = scrape(agent_metrics).await;
        if sample(&body, "meshbridge_queue_depth_messages{lane=\"0\"}") == Some(0)
            && sample(&body, "meshbridge_messages_acknowledged_total{lane=\"0\"}") >= Some(MESSAGES)
        {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent's metrics never showed the queue drained: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        sample(
            &agent_body,
            "meshbridge_messages_committed_total{lane=\"0\"}"
        ) >= Some(MESSAGES),
        "{agent_body}"
    );
    assert!(
        sample(&agent_body, "meshbridge_messages_sent_total{lane=\"0\"}") >= Some(MESSAGES),
        "{agent_body}"
    );
    assert_eq!(
        sample(&agent_body, "meshbridge_uplink_connected{lane=\"0\"}"),
        Some(1),
        "{agent_body}"
    );
    assert_eq!(
        sample(&agent_body, "meshbridge_uplink_connects_total{lane=\"0\"}"),
        Some(1),
        "{agent_body}"
    );

    let hub_body = scrape(hub_metrics).await;
    assert!(
        hub_body.contains("meshbridge_build_info{program=\"cloud-hub\","),
        "{hub_body}"
    );
    assert!(
        sample(
            &hub_body,
            "meshbridge_messages_received_total{site=\"line1\"}"
        ) >= Some(MESSAGES),
        "{hub_body}"
    );
    assert!(
        sample(
            &hub_body,
            "meshbridge_messages_forwarded_total{site=\"line1\"}"
        ) >= Some(MESSAGES),
        "{hub_body}"
    );
    assert_eq!(
        sample(&hub_body, "meshbridge_agents_connected{site=\"line1\"}"),
        Some(1),
        "{hub_body}"
    );
    assert_eq!(
        sample(&hub_body, "meshbridge_cloud_broker_connected"),
        Some(1),
        "{hub_body}"
    );
    // The config in force: the agent's own, as the hub heard it in the agent's Hello; no routes at the hub.
    let agent_version = sample(&agent_body, "meshbridge_config_version");
    assert!(agent_version.is_some(), "{agent_body}");
    assert_eq!(
        sample(
            &hub_body,
            "meshbridge_site_config_applied_version{site=\"line1\"}"
        ),
        agent_version,
        "{hub_body}"
    );
    assert_eq!(
        sample(
            &hub_body,
            "meshbridge_site_config_offered_version{site=\"line1\"}"
        ),
        Some(0),
        "{hub_body}"
    );

    // The shipped Grafana dashboard asks only for metrics the programs serve.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/meshbridge.json"),
    )
    .expect("read deploy/grafana/meshbridge.json");
    let names = metric_names(&dashboard);
    assert!(
        names.len() >= 10,
        "the dashboard names its metrics: {names:?}"
    );
    for name in &names {
        assert!(
            agent_body.contains(name.as_str()) || hub_body.contains(name.as_str()),
            "the dashboard uses {name}, which neither program serves"
        );
    }
    drop(agent);
    drop(hub);
}

/// `log_format = "json"`: both programs write one JSON object per line, with the level and the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    hub_spec.json_logs = true;
    let mut hub = mesh.start_hub(&hub_spec).await;
    let mut spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    spec.json_logs = true;
    let mut agent = mesh.start_agent("line1", &spec).await;
    hub.wait_log("agent connected", Duration::from_secs(20))
        .await;
    // The agent's port accepts (what `start_agent` waits for) a little before it logs "ready".
    agent
        .wait_log("\"message\":\"ready\"", Duration::from_secs(20))
        .await;
    for proc in [&hub, &agent] {
        let log = proc.log_text();
        // The program is still writing: a last line without its newline is not complete yet.
        let complete = log.rsplit_once('\n').map_or("", |(done, _)| done);
        let lines: Vec<&str> = complete.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 2, "{log}");
        for line in &lines {
            assert!(
                line.starts_with('{') && line.ends_with('}'),
                "not a JSON object line: {line}"
            );
            assert!(line.contains("\"level\":\""), "no level: {line}");
        }
        assert!(
            lines.iter().any(|l| l.contains("\"message\":\"ready\"")),
            "the ready line is there: {log}"
        );
    }
    agent.terminate(meshbridge_tests::mesh::STOP_TIMEOUT).await;
    hub.terminate(meshbridge_tests::mesh::STOP_TIMEOUT).await;
}

/// Every `meshbridge_...` metric name in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("meshbridge_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}
