"""``ShareModel``: a model with Share layers injected, and the one place styles are chosen.

model = build_my_model()
share = ShareModel.inject(model, factors)                   # wraps the layers the factors cover
share.set_style(["ink", {"ink": 0.5, "neon": 0.5}, None])  # one entry per sample
out = model(batch)
share.remove()                                              # original module tree back
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .adapters import LoraAdapter
from .errors import ShapeMismatchError, StyleError
from .factors import ShareConfig, ShareFactors
from .inject import find_targets, layer_shapes, remove_share, wrap_modules
from .layer import ShareLinear, StyleSelection

StyleSpec = str | dict[str, float] | None
"""One sample's style: None (base model), a style name, or a blend ``{name: weight}``."""


def style_weights(
    factors: ShareFactors, style: StyleSpec | Sequence[StyleSpec], scale: float = 1.0, batch_size: int | None = None
) -> torch.Tensor | None:
    """Turn a style request into ``(rows, t)`` weights over the bank, or None if no sample is styled.

    Args:
        style: one spec for every sample, or a list with one spec per sample.
        scale: overall strength multiplying every weight.
        batch_size: if given, a list must have exactly this many entries, and a single spec is
            repeated to this many rows (a fixed ``(batch, t)`` shape whatever the request, so a
            compiled model does not recompile when a request switches between one style and several).
    """
    if isinstance(style, list | tuple):
        specs = list(style)
        if batch_size is not None and len(specs) != batch_size:
            raise ValueError(f"got {len(specs)} styles for a batch of {batch_size}; give one per prompt")
    else:
        specs = [style]
    if all(spec is None for spec in specs):
        return None
    rows = []
    for spec in specs:
        if spec is None:
            rows.append(torch.zeros(len(factors.styles), dtype=torch.float64))
        elif isinstance(spec, str):
            rows.append(factors.style_vector({spec: 1.0}))
        elif isinstance(spec, dict):
            for name, weight in spec.items():
                if not isinstance(weight, int | float) or weight != weight:
                    raise ValueError(f"blend weight for style {name!r} must be a number, got {weight!r}")
            rows.append(factors.style_vector(spec))
        else:
            raise StyleError(f"a style is None, a style name or a {{name: weight}} blend, not {type(spec).__name__}")
    weights = torch.stack(rows) * float(scale)
    if batch_size is not None and weights.shape[0] == 1:
        weights = weights.expand(batch_size, -1)
    return weights


class ShareModel:
    """A model whose target layers are ``ShareLinear``, the factors they hold, and the style selection.

    Attributes:
        model: the wrapped ``nn.Module`` (modified in place).
        factors: the :class:`ShareFactors` (bases and style bank) the layers reflect.
        selection: the :class:`StyleSelection` every layer reads.
        layers: ``name -> ShareLinear``.
    """

    def __init__(
        self, model: nn.Module, factors: ShareFactors, layers: dict[str, ShareLinear], selection: StyleSelection
    ):
        self.model = model
        self.factors = factors
        self.layers = layers
        self.selection = selection
        self.fused_style: StyleSpec = None

    @classmethod
    def inject(
        cls,
        model: nn.Module,
        factors: ShareFactors | None = None,
        target_modules: str | Sequence[str] | None = None,
        config: ShareConfig | None = None,
    ) -> ShareModel:
        """Wrap ``model``'s target layers and load ``factors`` into them.

        Args:
            factors: existing factors; every layer they hold must exist in the model with the same
                shape (checked before anything changes). None starts an empty subspace.
            target_modules: which modules to wrap (PEFT rule: list of name suffixes, or one regex).
                Defaults to the layers ``factors`` hold. Wrapped layers without factors act as their
                base until a merge reaches them.
            config: the ``ShareConfig`` of a new empty subspace (when ``factors`` is None).
        """
        if factors is None and target_modules is None:
            raise ValueError("give factors, target_modules, or both")
        names = find_targets(model, target_modules) if target_modules is not None else []
        if target_modules is not None and not names:
            raise ShapeMismatchError(
                f"no nn.Linear / 1x1 nn.Conv2d in the model matches target_modules={target_modules!r}"
            )
        if factors is not None:
            check_factors_fit(model, factors)
            names = sorted(set(names) | set(factors.layers))
        else:
            factors = ShareFactors.empty(layer_shapes(model, names), config)
        selection = StyleSelection()
        layers = wrap_modules(model, names, selection)
        share = cls(model, factors, layers, selection)
        share.refresh()
        return share

    def refresh(self) -> None:
        """Copy the factors into the layers (after a merge, delete or load)."""
        for name, layer in self.layers.items():
            layer.load_share(self.factors.layers.get(name))

    # -- styles ---------------------------------------------------------------------------------

    @property
    def style_names(self) -> list[str]:
        return self.factors.style_names

    def set_style(
        self, style: StyleSpec | Sequence[StyleSpec], scale: float = 1.0, batch_size: int | None = None
    ) -> None:
        """Choose the styles of the next forward passes: one spec for all samples or one per sample."""
        weights = style_weights(self.factors, style, scale, batch_size)
        if weights is not None and self.fused_style is not None:
            raise RuntimeError(f"style {self.fused_style!r} is fused; unfuse_style() before selecting styles")
        self.selection.set(weights)

    def merge(self, adapter: LoraAdapter, name: str, progress: bool = False) -> None:
        """Merge one more LoRA as a style (continual, DESIGN 3); on error nothing changes."""
        self._check_unfused("merge")
        unknown = [layer for layer in adapter.layers if layer not in self.layers]
        if unknown:
            raise ShapeMismatchError(
                f"the LoRA for {name!r} touches {len(unknown)} layer(s) that are not Share targets, e.g. "
                f"{unknown[0]!r}; widen target_modules when creating the subspace"
            )
        self.factors.merge(adapter, name, progress=progress)
        self.selection.clear()
        self.refresh()

    def delete_style(self, name: str) -> None:
        self._check_unfused("delete a style")
        self.factors.delete_style(name)
        self.selection.clear()
        self.refresh()

    def rename_style(self, old: str, new: str) -> None:
        self.factors.rename_style(old, new)

    def fuse_style(self, style: StyleSpec, scale: float = 1.0) -> None:
        """Fuse one style or blend into the base weights (zero per-step overhead)."""
        if style is None or isinstance(style, list | tuple):
            raise ValueError("fuse_style takes one style name or one {name: weight} blend")
        self._check_unfused("fuse another style")
        weights = style_weights(self.factors, style, scale)[0]
        self.selection.clear()
        for layer in self.layers.values():
            layer.fuse(weights)
        self.fused_style = style

    def unfuse_style(self) -> None:
        for layer in self.layers.values():
            layer.unfuse()
        self.fused_style = None

    def remove(self) -> None:
        """Unfuse and unwrap every layer: the model is its original self again."""
        remove_share(self.model)
        self.layers = {}
        self.fused_style = None

    def _check_unfused(self, action: str) -> None:
        if self.fused_style is not None:
            raise RuntimeError(f"cannot {action} while style {self.fused_style!r} is fused; unfuse_style() first")


def check_factors_fit(model: nn.Module, factors: ShareFactors) -> None:
    """Raise a ``ShapeMismatchError`` naming the first layer of ``factors`` the model lacks or sizes differently."""
    modules = dict(model.named_modules())
    missing = [name for name in factors.layers if name not in modules]
    if missing:
        raise ShapeMismatchError(
            f"the Share factors hold {len(missing)} layer(s) the model does not have, e.g. {missing[0]!r}: "
            "these factors were made for another model"
        )
    shapes = layer_shapes(model, list(factors.layers))
    for name, layer in factors.layers.items():
        if shapes[name] != layer.shape:
            raise ShapeMismatchError(
                f"size mismatch for {name}: the Share factors are for a {layer.shape} weight but the model's "
                f"layer is {shapes[name]}"
            )
