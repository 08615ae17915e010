//! Model check of the durable queue: random sequences of append / read / ack / expire / reopen / restart
//! (a new incarnation above a floor) are applied
//! to the redb queue and to the in-memory model, and every result and the stats are compared after each
//! step (the shape of Vector's disk buffer model tests). A lost, reordered, duplicated or resurrected
//! entry, a wrong full/drop decision or a watermark that goes back on reopen makes a step differ.

use std::time::Duration;

use proptest::prelude::*;
use shared::queue::{FullPolicy, MemQueue, Queue, QueueError, QueueLimits, RedbQueue};

#[derive(Debug, Clone)]
enum Op {
    /// Append a batch of bodies of these lengths (a body's bytes encode its op index, so mix-ups show).
    Append(Vec<usize>),
    /// Read from `acked + offset` (offset may land below the watermark or past the end).
    Read {
        offset: u64,
        max_messages: usize,
        max_bytes: usize,
    },
    /// Ack `acked + delta` (0 is a repeated ack; large deltas go past the end).
    Ack(u64),
    /// Move the clock and expire.
    Expire(u64),
    /// Close and reopen the redb queue.
    Reopen,
    /// Start a new incarnation above `acked + offset` (a restored file meeting a hub that saw more).
    Restart(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => prop::collection::vec(0usize..300, 0..12).prop_map(Op::Append),
        3 => (0u64..40, 0usize..20, 0usize..2000).prop_map(|(offset, max_messages, max_bytes)| Op::Read { offset, max_messages, max_bytes }),
        2 => (0u64..30).prop_map(Op::Ack),
        1 => (0u64..600).prop_map(Op::Expire),
        1 => Just(Op::Reopen),
        1 => (0u64..60).prop_map(Op::Restart),
    ]
}

fn body(step: usize, i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (step * 31 + i * 7 + k) as u8).collect()
}

/// Errors are compared by kind: both must refuse the same appends for the same reason.
fn kind(e: &QueueError) -> &'static str {
    match e {
        QueueError::Full { .. } => "full",
        QueueError::BatchTooLarge { .. } => "too-large",
        QueueError::DiskFull { .. } => "disk-full",
        QueueError::Storage { .. } => "storage",
        QueueError::Format { .. } => "format",
        QueueError::Schema { .. } => "schema",
    }
}

/// Runs `ops` on the model and on a redb queue; with `log` (a size), a logged one (the agent's). A small
/// log fills every few appends, so replay on reopen, the log starting over and batches too big for it
/// (written to redb directly) all come up.
fn run(ops: Vec<Op>, limits: QueueLimits, log: Option<u64>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let path = dir.path().join("q.redb");
    let open = |path: &std::path::Path| match log {
        Some(size) => RedbQueue::open_logged(path, limits, size),
        None => RedbQueue::open(path, limits),
    };
    let model = MemQueue::new(limits);
    let mut real = Some(open(&path).expect("open"));
    let mut incarnation = real.as_ref().map(RedbQueue::incarnation);
    let mut now = 1_000u64;
    for (step, op) in ops.into_iter().enumerate() {
        let q = real.as_ref().expect("queue open");
        match op {
            Op::Append(lens) => {
                let bodies: Vec<Vec<u8>> = lens
                    .iter()
                    .enumerate()
                    .map(|(i, &l)| body(step, i, l))
                    .collect();
                now += 1;
                let m = model.append(&bodies, now);
                let r = q.append(&bodies, now);
                match (&m, &r) {
                    (Ok(m), Ok(r)) => prop_assert_eq!(m, r, "step {}: append outcome", step),
                    (Err(m), Err(r)) => prop_assert_eq!(kind(m), kind(r), "step {}", step),
                    _ => prop_assert!(false, "step {step}: model {m:?} vs real {r:?}"),
                }
            }
            Op::Read {
                offset,
                max_messages,
                max_bytes,
            } => {
                let from = model.stats().acked + offset;
                let m = model
                    .read(from, max_messages, max_bytes)
                    .expect("model read");
                // The in-memory tail, when it answers, must answer what the file would.
                if let Some(cached) = q.read_cached(from, max_messages, max_bytes) {
                    prop_assert_eq!(&m, &cached, "step {}: cached read from {}", step, from);
                }
                let r = q.read(from, max_messages, max_bytes).expect("real read");
                prop_assert_eq!(m, r, "step {}: read from {}", step, from);
            }
            Op::Ack(delta) => {
                let seq = model.stats().acked + delta;
                prop_assert_eq!(
                    model.ack_upto(seq).expect("model ack"),
                    q.ack_upto(seq).expect("real ack"),
                    "step {}: ack {}",
                    step,
                    seq
                );
            }
            Op::Expire(dt) => {
                now += dt;
                prop_assert_eq!(
                    model.expire(now).expect("model expire"),
                    q.expire(now).expect("real expire"),
                    "step {}: expire at {}",
                    step,
                    now
                );
            }
            Op::Reopen => {
                drop(real.take());
                let q = open(&path).expect("reopen");
                prop_assert!(!q.repaired_on_open(), "a clean close needs no repair");
                prop_assert_eq!(Some(q.incarnation()), incarnation, "incarnation is stable");
                real = Some(q);
            }
            Op::Restart(offset) => {
                let floor = model.stats().acked + offset;
                model.restart_above(floor);
                let new = q.restart_above(floor).expect("real restart");
                prop_assert_ne!(Some(new), incarnation, "step {}: a new incarnation", step);
                prop_assert_eq!(Some(q.incarnation()), Some(new));
                incarnation = Some(new);
            }
        }
        let q = real.as_ref().expect("queue open");
        let ms = model.stats();
        prop_assert_eq!(q.acked(), ms.acked, "step {}: acked", step);
        prop_assert_eq!(q.depth(), ms.depth, "step {}: depth", step);
        // `stats` takes pending acknowledgements into the ledger; on odd steps they stay pending, so
        // the next operation runs with acknowledgements the ledger has not taken in yet.
        if step % 2 == 1 {
            continue;
        }
        let mut rs = q.stats();
        prop_assert!(rs.file_bytes > 0);
        rs.file_bytes = 0;
        prop_assert_eq!(model.stats(), rs, "step {}: stats", step);
        prop_assert!(rs.bytes <= limits.max_bytes);
    }
    // Finally everything still stored reads back whole and in order.
    let q = real.as_ref().expect("queue open");
    let all_m = model.read(0, usize::MAX, usize::MAX).expect("model read");
    let all_r = q.read(0, usize::MAX, usize::MAX).expect("real read");
    prop_assert_eq!(&all_m, &all_r);
    prop_assert!(all_r.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    Ok(())
}

fn limits(full_policy: FullPolicy) -> QueueLimits {
    QueueLimits {
        max_bytes: 4_000,
        max_age: Some(Duration::from_millis(2_000)),
        full_policy,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn redb_queue_matches_model_block(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, limits(FullPolicy::Block), None)?;
    }

    #[test]
    fn logged_queue_matches_model_block(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, limits(FullPolicy::Block), Some(1_500))?;
    }

    #[test]
    fn logged_queue_matches_model_drop_oldest(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, limits(FullPolicy::DropOldest), Some(1_500))?;
    }

    #[test]
    fn redb_queue_matches_model_drop_oldest(ops in prop::collection::vec(op(), 1..60)) {
        run(ops, limits(FullPolicy::DropOldest), None)?;
    }
}

#[test]
fn append_read_ack_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.redb");
    let limits = QueueLimits::default();
    {
        let q = RedbQueue::open(&path, limits).expect("open");
        let out = q
            .append(&[b"a".as_slice(), b"bb", b"ccc"], 10)
            .expect("append");
        assert_eq!((out.first_seq, out.last_seq), (1, 3));
        q.append(&[b"d".as_slice()], 11).expect("append");
        assert_eq!(q.ack_upto(2).expect("ack"), 2);
        assert_eq!(q.ack_upto(1).expect("ack"), 0, "ack is idempotent");
    }
    let q = RedbQueue::open(&path, limits).expect("reopen");
    let got: Vec<(u64, Vec<u8>)> = q
        .read(0, 100, 1 << 20)
        .expect("read")
        .into_iter()
        .map(|e| (e.seq, e.body.to_vec()))
        .collect();
    assert_eq!(got, vec![(3, b"ccc".to_vec()), (4, b"d".to_vec())]);
    let s = q.stats();
    assert_eq!((s.depth, s.acked, s.next_seq), (2, 2, 5));
    assert_eq!(s.oldest_enqueued_ms, Some(10));
    assert_eq!(s.oldest_age(1_010), Some(Duration::from_secs(1)));
}

#[test]
fn acknowledged_space_is_reused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = RedbQueue::open(dir.path().join("q.redb"), QueueLimits::default()).expect("open");
    let bodies = vec![vec![7u8; 1024]; 64];
    let mut sizes = Vec::new();
    // 400 rounds write 25 MiB in all; with the space of acknowledged batches reused, the file stays at the
    // size a few batches need.
    for round in 0..400u64 {
        let out = q.append(&bodies, round).expect("append");
        q.ack_upto(out.last_seq).expect("ack");
        sizes.push(q.stats().file_bytes);
    }
    let last = *sizes.last().expect("sizes");
    let at_100 = sizes[99];
    assert!(
        last <= 4 << 20,
        "file grew to {last} bytes for 64 KiB live at a time"
    );
    assert!(
        last <= at_100 * 2,
        "file keeps growing: {at_100} bytes at round 100, {last} at 400"
    );
    assert_eq!(q.stats().depth, 0);
}
