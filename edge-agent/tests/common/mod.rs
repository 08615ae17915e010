//! Test fixtures: a PKI made with rcgen, an in-test QUIC "fake hub" speaking `shared::wire`, agent configs,
//! and an MQTT publisher that records which messages got their PUBACK.
#![allow(dead_code, unreachable_pub)]

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdTcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use quinn::crypto::rustls::QuicServerConfig;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::Outgoing;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use shared::envelope::Envelope;
use shared::wire::{self, Capabilities, Frame, GoAwayCode, PROTOCOL_VERSION};
use tokio::task::JoinHandle;

pub const SITE: &str = "line1";

pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// CA, hub certificate (for `localhost`) and the site's client certificate, as PEM files in `dir`.
pub struct Pki {
    pub ca: PathBuf,
    pub hub_cert: PathBuf,
    pub hub_key: PathBuf,
    pub site_cert: PathBuf,
    pub site_key: PathBuf,
}

impl Pki {
    pub fn create(dir: &Path) -> Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let hub_key = KeyPair::generate()?;
        let mut hub_params = CertificateParams::new(vec!["localhost".to_owned()])?;
        hub_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let hub_cert = hub_params.signed_by(&hub_key, &issuer)?;

        let site_key = KeyPair::generate()?;
        let mut site_params = CertificateParams::default();
        site_params
            .distinguished_name
            .push(DnType::CommonName, SITE);
        site_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let site_cert = site_params.signed_by(&site_key, &issuer)?;

        let pki = Self {
            ca: dir.join("ca.pem"),
            hub_cert: dir.join("hub.pem"),
            hub_key: dir.join("hub-key.pem"),
            site_cert: dir.join("site.pem"),
            site_key: dir.join("site-key.pem"),
        };
        std::fs::write(&pki.ca, ca_cert.pem())?;
        std::fs::write(&pki.hub_cert, hub_cert.pem())?;
        std::fs::write(&pki.hub_key, hub_key.serialize_pem())?;
        std::fs::write(&pki.site_cert, site_cert.pem())?;
        std::fs::write(&pki.site_key, site_key.serialize_pem())?;
        Ok(pki)
    }

    /// A server config built the way the hub builds it: TLS 1.3, client certificates required and
    /// verified against the CA, the protocol's ALPN.
    pub fn server_config(&self) -> Result<quinn::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca)? {
            roots.add(cert?)?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()?;
        let chain =
            CertificateDer::pem_file_iter(&self.hub_cert)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&self.hub_key)?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        tls.alpn_protocols = vec![edge_agent::tls::ALPN.to_vec()];
        let crypto = QuicServerConfig::try_from(tls)?;
        Ok(quinn::ServerConfig::with_crypto(Arc::new(crypto)))
    }
}

/// What the fake hub does with batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// Acknowledge every batch.
    All,
    /// Record, never acknowledge.
    Nothing,
    /// On the first connection, close it without acking once this many entries arrived; then ack all.
    DropFirstAfter(usize),
}

#[derive(Debug)]
pub struct HubState {
    pub received: Vec<Envelope>,
    /// Entries received per connection, in connection order.
    pub per_connection: Vec<Vec<u64>>,
    /// (incarnation, last_acked) of every Hello.
    pub hellos: Vec<(u64, u64)>,
    pub mode: AckMode,
    pub high_water: u64,
    /// What the fake hub announces in `Welcome` (`max_message_size`, `max_topic_len`).
    pub limits: (u32, u16),
    pub saw_goaway_normal: bool,
}

/// A QUIC server that speaks just enough of the hub's protocol.
pub struct FakeHub {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<HubState>>,
    endpoint: quinn::Endpoint,
    task: JoinHandle<()>,
}

/// A UDP port that was free a moment ago, for a hub started later.
pub fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// A TCP port that was free a moment ago, for `broker.listen`.
pub fn free_tcp_port() -> Result<u16> {
    Ok(StdTcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

impl FakeHub {
    pub fn new_state(mode: AckMode, high_water: u64) -> Arc<Mutex<HubState>> {
        Arc::new(Mutex::new(HubState {
            received: Vec::new(),
            per_connection: Vec::new(),
            hellos: Vec::new(),
            mode,
            high_water,
            limits: (256 * 1024, 65_535 - 18),
            saw_goaway_normal: false,
        }))
    }

    /// Starts on `port` (0: ephemeral), retrying briefly while a previous hub's socket is released.
    pub async fn start(pki: &Pki, port: u16, state: Arc<Mutex<HubState>>) -> Result<Self> {
        let config = pki.server_config()?;
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(5);
        let endpoint = loop {
            match quinn::Endpoint::server(config.clone(), addr) {
                Ok(endpoint) => break endpoint,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e).context("bind fake hub"),
            }
        };
        let addr = endpoint.local_addr()?;
        let accept_endpoint = endpoint.clone();
        let accept_state = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Some(incoming) = accept_endpoint.accept().await {
                let state = Arc::clone(&accept_state);
                tokio::spawn(async move {
                    if let Ok(conn) = incoming.await {
                        let _ = serve(conn, state).await;
                    }
                });
            }
        });
        Ok(Self {
            addr,
            state,
            endpoint,
            task,
        })
    }

    pub async fn stop(self) {
        self.endpoint.close(0u32.into(), b"fake hub stopping");
        self.task.abort();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    pub fn received_seqs(&self) -> Vec<u64> {
        self.state
            .lock()
            .expect("lock")
            .received
            .iter()
            .map(|e| e.seq)
            .collect()
    }
}

async fn next(buf: &mut BytesMut, recv: &mut quinn::RecvStream) -> Result<Frame> {
    loop {
        if let Some(frame) = wire::decode(buf, 64 << 20)? {
            return Ok(frame);
        }
        match recv.read_chunk(64 * 1024, true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => bail!("stream closed"),
        }
    }
}

async fn serve(conn: quinn::Connection, state: Arc<Mutex<HubState>>) -> Result<()> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let mut buf = BytesMut::new();
    let Frame::Hello {
        incarnation,
        last_acked,
        ..
    } = next(&mut buf, &mut recv).await?
    else {
        bail!("expected Hello");
    };
    let (connection_index, high_water, (max_message_size, max_topic_len)) = {
        let mut s = state.lock().expect("lock");
        s.hellos.push((incarnation, last_acked));
        s.per_connection.push(Vec::new());
        (s.per_connection.len() - 1, s.high_water, s.limits)
    };
    let mut out = BytesMut::new();
    Frame::Welcome {
        version: PROTOCOL_VERSION,
        capabilities: Capabilities::EMPTY,
        max_frame_size: 16 << 20,
        hub_high_water: high_water,
        config_version: 0,
        max_message_size,
        max_topic_len,
        hub_version: "test-hub".into(),
    }
    .encode(&mut out)?;
    send.write_all(&out).await?;
    loop {
        let frame = next(&mut buf, &mut recv).await?;
        out.clear();
        match frame {
            Frame::Batch { entries } => {
                let last = entries.last().map(|e| e.seq);
                let ack = {
                    let mut s = state.lock().expect("lock");
                    s.per_connection[connection_index].extend(entries.iter().map(|e| e.seq));
                    s.received.extend(entries);
                    match s.mode {
                        AckMode::All => true,
                        AckMode::Nothing => false,
                        AckMode::DropFirstAfter(n) => {
                            if connection_index == 0 {
                                if s.per_connection[0].len() >= n {
                                    drop(s);
                                    conn.close(5u32.into(), b"dropping without ack");
                                    return Ok(());
                                }
                                false
                            } else {
                                true
                            }
                        }
                    }
                };
                if let (true, Some(upto)) = (ack, last) {
                    Frame::Ack { upto }.encode(&mut out)?;
                }
            }
            Frame::Ping { nonce } => Frame::Pong { nonce }.encode(&mut out)?,
            Frame::GoAway { code, .. } => {
                if code == GoAwayCode::Normal {
                    state.lock().expect("lock").saw_goaway_normal = true;
                }
                return Ok(());
            }
            other => bail!("unexpected {other:?}"),
        }
        if !out.is_empty() {
            send.write_all(&out).await?;
        }
    }
}

/// Agent config text: embedded broker on `mqtt_port`, hub at `hub_port`, short timers for tests.
pub fn agent_toml(data_dir: &Path, pki: &Pki, hub_port: u16, broker: &str) -> String {
    format!(
        r#"
site = "{SITE}"
data_dir = "{data}"
log = "info"

[broker]
{broker}

[uplink]
hub = "127.0.0.1:{hub_port}"
server_name = "localhost"
ca = "{ca}"
cert = "{cert}"
key = "{key}"
batch_max_messages = 64
window = 4
reconnect_min = "50ms"
reconnect_max = "300ms"
keep_alive = "300ms"
idle_timeout = "1s"
shutdown_timeout = "2s"

[[routes]]
filter = "telemetry/#"
"#,
        data = data_dir.display(),
        ca = pki.ca.display(),
        cert = pki.site_cert.display(),
        key = pki.site_key.display(),
    )
}

pub fn embedded_broker(port: u16) -> String {
    format!("kind = \"embedded\"\nlisten = \"127.0.0.1:{port}\"")
}

pub fn parse_config(text: &str, base: &Path) -> Result<shared::config::AgentConfig> {
    Ok(shared::config::AgentConfig::from_toml_str(text, base)?)
}

/// Waits until `cond` holds, polling; fails after `timeout`.
pub async fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits until a TCP connect to `port` succeeds (the agent's readiness).
pub async fn wait_listening(port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listening on {port} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes `count` QoS 1 messages `telemetry/t/<i>` with payload `<i>` and a user property, recording in
/// `acked` the index of every message whose PUBACK came back. Returns when all are acked or the
/// connection fails.
pub async fn publish_tracked(
    port: u16,
    client_id: &str,
    count: usize,
    acked: Arc<Mutex<HashSet<usize>>>,
) -> Result<()> {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_outgoing_inflight_upper_limit(20);
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let producer = tokio::spawn(async move {
        for i in 0..count {
            let properties = PublishProperties {
                user_properties: vec![("idx".to_owned(), i.to_string())],
                ..PublishProperties::default()
            };
            if client
                .publish_with_properties(
                    format!("telemetry/t/{i}"),
                    QoS::AtLeastOnce,
                    false,
                    i.to_string(),
                    properties,
                )
                .await
                .is_err()
            {
                break;
            }
        }
        client
    });
    let mut next_index = 0;
    let mut pkid_to_index: HashMap<u16, usize> = HashMap::new();
    let mut result = Ok(());
    loop {
        if acked.lock().expect("lock").len() == count {
            break;
        }
        match eventloop.poll().await {
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                pkid_to_index.insert(pkid, next_index);
                next_index += 1;
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(i) = pkid_to_index.remove(&ack.pkid) {
                    acked.lock().expect("lock").insert(i);
                }
            }
            Ok(_) => {}
            Err(e) => {
                result = Err(e).context("publisher connection");
                break;
            }
        }
    }
    producer.abort();
    result
}
