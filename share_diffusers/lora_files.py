"""Reading LoRA adapters from disk as :class:`~share_diffusers.core.LoraAdapter` (safetensors only).

Accepted here: a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) or a
``.safetensors`` file with PEFT / diffusers key names (``<layer>.lora_A.weight``,
``<layer>.lora_B.weight``, optional ``<layer>.alpha``). Community formats (kohya, XLabs, ...) go
through diffusers' converters in the pipeline loader. Pickle files (``.bin``, ``.pt``, ``.ckpt``)
are refused without being opened: unpickling runs arbitrary code.

What Share cannot hold is refused by key, never dropped in silence: DoRA magnitudes, LoRA biases and LoRAs of
embedding layers (a low-rank subspace of linear layers stores ``lora_B @ lora_A`` only), and PEFT weights whose
``lora_alpha`` is unknown.
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
from .core.checkpoint import FORMAT_NAME, create_empty_file, set_file_mode
from .core.errors import LoraFormatError, ShareIOError, ShareValueError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
ADAPTER_CONFIG_NAME = "adapter_config.json"  # PEFT's save_pretrained writes these two files
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"  # the file diffusers' save_lora_weights writes
_LORA_KEY = re.compile(r"^(?P<layer>.+?)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_PREFIX = "base_model.model."
_DORA_MARKERS = ("lora_magnitude_vector", ".dora_scale")  # PEFT's and kohya's names for DoRA magnitudes
_EMBEDDING_FACTORS = ("lora_embedding_A", "lora_embedding_B")  # PEFT's LoRA of an nn.Embedding (then an adapter name)
_BIAS_SUFFIXES = (".lora_B.bias", ".diff_b")  # PEFT's lora_bias (diffusers' format) and kohya's / ComfyUI's
# LyCORIS factors (LoKr: Kronecker products; LoHa: Hadamard products of two low-rank pairs; LoCon's Tucker middle
# core; OFT: rotations), in kohya's and PEFT's spellings.
_LYCORIS_KEY = re.compile(r"(?:^|\.)(?P<kind>lokr|hada|lora_mid|oft)[_.]")  # searched in a key's last two parts
_LYCORIS_NAMES = {"lokr": "LoKr", "hada": "LoHa", "lora_mid": "LoCon (Tucker)", "oft": "OFT"}


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraFormatError(
            f"{path} is a pickle file ({path.suffix}); share-diffusers never unpickles files because that can "
            "run arbitrary code. Convert it to .safetensors first."
        )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a LoRA's safetensors file, with a clear error if it is not one (or is the
    tensor file of a Share checkpoint)."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise LoraFormatError(f"no such file: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise LoraFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    if metadata.get("format") == FORMAT_NAME:  # its keys (basis_in, ...) would read as "no known layout"
        raise LoraFormatError(
            f"{path.name} is the tensor file of a Share checkpoint, not a LoRA: load its folder as Share factors "
            "(load_share_factors), or export its styles as LoRAs (export_style_as_lora, share-diffusers export) "
            "and merge those"
        )
    # float8 LoRA files exist; most of torch (isfinite, diffusers' converters' arithmetic) has no float8 kernels,
    # and bfloat16 holds every float8 value exactly.
    return {key: _widened(tensor) for key, tensor in tensors.items()}, metadata


def _widened(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16) if tensor.is_floating_point() and tensor.element_size() == 1 else tensor


def check_alpha_size(key: str, tensor: torch.Tensor, origin: str) -> None:
    """Refuse an ``.alpha`` tensor of several values (``origin``: the file, for the message)."""
    if tensor.numel() != 1:
        raise LoraFormatError(f"{origin}: tensor {key!r} holds {tensor.numel()} values; an alpha is one number")


def load_lora(path: str | os.PathLike, config_path: str | os.PathLike | None = None) -> LoraAdapter:
    """Read a LoRA from a PEFT adapter folder or a ``.safetensors`` file.

    The scale (``lora_alpha / r``, rsLoRA, ``rank_pattern`` / ``alpha_pattern``, or per-layer
    ``.alpha`` tensors) is resolved per layer and folded into :class:`LoraLayer.scale`.

    Args:
        path: a PEFT adapter folder, or a ``.safetensors`` file. A file named ``adapter_model.safetensors``
            reads the ``adapter_config.json`` beside it, as its folder would: the same adapter gives the same
            scales however it is named.
        config_path: the adapter's ``adapter_config.json`` when it is elsewhere (a Hub download).
    """
    path = Path(path)
    if not path.exists():
        raise LoraFormatError(f"no such file or folder: {path}")
    file_path = _adapter_weights(path) if path.is_dir() else path
    if config_path is None:
        config_path = adapter_config_beside(file_path)
    config = read_adapter_config(config_path) if config_path is not None else None
    tensors, _ = read_safetensors(file_path)
    layers, ignored = peft_lora_layers(tensors, config, str(file_path))
    source = {"path": str(path), "format": "peft" if path.is_dir() or config is not None else "safetensors"}
    if config and config.get("base_model_name_or_path"):
        source["base_model"] = config["base_model_name_or_path"]
    if ignored:
        source["ignored_keys"] = len(ignored)
    return LoraAdapter(layers=layers, source=source)


def _adapter_weights(folder: Path) -> Path:
    """The ``adapter_model.safetensors`` of a PEFT adapter folder (a pickled one is refused by name)."""
    weights = folder / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickled:
            refuse_pickle(folder / pickled[0])
        raise LoraFormatError(f"{folder} has no {ADAPTER_WEIGHTS_NAME} (expected a PEFT adapter folder)")
    return weights


def adapter_config_beside(file_path: str | os.PathLike) -> Path | None:
    """The ``adapter_config.json`` next to a file named ``adapter_model.safetensors``, if there is one.

    PEFT keeps ``lora_alpha`` (and rsLoRA, rank and alpha patterns) only in that JSON: the weights file
    alone gives the wrong scale whenever ``lora_alpha != r``.
    """
    file_path = Path(file_path)
    if file_path.name != ADAPTER_WEIGHTS_NAME:
        return None
    config_path = file_path.with_name(ADAPTER_CONFIG_NAME)
    return config_path if config_path.is_file() else None


MAX_ADAPTER_CONFIG_BYTES = 2**20  # PEFT's configs are a few KiB; a larger one is not read (nor fetched by prefetch)


def read_adapter_config(config_path: str | os.PathLike) -> dict:
    """A PEFT ``adapter_config.json`` as a dict, with a clear error if it is no JSON object (or over 1 MiB)."""
    config_path = Path(config_path)
    try:
        size = config_path.stat().st_size
    except OSError as error:
        raise LoraFormatError(f"cannot read {config_path} ({error.strerror or error})") from None
    if size > MAX_ADAPTER_CONFIG_BYTES:
        raise LoraFormatError(f"{config_path} is {size} bytes; a PEFT adapter config is a few KiB (limit 1 MiB)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoraFormatError(f"{config_path} is not valid JSON ({error})") from None
    except OSError as error:
        raise LoraFormatError(f"cannot read {config_path} ({error.strerror or error})") from None
    if not isinstance(config, dict):
        raise LoraFormatError(f"{config_path} must hold a JSON object, not a {type(config).__name__}")
    return config


def is_peft_state_dict(tensors: dict[str, torch.Tensor]) -> bool:
    """Keys as PEFT's ``save_pretrained`` writes them (``base_model.model.<layer>.lora_A.weight``)."""
    return any(key.startswith(_PEFT_PREFIX) for key in tensors)


def peft_lora_layers(
    tensors: dict[str, torch.Tensor], config: dict | None, origin: str
) -> tuple[dict[str, LoraLayer], list[str]]:
    """:func:`lora_layers_from_state_dict` for a PEFT adapter's weights, refusing them when the scale is unknown.

    ``config`` is the adapter's ``adapter_config.json``, or None when there is none. PEFT writes
    ``lora_alpha`` only there, so ``base_model.model.`` keys with neither a config nor ``.alpha``
    tensors would be merged at scale 1 instead of ``lora_alpha / r`` (4x off for r=4, alpha=16).
    """
    if not tensors:
        raise LoraFormatError(f"{origin} holds no tensors (an empty safetensors file)")
    layers, ignored = lora_layers_from_state_dict(tensors, config, origin)  # shapes, NaN, DoRA, biases first
    if config is None and is_peft_state_dict(tensors) and not any(key.endswith(".alpha") for key in tensors):
        example = next(key for key in tensors if key.startswith(_PEFT_PREFIX))
        raise LoraFormatError(
            f"{origin} holds PEFT adapter weights ({example!r}) without their {ADAPTER_CONFIG_NAME}: the "
            f"adapter's lora_alpha, and so its scale, is unknown. Pass the adapter folder (with "
            f"{ADAPTER_CONFIG_NAME} beside {ADAPTER_WEIGHTS_NAME}), or put its {ADAPTER_CONFIG_NAME} next to the file"
        )
    return layers, ignored


def check_supported_key(key: str, tensor: torch.Tensor, origin: str) -> bool:
    """Refuse a key Share cannot hold; True if the key carries nothing and may be left out (a zero bias).

    DoRA rescales each column of ``W0 + dW`` by a learned magnitude, and a LoRA bias adds a vector to
    the layer's output: neither is part of the low-rank update ``lora_B @ lora_A`` that the Share
    subspace stores, so merging the rest would give another style than stock diffusers or PEFT.
    Checked on a file's own keys: diffusers' converters drop ``dora_scale`` and ``diff_b`` keys. LyCORIS
    factors (LoKr, LoHa) describe updates that are no ``lora_B @ lora_A`` either; diffusers drops them beside
    plain LoRA layers or fails on them.
    """
    lycoris = _LYCORIS_KEY.search(".".join(key.split(".")[-2:]))
    if lycoris:
        kind = _LYCORIS_NAMES[lycoris["kind"]]
        raise LoraFormatError(
            f"{origin}: {key!r} is a LyCORIS {kind} factor; LyCORIS adapters are not supported (Share holds the "
            "low-rank update lora_B @ lora_A only; expected a plain LoRA)"
        )
    if any(part in _EMBEDDING_FACTORS for part in key.split(".")[-2:]):
        raise LoraFormatError(
            f"{origin}: {key!r} is a LoRA factor of an embedding layer (PEFT's lora_embedding_A/B); Share holds "
            "LoRAs of linear layers and 1x1 convolutions only and would drop it (train the LoRA without the "
            "embedding in target_modules)"
        )
    if any(marker in key for marker in _DORA_MARKERS):
        raise LoraFormatError(
            f"{origin}: {key!r} is a DoRA magnitude vector; DoRA adapters are not supported (Share holds the "
            "low-rank update lora_B @ lora_A only; expected a plain LoRA)"
        )
    if key.endswith(_BIAS_SUFFIXES):
        if not bool((tensor == 0).all()):
            raise LoraFormatError(
                f"{origin}: {key!r} is a LoRA bias; Share holds the low-rank update lora_B @ lora_A only and "
                "would drop it (expected lora_A / lora_B weights and alphas only; a bias of zeros is accepted)"
            )
        return True
    return False


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
    keys_of: dict[str, dict[str, str]] = {}  # layer -> factor -> the key it came from
    alphas: dict[str, float] = {}
    ignored = []
    for key, tensor in tensors.items():
        name = key.removeprefix(_PEFT_PREFIX)
        match = _LORA_KEY.match(name)
        if match:
            seen = keys_of.setdefault(match["layer"], {})
            _check_one_adapter(match, key, seen, origin)
            seen[match["which"]] = key
            pairs.setdefault(match["layer"], {})[match["which"]] = tensor
        elif name.endswith(".alpha"):
            check_alpha_size(key, tensor, origin)
            alpha = float(tensor.double().item())
            if not math.isfinite(alpha):
                raise LoraFormatError(f"{origin}: tensor {key!r} holds alpha {alpha}; an alpha must be a finite number")
            alphas[name.removesuffix(".alpha")] = alpha
        else:
            check_supported_key(key, tensor, origin)
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


def _check_one_adapter(match: re.Match, key: str, seen: dict[str, str], origin: str) -> None:
    """Refuse a second ``lora_A``/``lora_B`` for a layer (two PEFT adapter names, or one key with and without
    the ``base_model.model.`` prefix): pairing them would merge one adapter, or one's A with another's B."""
    factor = f"lora_{match['which']}"
    for other in seen.values():
        other_adapter = _LORA_KEY.match(other.removeprefix(_PEFT_PREFIX))["adapter"]
        if other_adapter != match["adapter"]:
            raise LoraFormatError(
                f"{origin}: layer {match['layer']!r} holds factors of two adapters ({other!r} and {key!r}); "
                "save one adapter per file (PEFT: save_pretrained(selected_adapters=[name]))"
            )
    if match["which"] in seen:
        raise LoraFormatError(
            f"{origin}: layer {match['layer']!r} has {factor} twice ({seen[match['which']]!r} and {key!r})"
        )


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor | None:
    """A LoRA factor as a matrix; 1x1 convolution kernels ``(a, b, 1, 1)`` become ``(a, b)``."""
    if tensor.ndim == 2:
        return tensor
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
        return tensor[:, :, 0, 0]
    return None


def _pattern_value(config: dict, pattern_key: str, layer_name: str, default):
    """PEFT's ``rank_pattern`` / ``alpha_pattern``: the value of the first key (a regex) that matches the layer
    name or a dotted tail of it, by PEFT's own rule (``peft.utils.other.get_pattern_key``), so that
    ``"attn\\.to_q"`` or ``"to_q|to_k"`` select the layers PEFT gives those values."""
    for pattern, value in (config.get(pattern_key) or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer_name):
            return value
    return default


def save_lora(
    adapter: LoraAdapter, path: str | os.PathLike, base_model: str | None = None, key_prefix: str = ""
) -> Path:
    """Write a LoRA that stock PEFT and diffusers load, with ``lora_alpha = r`` (so the scale is 1).

    Args:
        adapter: the factors to write; every layer must have the same rank.
        path: ending in ``.safetensors`` (any case): one file with ``<layer>.lora_A.weight`` /
            ``lora_B.weight`` keys (diffusers' format). Any other path: a PEFT adapter folder
            (``adapter_config.json`` and ``adapter_model.safetensors`` with ``base_model.model.`` keys)
            for ``PeftModel.from_pretrained``.
        base_model: recorded as the PEFT config's ``base_model_name_or_path``.
        key_prefix: put before each key of a file (``"transformer."`` for a pipeline's transformer); a
            PEFT folder has its own prefix, so a ``key_prefix`` with a folder path is refused.

    Returns the path of the tensor file. Every file is written to a temporary name and renamed, the
    config after the weights, so a failure leaves a previous export as it was (and no partial file).
    """
    path = Path(path)
    ranks = {layer.rank for layer in adapter.layers.values()}
    if len(ranks) != 1:
        raise ShareValueError(f"export needs one rank for every layer, got ranks {sorted(ranks)}")
    rank = ranks.pop()
    as_folder = path.suffix.lower() != ".safetensors"
    if as_folder and key_prefix:
        raise ShareValueError(
            f"{path} is no .safetensors file: it would be written as a PEFT adapter folder, whose keys start with "
            f"{_PEFT_PREFIX!r}, not key_prefix={key_prefix!r}; give a .safetensors path (or a folder's "
            f"{DIFFUSERS_LORA_NAME})"
        )
    tensors = _lora_tensors(adapter, _PEFT_PREFIX if as_folder else key_prefix)
    metadata = {"format": "pt", "share_style": str(adapter.source.get("share_style", ""))}
    target = path / ADAPTER_WEIGHTS_NAME if as_folder else path
    config = _peft_config(adapter, rank, base_model) if as_folder else None
    _write_atomically(target, tensors, metadata, config)
    return target


def _lora_tensors(adapter: LoraAdapter, prefix: str) -> dict[str, torch.Tensor]:
    """``lora_A`` / ``lora_B`` tensors with the scale folded into ``lora_A`` (so ``lora_alpha = r``)."""
    tensors = {}
    for name, layer in adapter.layers.items():
        down, up = layer.down * layer.scale, layer.up
        if layer.conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        tensors[f"{prefix}{name}.lora_A.weight"] = down.contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = up.contiguous()
    return tensors


def _peft_config(adapter: LoraAdapter, rank: int, base_model: str | None) -> dict:
    return {
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


def _write_atomically(target: Path, tensors: dict, metadata: dict, config: dict | None) -> None:
    """The tensor file (and the PEFT config beside it) through temporary files, renamed weights first.

    The config is renamed last: until both are in place, a previous export's config still matches
    its weights (the rank ``load_lora`` checks), and a failure before the renames changes nothing.
    """
    from safetensors.torch import save_file

    tmp = target.with_name(f".{target.name}.tmp")
    config_path = target.with_name(ADAPTER_CONFIG_NAME)
    config_tmp = config_path.with_name(f".{ADAPTER_CONFIG_NAME}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)  # a leftover of an interrupted export of this same file
        mode = create_empty_file(tmp)
        save_file(tensors, str(tmp), metadata=metadata)
        set_file_mode(tmp, mode)  # safetensors writes 0600; an exported LoRA is an ordinary file
        if config is not None:
            config_tmp.write_text(json.dumps(config, indent=2), encoding="utf-8")
        os.replace(tmp, target)
        if config is not None:
            os.replace(config_tmp, config_path)
    except (OSError, SafetensorError) as error:  # a full disk while safetensors writes is a SafetensorError
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise ShareIOError(f"cannot write the LoRA to {target} ({reason})") from None
    finally:
        for leftover in (tmp, config_tmp) if config is not None else (tmp,):
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)


def style_name_for(repo_id_or_path: str | os.PathLike, path: Path) -> str:
    """The name a LoRA gets as a style when none is given: a Hub repo's name, a local file's stem, or its
    folder's name for the generic file names diffusers and PEFT write (``pytorch_lora_weights``,
    ``adapter_model``). ``path`` is the weights file the source resolved to."""
    text = str(repo_id_or_path).rstrip("/")
    if Path(text).exists():
        return path.stem if path.stem not in ("pytorch_lora_weights", "adapter_model") else path.parent.name
    return text.split("/")[-1]
