"""``ShareFluxPipeline``: ``FluxPipeline`` with Share styles chosen per prompt."""

from __future__ import annotations

import inspect
import json
import numbers

import diffusers
import torch
from diffusers import FluxPipeline
from packaging.version import Version

from .core.errors import ShareStateError, StyleError
from .loader import ShareLoaderMixin

_FLUX_CALL = inspect.signature(FluxPipeline.__call__)
# diffusers 0.40 renamed from_pretrained's torch_dtype to dtype (torch_dtype warns there; before, dtype is ignored).
DIFFUSERS_TAKES_DTYPE = Version(diffusers.__version__).release >= (0, 40)


def dtype_keyword(kwargs: dict) -> dict:
    """``from_pretrained`` keyword arguments with the dtype under the name the installed diffusers reads.

    Either ``dtype`` or ``torch_dtype`` may be given (not both): ``dtype`` is the name on diffusers 0.40 and
    later, where ``torch_dtype`` warns; older releases read only ``torch_dtype``.
    """
    if "dtype" in kwargs and "torch_dtype" in kwargs:
        raise TypeError("pass dtype= or torch_dtype=, not both")
    given, wanted = ("torch_dtype", "dtype") if DIFFUSERS_TAKES_DTYPE else ("dtype", "torch_dtype")
    if given not in kwargs:
        return kwargs
    kwargs = dict(kwargs)
    kwargs[wanted] = kwargs.pop(given)
    return kwargs


class _DefaultStyle:
    """The value of ``style`` when a call leaves it out: the style chosen with ``set_style`` applies."""

    def __repr__(self) -> str:
        return "DEFAULT_STYLE"


DEFAULT_STYLE = _DefaultStyle()


def _share_call_signature(flux_call: inspect.Signature) -> inspect.Signature:
    """``FluxPipeline.__call__``'s parameters unchanged, then keyword-only ``style`` and ``style_scale``.

    The two come after every FluxPipeline parameter (before a ``**kwargs``, should diffusers add one),
    so positional arguments bind exactly as they do on ``FluxPipeline``.
    """
    taken = sorted({"style", "style_scale"} & set(flux_call.parameters))
    if taken:
        raise TypeError(f"FluxPipeline.__call__ now takes {taken}; ShareFluxPipeline's own parameters need new names")
    share_parameters = [
        inspect.Parameter(
            "style", inspect.Parameter.KEYWORD_ONLY, default=DEFAULT_STYLE, annotation="StyleSpec | list[StyleSpec]"
        ),
        inspect.Parameter("style_scale", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="float | None"),
    ]
    parameters = list(flux_call.parameters.values())
    var_keyword = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    others = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return flux_call.replace(parameters=[*others, *share_parameters, *var_keyword])


class ShareFluxPipeline(FluxPipeline, ShareLoaderMixin):
    """``FluxPipeline`` plus :class:`ShareLoaderMixin`.

        pipe = ShareFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-schnell", dtype=torch.bfloat16)
        pipe.load_share_factors("someone/flux-share-styles")
        pipe.merge_lora("someone/spongebob-flux-lora", style_name="spongebob")
        images = pipe(prompt=["a castle", "a castle", "a cat"],
                      style=["spongebob", {"spongebob": 0.5, "airbrush": 0.5}, None]).images

    ``style``: None (the base model), a style name, a ``{name: weight}`` blend, or a list with one of
    those per prompt; ``style_scale`` multiplies every weight, and so does ``joint_attention_kwargs["scale"]``
    as it scales stock LoRAs. Omitted, the style chosen with
    :meth:`set_style` applies. All prompts are denoised in one batch whatever their styles; images
    of one prompt (``num_images_per_prompt``) and both branches of true CFG share its style.

    Without ``max_sequence_length`` the T5 prompt is padded to ``tokenizer_2.model_max_length`` when that
    is under FluxPipeline's 512: a small model trained on short prompts (the embedded demo model) sees
    the padding it was trained with (Flux attends to padding tokens too).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``FluxPipeline.from_pretrained``, taking ``dtype=`` or ``torch_dtype=`` on every diffusers we support
        (:func:`dtype_keyword`). A Hub model that cannot be fetched raises :class:`~share_diffusers.hub.HubError`
        saying why (no connection, no such repo, gated, offline) where diffusers' message points at a stack
        trace no one-line error shows."""
        from .hub import pipeline_hub_errors

        with pipeline_hub_errors(str(pretrained_model_name_or_path)):
            return super().from_pretrained(pretrained_model_name_or_path, **dtype_keyword(kwargs))

    @torch.no_grad()
    def __call__(self, *args, style=DEFAULT_STYLE, style_scale: float | None = None, **kwargs):
        # Bound against FluxPipeline's own signature: unknown or repeated arguments fail as they do there,
        # and what was given is known whether it came by position or by keyword.
        try:
            call = _FLUX_CALL.bind(self, *args, **kwargs)
        except TypeError as error:
            raise TypeError(f"{type(self).__name__}.__call__() {error}") from None
        given = call.arguments
        trained_length = getattr(self.tokenizer_2, "model_max_length", 512) if self.tokenizer_2 is not None else 512
        if "max_sequence_length" not in given and trained_length < 512:
            given["max_sequence_length"] = trained_length
        explicit = style is not DEFAULT_STYLE
        if not explicit:
            style = self._default_style
            style_scale = self._default_style_scale if style_scale is None else style_scale
        style_scale = 1.0 if style_scale is None else style_scale
        if style is None or self._share is None:
            if style is not None:
                self._require_share()  # raises: styles requested but none loaded
            if explicit and self._share is not None and self._share.selection.weights is not None:
                # style=None is the base model even inside `with pipe.share.styles(...)` or after its set_style
                with self._share.styles(None):
                    return super().__call__(*call.args[1:], **call.kwargs)
            return super().__call__(*call.args[1:], **call.kwargs)
        if given.get("prompt") is not None:
            prompt = given["prompt"]
            batch_size = 1 if isinstance(prompt, str) else len(prompt)
        elif given.get("prompt_embeds") is not None:
            batch_size = given["prompt_embeds"].shape[0]
        else:
            raise ValueError("give prompt or prompt_embeds")
        per_prompt = given.get("num_images_per_prompt") or 1
        style_scale = _times_lora_scale(style_scale, given.get("joint_attention_kwargs"))
        # Diffusers repeats each prompt's embeddings num_images_per_prompt times in place (p0 p0 p1 p1 ...).
        with self._share.styles(style, style_scale, batch_size=batch_size, repeat=per_prompt):
            return super().__call__(*call.args[1:], **call.kwargs)

    # What tools read (inspect.signature, help, diffusers' pipeline and LoRA test helpers): FluxPipeline's
    # parameters with their defaults, plus ``style`` and ``style_scale``. The body above does not copy
    # FluxPipeline's; it binds the arguments to that signature and passes them on.
    __call__.__signature__ = _share_call_signature(_FLUX_CALL)
    __call__.__doc__ = (
        inspect.cleandoc(
            """Generate images as ``FluxPipeline.__call__`` does, each prompt in its Share style.

            Every ``FluxPipeline.__call__`` parameter is accepted with the same default and in the same
            position (``pipe("a cat")`` works); two keyword-only parameters follow them:

            Args:
                style (`str`, `dict[str, float]`, `None` or a `list` of those, *optional*):
                    One style for every prompt or one per prompt: a style name, a ``{name: weight}``
                    blend, or None for the base model. Left out, the style chosen with ``set_style``
                    applies (None unless set).
                style_scale (`float`, *optional*):
                    Multiplies every style weight; defaults to the ``set_style`` scale when ``style`` is
                    left out, else 1.0. A ``"scale"`` in ``joint_attention_kwargs`` (stock diffusers' LoRA
                    strength) multiplies it too.

            Without ``max_sequence_length``, T5 prompts are padded to ``tokenizer_2.model_max_length``
            when that is under 512 (see the class docstring).

            FluxPipeline's documentation follows.
            """
        )
        + "\n\n"
        + inspect.cleandoc(FluxPipeline.__call__.__doc__ or "")
    )

    def to_json_string(self) -> str:
        """The pipeline's config as ``FluxPipeline`` writes it, so that ``save_pretrained`` leaves a folder stock
        diffusers loads: ``DiffusionPipeline.from_pretrained`` looks ``_class_name`` up in diffusers, which has no
        ``ShareFluxPipeline``. The folder holds the base model (with a fused style in its weights, if one is fused);
        the styles are saved apart, with :meth:`save_share_factors`."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = FluxPipeline.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def load_lora_weights(self, *args, **kwargs):
        """Stock diffusers LoRA loading; refused while Share layers are in the transformer."""
        if self._share is not None:
            raise ShareStateError(
                "this pipeline holds Share styles; merge the LoRA as a style with merge_lora(...), or call "
                "remove_share() before load_lora_weights(...)"
            )
        return super().load_lora_weights(*args, **kwargs)


def _times_lora_scale(style_scale, joint_attention_kwargs: dict | None):
    """``style_scale`` times ``joint_attention_kwargs["scale"]``: the LoRA strength stock diffusers reads there
    (its transformer scales every PEFT LoRA layer by it for the call), so a call written for stock LoRAs keeps
    its strength with Share styles."""
    if not joint_attention_kwargs or "scale" not in joint_attention_kwargs or not isinstance(style_scale, numbers.Real):
        return style_scale  # a style_scale that is no number is refused, as it is, by the style check
    lora_scale = joint_attention_kwargs["scale"]
    if isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real):
        raise StyleError(f"joint_attention_kwargs['scale'] (the LoRA strength) must be a number, got {lora_scale!r}")
    return style_scale * lora_scale


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
