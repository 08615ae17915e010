//! The embedded rumqttd directly (no front), for the behaviour we patched in `vendor/rumqttd`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meshbridge_broker::embedded::{EmbeddedBroker, EmbeddedSettings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

/// An MQTT 3.1.1 CONNECT with clean session, keep-alive 60 s and the given client id.
fn connect_packet(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

async fn connect(addr: std::net::SocketAddr, client_id: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&connect_packet(client_id)).await?;
    let mut connack = [0u8; 4];
    timeout(WAIT, s.read_exact(&mut connack)).await??;
    ensure!(
        connack[0] == 0x20 && connack[3] == 0,
        "CONNACK accepted: {connack:?}"
    );
    Ok(s)
}

/// A client that says DISCONNECT and goes must not take the next client down with it. rumqttd 0.20 removed
/// the connection when it handled the DISCONNECT packet and again when the socket closed; by then the
/// connection id could belong to a new client, which was dropped. Each round checks that the client which
/// connected right after a disconnecting one still answers PINGREQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnecting_client_never_drops_the_next_one() -> Result<()> {
    let broker = EmbeddedBroker::start(&EmbeddedSettings::default()).await?;
    let addr = broker.upstreams().v4;
    for round in 0..200 {
        let mut first = connect(addr, &format!("first-{round}")).await?;
        first.write_all(&[0xe0, 0x00]).await?; // DISCONNECT
        drop(first);
        let mut second = connect(addr, &format!("second-{round}")).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        second.write_all(&[0xc0, 0x00]).await?; // PINGREQ
        let mut resp = [0u8; 2];
        timeout(WAIT, second.read_exact(&mut resp))
            .await
            .context("PINGRESP in time")?
            .with_context(|| format!("round {round}: the second client was disconnected"))?;
        ensure!(
            resp == [0xd0, 0x00],
            "round {round}: PINGRESP, got {resp:?}"
        );
        second.write_all(&[0xe0, 0x00]).await?;
    }
    broker.stop().await;
    Ok(())
}
