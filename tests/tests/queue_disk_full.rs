//! The durable queue on a full filesystem: appends fail with a typed error, nothing committed before is
//! lost, and appends work again once space is freed, on the same queue object (no reopen by the caller).
//!
//! The test mounts a small tmpfs of its own, which needs root (CI runs as root). Without root it fails under
//! `CI=true` and elsewhere skips loudly (`meshbridge_tests::prereq`).

use meshbridge_tests::prereq;
use meshbridge_tests::tmpfs::{fill, Tmpfs};
use shared::queue::{Queue, QueueError, QueueLimits, RedbQueue, DEFAULT_LOG_BYTES};

fn body(seq: u64) -> Vec<u8> {
    let mut b = seq.to_le_bytes().to_vec();
    b.resize(2_000, seq as u8);
    b
}

fn read_all(q: &RedbQueue) -> Vec<(u64, Vec<u8>)> {
    q.read(0, usize::MAX, usize::MAX)
        .expect("read")
        .into_iter()
        .map(|e| (e.seq, e.body.to_vec()))
        .collect()
}

#[test]
fn disk_full_is_a_typed_error_and_loses_nothing() {
    if prereq::needs_root(
        "disk_full_is_a_typed_error_and_loses_nothing",
        "mount a tmpfs",
    ) {
        return;
    }
    disk_full_run(false);
}

/// The same for a queue opened as the agent opens it. Its append log is preallocated, so appends go on
/// while the log has room and fail, with the same typed error, when moving the log into the full file
/// does; reads still work (they write nothing), and everything comes back once space is freed.
#[test]
fn disk_full_on_a_logged_queue_is_a_typed_error_and_loses_nothing() {
    if prereq::needs_root(
        "disk_full_on_a_logged_queue_is_a_typed_error_and_loses_nothing",
        "mount a tmpfs",
    ) {
        return;
    }
    disk_full_run(true);
}

fn disk_full_run(logged: bool) {
    let fs = Tmpfs::mount("16m").expect("mount tmpfs as root");
    let path = fs.dir.join("queue.redb");
    let open = || {
        if logged {
            RedbQueue::open_logged(&path, QueueLimits::default(), DEFAULT_LOG_BYTES)
        } else {
            RedbQueue::open(&path, QueueLimits::default())
        }
    };
    let q = open().expect("open");

    // Leave ~3 MiB free, then append until the disk is full.
    let free_target = 3 << 20;
    fill(
        &fs.dir.join("ballast"),
        (16 << 20) - (2 << 20) - free_target,
    );
    let mut committed = Vec::new();
    let mut full = None;
    for _ in 0..10_000 {
        let start = q.stats().next_seq;
        let bodies: Vec<Vec<u8>> = (start..start + 16).map(body).collect();
        match q.append(&bodies, 1) {
            Ok(o) => committed.extend((o.first_seq..=o.last_seq).map(|s| (s, body(s)))),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let err = full.expect("the filesystem filled up");
    assert!(
        matches!(err, QueueError::DiskFull { .. }),
        "typed disk-full error, got {err:?}"
    );
    assert!(
        !committed.is_empty(),
        "some appends fit before the disk filled"
    );
    assert!(
        err.to_string().contains("disk full"),
        "clear message: {err}"
    );

    // What was committed reads back whole. The queue reopens its file after the failed write, which may
    // free a page or two: keep appending until it is refused again, with the same typed error.
    assert_eq!(read_all(&q), committed, "nothing committed was lost");
    let again = (0..1_000)
        .find_map(|_| {
            let start = q.stats().next_seq;
            let bodies: Vec<Vec<u8>> = (start..start + 16).map(body).collect();
            match q.append(&bodies, 2) {
                Ok(o) => {
                    committed.extend((o.first_seq..=o.last_seq).map(|s| (s, body(s))));
                    None
                }
                Err(e) => Some(e),
            }
        })
        .expect("still full");
    assert!(
        matches!(again, QueueError::DiskFull { .. }),
        "got {again:?}"
    );
    assert_eq!(read_all(&q), committed, "nothing committed was lost");

    // Free the space: the same queue accepts appends again.
    std::fs::remove_file(fs.dir.join("ballast")).expect("free space");
    let start = q.stats().next_seq;
    assert_eq!(
        start,
        committed.len() as u64 + 1,
        "failed appends took no seqs"
    );
    let o = q
        .append(&[body(start)], 3)
        .expect("append after space freed");
    committed.push((o.first_seq, body(o.first_seq)));
    assert_eq!(read_all(&q), committed);

    drop(q);
    let q = open().expect("reopen");
    assert_eq!(read_all(&q), committed, "everything survives reopen");
}
