//! The CRD upgrade path of docs/upgrading.md, run with kubectl against the Kubernetes
//! API stand-in: Helm creates the CRD once (a plain create, as Helm does for `crds/`)
//! and never touches it again; the documented
//! `kubectl apply --server-side --force-conflicts -f charts/tether/crds/` then brings an
//! older CRD up to the chart's, taking its fields over.
//!
//! kubectl is taken from `$KUBECTL` or `PATH`; the test fails (not skips) without it.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use tether_kube_sim::Server;

const CRD: &str = "connectionpools.tether.dev";

fn chart_crds() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tether/crds")
}

/// Runs kubectl against `kubeconfig`; (success, stdout + stderr).
async fn kubectl(dir: &Path, args: &[&str]) -> (bool, String) {
    let bin = std::env::var_os("KUBECTL").unwrap_or_else(|| "kubectl".into());
    let out = tokio::process::Command::new(&bin)
        .args(args)
        .env("KUBECONFIG", dir.join("kubeconfig"))
        .env("KUBECACHEDIR", dir.join("cache"))
        .env("HOME", dir)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running kubectl ({bin:?}): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn properties(crd: &CustomResourceDefinition) -> Vec<String> {
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("a schema");
    schema.properties.as_ref().unwrap()["spec"]
        .properties
        .as_ref()
        .unwrap()
        .keys()
        .cloned()
        .collect()
}

#[tokio::test]
async fn documented_server_side_apply_upgrades_a_crd_helm_created() {
    println!("e2e runtime: none (kubectl against the stand-in; no operator, no pods)");
    let sim = Server::start().await.expect("start the stand-in");
    let dir = tempfile::tempdir().unwrap();
    sim.write_kubeconfig(dir.path().join("kubeconfig")).unwrap();

    // An older CRD: the chart's without `spec.reportIntervalSeconds`, created the way
    // Helm installs `crds/` (a create, not an apply).
    let shipped = std::fs::read_to_string(chart_crds().join("connectionpool.yaml")).unwrap();
    let mut older: serde_yaml::Value = serde_yaml::from_str(&shipped).unwrap();
    let spec_props = &mut older["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"];
    assert!(
        spec_props
            .as_mapping_mut()
            .unwrap()
            .remove("reportIntervalSeconds")
            .is_some(),
        "the chart's CRD has spec.reportIntervalSeconds"
    );
    let older_file = dir.path().join("older.yaml");
    std::fs::write(&older_file, serde_yaml::to_string(&older).unwrap()).unwrap();
    let (ok, out) = kubectl(dir.path(), &["create", "-f", older_file.to_str().unwrap()]).await;
    assert!(ok, "create the older CRD: {out}");

    let crds: Api<CustomResourceDefinition> = Api::all(sim.client().unwrap());
    let before = crds.get(CRD).await.unwrap();
    assert!(!properties(&before).contains(&"reportIntervalSeconds".to_owned()));

    // `helm upgrade` would leave it as it is; the documented step upgrades it.
    let (ok, out) = kubectl(
        dir.path(),
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            chart_crds().to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "kubectl apply --server-side --force-conflicts: {out}");
    let after = crds.get(CRD).await.unwrap();
    assert!(
        properties(&after).contains(&"reportIntervalSeconds".to_owned()),
        "the applied CRD has the chart's schema"
    );
    let appliers: Vec<_> = after
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(
        appliers,
        ["kubectl"],
        "kubectl now manages the CRD by apply"
    );

    // Applying again changes nothing and still succeeds (the step is safe to repeat).
    let (ok, out) = kubectl(
        dir.path(),
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            chart_crds().to_str().unwrap(),
        ],
    )
    .await;
    assert!(ok, "a second apply: {out}");
    assert_eq!(
        crds.get(CRD).await.unwrap().metadata.generation,
        after.metadata.generation,
        "an unchanged CRD keeps its generation"
    );
}
