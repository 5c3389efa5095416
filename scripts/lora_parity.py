"""Compares kiln's LoRAs and textual-inversion embeddings with diffusers and PEFT.

Not part of the build or of CI (torch is large): a check run by hand after
changing `diffusion/src/lora/`, `embeddings.rs`, `text_extras.rs` or the CLIP
encoder. It needs torch, diffusers, transformers and peft (checked with torch
2.4.1, diffusers 0.30.3, transformers 4.44.2, peft 0.13):

    KILN_PARITY_DIR=/tmp/parity cargo test -p kiln-diffusion dump_for_lora_parity -- --ignored
    python scripts/lora_parity.py /tmp/parity

For the tiny SD 1.5, SD 2.1 and SDXL models, `dump_for_lora_parity` (in
`lora_tests.rs`) wrote the model, a kohya LoRA with LoCon convolutions and alpha
(`inkwash`), a diffusers/PEFT LoRA (`mira`), a 2-vector embedding (`badhands`),
and kiln's outputs: the UNet merged with each LoRA at weight 0.7 on fixed
latents and the base text conditioning, the text conditioning with each
LoRA's text-encoder deltas at 0.7, and the conditioning of a prompt that uses the
embedding. This script loads the same files with `load_lora_weights` (at 0.7
through `set_adapters`) and `load_textual_inversion`, recomputes each with
diffusers' own `encode_prompt` and UNet, and prints the largest absolute
differences; it exits non-zero if any exceeds its tolerance. The UNet runs with
diffusers' GEGLU patched to candle's tanh approximation, so the comparison
isolates the LoRA (the exact-GELU difference is `diffusers_parity.py`'s).
kiln merges the deltas into the weights while PEFT adds the low-rank branch on
the fly, so they agree to float rounding, not bit for bit.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.models import activations
from safetensors.torch import load_file, save_file

PROMPT = "a red castle on a hill at sunset"
EMBEDDED_PROMPT = "a badhands castle on a hill"
NEGATIVE = "blurry, low quality"
WEIGHT = 0.7
TOLERANCE = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def load(model: Path) -> DiffusionPipeline:
    for name in ["text_encoder", "text_encoder_2"]:
        path = model / name / "model.safetensors"
        if path.exists():
            save_file(load_file(path), path, metadata={"format": "pt"})
    return DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)


def encode(pipe, prompt: str):
    """Returns (context rows negative then prompt, pooled rows or None)."""
    if hasattr(pipe, "text_encoder_2"):
        pe, ne, pp, npp = pipe.encode_prompt(
            prompt, device="cpu", do_classifier_free_guidance=True, negative_prompt=NEGATIVE
        )
        return torch.cat([ne, pe]), torch.cat([npp, pp])
    pe, ne = pipe.encode_prompt(
        prompt,
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=True,
        negative_prompt=NEGATIVE,
    )
    return torch.cat([ne, pe]), None


def check(kind: str, folder: Path) -> bool:
    kiln = load_file(folder / "kiln_outputs.safetensors")
    results = {}
    exact = activations.GEGLU.gelu
    activations.GEGLU.gelu = lambda self, gate: F.gelu(gate, approximate="tanh")
    try:
        with torch.no_grad():
            for name, layout in [("inkwash", "kohya"), ("mira", "peft")]:
                pipe = load(folder / "model")
                pipe.load_lora_weights(
                    str(folder), weight_name=f"{name}.safetensors", adapter_name=name
                )
                pipe.set_adapters([name], adapter_weights=[WEIGHT])
                added = None
                if "text_embeds" in kiln:
                    added = {"text_embeds": kiln["text_embeds"], "time_ids": kiln["time_ids"]}
                prediction = pipe.unet(
                    kiln["latents"],
                    kiln["timestep"][0],
                    encoder_hidden_states=kiln["context"],
                    added_cond_kwargs=added,
                ).sample
                results[f"UNet with the {layout} LoRA"] = max_diff(
                    prediction, kiln[f"unet_{name}"]
                )
                pipe.disable_lora()
                base = pipe.unet(
                    kiln["latents"],
                    kiln["timestep"][0],
                    encoder_hidden_states=kiln["context"],
                    added_cond_kwargs=added,
                ).sample
                pipe.enable_lora()
                results[f"(the {layout} LoRA's effect on the UNet, for contrast)"] = max_diff(
                    base, kiln[f"unet_{name}"]
                )
                context, pooled = encode(pipe, PROMPT)
                results[f"text with the {layout} LoRA"] = max_diff(
                    context, kiln[f"context_{name}"]
                )
                if pooled is not None:
                    results[f"pooled text with the {layout} LoRA"] = max_diff(
                        pooled, kiln[f"text_embeds_{name}"]
                    )
            pipe = load(folder / "model")
            path = folder / "emb" / "badhands.safetensors"
            if hasattr(pipe, "text_encoder_2"):
                state = load_file(path)
                pipe.load_textual_inversion(
                    state["clip_l"],
                    token="badhands",
                    text_encoder=pipe.text_encoder,
                    tokenizer=pipe.tokenizer,
                )
                pipe.load_textual_inversion(
                    state["clip_g"],
                    token="badhands",
                    text_encoder=pipe.text_encoder_2,
                    tokenizer=pipe.tokenizer_2,
                )
            else:
                pipe.load_textual_inversion(str(path), token="badhands")
            context, _ = encode(pipe, EMBEDDED_PROMPT)
            results["text with the embedding"] = max_diff(context, kiln["context_badhands"])
            base, _ = encode(load(folder / "model"), EMBEDDED_PROMPT)
            results["(the embedding's effect, for contrast)"] = max_diff(
                base, kiln["context_badhands"]
            )
    finally:
        activations.GEGLU.gelu = exact

    ok = True
    print(f"{kind}:")
    for name, diff in results.items():
        bad = diff > TOLERANCE and not name.startswith("(")
        ok &= not bad
        print(f"  {name:52s} max |diff| = {diff:.2e}{'  <-- MISMATCH' if bad else ''}")
    return ok


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/parity") / "lora"
    ok = True
    for kind in ["sd15", "sd21", "sdxl"]:
        ok &= check(kind, root / kind)
    print("all match" if ok else "MISMATCHES")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
