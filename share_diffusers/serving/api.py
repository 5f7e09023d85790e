"""The FastAPI app: OpenAI's image endpoint with per-request styles, style listing and management, health, metrics.

    POST   /v1/images/generations   one request = one prompt, n images, one style; batched with others
    GET    /v1/styles               the styles held (name, reconstruction error, source)
    POST   /v1/styles               admin: merge a LoRA (JSON {"hub_id", "name"} or a multipart .safetensors upload)
    DELETE /v1/styles/{name}        admin: delete a style
    GET    /healthz                 liveness, queue depth, styles
    GET    /metrics                 Prometheus text

Every error is OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field
(naming it in ``param``), 401/403 for admin calls without the token, 404 for an unknown style to delete,
409 when a request's style left the bank while it waited, 413 for a body over ``max_body_kib`` (256 KiB)
or a LoRA file (uploaded or on the Hub) over ``max_upload_mb``, 503 when the queue is full (with ``Retry-After``).

:func:`create_app` takes the engine and a backend that queues jobs: the :class:`DynamicBatcher` of one
machine, or a Ray Serve replica (:mod:`share_diffusers.serving.ray_app`), which serve the same schema.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..core.errors import ShareError
from ..lora_files import PICKLE_SUFFIXES
from ..runtime import error_line
from .batcher import BatchedResult, DynamicBatcher, QueueFullError
from .engine import DEFAULT_MAX_UPLOAD_MB, ImageJob, RequestError, ServingEngine, encode_images
from .metrics import ServeMetrics
from .schema import ImageRequest, MergeRequest, error_body

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_KIB = 256
"""Largest JSON body (``POST /v1/images/generations``, ``POST /v1/styles`` from the Hub): the longest prompt and
the largest style blend the schema takes are a few dozen KiB; a bigger body would only keep the event loop
parsing JSON while health checks and other requests wait."""
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
_GENERIC_FILE_NAMES = ("pytorch_lora_weights", "adapter_model")
_ADMIN_OFF = "style management is off; start the server with --admin-token (or SHARE_ADMIN_TOKEN) to turn it on"


class Backend(Protocol):
    """What the app needs to queue jobs: a :class:`DynamicBatcher`, or a Ray Serve replica."""

    queued_images: int

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, job: ImageJob) -> BatchedResult: ...

    async def run_exclusive(self, function, *args, **kwargs) -> Any: ...


class _ClientGone(Exception):
    pass


async def _until_disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body is read already, so only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, awaitable):
    """``await awaitable``, cancelling it if the client goes away first (then :class:`_ClientGone`)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()  # the job leaves the queue (or its images are dropped)
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise _ClientGone
    return task.result()


def _is_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header's length (8 bytes, little-endian), then ``{``."""
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_length <= size - 8


def bearer_matches(authorization: str, token: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>``; an empty bearer value never matches."""
    scheme, _, given = authorization.partition(" ")
    given = given.strip()
    return scheme.lower() == "bearer" and bool(given) and hmac.compare_digest(given.encode(), token.encode())


def _check_admin_token(token: str | None) -> None:
    """Refuse a token no client can send: ``--admin-token "$TOKEN"`` with TOKEN unset gives ``""``, which an
    empty ``Authorization: Bearer`` header would match."""
    if token is None:
        return
    if not token.strip():
        raise ValueError(
            "admin_token is empty: give a secret token to turn style management on, or None to leave it off"
        )
    if token != token.strip():
        raise ValueError(
            "admin_token starts or ends with whitespace, which no Authorization header can carry; strip it"
        )


def _route_path(scope) -> str:
    """The request's path below the app's mount point (a Ray Serve ``route_prefix``, say)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _content_length(scope) -> int | None:
    """The declared body size in bytes; None when the header is missing or no number."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit():
            return int(value) if len(value) <= 20 else 2**64  # int() refuses thousands of digits
    return None


class _BodyLimit:
    """ASGI middleware: a JSON body over ``limit`` bytes is refused (``refuse(endpoint, message)``, a 413)
    before anything reads or parses it.

    A declared ``Content-Length`` over the limit is refused unread; a body without one (chunked) is read
    until it passes the limit. Only the endpoints that read a body are watched; a style upload (multipart
    ``POST /v1/styles``) has its own limit (``max_upload_mb``).
    """

    watched = ("/v1/images/generations", "/v1/styles")

    def __init__(self, app, limit: int, refuse: Callable[[str, str], Response]):
        self.app, self.limit, self.refuse = app, limit, refuse

    async def __call__(self, scope, receive, send) -> None:
        endpoint = _route_path(scope) if scope["type"] == "http" else None
        if endpoint not in self.watched or (endpoint == "/v1/styles" and _is_multipart(scope)):
            await self.app(scope, receive, send)
            return
        limit = f"{self.limit} bytes ({self.limit / 1024:g} KiB)"
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            refusal = self.refuse(endpoint, f"the request body is {declared} bytes; the limit is {limit}")
            await refusal(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            event = await receive()
            if event["type"] != "http.request":  # the client left: nobody to answer
                return
            chunks.append(event.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self.refuse(endpoint, f"the request body is over the limit of {limit}")(scope, receive, send)
                return
            if not event.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _is_multipart(scope) -> bool:
    return any(name == b"content-type" and value.startswith(b"multipart/") for name, value in scope["headers"])


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that gives ``body`` once, then what ``receive`` gives (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def create_app(
    engine: ServingEngine,
    backend: Backend | None = None,
    *,
    max_batch: int = 8,
    max_wait_ms: float = 20.0,
    max_queue: int = 64,
    admin_token: str | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    max_body_kib: float = DEFAULT_MAX_BODY_KIB,
    metrics: ServeMetrics | None = None,
    admin_off_message: str = _ADMIN_OFF,
    health_extra: Callable[[], dict] | None = None,
) -> FastAPI:
    """The serving app.

    Args:
        engine: the pipeline and its validation (:class:`ServingEngine`).
        backend: queues jobs; default a :class:`DynamicBatcher` over ``engine`` with ``max_batch``,
            ``max_wait_ms`` and ``max_queue``, started and stopped with the app.
        admin_token: bearer token of ``POST /v1/styles`` and ``DELETE /v1/styles/{name}``; None turns
            them off (403). An empty or blank one raises ValueError (an empty bearer would match it).
        max_upload_mb: largest LoRA file merged, uploaded or from the Hub (checked before downloading).
        max_body_kib: largest JSON body; a bigger one gets 413 before it is parsed.
        metrics: where counts go (a fresh registry by default); the backend should share it.
        admin_off_message: the 403 message while admin calls are off.
        health_extra: more fields for ``GET /healthz`` (a Ray replica's id and checkpoint).
    """
    _check_admin_token(admin_token)
    metrics = metrics or getattr(backend, "metrics", None) or ServeMetrics()
    if backend is None:
        backend = DynamicBatcher(engine, max_batch, max_wait_ms, max_queue, metrics=metrics)
    max_upload_bytes = int(max_upload_mb * 2**20)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        try:
            yield
        finally:
            await backend.stop()

    app = FastAPI(
        title="share-diffusers",
        summary="Flux with Share styles: every request its own style, denoised together in one batch",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.backend = backend
    app.state.metrics = metrics

    def answer(endpoint: str, status: int, content: Any, headers: dict | None = None) -> JSONResponse:
        metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(content, status_code=status, headers=headers)

    def failure(endpoint: str, status: int, message: str, reason: str, param: str | None = None, **kwargs):
        metrics.errors.labels(reason).inc()
        kind = "invalid_request_error" if status < 500 else "server_error"
        return answer(endpoint, status, error_body(message, kind, param, reason), **kwargs)

    app.add_middleware(
        _BodyLimit,
        limit=int(max_body_kib * 1024),
        refuse=lambda endpoint, message: failure(endpoint, 413, message, "too_large"),
    )

    def endpoint_of(request: Request) -> str:
        # Not the path itself when no route matched: every path a scanner tries would be a metrics label.
        return getattr(request.scope.get("route"), "path", "(no route)")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        # Starlette's own refusals (a body it cannot parse as JSON or multipart, an unknown path or method) in the
        # same error body and metrics as ours, instead of FastAPI's {"detail": ...}.
        reason = {400: "validation", 404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http")
        return failure(endpoint_of(request), error.status_code, str(error.detail), reason, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        first = error.errors()[0] if error.errors() else {}
        # Integers in a location are list indices or, for a JSON syntax error, a character position: no field.
        location = [str(part) for part in first.get("loc", ()) if part != "body" and not isinstance(part, int)]
        param = ".".join(location) or None
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            message = f"the request body is not valid JSON: {detail}".rstrip(": ")
        else:
            message = f"{param}: {first.get('msg', 'invalid')}" if param else first.get("msg", "invalid request body")
        return failure(endpoint_of(request), 400, message, "validation", param)

    # -- images -------------------------------------------------------------------------------

    @app.post("/v1/images/generations")
    async def generate(body: ImageRequest, request: Request):
        endpoint = "/v1/images/generations"
        arrived = time.time()
        try:
            # Off the event loop: checking per-block weights against every Share layer takes a while.
            job = await asyncio.to_thread(engine.validate, body)
        except RequestError as error:
            return failure(endpoint, error.status, str(error), "validation", error.param)
        except Exception as error:  # a check that crashed on odd input: still this request's fault alone
            logger.exception("validating a request failed")
            return failure(endpoint, 400, f"invalid request: {error_line(error)}", "validation")
        try:
            outcome = await _unless_disconnected(request, backend.submit(job))
        except _ClientGone:
            metrics.errors.labels("disconnected").inc()
            return Response(status_code=499)  # nobody reads it; nginx's "client closed request"
        except QueueFullError as error:
            return failure(endpoint, 503, str(error), "queue_full", headers={"Retry-After": "1"})
        except RequestError as error:
            reason = "style_gone" if error.status == 409 else "validation"
            return failure(endpoint, error.status, str(error), reason, error.param)
        except Exception as error:
            return failure(endpoint, 500, f"generation failed: {error_line(error)}", "internal")
        result = outcome.result
        encoded = await asyncio.to_thread(encode_images, result.images, job.response_format)
        metrics.images.inc(len(encoded))
        field = "b64_npy" if job.response_format == "b64_npy" else "b64_json"
        key = job.key
        return answer(
            endpoint,
            200,
            {
                "created": int(arrived),
                "data": [{field: text} for text in encoded],
                "share": {
                    "batch_size": result.batch_size,
                    "queue_ms": round(outcome.queue_s * 1e3, 3),
                    "compute_ms": round(result.compute_s * 1e3, 3),
                    "seed": job.seeds[0],
                    "width": key.width,
                    "height": key.height,
                    "num_inference_steps": key.steps,
                    "guidance_scale": key.guidance,
                },
            },
        )

    # -- styles -------------------------------------------------------------------------------

    @app.get("/v1/styles")
    async def styles():
        return answer("/v1/styles", 200, {"object": "list", "data": engine.styles()})

    def check_admin(request: Request, endpoint: str) -> JSONResponse | None:
        if admin_token is None:
            return failure(endpoint, 403, admin_off_message, "auth")
        if not bearer_matches(request.headers.get("authorization", ""), admin_token):
            return failure(
                endpoint, 401, "give the admin token: Authorization: Bearer <token>", "auth",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        return None

    @app.post("/v1/styles")
    async def merge_style(request: Request):
        endpoint = "/v1/styles"
        refused = check_admin(request, endpoint)
        if refused is not None:
            return refused
        content_type = request.headers.get("content-type", "")
        try:
            if content_type.startswith("multipart/form-data"):
                report = await _merge_upload(request)
            else:
                report = await _merge_from_hub(request)
        except _Refused as error:
            return failure(endpoint, error.status, str(error), error.reason, error.param)
        except (ShareError, ValueError, OSError) as error:
            return failure(endpoint, 400, error_line(error), "merge_failed")
        return answer(
            endpoint,
            201,
            {
                "name": report.style_name,
                "error": report.error,
                "layers_merged": report.layers_merged,
                "outside_energy_fraction": report.outside_energy_fraction,
                "source": report.source,
                "moved": report.moved,  # how far each other style's update moved (the bases turned)
                "styles": engine.style_names,
                "message": str(report),
            },
        )

    async def _merge_from_hub(request: Request):
        try:
            body = MergeRequest.model_validate(json.loads(await request.body() or b"null"))
        except (ValueError, RecursionError) as error:  # not JSON (or nested past Python's limit), or not its shape
            raise _Refused(
                f"give JSON {{'hub_id': 'user/name', 'name': ...}} or upload a .safetensors file as multipart "
                f"form field 'file' ({error_line(error)})",
                "hub_id",
            ) from None
        hub_id = body.hub_id.strip()
        if not _HUB_ID.fullmatch(hub_id) or Path(hub_id).exists():
            raise _Refused(f"{hub_id!r} is not a Hub repo id like 'user/name'", "hub_id")
        if body.weight_name is not None and not body.weight_name.lower().endswith(".safetensors"):
            raise _Refused(f"{body.weight_name}: only .safetensors LoRA files are merged", "weight_name")
        from ..hub import HubFileTooLargeError
        from ..loader import prefetch_lora

        # Download before taking the pipeline: batches keep running meanwhile; the merge reads the cache.
        try:
            source = await asyncio.to_thread(
                prefetch_lora, hub_id, body.weight_name, revision=body.revision, max_bytes=max_upload_bytes
            )
        except HubFileTooLargeError as error:
            raise _Refused(f"{error} (--max-upload-mb)", "hub_id", status=413, reason="upload") from None
        return await backend.run_exclusive(
            engine.merge_lora,
            hub_id,
            style_name=body.name or None,
            weight_name=source["weight_name"],
            revision=source.get("commit", body.revision),  # the files fetched above, wherever the branch is now
            local_files_only=True,
        )

    async def _merge_upload(request: Request):
        length = request.headers.get("content-length")
        if length is None:
            raise _Refused("an upload needs a Content-Length header", "file", status=411, reason="upload")
        if int(length) > max_upload_bytes + 64 * 1024:  # the form's own fields and boundaries on top
            raise _Refused(
                f"the upload is {int(length) / 2**20:.1f} MiB; the limit is {max_upload_bytes / 2**20:.0f} MiB "
                "(--max-upload-mb)",
                "file",
                status=413,
                reason="upload",
            )
        form = await request.form(max_files=1, max_fields=4)
        try:
            upload, name = form.get("file"), form.get("name")
            if name is not None and not isinstance(name, str):
                raise _Refused("give the style name as a plain form field 'name', not a file", "name")
            name = (name or "").strip() or None
            if upload is None or isinstance(upload, str):
                raise _Refused("upload the LoRA as multipart form field 'file'", "file")
            filename = Path(upload.filename or "upload.safetensors").name
            if filename.lower().endswith(PICKLE_SUFFIXES) or not filename.lower().endswith(".safetensors"):
                raise _Refused(f"{filename}: only .safetensors LoRA files are merged (never pickles)", "file")
            stem = filename[: -len(".safetensors")]
            if name is None and stem in _GENERIC_FILE_NAMES:
                raise _Refused(f"give a style name: the file name {filename} says nothing about the style", "name")
            size = upload.size if upload.size is not None else max_upload_bytes + 1
            if size > max_upload_bytes:
                raise _Refused(
                    f"{filename} is over the {max_upload_mb:g} MiB limit (--max-upload-mb)", "file", 413, "upload"
                )
            await upload.seek(0)
            head = await upload.read(9)
            if not _is_safetensors(head, size):
                raise _Refused(f"{filename} is not a safetensors file", "file")
            folder = Path(tempfile.mkdtemp(prefix="share-upload-"))
            try:
                path = folder / filename
                await upload.seek(0)
                with path.open("wb") as out:
                    await asyncio.to_thread(shutil.copyfileobj, upload.file, out)
                try:
                    return await backend.run_exclusive(
                        engine.merge_lora,
                        str(path),
                        style_name=name or stem,
                        provenance={"upload": filename, "bytes": size},
                    )
                except (ShareError, ValueError, OSError) as error:  # named by the upload, not the server's temp path
                    message = error_line(error).replace(f"{folder}/", "")
                    raise _Refused(message, None, reason="merge_failed") from None
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        finally:
            await form.close()

    @app.delete("/v1/styles/{name:path}")  # a style name may hold "/" ("team/ocean")
    async def delete_style(name: str, request: Request):
        endpoint = "/v1/styles/{name}"
        refused = check_admin(request, endpoint)
        if refused is not None:
            return refused
        try:
            await backend.run_exclusive(engine.delete_style, name)
        except RequestError as error:
            return failure(endpoint, error.status, str(error), "unknown_style", error.param)
        except (ShareError, ValueError) as error:
            return failure(endpoint, 400, error_line(error), "delete_failed")
        return answer(endpoint, 200, {"deleted": name, "styles": engine.style_names})

    # -- operations ---------------------------------------------------------------------------

    @app.get("/healthz")
    async def health():
        return answer(
            "/healthz",
            200,
            {
                "status": "ok",
                "styles": engine.style_names,
                "queued_images": backend.queued_images,
                "device": str(engine.pipe.device),
                "dtype": str(engine.pipe.transformer.dtype).removeprefix("torch."),
                "defaults": {
                    "size": f"{engine.defaults.width}x{engine.defaults.height}",
                    "num_inference_steps": engine.defaults.steps,
                    "guidance_scale": engine.defaults.guidance,
                },
                **(health_extra() if health_extra is not None else {}),
            },
        )

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


class _Refused(Exception):
    """An admin request refused before anything changed."""

    def __init__(self, message: str, param: str | None, status: int = 400, reason: str = "validation"):
        super().__init__(message)
        self.param, self.status, self.reason = param, status, reason
