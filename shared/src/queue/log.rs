//! The append log in front of the redb queue file: what makes a logged [`super::RedbQueue`] append durable.
//!
//! # Why a log
//! A redb commit with fsync rewrites every B-tree page the transaction touched (the batch, its index
//! entry, the meta row, a publisher mark, the table roots): measured here, about 9 block writes per
//! commit and 170–230 µs of CPU per message at one message per commit. Appending the same batch to a
//! preallocated file and calling `fdatasync` writes one or two blocks and costs about 70 µs. At a factory
//! line's rate (every message its own batch) that difference is most of the agent's CPU, so a logged
//! queue makes each append durable in this log and moves the batches into redb later, many at a time:
//! when the log is full, when the queue closes, and whenever another write transaction runs.
//!
//! # Frames
//! The file is preallocated with zeros (so an append never changes its size or block map, and
//! `fdatasync` has no metadata to write) and written from offset 0 after every durable redb commit. A
//! frame is `[magic u32][len u32][sum u64]` and `len` payload bytes: `[incarnation u64][first u64]
//! [acked u64][dropped u64][marks u32]`, per mark `[key len u32][key][digest u64]`, then the batch record
//! exactly as the redb table stores it. `sum` is [`stable_hash`] of the payload, so a frame torn by a
//! crash does not read back.
//!
//! # Replay
//! Opening the queue reads the frames from offset 0 and applies, in order, each one whose first seq is
//! the next seq redb holds; frames wholly below it are already in redb (written before the last durable
//! commit, or by a later one that happened to reach the disk) and are skipped. The scan stops at the
//! first frame that is torn, of another incarnation, or leaves a gap. Frames left from before the last
//! reset always hold lower seqs than the ones written after it, so they are skipped, never applied twice.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::hash::stable_hash;

use super::BATCH_HEADER_LEN;

/// First four bytes of every frame ("MBWL" little-endian).
const MAGIC: u32 = u32::from_le_bytes(*b"MBWL");
/// Bytes before a frame's payload: magic, length, checksum.
pub(super) const FRAME_HEADER_LEN: usize = 16;
/// Bytes of the payload before the marks: incarnation, first seq, watermark, dropped count, mark count.
const PAYLOAD_HEADER_LEN: usize = 36;

/// The log size the agent uses: about 3,000 single-message frames between redb commits at a factory
/// line's message size, and little enough that replaying a full log on open takes milliseconds.
pub const DEFAULT_LOG_BYTES: u64 = 1 << 20;

/// The bytes a frame takes in the log for a batch record of `record_len` bytes (its
/// [`super::batch_cost`]) and these marks.
pub(super) fn frame_len(record_len: u64, marks: &[super::Mark<'_>]) -> u64 {
    let marks: usize = marks.iter().map(|m| 12 + m.key.len()).sum();
    (FRAME_HEADER_LEN + PAYLOAD_HEADER_LEN + marks) as u64 + record_len
}

/// What a frame says besides the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FrameHead {
    pub incarnation: u64,
    pub first: u64,
    pub acked: u64,
    pub dropped: u64,
}

/// Starts a frame in `out` (cleared): header placeholder, payload header and marks. The caller appends
/// the batch record and then calls [`seal_frame`]. Returns the offset of the record in `out`.
pub(super) fn begin_frame(out: &mut Vec<u8>, head: FrameHead, marks: &[super::Mark<'_>]) -> usize {
    out.clear();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    out.extend_from_slice(&head.incarnation.to_le_bytes());
    out.extend_from_slice(&head.first.to_le_bytes());
    out.extend_from_slice(&head.acked.to_le_bytes());
    out.extend_from_slice(&head.dropped.to_le_bytes());
    out.extend_from_slice(&(marks.len() as u32).to_le_bytes());
    for m in marks {
        out.extend_from_slice(&(m.key.len() as u32).to_le_bytes());
        out.extend_from_slice(m.key);
        out.extend_from_slice(&m.digest.to_le_bytes());
    }
    out.len()
}

/// Fills in the header of the frame [`begin_frame`] started in `out`.
pub(super) fn seal_frame(out: &mut [u8]) {
    let payload = &out[FRAME_HEADER_LEN..];
    let len = payload.len() as u32;
    let sum = stable_hash(payload);
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&len.to_le_bytes());
    out[8..16].copy_from_slice(&sum.to_le_bytes());
}

/// One frame read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Frame<'a> {
    pub head: FrameHead,
    /// (key, digest) of each mark.
    pub marks: Vec<(&'a [u8], u64)>,
    /// The batch record, as the redb table stores it.
    pub record: &'a [u8],
}

impl Frame<'_> {
    /// Messages in the record.
    pub(super) fn count(&self) -> u64 {
        self.record
            .get(9..13)
            .and_then(|s| s.try_into().ok())
            .map_or(0, |b| u64::from(u32::from_le_bytes(b)))
    }

    /// The record's enqueue time.
    pub(super) fn enqueued_ms(&self) -> u64 {
        self.record
            .get(1..9)
            .and_then(|s| s.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    }
}

/// The valid frames at the start of `log`, in order, each with the offset just past it, up to the first
/// one that is torn, zero or does not parse. Pure: [`super::RedbQueue`] decides which of them to apply.
pub(super) fn frames(log: &[u8]) -> Vec<(usize, Frame<'_>)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while let Some(frame) = parse_at(log, &mut pos) {
        out.push((pos, frame));
    }
    out
}

fn parse_at<'a>(log: &'a [u8], pos: &mut usize) -> Option<Frame<'a>> {
    let header = log.get(*pos..*pos + FRAME_HEADER_LEN)?;
    if u32::from_le_bytes(header[0..4].try_into().ok()?) != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(header[4..8].try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(header[8..16].try_into().ok()?);
    let start = *pos + FRAME_HEADER_LEN;
    let payload = log.get(start..start.checked_add(len)?)?;
    if stable_hash(payload) != sum || payload.len() < PAYLOAD_HEADER_LEN {
        return None;
    }
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            payload.get(at..at + 8)?.try_into().ok()?,
        ))
    };
    let head = FrameHead {
        incarnation: u64_at(0)?,
        first: u64_at(8)?,
        acked: u64_at(16)?,
        dropped: u64_at(24)?,
    };
    let nmarks = u32::from_le_bytes(payload.get(32..36)?.try_into().ok()?);
    let mut at = PAYLOAD_HEADER_LEN;
    let mut marks = Vec::new();
    for _ in 0..nmarks {
        let klen = u32::from_le_bytes(payload.get(at..at + 4)?.try_into().ok()?) as usize;
        let key = payload.get(at + 4..at + 4 + klen)?;
        let digest = u64_at(at + 4 + klen)?;
        marks.push((key, digest));
        at += 4 + klen + 8;
    }
    let record = payload.get(at..)?;
    if record.len() < BATCH_HEADER_LEN {
        return None;
    }
    *pos = start + len;
    Some(Frame {
        head,
        marks,
        record,
    })
}

/// Makes `file` at least `capacity` bytes long with written zeros, durably. Not a sparse file: writing
/// into a hole allocates blocks, which every `fdatasync` would then also have to write.
pub(super) fn preallocate(file: &dyn redb::StorageBackend, capacity: u64) -> io::Result<()> {
    let len = file.len()?;
    if len >= capacity {
        return Ok(());
    }
    let zeros = vec![0u8; 64 << 10];
    let mut at = len;
    while at < capacity {
        let n = (capacity - at).min(zeros.len() as u64) as usize;
        file.write(at, &zeros[..n])?;
        at += n as u64;
    }
    file.sync_data()
}

/// The log file as a [`redb::StorageBackend`], the same interface the power-cut test models the disk
/// with, so one model covers both files.
#[derive(Debug)]
pub(super) struct LogFile(File);

impl LogFile {
    /// Opens the log at `path`, creating it if needed; a file created here has its directory entry made
    /// durable before it is used ([`preallocate`] makes its length and zeros durable).
    pub(super) fn open(path: &Path) -> io::Result<Self> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        if !existed {
            if let Some(dir) = path.parent() {
                File::open(if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                })?
                .sync_all()?;
            }
        }
        Ok(Self(file))
    }
}

impl redb::StorageBackend for LogFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(out, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write_all_at(data, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Mark;

    fn frame(head: FrameHead, marks: &[Mark<'_>], record: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        begin_frame(&mut out, head, marks);
        out.extend_from_slice(record);
        seal_frame(&mut out);
        out
    }

    fn record(now_ms: u64, bodies: &[&[u8]]) -> Vec<u8> {
        let mut r = vec![1u8];
        r.extend_from_slice(&now_ms.to_le_bytes());
        r.extend_from_slice(&(bodies.len() as u32).to_le_bytes());
        for b in bodies {
            r.extend_from_slice(&(b.len() as u32).to_le_bytes());
            r.extend_from_slice(b);
        }
        r
    }

    #[test]
    fn frames_read_back_and_stop_at_a_torn_one() {
        let head = FrameHead {
            incarnation: 7,
            first: 1,
            acked: 0,
            dropped: 0,
        };
        let marks = [Mark {
            key: b"client/1",
            digest: 99,
        }];
        let r1 = record(5, &[b"a", b"bc"]);
        let f1 = frame(head, &marks, &r1);
        assert_eq!(
            f1.len() as u64,
            frame_len(crate::queue::batch_cost(&[b"a".as_slice(), b"bc"]), &marks)
        );
        let r2 = record(6, &[b"d"]);
        let f2 = frame(
            FrameHead {
                first: 3,
                acked: 2,
                ..head
            },
            &[],
            &r2,
        );
        let mut log = [f1.clone(), f2.clone(), vec![0; 64]].concat();
        let got: Vec<Frame<'_>> = frames(&log).into_iter().map(|(_, f)| f).collect();
        assert_eq!(
            frames(&log)[1].0,
            f1.len() + f2.len(),
            "offset past each frame"
        );
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].head, head);
        assert_eq!(got[0].marks, vec![(b"client/1".as_slice(), 99)]);
        assert_eq!((got[0].count(), got[0].enqueued_ms()), (2, 5));
        assert_eq!(got[1].record, r2.as_slice());
        assert_eq!(got[1].head.acked, 2);

        // A torn second frame: the first still reads, nothing after it does.
        let torn = f1.len() + f2.len() - 3;
        log[torn] ^= 0xff;
        assert_eq!(frames(&log).len(), 1);
        // A zeroed log holds nothing.
        assert!(frames(&[0u8; 100]).is_empty());
    }
}
