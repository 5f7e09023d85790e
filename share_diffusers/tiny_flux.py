"""A tiny Flux pipeline built offline from configs: the same architecture as FLUX.1, random weights.

Tests, the demo and the app use it so that nothing downloads. Its transformer is a real
``FluxTransformer2DModel`` (double and single blocks, the same attention linears as FLUX.1), its
VAE a real ``AutoencoderKL``, its text encoders real CLIP and T5 encoders, and its tokenizers are
trained here with the ``tokenizers`` library on a small fixed corpus. Everything is deterministic
from a seed, and ``save_pretrained`` / ``from_pretrained`` round-trip it like any diffusers folder.

    pipe = build_tiny_flux_pipeline(seed=0)
    image = pipe("a photo of a sneaker", height=32, width=32, num_inference_steps=2).images[0]
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

# Small enough to run a 2-step 32x32 image in well under a second on a CPU; wide enough to test
# every code path (attention heads, rope axes summing to the head dim, guidance embedding).
TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=16,  # 4 latent channels x 2x2 packing
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=1.5035,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
TEXT_WIDTH = 32
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 64

_WORDS = (
    "a an the of in on with and photo picture drawing painting image style styled "
    "t-shirt top shirt trouser trousers pants pullover sweater dress coat sandal sandals sneaker sneakers "
    "bag ankle boot boots shoe shoes jacket hat cat dog castle house tree river mountain city street car "
    "red orange yellow green blue purple pink white black gray grey brown gold silver dark light bright "
    "inverted negative tinted tint striped stripes outline outlines sketch ink neon sepia pastel airbrush "
    "watercolor oil pencil charcoal cartoon anime pixel retro vintage modern minimal detailed simple "
    "portrait landscape close-up studio night day sunny rainy snowy old young small large tiny big "
    "person woman man child face hand flower flowers garden sky cloud clouds sea beach forest field"
).split()


def _corpus() -> list[str]:
    """Sentences built from a fixed word list: enough for BPE to learn whole words and pieces."""
    sentences = [" ".join(_WORDS[i : i + 6]) for i in range(0, len(_WORDS), 3)]
    sentences += [f"a photo of a {word}" for word in _WORDS]
    sentences += [f"a {a} {b} in {c} style" for a, b, c in zip(_WORDS, _WORDS[7:], _WORDS[13:], strict=False)]
    return sentences


def _train_tokenizer(special: list[str], template: str, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    ids = {token: tokenizer.token_to_id(token) for token in special}
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(token, ids[token]) for token in special if token in template]
    )
    return tokenizer


def build_tokenizers() -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """CLIP-like (``<bos> text <eos>``, padded with ``<eos>``) and T5-like (``text </s>``, ``<pad>`` = 0)."""
    clip = _train_tokenizer(["<unk>", "<bos>", "<eos>"], "<bos> $A <eos>", vocab_size=400)
    clip_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=clip,
        model_max_length=CLIP_MAX_LENGTH,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<eos>",
        unk_token="<unk>",
    )
    t5 = _train_tokenizer(["<pad>", "</s>", "<unk>"], "$A </s>", vocab_size=400)
    t5_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=t5, model_max_length=T5_MAX_LENGTH, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    return clip_tokenizer, t5_tokenizer


def build_tiny_flux_components(seed: int = 0) -> dict:
    """The components of a tiny ``FluxPipeline``, weights drawn from ``seed``."""
    clip_tokenizer, t5_tokenizer = build_tokenizers()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    torch.manual_seed(seed + 2)
    clip_config = CLIPTextConfig(
        vocab_size=clip_tokenizer.vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_WIDTH,
        bos_token_id=clip_tokenizer.bos_token_id,
        eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(clip_config)
    torch.manual_seed(seed + 3)
    t5_config = T5Config(
        vocab_size=t5_tokenizer.vocab_size,
        d_model=TEXT_WIDTH,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id,
        decoder_start_token_id=t5_tokenizer.pad_token_id,
    )
    text_encoder_2 = T5EncoderModel(t5_config)
    for model in (transformer, vae, text_encoder, text_encoder_2):
        model.eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=1.0),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": t5_tokenizer,
        "transformer": transformer,
    }


def build_tiny_flux_pipeline(seed: int = 0, pipeline_class: type = FluxPipeline):
    """A tiny pipeline of ``pipeline_class`` (``FluxPipeline`` or ``ShareFluxPipeline``) on CPU, float32."""
    return pipeline_class(**build_tiny_flux_components(seed))


def save_tiny_flux_pipeline(path: str, seed: int = 0) -> str:
    """Write the tiny pipeline as an ordinary diffusers folder that ``from_pretrained`` loads."""
    build_tiny_flux_pipeline(seed).save_pretrained(path)
    return path
