//! Helpers shared by meshbridge's end-to-end tests, and the small driver programs they start as child
//! processes (see `src/bin/`).
//!
//! The end-to-end tests run the real `cloud-hub` and `edge-agent` binaries (built by
//! `cargo build --workspace --bins`, which `scripts/test.sh` does) on ephemeral loopback ports:
//!
//! - [`bins`]: where those binaries are; [`net`]: free ports; [`mesh`]: a test's directory + PKI and
//!   starting programs from specs.
//! - [`pki`]: a throw-away CA with hub and site certificates, plus the bad ones (expired, not yet valid,
//!   from another CA).
//! - [`spec`]: hub and agent config files written from builders.
//! - [`process`]: a started program with its log captured, readiness, SIGTERM and SIGKILL.
//! - [`mosquitto`]: Debian's Mosquitto on a free port; [`cloud`]: an in-process broker that outlives hub
//!   restarts.
//! - [`proxy`]: a UDP proxy between agent and hub that drops, delays, duplicates, reorders or blackholes
//!   packets per direction on command.
//! - [`faults`]: what the fault tests share: a hub publishing into a cloud broker that outlives it, waiting
//!   for every acknowledged message, and the one-line scenario summary.
//! - [`prereq`]: what a test needs beyond cargo (root, Mosquitto), failing under `CI=true` when missing.
//! - [`tmpfs`]: a small tmpfs to fill a disk on purpose (root).
//! - [`netns`]: a network namespace behind a veth pair whose uplink `tc` can slow down (root).
//! - [`mqtt`]: a publisher that knows exactly which messages were acknowledged, a collecting subscriber,
//!   and the [`mqtt::Report`] that compares the two.

pub mod bins;
pub mod cloud;
pub mod faults;
pub mod mesh;
pub mod metrics;
pub mod mosquitto;
pub mod mqtt;
pub mod net;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod prereq;
pub mod process;
pub mod proxy;
pub mod spec;
pub mod tmpfs;

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
