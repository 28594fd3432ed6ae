//! API accounting, read by tests that hold the operator and the gateways to budgets by
//! counts (never timings): requests by verb, resource, subresource, field manager, user
//! agent and status code; watch events and bytes delivered per watch and in total; and
//! the store's own work (objects and watchers it examined), which shows that a request's
//! cost does not grow with unrelated objects.
//!
//! ```text
//!  http middleware ──► Stats::record_request(RequestKey)      one counter per distinct key
//!  watch stream    ──► WatchTap::frame(type, bytes)            atomics, no lock per frame
//!  store / stream  ──► WatchTap::queue() +1 sent, -1 taken     events waiting for the stream
//!  store           ──► Stats::{objects,watchers}_examined(n)   atomics
//!  tests           ◄── Server::stats().snapshot() / GET /_sim/stats, reset / Snapshot::since
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// What one request is counted under.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RequestKey {
    /// Kubernetes verb (get, list, watch, create, update, patch, delete,
    /// deletecollection); for a non-resource path, the lower-case HTTP method.
    pub verb: String,
    /// API group (empty for core).
    pub group: String,
    /// API version.
    pub version: String,
    /// Resource plural (empty for a non-resource path).
    pub resource: String,
    /// Subresource (`status`, `scale`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subresource: Option<String>,
    /// The `fieldManager` query parameter of a write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field_manager: Option<String>,
    /// The `User-Agent` header.
    pub user_agent: String,
    /// Media type of the request body, when it has one (`application/apply-patch+yaml`,
    /// `application/vnd.kubernetes.protobuf` ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// HTTP status of the answer.
    pub code: u16,
    /// The path of a non-resource request (discovery, OpenAPI, `/version`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A request key and how many requests it counted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestCount {
    /// The key.
    #[serde(flatten)]
    pub key: RequestKey,
    /// Requests.
    pub count: u64,
}

/// What identifies a watch: its resource, scope, selectors and client.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct WatchKey {
    /// `group/version/resource` (`v1/pods` for core).
    pub resource: String,
    /// Namespace (None: all namespaces or a cluster-scoped type).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `labelSelector` as sent.
    pub label_selector: String,
    /// `fieldSelector` as sent (a watch of one object by URL counts as `metadata.name=...`).
    pub field_selector: String,
    /// The `User-Agent` header.
    pub user_agent: String,
}

/// Counters of all watches sharing one [`WatchKey`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchCount {
    /// The key.
    #[serde(flatten)]
    pub key: WatchKey,
    /// Watch requests started.
    pub opened: u64,
    /// Streams open now (a gauge: [`Snapshot::since`] keeps the later value).
    pub open: u64,
    /// Store events waiting in the stand-in for these open streams, not yet taken to be
    /// written (a gauge). It stays near 0 while the clients read; it grows once a client
    /// stops reading its watch and the connection's buffers are full.
    #[serde(default)]
    pub queued: u64,
    /// Events delivered: every line (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR) handed
    /// to the connection. Written is not read: lines a client has not read yet (in the
    /// server's write buffer and the sockets' buffers, megabytes on loopback) count.
    pub events: u64,
    /// Bytes of those lines (the response body, newline included).
    pub bytes: u64,
    /// Events by type.
    pub by_type: BTreeMap<String, u64>,
}

/// A copy of every counter at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Requests by key, sorted.
    pub requests: Vec<RequestCount>,
    /// Watches by key, sorted.
    pub watches: Vec<WatchCount>,
    /// Stored objects (and logged events) the store visited to answer requests and to
    /// collect garbage: a get costs 1, a list the candidates its index yields.
    pub objects_examined: u64,
    /// Watchers the store considered while fanning events out (only those of the
    /// event's resource, namespace and, for name-pinned watches, name).
    pub watchers_examined: u64,
    /// Objects serialized for watch events: once per change (shared by every watcher and
    /// the event log), plus once per event for each watch that must decode it (content
    /// selectors, conversion, tables).
    #[serde(default)]
    pub objects_encoded: u64,
    /// Watches the stand-in closed because their client stopped reading (their buffer
    /// of waiting events was full, see `Builder::watch_buffer`).
    #[serde(default)]
    pub watches_overflowed: u64,
}

const EVENT_TYPES: [&str; 5] = ["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"];

#[derive(Default)]
struct WatchCell {
    opened: AtomicU64,
    open: AtomicU64,
    /// Shared with the store's senders and the streams' receivers (see `WatchStart`).
    queued: Arc<AtomicU64>,
    bytes: AtomicU64,
    by_type: [AtomicU64; 5],
}

#[derive(Default)]
struct Inner {
    requests: Mutex<HashMap<RequestKey, u64>>,
    watches: Mutex<BTreeMap<WatchKey, Arc<WatchCell>>>,
    objects_examined: AtomicU64,
    watchers_examined: AtomicU64,
    objects_encoded: AtomicU64,
    watches_overflowed: AtomicU64,
}

/// The accounting handle (cheap to clone; every clone counts into the same place).
#[derive(Clone, Default)]
pub struct Stats {
    inner: Arc<Inner>,
}

/// Counts the frames of one open watch; closing the stream drops it.
pub struct WatchTap {
    cell: Arc<WatchCell>,
}

// === impl Stats ===

impl Stats {
    /// A copy of the counters now.
    pub fn snapshot(&self) -> Snapshot {
        let mut requests: Vec<RequestCount> = self
            .inner
            .requests
            .lock()
            .iter()
            .map(|(k, c)| RequestCount {
                key: k.clone(),
                count: *c,
            })
            .collect();
        requests.sort_by(|a, b| a.key.cmp(&b.key));
        let watches = self
            .inner
            .watches
            .lock()
            .iter()
            .map(|(k, c)| WatchCount {
                key: k.clone(),
                opened: c.opened.load(Relaxed),
                open: c.open.load(Relaxed),
                queued: c.queued.load(Relaxed),
                events: c.by_type.iter().map(|a| a.load(Relaxed)).sum(),
                bytes: c.bytes.load(Relaxed),
                by_type: EVENT_TYPES
                    .iter()
                    .zip(&c.by_type)
                    .map(|(t, a)| (t.to_string(), a.load(Relaxed)))
                    .filter(|(_, n)| *n > 0)
                    .collect(),
            })
            .collect();
        Snapshot {
            requests,
            watches,
            objects_examined: self.inner.objects_examined.load(Relaxed),
            watchers_examined: self.inner.watchers_examined.load(Relaxed),
            objects_encoded: self.inner.objects_encoded.load(Relaxed),
            watches_overflowed: self.inner.watches_overflowed.load(Relaxed),
        }
    }

    /// Sets every counter back to zero (open watches keep counting from there).
    pub fn reset(&self) {
        self.inner.requests.lock().clear();
        self.inner.watches.lock().retain(|_, c| {
            c.opened.store(0, Relaxed);
            c.bytes.store(0, Relaxed);
            for a in &c.by_type {
                a.store(0, Relaxed);
            }
            c.open.load(Relaxed) > 0
        });
        self.inner.objects_examined.store(0, Relaxed);
        self.inner.watchers_examined.store(0, Relaxed);
        self.inner.objects_encoded.store(0, Relaxed);
        self.inner.watches_overflowed.store(0, Relaxed);
    }

    /// Counts one request.
    pub(crate) fn record_request(&self, key: RequestKey) {
        *self.inner.requests.lock().entry(key).or_default() += 1;
    }

    /// Counts a watch as opened; its frames are counted through the returned tap.
    pub(crate) fn open_watch(&self, key: WatchKey) -> WatchTap {
        let cell = self.inner.watches.lock().entry(key).or_default().clone();
        cell.opened.fetch_add(1, Relaxed);
        cell.open.fetch_add(1, Relaxed);
        WatchTap { cell }
    }

    pub(crate) fn objects_examined(&self, n: u64) {
        self.inner.objects_examined.fetch_add(n, Relaxed);
    }

    pub(crate) fn watchers_examined(&self, n: u64) {
        self.inner.watchers_examined.fetch_add(n, Relaxed);
    }

    pub(crate) fn objects_encoded(&self, n: u64) {
        self.inner.objects_encoded.fetch_add(n, Relaxed);
    }

    pub(crate) fn watch_overflowed(&self) {
        self.inner.watches_overflowed.fetch_add(1, Relaxed);
    }
}

// === impl WatchTap ===

impl WatchTap {
    /// The gauge of the store events waiting for the watches of this key.
    pub(crate) fn queue(&self) -> Arc<AtomicU64> {
        self.cell.queued.clone()
    }

    /// Counts one delivered line of `event_type` and `bytes` length.
    pub(crate) fn frame(&self, event_type: &str, bytes: usize) {
        if let Some(i) = EVENT_TYPES.iter().position(|t| *t == event_type) {
            self.cell.by_type[i].fetch_add(1, Relaxed);
        }
        self.cell.bytes.fetch_add(bytes as u64, Relaxed);
    }
}

impl Drop for WatchTap {
    fn drop(&mut self) {
        self.cell.open.fetch_sub(1, Relaxed);
    }
}

// === impl Snapshot ===

fn add_to(map: &mut BTreeMap<String, u64>, k: &str, n: u64) {
    if n > 0 {
        *map.entry(k.to_string()).or_default() += n;
    }
}

impl Snapshot {
    /// What happened between `earlier` and this snapshot (the gauges `open` and `queued`
    /// keep this one's values).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let before: HashMap<&RequestKey, u64> =
            earlier.requests.iter().map(|r| (&r.key, r.count)).collect();
        let requests = self
            .requests
            .iter()
            .map(|r| RequestCount {
                key: r.key.clone(),
                count: r
                    .count
                    .saturating_sub(before.get(&r.key).copied().unwrap_or(0)),
            })
            .filter(|r| r.count > 0)
            .collect();
        let wbefore: HashMap<&WatchKey, &WatchCount> =
            earlier.watches.iter().map(|w| (&w.key, w)).collect();
        let watches = self
            .watches
            .iter()
            .map(|w| match wbefore.get(&w.key) {
                None => w.clone(),
                Some(b) => WatchCount {
                    key: w.key.clone(),
                    opened: w.opened.saturating_sub(b.opened),
                    open: w.open,
                    queued: w.queued,
                    events: w.events.saturating_sub(b.events),
                    bytes: w.bytes.saturating_sub(b.bytes),
                    by_type: w
                        .by_type
                        .iter()
                        .map(|(t, n)| {
                            (
                                t.clone(),
                                n.saturating_sub(b.by_type.get(t).copied().unwrap_or(0)),
                            )
                        })
                        .filter(|(_, n)| *n > 0)
                        .collect(),
                },
            })
            .filter(|w| w.opened > 0 || w.open > 0 || w.events > 0)
            .collect();
        Snapshot {
            requests,
            watches,
            objects_examined: self
                .objects_examined
                .saturating_sub(earlier.objects_examined),
            watchers_examined: self
                .watchers_examined
                .saturating_sub(earlier.watchers_examined),
            objects_encoded: self.objects_encoded.saturating_sub(earlier.objects_encoded),
            watches_overflowed: self
                .watches_overflowed
                .saturating_sub(earlier.watches_overflowed),
        }
    }

    /// Requests whose key satisfies `f`.
    pub fn count(&self, f: impl Fn(&RequestKey) -> bool) -> u64 {
        self.requests
            .iter()
            .filter(|r| f(&r.key))
            .map(|r| r.count)
            .sum()
    }

    /// Every request counted.
    pub fn requests_total(&self) -> u64 {
        self.count(|_| true)
    }

    /// Requests of one verb on one resource plural (any group, subresource, manager).
    pub fn requests(&self, verb: &str, resource: &str) -> u64 {
        self.count(|k| k.verb == verb && k.resource == resource)
    }

    fn group_by(&self, f: impl Fn(&RequestKey) -> Option<String>) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for r in &self.requests {
            if let Some(k) = f(&r.key) {
                add_to(&mut m, &k, r.count);
            }
        }
        m
    }

    /// Requests by verb.
    pub fn by_verb(&self) -> BTreeMap<String, u64> {
        self.group_by(|k| Some(k.verb.clone()))
    }

    /// Resource requests by `group/version/resource` (`v1/pods` for core), with
    /// `/subresource` appended where there is one.
    pub fn by_resource(&self) -> BTreeMap<String, u64> {
        self.group_by(|k| {
            (!k.resource.is_empty()).then(|| {
                let gv = if k.group.is_empty() {
                    k.version.clone()
                } else {
                    format!("{}/{}", k.group, k.version)
                };
                match &k.subresource {
                    Some(s) => format!("{gv}/{}/{s}", k.resource),
                    None => format!("{gv}/{}", k.resource),
                }
            })
        })
    }

    /// Writes by `fieldManager` (requests without one are left out).
    pub fn by_field_manager(&self) -> BTreeMap<String, u64> {
        self.group_by(|k| k.field_manager.clone())
    }

    /// Requests by `User-Agent`.
    pub fn by_user_agent(&self) -> BTreeMap<String, u64> {
        self.group_by(|k| Some(k.user_agent.clone()))
    }

    /// Requests by status code.
    pub fn by_code(&self) -> BTreeMap<String, u64> {
        self.group_by(|k| Some(k.code.to_string()))
    }

    /// The watches whose key satisfies `f`, summed into one count (key left default).
    pub fn watch(&self, f: impl Fn(&WatchKey) -> bool) -> WatchCount {
        let mut sum = WatchCount::default();
        for w in self.watches.iter().filter(|w| f(&w.key)) {
            sum.opened += w.opened;
            sum.open += w.open;
            sum.queued += w.queued;
            sum.events += w.events;
            sum.bytes += w.bytes;
            for (t, n) in &w.by_type {
                add_to(&mut sum.by_type, t, *n);
            }
        }
        sum
    }

    /// Every watch, summed.
    pub fn watch_total(&self) -> WatchCount {
        self.watch(|_| true)
    }

    /// The `GET /_sim/stats` document: totals, the usual groupings, and every entry.
    pub fn to_json(&self) -> Value {
        let total = self.watch_total();
        json!({
            "requests": {
                "total": self.requests_total(),
                "byVerb": self.by_verb(),
                "byResource": self.by_resource(),
                "byFieldManager": self.by_field_manager(),
                "byUserAgent": self.by_user_agent(),
                "byCode": self.by_code(),
                "entries": self.requests,
            },
            "watches": {
                "opened": total.opened,
                "open": total.open,
                "queued": total.queued,
                "events": total.events,
                "bytes": total.bytes,
                "byType": total.by_type,
                "overflowed": self.watches_overflowed,
                "entries": self.watches,
            },
            "store": {
                "objectsExamined": self.objects_examined,
                "watchersExamined": self.watchers_examined,
                "objectsEncoded": self.objects_encoded,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(verb: &str, manager: Option<&str>) -> RequestKey {
        RequestKey {
            verb: verb.into(),
            group: "tether.dev".into(),
            version: "v1alpha1".into(),
            resource: "connectionpools".into(),
            subresource: Some("status".into()),
            field_manager: manager.map(str::to_string),
            user_agent: "t".into(),
            content_type: None,
            code: 200,
            path: None,
        }
    }

    #[test]
    fn since_subtracts_counters_and_keeps_gauges() {
        let s = Stats::default();
        s.record_request(key("patch", Some("pod-0")));
        let tap = s.open_watch(WatchKey {
            resource: "v1/pods".into(),
            ..Default::default()
        });
        tap.frame("ADDED", 10);
        let before = s.snapshot();
        s.record_request(key("patch", Some("pod-0")));
        s.record_request(key("patch", Some("pod-1")));
        s.record_request(key("get", None));
        tap.frame("MODIFIED", 7);
        tap.frame("BOOKMARK", 3);
        s.objects_examined(4);
        let d = s.snapshot().since(&before);
        assert_eq!(d.requests_total(), 3);
        assert_eq!(d.requests("patch", "connectionpools"), 2);
        assert_eq!(d.by_field_manager()["pod-1"], 1);
        assert_eq!(
            d.by_resource()["tether.dev/v1alpha1/connectionpools/status"],
            3
        );
        let w = d.watch_total();
        assert_eq!((w.opened, w.open, w.events, w.bytes), (0, 1, 2, 10));
        assert_eq!(w.by_type["MODIFIED"], 1);
        assert_eq!(d.objects_examined, 4);
        drop(tap);
        assert_eq!(s.snapshot().watch_total().open, 0);
        s.reset();
        assert_eq!(s.snapshot(), Snapshot::default());
    }
}
