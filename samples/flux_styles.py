"""Per-prompt styles on a Flux pipeline: merge LoRAs of several layouts, mix styles in one batch, export.

Runs offline on the embedded tiny Flux pipeline (random weights: the pictures are noise, the
numbers are real). With a GPU and the Hub, point ``--model`` at ``black-forest-labs/FLUX.1-schnell``
and ``merge_lora`` at Hub ids instead.

    python samples/flux_styles.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image

from share_diffusers import ShareConfig, ShareFluxPipeline
from share_diffusers.tiny_flux import build_tiny_flux_pipeline

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def write_lora(pipe_class, path: Path, seed: int, rank: int, alpha: float) -> Path:
    """A diffusers-format LoRA for the tiny transformer, as ``FluxPipeline.save_lora_weights`` writes it."""
    pipe = build_tiny_flux_pipeline(0)
    pipe.transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=ATTENTION, init_lora_weights=False)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    pipe_class.save_lora_weights(str(path), transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))
    return path / "pytorch_lora_weights.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="share-flux-"))
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.set_progress_bar_config(disable=True)

    for index, (name, rank, alpha) in enumerate([("ink", 4, 8), ("neon", 8, 8), ("sepia", 2, 4)]):
        lora = write_lora(ShareFluxPipeline, workdir / name, seed=index, rank=rank, alpha=alpha)
        report = pipe.merge_lora(
            lora, style_name=name, config=ShareConfig(rank=16, pseudo_rank=8) if index == 0 else None
        )
        print(report)
    print("styles:", pipe.list_styles())

    prompts = ["a photo of a sneaker", "a photo of a sneaker", "a red cat", "a castle"]
    styles = ["ink", {"ink": 0.5, "neon": 0.5}, "sepia", None]
    images = pipe(
        prompt=prompts,
        style=styles,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(0) for _ in prompts],
        output_type="np",
    ).images
    grid = (np.concatenate(list(images), axis=1) * 255).round().astype(np.uint8)
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(workdir / "batch.png")
    print(f"one batch, four styles ({', '.join(map(str, styles))}): {workdir / 'batch.png'}")

    exported = pipe.export_style_as_lora({"ink": 0.5, "neon": 0.5}, workdir / "ink-neon.safetensors")
    print(f"blend exported as an ordinary LoRA: {exported}")
    pipe.save_share_factors(workdir / "factors")
    print(f"factors saved to {workdir / 'factors'}")


if __name__ == "__main__":
    main()
