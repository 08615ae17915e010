//! Both programs stop cleanly on SIGTERM when their standard output and error are gone: the reader of the
//! pipe died (a log shipper, or `deploy/local/run.sh` killed together with its line prefixers). Before
//! `metrics/src/logging.rs` turned tracing-subscriber's internal error reports off, the first failed log
//! write was reported with `eprintln!`, which panicked on the closed standard error, and the agent's
//! shutdown never finished.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use meshbridge_tests::bins::{bin, CLOUD_HUB, EDGE_AGENT};
use meshbridge_tests::mesh::Mesh;
use meshbridge_tests::spec::BrokerSpec;

/// Starts `program --config config` with both output streams on a pipe whose reader is closed at once.
fn start_without_output(program: &str, config: &std::path::Path) -> Child {
    let mut child = Command::new(bin(program))
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {program}: {e}"));
    drop(child.stdout.take());
    drop(child.stderr.take());
    child
}

/// Waits until `addr` accepts TCP connections (the program serves), failing if it exits first.
async fn wait_listening(child: &mut Child, addr: std::net::SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(
            child.try_wait().expect("wait").is_none(),
            "exited before serving"
        );
        assert!(Instant::now() < deadline, "not listening on {addr}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends SIGTERM and requires a clean exit within 15 s.
async fn terminate(child: &mut Child, name: &str) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "{name} exited with {status}");
            return;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{name} did not stop within 15 s of SIGTERM with its output gone");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_programs_stop_on_sigterm_with_their_output_gone() {
    let mesh = Mesh::new(&["line1"]);
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let hub_config = hub_spec.write(&mesh.path().join("hub.toml"));
    let agent_spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let agent_config = agent_spec.write(&mesh.path().join("line1.toml"));

    let mut hub = start_without_output(CLOUD_HUB, &hub_config);
    wait_listening(&mut hub, hub_spec.broker.client_addr()).await;
    let mut agent = start_without_output(EDGE_AGENT, &agent_config);
    wait_listening(&mut agent, agent_spec.broker.client_addr()).await;
    // Connected and logging (each log line now fails to be written).
    tokio::time::sleep(Duration::from_millis(500)).await;

    terminate(&mut agent, "edge-agent").await;
    terminate(&mut hub, "cloud-hub").await;
}
