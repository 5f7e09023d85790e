"""LoRA factors of one adapter, with their scale folded in, and their gauge-free canonical form.

A LoRA on a frozen linear ``W0: (n_out, d_in)`` is ``dW = scale * up @ down`` with
``up: (n_out, r)`` ("B", ``lora_B``), ``down: (r, d_in)`` ("A", ``lora_A``) and
``scale = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA). DESIGN.md section 1: the scale is always
folded in before anything else.

Device and dtype policy (the same for :mod:`.subspace` and :mod:`.factors`): fitting and merging run in
float64 on the CPU, and ``ShareFactors`` are stored on the CPU in float32 (the checkpoint form). LoRA
factors may come from any device and in any dtype (fp32, bf16, fp16; CUDA or CPU, e.g. straight from a
PEFT model being trained); they are moved to the CPU in float64 exactly once per layer, in
:meth:`LoraLayer.canonical`, whose result is cached on the layer, so a loader that first asks for the
energies and then merges pays for one transfer and one small SVD per layer. Everything downstream sees
only the CPU float64 canonical form.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .errors import FactorValueError, ShapeMismatchError, ShareValueError

# Fitting always runs in float64: community LoRAs are mostly bf16/fp16, and the tail singular values
# that decide truncation error are far below half precision's resolution.
FIT_DTYPE = torch.float64
# ... and on the CPU: the factors live there (a checkpoint, a pipeline's state kept across offloading), the
# work per layer is a few skinny QRs that a GPU does not speed up, and LoRAs on any device then merge.
FIT_DEVICE = torch.device("cpu")


def resolve_fit_device(device: torch.device | str | None) -> torch.device:
    """Where fitting runs: ``device``, or ``FIT_DEVICE`` (the CPU); ``"cuda"`` means the current CUDA device."""
    if device is None:
        return FIT_DEVICE
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():  # torch's own answer: AssertionError, deep inside
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ShareValueError(f"device {str(device)!r}: {why}; leave device unset to fit and merge on the CPU")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def all_finite(tensor: torch.Tensor) -> bool:
    """``bool(torch.isfinite(tensor).all())``, in one pass when it holds.

    A finite sum means every entry is finite (a NaN or an infinity makes the sum NaN or infinite), so the
    sum decides the common case; only a sum that is not finite (a bad entry, or the sum itself overflowing)
    pays for the entrywise test. At FLUX.1 width the sum took 0.06 ms where ``isfinite(...).all()`` took 1.1.
    """
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def lora_scale(alpha: float | None, rank: int, use_rslora: bool = False) -> float:
    """The multiplier of ``up @ down``: ``alpha / r`` (or ``alpha / sqrt(r)``); ``alpha=None`` means 1."""
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if use_rslora else rank)


@dataclass
class LoraLayer:
    """One layer's LoRA factors.

    Args:
        up: ``(n_out, r)``, the LoRA "B" matrix, on any device, in any floating dtype.
        down: ``(r, d_in)``, the LoRA "A" matrix, likewise.
        scale: multiplier of ``up @ down`` (``alpha / r``), already resolved.
        conv: the layer is a 1x1 ``Conv2d`` (factors stored as ``(a, b, 1, 1)`` kernels on disk).
    """

    up: torch.Tensor
    down: torch.Tensor
    scale: float = 1.0
    conv: bool = False
    # The canonical form and what it was computed from (the tensors, their in-place versions, the scale):
    # it is reused only while all of those are unchanged. Not part of the value (eq, repr, init).
    _canonical: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for factor, tensor in (("up (lora_B)", self.up), ("down (lora_A)", self.down)):
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise FactorValueError(f"the LoRA's {factor} factor must be a real floating-point tensor, got {kind}")
            if tensor.is_meta:
                raise FactorValueError(f"the LoRA's {factor} factor has no data (it is on the meta device)")
        if self.up.ndim != 2 or self.down.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ShapeMismatchError(
                f"LoRA factors must be up (n_out, r) and down (r, d_in); got up {tuple(self.up.shape)} "
                f"and down {tuple(self.down.shape)}"
            )
        if (
            isinstance(self.scale, bool)
            or not isinstance(self.scale, numbers.Real)
            or not math.isfinite(float(self.scale))
        ):
            raise FactorValueError(f"the LoRA's scale (alpha / rank) must be a finite number, got {self.scale!r}")

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_out, d_in)`` of the layer's weight."""
        return self.up.shape[0], self.down.shape[1]

    def delta_weight(self, dtype: torch.dtype = FIT_DTYPE) -> torch.Tensor:
        """Dense ``scale * up @ down``: ``(n_out, d_in)``. For tests and small layers only."""
        return self.scale * self.up.to(dtype) @ self.down.to(dtype)

    def _canonical_key(self) -> tuple:
        return (self.up, self.down, self.up._version, self.down._version, self.scale)

    def _cached_canonical(self, device: torch.device | str | None = None) -> CanonicalLora | None:
        """The cached canonical form, if ``up``, ``down`` and ``scale`` are still what it was computed from and it
        is on ``device`` (default ``FIT_DEVICE``)."""
        if self._canonical is None:
            return None
        (up, down, *numbers), cached = self._canonical
        key = self._canonical_key()
        if cached.U.device != resolve_fit_device(device):
            return None
        return cached if up is self.up and down is self.down and tuple(numbers) == key[2:] else None

    def canonical(self, device: torch.device | str | None = None) -> CanonicalLora:
        """Thin SVD ``dW = U diag(S) V.T`` from the factors in ``O((n + d) r^2)``, never forming ``dW``.

        QR of ``up`` and of ``down.T``, then the SVD of the small ``r x r`` product (DESIGN 2.1).
        The result does not depend on the gauge: ``(up G, G^-1 down)`` gives the same ``U, S, V``
        (up to the signs of singular vectors).

        The factors are detached and copied to ``device`` (default the CPU, ``FIT_DEVICE``) in float64 here,
        once: ``U: (n_out, r)``, ``S: (r,)`` and ``V: (d_in, r)`` are float64 on ``device`` whatever the
        factors' device and dtype. The result is cached on the layer until ``up``, ``down`` or ``scale``
        change (replaced or modified in place) or another device is asked for; it holds ``(n_out + d_in) r``
        float64 numbers.
        """
        device = resolve_fit_device(device)
        cached = self._cached_canonical(device)
        if cached is not None:
            return cached
        key = self._canonical_key()
        up = self.up.detach().to(device=device, dtype=FIT_DTYPE)  # (n, r)
        down = self.down.detach().to(device=device, dtype=FIT_DTYPE)  # (r, d)
        for which, factor in (("up (lora_B)", up), ("down (lora_A)", down)):
            if not all_finite(factor):
                raise FactorValueError(f"the LoRA's {which} factor contains NaN or Inf")
        q_up, r_up = torch.linalg.qr(up)  # (n, r), (r, r)
        q_down, r_down = torch.linalg.qr(down.T)  # (d, r), (r, r)
        small = self.scale * (r_up @ r_down.T)  # (r, r)
        if not all_finite(small):
            raise FactorValueError(f"the LoRA's update overflows float64: its scale {self.scale:g} is out of range")
        u_small, s, vh_small = torch.linalg.svd(small, full_matrices=False)  # thin: r may exceed n or d
        # Formed column-major, like the QR factors, as the merge's QR wants them (see subspace.principal_decomposition).
        result = CanonicalLora(U=(u_small.T @ q_up.T).T, S=s, V=(vh_small @ q_down.T).T)
        self._canonical = (key, result)
        return result


def canonical_forms(layers: Sequence[LoraLayer], device: torch.device | str | None = None) -> list[CanonicalLora]:
    """:meth:`LoraLayer.canonical` of several layers of one shape and rank, with batched QRs and SVDs.

    Step for step the maths of :meth:`LoraLayer.canonical` on ``(L, ...)`` stacks: one conversion to float64
    on ``device`` (default the CPU), one QR per side and one SVD for all layers. Forms already cached are
    reused; the new ones are cached on their layers as :meth:`LoraLayer.canonical` caches them. Layers of
    different shapes, ranks, dtypes or devices, and any layer whose factors are not finite or whose update
    overflows, are left to :meth:`LoraLayer.canonical` itself, which raises the error of the first bad one.
    """
    device = resolve_fit_device(device)
    todo = [layer for layer in layers if layer._cached_canonical(device) is None]
    kinds = {(layer.up.shape, layer.down.shape, layer.up.dtype, layer.down.dtype, layer.up.device) for layer in todo}
    if len(todo) > 1 and len(kinds) == 1:
        keys = [layer._canonical_key() for layer in todo]
        up = torch.stack([layer.up.detach() for layer in todo]).to(device=device, dtype=FIT_DTYPE)  # (L, n, r)
        down = torch.stack([layer.down.detach() for layer in todo]).to(device=device, dtype=FIT_DTYPE)  # (L, r, d)
        if all_finite(up) and all_finite(down):
            q_up, r_up = torch.linalg.qr(up)  # (L, n, r), (L, r, r)
            q_down, r_down = torch.linalg.qr(down.mT)  # (L, d, r), (L, r, r)
            scale = torch.tensor([layer.scale for layer in todo], dtype=FIT_DTYPE, device=device)
            small = scale[:, None, None] * (r_up @ r_down.mT)  # (L, r, r)
            if all_finite(small):
                u_small, s, vh_small = torch.linalg.svd(small, full_matrices=False)
                u = (u_small.mT @ q_up.mT).mT  # (L, n, r), column-major per layer as canonical() forms it
                v = (vh_small @ q_down.mT).mT  # (L, d, r)
                for i, (layer, key) in enumerate(zip(todo, keys, strict=True)):
                    layer._canonical = (key, CanonicalLora(U=u[i], S=s[i], V=v[i]))
    return [layer.canonical(device) for layer in layers]


@dataclass
class CanonicalLora:
    """``dW = U @ diag(S) @ V.T`` with orthonormal ``U: (n_out, r)``, ``V: (d_in, r)``, ``S: (r,)`` >= 0."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor

    @property
    def energy(self) -> float:
        """``||dW||_F^2``."""
        return float((self.S**2).sum())


@dataclass
class LoraAdapter:
    """A whole LoRA: layer name -> factors, plus where it came from.

    Layer names are the module paths of the model the LoRA targets (``transformer_blocks.0.attn.to_q``).
    ``source`` is free-form provenance that ends up in the checkpoint's JSON (repo, revision, file, ...).
    """

    layers: dict[str, LoraLayer]
    source: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The largest rank over the adapter's layers."""
        return max((layer.rank for layer in self.layers.values()), default=0)

    def num_parameters(self) -> int:
        return sum(layer.up.numel() + layer.down.numel() for layer in self.layers.values())
