//! `wss://` and HTTP proxies against a real gateway on 127.0.0.1. A CA generated at test
//! time (rcgen) signs a TLS-terminating front (tokio-rustls, forwarding to the gateway's
//! plain listener, as a load balancer does); the shared test CONNECT proxy sits
//! between the agent and that front. The proxy resolves `gateway.test` itself, so an
//! agent that reaches the gateway by that name provably went through the tunnel.

mod common;

use common::{API_KEY, SECRET, gateway_config, secret_file};

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    server::WebPkiClientVerifier,
};
use tether_agent::{
    Agent, Backoff, ClientCert, Error, Hs256Minter, Options, Proxy, ReconnectPolicy, State,
    StopReason, TlsOptions,
};
use tether_gateway::Gateway;
use tether_test_support::{ConnectProxy, push_api};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::{TcpListener, TcpStream},
    process::Command,
};

// === a CA made at test time ===

struct Pki {
    dir: tempfile::TempDir,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A distinct name per CA: an unrelated CA is unknown, not a bad signature.
        static SERIAL: AtomicUsize = AtomicUsize::new(0);
        let serial = SERIAL.fetch_add(1, Ordering::SeqCst);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("tether test CA {serial}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Self {
            dir,
            ca_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A leaf for `names` with `usage`, optionally valid only in the past.
    fn leaf(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> (rcgen::Certificate, KeyPair) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert, key)
    }

    /// A client certificate and key written as PEM files.
    fn client_cert(&self) -> ClientCert {
        let (cert, key) = self.leaf(&["agent-1"], ExtendedKeyUsagePurpose::ClientAuth, false);
        let cert_file = self.dir.path().join("client.pem");
        let key_file = self.dir.path().join("client.key");
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        ClientCert {
            cert_file,
            key_file,
        }
    }

    fn server_config(&self, names: &[&str], expired: bool, require_client: bool) -> ServerConfig {
        let (cert, key) = self.leaf(names, ExtendedKeyUsagePurpose::ServerAuth, expired);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        builder
            .with_single_cert(vec![cert.der().clone(), self.ca_der.clone()], key)
            .unwrap()
    }
}

// === the gateway, a TLS front and a CONNECT proxy ===

struct Setup {
    dir: tempfile::TempDir,
    gateway: Gateway,
}

async fn gateway() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path());
    let gateway = Gateway::start(config, "g".into()).await.unwrap();
    Setup { dir, gateway }
}

/// Terminates TLS and forwards the bytes to `target`; counts TCP connections accepted.
struct Front {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

async fn tls_front(target: SocketAddr, config: ServerConfig) -> Front {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut upstream) = TcpStream::connect(target).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    Front { port, accepted }
}

fn fast(tls: TlsOptions, proxy: Proxy) -> Options {
    Options {
        reconnect: ReconnectPolicy {
            backoff: Backoff {
                base: Duration::from_millis(20),
                cap: Duration::from_millis(100),
            },
            overload_floor: Duration::from_millis(20),
        },
        tls,
        proxy,
        ..Options::default()
    }
}

fn extra_ca(pki: &Pki) -> TlsOptions {
    TlsOptions {
        extra_ca_file: Some(pki.ca_file()),
        client_cert: None,
    }
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("step timed out")
}

fn agent(url: String, id: &str, options: Options) -> Agent {
    Agent::builder(url, Hs256Minter::new(SECRET.as_bytes(), id))
        .options(options)
        .start()
        .unwrap()
}

async fn stop_reason(agent: &Agent) -> StopReason {
    match within(agent.connected()).await {
        Err(Error::Stopped(reason)) => reason,
        other => panic!("expected the agent to stop, got {other:?}"),
    }
}

// === TLS ===

#[tokio::test]
async fn wss_with_the_extra_ca_connects_and_receives_a_push() {
    let setup = gateway().await;
    let pki = Pki::new();
    let front = tls_front(
        setup.gateway.public_addr(),
        pki.server_config(&["localhost"], false, false),
    )
    .await;
    let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let agent = Agent::builder(
        format!("wss://localhost:{}/v1/connect", front.port),
        Hs256Minter::new(SECRET.as_bytes(), "tls-1"),
    )
    .options(fast(extra_ca(&pki), Proxy::Direct))
    .on_push(move |push| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(push.json::<serde_json::Value>().unwrap());
        }
    })
    .start()
    .unwrap();
    let session = within(agent.connected()).await.unwrap();
    assert_eq!(session.agent_id, "tls-1");
    let http = reqwest::Client::new();
    let resp = push_api::push(
        &http,
        setup.gateway.internal_addr(),
        API_KEY,
        "tls-1",
        &serde_json::json!({"over": "tls"}),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(within(pushes.recv()).await.unwrap()["over"], "tls");
    agent.close().await;
}

#[tokio::test]
async fn wss_without_the_ca_stops_with_a_certificate_error_after_one_attempt() {
    let setup = gateway().await;
    let pki = Pki::new();
    let front = tls_front(
        setup.gateway.public_addr(),
        pki.server_config(&["localhost"], false, false),
    )
    .await;
    let agent = agent(
        format!("wss://localhost:{}/v1/connect", front.port),
        "tls-2",
        // Trusts another CA (and the system roots): not the one that signed the front.
        fast(extra_ca(&Pki::new()), Proxy::Direct),
    );
    let reason = stop_reason(&agent).await;
    let text = reason.to_string();
    assert!(
        matches!(reason, StopReason::Tls { .. }) && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert_eq!(front.accepted.load(Ordering::SeqCst), 1, "no retries");
}

#[tokio::test]
async fn wss_to_a_name_the_certificate_does_not_cover_stops_with_a_name_error() {
    let setup = gateway().await;
    let pki = Pki::new();
    let front = tls_front(
        setup.gateway.public_addr(),
        pki.server_config(&["localhost"], false, false),
    )
    .await;
    // The certificate names `localhost`; the agent dials the address.
    let agent = agent(
        format!("wss://127.0.0.1:{}/v1/connect", front.port),
        "tls-3",
        fast(extra_ca(&pki), Proxy::Direct),
    );
    let reason = stop_reason(&agent).await;
    let text = reason.to_string();
    assert!(
        matches!(reason, StopReason::Tls { .. })
            && text.contains("not valid for name")
            && text.contains("127.0.0.1"),
        "{text}"
    );
    assert_eq!(front.accepted.load(Ordering::SeqCst), 1, "no retries");
}

#[tokio::test]
async fn wss_to_an_expired_certificate_stops_with_an_expiry_error() {
    let setup = gateway().await;
    let pki = Pki::new();
    let front = tls_front(
        setup.gateway.public_addr(),
        pki.server_config(&["localhost"], true, false),
    )
    .await;
    let agent = agent(
        format!("wss://localhost:{}/v1/connect", front.port),
        "tls-4",
        fast(extra_ca(&pki), Proxy::Direct),
    );
    let reason = stop_reason(&agent).await;
    let text = reason.to_string();
    assert!(
        matches!(reason, StopReason::Tls { .. }) && text.contains("xpired"),
        "{text}"
    );
}

#[tokio::test]
async fn mtls_front_admits_a_client_certificate_and_refuses_its_absence() {
    let setup = gateway().await;
    let pki = Pki::new();
    let front = tls_front(
        setup.gateway.public_addr(),
        pki.server_config(&["localhost"], false, true),
    )
    .await;
    let url = format!("wss://localhost:{}/v1/connect", front.port);
    let with_cert = TlsOptions {
        extra_ca_file: Some(pki.ca_file()),
        client_cert: Some(pki.client_cert()),
    };
    let admitted = agent(url.clone(), "mtls-1", fast(with_cert, Proxy::Direct));
    assert_eq!(
        within(admitted.connected()).await.unwrap().agent_id,
        "mtls-1"
    );
    admitted.close().await;

    let refused = agent(url, "mtls-2", fast(extra_ca(&pki), Proxy::Direct));
    let reason = stop_reason(&refused).await;
    let text = reason.to_string();
    assert!(
        matches!(reason, StopReason::Tls { .. }) && text.contains("client certificate"),
        "{text}"
    );
    assert_eq!(front.accepted.load(Ordering::SeqCst), 2, "one attempt each");
}

#[tokio::test]
async fn unusable_tls_files_are_refused_at_start() {
    let pki = Pki::new();
    let bad_pair = TlsOptions {
        extra_ca_file: Some(pki.ca_file()),
        client_cert: Some(ClientCert {
            cert_file: pki.ca_file(),
            key_file: pki.dir.path().join("missing.key"),
        }),
    };
    let err = Agent::builder(
        "wss://localhost:1/v1/connect",
        Hs256Minter::new(SECRET.as_bytes(), "x"),
    )
    .options(fast(bad_pair, Proxy::Direct))
    .start()
    .err()
    .unwrap();
    let text = err.to_string();
    assert!(
        matches!(err, Error::Transport(_)) && text.contains("missing.key"),
        "{text}"
    );
    let err = Agent::builder(
        "wss://localhost:1/v1/connect",
        Hs256Minter::new(SECRET.as_bytes(), "x"),
    )
    .options(fast(
        TlsOptions::default(),
        Proxy::Url("socks5://proxy:1080".into()),
    ))
    .start()
    .err()
    .unwrap();
    assert!(err.to_string().contains("http://"), "{err}");
}

// === proxies ===

#[tokio::test]
async fn wss_through_a_connect_proxy_with_basic_auth() {
    let setup = gateway().await;
    let pki = Pki::new();
    let front = tls_front(
        setup.gateway.public_addr(),
        pki.server_config(&["gateway.test"], false, false),
    )
    .await;
    let proxy = ConnectProxy::start(Some("proxy-user:s3cret:x")).await;
    // The password's `:` is percent-encoded in the URL and decoded for the header.
    let proxy_url = format!("http://proxy-user:s3cret%3Ax@{}", proxy.addr);
    let (tx, mut pushes) = tokio::sync::mpsc::unbounded_channel();
    let agent = Agent::builder(
        format!("wss://gateway.test:{}/v1/connect", front.port),
        Hs256Minter::new(SECRET.as_bytes(), "proxied-1"),
    )
    .options(fast(extra_ca(&pki), Proxy::Url(proxy_url)))
    .on_push(move |push| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(push.json::<serde_json::Value>().unwrap());
        }
    })
    .start()
    .unwrap();
    assert_eq!(
        within(agent.connected()).await.unwrap().agent_id,
        "proxied-1"
    );
    let http = reqwest::Client::new();
    let resp = push_api::push(
        &http,
        setup.gateway.internal_addr(),
        API_KEY,
        "proxied-1",
        &serde_json::json!({"via": "proxy"}),
    )
    .await;
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(within(pushes.recv()).await.unwrap()["via"], "proxy");
    assert_eq!(proxy.tunnels(), 1);
    assert_eq!(
        proxy.targets(),
        vec![format!("gateway.test:{}", front.port)]
    );
    agent.close().await;
}

#[tokio::test]
async fn a_proxy_refusing_the_credentials_stops_the_agent_with_its_status_line() {
    let setup = gateway().await;
    let pki = Pki::new();
    let front = tls_front(
        setup.gateway.public_addr(),
        pki.server_config(&["gateway.test"], false, false),
    )
    .await;
    let proxy = ConnectProxy::start(Some("proxy-user:right")).await;
    for proxy_url in [
        format!("http://proxy-user:wrong@{}", proxy.addr),
        format!("http://{}", proxy.addr),
    ] {
        let agent = agent(
            format!("wss://gateway.test:{}/v1/connect", front.port),
            "proxied-2",
            fast(extra_ca(&pki), Proxy::Url(proxy_url)),
        );
        let reason = stop_reason(&agent).await;
        let text = reason.to_string();
        assert!(
            matches!(reason, StopReason::ProxyRejected { status: 407, .. })
                && text.contains("HTTP/1.1 407 Proxy Authentication Required")
                && text.contains(&proxy.addr.to_string()),
            "{text}"
        );
    }
    assert_eq!(proxy.refused(), 2, "one attempt each");
    assert_eq!(proxy.tunnels(), 0);
    assert_eq!(front.accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_proxy_that_cannot_reach_the_gateway_is_retried_with_its_status_line() {
    let pki = Pki::new();
    let proxy = ConnectProxy::start(None).await;
    // Nothing listens on port 1: the proxy answers 502, a moment that may pass.
    let agent = agent(
        "wss://127.0.0.1:1/v1/connect".into(),
        "proxied-3",
        fast(extra_ca(&pki), Proxy::Url(format!("http://{}", proxy.addr))),
    );
    let mut state = agent.state();
    within(state.wait_for(|s| matches!(s, State::Waiting { .. })))
        .await
        .unwrap();
    within(async {
        while proxy.targets().len() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(matches!(
        *agent.state().borrow(),
        State::Connecting { .. } | State::Waiting { .. }
    ));
    agent.close().await;
}

// === the CLI: the proxy and CA environment ===

struct CliRun {
    code: Option<i32>,
    stderr: String,
}

/// Runs `tether-agent connect` with a clean proxy/TLS environment plus `env`, until it
/// prints `connected as` (then it is stopped) or exits.
async fn cli(setup: &Setup, url: &str, args: &[&str], env: &[(&str, String)]) -> CliRun {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether-agent"));
    command
        .arg("connect")
        .args([
            "--url",
            url,
            "--agent-id",
            "cli-agent",
            "--hs256-secret-file",
        ])
        .arg(secret_file(setup.dir.path()))
        .args(args);
    for name in [
        "RUST_LOG",
        "TETHER_URL",
        "TETHER_TOKEN",
        "TETHER_CA_FILE",
        "TETHER_PROXY",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        command.env_remove(name);
    }
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stderr = String::new();
    within(async {
        while let Ok(Some(line)) = lines.next_line().await {
            stderr.push_str(&line);
            stderr.push('\n');
            if line.contains("connected as") {
                break;
            }
        }
    })
    .await;
    let code = if stderr.contains("connected as") {
        let _ = child.kill().await;
        None
    } else {
        within(child.wait()).await.unwrap().code()
    };
    CliRun { code, stderr }
}

#[tokio::test]
async fn cli_honours_https_proxy_no_proxy_the_proxy_flag_and_ssl_cert_file() {
    let setup = gateway().await;
    let pki = Pki::new();
    let front = tls_front(
        setup.gateway.public_addr(),
        pki.server_config(&["gateway.test", "localhost"], false, false),
    )
    .await;
    let proxy = ConnectProxy::start(Some("u:p")).await;
    let ca = pki.ca_file().display().to_string();
    let via_name = format!("wss://gateway.test:{}/v1/connect", front.port);
    let via_localhost = format!("wss://localhost:{}/v1/connect", front.port);
    let good_proxy = format!("http://u:p@{}", proxy.addr);
    let dead_proxy = "http://127.0.0.1:1".to_owned();

    // HTTPS_PROXY: `gateway.test` resolves only inside the proxy.
    let run = cli(
        &setup,
        &via_name,
        &["--ca-file", &ca],
        &[("HTTPS_PROXY", good_proxy.clone())],
    )
    .await;
    assert!(
        run.stderr.contains("connected as cli-agent"),
        "{}",
        run.stderr
    );
    assert_eq!(proxy.tunnels(), 1);

    // HTTP_PROXY is for ws:// only: a wss:// URL ignores it and connects directly.
    let run = cli(
        &setup,
        &via_localhost,
        &["--ca-file", &ca],
        &[("HTTP_PROXY", dead_proxy.clone())],
    )
    .await;
    assert!(run.stderr.contains("connected as"), "{}", run.stderr);

    // NO_PROXY exempts the host: the dead proxy is never asked.
    let run = cli(
        &setup,
        &via_localhost,
        &["--ca-file", &ca],
        &[
            ("HTTPS_PROXY", dead_proxy.clone()),
            ("NO_PROXY", "example.org,localhost".into()),
        ],
    )
    .await;
    assert!(run.stderr.contains("connected as"), "{}", run.stderr);

    // --proxy overrides the environment.
    let run = cli(
        &setup,
        &via_name,
        &["--ca-file", &ca, "--proxy", &good_proxy],
        &[
            ("HTTPS_PROXY", dead_proxy.clone()),
            ("NO_PROXY", "*".into()),
        ],
    )
    .await;
    assert!(run.stderr.contains("connected as"), "{}", run.stderr);
    assert_eq!(proxy.tunnels(), 2);

    // --direct ignores HTTPS_PROXY.
    let run = cli(
        &setup,
        &via_localhost,
        &["--ca-file", &ca, "--direct"],
        &[("HTTPS_PROXY", dead_proxy.clone())],
    )
    .await;
    assert!(run.stderr.contains("connected as"), "{}", run.stderr);

    // The system roots honour SSL_CERT_FILE: no --ca-file needed.
    let run = cli(
        &setup,
        &via_localhost,
        &[],
        &[("SSL_CERT_FILE", ca.clone())],
    )
    .await;
    assert!(run.stderr.contains("connected as"), "{}", run.stderr);
    assert_eq!(proxy.tunnels(), 2);

    // HTTP_PROXY carries ws:// (a CONNECT tunnel too); HTTPS_PROXY is not used for it.
    let plain = format!(
        "ws://gateway.test:{}/v1/connect",
        setup.gateway.public_addr().port()
    );
    let run = cli(
        &setup,
        &plain,
        &[],
        &[
            ("HTTP_PROXY", good_proxy.clone()),
            ("HTTPS_PROXY", dead_proxy.clone()),
        ],
    )
    .await;
    assert!(run.stderr.contains("connected as"), "{}", run.stderr);
    assert_eq!(proxy.tunnels(), 3);

    // Trusting another CA: a non-zero exit with the certificate error, no retry loop.
    let other = Pki::new();
    let other_ca = other.ca_file().display().to_string();
    let before = front.accepted.load(Ordering::SeqCst);
    let run = cli(&setup, &via_localhost, &["--ca-file", &other_ca], &[]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("TLS") && run.stderr.contains("UnknownIssuer"),
        "{}",
        run.stderr
    );
    assert_eq!(front.accepted.load(Ordering::SeqCst), before + 1);

    // A wrong proxy password: a non-zero exit with the proxy's status line.
    let run = cli(
        &setup,
        &via_name,
        &["--ca-file", &ca],
        &[("HTTPS_PROXY", format!("http://u:wrong@{}", proxy.addr))],
    )
    .await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("407 Proxy Authentication Required"),
        "{}",
        run.stderr
    );
}
