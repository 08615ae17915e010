//! An OTLP/HTTP trace receiver for tests: the programs export to it exactly as to a collector
//! (`POST /v1/traces`, protobuf), and it decodes each request with the protocol's own generated types
//! and keeps the spans.
//!
//! HTTP/1.1 with `Content-Length` bodies and keep-alive, which is what the exporter's client sends; a
//! request it cannot read is answered 400 and recorded as an error, so a test notices.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Largest request body accepted.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// One exported span.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanSeen {
    /// The exporting process's `service.name`.
    pub service: String,
    /// Span name.
    pub name: String,
    /// Trace id, lower-case hex.
    pub trace_id: String,
    /// Span id, lower-case hex.
    pub span_id: String,
    /// Parent span id, lower-case hex; empty for a root span.
    pub parent_span_id: String,
    /// Start and end, Unix nanoseconds.
    pub start_ns: u64,
    /// See `start_ns`.
    pub end_ns: u64,
    /// Attributes, values rendered as text (integers in decimal).
    pub attributes: Vec<(String, String)>,
}

impl SpanSeen {
    /// The attribute `key`, as text.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Default)]
struct State {
    spans: Vec<SpanSeen>,
    requests: usize,
    errors: Vec<String>,
}

/// A running receiver.
#[derive(Debug)]
pub struct OtlpReceiver {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl OtlpReceiver {
    /// Listens on an ephemeral loopback port.
    ///
    /// # Panics
    /// If the port cannot be bound.
    pub async fn start() -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("an address")).await
    }

    /// Listens on `addr`.
    ///
    /// # Panics
    /// If the port cannot be bound.
    pub async fn start_on(addr: SocketAddr) -> Self {
        let listener = TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let state: Arc<Mutex<State>> = Arc::default();
        let shared = Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, Arc::clone(&shared)));
            }
        });
        Self { addr, state, task }
    }

    /// The value for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<SpanSeen> {
        self.state.lock().expect("lock").spans.clone()
    }

    /// Export requests decoded so far.
    pub fn requests(&self) -> usize {
        self.state.lock().expect("lock").requests
    }

    /// Requests that could not be read or decoded.
    pub fn errors(&self) -> Vec<String> {
        self.state.lock().expect("lock").errors.clone()
    }

    /// Waits until `pred` holds over the spans received, for at most `timeout`; returns whether it did.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&[SpanSeen]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.state.lock().expect("lock").spans) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection's requests until it closes.
async fn serve(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut buf = Vec::new();
    loop {
        let request = match read_request(&mut stream, &mut buf).await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(error) => {
                state.lock().expect("lock").errors.push(error.clone());
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                return;
            }
        };
        let (path, body) = request;
        let answer: &[u8] = if path == "/v1/traces" {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(export) => {
                    let mut state = state.lock().expect("lock");
                    state.requests += 1;
                    state.spans.extend(flatten(export));
                    // An empty ExportTraceServiceResponse: full success.
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n"
                }
                Err(e) => {
                    state
                        .lock()
                        .expect("lock")
                        .errors
                        .push(format!("undecodable export request: {e}"));
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
                }
            }
        } else {
            state
                .lock()
                .expect("lock")
                .errors
                .push(format!("request for {path}"));
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        };
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// Reads one request: its path and body; `None` when the client closed between requests.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<Option<(String, Vec<u8>)>, String> {
    let header_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err("request head over 64 KiB".to_owned());
        }
        let mut chunk = [0u8; 8192];
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("connection closed inside a request head".to_owned())
            };
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default().to_owned();
    if method != "POST" {
        return Err(format!("unexpected request {request_line:?}"));
    }
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim();
        match name.as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => return Err(format!("transfer-encoding {value} not supported")),
            "content-encoding" if value != "identity" => {
                return Err(format!("content-encoding {value} not supported"))
            }
            _ => {}
        }
    }
    let length = length.ok_or("no content-length")?;
    if length > MAX_BODY {
        return Err(format!("{length}-byte body"));
    }
    buf.drain(..header_end);
    while buf.len() < length {
        let mut chunk = vec![0u8; (length - buf.len()).min(64 * 1024)];
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed inside a body".to_owned());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body: Vec<u8> = buf.drain(..length).collect();
    Ok(Some((path, body)))
}

/// The spans of one export request, each with its resource's `service.name`.
fn flatten(export: ExportTraceServiceRequest) -> Vec<SpanSeen> {
    let mut out = Vec::new();
    for rs in export.resource_spans {
        let service = rs
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .map(|kv| text(kv.value.as_ref()))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                out.push(SpanSeen {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    start_ns: span.start_time_unix_nano,
                    end_ns: span.end_time_unix_nano,
                    attributes: span.attributes.iter().map(pair).collect(),
                });
            }
        }
    }
    out
}

fn pair(kv: &KeyValue) -> (String, String) {
    (kv.key.clone(), text(kv.value.as_ref()))
}

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
