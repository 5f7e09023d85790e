"""Reading LoRA adapters from disk as :class:`~share_diffusers.core.LoraAdapter` (safetensors only).

Accepted here: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) or a
``.safetensors`` file with PEFT / diffusers key names (``<layer>.lora_A.weight``,
``<layer>.lora_B.weight``, optional ``<layer>.alpha``). Community formats (kohya, XLabs, ...) go
through diffusers' converters in the pipeline loader. Pickle files (``.bin``, ``.pt``, ``.ckpt``)
are refused without being opened: unpickling runs arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .core.adapters import LoraAdapter, LoraLayer, lora_scale
from .core.checkpoint import create_empty_file, set_file_mode
from .core.errors import LoraFormatError, ShareIOError, ShareValueError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_LORA_KEY = re.compile(r"^(?P<layer>.+?)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_PREFIX = "base_model.model."


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(
            f"{path} is a pickle file ({path.suffix}); share-diffusers never unpickles files because that can "
            "run arbitrary code. Convert it to .safetensors first."
        )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, with a clear error if it is not one."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise LoraFormatError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise LoraFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None


def load_lora(path: str | os.PathLike) -> LoraAdapter:
    """Read a LoRA from a PEFT adapter folder or a ``.safetensors`` file.

    The scale (``lora_alpha / r``, rsLoRA, ``rank_pattern`` / ``alpha_pattern``, or per-layer
    ``.alpha`` tensors) is resolved per layer and folded into :class:`LoraLayer.scale`.
    """
    path = Path(path)
    if not path.exists():
        raise LoraFormatError(f"no such file or folder: {path}")
    config: dict = {}
    if path.is_dir():
        config_path = path / "adapter_config.json"
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            pickled = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            if pickled:
                refuse_pickle(path / pickled[0])
            raise LoraFormatError(f"{path} has no adapter_model.safetensors (expected a PEFT adapter folder)")
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise LoraFormatError(f"{config_path} is not valid JSON ({error})") from None
            if not isinstance(config, dict):
                raise LoraFormatError(f"{config_path} must hold a JSON object, not a {type(config).__name__}")
        file_path = weights
    else:
        file_path = path
    tensors, metadata = read_safetensors(file_path)
    layers, ignored = lora_layers_from_state_dict(tensors, config, str(file_path))
    source = {"path": str(path), "format": "peft" if path.is_dir() else "safetensors"}
    if config.get("base_model_name_or_path"):
        source["base_model"] = config["base_model_name_or_path"]
    if ignored:
        source["ignored_keys"] = len(ignored)
    return LoraAdapter(layers=layers, source=source)


def lora_layers_from_state_dict(
    tensors: dict[str, torch.Tensor], config: dict | None = None, origin: str = "state dict"
) -> tuple[dict[str, LoraLayer], list[str]]:
    """Pair ``lora_A`` / ``lora_B`` tensors by layer; returns the layers and the keys that are not LoRA.

    Args:
        tensors: PEFT / diffusers keys (``base_model.model.`` prefixes and adapter names are stripped).
        config: a PEFT ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``, patterns), if any.
        origin: file name used in error messages.
    """
    config = config or {}
    _check_config(config, origin)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    ignored = []
    for key, tensor in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        match = _LORA_KEY.match(name)
        if match:
            pairs.setdefault(match["layer"], {})[match["which"]] = tensor
        elif name.endswith(".alpha") and tensor.numel() == 1:
            alpha = float(tensor.double().item())
            if not math.isfinite(alpha):
                raise LoraFormatError(f"{origin}: tensor {key!r} holds alpha {alpha}; an alpha must be a finite number")
            alphas[name.removesuffix(".alpha")] = alpha
        elif "lora_magnitude_vector" in name:
            raise LoraFormatError(f"{origin}: {key!r} is a DoRA magnitude vector; DoRA adapters are not supported")
        else:
            ignored.append(key)
    if not pairs:
        raise LoraFormatError(
            f"{origin} holds no LoRA tensors: expected keys like '<layer>.lora_A.weight' and "
            f"'<layer>.lora_B.weight'" + (f" (found e.g. {ignored[0]!r})" if ignored else "")
        )
    layers = {}
    for layer_name, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "B" not in pair else "lora_A"
            raise LoraFormatError(f"{origin}: layer {layer_name!r} has no {missing}.weight")
        down, up = _as_matrix(pair["A"]), _as_matrix(pair["B"])
        if down is None or up is None or up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"{origin}: layer {layer_name!r} has lora_A {tuple(pair['A'].shape)} and lora_B "
                f"{tuple(pair['B'].shape)}; expected (r, d_in) and (n_out, r) (or 1x1 conv kernels)"
            )
        for which, tensor in (("lora_A", down), ("lora_B", up)):
            if not torch.isfinite(tensor).all():
                raise LoraFormatError(f"{origin}: {layer_name}.{which}.weight contains NaN or Inf")
        rank = down.shape[0]
        if rank == 0:
            raise LoraFormatError(f"{origin}: layer {layer_name!r} has rank 0 (empty lora_A and lora_B)")
        alpha = alphas.get(layer_name, _pattern_value(config, "alpha_pattern", layer_name, config.get("lora_alpha")))
        if layer_name not in alphas:
            rank_in_config = _pattern_value(config, "rank_pattern", layer_name, config.get("r"))
            if rank_in_config is not None and (not _is_number(rank_in_config) or rank_in_config != rank):
                raise LoraFormatError(
                    f"{origin}: layer {layer_name!r} has rank {rank} but adapter_config.json says r={rank_in_config!r}"
                )
            if alpha is not None and (not _is_number(alpha) or not math.isfinite(alpha)):
                raise LoraFormatError(
                    f"{origin}: layer {layer_name!r} has lora_alpha {alpha!r} in its adapter config; "
                    "an alpha must be a finite number"
                )
        scale = lora_scale(alpha, rank, bool(config.get("use_rslora", False)))
        if not math.isfinite(scale):
            raise LoraFormatError(f"{origin}: layer {layer_name!r} has scale alpha / rank = {scale}, out of range")
        layers[layer_name] = LoraLayer(up=up, down=down, scale=scale, conv=pair["A"].ndim == 4)
    return layers, ignored


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_config(config: dict, origin: str) -> None:
    """The fields of an adapter config that scales are read from, with the types PEFT writes."""
    if not isinstance(config, dict):
        raise LoraFormatError(f"{origin}: the adapter config must be a JSON object, not a {type(config).__name__}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict) or not all(isinstance(pattern, str) for pattern in patterns):
            raise LoraFormatError(f"{origin}: {key} in the adapter config must map layer patterns to numbers")
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as error:
                raise LoraFormatError(f"{origin}: {key} {pattern!r} is not a valid pattern ({error})") from None


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor | None:
    """A LoRA factor as a matrix; 1x1 convolution kernels ``(a, b, 1, 1)`` become ``(a, b)``."""
    if tensor.ndim == 2:
        return tensor
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor[:, :, 0, 0]
    return None


def _pattern_value(config: dict, pattern_key: str, layer_name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: the value of the first key the layer name ends with."""
    for pattern, value in (config.get(pattern_key) or {}).items():
        if layer_name == pattern or layer_name.endswith("." + pattern) or re.fullmatch(pattern, layer_name):
            return value
    return default


def save_lora(
    adapter: LoraAdapter, path: str | os.PathLike, base_model: str | None = None, key_prefix: str = ""
) -> Path:
    """Write a LoRA that stock PEFT and diffusers load, with ``lora_alpha = r`` (so the scale is 1).

    ``path`` ending in ``.safetensors``: one file with ``<layer>.lora_A.weight`` / ``lora_B.weight`` keys
    (diffusers' format; ``key_prefix="transformer."`` for a pipeline's transformer). Any other path: a PEFT
    adapter folder (``adapter_config.json`` and ``adapter_model.safetensors`` with ``base_model.model.`` keys)
    for ``PeftModel.from_pretrained``.
    The file is written to a temporary name and renamed, so a failure leaves no partial file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    ranks = {layer.rank for layer in adapter.layers.values()}
    if len(ranks) != 1:
        raise ShareValueError(f"export needs one rank for every layer, got ranks {sorted(ranks)}")
    rank = ranks.pop()
    as_folder = path.suffix != ".safetensors"
    prefix = _PEFT_PREFIX if as_folder else key_prefix
    tensors = {}
    for name, layer in adapter.layers.items():
        down, up = layer.down * layer.scale, layer.up
        if layer.conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors[f"{prefix}{name}.lora_A.weight"] = down.contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = up.contiguous()
    metadata = {"format": "pt", "share_style": str(adapter.source.get("share_style", ""))}
    target = path / "adapter_model.safetensors" if as_folder else path
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # a leftover of an interrupted export of this same file
        mode = create_empty_file(tmp)
        save_file(tensors, str(tmp), metadata=metadata)
        set_file_mode(tmp, mode)  # safetensors writes 0600; an exported LoRA is an ordinary file
        if as_folder:
            config = {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": rank,
                "target_modules": sorted(adapter.layers),
                "lora_dropout": 0.0,
                "bias": "none",
                "base_model_name_or_path": base_model,
                "task_type": None,
                "use_rslora": False,
            }
            (path / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        os.replace(tmp, target)
    except OSError as error:
        raise ShareIOError(f"cannot write the LoRA to {target} ({error.strerror or error})") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return target
