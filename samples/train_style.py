"""Launch training of a new style from captioned images, then use it per prompt.

Runs offline: it saves the embedded tiny Flux pipeline to a folder, writes a few captioned images,
runs ``accelerate launch training/train_share_flux.py`` on them and generates with the new style.
With a GPU, point ``--pretrained_model_name_or_path`` at ``black-forest-labs/FLUX.1-dev`` and
``--instance_data_dir`` at your own images; the command is the same.

    python samples/train_style.py [--workdir DIR] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from share_diffusers import ShareFluxPipeline
from share_diffusers.tiny_flux import save_tiny_flux_pipeline

SCRIPT = Path(__file__).resolve().parent.parent / "training" / "train_share_flux.py"


def write_images(folder: Path, count: int = 4) -> None:
    """Red squares on dark grey, each ``square<i>.png`` with its caption in ``square<i>.txt``."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.full((32, 32, 3), 30, dtype=np.uint8)
        pixels[4 + 4 * index : 16 + 4 * index, 6:20, 0] = 230
        Image.fromarray(pixels).save(folder / f"square{index}.png")
        (folder / f"square{index}.txt").write_text("a red square")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="share-train-"))

    save_tiny_flux_pipeline(str(workdir / "tiny-flux"))
    write_images(workdir / "images")
    command = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"),
        *("--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        str(SCRIPT),
        *("--pretrained_model_name_or_path", str(workdir / "tiny-flux")),
        *("--instance_data_dir", str(workdir / "images"), "--style_name", "red-square"),
        *("--output_dir", str(workdir / "run"), "--resolution", "32", "--max_sequence_length", "16"),
        *("--rank", "8", "--phi", "4", "--pseudo_rank", "4", "--learning_rate", "5e-2"),
        *("--train_batch_size", "2", "--max_train_steps", str(args.steps), "--seed", "0"),
    ]
    print("$", shlex.join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "ACCELERATE_USE_CPU": "1"})

    pipe = ShareFluxPipeline.from_pretrained(str(workdir / "tiny-flux"))
    pipe.set_progress_bar_config(disable=True)
    pipe.load_share_factors(workdir / "run" / "factors")
    source = pipe.share_factors.styles[-1].source
    print(f"styles in the trained factors: {pipe.list_styles()} (trained {source['steps']} steps)")
    images = pipe(
        prompt=["a red square"] * 2,
        style=[None, "red-square"],
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
    ).images
    pair = Image.new("RGB", (64, 32))
    for column, image in enumerate(images):
        pair.paste(image, (32 * column, 0))
    pair.save(workdir / "base-vs-style.png")
    difference = np.abs(np.asarray(images[0], np.float32) - np.asarray(images[1], np.float32)).mean()
    print(f"mean pixel change from the style: {difference:.2f} / 255; image: {workdir / 'base-vs-style.png'}")


if __name__ == "__main__":
    main()
