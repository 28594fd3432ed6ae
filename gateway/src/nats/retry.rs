//! Retrying what the bus needs at start (JetStream buckets, the durable stream,
//! subscriptions) with bounded exponential back-off and jitter.
//!
//! A gateway does not give up on the bus: JetStream may still be electing its meta
//! leader (a fresh cluster), NATS may be restarting, or not deployed yet. Each step
//! is retried until it succeeds, with a log line and a count
//! (`tether.nats.bus_retries`) per retry; the pod serves its local agents meanwhile.
//! The delays are capped so that a pod attaches within [`Backoff::max`] of NATS
//! becoming usable, and jittered so that a pool's pods do not retry in step.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tracing::warn;

/// The delays between attempts: doubling from `first`, never above `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The delay after the first failure.
    pub first: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_millis(200),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay after failure number `failures` (1 for the first), given `jitter` in
    /// `[0, 1)`: between half and all of the doubled delay ("equal jitter"), so the
    /// wait still grows while pods that failed together spread apart.
    pub fn delay(&self, failures: u32, jitter: f64) -> Duration {
        let doubled = self
            .first
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
        let ceiling = doubled.min(self.max);
        ceiling / 2 + ceiling.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
    }
}

/// Runs `attempt` until it succeeds. Each failure is logged with `what` and its error,
/// and reported to `on_retry` (a metric), before the back-off's next delay.
pub async fn until_ok<T, E, Fut>(
    what: &str,
    backoff: Backoff,
    on_retry: impl Fn(),
    mut attempt: impl FnMut() -> Fut,
) -> T
where
    E: std::fmt::Display,
    Fut: Future<Output = Result<T, E>>,
{
    let mut failures = 0u32;
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = backoff.delay(failures, rand::rng().random::<f64>());
                warn!(%error, what, failures, ?delay, "NATS not usable yet; retrying");
                on_retry();
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    const BACKOFF: Backoff = Backoff {
        first: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };

    #[test]
    fn delays_double_up_to_the_cap() {
        let without_jitter: Vec<u128> = (1..=7)
            .map(|n| BACKOFF.delay(n, 0.999_999).as_millis())
            .collect();
        assert_eq!(without_jitter, [99, 199, 399, 799, 1599, 1999, 1999]);
    }

    #[test]
    fn jitter_keeps_at_least_half_the_delay() {
        assert_eq!(BACKOFF.delay(3, 0.0), Duration::from_millis(200));
        assert_eq!(BACKOFF.delay(3, 0.5), Duration::from_millis(300));
        assert_eq!(BACKOFF.delay(40, 0.0), Duration::from_secs(1));
        // Out-of-range jitter is clamped, never a longer wait than the cap.
        assert_eq!(BACKOFF.delay(40, 7.0), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_attempt_succeeds_and_counts_each_retry() {
        let attempts = AtomicU32::new(0);
        let retries = AtomicU32::new(0);
        let value = until_ok(
            "a flaky step",
            BACKOFF,
            || {
                retries.fetch_add(1, Ordering::SeqCst);
            },
            || async {
                match attempts.fetch_add(1, Ordering::SeqCst) {
                    0..=2 => Err("timed out"),
                    n => Ok(n),
                }
            },
        )
        .await;
        assert_eq!(value, 3);
        assert_eq!(retries.load(Ordering::SeqCst), 3);
    }
}
