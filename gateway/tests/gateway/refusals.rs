//! Every refusal of the internal port answers in the documented error shape
//! (`{"error":{"code","message"}}`, docs/push-api.md) and says what is wrong: unknown
//! routes, wrong methods, unknown query parameters.

use serde_json::Value;

use crate::common::*;

/// Status, `error.code` and `error.message` of a response in the API's error shape.
async fn refusal(response: reqwest::Response) -> (u16, String, String) {
    let status = response.status().as_u16();
    let body: Value = response
        .json()
        .await
        .unwrap_or_else(|e| panic!("a {status} without a JSON body: {e}"));
    (
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_answer_in_the_error_shape() {
    let gw = TestGateway::start().await;
    for (path, key) in [("/v1/nothing", true), ("/v1/nothing", false), ("/", true)] {
        let mut request = gw.http.get(gw.api(path));
        if key {
            request = request.bearer_auth(API_KEY);
        }
        let (status, code, message) = refusal(request.send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (404, "not_found"), "{path}");
        assert_eq!(
            message,
            format!("no route GET {path}: the push API's routes are listed in docs/push-api.md")
        );
    }
    let response = gw
        .http
        .get(gw.api("/v1/broadcast"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers().get("allow").map(|v| v.to_str().unwrap()),
        Some("POST")
    );
    let (status, code, message) = refusal(response).await;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
    assert_eq!(
        message,
        "/v1/broadcast does not take GET (the Allow header lists what it takes)"
    );
    let (status, code, _) = refusal(gw.http.post(gw.api("/healthz")).send().await.unwrap()).await;
    assert_eq!((status, code.as_str()), (405, "method_not_allowed"));
}

#[tokio::test]
async fn unknown_query_parameters_are_refused_by_name() {
    let gw = TestGateway::start().await;
    let _agent = gw.agent("agent-1", &[]).await;
    let cases = [
        (
            "/v1/agents/agent-1/requests?timeout=5",
            "unknown query parameter `timeout` (POST /v1/agents/{agent}/requests takes timeout_ms); did you mean `timeout_ms`?",
        ),
        (
            "/v1/agents/agent-1/messages?ack=true&timeout=5&retries=3",
            "unknown query parameters `timeout`, `retries` (POST /v1/agents/{agent}/messages takes ack, timeout_ms, delivery); did you mean `timeout_ms`?",
        ),
        (
            "/v1/broadcast?dry_run=1",
            "unknown query parameter `dry_run` (POST /v1/broadcast takes no query parameters)",
        ),
    ];
    for (path, expected) in cases {
        let (status, code, message) = refusal(gw.post(path, serde_json::json!(1)).await).await;
        assert_eq!((status, code.as_str()), (400, "bad_request"), "{path}");
        assert_eq!(message, expected, "{path}");
    }
    let (status, _, message) = refusal(gw.get("/v1/agents?limit=5&page=2").await).await;
    assert_eq!(status, 400);
    assert_eq!(
        message,
        "unknown query parameter `page` (GET /v1/agents takes limit, cursor)"
    );
    // A malformed value of a known parameter is refused in the same shape.
    let (status, code, message) = refusal(gw.get("/v1/agents?limit=many").await).await;
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    assert!(message.contains("limit"), "{message}");
    // Known parameters still work; without an API key the key is refused first.
    let ok = gw
        .post(
            "/v1/agents/agent-1/messages?timeout_ms=500",
            serde_json::json!(1),
        )
        .await;
    assert_eq!(ok.status(), 202);
    let no_key = gw
        .http
        .post(gw.api("/v1/agents/agent-1/messages?timeout=5"))
        .json(&serde_json::json!(1))
        .send()
        .await
        .unwrap();
    assert_eq!(no_key.status(), 401);
    let (status, _, message) = refusal(
        gw.http
            .get(gw.api("/healthz?verbose=1"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        message,
        "unknown query parameter `verbose` (GET /healthz takes no query parameters)"
    );
}
