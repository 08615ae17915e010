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

pub mod logging;
pub mod otel;

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
}
