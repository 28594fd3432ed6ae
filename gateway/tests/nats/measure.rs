//! Measurements for docs/benchmarks.md ("Routing (NATS)"). Not tests: they print
//! figures and are `#[ignore]`d. Run them one at a time, in release mode:
//!
//! ```text
//! cargo test --release -p tether-gateway --test nats -- --ignored --nocapture --test-threads 1 measure_
//! ```

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;

use crate::common;
use crate::harness::*;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn open_idle(url: &str, prefix: &str, n: usize) -> Vec<common::Ws> {
    let mut sockets = Vec::with_capacity(n);
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let names: Vec<String> = chunk.iter().map(|i| format!("{prefix}-{i}")).collect();
        let batch =
            futures_util::future::join_all(names.iter().map(|name| agent_at(url, name, &["idle"])))
                .await;
        sockets.extend(batch);
    }
    sockets
}

async fn agents_bucket_seq(client: &async_nats::Client) -> u64 {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("KV_tether-acme-agents").await.unwrap();
    stream.info().await.unwrap().state.last_sequence
}

#[tokio::test]
#[ignore = "measurement"]
async fn measure_memory_per_idle_connection_and_directory_writes() {
    const N: usize = 2000;
    let nats = Nats::start().await;
    for routing in ["local", "nats"] {
        let process = if routing == "nats" {
            Process::start(&nats, "gw-mem")
        } else {
            Process::start_with_config(&nats, "gw-mem", |c| c.routing.nats = None)
        };
        let url = process.ws_url();
        // Warm up allocator pools and lazily built state, then measure from there.
        let warm = open_idle(&url, "warm", 200).await;
        drop(warm);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(process.pid());
        let sockets = open_idle(&url, "idle", N).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(process.pid());
        println!(
            "routing={routing} connections={N} rss_before={before}KiB rss_after={after}KiB per_connection={:.0}B",
            (after.saturating_sub(before) * 1024) as f64 / N as f64
        );
        if routing == "nats" {
            // Reconnect storm: every agent drops and comes back at once.
            let probe = nats_client(&nats).await;
            let seq0 = agents_bucket_seq(&probe).await;
            let started = Instant::now();
            drop(sockets);
            let sockets = open_idle(&url, "idle", N).await;
            let elapsed = started.elapsed();
            // Disconnect deletes trail the reconnects; wait for the directory to settle.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let writes = agents_bucket_seq(&probe).await - seq0;
            println!(
                "reconnect storm: {N} agents in {:.2}s, directory writes={writes} ({:.1} per agent), {:.0} writes/s",
                elapsed.as_secs_f64(),
                writes as f64 / N as f64,
                writes as f64 / elapsed.as_secs_f64()
            );
            drop(sockets);
        } else {
            drop(sockets);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1e3
}

#[tokio::test]
#[ignore = "measurement"]
async fn measure_push_latency_local_vs_other_pod() {
    const N: usize = 2000;
    let nats = Nats::start().await;
    let a = Process::start(&nats, "gw-a");
    let b = Process::start(&nats, "gw-b");
    let mut agent = agent_at(&a.ws_url(), "target", &[]).await;
    let reader = tokio::spawn(async move {
        let mut n = 0;
        while let Some(Ok(_)) = agent.next().await {
            n += 1;
        }
        n
    });
    let http = reqwest::Client::new();
    for (label, api) in [
        ("local pod", a.api("/v1/agents/target/messages")),
        ("other pod", b.api("/v1/agents/target/messages")),
    ] {
        // Warm-up (connection pool, directory cache).
        for _ in 0..100 {
            post(&http, api.clone(), json!("w")).await;
        }
        let mut latencies = Vec::with_capacity(N);
        for i in 0..N {
            let started = Instant::now();
            let response = post(&http, api.clone(), json!(i)).await;
            latencies.push(started.elapsed());
            assert_eq!(response.status(), 202);
        }
        latencies.sort();
        println!(
            "push via {label}: n={N} p50={:.3}ms p90={:.3}ms p99={:.3}ms max={:.3}ms",
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.90),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0)
        );
    }
    drop(a);
    let _ = reader.await;
}

#[tokio::test]
#[ignore = "measurement"]
async fn measure_broadcast_deliveries_across_three_pods() {
    const PER_POD: usize = 300;
    const MESSAGES: usize = 100;
    let nats = Nats::start().await;
    let pods = [
        Process::start(&nats, "gw-0"),
        Process::start(&nats, "gw-1"),
        Process::start(&nats, "gw-2"),
    ];
    let mut readers = Vec::new();
    for (p, pod) in pods.iter().enumerate() {
        for ws in open_idle(&pod.ws_url(), &format!("b{p}"), PER_POD).await {
            let mut ws = ws;
            readers.push(tokio::spawn(async move {
                let mut n = 0;
                while n < MESSAGES {
                    match ws.next().await {
                        Some(Ok(tokio_tungstenite::tungstenite::Message::Text(_))) => n += 1,
                        Some(Ok(_)) => {}
                        _ => break,
                    }
                }
                n
            }));
        }
    }
    let http = reqwest::Client::new();
    let started = Instant::now();
    let mut confirmed = 0;
    for i in 0..MESSAGES {
        let response = post(&http, pods[i % 3].api("/v1/broadcast"), json!(i)).await;
        assert_eq!(response.status(), 202);
        confirmed += response.json::<serde_json::Value>().await.unwrap()["delivered"]
            .as_u64()
            .unwrap();
    }
    let api_elapsed = started.elapsed();
    let mut delivered = 0;
    for reader in readers {
        delivered += reader.await.unwrap();
    }
    let elapsed = started.elapsed();
    println!(
        "broadcast across 3 pods: {MESSAGES} broadcasts x {} agents, delivered={delivered} (API counted {confirmed}), \
         API {:.2}s, all received {:.2}s, {:.0} deliveries/s",
        3 * PER_POD,
        api_elapsed.as_secs_f64(),
        elapsed.as_secs_f64(),
        delivered as f64 / elapsed.as_secs_f64()
    );
}

fn with_durable(c: &mut tether_config::GatewayConfig) {
    c.delivery.durable = Some(tether_config::DurableConfig {
        max_messages_per_agent: 100_000,
        ..Default::default()
    });
    // Every ack is an inbound message under the per-connection rate limit (50/s by
    // default, which then bounds the drain rate): lift it to measure the queue itself.
    c.limits.messages_per_second = 1_000_000;
    c.limits.message_burst = 1_000_000;
}

/// Durable delivery (docs/benchmarks.md, "Durable delivery"): memory per idle
/// connection with the durable queue on and off, durable vs direct push latency through
/// another pod, backlog drain rate on connect, stored bytes per pending message.
#[tokio::test]
#[ignore = "measurement"]
async fn measure_durable_delivery() {
    use tether_protocol::{AgentMessage, GatewayMessage};
    use tokio_tungstenite::tungstenite::Message;
    const IDLE: usize = 2000;
    const PUSHES: usize = 2000;
    const BACKLOG: usize = 5000;
    let nats = Nats::start().await;

    // 1. Memory per idle connection, durable off / on, same NATS router otherwise.
    for durable in [false, true] {
        let process = if durable {
            Process::start_with_config(&nats, "gw-mem", with_durable)
        } else {
            Process::start(&nats, "gw-mem")
        };
        let url = process.ws_url();
        drop(open_idle(&url, "warm", 200).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = rss_kib(process.pid());
        let sockets = open_idle(&url, "idle", IDLE).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = rss_kib(process.pid());
        println!(
            "durable={durable} idle connections={IDLE} per_connection={:.0}B",
            (after.saturating_sub(before) * 1024) as f64 / IDLE as f64
        );
        drop(sockets);
    }

    // 2. Push latency through another pod: direct vs durable (stored, then kicked).
    let a = Process::start_with_config(&nats, "gw-a", with_durable);
    let b = Process::start_with_config(&nats, "gw-b", with_durable);
    let mut agent = agent_at(&a.ws_url(), "target", &[]).await;
    let reader = tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(Ok(frame)) = agent.next().await {
            if let Message::Text(text) = frame {
                n += 1;
                if let Ok(GatewayMessage::Push { id, ack: true, .. }) =
                    GatewayMessage::decode(&text)
                {
                    let ack = AgentMessage::Ack { id }.encode();
                    if futures_util::SinkExt::send(&mut agent, Message::text(ack))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        n
    });
    let http = reqwest::Client::new();
    for (label, api) in [
        ("direct", b.api("/v1/agents/target/messages")),
        (
            "durable",
            b.api("/v1/agents/target/messages?delivery=durable"),
        ),
    ] {
        for _ in 0..100 {
            post(&http, api.clone(), json!("w")).await;
        }
        let mut latencies = Vec::with_capacity(PUSHES);
        let started = Instant::now();
        for i in 0..PUSHES {
            let t = Instant::now();
            let response = post(&http, api.clone(), json!(i)).await;
            latencies.push(t.elapsed());
            assert_eq!(response.status(), 202);
        }
        let elapsed = started.elapsed();
        latencies.sort();
        println!(
            "{label} push via another pod: n={PUSHES} {:.0}/s sequential, p50={:.3}ms p90={:.3}ms p99={:.3}ms",
            PUSHES as f64 / elapsed.as_secs_f64(),
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.90),
            percentile(&latencies, 0.99),
        );
    }
    drop(a);
    let _ = reader.await;

    // 3. Stored bytes per pending message and backlog drain rate on connect.
    let js = async_nats::jetstream::new(nats_client(&nats).await);
    let stream_info = |js: async_nats::jetstream::Context| async move {
        let mut stream = js.get_stream("tether-acme-durable").await.unwrap();
        stream.info().await.unwrap().state.clone()
    };
    let before = stream_info(js.clone()).await;
    let body = json!({"cmd": "scan", "path": "/var/lib/app", "seq": 123456});
    for _ in 0..BACKLOG {
        post(
            &http,
            b.api("/v1/agents/offline/messages?delivery=durable"),
            body.clone(),
        )
        .await;
    }
    let after = stream_info(js.clone()).await;
    println!(
        "stored: {} messages, {:.0} bytes per pending message (body {} bytes JSON)",
        after.messages - before.messages,
        (after.bytes - before.bytes) as f64 / (after.messages - before.messages) as f64,
        body.to_string().len()
    );
    let started = Instant::now();
    let mut agent = agent_at(&b.ws_url(), "offline", &[]).await;
    let mut n = 0;
    while n < BACKLOG {
        let Some(frame) = agent.next().await else {
            panic!("the gateway closed the connection after {n} messages");
        };
        if let Ok(Message::Text(text)) = frame
            && let Ok(GatewayMessage::Push { id, .. }) = GatewayMessage::decode(&text)
        {
            n += 1;
            common::send_text(&mut agent, &AgentMessage::Ack { id }.encode()).await;
        }
    }
    let delivered = started.elapsed();
    loop {
        if stream_info(js.clone()).await.messages == before.messages {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "backlog drain on connect: {BACKLOG} messages delivered and acked in {:.2}s = {:.0} msg/s (all purged after {:.2}s)",
        delivered.as_secs_f64(),
        BACKLOG as f64 / delivered.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
