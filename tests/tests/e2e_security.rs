//! The hub takes a site's identity only from a certificate its CA signed for a TLS client, valid now,
//! naming a configured site (fault scenario 14: other CA, self-signed, expired, not yet valid, wrong key
//! usage, unknown site; no certificate at all is covered at the TLS level in `cloud-hub/tests/tls.rs`). Each refused agent runs beside a good one (line2) on the same hub: line2's messages arriving shows
//! the hub works, so the refused agent's silence means refusal, not a broken setup.

use std::collections::BTreeSet;
use std::time::Duration;

use meshbridge_tests::mesh::{refusal_lines, Mesh};
use meshbridge_tests::mqtt::{Collector, MsgId, PublishPlan, Publisher};
use meshbridge_tests::pki::CertFiles;
use meshbridge_tests::spec::BrokerSpec;

const COUNT: u64 = 50;

/// Starts a hub for line1 and line2, a good line2 agent and an agent with `cert` claiming `site`; both
/// publish. Line2's messages must arrive, none of the other agent's, and the hub must log a refusal.
async fn refused(case: &str, site: &str, cert: impl FnOnce(&Mesh) -> CertFiles) {
    let mesh = Mesh::new(&["line1", "line2"]);
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1", "line2"]);
    let hub = mesh.start_hub(&hub_spec).await;
    let cloud = Collector::start(hub_spec.broker.client_addr(), "cloud-sub", &["#"], false).await;

    let good = mesh.agent_spec("line2", BrokerSpec::embedded(), &hub_spec);
    let _good = mesh.start_agent("line2", &good).await;
    let mut bad = mesh.agent_spec(site, BrokerSpec::embedded(), &hub_spec);
    bad.cert = cert(&mesh);
    bad.data_dir = mesh.path().join(format!("bad-{site}"));
    // The agent itself runs (its local broker accepts and queues); only the uplink must be refused.
    let mut bad_agent = mesh.start_agent("bad", &bad).await;

    let good_pub = Publisher::start(
        good.broker.client_addr(),
        PublishPlan::new("good", "telemetry/ok", COUNT),
    );
    let bad_pub = Publisher::start(
        bad.broker.client_addr(),
        PublishPlan::new("bad", "telemetry/evil", COUNT),
    );
    let good_out = good_pub.finish().await;
    let bad_out = bad_pub.finish().await;
    assert_eq!(good_out.acked.len() as u64, COUNT, "{good_out:?}");
    let expected: BTreeSet<MsgId> = good_out.acked_ids().collect();
    assert!(
        cloud.wait_for_all(&expected, Duration::from_secs(20)).await,
        "{case}: the good agent's messages arrive"
    );
    // The bad agent has had as long as the good one, plus reconnect attempts.
    cloud
        .settle(Duration::from_secs(2), Duration::from_secs(6))
        .await;
    let leaked: Vec<String> = cloud
        .received()
        .iter()
        .filter(|r| r.msg_id().is_some_and(|id| id.publisher == "bad") || r.topic.contains("evil"))
        .map(|r| format!("{} {:?}", r.topic, r.meshbridge_id()))
        .collect();
    assert!(
        leaked.is_empty(),
        "{case}: {} of {} messages of the refused agent reached the cloud: {leaked:?}",
        leaked.len(),
        bad_out.acked.len()
    );
    let refusals = refusal_lines(&hub.current_log());
    assert!(
        !refusals.is_empty(),
        "{case}: the hub log shows no refusal\n{}",
        hub.current_log()
    );
    eprintln!(
        "{case}: hub logged {} refusal line(s), e.g. {}",
        refusals.len(),
        refusals[0]
    );
    bad_agent.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused() {
    refused("another CA", "line1", |m| m.pki.foreign_site("line1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_refused() {
    refused("expired", "line1", |m| m.pki.expired_site("line1")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_yet_valid_certificate_is_refused() {
    refused("not yet valid", "line1", |m| {
        m.pki.not_yet_valid_site("line1")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_certificate_is_refused() {
    refused("self-signed", "line1", |m| m.pki.self_signed_site("line1")).await;
}

/// Signed by the hub's CA, valid, naming a configured site, but issued for TLS servers only: a client
/// certificate needs the clientAuth extended key usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_without_client_auth_usage_is_refused() {
    refused("server-only key usage", "line1", |m| {
        m.pki.server_only_site("line1")
    })
    .await;
}

/// A certificate the hub's CA signed for a site the hub does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_not_configured_on_the_hub_is_refused() {
    refused("unconfigured site", "line9", |m| m.pki.site("line9")).await;
}

/// An agent holding line1's certificate but configured as `site = "line2"` lands under line1's namespace
/// only: the hub believes the certificate, never the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn line1_certificate_cannot_publish_into_line2_namespace() {
    let mesh = Mesh::new(&["line1", "line2"]);
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1", "line2"]);
    let _hub = mesh.start_hub(&hub_spec).await;
    let cloud = Collector::start(hub_spec.broker.client_addr(), "cloud-sub", &["#"], false).await;
    let mut spec = mesh.agent_spec("line2", BrokerSpec::embedded(), &hub_spec);
    spec.cert = mesh.pki.site("line1");
    let _agent = mesh.start_agent("impostor", &spec).await;
    let outcome = Publisher::start(
        spec.broker.client_addr(),
        PublishPlan::new("impostor", "telemetry/robot5/temp", COUNT),
    )
    .finish()
    .await;
    assert_eq!(outcome.acked.len() as u64, COUNT, "{outcome:?}");
    let expected: BTreeSet<MsgId> = outcome.acked_ids().collect();
    let arrived = cloud.wait_for_all(&expected, Duration::from_secs(20)).await;
    cloud
        .settle(Duration::from_secs(1), Duration::from_secs(5))
        .await;
    let received = cloud.received();
    assert!(arrived, "the messages arrive (under line1): {received:?}");
    for r in received.iter().filter(|r| r.msg_id().is_some()) {
        assert_eq!(
            r.topic, "acme/plant1/line1/telemetry/robot5/temp",
            "published under the certificate's namespace only"
        );
        assert!(
            r.meshbridge_id().is_some_and(|m| m.starts_with("line1/")),
            "meshbridge-id names the certificate's site: {:?}",
            r.meshbridge_id()
        );
    }
    assert!(
        !received
            .iter()
            .any(|r| r.topic.starts_with("acme/plant1/line2")),
        "nothing under line2's namespace"
    );
}
