//! Crash-test driver for the durable queue: appends batches forever and prints `A <last_seq>` after each
//! append returned (so the parent knows it was acknowledged as durable), and now and then acknowledges
//! an older prefix, printing `K <seq>` after the ack returned. The parent kills it with SIGKILL at a random
//! moment and checks the file. Usage: `queue-writer PATH SEED [logged]`; with `logged` the queue is opened
//! as the agent opens it, with its append log.

use std::io::Write;

use meshbridge_tests::crash_body;
use shared::queue::{Queue, QueueLimits, RedbQueue, DEFAULT_LOG_BYTES};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(path), Some(seed)) = (args.next(), args.next()) else {
        eprintln!("usage: queue-writer PATH SEED");
        std::process::exit(2);
    };
    let mut rng: u64 = seed.parse().unwrap_or(1) | 1;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let opened = if args.next().as_deref() == Some("logged") {
        RedbQueue::open_logged(&path, QueueLimits::default(), DEFAULT_LOG_BYTES)
    } else {
        RedbQueue::open(&path, QueueLimits::default())
    };
    let q = match opened {
        Ok(q) => q,
        Err(e) => {
            eprintln!("open {path}: {e}");
            std::process::exit(1);
        }
    };
    let mut out = std::io::stdout().lock();
    let mut now = 0;
    loop {
        let start = q.stats().next_seq;
        let n = 1 + next() % 64;
        let bodies: Vec<Vec<u8>> = (start..start + n).map(crash_body).collect();
        now += 1;
        match q.append(&bodies, now) {
            Ok(o) => {
                // The line is written only after the append returned: it is the durable acknowledgement.
                let _ = writeln!(out, "A {}", o.last_seq);
                let _ = out.flush();
            }
            Err(e) => {
                eprintln!("append: {e}");
                std::process::exit(1);
            }
        }
        if next() % 8 == 0 {
            let s = q.stats();
            let upto = s.acked + (s.next_seq - 1 - s.acked) / 2;
            if q.ack_upto(upto).is_ok() {
                let _ = writeln!(out, "K {upto}");
                let _ = out.flush();
            }
        }
    }
}
