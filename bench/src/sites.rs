//! The `sites` scenario (issue 10 item 5): N simulated sites against one hub, where the next scale goal
//! will come from.
//!
//! Each site is a real agent session as the hub sees it: its own certificate from the bench CA (mutual TLS
//! over QUIC, the site named by the certificate's CN), `Hello`/`Welcome`, then one-message `Batch` frames
//! of the real wire protocol (`shared::wire`), acknowledged by the hub after the cloud broker accepted
//! them. The sessions run in this process, all on one QUIC endpoint, so 1,000 fit on the machine: what is
//! simulated is the agent's disk queue and local broker, not the link.
//!
//! Reported per N: how fast the N handshakes went (all sites connecting at once, at most
//! [`CONNECT_CONCURRENCY`] in flight, as after a hub restart), the hub's resident memory per connected
//! site, and over a steady window at a fixed total rate spread evenly over the sites: delivered msg/s at
//! the cloud subscriber, latency p50/p99 (site send → cloud receive) and the hub's CPU per message.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
// Ports below the kernel's ephemeral range (tests/src/net.rs says why).
use bytes::{Bytes, BytesMut};
use meshbridge_tests::net::{free_tcp, free_udp};
use shared::envelope::{Envelope, Properties, QoS};
use shared::wire::{self, Capabilities, Frame};
use tokio::sync::Semaphore;

use crate::load::{encode, now_ns, Subscriber};
use crate::procs::{rss, Proc, Spec};
use crate::stats::{Fmt, Rows};
use crate::systems::Programs;

/// Handshakes in flight at once while the sites connect (below the hub's `listen.retry_above`, so the
/// figure is the handshake itself, not address validation).
const CONNECT_CONCURRENCY: usize = 48;
/// Largest frame read from the hub.
const MAX_FRAME: usize = 1 << 20;
/// How long the cloud may take to receive everything once the sites stop sending.
const DRAIN: Duration = Duration::from_secs(20);

/// What the scenario runs.
#[derive(Debug, Clone)]
pub(crate) struct SitesSettings {
    /// Messages per second over all sites.
    pub(crate) total_rate: u32,
    /// Length of the steady window.
    pub(crate) duration: Duration,
}

impl SitesSettings {
    /// 1,000 msg/s in all (a factory's worth of lines) for 20 s, or 5 s with `--quick`.
    pub(crate) fn new(quick: bool) -> Self {
        Self {
            total_rate: 1000,
            duration: Duration::from_secs(if quick { 5 } else { 20 }),
        }
    }

    /// One line saying what was run.
    pub(crate) fn describe(&self) -> String {
        format!(
            "N simulated sites (own certificates, real wire protocol, one QUIC endpoint in the bench process) \
             against one hub with its embedded cloud broker; all N connect at once ({CONNECT_CONCURRENCY} \
             handshakes in flight), then {} msg/s in all, spread evenly, QoS 1, {} B payloads, for {:?}",
            self.total_rate,
            crate::load::PAYLOAD_LEN,
            self.duration
        )
    }
}

/// The name of simulated site `i`.
fn site_name(i: usize) -> String {
    format!("site{i:04}")
}

/// One run with `n` sites.
pub(crate) async fn run(programs: &Programs, n: usize, s: &SitesSettings) -> Result<Rows> {
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let pki = root.join("pki");
    cloud_hub::pki::init(&pki, &[]).context("creating the bench CA")?;
    let started = Instant::now();
    let mut certs = Vec::with_capacity(n);
    for i in 0..n {
        let paths = cloud_hub::pki::issue_site(&pki, &site_name(i), Duration::from_secs(86_400))
            .with_context(|| format!("issuing the certificate of {}", site_name(i)))?;
        certs.push(paths);
    }
    eprintln!(
        "  {n} site certificates in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let quic = free_udp();
    let cloud_mqtt = free_tcp();
    write_hub_config(root, n, quic, cloud_mqtt)?;
    let mut hub = Proc::start(Spec {
        name: "cloud-hub",
        program: programs.hub.clone(),
        args: vec![
            "--config".into(),
            root.join("hub.toml").display().to_string(),
        ],
        ready_tcp: cloud_mqtt,
        ready_udp: Some(quic),
        log: root.join("hub.log"),
        env: Vec::new(),
    })
    .await?;
    let result = measure(&mut hub, &pki, &certs, quic, cloud_mqtt, s).await;
    if let Err(e) = hub.stop().await {
        eprintln!("  warning: stopping the hub: {e:#}");
    }
    if result.is_err() || std::env::var_os("BENCH_KEEP").is_some() {
        let kept = dir.keep();
        eprintln!("  kept {}", kept.display());
    }
    result
}

fn write_hub_config(root: &Path, n: usize, quic: SocketAddr, cloud_mqtt: SocketAddr) -> Result<()> {
    use std::fmt::Write as _;
    let mut text = format!(
        r#"data_dir = "hub-data"
log = "warn"
[listen]
quic = "{quic}"
max_connections = {max}
[tls]
ca = "pki/ca.pem"
cert = "pki/hub.pem"
key = "pki/hub.key"
[broker]
kind = "embedded"
listen = "{cloud_mqtt}"
allow_anonymous = true
max_connections = 100
[status]
enabled = false
"#,
        max = n + 16
    );
    for i in 0..n {
        let _ = writeln!(
            text,
            "[[sites]]\nname = \"{}\"\nnamespace = \"acme/plant1/{{site}}\"",
            site_name(i)
        );
    }
    std::fs::write(root.join("hub.toml"), text).context("writing hub.toml")
}

/// One connected simulated site.
struct Session {
    index: usize,
    name: String,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    buf: BytesMut,
}

async fn measure(
    hub: &mut Proc,
    pki: &Path,
    certs: &[cloud_hub::pki::SiteCertPaths],
    quic: SocketAddr,
    cloud_mqtt: SocketAddr,
    s: &SitesSettings,
) -> Result<Rows> {
    let n = certs.len();
    let subscriber = Subscriber::start(cloud_mqtt, "acme/#").await?;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    let rss_before = rss(hub.pid()).unwrap_or(0);

    // Every site at once, as after a hub restart.
    let gate = Arc::new(Semaphore::new(CONNECT_CONCURRENCY));
    let t0 = Instant::now();
    let mut joins = Vec::with_capacity(n);
    for (index, paths) in certs.iter().enumerate() {
        let config = edge_agent::tls::client_config(
            &pki.join("ca.pem"),
            &paths.cert,
            &paths.key,
            &edge_agent::tls::ClientTransport::default(),
            Arc::new(|_| {}),
        )
        .context("a site's client config")?;
        let (endpoint, gate) = (endpoint.clone(), Arc::clone(&gate));
        joins.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            connect(&endpoint, config, quic, index).await
        }));
    }
    let mut sessions = Vec::with_capacity(n);
    for join in joins {
        sessions.push(join.await??);
    }
    let connect_s = t0.elapsed().as_secs_f64();
    // Let the hub settle (allocations of the admitted connections) before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_connected = rss(hub.pid()).unwrap_or(0);

    // Steady window: each site sends every `n / total_rate` seconds, the sites spread over the period.
    hub.mark();
    let period = Duration::from_secs_f64(n as f64 / f64::from(s.total_rate));
    let sent = Arc::new(AtomicU64::new(0));
    let deadline = tokio::time::Instant::now() + s.duration;
    let mut tasks = Vec::with_capacity(n);
    for session in sessions {
        let offset = period.mul_f64(session.index as f64 / n as f64);
        let sent = Arc::clone(&sent);
        tasks.push(tokio::spawn(drive(session, period, offset, deadline, sent)));
    }
    let mut failed = 0usize;
    let mut conns = Vec::with_capacity(n);
    for task in tasks {
        match task.await? {
            Ok(conn) => conns.push(conn),
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("  a site failed: {e:#}");
                }
            }
        }
    }
    let total = sent.load(Ordering::Relaxed);
    let drain_deadline = Instant::now() + DRAIN;
    while subscriber.received() < total && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let window = hub.window_usage();
    let peak = hub.usage().peak_rss;
    for conn in &conns {
        conn.close(0u32.into(), b"bench done");
    }
    endpoint.wait_idle().await;
    let receipts = subscriber.finish().await;
    if failed > 0 {
        bail!("{failed} of {n} sites failed during the steady window");
    }

    let delivered = receipts.len() as f64;
    let mut latencies: Vec<u64> = receipts
        .iter()
        .map(|r| r.recv_ns.saturating_sub(r.sent_ns))
        .collect();
    latencies.sort_unstable();
    let pct = |p: f64| -> Option<f64> {
        if latencies.is_empty() {
            return None;
        }
        let at = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        Some(latencies[at] as f64)
    };
    let mut rows = Rows::default();
    rows.push("sites connected", Some(n as f64), Fmt::Count);
    rows.push("all connected after", Some(connect_s), Fmt::Secs);
    rows.push(
        "handshakes per second",
        Some(n as f64 / connect_s),
        Fmt::Count,
    );
    rows.push(
        "hub RSS per site (KiB)",
        Some(rss_connected.saturating_sub(rss_before) as f64 / n as f64 / 1024.0),
        Fmt::Count,
    );
    rows.push("hub RSS connected", Some(rss_connected as f64), Fmt::Mib);
    rows.push("hub peak RSS", Some(peak as f64), Fmt::Mib);
    rows.push("sent", Some(total as f64), Fmt::Count);
    rows.push(
        "delivered msg/s",
        Some(delivered / s.duration.as_secs_f64()),
        Fmt::Count,
    );
    rows.push(
        "lost",
        Some((total as f64 - delivered).max(0.0)),
        Fmt::Count,
    );
    rows.push("latency p50", pct(0.50), Fmt::Ms);
    rows.push("latency p99", pct(0.99), Fmt::Ms);
    rows.push(
        "hub CPU per message",
        (delivered > 0.0).then(|| window.cpu_s * 1e6 / delivered),
        Fmt::Micros,
    );
    Ok(rows)
}

/// Connects site `index`: handshake, `Hello`, `Welcome`.
async fn connect(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    hub: SocketAddr,
    index: usize,
) -> Result<Session> {
    let name = site_name(index);
    let conn = endpoint
        .connect_with(config, hub, "localhost")?
        .await
        .with_context(|| format!("{name}: handshake"))?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Frame::Hello {
        versions: wire::SUPPORTED,
        capabilities: Capabilities::EMPTY,
        agent_name: name.clone(),
        incarnation: 1 + index as u64,
        last_acked: 0,
        config_version: 0,
        lane: 0,
        agent_version: "bench".to_owned(),
        // The agent's default uplink window, so the hub acknowledges as it does for a real agent.
        window: 8,
    };
    let mut out = BytesMut::new();
    hello.encode(&mut out)?;
    send.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        match next_frame(&mut recv, &mut buf).await? {
            Frame::Welcome { .. } => break,
            Frame::GoAway { code, reason, .. } => bail!("{name}: refused: {code:?} {reason}"),
            _ => {}
        }
    }
    Ok(Session {
        index,
        name,
        conn,
        send,
        recv,
        buf,
    })
}

/// Reads the next whole frame.
async fn next_frame(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> Result<Frame> {
    loop {
        if let Some(frame) = wire::decode(buf, MAX_FRAME)? {
            return Ok(frame);
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => bail!("the hub closed the stream"),
        }
    }
}

/// Sends one message every `period` (first after `offset`) until `deadline`, answering pings, then waits
/// for the last acknowledgement. Returns the connection (closed by the caller).
async fn drive(
    mut session: Session,
    period: Duration,
    offset: Duration,
    deadline: tokio::time::Instant,
    sent: Arc<AtomicU64>,
) -> Result<quinn::Connection> {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut seq, mut acked) = (0u64, 0u64);
    let mut out = BytesMut::with_capacity(512);
    let payload_id = u32::try_from(session.index).unwrap_or(u32::MAX);
    let mut sending = true;
    loop {
        if !sending && acked >= seq {
            return Ok(session.conn);
        }
        tokio::select! {
            _ = tick.tick(), if sending => {
                if tokio::time::Instant::now() >= deadline {
                    sending = false;
                    continue;
                }
                seq += 1;
                let entry = Envelope {
                    origin: session.name.clone(),
                    seq,
                    topic: "telemetry/bench".to_owned(),
                    payload: Bytes::from(encode(payload_id, seq, now_ns())),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    properties: Properties::default(),
                    trace: None,
                    enqueued_at_ms: 0,
                };
                out.clear();
                Frame::Batch { entries: vec![entry] }.encode(&mut out)?;
                session.send.write_all(&out).await?;
                sent.fetch_add(1, Ordering::Relaxed);
            }
            () = tokio::time::sleep_until(deadline + DRAIN), if !sending => {
                bail!("{}: {} of {seq} messages never acknowledged", session.name, seq - acked);
            }
            frame = next_frame(&mut session.recv, &mut session.buf) => match frame? {
                Frame::Ack { upto } => acked = acked.max(upto),
                Frame::Ping { nonce } => {
                    out.clear();
                    Frame::Pong { nonce }.encode(&mut out)?;
                    session.send.write_all(&out).await?;
                }
                Frame::GoAway { code, reason, .. } => bail!("{}: GoAway {code:?} {reason}", session.name),
                _ => {}
            },
        }
    }
}
