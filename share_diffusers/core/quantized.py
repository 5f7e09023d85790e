"""Quantized base layers: how to tell them apart, and in which dtype a style is computed on top of them.

Share never touches a base weight while styles are applied: the style's delta runs beside the base
layer, as QLoRA's adapters do. So one rule covers every quantization diffusers loads, whatever its
storage: GGUF's ``GGUFLinear`` (packed ``uint8`` blocks), torchao's tensor subclasses on a plain
``nn.Linear`` (int8 / float8 weight-only), bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` and
optimum-quanto's ``QLinear``. Only :func:`compute_dtype` needs to know where each keeps its
compute dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def is_quantized(layer: nn.Module) -> bool:
    """True when ``layer.weight`` is not a plain tensor of 16 bits or more (packed, integer, float8, a subclass)."""
    weight = layer.weight
    plain = type(weight) in (torch.Tensor, nn.Parameter)
    return not plain or not weight.dtype.is_floating_point or weight.dtype.itemsize < 2


def quantization_name(layer: nn.Module) -> str:
    """A short human name of a layer's quantization for messages: ``"GGUF Q4_0"``, ``"Int8Tensor"``, ..."""
    weight = layer.weight
    quant_type = getattr(weight, "quant_type", None)  # GGUFParameter
    if quant_type is not None:
        return f"GGUF {getattr(quant_type, 'name', quant_type)}"
    return type(weight).__name__ if type(weight) not in (torch.Tensor, nn.Parameter) else str(weight.dtype)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype in which ``layer`` computes its output: the dtype the Share bases and blends use.

    GGUF and bitsandbytes 4-bit layers name it (``compute_dtype``), as does diffusers' layerwise-casting hook
    (weights stored in float8, cast for each forward); torchao and quanto weights are
    tensor subclasses that report the original floating dtype; otherwise the bias's dtype, and
    float32 for an integer weight without either (bitsandbytes 8-bit: the forward casts the delta
    to the output's dtype).
    """
    named = getattr(layer, "compute_dtype", None)
    if isinstance(named, torch.dtype):
        return named
    # diffusers' enable_layerwise_casting stores weights in float8 and casts them for each forward
    hooks = getattr(layer, "_diffusers_hook", None)
    casting = hooks.get_hook("layerwise_casting") if hooks is not None else None
    if isinstance(getattr(casting, "compute_dtype", None), torch.dtype):
        return casting.compute_dtype
    weight = layer.weight
    if weight.dtype.is_floating_point and weight.dtype.itemsize >= 2:
        return weight.dtype
    bias = getattr(layer, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dtype.is_floating_point and bias.dtype.itemsize >= 2:
        return bias.dtype
    return torch.float32


@torch.no_grad()
def effective_weight(layer: nn.Linear) -> torch.Tensor:
    """The dense ``(n_out, d_in)`` weight a linear layer applies, float32, read through its own forward.

    Feeds the identity matrix through ``layer`` (minus its bias), so it is exactly what the
    layer's kernel computes, dequantization included, for any quantization backend. A reference for
    tests and for measuring quantization error; ``d_in`` rows of compute, so not for the hot path.
    """
    dtype = compute_dtype(layer)
    identity = torch.eye(layer.in_features, dtype=dtype, device=layer.weight.device)
    output = layer(identity).float()  # (d_in, n_out) = W^T + bias
    if getattr(layer, "bias", None) is not None:
        output = output - layer.bias.float()
    return output.T.contiguous()
