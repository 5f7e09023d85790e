"""The embedded demo model and its four continually learned styles: one batch, a style per prompt.

Runs offline in seconds: the pipeline (a small Flux trained on Fashion-MNIST) and the Share checkpoint
ship inside the package. Writes ``batch.png`` (each prompt in each style and a blend), exports one style
as an ordinary diffusers LoRA and shows that stock ``FluxPipeline.load_lora_weights`` draws the same.

    python samples/fashion_styles.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image

from share_diffusers.fashion.model import DEMO_CALL, DEMO_PIPELINE_DIR, DEMO_STYLES_DIR, load_demo_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="share-fashion-"))
    workdir.mkdir(parents=True, exist_ok=True)

    pipe = load_demo_pipeline()
    pipe.load_share_factors(DEMO_STYLES_DIR)
    print("styles:", pipe.list_styles())
    looks = [None, "inverted", "tint", "stripes", "outlines", {"tint": 0.5, "stripes": 0.5}]
    prompts = [f"a photo of {garment}" for garment in ("a sneaker", "a dress", "a bag")]
    batch_prompts = [prompt for prompt in prompts for _ in looks]
    batch_styles = looks * len(prompts)
    generators = [torch.Generator().manual_seed(index) for index in range(len(batch_prompts))]
    images = pipe(prompt=batch_prompts, style=batch_styles, generator=generators, **DEMO_CALL).images
    strip = np.concatenate(
        [np.concatenate([np.asarray(image) for image in images[row * len(looks) : (row + 1) * len(looks)]], axis=1)
         for row in range(len(prompts))]
    )  # fmt: skip
    Image.fromarray(strip).resize((strip.shape[1] * 4, strip.shape[0] * 4), Image.NEAREST).save(workdir / "batch.png")
    print(f"one batch of {len(images)} images, columns {[str(look) for look in looks]}: {workdir / 'batch.png'}")

    lora = pipe.export_style_as_lora("stripes", workdir / "stripes-lora.safetensors")
    stock = FluxPipeline.from_pretrained(str(DEMO_PIPELINE_DIR))  # float32, as saved
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(lora))
    generator = torch.Generator().manual_seed(0)
    expected = stock(prompt=prompts[0], generator=generator, output_type="np", **DEMO_CALL).images[0]
    generator = torch.Generator().manual_seed(0)
    ours = pipe(prompt=prompts[0], style="stripes", generator=generator, output_type="np", **DEMO_CALL).images[0]
    print(f"exported 'stripes' to {lora} ({lora.stat().st_size / 1024:.0f} KiB)")
    print(f"stock load_lora_weights vs Share style, largest pixel difference: {np.abs(expected - ours).max():.2e}")


if __name__ == "__main__":
    main()
