//! How a pod proves itself to NATS: user/password, token, NKey seed or a `.creds` file
//! (each read from a mounted Secret file), and TLS with the pool's CA and an optional
//! client certificate.
//!
//! Anything that can publish on a pool's subjects can push to or disconnect any of its
//! agents, so a production bus requires credentials; docs/security.md has the threat
//! model.

use std::path::Path;

use async_nats::ConnectOptions;
use tether_config::NatsConfig;

use super::router::NatsError;

fn secret(path: &Path) -> Result<String, NatsError> {
    let text = std::fs::read_to_string(path).map_err(|e| NatsError::Credentials {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let text = text.trim().to_owned();
    if text.is_empty() {
        return Err(NatsError::Credentials {
            path: path.to_owned(),
            message: "empty".into(),
        });
    }
    Ok(text)
}

/// Applies the configured credentials and TLS to `options`.
pub async fn apply(
    mut options: ConnectOptions,
    config: &NatsConfig,
) -> Result<ConnectOptions, NatsError> {
    let auth = &config.auth;
    if let (Some(user), Some(path)) = (&auth.user, &auth.password_file) {
        options = options.user_and_password(user.clone(), secret(path)?);
    }
    if let Some(path) = &auth.token_file {
        options = options.token(secret(path)?);
    }
    if let Some(path) = &auth.nkey_seed_file {
        options = options.nkey(secret(path)?);
    }
    if let Some(path) = &auth.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| NatsError::Credentials {
                path: path.clone(),
                message: e.to_string(),
            })?;
    }
    let tls_url = config
        .url
        .split(',')
        .any(|u| u.trim().starts_with("tls://"));
    if let Some(tls) = &config.tls {
        options = options.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    } else if tls_url {
        options = options.require_tls(true);
    }
    Ok(options)
}
