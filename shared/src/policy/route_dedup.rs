//! Per-route dedup by message key, on top of the link's `(site, seq)` dedup in [`super::dedup`].
//!
//! The link dedup recognises a message an agent *resent*; it cannot recognise the same message forwarded by
//! two agents, because each agent numbers its own queue. That is the redundant pair: two agents on one site
//! broker both capture every message and both forward it. A route with `dedup` drops a message whose key was
//! already seen on that route within a time window. The key is, per route (see
//! [`crate::config::DedupKeyKind`]):
//! - `meshbridge-id`: the `meshbridge-id` user property if present, else `<origin>/<seq>`;
//! - `topic-payload`: a hash of topic and payload (what a redundant pair produces twice);
//! - `property`: a user property the publisher sets (`msg-id`); a message without it is never dropped.
//!
//! Keys are 64-bit [`StableHasher`] hashes that also cover the origin site, so one site's traffic can never
//! suppress another's, and so that a snapshot taken by one build is read correctly by the next.
//!
//! # Bounds
//! A [`KeyedDedup`] holds at most `max_keys` keys and forgets a key `window` after its first sighting (time
//! is a parameter, unix milliseconds, never read here; a persisted snapshot needs wall-clock time to mean
//! anything after a restart). When `max_keys` is reached before the window, the oldest key is forgotten
//! early and counted in [`DedupStats::forgotten_early`]: a duplicate of it then passes. In an at-least-once
//! mesh that is the safe side; the counter tells the operator to raise `max_keys`.
//!
//! A duplicate does not extend its key's life: the window runs from the first sighting, so a key seen
//! every second is still forgotten after `window` and its next copy passes once.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::dedup::{DedupError, Reader, Verdict};
use crate::config::{DedupKeyKind, RouteDedupConfig};
use crate::hash::StableHasher;

/// Counters of one route's dedup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DedupStats {
    /// Messages that passed (first sighting within the window).
    pub passed: u64,
    /// Messages dropped as duplicates (hits).
    pub dropped: u64,
    /// Messages without a key (no such property): passed without being recorded.
    pub unkeyed: u64,
    /// Keys forgotten before their window ended because `max_keys` was reached.
    pub forgotten_early: u64,
}

/// A bounded, time-windowed set of seen keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedDedup {
    window_ms: u64,
    max_keys: usize,
    /// Key → time of its first sighting in the current window.
    seen: HashMap<u64, u64>,
    /// Every recorded `(key, at)` in recording order. An entry is stale when `seen` holds a later time for the
    /// key (recorded again after expiring); stale entries are skipped when popped. `seen.len() <=
    /// order.len() <= max_keys` always.
    order: VecDeque<(u64, u64)>,
    stats: DedupStats,
}

impl KeyedDedup {
    /// An empty set remembering keys for `window`, at most `max_keys` of them (at least 1).
    #[must_use]
    pub fn new(window: Duration, max_keys: u32) -> Self {
        Self {
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            max_keys: (max_keys as usize).max(1),
            seen: HashMap::new(),
            order: VecDeque::new(),
            stats: DedupStats::default(),
        }
    }

    /// An empty set configured by a route's `dedup` section.
    #[must_use]
    pub fn from_config(config: &RouteDedupConfig) -> Self {
        Self::new(config.window, config.max_keys)
    }

    /// Records `key` seen at `now_ms` and says whether it is new. A key seen less than `window` ago is a
    /// duplicate; one seen `window` ago or earlier is new again.
    pub fn observe(&mut self, key: u64, now_ms: u64) -> Verdict {
        self.expire(now_ms);
        if let Some(&at) = self.seen.get(&key) {
            if now_ms.saturating_sub(at) < self.window_ms {
                self.stats.dropped += 1;
                return Verdict::Duplicate;
            }
        }
        self.seen.insert(key, now_ms);
        self.order.push_back((key, now_ms));
        while self.order.len() > self.max_keys {
            if let Some((old, at)) = self.order.pop_front() {
                if self.seen.get(&old) == Some(&at) {
                    self.seen.remove(&old);
                    self.stats.forgotten_early += 1;
                }
            }
        }
        self.stats.passed += 1;
        Verdict::New
    }

    /// Counts a message that had no key (it passes).
    pub fn observe_unkeyed(&mut self) {
        self.stats.unkeyed += 1;
    }

    /// Forgets every key whose window has ended at `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(&(key, at)) = self.order.front() {
            if now_ms.saturating_sub(at) < self.window_ms {
                break;
            }
            self.order.pop_front();
            if self.seen.get(&key) == Some(&at) {
                self.seen.remove(&key);
            }
        }
    }

    /// Number of keys remembered.
    #[must_use]
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no key is remembered.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> DedupStats {
        self.stats
    }

    /// Whether this set was built with these limits (a config reload can keep it as it is).
    #[must_use]
    pub fn has_limits(&self, window: Duration, max_keys: u32) -> bool {
        let other = Self::new(window, max_keys);
        self.window_ms == other.window_ms && self.max_keys == other.max_keys
    }

    /// The state as plain data: live entries oldest first, counters.
    #[must_use]
    pub fn snapshot(&self) -> KeyedDedupSnapshot {
        KeyedDedupSnapshot {
            stats: self.stats,
            entries: self
                .order
                .iter()
                .filter(|(k, at)| self.seen.get(k) == Some(at))
                .copied()
                .collect(),
        }
    }

    /// Rebuilds a set with the given limits from a snapshot; limits may differ from those the snapshot was
    /// taken with (the config changed across a restart): the newest `max_keys` entries are kept.
    #[must_use]
    pub fn restore(window: Duration, max_keys: u32, snapshot: &KeyedDedupSnapshot) -> Self {
        let mut dedup = Self::new(window, max_keys);
        dedup.stats = snapshot.stats;
        let skip = snapshot.entries.len().saturating_sub(dedup.max_keys);
        for &(key, at) in &snapshot.entries[skip..] {
            if let Some(previous) = dedup.seen.insert(key, at) {
                // A corrupt or hand-made snapshot naming a key twice: keep the later time only.
                dedup.seen.insert(key, previous.max(at));
            }
            dedup.order.push_back((key, at));
        }
        dedup
    }
}

/// The persisted form of one [`KeyedDedup`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyedDedupSnapshot {
    /// Counters at the time of the snapshot.
    pub stats: DedupStats,
    /// `(key, first seen at, unix ms)`, oldest first.
    pub entries: Vec<(u64, u64)>,
}

/// The dedup state of every route that has one, by route name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteDedups {
    routes: HashMap<String, KeyedDedup>,
}

impl RouteDedups {
    /// No state yet; each route's set is created on its first message.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `key` on `route`, creating the route's set with `config`'s limits if needed (or recreating
    /// it, keeping its entries, if the limits changed).
    pub fn observe(
        &mut self,
        route: &str,
        config: &RouteDedupConfig,
        key: Option<u64>,
        now_ms: u64,
    ) -> Verdict {
        let set = self.set_for(route, config);
        match key {
            Some(key) => set.observe(key, now_ms),
            None => {
                set.observe_unkeyed();
                Verdict::New
            }
        }
    }

    fn set_for(&mut self, route: &str, config: &RouteDedupConfig) -> &mut KeyedDedup {
        if !self.routes.contains_key(route) {
            self.routes
                .insert(route.to_owned(), KeyedDedup::from_config(config));
        }
        let set = self
            .routes
            .get_mut(route)
            .expect("invariant: inserted above");
        if !set.has_limits(config.window, config.max_keys) {
            *set = KeyedDedup::restore(config.window, config.max_keys, &set.snapshot());
        }
        set
    }

    /// Forgets routes `keep` says no longer exist (after a config reload).
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.routes.retain(|name, _| keep(name));
    }

    /// One route's set, for its counters.
    #[must_use]
    pub fn get(&self, route: &str) -> Option<&KeyedDedup> {
        self.routes.get(route)
    }

    /// Every route's counters, sorted by route name.
    #[must_use]
    pub fn stats(&self) -> Vec<(String, DedupStats)> {
        let mut all: Vec<(String, DedupStats)> = self
            .routes
            .iter()
            .map(|(name, set)| (name.clone(), set.stats()))
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// The whole state, routes sorted by name so equal states give equal snapshots.
    #[must_use]
    pub fn snapshot(&self) -> RouteDedupsSnapshot {
        let mut routes: Vec<(String, KeyedDedupSnapshot)> = self
            .routes
            .iter()
            .map(|(name, set)| (name.clone(), set.snapshot()))
            .collect();
        routes.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        RouteDedupsSnapshot { routes }
    }

    /// Rebuilds the state; each route's limits come from `config_of(route)`, and routes it does not know
    /// (removed from the config while the hub was down) are dropped.
    #[must_use]
    pub fn restore<'c>(
        snapshot: &RouteDedupsSnapshot,
        mut config_of: impl FnMut(&str) -> Option<&'c RouteDedupConfig>,
    ) -> Self {
        let mut routes = HashMap::new();
        for (name, snap) in &snapshot.routes {
            if let Some(config) = config_of(name) {
                routes.insert(
                    name.clone(),
                    KeyedDedup::restore(config.window, config.max_keys, snap),
                );
            }
        }
        Self { routes }
    }
}

/// The persisted form of a [`RouteDedups`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteDedupsSnapshot {
    /// `(route name, state)`, sorted by name when produced by [`RouteDedups::snapshot`].
    pub routes: Vec<(String, KeyedDedupSnapshot)>,
}

const MAGIC: [u8; 4] = *b"MBRD";
const VERSION: u8 = 1;
/// Bytes of one route's fixed fields (name length, four counters, entry count).
const ROUTE_FIXED: usize = 4 + 32 + 4;

impl RouteDedupsSnapshot {
    /// Encodes the snapshot (format version 1, integers little-endian):
    ///
    /// ```text
    /// "MBRD" version:u8 route_count:u32
    /// per route: name_len:u32 name:[u8] passed:u64 dropped:u64 unkeyed:u64 forgotten_early:u64
    ///            entry_count:u32 entries:[(key:u64 at_ms:u64); entry_count]
    /// ```
    ///
    /// Limits are not stored: they come from the config when the snapshot is restored.
    ///
    /// # Panics
    /// If a count exceeds `u32::MAX`, which route names and `max_keys` (at most
    /// [`MAX_DEDUP_KEYS`](crate::config::MAX_DEDUP_KEYS)) cannot reach.
    #[must_use]
    pub fn encode(&self) -> Vec<u8> {
        let len_u32 = |n: usize| u32::try_from(n).expect("invariant: snapshot counts fit in u32");
        let mut out = Vec::with_capacity(
            9 + self
                .routes
                .iter()
                .map(|(n, s)| ROUTE_FIXED + n.len() + 16 * s.entries.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&len_u32(self.routes.len()).to_le_bytes());
        for (name, snap) in &self.routes {
            out.extend_from_slice(&len_u32(name.len()).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            let s = snap.stats;
            for v in [s.passed, s.dropped, s.unkeyed, s.forgotten_early] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&len_u32(snap.entries.len()).to_le_bytes());
            for (key, at) in &snap.entries {
                out.extend_from_slice(&key.to_le_bytes());
                out.extend_from_slice(&at.to_le_bytes());
            }
        }
        out
    }

    /// Decodes bytes written by [`encode`](Self::encode). Total: any input gives a snapshot or an error, and a
    /// corrupt count cannot make it allocate beyond the input's size.
    ///
    /// # Errors
    /// [`DedupError::BadMagic`], [`DedupError::UnsupportedVersion`], [`DedupError::Truncated`],
    /// [`DedupError::OriginNotUtf8`] (a route name), [`DedupError::DuplicateOrigin`] (a route named twice) or
    /// [`DedupError::TrailingBytes`].
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
        let count = r.u32()? as usize;
        let mut routes: Vec<(String, KeyedDedupSnapshot)> =
            Vec::with_capacity(count.min(r.remaining() / ROUTE_FIXED));
        for _ in 0..count {
            let name_len = r.u32()? as usize;
            let name_at = r.at;
            let name = std::str::from_utf8(r.take(name_len)?)
                .map_err(|_| DedupError::OriginNotUtf8 { at: name_at })?
                .to_owned();
            if routes.iter().any(|(n, _)| *n == name) {
                return Err(DedupError::DuplicateOrigin { origin: name });
            }
            let stats = DedupStats {
                passed: r.u64()?,
                dropped: r.u64()?,
                unkeyed: r.u64()?,
                forgotten_early: r.u64()?,
            };
            let entry_count = r.u32()? as usize;
            let mut entries = Vec::with_capacity(entry_count.min(r.remaining() / 16));
            for _ in 0..entry_count {
                entries.push((r.u64()?, r.u64()?));
            }
            routes.push((name, KeyedDedupSnapshot { stats, entries }));
        }
        if r.remaining() > 0 {
            return Err(DedupError::TrailingBytes {
                extra: r.remaining(),
            });
        }
        Ok(Self { routes })
    }
}

/// The user property that carries a message's mesh-wide id, `<origin>/<seq>`, added by the hub.
pub const MESHBRIDGE_ID: &str = "meshbridge-id";

/// What a key is computed from.
#[derive(Debug, Clone, Copy)]
pub struct KeyInput<'a> {
    /// The origin site (or `$cloud`).
    pub origin: &'a str,
    /// The topic as received.
    pub topic: &'a str,
    /// The payload.
    pub payload: &'a [u8],
    /// The user properties.
    pub user: &'a [(String, String)],
    /// The origin's queue seq, if known.
    pub seq: Option<u64>,
}

/// The key of a message under `config`, or `None` if it has none (no such property; no id and no seq).
#[must_use]
pub fn dedup_key(config: &RouteDedupConfig, msg: &KeyInput<'_>) -> Option<u64> {
    let property = |name: &str| {
        msg.user
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let mut h = StableHasher::new();
    h.write_field(config.key.as_str().as_bytes());
    h.write_field(msg.origin.as_bytes());
    match config.key {
        DedupKeyKind::MeshbridgeId => match (property(MESHBRIDGE_ID), msg.seq) {
            (Some(id), _) => h.write_field(id.as_bytes()),
            (None, Some(seq)) => h.write_field(format!("{}/{seq}", msg.origin).as_bytes()),
            (None, None) => return None,
        },
        DedupKeyKind::TopicPayload => {
            h.write_field(msg.topic.as_bytes());
            h.write_field(msg.payload);
        }
        DedupKeyKind::Property => {
            let name = config.property.as_deref()?;
            h.write_field(property(name)?.as_bytes());
        }
    }
    Some(h.finish())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use Verdict::{Duplicate as D, New as N};

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn window_table() {
        // (window s, max_keys, [(key, now ms)], verdicts)
        type Case = (u64, u32, &'static [(u64, u64)], &'static [Verdict]);
        let cases: &[Case] = &[
            (10, 100, &[(1, 0), (1, 9_999), (1, 10_000)], &[N, D, N]),
            (10, 100, &[(1, 0), (2, 1), (1, 2), (2, 3)], &[N, N, D, D]),
            // A duplicate does not extend the window.
            (10, 100, &[(1, 0), (1, 9_000), (1, 10_000)], &[N, D, N]),
            // Count bound: key 1 forgotten early when 3 arrives; its duplicate then passes.
            (10, 2, &[(1, 0), (2, 1), (3, 2), (1, 3)], &[N, N, N, N]),
            // Clock going backwards: treated as age 0.
            (10, 100, &[(1, 5_000), (1, 1_000)], &[N, D]),
        ];
        for &(window, max, seen, verdicts) in cases {
            let mut d = KeyedDedup::new(secs(window), max);
            let got: Vec<Verdict> = seen.iter().map(|&(k, t)| d.observe(k, t)).collect();
            assert_eq!(got, verdicts, "window {window}s max {max} seen {seen:?}");
        }
        let mut d = KeyedDedup::new(secs(10), 2);
        for (k, t) in [(1, 0), (2, 1), (3, 2), (3, 3)] {
            let _ = d.observe(k, t);
        }
        assert_eq!(
            d.stats(),
            DedupStats {
                passed: 3,
                dropped: 1,
                unkeyed: 0,
                forgotten_early: 1
            }
        );
    }

    #[test]
    fn snapshot_round_trips_through_bytes() {
        let config = RouteDedupConfig {
            key: DedupKeyKind::TopicPayload,
            property: None,
            window: secs(60),
            max_keys: 10,
        };
        let mut dedups = RouteDedups::new();
        for i in 0..5 {
            let _ = dedups.observe("b-route", &config, Some(i), 1000 + i);
            let _ = dedups.observe("a-route", &config, Some(i * 7), 1000 + i);
        }
        let _ = dedups.observe("a-route", &config, None, 2000);
        let snap = dedups.snapshot();
        assert_eq!(snap.routes[0].0, "a-route");
        let bytes = snap.encode();
        let decoded = RouteDedupsSnapshot::decode(&bytes).expect("decodes");
        assert_eq!(decoded, snap);
        let restored = RouteDedups::restore(&decoded, |_| Some(&config));
        assert_eq!(restored, dedups);
        // Restored state keeps dropping what was seen.
        let mut restored = restored;
        assert_eq!(restored.observe("a-route", &config, Some(14), 3000), D);
        assert_eq!(restored.get("a-route").map(|s| s.stats().unkeyed), Some(1));
        // A route gone from the config is not restored.
        let only_a = RouteDedups::restore(&decoded, |n| (n == "a-route").then_some(&config));
        assert!(only_a.get("b-route").is_none());
    }

    #[test]
    fn decode_errors_table() {
        let good = RouteDedupsSnapshot {
            routes: vec![(
                "r".into(),
                KeyedDedupSnapshot {
                    stats: DedupStats::default(),
                    entries: vec![(1, 2)],
                },
            )],
        }
        .encode();
        let cases: Vec<(Vec<u8>, DedupError)> = vec![
            (b"XXXX".to_vec(), DedupError::BadMagic { found: *b"XXXX" }),
            (
                [&MAGIC[..], &[9]].concat(),
                DedupError::UnsupportedVersion { version: 9 },
            ),
            (
                good[..good.len() - 1].to_vec(),
                DedupError::Truncated {
                    at: good.len() - 8,
                    needed: 8,
                    len: good.len() - 1,
                },
            ),
            (
                [&good[..], &[0]].concat(),
                DedupError::TrailingBytes { extra: 1 },
            ),
        ];
        for (bytes, want) in cases {
            assert_eq!(RouteDedupsSnapshot::decode(&bytes), Err(want));
        }
    }

    #[test]
    fn keys_table() {
        let user = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        let config = |key, property: Option<&str>| RouteDedupConfig {
            key,
            property: property.map(str::to_owned),
            window: secs(1),
            max_keys: 1,
        };
        let with_id = user(&[(MESHBRIDGE_ID, "line1/7")]);
        let msg =
            |origin, topic, payload: &'static [u8], user: &'static [(String, String)], seq| {
                KeyInput {
                    origin,
                    topic,
                    payload,
                    user,
                    seq,
                }
            };
        let empty: &'static [(String, String)] = Box::leak(Box::new([]));
        let with_id: &'static [(String, String)] = Box::leak(with_id.into_boxed_slice());
        let with_msg_id: &'static [(String, String)] =
            Box::leak(user(&[("msg-id", "42")]).into_boxed_slice());

        let id = config(DedupKeyKind::MeshbridgeId, None);
        // The property wins; without it, <origin>/<seq> is the same id.
        assert_eq!(
            dedup_key(&id, &msg("line1", "t", b"a", with_id, None)),
            dedup_key(&id, &msg("line1", "t", b"b", empty, Some(7)))
        );
        assert_eq!(dedup_key(&id, &msg("line1", "t", b"a", empty, None)), None);

        let tp = config(DedupKeyKind::TopicPayload, None);
        let k = dedup_key(&tp, &msg("line1", "t", b"a", empty, Some(1)));
        assert_eq!(
            k,
            dedup_key(&tp, &msg("line1", "t", b"a", with_id, Some(2)))
        );
        assert_ne!(k, dedup_key(&tp, &msg("line1", "t", b"b", empty, Some(1))));
        assert_ne!(
            k,
            dedup_key(&tp, &msg("line2", "t", b"a", empty, Some(1))),
            "another site's identical message is not a duplicate"
        );

        let prop = config(DedupKeyKind::Property, Some("msg-id"));
        assert!(dedup_key(&prop, &msg("s", "t", b"a", with_msg_id, None)).is_some());
        assert_eq!(dedup_key(&prop, &msg("s", "t", b"a", empty, None)), None);
    }

    proptest! {
        #[test]
        fn bounded_and_agrees_with_a_model(
            window_ms in 1u64..50,
            max_keys in 1u32..20,
            steps in proptest::collection::vec((0u64..30, 0u64..10), 0..200),
        ) {
            let mut d = KeyedDedup::new(Duration::from_millis(window_ms), max_keys);
            // Model without the count bound: key -> first sighting in its current window.
            let mut model: HashMap<u64, u64> = HashMap::new();
            let mut now = 0;
            for (key, dt) in steps {
                now += dt;
                let expected = match model.get(&key) {
                    Some(&at) if now - at < window_ms => D,
                    _ => N,
                };
                let got = d.observe(key, now);
                prop_assert!(d.len() <= max_keys as usize);
                prop_assert!(d.order.len() <= max_keys as usize);
                if expected == N {
                    model.insert(key, now);
                    // Never drops a key that was not seen within the window.
                    prop_assert_eq!(got, N);
                } else if got == N {
                    // Only possible if the count bound forgot the key early; then it is recorded anew.
                    prop_assert!(d.stats().forgotten_early > 0);
                    model.insert(key, now);
                }
            }
            let snap = d.snapshot();
            let restored = KeyedDedup::restore(Duration::from_millis(window_ms), max_keys, &snap);
            prop_assert_eq!(restored.snapshot(), snap);
        }

        #[test]
        fn within_window_dropped_when_unbounded(keys in proptest::collection::vec(0u64..50, 1..100)) {
            // With room for every key and a window longer than the run, exactly the repeats are dropped.
            let mut d = KeyedDedup::new(Duration::from_secs(3600), 1000);
            let mut seen = std::collections::HashSet::new();
            for (t, key) in keys.into_iter().enumerate() {
                let want = if seen.insert(key) { N } else { D };
                prop_assert_eq!(d.observe(key, t as u64), want);
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(snap) = RouteDedupsSnapshot::decode(&bytes) {
                prop_assert_eq!(RouteDedupsSnapshot::decode(&snap.encode()), Ok(snap));
            }
        }
    }
}
