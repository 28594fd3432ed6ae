//! Test harness: the Kubernetes API stand-in, the CRD, Secrets, and the operator run
//! in-process (or as a child process) against it.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::{Client, CustomResourceExt};
use serde_json::{Value, json};
use tether_crds::ConnectionPool;
use tether_kube_sim::Server;
use tether_operator::app::{Args, run};
use tether_operator::metrics::Metrics;
use tether_test_support::json::merge;
use tokio::sync::oneshot;

/// Namespace of the test pools.
pub const NS: &str = "tenants";

/// A stand-in with the real CRD installed, the `tenants` namespace and the Secrets the
/// fixture pools reference.
pub async fn cluster() -> (Server, Client) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let sim = Server::start().await.expect("start the stand-in");
    let client = sim.client().expect("client");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &ConnectionPool::crd())
        .await
        .expect("install the CRD");
    let nss: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
    nss.create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    create_secret(&client, "acme-jwt", "hs256").await;
    create_secret(&client, "acme-api-keys", "keys").await;
    (sim, client)
}

/// Creates Secret `name` in [`NS`] with one key.
pub async fn create_secret(client: &Client, name: &str, key: &str) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name},
        "stringData": {key: "not-a-real-secret"},
    }))
    .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("secret");
}

/// A pool spec referencing the fixture Secrets; `extra` is merged over it.
pub fn pool(name: &str, extra: Value) -> ConnectionPool {
    let mut spec = json!({
        "tenant": "acme",
        "replicas": {"min": 1, "max": 1},
        "auth": {
            "jwt": {"secretRef": {"name": "acme-jwt", "key": "hs256"}},
            "apiKeysSecretRef": {"name": "acme-api-keys", "key": "keys"},
        },
    });
    merge(&mut spec, extra);
    serde_json::from_value(json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }))
    .unwrap()
}

/// Flags for an in-process operator: loopback admin port, fast lease and rechecks.
pub fn args(identity: &str) -> Args {
    use clap::Parser;
    Args::parse_from([
        "tether-operator",
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
        "--secret-recheck",
        "500ms",
        "--gateway-image",
        "registry.test/tether-gateway:test",
    ])
}

/// An operator running in this process; dropping it simulates a crash (every task is
/// aborted, the lease is not released), [`Operator::stop`] a clean shutdown.
pub struct Operator {
    pub metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Operator {
    /// Starts an operator with `args`.
    pub fn start(client: &Client, args: Args) -> Self {
        let metrics = Arc::new(Metrics::new());
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(run(client.clone(), args, metrics.clone(), async move {
            let _ = rx.await;
        }));
        Self {
            metrics,
            stop: Some(tx),
            task,
        }
    }

    /// Stops cleanly (finishes reconciles, releases the lease).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = &mut self.task;
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("operator stops within 10 s")
            .expect("operator task")
            .expect("operator run");
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// Each test binary uses a part of this module.
#[allow(unused_imports)]
pub use tether_test_support::eventually;

/// The pool's condition of `type_`, as (status, reason).
pub fn condition(pool: &ConnectionPool, type_: &str) -> Option<(String, String)> {
    pool.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}
