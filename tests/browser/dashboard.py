"""The dashboard in headless Chromium, from the outside, like a user.

Starts a coordinator (with --auth, the dashboard on --http) and a sim worker
on free loopback ports with temp dirs, then: logs in with a token, watches a
job go from queued to completed without reloading, opens an image and reads
its recipe, cancels a running job from its page, checks that a token of
another project sees nothing of it, and (once workers send previews) sees a
preview of a running task. Saves a screenshot of each page in OUT/shots and
prints the jobs page's weight and first paint.
"""

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from playwright.sync_api import sync_playwright

LONG = 120  # seconds: generous deadlines, never a fixed sleep for an outcome


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_for(what, check, timeout=LONG):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


class Farm:
    """A coordinator with --auth and one sim worker, killed on close."""

    def __init__(self, bin_dir, out):
        self.bin = bin_dir
        self.dir = tempfile.mkdtemp(prefix="kiln-browser-")
        self.out = out
        self.procs = []
        self.tokens = {}
        auth = []
        for name, role, project in [("alice", "submitter", "a"), ("bob", "submitter", "b"),
                                    ("farm-worker", "worker", None)]:
            args = ["token", "new", "--name", name, "--role", role]
            if project:
                args += ["--project", project]
            lines = self.kiln(args).splitlines()
            self.tokens[name] = lines[0].strip()
            auth.append("\n".join(lines[1:]))
        with open(self.path("auth.toml"), "w") as f:
            f.write("\n\n".join(auth) + "\n")
        with open(self.path("w.token"), "w") as f:
            f.write(self.tokens["farm-worker"] + "\n")
        os.chmod(self.path("w.token"), 0o600)
        self.grpc_port, self.http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.grpc_port}"
        self.web = f"http://127.0.0.1:{self.http_port}"
        self.spawn("coordinator", [f"{self.bin}/kiln-coordinator", "--listen", f"127.0.0.1:{self.grpc_port}",
                                   "--http", f"127.0.0.1:{self.http_port}", "--results", self.path("results"),
                                   "--auth", self.path("auth.toml")])
        wait_for("the dashboard to answer", lambda: self.status("/login") == 200, 30)
        worker = [f"{self.bin}/kiln-worker", "--coordinator", self.url, "--token-file", self.path("w.token"),
                  "--renderer", "sim", "--sim-step", "300ms", "--model", "simtoy", "--id", "sim-1"]
        self.previews = "--preview-every" in subprocess.run(
            [f"{self.bin}/kiln-worker", "--help"], capture_output=True, text=True).stdout
        self.spawn("worker", worker)

    def path(self, name):
        return os.path.join(self.dir, name)

    def kiln(self, args, token=None):
        env = dict(os.environ)
        if token:
            env["KILN_TOKEN"] = token
        done = subprocess.run([f"{self.bin}/kiln", *args], capture_output=True, text=True, env=env, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"kiln {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def spawn(self, name, args):
        log = open(os.path.join(self.out, f"{name}.log"), "w")
        self.procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT))

    def status(self, path, cookie=None):
        req = urllib.request.Request(self.web + path)
        if cookie:
            req.add_header("Cookie", cookie)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return None

    def submit(self, name, project, token, images, steps):
        text = (f'name = "{name}"\nproject = "{project}"\n[defaults]\nmodel = "simtoy"\nwidth = 64\n'
                f'height = 64\nsteps = {steps}\n[sweep]\nprompt = ["a lighthouse at dusk"]\n'
                f"seed = [{', '.join(str(i + 1) for i in range(images))}]\n")
        path = self.path(f"{name}.toml")
        with open(path, "w") as f:
            f.write(text)
        out = self.kiln(["submit", path, "--coordinator", self.url, "--json"], token)
        return re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", out).group(0)

    def close(self):
        for p in self.procs:
            p.kill()
            p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Run:
    def __init__(self, farm, browser, shots):
        self.farm, self.browser, self.shots = farm, browser, shots
        self.passed, self.skipped = [], []

    def shot(self, page, name):
        page.screenshot(path=os.path.join(self.shots, f"{name}.png"), full_page=True)

    def login(self, who):
        ctx = self.browser.new_context()
        page = ctx.new_page()
        page.goto(self.farm.web + "/")
        page.wait_for_selector("input[name=token]")
        self.shot(page, f"login-{who}")
        page.fill("input[name=token]", self.farm.tokens[who])
        page.keyboard.press("Enter")
        page.wait_for_url(self.farm.web + "/")
        return ctx, page

    def row_state(self, page, name):
        row = page.locator("tr", has=page.locator(f"a:text-is('{name}')"))
        if row.count() == 0:
            return None
        return row.first.locator(".state").inner_text()


def test_login_and_a_job_completes_without_a_reload(run, ctx_page):
    farm = run.farm
    job = farm.submit("lighthouse-study", "a", farm.tokens["alice"], images=6, steps=10)
    ctx, page = run.login("alice")
    page.wait_for_selector("text=lighthouse-study", timeout=15000)
    # A mark in the page's JavaScript world: a reload would lose it.
    page.evaluate("window.__kiln_no_reload = true")
    assert run.row_state(page, "lighthouse-study") in ("running",), run.row_state(page, "lighthouse-study")
    run.shot(page, "jobs-running")
    wait_for("the row to turn completed", lambda: run.row_state(page, "lighthouse-study") == "completed")
    assert page.evaluate("window.__kiln_no_reload === true"), "the page reloaded"
    assert "6/6" in page.locator("tr", has=page.locator("a:text-is('lighthouse-study')")).inner_text()
    run.shot(page, "jobs-done")
    weigh(page)
    ctx_page["alice"] = (ctx, page)
    ctx_page["job"] = job


def weigh(page):
    """Prints the jobs page's weight (bytes over the wire) and first paint."""
    page.reload()
    page.wait_for_load_state("load")
    m = page.evaluate("""() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const res = performance.getEntriesByType('resource');
        const paint = performance.getEntriesByType('paint');
        const fp = paint.find(p => p.name === 'first-contentful-paint') || paint.find(p => p.name === 'first-paint');
        return {
            html: nav.encodedBodySize, transfer: nav.transferSize + res.reduce((s, r) => s + r.transferSize, 0),
            decoded: nav.decodedBodySize + res.reduce((s, r) => s + r.decodedBodySize, 0),
            resources: res.length, first_paint_ms: fp ? fp.startTime : null,
        };
    }""")
    print(f"jobs page weight: {m['decoded']} bytes decoded ({m['transfer']} transferred, "
          f"HTML {m['html']} bytes, {m['resources']} resources); first paint {m['first_paint_ms']:.0f} ms")
    assert m["decoded"] < 200_000, m


def test_the_job_page_shows_the_images_and_an_image_its_recipe(run, ctx_page):
    ctx, page = ctx_page["alice"]
    page.click("text=lighthouse-study")
    page.wait_for_selector(".gallery img")
    wait_for("6 thumbnails to load", lambda: page.evaluate(
        "[...document.querySelectorAll('.gallery img')].filter(i => i.complete && i.naturalWidth > 0).length") == 6)
    run.shot(page, "job")
    page.click(".gallery a >> nth=0")
    page.wait_for_selector("pre.recipe")
    recipe = json.loads(page.inner_text("pre.recipe"))
    assert recipe["prompt"] == "a lighthouse at dusk" and recipe["model"] == "simtoy", recipe
    assert recipe["steps"] == 10, recipe
    parameters = page.inner_text("pre.parameters")
    assert parameters.startswith("a lighthouse at dusk") and "Seed: " in parameters, parameters
    wait_for("the full image", lambda: page.evaluate(
        "(() => { const i = document.querySelector('img.full'); return i.complete && i.naturalWidth == 64; })()"))
    run.shot(page, "image")


def test_workers_and_queue_pages(run, ctx_page):
    ctx, page = ctx_page["alice"]
    page.goto(run.farm.web + "/workers")
    page.wait_for_selector("text=sim-1")
    assert "simtoy" in page.inner_text("table.workers")
    assert page.locator("text=Drain").count() == 0, "a submitter gets no drain button"
    run.shot(page, "workers")
    page.goto(run.farm.web + "/queue")
    page.wait_for_selector("table.queue")
    run.shot(page, "queue")


def slow_job(run, ctx_page):
    if "slow" not in ctx_page:
        ctx_page["slow"] = run.farm.submit("slow-cancel", "a", run.farm.tokens["alice"], images=2, steps=400)
    return ctx_page["slow"]


def test_preview_of_a_running_slow_job(run, ctx_page):
    """Needs the previews branch: workers send previews (--preview-every), the
    coordinator serves GET /api/v1/jobs/{job}/previews/{index}."""
    if not run.farm.previews:
        run.skipped.append("test_preview_of_a_running_slow_job: this kiln-worker has no --preview-every")
        return "skipped"
    ctx, page = ctx_page["alice"]
    job = slow_job(run, ctx_page)
    page.goto(f"{run.farm.web}/jobs/{job}")
    wait_for("a preview of the running task", lambda: page.evaluate(
        "[...document.querySelectorAll('img.preview')].some(i => i.complete && i.naturalWidth > 0)"), 60)
    run.shot(page, "job-preview")


def test_cancel_a_running_job_from_its_page(run, ctx_page):
    ctx, page = ctx_page["alice"]
    job = slow_job(run, ctx_page)
    page.goto(f"{run.farm.web}/jobs/{job}")
    page.wait_for_selector("text=Running", timeout=LONG * 1000)
    run.shot(page, "job-running")
    page.click("button:text-is('Cancel job')")
    page.wait_for_selector(".summary .state.cancelled")
    run.shot(page, "job-cancelled")
    # The farm agrees, through gRPC: the job is cancelled.
    out = run.farm.kiln(["jobs", "--coordinator", run.farm.url, "--json"], run.farm.tokens["alice"])
    entry = find_job(json.loads(out), job)
    assert entry is not None and "cancelled" in json.dumps(entry).lower(), out


def find_job(tree, job):
    """The JSON object that carries the job's id, anywhere in `tree`."""
    if isinstance(tree, dict):
        if job in tree.values():
            return tree
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = find_job(item, job)
            if found is not None:
                return found
    return None


def test_another_project_sees_nothing(run, ctx_page):
    ctx, page = run.login("bob")
    body = page.inner_text("body")
    assert "lighthouse-study" not in body and "slow-cancel" not in body, body
    assert "No jobs to show" in body, body
    run.shot(page, "other-project")
    page.goto(f"{run.farm.web}/jobs/{ctx_page['job']}")
    assert "lighthouse-study" not in page.inner_text("body")
    assert "not found" in page.inner_text("body"), page.inner_text("body")
    shown = page.request.get(f"{run.farm.web}/api/v1/jobs/{ctx_page['job']}/images/0?thumb=1")
    assert shown.status == 404, shown.status
    ctx.close()


TESTS = [
    test_login_and_a_job_completes_without_a_reload,
    test_the_job_page_shows_the_images_and_an_image_its_recipe,
    test_workers_and_queue_pages,
    test_preview_of_a_running_slow_job,
    test_cancel_a_running_job_from_its_page,
    test_another_project_sees_nothing,
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    shots = os.path.join(args.out, "shots")
    os.makedirs(shots, exist_ok=True)
    farm = Farm(args.bin, args.out)
    failed = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"])
            run, state = Run(farm, browser, shots), {}
            for test in TESTS:
                try:
                    outcome = test(run, state)
                    print(f"{'SKIPPED' if outcome == 'skipped' else 'ok'}  {test.__name__}")
                except Exception as e:  # noqa: BLE001 - report every test, then fail
                    failed.append(test.__name__)
                    print(f"FAIL {test.__name__}: {e}")
                    if "alice" in state:
                        run.shot(state["alice"][1], f"failure-{test.__name__}")
            browser.close()
    finally:
        farm.close()
    for s in run.skipped:
        print(f"skipped: {s}")
    print(f"screenshots in {shots}")
    if failed:
        sys.exit(f"{len(failed)} browser tests failed: {', '.join(failed)} (logs in {args.out})")


if __name__ == "__main__":
    main()
