//! Issue 13 item 6: an agent and a hub one protocol version apart interoperate, in both combinations.
//!
//! Each release speaks its own protocol version and the one before (`shared/src/wire/version.rs`). The
//! previous release's side is played by this build held to the previous version
//! (`uplink.max_protocol_version`, `listen.max_protocol_version`, set through the environment as an operator
//! would): it then offers, sends and reads exactly the previous version's frames, whose bytes the codec's
//! golden table pins (`shared/src/wire/codec.rs`, the version 2 `Welcome`). Messages flow both ways (an
//! uplink message reaches the cloud, a pushed config is applied) whichever side is older.

use std::time::Duration;

use meshbridge_tests::mesh::{prove_path, Mesh};
use meshbridge_tests::mqtt::Collector;
use meshbridge_tests::spec::BrokerSpec;
use shared::wire::{OLDEST_SUPPORTED, PROTOCOL_VERSION};

const WAIT: Duration = Duration::from_secs(20);

fn held_to(var: &str, version: u16) -> Vec<(String, String)> {
    vec![(var.to_owned(), version.to_string())]
}

/// Runs one agent against one hub, each held to the given newest version, and checks what they agree on.
async fn pair(agent_max: u16, hub_max: u16) {
    let agreed = agent_max.min(hub_max);
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    // A route at the hub, so its share is pushed to the agent on connect.
    hub_spec.tail.push(
        "[[routes]]\nname = \"telemetry\"\nkind = \"uplink\"\nfrom = \"*\"\nfilter = \"telemetry/#\"\n"
            .to_owned(),
    );
    let hub_env = held_to("MESHBRIDGE_HUB_LISTEN__MAX_PROTOCOL_VERSION", hub_max);
    let _hub = mesh.start_hub_env(&hub_spec, &hub_env).await;
    let consumer = Collector::start(
        hub_spec.broker.client_addr(),
        "consumer",
        &["acme/plant1/line1/#"],
        false,
    )
    .await;
    let agent_spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let agent_env = held_to("MESHBRIDGE_AGENT_UPLINK__MAX_PROTOCOL_VERSION", agent_max);
    let mut agent = mesh.start_agent_env("line1", &agent_spec, &agent_env).await;
    let up = agent.wait_log("uplink connected", WAIT).await;
    assert!(
        up.contains(&format!("protocol={agreed}")),
        "agent {agent_max}, hub {hub_max}: {up}"
    );
    if agreed >= 3 {
        assert!(
            up.contains(env!("CARGO_PKG_VERSION")),
            "the hub's version: {up}"
        );
    } else {
        assert!(up.contains("unknown (protocol 2)"), "{up}");
    }
    agent
        .wait_log("applied the config the hub pushed", WAIT)
        .await;
    prove_path(
        agent_spec.broker.client_addr(),
        &consumer,
        "telemetry/skew",
        "acme/plant1/line1/telemetry/skew",
        WAIT,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_one_version_older_than_the_hub_delivers() {
    pair(PROTOCOL_VERSION - 1, PROTOCOL_VERSION).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_one_version_newer_than_the_hub_delivers() {
    pair(PROTOCOL_VERSION, PROTOCOL_VERSION - 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_hub_of_one_release_speak_the_newest_version() {
    const {
        assert!(
            OLDEST_SUPPORTED < PROTOCOL_VERSION,
            "two versions are spoken"
        )
    };
    pair(PROTOCOL_VERSION, PROTOCOL_VERSION).await;
}
