#!/usr/bin/env python3
"""kiln against diffusers on the same weights, run alternately, with the ratios.

Runs `kiln bench pipeline --json` and `bench/diffusers_reference.py --json`
one after the other, ROUNDS times per size (kiln first in odd rounds,
diffusers first in even ones, so a slow spell on a shared machine hits both
sides), and prints, per size and measurement, the minimum time of each side
over all rounds, the largest peak resident set, and kiln / diffusers. The
goal of tracker issue 15 is a time ratio of at most 0.8 and a memory ratio of
at most 1; a ratio above the goal is marked. Times on a busy machine are
noise: compare the ratios of back-to-back runs, never absolute times.

    python3 bench/compare_diffusers.py --model /tmp/kiln-acc-sd15 \\
        --python /tmp/kiln-acc-torch/bin/python --sizes 256 512

The model is the SD-1.5-shaped random-weight folder `kiln bench sd15-model
--out DIR` writes; `--python` is an interpreter with torch and diffusers
(checked with torch 2.4.1, diffusers 0.30.3). Needs only the standard library
itself. Exits 1 when a ratio misses its goal, 2 when a run fails.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIME_GOAL = 0.8
MEMORY_GOAL = 1.0
PARTS = ("unet_step", "vae_decode")


def run_json(command):
    """Runs `command` and returns its JSON output; exits 2 with its stderr when it fails."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        sys.exit(f"compare_diffusers: {' '.join(command)} failed ({done.returncode}):\n{tail}")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as e:
        sys.exit(f"compare_diffusers: {command[0]} printed no JSON ({e}): {done.stdout[:200]!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers-layout folder (kiln bench sd15-model)")
    parser.add_argument("--python", required=True, help="a Python with torch and diffusers")
    parser.add_argument("--kiln", default="target/release/kiln", help="the kiln binary (release)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides in pixels")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per size")
    parser.add_argument("--steps", type=int, default=3, help="timed UNet steps per run")
    parser.add_argument("--decodes", type=int, default=2, help="timed VAE decodes per run")
    parser.add_argument("--threads", type=int, default=2, help="diffusers' thread count (kiln: RAYON_NUM_THREADS)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        common = ["--model", args.model, "--size", str(size), "--steps", str(args.steps),
                  "--decodes", str(args.decodes), "--json"]
        kiln = [args.kiln, "bench", "pipeline", *common]
        torch = [args.python, str(HERE / "diffusers_reference.py"), *common, "--threads", str(args.threads)]
        results = {"kiln": [], "diffusers": []}
        for r in range(args.rounds):
            order = [("kiln", kiln), ("diffusers", torch)]
            if r % 2 == 1:
                order.reverse()
            for side, command in order:
                print(f"{size} px round {r + 1}: {side}", file=sys.stderr, flush=True)
                result = run_json(command)
                results[side].append(result)
                summary = ", ".join(
                    f"{part} {result[part]['min_s']:.2f} s" for part in PARTS if result.get(part))
                print(f"  {summary}", file=sys.stderr, flush=True)
        for part in PARTS:
            k = [x[part] for x in results["kiln"] if x.get(part)]
            d = [x[part] for x in results["diffusers"] if x.get(part)]
            if not k or not d:
                continue
            k_s, d_s = min(x["min_s"] for x in k), min(x["min_s"] for x in d)
            k_m = max(x["peak_rss_bytes"] or 0 for x in k)
            d_m = max(x["peak_rss_bytes"] or 0 for x in d)
            rows.append({
                "measure": part, "size": size,
                "kiln_s": k_s, "diffusers_s": d_s, "time_ratio": k_s / d_s,
                "kiln_peak_rss_bytes": k_m, "diffusers_peak_rss_bytes": d_m,
                "memory_ratio": k_m / d_m if d_m else None,
            })

    missed = [r for r in rows if r["time_ratio"] > TIME_GOAL
              or (r["memory_ratio"] is not None and r["memory_ratio"] > MEMORY_GOAL)]
    if args.json:
        print(json.dumps({"rows": rows, "time_goal": TIME_GOAL, "memory_goal": MEMORY_GOAL}, indent=2))
    else:
        gib = 1024 ** 3
        print(f"| measure | kiln | diffusers | time ratio (goal <= {TIME_GOAL}) "
              f"| peak RSS kiln / diffusers | memory ratio (goal <= {MEMORY_GOAL}) |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            mem = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}x"
            # Each goal marked in its own column.
            time_mark = " (missed)" if r["time_ratio"] > TIME_GOAL else ""
            mem_mark = (" (missed)" if r["memory_ratio"] is not None
                        and r["memory_ratio"] > MEMORY_GOAL else "")
            print(f"| {r['measure']} {r['size']} px | {r['kiln_s']:.2f} s | {r['diffusers_s']:.2f} s "
                  f"| {r['time_ratio']:.2f}x{time_mark} | {r['kiln_peak_rss_bytes'] / gib:.2f} / "
                  f"{r['diffusers_peak_rss_bytes'] / gib:.2f} GiB | {mem}{mem_mark} |")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
