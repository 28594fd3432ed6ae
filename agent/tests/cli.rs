//! The `tether-agent` CLI as a user runs it, against a real gateway on 127.0.0.1: its
//! output lines are the protocol's envelopes (docs/protocol.md), a permanent refusal
//! ends it with the gateway's reason and a non-zero exit, a retryable one is explained
//! at the default log level, and a one-shot send with nothing upstream fails at once.

mod common;

use common::{API_KEY, SECRET, gateway_config, secret_file};

use std::process::Stdio;
use std::time::Duration;

use tether_gateway::Gateway;
use tether_protocol::GatewayMessage;
use tether_test_support::push_api;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

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

/// The CLI with the default log level (no `RUST_LOG`), stdout and stderr piped.
fn cli(setup: &Setup, url: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .arg("connect")
        .args([
            "--url",
            url,
            "--agent-id",
            "cli-agent",
            "--hs256-secret-file",
        ])
        .arg(secret_file(setup.dir.path()))
        .args(extra)
        .env_remove("RUST_LOG")
        .env_remove("TETHER_URL")
        .env_remove("TETHER_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the CLI starts")
}

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .expect("step timed out")
}

/// Waits for the CLI to exit; returns its exit code and its stderr.
async fn finished(child: Child) -> (Option<i32>, String) {
    let output = within(child.wait_with_output()).await.unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Reads stderr lines until one contains `needle`.
async fn stderr_line_with(child: &mut Child, needle: &str) -> String {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    within(async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(needle) {
                return line;
            }
        }
        panic!("stderr ended without a line containing {needle:?}")
    })
    .await
}

#[tokio::test]
async fn a_push_prints_as_the_protocols_push_envelope() {
    let setup = gateway().await;
    let url = format!("ws://{}/v1/connect", setup.gateway.public_addr());
    let mut child = cli(&setup, &url, &[]);
    let http = reqwest::Client::new();
    let internal = setup.gateway.internal_addr();
    // Pushes answer 404 until the agent is connected.
    tether_test_support::eventually("the CLI agent to connect", Duration::from_secs(20), || {
        let http = http.clone();
        async move {
            let resp = push_api::push(
                &http,
                internal,
                API_KEY,
                "cli-agent",
                &serde_json::json!({"hello": "agent"}),
            )
            .await;
            (resp.status().as_u16() == 202).then_some(())
        }
    })
    .await;
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    // The session's `welcome` line comes first.
    let welcome = within(stdout.next_line()).await.unwrap().expect("a line");
    let welcome: serde_json::Value = serde_json::from_str(&welcome).unwrap();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["agent_id"], "cli-agent", "{welcome}");
    let line = within(stdout.next_line()).await.unwrap().expect("a line");
    // The documented shape is the protocol's envelope: it decodes as one.
    match GatewayMessage::decode(&line) {
        Ok(GatewayMessage::Push { data, .. }) => {
            assert_eq!(data.get(), r#"{"hello":"agent"}"#, "{line}")
        }
        other => panic!("{line} is not a push envelope: {other:?}"),
    }
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(value["type"], "push");
    child.kill().await.unwrap();
    setup.gateway.drain();
    within(setup.gateway.wait()).await;
}

#[tokio::test]
async fn a_wrong_path_exits_non_zero_with_the_gateways_reason() {
    let setup = gateway().await;
    let url = format!("ws://{}/v1/connnect", setup.gateway.public_addr());
    let (code, stderr) = finished(cli(&setup, &url, &[])).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "the gateway refused the connection with HTTP 404: agents connect at GET /v1/connect"
        ),
        "{stderr}"
    );
    setup.gateway.drain();
    within(setup.gateway.wait()).await;
}

#[tokio::test]
async fn an_http_url_exits_non_zero_before_connecting() {
    let setup = gateway().await;
    let url = format!("http://{}/v1/connect", setup.gateway.public_addr());
    let (code, stderr) = finished(cli(&setup, &url, &[])).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("the scheme must be ws:// or wss:// (got http://)"),
        "{stderr}"
    );
    setup.gateway.drain();
    within(setup.gateway.wait()).await;
}

#[tokio::test]
async fn send_and_exit_with_nothing_upstream_fails_fast_with_the_reason() {
    let setup = gateway().await;
    let url = format!("ws://{}/v1/connect", setup.gateway.public_addr());
    let child = cli(
        &setup,
        &url,
        &["--send", r#"{"event":"hello"}"#, "--exit-after-send"],
    );
    let (code, stderr) = finished(child).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("no upstream receives agent messages"),
        "{stderr}"
    );
    setup.gateway.drain();
    within(setup.gateway.wait()).await;
}

#[tokio::test]
async fn an_unreachable_gateway_is_explained_at_the_default_level() {
    let setup = gateway().await;
    // A port nothing listens on: retryable (the gateway may be starting), and said.
    let port = tether_test_support::free_port();
    let url = format!("ws://127.0.0.1:{port}/v1/connect");
    let mut child = cli(&setup, &url, &[]);
    let line = stderr_line_with(&mut child, "reconnecting").await;
    assert!(
        line.contains("could not reach the gateway") && line.contains("refused"),
        "{line}"
    );
    child.kill().await.unwrap();
    setup.gateway.drain();
    within(setup.gateway.wait()).await;
}

#[tokio::test]
async fn the_secret_is_taken_as_a_file_or_a_value_alike() {
    let setup = gateway().await;
    let mint = |how: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether-agent"))
            .arg("token")
            .args(how)
            .args(["--agent-id", "a1"])
            .env_remove("TETHER_HS256_SECRET")
            .env_remove("TETHER_HS256_SECRET_FILE")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    };
    let file = secret_file(setup.dir.path());
    for token in [
        mint(&["--hs256-secret-file", file.to_str().unwrap()]),
        mint(&["--hs256-secret", SECRET]),
    ] {
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<serde_json::Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
            &validation,
        )
        .expect("signed with the gateway's secret");
        assert_eq!(claims.claims["sub"], "a1");
    }
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether-agent"))
        .args(["token", "--agent-id", "a1"])
        .env_remove("TETHER_HS256_SECRET")
        .env_remove("TETHER_HS256_SECRET_FILE")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("give --token, --token-file, --hs256-secret-file or --hs256-secret"),
        "{output:?}"
    );
    setup.gateway.drain();
    within(setup.gateway.wait()).await;
}
