//! The QUIC accept loop: the handshake gate, then a connection slot, then one task per agent connection.
//!
//! Each attempt goes through [`shared::policy::admission::HandshakeGate`] (see there for why forged
//! Initials cannot lock real agents out): a QUIC Retry for unproven sources under load, a refusal for
//! proven ones over the limits, or a handshake bounded by `listen.handshake_timeout`. Only a completed
//! handshake takes one of the `listen.max_connections` slots; without one, the agent is closed with
//! `Overloaded` and retries with backoff.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use quinn::{Endpoint, VarInt};
use shared::policy::admission::{GateLimits, HandshakeGate, Refusal, Ticket, Verdict};
use shared::wire::GoAwayCode;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::agent_conn::{self, Hub, Stops};
use crate::metrics::AcceptCounters;

/// At most one summary of refused or retried attempts per this period (a flood must not flood the log).
const SUMMARY_EVERY: Duration = Duration::from_secs(10);

/// The accept loop's limits (`listen.*` in the hub config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AcceptLimits {
    /// Agent connections at once (`listen.max_connections`).
    pub(crate) max_connections: usize,
    /// The handshake gate's limits.
    pub(crate) gate: GateLimits,
    /// How long a handshake may take.
    pub(crate) handshake_timeout: Duration,
}

/// Refusals and Retries since the last summary line.
#[derive(Debug, Default)]
struct Summary {
    retried: u64,
    busy: u64,
    source: u64,
    /// When the last summary was logged; the first refusal or Retry is logged at once.
    logged: Option<Instant>,
}

impl Summary {
    fn note(&mut self, verdict: Verdict, limits: GateLimits) {
        match verdict {
            Verdict::Retry => self.retried += 1,
            Verdict::Refuse(Refusal::Busy) => self.busy += 1,
            Verdict::Refuse(Refusal::SourceLimit) => self.source += 1,
            Verdict::Accept(_) => return,
        }
        let now = Instant::now();
        if self
            .logged
            .is_some_and(|at| now.duration_since(at) < SUMMARY_EVERY)
        {
            return;
        }
        if self.busy + self.source > 0 {
            warn!(
                retried = self.retried,
                refused_busy = self.busy,
                refused_source = self.source,
                max_handshakes = limits.max_handshakes(),
                max_per_source = limits.max_per_source(),
                "QUIC handshakes at their limits; attempts refused (counted in meshbridge_quic_attempts_total)"
            );
        } else {
            info!(
                retried = self.retried,
                retry_above = limits.retry_above(),
                "QUIC address validation engaged: unproven sources get a Retry"
            );
        }
        *self = Self {
            logged: Some(now),
            ..Self::default()
        };
    }
}

/// Accepts agents until `stops.shutdown` is cancelled or the endpoint closes.
pub(crate) async fn accept_loop(
    endpoint: &Endpoint,
    hub: &Arc<Hub>,
    limits: AcceptLimits,
    counters: AcceptCounters,
    stops: &Stops,
    tracker: &TaskTracker,
) {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let gate = Arc::new(Mutex::new(HandshakeGate::new(limits.gate)));
    let mut summary = Summary::default();
    loop {
        let incoming = tokio::select! {
            () = stops.shutdown.cancelled() => return,
            incoming = endpoint.accept() => match incoming {
                Some(incoming) => incoming,
                None => return,
            },
        };
        let remote = incoming.remote_address();
        let validated = incoming.remote_address_validated();
        let verdict = gate
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .decide(remote.ip(), validated);
        summary.note(verdict, limits.gate);
        let ticket = match verdict {
            Verdict::Accept(ticket) => ticket,
            Verdict::Retry => {
                counters.retry.inc();
                // Only an attempt that already came back with a token cannot be retried, and those are
                // validated, which never gets here.
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            Verdict::Refuse(why) => {
                match why {
                    Refusal::Busy => counters.refused_busy.inc(),
                    Refusal::SourceLimit => counters.refused_source.inc(),
                };
                debug!(%remote, ?why, "QUIC attempt refused");
                incoming.refuse();
                continue;
            }
        };
        counters.handshake.inc();
        counters.in_flight.inc();
        let (hub, stops) = (Arc::clone(hub), stops.clone());
        let (gate, permits, counters) = (Arc::clone(&gate), Arc::clone(&permits), counters.clone());
        tracker.spawn(async move {
            let handshake =
                tokio::time::timeout(
                    limits.handshake_timeout,
                    async move { incoming.accept()?.await },
                )
                .await;
            finish(&gate, ticket, &counters);
            let conn = match handshake {
                Ok(Ok(conn)) => conn,
                Ok(Err(error)) => {
                    counters.failed.inc();
                    warn!(%remote, cause = %error, "agent handshake failed");
                    return;
                }
                Err(_) => {
                    counters.timed_out.inc();
                    debug!(%remote, timeout = ?limits.handshake_timeout, "handshake timed out");
                    return;
                }
            };
            counters.completed.inc();
            let Ok(permit) = permits.try_acquire_owned() else {
                counters.over_limit.inc();
                warn!(
                    %remote,
                    limit = limits.max_connections,
                    "agent connection limit reached; closing (the agent retries later)"
                );
                conn.close(
                    VarInt::from_u32(GoAwayCode::Overloaded.code().into()),
                    b"hub at its connection limit",
                );
                return;
            };
            agent_conn::serve(hub, conn, stops).await;
            drop(permit);
        });
    }
}

fn finish(gate: &Mutex<HandshakeGate>, ticket: Ticket, counters: &AcceptCounters) {
    gate.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .finished(ticket);
    counters.in_flight.dec();
}
