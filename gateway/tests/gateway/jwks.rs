//! Agent keys from a JWKS URL (`auth.jwt.jwks`): a real HTTPS server in the test (its
//! certificate from a CA made here with rcgen, trusted through `caFile`) serves a key
//! set that rotates, fails with 500, answers garbage or too slowly; agents connect with
//! RS256 and ES256 tokens signed by those keys.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parking_lot::Mutex;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::Value;
use tether_config::JwksConfig;
use tether_gateway::Gateway;
use tether_gateway::jwks::JwksError;
use tether_protocol::GatewayMessage;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite;

use crate::common::{PATIENCE, TestGateway, claims, connect, fixture, next_message};

/// What the JWKS server answers.
#[derive(Clone)]
enum Answer {
    Keys(&'static [&'static str]),
    Status500,
    Garbage,
    /// Headers only after this long (past the gateway's `timeoutMs`).
    Slow(Duration),
}

struct JwksServer {
    url: String,
    ca_file: PathBuf,
    answer: Arc<Mutex<Answer>>,
    requests: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

/// The fixture key set restricted to `kids`.
fn key_set(kids: &[&str]) -> String {
    let all: Value = serde_json::from_slice(&std::fs::read(fixture("jwks.json")).unwrap()).unwrap();
    let keys: Vec<Value> = all["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
        .cloned()
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

fn ca_and_server_cert(dir: &Path) -> (PathBuf, rustls::ServerConfig) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = params.self_signed(&ca_key).unwrap();
    let ca_file = dir.join("idp-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let issuer = Issuer::new(params, ca_key);
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    (ca_file, config)
}

impl JwksServer {
    async fn start(answer: Answer) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ca_file, tls) = ca_and_server_cert(dir.path());
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let answer = Arc::new(Mutex::new(answer));
        let requests = Arc::new(AtomicUsize::new(0));
        let (shared, counter) = (answer.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, shared, counter) =
                    (acceptor.clone(), shared.clone(), counter.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |_req| {
                        let answer = shared.lock().clone();
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move {
                            let (status, body) = match answer {
                                Answer::Keys(kids) => (200, key_set(kids)),
                                Answer::Status500 => (500, "internal error".into()),
                                Answer::Garbage => (200, "<html>not json</html>".into()),
                                Answer::Slow(wait) => {
                                    tokio::time::sleep(wait).await;
                                    (200, key_set(&["rsa-1"]))
                                }
                            };
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            url: format!("https://localhost:{port}/.well-known/jwks.json"),
            ca_file,
            answer,
            requests,
            _dir: dir,
        }
    }

    fn set(&self, answer: Answer) {
        *self.answer.lock() = answer;
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Gateway settings for this server; `tweak` adjusts the intervals.
    fn config(&self, tweak: impl FnOnce(&mut JwksConfig)) -> JwksConfig {
        let mut config = JwksConfig::new(self.url.clone());
        config.ca_file = Some(self.ca_file.clone());
        config.timeout_ms = 500;
        tweak(&mut config);
        config
    }
}

async fn gateway_on(jwks: JwksConfig) -> TestGateway {
    TestGateway::start_with(move |c| {
        c.auth.jwt.hs256_secret_file = None;
        c.auth.jwt.jwks = Some(jwks);
    })
    .await
}

/// A token for `sub` signed with the fixture key `private`, naming `kid`.
fn signed(alg: Algorithm, kid: &str, private: &str, sub: &str) -> String {
    let pem = std::fs::read(fixture(private)).unwrap();
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(&pem).unwrap(),
    };
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &claims(sub, &[], 3600), &key).unwrap()
}

fn rsa1(sub: &str) -> String {
    signed(Algorithm::RS256, "rsa-1", "rsa-private.pem", sub)
}

fn rsa2(sub: &str) -> String {
    signed(Algorithm::RS256, "rsa-2", "rsa2-private.pem", sub)
}

fn ec1(sub: &str) -> String {
    signed(Algorithm::ES256, "ec-1", "ec-private.pem", sub)
}

/// Connects with `token`: `Ok` once welcomed, else the refusal's status and body.
async fn try_agent(gw: &TestGateway, token: &str) -> Result<(), (u16, String)> {
    match connect(&gw.ws_url(), Some(token)).await {
        Ok((mut ws, _)) => match next_message(&mut ws).await {
            GatewayMessage::Welcome(_) => Ok(()),
            other => panic!("expected welcome, got {other:?}"),
        },
        Err(tungstenite::Error::Http(response)) => Err((
            response.status().as_u16(),
            String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned(),
        )),
        Err(e) => panic!("unexpected handshake error {e}"),
    }
}

fn last_error(gw: &TestGateway) -> Option<JwksError> {
    let state = gw.gateway.state();
    state.verifier.remote().unwrap().state().last_error
}

#[tokio::test]
async fn jwks_rotation_is_picked_up_by_kid_and_bad_answers_keep_the_keys() {
    let idp = JwksServer::start(Answer::Keys(&["rsa-1"])).await;
    // No periodic refresh in this test's time; an unknown kid fetches at once.
    let gw = gateway_on(idp.config(|c| {
        c.refresh_interval_seconds = 3600;
        c.min_refresh_interval_seconds = 0;
        c.max_stale_seconds = 3600;
    }))
    .await;
    assert_eq!(idp.requests(), 1, "fetched once at start");
    try_agent(&gw, &rsa1("a-1")).await.unwrap();
    // rsa-2 is not published yet: the unknown kid fetches, finds nothing new, 401.
    let (status, _) = try_agent(&gw, &rsa2("a-2")).await.unwrap_err();
    assert_eq!(status, 401);
    assert_eq!(idp.requests(), 2);

    // The provider rotates: a token naming the new kid is accepted at once.
    idp.set(Answer::Keys(&["rsa-1", "rsa-2", "ec-1"]));
    try_agent(&gw, &rsa2("a-2")).await.unwrap();
    try_agent(&gw, &ec1("a-3")).await.unwrap();
    assert_eq!(idp.requests(), 3);

    // Bad answers: each fetch fails with its own error, and the keys stay.
    for (answer, kind) in [
        (Answer::Status500, "status"),
        (Answer::Garbage, "body"),
        (Answer::Slow(Duration::from_secs(5)), "timeout"),
    ] {
        idp.set(answer);
        let unknown = signed(Algorithm::RS256, "rsa-9", "rsa-private.pem", "a-9");
        assert_eq!(try_agent(&gw, &unknown).await.unwrap_err().0, 401);
        let error = last_error(&gw).expect("the failed fetch is recorded");
        assert_eq!(error.kind(), kind, "{error}");
        try_agent(&gw, &rsa1("a-1")).await.unwrap();
        try_agent(&gw, &rsa2("a-2")).await.unwrap();
        try_agent(&gw, &ec1("a-3")).await.unwrap();
    }
    let state = gw.gateway.state().verifier.remote().unwrap().state();
    assert_eq!((state.attempts, state.failures), (6, 3));
    assert!(
        last_error(&gw).unwrap().to_string().contains("timed out"),
        "{:?}",
        last_error(&gw)
    );
}

#[tokio::test]
async fn unknown_kids_fetch_at_most_once_per_min_refresh_interval() {
    let idp = JwksServer::start(Answer::Keys(&["rsa-1"])).await;
    let gw = gateway_on(idp.config(|c| {
        c.refresh_interval_seconds = 3600;
        c.min_refresh_interval_seconds = 3600;
        c.max_stale_seconds = 3600;
    }))
    .await;
    // A flood of forged kids costs the provider nothing: the start's fetch was the
    // last one allowed within the interval.
    for i in 0..20 {
        let forged = signed(
            Algorithm::RS256,
            &format!("forged-{i}"),
            "rsa-private.pem",
            "a",
        );
        assert_eq!(try_agent(&gw, &forged).await.unwrap_err().0, 401);
    }
    assert_eq!(idp.requests(), 1);
    // The same limit delays a real rotation (the other test, with a limit of 0, picks
    // it up at once): the setting is what decides.
    idp.set(Answer::Keys(&["rsa-1", "rsa-2"]));
    assert_eq!(try_agent(&gw, &rsa2("a-2")).await.unwrap_err().0, 401);
    assert_eq!(idp.requests(), 1);
    try_agent(&gw, &rsa1("a-1")).await.unwrap();
}

#[tokio::test]
async fn keys_are_served_stale_for_max_stale_seconds_then_refused_until_a_fetch_succeeds() {
    let idp = JwksServer::start(Answer::Keys(&["rsa-1"])).await;
    let gw = gateway_on(idp.config(|c| {
        c.refresh_interval_seconds = 1;
        c.min_refresh_interval_seconds = 0;
        c.max_stale_seconds = 2;
    }))
    .await;
    try_agent(&gw, &rsa1("a-1")).await.unwrap();
    idp.set(Answer::Status500);
    // Periodic fetches fail; once the last good one is over 2 s old, tokens are refused
    // with a reason naming the setting.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // (On a loaded machine a late scheduled fetch can let the keys go stale before any
    // fetch failed; that refusal names the last good fetch instead. Wait for the 500.)
    let body = loop {
        match try_agent(&gw, &rsa1("a-1")).await {
            Ok(()) => {}
            Err((401, body)) if body.contains("HTTP 500") => break body,
            Err((401, body)) => assert!(body.contains("maxStaleSeconds"), "{body}"),
            Err(other) => panic!("unexpected refusal {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "keys never went stale"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        body.contains("maxStaleSeconds") && body.contains("HTTP 500"),
        "{body}"
    );
    // The provider is back: the periodic refresh restores the keys.
    idp.set(Answer::Keys(&["rsa-1"]));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while try_agent(&gw, &rsa1("a-1")).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "keys never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_gateway_does_not_start_without_a_first_good_fetch() {
    let idp = JwksServer::start(Answer::Status500).await;
    let start = |jwks: JwksConfig| async move {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::common::config(dir.path(), move |c| {
            c.auth.jwt.hs256_secret_file = None;
            c.auth.jwt.jwks = Some(jwks);
        });
        Gateway::start(config, "jwks-test".into())
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let err = start(idp.config(|_| {})).await;
    assert!(
        err.contains("auth.jwt.jwks") && err.contains("HTTP 500"),
        "{err}"
    );
    idp.set(Answer::Garbage);
    let err = start(idp.config(|_| {})).await;
    assert!(err.contains("not a JWKS"), "{err}");
    // Without the provider's CA: a TLS error, named.
    idp.set(Answer::Keys(&["rsa-1"]));
    let err = start(idp.config(|c| c.ca_file = None)).await;
    assert!(err.contains("certificate"), "{err}");
    // With it, the gateway starts.
    let gw = gateway_on(idp.config(|_| {})).await;
    try_agent(&gw, &rsa1("a-1")).await.unwrap();
}
