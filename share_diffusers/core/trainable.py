"""Learning a new style or task from data (paper Step 2) and merging it (Step 3, DESIGN.md section 3).

Three modes, per target layer:

- temporary factors (paper): the top ``phi`` columns of the current bases become trainable
  ``basis_out (n_out, phi)`` / ``basis_in (d_in, phi)`` with fresh coefficients ``core_out``,
  ``core_in`` ``(phi, p)``: ``phi (n + d + 2p)`` parameters a layer, against ``r (n + d)`` for a LoRA.
- coefficients only: the full current bases stay frozen and only ``(k, p)`` cores are trained.
- fine-tuning a held style (paper Step 3, "eps can then be further fine-tuned"): as coefficients
  only, but the cores start from the style's own and replace them afterwards (``trained_cores``).

Either way the result is a rank-p update ``(basis_out @ core_out) (basis_in @ core_in).T`` that
merges like any LoRA. ``core_out`` starts at zero (as LoRA's B does), so training starts from the
model as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import LoraAdapter, LoraLayer
from .errors import ShareStateError, ShareValueError, StyleError
from .factors import ShareFactors
from .layer import ShareLinear


class TrainableFactors(nn.Module):
    """The update being learned on one layer: ``dW = (basis_out @ core_out) @ (basis_in @ core_in).T``.

    Args:
        basis_out: ``(n_out, phi)`` initial output directions.
        basis_in: ``(d_in, phi)`` initial input directions.
        pseudo_rank: ``p``.
        train_bases: train the directions too (temporary factors) or only the cores.
        generator: for the random ``core_in`` init (std ``1 / sqrt(phi)``).
        initial_cores: ``(core_out, core_in)``, each ``(phi, p)``, to start from instead of zero / random.
    """

    def __init__(
        self,
        basis_out: torch.Tensor,
        basis_in: torch.Tensor,
        pseudo_rank: int,
        train_bases: bool,
        generator: torch.Generator | None = None,
        initial_cores: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        super().__init__()
        phi = basis_out.shape[1]
        dtype = basis_out.dtype
        if initial_cores is None:
            core_out = torch.zeros(phi, pseudo_rank)
            core_in = torch.randn(phi, pseudo_rank, generator=generator, dtype=torch.float32) / max(phi, 1) ** 0.5
        else:
            core_out, core_in = initial_cores
        if train_bases:
            self.basis_out = nn.Parameter(basis_out.clone())
            self.basis_in = nn.Parameter(basis_in.clone())
        else:  # frozen: they come from the checkpoint, so a resumed run cannot mix in a stale copy
            self.register_buffer("basis_out", basis_out.clone(), persistent=False)
            self.register_buffer("basis_in", basis_in.clone(), persistent=False)
        self.core_out = nn.Parameter(core_out.to(dtype=dtype, device=basis_out.device).clone())
        self.core_in = nn.Parameter(core_in.to(dtype=dtype, device=basis_out.device).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_in) -> (..., n_out)
        # Factors may be float32 beside a bf16 model (trained in float32, as PEFT's LoRAs are): compute in theirs.
        x = x.to(self.basis_in.dtype)
        hidden = (x @ self.basis_in) @ self.core_in  # (..., p)
        return (hidden @ self.core_out.T) @ self.basis_out.T

    def to_lora(self, conv: bool = False) -> LoraLayer:
        """The learned update as rank-p LoRA factors (float32, scale 1); ``conv``: the layer is a 1x1 ``Conv2d``
        (an export then writes ``(a, b, 1, 1)`` kernels, as PEFT's conv LoRAs have)."""
        with torch.no_grad():
            up = (self.basis_out @ self.core_out).float()  # (n_out, p)
            down = (self.basis_in @ self.core_in).float().T  # (p, d_in)
        return LoraLayer(up=up.cpu(), down=down.cpu(), scale=1.0, conv=conv)


def attach_trainable(
    layers: dict[str, ShareLinear],
    pseudo_rank: int,
    phi: int | None = None,
    coefficients_only: bool = False,
    seed: int = 0,
) -> dict[str, TrainableFactors]:
    """Give every Share layer a :class:`TrainableFactors`; returns them by layer name.

    Args:
        phi: temporary basis vectors per layer (paper: between 1 and k/4); ignored with
            ``coefficients_only`` (all k are used). Layers with fewer than ``phi`` basis vectors
            (or none yet) are completed with random orthonormal directions.
        coefficients_only: freeze the bases; train only the ``(k, p)`` cores.
    """
    _check_free(layers)
    if coefficients_only:
        for name, layer in layers.items():
            if layer.basis_out.shape[1] == 0:
                raise ShareValueError(f"{name} has no basis yet: coefficients-only training needs an existing subspace")
    generator = torch.Generator().manual_seed(seed)
    attached = {}
    for name, layer in layers.items():
        k = layer.basis_out.shape[1]
        width = k if coefficients_only else (phi if phi is not None else max(1, k // 4))
        basis_out = _directions(layer.basis_out, width, generator)
        basis_in = _directions(layer.basis_in, width, generator)
        trainable = TrainableFactors(
            basis_out, basis_in, pseudo_rank, train_bases=not coefficients_only, generator=generator
        )
        layer.trainable = trainable.to(device=layer.base_layer.weight.device)
        attached[name] = layer.trainable
    return attached


def attach_style_cores(layers: dict[str, ShareLinear], factors: ShareFactors, name: str) -> dict[str, TrainableFactors]:
    """Trainable copies of held style ``name``'s cores, bases frozen, on every layer the style touches.

    While they are attached, select no style: the trainable factors *are* the style (the model starts
    exactly where the stored style is). ``trained_cores`` then gives what ``ShareFactors.replace_style``
    takes. Refused for centred factors, whose anchor the trainable factors do not carry.
    """
    index = factors.style_index(name)
    if any(state.anchor is not None for state in factors.layers.values()):
        raise StyleError("fine-tuning a style of centred factors (center=True) is not supported")
    touched = {
        layer_name: layer
        for layer_name, layer in layers.items()
        if layer_name in factors.layers and bool(factors.layers[layer_name].present[index])
    }
    if not touched:
        raise StyleError(f"style {name!r} touches none of the model's Share layers")
    _check_free(touched)
    attached = {}
    for layer_name, layer in touched.items():
        state = factors.layers[layer_name]
        trainable = TrainableFactors(
            state.basis_out.float(),
            state.basis_in.float(),
            state.pseudo_rank,
            train_bases=False,
            initial_cores=(state.core_out[index].float(), state.core_in[index].float()),
        )
        layer.trainable = trainable.to(device=layer.base_layer.weight.device)
        attached[layer_name] = layer.trainable
    return attached


def _check_free(layers: dict[str, ShareLinear]) -> None:
    """Refuse before attaching anything, so a refused call leaves every layer as it was."""
    for name, layer in layers.items():
        if layer.trainable is not None:
            raise ShareStateError(f"{name} already has factors being trained; detach_trainable() first")


def trained_cores(layers: dict[str, ShareLinear]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``layer name -> (core_out, core_in)`` (float32, CPU) of every layer with trainable factors."""
    return {
        name: (layer.trainable.core_out.detach().float().cpu(), layer.trainable.core_in.detach().float().cpu())
        for name, layer in layers.items()
        if layer.trainable is not None
    }


def _directions(basis: torch.Tensor, width: int, generator: torch.Generator) -> torch.Tensor:
    """The first ``width`` columns of ``basis`` (float32), completed by random orthonormal ones if short."""
    taken = basis[:, :width].float().cpu()
    missing = width - taken.shape[1]
    if missing > 0:
        extra = torch.randn(basis.shape[0], missing, generator=generator)
        extra = extra - taken @ (taken.T @ extra)  # orthogonal to the columns we have
        taken = torch.cat([taken, torch.linalg.qr(extra)[0]], dim=1)
    return taken.to(basis.device)


def trained_adapter(layers: dict[str, ShareLinear], source: dict | None = None) -> LoraAdapter:
    """The learned updates of all layers as one LoRA adapter, ready for ``ShareFactors.merge``."""
    missing = [name for name, layer in layers.items() if layer.trainable is None]
    if missing:
        raise ShareStateError(f"no factors are being trained on {missing[0]!r}")
    return LoraAdapter(
        {name: layer.trainable.to_lora(conv=isinstance(layer.base_layer, nn.Conv2d)) for name, layer in layers.items()},
        source=source or {},
    )


def detach_trainable(layers: dict[str, ShareLinear]) -> None:
    for layer in layers.values():
        layer.trainable = None


def count_parameters(trainables: dict[str, TrainableFactors]) -> int:
    """Trainable parameters in all layers."""
    return sum(p.numel() for module in trainables.values() for p in module.parameters() if p.requires_grad)


def lora_parameter_count(layers: dict[str, ShareLinear], rank: int) -> int:
    """What a LoRA of ``rank`` on the same layers would train: ``r (n + d)`` a layer."""
    return sum(rank * (layer.out_features + layer.in_features) for layer in layers.values())
