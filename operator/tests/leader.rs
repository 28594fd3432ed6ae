//! Two operator processes against the stand-in: one leads, the other takes over when
//! the leader dies (crash: the lease expires) or stops (clean: the lease is released).

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;
use tether_crds::ConnectionPool;

async fn holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    leases
        .get_opt("tether-operator")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// The real binary, pointed at the stand-in through KUBECONFIG.
fn spawn_operator(kubeconfig: &std::path::Path, identity: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tether-operator"))
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--identity",
            identity,
            "--lease-namespace",
            "default",
            "--lease-duration",
            "2s",
            "--lease-renew",
            "300ms",
        ])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start tether-operator")
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn one_leader_of_two_processes_and_failover_when_it_dies() {
    let (sim, client) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    sim.write_kubeconfig(&kubeconfig).unwrap();
    let a = KillOnDrop(spawn_operator(&kubeconfig, "op-a"));
    let b = KillOnDrop(spawn_operator(&kubeconfig, "op-b"));

    let first = eventually("a leader", Duration::from_secs(15), || holder(&client)).await;
    assert!(first == "op-a" || first == "op-b", "{first}");
    // It stays the only leader while it lives.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(holder(&client).await.as_deref(), Some(first.as_str()));
    }
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
    pools
        .create(&PostParams::default(), &pool("one", json!({})))
        .await
        .unwrap();
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    eventually("pool one reconciled", Duration::from_secs(15), || async {
        sts.get_opt("one").await.unwrap()
    })
    .await;

    // SIGKILL the leader: no release, the follower waits out the lease and takes over.
    let (mut dead, survivor) = if first == "op-a" { (a, b) } else { (b, a) };
    dead.0.kill().unwrap();
    dead.0.wait().unwrap();
    let expected = if first == "op-a" { "op-b" } else { "op-a" };
    eventually("failover", Duration::from_secs(15), || async {
        (holder(&client).await.as_deref() == Some(expected)).then_some(())
    })
    .await;
    // The new leader reconciles.
    pools
        .create(&PostParams::default(), &pool("two", json!({})))
        .await
        .unwrap();
    eventually("pool two reconciled", Duration::from_secs(15), || async {
        sts.get_opt("two").await.unwrap()
    })
    .await;
    drop(survivor);
}

#[tokio::test]
async fn a_clean_stop_hands_the_lease_over_at_once() {
    let (_sim, client) = cluster().await;
    // A long lease: a takeover within it can only come from the release.
    let long = |id: &str| {
        let mut a = args(id);
        a.lease_duration = Duration::from_secs(60);
        a
    };
    let a = Operator::start(&client, long("op-a"));
    eventually("op-a leads", Duration::from_secs(10), || async {
        (holder(&client).await.as_deref() == Some("op-a")).then_some(())
    })
    .await;
    let pools: Api<ConnectionPool> = Api::namespaced(client.clone(), NS);
    pools
        .create(&PostParams::default(), &pool("early", json!({})))
        .await
        .unwrap();
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    eventually("reconciled by op-a", Duration::from_secs(10), || async {
        sts.get_opt("early").await.unwrap()
    })
    .await;
    let b = Operator::start(&client, long("op-b"));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(holder(&client).await.as_deref(), Some("op-a"));
    assert_eq!(b.metrics.reconciles(), 0, "a follower does not reconcile");
    a.stop().await;
    eventually("op-b leads", Duration::from_secs(10), || async {
        (holder(&client).await.as_deref() == Some("op-b")).then_some(())
    })
    .await;
    pools
        .create(&PostParams::default(), &pool("acme", json!({})))
        .await
        .unwrap();
    eventually("reconciled by op-b", Duration::from_secs(10), || async {
        sts.get_opt("acme").await.unwrap()
    })
    .await;
    b.stop().await;
}

/// A leader whose lease calls hang steps down at its renew deadline, while the call is
/// still hanging, so it never overlaps with the follower that takes over after the
/// lease duration: client-go's guarantee, which an unbounded call would break.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_lease_calls_hang_steps_down_before_anyone_takes_over() {
    use tether_kube_sim::faults::FaultMatch;
    use tether_operator::lease::{Elector, LeaseConfig};
    use tokio::sync::watch;

    let (sim, client) = cluster().await;
    let config = |identity: &str| LeaseConfig {
        name: "hung".into(),
        namespace: "default".into(),
        identity: identity.into(),
        duration: Duration::from_secs(3),
        renew_every: Duration::from_millis(200),
        renew_deadline: Duration::from_secs(2),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let (a_tx, a) = watch::channel(false);
    tokio::spawn(Elector::new(client.clone(), config("op-a")).run(a_tx, stop_rx.clone()));
    eventually("op-a leads", Duration::from_secs(10), || async {
        (*a.borrow()).then_some(())
    })
    .await;
    let (b_tx, b) = watch::channel(false);
    tokio::spawn(Elector::new(client.clone(), config("op-b")).run(b_tx, stop_rx.clone()));

    // Every lease write now hangs for far longer than the lease lasts.
    sim.faults().add_latency(
        FaultMatch::verb("update").on("leases"),
        Duration::from_secs(30),
    );
    let hung_at = tokio::time::Instant::now();
    let mut a_stepped_down = None;
    while a_stepped_down.is_none() {
        assert!(!(*a.borrow() && *b.borrow()), "two leaders");
        if !*a.borrow() {
            a_stepped_down = Some(hung_at.elapsed());
        }
        assert!(
            hung_at.elapsed() < Duration::from_secs(20),
            "op-a never stepped down"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // It stepped down on its own, while its renewal was still hanging (30 s).
    assert!(a_stepped_down.unwrap() < Duration::from_secs(30));
    assert!(!*b.borrow(), "nobody can write the lease while writes hang");

    // Writes go through again: exactly one of them leads, never both at once.
    sim.faults().clear();
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut led = false;
    while tokio::time::Instant::now() < until && !led {
        let (la, lb) = (*a.borrow(), *b.borrow());
        assert!(!(la && lb), "two leaders");
        led = la || lb;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(led, "a leader once the API answers again");
    stop_tx.send_replace(true);
}
