//! `quotas.maxConnections` across pods on a real nats-server: each pod counts the
//! others' announced connections; an agent over the cap is refused with 503 on any pod
//! and is not counted as scaling demand.

use super::harness::*;
use crate::common::{self, refused_status};

#[tokio::test]
async fn the_pool_connection_cap_counts_every_pod() {
    let nats = Nats::start().await;
    let cap = |c: &mut tether_config::GatewayConfig| c.quotas.max_connections = Some(3);
    let p0 = Pod::start_with(&nats, "gw-0", cap).await;
    let p1 = Pod::start_with(&nats, "gw-1", cap).await;
    let _a = p0.agent("a-1", &[]).await;
    let _b = p0.agent("a-2", &[]).await;
    let _c = p1.agent("a-3", &[]).await;
    // Once gw-1 has heard gw-0's count, the pool is full for it too.
    let router = p1.gateway.state().router.clone();
    common::eventually(|| router.connections_elsewhere() == 2).await;
    let token = common::token("a-4", &[], 3600);
    assert_eq!(refused_status(&p1.ws_url(), Some(&token)).await, 503);
    let router = p0.gateway.state().router.clone();
    common::eventually(|| router.connections_elsewhere() == 1).await;
    assert_eq!(refused_status(&p0.ws_url(), Some(&token)).await, 503);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(p1.gateway.state().refused_full.load(Relaxed), 0);
    assert_eq!(p1.gateway.state().refused_capped.load(Relaxed), 1);
}
