//! TLS on the public port, terminated by the gateway (instead of a load balancer).
//!
//! ```text
//!  accept ──(pending slot)──> peek: TLS record? ──no──> plain-text 400 "this port speaks TLS", close
//!                                 │ yes
//!                                 └─> rustls handshake (deadline) ──> hyper http1 ──> /v1/connect
//!  every reloadIntervalMs: read certFile + keyFile ──changed & valid──> swap the certificate
//!                                                  └─ invalid ──> keep the previous one, warn, count
//! ```
//!
//! The certificate lives in a [`CertStore`] that the rustls config asks on every
//! handshake, so a swap reaches new connections only; open ones keep the session they
//! negotiated. Files are compared by content, which follows a kubelet's `..data`
//! symlink swap and tolerates a half-written pair (a key that does not match its
//! certificate is refused until both files agree).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tether_config::TlsConfig;
use tracing::{info, warn};

/// Why a certificate/key pair could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The files do not hold a usable certificate chain and key.
    #[error("{0}")]
    Invalid(String),
}

/// The current certificate of the public port, swapped on reload.
#[derive(Debug)]
pub struct CertStore {
    config: TlsConfig,
    current: RwLock<Arc<CertifiedKey>>,
    /// Contents of the last pair tried (good or bad), so an unchanged bad pair is
    /// reported once, not every interval.
    last_seen: Mutex<(Vec<u8>, Vec<u8>)>,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

impl CertStore {
    /// Loads the pair named by `config`; an unusable pair is an error (the gateway
    /// does not start without a certificate).
    pub fn load(config: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let (cert, key) = read_pair(config)?;
        let certified = certified_key(&cert, &key, config)?;
        Ok(Arc::new(Self {
            config: config.clone(),
            current: RwLock::new(Arc::new(certified)),
            last_seen: Mutex::new((cert, key)),
            reloads: AtomicU64::new(0),
            reload_failures: AtomicU64::new(0),
        }))
    }

    /// Reads the files again; a changed, valid pair becomes the certificate for new
    /// handshakes. Returns whether the certificate changed; an error leaves the previous
    /// certificate in place.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (cert, key) = read_pair(&self.config).inspect_err(|_| {
            self.reload_failures.fetch_add(1, Ordering::Relaxed);
        })?;
        {
            let mut seen = self.last_seen.lock();
            if seen.0 == cert && seen.1 == key {
                return Ok(false);
            }
            *seen = (cert.clone(), key.clone());
        }
        match certified_key(&cert, &key, &self.config) {
            Ok(certified) => {
                *self.current.write() = Arc::new(certified);
                self.reloads.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                self.reload_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Certificates taken from changed files since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Changed files that were refused (the previous certificate stayed).
    pub fn reload_failures(&self) -> u64 {
        self.reload_failures.load(Ordering::Relaxed)
    }

    /// The rustls server configuration that asks this store on every handshake.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        // WebSocket over HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// The reload interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.config.reload_interval_ms)
    }

    /// The handshake deadline.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.config.handshake_timeout_ms)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// Reloads `store` every interval until aborted, logging and counting
/// (`tether.tls.reloads` by result) what happens.
pub async fn reload_loop(store: Arc<CertStore>) {
    let meter = opentelemetry::global::meter("tether-gateway");
    let counter = meter
        .u64_counter("tether.tls.reloads")
        .with_description("Certificate reloads of the public port by result")
        .build();
    let mut tick = tokio::time::interval(store.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match store.reload() {
            Ok(false) => {}
            Ok(true) => {
                info!(cert = %store.config.cert_file.display(), "TLS certificate reloaded");
                counter.add(1, &crate::metrics::label("result", "ok"));
            }
            Err(e) => {
                warn!(%e, "keeping the previous TLS certificate");
                counter.add(1, &crate::metrics::label("result", "error"));
            }
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn read_pair(config: &TlsConfig) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    Ok((read(&config.cert_file)?, read(&config.key_file)?))
}

fn certified_key(cert: &[u8], key: &[u8], config: &TlsConfig) -> Result<CertifiedKey, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError::Invalid(format!(
                "{}: not a PEM certificate chain: {e}",
                config.cert_file.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TlsError::Invalid(format!(
            "{}: no certificate in the file",
            config.cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        TlsError::Invalid(format!(
            "{}: not a PEM private key: {e}",
            config.key_file.display()
        ))
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
        TlsError::Invalid(format!(
            "{} and {}: {e}",
            config.cert_file.display(),
            config.key_file.display()
        ))
    })?;
    Ok(certified)
}

/// What a new public-port connection turned out to be.
pub enum Accepted {
    /// A finished TLS handshake.
    Tls(Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>),
    /// Closed: not TLS (answered with a plain-text 400), a failed handshake, or the
    /// deadline passed. The label is the `tether.handshakes` result.
    Refused(&'static str),
}

/// The first byte of a TLS record carrying a handshake message (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Plain HTTP sent to the TLS port gets this (like nginx's "plain HTTP request was sent
/// to HTTPS port"), so a `ws://` client reports a status line rather than a reset.
const NOT_TLS_RESPONSE: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
content-type: text/plain\r\ncontent-length: 54\r\n\r\n\
this port speaks TLS: connect with wss:// or https://\n";

/// Runs the TLS handshake of one accepted connection within the store's deadline.
pub async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    timeout: Duration,
    stream: tokio::net::TcpStream,
) -> Accepted {
    let work = async {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => {}
            Ok(1) => {
                use tokio::io::AsyncWriteExt as _;
                let mut stream = stream;
                let _ = stream.write_all(NOT_TLS_RESPONSE).await;
                let _ = stream.shutdown().await;
                return Accepted::Refused("not_tls");
            }
            _ => return Accepted::Refused("tls_failed"),
        }
        match acceptor.accept(stream).await {
            Ok(tls) => Accepted::Tls(Box::new(tls)),
            Err(e) => {
                tracing::debug!(%e, "TLS handshake failed");
                Accepted::Refused("tls_failed")
            }
        }
    };
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or(Accepted::Refused("tls_timeout"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_tls_response_has_its_declared_length() {
        let text = std::str::from_utf8(NOT_TLS_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
    }
}
