//! One load publisher: a minimal MQTT 3.1.1 QoS 1 client written for the bench.
//!
//! Why not rumqttc here: its event loop writes and flushes one request at a time, which made the publisher,
//! not the system under test, the limit of the single-publisher runs (the no-bridge ceiling stayed far
//! below what one Mosquitto does). This client writes every message that is due and fits in the in-flight
//! window in one `write`, and reads PUBACKs in bulk. Packet id = `seq % 65535 + 1`, so with a window below
//! 65,535 a PUBACK names exactly one sequence number: which messages the system acknowledged is exact.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::load::{encode, now_ns, LoadSpec, Published};

/// Keep-alive announced in CONNECT: longer than any run, so no PINGREQ is ever needed (0 would disable it,
/// which rumqttd refuses).
const KEEP_ALIVE_S: u16 = 600;

/// Packet ids cycle over 1..=65535.
const PKIDS: u64 = 65_535;

/// Connects (CONNECT, CONNACK), waits for `go`, publishes per `spec`, collects the outstanding PUBACKs
/// (bounded), and reports what was sent and acknowledged. A lost connection ends it early (the crash
/// scenario's kill).
pub(crate) async fn run(
    id: u32,
    edge: SocketAddr,
    spec: LoadSpec,
    go: Arc<tokio::sync::Barrier>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Result<Published> {
    if u64::from(spec.inflight) >= PKIDS {
        bail!("in-flight window must stay below {PKIDS}");
    }
    let mut stream = TcpStream::connect(edge)
        .await
        .with_context(|| format!("publisher {id}: connecting to {edge}"))?;
    stream.set_nodelay(true)?;
    stream
        .write_all(&connect_packet(&format!("bench-pub-{id}")))
        .await?;
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(20), stream.read_exact(&mut connack))
        .await
        .with_context(|| format!("publisher {id}: no CONNACK"))??;
    if connack[0] != 0x20 || connack[3] != 0 {
        bail!("publisher {id}: connection refused: {connack:?}");
    }
    let (reader, mut writer) = stream.into_split();
    let acks = Arc::new(Acks {
        acked: AtomicU64::new(0),
        lost: AtomicBool::new(false),
        room: Notify::new(),
    });
    let reader = tokio::spawn(read_acks(reader, Arc::clone(&acks)));
    let _ = ready.send(());
    go.wait().await;

    let topic = format!("telemetry/p{id}");
    // Paced publishers start at evenly spread phases, so that 100 publishers at 10 msg/s are a steady
    // 1,000 msg/s and not a burst of 100 every 100 ms.
    let phase = match spec.rate {
        Some(rate) if spec.publishers > 1 => {
            Duration::from_secs_f64(f64::from(id) / f64::from(spec.publishers) / rate)
        }
        _ => Duration::ZERO,
    };
    tokio::time::sleep(phase).await;
    let start = Instant::now();
    let end = start + spec.duration;
    let mut seq = 0u64;
    let mut buf = Vec::with_capacity(64 * 1024);
    while !acks.lost.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let in_flight = seq - acks.acked.load(Ordering::Acquire);
        let room = u64::from(spec.inflight).saturating_sub(in_flight);
        if room == 0 {
            // notify_one keeps a permit, so a PUBACK that lands between the check and here is not missed.
            let _ = tokio::time::timeout(end - now, acks.room.notified()).await;
            continue;
        }
        let due = match spec.rate {
            Some(rate) => {
                let due = (now.duration_since(start).as_secs_f64() * rate) as u64;
                if due <= seq {
                    let next = start + Duration::from_secs_f64((seq + 1) as f64 / rate);
                    tokio::time::sleep_until(next.min(end).into()).await;
                    continue;
                }
                (due - seq).min(room)
            }
            None => room,
        };
        buf.clear();
        for _ in 0..due {
            let payload = encode(id, seq, now_ns());
            publish_packet(&mut buf, &topic, pkid(seq), &payload);
            seq += 1;
        }
        if writer.write_all(&buf).await.is_err() {
            // What was in this write may or may not have arrived; it was never acknowledged either way.
            acks.lost.store(true, Ordering::Relaxed);
            break;
        }
    }
    // Collect the outstanding PUBACKs (bounded), then hang up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while acks.acked.load(Ordering::Acquire) < seq
        && !acks.lost.load(Ordering::Relaxed)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = writer.write_all(&[0xE0, 0x00]).await; // DISCONNECT
    let _ = writer.shutdown().await;
    reader.abort();
    let acked = acks.acked.load(Ordering::Acquire).min(seq);
    // The broker acknowledges in order (checked in read_acks), so the acknowledged messages are a prefix.
    let mut flags = vec![false; usize::try_from(seq)?];
    flags[..usize::try_from(acked)?].fill(true);
    Ok(Published {
        sent: seq,
        acked: flags,
    })
}

/// Shared between the writer and the PUBACK reader.
struct Acks {
    /// PUBACKs received (they come in order, so seq `0..acked` are acknowledged).
    acked: AtomicU64,
    /// The connection failed.
    lost: AtomicBool,
    /// Signalled after PUBACKs freed room in the window.
    room: Notify,
}

fn pkid(seq: u64) -> u16 {
    u16::try_from(seq % PKIDS + 1).unwrap_or(1)
}

/// Reads PUBACKs until the connection ends. MQTT 3.1.1 (4.6) requires PUBACKs in the order of the
/// PUBLISHes; an out-of-order one is reported and ends the publisher, because the prefix bookkeeping would
/// then be wrong.
async fn read_acks(mut reader: tokio::net::tcp::OwnedReadHalf, acks: Arc<Acks>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0usize;
    loop {
        let n = match reader.read(&mut buf[filled..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        filled += n;
        let mut at = 0;
        let mut got = 0u64;
        // Every packet the broker sends a publisher here is a 4-byte PUBACK (0x40 0x02 id id).
        while filled - at >= 4 {
            if buf[at] != 0x40 || buf[at + 1] != 0x02 {
                eprintln!(
                    "  warning: publisher got an unexpected packet type {:#x}",
                    buf[at]
                );
                acks.lost.store(true, Ordering::Relaxed);
                acks.room.notify_one();
                return;
            }
            let id = u16::from_be_bytes([buf[at + 2], buf[at + 3]]);
            let expected = pkid(acks.acked.load(Ordering::Relaxed) + got);
            if id != expected {
                eprintln!("  warning: PUBACK {id} out of order (expected {expected})");
                acks.lost.store(true, Ordering::Relaxed);
                acks.room.notify_one();
                return;
            }
            got += 1;
            at += 4;
        }
        buf.copy_within(at..filled, 0);
        filled -= at;
        if got > 0 {
            acks.acked.fetch_add(got, Ordering::Release);
            acks.room.notify_one();
        }
    }
    acks.lost.store(true, Ordering::Relaxed);
    acks.room.notify_one();
}

fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + client_id.len());
    put_str(&mut body, "MQTT");
    body.push(4); // protocol level 3.1.1
    body.push(0x02); // clean session
    body.extend_from_slice(&KEEP_ALIVE_S.to_be_bytes());
    put_str(&mut body, client_id);
    let mut packet = vec![0x10];
    put_len(&mut packet, body.len());
    packet.extend_from_slice(&body);
    packet
}

fn publish_packet(out: &mut Vec<u8>, topic: &str, pkid: u16, payload: &[u8]) {
    out.push(0x32); // PUBLISH, QoS 1
    put_len(out, 2 + topic.len() + 2 + payload.len());
    put_str(out, topic);
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(payload);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&s.as_bytes()[..usize::from(len)]);
}

/// MQTT variable-length "remaining length".
fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_length_encoding() {
        let cases: [(usize, &[u8]); 4] = [
            (0, &[0x00]),
            (127, &[0x7F]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xFF, 0x7F]),
        ];
        for (len, want) in cases {
            let mut out = Vec::new();
            put_len(&mut out, len);
            assert_eq!(out, want, "{len}");
        }
    }

    #[test]
    fn publish_packet_layout() {
        let mut out = Vec::new();
        publish_packet(&mut out, "t/p0", 7, b"xy");
        assert_eq!(
            out,
            [0x32, 10, 0, 4, b't', b'/', b'p', b'0', 0, 7, b'x', b'y']
        );
    }

    #[test]
    fn packet_ids_cycle_and_skip_zero() {
        let cases = [(0, 1), (65_534, 65_535), (65_535, 1), (131_070, 1)];
        for (seq, want) in cases {
            assert_eq!(pkid(seq), want, "{seq}");
        }
    }
}
