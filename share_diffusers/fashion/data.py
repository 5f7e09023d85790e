"""Fashion-MNIST as the demo model's world: real photos of 10 clothing classes, read offline.

The images come from Debian's ``dataset-fashion-mnist`` package (IDX files, gzipped) under
``/usr/share/datasets/fashion-mnist``. Each 28x28 grey image (garment light on black) is padded to
32x32 and copied to three channels, values in ``[0, 1]``.

    images, labels = load_fashion_mnist("train")      # (60000, 3, 32, 32) float32, (60000,) int64
    prompt_for(7)                                     # "a photo of a sneaker"
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASS_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
IMAGE_SIZE = 32
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}  # fmt: skip


class FashionDataError(FileNotFoundError):
    """The Fashion-MNIST files are missing or not IDX files."""


def fashion_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$FASHION_MNIST_DIR``, else Debian's install folder."""
    return Path(root or os.environ.get("FASHION_MNIST_DIR") or DEFAULT_ROOT)


def prompt_for(label: int) -> str:
    """The caption the demo model was trained with for class ``label`` (0-9)."""
    name = CLASS_NAMES[label]
    article = "an" if name[0] in "aeiou" else "a"
    return f"a photo of {name}" if name == "trousers" else f"a photo of {article} {name}"


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError:
        raise FashionDataError(
            f"{path} not found: install Debian's dataset-fashion-mnist package (apt-get install "
            "dataset-fashion-mnist) or point FASHION_MNIST_DIR at a folder holding the four .gz IDX files"
        ) from None
    dims = data[3]
    if data[:2] != b"\x00\x00" or data[2] != 0x08 or dims != expected_dims:
        raise FashionDataError(f"{path} is not an IDX file of {expected_dims}-d unsigned bytes")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(n, 3, 32, 32)`` float32 in ``[0, 1]`` and labels ``(n,)`` int64 of ``split`` (train/test).

    ``limit`` keeps the first ``limit`` images (the files' own order, classes mixed).
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    folder = fashion_root(root)
    image_file, label_file = _FILES[split]
    images = _read_idx(folder / image_file, 3)[:limit]
    labels = _read_idx(folder / label_file, 1)[:limit]
    pixels = torch.from_numpy(images.astype(np.float32) / 255.0)  # (n, 28, 28)
    pad = (IMAGE_SIZE - pixels.shape[-1]) // 2
    pixels = torch.nn.functional.pad(pixels, (pad, pad, pad, pad))  # (n, 32, 32), black border
    return pixels[:, None].expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(labels.astype(np.int64))
