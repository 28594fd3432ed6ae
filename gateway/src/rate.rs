//! A token bucket for each connection's inbound message rate. Pure: the caller passes
//! the time, so tests need no clock.

use std::time::Instant;

/// Allows `rate` messages per second on average and bursts of up to `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f32,
    burst: f32,
    tokens: f32,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: rate as f32,
            burst: burst.max(1) as f32,
            tokens: burst.max(1) as f32,
            last: now,
        }
    }

    /// Gives back a token taken for a message that turned out to cost nothing against
    /// the limit (an ack the gateway was waiting for).
    pub fn refund(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }

    /// How long until a token is available, from `now` (zero if one is).
    pub fn wait(&self, now: Instant) -> std::time::Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        let tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if tokens >= 1.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::from_secs_f32((1.0 - tokens) / self.rate)
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn allows_burst_then_the_sustained_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 3, start);
        assert!((0..3).all(|_| bucket.try_take(start)));
        assert!(!bucket.try_take(start));
        // 10/s refills one token every 100 ms.
        assert!(bucket.try_take(start + Duration::from_millis(100)));
        assert!(!bucket.try_take(start + Duration::from_millis(100)));
        // A long pause refills only up to the burst.
        let later = start + Duration::from_secs(60);
        assert!((0..3).all(|_| bucket.try_take(later)));
        assert!(!bucket.try_take(later));
        // Empty: the next token comes in 1/rate.
        let wait = bucket.wait(later);
        assert!(
            wait > Duration::from_millis(90) && wait < Duration::from_millis(101),
            "{wait:?}"
        );
        assert_eq!(
            bucket.wait(later + Duration::from_millis(100)),
            Duration::ZERO
        );
    }
}
