//! Process tests: the agent binary is killed with SIGKILL mid-stream and restarted; nothing a publisher
//! (embedded mode) or the site broker (external mode) got an acknowledgement for is lost.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use shared::envelope::Envelope;
use shared::queue::{Queue, RedbQueue};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use common::*;
use meshbridge_tests::mosquitto;

const LONG: Duration = Duration::from_secs(60);

/// The agent binary running with `config`; its log lines are echoed and watched for "ready".
struct AgentProcess {
    child: Child,
    ready: Arc<AtomicBool>,
}

impl AgentProcess {
    fn spawn(config: &Path) -> Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,rumqttd=off,meshbridge_broker=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("spawn edge-agent")?;
        let ready = Arc::new(AtomicBool::new(false));
        let stdout = child.stdout.take().context("stdout")?;
        let flag = Arc::clone(&ready);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains(" ready ") || line.ends_with(" ready") {
                    flag.store(true, Ordering::SeqCst);
                }
                eprintln!("agent| {line}");
            }
        });
        Ok(Self { child, ready })
    }

    async fn wait_ready(&self) -> Result<()> {
        let ready = Arc::clone(&self.ready);
        wait_until("the agent's ready line", LONG, move || {
            ready.load(Ordering::SeqCst)
        })
        .await
    }

    async fn kill9(mut self) -> Result<()> {
        self.child.start_kill()?; // SIGKILL on Unix
        self.child.wait().await?;
        Ok(())
    }

    /// SIGTERM, then expects a clean exit (status 0).
    async fn terminate(mut self) -> Result<()> {
        // `unsafe` is denied in this workspace (libc::kill), so use the `kill` command.
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().context("pid")?.to_string())
            .status()
            .await?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        let status = tokio::time::timeout(LONG, self.child.wait()).await??;
        if !status.success() {
            bail!("agent exited with {status} after SIGTERM");
        }
        Ok(())
    }
}

/// Payload indexes of every message stored in the queue file.
fn queued_indexes(queue_file: &Path) -> Result<HashSet<usize>> {
    let queue = RedbQueue::open(queue_file, Default::default())?;
    let entries = queue.read(1, usize::MAX, usize::MAX)?;
    entries
        .into_iter()
        .map(|entry| {
            let envelope = Envelope::decode_body(entry.seq, entry.body)?;
            Ok(std::str::from_utf8(&envelope.payload)?.parse()?)
        })
        .collect()
}

fn delivered_indexes(state: &Arc<Mutex<HubState>>) -> HashSet<usize> {
    state
        .lock()
        .expect("lock")
        .received
        .iter()
        .filter_map(|e| std::str::from_utf8(&e.payload).ok()?.parse().ok())
        .collect()
}

fn write_config(dir: &Path, text: &str) -> Result<PathBuf> {
    let path = dir.join("agent.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_embedded_loses_no_acknowledged_message() -> Result<()> {
    init_logs();
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    // The hub records but acknowledges nothing, so everything must still be in the queue after the kill.
    let state = FakeHub::new_state(AckMode::Nothing, 0);
    let hub = FakeHub::start(&pki, 0, Arc::clone(&state)).await?;
    let mqtt = free_tcp_port()?;
    let data = dir.path().join("data");
    let config = write_config(
        dir.path(),
        &agent_toml(&data, &pki, hub.addr.port(), &embedded_broker(mqtt)),
    )?;

    let agent = AgentProcess::spawn(&config)?;
    wait_listening(mqtt, LONG).await?;
    agent.wait_ready().await?;
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let n = 5000;
    let publisher = tokio::spawn(publish_tracked(mqtt, "crash", n, Arc::clone(&acked)));
    let watch = Arc::clone(&acked);
    wait_until("some acknowledged messages", LONG, move || {
        watch.lock().expect("lock").len() >= 300
    })
    .await?;
    agent.kill9().await?;
    // The publisher sees its connection drop; it may or may not have finished.
    let _ = tokio::time::timeout(LONG, publisher).await?;
    let acked: HashSet<usize> = acked.lock().expect("lock").clone();
    assert!(acked.len() >= 300);

    let queued = queued_indexes(&data.join(edge_agent::QUEUE_FILE))?;
    let missing: Vec<_> = acked.difference(&queued).copied().collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged messages missing from the queue after kill -9, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );

    // Restart; the hub now acknowledges: every acknowledged message is delivered.
    state.lock().expect("lock").mode = AckMode::All;
    let agent = AgentProcess::spawn(&config)?;
    wait_listening(mqtt, LONG).await?;
    let hub_state = Arc::clone(&state);
    let wanted = acked.clone();
    wait_until("every acknowledged message at the hub", LONG, move || {
        wanted.is_subset(&delivered_indexes(&hub_state))
    })
    .await?;
    agent.terminate().await?;
    let remaining = queued_indexes(&data.join(edge_agent::QUEUE_FILE))?;
    assert!(
        remaining.is_empty(),
        "{} messages left in the queue",
        remaining.len()
    );
    hub.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_mosquitto_delivers_all_across_kill9() -> Result<()> {
    init_logs();
    if mosquitto::skip("external_mosquitto_delivers_all_across_kill9") {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let pki = Pki::create(dir.path())?;
    let port = free_tcp_port()?;
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\npersistence false\nsys_interval 1\n"
        ),
    )?;
    let exe = mosquitto::executable().context("mosquitto executable")?;
    let mut mosquitto = Command::new(exe)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawn mosquitto")?;
    wait_listening(port, LONG).await?;

    let state = FakeHub::new_state(AckMode::All, 0);
    let hub = FakeHub::start(&pki, 0, Arc::clone(&state)).await?;
    let data = dir.path().join("data");
    let broker = format!(
        "kind = \"external\"\naddress = \"127.0.0.1:{port}\"\nclient_id = \"meshbridge-test-line1\""
    );
    let config = write_config(
        dir.path(),
        &agent_toml(&data, &pki, hub.addr.port(), &broker),
    )?;
    let agent = AgentProcess::spawn(&config)?;
    agent.wait_ready().await?;
    // The subscription request follows the CONNACK; give it a moment to be in place.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let n = 3000;
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let publisher = tokio::spawn(publish_tracked(port, "mosq-pub", n, Arc::clone(&acked)));
    let hub_state = Arc::clone(&state);
    wait_until("some messages at the hub", LONG, move || {
        hub_state.lock().expect("lock").received.len() >= 300
    })
    .await?;
    agent.kill9().await?;
    // Publishing continues into Mosquitto, which queues for the agent's persistent session.
    tokio::time::timeout(LONG, publisher).await???;
    let agent = AgentProcess::spawn(&config)?;
    let hub_state = Arc::clone(&state);
    wait_until("every message at the hub", LONG, move || {
        delivered_indexes(&hub_state).len() == n
    })
    .await?;
    {
        let s = state.lock().expect("lock");
        let seqs: Vec<u64> = s.received.iter().map(|e| e.seq).collect();
        let distinct: HashSet<u64> = seqs.iter().copied().collect();
        let max = distinct.iter().copied().max().unwrap_or(0);
        assert_eq!(distinct.len() as u64, max, "seqs 1..=max with no gap");
        eprintln!(
            "external: {} entries received, {} distinct seqs, {} payloads",
            seqs.len(),
            distinct.len(),
            n
        );
    }
    agent.terminate().await?;
    mosquitto.start_kill()?;
    let _ = mosquitto.wait().await;
    hub.stop().await;
    Ok(())
}
