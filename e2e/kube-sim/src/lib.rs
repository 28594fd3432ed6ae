//! `tether-kube-sim`: an in-memory Kubernetes API server stand-in for tests.
//!
//! No real kube-apiserver can run where Tether's tests run, so this crate serves the parts
//! of the Kubernetes API the operator, the gateways and kubectl use, over real HTTP on
//! 127.0.0.1, following the real server's documented semantics (see `docs/testing.md` for
//! what is and is not implemented).
//!
//! ```text
//!             kube::Client / kubectl
//!                     │ HTTP (JSON, watch streams)
//!   ┌─────────────────▼───────────────────────────────────────────┐
//!   │ http      routing, query params, content types, Table, faults│
//!   │   └ protobuf  kubectl's protobuf bodies (k8s-pb) → JSON      │
//!   │ discovery /api /apis /version /openapi/v3 (legacy+aggregated)│
//!   │ watch     selector-aware event streams, bookmarks, 410       │
//!   │ stats     API accounting: requests, watch events and bytes   │
//!   ├──────────────────────────────────────────────────────────────┤
//!   │ store     objects indexed by type/namespace/name and labels, │
//!   │           global resourceVersion, bounded event log, watcher │
//!   │           buckets, write pipeline (status/scale isolation,   │
//!   │           finalizers, Secret stringData)                     │
//!   │   ├ ssa       managedFields, conflicts, list-map merging     │
//!   │   ├ patch     JSON / merge / strategic-merge patch           │
//!   │   ├ schema    CRD pruning, defaulting, validation (+ cel)    │
//!   │   ├ events    core/v1 ⇄ events.k8s.io/v1 Event (one storage) │
//!   │   └ registry  built-in kinds + CRD-registered kinds          │
//!   │ gc        ownerReference garbage collection, namespace       │
//!   │           cleanup, driven by a queue of what writes concern  │
//!   └──────────────────────────────────────────────────────────────┘
//! ```
//!
//! Start it in one line and get a client:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let sim = tether_kube_sim::Server::start().await?;
//! let client: kube::Client = sim.client()?;
//! sim.write_kubeconfig("/tmp/kubeconfig")?; // for kubectl or a child process
//! sim.faults().fail_next(1, tether_kube_sim::FaultMatch::verb("patch"), 500);
//! # Ok(()) }
//! ```

// ApiError carries a full metav1.Status (message, details, causes); it travels only on
// error paths of a test server, so its size is not worth boxing for.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod builtin;
pub mod cel;
pub mod discovery;
pub mod error;
pub mod events;
pub mod faults;
pub mod gc;
pub mod http;
pub mod patch;
pub mod protobuf;
pub mod quota;
pub mod registry;
pub mod schema;
pub mod selector;
pub mod ssa;
pub mod stats;
pub mod store;
pub mod table;
pub mod watch;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub use error::ApiError;
pub use faults::{FaultMatch, FaultRule, Faults};
pub use stats::{Snapshot, Stats};
pub use store::Store;

/// Errors starting or using the server handle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding the listener failed.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing the kubeconfig failed.
    #[error("writing kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Building a kube client failed.
    #[error("building kube client: {0}")]
    Client(#[from] kube::Error),
}

/// Options of a [`Server`].
#[derive(Debug, Clone)]
pub struct Builder {
    port: u16,
    history: usize,
    bookmark_interval: Duration,
    watch_buffer: usize,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            port: 0,
            history: 10_000,
            bookmark_interval: Duration::from_secs(5),
            watch_buffer: store::DEFAULT_WATCH_BUFFER,
        }
    }
}

// === impl Builder ===

impl Builder {
    /// Port on 127.0.0.1 (0: any free port, the default).
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// Events kept per resource type; a watch from before the oldest gets 410 Gone.
    pub fn history(mut self, events: usize) -> Self {
        self.history = events;
        self
    }

    /// How often watches that allow bookmarks get one (default 5 s).
    pub fn bookmark_interval(mut self, d: Duration) -> Self {
        self.bookmark_interval = d;
        self
    }

    /// Events a watch may have waiting for its client (written by the store, not yet
    /// taken by the connection, whose buffers are full) before the stand-in closes it, as
    /// the real watch cache closes a watcher whose buffer stays full (default 10,000).
    pub fn watch_buffer(mut self, events: usize) -> Self {
        self.watch_buffer = events;
        self
    }

    /// Binds and starts serving.
    pub async fn start(self) -> Result<Server, Error> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr, source })?;
        let store = Arc::new(Store::new(self.history));
        store.set_watch_buffer(self.watch_buffer);
        let faults = Faults::new(store.clone());
        let tokens = Arc::new(auth::Tokens::default());
        let state = Arc::new(http::AppState {
            store: store.clone(),
            faults: faults.clone(),
            addr: addr.to_string(),
            bookmark_interval: self.bookmark_interval,
            tokens: tokens.clone(),
        });
        let app = http::app(state);
        let serve = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(%e, "kube-sim server stopped");
            }
        });
        let gc = tokio::spawn(gc::run(store.clone()));
        Ok(Server {
            addr,
            store,
            faults,
            tokens,
            tasks: vec![serve, gc],
        })
    }
}

/// A running stand-in. Dropping it stops the server.
pub struct Server {
    addr: SocketAddr,
    store: Arc<Store>,
    faults: Faults,
    tokens: Arc<auth::Tokens>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

// === impl Server ===

impl Server {
    /// Starts a server on a free loopback port with default options.
    pub async fn start() -> Result<Server, Error> {
        Builder::default().start().await
    }

    /// Options for a server.
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for this server (default namespace `default`).
    pub fn client(&self) -> Result<kube::Client, Error> {
        let uri: ::http::Uri = self.url().parse().expect("valid url");
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".into();
        Ok(kube::Client::try_from(config)?)
    }

    /// A kubeconfig (YAML) pointing at this server, context `kube-sim`, namespace `default`.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {}\ncontexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: default\ncurrent-context: kube-sim\nusers:\n- name: kube-sim\n  user: {{}}\n",
            self.url()
        )
    }

    /// Writes [`Server::kubeconfig`] to `path`.
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let p = path.as_ref();
        std::fs::write(p, self.kubeconfig()).map_err(|source| Error::Kubeconfig {
            path: p.display().to_string(),
            source,
        })
    }

    /// A token for service account `name` in `ns` (which must exist), valid for an hour:
    /// what a TokenRequest (`kubectl create token`) returns. Requests carrying it are
    /// that service account's, subject to RBAC.
    pub fn token(&self, ns: &str, name: &str) -> Result<String, ApiError> {
        let aud = ["https://kubernetes.default.svc.cluster.local".to_string()];
        self.tokens
            .issue(&self.store, ns, name, &aud, 3600)
            .map(|(t, _)| t)
    }

    /// A kubeconfig like [`Server::kubeconfig`] whose user carries `token`.
    pub fn kubeconfig_with_token(&self, token: &str) -> String {
        kubeconfig_for(&self.url(), token)
    }

    /// A client authenticated with `token` (default namespace `default`).
    pub fn client_with_token(&self, token: &str) -> Result<kube::Client, Error> {
        let uri: ::http::Uri = self.url().parse().expect("valid url");
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".into();
        config.auth_info.token = Some(token.to_string().into());
        Ok(kube::Client::try_from(config)?)
    }

    /// Fault injection.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The object store (direct access: resourceVersion, history size, compaction).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// API accounting: `sim.stats().snapshot()` (also `GET /_sim/stats`), `reset()`
    /// (`DELETE /_sim/stats`), and `Snapshot::since` for the difference of two snapshots.
    pub fn stats(&self) -> &Stats {
        self.store.stats()
    }

    /// Waits until the garbage collector has handled every write so far (at most 10 s),
    /// so that counts read next include its work.
    pub async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.store.gc_pending() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A kubeconfig for the stand-in at `url` whose user carries `token` (context
/// `kube-sim`, namespace `default`).
pub fn kubeconfig_for(url: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {url}\ncontexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: default\ncurrent-context: kube-sim\nusers:\n- name: kube-sim\n  user:\n    token: {token}\n"
    )
}

impl Drop for Server {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.store.drop_watches();
    }
}
