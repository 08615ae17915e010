//! The front against a real embedded rumqttd on loopback ephemeral ports, with the test playing the
//! commit pipeline: it receives the front's `CommitRequest`s and decides when and how to answer. Shared
//! by `front.rs` and `unsubscribed.rs`.

#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use meshbridge_broker::embedded::{EmbeddedBroker, EmbeddedSettings};
use meshbridge_broker::front::{self, CommitRequest, FrontError, FrontOptions};
use meshbridge_broker::sessions::Sessions;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Harness {
    pub broker: EmbeddedBroker,
    pub front_addr: SocketAddr,
    pub commits: mpsc::Receiver<CommitRequest>,
    shutdown: CancellationToken,
    front: JoinHandle<Result<(), FrontError>>,
    /// The session store's directory, when the front serves persistent sessions.
    _dir: Option<tempfile::TempDir>,
}

impl Harness {
    /// Broker + front selecting topics under `sel/`.
    pub async fn start() -> Result<Self> {
        Self::start_with(FrontOptions::default()).await
    }

    /// As [`start`](Self::start), with `options`.
    pub async fn start_with(options: FrontOptions) -> Result<Self> {
        Self::spawn(options, None).await
    }

    /// As [`start`](Self::start), in the edge agent's set-up: persistent sessions (in a temporary
    /// store) and unsubscribed topics answered by the front.
    pub async fn start_as_edge() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = shared::queue::SessionStore::open(
            dir.path().join("sessions.redb"),
            shared::queue::SessionLimits::default(),
        )?;
        let options = FrontOptions {
            sessions: Some(Sessions::open(Arc::new(store), None)?),
            answer_unsubscribed: true,
            ..FrontOptions::default()
        };
        Self::spawn(options, Some(dir)).await
    }

    async fn spawn(options: FrontOptions, dir: Option<tempfile::TempDir>) -> Result<Self> {
        let broker = EmbeddedBroker::start(&EmbeddedSettings::default()).await?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let front_addr = listener.local_addr()?;
        let (commits_tx, commits) = mpsc::channel(64);
        let shutdown = CancellationToken::new();
        let select: front::Select = Arc::new(|topic: &str| topic.starts_with("sel/"));
        let front = tokio::spawn(front::serve(
            listener,
            broker.upstreams(),
            select,
            commits_tx,
            options,
            shutdown.clone(),
        ));
        Ok(Self {
            broker,
            front_addr,
            commits,
            shutdown,
            front,
            _dir: dir,
        })
    }

    pub async fn next_commit(&mut self) -> Result<CommitRequest> {
        timeout(WAIT, self.commits.recv())
            .await
            .context("no commit request in time")?
            .context("commit channel closed")
    }

    /// A subscriber to `#` on the broker's internal v4 listener, behind the front, where the front does
    /// not count it: it receives exactly what the front handed to rumqttd. Returns the topics.
    pub async fn spy(&self) -> Result<(mpsc::UnboundedReceiver<String>, JoinHandle<()>)> {
        let addr = self.broker.v4_addr;
        let mut options = rumqttc::MqttOptions::new("spy", addr.ip().to_string(), addr.port());
        let login = self.broker.login();
        options
            .set_credentials(login.user(), login.secret())
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
        let (tx, rx) = mpsc::unbounded_channel();
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let _client = client.clone();
            let _ = client.subscribe("#", rumqttc::QoS::AtLeastOnce).await;
            let mut subscribed_tx = Some(subscribed_tx);
            while let Ok(event) = eventloop.poll().await {
                match event {
                    rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                        let _ = tx.send(p.topic);
                    }
                    _ => {}
                }
            }
        });
        timeout(WAIT, subscribed)
            .await
            .context("spy not subscribed in time")??;
        Ok((rx, task))
    }

    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        timeout(WAIT, self.front)
            .await
            .context("front did not stop")???;
        self.broker.stop().await;
        Ok(())
    }
}
