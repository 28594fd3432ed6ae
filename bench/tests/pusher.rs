//! The push driver of `push` and `million` against real servers: at a fixed rate every
//! scheduled push is sent and accepted by a real gateway and a real `limit` peer and
//! reaches its agent (the lean client counts them); against a server that does not
//! answer, or goes away, every push is still accounted for — sent and unanswered, or
//! not sent with its reason — never dropped silently.
//!
//! Needs the gateway binary: `cargo build -p tether-gateway` first.

use std::{path::PathBuf, sync::mpsc, time::Duration};

use tether_bench::{
    lean::Client,
    pusher::{self, LANE_LOST, LOST_IN_FLIGHT, NO_ANSWER, Pace, PushApi, SATURATED},
    target::{Deployment, Kind, Paths, Tuning},
    worker::{Cmd, Event, Job},
};

const AGENTS: u64 = 50;
const PUSHES: u64 = 1_000;

fn paths() -> Paths {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_tether-bench"));
    let bin_dir = bench.parent().expect("target dir").to_path_buf();
    assert!(
        bin_dir.join("tether-gateway").exists(),
        "build the gateway first: cargo build -p tether-gateway"
    );
    Paths {
        bin_dir,
        peers_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/peers")),
        gateway: None,
    }
}

fn pace(total: u64, depth: usize) -> Pace {
    Pace {
        rate: 2_000.0,
        total,
        lanes_per_shard: 2,
        depth,
        drain: Duration::from_secs(3),
    }
}

/// Opens `AGENTS` lean agents on `d`, pushes `PUSHES` to random ones, and checks that
/// every push was sent, accepted and delivered.
async fn every_push_arrives(kind: Kind) {
    let d = Deployment::start(kind, 2, &paths(), &Tuning::default())
        .await
        .expect("servers");
    let job = Job {
        index: 0,
        first: 0,
        count: AGENTS,
        prefix: "agent-".into(),
        shards: d.ws_addrs(),
        secret: d.secret.clone(),
        rate: 1_000.0,
        concurrency: 16,
        path: None,
        tenant: None,
        reconnect: false,
    };
    let (client, waker) = Client::new(job).expect("client");
    let (cmds, cmd_rx) = mpsc::channel();
    let (event_tx, events) = mpsc::channel();
    let thread = std::thread::spawn(move || {
        client.run(cmd_rx, |event| {
            let _ = event_tx.send(event);
        })
    });
    let next = || {
        events
            .recv_timeout(Duration::from_secs(60))
            .expect("an event from the client")
    };
    match next() {
        Event::Connected { ok, .. } => assert_eq!(ok, AGENTS),
        other => panic!("expected connected, got {other:?}"),
    }

    let api = PushApi {
        shards: d.shards.iter().map(|s| s.control).collect(),
        tether: kind == Kind::Tether,
        key: d.api_key.clone(),
    };
    let pushed = pusher::run(&api, AGENTS, pace(PUSHES, 4096), || pusher::probe(64))
        .await
        .expect("pushes");
    assert_eq!(
        (pushed.sent, pushed.accepted, pushed.not_sent()),
        (PUSHES, PUSHES, 0),
        "errors: {:?}",
        pushed.errors
    );
    assert!(pushed.errors.is_empty(), "{:?}", pushed.errors);
    assert_eq!(pushed.lag.len(), PUSHES, "one lag sample per push sent");

    let mut delivered = 0;
    for _ in 0..100 {
        cmds.send(Cmd::Report).expect("client running");
        waker.wake().expect("wake");
        match next() {
            Event::Report { pushes, .. } => delivered += pushes,
            other => panic!("expected a report, got {other:?}"),
        }
        if delivered >= PUSHES {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(delivered, PUSHES);
    cmds.send(Cmd::Stop).expect("client running");
    waker.wake().expect("wake");
    thread.join().expect("client thread").expect("client ran");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_reaches_its_agent_through_a_gateway() {
    every_push_arrives(Kind::Tether).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_push_reaches_its_agent_through_the_floor() {
    every_push_arrives(Kind::Limit).await;
}

/// A server that accepts and reads but never answers: each connection takes `depth`
/// pushes, the rest are not sent (driver saturated), and the sent ones end unanswered.
#[tokio::test]
async fn a_server_that_does_not_answer_saturates_the_lanes_and_every_push_is_counted() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            held.push(tokio::spawn(async move {
                let mut sink = tokio::io::sink();
                let _ = tokio::io::copy(&mut socket, &mut sink).await;
            }));
        }
    });
    let api = PushApi {
        shards: vec![addr],
        tether: true,
        key: None,
    };
    let pushed = pusher::run(&api, 10, pace(100, 5), || pusher::probe(64))
        .await
        .unwrap();
    // Two lanes of five.
    assert_eq!(pushed.sent, 10);
    assert_eq!(pushed.accepted, 0);
    assert_eq!(pushed.errors.get(SATURATED), Some(&90));
    assert_eq!(pushed.errors.get(NO_ANSWER), Some(&10));
    assert_eq!(pushed.errors.values().sum::<u64>(), 100);
    server.abort();
}

/// A server that closes every connection at once: nothing is left unaccounted.
#[tokio::test]
async fn a_server_that_goes_away_loses_pushes_that_are_counted_by_cause() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            drop(socket);
        }
    });
    let api = PushApi {
        shards: vec![addr],
        tether: false,
        key: None,
    };
    let pushed = pusher::run(&api, 10, pace(200, 50), || pusher::probe(64))
        .await
        .unwrap();
    assert_eq!(pushed.accepted, 0);
    let lost = pushed.errors.get(LOST_IN_FLIGHT).copied().unwrap_or(0);
    let not_sent = pushed.errors.get(LANE_LOST).copied().unwrap_or(0);
    assert!(not_sent > 0, "{:?}", pushed.errors);
    assert_eq!(lost + not_sent, 200, "{:?}", pushed.errors);
    assert_eq!(pushed.sent, lost);
    server.abort();
}
