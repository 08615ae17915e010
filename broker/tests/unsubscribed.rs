//! The front answering PUBLISHes no subscriber of rumqttd's could match, in the edge agent's set-up
//! (`FrontOptions::answer_unsubscribed` with persistent sessions; `src/front.rs`, "Unsubscribed topics").
//!
//! The test plays the commit pipeline, so it sees that a front-made PUBACK still waits for its commit.
//! A spy subscribes to `#` on rumqttd's internal listener, behind the front, where the front does not
//! count it: what the spy receives is exactly what the front handed to rumqttd.

mod front_harness;
mod raw;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use shared::mqtt::PacketType;
use tokio::sync::mpsc;
use tokio::time::timeout;

use front_harness::Harness;
use raw::{publish, Client, Conn, Pkt, QUIET, V4, V5, WAIT};

/// How long "no ack yet" is observed while a commit is held.
const HOLD: Duration = Duration::from_millis(300);
/// Upper bound for a whole test.
const TEST: Duration = Duration::from_secs(40);

/// The next topic the spy receives within `within`, if any.
async fn spied(spy: &mut mpsc::UnboundedReceiver<String>, within: Duration) -> Option<String> {
    timeout(within, spy.recv()).await.ok().flatten()
}

/// The packet ids of the next `n` PUBACKs, skipping other packets.
async fn pubacks(client: &mut Client, n: usize) -> Result<Vec<u16>> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let p: Pkt = client.next().await?;
        if p.kind == PacketType::Puback {
            ids.push(p.packet_id().context("PUBACK without id")?);
        }
    }
    Ok(ids)
}

/// With no local subscriber, a selected QoS 1 PUBLISH never reaches rumqttd and its PUBACK still waits
/// for the commit; an unselected one is answered at once with no commit; once a client of the front
/// subscribes, messages reach rumqttd (and it) again, and after it unsubscribes or leaves, they stop.
#[tokio::test]
async fn unsubscribed_topics_are_answered_by_the_front_after_their_commit() -> Result<()> {
    timeout(TEST, async {
        for version in [V4, V5] {
            let mut h = Harness::start_as_edge().await?;
            let (mut spy, spy_task) = h.spy().await?;
            let (mut publisher, _) =
                Client::connected(h.front_addr, &Conn::new(version, "publisher")).await?;

            // Selected, nobody subscribed: committed, acked after the commit only, not forwarded.
            publisher
                .send(&publish(version, "sel/a", 1, false, 1, b"a"))
                .await?;
            let commit = h.next_commit().await?;
            ensure!(commit.messages.len() == 1 && commit.messages[0].publish.topic == "sel/a");
            ensure!(
                publisher.next_within(HOLD).await.is_err(),
                "PUBACK before the commit"
            );
            let _ = commit.done.send(Ok(()));
            ensure!(pubacks(&mut publisher, 1).await? == [1]);
            // Not selected, nobody subscribed: answered at once, no commit; QoS 0 dropped.
            publisher
                .send(&publish(version, "other/b", 1, false, 2, b"b"))
                .await?;
            ensure!(pubacks(&mut publisher, 1).await? == [2]);
            publisher
                .send(&publish(version, "other/c", 0, false, 0, b"c"))
                .await?;
            ensure!(
                spied(&mut spy, QUIET).await.is_none(),
                "rumqttd received a message nobody subscribed to"
            );

            // A retained message always goes to rumqttd (it keeps it for later subscribers).
            publisher
                .send(&publish(version, "other/r", 1, true, 3, b"r"))
                .await?;
            ensure!(pubacks(&mut publisher, 1).await? == [3]);
            ensure!(spied(&mut spy, WAIT).await.as_deref() == Some("other/r"));

            // A subscriber through the front: its topics go to rumqttd again.
            let (mut reader, _) =
                Client::connected(h.front_addr, &Conn::new(version, "reader")).await?;
            reader.subscribe(&[("sel/+", 1)]).await?;
            publisher
                .send(&publish(version, "sel/d", 1, false, 4, b"d"))
                .await?;
            let _ = h.next_commit().await?.done.send(Ok(()));
            ensure!(pubacks(&mut publisher, 1).await? == [4]);
            let got = reader.receive(Vec::new(), 1).await?;
            ensure!(got[0].topic == "sel/d", "reader got {got:?}");
            ensure!(spied(&mut spy, WAIT).await.as_deref() == Some("sel/d"));
            // Another topic is still kept from rumqttd.
            publisher
                .send(&publish(version, "other/e", 1, false, 5, b"e"))
                .await?;
            ensure!(pubacks(&mut publisher, 1).await? == [5]);
            ensure!(spied(&mut spy, QUIET).await.is_none());

            // Unsubscribed: kept from rumqttd again.
            reader.unsubscribe(&["sel/+"]).await?;
            publisher
                .send(&publish(version, "sel/f", 1, false, 6, b"f"))
                .await?;
            let _ = h.next_commit().await?.done.send(Ok(()));
            ensure!(pubacks(&mut publisher, 1).await? == [6]);
            ensure!(spied(&mut spy, QUIET).await.is_none());

            // Subscribed again, then the connection ends without UNSUBSCRIBE: its filter goes with it.
            reader.subscribe(&[("sel/#", 1)]).await?;
            publisher
                .send(&publish(version, "sel/g", 1, false, 7, b"g"))
                .await?;
            let _ = h.next_commit().await?.done.send(Ok(()));
            ensure!(pubacks(&mut publisher, 1).await? == [7]);
            ensure!(spied(&mut spy, WAIT).await.as_deref() == Some("sel/g"));
            reader.disconnect().await?;
            tokio::time::sleep(QUIET).await;
            publisher
                .send(&publish(version, "sel/h", 1, false, 8, b"h"))
                .await?;
            let _ = h.next_commit().await?.done.send(Ok(()));
            ensure!(pubacks(&mut publisher, 1).await? == [8]);
            ensure!(spied(&mut spy, QUIET).await.is_none());

            spy_task.abort();
            h.stop().await?;
        }
        Ok(())
    })
    .await
    .context("test exceeded its time bound")?
}

/// PUBACKs leave in PUBLISH order when the front answers some and rumqttd others: a front-made PUBACK
/// held for its commit keeps a later broker PUBACK behind it, and while a forwarded PUBLISH waits for
/// its broker ack, later PUBLISHes are forwarded too (so no front-made PUBACK can overtake).
#[tokio::test]
async fn acks_stay_in_publish_order_across_front_and_broker() -> Result<()> {
    timeout(TEST, async {
        for version in [V4, V5] {
            let mut h = Harness::start_as_edge().await?;
            let (mut spy, spy_task) = h.spy().await?;
            let (mut reader, _) =
                Client::connected(h.front_addr, &Conn::new(version, "reader")).await?;
            reader.subscribe(&[("read/#", 0)]).await?;
            let (mut publisher, _) =
                Client::connected(h.front_addr, &Conn::new(version, "publisher")).await?;

            // One write: a selected unsubscribed PUBLISH (the front's, held for its commit), then one a
            // subscriber reads (rumqttd's, acked at once by rumqttd).
            let mut both = publish(version, "sel/1", 1, false, 1, b"1");
            both.extend(publish(version, "read/1", 1, false, 2, b"2"));
            publisher.send(&both).await?;
            let commit = h.next_commit().await?;
            ensure!(spied(&mut spy, WAIT).await.as_deref() == Some("read/1"));
            ensure!(
                publisher.next_within(HOLD).await.is_err(),
                "a PUBACK left before the held commit"
            );
            let _ = commit.done.send(Ok(()));
            ensure!(pubacks(&mut publisher, 2).await? == [1, 2]);

            // One write: a forwarded PUBLISH first, so the selected one after it is forwarded too.
            let mut both = publish(version, "read/2", 1, false, 3, b"3");
            both.extend(publish(version, "sel/2", 1, false, 4, b"4"));
            publisher.send(&both).await?;
            let _ = h.next_commit().await?.done.send(Ok(()));
            ensure!(pubacks(&mut publisher, 2).await? == [3, 4]);
            let mut seen = vec![
                spied(&mut spy, WAIT).await.context("spy")?,
                spied(&mut spy, WAIT).await.context("spy")?,
            ];
            seen.sort();
            ensure!(seen == ["read/2", "sel/2"], "spy saw {seen:?}");
            let got = reader.receive(Vec::new(), 2).await?;
            ensure!(got.iter().all(|g| g.topic.starts_with("read/")), "{got:?}");

            spy_task.abort();
            h.stop().await?;
        }
        Ok(())
    })
    .await
    .context("test exceeded its time bound")?
}

/// rumqttd no longer sees a publisher whose messages the front answers, so the front keeps the
/// client's keep-alive: a client that keeps publishing stays connected past 1.5 × its keep-alive, and
/// one that goes silent is closed after it (3.1.1 §3.1.2.10, 5.0 §3.1.2.11), with its will.
#[tokio::test]
async fn the_front_keeps_the_keep_alive() -> Result<()> {
    timeout(TEST, async {
        let h = Harness::start_as_edge().await?;
        let (mut spy, spy_task) = h.spy().await?;
        for version in [V4, V5] {
            let mut conn = Conn::new(version, "talker");
            conn.keep_alive = 1;
            conn.will = Some(("will/talker", b"gone", 0, false));
            let (mut talker, _) = Client::connected(h.front_addr, &conn).await?;
            for _ in 0..10 {
                talker
                    .send(&publish(version, "other/t", 0, false, 0, b"t"))
                    .await?;
                ensure!(
                    !talker.closed_within(Duration::from_millis(250)).await,
                    "closed while publishing every 250 ms with a keep-alive of 1 s"
                );
            }
            let silent = std::time::Instant::now();
            ensure!(
                talker.closed_within(Duration::from_secs(5)).await,
                "a silent client was not closed"
            );
            let after = silent.elapsed();
            ensure!(
                after >= Duration::from_millis(1_200),
                "closed after {after:?}, before 1.5 × keep-alive"
            );
            ensure!(
                spied(&mut spy, WAIT).await.as_deref() == Some("will/talker"),
                "no will after the keep-alive expired"
            );
        }
        spy_task.abort();
        h.stop().await
    })
    .await
    .context("test exceeded its time bound")?
}
