//! Fan-out writes most frames straight to idle sockets (no queue, no task wake): each
//! agent still gets every broadcast, group send and push in the order they were made,
//! whether it reads at once or only once its socket buffers are full (frames then go
//! in part to the socket and the rest through the queue); agents that go away in the
//! middle of broadcasts are skipped and counted, and leave nothing behind.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tether_protocol::GatewayMessage;

use crate::common::*;

/// The `n` of every push envelope the agent reads until it has `count`.
async fn read_numbers(ws: &mut Ws, count: usize) -> Vec<u64> {
    let mut numbers = Vec::with_capacity(count);
    while numbers.len() < count {
        match next_message(ws).await {
            GatewayMessage::Push { data, .. } => {
                let data: Value = serde_json::from_str(data.get()).expect("json data");
                numbers.push(data["n"].as_u64().expect("a number"));
            }
            other => panic!("expected a push, got {other:?}"),
        }
    }
    numbers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_gets_every_fan_out_and_push_in_order_even_when_it_reads_late() {
    const AGENTS: usize = 10;
    const ROUNDS: u64 = 90;
    let gw = TestGateway::start_with(|c| c.limits.outbound_queue = 10_000).await;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(gw.agent(&format!("order-{i}"), &["all"]).await);
    }
    // Even agents read as the frames come; odd ones only after the last send, so
    // their socket buffers fill and frames go out in part, the rest queued.
    let (late, early): (Vec<_>, Vec<_>) = agents
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 1);
    // Each round: a broadcast, a group send, then a push to one agent.
    let expected = |i: usize| -> Vec<u64> {
        (0..ROUNDS)
            .flat_map(|n| {
                let mine = (n as usize) % AGENTS == i;
                [Some(3 * n), Some(3 * n + 1), mine.then_some(3 * n + 2)]
            })
            .flatten()
            .collect()
    };
    let readers: Vec<_> = early
        .into_iter()
        .map(|(i, mut ws)| {
            let want = expected(i);
            tokio::spawn(async move {
                let got = read_numbers(&mut ws, want.len()).await;
                assert_eq!(got, want, "agent {i}");
                ws
            })
        })
        .collect();

    let pad = "x".repeat(30_000);
    for n in 0..ROUNDS {
        let response = gw
            .post("/v1/broadcast", json!({"n": 3 * n, "pad": pad}))
            .await;
        assert_eq!(response.status(), 202);
        assert_eq!(
            response.json::<Value>().await.unwrap()["delivered"],
            AGENTS as u64
        );
        let response = gw
            .post(
                "/v1/groups/all/messages",
                json!({"n": 3 * n + 1, "pad": pad}),
            )
            .await;
        assert_eq!(
            response.json::<Value>().await.unwrap()["delivered"],
            AGENTS as u64
        );
        let agent = (n as usize) % AGENTS;
        let response = gw
            .post(
                &format!("/v1/agents/order-{agent}/messages"),
                json!({"n": 3 * n + 2}),
            )
            .await;
        assert_eq!(response.status(), 202, "push {n}");
    }
    let mut kept = Vec::new();
    for reader in readers {
        kept.push(reader.await.expect("an early reader"));
    }
    for (i, mut ws) in late {
        let want = expected(i);
        assert_eq!(read_numbers(&mut ws, want.len()).await, want, "agent {i}");
        kept.push(ws);
    }
    gw.wait_for_connections(AGENTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_gone_in_the_middle_of_broadcasts_are_skipped_and_leave_nothing_behind() {
    const AGENTS: usize = 120;
    const BROADCASTS: u64 = 40;
    let gw = TestGateway::start().await;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(gw.agent(&format!("gone-{i}"), &[]).await);
    }
    let (leaving, staying): (Vec<_>, Vec<_>) = agents
        .into_iter()
        .enumerate()
        .partition(|(i, _)| i % 2 == 0);
    let staying: Vec<_> = staying
        .into_iter()
        .map(|(i, mut ws)| {
            tokio::spawn(async move {
                let got = read_numbers(&mut ws, BROADCASTS as usize).await;
                assert_eq!(got, (0..BROADCASTS).collect::<Vec<_>>(), "agent {i}");
                ws
            })
        })
        .collect();
    // Half the agents vanish — sockets dropped without a close handshake, some
    // after reading a little — while the broadcasts go out.
    let vanish = tokio::spawn(async move {
        for (i, mut ws) in leaving {
            if i % 4 == 0 {
                let _ = tokio::time::timeout(Duration::from_millis(5), ws.next()).await;
            }
            drop(ws);
            tokio::task::yield_now().await;
        }
    });
    let mut delivered = Vec::new();
    for n in 0..BROADCASTS {
        let response = gw.post("/v1/broadcast", json!({"n": n})).await;
        assert_eq!(response.status(), 202);
        delivered.push(
            response.json::<Value>().await.unwrap()["delivered"]
                .as_u64()
                .unwrap(),
        );
    }
    vanish.await.unwrap();
    let mut kept = Vec::new();
    for reader in staying {
        kept.push(reader.await.expect("a staying agent"));
    }
    // Counted: never more than were connected, never fewer than stayed.
    for (n, d) in delivered.iter().enumerate() {
        assert!(
            (AGENTS as u64 / 2..=AGENTS as u64).contains(d),
            "broadcast {n} delivered {d}"
        );
    }
    // Nothing left behind: the hub lets the vanished go, and a broadcast now reaches
    // exactly those that stayed.
    gw.wait_for_connections(AGENTS / 2).await;
    let response = gw.post("/v1/broadcast", json!({"n": BROADCASTS})).await;
    assert_eq!(
        response.json::<Value>().await.unwrap()["delivered"],
        AGENTS as u64 / 2
    );
    // And the gateway still serves newcomers.
    let mut newcomer = gw.agent("newcomer", &[]).await;
    let response = gw.post("/v1/broadcast", json!({"n": 0})).await;
    assert_eq!(
        response.json::<Value>().await.unwrap()["delivered"],
        AGENTS as u64 / 2 + 1
    );
    assert_eq!(read_numbers(&mut newcomer, 1).await, vec![0]);
}
