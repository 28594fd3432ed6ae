//! `GET /v1/connect`: the RFC 6455 opening handshake, with authentication and admission
//! done before the upgrade — the last moment the gateway can still answer with an HTTP
//! status instead of a WebSocket close.
//!
//! Order of checks: a `GET` on HTTP/1.1 (405/400) with each handshake header once
//! (400), is it a WebSocket handshake at all (426/400), does it speak `tether.v1`
//! exactly (400), is the pod accepting (503), is the token valid (401/403). Cheap,
//! anonymous checks come first so an overloaded pod spends no signature verification
//! on requests it will refuse anyway. The HTTP layer before it (server.rs) bounds the
//! request head's size (431) and time, and the number of handshakes in progress.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderMap, HeaderValue, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use tether_protocol::SUBPROTOCOL;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tracing::{debug, warn};

use crate::api::ApiError;
use crate::auth::AuthError;
use crate::connect_check::Decision;
use crate::metrics::label;
use crate::session::AgentSocket;
use crate::state::AppState;

/// The public port's routes: `GET /v1/connect` only. Tests drive it with `oneshot`.
pub fn public_app(state: Arc<AppState>) -> axum::Router {
    // Every method reaches `connect`, which answers 405 in the API's error shape; any
    // other path gets a JSON 404.
    axum::Router::new()
        .route("/v1/connect", axum::routing::any(connect))
        .fallback(|| async {
            let mut response =
                ApiError::NotFound("agents connect at GET /v1/connect".into()).into_response();
            // Like every refusal: one request per connection on the public port (and
            // its socket is corked until it closes, server.rs).
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            response
        })
        .with_state(state)
}

/// Why a handshake was refused before the upgrade.
fn refuse(state: &AppState, result: &'static str, error: ApiError) -> Response {
    state.metrics.handshakes.add(1, &label("result", result));
    let mut response = error.into_response();
    // One handshake per TCP connection: a refused client must not park an idle
    // keep-alive connection on the public port.
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Whether the client offered `tether.v1` — exactly: subprotocol names are
/// case-sensitive tokens (RFC 6455 §4.1), and the 101 answers with the name as offered.
fn offers_subprotocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == SUBPROTOCOL)
}

/// The bearer token from `Authorization`, or the `access_token` query parameter for
/// clients (browsers) that cannot set headers on a WebSocket.
fn bearer_token(req: &Request<Body>) -> Option<String> {
    if let Some(value) = req.headers().get(header::AUTHORIZATION) {
        let value = value.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        return scheme
            .eq_ignore_ascii_case("bearer")
            .then(|| token.trim().to_owned());
    }
    req.uri()
        .query()
        .and_then(|query| url_query_value(query, "access_token"))
}

fn url_query_value(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| percent_decode(v))
    })
}

/// Minimal percent-decoding for query values (JWTs are URL-safe, but clients may
/// still escape them).
fn percent_decode(value: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%' && i + 2 < bytes.len())
            .then(|| Some(hex(bytes[i + 1])? << 4 | hex(bytes[i + 2])?))
            .flatten();
        match decoded {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Headers that must appear at most once: a second copy would make the gateway and
/// anything in front of it disagree on which one counts.
const SINGLE_HEADERS: [header::HeaderName; 4] = [
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_VERSION,
    header::AUTHORIZATION,
    header::HOST,
];

/// Handles `GET /v1/connect`.
pub async fn connect(State(state): State<Arc<AppState>>, mut req: Request<Body>) -> Response {
    // axum routes HEAD to GET handlers; an upgrade is a GET on HTTP/1.1 only.
    if req.method() != http::Method::GET {
        let mut response = refuse(
            &state,
            "bad_method",
            ApiError::MethodNotAllowed("a WebSocket upgrade is a GET".into()),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    if req.version() != http::Version::HTTP_11 {
        return refuse(
            &state,
            "bad_version",
            ApiError::BadRequest("a WebSocket upgrade needs HTTP/1.1".into()),
        );
    }
    let headers = req.headers();
    if let Some(name) = SINGLE_HEADERS
        .iter()
        .find(|name| headers.get_all(*name).iter().nth(1).is_some())
    {
        return refuse(
            &state,
            "duplicate_header",
            ApiError::BadRequest(format!("header {name} must appear once")),
        );
    }
    if !header_has_token(headers, header::UPGRADE, "websocket")
        || !header_has_token(headers, header::CONNECTION, "upgrade")
    {
        let mut response = refuse(
            &state,
            "not_websocket",
            ApiError::UpgradeRequired("this endpoint only accepts WebSocket upgrades".into()),
        );
        response
            .headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        return response;
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut response = refuse(
            &state,
            "bad_version",
            ApiError::UpgradeRequired("Sec-WebSocket-Version must be 13".into()),
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let key = match headers.get(header::SEC_WEBSOCKET_KEY) {
        Some(key)
            if base64::engine::general_purpose::STANDARD
                .decode(key.as_bytes())
                .is_ok_and(|k| k.len() == 16) =>
        {
            key.clone()
        }
        _ => {
            return refuse(
                &state,
                "bad_key",
                ApiError::BadRequest("Sec-WebSocket-Key must be 16 base64-encoded bytes".into()),
            );
        }
    };
    if !offers_subprotocol(headers) {
        return refuse(
            &state,
            "no_subprotocol",
            ApiError::BadRequest(format!(
                "offer the `{SUBPROTOCOL}` subprotocol in Sec-WebSocket-Protocol"
            )),
        );
    }
    if state.is_draining() {
        return refuse(
            &state,
            "draining",
            ApiError::Unavailable("gateway is draining".into()),
        );
    }
    if state.is_shedding() {
        // Rebalancing: an agent this pod just shed must land on another one.
        return refuse(
            &state,
            "shedding",
            ApiError::Unavailable("gateway is rebalancing; connect again".into()),
        );
    }
    if state.is_admission_closed() {
        // A rebalancing episode: this pod is at or above the pool's mean, and the
        // agents other pods shed must land on lighter ones.
        return refuse(
            &state,
            "admission_closed",
            ApiError::Unavailable("gateway is rebalancing; connect again".into()),
        );
    }
    // A refusal for capacity counts as demand only once the token is valid: tokenless
    // or forged upgrades on a full pod must not push the pool toward `replicas.max`
    // (they get their 401/403 instead of the 503).
    let admission = state.admit();
    let verified = match bearer_token(&req) {
        Some(token) => state.verifier.verify_fetching(&token).await,
        None => Err(AuthError::Missing),
    };
    let identity = match verified {
        Ok(identity) => identity,
        Err(e) => {
            let reason = match &e {
                AuthError::Missing => "missing",
                AuthError::Invalid(_) => "invalid",
                AuthError::Forbidden(_) => "forbidden",
            };
            state.metrics.auth_failures.add(1, &label("reason", reason));
            debug!(%e, "handshake refused");
            return refuse(&state, "unauthorized", ApiError::from(e));
        }
    };
    // After the signature check: an unauthenticated caller learns nothing about which
    // agents are revoked.
    if let Some(until) = state.hub.revocations.revoked_until(
        &identity.agent_id,
        identity.jti.as_deref(),
        crate::hub::unix_now(),
    ) {
        state
            .metrics
            .auth_failures
            .add(1, &label("reason", "revoked"));
        return refuse(
            &state,
            "revoked",
            ApiError::Forbidden(format!(
                "agent or token revoked until {until} (Unix seconds)"
            )),
        );
    }
    let mut identity = identity;
    if let Some(check) = &state.connect_check {
        match check.check(&identity, state.config.tenant.as_deref()).await {
            Decision::Admit { groups } => {
                identity.groups.extend(groups);
                identity.groups.sort_unstable();
                identity.groups.dedup();
                if identity.groups.len() > crate::auth::MAX_GROUPS {
                    return refuse(
                        &state,
                        "check_refused",
                        ApiError::Forbidden(format!(
                            "the token's and the connect check's groups exceed {}",
                            crate::auth::MAX_GROUPS
                        )),
                    );
                }
            }
            Decision::Refuse { reason } => {
                return refuse(
                    &state,
                    "check_refused",
                    ApiError::Forbidden(format!("refused by the tenant's connect check: {reason}")),
                );
            }
            Decision::Unavailable => {
                return refuse(
                    &state,
                    "check_unavailable",
                    ApiError::Unavailable(
                        "the tenant's connect check did not answer; connect again later".into(),
                    ),
                );
            }
        }
    }
    // The pool-wide cap before the pod's own: an agent refused at the cap is not demand
    // (another pod would refuse it too), so it must not reach `refused_full`.
    if let Some(cap) = state.config.quotas.max_connections {
        let here = state.admitted.load(std::sync::atomic::Ordering::Acquire) as u64;
        // `admitted` already holds this handshake's slot when it got one.
        let pool = here + u64::from(admission.is_none()) + state.router.connections_elsewhere();
        if pool > cap {
            state
                .refused_capped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return refuse(
                &state,
                "tenant_cap",
                ApiError::Unavailable(format!(
                    "the pool is at its connection cap (quotas.maxConnections: {cap})"
                )),
            );
        }
    }
    let Some(admission) = admission else {
        state.refused_for_capacity();
        return refuse(
            &state,
            "full",
            ApiError::Unavailable("gateway is at its connection limit".into()),
        );
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let session_state = state.clone();
    state.tasks.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                warn!(%e, agent = %identity.agent_id, "upgrade failed after 101");
                return;
            }
        };
        // The public port serves `TcpStream`s, or TLS streams over them when the gateway
        // terminates TLS: take the socket back from hyper, with whatever it read past
        // the request (a client may pipeline its first frames).
        let (socket, read_buf) = match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (AgentSocket::Plain(parts.io.into_inner()), parts.read_buf),
            Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
                Ok(parts) => (
                    AgentSocket::Tls(Box::new(parts.io.into_inner())),
                    parts.read_buf,
                ),
                Err(_) => {
                    warn!(agent = %identity.agent_id, "upgraded connection is not a TCP or TLS socket");
                    return;
                }
            },
        };
        // A task of its own: the connection's future is then only its driver, not this
        // handshake's state too — it is what every idle connection keeps in memory.
        let tasks = session_state.tasks.clone();
        let task =
            crate::session::open(session_state, socket, read_buf, identity, admission).await;
        // What every idle connection keeps in its task cell (docs/benchmarks.md).
        debug!(future_bytes = size_of_val(&task), "connection task");
        tasks.spawn(task);
    });
    state.metrics.handshakes.add(1, &label("result", "ok"));
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .header(header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL)
        .body(Body::empty())
        .expect("static handshake response is valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_access_token_from_query() {
        assert_eq!(
            url_query_value("a=1&access_token=x.y.z", "access_token").as_deref(),
            Some("x.y.z")
        );
        assert_eq!(
            url_query_value("access_token=a%2Eb", "access_token").as_deref(),
            Some("a.b")
        );
        assert_eq!(url_query_value("token=x", "access_token"), None);
    }

    #[test]
    fn header_tokens_are_case_insensitive_lists() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(header_has_token(&headers, header::CONNECTION, "upgrade"));
        assert!(!header_has_token(&headers, header::CONNECTION, "close"));
    }
}
