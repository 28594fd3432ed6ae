//! The internal HTTP API: the push API for tenant backends (API-key auth), admin and
//! health endpoints. Handlers extract, call the router once, and map the outcome to a
//! status; `docs/push-api.md` lists every route.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router as HttpRouter;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::json;
use tether_config::DeliveryMode;
use tether_protocol::{ErrorBody, GatewayMessage, MAX_ID_LEN, RawValue, encode_push, valid_id};
use tracing::instrument;

use crate::auth::{AuthError, MAX_AGENT_ID_LEN, MAX_GROUP_LEN, Scope, valid_name};
use crate::hub::Outbound;
use crate::metrics::label;
use crate::revocation::{Revocation, Revoked};
use crate::router::{Push, Request as AgentRequest, RouteError};
use crate::state::AppState;

/// An API failure; the body is `{"error":{"code","message"}}`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400.
    #[error("{0}")]
    BadRequest(String),
    /// 401.
    #[error("{0}")]
    Unauthorized(String),
    /// 403.
    #[error("{0}")]
    Forbidden(String),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 405.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 408: the body did not arrive within the header deadline.
    #[error("{0}")]
    RequestTimeout(String),
    /// 409.
    #[error("{0}")]
    Conflict(String),
    /// 413.
    #[error("{0}")]
    TooLarge(String),
    /// 426.
    #[error("{0}")]
    UpgradeRequired(String),
    /// 429.
    #[error("{0}")]
    TooManyRequests(String),
    /// 429 `queue_full`: a durable push found the agent's (or the pool's) durable queue
    /// at its limit. Unlike a rate limit it does not clear in a second: it drains as the
    /// agent acknowledges, so `Retry-After` is what the gateway knows of that.
    #[error("{message}")]
    DurableQueueFull {
        /// What to do about it.
        message: String,
        /// The `Retry-After` header, in seconds.
        retry_after_seconds: u64,
    },
    /// 429 `quota_exceeded`: the API key or the tenant is over its `quotas` rate.
    #[error("{message}")]
    QuotaExceeded {
        /// Which quota, and what to do.
        message: String,
        /// The `Retry-After` header, in seconds.
        retry_after_seconds: u64,
    },
    /// 502: the agent answered with an error or went away.
    #[error("{0}")]
    BadGateway(String),
    /// 503.
    #[error("{0}")]
    Unavailable(String),
    /// 504.
    #[error("{0}")]
    Timeout(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            ApiError::UpgradeRequired(_) => (StatusCode::UPGRADE_REQUIRED, "upgrade_required"),
            ApiError::TooManyRequests(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::DurableQueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            ApiError::QuotaExceeded { .. } => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            ApiError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "agent_error"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::Timeout(_) => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let retry_after = match &self {
            ApiError::DurableQueueFull {
                retry_after_seconds,
                ..
            }
            | ApiError::QuotaExceeded {
                retry_after_seconds,
                ..
            } => Some(*retry_after_seconds),
            _ => None,
        };
        let body = Json(json!({"error": {"code": code, "message": self.to_string()}}));
        let mut response = (status, body).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            return response;
        }
        match status {
            StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

/// How long a backend should wait before retrying a push into a full durable queue
/// whose agent is connected: the queue drains at the agent's pace (a backlog of 5,000
/// drained in 0.69 s in docs/benchmarks.md), so a few seconds free room.
const DURABLE_FULL_RETRY_CONNECTED_SECS: u64 = 5;
/// ... and whose agent is not connected: nothing drains until it connects (or messages
/// expire), so a retry every minute costs little and loses nothing.
const DURABLE_FULL_RETRY_OFFLINE_SECS: u64 = 60;

impl ApiError {
    /// A durable push's refusals, told in what they mean for that push: a 429 is a full
    /// queue (nothing stored, drains only as the agent acknowledges), a 503 means
    /// "not stored; retry with the same Idempotency-Key" (a retry is stored once).
    async fn for_durable_push(self, state: &AppState, agent: &str) -> ApiError {
        match self {
            ApiError::TooManyRequests(why) => {
                let connected = matches!(state.router.presence(agent).await, Ok(Some(_)));
                let max_age = state
                    .config
                    .delivery
                    .durable
                    .as_ref()
                    .map_or(0, |d| d.max_age_seconds);
                let expiry = if max_age == 0 {
                    String::new()
                } else {
                    format!(" or as messages expire (delivery.durable.maxAgeSeconds: {max_age})")
                };
                let (pace, retry_after_seconds) = if connected {
                    (
                        format!(
                            "agent `{agent}` is connected: the queue drains as it acknowledges{expiry}"
                        ),
                        DURABLE_FULL_RETRY_CONNECTED_SECS,
                    )
                } else {
                    (
                        format!(
                            "agent `{agent}` is not connected: the queue drains only once it connects and acknowledges{expiry}"
                        ),
                        DURABLE_FULL_RETRY_OFFLINE_SECS,
                    )
                };
                ApiError::DurableQueueFull {
                    message: format!(
                        "{why}; nothing was stored. {pace}. Retry after Retry-After with the same Idempotency-Key, or raise delivery.durable.maxMessagesPerAgent"
                    ),
                    retry_after_seconds,
                }
            }
            ApiError::Unavailable(why) => ApiError::Unavailable(format!(
                "not stored ({why}); retry with the same Idempotency-Key: a retry is stored once"
            )),
            other => other,
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Missing | AuthError::Invalid(_) => ApiError::Unauthorized(e.to_string()),
            AuthError::Forbidden(_) => ApiError::Forbidden(e.to_string()),
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let message = e.to_string();
        match e {
            RouteError::NotConnected => ApiError::NotFound(message),
            RouteError::Duplicate | RouteError::KeyReused(_) | RouteError::AmbiguousId(_) => {
                ApiError::Conflict(message)
            }
            RouteError::QueueFull | RouteError::TooManyPending | RouteError::DurableFull(_) => {
                ApiError::TooManyRequests(message)
            }
            RouteError::Timeout(_) => ApiError::Timeout(message),
            RouteError::AgentGone => ApiError::BadGateway(message),
            // The detail (pod names, raw NATS errors) goes to the log, not to the caller.
            RouteError::Unavailable(detail) => {
                tracing::warn!(%detail, "push API: routing unavailable");
                ApiError::Unavailable(UNAVAILABLE.into())
            }
        }
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The internal API's routes. Every refusal, including an unknown route (404), a
/// wrong method (405) and an unknown query parameter (400), answers in the API's JSON
/// error shape.
pub fn router(state: Arc<AppState>) -> HttpRouter {
    let limit = state.config.limits.max_message_bytes;
    let authenticated = HttpRouter::new()
        .route("/v1/agents", get(list_agents))
        .route("/v1/agents/{agent}", get(presence).delete(disconnect))
        .route("/v1/agents/{agent}/messages", post(push))
        .route("/v1/agents/{agent}/requests", post(request))
        .route("/v1/groups/{group}/messages", post(send_to_group))
        .route("/v1/broadcast", post(broadcast))
        .route("/v1/messages/{id}", get(message_status))
        .route(
            "/v1/agents/{agent}/messages/{id}",
            get(agent_message_status),
        )
        .route("/v1/agents/{agent}/revoke", post(revoke_agent))
        .route("/v1/tokens/{jti}/revoke", post(revoke_token))
        .route("/v1/stats", get(stats))
        .route("/admin/drain", post(drain))
        // One byte over the limit is enough to tell "too large" from "exactly at it".
        .layer(DefaultBodyLimit::max(limit + 1))
        // Inside the key check: a caller without a key learns nothing about parameters.
        .route_layer(middleware::from_fn(refuse_unknown_params))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let open = HttpRouter::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn(refuse_unknown_params));
    open.merge(authenticated)
        .fallback(unknown_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(state)
}

async fn unknown_route(method: http::Method, uri: http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route {method} {}: the push API's routes are listed in docs/push-api.md",
        uri.path()
    ))
}

async fn wrong_method(method: http::Method, uri: http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{} does not take {method} (the Allow header lists what it takes)",
        uri.path()
    ))
}

/// The query parameters each route reads. Anything else is refused: a misspelt
/// `?timeout=5` (for `timeout_ms`) silently ignored would make the caller believe it
/// set a timeout.
fn known_params(method: &http::Method, route: &str) -> &'static [&'static str] {
    match (method, route) {
        (&http::Method::POST, "/v1/agents/{agent}/messages") => &["ack", "timeout_ms", "delivery"],
        (&http::Method::POST, "/v1/agents/{agent}/requests") => &["timeout_ms"],
        (&http::Method::GET, "/v1/agents") => &["limit", "cursor"],
        _ => &[],
    }
}

/// 400 naming every query parameter `route` does not read (and the one meant, when a
/// known name starts with it).
fn check_params(method: &http::Method, route: &str, uri: &http::Uri) -> ApiResult<()> {
    if uri.query().is_none_or(str::is_empty) {
        return Ok(());
    }
    let known = known_params(method, route);
    let pairs = Query::<Vec<(String, String)>>::try_from_uri(uri)
        .map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let mut unknown: Vec<String> = Vec::new();
    for (name, _) in &pairs.0 {
        if !known.contains(&name.as_str()) && !unknown.contains(name) {
            unknown.push(name.clone());
        }
    }
    if unknown.is_empty() {
        return Ok(());
    }
    let listed = unknown
        .iter()
        .map(|n| format!("`{}`", n.escape_debug()))
        .collect::<Vec<_>>()
        .join(", ");
    let takes = if known.is_empty() {
        format!("{method} {route} takes no query parameters")
    } else {
        format!("{method} {route} takes {}", known.join(", "))
    };
    let hint = unknown
        .iter()
        .find_map(|n| {
            known
                .iter()
                .find(|k| !n.is_empty() && k.starts_with(n.as_str()))
        })
        .map(|k| format!("; did you mean `{k}`?"))
        .unwrap_or_default();
    let noun = if unknown.len() == 1 {
        "parameter"
    } else {
        "parameters"
    };
    Err(ApiError::BadRequest(format!(
        "unknown query {noun} {listed} ({takes}){hint}"
    )))
}

async fn refuse_unknown_params(
    route: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = route.as_ref().map(MatchedPath::as_str).unwrap_or("");
    match check_params(request.method(), route, request.uri()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

/// `GET /metrics`: the Prometheus text of the process's OTel instruments (the same
/// values OTLP exports), unauthenticated like the health endpoints and the operator's
/// `/metrics`: the NetworkPolicy decides who reaches the internal port.
async fn metrics() -> Response {
    match tether_telemetry::global_prometheus() {
        Some(text) => (
            [(
                header::CONTENT_TYPE,
                tether_telemetry::PrometheusText::CONTENT_TYPE,
            )],
            text.encode(),
        )
            .into_response(),
        None => ApiError::NotFound(
            "no Prometheus view in this process (the gateway binary installs one; a \
             library user calls tether_telemetry::init with prometheus)"
                .into(),
        )
        .into_response(),
    }
}

/// The scope a route needs. Reading (presence) and writing to one agent or a group
/// are a backend's daily work; broadcast, disconnect and drain reach every agent or
/// the pod itself and need `admin`.
fn required_scope(method: &http::Method, route: &str) -> Scope {
    match (method, route) {
        (&http::Method::POST, "/v1/agents/{agent}/messages" | "/v1/groups/{group}/messages") => {
            Scope::Push
        }
        (&http::Method::POST, "/v1/agents/{agent}/requests") => Scope::Request,
        // Whoever may push may follow what became of its durable pushes.
        (&http::Method::GET, "/v1/messages/{id}" | "/v1/agents/{agent}/messages/{id}") => {
            Scope::Push
        }
        (&http::Method::GET, "/v1/agents" | "/v1/agents/{agent}" | "/v1/stats") => Scope::Presence,
        // Broadcast, disconnect, drain — and any route added without a decision here.
        _ => Scope::Admin,
    }
}

/// Whether a route's calls count against `quotas`: the calls that send to agents.
/// Reads, admin calls and revocations do not, so a key over its quota can still see
/// and stop what it started.
fn metered(method: &http::Method, route: &str) -> bool {
    method == http::Method::POST
        && matches!(
            route,
            "/v1/agents/{agent}/messages"
                | "/v1/agents/{agent}/requests"
                | "/v1/groups/{group}/messages"
                | "/v1/broadcast"
        )
}

/// Takes the call's quota tokens, or the 429 that refuses it.
fn take_quota(
    state: &AppState,
    method: &http::Method,
    route: &str,
    key: [u8; 32],
) -> ApiResult<()> {
    if !metered(method, route) {
        return Ok(());
    }
    state.quotas.take(key, Instant::now()).map_err(|refusal| {
        state
            .metrics
            .quota_refusals
            .add(1, &label("quota", refusal.quota.name()));
        let retry_after_seconds = refusal.retry_after_seconds();
        let who = match refusal.quota {
            crate::quota::Exceeded::ApiKey => "this API key",
            crate::quota::Exceeded::Tenant => "this tenant (all API keys together)",
        };
        ApiError::QuotaExceeded {
            message: format!(
                "{who} is over its rate quota (quotas.{}); retry after {retry_after_seconds} s",
                refusal.quota.name()
            ),
            retry_after_seconds,
        }
    })
}

async fn require_api_key(
    State(state): State<Arc<AppState>>,
    route: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim());
    // The key's identity for its quota: its hash, as the key file is kept.
    let key_id = presented
        .map(|key| crate::auth::key_hash(key.as_bytes()))
        .unwrap_or_default();
    match presented.map(|key| state.api_keys.verify(key)) {
        Some(Some(scopes)) => {
            let route = route.as_ref().map(MatchedPath::as_str).unwrap_or("");
            let scope = required_scope(request.method(), route);
            if scopes.allows(scope) {
                if let Err(refusal) = take_quota(&state, request.method(), route, key_id) {
                    return refusal.into_response();
                }
                match read_body(&state, request).await {
                    Ok(request) => next.run(request).await,
                    Err(e) => e.into_response(),
                }
            } else {
                state
                    .metrics
                    .auth_failures
                    .add(1, &label("reason", "api_key_scope"));
                ApiError::Forbidden(format!("this API key lacks the `{}` scope", scope.name()))
                    .into_response()
            }
        }
        Some(None) => {
            state
                .metrics
                .auth_failures
                .add(1, &label("reason", "api_key"));
            ApiError::Unauthorized("invalid API key".into()).into_response()
        }
        None => {
            state
                .metrics
                .auth_failures
                .add(1, &label("reason", "api_key_missing"));
            ApiError::Unauthorized("missing API key (Authorization: Bearer <key>)".into())
                .into_response()
        }
    }
}

/// Reads the whole body within `listen.headerTimeoutMs` (a body dripped a byte at a
/// time must not hold a connection and its buffer; the header deadline does not cover
/// the body) and at most one byte over `limits.maxMessageBytes`.
async fn read_body(state: &AppState, request: Request) -> ApiResult<Request> {
    let (parts, body) = request.into_parts();
    let limit = state.config.limits.max_message_bytes + 1;
    let deadline = Duration::from_millis(state.config.listen.header_timeout_ms);
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::RequestTimeout(
            "the request body did not arrive in time".into(),
        )),
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            Err(if too_large {
                ApiError::TooLarge(format!(
                    "body exceeds limits.maxMessageBytes ({} bytes)",
                    limit - 1
                ))
            } else {
                ApiError::BadRequest("the request body could not be read".into())
            })
        }
        Ok(Ok(bytes)) => Ok(Request::from_parts(parts, axum::body::Body::from(bytes))),
    }
}

/// The body, or 413 when it exceeds `limits.maxMessageBytes` or what the pool's bus
/// carries (NATS `max_payload` less the envelope: a push must not work to an agent on
/// this pod and fail to one on another).
fn checked_body(state: &AppState, body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    if let (Ok(body), Some(bus)) = (&body, state.router.max_body_bytes())
        && body.len() > bus
        && bus < state.config.limits.max_message_bytes
    {
        return Err(ApiError::TooLarge(format!(
            "body exceeds what the pool's NATS carries ({bus} bytes: its max_payload less \
             {} bytes of envelope); raise max_payload on the NATS server or lower \
             limits.maxMessageBytes",
            crate::nats::router::ENVELOPE_OVERHEAD
        )));
    }
    let limit = state.config.limits.max_message_bytes;
    let too_large = || {
        ApiError::TooLarge(format!(
            "body exceeds limits.maxMessageBytes ({limit} bytes)"
        ))
    };
    match body {
        Ok(body) if body.len() > limit => Err(too_large()),
        Ok(body) => Ok(body),
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(too_large()),
        Err(rejection) => Err(ApiError::BadRequest(rejection.body_text())),
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| {
            let ct = ct.split(';').next().unwrap_or("").trim();
            ct.eq_ignore_ascii_case("application/json") || ct.ends_with("+json")
        })
}

fn json_payload(body: &Bytes) -> ApiResult<Box<RawValue>> {
    let text =
        std::str::from_utf8(body).map_err(|_| ApiError::BadRequest("body is not UTF-8".into()))?;
    serde_json::from_str::<Box<RawValue>>(text)
        .map_err(|e| ApiError::BadRequest(format!("body is not valid JSON: {e}")))
}

/// The message id: the caller's `Idempotency-Key`, or a fresh time-ordered UUID.
fn message_id(headers: &HeaderMap) -> ApiResult<String> {
    match headers.get("idempotency-key") {
        Some(value) => {
            let id = value
                .to_str()
                .map_err(|_| ApiError::BadRequest("Idempotency-Key must be ASCII".into()))?;
            if !valid_id(id) {
                return Err(ApiError::BadRequest(format!(
                    "Idempotency-Key must be 1..={MAX_ID_LEN} bytes without control characters"
                )));
            }
            Ok(id.to_owned())
        }
        None => Ok(uuid::Uuid::now_v7().to_string()),
    }
}

/// Builds the frame for a push: JSON bodies become a `push` envelope, anything else a
/// binary frame.
fn push_frame(headers: &HeaderMap, body: &Bytes, id: &str, ack: bool) -> ApiResult<Outbound> {
    if is_json(headers) {
        let data = json_payload(body)?;
        Ok(Outbound::Text(encode_push(id, &data, ack).into()))
    } else if ack {
        Err(ApiError::BadRequest(
            "ack=true needs a JSON body (binary frames carry no id)".into(),
        ))
    } else {
        Ok(Outbound::Binary(body.clone()))
    }
}

fn record(state: &AppState, op: &'static str, started: Instant, result: &ApiResult<impl Sized>) {
    let outcome = match result {
        Ok(_) => "ok",
        Err(e) => e.status_and_code().1,
    };
    state.metrics.push_duration.record(
        started.elapsed().as_secs_f64(),
        &[
            opentelemetry::KeyValue::new("op", op),
            opentelemetry::KeyValue::new("outcome", outcome),
        ],
    );
}

#[derive(Debug, Deserialize)]
struct PushQuery {
    #[serde(default)]
    ack: bool,
    timeout_ms: Option<u64>,
    /// `direct` or `durable`; the pool's `delivery.mode` when absent.
    delivery: Option<DeliveryMode>,
}

impl PushQuery {
    /// The query, or 400 in the API's error shape (not axum's plain-text rejection).
    fn checked(query: Result<Query<PushQuery>, QueryRejection>) -> ApiResult<Self> {
        let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
        if query.timeout_ms == Some(0) {
            return Err(ApiError::BadRequest("timeout_ms must be at least 1".into()));
        }
        Ok(query)
    }

    /// The caller's timeout, capped at `limits.maxRequestTimeoutMs`.
    fn timeout(&self, state: &AppState) -> Duration {
        let limits = &state.config.limits;
        Duration::from_millis(
            self.timeout_ms
                .unwrap_or(limits.request_timeout_ms)
                .clamp(1, limits.max_request_timeout_ms),
        )
    }
}

/// Agent ids and group names from the path: the same rule as in tokens (length, no
/// control characters), so a name no agent can have is a clear 400, not a 404.
fn checked_agent(agent: &str) -> ApiResult<()> {
    valid_name(agent, MAX_AGENT_ID_LEN)
        .then_some(())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "agent id must be 1..={MAX_AGENT_ID_LEN} bytes without control characters"
            ))
        })
}

fn checked_group(group: &str) -> ApiResult<()> {
    valid_name(group, MAX_GROUP_LEN)
        .then_some(())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "group must be 1..={MAX_GROUP_LEN} bytes without control characters"
            ))
        })
}

#[instrument(skip_all, fields(agent = %agent))]
async fn push(
    State(state): State<Arc<AppState>>,
    Path(agent): Path<String>,
    query: Result<Query<PushQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let result = async {
        checked_agent(&agent)?;
        let query = PushQuery::checked(query)?;
        let body = checked_body(&state, body)?;
        let id = message_id(&headers)?;
        if query.delivery.unwrap_or(state.config.delivery.mode) == DeliveryMode::Durable {
            return match push_durable(&state, &agent, &query, &headers, &body, id).await {
                Err(e) => Err(e.for_durable_push(&state, &agent).await),
                ok => ok,
            };
        }
        let frame = push_frame(&headers, &body, &id, query.ack)?;
        let ack_timeout = query.ack.then(|| query.timeout(&state));
        state
            .router
            .push(
                &agent,
                Push {
                    id: id.clone(),
                    frame,
                    ack_timeout,
                },
            )
            .await?;
        let status = if query.ack {
            StatusCode::OK
        } else {
            StatusCode::ACCEPTED
        };
        Ok((status, Json(json!({"id": id}))).into_response())
    }
    .await;
    record(&state, "push", started, &result);
    result
}

/// A durable push: 202 once stored in the agent's durable queue, whether or not the
/// agent is connected (never 404).
async fn push_durable(
    state: &AppState,
    agent: &str,
    query: &PushQuery,
    headers: &HeaderMap,
    body: &Bytes,
    id: String,
) -> ApiResult<Response> {
    if query.ack {
        return Err(ApiError::BadRequest(
            "ack=true does not combine with delivery=durable: a durable push is stored \
             first and acknowledged by the agent whenever it is connected"
                .into(),
        ));
    }
    if !state.router.durable() {
        return Err(ApiError::BadRequest(
            "durable delivery is not configured for this pool (delivery.durable)".into(),
        ));
    }
    if !is_json(headers) {
        return Err(ApiError::BadRequest(
            "delivery=durable needs a JSON body (binary frames carry no id to acknowledge)".into(),
        ));
    }
    let data = json_payload(body)?;
    let frame = encode_push(&id, &data, true);
    let receipt = state
        .router
        .push_durable(agent, &id, Bytes::from(frame))
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": id,
            "delivery": "durable",
            "sequence": receipt.sequence,
            "duplicate": receipt.duplicate,
        })),
    )
        .into_response())
}

#[instrument(skip_all, fields(agent = %agent))]
async fn request(
    State(state): State<Arc<AppState>>,
    Path(agent): Path<String>,
    query: Result<Query<PushQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let result = async {
        checked_agent(&agent)?;
        let query = PushQuery::checked(query)?;
        let body = checked_body(&state, body)?;
        let data = json_payload(&body)?;
        let id = message_id(&headers)?;
        let timeout = query.timeout(&state);
        let frame = GatewayMessage::Request {
            id: id.clone(),
            data,
            timeout_ms: timeout.as_millis() as u64,
        };
        let reply = state
            .router
            .request(
                &agent,
                AgentRequest {
                    id,
                    frame: Outbound::Text(frame.encode().into()),
                    timeout,
                },
            )
            .await?;
        match reply {
            Ok(data) => Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                data.get().to_owned(),
            )
                .into_response()),
            Err(ErrorBody { code, message }) => Err(ApiError::BadGateway(format!(
                "agent answered with an error ({}): {message}",
                serde_json::to_value(code)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            ))),
        }
    }
    .await;
    record(&state, "request", started, &result);
    result
}

/// Which audience a fan-out goes to.
enum Audience<'a> {
    Group(&'a str),
    Everyone,
}

/// Group send and broadcast: the frame is encoded once and shared by every recipient.
async fn fan_out(
    state: &AppState,
    audience: Audience<'_>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let started = Instant::now();
    let op = match audience {
        Audience::Group(_) => "group",
        Audience::Everyone => "broadcast",
    };
    let result = async {
        if let Audience::Group(group) = audience {
            checked_group(group)?;
        }
        let body = checked_body(state, body)?;
        let id = message_id(headers)?;
        let frame = push_frame(headers, &body, &id, false)?;
        let delivered = match audience {
            Audience::Group(group) => state.router.send_to_group(group, frame).await?,
            Audience::Everyone => state.router.broadcast(frame).await?,
        };
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "delivered": delivered})),
        )
            .into_response())
    }
    .await;
    record(state, op, started, &result);
    result
}

#[instrument(skip_all, fields(group = %group))]
async fn send_to_group(
    State(state): State<Arc<AppState>>,
    Path(group): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    fan_out(&state, Audience::Group(&group), &headers, body).await
}

#[instrument(skip_all)]
async fn broadcast(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    fan_out(&state, Audience::Everyone, &headers, body).await
}

/// Where a durable push is: pending, delivered, acknowledged or expired. The id alone
/// must name one agent's message (an Idempotency-Key used for several agents: 409,
/// ask [`agent_message_status`]).
async fn message_status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    durable_status(&state, None, &id).await
}

/// Where agent `agent`'s durable push `id` is (idempotency keys are per agent).
async fn agent_message_status(
    State(state): State<Arc<AppState>>,
    Path((agent, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    checked_agent(&agent)?;
    durable_status(&state, Some(&agent), &id).await
}

async fn durable_status(state: &AppState, agent: Option<&str>, id: &str) -> ApiResult<Response> {
    if !valid_id(id) {
        return Err(ApiError::BadRequest(format!(
            "message id must be 1..={MAX_ID_LEN} bytes without control characters"
        )));
    }
    if !state.router.durable() {
        return Err(ApiError::BadRequest(
            "durable delivery is not configured for this pool (delivery.durable)".into(),
        ));
    }
    match state.router.durable_status(agent, id).await? {
        Some(status) => Ok(Json(status).into_response()),
        None => Err(ApiError::NotFound(format!(
            "no durable message with id `{id}`"
        ))),
    }
}

async fn presence(
    State(state): State<Arc<AppState>>,
    Path(agent): Path<String>,
) -> ApiResult<Response> {
    checked_agent(&agent)?;
    match state.router.presence(&agent).await? {
        Some(presence) => Ok(Json(presence).into_response()),
        None => Err(RouteError::NotConnected.into()),
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Largest page of the agent listing.
const MAX_PAGE: usize = 1000;

async fn list_agents(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1..={MAX_PAGE}"
        )));
    }
    let page = state.router.list(query.cursor.as_deref(), limit).await?;
    Ok(Json(page).into_response())
}

async fn disconnect(
    State(state): State<Arc<AppState>>,
    Path(agent): Path<String>,
) -> ApiResult<StatusCode> {
    checked_agent(&agent)?;
    state.router.disconnect(&agent).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The optional body of a revocation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    /// Unix seconds until which the revocation holds; default now +
    /// `auth.revocationDefaultSeconds`.
    #[serde(default)]
    until: Option<u64>,
}

/// The revocation a `POST …/revoke` asks for: `until` from the body (it must lie in the
/// future), else now + `auth.revocationDefaultSeconds`.
fn revocation(state: &AppState, revoked: Revoked, body: &Bytes) -> ApiResult<Revocation> {
    let body: RevokeBody = if body.iter().all(u8::is_ascii_whitespace) {
        RevokeBody::default()
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::BadRequest(format!(
                "the body is optional; if present it is {{\"until\": <Unix seconds>}}: {e}"
            ))
        })?
    };
    let now = crate::hub::unix_now();
    let until = match body.until {
        Some(until) if until <= now => {
            return Err(ApiError::BadRequest(format!(
                "until ({until}) is not in the future (now is {now})"
            )));
        }
        Some(until) => until,
        None => now.saturating_add(state.config.auth.revocation_default_seconds),
    };
    Ok(Revocation { revoked, until })
}

async fn revoke(state: &AppState, revocation: Revocation) -> ApiResult<Response> {
    state.router.revoke(&revocation).await?;
    let (kind, name) = match &revocation.revoked {
        Revoked::Agent(agent) => ("agent", agent),
        Revoked::Token(jti) => ("jti", jti),
    };
    Ok(Json(json!({ kind: name, "until": revocation.until })).into_response())
}

/// `POST /v1/agents/{agent}/revoke`: closes the agent's connection anywhere in the pool
/// with 4008 and refuses its handshakes (403) until `until`.
async fn revoke_agent(
    State(state): State<Arc<AppState>>,
    Path(agent): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    checked_agent(&agent)?;
    let revocation = revocation(&state, Revoked::Agent(agent), &body)?;
    revoke(&state, revocation).await
}

/// `POST /v1/tokens/{jti}/revoke`: the same for the one token with this `jti`.
async fn revoke_token(
    State(state): State<Arc<AppState>>,
    Path(jti): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    if !valid_name(&jti, MAX_AGENT_ID_LEN) {
        return Err(ApiError::BadRequest(format!(
            "a jti is 1..={MAX_AGENT_ID_LEN} bytes without control characters"
        )));
    }
    let revocation = revocation(&state, Revoked::Token(jti), &body)?;
    revoke(&state, revocation).await
}

async fn stats(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(json!({
        "pod": state.pod,
        "connections": state.hub.len(),
        "admitted": state.admitted.load(Ordering::Acquire),
        "max_connections": state.config.limits.max_connections,
        "refused_tenant_cap": state.refused_capped.load(Ordering::Relaxed),
        "draining": state.is_draining(),
        "ready": state.admits_newcomers(),
        "bus_connected": state.router.bus_connected(),
        "admission_closed": state.is_admission_closed(),
    }))
}

async fn drain(State(state): State<Arc<AppState>>) -> (StatusCode, Json<serde_json::Value>) {
    state.request_drain();
    (
        StatusCode::ACCEPTED,
        Json(json!({"draining": true, "connections": state.hub.len()})),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if state.is_shedding() {
        (StatusCode::SERVICE_UNAVAILABLE, "rebalancing")
    } else if state.is_admission_closed() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "rebalancing: admission closed",
        )
    } else {
        // Not the bus: a pod serves its own agents without it, and readiness tied to
        // NATS would take every pod out of the Service at once when NATS goes away.
        // Pushes that need the bus answer 503 meanwhile (`UNAVAILABLE`).
        (StatusCode::OK, "ready")
    }
}

/// The body of every 503 the router causes: fixed, so it names no pod and carries no
/// NATS error (those are logged).
pub const UNAVAILABLE: &str = "routing is unavailable right now (the message bus or the \
     agent's pod did not answer); nothing was delivered or stored: retry, with the same \
     Idempotency-Key";

/// The probe listener's routes (`listen.probes`): health and readiness only.
pub fn probes(state: Arc<AppState>) -> HttpRouter {
    HttpRouter::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}
