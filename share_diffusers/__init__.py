"""share-diffusers: many LoRAs as one shared low-rank subspace (Share), with per-prompt styles."""

from .core import (
    LoraAdapter,
    LoraLayer,
    ShareConfig,
    ShareFactors,
    ShareLinear,
    ShareModel,
    load_factors,
    save_factors,
    style_as_lora,
)
from .lora_files import load_lora, save_lora

__version__ = "0.1.0"

__all__ = [
    "LoraAdapter",
    "LoraLayer",
    "ShareConfig",
    "ShareFactors",
    "ShareLinear",
    "ShareModel",
    "load_factors",
    "save_factors",
    "style_as_lora",
    "load_lora",
    "save_lora",
    "__version__",
]
