//! One test's mesh: a temp directory with a PKI, and helpers that write a config and start a hub or an
//! agent from it, waiting until it is ready.

use std::path::Path;
use std::time::Duration;

use tempfile::TempDir;

use crate::bins::{bin, CLOUD_HUB, EDGE_AGENT};
use crate::pki::Pki;
use crate::process::Proc;
use crate::spec::{AgentSpec, BrokerSpec, HubSpec};

/// How long a program may take to become ready (debug builds on a loaded 2-core machine).
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a program may take to exit after SIGTERM (the agent's `shutdown_timeout` is 5 s in tests).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The readiness line both programs log ("ready" as the whole message, after the target).
pub const READY_LOG: &str = ": ready";

/// A test's working directory and certificates.
#[derive(Debug)]
pub struct Mesh {
    /// `None` only after a failing test kept the directory (see `Drop`).
    dir: Option<TempDir>,
    /// CA, hub and site certificates.
    pub pki: Pki,
}

impl Mesh {
    /// A temp dir with a PKI holding certificates for `sites`.
    pub fn new(sites: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(&dir.path().join("pki"), sites);
        Self {
            dir: Some(dir),
            pki,
        }
    }

    /// The certificates of this mesh.
    pub fn pki(&self) -> &Pki {
        &self.pki
    }

    /// The working directory (configs, logs, data dirs).
    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("the mesh directory").path()
    }

    /// A hub spec in this mesh for `sites`.
    pub fn hub_spec(&self, broker: BrokerSpec, sites: &[&str]) -> HubSpec {
        HubSpec::new(self.path(), &self.pki, broker, sites)
    }

    /// An agent spec in this mesh for `site`, uplinked to `hub`.
    pub fn agent_spec(&self, site: &str, broker: BrokerSpec, hub: &HubSpec) -> AgentSpec {
        AgentSpec::new(self.path(), &self.pki, site, broker, hub.quic)
    }

    /// Writes `hub.toml`, starts the hub and waits until it is ready.
    pub async fn start_hub(&self, spec: &HubSpec) -> Proc {
        self.start_hub_env(spec, &[]).await
    }

    /// [`Self::start_hub`] with `env` set for the hub.
    pub async fn start_hub_env(&self, spec: &HubSpec, env: &[(String, String)]) -> Proc {
        let config = spec.write(&self.path().join("hub.toml"));
        let mut proc = Proc::start_env(
            "hub",
            &bin(CLOUD_HUB),
            &config_args(&config),
            env,
            self.path(),
        );
        wait_ready(&mut proc, &spec.broker).await;
        proc
    }

    /// Writes `<name>.toml`, starts the agent and waits until it is ready.
    pub async fn start_agent(&self, name: &str, spec: &AgentSpec) -> Proc {
        self.start_agent_env(name, spec, &[]).await
    }

    /// [`Self::start_agent`] with `env` set for the agent.
    pub async fn start_agent_env(
        &self,
        name: &str,
        spec: &AgentSpec,
        env: &[(String, String)],
    ) -> Proc {
        let config = spec.write(&self.path().join(format!("{name}.toml")));
        let mut proc = Proc::start_env(
            name,
            &bin(EDGE_AGENT),
            &config_args(&config),
            env,
            self.path(),
        );
        wait_ready(&mut proc, &spec.broker).await;
        proc
    }
}

/// `--config <config>`.
fn config_args(config: &Path) -> Vec<String> {
    vec!["--config".to_owned(), config.to_string_lossy().into_owned()]
}

/// A failing test keeps its directory: the programs' logs (printed by each `Proc` as it drops, which may
/// be after the `Mesh` that holds them), their configs and data dirs are what explains the failure.
impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(dir) = self.dir.take() {
                eprintln!("test failed: kept its directory {}", dir.keep().display());
            }
        }
    }
}

/// Waits until a (re)started program is ready: its embedded broker accepts connections, or, with an
/// external broker, it logged its readiness line.
pub async fn wait_ready(proc: &mut Proc, broker: &BrokerSpec) {
    match broker {
        BrokerSpec::Embedded { listen } => proc.wait_ready(*listen, READY_TIMEOUT).await,
        BrokerSpec::External { .. } => {
            proc.wait_log(READY_LOG, READY_TIMEOUT).await;
        }
    }
}

/// Restarts a stopped program on the same config and data directory and waits until it is ready.
pub async fn restart(proc: &mut Proc, broker: &BrokerSpec) {
    proc.restart();
    wait_ready(proc, broker).await;
}

/// Publishes probe messages on `local_topic` at the edge broker `edge` until one arrives at `collector`
/// under `cloud_topic`: the whole path (edge broker, agent subscription, uplink, hub, cloud broker) is up.
/// Needed with an external edge broker, which drops messages published before the agent subscribed.
///
/// # Panics
/// If nothing got through within `timeout`.
pub async fn prove_path(
    edge: std::net::SocketAddr,
    collector: &crate::mqtt::Collector,
    local_topic: &str,
    cloud_topic: &str,
    timeout: Duration,
) {
    let deadline = std::time::Instant::now() + timeout;
    for k in 0u32.. {
        let plan = crate::mqtt::PublishPlan::new(&format!("probe{k}"), local_topic, 1);
        // A refused or unconfirmed probe is fine: the next one tries again.
        let _ = crate::mqtt::Publisher::start(edge, plan).finish().await;
        if collector
            .wait_until(Duration::from_secs(1), |r| {
                r.iter().any(|m| m.topic == cloud_topic)
            })
            .await
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no probe on {local_topic} reached the cloud as {cloud_topic} within {timeout:?}"
        );
    }
}

/// Lines of a program log at WARN or ERROR level that read like a refused peer (TLS failure, unknown CA,
/// expired certificate, unconfigured site). Loose on purpose: the test asserts that the refusal is logged
/// at all, not its wording.
pub fn refusal_lines(log: &str) -> Vec<String> {
    const WORDS: [&str; 12] = [
        "refus",
        "reject",
        "unauthori",
        "not configured",
        "certificate",
        "handshake",
        "tls",
        "unknown",
        "expired",
        "not valid",
        "invalid",
        "denied",
    ];
    log.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .filter(|l| {
            let lower = l.to_lowercase();
            WORDS.iter().any(|w| lower.contains(w))
        })
        .map(str::to_owned)
        .collect()
}
