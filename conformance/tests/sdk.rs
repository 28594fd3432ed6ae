//! The protocol conformance suite: every scenario runs once per SDK (`push::rust`,
//! `push::python`, ...), each against a real gateway on 127.0.0.1 and, for durable
//! delivery, a real `nats-server -js`. The SDK is driven only through its CLI, per the
//! contract in `conformance/README.md`: the flags, the stdout lines, the exit codes.

#[path = "../../agent/tests/common/mod.rs"]
mod common;

use common::{API_KEY, SECRET, gateway_config};

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use axum::{Router, http::HeaderMap, routing::post};
use serde_json::{Value, json};
use tether_config::{DurableConfig, GatewayConfig, NatsConfig, UpstreamConfig, UpstreamEvent};
use tether_conformance::{Cli, Sdk, text};
use tether_gateway::Gateway;
use tether_test_support::{ConnectProxy, NatsServer, hs256, push_api, unix_now};

/// Instantiates every scenario for every SDK: `mod <scenario> { fn <sdk>() }`. Adding
/// an SDK is adding its name to the list (and its row to `SDKS`).
macro_rules! conformance {
    ($sdks:tt; $($scenario:ident),* $(,)?) => {
        $( per_sdk!($scenario, $sdks); )*
    };
}

macro_rules! per_sdk {
    ($scenario:ident, [$($sdk:ident),*]) => {
        mod $scenario {
            $(
                #[tokio::test]
                async fn $sdk() {
                    super::$scenario(tether_conformance::sdk(stringify!($sdk))).await
                }
            )*
        }
    };
}

conformance!(
    [rust, python, typescript];
    push,
    request_reply,
    request_error,
    token_refresh_in_band,
    drain_hint_reconnects,
    retryable_close_reconnects,
    terminal_close_exits,
    replaced_exits,
    unauthorized_exits,
    send_acked,
    groups,
    durable_redelivery_deduplicated,
    wss_through_a_proxy_with_basic_auth,
    ssl_cert_file_and_no_proxy,
    untrusted_certificate_exits,
    proxy_refusal_exits,
);

// === fixtures ===

/// A token for `agent` signed with the gateway's secret.
fn token(agent: &str, ttl_seconds: u64, groups: &[&str]) -> String {
    hs256(
        SECRET.as_bytes(),
        &json!({"sub": agent, "exp": unix_now() + ttl_seconds, "groups": groups}),
    )
}

struct Setup {
    dir: tempfile::TempDir,
    gateway: Gateway,
}

impl Setup {
    async fn start(change: impl FnOnce(&mut GatewayConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = gateway_config(dir.path());
        change(&mut config);
        let gateway = Gateway::start(config, "g1".into()).await.unwrap();
        Self { dir, gateway }
    }

    fn url(&self) -> String {
        format!("ws://{}/v1/connect", self.gateway.public_addr())
    }

    fn internal(&self) -> SocketAddr {
        self.gateway.internal_addr()
    }

    async fn stop(self) {
        self.gateway.drain();
        within(self.gateway.wait()).await;
    }
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(tether_conformance::STEP, fut)
        .await
        .expect("step timed out")
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

/// POSTs a raw JSON body (not re-encoded, so its exact bytes reach the agent).
async fn post_raw(url: String, body: &'static str) -> reqwest::Response {
    http()
        .post(url)
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the push API answers")
}

/// Starts the CLI as `agent` with a fresh token and waits for its first `welcome`.
async fn connected(sdk: Sdk, url: &str, agent: &str, extra: &[&str]) -> Cli {
    let token = token(agent, 3600, &[]);
    let mut args = vec!["--url", url, "--token", &token];
    args.extend_from_slice(extra);
    let mut cli = Cli::spawn(sdk, &args);
    let welcome = cli.next("welcome").await;
    assert_eq!(text(&welcome, "agent_id"), agent, "{}", welcome.text);
    cli
}

// === scenarios ===

/// A push prints as the protocol's push envelope with its data byte for byte; a push
/// that asks for an ack is answered 200 only once the agent acknowledged it.
async fn push(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let mut cli = connected(sdk, &setup.url(), "p1", &[]).await;
    let body = r#"{"b": 2.50, "a":[1, 1e3], "s":"\u00e9"}"#;
    let resp = post_raw(push_api::messages_url(setup.internal(), "p1"), body).await;
    assert_eq!(resp.status(), 202);
    let sent: Value = resp.json().await.unwrap();
    let line = cli.next("push").await;
    assert_eq!(line.json["id"], sent["id"], "{}", line.text);
    assert!(
        line.text.contains(&format!(r#""data":{body}"#)),
        "data passes through byte for byte: {}",
        line.text
    );
    let resp = post_raw(
        format!(
            "{}?ack=true&timeout_ms=10000",
            push_api::messages_url(setup.internal(), "p1")
        ),
        r#"{"n":2}"#,
    )
    .await;
    assert_eq!(resp.status(), 200, "the agent acknowledged the push");
    let line = cli.next("push").await;
    assert_eq!(line.json["data"], json!({"n": 2}));
    assert!(cli.running());
    let (code, stderr) = cli.terminate().await;
    assert_eq!(code, Some(0), "SIGTERM closes cleanly: {stderr}");
    setup.stop().await;
}

fn request_url(internal: SocketAddr, agent: &str) -> String {
    format!("http://{internal}/v1/agents/{agent}/requests?timeout_ms=10000")
}

/// `--reply` answers a backend request; the request prints first.
async fn request_reply(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let mut cli = connected(sdk, &setup.url(), "r1", &["--reply", r#"{"ok": true}"#]).await;
    let resp = post_raw(request_url(setup.internal(), "r1"), r#"{"q":"uptime"}"#).await;
    assert_eq!(resp.status(), 200);
    let answer: Value = resp.json().await.unwrap();
    assert_eq!(answer, json!({"ok": true}));
    let line = cli.next("request").await;
    assert_eq!(line.json["data"], json!({"q": "uptime"}), "{}", line.text);
    assert!(line.json["timeout_ms"].as_u64().is_some_and(|ms| ms > 0));
    assert!(!text(&line, "id").is_empty());
    cli.kill().await;
    setup.stop().await;
}

/// Without `--reply` the agent answers with an error, which the backend sees as 502.
async fn request_error(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let mut cli = connected(sdk, &setup.url(), "r2", &[]).await;
    let resp = post_raw(request_url(setup.internal(), "r2"), r#"{"q":1}"#).await;
    assert_eq!(resp.status(), 502);
    let body = resp.text().await.unwrap();
    assert!(body.contains("handler_error"), "{body}");
    cli.next("request").await;
    assert!(cli.running(), "an error answer does not end the agent");
    cli.kill().await;
    setup.stop().await;
}

/// A short-lived token is refreshed in band from the token file, on the same
/// connection; the new token's groups apply from then on.
async fn token_refresh_in_band(sdk: Sdk) {
    let setup = Setup::start(|config| config.auth.jwt.leeway_seconds = 0).await;
    let file = setup.dir.path().join("agent-token");
    std::fs::write(&file, token("t1", 6, &["old"])).unwrap();
    let mut cli = Cli::spawn(
        sdk,
        &[
            "--url",
            &setup.url(),
            "--token-file",
            file.to_str().unwrap(),
        ],
    );
    let welcome = cli.next("welcome").await;
    let first_expiry = welcome.json["expires_at"].as_u64().unwrap();
    // The sidecar rotates the file; the SDK reads it at its next refresh (at the latest
    // halfway through the old token's life).
    std::fs::write(&file, token("t1", 3600, &["new"])).unwrap();
    let refreshed = cli
        .line("a `refreshed` line with the rotated token", |l| {
            l.kind() == "refreshed"
                && l.json["expires_at"]
                    .as_u64()
                    .is_some_and(|exp| exp > first_expiry + 60)
        })
        .await;
    assert!(
        cli.seen.iter().filter(|l| l.kind() == "welcome").count() == 1,
        "refreshed without reconnecting: {:?}; {}",
        cli.seen.iter().map(|l| &l.text).collect::<Vec<_>>(),
        refreshed.text
    );
    let group_url = |group: &str| format!("http://{}/v1/groups/{group}/messages", setup.internal());
    let resp = push_api::post_json(&http(), group_url("new"), API_KEY, &json!({"g": "new"})).await;
    assert_eq!(resp.status(), 202);
    let line = cli.next("push").await;
    assert_eq!(line.json["data"], json!({"g": "new"}));
    // The old token's expiry passes: the session lives on (no 4001, no new welcome).
    assert_eq!(cli.seen.iter().filter(|l| l.kind() == "welcome").count(), 1);
    cli.kill().await;
    setup.stop().await;
}

/// The gateway drains (a `reconnect` hint, then 1012); a new gateway takes its address;
/// the SDK reconnects there and keeps receiving.
async fn drain_hint_reconnects(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let addr = setup.gateway.public_addr();
    let mut cli = connected(sdk, &setup.url(), "d1", &[]).await;
    let Setup { dir, gateway } = setup;
    gateway.drain();
    within(gateway.wait()).await;
    let mut config = gateway_config(dir.path());
    config.listen.public = addr.to_string();
    let second = Gateway::start(config, "g2".into()).await.unwrap();
    cli.next("welcome").await;
    assert!(cli.running());
    let resp = push_api::push(&http(), second.internal_addr(), API_KEY, "d1", &json!(7)).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(cli.next("push").await.json["data"], json!(7));
    cli.kill().await;
    second.drain();
    within(second.wait()).await;
}

/// A retryable close (4006, idle timeout) is followed by a new session, not an exit.
async fn retryable_close_reconnects(sdk: Sdk) {
    let setup = Setup::start(|config| config.limits.idle_timeout_seconds = 1).await;
    let mut cli = connected(sdk, &setup.url(), "i1", &[]).await;
    // No message from the agent: the gateway closes it with 4006 after a second.
    cli.next("welcome").await;
    cli.next("welcome").await;
    assert!(cli.running(), "stderr: {}", cli.stderr());
    cli.kill().await;
    setup.stop().await;
}

/// A backend disconnect (4005) forbids reconnecting: the CLI exits 1 naming the code.
async fn terminal_close_exits(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let cli = connected(sdk, &setup.url(), "x1", &[]).await;
    let resp = http()
        .delete(format!("http://{}/v1/agents/x1", setup.internal()))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let (code, stderr) = cli.exit().await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("4005"), "{stderr}");
    setup.stop().await;
}

/// A newer connection of the same agent replaces the first (4003): the first exits 1,
/// the second stays connected and receives.
async fn replaced_exits(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let first = connected(sdk, &setup.url(), "dup", &[]).await;
    let mut second = connected(sdk, &setup.url(), "dup", &[]).await;
    let (code, stderr) = first.exit().await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("4003"), "{stderr}");
    let resp = push_api::push(&http(), setup.internal(), API_KEY, "dup", &json!("hi")).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(second.next("push").await.json["data"], json!("hi"));
    assert!(second.running());
    second.kill().await;
    setup.stop().await;
}

/// A token the gateway refuses (401) stops the CLI at once, with the status.
async fn unauthorized_exits(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let forged = hs256(
        b"another-secret-of-at-least-32-bytes!",
        &json!({"sub": "u1", "exp": unix_now() + 3600}),
    );
    let cli = Cli::spawn(sdk, &["--url", &setup.url(), "--token", &forged]);
    let (code, stderr) = cli.exit().await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("401"), "{stderr}");
    setup.stop().await;
}

/// Two `--send`s are acknowledged in order, each reaching the upstream with its id as
/// the `Idempotency-Key`; then the CLI exits 0.
async fn send_acked(sdk: Sdk) {
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let upstream = {
        let seen = seen.clone();
        Router::new().route(
            "/events",
            post(move |headers: HeaderMap, body: String| {
                let seen = seen.clone();
                async move {
                    let key = headers
                        .get("idempotency-key")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    seen.lock().unwrap().push((key, body));
                    axum::http::StatusCode::OK
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, upstream).await.unwrap() });
    let setup = Setup::start(|config| {
        config.upstream = Some(UpstreamConfig {
            url: format!("http://{upstream_addr}/events"),
            secret_file: None,
            timeout_ms: 5000,
            events: vec![UpstreamEvent::Message],
            max_concurrency: 4,
            queue_timeout_ms: 1000,
        })
    })
    .await;
    let token = token("s1", 3600, &[]);
    let mut cli = Cli::spawn(
        sdk,
        &[
            "--url",
            &setup.url(),
            "--token",
            &token,
            "--send",
            r#"{"n":1}"#,
            "--send",
            r#"{"n":2}"#,
            "--exit-after-send",
        ],
    );
    let first = text(&cli.next("ack").await, "id");
    let second = text(&cli.next("ack").await, "id");
    assert_ne!(first, second);
    let (code, stderr) = cli.exit().await;
    assert_eq!(code, Some(0), "{stderr}");
    let seen = seen.lock().unwrap().clone();
    let keys: Vec<&str> = seen.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, [first.as_str(), second.as_str()], "{seen:?}");
    assert!(seen[0].1.contains(r#"{"n":1}"#), "{}", seen[0].1);
    assert!(seen[1].1.contains(r#"{"n":2}"#), "{}", seen[1].1);
    setup.stop().await;
}

/// A group send reaches members only: the token's `groups` claim decides.
async fn groups(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let token = token("m1", 3600, &["blue", "green"]);
    let mut cli = Cli::spawn(sdk, &["--url", &setup.url(), "--token", &token]);
    cli.next("welcome").await;
    let group_url = |group: &str| format!("http://{}/v1/groups/{group}/messages", setup.internal());
    // Sent first, to a group the agent is not in: if it arrived it would come first.
    for (group, body) in [("red", json!("red")), ("blue", json!("blue"))] {
        let resp = push_api::post_json(&http(), group_url(group), API_KEY, &body).await;
        assert_eq!(resp.status(), 202);
    }
    assert_eq!(cli.next("push").await.json["data"], json!("blue"));
    let resp = push_api::post_json(&http(), group_url("green"), API_KEY, &json!("green")).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(cli.next("push").await.json["data"], json!("green"));
    cli.kill().await;
    setup.stop().await;
}

// === durable delivery ===

fn durable_config(dir: &Path, nats: &NatsServer, public: &str) -> GatewayConfig {
    let mut config = gateway_config(dir);
    config.listen.public = public.into();
    config.routing.nats = Some(NatsConfig {
        url: nats.url(),
        namespace: None,
        auth: Default::default(),
        tls: None,
        replicas: None,
    });
    config.delivery.durable = Some(DurableConfig::default());
    config
}

async fn push_durable(gateway: &Gateway, id: &str, n: u64) {
    let response = http()
        .post(format!(
            "{}?delivery=durable",
            push_api::messages_url(gateway.internal_addr(), "dd")
        ))
        .bearer_auth(API_KEY)
        .header("idempotency-key", id)
        .json(&n)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
}

async fn durable_status(gateway: &Gateway, id: &str) -> String {
    let url = format!("http://{}/v1/messages/{id}", gateway.internal_addr());
    let body: Value = push_api::get(&http(), url, API_KEY)
        .await
        .json()
        .await
        .unwrap();
    body["status"].as_str().unwrap_or_default().to_owned()
}

/// A durable push whose ack was lost with the connection is redelivered by the next
/// gateway, and the SDK's de-duplication window acknowledges the copies without
/// handling (printing) them again.
async fn durable_redelivery_deduplicated(sdk: Sdk) {
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let first = Gateway::start(
        durable_config(dir.path(), &nats, "127.0.0.1:0"),
        "g1".into(),
    )
    .await
    .unwrap();
    let addr = first.public_addr();
    let token = token("dd", 3600, &[]);
    let url = format!("ws://{addr}/v1/connect");
    let mut cli = Cli::spawn(sdk, &["--url", &url, "--token", &token, "--ack-on-stdin"]);
    cli.next("welcome").await;
    push_durable(&first, "d1", 1).await;
    push_durable(&first, "d2", 2).await;
    // d1 is being handled (printed, its ack held back by --ack-on-stdin) when the
    // gateway drains and exits: its ack is lost with the connection.
    let line = cli.next("push").await;
    assert_eq!(text(&line, "id"), "d1");
    first.drain();
    within(first.wait()).await;
    let second = Gateway::start(
        durable_config(dir.path(), &nats, &addr.to_string()),
        "g2".into(),
    )
    .await
    .unwrap();
    cli.next("welcome").await;
    // Release every push from now on (lines wait in the pipe for the next handler).
    cli.release(16).await;
    for id in ["d1", "d2"] {
        tether_test_support::eventually(
            &format!("{id} acknowledged"),
            tether_conformance::STEP,
            || async { (durable_status(&second, id).await == "acknowledged").then_some(()) },
        )
        .await;
    }
    // Every line the CLI printed before it acked is in the pipe: read to EOF.
    let lines = cli.kill().await;
    let handled: Vec<String> = lines
        .iter()
        .filter(|l| l.kind() == "push")
        .map(|l| text(l, "id"))
        .collect();
    assert_eq!(handled, ["d1", "d2"], "each durable push handled once");
    second.drain();
    within(second.wait()).await;
}

// === TLS and proxies ===

/// A CA made at test time, and a TLS front signed by it that forwards to a gateway
/// (as a load balancer terminating TLS does).
struct Pki {
    dir: tempfile::TempDir,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tether conformance CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Self {
            dir,
            ca_der: cert.der().clone(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    fn ca_file(&self) -> String {
        self.dir
            .path()
            .join("ca.pem")
            .to_string_lossy()
            .into_owned()
    }

    /// Listens on 127.0.0.1 with a certificate for `names`; forwards to `target`.
    async fn front(&self, names: &[&str], target: SocketAddr) -> u16 {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone(), self.ca_der.clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                });
            }
        });
        port
    }
}

/// `wss://` through `HTTPS_PROXY` with Basic credentials (a %-encoded password), the
/// gateway's CA given with `--ca-file`: a push round trip through one tunnel.
async fn wss_through_a_proxy_with_basic_auth(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let pki = Pki::new();
    let port = pki
        .front(&["gateway.test"], setup.gateway.public_addr())
        .await;
    let proxy = ConnectProxy::start(Some("agent:p@ss word")).await;
    let token = token("w1", 3600, &[]);
    let url = format!("wss://gateway.test:{port}/v1/connect");
    let proxy_url = format!("http://agent:p%40ss%20word@{}", proxy.addr);
    let mut cli = Cli::spawn_with_env(
        sdk,
        &[
            "--url",
            &url,
            "--token",
            &token,
            "--ca-file",
            &pki.ca_file(),
        ],
        &[
            ("HTTPS_PROXY", &proxy_url),
            ("HTTP_PROXY", "http://127.0.0.1:9"),
        ],
    );
    cli.next("welcome").await;
    let resp = push_api::push(&http(), setup.internal(), API_KEY, "w1", &json!("tls")).await;
    assert_eq!(resp.status(), 202);
    assert_eq!(cli.next("push").await.json["data"], json!("tls"));
    assert_eq!(
        proxy.targets(),
        [format!("gateway.test:{port}")],
        "one tunnel, to the gateway's name"
    );
    cli.kill().await;
    setup.stop().await;
}

/// `SSL_CERT_FILE` replaces the system roots, and `NO_PROXY` sends the gateway's name
/// past the proxy the environment names.
async fn ssl_cert_file_and_no_proxy(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let pki = Pki::new();
    let port = pki.front(&["localhost"], setup.gateway.public_addr()).await;
    let proxy = ConnectProxy::start(None).await;
    let token = token("w2", 3600, &[]);
    let url = format!("wss://localhost:{port}/v1/connect");
    let proxy_url = format!("http://{}", proxy.addr);
    let ca = pki.ca_file();
    let mut cli = Cli::spawn_with_env(
        sdk,
        &["--url", &url, "--token", &token],
        &[
            ("SSL_CERT_FILE", &ca),
            ("HTTPS_PROXY", &proxy_url),
            ("NO_PROXY", "example.com,localhost"),
        ],
    );
    cli.next("welcome").await;
    assert!(proxy.targets().is_empty(), "NO_PROXY bypassed the proxy");
    cli.kill().await;
    setup.stop().await;
}

/// A gateway certificate from an unknown CA stops the CLI (exit 1) with a TLS reason:
/// the same certificate would fail every retry.
async fn untrusted_certificate_exits(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let pki = Pki::new();
    let port = pki.front(&["localhost"], setup.gateway.public_addr()).await;
    let token = token("w3", 3600, &[]);
    let url = format!("wss://localhost:{port}/v1/connect");
    let cli = Cli::spawn(sdk, &["--url", &url, "--token", &token]);
    let (code, stderr) = cli.exit().await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.to_lowercase().contains("certificate"), "{stderr}");
    setup.stop().await;
}

/// A proxy refusing the tunnel (407: no credentials) stops the CLI with its status.
async fn proxy_refusal_exits(sdk: Sdk) {
    let setup = Setup::start(|_| {}).await;
    let proxy = ConnectProxy::start(Some("agent:secret")).await;
    let token = token("w4", 3600, &[]);
    let proxy_url = format!("http://{}", proxy.addr);
    let cli = Cli::spawn(
        sdk,
        &[
            "--url",
            &setup.url(),
            "--token",
            &token,
            "--proxy",
            &proxy_url,
        ],
    );
    let (code, stderr) = cli.exit().await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("407"), "{stderr}");
    assert_eq!(proxy.targets().len(), 1, "no retry after a 407");
    setup.stop().await;
}
