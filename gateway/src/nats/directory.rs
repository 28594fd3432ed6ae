//! The agent → pod directory: a JetStream key-value bucket per pool, written with
//! compare-and-set, read through a small cache.
//!
//! ```text
//!  connect:    entry(a.<agent>) ─> update(expected revision) ─> tell the previous pod to close
//!  disconnect: entry(a.<agent>) ─> is it still ours? ─> delete(expected revision)
//!  push:       cache ─miss─> entry(a.<agent>) ─> request to the pod ─"not here"─> drop entry
//! ```
//!
//! The decisions (is this entry ours, who is newer, what to do after a NATS outage) are
//! pure functions at the top of this file; [`Directory`] only performs them. Nothing
//! here is kept per connection: the directory costs the gateway no memory per agent
//! beyond the bounded push-side cache.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::subjects::Subjects;

/// Where an agent's current connection lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// Pod holding the socket.
    pub pod: String,
    /// That pod process's boot id: entries of a previous incarnation are stale.
    pub boot: String,
    /// Connection id within that process.
    pub conn: u64,
    /// When the connection was accepted (Unix ms): orders connections of one agent
    /// across pods when a NATS outage kept their directory writes apart.
    pub at_ms: u64,
}

/// This process, as the directory names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Me {
    /// Pod name.
    pub pod: String,
    /// Boot id (fresh per process start).
    pub boot: String,
}

impl Route {
    /// Whether the entry names exactly this connection of this process.
    pub fn is(&self, me: &Me, conn: u64) -> bool {
        self.pod == me.pod && self.boot == me.boot && self.conn == conn
    }

    /// Whether the entry names this pod (any incarnation).
    pub fn on_pod(&self, me: &Me) -> bool {
        self.pod == me.pod
    }
}

/// The older connection another pod must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replace {
    /// Its pod.
    pub pod: String,
    /// That pod process's boot id.
    pub boot: String,
    /// The connection.
    pub conn: u64,
}

/// Whom to tell to close an older connection after this pod overwrote `previous`.
/// A previous entry of this pod needs nothing: the hub already replaced the older
/// connection, or it belonged to a previous incarnation that is gone.
pub fn to_replace(previous: Option<&Route>, me: &Me) -> Option<Replace> {
    previous.filter(|p| !p.on_pod(me)).map(|p| Replace {
        pod: p.pod.clone(),
        boot: p.boot.clone(),
        conn: p.conn,
    })
}

/// Whether a `Replace` notice for connection `conn` (named with `boot`, the boot id of
/// the process that held it) applies to this process's current connection `current`.
/// Connection ids restart with each process, so without the boot id a notice about a
/// previous incarnation's connection could close a new connection that reuses its id.
/// Notices from older pods carry no boot id and are trusted on the id alone.
pub fn replace_applies(me: &Me, current: u64, conn: u64, boot: Option<&str>) -> bool {
    current == conn && boot.is_none_or(|b| b == me.boot)
}

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// The entry now names this connection; it replaced this one (if any).
    Replaced(Option<Route>),
    /// Another pod holds a connection accepted later: the entry was left alone and
    /// this connection must yield.
    Newer(Route),
}

/// What to do about one local connection when re-registering after a NATS outage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reconcile {
    /// The directory already names it.
    Keep,
    /// Write it (missing, stale, or older than ours); tell `replace` (if any) to close.
    Write {
        /// The other pod's connection to close.
        replace: Option<(String, u64)>,
    },
    /// Another pod holds a newer connection of the agent: close ours.
    CloseLocal,
}

/// Decides what re-registration does for a local connection accepted at `at_ms`.
pub fn reconcile(entry: Option<&Route>, me: &Me, conn: u64, at_ms: u64) -> Reconcile {
    match entry {
        None => Reconcile::Write { replace: None },
        Some(e) if e.is(me, conn) => Reconcile::Keep,
        // This pod's hub is the truth for this pod.
        Some(e) if e.on_pod(me) => Reconcile::Write { replace: None },
        Some(e) if e.at_ms > at_ms => Reconcile::CloseLocal,
        Some(e) => Reconcile::Write {
            replace: Some((e.pod.clone(), e.conn)),
        },
    }
}

/// Why a directory operation failed: NATS is unreachable or refused it.
#[derive(Debug, thiserror::Error)]
#[error("directory: {0}")]
pub struct DirectoryError(pub String);

fn err(e: impl std::fmt::Display) -> DirectoryError {
    DirectoryError(e.to_string())
}

/// A bounded cache of directory reads for the push path. Stale entries are harmless:
/// the named pod answers "not here" and the entry is dropped.
#[derive(Debug)]
pub struct Cache {
    map: Mutex<HashMap<String, (Route, u64)>>,
    capacity: usize,
}

impl Cache {
    /// A cache of at most `capacity` agents.
    pub fn new(capacity: usize) -> Self {
        Self {
            map: Mutex::default(),
            capacity,
        }
    }

    /// The cached route and its revision.
    pub fn get(&self, agent: &str) -> Option<(Route, u64)> {
        self.map.lock().get(agent).cloned()
    }

    /// Remembers a route; evicts an arbitrary entry when full (a miss costs one read).
    pub fn put(&self, agent: &str, route: Route, revision: u64) {
        let mut map = self.map.lock();
        if map.len() >= self.capacity
            && !map.contains_key(agent)
            && let Some(victim) = map.keys().next().cloned()
        {
            map.remove(&victim);
        }
        map.insert(agent.to_owned(), (route, revision));
    }

    /// Forgets an agent.
    pub fn invalidate(&self, agent: &str) {
        self.map.lock().remove(agent);
    }

    /// Forgets everything (after a NATS outage the directory may have changed).
    pub fn clear(&self) {
        self.map.lock().clear();
    }

    /// Number of cached agents.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How many times a compare-and-set write retries after losing a race.
const CAS_ATTEMPTS: usize = 8;

/// The pool's directory and pod registry.
#[derive(Debug, Clone)]
pub struct Directory {
    js: jetstream::Context,
    replicas: usize,
    agents_bucket: String,
    pods_bucket: String,
    agents: kv::Store,
    pods: kv::Store,
}

pub(crate) async fn open_bucket(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    replicas: usize,
) -> Result<kv::Store, DirectoryError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        // A pool whose NATS grew into a cluster: its buckets take the new replica count
        // (JetStream re-replicates a stream in place), or the directory would stay on
        // one server and routing would not survive that server's loss.
        if let Ok(mut stream) = js.get_stream(format!("KV_{bucket}")).await
            && let Ok(info) = stream.info().await
            && info.config.num_replicas != replicas
        {
            let mut config = info.config.clone();
            config.num_replicas = replicas;
            if let Err(e) = js.update_stream(config).await {
                warn!(%bucket, %e, replicas, "could not change the directory's replicas");
            }
        }
        return Ok(store);
    }
    // The stream a KV bucket is, created directly: `create_key_value` first queries the
    // account info, whose shape differs on NATS 2.9 (Debian's package) and fails to
    // parse. The settings are those of a KV bucket with history 1.
    let created = js
        .create_stream(jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            description: Some(description.to_owned()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            storage: jetstream::stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            num_replicas: replicas,
            ..Default::default()
        })
        .await;
    match created {
        Ok(_) => js.get_key_value(bucket).await.map_err(err),
        // Another pod created it at the same moment.
        Err(e) => js.get_key_value(bucket).await.map_err(|_| err(e)),
    }
}

impl Directory {
    /// Opens (creating if needed) the pool's buckets, each stored on `replicas` NATS
    /// servers.
    pub async fn open(
        js: jetstream::Context,
        subjects: &Subjects,
        replicas: usize,
    ) -> Result<Self, DirectoryError> {
        let agents_bucket = subjects.agents_bucket();
        let pods_bucket = subjects.pods_bucket();
        let agents = open_bucket(&js, &agents_bucket, "tether: agent -> pod", replicas).await?;
        let pods = open_bucket(&js, &pods_bucket, "tether: gateway pods", replicas).await?;
        Ok(Self {
            js,
            replicas,
            agents_bucket,
            pods_bucket,
            agents,
            pods,
        })
    }

    /// Re-creates the buckets if NATS lost them (a restart without its store).
    pub async fn ensure(&self) -> Result<(), DirectoryError> {
        let replicas = self.replicas;
        open_bucket(
            &self.js,
            &self.agents_bucket,
            "tether: agent -> pod",
            replicas,
        )
        .await?;
        open_bucket(
            &self.js,
            &self.pods_bucket,
            "tether: gateway pods",
            replicas,
        )
        .await?;
        Ok(())
    }

    /// The agent's entry and its revision; `None` if absent or deleted.
    pub async fn lookup(&self, agent: &str) -> Result<Option<(Route, u64)>, DirectoryError> {
        Ok(self.entry(agent).await?.1)
    }

    /// (revision to compare against for a write, live entry).
    async fn entry(&self, agent: &str) -> Result<(u64, Option<(Route, u64)>), DirectoryError> {
        let entry = self
            .agents
            .entry(Subjects::agent_key(agent))
            .await
            .map_err(err)?;
        Ok(match entry {
            None => (0, None),
            Some(e) if e.operation != kv::Operation::Put => (e.revision, None),
            Some(e) => {
                let route = serde_json::from_slice::<Route>(&e.value).ok();
                (e.revision, route.map(|r| (r, e.revision)))
            }
        })
    }

    /// Writes `route` for `agent`, whatever was there; returns the entry it replaced.
    /// Compare-and-set: a write that loses a race re-reads and tries again, so two
    /// connects at once end with one entry, and each writer learns whom it replaced.
    ///
    /// Newest wins by acceptance time, decided inside the compare-and-set: an entry of
    /// another pod accepted later than `route` is kept (a slow directory write of an
    /// older connection must not evict the newer one).
    pub async fn register(
        &self,
        agent: &str,
        route: &Route,
        me: &Me,
    ) -> Result<Written, DirectoryError> {
        let value = Bytes::from(serde_json::to_vec(route).map_err(err)?);
        let key = Subjects::agent_key(agent);
        let mut last = None;
        for _ in 0..CAS_ATTEMPTS {
            let (expected, previous) = self.entry(agent).await?;
            let previous = previous.map(|(r, _)| r);
            if let (Some(newer), Reconcile::CloseLocal) = (
                &previous,
                reconcile(previous.as_ref(), me, route.conn, route.at_ms),
            ) {
                return Ok(Written::Newer(newer.clone()));
            }
            match self.agents.update(&key, value.clone(), expected).await {
                Ok(_) => return Ok(Written::Replaced(previous)),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    last = Some(e);
                }
                Err(e) => return Err(err(e)),
            }
        }
        Err(err(format!(
            "lost {CAS_ATTEMPTS} races writing {agent:?}: {last:?}"
        )))
    }

    /// Deletes the agent's entry if it still names this connection; a newer entry
    /// (the agent reconnected anywhere) is left alone.
    pub async fn unregister(
        &self,
        agent: &str,
        me: &Me,
        conn: u64,
    ) -> Result<bool, DirectoryError> {
        match self.entry(agent).await?.1 {
            Some((route, revision)) if route.is(me, conn) => self.remove(agent, revision).await,
            _ => Ok(false),
        }
    }

    /// Deletes the agent's entry if it is still at `revision` (stale-entry cleanup).
    pub async fn remove(&self, agent: &str, revision: u64) -> Result<bool, DirectoryError> {
        match self
            .agents
            .delete_expect_revision(Subjects::agent_key(agent), Some(revision))
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == kv::DeleteErrorKind::WrongLastRevision => Ok(false),
            Err(e) => Err(err(e)),
        }
    }

    /// Records this pod in the registry.
    pub async fn announce(&self, me: &Me) -> Result<(), DirectoryError> {
        self.pods
            .put(Subjects::pod_key(&me.pod), Bytes::from(me.boot.clone()))
            .await
            .map(drop)
            .map_err(err)
    }

    /// The boot id the registry holds for a pod (a previous incarnation's, before
    /// [`Directory::announce`]).
    pub async fn pod_boot(&self, pod: &str) -> Result<Option<String>, DirectoryError> {
        let value = self.pods.get(Subjects::pod_key(pod)).await.map_err(err)?;
        Ok(value.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Removes a dead pod from the registry.
    pub async fn forget_pod(&self, pod: &str) -> Result<(), DirectoryError> {
        self.pods.delete(Subjects::pod_key(pod)).await.map_err(err)
    }

    /// The pods in the registry.
    pub async fn pods(&self) -> Result<Vec<String>, DirectoryError> {
        use futures_util::TryStreamExt;
        let keys: Vec<String> = self
            .pods
            .keys()
            .await
            .map_err(err)?
            .try_collect()
            .await
            .map_err(err)?;
        Ok(keys
            .iter()
            .filter_map(|k| Subjects::pod_of_key(k))
            .collect())
    }

    /// Deletes every entry a previous incarnation of this pod left (its sockets died
    /// with it), within `budget`. Returns how many it removed. Entries are also
    /// removed lazily when a push finds them stale; this sweep keeps the bucket clean.
    ///
    /// It walks the bucket's stream with direct gets ("next message for `a.>` from
    /// sequence n"), one message at a time and without a consumer: KV watches rely on
    /// consumer features that NATS 2.9 does not answer the way `async-nats` expects.
    pub async fn sweep_previous_incarnations(
        &self,
        me: &Me,
        budget: Duration,
    ) -> Result<usize, DirectoryError> {
        let filter = format!("{}a.>", self.agents.prefix);
        let sweep = async {
            let mut removed = 0;
            let mut sequence = 1;
            loop {
                let message = match self
                    .agents
                    .stream
                    .direct_get_next_for_subject(filter.as_str(), Some(sequence))
                    .await
                {
                    Ok(message) => message,
                    Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                        break;
                    }
                    Err(e) => return Err(err(e)),
                };
                sequence = message.sequence + 1;
                let Some(key) = message.subject.strip_prefix(self.agents.prefix.as_str()) else {
                    continue;
                };
                // Delete markers carry a header and no value: they fail to parse.
                let Ok(route) = serde_json::from_slice::<Route>(&message.payload) else {
                    continue;
                };
                if route.on_pod(me)
                    && route.boot != me.boot
                    && let Some(agent) = Subjects::agent_of_key(key)
                    && self.remove(&agent, message.sequence).await?
                {
                    removed += 1;
                }
            }
            Ok(removed)
        };
        tokio::time::timeout(budget, sweep)
            .await
            .map_err(|_| err("sweep ran out of time"))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Me {
        Me {
            pod: "gw-0".into(),
            boot: "b1".into(),
        }
    }

    fn route(pod: &str, boot: &str, conn: u64, at_ms: u64) -> Route {
        Route {
            pod: pod.into(),
            boot: boot.into(),
            conn,
            at_ms,
        }
    }

    #[test]
    fn only_other_pods_are_told_to_close() {
        assert_eq!(to_replace(None, &me()), None);
        assert_eq!(to_replace(Some(&route("gw-0", "b1", 3, 0)), &me()), None);
        assert_eq!(to_replace(Some(&route("gw-0", "b0", 3, 0)), &me()), None);
        assert_eq!(
            to_replace(Some(&route("gw-1", "x", 3, 0)), &me()),
            Some(Replace {
                pod: "gw-1".into(),
                boot: "x".into(),
                conn: 3
            })
        );
    }

    #[test]
    fn replace_notices_name_a_connection_of_this_incarnation() {
        let me = me();
        assert!(replace_applies(&me, 3, 3, Some("b1")));
        // A previous incarnation's connection 3, not today's connection 3.
        assert!(!replace_applies(&me, 3, 3, Some("b0")));
        assert!(!replace_applies(&me, 4, 3, Some("b1")));
        assert!(replace_applies(&me, 3, 3, None));
    }

    #[test]
    fn reconcile_keeps_writes_or_yields() {
        let me = me();
        assert_eq!(
            reconcile(None, &me, 5, 100),
            Reconcile::Write { replace: None }
        );
        assert_eq!(
            reconcile(Some(&route("gw-0", "b1", 5, 100)), &me, 5, 100),
            Reconcile::Keep
        );
        // Our own pod, another connection or a previous incarnation: the hub is right.
        assert_eq!(
            reconcile(Some(&route("gw-0", "b0", 5, 100)), &me, 5, 100),
            Reconcile::Write { replace: None }
        );
        // Another pod's connection is newer: ours must go.
        assert_eq!(
            reconcile(Some(&route("gw-1", "x", 9, 200)), &me, 5, 100),
            Reconcile::CloseLocal
        );
        // Ours is newer: take the entry and close theirs.
        assert_eq!(
            reconcile(Some(&route("gw-1", "x", 9, 50)), &me, 5, 100),
            Reconcile::Write {
                replace: Some(("gw-1".into(), 9))
            }
        );
    }

    #[test]
    fn cache_is_bounded() {
        let cache = Cache::new(2);
        cache.put("a", route("p", "b", 1, 0), 1);
        cache.put("b", route("p", "b", 2, 0), 2);
        cache.put("c", route("p", "b", 3, 0), 3);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("c").unwrap().1, 3);
        cache.put("c", route("q", "b", 4, 0), 4);
        assert_eq!(cache.len(), 2);
        cache.invalidate("c");
        assert!(cache.get("c").is_none());
        cache.clear();
        assert!(cache.is_empty());
    }
}
