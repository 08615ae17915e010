//! Durable queue throughput: `cargo bench -p shared --bench queue`.
//!
//! Prints, for 200-byte messages, durable append throughput at batch sizes 1, 64 and 512 (every append
//! returns only once its batch is on disk: this is the rate at which the agent can acknowledge
//! publishers), then read throughput and ack/delete throughput. Each figure is the median of
//! `MESHBRIDGE_BENCH_RUNS` runs (default 3) on a fresh file in cargo's target tmp dir, i.e. on the same
//! filesystem as the build, never on tmpfs (where fsync is free and the figures would be fiction).

use std::time::{Duration, Instant};

use shared::queue::{FullPolicy, Queue, QueueLimits, RedbQueue};

const MSG: usize = 200;

fn limits() -> QueueLimits {
    QueueLimits {
        max_bytes: 8 << 30,
        max_age: None,
        full_policy: FullPolicy::Block,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Run {
    append: f64,
    read: f64,
    ack: f64,
}

fn one_run(batch: usize, total: usize) -> Run {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let q = RedbQueue::open(dir.path().join("bench.redb"), limits()).expect("open");
    let bodies: Vec<Vec<u8>> = (0..batch).map(|i| vec![i as u8; MSG]).collect();
    let batches = total / batch;

    let t = Instant::now();
    for i in 0..batches {
        q.append(&bodies, i as u64).expect("append");
    }
    let append = (batches * batch) as f64 / t.elapsed().as_secs_f64();

    let t = Instant::now();
    let mut cursor = 1;
    let mut read = 0;
    loop {
        let got = q.read(cursor, 512, 1 << 20).expect("read");
        let Some(last) = got.last() else { break };
        cursor = last.seq + 1;
        read += got.len();
    }
    assert_eq!(read, batches * batch, "every message reads back");
    let read = read as f64 / t.elapsed().as_secs_f64();

    // Acks arrive per uplink batch; 512 messages per ack is what the agent sends.
    let t = Instant::now();
    let mut acked = 0;
    let mut upto = 0;
    while acked < batches * batch {
        upto += 512;
        acked += q.ack_upto(upto as u64).expect("ack") as usize;
    }
    // Acks only move the watermark; the deletes go with the next write transaction, which this forces
    // (any write takes them along), so the figure is acks and deletes.
    q.forget_marks(0).expect("write the deletes");
    let ack = acked as f64 / t.elapsed().as_secs_f64();
    assert_eq!(q.stats().depth, 0);
    Run { append, read, ack }
}

fn main() {
    let runs: usize = std::env::var("MESHBRIDGE_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // cargo bench passes `--bench`; a filter argument, if any, is ignored.
    println!("durable queue (redb, Durability::Immediate per batch), {MSG}-byte messages, median of {runs} runs");
    println!(
        "{:>6} {:>9} {:>16} {:>14} {:>14} {:>12}",
        "batch", "messages", "append msg/s", "read msg/s", "ack msg/s", "fsyncs/s"
    );
    for (batch, total) in [(1usize, 3_000usize), (64, 128_000), (512, 1_024_000)] {
        let mut rs = Vec::new();
        let start = Instant::now();
        for _ in 0..runs {
            rs.push(one_run(batch, total));
        }
        let append = median(rs.iter().map(|r| r.append).collect());
        let read = median(rs.iter().map(|r| r.read).collect());
        let ack = median(rs.iter().map(|r| r.ack).collect());
        println!(
            "{batch:>6} {total:>9} {append:>16.0} {read:>14.0} {ack:>14.0} {:>12.0}",
            append / batch as f64
        );
        if start.elapsed() > Duration::from_secs(300) {
            println!("(stopping early: this machine is too slow for the remaining sizes)");
            break;
        }
    }
}
