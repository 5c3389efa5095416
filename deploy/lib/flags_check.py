"""Checks that every command-line flag and KILN_* environment variable the
rendered chart gives kiln-coordinator and kiln-worker is one the binaries
know (from their --help), so a renamed or missing flag fails here rather
than in a crash-looping pod.

Usage: flags_check.py RENDERED_DIR COORDINATOR_BIN WORKER_BIN
"""

import glob
import re
import subprocess
import sys

import yaml

# Variables the chart sets for the kubelet's $(VAR) expansion, not for kiln.
CHART_ONLY_ENV = {"KILN_REDIS_PASSWORD"}


def help_text(binary):
    try:
        return subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        sys.exit(f"FAIL: {binary} --help: {e}")


def main():
    rendered, coordinator, worker = sys.argv[1:4]
    helps = {"coordinator": help_text(coordinator), "worker": help_text(worker)}
    missing, checked = [], 0
    for path in sorted(glob.glob(f"{rendered}/*.yaml")):
        for d in yaml.safe_load_all(open(path)):
            if not d or d["kind"] != "Deployment":
                continue
            component = d["metadata"]["labels"].get("app.kubernetes.io/component")
            if component not in helps:
                continue
            text = helps[component]
            known_flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", text))
            for c in d["spec"]["template"]["spec"]["containers"]:
                for arg in c.get("args", []):
                    if arg.startswith("--"):
                        checked += 1
                        flag = arg.split("=", 1)[0]
                        if flag not in known_flags:
                            missing.append(f"{path.rsplit('/', 1)[-1]}: {d['metadata']['name']}: kiln-{component} has no {flag}")
                for env in c.get("env", []):
                    name = env["name"]
                    if name.startswith("KILN_") and name not in CHART_ONLY_ENV:
                        checked += 1
                        if name not in text:
                            missing.append(f"{path.rsplit('/', 1)[-1]}: {d['metadata']['name']}: kiln-{component} does not read {name}")
    if missing:
        sys.exit("FAIL: the chart passes what the binaries do not take:\n  " + "\n  ".join(sorted(set(missing))))
    print(f"ok   {checked} flags and KILN_* variables of the rendered Deployments are known to the binaries")


if __name__ == "__main__":
    main()
