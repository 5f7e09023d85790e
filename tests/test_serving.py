"""The serving app (``share_diffusers.serving``) end to end on the tiny pipeline: the OpenAI schema, a batch of
mixed styles equal to single requests (and to a direct pipeline call), per-request validation, 503 when the
queue is full, a client that goes away, the admin token, bank changes waiting for a running batch, metrics,
the command line, and ``benchmarks/bench_serve.py --quick`` against real servers on loopback.

Requests go through httpx's ASGI transport (or Starlette's TestClient) to the app in this process; the
batcher runs in the test's event loop and the pipeline in its worker thread, as under uvicorn.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="needs the serve extra")
pytest.importorskip("prometheus_client", reason="needs the serve extra")

from fastapi.testclient import TestClient  # noqa: E402
from launch_helpers import run_benchmark  # noqa: E402

from share_diffusers.demo_styles import write_demo_lora  # noqa: E402
from share_diffusers.runtime import TINY_RANDOM  # noqa: E402
from share_diffusers.serving.api import bearer_matches, create_app  # noqa: E402
from share_diffusers.serving.batcher import DynamicBatcher, QueueFullError  # noqa: E402
from share_diffusers.serving.engine import JobResult, ServingEngine  # noqa: E402
from share_diffusers.serving.schema import ImageRequest  # noqa: E402
from share_diffusers.serving.server import ADMIN_TOKEN_ENV, build_parser, build_server_app, main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2  # every request: two denoising steps of the tiny pipeline (about 0.1 s an image)
ENDPOINT = "/v1/images/generations"
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def engine() -> ServingEngine:
    """The tiny pipeline with its three random demo styles (ink, neon, sepia); never changed by a test."""
    return ServingEngine.from_model(TINY_RANDOM, max_images=8)


@pytest.fixture(scope="module")
def admin_engine() -> ServingEngine:
    """A second tiny pipeline for the tests that merge and delete styles."""
    return ServingEngine.from_model(TINY_RANDOM, max_images=8)


@contextlib.asynccontextmanager
async def serving(app):
    """The app's batcher started in this event loop, and an httpx client that talks to the app directly."""
    await app.state.backend.start()
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve", timeout=60) as client:
            yield client
    finally:
        await app.state.backend.stop()


def body(prompt="a photo of a cat", **fields) -> dict:
    return {"prompt": prompt, "num_inference_steps": STEPS, "response_format": "b64_npy", **fields}


def array(reply: dict, index: int = 0) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(reply["data"][index]["b64_npy"])))


async def until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def pipeline_held(backend):
    """Hold the pipeline thread (as a long batch would) until the block ends."""
    holding, release = threading.Event(), threading.Event()

    def hold():
        holding.set()
        release.wait(30)

    task = asyncio.ensure_future(backend.run_exclusive(hold))
    await asyncio.to_thread(holding.wait, 10)
    try:
        yield
    finally:
        release.set()
        await task


# -- the schema -----------------------------------------------------------------------------------


def test_openai_schema_styles_and_health(engine):
    with TestClient(create_app(engine, max_wait_ms=1)) as client:  # the real lifespan starts the batcher
        reply = client.post(
            ENDPOINT,
            json={"prompt": "a photo of a cat", "n": 2, "size": "32x32", "style": "ink", "seed": 7,
                  "num_inference_steps": STEPS, "model": "ignored", "user": "me"},
        )  # fmt: skip
        assert reply.status_code == 200, reply.text
        payload = reply.json()
        assert set(payload) == {"created", "data", "share"}
        assert isinstance(payload["created"], int) and abs(payload["created"] - time.time()) < 60
        assert len(payload["data"]) == 2
        for item in payload["data"]:
            image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
        share = payload["share"]
        assert share["batch_size"] == 2 and share["seed"] == 7
        assert share["queue_ms"] >= 0 and share["compute_ms"] > 0
        assert (share["width"], share["height"], share["num_inference_steps"]) == (32, 32, STEPS)
        assert share["guidance_scale"] == engine.defaults.guidance

        drawn = client.post(ENDPOINT, json={"prompt": "a cat", "num_inference_steps": 1}).json()["share"]
        assert isinstance(drawn["seed"], int)  # a random seed, reported so the image can be made again

        styles = client.get("/v1/styles").json()
        assert styles["object"] == "list"
        assert [entry["name"] for entry in styles["data"]] == ["ink", "neon", "sepia"]
        assert all(entry["error"] >= 0 and isinstance(entry["source"], dict) for entry in styles["data"])

        health = client.get("/healthz").json()
        assert health["status"] == "ok" and health["styles"] == ["ink", "neon", "sepia"]
        assert health["queued_images"] == 0 and health["defaults"]["size"] == "32x32"
        assert ENDPOINT in client.get("/openapi.json").json()["paths"]


# -- batching -------------------------------------------------------------------------------------

MIXED = [
    body(style="ink", seed=1),
    body("a photo of a dog", style="neon", seed=2, n=2),
    body(style=None, seed=3),
    body("a red house", style={"ink": 0.5, "sepia": 0.5}, seed=4),
    body(style="sepia", style_scale=0.5, seed=5),
    body("a photo of a tree", style={"neon": 1.5}, style_scale=0.5, seed=6),
]


def direct_call(pipe, request: dict) -> np.ndarray:
    """The request as one plain pipeline call with the pipeline's own ``style_scale`` (no server code)."""
    n = request.get("n", 1)
    style = request["style"]
    return pipe(
        prompt=[request["prompt"]] * n,
        style=None if style is None else [style] * n,
        style_scale=request.get("style_scale", 1.0),
        generator=[torch.Generator().manual_seed(request["seed"] + i) for i in range(n)],
        num_inference_steps=STEPS,
        height=32,
        width=32,
        guidance_scale=3.5,
        output_type="np",
    ).images


def test_mixed_style_batch_equals_single_requests(engine):
    app = create_app(engine, max_batch=8, max_wait_ms=2000)
    backend = app.state.backend

    async def scenario():
        async with serving(app) as client:
            together = await asyncio.gather(*(client.post(ENDPOINT, json=request) for request in MIXED))
            pngs = [{**request, "response_format": "b64_json"} for request in MIXED]
            together_png = await asyncio.gather(*(client.post(ENDPOINT, json=request) for request in pngs))
            backend.max_wait_s = 0.0  # alone: no wait for company
            alone_png = [await client.post(ENDPOINT, json=request) for request in pngs]
            return [[reply.json() for reply in replies] for replies in (together, together_png, alone_png)]

    together, together_png, alone_png = asyncio.run(scenario())
    images = sum(request.get("n", 1) for request in MIXED)
    assert [reply["share"]["batch_size"] for reply in together] == [images] * len(MIXED)  # one pipeline call
    for request, reply in zip(MIXED, together, strict=True):
        reference = direct_call(engine.pipe, request)
        for index in range(request.get("n", 1)):
            np.testing.assert_allclose(array(reply, index), reference[index], rtol=0, atol=1e-5)
    # The same requests one at a time (batches of their own n) give the same PNGs as together.
    for request, single, batched in zip(MIXED, alone_png, together_png, strict=True):
        assert single["share"]["batch_size"] == request.get("n", 1)
        for first, second in zip(single["data"], batched["data"], strict=True):
            a = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["b64_json"]))), dtype=int)
            b = np.asarray(Image.open(io.BytesIO(base64.b64decode(second["b64_json"]))), dtype=int)
            assert np.abs(a - b).max() <= 1  # float32 agreement within 1e-5 can flip a rounding


PER_BLOCK = [
    body(style={"ink": {"double": 1.0, "single": 0.3}}, seed=1),
    body("a photo of a dog", style={"ink": [1.0, -0.5, 0.0, 2.0], "neon": 0.5}, style_scale=0.5, seed=2, n=2),
    body(style={"neon": {"double.1": 1.0, "*": 0.25}, "sepia": {"single": 1.0}}, style_scale=2.0, seed=3),
    body(style="ink", seed=4),
    body(style=None, seed=5),
]


def test_per_block_requests_in_a_mixed_batch_equal_single_requests(engine):
    """Per-block weights (a mapping, a vector at another scale, a blend of both kinds) batched with plain
    styles: each image is its request alone and the pipeline called with the same Python spec."""
    app = create_app(engine, max_batch=8, max_wait_ms=2000)

    async def scenario():
        async with serving(app) as client:
            together = await asyncio.gather(*(client.post(ENDPOINT, json=request) for request in PER_BLOCK))
            app.state.backend.max_wait_s = 0.0
            alone = [await client.post(ENDPOINT, json=request) for request in PER_BLOCK]
            return [reply.json() for reply in together], [reply.json() for reply in alone]

    together, alone = asyncio.run(scenario())
    images = sum(request.get("n", 1) for request in PER_BLOCK)
    assert [reply["share"]["batch_size"] for reply in together] == [images] * len(PER_BLOCK), together
    for request, batched, single in zip(PER_BLOCK, together, alone, strict=True):
        assert single["share"]["batch_size"] == request.get("n", 1)
        reference = direct_call(engine.pipe, request)
        for index in range(request.get("n", 1)):
            np.testing.assert_allclose(array(batched, index), reference[index], rtol=0, atol=1e-5)
            np.testing.assert_allclose(array(single, index), array(batched, index), rtol=0, atol=1e-5)
    plain_ink = direct_call(engine.pipe, {**PER_BLOCK[0], "style": "ink"})[0]
    assert np.abs(array(together[0]) - plain_ink).max() > 1e-3  # the block weights matter


def assert_batched_equals_single_requests(engine) -> None:
    """Three mixed-style requests (4 images) one by one, then together in one call: equal within 1e-5."""
    app = create_app(engine, max_batch=8, max_wait_ms=1)
    subset = MIXED[:3]

    async def scenario():
        async with serving(app) as client:
            alone = [(await client.post(ENDPOINT, json=request)).json() for request in subset]
            app.state.backend.max_wait_s = 2.0  # together: wait for all three
            together = await asyncio.gather(*(client.post(ENDPOINT, json=request) for request in subset))
            return alone, [reply.json() for reply in together]

    alone, together = asyncio.run(scenario())
    assert {reply["share"]["batch_size"] for reply in together} == {4}
    for request, single, batched in zip(subset, alone, together, strict=True):
        for index in range(request.get("n", 1)):
            np.testing.assert_allclose(array(single, index), array(batched, index), rtol=0, atol=1e-5)


def test_single_requests_in_float32_match_batched(engine):
    """``b64_npy`` single requests vs the same requests batched: within 1e-5 (float32)."""
    assert_batched_equals_single_requests(engine)


def test_quantized_server_batches_styles_like_single_requests():
    """``serve --quantize int8``: a mixed-style batch on a torchao int8 base equals the requests one by one."""
    pytest.importorskip("torchao")
    from share_diffusers.core.quantized import is_quantized

    quantized = ServingEngine.from_model(TINY_RANDOM, quantize="int8", max_images=8)
    assert is_quantized(quantized.pipe.transformer.transformer_blocks[0].attn.to_q.base_layer)
    assert_batched_equals_single_requests(quantized)


def test_requests_with_other_settings_go_in_their_own_call(engine):
    app = create_app(engine, max_batch=8, max_wait_ms=1500)
    requests = [body(seed=1), body(seed=2, size="16x32"), body(seed=3), body(seed=4, num_inference_steps=1)]

    async def scenario():
        async with serving(app) as client:
            return [r.json() for r in await asyncio.gather(*(client.post(ENDPOINT, json=r) for r in requests))]

    replies = asyncio.run(scenario())
    assert [reply["share"]["batch_size"] for reply in replies] == [2, 1, 2, 1]
    assert array(replies[1]).shape == (32, 16, 3)  # height x width


# -- validation -----------------------------------------------------------------------------------

INVALID = [
    (body(style="nope"), "style", "unknown style 'nope'; styles held: 'ink', 'neon', 'sepia'"),
    (body(style={"ink": 0.5, "nope": 0.5}), "style", "unknown style 'nope'"),
    (body(style={}), "style", "empty blend"),
    (body(size="33x32"), "size", "the width must be a multiple of 4 from 4 to 256, got 33"),
    (body(size="512x512"), "size", "from 4 to 256"),
    (body(size="big"), "size", "size must be 'WxH' in pixels"),
    (body(size="\u00b2x32"), "size", "size must be 'WxH' in pixels, e.g. '32x32', got '\u00b2x32'"),  # not int()'s
    (body(size="9" * 5000 + "x32"), "size", "size must be 'WxH' in pixels, e.g. '32x32', got '99999"),
    (body(size="99999x32"), "size", "the width must be a multiple of 4 from 4 to 256, got 99999"),
    (body(n=9), "n", "n must be from 1 to 8, got 9"),
    (body(n=0), "n", "greater than or equal to 1"),
    (body(response_format="url"), "response_format", "no image store"),
    (body(prompt="   "), "prompt", "prompt must not be blank"),
    (body(prompt=""), "prompt", "at least 1 character"),
    (body(seed=-1), "seed", "seed must be from 0 to"),
    # image 2 would use seed 2**32, which no request alone may ask for
    (body(seed=2**32 - 1, n=2), "seed", "seed + n - 1 must be at most 4294967295 (image i uses seed + i), got seed"),
    (body(num_inference_steps=0), "num_inference_steps", "from 1 to 100"),
    (body(guidance_scale=-1.0), "guidance_scale", "from 0 to 30"),
    (body(style_scale=float("inf")), "style_scale", "finite"),
    (body(style={"ink": 10**400}), "style", "the weight of style 'ink' must be a number"),  # float() overflows
    (body(style={"ink": {"double": 10**400}}), "style", "block weight 'double' of style 'ink' must be a number"),
    (body(stlye="ink"), "stlye", "Extra inputs are not permitted"),
    # JSON types as written: pydantic's lax mode read these as 1, 2, 3 and 1.0.
    (body(n=True), "n", "Input should be a valid integer"),
    (body(n="2"), "n", "Input should be a valid integer"),
    (body(seed=3.0), "seed", "Input should be a valid integer"),
    (body(style_scale=True), "style_scale", "Input should be a valid number"),
    (body(guidance_scale="3"), "guidance_scale", "Input should be a valid number"),
    (
        body(style={"ink": {"double.7": 1.0}}),
        "style",
        "block weight key 'double.7' of style 'ink' selects no Share layer of this model "
        "(its blocks: double.0-1, single.0-1)",
    ),
    (body(style={"ink": {"dubble": 1.0}, "neon": 0.5}), "style", "block weight key 'dubble' of style 'ink'"),
    (body(style={"ink": {"single.1-0": 1.0}}), "style", "block range 'single_transformer_blocks.1-0' of style"),
    (body(style={"ink": [1.0, 1.0]}), "style", "the block-weight vector of style 'ink' has 2 values; this model has 4"),
    (body(style={"ink": {"double": 5000.0}}), "style", "style 'ink' would get weight 5000"),
    (body(style={"ink": 5000.0}), "style", "style 'ink' would get weight 5000"),  # refused here, not in the batch
    (body(style={"ink": {"double": "x"}}), "style", "block weight 'double' of style 'ink' must be a number, got 'x'"),
    (body(style={"ink": [1.0, None]}), "style", "value 2 of the block-weight list of style 'ink' must be a number"),
    (body(style={"ink": {}}), "style", "the per-block weights of style 'ink' are empty"),
    (body(style={"ink": "0.5"}), "style", "the weight of style 'ink' must be a number, a {selector: number} object"),
    (body(style=3), "style", "style must be a style name, a {name: weight} blend"),
    (body(style={"ink": {"double": float("nan")}}), "style", "block weight 'double' of style 'ink' must be a finite"),
    (body(style={f"s{i}": 1.0 for i in range(17)}), "style", "the blend has 17 styles; at most 16"),
    (body(style={"ink": [1.0] * 129}), "style", "the block-weight list of style 'ink' has 129 values; at most 128"),
    (
        body(style={"ink": {f"double.{i}": 1.0 for i in range(65)}}),
        "style",
        "the per-block weights of style 'ink' have 65 keys; at most 64",
    ),
]


def test_invalid_requests_get_their_own_400_and_never_reach_a_batch(engine):
    app = create_app(engine, max_batch=8, max_wait_ms=1500)
    good = [body(style="ink", seed=1), body(style="neon", seed=2)]

    async def scenario():
        async with serving(app) as client:
            posts = [client.post(ENDPOINT, json=request) for request in good]
            as_json = {"content-type": "application/json"}
            posts += [
                client.post(ENDPOINT, content=json.dumps(r, allow_nan=True), headers=as_json) for r, _, _ in INVALID
            ]
            posts.append(client.post(ENDPOINT, content=b"{not json", headers=as_json))
            replies = await asyncio.gather(*posts)
            return replies, (await client.get("/metrics")).text

    replies, metrics = asyncio.run(scenario())
    assert [reply.status_code for reply in replies[:2]] == [200, 200]
    assert [reply.json()["share"]["batch_size"] for reply in replies[:2]] == [2, 2]  # only the good ones ran
    for (_, param, message), reply in zip(INVALID, replies[2:], strict=False):
        assert reply.status_code == 400, (param, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param
        assert message in error["message"], (message, error["message"])
    assert replies[-1].status_code == 400 and "not valid JSON" in replies[-1].json()["error"]["message"]
    assert replies[-1].json()["error"]["param"] is None  # not the character position of the syntax error
    assert f'share_errors_total{{reason="validation"}} {float(len(INVALID) + 1)}' in metrics
    assert "share_batch_size_count 1.0" in metrics


def test_a_validation_crash_is_a_counted_400(engine, monkeypatch):
    """Validation that raises something unforeseen answers this request 400 (counted), never a bare 500."""

    def crash(request):
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(engine, "validate", crash)

    async def scenario():
        async with serving(create_app(engine, max_wait_ms=1)) as client:
            return await client.post(ENDPOINT, json=body()), (await client.get("/metrics")).text

    reply, metrics = asyncio.run(scenario())
    assert reply.status_code == 400 and reply.headers["content-type"] == "application/json"
    assert reply.json()["error"]["message"] == "invalid request: int too large to convert to float"
    assert 'share_errors_total{reason="validation"} 1.0' in metrics


def test_openai_nullable_fields_take_their_defaults(engine):
    """OpenAI declares ``n`` and ``response_format`` nullable: null means 1 image, a base64 PNG (and our
    ``style_scale`` likewise: null means 1)."""

    async def scenario():
        async with serving(create_app(engine, max_wait_ms=1)) as client:
            return await client.post(
                ENDPOINT,
                json={
                    "prompt": "a cat",
                    "num_inference_steps": 1,
                    "n": None,
                    "response_format": None,
                    "style_scale": None,
                },
            )

    reply = asyncio.run(scenario())
    assert reply.status_code == 200, reply.text
    (item,) = reply.json()["data"]
    assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).format == "PNG"


async def _chunks(data: bytes, size: int = 64 * 1024):
    for start in range(0, len(data), size):
        yield data[start : start + size]


def test_oversized_bodies_get_413_before_parsing(engine):
    """A body over the limit is refused before it is parsed: by its Content-Length, or while it is read
    when it has none (chunked); the limit is create_app's ``max_body_kib``."""
    big = json.dumps(body(style={"ink": [0.5] * 100_000})).encode()  # about 500 KiB
    as_json = {"content-type": "application/json"}

    async def scenario():
        replies = {}
        async with serving(create_app(engine, max_wait_ms=1)) as client:
            replies["declared"] = await client.post(ENDPOINT, content=big, headers=as_json)
            replies["chunked"] = await client.post(ENDPOINT, content=_chunks(big), headers=as_json)
            replies["small chunked"] = await client.post(
                ENDPOINT, content=_chunks(json.dumps(body()).encode(), 16), headers=as_json
            )
            replies["metrics"] = await client.get("/metrics")
        async with serving(create_app(engine, max_wait_ms=1, max_body_kib=1)) as client:
            replies["long prompt"] = await client.post(ENDPOINT, json=body("a cat " * 400))
        return replies

    replies = asyncio.run(scenario())
    declared, chunked = replies["declared"].json()["error"], replies["chunked"].json()["error"]
    assert replies["declared"].status_code == 413 and declared["code"] == "too_large"
    assert declared["message"] == f"the request body is {len(big)} bytes; the limit is 262144 bytes (256 KiB)"
    assert replies["chunked"].status_code == 413
    assert chunked["message"] == "the request body is over the limit of 262144 bytes (256 KiB)"
    assert replies["small chunked"].status_code == 200  # a chunked body under the limit goes through
    metrics = replies["metrics"].text
    assert 'share_requests_total{endpoint="/v1/images/generations",status="413"} 2.0' in metrics
    assert 'share_errors_total{reason="too_large"} 2.0' in metrics
    assert replies["long prompt"].status_code == 413
    assert "the limit is 1024 bytes (1 KiB)" in replies["long prompt"].json()["error"]["message"]


# -- the queue ------------------------------------------------------------------------------------


def test_full_queue_answers_503_and_a_burst_never_hangs(engine):
    app = create_app(engine, max_batch=2, max_wait_ms=5, max_queue=2)
    backend = app.state.backend

    async def scenario():
        async with serving(app) as client:
            async with pipeline_held(backend):
                first = asyncio.ensure_future(client.post(ENDPOINT, json=body(seed=1, n=2)))
                await asyncio.sleep(0.3)  # a full batch: the worker takes it at once and waits for the pipeline
                second = asyncio.ensure_future(client.post(ENDPOINT, json=body(seed=2, n=2)))
                await until(lambda: backend.queued_images == 2)
                full = await client.post(ENDPOINT, json=body(seed=3))
                health = await client.get("/healthz")  # the event loop answers while the pipeline is busy
            results = [await first, await second, full, health]
            # A burst of 4x the queue while the pipeline is held: each request gets its image or a 503.
            async with pipeline_held(backend):
                burst = [asyncio.ensure_future(client.post(ENDPOINT, json=body(seed=10 + i))) for i in range(8)]
                await asyncio.sleep(0.3)
            burst = await asyncio.wait_for(asyncio.gather(*burst), timeout=60)
            after = await client.get("/healthz")
            return results, burst, after, (await client.get("/metrics")).text

    (first, second, full, health), burst, after, metrics = asyncio.run(scenario())
    assert first.status_code == 200 and second.status_code == 200
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert "images are queued (limit 2)" in full.json()["error"]["message"]
    assert health.status_code == 200 and health.json()["queued_images"] == 2
    codes = [reply.status_code for reply in burst]
    assert set(codes) <= {200, 503} and codes.count(200) >= 2 and codes.count(503) >= 1
    assert after.status_code == 200 and after.json()["queued_images"] == 0
    assert f'share_errors_total{{reason="queue_full"}} {float(1 + codes.count(503))}' in metrics


async def _raw_post(app, payload: dict, gone: asyncio.Event) -> list[dict]:
    """POST through the ASGI interface with a client that disconnects when ``gone`` is set."""
    data = json.dumps(payload).encode()
    incoming = [{"type": "http.request", "body": data, "more_body": False}]
    sent = []

    async def receive():
        if incoming:
            return incoming.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": ENDPOINT,
        "raw_path": ENDPOINT.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return sent


def test_client_that_goes_away_loses_its_slot_only(engine):
    app = create_app(engine, max_batch=8, max_wait_ms=10, max_queue=8)
    backend = app.state.backend

    async def scenario():
        async with serving(app) as client:
            gone = asyncio.Event()
            async with pipeline_held(backend):
                busy = asyncio.ensure_future(client.post(ENDPOINT, json=body(seed=0)))
                await asyncio.sleep(0.3)  # the worker took it and waits for the pipeline: the next ones queue
                leaving = asyncio.ensure_future(_raw_post(app, body(seed=1, n=3), gone))
                staying = asyncio.ensure_future(client.post(ENDPOINT, json=body(seed=2)))
                await until(lambda: backend.queued_images == 4)
                gone.set()
                await until(lambda: backend.queued_images == 1)  # the slot went back at once
            sent = await leaving
            return sent, await busy, await staying, (await client.get("/metrics")).text

    sent, busy, staying, metrics = asyncio.run(scenario())
    assert sent[0]["status"] == 499, sent
    assert busy.status_code == 200
    assert staying.status_code == 200 and staying.json()["share"]["batch_size"] == 1  # no work for the leaver
    assert 'share_errors_total{reason="disconnected"} 1.0' in metrics


def test_batcher_drops_cancelled_jobs_and_checks_its_limits(engine):
    jobs = [engine.validate(ImageRequest(**body(seed=seed))) for seed in range(3)]

    async def scenario():
        batcher = DynamicBatcher(engine, max_batch=4, max_wait_ms=1000, max_queue=8)
        await batcher.start()
        try:
            tasks = [asyncio.ensure_future(batcher.submit(job)) for job in jobs]
            await until(lambda: batcher.queued_images == 3)
            tasks[1].cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await batcher.stop()
        with pytest.raises(QueueFullError, match="not running"):
            await batcher.submit(jobs[0])
        return results

    first, cancelled, third = asyncio.run(scenario())
    assert isinstance(cancelled, asyncio.CancelledError)
    assert first.result.batch_size == 2 and third.result.batch_size == 2
    with pytest.raises(ValueError, match="must hold a whole batch"):
        DynamicBatcher(engine, max_batch=4, max_queue=2)


# -- styles at run time ---------------------------------------------------------------------------


def test_admin_calls_need_the_token(engine):
    async def scenario():
        replies = {}
        async with serving(create_app(engine)) as client:
            replies["off-post"] = await client.post("/v1/styles", json={"hub_id": "someone/lora"})
            replies["off-delete"] = await client.delete("/v1/styles/ink")
        async with serving(create_app(engine, admin_token=TOKEN)) as client:
            replies["missing"] = await client.delete("/v1/styles/ink")
            replies["wrong"] = await client.delete("/v1/styles/ink", headers={"Authorization": "Bearer nope"})
            replies["basic"] = await client.post("/v1/styles", headers={"Authorization": f"Basic {TOKEN}"})
            replies["empty"] = await client.delete("/v1/styles/ink", headers={"Authorization": "Bearer"})
            replies["metrics"] = await client.get("/metrics")
        return replies

    replies = asyncio.run(scenario())
    for key in ("off-post", "off-delete"):
        assert replies[key].status_code == 403 and "--admin-token" in replies[key].json()["error"]["message"]
    for key in ("missing", "wrong", "basic", "empty"):
        assert replies[key].status_code == 401 and replies[key].headers["www-authenticate"] == "Bearer"
    assert 'share_errors_total{reason="auth"} 4.0' in replies["metrics"].text
    assert engine.style_names == ["ink", "neon", "sepia"]  # nothing changed


@pytest.mark.parametrize(
    ("header", "token", "matches"),
    [
        ("Bearer", "", False),  # `--admin-token ""` and an empty bearer: never a match
        ("Bearer ", "", False),
        ("Bearer   ", " ", False),
        ("Bearer s3cret", "s3cret", True),
        ("bearer  s3cret ", "s3cret", True),
        ("Basic s3cret", "s3cret", False),
        ("Bearer s3cre", "s3cret", False),
    ],
)
def test_bearer_matches_only_the_token(header, token, matches):
    assert bearer_matches(header, token) is matches


def test_a_blank_admin_token_is_refused(engine, monkeypatch, capsys):
    """``--admin-token "$TOKEN"`` with TOKEN unset: the server refuses to start (status 1) rather than let
    an empty bearer in, and so does a blank ``$SHARE_ADMIN_TOKEN``; ``create_app`` raises."""
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: pytest.fail("the server started"))
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    for blank in ("", "  "):
        assert main(["--model", TINY_RANDOM, "--admin-token", blank]) == 1
        assert capsys.readouterr().err.startswith("error: --admin-token is empty (an unset shell variable?)")
        with pytest.raises(ValueError, match="admin_token is empty: give a secret token"):
            create_app(engine, admin_token=blank)
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "")
    with pytest.raises(ValueError, match=r"^\$SHARE_ADMIN_TOKEN is empty"):
        build_server_app(build_parser().parse_args(["--model", TINY_RANDOM]))
    with pytest.raises(ValueError, match="starts or ends with whitespace"):
        create_app(engine, admin_token="s3cret\n")


def test_merge_upload_and_hub_then_delete(admin_engine, tmp_path, fake_hub):
    transformer = admin_engine.pipe.transformer
    ocean = write_demo_lora(transformer, tmp_path / "ocean", seed=31, rank=4, alpha=4.0).read_bytes()
    write_demo_lora(transformer, tmp_path / "forest", seed=32, rank=4, alpha=4.0)
    fake_hub.add_folder("someone/forest-lora", tmp_path / "forest")
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def scenario():
        replies = {}
        async with serving(create_app(admin_engine, admin_token=TOKEN, max_wait_ms=1)) as client:
            post = client.post
            replies["upload"] = await post("/v1/styles", headers=headers, files={"file": ("ocean.safetensors", ocean)})
            replies["generic"] = await post(
                "/v1/styles", headers=headers, files={"file": ("pytorch_lora_weights.safetensors", ocean)}
            )
            replies["pickle"] = await post("/v1/styles", headers=headers, files={"file": ("x.bin", b"\x80\x04junk")})
            replies["fake"] = await post("/v1/styles", headers=headers, files={"file": ("y.safetensors", b"not it")})
            replies["taken"] = await post("/v1/styles", headers=headers, files={"file": ("ink.safetensors", ocean)})
            replies["hub"] = await post(
                "/v1/styles", headers=headers, json={"hub_id": "someone/forest-lora", "name": "forest"}
            )
            replies["path"] = await post("/v1/styles", headers=headers, json={"hub_id": str(tmp_path / "forest")})
            replies["styles"] = await client.get("/v1/styles")
            replies["use"] = await post(ENDPOINT, json=body(style={"ocean": 0.5, "forest": 0.5}, seed=1))
            replies["delete"] = await client.delete("/v1/styles/ocean", headers=headers)
            replies["deleted"] = await post(ENDPOINT, json=body(style="ocean", seed=1))
            replies["again"] = await client.delete("/v1/styles/ocean", headers=headers)
            await client.delete("/v1/styles/forest", headers=headers)
        async with serving(create_app(admin_engine, admin_token=TOKEN, max_upload_mb=0.01)) as client:
            replies["big"] = await client.post(
                "/v1/styles", headers=headers, files={"file": ("ocean.safetensors", ocean)}
            )
        return replies

    replies = asyncio.run(scenario())
    upload = replies["upload"]
    assert upload.status_code == 201, upload.text
    moved = upload.json()["moved"]  # the demo styles' updates moved as the merge turned the bases
    assert set(moved) == {"ink", "neon", "sepia"} and all(0 <= value < 1 for value in moved.values()), moved
    assert upload.json()["name"] == "ocean" and upload.json()["source"] == {
        "upload": "ocean.safetensors",
        "bytes": len(ocean),
    }
    assert replies["generic"].status_code == 400 and replies["generic"].json()["error"]["param"] == "name"
    assert replies["pickle"].status_code == 400 and "never pickles" in replies["pickle"].json()["error"]["message"]
    assert replies["fake"].status_code == 400 and "not a safetensors file" in replies["fake"].json()["error"]["message"]
    assert replies["taken"].status_code == 400 and "already exists" in replies["taken"].json()["error"]["message"]
    hub = replies["hub"]
    assert hub.status_code == 201, hub.text
    assert hub.json()["source"]["repo_id"] == "someone/forest-lora"
    assert replies["path"].status_code == 400 and "not a Hub repo id" in replies["path"].json()["error"]["message"]
    names = [entry["name"] for entry in replies["styles"].json()["data"]]
    assert names == ["ink", "neon", "sepia", "ocean", "forest"]
    assert replies["use"].status_code == 200
    assert replies["delete"].status_code == 200 and "ocean" not in replies["delete"].json()["styles"]
    assert replies["deleted"].status_code == 400 and replies["deleted"].json()["error"]["param"] == "style"
    assert replies["again"].status_code == 404
    assert replies["big"].status_code == 413 and "--max-upload-mb" in replies["big"].json()["error"]["message"]
    assert admin_engine.style_names == ["ink", "neon", "sepia"]


def test_a_bank_change_waits_for_the_running_batch(admin_engine, tmp_path):
    engine = admin_engine
    job = engine.validate(ImageRequest(**body(style="ink", seed=3)))
    (before,) = engine.run([job])
    lora = write_demo_lora(engine.pipe.transformer, tmp_path / "late", seed=41, rank=8, alpha=8.0)
    in_call, release = threading.Event(), threading.Event()

    def hold_first_step(module, args):
        in_call.set()
        release.wait(30)

    hook = engine.pipe.transformer.register_forward_pre_hook(hold_first_step)
    outcome = {}
    batch = threading.Thread(target=lambda: outcome.update(batch=engine.run([job])))
    merge = threading.Thread(target=lambda: outcome.update(merge=engine.merge_lora(str(lora), style_name="late")))
    try:
        batch.start()
        assert in_call.wait(30)
        merge.start()
        time.sleep(0.3)
        assert merge.is_alive() and "late" not in engine.style_names  # the merge waits for the batch
    finally:
        release.set()
        batch.join(30)
        merge.join(60)
        hook.remove()
    (during,) = outcome["batch"]
    np.testing.assert_allclose(during.images, before.images, rtol=0, atol=1e-6)  # made with the bank it started with
    assert outcome["merge"].style_name == "late" and engine.style_names[-1] == "late"
    stale = engine.validate(ImageRequest(**body(style="late", seed=3)))
    engine.delete_style("late")
    (gone,) = engine.run([stale])  # validated, then its style was deleted before the call
    assert gone.status == 409 and "deleted while the request waited" in str(gone)


@pytest.fixture(scope="module")
def single_only_bank(tmp_path_factory) -> Path:
    """A Share checkpoint for the tiny model whose only style, "ink", covers the single blocks alone."""
    from share_diffusers import ShareFluxPipeline
    from share_diffusers.tiny_flux import build_tiny_flux_pipeline

    folder = tmp_path_factory.mktemp("single-only")
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    lora = write_demo_lora(pipe.transformer, folder / "ink2", 5, 4, 4.0)
    pipe.merge_lora(lora, style_name="ink", target_modules=r"single_transformer_blocks\.\d+\.attn\.to_[qkv]")
    pipe.save_share_factors(folder / "bank")
    return folder / "bank"


def test_a_bank_replaced_while_requests_wait_fails_only_the_stale_one(single_only_bank):
    """A rollout (a whole new bank) lands between validation and the batch: the request whose per-block
    weights name blocks the new bank does not cover gets its own 409; the plain "ink" batched with it runs."""
    engine = ServingEngine.from_model(TINY_RANDOM, max_images=8)  # its bank is replaced below
    app = create_app(engine, max_batch=8, max_wait_ms=200)
    backend = app.state.backend

    async def scenario():
        async with serving(app) as client:
            async with pipeline_held(backend):
                rollout = asyncio.ensure_future(backend.run_exclusive(engine.load_share_factors, str(single_only_bank)))
                stale = asyncio.ensure_future(client.post(ENDPOINT, json=body(style={"ink": {"double": 1.0}}, seed=1)))
                plain = asyncio.ensure_future(client.post(ENDPOINT, json=body(style="ink", seed=2)))
                await asyncio.sleep(0.5)  # both validated against the old bank, queued behind the rollout
            await rollout
            return await stale, await plain, (await client.get("/metrics")).text

    stale, plain, metrics = asyncio.run(scenario())
    assert stale.status_code == 409, stale.text
    error = stale.json()["error"]
    assert error["param"] == "style"
    assert error["message"] == (
        "the styles changed while the request waited: block weight key 'double' of style 'ink' selects no "
        "Share layer of this model (its blocks: double.0-1, single.0-1)"
    )
    assert plain.status_code == 200, plain.text
    assert plain.json()["share"]["batch_size"] == 1
    reference = direct_call(engine.pipe, body(style="ink", seed=2))  # the new bank's "ink"
    np.testing.assert_allclose(array(plain.json()), reference[0], rtol=0, atol=1e-5)
    assert 'share_errors_total{reason="style_gone"} 1.0' in metrics


def test_a_failed_batch_call_is_retried_job_by_job(engine):
    """A pipeline call that raises for the batch is run again one job at a time: a job whose own call
    succeeds gets its images, a job whose own call fails gets its own error."""
    two = engine.validate(ImageRequest(**body(style="neon", seed=1, n=2)))
    one = engine.validate(ImageRequest(**body(style="ink", seed=3)))
    (alone,) = engine.run([one])

    def refuse_batches(module, args, kwargs):
        if kwargs["hidden_states"].shape[0] > 1:  # (B, tokens, channels): any call of more than one image
            raise RuntimeError("out of memory (simulated)")

    hook = engine.pipe.transformer.register_forward_pre_hook(refuse_batches, with_kwargs=True)
    try:
        failed, computed = engine.run([two, one])
    finally:
        hook.remove()
    assert isinstance(failed, RuntimeError) and str(failed) == "out of memory (simulated)"
    assert isinstance(computed, JobResult) and computed.batch_size == 1
    np.testing.assert_allclose(computed.images, alone.images, rtol=0, atol=1e-6)


# -- operations -----------------------------------------------------------------------------------


def test_metrics_count_requests_batches_and_latency(engine):
    app = create_app(engine, max_batch=4, max_wait_ms=500)

    async def scenario():
        async with serving(app) as client:
            await asyncio.gather(*(client.post(ENDPOINT, json=body(seed=seed)) for seed in range(3)))
            await client.post(ENDPOINT, json=body(style="nope"))
            return await client.get("/metrics")

    reply = asyncio.run(scenario())
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    text = reply.text
    for line in (
        'share_requests_total{endpoint="/v1/images/generations",status="200"} 3.0',
        'share_requests_total{endpoint="/v1/images/generations",status="400"} 1.0',
        'share_errors_total{reason="validation"} 1.0',
        "share_images_total 3.0",
        "share_batch_size_count 1.0",
        "share_batch_size_sum 3.0",
        'share_batch_size_bucket{le="2.0"} 0.0',
        'share_batch_size_bucket{le="3.0"} 1.0',
        "share_queue_seconds_count 3.0",
        "share_compute_seconds_count 1.0",
        "share_queued_images 0.0",
    ):
        assert line in text, line


def test_command_line_defaults_and_errors(capsys):
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.max_batch, args.admin_token) == ("127.0.0.1", 8000, 8, None)
    assert main(["--model", TINY_RANDOM, "--max-batch", "8", "--max-queue", "4"]) == 1  # before loading anything
    assert capsys.readouterr().err.strip() == "error: need 1 <= --max-batch <= --max-queue, got 8 and 4"
    assert main(["--model", TINY_RANDOM, "--quantize", "int4"]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: unknown quantization 'int4': choose int8, float8, nf4 or a .gguf file"
    )
    # uvicorn took port 70000 and listened on 70000 - 65536 = 4464
    assert main(["--model", TINY_RANDOM, "--port", "70000"]) == 1
    assert capsys.readouterr().err.strip() == "error: --port must be from 1 to 65535, got 70000"
    assert main(["--model", TINY_RANDOM, "--max-upload-mb", "0"]) == 1  # every upload refused, silently
    assert capsys.readouterr().err.strip() == "error: --max-upload-mb must be a number above 0, got 0.0"
    help_text = subprocess.run(
        [sys.executable, "-m", "share_diffusers.serving", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert help_text.returncode == 0
    for flag in (
        "--model",
        "--factors",
        "--device",
        "--dtype",
        "--quantize",
        "--host",
        "--max-batch",
        "--max-wait-ms",
        "--admin-token",
    ):
        assert flag in help_text.stdout


# -- the load test --------------------------------------------------------------------------------


def test_bench_serve_quick(tmp_path):
    """``bench_serve.py --quick``: three real servers on loopback, a short closed-loop load each."""
    out = tmp_path / "bench"
    result = run_benchmark("bench_serve.py", "--quick", "--out", str(out), timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["servers"]) == {"share", "share_max_batch_1", "stock_peft"}
    for name, row in report["servers"].items():
        assert row["ok"] > 0 and row["errors"] == 0, (name, row)
        assert row["throughput_images_s"] > 0 and row["p95_s"] >= row["p50_s"] > 0
    assert report["servers"]["share_max_batch_1"]["mean_batch"] == 1.0
    assert report["servers"]["stock_peft"]["mean_batch"] == 1.0
    assert report["servers"]["share"]["mean_batch"] > 1.0  # concurrent clients' styles shared pipeline calls
    assert report["config"]["styles"] >= 8
    assert "| share" in out.with_suffix(".md").read_text()


def test_hub_merges_of_a_peft_adapter_and_of_a_file_over_the_limit(admin_engine, tmp_path, fake_hub, monkeypatch):
    """A PEFT adapter repo merges with its adapter_config.json's scale (fetched with the weights before the
    pipeline is taken); a Hub file over --max-upload-mb is a 413 from its size alone, never downloaded."""
    from flux_helpers import write_peft_adapter_folder
    from huggingface_hub import constants
    from safetensors.torch import load_file

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # nothing cached by an earlier run

    transformer = admin_engine.pipe.transformer
    diffusers_file = write_demo_lora(transformer, tmp_path / "diffusers", seed=33, rank=4, alpha=16.0)
    tensors = load_file(str(diffusers_file))
    fake_hub.add_folder("someone/peft-moss", write_peft_adapter_folder(diffusers_file, tmp_path / "peft", 4, 16))
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def scenario():
        async with serving(create_app(admin_engine, admin_token=TOKEN, max_wait_ms=1)) as client:
            merged = await client.post("/v1/styles", headers=headers, json={"hub_id": "someone/peft-moss"})
        fake_hub.requests.clear()
        async with serving(create_app(admin_engine, admin_token=TOKEN, max_upload_mb=0.01)) as client:
            big = await client.post("/v1/styles", headers=headers, json={"hub_id": "someone/forest-big"})
        return merged, big

    write_demo_lora(transformer, tmp_path / "forest", seed=32, rank=16, alpha=4.0)
    fake_hub.add_folder("someone/forest-big", tmp_path / "forest")
    try:
        merged, big = asyncio.run(scenario())
        assert merged.status_code == 201, merged.text
        assert merged.json()["name"] == "peft-moss"
        layer = "transformer_blocks.0.attn.to_q"
        up, down = tensors[f"transformer.{layer}.lora_B.weight"], tensors[f"transformer.{layer}.lora_A.weight"]
        expected = (16 / 4) * up.double() @ down.double()
        delta = admin_engine.pipe.share_factors.delta_weight(layer, "peft-moss")
        # The bank's compression error on that layer (under 1%), not the 0.75 of a dropped lora_alpha (scale 1, not 4).
        assert float((delta - expected).norm() / expected.norm()) < 0.05
        assert big.status_code == 413, big.text
        message = big.json()["error"]["message"]
        assert re.fullmatch(
            r"someone/forest-big: pytorch_lora_weights.safetensors is 0\.\d+ MiB, over the limit of 0\.01 MiB "
            r"\(--max-upload-mb\)",
            message,
        ), message
        assert not [r for r in fake_hub.requests if r.startswith("GET") and r.endswith(".safetensors")]
        assert "forest-big" not in admin_engine.style_names
    finally:
        if "peft-moss" in admin_engine.style_names:
            admin_engine.delete_style("peft-moss")


# -- hostile and odd requests (found by trying them) ------------------------------------------------


def test_bodies_starlette_refuses_get_our_error_body_and_are_counted(admin_engine):
    """Invalid UTF-8, integers past Python's digit limit, JSON nested past the recursion limit, broken multipart
    and unknown paths were answered with FastAPI's ``{"detail": ...}`` and left out of the metrics."""
    json_type = {"content-type": "application/json"}
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def scenario():
        replies = {}
        async with serving(create_app(admin_engine, admin_token=TOKEN, max_wait_ms=1)) as client:
            post = client.post
            replies["utf8"] = await post(ENDPOINT, content=b'{"prompt": "\xff"}', headers=json_type)
            replies["digits"] = await post(ENDPOINT, content=b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}")
            replies["nested"] = await post(
                ENDPOINT, content=b'{"prompt": "a", "style": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            )
            replies["multipart"] = await post(
                "/v1/styles", content=b"garbage", headers={**headers, "content-type": "multipart/form-data; boundary=z"}
            )
            replies["nested-admin"] = await post(
                "/v1/styles", content=b'{"hub_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", headers=headers
            )
            replies["unknown-path"] = await client.get("/v1/nothing-here")
            replies["metrics"] = await client.get("/metrics")
        return replies

    replies = asyncio.run(scenario())
    for key in ("utf8", "digits", "nested", "multipart", "nested-admin"):
        reply = replies[key]
        assert reply.status_code == 400, (key, reply.text)
        assert reply.json()["error"]["type"] == "invalid_request_error" and reply.json()["error"]["message"], key
    assert replies["nested-admin"].json()["error"]["param"] == "hub_id"
    assert replies["unknown-path"].status_code == 404 and "error" in replies["unknown-path"].json()
    metrics = replies["metrics"].text
    assert 'share_requests_total{endpoint="/v1/images/generations",status="400"} 3.0' in metrics
    assert 'share_requests_total{endpoint="(no route)",status="404"} 1.0' in metrics  # not a label per path
    assert 'share_errors_total{reason="not_found"} 1.0' in metrics


def test_odd_uploads_get_a_400_and_a_slashed_name_can_be_deleted(admin_engine, tmp_path):
    from safetensors.torch import load_file, save

    lora = write_demo_lora(admin_engine.pipe.transformer, tmp_path / "ocean", seed=31, rank=4, alpha=4.0)
    tensors = load_file(str(lora))
    fp8 = save({key: value.to(torch.float8_e4m3fn) for key, value in tensors.items()})
    integers = save({key: (value * 100).to(torch.int8) for key, value in tensors.items()})
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def scenario():
        replies = {}
        async with serving(create_app(admin_engine, admin_token=TOKEN, max_wait_ms=1)) as client:
            post = client.post
            replies["name-as-file"] = await post(
                "/v1/styles", headers=headers, files={"name": ("name.txt", b"ocean")}, data={"file": "x"}
            )
            replies["int8"] = await post("/v1/styles", headers=headers, files={"file": ("q.safetensors", integers)})
            replies["fp8"] = await post(
                "/v1/styles", headers=headers, files={"file": ("f.safetensors", fp8)}, data={"name": "team/ocean"}
            )
            replies["corrupt"] = await post(
                "/v1/styles", headers=headers, files={"file": ("z.safetensors", lora.read_bytes()[:-100])}
            )
            replies["delete"] = await client.delete("/v1/styles/team/ocean", headers=headers)
        return replies

    replies = asyncio.run(scenario())
    assert replies["name-as-file"].status_code == 400 and replies["name-as-file"].json()["error"]["param"] == "name"
    message = replies["int8"].json()["error"]["message"]
    assert replies["int8"].status_code == 400 and "holds int8 values" in message and "q.safetensors" in message
    assert replies["fp8"].status_code == 201, replies["fp8"].text  # float8 LoRAs exist: read as the numbers they hold
    corrupt = replies["corrupt"].json()["error"]["message"]
    assert replies["corrupt"].status_code == 400 and corrupt.startswith("z.safetensors") and "/tmp" not in corrupt
    assert replies["delete"].status_code == 200 and replies["delete"].json()["deleted"] == "team/ocean"
    assert admin_engine.style_names == ["ink", "neon", "sepia"]


def test_a_request_over_the_models_work_limit_is_refused(engine):
    """n=8 at 256x256 and 100 steps passed every per-field limit: 25x the work the studio allows a call."""
    steps = engine.defaults.max_work // (8 * 256 * 256)
    fits = ImageRequest(prompt="a cat", n=8, size="256x256", num_inference_steps=steps)
    assert engine.validate(fits).n == 8  # exactly at the limit
    with pytest.raises(Exception, match="too much work for one request: n=8 x 100 steps x 256x256 pixels"):
        engine.validate(fits.model_copy(update={"num_inference_steps": 100}))
    with pytest.raises(Exception, match=f"n=8 x {steps + 1} steps"):
        engine.validate(fits.model_copy(update={"num_inference_steps": steps + 1}))


def test_a_queued_request_is_not_served_by_another_lora_under_its_styles_name(admin_engine, tmp_path):
    """Deleted and merged again while the request waited: 409, as for a style deleted; not the new LoRA's images."""
    transformer = admin_engine.pipe.transformer
    first = write_demo_lora(transformer, tmp_path / "a", seed=31, rank=4, alpha=4.0).read_bytes()
    second = write_demo_lora(transformer, tmp_path / "b", seed=77, rank=4, alpha=4.0).read_bytes()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    request = body(style="ocean", seed=5)

    async def scenario():
        app = create_app(admin_engine, admin_token=TOKEN, max_wait_ms=3000)
        backend = app.state.backend
        async with serving(app) as client:
            await client.post("/v1/styles", headers=headers, files={"file": ("ocean.safetensors", first)})
            async with pipeline_held(backend):
                queued = asyncio.ensure_future(client.post(ENDPOINT, json=request))
                await until(lambda: backend.queued_images >= 1)
                delete = asyncio.ensure_future(client.delete("/v1/styles/ocean", headers=headers))
                await asyncio.sleep(0.1)
                merge = asyncio.ensure_future(
                    client.post("/v1/styles", headers=headers, files={"file": ("ocean.safetensors", second)})
                )
                await asyncio.sleep(0.3)
            replies = await delete, await merge, await queued
            again = await client.post(ENDPOINT, json=request)  # sent again: the new LoRA's images
            await client.delete("/v1/styles/ocean", headers=headers)
        return (*replies, again)

    deleted, merged, queued, again = asyncio.run(scenario())
    assert deleted.status_code == 200 and merged.status_code == 201
    assert queued.status_code == 409 and "merged again while the request waited" in queued.json()["error"]["message"]
    assert again.status_code == 200
    assert admin_engine.style_names == ["ink", "neon", "sepia"]
