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
from dataclasses import dataclass, field, replace

import torch
from diffusers import FluxPipeline
from diffusers.utils.peft_utils import get_peft_kwargs

from .core.adapters import LoraLayer
from .core.errors import FactorValueError, LoraFormatError
from .core.factors import map_layers
from .lora_files import (
    check_alpha_size,
    check_supported_key,
    is_peft_state_dict,
    lora_layers_from_state_dict,
    peft_lora_layers,
)

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
# FluxTransformer2DModel's modules outside its blocks, and BFL's final_layer modules by their diffusers names.
_TOP_LEVEL_NAMES = r"x_embedder|context_embedder|time_text_embed|norm_out|proj_out"
_TOP_LEVEL_MODULE = re.compile(_TOP_LEVEL_NAMES)
# First parts of keys without diffusers' "transformer." prefix that name FluxTransformer2DModel's modules.
_FLUX_MODULE = re.compile(r"(single_)?transformer_blocks|" + _TOP_LEVEL_NAMES)
_FINAL_LAYER = {"final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear"}
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
        # Copies of the kohya text-encoder factors: diffusers 0.42 folds their alphas in with an in-place `*=`
        # on the tensors it is given, which would change the caller's (and a second conversion's) input.
        given = {key: value.clone() if key.startswith("lora_te") else value for key, value in tensors.items()}
        state_dict, alphas = FluxPipeline.lora_state_dict(given, return_alphas=True)
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
    top_level, top_level_scales = _kohya_top_level(tensors, state_dict)
    state_dict = {key: value for key, value in state_dict.items() if key not in top_level}
    transformer_sd = {k.removeprefix("transformer."): v for k, v in state_dict.items() if k.startswith("transformer.")}
    transformer_sd.update(top_level)
    config = _transformer_lora_config(transformer_sd, alphas, file_metadata, origin)
    layers, ignored = lora_layers_from_state_dict(transformer_sd, config, origin) if transformer_sd else ({}, [])
    if not layers:
        raise _no_transformer_layers(origin, tensors, state_dict)
    for name, factor in top_level_scales.items():
        if name in layers:
            layers[name] = replace(layers[name], scale=layers[name].scale * factor)
    dropped.extend(f"transformer.{key}" for key in ignored)
    other = {}
    for component in sorted({key.split(".", 1)[0] for key in state_dict if not key.startswith("transformer.")}):
        part = {k.removeprefix(f"{component}."): v for k, v in state_dict.items() if k.startswith(f"{component}.")}
        part_alphas = {k.removeprefix(f"{component}."): v for k, v in alphas.items() if k.startswith(f"{component}.")}
        try:
            part_layers, part_ignored = lora_layers_from_state_dict(
                part, _alpha_config(part, part_alphas), f"{origin} ({component})"
            )
        except LoraFormatError:
            part_layers, part_ignored = _attention_processor_layers(part)
            if not part_layers:  # a component with no LoRA pairs (e.g. norm weights) carries no low-rank energy
                dropped.extend(f"{component}.{key}" for key in part)
                continue
        dropped.extend(f"{component}.{key}" for key in part_ignored)
        other[component] = sum(_energy(layer, origin, f"{component}.{name}") for name, layer in part_layers.items())
    return FluxLora(transformer=layers, other_energy=other, origin=origin, dropped=sorted(set(dropped)))


def _kohya_top_level(
    tensors: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The transformer's top-level layers of a kohya / ComfyUI file, which diffusers' converter leaves unprefixed.

    For ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in`` and ``final_layer`` diffusers 0.42
    writes ``x_embedder.lora_A.weight``... without ``transformer.`` (stock ``load_lora_weights`` then drops
    them silently), and it leaves out the alphas of ``final_layer`` ("TODO: alphas" there). Returns those keys,
    transformer-relative, and the ``alpha / rank`` each such layer still needs; the factor is only given where
    the converted factors are the file's own, unscaled, so a diffusers that learns to fold them in is not
    scaled twice. Other layouts (whose unprefixed keys mean something else) give nothing.
    """
    if not any(key.startswith(("lora_unet_", "diffusion_model.")) for key in tensors):
        return {}, {}
    top_level = {key: value for key, value in state_dict.items() if _TOP_LEVEL_MODULE.fullmatch(key.split(".", 1)[0])}
    scales = {}
    for path, layer in _FINAL_LAYER.items():
        for stem in ("lora_unet_" + path.replace(".", "_"), f"diffusion_model.{path}"):
            alpha, down, up = (
                tensors.get(f"{stem}{suffix}") for suffix in (".alpha", ".lora_down.weight", ".lora_up.weight")
            )
            converted_down, converted_up = (
                top_level.get(f"{layer}.lora_A.weight"),
                top_level.get(f"{layer}.lora_B.weight"),
            )
            if alpha is None or down is None or up is None or converted_down is None or converted_up is None:
                continue
            raw_size = float(down.double().norm() * up.double().norm())
            converted_size = float(converted_down.double().norm() * converted_up.double().norm())
            if math.isclose(raw_size, converted_size, rel_tol=1e-6):  # rows maybe reordered, but not scaled
                scales[layer] = float(alpha) / down.shape[0]
    return top_level, scales


def _attention_processor_layers(part: dict[str, torch.Tensor]) -> tuple[dict[str, LoraLayer], list[str]]:
    """LoRA pairs in diffusers' old attention-processor form (``...self_attn.to_q_lora.down.weight`` / ``.up``),
    alpha folded in: what its kohya converter writes for a text encoder. Returns the layers and the other keys."""
    layers, used = {}, set()
    for key, down in part.items():
        if not key.endswith(".down.weight") or (up := part.get(key.removesuffix("down.weight") + "up.weight")) is None:
            continue
        if down.ndim == 2 and up.ndim == 2 and up.shape[1] == down.shape[0]:
            layers[key.removesuffix(".down.weight")] = LoraLayer(up, down, 1.0)
            used.update((key, key.removesuffix("down.weight") + "up.weight"))
    return layers, [key for key in part if key not in used]


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
        if key.endswith(".alpha"):
            check_alpha_size(key, tensor, origin)
        integer_alpha = key.endswith(".alpha") and not tensor.is_complex() and tensor.dtype != torch.bool
        if not tensor.is_floating_point() and not integer_alpha:
            # A quantized or corrupt file: its integers (or complex numbers, bools) would be read as weights.
            raise LoraFormatError(
                f"{origin}: tensor {key!r} holds {str(tensor.dtype).removeprefix('torch.')} values; a LoRA's "
                "factors and alphas are floating point"
            )
        if not bool(torch.isfinite(tensor).all()):
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
    transformer_alphas = {k.removeprefix("transformer."): v for k, v in alphas.items() if k.startswith("transformer.")}
    if file_metadata and file_metadata.get(_METADATA_KEY):
        try:
            metadata = json.loads(file_metadata[_METADATA_KEY])
        except json.JSONDecodeError:
            metadata = None
        if isinstance(metadata, dict):
            prefixed = {k.removeprefix("transformer."): v for k, v in metadata.items() if k.startswith("transformer.")}
            if prefixed:
                if transformer_alphas:  # two scales for one layer: stock diffusers refuses such a file too
                    example = next(iter(transformer_alphas))
                    raise LoraFormatError(
                        f"{origin} gives its layers' scale twice: '.alpha' tensors (e.g. 'transformer.{example}' "
                        f"= {transformer_alphas[example]:g}) and adapter metadata ({_METADATA_KEY}: transformer."
                        f"lora_alpha = {prefixed.get('lora_alpha')!r}); stock diffusers refuses it as well. Keep one"
                    )
                _check_metadata_alphas(prefixed, origin)
                return prefixed
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
