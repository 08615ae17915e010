//! Last wills go up like any selected PUBLISH (issue 7, hole 5). rumqttd publishes a client's will to local
//! subscribers only; before this, an embedded agent never forwarded a will to the cloud, while an agent on
//! an external broker did (the broker published it to the agent's subscription). The front now commits the
//! will when a connection ends without DISCONNECT, and honours MQTT 5's Will Delay Interval.

mod raw;

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tokio::time::timeout;

use raw::*;

/// Upper bound for a whole test.
const TEST: Duration = Duration::from_secs(40);

/// Waits until the pipeline got a commit for `topic`; `false` after `within`.
async fn committed_within(mesh: &Mesh, topic: &str, within: Duration) -> bool {
    let until = Instant::now() + within;
    loop {
        if mesh.committed().iter().any(|t| t == topic) {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_connection_lost_without_disconnect_commits_its_will() -> Result<()> {
    timeout(TEST, async {
        let mesh = Mesh::start().await?;
        for version in [V4, V5] {
            let topic = format!("site/door/{}", version.level());
            let conn = Conn {
                will: Some((&topic, b"gone", 1, false)),
                ..Conn::new(version, "will-abrupt")
            };
            let (c, _) = Client::connected(mesh.addr, &conn).await?;
            drop(c); // TCP close, no DISCONNECT
            ensure!(
                committed_within(&mesh, &topic, WAIT).await,
                "{version:?}: the will was committed for the uplink"
            );
        }
        mesh.stop().await
    })
    .await
    .context("test exceeded its time bound")?
}

#[tokio::test]
async fn a_clean_disconnect_commits_no_will_and_v5_reason_0x04_does() -> Result<()> {
    timeout(TEST, async {
        let mesh = Mesh::start().await?;
        for version in [V4, V5] {
            let topic = format!("site/clean/{}", version.level());
            let conn = Conn {
                will: Some((&topic, b"gone", 1, false)),
                ..Conn::new(version, "will-clean")
            };
            let (c, _) = Client::connected(mesh.addr, &conn).await?;
            c.disconnect().await?;
            ensure!(
                !committed_within(&mesh, &topic, QUIET).await,
                "{version:?}: no will after DISCONNECT"
            );
        }
        // MQTT 5: DISCONNECT with reason 0x04 "disconnect with will message" wants the will.
        let topic = "site/with-will/5";
        let conn = Conn {
            will: Some((topic, b"asked for", 1, false)),
            ..Conn::new(V5, "will-0x04")
        };
        let (mut c, _) = Client::connected(mesh.addr, &conn).await?;
        c.send(&packet(0xE0, &[0x04, 0])).await?;
        drop(c);
        ensure!(
            committed_within(&mesh, topic, WAIT).await,
            "the will after DISCONNECT 0x04"
        );
        mesh.stop().await
    })
    .await
    .context("test exceeded its time bound")?
}

#[tokio::test]
async fn a_v5_will_waits_its_delay_and_a_reconnect_cancels_it() -> Result<()> {
    timeout(TEST, async {
        let mesh = Mesh::start().await?;
        let topic = "site/delayed";
        let conn = Conn {
            will: Some((topic, b"late", 1, false)),
            will_delay: 1,
            ..Conn::new(V5, "will-delay")
        };
        // Back within the delay: no will.
        let (c, _) = Client::connected(mesh.addr, &conn).await?;
        drop(c);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (c, _) = Client::connected(mesh.addr, &conn).await?;
        ensure!(
            !committed_within(&mesh, topic, Duration::from_millis(1_500)).await,
            "a reconnect within the delay cancels the will"
        );
        // Gone for good: the will comes after the delay, not before.
        let gone = Instant::now();
        drop(c);
        ensure!(
            committed_within(&mesh, topic, WAIT).await,
            "the will after its delay"
        );
        let waited = gone.elapsed();
        ensure!(
            waited >= Duration::from_millis(900),
            "the will waited its 1 s delay (came after {waited:?})"
        );
        mesh.stop().await
    })
    .await
    .context("test exceeded its time bound")?
}
