"""The benchmarks run end to end: ``bench_gpu.py --quick`` on the CPU (every section, every row, sane numbers)
and ``bench_flux.py --quick`` (a smoke run of the same shared helpers).

``bench_core.py --quick`` needs ``lorashare`` and takes minutes: marked slow, run with ``SHARE_SLOW_TESTS=1``.
On a GPU machine ``pytest -m gpu`` also runs the quick GPU benchmark on CUDA. The quick runs get one CPU
thread: at toy widths threads gain nothing, and on a busy 2-core machine spinning OpenMP threads made
them ten times slower.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from launch_helpers import run_benchmark

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SECTIONS = ("setup", "step", "batch", "switch", "agreement", "fuse", "profile", "quantized-int8", "quantized-float8")
STEP_VARIANTS = (
    "base (Share model, no style)",
    "base (PEFT model, LoRA disabled)",
    "Share, one style",
    "PEFT, one adapter",
)
slow = pytest.mark.skipif(not os.environ.get("SHARE_SLOW_TESTS"), reason="slow: set SHARE_SLOW_TESTS=1")


def load_benchmark_module(name: str):
    """``benchmarks/<name>.py`` as a module (``bench_common`` for ``common``), its folder importable."""
    import sys

    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_share_model(styles: int = 3, rank: int = 4):
    """Two 16 x 16 linears with ``styles`` random rank-``rank`` LoRAs merged (k = 8, p = 2)."""
    from share_diffusers.core import LoraAdapter, LoraLayer, ShareConfig, ShareModel

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    share = ShareModel.inject(model, target_modules=["0", "1"], config=ShareConfig(rank=8, pseudo_rank=2))
    generator = torch.Generator().manual_seed(0)
    for index in range(styles):
        layers = {}
        for name in ("0", "1"):
            up, down = torch.randn(16, rank, generator=generator), torch.randn(rank, 16, generator=generator)
            layers[name] = LoraLayer(up=up, down=down)
        share.merge(LoraAdapter(layers), f"s{index}")
    return share


def test_share_buffer_bytes_counts_the_selections_dense_cores():
    """Once a style is selected, Share holds every layer's dense (t, k, k) cores in the selection (no layer
    buffer): the memory rows that compare Share with PEFT must count them."""
    common = load_benchmark_module("common")
    share = tiny_share_model()
    before = common.share_buffer_bytes(share)
    share.set_style("s0")
    layers, styles, k = len(share.layers), len(share.style_names), 8
    blended = layers * k * k * 4  # one row of blended cores a layer, float32
    assert common.share_buffer_bytes(share) - before >= layers * styles * k * k * 4 + blended


def run_gpu_benchmark(out: Path, device: str) -> tuple[dict, str, str]:
    """``bench_gpu.py --quick`` on ``device``: ``(json report, markdown report, stdout)``; fails on a non-zero exit."""
    # On a GPU it takes seconds; a stuck run must not eat the device session's budget (gpu_session.sh).
    timeout = 150 if device.startswith("cuda") else 300
    result = run_benchmark("bench_gpu.py", "--quick", "--device", device, "--out", str(out), timeout=timeout)
    out.with_name(out.name + ".stderr.txt").write_text(result.stderr)  # progress, for a failure's post-mortem
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.with_name(out.name + ".json").read_text())
    markdown = out.with_name(out.name + ".md").read_text()
    return report, markdown, result.stdout


def check_gpu_report(report: dict, markdown: str, stdout: str) -> None:
    assert report["errors"] == {} and report["skipped"] == {}
    assert set(report["sections"]) == set(SECTIONS)
    for section in report["sections"].values():  # each section's table in the file and on stdout
        assert f"## {section['title']}" in markdown and f"## {section['title']}" in stdout
    settings = report["meta"]["settings"]
    styles, layers = settings["num_styles"], settings["num_layers"]
    large, small = (name for name, _ in settings["resolutions"])

    setup = report["sections"]["setup"]
    assert len(setup["share_merge_s"]) == len(setup["peft_load_s"]) == styles - 1
    assert len(setup["share_last_merge_s"]) == len(setup["peft_last_load_s"]) == settings["load_rounds"]
    assert setup["peft_bytes"] == styles * layers * 2 * settings["hidden"] * settings["lora_rank"] * 4  # float32
    assert 0 < setup["share_bytes"] < setup["peft_bytes"]
    for row in ("Share `merge`", "diffusers `load_lora_adapter`", "PEFT: ", "Share: buffers"):
        assert row in markdown

    step = report["sections"]["step"]
    assert set(step) == {"title", f"{large}, batch 1", f"{large}, batch 4", f"{small}, batch 4"}
    for case, figures in step.items():
        if case == "title":
            continue
        expected = set(STEP_VARIANTS) | ({"Share, 4 styles (one per sample)"} if case.endswith("batch 4") else set())
        assert set(figures["ratios"]) == expected
        # timings only finite and positive: the CPUs here are shared, toy ratios say nothing
        assert all(0 < value < math.inf for value in figures["ratios"].values()), figures["ratios"]
        assert all(len(s["samples_s"]) == settings["step_rounds"] for s in figures["stats"].values())

    batch = report["sections"]["batch"]
    assert all(batch[res]["speedup"] > 0 and math.isfinite(batch[res]["speedup"]) for res in (large, small))

    switch = report["sections"]["switch"]
    assert len(switch["stats"]) == 3
    for stat in switch["stats"].values():
        assert len(stat["samples_s"]) == settings["switch_rounds"] * styles
    assert switch["speedup_pipeline_path"] > 0

    # PEFT holds Share's own styles (style_as_lora): at float32 the outputs agree to rounding, and giving each
    # row another style (the control) would show.
    agreement = report["sections"]["agreement"]
    for res in (large, small):
        for scale in (1, 30):
            figures = agreement[f"{res}, styles x {scale}"]
            assert figures["finite"]
            assert figures["share_vs_peft"] < 1e-5 and figures["floor"] < 1e-5, figures
            assert figures["control_rotated_styles"] > 100 * figures["share_vs_peft"], figures
        assert agreement[f"{res}, styles x 1"]["share_mixed_vs_share_singles"] < 1e-5
        assert (
            agreement[f"{res}, styles x 30"]["styles_vs_base"] > 10 * agreement[f"{res}, styles x 1"]["styles_vs_base"]
        )

    # every timed variant has its row in the markdown
    timed = [step[case]["stats"] for case in step if case != "title"] + [batch[res]["stats"] for res in (large, small)]
    timed += [switch["stats"], report["sections"]["fuse"]["stats"]]
    for stats in timed:
        for name in stats:
            assert f"| {name} |" in markdown, name
    assert markdown.count("speed-up of the Share pass") == 2
    for name in report["sections"]["profile"]["counts"]:
        assert f"| {name} |" in markdown, name

    fuse = report["sections"]["fuse"]
    assert fuse["exact"]["share"] and fuse["changed"]["share"] and fuse["changed"]["peft"]
    assert len(fuse["stats"]) == 4

    counts = report["sections"]["profile"]["counts"]
    assert len(counts) == 4 and all(c["aten_ops"] > 0 for c in counts.values())
    base = counts["base (Share model, no style)"]["aten_ops"]
    assert counts["Share, one style"]["aten_ops"] > base  # the styled path adds ops on every Share layer

    targets = {target["target"]: target for target in report["targets"]}
    assert len([name for name in targets if name.startswith("agreement")]) == 4
    assert all(targets[name]["result"] == "PASS" for name in targets if name.startswith("agreement"))
    assert targets["unfuse_style restores the weight bit for bit"]["result"] == "PASS"
    assert "## Targets" in markdown and "## Targets" in stdout
    assert len([t for t in report["targets"] if t["target"].startswith("step")]) == 5
    check_quantized_sections(report, markdown)


def check_quantized_sections(report: dict, markdown: str) -> None:
    """int8 measured wherever torchao is installed; float8 on CUDA of compute capability >= 8.9 only, else a reason."""
    int8, float8 = report["sections"]["quantized-int8"], report["sections"]["quantized-float8"]
    if importlib.util.find_spec("torchao") is None:
        assert "torchao is not installed" in int8["skipped"] and "torchao is not installed" in float8["skipped"]
        return
    check_quantized_section(report, markdown, "int8", "Int8Tensor")
    cuda = report["meta"]["device"].startswith("cuda")
    if cuda and torch.cuda.get_device_capability() >= (8, 9):
        check_quantized_section(report, markdown, "float8", "Float8Tensor")
    else:
        assert "compute capability >= 8.9" in float8["skipped"], float8
        assert "## Quantized base: torchao float8 weight-only\n\nNot measured: float8" in markdown


def check_quantized_section(report: dict, markdown: str, kind: str, layer_type: str) -> None:
    """Memory rows, step rows and ratios, and Share agreeing with PEFT on the same quantized base."""
    section, setup = report["sections"][f"quantized-{kind}"], report["sections"]["setup"]
    settings = report["meta"]["settings"]
    styles, batch = settings["num_styles"], settings["batch_styles"]
    large, small = settings["resolutions"][0][0], settings["resolutions"][-1][0]
    assert f"## Quantized base: torchao {kind} weight-only" in markdown
    assert section["kind"] == kind and section["layer_type"] == layer_type

    # memory: the quantized transformer is a fraction of the float32 one; each side adds what it adds on that base
    transformer = section["transformer"]
    assert 0 < transformer["bytes"] < transformer["full_bytes"] / 2, transformer
    assert section["share"]["bytes"] == setup["share_bytes"] and section["share"]["selection_bytes"] > 0
    assert section["peft"]["refusal"] is None and section["peft"]["layer_type"] == "TorchaoLoraLinear"
    assert section["peft"]["bytes"] == setup["peft_bytes"] and len(section["peft"]["load_s"]) == styles
    for row in (
        f"| the {kind} transformer alone ({layer_type} weights) |",
        f"| + {styles} Share styles (`ShareModel.inject` of the same factors) |",
        "| + Share's selection state (first `set_style`) |",
        f"| + {styles} PEFT adapters (`load_lora_adapter`, TorchaoLoraLinear) |",
    ):
        assert row in markdown, row

    # step time at the large resolution, batch 1 and batch 4, ratios against the quantized base
    assert set(section["step"]) == {f"{large}, batch 1", f"{large}, batch {batch}"}
    for case, figures in section["step"].items():
        four = {f"Share, {batch} styles (one per sample)"} if case.endswith(f" {batch}") else set()
        expected = set(STEP_VARIANTS) | four
        assert set(figures["ratios"]) == expected, figures["ratios"]
        assert figures["ratios"]["base (Share model, no style)"] == 1.0
        assert all(0 < value < math.inf for value in figures["ratios"].values()), figures["ratios"]
        assert all(len(s["samples_s"]) == settings["step_rounds"] for s in figures["stats"].values())
        for name in figures["stats"]:
            assert f"| {case} | {name} |" in markdown, (case, name)

    # float32 on the CPU: Share's mixed batch equals PEFT's rows on the same quantized base to rounding
    for scale in (1, 30):
        figures = section["agreement"][f"{small}, styles x {scale}"]
        assert figures["finite"] and figures["share_vs_peft"] < 1e-5 and figures["floor"] < 1e-5, figures
        assert figures["control_rotated_styles"] > 100 * figures["share_vs_peft"], figures
    assert section["agreement"][f"{small}, styles x 1"]["share_mixed_vs_share_singles"] < 1e-5

    targets = {t["target"]: t["result"] for t in report["targets"] if t["target"].startswith(f"quantized {kind}:")}
    assert len(targets) == 1 + 3 + 2, targets  # memory, 3 Share step variants, 2 agreement scales
    assert all(result == "PASS" for name, result in targets.items() if "agreement" in name), targets
    if report["meta"]["device"] == "cpu":  # tensor bytes: exact (on CUDA the allocator's deltas are compared)
        memory = next(result for name, result in targets.items() if "no more memory" in name)
        assert memory == "PASS", targets


def test_bench_gpu_quick_runs_every_section_on_the_cpu(tmp_path):
    report, markdown, stdout = run_gpu_benchmark(tmp_path / "results" / "bench_gpu", "cpu")
    assert report["meta"]["device"] == "cpu" and report["meta"]["settings"]["dtype"] == "float32"
    check_gpu_report(report, markdown, stdout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bench_gpu_quick_runs_every_section_on_cuda(tmp_path):
    report, markdown, stdout = run_gpu_benchmark(tmp_path / "bench_gpu", "cuda")
    assert report["meta"]["gpu"]
    check_gpu_report(report, markdown, stdout)
    counts = report["sections"]["profile"]["counts"]
    assert all(counts[name]["memcpy_htod"] == 0 for name in counts if name.startswith("Share,")), counts


def test_bench_flux_quick_smoke_run():
    result = run_benchmark("bench_flux.py", "--quick", timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for heading in ("## 1. Style switch", "## 2. Bringing in", "## 3. Per-step", "## 4. A batch of 4", "## Targets"):
        assert heading in result.stdout, heading
    same = [line for line in result.stdout.splitlines() if line.startswith("| same result:")]
    assert len(same) == 3 and all(line.endswith("| PASS |") for line in same), same


@pytest.mark.slow
@slow
def test_bench_core_quick_smoke_run(tmp_path):
    pytest.importorskip("lorashare", reason="bench_core compares with lorashare (pip install '.[bench]')")
    result = run_benchmark("bench_core.py", "--quick", "--workdir", str(tmp_path), timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "## Targets" in result.stdout


def test_bench_flux_same_result_checks_catch_a_fast_wrong_path():
    """bench_flux's timed variants must compute what their rows claim: a fuse that changed nothing (as fast as the
    base, "fused == base within noise") or a batch that gave every row the first style must fail."""
    bench_flux = load_benchmark_module("bench_flux")
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(4, 8, 64, generator=generator)
    styled = base + 0.05 * torch.randn(4, 8, 64, generator=generator)  # every row its own style
    steps = {"base": base[:1], "Share unfused": styled[:1], "PEFT unfused": styled[:1]}
    steps |= {"Share fused": styled[:1] * (1 + 1e-7), "PEFT fused": styled[:1].clone()}
    batch = {"share": styled, "share_each": styled * (1 + 1e-7), "base": base}
    assert all(passed for _, _, passed in bench_flux.same_result_checks(steps, batch))

    wrong_fuse = bench_flux.same_result_checks({**steps, "Share fused": base[:1]}, batch)
    assert [passed for _, _, passed in wrong_fuse] == [False, True, True]
    one_style = styled[:1].expand(4, -1, -1)
    wrong_batch = bench_flux.same_result_checks(steps, {**batch, "share": one_style})
    assert [passed for _, _, passed in wrong_batch] == [True, True, False]
    no_style = bench_flux.same_result_checks({**steps, "PEFT unfused": base[:1], "PEFT fused": base[:1]}, batch)
    assert [passed for _, _, passed in no_style] == [True, False, True]


def test_bench_merge_quick_checks_the_batched_merge_against_the_per_layer_one():
    """bench_merge times a batched merge against the per-layer one: it must say they give the same style."""
    result = run_benchmark("bench_merge.py", "--quick", "--rounds", "1", "--threads", "1", timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "| PEFT load_lora_adapter (28 layers) |" in result.stdout
    same = [line for line in result.stdout.splitlines() if line.startswith("Same result:")]
    assert len(same) == 1 and same[0].endswith("PASS)."), result.stdout


def test_bench_core_times_every_fit_from_uncached_adapters(monkeypatch):
    """A LoraLayer caches its canonical form on the first fit. bench_core's N=50 case reused the N=20 case's
    adapters (and section 5 its first repeat's), and section 2 merged one adapter object over and over, so
    those fits and merges skipped the QRs and SVDs a real one does."""
    bench_core = load_benchmark_module("bench_core")
    timed_fits = []

    def spy(function, *args, **kwargs):
        if getattr(function, "__name__", "") in ("fit", "merge"):  # ShareFactors.fit, state.merge
            adapters = args[0] if isinstance(args[0], list) else [args[0]]
            timed_fits.append(all(lora._canonical is None for adapter in adapters for lora in adapter.layers.values()))
        return bench_core.timed.__wrapped__(function, *args, **kwargs)

    spy.__wrapped__ = bench_core.timed
    monkeypatch.setattr(bench_core, "timed", spy)
    settings = bench_core.Settings.quick()
    settings = dataclasses.replace(settings, hidden=64, fit_cases=((2, 4), (3, 4)), fit_chunk=11, k=4, p=2)
    names = bench_core.flux_layer_names(1, 1)
    bench_core.bench_fit(settings, names, (64, 64))
    assert timed_fits == [True, True], timed_fits

    timed_fits.clear()  # section 2: every merge (warm-up and rounds) of one adapter into the held banks
    settings = dataclasses.replace(settings, held=(2, 3), merge_rounds=2)
    bench_core.bench_merge(settings, names, (64, 64))
    assert timed_fits == [True] * 5, timed_fits
