//! Server-side apply: field sets, managedFields, conflicts, merging and removal.
//!
//! Modelled on sigs.k8s.io/structured-merge-diff, which the real server uses:
//!
//! * A field set is a set of paths. Each path element is encoded the FieldsV1 way:
//!   `f:<field>` for an object field, `k:{"name":"a"}` for a list-map element (key fields
//!   sorted by name), `v:<json>` for a set element. A path is in the set when the manager
//!   owns that leaf (a scalar, an atomic list or map, an empty object) or that list element.
//! * FieldsV1 JSON is the tree of those paths: a node with children that is itself in the
//!   set carries a `"."` child.
//! * Apply (`apply`): the applied config's field set becomes the manager's set. A path
//!   owned by another manager whose value the apply would change is a conflict (409) unless
//!   `force`, in which case the other manager loses it. The config merges into the live
//!   object (maps recurse, list-maps merge by key, sets union, atomics replace), then paths
//!   the manager owned before and no longer applies are removed when no other manager owns
//!   them (the "stop applying a field removes it" rule).
//! * Update (`record_update`): PUT/PATCH/POST give the writing manager (operation `Update`)
//!   the paths whose values changed and take them from everyone else.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::patch::key_of;
use crate::registry::{ListType, TypeCursor};

/// One path in an object, as FieldsV1 element strings (`f:spec`, `k:{"name":"a"}`, `v:"x"`).
pub type Path = Vec<String>;

/// A set of owned paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSet(pub BTreeSet<Path>);

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagedEntry {
    /// Field manager name.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// apiVersion the manager wrote with.
    pub api_version: String,
    /// Last write time (RFC 3339).
    pub time: String,
    /// `status` / `scale` when written through a subresource.
    pub subresource: Option<String>,
    /// Owned fields.
    pub fields: FieldSet,
}

/// A field owned by another manager that an apply would change.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// The other manager.
    pub manager: String,
    /// The field, in the real server's `.spec.replicas` / `.status.pods[name="a"].ready` notation.
    pub field: String,
}

/// What an apply needs besides the objects.
#[derive(Debug, Clone)]
pub struct ApplyRequest<'a> {
    /// Field manager of the apply.
    pub manager: &'a str,
    /// `None` for the main resource, `Some("status")` for `/status`.
    pub subresource: Option<&'a str>,
    /// Take ownership on conflict instead of failing.
    pub force: bool,
    /// apiVersion recorded in managedFields.
    pub api_version: &'a str,
    /// Time recorded in managedFields.
    pub now: &'a str,
}

thread_local! {
    /// Field sets decoded from FieldsV1 on this thread (see [`field_sets_decoded`]).
    static DECODED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many field sets this thread has decoded from FieldsV1 so far: what an apply costs
/// grows with this, so tests count it (an apply should decode its own manager's set, and
/// those it takes fields from, not every manager's).
pub fn field_sets_decoded() -> u64 {
    DECODED.with(|d| d.get())
}

// === impl FieldSet ===

impl FieldSet {
    /// The set of paths an object (an applied config or a live object) specifies.
    ///
    /// Top-level `apiVersion`/`kind` and metadata other than labels, annotations,
    /// finalizers and ownerReferences are not tracked, as in the real server.
    pub fn of(obj: &Value, cursor: TypeCursor<'_>) -> FieldSet {
        let mut out = BTreeSet::new();
        if let Value::Object(m) = obj {
            walk_object(m, cursor, &mut Vec::new(), true, &mut out);
        }
        FieldSet(out)
    }

    /// Decodes FieldsV1 JSON.
    pub fn from_fields_v1(v: &Value) -> FieldSet {
        DECODED.with(|d| d.set(d.get() + 1));
        fn walk(node: &Value, prefix: &mut Path, out: &mut BTreeSet<Path>) {
            let Value::Object(m) = node else { return };
            if (m.is_empty() || m.contains_key(".")) && !prefix.is_empty() {
                out.insert(prefix.clone());
            }
            for (k, child) in m {
                if k == "." {
                    continue;
                }
                prefix.push(k.clone());
                walk(child, prefix, out);
                prefix.pop();
            }
        }
        let mut out = BTreeSet::new();
        walk(v, &mut Vec::new(), &mut out);
        FieldSet(out)
    }

    /// Encodes as FieldsV1 JSON.
    pub fn to_fields_v1(&self) -> Value {
        let mut root = Map::new();
        for path in &self.0 {
            let mut node = &mut root;
            for el in path {
                node = node
                    .entry(el.clone())
                    .or_insert_with(|| Value::Object(Map::new()))
                    .as_object_mut()
                    .expect("fieldsV1 nodes are objects");
            }
            node.insert(".".into(), json!({}));
        }
        // A leaf's "." marker is implied by being empty; keep it only where children exist.
        fn tidy(m: &mut Map<String, Value>) {
            let has_children = m.keys().any(|k| k != ".");
            if !has_children {
                m.remove(".");
            }
            for (k, v) in m.iter_mut() {
                if k != "."
                    && let Value::Object(c) = v
                {
                    tidy(c);
                }
            }
        }
        tidy(&mut root);
        Value::Object(root)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the set holds `path` or anything beneath it.
    pub fn has_prefix(&self, path: &[String]) -> bool {
        self.0
            .range(path.to_vec()..)
            .next()
            .is_some_and(|p| p.starts_with(path))
    }
}

/// Encodes a list-map key element.
pub fn key_element(elem: &Value, keys: &[String]) -> String {
    let mut sorted: Vec<(&String, Value)> = keys.iter().zip(key_of(elem, keys)).collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let body: Vec<String> = sorted
        .iter()
        .map(|(k, v)| format!("{}:{}", Value::String((*k).clone()), v))
        .collect();
    format!("k:{{{}}}", body.join(","))
}

fn walk_object(
    m: &Map<String, Value>,
    cursor: TypeCursor<'_>,
    prefix: &mut Path,
    root: bool,
    out: &mut BTreeSet<Path>,
) {
    for (k, v) in m {
        if root && (k == "apiVersion" || k == "kind") {
            continue;
        }
        if root && k == "metadata" {
            if let Value::Object(meta) = v {
                let mc = cursor.field("metadata", true);
                prefix.push("f:metadata".into());
                for f in ["labels", "annotations", "finalizers", "ownerReferences"] {
                    if let Some(fv) = meta.get(f) {
                        prefix.push(format!("f:{f}"));
                        walk_value(fv, mc.field(f, false), prefix, out);
                        prefix.pop();
                    }
                }
                prefix.pop();
            }
            continue;
        }
        prefix.push(format!("f:{k}"));
        walk_value(v, cursor.field(k, root), prefix, out);
        prefix.pop();
    }
}

fn walk_value(v: &Value, cursor: TypeCursor<'_>, prefix: &mut Path, out: &mut BTreeSet<Path>) {
    match v {
        Value::Object(m) if !m.is_empty() && !cursor.atomic_map() => {
            walk_object(m, cursor, prefix, false, out)
        }
        Value::Array(list) if !list.is_empty() => match cursor.list_type() {
            ListType::Atomic => {
                out.insert(prefix.clone());
            }
            ListType::Set => {
                for e in list {
                    let mut p = prefix.clone();
                    p.push(format!("v:{e}"));
                    out.insert(p);
                }
            }
            ListType::Map(keys) => {
                for e in list {
                    prefix.push(key_element(e, &keys));
                    out.insert(prefix.clone());
                    if let Value::Object(em) = e {
                        walk_object(em, cursor.item(), prefix, false, out);
                    }
                    prefix.pop();
                }
            }
        },
        _ => {
            out.insert(prefix.clone());
        }
    }
}

/// Finds the position of the list element a `k:`/`v:` path element names.
fn find_element(list: &[Value], el: &str) -> Option<usize> {
    if let Some(k) = el.strip_prefix("k:") {
        let want: Map<String, Value> = serde_json::from_str(k).ok()?;
        list.iter().position(|e| {
            want.iter()
                .all(|(wk, wv)| e.get(wk).unwrap_or(&Value::Null) == wv)
        })
    } else if let Some(v) = el.strip_prefix("v:") {
        let want: Value = serde_json::from_str(v).ok()?;
        list.iter().position(|e| *e == want)
    } else if let Some(i) = el.strip_prefix("i:") {
        i.parse().ok().filter(|i| *i < list.len())
    } else {
        None
    }
}

/// The value at `path`, if present.
pub fn get_path<'v>(obj: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut cur = obj;
    for el in path {
        cur = if let Some(f) = el.strip_prefix("f:") {
            cur.get(f)?
        } else {
            let list = cur.as_array()?;
            &list[find_element(list, el)?]
        };
    }
    Some(cur)
}

/// Removes the value at `path` (a field or a list element); missing paths are ignored.
pub fn remove_path(obj: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut cur = obj;
    for el in parents {
        let next = if let Some(f) = el.strip_prefix("f:") {
            cur.get_mut(f)
        } else {
            match cur.as_array_mut() {
                Some(list) => match find_element(list, el) {
                    Some(i) => list.get_mut(i),
                    None => None,
                },
                None => None,
            }
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Value::Object(m) = cur {
            m.remove(f);
        }
    } else if let Value::Array(list) = cur
        && let Some(i) = find_element(list, last)
    {
        list.remove(i);
    }
}

/// Renders a path the way the real server prints conflicts: `.spec.pods[name="a"].ready`.
pub fn display_path(path: &[String]) -> String {
    let mut s = String::new();
    for el in path {
        if let Some(f) = el.strip_prefix("f:") {
            s.push('.');
            s.push_str(f);
        } else if let Some(k) = el.strip_prefix("k:") {
            let m: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={v}")).collect();
            s.push_str(&format!("[{}]", parts.join(",")));
        } else if let Some(v) = el.strip_prefix("v:") {
            s.push_str(&format!("[={v}]"));
        } else {
            s.push_str(&format!("[{el}]"));
        }
    }
    s
}

/// Whether a path names a list element (rather than a leaf value).
fn is_element(path: &[String]) -> bool {
    path.last()
        .is_some_and(|l| l.starts_with("k:") || l.starts_with("v:"))
}

/// Merges an applied config into a live object (maps recurse, list-maps by key, sets by
/// value, everything else replaced). An explicit null removes the field.
pub fn merge(live: &Value, applied: &Value, cursor: TypeCursor<'_>) -> Value {
    let mut out = live.clone();
    merge_into(&mut out, applied, cursor, true);
    out
}

/// [`merge`] in place: only what `applied` names is touched (no copy of the rest).
fn merge_into(live: &mut Value, applied: &Value, cursor: TypeCursor<'_>, root: bool) {
    match (&mut *live, applied) {
        (Value::Object(l), Value::Object(a)) if !cursor.atomic_map() => {
            for (k, v) in a {
                if v.is_null() {
                    l.remove(k);
                    continue;
                }
                match l.get_mut(k) {
                    Some(existing) => merge_into(existing, v, cursor.field(k, root), false),
                    None => {
                        l.insert(k.clone(), strip_nulls(v));
                    }
                }
            }
        }
        (Value::Array(l), Value::Array(a)) => match cursor.list_type() {
            ListType::Atomic => *live = applied.clone(),
            ListType::Set => {
                for e in a {
                    if !l.contains(e) {
                        l.push(e.clone());
                    }
                }
            }
            ListType::Map(keys) => {
                for e in a {
                    let same = |x: &Value| {
                        keys.iter().all(|k| {
                            x.get(k).unwrap_or(&Value::Null) == e.get(k).unwrap_or(&Value::Null)
                        })
                    };
                    match l.iter().position(same) {
                        Some(i) => merge_into(&mut l[i], e, cursor.item(), false),
                        None => l.push(e.clone()),
                    }
                }
            }
        },
        _ => *live = strip_nulls(applied),
    }
}

fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), strip_nulls(v)))
                .collect(),
        ),
        Value::Array(l) => Value::Array(l.iter().map(strip_nulls).collect()),
        other => other.clone(),
    }
}

/// Reads `metadata.managedFields`.
pub fn read_managed(obj: &Value) -> Vec<ManagedEntry> {
    let Some(list) = obj
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|e| {
            let s = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
            Some(ManagedEntry {
                manager: s("manager")?,
                operation: s("operation").unwrap_or_else(|| "Update".into()),
                api_version: s("apiVersion").unwrap_or_default(),
                time: s("time").unwrap_or_default(),
                subresource: s("subresource"),
                fields: FieldSet::from_fields_v1(e.get("fieldsV1").unwrap_or(&Value::Null)),
            })
        })
        .collect()
}

/// Writes `metadata.managedFields` (entries with no fields are dropped, as the real server does).
pub fn write_managed(obj: &mut Value, entries: &[ManagedEntry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| encode_entry(e, e.fields.to_fields_v1()))
        .collect();
    let Value::Object(root) = obj else { return };
    let meta = root.entry("metadata").or_insert_with(|| json!({}));
    if let Value::Object(meta) = meta {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

fn same_entry(e: &ManagedEntry, manager: &str, op: &str, sub: Option<&str>) -> bool {
    e.manager == manager && e.operation == op && e.subresource.as_deref() == sub
}

/// Server-side apply of `applied` onto `live` (Null when creating). Returns the new object
/// (with managedFields rewritten) or the conflicts that block a non-forced apply.
///
/// Other managers' entries are read in place, as FieldsV1 trees, only along the paths this
/// apply names (conflicts) or stops naming (removals); only the entries that change (this
/// manager's, and those a forced apply takes fields from) are decoded and re-encoded. A
/// pool's status has one manager per pod: decoding and re-encoding every manager made
/// each pod's report cost as much as all of theirs.
pub fn apply(
    live: &Value,
    applied: &Value,
    cursor: TypeCursor<'_>,
    req: &ApplyRequest<'_>,
) -> Result<Value, Vec<Conflict>> {
    let new_set = FieldSet::of(applied, cursor);
    let new_tree = new_set.to_fields_v1();
    let managed: &[Value] = live
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let own = managed
        .iter()
        .position(|e| entry_is(e, req.manager, "Apply", req.subresource));

    // Conflicts: another manager owns a leaf whose value this apply changes.
    let mut conflicts: Vec<(usize, String, Path)> = Vec::new();
    for (i, e) in managed.iter().enumerate() {
        if Some(i) == own {
            continue;
        }
        let (Some(manager), Some(Value::Object(fields)), Value::Object(mine)) = (
            e.get("manager").and_then(Value::as_str),
            e.get("fieldsV1"),
            &new_tree,
        ) else {
            continue;
        };
        let mut shared = Vec::new();
        intersect_trees(fields, mine, &mut Vec::new(), &mut shared);
        shared.sort();
        for p in shared {
            if is_element(&p) {
                continue;
            }
            if get_path(live, &p) != get_path(applied, &p).map(strip_nulls).as_ref() {
                conflicts.push((i, manager.to_string(), p));
            }
        }
    }
    if !conflicts.is_empty() && !req.force {
        return Err(conflicts
            .into_iter()
            .map(|(_, manager, p)| Conflict {
                manager,
                field: display_path(&p),
            })
            .collect());
    }

    let previous = own
        .and_then(|i| managed[i].get("fieldsV1"))
        .map(FieldSet::from_fields_v1)
        .unwrap_or_default();

    let mut merged = if live.is_object() {
        live.clone()
    } else {
        json!({})
    };
    merge_into(&mut merged, applied, cursor, true);

    // Fields this manager stopped applying go away unless someone else still owns them.
    let removable: Vec<&Path> = previous
        .0
        .difference(&new_set.0)
        .filter(|p| !new_set.has_prefix(p))
        .filter(|p| {
            let owned_elsewhere = managed.iter().enumerate().any(|(i, e)| {
                if Some(i) == own {
                    return false;
                }
                let Some(fields) = e.get("fieldsV1") else {
                    return false;
                };
                match tree_node(fields, p) {
                    // A list element is kept while anything beneath it is owned.
                    Some(_) if is_element(p) => true,
                    Some(node) => is_member(node),
                    None => false,
                }
            });
            !owned_elsewhere
        })
        .collect();
    for p in &removable {
        // A path under an element that goes away goes with it; a key field of a surviving
        // element is never removed on its own (the element would become unaddressable).
        let under_removed = (1..p.len()).any(|n| removable.iter().any(|r| r.as_slice() == &p[..n]));
        let is_key_field = p.len() >= 2
            && p[p.len() - 2].starts_with("k:")
            && p[p.len() - 1]
                .strip_prefix("f:")
                .is_some_and(|f| p[p.len() - 2].contains(&format!("\"{f}\":")));
        if !under_removed && !is_key_field {
            remove_path(&mut merged, p);
        }
    }

    // managedFields (merged carries live's): only the entries that change are rewritten,
    // in place.
    let mut forced: Vec<usize> = conflicts.iter().map(|(i, _, _)| *i).collect();
    forced.dedup();
    let entry = ManagedEntry {
        manager: req.manager.to_string(),
        operation: "Apply".into(),
        api_version: req.api_version.to_string(),
        time: req.now.to_string(),
        subresource: req.subresource.map(str::to_string),
        fields: new_set,
    };
    let own_empty = entry.fields.is_empty();
    let encoded = encode_entry(&entry, new_tree);
    let meta = meta_object(&mut merged);
    let list = match meta.get_mut("managedFields") {
        Some(Value::Array(list)) => list,
        _ => {
            meta.insert("managedFields".into(), json!([]));
            match meta.get_mut("managedFields") {
                Some(Value::Array(list)) => list,
                _ => unreachable!("just inserted"),
            }
        }
    };
    let mut emptied = vec![false; list.len()];
    for i in forced {
        let mut fields = FieldSet::from_fields_v1(list[i].get("fieldsV1").unwrap_or(&Value::Null));
        for (_, _, p) in conflicts.iter().filter(|(j, _, _)| *j == i) {
            fields.0.remove(p);
        }
        if fields.is_empty() {
            emptied[i] = true;
        } else {
            list[i]["fieldsV1"] = fields.to_fields_v1();
        }
    }
    match own {
        Some(i) if own_empty => emptied[i] = true,
        Some(i) => list[i] = encoded,
        None if own_empty => {}
        None => {
            list.push(encoded);
            emptied.push(false);
        }
    }
    if emptied.contains(&true) {
        let mut keep = emptied.into_iter().map(|e| !e);
        list.retain(|_| keep.next().unwrap_or(true));
    }
    if list.is_empty() {
        meta.remove("managedFields");
    }
    Ok(merged)
}

/// The object's `metadata` map, created when missing.
fn meta_object(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let root = obj.as_object_mut().expect("object");
    let meta = root.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    meta.as_object_mut().expect("metadata object")
}

/// Whether a managedFields entry (JSON) is the one of this manager, operation and subresource.
fn entry_is(e: &Value, manager: &str, op: &str, sub: Option<&str>) -> bool {
    e.get("manager").and_then(Value::as_str) == Some(manager)
        && e.get("operation")
            .and_then(Value::as_str)
            .unwrap_or("Update")
            == op
        && e.get("subresource").and_then(Value::as_str) == sub
}

/// A FieldsV1 node is a member of its set when it is a leaf or carries `"."`.
fn is_member(node: &Value) -> bool {
    node.as_object()
        .is_some_and(|m| m.is_empty() || m.contains_key("."))
}

/// The FieldsV1 node at `path`, if the tree has one (then something at or beneath `path`
/// is owned).
fn tree_node<'v>(tree: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut node = tree;
    for el in path {
        node = node.get(el)?;
    }
    Some(node)
}

/// The paths in both FieldsV1 trees, walking only `small`'s nodes (the applied set).
fn intersect_trees(
    big: &Map<String, Value>,
    small: &Map<String, Value>,
    prefix: &mut Path,
    out: &mut Vec<Path>,
) {
    for (k, s) in small {
        if k == "." {
            continue;
        }
        let (Some(b @ Value::Object(bm)), Value::Object(sm)) = (big.get(k), s) else {
            continue;
        };
        prefix.push(k.clone());
        if is_member(b) && is_member(s) {
            out.push(prefix.clone());
        }
        intersect_trees(bm, sm, prefix, out);
        prefix.pop();
    }
}

/// One managedFields entry as JSON, with its FieldsV1 already encoded.
fn encode_entry(e: &ManagedEntry, fields_v1: Value) -> Value {
    let mut v = json!({
        "manager": e.manager,
        "operation": e.operation,
        "apiVersion": e.api_version,
        "time": e.time,
        "fieldsType": "FieldsV1",
        "fieldsV1": fields_v1,
    });
    if let Some(s) = &e.subresource {
        v["subresource"] = json!(s);
    }
    v
}

/// Records a non-apply write (create, update, patch) in `new`'s managedFields: the writer
/// gains the paths whose values changed, everyone else loses them, and paths that no longer
/// exist are dropped from every manager.
pub fn record_update(old: &Value, new: &mut Value, cursor: TypeCursor<'_>, req: &ApplyRequest<'_>) {
    let mut entries = read_managed(old);
    let old_set = FieldSet::of(old, cursor);
    let new_set = FieldSet::of(new, cursor);
    let changed: BTreeSet<Path> = new_set
        .0
        .iter()
        .filter(|p| {
            if is_element(p) {
                get_path(old, p).is_none()
            } else {
                get_path(old, p) != get_path(new, p)
            }
        })
        .cloned()
        .collect();
    let gone: BTreeSet<Path> = old_set.0.difference(&new_set.0).cloned().collect();
    for e in &mut entries {
        e.fields
            .0
            .retain(|p| !changed.contains(p) && !gone.contains(p) && get_path(new, p).is_some());
    }
    if !changed.is_empty() {
        match entries
            .iter_mut()
            .find(|e| same_entry(e, req.manager, "Update", req.subresource))
        {
            Some(e) => {
                e.fields.0.extend(changed);
                e.time = req.now.to_string();
                e.api_version = req.api_version.to_string();
            }
            None => entries.push(ManagedEntry {
                manager: req.manager.to_string(),
                operation: "Update".into(),
                api_version: req.api_version.to_string(),
                time: req.now.to_string(),
                subresource: req.subresource.map(str::to_string),
                fields: FieldSet(changed),
            }),
        }
    }
    write_managed(new, &entries);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pool_schema() -> Value {
        json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "replicas": {"type": "integer"},
                "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
                "args": {"type": "array", "items": {"type": "string"}},
                "sel": {"type": "object", "x-kubernetes-map-type": "atomic"}
            }},
            "status": {"type": "object", "properties": {
                "pods": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                    "items": {"type": "object", "properties": {"name": {"type": "string"}, "connections": {"type": "integer"}}}}
            }}
        }})
    }

    fn req<'a>(manager: &'a str, force: bool) -> ApplyRequest<'a> {
        ApplyRequest {
            manager,
            subresource: None,
            force,
            api_version: "tether.dev/v1",
            now: "2025-01-01T00:00:00Z",
        }
    }

    fn paths(set: &FieldSet) -> Vec<String> {
        set.0.iter().map(|p| display_path(p)).collect()
    }

    #[test]
    fn field_set_of_object_uses_list_types() {
        let schema = pool_schema();
        let c = TypeCursor::Schema(Some(&schema));
        let obj = json!({"apiVersion": "x", "kind": "Y", "metadata": {"name": "n", "labels": {"a": "1"}, "finalizers": ["f"]},
            "spec": {"replicas": 2, "tags": ["x"], "args": ["--a"], "sel": {"k": "v"}},
            "status": {"pods": [{"name": "p1", "connections": 3}]}});
        let set = FieldSet::of(&obj, c);
        assert_eq!(
            paths(&set),
            vec![
                ".metadata.finalizers[=\"f\"]",
                ".metadata.labels.a",
                ".spec.args",
                ".spec.replicas",
                ".spec.sel",
                ".spec.tags[=\"x\"]",
                ".status.pods[name=\"p1\"]",
                ".status.pods[name=\"p1\"].connections",
                ".status.pods[name=\"p1\"].name",
            ]
        );
    }

    #[test]
    fn fields_v1_round_trip_matches_real_encoding() {
        let schema = pool_schema();
        let obj = json!({"status": {"pods": [{"name": "p1", "connections": 3}]}, "spec": {"replicas": 1}});
        let set = FieldSet::of(&obj, TypeCursor::Schema(Some(&schema)));
        let v1 = set.to_fields_v1();
        assert_eq!(
            v1,
            json!({"f:spec": {"f:replicas": {}},
                   "f:status": {"f:pods": {"k:{\"name\":\"p1\"}": {".": {}, "f:connections": {}, "f:name": {}}}}})
        );
        assert_eq!(FieldSet::from_fields_v1(&v1), set);
    }

    #[test]
    fn key_element_sorts_keys() {
        let e = json!({"protocol": "TCP", "containerPort": 80});
        assert_eq!(
            key_element(&e, &["protocol".into(), "containerPort".into()]),
            "k:{\"containerPort\":80,\"protocol\":\"TCP\"}"
        );
    }

    #[test]
    fn two_managers_share_a_list_map_without_erasing_each_other() {
        let schema = pool_schema();
        let c = TypeCursor::Schema(Some(&schema));
        let live = json!({"metadata": {"name": "p"}, "spec": {"replicas": 1}});
        let a = apply(
            &live,
            &json!({"status": {"pods": [{"name": "p1", "connections": 1}]}}),
            c,
            &req("pod-1", false),
        )
        .unwrap();
        let b = apply(
            &a,
            &json!({"status": {"pods": [{"name": "p2", "connections": 7}]}}),
            c,
            &req("pod-2", false),
        )
        .unwrap();
        assert_eq!(
            b["status"]["pods"],
            json!([{"name": "p1", "connections": 1}, {"name": "p2", "connections": 7}])
        );
        // pod-1 updates its own entry: pod-2's entry untouched, no conflict.
        let c2 = apply(
            &b,
            &json!({"status": {"pods": [{"name": "p1", "connections": 5}]}}),
            c,
            &req("pod-1", false),
        )
        .unwrap();
        assert_eq!(
            c2["status"]["pods"],
            json!([{"name": "p1", "connections": 5}, {"name": "p2", "connections": 7}])
        );
        let managers: Vec<String> = read_managed(&c2)
            .iter()
            .map(|e| e.manager.clone())
            .collect();
        assert_eq!(managers, ["pod-1", "pod-2"]);
        // pod-1 stops applying its entry: it is removed, pod-2's stays.
        let d = apply(
            &c2,
            &json!({"status": {"pods": []}}),
            c,
            &req("pod-1", false),
        )
        .unwrap();
        assert_eq!(
            d["status"]["pods"],
            json!([{"name": "p2", "connections": 7}])
        );
    }

    #[test]
    fn conflict_on_changed_value_owned_by_other_and_force_takes_it() {
        let schema = pool_schema();
        let c = TypeCursor::Schema(Some(&schema));
        let a = apply(
            &Value::Null,
            &json!({"metadata": {"name": "p"}, "spec": {"replicas": 1}}),
            c,
            &req("alice", false),
        )
        .unwrap();
        // Same value: shared ownership, no conflict.
        let shared = apply(&a, &json!({"spec": {"replicas": 1}}), c, &req("bob", false)).unwrap();
        assert_eq!(read_managed(&shared).len(), 2);
        // Different value: conflict naming the owner and field.
        let err = apply(&a, &json!({"spec": {"replicas": 3}}), c, &req("bob", false)).unwrap_err();
        assert_eq!(
            err,
            vec![Conflict {
                manager: "alice".into(),
                field: ".spec.replicas".into()
            }]
        );
        // Forced: bob wins, alice loses the field (and her now-empty entry).
        let forced = apply(&a, &json!({"spec": {"replicas": 3}}), c, &req("bob", true)).unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        let m = read_managed(&forced);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].manager, "bob");
    }

    #[test]
    fn removal_keeps_fields_still_owned_by_another() {
        let schema = pool_schema();
        let c = TypeCursor::Schema(Some(&schema));
        let a = apply(
            &Value::Null,
            &json!({"spec": {"replicas": 1, "args": ["x"]}}),
            c,
            &req("alice", false),
        )
        .unwrap();
        let b = apply(&a, &json!({"spec": {"replicas": 1}}), c, &req("bob", false)).unwrap();
        // alice stops applying both: replicas is still bob's, args is removed.
        let out = apply(&b, &json!({"spec": {}}), c, &req("alice", false)).unwrap();
        assert_eq!(out["spec"], json!({"replicas": 1}));
    }

    #[test]
    fn sets_union_and_atomic_replace() {
        let schema = pool_schema();
        let c = TypeCursor::Schema(Some(&schema));
        let a = apply(
            &Value::Null,
            &json!({"spec": {"tags": ["a"], "sel": {"x": "1", "y": "2"}}}),
            c,
            &req("alice", false),
        )
        .unwrap();
        let b = apply(&a, &json!({"spec": {"tags": ["b"]}}), c, &req("bob", false)).unwrap();
        assert_eq!(b["spec"]["tags"], json!(["a", "b"]));
        let d = apply(
            &b,
            &json!({"spec": {"sel": {"x": "1"}}}),
            c,
            &req("alice", true),
        )
        .unwrap();
        assert_eq!(
            d["spec"]["sel"],
            json!({"x": "1"}),
            "atomic map replaced whole"
        );
        assert_eq!(
            d["spec"]["tags"],
            json!(["b"]),
            "alice stopped applying tag a"
        );
    }

    #[test]
    fn update_moves_ownership_to_writer() {
        let schema = pool_schema();
        let c = TypeCursor::Schema(Some(&schema));
        let a = apply(
            &Value::Null,
            &json!({"spec": {"replicas": 1, "args": ["x"]}}),
            c,
            &req("alice", false),
        )
        .unwrap();
        let mut b = a.clone();
        b["spec"]["replicas"] = json!(5);
        record_update(&a, &mut b, c, &req("kubectl-edit", false));
        let m = read_managed(&b);
        let edit = m.iter().find(|e| e.manager == "kubectl-edit").unwrap();
        assert_eq!(edit.operation, "Update");
        assert_eq!(paths(&edit.fields), vec![".spec.replicas"]);
        let alice = m.iter().find(|e| e.manager == "alice").unwrap();
        assert_eq!(paths(&alice.fields), vec![".spec.args"]);
        // Now alice re-applying replicas=1 conflicts with the editor.
        let err = apply(
            &b,
            &json!({"spec": {"replicas": 1, "args": ["x"]}}),
            c,
            &req("alice", false),
        )
        .unwrap_err();
        assert_eq!(err[0].manager, "kubectl-edit");
    }

    #[test]
    fn builtin_containers_merge_by_name() {
        let c = TypeCursor::Builtin("", "");
        let a = apply(
            &Value::Null,
            &json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": "a:1", "ports": [{"containerPort": 80}]}]}}}}),
            c,
            &req("op", false),
        )
        .unwrap();
        let b = apply(
            &a,
            &json!({"spec": {"template": {"spec": {"containers": [
            {"name": "sidecar", "image": "s:1"}]}}}}),
            c,
            &req("injector", false),
        )
        .unwrap();
        let names: Vec<&str> = b["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["app", "sidecar"]);
    }

    #[test]
    fn path_helpers() {
        let mut obj =
            json!({"status": {"pods": [{"name": "a", "x": 1}, {"name": "b"}]}, "m": {"f": ["q"]}});
        let p: Path = vec![
            "f:status".into(),
            "f:pods".into(),
            "k:{\"name\":\"a\"}".into(),
            "f:x".into(),
        ];
        assert_eq!(get_path(&obj, &p), Some(&json!(1)));
        remove_path(&mut obj, &p);
        assert_eq!(obj["status"]["pods"][0], json!({"name": "a"}));
        remove_path(&mut obj, &p[..3]);
        assert_eq!(obj["status"]["pods"], json!([{"name": "b"}]));
        remove_path(&mut obj, &["f:m".into(), "f:f".into(), "v:\"q\"".into()]);
        assert_eq!(obj["m"]["f"], json!([]));
    }

    #[test]
    fn an_apply_decodes_only_its_own_field_set_among_a_thousand_managers() {
        let schema = pool_schema();
        let c = TypeCursor::Schema(Some(&schema));
        // 1,000 pods' entries, each applied by its own manager (as gateway pods report).
        let mut live = json!({"metadata": {"name": "p"}, "spec": {"replicas": 1}});
        let mut managed = Vec::new();
        let mut entries = Vec::new();
        for i in 0..1000 {
            let name = format!("p{i}");
            entries.push(json!({"name": name, "connections": i}));
            let set = FieldSet::of(
                &json!({"status": {"pods": [{"name": name, "connections": i}]}}),
                c,
            );
            managed.push(encode_entry(
                &ManagedEntry {
                    manager: format!("pod-{i}"),
                    operation: "Apply".into(),
                    api_version: "tether.dev/v1".into(),
                    time: "2025-01-01T00:00:00Z".into(),
                    subresource: None,
                    fields: set.clone(),
                },
                set.to_fields_v1(),
            ));
        }
        live["status"] = json!({"pods": entries});
        live["metadata"]["managedFields"] = json!(managed);

        let before = field_sets_decoded();
        let out = apply(
            &live,
            &json!({"status": {"pods": [{"name": "p7", "connections": 70}]}}),
            c,
            &req("pod-7", true),
        )
        .unwrap();
        assert_eq!(
            field_sets_decoded() - before,
            1,
            "only the applier's own entry is decoded, not the other 999"
        );
        assert_eq!(
            out["status"]["pods"][7],
            json!({"name": "p7", "connections": 70})
        );
        let after = read_managed(&out);
        assert_eq!(after.len(), 1000);
        assert_eq!(
            read_managed(&live)[8..],
            after[8..],
            "the others' entries are as they were"
        );

        // Taking another manager's field (forced) decodes that manager's entry too.
        let before = field_sets_decoded();
        let out = apply(
            &out,
            &json!({"status": {"pods": [{"name": "p8", "connections": 1}]}}),
            c,
            &req("pod-7", true),
        )
        .unwrap();
        assert_eq!(field_sets_decoded() - before, 2);
        let m = read_managed(&out);
        let p8 = m.iter().find(|e| e.manager == "pod-8").unwrap();
        assert_eq!(
            paths(&p8.fields),
            [
                ".status.pods[name=\"p8\"]",
                ".status.pods[name=\"p8\"].name"
            ]
        );
    }
}
