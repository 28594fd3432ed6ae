#!/usr/bin/env python3
"""Lints and renders the Helm chart with the real Helm engine (helm-python-sdk wraps
Helm's Go SDK), and checks what it renders. Exits non-zero on any problem.

    pip install helm-python-sdk pyyaml
    python3 charts/check.py
"""

import pathlib
import sys

import helm_python as helm
import yaml

CHART = pathlib.Path(__file__).resolve().parent / "tether"
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
check(any(a.startswith("--gateway-image=ghcr.io/tether-dev/tether-gateway:") for a in args), f"gateway image: {args}")
check(container["securityContext"]["readOnlyRootFilesystem"] is True, "read-only root filesystem")
check(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe")
env = {e["name"] for e in container["env"]}
check({"POD_NAME", "POD_NAMESPACE"} <= env, f"downward API env: {env}")
rules = find(docs, "ClusterRole")[0]["rules"]
secret_rules = [r for r in rules if "secrets" in r["resources"]]
check(secret_rules and secret_rules[0]["verbs"] == ["get"], "Secrets: get only, no list/watch")
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

# 4. Values the schema or the templates must refuse.
for bad in ({"replicaCount": "two"}, {"logFormat": "xml"}, {"unknownKey": 1}, {"watchNamespace": "Not_A_Namespace"}):
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

if failures:
    for f in failures:
        print(f"chart check FAILED: {f}", file=sys.stderr)
    sys.exit(1)
print("chart check: lint, schema and rendering OK")
