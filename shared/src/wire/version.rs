//! Protocol versions and their negotiation.
//!
//! The agent offers a range in `Hello`; the hub picks the highest version both speak and names it in
//! `Welcome`, or answers `GoAway { code: IncompatibleVersion, reason }` with the [`VersionMismatch`] text as
//! the reason, so the operator sees both ranges on both sides.

use std::fmt;

use super::VersionMismatch;

/// The protocol version this build speaks best. Version 3 added the hub's software version to `Welcome`
/// (see the version table in the [module docs](super)).
pub const PROTOCOL_VERSION: u16 = 3;

/// The oldest version this build speaks: the one before [`PROTOCOL_VERSION`]. Each release speaks its own
/// version and the one before, so a fleet upgrades one side at a time: hub first or agents first, an agent
/// and a hub one version apart agree on the older one. Version 1 is not spoken at all: a version 1 peer
/// cannot state or learn the path's limits (the version table in the [module docs](super)).
pub const OLDEST_SUPPORTED: u16 = 2;

/// Every protocol version this build can speak.
pub const SUPPORTED: VersionRange = VersionRange {
    min: OLDEST_SUPPORTED,
    max: PROTOCOL_VERSION,
};

impl VersionRange {
    /// [`SUPPORTED`] capped at `max` (`uplink.max_protocol_version`, `listen.max_protocol_version`): during
    /// a rolling upgrade an operator may hold the new build to the old version until every peer speaks the
    /// new one. A cap outside [`SUPPORTED`] gives an empty range (the config's rules refuse it first).
    #[must_use]
    pub const fn supported_up_to(max: u16) -> Self {
        Self {
            min: OLDEST_SUPPORTED,
            max: if max < PROTOCOL_VERSION {
                max
            } else {
                PROTOCOL_VERSION
            },
        }
    }
}

/// An inclusive range of protocol versions. A range with `min > max` is empty: it is representable because
/// it arrives from the network, and negotiating with it always fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VersionRange {
    /// Lowest version spoken.
    pub min: u16,
    /// Highest version spoken.
    pub max: u16,
}

impl VersionRange {
    /// Whether `version` lies in the range; the agent uses it to check the version a `Welcome` names.
    pub const fn contains(self, version: u16) -> bool {
        self.min <= version && version <= self.max
    }

    /// Whether the range holds no version at all.
    pub const fn is_empty(self) -> bool {
        self.min > self.max
    }
}

impl fmt::Display for VersionRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// Picks the highest version both sides speak.
///
/// The parameters are named by role rather than "ours/theirs" because the operation is symmetric and the
/// error must say which side speaks what: the hub calls `negotiate(hello.versions, SUPPORTED)`.
pub fn negotiate(agent: VersionRange, hub: VersionRange) -> Result<u16, VersionMismatch> {
    let low = agent.min.max(hub.min);
    let high = agent.max.min(hub.max);
    if low <= high {
        Ok(high)
    } else {
        Err(VersionMismatch { agent, hub })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn r(min: u16, max: u16) -> VersionRange {
        VersionRange { min, max }
    }

    #[test]
    fn negotiation_table() {
        let cases: &[(VersionRange, VersionRange, Option<u16>)] = &[
            (r(1, 1), r(1, 1), Some(1)),
            // Overlaps pick the highest common version, whichever side is newer.
            (r(1, 3), r(2, 5), Some(3)),
            (r(2, 5), r(1, 3), Some(3)),
            (r(1, 5), r(2, 3), Some(3)),
            (r(2, 3), r(1, 5), Some(3)),
            (r(3, 3), r(1, 3), Some(3)),
            (r(1, 3), r(3, 3), Some(3)),
            // Disjoint both ways.
            (r(2, 3), r(1, 1), None),
            (r(1, 1), r(2, 3), None),
            // Empty ranges never negotiate, even when they "overlap" the other side's bounds.
            (r(3, 2), r(1, 5), None),
            (r(1, 5), r(3, 2), None),
            (r(u16::MAX, u16::MAX), r(0, u16::MAX), Some(u16::MAX)),
            (r(0, 0), r(0, 0), Some(0)),
        ];
        for &(agent, hub, want) in cases {
            let got = negotiate(agent, hub);
            assert_eq!(got.ok(), want, "negotiate(agent {agent}, hub {hub})");
            if want.is_none() {
                assert_eq!(got, Err(VersionMismatch { agent, hub }));
            }
            // The chosen version is always one both sides accept.
            if let Some(v) = want {
                assert!(agent.contains(v) && hub.contains(v));
            }
        }
    }

    #[test]
    fn mismatch_text_names_both_ranges_by_role() {
        let err = negotiate(r(2, 3), r(1, 1)).expect_err("disjoint");
        assert_eq!(
            err.to_string(),
            "no common protocol version: agent speaks 2..=3, hub speaks 1..=1"
        );
        let err = negotiate(r(1, 1), r(2, 3)).expect_err("disjoint");
        assert_eq!(
            err.to_string(),
            "no common protocol version: agent speaks 1..=1, hub speaks 2..=3"
        );
    }

    #[test]
    fn supported_contains_protocol_version() {
        assert!(SUPPORTED.contains(PROTOCOL_VERSION));
        assert!(!SUPPORTED.is_empty());
        assert_eq!(negotiate(SUPPORTED, SUPPORTED), Ok(PROTOCOL_VERSION));
    }

    #[test]
    fn a_version_1_peer_is_refused_with_both_ranges() {
        let v1 = r(1, 1);
        let err = negotiate(v1, SUPPORTED).expect_err("v1 agent");
        assert_eq!(
            err.to_string(),
            "no common protocol version: agent speaks 1..=1, hub speaks 2..=3"
        );
        assert!(negotiate(SUPPORTED, v1).is_err(), "v1 hub");
        // A peer one release ahead (3..=4) or behind (1..=2 would be refused; 2..=2 is served).
        assert_eq!(negotiate(r(3, 4), SUPPORTED), Ok(3));
        assert_eq!(negotiate(r(2, 2), SUPPORTED), Ok(2));
    }

    #[test]
    fn a_cap_holds_a_side_to_an_older_version() {
        assert_eq!(VersionRange::supported_up_to(PROTOCOL_VERSION), SUPPORTED);
        assert_eq!(VersionRange::supported_up_to(u16::MAX), SUPPORTED);
        let previous = VersionRange::supported_up_to(OLDEST_SUPPORTED);
        assert_eq!(previous, r(OLDEST_SUPPORTED, OLDEST_SUPPORTED));
        assert_eq!(negotiate(previous, SUPPORTED), Ok(OLDEST_SUPPORTED));
        assert!(VersionRange::supported_up_to(OLDEST_SUPPORTED - 1).is_empty());
    }
}
