"""Community Flux LoRAs as Share adapters, through diffusers' own loading and format conversion.

``FluxPipeline.lora_state_dict`` converts kohya / sd-scripts, XLabs, BFL, ai-toolkit and ComfyUI
layouts to diffusers' PEFT keys and returns the alphas; ``get_peft_kwargs`` turns ranks and alphas
into the ``LoraConfig`` that stock ``load_lora_weights`` would use. We take each layer's scale
from that same config, so a merged style reproduces what stock diffusers applies.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from diffusers import FluxPipeline
from diffusers.utils.peft_utils import get_peft_kwargs

from .core.adapters import LoraLayer
from .core.errors import FactorValueError, LoraFormatError
from .core.factors import map_layers
from .lora_files import check_supported_key, is_peft_state_dict, lora_layers_from_state_dict, peft_lora_layers

# The attention linears of FLUX.1 (paper's and DESIGN's default Share targets).
FLUX_ATTENTION_TARGETS = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)"
)
# Every linear inside the double and single blocks (attention, feed-forward, the single blocks' MLP and
# output projections, the modulation linears), as all-layer community LoRAs (ai-toolkit, kohya) train.
FLUX_BLOCK_TARGETS = r"(transformer_blocks|single_transformer_blocks)\.\d+\..+"
FLUX_TARGET_PRESETS = {"attention": FLUX_ATTENTION_TARGETS, "blocks": FLUX_BLOCK_TARGETS}
ALL_LORA_LAYERS = "all-lora-layers"
"""``target_modules`` value meaning: every transformer linear the first merged LoRA touches."""

_METADATA_KEY = "lora_adapter_metadata"
# First parts of keys without diffusers' "transformer." prefix that name FluxTransformer2DModel's modules.
_FLUX_MODULE = re.compile(r"(single_)?transformer_blocks|x_embedder|context_embedder|proj_out|norm_out|time_text_embed")
_FAL_KONTEXT = ("base_model.model.double_blocks.", "base_model.model.single_blocks.")  # BFL names, PEFT's prefix
_UNET_BLOCKS = ("down_blocks", "up_blocks", "mid_block")  # Stable Diffusion / SDXL UNet names (diffusers', kohya's)


@dataclass
class FluxLora:
    """A Flux LoRA split by where it acts.

    Attributes:
        transformer: transformer module name -> factors (scale resolved as stock diffusers does).
        other_energy: ``||dW||_F^2`` of parts outside the transformer (e.g. ``"text_encoder"``).
        origin: the file name, for messages.
        dropped: keys that are in neither (a bias of zeros, a norm's ``.diff``, keys that are no LoRA factor),
            named as in the file or, when diffusers renamed them, as diffusers' converter wrote them.
    """

    transformer: dict[str, LoraLayer]
    other_energy: dict[str, float] = field(default_factory=dict)
    origin: str = "LoRA"
    dropped: list[str] = field(default_factory=list)

    def energies(self) -> dict[str, float]:
        """``||dW||_F^2`` of each transformer layer.

        Computed from each layer's canonical form (on the layer-parallel pool of ``ShareFactors.merge``),
        which :class:`LoraLayer` caches: a merge of these layers afterwards (the loader's order) reuses
        it instead of a second transfer to the CPU and QR per layer. A layer whose update is not finite
        raises :class:`LoraFormatError` naming the file and the layer.
        """
        names = list(self.transformer)
        energies = map_layers(lambda name: _energy(self.transformer[name], self.origin, name), names)
        return dict(zip(names, energies, strict=True))


def _energy(layer: LoraLayer, origin: str, name: str) -> float:
    try:
        return layer.canonical().energy
    except FactorValueError as error:
        raise LoraFormatError(f"{origin}: layer {name!r}: {error}") from None


def _bfl_peft_names_to_kohya(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename BFL keys with PEFT's names (``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``).

    diffusers 0.42 has no converter for this FLUX.1 layout (stock ``load_lora_weights`` loads nothing); with
    kohya's ``lora_down`` / ``lora_up`` names the same keys take diffusers' ComfyUI/BFL branch, which reads
    them exactly. Other files are returned as they are.
    """
    if not any(key.startswith("diffusion_model.") and ".lora_A." in key for key in tensors):
        return tensors
    renamed = {}
    for key, tensor in tensors.items():
        if key.startswith("diffusion_model."):
            key = key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")
        renamed[key] = tensor
    return renamed


def convert_flux_lora(
    tensors: dict[str, torch.Tensor],
    file_metadata: dict[str, str] | None = None,
    origin: str = "LoRA",
    adapter_config: dict | None = None,
) -> FluxLora:
    """Convert a Flux LoRA state dict in any format diffusers reads, or a PEFT adapter of the transformer.

    Args:
        tensors: the file's tensors (not modified).
        file_metadata: the safetensors header metadata (diffusers stores the adapter config there).
        origin: the file name, for error messages.
        adapter_config: the ``adapter_config.json`` of a PEFT adapter (``base_model.model.`` keys), None if
            there is none. Such keys name the transformer's modules; diffusers has no converter for them.

    Raises :class:`LoraFormatError` naming the key for what Share cannot hold (DoRA, LoRA biases, NaN),
    and naming what the file holds instead when it has no transformer layer (text encoder, UNet, keys
    without ``transformer.``).
    """
    if not tensors:
        raise LoraFormatError(f"{origin} holds no tensors (an empty safetensors file); expected a Flux LoRA")
    dropped = _check_raw_keys(tensors, origin)
    if is_peft_transformer_adapter(tensors):
        layers, ignored = peft_lora_layers(tensors, adapter_config, origin)
        return FluxLora(transformer=layers, origin=origin, dropped=sorted({*dropped, *ignored}))
    tensors = _bfl_peft_names_to_kohya(tensors)
    try:
        state_dict, alphas = FluxPipeline.lora_state_dict(dict(tensors), return_alphas=True)
    except Exception as error:  # diffusers raises ValueError, KeyError, IndexError... for layouts it cannot read
        reason = " ".join(str(error).split())  # diffusers' messages span lines; ours are one line
        raise LoraFormatError(
            f"{origin}: diffusers could not read this LoRA layout ({type(error).__name__}: {reason})"
            + _unet_hint(tensors)
        ) from None
    alphas = alphas or {}
    for key, value in alphas.items():
        alpha = float(value)
        if not math.isfinite(alpha):
            raise LoraFormatError(
                f"{origin}: the alpha of {key.removesuffix('.alpha')!r} is {alpha}, not a finite number"
            )
    transformer_sd = {k.removeprefix("transformer."): v for k, v in state_dict.items() if k.startswith("transformer.")}
    config = _transformer_lora_config(transformer_sd, alphas, file_metadata, origin)
    layers, ignored = lora_layers_from_state_dict(transformer_sd, config, origin) if transformer_sd else ({}, [])
    if not layers:
        raise _no_transformer_layers(origin, tensors, state_dict)
    dropped.extend(f"transformer.{key}" for key in ignored)
    other = {}
    for component in sorted({key.split(".", 1)[0] for key in state_dict if not key.startswith("transformer.")}):
        part = {k.removeprefix(f"{component}."): v for k, v in state_dict.items() if k.startswith(f"{component}.")}
        part_alphas = {k.removeprefix(f"{component}."): v for k, v in alphas.items() if k.startswith(f"{component}.")}
        try:
            part_layers, part_ignored = lora_layers_from_state_dict(
                part, _alpha_config(part, part_alphas), f"{origin} ({component})"
            )
        except LoraFormatError:  # a component with no LoRA pairs (e.g. norm weights) carries no low-rank energy
            dropped.extend(f"{component}.{key}" for key in part)
            continue
        dropped.extend(f"{component}.{key}" for key in part_ignored)
        other[component] = sum(_energy(layer, origin, f"{component}.{name}") for name, layer in part_layers.items())
    return FluxLora(transformer=layers, other_energy=other, origin=origin, dropped=sorted(set(dropped)))


def is_peft_transformer_adapter(tensors: dict) -> bool:
    """Keys PEFT's ``save_pretrained`` writes for a diffusers transformer (``base_model.model.transformer_blocks...``).

    Not fal's Kontext trainer files: BFL module names under the same prefix, which diffusers converts.
    """
    return is_peft_state_dict(tensors) and not any(key.startswith(_FAL_KONTEXT) for key in tensors)


def _check_raw_keys(tensors: dict[str, torch.Tensor], origin: str) -> list[str]:
    """Refuse NaN / Inf, DoRA and LoRA biases by the file's own key; returns the keys merged nowhere.

    Checked before diffusers' converters, which fold alphas into the factors and drop ``dora_scale``,
    ``diff_b`` and a norm's ``.diff`` keys with a log line only. A zero bias and a ``.diff`` (a full
    weight difference, which no low-rank subspace holds; stock diffusers drops it too) come back as
    dropped keys.
    """
    dropped = []
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            if key.endswith(".alpha"):
                raise LoraFormatError(
                    f"{origin}: tensor {key!r} holds a NaN or Inf alpha; an alpha must be a finite number"
                )
            raise LoraFormatError(f"{origin}: tensor {key!r} contains NaN or Inf")
        if check_supported_key(key, tensor, origin) or key.endswith(".diff"):
            dropped.append(key)
    return dropped


def _unet_hint(tensors: dict) -> str:
    """What to say about a file diffusers cannot read whose keys name a UNet's blocks."""
    unet = next((key for key in _factor_keys(tensors) if any(block in key for block in _UNET_BLOCKS)), None)
    if unet is None:
        return ""
    return f"; its keys name UNet blocks (e.g. {unet!r}): it is a LoRA for another model (Stable Diffusion / SDXL)"


def _factor_keys(tensors: dict) -> list[str]:
    """The keys of a file, LoRA factors before alphas (the better example in a message)."""
    return sorted(tensors, key=lambda key: key.endswith(".alpha"))


def _no_transformer_layers(origin: str, tensors: dict, state_dict: dict) -> LoraFormatError:
    """The error for a file with no Flux transformer layer, naming what it holds instead."""
    components = sorted({key.split(".", 1)[0] for key in state_dict})
    example = next(iter(state_dict), "")
    expected = "expected keys like 'transformer.transformer_blocks.0.attn.to_q.lora_A.weight'"
    if components and all(component.startswith("text_encoder") for component in components):
        raw = next(iter(_factor_keys(tensors)))
        return LoraFormatError(
            f"{origin} holds only text-encoder layers (e.g. {raw!r}); Share merges the Flux transformer's layers, "
            f"so there is nothing to merge ({expected})"
        )
    if not any(".lora_A." in key or ".lora_B." in key for key in state_dict):
        sample = ", ".join(list(tensors)[:3])
        return LoraFormatError(
            f"{origin}: no LoRA layers in a known layout (diffusers/PEFT, kohya, XLabs, BFL, ai-toolkit, ComfyUI); "
            f"first keys: {sample}" + _unet_hint(tensors)
        )
    if "unet" in components:
        return LoraFormatError(
            f"{origin} holds UNet layers (e.g. {example!r}) and no Flux transformer layer: it is a LoRA for another "
            f"model (Stable Diffusion / SDXL); {expected}"
        )
    if any(_FLUX_MODULE.fullmatch(component) for component in components):
        unprefixed = next(key for key in state_dict if _FLUX_MODULE.fullmatch(key.split(".", 1)[0]))
        return LoraFormatError(
            f"{origin}: its keys lack diffusers' 'transformer.' prefix (e.g. {unprefixed!r}, expected "
            f"'transformer.{unprefixed}'); stock FluxPipeline.load_lora_weights loads nothing from it. Add the "
            "prefix to every key (the layout FluxPipeline.save_lora_weights writes)"
        )
    return LoraFormatError(
        f"{origin} holds no Flux transformer layer, only {', '.join(components)} layers (e.g. {example!r}): "
        f"is it a LoRA for another model? ({expected})"
    )


def _transformer_lora_config(transformer_sd: dict, alphas: dict, file_metadata: dict | None, origin: str) -> dict:
    """The ``LoraConfig`` kwargs stock diffusers would build for the transformer part."""
    if file_metadata and file_metadata.get(_METADATA_KEY):
        try:
            metadata = json.loads(file_metadata[_METADATA_KEY])
        except json.JSONDecodeError:
            metadata = None
        if isinstance(metadata, dict):
            prefixed = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
            if prefixed:
                _check_metadata_alphas(prefixed, origin)
                return prefixed
    transformer_alphas = {k.removeprefix("transformer."): v for k, v in alphas.items() if k.startswith("transformer.")}
    return _alpha_config(transformer_sd, transformer_alphas)


def _check_metadata_alphas(config: dict, origin: str) -> None:
    """``lora_alpha`` and ``alpha_pattern`` of the file's adapter metadata: finite numbers."""
    values = {"lora_alpha": config.get("lora_alpha")}
    patterns = config.get("alpha_pattern")
    if isinstance(patterns, dict):
        values.update({f"alpha_pattern[{pattern!r}]": value for pattern, value in patterns.items()})
    for field_name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise LoraFormatError(
                f"{origin}: {field_name} in the file's {_METADATA_KEY} is {value!r}; an alpha must be a finite number"
            )


def _alpha_config(state_dict: dict, alphas: dict) -> dict:
    ranks = {key: value.shape[1] for key, value in state_dict.items() if ".lora_B." in key and value.ndim >= 2}
    if not ranks:
        return {}
    alpha_values = {k: float(v) for k, v in alphas.items()}
    return get_peft_kwargs(ranks, network_alpha_dict=alpha_values or None, peft_state_dict=state_dict, is_unet=False)


def split_by_layers(layers: dict[str, LoraLayer], share_layers: Collection[str]) -> tuple[dict, dict]:
    """``(inside, outside)``: the LoRA layers that are Share layers, by exact name, and the rest.

    Not PEFT's ``target_modules`` suffix rule: a checkpoint holding the top-level ``proj_out`` would
    otherwise claim every ``single_transformer_blocks.N.proj_out`` as well.
    """
    share_layers = set(share_layers)
    inside = {name: layer for name, layer in layers.items() if name in share_layers}
    outside = {name: layer for name, layer in layers.items() if name not in share_layers}
    return inside, outside
