//! Issue 13 item 1: the programs under a `Type=notify` unit with `WatchdogSec=`, and `systemctl reload`.
//!
//! systemd is played by a unix datagram socket named in `NOTIFY_SOCKET`, as systemd names its own: each
//! program must send `READY=1` once it serves (its MQTT port accepts connections by then), `WATCHDOG=1`
//! every half `WATCHDOG_USEC`, and `STOPPING=1` on SIGTERM. SIGHUP (what `ExecReload=` sends) must not
//! kill the agent: it answers with what it re-read and what needs a restart.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use meshbridge_tests::mesh::{Mesh, STOP_TIMEOUT};
use meshbridge_tests::process::Proc;
use meshbridge_tests::spec::BrokerSpec;

/// The watchdog interval given to the programs: they must ping every 250 ms.
const WATCHDOG_USEC: &str = "500000";

/// A stand-in for systemd's notification socket: collects every datagram.
struct NotifySocket {
    path: String,
    got: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl NotifySocket {
    fn bind(dir: &Path, name: &str) -> Self {
        let path = dir.join(format!("{name}.notify"));
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&got);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with the test process; a thread blocked in recv holds nothing else.
            while let Ok(n) = socket.recv(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                sink.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((Instant::now(), text));
            }
        });
        Self {
            path: path.to_string_lossy().into_owned(),
            got,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("NOTIFY_SOCKET".to_owned(), self.path.clone()),
            ("WATCHDOG_USEC".to_owned(), WATCHDOG_USEC.to_owned()),
        ]
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.got
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits (bounded) for a datagram starting with `prefix`; returns it.
    async fn wait(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, text)) = self.all().into_iter().find(|(_, t)| t.starts_with(prefix)) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} within {timeout:?}; got {:?}",
                self.all()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts the watchdog is pinged steadily: at least `n` pings, none more than a second apart.
    async fn assert_watchdog(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pings: Vec<Instant> = self
                .all()
                .into_iter()
                .filter(|(_, t)| t == "WATCHDOG=1")
                .map(|(at, _)| at)
                .collect();
            if pings.len() >= n {
                for pair in pings.windows(2) {
                    let gap = pair[1] - pair[0];
                    assert!(gap < Duration::from_secs(1), "a watchdog gap of {gap:?}");
                }
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} watchdog pings in 10 s",
                pings.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn signal(proc: &Proc, signal: &str) {
    let pid = proc.pid().expect("running");
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_programs_notify_systemd_and_the_agent_survives_sighup() {
    let mesh = Mesh::new(&["line1"]);
    let hub_notify = NotifySocket::bind(mesh.path(), "hub");
    let agent_notify = NotifySocket::bind(mesh.path(), "agent");
    let hub_spec = mesh.hub_spec(BrokerSpec::embedded(), &["line1"]);
    let mut hub = mesh.start_hub_env(&hub_spec, &hub_notify.env()).await;
    let spec = mesh.agent_spec("line1", BrokerSpec::embedded(), &hub_spec);
    let mut agent = mesh
        .start_agent_env("line1", &spec, &agent_notify.env())
        .await;

    // Ready once serving: both ports accepted connections before these were awaited.
    let ready = hub_notify.wait("READY=1", Duration::from_secs(10)).await;
    assert!(ready.contains("STATUS=QUIC on"), "{ready}");
    let ready = agent_notify.wait("READY=1", Duration::from_secs(10)).await;
    assert!(
        ready.contains("STATUS=site line1: serving MQTT on"),
        "{ready}"
    );
    hub_notify.assert_watchdog(4).await;
    agent_notify.assert_watchdog(4).await;

    // systemctl reload: the agent says what it re-read and keeps running.
    signal(&agent, "HUP");
    agent
        .wait_log(
            "SIGHUP: the config file is as running",
            Duration::from_secs(10),
        )
        .await;
    // A changed `log` is put in force at once; another changed key is named as needing a restart.
    let config = mesh.path().join("line1.toml");
    let text = std::fs::read_to_string(&config).expect("read the agent config");
    std::fs::write(
        &config,
        text.replacen(
            "log = ",
            "log = \"debug\"\nworker_threads = 2\n# was: log = ",
            1,
        ),
    )
    .expect("edit the agent config");
    signal(&agent, "HUP");
    let applied = agent
        .wait_log("SIGHUP: log filter now in force", Duration::from_secs(10))
        .await;
    assert!(applied.contains("debug"), "{applied}");
    let line = agent
        .wait_log(
            "these keys take effect at the next restart",
            Duration::from_secs(10),
        )
        .await;
    assert!(line.contains("keys=worker_threads"), "{line}");
    assert!(
        !line.contains("keys=log") && !line.contains(", log"),
        "log was applied: {line}"
    );
    // The hub reloads its config on SIGHUP as before, and puts a changed `log` in force too.
    let hub_config = mesh.path().join("hub.toml");
    let text = std::fs::read_to_string(&hub_config).expect("read the hub config");
    std::fs::write(
        &hub_config,
        text.replacen("log = ", "log = \"debug\"\n# was: log = ", 1),
    )
    .expect("edit the hub config");
    signal(&hub, "HUP");
    let applied = hub
        .wait_log("log filter now in force", Duration::from_secs(10))
        .await;
    assert!(applied.contains("debug"), "{applied}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        agent.is_running(),
        "the agent died of SIGHUP\n{}",
        agent.log_text()
    );
    assert!(
        hub.is_running(),
        "the hub died of SIGHUP\n{}",
        hub.log_text()
    );
    agent_notify.assert_watchdog(6).await;

    let status = agent.terminate(STOP_TIMEOUT).await;
    assert!(status.success(), "agent: {status}");
    agent_notify
        .wait("STOPPING=1", Duration::from_secs(1))
        .await;
    let status = hub.terminate(STOP_TIMEOUT).await;
    assert!(status.success(), "hub: {status}");
    hub_notify.wait("STOPPING=1", Duration::from_secs(1)).await;
}
