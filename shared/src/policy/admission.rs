//! Which incoming QUIC connection attempts the hub starts a handshake for (issue 11 item 7).
//!
//! A QUIC Initial costs the sender one datagram and the hub a TLS handshake with state that lives until it
//! completes or times out, and its source address can be forged. So the hub counts handshakes in flight and
//! answers each attempt with a [`Verdict`]:
//!
//! - **Retry** (QUIC address validation, RFC 9000 §8.1): the hub keeps no state and sends a token the
//!   client must echo from its real address. A forged source never sees the token, so it never comes back.
//!   Used for unvalidated attempts once [`GateLimits::retry_above`] handshakes are in flight, and for an
//!   unvalidated attempt from a source already at its own limit.
//! - **Refuse**: only for attempts whose address is proven (they came back with a token) and that would
//!   exceed [`GateLimits::max_handshakes`] or [`GateLimits::max_per_source`]. A real peer retries later.
//! - **Accept**: start the handshake.
//!
//! Why forged Initials cannot lock real agents out: unvalidated handshakes never number more than
//! `retry_above`, which is below `max_handshakes`, so validated ones always find room; and only validated
//! handshakes count against a source's own limit, so forging an agent's address cannot use up that
//! agent's allowance. A connection slot (the hub's `listen.max_connections`) is taken only after the
//! handshake completed, so half-open handshakes never hold one.

use std::collections::HashMap;
use std::net::IpAddr;

/// The gate's limits. `retry_above < max_handshakes` is what keeps room for validated peers; see
/// [`GateLimits::new`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateLimits {
    max_handshakes: usize,
    retry_above: usize,
    max_per_source: usize,
}

/// Why [`GateLimits::new`] refused its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GateLimitsError {
    /// `retry_above` must leave room below `max_handshakes` for validated peers.
    #[error("retry_above ({retry_above}) must be below max_handshakes ({max_handshakes})")]
    NoRoomForValidated {
        /// Handshakes in flight above which unvalidated attempts get a Retry.
        retry_above: usize,
        /// Handshakes in flight at most.
        max_handshakes: usize,
    },
    /// `max_per_source` must be at least 1.
    #[error("max_per_source must be at least 1")]
    ZeroPerSource,
}

impl GateLimits {
    /// Limits with `retry_above < max_handshakes` and `max_per_source >= 1`.
    ///
    /// # Errors
    /// [`GateLimitsError`] when either does not hold.
    pub const fn new(
        max_handshakes: usize,
        retry_above: usize,
        max_per_source: usize,
    ) -> Result<Self, GateLimitsError> {
        if retry_above >= max_handshakes {
            return Err(GateLimitsError::NoRoomForValidated {
                retry_above,
                max_handshakes,
            });
        }
        if max_per_source == 0 {
            return Err(GateLimitsError::ZeroPerSource);
        }
        Ok(Self {
            max_handshakes,
            retry_above,
            max_per_source,
        })
    }

    /// Most handshakes in flight at once.
    #[must_use]
    pub const fn max_handshakes(&self) -> usize {
        self.max_handshakes
    }

    /// Handshakes in flight above which an unvalidated attempt gets a Retry instead of a handshake.
    #[must_use]
    pub const fn retry_above(&self) -> usize {
        self.retry_above
    }

    /// Most validated handshakes in flight from one source address.
    #[must_use]
    pub const fn max_per_source(&self) -> usize {
        self.max_per_source
    }
}

/// What to do with one connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start the handshake; report its end with [`HandshakeGate::finished`] and this ticket.
    Accept(Ticket),
    /// Send a QUIC Retry (stateless address validation).
    Retry,
    /// Refuse the attempt (the address is proven; the peer retries later).
    Refuse(Refusal),
}

/// Why a validated attempt was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// [`GateLimits::max_handshakes`] handshakes are in flight.
    Busy,
    /// This source has [`GateLimits::max_per_source`] validated handshakes in flight.
    SourceLimit,
}

/// A handshake the gate counted; hand it back to [`HandshakeGate::finished`] exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a ticket not handed back keeps its handshake counted"]
pub struct Ticket {
    source: IpAddr,
    validated: bool,
}

/// Handshakes in flight, in total and per validated source.
#[derive(Debug, Clone)]
pub struct HandshakeGate {
    limits: GateLimits,
    in_flight: usize,
    unvalidated: usize,
    per_source: HashMap<IpAddr, usize>,
}

impl HandshakeGate {
    /// An empty gate.
    #[must_use]
    pub fn new(limits: GateLimits) -> Self {
        Self {
            limits,
            in_flight: 0,
            unvalidated: 0,
            per_source: HashMap::new(),
        }
    }

    /// Decides on an attempt from `source`; `validated` when it carried a valid Retry token (its address
    /// is proven). An `Accept` counts the handshake until [`Self::finished`].
    pub fn decide(&mut self, source: IpAddr, validated: bool) -> Verdict {
        if !validated {
            if self.in_flight >= self.limits.retry_above
                || self.per_source.get(&source).copied().unwrap_or(0) >= self.limits.max_per_source
            {
                return Verdict::Retry;
            }
            self.in_flight += 1;
            self.unvalidated += 1;
            return Verdict::Accept(Ticket { source, validated });
        }
        if self.in_flight >= self.limits.max_handshakes {
            return Verdict::Refuse(Refusal::Busy);
        }
        let count = self.per_source.entry(source).or_insert(0);
        if *count >= self.limits.max_per_source {
            return Verdict::Refuse(Refusal::SourceLimit);
        }
        *count += 1;
        self.in_flight += 1;
        Verdict::Accept(Ticket { source, validated })
    }

    /// The handshake of `ticket` ended (completed, failed or timed out).
    pub fn finished(&mut self, ticket: Ticket) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if !ticket.validated {
            self.unvalidated = self.unvalidated.saturating_sub(1);
            return;
        }
        if let Some(count) = self.per_source.get_mut(&ticket.source) {
            *count -= 1;
            if *count == 0 {
                self.per_source.remove(&ticket.source);
            }
        }
    }

    /// Handshakes in flight.
    #[must_use]
    pub const fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Handshakes in flight whose source address is not proven.
    #[must_use]
    pub const fn unvalidated(&self) -> usize {
        self.unvalidated
    }

    /// Sources with validated handshakes in flight (the map's size: bounded by `max_handshakes`).
    #[must_use]
    pub fn sources(&self) -> usize {
        self.per_source.len()
    }

    /// The limits.
    #[must_use]
    pub const fn limits(&self) -> GateLimits {
        self.limits
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    #[test]
    fn limits_leave_room_for_validated_peers() {
        assert!(GateLimits::new(10, 10, 1).is_err());
        assert!(GateLimits::new(10, 3, 0).is_err());
        assert!(
            GateLimits::new(10, 0, 1).is_ok(),
            "retry every unvalidated attempt"
        );
    }

    /// A flood of forged Initials (unvalidated, from the agent's own address too) fills the unvalidated
    /// share and then only earns Retries; the real agent, back with a token, is accepted.
    #[test]
    fn forged_initials_cannot_lock_a_real_agent_out() {
        let mut gate = HandshakeGate::new(GateLimits::new(8, 4, 2).expect("valid"));
        let agent = ip(1);
        let mut held = Vec::new();
        for n in 0..=255 {
            for source in [ip(n), agent] {
                if let Verdict::Accept(t) = gate.decide(source, false) {
                    held.push(t);
                }
            }
        }
        assert_eq!(held.len(), 4, "unvalidated handshakes stop at retry_above");
        assert_eq!(gate.decide(agent, false), Verdict::Retry);
        assert!(matches!(gate.decide(agent, true), Verdict::Accept(_)));
        assert!(matches!(gate.decide(agent, true), Verdict::Accept(_)));
        assert_eq!(
            gate.decide(agent, true),
            Verdict::Refuse(Refusal::SourceLimit),
            "a proven source is held to its own limit"
        );
        for source in [ip(200), ip(201)] {
            assert!(matches!(gate.decide(source, true), Verdict::Accept(_)));
        }
        assert_eq!(gate.in_flight(), 8);
        assert_eq!(gate.decide(ip(202), true), Verdict::Refuse(Refusal::Busy));
        for t in held {
            gate.finished(t);
        }
        assert_eq!((gate.in_flight(), gate.unvalidated()), (4, 0));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Attempt { source: u8, validated: bool },
        Finish(prop::sample::Index),
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        let step = prop_oneof![
            (0u8..6, any::<bool>())
                .prop_map(|(source, validated)| Step::Attempt { source, validated }),
            any::<prop::sample::Index>().prop_map(Step::Finish),
        ];
        proptest::collection::vec(step, 0..300)
    }

    proptest! {
        /// Whatever arrives in whatever order: the totals stay within the limits, unvalidated handshakes
        /// never exceed `retry_above`, a validated attempt is refused only when the gate or its own source
        /// is full, and the counts return to zero once every ticket is back.
        #[test]
        fn the_gate_keeps_its_bounds(
            max in 1usize..12,
            retry_cut in any::<prop::sample::Index>(),
            per_source in 1usize..5,
            steps in steps(),
        ) {
            let retry_above = retry_cut.index(max);
            let limits = GateLimits::new(max, retry_above, per_source).expect("valid");
            let mut gate = HandshakeGate::new(limits);
            let mut held: Vec<Ticket> = Vec::new();
            let mut per: HashMap<IpAddr, usize> = HashMap::new();
            for step in steps {
                match step {
                    Step::Attempt { source, validated } => {
                        let before = gate.in_flight();
                        let own = per.get(&ip(source)).copied().unwrap_or(0);
                        match gate.decide(ip(source), validated) {
                            Verdict::Accept(t) => {
                                if validated {
                                    *per.entry(ip(source)).or_insert(0) += 1;
                                }
                                held.push(t);
                            }
                            Verdict::Retry => prop_assert!(!validated),
                            Verdict::Refuse(Refusal::Busy) => {
                                prop_assert!(validated && before >= max);
                            }
                            Verdict::Refuse(Refusal::SourceLimit) => {
                                prop_assert!(validated && own >= per_source);
                            }
                        }
                    }
                    Step::Finish(i) if !held.is_empty() => {
                        let t = held.swap_remove(i.index(held.len()));
                        if t.validated {
                            *per.get_mut(&t.source).expect("counted") -= 1;
                        }
                        gate.finished(t);
                    }
                    Step::Finish(_) => {}
                }
                prop_assert!(gate.in_flight() <= max);
                prop_assert!(gate.unvalidated() <= retry_above);
                prop_assert_eq!(gate.in_flight(), held.len());
                for (source, &n) in &per {
                    prop_assert!(n <= per_source, "{source}: {n}");
                }
            }
            for t in held.drain(..) {
                gate.finished(t);
            }
            prop_assert_eq!((gate.in_flight(), gate.unvalidated(), gate.sources()), (0, 0, 0));
        }
    }
}
