//! The managed NATS cluster as the operator renders it, run by real `nats-server`s.
//!
//! A pool with `routing.nats.managed: true, replicas: 3` gets a ConfigMap key `nats.conf`
//! (cluster block, routes to every server's DNS name, `server_name: $POD_NAME`, the token
//! as `$NATS_TOKEN`) and a StatefulSet whose container passes the file and JetStream
//! flags. Unit tests check the text; this runs it: three servers started with the
//! rendered file and arguments, changed only where a pod's network differs from
//! loopback (each server's route and client ports, and the DNS names mapped to
//! 127.0.0.1), the environment filled as the kubelet would (the pod's name, the token
//! from the Secret). They must form one cluster with a JetStream meta leader, require
//! the token, and hold a three-replica stream, as the gateways' durable delivery asks.

use std::process::{Child, Command, Stdio};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Container;
use tether_crds::{ConnectionPool, ConnectionPoolSpec};
use tether_operator::resources::{self, NATS_CLUSTER_PORT, NATS_CONFIG_KEY, Settings};
use tether_test_support::{PATIENCE, eventually, free_port, nats_server_binary};

const SERVERS: usize = 3;
const TOKEN: &str = "a-token-from-the-secret";

fn managed_pool() -> ConnectionPool {
    let spec: ConnectionPoolSpec = serde_json::from_value(serde_json::json!({
        "tenant": "acme",
        "replicas": {"min": 1, "max": 4},
        "auth": {
            "jwt": {"secretRef": {"name": "acme-jwt", "key": "hs256"}},
            "apiKeysSecretRef": {"name": "acme-api-keys", "key": "keys"},
        },
        "routing": {"nats": {"managed": true, "replicas": 3}},
        "delivery": {"storage": "1Gi"},
    }))
    .expect("a managed-NATS spec");
    let mut pool = ConnectionPool::new("acme", spec);
    pool.metadata.namespace = Some("tenants".into());
    pool.metadata.uid = Some("5d1c0f2e-0000-4000-8000-000000000001".into());
    pool
}

fn nats_container(sts: &StatefulSet) -> &Container {
    let spec = sts.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .find(|c| {
            c.args
                .as_ref()
                .is_some_and(|a| a.iter().any(|a| a == "--jetstream"))
        })
        .expect("the NATS container")
}

/// One rendered server, started on loopback.
struct Server {
    client_port: u16,
    http_port: u16,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A page of a server's monitoring endpoint (`routez`, `varz`, ...).
async fn monitoring(http: &reqwest::Client, server: &Server, page: &str) -> serde_json::Value {
    http.get(format!("http://127.0.0.1:{}/{page}", server.http_port))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn three_servers_started_from_the_rendered_config_form_one_jetstream_cluster() {
    let pool = managed_pool();
    let desired = resources::desired(&pool, &Settings::default(), 1).expect("the pool renders");
    let conf = desired.config_map.data.as_ref().unwrap()[NATS_CONFIG_KEY].clone();
    let (sts, _) = desired.nats.as_ref().expect("a managed NATS");
    let sts_name = sts.metadata.name.clone().unwrap();
    assert_eq!(sts.spec.as_ref().unwrap().replicas, Some(SERVERS as i32));
    let container = nats_container(sts);
    let args = container.args.clone().unwrap();
    let env = container.env.clone().unwrap_or_default();
    let hosts = resources::nats_server_hosts(&pool);
    assert_eq!(hosts.len(), SERVERS);

    let dir = tempfile::tempdir().unwrap();
    let route_ports: Vec<u16> = (0..SERVERS).map(|_| free_port()).collect();
    let mut servers = Vec::new();
    for i in 0..SERVERS {
        // The pod's network, not the file's meaning: each server's route port, and every
        // server's DNS name on loopback.
        let mut file = conf.replace(
            &format!("0.0.0.0:{NATS_CLUSTER_PORT}"),
            &format!("127.0.0.1:{}", route_ports[i]),
        );
        for (host, port) in hosts.iter().zip(&route_ports) {
            file = file.replace(
                &format!("{host}:{NATS_CLUSTER_PORT}"),
                &format!("127.0.0.1:{port}"),
            );
        }
        assert!(!file.contains(".svc"), "every route mapped: {file}");
        let conf_path = dir.path().join(format!("nats-{i}.conf"));
        std::fs::write(&conf_path, &file).unwrap();
        let store = dir.path().join(format!("store-{i}"));
        let (client_port, http_port) = (free_port(), free_port());

        // The rendered arguments, with the paths and ports of this machine.
        let mut server_args: Vec<String> = Vec::new();
        let mut rest = args.iter();
        while let Some(arg) = rest.next() {
            server_args.push(arg.clone());
            let replace = match arg.as_str() {
                "--config" => Some(conf_path.display().to_string()),
                "--store_dir" => Some(store.display().to_string()),
                "--http_port" => Some(http_port.to_string()),
                _ => None,
            };
            if let Some(value) = replace {
                rest.next().expect("the flag's value");
                server_args.push(value);
            }
        }
        server_args.extend([
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            client_port.to_string(),
        ]);

        // The environment as the kubelet fills it: the pod's name, the Secret's token.
        let mut command = Command::new(nats_server_binary().unwrap());
        command.args(&server_args).env_clear();
        for var in &env {
            let from = var.value_from.as_ref();
            let value = if from
                .and_then(|f| f.field_ref.as_ref())
                .map(|f| f.field_path.as_str())
                == Some("metadata.name")
            {
                format!("{sts_name}-{i}")
            } else if from.is_some_and(|f| f.secret_key_ref.is_some()) {
                assert_eq!(var.name, "NATS_TOKEN", "the generated token");
                TOKEN.into()
            } else {
                var.value.clone().unwrap_or_default()
            };
            command.env(&var.name, value);
        }
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        servers.push(Server {
            client_port,
            http_port,
            child,
        });
    }

    // One cluster: every server routes to the two others and JetStream has a meta
    // leader over three servers, named after their pods.
    let http = reqwest::Client::new();
    for server in &servers {
        let url = format!("http://127.0.0.1:{}/jsz", server.http_port);
        let meta = eventually(
            "a JetStream meta leader over 3 servers",
            6 * PATIENCE,
            || async {
                let jsz: serde_json::Value = http.get(&url).send().await.ok()?.json().await.ok()?;
                let meta = jsz.get("meta_cluster")?.clone();
                (meta["cluster_size"] == SERVERS
                    && meta["leader"].as_str().is_some_and(|l| !l.is_empty()))
                .then_some(meta)
            },
        )
        .await;
        assert_eq!(
            meta["name"],
            format!("tether-{}", pool.metadata.name.as_deref().unwrap())
        );
        let routez = monitoring(&http, server, "routez").await;
        assert!(
            routez["num_routes"].as_u64().unwrap() >= (SERVERS - 1) as u64,
            "{routez}"
        );
    }
    let varz = monitoring(&http, &servers[0], "varz").await;
    assert_eq!(varz["server_name"], format!("{sts_name}-0"));
    assert_eq!(varz["auth_required"], true, "the token is required");

    // Without the token a client is refused; with it, a three-replica stream is held.
    let urls: Vec<String> = servers
        .iter()
        .map(|s| format!("nats://127.0.0.1:{}", s.client_port))
        .collect();
    assert!(
        async_nats::connect(urls[0].as_str()).await.is_err(),
        "a client without the token is refused"
    );
    let client = async_nats::ConnectOptions::with_token(TOKEN.into())
        .connect(
            urls.iter()
                .map(|u| u.parse().unwrap())
                .collect::<Vec<async_nats::ServerAddr>>()
                .as_slice(),
        )
        .await
        .expect("the token is accepted");
    let js = async_nats::jetstream::new(client);
    let info = eventually("a three-replica stream", 6 * PATIENCE, || async {
        let mut stream = js
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "r3-probe".into(),
                subjects: vec!["r3-probe".into()],
                num_replicas: SERVERS,
                ..Default::default()
            })
            .await
            .ok()?;
        let info = stream.info().await.ok()?.clone();
        (info.cluster.as_ref()?.replicas.len() == SERVERS - 1).then_some(info)
    })
    .await;
    assert_eq!(info.config.num_replicas, SERVERS);
    js.publish("r3-probe", "held".into())
        .await
        .unwrap()
        .await
        .expect("stored on a majority");
}
