"""The embedded demo model: a small Flux (same architecture as FLUX.1) trained on Fashion-MNIST.

``training/train_tiny_flux.py`` trains it on a CPU; the trained pipeline, its judges and the demo
styles ship inside the package under ``share_diffusers/fashion/assets/``, so the app, the command
line and the samples draw real pictures with no training and no download:

    pipe = load_demo_pipeline()                       # ShareFluxPipeline, float32, CPU
    # (diffusers is imported on first use: the constants here are cheap to import)
    pipe.load_share_factors(DEMO_STYLES_DIR)          # inverted, tint, stripes, outlines
    prompts = ["a photo of a sneaker"] * 2
    images = pipe(prompt=prompts, style=[None, "stripes"], **DEMO_CALL,
                  **guidance_arguments(pipe, DEMO_GUIDANCE, len(prompts))).images

The text encoders are the random tiny CLIP and T5 of :mod:`share_diffusers.tiny_flux`, kept frozen:
the transformer learns to read their (random but fixed) embeddings of the class prompts.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).parent / "assets"
DEMO_PIPELINE_DIR = ASSETS_DIR / "fashion-flux"
DEMO_STYLES_DIR = ASSETS_DIR / "fashion-styles"
JUDGES_DIR = ASSETS_DIR / "judges"
RESOLUTION = 32
MAX_SEQUENCE_LENGTH = 16  # the T5 tokens the model was trained with (Flux attends to padding too)
# What a call needs to match training: size, text length, and enough Euler steps for clean shapes.
DEMO_CALL = dict(height=RESOLUTION, width=RESOLUTION, num_inference_steps=16, max_sequence_length=MAX_SEQUENCE_LENGTH)
# True classifier-free guidance against the empty prompt (the model saw 10% empty prompts in training):
# on 100 images, the class judge named the prompted class for 72% without guidance, 92% at 2.0, 95% at 3.5.
DEMO_GUIDANCE = 3.0

# FLUX.1's structure (double-stream then single-stream blocks, rope over 3 axes, 2x2 latent packing)
# at width 128: 2.3M parameters, about 0.8 s per training step of 64 images on two CPU cores.
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels x 2x2 packing
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=32,  # the tiny T5's width
    pooled_projection_dim=32,  # the tiny CLIP's projection
    guidance_embeds=False,  # like FLUX.1-schnell: no distilled guidance input
    axes_dims_rope=(8, 12, 12),
)
# One downsampling: 32x32 RGB <-> 16x16x4 latents (the transformer then sees 8x8 = 64 tokens).
# (Spelled out rather than derived from tiny_flux.VAE_CONFIG: importing that module imports diffusers.)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),  # 0.16M parameters, 0.33 s per step of 64 images on two CPU cores
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    mid_block_add_attention=False,  # attention over 16x16 positions cost more than it gave at this size
    sample_size=RESOLUTION,
    scaling_factor=1.0,  # set from the trained latents' statistics
    shift_factor=0.0,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def has_demo_architecture(transformer) -> bool:
    """Whether ``transformer``'s config is the demo model's (``TRANSFORMER_CONFIG``): the shipped model, or one
    ``training/train_tiny_flux.py`` trained elsewhere, which draws at the demo's size and steps, not FLUX.1's."""
    config = transformer.config

    def same(value, expected) -> bool:
        return list(value) == list(expected) if isinstance(expected, tuple) else value == expected

    return all(key in config and same(config[key], value) for key, value in TRANSFORMER_CONFIG.items())


def build_fashion_flux_components(seed: int = 0) -> dict:
    """Untrained components of the demo pipeline: the tiny text encoders and tokenizers, a wider
    transformer and VAE (weights drawn from ``seed``), and a T5 tokenizer capped at the trained length."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from ..tiny_flux import build_tiny_flux_components

    components = build_tiny_flux_components(seed)
    torch.manual_seed(seed + 10)
    components["transformer"] = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 11)
    components["vae"] = AutoencoderKL(**VAE_CONFIG)
    components["tokenizer_2"].model_max_length = MAX_SEQUENCE_LENGTH
    return components


def load_demo_pipeline(path: str | Path = DEMO_PIPELINE_DIR, pipeline_class=None):
    """The trained demo pipeline (``ShareFluxPipeline`` unless ``pipeline_class``), float32 on CPU.

    Loaded as :func:`share_diffusers.runtime.load_pipeline` loads it: without transformers' image-processor
    notes or loading bars, the dtype under the name the installed diffusers reads.
    """
    import torch

    from ..pipeline_flux import dtype_keyword
    from ..runtime import _quiet_loading, import_diffusers_quietly  # runtime imports this module: not at the top

    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} holds no diffusers pipeline (model_index.json missing)")
    import_diffusers_quietly()
    with _quiet_loading(progress=False):
        if pipeline_class is None:
            from ..pipeline_flux import ShareFluxPipeline as pipeline_class
        pipe = pipeline_class.from_pretrained(str(path), **dtype_keyword({"dtype": torch.float32}))
    pipe.set_progress_bar_config(disable=True)
    return pipe
