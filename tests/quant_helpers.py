"""Helpers of the quantized-base tests (CPU and GPU): dequantized references and exact comparisons."""

from __future__ import annotations

import copy

import numpy as np
import torch

from share_diffusers.core import ShareModel
from share_diffusers.core.quantized import effective_weight


def dequantized_copy(quantized: torch.nn.Module, float_model: torch.nn.Module) -> torch.nn.Module:
    """``float_model`` with every linear replaced by what the matching quantized linear applies."""
    reference = copy.deepcopy(float_model)
    quantized_modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(effective_weight(quantized_modules[name]))
    return reference


def quantized_bits(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's stored content, comparable with ``torch.equal`` (torchao's subclasses implement no ``equal``)."""
    names = getattr(tensor, "tensor_data_names", None)
    if names:
        return torch.cat([getattr(tensor, name).detach().flatten().view(torch.uint8) for name in names])
    return tensor.detach().clone()


def with_factors(model: torch.nn.Module, factors) -> ShareModel:
    return ShareModel.inject(model, factors)


def relative(reference: np.ndarray | torch.Tensor, value: np.ndarray | torch.Tensor) -> float:
    reference, value = torch.as_tensor(reference).double(), torch.as_tensor(value).double()
    return float((reference - value).norm() / reference.norm())
