//! The pod network of container mode: a Linux bridge made for one [`Cluster`] (the
//! "node"), and one network namespace per pod joined to it by a veth pair, so that every
//! pod has its own IP and listens on the ports its spec says (8080, 8081), as on a
//! cluster. The host side of the bridge (`.1`) is where the pods reach the API stand-in
//! and NATS; the harness (Service proxy, push clients, probes) reaches the pods' IPs
//! through the bridge. Nothing is routed beyond the bridge: traffic stays between the
//! host and these namespaces.
//!
//! ```text
//!   host netns: tth<i> bridge 10.213.<i>.1/24 ── API stand-in (forwarded), nats-server
//!     ├── veth ── netns tth<i>-loop-0: eth0 10.213.<i>.2   (gateway container)
//!     ├── veth ── netns tth<i>-loop-1: eth0 10.213.<i>.3
//!     └── veth ── netns tth<i>-op:     eth0 10.213.<i>.4   (operator container)
//! ```
//!
//! Each network takes the first free `<i>` (the bridge's name is the lock, so parallel
//! test processes get distinct subnets); everything is deleted by name on drop.
//!
//! [`Cluster`]: crate::Cluster

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context as _, bail};
use parking_lot::Mutex;
use tracing::warn;

/// A bridge and its subnet; hands out pod namespaces.
#[derive(Debug)]
pub struct PodNetwork {
    index: u8,
    bridge: String,
    free: Mutex<BTreeSet<u8>>,
}

/// One pod's network namespace (deleted, with its veth, on drop).
#[derive(Debug)]
pub struct PodNetns {
    /// Name under /run/netns.
    pub name: String,
    /// The pod's IP.
    pub ip: Ipv4Addr,
    veth: String,
    host: u8,
    network: std::sync::Weak<PodNetwork>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

// === impl PodNetwork ===

impl PodNetwork {
    /// Creates the bridge on the first free subnet 10.213.<i>.0/24.
    pub fn create() -> anyhow::Result<std::sync::Arc<Self>> {
        let start = (std::process::id() % 250) as u8;
        let mut last = None;
        for k in 0..250u16 {
            let index = ((u16::from(start) + k) % 250) as u8;
            let bridge = format!("tth{index}");
            match ip(&["link", "add", &bridge, "type", "bridge"]) {
                Ok(()) => {
                    let net = Self {
                        index,
                        bridge: bridge.clone(),
                        free: Mutex::new((2..=254).collect()),
                    };
                    let host = format!("{}/24", net.host_ip());
                    ip(&["addr", "add", &host, "dev", &bridge])?;
                    ip(&["link", "set", &bridge, "up"])?;
                    return Ok(std::sync::Arc::new(net));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last
            .unwrap_or_else(|| anyhow::anyhow!("no subnet"))
            .context("creating the pod network bridge (container mode runs as root)"))
    }

    /// The host's address on the bridge (what pods use to reach the API and NATS).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 213, self.index, 1)
    }

    /// A new namespace for pod `pod` with its own IP on the bridge.
    pub fn attach(self: &std::sync::Arc<Self>, pod: &str) -> anyhow::Result<PodNetns> {
        let host = self
            .free
            .lock()
            .pop_first()
            .context("pod network is full (253 pods)")?;
        let pod_ip = Ipv4Addr::new(10, 213, self.index, host);
        let veth = format!("{}v{host}", self.bridge);
        let ns = PodNetns {
            name: format!("{}-{pod}", self.bridge),
            ip: pod_ip,
            veth: veth.clone(),
            host,
            network: std::sync::Arc::downgrade(self),
        };
        let addr = format!("{pod_ip}/24");
        let gateway = self.host_ip().to_string();
        // Deletes a namespace left by a crashed run of this very network, if any.
        let _ = ip(&["netns", "del", &ns.name]);
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
        ip(&["-n", &ns.name, "addr", "add", &addr, "dev", "eth0"])?;
        ip(&["-n", &ns.name, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns.name, "route", "add", "default", "via", &gateway])?;
        Ok(ns)
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        if let Err(e) = ip(&["link", "del", &self.bridge]) {
            warn!(%e, "deleting the pod network bridge");
        }
    }
}

// === impl PodNetns ===

impl PodNetns {
    /// The path podman's `--network ns:` takes.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }
}

impl Drop for PodNetns {
    fn drop(&mut self) {
        // The pair goes with its host end at once (the namespace itself may outlive
        // `ip netns del` while a process still holds it).
        let _ = ip(&["link", "del", &self.veth]);
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            warn!(%e, "deleting a pod's network namespace");
        }
        if let Some(net) = self.network.upgrade() {
            net.free.lock().insert(self.host);
        }
    }
}
