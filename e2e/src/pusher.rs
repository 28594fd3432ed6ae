//! The pusher: pushes to random connected agents through random Ready pods and
//! remembers what the push API accepted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::tokio_util_free::Stop;
use parking_lot::Mutex;
use rand::seq::IndexedRandom;
use serde_json::{Value, json};

use crate::API_KEY;
use crate::kubelet::Endpoint;

/// A random Ready pod (the push API of any pod reaches an agent on any other).
fn pick_ready(endpoints: &Mutex<BTreeMap<i32, Endpoint>>) -> Option<Endpoint> {
    let ready: Vec<Endpoint> = endpoints
        .lock()
        .values()
        .filter(|e| e.ready)
        .cloned()
        .collect();
    ready.choose(&mut rand::rng()).cloned()
}

/// Pushes sent to random connected agents through random ready pods; remembers each one
/// the push API accepted (202) so a test can check every one arrived.
pub struct Pusher {
    accepted: Arc<Mutex<Vec<(String, String)>>>,
    stop: Stop,
    task: tokio::task::JoinHandle<()>,
}

impl Pusher {
    /// Starts pushing every `every` to agents of `agents` (a snapshot of ids and
    /// states is taken on each push through `pick`).
    pub fn start(
        endpoints: Arc<Mutex<BTreeMap<i32, Endpoint>>>,
        pick: impl Fn() -> Option<String> + Send + 'static,
        every: Duration,
    ) -> Self {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = Stop::default();
        let task = tokio::spawn({
            let accepted = accepted.clone();
            let stop = stop.clone();
            async move {
                let http = reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()
                    .expect("client");
                let mut n = 0u64;
                while !stop.is_stopped() {
                    tokio::time::sleep(every).await;
                    let (Some(agent), Some(endpoint)) = (pick(), pick_ready(&endpoints)) else {
                        continue;
                    };
                    n += 1;
                    let key = format!("push-{n}");
                    let response = http
                        .post(format!(
                            "http://{}/v1/agents/{agent}/messages",
                            endpoint.internal
                        ))
                        .bearer_auth(API_KEY)
                        .header("Idempotency-Key", &key)
                        .json(&json!({"n": n}))
                        .send()
                        .await;
                    if let Ok(r) = response
                        && r.status().as_u16() == 202
                    {
                        let id = r
                            .json::<Value>()
                            .await
                            .ok()
                            .and_then(|v| v["id"].as_str().map(str::to_string))
                            .unwrap_or(key);
                        accepted.lock().push((agent, id));
                    }
                }
            }
        });
        Self {
            accepted,
            stop,
            task,
        }
    }

    /// Stops pushing; returns the accepted (agent, message id) pairs.
    pub async fn finish(self) -> Vec<(String, String)> {
        self.stop.stop();
        let _ = self.task.await;
        self.accepted.lock().clone()
    }
}
