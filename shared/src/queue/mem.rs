//! The in-memory queue: the model [`super::RedbQueue`] is checked against, and a queue for tests.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

use super::{batch_cost, AppendOutcome, Entry, Ledger, Queue, QueueError, QueueLimits, QueueStats};

/// A [`Queue`] that keeps everything in a map: obviously right, not durable.
#[derive(Debug)]
pub struct MemQueue {
    limits: QueueLimits,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    ledger: Ledger,
    messages: BTreeMap<u64, Bytes>,
}

impl MemQueue {
    /// An empty queue with these limits.
    pub fn new(limits: QueueLimits) -> Self {
        Self {
            limits,
            inner: Mutex::new(Inner {
                ledger: Ledger::new(),
                messages: BTreeMap::new(),
            }),
        }
    }

    /// The model of `RedbQueue::restart_above`: every seq moves up so the first unacked one is `floor + 1`
    /// (nothing moves if `floor` is at or below the watermark). The in-memory queue has no incarnation.
    pub fn restart_above(&self, floor: u64) {
        let mut inner = self.lock();
        let acked = inner.ledger.acked;
        inner.forget(acked);
        let by = floor.saturating_sub(acked);
        inner.ledger.shift(by);
        inner.messages = std::mem::take(&mut inner.messages)
            .into_iter()
            .map(|(seq, body)| (seq + by, body))
            .collect();
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the map consistent (every mutation is one call), so
        // recovering the guard is sound.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn forget(&mut self, upto: u64) {
        // Keep only seqs above the watermark; split_off returns the upper part.
        self.messages = self.messages.split_off(&(upto + 1));
    }
}

impl Queue for MemQueue {
    fn append<B: AsRef<[u8]>>(
        &self,
        bodies: &[B],
        now_ms: u64,
    ) -> Result<AppendOutcome, QueueError> {
        let mut inner = self.lock();
        if bodies.is_empty() {
            return Ok(inner.ledger.empty_append());
        }
        let cost = batch_cost(bodies);
        let removal = inner.ledger.make_room(cost, &self.limits)?;
        let acked = inner.ledger.acked;
        inner.forget(acked);
        let meta = inner.ledger.push(bodies.len() as u64, cost, now_ms);
        for (i, b) in bodies.iter().enumerate() {
            inner
                .messages
                .insert(meta.first + i as u64, Bytes::copy_from_slice(b.as_ref()));
        }
        Ok(AppendOutcome {
            first_seq: meta.first,
            last_seq: meta.last,
            dropped: removal.passed,
        })
    }

    fn read(
        &self,
        from: u64,
        max_messages: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, QueueError> {
        let inner = self.lock();
        let start = inner.ledger.read_start(from);
        let mut out = Vec::new();
        let mut bytes = 0;
        for (&seq, body) in inner.messages.range(start..) {
            if out.len() >= max_messages || (!out.is_empty() && bytes + body.len() > max_bytes) {
                break;
            }
            bytes += body.len();
            out.push(Entry {
                seq,
                body: body.clone(),
            });
        }
        Ok(out)
    }

    fn ack_upto(&self, seq: u64) -> Result<u64, QueueError> {
        let mut inner = self.lock();
        let passed = inner.ledger.advance(seq).passed;
        let acked = inner.ledger.acked;
        inner.forget(acked);
        Ok(passed)
    }

    fn expire(&self, now_ms: u64) -> Result<u64, QueueError> {
        let mut inner = self.lock();
        let passed = inner.ledger.expire(now_ms, &self.limits).passed;
        let acked = inner.ledger.acked;
        inner.forget(acked);
        Ok(passed)
    }

    fn stats(&self) -> QueueStats {
        self.lock().ledger.stats()
    }
}
