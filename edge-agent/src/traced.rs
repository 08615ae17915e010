//! The agent's spans for one traced message (see `metrics/src/otel.rs` for why they are built by hand):
//!
//! ```text
//! [publisher's span]                        (when the publisher sent a sampled traceparent)
//! └─ meshbridge.edge.receive                taken from the local broker .. committed
//!    ├─ meshbridge.edge.commit              the queue commit that made it durable
//!    ├─ meshbridge.edge.queue               committed .. read for sending (outages included)
//!    ├─ meshbridge.edge.send                sent .. acknowledged by the hub
//!    └─ meshbridge.hub.receive ...          (the hub's, parented on the envelope's traceparent)
//! ```
//!
//! The envelope is committed with `receive`'s context, so every later span, in this process, after a
//! restart, or at the hub, hangs off it; the queue and send spans are recorded by the uplink from what
//! the stored body says (`shared::envelope::peek_trace`), so nothing about a traced message is kept in
//! memory across the wait in the queue.

use std::collections::VecDeque;
use std::time::SystemTime;

use meshbridge_metrics::otel::{self, Begun, KeyValue, SpanKind, SpanRecord, Traces};
use shared::queue::Entry;
use shared::trace::TraceParent;

/// A traced message in a commit group, waiting for its commit.
#[derive(Debug)]
pub(crate) struct Received {
    pub(crate) begun: Begun,
    pub(crate) start: SystemTime,
    pub(crate) topic: String,
    pub(crate) lane: u8,
    /// Its index in its lane's part of the group, then its seq once that part is committed.
    pub(crate) index: u64,
    pub(crate) seq: Option<u64>,
}

/// Records `receive` and `commit` for every message of a group whose commit began at `commit_start`
/// and has just succeeded.
pub(crate) fn committed(
    traces: &Traces,
    site: &str,
    received: Vec<Received>,
    commit_start: SystemTime,
) {
    let end = SystemTime::now();
    let batch = received.len() as u64;
    for r in received {
        let trace_id = r.begun.context.trace_id;
        let receive = r.begun.context.span_id;
        let mut attributes = vec![
            KeyValue::new("messaging.system", "mqtt"),
            KeyValue::new("messaging.destination.name", r.topic),
            KeyValue::new("meshbridge.site", site.to_owned()),
            KeyValue::new("meshbridge.lane", i64::from(r.lane)),
        ];
        if let Some(seq) = r.seq {
            attributes.push(KeyValue::new("meshbridge.seq", seq_attr(seq)));
        }
        traces.record(SpanRecord {
            name: "meshbridge.edge.receive",
            kind: SpanKind::Consumer,
            trace_id,
            span_id: receive,
            parent: r.begun.parent.map(|p| (p, true)),
            start: r.start,
            end,
            attributes,
        });
        traces.record(SpanRecord {
            name: "meshbridge.edge.commit",
            kind: SpanKind::Internal,
            trace_id,
            span_id: traces.span_id(),
            parent: Some((receive, false)),
            start: commit_start.max(r.start),
            end,
            attributes: vec![KeyValue::new(
                "meshbridge.commit.traced_messages",
                seq_attr(batch),
            )],
        });
    }
}

/// A traced message sent on the current connection, waiting for the hub's acknowledgement.
#[derive(Debug)]
pub(crate) struct Sent {
    seq: u64,
    context: TraceParent,
    at: SystemTime,
}

/// Records `queue` for every traced entry about to be sent, and remembers them for [`acked`].
pub(crate) fn sending(traces: &Traces, lane: u8, entries: &[Entry], inflight: &mut VecDeque<Sent>) {
    let now = SystemTime::now();
    for entry in entries {
        let Some(peek) = shared::envelope::peek_trace(&entry.body) else {
            continue;
        };
        let Some(context) = traces.continues(peek.traceparent) else {
            continue;
        };
        let committed = otel::unix_ms(peek.enqueued_at_ms);
        let queued_ms = now
            .duration_since(committed)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        traces.record(SpanRecord {
            name: "meshbridge.edge.queue",
            kind: SpanKind::Internal,
            trace_id: context.trace_id,
            span_id: traces.span_id(),
            parent: Some((context.span_id, false)),
            start: committed,
            end: now,
            attributes: vec![
                KeyValue::new("meshbridge.queued_ms", seq_attr(queued_ms)),
                KeyValue::new("meshbridge.seq", seq_attr(entry.seq)),
                KeyValue::new("meshbridge.lane", i64::from(lane)),
            ],
        });
        inflight.push_back(Sent {
            seq: entry.seq,
            context,
            at: now,
        });
    }
}

/// Records `send` for every traced message the hub acknowledged up to `upto`.
pub(crate) fn acked(traces: &Traces, upto: u64, inflight: &mut VecDeque<Sent>) {
    let now = SystemTime::now();
    while inflight.front().is_some_and(|s| s.seq <= upto) {
        let Some(sent) = inflight.pop_front() else {
            break;
        };
        traces.record(SpanRecord {
            name: "meshbridge.edge.send",
            kind: SpanKind::Client,
            trace_id: sent.context.trace_id,
            span_id: traces.span_id(),
            parent: Some((sent.context.span_id, false)),
            start: sent.at,
            end: now,
            attributes: vec![KeyValue::new("meshbridge.seq", seq_attr(sent.seq))],
        });
    }
}

/// A count or seq as a span attribute (OpenTelemetry integers are signed).
fn seq_attr(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
