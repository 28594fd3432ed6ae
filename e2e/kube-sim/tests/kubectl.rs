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

/// kubectl's typed generators send built-in kinds as protobuf
/// (`application/vnd.kubernetes.protobuf`); the stand-in decodes them (k8s-pb) and
/// answers JSON.
#[tokio::test]
async fn create_namespace_secret_configmap_serviceaccount_rbac_from_protobuf() {
    let sim = Server::start().await.unwrap();
    let k = Kubectl::new(&sim);
    with_crd(&k).await;
    let out = k.ok(&["create", "namespace", "team-a"]).await;
    assert_eq!(out.trim(), "namespace/team-a created");
    assert_eq!(
        k.ok(&["get", "ns", "team-a", "-o", "jsonpath={.status.phase}"])
            .await,
        "Active"
    );

    let out = k
        .ok(&[
            "create",
            "secret",
            "generic",
            "acme-jwt",
            "-n",
            "team-a",
            "--from-literal=key=s3cret",
            "--from-literal=issuer=https://id.example",
        ])
        .await;
    assert_eq!(out.trim(), "secret/acme-jwt created");
    let secret: serde_json::Value = serde_json::from_str(
        &k.ok(&["get", "secret", "acme-jwt", "-n", "team-a", "-o", "json"])
            .await,
    )
    .unwrap();
    assert_eq!(secret["type"], "Opaque");
    assert_eq!(secret["data"]["key"], "czNjcmV0");
    assert_eq!(secret["data"]["issuer"], "aHR0cHM6Ly9pZC5leGFtcGxl");

    let f = k.file("gateway.yaml", "maxConnections: 1000\nidle: 30s\n");
    let out = k
        .ok(&[
            "create",
            "configmap",
            "gw-config",
            "-n",
            "team-a",
            &format!("--from-file={f}"),
            "--from-literal=mode=dev",
        ])
        .await;
    assert_eq!(out.trim(), "configmap/gw-config created");
    let cm: serde_json::Value = serde_json::from_str(
        &k.ok(&["get", "cm", "gw-config", "-n", "team-a", "-o", "json"])
            .await,
    )
    .unwrap();
    assert_eq!(
        cm["data"]["gateway.yaml"],
        "maxConnections: 1000\nidle: 30s\n"
    );
    assert_eq!(cm["data"]["mode"], "dev");

    assert_eq!(
        k.ok(&["create", "serviceaccount", "gw", "-n", "team-a"])
            .await
            .trim(),
        "serviceaccount/gw created"
    );
    assert_eq!(
        k.ok(&[
            "create",
            "role",
            "status-writer",
            "-n",
            "team-a",
            "--verb=get,patch",
            "--resource=connectionpools.tether.dev/status",
            "--resource-name=p1",
        ])
        .await
        .trim(),
        "role.rbac.authorization.k8s.io/status-writer created"
    );
    assert_eq!(
        k.ok(&[
            "create",
            "rolebinding",
            "gw",
            "-n",
            "team-a",
            "--role=status-writer",
            "--serviceaccount=team-a:gw",
        ])
        .await
        .trim(),
        "rolebinding.rbac.authorization.k8s.io/gw created"
    );
    let rb: serde_json::Value = serde_json::from_str(
        &k.ok(&["get", "rolebinding", "gw", "-n", "team-a", "-o", "json"])
            .await,
    )
    .unwrap();
    assert_eq!(rb["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(rb["subjects"][0]["name"], "gw");
    assert_eq!(rb["roleRef"]["name"], "status-writer");

    // Every create above travelled as protobuf.
    let creates = sim.stats().snapshot();
    for resource in [
        "namespaces",
        "secrets",
        "configmaps",
        "serviceaccounts",
        "roles",
        "rolebindings",
    ] {
        assert_eq!(
            creates.count(|r| r.verb == "create"
                && r.resource == resource
                && r.code == 201
                && r.content_type.as_deref() == Some("application/vnd.kubernetes.protobuf")
                && r.user_agent.starts_with("kubectl")),
            1,
            "{resource}: {:?}",
            creates.requests
        );
    }

    // A name taken is the usual AlreadyExists, worded as the real server words it.
    let o = k.run(&["create", "namespace", "team-a"]).await;
    assert!(
        !o.ok && o.stderr.contains("namespaces \"team-a\" already exists"),
        "{}",
        o.stderr
    );
    assert!(
        k.ok(&["delete", "secret", "acme-jwt", "-n", "team-a"])
            .await
            .contains("secret \"acme-jwt\" deleted")
    );
}

/// A Secret written with `stringData` is stored with it merged into base64 `data`;
/// `stringData` is never returned (`kubectl get secret -o yaml` shows `data` only).
#[tokio::test]
async fn secret_string_data_round_trips_into_data() {
    let sim = Server::start().await.unwrap();
    let k = Kubectl::new(&sim);
    let f = k.file(
        "secret.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: keys\nstringData:\n  push: k-123\n  shared: from-string\ndata:\n  shared: b2xk\n  raw: cmF3\n",
    );
    assert!(
        k.ok(&["apply", "-f", &f])
            .await
            .contains("secret/keys created")
    );
    let get = async || -> serde_json::Value {
        serde_json::from_str(&k.ok(&["get", "secret", "keys", "-o", "json"]).await).unwrap()
    };
    let s = get().await;
    assert!(s.get("stringData").is_none(), "{s}");
    assert_eq!(s["data"]["push"], "ay0xMjM="); // k-123
    assert_eq!(s["data"]["shared"], "ZnJvbS1zdHJpbmc="); // stringData wins
    assert_eq!(s["data"]["raw"], "cmF3");
    let yaml = k.ok(&["get", "secret", "keys", "-o", "yaml"]).await;
    // (Only inside kubectl's last-applied annotation, which records what was applied.)
    assert!(!yaml.contains("\nstringData:"), "{yaml}");
    // What a user types to read a key.
    assert_eq!(
        k.ok(&["get", "secret", "keys", "-o", "jsonpath={.data.push}"])
            .await,
        "ay0xMjM="
    );

    // A later write with stringData (merge patch, then server-side apply) updates data.
    k.ok(&[
        "patch",
        "secret",
        "keys",
        "--type=merge",
        "-p",
        r#"{"stringData":{"push":"k-456"}}"#,
    ])
    .await;
    assert_eq!(get().await["data"]["push"], "ay00NTY=");
    let f2 = k.file(
        "secret2.yaml",
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: keys2\nstringData:\n  token: abc\n",
    );
    k.ok(&["apply", "--server-side", "-f", &f2]).await;
    let s2: serde_json::Value =
        serde_json::from_str(&k.ok(&["get", "secret", "keys2", "-o", "json"]).await).unwrap();
    assert_eq!(s2["data"]["token"], "YWJj");
    assert!(s2.get("stringData").is_none(), "{s2}");
}

/// The STATUS column of a CRD whose printer column filters a list
/// (`.status.conditions[?(@.type=="Ready")].status`) shows the filtered value.
#[tokio::test]
async fn printer_column_with_jsonpath_filter() {
    let sim = Server::start().await.unwrap();
    let k = Kubectl::new(&sim);
    let mut crd = common::crd();
    crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "Status", "type": "string",
            "jsonPath": ".status.conditions[?(@.type==\"Ready\")].status"}));
    // A priority-1 column is shown by `-o wide` only, as on a real cluster.
    crd["spec"]["versions"][0]["additionalPrinterColumns"]
        .as_array_mut()
        .unwrap()
        .push(
            serde_json::json!({"name": "Scaling", "type": "string", "priority": 1,
            "jsonPath": ".status.conditions[?(@.type==\"Scaling\")].status"}),
        );
    let f = k.file("crd.json", &crd.to_string());
    k.ok(&["apply", "-f", &f]).await;
    k.ok(&[
        "wait",
        "--for",
        "condition=established",
        "crd/connectionpools.tether.dev",
        "--timeout=10s",
    ])
    .await;
    let p = k.file("pool.yaml", &POOL.replace("REPLICAS", "1"));
    k.ok(&["apply", "-f", &p]).await;
    let row = |table: &str| {
        table
            .lines()
            .find(|l| l.starts_with("p1 "))
            .unwrap_or_else(|| panic!("no p1 row in:\n{table}"))
            .split_whitespace()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let table = k.ok(&["get", "cpool"]).await;
    assert!(table.lines().next().unwrap().contains("STATUS"), "{table}");
    // No status yet: empty cells.
    assert_eq!(row(&table), ["p1", "acme"], "{table}");
    k.ok(&[
        "patch",
        "cpool",
        "p1",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"totalConnections":7,"conditions":[{"type":"Scaling","status":"False"},{"type":"Ready","status":"True"}]}}"#,
    ])
    .await;
    let table = k.ok(&["get", "cpool"]).await;
    assert_eq!(row(&table), ["p1", "acme", "7", "True"], "{table}");
    assert!(!table.contains("SCALING"), "{table}");
    let wide = k.ok(&["get", "cpool", "-o", "wide"]).await;
    assert!(wide.lines().next().unwrap().ends_with("SCALING"), "{wide}");
    assert_eq!(row(&wide), ["p1", "acme", "7", "True", "False"], "{wide}");
}

/// core/v1 and events.k8s.io/v1 Events are one store: what the operator writes through
/// kube's Recorder (events.k8s.io/v1) is what `kubectl get events` and `kubectl
/// describe` show, and `kubectl get events --watch` streams new ones.
#[tokio::test]
async fn events_from_the_recorder_show_in_get_events_describe_and_watch() {
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let sim = Server::start().await.unwrap();
    let k = Kubectl::new(&sim);
    with_crd(&k).await;
    let f = k.file("pool.yaml", &POOL.replace("REPLICAS", "1"));
    k.ok(&["apply", "-f", &f]).await;
    let client = sim.client().unwrap();
    let pool = common::pools(&client, "default").get("p1").await.unwrap();
    let reference = kube::Resource::object_ref(&pool, &common::pool_resource());
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "tether-operator".into(),
            instance: Some("operator-0".into()),
        },
    );
    let event = |reason: &str, note: &str| Event {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(note.into()),
        action: "Scale".into(),
        secondary: None,
    };
    recorder
        .publish(&event("ScaledUp", "desired replicas 1 -> 3"), &reference)
        .await
        .unwrap();

    let events = k.ok(&["get", "events"]).await;
    let header = events.lines().next().unwrap();
    for col in ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"] {
        assert!(header.contains(col), "{events}");
    }
    let line = events
        .lines()
        .find(|l| l.contains("ScaledUp"))
        .unwrap_or_else(|| panic!("{events}"));
    assert!(
        line.contains("Normal")
            && line.contains("connectionpool/p1")
            && line.contains("desired replicas 1 -> 3"),
        "{line}"
    );
    // The core/v1 fields of an events.k8s.io/v1 write.
    let core: serde_json::Value =
        serde_json::from_str(&k.ok(&["get", "events", "-o", "json"]).await).unwrap();
    let e = &core["items"][0];
    assert_eq!(e["apiVersion"], "v1");
    assert_eq!(e["involvedObject"]["name"], "p1");
    assert_eq!(e["involvedObject"]["kind"], "ConnectionPool");
    assert_eq!(e["message"], "desired replicas 1 -> 3");
    assert_eq!(e["reportingComponent"], "tether-operator");
    assert_eq!(e["reportingInstance"], "operator-0");

    let describe = k.ok(&["describe", "cpool", "p1"]).await;
    let events_part = describe
        .split("Events:")
        .nth(1)
        .unwrap_or_else(|| panic!("{describe}"));
    assert!(
        events_part.contains("ScaledUp")
            && events_part.contains("desired replicas 1 -> 3")
            && events_part.contains("tether-operator"),
        "{describe}"
    );

    // `get events --watch`, bounded: kubectl's own request timeout, and ours per line.
    let mut child = k
        .command(&["get", "events", "--watch", "--request-timeout=20s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("a watch line within 10 s")
            .unwrap()
            .expect("the watch is still open")
    };
    // The initial list: header, then the existing event.
    let mut seen = String::new();
    while !seen.contains("ScaledUp") {
        seen = next().await;
    }
    // A new event written through core/v1 (as client-go's old recorder does) streams too.
    k.ok(&[
        "create",
        "-f",
        &k.file(
            "event.yaml",
            "apiVersion: v1\nkind: Event\nmetadata:\n  name: p1.drain\ninvolvedObject:\n  apiVersion: tether.dev/v1alpha1\n  kind: ConnectionPool\n  name: p1\n  namespace: default\nreason: DrainStarted\nmessage: draining pod p1-2\ntype: Warning\nsource:\n  component: tether-operator\n",
        ),
    ])
    .await;
    let line = next().await;
    assert!(
        line.contains("DrainStarted")
            && line.contains("Warning")
            && line.contains("connectionpool/p1"),
        "{line}"
    );
    child.kill().await.unwrap();
    // And it is an events.k8s.io/v1 Event too, with that API's field names.
    let notes = k
        .ok(&[
            "get",
            "events.events.k8s.io",
            "p1.drain",
            "-o",
            "jsonpath={.note}/{.regarding.name}/{.deprecatedSource.component}",
        ])
        .await;
    assert_eq!(notes, "draining pod p1-2/p1/tether-operator");
}

/// RBAC as kubectl meets it: `create token` (TokenRequest, protobuf), `auth whoami`,
/// `auth can-i` (SelfSubjectAccessReview), a 403 worded as the real server words it, and
/// a Role + RoleBinding taking effect at once (names included). kubectl sends a bearer
/// token only over TLS and the stand-in serves plain HTTP, so kubectl acts as the
/// service account with `--as` (impersonation, which the administrator may do); the
/// token it created is used by a kube-rs client, which sends it over HTTP.
#[tokio::test]
async fn create_token_auth_can_i_and_forbidden_requests() {
    let sim = Server::start().await.unwrap();
    let k = Kubectl::new(&sim);
    with_crd(&k).await;
    k.ok(&["create", "serviceaccount", "gw"]).await;
    let token = k
        .ok(&["create", "token", "gw", "--duration=20m"])
        .await
        .trim()
        .to_string();
    assert_eq!(token.split('.').count(), 3, "a JWT-shaped token: {token}");
    let as_gw = "--as=system:serviceaccount:default:gw";
    let who = k
        .ok(&[
            "auth",
            "whoami",
            as_gw,
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .await;
    assert_eq!(who, "system:serviceaccount:default:gw");
    // Nothing is granted yet.
    let can = k
        .run(&[
            "auth",
            "can-i",
            "patch",
            "connectionpools/p1",
            "--subresource=status",
            as_gw,
        ])
        .await;
    assert_eq!((can.ok, can.stdout.trim()), (false, "no"), "{}", can.stderr);
    let denied = k.run(&["get", "configmaps", as_gw]).await;
    assert!(!denied.ok);
    assert!(
        denied.stderr.contains(
            "Error from server (Forbidden): configmaps is forbidden: User \"system:serviceaccount:default:gw\" cannot list resource \"configmaps\" in API group \"\" in the namespace \"default\""
        ),
        "{}",
        denied.stderr
    );
    // A Role limited to one pool's status, bound to the account.
    // (Reading any pool's status, so that kubectl's patch gets as far as the patch.)
    k.ok(&[
        "create",
        "role",
        "gw",
        "--verb=patch",
        "--resource=connectionpools.tether.dev/status",
        "--resource-name=p1",
    ])
    .await;
    k.ok(&[
        "create",
        "role",
        "read",
        "--verb=get",
        "--resource=connectionpools.tether.dev/status",
    ])
    .await;
    k.ok(&[
        "create",
        "rolebinding",
        "read",
        "--role=read",
        "--serviceaccount=default:gw",
    ])
    .await;
    k.ok(&[
        "create",
        "rolebinding",
        "gw",
        "--role=gw",
        "--serviceaccount=default:gw",
    ])
    .await;
    let no = k
        .run(&[
            "auth",
            "can-i",
            "patch",
            "connectionpools",
            "--subresource=status",
            as_gw,
        ])
        .await;
    assert_eq!(
        no.stdout.trim(),
        "no",
        "a rule with resourceNames needs a name"
    );
    let yes = k
        .ok(&[
            "auth",
            "can-i",
            "patch",
            "connectionpools/p1",
            "--subresource=status",
            as_gw,
        ])
        .await;
    assert_eq!(yes.trim(), "yes");
    let other = k
        .run(&[
            "auth",
            "can-i",
            "patch",
            "connectionpools/p2",
            "--subresource=status",
            as_gw,
        ])
        .await;
    assert_eq!(other.stdout.trim(), "no", "{}", other.stderr);
    k.ok(&[
        "apply",
        "-f",
        &k.file("p1.yaml", &POOL.replace("REPLICAS", "1")),
    ])
    .await;
    k.ok(&[
        "apply",
        "-f",
        &k.file(
            "p2.yaml",
            &POOL.replace("p1", "p2").replace("REPLICAS", "1"),
        ),
    ])
    .await;
    let patch = k
        .run(&[
            "patch",
            "cpool",
            "p2",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"replicas":1}}"#,
            as_gw,
        ])
        .await;
    assert!(!patch.ok);
    assert!(
        patch.stderr.contains(
            "connectionpools.tether.dev \"p2\" is forbidden: User \"system:serviceaccount:default:gw\" cannot patch resource \"connectionpools/status\" in API group \"tether.dev\" in the namespace \"default\""
        ),
        "{}",
        patch.stderr
    );
    // The token kubectl created is the account's: it may read p1's status, not p2's.
    let pools: kube::Api<kube::core::DynamicObject> = kube::Api::default_namespaced_with(
        sim.client_with_token(&token).unwrap(),
        &common::pool_resource(),
    );
    let ssa = kube::api::PatchParams::default();
    let status = kube::api::Patch::Merge(serde_json::json!({"status": {"replicas": 1}}));
    pools.patch_status("p1", &ssa, &status).await.unwrap();
    assert!(pools.patch_status("p2", &ssa, &status).await.is_err());
    // The administrator's kubeconfig may do anything.
    assert_eq!(k.ok(&["auth", "can-i", "*", "*"]).await.trim(), "yes");
}

/// `kubectl create service` sends a protobuf Service: decoded, allocated a cluster IP
/// (and `--clusterip=None` kept for a headless one), and its cluster IP then immutable.
#[tokio::test]
async fn create_service_from_protobuf() {
    let sim = Server::start().await.unwrap();
    let k = Kubectl::new(&sim);
    k.ok(&["create", "service", "clusterip", "web", "--tcp=80:8080"])
        .await;
    let got = k
        .ok(&["get", "service", "web", "-o", "jsonpath={.spec.type} {.spec.ports[0].port} {.spec.ports[0].targetPort} {.spec.ports[0].name} {.spec.selector.app} {.spec.clusterIP}"])
        .await;
    let fields: Vec<&str> = got.split(' ').collect();
    assert_eq!(
        fields[..5],
        ["ClusterIP", "80", "8080", "80-8080", "web"],
        "{got}"
    );
    assert!(fields[5].starts_with("10.96."), "{got}");
    k.ok(&[
        "create",
        "service",
        "clusterip",
        "headless",
        "--clusterip=None",
        "--tcp=9090:9090",
    ])
    .await;
    let ip = k
        .ok(&[
            "get",
            "service",
            "headless",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
        .await;
    assert_eq!(ip, "None");
    k.ok(&[
        "create",
        "service",
        "nodeport",
        "np",
        "--tcp=443:8443",
        "--node-port=30443",
    ])
    .await;
    let np = k
        .ok(&[
            "get",
            "service",
            "np",
            "-o",
            "jsonpath={.spec.type} {.spec.ports[0].nodePort}",
        ])
        .await;
    assert_eq!(np, "NodePort 30443");
    let changed = k
        .run(&[
            "patch",
            "service",
            "web",
            "--type=merge",
            "-p",
            r#"{"spec":{"clusterIP":"10.96.200.1","clusterIPs":["10.96.200.1"]}}"#,
        ])
        .await;
    assert!(!changed.ok);
    assert!(
        changed
            .stderr
            .contains("spec.clusterIP: Invalid value: \"10.96.200.1\": field is immutable"),
        "{}",
        changed.stderr
    );
}
