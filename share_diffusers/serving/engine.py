"""``ServingEngine``: one ``ShareFluxPipeline``, request validation, and one pipeline call for a batch of requests.

The engine knows nothing of HTTP or queues. :meth:`ServingEngine.validate` turns a request into an
:class:`ImageJob` (or raises :class:`RequestError`, which the API answers with a 4xx) without touching the
pipeline, so it can run on the event loop while a batch computes. :meth:`ServingEngine.run` denoises any
number of compatible jobs (same :class:`BatchKey`) in one call, with one style and one generator per image,
so each image is the one its request alone would get with the same seed. Pipeline calls and bank changes
(merge, delete, load) hold one lock: a batch finishes with the bank it started with.
"""

from __future__ import annotations

import base64
import io
import itertools
import logging
import math
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..core.block_weights import BlockLayout, is_block_weight
from ..core.errors import StyleError
from ..core.factors import check_style_weight
from ..core.model import StyleSpec
from ..runtime import MAX_SEED, GenerationDefaults, call_arguments, defaults_for, load_pipeline, load_styles
from .schema import ImageRequest

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 512  # largest LoRA file that POST /v1/styles takes, uploaded or from the Hub (--max-upload-mb)
# ASCII digits only (str.isdigit takes "²", which int() refuses) and at most 5 of them (int() refuses
# thousands); the bounds check below gives the real limits.
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})", re.ASCII)


class RequestError(ValueError):
    """A request the server refuses before it reaches a batch (answered with ``status``, 400 by default).

    Attributes:
        param: the request field at fault (OpenAI's ``error.param``), or None.
        status: the HTTP status to answer with.
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to be denoised in one pipeline call."""

    width: int
    height: int
    steps: int
    guidance: float


@dataclass(frozen=True)
class ImageJob:
    """A validated request: ``n`` images of one prompt and one style, image ``i`` from seed ``seeds[i]``.

    ``style`` has the request's ``style_scale`` folded in (``"ink"`` at 0.5 is ``{"ink": 0.5}``, per-block
    weights scaled block by block: :func:`fold_scale`), so that jobs with different scales share a call: the
    weights the layers see are the same numbers either way.
    """

    prompt: str
    style: StyleSpec
    seeds: tuple[int, ...]
    key: BatchKey
    response_format: str = "b64_json"
    # (name, id) of each style named, as the bank held it at validation: a style deleted and merged again under
    # the same name while the job waited is another style (see ServingEngine._stale).
    style_ids: tuple[tuple[str, int], ...] = ()

    @property
    def n(self) -> int:
        return len(self.seeds)

    def style_names(self) -> set[str]:
        return _names_of(self.style)


def _names_of(style: StyleSpec) -> set[str]:
    if style is None:
        return set()
    return {style} if isinstance(style, str) else set(style)


@dataclass
class JobResult:
    """A job's images and how they were made.

    Attributes:
        images: ``(n, H, W, 3)`` float32 in [0, 1], the pipeline's ``output_type="np"``.
        batch_size: images in the pipeline call that made them.
        compute_s: seconds of that call.
    """

    images: np.ndarray
    batch_size: int
    compute_s: float


def fold_scale(style: StyleSpec, scale: float, layout: BlockLayout | None = None) -> StyleSpec:
    """``style`` at ``scale`` as one spec at scale 1 (the same weight numbers as the pipeline's ``style_scale``).

    A per-block mapping has each value scaled; a block vector (``layout``: the model's blocks) becomes the
    mapping it stands for with every value scaled, the weight of the layers outside the blocks too.
    """
    if style is None or scale == 1.0:
        return style
    if isinstance(style, str):
        return {style: float(scale)}
    folded: dict = {}
    for name, weight in style.items():
        if isinstance(weight, dict):
            folded[name] = {key: float(value) * float(scale) for key, value in weight.items()}
        elif isinstance(weight, list | tuple):
            if layout is None:
                raise StyleError(f"style {name!r} has a block vector, but the model has no Share blocks")
            folded[name] = layout.vector_as_mapping(name, weight, scale=float(scale))
        else:
            folded[name] = float(weight) * float(scale)
    return folded


def parse_size(size: str | None, defaults: GenerationDefaults) -> tuple[int, int]:
    """``(width, height)`` of ``"WxH"``; None or ``"auto"`` give the model's default size."""
    if size is None or size.strip().lower() == "auto":
        return defaults.width, defaults.height
    found = _SIZE.fullmatch(size.strip().lower())
    if found is None:
        raise RequestError(
            f"size must be 'WxH' in pixels, e.g. '{defaults.width}x{defaults.height}', got {_shown(size)}", "size"
        )
    width, height = int(found[1]), int(found[2])
    step, largest = defaults.size_step, defaults.max_size
    for side, value in (("width", width), ("height", height)):
        if not step <= value <= largest or value % step:
            raise RequestError(
                f"size {_shown(size)}: the {side} must be a multiple of {step} from {step} to {largest}, got {value}",
                "size",
            )
    return width, height


def _shown(text: str) -> str:
    """``text`` quoted for a message, cut short when long (a request may send thousands of characters)."""
    return repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"


def encode_images(images: np.ndarray, response_format: str) -> list[str]:
    """Base64 PNG (``b64_json``, rounded as diffusers' ``output_type="pil"``) or ``.npy`` (``b64_npy``) per image."""
    encoded = []
    for image in images:  # (H, W, 3)
        buffer = io.BytesIO()
        if response_format == "b64_npy":
            np.save(buffer, np.ascontiguousarray(image, dtype=np.float32))
        else:
            Image.fromarray((image * 255).round().astype("uint8")).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


class ServingEngine:
    """A ``ShareFluxPipeline`` behind validation and batched calls.

    Args:
        pipe: the pipeline, with its styles loaded.
        defaults: size, steps and guidance when a request gives none, and the size limits
            (:func:`share_diffusers.runtime.defaults_for`).
        max_images: most images one request may ask for (``n``).
        max_steps: most denoising steps a request may ask for.
        max_guidance: largest ``guidance_scale``.
    """

    def __init__(
        self,
        pipe,
        defaults: GenerationDefaults,
        max_images: int = 8,
        max_steps: int = 100,
        max_guidance: float = 30.0,
    ):
        self.pipe = pipe
        self.defaults = defaults
        self.max_images = max_images
        self.max_steps = max_steps
        self.max_guidance = max_guidance
        # Pipeline calls and bank changes; re-entrant so that a bank change may call helpers that lock.
        self.lock = threading.RLock()
        self._catalog: list[dict] = []
        self._names: frozenset[str] = frozenset()
        self._style_ids: dict[str, int] = {}  # a new id whenever a name comes into the bank
        self._next_id = itertools.count()
        self._layers: list[str] = []
        self._layout: BlockLayout | None = None
        self.refresh_catalog()

    @classmethod
    def from_model(
        cls,
        model: str | None = None,
        factors: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        demo_styles: bool | None = None,
        progress: bool = False,
        quantize: str | None = None,
        **limits,
    ) -> ServingEngine:
        """Load a pipeline and its styles as the command line and the studio do
        (:func:`share_diffusers.runtime.load_pipeline` / ``load_styles``), with the model's defaults."""
        pipe = load_pipeline(model, device, dtype, progress=progress, quantize=quantize)
        pipe.set_progress_bar_config(disable=True)
        load_styles(pipe, model, factors, demo_styles)
        return cls(pipe, defaults_for(pipe, model), **limits)

    # -- styles -------------------------------------------------------------------------------

    def refresh_catalog(self) -> None:
        """Snapshot the styles (names, errors, sources); call with the lock held after any bank change."""
        factors = self.pipe.share_factors
        catalog = []
        if factors is not None:
            for info in factors.styles:
                catalog.append(
                    {"name": info.name, "error": factors.style_error(info.name), "source": dict(info.source)}
                )
        self._catalog = catalog
        self._names = frozenset(entry["name"] for entry in catalog)
        # A name kept keeps its id (a whole checkpoint rolled out with the same names serves queued requests with
        # the new revision); a name that left the bank and came back gets a new one.
        self._style_ids = {
            name: self._style_ids[name] if name in self._style_ids else next(self._next_id) for name in self._names
        }
        # What per-block weights are checked against, off the pipeline (validation never waits for a batch).
        share = self.pipe.share
        self._layers = list(share.layers) if share is not None else []
        self._layout = share.block_layout if share is not None else None

    @property
    def style_names(self) -> list[str]:
        return [entry["name"] for entry in self._catalog]

    def styles(self) -> list[dict]:
        """``[{"name", "error", "source"}]`` of the bank as of the last change (never waits for a batch)."""
        return [dict(entry) for entry in self._catalog]

    def merge_lora(
        self,
        source: str,
        style_name: str | None = None,
        weight_name: str | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        provenance: dict | None = None,
    ):
        """Merge a LoRA (local ``.safetensors`` file or Hub id) as a new style; waits for the running batch.

        Args:
            provenance: recorded as the style's source instead of the file's path (an upload's temporary
                path means nothing later).

        Returns the pipeline's :class:`~share_diffusers.loader.MergeReport`.
        """
        with self.lock:
            try:
                report = self.pipe.merge_lora(
                    source,
                    weight_name=weight_name,
                    style_name=style_name,
                    revision=revision,
                    local_files_only=local_files_only,
                )
                if provenance is not None:
                    for info in self.pipe.share_factors.styles:
                        if info.name == report.style_name:
                            info.source = dict(provenance)
                    report.source = dict(provenance)
                return report
            finally:
                self.refresh_catalog()

    def delete_style(self, name: str) -> None:
        if name not in self._names:
            known = ", ".join(sorted(self._names)) or "none"
            raise RequestError(f"unknown style {_shown(name)}; styles held: {known}", "name", status=404)
        with self.lock:
            try:
                self.pipe.delete_style(name)
            finally:
                self.refresh_catalog()

    def load_share_factors(self, path_or_hub_id: str, revision: str | None = None) -> None:
        """Replace the whole bank with a Share checkpoint (folder or Hub id); waits for the running batch."""
        with self.lock:
            try:
                self.pipe.load_share_factors(path_or_hub_id, revision=revision)
            finally:
                self.refresh_catalog()

    # -- requests -----------------------------------------------------------------------------

    def validate(self, request: ImageRequest) -> ImageJob:
        """The job of a request, or :class:`RequestError` naming the field at fault. Reads no pipeline state."""
        defaults = self.defaults
        if request.response_format == "url":
            raise RequestError(
                "response_format 'url' is not served (no image store); use 'b64_json'", "response_format"
            )
        if not request.prompt.strip():
            raise RequestError("prompt must not be blank", "prompt")
        if request.n > self.max_images:
            raise RequestError(f"n must be from 1 to {self.max_images}, got {request.n}", "n")
        width, height = parse_size(request.size, defaults)
        steps = defaults.steps if request.num_inference_steps is None else request.num_inference_steps
        if not 1 <= steps <= self.max_steps:
            raise RequestError(
                f"num_inference_steps must be from 1 to {self.max_steps}, got {steps}", "num_inference_steps"
            )
        guidance = defaults.guidance if request.guidance_scale is None else float(request.guidance_scale)
        if not (math.isfinite(guidance) and 0.0 <= guidance <= self.max_guidance):
            raise RequestError(
                f"guidance_scale must be from 0 to {self.max_guidance}, got {guidance}", "guidance_scale"
            )
        work = request.n * steps * width * height
        if work > defaults.max_work:  # the studio's limit too: one request must not hold the pipeline for minutes
            raise RequestError(
                f"too much work for one request: n={request.n} x {steps} steps x {width}x{height} pixels = "
                f"{work:,} pixel-steps, over this model's limit of {defaults.max_work:,}; ask for fewer images or "
                "steps or a smaller size",
                None,
            )
        style = self._check_style(request.style, request.style_scale)
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED - self.max_images)
        if not 0 <= seed <= MAX_SEED:
            raise RequestError(f"seed must be from 0 to {MAX_SEED}, got {seed}", "seed")
        if seed + request.n - 1 > MAX_SEED:  # image i uses seed + i, a seed no single request may ask for
            raise RequestError(
                f"seed + n - 1 must be at most {MAX_SEED} (image i uses seed + i), got seed {seed} and n {request.n}",
                "seed",
            )
        style_ids = self._style_ids
        return ImageJob(
            prompt=request.prompt,
            style=style,
            seeds=tuple(seed + index for index in range(request.n)),
            key=BatchKey(width, height, steps, guidance),
            # -1: deleted since _check_style (a bank change on another thread); _stale then refuses the job.
            style_ids=tuple(sorted((name, style_ids.get(name, -1)) for name in _names_of(style))),
            response_format=request.response_format,
        )

    def _check_style(self, style, scale: float) -> StyleSpec:
        """The request's style with its scale folded in, checked as the pipeline would check it (names,
        block keys against the model's blocks, weight limits), so that a bad one never reaches a batch."""
        if not math.isfinite(scale):
            raise RequestError(f"style_scale must be a finite number, got {scale}", "style_scale")
        if style is None:
            return None
        known = ", ".join(repr(name) for name in self.style_names) or "none"
        if isinstance(style, str):
            names = {style: 1.0}
        else:
            if not style:
                raise RequestError("style is an empty blend; give {name: weight, ...} or null for none", "style")
            names = style
        for name, weight in names.items():
            if name not in self._names:
                raise RequestError(f"unknown style {_shown(name)}; styles held: {known}", "style")
            try:
                if is_block_weight(weight):
                    if self._layout is None:
                        raise StyleError(f"style {name!r} has per-block weights, but no Share layers are loaded")
                    for value in set(self._layout.multipliers(name, weight, self._layers)):
                        check_style_weight(name, value, scale)
                else:
                    check_style_weight(name, weight, scale)
            except StyleError as error:
                raise RequestError(str(error), "style") from None
        return fold_scale(style, scale, self._layout)

    def run(self, jobs: Sequence[ImageJob]) -> list[JobResult | Exception]:
        """Denoise every job's images in one pipeline call; one result (or exception) per job.

        All jobs must have the same :attr:`ImageJob.key`. A job that the bank held now refuses (its style
        was deleted, or the bank was replaced and its per-block weights name layers it no longer has) gets
        a :class:`RequestError` (409); the others still run. If the call raises anyway, each job is run
        again on its own, so that only the job at fault fails.
        """
        keys = {job.key for job in jobs}
        if len(keys) != 1:
            raise ValueError(f"one pipeline call needs one size, step count and guidance; got {sorted(keys, key=str)}")
        key = keys.pop()
        with self.lock:
            outcomes: list[JobResult | Exception | None] = [None] * len(jobs)
            runnable = []
            for index, job in enumerate(jobs):
                outcomes[index] = self._stale(job)
                if outcomes[index] is None:
                    runnable.append(index)
            if runnable:
                results = self._call_each_failure_alone([jobs[index] for index in runnable], key)
                for index, result in zip(runnable, results, strict=True):
                    outcomes[index] = result
        return outcomes

    def _stale(self, job: ImageJob) -> RequestError | None:
        """Why ``job`` cannot run with the bank held now (409), or None; call with the lock held.

        ``job`` was validated against the bank of its arrival; a bank change since (a delete, a merge, a
        whole checkpoint loaded by a Ray rollout) may have dropped its style or the layers its per-block
        weights name, and the pipeline would then fail the whole call for it.
        """
        gone = sorted(job.style_names() - self._names)
        if gone:
            return RequestError(f"style {_shown(gone[0])} was deleted while the request waited", "style", 409)
        replaced = [name for name, style_id in job.style_ids if self._style_ids.get(name) != style_id]
        if replaced:
            return RequestError(
                f"style {_shown(replaced[0])} was deleted and merged again while the request waited: another LoRA "
                "under the same name; send the request again to use it",
                "style",
                409,
            )
        try:
            self._check_style(job.style, 1.0)  # the job's style has its scale folded in already
        except RequestError as error:
            return RequestError(f"the styles changed while the request waited: {error}", "style", 409)
        return None

    def _call_each_failure_alone(self, jobs: Sequence[ImageJob], key: BatchKey) -> list[JobResult | Exception]:
        """:meth:`_call` for all ``jobs``; if it raises, each job in a call of its own, one outcome per job.

        A failure nothing checked for must not fail every request of the batch (with another user's
        style in its message).
        """
        try:
            return self._call(jobs, key)
        except Exception as error:
            logger.exception("pipeline call of %d jobs failed", len(jobs))
            if len(jobs) == 1:
                return [error]
        outcomes: list[JobResult | Exception] = []
        for job in jobs:
            try:
                outcomes.extend(self._call([job], key))
            except Exception as error:
                logger.exception("pipeline call of one job (%d images) failed", job.n)
                outcomes.append(error)
        return outcomes

    def _call(self, jobs: Sequence[ImageJob], key: BatchKey) -> list[JobResult]:
        prompts = [job.prompt for job in jobs for _ in job.seeds]
        styles = [job.style for job in jobs for _ in job.seeds]
        # One CPU generator per image: the same noise whatever else is in the batch (and on any device).
        generators = [torch.Generator().manual_seed(seed) for job in jobs for seed in job.seeds]
        # All-None goes in as None: the base path, and a pipeline without styles refuses any style list.
        style = None if all(spec is None for spec in styles) else styles
        arguments = call_arguments(
            self.pipe,
            self.defaults,
            len(prompts),
            steps=key.steps,
            width=key.width,
            height=key.height,
            guidance=key.guidance,
        )
        start = time.perf_counter()
        images = self.pipe(prompt=prompts, style=style, generator=generators, output_type="np", **arguments).images
        compute_s = time.perf_counter() - start
        images = np.asarray(images, dtype=np.float32)  # (B, H, W, 3)
        results, offset = [], 0
        for job in jobs:
            results.append(JobResult(images[offset : offset + job.n], len(prompts), compute_s))
            offset += job.n
        return results
