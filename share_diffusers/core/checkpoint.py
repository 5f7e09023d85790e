"""The on-disk format of Share factors (DESIGN.md section 5).

A checkpoint is a folder:

- ``share_config.json``: format name and version, base model, config (k rule, p, options), the
  styles with their provenance and errors, each layer's shape and ``k``, and the name of the
  tensor file. Writing this file is the commit point of a save.
- ``share_factors-<revision>.safetensors``: every layer's ``basis_out``, ``basis_in``, ``core_out``,
  ``core_in``, ``gram_out``, ``gram_in``, ``norm``, ``error`` (and ``anchor`` when centred), keyed
  ``"<layer>.<tensor>"``.

A save writes the new tensor file under a fresh name, then atomically replaces the JSON, then
deletes the old tensor file: a crash at any point leaves a readable checkpoint (old or new).
Nothing is ever unpickled; loading validates every tensor's presence, shape and finiteness.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ShareCheckpointError
from .factors import ShareConfig, ShareFactors, StyleInfo
from .subspace import STORE_DTYPE, LayerShare

FORMAT_NAME = "share-diffusers"
FORMAT_VERSION = 1
CONFIG_NAME = "share_config.json"
WEIGHTS_PREFIX = "share_factors"
TENSOR_NAMES = ("basis_out", "basis_in", "core_out", "core_in", "gram_out", "gram_in", "norm", "error")
# The bulk of a checkpoint; these may be stored in half precision. Summaries stay float32 always.
FACTOR_NAMES = ("basis_out", "basis_in", "core_out", "core_in", "anchor")
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def expected_shapes(n_out: int, d_in: int, k: int, p: int, t: int) -> dict[str, tuple[int, ...]]:
    """Shape of each stored tensor of a layer."""
    return {
        "basis_out": (n_out, k),
        "basis_in": (d_in, k),
        "core_out": (t, k, p),
        "core_in": (t, k, p),
        "gram_out": (k, k),
        "gram_in": (k, k),
        "norm": (t,),
        "error": (t,),
        "anchor": (k, k),
    }


def describe(factors: ShareFactors, weights_file: str) -> dict:
    """The JSON document of a checkpoint."""
    errors = {style.name: factors.style_error(style.name) for style in factors.styles}
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "base_model": factors.base_model,
        "weights_file": weights_file,
        "dtype": str(factors.storage_dtype).removeprefix("torch."),
        "config": {
            "rank": factors.config.rank,
            "variance": factors.config.variance,
            "max_rank": factors.config.max_rank,
            "pseudo_rank": factors.config.pseudo_rank,
            "center": factors.config.center,
            "normalize": factors.config.normalize,
        },
        "target_modules": sorted(factors.layers),
        "styles": [{**style.to_json(), "error": errors[style.name]} for style in factors.styles],
        "layers": {
            name: {"shape": list(layer.shape), "k": layer.k, **({"conv": True} if name in factors.conv_layers else {})}
            for name, layer in factors.layers.items()
        },
    }


def save_factors(factors: ShareFactors, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write ``factors`` to ``directory`` (created if needed) atomically; returns the JSON's path.

    Args:
        dtype: storage of bases and cores: ``torch.float32`` (exact) or ``torch.bfloat16`` /
            ``torch.float16`` (half the bytes, ~0.3% relative rounding of each factor). Defaults to
            ``factors.storage_dtype`` (float32 unless the factors were loaded from a half checkpoint).
    """
    if dtype is not None:
        if str(dtype).removeprefix("torch.") not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, not {dtype}")
        factors.storage_dtype = dtype
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    previous = _current_weights_file(directory)
    weights_file = f"{WEIGHTS_PREFIX}-{secrets.token_hex(4)}.safetensors"
    tensors = {}
    for name, layer in factors.layers.items():
        for tensor_name in TENSOR_NAMES:
            stored = factors.storage_dtype if tensor_name in FACTOR_NAMES else STORE_DTYPE
            tensors[f"{name}.{tensor_name}"] = getattr(layer, tensor_name).to(stored).contiguous()
        if layer.anchor is not None:
            tensors[f"{name}.anchor"] = layer.anchor.to(factors.storage_dtype).contiguous()
    document = describe(factors, weights_file)
    tmp_weights = directory / f".{weights_file}.tmp"
    try:
        save_file(tensors, str(tmp_weights), metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
        _fsync(tmp_weights)
        os.replace(tmp_weights, directory / weights_file)
        _atomic_write_text(directory / CONFIG_NAME, json.dumps(document, indent=2))
    except BaseException:
        tmp_weights.unlink(missing_ok=True)
        if _current_weights_file(directory) != weights_file:
            (directory / weights_file).unlink(missing_ok=True)
        raise
    if previous and previous != weights_file:
        (directory / previous).unlink(missing_ok=True)
    return directory / CONFIG_NAME


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _current_weights_file(directory: Path) -> str | None:
    try:
        return json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")).get("weights_file")
    except (OSError, ValueError, AttributeError):
        return None


def read_document(config_path: str | os.PathLike) -> dict:
    """Parse and check a checkpoint's JSON: format name, version, and required fields."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise ShareCheckpointError(f"no Share checkpoint at {config_path.parent}: {CONFIG_NAME} is missing")
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShareCheckpointError(f"{config_path} is not valid JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT_NAME:
        raise ShareCheckpointError(f'{config_path} is not a share-diffusers checkpoint (no "format": "{FORMAT_NAME}")')
    version = document.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ShareCheckpointError(f"{config_path} has an unknown format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ShareCheckpointError(
            f"{config_path} has format_version {version}, newer than this share-diffusers reads "
            f"({FORMAT_VERSION}); upgrade share-diffusers"
        )
    for key in ("weights_file", "config", "styles", "layers"):
        if key not in document:
            raise ShareCheckpointError(f"{config_path} lacks the required field {key!r}")
    return document


def load_factors(
    directory: str | os.PathLike, base_model: str | None = None, weights_path: str | os.PathLike | None = None
) -> ShareFactors:
    """Read a checkpoint folder, validating everything before returning.

    Args:
        directory: the folder holding ``share_config.json``.
        base_model: if given and the checkpoint records a different base model, refuse it.
        weights_path: the tensor file, when it was fetched elsewhere (Hub cache); defaults to the
            file the JSON names inside ``directory``.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    document = read_document(config_path)
    recorded = document.get("base_model")
    if base_model is not None and recorded is not None and recorded != base_model:
        raise ShareCheckpointError(
            f"{config_path} holds factors for base model {recorded!r}, not {base_model!r}; "
            "load factors made for this model"
        )
    weights_path = Path(weights_path) if weights_path is not None else directory / document["weights_file"]
    if not weights_path.is_file():
        raise ShareCheckpointError(f"{config_path} names the tensor file {weights_path.name}, which is missing")
    try:
        config = ShareConfig(**document["config"])
        styles = [
            StyleInfo(**{key: value for key, value in style.items() if key != "error"}) for style in document["styles"]
        ]
    except (TypeError, ValueError) as error:
        raise ShareCheckpointError(f"{config_path}: invalid config or styles ({error})") from None
    storage_dtype = STORAGE_DTYPES.get(document.get("dtype", "float32"))
    if storage_dtype is None:
        raise ShareCheckpointError(f"{config_path}: unknown dtype {document.get('dtype')!r}")
    tensors = _read_tensors(weights_path)
    t, p = len(styles), config.pseudo_rank
    layers = {}
    for name, info in document["layers"].items():
        try:
            (n_out, d_in), k = info["shape"], int(info["k"])
        except (KeyError, TypeError, ValueError):
            raise ShareCheckpointError(f'{config_path}: layer {name!r} needs "shape": [n_out, d_in] and "k"') from None
        shapes = expected_shapes(n_out, d_in, k, p, t)
        needed = [*TENSOR_NAMES, "anchor"] if config.center else list(TENSOR_NAMES)
        values = {}
        for tensor_name in needed:
            key = f"{name}.{tensor_name}"
            if key not in tensors:
                raise ShareCheckpointError(f"{weights_path.name}: tensor {key!r} is missing")
            tensor = tensors.pop(key)
            if tuple(tensor.shape) != shapes[tensor_name]:
                raise ShareCheckpointError(
                    f"{weights_path.name}: tensor {key!r} has shape {tuple(tensor.shape)}, expected "
                    f"{shapes[tensor_name]} (k={k}, p={p}, {t} styles)"
                )
            if not tensor.is_floating_point():
                raise ShareCheckpointError(f"{weights_path.name}: tensor {key!r} has dtype {tensor.dtype}, not float")
            if not torch.isfinite(tensor).all():
                raise ShareCheckpointError(f"{weights_path.name}: tensor {key!r} contains NaN or Inf")
            values[tensor_name] = tensor.to(STORE_DTYPE)
        anchor = values.pop("anchor", None)
        layers[name] = LayerShare(**values, anchor=anchor, normalize=config.normalize)
    if tensors:
        raise ShareCheckpointError(
            f"{weights_path.name}: unexpected tensor {next(iter(tensors))!r} not described in {CONFIG_NAME}"
        )
    conv_layers = {name for name, info in document["layers"].items() if info.get("conv")}
    factors = ShareFactors(config, layers, styles, base_model=recorded, conv_layers=conv_layers)
    factors.storage_dtype = storage_dtype
    return factors


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ShareCheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {error}"
        ) from None
