"""Plays KEDA and the HPA against real kiln processes (see deploy/autoscale-test).

Reads the ScaledObject the chart renders for one values file (target,
min/max replicas, cooldown, polling interval, HPA behaviour), polls the live
coordinator's /api/v1/queue exactly as KEDA's metrics-api scaler does (URL
path and query, GJSON valueLocation), computes replicas with the HPA's
formula and behaviour, and starts or SIGTERMs kiln-worker processes (sim
renderer) to match. Intervals are divided by --speedup so the scenario fits
in minutes; the formula is unchanged.

Scenario: idle at 0 workers -> a burst of BURST tasks -> scale up to max ->
the queue drains -> scale-down begins, and a second burst arrives at the
moment the first worker is SIGTERMed -> drained again -> back to 0 workers
after the cooldown. Then every task must be done exactly once.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import yaml
from helm_python import chart as hc

sys.path.insert(0, os.path.dirname(__file__))
import gjson  # noqa: E402
from hpa import HPA_SYNC_S, Hpa  # noqa: E402

TICK_S = 0.05


def log(msg, t0=[time.monotonic()]):
    print(f"[{time.monotonic() - t0[0]:7.1f}s] {msg}", flush=True)


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def scaled_object(chart, values_file):
    values = yaml.safe_load(open(values_file)) or {}
    docs = []
    for text in hc.Chart.load(chart).render(values, name="farm", namespace="kiln", is_install=True).values():
        docs += [d for d in yaml.safe_load_all(text) if d]
    sos = [d for d in docs if d["kind"] == "ScaledObject"]
    if not sos:
        fail(f"{values_file} renders no ScaledObject")
    return sos[0]


class Farm:
    def __init__(self, a, workdir):
        self.a, self.workdir = a, workdir
        port, http = free_port(), free_port()
        self.grpc = f"http://127.0.0.1:{port}"
        self.http = f"http://127.0.0.1:{http}"
        self.coord = subprocess.Popen(
            [a.coordinator, "--listen", f"127.0.0.1:{port}", "--http", f"127.0.0.1:{http}",
             "--results", os.path.join(workdir, "results"), "--lease-ttl", "5s",
             "--heartbeat-interval", "1s", "--model-grace", "30m"],
            stdout=open(os.path.join(workdir, "coordinator.log"), "w"), stderr=subprocess.STDOUT)
        self.workers = {}       # id -> Popen, newest last
        self.stopping = {}      # id -> Popen
        self.started = 0
        self.drain_flag = "--drain-timeout" in subprocess.run(
            [a.worker, "--help"], capture_output=True, text=True).stdout
        deadline = time.monotonic() + 60
        while True:
            try:
                get_json(f"{self.http}/healthz", raw=True)
                return
            except OSError:
                if self.coord.poll() is not None or time.monotonic() > deadline:
                    fail("the coordinator did not start")
                time.sleep(0.1)

    def worker_args(self, wid, model):
        args = [self.a.worker, "--coordinator", self.grpc, "--renderer", "sim", "--id", wid,
                "--model", model, "--sim-step", self.a.sim_step]
        if self.drain_flag:
            args += ["--drain-timeout", f"{self.a.drain_timeout}s"]
        return args

    def scale_to(self, n, model):
        while len(self.workers) < n:
            self.started += 1
            wid = f"as-{self.started:03d}"
            self.workers[wid] = subprocess.Popen(
                self.worker_args(wid, model),
                stdout=open(os.path.join(self.workdir, f"{wid}.log"), "w"), stderr=subprocess.STDOUT)
        while len(self.workers) > n:
            wid = list(self.workers)[-1]  # a ReplicaSet removes the newest pods first
            proc = self.workers.pop(wid)
            proc.send_signal(signal.SIGTERM)
            self.stopping[wid] = proc

    def reap(self):
        for wid, proc in list(self.stopping.items()):
            if proc.poll() is not None:
                del self.stopping[wid]
        for wid, proc in list(self.workers.items()):
            if proc.poll() is not None:
                fail(f"worker {wid} exited on its own ({proc.returncode}): "
                     f"{open(os.path.join(self.workdir, wid + '.log')).read()[-300:]}")

    def alive(self):
        return len(self.workers) + len(self.stopping)

    def close(self):
        for proc in list(self.workers.values()) + list(self.stopping.values()):
            proc.kill()
            proc.wait()
        self.coord.terminate()
        try:
            self.coord.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.coord.kill()
            self.coord.wait()


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def get_json(url, raw=False):
    with urllib.request.urlopen(url, timeout=5) as r:
        body = r.read()
    return body if raw else json.loads(body)


def kiln(a, farm, *args):
    r = subprocess.run([a.kiln, *args, "--coordinator", farm.grpc], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        fail(f"kiln {' '.join(args)}: {r.stderr.strip()[-300:]}")
    return r.stdout


def submit(a, farm, model, first_seed, count, name):
    path = os.path.join(farm.workdir, f"{name}.toml")
    with open(path, "w") as f:
        f.write(f'name = "{name}"\n[defaults]\nmodel = "{model}"\nwidth = 64\nheight = 64\nsteps = {a.steps}\n')
        for i in range(count):
            f.write(f'[[items]]\nprompt = "{name} item {i}"\nseed = {first_seed + i}\n')
    job = json.loads(kiln(a, farm, "submit", path, "--json"))["job_id"]
    log(f"submitted {name}: {count} tasks of {model} (job {job})")
    return job


def announce(a, farm, model):
    """A scaled-to-zero farm has seen its models before (the store keeps the catalog):
    a worker announces the model once and is killed before any task exists."""
    proc = subprocess.Popen(farm.worker_args("as-announce", model), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while get_json(f"{farm.http}/api/v1/queue?model={model}")["models"][model]["workers"] < 1:
        if time.monotonic() > deadline:
            fail("the announcing worker never registered")
        time.sleep(0.1)
    proc.kill()
    proc.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--chart", required=True)
    p.add_argument("--values", required=True)
    p.add_argument("--coordinator", required=True)
    p.add_argument("--worker", required=True)
    p.add_argument("--kiln", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--speedup", type=float, default=20)
    p.add_argument("--burst", type=int, default=2000)
    p.add_argument("--second-burst", type=int, default=300)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--sim-step", default="25ms")
    p.add_argument("--drain-timeout", type=int, default=60)
    p.add_argument("--deadline", type=float, default=540)
    a = p.parse_args()

    so = scaled_object(a.chart, a.values)
    spec = so["spec"]
    trig = spec["triggers"][0]["metadata"]
    url = urllib.parse.urlsplit(trig["url"])
    model = urllib.parse.parse_qs(url.query)["model"][0]
    target = float(trig["targetValue"])
    activation = float(trig.get("activationTargetValue", 0))
    min_r, max_r = int(spec.get("minReplicaCount", 0)), int(spec["maxReplicaCount"])
    poll = float(spec.get("pollingInterval", 30)) / a.speedup
    cooldown = float(spec.get("cooldownPeriod", 300)) / a.speedup
    hpa = Hpa(spec, a.speedup)
    log(f"ScaledObject {so['metadata']['name']} ({os.path.basename(a.values)}): model {model}, "
        f"target {target:g} queued/worker, replicas {min_r}..{max_r}, polling {spec.get('pollingInterval')} s, "
        f"cooldown {spec.get('cooldownPeriod')} s; speedup x{a.speedup:g} -> polling {poll:.2f} s, "
        f"cooldown {cooldown:.1f} s, HPA sync {HPA_SYNC_S / a.speedup:.2f} s")
    if min_r != 0:
        fail(f"{a.values}: minReplicaCount {min_r}: the scenario starts and ends at 0 workers")

    farm = Farm(a, a.workdir)
    try:
        log(f"coordinator up at {farm.grpc}; kiln-worker --drain-timeout: {'yes' if farm.drain_flag else 'no (drains on SIGTERM without a timeout)'}")
        announce(a, farm, model)
        metric_url = f"{farm.http}{url.path}?{url.query}"
        replicas, metric, running, last_active = 0, 0.0, 0, None
        next_poll = next_sync = time.monotonic()
        peak, jobs, phase = 0, {}, "idle"
        idle_until = time.monotonic() + 2 * poll
        burst_at = {}
        t_end = time.monotonic() + a.deadline
        while True:
            now = time.monotonic()
            if now > t_end:
                fail(f"the scenario did not finish within {a.deadline:.0f} s (phase {phase}, replicas {replicas})")
            farm.reap()
            if now >= next_poll:  # KEDA's metrics-api scaler
                next_poll = now + poll
                answer = get_json(metric_url)
                value = gjson.get(answer, trig["valueLocation"])
                if not isinstance(value, (int, float)):
                    fail(f"{trig['valueLocation']} selects {value!r}")
                metric = float(value)
                running = answer["models"][model]["running"]
                if metric > activation:
                    last_active = now
                    if replicas == 0:  # KEDA activates 0 -> max(min, 1) itself
                        replicas = max(min_r, 1)
                        log(f"KEDA: queued {metric:g} > {activation:g}: activate, 0 -> {replicas}")
                elif replicas > 0 and min_r == 0 and last_active is not None and now - last_active >= cooldown:
                    log(f"KEDA: inactive for the cooldown: {replicas} -> 0")
                    replicas = 0
            if replicas > 0 and now >= next_sync:  # the HPA
                next_sync = now + HPA_SYNC_S / a.speedup
                new = hpa.replicas(replicas, metric, target, now)
                if new != replicas:
                    log(f"HPA: queued {metric:g}, target {target:g}/worker: {replicas} -> {new}")
                    replicas = new
            if phase == "first" and replicas < len(farm.workers):
                # Scale-down has begun: the second burst arrives now, and the
                # workers about to be stopped get to lease some of it first.
                burst_at["second"] = time.time()
                jobs["second"] = submit(a, farm, model, 1_000_000, a.second_burst, "second")
                phase = "second"
                busy_by = time.monotonic() + 5
                while (get_json(metric_url)["models"][model]["running"] < len(farm.workers)
                       and time.monotonic() < busy_by):
                    time.sleep(TICK_S)
                log(f"second burst leased by {get_json(metric_url)['models'][model]['running']} workers; "
                    f"SIGTERM {len(farm.workers) - replicas} of them")
            farm.scale_to(replicas, model)
            peak = max(peak, len(farm.workers))
            if phase == "idle" and now >= idle_until:
                if farm.alive() != 0:
                    fail("workers run while idle")
                burst_at["first"] = time.time()
                jobs["first"] = submit(a, farm, model, 1, a.burst, "first")
                phase = "first"
            elif phase == "second" and replicas == 0 and farm.alive() == 0 and metric == running == 0:
                break
            time.sleep(TICK_S)
        log("back to 0 workers")
        report(a, farm, jobs, burst_at, peak, max_r)
    finally:
        farm.close()


def report(a, farm, jobs, burst_at, peak, max_r):
    expected = {"first": a.burst, "second": a.second_burst}
    lost = duplicated = 0
    wasted = 0.0
    first_lease = {}
    handed_back = 0
    for name, job in jobs.items():
        tasks = json.loads(kiln(a, farm, "tasks", job, "--json"))
        manifest = os.path.join(farm.workdir, "results", job, "manifest.jsonl")
        lines = [json.loads(x) for x in open(manifest)] if os.path.exists(manifest) else []
        done = [x["index"] for x in lines if x.get("status") == "completed"]
        pngs = [f for f in os.listdir(os.path.join(farm.workdir, "results", job)) if f.endswith(".png")]
        lost += expected[name] - len(set(done))
        duplicated += len(done) - len(set(done))
        duplicated += sum(max(0, sum(1 for x in t["attempts"] if x["outcome"] == "completed") - 1) for t in tasks)
        if len(pngs) != len(set(done)):
            fail(f"{name}: {len(pngs)} images for {len(set(done))} completed items")
        starts = [x["started_at_ms"] for t in tasks for x in t["attempts"]]
        first_lease[name] = (min(starts) / 1000 - burst_at[name]) if starts else float("nan")
        for t in tasks:
            for x in t["attempts"]:
                if x["outcome"] != "completed":
                    handed_back += 1
                    wasted += max(0, x["ended_at_ms"] - x["started_at_ms"]) / 1000
    print(f"time to first lease after the burst: {first_lease['first']:.2f} s "
          f"(second burst, during scale-down: {first_lease['second']:.2f} s)")
    print(f"peak workers: {peak} (max {max_r}); workers started in all: {farm.started}")
    print(f"task-seconds wasted by scale-down: {wasted:.2f} ({handed_back} attempts not completed)")
    print(f"tasks: {a.burst + a.second_burst}, lost {lost}, duplicated {duplicated}")
    if peak != max_r:
        fail(f"peak workers {peak}, expected the ScaledObject's max {max_r}")
    if lost or duplicated:
        fail(f"lost {lost}, duplicated {duplicated}")


if __name__ == "__main__":
    main()
