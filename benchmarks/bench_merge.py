"""Merging one LoRA into a FLUX.1-sized Share bank that holds 19 styles, against diffusers' ``load_lora_adapter``.

    python benchmarks/bench_merge.py                  # FLUX.1's 266 attention linears; PEFT at what fits in memory
    python benchmarks/bench_merge.py --peft-blocks 19:38 --rounds 7     # a machine with ~40 GB free: all at full size
    python benchmarks/bench_merge.py --quick          # toy widths, a smoke run

What is timed, in interleaved rounds (A B C A B C ...; medians, and min-max), after one untimed warm-up round:

- Share, per layer: ``ShareFactors.merge(..., batch_layers=False)``, every layer on its own
  (``subspace.merge_layer``) on the thread pool;
- Share, batched: ``ShareFactors.merge`` as it runs by default, layers of one class merged together with batched
  linear algebra (``batched_merge.merge_layers``) in chunks on the thread pool;
- PEFT: ``FluxTransformer2DModel.load_lora_adapter`` of the same LoRA (the same tensors, as a diffusers state
  dict) into a transformer with random bf16 weights, built on the meta device, then ``to_empty`` and filled on
  the CPU. The adapter is deleted again after each round (not timed).

Every merge gets fresh ``LoraLayer`` objects, so no canonical form is cached from an earlier round. The LoRA is
rank 16, bf16, drawn as ``benchmarks/common.py`` draws them; the bank's 19 styles are other random LoRAs,
fitted (k=32, p=8) on a few distinct layers of each shape and repeated over the model's layers: a merge reads
its layers and never modifies them, so this is the work of a real bank at a fraction of the set-up time.

A full FLUX.1 transformer is 24 GB in bf16. The PEFT model gets the largest number of blocks (double:single as
19:38) that fits in ``--memory-fraction`` of the available memory, unless ``--peft-blocks`` says otherwise; the
Share variants are then timed both at full size and on exactly the PEFT model's layers, so one row compares all
three on the same layers. Where PEFT ran on fewer layers, its full-size time is also shown scaled by the layer
count, marked as an estimate.

Wall times and process CPU times (all threads) are both reported: on a shared machine the wall time depends on
the other jobs, the CPU time much less. Torch runs with ``--threads`` threads everywhere (default: the CPUs this
process may use); Share's merge uses ``--workers`` threads of one torch thread each (default: its own default).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    FULL_DOUBLE_BLOCKS,
    FULL_SINGLE_BLOCKS,
    LORA_SEED,
    LORA_UP_STD,
    MODEL_SEED,
    Stats,
    fill_random_,
    flux1_transformer,
    log,
    ratio,
    relative,
    table,
)

from share_diffusers.core import LoraAdapter, LoraLayer, ShareConfig, ShareFactors  # noqa: E402
from share_diffusers.core.factors import default_workers  # noqa: E402
from share_diffusers.core.inject import find_targets  # noqa: E402
from share_diffusers.flux_lora import FLUX_TARGET_PRESETS  # noqa: E402

HELD_SEED = LORA_SEED + 1000  # the bank's styles: other draws than the merged LoRA's


@dataclass(frozen=True)
class Settings:
    heads: int
    joint_dim: int
    pooled_dim: int
    double_blocks: int
    single_blocks: int
    rank: int
    k: int
    p: int
    held: int
    distinct: int

    @classmethod
    def of(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            return cls(2, 64, 32, 2, 4, rank=4, k=8, p=4, held=3, distinct=2)
        return cls(24, 4096, 768, FULL_DOUBLE_BLOCKS, FULL_SINGLE_BLOCKS, args.rank, 32, 8, args.held, args.distinct)


def flux_transformer(settings: Settings, double_blocks: int, single_blocks: int, device: str | torch.device):
    """A FLUX.1-configured ``FluxTransformer2DModel``; on ``"meta"`` only its structure (no memory)."""
    with torch.device("meta"):
        model = flux1_transformer(double_blocks, single_blocks, settings.heads, settings.joint_dim, settings.pooled_dim)
    model = model.to(torch.bfloat16)
    if str(device) != "meta":
        model = model.to_empty(device=device)
        fill_random_(model, torch.device(device), MODEL_SEED)
    return model.eval().requires_grad_(False)


def target_shapes(model: torch.nn.Module, targets: str) -> dict[str, tuple[int, int]]:
    """``name -> (out_features, in_features)`` of the model's Share targets."""
    return {
        name: (module.out_features, module.in_features)
        for name in find_targets(model, FLUX_TARGET_PRESETS[targets])
        for module in [model.get_submodule(name)]
    }


def draw_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> tuple[dict[str, torch.Tensor], LoraAdapter]:
    """A random rank-``rank`` bf16 LoRA as common.make_styles draws one: a diffusers state dict and the same tensors
    as a Share adapter (scale 1)."""
    generator = torch.Generator().manual_seed(seed)
    state_dict, layers = {}, {}
    for name, (n_out, d_in) in shapes.items():
        down = (torch.randn(rank, d_in, generator=generator) / d_in**0.5).to(torch.bfloat16)
        up = (torch.randn(n_out, rank, generator=generator) * LORA_UP_STD).to(torch.bfloat16)
        state_dict[f"{name}.lora_A.weight"], state_dict[f"{name}.lora_B.weight"] = down, up
        layers[name] = LoraLayer(up=up, down=down, scale=1.0)
    return state_dict, LoraAdapter(layers)


def fresh(adapter: LoraAdapter, names: list[str] | None = None) -> LoraAdapter:
    """The same factors in new ``LoraLayer`` objects (no cached canonical form), optionally on ``names`` only."""
    names = list(adapter.layers) if names is None else names
    return LoraAdapter({name: LoraLayer(adapter.layers[name].up, adapter.layers[name].down, 1.0) for name in names})


def build_bank(shapes: dict[str, tuple[int, int]], settings: Settings, workers: int | None) -> ShareFactors:
    """``settings.held`` random styles fitted on up to ``settings.distinct`` layers of each shape, repeated over
    ``shapes`` (layer states are only read by a merge)."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, shape in shapes.items():
        by_shape.setdefault(shape, []).append(name)
    distinct = {
        name: shape for names in by_shape.values() for name in names[: settings.distinct] for shape in [shapes[name]]
    }
    adapters = [draw_lora(distinct, settings.rank, HELD_SEED + index)[1] for index in range(settings.held)]
    config = ShareConfig(rank=settings.k, pseudo_rank=settings.p)
    fitted = ShareFactors.fit(adapters, [f"held{index}" for index in range(settings.held)], config, workers=workers)
    layers = {}
    for names in by_shape.values():
        for position, name in enumerate(names):
            layers[name] = fitted.layers[names[position % settings.distinct]]
    return ShareFactors(config, layers, list(fitted.styles))


def timed(run: Callable[[], None]) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


# batched and per-layer merges do the same float64 maths in another order: the merged style's dW agrees to this
SAME_RESULT = 1e-6


def share_merge(
    bank: ShareFactors,
    adapter: LoraAdapter,
    names: list[str] | None,
    batch: bool,
    workers: int | None,
    kept: dict[str, ShareFactors] | None = None,
    key: str = "",
):
    """A timed merge of ``adapter`` into a copy of ``bank``; the merged factors of the last run in ``kept[key]``."""

    def run() -> tuple[float, float]:
        factors = ShareFactors(bank.config, dict(bank.layers), list(bank.styles))
        if names is not None:
            factors.layers = {name: factors.layers[name] for name in names}
        lora = fresh(adapter, names)
        result = timed(lambda: factors.merge(lora, "new", workers=workers, batch_layers=batch))
        if kept is not None:
            kept[key] = factors
        return result

    return run


def merge_difference(per_layer: ShareFactors, batched: ShareFactors, probes: int = 4) -> tuple[float, int]:
    """Largest relative difference of the merged style's ``dW`` between the two merges, on ``probes`` layers spread
    over the model (both ends included), and how many layers were compared."""
    names = list(per_layer.layers)
    picked = sorted({names[round(i * (len(names) - 1) / max(probes - 1, 1))] for i in range(probes)})
    worst = max(relative(per_layer.delta_weight(name, "new"), batched.delta_weight(name, "new")) for name in picked)
    return worst, len(picked)


def peft_load(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]):
    def run() -> tuple[float, float]:
        result = timed(lambda: model.load_lora_adapter(dict(state_dict), adapter_name="new", prefix=None))
        model.delete_adapters("new")
        return result

    return run


def peft_blocks(settings: Settings, fraction: float, requested: str | None) -> tuple[int, int]:
    """Blocks of the PEFT transformer: as requested, or the most (19:38 ratio) whose bf16 weights fit in memory."""
    if requested:
        double, single = (int(part) for part in requested.split(":"))
        return double, single
    if settings.double_blocks < FULL_DOUBLE_BLOCKS:  # --quick
        return settings.double_blocks, settings.single_blocks
    available = _available_bytes()
    for double in range(FULL_DOUBLE_BLOCKS, 0, -1):
        single = 2 * double
        model = flux_transformer(settings, double, single, "meta")
        size = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
        if size <= fraction * available:
            gib = f"{size / 2**30:.1f} GiB of {available / 2**30:.1f} GiB available"
            log(f"PEFT transformer: {double}+{single} blocks, {gib}")
            return double, single
    return 1, 2


def _available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy widths, for a smoke test")
    parser.add_argument("--targets", choices=sorted(FLUX_TARGET_PRESETS), default="attention")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16, help="rank of the merged and held LoRAs")
    parser.add_argument("--held", type=int, default=19, help="styles the bank holds before the merge")
    parser.add_argument("--distinct", type=int, default=8, help="distinct fitted layer states per shape")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
    parser.add_argument("--workers", type=int, default=None, help="Share's merge threads (default: its default)")
    parser.add_argument("--peft-blocks", default=None, help="DOUBLE:SINGLE blocks of the PEFT transformer")
    parser.add_argument("--memory-fraction", type=float, default=0.4, help="of the available memory, for PEFT's model")
    parser.add_argument("--no-peft", action="store_true", help="time the Share variants only")
    args = parser.parse_args(argv)
    settings = Settings.of(args)
    torch.set_num_threads(args.threads)
    workers = args.workers if args.workers is not None else default_workers()
    load_before = os.getloadavg()

    full_shapes = target_shapes(
        flux_transformer(settings, settings.double_blocks, settings.single_blocks, "meta"), args.targets
    )
    log(f"{len(full_shapes)} target layers in {len(set(full_shapes.values()))} shape(s); fitting the bank")
    started = time.perf_counter()
    bank = build_bank(full_shapes, settings, workers)
    state_dict, adapter = draw_lora(full_shapes, settings.rank, LORA_SEED)
    log(f"bank of {settings.held} styles and the LoRA ready in {time.perf_counter() - started:.1f} s")

    kept: dict[str, ShareFactors] = {}
    per_layer_key, batched_key = (f"Share, {kind} ({len(full_shapes)} layers)" for kind in ("per layer", "batched"))
    variants: dict[str, Callable[[], tuple[float, float]]] = {
        per_layer_key: share_merge(bank, adapter, None, False, workers, kept, per_layer_key),
        batched_key: share_merge(bank, adapter, None, True, workers, kept, batched_key),
    }
    peft_layers = None
    if not args.no_peft:
        double, single = peft_blocks(settings, args.memory_fraction, args.peft_blocks)
        started = time.perf_counter()
        model = flux_transformer(settings, double, single, "cpu")
        peft_names = sorted(target_shapes(model, args.targets))
        peft_layers = len(peft_names)
        log(
            f"PEFT transformer ({double}+{single} blocks, {peft_layers} layers) built and filled in "
            f"{time.perf_counter() - started:.1f} s"
        )
        peft_state = {key: value for key, value in state_dict.items() if key.rsplit(".", 2)[0] in peft_names}
        if peft_layers < len(full_shapes):
            variants[f"Share, per layer ({peft_layers} layers)"] = share_merge(
                bank, adapter, peft_names, False, workers
            )
            variants[f"Share, batched ({peft_layers} layers)"] = share_merge(bank, adapter, peft_names, True, workers)
        variants[f"PEFT load_lora_adapter ({peft_layers} layers)"] = peft_load(model, peft_state)

    log("warm-up round")
    for run in variants.values():
        run()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for index in range(args.rounds):
        for name, run in variants.items():
            samples[name].append(run())
        log(f"round {index + 1}/{args.rounds}: " + ", ".join(f"{s[-1][0]:.3f}" for s in samples.values()))

    walls = {name: Stats.of([wall for wall, _ in values]) for name, values in samples.items()}
    cpus = {name: statistics.median(cpu for _, cpu in values) for name, values in samples.items()}
    peft_key = next((name for name in variants if name.startswith("PEFT")), None)
    rows = []
    for name, stat in walls.items():
        layers = int(name.rsplit("(", 1)[1].split()[0])
        reference = None
        if peft_key is not None:
            # Ratio to PEFT on the same layers; at full size against PEFT's time scaled by the layer count.
            reference = walls[peft_key].median * (layers / peft_layers)
        rows.append(
            [
                name,
                f"{stat.median:.3f}",
                f"{stat.low:.3f}-{stat.high:.3f}",
                f"{cpus[name]:.2f}",
                f"{stat.median / layers * 1e3:.2f}",
                ratio(stat.median / reference) if reference else "",
            ]
        )
    if peft_key is not None and peft_layers < len(full_shapes):
        estimate = walls[peft_key].median * len(full_shapes) / peft_layers
        rows.append([f"PEFT, scaled to {len(full_shapes)} layers (estimate)", f"{estimate:.3f}", "", "", "", "1.00x"])
    k, p = settings.k, settings.p
    print(f"# Merging one rank-{settings.rank} LoRA into a bank of {settings.held} styles (k={k}, p={p})\n")
    print(
        f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} CPUs, "
        f"torch {torch.__version__}, "
        f"{args.threads} torch thread(s), Share merge workers {workers}; load average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after; {args.rounds} interleaved rounds after a warm-up; targets: {args.targets}, "
        f"{len(full_shapes)} layers in {len(set(full_shapes.values()))} shape class(es).\n"
    )
    print(
        table(
            [
                "variant",
                "median s",
                "min-max s",
                "CPU s (median)",
                "ms per layer",
                "vs PEFT (same layers, or its scaled estimate)",
            ],
            rows,
        )
    )
    difference, compared = merge_difference(kept[per_layer_key], kept[batched_key])
    same = difference <= SAME_RESULT
    print(
        f"\nSame result: the merged style's dW after the batched merge vs the per-layer one, on {compared} layers: "
        f"max relative difference {difference:.1e} (<= {SAME_RESULT:g}: {'PASS' if same else 'FAIL'})."
    )
    batched = [name for name in walls if name.startswith("Share, batched")]
    for name in batched:
        per_layer = name.replace("batched", "per layer")
        print(
            f"\n{name}: {ratio(walls[name].median / walls[per_layer].median)} the per-layer wall time, "
            f"{ratio(cpus[name] / cpus[per_layer])} its CPU time."
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
