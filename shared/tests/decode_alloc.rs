//! The wire decoder's memory stays within a small multiple of the frame it was given, whatever counts the
//! frame claims. A counting global allocator measures the peak bytes live during `parse` (this file is its
//! own test binary, so the allocator sees nothing else but the test harness, which is idle meanwhile).
//!
//! `unsafe` is allowed here only because a global allocator cannot be written without it.

#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::{BufMut, Bytes, BytesMut};
use shared::wire::parse;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts sizes on the side.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > layout.size() {
            let grow = new_size - layout.size();
            let live = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
            PEAK.fetch_max(live, Ordering::Relaxed);
        } else {
            LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Tests run on several threads, and the counters are global: each test holds this for its whole run, so
/// no other test builds its frames while one measures.
static SERIAL: Mutex<()> = Mutex::new(());

fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Peak bytes allocated (above what was live before) while parsing `frame`, and whether it parsed.
fn peak_while_parsing(frame: Bytes) -> (usize, bool) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let parsed = parse(frame);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let ok = parsed.is_ok();
    drop(parsed);
    (peak, ok)
}

/// The bound we promise: allocation within this multiple of the frame's size (plus a small constant for
/// the error value). The densest honest frames set it: an `Envelope` in memory is 272 bytes and the
/// smallest entry on the wire 27 (~10x), and a user property pair of two empty strings is 4 bytes on the
/// wire and 48 in memory (12x). A count that lies must cost no more than that.
const FACTOR: usize = 12;
const SLACK: usize = 4096;

const BATCH: u8 = 0x03;

fn frame(ty: u8, body: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(ty);
    b.put_slice(body);
    b.freeze()
}

/// An entry body with `origin`, `topic` and an optional user-property section.
fn entry_body(origin: &str, topic: &str, user_count: Option<u16>, tail: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.push(1); // body version
    let flags: u16 = 1 | if user_count.is_some() { 1 << 10 } else { 0 };
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&0u64.to_be_bytes());
    for s in [origin, topic] {
        b.extend_from_slice(&u16::try_from(s.len()).unwrap().to_be_bytes());
        b.extend_from_slice(s.as_bytes());
    }
    if let Some(n) = user_count {
        b.extend_from_slice(&n.to_be_bytes());
    }
    b.extend_from_slice(tail);
    b
}

fn push_entry(out: &mut Vec<u8>, seq: u64, body: &[u8]) {
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
    out.extend_from_slice(body);
}

fn assert_bounded(what: &str, frame: Bytes) -> bool {
    let len = frame.len();
    let (peak, ok) = peak_while_parsing(frame);
    println!(
        "{what}: frame {len} B, peak {peak} B ({:.1}x)",
        peak as f64 / len as f64
    );
    assert!(
        peak <= FACTOR * len + SLACK,
        "{what}: parsing a {len}-byte frame allocated {peak} bytes at its peak (bound {FACTOR}x + {SLACK})"
    );
    ok
}

#[test]
fn a_batch_claiming_u32_max_entries_allocates_little() {
    let _only_me = exclusive();
    // The count says four billion; the bytes hold none (zeros are not even a valid entry).
    let mut body = u32::MAX.to_be_bytes().to_vec();
    body.resize(4 + (1 << 20), 0);
    assert!(!assert_bounded(
        "count u32::MAX, 1 MiB of zeros",
        frame(BATCH, &body)
    ));

    // The count says four billion; the bytes hold one valid entry and then garbage.
    let mut body = u32::MAX.to_be_bytes().to_vec();
    push_entry(&mut body, 1, &entry_body("line1", "t", None, b"x"));
    body.resize(1 << 20, 0xff);
    assert!(!assert_bounded(
        "count u32::MAX, one entry then garbage",
        frame(BATCH, &body)
    ));
}

#[test]
fn a_batch_packed_with_the_smallest_entries_stays_within_the_bound() {
    let _only_me = exclusive();
    let entry = entry_body("", "", None, b"");
    let count = (1 << 20) / (12 + entry.len());
    let mut body = u32::try_from(count).unwrap().to_be_bytes().to_vec();
    for seq in 0..count {
        push_entry(&mut body, seq as u64, &entry);
    }
    assert!(assert_bounded(
        "smallest valid entries",
        frame(BATCH, &body)
    ));

    let entry = entry_body("a", "b", None, b"");
    let count = (1 << 20) / (12 + entry.len());
    let mut body = u32::try_from(count).unwrap().to_be_bytes().to_vec();
    for seq in 0..count {
        push_entry(&mut body, seq as u64, &entry);
    }
    assert!(assert_bounded(
        "small entries with one-byte strings",
        frame(BATCH, &body)
    ));
}

#[test]
fn user_property_counts_are_not_trusted() {
    let _only_me = exclusive();
    // One entry claiming 65,535 user properties, with the smallest possible pairs (empty strings) and then
    // a truncation; and many entries each claiming the maximum with nothing behind it.
    let mut pairs = Vec::new();
    for _ in 0..1000 {
        pairs.extend_from_slice(&[0, 0, 0, 0]);
    }
    let entry = entry_body("s", "t", Some(u16::MAX), &pairs);
    let mut body = 1u32.to_be_bytes().to_vec();
    push_entry(&mut body, 1, &entry);
    assert!(!assert_bounded(
        "one entry, 65,535 user properties claimed",
        frame(BATCH, &body)
    ));

    let entry = entry_body("", "", Some(u16::MAX), &[]);
    let count = (1 << 20) / (12 + entry.len());
    let mut body = u32::try_from(count).unwrap().to_be_bytes().to_vec();
    for seq in 0..count {
        push_entry(&mut body, seq as u64, &entry);
    }
    assert!(!assert_bounded(
        "entries each claiming 65,535 user properties",
        frame(BATCH, &body)
    ));

    // Valid: entries with the smallest user property pairs.
    let entry = entry_body("", "", Some(8), &[0; 32]);
    let count = (1 << 20) / (12 + entry.len());
    let mut body = u32::try_from(count).unwrap().to_be_bytes().to_vec();
    for seq in 0..count {
        push_entry(&mut body, seq as u64, &entry);
    }
    assert!(assert_bounded(
        "entries with 8 empty user properties each",
        frame(BATCH, &body)
    ));
}
