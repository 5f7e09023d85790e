"""``ShareLinear``: a frozen ``nn.Linear`` (or 1x1 ``nn.Conv2d``) plus a Share subspace and style bank.

Forward for a batch in which sample ``b`` uses style weights ``w[b, :]`` over the bank
(DESIGN.md section 1):

    y = base(x) + ((x @ basis_in) @ C_b.T) @ basis_out.T,   C_b = sum_i w[b, i] C_i

Which styles apply is not stored in the layer: every ``ShareLinear`` of a model reads the same
:class:`StyleSelection`, so switching styles writes one small tensor and visits no layer.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import QuantizedBaseError, ShapeMismatchError, ShareStateError, ShareValueError
from .quantized import compute_dtype, is_quantized, quantization_name
from .subspace import LayerShare


class StyleSelection:
    """The per-call style state of one model, shared by every ``ShareLinear`` in it.

    ``weights`` is ``(rows, t)`` over the whole style bank (one row broadcasts to any batch), or
    ``(layers, rows, t)`` with one set per layer (per-block style weights, in :attr:`layers` order),
    or None for the base model. Setting it does all the per-request work at once, so that a forward does
    none: the weights go to the layers' device (one small copy), and the blended cores
    ``C_b = sum_i w[b, i] C_i`` of every layer are computed in one product per group of
    layers that share ``(k, t p, device, dtype)`` (all 266 attention linears of FLUX.1 are one
    group), then written into one ``(layers, rows, k, k)`` buffer of which each layer holds a view.

    A styled forward then reads its view and adds three kernels (project, per-sample cores, project
    back fused with the add): no host-device traffic, no recomputation, and the same tensor shapes
    whatever the request, so a compiled model does not recompile when styles switch. A new request
    with the same number of rows overwrites the buffer in place (stream-ordered on CUDA); a new
    row count re-binds the views once.

    Memory: the layers' dense style cores in float32 (``t k^2`` numbers a layer: 21 MiB for 266
    FLUX.1 layers, 20 styles, k = 32) and the blended buffer (``rows k^2`` numbers a layer in the
    model's dtype: 0.5 MiB a row at that size in bf16).
    """

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None  # (rows, t) or (layers, rows, t) float32 on the CPU
        # What a forward reads: a plain bool, so that torch.compile guards on it and not on the weights'
        # shape (per-block weights are 3-D; a switch to them must not recompile).
        self.active = False
        self.version = 0  # bumped on every change, so callers can tell cheaply whether anything moved
        self.layers: list[ShareLinear] = []
        self._groups: list[_LayerGroup] | None = None  # None: rebuilt from the layers before the next blend

    # -- the layers that read this selection ------------------------------------------------------

    def attach(self, layer: ShareLinear) -> None:
        self.layers.append(layer)
        self._groups = None

    def detach_all(self) -> None:
        for layer in self.layers:
            layer.blended_cores = None
        self.layers = []
        self._groups = None
        self.weights = None
        self.active = False

    def invalidate(self) -> None:
        """A layer's factors changed: regroup before the next blend (cheap; call :meth:`refresh` once after)."""
        self._groups = None

    def refresh(self) -> None:
        """Recompute the blended cores of the current weights after factors changed or the model moved."""
        self._groups = None
        if self.weights is not None:
            self._blend(self.weights)

    # -- selecting ------------------------------------------------------------------------------

    def set(self, weights: torch.Tensor | None) -> None:
        """Select styles: ``weights (rows, t)``, ``(t,)`` for the whole batch, ``(layers, rows, t)`` per
        layer, or None for the base model."""
        if weights is not None:
            if weights.ndim == 1:
                weights = weights[None]
            if weights.ndim == 3 and weights.shape[0] != len(self.layers):
                raise ShareValueError(
                    f"per-layer style weights must have one set per layer ({len(self.layers)}), got {weights.shape[0]}"
                )
            if weights.ndim not in (2, 3):
                raise ShareValueError(
                    "style weights must be (batch, num_styles), (num_styles,) or (layers, batch, num_styles), "
                    f"got {tuple(weights.shape)}"
                )
            weights = weights.detach().to("cpu", torch.float32)
            if not bool(torch.isfinite(weights).all()):
                raise ShareValueError("style weights must be finite numbers")
            if not bool(weights.any()):
                weights = None  # nobody styled: take the base path, bit for bit
        self.set_checked(weights)

    def set_checked(self, weights: torch.Tensor | None) -> None:
        """:meth:`set` for weights known to be ``(rows, t)`` or ``(layers, rows, t)`` float32 on the CPU,
        not all zero."""
        self.version += 1
        if weights is not None:
            self._blend(weights)
        self.weights = weights
        self.active = weights is not None

    def clear(self) -> None:
        self.set_checked(None)

    @property
    def is_active(self) -> bool:
        return self.active

    # -- the per-request computation ------------------------------------------------------------

    def _blend(self, weights: torch.Tensor) -> None:
        """Blended cores of every layer for ``weights (rows, t)`` or ``(layers, rows, t)``, written where the
        layers read them."""
        groups = self._current_groups()
        for group in groups:
            if weights.shape[-1] != group.num_styles:
                raise ShareValueError(
                    f"the style selection covers {weights.shape[-1]} styles but the layers hold {group.num_styles}"
                )
        on_device: dict[torch.device, torch.Tensor] = {}
        for group in groups:
            if group.device not in on_device:
                on_device[group.device] = weights.to(group.device, non_blocking=True)
            group.blend(on_device[group.device])

    def _current_groups(self) -> list[_LayerGroup]:
        groups = self._groups
        if groups is not None and all(group.is_current() for group in groups):
            return groups
        by_key: dict[tuple, list[ShareLinear]] = {}
        for layer in self.layers:
            if layer.basis_out.shape[1] == 0 or layer.num_styles == 0:
                layer.blended_cores = None  # no factors here: the layer stays its base
                continue
            key = (layer.basis_out.shape[1], layer.cores_out.shape[1], layer.basis_out.device, layer.basis_out.dtype)
            by_key.setdefault(key, []).append(layer)
        position = {id(layer): index for index, layer in enumerate(self.layers)}
        self._groups = [_LayerGroup(layers, [position[id(layer)] for layer in layers]) for layers in by_key.values()]
        return self._groups


class _LayerGroup:
    """Layers with the same ``(k, t p, device, dtype)``: their style cores stacked for one batched blend."""

    def __init__(self, layers: list[ShareLinear], positions: list[int]):
        first = layers[0]
        self.layers = layers
        # where these layers' rows sit in per-layer weights (layers, rows, t)
        self.positions = torch.tensor(positions, dtype=torch.long, device=first.basis_out.device)
        self.device, self.dtype = first.basis_out.device, first.basis_out.dtype
        self.num_styles = first.num_styles
        k, t, p = first.basis_out.shape[1], first.num_styles, first.pseudo_rank
        cores_out = torch.stack([layer.cores_out.float() for layer in layers]).reshape(-1, k, t, p)  # (L, k, t, p)
        cores_in = torch.stack([layer.cores_in.float() for layer in layers]).reshape(-1, t, p, k)  # (L, t, p, k)
        # Dense cores C_i = core_out[i] @ core_in[i].T, with the anchor (mean core) folded into every style
        # that touches the layer: a blend is then linear in the weights, one (rows, t) x (t, k^2) product
        # for all layers. k^2 t numbers a layer instead of 2 k t p: 8x less arithmetic per switch at p = 8.
        dense = cores_out.permute(0, 2, 1, 3) @ cores_in  # (L, t, k, k)
        if any(layer.anchor.numel() for layer in layers):
            zero = torch.zeros(k, k, device=self.device)
            anchors = torch.stack([layer.anchor.float() if layer.anchor.numel() else zero for layer in layers])
            present = torch.stack([layer.present.float() for layer in layers])  # (L, t)
            dense = dense + present[:, :, None, None] * anchors[:, None]
        self.dense_cores = dense.reshape(len(layers), t, k * k)  # (L, t, k^2) float32
        self.shape = (k, k)
        self.blended: torch.Tensor | None = None  # (L, rows, k, k) in the layers' dtype
        self._views: tuple[torch.Tensor, ...] = ()

    def is_current(self) -> bool:
        """False once the model moved or changed dtype (``.to()`` replaces the layers' buffers)."""
        first = self.layers[0]
        return (
            first.basis_out.device == self.device
            and first.basis_out.dtype == self.dtype
            and (not self._views or first.blended_cores is self._views[0])
        )

    def blend(self, weights: torch.Tensor) -> None:
        """``weights (rows, t)`` or per layer ``(all layers, rows, t)``, float32 on this group's device."""
        if weights.ndim == 3:  # per-block weights: each layer its own rows, still one batched product
            weights = weights.index_select(0, self.positions)  # (L, rows, t)
        blended = (weights @ self.dense_cores).unflatten(-1, self.shape)  # (L, rows, k, k): sum_i w_bi C_i
        if self.blended is not None and self.blended.shape == blended.shape:
            self.blended.copy_(blended)  # the views the layers hold see it; no per-layer work
            return
        self.blended = blended.to(self.dtype)
        self._views = self.blended.unbind(0)
        for layer, view in zip(self.layers, self._views, strict=True):
            layer.blended_cores = view


def is_pointwise_conv(conv: nn.Conv2d) -> bool:
    """Whether a ``Conv2d`` is a linear map over channels at each (strided) pixel, as ``ShareLinear`` needs: a
    1x1 kernel, ``groups=1`` and no padding (a padded one adds a border of bias-only pixels)."""
    return conv.kernel_size == (1, 1) and conv.groups == 1 and conv.padding in ((0, 0), "valid")


_EXACT_BUFFERS = ("cores_out", "cores_in", "anchor", "present")  # ShareLinear's float32 style bank


class ShareLinear(nn.Module):
    """A frozen linear map with a Share style bank on top.

    Args:
        base_layer: the module it wraps, ``nn.Linear`` or a 1x1 ``nn.Conv2d`` (``groups=1``, no
            padding), of any dtype and device, quantized or not (GGUF, torchao, bitsandbytes,
            quanto: ``core.quantized``); its parameters are left untouched (frozen).
        selection: the model-wide :class:`StyleSelection` this layer reads (it registers itself).

    The Share tensors are non-persistent buffers on the base layer's device, and the base layer's entries
    keep their own names (``to_q.weight``, not ``to_q.base_layer.weight``, both ways: see
    :func:`_base_layer_keys_as_stock`), so the model's ``state_dict`` and ``save_pretrained`` stay those of
    the base model (with a fused style in its weights, if one is fused) that stock diffusers loads. The bases
    are in the base layer's compute dtype (its weight's dtype, or a quantized layer's ``compute_dtype``: what
    the forward multiplies with); the cores stay float32 (tiny, and blends and fusing are computed from them).
    """

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, selection: StyleSelection):
        super().__init__()
        if isinstance(base_layer, nn.Conv2d):
            if not is_pointwise_conv(base_layer):
                raise ShapeMismatchError(
                    f"ShareLinear wraps only 1x1 convolutions with groups=1 and no padding; got kernel "
                    f"{base_layer.kernel_size}, groups {base_layer.groups}, padding {base_layer.padding}"
                )
            self.out_features, self.in_features = base_layer.out_channels, base_layer.in_channels
        elif isinstance(base_layer, nn.Linear):
            self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
        else:
            raise TypeError(f"ShareLinear wraps nn.Linear or 1x1 nn.Conv2d, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.selection = selection
        self._is_conv = isinstance(base_layer, nn.Conv2d)
        weight = base_layer.weight
        compute = dict(dtype=compute_dtype(base_layer), device=weight.device)
        exact = dict(dtype=torch.float32, device=weight.device)
        self.register_buffer("basis_out", torch.zeros(self.out_features, 0, **compute), persistent=False)
        self.register_buffer("basis_in", torch.zeros(self.in_features, 0, **compute), persistent=False)
        # The style bank laid out for one matmul per blend: core_out as (k, t p), core_in as (t p, k).
        self.register_buffer("cores_out", torch.zeros(0, 0, **exact), persistent=False)
        self.register_buffer("cores_in", torch.zeros(0, 0, **exact), persistent=False)
        self.register_buffer("anchor", torch.zeros(0, 0, **exact), persistent=False)
        self.register_buffer("present", torch.zeros(0, **exact), persistent=False)
        # (rows, k, k) in the compute dtype: this layer's view of the selection's blended cores.
        self.register_buffer("blended_cores", None, persistent=False)
        self.trainable: nn.Module | None = None  # set by core.trainable while a new style is learned
        self.fused_weights: torch.Tensor | None = None  # (t,) blend currently fused into the weight
        self._unfused_weight: torch.Tensor | None = None
        self.pseudo_rank = 1
        selection.attach(self)
        self.register_state_dict_post_hook(_base_layer_keys_as_stock)
        self.register_load_state_dict_pre_hook(_stock_keys_to_base_layer)

    @property
    def num_styles(self) -> int:
        return self.present.shape[0]

    def _apply(self, fn, recurse=True):
        """``model.to(dtype)`` casts the bases with the base layer, but the style bank stays float32.

        The cores are tiny and every blend, fuse and export is computed from them in float32 (the class
        docstring): a ``model.to(torch.bfloat16)`` after injection must not round them, only move them.
        """
        exact = {name: getattr(self, name) for name in _EXACT_BUFFERS}
        super()._apply(fn, recurse)
        for name, before in exact.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                setattr(self, name, before.to(after.device))
        return self

    def load_share(self, layer: LayerShare | None) -> None:
        """Take this layer's bases and cores (None: no factors, the layer acts as its base).

        Call ``selection.refresh()`` after loading layers, so that blends are recomputed.
        """
        if self.fused_weights is not None:
            raise ShareStateError("cannot change the Share factors of a layer with a fused style; unfuse_style() first")
        device, dtype = self.base_layer.weight.device, compute_dtype(self.base_layer)
        self.selection.invalidate()
        self.blended_cores = None
        exact = dict(dtype=torch.float32, device=device)
        if layer is None:
            self.basis_out = torch.zeros(self.out_features, 0, dtype=dtype, device=device)
            self.basis_in = torch.zeros(self.in_features, 0, dtype=dtype, device=device)
            self.cores_out = self.cores_in = self.anchor = torch.zeros(0, 0, **exact)
            self.present = torch.zeros(0, **exact)
            return
        if layer.shape != (self.out_features, self.in_features):
            raise ShapeMismatchError(
                f"size mismatch: the Share factors are for a ({layer.shape[0]}, {layer.shape[1]}) weight but "
                f"the layer is ({self.out_features}, {self.in_features})"
            )
        self.basis_out = layer.basis_out.to(device=device, dtype=dtype)
        self.basis_in = layer.basis_in.to(device=device, dtype=dtype)
        t, k, p = layer.core_out.shape
        self.pseudo_rank = p
        self.cores_out = layer.core_out.permute(1, 0, 2).reshape(k, t * p).to(**exact)  # [core_out[0], ...]
        self.cores_in = layer.core_in.transpose(1, 2).reshape(t * p, k).to(**exact)  # [core_in[0].T; ...]
        self.anchor = layer.anchor.to(**exact) if layer.anchor is not None else torch.zeros(0, 0, **exact)
        self.present = layer.present.to(**exact)

    # -- forward --------------------------------------------------------------------------------

    def blend(self, weights: torch.Tensor) -> torch.Tensor:
        """Blended core ``sum_i w_i C_i`` (plus the anchor where the styles touch the layer), float32 ``(k, k)``.

        ``weights: (t,)``. For fusing and export; the forward reads the selection's precomputed blend.
        """
        weights = weights.to(device=self.cores_out.device, dtype=torch.float32)
        core = (self.cores_out * weights.repeat_interleave(self.pseudo_rank)) @ self.cores_in  # (k, k)
        if self.anchor.numel():
            core = core + (weights @ self.present) * self.anchor
        return core

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        styled = self.selection.active and self.blended_cores is not None
        if not styled and self.trainable is None:
            return result
        if styled and self.fused_weights is not None:
            raise ShareStateError("a style is fused into this layer; unfuse_style() before selecting styles per batch")
        same_dtype = result.dtype == x.dtype == self.basis_out.dtype
        if styled and self.trainable is None and not self._is_conv and same_dtype:
            return self._add_styles(x, result)
        features = self._channels_last(x)  # (batch, ..., d_in)
        delta = None
        if styled:
            delta = self._styles_delta(features)
        if self.trainable is not None:  # factors being learned (training/), added to the bank's styles
            learned = self.trainable(features)
            delta = learned if delta is None else delta + learned
        return result + self._channels_first(delta).to(result.dtype)

    def _add_styles(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``result + styles' delta`` in three kernels: project, per-sample cores, project back fused with the add."""
        mixed = self._mixed(x)  # (batch, tokens, k)
        flat_mixed = mixed.reshape(-1, mixed.shape[-1])  # (batch * tokens, k)
        if result.requires_grad or not result.is_contiguous():
            flat_result = result.reshape(-1, self.out_features)
            return torch.addmm(flat_result, flat_mixed, self.basis_out.T).view(result.shape)
        flat_result = result.view(-1, self.out_features)  # (batch * tokens, n_out), the same memory
        # The base layer's output is a fresh tensor nobody else holds: add into it, no extra copy.
        flat_result.addmm_(flat_mixed, self.basis_out.T)
        return result

    def _mixed(self, x: torch.Tensor) -> torch.Tensor:
        """``(x @ basis_in) @ C_b.T`` per sample: ``(batch, tokens, k)`` for ``x (batch, ..., d_in)``."""
        cores = self.blended_cores  # (rows, k, k), rows = 1 or batch
        batch = x.shape[0]
        projected = (x @ self.basis_in).reshape(batch, -1, self.basis_in.shape[1])  # (batch, tokens, k)
        if cores.shape[0] == 1:
            return projected @ cores[0].T
        if cores.shape[0] != batch:
            raise ValueError(
                f"the style selection has {cores.shape[0]} rows but the layer got a batch of {batch}; "
                "give one style per sample (or one for all)"
            )
        return torch.bmm(projected, cores.transpose(1, 2))

    def _styles_delta(self, features: torch.Tensor) -> torch.Tensor:
        """The styles' contribution for ``features (batch, ..., d_in)``: ``(batch, ..., n_out)``."""
        mixed = self._mixed(features.to(self.basis_in.dtype))
        return (mixed @ self.basis_out.T).reshape(*features.shape[:-1], self.out_features)

    def delta(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The contribution of ``weights (rows, t)`` for input ``x (batch, ..., d_in)``, computed from scratch.

        A reference path (tests, one-off use); forward passes read the selection's precomputed blend.
        """
        cores = torch.stack([self.blend(row) for row in weights]).to(x.dtype)  # (rows, k, k)
        batch = x.shape[0]
        projected = (x @ self.basis_in.to(x.dtype)).reshape(batch, -1, cores.shape[-1])
        mixed = projected @ cores.transpose(1, 2)
        return (mixed @ self.basis_out.to(x.dtype).T).reshape(*x.shape[:-1], self.out_features)

    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        if not self._is_conv:
            return x
        stride = self.base_layer.stride
        return x[:, :, :: stride[0], :: stride[1]].permute(0, 2, 3, 1)  # a strided 1x1 conv only subsamples

    def _channels_first(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.permute(0, 3, 1, 2) if self._is_conv else delta

    # -- fusing ---------------------------------------------------------------------------------

    def delta_weight(self, weights: torch.Tensor) -> torch.Tensor:
        """Dense ``dW`` of a blend ``weights (t,)`` in float32 (at least), on the layer's device: ``(n_out, d_in)``."""
        dtype = torch.promote_types(self.basis_out.dtype, torch.float32)
        core = self.blend(weights).to(dtype)  # (k, k)
        return (self.basis_out.to(dtype) @ core) @ self.basis_in.to(dtype).T

    def fuse(self, weights: torch.Tensor, exact: bool = True) -> None:
        """Add a blend's ``dW`` to the base weight, on its device: zero overhead until :meth:`unfuse`.

        Refused on a quantized base (:class:`QuantizedBaseError`): requantizing ``W + dW`` keeps only
        the part of ``dW`` larger than the grid's step (a delta of 1% of ``|W|`` at FLUX.1 width
        loses 53% through Q8_0 and all of it through Q4_0; tests/test_quantized.py), so the fused
        style would not be the one asked for, while the unfused one is exact.

        Args:
            weights: ``(t,)`` blend over the bank.
            exact: keep a copy of the original weight (on its device: one more copy of every fused
                weight, 4.7 GiB for FLUX.1's 266 attention linears in bf16) so that :meth:`unfuse`
                restores it bit for bit. ``False`` keeps nothing and subtracts the delta again, as
                PEFT's ``unfuse_lora`` does: the weight then comes back within the rounding of its
                dtype (for bf16, a few units of 2^-8 relative on the entries the delta moved).
        """
        if self.fused_weights is not None:
            raise ShareStateError("a style is already fused into this layer; unfuse_style() first")
        self.check_fusable()
        if self.basis_out.shape[1] > 0:
            original = self.base_layer.weight.detach().clone() if exact else None
            self._add_delta(weights, sign=1.0)
            self._unfused_weight = original
        self.fused_weights = weights.detach().clone()

    def check_fusable(self) -> None:
        """Raise :class:`QuantizedBaseError` if the base weight is quantized (see :meth:`fuse`'s policy)."""
        if not is_quantized(self.base_layer):
            return
        name = quantization_name(self.base_layer)
        if name == "GGUF BF16":  # not quantized, but held as packed GGUF bytes that diffusers decodes per call
            raise QuantizedBaseError(
                "its weight is held as the GGUF file's packed BF16 bytes, which cannot be written in place. Apply the "
                "style unfused instead (style=...), or load the base from a safetensors model to fuse"
            )
        raise QuantizedBaseError(
            f"its weight is quantized ({name}): requantizing W + dW rounds a "
            "LoRA-sized delta away (one of 1% of |W| loses about half of itself through Q8_0, all of it "
            "through Q4_0) and re-rounds the base on every fuse/unfuse. Apply the style unfused instead "
            "(style=...: exact, three small products a layer), or load the base unquantized to fuse"
        )

    def unfuse(self) -> None:
        """Restore the base weight: bit for bit after an exact fuse, within the dtype's rounding otherwise."""
        if self.fused_weights is None:
            return
        if is_quantized(self.base_layer):  # quantized after the fuse (quantize_in_place refuses; torchao does not)
            raise QuantizedBaseError(
                f"its weight was quantized ({quantization_name(self.base_layer)}) with a style fused into it: the "
                "style is part of the quantized weight now and cannot be taken out; load the base model again"
            )
        if self._unfused_weight is not None:
            with torch.no_grad():
                self.base_layer.weight.copy_(self._unfused_weight)
        elif self.basis_out.shape[1] > 0:
            self._add_delta(self.fused_weights, sign=-1.0)
        self._unfused_weight = None
        self.fused_weights = None

    def drop_fused_state(self) -> None:
        """Forget the fuse without touching the weight (and free the exact copy): for a base quantized after the
        fuse, where :meth:`unfuse` cannot take the style out."""
        self._unfused_weight = None
        self.fused_weights = None

    @torch.no_grad()
    def _add_delta(self, weights: torch.Tensor, sign: float) -> None:
        """``W += sign * basis_out @ C @ basis_in.T`` in float32 (at least), rounded once to the weight's dtype."""
        weight = self.base_layer.weight
        dtype = torch.promote_types(weight.dtype, torch.float32)
        left = self.basis_out.to(dtype) @ self.blend(weights).to(dtype)  # (n_out, k)
        right = self.basis_in.to(dtype).T  # (k, d_in)
        # addmm_ into the weight itself: no (n_out, d_in) delta is allocated (on the CPU, allocating and
        # faulting in a fresh 36 MiB product costs 5x the product itself).
        if weight.dtype == dtype:
            weight.view(self.out_features, self.in_features).addmm_(left, right, alpha=sign)
        else:
            work = weight.view(self.out_features, self.in_features).to(dtype)
            weight.copy_(work.addmm_(left, right, alpha=sign).view(weight.shape))

    def extra_repr(self) -> str:
        k = self.basis_out.shape[1]
        return f"in_features={self.in_features}, out_features={self.out_features}, k={k}, styles={self.num_styles}"


_BASE = "base_layer."


def _base_layer_keys_as_stock(module: ShareLinear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``<prefix>base_layer.<name>`` entries renamed ``<prefix><name>``, in place and in order: the wrapper
    leaves no trace in a saved model (a stock reload dropped every attention weight it did not find)."""
    inner = prefix + _BASE
    # This layer's entries are the last ones written: re-adding them after the others keeps the order.
    for key in [key for key in state_dict if key.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _stock_keys_to_base_layer(
    module: ShareLinear, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys, errors
) -> None:
    """The inverse on load: a stock ``<prefix><name>`` entry goes to the wrapped layer (``base_layer.<name>``)."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        rest = key[len(prefix) :]
        if not rest.startswith((_BASE, "trainable.")):
            state_dict[prefix + _BASE + rest] = state_dict.pop(key)
