#!/usr/bin/env python3
"""The PyTorch bar for `kiln bench pipeline`: the same work in diffusers.

Loads the UNet and VAE of a diffusers-layout folder (the SD-1.5-shaped
random-weight model `kiln bench sd15-model --out DIR` writes, so both sides
run identical weights) and times, in f32 on the CPU with a fixed thread count:

* one guided UNet step as diffusers' StableDiffusionPipeline runs it: the
  latents doubled into a batch of two, one UNet forward, the guidance
  combination (the scheduler's update is left out, as in kiln's bench);
* one VAE decode, latents / scaling factor to 8-bit pixels.

Each is run once untimed, then N times; the median, the minimum and the
process's peak resident set during the measurement are printed (the peak is
reset between measurements through /proc/self/clear_refs). The text encoder is
not needed: the conditioning is a fixed random [batch, 77, 768] tensor, which
costs the UNet exactly what encoded text does.

    /tmp/refenv/bin/python bench/diffusers_reference.py --model /tmp/kiln-sd15 --size 256

Needs torch and diffusers (checked with torch 2.4.1, diffusers 0.30.3).
"""

import argparse
import json
import os
import statistics
import time


def peak_rss_bytes():
    """Returns VmHWM of /proc/self/status in bytes, or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Resets VmHWM to the current resident set (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def timed(runs, work):
    """Runs work once untimed, then `runs` times; returns the durations and the peak RSS."""
    reset_peak_rss()
    work()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "runs_s": samples,
        "peak_rss_bytes": peak_rss_bytes(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers-layout folder")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=5, help="timed UNet steps (0 skips)")
    parser.add_argument("--decodes", type=int, default=3, help="timed VAE decodes (0 skips)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()

    started = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(
        args.model, subfolder="unet", torch_dtype=torch.float32, low_cpu_mem_usage=False
    ).eval()
    vae = AutoencoderKL.from_pretrained(
        args.model, subfolder="vae", torch_dtype=torch.float32, low_cpu_mem_usage=False
    ).eval()
    load_s = time.perf_counter() - started

    side = args.size // 8
    latents = torch.randn(1, unet.config.in_channels, side, side)
    guided = args.guidance > 1.0
    batch = 2 if guided else 1
    context = torch.randn(batch, 77, unet.config.cross_attention_dim)
    timestep = torch.tensor(500.0)

    def unet_step():
        with torch.inference_mode():
            model_input = torch.cat([latents] * 2) if guided else latents
            pred = unet(model_input, timestep, encoder_hidden_states=context).sample
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + args.guidance * (cond - uncond)
            return pred

    def vae_decode():
        with torch.inference_mode():
            image = vae.decode(latents / vae.config.scaling_factor).sample
            image = ((image / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            return image[0].permute(1, 2, 0).contiguous()

    result = {
        "model": args.model,
        "size": args.size,
        "guidance": args.guidance,
        "unet_batch": batch,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "attention": type(unet.attn_processors[next(iter(unet.attn_processors))]).__name__,
        "load_s": load_s,
        "unet_step": timed(args.steps, unet_step) if args.steps else None,
        "vae_decode": timed(args.decodes, vae_decode) if args.decodes else None,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    if args.json:
        print(json.dumps(result))
        return
    gib = lambda b: "unknown" if b is None else f"{b / 2**30:.2f} GiB"
    print(
        f"diffusers (torch {result['torch']}, {result['attention']}): "
        f"{args.size}x{args.size} px, guidance {args.guidance}, {result['threads']} threads; "
        f"load average {' '.join(f'{x:.2f}' for x in load_before)} -> "
        f"{' '.join(f'{x:.2f}' for x in result['load_average_after'])}"
    )
    for key, what in (("unet_step", f"UNet step (batch {batch})"), ("vae_decode", "VAE decode")):
        m = result[key]
        if m:
            print(
                f"{what}: median {m['median_s']:.3f} s (min {m['min_s']:.3f} s, "
                f"{len(m['runs_s'])} runs), peak RSS {gib(m['peak_rss_bytes'])}"
            )


if __name__ == "__main__":
    main()
