"""Write the demo styles' training images: real Fashion-MNIST photos in each style, with captions.

    python training/make_fashion_styles.py --output_dir /tmp/fashion-styles --per_style 1000

``OUTPUT/<style>/`` holds ``<n>.png`` (32x32 RGB) and a ``metadata.jsonl`` with the class prompt of
each photo ("a photo of a sneaker": the caption names the garment, the look is what the style's
coefficients must learn), ready for ``training/train_share_flux.py --instance_data_dir``. Each style
draws a different slice of the training split, so no photo is seen by two styles.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from share_diffusers.fashion.data import load_fashion_mnist, prompt_for
from share_diffusers.fashion.styles import STYLE_NAMES, apply_style


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--styles", nargs="+", default=list(STYLE_NAMES), choices=STYLE_NAMES)
    parser.add_argument("--per_style", type=int, default=1000, help="photos per style")
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST .gz IDX files (default: Debian's)")
    args = parser.parse_args(argv)
    images, labels = load_fashion_mnist("train", args.data_dir, args.per_style * len(args.styles))
    for number, style in enumerate(args.styles):
        rows = slice(number * args.per_style, (number + 1) * args.per_style)
        styled = apply_style(images[rows], style)
        folder = Path(args.output_dir) / style
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for index, (pixels, label) in enumerate(zip(styled, labels[rows].tolist(), strict=True)):
            name = f"{index:05d}.png"
            array = (pixels.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
            Image.fromarray(array).save(folder / name)
            records.append(json.dumps({"file_name": name, "text": prompt_for(label)}))
        (folder / "metadata.jsonl").write_text("\n".join(records) + "\n")
        print(f"{style}: {len(records)} images in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
