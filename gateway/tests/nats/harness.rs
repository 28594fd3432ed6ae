//! Harness for cross-pod tests: a real `nats-server` with JetStream on a free loopback
//! port (killed and restarted by fault tests), and gateway "pods" that route over it,
//! either in this process or as separate `tether-gateway` processes.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tether_config::{GatewayConfig, NatsConfig};
use tether_gateway::Gateway;
use tether_protocol::GatewayMessage;

use crate::common::{self, Ws};

/// A `nats-server -js` on 127.0.0.1 with its store in a temp dir.
pub use tether_test_support::NatsServer as Nats;

/// A plain client for inspecting subjects and the directory.
pub async fn nats_client(nats: &Nats) -> async_nats::Client {
    async_nats::connect(nats.url())
        .await
        .expect("test client connects")
}

/// Gateway config routing on `nats`.
pub fn config(dir: &Path, nats: &Nats, tweak: impl FnOnce(&mut GatewayConfig)) -> GatewayConfig {
    let url = nats.url();
    common::config(dir, |c| {
        c.routing.nats = Some(NatsConfig {
            url,
            namespace: None,
            auth: Default::default(),
            tls: None,
            replicas: None,
        });
        tweak(c);
    })
}

/// One in-process gateway pod.
pub struct Pod {
    pub name: String,
    pub gateway: Gateway,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

impl Pod {
    pub async fn start(nats: &Nats, name: &str) -> Self {
        Self::start_with(nats, name, |_| {}).await
    }

    /// A pod on the bus: a start waits only so long for NATS (the pod then serves its
    /// own agents and attaches later), so this waits until the pod attached.
    pub async fn start_with(
        nats: &Nats,
        name: &str,
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        let pod = Self::start_unattached(nats, name, tweak).await;
        tether_test_support::until(
            &format!("{name} attached to the bus"),
            6 * tether_test_support::PATIENCE,
            || pod.bus_connected(),
        )
        .await;
        pod
    }

    /// A pod as `Gateway::start` leaves it: on the bus or not yet.
    pub async fn start_unattached(
        nats: &Nats,
        name: &str,
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), nats, tweak);
        let gateway = Gateway::start(config, name.into())
            .await
            .expect("gateway starts with NATS routing");
        Self {
            name: name.into(),
            gateway,
            http: reqwest::Client::new(),
            _dir: dir,
        }
    }

    pub fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.internal_addr())
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/connect", self.gateway.public_addr())
    }

    pub async fn agent(&self, sub: &str, groups: &[&str]) -> Ws {
        agent_at(&self.ws_url(), sub, groups).await
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        crate::common::api_post(&self.http, self.api(path), body).await
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        crate::common::api_get(&self.http, self.api(path)).await
    }

    pub fn connections(&self) -> usize {
        self.gateway.state().hub.len()
    }

    /// Whether the pod reaches NATS (what it reports as `busConnected`).
    pub fn bus_connected(&self) -> bool {
        self.gateway.state().router.bus_connected() == Some(true)
    }
}

/// Connects an agent and reads its `welcome` (the directory is written before it).
pub async fn agent_at(ws_url: &str, sub: &str, groups: &[&str]) -> Ws {
    let token = common::token(sub, groups, 3600);
    let (mut ws, _) = common::connect(ws_url, Some(&token))
        .await
        .expect("agent connects");
    match common::next_message(&mut ws).await {
        GatewayMessage::Welcome(w) => assert_eq!(w.agent_id, sub),
        other => panic!("expected welcome, got {other:?}"),
    }
    ws
}

/// Percent-encodes a path segment (agent ids and groups may hold anything).
pub fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The data of the next `push` envelope.
pub async fn next_push(ws: &mut Ws) -> (String, Value) {
    match common::next_message(ws).await {
        GatewayMessage::Push { id, data, .. } => (id, serde_json::from_str(data.get()).unwrap()),
        other => panic!("expected push, got {other:?}"),
    }
}

/// Pushes `data` to `agent_id` through `pod` and asserts it is accepted (202) and
/// reaches `agent`.
pub async fn push_reaches(pod: &Pod, agent_id: &str, agent: &mut Ws, data: Value) {
    let response = pod
        .post(
            &format!("/v1/agents/{}/messages", seg(agent_id)),
            data.clone(),
        )
        .await;
    assert_eq!(
        response.status(),
        202,
        "a push to {agent_id} through {}",
        pod.name
    );
    assert_eq!(next_push(agent).await.1, data);
}

/// Asserts nothing arrives for a short while (used only to show a message was NOT
/// delivered to a bystander after the target already got it).
pub async fn assert_silent(ws: &mut Ws) {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(other) => panic!("expected nothing, got {other:?}"),
        }
    }
}

/// A `tether-gateway` process.
pub struct Process {
    pub child: Child,
    pub public: String,
    pub internal: String,
    _dir: tempfile::TempDir,
}

impl Process {
    pub fn start(nats: &Nats, pod: &str) -> Self {
        Self::start_with_config(nats, pod, |_| {})
    }

    pub fn start_with_config(
        nats: &Nats,
        pod: &str,
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), nats, tweak);
        let file = dir.path().join("gateway.yaml");
        std::fs::write(&file, serde_yaml::to_string(&config).unwrap()).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
            .arg("--config")
            .arg(&file)
            .env("POD_NAME", pod)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("tether-gateway starts");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_owned()
        };
        Self {
            public: field("public="),
            internal: field("internal="),
            child,
            _dir: dir,
        }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/connect", self.public)
    }

    pub fn api(&self, path: &str) -> String {
        format!("http://{}{path}", self.internal)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the pod dies without cleaning anything up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// POSTs JSON with the API key.
pub use crate::common::api_post as post;

/// The directory's entry for an agent, read straight from the KV bucket.
pub async fn directory_entry(client: &async_nats::Client, ns: &str, agent: &str) -> Option<Value> {
    use tether_gateway::nats::subjects::Subjects;
    let js = async_nats::jetstream::new(client.clone());
    let kv = js
        .get_key_value(Subjects::new(ns).agents_bucket())
        .await
        .ok()?;
    let value = kv.get(Subjects::agent_key(agent)).await.unwrap()?;
    Some(serde_json::from_slice(&value).unwrap())
}
