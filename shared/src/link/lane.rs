//! Priority lanes: how a route's `priority` is kept on a link whose acknowledgements are cumulative.
//!
//! The link acknowledges a queue up to a seq (`Ack{upto}`, and the hub's dedup high-water mark per origin),
//! so within one queue nothing may overtake an earlier message: sending seq 90 before seq 10 would make the
//! hub's mark skip 10. A priority therefore gets its own sequence space: a *lane*, one durable queue and
//! one connection per priority in use (0, the default, is the queue and connection every agent has). At the
//! hub a lane is an origin of its own ([`origin`]): its own resume mark, dedup window, live-connection
//! slot and `meshbridge-id` prefix, the same way a redundant pair's members are told apart.
//!
//! Lanes are drained in strict priority, as route priorities are in Azure IoT Edge's store-and-forward: a
//! lane starts no new batch while a higher lane that is connected still has something to send
//! ([`outranked`]). A higher lane that is not connected holds nothing back, so a lane that a hub refuses
//! cannot leave the others stuck. Within a lane, order is capture order.
//!
//! Both directions use lanes: the agent's uplink queues, and the hub's per-site downlink queues (a
//! downlink or site-to-site route's priority picks the lane; the site's pushed config lists the lanes it
//! must connect, see `crate::config::effective`).

use std::borrow::Cow;

use crate::config::MAX_PRIORITY;

/// Highest lane: the highest route priority.
pub const MAX_LANE: u8 = MAX_PRIORITY;

/// The separator between an origin and its lane; not a character of site or agent names
/// (`crate::site::SiteId`), so a lane's origin never equals a site's or a pair member's.
pub const LANE_SEPARATOR: char = '+';

/// The origin a lane's messages carry at the hub: `base` for lane 0, `base+p<lane>` otherwise.
#[must_use]
pub fn origin(base: &str, lane: u8) -> Cow<'_, str> {
    if lane == 0 {
        Cow::Borrowed(base)
    } else {
        Cow::Owned(format!("{base}{LANE_SEPARATOR}p{lane}"))
    }
}

/// The file-name suffix of a lane's queue next to lane 0's (`queue.redb` → `queue+p7.redb`): empty for
/// lane 0, so the default lane keeps the file it always had.
#[must_use]
pub fn file_suffix(lane: u8) -> String {
    if lane == 0 {
        String::new()
    } else {
        format!("{LANE_SEPARATOR}p{lane}")
    }
}

/// The lane a file stem names, if it is `prefix` followed by a lane's [`file_suffix`] (lane 0 included).
#[must_use]
pub fn from_file_stem(stem: &str, prefix: &str) -> Option<u8> {
    let rest = stem.strip_prefix(prefix)?;
    if rest.is_empty() {
        return Some(0);
    }
    let digits = rest.strip_prefix(LANE_SEPARATOR)?.strip_prefix('p')?;
    if digits.starts_with('0') {
        return None;
    }
    let lane: u8 = digits.parse().ok()?;
    (1..=MAX_LANE).contains(&lane).then_some(lane)
}

/// The seq a lane's refused entry is filed under in the site's one dead-letter store, which keeps one
/// letter per seq: the lane in the top byte (queue seqs never reach 2^56), so lanes do not collide.
#[must_use]
pub const fn dead_letter_seq(lane: u8, seq: u64) -> u64 {
    ((lane as u64) << 56) | (seq & ((1 << 56) - 1))
}

/// The lane and queue seq of a seq [`dead_letter_seq`] made.
#[must_use]
pub const fn split_dead_letter_seq(filed: u64) -> (u8, u64) {
    ((filed >> 56) as u8, filed & ((1 << 56) - 1))
}

/// The bit of `lane` in a busy mask.
#[must_use]
pub const fn bit(lane: u8) -> u16 {
    1 << lane
}

/// Sets or clears `lane`'s bit in `mask`; whether the mask changed (for `watch::Sender::send_if_modified`).
pub fn mark(mask: &mut u16, lane: u8, busy: bool) -> bool {
    let new = if busy {
        *mask | bit(lane)
    } else {
        *mask & !bit(lane)
    };
    std::mem::replace(mask, new) != new
}

/// Whether a lane above `lane` is busy in `busy` (a mask of [`bit`]s): connected, with something left to
/// send. `lane` then starts no new batch.
#[must_use]
pub const fn outranked(busy: u16, lane: u8) -> bool {
    busy >> (lane + 1) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_zero_keeps_the_base_names() {
        assert_eq!(origin("line1", 0), "line1");
        assert_eq!(origin("line1/a", 7), "line1/a+p7");
        assert_eq!(file_suffix(0), "");
        assert_eq!(file_suffix(9), "+p9");
    }

    #[test]
    fn file_stems_round_trip_and_refuse_strangers() {
        for lane in 0..=MAX_LANE {
            let stem = format!("queue{}", file_suffix(lane));
            assert_eq!(from_file_stem(&stem, "queue"), Some(lane), "{stem}");
        }
        for stem in [
            "queue+p0",
            "queue+p10",
            "queue+p07",
            "queue+q1",
            "queue-p1",
            "queues",
            "dead",
        ] {
            assert_eq!(from_file_stem(stem, "queue"), None, "{stem}");
        }
    }

    #[test]
    fn dead_letter_seqs_of_lanes_never_collide() {
        assert_eq!(dead_letter_seq(0, 42), 42, "lane 0 files its own seqs");
        assert_ne!(dead_letter_seq(7, 42), dead_letter_seq(0, 42));
        assert_ne!(dead_letter_seq(7, 42), dead_letter_seq(9, 42));
        assert_eq!(split_dead_letter_seq(dead_letter_seq(7, 42)), (7, 42));
    }

    #[test]
    fn marking_reports_a_change_only_once() {
        let mut mask = 0;
        assert!(mark(&mut mask, 3, true));
        assert!(!mark(&mut mask, 3, true));
        assert_eq!(mask, bit(3));
        assert!(mark(&mut mask, 3, false));
        assert!(!mark(&mut mask, 3, false));
        assert_eq!(mask, 0);
    }

    #[test]
    fn only_a_higher_busy_lane_outranks() {
        assert!(!outranked(0, 0));
        assert!(!outranked(bit(0), 0), "a lane does not hold itself back");
        assert!(!outranked(bit(3), 5), "nor is it held back by a lower one");
        assert!(outranked(bit(7), 5));
        assert!(outranked(bit(9), 0));
        assert!(!outranked(bit(9), 9));
    }
}
