//! The metrics endpoint both programs serve: Prometheus text exposition (OpenMetrics) on `GET /metrics`.
//!
//! Each program keeps its counters and gauges in a `prometheus_client` [`Registry`] (names prefixed
//! `meshbridge_`, listed with their meaning in the README) and hands [`serve`] a function that renders
//! it. Values that are state rather than events (a queue's depth, the agents connected) are read from
//! their owner when the function runs, so a scrape never shows a stale copy.
//!
//! # Why not a web framework
//! One route, answered with one string, for a scraper on a trusted network: a bounded request read
//! (8 KiB, 5 s), `GET /metrics` or 404, `Connection: close`. That is less code than wiring a framework's
//! router and shutdown, and it keeps hyper and tower out of a gateway's binary.
//!
//! [`probe`] is the client side, for the programs' `health` command: the container images have no shell
//! and no curl, so the programs check their own endpoint.

pub mod logging;
pub mod otel;
pub mod systemd;
pub mod timer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

pub use prometheus_client;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
pub use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// Most bytes of a request read before it is refused.
const MAX_REQUEST: usize = 8 * 1024;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The exposition format's content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Renders the current metrics as exposition text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for metrics scrapes on {addr}")]
pub struct ListenError {
    /// The configured address.
    pub addr: SocketAddr,
    /// The bind error.
    #[source]
    pub source: std::io::Error,
}

/// A registry with the `meshbridge_` prefix and `meshbridge_build_info{program, version}`.
#[must_use]
pub fn registry(program: &str, version: &str) -> Registry {
    let mut registry = Registry::with_prefix("meshbridge");
    registry.register(
        "build",
        "The program and its version",
        Info::new(vec![
            ("program".to_owned(), program.to_owned()),
            ("version".to_owned(), version.to_owned()),
        ]),
    );
    registry
}

/// Encodes `registry` as exposition text.
#[must_use]
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; an encoder error would be a bug in a metric's encoding.
    if let Err(e) = encode(&mut out, registry) {
        warn!(cause = %e, "encoding the metrics failed");
    }
    out
}

/// Sets a gauge from an unsigned value (gauges are signed; the values here never reach `i64::MAX`).
pub fn set(gauge: &Gauge, value: u64) {
    gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
}

/// What an embedded broker's password file and ACL refused, as `mqtt_logins_refused_total` and
/// `acl_denied_total{action}` (the agent's edge broker and the hub's cloud broker alike). The broker
/// counts in plain atomics (`broker/src/auth.rs`, which knows nothing of Prometheus); [`Self::observe`]
/// adds what grew since the last render.
#[derive(Debug)]
pub struct BrokerAuthMetrics {
    logins_refused: prometheus_client::metrics::counter::Counter,
    acl_denied: prometheus_client::metrics::family::Family<
        ActionLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    /// Totals at the last render: logins refused, publishes denied, subscriptions denied.
    seen: [std::sync::atomic::AtomicU64; 3],
}

/// What the ACL denied, as a label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ActionLabel {
    action: &'static str,
}

impl BrokerAuthMetrics {
    /// Registers both metrics in `registry`; `broker` names the broker in their help text.
    pub fn register(registry: &mut Registry, broker: &str) -> Self {
        let m = Self {
            logins_refused: prometheus_client::metrics::counter::Counter::default(),
            acl_denied: prometheus_client::metrics::family::Family::default(),
            seen: Default::default(),
        };
        registry.register(
            "mqtt_logins_refused",
            format!("MQTT clients refused at CONNECT by the {broker}: wrong password, unknown user, or anonymous where not allowed"),
            m.logins_refused.clone(),
        );
        registry.register(
            "acl_denied",
            format!("What the {broker}'s ACL denied: action=publish (not forwarded; MQTT 5 reason 0x87), action=subscribe (per filter; 0x87/0x80 in the SUBACK)"),
            m.acl_denied.clone(),
        );
        m
    }

    /// Brings the metrics up to the broker's totals. Call it with renders serialised (each program's
    /// render holds a lock), or two renders could add the same growth twice.
    pub fn observe(&self, logins_refused: u64, publish_denied: u64, subscribe_denied: u64) {
        use std::sync::atomic::Ordering;
        let add = |counter: &prometheus_client::metrics::counter::Counter, i: usize, total: u64| {
            let before = self.seen[i].swap(total, Ordering::Relaxed);
            counter.inc_by(total.saturating_sub(before));
        };
        add(&self.logins_refused, 0, logins_refused);
        for (i, action, total) in [
            (1, "publish", publish_denied),
            (2, "subscribe", subscribe_denied),
        ] {
            let counter = self
                .acl_denied
                .get_or_create(&ActionLabel { action })
                .clone();
            add(&counter, i, total);
        }
    }
}

/// Binds `addr` (before the program says it is ready, so a bad address stops it at start-up).
///
/// # Errors
/// [`ListenError`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ListenError { addr, source })
}

/// Answers scrapes on `listener` with `render()` until `shutdown`.
pub async fn serve(listener: TcpListener, render: Render, shutdown: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving metrics on GET /metrics");
    }
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let render = Arc::clone(&render);
                tokio::spawn(async move {
                    if let Err(e) = answer(stream, &render).await {
                        debug!(%peer, cause = %e, "metrics request failed");
                    }
                });
            }
            Err(e) => {
                warn!(cause = %e, "accepting a metrics connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// How long the programs' `health` command waits for the endpoint: connect, request and status line.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a [`probe`] of the endpoint failed: each variant is one reason an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Nothing accepted the TCP connection (the program is not running, or serves metrics elsewhere).
    #[error("cannot connect to {addr}")]
    Connect {
        /// The address probed.
        addr: SocketAddr,
        /// The connect error (e.g. connection refused).
        #[source]
        source: std::io::Error,
    },
    /// No status line arrived within the probe's time (a wedged process, or a peer that is not this
    /// endpoint and waits for more).
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        /// The address probed.
        addr: SocketAddr,
        /// The probe's time limit.
        timeout: Duration,
    },
    /// The connection failed after it was accepted (reset, closed before a status line).
    #[error("the connection to {addr} failed")]
    Io {
        /// The address probed.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// What came back does not start with an HTTP status line (another service on that port).
    #[error("{addr} did not answer with HTTP: {first_line:?}")]
    NotHttp {
        /// The address probed.
        addr: SocketAddr,
        /// The first bytes of the answer, lossily decoded.
        first_line: String,
    },
    /// An HTTP answer other than 200 (e.g. 404: something else serves that port).
    #[error("{addr} answered HTTP {status} to GET /metrics")]
    Status {
        /// The address probed.
        addr: SocketAddr,
        /// The status code.
        status: u16,
    },
}

/// The programs' async runtime: `worker_threads` workers (the config key of both programs), or one per
/// core when it is 0.
///
/// One worker (both programs' default) is tokio's current-thread scheduler: the tasks run on the thread
/// that calls `block_on`, next to the program's main future, with no second thread parked beside them.
/// The multi-thread scheduler with one worker ran the same tasks on a worker thread of its own, with
/// the bookkeeping of a scheduler built to share work between several. Measured on this project's
/// 2-core VM (`meshbridge-bench`, `perf stat` of both programs, alternated pairs): the hub's CPU per
/// message fell by about 13 % and the agent's by 5–8 % (README, "Performance", ninth step). The
/// blocking pool (`spawn_blocking`) is the same in both. What changes for the code: the main future
/// shares the thread with the tasks, so it must not block either (both programs' main futures only
/// wait for the program to end).
///
/// # Errors
/// When the runtime cannot start (threads, the I/O driver).
pub fn runtime(worker_threads: u16) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        if worker_threads > 0 {
            builder.worker_threads(usize::from(worker_threads));
        }
        builder
    };
    builder.enable_all().build()
}

/// The whole `health` command of both programs: `listen` is the loaded config's `metrics.listen`, or why
/// the config did not load. Prints one line on standard error when unhealthy, and returns the exit status:
/// 0 healthy, 1 for every failure, never 2, which Docker reserves for health checks.
pub fn health_command(
    program: &str,
    config: &std::path::Path,
    listen: Result<Option<SocketAddr>, String>,
) -> std::process::ExitCode {
    let reason = match listen {
        Err(why) => why,
        Ok(None) => format!("{} has no [metrics] listen to probe", config.display()),
        Ok(Some(listen)) => match probe_blocking(listen) {
            Ok(()) => return std::process::ExitCode::SUCCESS,
            Err(error) => {
                let mut text = error.to_string();
                let mut source = std::error::Error::source(&error);
                while let Some(cause) = source {
                    text.push_str(&format!(": {cause}"));
                    source = cause.source();
                }
                text
            }
        },
    };
    let line: Vec<&str> = reason.lines().map(str::trim).collect();
    eprintln!("{program}: unhealthy: {}", line.join("; "));
    std::process::ExitCode::FAILURE
}

/// The programs' `health` command: probes the endpoint configured as `listen` ([`probe_target`]) within
/// [`PROBE_TIMEOUT`], on a runtime of its own (the command runs outside the programs' runtimes).
///
/// # Errors
/// [`ProbeError`]; [`ProbeError::Io`] also when the runtime cannot start.
pub fn probe_blocking(listen: SocketAddr) -> Result<(), ProbeError> {
    let addr = probe_target(listen);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ProbeError::Io { addr, source })?;
    runtime.block_on(probe(addr, PROBE_TIMEOUT))
}

/// Where to probe the endpoint configured as `listen`: an unspecified address (`0.0.0.0`, `[::]`) listens
/// on every interface, loopback included, so it is probed on loopback of the same family.
#[must_use]
pub fn probe_target(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// Health probe: `GET /metrics` on `addr` over plain TCP, `Ok` on HTTP 200, all within `timeout`. Only the
/// status line is read. The programs' `health` command runs it (container images have no shell or curl).
///
/// # Errors
/// [`ProbeError`], one variant per reason.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    /// The status line is at most this long (`HTTP/1.1 200 OK`); more without a line end is not HTTP.
    const MAX_STATUS_LINE: usize = 256;
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|source| ProbeError::Connect { addr, source })?;
        let io = |source| ProbeError::Io { addr, source };
        stream
            .write_all(
                b"GET /metrics HTTP/1.1\r\nHost: meshbridge-health\r\nConnection: close\r\n\r\n",
            )
            .await
            .map_err(io)?;
        let mut answer = Vec::with_capacity(MAX_STATUS_LINE);
        let mut chunk = [0u8; MAX_STATUS_LINE];
        while !answer.contains(&b'\n') && answer.len() < MAX_STATUS_LINE {
            let n = stream.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&chunk[..n]);
        }
        if answer.is_empty() {
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let line = answer.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line).trim_end().to_owned();
        let mut parts = line.splitn(3, ' ');
        let status = match (parts.next(), parts.next()) {
            (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code.parse().ok(),
            _ => None,
        };
        match status {
            Some(200) => Ok(()),
            Some(status) => Err(ProbeError::Status { addr, status }),
            None => Err(ProbeError::NotHttp {
                addr,
                first_line: line.chars().take(80).collect(),
            }),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ProbeError::Timeout { addr, timeout })?
}

async fn answer(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(512);
    let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            if request.len() >= MAX_REQUEST {
                return Ok(false);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(false);
            }
            request.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(true)
    })
    .await;
    let complete = matches!(read, Ok(Ok(true)));
    let line = request
        .split(|&b| b == b'\r')
        .next()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = if !complete {
        ("400 Bad Request", "text/plain", "bad request\n".to_owned())
    } else if method != "GET" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_owned(),
        )
    } else if path == "/metrics" {
        ("200 OK", CONTENT_TYPE, render())
    } else {
        (
            "404 Not Found",
            "text/plain",
            "metrics are at /metrics\n".to_owned(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    }

    #[tokio::test]
    async fn scrapes_are_answered_and_other_requests_refused() {
        let mut registry = registry("test", "1.2.3");
        let counter: Counter = Counter::default();
        registry.register("messages", "Messages seen", counter.clone());
        let registry = Arc::new(registry);
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let render: Render = {
            let registry = Arc::clone(&registry);
            Arc::new(move || super::render(&registry))
        };
        let server = tokio::spawn(serve(listener, render, shutdown.clone()));

        counter.inc_by(3);
        let ok = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(ok.contains("meshbridge_messages_total 3"), "{ok}");
        assert!(
            ok.contains("meshbridge_build_info{program=\"test\",version=\"1.2.3\"} 1"),
            "{ok}"
        );
        assert!(ok.trim_end().ends_with("# EOF"), "{ok}");

        let missing = get(addr, "GET / HTTP/1.1\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = get(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n",
            "a".repeat(MAX_REQUEST)
        );
        let refused = get(addr, &huge).await;
        assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");

        shutdown.cancel();
        server.await.expect("the server stops");
    }

    #[test]
    fn unspecified_listen_addresses_are_probed_on_loopback() {
        for (listen, target) in [
            ("0.0.0.0:9600", "127.0.0.1:9600"),
            ("[::]:9600", "[::1]:9600"),
            ("10.1.2.3:9601", "10.1.2.3:9601"),
            ("127.0.0.1:9602", "127.0.0.1:9602"),
        ] {
            let listen: SocketAddr = listen.parse().expect("addr");
            assert_eq!(
                probe_target(listen),
                target.parse().expect("addr"),
                "{listen}"
            );
        }
    }

    /// A one-shot server that reads a request and answers `answer` (or nothing, holding the connection).
    async fn fake(answer: Option<&'static [u8]>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf).await;
            match answer {
                Some(answer) => {
                    let _ = stream.write_all(answer).await;
                }
                None => tokio::time::sleep(Duration::from_secs(60)).await,
            }
        });
        addr
    }

    #[tokio::test]
    async fn probe_passes_on_the_endpoint_and_names_each_failure() {
        let timeout = Duration::from_secs(2);
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let registry = Arc::new(registry("test", "1.2.3"));
        let render: Render = Arc::new(move || super::render(&registry));
        let server = tokio::spawn(serve(listener, render, shutdown.clone()));
        probe(addr, timeout)
            .await
            .expect("a serving endpoint is healthy");
        shutdown.cancel();
        server.await.expect("the server stops");
        // The listener is closed with the server: nothing accepts on that port any more.
        let stopped = probe(addr, timeout).await.expect_err("stopped");
        assert!(matches!(stopped, ProbeError::Connect { .. }), "{stopped:?}");

        let not_found = fake(Some(b"HTTP/1.1 404 Not Found\r\n\r\n")).await;
        let error = probe(not_found, timeout).await.expect_err("404");
        assert!(
            matches!(error, ProbeError::Status { status: 404, .. }),
            "{error:?}"
        );
        assert!(error.to_string().contains("HTTP 404"), "{error}");

        let other = fake(Some(b"SSH-2.0-OpenSSH_9.2\r\n")).await;
        let error = probe(other, timeout).await.expect_err("not HTTP");
        assert!(matches!(error, ProbeError::NotHttp { .. }), "{error:?}");

        let closed = fake(Some(b"")).await;
        let error = probe(closed, timeout).await.expect_err("closed");
        assert!(matches!(error, ProbeError::Io { .. }), "{error:?}");

        let silent = fake(None).await;
        let short = Duration::from_millis(200);
        let error = probe(silent, short).await.expect_err("silent");
        assert!(matches!(error, ProbeError::Timeout { .. }), "{error:?}");
    }
}
