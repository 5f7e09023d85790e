"""The serving app on Ray Serve: replicas that each hold the model and the whole Share checkpoint.

Every replica serves every style (one checkpoint holds them all), so the router may send any request to
any replica: no per-LoRA routing, multiplexing or cache misses. Each replica batches the requests it gets
with ``@serve.batch`` (up to ``max_batch`` images of one size, step count and guidance in one pipeline
call) and answers the same HTTP schema as ``share-diffusers serve`` (:mod:`share_diffusers.serving.api`).

    from ray import serve
    from share_diffusers.serving.ray_app import build_app

    # One replica per GPU, on as many GPUs (and nodes) as the cluster has:
    serve.run(build_app(model="black-forest-labs/FLUX.1-schnell", factors="me/my-styles",
                        num_replicas=4, ray_actor_options={"num_gpus": 1}, dtype="bfloat16"))

or ``serve run share_diffusers.serving.ray_app:app`` (the demo model, one replica), or
``serve run share_diffusers.serving.ray_app:app_builder num_replicas=2 num_gpus=1``.

Rolling a new checkpoint revision out to every replica: the checkpoint is the deployment's ``user_config``
(``{"factors": ..., "revision": ...}``). Deployed from a config file (:func:`serve_config`, ``serve deploy``),
a new ``user_config`` reaches the running replicas in place: each loads the new bank between two batches
(:meth:`ShareFluxDeployment.reconfigure`), requests keep queueing meanwhile, and the model is not loaded
again. ``serve.run(build_app(..., revision="v2"))`` from Python rolls it out too, by replacing the replicas.
A Hub checkpoint's revision (a branch, a tag, or none: ``main``) is resolved to its commit when the app or
config is built, so every replica, including one started later, loads the same bank.

Styles are managed by rolling checkpoints, not per replica: ``POST``/``DELETE /v1/styles`` answer 403 here
(a merge on one replica would leave the others behind). ``/metrics`` and ``/healthz`` describe the replica
that answered (``replica`` and ``checkpoint`` in the health body); Ray's own metrics cover the cluster.
Requests beyond ``max_queued_requests`` waiting at the router get Ray's 503.

Serve's HTTP proxy listens on 127.0.0.1:8000, this machine only, from Python (``serve.run``) and with
``serve run module:app``. A config file is different: Ray's config schema binds every interface (0.0.0.0)
when the file says no host, so :func:`serve_config` writes ``http_options`` with ``host="127.0.0.1"``
unless told otherwise (``host="0.0.0.0"`` to serve the network, behind a proxy that authenticates).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import serve

from ..runtime import USER_ERRORS, error_line
from .api import create_app
from .batcher import BatchedResult
from .engine import ImageJob, JobResult, ServingEngine
from .metrics import ServeMetrics

logger = logging.getLogger(__name__)

_ADMIN_OFF = (
    "style management is off on Ray Serve; roll a new checkpoint revision out to every replica with "
    "build_app(factors=..., revision=...) or the deployment's user_config"
)


_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(eq=False)
class _Queued:
    job: ImageJob
    arrived: float = field(default_factory=time.perf_counter)


def _images_in(items: list[_Queued]) -> int:
    """``@serve.batch`` counts images, not requests: a request of ``n`` images takes ``n`` of ``max_batch``."""
    return sum(item.job.n for item in items)


@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
@serve.ingress()
class ShareFluxDeployment:
    """One replica: the pipeline, its Share checkpoint, a ``@serve.batch`` queue, and the HTTP app.

    Args:
        model, device, dtype, demo_styles, quantize: as ``share-diffusers serve``
            (:func:`share_diffusers.runtime.load_pipeline`).
        max_batch: most images in one pipeline call.
        max_wait_ms: longest the first request of a batch waits for others.

    The checkpoint comes from :meth:`reconfigure` (the deployment's ``user_config``).
    """

    def __init__(
        self,
        model: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        demo_styles: bool | None = None,
        max_batch: int = 8,
        max_wait_ms: float = 20.0,
        quantize: str | None = None,
    ):
        self.model = model
        self.demo_styles = demo_styles
        self.engine = ServingEngine.from_model(
            model, None, device, dtype, demo_styles=False, quantize=quantize, max_images=max_batch
        )
        self.metrics = ServeMetrics()
        self.checkpoint: tuple[str | None, str | None] | None = None  # (factors, revision) loaded
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="share-pipeline")
        self._waiting = 0
        self._batch.set_max_batch_size(max_batch)
        self._batch.set_batch_wait_timeout_s(max_wait_ms / 1e3)

    def __serve_build_asgi_app__(self):
        return create_app(
            self.engine, self, metrics=self.metrics, admin_off_message=_ADMIN_OFF, health_extra=self._health
        )

    def _health(self) -> dict:
        factors, revision = self.checkpoint or (None, None)
        return {"replica": self.replica(), "checkpoint": {"factors": factors, "revision": revision}}

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the checkpoint ``{"factors": folder or Hub id, "revision": ...}`` (None: the model's demo styles).

        Runs between two batches; requests keep queueing meanwhile. Unchanged config: nothing to do.
        """
        wanted = (user_config.get("factors"), user_config.get("revision"))
        if wanted == self.checkpoint:
            return
        try:
            await self.run_exclusive(self._load_checkpoint, *wanted)
        except USER_ERRORS as error:
            if self.checkpoint is None:
                raise  # a replica that holds no bank yet cannot serve
            # Raising would make Ray stop this replica (and start others that fail alike): an outage for a
            # typo. The engine kept the bank it held; the replica goes on serving it and says why in its log.
            logger.error(
                "kept styles %s: checkpoint %s (revision %s) did not load: %s",
                self.checkpoint,
                *wanted,
                error_line(error),
            )
            return
        self.checkpoint = wanted
        logger.info("replica holds styles %s (factors %s, revision %s)", self.engine.style_names, *wanted)

    def _load_checkpoint(self, factors: str | None, revision: str | None) -> None:
        if factors:
            self.engine.load_share_factors(factors, revision)
            return
        from ..runtime import load_styles

        with self.engine.lock:
            self.engine.pipe.remove_share()
            load_styles(self.engine.pipe, self.model, None, self.demo_styles)
            self.engine.refresh_catalog()

    # -- the Backend of create_app --------------------------------------------------------------

    @property
    def queued_images(self) -> int:
        return self._waiting

    async def start(self) -> None:  # the replica lives as long as its app
        pass

    async def stop(self) -> None:
        self._executor.shutdown(wait=False)

    async def run_exclusive(self, function, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))

    async def submit(self, job: ImageJob) -> BatchedResult:
        self._waiting += job.n
        self.metrics.queued_images.set(self._waiting)
        try:
            outcome = await self._batch(_Queued(job))
        finally:
            self._waiting -= job.n
            self.metrics.queued_images.set(self._waiting)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_images_in)
    async def _batch(self, items: list[_Queued]) -> list[BatchedResult | Exception]:
        """One pipeline call per (size, steps, guidance) among the gathered requests; usually one."""
        loop = asyncio.get_running_loop()
        groups: dict[Any, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.job.key, []).append(index)
        results: list[BatchedResult | Exception | None] = [None] * len(items)
        for indices in groups.values():
            start = time.perf_counter()
            outcomes = await loop.run_in_executor(self._executor, self.engine.run, [items[i].job for i in indices])
            computed = [outcome for outcome in outcomes if isinstance(outcome, JobResult)]
            if computed:
                self.metrics.batch_size.observe(computed[0].batch_size)
                self.metrics.compute_seconds.observe(computed[0].compute_s)
            for index, outcome in zip(indices, outcomes, strict=True):
                queue_s = start - items[index].arrived
                self.metrics.queue_seconds.observe(queue_s)
                results[index] = BatchedResult(outcome, queue_s) if isinstance(outcome, JobResult) else outcome
        return results

    def replica(self) -> str:
        try:
            context = serve.get_replica_context()
            return str(getattr(context.replica_id, "unique_id", context.replica_id))
        except Exception:
            return "unknown"


def pinned_revision(factors: str | None, revision: str | None) -> str | None:
    """The commit that ``revision`` of the Hub checkpoint ``factors`` points at now.

    Each replica loads the checkpoint itself, maybe hours after another (a restart, a scale-up): a branch
    resolved there could give replicas different banks. A local folder, no ``factors`` or a commit
    already are returned as they are.

    Raises:
        HubError: the Hub does not know the repo or revision, or cannot be reached (give a commit then).
    """
    if not factors or (revision is not None and _COMMIT.fullmatch(revision)) or not _is_hub_id(factors):
        return revision
    from huggingface_hub import HfApi

    from ..hub import HubError

    try:
        return HfApi().model_info(factors, revision=revision).sha
    except Exception as error:
        raise HubError(
            f"could not resolve revision {revision or 'main'!r} of the Hub checkpoint {factors!r} to a commit "
            f"({type(error).__name__}: {error_line(error)}); check the repo id and revision, or give "
            "the commit sha as revision"
        ) from None


def checked_checkpoint(factors: str | None, revision: str | None) -> str | None:
    """The ``user_config`` revision of ``factors`` (:func:`pinned_revision`), after checking that a local folder
    holds a checkpoint that loads: a rollout to a missing or half-written folder stopped every replica (each
    failed to load it) until the previous config was deployed again.

    Raises:
        ShareCheckpointError / HubError / ValueError: naming the folder or repo and what is wrong.
    """
    if factors and not _is_hub_id(factors):
        from ..core import load_factors

        if not Path(factors).is_dir():
            raise ValueError(f"factors {factors!r} is neither a local Share checkpoint folder nor a Hub repo id")
        load_factors(factors)  # every replica will load it: a broken folder fails here, before any is touched
    return pinned_revision(factors, revision)


def _is_hub_id(factors: str) -> bool:
    """``user/name`` and no local folder of that name (as :func:`share_diffusers.hub.resolve_share_factors` tells)."""
    return not Path(factors).is_dir() and factors.count("/") == 1 and not factors.startswith(("/", "."))


def build_app(
    model: str | None = None,
    factors: str | None = None,
    revision: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    demo_styles: bool | None = None,
    quantize: str | None = None,
    num_replicas: int = 1,
    ray_actor_options: dict | None = None,
    max_batch: int = 8,
    max_wait_ms: float = 20.0,
    max_ongoing_requests: int | None = None,
    max_queued_requests: int = 64,
    name: str = "ShareFlux",
):
    """The bound deployment for ``serve.run``.

    Args:
        model: Flux repo id or folder; None for the embedded demo model; ``"tiny-random"`` for tests.
        factors, revision: the Share checkpoint (folder or Hub id, and its Hub revision, resolved to a
            commit here: :func:`pinned_revision`) every replica holds (the deployment's ``user_config``);
            None for the model's demo styles. ``serve.run`` again
            with another ``factors`` or ``revision`` replaces the replicas one by one (each loads the model
            again); a config file (:func:`serve_config`) changes it in place instead.
        device, dtype: per replica (``cuda`` takes the GPU Ray assigned to it).
        demo_styles: start with the demo styles when no ``factors`` (default: yes).
        quantize: each replica's transformer quantized (``int8``, ``float8``, ``nf4`` or a ``.gguf`` file
            every node can read; :mod:`share_diffusers.quantization`).
        num_replicas: replicas; each needs the whole model (one per GPU on a multi-GPU or multi-node cluster).
        ray_actor_options: each replica's resources: ``{"num_gpus": 1}`` for one GPU each (default
            ``{"num_cpus": 1}``).
        max_batch, max_wait_ms: images per pipeline call, and how long a batch waits to fill.
        max_ongoing_requests: requests a replica takes at once (default ``4 * max_batch``, so that a
            batch can fill while the previous one computes).
        max_queued_requests: requests waiting at the router beyond that; more get HTTP 503.
    """
    check_batching(max_batch, max_wait_ms)
    replica_args = dict(
        model=model,
        device=device,
        dtype=dtype,
        demo_styles=demo_styles,
        quantize=quantize,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
    )
    deployment = ShareFluxDeployment.options(
        name=name,
        num_replicas=num_replicas,
        ray_actor_options=ray_actor_options or {"num_cpus": 1},
        max_ongoing_requests=max_ongoing_requests or 4 * max_batch,
        max_queued_requests=max_queued_requests,
        user_config={"factors": factors, "revision": checked_checkpoint(factors, revision)},
    )
    return deployment.bind(**replica_args)


def check_batching(max_batch: int, max_wait_ms: float) -> None:
    """Refuse what Ray would take (a negative wait) or refuse in its own words (max_ongoing_requests -8 for a
    max_batch of -2), naming our arguments."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a whole number of at least 1, got {max_batch!r}")
    if not (isinstance(max_wait_ms, int | float) and math.isfinite(max_wait_ms) and max_wait_ms >= 0):
        raise ValueError(f"max_wait_ms must be a finite number of at least 0, got {max_wait_ms!r}")


_INTEGER_ARGS = ("num_replicas", "max_batch", "max_ongoing_requests", "max_queued_requests")


def app_builder(args: dict[str, Any]):
    """:func:`build_app` from a config file's ``args`` or ``serve run ...:app_builder key=value`` (strings
    converted; ``num_gpus=1`` sets ``ray_actor_options``)."""
    kwargs: dict[str, Any] = dict(args)
    for key in _INTEGER_ARGS:
        if key in kwargs:
            kwargs[key] = int(kwargs[key])
    if "max_wait_ms" in kwargs:
        kwargs["max_wait_ms"] = float(kwargs["max_wait_ms"])
    if "demo_styles" in kwargs:
        kwargs["demo_styles"] = str(kwargs["demo_styles"]).lower() in ("1", "true", "yes")
    if "num_gpus" in kwargs:
        kwargs["ray_actor_options"] = {"num_gpus": float(kwargs.pop("num_gpus"))}
    return build_app(**kwargs)


def serve_config(
    model: str | None = None,
    factors: str | None = None,
    revision: str | None = None,
    *,
    num_replicas: int = 1,
    ray_actor_options: dict | None = None,
    app_name: str = "share",
    route_prefix: str = "/",
    name: str = "ShareFlux",
    host: str = "127.0.0.1",
    port: int = 8000,
    **replica_args,
) -> dict:
    """A Ray Serve config (``serve deploy`` / ``serve run`` file, JSON being YAML) for the app.

    The checkpoint is the deployment's ``user_config`` (a Hub revision resolved to its commit:
    :func:`pinned_revision`): deploy the same config with another ``factors`` or ``revision`` and every
    running replica loads it in place, between two batches, without loading the model again (Ray's
    lightweight update). Anything under ``args`` (the model, ``max_batch``...) restarts the replicas.
    ``host`` and ``port`` are where Serve's HTTP proxy listens (``http_options``, read when Serve starts):
    this machine only by default, where a config without them would bind 0.0.0.0. Other arguments as
    :func:`build_app`::

        python -c "import json; from share_diffusers.serving.ray_app import serve_config; print(json.dumps(
            serve_config('black-forest-labs/FLUX.1-schnell', 'me/my-styles', 'v2', num_replicas=4,
                         ray_actor_options={'num_gpus': 1}, dtype='bfloat16')))" > share.yaml
        serve deploy share.yaml
    """
    check_batching(replica_args.get("max_batch", 8), replica_args.get("max_wait_ms", 20.0))
    args = {key: value for key, value in dict(model=model, **replica_args).items() if value is not None}
    return {
        "http_options": {"host": host, "port": port},
        "applications": [
            {
                "name": app_name,
                "route_prefix": route_prefix,
                "import_path": f"{__name__}:app_builder",
                "args": {**args, "name": name},
                "deployments": [
                    {
                        "name": name,
                        "num_replicas": num_replicas,
                        "ray_actor_options": ray_actor_options or {"num_cpus": 1},
                        "user_config": {"factors": factors, "revision": checked_checkpoint(factors, revision)},
                    }
                ],
            }
        ],
    }


app = build_app()
"""The demo model with its styles, one replica: ``serve run share_diffusers.serving.ray_app:app``."""
