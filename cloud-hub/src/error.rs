//! The hub's error type: everything that can make [`crate::run`] fail.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use meshbridge_broker::embedded::EmbeddedError;
use meshbridge_broker::front::FrontError;
use shared::policy::dedup::DedupError;
use shared::topic::TopicError;

use crate::store::StoreError;
use crate::tls::TlsError;

/// Why the hub could not start, or stopped with a fault.
///
/// Per-agent problems (a refused handshake, an unknown site, a cloud broker hiccup) are not here: they end one
/// agent connection, are logged by its task, and the hub keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The revocation list (`tls.crl`) cannot be read.
    #[error("cannot load the revocation list")]
    Crl(#[source] crate::pki::PkiError),
    /// The handshake limits (`listen.max_handshakes`, `retry_above`, `max_handshakes_per_source`) do not
    /// fit together (config validation catches this first).
    #[error("invalid handshake limits")]
    Admission(#[source] shared::policy::admission::GateLimitsError),
    /// The metrics endpoint could not listen on `metrics.listen`.
    #[error(transparent)]
    Metrics(#[from] meshbridge_metrics::ListenError),
    /// `data_dir` could not be created.
    #[error("cannot create the data directory {path}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The dedup database could not be opened or loaded.
    #[error("cannot open the dedup store")]
    Store(#[from] StoreError),
    /// The QUIC server's TLS material is unusable.
    #[error("cannot build the QUIC server configuration")]
    Tls(#[from] TlsError),
    /// The QUIC endpoint's persistent key (`data_dir/quic-endpoint.key`) could not be read or created.
    #[error("cannot read or create the QUIC endpoint key {path}")]
    EndpointKey {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The QUIC endpoint key file does not hold exactly 32 bytes (truncated, or not written by the hub).
    #[error("the QUIC endpoint key {path} holds {len} bytes, expected {expected}; delete it to create a new one")]
    EndpointKeyLength {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
        /// The length it must have.
        expected: usize,
    },
    /// The system random source failed while creating the QUIC endpoint key.
    #[error("cannot generate a QUIC endpoint key: no system randomness")]
    EndpointKeyRandom,
    /// The QUIC endpoint could not bind its UDP address.
    #[error("cannot listen for agents on UDP {addr}")]
    QuicBind {
        /// `listen.quic`.
        addr: SocketAddr,
        /// The bind error.
        #[source]
        source: io::Error,
    },
    /// A configured site has a namespace that does not expand (only on a config that skipped validation).
    #[error("site {site:?} has an invalid namespace")]
    Namespace {
        /// The site name.
        site: String,
        /// Why the namespace is invalid.
        #[source]
        source: TopicError,
    },
    /// `dedup.window` is out of range (only on a config that skipped validation).
    #[error("invalid dedup window")]
    DedupWindow(#[source] DedupError),
    /// The embedded cloud broker did not start.
    #[error("the embedded cloud broker did not start")]
    EmbeddedBroker(#[from] EmbeddedError),
    /// The embedded cloud broker's client ports cannot be opened (address, TLS files, password or ACL
    /// file).
    #[error("cloud broker")]
    BrokerPorts(#[from] meshbridge_broker::listeners::ListenError),
    /// The embedded cloud broker's client port stopped accepting connections.
    #[error("the cloud broker's client port failed")]
    Front(#[from] FrontError),
    /// The hub's own client could not connect to the embedded cloud broker.
    #[error("the hub could not connect to its embedded cloud broker within {waited:?}")]
    BrokerNotReady {
        /// How long it waited.
        waited: std::time::Duration,
    },
    /// The external cloud broker's TLS material (CA, client certificate, key) is unusable; the source names
    /// the file.
    #[error("cannot use the TLS configuration for the cloud broker")]
    BrokerTls(#[source] meshbridge_tls::TlsError),
    /// The embedded broker has credentials configured, which the hub's embedded cloud broker does not check yet.
    #[error("broker.username/password are not supported for the hub's embedded cloud broker")]
    EmbeddedAuthUnsupported,

    /// A site's downlink queue (`data_dir/downlink/<site>.redb`) failed: open, append, read or ack.
    #[error("downlink queue of site {site:?}")]
    DownlinkQueue {
        /// The site.
        site: String,
        /// What the queue said (full, disk full, storage); boxed, as it is large and rare.
        #[source]
        source: Box<shared::queue::QueueError>,
    },

    /// The routes do not compile (load-time validation should have caught it).
    #[error("invalid routes: {}", errors.join("; "))]
    Routes {
        /// Every problem, with its key path.
        errors: Vec<String>,
    },

    /// A blocking task (a queue operation) panicked or was cancelled.
    #[error("a blocking hub task failed")]
    Join(#[source] tokio::task::JoinError),
}
