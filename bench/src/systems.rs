//! The three systems under test, each started from scratch in its own temporary directory on loopback
//! ports: meshbridge (agent + hub), a Mosquitto edge bridged to a Mosquitto cloud, and one Mosquitto with
//! no bridge (the ceiling).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
// Ports below the kernel's ephemeral range (tests/src/net.rs says why).
use meshbridge_tests::net::{free_tcp, free_udp};

use crate::procs::{Proc, Spec, Usage};

/// Namespace the cloud side publishes the edge's `telemetry/...` under (meshbridge site namespace, Mosquitto
/// bridge remote prefix).
pub(crate) const NAMESPACE: &str = "acme/plant1/line1";

/// Site name of the meshbridge agent.
const SITE: &str = "line1";

/// Which system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// edge-agent + cloud-hub, embedded brokers on both sides.
    Meshbridge,
    /// The same, with traces exported over OTLP at the default sampling ratio to a receiver in the bench
    /// (see `shared/src/trace.rs`): what tracing costs out of the box.
    MeshbridgeTraced,
    /// Mosquitto edge with a bridge to a Mosquitto cloud, persistence on.
    MosquittoBridge,
    /// One Mosquitto, publishers and subscriber on it: the machine's ceiling.
    Ceiling,
}

impl Kind {
    /// Column header.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Self::Meshbridge => "meshbridge",
            Self::MeshbridgeTraced => "meshbridge, traced",
            Self::MosquittoBridge => "mosquitto bridge",
            Self::Ceiling => "no-bridge ceiling",
        }
    }
}

/// Where the programs are.
#[derive(Debug, Clone)]
pub(crate) struct Programs {
    /// `edge-agent` release binary.
    pub(crate) agent: PathBuf,
    /// `cloud-hub` release binary.
    pub(crate) hub: PathBuf,
    /// `mosquitto`.
    pub(crate) mosquitto: PathBuf,
}

impl Programs {
    /// Finds the agent and hub next to this executable (same target dir and profile), unless given, and
    /// Mosquitto on the usual paths.
    pub(crate) fn locate(agent: Option<PathBuf>, hub: Option<PathBuf>) -> Result<Self> {
        let exe = std::env::current_exe().context("locating the bench executable")?;
        let dir = exe.parent().context("bench executable has no directory")?;
        let agent = agent.unwrap_or_else(|| dir.join("edge-agent"));
        let hub = hub.unwrap_or_else(|| dir.join("cloud-hub"));
        for program in [&agent, &hub] {
            if !program.is_file() {
                bail!(
                    "{} not found: build the programs first, with the same profile and target dir as the bench:\n    \
                     cargo build --release --workspace --bins",
                    program.display()
                );
            }
        }
        let mosquitto = [
            "/usr/sbin/mosquitto",
            "/usr/bin/mosquitto",
            "/usr/local/sbin/mosquitto",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("mosquitto not found (Debian: apt-get install mosquitto)")?;
        Ok(Self {
            agent,
            hub,
            mosquitto,
        })
    }
}

/// A started system: an edge the publishers connect to and a cloud broker the subscriber connects to.
pub(crate) struct Deployment {
    /// Which system.
    pub(crate) kind: Kind,
    /// The edge program (agent, Mosquitto edge, or the single broker of the ceiling).
    pub(crate) edge: Proc,
    /// The cloud program (hub with its embedded broker, Mosquitto cloud); none for the ceiling.
    pub(crate) cloud: Option<Proc>,
    /// Publishers connect here.
    pub(crate) edge_mqtt: SocketAddr,
    /// The subscriber connects here.
    pub(crate) cloud_mqtt: SocketAddr,
    /// Temporary directory with configs, data and logs; removed on drop.
    pub(crate) dir: tempfile::TempDir,
    /// The OTLP receiver the traced system exports to.
    pub(crate) traces: Option<meshbridge_tests::otlp::OtlpReceiver>,
}

impl Deployment {
    /// Starts `kind` from scratch: cloud first, then edge.
    pub(crate) async fn start(kind: Kind, programs: &Programs) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("meshbridge-bench-")
            .tempdir()
            .context("creating a temporary directory")?;
        match kind {
            Kind::Meshbridge => start_meshbridge(dir, programs, None).await,
            Kind::MeshbridgeTraced => {
                let receiver = meshbridge_tests::otlp::OtlpReceiver::start().await;
                start_meshbridge(dir, programs, Some(receiver)).await
            }
            Kind::MosquittoBridge => start_mosquitto_bridge(dir, programs).await,
            Kind::Ceiling => {
                let port = free_tcp();
                let spec = mosquitto_spec(dir.path(), programs, "mosquitto", port, None)?;
                let edge = Proc::start(spec).await?;
                Ok(Self {
                    kind,
                    edge,
                    cloud: None,
                    edge_mqtt: port,
                    cloud_mqtt: port,
                    dir,
                    traces: None,
                })
            }
        }
    }

    /// Topic filter the subscriber uses for everything the publishers send to `telemetry/...`.
    pub(crate) fn cloud_filter(&self) -> String {
        match self.kind {
            Kind::Ceiling => "telemetry/#".to_owned(),
            Kind::Meshbridge | Kind::MeshbridgeTraced | Kind::MosquittoBridge => {
                format!("{NAMESPACE}/telemetry/#")
            }
        }
    }

    /// Marks the start of the measurement window on every process.
    pub(crate) fn mark(&mut self) {
        self.edge.mark();
        if let Some(cloud) = self.cloud.as_mut() {
            cloud.mark();
        }
    }

    /// Usage of edge and cloud over the measurement window.
    pub(crate) fn usage(&self) -> (Usage, Option<Usage>) {
        (
            self.edge.window_usage(),
            self.cloud.as_ref().map(Proc::window_usage),
        )
    }

    /// Stops the cloud side with SIGTERM (the hub drains and stops; Mosquitto saves its persistence file).
    pub(crate) async fn stop_cloud(&mut self) -> Result<()> {
        self.cloud
            .as_mut()
            .context("this system has no cloud side to stop")?
            .stop()
            .await
    }

    /// Starts the cloud side again on the same ports and data and waits until it is ready.
    pub(crate) async fn start_cloud(&mut self) -> Result<()> {
        self.cloud
            .as_mut()
            .context("this system has no cloud side to start")?
            .restart()
            .await
    }

    /// Kills the edge with SIGKILL.
    pub(crate) async fn kill_edge(&mut self) -> Result<()> {
        self.edge.kill().await
    }

    /// Starts the edge again on the same ports and data.
    pub(crate) async fn start_edge(&mut self) -> Result<()> {
        self.edge.restart().await
    }

    /// Stops everything (edge first so that nothing is left waiting on the cloud).
    /// Stops both programs (the traced system's exporters flush on the way out); returns how many spans
    /// its OTLP receiver got, for the traced system.
    pub(crate) async fn shutdown(mut self) -> Result<Option<usize>> {
        self.edge.stop().await?;
        if let Some(cloud) = self.cloud.as_mut() {
            cloud.stop().await?;
        }
        if std::env::var_os("BENCH_KEEP").is_some() {
            let kept = self.dir.keep();
            eprintln!("  kept {}", kept.display());
        }
        Ok(self.traces.as_ref().map(|r| r.spans().len()))
    }
}

async fn start_meshbridge(
    dir: tempfile::TempDir,
    programs: &Programs,
    traces: Option<meshbridge_tests::otlp::OtlpReceiver>,
) -> Result<Deployment> {
    // Only the endpoint: every other OTEL_* setting at its default, as a site would run it.
    let env: Vec<(String, String)> = traces
        .iter()
        .map(|r| ("OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(), r.endpoint()))
        .collect();
    let root = dir.path();
    let pki = root.join("pki");
    cloud_hub::pki::init(&pki, &[]).context("creating the bench CA")?;
    let site = cloud_hub::pki::issue_site(&pki, SITE, Duration::from_secs(24 * 3600))
        .context("issuing the site certificate")?;
    let quic = free_udp();
    let cloud_mqtt = free_tcp();
    let edge_mqtt = free_tcp();
    let hub_toml = root.join("hub.toml");
    write(
        &hub_toml,
        &format!(
            r#"data_dir = "hub-data"
log = "info"
[listen]
quic = "{quic}"
[tls]
ca = "pki/ca.pem"
cert = "pki/hub.pem"
key = "pki/hub.key"
[broker]
kind = "embedded"
listen = "{cloud_mqtt}"
allow_anonymous = true
[[sites]]
name = "{SITE}"
namespace = "{NAMESPACE}"
"#
        ),
    )?;
    let agent_toml = root.join("agent.toml");
    write(
        &agent_toml,
        &format!(
            r#"site = "{SITE}"
data_dir = "agent-data"
log = "info"
[broker]
kind = "embedded"
listen = "{edge_mqtt}"
[uplink]
hub = "{quic}"
server_name = "localhost"
ca = "pki/ca.pem"
cert = "{cert}"
key = "{key}"
# Every uplink setting at its default: the figures are what a site gets out of the box.
[[routes]]
filter = "telemetry/#"
"#,
            cert = site.cert.display(),
            key = site.key.display(),
        ),
    )?;
    let cloud = Proc::start(Spec {
        name: "cloud-hub",
        program: programs.hub.clone(),
        args: vec!["--config".into(), hub_toml.display().to_string()],
        ready_tcp: cloud_mqtt,
        ready_udp: Some(quic),
        log: root.join("hub.log"),
        env: env.clone(),
    })
    .await?;
    let edge = Proc::start(Spec {
        name: "edge-agent",
        program: programs.agent.clone(),
        args: vec!["--config".into(), agent_toml.display().to_string()],
        ready_tcp: edge_mqtt,
        ready_udp: None,
        log: root.join("agent.log"),
        env,
    })
    .await?;
    Ok(Deployment {
        kind: if traces.is_some() {
            Kind::MeshbridgeTraced
        } else {
            Kind::Meshbridge
        },
        edge,
        cloud: Some(cloud),
        edge_mqtt,
        cloud_mqtt,
        dir,
        traces,
    })
}

async fn start_mosquitto_bridge(dir: tempfile::TempDir, programs: &Programs) -> Result<Deployment> {
    let root = dir.path();
    let cloud_mqtt = free_tcp();
    let edge_mqtt = free_tcp();
    let bridge = format!(
        "
connection cloud
address {cloud_mqtt}
bridge_protocol_version mqttv311
clientid bench-bridge-{SITE}
cleansession false
# Retry every second (one value is ignored by 2.0.11, which then backs off 5-30 s at random).
restart_timeout 1 1
topic telemetry/# out 1 \"\" {NAMESPACE}/
"
    );
    let cloud = Proc::start(mosquitto_spec(
        root,
        programs,
        "mosquitto-cloud",
        cloud_mqtt,
        None,
    )?)
    .await?;
    let edge = Proc::start(mosquitto_spec(
        root,
        programs,
        "mosquitto-edge",
        edge_mqtt,
        Some(&bridge),
    )?)
    .await?;
    Ok(Deployment {
        kind: Kind::MosquittoBridge,
        edge,
        cloud: Some(cloud),
        edge_mqtt,
        cloud_mqtt,
        dir,
        traces: None,
    })
}

/// A Mosquitto with persistence on and no queue limit (`max_queued_messages 0`), optionally bridged.
fn mosquitto_spec(
    root: &Path,
    programs: &Programs,
    name: &'static str,
    port: SocketAddr,
    bridge: Option<&str>,
) -> Result<Spec> {
    let data = root.join(format!("{name}-data"));
    std::fs::create_dir_all(&data)?;
    let conf = root.join(format!("{name}.conf"));
    write(
        &conf,
        &format!(
            "listener {port} {ip}
allow_anonymous true
persistence true
persistence_location {data}/
# Mosquitto's default, written out: the in-memory state is snapshotted to disk every 30 minutes and at a
# clean shutdown; there is no per-message log.
autosave_interval 1800
# No queue limit: the default (1000) drops QoS 1 messages queued for a slow or offline session.
max_queued_messages 0
# Outgoing QoS 1 window per client and for the bridge; the default (20) would throttle the subscriber and the
# bridge, so it is raised to the in-flight window the embedded broker uses (rumqttd: 1000).
max_inflight_messages 1000
{user}log_dest stderr
log_type error
log_type warning
log_type notice
{bridge}",
            port = port.port(),
            ip = port.ip(),
            data = data.display(),
            bridge = bridge.unwrap_or(""),
            user = run_as(),
        ),
    )?;
    Ok(Spec {
        name,
        program: programs.mosquitto.clone(),
        args: vec!["-c".into(), conf.display().to_string()],
        ready_tcp: port,
        ready_udp: None,
        log: root.join(format!("{name}.log")),
        env: Vec::new(),
    })
}

/// Mosquitto started as root switches to the `mosquitto` user, which could not write the data directory in
/// our temporary directory: keep it as whoever runs the bench.
fn run_as() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next());
    if uid == Some("0") {
        "user root\n".to_owned()
    } else {
        String::new()
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
