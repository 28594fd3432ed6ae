//! Conformance: RBAC enforced as the real authorizer does it — service account tokens,
//! Roles and ClusterRoles through RoleBindings and ClusterRoleBindings (verbs, groups,
//! resources, subresources, resourceNames, namespaces, a name-pinned watch), server-side
//! apply that creates needing `create`, escalation prevention, impersonation, 401s.

use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use tether_kube_sim::Server;

fn code(e: kube::Error) -> (u16, String) {
    match e {
        kube::Error::Api(s) => (s.code, s.message),
        other => panic!("not an API error: {other}"),
    }
}

async fn sa(admin: &kube::Client, ns: &str, name: &str) {
    let api: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
    )
    .await
    .unwrap();
}

async fn apply(admin: &kube::Client, v: serde_json::Value) {
    let gvk: kube::core::GroupVersionKind = serde_json::from_value(json!({
        "group": v["apiVersion"].as_str().unwrap().split_once('/').map(|x| x.0).unwrap_or(""),
        "version": v["apiVersion"].as_str().unwrap().rsplit('/').next().unwrap(),
        "kind": v["kind"],
    }))
    .unwrap();
    let plural = format!("{}s", gvk.kind.to_lowercase());
    let ar = kube::core::ApiResource::from_gvk_with_plural(&gvk, &plural);
    let api: Api<kube::core::DynamicObject> =
        match v.pointer("/metadata/namespace").and_then(|n| n.as_str()) {
            Some(ns) => Api::namespaced_with(admin.clone(), ns, &ar),
            None => Api::all_with(admin.clone(), &ar),
        };
    let name = v["metadata"]["name"].as_str().unwrap().to_string();
    api.patch(&name, &PatchParams::apply("test"), &Patch::Apply(v))
        .await
        .unwrap();
}

#[tokio::test]
async fn roles_and_bindings_are_enforced_for_service_account_tokens() {
    let sim = Server::start().await.unwrap();
    let admin = sim.client().unwrap();
    sa(&admin, "default", "app").await;
    let token = sim.token("default", "app").unwrap();
    let app = sim.client_with_token(&token).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(app.clone(), "default");
    let (c, m) = code(cms.list(&ListParams::default()).await.unwrap_err());
    assert_eq!(c, 403);
    assert_eq!(
        m,
        "configmaps is forbidden: User \"system:serviceaccount:default:app\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"default\""
    );
    // A Role in "default" lets it read and apply ConfigMaps there, and nowhere else.
    apply(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "cm", "namespace": "default"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "patch"]}]})).await;
    apply(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "cm", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm"},
        "subjects": [{"kind": "ServiceAccount", "name": "app", "namespace": "default"}]})).await;
    cms.list(&ListParams::default()).await.unwrap();
    // Server-side apply that would create also needs `create`.
    let cfg = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": "v"}});
    let (c, m) = code(
        cms.patch("c", &PatchParams::apply("app"), &Patch::Apply(&cfg))
            .await
            .unwrap_err(),
    );
    assert_eq!(c, 403);
    assert!(m.contains("cannot create resource \"configmaps\""), "{m}");
    Api::<ConfigMap>::namespaced(admin.clone(), "default")
        .patch("c", &PatchParams::apply("admin"), &Patch::Apply(&cfg))
        .await
        .unwrap();
    cms.patch("c", &PatchParams::apply("app"), &Patch::Apply(&cfg))
        .await
        .unwrap();
    let (c, _) = code(
        Api::<ConfigMap>::namespaced(app.clone(), "kube-system")
            .list(&ListParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(c, 403, "a Role stops at its namespace");
    let (c, _) = code(
        Api::<ConfigMap>::all(app.clone())
            .list(&ListParams::default())
            .await
            .unwrap_err(),
    );
    assert_eq!(c, 403, "and does not grant a cluster-wide list");
    // resourceNames: a pod may read its own Pod, by name or by a name-pinned watch only.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), "default");
    for name in ["me", "other"] {
        pods.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "c", "image": "i"}]}})).unwrap())
            .await
            .unwrap();
    }
    apply(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "own-pod"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "resourceNames": ["me"], "verbs": ["get", "list", "watch"]}]})).await;
    apply(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "own-pod", "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "own-pod"},
        "subjects": [{"kind": "ServiceAccount", "name": "app"}]})).await;
    let my: Api<Pod> = Api::namespaced(app.clone(), "default");
    my.get("me").await.unwrap();
    assert_eq!(code(my.get("other").await.unwrap_err()).0, 403);
    assert_eq!(
        code(my.list(&ListParams::default()).await.unwrap_err()).0,
        403
    );
    let mine = my
        .list(&ListParams::default().fields("metadata.name=me"))
        .await
        .unwrap();
    assert_eq!(mine.items.len(), 1);
    use futures::StreamExt;
    let first = watcher(
        my.clone(),
        watcher::Config::default().fields("metadata.name=me"),
    )
    .boxed()
    .next()
    .await
    .unwrap();
    assert!(first.is_ok(), "{first:?}");
    // Deleting the account invalidates its tokens (401).
    Api::<ServiceAccount>::namespaced(admin.clone(), "default")
        .delete("app", &Default::default())
        .await
        .unwrap();
    assert_eq!(code(my.get("me").await.unwrap_err()).0, 401);
}

#[tokio::test]
async fn roles_grant_only_what_their_writer_holds() {
    let sim = Server::start().await.unwrap();
    let admin = sim.client().unwrap();
    sa(&admin, "default", "op").await;
    apply(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "op"},
        "rules": [
            {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["roles", "rolebindings"], "verbs": ["get", "create", "patch"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
        ]})).await;
    apply(&admin, json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "op"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "op"},
        "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "default"}]})).await;
    let op = sim
        .client_with_token(&sim.token("default", "op").unwrap())
        .unwrap();
    let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(op, "default");
    let role = |verbs: serde_json::Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "gw"},
        "rules": [{"apiGroups": [""], "resources": ["pods"], "resourceNames": ["gw-0"], "verbs": verbs}]})
    };
    roles
        .patch(
            "gw",
            &PatchParams::apply("op"),
            &Patch::Apply(role(json!(["get", "watch"]))),
        )
        .await
        .unwrap();
    let (c, m) = code(
        roles
            .patch(
                "gw",
                &PatchParams::apply("op"),
                &Patch::Apply(role(json!(["get", "delete"]))),
            )
            .await
            .unwrap_err(),
    );
    assert_eq!(c, 403);
    assert!(
        m.contains("is attempting to grant RBAC permissions not currently held"),
        "{m}"
    );
}
