//! Traces: each program's OpenTelemetry exporter, set up from the standard `OTEL_*` variables, and the
//! one call that records a finished span.
//!
//! # Why spans are built by hand
//! A message's life at the edge is spread over tasks and time (received, committed, read back from the
//! queue after an outage, perhaps after a restart, sent, acknowledged), and its next hop must know a
//! span's id before that span ends: the envelope is committed with the id of the edge's `receive`
//! span, and the cloud message with the id of the hub's `publish` span. The SDK's tracer always draws its
//! own span ids and times, so the programs choose ids here, keep the timestamps they already have, and
//! hand each finished span to the SDK's batch processor as [`SpanData`] once. Unsampled messages cost
//! one branch; nothing is allocated for them.
//!
//! # Configuration
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and off
//! when `OTEL_SDK_DISABLED=true`. The protocol is `http/protobuf` (the only one built in; another value
//! in `OTEL_EXPORTER_OTLP_PROTOCOL` is refused at start-up). `OTEL_SERVICE_NAME` and
//! `OTEL_RESOURCE_ATTRIBUTES` name the service (default: the program's name), `OTEL_BSP_*` tune the
//! batch processor, `OTEL_TRACES_SAMPLER[_ARG]` the sampler (see `shared/src/trace.rs`). The exporter
//! runs on the batch processor's own thread, with a blocking HTTP client: the programs' runtimes never
//! wait on a collector, and a full export queue drops spans, never messages.

use std::borrow::Cow;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanContext, SpanId, Status, TraceFlags, TraceId, TraceState};
use opentelemetry::InstrumentationScope;
pub use opentelemetry::{trace::SpanKind, KeyValue, Value};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanLinks,
    SpanProcessor,
};
use opentelemetry_sdk::Resource;
use shared::trace::{Sampler, SamplerError, TraceParent};
use tracing::{info, warn};

/// How long [`shutdown`] waits for the last spans to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why tracing could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// `OTEL_EXPORTER_OTLP_PROTOCOL` names a protocol this build does not speak.
    #[error("{var}={value:?} is not supported: this build exports OTLP over http/protobuf only")]
    Protocol {
        /// The variable that was read.
        var: &'static str,
        /// Its value.
        value: String,
    },
    /// The sampler variables are invalid.
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    /// The exporter could not be built (an invalid endpoint URL, say).
    #[error("cannot set up the OTLP exporter: {0}")]
    Exporter(String),
}

/// One finished span, in the terms the programs have at hand.
#[derive(Debug)]
pub struct SpanRecord {
    /// The operation (`meshbridge.edge.receive`, ...).
    pub name: &'static str,
    /// Its role in the exchange.
    pub kind: SpanKind,
    /// The trace it belongs to.
    pub trace_id: [u8; 16],
    /// Its id, chosen by the caller (see [`Traces::span_id`]).
    pub span_id: [u8; 8],
    /// Its parent span and whether that parent was recorded in another process (or is the publisher's).
    pub parent: Option<([u8; 8], bool)>,
    /// When it began.
    pub start: SystemTime,
    /// When it ended.
    pub end: SystemTime,
    /// What it is about.
    pub attributes: Vec<KeyValue>,
}

/// A program's trace exporter and sampler.
#[derive(Debug)]
pub struct Traces {
    processor: BatchSpanProcessor,
    ids: RandomIdGenerator,
    sampler: Sampler,
    scope: InstrumentationScope,
}

/// The decision for one message entering the mesh (see [`Traces::begin`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begun {
    /// The context of the new span: its trace, and its id as the next hop's parent.
    pub context: TraceParent,
    /// The publisher's span this one continues, if the publisher sent a sampled `traceparent`.
    pub parent: Option<[u8; 8]>,
}

static TRACES: OnceLock<Traces> = OnceLock::new();

/// The process's traces, if [`install`] set them up (`None`: tracing is off).
#[must_use]
pub fn traces() -> Option<&'static Traces> {
    TRACES.get()
}

/// Sets up tracing from the environment for `service` (the default `service.name`) at `version`; the
/// process's [`traces`] from then on. Logs where spans go. Returns whether tracing is on.
///
/// # Errors
/// [`OtelError`] for an unsupported protocol, an invalid sampler or an exporter that cannot be built.
pub fn install(service: &'static str, version: &'static str) -> Result<bool, OtelError> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let endpoint =
        var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").or_else(|| var("OTEL_EXPORTER_OTLP_ENDPOINT"));
    let disabled = var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let Some(endpoint) = endpoint.filter(|_| !disabled) else {
        return Ok(false);
    };
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(value) = var(name) {
            if value.trim() != "http/protobuf" {
                return Err(OtelError::Protocol { var: name, value });
            }
            break;
        }
    }
    let sampler = Sampler::from_env(
        var("OTEL_TRACES_SAMPLER").as_deref(),
        var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
    )?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .map_err(|e| OtelError::Exporter(e.to_string()))?;
    let mut processor = BatchSpanProcessor::builder(exporter).build();
    let resource = Resource::builder().build();
    let named = resource
        .get(&opentelemetry::Key::from_static_str("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let resource = if named {
        resource
    } else {
        Resource::builder().with_service_name(service).build()
    };
    processor.set_resource(&resource);
    let traces = Traces {
        processor,
        ids: RandomIdGenerator::default(),
        sampler,
        scope: InstrumentationScope::builder("meshbridge")
            .with_version(version)
            .build(),
    };
    if TRACES.set(traces).is_err() {
        warn!("tracing was already set up; the first set-up stays");
    }
    info!(%endpoint, ?sampler, "exporting traces over OTLP (http/protobuf)");
    Ok(true)
}

/// Exports what is still buffered and stops the exporter (blocking, up to 5 s; call it from a blocking
/// context once no more spans are recorded).
pub fn shutdown() {
    if let Some(traces) = traces() {
        if let Err(e) = traces.processor.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            warn!(cause = %e, "the last spans could not all be exported");
        }
    }
}

impl Traces {
    /// A fresh span id.
    #[must_use]
    pub fn span_id(&self) -> [u8; 8] {
        self.ids.new_span_id().to_bytes()
    }

    /// Decides whether a message entering the mesh is traced. `publisher` is the `traceparent` it came
    /// with, if any: a valid one is continued (its sampled flag decides under a parent-based sampler);
    /// otherwise a new trace is started, sampled by the root rule. `None`: not traced here (a
    /// publisher's context, if any, travels on untouched).
    #[must_use]
    pub fn begin(&self, publisher: Option<&str>) -> Option<Begun> {
        let parent = publisher.and_then(TraceParent::parse);
        let trace_id = parent.map_or_else(|| self.ids.new_trace_id().to_bytes(), |p| p.trace_id);
        if !self.sampler.samples(parent.as_ref(), &trace_id) {
            return None;
        }
        Some(Begun {
            context: TraceParent::sampled_span(trace_id, self.span_id()),
            parent: parent.map(|p| p.span_id),
        })
    }

    /// Whether a hop after the first records spans for a message that carries `context`: it must be
    /// valid and sampled upstream (the first hop decided; later hops never start traces of their own).
    #[must_use]
    pub fn continues(&self, context: &str) -> Option<TraceParent> {
        TraceParent::parse(context).filter(TraceParent::is_sampled)
    }

    /// Hands a finished span to the exporter (dropped, not blocking, if its queue is full).
    pub fn record(&self, span: SpanRecord) {
        let (parent_span_id, parent_span_is_remote) = span
            .parent
            .map_or((SpanId::INVALID, false), |(id, remote)| {
                (SpanId::from_bytes(id), remote)
            });
        self.processor.on_end(SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(span.trace_id),
                SpanId::from_bytes(span.span_id),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id,
            parent_span_is_remote,
            span_kind: span.kind,
            name: Cow::Borrowed(span.name),
            start_time: span.start,
            end_time: span.end.max(span.start),
            attributes: span.attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: self.scope.clone(),
        });
    }
}

/// A Unix time in milliseconds as a [`SystemTime`].
#[must_use]
pub fn unix_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(ms)
}
