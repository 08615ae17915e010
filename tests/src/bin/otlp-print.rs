//! `otlp-print [ADDR]`: an OTLP/HTTP trace endpoint (default `127.0.0.1:4318`) that prints each trace as
//! a tree once its spans stop arriving. For looking at the programs' traces without a collector or
//! Jaeger (README, "Traces"); the decoding is the end-to-end tests' receiver (`tests/src/otlp.rs`).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use meshbridge_tests::otlp::{OtlpReceiver, SpanSeen};

/// A trace is printed once no span of it arrived for this long.
const QUIET: Duration = Duration::from_secs(2);

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4318".to_owned())
        .parse()
        .unwrap_or_else(|e| {
            eprintln!("otlp-print: usage: otlp-print [ADDR] ({e})");
            std::process::exit(2);
        });
    let receiver = OtlpReceiver::start_on(addr).await;
    println!(
        "listening: OTEL_EXPORTER_OTLP_ENDPOINT={}",
        receiver.endpoint()
    );
    let mut seen = 0;
    let mut last_change: BTreeMap<String, Instant> = BTreeMap::new();
    let mut printed: HashSet<String> = HashSet::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let spans = receiver.spans();
        for s in &spans[seen..] {
            last_change.insert(s.trace_id.clone(), Instant::now());
        }
        seen = spans.len();
        let ready: Vec<String> = last_change
            .iter()
            .filter(|(t, at)| at.elapsed() >= QUIET && !printed.contains(*t))
            .map(|(t, _)| t.clone())
            .collect();
        for trace in ready {
            let mine: Vec<&SpanSeen> = spans.iter().filter(|s| s.trace_id == trace).collect();
            println!("trace {trace}");
            let ids: HashSet<&str> = mine.iter().map(|s| s.span_id.as_str()).collect();
            // Roots here: spans whose parent is not in this trace's spans (the publisher's, or none).
            let mut roots: Vec<&&SpanSeen> = mine
                .iter()
                .filter(|s| !ids.contains(s.parent_span_id.as_str()))
                .collect();
            roots.sort_by_key(|s| s.start_ns);
            for root in roots {
                print_tree(&mine, root, 1);
            }
            for e in receiver.errors() {
                eprintln!("otlp-print: {e}");
            }
            last_change.remove(&trace);
            printed.insert(trace);
        }
    }
}

fn print_tree(spans: &[&SpanSeen], span: &SpanSeen, depth: usize) {
    let micros = span.end_ns.saturating_sub(span.start_ns) / 1_000;
    let attrs: Vec<String> = span
        .attributes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    println!(
        "{:indent$}{} [{}] {micros} µs  {}",
        "",
        span.name,
        span.service,
        attrs.join(" "),
        indent = depth * 2
    );
    let mut children: Vec<&&SpanSeen> = spans
        .iter()
        .filter(|s| s.parent_span_id == span.span_id)
        .collect();
    children.sort_by_key(|s| s.start_ns);
    for child in children {
        print_tree(spans, child, depth + 1);
    }
}
