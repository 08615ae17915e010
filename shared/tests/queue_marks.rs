//! Publisher marks commit with their batch: after a reopen the mark is there with its digest, a batch
//! without marks leaves them alone, and old marks are forgotten on request.

use shared::queue::{Mark, Queue, QueueLimits, RedbQueue};

#[test]
fn marks_commit_with_their_batch_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("q.redb");
    {
        let q = RedbQueue::open(&path, QueueLimits::default()).expect("open");
        assert_eq!(q.mark(b"client-a/7").expect("read"), None);
        q.append_marked(
            &[b"one".as_slice(), b"two".as_slice()],
            &[
                Mark {
                    key: b"client-a/7",
                    digest: 11,
                },
                Mark {
                    key: b"client-a/8",
                    digest: 12,
                },
            ],
            1_000,
        )
        .expect("append");
        q.append(&[b"three".as_slice()], 2_000).expect("append");
        // A reused packet id overwrites its mark.
        q.append_marked(
            &[b"four".as_slice()],
            &[Mark {
                key: b"client-a/8",
                digest: 13,
            }],
            3_000,
        )
        .expect("append");
    }
    let q = RedbQueue::open(&path, QueueLimits::default()).expect("reopen");
    assert_eq!(q.mark(b"client-a/7").expect("read"), Some(11));
    assert_eq!(q.mark(b"client-a/8").expect("read"), Some(13));
    assert_eq!(q.read(0, 10, usize::MAX).expect("read").len(), 4);
    assert_eq!(q.forget_marks(2_000).expect("forget"), 1);
    assert_eq!(q.mark(b"client-a/7").expect("read"), None);
    assert_eq!(q.mark(b"client-a/8").expect("read"), Some(13));
}
