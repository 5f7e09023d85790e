"""Serving load test: concurrent clients with different styles against three servers on loopback, in one run.

    python benchmarks/bench_serve.py --out results/bench_serve            # demo model on the CPU (a few minutes)
    python benchmarks/bench_serve.py --quick --out /tmp/bench_serve       # CI-sized (under a minute)
    python benchmarks/bench_serve.py --model flux1-random --device cuda --dtype bfloat16   # one GPU

Servers, each its own process, measured one after another with nothing else running:

- ``share``: ``python -m share_diffusers.serving`` (dynamic batching: every request its own style, denoised
  together, up to ``--max-batch`` images a call);
- ``share_max_batch_1``: the same server with ``--max-batch 1`` (one request per call);
- ``stock_peft``: a baseline on stock diffusers + PEFT, as a server without Share would be built: a
  ``FluxPipeline`` with every style loaded by ``load_lora_weights(file, adapter_name=...)``, one request at
  a time, ``set_adapters([style], [scale])`` before each.

All three serve the same model and the same styles: ``--styles`` random LoRAs (rank ``--lora-rank``, small
weights) written as ordinary diffusers files on the model's attention linears, merged as Share styles for the
first two and loaded as PEFT adapters for the third. The same request body goes to each (OpenAI's
``/v1/images/generations`` plus ``style`` and ``seed``).

Load: ``--clients`` clients in a closed loop (each sends its next request when the last is answered) for
``--duration`` seconds per server, split in ``--rounds`` rounds that alternate between the servers (A B C A B C,
so that the load of a shared machine falls on all of them alike); every request a random style, prompt and
seed (seeded: every server gets the same sequence). Requests sent before a round ends are waited for. After
a warm-up (one request per client at once, not counted): throughput (images per second over the rounds'
time, first request to last answer), p50 / p95 latency, and the mean batch size (images per pipeline call,
from the server's ``/metrics``; 1 for the others by construction).

Models: ``demo`` (default): the embedded demo model (a small Flux trained on Fashion-MNIST, 32x32, 16 steps,
true CFG at 3.0: two transformer passes a step). ``flux1-random``: a transformer of FLUX.1-dev's size and
configuration with random weights (as in ``bench_gpu.py``), FLUX.1's VAE configuration (random), and random
one-layer CLIP / T5 encoders of FLUX.1's widths with 512 T5 tokens; 512x512, 4 steps, guidance input 3.5.
The report goes to stdout as markdown, and to ``<out>.md`` / ``<out>.json`` with ``--out``; progress to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SIDES = ("share", "share_max_batch_1", "stock_peft")
PROMPTS = tuple(
    f"a photo of a {name}"
    for name in (
        "t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"
    )
)  # fmt: skip
MODELS = {
    # size, steps, guidance, LoRA rank, LoRA factor scale (entries of A and B ~ N(0, scale^2))
    "demo": dict(size=32, steps=16, guidance=3.0, lora_rank=4, lora_scale=0.05),
    "flux1-random": dict(size=512, steps=4, guidance=3.5, lora_rank=16, lora_scale=0.02),
}
FLUX1_T5_TOKENS = 512


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Models


def build_pipeline(model: str, pipeline_class, device: str, dtype: str, flux_blocks: tuple[int, int] = (19, 38)):
    """The benchmark's pipeline of ``pipeline_class`` (``ShareFluxPipeline`` or stock ``FluxPipeline``);
    ``flux_blocks``: double and single blocks of ``flux1-random`` (FLUX.1: 19 and 38; fewer for a smoke run)."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if model == "demo":
        from share_diffusers.fashion.model import load_demo_pipeline

        pipe = load_demo_pipeline(pipeline_class=pipeline_class)
        return pipe.to(device=device, dtype=torch_dtype)
    if model == "flux1-random":
        return _flux1_random(pipeline_class, device, torch_dtype, flux_blocks)
    raise ValueError(f"unknown model {model!r}; one of {', '.join(MODELS)}")


def _flux1_random(pipeline_class, device: str, dtype, blocks: tuple[int, int]):
    """FLUX.1-dev's transformer (random, built on the meta device and filled on ``device``), FLUX.1's VAE
    configuration (random), one-layer CLIP-L / T5-XXL-width encoders (random) and the tiny tokenizers."""
    import torch
    from common import fill_random_
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from share_diffusers.tiny_flux import build_tokenizers

    with torch.device("meta"):
        transformer = _flux1_meta_transformer(blocks)
    transformer = transformer.to(dtype).to_empty(device=device)
    fill_random_(transformer, torch.device(device), seed=0)
    torch.manual_seed(1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=16,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip_tokenizer, t5_tokenizer = build_tokenizers()
    t5_tokenizer.model_max_length = FLUX1_T5_TOKENS
    torch.manual_seed(2)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=clip_tokenizer.vocab_size,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=1,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            bos_token_id=clip_tokenizer.bos_token_id,
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    torch.manual_seed(3)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=t5_tokenizer.vocab_size,
            d_model=4096,
            d_kv=64,
            d_ff=1024,
            num_layers=1,
            num_heads=8,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
    )
    for module in (vae, clip, t5):
        module.to(device=device, dtype=dtype).eval().requires_grad_(False)
    pipe = pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer.eval().requires_grad_(False),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_files(folder: Path) -> dict[str, Path]:
    """``style name -> .safetensors`` of the benchmark's LoRAs, in order."""
    return {path.parent.name: path for path in sorted(folder.glob("*/pytorch_lora_weights.safetensors"))}


def write_loras(
    model: str, folder: Path, styles: int, rank: int, scale: float, flux_blocks: tuple[int, int] = (19, 38)
) -> dict[str, Path]:
    """``styles`` random LoRAs on the model's attention linears, as diffusers files (shapes from a meta model)."""
    import torch

    from share_diffusers.demo_styles import write_demo_lora

    if model == "demo":
        from diffusers import FluxTransformer2DModel

        from share_diffusers.fashion.model import TRANSFORMER_CONFIG

        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**TRANSFORMER_CONFIG)
    else:
        with torch.device("meta"):
            transformer = _flux1_meta_transformer(flux_blocks)
    for index in range(styles):
        write_demo_lora(transformer, folder / f"style{index}", seed=100 + index, rank=rank, alpha=rank, scale=scale)
    return lora_files(folder)


def _flux1_meta_transformer(blocks: tuple[int, int]):
    """FLUX.1-dev's transformer configuration (build it under ``torch.device("meta")``)."""
    from common import flux1_transformer  # torch-heavy: only the server and the writer of LoRAs need it

    return flux1_transformer(blocks[0], blocks[1], heads=24, joint_dim=4096, pooled_dim=768)


def merge_styles(pipe, loras: dict[str, Path]) -> None:
    """Merge the LoRAs as Share styles, continually (k = 32, p = 8)."""
    from share_diffusers.core import ShareConfig

    for name, path in loras.items():
        first = pipe.share_factors is None
        pipe.merge_lora(str(path), style_name=name, config=ShareConfig(rank=32, pseudo_rank=8) if first else None)


# ----------------------------------------------------------------------------------------------
# Servers (``bench_serve.py server ...`` runs one; the demo model's Share server is the real CLI)


def stock_app(pipe, model: str, guidance_default: float, size_default: int, steps_default: int):
    """The baseline: stock ``FluxPipeline`` + PEFT adapters, one request at a time, ``set_adapters`` before each."""
    import base64
    import io

    import numpy as np
    import torch
    from fastapi import FastAPI
    from PIL import Image

    from share_diffusers.pipeline_flux import guidance_arguments

    app = FastAPI()
    lock = asyncio.Lock()
    # What ShareFluxPipeline does on its own: the T5 length the tokenizer caps (16 on the demo model).
    max_sequence_length = min(getattr(pipe.tokenizer_2, "model_max_length", 512), 512)

    def generate(body: dict) -> tuple[list[str], float]:
        n = body.get("n", 1)
        width, height = (int(side) for side in body.get("size", f"{size_default}x{size_default}").split("x"))
        style = body.get("style")
        start = time.perf_counter()
        if style is None:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters([style], [float(body.get("style_scale", 1.0))])
        images = pipe(
            prompt=[body["prompt"]] * n,
            generator=[torch.Generator().manual_seed(body["seed"] + i) for i in range(n)],
            num_inference_steps=body.get("num_inference_steps") or steps_default,
            width=width,
            height=height,
            max_sequence_length=max_sequence_length,
            output_type="np",
            **guidance_arguments(pipe, body.get("guidance_scale") or guidance_default, n),
        ).images
        compute_s = time.perf_counter() - start
        encoded = []
        for image in np.asarray(images):
            buffer = io.BytesIO()
            Image.fromarray((image * 255).round().astype("uint8")).save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return encoded, compute_s

    @app.post("/v1/images/generations")
    async def generations(body: dict):
        arrived = time.perf_counter()
        async with lock:
            started = time.perf_counter()
            encoded, compute_s = await asyncio.to_thread(generate, body)
        share = {"batch_size": body.get("n", 1), "queue_ms": (started - arrived) * 1e3, "compute_ms": compute_s * 1e3}
        return {"created": int(time.time()), "data": [{"b64_json": text} for text in encoded], "share": share}

    @app.get("/healthz")
    async def health():
        return {"status": "ok", "styles": pipe.get_list_adapters().get("transformer", [])}

    return app


def run_server(argv: Sequence[str]) -> int:
    """``bench_serve.py server --side share|stock ...``: one server of the benchmark (a child process)."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="bench_serve.py server")
    parser.add_argument("--side", choices=("share", "stock"), required=True)
    parser.add_argument("--model", choices=tuple(MODELS), default="demo")
    parser.add_argument("--loras", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--flux-blocks", default="19,38")
    args = parser.parse_args(argv)
    settings = MODELS[args.model]
    blocks = _blocks(args.flux_blocks)
    loras = lora_files(Path(args.loras))
    if args.side == "stock":
        from diffusers import FluxPipeline

        pipe = build_pipeline(args.model, FluxPipeline, args.device, args.dtype, blocks)
        for name, path in loras.items():
            pipe.load_lora_weights(str(path), adapter_name=name)
        app = stock_app(pipe, args.model, settings["guidance"], settings["size"], settings["steps"])
    else:
        from share_diffusers.pipeline_flux import ShareFluxPipeline
        from share_diffusers.runtime import GenerationDefaults
        from share_diffusers.serving.api import create_app
        from share_diffusers.serving.engine import ServingEngine

        pipe = build_pipeline(args.model, ShareFluxPipeline, args.device, args.dtype, blocks)
        merge_styles(pipe, loras)
        size = settings["size"]
        defaults = GenerationDefaults(
            width=size,
            height=size,
            steps=settings["steps"],
            guidance=settings["guidance"],
            size_step=2 * pipe.vae_scale_factor,
            max_size=max(size, 2048),
            pixel_art=False,
        )
        engine = ServingEngine(pipe, defaults, max_images=args.max_batch)
        app = create_app(engine, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=64)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


def _blocks(text: str) -> tuple[int, int]:
    double, single = (int(part) for part in text.split(","))
    return double, single


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    side: str
    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(side: str, args: argparse.Namespace, workdir: Path) -> Server:
    port = _free_port()
    max_batch = 1 if side == "share_max_batch_1" else args.max_batch
    common = ["--port", str(port), "--device", args.device, "--dtype", args.dtype]
    if side != "stock_peft" and args.model == "demo":  # the real command line, loading the saved checkpoint
        command = [sys.executable, "-m", "share_diffusers.serving", "--factors", str(workdir / "factors")]
        command += ["--max-batch", str(max_batch), "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "64"]
        command += [*common, "--log-level", "warning"]
    else:
        kind = "stock" if side == "stock_peft" else "share"
        command = [sys.executable, str(Path(__file__).resolve()), "server", "--side", kind, "--model", args.model]
        command += ["--loras", str(workdir / "loras"), "--max-batch", str(max_batch)]
        command += ["--max-wait-ms", str(args.max_wait_ms), "--flux-blocks", args.flux_blocks, *common]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    log_path = workdir / f"{side}.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    return Server(side, port, process, log_path)


def wait_ready(server: Server, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.side} server exited:\n{server.log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200:
                log(f"{server.side}: ready after {timeout - (deadline - time.monotonic()):.1f} s")
                return
        time.sleep(0.2)
    raise TimeoutError(f"{server.side} server not ready after {timeout:.0f} s:\n{server.log_path.read_text()[-3000:]}")


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(30)


# ----------------------------------------------------------------------------------------------
# Load


@dataclass
class Record:
    start: float
    end: float
    status: int
    images: int
    batch_size: int


def request_body(rng: random.Random, styles: Sequence[str], args: argparse.Namespace) -> dict:
    return {
        "prompt": rng.choice(PROMPTS),
        "style": rng.choice(styles),
        "seed": rng.randrange(2**31),
        "size": f"{args.size}x{args.size}",
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
    }


async def closed_loop(
    url: str, styles: Sequence[str], args: argparse.Namespace, duration: float, seed: int, each: int | None = None
):
    """``args.clients`` clients, each sending its next request when the last is answered, for ``duration`` s
    (or ``each`` requests per client)."""
    import httpx

    records: list[Record] = []
    limits = httpx.Limits(max_connections=args.clients * 2, max_keepalive_connections=args.clients * 2)
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + duration

        async def one_client(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            sent = 0
            while (time.perf_counter() < deadline) if each is None else sent < each:
                sent += 1
                body = request_body(rng, styles, args)
                start = time.perf_counter()
                try:
                    reply = await client.post("/v1/images/generations", json=body)
                    status = reply.status_code
                    payload = reply.json() if status == 200 else {}
                except httpx.HTTPError:
                    status, payload = 0, {}
                end = time.perf_counter()
                images = len(payload.get("data", []))
                records.append(Record(start, end, status, images, payload.get("share", {}).get("batch_size", 0)))

        await asyncio.gather(*(one_client(index) for index in range(args.clients)))
    return t0, records


def server_batches(url: str) -> tuple[float, float] | None:
    """``(sum, count)`` of the server's ``share_batch_size`` histogram, or None if it has none (stock)."""
    import httpx

    reply = httpx.get(f"{url}/metrics", timeout=30)
    if reply.status_code != 200:
        return None
    values = dict(re.findall(r"^(share_batch_size_(?:sum|count)) ([0-9.e+]+)$", reply.text, flags=re.MULTILINE))
    if len(values) != 2:
        return None
    return float(values["share_batch_size_sum"]), float(values["share_batch_size_count"])


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def warm_up(server: Server, styles: Sequence[str], args: argparse.Namespace) -> None:
    """One request per client, all at once (not counted): first calls, the full batch's shapes."""
    log(f"{server.side}: warm-up")
    asyncio.run(closed_loop(server.url, styles, args, duration=0.0, seed=args.seed + 999, each=1))


@dataclass
class Round:
    records: list[Record]
    elapsed: float
    batches: tuple[float, float] | None  # (images, pipeline calls) in the round, from /metrics


def run_round(server: Server, styles: Sequence[str], args: argparse.Namespace, index: int) -> Round:
    duration = args.duration / args.rounds
    before = server_batches(server.url)
    t0, records = asyncio.run(closed_loop(server.url, styles, args, duration=duration, seed=args.seed + index))
    after = server_batches(server.url)
    elapsed = max(record.end for record in records) - t0
    batches = None
    if before is not None and after is not None:
        batches = (after[0] - before[0], after[1] - before[1])
    ok = sum(record.status == 200 for record in records)
    log(f"{server.side}: round {index + 1}/{args.rounds}: {ok} requests answered in {elapsed:.1f} s")
    return Round(records, elapsed, batches)


def summarize(side: str, rounds: Sequence[Round]) -> dict:
    records = [record for round_ in rounds for record in round_.records]
    ok = [record for record in records if record.status == 200]
    latencies = [record.end - record.start for record in ok]
    elapsed = sum(round_.elapsed for round_ in rounds)
    images = sum(record.images for record in ok)
    counted = [round_.batches for round_ in rounds if round_.batches is not None]
    calls = sum(count for _, count in counted)
    if counted and calls:
        mean_batch = sum(total for total, _ in counted) / calls
    else:  # no /metrics (the stock server): one request per pipeline call
        mean_batch = statistics.fmean(record.batch_size for record in ok) if ok else 0.0
    row = {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "images": images,
        "elapsed_s": elapsed,
        "throughput_images_s": images / elapsed if elapsed > 0 else 0.0,
        "p50_s": percentile(latencies, 0.5) if latencies else float("nan"),
        "p95_s": percentile(latencies, 0.95) if latencies else float("nan"),
        "mean_batch": mean_batch,
        "mean_batch_per_request": statistics.fmean(record.batch_size for record in ok) if ok else 0.0,
        "rounds": [{"elapsed_s": r.elapsed, "ok": sum(x.status == 200 for x in r.records)} for r in rounds],
    }
    log(
        f"{side}: {row['ok']} ok / {row['errors']} errors, {row['throughput_images_s']:.2f} images/s, "
        f"p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, mean batch {row['mean_batch']:.2f}"
    )
    return row


# ----------------------------------------------------------------------------------------------
# Report


def report_markdown(result: dict) -> str:
    config, servers = result["config"], result["servers"]
    stock = servers.get("stock_peft")
    lines = [
        "# Serving: Share's dynamic batching against one request at a time",
        "",
        f"{result['environment']['date']}; {result['environment']['where']}; {config['model']} model, "
        f"{config['size']}x{config['size']}, {config['steps']} steps, guidance {config['guidance']}; "
        f"{config['clients']} clients in a closed loop for {config['duration_s']:g} s per server ({config['rounds']} "
        f"interleaved rounds), every request a "
        f"random style out of {config['styles']} (rank-{config['lora_rank']} LoRAs); share: --max-batch "
        f"{config['max_batch']}, --max-wait-ms {config['max_wait_ms']:g}; server threads: "
        f"{config['threads'] or 'torch default'}."
        + (" **--quick: CI-sized, numbers not meaningful.**" if config["quick"] else ""),
        "",
        "| server | requests | images | throughput (images/s) | p50 latency (s) | p95 latency (s) | mean batch "
        "| throughput vs stock |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for side, row in servers.items():
        versus = f"{row['throughput_images_s'] / stock['throughput_images_s']:.2f}x" if stock else ""
        lines.append(
            f"| {side} | {row['ok']} (+{row['errors']} errors) | {row['images']} | {row['throughput_images_s']:.2f} "
            f"| {row['p50_s']:.2f} | {row['p95_s']:.2f} | {row['mean_batch']:.2f} | {versus} |"
        )
    for side, error in result.get("failed", {}).items():
        first_line = (error.splitlines() or ["?"])[0][:200]
        lines.append(f"| {side} | failed: {first_line} | | | | | | |")
    if result.get("targets"):
        lines += ["", "| target | measured | |", "| --- | --- | --- |"]
        for target in result["targets"]:
            lines.append(f"| {target['target']} | {target['measured']} | {'met' if target['met'] else 'NOT met'} |")
    return "\n".join(lines) + "\n"


def targets(servers: dict) -> list[dict]:
    share, stock = servers.get("share"), servers.get("stock_peft")
    if not share or not stock or not stock["throughput_images_s"]:
        return []
    speedup = share["throughput_images_s"] / stock["throughput_images_s"]
    return [
        {
            "target": "throughput >= 2x the stock baseline",
            "measured": f"{speedup:.2f}x",
            "met": speedup >= 2.0,
        },
        {
            "target": "p95 latency no worse than the stock baseline",
            "measured": f"{share['p95_s']:.2f} s vs {stock['p95_s']:.2f} s",
            "met": share["p95_s"] <= stock["p95_s"],
        },
        {"target": "mean batch > 4", "measured": f"{share['mean_batch']:.2f}", "met": share["mean_batch"] > 4},
    ]


def environment(args: argparse.Namespace) -> dict:
    import diffusers
    import peft
    import torch

    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") and torch.cuda.is_available() else None
    where = f"{gpu}" if gpu else f"CPU, {os.cpu_count()} cores ({platform.machine()})"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "where": where,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "argv": sys.argv,
    }


def error_summary(error: BaseException, limit: int = 2000) -> str:
    """``Type: message``, its head and its tail when long (a server's log: the cause is often at either end)."""
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else f"{text[: limit // 2]}\n[...]\n{text[-limit // 2 :]}"


def write_result(args, styles: list[str], servers: dict, failed: dict[str, str], final: bool) -> None:
    """The report as markdown and JSON (``--out``); printed too when ``final``."""
    result = {
        "config": {
            "model": args.model,
            "device": args.device,
            "dtype": args.dtype,
            "clients": args.clients,
            "styles": len(styles),
            "duration_s": args.duration,
            "rounds": args.rounds,
            "steps": args.steps,
            "size": args.size,
            "guidance": args.guidance,
            "lora_rank": args.lora_rank,
            "flux_blocks": args.flux_blocks if args.model == "flux1-random" else None,
            "max_batch": args.max_batch,
            "max_wait_ms": args.max_wait_ms,
            "threads": args.threads,
            "quick": args.quick,
        },
        "environment": environment(args),
        "servers": servers,
        "failed": failed,
    }
    result["targets"] = targets(servers)
    markdown = report_markdown(result)
    if final:
        print(markdown, flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(markdown)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["server"]:
        return run_server(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: 2 steps, 2 s per server, one round")
    parser.add_argument("--model", choices=tuple(MODELS), default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--styles", type=int, default=8)
    parser.add_argument("--duration", type=float, default=None, help="seconds of load per server (default 60)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds the duration is split in (3)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=20.0)
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument(
        "--flux-blocks", default="19,38", help="flux1-random: double,single blocks (FLUX.1: 19,38; fewer to smoke-test)"
    )
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of each server (default: torch's, 1 with --quick: on a busy machine, spinning OpenMP "
        "threads of several processes slow each other down many times over)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    settings = MODELS[args.model]
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.duration = args.duration if args.duration is not None else (2.0 if args.quick else 60.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.threads = args.threads or (1 if args.quick else None)
    args.steps = args.steps or (2 if args.quick else settings["steps"])
    args.size = args.size or settings["size"]
    args.guidance = args.guidance if args.guidance is not None else settings["guidance"]
    args.lora_rank = args.lora_rank or settings["lora_rank"]
    if args.styles < 1 or args.clients < 1:
        parser.error("--styles and --clients must be positive")

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        log(f"writing {args.styles} random rank-{args.lora_rank} LoRAs for the {args.model} model, merging them")
        loras = write_loras(
            args.model,
            workdir / "loras",
            args.styles,
            args.lora_rank,
            settings["lora_scale"],
            _blocks(args.flux_blocks),
        )
        styles = list(loras)
        if args.model == "demo":  # the CLI server loads a saved checkpoint; the others merge at start
            from share_diffusers.pipeline_flux import ShareFluxPipeline

            pipe = build_pipeline(args.model, ShareFluxPipeline, "cpu", "float32")
            merge_styles(pipe, loras)
            pipe.save_share_factors(workdir / "factors")
            del pipe
        log("LoRAs written" + (" and merged into a Share checkpoint" if args.model == "demo" else ""))
        # Small models: every server started and ready first (an idle server costs nothing), then rounds
        # that interleave them (A B C A B C ...), so that a machine's changing load falls on all of them.
        # Big ones (a GPU's memory): one server at a time, all its rounds.
        together = args.model == "demo"
        rounds: dict[str, list[Round]] = {side: [] for side in args.sides}
        failed: dict[str, str] = {}
        started: dict[str, Server] = {}
        try:
            if together:
                started = {side: start_server(side, args, workdir) for side in args.sides}
                for server in started.values():
                    wait_ready(server, args.startup_timeout)
                for server in started.values():
                    warm_up(server, styles, args)
                for index in range(args.rounds):
                    for side in args.sides:
                        rounds[side].append(run_round(started[side], styles, args, index))
            else:
                # Share and the stock baseline first (the comparison the targets are about), and the report
                # written after every side, so that a run cut off by a time limit keeps what it measured.
                for side in sorted(args.sides, key=lambda side: side == "share_max_batch_1"):
                    started[side] = server = start_server(side, args, workdir)
                    try:  # a side that fails is reported, and the others still run
                        wait_ready(server, args.startup_timeout)
                        warm_up(server, styles, args)
                        rounds[side] = [run_round(server, styles, args, index) for index in range(args.rounds)]
                    except Exception as error:
                        failed[side] = error_summary(error)
                        log(f"{side} failed: {failed[side]}")
                    finally:
                        stop_server(server)
                    done = {side: summarize(side, rounds[side]) for side in rounds if rounds[side]}
                    write_result(args, styles, done, failed, final=False)
        finally:
            for server in started.values():
                stop_server(server)
        servers = {side: summarize(side, rounds[side]) for side in args.sides if side not in failed}
    write_result(args, styles, servers, failed, final=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
