//! A stable 64-bit hash (SipHash-2-4) for values that must agree across processes, builds and restarts: the
//! version of a pushed site config (several hubs reading one file must compute the same number) and the
//! dedup keys a hub persists in a snapshot.
//!
//! `std::collections::hash_map::DefaultHasher` is not usable for either: its algorithm is explicitly allowed to
//! change between Rust releases, which would silently change every config version after a toolchain upgrade
//! and make every persisted dedup key stale. SipHash-2-4 is specified, small, and checked below against the
//! reference test vectors of its authors.

/// The key [`stable_hash`] uses. Fixed on purpose: the point is that everybody computes the same value; the
/// hash protects against accidental collisions, not against an adversary (who could at worst make two of
/// their own messages collide).
pub const FIXED_KEY: [u64; 2] = [0x6d65_7368_6272_6964, 0x6765_2d76_6572_7331];

/// Incremental SipHash-2-4.
#[derive(Debug, Clone)]
pub struct StableHasher {
    v0: u64,
    v1: u64,
    v2: u64,
    v3: u64,
    /// Up to 7 pending bytes, little-endian.
    tail: u64,
    ntail: usize,
    length: u64,
}

impl StableHasher {
    /// A hasher keyed with `key` (`k0`, `k1`, as in the SipHash paper).
    #[must_use]
    pub const fn with_key(key: [u64; 2]) -> Self {
        let [k0, k1] = key;
        Self {
            v0: k0 ^ 0x736f_6d65_7073_6575,
            v1: k1 ^ 0x646f_7261_6e64_6f6d,
            v2: k0 ^ 0x6c79_6765_6e65_7261,
            v3: k1 ^ 0x7465_6462_7974_6573,
            tail: 0,
            ntail: 0,
            length: 0,
        }
    }

    /// A hasher keyed with [`FIXED_KEY`].
    #[must_use]
    pub const fn new() -> Self {
        Self::with_key(FIXED_KEY)
    }

    fn round(&mut self) {
        self.v0 = self.v0.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(13) ^ self.v0;
        self.v0 = self.v0.rotate_left(32);
        self.v2 = self.v2.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(16) ^ self.v2;
        self.v0 = self.v0.wrapping_add(self.v3);
        self.v3 = self.v3.rotate_left(21) ^ self.v0;
        self.v2 = self.v2.wrapping_add(self.v1);
        self.v1 = self.v1.rotate_left(17) ^ self.v2;
        self.v2 = self.v2.rotate_left(32);
    }

    fn compress(&mut self, m: u64) {
        self.v3 ^= m;
        self.round();
        self.round();
        self.v0 ^= m;
    }

    /// Feeds bytes. Feeding `ab` then `c` gives the same hash as feeding `abc`.
    pub fn write(&mut self, mut data: &[u8]) {
        self.length = self.length.wrapping_add(data.len() as u64);
        if self.ntail != 0 {
            while self.ntail < 8 {
                let Some((&byte, rest)) = data.split_first() else {
                    return;
                };
                self.tail |= u64::from(byte) << (8 * self.ntail);
                self.ntail += 1;
                data = rest;
            }
            let m = self.tail;
            self.compress(m);
            self.tail = 0;
            self.ntail = 0;
        }
        let mut chunks = data.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0; 8];
            word.copy_from_slice(chunk);
            self.compress(u64::from_le_bytes(word));
        }
        for (i, &byte) in chunks.remainder().iter().enumerate() {
            self.tail |= u64::from(byte) << (8 * i);
        }
        self.ntail = chunks.remainder().len();
    }

    /// Feeds a length-prefixed field, so that consecutive fields cannot be confused (`("ab", "c")` and
    /// `("a", "bc")` hash differently).
    pub fn write_field(&mut self, data: &[u8]) {
        self.write(&(data.len() as u64).to_le_bytes());
        self.write(data);
    }

    /// The hash of everything fed so far; the hasher can keep being fed.
    #[must_use]
    pub fn finish(&self) -> u64 {
        let mut s = self.clone();
        let b = ((s.length & 0xff) << 56) | s.tail;
        s.compress(b);
        s.v2 ^= 0xff;
        for _ in 0..4 {
            s.round();
        }
        s.v0 ^ s.v1 ^ s.v2 ^ s.v3
    }
}

impl Default for StableHasher {
    fn default() -> Self {
        Self::new()
    }
}

/// SipHash-2-4 of `data` under [`FIXED_KEY`].
#[must_use]
pub fn stable_hash(data: &[u8]) -> u64 {
    let mut h = StableHasher::new();
    h.write(data);
    h.finish()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The reference key of the SipHash paper: bytes 00..0f.
    fn paper_key() -> [u64; 2] {
        let bytes: Vec<u8> = (0..16).collect();
        let k = |r: std::ops::Range<usize>| {
            let mut w = [0; 8];
            w.copy_from_slice(&bytes[r]);
            u64::from_le_bytes(w)
        };
        [k(0..8), k(8..16)]
    }

    #[test]
    fn reference_vectors() {
        // From the SipHash paper (appendix A) and its reference implementation's vectors: message 00..0e
        // (15 bytes) and the empty message, key 00..0f.
        let message: Vec<u8> = (0..15).collect();
        let mut h = StableHasher::with_key(paper_key());
        h.write(&message);
        assert_eq!(h.finish(), 0xa129_ca61_49be_45e5);
        assert_eq!(
            StableHasher::with_key(paper_key()).finish(),
            0x726f_db47_dd0e_0e31
        );
    }

    #[test]
    fn fields_are_delimited() {
        let hash = |parts: &[&str]| {
            let mut h = StableHasher::new();
            for p in parts {
                h.write_field(p.as_bytes());
            }
            h.finish()
        };
        assert_ne!(hash(&["ab", "c"]), hash(&["a", "bc"]));
        assert_eq!(hash(&["ab", "c"]), hash(&["ab", "c"]));
    }

    proptest! {
        #[test]
        fn split_writes_equal_one_write(data in proptest::collection::vec(any::<u8>(), 0..64), cut in 0usize..64) {
            let cut = cut.min(data.len());
            let mut h = StableHasher::new();
            h.write(&data[..cut]);
            h.write(&data[cut..]);
            prop_assert_eq!(h.finish(), stable_hash(&data));
        }
    }
}
