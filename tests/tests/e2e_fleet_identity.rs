//! Issue 11 item 6, fleet identity, with the real `cloud-hub pki` commands against running programs:
//! revoking a site closes its live link and refuses it from then on while other sites carry on; a renewed
//! certificate is picked up by the running agent; a certificate close to expiry is warned about and its
//! expiry exposed by both programs.

use std::process::Command;
use std::time::{Duration, Instant};

use meshbridge_tests::bins::{bin, CLOUD_HUB};
use meshbridge_tests::mesh::{prove_path, Mesh};
use meshbridge_tests::metrics::{sample, scrape};
use meshbridge_tests::mqtt::{Collector, PublishPlan, Publisher};
use meshbridge_tests::spec::BrokerSpec;

const WAIT: Duration = Duration::from_secs(20);

/// Runs `cloud-hub pki ARGS` and returns its standard output; panics with its output if it fails.
fn pki(args: &[&str]) -> String {
    let out = Command::new(bin(CLOUD_HUB))
        .arg("pki")
        .args(args)
        .output()
        .expect("run cloud-hub pki");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cloud-hub pki {args:?}: {}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Waits until `series` in the metrics at `addr` satisfies `ok`; returns the last body.
async fn wait_metric(
    addr: std::net::SocketAddr,
    series: &str,
    ok: impl Fn(Option<u64>) -> bool,
) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let body = scrape(addr).await;
        if ok(sample(&body, series)) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never as expected:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_site_is_cut_off_and_the_others_carry_on() {
    let mesh = Mesh::new(&["line1", "line2"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1", "line2"]);
    hub_spec.crl = Some(mesh.pki().dir().join("crl.pem"));
    let metrics = meshbridge_tests::net::free_tcp();
    hub_spec.metrics = Some(metrics);
    let mut hub = mesh.start_hub(&hub_spec).await;
    let consumer = Collector::start(
        hub_spec.broker.client_addr(),
        "consumer",
        &["acme/plant1/+/telemetry/#"],
        false,
    )
    .await;
    let line1 = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let line2 = mesh.agent_spec("line2", BrokerSpec::embedded(), &hub_spec);
    let mut agent1 = mesh.start_agent("line1", &line1).await;
    let _agent2 = mesh.start_agent("line2", &line2).await;
    for (spec, site) in [(&line1, "line1"), (&line2, "line2")] {
        prove_path(
            spec.broker.client_addr(),
            &consumer,
            "telemetry/before",
            &format!("acme/plant1/{site}/telemetry/before"),
            WAIT,
        )
        .await;
    }

    let dir = mesh.pki().dir().to_str().expect("a UTF-8 path").to_owned();
    let printed = pki(&["revoke", "line1", "--dir", &dir]);
    assert!(printed.contains("revoked "), "{printed}");
    hub.wait_log("closing the links of revoked certificates", WAIT)
        .await;
    wait_metric(
        metrics,
        "meshbridge_agents_connected{site=\"line1\"}",
        |v| v == Some(0),
    )
    .await;
    // Its reconnects fail the handshake (alert 44), which the agent reports at error level: only a new
    // certificate fixes it.
    let down = agent1
        .wait_log("invalid peer certificate: Revoked", WAIT)
        .await;
    assert!(
        down.contains("ERROR") && down.contains("uplink down"),
        "{down}"
    );

    // line1's agent still accepts and queues (nothing acknowledged is lost), but nothing of it reaches
    // the cloud: each reconnect fails its handshake.
    let sent = Publisher::start(
        line1.broker.client_addr(),
        PublishPlan::new("after", "telemetry/after", 5),
    )
    .finish()
    .await;
    assert_eq!(sent.acked.len(), 5, "the edge still accepts: {sent:?}");
    wait_metric(
        metrics,
        "meshbridge_quic_handshakes_total{outcome=\"failed\"}",
        |v| v.is_some_and(|n| n >= 2),
    )
    .await;
    prove_path(
        line2.broker.client_addr(),
        &consumer,
        "telemetry/after",
        "acme/plant1/line2/telemetry/after",
        WAIT,
    )
    .await;
    assert!(
        consumer
            .received()
            .iter()
            .all(|r| r.topic != "acme/plant1/line1/telemetry/after"),
        "a revoked site's message reached the cloud"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_picked_up_without_a_restart() {
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    hub_spec.crl = Some(mesh.pki().dir().join("crl.pem"));
    let mut hub = mesh.start_hub(&hub_spec).await;
    let consumer = Collector::start(
        hub_spec.broker.client_addr(),
        "consumer",
        &["acme/plant1/line1/telemetry/#"],
        false,
    )
    .await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let mut agent = mesh.start_agent("line1", &spec).await;
    prove_path(
        spec.broker.client_addr(),
        &consumer,
        "telemetry/before",
        "acme/plant1/line1/telemetry/before",
        WAIT,
    )
    .await;
    let pid = agent.pid();

    // The old certificate is revoked as the new one is issued: the agent can only carry on if it
    // presents the new one.
    let dir = mesh.pki().dir().to_str().expect("a UTF-8 path").to_owned();
    let printed = pki(&["renew-site", "line1", "--dir", &dir, "--revoke-old"]);
    assert!(
        printed.contains("revoked the previous certificate"),
        "{printed}"
    );
    hub.wait_log("closing the links of revoked certificates", WAIT)
        .await;
    agent
        .wait_log("renewed: presented from the next connection on", WAIT)
        .await;
    prove_path(
        spec.broker.client_addr(),
        &consumer,
        "telemetry/renewed",
        "acme/plant1/line1/telemetry/renewed",
        Duration::from_secs(40),
    )
    .await;
    assert_eq!(agent.pid(), pid, "the agent was not restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_close_to_expiry_is_warned_about_and_exposed() {
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let hub_metrics = meshbridge_tests::net::free_tcp();
    hub_spec.metrics = Some(hub_metrics);
    let mut hub = mesh.start_hub(&hub_spec).await;
    let mut spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let agent_metrics = meshbridge_tests::net::free_tcp();
    spec.metrics = Some(agent_metrics);
    // Ten days left: inside the 30-day warning.
    let now = time::OffsetDateTime::now_utc();
    let not_after = now + time::Duration::days(10);
    let validity =
        cloud_hub::pki::Validity::new(now - time::Duration::hours(1), not_after).expect("a window");
    cloud_hub::pki::issue_site_with_validity(mesh.pki().dir(), "line1", validity)
        .expect("a short-lived certificate");
    let mut agent = mesh.start_agent("line1", &spec).await;

    let expected = u64::try_from(not_after.unix_timestamp()).expect("after 1970");
    agent
        .wait_log("the site certificate expires soon", WAIT)
        .await;
    let body = scrape(agent_metrics).await;
    assert_eq!(
        sample(
            &body,
            "meshbridge_uplink_certificate_expiry_timestamp_seconds"
        ),
        Some(expected),
        "{body}"
    );
    hub.wait_log("the site's certificate expires soon", WAIT)
        .await;
    wait_metric(
        hub_metrics,
        "meshbridge_site_certificate_expiry_timestamp_seconds{site=\"line1\"}",
        |v| v == Some(expected),
    )
    .await;
}
