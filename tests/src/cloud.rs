//! A cloud broker that lives in the test process, for tests that stop or kill the hub: the hub's embedded
//! broker dies with the hub (and with it every message nobody had read yet), so a test that must see every
//! message across a hub restart points the hub at this one as an *external* broker instead.
//!
//! It is the project's own embedded rumqttd behind the pass-through front (`select` never captures), the
//! same as the hub's embedded mode, so MQTT 3.1.1 and 5 clients share its port.

use std::net::SocketAddr;
use std::sync::Arc;

use meshbridge_broker::embedded::{EmbeddedBroker, EmbeddedSettings};
use meshbridge_broker::front::{self, CommitRequest, FrontOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A running in-process broker. Dropping it stops accepting clients (rumqttd's router thread cannot be
/// stopped and lives until the test process ends).
#[derive(Debug)]
pub struct CloudBroker {
    /// Where clients connect.
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    _broker: EmbeddedBroker,
    // The front needs a commit channel even though nothing is ever captured.
    _commits: mpsc::Receiver<CommitRequest>,
}

impl CloudBroker {
    /// Starts the broker on a free loopback port, on the current tokio runtime.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("a socket address")).await
    }

    /// Starts the broker on `addr`, e.g. a port a hub was configured with while no broker was there yet.
    pub async fn start_on(addr: SocketAddr) -> Self {
        let broker = EmbeddedBroker::start(&EmbeddedSettings::default())
            .await
            .expect("start the in-process cloud broker");
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind the cloud broker port");
        let addr = listener.local_addr().expect("local address");
        let (tx, rx) = mpsc::channel(1);
        let shutdown = CancellationToken::new();
        tokio::spawn(front::serve(
            listener,
            broker.upstreams(),
            Arc::new(|_: &str| false),
            tx,
            FrontOptions::default(),
            shutdown.clone(),
        ));
        Self {
            addr,
            shutdown,
            _broker: broker,
            _commits: rx,
        }
    }
}

impl Drop for CloudBroker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
