"""Generate with the demo model and score the pictures with the judges.

images = generate(pipe, labels=[7, 7, 0], styles=[None, "stripes", "tint"], seed=0)  # (3, 3, 32, 32)
scores = judge_scores(class_judge, style_judge, images, labels=[7, 7, 0], looks=["plain", "stripes", "tint"])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..pipeline_flux import guidance_arguments
from .data import prompt_for
from .judges import Judge
from .model import DEMO_CALL, DEMO_GUIDANCE


@torch.no_grad()
def generate(
    pipe,
    labels: Sequence[int],
    styles: Sequence | None = None,
    seed: int = 0,
    batch_size: int = 100,
    guidance: float = DEMO_GUIDANCE,
    **call_kwargs,
) -> torch.Tensor:
    """Images ``(n, 3, 32, 32)`` in ``[0, 1]`` for the class prompts of ``labels``.

    Args:
        styles: per image a style spec (None, a name, a blend) for a ``ShareFluxPipeline``; None: all base.
        seed: image ``j`` is drawn from generator ``seed + j`` whatever the batch size.
        guidance: see :func:`~share_diffusers.pipeline_flux.guidance_arguments` (true CFG on the demo model).
        call_kwargs: override :data:`~share_diffusers.fashion.model.DEMO_CALL` (steps, size, ...).
    """
    call = {**DEMO_CALL, **call_kwargs}
    styles = list(styles) if styles is not None else [None] * len(labels)
    if len(styles) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(styles)} styles")
    chunks = []
    for start in range(0, len(labels), batch_size):
        rows = range(start, min(start + batch_size, len(labels)))
        wanted = [styles[j] for j in rows]
        extra = {"style": wanted} if any(style is not None for style in wanted) else {}
        output = pipe(
            prompt=[prompt_for(labels[j]) for j in rows],
            generator=[torch.Generator().manual_seed(seed + j) for j in rows],
            output_type="pt",
            **guidance_arguments(pipe, guidance, len(rows)),
            **extra,
            **call,
        )
        chunks.append(output.images.float().clamp(0.0, 1.0))
    return torch.cat(chunks)


def judge_scores(class_judge: Judge, style_judge: Judge, images: torch.Tensor, labels, looks) -> dict[str, float]:
    """``class_accuracy``: the class judge names the prompted garment; ``style_accuracy``: the style
    judge names the requested look (``looks``: per image a name from the style judge's labels)."""
    labels = torch.as_tensor(list(labels))
    looks = torch.tensor([style_judge.labels.index(look) for look in looks])
    return {
        "class_accuracy": (class_judge.predict(images) == labels).float().mean().item(),
        "style_accuracy": (style_judge.predict(images) == looks).float().mean().item(),
    }


def balanced_labels(per_class: int, classes: int = 10) -> list[int]:
    """``[0, 1, ..., 9, 0, 1, ...]``: ``per_class`` images of each class, classes interleaved."""
    return [label for _ in range(per_class) for label in range(classes)]
