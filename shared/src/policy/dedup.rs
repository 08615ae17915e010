//! Per-origin dedup: drops replays by `(origin, seq)` with bounded memory.
//!
//! The mesh is at-least-once: an agent resends everything it has not seen acknowledged, so after a reconnect
//! or a crash the hub receives some messages twice. Each origin (a site) numbers its queue entries with a
//! sequence starting at 1, and the hub keeps one [`DedupWindow`] per origin to recognise what it has already
//! published.
//!
//! # The window
//! A window is a high-water mark `hw` (every seq `<= hw` has been seen) plus a ring of `W` bits for the seqs
//! `hw+1 ..= hw+W` that arrived ahead of a gap. In-order traffic only moves `hw`; out-of-order arrivals set a
//! bit, and `hw` advances over set bits as gaps fill. Memory is `W` bits per origin whatever the traffic.
//!
//! # Where the bound costs
//! A seq beyond `hw + W` cannot be recorded without forgetting something, so the window *slides*: `hw` jumps to
//! `seq - W` and every seq it jumps over is from then on treated as seen. If one of those skipped seqs arrives
//! later (a very late first arrival), it is dropped as a [`Verdict::Duplicate`] even though it was never
//! published. That loss is the price of the bound; it is counted per window in
//! [`DedupWindow::skipped`] (seqs jumped over unseen) and [`DedupWindow::forced_advances`] (slides), so an
//! operator can see it and raise `W`. An agent that sends its queue in order never triggers it: the reorder
//! distance of the stream is what `W` must cover.
//!
//! # Seq 0
//! Queue seqs start at 1. Seq 0 is never valid: it is always `<= hw` (which starts at 0, "nothing seen") and
//! is therefore always reported as [`Verdict::Duplicate`], so a bogus 0 can never be published.
//!
//! # Incarnations
//! An origin also carries an opaque `u64` incarnation, which changes when its queue starts over (seqs restart
//! at 1). Any change, up or down, resets the origin's window. Incarnations are only compared for equality, so
//! they can be random; if stale messages of an old incarnation interleave with a new one the window resets
//! back and forth, which can let duplicates through but never drops a first arrival: in an at-least-once
//! system that is the safe side.
//!
//! # Persistence
//! [`Dedup::snapshot`] / [`Dedup::restore`] give a serde-friendly [`DedupSnapshot`], and
//! [`DedupSnapshot::encode`] / [`DedupSnapshot::decode`] a compact versioned binary form for the hub to store.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest accepted window, in seqs (bits): 1 Mi bits is 128 KiB per origin, far beyond any sane reorder
/// distance, and keeps a corrupt config or snapshot from allocating without bound.
pub const MAX_WINDOW: u32 = 1 << 20;

/// What to do with an observed `(origin, seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[must_use]
pub enum Verdict {
    /// First time this seq is seen: publish it.
    New,
    /// Seen before (or seq 0, or jumped over by a window slide): drop it.
    Duplicate,
}

/// Errors creating, restoring or decoding dedup state.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DedupError {
    /// The window size is 0 or larger than [`MAX_WINDOW`].
    #[error("dedup window of {requested} is out of range 1..={max}")]
    InvalidWindow {
        /// The size asked for.
        requested: u32,
        /// The largest size accepted.
        max: u32,
    },
    /// A snapshot names the same origin twice.
    #[error("dedup snapshot names origin {origin:?} twice")]
    DuplicateOrigin {
        /// The repeated origin.
        origin: String,
    },
    /// A snapshot records a seen seq that is not inside `hw+1 ..= hw+window` for its origin.
    #[error(
        "origin {origin:?}: seen seq {seq} is outside the window above high water {high_water}"
    )]
    SeenOutsideWindow {
        /// The origin.
        origin: String,
        /// The offending seq.
        seq: u64,
        /// The origin's recorded high-water mark.
        high_water: u64,
    },
    /// A snapshot's seen seqs are not strictly increasing.
    #[error("origin {origin:?}: seen seqs are not strictly increasing at {seq}")]
    SeenNotIncreasing {
        /// The origin.
        origin: String,
        /// The first seq that is not greater than the one before it.
        seq: u64,
    },
    /// The encoded bytes end before the field starting at `at` (of `needed` bytes) is complete.
    #[error(
        "dedup snapshot truncated: {needed} bytes needed at offset {at}, {len} available in total"
    )]
    Truncated {
        /// Offset of the incomplete field.
        at: usize,
        /// Size of that field.
        needed: usize,
        /// Total length of the input.
        len: usize,
    },
    /// The bytes do not start with the snapshot magic (`MBDD`): not a dedup snapshot at all.
    #[error("not a dedup snapshot (magic {found:?})")]
    BadMagic {
        /// The first four bytes found.
        found: [u8; 4],
    },
    /// The snapshot was written by a format version this build does not read.
    #[error("unsupported dedup snapshot version {version}")]
    UnsupportedVersion {
        /// The version byte found.
        version: u8,
    },
    /// An origin name in the encoded snapshot is not UTF-8.
    #[error("origin name at offset {at} is not UTF-8")]
    OriginNotUtf8 {
        /// Offset of the name's first byte.
        at: usize,
    },
    /// Bytes remain after the last origin.
    #[error("{extra} trailing bytes after the dedup snapshot")]
    TrailingBytes {
        /// How many bytes are left over.
        extra: usize,
    },
}

fn check_window(window: u32) -> Result<(), DedupError> {
    if window == 0 || window > MAX_WINDOW {
        return Err(DedupError::InvalidWindow {
            requested: window,
            max: MAX_WINDOW,
        });
    }
    Ok(())
}

/// Clears bits `lo..hi` of `bits` and returns how many were set.
fn clear_span(bits: &mut [u64], lo: usize, hi: usize) -> u32 {
    let mut cleared = 0;
    let mut i = lo;
    while i < hi {
        let (word, bit) = (i / 64, i % 64);
        let n = (64 - bit).min(hi - i);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        cleared += (bits[word] & mask).count_ones();
        bits[word] &= !mask;
        i += n;
    }
    cleared
}

/// The dedup state of one origin incarnation: a high-water mark plus a fixed ring of `W` bits above it.
///
/// See the [module docs](self) for the semantics and for what the bound costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupWindow {
    /// Every seq `<= hw` counts as seen. 0 means nothing seen yet.
    hw: u64,
    /// `W`: how far above `hw` a seq may arrive without forcing a slide.
    window: u32,
    /// Ring of `W` bits: seq `s` in `hw+1 ..= hw+W` is seen iff bit `s % W` is set. Bits for seqs outside that
    /// range are always clear (invariant), and so is the bit of `hw+1` (otherwise `hw` would have advanced).
    bits: Vec<u64>,
    /// Number of set bits, so draining can stop early and `pending` is O(1).
    pending: u32,
    /// How many times a seq beyond `hw + W` forced the window forward.
    forced_advances: u64,
    /// How many seqs those slides jumped over without having seen them.
    skipped: u64,
}

impl DedupWindow {
    /// An empty window (nothing seen) that tolerates reordering up to `window` seqs.
    ///
    /// # Errors
    /// [`DedupError::InvalidWindow`] if `window` is 0 or above [`MAX_WINDOW`].
    pub fn new(window: u32) -> Result<Self, DedupError> {
        check_window(window)?;
        Ok(Self::empty(window))
    }

    /// An empty window of an already checked size.
    fn empty(window: u32) -> Self {
        Self {
            hw: 0,
            window,
            bits: vec![0; (window as usize).div_ceil(64)],
            pending: 0,
            forced_advances: 0,
            skipped: 0,
        }
    }

    /// Records `seq` and says whether it is new.
    ///
    /// O(1) amortised: each seq sets and later clears at most one bit; a slide clears whole words.
    pub fn observe(&mut self, seq: u64) -> Verdict {
        if seq <= self.hw {
            return Verdict::Duplicate;
        }
        let w = u64::from(self.window);
        if seq - self.hw > w {
            self.force_advance(seq - w);
        }
        // Now hw < seq <= hw + W, so seq has a slot in the ring.
        let pos = self.pos(seq);
        if self.bit(pos) {
            return Verdict::Duplicate;
        }
        if seq == self.hw + 1 {
            self.hw = seq;
            self.drain();
        } else {
            self.bits[pos / 64] |= 1 << (pos % 64);
            self.pending += 1;
        }
        Verdict::New
    }

    /// Whether `seq` would be reported as a duplicate, without recording anything.
    #[must_use]
    pub fn is_seen(&self, seq: u64) -> bool {
        seq <= self.hw || (seq - self.hw <= u64::from(self.window) && self.bit(self.pos(seq)))
    }

    /// The high-water mark: every seq up to and including it counts as seen (0 when nothing is).
    #[must_use]
    pub fn high_water(&self) -> u64 {
        self.hw
    }

    /// `W`, the reorder distance this window absorbs without loss.
    #[must_use]
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Seqs seen above the high-water mark (waiting for a gap to fill); never more than [`window`](Self::window).
    #[must_use]
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// How many times a far-ahead seq forced the window to slide.
    #[must_use]
    pub fn forced_advances(&self) -> u64 {
        self.forced_advances
    }

    /// How many seqs slides jumped over unseen; any of them arriving later is dropped as a duplicate.
    #[must_use]
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The seen seqs above the high-water mark, ascending.
    #[must_use]
    pub fn seen_above(&self) -> Vec<u64> {
        if self.pending == 0 {
            // Also keeps `hw + 1` below from overflowing: with hw == u64::MAX nothing can be pending.
            return Vec::new();
        }
        let w = u64::from(self.window);
        let base = (self.hw + 1) % w;
        let mut out = Vec::with_capacity(self.pending as usize);
        for (word_idx, &word) in self.bits.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let pos = (word_idx * 64) as u64 + u64::from(rest.trailing_zeros());
                rest &= rest - 1;
                // Distance of this ring slot from hw+1's slot, going forward around the ring.
                let offset = (pos + w - base) % w;
                out.push(self.hw + 1 + offset);
            }
        }
        out.sort_unstable();
        out
    }

    fn pos(&self, seq: u64) -> usize {
        // < W <= MAX_WINDOW, so it fits in usize.
        (seq % u64::from(self.window)) as usize
    }

    fn bit(&self, pos: usize) -> bool {
        self.bits[pos / 64] & (1 << (pos % 64)) != 0
    }

    /// Back to "nothing seen", keeping the allocation.
    fn reset(&mut self) {
        self.bits.fill(0);
        self.hw = 0;
        self.pending = 0;
        self.forced_advances = 0;
        self.skipped = 0;
    }

    /// Advances `hw` over set bits while the next seq is one.
    fn drain(&mut self) {
        // pending > 0 means some seq above hw exists, so hw < u64::MAX and hw + 1 cannot overflow.
        while self.pending > 0 {
            let pos = self.pos(self.hw + 1);
            if !self.bit(pos) {
                break;
            }
            self.bits[pos / 64] &= !(1 << (pos % 64));
            self.pending -= 1;
            self.hw += 1;
        }
    }

    /// Slides `hw` forward to `new_hw` (> hw), treating every seq jumped over as seen.
    fn force_advance(&mut self, new_hw: u64) {
        let jump = new_hw - self.hw;
        let w = u64::from(self.window);
        let cleared = if jump >= w {
            // The whole ring is behind the new high-water mark.
            let cleared = self.pending;
            self.bits.fill(0);
            cleared
        } else {
            // Slots of hw+1 ..= new_hw: `jump` consecutive ring positions, possibly wrapping.
            let start = self.pos(self.hw + 1);
            let len = jump as usize;
            let w = self.window as usize;
            let first_end = (start + len).min(w);
            clear_span(&mut self.bits, start, first_end)
                + clear_span(&mut self.bits, 0, start + len - first_end)
        };
        self.pending -= cleared;
        self.skipped += jump - u64::from(cleared);
        self.forced_advances += 1;
        self.hw = new_hw;
        self.drain();
    }
}

/// Dedup state for every origin: one [`DedupWindow`] per origin, reset when the origin's incarnation changes.
///
/// Memory is bounded per origin; the number of origins is the number of configured sites, and
/// [`remove`](Self::remove) forgets a decommissioned one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dedup {
    window: u32,
    origins: HashMap<String, Origin>,
}

/// One origin's current incarnation and its window.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Origin {
    incarnation: u64,
    window: DedupWindow,
}

impl Dedup {
    /// Empty dedup state whose windows absorb reordering up to `window` seqs.
    ///
    /// # Errors
    /// [`DedupError::InvalidWindow`] if `window` is 0 or above [`MAX_WINDOW`].
    pub fn new(window: u32) -> Result<Self, DedupError> {
        check_window(window)?;
        Ok(Self {
            window,
            origins: HashMap::new(),
        })
    }

    /// Records `seq` from `origin` in `incarnation` and says whether it is new.
    ///
    /// A first sight of the origin, or a different incarnation than the last one seen, starts a fresh window.
    /// Allocates only on an origin's first observation.
    pub fn observe(&mut self, origin: &str, incarnation: u64, seq: u64) -> Verdict {
        if let Some(entry) = self.origins.get_mut(origin) {
            if entry.incarnation != incarnation {
                entry.incarnation = incarnation;
                entry.window.reset();
            }
            return entry.window.observe(seq);
        }
        let mut window = self.fresh_window();
        let verdict = window.observe(seq);
        self.origins.insert(
            origin.to_owned(),
            Origin {
                incarnation,
                window,
            },
        );
        verdict
    }

    fn fresh_window(&self) -> DedupWindow {
        DedupWindow::empty(self.window)
    }

    /// The origin's current incarnation and high-water mark, if it has been seen: where a reconnecting agent
    /// can resume from.
    #[must_use]
    pub fn high_water(&self, origin: &str) -> Option<(u64, u64)> {
        self.origins
            .get(origin)
            .map(|o| (o.incarnation, o.window.high_water()))
    }

    /// The origin's window, for its counters ([`DedupWindow::skipped`], ...).
    #[must_use]
    pub fn window(&self, origin: &str) -> Option<&DedupWindow> {
        self.origins.get(origin).map(|o| &o.window)
    }

    /// Forgets an origin; returns whether it was known.
    pub fn remove(&mut self, origin: &str) -> bool {
        self.origins.remove(origin).is_some()
    }

    /// Number of origins tracked.
    #[must_use]
    pub fn len(&self) -> usize {
        self.origins.len()
    }

    /// Whether no origin is tracked.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    /// The window size `W` of every origin.
    #[must_use]
    pub fn window_size(&self) -> u32 {
        self.window
    }

    /// A copy of the whole state, with origins sorted by name so equal states give equal snapshots.
    #[must_use]
    pub fn snapshot(&self) -> DedupSnapshot {
        let mut origins: Vec<OriginSnapshot> = self
            .origins
            .iter()
            .map(|(name, o)| OriginSnapshot {
                origin: name.clone(),
                incarnation: o.incarnation,
                high_water: o.window.hw,
                seen_above: o.window.seen_above(),
                forced_advances: o.window.forced_advances,
                skipped: o.window.skipped,
            })
            .collect();
        origins.sort_unstable_by(|a, b| a.origin.cmp(&b.origin));
        DedupSnapshot {
            window: self.window,
            origins,
        }
    }

    /// Rebuilds the state a snapshot was taken from; it then behaves exactly as the original would.
    ///
    /// A snapshot whose seen seqs include `high_water + 1` is accepted and normalised (the high-water mark
    /// advances over it), which does not change any verdict.
    ///
    /// # Errors
    /// [`DedupError::InvalidWindow`], [`DedupError::DuplicateOrigin`], [`DedupError::SeenOutsideWindow`] or
    /// [`DedupError::SeenNotIncreasing`] for a snapshot no [`Dedup`] could have produced.
    pub fn restore(snapshot: DedupSnapshot) -> Result<Self, DedupError> {
        let mut dedup = Self::new(snapshot.window)?;
        let w = u64::from(snapshot.window);
        for o in snapshot.origins {
            if dedup.origins.contains_key(&o.origin) {
                return Err(DedupError::DuplicateOrigin { origin: o.origin });
            }
            let mut window = dedup.fresh_window();
            window.hw = o.high_water;
            window.forced_advances = o.forced_advances;
            window.skipped = o.skipped;
            let mut prev = o.high_water;
            for &seq in &o.seen_above {
                if seq <= o.high_water || seq - o.high_water > w {
                    return Err(DedupError::SeenOutsideWindow {
                        origin: o.origin,
                        seq,
                        high_water: o.high_water,
                    });
                }
                if seq <= prev {
                    return Err(DedupError::SeenNotIncreasing {
                        origin: o.origin,
                        seq,
                    });
                }
                prev = seq;
                let pos = window.pos(seq);
                window.bits[pos / 64] |= 1 << (pos % 64);
                window.pending += 1;
            }
            window.drain();
            dedup.origins.insert(
                o.origin,
                Origin {
                    incarnation: o.incarnation,
                    window,
                },
            );
        }
        Ok(dedup)
    }
}

/// The persisted form of a [`Dedup`]: plain data, validated by [`Dedup::restore`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupSnapshot {
    /// Window size `W` shared by all origins.
    pub window: u32,
    /// One entry per origin, sorted by origin name when produced by [`Dedup::snapshot`].
    pub origins: Vec<OriginSnapshot>,
}

/// One origin's state inside a [`DedupSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginSnapshot {
    /// The origin (site) name.
    pub origin: String,
    /// Its current incarnation.
    pub incarnation: u64,
    /// Every seq up to this one counts as seen.
    pub high_water: u64,
    /// Seen seqs above `high_water`, ascending, each at most `high_water + window`.
    pub seen_above: Vec<u64>,
    /// See [`DedupWindow::forced_advances`].
    pub forced_advances: u64,
    /// See [`DedupWindow::skipped`].
    pub skipped: u64,
}

/// First bytes of an encoded snapshot.
const MAGIC: [u8; 4] = *b"MBDD";
/// Current encoding version.
const VERSION: u8 = 1;

impl DedupSnapshot {
    /// Encodes the snapshot as bytes (format version 1, all integers little-endian):
    ///
    /// ```text
    /// "MBDD" version:u8 window:u32 origin_count:u32
    /// per origin: name_len:u32 name:[u8] incarnation:u64 high_water:u64 forced_advances:u64 skipped:u64
    ///             seen_count:u32 seen:[u64; seen_count]
    /// ```
    ///
    /// There is no checksum: the store it goes into (redb) checks its own pages.
    ///
    /// # Panics
    /// If an origin name or the origin list is longer than `u32::MAX`, which [`Dedup`] cannot reach with
    /// site names and a window of at most [`MAX_WINDOW`].
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let len_u32 =
            |n: usize| u32::try_from(n).expect("invariant: lengths in a snapshot fit in u32");
        let mut out = Vec::with_capacity(
            13 + self
                .origins
                .iter()
                .map(|o| 40 + o.origin.len() + 8 * o.seen_above.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.window.to_le_bytes());
        out.extend_from_slice(&len_u32(self.origins.len()).to_le_bytes());
        for o in &self.origins {
            out.extend_from_slice(&len_u32(o.origin.len()).to_le_bytes());
            out.extend_from_slice(o.origin.as_bytes());
            for v in [o.incarnation, o.high_water, o.forced_advances, o.skipped] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&len_u32(o.seen_above.len()).to_le_bytes());
            for seq in &o.seen_above {
                out.extend_from_slice(&seq.to_le_bytes());
            }
        }
        out
    }

    /// Decodes bytes written by [`encode`](Self::encode). Total: any input gives a snapshot or an error, never
    /// a panic, and a corrupt count cannot make it allocate more than the input's size. The result still goes
    /// through [`Dedup::restore`] for semantic checks.
    ///
    /// # Errors
    /// [`DedupError::BadMagic`], [`DedupError::UnsupportedVersion`], [`DedupError::Truncated`],
    /// [`DedupError::OriginNotUtf8`] or [`DedupError::TrailingBytes`].
    pub fn decode(bytes: &[u8]) -> Result<Self, DedupError> {
        let mut r = Reader { bytes, at: 0 };
        let magic = r.array::<4>()?;
        if magic != MAGIC {
            return Err(DedupError::BadMagic { found: magic });
        }
        let [version] = r.array::<1>()?;
        if version != VERSION {
            return Err(DedupError::UnsupportedVersion { version });
        }
        let window = r.u32()?;
        let count = r.u32()? as usize;
        // Each origin takes at least 40 bytes, so a corrupt count cannot reserve more than the input allows.
        let mut origins = Vec::with_capacity(count.min(r.remaining() / 40));
        for _ in 0..count {
            let name_len = r.u32()? as usize;
            let name_at = r.at;
            let name = r.take(name_len)?;
            let origin = std::str::from_utf8(name)
                .map_err(|_| DedupError::OriginNotUtf8 { at: name_at })?
                .to_owned();
            let incarnation = r.u64()?;
            let high_water = r.u64()?;
            let forced_advances = r.u64()?;
            let skipped = r.u64()?;
            let seen_count = r.u32()? as usize;
            let mut seen_above = Vec::with_capacity(seen_count.min(r.remaining() / 8));
            for _ in 0..seen_count {
                seen_above.push(r.u64()?);
            }
            origins.push(OriginSnapshot {
                origin,
                incarnation,
                high_water,
                seen_above,
                forced_advances,
                skipped,
            });
        }
        if r.remaining() > 0 {
            return Err(DedupError::TrailingBytes {
                extra: r.remaining(),
            });
        }
        Ok(Self { window, origins })
    }
}

/// A bounds-checked cursor over the encoded bytes.
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }

    pub(super) fn take(&mut self, needed: usize) -> Result<&'a [u8], DedupError> {
        if needed > self.remaining() {
            return Err(DedupError::Truncated {
                at: self.at,
                needed,
                len: self.bytes.len(),
            });
        }
        let out = &self.bytes[self.at..self.at + needed];
        self.at += needed;
        Ok(out)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], DedupError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(super) fn u32(&mut self) -> Result<u32, DedupError> {
        self.array().map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self) -> Result<u64, DedupError> {
        self.array().map(u64::from_le_bytes)
    }
}

#[cfg(test)]
mod tests;
