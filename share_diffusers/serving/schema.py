"""The HTTP schema: OpenAI's ``POST /v1/images/generations`` plus the Share fields, and the error body.

A request is OpenAI's (``prompt``, ``n``, ``size`` as ``"WxH"``, ``response_format``) with ``style`` (a
style name, a ``{name: weight}`` blend, or null), ``style_scale``, ``seed``, ``num_inference_steps`` and
``guidance_scale``. A blend's weight is a number, or per block (:mod:`share_diffusers.core.block_weights`)
a ``{selector: number}`` object (``{"ink": {"double": 1, "single": 0.3}}``, ranges ``"double.0-9"``, ``"*"``)
or a list with one number per block (FLUX.1: 19 double then 38 single blocks, optionally after a BASE
value). The response is OpenAI's (``created``, ``data[i].b64_json``) plus a ``share`` object that says
how the images were made (the batch they were denoised in, the time queued and computing).

The ``openai`` Python client reaches it unchanged::

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    result = client.images.generate(prompt="a photo of a bag", size="32x32", response_format="b64_json",
                                    extra_body={"style": "tint", "seed": 7})
"""

from __future__ import annotations

import numbers
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

BlockWeightField = float | dict[str, float] | list[float]
"""A style's weight in a blend: a number, a ``{selector: number}`` object, or one number per block."""
StyleField = str | dict[str, BlockWeightField] | None

_STYLE_SHAPES = (
    'a style name, a {name: weight} blend (a weight is a number, {"double": 1, "single": 0.3} per block, '
    "or a list with one number per block), or null"
)

# Bounds on one request's style, far above any real use (FLUX.1 has 57 blocks): each style and block key
# is matched against every Share layer of the model, so their number is work a request asks for.
MAX_BLEND_STYLES = 16
"""Most styles in one ``{name: weight}`` blend."""
MAX_BLOCK_SELECTORS = 64
"""Most keys in one style's ``{selector: number}`` per-block weights."""
MAX_BLOCK_VALUES = 128
"""Most values in one style's block-weight list."""

RESPONSE_FORMATS = ("b64_json", "b64_npy")
"""``b64_json``: a base64 PNG (OpenAI's). ``b64_npy``: a base64 ``.npy`` float32 array ``(H, W, 3)`` in [0, 1],
the pipeline's output before PNG rounding, for clients that compare images exactly."""


class ImageRequest(BaseModel):
    """The body of ``POST /v1/images/generations``. Unknown fields are refused (a typo is not ignored),
    except OpenAI's ``model``, ``user`` and ``quality``, which are accepted and ignored: one model is served.
    Types are strict, as JSON writes them: ``"n": true`` or ``"n": "2"`` is refused, not read as 1 or 2
    (a number where a number is meant; an integer is a float)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=4000, description="what to draw")
    n: int | None = Field(default=1, ge=1, description="images to make (1 if null); image i uses seed + i")
    size: str | None = Field(default=None, description='"WxH" in pixels, or "auto"/null for the model\'s default')
    response_format: Literal["b64_json", "b64_npy", "url"] | None = Field(
        default="b64_json",
        description="b64_json (base64 PNG, also if null) or b64_npy (base64 float32 .npy); url is refused",
    )
    style: StyleField = Field(
        default=None,
        description="a style name, a {name: weight} blend, or null (base model); a weight is a number, or per block "
        '{"double": 1, "single": 0.3} (keys: layer-name prefixes, aliases double/single, ranges "double.0-9", '
        '"*" for the rest) or a list with one number per block',
    )
    style_scale: float | None = Field(default=1.0, description="overall strength multiplying every style weight")
    seed: int | None = Field(default=None, description="noise seed of the first image (random if null)")
    num_inference_steps: int | None = Field(default=None, description="denoising steps (model default if null)")
    guidance_scale: float | None = Field(default=None, description="guidance (model default if null)")
    # OpenAI fields that do not change anything here.
    model: str | None = None
    user: str | None = None
    quality: str | None = None

    @field_validator("n", "response_format", "style_scale")
    @classmethod
    def _null_is_default(cls, value, info: ValidationInfo):
        """OpenAI declares these nullable: null means the default (the rest of the server never sees None)."""
        return cls.model_fields[info.field_name].default if value is None else value

    @field_validator("style", mode="before")
    @classmethod
    def _style_shape(cls, style):
        """The shape of ``style`` with a message naming the entry at fault (pydantic's union errors name
        none); which styles and block keys exist the engine checks against the model."""
        if style is None or isinstance(style, str):
            return style
        if not isinstance(style, dict):
            raise _style_error(f"style must be {_STYLE_SHAPES}; got {_shown(style)}")
        if len(style) > MAX_BLEND_STYLES:
            raise _style_error(f"the blend has {len(style)} styles; at most {MAX_BLEND_STYLES}")
        for name, weight in style.items():
            if _is_number(weight):
                continue
            if isinstance(weight, dict):
                if not weight:
                    raise _style_error(
                        f'the per-block weights of style {name!r} are empty; give e.g. {{"double": 1, "single": 0.3}}'
                    )
                if len(weight) > MAX_BLOCK_SELECTORS:
                    raise _style_error(
                        f"the per-block weights of style {name!r} have {len(weight)} keys; at most "
                        f'{MAX_BLOCK_SELECTORS} (a range such as "double.0-9" counts once)'
                    )
                for key, value in weight.items():
                    if not _is_number(value):
                        raise _style_error(
                            f"block weight {key!r} of style {name!r} must be a number, got {_shown(value)}"
                        )
            elif isinstance(weight, list):
                if not weight:
                    raise _style_error(f"the block-weight list of style {name!r} is empty; give one number per block")
                if len(weight) > MAX_BLOCK_VALUES:
                    raise _style_error(
                        f"the block-weight list of style {name!r} has {len(weight)} values; at most {MAX_BLOCK_VALUES} "
                        "(one per block of the model)"
                    )
                for position, value in enumerate(weight, start=1):
                    if not _is_number(value):
                        raise _style_error(
                            f"value {position} of the block-weight list of style {name!r} must be a number, "
                            f"got {_shown(value)}"
                        )
            else:
                raise _style_error(
                    f"the weight of style {name!r} must be a number, a {{selector: number}} object such as "
                    f'{{"double": 1, "single": 0.3}}, or a list with one number per block; got {_shown(weight)}'
                )
        return style


class ImageData(BaseModel):
    b64_json: str | None = None
    b64_npy: str | None = None


class ShareInfo(BaseModel):
    """How the images of a response were made."""

    batch_size: int = Field(description="images in the denoising pass that made these (all requests together)")
    queue_ms: float = Field(description="time from arrival to the start of that pass")
    compute_ms: float = Field(description="time of the pipeline call")
    seed: int = Field(description="seed of the first image (image i used seed + i)")
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float


class ImageResponse(BaseModel):
    created: int
    data: list[ImageData]
    share: ShareInfo


class StyleEntry(BaseModel):
    name: str
    error: float = Field(description="relative Frobenius error of the style's weight update in the subspace")
    source: dict = Field(default_factory=dict, description="where the style came from (repo, file, revision)")


class StyleList(BaseModel):
    object: Literal["list"] = "list"
    data: list[StyleEntry]


class MergeRequest(BaseModel):
    """``POST /v1/styles`` with a JSON body: merge a LoRA from the Hub (an upload goes as multipart instead)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    hub_id: str = Field(min_length=3, description="Hub repo id of the LoRA, user/name")
    name: str | None = Field(default=None, description="the new style's name (default: the repo's name)")
    weight_name: str | None = Field(default=None, description="the .safetensors file in the repo, if it holds several")
    revision: str | None = Field(default=None, description="branch, tag or commit")


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _is_number(value) -> bool:
    """A JSON number a float holds (an integer literal of 400 digits is none: float() overflows)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _shown(value) -> str:
    """A JSON value for a message: short values as they are, long ones by their type."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


def _style_error(message: str) -> PydanticCustomError:
    # A custom error keeps the message as it is (a ValueError's reads "Value error, ..."); without a
    # context its braces are not formatted.
    return PydanticCustomError("style", message)
