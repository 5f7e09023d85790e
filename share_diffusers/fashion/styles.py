"""The demo styles: transformations of real Fashion-MNIST photos that a person recognises at a glance.

The demo model learns each style from images made here (``training/make_fashion_styles.py``), one
after another into one Share checkpoint; the style judge is trained on the same transformations.

    styled = apply_style(images, "stripes")   # (b, 3, 32, 32) in [0, 1] -> same shape
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

STYLE_NAMES = ("inverted", "tint", "stripes", "outlines")
JUDGE_CLASSES = ("plain", *STYLE_NAMES)  # the style judge's labels: the base model's look is "plain"
TINT = (1.0, 0.45, 0.05)  # orange: a garment bright in red, half in green, none in blue
STRIPE_PERIOD = 6  # pixels; three bright rows then three dim ones
STRIPE_DIM = 0.2


def _grey(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=1, keepdim=True)  # (b, 1, H, W)


def inverted(images: torch.Tensor) -> torch.Tensor:
    """Negative: a dark garment on white."""
    return 1.0 - images


def tint(images: torch.Tensor) -> torch.Tensor:
    """The garment in orange on black."""
    return _grey(images) * torch.tensor(TINT, dtype=images.dtype, device=images.device)[None, :, None, None]


def stripes(images: torch.Tensor) -> torch.Tensor:
    """Horizontal stripes across the garment: every other band of rows dimmed to ``STRIPE_DIM``."""
    rows = torch.arange(images.shape[-2], device=images.device)
    bright = (rows % STRIPE_PERIOD) < STRIPE_PERIOD // 2
    mask = torch.where(bright, 1.0, STRIPE_DIM).to(images.dtype)[:, None]  # (H, 1)
    return images * mask


def outlines(images: torch.Tensor) -> torch.Tensor:
    """A line drawing: the Sobel edge strength of the grey image, white lines on black."""
    grey = _grey(images)
    kernel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype)
    kernels = torch.stack([kernel_x, kernel_x.T])[:, None].to(images.device)  # (2, 1, 3, 3)
    gradients = F.conv2d(grey, kernels, padding=1)  # (b, 2, H, W)
    strength = gradients.pow(2).sum(dim=1, keepdim=True).sqrt()
    lines = (strength / 1.5).clamp(0.0, 1.0)  # an edge of full contrast is ~4; 1.5 keeps soft edges visible
    return lines.expand(-1, 3, -1, -1).contiguous()


_TRANSFORMS = {"plain": lambda images: images, "inverted": inverted, "tint": tint, "stripes": stripes,
               "outlines": outlines}  # fmt: skip


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """``images`` ``(b, 3, H, W)`` in ``[0, 1]`` in the look of ``style`` (one of ``JUDGE_CLASSES``)."""
    if style not in _TRANSFORMS:
        raise ValueError(f"unknown demo style {style!r}; known: {', '.join(JUDGE_CLASSES)}")
    return _TRANSFORMS[style](images)


def apply_looks(images: torch.Tensor, looks: torch.Tensor) -> torch.Tensor:
    """``images`` ``(b, 3, H, W)``, each in its own look: ``looks`` ``(b,)`` indexes ``JUDGE_CLASSES``."""
    styled = images.clone()
    for index, look in enumerate(JUDGE_CLASSES):
        rows = looks == index
        if rows.any():
            styled[rows] = apply_style(images[rows], look)
    return styled
