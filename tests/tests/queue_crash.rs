//! The durable queue under `kill -9`: a child process appends in a loop and prints each seq after the append
//! returned; it is killed with SIGKILL at random moments, 20 times, on the same file. After each kill the
//! file must open (redb's automatic recovery, nothing by hand) and every printed seq above the recovered
//! watermark must be there, in order, with its own body.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use meshbridge_tests::crash_body;
use shared::queue::{Queue, QueueLimits, RedbQueue, DEFAULT_LOG_BYTES};

const KILLS: usize = 20;

#[test]
fn every_acknowledged_append_survives_sigkill() {
    sigkill_rounds(false);
}

/// The same with the queue opened as the agent opens it: appends durable in its append log, moved into
/// redb later. Every other round the checker opens it without the log option, which must replay the log
/// just the same.
#[test]
fn every_acknowledged_append_to_a_logged_queue_survives_sigkill() {
    sigkill_rounds(true);
}

fn sigkill_rounds(logged: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crash.redb");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    let mut max_appended = 0u64;
    let mut max_acked = 0u64;
    let mut recoveries = 0;
    let mut replayed = 0;
    for round in 0..KILLS {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut child = Command::new(env!("CARGO_BIN_EXE_queue-writer"))
            .arg(&path)
            .arg((seed >> 1).to_string())
            .args(logged.then_some("logged"))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn queue-writer");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Let it make progress first (opening after a crash includes recovery), then kill it at a random
        // moment: 5 to 200 ms after its first acknowledged append.
        let first = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("writer made no progress");
        let mut lines = vec![first];
        let deadline = Instant::now() + Duration::from_millis(5 + (seed >> 33) % 195);
        while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            lines.push(l);
            if Instant::now() >= deadline {
                break;
            }
        }
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        reader.join().expect("reader thread");
        lines.extend(rx.try_iter());
        for l in &lines {
            let (kind, n) = l.split_once(' ').expect("line format");
            let n: u64 = n.parse().expect("seq");
            match kind {
                "A" => max_appended = max_appended.max(n),
                "K" => max_acked = max_acked.max(n),
                other => panic!("unexpected line kind {other}"),
            }
        }

        let q = if logged && round % 2 == 0 {
            RedbQueue::open_logged(&path, QueueLimits::default(), DEFAULT_LOG_BYTES)
        } else {
            RedbQueue::open(&path, QueueLimits::default())
        }
        .expect("queue opens after SIGKILL");
        recoveries += usize::from(q.repaired_on_open());
        replayed += q.replayed_on_open();
        let s = q.stats();
        assert!(
            s.next_seq > max_appended,
            "round {round}: acknowledged seq {max_appended} missing (next_seq {})",
            s.next_seq
        );
        assert!(
            s.acked <= max_acked,
            "round {round}: watermark {} beyond any ack {max_acked}",
            s.acked
        );
        let all = q.read(0, usize::MAX, usize::MAX).expect("read back");
        assert_eq!(
            all.first().map(|e| e.seq),
            Some(s.acked + 1),
            "round {round}: first stored seq"
        );
        for (i, e) in all.iter().enumerate() {
            assert_eq!(
                e.seq,
                s.acked + 1 + i as u64,
                "round {round}: gap or reorder at {}",
                e.seq
            );
            assert_eq!(
                e.body.as_ref(),
                crash_body(e.seq).as_slice(),
                "round {round}: body of {}",
                e.seq
            );
        }
        assert!(all.last().map_or(0, |e| e.seq) >= max_appended);
    }
    // Most kills land mid-loop, so the file was open: recovery must have run at least once, which shows
    // the test exercised crashed files rather than only clean ones.
    assert!(recoveries > 0, "no kill left the file needing recovery");
    if logged {
        // Killed mid-loop, the writer leaves appends that only its log holds: replay must have run.
        assert!(replayed > 0, "no kill left appends in the log to replay");
    }
}
