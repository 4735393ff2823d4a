//! Retry delays for calls to a shared service (identity-ca, the registry):
//! exponential with jitter (backon), so when the CA restarts the nodes do not
//! come back in lockstep, and a long outage is probed every 30 s at most
//! rather than hammered.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

/// The first retry comes after 250 ms..500 ms; each later one waits twice
/// as long, up to 30 s (plus up to as much again of jitter).
pub const MIN_DELAY: Duration = Duration::from_millis(250);
pub const MAX_DELAY: Duration = Duration::from_secs(30);

/// A retry schedule; `reset` after a success.
pub struct Backoff {
    policy: ExponentialBuilder,
    delays: ExponentialBackoff,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(MIN_DELAY, MAX_DELAY)
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let policy =
            ExponentialBuilder::default().with_min_delay(min).with_max_delay(max).with_factor(2.0).with_jitter().without_max_times();
        Self { delays: policy.build(), policy }
    }

    /// How long to wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(MAX_DELAY)
    }

    /// The call succeeded: the next failure starts from the shortest delay.
    pub fn reset(&mut self) {
        self.delays = self.policy.build();
    }

    /// Sleeps for the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_are_jittered_and_reset() {
        let mut b = Backoff::default();
        let first: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(first[0] >= MIN_DELAY && first[0] < MIN_DELAY * 2, "{first:?}");
        // Doubling (each within its jitter band) until the cap.
        for (i, d) in first.iter().enumerate().take(6) {
            let base = MIN_DELAY * 2u32.pow(i as u32);
            assert!(*d >= base && *d < base * 2, "delay {i}: {d:?} not in [{base:?}, {:?})", base * 2);
        }
        assert!(first[11] >= MAX_DELAY && first[11] < MAX_DELAY * 2, "capped: {first:?}");
        // Never gives up.
        assert!((0..100).all(|_| b.next_delay() <= MAX_DELAY * 2));
        b.reset();
        assert!(b.next_delay() < MIN_DELAY * 2);
        // Two nodes failing at the same moment do not retry in step.
        let spread: std::collections::BTreeSet<Duration> = (0..20).map(|_| Backoff::default().next_delay()).collect();
        assert!(spread.len() > 10, "jitter: {spread:?}");
    }
}
