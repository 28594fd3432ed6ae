//! Property tests: the envelope decoder and the upgrade request parser never panic and
//! always answer with a documented error.

use std::sync::Arc;

use axum::body::Body;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use tether_protocol::{AgentMessage, GatewayMessage};
use tokio::io::AsyncWriteExt;
use tower::ServiceExt;

use crate::common::*;
use crate::harness::*;

/// Strings that look like envelopes more often than random text would.
fn envelope_like() -> impl Strategy<Value = String> {
    let kind = prop_oneof![
        Just("send".to_string()),
        Just("request".to_string()),
        Just("response".to_string()),
        Just("ack".to_string()),
        Just("refresh".to_string()),
        Just("push".to_string()),
        "[a-z]{0,8}"
    ];
    let id = prop_oneof![
        Just(serde_json::json!("m-1")),
        Just(serde_json::json!("")),
        Just(serde_json::json!("x".repeat(200))),
        Just(serde_json::json!("a\u{0}b")),
        Just(serde_json::json!(42)),
        Just(serde_json::Value::Null),
        any::<String>().prop_map(serde_json::Value::String),
    ];
    let value = prop_oneof![
        Just(serde_json::json!({"k": [1, 2, {"n": null}]})),
        Just(serde_json::json!("text")),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        Just(serde_json::json!({"code": "timeout", "message": "m"})),
        Just(serde_json::json!({"code": 7})),
    ];
    (
        kind,
        id,
        proptest::option::of(value.clone()),
        proptest::option::of(value),
        proptest::option::of(any::<i64>()),
    )
        .prop_map(|(kind, id, data, error, timeout)| {
            let mut object = serde_json::json!({"type": kind, "id": id});
            if let Some(data) = data {
                object["data"] = data;
            }
            if let Some(error) = error {
                object["error"] = error;
            }
            if let Some(timeout) = timeout {
                object["timeout_ms"] = serde_json::json!(timeout);
            }
            object.to_string()
        })
}

proptest! {
    #![proptest_config(Config { cases: 2000, ..Config::default() })]

    /// Any text: the decoder answers `Ok` or a `ProtocolError` (what the gateway
    /// puts in its `bad_request` error frame), never panics; what it accepts
    /// re-encodes to something it accepts again, with an id that is valid.
    #[test]
    fn the_envelope_decoder_never_panics(text in prop_oneof![any::<String>(), envelope_like()]) {
        match AgentMessage::decode(&text) {
            Ok(message) => {
                let again = AgentMessage::decode(&message.encode());
                prop_assert!(again.is_ok(), "re-encoded {:?}", message);
                let id = match &message {
                    AgentMessage::Send { id, .. }
                    | AgentMessage::Request { id, .. }
                    | AgentMessage::Response { id, .. }
                    | AgentMessage::Ack { id } => Some(id.as_str()),
                    AgentMessage::Refresh { .. } => None,
                };
                if let Some(id) = id {
                    prop_assert!(tether_protocol::valid_id(id), "accepted id {:?}", id);
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        // The agent SDK's side of the same contract.
        let _ = GatewayMessage::decode(&text);
    }
}

/// Statuses the upgrade handler documents (docs/protocol.md, docs/security.md).
const HANDSHAKE_STATUSES: [u16; 7] = [101, 400, 401, 403, 405, 426, 503];

fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("upgrade".to_string()),
        Just("connection".to_string()),
        Just("sec-websocket-key".to_string()),
        Just("sec-websocket-version".to_string()),
        Just("sec-websocket-protocol".to_string()),
        Just("authorization".to_string()),
        Just("host".to_string()),
        "[a-z][a-z0-9-]{0,12}",
    ]
}

fn header_value(valid_token: String) -> impl Strategy<Value = String> {
    prop_oneof![
        Just("websocket".to_string()),
        Just("Upgrade".to_string()),
        Just("keep-alive, Upgrade".to_string()),
        Just("dGhlIHNhbXBsZSBub25jZQ==".to_string()),
        Just("13".to_string()),
        Just("tether.v1".to_string()),
        Just("chat, tether.v1".to_string()),
        Just(format!("Bearer {valid_token}")),
        Just("Bearer a.b.c".to_string()),
        Just("Basic dXNlcjpwYXNz".to_string()),
        "[ -~]{0,300}",
    ]
}

/// Arbitrary handshakes against the public router (no socket): every answer is one of
/// the documented statuses, and every refusal carries the JSON error body.
#[test]
fn the_upgrade_parser_answers_only_documented_statuses() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let gw = runtime.block_on(TestGateway::start());
    let app = tether_gateway::upgrade::public_app(Arc::clone(gw.gateway.state()));
    let valid = token("prop", &[], 3600);
    let method = prop_oneof![Just("GET"), Just("HEAD"), Just("POST"), Just("OPTIONS")];
    let version = prop_oneof![
        Just(http::Version::HTTP_11),
        Just(http::Version::HTTP_10),
        Just(http::Version::HTTP_2)
    ];
    let headers = proptest::collection::vec((header_name(), header_value(valid.clone())), 0..12);
    let query = proptest::option::of(prop_oneof![
        Just(format!("access_token={valid}")),
        "[a-zA-Z0-9=&%._-]{0,64}",
    ]);
    let mut runner = TestRunner::new(Config {
        cases: 512,
        ..Config::default()
    });
    runner
        .run(
            &(method, version, headers, query),
            |(method, version, headers, query)| {
                let uri = match &query {
                    Some(q) => format!("/v1/connect?{q}"),
                    None => "/v1/connect".to_string(),
                };
                let mut request = http::Request::builder()
                    .method(method)
                    .uri(uri)
                    .version(version);
                for (name, value) in &headers {
                    request = request.header(name.as_str(), value.as_str());
                }
                let Ok(request) = request.body(Body::empty()) else {
                    // Not a representable request (bad header bytes): nothing to send.
                    return Ok(());
                };
                let response = runtime.block_on(app.clone().oneshot(request)).unwrap();
                let status = response.status().as_u16();
                prop_assert!(HANDSHAKE_STATUSES.contains(&status), "status {status}");
                // A HEAD answer has no body, by HTTP's rules.
                if status != 101 && method != "HEAD" {
                    let body = runtime
                        .block_on(axum::body::to_bytes(response.into_body(), 64 * 1024))
                        .unwrap();
                    let error: Result<serde_json::Value, _> = serde_json::from_slice(&body);
                    prop_assert!(
                        error.is_ok_and(|e| e["error"]["code"].is_string()),
                        "status {status}: body {body:?}"
                    );
                }
                Ok(())
            },
        )
        .unwrap();
}

/// Arbitrary bytes on the public port (hyper's HTTP parser, then ours): an HTTP
/// status or a close, within the header deadline, and the gateway keeps serving.
#[tokio::test]
async fn raw_bytes_on_the_public_port_get_an_answer_or_a_close() {
    let mut arena = Arena::start_with(|c| c.listen.header_timeout_ms = 300).await;
    let valid = upgrade_request(Some(&token("raw", &[], 3600)), "");
    let inputs = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        (
            0..valid.len(),
            proptest::collection::vec(any::<u8>(), 0..64)
        )
            .prop_map({
                let valid = valid.clone();
                move |(cut, junk)| {
                    let mut bytes = valid.as_bytes()[..cut].to_vec();
                    bytes.extend(junk);
                    bytes.extend(b"\r\n\r\n");
                    bytes
                }
            }),
    ];
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    let mut cases: Vec<Vec<u8>> = Vec::new();
    for _ in 0..48 {
        cases.push(inputs.new_tree(&mut runner).unwrap().current());
    }
    for bytes in cases {
        let mut stream = tcp(arena.public(), None).await;
        if stream.write_all(&bytes).await.is_err() {
            continue;
        }
        if let Some(head) = read_head(&mut stream).await {
            let status = status_of(&head);
            assert!(
                HANDSHAKE_STATUSES.contains(&status) || [404, 408, 431, 501, 505].contains(&status),
                "status {status} for {bytes:?}"
            );
        }
    }
    arena.check().await;
}
