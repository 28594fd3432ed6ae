//! Shared fixtures of the conformance suite: a ConnectionPool-like CRD, helpers to wait.

#![allow(dead_code)]

use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, PostParams};
use serde_json::{Value, json};
use tether_kube_sim::Server;

/// The test CRD: group `tether.dev`, kind `ConnectionPool`, status + scale subresources,
/// `status.pods` a list-map keyed by name, a CEL rule, defaults, printer columns.
pub fn crd() -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "connectionpools.tether.dev"},
        "spec": {
            "group": "tether.dev",
            "scope": "Namespaced",
            "names": {"plural": "connectionpools", "singular": "connectionpool", "kind": "ConnectionPool", "shortNames": ["cpool"]},
            "versions": [{
                "name": "v1alpha1", "served": true, "storage": true,
                "subresources": {"status": {}, "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"}},
                "additionalPrinterColumns": [
                    {"name": "Tenant", "type": "string", "jsonPath": ".spec.tenant"},
                    {"name": "Connections", "type": "integer", "jsonPath": ".status.totalConnections"}
                ],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "A pool of gateway pods for one tenant.",
                    "properties": {
                        "spec": {
                            "type": "object",
                            "description": "Desired state.",
                            "required": ["tenant"],
                            "x-kubernetes-validations": [{"rule": "self.minReplicas <= self.maxReplicas", "message": "minReplicas must not exceed maxReplicas"}],
                            "properties": {
                                "tenant": {"type": "string", "description": "Tenant id.", "maxLength": 63, "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                "replicas": {"type": "integer", "minimum": 0, "default": 1},
                                "minReplicas": {"type": "integer", "minimum": 0, "default": 1},
                                "maxReplicas": {"type": "integer", "maximum": 100, "default": 10},
                                "mode": {"type": "string", "enum": ["shared", "dedicated"]},
                                "tags": {"type": "array", "maxItems": 3, "items": {"type": "string"}}
                            }
                        },
                        "status": {
                            "type": "object",
                            "properties": {
                                "replicas": {"type": "integer"},
                                "totalConnections": {"type": "integer"},
                                "observedGeneration": {"type": "integer"},
                                "pods": {
                                    "type": "array",
                                    "x-kubernetes-list-type": "map",
                                    "x-kubernetes-list-map-keys": ["name"],
                                    "items": {"type": "object", "required": ["name"], "properties": {
                                        "name": {"type": "string"},
                                        "connections": {"type": "integer"},
                                        "ready": {"type": "boolean"}
                                    }}
                                },
                                "conditions": {
                                    "type": "array",
                                    "x-kubernetes-list-type": "map",
                                    "x-kubernetes-list-map-keys": ["type"],
                                    "items": {"type": "object", "properties": {"type": {"type": "string"}, "status": {"type": "string"}}}
                                }
                            }
                        }
                    }
                }}
            }]
        }
    })
}

/// The ConnectionPool ApiResource.
pub fn pool_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("tether.dev", "v1alpha1", "ConnectionPool"),
        "connectionpools",
    )
}

/// Starts a server with the CRD applied.
pub async fn sim_with_crd() -> (Server, kube::Client) {
    let sim = Server::start().await.expect("start");
    let client = sim.client().expect("client");
    install_crd(&client).await;
    (sim, client)
}

/// Creates the CRD.
pub async fn install_crd(client: &kube::Client) {
    let crds: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition"),
            "customresourcedefinitions",
        ),
    );
    let obj: DynamicObject = serde_json::from_value(crd()).unwrap();
    crds.create(&PostParams::default(), &obj)
        .await
        .expect("create crd");
}

/// The ConnectionPool API in a namespace.
pub fn pools(client: &kube::Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &pool_resource())
}

/// A ConnectionPool object.
pub fn pool(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "tether.dev/v1alpha1", "kind": "ConnectionPool",
        "metadata": {"name": name}, "spec": spec,
    }))
    .unwrap()
}

// Each test binary uses a part of this module.
#[allow(unused_imports)]
pub use tether_test_support::{PATIENCE, eventually};

/// The `kube::Error::Api` status of a failed call.
pub fn status_of<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}
