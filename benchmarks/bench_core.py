"""Core benchmark: Share (``share_diffusers.core``) against the published ``lorashare`` 0.1.3.

Run ``python benchmarks/bench_core.py`` (about 15 minutes on 2 CPU cores; ``--quick``: a smoke run of
a minute). Results go to stdout as markdown tables; progress goes to stderr.

The layers are shaped like Flux's attention linears: hidden size 3072, 19 double blocks x 8 linears
plus 38 single blocks x 3 linears = 266 layers of ``3072 x 3072``. LoRAs are synthetic (no download):

- ``shared``: per layer a shared subspace of random rank 24..48 on each side (energy profile
  ``0.95**j``); each LoRA mixes it with its own random ``(s, r)`` coefficients, with a per-LoRA
  spectrum ``0.9**j`` over the rank index (trained LoRAs have decaying spectra), plus Gaussian noise
  holding 2% of each factor's energy. Balanced gauge (``B`` and ``A`` of similar norms).
- ``shared+gauge``: the same LoRAs, each layer of each LoRA re-gauged ``(B G, G^-1 A)`` with
  ``G = Q1 diag(10**u) Q2``, ``u ~ U(-1.5, 1.5)``: what independently trained LoRAs look like.
- ``shared-flat``: as ``shared`` but with a flat spectrum over the rank index.
- ``random``: i.i.d. Gaussian factors, no shared structure.

Every adapter's draws depend only on (fixture seed, layer, adapter index), so the first 20 adapters
of the N=50 set are the N=20 set, and nothing needs all adapters of all layers in memory at once:
fitting is timed over chunks of layers (Share fits each layer independently), variants interleaved
within each chunk, and the chunk times summed.

Sections: (1) fit time; (2) continual merge time against the number of styles held; (3) storage on
disk against N LoRA files; (4) reconstruction error at equal storage, Share vs lorashare; (5) lorashare
compress time vs Share fit time. A closing section checks the targets.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from common import flux_layer_names, log, peak_rss_gib, table
from safetensors.torch import save_file

from share_diffusers.core import (
    LayerShare,
    LoraAdapter,
    LoraLayer,
    ShareConfig,
    ShareFactors,
    StyleInfo,
    save_factors,
)

BYTES_FP32 = 4
SHARED_PROFILE = 0.95  # energy profile of the shared directions: w_j = 0.95**j
NOISE_FRACTION = 0.02  # share of each factor's energy that is per-LoRA noise
GAUGE_DECADES = 1.5  # scrambled gauges: singular values of G in 10**[-1.5, 1.5]


# ----------------------------------------------------------------------------------------------
# Settings and small helpers


@dataclass(frozen=True)
class Settings:
    """What one run measures. ``full()`` is the real benchmark, ``quick()`` a smoke run."""

    hidden: int
    double_blocks: int
    single_blocks: int
    fit_cases: tuple[tuple[int, int], ...]  # (N adapters, LoRA rank)
    fit_chunk: int  # layers per ShareFactors.fit call
    held: tuple[int, ...]  # styles held before a merge
    merge_rounds: int
    synthetic_styles: int  # the large checkpoint for the storage table
    error_layers: int  # per block kind, for the lorashare comparison
    error_cases: tuple[tuple[str, int, int], ...]  # (fixture, N, rank)
    timed_cases: tuple[tuple[str, int, int], ...]  # error cases also timed with repeats
    timing_reps: int
    k: int = 32
    p: int = 8

    @classmethod
    def full(cls) -> Settings:
        return cls(
            hidden=3072,
            double_blocks=19,
            single_blocks=38,
            fit_cases=((20, 16), (50, 16), (20, 32)),
            fit_chunk=14,
            held=(10, 100, 500),
            merge_rounds=5,
            synthetic_styles=500,
            error_layers=2,
            error_cases=(
                ("shared", 20, 16),
                ("shared+gauge", 20, 16),
                ("shared-flat", 20, 16),
                ("random", 20, 16),
                ("shared", 50, 16),
                ("shared+gauge", 50, 16),
            ),
            timed_cases=(("shared", 20, 16), ("shared", 50, 16)),
            timing_reps=3,
        )

    @classmethod
    def quick(cls) -> Settings:
        return cls(
            hidden=512,
            double_blocks=1,
            single_blocks=1,
            fit_cases=((4, 16), (8, 16), (4, 32)),
            fit_chunk=6,
            held=(10, 100, 500),
            merge_rounds=2,
            synthetic_styles=500,
            error_layers=1,
            error_cases=(("shared", 4, 16), ("shared+gauge", 4, 16), ("random", 4, 16)),
            timed_cases=(("shared", 4, 16),),
            timing_reps=2,
        )


@dataclass(frozen=True)
class Fixture:
    """How the synthetic LoRAs of one fixture are drawn (see the module docstring)."""

    name: str
    seed: int
    shared: bool = True
    scramble: bool = False
    decay: float = 0.9  # per-LoRA spectrum over the rank index: q_j = decay**j


FIXTURES = {
    "shared": Fixture("shared", seed=1),
    "shared+gauge": Fixture("shared+gauge", seed=1, scramble=True),  # same seed: the same LoRAs re-gauged
    "shared-flat": Fixture("shared-flat", seed=2, decay=1.0),
    "random": Fixture("random", seed=3, shared=False, decay=1.0),
}


def generator(*key: int) -> torch.Generator:
    """A generator seeded deterministically by a tuple of integers."""
    seed = 0
    for part in key:
        seed = (seed * 1_000_003 + part + 7) % (2**61 - 1)
    return torch.Generator().manual_seed(seed)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed(function: Callable[..., object], *args: object, **kwargs: object) -> tuple[float, object]:
    """``(seconds, function(*args, **kwargs))``, timed by ``time.perf_counter``."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - start, result


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.1f} MiB"


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path``."""
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


# ----------------------------------------------------------------------------------------------
# Synthetic LoRAs


def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Random ``(rows, cols)`` float64 matrix with orthonormal columns."""
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))[0]


def layer_loras(
    fixture: Fixture, layer_index: int, shape: tuple[int, int], rank: int, indices: Sequence[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Factors of adapters ``indices`` on one layer: ``(up (n_out, rank), down (rank, d_in))`` in float32.

    The scale ``alpha / r`` is 1 for every adapter (lorashare never folds it in; equal scales keep the
    comparison neutral).
    """
    n_out, d_in = shape
    spectrum = fixture.decay ** torch.arange(rank, dtype=torch.float64)  # (rank,)
    if fixture.shared:
        gen = generator(fixture.seed, layer_index, 10**9)
        s = int(torch.randint(24, 49, (1,), generator=gen))
        basis_out, basis_in = _orthonormal(n_out, s, gen), _orthonormal(d_in, s, gen)  # (n, s), (d, s)
        profile = SHARED_PROFILE ** torch.arange(s, dtype=torch.float64)  # (s,)
    factors = []
    for index in indices:
        gen = generator(fixture.seed, layer_index, index, rank)
        if fixture.shared:
            up = basis_out @ (profile[:, None] * torch.randn(s, rank, generator=gen, dtype=torch.float64))
            down = (basis_in @ (profile[:, None] * torch.randn(s, rank, generator=gen, dtype=torch.float64))).T
            up = up + torch.randn(n_out, rank, generator=gen, dtype=torch.float64) * math.sqrt(
                NOISE_FRACTION * float(up.square().sum()) / up.numel()
            )
            down = down + torch.randn(rank, d_in, generator=gen, dtype=torch.float64) * math.sqrt(
                NOISE_FRACTION * float(down.square().sum()) / down.numel()
            )
        else:
            up = torch.randn(n_out, rank, generator=gen, dtype=torch.float64) / math.sqrt(n_out)
            down = torch.randn(rank, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
        up, down = up * spectrum[None, :], spectrum[:, None] * down
        if fixture.scramble:
            left, right = _orthonormal(rank, rank, gen), _orthonormal(rank, rank, gen)
            exponents = (2 * torch.rand(rank, generator=gen, dtype=torch.float64) - 1) * GAUGE_DECADES
            gauge = left * 10.0**exponents @ right.T  # (rank, rank), condition number up to 1e3
            inverse = right * 10.0 ** (-exponents) @ left.T
            up, down = up @ gauge, inverse @ down
        factors.append((up.float(), down.float()))
    return factors


def make_adapters(
    fixture: Fixture, layers: dict[str, tuple[int, tuple[int, int]]], rank: int, indices: Sequence[int]
) -> list[LoraAdapter]:
    """Adapters ``indices`` over ``layers`` (``name -> (global layer index, shape)``)."""
    per_layer = {name: layer_loras(fixture, index, shape, rank, indices) for name, (index, shape) in layers.items()}
    return [
        LoraAdapter({name: LoraLayer(up=per_layer[name][j][0], down=per_layer[name][j][1]) for name in layers})
        for j in range(len(indices))
    ]


def fresh(adapters: Sequence[LoraAdapter]) -> list[LoraAdapter]:
    """The same factors in new ``LoraLayer`` objects: a layer caches its canonical form (QRs and an SVD) on the
    first fit, and a timed fit must pay for it as a first fit does (not reuse an earlier case's or repeat's)."""
    return [
        LoraAdapter({name: LoraLayer(up=lora.up, down=lora.down, scale=lora.scale) for name, lora in a.layers.items()})
        for a in adapters
    ]


def style_info(name: str, rank: int, shapes: Sequence[tuple[int, int]]) -> StyleInfo:
    """What ``ShareFactors.fit`` records for an fp32 adapter of this rank over these layers."""
    numbers = sum(rank * (n + d) for n, d in shapes)
    return StyleInfo(name=name, rank=rank, num_parameters=numbers, source_bytes=BYTES_FP32 * numbers)


# ----------------------------------------------------------------------------------------------
# 1. Fit time


@dataclass
class FitResult:
    n: int
    rank: int
    seconds: float
    per_layer: list[float]
    factors: ShareFactors


def bench_fit(settings: Settings, names: list[str], shape: tuple[int, int]) -> list[FitResult]:
    """``ShareFactors.fit`` on every layer, in chunks of ``fit_chunk`` layers, the cases interleaved per chunk.

    Returns one result per case with the summed fit time and the fitted factors of all layers.
    """
    config = ShareConfig(rank=settings.k, pseudo_rank=settings.p)
    fixture = FIXTURES["shared"]
    log("fit: warm-up")
    for n, rank in settings.fit_cases:
        warm = make_adapters(fixture, {names[0]: (0, shape)}, rank, range(n))
        ShareFactors.fit(warm, [f"s{i}" for i in range(n)], config)
    seconds = {case: 0.0 for case in settings.fit_cases}
    per_layer = {case: [] for case in settings.fit_cases}
    layers = {case: {} for case in settings.fit_cases}
    for start in range(0, len(names), settings.fit_chunk):
        chunk = {name: (start + j, shape) for j, name in enumerate(names[start : start + settings.fit_chunk])}
        log(f"fit: layers {start}..{start + len(chunk) - 1} of {len(names)}")
        pools = {}  # one draw per rank: the N=20 adapters are the first 20 of the N=50 ones
        for rank in {rank for _, rank in settings.fit_cases}:
            most = max(n for n, r in settings.fit_cases if r == rank)
            pools[rank] = make_adapters(fixture, chunk, rank, range(most))
        for case in settings.fit_cases:
            n, rank = case
            elapsed, fitted = timed(ShareFactors.fit, fresh(pools[rank][:n]), [f"s{i}" for i in range(n)], config)
            seconds[case] += elapsed
            per_layer[case].append(elapsed / len(chunk))
            layers[case].update(fitted.layers)
    results = []
    for case in settings.fit_cases:
        n, rank = case
        styles = [style_info(f"s{i}", rank, [shape] * len(names)) for i in range(n)]
        factors = ShareFactors(config, layers[case], styles)
        results.append(FitResult(n, rank, seconds[case], per_layer[case], factors))
    return results


def report_fit(settings: Settings, results: list[FitResult], num_layers: int) -> str:
    rows = []
    for result in results:
        errors = [result.factors.style_error(name) for name in result.factors.style_names]
        rows.append(
            [
                result.n,
                result.rank,
                num_layers,
                f"{result.seconds:.1f}",
                f"{1000 * median(result.per_layer):.0f}",
                f"{statistics.mean(errors):.3f} / {max(errors):.3f}",
            ]
        )
    return (
        f"## 1. Fit time (`ShareFactors.fit`, k={settings.k}, p={settings.p}, fixture `shared`)\n\n"
        + table(
            ["N", "rank", "layers", "fit time (s)", "median ms/layer", "style error mean / max (self-reported)"], rows
        )
        + f"\n\nMeasured on all {num_layers} layers (not extrapolated): the sum of "
        f"{math.ceil(num_layers / settings.fit_chunk)} `fit` calls over chunks of {settings.fit_chunk} layers, "
        "the cases interleaved within each chunk; one warm-up fit per case beforehand.\n"
    )


# ----------------------------------------------------------------------------------------------
# 2. Continual merge time


def synthetic_state(settings: Settings, names: list[str], shape: tuple[int, int], styles: int) -> ShareFactors:
    """Factors "holding ``styles`` styles" without fitting them: random orthonormal ``(n, k)`` bases, random
    ``(t, k, p)`` cores, Gram summaries ``sum C C^T`` / ``sum C^T C`` and norms consistent with the cores.

    A merge's cost depends only on these shapes, so this stands for a real bank of that size.
    """
    k, p = settings.k, settings.p
    n_out, d_in = shape
    layers = {}
    for index, name in enumerate(names):
        gen = generator(99, index, styles)
        core_out = torch.randn(styles, k, p, generator=gen) / math.sqrt(k * p)  # (t, k, p)
        core_in = torch.randn(styles, k, p, generator=gen) / math.sqrt(k * p)
        cores = core_out @ core_in.transpose(1, 2)  # (t, k, k)
        layers[name] = LayerShare(
            basis_out=_orthonormal(n_out, k, gen).float(),
            basis_in=_orthonormal(d_in, k, gen).float(),
            core_out=core_out,
            core_in=core_in,
            gram_out=(cores @ cores.transpose(1, 2)).sum(0),
            gram_in=(cores.transpose(1, 2) @ cores).sum(0),
            norm=cores.flatten(1).norm(dim=1),
            error=torch.zeros(styles),
            truncated=torch.zeros(styles),
        )
    config = ShareConfig(rank=k, pseudo_rank=p)
    return ShareFactors(config, layers, [style_info(f"held{i}", 16, [shape] * len(names)) for i in range(styles)])


@dataclass
class MergeResult:
    held: int
    seconds: list[float]


def bench_merge(
    settings: Settings, names: list[str], shape: tuple[int, int]
) -> tuple[list[MergeResult], dict[int, ShareFactors]]:
    """Time merging one rank-16 LoRA (all layers) into banks holding ``settings.held`` styles.

    Rounds rotate the order (10/100/500, 100/500/10, ...); the bank is restored after every merge
    (``merge`` swaps in a new ``layers`` dict and styles list and never mutates the old ones).
    """
    log("merge: building synthetic banks")
    states = {held: synthetic_state(settings, names, shape, held) for held in settings.held}
    layer_map = {name: (index, shape) for index, name in enumerate(names)}
    adapter = make_adapters(FIXTURES["shared"], layer_map, 16, [10**6])[0]

    def merge_once(held: int) -> float:
        state = states[held]
        layers, styles, conv = state.layers, state.styles, set(state.conv_layers)
        elapsed, _ = timed(state.merge, fresh([adapter])[0], "new")
        if len(state.styles) != held + 1 or state.layers is layers:
            raise RuntimeError("merge did not add exactly one style")
        state.layers, state.styles, state.conv_layers = layers, styles, conv
        return elapsed

    log("merge: warm-up")
    merge_once(settings.held[0])
    seconds = {held: [] for held in settings.held}
    for round_index in range(settings.merge_rounds):
        order = settings.held[round_index % len(settings.held) :] + settings.held[: round_index % len(settings.held)]
        for held in order:
            seconds[held].append(merge_once(held))
        log(
            f"merge: round {round_index + 1}/{settings.merge_rounds}: "
            + ", ".join(f"{held}: {seconds[held][-1]:.2f}s" for held in settings.held)
        )
    return [MergeResult(held, seconds[held]) for held in settings.held], states


def report_merge(settings: Settings, results: list[MergeResult], num_layers: int) -> tuple[str, float]:
    base = median(results[0].seconds)
    rows = [
        [
            result.held,
            f"{median(result.seconds):.2f}",
            " ".join(f"{s:.2f}" for s in result.seconds),
            f"{1000 * median(result.seconds) / num_layers:.1f}",
            f"{median(result.seconds) / base:.2f}x",
        ]
        for result in results
    ]
    ratio = median(results[-1].seconds) / base
    text = (
        f"## 2. Continual merge of one rank-16 LoRA ({num_layers} layers, k={settings.k}, p={settings.p})\n\n"
        + table(["styles held", "median (s)", "all runs (s)", "ms/layer", f"vs {results[0].held} held"], rows)
        + f"\n\nHeld banks are synthetic (random orthonormal bases and cores of the right shapes; the cost depends "
        f"only on shapes). {settings.merge_rounds} interleaved rounds in rotating order after one warm-up merge; "
        "each merge starts from the same bank.\n"
    )
    return text, ratio


# ----------------------------------------------------------------------------------------------
# 3. Storage


def lora_file_bytes(names: list[str], shape: tuple[int, int], rank: int, dtype: torch.dtype, path: Path) -> int:
    """Size on disk of one LoRA safetensors file (diffusers keys) of this rank and dtype over ``names``."""
    n_out, d_in = shape
    tensors = {}
    for name in names:
        tensors[f"transformer.{name}.lora_A.weight"] = torch.zeros(rank, d_in, dtype=dtype)
        tensors[f"transformer.{name}.lora_B.weight"] = torch.zeros(n_out, rank, dtype=dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})
    size = path.stat().st_size
    path.unlink()
    return size


def checkpoint_bytes(factors: ShareFactors, path: Path) -> int:
    """Bytes of the folder ``save_factors`` writes (removed afterwards)."""
    shutil.rmtree(path, ignore_errors=True)
    save_factors(factors, path)
    size = dir_bytes(path)
    shutil.rmtree(path)
    return size


def bench_storage(
    settings: Settings,
    fits: list[FitResult],
    big: ShareFactors,
    names: list[str],
    shape: tuple[int, int],
    workdir: Path,
) -> tuple[str, dict[tuple[int, int], float], list[float]]:
    """Share checkpoint bytes (saved and measured) against N LoRA files (one written and measured, times N).

    Returns the report, ``{(N, rank): fp32 ratio}`` and every checkpoint's deviation from the formula.
    """
    log("storage: LoRA files")
    ranks = sorted({rank for _, rank in settings.fit_cases})
    lora = {
        (rank, dtype): lora_file_bytes(names, shape, rank, dtype, workdir / "lora.safetensors")
        for rank in ranks
        for dtype in (torch.float32, torch.bfloat16)
    }
    measured = {}  # (N, rank) -> (bytes, formula bytes, how)
    for fit in fits:
        log(f"storage: saving N={fit.n} r={fit.rank}")
        size = checkpoint_bytes(fit.factors, workdir / f"share_N{fit.n}_r{fit.rank}")
        measured[(fit.n, fit.rank)] = (size, BYTES_FP32 * fit.factors.formula_numbers(), "saved (fitted)")
    log(f"storage: saving the synthetic {len(big.styles)}-style bank")
    size = checkpoint_bytes(big, workdir / "share_big")
    for rank in ranks:
        measured[(len(big.styles), rank)] = (size, BYTES_FP32 * big.formula_numbers(), "saved (synthetic bank)")
    counts = sorted({n for n, _ in settings.fit_cases} | {len(big.styles)})
    rows, ratios, deviations = [], {}, []
    for rank in ranks:
        for n in counts:
            if (n, rank) in measured:
                share, formula, how = measured[(n, rank)]
            else:  # the same N fitted at another rank: identical tensor shapes (Share's size ignores r)
                other = next(r for r in ranks if (n, r) in measured)
                share, formula, _ = measured[(n, other)]
                how = f"= rank-{other} checkpoint (same shapes)"
            deviation = share / formula - 1
            deviations.append(deviation)
            fp32, bf16 = n * lora[(rank, torch.float32)], n * lora[(rank, torch.bfloat16)]
            ratios[(n, rank)] = fp32 / share
            lorashare = BYTES_FP32 * len(names) * (settings.k * sum(shape) + 2 * n * settings.k * rank)
            rows.append(
                [
                    rank,
                    n,
                    mib(share),
                    how,
                    mib(formula),
                    f"{100 * deviation:+.2f}%",
                    mib(fp32),
                    f"{fp32 / share:.1f}x",
                    mib(bf16),
                    f"{bf16 / share:.1f}x",
                    f"{mib(lorashare)} ({fp32 / lorashare:.1f}x)",
                ]
            )
    header = [
        "LoRA rank",
        "N",
        "Share on disk",
        "how",
        "formula",
        "vs formula",
        "N LoRAs fp32",
        "ratio fp32",
        "N LoRAs bf16",
        "ratio bf16",
        f"lorashare k={settings.k} (formula)",
    ]
    file_sizes = ", ".join(
        f"rank {rank} {str(dtype).removeprefix('torch.')}: {lora[(rank, dtype)]:,} B" for rank, dtype in lora
    )
    text = (
        f"## 3. Storage on disk (k={settings.k}, p={settings.p}, {len(names)} layers {shape[0]}x{shape[1]})\n\n"
        + table(header, rows)
        + "\n\nShare: the folder `save_factors` writes (JSON + float32 safetensors), measured. Formula: "
        "4 B x per layer [k(n+d) + 2kp per style]. LoRA files: one safetensors file (diffusers keys) written and "
        f"measured, times N ({file_sizes}). The {len(big.styles)}-style bank is synthetic (random values, real "
        "shapes), saved and measured; Share's size does not depend on the LoRAs' rank, so rank-32 rows without "
        "their own fit reuse the same-N checkpoint. lorashare: 4 B x per layer [k(n+d) + 2Nkr], tensors only "
        "(its extra JSON files not counted); in brackets its ratio vs the fp32 LoRA files.\n"
    )
    return text, ratios, deviations


# ----------------------------------------------------------------------------------------------
# 4 and 5. Error at equal storage and compress time, Share vs lorashare


def peft_state_dicts(
    names: list[str], loras: dict[str, list[tuple[torch.Tensor, torch.Tensor]]], count: int
) -> dict[str, dict[str, torch.Tensor]]:
    """lorashare's input: ``{adapter: {"base_model.model.<layer>.lora_A.weight": (r, d), ...lora_B: (n, r)}}``."""
    return {
        f"s{i}": {
            key: tensor
            for name in names
            for key, tensor in (
                (f"base_model.model.{name}.lora_A.weight", loras[name][i][1]),
                (f"base_model.model.{name}.lora_B.weight", loras[name][i][0]),
            )
        }
        for i in range(count)
    }


def lorashare_compress(state_dicts: dict[str, dict[str, torch.Tensor]], k: int) -> tuple[dict, dict]:
    """lorashare's in-memory compression: components ``{"<layer>:A"|":B": (d, k)}`` and loadings
    ``{adapter: {"<layer>:A"|":B": (k, r)}}``."""
    from lorashare.compression import combine_adapter_weights, compute_adapter_loadings, compute_shared_components

    combined = combine_adapter_weights(state_dicts)
    components, _, _ = compute_shared_components(combined, num_components=k, device="cpu")
    loadings = {name: compute_adapter_loadings(components, sd) for name, sd in state_dicts.items()}
    return components, loadings


def lowrank_error(up: torch.Tensor, down: torch.Tensor, up_hat: torch.Tensor, down_hat: torch.Tensor) -> float:
    """``||up @ down - up_hat @ down_hat||_F / ||up @ down||_F`` in float64 without forming ``n x d`` matrices.

    ``up: (n, r)``, ``down: (r, d)``, ``up_hat: (n, q)``, ``down_hat: (q, d)``.
    """
    left = torch.cat([up, -up_hat], dim=1).double()  # (n, r + q)
    right = torch.cat([down, down_hat], dim=0).double()  # (r + q, d)
    squared = float(((left.T @ left) * (right @ right.T)).sum())
    r = up.shape[1]
    energy = float(((left[:, :r].T @ left[:, :r]) * (right[:r] @ right[:r].T)).sum())
    return math.sqrt(max(squared, 0.0) / energy)


def per_style(errors: dict[str, list[tuple[float, float]]]) -> list[float]:
    """Per style, the relative error over layers: ``sqrt(sum err^2 E) / sqrt(sum E)``; input ``(err, energy)``."""
    return [math.sqrt(sum(e * e * w for e, w in pairs) / sum(w for _, w in pairs)) for pairs in errors.values()]


def share_errors(factors: ShareFactors, names: list[str], loras: dict, count: int) -> tuple[list[float], float]:
    """Per-style errors of Share computed from its stored float32 tensors, and the largest gap to the
    errors ``ShareFactors`` reports itself (``layer_errors``)."""
    errors, gap = {}, 0.0
    for i in range(count):
        reported = factors.layer_errors(f"s{i}")
        for name in names:
            layer = factors.layers[name]
            up, down = loras[name][i]
            up_hat = layer.basis_out @ layer.core_out[i]  # (n, p)
            down_hat = (layer.basis_in @ layer.core_in[i]).T  # (p, d)
            error = lowrank_error(up, down, up_hat, down_hat)
            gap = max(gap, abs(error - reported[name]))
            errors.setdefault(i, []).append((error, _energy(up, down)))
    return per_style(errors), gap


def _energy(up: torch.Tensor, down: torch.Tensor) -> float:
    """``||up @ down||_F^2``."""
    return float(((up.double().T @ up.double()) * (down.double() @ down.double().T)).sum())


def lorashare_errors(
    components: dict, loadings: dict, names: list[str], loras: dict, count: int, k: int
) -> list[float]:
    """Per-style errors of lorashare truncated to its top ``k`` components (columns sorted by eigenvalue)."""
    errors = {}
    for i in range(count):
        for name in names:
            up, down = loras[name][i]
            loading = loadings[f"s{i}"]
            up_hat = components[f"{name}:B"][:, :k] @ loading[f"{name}:B"][:k]  # (n, r)
            down_hat = (components[f"{name}:A"][:, :k] @ loading[f"{name}:A"][:k]).T  # (r, d)
            errors.setdefault(i, []).append((lowrank_error(up, down, up_hat, down_hat), _energy(up, down)))
    return per_style(errors)


@dataclass
class CompareResult:
    fixture: str
    n: int
    rank: int
    rows: list[list[object]]
    share_seconds: list[float]
    lorashare_seconds: list[float]
    equal_k: int
    gap: float
    share_p8: list[float]
    lorashare_equal: list[float]


def bench_vs_lorashare(settings: Settings, all_names: list[str], shape: tuple[int, int]) -> tuple[list[str], list]:
    """Errors at equal storage and compress times on a named subset of layers."""
    per_kind = settings.error_layers
    doubles = [i for i, name in enumerate(all_names) if name.startswith("transformer_blocks.")]
    singles = [i for i, name in enumerate(all_names) if name.startswith("single_transformer_blocks.")]
    picks = [doubles[0], doubles[len(doubles) // 2 + 1]][:per_kind] + [singles[1], singles[-1]][:per_kind]
    names = [all_names[i] for i in picks]
    k, p = settings.k, settings.p
    n_out, d_in = shape

    log("lorashare: warm-up")
    warm = {names[0]: layer_loras(FIXTURES["shared"], picks[0], shape, 16, range(4))}
    lorashare_compress(peft_state_dicts(names[:1], warm, 4), k)
    ShareFactors.fit([LoraAdapter({names[0]: LoraLayer(u, d)}) for u, d in warm[names[0]]], [f"s{i}" for i in range(4)])

    results = []
    for fixture_name, n, rank in settings.error_cases:
        log(f"compare: fixture {fixture_name}, N={n}, rank {rank}")
        fixture = FIXTURES[fixture_name]
        loras = {
            name: layer_loras(fixture, index, shape, rank, range(n)) for name, index in zip(names, picks, strict=True)
        }
        adapters = [LoraAdapter({name: LoraLayer(*loras[name][i]) for name in names}) for i in range(n)]
        styles = [f"s{i}" for i in range(n)]
        state_dicts = peft_state_dicts(names, loras, n)
        reps = settings.timing_reps if (fixture_name, n, rank) in settings.timed_cases else 1
        share_seconds, lorashare_seconds = [], []
        for _ in range(reps):  # interleaved: lorashare, Share, lorashare, Share, ...
            elapsed, (components, loadings) = timed(lorashare_compress, state_dicts, k)
            lorashare_seconds.append(elapsed / len(names))
            elapsed, fitted = timed(ShareFactors.fit, fresh(adapters), styles, ShareConfig(rank=k, pseudo_rank=p))
            share_seconds.append(elapsed / len(names))
        full_cores = ShareFactors.fit(adapters, styles, ShareConfig(rank=k, pseudo_rank=rank))

        share_bytes = BYTES_FP32 * (k * (n_out + d_in) + 2 * n * k * p)
        per_k = n_out + d_in + 2 * n * rank
        equal_k = round(share_bytes / BYTES_FP32 / per_k)
        share_p8, gap8 = share_errors(fitted, names, loras, n)
        share_full, gap_full = share_errors(full_cores, names, loras, n)
        lorashare_equal = lorashare_errors(components, loadings, names, loras, n, equal_k)
        lorashare_k = lorashare_errors(components, loadings, names, loras, n, k)
        rows = []
        for method, kk, pp, errors, num_bytes in (
            ("Share", k, p, share_p8, share_bytes),
            ("lorashare", equal_k, "-", lorashare_equal, BYTES_FP32 * equal_k * per_k),
            ("Share", k, rank, share_full, BYTES_FP32 * (k * (n_out + d_in) + 2 * n * k * rank)),
            ("lorashare", k, "-", lorashare_k, BYTES_FP32 * k * per_k),
        ):
            rows.append(
                [
                    fixture_name,
                    n,
                    rank,
                    method,
                    kk,
                    pp,
                    f"{num_bytes / 1024:,.0f}",
                    f"{statistics.mean(errors):.4f}",
                    f"{max(errors):.4f}",
                ]
            )
        results.append(
            CompareResult(
                fixture_name,
                n,
                rank,
                rows,
                share_seconds,
                lorashare_seconds,
                equal_k,
                max(gap8, gap_full),
                share_p8,
                lorashare_equal,
            )
        )
    return names, results


def report_compare(
    settings: Settings, names: list[str], results: list[CompareResult], shape: tuple[int, int], num_layers: int
) -> tuple[str, dict[tuple[str, int, int], float]]:
    """Sections 4 and 5; returns the text and the speedup per timed case."""
    rows = [row for result in results for row in result.rows]
    gap = max(result.gap for result in results)
    text = (
        f"## 4. Reconstruction error per style at equal storage, Share vs lorashare ({len(names)} layers: "
        + ", ".join(f"`{name}`" for name in names)
        + ")\n\n"
        + table(["fixture", "N", "rank", "method", "k", "p", "KiB/layer", "mean error", "max error"], rows)
        + "\n\nError: relative Frobenius error of each style's dW over the layers above (sqrt of summed squared "
        "errors over summed energies), mean and max over the N styles, computed in float64 from the stored "
        "float32 tensors. Rows come in equal-storage pairs: Share (k, p) next to lorashare at the k giving the "
        "same bytes, rounded (KiB/layer: 4 B x [k(n+d) + 2Nkp] for Share, not counting its 2k^2 + 2N summary "
        "numbers; 4 B x [k(n+d) + 2Nkr] for lorashare). With p = r the two formulas coincide at the same k. "
        f"Share's self-reported `layer_errors` agree with these to {gap:.1e}.\n"
    )
    speed_rows, speedups = [], {}
    per_layer_bytes = BYTES_FP32 * settings.k * sum(shape)
    for result in results:
        key = (result.fixture, result.n, result.rank)
        if key not in settings.timed_cases:
            continue
        share, lorashare = median(result.share_seconds), median(result.lorashare_seconds)
        speedups[key] = lorashare / share
        share_store = per_layer_bytes + BYTES_FP32 * 2 * result.n * settings.k * settings.p
        lorashare_store = per_layer_bytes + BYTES_FP32 * 2 * result.n * settings.k * result.rank
        speed_rows.append(
            [
                result.fixture,
                result.n,
                result.rank,
                f"{lorashare:.2f}",
                f"{share:.3f}",
                f"{lorashare / share:.1f}x",
                f"{lorashare * num_layers / 60:.1f} min",
                f"{share * num_layers / 60:.1f} min",
                f"{lorashare_store / 1024:,.0f} / {share_store / 1024:,.0f}",
                f"{mib(lorashare_store * num_layers)} / {mib(share_store * num_layers)}",
            ]
        )
    text += (
        f"\n## 5. lorashare compress time vs Share fit time (k={settings.k}; Share p={settings.p})\n\n"
        + table(
            [
                "fixture",
                "N",
                "rank",
                "lorashare s/layer",
                "Share s/layer",
                "speedup",
                f"lorashare x{num_layers} (extrapolated)",
                f"Share x{num_layers} (extrapolated)",
                "storage KiB/layer lorashare / Share",
                f"storage x{num_layers} lorashare / Share",
            ],
            speed_rows,
        )
        + f"\n\nSame adapters, same layers as section 4; medians of {settings.timing_reps} interleaved repeats "
        "(lorashare, Share, lorashare, ...) after one warm-up of each. lorashare: `combine_adapter_weights` + "
        "`compute_shared_components(device='cpu')` + `compute_adapter_loadings` for every adapter (in memory, no "
        f"file I/O). The x{num_layers} columns are per-layer medians times {num_layers} (extrapolated; section 1 "
        "has Share's measured full fit). Storage: tensor formulas, Share without its small summaries.\n"
    )
    return text, speedups


# ----------------------------------------------------------------------------------------------
# Main


def check(name: str, value: str, passed: bool) -> list[str]:
    return [name, value, "PASS" if passed else "FAIL"]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (hidden 512, few layers, small N)")
    parser.add_argument("--workdir", default="/tmp/bench_scratch/work", help="scratch folder for saved files")
    args = parser.parse_args(argv)
    settings = Settings.quick() if args.quick else Settings.full()
    torch.set_num_threads(2)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = flux_layer_names(settings.double_blocks, settings.single_blocks)
    shape = (settings.hidden, settings.hidden)
    started = time.perf_counter()

    print("# share-diffusers core benchmark" + (" (--quick smoke run: targets not meaningful)" if args.quick else ""))
    print(
        f"\n{len(names)} layers of {shape[0]}x{shape[1]} ({settings.double_blocks} double blocks x 8 + "
        f"{settings.single_blocks} single blocks x 3), torch {torch.__version__}, {torch.get_num_threads()} threads, "
        "timings by time.perf_counter.\n"
    )

    fits = bench_fit(settings, names, shape)
    print(report_fit(settings, fits, len(names)), flush=True)

    merges, banks = bench_merge(settings, names, shape)
    merge_text, merge_ratio = report_merge(settings, merges, len(names))
    print(merge_text, flush=True)
    big = banks.pop(settings.synthetic_styles, None) or synthetic_state(
        settings, names, shape, settings.synthetic_styles
    )
    del banks

    storage_text, ratios, deviations = bench_storage(settings, fits, big, names, shape, workdir)
    print(storage_text, flush=True)
    del fits, big

    compare_names, compares = bench_vs_lorashare(settings, names, shape)
    compare_text, speedups = report_compare(settings, compare_names, compares, shape, len(names))
    print(compare_text, flush=True)

    small_n = min(n for n, _ in settings.fit_cases)
    top_rank = max(r for _, r in settings.fit_cases)
    first = settings.timed_cases[0]
    rows = [
        check(
            f"merge time {settings.held[-1]} vs {settings.held[0]} styles held <= 1.5x",
            f"{merge_ratio:.2f}x",
            merge_ratio <= 1.5,
        ),
        check(
            "Share checkpoint within 2% of the formula (every row)",
            f"{100 * max(abs(d) for d in deviations):.2f}% max",
            max(abs(d) for d in deviations) <= 0.02,
        ),
        check(
            f">= 18.5x smaller than {small_n} rank-{top_rank} LoRAs (fp32)",
            f"{ratios[(small_n, top_rank)]:.1f}x",
            ratios[(small_n, top_rank)] >= 18.5,
        ),
        check(
            f">= 9x smaller than {small_n} rank-16 LoRAs (fp32)",
            f"{ratios[(small_n, 16)]:.1f}x",
            ratios[(small_n, 16)] >= 9,
        ),
        check(
            f">= 100x smaller than {settings.synthetic_styles} rank-16 LoRAs (fp32)",
            f"{ratios[(settings.synthetic_styles, 16)]:.1f}x",
            ratios[(settings.synthetic_styles, 16)] >= 100,
        ),
        check(
            f"Share fit >= 20x faster than lorashare (N={first[1]}, rank {first[2]}, `{first[0]}`)",
            f"{speedups[first]:.1f}x",
            speedups[first] >= 20,
        ),
    ]
    for key, speedup in speedups.items():
        if key != first:
            rows.append([f"(info, no target) speedup at N={key[1]}, rank {key[2]}, `{key[0]}`", f"{speedup:.1f}x", "-"])
    print("## Targets\n\n" + table(["target", "measured", "result"], rows))
    print(
        f"\nExtrapolated figures: only the x{len(names)} columns of section 5. Synthetic (shape-only) states: the "
        "held banks of section 2 and the large bank of section 3. Everything else is measured on all layers."
    )
    elapsed = time.perf_counter() - started
    print(f"\nTotal wall time {elapsed:.0f} s ({elapsed / 60:.1f} min), peak RSS {peak_rss_gib():.2f} GiB.")


if __name__ == "__main__":
    main()
