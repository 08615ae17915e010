//! The agent's error type: why [`crate::run`] could not start or had to stop.
//!
//! Only failures the agent cannot ride out end up here. A hub that is down, refuses us or drops the link is
//! *not* an error of `run`: the uplink logs it and reconnects with backoff, because store-and-forward is the
//! whole point (see [`crate::uplink`]).

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use meshbridge_broker::embedded::EmbeddedError;
use meshbridge_broker::front::FrontError;
use shared::queue::QueueError;
use shared::topic::TopicError;

use crate::tls::TlsError;

/// Why the agent could not start or stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// `data_dir` could not be created.
    #[error("cannot create the data directory {}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The durable queue could not be opened (corrupt file, unknown format, I/O error).
    #[error("cannot open the queue")]
    OpenQueue(#[source] QueueError),
    /// The metrics endpoint could not listen on `metrics.listen`.
    #[error(transparent)]
    Metrics(#[from] meshbridge_metrics::ListenError),
    /// The retained-message store could not be opened or read.
    #[error("cannot open the retained-message store")]
    Retained(#[source] QueueError),
    /// The persistent-session store could not be opened or read.
    #[error("cannot open the persistent-session store")]
    Sessions(#[source] QueueError),
    /// The retained messages kept on disk could not be published into the restarted embedded broker.
    #[error("cannot restore the retained messages into the embedded broker: {0}")]
    RetainedRestore(String),
    /// A route filter is not a valid MQTT topic filter (config validation should have caught it).
    #[error("route filter {filter:?} is invalid")]
    InvalidRoute {
        /// The filter as configured.
        filter: String,
        /// What is wrong with it.
        #[source]
        source: TopicError,
    },
    /// The uplink's TLS material (CA, site certificate, key) is unusable; see the source for which file.
    #[error("uplink TLS configuration")]
    UplinkTls(#[source] TlsError),
    /// The external broker's TLS material is unusable.
    #[error("external broker TLS configuration")]
    BrokerTls(#[source] meshbridge_tls::TlsError),
    /// The embedded broker's client port could not be bound.
    #[error("cannot listen for MQTT clients on {addr}")]
    Listen {
        /// `broker.listen`.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The embedded broker (rumqttd) did not start.
    #[error("the embedded broker did not start")]
    EmbeddedBroker(#[from] EmbeddedError),
    /// The embedded broker's client ports cannot be opened (address, TLS files, password or ACL file).
    #[error("embedded broker")]
    Ports(#[from] meshbridge_broker::listeners::ListenError),
    /// The MQTT front stopped accepting clients.
    #[error("the MQTT front failed")]
    Front(#[from] FrontError),
    /// A config setting this build does not implement yet; refused rather than silently ignored.
    #[error("{key} is not supported yet: {reason}")]
    Unsupported {
        /// The config key.
        key: &'static str,
        /// What to do instead.
        reason: &'static str,
    },
    /// The dead-letter store could not be opened, read or written.
    #[error("dead-letter store")]
    DeadLetters(#[source] QueueError),
    /// A dead-letter replay could not reach the site's broker or got no acknowledgement.
    #[error("replaying dead letters: {0}")]
    Replay(String),
    /// One of the agent's tasks panicked.
    #[error("the {task} task panicked")]
    TaskPanicked {
        /// Which task.
        task: &'static str,
        /// The join error carrying the panic.
        #[source]
        source: tokio::task::JoinError,
    },
}
