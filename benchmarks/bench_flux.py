"""Flux benchmark: Share styles against stock diffusers/PEFT LoRA adapters on one Flux transformer.

Run ``python benchmarks/bench_flux.py`` (6-9 minutes on 2 CPU cores, peak RSS about 11 GiB;
``--quick``: a smoke run of well under a minute at toy widths, whose numbers mean nothing). The
report goes to stdout as markdown tables; progress goes to stderr.

Model: a ``FluxTransformer2DModel`` with FLUX.1's real widths (hidden 3072 = 24 heads x 128,
``joint_attention_dim`` 4096, pooled 768, ``in_channels`` 64, guidance embedding as in FLUX.1-dev),
random weights, float32, but only 2 double + 4 single blocks (FLUX.1 has 19 + 38: the same 1:2 mix).
Inputs are built directly (no VAE, no text encoders): batch 1, 16x16 packed latents = 256 image
tokens, 64 text tokens.

Styles: N = 20 random LoRAs of rank 16 (scale 1) on the attention linears Share targets by default
(``to_q, to_k, to_v, to_out.0, add_q/k/v_proj, to_add_out`` in double blocks, ``to_q, to_k, to_v``
in single blocks: 28 layers here, 266 in FLUX.1, all 3072 x 3072). Two transformer instances built
from the same seed: one holds the N LoRAs as PEFT adapters (``load_lora_adapter``, hotswap enabled),
the other a Share subspace (k = 32, p = 8) into which the same N LoRAs are merged continually.

Sections (every timing is a median over interleaved repeats, ``time.perf_counter``):

1. style switch latency: ``ShareModel.set_style`` vs ``set_adapters`` vs ``load_lora_adapter(hotswap=True)``;
2. time to bring in the N styles and the memory they hold (Share buffers vs PEFT ``lora_A``/``lora_B``);
3. per-step transformer time: base, Share unfused/fused, PEFT unfused/fused; plus one layer alone;
4. a batch of 4 prompts in 4 styles: one Share pass vs 4 PEFT passes with ``set_adapters`` between.

Per-layer figures are measured on the 28 layers here; figures for FLUX.1's 266 layers are
extrapolated (marked "x266"), linearly in the number of LoRA layers unless stated otherwise.
Random LoRAs share no subspace, so k = 32 keeps only part of each of the 20 (the report gives the
error); speed and memory do not depend on the LoRAs' content.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import diffusers
import peft
import torch
from common import (
    FULL_DOUBLE_BLOCKS,
    FULL_LAYERS,
    FULL_SINGLE_BLOCKS,
    LINEARS_PER_DOUBLE,
    LINEARS_PER_SINGLE,
    MODEL_SEED,
    Stats,
    Style,
    flux1_transformer,
    flux_inputs,
    forward,
    interleave,
    log,
    make_styles,
    mib,
    ms,
    peak_rss_gib,
    peft_lora_bytes,
    ratio,
    relative,
    rounds_table,
    row_of,
    share_buffer_bytes,
    table,
    us,
)
from diffusers import FluxTransformer2DModel

from share_diffusers.core import ShareConfig, ShareLinear, ShareModel, find_targets
from share_diffusers.flux_lora import FLUX_ATTENTION_TARGETS

# ----------------------------------------------------------------------------------------------
# Settings and small helpers


@dataclass(frozen=True)
class Settings:
    """What one run measures. ``full()`` is the real benchmark, ``quick()`` a smoke run."""

    heads: int  # attention heads of 128 channels: hidden = 128 * heads
    joint_dim: int  # text embedding width (T5: 4096)
    pooled_dim: int  # pooled text embedding width (CLIP: 768)
    double_blocks: int
    single_blocks: int
    latent_side: int  # packed latents are latent_side x latent_side image tokens
    text_tokens: int
    num_styles: int  # N LoRAs
    lora_rank: int
    k: int  # Share basis rank
    p: int  # Share core rank
    switch_rounds: int  # interleaved repeats of the three switch methods
    step_rounds: int  # interleaved rounds of the five per-step variants
    layer_rounds: int  # interleaved repeats of the one-layer forward
    batch_rounds: int  # interleaved rounds of the batch-of-4 comparison
    batch_styles: int = 4

    @property
    def hidden(self) -> int:
        return 128 * self.heads

    @property
    def image_tokens(self) -> int:
        return self.latent_side**2

    @property
    def num_layers(self) -> int:
        return self.double_blocks * LINEARS_PER_DOUBLE + self.single_blocks * LINEARS_PER_SINGLE

    @classmethod
    def full(cls) -> Settings:
        return cls(
            heads=24,
            joint_dim=4096,
            pooled_dim=768,
            double_blocks=2,
            single_blocks=4,
            latent_side=16,
            text_tokens=64,
            num_styles=20,
            lora_rank=16,
            k=32,
            p=8,
            switch_rounds=100,
            step_rounds=6,
            layer_rounds=30,
            batch_rounds=3,
        )

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            heads=2,
            joint_dim=256,
            pooled_dim=64,
            double_blocks=1,
            single_blocks=1,
            latent_side=8,
            text_tokens=16,
            num_styles=4,
            lora_rank=16,
            k=32,
            p=8,
            switch_rounds=20,
            step_rounds=2,
            layer_rounds=5,
            batch_rounds=1,
        )


def timed(function: Callable[[], object]) -> float:
    """Seconds one call of ``function()`` takes."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Model, inputs and LoRAs


def build_transformer(settings: Settings) -> FluxTransformer2DModel:
    """A FLUX.1-wide transformer with fewer blocks, random float32 weights from ``MODEL_SEED``, frozen, eval."""
    torch.manual_seed(MODEL_SEED)
    transformer = flux1_transformer(
        settings.double_blocks, settings.single_blocks, settings.heads, settings.joint_dim, settings.pooled_dim
    )
    return transformer.eval().requires_grad_(False)


def transformer_inputs(settings: Settings, batch: int) -> dict:
    """Inputs of one transformer call at these settings (see ``common.flux_inputs``), timestep 0.7."""
    return flux_inputs(
        batch, settings.latent_side, settings.text_tokens, settings.joint_dim, settings.pooled_dim, timestep=0.7
    )


def timed_forward(transformer: torch.nn.Module, inputs: dict, outputs: dict | None = None, key: str = "") -> float:
    """Seconds of one forward, after a garbage collection outside the timed region; its output kept in
    ``outputs[key]`` (the last round's, for the same-result checks)."""
    gc.collect()
    start = time.perf_counter()
    output = forward(transformer, inputs)
    seconds = time.perf_counter() - start
    if outputs is not None:
        outputs[key] = output
    return seconds


# float32: a fused weight against the low-rank path, or a batch of 4 against 4 batches of 1, differ by roundings only
SAME_RESULT = 1e-5
# a style must move the output by this many times the tolerance, or the checks could not tell it from no style
STYLE_EFFECT = 10.0


def same_result_checks(steps: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> list[tuple[str, str, bool]]:
    """``(check, measured, passed)`` rows: the timed variants computed what their rows claim, so that a fast wrong
    path (a fuse that changed nothing, a batch that gave every row one style) cannot win.

    ``steps``: the per-step outputs by variant (``STEP_VARIANTS``); ``batch``: ``share`` (one pass, a style per
    row), ``share_each`` (the same rows one at a time, batch 1, each in its style), ``base`` (no style).
    Share's lossy reconstruction of random LoRAs is not compared with PEFT's outputs here (that is context)."""
    rows = []
    for side in ("Share", "PEFT"):
        unfused, fused = steps[f"{side} unfused"], steps[f"{side} fused"]
        difference, effect = relative(unfused, fused), relative(steps["base"], unfused)
        rows.append(
            (
                f"same result: {side} fused == {side} unfused (<= {SAME_RESULT:g}), and the style moves the output "
                f"(>= {STYLE_EFFECT:g}x that)",
                f"{difference:.1e}; style vs base {effect:.1e}",
                difference <= SAME_RESULT and effect >= STYLE_EFFECT * SAME_RESULT,
            )
        )
    difference, effect = relative(batch["share_each"], batch["share"]), relative(batch["base"], batch["share_each"])
    rows.append(
        (
            f"same result: Share's batch of styles == each row alone in its style (<= {SAME_RESULT:g}), and the "
            f"styles move the output (>= {STYLE_EFFECT:g}x that)",
            f"{difference:.1e}; styles vs base {effect:.1e}",
            difference <= SAME_RESULT and effect >= STYLE_EFFECT * SAME_RESULT,
        )
    )
    return rows


def share_state_bytes(share: ShareModel) -> int:
    """Bytes of everything Share holds: layer buffers, the selection's dense cores, plus the ``ShareFactors``
    (Gram summaries, norms, errors), each storage counted once (the layers' buffers alias the factors' float32
    tensors)."""
    seen: dict[int, int] = {}
    tensors = [b for layer in share.layers.values() for b in layer.buffers(recurse=False)]
    tensors += [group.dense_cores for group in share.selection._groups or ()]
    for layer in share.factors.layers.values():
        tensors += [getattr(layer, field) for field in ("basis_out", "basis_in", "core_out", "core_in")]
        tensors += [layer.gram_out, layer.gram_in, layer.norm, layer.error, layer.truncated]
        tensors += [layer.anchor] if layer.anchor is not None else []
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


# ----------------------------------------------------------------------------------------------
# The two sides


@dataclass
class Sides:
    """Both transformers with the N styles in, and what bringing them in cost."""

    peft: FluxTransformer2DModel
    share_model: FluxTransformer2DModel
    share: ShareModel
    share_merge_seconds: list[float]
    share_inject_seconds: float
    first_error: float  # Share's relative error of style 0 merged alone (the rank-p truncation)
    check_share: float  # max over layers: Share's dW of style 0 (alone) vs the best rank-p approximation
    check_peft: float  # max over layers: PEFT's dW of style 0 vs the LoRA's up @ down
    style_errors: list[float]  # Share's relative error of each style after all merges


def build_peft_side(settings: Settings) -> tuple[FluxTransformer2DModel, list[Style], list[float]]:
    """PEFT transformer, the N random styles drawn for its target layers, and the seconds each
    ``load_lora_adapter`` took (hotswap enabled first)."""
    log("building the PEFT transformer")
    transformer = build_transformer(settings)
    targets = find_targets(transformer, FLUX_ATTENTION_TARGETS)
    layers = {name: transformer.get_submodule(name) for name in targets}
    styles = make_styles(settings.num_styles, settings.lora_rank, layers)
    # Before the first adapter, as diffusers requires; all ranks are equal, so nothing is padded.
    transformer.enable_lora_hotswap(target_rank=settings.lora_rank)
    seconds = []
    for style in styles:
        seconds.append(
            timed(lambda s=style: transformer.load_lora_adapter(dict(s.state_dict), adapter_name=s.name, prefix=None))
        )
    log(f"loaded {len(styles)} PEFT adapters: {sum(seconds):.2f} s")
    return transformer, styles, seconds


def check_first_style(
    settings: Settings, share: ShareModel, peft_transformer: FluxTransformer2DModel, style: Style
) -> tuple[float, float]:
    """Both sides hold the same LoRA: ``(Share error, PEFT error)``, each the largest relative
    Frobenius difference over the layers.

    With one style merged and k >= r, Share's ``dW`` must be the LoRA's best rank-p approximation
    (its top-p singular triplets: the core is truncated to rank p); PEFT's ``get_delta_weight``
    must be ``up @ down`` itself. Checked on dense ``(n_out, d_in)`` weights, layer by layer.
    """
    weights = share.factors.style_vector({style.name: 1.0}).float()  # (t,)
    share_error = peft_error = 0.0
    with torch.no_grad():
        for name, layer in share.layers.items():
            lora = style.adapter.layers[name]
            canonical = lora.canonical()  # float64 U (n, r), S (r,), V (d, r)
            p = settings.p
            best = (canonical.U[:, :p] * canonical.S[:p]) @ canonical.V[:, :p].T  # (n_out, d_in)
            share_error = max(share_error, relative(best, layer.delta_weight(weights)))
            peft_layer = peft_transformer.get_submodule(name)
            peft_error = max(peft_error, relative(lora.delta_weight(), peft_layer.get_delta_weight(style.name)))
    return share_error, peft_error


def build_share_side(settings: Settings, styles: Sequence[Style], peft_transformer: FluxTransformer2DModel) -> Sides:
    """Share transformer: inject, merge the first style, check it against PEFT's, merge the rest (timed)."""
    log("building the Share transformer")
    transformer = build_transformer(settings)
    config = ShareConfig(rank=settings.k, pseudo_rank=settings.p)
    start = time.perf_counter()
    share = ShareModel.inject(transformer, target_modules=FLUX_ATTENTION_TARGETS, config=config)
    inject_seconds = time.perf_counter() - start
    assert len(share.layers) == settings.num_layers, f"{len(share.layers)} Share layers, expected {settings.num_layers}"
    merge_seconds = [timed(lambda: share.merge(styles[0].adapter, styles[0].name))]

    first_error = share.factors.style_error(styles[0].name)
    check, peft_check = check_first_style(settings, share, peft_transformer, styles[0])
    for style in styles[1:]:
        merge_seconds.append(timed(lambda s=style: share.merge(s.adapter, s.name)))
    log(f"merged {len(styles)} Share styles: {sum(merge_seconds):.2f} s")
    errors = [share.factors.style_error(style.name) for style in styles]
    return Sides(
        peft=peft_transformer,
        share_model=transformer,
        share=share,
        share_merge_seconds=merge_seconds,
        share_inject_seconds=inject_seconds,
        first_error=first_error,
        check_share=check,
        check_peft=peft_check,
        style_errors=errors,
    )


# ----------------------------------------------------------------------------------------------
# 1. Style switch latency


def bench_switch(settings: Settings, sides: Sides, styles: Sequence[Style]) -> dict[str, Stats]:
    """Interleaved switches to style ``i = round % N``: Share ``set_style`` (one ``(1, t)`` tensor),
    diffusers ``set_adapters`` (visits every LoRA layer), and hotswap of style i's state dict into
    the PEFT slot of style 0 (copies the factors into every LoRA layer). Style 0's weights are put
    back at the end (and checked)."""
    log(f"switch latency: {settings.switch_rounds} interleaved rounds")
    share, peft_model = sides.share, sides.peft
    slot = styles[0].name
    counter = {"share": 0, "set_adapters": 0, "hotswap": 0}

    def share_switch() -> float:
        style = styles[counter["share"] % len(styles)]
        counter["share"] += 1
        return timed(lambda: share.set_style(style.name, batch_size=1))

    def set_adapters_switch() -> float:
        style = styles[counter["set_adapters"] % len(styles)]
        counter["set_adapters"] += 1
        return timed(lambda: peft_model.set_adapters(style.name, 1.0))

    def hotswap_switch() -> float:
        style = styles[counter["hotswap"] % len(styles)]
        counter["hotswap"] += 1
        state_dict = dict(style.state_dict)  # diffusers may rewrite the dict it gets; copy outside the timing
        return timed(lambda: peft_model.load_lora_adapter(state_dict, adapter_name=slot, prefix=None, hotswap=True))

    variants = {
        "Share `set_style`": share_switch,
        "diffusers `set_adapters`": set_adapters_switch,
        "diffusers `load_lora_adapter(hotswap=True)`": hotswap_switch,
    }
    for run in variants.values():  # warm-up
        run()
    gc.collect()
    gc.disable()
    try:
        samples = interleave(variants, settings.switch_rounds)
    finally:
        gc.enable()
    # Context: the same Share switch back to back, caches warm (the interleaved figure is the one that counts).
    warm = [timed(lambda i=i: share.set_style(styles[i % len(styles)].name, batch_size=1)) for i in range(1000)]
    samples[SHARE_WARM] = warm
    # Put style 0 back into its slot and make sure it is really there.
    peft_model.load_lora_adapter(dict(styles[0].state_dict), adapter_name=slot, prefix=None, hotswap=True)
    first = next(key for key in styles[0].state_dict if key.endswith("lora_A.weight"))
    module = peft_model.get_submodule(first.removesuffix(".lora_A.weight"))
    assert torch.equal(module.lora_A[slot].weight, styles[0].state_dict[first]), "hotswap did not restore style 0"
    share.set_style(None)
    peft_model.set_adapters(slot, 1.0)
    return {name: Stats.of(values) for name, values in samples.items()}


SHARE_WARM = "Share `set_style`, 1000 back to back (context)"


def report_switch(settings: Settings, stats: dict[str, Stats]) -> tuple[str, float]:
    """Markdown for section 1 and the speed-up of Share over ``set_adapters``."""
    share = stats["Share `set_style`"].median
    scale = FULL_LAYERS / settings.num_layers
    rows = []
    for name, stat in stats.items():
        is_share = name.startswith("Share")
        spread = f"{ms(stat.low)}-{ms(stat.high)}"
        per_layer = "n/a (one tensor for all layers)" if is_share else us(stat.median / settings.num_layers)
        full = f"{ms(stat.median)} (constant)" if is_share else ms(stat.median * scale)
        rows.append(
            [
                name,
                ms(stat.median),
                spread,
                per_layer,
                full,
                ratio(stat.median / share),
            ]
        )
    speedup = stats["diffusers `set_adapters`"].median / share
    text = (
        f"## 1. Style switch latency ({settings.switch_rounds} interleaved rounds, {settings.num_layers} layers)\n\n"
        + table(
            [
                "method",
                "median ms",
                "p10-p90 ms",
                "per layer us",
                f"x{FULL_LAYERS} layers ms",
                "vs Share",
            ],
            rows,
        )
        + "\n\nShare writes one `(batch, N)` weight tensor whatever the number of layers, so its figure does not "
        f"grow with the model; the diffusers figures are scaled linearly by {FULL_LAYERS}/{settings.num_layers} "
        "(both walk every LoRA layer; hotswap also builds the model's state dict). Hotswap loads from a state "
        "dict already in memory (no disk read), into the slot of style 0. The first three rows are interleaved "
        "(A B C A B C ...: each call finds caches cold after the others, as a switch between denoising calls "
        "would); the last row repeats the Share switch back to back, for context only.\n"
    )
    return text, speedup


# ----------------------------------------------------------------------------------------------
# 2. Bringing the styles in, and their memory


def report_load_and_memory(settings: Settings, sides: Sides, peft_seconds: Sequence[float]) -> tuple[str, float]:
    """Markdown for section 2 and the memory ratio PEFT / Share (layer buffers)."""
    n, layers = settings.num_styles, settings.num_layers
    scale = FULL_LAYERS / layers
    merge = sides.share_merge_seconds
    load_rows = [
        [
            f"Share `merge` (k={settings.k}, p={settings.p})",
            f"{sum(merge):.2f}",
            ms(statistics.median(merge)),
            f"{ms(merge[0])} / {ms(merge[-1])}",
            us(statistics.median(merge) / layers),
            ms(statistics.median(merge) * scale),
        ],
        [
            "diffusers `load_lora_adapter`",
            f"{sum(peft_seconds):.2f}",
            ms(statistics.median(peft_seconds)),
            f"{ms(peft_seconds[0])} / {ms(peft_seconds[-1])}",
            us(statistics.median(peft_seconds) / layers),
            ms(statistics.median(peft_seconds) * scale),
        ],
    ]
    peft_bytes = peft_lora_bytes(sides.peft, [f"s{i}" for i in range(n)])
    share_bytes = share_buffer_bytes(sides.share)
    state_bytes = share_state_bytes(sides.share)
    ratio = peft_bytes / share_bytes
    memory_rows = [
        [
            f"PEFT: {n} adapters' `lora_A` + `lora_B`",
            mib(peft_bytes),
            f"{peft_bytes / layers / 2**10:,.1f} KiB",
            f"{peft_bytes / layers / n / 2**10:,.1f} KiB",
            mib(peft_bytes * scale),
            "1.0x",
        ],
        [
            "Share: buffers in the `ShareLinear` layers + the selection's dense cores",
            mib(share_bytes),
            f"{share_bytes / layers / 2**10:,.1f} KiB",
            f"{share_bytes / layers / n / 2**10:,.1f} KiB",
            mib(share_bytes * scale),
            f"{peft_bytes / share_bytes:,.1f}x less",
        ],
        [
            "Share: all state incl. fit summaries (deduplicated)",
            mib(state_bytes),
            f"{state_bytes / layers / 2**10:,.1f} KiB",
            f"{state_bytes / layers / n / 2**10:,.1f} KiB",
            mib(state_bytes * scale),
            f"{peft_bytes / state_bytes:,.1f}x less",
        ],
    ]
    errors = sides.style_errors
    text = (
        f"## 2. Bringing in {n} styles, and the memory they hold\n\n"
        + table(
            [
                "method",
                "total s",
                "median per style ms",
                "first / last ms",
                "per style per layer us",
                f"per style x{FULL_LAYERS} layers ms",
            ],
            load_rows,
        )
        + f"\n\nShare's one-off `ShareModel.inject` (wrapping {layers} layers): {ms(sides.share_inject_seconds)} ms. "
        "Both sides read the LoRA factors from memory (no file I/O).\n\n"
        + table(
            ["held", f"bytes ({layers} layers)", "per layer", "per layer per style", f"x{FULL_LAYERS} layers", "ratio"],
            memory_rows,
        )
        + f"\n\nThe {FULL_LAYERS}-layer figures are exact multiples: every targeted FLUX.1 layer is 3072 x 3072, "
        f"and k = {settings.k} is reached on every layer. Share's storage grows by 2 k p floats per layer per style "
        f"({2 * settings.k * settings.p * 4 / 2**10:.0f} KiB), PEFT's by 2 x 3072 x r floats "
        f"({2 * settings.hidden * settings.lora_rank * 4 / 2**10:.0f} KiB).\n\n"
        f"Fidelity (context, not a target): both sides hold the same LoRAs. With style 0 merged alone, Share's "
        f"`dW` on every layer is the LoRA's best rank-p={settings.p} approximation to {sides.check_share:.1e} "
        f"(relative, worst layer), and PEFT's `dW` is `lora_B @ lora_A` to {sides.check_peft:.1e}. A rank-"
        f"{settings.lora_rank} LoRA with a flat spectrum is held at relative error {sides.first_error:.2f} at "
        f"p={settings.p} even alone "
        f"(p={settings.lora_rank} would hold it exactly for {2 * settings.k * settings.lora_rank * 4 / 2**10:.0f} "
        f"instead of {2 * settings.k * settings.p * 4 / 2**10:.0f} KiB per layer per style). After all {n} merges, "
        "Share's "
        f"relative error per style is {min(errors):.2f}-{max(errors):.2f} (median {statistics.median(errors):.2f}): "
        f"{n} random rank-{settings.lora_rank} LoRAs span {n * settings.lora_rank} directions per layer and share "
        f"none, so k = {settings.k} keeps only part of each; real LoRAs of one base model share much more "
        "(see `bench_core.py`).\n"
    )
    return text, ratio


# ----------------------------------------------------------------------------------------------
# 3. Per-step transformer time


STEP_VARIANTS = ("base", "Share unfused", "Share fused", "PEFT unfused", "PEFT fused")


def bench_step(settings: Settings, sides: Sides) -> tuple[dict[str, Stats], dict[str, Stats], dict[str, torch.Tensor]]:
    """Interleaved forwards (batch 1) of the five variants, style 0 for the styled ones.

    Base is the Share transformer with no style selected (its ``ShareLinear`` layers take the plain
    path). Fusing and unfusing happen outside the timed region and are timed separately. Returns
    ``(forward stats, fuse + unfuse stats, each variant's output of the last round)``.
    """
    log(f"per-step time: {settings.step_rounds} interleaved rounds of {len(STEP_VARIANTS)} variants")
    share, share_model, peft_model = sides.share, sides.share_model, sides.peft
    style = "s0"
    inputs = transformer_inputs(settings, 1)
    # Share's default fuse keeps a copy of each weight so that unfusing is bit for bit; PEFT's subtracts the delta
    # again, which exact=False does too: that row is the same work as PEFT's.
    fuse_samples: dict[str, list[float]] = {
        "Share `fuse_style` + `unfuse_style` (exact: bit-for-bit unfuse, a weight copy)": [],
        "Share `fuse_style(exact=False)` + `unfuse_style` (subtracts, as PEFT)": [],
        "PEFT `fuse_lora` + `unfuse_lora`": [],
    }
    outputs: dict[str, torch.Tensor] = {}

    def base() -> float:
        share.set_style(None)
        return timed_forward(share_model, inputs, outputs, "base")

    def share_unfused() -> float:
        share.set_style(style, batch_size=1)
        seconds = timed_forward(share_model, inputs, outputs, "Share unfused")
        share.set_style(None)
        return seconds

    def share_fused() -> float:
        exact, inexact = list(fuse_samples)[:2]
        fuse = timed(lambda: share.fuse_style(style))
        seconds = timed_forward(share_model, inputs, outputs, "Share fused")
        fuse_samples[exact].append(fuse + timed(share.unfuse_style))
        fuse_samples[inexact].append(timed(lambda: share.fuse_style(style, exact=False)) + timed(share.unfuse_style))
        return seconds

    def peft_unfused() -> float:
        peft_model.set_adapters(style, 1.0)
        return timed_forward(peft_model, inputs, outputs, "PEFT unfused")

    def peft_fused() -> float:
        peft_model.set_adapters(style, 1.0)
        fuse = timed(lambda: peft_model.fuse_lora(adapter_names=[style]))
        seconds = timed_forward(peft_model, inputs, outputs, "PEFT fused")
        fuse += timed(peft_model.unfuse_lora)
        fuse_samples["PEFT `fuse_lora` + `unfuse_lora`"].append(fuse)
        return seconds

    variants = dict(zip(STEP_VARIANTS, (base, share_unfused, share_fused, peft_unfused, peft_fused), strict=True))
    for run in variants.values():  # warm-up (first-call allocations)
        run()
    for samples in fuse_samples.values():
        samples.clear()
    samples = interleave(variants, settings.step_rounds)
    stats = {name: Stats.of(values) for name, values in samples.items()}
    return stats, {name: Stats.of(values) for name, values in fuse_samples.items()}, outputs


def _peft_single_layer(linear: torch.nn.Linear, rank: int) -> torch.nn.Module:
    """A PEFT LoRA of ``rank`` around a copy of ``linear`` (random non-zero factors, scale 1)."""
    from peft import LoraConfig, get_peft_model

    class Holder(torch.nn.Module):
        def __init__(self, layer: torch.nn.Linear):
            super().__init__()
            self.layer = layer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x)

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["layer"], init_lora_weights=False)
    return get_peft_model(Holder(copy.deepcopy(linear)), config).eval()


def bench_layer(settings: Settings, sides: Sides) -> dict[str, Stats]:
    """One targeted linear alone, ``x: (1, image_tokens + text_tokens, hidden)`` as a single block sees it:
    the plain linear, its ``ShareLinear`` with style 0, its PEFT layer with adapter 0 active. Many
    interleaved repeats: the low-rank overhead is ~1% of the layer, far below whole-step noise."""
    log(f"one layer: {settings.layer_rounds} interleaved rounds")
    name = "single_transformer_blocks.0.attn.to_q"
    share_layer = sides.share_model.get_submodule(name)
    peft_layer = sides.peft.get_submodule(name)
    assert isinstance(share_layer, ShareLinear)
    base_layer = share_layer.base_layer
    x = torch.randn(1, settings.image_tokens + settings.text_tokens, settings.hidden, generator=torch.Generator())
    sides.peft.set_adapters("s0", 1.0)

    def run(layer: torch.nn.Module) -> Callable[[], float]:
        def go() -> float:
            with torch.no_grad():
                return timed(lambda: layer(x))

        return go

    def share_run() -> float:
        sides.share.set_style("s0", batch_size=1)
        with torch.no_grad():
            seconds = timed(lambda: share_layer(x))
        sides.share.set_style(None)
        return seconds

    # PEFT at Share's width k: "the same rank" (Share's unfused path is a rank-k product, k >= r).
    peft_same_rank = _peft_single_layer(base_layer, settings.k)
    variants = {
        "plain linear": run(base_layer),
        "Share unfused": share_run,
        "PEFT unfused": run(peft_layer),
        f"PEFT unfused, rank {settings.k}": run(peft_same_rank),
    }
    for go in variants.values():
        go()
    gc.collect()
    gc.disable()
    try:
        samples = interleave(variants, settings.layer_rounds)
    finally:
        gc.enable()
    return {key: Stats.of(values) for key, values in samples.items()}


def report_step(
    settings: Settings, steps: dict[str, Stats], fuses: dict[str, Stats], layer: dict[str, Stats]
) -> tuple[str, dict[str, float]]:
    """Markdown for section 3 and the figures the targets need."""
    base = steps["base"].median
    layers = settings.num_layers
    rows = []
    for name, stat in steps.items():
        overhead = stat.median - base
        rows.append(
            [
                name,
                f"{stat.median:.3f}",
                f"{stat.low:.3f}-{stat.high:.3f}",
                f"{stat.median / base:.4f}",
                f"{overhead * 1e3:+,.1f}",
                f"{overhead / layers * 1e3:+,.2f}",
                f"{overhead / layers * FULL_LAYERS * 1e3:+,.0f}",
            ]
        )
    plain = layer["plain linear"].median
    layer_rows = [
        [
            name,
            ms(stat.median),
            f"{ms(stat.low)}-{ms(stat.high)}",
            f"{stat.median / plain:.4f}",
            f"{(stat.median - plain) * 1e3:+,.3f}",
            f"{(stat.median - plain) * FULL_LAYERS * 1e3:+,.0f}",
        ]
        for name, stat in layer.items()
    ]
    fuse_rows = [
        [name, ms(stat.median), ms(stat.median / layers), ms(stat.median / layers * FULL_LAYERS)]
        for name, stat in fuses.items()
    ]
    tokens = settings.image_tokens + settings.text_tokens
    text = (
        f"## 3. Per-step transformer time (batch 1, {settings.image_tokens} image + {settings.text_tokens} text tokens,"
        f" {settings.step_rounds} interleaved rounds)\n\n"
        + table(
            [
                "variant",
                "median s",
                "min-max s",
                "ratio to base",
                "overhead ms",
                "per layer ms",
                f"x{FULL_LAYERS} layers ms",
            ],
            rows,
        )
        + f"\n\nBlocks here: {settings.double_blocks} double : {settings.single_blocks} single; FLUX.1: "
        f"{FULL_DOUBLE_BLOCKS} : {FULL_SINGLE_BLOCKS}. With the same 1:2 mix the ratios carry over to the full model "
        f"(the embedders and output layers, a few % of a step, aside); a full FLUX.1 step is roughly "
        f"{FULL_LAYERS / layers:.1f}x the absolute times above. Noise of the base rounds "
        f"({steps['base'].spread_label} over median): {steps['base'].spread:.1%}.\n\n"
        f"One layer alone (`single_transformer_blocks.0.attn.to_q`, x: (1, {tokens}, {settings.hidden}), "
        f"{settings.layer_rounds} interleaved repeats; precise where the whole step is noisy):\n\n"
        + table(
            [
                "layer",
                "median ms",
                f"{next(iter(layer.values())).spread_label} ms",
                "ratio",
                "overhead ms",
                f"x{FULL_LAYERS} layers ms",
            ],
            layer_rows,
        )
        + "\n\nEvery round, in the order run:\n\n"
        + rounds_table(steps)
        + "\n\nFusing (outside the timed forwards above):\n\n"
        + table(["fuse + unfuse one style", "ms", "per layer ms", f"x{FULL_LAYERS} layers ms"], fuse_rows)
        + "\n"
    )
    figures = {
        "share_overhead": steps["Share unfused"].median - base,
        "peft_overhead": steps["PEFT unfused"].median - base,
        "fused_ratio": steps["Share fused"].median / base,
        "noise": max(0.02, steps["base"].spread, steps["Share fused"].spread),
        "layer_share_overhead": layer["Share unfused"].median - plain,
        "layer_peft_overhead": layer["PEFT unfused"].median - plain,
        "layer_peft_k_overhead": layer[f"PEFT unfused, rank {settings.k}"].median - plain,
    }
    return text, figures


# ----------------------------------------------------------------------------------------------
# 4. A batch of 4 prompts in 4 styles


def bench_batch(settings: Settings, sides: Sides) -> tuple[dict[str, Stats], float, dict[str, torch.Tensor]]:
    """One Share pass over a batch of 4 (style ``s_b`` for row b) against 4 batch-1 PEFT passes with
    ``set_adapters(s_b)`` before each (included in the time). Returns stats, the relative
    difference between the Share batch's rows and what PEFT gives them (context only: Share's
    reconstruction of random LoRAs is lossy), and for the same-result check (untimed) the Share batch's
    output, its rows run one at a time in their styles, and the base model's."""
    count = settings.batch_styles
    log(f"batch of {count}: {settings.batch_rounds} interleaved rounds")
    share, share_model, peft_model = sides.share, sides.share_model, sides.peft
    names = [f"s{i}" for i in range(count)]
    inputs = transformer_inputs(settings, count)
    rows = [row_of(inputs, b) for b in range(count)]
    outputs: dict[str, torch.Tensor] = {}

    def share_batch() -> float:
        share.set_style(names, batch_size=count)
        gc.collect()
        start = time.perf_counter()
        outputs["share"] = forward(share_model, inputs)
        seconds = time.perf_counter() - start
        share.set_style(None)
        return seconds

    def peft_passes() -> float:
        gc.collect()
        start = time.perf_counter()
        results = []
        for name, row in zip(names, rows, strict=True):
            peft_model.set_adapters(name, 1.0)
            results.append(forward(peft_model, row))
        seconds = time.perf_counter() - start
        outputs["peft"] = torch.cat(results)
        return seconds

    variants = {
        f"Share: one pass, batch {count}, {count} styles": share_batch,
        f"diffusers: {count} passes of batch 1 + `set_adapters`": peft_passes,
    }
    share_batch()  # warm-up: the first batch-4 call allocates for the new shapes (batch-1 ones are warm)
    samples = interleave(variants, settings.batch_rounds)
    peft_model.set_adapters("s0", 1.0)
    difference = relative(outputs["peft"], outputs["share"])
    each = []
    for name, row in zip(names, rows, strict=True):
        share.set_style(name, batch_size=1)
        each.append(forward(share_model, row))
    share.set_style(None)
    checked = {"share": outputs["share"], "share_each": torch.cat(each), "base": forward(share_model, inputs)}
    return {key: Stats.of(values) for key, values in samples.items()}, difference, checked


def report_batch(settings: Settings, stats: dict[str, Stats], difference: float) -> tuple[str, float]:
    """Markdown for section 4 and the ratio Share / diffusers time."""
    share, peft_stat = stats.values()
    rows = [
        [
            name,
            f"{stat.median:.3f}",
            f"{stat.low:.3f}-{stat.high:.3f}",
            f"{stat.median / settings.batch_styles:.3f}",
            f"{stat.median / peft_stat.median:.3f}",
        ]
        for name, stat in stats.items()
    ]
    text = (
        f"## 4. A batch of {settings.batch_styles} prompts in {settings.batch_styles} styles "
        f"({settings.batch_rounds} interleaved rounds)\n\n"
        + table(["method", "median s", "min-max s", "per image s", "ratio to diffusers"], rows)
        + "\n\n"
        + rounds_table(stats)
        + f"\n\nRelative difference of the outputs (Share's lossy k={settings.k} reconstruction of "
        f"{settings.num_styles} random LoRAs vs the exact LoRAs): {difference:.2e}; context only.\n"
    )
    return text, share.median / peft_stat.median


# ----------------------------------------------------------------------------------------------
# Main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run at toy widths (numbers not meaningful)")
    args = parser.parse_args(argv)
    # PEFT warns on every adapter after the first that the model now holds several: that is the point here.
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
    settings = Settings.quick() if args.quick else Settings.full()
    started = time.perf_counter()
    load_at_start = os.getloadavg()

    peft_model, styles, peft_seconds = build_peft_side(settings)
    sides = build_share_side(settings, styles, peft_model)

    print("# share-diffusers Flux benchmark" + (" (--quick smoke run: numbers not meaningful)" if args.quick else ""))
    print(
        f"\nFluxTransformer2DModel, hidden {settings.hidden} ({settings.heads} heads x 128), joint_attention_dim "
        f"{settings.joint_dim}, pooled {settings.pooled_dim}, in_channels 64, guidance embedding, "
        f"{settings.double_blocks} double + {settings.single_blocks} single blocks (FLUX.1: {FULL_DOUBLE_BLOCKS} + "
        f"{FULL_SINGLE_BLOCKS}), random float32 weights. {settings.num_styles} random rank-{settings.lora_rank} "
        f"LoRAs on the {settings.num_layers} attention linears (FLUX.1: {FULL_LAYERS}). Share k={settings.k}, "
        f"p={settings.p}. torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; load average at start "
        f"{load_at_start[0]:.2f}.\n",
        flush=True,
    )

    switch = bench_switch(settings, sides, styles)
    switch_text, switch_speedup = report_switch(settings, switch)
    print(switch_text, flush=True)
    del styles  # the LoRA factors: both sides hold their own copies now
    gc.collect()

    memory_text, memory_ratio = report_load_and_memory(settings, sides, peft_seconds)
    print(memory_text, flush=True)

    steps, fuses, step_outputs = bench_step(settings, sides)
    layer = bench_layer(settings, sides)
    step_text, figures = report_step(settings, steps, fuses, layer)
    print(step_text, flush=True)

    batch, difference, batch_outputs = bench_batch(settings, sides)
    batch_text, batch_ratio = report_batch(settings, batch, difference)
    print(batch_text, flush=True)

    fused_off = abs(figures["fused_ratio"] - 1.0)
    targets = [
        (
            "1. Share switch >= 100x faster than `set_adapters`",
            f"{switch_speedup:,.0f}x",
            switch_speedup >= 100,
        ),
        (
            "2. Share holds the styles in >= 5x less memory than PEFT (layer buffers + selection)",
            f"{memory_ratio:.1f}x",
            memory_ratio >= 5,
        ),
        (
            "3a. Share unfused overhead <= PEFT LoRA's, whole step",
            f"{figures['share_overhead'] * 1e3:+,.0f} ms vs {figures['peft_overhead'] * 1e3:+,.0f} ms "
            f"(noise {figures['noise']:.1%} of a step)",
            figures["share_overhead"] <= figures["peft_overhead"],
        ),
        (
            f"3b. Share unfused overhead <= PEFT LoRA's at the same rank ({settings.k}), one layer",
            f"{figures['layer_share_overhead'] * 1e3:+,.3f} ms vs {figures['layer_peft_k_overhead'] * 1e3:+,.3f} ms "
            f"(rank-{settings.lora_rank} PEFT: {figures['layer_peft_overhead'] * 1e3:+,.3f} ms)",
            figures["layer_share_overhead"] <= figures["layer_peft_k_overhead"],
        ),
        (
            "3c. Share fused == base within noise",
            f"ratio {figures['fused_ratio']:.4f} (noise {figures['noise']:.1%})",
            fused_off <= figures["noise"],
        ),
        (
            f"4. one Share batch of {settings.batch_styles} styles no slower than {settings.batch_styles} "
            "diffusers passes",
            f"{batch_ratio:.3f}x the time",
            batch_ratio <= 1.0,
        ),
    ]
    targets += same_result_checks(step_outputs, batch_outputs)
    print("## Targets\n")
    print(table(["target", "measured", "result"], [[t, m, "PASS" if ok else "FAIL"] for t, m, ok in targets]))
    print(
        f"\nNoise for 3c: the larger of 2% and the max-min spread (over the median) of the base and fused rounds. "
        f"Peak RSS {peak_rss_gib():.1f} GiB; wall time {time.perf_counter() - started:.0f} s; load average at end "
        f"{os.getloadavg()[0]:.2f}."
    )


if __name__ == "__main__":
    main()
