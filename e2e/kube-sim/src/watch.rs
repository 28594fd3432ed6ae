//! Watch streams: newline-delimited JSON `{"type": ..., "object": ...}` events, filtered by
//! selectors (an object that stops matching is sent as DELETED, one that starts matching
//! as ADDED, as the real watch cache does), with bookmarks, `sendInitialEvents`, a timeout,
//! and the 410 Gone ERROR event for a too-old resourceVersion.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::registry::ResourceType;
use crate::selector::{FieldSelector, LabelSelector};
use crate::stats::WatchTap;
use crate::store::{Event, EventType, Store, WatchStart};

/// How a watch renders and filters events.
#[derive(Clone)]
pub struct WatchSpec {
    /// Resource type.
    pub rt: Arc<ResourceType>,
    /// Version to render objects in.
    pub version: String,
    /// Label selector.
    pub labels: LabelSelector,
    /// Field selector.
    pub fields: FieldSelector,
    /// Send BOOKMARK events.
    pub bookmarks: bool,
    /// How often a bookmark is sent.
    pub bookmark_interval: Duration,
    /// End the stream after this long.
    pub timeout: Option<Duration>,
    /// Mark the end of the initial events with a bookmark (`sendInitialEvents=true`).
    pub initial_events_end: bool,
    /// Render objects as single-row Tables (`kubectl get -w`).
    pub table: Option<String>,
}

/// What a watch sends as an event's object.
enum Payload {
    /// The stored object's bytes, as serialized once for every watcher.
    Shared(Bytes),
    /// An object this watch decoded (to select on its content, convert or tabulate it).
    Decoded(Value),
}

impl WatchSpec {
    fn render(&self, obj: Value) -> Value {
        let mut o = obj;
        o["apiVersion"] = json!(self.rt.api_version(&self.version));
        o
    }

    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(obj) && self.fields.matches(obj)
    }

    /// Maps a store event to the (type, object) to send, if any.
    fn translate(&self, e: &Event) -> Option<(&'static str, Payload)> {
        // The common watch (no label selector, fields only by name or namespace, objects
        // served as stored) sends the stored bytes: nothing to decode or re-encode. Name
        // and namespace never change, so an object matched before a change iff it matches
        // after.
        let as_stored = self.table.is_none()
            && !crate::events::is_events_v1(&self.rt)
            && e.api_version == self.rt.api_version(&self.version);
        if as_stored
            && self.labels.is_empty()
            && let Some(now) = self.fields.matches_name(e.namespace.as_deref(), &e.name)
        {
            return now.then(|| (e.kind.as_str(), Payload::Shared(e.object.clone())));
        }
        // Selectors apply to the object as this resource serves it (events.k8s.io/v1
        // Events are stored as core/v1 Events).
        let stored = e.object_value();
        let obj = crate::events::read_as(&self.rt, &stored);
        let now = self.matches(&obj);
        let kind = match (e.kind, e.old_value()) {
            (EventType::Modified, Some(old)) => {
                match (self.matches(&crate::events::read_as(&self.rt, &old)), now) {
                    (true, true) => EventType::Modified,
                    (false, true) => EventType::Added,
                    (true, false) => EventType::Deleted,
                    (false, false) => return None,
                }
            }
            (k, _) if now => k,
            _ => return None,
        };
        Some((
            kind.as_str(),
            Payload::Decoded(self.render(obj.into_owned())),
        ))
    }
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

/// `{"type":TYPE,"object":OBJECT}` and a newline, around an already serialized object.
fn shared_line(typ: &str, object: &[u8]) -> Bytes {
    let head = format!("{{\"type\":\"{typ}\",\"object\":");
    let mut b = Vec::with_capacity(head.len() + object.len() + 2);
    b.extend_from_slice(head.as_bytes());
    b.extend_from_slice(object);
    b.extend_from_slice(b"}\n");
    Bytes::from(b)
}

fn bookmark(spec: &WatchSpec, rv: u64, end_of_initial: bool) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if end_of_initial {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": spec.rt.kind, "apiVersion": spec.rt.api_version(&spec.version), "metadata": meta}})
}

/// A stream carrying one ERROR event (e.g. 410 Gone) and then ending.
pub fn error_stream(status: Value, tap: WatchTap) -> impl Stream<Item = Result<Bytes, Infallible>> {
    let l = line(&json!({"type": "ERROR", "object": status}));
    tap.frame("ERROR", l.len());
    futures::stream::iter([Ok(l)])
}

struct Running {
    spec: WatchSpec,
    store: Arc<Store>,
    backlog: std::vec::IntoIter<Arc<Event>>,
    rx: mpsc::Receiver<Arc<Event>>,
    /// Live events waiting in `rx` (the store adds, taking from `rx` subtracts).
    queued: Arc<AtomicU64>,
    tap: WatchTap,
    last_rv: u64,
    initial_end: Option<u64>,
    deadline: Option<Instant>,
    next_bookmark: Instant,
    headers_sent: bool,
}

impl Running {
    fn took(&self) {
        self.queued.fetch_sub(1, Relaxed);
    }

    fn frame(&mut self, typ: &str, payload: Payload) -> Bytes {
        let b = match payload {
            Payload::Shared(object) => shared_line(typ, &object),
            Payload::Decoded(obj) => {
                self.store.stats().objects_encoded(1);
                self.encode(typ, obj)
            }
        };
        self.tap.frame(typ, b.len());
        b
    }

    fn bookmark(&mut self, rv: u64, end_of_initial: bool) -> Bytes {
        let b = line(&bookmark(&self.spec, rv, end_of_initial));
        self.tap.frame("BOOKMARK", b.len());
        b
    }

    fn encode(&mut self, typ: &str, obj: Value) -> Bytes {
        let obj = match &self.spec.table {
            Some(include) => {
                let rv = obj
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let t = crate::table::table(
                    &self.spec.rt,
                    &self.spec.version,
                    &[obj],
                    &rv,
                    include,
                    !self.headers_sent,
                );
                self.headers_sent = true;
                t
            }
            None => obj,
        };
        line(&json!({"type": typ, "object": obj}))
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(e) = self.backlog.next() {
                self.last_rv = self.last_rv.max(e.rv);
                if let Some((t, o)) = self.spec.translate(&e) {
                    return Some(self.frame(t, o));
                }
                continue;
            }
            if let Some(rv) = self.initial_end.take() {
                return Some(self.bookmark(rv, true));
            }
            let sleep_until = match self.deadline {
                Some(d) if !self.spec.bookmarks || d < self.next_bookmark => d,
                _ if self.spec.bookmarks => self.next_bookmark,
                _ => Instant::now() + Duration::from_secs(3600),
            };
            tokio::select! {
                e = self.rx.recv() => {
                    let e = e?;
                    self.took();
                    self.last_rv = self.last_rv.max(e.rv);
                    if let Some((t, o)) = self.spec.translate(&e) {
                        return Some(self.frame(t, o));
                    }
                }
                _ = tokio::time::sleep_until(sleep_until) => {
                    if self.deadline.is_some_and(|d| Instant::now() >= d) {
                        return None;
                    }
                    if self.spec.bookmarks {
                        self.next_bookmark = Instant::now() + self.spec.bookmark_interval;
                        // Everything up to `rv` is already queued: drain it first so the
                        // bookmark never claims a version whose events are still unsent.
                        let rv = self.store.resource_version();
                        let mut pending = Vec::new();
                        while let Ok(e) = self.rx.try_recv() {
                            self.took();
                            pending.push(e);
                        }
                        if !pending.is_empty() {
                            self.backlog = pending.into_iter();
                            // Bookmark follows on the next timer tick.
                            continue;
                        }
                        let rv = rv.max(self.last_rv);
                        self.last_rv = rv;
                        return Some(self.bookmark(rv, false));
                    }
                }
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A stream that ends (or whose client goes away) leaves nothing queued.
        self.rx.close();
        while self.rx.try_recv().is_ok() {
            self.took();
        }
    }
}

/// The event stream of a started watch; `tap` counts what it hands to the connection.
pub fn stream(
    spec: WatchSpec,
    store: Arc<Store>,
    start: WatchStart,
    tap: WatchTap,
) -> impl Stream<Item = Result<Bytes, Infallible>> {
    let WatchStart {
        backlog,
        rx,
        rv: start_rv,
        queued,
    } = start;
    let now = Instant::now();
    let running = Running {
        initial_end: spec.initial_events_end.then_some(start_rv),
        deadline: spec.timeout.map(|t| now + t),
        next_bookmark: now + spec.bookmark_interval,
        spec,
        store,
        backlog: backlog.into_iter(),
        rx,
        queued,
        tap,
        last_rv: start_rv,
        headers_sent: false,
    };
    futures::stream::unfold(running, |mut r| async move {
        r.next().await.map(|b| (Ok(b), r))
    })
}
