//! The pool's client Service on this machine: a TCP proxy on one stable loopback address
//! that sends each NEW connection to a Ready pod, as kube-proxy does for a ClusterIP.
//!
//! ```text
//!   agents / tether-bench ──► 127.0.0.1:<port> (ServiceProxy, accept loop)
//!                                   │  pick: RoundRobin over the Ready backends now
//!                                   │  (the kubelet's endpoints, read on every accept)
//!                                   ├──► gateway pod 0 (public port)   copy both ways
//!                                   └──► gateway pod 2                  until either ends
//! ```
//!
//! - Selection is a pure function ([`RoundRobin::pick`]) over a snapshot of backends, so
//!   its rules — only Ready pods, an even spread, following pods as they come and go —
//!   are unit-tested without sockets.
//! - Existing connections stay where they are when endpoints change (kube-proxy leaves
//!   established conntrack entries alone): a pod that turns unready (draining or
//!   shedding: the gateway's `/readyz` is false then) keeps its sockets until it closes
//!   them itself with a `reconnect` hint, and the agents' reconnects land elsewhere.
//! - Like the userspace kube-proxy, a backend that refuses the TCP connect (its process
//!   just exited, before the kubelet's next probe) is skipped and the next Ready one
//!   tried; iptables mode would hand the client a reset instead, which a client survives
//!   anyway.
//! - The [`Conntrack`] table records which pod each open client connection went to, so
//!   tests (and the closed loop's spread check) can count connections per pod from the
//!   Service's side, as `conntrack -L` would.
//!
//! One proxied connection costs this process two file descriptors (client and upstream):
//! with the ~20,000 per-process limit here, one proxy holds at most ~9,500 connections.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info, warn};

use crate::tokio_util_free::Stop;

/// One endpoint of the Service: a pod's public address and whether it is Ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Pod name.
    pub pod: String,
    /// The pod's public (WebSocket) address.
    pub addr: SocketAddr,
    /// Passes its readiness probe (false while draining or shedding).
    pub ready: bool,
}

/// Round-robin over Ready backends, as kube-proxy's IPVS `rr` scheduler does.
///
/// The cursor is the last pod picked, not an index: when pods come and go the next pick
/// is the first Ready pod after it in name order, so a new pod joins the rotation at
/// once and a removed one never shifts the others' turns (an index would skip or repeat
/// pods whenever the list changes length).
#[derive(Debug, Default, Clone)]
pub struct RoundRobin {
    last: Option<String>,
}

// === impl RoundRobin ===

impl RoundRobin {
    /// The backend for the next new connection: the first Ready backend after the last
    /// pick in name order (wrapping around), or `None` when no backend is Ready.
    pub fn pick<'a>(&mut self, backends: &'a [Backend]) -> Option<&'a Backend> {
        let mut ready: Vec<&Backend> = backends.iter().filter(|b| b.ready).collect();
        ready.sort_by(|a, b| a.pod.cmp(&b.pod));
        let next = match &self.last {
            Some(last) => ready
                .iter()
                .find(|b| b.pod.as_str() > last.as_str())
                .or_else(|| ready.first()),
            None => ready.first(),
        }
        .copied()?;
        self.last = Some(next.pod.clone());
        Some(next)
    }

    /// The Ready backends in the order they will be tried for one connection: the pick
    /// first, then the rest of the rotation (used when a backend refuses the connect).
    pub fn attempts(&mut self, backends: &[Backend]) -> Vec<Backend> {
        let ready = backends.iter().filter(|b| b.ready).count();
        let mut out: Vec<Backend> = Vec::with_capacity(ready);
        let mut probe = self.clone();
        for _ in 0..ready {
            match probe.pick(backends) {
                Some(b) if !out.iter().any(|o| o.pod == b.pod) => out.push(b.clone()),
                _ => break,
            }
        }
        // Only the first attempt advances the shared rotation; fallbacks do not, so a
        // refused connect does not make the next client skip a healthy pod.
        if let Some(first) = out.first() {
            self.last = Some(first.pod.clone());
        }
        out
    }
}

/// Open proxied connections: client address → pod (kube-proxy's conntrack entries).
#[derive(Debug, Default)]
pub struct Conntrack {
    open: BTreeMap<SocketAddr, String>,
    /// Connections sent to each pod since the start (closed ones included).
    total: BTreeMap<String, u64>,
}

// === impl Conntrack ===

impl Conntrack {
    /// Records a new connection from `client` to `pod`.
    pub fn open(&mut self, client: SocketAddr, pod: &str) {
        self.open.insert(client, pod.to_string());
        *self.total.entry(pod.to_string()).or_default() += 1;
    }

    /// Forgets the connection from `client`.
    pub fn close(&mut self, client: SocketAddr) {
        self.open.remove(&client);
    }

    /// The pod the open connection from `client` goes to.
    pub fn pod_of(&self, client: SocketAddr) -> Option<&str> {
        self.open.get(&client).map(String::as_str)
    }

    /// Open connections per pod.
    pub fn per_pod(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for pod in self.open.values() {
            *out.entry(pod.clone()).or_default() += 1;
        }
        out
    }

    /// Connections sent to each pod since the start.
    pub fn totals(&self) -> BTreeMap<String, u64> {
        self.total.clone()
    }
}

/// Where the proxy reads the Service's endpoints on every accept.
pub type EndpointSource = Arc<dyn Fn() -> Vec<Backend> + Send + Sync>;

/// A running Service proxy. Dropping it (or [`ServiceProxy::stop`]) stops accepting;
/// open connections run on until one side closes them.
pub struct ServiceProxy {
    addr: SocketAddr,
    conntrack: Arc<Mutex<Conntrack>>,
    stop: Stop,
}

impl std::fmt::Debug for ServiceProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceProxy")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Listen backlog: sized for reconnect storms (a drained pod's agents all come back
/// within its jitter window), as the gateway's own listener is.
const BACKLOG: u32 = 4096;
/// Deadline of the TCP connect to one backend.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// === impl ServiceProxy ===

impl ServiceProxy {
    /// Binds `bind` (port 0 picks one) and starts accepting; each new connection goes to
    /// a Ready backend of `endpoints`, read at that moment. Needs a Tokio runtime.
    pub fn start(bind: SocketAddr, endpoints: EndpointSource) -> std::io::Result<Self> {
        let socket = match bind {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(bind)?;
        let listener = socket.listen(BACKLOG)?;
        let addr = listener.local_addr()?;
        let conntrack = Arc::new(Mutex::new(Conntrack::default()));
        let stop = Stop::default();
        tokio::spawn(accept_loop(
            listener,
            endpoints,
            conntrack.clone(),
            stop.clone(),
        ));
        info!(%addr, "service proxy listening");
        Ok(Self {
            addr,
            conntrack,
            stop,
        })
    }

    /// The Service's stable address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The agents' WebSocket URL through the Service.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/connect", self.addr)
    }

    /// A shared handle on the conntrack table (for per-pod counts elsewhere).
    pub fn conntrack(&self) -> Arc<Mutex<Conntrack>> {
        self.conntrack.clone()
    }

    /// Open connections per pod, from the proxy's conntrack table.
    pub fn per_pod(&self) -> BTreeMap<String, usize> {
        self.conntrack.lock().per_pod()
    }

    /// Connections sent to each pod since the start.
    pub fn totals(&self) -> BTreeMap<String, u64> {
        self.conntrack.lock().totals()
    }

    /// The pod that the open connection from `client` (the client's local address) goes to.
    pub fn pod_of(&self, client: SocketAddr) -> Option<String> {
        self.conntrack.lock().pod_of(client).map(str::to_string)
    }

    /// Stops accepting new connections.
    pub fn stop(&self) {
        self.stop.stop();
    }
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.stop.stop();
    }
}

async fn accept_loop(
    listener: TcpListener,
    endpoints: EndpointSource,
    conntrack: Arc<Mutex<Conntrack>>,
    stop: Stop,
) {
    let rotation = Arc::new(Mutex::new(RoundRobin::default()));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.stopped() => return,
        };
        let (client, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the error.
                warn!(%e, "service proxy accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let attempts = rotation.lock().attempts(&endpoints());
        tokio::spawn(proxy(client, peer, attempts, conntrack.clone()));
    }
}

/// Connects to the first backend that accepts, then copies bytes both ways until either
/// side closes. With no Ready backend the client is closed at once (kube-proxy rejects
/// connections to a Service without endpoints).
async fn proxy(
    mut client: TcpStream,
    peer: SocketAddr,
    attempts: Vec<Backend>,
    conntrack: Arc<Mutex<Conntrack>>,
) {
    let mut upstream = None;
    for backend in attempts {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend.addr)).await {
            Ok(Ok(stream)) => {
                upstream = Some((stream, backend));
                break;
            }
            Ok(Err(e)) => debug!(pod = %backend.pod, %e, "service proxy: backend refused"),
            Err(_) => debug!(pod = %backend.pod, "service proxy: backend connect timed out"),
        }
    }
    let Some((mut stream, backend)) = upstream else {
        debug!(%peer, "service proxy: no ready endpoint");
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = stream.set_nodelay(true);
    conntrack.lock().open(peer, &backend.pod);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut stream).await;
    conntrack.lock().close(peer);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(pod: &str, port: u16, ready: bool) -> Backend {
        Backend {
            pod: pod.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            ready,
        }
    }

    fn picks(rr: &mut RoundRobin, backends: &[Backend], n: usize) -> Vec<String> {
        (0..n)
            .filter_map(|_| rr.pick(backends).map(|b| b.pod.clone()))
            .collect()
    }

    #[test]
    fn spreads_new_connections_evenly_over_ready_pods() {
        let backends = [
            backend("p-0", 1, true),
            backend("p-1", 2, true),
            backend("p-2", 3, true),
        ];
        let mut rr = RoundRobin::default();
        let got = picks(&mut rr, &backends, 300);
        for pod in ["p-0", "p-1", "p-2"] {
            assert_eq!(got.iter().filter(|p| *p == pod).count(), 100, "{pod}");
        }
        assert_eq!(got[..3], ["p-0", "p-1", "p-2"]);
    }

    #[test]
    fn never_picks_an_unready_pod() {
        // Draining and shedding pods fail their readiness probe.
        let backends = [
            backend("p-0", 1, false),
            backend("p-1", 2, true),
            backend("p-2", 3, false),
        ];
        let mut rr = RoundRobin::default();
        assert!(picks(&mut rr, &backends, 10).iter().all(|p| p == "p-1"));
    }

    #[test]
    fn no_ready_pod_means_no_pick() {
        let mut rr = RoundRobin::default();
        assert_eq!(rr.pick(&[]), None);
        assert_eq!(rr.pick(&[backend("p-0", 1, false)]), None);
        assert!(rr.attempts(&[backend("p-0", 1, false)]).is_empty());
    }

    #[test]
    fn a_new_pod_joins_the_rotation_at_once() {
        let mut backends = vec![backend("p-0", 1, true), backend("p-1", 2, true)];
        let mut rr = RoundRobin::default();
        assert_eq!(picks(&mut rr, &backends, 2), ["p-0", "p-1"]);
        backends.push(backend("p-2", 3, true));
        assert_eq!(picks(&mut rr, &backends, 3), ["p-2", "p-0", "p-1"]);
    }

    #[test]
    fn a_removed_or_unready_pod_does_not_shift_the_others() {
        let mut backends = vec![
            backend("p-0", 1, true),
            backend("p-1", 2, true),
            backend("p-2", 3, true),
        ];
        let mut rr = RoundRobin::default();
        assert_eq!(picks(&mut rr, &backends, 2), ["p-0", "p-1"]);
        // The last pick leaves (scale-down): the rotation carries on after it.
        backends.retain(|b| b.pod != "p-1");
        assert_eq!(picks(&mut rr, &backends, 2), ["p-2", "p-0"]);
        // A pod turns unready (drain) and back (drain called off).
        backends[1].ready = false;
        assert_eq!(picks(&mut rr, &backends, 2), ["p-0", "p-0"]);
        backends[1].ready = true;
        assert_eq!(picks(&mut rr, &backends, 2), ["p-2", "p-0"]);
    }

    #[test]
    fn attempts_list_every_ready_pod_once_and_advance_by_one() {
        let backends = [
            backend("p-0", 1, true),
            backend("p-1", 2, false),
            backend("p-2", 3, true),
            backend("p-3", 4, true),
        ];
        let mut rr = RoundRobin::default();
        let order = |v: Vec<Backend>| v.into_iter().map(|b| b.pod).collect::<Vec<_>>();
        assert_eq!(order(rr.attempts(&backends)), ["p-0", "p-2", "p-3"]);
        // The next connection starts at the next pod, not after the fallbacks.
        assert_eq!(order(rr.attempts(&backends)), ["p-2", "p-3", "p-0"]);
        assert_eq!(rr.pick(&backends).map(|b| b.pod.as_str()), Some("p-3"));
    }

    #[test]
    fn conntrack_counts_open_connections_per_pod() {
        let mut table = Conntrack::default();
        let a = SocketAddr::from(([127, 0, 0, 1], 50_001));
        let b = SocketAddr::from(([127, 0, 0, 1], 50_002));
        let c = SocketAddr::from(([127, 0, 0, 2], 50_001));
        table.open(a, "p-0");
        table.open(b, "p-0");
        table.open(c, "p-1");
        assert_eq!(table.pod_of(c), Some("p-1"));
        table.close(b);
        assert_eq!(
            table.per_pod(),
            BTreeMap::from([("p-0".to_string(), 1), ("p-1".to_string(), 1)])
        );
        assert_eq!(table.totals()["p-0"], 2);
        assert_eq!(table.pod_of(b), None);
    }

    /// Loopback echo servers stand in for pods: the proxy carries bytes both ways, sends
    /// new connections only to Ready ones, and leaves open ones alone when their pod
    /// turns unready.
    #[tokio::test]
    async fn proxies_to_ready_backends_and_keeps_open_connections() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        async fn echo(tag: u8) -> SocketAddr {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                while let Ok((mut s, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        let mut buf = [0u8; 64];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 || s.write_all(&[tag]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            addr
        }
        let pods = Arc::new(Mutex::new(vec![
            Backend {
                pod: "p-0".into(),
                addr: echo(0).await,
                ready: true,
            },
            Backend {
                pod: "p-1".into(),
                addr: echo(1).await,
                ready: false,
            },
        ]));
        let source: EndpointSource = {
            let pods = pods.clone();
            Arc::new(move || pods.lock().clone())
        };
        let proxy = ServiceProxy::start("127.0.0.1:0".parse().unwrap(), source).unwrap();
        async fn ask(s: &mut TcpStream) -> u8 {
            s.write_all(b"?").await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            b[0]
        }
        let mut first = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(ask(&mut first).await, 0);
        assert_eq!(
            proxy.pod_of(first.local_addr().unwrap()).as_deref(),
            Some("p-0")
        );
        // p-0 drains (unready), p-1 becomes ready: new connections go to p-1 only, the
        // open one stays on p-0.
        {
            let mut pods = pods.lock();
            pods[0].ready = false;
            pods[1].ready = true;
        }
        for _ in 0..3 {
            let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
            assert_eq!(ask(&mut s).await, 1);
        }
        assert_eq!(ask(&mut first).await, 0);
        // No Ready endpoint: the connection is closed without a byte.
        pods.lock()[1].ready = false;
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).await.unwrap_or(0), 0);
    }
}
