"""Community Flux LoRAs as Share adapters, through diffusers' own loading and format conversion.

``FluxPipeline.lora_state_dict`` converts kohya / sd-scripts, XLabs, BFL, ai-toolkit and ComfyUI
layouts to diffusers' PEFT keys and returns the alphas; ``get_peft_kwargs`` turns ranks and alphas
into the ``LoraConfig`` that stock ``load_lora_weights`` would use. We take each layer's scale
from that same config, so a merged style reproduces what stock diffusers applies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import FluxPipeline
from diffusers.utils.peft_utils import get_peft_kwargs

from .core.adapters import LoraLayer
from .core.errors import FactorValueError, LoraFormatError
from .core.factors import map_layers
from .core.inject import matches_target
from .lora_files import lora_layers_from_state_dict

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


@dataclass
class FluxLora:
    """A Flux LoRA split by where it acts.

    Attributes:
        transformer: transformer module name -> factors (scale resolved as stock diffusers does).
        other_energy: ``||dW||_F^2`` of parts outside the transformer (e.g. ``"text_encoder"``).
    """

    transformer: dict[str, LoraLayer]
    other_energy: dict[str, float] = field(default_factory=dict)
    origin: str = "LoRA"

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
    tensors: dict[str, torch.Tensor], file_metadata: dict[str, str] | None = None, origin: str = "LoRA"
) -> FluxLora:
    """Convert a Flux LoRA state dict in any format diffusers reads.

    Args:
        tensors: the file's tensors (not modified).
        file_metadata: the safetensors header metadata (diffusers stores the adapter config there).
        origin: the file name, for error messages.
    """
    # Checked on the file's own keys, before diffusers' converters fold alphas into the factors.
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            if key.endswith(".alpha"):
                raise LoraFormatError(
                    f"{origin}: tensor {key!r} holds a NaN or Inf alpha; an alpha must be a finite number"
                )
            raise LoraFormatError(f"{origin}: tensor {key!r} contains NaN or Inf")
    tensors = _bfl_peft_names_to_kohya(tensors)
    try:
        state_dict, alphas = FluxPipeline.lora_state_dict(dict(tensors), return_alphas=True)
    except Exception as error:  # diffusers raises ValueError, KeyError, IndexError... for layouts it cannot read
        raise LoraFormatError(
            f"{origin}: diffusers could not read this LoRA layout ({type(error).__name__}: {error})"
        ) from None
    alphas = alphas or {}
    for key, value in alphas.items():
        alpha = float(value)
        if not math.isfinite(alpha):
            raise LoraFormatError(
                f"{origin}: the alpha of {key.removesuffix('.alpha')!r} is {alpha}, not a finite number"
            )
    transformer_sd = {k.removeprefix("transformer."): v for k, v in state_dict.items() if k.startswith("transformer.")}
    if not any(".lora_A." in key or ".lora_B." in key for key in state_dict):
        sample = ", ".join(list(tensors)[:3])
        raise LoraFormatError(
            f"{origin}: no LoRA layers in a known layout (diffusers/PEFT, kohya, XLabs, BFL, ai-toolkit, ComfyUI); "
            f"first keys: {sample}"
        )
    config = _transformer_lora_config(transformer_sd, alphas, file_metadata, origin)
    layers = {}
    if transformer_sd:
        layers, _ = lora_layers_from_state_dict(transformer_sd, config, origin)
    other = {}
    for component in sorted({key.split(".", 1)[0] for key in state_dict if not key.startswith("transformer.")}):
        part = {k.removeprefix(f"{component}."): v for k, v in state_dict.items() if k.startswith(f"{component}.")}
        part_alphas = {k.removeprefix(f"{component}."): v for k, v in alphas.items() if k.startswith(f"{component}.")}
        try:
            part_layers, _ = lora_layers_from_state_dict(
                part, _alpha_config(part, part_alphas), f"{origin} ({component})"
            )
        except LoraFormatError:
            continue  # a component with no LoRA pairs (e.g. norm weights) carries no low-rank energy
        other[component] = sum(_energy(layer, origin, f"{component}.{name}") for name, layer in part_layers.items())
    return FluxLora(transformer=layers, other_energy=other, origin=origin)


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


def split_by_targets(layers: dict[str, LoraLayer], targets: str | Sequence[str]) -> tuple[dict, dict]:
    """``(inside, outside)``: layers matching the Share targets and the rest."""
    inside = {name: layer for name, layer in layers.items() if matches_target(name, targets)}
    outside = {name: layer for name, layer in layers.items() if name not in inside}
    return inside, outside
