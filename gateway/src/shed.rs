//! Closing connections gracefully and at a bounded rate: each agent gets a `reconnect`
//! hint (with a random delay, so agents do not come back in the same millisecond) and a
//! 1012 close. Used by the full drain (SIGTERM, `/admin/drain`), by an operator-instructed
//! drain that keeps the process alive, and by rebalancing (shed N connections).
//!
//! Frames queued before a connection's close are written before it (see the hub), so a
//! push accepted before the close is not lost.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rand::Rng;
use tether_protocol::{CloseCode, GatewayMessage};
use tokio_util::sync::CancellationToken;

use crate::hub::{Connection, Outbound};
use crate::state::AppState;

/// Sends `conn` a `reconnect` hint (jittered by `drain.reconnectJitterMs`) and closes it
/// with 1012.
pub fn hint_and_close(state: &AppState, conn: &Connection, reason: &str) {
    let after_ms = rand::rng().random_range(0..=state.config.drain.reconnect_jitter_ms);
    let hint = GatewayMessage::Reconnect {
        after_ms,
        reason: reason.into(),
    };
    // The hint may not fit a full queue; the close code alone still says "reconnect".
    let _ = conn.enqueue(
        Outbound::Text(hint.encode().into()),
        state.config.limits.outbound_queue + 1,
    );
    conn.close(CloseCode::ServiceRestart);
}

/// Closes connections taken from `next` at `per_second`, in small batches every 10 ms
/// (smooth at any rate without a timer per connection), until `next` returns `None` or
/// `until` resolves. Returns how many were closed.
pub async fn close_paced(
    state: &AppState,
    mut next: impl FnMut() -> Option<Arc<Connection>>,
    per_second: u32,
    reason: &str,
    until: impl Future<Output = ()>,
) -> usize {
    let mut until = std::pin::pin!(until);
    let per_tick = (f64::from(per_second.max(1)) / 100.0).max(1.0);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut budget = 0.0;
    let mut closed = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = &mut until => return closed,
        }
        budget += per_tick;
        while budget >= 1.0 {
            let Some(conn) = next() else {
                return closed;
            };
            budget -= 1.0;
            hint_and_close(state, &conn, reason);
            closed += 1;
        }
    }
}

/// Closes up to `count` of this pod's open connections at `drain.connectionsPerSecond`
/// (rebalancing: their agents reconnect through the Service, elsewhere). The pod is
/// unready and refuses upgrades from the first close until the last shed agent's
/// reconnect delay (`drain.reconnectJitterMs`) has passed: otherwise a Service that
/// balances at random sends a third of a three-pod pool's shed agents straight back,
/// and the excess never goes. Returns how many were closed.
pub async fn shed(state: &Arc<AppState>, count: usize, stop: &CancellationToken) -> usize {
    let mut candidates = state
        .hub
        .snapshot()
        .into_iter()
        .filter(|c| !c.is_closing())
        .take(count);
    state.shedding.store(true, Ordering::Release);
    let closed = close_paced(
        state,
        || candidates.next(),
        state.config.drain.connections_per_second,
        "rebalance",
        stop.cancelled(),
    )
    .await;
    let reconnects = Duration::from_millis(state.config.drain.reconnect_jitter_ms) + SHED_MARGIN;
    tokio::select! {
        () = tokio::time::sleep(reconnects) => {}
        () = stop.cancelled() => {}
    }
    state.shedding.store(false, Ordering::Release);
    closed
}

/// How long after its shed agents' reconnect window a pod stays closed to them: their
/// first attempt may come a little after the hinted delay.
const SHED_MARGIN: Duration = Duration::from_millis(500);

/// An operator-instructed drain: the pod turns unready and refuses new agents, then
/// closes every connection at `drain.connectionsPerSecond` — and stays up, empty, until
/// the operator removes it or `stop` is cancelled (the drain was called off). Returns
/// how many connections it closed.
pub async fn drain_in_place(state: &Arc<AppState>, stop: &CancellationToken) -> usize {
    let mut closed = 0;
    while !stop.is_cancelled() {
        let mut batch = state.hub.snapshot().into_iter().filter(|c| !c.is_closing());
        closed += close_paced(
            state,
            || batch.next(),
            state.config.drain.connections_per_second,
            "drain",
            stop.cancelled(),
        )
        .await;
        // Upgrades that were past admission when the drain started may still register;
        // look again shortly.
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = stop.cancelled() => {}
        }
    }
    closed
}
