"""GPU benchmark: Share against stock diffusers + PEFT on a FLUX.1-sized transformer, on one GPU, in a few minutes.

Run on a machine with one H100 / H200 (diffusers and this repository on ``PYTHONPATH``)::

    python benchmarks/bench_gpu.py --out results/bench_gpu

``--quick`` runs the same code at toy widths on the CPU (float32) in well under a minute; its numbers
mean nothing, it checks that every section runs. The report goes to stdout as markdown and to
``<out>.md`` and ``<out>.json``, both rewritten after every section, so a run cut off by a time limit
keeps what it finished; progress goes to stderr. Sections that fail are reported with their traceback
and the run goes on (exit status 1 at the end); sections that would start after ``--budget`` seconds
are skipped. Share's merges run on the CPU (float64); ``--merge-threads auto`` times the 2nd style with
torch's threads and the 3rd with one, and merges the rest with the faster.

Model: ``FluxTransformer2DModel`` with FLUX.1-dev's configuration (19 double + 38 single blocks,
24 heads x 128 = 3072 wide, ``joint_attention_dim`` 4096, pooled 768, guidance embedding), built on
the meta device, cast to bf16, materialised on the GPU and filled there (weights ~ N(0, 0.5 /
sqrt(fan_in)), norm weights 1, biases 0). Two identical copies (same seed): one for each side.

Styles: 20 random rank-16 LoRAs (scale 1) on the 266 attention linears
(``FLUX_ATTENTION_TARGETS``), drawn on the GPU and held on the CPU in the model's dtype, where a
LoRA file is read to. PEFT side: ``load_lora_adapter`` of each. Share side: ``ShareModel.inject``
(k = 32, p = 8), then ``merge`` of each, continually.

Inputs (no VAE, no text encoders): packed latents of a 1024 x 1024 image (64 x 64 = 4096 image
tokens) or 512 x 512 (1024 tokens), 512 T5 tokens (4096 wide), pooled 768, guidance 3.5, timestep
0.5, ``img_ids`` / ``txt_ids`` as ``FluxPipeline`` makes them.

Timing: forwards with CUDA events, host-side calls (switch, fuse, merge, load) with ``perf_counter``
between ``torch.cuda.synchronize()`` calls (on the CPU: ``perf_counter``). Every figure is a median
of interleaved variants (A B C A B C ...) after a warm-up round.

Sections, in the order run (most important first):

- setup: bringing in 20 styles (merge vs ``load_lora_adapter``; the last style merged / loaded 3
  times with 19 held) and the memory they hold;
- step: transformer step time, 1024 batch 1 and 4, 512 batch 4: base, Share one style, Share 4
  per-sample styles, PEFT one adapter;
- batch: 4 prompts in 4 styles, one Share pass vs 4 PEFT passes with ``set_adapters`` before each;
- switch: ``set_style``, the pipeline's ``with share.styles(...)`` and ``set_adapters`` over 20 styles;
- agreement: Share's mixed batch against PEFT holding the same styles (``style_as_lora``), next to the
  bf16 noise floor of PEFT itself (batch 4 vs batch 1), at style scale 1 and 30, with a control (the
  styles rotated between rows) that shows whether the comparison can tell styles apart at all;
- fuse: ``fuse_style`` / ``unfuse_style`` vs ``fuse_lora`` / ``unfuse_lora``, and whether unfusing
  restores the weights bit for bit;
- profile: kernel launches and host-to-device copies of one forward (``torch.profiler``);
- quantized-int8, quantized-float8: the same transformer with every ``nn.Linear`` quantized in place by
  torchao (int8 / float8 weight-only; float8 only on CUDA with compute capability >= 8.9), the same
  styles on it (Share: the same factors, injected; PEFT: the same 20 LoRAs, loaded; a refusal is
  recorded as the result): the memory of the quantized transformer and of what each side adds, the
  step time at the large resolution (ratios to the quantized base), and the agreement of Share's mixed
  batch with PEFT on the same quantized base. These sections free the bf16 transformers first, so they
  run last; every model they build is built in bf16 and quantized layer by layer in place.

``--sections`` runs only the named sections (the two transformers and the styles are always built):
``--sections setup,quantized-int8,quantized-float8`` measures the quantized bases in about half the time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import diffusers
import peft
import torch
import transformers
from common import (
    FULL_DOUBLE_BLOCKS,
    FULL_LAYERS,
    FULL_SINGLE_BLOCKS,
    LINEARS_PER_DOUBLE,
    LINEARS_PER_SINGLE,
    MODEL_SEED,
    Stats,
    Style,
    fill_random_,
    flux1_transformer,
    flux_inputs,
    forward,
    interleave,
    log,
    make_styles,
    mib,
    module_bytes,
    ms,
    peak_rss_gib,
    peft_lora_bytes,
    ratio,
    relative,
    row_of,
    share_buffer_bytes,
    table,
)
from diffusers import FluxTransformer2DModel
from torch import nn

from share_diffusers.core import ShareConfig, ShareFactors, ShareModel, export_rank, find_targets, style_as_lora
from share_diffusers.core.quantized import is_quantized, quantization_name
from share_diffusers.flux_lora import FLUX_ATTENTION_TARGETS

STARTED = time.perf_counter()  # the --budget counts from here (after the imports)

TIMESTEP = 0.5
GUIDANCE = 3.5
FUSE_LAYER = "single_transformer_blocks.0.attn.to_q"  # the weight compared bit for bit after unfusing
AGREEMENT_FACTOR = 2.0  # "within the floor": Share's difference <= this x PEFT's own batch-4 vs batch-1 difference
# The floor is taken as at least this much: where PEFT's batch-4 and batch-1 kernels happen to agree (float32 on
# the CPU), two different computations still differ by their roundings. 2e-3 is about the relative size of one
# bf16 rounding of a tensor; 1e-5 is generous for float32.
MIN_FLOOR = {torch.float32: 1e-5, torch.bfloat16: 2e-3}
# Random LoRAs move the output of the random model by ~0.1-0.3% at scale 1, about bf16's noise; both sides are
# also compared with every style scaled by this (linear in dW on both sides), where they move it by a few %.
AGREEMENT_SCALE = 30.0


# ----------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """What one run measures. ``full()`` is FLUX.1 on one GPU, ``quick()`` a toy smoke run."""

    heads: int  # attention heads of 128 channels: hidden = 128 * heads
    joint_dim: int  # text embedding width (T5: 4096)
    pooled_dim: int  # pooled text embedding width (CLIP: 768)
    double_blocks: int
    single_blocks: int
    text_tokens: int
    resolutions: tuple[tuple[str, int], ...]  # (image size, packed latent side): side**2 image tokens
    num_styles: int
    lora_rank: int
    k: int  # Share basis rank
    p: int  # Share core rank
    step_rounds: int  # interleaved rounds of the step variants
    batch_rounds: int  # interleaved rounds of the 4-prompts-in-4-styles comparison
    switch_rounds: int  # passes over all styles for the switch
    fuse_rounds: int  # interleaved fuse / unfuse rounds
    load_rounds: int  # merges / loads of the last style with the others held
    dtype: torch.dtype
    batch_styles: int = 4

    @property
    def hidden(self) -> int:
        return 128 * self.heads

    @property
    def num_layers(self) -> int:
        return self.double_blocks * LINEARS_PER_DOUBLE + self.single_blocks * LINEARS_PER_SINGLE

    @property
    def large(self) -> str:
        return self.resolutions[0][0]

    @property
    def small(self) -> str:
        return self.resolutions[-1][0]

    def latent_side(self, resolution: str) -> int:
        return dict(self.resolutions)[resolution]

    @classmethod
    def full(cls) -> Settings:
        return cls(
            heads=24,
            joint_dim=4096,
            pooled_dim=768,
            double_blocks=FULL_DOUBLE_BLOCKS,
            single_blocks=FULL_SINGLE_BLOCKS,
            text_tokens=512,
            resolutions=(("1024x1024", 64), ("512x512", 32)),
            num_styles=20,
            lora_rank=16,
            k=32,
            p=8,
            step_rounds=5,
            batch_rounds=5,
            switch_rounds=3,
            fuse_rounds=3,
            load_rounds=3,
            dtype=torch.bfloat16,
        )

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            heads=2,
            joint_dim=64,
            pooled_dim=32,
            double_blocks=2,
            single_blocks=2,
            text_tokens=16,
            resolutions=(("1024x1024", 8), ("512x512", 4)),
            num_styles=6,
            lora_rank=16,
            k=32,
            p=8,
            step_rounds=2,
            batch_rounds=2,
            switch_rounds=2,
            fuse_rounds=2,
            load_rounds=2,
            dtype=torch.float32,
        )

    def describe(self) -> dict:
        data = asdict(self)
        data["dtype"] = dtype_name(self.dtype)
        data["hidden"], data["num_layers"] = self.hidden, self.num_layers
        return data


STEP_CASES = (("large", 1, 1.05), ("large", 4, 1.05), ("small", 4, 1.10))  # resolution, batch, target ratio
BATCH_TARGETS = {"large": 1.3, "small": 2.3}  # speed-up of one Share pass over 4 PEFT passes
SWITCH_TARGET = 100.0  # set_adapters / Share's pipeline path
FUSE_TARGET = 2.0  # Share fuse time / PEFT fuse time
# Issue 20 on quantized bases: a styled step within 5% of the quantized base, and the styles adding no more memory
# than on the bf16 base; the 1% is the CUDA allocator's block rounding between two sets of the same buffers.
QUANTIZED_STEP_TARGET = 1.05
QUANTIZED_MEMORY_SLACK = 1.01


# ----------------------------------------------------------------------------------------------
# Timing


class Clock:
    """CUDA events for device work, ``perf_counter`` around synchronisations for host-side calls.

    On the CPU both are ``perf_counter``: the code paths are the same everywhere but for the timer.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._earlier_peak = 0  # the largest CUDA peak before the last reset_peak()
        self.name = "CUDA events (forwards), perf_counter + synchronize (host calls)" if self.cuda else "perf_counter"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def host(self, function: Callable[[], object]) -> float:
        """Seconds of ``function()`` and the device work it queued."""
        self.sync()
        start = time.perf_counter()
        function()
        self.sync()
        return time.perf_counter() - start

    def events(self, function: Callable[[], object]) -> float:
        """Seconds from before to after ``function()`` on the device's timeline (host gaps included)."""
        if not self.cuda:
            return self.host(function)
        self.sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def allocated(self) -> int | None:
        """Bytes the CUDA caching allocator has handed out (None on the CPU)."""
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reset_peak(self) -> None:
        """Start a new window for :meth:`peak` (the run's peak is kept: :meth:`run_peak`)."""
        if self.cuda:
            self._earlier_peak = self.run_peak()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        """The most bytes allocated since the last :meth:`reset_peak` (None on the CPU)."""
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def run_peak(self) -> int:
        return max(self._earlier_peak, torch.cuda.max_memory_allocated(self.device)) if self.cuda else 0


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """No garbage collection inside timed rounds (collected once before)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def stats_data(stats: dict[str, Stats]) -> dict:
    return {
        name: {"median_s": s.median, "min_s": s.low, "max_s": s.high, "samples_s": list(s.samples)}
        for name, s in stats.items()
    }


# ----------------------------------------------------------------------------------------------
# The report: markdown to stdout and <out>.md, data to <out>.json, rewritten after every section


@dataclass
class Target:
    what: str
    measured: str
    passed: bool | None  # None: not measured here

    @property
    def result(self) -> str:
        return "n/a" if self.passed is None else ("PASS" if self.passed else "FAIL")


@dataclass
class Section:
    title: str
    markdown: str
    data: dict
    targets: list[Target] = field(default_factory=list)


class Report:
    """The sections so far, their targets, errors and skips: printed as they come, files rewritten each time."""

    def __init__(self, out: Path | None, title: str, meta: dict, meta_markdown: str):
        self.out = out
        self.title = title
        self.meta = meta
        self.meta_markdown = meta_markdown
        self.sections: dict[str, Section] = {}
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.footer = ""
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
        print(f"# {title}\n\n{meta_markdown}\n", flush=True)
        self.write()

    @property
    def targets(self) -> list[Target]:
        return [target for section in self.sections.values() for target in section.targets]

    def add(self, key: str, section: Section) -> None:
        self.sections[key] = section
        print(f"## {section.title}\n\n{section.markdown}\n", flush=True)
        self.write()

    def fail(self, key: str, title: str, error: str) -> None:
        self.errors[key] = error
        print(f"## {title}\n\nFAILED:\n\n```\n{error}\n```\n", flush=True)
        self.write()

    def skip(self, key: str, title: str, reason: str) -> None:
        self.skipped[key] = reason
        print(f"## {title}\n\nskipped: {reason}\n", flush=True)
        self.write()

    def targets_markdown(self) -> str:
        rows = [[t.what, t.measured, t.result] for t in self.targets]
        return table(["target", "measured", "result"], rows) if rows else "(none measured yet)"

    def markdown(self) -> str:
        parts = [f"# {self.title}", self.meta_markdown]
        parts += [f"## {section.title}\n\n{section.markdown}" for section in self.sections.values()]
        parts += [f"## {key}: FAILED\n\n```\n{error}\n```" for key, error in self.errors.items()]
        parts += [f"## {key}: skipped\n\n{reason}" for key, reason in self.skipped.items()]
        parts += ["## Targets\n\n" + self.targets_markdown()]
        parts += [self.footer or f"Written {time.perf_counter() - STARTED:.0f} s after the imports."]
        return "\n\n".join(parts) + "\n"

    def data(self) -> dict:
        return {
            "meta": self.meta,
            "sections": {key: {"title": s.title, **s.data} for key, s in self.sections.items()},
            "targets": [{"target": t.what, "measured": t.measured, "result": t.result} for t in self.targets],
            "errors": self.errors,
            "skipped": self.skipped,
            "elapsed_s": time.perf_counter() - STARTED,
        }

    def write(self) -> None:
        if self.out is None:
            return
        for suffix, text in ((".md", self.markdown()), (".json", json.dumps(self.data(), indent=1, default=str))):
            path = self.out.with_name(self.out.name + suffix)
            partial = path.with_name(path.name + ".partial")
            with open(partial, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, path)


# ----------------------------------------------------------------------------------------------
# Models, styles and the two sides


def build_transformer(settings: Settings, device: torch.device) -> FluxTransformer2DModel:
    """A FLUX.1-configured transformer (fewer blocks with ``--quick``): built on the meta device, cast,
    materialised on ``device`` and filled there from ``MODEL_SEED``; frozen, eval."""
    with torch.device("meta"):
        transformer = flux1_transformer(
            settings.double_blocks, settings.single_blocks, settings.heads, settings.joint_dim, settings.pooled_dim
        )
    transformer = transformer.to(settings.dtype).to_empty(device=device)
    fill_random_(transformer, device, MODEL_SEED)
    return transformer.eval().requires_grad_(False)


@dataclass
class Sides:
    """Both transformers with the styles in, the styles (on the CPU) and their names, and what bringing them in cost."""

    peft: FluxTransformer2DModel
    share_model: FluxTransformer2DModel
    share: ShareModel
    styles: list[Style]
    names: list[str]
    setup: dict


def merge_with_threads(
    clock: Clock,
    share: ShareModel | ShareFactors,
    style: Style,
    threads: int | None,
    device: torch.device | None = None,
) -> float:
    """Seconds of one continual merge (its maths on ``device``, default the CPU), with
    ``torch.set_num_threads(threads)`` around it (None: as is)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return clock.host(lambda: share.merge(style.fresh_adapter(), style.name, device=device))
    finally:
        torch.set_num_threads(before)


def build_sides(settings: Settings, device: torch.device, clock: Clock, merge_threads: str) -> Sides:
    """Both transformers, the styles drawn, loaded into PEFT and merged into Share (everything timed)."""
    figures: dict = {}
    started = time.perf_counter()
    log("building the two transformers")
    start = time.perf_counter()
    share_model = build_transformer(settings, device)
    peft_model = build_transformer(settings, device)
    clock.sync()
    figures["build_s"] = time.perf_counter() - start
    for name in ("x_embedder.weight", f"single_transformer_blocks.{settings.single_blocks - 1}.attn.to_q.weight"):
        assert torch.equal(share_model.get_parameter(name), peft_model.get_parameter(name)), f"copies differ: {name}"
    memory = {"models": clock.allocated()}

    targets = find_targets(peft_model, FLUX_ATTENTION_TARGETS)
    assert len(targets) == settings.num_layers, f"{len(targets)} target layers, expected {settings.num_layers}"
    log(f"drawing {settings.num_styles} LoRAs on {len(targets)} layers")
    start = time.perf_counter()
    layers = {name: peft_model.get_submodule(name) for name in targets}
    styles = make_styles(settings.num_styles, settings.lora_rank, layers, device=device, dtype=settings.dtype)
    figures["draw_s"] = time.perf_counter() - start
    held, last = styles[:-1], styles[-1]

    log("PEFT: load_lora_adapter of each style")
    load = [
        clock.host(lambda s=s: peft_model.load_lora_adapter(dict(s.state_dict), adapter_name=s.name, prefix=None))
        for s in held
    ]
    last_load = []
    for round_index in range(settings.load_rounds):
        if round_index:
            peft_model.delete_adapters(last.name)
        last_load.append(
            clock.host(lambda: peft_model.load_lora_adapter(dict(last.state_dict), adapter_name=last.name, prefix=None))
        )
    memory["peft"] = clock.allocated()
    log(f"PEFT: {sum(load) + last_load[-1]:.1f} s")

    log("Share: inject, then merge each style")
    config = ShareConfig(rank=settings.k, pseudo_rank=settings.p)
    inject = clock.host(lambda: ShareModel.inject(share_model, target_modules=FLUX_ATTENTION_TARGETS, config=config))
    share = ShareModel.of(share_model)
    assert share is not None and len(share.layers) == settings.num_layers
    # Threads: MKL's threaded float64 QR of thin matrices was several times slower than one thread on the
    # (shared) CPUs we develop on. "auto" merges the 2nd style with torch's threads and the 3rd with one,
    # then merges the rest with whichever was faster; both figures are reported.
    default_threads = torch.get_num_threads()
    merge, trial = [], {}
    for index, style in enumerate(held):
        if merge_threads == "auto" and index in (1, 2):
            threads = None if index == 1 else 1
            seconds = merge_with_threads(clock, share, style, threads)
            trial[default_threads if threads is None else 1] = seconds
        else:
            threads = chosen_threads(merge_threads, trial, default_threads)
            seconds = merge_with_threads(clock, share, style, threads)
        merge.append(seconds)
        log(f"Share: merged {style.name} in {seconds:.2f} s")
    threads = chosen_threads(merge_threads, trial, default_threads)
    last_merge = []
    for round_index in range(settings.load_rounds):
        if round_index:
            share.delete_style(last.name)
        last_merge.append(merge_with_threads(clock, share, last, threads))
    # The last merge again at the factors' level (no model refresh), from the same bank each time, its float64
    # maths on the CPU (threads as above) and on the GPU (ShareFactors.merge(device=...)), interleaved, after
    # an untimed warm-up of the GPU's solvers; and how far the GPU's result is from the CPU's on two layers
    # (relative Frobenius difference of the style's dW).
    factors_merge: dict[str, list[float]] = {"cpu": [], "device": []}
    device_merge_difference = None
    if device.type != "cpu":
        share.delete_style(last.name)
        bank = share.factors
        ShareFactors(bank.config, dict(bank.layers), list(bank.styles)).merge(
            last.fresh_adapter(), last.name, device=device
        )
        merged = {}
        for _ in range(settings.load_rounds):
            for where, target in (("cpu", None), ("device", device)):
                merged[where] = copy = ShareFactors(bank.config, dict(bank.layers), list(bank.styles))
                factors_merge[where].append(merge_with_threads(clock, copy, last, threads, target))
        probes = [next(iter(bank.layers)), next(reversed(bank.layers))]
        device_merge_difference = max(
            relative(merged["cpu"].delta_weight(layer, last.name), merged["device"].delta_weight(layer, last.name))
            for layer in probes
        )
        share.merge(last.fresh_adapter(), last.name)  # the bank as it was
        log(
            f"Share, factors' merge: CPU {statistics.median(factors_merge['cpu']):.2f} s, GPU "
            f"{statistics.median(factors_merge['device']):.2f} s (results within {device_merge_difference:.1e})"
        )
    clock.sync()
    log(f"Share: {sum(merge) + last_merge[-1]:.1f} s")
    memory["share"] = clock.allocated()
    names = [style.name for style in styles]
    assert share.style_names == names, share.style_names
    errors = [share.factors.style_error(name) for name in names]
    share_bytes = share_buffer_bytes(share)
    share.set_style(names[0])  # the selection's stacked cores and blend buffer are made on first use
    memory["share_selected"] = clock.allocated()
    share.set_style(None)

    figures.update(
        total_s=time.perf_counter() - started,
        inject_s=inject,
        peft_load_s=load,
        peft_last_load_s=last_load,
        share_merge_s=merge,
        share_last_merge_s=last_merge,
        share_factors_merge_s=factors_merge,
        share_device_merge_difference=device_merge_difference,
        merge_threads={"trial_s": {str(k): v for k, v in trial.items()}, "used": threads or default_threads},
        style_errors=errors,
        peft_bytes=peft_lora_bytes(peft_model, names),
        share_bytes=share_bytes,
        allocated=memory,
        lora_dtype=dtype_name(settings.dtype),
        peft_param_dtype=str(next(p.dtype for n, p in peft_model.named_parameters() if "lora_A" in n)).removeprefix(
            "torch."
        ),
    )
    return Sides(peft=peft_model, share_model=share_model, share=share, styles=styles, names=names, setup=figures)


def chosen_threads(policy: str, trial: dict[int, float], default_threads: int) -> int | None:
    if policy == "auto":
        if len(trial) < 2:
            return None
        best = min(trial, key=trial.__getitem__)
        return None if best == default_threads else best
    return None if policy == "default" else int(policy)


# ----------------------------------------------------------------------------------------------
# Sections


class Bench:
    """Everything the sections share: settings, clock, both sides, inputs by (resolution, batch)."""

    def __init__(self, settings: Settings, device: torch.device, clock: Clock, sides: Sides):
        self.settings, self.device, self.clock, self.sides = settings, device, clock, sides
        self.share, self.share_model, self.peft = sides.share, sides.share_model, sides.peft
        self.names, self.styles, self.setup = sides.names, sides.styles, sides.setup
        self.factors = sides.share.factors  # on the CPU: the quantized sections inject them again
        self.four = self.names[: settings.batch_styles]
        self.released = False
        self._inputs: dict[tuple[str, int], dict] = {}

    def inputs(self, resolution: str, batch: int) -> dict:
        key = (resolution, batch)
        if key not in self._inputs:
            s = self.settings
            self._inputs[key] = flux_inputs(
                batch,
                s.latent_side(resolution),
                s.text_tokens,
                s.joint_dim,
                s.pooled_dim,
                timestep=TIMESTEP,
                guidance=GUIDANCE,
                device=self.device,
                dtype=s.dtype,
            )
        return self._inputs[key]

    def tokens(self, resolution: str) -> str:
        return f"{self.settings.latent_side(resolution) ** 2} image + {self.settings.text_tokens} text tokens"

    def release(self) -> None:
        """Drop both bf16 sides and free their device memory (the quantized sections build their own)."""
        alive = []
        if not self.released:
            self.released = True
            alive = [weakref.ref(self.share_model), weakref.ref(self.peft)]
            self.sides = self.share = self.share_model = self.peft = None
        gc.collect()  # a ShareModel and its model refer to each other
        if any(ref() is not None for ref in alive):
            log("warning: a bf16 transformer is still referenced after release(): its memory stays allocated")
        if self.clock.cuda:
            torch.cuda.empty_cache()

    def reset(self) -> None:
        """Both sides back to their resting state (after a failed section too)."""
        if self.released:  # a quantized section ran: free what it built
            self.release()
            return
        if self.share.fused_style is not None:
            self.share.unfuse_style()
        self.share.set_style(None)
        if any(getattr(module, "merged", False) for module in self.peft.modules()):
            self.peft.unfuse_lora()
        self.peft.enable_lora()
        self.peft.set_adapters(self.names[0])
        if self.clock.cuda:
            torch.cuda.empty_cache()


def section_setup(bench: Bench) -> Section:
    s, figures = bench.settings, bench.setup
    n, layers = s.num_styles, s.num_layers
    merge, load = figures["share_merge_s"], figures["peft_load_s"]
    last_merge, last_load = figures["share_last_merge_s"], figures["peft_last_load_s"]
    rows = [
        [
            f"Share `merge` (k={s.k}, p={s.p}), continual",
            f"{sum(merge) + last_merge[-1]:.1f}",
            f"{statistics.median(merge):.2f}",
            f"{statistics.median(last_merge):.2f} ({', '.join(f'{x:.2f}' for x in last_merge)})",
        ],
        [
            "diffusers `load_lora_adapter`",
            f"{sum(load) + last_load[-1]:.1f}",
            f"{statistics.median(load):.2f}",
            f"{statistics.median(last_load):.2f} ({', '.join(f'{x:.2f}' for x in last_load)})",
        ],
    ]
    factors_merge = figures.get("share_factors_merge_s") or {}
    if factors_merge.get("device"):
        for where, label in (("cpu", "CPU"), ("device", "GPU (`device=`)")):
            times = factors_merge[where]
            rows.insert(
                len(rows) - 1,
                [
                    f"`ShareFactors.merge`, float64 maths on the {label}: style {n} again, same bank",
                    "",
                    "",
                    f"{statistics.median(times):.2f} ({', '.join(f'{x:.2f}' for x in times)})",
                ],
            )
    merge_ratio = statistics.median(last_merge) / statistics.median(last_load)
    device_ratio = None
    device_note = ""
    if factors_merge.get("device"):
        device_ratio = statistics.median(factors_merge["device"]) / statistics.median(last_load)
        cpu_ratio = statistics.median(factors_merge["cpu"]) / statistics.median(last_load)
        device_note = (
            f" The factors' merge alone: {cpu_ratio:.2f}x with its maths on the CPU, {device_ratio:.2f}x on the GPU, "
            f"whose result is within {figures['share_device_merge_difference']:.1e} of the CPU's."
        )
    trial = figures["merge_threads"]["trial_s"]
    threads_note = (
        "Merge threads: " + ", ".join(f"{k} thread(s) {v:.2f} s" for k, v in trial.items()) + " on styles 2-3; "
        f"the rest with {figures['merge_threads']['used']}."
        if trial
        else f"Merge threads: {figures['merge_threads']['used']}."
    )
    peft_bytes, share_bytes = figures["peft_bytes"], figures["share_bytes"]
    memory_rows = [
        [
            f"PEFT: {n} adapters' `lora_A` + `lora_B`",
            mib(peft_bytes),
            f"{peft_bytes / layers / n / 2**10:,.1f}",
            "1.0x",
        ],
        [
            "Share: buffers of the `ShareLinear` layers",
            mib(share_bytes),
            f"{share_bytes / layers / n / 2**10:,.1f}",
            f"{peft_bytes / share_bytes:,.1f}x less",
        ],
    ]
    allocated = figures["allocated"]
    if allocated["models"] is not None:
        memory_rows += [
            ["PEFT, CUDA allocator delta of loading", mib(allocated["peft"] - allocated["models"]), "", ""],
            ["Share, CUDA allocator delta of merging", mib(allocated["share"] - allocated["peft"]), "", ""],
            [
                "Share, + the selection's stacked cores and blend (first `set_style`)",
                mib(allocated["share_selected"] - allocated["share"]),
                "",
                "",
            ],
        ]
    errors = figures["style_errors"]
    markdown = (
        f"Two transformers built and filled in {figures['build_s']:.1f} s; {n} LoRAs drawn in "
        f"{figures['draw_s']:.1f} s (held on the CPU in {figures['lora_dtype']}; PEFT's parameters are "
        f"{figures['peft_param_dtype']}). "
        f"`ShareModel.inject` ({layers} layers): {ms(figures['inject_s'])} ms.\n\n"
        + table(
            [
                "bringing in the styles",
                f"all {n} s",
                "median per style s",
                f"style {n} with {n - 1} held: median (each) s",
            ],
            rows,
        )
        + f"\n\nMerge one LoRA into {layers} layers with {n - 1} held: {merge_ratio:.2f}x the time of "
        f"`load_lora_adapter`. {threads_note}{device_note}\n\n"
        + table(["memory of the styles", "bytes", "KiB per layer per style", "ratio"], memory_rows)
        + f"\n\nShare's relative error per style after all merges: {min(errors):.2f}-{max(errors):.2f} "
        f"(random LoRAs share no subspace, so k={s.k} keeps part of each; speed does not depend on it).\n"
    )
    data = {
        **figures,
        "merge_over_load": merge_ratio,
        "device_merge_over_load": device_ratio,
        "memory_ratio": peft_bytes / share_bytes,
    }
    return Section(f"Bringing in {n} styles, and their memory", markdown, data)


def step_variants(
    clock: Clock,
    share: ShareModel,
    peft_model: FluxTransformer2DModel | None,
    inputs: dict,
    batch: int,
    styles: Sequence[str],
) -> dict[str, Callable[[], float]]:
    """The timed forwards of one step case: the base, Share with ``styles[0]`` and (at ``batch == len(styles)``)
    one style per sample, PEFT with its active adapter (PEFT's two left out where ``peft_model`` is None)."""

    def timed(model, before=None, after=None) -> Callable[[], float]:
        def variant() -> float:
            if before is not None:
                before()
            seconds = clock.events(lambda: forward(model, inputs))
            if after is not None:
                after()
            return seconds

        return variant

    share_model = share.model
    variants = {"base (Share model, no style)": timed(share_model, lambda: share.set_style(None))}
    if peft_model is not None:
        disabled = timed(peft_model, peft_model.disable_lora, peft_model.enable_lora)
        variants["base (PEFT model, LoRA disabled)"] = disabled
    variants["Share, one style"] = timed(
        share_model, lambda: share.set_style(styles[0], batch_size=batch), lambda: share.set_style(None)
    )
    if batch == len(styles):
        variants[f"Share, {batch} styles (one per sample)"] = timed(
            share_model, lambda: share.set_style(list(styles), batch_size=batch), lambda: share.set_style(None)
        )
    if peft_model is not None:
        variants["PEFT, one adapter"] = timed(peft_model)
    return variants


def time_variants(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, Stats]:
    """A warm-up round, then ``rounds`` interleaved rounds without garbage collection."""
    for run in variants.values():
        run()
    with no_gc():
        return {name: Stats.of(values) for name, values in interleave(variants, rounds).items()}


def section_step(bench: Bench) -> Section:
    s, share, peft_model = bench.settings, bench.share, bench.peft
    first = bench.names[0]
    cases, rows, targets, data = [], [], [], {}
    for size, batch, target in STEP_CASES:
        resolution = getattr(s, size)
        inputs = bench.inputs(resolution, batch)
        log(f"step: {resolution}, batch {batch}: {s.step_rounds} interleaved rounds")
        variants = step_variants(bench.clock, share, peft_model, inputs, batch, bench.four)
        peft_model.set_adapters(first)
        stats = time_variants(variants, s.step_rounds)
        base = stats["base (Share model, no style)"].median
        label = f"{resolution}, batch {batch}"
        for name, stat in stats.items():
            rows.append(
                [
                    label,
                    name,
                    f"{stat.median * 1e3:,.1f}",
                    f"{stat.low * 1e3:,.1f}-{stat.high * 1e3:,.1f}",
                    f"{stat.median / base:.3f}",
                ]
            )
        for name, stat in stats.items():
            if name.startswith("Share,"):
                value = stat.median / base
                targets.append(Target(f"step {label}: {name} <= {target:.2f}x base", f"{value:.3f}x", value <= target))
        cases.append(f"{label}: {bench.tokens(resolution)}")
        data[label] = {"stats": stats_data(stats), "ratios": {k: v.median / base for k, v in stats.items()}}
    markdown = (
        table(["case", "variant", "median ms", "min-max ms", "ratio to base"], rows)
        + f"\n\n{s.step_rounds} interleaved rounds after a warm-up; {bench.clock.name}. Style switches happen "
        "outside the timed forward (see the switch section). Tokens: " + "; ".join(cases) + ".\n"
    )
    return Section("Transformer step time", markdown, data, targets)


def section_batch(bench: Bench) -> Section:
    s, clock, share, peft_model = bench.settings, bench.clock, bench.share, bench.peft
    count, four = s.batch_styles, bench.four
    rows, targets, data = [], [], {}
    for size, target in BATCH_TARGETS.items():
        resolution = getattr(s, size)
        log(f"batch of {count} in {count} styles, {resolution}: {s.batch_rounds} interleaved rounds")
        inputs = bench.inputs(resolution, count)
        singles = [row_of(inputs, b) for b in range(count)]
        outputs: dict[str, torch.Tensor] = {}

        def share_pass(inputs=inputs, outputs=outputs) -> float:
            def request() -> None:
                with ShareModel.of(bench.share_model).styles(list(four), batch_size=count):
                    outputs["share"] = forward(bench.share_model, inputs)

            return clock.events(request)

        def peft_passes(singles=singles, outputs=outputs) -> float:
            def request() -> None:
                results = []
                for name, row in zip(four, singles, strict=True):
                    peft_model.set_adapters(name)
                    results.append(forward(peft_model, row))
                outputs["peft"] = torch.cat(results)

            return clock.events(request)

        variants = {
            f"Share: one pass, batch {count}, {count} styles (`with share.styles(...)` included)": share_pass,
            f"diffusers: {count} passes of batch 1, `set_adapters` before each": peft_passes,
        }
        for run in variants.values():
            run()
        with no_gc():
            stats = {name: Stats.of(values) for name, values in interleave(variants, s.batch_rounds).items()}
        share_stat, peft_stat = stats.values()
        speedup = peft_stat.median / share_stat.median
        for name, stat in stats.items():
            rows.append(
                [resolution, name, f"{stat.median * 1e3:,.1f}", f"{stat.low * 1e3:,.1f}-{stat.high * 1e3:,.1f}"]
            )
        rows.append([resolution, "**speed-up of the Share pass**", f"**{speedup:.2f}x**", ""])
        targets.append(
            Target(
                f"{count} prompts in {count} styles, {resolution}: Share >= {target}x faster",
                f"{speedup:.2f}x",
                speedup >= target,
            )
        )
        data[resolution] = {"stats": stats_data(stats), "speedup": speedup}
        share.set_style(None)
    peft_model.set_adapters(bench.names[0])
    markdown = (
        table(["resolution", "method", "median ms", "min-max ms"], rows)
        + f"\n\n{s.batch_rounds} interleaved rounds after a warm-up; each figure covers the whole request "
        "(selecting the styles included).\n"
    )
    return Section(f"{count} prompts in {count} styles", markdown, data, targets)


def section_switch(bench: Bench) -> Section:
    s, clock, share, peft_model, names = bench.settings, bench.clock, bench.share, bench.peft, bench.names
    log(f"switch: {s.switch_rounds} passes over {len(names)} styles")
    share.set_style(None)
    counters = {"set_style": 0, "styles": 0, "set_adapters": 0}

    def next_name(key: str) -> str:
        name = names[counters[key] % len(names)]
        counters[key] += 1
        return name

    def set_style() -> float:
        name = next_name("set_style")
        return clock.host(lambda: share.set_style(name))

    def pipeline_path() -> float:
        name = next_name("styles")
        share.set_style(None)  # a pipeline call starts from no selection

        def enter_exit() -> None:
            with ShareModel.of(bench.share_model).styles(name, 1.0, batch_size=1):
                pass

        return clock.host(enter_exit)

    def set_adapters() -> float:
        name = next_name("set_adapters")
        return clock.host(lambda: peft_model.set_adapters(name))

    variants = {
        "Share `set_style(name)`": set_style,
        "Share pipeline path: `with share.styles(name):` enter + exit": pipeline_path,
        "diffusers `set_adapters(name)`": set_adapters,
    }
    for _ in names:  # warm-up: every request once
        for run in variants.values():
            run()
    with no_gc():
        samples = interleave(variants, s.switch_rounds * len(names))
    stats = {name: Stats.of(values) for name, values in samples.items()}
    share.set_style(None)
    peft_model.set_adapters(names[0])
    adapters = stats["diffusers `set_adapters(name)`"].median
    rows = [
        [name, ms(stat.median), f"{ms(stat.low)}-{ms(stat.high)}", ratio(adapters / stat.median)]
        for name, stat in stats.items()
    ]
    pipeline = stats["Share pipeline path: `with share.styles(name):` enter + exit"].median
    speedup = adapters / pipeline
    markdown = (
        table(["switch", "median ms", f"{next(iter(stats.values())).spread_label} ms", "set_adapters / this"], rows)
        + f"\n\n{s.switch_rounds} passes over the {len(names)} styles, the three interleaved switch by switch; "
        f"{s.num_layers} layers. Share's figures include moving the weights to the device and blending the "
        "cores of every layer (the work a forward then only reads); `set_adapters` walks every LoRA layer.\n"
    )
    target = Target(
        f"switch: Share's pipeline path >= {SWITCH_TARGET:.0f}x faster than `set_adapters`",
        f"{speedup:,.0f}x ({ms(pipeline)} ms vs {ms(adapters)} ms)",
        speedup >= SWITCH_TARGET,
    )
    data = {
        "stats": stats_data(stats),
        "speedup_pipeline_path": speedup,
        "speedup_set_style": adapters / stats["Share `set_style(name)`"].median,
    }
    return Section(f"Switching between {len(names)} styles", markdown, data, [target])


def export_to_peft(peft_model: FluxTransformer2DModel, share: ShareModel, names: Sequence[str], dtype) -> list[str]:
    """Load Share's own styles into PEFT as ``export_<name>`` (``style_as_lora``: the same ``dW`` exactly)."""
    exported = [f"export_{name}" for name in names]
    for name, adapter_name in zip(names, exported, strict=True):
        if adapter_name in getattr(peft_model, "peft_config", {}):
            continue
        lora = style_as_lora(share.factors, name)
        state_dict = {}
        for layer, factors in lora.layers.items():
            state_dict[f"{layer}.lora_A.weight"] = (factors.down * factors.scale).to(dtype)
            state_dict[f"{layer}.lora_B.weight"] = factors.up.to(dtype)
        peft_model.load_lora_adapter(state_dict, adapter_name=adapter_name, prefix=None)
    return exported


def peft_rows(peft_model: FluxTransformer2DModel, inputs: dict, adapters: Sequence[str], scale: float) -> torch.Tensor:
    """Row ``i`` of ``inputs`` through PEFT with ``adapters[i]`` alone (``set_adapters``, batch 1)."""
    outputs = []
    for index, adapter in enumerate(adapters):
        peft_model.set_adapters(adapter, weights=scale)
        outputs.append(forward(peft_model, row_of(inputs, index)))
    return torch.cat(outputs)


def agreement_figures(
    share: ShareModel,
    peft_model: FluxTransformer2DModel,
    inputs: dict,
    base: torch.Tensor,
    styles: Sequence[str],
    exported: Sequence[str],
    scale: float,
    min_floor: float,
) -> dict:
    """Share's mixed batch (row ``i`` in ``styles[i]``) against PEFT holding the same styles (``exported``), each
    row alone; the floor (PEFT batch 4 vs 4 x batch 1), the bound and the rotated-styles control. At scale 1 also
    Share's mixed batch against Share's rows one at a time and against the original LoRAs (PEFT's ``styles``)."""
    count, share_model = len(styles), share.model
    rotated = list(exported[1:]) + list(exported[:1])  # the control: every row given its neighbour's style
    with share.styles(list(styles), scale=scale, batch_size=count):
        mixed = forward(share_model, inputs)
    peft_each = peft_rows(peft_model, inputs, exported, scale)
    control = relative(peft_rows(peft_model, inputs, rotated, scale), mixed)
    peft_model.set_adapters(exported[0], weights=scale)
    floor = relative(peft_rows(peft_model, inputs, [exported[0]] * count, scale), forward(peft_model, inputs))
    figures = {
        "share_vs_peft": relative(peft_each, mixed),
        "share_vs_peft_rows": [relative(peft_each[i], mixed[i]) for i in range(count)],
        "floor": floor,
        "bound": AGREEMENT_FACTOR * max(floor, min_floor),
        "control_rotated_styles": control,
        "styles_vs_base": relative(base, peft_each),
        "finite": bool(torch.isfinite(mixed).all()) and bool(torch.isfinite(peft_each).all()),
    }
    if scale == 1.0:
        singles = []
        for index, name in enumerate(styles):
            with share.styles(name, batch_size=1):
                singles.append(forward(share_model, row_of(inputs, index)))
        figures["share_mixed_vs_share_singles"] = relative(torch.cat(singles), mixed)
        figures["share_vs_original_loras"] = relative(peft_rows(peft_model, inputs, styles, 1.0), mixed)
    return figures


AGREEMENT_HEADER = (
    "resolution",
    "style scale",
    "styled vs base",
    "Share, batch of {count} styles vs PEFT, each alone",
    "floor: PEFT batch 4 vs 4 x batch 1",
    "control: PEFT with the styles rotated",
    "Share batch vs Share each alone",
)


def agreement_row(resolution: str, scale: float, figures: dict) -> list[str]:
    return [
        resolution,
        f"{scale:g}",
        f"{figures['styles_vs_base']:.2e}",
        f"{figures['share_vs_peft']:.2e} (worst row {max(figures['share_vs_peft_rows']):.2e})",
        f"{figures['floor']:.2e}",
        f"{figures['control_rotated_styles']:.2e}",
        f"{figures['share_mixed_vs_share_singles']:.2e}" if "share_mixed_vs_share_singles" in figures else "",
    ]


def agreement_target(what: str, figures: dict) -> Target:
    """Within: the difference <= the bound; counted only where the control lands outside the bound."""
    difference, bound, control = figures["share_vs_peft"], figures["bound"], figures["control_rotated_styles"]
    within = figures["finite"] and difference <= bound
    discriminates = control > bound  # a wrong style per row would show
    return Target(
        what,
        f"{difference:.2e} <= {bound:.2e}: {within}; rotated-styles control {control:.2e}"
        + ("" if discriminates else " (inconclusive: the styles move the output less than the floor)")
        + ("" if figures["finite"] else " (not finite)"),
        within if discriminates or not within else None,
    )


def section_agreement(bench: Bench) -> Section:
    s, share, peft_model, four = bench.settings, bench.share, bench.peft, bench.four
    count = len(four)
    log("agreement: loading Share's styles into PEFT (style_as_lora)")
    exported = export_to_peft(peft_model, share, four, s.dtype)
    rank = export_rank(share.factors, {four[0]: 1.0})
    rows, targets, data = [], [], {}
    min_floor = MIN_FLOOR.get(s.dtype, 0.0)
    for resolution, _ in s.resolutions:
        inputs = bench.inputs(resolution, count)
        base = forward(bench.share_model, inputs)
        for scale in (1.0, AGREEMENT_SCALE):
            log(f"agreement: {resolution}, styles x {scale:g}")
            figures = agreement_figures(share, peft_model, inputs, base, four, exported, scale, min_floor)
            data[f"{resolution}, styles x {scale:g}"] = figures
            rows.append(agreement_row(resolution, scale, figures))
            what = f"agreement {resolution}, styles x {scale:g}: Share's mixed batch vs PEFT within the floor"
            targets.append(agreement_target(what, figures))
    peft_model.set_adapters(bench.names[0])
    lossy = [f"{data[f'{res}, styles x 1']['share_vs_original_loras']:.2e} at {res}" for res, _ in s.resolutions]
    markdown = (
        table([column.format(count=count) for column in AGREEMENT_HEADER], rows)
        + f"\n\nRelative differences `||a - b|| / ||b||` of the transformer outputs, {dtype_name(s.dtype)}. PEFT holds "
        f"Share's own styles here (`style_as_lora`, rank {rank}: the same `dW` exactly), each run alone at batch 1 "
        "(`set_adapters(name, weights=scale)`); Share runs them as one mixed batch (`share.styles(names, scale)`). "
        "The floor is what PEFT alone changes between a batch of 4 and 4 batches of 1 (other kernels, other "
        f"rounding). Rule: within if the difference <= {AGREEMENT_FACTOR:g} x max(floor, {min_floor:g}) (about "
        f"the least two {dtype_name(s.dtype)} computations differ by); the check counts only where the control "
        "(each row given another style) lands outside that bound. These random LoRAs move the output of this "
        f"random model little at scale 1, hence the second scale ({AGREEMENT_SCALE:g}) on both sides. Share "
        f"against the random LoRAs it compressed (k = {s.k} keeps part of each; context): " + ", ".join(lossy) + ".\n"
    )
    return Section("Agreement: Share's mixed batch vs PEFT", markdown, data, targets)


def section_fuse(bench: Bench) -> Section:
    s, clock, share, peft_model = bench.settings, bench.clock, bench.share, bench.peft
    name = bench.names[0]
    log(f"fuse / unfuse: {s.fuse_rounds} interleaved rounds")
    share.set_style(None)
    share_weight = bench.share_model.get_submodule(FUSE_LAYER).base_layer.weight
    peft_weight = peft_model.get_submodule(FUSE_LAYER).base_layer.weight
    originals = {"share": share_weight.detach().clone(), "peft": peft_weight.detach().clone()}
    exact = {"share": True, "peft": True}
    changed = {"share": True, "peft": True}

    def check(side: str, weight: torch.Tensor, fused: bool) -> None:
        same = torch.equal(weight, originals[side])
        if fused:
            changed[side] &= not same
        else:
            exact[side] &= same

    def share_fuse() -> float:
        seconds = clock.host(lambda: share.fuse_style(name))
        check("share", share_weight, fused=True)
        return seconds

    def share_unfuse() -> float:
        seconds = clock.host(share.unfuse_style)
        check("share", share_weight, fused=False)
        return seconds

    def peft_fuse() -> float:
        seconds = clock.host(lambda: peft_model.fuse_lora(lora_scale=1.0, adapter_names=[name]))
        check("peft", peft_weight, fused=True)
        return seconds

    def peft_unfuse() -> float:
        seconds = clock.host(peft_model.unfuse_lora)
        check("peft", peft_weight, fused=False)
        return seconds

    variants = {
        "Share `fuse_style(name)` (exact=True)": share_fuse,
        "Share `unfuse_style()`": share_unfuse,
        "diffusers `fuse_lora(adapter_names=[name])`": peft_fuse,
        "diffusers `unfuse_lora()`": peft_unfuse,
    }
    for run in variants.values():
        run()
    with no_gc():
        stats = {key: Stats.of(values) for key, values in interleave(variants, s.fuse_rounds).items()}
    share_fuse_s = stats["Share `fuse_style(name)` (exact=True)"].median
    peft_fuse_s = stats["diffusers `fuse_lora(adapter_names=[name])`"].median
    rows = [[key, ms(stat.median), f"{ms(stat.low)}-{ms(stat.high)}"] for key, stat in stats.items()]
    markdown = (
        table(["call", "median ms", "min-max ms"], rows)
        + f"\n\n{s.fuse_rounds} interleaved rounds after a warm-up, {s.num_layers} layers. `{FUSE_LAYER}`'s weight "
        f"after every unfuse equals the original bit for bit (torch.equal): Share {exact['share']}, diffusers/PEFT "
        f"{exact['peft']} (PEFT subtracts the delta again, in {dtype_name(s.dtype)}). Every fuse changed the weight: "
        f"Share {changed['share']}, PEFT {changed['peft']}. Share's exact fuse keeps a copy of the fused weights "
        "on the device until unfused.\n"
    )
    value = share_fuse_s / peft_fuse_s
    targets = [
        Target(
            f"fuse: Share <= {FUSE_TARGET:g}x PEFT's `fuse_lora`",
            f"{value:.2f}x ({ms(share_fuse_s)} vs {ms(peft_fuse_s)} ms)",
            value <= FUSE_TARGET,
        ),
        Target(
            "unfuse_style restores the weight bit for bit", str(exact["share"]), exact["share"] and changed["share"]
        ),
    ]
    data = {"stats": stats_data(stats), "exact": exact, "changed": changed, "fuse_ratio": value}
    return Section("Fuse / unfuse one style", markdown, data, targets)


def count_events(profiler) -> dict[str, int]:
    """Kernels, host-to-device copies, other copies/memsets (CUDA activity) and aten ops (CPU) of a trace."""
    from torch.autograd import DeviceType

    counts = {"kernels": 0, "memcpy_htod": 0, "other_memcpy_memset": 0, "aten_ops": 0}
    for event in profiler.events():
        name = event.name
        if "Memcpy HtoD" in name:
            counts["memcpy_htod"] += 1
        elif "Memcpy" in name or "Memset" in name:
            counts["other_memcpy_memset"] += 1
        elif event.device_type == DeviceType.CUDA:
            counts["kernels"] += 1
        elif name.startswith("aten::"):
            counts["aten_ops"] += 1
    return counts


def kernel_times(profiler, cuda: bool) -> dict[str, tuple[int, float]]:
    """``kernel name -> (calls, ms)`` of a trace: the CUDA kernels' device time, or without a GPU the aten ops'
    own CPU time. (With CUDA activity torch also credits each kernel's time to the op that launched it, so only
    the kernel events are summed.)"""
    from torch.autograd import DeviceType

    times: dict[str, tuple[int, float]] = {}
    for entry in profiler.key_averages():
        if cuda:
            if entry.device_type != DeviceType.CUDA or not entry.self_device_time_total:
                continue
            microseconds = entry.self_device_time_total
        elif entry.key.startswith("aten::"):
            microseconds = entry.self_cpu_time_total
        else:
            continue
        times[entry.key] = (entry.count, microseconds / 1000.0)
    return times


def per_sample_breakdown(bench: Bench, activities: list) -> tuple[str, dict]:
    """Where a forward with one style per sample spends more than one with one style for all, at the large
    resolution and batch 4 (the step target it missed on an H200): the kernels whose device time differs most.
    Both select as the step section does (one style repeated to the batch's rows), so both run the same
    kernels on the same shapes: a difference is in the kernels' times, not in what runs."""
    from torch.profiler import profile

    s, clock, share = bench.settings, bench.clock, bench.share
    batch = s.batch_styles
    inputs = bench.inputs(s.large, batch)
    selections = {
        "one style": lambda: share.set_style(bench.names[0], batch_size=batch),
        "per sample": lambda: share.set_style(list(bench.four)),
    }
    times = {}
    for name, select in selections.items():
        select()
        forward(bench.share_model, inputs)  # warm-up
        clock.sync()
        with profile(activities=activities) as profiler:
            forward(bench.share_model, inputs)
            clock.sync()
        times[name] = kernel_times(profiler, clock.cuda)
    share.set_style(None)
    one, mixed = times["one style"], times["per sample"]
    names = sorted(set(one) | set(mixed), key=lambda k: -abs(mixed.get(k, (0, 0.0))[1] - one.get(k, (0, 0.0))[1]))
    rows = []
    for kernel in names[:8]:
        calls_one, ms_one = one.get(kernel, (0, 0.0))
        calls_mixed, ms_mixed = mixed.get(kernel, (0, 0.0))
        label = kernel if len(kernel) <= 90 else kernel[:87] + "..."
        difference = f"{ms_mixed - ms_one:+.3f}"
        rows.append([f"`{label}`", calls_one, f"{ms_one:.3f}", calls_mixed, f"{ms_mixed:.3f}", difference])
    total_one, total_mixed = sum(v[1] for v in one.values()), sum(v[1] for v in mixed.values())
    unit = "device" if clock.cuda else "CPU self"
    markdown = (
        f"\n\nWhere {batch} styles (one per sample) cost more than one style for all, {s.large}, batch {batch} "
        f"(one style repeated to {batch} rows, as in the step section: the same kernels on the same shapes): "
        f"{unit} time {total_mixed:.1f} ms vs {total_one:.1f} ms; the {len(rows)} kernels that differ most:\n\n"
        + table(["kernel", "calls, one style", "ms", f"calls, {batch} styles", "ms", "difference ms"], rows)
    )
    return markdown, {"one_style_ms": total_one, "per_sample_ms": total_mixed, "kernels": rows}


def section_profile(bench: Bench) -> Section:
    from torch.profiler import ProfilerActivity, profile

    s, clock, share, peft_model = bench.settings, bench.clock, bench.share, bench.peft
    batch = s.batch_styles
    inputs = bench.inputs(s.small, batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
    share.set_style(None)
    peft_model.set_adapters(bench.names[0])
    variants = {
        "base (Share model, no style)": (bench.share_model, lambda: share.set_style(None)),
        "Share, one style": (bench.share_model, lambda: share.set_style(bench.names[0], batch_size=batch)),
        f"Share, {batch} styles (one per sample)": (bench.share_model, lambda: share.set_style(list(bench.four))),
        "PEFT, one adapter": (peft_model, lambda: share.set_style(None)),
    }
    counts = {}
    for name, (model, select) in variants.items():
        log(f"profile: {name}")
        select()
        forward(model, inputs)  # warm-up
        clock.sync()
        with profile(activities=activities) as profiler:
            forward(model, inputs)
            clock.sync()
        counts[name] = count_events(profiler)
    share.set_style(None)
    base = counts["base (Share model, no style)"]
    rows = []
    for name, c in counts.items():
        extra = (c["kernels"] - base["kernels"]) / s.num_layers
        rows.append(
            [
                name,
                c["kernels"] if clock.cuda else "n/a",
                f"{extra:+.2f}" if clock.cuda else "n/a",
                c["memcpy_htod"] if clock.cuda else "n/a",
                c["other_memcpy_memset"] if clock.cuda else "n/a",
                c["aten_ops"],
            ]
        )
    styled = [name for name in counts if name.startswith("Share,")]
    markdown = (
        table(
            [
                "forward",
                "CUDA kernels",
                "extra kernels per Share layer",
                "Memcpy HtoD",
                "other copies / memsets",
                "aten ops (CPU)",
            ],
            rows,
        )
        + f"\n\nOne forward each at {s.small}, batch {batch}, after a warm-up, the styles selected before the "
        "profiled region (`torch.profiler`, CPU"
        + (" and CUDA activity)." if clock.cuda else " activity only: no GPU here, so no kernel or copy counts).")
    )
    breakdown_markdown, breakdown = per_sample_breakdown(bench, activities)
    markdown += breakdown_markdown + "\n"
    targets = []
    if clock.cuda:
        worst = max(counts[name]["memcpy_htod"] for name in styled)
        targets.append(
            Target(
                "profile: no host-to-device copy in a styled forward (beyond the base forward's own)",
                f"{worst} in the styled forwards, {base['memcpy_htod']} in the base",
                worst <= base["memcpy_htod"],
            )
        )
    else:
        targets.append(Target("profile: no host-to-device copy in a styled forward", "not measured on the CPU", None))
    return Section("Profiler counts of one forward", markdown, {"counts": counts, "per_sample": breakdown}, targets)


QUANTIZATIONS = {"int8": "Int8WeightOnlyConfig", "float8": "Float8WeightOnlyConfig"}  # torchao.quantization


def quantization_unsupported(kind: str, device: torch.device) -> str | None:
    """Why ``kind`` is not measured on ``device`` (None: it is)."""
    try:
        import torchao  # noqa: F401
    except ImportError as error:
        return f"torchao is not installed ({error}); `pip install torchao`"
    if kind == "float8":
        if device.type != "cuda":
            return f"float8 weight-only is measured on CUDA (compute capability >= 8.9) only, not on {device.type}"
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device)
            return f"float8 needs CUDA compute capability >= 8.9; the {name} has {major}.{minor}"
    return None


def build_quantized(settings: Settings, device: torch.device, clock: Clock, kind: str) -> tuple[nn.Module, dict]:
    """``build_transformer`` (the run's dtype), then every ``nn.Linear`` quantized in place by torchao's ``quantize_``:
    one layer at a time, so the full-precision transformer never sits beside its quantized copy.

    Returns the transformer and its figures: bytes before and after quantization, the CUDA allocator's delta
    of the whole build (None on the CPU), the seconds it took.
    """
    import torchao.quantization

    config = getattr(torchao.quantization, QUANTIZATIONS[kind])()
    before = clock.allocated()
    start = time.perf_counter()
    model = build_transformer(settings, device)
    full_bytes = module_bytes(model)
    torchao.quantization.quantize_(model, config)  # default filter: every nn.Linear
    clock.sync()
    figures = {
        "config": repr(config),
        "full_bytes": full_bytes,
        "bytes": module_bytes(model),
        "allocated": allocated_delta(clock, before),
        "build_s": time.perf_counter() - start,
    }
    return model, figures


def allocated_delta(clock: Clock, before: int | None) -> int | None:
    return None if before is None else clock.allocated() - before


def section_quantized(bench: Bench, kind: str) -> Section:
    s, clock, names, four = bench.settings, bench.clock, bench.names, bench.four
    n, first = len(names), names[0]
    title = f"Quantized base: torchao {kind} weight-only"
    reason = quantization_unsupported(kind, bench.device)
    if reason is not None:
        log(f"quantized {kind}: not measured: {reason}")
        return Section(title, f"Not measured: {reason}.\n", {"kind": kind, "skipped": reason})
    bench.release()  # the bf16 sides: from here on only quantized transformers are on the device
    baseline = clock.allocated()
    clock.reset_peak()
    log(f"quantized {kind}: building a transformer in {dtype_name(s.dtype)}, quantizing it in place")
    share_model, base_figures = build_quantized(s, bench.device, clock, kind)
    targets_layers = find_targets(share_model, FLUX_ATTENTION_TARGETS)
    plain = [name for name in targets_layers if not is_quantized(share_model.get_submodule(name))]
    assert not plain, f"{len(plain)} target layers not quantized, e.g. {plain[0]}"
    layer_type = quantization_name(share_model.get_submodule(targets_layers[0]))

    log(f"quantized {kind}: Share, the same factors injected ({n} styles)")
    before = clock.allocated()
    inject_s = clock.host(lambda: ShareModel.inject(share_model, bench.factors))
    share = ShareModel.of(share_model)
    assert share is not None and share.style_names == names, "the quantized Share model lacks the styles"
    share_figures = {"inject_s": inject_s, "bytes": share_buffer_bytes(share)}
    share_figures["allocated"] = allocated_delta(clock, before)
    before = clock.allocated()
    share.set_style(first)
    share_figures["selection_bytes"] = share_buffer_bytes(share) - share_figures["bytes"]
    share_figures["selection_allocated"] = allocated_delta(clock, before)
    share.set_style(None)

    log(f"quantized {kind}: PEFT, load_lora_adapter of the same {n} LoRAs on a second quantized copy")
    peft_model, peft_base_figures = build_quantized(s, bench.device, clock, kind)
    before = clock.allocated()
    peft_figures: dict = {"refusal": None}
    try:
        peft_figures["load_s"] = [
            clock.host(
                lambda style=style: peft_model.load_lora_adapter(
                    dict(style.state_dict), adapter_name=style.name, prefix=None
                )
            )
            for style in bench.styles
        ]
        peft_figures["layer_type"] = type(peft_model.get_submodule(targets_layers[0])).__name__
        peft_figures["bytes"] = peft_lora_bytes(peft_model, names)
        peft_figures["allocated"] = allocated_delta(clock, before)
        peft_model.set_adapters(first)
    except Exception as error:  # PEFT refusing this quantization is a result, not a failure of the benchmark
        peft_figures["refusal"] = f"{type(error).__name__}: {error}".strip()
        log(f"quantized {kind}: PEFT refused: {peft_figures['refusal']}")
        peft_model = None
    memory = {
        "baseline_allocated": baseline,
        "peak_above_baseline": None if baseline is None else clock.peak() - baseline,
    }

    # step time at the large resolution
    rows, targets, step_data = [], [], {}
    resolution = s.large
    for batch in (1, s.batch_styles):
        inputs = bench.inputs(resolution, batch)
        log(f"quantized {kind}: step {resolution}, batch {batch}: {s.step_rounds} interleaved rounds")
        stats = time_variants(step_variants(clock, share, peft_model, inputs, batch, four), s.step_rounds)
        base = stats["base (Share model, no style)"].median
        label = f"{resolution}, batch {batch}"
        for name, stat in stats.items():
            rows.append(
                [label, name, f"{stat.median * 1e3:,.1f}", f"{stat.low * 1e3:,.1f}-{stat.high * 1e3:,.1f}"]
                + [f"{stat.median / base:.3f}"]
            )
            if name.startswith("Share,"):
                value = stat.median / base
                targets.append(
                    Target(
                        f"quantized {kind}: step {label}: {name} <= {QUANTIZED_STEP_TARGET:.2f}x the quantized base",
                        f"{value:.3f}x",
                        value <= QUANTIZED_STEP_TARGET,
                    )
                )
        step_data[label] = {"stats": stats_data(stats), "ratios": {k: v.median / base for k, v in stats.items()}}

    # agreement with PEFT on the same quantized base (Share's own styles exported to PEFT), at the small resolution
    agreement, agreement_rows = {}, []
    small, count = s.small, len(four)
    if peft_model is not None:
        log(f"quantized {kind}: agreement at {small}")
        exported = export_to_peft(peft_model, share, four, s.dtype)
        inputs = bench.inputs(small, count)
        base_output = forward(share_model, inputs)
        for scale in (1.0, AGREEMENT_SCALE):
            figures = agreement_figures(
                share, peft_model, inputs, base_output, four, exported, scale, MIN_FLOOR.get(s.dtype, 0.0)
            )
            agreement[f"{small}, styles x {scale:g}"] = figures
            agreement_rows.append(agreement_row(small, scale, figures))
            what = (
                f"quantized {kind}: agreement {small}, styles x {scale:g}: Share's mixed batch vs PEFT "
                "on the same quantized base within the floor"
            )
            targets.append(agreement_target(what, figures))

    # memory
    bf16 = bench.setup["allocated"]
    bf16_share_allocated = None if bf16["models"] is None else bf16["share"] - bf16["peft"]
    bf16_peft_allocated = None if bf16["models"] is None else bf16["peft"] - bf16["models"]

    def cell(value: int | None) -> str:
        return "n/a" if value is None else mib(value)

    peft_row = (
        [f"+ {n} PEFT adapters (`load_lora_adapter`, {peft_figures['layer_type']})", mib(peft_figures["bytes"])]
        + [cell(peft_figures["allocated"]), mib(bench.setup["peft_bytes"]), cell(bf16_peft_allocated)]
        if peft_model is not None
        else [f"+ {n} PEFT adapters", f"PEFT refused: {peft_figures['refusal']}", "", "", ""]
    )
    memory_rows = [
        [
            f"the {kind} transformer alone ({layer_type} weights)",
            mib(base_figures["bytes"]),
            cell(base_figures["allocated"]),
            mib(base_figures["full_bytes"]),
            "",
        ],
        [
            f"+ {n} Share styles (`ShareModel.inject` of the same factors)",
            mib(share_figures["bytes"]),
            cell(share_figures["allocated"]),
            mib(bench.setup["share_bytes"]),
            cell(bf16_share_allocated),
        ],
        [
            "+ Share's selection state (first `set_style`)",
            mib(share_figures["selection_bytes"]),
            cell(share_figures["selection_allocated"]),
            "",
            "",
        ],
        peft_row,
    ]
    if clock.cuda:
        measured, reference = share_figures["allocated"], bf16_share_allocated
        how = "CUDA allocator deltas"
    else:
        measured, reference = share_figures["bytes"], bench.setup["share_bytes"]
        how = "tensor bytes"
    targets.insert(
        0,
        Target(
            f"quantized {kind}: {n} Share styles add no more memory than on the {dtype_name(s.dtype)} base",
            f"{mib(measured)} vs {mib(reference)} ({how})",
            measured <= QUANTIZED_MEMORY_SLACK * reference,
        ),
    )

    step_columns = ["case", "variant", "median ms", "min-max ms", "ratio to the quantized base"]
    markdown = (
        f"Every `nn.Linear` of a fresh transformer (same seed, same weights as the other sections) quantized in place "
        f"by `torchao.quantization.quantize_({base_figures['config']})` in {base_figures['build_s']:.1f} s; the "
        f"bases and cores live in the layers' compute dtype ({dtype_name(s.dtype)}). Share: `ShareModel.inject` of "
        f"the factors merged in the setup section ({ms(inject_s)} ms). PEFT: the same {n} LoRAs loaded into a "
        "second quantized copy"
        + (
            f" in {sum(peft_figures['load_s']):.1f} s (PEFT wraps the layers as `{peft_figures['layer_type']}`)."
            if peft_model is not None
            else f"; PEFT refused it: `{peft_figures['refusal']}`."
        )
        + "\n\n"
        + table(
            [
                "memory",
                "tensor bytes",
                "CUDA allocator delta",
                f"on the {dtype_name(s.dtype)} base: bytes",
                "CUDA delta",
            ],
            memory_rows,
        )
        + "\n\n"
        + (
            f"Peak allocated while building, quantizing and loading: {mib(memory['peak_above_baseline'])} above the "
            f"{mib(baseline)} held before (inputs).\n\n"
            if baseline is not None
            else ""
        )
        + table(step_columns, rows)
        + f"\n\n{s.step_rounds} interleaved rounds after a warm-up; {clock.name}; {bench.tokens(resolution)}.\n"
    )
    if agreement_rows:
        markdown += (
            "\n"
            + table([column.format(count=count) for column in AGREEMENT_HEADER], agreement_rows)
            + "\n\nAs in the agreement section, on the quantized base: Share's mixed batch against PEFT holding "
            "Share's own styles (`style_as_lora`), each row alone; the same rule and control.\n"
        )
    else:
        markdown += f"\nAgreement not measured: PEFT refused this quantization (`{peft_figures['refusal']}`).\n"
    data = {
        "kind": kind,
        "layer_type": layer_type,
        "transformer": base_figures,
        "peft_transformer": peft_base_figures,
        "share": share_figures,
        "peft": peft_figures,
        "memory": memory,
        "step": step_data,
        "agreement": agreement,
    }
    return Section(title, markdown, data, targets)


SECTIONS: tuple[tuple[str, str, Callable[[Bench], Section]], ...] = (
    ("setup", "Bringing in the styles, and their memory", section_setup),
    ("step", "Transformer step time", section_step),
    ("batch", "4 prompts in 4 styles", section_batch),
    ("switch", "Switching styles", section_switch),
    ("agreement", "Agreement: Share's mixed batch vs PEFT", section_agreement),
    ("fuse", "Fuse / unfuse one style", section_fuse),
    ("profile", "Profiler counts of one forward", section_profile),
    # last: they free the bf16 transformers
    ("quantized-int8", "Quantized base: torchao int8 weight-only", lambda bench: section_quantized(bench, "int8")),
    ("quantized-float8", "Quantized base: torchao float8 weight-only", lambda b: section_quantized(b, "float8")),
)


# ----------------------------------------------------------------------------------------------
# Main


def environment(settings: Settings, device: torch.device, clock: Clock, quick: bool) -> tuple[dict, str]:
    gpu = torch.cuda.get_device_name(device) if clock.cuda else None
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": str(device),
        "gpu": gpu,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "timer": clock.name,
        "quick": quick,
        "argv": sys.argv,
        "settings": settings.describe(),
    }
    s = settings
    where = f"{gpu} (CUDA {torch.version.cuda})" if gpu else f"CPU ({platform.processor() or platform.machine()})"
    markdown = (
        f"{meta['date']}; {where}; Python {meta['python']}, torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, peft {peft.__version__}, transformers {transformers.__version__}; "
        f"CPU threads: {meta['cpu_threads']}; timer: {clock.name}.\n\n"
        f"FluxTransformer2DModel: {s.double_blocks} double + {s.single_blocks} single blocks (FLUX.1: "
        f"{FULL_DOUBLE_BLOCKS} + {FULL_SINGLE_BLOCKS}), hidden {s.hidden}, joint_attention_dim {s.joint_dim}, pooled "
        f"{s.pooled_dim}, random {dtype_name(s.dtype)} weights; {s.num_styles} random rank-{s.lora_rank} LoRAs on the "
        f"{s.num_layers} attention linears (FLUX.1: {FULL_LAYERS}); Share k={s.k}, p={s.p}. Inputs: "
        + ", ".join(f"{name} = {side**2} image tokens" for name, side in s.resolutions)
        + f", {s.text_tokens} text tokens, guidance {GUIDANCE}, timestep {TIMESTEP}."
        + ("\n\n**--quick: toy widths, numbers not meaningful.**" if quick else "")
    )
    return meta, markdown


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy widths (default on the CPU in float32)")
    parser.add_argument("--device", default=None, help="cuda (default where available) or cpu")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default=None, help="default: bf16, float32 with --quick"
    )
    parser.add_argument("--out", default=None, help="write <out>.md and <out>.json after every section")
    parser.add_argument("--budget", type=float, default=300.0, help="start no section after this many seconds")
    parser.add_argument(
        "--merge-threads", default="auto", help="torch threads for Share merges: auto (try both), default, or a number"
    )
    keys = [key for key, _, _ in SECTIONS]
    parser.add_argument(
        "--sections", default="all", help=f"comma-separated sections to run (default all): {','.join(keys)}"
    )
    args = parser.parse_args(argv)
    chosen = keys if args.sections == "all" else [key.strip() for key in args.sections.split(",") if key.strip()]
    unknown = sorted(set(chosen) - set(keys))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(keys)}")
    # PEFT warns on every adapter after the first that the model now holds several: that is the point here.
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    # PEFT on a base quantized by torchao's quantize_ (no diffusers quantizer) cannot merge; nothing here merges it.
    warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    settings = Settings.quick() if args.quick else Settings.full()
    if args.dtype:
        settings = replace(settings, dtype=getattr(torch, args.dtype))
    clock = Clock(device)
    meta, meta_markdown = environment(settings, device, clock, args.quick)
    title = "share-diffusers GPU benchmark: Share vs diffusers + PEFT" + (" (--quick)" if args.quick else "")
    report = Report(Path(args.out) if args.out else None, title, meta, meta_markdown)

    try:  # no local name for the sides: Bench.release() must be able to free them
        bench = Bench(settings, device, clock, build_sides(settings, device, clock, args.merge_threads))
    except Exception:
        report.fail("setup", "Setup", traceback.format_exc())
        return 1
    for key, title, run in SECTIONS:
        elapsed = time.perf_counter() - STARTED
        if key not in chosen:
            report.skip(key, title, f"not in --sections {args.sections}")
            continue
        if elapsed > args.budget:
            report.skip(key, title, f"{elapsed:.0f} s elapsed, over the --budget of {args.budget:.0f} s")
            continue
        try:
            report.add(key, run(bench))
        except Exception:
            log(f"{key} failed")
            report.fail(key, title, traceback.format_exc())
        try:
            bench.reset()
        except Exception:
            report.fail(f"{key}-reset", f"{title}: reset", traceback.format_exc())

    footer = f"Peak RSS {peak_rss_gib():.1f} GiB"
    if clock.cuda:
        footer += f", peak CUDA memory {clock.run_peak() / 2**30:.1f} GiB"
    footer += f"; {time.perf_counter() - STARTED:.0f} s after the imports."
    report.meta["footer"] = report.footer = footer
    print("## Targets\n\n" + report.targets_markdown() + f"\n\n{footer}", flush=True)
    report.write()
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
