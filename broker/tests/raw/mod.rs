//! A raw-packet MQTT client for the conformance tests: packet builders (MQTT 3.1.1 §3, 5.0 §3) and a
//! client that sends exactly the bytes a test asks for and returns every packet the server sends.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use anyhow::{bail, ensure, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use meshbridge_broker::embedded::{EmbeddedBroker, EmbeddedSettings};
use meshbridge_broker::front::{self, CommitRequest, FrontError, FrontOptions};
use shared::mqtt::{self, FixedHeader, PacketType, ProtocolVersion, Publish, PublishProperties};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Upper bound for a single expected packet.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is observed.
pub const QUIET: Duration = Duration::from_millis(400);

pub const V4: ProtocolVersion = ProtocolVersion::V3_1_1;
pub const V5: ProtocolVersion = ProtocolVersion::V5;

// ---------------------------------------------------------------------------------------------------
// Packet builders (MQTT 3.1.1 §3, 5.0 §3).

pub fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = u8::try_from(len % 128).expect("< 128");
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            return;
        }
    }
}

pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_len(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

pub fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u16::try_from(s.len()).expect("short").to_be_bytes());
    out.extend_from_slice(s);
}

/// CONNECT options.
#[derive(Clone)]
pub struct Conn<'a> {
    pub version: ProtocolVersion,
    pub client_id: &'a str,
    pub clean: bool,
    pub keep_alive: u16,
    /// (topic, payload, qos, retain)
    pub will: Option<(&'a str, &'a [u8], u8, bool)>,
    /// v5 session expiry interval (seconds), for sessions that must outlive the connection.
    pub session_expiry: u32,
    /// v5 Will Delay Interval (seconds); 0 sends no property.
    pub will_delay: u32,
}

impl<'a> Conn<'a> {
    pub fn new(version: ProtocolVersion, client_id: &'a str) -> Self {
        Self {
            version,
            client_id,
            clean: true,
            keep_alive: 60,
            will: None,
            session_expiry: 0,
            will_delay: 0,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let v5 = self.version == V5;
        let mut flags = 0u8;
        if self.clean {
            flags |= 0x02;
        }
        if let Some((_, _, qos, retain)) = self.will {
            flags |= 0x04 | (qos << 3) | if retain { 0x20 } else { 0 };
        }
        let mut body = Vec::new();
        put_str(&mut body, b"MQTT");
        body.push(self.version.level());
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        if v5 {
            if self.session_expiry > 0 {
                body.push(5);
                body.push(0x11);
                body.extend_from_slice(&self.session_expiry.to_be_bytes());
            } else {
                body.push(0);
            }
        }
        put_str(&mut body, self.client_id.as_bytes());
        if let Some((topic, payload, _, _)) = self.will {
            if v5 && self.will_delay > 0 {
                body.push(5);
                body.push(0x18);
                body.extend_from_slice(&self.will_delay.to_be_bytes());
            } else if v5 {
                body.push(0);
            }
            put_str(&mut body, topic.as_bytes());
            put_str(&mut body, payload);
        }
        packet(0x10, &body)
    }
}

pub fn publish(
    version: ProtocolVersion,
    topic: &str,
    qos: u8,
    retain: bool,
    id: u16,
    payload: &[u8],
) -> Vec<u8> {
    let qos_value = mqtt::QoS::from_code(qos).expect("qos 0..=2");
    let p = Publish {
        dup: false,
        qos: qos_value,
        retain,
        topic: topic.to_owned(),
        packet_id: (qos > 0).then_some(id),
        properties: PublishProperties::default(),
        payload: Bytes::copy_from_slice(payload),
    };
    let mut out = BytesMut::new();
    mqtt::encode_publish(&p, version, &mut out).expect("encodable");
    out.to_vec()
}

pub fn subscribe(version: ProtocolVersion, id: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if version == V5 {
        body.push(0);
    }
    for (filter, qos) in filters {
        put_str(&mut body, filter.as_bytes());
        body.push(*qos);
    }
    packet(0x82, &body)
}

pub fn unsubscribe(version: ProtocolVersion, id: u16, filters: &[&str]) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    if version == V5 {
        body.push(0);
    }
    for filter in filters {
        put_str(&mut body, filter.as_bytes());
    }
    packet(0xA2, &body)
}

/// PUBACK (0x40), PUBREC (0x50), PUBREL (0x62) or PUBCOMP (0x70) for `id`, success.
pub fn ack(first: u8, id: u16) -> Vec<u8> {
    packet(first, &id.to_be_bytes())
}

// ---------------------------------------------------------------------------------------------------
// A raw client.

/// One packet as received: type, flags and the body after the fixed header.
#[derive(Debug, Clone)]
pub struct Pkt {
    pub kind: PacketType,
    pub flags: u8,
    pub body: Bytes,
    pub frame: Bytes,
}

impl Pkt {
    pub fn packet_id(&self) -> Option<u16> {
        (self.body.len() >= 2).then(|| u16::from_be_bytes([self.body[0], self.body[1]]))
    }

    pub fn publish(&self, version: ProtocolVersion) -> Result<Publish> {
        Ok(Publish::decode(&self.frame, version)?)
    }
}

pub struct Client {
    version: ProtocolVersion,
    stream: TcpStream,
    buf: BytesMut,
    next_id: u16,
}

impl Client {
    /// Connects and returns the client and its CONNACK.
    pub async fn connect(addr: SocketAddr, conn: &Conn<'_>) -> Result<(Self, Pkt)> {
        let mut client = Self {
            version: conn.version,
            stream: TcpStream::connect(addr).await?,
            buf: BytesMut::new(),
            next_id: 1,
        };
        client.send(&conn.encode()).await?;
        let connack = client.expect(PacketType::Connack).await?;
        Ok((client, connack))
    }

    /// Connects and fails unless the CONNACK accepts the connection; returns session present.
    pub async fn connected(addr: SocketAddr, conn: &Conn<'_>) -> Result<(Self, bool)> {
        let (client, connack) = Self::connect(addr, conn).await?;
        ensure!(
            connack.body.len() >= 2 && connack.body[1] == 0,
            "CONNACK refused: {:02x?}",
            &connack.body[..]
        );
        Ok((client, connack.body[0] & 1 == 1))
    }

    pub fn id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        Ok(self.stream.write_all(bytes).await?)
    }

    /// The next packet within `within`; `Ok(None)` if the server closed the connection. A PUBREL (the
    /// server's half of a QoS 2 delivery this client answered with PUBREC) is answered with PUBCOMP here
    /// and not returned, wherever it falls among other packets.
    pub async fn next_within(&mut self, within: Duration) -> Result<Option<Pkt>> {
        timeout(within, async {
            loop {
                match FixedHeader::parse(&self.buf, usize::MAX) {
                    Ok(h) if self.buf.len() >= h.frame_len() => {
                        let frame = self.buf.split_to(h.frame_len()).freeze();
                        let mut body = frame.clone();
                        body.advance(h.header_len);
                        if h.packet_type == PacketType::Pubrel && body.len() >= 2 {
                            let comp = ack(0x70, u16::from_be_bytes([body[0], body[1]]));
                            self.stream.write_all(&comp).await?;
                            continue;
                        }
                        return Ok(Some(Pkt {
                            kind: h.packet_type,
                            flags: h.flags,
                            body,
                            frame,
                        }));
                    }
                    Ok(_) | Err(mqtt::DecodeError::Incomplete) => {}
                    Err(e) => bail!("malformed packet from the server: {e}"),
                }
                self.buf.reserve(4096);
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(_) => {}
                }
            }
        })
        .await
        .context("timed out waiting for a packet")?
    }

    pub async fn next(&mut self) -> Result<Pkt> {
        self.next_within(WAIT)
            .await?
            .context("the server closed the connection")
    }

    /// The next packet, which must be of `kind`.
    pub async fn expect(&mut self, kind: PacketType) -> Result<Pkt> {
        let p = self.next().await?;
        ensure!(p.kind == kind, "expected {kind:?}, got {p:?}");
        Ok(p)
    }

    /// Whether the server closes the connection within `within` (packets before the close are skipped).
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Ok(None) => return true,
                Ok(Some(_)) => {}
                Err(_) => return false,
            }
        }
    }

    /// Nothing arrives for [`QUIET`].
    pub async fn quiet(&mut self) -> Result<()> {
        match self.next_within(QUIET).await {
            Err(_) => Ok(()),
            Ok(Some(p)) => bail!("unexpected {p:?}"),
            Ok(None) => bail!("connection closed"),
        }
    }

    pub async fn subscribe(&mut self, filters: &[(&str, u8)]) -> Result<Vec<u8>> {
        let id = self.id();
        self.send(&subscribe(self.version, id, filters)).await?;
        let suback = self.expect(PacketType::Suback).await?;
        ensure!(suback.packet_id() == Some(id), "SUBACK id");
        let mut codes = suback.body.slice(2..);
        if self.version == V5 {
            let props = usize::from(codes[0]);
            codes.advance(1 + props);
        }
        Ok(codes.to_vec())
    }

    pub async fn unsubscribe(&mut self, filters: &[&str]) -> Result<()> {
        let id = self.id();
        self.send(&unsubscribe(self.version, id, filters)).await?;
        let unsuback = self.expect(PacketType::Unsuback).await?;
        ensure!(unsuback.packet_id() == Some(id), "UNSUBACK id");
        Ok(())
    }

    /// Publishes and completes the QoS flow (PUBACK; PUBREC, PUBREL, PUBCOMP), failing on a negative ack.
    /// Packets that are not part of the flow (deliveries) are returned.
    pub async fn publish(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: &[u8],
    ) -> Result<Vec<Pkt>> {
        let id = self.id();
        self.send(&publish(self.version, topic, qos, retain, id, payload))
            .await?;
        let mut other = Vec::new();
        if qos == 0 {
            return Ok(other);
        }
        let want = if qos == 1 {
            PacketType::Puback
        } else {
            PacketType::Pubrec
        };
        loop {
            let p = self.next().await?;
            if p.kind == want && p.packet_id() == Some(id) {
                ensure!(
                    p.body.len() < 3 || p.body[2] < 0x80,
                    "negative ack {:02x?}",
                    &p.body[..]
                );
                break;
            }
            other.push(p);
        }
        if qos == 2 {
            self.send(&ack(0x62, id)).await?;
            loop {
                let p = self.next().await?;
                if p.kind == PacketType::Pubcomp && p.packet_id() == Some(id) {
                    break;
                }
                other.push(p);
            }
        }
        Ok(other)
    }

    /// Receives `n` PUBLISHes (after `already`), acknowledging each, and returns (topic, payload, qos,
    /// retain, dup).
    pub async fn receive(&mut self, already: Vec<Pkt>, n: usize) -> Result<Vec<Got>> {
        let mut got = Vec::new();
        let mut pending = already.into_iter();
        while got.len() < n {
            let p = match pending.next() {
                Some(p) => p,
                None => self.next().await?,
            };
            if p.kind != PacketType::Publish {
                continue;
            }
            got.push(self.take(&p).await?);
        }
        Ok(got)
    }

    /// Decodes and acknowledges one delivered PUBLISH.
    pub async fn take(&mut self, p: &Pkt) -> Result<Got> {
        let publish = p.publish(self.version)?;
        match (publish.qos, publish.packet_id) {
            (mqtt::QoS::AtLeastOnce, Some(id)) => self.send(&ack(0x40, id)).await?,
            // The PUBREL that follows is answered by `next_within`.
            (mqtt::QoS::ExactlyOnce, Some(id)) => self.send(&ack(0x50, id)).await?,
            _ => {}
        }
        Ok(Got {
            topic: publish.topic,
            payload: publish.payload.to_vec(),
            qos: publish.qos as u8,
            retain: publish.retain,
            dup: p.flags & 0x08 != 0,
        })
    }

    pub async fn disconnect(mut self) -> Result<()> {
        let first = if self.version == V5 {
            packet(0xE0, &[0, 0])
        } else {
            packet(0xE0, &[])
        };
        self.send(&first).await?;
        let _ = self.stream.shutdown().await;
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Got {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
}

// ---------------------------------------------------------------------------------------------------
// The front under test.

/// rumqttd + the front + a commit pipeline that commits every captured message at once.
pub struct Mesh {
    broker: EmbeddedBroker,
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    front: JoinHandle<Result<(), FrontError>>,
    pipeline: JoinHandle<()>,
    committed: Arc<Mutex<Vec<String>>>,
    /// The persistent-session store's directory, when the front serves sessions.
    _sessions: Option<tempfile::TempDir>,
}

impl Mesh {
    /// The hub's set-up: every session is rumqttd's.
    pub async fn start() -> Result<Self> {
        Self::start_with(false).await
    }

    /// The edge agent's set-up: the front serves persistent sessions from a store on disk and answers
    /// PUBLISHes no subscriber of rumqttd's could match itself.
    pub async fn start_agent() -> Result<Self> {
        Self::start_with(true).await
    }

    async fn start_with(persistent_sessions: bool) -> Result<Self> {
        let (dir, sessions) = if persistent_sessions {
            let dir = tempfile::tempdir()?;
            let store = shared::queue::SessionStore::open(
                dir.path().join("sessions.redb"),
                shared::queue::SessionLimits::default(),
            )?;
            let sessions = meshbridge_broker::sessions::Sessions::open(Arc::new(store), None)?;
            (Some(dir), Some(sessions))
        } else {
            (None, None)
        };
        let broker = EmbeddedBroker::start(&EmbeddedSettings::default()).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (commits_tx, mut commits) = mpsc::channel::<CommitRequest>(64);
        let committed = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&committed);
        let pipeline = tokio::spawn(async move {
            while let Some(request) = commits.recv().await {
                seen.lock()
                    .expect("lock")
                    .extend(request.messages.iter().map(|m| m.publish.topic.clone()));
                let _ = request.done.send(Ok(()));
            }
        });
        let shutdown = CancellationToken::new();
        let select: front::Select = Arc::new(|_: &str| true);
        let front = tokio::spawn(front::serve(
            listener,
            broker.upstreams(),
            select,
            commits_tx,
            FrontOptions {
                answer_unsubscribed: sessions.is_some(),
                sessions,
                ..FrontOptions::default()
            },
            shutdown.clone(),
        ));
        Ok(Self {
            broker,
            addr,
            shutdown,
            front,
            pipeline,
            committed,
            _sessions: dir,
        })
    }

    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        timeout(WAIT, self.front)
            .await
            .context("front did not stop")???;
        timeout(WAIT, self.pipeline)
            .await
            .context("pipeline did not stop")??;
        self.broker.stop().await;
        Ok(())
    }

    pub fn committed(&self) -> Vec<String> {
        self.committed.lock().expect("lock").clone()
    }
}
