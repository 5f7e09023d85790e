"""``ShareModel``: a model with Share layers injected, and the one place styles are chosen.

model = build_my_model()
share = ShareModel.inject(model, factors)                   # wraps the layers the factors cover
share.set_style(["ink", {"ink": 0.5, "neon": 0.5}, None])  # one entry per sample
out = model(batch)
with share.styles("ink"):                                   # for a block, then back to what was selected
    out = model(batch)
ShareModel.of(model) is share                               # reachable from the model itself
share.remove()                                              # original module tree back
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import LoraAdapter
from .block_weights import BlockLayout, is_block_weight
from .errors import QuantizedBaseError, ShapeMismatchError, ShareStateError, ShareValueError, StyleError
from .factors import MAX_STYLE_WEIGHT, FactorsSnapshot, ShareConfig, ShareFactors, check_style_weight
from .inject import find_targets, layer_shapes, remove_share, wrap_modules
from .layer import ShareLinear, StyleSelection

BlockWeight = float | dict[str, float] | list[float]
"""A style's weight: a number, or per block a ``{blocks: weight}`` mapping or a vector (``core.block_weights``)."""

StyleSpec = str | dict[str, BlockWeight] | None
"""One sample's style: None (base model), a style name, or a blend ``{name: weight}``."""


def spelt_as_held(style, factors: ShareFactors):
    """``style`` (a spec or a list of specs) with every name spelt as ``factors`` holds it (a name may be typed
    in another Unicode form: :meth:`ShareFactors.style_index`)."""
    if isinstance(style, list | tuple):
        return type(style)(spelt_as_held(item, factors) for item in style)
    if isinstance(style, dict):
        return {factors.styles[factors.style_index(name)].name: weight for name, weight in style.items()}
    return factors.styles[factors.style_index(style)].name if isinstance(style, str) else style


def renamed_in_spec(style, old: str, new: str):
    """``style`` (a spec or a list of specs, spelt as held) with the style ``old`` called ``new``."""
    if isinstance(style, list | tuple):
        return type(style)(renamed_in_spec(item, old, new) for item in style)
    if isinstance(style, dict):
        return {new if name == old else name: weight for name, weight in style.items()}
    return new if style == old else style


def style_weights(
    factors: ShareFactors,
    style: StyleSpec | Sequence[StyleSpec],
    scale: float = 1.0,
    batch_size: int | None = None,
    repeat: int = 1,
    layers: Sequence[str] | None = None,
    layout: BlockLayout | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | None:
    """Turn a style request into weights over the bank, or None if no sample is styled.

    Args:
        style: one spec for every sample, or a list with one spec per sample. A blend's weight may be
            per block (``{"ink": {"double": 1.0, "single": 0.3}}``, see :mod:`.block_weights`).
        scale: overall strength multiplying every weight.
        batch_size: if given, a list must have exactly this many entries, and a single spec is
            repeated to this many rows (a fixed ``(batch, t)`` shape whatever the request, so a
            compiled model does not recompile when a request switches between one style and several).
        repeat: each spec's row repeated this many times in place (``s0 s0 s1 s1 ...``), as diffusers
            repeats a prompt for ``num_images_per_prompt``; a single spec without ``batch_size`` stays one row.
        layers, layout: the layer names per-block weights are expanded over, and the model's blocks.
        dtype: of the result (float64 for fitting and export).

    Returns:
        ``(rows, t)``; ``(len(layers), rows, t)`` (one row set per layer) when a weight is per block.
    """
    if not _is_number(scale) or not math.isfinite(scale):
        raise StyleError(f"style scale must be a finite number, got {scale!r}")
    if abs(float(scale)) > MAX_STYLE_WEIGHT:
        raise StyleError(
            f"style scale {float(scale):g} is out of range: style weights must lie within +-{MAX_STYLE_WEIGHT:g} "
            "(larger ones overflow the model's activations)"
        )
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ShareValueError(f"repeat must be a positive integer, got {repeat!r}")
    if isinstance(style, list | tuple):
        specs = list(style)
        if batch_size is not None and len(specs) != batch_size:
            raise ShareValueError(f"got {len(specs)} styles for a batch of {batch_size}; give one per prompt")
    else:
        specs = [style]
    if all(spec is None for spec in specs):
        return None
    # Plain Python lists and one tensor at the end: a switch costs microseconds (no small-tensor ops).
    rows = []  # (weights over the bank, {style index: per-layer weights} for per-block ones)
    for spec in specs:
        row, per_layer = [0.0] * len(factors.styles), {}
        if isinstance(spec, str):
            row[factors.style_index(spec)] = float(scale)
        elif isinstance(spec, dict):
            named = {}  # style index: the name the blend gave it
            for name, weight in spec.items():
                index = factors.style_index(name)
                if index in named:  # two spellings of one name (Unicode forms): one weight each would be ambiguous
                    raise StyleError(
                        f"style {factors.styles[index].name!r} appears twice in a blend, spelt {ascii(named[index])} "
                        f"and {ascii(name)} (one name in two Unicode forms); give it one weight"
                    )
                named[index] = name
                if is_block_weight(weight):
                    per_layer[index] = _per_layer(name, weight, scale, layers, layout)
                elif not _is_number(weight) or not math.isfinite(weight):
                    raise StyleError(
                        f"blend weight for style {name!r} must be a finite number, got {weight!r} "
                        "(or per block: a {blocks: weight} mapping or a vector)"
                    )
                else:
                    row[index] += check_style_weight(name, weight, scale)
        elif spec is not None:
            raise StyleError(f"a style is None, a style name or a {{name: weight}} blend, not {type(spec).__name__}")
        rows.append((row, per_layer))
    if batch_size is not None and len(rows) == 1:
        rows = rows * batch_size
    if len(rows) > 1 or batch_size is not None:
        rows = [row for row in rows for _ in range(repeat)]
    weights = torch.tensor([row for row, _ in rows], dtype=dtype)  # (rows, t)
    if not any(per_layer for _, per_layer in rows):
        return weights
    weights = weights.expand(len(layers), *weights.shape).clone()  # (L, rows, t)
    for position, (_, per_layer) in enumerate(rows):
        for index, values in per_layer.items():
            weights[:, position, index] = torch.tensor(values, dtype=dtype)
    return weights


def _per_layer(
    name: str, weight: object, scale: float, layers: Sequence[str] | None, layout: BlockLayout | None
) -> list[float]:
    if layers is None or layout is None:
        raise StyleError(f"style {name!r} has per-block weights, which need a model (its layers and blocks)")
    values = layout.multipliers(name, weight, layers)
    for value in set(values):
        check_style_weight(name, value, scale)
    return [value * float(scale) for value in values]


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _hashable(value):
    if isinstance(value, dict):
        return ("dict", tuple((key, _hashable(item)) for key, item in value.items()))
    if isinstance(value, list | tuple):
        return ("seq", tuple(_hashable(item) for item in value))
    # Typed: True == 1 == np.True_ and they hash alike, but a bool weight is refused, never a cache hit of 1.
    return (type(value), value)


def _cache_key(style, scale: float, batch_size: int | None, repeat: int):
    """A hashable form of a style request, or None if it has none (then it is not cached)."""
    try:
        key = (_hashable(style), _hashable(scale), _hashable(batch_size), _hashable(repeat))
        hash(key)
        return key
    except TypeError:
        return None


class ShareModel:
    """A model whose target layers are ``ShareLinear``, the factors they hold, and the style selection.

    Attributes:
        model: the wrapped ``nn.Module`` (modified in place).
        factors: the :class:`ShareFactors` (bases and style bank) the layers reflect.
        selection: the :class:`StyleSelection` every layer reads.
        layers: ``name -> ShareLinear``, in the order the selection holds them.
        block_layout: the model's blocks, for per-block style weights (:mod:`.block_weights`).
    """

    def __init__(
        self, model: nn.Module, factors: ShareFactors, layers: dict[str, ShareLinear], selection: StyleSelection
    ):
        self.model = model
        self.factors = factors
        self.layers = layers
        self.selection = selection
        self.fused_style: StyleSpec = None
        self.block_layout = BlockLayout.of(model)
        # request -> (rows, t) or (layers, rows, t) weights, or None; valid until the bank changes
        self._weights_cache: dict = {}
        self._selection_resets = 0  # edits of the bank or the weights that invalidated the selection
        model._share_model = self  # ShareModel.of(model) finds it; removed by remove()

    @staticmethod
    def of(model: nn.Module) -> ShareModel | None:
        """The ``ShareModel`` injected into ``model`` (a transformer, a classifier), or None."""
        share = getattr(model, "_share_model", None)
        return share if isinstance(share, ShareModel) else None

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
            # The model's own module order, however the layers were named: optimizers and checkpoints
            # built over ``layers`` then see the same parameter order after a reload.
            position = {name: index for index, (name, _) in enumerate(model.named_modules())}
            names = sorted(set(names) | set(factors.layers), key=position.__getitem__)
        else:
            factors = ShareFactors.empty(layer_shapes(model, names), config)
        selection = StyleSelection()
        layers = wrap_modules(model, names, selection)
        share = cls(model, factors, layers, selection)
        share.refresh()
        return share

    def refresh(self) -> None:
        """Copy the factors into the layers (after a merge, delete or load) and re-blend the selection."""
        self._weights_cache.clear()
        for name, layer in self.layers.items():
            layer.load_share(self.factors.layers.get(name))
        self.selection.refresh()

    # -- styles ---------------------------------------------------------------------------------

    @property
    def style_names(self) -> list[str]:
        return self.factors.style_names

    def set_style(
        self,
        style: StyleSpec | Sequence[StyleSpec],
        scale: float = 1.0,
        batch_size: int | None = None,
        repeat: int = 1,
    ) -> None:
        """Choose the styles of the next forward passes: one spec for all samples or one per sample.

        Args:
            style: None (base model), a name, a ``{name: weight}`` blend, or a list with one per sample.
            scale: strength multiplying every weight.
            batch_size: a list must have this many entries; a single spec is repeated to this many rows.
            repeat: each entry applies to this many consecutive samples (``num_images_per_prompt``).

        All per-request work happens here, once: the weights go to the model's device and every
        layer's blended cores are computed in one batched product (:class:`StyleSelection`); the
        forward passes that follow only read them. Requests seen before skip the parsing (a small
        cache, cleared when the bank changes).
        """
        key = _cache_key(style, scale, batch_size, repeat)
        if key is not None and key in self._weights_cache:
            weights = self._weights_cache[key]
        else:
            weights = self.weights_for(style, scale, batch_size, repeat)
            if weights is not None and not bool(weights.any()):
                weights = None  # e.g. {"ink": 0.0}: the base path, bit for bit
            if key is not None:
                if len(self._weights_cache) >= 256:
                    self._weights_cache.clear()
                self._weights_cache[key] = weights
        if weights is not None and self.fused_style is not None:
            raise ShareStateError(f"style {self.fused_style!r} is fused; unfuse_style() before selecting styles")
        self.selection.set_checked(weights)

    def weights_for(
        self,
        style: StyleSpec | Sequence[StyleSpec],
        scale: float = 1.0,
        batch_size: int | None = None,
        repeat: int = 1,
    ) -> torch.Tensor | None:
        """:func:`style_weights` over this model's layers: ``(rows, t)``, or ``(layers, rows, t)`` per block."""
        return style_weights(self.factors, style, scale, batch_size, repeat, list(self.layers), self.block_layout)

    @contextmanager
    def styles(
        self,
        style: StyleSpec | Sequence[StyleSpec],
        scale: float = 1.0,
        batch_size: int | None = None,
        repeat: int = 1,
    ) -> Iterator[ShareModel]:
        """Select styles for a block (arguments as :meth:`set_style`), then restore the selection before it.

        Any pipeline can route a request this way without overriding ``__call__``::

            with ShareModel.of(pipe.transformer).styles(["ink", "neon"], repeat=2):
                images = pipe(prompt=["a cat", "a dog"], num_images_per_prompt=2).images

        The strength is ``scale``: a stock pipeline's ``joint_attention_kwargs={"scale": s}`` scales PEFT
        LoRA layers only (``ShareFluxPipeline`` reads it into the style scale itself).
        """
        previous, resets = self.selection.weights, self._selection_resets
        self.set_style(style, scale, batch_size, repeat)
        try:
            yield self
        finally:
            # A merge, delete, restore or fuse inside the block cleared the selection: the one before it
            # selects styles of another bank (or would apply a style on top of a fused one), so none is restored.
            if self._selection_resets == resets:
                self.selection.set_checked(previous)

    def _reset_selection(self) -> None:
        """No style selected, because the bank or the weights changed under the selection."""
        self._selection_resets += 1
        self.selection.clear()

    def merge(
        self, adapter: LoraAdapter, name: str, progress: bool = False, device: torch.device | str | None = None
    ) -> None:
        """Merge one more LoRA as a style (continual, DESIGN 3); on error nothing changes.

        ``device``: where the merge's float64 maths runs (:meth:`ShareFactors.merge`), the CPU by default.
        """
        self._check_unfused("merge")
        unknown = [layer for layer in adapter.layers if layer not in self.layers]
        if unknown:
            raise ShapeMismatchError(
                f"the LoRA for {name!r} touches {len(unknown)} layer(s) that are not Share targets, e.g. "
                f"{unknown[0]!r}; widen target_modules when creating the subspace"
            )
        self.factors.merge(adapter, name, progress=progress, device=device)
        self._reset_selection()
        self.refresh()

    def snapshot(self) -> FactorsSnapshot:
        """The bank as it is now, to put back with :meth:`restore` (e.g. before a merge, to undo it)."""
        return self.factors.snapshot()

    def restore(self, snapshot: FactorsSnapshot) -> None:
        """Put the bank back as it was at :meth:`snapshot`: every style's output is then what it was, bit for bit.

        The snapshot must come from this model's factors (same layers and shapes, checked before anything
        changes); the style selection is cleared, as after a merge.
        """
        self._check_unfused("restore a snapshot")
        check_factors_fit(self.model, snapshot)
        unknown = sorted(set(snapshot.layers) - set(self.layers))
        if unknown:
            raise ShapeMismatchError(
                f"the snapshot holds {len(unknown)} layer(s) that are not Share targets of this model, e.g. "
                f"{unknown[0]!r}: it comes from another model"
            )
        self.factors.restore(snapshot)
        self._reset_selection()
        self.refresh()

    def replace_style(
        self, name: str, cores: dict[str, tuple[torch.Tensor, torch.Tensor]], source: dict | None = None
    ) -> None:
        """Store fine-tuned factors of an existing style (``ShareFactors.replace_style``); on error nothing changes."""
        self._check_unfused("replace a style")
        self.factors.replace_style(name, cores, source)
        self.refresh()  # the bank keeps its styles, so the current selection stays valid

    def delete_style(self, name: str) -> None:
        self._check_unfused("delete a style")
        self.factors.delete_style(name)
        self._reset_selection()
        self.refresh()

    def rename_style(self, old: str, new: str) -> None:
        index = self.factors.style_index(old)
        held = self.factors.styles[index].name
        self.factors.rename_style(old, new)
        self._weights_cache.clear()
        self.fused_style = renamed_in_spec(self.fused_style, held, self.factors.styles[index].name)

    def fuse_style(self, style: StyleSpec, scale: float = 1.0, exact: bool = True) -> None:
        """Fuse one style or blend into the base weights, on their device (zero per-step overhead).

        ``exact`` keeps a copy of every fused weight so that :meth:`unfuse_style` restores it bit for
        bit (one more copy of the target weights: 4.7 GiB for FLUX.1's 266 attention linears in
        bf16); ``exact=False`` keeps nothing and subtracts the delta again on unfuse, as PEFT does
        (within the weights' rounding). Refused on a quantized base (:class:`QuantizedBaseError`,
        nothing changed): see :meth:`ShareLinear.fuse`.
        """
        if style is None or isinstance(style, list | tuple):
            raise StyleError("fuse_style takes one style name or one {name: weight} blend")
        self._check_unfused("fuse another style")
        weights = self.weights_for(style, scale)
        for name, layer in self.layers.items():
            try:
                layer.check_fusable()
            except QuantizedBaseError as error:
                raise QuantizedBaseError(f"cannot fuse a style into {name}: {error}") from None
        previous = self.selection.weights
        self.selection.clear()
        fused: list[ShareLinear] = []
        try:
            for position, layer in enumerate(self.layers.values()):
                layer.fuse(weights[position, 0] if weights.ndim == 3 else weights[0], exact=exact)
                fused.append(layer)
        except BaseException:
            # e.g. out of memory for an exact copy half-way through the model: undo the layers already fused
            # (an inexact one subtracts its delta again), so the model is as it was, selection included.
            for layer in fused:
                layer.unfuse()
            self.selection.set_checked(previous)
            raise
        self.fused_style = spelt_as_held(style, self.factors)  # so that a rename finds it
        self._selection_resets += 1  # a selection from before would style the fused weights a second time

    def unfuse_style(self) -> None:
        for layer in self.layers.values():
            layer.unfuse()
        self.fused_style = None

    def remove(self) -> None:
        """Unfuse and unwrap every layer: the model is its original self again."""
        remove_share(self.model)
        self.selection.detach_all()
        self.layers = {}
        self.fused_style = None
        if getattr(self.model, "_share_model", None) is self:
            del self.model._share_model

    def _check_unfused(self, action: str) -> None:
        if self.fused_style is not None:
            raise ShareStateError(f"cannot {action} while style {self.fused_style!r} is fused; unfuse_style() first")


def check_factors_fit(model: nn.Module, factors: ShareFactors | FactorsSnapshot) -> None:
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
