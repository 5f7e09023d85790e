"""What the command line, the style studio and a server share: loading a pipeline with its styles, the
generation defaults of each kind of model, the text syntax of styles, and one-line user errors.

    pipe = load_pipeline(None)                  # the embedded demo model: no download, float32, CPU
    load_styles(pipe, None)                     # its demo styles: inverted, tint, stripes, outlines
    defaults = defaults_for(pipe, None)         # 32x32 (also its largest), 16 steps, guidance 3.0
    images = pipe(prompt=["a photo of a bag"], style=[parse_style("tint=0.5,stripes=0.5")],
                  **call_arguments(pipe, defaults, 1)).images

Importing this module imports neither diffusers (it loads in :func:`load_pipeline`) nor Gradio, and
nothing from :mod:`share_diffusers.cli` or :mod:`share_diffusers.studio`: they import from here.
"""

from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .core.errors import ShareError, ShareValueError
from .core.model import BlockWeight, StyleSpec
from .fashion.data import CLASS_NAMES, prompt_for
from .fashion.model import (
    DEMO_CALL,
    DEMO_GUIDANCE,
    DEMO_PIPELINE_DIR,
    DEMO_STYLES_DIR,
    RESOLUTION,
    has_demo_architecture,
)
from .lora_files import PICKLE_SUFFIXES
from .quantization import check_quantize, load_quantized_transformer, quantize_in_place

__all__ = [
    "DEFAULT_PROMPTS",
    "DEMO_DEFAULTS",
    "DTYPES",
    "FLUX_DEV_DEFAULTS",
    "FLUX_SCHNELL_DEFAULTS",
    "NONE",
    "TINY_RANDOM",
    "TINY_RANDOM_DEFAULTS",
    "USER_ERRORS",
    "MAX_SEED",
    "check_seed",
    "check_server_options",
    "check_guidance",
    "BlockWeight",
    "GenerationDefaults",
    "StyleSpec",
    "call_arguments",
    "defaults_for",
    "error_line",
    "format_style",
    "import_diffusers_quietly",
    "load_pipeline",
    "load_styles",
    "parse_block_weights",
    "parse_style",
    "resolve_device",
    "resolve_dtype",
    "style_caption",
]

TINY_RANDOM = "tiny-random"
"""``model`` value for the random-weight tiny pipeline (fast numerics, pictures of noise)."""
DTYPES = ("float32", "bfloat16", "float16")
# Prompts the embedded demo model draws: its training captions of the Fashion-MNIST classes.
DEFAULT_PROMPTS = tuple(prompt_for(CLASS_NAMES.index(name)) for name in ("sneaker", "bag"))

# -- errors -------------------------------------------------------------------------------------

USER_ERRORS = (ShareError, ValueError, OSError)
"""What bad input raises (a file, a name, a number, a Hub id): shown as one line, never as a traceback."""

MAX_SEED = 2**32 - 1
"""Largest seed the studio, the server and ``generate`` take (numpy's range, what most image UIs show)."""


def check_seed(seed) -> int:
    """``seed`` as an int, refused unless a whole number from 0 to :data:`MAX_SEED` (torch's generator
    takes only what fits in 64 bits, and a bool or a float is a mistake, not a seed)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"the seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}")
    return int(seed)


def error_line(error: BaseException) -> str:
    """The error's message on one line (an empty message gives the exception's type name)."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return text or type(error).__name__


# -- style syntax -------------------------------------------------------------------------------

NONE = "none"
_BLOCK_SYNTAX = "ink[double=1,single=0.3]"


def parse_style(text: str | None) -> StyleSpec:
    """The text form of a style, as the command line, the studio and captions write it.

    - ``none`` or empty -> None; ``ink`` -> ``"ink"``; ``ink=0.5,neon=0.5`` -> ``{"ink": 0.5, "neon": 0.5}``;
    - per-block weights in brackets (:mod:`share_diffusers.core.block_weights`): ``ink[double=1,single=0.3]``
      -> ``{"ink": {"double": 1.0, "single": 0.3}}``, with ranges and ``*`` (``ink[double.0-9=1,*=0.2]``),
      or a vector with one value per block (``ink[1,1,0.5,...]``, FLUX.1: 19 double then 38 single,
      or a leading BASE value first);
    - both in one blend: ``ink[double=1,single=0.3],neon=0.5``.

    Entries are split on the commas outside brackets. Which block keys exist, and how long a vector must
    be, only the model knows: the pipeline checks that when the style is used.

    Raises:
        ValueError: naming the entry at fault: no ``=`` or brackets, a weight that is not a finite
            number, unbalanced or nested brackets, a weight and brackets together, empty brackets,
            key=value items mixed with bare values, a block key or a style twice.
    """
    text = (text or "").strip()
    if not text or text.lower() == NONE:
        return None
    entries = _split_entries(text)
    if not any(mark in text for mark in "=[]"):
        if len(entries) > 1:
            raise ValueError(f"{text!r}: give a blend with weights, e.g. ink=0.5,neon=0.5")
        return text
    blend: dict[str, BlockWeight] = {}
    for entry in entries:
        name, weight = _parse_entry(entry)
        if name in blend:
            raise ValueError(f"style {name!r} appears twice in the blend {text!r}")
        blend[name] = weight
    return blend


def format_style(spec: StyleSpec) -> str:
    """The text form of a style, for captions and text boxes; :func:`parse_style` reads it back.

    Weights are written as short as reads back exactly (``0.5``, ``1``, ``0.30000000000000004``), so
    ``parse_style(format_style(spec)) == spec`` for any blend but ``{name: 1.0}``, which is written ``name``.
    """
    if spec is None:
        return NONE
    if isinstance(spec, str):
        return spec
    if len(spec) == 1 and _is_plain(weight := next(iter(spec.values()))) and weight == 1.0:
        return next(iter(spec))
    return ",".join(_format_entry(name, weight) for name, weight in spec.items())


def style_caption(spec: StyleSpec, style_scale: float = 1.0) -> str:
    """The style of an image as its caption says it: :func:`format_style`, then `` · strength S`` when the
    strength (``style_scale``) is not 1, so that the caption reproduces the image (``tint · strength 0.5``).
    No style (``none``) reads the same at any strength."""
    text = format_style(spec)
    if spec is None or style_scale == 1.0:
        return text
    return f"{text} · strength {_format_number(style_scale)}"


def _split_entries(text: str) -> list[str]:
    """``text`` split on the commas outside brackets, each entry stripped."""
    entries, start, depth = [], 0, 0
    for position, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            entries.append(text[start:position].strip())
            start = position + 1
    entries.append(text[start:].strip())
    return entries


def _parse_entry(entry: str) -> tuple[str, BlockWeight]:
    """``(name, weight)`` of one blend entry: ``name=weight`` or ``name[blocks]``."""
    head, bracket, rest = entry.partition("[")
    if not bracket:
        if "]" in entry:
            raise ValueError(f"blend entry {entry!r} has a ']' without '['")
        name, equals, weight = (piece.strip() for piece in entry.partition("="))
        if not equals or not name:
            raise ValueError(f"blend entry {entry!r} must be name=weight, e.g. ink=0.5")
        return name, _number(weight, f"blend weight of {name!r}")
    if "]" not in rest:
        raise ValueError(f"blend entry {entry!r} has no closing ']'")
    inside, _, after = rest.partition("]")
    if "[" in inside or "]" in after:
        raise ValueError(f"blend entry {entry!r}: brackets do not nest; one pair per style, e.g. {_BLOCK_SYNTAX}")
    if after.strip():
        raise ValueError(f"blend entry {entry!r}: nothing may follow the ']' but a comma and the next entry")
    name, equals, _ = (piece.strip() for piece in head.partition("="))
    if not name:
        raise ValueError(f"blend entry {entry!r} has no style name before '['")
    if equals:
        raise ValueError(
            f"blend entry {entry!r}: give {name!r} a weight ({name}=0.5) or per-block weights "
            f"({name}[double=1,single=0.3]), not both"
        )
    return name, parse_block_weights(name, inside)


def parse_block_weights(name: str, inside: str) -> dict[str, float] | list[float]:
    """Style ``name``'s per-block weights as written inside its brackets: ``double=1,single=0.3`` -> a
    mapping, ``1,1,0.5`` -> a vector (the studio's blend builder has a box for each style's).

    Raises:
        ValueError: empty, an empty item, key=value items mixed with bare values, a key twice, a value
            that is not a finite number.
    """
    items = [item.strip() for item in inside.split(",")]
    if not inside.strip():
        raise ValueError(
            f"the per-block weights of {name!r} are empty: give e.g. {name}[double=1,single=0.3], "
            "or one value per block"
        )
    if "" in items:
        raise ValueError(f"the per-block weights of {name!r} have an empty item: {inside.strip()!r}")
    keyed = ["=" in item for item in items]
    if any(keyed) and not all(keyed):
        bare = items[keyed.index(False)]
        raise ValueError(
            f"the per-block weights of {name!r} mix key=value items with a bare value ({bare!r}): give "
            f"{name}[double=1,single=0.3] or a vector with one value per block, {name}[1,1,0.5,...]"
        )
    if not all(keyed):
        what = "value {} of the block-weight vector of {!r}"
        return [_number(item, what.format(position, name)) for position, item in enumerate(items, start=1)]
    blocks: dict[str, float] = {}
    for item in items:
        key, _, value = (piece.strip() for piece in item.partition("="))
        if not key:
            raise ValueError(f"per-block weight {item!r} of {name!r} has no block key before '='")
        if key in blocks:
            raise ValueError(f"block key {key!r} appears twice in the per-block weights of {name!r}")
        blocks[key] = _number(value, f"block weight {key!r} of {name!r}")
    return blocks


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{what} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {text!r}")
    return value


def _is_plain(weight: object) -> bool:
    return isinstance(weight, numbers.Real) and not isinstance(weight, bool)


def _format_entry(name: str, weight: BlockWeight) -> str:
    if isinstance(weight, Mapping):
        return f"{name}[{','.join(f'{key}={_format_number(value)}' for key, value in weight.items())}]"
    if isinstance(weight, Sequence) and not isinstance(weight, str):
        return f"{name}[{','.join(_format_number(value) for value in weight)}]"
    return f"{name}={_format_number(weight)}"


def _format_number(value: object) -> str:
    """``value`` as short as reads back exactly: ``0.5``, ``1``, ``1e-07``, ``0.30000000000000004``."""
    if not _is_plain(value):
        return str(value)
    value = float(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


# -- generation defaults ------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationDefaults:
    """Image settings a call starts from when the user gives none, and the limits a UI or server enforces.

    Attributes:
        width, height, steps, guidance: the call's defaults (``guidance`` goes through
            :func:`~share_diffusers.pipeline_flux.guidance_arguments`).
        size_step: width and height must be multiples of this (``2 * vae_scale_factor``).
        max_size: largest width or height.
        preview_size: side of a style's preview image.
        max_batch: most images in one pipeline call.
        max_steps: most denoising steps in one call.
        max_work: most ``steps x images x width x height`` (pixel-steps) in one call, so that one request
            cannot hold a shared pipeline for minutes (the limits above each allow far more together).
        pixel_art: the images are tiny; show them scaled up without smoothing.
    """

    width: int = 32
    height: int = 32
    steps: int = 4
    guidance: float = 3.5
    size_step: int = 16
    max_size: int = 256
    preview_size: int = 32
    max_batch: int = 16
    max_steps: int = 50
    # The random tiny pipeline: 4 images of 256x256 at 16 steps (2**22) took 8 s on 2 CPU cores; half that.
    max_work: int = 2**21
    pixel_art: bool = True
    max_guidance: float = 30.0

    def check_call(self, images: int, steps: int, width: int, height: int, guidance: float | None = None) -> None:
        """Refuse a call outside the limits, with a one-line message that says what to change.

        Raises:
            ValueError: more than ``max_batch`` images, steps not a whole number from 1 to ``max_steps``, a side
                that is not a multiple of ``size_step`` from ``size_step`` to ``max_size`` (the pipeline would
                silently resize it), more than ``max_work`` pixel-steps in all, or a guidance (if given) that
                is not from 0 to ``max_guidance``.
        """
        if images > self.max_batch:
            raise ValueError(f"at most {self.max_batch} images per call, got {images}")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise ValueError(f"steps must be a whole number, got {steps!r}")
        if guidance is not None and not 0.0 <= _finite_or_nan(guidance) <= self.max_guidance:
            raise ValueError(f"guidance must be from 0 to {self.max_guidance:g}, got {guidance!r}")
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"steps must be from 1 to {self.max_steps}, got {steps}")
        step, largest = self.size_step, self.max_size
        for side, value in (("width", width), ("height", height)):
            if not step <= value <= largest:
                raise ValueError(f"the {side} must be from {step} to {largest} pixels on this model, got {value}")
            if value % step:
                lower = value - value % step
                options = " or ".join(str(v) for v in (lower, lower + step) if step <= v <= largest)
                raise ValueError(
                    f"the {side} must be a multiple of {step} (this model's size step), got {value}: use {options}"
                )
        work = steps * images * width * height
        if work > self.max_work:
            raise ValueError(
                f"too much work for one call: {steps} steps x {images} images x {width}x{height} pixels = "
                f"{work:,} pixel-steps, over this model's limit of {self.max_work:,}; use fewer steps, "
                "fewer images or a smaller size"
            )


# The embedded demo model: what it was trained for (32x32), 16 Euler steps, true CFG at 3.0 (README).
# It draws only at its training size: at 48x48 it repeats broken pieces of the object, at 64x64 it draws
# almost nothing (measured on the shipped model, tint, four classes), so 32 is also its largest size.
# Work: 16 images at 32x32 and 32 steps, 3.4 s on 2 idle CPU cores (4 images at 16 steps: 0.55 s).
DEMO_DEFAULTS = GenerationDefaults(
    width=RESOLUTION,
    height=RESOLUTION,
    steps=DEMO_CALL["num_inference_steps"],
    guidance=DEMO_GUIDANCE,
    max_size=RESOLUTION,
    max_work=16 * 32 * RESOLUTION * RESOLUTION,
)
TINY_RANDOM_DEFAULTS = GenerationDefaults(steps=4, guidance=3.5)
FLUX_DEV_DEFAULTS = GenerationDefaults(
    width=1024,
    height=1024,
    steps=28,
    guidance=3.5,
    max_size=2048,
    preview_size=256,
    max_batch=8,
    max_work=8 * 28 * 1024 * 1024,  # a full batch at the default size and steps
    pixel_art=False,
)
FLUX_SCHNELL_DEFAULTS = replace(FLUX_DEV_DEFAULTS, steps=4, guidance=0.0)  # 4 steps, no guidance input


def defaults_for(pipe, model: str | None) -> GenerationDefaults:
    """Defaults for the embedded demo model (``model`` None, or any model of its architecture: its folder given by
    path, one ``train_tiny_flux.py`` wrote), :data:`TINY_RANDOM`, or a real Flux model: FLUX.1-dev-like if its
    transformer takes a guidance input, FLUX.1-schnell-like otherwise."""
    if model is None or (model != TINY_RANDOM and has_demo_architecture(pipe.transformer)):
        chosen = DEMO_DEFAULTS
    elif model == TINY_RANDOM:
        chosen = TINY_RANDOM_DEFAULTS
    elif getattr(pipe.transformer.config, "guidance_embeds", False):
        chosen = FLUX_DEV_DEFAULTS
    else:
        chosen = FLUX_SCHNELL_DEFAULTS
    return replace(chosen, size_step=2 * pipe.vae_scale_factor)


def call_arguments(
    pipe,
    defaults: GenerationDefaults,
    batch_size: int,
    *,
    steps: int | None = None,
    width: int | None = None,
    height: int | None = None,
    guidance: float | None = None,
) -> dict:
    """Pipeline call arguments for ``batch_size`` prompts: each setting given, else its default.

    Guidance goes in as the transformer understands it (its guidance input, or true CFG against an empty
    prompt); see :func:`~share_diffusers.pipeline_flux.guidance_arguments`.
    """
    from .pipeline_flux import guidance_arguments

    if guidance is not None:
        check_guidance(guidance)
    return dict(
        num_inference_steps=defaults.steps if steps is None else steps,
        width=defaults.width if width is None else width,
        height=defaults.height if height is None else height,
        **guidance_arguments(pipe, defaults.guidance if guidance is None else guidance, batch_size),
    )


def check_guidance(guidance) -> None:
    """Refuse a guidance that is not a finite number from 0 (NaN or inf draws a black image, silently)."""
    if not 0.0 <= _finite_or_nan(guidance):
        raise ValueError(f"guidance must be a finite number from 0, got {guidance!r}")


def _finite_or_nan(value) -> float:
    """``value`` as a float when it is a finite real number, else NaN (which every comparison refuses)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    try:
        value = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return math.nan
    return value if math.isfinite(value) else math.nan


# -- loading ------------------------------------------------------------------------------------


def resolve_device(device: str | None = None) -> str:
    """``device`` checked by torch; None: ``cuda`` if available, else ``cpu``."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown torch device {device!r}; use e.g. cpu, cuda or cuda:1") from None
    if parsed.type == "cuda":  # torch says "Torch not compiled with CUDA enabled" only when a tensor moves
        if not torch.cuda.is_available():
            why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r}: {why}; use cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: Apple's MPS is not available here; use cpu")
    return device


def check_server_options(port: int | None, max_upload_mb: float) -> None:
    """The options the studio and the server share, checked before a model loads.

    Raises:
        ValueError: a port outside 1..65535 (uvicorn took 70000 and listened on 70000 - 65536 = 4464), or an
            upload limit that is not a number of MiB above 0.
    """
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"--port must be from 1 to 65535, got {port}")
    if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise ValueError(f"--max-upload-mb must be a number above 0, got {max_upload_mb}")


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """One of :data:`DTYPES` (or a ``torch.dtype``); None: bfloat16 on CUDA, float32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


# Loggers whose one-time import notes say nothing about the user's work: transformers' image processors falling
# back to PIL (torchvision is no dependency of ours, and Flux without IP-adapters needs none), and, where the
# quant extra's torchao is newer than the installed diffusers expects, torchao's optional kernels for other
# Pythons and GPUs, torch's deprecation of torchao's pytree registrations, and diffusers' note that it cannot
# import torchao's old tensor classes (only torch.load of torchao pickles needs them; we read safetensors).
_IMPORT_NOTE_LOGGERS = (
    "transformers.utils.import_utils",
    "torchao",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
)


def import_diffusers_quietly() -> None:
    """Import diffusers' Flux pipeline (and through it the library's loader) without other libraries' one-time
    import notes (``_IMPORT_NOTE_LOGGERS``); warnings after the import are shown as usual."""
    loggers = [logging.getLogger(name) for name in _IMPORT_NOTE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        from diffusers import FluxPipeline  # noqa: F401  (the import is the point)

        from . import loader  # noqa: F401  (imports diffusers' LoRA loading, which imports its quantizers)
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _quiet_loading(progress: bool) -> Iterator[None]:
    """Our own ``from_pretrained`` calls without loading bars unless ``progress``."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    bars = [
        module
        for module in (diffusers_logging, transformers_logging)
        if not progress and module.is_progress_bar_enabled()
    ]
    for module in bars:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module in bars:
            module.enable_progress_bar()


def load_pipeline(
    model: str | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    quantize: str | None = None,
):
    """A ``ShareFluxPipeline`` with no styles yet, on ``device`` in ``dtype``.

    Args:
        model: None for the embedded demo model (a small Flux trained on Fashion-MNIST, shipped in the
            package); :data:`TINY_RANDOM` for the random-weight tiny pipeline; otherwise a Flux repo id
            on the Hub or a local diffusers folder.
        device: torch device (default: ``cuda`` if available, else ``cpu``).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (default: bfloat16 on CUDA, float32 elsewhere).
        progress: show the loading bars of diffusers and transformers.
        quantize: the transformer quantized: ``int8`` / ``float8`` (torchao), ``nf4`` (bitsandbytes,
            CUDA) or a ``.gguf`` file of the model's transformer (:mod:`share_diffusers.quantization`);
            ``dtype`` is then its compute dtype.

    Raises:
        ValueError: an unknown device or dtype, a local model whose weights are pickle files only (weights are
            read from .safetensors files only); OSError: a model that cannot be found or read.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    check_quantize(quantize)
    import_diffusers_quietly()
    with _quiet_loading(progress):
        from .pipeline_flux import ShareFluxPipeline

        if model is None:
            if not (DEMO_PIPELINE_DIR / "model_index.json").is_file():
                raise FileNotFoundError(
                    f"the embedded demo model is missing from the installed package ({DEMO_PIPELINE_DIR}); "
                    "reinstall share-diffusers"
                )
            pipe = _from_pretrained(ShareFluxPipeline, str(DEMO_PIPELINE_DIR), torch_dtype, quantize)
        elif model == TINY_RANDOM:
            from .tiny_flux import build_tiny_flux_pipeline

            pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
            for component in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
                # nn.Module.to: diffusers' ModelMixin.to warns about "modules to keep in float32: []".
                torch.nn.Module.to(component, dtype=torch_dtype)
            if quantize is not None:
                quantize_in_place(pipe.transformer, quantize)
        else:
            _check_model_source(model)
            pipe = _from_pretrained(ShareFluxPipeline, model, torch_dtype, quantize)
    return pipe.to(device)


def _from_pretrained(pipeline_class, model: str, torch_dtype: torch.dtype, quantize: str | None):
    from .hub import pipeline_hub_errors
    from .pipeline_flux import dtype_keyword

    # use_safetensors=True: weights only as .bin (pickle, read with torch.load) are refused, never loaded.
    if quantize is None:
        return pipeline_class.from_pretrained(model, use_safetensors=True, **dtype_keyword({"dtype": torch_dtype}))
    with pipeline_hub_errors(model):  # the pipeline's own from_pretrained says why; this load is the transformer's
        transformer = load_quantized_transformer(model, quantize, torch_dtype)
    return pipeline_class.from_pretrained(
        model, transformer=transformer, use_safetensors=True, **dtype_keyword({"dtype": torch_dtype})
    )


def _check_model_source(model: str) -> None:
    """A local folder must hold a diffusers pipeline with .safetensors weights; anything else must look like a
    Hub repo id."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{model} holds no diffusers pipeline (model_index.json missing)")
        _refuse_pickled_components(path)
    elif model.startswith(("/", ".", "~")) or model.count("/") != 1:
        raise FileNotFoundError(
            f"{model!r} is neither a local diffusers pipeline folder nor a Hub repo id like 'user/name'"
        )


def _refuse_pickled_components(path: Path) -> None:
    """Name the first component folder whose weights are pickle files only (diffusers would say a file is missing)."""
    for component in sorted(child for child in path.iterdir() if child.is_dir()):
        files = [child.name for child in component.iterdir() if child.is_file()]
        pickled = sorted(name for name in files if name.lower().endswith(PICKLE_SUFFIXES))
        if pickled and not any(name.endswith(".safetensors") for name in files):
            raise ShareValueError(
                f"{component} holds its weights only as pickle files ({', '.join(pickled)}); share-diffusers loads "
                ".safetensors only, never torch.load (unpickling can run arbitrary code). Convert the pipeline: "
                "load it where you trust the files and save_pretrained(..., safe_serialization=True)"
            )


def load_styles(pipe, model: str | None, factors: str | None = None, demo_styles: bool | None = None) -> list:
    """Load the styles a session starts with into ``pipe`` (from :func:`load_pipeline` with this ``model``).

    Args:
        factors: a Share checkpoint folder or Hub repo id to load.
        demo_styles: also start with the model's demo styles (default: only when no ``factors``): the
            shipped inverted / tint / stripes / outlines on the demo model, three random LoRAs merged on
            :data:`TINY_RANDOM` (none exist for other models).

    Returns:
        The merge reports of the random demo LoRAs (empty otherwise).

    Raises:
        ValueError: ``demo_styles`` True with ``factors`` on the demo model, whose demo styles are a Share
            checkpoint of their own (one pipeline holds one; the flag was ignored before).
    """
    if demo_styles and factors and model is None:
        raise ValueError(
            "--demo-styles with --factors: the demo model's styles are a Share checkpoint of their own and a "
            "pipeline holds one; start with one of them (and merge LoRAs into it)"
        )
    if demo_styles is None:
        demo_styles = not factors
    if factors:
        pipe.load_share_factors(factors)
    if demo_styles and model is None and not factors:
        pipe.load_share_factors(DEMO_STYLES_DIR)
    if demo_styles and model == TINY_RANDOM:
        from .demo_styles import make_demo_styles

        return make_demo_styles(pipe)
    return []
