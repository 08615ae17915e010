//! A deadline for `select!` loops whose deadline moves on nearly every turn.
//!
//! The link machines (`shared::link`) report their next deadline after every event: the liveness
//! deadline moves with every frame received, an acknowledgement's due time comes and goes with each
//! group. A `tokio::time::sleep_until` built afresh inside the loop registers a timer entry each turn
//! and removes it again when the `select!` drops it, at one message per turn at a factory line's rate.
//! [`Deadline`] keeps one pinned [`Sleep`] instead and moves it only when the deadline comes *earlier*
//! than the one it is armed for. A deadline that moved later lets the timer fire early once, and it
//! re-arms itself for the later one without the caller seeing it ([`Deadline::expired`] completes
//! only once the deadline the caller set last has passed).

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// One deadline, cheap to move on every turn of a loop (see the module docs).
#[derive(Debug)]
pub struct Deadline {
    sleep: Pin<Box<Sleep>>,
    /// What `sleep` is set to, while it has not fired.
    armed: Option<Instant>,
    /// The deadline the caller wants.
    wanted: Option<Instant>,
}

impl Default for Deadline {
    fn default() -> Self {
        Self::new()
    }
}

impl Deadline {
    /// A deadline that is not set. Must be created inside a tokio runtime with timers enabled.
    #[must_use]
    pub fn new() -> Self {
        // Never polled before the first `set`, which resets it; the instant here does not matter.
        Self {
            sleep: Box::pin(tokio::time::sleep_until(Instant::now())),
            armed: None,
            wanted: None,
        }
    }

    /// Sets the deadline (`None`: no deadline). Cheap when `at` is not earlier than the armed one.
    pub fn set(&mut self, at: Option<Instant>) {
        self.wanted = at;
        if let Some(at) = at {
            if self.armed.is_none_or(|armed| at < armed) {
                self.sleep.as_mut().reset(at);
                self.armed = Some(at);
            }
        }
    }

    /// Whether a deadline is set: guard a `select!` branch on [`Deadline::expired`] with it.
    #[must_use]
    pub const fn is_set(&self) -> bool {
        self.wanted.is_some()
    }

    /// Completes once the deadline last set has passed; pending forever while none is set. The caller
    /// sets a new one (or `None`) after it completed, or it completes again at once.
    pub async fn expired(&mut self) {
        poll_fn(|cx| self.poll_expired(cx)).await;
    }

    /// [`Deadline::expired`] as a poll function.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(wanted) = self.wanted else {
                return Poll::Pending;
            };
            if self.armed.is_none() {
                self.sleep.as_mut().reset(wanted);
                self.armed = Some(wanted);
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let fired_at = self.armed.take().unwrap_or(wanted);
            if fired_at >= wanted {
                // Re-armed on the next poll, should the caller leave the deadline as it is.
                return Poll::Ready(());
            }
            // Armed for an earlier deadline the caller moved later since: wait for the later one.
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Generous: these tests check order and "not before", not how punctual this machine's timers are.
    const SLACK: Duration = Duration::from_secs(2);

    /// Waits for `deadline` to expire, failing the test with `why` after [`SLACK`].
    async fn expires(deadline: &mut Deadline, why: &str) {
        tokio::time::timeout(SLACK, deadline.expired())
            .await
            .unwrap_or_else(|_| panic!("{why}"));
    }

    #[tokio::test]
    async fn fires_at_the_deadline_set_last_even_after_it_moved_later() {
        let start = Instant::now();
        let mut deadline = Deadline::new();
        deadline.set(Some(start + Duration::from_millis(10)));
        // Armed for 10 ms; moved later: it fires early inside, re-arms, and completes after 60 ms.
        deadline.set(Some(start + Duration::from_millis(60)));
        expires(&mut deadline, "the deadline passed long ago").await;
        assert!(
            start.elapsed() >= Duration::from_millis(60),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn an_earlier_deadline_moves_the_timer() {
        let start = Instant::now();
        let mut deadline = Deadline::new();
        deadline.set(Some(start + Duration::from_secs(3600)));
        deadline.set(Some(start + Duration::from_millis(5)));
        expires(&mut deadline, "the earlier deadline was not armed").await;
        assert!(start.elapsed() >= Duration::from_millis(5));
        // Left as it is, it stays expired; set again, it waits again.
        expires(
            &mut deadline,
            "an expired deadline left as it is completes at once",
        )
        .await;
        let again = Instant::now() + Duration::from_millis(30);
        deadline.set(Some(again));
        expires(&mut deadline, "the new deadline passed long ago").await;
        assert!(Instant::now() >= again);
    }

    #[tokio::test]
    async fn no_deadline_never_completes() {
        let mut deadline = Deadline::new();
        deadline.set(Some(Instant::now() + Duration::from_millis(1)));
        deadline.set(None);
        assert!(!deadline.is_set());
        let waited = tokio::time::timeout(Duration::from_millis(100), deadline.expired()).await;
        assert!(waited.is_err(), "an unset deadline completed");
    }
}
