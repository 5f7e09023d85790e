"""A style (or blend) of a Share checkpoint as ordinary LoRA factors.

A single uncentred style is exactly rank p: ``up = basis_out @ core_out[i]``,
``down = (basis_in @ core_in[i]).T``. A blend of ``s`` styles has rank at most ``min(k, s p)``
(``k`` with an anchor); its factors come from the SVD of the blended ``k x k`` core, so the
exported LoRA reproduces the Share weights exactly, at one rank for every layer.
"""

from __future__ import annotations

import torch

from .adapters import LoraAdapter, LoraLayer
from .block_weights import BlockLayout
from .errors import FactorValueError, StyleError
from .factors import ShareFactors
from .model import style_weights
from .subspace import to_fit


def _label(blend: dict[str, object]) -> str:
    """A blend as text for the file's metadata and messages: ``0.5*ink-0.7*brown+neon[per block]``."""
    text = ""
    for name, weight in blend.items():
        term = f"{weight:g}*{name}" if isinstance(weight, int | float) else f"{name}[per block]"
        text += term if not text or term.startswith("-") else "+" + term
    return text


def export_rank(factors: ShareFactors, blend: dict[str, object]) -> int:
    """The rank the exported LoRA needs to be exact for ``blend``."""
    used = sum(1 for weight in blend.values() if weight != 0)
    widest = max((layer.k for layer in factors.layers.values()), default=0)
    if factors.config.center:
        return widest
    return min(widest, factors.config.pseudo_rank * used)


def style_as_lora(
    factors: ShareFactors,
    style: str | dict,
    dtype: torch.dtype = torch.float32,
    layout: BlockLayout | None = None,
    layer_names: list[str] | None = None,
) -> LoraAdapter:
    """The LoRA (``scale = 1``) whose ``up @ down`` equals the style's Share ``dW`` on every layer it touches.

    Layers that no style of the blend touches (or whose per-block weights are all zero) are left out.
    Every layer gets the same rank (see :func:`export_rank`), zero-padded where a layer needs less, so
    PEFT and diffusers load it with one ``r``. ``layout``: the model's blocks, for per-block weights;
    ``layer_names``: the layers they are expanded over, as ``set_style`` expands them (a model's Share
    layers may include layers the factors do not reach yet); default the factors' layers.
    """
    if not isinstance(style, str | dict):
        raise StyleError(f"export takes a style name or a {{name: weight}} blend, not {type(style).__name__}")
    blend = {style: 1.0} if isinstance(style, str) else dict(style)
    names = list(factors.layers) if layer_names is None else list(layer_names)
    position_of = {name: position for position, name in enumerate(names)}
    missing = [name for name in factors.layers if name not in position_of]
    if missing:
        raise ValueError(f"layer_names must include every layer of the factors; missing {missing[:3]}")
    # (t,) for every layer, or (layers, t) with per-block weights; validates the names and weights
    weights = style_weights(factors, blend, layers=names, layout=layout, dtype=torch.float64)[..., 0, :]
    label = style if isinstance(style, str) else _label(blend)
    rank = export_rank(factors, blend)
    layers = {}
    for name, stored in factors.layers.items():
        layer = to_fit(stored)
        layer_weights = weights[position_of[name]] if weights.ndim == 2 else weights
        if not bool(((layer_weights != 0) & layer.present).any()) or layer.k == 0:
            continue
        core = layer.cores(layer_weights)  # (k, k)
        u, s, vh = torch.linalg.svd(core)
        keep = min(rank, s.numel())
        root = s[:keep].sqrt()
        up = layer.basis_out @ (u[:, :keep] * root)  # (n_out, keep)
        down = (root[:, None] * vh[:keep]) @ layer.basis_in.T  # (keep, d_in)
        if keep < rank:
            up = torch.nn.functional.pad(up, (0, rank - keep))
            down = torch.nn.functional.pad(down, (0, 0, 0, rank - keep))
        up, down = up.to(dtype), down.to(dtype)
        if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
            raise FactorValueError(f"{name}: the exported factors of {label!r} overflow {dtype}")
        layers[name] = LoraLayer(up=up, down=down, scale=1.0, conv=name in factors.conv_layers)
    if not layers:
        raise FactorValueError(f"{label!r} is zero on every layer: there is no update to export")
    return LoraAdapter(layers=layers, source={"share_style": label, "rank": rank})
