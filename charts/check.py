#!/usr/bin/env python3
"""Lints and renders the Helm chart with the real Helm engine (helm-python-sdk wraps
Helm's Go SDK), and checks what it renders. Exits non-zero on any problem.

    pip install helm-python-sdk pyyaml
    python3 charts/check.py
"""

import json
import pathlib
import sys

import helm_python as helm
import yaml

CHART = pathlib.Path(__file__).resolve().parent / "tether"
REPO = CHART.parent.parent
failures = []


def check(ok, message):
    if not ok:
        failures.append(message)


def render(values):
    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    manifests = chart.render(values, name="tether", namespace="tether-system", is_install=True)
    docs = []
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def notes(values, **release):
    chart = helm.Chart.load(CHART)
    return chart.render(values, name="tether", namespace="tether-system", **release)["tether/templates/NOTES.txt"]


def kinds(docs):
    return sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)


def find(docs, kind):
    return [d for d in docs if d["kind"] == kind]


# 1. helm lint --strict, with the default values and with a namespaced install.
for values in ({}, {"watchNamespace": "tenants", "replicaCount": 1, "leaderElection": {"enabled": False}}):
    report = helm.lint(CHART, values, strict=True, kube_version="v1.34.0")
    for msg in report.get("messages", []):
        if msg.get("severity", 0) >= 2:
            failures.append(f"lint {values}: {msg.get('path')}: {msg.get('error')}")
    for err in report.get("errors") or []:
        failures.append(f"lint {values}: {err}")

# 2. Default install: cluster-wide RBAC, two replicas with leader election.
docs = render({})
check(
    kinds(docs)
    == sorted(
        [
            "ClusterRole/tether-operator",
            "ClusterRoleBinding/tether-operator",
            "ConfigMap/tether-dashboard-gateway",
            "ConfigMap/tether-dashboard-operator",
            "Deployment/tether-operator",
            "PodDisruptionBudget/tether-operator",
            "Role/tether-operator-leader",
            "RoleBinding/tether-operator-leader",
            "ServiceAccount/tether-operator",
        ]
    ),
    f"default objects: {kinds(docs)}",
)
deploy = find(docs, "Deployment")[0]
check(deploy["spec"]["replicas"] == 2, "two operator replicas by default")
container = deploy["spec"]["template"]["spec"]["containers"][0]
args = container["args"]
check("--lease-name=tether-operator" in args, f"lease name in args: {args}")
check("--pin-gateway-images" not in args, f"pools follow gatewayImage unless asked: {args}")
check(any(a.startswith("--gateway-image=ghcr.io/tether-dev/tether-gateway:") for a in args), f"gateway image: {args}")
check(container["securityContext"]["readOnlyRootFilesystem"] is True, "read-only root filesystem")
check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe")
env = {e["name"] for e in container["env"]}
check({"POD_NAME", "POD_NAMESPACE"} <= env, f"downward API env: {env}")
rules = find(docs, "ClusterRole")[0]["rules"]
secret_rules = [r for r in rules if "secrets" in r["resources"]]
# Secrets: read by name, and the one the operator owns (a managed NATS's generated token)
# created; never list or watch, which would cache every Secret it can see, and never
# delete (the garbage collector deletes the token with its pool).
check(
    secret_rules and set(secret_rules[0]["verbs"]) == {"get", "create"},
    f"Secrets: get and create only, no list/watch/delete: {secret_rules}",
)
pod_rules = [r for r in rules if "pods" in r["resources"]]
check(
    pod_rules and set(pod_rules[0]["verbs"]) == {"get", "list", "watch", "patch", "delete"},
    f"Pods: get/list/watch (to grant them to gateways), patch (instructions), delete (rollouts): {pod_rules}",
)
pvc_rules = [r for r in rules if "persistentvolumeclaims" in r["resources"]]
check(
    pvc_rules and set(pvc_rules[0]["verbs"]) == {"get", "patch"},
    f"PersistentVolumeClaims: get and patch only (a managed NATS's volumes grow): {pvc_rules}",
)
check(all("*" not in r["verbs"] and "*" not in r["resources"] for r in rules), "no wildcards in RBAC")
lease_rules = find(docs, "Role")[0]["rules"]
check(any(r.get("resourceNames") == ["tether-operator"] for r in lease_rules), "lease get/update limited by name")

# 3. One namespace: a Role there instead of a ClusterRole, and the flag.
docs = render({"watchNamespace": "tenants"})
check(not find(docs, "ClusterRole"), "no ClusterRole when watching one namespace")
roles = {(d["metadata"]["name"], d["metadata"]["namespace"]) for d in find(docs, "Role")}
check(("tether-operator", "tenants") in roles, f"Role in the watched namespace: {roles}")
args = find(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
check("--namespace=tenants" in args, f"--namespace flag: {args}")

# 3b. Tenant namespaces: Secrets and Pods only there, the rest cluster-wide.
docs = render({"tenantNamespaces": ["team-a", "team-b"]})
cluster_rules = find(docs, "ClusterRole")[0]["rules"]
check(
    not any({"secrets", "pods", "persistentvolumeclaims"} & set(r["resources"]) for r in cluster_rules),
    f"no cluster-wide Secret, Pod or claim rights with tenantNamespaces: {cluster_rules}",
)
tenant_roles = {d["metadata"]["namespace"]: d for d in find(docs, "Role") if d["metadata"]["name"] == "tether-operator-tenant"}
check(sorted(tenant_roles) == ["team-a", "team-b"], f"a Role per tenant namespace: {sorted(tenant_roles)}")
for ns, role in tenant_roles.items():
    granted = {res: set(r["verbs"]) for r in role["rules"] for res in r["resources"]}
    check(granted == {"secrets": {"get", "create"}, "pods": {"get", "list", "watch", "patch", "delete"}, "persistentvolumeclaims": {"get", "patch"}}, f"{ns}: {granted}")
bindings = {d["metadata"]["namespace"] for d in find(docs, "RoleBinding") if d["metadata"]["name"] == "tether-operator-tenant"}
check(bindings == {"team-a", "team-b"}, f"bound in each: {bindings}")
try:
    render({"watchNamespace": "tenants", "tenantNamespaces": ["tenants"]})
    failures.append("watchNamespace with tenantNamespaces was accepted")
except helm.HelmError as err:
    check("tenantNamespaces" in str(err), f"the refusal says why: {err}")

# Opt-in rolling: the operator pins running pools at each start.
args = find(render({"pinGatewayImages": True}), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["args"]
check("--pin-gateway-images" in args, f"--pin-gateway-images flag: {args}")

# 4. Values the schema or the templates must refuse.
for bad in ({"replicaCount": "two"}, {"logFormat": "xml"}, {"unknownKey": 1}, {"watchNamespace": "Not_A_Namespace"}, {"pinGatewayImages": "yes"}, {"tenantNamespaces": ["Bad_NS"]}, {"tenantNamespaces": "team-a"}):
    try:
        render(bad)
        failures.append(f"values {bad} were accepted")
    except helm.HelmError:
        pass
try:
    render({"replicaCount": 2, "leaderElection": {"enabled": False}})
    failures.append("two replicas without leader election were accepted")
except helm.HelmError as err:
    check("leaderElection" in str(err), f"the refusal says why: {err}")

# 5. The chart ships the generated CRD (crdgen --check verifies it is current).
crds = [c["name"] for c in helm.Chart.load(CHART).crds]
check(crds == ["crds/connectionpool.yaml"], f"chart CRDs: {crds}")

# 6. Grafana dashboards: one ConfigMap per dashboards/*.json, labelled for the Grafana
#    sidecar, carrying the file unchanged; off with dashboards.enabled=false.
files = sorted((CHART / "dashboards").glob("*.json"))
check([f.name for f in files] == ["tether-gateway.json", "tether-operator.json"], f"dashboard files: {files}")
maps = {d["metadata"]["name"]: d for d in find(render({}), "ConfigMap")}
for f in files:
    name = "tether-dashboard-" + f.stem.removeprefix("tether-")
    cm = maps.get(name)
    if cm is None:
        failures.append(f"no ConfigMap {name} for {f.name}: {sorted(maps)}")
        continue
    check(cm["metadata"]["labels"].get("grafana_dashboard") == "1", f"{name}: grafana_dashboard label")
    check(cm["metadata"]["namespace"] == "tether-system", f"{name}: release namespace")
    check(cm["metadata"].get("annotations", {}).get("grafana_folder") == "Tether", f"{name}: folder")
    try:
        shipped = json.loads(cm["data"][f.name])
        check(shipped == json.loads(f.read_text()), f"{name}: the dashboard is shipped unchanged")
        check(shipped.get("uid") == f.stem, f"{name}: uid {shipped.get('uid')} is the file's stem")
    except (KeyError, ValueError) as err:
        failures.append(f"{name}: dashboard JSON: {err}")
check(not find(render({"dashboards": {"enabled": False}}), "ConfigMap"), "dashboards.enabled=false ships none")
moved = find(render({"dashboards": {"namespace": "monitoring", "label": "grafana.io/dashboard", "labelValue": "tether"}}), "ConfigMap")
check(
    len(moved) == 2
    and all(c["metadata"]["namespace"] == "monitoring" for c in moved)
    and all(c["metadata"]["labels"].get("grafana.io/dashboard") == "tether" for c in moved),
    "dashboards.namespace and the sidecar label are honoured",
)

# 6b. PodMonitors: none by default; when enabled, one for the operator's admin port and
#     one for every pool's gateway pods (their `api` port), both at /metrics, with the
#     extra labels; gateway namespaces from the value, else watchNamespace, else all.
check(not find(render({}), "PodMonitor"), "no PodMonitor by default")
monitors = {d["metadata"]["name"]: d for d in find(render({"monitoring": {"podMonitors": {"enabled": True, "labels": {"release": "kps"}}}}), "PodMonitor")}
check(sorted(monitors) == ["tether-gateways", "tether-operator"], f"PodMonitors: {sorted(monitors)}")
if len(monitors) == 2:
    op, gw = monitors["tether-operator"], monitors["tether-gateways"]
    check(op["apiVersion"] == "monitoring.coreos.com/v1", "PodMonitor apiVersion")
    check(op["spec"]["podMetricsEndpoints"] == [{"port": "admin", "path": "/metrics", "interval": "30s"}], f"operator endpoint: {op['spec']}")
    check(op["spec"]["selector"]["matchLabels"] == find(render({}), "Deployment")[0]["spec"]["selector"]["matchLabels"],
          "the operator PodMonitor selects the operator's pods")
    check(gw["spec"]["podMetricsEndpoints"] == [{"port": "api", "path": "/metrics", "interval": "30s"}], f"gateway endpoint: {gw['spec']}")
    check(gw["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "tether-gateway", "app.kubernetes.io/part-of": "tether"},
          f"gateway selector: {gw['spec']['selector']}")
    check(gw["spec"]["namespaceSelector"] == {"any": True}, f"all namespaces by default: {gw['spec']['namespaceSelector']}")
    check(all(m["metadata"]["labels"].get("release") == "kps" for m in monitors.values()), "extra labels on both")
gw = [d for d in find(render({"watchNamespace": "tenants", "monitoring": {"podMonitors": {"enabled": True}}}), "PodMonitor") if d["metadata"]["name"] == "tether-gateways"]
check(gw and gw[0]["spec"]["namespaceSelector"] == {"matchNames": ["tenants"]}, f"watchNamespace scopes the gateway PodMonitor: {gw}")
gw = [d for d in find(render({"monitoring": {"podMonitors": {"enabled": True, "gatewayNamespaces": ["a", "b"]}}}), "PodMonitor") if d["metadata"]["name"] == "tether-gateways"]
check(gw and gw[0]["spec"]["namespaceSelector"] == {"matchNames": ["a", "b"]}, f"gatewayNamespaces: {gw}")
# The gateways' api port name is the one the operator renders (operator/src/resources.rs).
resources_rs = (REPO / "operator" / "src" / "resources.rs").read_text()
check('{"name": "api", "containerPort": API_PORT' in resources_rs, "gateway pods name their internal port `api`")
for bad in ({"monitoring": {"podMonitors": {"enabled": "yes"}}}, {"monitoring": {"podMonitors": {"interval": "soon"}}},
            {"monitoring": {"serviceMonitors": {}}}):
    try:
        render(bad)
        failures.append(f"values {bad} were accepted")
    except helm.HelmError:
        pass

# The operator's memory limit fits the 10,000 pools measured in docs/benchmarks.md.
limit = find(render({}), "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
check(limit.endswith("Mi") and int(limit[:-2]) >= 413 * 1.2, f"operator memory limit {limit} fits 413 MiB (10,000 pools) with headroom")

# 7. Image digests: accepted, rendered as repository:tag@digest, and anything else refused.
digest = "sha256:" + "0123456789abcdef" * 4
docs = render({"image": {"repository": "registry.test/op", "digest": digest},
               "gatewayImage": {"repository": "registry.test/gw", "tag": "1.2.3", "digest": digest}})
container = find(docs, "Deployment")[0]["spec"]["template"]["spec"]["containers"][0]
check(container["image"] == f"registry.test/op:0.1.0@{digest}", f"operator image by digest: {container['image']}")
check(f"--gateway-image=registry.test/gw:1.2.3@{digest}" in container["args"], f"gateway image by digest: {container['args']}")
for bad in ({"image": {"repository": "r", "digest": "sha256:short"}},
            {"gatewayImage": {"repository": "r", "digest": "md5:" + "0" * 32}},
            {"gatewayImage": {"repository": "r", "tag": "bad tag"}},
            {"dashboards": {"labelValue": "not a label value"}}):
    try:
        render(bad)
        failures.append(f"values {bad} were accepted")
    except helm.HelmError:
        pass

# 8. NOTES: the first commands on install; on upgrade, the CRD step Helm does not do,
#    the same command docs/upgrading.md gives, pointing at a CRD file the chart has.
install_notes = notes({}, is_install=True)
for command in ("rollout status deployment/tether-operator", "kubectl apply -f examples/minimal.yaml",
                "kubectl get cpool", "kubectl patch cpool"):
    check(command in install_notes, f"install notes show `{command}`")
check("--server-side" not in install_notes, "install notes do not ask for a CRD apply")
upgrade_notes = notes({}, is_install=False, is_upgrade=True, revision=2)
crd_apply = "kubectl apply --server-side --force-conflicts -f"
check(f"| {crd_apply} -" in upgrade_notes, f"upgrade notes pipe `helm show crds` into `{crd_apply} -`")
check(f"{crd_apply} charts/tether/crds/" in upgrade_notes, "upgrade notes name the chart's crds/ directory")
upgrading = (REPO / "docs" / "upgrading.md").read_text()
check(f"{crd_apply} charts/tether/crds/" in upgrading and f"| {crd_apply} -" in upgrading,
      "docs/upgrading.md gives the same CRD commands")
check('"image":"ghcr.io/tether-dev/tether-gateway:0.1.0"' in install_notes, "install notes show how to pin the gateway image")

# 9. The chart's CRD is the generated one and plain YAML: Helm does not template crds/.
chart_crd = (CHART / "crds" / "connectionpool.yaml").read_text()
check(chart_crd == (REPO / "crds" / "connectionpool.yaml").read_text(), "charts/tether/crds is the generated CRD")
check("{{" not in chart_crd, "the CRD file has no template directives")
crd = yaml.safe_load(chart_crd)
check(crd["metadata"]["name"] == "connectionpools.tether.dev" and "upgrade" not in str(crd["metadata"].get("annotations", {})),
      "the CRD is not a Helm hook")
check("connectionpools.tether.dev" in install_notes, "install notes name the CRD")

if failures:
    for f in failures:
        print(f"chart check FAILED: {f}", file=sys.stderr)
    sys.exit(1)
print("chart check: lint, schema, rendering, dashboards, PodMonitors, image digests, notes and CRD upgrade path OK")
