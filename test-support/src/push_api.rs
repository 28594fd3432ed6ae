//! The gateway's push API (its internal listener) as tests call it: every request
//! carries an API key as a bearer token.

use std::fmt::Display;

use serde::Serialize;

/// `http://{internal}/v1/agents/{agent}/messages`: where a push to `agent` goes.
pub fn messages_url(internal: impl Display, agent: &str) -> String {
    format!("http://{internal}/v1/agents/{agent}/messages")
}

/// POSTs `body` as JSON to `url` with `key`; panics if no response comes back.
pub async fn post_json(
    http: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    key: &str,
    body: &impl Serialize,
) -> reqwest::Response {
    http.post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .expect("the push API answers")
}

/// GETs `url` with `key`; panics if no response comes back.
pub async fn get(
    http: &reqwest::Client,
    url: impl reqwest::IntoUrl,
    key: &str,
) -> reqwest::Response {
    http.get(url)
        .bearer_auth(key)
        .send()
        .await
        .expect("the push API answers")
}

/// Pushes `body` to `agent` through the gateway whose internal listener is `internal`.
pub async fn push(
    http: &reqwest::Client,
    internal: impl Display,
    key: &str,
    agent: &str,
    body: &impl Serialize,
) -> reqwest::Response {
    post_json(http, messages_url(internal, agent), key, body).await
}
