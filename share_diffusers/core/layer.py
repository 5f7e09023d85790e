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

from .errors import ShapeMismatchError
from .subspace import LayerShare


class StyleSelection:
    """The styles applied to the current batch, shared by every ``ShareLinear`` of a model.

    ``weights`` is ``(batch, t)`` over the whole style bank (one row broadcasts to any batch), or
    None for the base model. Dense weights keep every tensor shape fixed while styles switch, so a
    compiled model does not recompile; blending ``t`` cores costs ``O(t k^2 p)`` per layer and
    forward, negligible next to the layer's own matmul.
    """

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None  # (batch, t) float32
        self.version = 0  # bumped on every change, so callers can tell cheaply whether anything moved

    def set(self, weights: torch.Tensor | None) -> None:
        """Select styles: ``weights (batch, t)`` or ``(t,)`` for the whole batch, or None for the base model."""
        self.version += 1
        if weights is not None:
            if weights.ndim == 1:
                weights = weights[None]
            if weights.ndim != 2:
                raise ValueError(
                    f"style weights must be (batch, num_styles) or (num_styles,), got {tuple(weights.shape)}"
                )
            weights = weights.detach().to(torch.float32)
            if not bool(weights.any()):
                weights = None  # nobody styled: take the base path, bit for bit
        self.weights = weights

    def set_checked(self, weights: torch.Tensor | None) -> None:
        """:meth:`set` for weights already known to be ``(batch, t)`` float32 with a non-zero entry."""
        self.version += 1
        self.weights = weights

    def clear(self) -> None:
        self.set_checked(None)

    @property
    def is_active(self) -> bool:
        return self.weights is not None


class ShareLinear(nn.Module):
    """A frozen linear map with a Share style bank on top.

    Args:
        base_layer: the module it wraps, ``nn.Linear`` or a 1x1 ``nn.Conv2d`` (``groups=1``, no
            padding), of any dtype and device; its parameters are left untouched (frozen).
        selection: the model-wide :class:`StyleSelection` this layer reads.

    The Share tensors are non-persistent buffers in the base layer's dtype and device, so the
    model's own ``state_dict`` stays that of the base model.
    """

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, selection: StyleSelection):
        super().__init__()
        if isinstance(base_layer, nn.Conv2d):
            if (
                base_layer.kernel_size != (1, 1)
                or base_layer.groups != 1
                or base_layer.padding not in ((0, 0), "valid")
            ):
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
        weight = base_layer.weight
        empty = dict(dtype=weight.dtype, device=weight.device)
        self.register_buffer("basis_out", torch.zeros(self.out_features, 0, **empty), persistent=False)
        self.register_buffer("basis_in", torch.zeros(self.in_features, 0, **empty), persistent=False)
        # The style bank laid out for one matmul per blend: core_out as (k, t p), core_in as (t p, k).
        self.register_buffer("cores_out", torch.zeros(0, 0, **empty), persistent=False)
        self.register_buffer("cores_in", torch.zeros(0, 0, **empty), persistent=False)
        self.register_buffer("anchor", torch.zeros(0, 0, **empty), persistent=False)
        self.register_buffer("present", torch.zeros(0, **empty), persistent=False)
        self.trainable: nn.Module | None = None  # set by core.trainable while a new style is learned
        self.fused_weights: torch.Tensor | None = None  # (t,) blend currently fused into the weight
        self._unfused_weight: torch.Tensor | None = None
        self.pseudo_rank = 1

    @property
    def num_styles(self) -> int:
        return self.present.shape[0]

    def load_share(self, layer: LayerShare | None) -> None:
        """Take this layer's bases and cores (None: no factors, the layer acts as its base)."""
        if self.fused_weights is not None:
            raise RuntimeError("cannot change the Share factors of a layer with a fused style; unfuse_style() first")
        weight = self.base_layer.weight
        if layer is None:
            self.basis_out = weight.new_zeros(self.out_features, 0)
            self.basis_in = weight.new_zeros(self.in_features, 0)
            self.cores_out = self.cores_in = weight.new_zeros(0, 0)
            self.anchor = weight.new_zeros(0, 0)
            self.present = weight.new_zeros(0)
            return
        if layer.shape != (self.out_features, self.in_features):
            raise ShapeMismatchError(
                f"size mismatch: the Share factors are for a ({layer.shape[0]}, {layer.shape[1]}) weight but "
                f"the layer is ({self.out_features}, {self.in_features})"
            )

        def cast(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.to(device=weight.device, dtype=weight.dtype)

        self.basis_out, self.basis_in = cast(layer.basis_out), cast(layer.basis_in)
        t, k, p = layer.core_out.shape
        self.pseudo_rank = p
        self.cores_out = cast(layer.core_out.permute(1, 0, 2).reshape(k, t * p))  # [core_out[0], core_out[1], ...]
        self.cores_in = cast(layer.core_in.transpose(1, 2).reshape(t * p, k))  # [core_in[0].T; core_in[1].T; ...]
        self.anchor = cast(layer.anchor) if layer.anchor is not None else weight.new_zeros(0, 0)
        self.present = cast(layer.present)

    # -- forward --------------------------------------------------------------------------------

    def _blend_cores(self, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-sample blended cores ``C_b = sum_i w[b, i] C_i``: ``(batch, k, k)``; ``weights: (batch, t)``."""
        weights = weights.to(device=self.cores_out.device, dtype=dtype)
        # sum_i w_i core_out[i] @ core_in[i].T == [w_1 core_out[1], ...] @ [core_in[1]; ...]: one matmul.
        scaled = self.cores_out.to(dtype) * weights.repeat_interleave(self.pseudo_rank, dim=1)[:, None, :]  # (b, k, tp)
        cores = scaled @ self.cores_in.to(dtype)  # (b, k, k)
        if self.anchor.numel():
            # The anchor (mean core) belongs to every style that touches this layer.
            anchor_weight = weights @ self.present.to(dtype)  # (batch,)
            cores = cores + anchor_weight[:, None, None] * self.anchor.to(dtype)
        return cores

    def delta(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The styles' contribution for input ``x`` (``(batch, ..., d_in)``): ``(batch, ..., n_out)``."""
        cores = self._blend_cores(weights, x.dtype)  # (b, k, k) with b = 1 or batch
        batch = x.shape[0]
        if cores.shape[0] not in (1, batch):
            raise ValueError(
                f"the style selection has {cores.shape[0]} rows but the layer got a batch of {batch}; "
                "give one style per sample (or one for all)"
            )
        projected = x @ self.basis_in  # (batch, ..., k)
        flat = projected.reshape(batch, -1, projected.shape[-1])  # (batch, tokens, k)
        if cores.shape[0] == 1:
            mixed = flat @ cores[0].T  # (batch, tokens, k)
        else:
            mixed = torch.bmm(flat, cores.transpose(1, 2))
        return (mixed @ self.basis_out.T).reshape(*x.shape[:-1], self.out_features)  # (batch, ..., n_out)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        styled = self.selection.is_active and self.basis_out.shape[1] > 0
        if not styled and self.trainable is None:
            return result
        features = self._channels_last(x)  # (batch, ..., d_in)
        delta = None
        if styled:
            if self.fused_weights is not None:
                raise RuntimeError("a style is fused into this layer; unfuse_style() before selecting styles per batch")
            weights = self.selection.weights
            if weights.shape[1] != self.num_styles:
                raise ValueError(
                    f"the style selection covers {weights.shape[1]} styles but the layer holds {self.num_styles}"
                )
            delta = self.delta(features, weights)
        if self.trainable is not None:  # factors being learned (training/), added to the bank's styles
            learned = self.trainable(features)
            delta = learned if delta is None else delta + learned
        return result + self._channels_first(delta).to(result.dtype)

    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.base_layer, nn.Conv2d):
            return x
        stride = self.base_layer.stride
        return x[:, :, :: stride[0], :: stride[1]].permute(0, 2, 3, 1)  # a strided 1x1 conv only subsamples

    def _channels_first(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.permute(0, 3, 1, 2) if isinstance(self.base_layer, nn.Conv2d) else delta

    # -- fusing ---------------------------------------------------------------------------------

    def delta_weight(self, weights: torch.Tensor) -> torch.Tensor:
        """Dense ``dW`` of a blend ``weights (t,)`` in float32 (at least): ``(n_out, d_in)``."""
        dtype = torch.promote_types(self.basis_out.dtype, torch.float32)
        core = self._blend_cores(weights[None], dtype)[0]  # (k, k)
        return self.basis_out.to(dtype) @ core @ self.basis_in.to(dtype).T

    def fuse(self, weights: torch.Tensor) -> None:
        """Add a blend's ``dW`` to the base weight: zero overhead until :meth:`unfuse`."""
        if self.fused_weights is not None:
            raise RuntimeError("a style is already fused into this layer; unfuse_style() first")
        weight = self.base_layer.weight
        if self.basis_out.shape[1] == 0:
            self.fused_weights = weights.detach().clone()
            return
        delta = self.delta_weight(weights)
        if weight.dtype not in (torch.float32, torch.float64):
            # Half precision cannot subtract the delta back exactly: keep the original weight on the CPU.
            self._unfused_weight = weight.detach().to("cpu", copy=True)
        with torch.no_grad():
            weight.copy_((weight.to(delta.dtype) + delta.reshape(weight.shape)).to(weight.dtype))
        self.fused_weights = weights.detach().clone()

    def unfuse(self) -> None:
        """Restore the base weight (bit for bit in half precision, within float32 round-off otherwise)."""
        if self.fused_weights is None:
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            if self._unfused_weight is not None:
                weight.copy_(self._unfused_weight.to(weight.device))
            elif self.basis_out.shape[1] > 0:
                delta = self.delta_weight(self.fused_weights)
                weight.copy_((weight.to(delta.dtype) - delta.reshape(weight.shape)).to(weight.dtype))
        self._unfused_weight = None
        self.fused_weights = None

    def extra_repr(self) -> str:
        k = self.basis_out.shape[1]
        return f"in_features={self.in_features}, out_features={self.out_features}, k={k}, styles={self.num_styles}"
