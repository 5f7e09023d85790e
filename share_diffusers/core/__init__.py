"""Share core: fitting, continual merging, the ``ShareLinear`` layer, injection and the file format.

Depends on torch, safetensors and tqdm only, so the same core serves diffusers pipelines and
transformers classifiers.
"""

from .adapters import CanonicalLora, LoraAdapter, LoraLayer, lora_scale
from .block_weights import BlockLayout
from .checkpoint import FORMAT_VERSION, UnaddressableStyleNameWarning, load_factors, save_factors
from .errors import (
    CheckpointError,
    FactorValueError,
    LoraFormatError,
    QuantizedBaseError,
    ShapeMismatchError,
    ShareCheckpointError,
    ShareError,
    ShareIOError,
    ShareStateError,
    ShareValueError,
    StyleError,
)
from .export import export_rank, style_as_lora
from .factors import FactorsSnapshot, ShareConfig, ShareFactors, StyleInfo
from .inject import find_targets, remove_share
from .layer import ShareLinear, StyleSelection
from .model import ShareModel, style_weights
from .similarity import (
    NearDuplicateStyleWarning,
    kept_energy,
    near_duplicates,
    style_drift,
    style_map,
    style_similarity,
)
from .subspace import LayerShare, RankRule

__all__ = [
    "CanonicalLora",
    "LoraAdapter",
    "LoraLayer",
    "lora_scale",
    "FORMAT_VERSION",
    "load_factors",
    "save_factors",
    "UnaddressableStyleNameWarning",
    "CheckpointError",
    "FactorValueError",
    "LoraFormatError",
    "ShapeMismatchError",
    "ShareCheckpointError",
    "ShareError",
    "ShareIOError",
    "QuantizedBaseError",
    "ShareStateError",
    "ShareValueError",
    "StyleError",
    "export_rank",
    "style_as_lora",
    "ShareConfig",
    "ShareFactors",
    "FactorsSnapshot",
    "StyleInfo",
    "find_targets",
    "remove_share",
    "ShareLinear",
    "StyleSelection",
    "ShareModel",
    "BlockLayout",
    "NearDuplicateStyleWarning",
    "kept_energy",
    "style_drift",
    "near_duplicates",
    "style_map",
    "style_similarity",
    "style_weights",
    "LayerShare",
    "RankRule",
]
