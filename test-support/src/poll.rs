//! Waiting for a condition: tests wait on state, never on fixed sleeps.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How often a condition is checked. Short enough not to slow tests down, long enough
/// that a condition which asks a server (the API stand-in, a gateway's stats) does not
/// load a two-core machine.
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// A condition that did not hold in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {within:?} waiting for {what}")]
pub struct TimedOut {
    /// What was awaited (the caller's words).
    pub what: String,
    /// How long it was given.
    pub within: Duration,
}

/// Polls `f` until it returns `Some`, for at most `within`; the error names `what`.
///
/// For callers that report rather than panic (the e2e harness, `tether-local`).
pub async fn try_eventually<T, F, Fut>(
    what: &str,
    within: Duration,
    mut f: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.to_owned(),
                within,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Polls `f` until it returns `Some` and returns that; panics naming `what` after
/// `within`.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    try_eventually(what, within, f)
        .await
        .unwrap_or_else(|timed_out| panic!("{timed_out}"))
}

/// Polls a synchronous condition (in-process state) until it holds; panics naming
/// `what` after `within`.
pub async fn until(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    eventually(what, within, || {
        std::future::ready(condition().then_some(()))
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn returns_the_value_once_the_condition_holds() {
        let calls = AtomicU32::new(0);
        let v = eventually("three calls", PATIENCE, || async {
            (calls.fetch_add(1, Ordering::SeqCst) == 2).then_some("done")
        })
        .await;
        assert_eq!(v, "done");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn times_out_naming_what_was_awaited() {
        let err = try_eventually("never", Duration::from_secs(1), || async { None::<()> })
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "timed out after 1s waiting for never");
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "waiting for a flag")]
    async fn until_panics_when_the_condition_never_holds() {
        until("a flag", Duration::from_secs(1), || false).await;
    }
}
