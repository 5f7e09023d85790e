"""``ShareFluxPipeline``: ``FluxPipeline`` with Share styles chosen per prompt."""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

from .loader import ShareLoaderMixin

_UNSET = object()


class ShareFluxPipeline(FluxPipeline, ShareLoaderMixin):
    """``FluxPipeline`` plus :class:`ShareLoaderMixin`.

        pipe = ShareFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", torch_dtype=torch.bfloat16)
        pipe.load_share_factors("someone/flux-share-styles")
        pipe.merge_lora("someone/spongebob-flux-lora", style_name="spongebob")
        images = pipe(prompt=["a castle", "a castle", "a cat"],
                      style=["spongebob", {"spongebob": 0.5, "airbrush": 0.5}, None]).images

    ``style``: None (the base model), a style name, a ``{name: weight}`` blend, or a list with one of
    those per prompt; ``style_scale`` multiplies every weight. Omitted, the style chosen with
    :meth:`set_style` applies. All prompts are denoised in one batch whatever their styles; images
    of one prompt (``num_images_per_prompt``) and both branches of true CFG share its style.

    Without ``max_sequence_length`` the T5 prompt is padded to ``tokenizer_2.model_max_length`` when that
    is under FluxPipeline's 512: a small model trained on short prompts (the embedded demo model) sees
    the padding it was trained with (Flux attends to padding tokens too).
    """

    @torch.no_grad()
    def __call__(self, *args, style=_UNSET, style_scale: float | None = None, **kwargs):
        trained_length = getattr(self.tokenizer_2, "model_max_length", 512) if self.tokenizer_2 is not None else 512
        if "max_sequence_length" not in kwargs and trained_length < 512:
            kwargs["max_sequence_length"] = trained_length
        if style is _UNSET:
            style = self._default_style
            style_scale = self._default_style_scale if style_scale is None else style_scale
        style_scale = 1.0 if style_scale is None else style_scale
        if style is None or self._share is None:
            if style is not None:
                self._require_share()  # raises: styles requested but none loaded
            return super().__call__(*args, **kwargs)
        prompt = kwargs.get("prompt", args[0] if args else None)
        if prompt is not None:
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        elif kwargs.get("prompt_embeds") is not None:
            batch_size = kwargs["prompt_embeds"].shape[0]
        else:
            raise ValueError("give prompt or prompt_embeds")
        per_prompt = kwargs.get("num_images_per_prompt") or 1
        # Diffusers repeats each prompt's embeddings num_images_per_prompt times in place (p0 p0 p1 p1 ...).
        with self._share.styles(style, style_scale, batch_size=batch_size, repeat=per_prompt):
            return super().__call__(*args, **kwargs)

    def load_lora_weights(self, *args, **kwargs):
        """Stock diffusers LoRA loading; refused while Share layers are in the transformer."""
        if self._share is not None:
            raise RuntimeError(
                "this pipeline holds Share styles; merge the LoRA as a style with merge_lora(...), or call "
                "remove_share() before load_lora_weights(...)"
            )
        return super().load_lora_weights(*args, **kwargs)


def guidance_arguments(pipe, guidance: float, batch_size: int) -> dict:
    """Call arguments that apply ``guidance`` the way the pipeline's transformer understands it.

    A guidance-distilled transformer (FLUX.1-dev) takes it as its guidance input (``guidance_scale``);
    one without that input (FLUX.1-schnell, the embedded demo model) gets true classifier-free guidance
    against an empty negative prompt when ``guidance > 1`` (two transformer passes per step), and
    nothing otherwise.
    """
    if getattr(pipe.transformer.config, "guidance_embeds", False):
        return {"guidance_scale": guidance}
    if guidance > 1.0:
        return {"negative_prompt": [""] * batch_size, "true_cfg_scale": guidance}
    return {}
