//! `tether-gateway --dev` as a newcomer runs it: it says where its JWT secret is, keeps
//! its keys in a private directory (0700, files 0600) and removes it on exit, and
//! refuses to be combined with `--config`.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

async fn within<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), fut)
        .await
        .expect("step timed out")
}

#[tokio::test]
async fn dev_mode_prints_its_secret_file_keeps_it_private_and_removes_it_on_exit() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .args([
            "--dev",
            "--public-addr",
            "127.0.0.1:0",
            "--internal-addr",
            "127.0.0.1:0",
        ])
        .env_remove("TETHER_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the gateway starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let secret: PathBuf = within(async {
        let mut heading = false;
        while let Some(line) = lines.next_line().await.unwrap() {
            if heading {
                return PathBuf::from(line.trim());
            }
            heading = line.starts_with("JWT secret (HS256) for more agents");
        }
        panic!("dev mode printed no secret file")
    })
    .await;
    let printed: Vec<String> = within(async {
        let mut rest = Vec::new();
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("curl") {
                break;
            }
            rest.push(line);
        }
        rest
    })
    .await;
    assert!(
        printed
            .iter()
            .any(|l| l.contains(&format!("--hs256-secret-file {}", secret.display()))),
        "the command for a second agent names the file: {printed:?}"
    );
    let dir = secret.parent().unwrap().to_owned();
    let mode = |p: &PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    assert_eq!(mode(&secret), 0o600);
    assert_eq!(mode(&dir.join("api-keys")), 0o600);
    assert_eq!(
        std::fs::read(&secret).unwrap().len(),
        64,
        "32 random bytes, hex"
    );

    // SIGTERM: the gateway drains (no agents), exits, and takes its keys with it.
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = within(child.wait()).await.unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

#[tokio::test]
async fn dev_mode_refuses_a_config_file() {
    let output = Command::new(env!("CARGO_BIN_EXE_tether-gateway"))
        .args(["--dev", "--config", "/nonexistent/gateway.yaml"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the argument '--dev' cannot be used with '--config <CONFIG>'"),
        "{stderr}"
    );
}
