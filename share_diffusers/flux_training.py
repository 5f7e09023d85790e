"""Flow-matching training pieces for Flux, as in diffusers' Flux LoRA training script.

Used by ``training/train_share_flux.py`` to learn a new style's factors from images; kept here so
tests can reach them. Latents are VAE latents ``(b, c, h, w)`` already shifted and scaled
(``(z - shift_factor) * scaling_factor``); the transformer sees them packed into ``2x2`` patches.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


@torch.no_grad()
def encode_posteriors(pipe, images: torch.Tensor) -> torch.Tensor:
    """The VAE posterior of ``images`` in ``[-1, 1]``: ``(b, 3, H, W)`` -> ``(b, 2c, H / s, W / s)``.

    The tensor holds the mean and log-variance stacked on the channel axis, as diffusers'
    ``DiagonalGaussianDistribution.parameters``, in the VAE's dtype and on its device.
    ``--cache_latents`` keeps these and draws a fresh sample each step (diffusers caches
    ``latent_dist`` the same way), so caching does not change which latents training sees.
    """
    vae = pipe.vae
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.parameters


def sample_latents(
    vae, posteriors: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
) -> torch.Tensor:
    """Latents drawn from ``posteriors (b, 2c, h, w)``, shifted and scaled for the transformer: ``(b, c, h, w)``.

    ``generator`` (one, or one per image) seeds the draw; deterministic runs need it.
    """
    latents = DiagonalGaussianDistribution(posteriors).sample(generator=generator)
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


def encode_images(pipe, images: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None):
    """VAE latents of ``images`` in ``[-1, 1]``, ``(b, 3, H, W)`` -> ``(b, c, H / s, W / s)``, shifted and scaled.

    ``generator`` (one, or one per image) seeds the posterior sample; deterministic runs need it.
    """
    return sample_latents(pipe.vae, encode_posteriors(pipe, images), generator)


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_sequence_length: int = 77):
    """``(prompt_embeds (b, T, D), pooled (b, P), text_ids (T, 3))`` from the pipeline's frozen text encoders.

    Computed on the text encoders' device and in their dtype, wherever the VAE and transformer are.
    """
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=captions, prompt_2=None, device=pipe.text_encoder_2.device, max_sequence_length=max_sequence_length
    )
    return embeds, pooled, text_ids


class CaptionEmbeddings:
    """Prompt embeddings of a fixed set of captions, encoded once (``--cache_latents``).

    The text encoders are frozen, so a caption's embedding never changes: diffusers' trainers compute
    them once too when the text encoders are not trained. Kept on the CPU (a T5-XXL embedding of 512
    tokens is 4 MiB in bf16 per distinct caption); :meth:`__call__` stacks a batch of them.

    Args:
        pipe: a Flux pipeline with its text encoders.
        captions: every caption training can ask for (duplicates are encoded once).
        max_sequence_length: T5 tokens, as in training.
        batch_size: captions encoded together.
    """

    def __init__(self, pipe, captions: list[str], max_sequence_length: int, batch_size: int = 1):
        distinct = sorted(set(captions))
        self.embeds: dict[str, torch.Tensor] = {}  # caption -> (T, D)
        self.pooled: dict[str, torch.Tensor] = {}  # caption -> (P,)
        self.text_ids = None  # (T, 3), the same for every caption
        for start in range(0, len(distinct), batch_size):
            chunk = distinct[start : start + batch_size]
            embeds, pooled, self.text_ids = encode_captions(pipe, chunk, max_sequence_length)
            for row, caption in enumerate(chunk):
                self.embeds[caption] = embeds[row].cpu()
                self.pooled[caption] = pooled[row].cpu()
        if self.text_ids is not None:
            self.text_ids = self.text_ids.cpu()

    def __call__(self, captions: list[str]):
        """``(prompt_embeds (b, T, D), pooled (b, P), text_ids (T, 3))`` on the CPU, as :func:`encode_captions`."""
        missing = [caption for caption in captions if caption not in self.embeds]
        if missing:
            raise KeyError(f"caption {missing[0]!r} was not encoded ahead; the cache holds {len(self.embeds)} captions")
        embeds = torch.stack([self.embeds[caption] for caption in captions])
        pooled = torch.stack([self.pooled[caption] for caption in captions])
        return embeds, pooled, self.text_ids


def flow_matching_loss(
    transformer,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    text_ids: torch.Tensor,
    guidance_scale: float = 1.0,
    weighting_scheme: str = "none",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Rectified-flow loss ``|| v_theta(x_t, t) - (noise - x_0) ||^2`` with ``x_t = (1 - t) x_0 + t noise``.

    Args:
        latents: ``(b, c, h, w)`` clean latents ``x_0``.
        weighting_scheme: timestep density and loss weights as diffusers' trainers (``none``,
            ``logit_normal``, ``mode``, ``sigma_sqrt``, ``cosmap``).
        generator: for the noise and the timesteps (deterministic runs).

    Returns the scalar loss (float32).
    """
    batch, channels, height, width = latents.shape
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    sigmas = compute_density_for_timestep_sampling(
        weighting_scheme if weighting_scheme in ("logit_normal", "mode") else "uniform",
        batch,
        logit_mean=0.0,
        logit_std=1.0,
        mode_scale=1.29,
        generator=generator,
    ).to(latents.device, latents.dtype)
    noisy = (1.0 - sigmas[:, None, None, None]) * latents + sigmas[:, None, None, None] * noise
    packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width)  # (b, h w / 4, 4 c)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
    guidance = None
    if getattr(transformer, "module", transformer).config.guidance_embeds:  # through a DDP wrapper too
        guidance = torch.full((batch,), guidance_scale, device=latents.device, dtype=latents.dtype)
    prediction = transformer(
        hidden_states=packed,
        timestep=sigmas,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    target = FluxPipeline._pack_latents(noise - latents, batch, channels, height, width)
    weights = compute_loss_weighting_for_sd3(weighting_scheme, sigmas)[:, None, None]
    return (weights.float() * (prediction.float() - target.float()) ** 2).mean()
