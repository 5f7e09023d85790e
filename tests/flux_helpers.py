"""Tiny-Flux fixtures: LoRAs written by diffusers/PEFT and the same LoRAs in kohya and XLabs layouts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from share_diffusers.tiny_flux import build_tiny_flux_pipeline

SEED = 0
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def stock_pipeline() -> FluxPipeline:
    return build_tiny_flux_pipeline(SEED)


def write_diffusers_lora(path: Path, seed: int, rank: int, alpha: float, targets=ATTENTION, scale: float = 0.3) -> Path:
    """A LoRA made the diffusers way: PEFT adapter on the transformer, random weights, ``save_lora_weights``."""
    pipe = stock_pipeline()
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name="fixture")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in pipe.transformer.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    layers = get_peft_model_state_dict(pipe.transformer, adapter_name="fixture")
    metadata = {key: value for key, value in config.to_dict().items() if key in ("r", "lora_alpha", "target_modules")}
    metadata["target_modules"] = sorted(metadata["target_modules"])
    path.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        str(path), transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
    )
    return path / "pytorch_lora_weights.safetensors"


def write_peft_adapter_folder(diffusers_file: Path, folder: Path, rank: int, alpha: float) -> Path:
    """The LoRA of a diffusers ``pytorch_lora_weights.safetensors`` as a PEFT adapter folder: the same factors
    under PEFT's keys in ``adapter_model.safetensors``, ``lora_alpha`` only in ``adapter_config.json``."""
    tensors = load_file(str(diffusers_file))
    folder.mkdir(parents=True)
    save_file(
        {"base_model.model." + key.removeprefix("transformer."): value for key, value in tensors.items()},
        str(folder / "adapter_model.safetensors"),
    )
    layers = sorted({key.removeprefix("transformer.").split(".lora_")[0] for key in tensors})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": layers, "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def fused_qkv_lora(seed: int, rank: int, num_blocks: int = 2, width: int = 32) -> dict[str, dict[str, torch.Tensor]]:
    """Double-block attention LoRA in the fused form every format can express exactly.

    Returns ``block -> {"img_qkv_down" (r, d), "img_qkv_up" (3d, r), "img_proj_down", "img_proj_up",
    "txt_qkv_down", "txt_qkv_up", "txt_proj_down", "txt_proj_up"}``.
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.3

    return {
        block: {
            "img_qkv_down": rand(rank, width),
            "img_qkv_up": rand(3 * width, rank),
            "img_proj_down": rand(rank, width),
            "img_proj_up": rand(width, rank),
            "txt_qkv_down": rand(rank, width),
            "txt_qkv_up": rand(3 * width, rank),
            "txt_proj_down": rand(rank, width),
            "txt_proj_up": rand(width, rank),
        }
        for block in range(num_blocks)
    }


def write_fused_lora(path: Path, fused: dict, layout: str, alpha: float | None = None) -> Path:
    """Write ``fused_qkv_lora`` factors as a diffusers, kohya (sd-scripts) or XLabs file."""
    tensors = {}
    for block, f in fused.items():
        if layout == "diffusers":
            width = f["img_proj_up"].shape[0]
            for prefix, names in (
                ("img", ("to_q", "to_k", "to_v")),
                ("txt", ("add_q_proj", "add_k_proj", "add_v_proj")),
            ):
                for index, name in enumerate(names):
                    key = f"transformer.transformer_blocks.{block}.attn.{name}"
                    tensors[f"{key}.lora_A.weight"] = f[f"{prefix}_qkv_down"]
                    tensors[f"{key}.lora_B.weight"] = f[f"{prefix}_qkv_up"][index * width : (index + 1) * width]
            for prefix, name in (("img", "to_out.0"), ("txt", "to_add_out")):
                key = f"transformer.transformer_blocks.{block}.attn.{name}"
                tensors[f"{key}.lora_A.weight"] = f[f"{prefix}_proj_down"]
                tensors[f"{key}.lora_B.weight"] = f[f"{prefix}_proj_up"]
                if alpha is not None:
                    tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
            if alpha is not None:
                for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
                    tensors[f"transformer.transformer_blocks.{block}.attn.{name}.alpha"] = torch.tensor(float(alpha))
        elif layout == "kohya":
            for part in ("img_qkv", "img_proj", "txt_qkv", "txt_proj"):
                stream, kind = part.split("_")
                key = f"lora_unet_double_blocks_{block}_{stream}_attn_{kind}"
                tensors[f"{key}.lora_down.weight"] = f[f"{part}_down"]
                tensors[f"{key}.lora_up.weight"] = f[f"{part}_up"]
                tensors[f"{key}.alpha"] = torch.tensor(
                    float(alpha if alpha is not None else f[f"{part}_down"].shape[0])
                )
        elif layout == "xlabs":
            names = {"img_qkv": "qkv_lora1", "img_proj": "proj_lora1", "txt_qkv": "qkv_lora2", "txt_proj": "proj_lora2"}
            for part, name in names.items():
                key = f"double_blocks.{block}.processor.{name}"
                tensors[f"{key}.down.weight"] = f[f"{part}_down"]
                tensors[f"{key}.up.weight"] = f[f"{part}_up"]
        else:
            raise ValueError(layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


def transformer_inputs(batch: int = 2, seed: int = 3) -> dict:
    """Fixed inputs for one direct transformer call (8x8 packed latents, 7 text tokens)."""
    generator = torch.Generator().manual_seed(seed)
    text = 7
    return {
        "hidden_states": torch.randn(batch, 64, 16, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text, 32, generator=generator),
        "pooled_projections": torch.randn(batch, 32, generator=generator),
        "timestep": torch.full((batch,), 0.7),
        "guidance": torch.full((batch,), 3.5),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, 8, 8, "cpu", torch.float32),
        "txt_ids": torch.zeros(text, 3),
        "return_dict": False,
    }


def run_transformer(transformer, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0]


def generate(pipe, prompts, seeds=None, **kwargs):
    """Two 32x32 denoising steps, deterministic, as numpy; ``seeds`` gives each image its own noise."""
    kwargs.setdefault("num_inference_steps", 2)
    generator = [torch.Generator().manual_seed(s) for s in seeds] if seeds else torch.Generator().manual_seed(0)
    return pipe(
        prompt=prompts, height=32, width=32, generator=generator, output_type="np", max_sequence_length=16, **kwargs
    ).images


# FLUX.1-dev's transformer (schnell has the same widths, without the guidance embedder).
FLUX1_TRANSFORMER_CONFIG = dict(
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    in_channels=64,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def flux1_meta_transformer():
    """FLUX.1's transformer on the meta device: every real layer shape, no weights, no memory."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX1_TRANSFORMER_CONFIG)


def one_torch_thread():
    """Generator for a module fixture: torch runs single-threaded, then its thread count is put back.

    For tests whose tensors are small or skinny (the tiny pipeline, LoRA factors): on 2 busy cores, OpenMP
    teams only contend for them (measured: the FLUX.1-width format tests took 60-110 s instead of 12 s, the
    signature tests 19 s instead of 6 s, while other test processes ran).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
