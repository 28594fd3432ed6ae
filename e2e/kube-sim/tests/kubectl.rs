//! Conformance with kubectl (the client most sensitive to discovery, OpenAPI and error
//! shapes): apply (client- and server-side), get (tables), get -w, patch of /status,
//! scale, wait, delete, explain, api-resources.
//!
//! kubectl is taken from `$KUBECTL` or `PATH`; these tests fail (not skip) without it.

#![recursion_limit = "256"]

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tether_kube_sim::Server;
use tokio::io::{AsyncBufReadExt, BufReader};

struct Kubectl {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Kubectl {
    fn new(sim: &Server) -> Kubectl {
        let dir = tempfile::tempdir().unwrap();
        sim.write_kubeconfig(dir.path().join("kubeconfig")).unwrap();
        let bin = std::env::var_os("KUBECTL")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("kubectl"));
        Kubectl { dir, bin }
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.bin);
        c.args(args)
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env("KUBECACHEDIR", self.dir.path().join("cache"))
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    async fn run(&self, args: &[&str]) -> Out {
        let out = self
            .command(args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("running kubectl ({}): {e}", self.bin.display()));
        Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
        }
    }

    async fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args).await;
        assert!(o.ok, "kubectl {args:?} failed:\n{}\n{}", o.stdout, o.stderr);
        o.stdout
    }

    fn file(&self, name: &str, content: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

const POOL: &str = "apiVersion: tether.dev/v1alpha1\nkind: ConnectionPool\nmetadata:\n  name: p1\nspec:\n  tenant: acme\n  replicas: REPLICAS\n";

async fn with_crd(k: &Kubectl) {
    let crd = k.file("crd.json", &common::crd().to_string());
    let out = k.ok(&["apply", "-f", &crd]).await;
    assert!(
        out.contains(
            "customresourcedefinition.apiextensions.k8s.io/connectionpools.tether.dev created"
        ),
        "{out}"
    );
    k.ok(&[
        "wait",
        "--for",
        "condition=established",
        "crd/connectionpools.tether.dev",
        "--timeout=10s",
    ])
    .await;
}

#[tokio::test]
async fn apply_client_and_server_side_patch_status_wait_delete() {
    let sim = Server::start().await.unwrap();
    let k = Kubectl::new(&sim);
    with_crd(&k).await;
    let f = k.file("pool.yaml", &POOL.replace("REPLICAS", "1"));
    assert!(
        k.ok(&["apply", "-f", &f])
            .await
            .contains("connectionpool.tether.dev/p1 created")
    );
    assert!(k.ok(&["apply", "-f", &f]).await.contains("unchanged"));
    k.file("pool.yaml", &POOL.replace("REPLICAS", "2"));
    assert!(k.ok(&["apply", "-f", &f]).await.contains("configured"));

    // Short name, printer columns.
    let table = k.ok(&["get", "cpool"]).await;
    assert!(
        table.starts_with("NAME") && table.contains("TENANT") && table.contains("acme"),
        "{table}"
    );

    // Unknown fields: rejected under kubectl's default strict validation.
    let bad = k.file(
        "bad.yaml",
        &format!("{}  bogus: 1\n", POOL.replace("REPLICAS", "2")),
    );
    let o = k.run(&["apply", "-f", &bad]).await;
    assert!(
        !o.ok && o.stderr.contains("unknown field \"spec.bogus\""),
        "{}",
        o.stderr
    );
    // Schema violations: 422 with the field path.
    let invalid = k.file("invalid.yaml", &POOL.replace("REPLICAS", "-3"));
    let o = k.run(&["apply", "-f", &invalid]).await;
    assert!(
        !o.ok && o.stderr.contains("spec.replicas: Invalid value: -3"),
        "{}",
        o.stderr
    );

    // Server-side apply takes over from client-side apply (kubectl's upgrade path)...
    k.file("pool.yaml", &POOL.replace("REPLICAS", "3"));
    assert!(
        k.ok(&["apply", "--server-side", "-f", &f])
            .await
            .contains("serverside-applied")
    );
    // ...and a second manager changing the field conflicts until forced.
    k.file("pool.yaml", &POOL.replace("REPLICAS", "4"));
    let o = k
        .run(&["apply", "--server-side", "--field-manager=other", "-f", &f])
        .await;
    assert!(
        !o.ok
            && o.stderr
                .contains("conflict with \"kubectl\": .spec.replicas"),
        "{}",
        o.stderr
    );
    k.ok(&[
        "apply",
        "--server-side",
        "--field-manager=other",
        "--force-conflicts",
        "-f",
        &f,
    ])
    .await;
    assert_eq!(
        k.ok(&["get", "cpool", "p1", "-o", "jsonpath={.spec.replicas}"])
            .await,
        "4"
    );

    // Status through the subresource; spec through it is ignored.
    k.ok(&[
        "patch",
        "cpool",
        "p1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"spec":{"tenant":"x"},"status":{"totalConnections":7}}"#,
    ])
    .await;
    assert_eq!(
        k.ok(&[
            "get",
            "cpool",
            "p1",
            "-o",
            "jsonpath={.status.totalConnections}/{.spec.tenant}"
        ])
        .await,
        "7/acme"
    );
    k.ok(&[
        "wait",
        "--for=jsonpath={.status.totalConnections}=7",
        "cpool/p1",
        "--timeout=5s",
    ])
    .await;

    // Scale subresource.
    k.ok(&["scale", "cpool", "p1", "--replicas=6"]).await;
    assert_eq!(
        k.ok(&["get", "cpool", "p1", "-o", "jsonpath={.spec.replicas}"])
            .await,
        "6"
    );

    // Finalizer keeps it; wait --for=delete returns once the finalizer is gone.
    k.ok(&[
        "patch",
        "cpool",
        "p1",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":["tether.dev/cleanup"]}}"#,
    ])
    .await;
    k.ok(&["delete", "cpool", "p1", "--wait=false"]).await;
    assert!(
        !k.ok(&[
            "get",
            "cpool",
            "p1",
            "-o",
            "jsonpath={.metadata.deletionTimestamp}"
        ])
        .await
        .is_empty()
    );
    let waiter = k
        .command(&["wait", "--for=delete", "cpool/p1", "--timeout=10s"])
        .output();
    let remover = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        k.ok(&[
            "patch",
            "cpool",
            "p1",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
        ])
        .await
    };
    let (w, _) = tokio::join!(waiter, remover);
    assert!(w.unwrap().status.success());
    let o = k.run(&["get", "cpool", "p1"]).await;
    assert!(!o.ok && o.stderr.contains("NotFound"), "{}", o.stderr);
}

#[tokio::test]
async fn get_watch_streams_added_modified_deleted() {
    let sim = Server::start().await.unwrap();
    let k = Kubectl::new(&sim);
    with_crd(&k).await;
    let f = k.file("pool.yaml", &POOL.replace("REPLICAS", "1"));
    let mut child = k
        .command(&["get", "cpool", "-w", "--output-watch-events"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Whether kubectl's initial list or its watch sees the create, it prints ADDED; after
    // that line its watch runs from the list's resourceVersion, so no change can be missed.
    k.ok(&["apply", "-f", &f]).await;
    // Table rows: EVENT NAME TENANT CONNECTIONS AGE (the header comes with the first row).
    let next = async |lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>| loop {
        let l = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("watch line")
            .unwrap()
            .unwrap();
        let cols: Vec<&str> = l.split_whitespace().collect();
        if cols.first() != Some(&"EVENT") {
            return format!("{} {} {}", cols[0], cols[1], cols[2]);
        }
    };
    assert_eq!(next(&mut lines).await, "ADDED p1 acme");
    k.ok(&[
        "patch",
        "cpool",
        "p1",
        "--type=merge",
        "-p",
        r#"{"spec":{"tenant":"zeta"}}"#,
    ])
    .await;
    assert_eq!(next(&mut lines).await, "MODIFIED p1 zeta");
    k.ok(&["delete", "cpool", "p1"]).await;
    assert_eq!(next(&mut lines).await, "DELETED p1 zeta");
    child.kill().await.unwrap();
}

const STS: &str = r#"apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: gw
  labels: {app: gw}
spec:
  replicas: 2
  serviceName: gw
  selector: {matchLabels: {app: gw}}
  template:
    metadata: {labels: {app: gw}}
    spec:
      containers:
      - name: gateway
        image: IMAGE
        ports: [{containerPort: 8080, name: ws}]
        env: [{name: A, value: "1"}]
---
apiVersion: v1
kind: Service
metadata: {name: gw}
spec:
  selector: {app: gw}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: gw-config}
data: {config.yaml: "x: 1"}
"#;

#[tokio::test]
async fn builtin_kinds_strategic_apply_scale_explain_and_discovery() {
    let sim = Server::start().await.unwrap();
    let k = Kubectl::new(&sim);
    with_crd(&k).await;
    let f = k.file("gw.yaml", &STS.replace("IMAGE", "gw:1"));
    let out = k.ok(&["apply", "-f", &f]).await;
    assert!(
        out.contains("statefulset.apps/gw created")
            && out.contains("service/gw created")
            && out.contains("configmap/gw-config created"),
        "{out}"
    );
    // A sidecar added by someone else survives a re-apply (strategic merge by container name).
    k.ok(&[
        "patch",
        "sts",
        "gw",
        "--type=strategic",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"sidecar","image":"sc:1"}]}}}}"#,
    ])
    .await;
    k.file("gw.yaml", &STS.replace("IMAGE", "gw:2"));
    k.ok(&["apply", "-f", &f]).await;
    let images = k
        .ok(&[
            "get",
            "sts",
            "gw",
            "-o",
            "jsonpath={.spec.template.spec.containers[*].image}",
        ])
        .await;
    assert_eq!(images, "gw:2 sc:1");
    assert_eq!(
        k.ok(&["get", "sts", "gw", "-o", "jsonpath={.metadata.generation}"])
            .await,
        "3"
    );

    k.ok(&["scale", "sts", "gw", "--replicas=3"]).await;
    assert_eq!(
        k.ok(&["get", "sts", "gw", "-o", "jsonpath={.spec.replicas}"])
            .await,
        "3"
    );

    let resources = k.ok(&["api-resources"]).await;
    for needle in [
        "connectionpools",
        "cpool",
        "statefulsets",
        "leases",
        "poddisruptionbudgets",
        "customresourcedefinitions",
    ] {
        assert!(
            resources.contains(needle),
            "{needle} missing from:\n{resources}"
        );
    }
    let explain = k.ok(&["explain", "connectionpool.spec.tenant"]).await;
    assert!(explain.contains("Tenant id."), "{explain}");

    assert!(
        k.ok(&["delete", "-f", &f])
            .await
            .contains("statefulset.apps \"gw\" deleted")
    );
    assert!(
        k.ok(&["get", "sts,svc,cm", "-o", "name"])
            .await
            .lines()
            .all(|l| l.contains("kube-root-ca") || l.is_empty())
    );
    let _ = k.path();
}
