//! The in-memory object store: one global `resourceVersion` counter, objects per resource
//! type, a bounded event log per type (so a too-old watch gets 410 Gone), watcher fan-out,
//! and the write pipeline every create/update/patch/apply/delete goes through.
//!
//! ```text
//!  HTTP handler ──► Store::{create,replace,patch,delete,...}
//!                     │  (one Mutex: a write is atomic with its event)
//!                     ├─ prepare: subresource isolation, metadata rules, CR prune/default/validate,
//!                     │           generation, managedFields, finalizers
//!                     ├─ commit:  rv += 1, object map, event log (bounded), watchers (unbounded mpsc)
//!                     └─ notify the garbage collector after deletions
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};

use crate::builtin;
use crate::error::{ApiError, Cause, Result};
use crate::patch;
use crate::registry::{Registry, ResourceKey, ResourceType, TypeCursor, from_crd};
use crate::schema;
use crate::selector::{FieldSelector, LabelSelector};
use crate::ssa::{self, ApplyRequest};
use crate::stats::Stats;

/// Watch event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Object created.
    Added,
    /// Object changed.
    Modified,
    /// Object removed.
    Deleted,
}

impl EventType {
    /// The wire name (`ADDED` ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as kept in the log and sent to watchers.
///
/// The object is serialized once, when the change is made, and those bytes are what every
/// watcher is sent and what the log keeps: a pool's status report used to be cloned into
/// the log twice (old and new object, as trees) and serialized again for each watcher.
/// A MODIFIED event's `old` is the previous event's bytes, shared rather than copied.
#[derive(Debug, Clone)]
pub struct Event {
    /// resourceVersion of the change.
    pub rv: u64,
    /// What happened.
    pub kind: EventType,
    /// The object's namespace (None when cluster-scoped).
    pub namespace: Option<String>,
    /// The object's name.
    pub name: String,
    /// The apiVersion the object is stored in.
    pub api_version: String,
    /// The object after the change (before it, for DELETED, with the deletion's rv), as
    /// JSON in storage form.
    pub object: Bytes,
    /// The object before the change (MODIFIED only), so selector watches can emit
    /// DELETED/ADDED when an object stops/starts matching, as the real watch cache does.
    pub old: Option<Bytes>,
}

// === impl Event ===

impl Event {
    fn new(rv: u64, kind: EventType, obj: &Value, object: Bytes, old: Option<Bytes>) -> Event {
        Event {
            rv,
            kind,
            namespace: meta_str(obj, "namespace").map(str::to_string),
            name: meta_str(obj, "name").unwrap_or("").to_string(),
            api_version: obj
                .get("apiVersion")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            object,
            old,
        }
    }

    /// The object, decoded (for watches that select on or convert its content).
    pub fn object_value(&self) -> Value {
        serde_json::from_slice(&self.object).unwrap_or_default()
    }

    /// The object before the change, decoded.
    pub fn old_value(&self) -> Option<Value> {
        self.old
            .as_ref()
            .map(|b| serde_json::from_slice(b).unwrap_or_default())
    }

    /// Bytes this event keeps that no other event shares: the serialized object (its
    /// `old` is the previous version's bytes).
    pub fn retained_bytes(&self) -> usize {
        self.object.len()
    }
}

/// An object serialized as it is stored and sent.
fn encode(obj: &Value) -> Bytes {
    Bytes::from(serde_json::to_vec(obj).expect("a JSON value serializes"))
}

/// etcd's default `--max-request-bytes` (1.5 MiB): a write whose stored object is larger
/// is refused by etcd, and the API server answers with its error (500).
pub const MAX_OBJECT_BYTES: usize = 1_572_864;

/// The API server's request body limit (`MaxRequestBodyBytes`, 3 MiB): larger bodies get
/// 413 before they are decoded.
pub const MAX_REQUEST_BYTES: usize = 3 << 20;

/// An object serialized for storage, refused as etcd refuses it when over its limit.
fn encode_stored(obj: &Value) -> Result<Bytes> {
    let b = encode(obj);
    if b.len() > MAX_OBJECT_BYTES {
        // The etcd client's error, passed through by the API server as an unknown
        // (reason-less) 500.
        return Err(ApiError::new(500, "", "etcdserver: request is too large"));
    }
    Ok(b)
}

/// Strict decoding of a built-in kind (see [`crate::builtin`]): the unknown fields are
/// refused (`Strict`), or pruned and returned as warnings (`Warn`), or pruned (`Ignore`).
fn decode_builtin(
    rt: &ResourceType,
    version: &str,
    obj: &mut Value,
    v: FieldValidation,
) -> Result<Vec<String>> {
    let cannot = |msg: &str| {
        ApiError::bad_request(format!(
            "{} in version \"{version}\" cannot be handled as a {}: {msg}",
            rt.kind, rt.kind
        ))
    };
    let d = builtin::decode(rt, obj, v != FieldValidation::Strict).map_err(|e| cannot(&e))?;
    let list: Vec<String> = d
        .unknown
        .iter()
        .map(|p| format!("unknown field \"{p}\""))
        .collect();
    match v {
        _ if list.is_empty() => Ok(list),
        FieldValidation::Strict => Err(cannot(&format!(
            "strict decoding error: {}",
            list.join(", ")
        ))),
        FieldValidation::Warn => Ok(list),
        FieldValidation::Ignore => Ok(vec![]),
    }
}

/// What a watch starts with.
pub struct WatchStart {
    /// Events to send first (synthetic ADDED for a fresh watch, or the log backlog).
    pub backlog: Vec<Arc<Event>>,
    /// Live events (shared: one event is allocated once, whatever the number of watchers).
    pub rx: mpsc::Receiver<Arc<Event>>,
    /// Current resourceVersion when the watch started.
    pub rv: u64,
    /// Live events sent to `rx` and not yet taken from it: whoever reads `rx` subtracts
    /// what it takes (a watch stream stops taking when its client stops reading).
    pub queued: Arc<AtomicU64>,
}

/// Server-side field validation mode (`fieldValidation` query parameter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FieldValidation {
    /// Unknown fields fail the request (400).
    Strict,
    /// Unknown fields are dropped with a `Warning` header (the default since 1.27).
    #[default]
    Warn,
    /// Unknown fields are dropped silently.
    Ignore,
}

/// Identifies what a request addresses.
#[derive(Debug, Clone)]
pub struct Target {
    /// The resource type.
    pub rt: Arc<ResourceType>,
    /// Requested version.
    pub version: String,
    /// Namespace (namespaced types; None lists across namespaces).
    pub namespace: Option<String>,
    /// Object name.
    pub name: Option<String>,
    /// `status` or `scale`.
    pub subresource: Option<String>,
}

/// Options shared by writes.
#[derive(Debug, Clone, Default)]
pub struct WriteOpts {
    /// `fieldManager` query parameter.
    pub manager: Option<String>,
    /// User-Agent, from which the real server derives the default manager.
    pub user_agent: String,
    /// `dryRun=All`.
    pub dry_run: bool,
    /// `fieldValidation`.
    pub validation: FieldValidation,
    /// `force` (apply only).
    pub force: bool,
}

/// PATCH flavours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/json-patch+json`.
    Json,
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml`.
    Apply,
}

/// DELETE options (query or `DeleteOptions` body).
#[derive(Debug, Clone, Default)]
pub struct DeleteOpts {
    /// `Background` (default), `Foreground` or `Orphan`.
    pub propagation: Option<String>,
    /// `preconditions.uid`.
    pub uid: Option<String>,
    /// `preconditions.resourceVersion`.
    pub resource_version: Option<String>,
    /// `dryRun=All`.
    pub dry_run: bool,
}

/// A successful write and the warnings to send with it.
#[derive(Debug, Clone)]
pub struct Written {
    /// The object as stored (shared with the store: a write copies nothing to answer).
    pub object: Arc<Value>,
    /// `Warning` headers.
    pub warnings: Vec<String>,
    /// `object` as JSON, when the write's event already serialized exactly it (an update
    /// stored in the form it is served in): the response reuses those bytes.
    pub encoded: Option<Bytes>,
}

/// The result of a DELETE.
#[derive(Debug, Clone)]
pub enum Deleted {
    /// Removed now (the object as it was).
    Gone(Value),
    /// Waiting on finalizers (the object with `deletionTimestamp`).
    Pending(Value),
}

/// An object's key within its type: (namespace, or "" when cluster-scoped; name).
pub type ObjKey = (String, String);

/// A stored object's address: storage type, namespace, name.
pub(crate) type ObjRef = (ResourceKey, String, String);

/// Which watchers an event may concern: (namespace, name), `None` meaning any.
type Scope = (Option<String>, Option<String>);

/// Watchers of one type, bucketed by scope so that an event is offered only to the
/// watchers of all namespaces, of its namespace, and of its exact name (a pod watching
/// its own Pod by `metadata.name` costs nothing to the other pods' events).
#[derive(Default)]
struct Watchers {
    scopes: HashMap<Scope, Vec<Sink>>,
    added: usize,
}

/// Events a watcher may have waiting (written by the store, not yet handed to its
/// connection) before the stand-in closes it, by default.
pub const DEFAULT_WATCH_BUFFER: usize = 10_000;

/// One watcher: its bounded channel, and the gauge of the events waiting in it.
struct Sink {
    tx: mpsc::Sender<Arc<Event>>,
    queued: Arc<AtomicU64>,
    stats: Stats,
}

impl Sink {
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Sends `ev`; false when the watch has ended, or when its buffer is full: the real
    /// watch cache closes a watcher whose buffer stays full rather than let it hold the
    /// others up or grow without bound. Dropping this sender ends the watch: its stream
    /// sends what the buffer holds, then ends, and the client re-watches.
    fn offer(&self, ev: &Arc<Event>) -> bool {
        // Counted before the send, so the reader never takes an event not yet counted.
        self.queued.fetch_add(1, Relaxed);
        match self.tx.try_send(ev.clone()) {
            Ok(()) => true,
            Err(e) => {
                self.queued.fetch_sub(1, Relaxed);
                if matches!(e, mpsc::error::TrySendError::Full(_)) {
                    self.stats.watch_overflowed();
                }
                false
            }
        }
    }
}

impl Watchers {
    fn add(&mut self, scope: Scope, tx: Sink) {
        // Closed watchers of a quiet bucket would otherwise linger until its next event:
        // sweep this bucket now, and every bucket once per 1,024 watches (amortized O(1)).
        self.added += 1;
        if self.added.is_multiple_of(1024) {
            self.scopes.retain(|_, b| {
                b.retain(|t| !t.is_closed());
                !b.is_empty()
            });
        }
        let bucket = self.scopes.entry(scope).or_default();
        bucket.retain(|t| !t.is_closed());
        bucket.push(tx);
    }

    /// Sends `ev` to the watchers it may concern; returns how many were considered.
    fn send(&mut self, ev: &Arc<Event>, ns: Option<&str>, name: &str) -> u64 {
        let ns = ns.map(str::to_string);
        let name = Some(name.to_string());
        let mut scopes: Vec<Scope> = vec![(None, None), (None, name.clone())];
        if ns.is_some() {
            scopes.push((ns.clone(), None));
            scopes.push((ns, name));
        }
        let mut examined = 0;
        for scope in scopes {
            if let Some(bucket) = self.scopes.get_mut(&scope) {
                examined += bucket.len() as u64;
                bucket.retain(|tx| tx.offer(ev));
                if bucket.is_empty() {
                    self.scopes.remove(&scope);
                }
            }
        }
        examined
    }
}

#[derive(Default)]
struct TypeState {
    /// Shared, so that reading an object for a write (and answering it) copies nothing:
    /// a write builds a new version and swaps it in.
    objects: BTreeMap<ObjKey, Arc<Value>>,
    /// Label index for equality selectors: key → value → objects.
    labels: HashMap<String, HashMap<String, BTreeSet<ObjKey>>>,
    /// Each object as last serialized (by the event of its last change): the next
    /// change's `old`, and a new watch's initial ADDED, without serializing it again.
    encoded: HashMap<ObjKey, Bytes>,
    /// Event log, ordered by resourceVersion.
    log: VecDeque<Arc<Event>>,
    /// Highest resourceVersion dropped from the log: watches from before it get 410.
    compacted: u64,
    watchers: Watchers,
}

pub(crate) struct State {
    rv: u64,
    pub(crate) registry: Registry,
    types: HashMap<ResourceKey, TypeState>,
    history: usize,
    /// uid → object, for the garbage collector.
    uids: HashMap<String, ObjRef>,
    /// owner uid → objects whose ownerReferences name it.
    dependents: HashMap<String, BTreeSet<ObjRef>>,
    /// Objects the garbage collector must look at (queued by the writes that concern it).
    gc_queue: BTreeSet<ObjRef>,
    stats: Stats,
    /// The cluster IP allocator's counter.
    cluster_ips: u32,
    /// Events a watcher may have waiting before it is closed (see [`Sink::offer`]).
    watch_buffer: usize,
}

/// One page of a list.
#[derive(Debug, Clone, Default)]
pub struct Page {
    /// Matching objects, in (namespace, name) order.
    pub items: Vec<Value>,
    /// The list's resourceVersion.
    pub rv: u64,
    /// Matching objects after this page (for `remainingItemCount`).
    pub remaining: usize,
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    state: Mutex<State>,
    /// Woken after writes that queued work for the garbage collector.
    pub(crate) gc: Notify,
    stats: Stats,
}

/// The key objects of a resource type are stored under: the Event kinds of core/v1 and
/// events.k8s.io/v1 are one storage, as on a real cluster.
pub fn storage_key(rt: &ResourceType) -> ResourceKey {
    if rt.group == "events.k8s.io" && rt.plural == "events" {
        (String::new(), "events".into())
    } else {
        rt.key()
    }
}

fn labels_of(obj: &Value) -> Vec<(String, String)> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn uid_of(obj: &Value) -> Option<&str> {
    obj.pointer("/metadata/uid").and_then(Value::as_str)
}

pub(crate) fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn deleting(obj: &Value) -> bool {
    obj.pointer("/metadata/deletionTimestamp").is_some()
}

/// Current time, RFC 3339 with second precision as the real server writes it.
pub fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")?.get(field)?.as_str()
}

fn meta_mut(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let root = obj.as_object_mut().expect("object");
    let m = root.entry("metadata").or_insert_with(|| json!({}));
    if !m.is_object() {
        *m = json!({});
    }
    m.as_object_mut().expect("metadata object")
}

/// A DELETE's preconditions, checked as the real server's `rest.BeforeDelete` does before
/// anything else: a UID that is not the stored object's (the name now belongs to a
/// re-created object) or a resourceVersion that is not its current one (it changed since
/// it was read) is 409 Conflict. `BeforeDelete` qualifies the object by its kind, not its
/// resource (`Operation cannot be fulfilled on Pod "web-0": ...`,
/// `... on StatefulSet.apps "web": ...`), and so do `details.kind` and `details.group`.
fn check_delete_preconditions(
    rt: &ResourceType,
    name: &str,
    stored: &Value,
    d: &DeleteOpts,
) -> Result<()> {
    let conflict = |why: String| Err(ApiError::conflict(&rt.group, &rt.kind, name, &why));
    if let Some(uid) = &d.uid {
        let actual = meta_str(stored, "uid").unwrap_or("");
        if uid != actual {
            return conflict(format!(
                "the UID in the precondition ({uid}) does not match the UID in record ({actual}). The object might have been deleted and then recreated"
            ));
        }
    }
    if let Some(rv) = &d.resource_version {
        let actual = meta_str(stored, "resourceVersion").unwrap_or("");
        if rv != actual {
            return conflict(format!(
                "the ResourceVersion in the precondition ({rv}) does not match the ResourceVersion in record ({actual}). The object might have been modified"
            ));
        }
    }
    Ok(())
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The field manager the real server records when none is given: the User-Agent up to '/'.
fn manager_name(o: &WriteOpts) -> String {
    if let Some(m) = &o.manager {
        return m.clone();
    }
    let ua = o.user_agent.split('/').next().unwrap_or("").trim();
    if ua.is_empty() {
        "unknown".into()
    } else {
        ua.chars().take(128).collect()
    }
}

/// Names: DNS-1123 subdomains, except RBAC kinds that allow path-segment names.
fn validate_name(rt: &ResourceType, name: &str) -> Option<Cause> {
    let bad = |msg: String| {
        Some(Cause {
            reason: "FieldValueInvalid".into(),
            message: format!("Invalid value: \"{name}\": {msg}"),
            field: "metadata.name".into(),
        })
    };
    if rt.group == "rbac.authorization.k8s.io" {
        if name == "." || name == ".." || name.contains('/') || name.contains('%') {
            return bad("may not contain '/' or '%'".into());
        }
        return None;
    }
    let label_ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    let max = if rt.plural == "namespaces" || rt.plural == "services" {
        63
    } else {
        253
    };
    let ok = name.len() <= max
        && if max == 63 {
            label_ok(name)
        } else {
            name.split('.').all(label_ok)
        };
    if ok {
        None
    } else {
        bad(format!(
            "a lowercase RFC 1123 {} must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            if max == 63 { "label" } else { "subdomain" }
        ))
    }
}

/// Whether a write changes nothing that counts: equal but for `resourceVersion` and the
/// times in managedFields. Compared in place (objects may be large; no copies).
fn unchanged(old: &Value, new: &Value) -> bool {
    let (Value::Object(a), Value::Object(b)) = (old, new) else {
        return old == new;
    };
    let same_top = |k: &String| k == "metadata" || a.get(k) == b.get(k);
    if !(a.keys().all(same_top) && b.keys().all(same_top)) {
        return false;
    }
    let empty = serde_json::Map::new();
    let ma = a
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let mb = b
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let same_meta =
        |k: &String| k == "resourceVersion" || k == "managedFields" || ma.get(k) == mb.get(k);
    if !(ma.keys().all(same_meta) && mb.keys().all(same_meta)) {
        return false;
    }
    fn managed(m: &serde_json::Map<String, Value>) -> &[Value] {
        m.get("managedFields")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
    let (ma, mb) = (managed(ma), managed(mb));
    ma.len() == mb.len()
        && ma.iter().zip(mb).all(|(x, y)| match (x, y) {
            (Value::Object(x), Value::Object(y)) => {
                let same = |k: &String| k == "time" || x.get(k) == y.get(k);
                x.keys().all(same) && y.keys().all(same)
            }
            _ => x == y,
        })
}

/// Whether the "spec" (for generation: everything but metadata, and status when the
/// status subresource exists, as the CRD and workload strategies of the real server
/// count it) is the same in both. Compared in place.
fn same_spec(old: &Value, new: &Value, has_status: bool) -> bool {
    let (Value::Object(a), Value::Object(b)) = (old, new) else {
        return old == new;
    };
    let counts = |k: &String| {
        !(matches!(k.as_str(), "metadata" | "apiVersion" | "kind") || has_status && k == "status")
    };
    let same = |k: &String| !counts(k) || a.get(k) == b.get(k);
    a.keys().all(same) && b.keys().all(same)
}

/// Status isolation (the status strategies' PrepareForUpdate): a write through `/status`
/// changes only `status` (and, for an apply, the managedFields it computed); everything
/// else is put back to `old`'s, part by part, so the large unchanged parts are not copied.
fn isolate_status(new: &mut Value, old: &Value, keep_managed_fields: bool) {
    let empty = serde_json::Map::new();
    let o = old.as_object().unwrap_or(&empty);
    let Some(n) = new.as_object_mut() else {
        *new = old.clone();
        return;
    };
    n.retain(|k, _| k == "status" || o.contains_key(k));
    for (k, ov) in o {
        if k == "status" {
            continue;
        }
        if k == "metadata" && keep_managed_fields {
            let om = ov.as_object().unwrap_or(&empty);
            let nm = n.entry("metadata").or_insert_with(|| json!({}));
            if !nm.is_object() {
                *nm = json!({});
            }
            let nm = nm.as_object_mut().expect("object");
            nm.retain(|k, _| k == "managedFields" || om.contains_key(k));
            for (mk, mv) in om {
                if mk != "managedFields" && nm.get(mk) != Some(mv) {
                    nm.insert(mk.clone(), mv.clone());
                }
            }
            continue;
        }
        if n.get(k) != Some(ov) {
            n.insert(k.clone(), ov.clone());
        }
    }
}

/// Conversions and defaults the real server applies to every write of a built-in kind: a
/// Secret's `stringData` is merged into `data` (base64, `stringData` winning on a shared
/// key) and never stored or returned (`Convert_v1_Secret_To_core_Secret`); its `type`
/// defaults to `Opaque` (`SetDefaults_Secret`).
fn normalize_builtin(rt: &ResourceType, obj: &mut Value) {
    use base64::Engine;
    if !(rt.builtin && rt.group.is_empty() && rt.plural == "secrets") {
        return;
    }
    let Some(root) = obj.as_object_mut() else {
        return;
    };
    // SetDefaults_Secret.
    if root
        .get("type")
        .and_then(Value::as_str)
        .is_none_or(str::is_empty)
    {
        root.insert("type".into(), json!("Opaque"));
    }
    let Some(Value::Object(string_data)) = root.remove("stringData") else {
        return;
    };
    let data = root.entry("data").or_insert_with(|| json!({}));
    if !data.is_object() {
        *data = json!({});
    }
    let data = data.as_object_mut().expect("object");
    for (k, v) in string_data {
        let text = match v {
            Value::String(s) => s,
            Value::Null => String::new(),
            other => other.to_string(),
        };
        data.insert(
            k,
            json!(base64::engine::general_purpose::STANDARD.encode(text)),
        );
    }
}

// === impl Store ===

impl Store {
    /// A store with the built-in kinds, the default namespaces, and `history` events
    /// retained per resource type.
    pub fn new(history: usize) -> Store {
        let stats = Stats::default();
        let store = Store {
            state: Mutex::new(State {
                rv: 0,
                registry: Registry::with_builtins(),
                types: HashMap::new(),
                history: history.max(1),
                uids: HashMap::new(),
                dependents: HashMap::new(),
                gc_queue: BTreeSet::new(),
                stats: stats.clone(),
                cluster_ips: 0,
                watch_buffer: DEFAULT_WATCH_BUFFER,
            }),
            gc: Notify::new(),
            stats,
        };
        {
            let mut st = store.state.lock();
            let ns_type = st
                .registry
                .get(&(String::new(), "namespaces".into()))
                .expect("builtin");
            for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
                let t = Target {
                    rt: ns_type.clone(),
                    version: "v1".into(),
                    namespace: None,
                    name: None,
                    subresource: None,
                };
                let obj =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
                let opts = WriteOpts {
                    manager: Some("kube-apiserver".into()),
                    ..Default::default()
                };
                st.create(&t, obj, &opts).expect("default namespace");
            }
        }
        store
    }

    /// API accounting (requests, watches, and the store's own work).
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Objects queued for the garbage collector (0 once it has caught up with the writes).
    pub fn gc_pending(&self) -> usize {
        self.state.lock().gc_queue.len()
    }

    /// Number of stored objects of every type.
    pub fn object_count(&self) -> usize {
        self.state
            .lock()
            .types
            .values()
            .map(|ts| ts.objects.len())
            .sum()
    }

    /// The registry (a snapshot).
    pub fn registry(&self) -> Registry {
        self.state.lock().registry.clone()
    }

    /// Current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.state.lock().rv
    }

    /// Events the logs hold (all types) and the serialized bytes they keep between them:
    /// each event keeps its object once, as sent to watchers.
    pub fn history_size(&self) -> (usize, usize) {
        self.state.lock().log_bytes()
    }

    /// Sets how many events each type's log keeps (older watches get 410 Gone).
    pub fn set_history(&self, n: usize) {
        let mut st = self.state.lock();
        st.history = n.max(1);
        let keep = st.history;
        for ts in st.types.values_mut() {
            while ts.log.len() > keep {
                let e = ts.log.pop_front().expect("non-empty");
                ts.compacted = e.rv;
            }
        }
    }

    /// Drops every event log, as an etcd compaction does: any watch from an older
    /// resourceVersion than now gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.state.lock();
        let rv = st.rv;
        for ts in st.types.values_mut() {
            ts.log.clear();
            ts.compacted = rv;
        }
    }

    /// How many events a watcher may have waiting before it is closed (at least 1).
    pub fn set_watch_buffer(&self, n: usize) {
        self.state.lock().watch_buffer = n.max(1);
    }

    /// Ends every open watch stream (clients see the stream close and re-watch).
    pub fn drop_watches(&self) {
        let mut st = self.state.lock();
        for ts in st.types.values_mut() {
            ts.watchers = Watchers::default();
        }
    }

    /// Creates an object (POST).
    pub fn create(&self, t: &Target, body: Value, o: &WriteOpts) -> Result<Written> {
        let r = self.state.lock().create(t, body, o);
        self.gc.notify_one();
        r
    }

    /// Reads one object.
    pub fn get(&self, t: &Target) -> Result<Value> {
        self.state.lock().read(t)
    }

    /// Whether the object `t` names exists (without copying it out).
    pub fn exists(&self, t: &Target) -> bool {
        self.state.lock().get(t).is_ok()
    }

    /// Lists objects (namespace-filtered when `t.namespace` is set), with the list's rv.
    pub fn list(&self, t: &Target) -> (Vec<Value>, u64) {
        let p = self.select(
            t,
            &LabelSelector::default(),
            &FieldSelector::default(),
            None,
            None,
        );
        (p.items, p.rv)
    }

    /// Lists the objects matching the selectors, after `after` (a continue key), at most
    /// `limit` of them. Visits only the candidates of the namespace (a range of the
    /// ordered map), of a `metadata.name=` field selector (one lookup), or of a
    /// `key=value` label requirement (the label index) — never unrelated objects.
    pub fn select(
        &self,
        t: &Target,
        labels: &LabelSelector,
        fields: &FieldSelector,
        after: Option<&ObjKey>,
        limit: Option<usize>,
    ) -> Page {
        let st = self.state.lock();
        let mut page = Page {
            rv: st.rv,
            ..Default::default()
        };
        let Some(ts) = st.types.get(&storage_key(&t.rt)) else {
            return page;
        };
        let ns = if t.rt.namespaced {
            t.namespace.clone()
        } else {
            Some(String::new())
        };
        let mut visit = |k: &ObjKey, v: &Value| {
            if after.is_some_and(|a| k <= a) || ns.as_ref().is_some_and(|n| *n != k.0) {
                return;
            }
            self.stats.objects_examined(1);
            let v = st.read_as(t, v);
            if !(labels.matches(&v) && fields.matches(&v)) {
                return;
            }
            if limit.is_some_and(|l| page.items.len() >= l) {
                page.remaining += 1;
            } else {
                page.items.push(v.into_owned());
            }
        };
        let indexed = labels
            .equalities()
            .map(|(k, v)| {
                ts.labels
                    .get(k)
                    .and_then(|vals| vals.get(v))
                    .map(|keys| keys.len())
                    .unwrap_or(0)
            })
            .enumerate()
            .min_by_key(|(_, n)| *n);
        match (fields.pinned_name(), &ns, indexed) {
            (Some(name), Some(n), _) => {
                let k = (n.clone(), name.to_string());
                if let Some(v) = ts.objects.get(&k) {
                    visit(&k, v);
                }
            }
            (_, _, Some((i, _))) => {
                let (lk, lv) = labels.equalities().nth(i).expect("indexed requirement");
                for k in ts
                    .labels
                    .get(lk)
                    .and_then(|vals| vals.get(lv))
                    .into_iter()
                    .flatten()
                {
                    if let Some(v) = ts.objects.get(k) {
                        visit(k, v);
                    }
                }
            }
            _ => {
                let lower = match (&ns, after) {
                    (Some(n), Some(a)) if a.0 < *n => Bound::Included((n.clone(), String::new())),
                    (_, Some(a)) => Bound::Excluded(a.clone()),
                    (Some(n), None) => Bound::Included((n.clone(), String::new())),
                    (None, None) => Bound::Unbounded,
                };
                for (k, v) in ts.objects.range((lower, Bound::Unbounded)) {
                    if ns.as_ref().is_some_and(|n| *n != k.0) {
                        break;
                    }
                    visit(k, v);
                }
            }
        }
        page
    }

    /// Replaces an object (PUT), on the main resource or `/status`.
    pub fn replace(&self, t: &Target, body: Value, o: &WriteOpts) -> Result<Written> {
        let r = self.state.lock().replace(t, body, o);
        self.gc.notify_one();
        r
    }

    /// Patches an object, including server-side apply (which may create it).
    pub fn patch(
        &self,
        t: &Target,
        kind: PatchKind,
        body: Value,
        o: &WriteOpts,
    ) -> Result<Written> {
        let r = self.state.lock().patch(t, kind, body, o);
        self.gc.notify_one();
        r
    }

    /// Deletes an object.
    pub fn delete(&self, t: &Target, d: &DeleteOpts) -> Result<Deleted> {
        let r = self.state.lock().delete(t, d, "kube-apiserver");
        self.gc.notify_one();
        r
    }

    /// Starts a watch from `from` (None or 0: synthetic ADDED for the current objects).
    pub fn watch(&self, t: &Target, from: Option<u64>) -> Result<WatchStart> {
        self.watch_scoped(t, from, t.name.as_deref())
    }

    /// Starts a watch of the namespace in `t` (all namespaces when None) and, when `name`
    /// is set, of that one object: it is registered under that scope, so events of other
    /// objects never reach it (nor cost anything to send).
    pub fn watch_scoped(
        &self,
        t: &Target,
        from: Option<u64>,
        name: Option<&str>,
    ) -> Result<WatchStart> {
        self.watch_queued(t, from, name, Arc::default())
    }

    /// [`Store::watch_scoped`], counting the live events waiting for this watch in
    /// `queued` (shared by the watches of one accounting key, see [`crate::stats`]).
    pub(crate) fn watch_queued(
        &self,
        t: &Target,
        from: Option<u64>,
        name: Option<&str>,
        queued: Arc<AtomicU64>,
    ) -> Result<WatchStart> {
        let mut st = self.state.lock();
        let rv = st.rv;
        let ns = if t.rt.namespaced {
            t.namespace.clone()
        } else {
            None
        };
        let in_scope = |obj: &Value| {
            ns.as_deref()
                .is_none_or(|n| meta_str(obj, "namespace") == Some(n))
                && name.is_none_or(|n| meta_str(obj, "name") == Some(n))
        };
        let event_in_scope = |e: &Event| {
            ns.as_deref()
                .is_none_or(|n| e.namespace.as_deref() == Some(n))
                && name.is_none_or(|n| e.name == n)
        };
        let ts = st.types.entry(storage_key(&t.rt)).or_default();
        let mut examined = 0u64;
        let encoded = &ts.encoded;
        let backlog = match from {
            None | Some(0) => {
                let added = |o: &Arc<Value>| {
                    let key = (
                        meta_str(o, "namespace").unwrap_or("").to_string(),
                        meta_str(o, "name").unwrap_or("").to_string(),
                    );
                    let bytes = encoded.get(&key).cloned().unwrap_or_else(|| encode(o));
                    Arc::new(Event::new(rv, EventType::Added, o, bytes, None))
                };
                match (&ns, name) {
                    (_, Some(n)) => {
                        let k = (ns.clone().unwrap_or_default(), n.to_string());
                        match (&ns, t.rt.namespaced) {
                            // One object of one namespace (or of a cluster-scoped type).
                            (Some(_), _) | (None, false) => ts
                                .objects
                                .get(&k)
                                .into_iter()
                                .inspect(|_| examined += 1)
                                .map(added)
                                .collect(),
                            (None, true) => ts
                                .objects
                                .values()
                                .inspect(|_| examined += 1)
                                .filter(|o| in_scope(o))
                                .map(added)
                                .collect(),
                        }
                    }
                    (Some(n), None) => ts
                        .objects
                        .range((n.clone(), String::new())..)
                        .take_while(|(k, _)| k.0 == *n)
                        .inspect(|_| examined += 1)
                        .map(|(_, o)| added(o))
                        .collect(),
                    (None, None) => ts
                        .objects
                        .values()
                        .inspect(|_| examined += 1)
                        .map(added)
                        .collect(),
                }
            }
            Some(from) if from < ts.compacted => {
                // Wording of the real watch cache (storage/cacher: "too old resource version").
                return Err(ApiError::gone(format!(
                    "too old resource version: {from} ({})",
                    ts.compacted + 1
                )));
            }
            Some(from) => {
                // The log is ordered by resourceVersion: start at the first newer event.
                let first = ts.log.partition_point(|e| e.rv <= from);
                ts.log
                    .range(first..)
                    .inspect(|_| examined += 1)
                    .filter(|e| event_in_scope(e))
                    .cloned()
                    .collect()
            }
        };
        let (tx, rx) = mpsc::channel(st.watch_buffer.max(1));
        let sink = Sink {
            tx,
            queued: queued.clone(),
            stats: self.stats.clone(),
        };
        let ts = st.types.entry(storage_key(&t.rt)).or_default();
        ts.watchers.add((ns, name.map(str::to_string)), sink);
        self.stats.objects_examined(examined);
        Ok(WatchStart {
            backlog,
            rx,
            rv,
            queued,
        })
    }

    /// One stored object, shared, without counting it as examined (authorization reads
    /// RBAC objects on every request of a service account; the counters are the
    /// requests' own work). `ns` is "" for cluster-scoped kinds.
    pub fn peek(&self, key: &ResourceKey, ns: &str, name: &str) -> Option<Arc<Value>> {
        let st = self.state.lock();
        st.types
            .get(key)?
            .objects
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Every stored object of a type in one namespace ("" for cluster-scoped kinds),
    /// shared, without counting them as examined.
    pub fn peek_namespace(&self, key: &ResourceKey, ns: &str) -> Vec<Arc<Value>> {
        let st = self.state.lock();
        let Some(ts) = st.types.get(key) else {
            return vec![];
        };
        ts.objects
            .range((ns.to_string(), String::new())..)
            .take_while(|(k, _)| k.0 == ns)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Runs a closure over the locked state (garbage collector).
    pub(crate) fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock())
    }
}

// === impl State ===

impl State {
    fn objects(&self, key: &ResourceKey) -> impl Iterator<Item = &Value> {
        self.types
            .get(key)
            .into_iter()
            .flat_map(|ts| ts.objects.values().map(|v| &**v))
    }

    /// The stored object at `r`.
    pub(crate) fn object(&self, r: &ObjRef) -> Option<&Value> {
        let v = self
            .types
            .get(&r.0)?
            .objects
            .get(&(r.1.clone(), r.2.clone()))
            .map(|v| &**v);
        if v.is_some() {
            self.stats.objects_examined(1);
        }
        v
    }

    /// Whether an object with this uid exists.
    pub(crate) fn uid_exists(&self, uid: &str) -> bool {
        self.uids.contains_key(uid)
    }

    /// The objects whose ownerReferences name `uid`.
    pub(crate) fn dependents_of(&self, uid: &str) -> Vec<(ObjRef, Value)> {
        self.dependents
            .get(uid)
            .into_iter()
            .flatten()
            .filter_map(|r| self.object(r).map(|v| (r.clone(), v.clone())))
            .collect()
    }

    /// Every object in a namespace, of every namespaced type (namespace controller).
    pub(crate) fn namespace_contents(&self, ns: &str) -> Vec<(ObjRef, Value)> {
        let mut out = Vec::new();
        for (key, ts) in &self.types {
            if key.0.is_empty() && key.1 == "namespaces" {
                continue;
            }
            for (k, v) in ts
                .objects
                .range((ns.to_string(), String::new())..)
                .take_while(|(k, _)| k.0 == ns)
            {
                self.stats.objects_examined(1);
                out.push(((key.clone(), k.0.clone(), k.1.clone()), (**v).clone()));
            }
        }
        out
    }

    /// Takes the next object queued for the garbage collector.
    pub(crate) fn gc_pop(&mut self) -> Option<ObjRef> {
        self.gc_queue.pop_first()
    }

    pub(crate) fn target_of(&self, key: &ResourceKey, obj: &Value) -> Option<Target> {
        let rt = self.registry.get(key)?;
        Some(Target {
            version: rt.preferred().name.clone(),
            rt,
            namespace: meta_str(obj, "namespace").map(str::to_string),
            name: meta_str(obj, "name").map(str::to_string),
            subresource: None,
        })
    }

    fn ns_key(t: &Target, name: &str) -> (String, String) {
        (
            if t.rt.namespaced {
                t.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            },
            name.to_string(),
        )
    }

    /// The stored object `t` names, in storage form.
    fn get(&self, t: &Target) -> Result<&Value> {
        self.get_shared(t).map(|v| &**v)
    }

    /// The stored object `t` names, in storage form, as shared.
    fn get_shared(&self, t: &Target) -> Result<&Arc<Value>> {
        let name = t.name.as_deref().unwrap_or("");
        let v = self
            .types
            .get(&storage_key(&t.rt))
            .and_then(|ts| ts.objects.get(&Self::ns_key(t, name)))
            .ok_or_else(|| ApiError::not_found(&t.rt.group, &t.rt.plural, name))?;
        self.stats.objects_examined(1);
        Ok(v)
    }

    /// [`State::read`] without a copy when the stored form is the served form.
    fn read_shared(&self, t: &Target) -> Result<Arc<Value>> {
        let v = self.get_shared(t)?;
        Ok(match self.read_as(t, v) {
            std::borrow::Cow::Borrowed(_) => v.clone(),
            std::borrow::Cow::Owned(o) => Arc::new(o),
        })
    }

    /// The object `t` names, in the form of `t`'s resource (an events.k8s.io/v1 Event is
    /// stored as a core/v1 Event).
    fn read(&self, t: &Target) -> Result<Value> {
        let v = self.get(t)?;
        Ok(self.read_as(t, v).into_owned())
    }

    /// A stored object in the form of `t`'s resource.
    fn read_as<'v>(&self, t: &Target, stored: &'v Value) -> std::borrow::Cow<'v, Value> {
        crate::events::read_as(&t.rt, stored)
    }

    /// Inserts or replaces an object, keeping every index and queueing the garbage
    /// collector where the object concerns it (it has owners, or is being deleted).
    fn put(&mut self, key: &ResourceKey, ok: ObjKey, obj: Arc<Value>) {
        let r: ObjRef = (key.clone(), ok.0.clone(), ok.1.clone());
        let old = self
            .types
            .entry(key.clone())
            .or_default()
            .objects
            .insert(ok, obj);
        if let Some(old) = &old {
            self.unindex(&r, old);
        }
        let ts = self.types.get_mut(key).expect("just inserted");
        let obj = ts
            .objects
            .get(&(r.1.clone(), r.2.clone()))
            .expect("just inserted");
        for (k, v) in labels_of(obj) {
            ts.labels
                .entry(k)
                .or_default()
                .entry(v)
                .or_default()
                .insert((r.1.clone(), r.2.clone()));
        }
        let owners = owner_uids(obj);
        let queue = !owners.is_empty() || deleting(obj);
        if let Some(uid) = uid_of(obj) {
            self.uids.insert(uid.to_string(), r.clone());
        }
        for o in owners {
            self.dependents.entry(o).or_default().insert(r.clone());
        }
        if queue {
            self.gc_queue.insert(r);
        }
    }

    /// Removes an object, keeping every index, and queues what its removal concerns:
    /// its dependents (now perhaps orphans), its owners (a foreground deletion may be
    /// waiting for it) and its namespace (a namespace being deleted waits for it).
    fn take(&mut self, key: &ResourceKey, ok: &ObjKey) -> Option<Arc<Value>> {
        let obj = self.types.get_mut(key)?.objects.remove(ok)?;
        let r: ObjRef = (key.clone(), ok.0.clone(), ok.1.clone());
        self.unindex(&r, &obj);
        if let Some(uid) = uid_of(&obj) {
            let deps: Vec<ObjRef> = self
                .dependents
                .get(uid)
                .into_iter()
                .flatten()
                .cloned()
                .collect();
            self.gc_queue.extend(deps);
        }
        for o in owner_uids(&obj) {
            if let Some(owner) = self.uids.get(&o) {
                self.gc_queue.insert(owner.clone());
            }
        }
        if !ok.0.is_empty() {
            let ns: ObjRef = (
                (String::new(), "namespaces".into()),
                String::new(),
                ok.0.clone(),
            );
            if self.object(&ns).is_some_and(deleting) {
                self.gc_queue.insert(ns);
            }
        }
        Some(obj)
    }

    fn unindex(&mut self, r: &ObjRef, obj: &Value) {
        if let Some(ts) = self.types.get_mut(&r.0) {
            for (k, v) in labels_of(obj) {
                if let Some(vals) = ts.labels.get_mut(&k) {
                    if let Some(keys) = vals.get_mut(&v) {
                        keys.remove(&(r.1.clone(), r.2.clone()));
                        if keys.is_empty() {
                            vals.remove(&v);
                        }
                    }
                    if vals.is_empty() {
                        ts.labels.remove(&k);
                    }
                }
            }
        }
        if let Some(uid) = uid_of(obj)
            && self.uids.get(uid) == Some(r)
        {
            self.uids.remove(uid);
        }
        for o in owner_uids(obj) {
            if let Some(deps) = self.dependents.get_mut(&o) {
                deps.remove(r);
                if deps.is_empty() {
                    self.dependents.remove(&o);
                }
            }
        }
    }

    /// Records a change: serializes the object once, offers the event to its watchers,
    /// appends it to the log. `old` is the object before a MODIFIED change.
    fn emit(
        &mut self,
        key: &ResourceKey,
        rv: u64,
        kind: EventType,
        obj: &Value,
        old: Option<&Value>,
        bytes: Option<Bytes>,
    ) {
        let history = self.history;
        let ts = self.types.entry(key.clone()).or_default();
        let ok: ObjKey = (
            meta_str(obj, "namespace").unwrap_or("").to_string(),
            meta_str(obj, "name").unwrap_or("").to_string(),
        );
        let bytes = bytes.unwrap_or_else(|| encode(obj));
        let mut encoded = 1;
        let old = match (kind, old) {
            (EventType::Modified, Some(o)) => {
                Some(ts.encoded.get(&ok).cloned().unwrap_or_else(|| {
                    encoded += 1;
                    encode(o)
                }))
            }
            _ => None,
        };
        self.stats.objects_encoded(encoded);
        match kind {
            EventType::Deleted => ts.encoded.remove(&ok),
            _ => ts.encoded.insert(ok, bytes.clone()),
        };
        let ev = Arc::new(Event::new(rv, kind, obj, bytes, old));
        let examined = ts.watchers.send(&ev, ev.namespace.as_deref(), &ev.name);
        self.stats.watchers_examined(examined);
        ts.log.push_back(ev);
        while ts.log.len() > history {
            let e = ts.log.pop_front().expect("non-empty");
            ts.compacted = e.rv;
        }
    }

    /// Serialized bytes the event logs of every type keep (see [`Event::retained_bytes`]).
    fn log_bytes(&self) -> (usize, usize) {
        self.types.values().fold((0, 0), |(n, b), ts| {
            (
                n + ts.log.len(),
                b + ts.log.iter().map(|e| e.retained_bytes()).sum::<usize>(),
            )
        })
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Prunes, defaults and validates a custom resource; returns pruning warnings.
    fn check_custom(
        t: &Target,
        obj: &mut Value,
        old: Option<&Value>,
        o: &WriteOpts,
    ) -> Result<Vec<String>> {
        let Some(schema) = t.rt.version(&t.version).and_then(|v| v.schema.clone()) else {
            return Ok(vec![]);
        };
        let pruned = schema::prune(obj, &schema);
        let mut warnings = Vec::new();
        if !pruned.is_empty() {
            match o.validation {
                FieldValidation::Strict => {
                    let list: Vec<String> = pruned
                        .iter()
                        .map(|p| format!("unknown field \"{p}\""))
                        .collect();
                    return Err(ApiError::bad_request(format!(
                        "strict decoding error: {}",
                        list.join(", ")
                    )));
                }
                FieldValidation::Warn => {
                    warnings.extend(pruned.iter().map(|p| format!("unknown field \"{p}\"")))
                }
                FieldValidation::Ignore => {}
            }
        }
        schema::apply_defaults(obj, &schema);
        let causes = schema::validate(obj, old, &schema);
        if !causes.is_empty() {
            let name = meta_str(obj, "name").unwrap_or("").to_string();
            return Err(ApiError::invalid(&t.rt.group, &t.rt.kind, &name, causes));
        }
        Ok(warnings)
    }

    /// The ResourceQuota admission plugin on a pod create (see [`crate::quota`]).
    fn admit_pod(&self, t: &Target, name: &str, pod: &Value) -> Result<()> {
        let ns = t.namespace.clone().unwrap_or_default();
        let in_ns = |plural: &str| -> Vec<Arc<Value>> {
            self.types
                .get(&(String::new(), plural.to_string()))
                .map(|ts| {
                    ts.objects
                        .iter()
                        .filter(|((n, _), _)| *n == ns)
                        .map(|(_, v)| v.clone())
                        .collect()
                })
                .unwrap_or_default()
        };
        let quotas = in_ns("resourcequotas");
        if quotas.is_empty() {
            return Ok(());
        }
        let pods = in_ns("pods");
        crate::quota::admit_pod(
            name,
            pod,
            quotas.iter().map(|q| &**q),
            pods.iter().map(|p| &**p),
        )
    }

    fn create(&mut self, t: &Target, obj: Value, o: &WriteOpts) -> Result<Written> {
        self.create_with(t, obj, o, None)
    }

    /// Creates; `applied_managed_fields` (an apply that creates) replaces the Update entry
    /// a plain create records.
    fn create_with(
        &mut self,
        t: &Target,
        mut obj: Value,
        o: &WriteOpts,
        applied_managed_fields: Option<Value>,
    ) -> Result<Written> {
        let rt = t.rt.clone();
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request was in an unknown format",
            ));
        }
        let api_version = rt.api_version(&t.version);
        match obj.get("kind").and_then(Value::as_str) {
            Some(k) if k != rt.kind => {
                return Err(ApiError::bad_request(format!(
                    "the server could not find the requested resource: kind {k} does not match {}",
                    rt.kind
                )));
            }
            _ => {}
        }
        obj["kind"] = json!(rt.kind);
        obj["apiVersion"] = json!(api_version);
        schema::prune_metadata(&mut obj);
        normalize_builtin(&rt, &mut obj);
        // Namespace from the URL; a different one in the body is a 400, as in the real server.
        if rt.namespaced {
            let ns = t.namespace.clone().ok_or_else(|| {
                ApiError::bad_request("namespace is required for namespaced resources")
            })?;
            match meta_str(&obj, "namespace") {
                Some(b) if b != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {}
            }
            let nsobj = self
                .types
                .get(&(String::new(), "namespaces".into()))
                .and_then(|ts| ts.objects.get(&(String::new(), ns.clone())));
            match nsobj {
                None => return Err(ApiError::not_found("", "namespaces", &ns)),
                Some(n) if n.pointer("/metadata/deletionTimestamp").is_some() => {
                    return Err(ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "{} \"{}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                            rt.plural,
                            meta_str(&obj, "name").unwrap_or("")
                        ),
                    ));
                }
                _ => {}
            }
            meta_mut(&mut obj).insert("namespace".into(), json!(ns));
        } else {
            meta_mut(&mut obj).remove("namespace");
        }
        let name = match (meta_str(&obj, "name"), meta_str(&obj, "generateName")) {
            (Some(n), _) if !n.is_empty() => n.to_string(),
            (_, Some(g)) if !g.is_empty() => {
                let suffix: String = uuid::Uuid::new_v4()
                    .simple()
                    .to_string()
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric())
                    .take(5)
                    .collect();
                format!("{g}{suffix}")
            }
            _ => {
                return Err(ApiError::invalid(
                    &rt.group,
                    &rt.kind,
                    "",
                    vec![Cause {
                        reason: "FieldValueRequired".into(),
                        message: "Required value: name or generateName is required".into(),
                        field: "metadata.name".into(),
                    }],
                ));
            }
        };
        if let Some(c) = validate_name(&rt, &name) {
            return Err(ApiError::invalid(&rt.group, &rt.kind, &name, vec![c]));
        }
        if t.name.as_deref().is_some_and(|n| n != name) {
            return Err(ApiError::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let key = Self::ns_key(t, &name);
        if self
            .types
            .get(&storage_key(&rt))
            .is_some_and(|ts| ts.objects.contains_key(&key))
        {
            return Err(ApiError::already_exists(&rt.group, &rt.plural, &name));
        }
        let now = now();
        {
            let m = meta_mut(&mut obj);
            m.insert("name".into(), json!(name));
            m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
            m.insert("creationTimestamp".into(), json!(now));
            m.remove("deletionTimestamp");
            m.remove("deletionGracePeriodSeconds");
            m.remove("resourceVersion");
            m.remove("managedFields");
            if rt.has_generation {
                m.insert("generation".into(), json!(1));
            } else {
                m.remove("generation");
            }
        }
        // Status is reset on create where a status subresource exists (PrepareForCreate).
        if rt.has_status(&t.version) {
            let fresh = match rt.plural.as_str() {
                "namespaces" => Some(json!({"phase": "Active"})),
                "pods" => Some(json!({"phase": "Pending"})),
                _ if rt.builtin => Some(json!({})),
                _ => None,
            };
            let root = obj.as_object_mut().expect("object");
            match fresh {
                Some(s) => root.insert("status".into(), s),
                None => root.remove("status"),
            };
        }
        if rt.plural == "namespaces" {
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            meta_mut(&mut obj)
                .entry("labels")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .map(|l| l.insert("kubernetes.io/metadata.name".into(), json!(name)));
        }
        let mut warnings = Self::check_custom(t, &mut obj, None, o)?;
        warnings.extend(decode_builtin(&rt, &t.version, &mut obj, o.validation)?);
        let causes = builtin::validate(&rt, &obj);
        if !causes.is_empty() {
            return Err(ApiError::invalid(&rt.group, &rt.kind, &name, causes));
        }
        if rt.builtin && rt.group.is_empty() && rt.plural == "pods" {
            self.admit_pod(t, &name, &obj)?;
        }
        builtin::allocate_cluster_ip(&rt, &mut obj, &mut self.cluster_ips);
        let crd_type =
            if rt.plural == "customresourcedefinitions" && rt.group == "apiextensions.k8s.io" {
                Some(from_crd(&obj).map_err(|m| {
                    ApiError::invalid(
                        &rt.group,
                        &rt.kind,
                        &name,
                        vec![Cause {
                            reason: "FieldValueInvalid".into(),
                            message: m,
                            field: String::new(),
                        }],
                    )
                })?)
            } else {
                None
            };
        let cursor = TypeCursor::root(&rt, &t.version);
        let manager = manager_name(o);
        let req = ApplyRequest {
            manager: &manager,
            subresource: None,
            force: false,
            api_version: &api_version,
            now: &now,
        };
        ssa::record_update(&Value::Null, &mut obj, cursor, &req);
        // An apply that creates the object owns what it applied as an Apply entry.
        if let Some(mf) = applied_managed_fields {
            meta_mut(&mut obj).insert("managedFields".into(), mf);
        }
        if o.dry_run {
            return Ok(Written {
                object: obj.into(),
                warnings,
                encoded: None,
            });
        }
        // etcd refuses what exceeds its request limit: checked on the bytes stored, before
        // the write takes a resourceVersion.
        let rv = self.rv + 1;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        let skey = storage_key(&rt);
        let stored = crate::events::to_storage(&rt, &obj).into_owned();
        let bytes = encode_stored(&stored)?;
        self.rv = rv;
        self.emit(&skey, rv, EventType::Added, &stored, None, Some(bytes));
        self.put(&skey, key, Arc::new(stored));
        if let Some(ct) = crd_type {
            self.establish_crd(t, &name, ct);
        }
        Ok(Written {
            object: obj.into(),
            warnings,
            encoded: None,
        })
    }

    /// Registers a CRD's type and marks it Established/NamesAccepted (the real server's
    /// controllers do this right after the create; the update is a separate MODIFIED event).
    fn establish_crd(&mut self, t: &Target, name: &str, ct: ResourceType) {
        let accepted = json!({
            "plural": ct.plural, "singular": ct.singular, "kind": ct.kind, "listKind": ct.list_kind,
            "shortNames": ct.short_names, "categories": ct.categories,
        });
        let stored: Vec<String> = ct
            .versions
            .iter()
            .filter(|v| v.storage)
            .map(|v| v.name.clone())
            .collect();
        self.registry.insert(ct);
        let Ok(old) = self
            .get(&Target {
                name: Some(name.into()),
                ..t.clone()
            })
            .cloned()
        else {
            return;
        };
        let ts = now();
        let mut new = old.clone();
        new["status"] = json!({
            "acceptedNames": accepted,
            "storedVersions": stored,
            "conditions": [
                {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": ts},
                {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": ts},
            ],
        });
        // Conditions added to a CRD the client could store: never over the limit.
        let _ = self.store_update(t, &old, new);
    }

    /// Stores a new version of an object and emits its MODIFIED event; returns it, shared
    /// with the store (no copy).
    fn store_update(&mut self, t: &Target, old: &Value, mut new: Value) -> Result<Arc<Value>> {
        // As in create_with: the size is checked before the write takes a resourceVersion.
        let rv = self.rv + 1;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        let name = meta_str(&new, "name").unwrap_or("").to_string();
        let key = Self::ns_key(t, &name);
        let skey = storage_key(&t.rt);
        let old = crate::events::to_storage(&t.rt, old);
        if crate::events::is_events_v1(&t.rt) {
            let stored = crate::events::to_storage(&t.rt, &new).into_owned();
            let bytes = encode_stored(&stored)?;
            self.rv = rv;
            self.emit(
                &skey,
                rv,
                EventType::Modified,
                &stored,
                Some(&old),
                Some(bytes),
            );
            self.put(&skey, key, Arc::new(stored));
            return Ok(Arc::new(new));
        }
        let stored = Arc::new(new);
        let bytes = encode_stored(&stored)?;
        self.rv = rv;
        self.emit(
            &skey,
            rv,
            EventType::Modified,
            &stored,
            Some(&old),
            Some(bytes),
        );
        self.put(&skey, key, stored.clone());
        Ok(stored)
    }

    fn replace(&mut self, t: &Target, body: Value, o: &WriteOpts) -> Result<Written> {
        let old = self.read_shared(t)?;
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request was in an unknown format",
            ));
        }
        if let Some(n) = meta_str(&body, "name")
            && Some(n) != t.name.as_deref()
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({})",
                t.name.as_deref().unwrap_or("")
            )));
        }
        self.write(t, old, body, o, false)
    }

    fn patch(
        &mut self,
        t: &Target,
        kind: PatchKind,
        body: Value,
        o: &WriteOpts,
    ) -> Result<Written> {
        let rt = t.rt.clone();
        let cursor = TypeCursor::root(&rt, &t.version);
        if kind == PatchKind::Apply {
            return self.apply(t, body, o);
        }
        let old = self.read_shared(t)?;
        // A patch addressed to /scale is a patch of the Scale object.
        if t.subresource.as_deref() == Some("scale") {
            let scale = scale_of(&t.rt, &t.version, &old)?;
            let patched = match kind {
                PatchKind::Json => patch::json_patch(&scale, &body)?,
                _ => patch::merge_patch(&scale, &body)?,
            };
            return self.write_scale(t, old, patched, o);
        }
        let candidate = match kind {
            PatchKind::Json => patch::json_patch(&old, &body)?,
            PatchKind::Merge => patch::merge_patch(&old, &body)?,
            PatchKind::Strategic => {
                if !rt.builtin {
                    // Real server: strategic merge patch is not supported for custom resources.
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
                    ));
                }
                patch::strategic_merge(&old, &body, cursor)?
            }
            PatchKind::Apply => unreachable!("handled above"),
        };
        self.write(t, old, candidate, o, false)
    }

    fn apply(&mut self, t: &Target, body: Value, o: &WriteOpts) -> Result<Written> {
        let rt = t.rt.clone();
        let name = t.name.clone().unwrap_or_default();
        let Some(manager) = o.manager.clone() else {
            return Err(ApiError::bad_request(
                "PATCH, application/apply-patch+yaml requires fieldManager to be set",
            ));
        };
        if !body.is_object() {
            return Err(ApiError::bad_request(
                "error decoding YAML: apply patch must be an object",
            ));
        }
        let api_version = rt.api_version(&t.version);
        if body.get("apiVersion").and_then(Value::as_str) != Some(api_version.as_str())
            || body.get("kind").and_then(Value::as_str) != Some(rt.kind.as_str())
        {
            return Err(ApiError::bad_request(format!(
                "apiVersion and kind in the applied configuration must be {api_version} and {}",
                rt.kind
            )));
        }
        if let Some(n) = meta_str(&body, "name")
            && n != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({n}) does not match the name on the URL ({name})"
            )));
        }
        let existing = self.read_shared(t).ok();
        let sub = t.subresource.as_deref();
        if existing.is_none() && sub.is_some() {
            return Err(ApiError::not_found(&rt.group, &rt.plural, &name));
        }
        // Scope the applied config to what this endpoint may change.
        let has_status = rt.has_status(&t.version);
        let mut applied = body.clone();
        if let Some(m) = applied.as_object_mut() {
            if sub == Some("status") {
                m.retain(|k, _| {
                    matches!(k.as_str(), "apiVersion" | "kind" | "metadata" | "status")
                });
                if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.retain(|k, _| matches!(k.as_str(), "name" | "namespace"));
                }
            } else if has_status {
                m.remove("status");
            }
            if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.remove("managedFields");
                meta.remove("resourceVersion");
            }
        }
        // The applied configuration is converted to its type's schema first: an unknown
        // field fails the request whatever fieldValidation says (structured-merge-diff's
        // "field not declared in schema", which the real server answers with a
        // reason-less 500).
        if rt.builtin {
            let mut probe = applied.clone();
            probe["apiVersion"] = json!(api_version);
            probe["kind"] = json!(rt.kind);
            let what = match builtin::decode(&rt, &mut probe, false) {
                Err(e) => Some(e),
                Ok(d) if !d.unknown.is_empty() => Some(
                    d.unknown
                        .iter()
                        .map(|p| format!(".{p}: field not declared in schema"))
                        .collect::<Vec<_>>()
                        .join("\n"),
                ),
                Ok(_) => None,
            };
            if let Some(what) = what {
                let nn = match &t.namespace {
                    Some(ns) if rt.namespaced => format!("{ns}/{name}"),
                    _ => format!("/{name}"),
                };
                let gv = if rt.group.is_empty() {
                    format!("/{}", t.version)
                } else {
                    api_version.clone()
                };
                return Err(ApiError::new(
                    500,
                    "",
                    format!(
                        "failed to create typed patch object ({nn}; {gv}, Kind={}): {what}",
                        rt.kind
                    ),
                ));
            }
        }
        // Defaults and pruning apply to the config too, so ownership matches stored values.
        if let Some(schema) = rt.version(&t.version).and_then(|v| v.schema.clone()) {
            schema::prune(&mut applied, &schema);
        }
        let cursor = TypeCursor::root(&rt, &t.version);
        let now = now();
        let req = ApplyRequest {
            manager: &manager,
            subresource: sub,
            force: o.force,
            api_version: &api_version,
            now: &now,
        };
        let null = Value::Null;
        let live = existing.as_deref().unwrap_or(&null);
        let mut result = ssa::apply(live, &applied, cursor, &req);
        // kubectl's client-side to server-side upgrade (the real server's
        // lastAppliedManager): for manager "kubectl", conflicts on fields present in the
        // last-applied-configuration annotation are allowed, and the apply is forced.
        if let Err(conflicts) = &result
            && manager == "kubectl"
            && let Some(last) = live
                .pointer("/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration")
                .and_then(Value::as_str)
                .and_then(|s| serde_json::from_str::<Value>(s).ok())
        {
            let allowed: Vec<String> = ssa::FieldSet::of(&last, cursor)
                .0
                .iter()
                .map(|p| ssa::display_path(p))
                .collect();
            if conflicts.iter().all(|c| allowed.contains(&c.field)) {
                result = ssa::apply(
                    live,
                    &applied,
                    cursor,
                    &ApplyRequest {
                        force: true,
                        ..req.clone()
                    },
                );
            }
        }
        let merged = result.map_err(|conflicts| {
            let mut by_manager: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for c in &conflicts {
                by_manager.entry(&c.manager).or_default().push(&c.field);
            }
            // Wording of structured-merge-diff's ConflictError, which kubectl shows.
            let n = conflicts.len();
            let mut msg = format!(
                "Apply failed with {n} conflict{}: ",
                if n == 1 { "" } else { "s" }
            );
            let parts: Vec<String> = by_manager
                .iter()
                .map(|(m, fields)| format!("conflict with \"{m}\": {}", fields.join(", ")))
                .collect();
            msg.push_str(&parts.join("; "));
            let mut e = ApiError::new(409, "Conflict", msg).details(&rt.group, &rt.plural, &name);
            e.causes = conflicts
                .iter()
                .map(|c| Cause {
                    reason: "FieldManagerConflict".into(),
                    message: format!("conflict with \"{}\"", c.manager),
                    field: c.field.clone(),
                })
                .collect();
            e
        })?;
        match existing {
            None => {
                let applied_mf = merged.pointer("/metadata/managedFields").cloned();
                self.create_with(
                    t,
                    merged,
                    &WriteOpts {
                        manager: Some(manager.clone()),
                        ..o.clone()
                    },
                    applied_mf,
                )
            }
            Some(old) => self.write(t, old, merged, o, true),
        }
    }

    /// The shared update pipeline (PUT, PATCH, apply onto an existing object).
    fn write(
        &mut self,
        t: &Target,
        old: Arc<Value>,
        mut new: Value,
        o: &WriteOpts,
        applied: bool,
    ) -> Result<Written> {
        let rt = t.rt.clone();
        let name = t.name.clone().unwrap_or_default();
        let sub = t.subresource.as_deref();
        if sub == Some("scale") {
            return self.write_scale(t, old, new, o);
        }
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request was in an unknown format",
            ));
        }
        // Optimistic concurrency: a resourceVersion in the request must match.
        if let Some(rv) = meta_str(&new, "resourceVersion")
            && !rv.is_empty()
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::stale(&rt.group, &rt.plural, &name));
        }
        if let Some(uid) = meta_str(&new, "uid")
            && !uid.is_empty()
            && Some(uid) != meta_str(&old, "uid")
        {
            return Err(ApiError::conflict(
                &rt.group,
                &rt.plural,
                &name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta_str(&old, "uid").unwrap_or("")
                ),
            ));
        }
        let has_status = rt.has_status(&t.version);
        let api_version = rt.api_version(&t.version);
        new["apiVersion"] = json!(api_version);
        new["kind"] = json!(rt.kind);
        schema::prune_metadata(&mut new);
        normalize_builtin(&rt, &mut new);
        // Subresource isolation (the status strategies' PrepareForUpdate).
        if sub == Some("status") {
            // An apply keeps the managedFields it computed (when it computed any).
            let keep = applied && new.pointer("/metadata/managedFields").is_some();
            isolate_status(&mut new, &old, keep);
        } else if has_status {
            let root = new.as_object_mut().expect("object");
            match old.get("status") {
                Some(s) => root.insert("status".into(), s.clone()),
                None => root.remove("status"),
            };
        }
        // Server-owned metadata is carried over.
        let mut client_managed = false;
        {
            let no_meta = Value::Object(Default::default());
            let old_meta = old.get("metadata").unwrap_or(&no_meta);
            let m = meta_mut(&mut new);
            for f in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match old_meta.get(f) {
                    Some(v) => m.insert(f.into(), v.clone()),
                    None => m.remove(f),
                };
            }
            if !applied {
                // A client may set managedFields explicitly (kubectl's client-side to
                // server-side apply migration does); `[]` or `[{}]` clears them. Otherwise
                // the server keeps its own and records this write below.
                let incoming = m.get("managedFields").cloned();
                client_managed = match incoming {
                    Some(Value::Array(list))
                        if list.is_empty()
                            || list
                                .iter()
                                .all(|e| e.as_object().is_some_and(|o| o.is_empty())) =>
                    {
                        m.remove("managedFields");
                        true
                    }
                    Some(v) if Some(&v) != old_meta.get("managedFields") => true,
                    _ => {
                        match old_meta.get("managedFields") {
                            Some(v) => m.insert("managedFields".into(), v.clone()),
                            None => m.remove("managedFields"),
                        };
                        false
                    }
                };
            }
            m.insert(
                "resourceVersion".into(),
                old_meta
                    .get("resourceVersion")
                    .cloned()
                    .unwrap_or(json!("")),
            );
        }
        if rt.plural == "namespaces" {
            new["spec"] = old.get("spec").cloned().unwrap_or_else(|| json!({}));
        }
        // No new finalizers once deletion started (ObjectMeta update validation).
        if old.pointer("/metadata/deletionTimestamp").is_some() {
            let before = finalizers(&old);
            if let Some(f) = finalizers(&new).into_iter().find(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    &rt.group,
                    &rt.kind,
                    &name,
                    vec![Cause {
                        reason: "FieldValueForbidden".into(),
                        message: format!(
                            "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{\"{f}\"}}"
                        ),
                        field: "metadata.finalizers".into(),
                    }],
                ));
            }
        }
        let mut warnings = Self::check_custom(t, &mut new, Some(&old), o)?;
        builtin::carry_cluster_ip(&rt, &old, &mut new);
        warnings.extend(decode_builtin(&rt, &t.version, &mut new, o.validation)?);
        let mut causes = builtin::validate(&rt, &new);
        causes.extend(builtin::immutable(&rt, &old, &new));
        if !causes.is_empty() {
            return Err(ApiError::invalid(&rt.group, &rt.kind, &name, causes));
        }
        if rt.plural == "customresourcedefinitions"
            && rt.group == "apiextensions.k8s.io"
            && sub.is_none()
        {
            let ct = from_crd(&new).map_err(|m| {
                ApiError::invalid(
                    &rt.group,
                    &rt.kind,
                    &name,
                    vec![Cause {
                        reason: "FieldValueInvalid".into(),
                        message: m,
                        field: String::new(),
                    }],
                )
            })?;
            if !o.dry_run {
                self.registry.insert(ct);
            }
        }
        if rt.has_generation && !same_spec(&old, &new, has_status) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut new).insert("generation".into(), json!(g + 1));
        }
        if client_managed {
            // Normalise what the client sent (drops malformed entries).
            let entries = ssa::read_managed(&new);
            ssa::write_managed(&mut new, &entries);
        } else if !applied {
            let cursor = TypeCursor::root(&rt, &t.version);
            let manager = manager_name(o);
            let now = now();
            let req = ApplyRequest {
                manager: &manager,
                subresource: sub,
                force: false,
                api_version: &api_version,
                now: &now,
            };
            ssa::record_update(&old, &mut new, cursor, &req);
        }
        // A write that changes nothing is a no-op: no new resourceVersion, no event.
        if unchanged(&old, &new) {
            return Ok(Written {
                object: old,
                warnings,
                encoded: None,
            });
        }
        if o.dry_run {
            return Ok(Written {
                object: new.into(),
                warnings,
                encoded: None,
            });
        }
        if new.pointer("/metadata/deletionTimestamp").is_some() && finalizers(&new).is_empty() {
            let obj = self.remove(t, new);
            return Ok(Written {
                object: obj.into(),
                warnings,
                encoded: None,
            });
        }
        let stored = self.store_update(t, &old, new)?;
        let encoded = if crate::events::is_events_v1(&rt) {
            None
        } else {
            self.types
                .get(&storage_key(&rt))
                .and_then(|ts| ts.encoded.get(&Self::ns_key(t, &name)))
                .cloned()
        };
        Ok(Written {
            object: stored,
            warnings,
            encoded,
        })
    }

    fn write_scale(
        &mut self,
        t: &Target,
        old: Arc<Value>,
        scale: Value,
        o: &WriteOpts,
    ) -> Result<Written> {
        let rt = t.rt.clone();
        let info = rt
            .version(&t.version)
            .and_then(|v| v.scale.clone())
            .ok_or_else(|| {
                ApiError::not_found(&rt.group, &rt.plural, t.name.as_deref().unwrap_or(""))
            })?;
        if let Some(rv) = meta_str(&scale, "resourceVersion")
            && !rv.is_empty()
            && Some(rv) != meta_str(&old, "resourceVersion")
        {
            return Err(ApiError::stale(
                &rt.group,
                &rt.plural,
                t.name.as_deref().unwrap_or(""),
            ));
        }
        let replicas = scale.pointer("/spec/replicas").cloned().unwrap_or(json!(0));
        if replicas.as_i64().is_none_or(|r| r < 0) {
            return Err(ApiError::invalid(
                "autoscaling",
                "Scale",
                t.name.as_deref().unwrap_or(""),
                vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!(
                        "Invalid value: {replicas}: must be greater than or equal to 0"
                    ),
                    field: "spec.replicas".into(),
                }],
            ));
        }
        let mut new = (*old).clone();
        set_json_path(&mut new, &info.spec_replicas_path, replicas);
        let main = Target {
            subresource: Some("scale".into()),
            ..t.clone()
        };
        let w = self.write(
            &Target {
                subresource: None,
                ..main.clone()
            },
            old,
            new,
            &WriteOpts {
                manager: o.manager.clone().or_else(|| Some(manager_name(o))),
                ..o.clone()
            },
            false,
        )?;
        Ok(Written {
            object: scale_of(&rt, &t.version, &w.object)?.into(),
            warnings: w.warnings,
            encoded: None,
        })
    }

    /// Removes an object now and emits DELETED (the event carries the deletion's rv).
    fn remove(&mut self, t: &Target, mut obj: Value) -> Value {
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        let name = meta_str(&obj, "name").unwrap_or("").to_string();
        let key = Self::ns_key(t, &name);
        let skey = storage_key(&t.rt);
        self.take(&skey, &key);
        let stored = crate::events::to_storage(&t.rt, &obj);
        self.emit(&skey, rv, EventType::Deleted, &stored, None, None);
        // Deleting a CRD removes its custom resources and stops serving the type.
        if t.rt.plural == "customresourcedefinitions"
            && t.rt.group == "apiextensions.k8s.io"
            && let Ok(ct) = from_crd(&obj)
        {
            let ckey = ct.key();
            let crs: Vec<Value> = self.objects(&ckey).cloned().collect();
            if let Some(crt) = self.registry.get(&ckey) {
                for cr in crs {
                    let ct_target = Target {
                        version: crt.preferred().name.clone(),
                        rt: crt.clone(),
                        namespace: meta_str(&cr, "namespace").map(str::to_string),
                        name: meta_str(&cr, "name").map(str::to_string),
                        subresource: None,
                    };
                    self.remove(&ct_target, cr);
                }
            }
            self.registry.remove(&ckey);
            if let Some(ts) = self.types.get_mut(&ckey) {
                ts.watchers = Watchers::default();
            }
        }
        obj
    }

    pub(crate) fn delete(&mut self, t: &Target, d: &DeleteOpts, _who: &str) -> Result<Deleted> {
        let rt = t.rt.clone();
        let name = t.name.clone().unwrap_or_default();
        let old = self.read(t)?;
        check_delete_preconditions(&rt, &name, &old, d)?;
        let mut new = old.clone();
        let mut fins = finalizers(&old);
        match d.propagation.as_deref() {
            Some("Foreground") if !fins.iter().any(|f| f == "foregroundDeletion") => {
                fins.push("foregroundDeletion".into())
            }
            Some("Orphan") if !fins.iter().any(|f| f == "orphan") => fins.push("orphan".into()),
            _ => {}
        }
        // Namespaces are finalized by the namespace controller (here: the GC task).
        let namespace_pending = rt.plural == "namespaces" && rt.group.is_empty();
        if fins.is_empty() && !namespace_pending {
            if d.dry_run {
                return Ok(Deleted::Gone(old));
            }
            let obj = self.remove(t, new);
            return Ok(Deleted::Gone(obj));
        }
        if old.pointer("/metadata/deletionTimestamp").is_some() && finalizers(&old) == fins {
            return Ok(Deleted::Pending(old));
        }
        if d.dry_run {
            return Ok(Deleted::Pending(new));
        }
        {
            let m = meta_mut(&mut new);
            m.entry("deletionTimestamp").or_insert_with(|| json!(now()));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
            if !fins.is_empty() {
                m.insert("finalizers".into(), json!(fins));
            }
            // BeforeDelete bumps generation when graceful deletion starts.
            if let Some(g) = m.get("generation").and_then(Value::as_i64)
                && old.pointer("/metadata/deletionTimestamp").is_none()
            {
                m.insert("generation".into(), json!(g + 1));
            }
        }
        if namespace_pending {
            new["status"] = json!({"phase": "Terminating"});
        }
        Ok(Deleted::Pending(Arc::unwrap_or_clone(
            self.store_update(t, &old, new)?,
        )))
    }

    /// Removes one finalizer (GC and namespace controller); removes the object when none remain.
    pub(crate) fn remove_finalizer(&mut self, t: &Target, finalizer: &str) {
        let Ok(old) = self.read(t) else {
            return;
        };
        let mut new = old.clone();
        let fins: Vec<String> = finalizers(&old)
            .into_iter()
            .filter(|f| f != finalizer)
            .collect();
        meta_mut(&mut new).insert("finalizers".into(), json!(fins));
        if fins.is_empty() {
            meta_mut(&mut new).remove("finalizers");
        }
        if new.pointer("/metadata/deletionTimestamp").is_some() && fins.is_empty() {
            self.remove(t, new);
        } else {
            // Fewer finalizers: smaller than what was stored.
            let _ = self.store_update(t, &old, new);
        }
    }

    /// Rewrites an object's ownerReferences (GC orphaning), as an update by the GC.
    pub(crate) fn set_owner_refs(&mut self, t: &Target, refs: Vec<Value>) {
        let Ok(old) = self.read(t) else {
            return;
        };
        let mut new = old.clone();
        if refs.is_empty() {
            meta_mut(&mut new).remove("ownerReferences");
        } else {
            meta_mut(&mut new).insert("ownerReferences".into(), json!(refs));
        }
        // Fewer owners: smaller than what was stored.
        let _ = self.store_update(t, &old, new);
    }

    /// Removes a namespace whose contents are gone.
    pub(crate) fn finalize_namespace(&mut self, t: &Target) {
        if let Ok(ns) = self.read(t)
            && finalizers(&ns).is_empty()
        {
            self.remove(t, ns);
        }
    }
}

/// Sets a `.a.b.c` path, creating objects on the way.
fn set_json_path(obj: &mut Value, path: &str, v: Value) {
    let mut cur = obj;
    let parts: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        let m = cur.as_object_mut().expect("object");
        if i == parts.len() - 1 {
            m.insert(p.to_string(), v);
            return;
        }
        cur = m.entry(p.to_string()).or_insert_with(|| json!({}));
    }
}

/// Reads a `.a.b.c` path.
pub fn get_json_path<'v>(obj: &'v Value, path: &str) -> Option<&'v Value> {
    let mut cur = obj;
    for p in path.trim_start_matches('.').split('.') {
        cur = cur.get(p)?;
    }
    Some(cur)
}

/// The `autoscaling/v1` Scale view of an object.
pub fn scale_of(rt: &ResourceType, version: &str, obj: &Value) -> Result<Value> {
    let name = meta_str(obj, "name").unwrap_or("");
    let info = rt
        .version(version)
        .and_then(|v| v.scale.clone())
        .ok_or_else(|| ApiError::not_found(&rt.group, &rt.plural, name))?;
    let spec = get_json_path(obj, &info.spec_replicas_path)
        .cloned()
        .unwrap_or(json!(0));
    let status = get_json_path(obj, &info.status_replicas_path)
        .cloned()
        .unwrap_or(json!(0));
    let selector = info
        .label_selector_path
        .as_deref()
        .and_then(|p| get_json_path(obj, p))
        .map(|s| match s {
            Value::String(s) => s.clone(),
            obj @ Value::Object(_) => crate::selector::LabelSelector::from_object(obj).to_query(),
            _ => String::new(),
        });
    let mut meta = json!({});
    for f in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = obj.pointer(&format!("/metadata/{f}")) {
            meta[f] = v.clone();
        }
    }
    let mut status_obj = json!({"replicas": status});
    if let Some(s) = selector {
        status_obj["selector"] = json!(s);
    }
    Ok(
        json!({"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": meta, "spec": {"replicas": spec}, "status": status_obj}),
    )
}
