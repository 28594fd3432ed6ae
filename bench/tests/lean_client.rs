//! The lean client of `tether-bench million` against a real gateway process: it opens
//! authenticated sessions (its own upgrade, a minted token per agent), answers the
//! gateway's pings so that the gateway keeps pinging (a ping is only sent again once
//! the last one was answered), counts pushes and a broadcast, comes back after a
//! churn, and counts the gateway's closes as drops.
//!
//! Needs the gateway binary: `cargo build -p tether-gateway` first.

use std::{path::PathBuf, sync::mpsc, time::Duration};

use tether_bench::{
    lean::Client,
    target::{Deployment, Kind, Paths, Tuning},
    worker::{Cmd, Event, Job},
};

const AGENTS: u64 = 4;

struct Running {
    cmds: mpsc::Sender<Cmd>,
    waker: std::sync::Arc<mio::Waker>,
    events: mpsc::Receiver<Event>,
}

impl Running {
    fn send(&self, cmd: Cmd) {
        self.cmds.send(cmd).expect("client running");
        self.waker.wake().expect("wake");
    }

    fn next(&self) -> Event {
        self.events
            .recv_timeout(Duration::from_secs(60))
            .expect("an event from the client")
    }

    /// (pushes, pings, open, dropped) since the last report.
    fn report(&self) -> (u64, u64, u64, u64) {
        self.send(Cmd::Report);
        match self.next() {
            Event::Report {
                pushes,
                pings,
                open,
                dropped,
                ..
            } => (pushes, pings, open, dropped),
            other => panic!("expected a report, got {other:?}"),
        }
    }

    /// Reports until `done` holds for the running sums of pushes and pings (with the
    /// last open and dropped counts), or panics after a minute.
    fn until(&self, what: &str, done: impl Fn(u64, u64, u64, u64) -> bool) -> (u64, u64, u64, u64) {
        let (mut pushes, mut pings) = (0, 0);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let (p, g, open, dropped) = self.report();
            pushes += p;
            pings += g;
            if done(pushes, pings, open, dropped) {
                return (pushes, pings, open, dropped);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: pushes {pushes}, pings {pings}, open {open}, dropped {dropped}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lean_client_holds_sessions_answers_pings_and_counts_deliveries() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_tether-bench"));
    let bin_dir = bench.parent().expect("target dir").to_path_buf();
    assert!(
        bin_dir.join("tether-gateway").exists(),
        "build the gateway first: cargo build -p tether-gateway"
    );
    let paths = Paths {
        bin_dir,
        peers_dir: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/peers")),
        gateway: None,
    };
    let tuning = Tuning {
        ping_interval_seconds: Some(1),
    };
    let gateway = Deployment::start(Kind::Tether, 1, &paths, &tuning)
        .await
        .expect("a gateway");
    let job = Job {
        index: 0,
        first: 0,
        count: AGENTS,
        prefix: "agent-".into(),
        shards: gateway.ws_addrs(),
        secret: gateway.secret.clone(),
        rate: 1000.0,
        concurrency: 4,
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
    let client = Running {
        cmds,
        waker,
        events,
    };

    match client.next() {
        Event::Connected { ok, failed, .. } => {
            assert_eq!((ok, failed.len()), (AGENTS, 0), "failed: {failed:?}")
        }
        other => panic!("expected connected, got {other:?}"),
    }

    // Two pings per agent: the second is only sent once the first was answered.
    client.until("pings answered", |_, pings, _, _| pings >= 2 * AGENTS);

    let http = reqwest::Client::new();
    let control = gateway.shards[0].control;
    let key = gateway.api_key.clone().expect("api key");
    for agent in 0..AGENTS {
        let resp = http
            .post(format!("http://{control}/v1/agents/agent-{agent}/messages"))
            .bearer_auth(&key)
            .json(&serde_json::json!({"t": 1}))
            .send()
            .await
            .expect("push");
        assert!(
            resp.status().is_success(),
            "push answered {}",
            resp.status()
        );
    }
    let resp = http
        .post(format!("http://{control}/v1/broadcast"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"t": 2}))
        .send()
        .await
        .expect("broadcast");
    assert!(
        resp.status().is_success(),
        "broadcast answered {}",
        resp.status()
    );
    let (pushes, _, open, dropped) = client.until("pushes and the broadcast", |pushes, _, _, _| {
        pushes >= 2 * AGENTS
    });
    assert_eq!((pushes, open, dropped), (2 * AGENTS, AGENTS, 0));

    // A storm of all of them: every one comes back with a new session.
    client.send(Cmd::Churn { fraction: 1.0 });
    match client.next() {
        Event::Churned { closed, back, .. } => assert_eq!((closed, back), (AGENTS, AGENTS)),
        other => panic!("expected churned, got {other:?}"),
    }
    let (_, _, open, dropped) = client.report();
    assert_eq!((open, dropped), (AGENTS, 0));

    // The gateway goes away: its closes are drops.
    gateway.stop().await;
    let (_, _, open, dropped) = client.until("drops", |_, _, open, _| open == 0);
    assert_eq!((open, dropped), (0, AGENTS));
    client.send(Cmd::Stop);
    thread.join().expect("client thread").expect("client ran");
}
