//! HTTP routing: discovery, OpenAPI, the `/_sim` control endpoints, and every resource
//! path (`/api/v1/...`, `/apis/<g>/<v>/...`, namespaced or not, with `/status` and
//! `/scale`), mapped onto [`Store`] operations.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, Method, StatusCode, Uri, header};
use serde_json::{Value, json};

use crate::auth::{self, Attributes, Identity, Tokens};
use crate::discovery;
use crate::error::{ApiError, Result};
use crate::faults::{FaultRule, Faults, RequestInfo};
use crate::selector::{FieldSelector, LabelSelector};
use crate::stats::{RequestKey, WatchKey};
use crate::store::{
    DeleteOpts, Deleted, FieldValidation, PatchKind, Store, Target, WriteOpts, scale_of,
};
use crate::table;
use crate::watch::{self, WatchSpec};

/// Shared state of the HTTP handlers.
pub struct AppState {
    /// The object store.
    pub store: Arc<Store>,
    /// Fault injection.
    pub faults: Faults,
    /// `host:port` the server listens on (for `/api`'s serverAddressByClientCIDRs).
    pub addr: String,
    /// Bookmark interval of watches.
    pub bookmark_interval: Duration,
    /// Service account tokens issued by TokenRequest.
    pub tokens: Arc<Tokens>,
}

/// The router.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/version",
            get(|| async { json_response(StatusCode::OK, &discovery::version()) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(|| async { "ok" }))
        .route(
            "/openapi/v2",
            get(|| async {
                ApiError::new(404, "NotFound", "the stand-in serves OpenAPI v3 only")
                    .into_response()
            }),
        )
        .route("/openapi/v3", get(openapi_index))
        .route("/openapi/v3/{*key}", get(openapi_gv))
        .route(
            "/_sim/faults",
            get(faults_list).post(faults_add).delete(faults_clear),
        )
        .route(
            "/_sim/drop-watches",
            post(|State(s): State<Arc<AppState>>| async move {
                s.faults.drop_watches();
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/_sim/compact",
            post(|State(s): State<Arc<AppState>>| async move {
                s.faults.compact();
                StatusCode::NO_CONTENT
            }),
        )
        .route(
            "/_sim/history/{n}",
            post(
                |State(s): State<Arc<AppState>>, Path(n): Path<usize>| async move {
                    s.store.set_history(n);
                    StatusCode::NO_CONTENT
                },
            ),
        )
        // The same counters as a `stats::Snapshot` (serde), for harnesses in another
        // process that compute budgets with `Snapshot::since`.
        .route(
            "/_sim/snapshot",
            get(|State(s): State<Arc<AppState>>| async move {
                json_response(
                    StatusCode::OK,
                    &serde_json::to_value(s.store.stats().snapshot()).unwrap_or_default(),
                )
            }),
        )
        .route(
            "/_sim/stats",
            get(|State(s): State<Arc<AppState>>| async move {
                json_response(StatusCode::OK, &s.store.stats().snapshot().to_json())
            })
            .delete(|State(s): State<Arc<AppState>>| async move {
                s.store.stats().reset();
                StatusCode::NO_CONTENT
            }),
        )
        .fallback(resource)
        // Bodies are limited by the API server's own rule (3 MiB, 413), not axum's 2 MB.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn_with_state(state.clone(), account))
        .with_state(state)
}

/// Counts every API request (not the `/_sim` control endpoints) once it is answered:
/// resource requests under the key the handler resolved, others under their path.
async fn account(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    if path.starts_with("/_sim/") {
        return next.run(req).await;
    }
    let method = req.method().as_str().to_ascii_lowercase();
    let user_agent = header_str(req.headers(), header::USER_AGENT).to_string();
    let content_type = header_str(req.headers(), header::CONTENT_TYPE)
        .split(';')
        .next()
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    let manager = query_map(req.uri()).remove("fieldManager");
    let resp = next.run(req).await;
    let mut key = resp
        .extensions()
        .get::<RequestKey>()
        .cloned()
        .unwrap_or_else(|| RequestKey {
            verb: method,
            path: Some(path),
            ..Default::default()
        });
    if matches!(key.verb.as_str(), "create" | "update" | "patch") {
        key.field_manager = manager;
    }
    key.user_agent = user_agent;
    key.content_type = content_type;
    key.code = resp.status().as_u16();
    s.store.stats().record_request(key);
    resp
}

fn json_response(code: StatusCode, v: &Value) -> Response {
    // to_vec, not to_string: Display goes through fmt::Write a few bytes at a time, which
    // costs several times more on the large objects of a big pool.
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(v).unwrap_or_default(),
    )
        .into_response()
}

/// The response to a write: the bytes its event serialized when they are exactly what
/// this request serves (same apiVersion, not the scale view), else the object rendered.
fn written_response(code: StatusCode, target: &Target, w: crate::store::Written) -> Response {
    let served_as_stored = target.subresource.as_deref() != Some("scale")
        && w.object.get("apiVersion").and_then(Value::as_str)
            == Some(target.rt.api_version(&target.version).as_str());
    let resp = match w.encoded {
        Some(bytes) if served_as_stored => (
            code,
            [(header::CONTENT_TYPE, "application/json")],
            Body::from(bytes),
        )
            .into_response(),
        _ if target.subresource.as_deref() == Some("scale") => json_response(code, &w.object),
        _ => json_response(code, &render(target, Arc::unwrap_or_clone(w.object))),
    };
    with_warnings(resp, &w.warnings)
}

async fn openapi_index(State(s): State<Arc<AppState>>) -> Response {
    json_response(
        StatusCode::OK,
        &discovery::openapi_index(&s.store.registry()),
    )
}

async fn openapi_gv(State(s): State<Arc<AppState>>, Path(key): Path<String>) -> Response {
    let doc = discovery::parse_openapi_key(&key)
        .and_then(|(g, v)| discovery::openapi_gv(&s.store.registry(), &g, &v));
    match doc {
        Some(d) => json_response(StatusCode::OK, &d),
        None => {
            ApiError::new(404, "NotFound", format!("no OpenAPI document for {key}")).into_response()
        }
    }
}

async fn faults_list(State(s): State<Arc<AppState>>) -> Response {
    json_response(StatusCode::OK, &json!(s.faults.rules()))
}

async fn faults_add(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    match serde_json::from_slice::<FaultRule>(&body) {
        Ok(rule) => {
            s.faults.add(rule);
            StatusCode::CREATED.into_response()
        }
        Err(e) => ApiError::bad_request(format!("invalid fault rule: {e}")).into_response(),
    }
}

async fn faults_clear(State(s): State<Arc<AppState>>) -> Response {
    s.faults.clear();
    StatusCode::NO_CONTENT.into_response()
}

/// A parsed resource request path.
struct Parsed {
    group: String,
    version: String,
    namespace: Option<String>,
    plural: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
    legacy_watch: bool,
}

fn parse_path(path: &str, store: &Store) -> Option<Parsed> {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, mut rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest.to_vec()),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest.to_vec()),
        _ => return None,
    };
    let legacy_watch = rest.first() == Some(&"watch");
    if legacy_watch {
        rest.remove(0);
    }
    let mut p = Parsed {
        group,
        version,
        namespace: None,
        plural: None,
        name: None,
        subresource: None,
        legacy_watch,
    };
    let reg = store.registry();
    let namespaced_plural = |pl: &str| {
        reg.find(&p.group, &p.version, pl)
            .is_some_and(|t| t.namespaced)
    };
    let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
    let rest = if rest.len() >= 3 && rest[0] == "namespaces" && namespaced_plural(&rest[2]) {
        p.namespace = Some(rest[1].clone());
        rest[2..].to_vec()
    } else {
        rest
    };
    p.plural = rest.first().cloned();
    p.name = rest.get(1).cloned();
    p.subresource = rest.get(2).cloned();
    if rest.len() > 3 {
        return None;
    }
    Some(p)
}

fn query_map(uri: &Uri) -> HashMap<String, String> {
    url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn truthy(q: &HashMap<String, String>, k: &str) -> bool {
    q.get(k).is_some_and(|v| v == "true" || v == "1")
}

fn header_str(h: &HeaderMap, k: header::HeaderName) -> &str {
    h.get(k).and_then(|v| v.to_str().ok()).unwrap_or("")
}

fn parse_body(body: &[u8], content_type: &str) -> Result<Value> {
    if body.is_empty() {
        return Ok(Value::Null);
    }
    if content_type.contains("yaml") {
        serde_yaml::from_slice::<Value>(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
    } else if content_type.contains(crate::protobuf::CONTENT_TYPE) {
        crate::protobuf::decode(body)
    } else if content_type.contains("protobuf") || content_type.contains("cbor") {
        Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf (got {content_type})"
            ),
        ))
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))
    }
}

fn render(t: &Target, mut obj: Value) -> Value {
    obj["apiVersion"] = json!(t.rt.api_version(&t.version));
    obj
}

fn with_warnings(mut resp: Response, warnings: &[String]) -> Response {
    for w in warnings {
        if let Ok(v) = http::HeaderValue::from_str(&format!("299 - \"{}\"", w.replace('"', "\\\"")))
        {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

async fn resource(
    State(s): State<Arc<AppState>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut key = None;
    let mut resp = match handle(&s, &method, &uri, &headers, &body, &mut key).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    if let Some(k) = key {
        resp.extensions_mut().insert(k);
    }
    resp
}

fn not_found_path(uri: &Uri) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!(
            "the server could not find the requested resource ({})",
            uri.path()
        ),
    )
}

async fn handle(
    s: &Arc<AppState>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    key: &mut Option<RequestKey>,
) -> Result<Response> {
    let path = uri.path();
    let accept = header_str(headers, header::ACCEPT);
    let who = s.tokens.authenticate(&s.store, headers)?;
    // Reviews about the caller itself (create-only, never stored).
    if method == Method::POST {
        let review = match path.trim_end_matches('/') {
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" => {
                Some(("authorization.k8s.io", "selfsubjectaccessreviews"))
            }
            "/apis/authentication.k8s.io/v1/selfsubjectreviews" => {
                Some(("authentication.k8s.io", "selfsubjectreviews"))
            }
            _ => None,
        };
        if let Some((group, resource)) = review {
            *key = Some(RequestKey {
                verb: "create".into(),
                group: group.into(),
                version: "v1".into(),
                resource: resource.into(),
                ..Default::default()
            });
            let content_type = header_str(headers, header::CONTENT_TYPE);
            return self_review(s, &who, resource, &parse_body(body, content_type)?);
        }
    }
    // Discovery.
    if method == Method::GET {
        let reg = s.store.registry();
        let aggregated = discovery::wants_aggregated(accept);
        match path.trim_end_matches('/') {
            "/api" if aggregated => {
                return Ok(aggregated_response(&discovery::aggregated(&reg, true)));
            }
            "/api" => {
                return Ok(json_response(
                    StatusCode::OK,
                    &discovery::core_versions(&s.addr),
                ));
            }
            "/apis" if aggregated => {
                return Ok(aggregated_response(&discovery::aggregated(&reg, false)));
            }
            "/apis" => return Ok(json_response(StatusCode::OK, &discovery::group_list(&reg))),
            _ => {}
        }
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        match segs.as_slice() {
            ["api", v] => {
                return discovery::resource_list(&reg, "", v)
                    .map(|l| json_response(StatusCode::OK, &l))
                    .ok_or_else(|| not_found_path(uri));
            }
            ["apis", g] => {
                return discovery::group(&reg, g)
                    .map(|l| json_response(StatusCode::OK, &l))
                    .ok_or_else(|| not_found_path(uri));
            }
            ["apis", g, v] => {
                return discovery::resource_list(&reg, g, v)
                    .map(|l| json_response(StatusCode::OK, &l))
                    .ok_or_else(|| not_found_path(uri));
            }
            _ => {}
        }
    }
    let p = parse_path(path, &s.store).ok_or_else(|| not_found_path(uri))?;
    let plural = p.plural.clone().ok_or_else(|| not_found_path(uri))?;
    let rt = s
        .store
        .registry()
        .find(&p.group, &p.version, &plural)
        .ok_or_else(|| not_found_path(uri))?;
    if let Some(sub) = &p.subresource {
        let ok = match sub.as_str() {
            "status" => rt.has_status(&p.version),
            "scale" => rt.version(&p.version).is_some_and(|v| v.scale.is_some()),
            "token" => rt.group.is_empty() && rt.plural == "serviceaccounts",
            _ => false,
        };
        if !ok {
            return Err(not_found_path(uri));
        }
    }
    let q = query_map(uri);
    let target = Target {
        rt: rt.clone(),
        version: p.version.clone(),
        namespace: p.namespace.clone(),
        name: p.name.clone(),
        subresource: p.subresource.clone(),
    };
    let is_watch = p.legacy_watch || truthy(&q, "watch");
    let verb = match (method.clone(), p.name.is_some()) {
        (Method::GET, true) if is_watch => "watch",
        (Method::GET, true) => "get",
        (Method::GET, false) if is_watch => "watch",
        (Method::GET, false) => "list",
        (Method::POST, false) => "create",
        (Method::POST, true) if p.subresource.as_deref() == Some("token") => "create",
        (Method::PUT, true) => "update",
        (Method::PATCH, true) => "patch",
        (Method::DELETE, true) => "delete",
        (Method::DELETE, false) => "deletecollection",
        _ => {
            return Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({method} {path})"
            )));
        }
    };
    *key = Some(RequestKey {
        verb: verb.into(),
        group: rt.group.clone(),
        version: p.version.clone(),
        resource: plural.clone(),
        subresource: p.subresource.clone(),
        ..Default::default()
    });
    let info = RequestInfo {
        verb: verb.into(),
        resource: plural.clone(),
        subresource: p.subresource.clone(),
        namespace: p.namespace.clone(),
        name: p.name.clone(),
    };
    // Authorization, before anything else is looked at. A list or watch pinned to one
    // name by its field selector is authorized for that name (as the real RequestInfo
    // does), so `resourceNames` rules admit a pod watching its own Pod.
    let pinned = match verb {
        "list" | "watch" if p.name.is_none() => {
            FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))
                .ok()
                .and_then(|f| f.pinned_name().map(str::to_string))
        }
        _ => None,
    };
    let attrs = Attributes::resource(verb, &rt.group, &plural)
        .subresource(p.subresource.as_deref())
        .namespace(p.namespace.as_deref())
        .name(p.name.as_deref().or(pinned.as_deref()));
    if !auth::allowed(&s.store, &who, &attrs) {
        return Err(auth::forbidden(&who, &attrs));
    }
    let (delay, fault) = s.faults.check(&info);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(e) = fault {
        return Err(e);
    }
    if rt.namespaced && p.namespace.is_none() && !matches!(verb, "list" | "watch") {
        return Err(not_found_path(uri));
    }
    let content_type = header_str(headers, header::CONTENT_TYPE).to_string();
    if body.len() > crate::store::MAX_REQUEST_BYTES {
        // The real server's limitedReadBody.
        return Err(ApiError::new(
            413,
            "RequestEntityTooLarge",
            format!(
                "Request entity too large: limit is {}",
                crate::store::MAX_REQUEST_BYTES
            ),
        ));
    }
    let wopts = WriteOpts {
        manager: q.get("fieldManager").cloned(),
        user_agent: header_str(headers, header::USER_AGENT).to_string(),
        dry_run: q.get("dryRun").is_some_and(|v| v == "All"),
        validation: match q.get("fieldValidation").map(String::as_str) {
            Some("Strict") => FieldValidation::Strict,
            Some("Ignore") => FieldValidation::Ignore,
            _ => FieldValidation::Warn,
        },
        force: truthy(&q, "force"),
    };
    let wants_table = table::wants_table(accept);
    let include = q
        .get("includeObject")
        .cloned()
        .unwrap_or_else(|| "Metadata".into());
    if p.subresource.as_deref() == Some("token") {
        let content_type = header_str(headers, header::CONTENT_TYPE);
        return token_request(s, &target, &parse_body(body, content_type)?);
    }
    let rbac_kind = rt.group == "rbac.authorization.k8s.io" && !who.is_admin();
    match verb {
        "get" => {
            let obj = s.store.get(&target)?;
            let out = if p.subresource.as_deref() == Some("scale") {
                scale_of(&rt, &p.version, &obj)?
            } else {
                render(&target, obj)
            };
            if wants_table && p.subresource.is_none() {
                let rv = out
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                return Ok(json_response(
                    StatusCode::OK,
                    &table::table(&rt, &p.version, &[out], &rv, &include, true),
                ));
            }
            Ok(json_response(StatusCode::OK, &out))
        }
        "list" => list(s, &target, &q, wants_table, &include),
        "watch" => watch(s, &target, &q, wants_table, &include, headers),
        "create" => {
            let obj = parse_body(body, &content_type)?;
            if rbac_kind {
                auth::check_escalation(&s.store, &who, &plural, p.namespace.as_deref(), &obj)?;
            }
            let w = s.store.create(&target, obj, &wopts)?;
            Ok(with_warnings(
                json_response(
                    StatusCode::CREATED,
                    &render(&target, Arc::unwrap_or_clone(w.object)),
                ),
                &w.warnings,
            ))
        }
        "update" => {
            let obj = parse_body(body, &content_type)?;
            if rbac_kind {
                auth::check_escalation(&s.store, &who, &plural, p.namespace.as_deref(), &obj)?;
            }
            let w = s.store.replace(&target, obj, &wopts)?;
            Ok(written_response(StatusCode::OK, &target, w))
        }
        "patch" => {
            let kind = match content_type.split(';').next().unwrap_or("").trim() {
                "application/json-patch+json" => PatchKind::Json,
                "application/merge-patch+json" => PatchKind::Merge,
                "application/strategic-merge-patch+json" => PatchKind::Strategic,
                "application/apply-patch+yaml" | "application/apply-patch+json" => PatchKind::Apply,
                other => {
                    return Err(ApiError::new(
                        415,
                        "UnsupportedMediaType",
                        format!(
                            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {other:?})"
                        ),
                    ));
                }
            };
            let obj = parse_body(
                body,
                if kind == PatchKind::Apply {
                    "yaml"
                } else {
                    "json"
                },
            )?;
            let existed = s.store.exists(&target);
            // A patch that creates (server-side apply) must also be allowed to create.
            if !existed && kind == PatchKind::Apply {
                let create = Attributes {
                    verb: "create".into(),
                    ..attrs.clone()
                };
                if !auth::allowed(&s.store, &who, &create) {
                    return Err(auth::forbidden(&who, &create));
                }
            }
            if rbac_kind {
                // What the patch would store, checked before it is stored.
                let trial = s.store.patch(
                    &target,
                    kind,
                    obj.clone(),
                    &WriteOpts {
                        dry_run: true,
                        ..wopts.clone()
                    },
                )?;
                auth::check_escalation(
                    &s.store,
                    &who,
                    &plural,
                    p.namespace.as_deref(),
                    &trial.object,
                )?;
            }
            let w = s.store.patch(&target, kind, obj, &wopts)?;
            let code = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok(written_response(code, &target, w))
        }
        "delete" => {
            let d = delete_opts(&q, body, &content_type)?;
            match s.store.delete(&target, &d)? {
                Deleted::Pending(obj) => Ok(json_response(StatusCode::OK, &render(&target, obj))),
                Deleted::Gone(obj) => {
                    // Most kinds answer an immediate deletion with a Success Status (finalizeDelete).
                    let uid = obj.pointer("/metadata/uid").cloned().unwrap_or_default();
                    Ok(json_response(
                        StatusCode::OK,
                        &json!({
                            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                            "details": {"name": p.name, "group": rt.group, "kind": rt.plural, "uid": uid},
                        }),
                    ))
                }
            }
        }
        "deletecollection" => {
            let d = delete_opts(&q, body, &content_type)?;
            let labels =
                LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
            let fields =
                FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))?;
            let page = s.store.select(&target, &labels, &fields, None, None);
            let rv = page.rv;
            let mut deleted = Vec::new();
            for obj in page.items {
                let name = obj
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let t = Target {
                    name,
                    ..target.clone()
                };
                match s.store.delete(&t, &d) {
                    Ok(Deleted::Gone(o)) | Ok(Deleted::Pending(o)) => {
                        deleted.push(render(&target, o))
                    }
                    Err(e) if e.code == 404 => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(json_response(
                StatusCode::OK,
                &json!({"kind": rt.list_kind, "apiVersion": rt.api_version(&p.version), "metadata": {"resourceVersion": rv.to_string()}, "items": deleted}),
            ))
        }
        _ => Err(ApiError::method_not_allowed(format!(
            "unsupported verb {verb}"
        ))),
    }
}

/// SelfSubjectAccessReview (`kubectl auth can-i`) and SelfSubjectReview
/// (`kubectl auth whoami`): answered for the caller, 201, never stored.
fn self_review(
    s: &Arc<AppState>,
    who: &Identity,
    resource: &str,
    review: &Value,
) -> Result<Response> {
    if resource == "selfsubjectreviews" {
        return Ok(json_response(
            StatusCode::CREATED,
            &json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview",
                "metadata": {"creationTimestamp": null},
                "status": {"userInfo": {"username": who.user, "uid": who.uid, "groups": who.groups}},
            }),
        ));
    }
    let spec = review.get("spec").cloned().unwrap_or_else(|| json!({}));
    let text = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .filter(|x| !x.is_empty())
            .map(str::to_string)
    };
    let attrs = if let Some(r) = spec.get("resourceAttributes") {
        Attributes {
            verb: text(r, "verb").unwrap_or_default(),
            group: text(r, "group").unwrap_or_default(),
            resource: text(r, "resource").unwrap_or_default(),
            subresource: text(r, "subresource"),
            namespace: text(r, "namespace"),
            name: text(r, "name"),
            path: None,
        }
    } else if let Some(n) = spec.get("nonResourceAttributes") {
        Attributes {
            verb: text(n, "verb").unwrap_or_default(),
            path: Some(text(n, "path").unwrap_or_default()),
            ..Default::default()
        }
    } else {
        return Err(ApiError::invalid(
            "authorization.k8s.io",
            "SelfSubjectAccessReview",
            "",
            vec![crate::error::Cause {
                reason: "FieldValueRequired".into(),
                message: "Required value: exactly one of nonResourceAttributes or resourceAttributes must be specified".into(),
                field: "spec.resourceAttributes".into(),
            }],
        ));
    };
    let allowed = auth::allowed(&s.store, who, &attrs);
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "metadata": {"creationTimestamp": null},
            "spec": spec,
            "status": {"allowed": allowed},
        }),
    ))
}

/// TokenRequest (`POST .../serviceaccounts/<name>/token`, `kubectl create token`): a
/// bound token for the service account, valid for `spec.expirationSeconds` (default one
/// hour, at least ten minutes).
fn token_request(s: &Arc<AppState>, t: &Target, req: &Value) -> Result<Response> {
    let name = t.name.clone().unwrap_or_default();
    let ns = t.namespace.clone().unwrap_or_default();
    let seconds = req
        .pointer("/spec/expirationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(3600);
    if seconds < 600 {
        return Err(ApiError::invalid(
            "authentication.k8s.io",
            "TokenRequest",
            &name,
            vec![crate::error::Cause {
                reason: "FieldValueInvalid".into(),
                message: format!(
                    "Invalid value: {seconds}: may not specify a duration less than 10 minutes"
                ),
                field: "spec.expirationSeconds".into(),
            }],
        ));
    }
    let audiences: Vec<String> = req
        .pointer("/spec/audiences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .filter(|a: &Vec<String>| !a.is_empty())
        .unwrap_or_else(|| vec!["https://kubernetes.default.svc.cluster.local".into()]);
    let (token, expires) = s.tokens.issue(&s.store, &ns, &name, &audiences, seconds)?;
    Ok(json_response(
        StatusCode::CREATED,
        &json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": crate::store::now()},
            "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": null},
            "status": {"token": token, "expirationTimestamp": expires.format("%Y-%m-%dT%H:%M:%SZ").to_string()},
        }),
    ))
}

fn aggregated_response(v: &Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, discovery::AGGREGATED_CONTENT_TYPE)],
        v.to_string(),
    )
        .into_response()
}

fn delete_opts(
    q: &HashMap<String, String>,
    body: &Bytes,
    content_type: &str,
) -> Result<DeleteOpts> {
    let b: Value = if body.is_empty() {
        Value::Null
    } else if content_type.contains(crate::protobuf::CONTENT_TYPE) {
        crate::protobuf::decode_delete_options(body)?
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding DeleteOptions: {e}")))?
    };
    let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    let orphan = b
        .get("orphanDependents")
        .and_then(Value::as_bool)
        .or_else(|| q.get("orphanDependents").map(|v| v == "true"));
    let propagation = s(b.get("propagationPolicy"))
        .or_else(|| q.get("propagationPolicy").cloned())
        .or_else(|| {
            orphan.map(|o| {
                if o {
                    "Orphan".to_string()
                } else {
                    "Background".to_string()
                }
            })
        });
    let dry_run = q.get("dryRun").is_some_and(|v| v == "All")
        || b.get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| a.iter().any(|x| x == "All"));
    Ok(DeleteOpts {
        propagation,
        uid: s(b.pointer("/preconditions/uid")),
        resource_version: s(b.pointer("/preconditions/resourceVersion")),
        dry_run,
    })
}

fn continue_token(rv: u64, last: &(String, String)) -> String {
    let raw = json!({"rv": rv, "ns": last.0, "name": last.1}).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn parse_continue(token: &str) -> Result<(String, String)> {
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let v: Value = bytes
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ApiError::bad_request("continue key is not valid: illegal base64 data"))?;
    Ok((
        v["ns"].as_str().unwrap_or("").to_string(),
        v["name"].as_str().unwrap_or("").to_string(),
    ))
}

fn list(
    s: &Arc<AppState>,
    t: &Target,
    q: &HashMap<String, String>,
    wants_table: bool,
    include: &str,
) -> Result<Response> {
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))?;
    let key = |o: &Value| {
        (
            o.pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
            o.pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        )
    };
    let start = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => Some(parse_continue(c)?),
        None => None,
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let page = s.store.select(t, &labels, &fields, start.as_ref(), limit);
    let rv = page.rv;
    let matching: Vec<Value> = page.items.into_iter().map(|o| render(t, o)).collect();
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if page.remaining > 0
        && let Some(last) = matching.last()
    {
        meta["continue"] = json!(continue_token(rv, &key(last)));
        meta["remainingItemCount"] = json!(page.remaining);
    }
    if wants_table {
        return Ok(json_response(
            StatusCode::OK,
            &table::table(&t.rt, &t.version, &matching, &rv.to_string(), include, true),
        ));
    }
    Ok(json_response(
        StatusCode::OK,
        &json!({"kind": t.rt.list_kind, "apiVersion": t.rt.api_version(&t.version), "metadata": meta, "items": matching}),
    ))
}

fn watch(
    s: &Arc<AppState>,
    t: &Target,
    q: &HashMap<String, String>,
    wants_table: bool,
    include: &str,
    headers: &HeaderMap,
) -> Result<Response> {
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))?;
    let mut fields =
        FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))?;
    if let Some(name) = &t.name {
        // GET .../name?watch=1 (and the legacy /watch/.../name form) watches one object.
        fields = FieldSelector::parse(&format!("metadata.name={name}"))?;
    }
    let from = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version: {v:?}")))?,
        ),
    };
    let send_initial = truthy(q, "sendInitialEvents");
    let spec = WatchSpec {
        rt: t.rt.clone(),
        version: t.version.clone(),
        labels,
        fields,
        bookmarks: truthy(q, "allowWatchBookmarks"),
        bookmark_interval: s.bookmark_interval,
        timeout: q
            .get("timeoutSeconds")
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs),
        initial_events_end: send_initial,
        table: wants_table.then(|| include.to_string()),
    };
    let pinned = spec.fields.pinned_name().map(str::to_string);
    let tap = s.store.stats().open_watch(WatchKey {
        resource: format!("{}/{}", t.rt.api_version(&t.version), t.rt.plural),
        namespace: t.namespace.clone(),
        label_selector: q.get("labelSelector").cloned().unwrap_or_default(),
        field_selector: match &t.name {
            Some(n) => format!("metadata.name={n}"),
            None => q.get("fieldSelector").cloned().unwrap_or_default(),
        },
        user_agent: header_str(headers, header::USER_AGENT).to_string(),
    });
    // sendInitialEvents replays the current state whatever the resourceVersion (NotOlderThan).
    let start = s.store.watch_queued(
        &Target {
            name: None,
            ..t.clone()
        },
        if send_initial { None } else { from },
        pinned.as_deref(),
        tap.queue(),
    );
    let headers = [
        (header::CONTENT_TYPE, "application/json"),
        (header::CACHE_CONTROL, "no-cache, private"),
    ];
    match start {
        Ok(ws) => {
            let body = Body::from_stream(watch::stream(spec, s.store.clone(), ws, tap));
            Ok((StatusCode::OK, headers, body).into_response())
        }
        // The real server answers a too-old watch with 200 and a single ERROR event.
        Err(e) if e.code == 410 => Ok((
            StatusCode::OK,
            headers,
            Body::from_stream(watch::error_stream(e.status(), tap)),
        )
            .into_response()),
        Err(e) => Err(e),
    }
}
