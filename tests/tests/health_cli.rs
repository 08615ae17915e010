//! Issue 13 item 2, the programs' `health` command (what the container images' HEALTHCHECK runs, as they
//! have no shell or curl): `cloud-hub health --config FILE` and `edge-agent --config FILE health` exit 0
//! while the program's metrics endpoint answers, and 1 with a one-line reason once it is stopped or when the
//! config has no `[metrics]` (never 2, which Docker reserves).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use meshbridge_tests::bins::{bin, CLOUD_HUB, EDGE_AGENT};
use meshbridge_tests::mesh::{Mesh, STOP_TIMEOUT};
use meshbridge_tests::net::free_tcp;
use meshbridge_tests::spec::BrokerSpec;

/// The probe's own limit is 2 s, and a healthy answer or a refused connection comes back in milliseconds;
/// this bounds a hang, with room for starting a debug binary on a loaded 2-core machine.
const PROBE_BOUND: Duration = Duration::from_secs(8);

fn health(program: &str, config: &Path) -> Output {
    let config = config.to_str().expect("UTF-8 path");
    let args: &[&str] = if program == CLOUD_HUB {
        &["health", "--config", config]
    } else {
        &["--config", config, "health"]
    };
    let started = Instant::now();
    let out = Command::new(bin(program))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap_or_else(|e| panic!("run {program} health: {e}"));
    assert!(
        started.elapsed() < PROBE_BOUND,
        "{program} health took {:?}",
        started.elapsed()
    );
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the unhealthy answer: status 1 and one line on standard error that says `why`.
fn assert_unhealthy(program: &str, out: &Output, why: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{program}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{program}: {err}");
    assert!(
        err.contains("unhealthy") && err.contains(why),
        "{program}: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_0_while_the_endpoint_answers_and_1_with_a_reason_otherwise() {
    let mesh = Mesh::new(&["line1"]);
    let mut hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    // The hub listens on every interface, as in a container: `health` probes it on 127.0.0.1.
    let hub_port = free_tcp().port();
    hub_spec.metrics = Some(SocketAddr::from(([0, 0, 0, 0], hub_port)));
    let mut hub = mesh.start_hub(&hub_spec).await;
    let mut spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    spec.metrics = Some(free_tcp());
    let mut agent = mesh.start_agent("line1", &spec).await;
    let hub_config = mesh.path().join("hub.toml");
    let agent_config = mesh.path().join("line1.toml");

    let out = health(CLOUD_HUB, &hub_config);
    assert!(out.status.success(), "hub: {}", stderr(&out));
    let out = health(EDGE_AGENT, &agent_config);
    assert!(out.status.success(), "agent: {}", stderr(&out));

    agent.terminate(STOP_TIMEOUT).await;
    let out = health(EDGE_AGENT, &agent_config);
    assert_unhealthy(EDGE_AGENT, &out, "cannot connect to 127.0.0.1:");
    hub.terminate(STOP_TIMEOUT).await;
    let out = health(CLOUD_HUB, &hub_config);
    assert_unhealthy(
        CLOUD_HUB,
        &out,
        &format!("cannot connect to 127.0.0.1:{hub_port}"),
    );

    // A config without an endpoint cannot be probed, and says so.
    hub_spec.metrics = None;
    let bare = hub_spec.write(&mesh.path().join("hub-bare.toml"));
    assert_unhealthy(
        CLOUD_HUB,
        &health(CLOUD_HUB, &bare),
        "has no [metrics] listen",
    );
    spec.metrics = None;
    let bare = spec.write(&mesh.path().join("line1-bare.toml"));
    assert_unhealthy(
        EDGE_AGENT,
        &health(EDGE_AGENT, &bare),
        "has no [metrics] listen",
    );

    // An invalid config is unhealthy too (1, not check-config's 2), its problems on the one line.
    let broken = mesh.path().join("broken.toml");
    std::fs::write(&broken, "data_dir = 1\n").expect("write");
    let out = health(CLOUD_HUB, &broken);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim_end().lines().count(),
        1,
        "{}",
        stderr(&out)
    );
}
