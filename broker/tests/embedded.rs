//! The embedded rumqttd directly (no front), for the behaviour we patched in `vendor/rumqttd`.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use meshbridge_broker::embedded::{EmbeddedBroker, EmbeddedSettings};
use shared::mqtt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(5);

/// An MQTT 3.1.1 (`level` 4) or 5.0 (`level` 5) CONNECT with clean session, keep-alive 60 s, the given
/// client id and, if given, a username and password.
fn connect_packet(level: u8, client_id: &str, login: Option<(&str, &str)>) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 60];
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    match login {
        Some((user, password)) => {
            mqtt::replace_connect_login(&packet, user.as_bytes(), password.as_bytes())
                .expect("a valid CONNECT")
                .to_vec()
        }
        None => packet,
    }
}

/// Connects with the broker's internal login and expects the CONNECT accepted.
async fn connect(broker: &EmbeddedBroker, client_id: &str) -> Result<TcpStream> {
    let login = broker.login();
    let mut s = TcpStream::connect(broker.v4_addr).await?;
    s.write_all(&connect_packet(
        4,
        client_id,
        Some((login.user(), login.secret())),
    ))
    .await?;
    let mut connack = [0u8; 4];
    timeout(WAIT, s.read_exact(&mut connack)).await??;
    ensure!(
        connack[0] == 0x20 && connack[3] == 0,
        "CONNACK accepted: {connack:?}"
    );
    Ok(s)
}

/// Whether a CONNECT with `login` to `addr` is accepted (a CONNACK with code 0); a refusal, a closed
/// connection or silence until [`WAIT`] all count as not accepted.
async fn accepted(
    addr: std::net::SocketAddr,
    level: u8,
    login: Option<(&str, &str)>,
) -> Result<bool> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&connect_packet(level, "intruder", login))
        .await?;
    let mut connack = [0u8; 4];
    Ok(matches!(
        timeout(WAIT, s.read_exact(&mut connack)).await,
        Ok(Ok(_)) if connack[0] == 0x20 && connack[3] == 0
    ))
}

/// The internal listeners sit on loopback ports any local process can reach; without the per-start login
/// nobody gets past them (issue 11 item 4), and the login differs from one start to the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_listeners_take_only_the_per_start_login() -> Result<()> {
    let broker = EmbeddedBroker::start(&EmbeddedSettings::default()).await?;
    let other = EmbeddedBroker::start(&EmbeddedSettings::default()).await?;
    let login = broker.login();
    ensure!(
        login.secret() != other.login().secret(),
        "a fresh secret per start"
    );
    ensure!(
        !format!("{login:?}").contains(login.secret()),
        "Debug redacts the secret"
    );
    let stale = (other.login().user(), other.login().secret());
    for (addr, level) in [(broker.v4_addr, 4), (broker.v5_addr, 5)] {
        let real = Some((login.user(), login.secret()));
        ensure!(
            !accepted(addr, level, None).await?,
            "{addr}: no login accepted"
        );
        let guess = Some((login.user(), "guess"));
        ensure!(
            !accepted(addr, level, guess).await?,
            "{addr}: wrong secret accepted"
        );
        ensure!(
            !accepted(addr, level, Some(stale)).await?,
            "{addr}: another start's secret accepted"
        );
        ensure!(
            accepted(addr, level, real).await?,
            "{addr}: the real login refused"
        );
    }
    Ok(())
}

/// A client that says DISCONNECT and goes must not take the next client down with it. rumqttd 0.20 removed
/// the connection when it handled the DISCONNECT packet and again when the socket closed; by then the
/// connection id could belong to a new client, which was dropped. Each round checks that the client which
/// connected right after a disconnecting one still answers PINGREQ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnecting_client_never_drops_the_next_one() -> Result<()> {
    disconnecting_rounds(&EmbeddedSettings::default()).await
}

/// The hub runs rumqttd's router as a task on its runtime (`EmbeddedSettings::router_task`). On one
/// worker, anything that blocked the thread waiting for the router (a CONNECT, a DISCONNECT, a full
/// channel) would wait forever; connecting, disconnecting and routing must all still work.
/// The runtime runs on a thread of its own and the test waits for it with a deadline: a blocked worker
/// cannot run a tokio timeout, so a deadlock must be caught from outside.
#[test]
fn with_the_router_as_a_task_on_one_worker_clients_connect_and_route() -> Result<()> {
    let (done_tx, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                rt.block_on(async {
                    let settings = EmbeddedSettings {
                        router_task: true,
                        ..EmbeddedSettings::default()
                    };
                    disconnecting_rounds(&settings).await?;
                    in_process_routing(&settings).await
                })
            });
        let _ = done_tx.send(result);
    });
    done.recv_timeout(Duration::from_secs(60)).context(
        "the broker deadlocked: something blocked the only worker waiting for the router",
    )?
}

async fn disconnecting_rounds(settings: &EmbeddedSettings) -> Result<()> {
    let broker = EmbeddedBroker::start(settings).await?;
    for round in 0..200 {
        let mut first = connect(&broker, &format!("first-{round}")).await?;
        first.write_all(&[0xe0, 0x00]).await?; // DISCONNECT
        drop(first);
        let mut second = connect(&broker, &format!("second-{round}")).await?;
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

/// The in-process entrances (`front::Upstreams`, the front's way into rumqttd since issue 10) serve
/// a connection as the listeners do: the per-start login is checked the same way, and a client that came
/// in-process exchanges messages with one on the loopback listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_entrances_check_the_login_and_route_like_the_listeners() -> Result<()> {
    in_process_routing(&EmbeddedSettings::default()).await
}

async fn in_process_routing(settings: &EmbeddedSettings) -> Result<()> {
    let broker = EmbeddedBroker::start(settings).await?;
    let local = broker.upstreams();
    let login = broker.login();
    let (user, secret) = (login.user(), login.secret());
    for (acceptor, level) in [(&local.v4, 4), (&local.v5, 5)] {
        for (attempt, (given, expected)) in [
            (None, false),
            (Some((user, "guess")), false),
            (Some((user, secret)), true),
        ]
        .into_iter()
        .enumerate()
        {
            let (mut ours, theirs) = tokio::io::duplex(4096);
            acceptor.accept(theirs);
            // A client id of its own per attempt: the router may still be ending an earlier one.
            let id = format!("in-process-{level}-{attempt}");
            ours.write_all(&connect_packet(level, &id, given)).await?;
            let mut connack = [0u8; 4];
            let accepted = matches!(
                timeout(WAIT, ours.read_exact(&mut connack)).await,
                Ok(Ok(_)) if connack[0] == 0x20 && connack[3] == 0
            );
            ensure!(
                accepted == expected,
                "MQTT level {level}, login {:?}: accepted {accepted}, expected {expected}",
                given.map(|(u, p)| (u, p == secret))
            );
        }
    }

    // An in-process subscriber gets what a loopback client publishes.
    let (mut subscriber, theirs) = tokio::io::duplex(4096);
    local.v4.accept(theirs);
    subscriber
        .write_all(&connect_packet(4, "in-process-sub", Some((user, secret))))
        .await?;
    let mut connack = [0u8; 4];
    timeout(WAIT, subscriber.read_exact(&mut connack)).await??;
    ensure!(connack[3] == 0, "subscriber accepted: {connack:?}");
    // SUBSCRIBE packet id 1, "a/b" at QoS 0.
    subscriber
        .write_all(&[0x82, 8, 0, 1, 0, 3, b'a', b'/', b'b', 0])
        .await?;
    let mut suback = [0u8; 5];
    timeout(WAIT, subscriber.read_exact(&mut suback)).await??;
    ensure!(
        suback == [0x90, 3, 0, 1, 0],
        "SUBACK granted QoS 0: {suback:?}"
    );
    let mut publisher = connect(&broker, "loopback-pub").await?;
    // PUBLISH QoS 0 "a/b" "hi".
    let publish = [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i'];
    publisher.write_all(&publish).await?;
    let mut delivered = [0u8; 9];
    timeout(WAIT, subscriber.read_exact(&mut delivered))
        .await
        .context("delivery to the in-process subscriber in time")??;
    ensure!(
        delivered == publish,
        "delivered as published: {delivered:?}"
    );
    broker.stop().await;
    Ok(())
}
