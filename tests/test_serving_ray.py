"""The serving app on Ray Serve (``share_diffusers.serving.ray_app``): a local Ray instance on the CPU, the tiny
pipeline, two replicas. Requests of different styles batched on the replicas give the images single
requests give, and the images the engine makes in this process; a new checkpoint revision reaches both
running replicas in place.

The app is deployed from :func:`serve_config` the way ``serve run config.yaml`` / ``serve deploy`` do
(Ray's declarative API, where a new ``user_config`` is a lightweight update). One Ray start and one
deployment for the module: about a minute on two busy cores.
"""

from __future__ import annotations

import base64
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from share_diffusers.demo_styles import write_demo_lora  # noqa: E402
from share_diffusers.hub import HubError  # noqa: E402
from share_diffusers.runtime import TINY_RANDOM  # noqa: E402
from share_diffusers.serving.engine import ServingEngine  # noqa: E402
from share_diffusers.serving.ray_app import ShareFluxDeployment, build_app, pinned_revision, serve_config  # noqa: E402
from share_diffusers.serving.schema import ImageRequest  # noqa: E402

STEPS = 2
REQUESTS = [
    {"prompt": "a photo of a cat", "style": "ink", "seed": 1},
    {"prompt": "a photo of a dog", "style": "neon", "seed": 2},
    {"prompt": "a photo of a cat", "style": "sepia", "seed": 3},
    {"prompt": "a red house", "style": None, "seed": 4},
    {"prompt": "a photo of a cat", "style": {"ink": 0.5, "neon": 0.5}, "seed": 5},
    {"prompt": "a photo of a tree", "style": "neon", "style_scale": 0.5, "seed": 6},
]
REPLICA = dict(model=TINY_RANDOM, num_replicas=2, max_batch=8, max_wait_ms=400, ray_actor_options={"num_cpus": 1})


DEPLOY_TIMEOUT_S = 300  # Ray's own blocking deploy gives up after 60 s, which a busy 2-core CI machine exceeded


def deploy(config: dict) -> None:
    """What ``serve run config.yaml`` does with a config file (the declarative API), then wait until every
    application runs and the HTTP proxy serves it."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    client = _get_global_client()
    schema = ServeDeploySchema.model_validate(config)
    client.deploy_apps(schema, _blocking=False)
    names = {app.name for app in schema.applications}
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    while True:
        statuses = {name: app.status.value for name, app in serve.status().applications.items() if name in names}
        if len(statuses) == len(names) and set(statuses.values()) == {"RUNNING"}:
            break
        if "DEPLOY_FAILED" in statuses.values() or time.monotonic() > deadline:
            raise TimeoutError(f"the Serve applications are not running: {statuses} ({serve.status().applications})")
        time.sleep(0.5)
    client.wait_for_proxies_serving(wait_for_applications_running=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _image(response: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(response["data"][0]["b64_npy"])))


@pytest.fixture(scope="module")
def ray_url():
    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(serve_config(**REPLICA))
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(url: str, body: dict) -> dict:
    response = httpx.post(
        f"{url}/v1/images/generations",
        json={**body, "num_inference_steps": STEPS, "response_format": "b64_npy"},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_two_replicas_batch_styles_like_single_requests(ray_url):
    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        batched = list(pool.map(lambda body: _post(ray_url, body), REQUESTS))
    assert max(reply["share"]["batch_size"] for reply in batched) >= 2  # requests did share pipeline calls
    assert sum(reply["share"]["batch_size"] for reply in batched) >= len(REQUESTS)
    singles = [_post(ray_url, body) for body in REQUESTS]
    assert [reply["share"]["batch_size"] for reply in singles] == [1] * len(REQUESTS)
    # An independent computation: the engine in this process, one pipeline call per request.
    engine = ServingEngine.from_model(TINY_RANDOM)
    for body, together, alone in zip(REQUESTS, batched, singles, strict=True):
        job = engine.validate(ImageRequest(**body, num_inference_steps=STEPS))
        (local,) = engine.run([job])
        np.testing.assert_allclose(_image(together), _image(alone), rtol=0, atol=1e-5)
        np.testing.assert_allclose(_image(together), local.images[0], rtol=0, atol=1e-5)


def _replicas(url: str) -> dict[str, dict]:
    """``/healthz`` of each replica: the router spreads requests over both."""
    seen = {}
    deadline = time.monotonic() + 60
    while len(seen) < 2 and time.monotonic() < deadline:
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        seen[health["replica"]] = health
    return seen


def test_new_checkpoint_rolls_out_to_every_replica(ray_url, tmp_path):
    from share_diffusers import ShareFluxPipeline
    from share_diffusers.tiny_flux import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    for seed, name in ((21, "ocean"), (22, "forest")):
        pipe.merge_lora(write_demo_lora(pipe.transformer, tmp_path / name, seed, 4, 4.0), style_name=name)
    pipe.save_share_factors(tmp_path / "v2")
    before = _replicas(ray_url)
    assert [health["styles"] for health in before.values()] == [["ink", "neon", "sepia"]] * 2

    deploy(serve_config(**REPLICA, factors=str(tmp_path / "v2")))
    seen = _replicas(ray_url)
    assert set(seen) == set(before)  # the same two replicas, reconfigured in place (no restart)
    for health in seen.values():
        assert health["styles"] == ["ocean", "forest"]
        assert health["checkpoint"]["factors"] == str(tmp_path / "v2")
    assert _post(ray_url, {"prompt": "a photo of a cat", "style": "forest", "seed": 0})["share"]["batch_size"] == 1
    refused = httpx.post(f"{ray_url}/v1/images/generations", json={"prompt": "a cat", "style": "ink"}, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "style"
    admin = httpx.delete(f"{ray_url}/v1/styles/ocean", timeout=30)
    assert admin.status_code == 403 and "checkpoint revision" in admin.json()["error"]["message"]


def test_config_file_listens_on_this_machine_unless_told():
    """Ray's config schema binds 0.0.0.0 when a file names no host: :func:`serve_config` names 127.0.0.1."""
    from ray.serve.schema import ServeDeploySchema

    options = ServeDeploySchema.model_validate(serve_config(TINY_RANDOM)).http_options
    assert (options.host, options.port) == ("127.0.0.1", 8000)
    options = ServeDeploySchema.model_validate(serve_config(TINY_RANDOM, host="0.0.0.0", port=9000)).http_options
    assert (options.host, options.port) == ("0.0.0.0", 9000)


def test_hub_checkpoint_revision_is_pinned_to_its_commit(fake_hub, tmp_path):
    """Every replica loads the commit the revision pointed at when the config was made, not the branch."""
    (tmp_path / "share_config.json").write_text("{}")
    for revision in ("main", "v2"):
        fake_hub.add_folder("someone/styles", tmp_path, revision=revision)

    def user_config(factors, revision=None) -> dict:
        return serve_config(TINY_RANDOM, factors, revision)["applications"][0]["deployments"][0]["user_config"]

    assert user_config("someone/styles", "v2") == {
        "factors": "someone/styles",
        "revision": fake_hub.commit("someone/styles", "v2"),
    }
    assert user_config("someone/styles")["revision"] == fake_hub.commit("someone/styles", "main")
    asked = len(fake_hub.requests)
    commit = "0123456789abcdef0123456789abcdef01234567"
    assert pinned_revision("someone/styles", commit) == commit  # a commit already: the Hub is not asked
    assert pinned_revision(str(tmp_path), None) is None  # a local folder (serve_config checks it loads)
    assert pinned_revision(None, None) is None
    assert len(fake_hub.requests) == asked
    with pytest.raises(HubError, match=r"could not resolve revision 'v3' of the Hub checkpoint 'someone/styles'"):
        pinned_revision("someone/styles", "v3")


def test_a_checkpoint_that_does_not_load_is_refused_before_any_replica_is_touched(tmp_path):
    """A rollout to a missing or half-written folder stopped every replica (each failed to load it in
    reconfigure, and Ray replaced them with replicas failing alike): an outage until the old config came back."""
    from share_diffusers import ShareFluxPipeline
    from share_diffusers.core import ShareCheckpointError
    from share_diffusers.tiny_flux import build_tiny_flux_pipeline

    with pytest.raises(ValueError, match="'/no/such/bank' is neither a local Share checkpoint folder nor a Hub"):
        serve_config(TINY_RANDOM, "/no/such/bank")
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.merge_lora(write_demo_lora(pipe.transformer, tmp_path / "ocean", 21, 4, 4.0), style_name="ocean")
    pipe.save_share_factors(tmp_path / "half-written")
    weights = next((tmp_path / "half-written").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for make in (serve_config, build_app):
        with pytest.raises(ShareCheckpointError, match="half-written"):
            make(TINY_RANDOM, str(tmp_path / "half-written"))
    with pytest.raises(ValueError, match="max_batch must be a whole number of at least 1, got 0"):
        build_app(TINY_RANDOM, max_batch=0)  # Ray said "max_ongoing_requests: Input should be greater than 0"
    with pytest.raises(ValueError, match="max_wait_ms must be a finite number of at least 0, got -5"):
        serve_config(TINY_RANDOM, max_wait_ms=-5)  # Ray took it


def test_a_replica_keeps_its_bank_when_a_new_checkpoint_fails_to_load(caplog):
    """The folder can break between the config check and a replica's load: the replica goes on serving the bank
    it holds (raising would make Ray stop it); a replica with no bank yet cannot serve and raises."""
    import asyncio

    from share_diffusers.core import ShareCheckpointError

    class Replica:
        checkpoint = ("/styles/v1", None)

        async def run_exclusive(self, function, *args):
            return function(*args)

        def _load_checkpoint(self, factors, revision):
            raise ShareCheckpointError(f"{factors}: the weights file is cut short")

    replica = Replica()
    reconfigure = ShareFluxDeployment.func_or_class.reconfigure
    asyncio.run(reconfigure(replica, {"factors": "/styles/v2", "revision": None}))
    assert replica.checkpoint == ("/styles/v1", None)
    assert "did not load: /styles/v2: the weights file is cut short" in caplog.text
    replica.checkpoint = None
    with pytest.raises(ShareCheckpointError, match="cut short"):
        asyncio.run(reconfigure(replica, {"factors": "/styles/v2", "revision": None}))
