//! A real `nats-server -js` for tests: on a free loopback port, its store in a temp
//! dir, killed on drop. Fault tests kill it and start it again on the same port.

use std::process::{Child, Command, Stdio};

use crate::poll::{PATIENCE, eventually};
use crate::process::{free_port, nats_server_binary};

/// A `nats-server -js` on 127.0.0.1.
pub struct NatsServer {
    /// Its client port.
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
    /// Extra command-line arguments (auth settings).
    args: Vec<String>,
}

impl NatsServer {
    /// A server with JetStream, listening once this returns.
    pub async fn start() -> Self {
        Self::start_with_args(&[]).await
    }

    /// A server with extra arguments, e.g. `--user u --pass p` to require credentials.
    pub async fn start_with_args(args: &[&str]) -> Self {
        let mut server = Self::not_started();
        server.args = args.iter().map(ToString::to_string).collect();
        server.spawn().await;
        server
    }

    /// A free port and a store with no server on them yet ([`NatsServer::restart`]
    /// starts it): for what must start before its NATS.
    pub fn not_started() -> Self {
        Self {
            port: free_port(),
            store: tempfile::tempdir().expect("a temp dir for the NATS store"),
            child: None,
            args: Vec::new(),
        }
    }

    /// Its client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) {
        let binary = nats_server_binary().unwrap_or_else(|e| panic!("{e}"));
        let child = Command::new(binary)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(self.store.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let port = self.port;
        eventually("nats-server to listen", PATIENCE, || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(drop)
        })
        .await;
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port; `wipe` loses everything JetStream stored.
    pub async fn restart(&mut self, wipe: bool) {
        self.kill();
        if wipe {
            self.store = tempfile::tempdir().expect("a temp dir for the NATS store");
        }
        self.spawn().await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
