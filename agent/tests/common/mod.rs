//! What every suite here needs to run the SDK against a real gateway: the HS256 secret
//! agents sign with, the API key backends push with, and a gateway config that reads
//! both from files (as a pod reads them from its Secret).

// Each suite compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use tether_config::GatewayConfig;

/// The HS256 secret agents' tokens are signed with.
pub const SECRET: &str = "integration-secret-of-at-least-32-bytes";
/// The push API's key (the gateway refuses keys shorter than 16 bytes).
pub const API_KEY: &str = "integration-key-0123456789";

/// Where [`gateway_config`] wrote the HS256 secret in `dir` (for the CLI's
/// `--hs256-secret-file`).
pub fn secret_file(dir: &Path) -> PathBuf {
    dir.join("jwt-secret")
}

/// Writes [`SECRET`] and [`API_KEY`] into `dir` and returns a gateway config that reads
/// them: both ports on free loopback ports, drains without jitter within 5 s. Suites
/// change what they test on top of it.
pub fn gateway_config(dir: &Path) -> GatewayConfig {
    let keys = dir.join("api-keys");
    std::fs::write(secret_file(dir), SECRET).unwrap();
    std::fs::write(&keys, format!("{API_KEY}\n")).unwrap();
    let mut config = GatewayConfig::default();
    config.listen.public = "127.0.0.1:0".into();
    config.listen.internal = "127.0.0.1:0".into();
    config.auth.jwt.hs256_secret_file = Some(secret_file(dir));
    config.auth.api_keys_file = Some(keys);
    config.drain.reconnect_jitter_ms = 0;
    config.drain.deadline_seconds = 5;
    config
}
