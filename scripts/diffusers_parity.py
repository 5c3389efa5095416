"""Recomputes kiln's text encoders and UNet with diffusers/transformers and compares.

Not part of the build or of CI: a check run by hand after changing `clip.rs`,
`unet.rs`, `text.rs` or the config mapping. It needs torch, diffusers and
transformers (checked with torch 2.4.1, diffusers 0.30.3, transformers 4.44.2):

    KILN_PARITY_DIR=/tmp/parity cargo test -p kiln-diffusion dump_for_diffusers -- --ignored
    KILN_PARITY_DIR=/tmp/parity cargo test -p kiln-diffusion dump_controlnet_for_diffusers -- --ignored
    python scripts/diffusers_parity.py /tmp/parity

For every tiny kind, `dump_for_diffusers_parity` (in `arch_tests.rs`) wrote the
model folder and `kiln_outputs.safetensors`: kiln's conditioning of a fixed
prompt and negative prompt, and kiln's UNet prediction on fixed latents. This
script loads the same folder with `DiffusionPipeline.from_pretrained`, encodes
the same prompts with the pipeline's own `encode_prompt`, builds SDXL's time
ids with `_get_add_time_ids`, runs `pipe.unet`, and prints the largest
absolute differences. It exits non-zero if any exceeds its tolerance.

kiln's feed-forward uses the exact (erf) GELU, as diffusers does (candle's
GEGLU uses the tanh approximation, which moved the output by ~1e-4), so the
UNet is compared with diffusers unpatched and must agree to float rounding.

ControlNets: for the tiny SD 1.5 and SDXL models, `dump_controlnet_for_diffusers_parity`
(in `controlnet/tests.rs`) wrote the base folder with its tiny ControlNet in
`controlnet/` and `kiln_controlnet_outputs.safetensors`: kiln's down and mid
residuals (scale 0.7, both guidance rows) and kiln's UNet prediction with them.
This script runs diffusers' `ControlNetModel` on the same inputs and passes its
residuals to `pipe.unet` as `down_block_additional_residuals` /
`mid_block_additional_residual`, diffusers unpatched.
"""

import sys
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file, save_file

PROMPT = "a red castle on a hill at sunset"
NEGATIVE = "blurry, low quality"
TOLERANCE = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def add_pt_metadata(folder: Path) -> None:
    """Stamps the text encoders' files with the `format: pt` metadata transformers requires.

    candle's safetensors writer stores no metadata, and kiln keeps the tiny SD 1.5
    files byte-identical, so the scratch copy is stamped here instead.
    """
    for name in ["text_encoder", "text_encoder_2"]:
        path = folder / name / "model.safetensors"
        if path.exists():
            save_file(load_file(path), path, metadata={"format": "pt"})


def check(kind: str, folder: Path) -> bool:
    kiln = load_file(folder / "kiln_outputs.safetensors")
    add_pt_metadata(folder)
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    xl = hasattr(pipe, "text_encoder_2")
    results = {}
    with torch.no_grad():
        if xl:
            pe, ne, pp, npp = pipe.encode_prompt(
                PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE
            )
            results["context"] = max_diff(torch.cat([ne, pe]), kiln["context"])
            results["pooled text_embeds"] = max_diff(torch.cat([npp, pp]), kiln["text_embeds"])
            # No negative prompt: force_zeros_for_empty_prompt gives zeros.
            pe0, ne0, pp0, npp0 = pipe.encode_prompt(
                PROMPT, device="cpu", do_classifier_free_guidance=True, negative_prompt=None
            )
            results["context, empty negative"] = max_diff(
                torch.cat([ne0, pe0]), kiln["context_empty_negative"]
            )
            results["pooled, empty negative"] = max_diff(
                torch.cat([npp0, pp0]), kiln["text_embeds_empty_negative"]
            )
            time_ids = pipe._get_add_time_ids(
                (64, 64),
                (0, 0),
                (64, 64),
                dtype=torch.float32,
                text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
            )
            results["time_ids"] = max_diff(time_ids.repeat(2, 1), kiln["time_ids"])
            added = {"text_embeds": kiln["text_embeds"], "time_ids": kiln["time_ids"]}
        else:
            pe, ne = pipe.encode_prompt(
                PROMPT,
                device="cpu",
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=NEGATIVE,
            )
            results["context"] = max_diff(torch.cat([ne, pe]), kiln["context"])
            added = None

        sample = kiln["latents"]
        if "image" in kiln:
            assert pipe.unet.config.in_channels == 9
            sample = torch.cat([sample, kiln["image"]], dim=1)
        timestep = kiln["timestep"][0]

        def unet():
            return pipe.unet(
                sample, timestep, encoder_hidden_states=kiln["context"], added_cond_kwargs=added
            ).sample

        prediction = unet()
        results["unet prediction"] = max_diff(prediction, kiln["prediction"])
        scale = prediction.abs().max().item()
        if "candle_prediction" in kiln:
            results["candle's own UNet (for contrast)"] = max_diff(
                prediction, kiln["candle_prediction"]
            )

    ok = True
    print(f"{kind}: UNet output max |x| = {scale:.3f}")
    for name, diff in results.items():
        bad = diff > TOLERANCE and not name.startswith("candle")
        ok &= not bad
        print(f"  {name:40s} max |diff| = {diff:.2e}{'  <-- MISMATCH' if bad else ''}")
    return ok


def check_controlnet(kind: str, folder: Path) -> bool:
    from diffusers import ControlNetModel, UNet2DConditionModel

    kiln = load_file(folder / "kiln_controlnet_outputs.safetensors")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)
    controlnet = ControlNetModel.from_pretrained(folder / "controlnet", torch_dtype=torch.float32)
    added = None
    if "text_embeds" in kiln:
        added = {"text_embeds": kiln["text_embeds"], "time_ids": kiln["time_ids"]}
    sample, timestep, context = kiln["latents"], kiln["timestep"][0], kiln["context"]
    results = {}
    with torch.no_grad():
        down, mid = controlnet(
            sample,
            timestep,
            encoder_hidden_states=context,
            controlnet_cond=kiln["image"],
            conditioning_scale=kiln["scale"][0].item(),
            added_cond_kwargs=added,
            return_dict=False,
        )
        n = len(down)
        assert n == sum(1 for k in kiln if k.startswith("down_")), n
        results["down residuals"] = max(
            max_diff(d, kiln[f"down_{i}"]) for i, d in enumerate(down)
        )
        results["mid residual"] = max_diff(mid, kiln["mid"])
        prediction = unet(
            sample,
            timestep,
            encoder_hidden_states=context,
            added_cond_kwargs=added,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        results["unet with residuals"] = max_diff(prediction, kiln["prediction"])
    scale = kiln["prediction"].abs().max().item()
    effect = max_diff(kiln["prediction"], kiln["plain_prediction"])
    residual = max(v.abs().max().item() for k, v in kiln.items() if k.startswith("down_"))
    print(f"controlnet-{kind}: UNet output max |x| = {scale:.3f}, residuals max |x| = {residual:.3f}, "
          f"ControlNet moves the output by up to {effect:.3f}")
    ok = True
    for name, diff in results.items():
        tolerance = TOLERANCE
        # Residuals are larger than the UNet's output (SDXL's tiny ones reach ~12):
        # their tolerance scales with their size.
        if "residual" in name:
            tolerance *= max(1.0, residual)
        bad = diff > tolerance
        ok &= not bad
        print(f"  {name:40s} max |diff| = {diff:.2e}{'  <-- MISMATCH' if bad else ''}")
    return ok


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/parity")
    ok = True
    for kind in ["sd15", "sd21", "sdxl", "inpaint"]:
        ok &= check(kind, root / kind)
    for kind in ["sd15", "sdxl"]:
        ok &= check_controlnet(kind, root / f"controlnet-{kind}")
    print("all match" if ok else "MISMATCHES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
