//! Protobuf request bodies (`application/vnd.kubernetes.protobuf`), which kubectl's typed
//! generators send for built-in kinds (`kubectl create secret|configmap|namespace|
//! serviceaccount|role|rolebinding|clusterrole|clusterrolebinding ...`). Decoding is done
//! by the `k8s-pb` message types (prost); this module only unwraps the envelope and maps
//! the decoded structs to the JSON the rest of the server works on. Answers are JSON
//! (kubectl accepts either).
//!
//! Envelope (`k8s.io/apimachinery/pkg/runtime/serializer/protobuf`): the 4 bytes
//! `k8s\0`, then a `runtime.Unknown` whose `typeMeta` names the kind and whose `raw`
//! holds the object's message.

use std::collections::BTreeMap;

use base64::Engine;
use k8s_pb::api::authentication::v1 as authn;
use k8s_pb::api::authorization::v1 as authz;
use k8s_pb::api::core::v1 as core;
use k8s_pb::api::rbac::v1 as rbac;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::Unknown;
use prost::Message;
use serde_json::{Map, Value, json};

use crate::error::{ApiError, Result};

/// The content type.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

const MAGIC: &[u8] = b"k8s\0";

/// The kinds whose protobuf bodies are understood, as (apiVersion, kind).
pub const KINDS: [(&str, &str); 9] = [
    ("v1", "Namespace"),
    ("v1", "Service"),
    ("v1", "Secret"),
    ("v1", "ConfigMap"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "ClusterRole"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"),
];

fn bad(msg: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request(format!(
        "the body of the request could not be decoded as protobuf: {msg}"
    ))
}

/// Unwraps the envelope: (apiVersion, kind, the object's message).
fn envelope(body: &[u8]) -> Result<(String, String, Vec<u8>)> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("missing the k8s\\0 prefix"))?;
    let u = Unknown::decode(rest).map_err(bad)?;
    if u.content_encoding.as_deref().is_some_and(|e| !e.is_empty()) {
        return Err(bad("content encodings are not supported"));
    }
    let tm = u.type_meta.unwrap_or_default();
    Ok((
        tm.api_version.unwrap_or_default(),
        tm.kind.unwrap_or_default(),
        u.raw.unwrap_or_default(),
    ))
}

/// Decodes a protobuf body into the JSON object it represents (with apiVersion and kind).
pub fn decode(body: &[u8]) -> Result<Value> {
    let (api_version, kind, raw) = envelope(body)?;
    let raw = raw.as_slice();
    let mut obj = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => namespace(core::Namespace::decode(raw).map_err(bad)?),
        ("v1", "Secret") => secret(core::Secret::decode(raw).map_err(bad)?),
        ("v1", "Service") => service(core::Service::decode(raw).map_err(bad)?),
        ("v1", "ConfigMap") => config_map(core::ConfigMap::decode(raw).map_err(bad)?),
        ("v1", "ServiceAccount") => {
            service_account(core::ServiceAccount::decode(raw).map_err(bad)?)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => {
            let r = rbac::Role::decode(raw).map_err(bad)?;
            with_meta(r.metadata, [("rules", list(r.rules, rule))])
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
            let r = rbac::ClusterRole::decode(raw).map_err(bad)?;
            let agg = r.aggregation_rule.map(|a| {
                json!({"clusterRoleSelectors": a.cluster_role_selectors.into_iter().map(label_selector).collect::<Vec<_>>()})
            });
            with_meta(
                r.metadata,
                [("rules", list(r.rules, rule)), ("aggregationRule", agg)],
            )
        }
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => {
            let b = rbac::RoleBinding::decode(raw).map_err(bad)?;
            binding(b.metadata, b.subjects, b.role_ref)
        }
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            let b = rbac::ClusterRoleBinding::decode(raw).map_err(bad)?;
            binding(b.metadata, b.subjects, b.role_ref)
        }
        // What `kubectl create token` and `kubectl auth can-i|whoami` send (not stored).
        ("authentication.k8s.io/v1", "TokenRequest") => {
            let t = authn::TokenRequest::decode(raw).map_err(bad)?;
            let spec = t.spec.unwrap_or_default();
            let mut m = Map::new();
            set(&mut m, "audiences", strings(spec.audiences));
            set(
                &mut m,
                "expirationSeconds",
                spec.expiration_seconds.map(|v| json!(v)),
            );
            with_meta(t.metadata, [("spec", Some(Value::Object(m)))])
        }
        ("authentication.k8s.io/v1", "SelfSubjectReview") => {
            let r = authn::SelfSubjectReview::decode(raw).map_err(bad)?;
            with_meta(r.metadata, [])
        }
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => {
            let r = authz::SelfSubjectAccessReview::decode(raw).map_err(bad)?;
            let spec = r.spec.unwrap_or_default();
            let mut m = Map::new();
            set(
                &mut m,
                "resourceAttributes",
                spec.resource_attributes.map(|a| {
                    let mut o = Map::new();
                    for (k, v) in [
                        ("namespace", a.namespace),
                        ("verb", a.verb),
                        ("group", a.group),
                        ("version", a.version),
                        ("resource", a.resource),
                        ("subresource", a.subresource),
                        ("name", a.name),
                    ] {
                        set(&mut o, k, s(v));
                    }
                    Value::Object(o)
                }),
            );
            set(
                &mut m,
                "nonResourceAttributes",
                spec.non_resource_attributes.map(|a| {
                    let mut o = Map::new();
                    set(&mut o, "path", s(a.path));
                    set(&mut o, "verb", s(a.verb));
                    Value::Object(o)
                }),
            );
            with_meta(r.metadata, [("spec", Some(Value::Object(m)))])
        }
        _ => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the stand-in decodes protobuf bodies of {} only, not {api_version} {kind}; send JSON or YAML",
                    KINDS.iter().map(|(_, k)| *k).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    };
    obj["apiVersion"] = json!(api_version);
    obj["kind"] = json!(kind);
    Ok(obj)
}

/// A Service (`kubectl create service clusterip|nodeport|loadbalancer|externalname`):
/// every field of its spec; its status is the server's.
fn service(svc: core::Service) -> Value {
    let spec = svc.spec.unwrap_or_default();
    let mut m = Map::new();
    let port = |p: core::ServicePort| {
        let mut o = Map::new();
        set(&mut o, "name", s(p.name));
        set(&mut o, "protocol", s(p.protocol));
        set(&mut o, "appProtocol", s(p.app_protocol));
        set(&mut o, "port", p.port.map(|v| json!(v)));
        set(
            &mut o,
            "targetPort",
            p.target_port.and_then(|t| match t.r#type {
                Some(1) => s(t.str_val),
                _ => t.int_val.map(|v| json!(v)),
            }),
        );
        set(
            &mut o,
            "nodePort",
            p.node_port.filter(|v| *v != 0).map(|v| json!(v)),
        );
        Value::Object(o)
    };
    set(&mut m, "ports", list(spec.ports, port));
    set(&mut m, "selector", string_map(spec.selector));
    set(&mut m, "clusterIP", s(spec.cluster_ip));
    set(&mut m, "clusterIPs", strings(spec.cluster_ips));
    set(&mut m, "type", s(spec.r#type));
    set(&mut m, "externalIPs", strings(spec.external_ips));
    set(&mut m, "sessionAffinity", s(spec.session_affinity));
    set(&mut m, "loadBalancerIP", s(spec.load_balancer_ip));
    set(
        &mut m,
        "loadBalancerSourceRanges",
        strings(spec.load_balancer_source_ranges),
    );
    set(&mut m, "externalName", s(spec.external_name));
    set(
        &mut m,
        "externalTrafficPolicy",
        s(spec.external_traffic_policy),
    );
    set(
        &mut m,
        "healthCheckNodePort",
        spec.health_check_node_port
            .filter(|v| *v != 0)
            .map(|v| json!(v)),
    );
    set(
        &mut m,
        "publishNotReadyAddresses",
        spec.publish_not_ready_addresses
            .filter(|v| *v)
            .map(|v| json!(v)),
    );
    set(
        &mut m,
        "sessionAffinityConfig",
        spec.session_affinity_config.map(|c| {
            json!({"clientIP": c.client_ip.map(|ip| json!({"timeoutSeconds": ip.timeout_seconds}))})
        }),
    );
    set(&mut m, "ipFamilies", strings(spec.ip_families));
    set(&mut m, "ipFamilyPolicy", s(spec.ip_family_policy));
    set(
        &mut m,
        "allocateLoadBalancerNodePorts",
        spec.allocate_load_balancer_node_ports.map(|v| json!(v)),
    );
    set(&mut m, "loadBalancerClass", s(spec.load_balancer_class));
    set(
        &mut m,
        "internalTrafficPolicy",
        s(spec.internal_traffic_policy),
    );
    set(&mut m, "trafficDistribution", s(spec.traffic_distribution));
    with_meta(svc.metadata, [("spec", Some(Value::Object(m)))])
}

/// Decodes a protobuf `DeleteOptions` body into its JSON form.
pub fn decode_delete_options(body: &[u8]) -> Result<Value> {
    let (_, _, raw) = envelope(body)?;
    let d = meta::DeleteOptions::decode(raw.as_slice()).map_err(bad)?;
    let mut m = Map::new();
    set(
        &mut m,
        "gracePeriodSeconds",
        d.grace_period_seconds.map(|v| json!(v)),
    );
    set(
        &mut m,
        "orphanDependents",
        d.orphan_dependents.map(|v| json!(v)),
    );
    set(
        &mut m,
        "propagationPolicy",
        d.propagation_policy.map(|v| json!(v)),
    );
    set(&mut m, "dryRun", strings(d.dry_run));
    set(
        &mut m,
        "preconditions",
        d.preconditions.map(|p| {
            let mut pm = Map::new();
            set(&mut pm, "uid", p.uid.map(|v| json!(v)));
            set(
                &mut pm,
                "resourceVersion",
                p.resource_version.map(|v| json!(v)),
            );
            Value::Object(pm)
        }),
    );
    Ok(Value::Object(m))
}

// --- struct → JSON, leaving out what the message did not set, as the JSON encoding does.

fn set(m: &mut Map<String, Value>, k: &str, v: Option<Value>) {
    if let Some(v) = v {
        m.insert(k.into(), v);
    }
}

/// An `omitempty` string: Go's protobuf encoding writes empty strings, its JSON leaves
/// them out.
fn s(v: Option<String>) -> Option<Value> {
    v.filter(|x| !x.is_empty()).map(Value::String)
}

/// A string the JSON form always carries (no `omitempty`).
fn req(v: Option<String>) -> Option<Value> {
    Some(Value::String(v.unwrap_or_default()))
}

fn strings(v: Vec<String>) -> Option<Value> {
    (!v.is_empty()).then(|| json!(v))
}

fn list<T>(v: Vec<T>, f: impl Fn(T) -> Value) -> Option<Value> {
    (!v.is_empty()).then(|| Value::Array(v.into_iter().map(f).collect()))
}

fn string_map(m: BTreeMap<String, String>) -> Option<Value> {
    (!m.is_empty()).then(|| json!(m))
}

fn bytes_map(m: BTreeMap<String, Vec<u8>>) -> Option<Value> {
    (!m.is_empty()).then(|| {
        Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    (
                        k,
                        json!(base64::engine::general_purpose::STANDARD.encode(v)),
                    )
                })
                .collect(),
        )
    })
}

fn time(t: Option<meta::Time>) -> Option<Value> {
    let t = t.filter(|t| t.seconds.unwrap_or(0) != 0)?;
    let dt = chrono::DateTime::from_timestamp(t.seconds.unwrap_or(0), 0)?;
    Some(json!(dt.format("%Y-%m-%dT%H:%M:%SZ").to_string()))
}

fn object_meta(m: meta::ObjectMeta) -> Value {
    let mut o = Map::new();
    set(&mut o, "name", s(m.name));
    set(&mut o, "generateName", s(m.generate_name));
    set(&mut o, "namespace", s(m.namespace));
    set(&mut o, "uid", s(m.uid));
    set(&mut o, "resourceVersion", s(m.resource_version));
    set(
        &mut o,
        "generation",
        m.generation.filter(|g| *g != 0).map(|g| json!(g)),
    );
    set(&mut o, "creationTimestamp", time(m.creation_timestamp));
    set(&mut o, "labels", string_map(m.labels));
    set(&mut o, "annotations", string_map(m.annotations));
    set(
        &mut o,
        "ownerReferences",
        list(m.owner_references, |r| {
            let mut rm = Map::new();
            set(&mut rm, "apiVersion", req(r.api_version));
            set(&mut rm, "kind", req(r.kind));
            set(&mut rm, "name", req(r.name));
            set(&mut rm, "uid", req(r.uid));
            set(&mut rm, "controller", r.controller.map(Value::Bool));
            set(
                &mut rm,
                "blockOwnerDeletion",
                r.block_owner_deletion.map(Value::Bool),
            );
            Value::Object(rm)
        }),
    );
    set(&mut o, "finalizers", strings(m.finalizers));
    Value::Object(o)
}

fn with_meta<const N: usize>(
    metadata: Option<meta::ObjectMeta>,
    fields: [(&str, Option<Value>); N],
) -> Value {
    let mut o = Map::new();
    o.insert("metadata".into(), object_meta(metadata.unwrap_or_default()));
    for (k, v) in fields {
        set(&mut o, k, v);
    }
    Value::Object(o)
}

fn namespace(n: core::Namespace) -> Value {
    let spec = n.spec.map(|sp| {
        let mut m = Map::new();
        set(&mut m, "finalizers", strings(sp.finalizers));
        Value::Object(m)
    });
    with_meta(n.metadata, [("spec", spec)])
}

fn secret(x: core::Secret) -> Value {
    with_meta(
        x.metadata,
        [
            ("data", bytes_map(x.data)),
            ("stringData", string_map(x.string_data)),
            ("type", s(x.r#type)),
            ("immutable", x.immutable.map(Value::Bool)),
        ],
    )
}

fn config_map(x: core::ConfigMap) -> Value {
    with_meta(
        x.metadata,
        [
            ("data", string_map(x.data)),
            ("binaryData", bytes_map(x.binary_data)),
            ("immutable", x.immutable.map(Value::Bool)),
        ],
    )
}

fn service_account(x: core::ServiceAccount) -> Value {
    with_meta(
        x.metadata,
        [
            (
                "secrets",
                list(x.secrets, |r| {
                    let mut m = Map::new();
                    set(&mut m, "apiVersion", s(r.api_version));
                    set(&mut m, "kind", s(r.kind));
                    set(&mut m, "namespace", s(r.namespace));
                    set(&mut m, "name", s(r.name));
                    set(&mut m, "uid", s(r.uid));
                    set(&mut m, "resourceVersion", s(r.resource_version));
                    set(&mut m, "fieldPath", s(r.field_path));
                    Value::Object(m)
                }),
            ),
            (
                "imagePullSecrets",
                list(
                    x.image_pull_secrets,
                    |r| json!({"name": r.name.unwrap_or_default()}),
                ),
            ),
            (
                "automountServiceAccountToken",
                x.automount_service_account_token.map(Value::Bool),
            ),
        ],
    )
}

fn rule(r: rbac::PolicyRule) -> Value {
    let mut m = Map::new();
    // `verbs` is required: kubectl always sends it; keep it even when empty.
    m.insert("verbs".into(), json!(r.verbs));
    set(&mut m, "apiGroups", strings(r.api_groups));
    set(&mut m, "resources", strings(r.resources));
    set(&mut m, "resourceNames", strings(r.resource_names));
    set(&mut m, "nonResourceURLs", strings(r.non_resource_ur_ls));
    Value::Object(m)
}

fn label_selector(l: meta::LabelSelector) -> Value {
    let mut m = Map::new();
    set(&mut m, "matchLabels", string_map(l.match_labels));
    set(
        &mut m,
        "matchExpressions",
        list(l.match_expressions, |e| {
            let mut em = Map::new();
            set(&mut em, "key", s(e.key));
            set(&mut em, "operator", s(e.operator));
            set(&mut em, "values", strings(e.values));
            Value::Object(em)
        }),
    );
    Value::Object(m)
}

fn binding(
    metadata: Option<meta::ObjectMeta>,
    subjects: Vec<rbac::Subject>,
    role_ref: Option<rbac::RoleRef>,
) -> Value {
    let subjects = list(subjects, |x| {
        let mut m = Map::new();
        set(&mut m, "kind", req(x.kind));
        set(&mut m, "apiGroup", s(x.api_group));
        set(&mut m, "name", req(x.name));
        set(&mut m, "namespace", s(x.namespace));
        Value::Object(m)
    });
    let role_ref = role_ref.map(|r| {
        let mut m = Map::new();
        set(&mut m, "apiGroup", req(r.api_group));
        set(&mut m, "kind", req(r.kind));
        set(&mut m, "name", req(r.name));
        Value::Object(m)
    });
    with_meta(metadata, [("subjects", subjects), ("roleRef", role_ref)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_pb::apimachinery::pkg::runtime::TypeMeta;

    fn wrap(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
        let u = Unknown {
            type_meta: Some(TypeMeta {
                api_version: Some(api_version.into()),
                kind: Some(kind.into()),
            }),
            raw: Some(raw),
            content_encoding: Some(String::new()),
            content_type: Some(String::new()),
        };
        let mut out = MAGIC.to_vec();
        out.extend(u.encode_to_vec());
        out
    }

    #[test]
    fn secret_bytes_become_base64_and_meta_is_kept() {
        let sec = core::Secret {
            metadata: Some(meta::ObjectMeta {
                name: Some("jwt".into()),
                labels: [("a".to_string(), "b".to_string())].into(),
                ..Default::default()
            }),
            data: [("key".to_string(), b"s3cr\x00t".to_vec())].into(),
            r#type: Some("Opaque".into()),
            ..Default::default()
        };
        let v = decode(&wrap("v1", "Secret", sec.encode_to_vec())).unwrap();
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": "jwt", "labels": {"a": "b"}},
                "data": {"key": "czNjcgB0"}})
        );
    }

    #[test]
    fn role_binding_and_unknown_kinds() {
        let b = rbac::RoleBinding {
            metadata: Some(meta::ObjectMeta {
                name: Some("rb".into()),
                ..Default::default()
            }),
            subjects: vec![rbac::Subject {
                kind: Some("ServiceAccount".into()),
                name: Some("sa".into()),
                namespace: Some("ns".into()),
                api_group: Some(String::new()),
            }],
            role_ref: Some(rbac::RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: Some("Role".into()),
                name: Some("r".into()),
            }),
        };
        let v = decode(&wrap(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            b.encode_to_vec(),
        ))
        .unwrap();
        assert_eq!(v["subjects"][0]["name"], "sa");
        assert_eq!(v["roleRef"]["kind"], "Role");
        let e = decode(&wrap("apps/v1", "Deployment", vec![])).unwrap_err();
        assert_eq!(e.code, 415);
        assert_eq!(decode(b"not protobuf").unwrap_err().code, 400);
    }
}
