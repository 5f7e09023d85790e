"""Flow-matching training pieces for Flux, as in diffusers' Flux LoRA training script.

Used by ``training/train_share_flux.py`` to learn a new style's factors from images; kept here so
tests can reach them. Latents are VAE latents ``(b, c, h, w)`` already shifted and scaled
(``(z - shift_factor) * scaling_factor``); the transformer sees them packed into ``2x2`` patches.
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None):
    """VAE latents of ``images`` in ``[-1, 1]``, ``(b, 3, H, W)`` -> ``(b, c, H / s, W / s)``, shifted and scaled.

    ``generator`` (one, or one per image) seeds the posterior sample; deterministic runs need it.
    """
    vae = pipe.vae
    latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample(generator=generator)
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_sequence_length: int = 77):
    """``(prompt_embeds (b, T, D), pooled (b, P), text_ids (T, 3))`` from the pipeline's frozen text encoders."""
    embeds, pooled, text_ids = pipe.encode_prompt(
        prompt=captions, prompt_2=None, max_sequence_length=max_sequence_length
    )
    return embeds, pooled, text_ids


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
