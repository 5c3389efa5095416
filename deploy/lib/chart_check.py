"""Renders the kiln chart with every ci/*.yaml values file through Helm's own
engine, lints it in strict mode, validates the KEDA objects against KEDA's
models, and writes the built-in objects of each shape (for
kubernetes-validate) and the ScaledObjects (for queue_check.py) to OUT.

Usage: chart_check.py CHART OUT
"""

import glob
import json
import os
import sys

import yaml
from cloudcoil.models.keda import v1alpha1
from helm_python import chart as hc

KUBE_VERSION = "v1.30.0"
BUILTIN_GROUPS = ("v1", "apps", "policy", "batch", "autoscaling", "networking.k8s.io",
                  "rbac.authorization.k8s.io")
KEDA_KINDS = {"ScaledObject": v1alpha1.ScaledObject,
              "TriggerAuthentication": v1alpha1.TriggerAuthentication}
# Custom resources the chart may render whose schema is not checked here.
OTHER_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def render(chart, values):
    docs = []
    for path, text in sorted(hc.Chart.load(chart).render(
            values, name="farm", namespace="kiln", is_install=True).items()):
        try:
            docs += [d for d in yaml.safe_load_all(text) if d]
        except yaml.YAMLError as e:
            fail(f"{path} does not render to YAML: {e}")
    return docs


def check_shape(base, docs):
    """What every shape must hold, beyond the schemas."""
    kinds = [d["kind"] for d in docs]
    for kind in ("Deployment", "Service", "PodDisruptionBudget"):
        if kind not in kinds:
            fail(f"{base}: no {kind} rendered")
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"]:
            if "readinessProbe" not in c:
                fail(f"{base}: {d['metadata']['name']}/{c['name']} has no readinessProbe")
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker":
            c = spec["containers"][0]
            drain = [a for a in c["args"] if a.startswith("--drain-timeout=")]
            if not drain:
                fail(f"{base}: worker {d['metadata']['name']} has no --drain-timeout")
            seconds = int(drain[0].split("=", 1)[1].rstrip("s"))
            if spec.get("terminationGracePeriodSeconds", 30) <= seconds:
                fail(f"{base}: worker {d['metadata']['name']}: grace period "
                     f"{spec.get('terminationGracePeriodSeconds', 30)} s is not over the drain timeout {seconds} s")
    for d in docs:
        if d["kind"] in KEDA_KINDS:
            try:
                KEDA_KINDS[d["kind"]].model_validate(d)
            except Exception as e:  # pydantic's ValidationError, one line per field
                fail(f"{base}: {d['kind']} {d['metadata']['name']} is not a valid KEDA 2.16 object: {e}")
        elif d["apiVersion"].split("/")[0] not in BUILTIN_GROUPS and d["kind"] not in OTHER_KINDS:
            fail(f"{base}: unexpected kind {d['apiVersion']} {d['kind']}")
    for so in (d for d in docs if d["kind"] == "ScaledObject"):
        target = so["spec"]["scaleTargetRef"]["name"]
        if not any(d["kind"] == "Deployment" and d["metadata"]["name"] == target for d in docs):
            fail(f"{base}: ScaledObject {so['metadata']['name']} targets {target}, which is not rendered")
        for t in so["spec"]["triggers"]:
            if t["type"] != "metrics-api":
                fail(f"{base}: ScaledObject {so['metadata']['name']}: trigger {t['type']}")
            ref = t.get("authenticationRef", {}).get("name")
            if ref and not any(d["kind"] == "TriggerAuthentication" and d["metadata"]["name"] == ref for d in docs):
                fail(f"{base}: trigger authenticationRef {ref} is not rendered")


def main():
    chart, out = sys.argv[1], sys.argv[2]
    files = sorted(glob.glob(f"{chart}/ci/*.yaml"))
    if len(files) < 3:
        fail(f"expected at least 3 values files in {chart}/ci, found {len(files)}")
    scaled = []
    for vf in [None] + files:
        base = os.path.basename(vf)[:-5] if vf else "defaults"
        values = (yaml.safe_load(open(vf)) or {}) if vf else {}
        lint = hc.lint(chart, values, strict=True, kube_version=KUBE_VERSION)
        bad = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
        if bad or lint.get("errors"):
            fail(f"helm lint --strict {base}: {(bad or lint['errors'])[:3]}")
        docs = render(chart, values)
        check_shape(base, docs)
        builtin = [d for d in docs if d["apiVersion"].split("/")[0] in BUILTIN_GROUPS]
        with open(f"{out}/{base}.yaml", "w") as f:
            yaml.safe_dump_all(builtin, f)
        scaled += [{"shape": base, "object": d} for d in docs if d["kind"] == "ScaledObject"]
        print(f"ok   helm lint --strict + render {base}: {len(docs)} objects "
              f"({', '.join(sorted(set(d['kind'] for d in docs)))})")
    if not scaled:
        fail("no values file renders a ScaledObject")
    with open(f"{out}/scaledobjects.json", "w") as f:
        json.dump(scaled, f)


if __name__ == "__main__":
    main()
