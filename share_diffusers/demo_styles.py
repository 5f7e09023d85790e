"""Demo styles made offline: small random LoRAs, written as ordinary diffusers files and merged.

On the random-weight tiny pipeline (``--model tiny-random``), the style studio
(:mod:`share_diffusers.studio`), ``share-diffusers generate`` (both through
:func:`share_diffusers.runtime.load_styles`) and the server start with these styles, without any
download. Each LoRA is a diffusers-format file written by ``FluxPipeline.save_lora_weights`` for the
pipeline's own attention linears (random factors from a fixed seed, the ranks and alphas of
``samples/flux_styles.py``), merged with ``pipe.merge_lora`` like a LoRA from the Hub.

    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    reports = make_demo_styles(pipe)        # styles "ink", "neon", "sepia"
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import FluxPipeline
from torch import nn

from .core import ShareConfig
from .core.inject import layer_shapes, matches_target
from .flux_lora import FLUX_ATTENTION_TARGETS
from .loader import MergeReport

# (rank, alpha) of the n-th demo LoRA, cycled: the same as samples/flux_styles.py.
DEMO_RANKS = ((4, 8.0), (8, 8.0), (2, 4.0))
DEMO_NAMES = ("ink", "neon", "sepia")
# k = 16 holds the three demo LoRAs (ranks 4 + 8 + 2) exactly on the tiny transformer (width 32),
# so a fourth LoRA merged later shows a real, non-zero reconstruction error.
DEMO_CONFIG = ShareConfig(rank=16, pseudo_rank=8)


def write_demo_lora(
    transformer: nn.Module, folder: str | Path, seed: int, rank: int, alpha: float, scale: float = 0.3
) -> Path:
    """Write a random LoRA on ``transformer``'s attention linears; returns the ``.safetensors`` path.

    Args:
        transformer: a Flux transformer (plain, or already holding Share layers).
        folder: where ``pytorch_lora_weights.safetensors`` is written.
        seed: seeds the factors, drawn as ``randn * scale`` like a PEFT adapter with random init.
        rank, alpha: the LoRA's rank and ``lora_alpha`` (recorded in the file's adapter metadata).
    """
    names = [name for name, _ in transformer.named_modules() if matches_target(name, FLUX_ATTENTION_TARGETS)]
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (n_out, d_in) in layer_shapes(transformer, names).items():
        layers[f"{name}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator) * scale  # (r, d_in)
        layers[f"{name}.lora_B.weight"] = torch.randn(n_out, rank, generator=generator) * scale  # (n_out, r)
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": sorted({name.split(".attn.")[-1] for name in names})}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        str(folder), transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
    )
    return folder / "pytorch_lora_weights.safetensors"


def make_demo_styles(
    pipe, names: Sequence[str] = DEMO_NAMES, seed: int = 0, config: ShareConfig = DEMO_CONFIG
) -> list[MergeReport]:
    """Merge one random demo LoRA per name into ``pipe`` (a ``ShareFluxPipeline``), deterministically.

    Args:
        names: the new styles' names; the n-th uses seed ``seed + n`` and the n-th of ``DEMO_RANKS``.
        config: the subspace's ``k`` and ``p`` when these are the first styles (ignored otherwise).

    Returns:
        One :class:`~share_diffusers.loader.MergeReport` per style. The LoRA files live in a
        temporary folder only while they merge.
    """
    reports = []
    with tempfile.TemporaryDirectory(prefix="share-demo-styles-") as workdir:
        for index, name in enumerate(names):
            rank, alpha = DEMO_RANKS[index % len(DEMO_RANKS)]
            path = write_demo_lora(pipe.transformer, Path(workdir) / name, seed + index, rank, alpha)
            first = pipe.share_factors is None
            reports.append(pipe.merge_lora(path, style_name=name, config=config if first else None))
    return reports
