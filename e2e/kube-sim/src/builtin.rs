//! Built-in kinds as the real API server checks them, which the stand-in has no Go types
//! for: strict decoding (each object is decoded into its `k8s-openapi` type and encoded
//! again; a field the type does not have is an unknown field), immutable fields on update,
//! and Service cluster IP allocation (so that `spec.clusterIP` is immutable as it is on a
//! cluster).
//!
//! ```text
//!  request object ──► k8s-openapi type ──► JSON again
//!        │                                    │
//!        └──── fields present only on the left: unknown (Strict: 400, Warn: pruned +
//!              Warning header, Ignore: pruned; server-side apply: always refused)
//! ```
//!
//! Pure functions over `serde_json::Value`; the store calls them in its write pipeline.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::error::Cause;
use crate::registry::ResourceType;

/// The object decoded into its `k8s-openapi` type and encoded again, when the kind has
/// one; `Err` carries the decoder's message (a wrong type, bad base64, a bad time).
pub fn round_trip(rt: &ResourceType, obj: &Value) -> Option<Result<Value, String>> {
    use k8s_openapi::api::{apps, coordination, core, events, networking, policy, rbac};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions as ext;
    if !rt.builtin {
        return None;
    }
    Some(match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "namespaces") => typed::<core::v1::Namespace>(obj),
        ("", "configmaps") => typed::<core::v1::ConfigMap>(obj),
        ("", "secrets") => typed::<core::v1::Secret>(obj),
        ("", "services") => typed::<core::v1::Service>(obj),
        ("", "serviceaccounts") => typed::<core::v1::ServiceAccount>(obj),
        ("", "pods") => typed::<core::v1::Pod>(obj),
        ("", "events") => typed::<core::v1::Event>(obj),
        ("", "resourcequotas") => typed::<core::v1::ResourceQuota>(obj),
        ("", "endpoints") => typed::<core::v1::Endpoints>(obj),
        ("", "nodes") => typed::<core::v1::Node>(obj),
        ("", "persistentvolumeclaims") => typed::<core::v1::PersistentVolumeClaim>(obj),
        ("apps", "statefulsets") => typed::<apps::v1::StatefulSet>(obj),
        ("apps", "deployments") => typed::<apps::v1::Deployment>(obj),
        ("apps", "controllerrevisions") => typed::<apps::v1::ControllerRevision>(obj),
        ("networking.k8s.io", "networkpolicies") => typed::<networking::v1::NetworkPolicy>(obj),
        ("policy", "poddisruptionbudgets") => typed::<policy::v1::PodDisruptionBudget>(obj),
        ("rbac.authorization.k8s.io", "roles") => typed::<rbac::v1::Role>(obj),
        ("rbac.authorization.k8s.io", "rolebindings") => typed::<rbac::v1::RoleBinding>(obj),
        ("rbac.authorization.k8s.io", "clusterroles") => typed::<rbac::v1::ClusterRole>(obj),
        ("rbac.authorization.k8s.io", "clusterrolebindings") => {
            typed::<rbac::v1::ClusterRoleBinding>(obj)
        }
        ("coordination.k8s.io", "leases") => typed::<coordination::v1::Lease>(obj),
        ("events.k8s.io", "events") => typed::<events::v1::Event>(obj),
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            typed::<ext::v1::CustomResourceDefinition>(obj)
        }
        _ => return None,
    })
}

fn typed<T: DeserializeOwned + Serialize>(obj: &Value) -> Result<Value, String> {
    let t = T::deserialize(obj).map_err(|e| e.to_string())?;
    serde_json::to_value(&t).map_err(|e| e.to_string())
}

/// What strict decoding found in an object of a built-in kind.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decoded {
    /// Paths of unknown fields, as the real decoder names them
    /// (`spec.template.spec.containers[0].imagePullPolicyy`).
    pub unknown: Vec<String>,
}

/// Decodes `obj` strictly into its kind's type: `Ok` with the unknown fields' paths
/// (removed from `obj` when `prune`), or `Err` with the decoder's message. Kinds without a
/// type (custom resources) decode to nothing unknown.
pub fn decode(rt: &ResourceType, obj: &mut Value, prune: bool) -> Result<Decoded, String> {
    let Some(typed) = round_trip(rt, obj) else {
        return Ok(Decoded::default());
    };
    let typed = typed?;
    let mut out = Decoded::default();
    unknown(obj, &typed, "", prune, &mut out.unknown);
    Ok(out)
}

/// Fields of `input` (non-null) that `typed` does not have.
fn unknown(input: &mut Value, typed: &Value, path: &str, prune: bool, out: &mut Vec<String>) {
    match (input, typed) {
        (Value::Object(a), Value::Object(b)) => {
            let mut gone = Vec::new();
            for (k, v) in a.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(bv) => unknown(v, bv, &p, prune, out),
                    // A null is an absent optional field, not an unknown one.
                    None if v.is_null() => {}
                    None => {
                        out.push(p);
                        gone.push(k.clone());
                    }
                }
            }
            if prune {
                for k in gone {
                    a.remove(&k);
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter_mut().zip(b).enumerate() {
                unknown(x, y, &format!("{path}[{i}]"), prune, out);
            }
        }
        _ => {}
    }
}

/// The fields of a StatefulSet's spec that an update may change (ValidateStatefulSetUpdate).
const STS_MUTABLE: [&str; 6] = [
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
];

/// The real server's message for any other StatefulSet spec change.
pub const STS_FORBIDDEN: &str = "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', 'template', 'updateStrategy', 'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden";

fn forbidden(field: &str, message: String) -> Cause {
    Cause {
        reason: "FieldValueForbidden".into(),
        message,
        field: field.into(),
    }
}

fn invalid(field: &str, message: String) -> Cause {
    Cause {
        reason: "FieldValueInvalid".into(),
        message,
        field: field.into(),
    }
}

/// An absent field and a null are the same; so are the server's defaults and their
/// absence (the real server compares objects after defaulting them).
fn same_field(key: &str, a: Option<&Value>, b: Option<&Value>, defaults: &[(&str, Value)]) -> bool {
    let norm = |v: Option<&Value>| -> Option<Value> {
        match v {
            None | Some(Value::Null) => defaults
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, d)| d.clone()),
            Some(v) => Some(v.clone()),
        }
    };
    norm(a) == norm(b)
}

/// A volumeClaimTemplate as the server compares it: without status or a null
/// creationTimestamp, with `volumeMode` defaulted to Filesystem.
fn claim_template(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
        if let Some(meta) = m.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.retain(|_, x| !x.is_null());
        }
        if let Some(spec) = m.get_mut("spec").and_then(Value::as_object_mut)
            && spec.get("volumeMode").is_none_or(Value::is_null)
        {
            spec.insert("volumeMode".into(), json!("Filesystem"));
        }
    }
    v
}

/// Field validation of built-in kinds that decoding alone does not catch: 422 causes,
/// empty when valid. Only the rules a Tether client could break are here.
pub fn validate(rt: &ResourceType, obj: &Value) -> Vec<Cause> {
    if !rt.builtin {
        return vec![];
    }
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("policy", "poddisruptionbudgets") => disruption_budget(&obj["spec"]),
        _ => vec![],
    }
}

/// A PodDisruptionBudget's `minAvailable`/`maxUnavailable`: one of them, and a string
/// only as a percentage (the API server refuses `"2"`; a count is an integer).
fn disruption_budget(spec: &Value) -> Vec<Cause> {
    let mut causes = vec![];
    for key in ["minAvailable", "maxUnavailable"] {
        if let Some(Value::String(s)) = spec.get(key) {
            let percent = s
                .strip_suffix('%')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !percent {
                causes.push(invalid(
                    &format!("spec.{key}"),
                    format!(
                        "Invalid value: \"{s}\": a valid percent string must be a numeric string followed by an ending '%' (e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')"
                    ),
                ));
            }
        }
    }
    let set = |key: &str| spec.get(key).is_some_and(|v| !v.is_null());
    if set("minAvailable") && set("maxUnavailable") {
        causes.push(invalid(
            "spec",
            "Invalid value: minAvailable and maxUnavailable cannot be both set".into(),
        ));
    }
    causes
}

/// Update rules of built-in kinds with immutable fields: 422 causes, empty when allowed.
/// `old` and `new` are whole objects (after status isolation).
pub fn immutable(rt: &ResourceType, old: &Value, new: &Value) -> Vec<Cause> {
    if !rt.builtin {
        return vec![];
    }
    let empty = Map::new();
    let spec = |o: &Value| -> Map<String, Value> {
        o.get("spec")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_else(|| empty.clone())
    };
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("apps", "statefulsets") => {
            let (a, b) = (spec(old), spec(new));
            let defaults = [
                ("podManagementPolicy", json!("OrderedReady")),
                ("revisionHistoryLimit", json!(10)),
                ("serviceName", json!("")),
            ];
            let keys = a
                .keys()
                .chain(b.keys())
                .filter(|k| !STS_MUTABLE.contains(&k.as_str()));
            for k in keys {
                let same = if k == "volumeClaimTemplates" {
                    let list = |m: &Map<String, Value>| -> Vec<Value> {
                        m.get(k)
                            .and_then(Value::as_array)
                            .map(|l| l.iter().map(claim_template).collect())
                            .unwrap_or_default()
                    };
                    list(&a) == list(&b)
                } else {
                    same_field(k, a.get(k), b.get(k), &defaults)
                };
                if !same {
                    return vec![forbidden("spec", STS_FORBIDDEN.into())];
                }
            }
            vec![]
        }
        ("", "services") => service_update(&spec(old), &spec(new)),
        ("", "persistentvolumeclaims") => {
            let (a, b) = (spec(old), spec(new));
            let mut causes = Vec::new();
            let requests = |m: &Map<String, Value>| {
                m.get("resources").and_then(|r| r.get("requests")).cloned()
            };
            let without_requests = |m: &Map<String, Value>| -> Map<String, Value> {
                let mut m = m.clone();
                m.remove("volumeAttributesClassName");
                if let Some(r) = m.get_mut("resources").and_then(Value::as_object_mut) {
                    r.remove("requests");
                    if r.is_empty() {
                        m.remove("resources");
                    }
                }
                m.retain(|_, v| !v.is_null());
                m
            };
            if without_requests(&a) != without_requests(&b) {
                causes.push(forbidden(
                    "spec",
                    "Forbidden: spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims".into(),
                ));
            }
            let storage = |r: Option<Value>| {
                r.and_then(|r| r.get("storage").and_then(Value::as_str).and_then(quantity))
            };
            if let (Some(before), Some(after)) = (storage(requests(&a)), storage(requests(&b)))
                && after < before
            {
                causes.push(forbidden(
                    "spec.resources.requests.storage",
                    "Forbidden: field can not be less than previous value".into(),
                ));
            }
            causes
        }
        _ => vec![],
    }
}

fn needs_cluster_ip(spec: &Map<String, Value>) -> bool {
    spec.get("type").and_then(Value::as_str) != Some("ExternalName")
}

fn ip_of(spec: &Map<String, Value>) -> Option<&str> {
    spec.get("clusterIP")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// `spec.clusterIP` and `spec.clusterIPs` may not change once set (the update strategy
/// first carries them over when the new object leaves them empty, see
/// [`carry_cluster_ip`]).
fn service_update(old: &Map<String, Value>, new: &Map<String, Value>) -> Vec<Cause> {
    if !needs_cluster_ip(new) {
        return vec![];
    }
    let mut causes = Vec::new();
    if let (Some(a), Some(b)) = (ip_of(old), ip_of(new))
        && a != b
    {
        causes.push(invalid(
            "spec.clusterIP",
            format!("Invalid value: \"{b}\": field is immutable"),
        ));
    }
    let ips = |m: &Map<String, Value>| -> Vec<String> {
        m.get("clusterIPs")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (a, b) = (ips(old), ips(new));
    if !a.is_empty() && !b.is_empty() && a.first() != b.first() {
        let list: Vec<String> = b.iter().map(|s| format!("{s:?}")).collect();
        causes.push(invalid(
            "spec.clusterIPs[0]",
            format!(
                "Invalid value: []string{{{}}}: may not change once set",
                list.join(", ")
            ),
        ));
    }
    causes
}

/// The Service update strategy's `patchAllocatedValues`: a new object that leaves
/// `clusterIP`/`clusterIPs` empty keeps the allocated ones.
pub fn carry_cluster_ip(rt: &ResourceType, old: &Value, new: &mut Value) {
    if !(rt.builtin && rt.group.is_empty() && rt.plural == "services") {
        return;
    }
    let Some(old_spec) = old.get("spec").and_then(Value::as_object) else {
        return;
    };
    let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    if !needs_cluster_ip(spec) {
        return;
    }
    for f in ["clusterIP", "clusterIPs"] {
        let empty = match spec.get(f) {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) => s.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            _ => false,
        };
        if empty && let Some(v) = old_spec.get(f) {
            spec.insert(f.into(), v.clone());
        }
    }
}

/// Allocates a cluster IP for a new Service that needs one and has none (the real
/// server's IP allocator, from 10.96.0.0/12); `None` (headless) is kept, and mirrored in
/// `clusterIPs`. `next` is the allocator's counter.
pub fn allocate_cluster_ip(rt: &ResourceType, obj: &mut Value, next: &mut u32) {
    if !(rt.builtin && rt.group.is_empty() && rt.plural == "services") {
        return;
    }
    let Some(root) = obj.as_object_mut() else {
        return;
    };
    let spec = root.entry("spec").or_insert_with(|| json!({}));
    let Some(spec) = spec.as_object_mut() else {
        return;
    };
    if !needs_cluster_ip(spec) {
        return;
    }
    let ip = match ip_of(spec) {
        Some(ip) => ip.to_string(),
        None => {
            *next += 1;
            // 10.96.0.0/12 holds 2^20 addresses; .0.0 and .0.1 (the API Service) skipped.
            let n = (*next % ((1 << 20) - 2)) + 1;
            let ip = format!("10.{}.{}.{}", 96 + (n >> 16), (n >> 8) & 0xff, n & 0xff);
            spec.insert("clusterIP".into(), json!(ip));
            ip
        }
    };
    if spec
        .get("clusterIPs")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        spec.insert("clusterIPs".into(), json!([ip]));
    }
}

/// A `resource.Quantity` as a number (`1Gi`, `500M`, `1.5`, `100m`, `1e3`).
pub fn quantity(s: &str) -> Option<f64> {
    let s = s.trim();
    // The suffix starts at the first letter, unless that is an exponent (`1e3`, `2E-1`).
    let b = s.as_bytes();
    let split = (0..b.len())
        .find(|&i| {
            b[i].is_ascii_alphabetic()
                && !(matches!(b[i], b'e' | b'E')
                    && b.get(i + 1)
                        .is_some_and(|c| c.is_ascii_digit() || *c == b'+' || *c == b'-'))
        })
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        _ => return None,
    };
    Some(n * mult)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::builtins;

    fn rt(plural: &str) -> ResourceType {
        builtins().into_iter().find(|t| t.plural == plural).unwrap()
    }

    #[test]
    fn unknown_fields_are_named_by_their_path() {
        let mut sts = json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "s", "labels": {"any": "label"}, "bogus": 1},
            "spec": {"replicas": 1, "selector": {"matchLabels": {"a": "b"}}, "serviceName": null,
                "template": {"spec": {"containers": [{"name": "c", "image": "i"}, {"name": "d", "imagePullPolicyy": "Always"}]}},
                "replicaz": 2}
        });
        let d = decode(&rt("statefulsets"), &mut sts, false).unwrap();
        assert_eq!(
            d.unknown,
            [
                "metadata.bogus",
                "spec.replicaz",
                "spec.template.spec.containers[1].imagePullPolicyy"
            ]
        );
        assert!(
            sts["spec"].get("replicaz").is_some(),
            "not pruned unless asked"
        );
        decode(&rt("statefulsets"), &mut sts, true).unwrap();
        assert!(sts["spec"].get("replicaz").is_none());
        assert!(sts["metadata"].get("bogus").is_none());
        assert_eq!(
            sts["metadata"]["labels"]["any"], "label",
            "map keys are data"
        );
        let again = decode(&rt("statefulsets"), &mut sts, false).unwrap();
        assert!(again.unknown.is_empty());
    }

    #[test]
    fn a_wrong_type_is_a_decoding_error() {
        let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": 1}});
        assert!(decode(&rt("configmaps"), &mut cm, false).is_err());
    }

    #[test]
    fn every_typed_kind_accepts_a_minimal_object() {
        for t in builtins() {
            let mut o = json!({"apiVersion": t.api_version(&t.versions[0].name), "kind": t.kind, "metadata": {"name": "x"}});
            let d = decode(&t, &mut o, false);
            assert_eq!(d, Ok(Decoded::default()), "{}", t.plural);
        }
    }

    #[test]
    fn statefulset_spec_is_immutable_but_for_six_fields() {
        let sts = |extra: Value| {
            let mut s = json!({"spec": {"replicas": 1, "serviceName": "h", "selector": {"matchLabels": {"a": "b"}},
                "volumeClaimTemplates": [{"metadata": {"name": "d"}, "spec": {"resources": {"requests": {"storage": "1Gi"}}}}]}});
            crate::patch::merge_patch(&s.clone(), &json!({"spec": extra}))
                .map(|v| s = v)
                .unwrap();
            s
        };
        let t = rt("statefulsets");
        let old = sts(json!({}));
        for ok in [
            json!({"replicas": 5}),
            json!({"template": {"metadata": {"labels": {"x": "y"}}}}),
            json!({"updateStrategy": {"type": "OnDelete"}}),
            json!({"minReadySeconds": 3}),
            json!({"ordinals": {"start": 1}}),
            json!({"persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete"}}),
            json!({"podManagementPolicy": "OrderedReady", "revisionHistoryLimit": 10}),
        ] {
            assert!(immutable(&t, &old, &sts(ok.clone())).is_empty(), "{ok}");
        }
        for bad in [
            json!({"serviceName": "other"}),
            json!({"selector": {"matchLabels": {"a": "c"}}}),
            json!({"podManagementPolicy": "Parallel"}),
            json!({"volumeClaimTemplates": [{"metadata": {"name": "d"}, "spec": {"resources": {"requests": {"storage": "2Gi"}}}}]}),
        ] {
            let c = immutable(&t, &old, &sts(bad.clone()));
            assert_eq!(c.len(), 1, "{bad}");
            assert_eq!(c[0].field, "spec");
            assert_eq!(c[0].message, STS_FORBIDDEN);
        }
    }

    #[test]
    fn service_cluster_ip_is_allocated_kept_and_immutable() {
        let t = rt("services");
        let mut next = 0;
        let mut a = json!({"spec": {"ports": [{"port": 80}]}});
        allocate_cluster_ip(&t, &mut a, &mut next);
        assert_eq!(a["spec"]["clusterIP"], "10.96.0.2");
        assert_eq!(a["spec"]["clusterIPs"], json!(["10.96.0.2"]));
        let mut headless = json!({"spec": {"clusterIP": "None"}});
        allocate_cluster_ip(&t, &mut headless, &mut next);
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
        let mut omitted = json!({"spec": {"ports": []}});
        carry_cluster_ip(&t, &a, &mut omitted);
        assert_eq!(omitted["spec"]["clusterIP"], "10.96.0.2");
        assert!(immutable(&t, &a, &omitted).is_empty());
        let changed = json!({"spec": {"clusterIP": "10.96.0.9", "clusterIPs": ["10.96.0.9"]}});
        let c = immutable(&t, &a, &changed);
        assert_eq!(c[0].field, "spec.clusterIP");
        assert_eq!(
            c[0].message,
            "Invalid value: \"10.96.0.9\": field is immutable"
        );
        assert_eq!(
            c[1].message,
            "Invalid value: []string{\"10.96.0.9\"}: may not change once set"
        );
        let external = json!({"spec": {"type": "ExternalName", "externalName": "x.example"}});
        assert!(immutable(&t, &a, &external).is_empty());
    }

    #[test]
    fn pvc_spec_is_immutable_but_storage_may_grow() {
        let t = rt("persistentvolumeclaims");
        let pvc = |size: &str, mode: &str| json!({"spec": {"accessModes": [mode], "resources": {"requests": {"storage": size}}}});
        let old = pvc("1Gi", "ReadWriteOnce");
        assert!(immutable(&t, &old, &pvc("2Gi", "ReadWriteOnce")).is_empty());
        let shrink = immutable(&t, &old, &pvc("500Mi", "ReadWriteOnce"));
        assert_eq!(shrink[0].field, "spec.resources.requests.storage");
        let mode = immutable(&t, &old, &pvc("1Gi", "ReadWriteMany"));
        assert_eq!(mode[0].field, "spec");
    }

    #[test]
    fn a_disruption_budget_takes_a_count_or_a_percentage_not_a_count_as_string() {
        let pdb = rt("poddisruptionbudgets");
        let with = |spec: Value| validate(&pdb, &json!({"spec": spec}));
        assert!(with(json!({"maxUnavailable": 2})).is_empty());
        assert!(with(json!({"maxUnavailable": "10%"})).is_empty());
        let refused = with(json!({"maxUnavailable": "2"}));
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].field, "spec.maxUnavailable");
        assert!(refused[0].message.contains("a valid percent string"));
        assert_eq!(
            with(json!({"minAvailable": 1, "maxUnavailable": 1})).len(),
            1
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity("1Gi"), Some(1073741824.0));
        assert_eq!(quantity("500M"), Some(5e8));
        assert_eq!(quantity("1e3"), Some(1000.0));
        assert_eq!(quantity("2E"), Some(2e18));
        assert_eq!(quantity("100m"), Some(0.1));
        assert_eq!(quantity("1Ei"), Some(1024f64.powi(6)));
        assert_eq!(quantity("x"), None);
    }
}
