"""Learning a Flux style from images with the flow-matching loss, on the tiny pipeline."""

from __future__ import annotations

import pytest
import torch
from flux_helpers import write_diffusers_lora

from share_diffusers import ShareConfig, ShareFluxPipeline
from share_diffusers.core.trainable import attach_trainable, detach_trainable, trained_adapter
from share_diffusers.flux_training import (
    CaptionEmbeddings,
    encode_captions,
    encode_images,
    encode_posteriors,
    flow_matching_loss,
    sample_latents,
)
from share_diffusers.tiny_flux import build_tiny_flux_pipeline


def _images(count: int = 4) -> torch.Tensor:
    """Red squares on dark backgrounds in [-1, 1]: a 'style' the tiny model does not draw yet."""
    images = -0.8 * torch.ones(count, 3, 32, 32)
    for index in range(count):
        top = 4 + 4 * index
        images[index, 0, top : top + 12, 6:20] = 0.9
    return images


def _fixed_loss(pipe, latents, embeds, pooled, text_ids) -> float:
    """The loss averaged over 8 fixed draws of noise and timesteps (one draw is a noisy yardstick)."""
    with torch.no_grad():
        draws = [
            flow_matching_loss(
                pipe.transformer, latents, embeds, pooled, text_ids, generator=torch.Generator().manual_seed(seed)
            )
            for seed in range(123, 131)
        ]
    return float(torch.stack(draws).mean())


def test_flow_matching_training_learns_a_style_and_merges_it(tmp_path):
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.merge_lora(
        write_diffusers_lora(tmp_path / "ink", seed=1, rank=4, alpha=8),
        style_name="ink",
        config=ShareConfig(rank=16, pseudo_rank=4),
    )
    latents = encode_images(pipe, _images())
    embeds, pooled, text_ids = encode_captions(pipe, ["a red square"] * 4, max_sequence_length=16)
    assert latents.shape == (4, 4, 16, 16)
    share = pipe.share
    trainables = attach_trainable(share.layers, pseudo_rank=4, phi=4, seed=0)
    before = _fixed_loss(pipe, latents, embeds, pooled, text_ids)
    parameters = [p for module in trainables.values() for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=5e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(100):
        loss = flow_matching_loss(pipe.transformer, latents, embeds, pooled, text_ids, generator=generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _fixed_loss(pipe, latents, embeds, pooled, text_ids)
    # a random tiny model: attention-only rank-4 factors cut it by 9.3% (1 thread) to 10.4% (2 threads)
    assert after < 0.95 * before
    adapter = trained_adapter(share.layers, source={"trained_from": "red squares"})
    detach_trainable(share.layers)
    share.merge(adapter, "red-square")
    share.set_style("red-square", batch_size=4)
    merged = _fixed_loss(pipe, latents, embeds, pooled, text_ids)
    share.set_style(None)
    assert abs(merged - after) < 1e-3 * before  # k = 16 holds the new style: the merge keeps what was learned
    assert _fixed_loss(pipe, latents, embeds, pooled, text_ids) == before  # base model untouched


def test_cached_posteriors_and_caption_embeddings_give_what_the_encoders_give():
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    images = _images(3)
    posteriors = encode_posteriors(pipe, images)  # (3, 2c, h, w): mean and log-variance
    assert posteriors.shape == (3, 8, 16, 16)
    # the same generators draw the same latents from the cached posteriors as from the VAE
    for seeds in ([5, 6, 7], [7, 6, 5]):
        direct = encode_images(pipe, images, [torch.Generator().manual_seed(s) for s in seeds])
        cached = sample_latents(pipe.vae, posteriors, [torch.Generator().manual_seed(s) for s in seeds])
        assert torch.equal(direct, cached)
    captions = ["a red square", "", "a blue square"]
    cache = CaptionEmbeddings(pipe, captions + ["a red square"], max_sequence_length=16)
    assert len(cache.embeds) == 3  # duplicates are encoded once
    for got, expected in zip(cache(captions), encode_captions(pipe, captions, 16), strict=True):
        assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(KeyError, match="caption 'a green square' was not encoded ahead"):
        cache(["a green square"])
