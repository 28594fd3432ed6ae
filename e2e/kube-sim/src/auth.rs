//! Authentication and RBAC authorization, as the real API server does them for the
//! callers Tether has: service accounts with bound tokens (TokenRequest, what
//! `kubectl create token` and the kubelet's projected tokens get), and the
//! administrator.
//!
//! ```text
//!  request ──► authenticate: no Authorization header ─► system:admin (system:masters)
//!                            Bearer <token we issued> ─► system:serviceaccount:<ns>:<sa>
//!                            anything else           ─► 401 Unauthorized
//!              Impersonate-User/-Group (if allowed to impersonate) ─► that identity
//!          ──► authorize: system:masters ─► allowed
//!                         discovery, health, self reviews ─► allowed (bootstrap roles)
//!                         ClusterRoleBindings, then the namespace's RoleBindings:
//!                         a rule matching verb, apiGroup, resource[/subresource],
//!                         resourceName, or nonResourceURL ─► allowed; else 403
//! ```
//!
//! RBAC objects are read from the store on every request of a non-administrator, so a
//! Role or binding takes effect with the write that makes it, as with the real
//! authorizer's informers (which lag by a moment). Creating or updating a Role or
//! ClusterRole that grants what the writer does not hold is refused (escalation
//! prevention), and so is a binding to a role whose permissions the writer does not hold
//! unless it may `bind` it.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine;
use http::HeaderMap;
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::error::{ApiError, Result, qualified};
use crate::store::Store;

/// The group whose members may do anything (the real server's superuser group).
pub const MASTERS: &str = "system:masters";

/// Who is making a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `system:admin`, or `system:serviceaccount:<ns>:<name>`.
    pub user: String,
    /// Groups (`system:authenticated` always; service accounts also
    /// `system:serviceaccounts` and `system:serviceaccounts:<ns>`).
    pub groups: Vec<String>,
    /// The service account's uid, when a service account.
    pub uid: String,
}

// === impl Identity ===

impl Identity {
    /// The administrator: what a request without credentials is (the stand-in's own
    /// kubeconfig, the local platform's administrator).
    pub fn admin() -> Identity {
        Identity {
            user: "system:admin".into(),
            groups: vec![MASTERS.into(), "system:authenticated".into()],
            uid: String::new(),
        }
    }

    /// A service account's identity.
    pub fn service_account(ns: &str, name: &str, uid: &str) -> Identity {
        Identity {
            user: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            uid: uid.into(),
        }
    }

    /// Whether this identity bypasses authorization.
    pub fn is_admin(&self) -> bool {
        self.groups.iter().any(|g| g == MASTERS)
    }
}

/// What a request asks to do (the authorizer's attributes).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attributes {
    /// get, list, watch, create, update, patch, delete, deletecollection, impersonate, bind...
    pub verb: String,
    /// API group ("" for core).
    pub group: String,
    /// Resource (plural); empty for a non-resource request.
    pub resource: String,
    /// Subresource (`status`, `scale`, `token`).
    pub subresource: Option<String>,
    /// Namespace of a namespaced request.
    pub namespace: Option<String>,
    /// Object name (for list and watch: from a `metadata.name=` field selector).
    pub name: Option<String>,
    /// Path of a non-resource request.
    pub path: Option<String>,
}

// === impl Attributes ===

impl Attributes {
    /// A resource request.
    pub fn resource(verb: &str, group: &str, resource: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            ..Default::default()
        }
    }

    /// In a namespace.
    pub fn namespace(mut self, ns: Option<&str>) -> Self {
        self.namespace = ns.map(str::to_string);
        self
    }

    /// Of a named object.
    pub fn name(mut self, name: Option<&str>) -> Self {
        self.name = name.map(str::to_string);
        self
    }

    /// Of a subresource.
    pub fn subresource(mut self, sub: Option<&str>) -> Self {
        self.subresource = sub.map(str::to_string);
        self
    }
}

/// A token the stand-in issued.
#[derive(Debug, Clone)]
struct Issued {
    namespace: String,
    name: String,
    uid: String,
    expires: chrono::DateTime<chrono::Utc>,
}

/// Issued service account tokens.
#[derive(Default)]
pub struct Tokens {
    issued: Mutex<HashMap<String, Issued>>,
}

const SA_KEY: (&str, &str) = ("", "serviceaccounts");
const RBAC: &str = "rbac.authorization.k8s.io";

fn key(group: &str, plural: &str) -> (String, String) {
    (group.to_string(), plural.to_string())
}

fn b64(v: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

// === impl Tokens ===

impl Tokens {
    /// Issues a token for an existing service account (TokenRequest): the token and its
    /// expiry. Shaped as a JWT carrying the real claims (for tools that read them); the
    /// stand-in recognises it by value, not by signature.
    pub fn issue(
        &self,
        store: &Store,
        ns: &str,
        name: &str,
        audiences: &[String],
        seconds: i64,
    ) -> Result<(String, chrono::DateTime<chrono::Utc>)> {
        let sa = store
            .peek(&key(SA_KEY.0, SA_KEY.1), ns, name)
            .ok_or_else(|| ApiError::not_found("", "serviceaccounts", name))?;
        let uid = sa
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let now = chrono::Utc::now();
        let expires = now + chrono::Duration::seconds(seconds);
        let claims = json!({
            "aud": audiences, "exp": expires.timestamp(), "iat": now.timestamp(),
            "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": format!("system:serviceaccount:{ns}:{name}"),
            "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": name, "uid": uid}},
        });
        let token = format!(
            "{}.{}.{}",
            b64(br#"{"alg":"RS256","kid":"kube-sim"}"#),
            b64(claims.to_string().as_bytes()),
            b64(uuid::Uuid::new_v4().as_bytes()),
        );
        self.issued.lock().insert(
            token.clone(),
            Issued {
                namespace: ns.into(),
                name: name.into(),
                uid,
                expires,
            },
        );
        Ok((token, expires))
    }

    /// The identity of a request: the administrator without credentials, the service
    /// account of a token this server issued (unexpired, its account still the same
    /// object), else 401; then impersonation, if the headers ask for it and the caller
    /// may impersonate.
    pub fn authenticate(&self, store: &Store, headers: &HeaderMap) -> Result<Identity> {
        let unauthorized = || ApiError::new(401, "Unauthorized", "Unauthorized");
        let who = match headers.get(http::header::AUTHORIZATION) {
            None => Identity::admin(),
            Some(v) => {
                let token = v
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim)
                    .ok_or_else(unauthorized)?;
                let issued = self
                    .issued
                    .lock()
                    .get(token)
                    .cloned()
                    .ok_or_else(unauthorized)?;
                let live = store
                    .peek(&key(SA_KEY.0, SA_KEY.1), &issued.namespace, &issued.name)
                    .and_then(|sa| {
                        sa.pointer("/metadata/uid")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    });
                if issued.expires < chrono::Utc::now() || live.as_deref() != Some(&issued.uid) {
                    return Err(unauthorized());
                }
                Identity::service_account(&issued.namespace, &issued.name, &issued.uid)
            }
        };
        impersonate(store, who, headers)
    }
}

/// `Impersonate-User` / `Impersonate-Group`: the caller must be allowed to `impersonate`
/// the user (or service account) and each group.
fn impersonate(store: &Store, who: Identity, headers: &HeaderMap) -> Result<Identity> {
    let Some(user) = headers
        .get("impersonate-user")
        .and_then(|v| v.to_str().ok())
    else {
        return Ok(who);
    };
    let groups: Vec<String> = headers
        .get_all("impersonate-group")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    let sa = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'));
    let target = match sa {
        Some((ns, name)) => Attributes::resource("impersonate", "", "serviceaccounts")
            .namespace(Some(ns))
            .name(Some(name)),
        None => Attributes::resource("impersonate", "", "users").name(Some(user)),
    };
    if !allowed(store, &who, &target) {
        return Err(forbidden(&who, &target));
    }
    for g in &groups {
        let a = Attributes::resource("impersonate", "", "groups").name(Some(g));
        if !allowed(store, &who, &a) {
            return Err(forbidden(&who, &a));
        }
    }
    let mut id = match sa {
        // A service account impersonated without groups gets its own groups.
        Some((ns, name)) if groups.is_empty() => Identity::service_account(ns, name, ""),
        _ => Identity {
            user: user.to_string(),
            groups: groups.clone(),
            uid: String::new(),
        },
    };
    if !id.groups.iter().any(|g| g == "system:authenticated") {
        id.groups.push("system:authenticated".into());
    }
    Ok(id)
}

fn strs(v: Option<&Value>) -> Vec<&str> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Whether one PolicyRule allows the attributes (the real `RuleAllows`).
pub fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    let verbs = strs(rule.get("verbs"));
    if !verbs.iter().any(|v| *v == "*" || *v == a.verb) {
        return false;
    }
    if let Some(path) = &a.path {
        return strs(rule.get("nonResourceURLs")).iter().any(|u| {
            *u == "*"
                || *u == path
                || u.strip_suffix('*')
                    .is_some_and(|prefix| path.starts_with(prefix))
        });
    }
    if !strs(rule.get("apiGroups"))
        .iter()
        .any(|g| *g == "*" || *g == a.group)
    {
        return false;
    }
    let combined = match &a.subresource {
        Some(s) => format!("{}/{s}", a.resource),
        None => a.resource.clone(),
    };
    let resource_ok = strs(rule.get("resources")).iter().any(|r| {
        *r == "*"
            || *r == combined
            || a.subresource
                .as_deref()
                .is_some_and(|s| r.strip_prefix("*/") == Some(s))
    });
    if !resource_ok {
        return false;
    }
    let names = strs(rule.get("resourceNames"));
    names.is_empty() || a.name.as_deref().is_some_and(|n| names.contains(&n))
}

/// What every authenticated user may do (the bootstrap ClusterRoles `system:discovery`,
/// `system:public-info-viewer` and `system:basic-user`).
fn bootstrap_allows(a: &Attributes) -> bool {
    if let Some(path) = &a.path {
        let public = [
            "/api", "/apis", "/version", "/healthz", "/livez", "/readyz", "/openapi",
        ];
        return a.verb == "get"
            && (public.contains(&path.as_str())
                || [
                    "/api/",
                    "/apis/",
                    "/openapi/",
                    "/healthz/",
                    "/livez/",
                    "/readyz/",
                ]
                .iter()
                .any(|p| path.starts_with(p)));
    }
    a.verb == "create"
        && matches!(
            (a.group.as_str(), a.resource.as_str()),
            (
                "authorization.k8s.io",
                "selfsubjectaccessreviews" | "selfsubjectrulesreviews"
            ) | ("authentication.k8s.io", "selfsubjectreviews")
        )
}

fn subject_matches(subject: &Value, binding_ns: &str, who: &Identity) -> bool {
    let s = |k: &str| subject.get(k).and_then(Value::as_str).unwrap_or("");
    match s("kind") {
        "User" => who.user == s("name"),
        "Group" => who.groups.iter().any(|g| g == s("name")),
        "ServiceAccount" => {
            let ns = if s("namespace").is_empty() {
                binding_ns
            } else {
                s("namespace")
            };
            who.user == format!("system:serviceaccount:{ns}:{}", s("name"))
        }
        _ => false,
    }
}

/// The rules of every role bound to `who` that apply to a request in `ns` (cluster-wide
/// bindings, and the namespace's when `ns` is set).
pub fn rules_for(store: &Store, who: &Identity, ns: Option<&str>) -> Vec<Value> {
    let mut rules = Vec::new();
    let mut add = |role: Option<Arc<Value>>| {
        if let Some(r) = role
            && let Some(list) = r.get("rules").and_then(Value::as_array)
        {
            rules.extend(list.iter().cloned());
        }
    };
    let bound = |b: &Value, ns: &str| {
        b.get("subjects")
            .and_then(Value::as_array)
            .is_some_and(|subs| subs.iter().any(|s| subject_matches(s, ns, who)))
    };
    let role_name = |b: &Value, k: &str| {
        b.pointer(&format!("/roleRef/{k}"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    for b in store.peek_namespace(&key(RBAC, "clusterrolebindings"), "") {
        if bound(&b, "") && role_name(&b, "kind") == "ClusterRole" {
            add(store.peek(&key(RBAC, "clusterroles"), "", &role_name(&b, "name")));
        }
    }
    if let Some(ns) = ns {
        for b in store.peek_namespace(&key(RBAC, "rolebindings"), ns) {
            if !bound(&b, ns) {
                continue;
            }
            let name = role_name(&b, "name");
            match role_name(&b, "kind").as_str() {
                "Role" => add(store.peek(&key(RBAC, "roles"), ns, &name)),
                "ClusterRole" => add(store.peek(&key(RBAC, "clusterroles"), "", &name)),
                _ => {}
            }
        }
    }
    rules
}

/// Whether `who` may do `a`.
pub fn allowed(store: &Store, who: &Identity, a: &Attributes) -> bool {
    if who.is_admin() || bootstrap_allows(a) {
        return true;
    }
    rules_for(store, who, a.namespace.as_deref())
        .iter()
        .any(|r| rule_allows(r, a))
}

/// The real server's 403 (`responsewriters.Forbidden`): `<resource>.<group> "<name>" is
/// forbidden: User "<user>" cannot <verb> resource "<resource>[/<sub>]" in API group
/// "<group>" in the namespace "<ns>"` (or `at the cluster scope`, or `cannot <verb> path`).
pub fn forbidden(who: &Identity, a: &Attributes) -> ApiError {
    let why = match &a.path {
        Some(path) => format!("User {:?} cannot {} path {path:?}", who.user, a.verb),
        None => {
            let resource = match &a.subresource {
                Some(s) => format!("{}/{s}", a.resource),
                None => a.resource.clone(),
            };
            match &a.namespace {
                Some(ns) => format!(
                    "User {:?} cannot {} resource {resource:?} in API group {:?} in the namespace {ns:?}",
                    who.user, a.verb, a.group
                ),
                None => format!(
                    "User {:?} cannot {} resource {resource:?} in API group {:?} at the cluster scope",
                    who.user, a.verb, a.group
                ),
            }
        }
    };
    let message = match (&a.path, a.name.as_deref().filter(|n| !n.is_empty())) {
        (Some(_), _) => format!("forbidden: {why}"),
        (None, Some(n)) => format!(
            "{} {n:?} is forbidden: {why}",
            qualified(&a.group, &a.resource)
        ),
        (None, None) => format!("{} is forbidden: {why}", qualified(&a.group, &a.resource)),
    };
    let mut e = ApiError::new(403, "Forbidden", message);
    if a.path.is_none() {
        e = e.details(&a.group, &a.resource, a.name.as_deref().unwrap_or(""));
    }
    e
}

/// Escalation prevention: a Role or ClusterRole may grant only what its writer holds (in
/// the role's namespace, or cluster-wide), unless the writer may `escalate` it; a
/// binding may name only a role whose permissions its writer holds, unless it may
/// `bind` that role. `obj` is the object being written.
pub fn check_escalation(
    store: &Store,
    who: &Identity,
    plural: &str,
    ns: Option<&str>,
    obj: &Value,
) -> Result<()> {
    if who.is_admin() {
        return Ok(());
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("");
    let (rules, verb_bypass, bypass_target) = match plural {
        "roles" | "clusterroles" => (
            obj.get("rules")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            "escalate",
            (plural.to_string(), name.to_string()),
        ),
        "rolebindings" | "clusterrolebindings" => {
            let kind = obj
                .pointer("/roleRef/kind")
                .and_then(Value::as_str)
                .unwrap_or("");
            let role = obj
                .pointer("/roleRef/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let referenced = match kind {
                "Role" => store.peek(&key(RBAC, "roles"), ns.unwrap_or(""), &role),
                _ => store.peek(&key(RBAC, "clusterroles"), "", &role),
            };
            let plural_of = if kind == "Role" {
                "roles"
            } else {
                "clusterroles"
            };
            (
                referenced
                    .and_then(|r| r.get("rules").and_then(Value::as_array).cloned())
                    .unwrap_or_default(),
                "bind",
                (plural_of.to_string(), role),
            )
        }
        _ => return Ok(()),
    };
    let bypass = Attributes::resource(verb_bypass, RBAC, &bypass_target.0)
        .namespace(ns)
        .name(Some(&bypass_target.1));
    if allowed(store, who, &bypass) {
        return Ok(());
    }
    let held = rules_for(store, who, ns);
    let mut missing = Vec::new();
    for rule in &rules {
        if !covered(&held, rule, ns) {
            missing.push(rule.to_string());
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let what = if verb_bypass == "escalate" {
        "is attempting to grant RBAC permissions not currently held"
    } else {
        "is attempting to bind to a role whose permissions it does not hold"
    };
    Err(ApiError::new(
        403,
        "Forbidden",
        format!(
            "{} {name:?} is forbidden: user {:?} (groups={:?}) {what}:\n{}",
            qualified(RBAC, plural),
            who.user,
            who.groups,
            missing.join("\n")
        ),
    )
    .details(RBAC, plural, name))
}

/// Whether the rules `held` cover every (verb, group, resource, name) a rule grants.
fn covered(held: &[Value], rule: &Value, ns: Option<&str>) -> bool {
    let verbs = strs(rule.get("verbs"));
    let urls = strs(rule.get("nonResourceURLs"));
    if !urls.is_empty() {
        return urls.iter().all(|u| {
            verbs.iter().all(|v| {
                let a = Attributes {
                    verb: v.to_string(),
                    path: Some(u.to_string()),
                    ..Default::default()
                };
                held.iter().any(|r| rule_allows(r, &a))
            })
        });
    }
    let names = strs(rule.get("resourceNames"));
    let names: Vec<Option<&str>> = if names.is_empty() {
        vec![None]
    } else {
        names.into_iter().map(Some).collect()
    };
    for g in strs(rule.get("apiGroups")) {
        for res in strs(rule.get("resources")) {
            let (resource, sub) = match res.split_once('/') {
                Some((r, s)) => (r, Some(s)),
                None => (res, None),
            };
            for v in &verbs {
                for n in &names {
                    let a = Attributes::resource(v, g, resource)
                        .subresource(sub)
                        .namespace(ns)
                        .name(*n);
                    // A wildcard granted must be a wildcard held.
                    if !held.iter().any(|r| rule_allows(r, &a)) {
                        return false;
                    }
                }
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(
        verb: &str,
        group: &str,
        resource: &str,
        sub: Option<&str>,
        name: Option<&str>,
    ) -> Attributes {
        Attributes::resource(verb, group, resource)
            .subresource(sub)
            .name(name)
            .namespace(Some("ns"))
    }

    #[test]
    fn rules_match_verbs_groups_resources_subresources_and_names() {
        let rule = json!({"apiGroups": ["tether.dev"], "resources": ["connectionpools/status"], "resourceNames": ["p"], "verbs": ["get", "patch"]});
        assert!(rule_allows(
            &rule,
            &attrs(
                "patch",
                "tether.dev",
                "connectionpools",
                Some("status"),
                Some("p")
            )
        ));
        assert!(
            !rule_allows(
                &rule,
                &attrs(
                    "patch",
                    "tether.dev",
                    "connectionpools",
                    Some("status"),
                    Some("q")
                )
            ),
            "another pool"
        );
        assert!(
            !rule_allows(
                &rule,
                &attrs("patch", "tether.dev", "connectionpools", None, Some("p"))
            ),
            "the main resource"
        );
        assert!(!rule_allows(
            &rule,
            &attrs(
                "delete",
                "tether.dev",
                "connectionpools",
                Some("status"),
                Some("p")
            )
        ));
        assert!(
            !rule_allows(
                &rule,
                &attrs(
                    "list",
                    "tether.dev",
                    "connectionpools",
                    Some("status"),
                    None
                )
            ),
            "names need a name"
        );
        let wild = json!({"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]});
        assert!(rule_allows(
            &wild,
            &attrs("update", "apps", "statefulsets", Some("status"), None)
        ));
        assert!(!rule_allows(
            &wild,
            &attrs("update", "apps", "statefulsets", None, None)
        ));
        let all = json!({"apiGroups": [""], "resources": ["*"], "verbs": ["get"]});
        assert!(rule_allows(
            &all,
            &attrs("get", "", "pods", Some("log"), None)
        ));
        let urls = json!({"nonResourceURLs": ["/metrics", "/debug/*"], "verbs": ["get"]});
        let path = |p: &str| Attributes {
            verb: "get".into(),
            path: Some(p.into()),
            ..Default::default()
        };
        assert!(rule_allows(&urls, &path("/metrics")));
        assert!(rule_allows(&urls, &path("/debug/pprof")));
        assert!(!rule_allows(&urls, &path("/logs")));
    }

    #[test]
    fn forbidden_messages_have_the_real_shape() {
        let who = Identity::service_account("ns", "gw", "u");
        let e = forbidden(
            &who,
            &attrs(
                "patch",
                "tether.dev",
                "connectionpools",
                Some("status"),
                Some("other"),
            ),
        );
        assert_eq!(
            e.message,
            "connectionpools.tether.dev \"other\" is forbidden: User \"system:serviceaccount:ns:gw\" cannot patch resource \"connectionpools/status\" in API group \"tether.dev\" in the namespace \"ns\""
        );
        let e = forbidden(&who, &Attributes::resource("list", "", "secrets"));
        assert_eq!(
            e.message,
            "secrets is forbidden: User \"system:serviceaccount:ns:gw\" cannot list resource \"secrets\" in API group \"\" at the cluster scope"
        );
        let e = forbidden(
            &who,
            &Attributes {
                verb: "get".into(),
                path: Some("/metrics".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            e.message,
            "forbidden: User \"system:serviceaccount:ns:gw\" cannot get path \"/metrics\""
        );
    }
}
