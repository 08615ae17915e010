//! Issue 9, traces: one message's spans, from the agent and from the hub, arrive at an OTLP receiver under
//! one trace id and parent-linked, and the cloud message's `traceparent` continues the same trace. Once for
//! a publisher that sent its own `traceparent` (the trace continues from it), once for a message the agent
//! started a trace for and that waited in the queue while the hub was down.
//!
//! The receiver (`meshbridge_tests::otlp`) decodes the real OTLP/HTTP protobuf requests the programs'
//! exporters send; the programs are configured only by the standard `OTEL_*` variables.

use std::collections::HashMap;
use std::time::Duration;

use meshbridge_tests::cloud::CloudBroker;
use meshbridge_tests::mesh::{restart, Mesh};
use meshbridge_tests::mqtt::{publish_acked, Collector, Received};
use meshbridge_tests::otlp::{OtlpReceiver, SpanSeen};
use meshbridge_tests::spec::BrokerSpec;
use rumqttc::v5::mqttbytes::v5::PublishProperties;

const WAIT: Duration = Duration::from_secs(30);

/// The publisher's own context: trace 4bf9…4736, its span 00f0…02b7, sampled.
const PUBLISHER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PUBLISHER_SPAN: &str = "00f067aa0ba902b7";

const EDGE: [&str; 4] = [
    "meshbridge.edge.receive",
    "meshbridge.edge.commit",
    "meshbridge.edge.queue",
    "meshbridge.edge.send",
];
const HUB: [&str; 4] = [
    "meshbridge.hub.receive",
    "meshbridge.hub.dedup",
    "meshbridge.hub.route",
    "meshbridge.hub.publish",
];

/// The spans of `trace`, by name: the first of each. A batch resent on a new connection gets a second
/// `queue` and `send` span, which is right; a second `receive` would mean the message was taken twice.
fn by_name(spans: &[SpanSeen], trace: &str) -> HashMap<String, SpanSeen> {
    let mut out = HashMap::new();
    for s in spans.iter().filter(|s| s.trace_id == trace) {
        let once = ["meshbridge.edge.receive", "meshbridge.edge.commit"].contains(&s.name.as_str());
        assert!(
            !(once && out.contains_key(&s.name)),
            "{} recorded twice in trace {trace}",
            s.name
        );
        out.entry(s.name.clone()).or_insert_with(|| s.clone());
    }
    out
}

fn complete(spans: &[SpanSeen], trace: &str) -> bool {
    let names: Vec<&str> = spans
        .iter()
        .filter(|s| s.trace_id == trace)
        .map(|s| s.name.as_str())
        .collect();
    EDGE.iter().chain(HUB.iter()).all(|n| names.contains(n))
}

/// The message on `topic` the cloud consumer received, waiting for it (`what` says what failed).
async fn arrived(cloud: &Collector, topic: &str, what: &str) -> Received {
    assert!(
        cloud
            .wait_until(WAIT, |r| r.iter().any(|m| m.topic.ends_with(topic)))
            .await,
        "{what}"
    );
    cloud
        .received()
        .into_iter()
        .find(|m| m.topic.ends_with(topic))
        .expect("seen")
}

/// The cloud message's (trace id, span id) from its `traceparent` user property.
fn cloud_context(m: &Received) -> (String, String) {
    let tp = m
        .user_property("traceparent")
        .unwrap_or_else(|| panic!("the cloud message on {} has no traceparent", m.topic));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {tp:?}");
    assert_eq!(
        parts[3], "01",
        "the cloud message's context is sampled: {tp}"
    );
    (parts[1].to_owned(), parts[2].to_owned())
}

/// Checks the tree under the edge's `receive` span and returns the spans by name.
fn assert_linked(spans: &[SpanSeen], trace: &str, publish_span: &str) -> HashMap<String, SpanSeen> {
    let s = by_name(spans, trace);
    let receive = &s["meshbridge.edge.receive"];
    for name in EDGE.iter().skip(1) {
        assert_eq!(s[*name].parent_span_id, receive.span_id, "{name}'s parent");
        assert_eq!(s[*name].service, "edge-agent", "{name}'s service");
    }
    assert_eq!(receive.service, "edge-agent");
    let hub_receive = &s["meshbridge.hub.receive"];
    assert_eq!(
        hub_receive.parent_span_id, receive.span_id,
        "the hub's receive span continues the edge's"
    );
    for name in HUB {
        assert_eq!(s[name].service, "cloud-hub", "{name}'s service");
        if name != "meshbridge.hub.receive" {
            assert_eq!(
                s[name].parent_span_id, hub_receive.span_id,
                "{name}'s parent"
            );
        }
    }
    assert_eq!(
        s["meshbridge.hub.publish"].span_id, publish_span,
        "the cloud message continues from the hub's publish span"
    );
    assert_eq!(
        s["meshbridge.hub.dedup"].attribute("meshbridge.dedup.duplicate"),
        Some("false")
    );
    assert_eq!(
        receive.attribute("messaging.destination.name"),
        s["meshbridge.hub.receive"].attribute("messaging.source.name")
    );
    for span in s.values() {
        assert!(
            span.end_ns >= span.start_ns,
            "{} ends before it starts",
            span.name
        );
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_traced_from_the_edge_to_the_cloud_consumer_also_across_an_outage() {
    let receiver = OtlpReceiver::start().await;
    let env = vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            receiver.endpoint(),
        ),
        (
            "OTEL_EXPORTER_OTLP_PROTOCOL".to_owned(),
            "http/protobuf".to_owned(),
        ),
        // The default sampler (parent-based, ratio), at a ratio that traces every message.
        ("OTEL_TRACES_SAMPLER_ARG".to_owned(), "1".to_owned()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ];
    let mesh = Mesh::new(&["line1"]);
    // The cloud broker outlives the hub's restart, so the consumer sees the queued message.
    let cloud_broker = CloudBroker::start().await;
    let hub_spec = mesh.hub_spec(BrokerSpec::hub_client_of(cloud_broker.addr), &["line1"]);
    let agent_spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let edge = agent_spec.broker.client_addr();
    let mut hub = mesh.start_hub_env(&hub_spec, &env).await;
    let _agent = mesh.start_agent_env("line1", &agent_spec, &env).await;
    let cloud = Collector::start(cloud_broker.addr, "consumer", &["acme/#"], false).await;

    // 1. The publisher's trace continues through the mesh.
    let properties = PublishProperties {
        user_properties: vec![(
            "traceparent".to_owned(),
            format!("00-{PUBLISHER_TRACE}-{PUBLISHER_SPAN}-01"),
        )],
        ..PublishProperties::default()
    };
    publish_acked(edge, "robot1", "telemetry/one", b"1", false, properties).await;
    let first = arrived(
        &cloud,
        "telemetry/one",
        "the first message did not reach the cloud",
    )
    .await;
    let (trace, publish_span) = cloud_context(&first);
    assert_eq!(trace, PUBLISHER_TRACE, "the publisher's trace id is kept");
    assert!(
        receiver.wait_until(WAIT, |s| complete(s, &trace)).await,
        "not every span of the first message was exported: {:?}",
        by_name(&receiver.spans(), &trace)
            .keys()
            .collect::<Vec<_>>()
    );
    let spans = assert_linked(&receiver.spans(), &trace, &publish_span);
    assert_eq!(
        spans["meshbridge.edge.receive"].parent_span_id, PUBLISHER_SPAN,
        "the edge's receive span is a child of the publisher's span"
    );

    // 2. A message without a context, published while the hub is down: the agent starts a trace, and the
    // span of its wait in the queue covers the outage.
    hub.terminate(Duration::from_secs(20)).await;
    publish_acked(
        edge,
        "robot2",
        "telemetry/two",
        b"2",
        false,
        PublishProperties::default(),
    )
    .await;
    let outage = Duration::from_secs(2);
    tokio::time::sleep(outage).await;
    restart(&mut hub, &hub_spec.broker).await;
    let second = arrived(
        &cloud,
        "telemetry/two",
        "the queued message did not reach the cloud after the outage",
    )
    .await;
    let (trace2, publish_span2) = cloud_context(&second);
    assert_ne!(
        trace2, PUBLISHER_TRACE,
        "a new trace for a message without one"
    );
    assert!(
        receiver.wait_until(WAIT, |s| complete(s, &trace2)).await,
        "not every span of the queued message was exported: {:?}",
        by_name(&receiver.spans(), &trace2)
            .keys()
            .collect::<Vec<_>>()
    );
    let spans = assert_linked(&receiver.spans(), &trace2, &publish_span2);
    assert_eq!(
        spans["meshbridge.edge.receive"].parent_span_id, "",
        "the agent's trace starts at its receive span"
    );
    let queued_ms: u64 = spans["meshbridge.edge.queue"]
        .attribute("meshbridge.queued_ms")
        .expect("queued_ms")
        .parse()
        .expect("an integer");
    assert!(
        queued_ms >= outage.as_millis() as u64,
        "the queue span says {queued_ms} ms, less than the {outage:?} outage"
    );
    assert!(receiver.errors().is_empty(), "{:?}", receiver.errors());
}
