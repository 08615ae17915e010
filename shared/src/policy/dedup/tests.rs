use std::collections::{BTreeSet, HashSet};

use proptest::prelude::*;

use super::*;
use Verdict::{Duplicate as D, New as N};

fn window(w: u32) -> DedupWindow {
    DedupWindow::new(w).expect("test window size is valid")
}

fn observe_all(win: &mut DedupWindow, seqs: &[u64]) -> Vec<Verdict> {
    seqs.iter().map(|&s| win.observe(s)).collect()
}

#[test]
fn window_table() {
    // (W, observed seqs, verdicts, final hw, pending, forced_advances, skipped)
    type Case = (u32, &'static [u64], &'static [Verdict], u64, u32, u64, u64);
    let cases: &[Case] = &[
        (8, &[0], &[D], 0, 0, 0, 0),
        (8, &[1, 2, 3], &[N, N, N], 3, 0, 0, 0),
        (8, &[1, 1, 2, 1, 2], &[N, D, N, D, D], 2, 0, 0, 0),
        (8, &[3, 2, 3], &[N, N, D], 0, 2, 0, 0),
        (8, &[3, 2, 1], &[N, N, N], 3, 0, 0, 0),
        (8, &[8, 8, 1], &[N, D, N], 1, 1, 0, 0),
        // 9 is 9 above hw 0 with W = 8: slides to hw 1, skipping seq 1.
        (8, &[9, 1, 2], &[N, D, N], 2, 1, 1, 1),
        // W = 4: 1 then 10 slides hw 1 -> 6 (2..=6 skipped), 5 dropped, 7..9 fill up to 10.
        (
            4,
            &[1, 10, 5, 7, 8, 9, 10],
            &[N, N, D, N, N, N, D],
            10,
            0,
            1,
            5,
        ),
        // Seen seqs inside the jumped range are not counted as skipped; 5 above the new hw 4 drains.
        (8, &[3, 5, 12], &[N, N, N], 5, 1, 1, 3),
        // A jump far beyond the ring clears it all.
        (8, &[2, 3, 1000, 3, 999], &[N, N, N, D, N], 992, 2, 1, 990),
        // W = 1 keeps no gap: every out-of-order seq slides.
        (1, &[1, 3, 2, 4], &[N, N, D, N], 4, 0, 1, 1),
        // The ring wraps (W = 65 is not a multiple of 64): 131 reuses the slot 66 had.
        (
            65,
            &[1, 66, 130, 2, 65, 131],
            &[N, N, N, D, D, N],
            66,
            2,
            1,
            64,
        ),
    ];
    for &(w, seqs, verdicts, hw, pending, forced, skipped) in cases {
        let mut win = window(w);
        let got = observe_all(&mut win, seqs);
        let ctx = format!("W={w} seqs={seqs:?}");
        assert_eq!(got, verdicts, "{ctx}");
        assert_eq!(win.high_water(), hw, "hw, {ctx}");
        assert_eq!(win.pending(), pending, "pending, {ctx}");
        assert_eq!(win.forced_advances(), forced, "forced_advances, {ctx}");
        assert_eq!(win.skipped(), skipped, "skipped, {ctx}");
        assert_eq!(
            win.seen_above().len(),
            pending as usize,
            "seen_above, {ctx}"
        );
    }
}

#[test]
fn seqs_near_u64_max_do_not_overflow() {
    let mut win = window(4);
    assert_eq!(win.observe(u64::MAX), N);
    assert_eq!(win.observe(u64::MAX), D);
    assert_eq!(win.high_water(), u64::MAX - 4);
    assert_eq!(win.skipped(), u64::MAX - 4);
    assert_eq!(win.observe(u64::MAX - 1), N);
    assert_eq!(win.seen_above(), [u64::MAX - 1, u64::MAX]);
    for seq in u64::MAX - 3..=u64::MAX - 2 {
        assert_eq!(win.observe(seq), N);
    }
    assert_eq!(win.high_water(), u64::MAX);
    assert_eq!(win.pending(), 0);
    assert!(win.is_seen(u64::MAX));
}

#[test]
fn is_seen_does_not_record() {
    let mut win = window(8);
    assert_eq!(observe_all(&mut win, &[1, 4]), [N, N]);
    let probes: &[(u64, bool)] = &[
        (0, true),
        (1, true),
        (2, false),
        (4, true),
        (9, false),
        (100, false),
    ];
    for &(seq, want) in probes {
        assert_eq!(win.is_seen(seq), want, "is_seen({seq})");
    }
    assert_eq!(
        win.forced_advances(),
        0,
        "probing beyond the window must not slide it"
    );
}

#[test]
fn window_size_bounds() {
    let invalid = |requested| {
        Err(DedupError::InvalidWindow {
            requested,
            max: MAX_WINDOW,
        })
    };
    assert_eq!(DedupWindow::new(0).map(|_| ()), invalid(0));
    assert_eq!(
        DedupWindow::new(MAX_WINDOW + 1).map(|_| ()),
        invalid(MAX_WINDOW + 1)
    );
    assert_eq!(Dedup::new(0).map(|_| ()), invalid(0));
    assert_eq!(
        DedupWindow::new(MAX_WINDOW).map(|w| w.window()),
        Ok(MAX_WINDOW)
    );
    assert_eq!(DedupWindow::new(1).map(|w| w.window()), Ok(1));
}

#[test]
fn origins_are_independent_and_incarnations_reset() {
    let mut d = Dedup::new(16).expect("valid window");
    assert!(d.is_empty());
    /// (origin, incarnation, seq, verdict, `high_water` after)
    type Step = (&'static str, u64, u64, Verdict, (u64, u64));
    let steps: &[Step] = &[
        ("line1", 7, 1, N, (7, 1)),
        ("line1", 7, 2, N, (7, 2)),
        ("line2", 3, 1, N, (3, 1)),
        ("line1", 7, 2, D, (7, 2)),
        ("line2", 3, 2, N, (3, 2)),
        // The queue of line1 started over: seqs restart at 1 and are new again.
        ("line1", 8, 1, N, (8, 1)),
        ("line1", 8, 1, D, (8, 1)),
        // A stale message from the old incarnation resets back: at-least-once errs toward duplicates.
        ("line1", 7, 2, N, (7, 0)),
        ("line1", 7, 1, N, (7, 2)),
        ("line2", 3, 2, D, (3, 2)),
    ];
    for (i, &(origin, inc, seq, verdict, hw)) in steps.iter().enumerate() {
        assert_eq!(d.observe(origin, inc, seq), verdict, "step {i}");
        assert_eq!(d.high_water(origin), Some(hw), "step {i}");
    }
    assert_eq!(d.len(), 2);
    assert_eq!(d.high_water("line3"), None);
    assert!(d.remove("line2"));
    assert!(!d.remove("line2"));
    assert_eq!(d.observe("line2", 3, 1), N, "a removed origin starts over");
    assert_eq!(d.window("line1").map(DedupWindow::pending), Some(0));
}

#[test]
fn incarnation_reset_clears_counters() {
    let mut d = Dedup::new(4).expect("valid window");
    assert_eq!(d.observe("a", 1, 100), N);
    assert_eq!(d.window("a").map(DedupWindow::skipped), Some(96));
    assert_eq!(d.observe("a", 2, 1), N);
    let win = d.window("a").expect("known origin");
    assert_eq!(
        (win.skipped(), win.forced_advances(), win.high_water()),
        (0, 0, 1)
    );
}

fn sample_dedup() -> Dedup {
    let mut d = Dedup::new(100).expect("valid window");
    for (origin, inc, seq) in [
        ("b", 2, 1),
        ("b", 2, 5),
        ("a", 9, 1),
        ("a", 9, 2),
        ("a", 9, 4),
        ("c", 1, 300),
    ] {
        let _ = d.observe(origin, inc, seq);
    }
    d
}

#[test]
fn snapshot_is_sorted_and_complete() {
    let snap = sample_dedup().snapshot();
    let want = DedupSnapshot {
        window: 100,
        origins: vec![
            OriginSnapshot {
                origin: "a".into(),
                incarnation: 9,
                high_water: 2,
                seen_above: vec![4],
                forced_advances: 0,
                skipped: 0,
            },
            OriginSnapshot {
                origin: "b".into(),
                incarnation: 2,
                high_water: 1,
                seen_above: vec![5],
                forced_advances: 0,
                skipped: 0,
            },
            OriginSnapshot {
                origin: "c".into(),
                incarnation: 1,
                high_water: 200,
                seen_above: vec![300],
                forced_advances: 1,
                skipped: 200,
            },
        ],
    };
    assert_eq!(snap, want);
    assert_eq!(Dedup::restore(snap).map(|d| d.snapshot()), Ok(want));
}

#[test]
fn snapshot_round_trips_through_serde() {
    let snap = sample_dedup().snapshot();
    let text = toml::to_string(&snap).expect("serializes");
    let back: DedupSnapshot = toml::from_str(&text).expect("deserializes");
    assert_eq!(back, snap);
}

#[test]
fn encoding_is_stable() {
    let snap = DedupSnapshot {
        window: 64,
        origins: vec![OriginSnapshot {
            origin: "s1".into(),
            incarnation: 5,
            high_water: 3,
            seen_above: vec![7],
            forced_advances: 1,
            skipped: 2,
        }],
    };
    let mut want = b"MBDD\x01".to_vec();
    want.extend_from_slice(&64u32.to_le_bytes());
    want.extend_from_slice(&1u32.to_le_bytes());
    want.extend_from_slice(&2u32.to_le_bytes());
    want.extend_from_slice(b"s1");
    for v in [5u64, 3, 1, 2] {
        want.extend_from_slice(&v.to_le_bytes());
    }
    want.extend_from_slice(&1u32.to_le_bytes());
    want.extend_from_slice(&7u64.to_le_bytes());
    assert_eq!(snap.encode(), want);
    assert_eq!(DedupSnapshot::decode(&want), Ok(snap));
}

#[test]
fn decode_errors() {
    let good = sample_dedup().snapshot().encode();
    let mut bad_utf8 = good.clone();
    bad_utf8[17] = 0xff; // first byte of the first origin name
    let mut huge_count = good[..9].to_vec();
    huge_count.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0, 0]);
    let cases: Vec<(&str, Vec<u8>, DedupError)> = vec![
        (
            "empty",
            vec![],
            DedupError::Truncated {
                at: 0,
                needed: 4,
                len: 0,
            },
        ),
        (
            "bad magic",
            b"MBDX\x01".to_vec(),
            DedupError::BadMagic { found: *b"MBDX" },
        ),
        (
            "future version",
            b"MBDD\x02".to_vec(),
            DedupError::UnsupportedVersion { version: 2 },
        ),
        (
            "cut in the header",
            good[..7].to_vec(),
            DedupError::Truncated {
                at: 5,
                needed: 4,
                len: 7,
            },
        ),
        (
            "cut in the last seen seq",
            good[..good.len() - 1].to_vec(),
            DedupError::Truncated {
                at: good.len() - 8,
                needed: 8,
                len: good.len() - 1,
            },
        ),
        (
            "name not utf-8",
            bad_utf8,
            DedupError::OriginNotUtf8 { at: 17 },
        ),
        (
            "count far beyond the input",
            huge_count,
            DedupError::Truncated {
                at: 13,
                needed: 4,
                len: 13,
            },
        ),
        (
            "trailing bytes",
            trailing,
            DedupError::TrailingBytes { extra: 2 },
        ),
    ];
    for (what, bytes, want) in cases {
        assert_eq!(DedupSnapshot::decode(&bytes), Err(want), "{what}");
    }
}

#[test]
fn restore_rejects_impossible_snapshots() {
    let origin = |name: &str, high_water, seen_above: Vec<u64>| OriginSnapshot {
        origin: name.into(),
        incarnation: 1,
        high_water,
        seen_above,
        forced_advances: 0,
        skipped: 0,
    };
    let snap = |window, origins| DedupSnapshot { window, origins };
    let cases: Vec<(&str, DedupSnapshot, DedupError)> = vec![
        (
            "zero window",
            snap(0, vec![]),
            DedupError::InvalidWindow {
                requested: 0,
                max: MAX_WINDOW,
            },
        ),
        (
            "duplicate origin",
            snap(8, vec![origin("a", 1, vec![]), origin("a", 2, vec![])]),
            DedupError::DuplicateOrigin { origin: "a".into() },
        ),
        (
            "seen at high water",
            snap(8, vec![origin("a", 5, vec![5])]),
            DedupError::SeenOutsideWindow {
                origin: "a".into(),
                seq: 5,
                high_water: 5,
            },
        ),
        (
            "seen beyond the window",
            snap(8, vec![origin("a", 5, vec![7, 14])]),
            DedupError::SeenOutsideWindow {
                origin: "a".into(),
                seq: 14,
                high_water: 5,
            },
        ),
        (
            "seen out of order",
            snap(8, vec![origin("a", 5, vec![9, 7])]),
            DedupError::SeenNotIncreasing {
                origin: "a".into(),
                seq: 7,
            },
        ),
        (
            "seen twice",
            snap(8, vec![origin("a", 5, vec![7, 7])]),
            DedupError::SeenNotIncreasing {
                origin: "a".into(),
                seq: 7,
            },
        ),
    ];
    for (what, snapshot, want) in cases {
        assert_eq!(Dedup::restore(snapshot).map(|_| ()), Err(want), "{what}");
    }
}

#[test]
fn restore_normalises_a_filled_gap() {
    let snap = DedupSnapshot {
        window: 8,
        origins: vec![OriginSnapshot {
            origin: "a".into(),
            incarnation: 1,
            high_water: 5,
            seen_above: vec![6, 7, 9],
            forced_advances: 0,
            skipped: 0,
        }],
    };
    let d = Dedup::restore(snap).expect("valid snapshot");
    assert_eq!(d.high_water("a"), Some((1, 7)));
    assert_eq!(d.window("a").map(DedupWindow::seen_above), Some(vec![9]));
}

/// The obvious unbounded-structure implementation of the same semantics, to check the ring against.
struct Model {
    w: u64,
    hw: u64,
    seen: BTreeSet<u64>,
    forced_advances: u64,
    skipped: u64,
}

impl Model {
    fn new(w: u32) -> Self {
        Self {
            w: u64::from(w),
            hw: 0,
            seen: BTreeSet::new(),
            forced_advances: 0,
            skipped: 0,
        }
    }

    fn observe(&mut self, seq: u64) -> Verdict {
        if seq <= self.hw || self.seen.contains(&seq) {
            return D;
        }
        if seq > self.hw + self.w {
            let new_hw = seq - self.w;
            let seen_jumped = self.seen.range(..=new_hw).count() as u64;
            self.skipped += new_hw - self.hw - seen_jumped;
            self.seen = self.seen.split_off(&(new_hw + 1));
            self.hw = new_hw;
            self.forced_advances += 1;
        }
        self.seen.insert(seq);
        while self.seen.remove(&(self.hw + 1)) {
            self.hw += 1;
        }
        N
    }
}

/// One step of a random observation stream, relative to the largest seq so far.
#[derive(Debug, Clone)]
enum Step {
    /// The next seq after the largest so far.
    Next,
    /// Jump ahead by this much (may force a slide).
    Ahead(u64),
    /// This far behind the largest seq (a replay or a late arrival).
    Behind(u64),
    /// An absolute seq, including 0.
    At(u64),
}

fn steps(w: u32) -> impl Strategy<Value = Vec<Step>> {
    let w = u64::from(w);
    prop::collection::vec(
        prop_oneof![
            4 => Just(Step::Next),
            2 => (1..=3 * w).prop_map(Step::Ahead),
            3 => (0..=2 * w).prop_map(Step::Behind),
            1 => (0..=4 * w).prop_map(Step::At),
        ],
        0..300,
    )
}

fn to_seqs(steps: &[Step]) -> Vec<u64> {
    let mut top = 0u64;
    steps
        .iter()
        .map(|step| {
            let seq = match *step {
                Step::Next => top + 1,
                Step::Ahead(k) => top + k,
                Step::Behind(k) => top.saturating_sub(k),
                Step::At(s) => s,
            };
            top = top.max(seq);
            seq
        })
        .collect()
}

fn window_sizes() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(1u32),
        Just(3),
        Just(64),
        Just(65),
        Just(100),
        Just(130)
    ]
}

proptest! {
    /// (1) With every seq displaced by less than W from its place, the first arrival of each seq passes, nothing
    /// is skipped, and every replay is dropped.
    #[test]
    fn first_occurrences_pass_within_the_window(
        (w, offsets) in window_sizes()
            .prop_flat_map(|w| (Just(w), prop::collection::vec(0..u64::from(w), 0..400))),
        replays in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..50),
    ) {
        // Sorting by seq + offset (offset < W) means every seq <= s - W arrives before s, so s always lands
        // inside hw + W.
        let mut order: Vec<u64> = (1..=offsets.len() as u64).collect();
        order.sort_by_key(|&s| s + offsets[(s - 1) as usize]);
        let mut stream = order.clone();
        for (what, when) in &replays {
            if order.is_empty() {
                break;
            }
            let seq = order[what.index(order.len())];
            // Insert the replay somewhere after its first arrival, so the first arrivals keep their order.
            let first = stream.iter().position(|&x| x == seq).expect("every seq is in the stream");
            let at = first + 1 + when.index(stream.len() - first);
            stream.insert(at, seq);
        }
        let mut win = window(w);
        let mut seen = HashSet::new();
        for &seq in &stream {
            let want = if seen.insert(seq) { N } else { D };
            prop_assert_eq!(win.observe(seq), want, "seq {}", seq);
        }
        prop_assert_eq!(win.skipped(), 0);
        prop_assert_eq!(win.forced_advances(), 0);
        prop_assert_eq!(win.high_water(), offsets.len() as u64);
        prop_assert_eq!(win.pending(), 0);
    }

    /// (2) and (3): on arbitrary streams (replays, gaps, far jumps, zeros) the ring agrees with the unbounded
    /// model, any seq observed before is dropped, and the state never holds more than W seqs above hw.
    #[test]
    fn replays_are_dropped_and_memory_is_bounded(
        (w, steps) in window_sizes().prop_flat_map(|w| (Just(w), steps(w))),
    ) {
        let mut win = window(w);
        let mut model = Model::new(w);
        let mut observed = HashSet::new();
        let words = win.bits.len();
        for seq in to_seqs(&steps) {
            let verdict = win.observe(seq);
            prop_assert_eq!(verdict, model.observe(seq), "seq {}", seq);
            if !observed.insert(seq) {
                prop_assert_eq!(verdict, D, "replay of {} passed", seq);
            }
            prop_assert_eq!(win.high_water(), model.hw);
            prop_assert!(win.pending() <= w);
            prop_assert_eq!(win.bits.len(), words, "the ring never grows");
            prop_assert_eq!(win.pending() as usize, model.seen.len());
            prop_assert_eq!((win.forced_advances(), win.skipped()), (model.forced_advances, model.skipped));
        }
        prop_assert_eq!(win.seen_above(), model.seen.iter().copied().collect::<Vec<_>>());
    }

    /// (4) A restored snapshot (directly or through the byte encoding) continues exactly like the original.
    #[test]
    fn restore_continues_identically(
        w in window_sizes(),
        prefix in prop::collection::vec((0usize..3, 0u64..2, 0u64..400), 0..200),
        suffix in prop::collection::vec((0usize..3, 0u64..2, 0u64..400), 0..200),
    ) {
        const ORIGINS: [&str; 3] = ["line1", "line2", "line10"];
        let mut original = Dedup::new(w).expect("valid window");
        for &(o, inc, seq) in &prefix {
            let _ = original.observe(ORIGINS[o], inc, seq);
        }
        let snap = original.snapshot();
        let mut restored = Dedup::restore(snap.clone()).expect("own snapshot restores");
        let decoded = DedupSnapshot::decode(&snap.encode()).expect("own encoding decodes");
        prop_assert_eq!(&decoded, &snap);
        let mut from_bytes = Dedup::restore(decoded).expect("decoded snapshot restores");
        prop_assert_eq!(&restored, &original);
        for &(o, inc, seq) in &suffix {
            let want = original.observe(ORIGINS[o], inc, seq);
            prop_assert_eq!(restored.observe(ORIGINS[o], inc, seq), want);
            prop_assert_eq!(from_bytes.observe(ORIGINS[o], inc, seq), want);
        }
        prop_assert_eq!(restored.snapshot(), original.snapshot());
        prop_assert_eq!(from_bytes.snapshot(), original.snapshot());
    }

    /// Decoding never panics on arbitrary or corrupted bytes.
    #[test]
    fn decode_is_total(bytes in prop::collection::vec(any::<u8>(), 0..200), flip in any::<prop::sample::Index>()) {
        let _ = DedupSnapshot::decode(&bytes);
        let mut good = sample_dedup().snapshot().encode();
        let i = flip.index(good.len());
        good[i] ^= 0xa5;
        if let Ok(snap) = DedupSnapshot::decode(&good) {
            let _ = Dedup::restore(snap);
        }
    }
}
