#!/usr/bin/env python3
"""Renders the chart with the real Helm engine (helm-python-sdk) and prints the objects
as one JSON list: what `helm template tether charts/tether -n tether-system` prints.
The e2e harness's container mode runs the operator from what this renders.

    python3 charts/render.py --values '{"watchNamespace": "tenants"}' --kind Deployment
"""

import argparse
import json
import pathlib

import helm_python as helm
import yaml

CHART = pathlib.Path(__file__).resolve().parent / "tether"

parser = argparse.ArgumentParser(description="Render the tether chart as JSON.")
parser.add_argument("--values", default="{}", help="values, as JSON")
parser.add_argument("--namespace", default="tether-system")
parser.add_argument("--kind", help="only objects of this kind")
args = parser.parse_args()

values = json.loads(args.values)
chart = helm.Chart.load(CHART)
chart.validate_schema(values)
manifests = chart.render(values, name="tether", namespace=args.namespace, is_install=True)
docs = []
for path, text in sorted(manifests.items()):
    if path.endswith("NOTES.txt"):
        continue
    for doc in yaml.safe_load_all(text):
        if doc and (args.kind is None or doc.get("kind") == args.kind):
            docs.append(doc)
print(json.dumps(docs))
