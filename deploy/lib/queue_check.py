"""Checks that each rendered ScaledObject's trigger reads a number from a
live coordinator exactly as KEDA's metrics-api scaler would: the URL's path
and query against the coordinator's HTTP side door, then `valueLocation`
(GJSON) on the JSON answer. Before reading, it queues COUNT tasks per model
(a different count for each) so the value must be that model's own queue,
not another model's or a total. A coordinator admits jobs only for models a
worker has announced, so a sim worker announces them all first and is then
killed before it can lease anything.

Usage: queue_check.py SCALEDOBJECTS_JSON HTTP_BASE GRPC_URL KILN_BIN WORKER_BIN WORKDIR
"""

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(__file__))
import gjson  # noqa: E402

TIMEOUT_S = 10


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def submit(kiln, grpc, workdir, model, count):
    path = os.path.join(workdir, f"batch-{len(os.listdir(workdir))}.toml")
    with open(path, "w") as f:
        f.write(f'[defaults]\nmodel = "{model}"\nwidth = 64\nheight = 64\nsteps = 2\n')
        for i in range(count):
            f.write(f'[[items]]\nprompt = "queue check {i}"\nseed = {i + 1}\n')
    r = subprocess.run([kiln, "submit", path, "--coordinator", grpc, "--json"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        fail(f"kiln submit for model {model}: {r.stderr.strip()[-300:]}")


def get_json(url):
    with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
        return json.load(r)


def announce(worker, grpc, base, models, workdir):
    """Starts a sim worker holding MODELS, waits until the coordinator counts it for each, kills it."""
    args = [worker, "--coordinator", grpc, "--renderer", "sim", "--id", "queue-check"]
    for m in models:
        args += ["--model", m]
    log = open(os.path.join(workdir, "worker.log"), "w")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            answer = get_json(f"{base}/api/v1/queue")
            if all(answer["models"].get(m, {}).get("workers", 0) >= 1 for m in models):
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                fail(f"the sim worker did not announce {models}: {open(log.name).read()[-300:]}")
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()


def main():
    scaled_path, base, grpc, kiln, worker, workdir = sys.argv[1:7]
    scaled = json.load(open(scaled_path))
    triggers = [(s["shape"], s["object"]["metadata"]["name"], t["metadata"])
                for s in scaled for t in s["object"]["spec"]["triggers"]]
    models = sorted({urllib.parse.parse_qs(urllib.parse.urlsplit(m["url"]).query).get("model", [""])[0]
                     for _, _, m in triggers})
    if "" in models:
        fail("a trigger URL has no ?model=")
    announce(worker, grpc, base, models, workdir)
    expected = {}
    for i, model in enumerate(models):
        expected[model] = i + 2
        submit(kiln, grpc, workdir, model, expected[model])
    for shape, name, meta in triggers:
        url = urllib.parse.urlsplit(meta["url"])
        model = urllib.parse.parse_qs(url.query)["model"][0]
        if url.path != "/api/v1/queue":
            fail(f"{shape} {name}: trigger path {url.path}, expected /api/v1/queue")
        live = f"{base}{url.path}?{url.query}"
        try:
            answer = get_json(live)
        except Exception as e:  # URLError, HTTPError, JSON errors: all one failure here
            fail(f"{shape} {name}: GET {live}: {e}")
        try:
            value = gjson.get(answer, meta["valueLocation"])
        except (KeyError, ValueError) as e:
            fail(f"{shape} {name}: {e}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"{shape} {name}: {meta['valueLocation']} selects {value!r}, not a number")
        if value != expected[model]:
            fail(f"{shape} {name}: {meta['valueLocation']} reads {value}, but {expected[model]} tasks of "
                 f"{model} are queued (answer: {json.dumps(answer)[:300]})")
        float(meta["targetValue"])
        print(f"ok   {shape} {name}: GET {url.path}?{url.query} -> {meta['valueLocation']} = {value}")


if __name__ == "__main__":
    main()
