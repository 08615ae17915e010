//! Helpers shared by meshbridge's end-to-end tests, and the small driver programs they start as child
//! processes (see `src/bin/`).

/// Length of the bodies the queue crash driver writes.
pub const CRASH_BODY_LEN: usize = 200;

/// The body the crash driver writes for `seq`: the seq in the first 8 bytes, then a pattern derived from
/// it, so a reader can tell a misplaced or torn entry from the right one.
pub fn crash_body(seq: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(CRASH_BODY_LEN);
    b.extend_from_slice(&seq.to_le_bytes());
    b.extend((8..CRASH_BODY_LEN).map(|i| (seq as usize).wrapping_mul(31).wrapping_add(i) as u8));
    b
}
