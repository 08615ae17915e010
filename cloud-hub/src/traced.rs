//! The hub's spans for one traced message (see `metrics/src/otel.rs` for why they are built by hand),
//! children of the edge's `meshbridge.edge.receive` span that the envelope's `traceparent` names:
//!
//! ```text
//! meshbridge.edge.receive                 (the agent's)
//! └─ meshbridge.hub.receive               the batch arrived .. the message is routed
//!    ├─ meshbridge.hub.dedup              checked against the site's dedup window
//!    ├─ meshbridge.hub.route              mapped into the namespace / through the routes
//!    └─ meshbridge.hub.publish            handed to the cloud publisher .. the cloud broker has it
//! ```
//!
//! The cloud message's `traceparent` names the `publish` span, so a consumer continues the same trace.
//! A replay the dedup window drops gets one `meshbridge.hub.dedup` span marked as a duplicate. The hub
//! never starts a trace: the agent decided whether the message is sampled.

use std::time::SystemTime;

use meshbridge_metrics::otel::{KeyValue, SpanKind, SpanRecord, Traces};
use shared::trace::TraceParent;

/// A traced message between its dedup check and its routing.
#[derive(Debug)]
pub(crate) struct Receiving {
    upstream: TraceParent,
    receive: [u8; 8],
    publish: [u8; 8],
    received_at: SystemTime,
    route_start: SystemTime,
}

/// A traced message handed to the cloud publisher.
#[derive(Debug)]
pub(crate) struct Publishing {
    trace_id: [u8; 16],
    receive: [u8; 8],
    publish: [u8; 8],
    seq: u64,
    start: SystemTime,
}

impl Receiving {
    /// A message of the batch that arrived at `received_at`, past its dedup check, continuing `upstream`.
    pub(crate) fn new(traces: &Traces, upstream: TraceParent, received_at: SystemTime) -> Self {
        Self {
            upstream,
            receive: traces.span_id(),
            publish: traces.span_id(),
            received_at,
            route_start: SystemTime::now(),
        }
    }

    /// The context the cloud message carries: the `publish` span's.
    pub(crate) const fn publish_context(&self) -> TraceParent {
        self.upstream.with_span(self.publish)
    }

    /// Records `receive`, `dedup` and `route` for a message routed into `cloud` cloud messages (none:
    /// refused or routed only to other sites); the `publish` span to come, if any.
    pub(crate) fn routed(
        self,
        traces: &Traces,
        site: &str,
        seq: u64,
        topic: String,
        cloud: usize,
    ) -> Option<Publishing> {
        let now = SystemTime::now();
        let trace_id = self.upstream.trace_id;
        traces.record(SpanRecord {
            name: "meshbridge.hub.receive",
            kind: SpanKind::Consumer,
            trace_id,
            span_id: self.receive,
            parent: Some((self.upstream.span_id, true)),
            start: self.received_at,
            end: now,
            attributes: vec![
                KeyValue::new("messaging.system", "mqtt"),
                KeyValue::new("messaging.source.name", topic),
                KeyValue::new("meshbridge.site", site.to_owned()),
                KeyValue::new("meshbridge.seq", attr(seq)),
            ],
        });
        traces.record(SpanRecord {
            name: "meshbridge.hub.dedup",
            kind: SpanKind::Internal,
            trace_id,
            span_id: traces.span_id(),
            parent: Some((self.receive, false)),
            start: self.received_at,
            end: self.route_start,
            attributes: vec![KeyValue::new("meshbridge.dedup.duplicate", false)],
        });
        traces.record(SpanRecord {
            name: "meshbridge.hub.route",
            kind: SpanKind::Internal,
            trace_id,
            span_id: traces.span_id(),
            parent: Some((self.receive, false)),
            start: self.route_start,
            end: now,
            attributes: vec![KeyValue::new(
                "meshbridge.route.cloud_messages",
                attr(cloud as u64),
            )],
        });
        (cloud > 0).then_some(Publishing {
            trace_id,
            receive: self.receive,
            publish: self.publish,
            seq,
            start: now,
        })
    }
}

impl Publishing {
    /// Marks when the message went to the cloud publisher.
    pub(crate) fn handed_over(&mut self, at: SystemTime) {
        self.start = at;
    }
}

/// Records `publish` for messages the cloud broker has acknowledged (or taken, at QoS 0).
pub(crate) fn published(done: Vec<Publishing>) {
    let Some(traces) = meshbridge_metrics::otel::traces() else {
        return;
    };
    let now = SystemTime::now();
    for p in done {
        traces.record(SpanRecord {
            name: "meshbridge.hub.publish",
            kind: SpanKind::Producer,
            trace_id: p.trace_id,
            span_id: p.publish,
            parent: Some((p.receive, false)),
            start: p.start,
            end: now,
            attributes: vec![
                KeyValue::new("messaging.system", "mqtt"),
                KeyValue::new("meshbridge.seq", attr(p.seq)),
            ],
        });
    }
}

/// Records the `dedup` span of a replay the site's dedup window dropped.
pub(crate) fn duplicate(
    traces: &Traces,
    upstream: &TraceParent,
    site: &str,
    seq: u64,
    received_at: SystemTime,
) {
    traces.record(SpanRecord {
        name: "meshbridge.hub.dedup",
        kind: SpanKind::Internal,
        trace_id: upstream.trace_id,
        span_id: traces.span_id(),
        parent: Some((upstream.span_id, true)),
        start: received_at,
        end: SystemTime::now(),
        attributes: vec![
            KeyValue::new("meshbridge.dedup.duplicate", true),
            KeyValue::new("meshbridge.site", site.to_owned()),
            KeyValue::new("meshbridge.seq", attr(seq)),
        ],
    });
}

/// A count or seq as a span attribute (OpenTelemetry integers are signed).
fn attr(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
