//! Power loss under the durable queue (fault scenario 6 of the fault suite): a redb storage backend that
//! keeps two images of the disk, what `write` has put in the page cache and what the last `sync_data`
//! made durable. A "cut" throws the page cache away (optionally keeping a random subset of the unsynced
//! writes, as a disk that got some of them out before the power went) and the queue is reopened on the
//! durable image alone.
//!
//! What must hold after every cut: the file opens (redb's recovery, no manual repair); every append that
//! *returned* is still readable with its body unless the watermark passed it; seqs are never reused; the
//! watermark never passes what was acknowledged before the cut. Acks commit without fsync, so a cut may
//! bring acknowledged entries back (they are resent, and the hub's dedup drops them): allowed, and counted.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use redb::StorageBackend;
use shared::queue::{Queue, QueueLimits, RedbQueue};

/// The disk: a durable image and the page cache above it.
#[derive(Debug, Default)]
struct Disk {
    durable: Vec<u8>,
    cache: Vec<u8>,
    /// Writes since the last sync, in order: (offset, bytes).
    unsynced: Vec<(u64, Vec<u8>)>,
    syncs: u64,
}

#[derive(Debug, Clone, Default)]
struct PowerCutBackend(Arc<Mutex<Disk>>);

impl PowerCutBackend {
    fn disk(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The disk as it is after a power cut: the durable image plus the unsynced writes `keep` selects.
    fn cut(&self, mut keep: impl FnMut(usize) -> bool) -> Self {
        let d = self.disk();
        let mut image = d.durable.clone();
        for (i, (offset, bytes)) in d.unsynced.iter().enumerate() {
            if keep(i) {
                let start = *offset as usize;
                let end = start + bytes.len();
                if image.len() < end {
                    image.resize(end, 0);
                }
                image[start..end].copy_from_slice(bytes);
            }
        }
        Self(Arc::new(Mutex::new(Disk {
            durable: image.clone(),
            cache: image,
            unsynced: Vec::new(),
            syncs: 0,
        })))
    }
}

impl StorageBackend for PowerCutBackend {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.disk().cache.len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let d = self.disk();
        let start = offset as usize;
        let src = d
            .cache
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut d = self.disk();
        d.cache.resize(len as usize, 0);
        // A length change, like the data, is durable only at the next sync (which copies the cache).
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut d = self.disk();
        d.durable = d.cache.clone();
        d.unsynced.clear();
        d.syncs += 1;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut d = self.disk();
        let start = offset as usize;
        let end = start + data.len();
        if d.cache.len() < end {
            d.cache.resize(end, 0);
        }
        d.cache[start..end].copy_from_slice(data);
        d.unsynced.push((offset, data.to_vec()));
        Ok(())
    }
}

/// A small deterministic generator (xorshift), so a failure names its seed and replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn body(seq_hint: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seq_hint as usize * 31 + i) as u8)
        .collect()
}

/// Runs `rounds` of random appends and acks, each ended by a power cut, and checks the invariants after
/// every reopen. `partial` keeps a random subset of the unsynced writes at each cut. With `log` (a size),
/// the queue is a logged one (the agent's) with its append log on a second modelled disk, cut at the
/// same moment; a small size makes the log fill and start over often, and sends the larger batches to
/// redb directly.
fn run(seed: u64, rounds: usize, partial: bool, log: Option<u64>) -> (u64, u64) {
    let mut rng = Rng(seed);
    let limits = QueueLimits::default();
    let mut backend = PowerCutBackend::default();
    let mut log_disk = PowerCutBackend::default();
    // Every append that returned: seq -> body. Removed once the watermark passes it after a reopen.
    let mut returned: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut highest_returned = 0;
    let mut highest_ack_asked = 0;
    let mut resurrected = 0;
    let mut cuts = 0;
    let mut log_syncs = 0;
    for round in 0..rounds {
        let log_backend =
            log.map(|size| (Box::new(log_disk.clone()) as Box<dyn StorageBackend>, size));
        let q = RedbQueue::open_on_backend(backend.clone(), log_backend, "power-cut", limits)
            .unwrap_or_else(|e| panic!("seed {seed} round {round}: the file reopens: {e}"));
        let stats = q.stats();
        assert!(
            stats.acked <= highest_ack_asked,
            "seed {seed} round {round}: watermark {} passed the highest ack asked {highest_ack_asked}",
            stats.acked
        );
        assert!(
            stats.next_seq > highest_returned,
            "seed {seed} round {round}: next seq {} would reuse {highest_returned}",
            stats.next_seq
        );
        let stored = q
            .read(stats.acked + 1, usize::MAX, usize::MAX)
            .expect("read");
        let stored: BTreeMap<u64, Vec<u8>> = stored
            .into_iter()
            .map(|e| (e.seq, e.body.to_vec()))
            .collect();
        for (seq, want) in returned.range(stats.acked + 1..) {
            assert_eq!(
                stored.get(seq),
                Some(want),
                "seed {seed} round {round}: acknowledged append {seq} lost or changed by a power cut"
            );
        }
        // Acknowledged entries that a lost (unsynced) ack brought back are resent, not lost: count them.
        resurrected += stored.keys().filter(|s| **s <= highest_ack_asked).count() as u64;
        returned = returned.split_off(&(stats.acked + 1));

        for _ in 0..rng.below(12) + 1 {
            if rng.below(4) == 0 && stats.next_seq > 1 {
                let upto = rng.below(q.stats().next_seq);
                highest_ack_asked = highest_ack_asked.max(upto.min(q.stats().next_seq - 1));
                q.ack_upto(upto).expect("ack");
            } else {
                let n = rng.below(5) as usize + 1;
                let first = q.stats().next_seq;
                let bodies: Vec<Vec<u8>> = (0..n)
                    .map(|i| body(first + i as u64, rng.below(300) as usize))
                    .collect();
                let out = q.append(&bodies, 1_000 + round as u64).expect("append");
                for (i, b) in bodies.into_iter().enumerate() {
                    returned.insert(out.first_seq + i as u64, b);
                }
                highest_returned = out.last_seq;
            }
        }
        // The power goes: nothing is closed, unsynced writes are lost (or some of them survive).
        let (next, next_log) = if partial {
            let mut keep_rng = Rng(rng.next() | 1);
            (
                backend.cut(|_| keep_rng.below(2) == 0),
                log_disk.cut(|_| keep_rng.below(2) == 0),
            )
        } else {
            (backend.cut(|_| false), log_disk.cut(|_| false))
        };
        log_syncs += log_disk.disk().syncs;
        std::mem::forget(q);
        backend = next;
        log_disk = next_log;
        cuts += 1;
    }
    if log.is_some() {
        assert!(
            log_syncs > rounds as u64,
            "seed {seed}: the appends went through the log ({log_syncs} log syncs in {rounds} rounds)"
        );
    }
    (cuts, resurrected)
}

#[test]
fn every_returned_append_survives_a_power_cut_that_loses_unsynced_writes() {
    for seed in 1..=8u64 {
        let (cuts, resurrected) = run(seed * 0x9e37_79b9, 40, false, None);
        println!("scenario=power-cut seed={seed} cuts={cuts} lost=0 acked_entries_seen_again={resurrected}");
    }
}

#[test]
fn every_returned_append_to_a_logged_queue_survives_a_power_cut() {
    for seed in 1..=8u64 {
        for partial in [false, true] {
            let (cuts, resurrected) = run(seed * 0x27d4_eb2f, 40, partial, Some(1_200));
            println!(
                "scenario=power-cut-logged partial={partial} seed={seed} cuts={cuts} lost=0 acked_entries_seen_again={resurrected}"
            );
        }
    }
}

#[test]
fn every_returned_append_survives_a_power_cut_that_keeps_some_unsynced_writes() {
    for seed in 1..=8u64 {
        let (cuts, resurrected) = run(seed * 0x85eb_ca6b, 40, true, None);
        println!(
            "scenario=power-cut-partial seed={seed} cuts={cuts} lost=0 acked_entries_seen_again={resurrected}"
        );
    }
}
