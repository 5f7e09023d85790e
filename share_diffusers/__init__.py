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


_NEED_DIFFUSERS = ("ShareFluxPipeline", "ShareLoaderMixin", "MergeReport", "build_tiny_flux_pipeline")


def __getattr__(name: str):
    # diffusers is heavy to import: the pipeline classes load on first use only, without the one-time import
    # notes other libraries print along the way (see runtime.import_diffusers_quietly).
    if name in _NEED_DIFFUSERS:
        from .runtime import import_diffusers_quietly

        import_diffusers_quietly()
    if name == "ShareFluxPipeline":
        from .pipeline_flux import ShareFluxPipeline

        return ShareFluxPipeline
    if name in ("ShareLoaderMixin", "MergeReport"):
        from . import loader

        return getattr(loader, name)
    if name == "build_tiny_flux_pipeline":
        from .tiny_flux import build_tiny_flux_pipeline

        return build_tiny_flux_pipeline
    raise AttributeError(f"module 'share_diffusers' has no attribute {name!r}")
