"""Judges of generated pictures: small CNNs trained on real Fashion-MNIST photos (``training/train_judges.py``).

- the *class judge* names the garment (10 classes); it is trained on the photos in every demo
  look (plain and styled) so that it can tell a striped sneaker from a striped bag;
- the *style judge* names the look (``plain`` or one of the demo styles).

Both ship in ``share_diffusers/fashion/assets/judges/`` as safetensors (labels in the metadata):

    judge = load_judge("classes")
    predicted = judge.predict(images_to_tensor(pipe(...).images))  # (b,) indices into judge.labels
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .model import JUDGES_DIR


class Judge(nn.Module):
    """Five 3x3 convolutions with batch norm, two poolings, global average, linear head.

    ``forward``: images ``(b, 3, 32, 32)`` in ``[0, 1]`` -> logits ``(b, len(labels))``.
    """

    def __init__(self, labels: list[str] | tuple[str, ...], width: int = 24):
        super().__init__()
        self.labels = tuple(labels)

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, width), *block(width, width), nn.MaxPool2d(2),  # (b, w, 16, 16)
            *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2),  # (b, 2w, 8, 8)
            *block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (b, 4w)
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(4 * width, len(self.labels)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images * 2.0 - 1.0))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Predicted label indices ``(b,)`` of ``images`` ``(b, 3, 32, 32)`` in ``[0, 1]`` (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            return torch.cat([self(images[i : i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])
        finally:
            self.train(was_training)


def save_judge(judge: Judge, path: str | Path) -> Path:
    """Write ``judge`` as one safetensors file, its labels in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous() for name, tensor in judge.state_dict().items()}
    save_file(tensors, str(path), metadata={"labels": json.dumps(list(judge.labels)), "format": "pt"})
    return path


def load_judge(name_or_path: str | Path) -> Judge:
    """A judge by name (``classes`` or ``styles``, the shipped ones) or from a ``.safetensors`` path; eval mode."""
    path = Path(name_or_path)
    if path.suffix != ".safetensors":
        path = JUDGES_DIR / f"{name_or_path}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no judge at {path} (train one with training/train_judges.py)")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
    if "labels" not in metadata:
        raise ValueError(f"{path} has no 'labels' in its metadata: not a judge written by save_judge")
    judge = Judge(json.loads(metadata["labels"]))
    judge.load_state_dict(load_file(str(path)))
    return judge.eval()


def images_to_tensor(images) -> torch.Tensor:
    """PIL images (or ``(H, W, 3)`` uint8 arrays) -> ``(b, 3, H, W)`` float32 in ``[0, 1]``."""
    arrays = [np.asarray(image.convert("RGB") if hasattr(image, "convert") else image) for image in images]
    return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
