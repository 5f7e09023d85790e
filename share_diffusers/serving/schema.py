"""The HTTP schema: OpenAI's ``POST /v1/images/generations`` plus the Share fields, and the error body.

A request is OpenAI's (``prompt``, ``n``, ``size`` as ``"WxH"``, ``response_format``) with ``style`` (a
style name, a ``{name: weight}`` blend, or null), ``style_scale``, ``seed``, ``num_inference_steps`` and
``guidance_scale``. The response is OpenAI's (``created``, ``data[i].b64_json``) plus a ``share`` object
that says how the images were made (the batch they were denoised in, the time queued and computing).

The ``openai`` Python client reaches it unchanged::

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    result = client.images.generate(prompt="a photo of a bag", size="32x32", response_format="b64_json",
                                    extra_body={"style": "tint", "seed": 7})
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

StyleField = str | dict[str, float] | None

RESPONSE_FORMATS = ("b64_json", "b64_npy")
"""``b64_json``: a base64 PNG (OpenAI's). ``b64_npy``: a base64 ``.npy`` float32 array ``(H, W, 3)`` in [0, 1],
the pipeline's output before PNG rounding, for clients that compare images exactly."""


class ImageRequest(BaseModel):
    """The body of ``POST /v1/images/generations``. Unknown fields are refused (a typo is not ignored),
    except OpenAI's ``model``, ``user`` and ``quality``, which are accepted and ignored: one model is served."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000, description="what to draw")
    n: int = Field(default=1, ge=1, description="images to make; image i uses seed + i")
    size: str | None = Field(default=None, description='"WxH" in pixels, or "auto"/null for the model\'s default')
    response_format: Literal["b64_json", "b64_npy", "url"] = Field(
        default="b64_json", description="b64_json (base64 PNG) or b64_npy (base64 float32 .npy); url is refused"
    )
    style: StyleField = Field(default=None, description="a style name, a {name: weight} blend, or null (base model)")
    style_scale: float = Field(default=1.0, description="overall strength multiplying every style weight")
    seed: int | None = Field(default=None, description="noise seed of the first image (random if null)")
    num_inference_steps: int | None = Field(default=None, description="denoising steps (model default if null)")
    guidance_scale: float | None = Field(default=None, description="guidance (model default if null)")
    # OpenAI fields that do not change anything here.
    model: str | None = None
    user: str | None = None
    quality: str | None = None


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

    model_config = ConfigDict(extra="forbid")

    hub_id: str = Field(min_length=3, description="Hub repo id of the LoRA, user/name")
    name: str | None = Field(default=None, description="the new style's name (default: the repo's name)")
    weight_name: str | None = Field(default=None, description="the .safetensors file in the repo, if it holds several")
    revision: str | None = Field(default=None, description="branch, tag or commit")


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
