"""Loading Flux with a quantized transformer, the way people run FLUX.1 on one consumer GPU.

``quantize`` names one of:

- ``"int8"`` / ``"float8"``: torchao weight-only (diffusers' ``TorchAoConfig``); int8 runs on the CPU
  too, float8 wants a GPU of compute capability 8.9 or newer for speed;
- ``"nf4"``: bitsandbytes 4-bit NormalFloat (``BitsAndBytesConfig``), CUDA only;
- a path to a ``.gguf`` file (city96's FLUX.1 GGUF files, Q8_0 to Q2_K): diffusers'
  ``GGUFQuantizationConfig``, the transformer's config read from the model's own ``transformer``
  folder.

Share applies its styles beside the quantized layers (``core.quantized``): every style works, per
prompt, with no patching of the base; only fusing a style into it is refused.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

import torch

TORCHAO_KINDS = ("int8", "float8")
QUANTIZATIONS = (*TORCHAO_KINDS, "nf4")


# The package each kind needs, and how to get it (bitsandbytes is no extra of ours: it wants CUDA).
_NEEDS = {
    "int8": ("torchao", "pip install 'share-diffusers[quant]'"),
    "float8": ("torchao", "pip install 'share-diffusers[quant]'"),
    "nf4": ("bitsandbytes", "pip install bitsandbytes, on a machine with a CUDA GPU"),
    "gguf": ("gguf", "pip install 'share-diffusers[quant]'"),
}


def check_quantize(quantize: str | None) -> None:
    """Refuse ``quantize`` unless it is None, a known kind or a ``.gguf`` file, and its package is installed;
    checked before any model loads.

    Raises:
        ValueError: an unknown kind (naming the choices), or one whose package is not installed (naming it and
            how to install it: a bad option, as the command lines report it). FileNotFoundError: no such file.
    """
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        if not quantize.endswith(".gguf"):
            raise ValueError(f"unknown quantization {quantize!r}: choose {', '.join(QUANTIZATIONS)} or a .gguf file")
        if not Path(quantize).expanduser().is_file():
            raise FileNotFoundError(f"no GGUF file at {quantize}")
    package, install = _NEEDS.get(quantize, _NEEDS["gguf"])
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"quantize={quantize!r} needs {package}, which is not installed: {install}")


def _torchao_config(kind: str):
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as error:
        raise ImportError(f"quantize={kind!r} needs torchao: pip install 'share-diffusers[quant]'") from error
    return Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()


def quantization_config(kind: str, dtype: torch.dtype):
    """diffusers' quantization config of a transformer for ``kind`` in :data:`QUANTIZATIONS`."""
    if kind in TORCHAO_KINDS:
        from diffusers import TorchAoConfig

        return TorchAoConfig(_torchao_config(kind))
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def load_quantized_transformer(model: str, quantize: str, dtype: torch.dtype):
    """Flux's transformer of ``model`` (a pipeline folder or Hub id), quantized as ``quantize`` says.

    Args:
        model: where the transformer's config (and, unless ``quantize`` is a GGUF file, its weights) live.
        quantize: see the module docstring.
        dtype: the compute dtype (activations, Share's bases and cores).
    """
    from diffusers import FluxTransformer2DModel

    from .pipeline_flux import dtype_keyword

    check_quantize(quantize)
    if quantize.endswith(".gguf"):
        try:
            import gguf  # noqa: F401  (diffusers' GGUF loader needs it)
        except ImportError as error:
            raise ImportError("a .gguf transformer needs gguf: pip install 'share-diffusers[quant]'") from error
        from diffusers import GGUFQuantizationConfig

        return FluxTransformer2DModel.from_single_file(
            str(Path(quantize).expanduser()),
            config=model,
            subfolder="transformer",
            quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
            **dtype_keyword({"dtype": dtype}),
        )
    with _without_float32_int8_advice(quantize, dtype):
        return FluxTransformer2DModel.from_pretrained(
            model,
            subfolder="transformer",
            quantization_config=quantization_config(quantize, dtype),
            use_safetensors=True,  # never unpickle: a repo holding only .bin weights is refused
            **dtype_keyword({"dtype": dtype}),
        )


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _without_float32_int8_advice(quantize: str, dtype: torch.dtype) -> Iterator[None]:
    """diffusers tells every torchao int8 load in another dtype than bfloat16 to "set torch_dtype=torch.bfloat16":
    float32 (the CPU's dtype here) works, within int8's own error (tests/test_quantized.py), so that advice is
    dropped for float32 only; float16 keeps it (not measured here)."""
    if quantize != "int8" or dtype != torch.float32:
        yield
        return
    logger = logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer")
    advice = _DropMessages("You are trying to set torch_dtype to torch.float32 for integer quantization")
    logger.addFilter(advice)
    try:
        yield
    finally:
        logger.removeFilter(advice)


def quantize_in_place(transformer: torch.nn.Module, kind: str) -> None:
    """torchao weight-only quantization of every linear of an already built transformer (``int8``/``float8``).

    Styles injected before stay unfused beside the quantized layers.

    Raises:
        ShareStateError: a style is fused into the transformer (it would be quantized into the base for good,
            and unfusing would fail on the quantized weights); nothing is quantized.
    """
    from .core.errors import ShareStateError
    from .core.model import ShareModel

    if kind not in TORCHAO_KINDS:
        raise ValueError(f"only {' and '.join(TORCHAO_KINDS)} quantize a model built in memory, not {kind!r}")
    share = ShareModel.of(transformer)
    if share is not None and share.fused_style is not None:
        raise ShareStateError(
            f"style {share.fused_style!r} is fused into the transformer; unfuse_style() before quantizing it"
        )
    from torchao.quantization import quantize_

    quantize_(transformer, _torchao_config(kind))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the parameters and buffers of ``model`` occupy as stored (packed and quantized ones included)."""

    def stored(tensor: torch.Tensor) -> int:
        names = getattr(tensor, "tensor_data_names", None)  # torchao's tensor subclasses
        if names:
            return sum(stored(getattr(tensor, name)) for name in names)
        return tensor.numel() * tensor.element_size()

    return sum(stored(tensor) for tensor in [*model.parameters(), *model.buffers()])
