"""Device and dtype policy of fitting and merging, the per-layer canonical form, and layer-parallel merges.

LoRA factors may come in any dtype and on any device; the factors are CPU float32 and the maths CPU
float64, so a LoRA must merge exactly as the float64 copy of its own (rounded) values does.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import random_adapter, relative_error

from share_diffusers.core import LoraAdapter, LoraLayer, ShareConfig, ShareFactors
from share_diffusers.core import adapters as adapters_module
from share_diffusers.core import factors as factors_module
from share_diffusers.core import subspace as subspace_module

SHAPES = {"a": (40, 32), "b": (24, 36), "c": (48, 20)}
NAMES = ["x", "y", "z"]
CONFIG = ShareConfig(rank=6, pseudo_rank=3)  # truncating: every basis and core depends on all inputs


def _adapters() -> list[LoraAdapter]:
    return [random_adapter(SHAPES, rank, alpha, seed) for seed, (rank, alpha) in enumerate([(4, 8), (5, None), (3, 2)])]


def _cast(adapter: LoraAdapter, dtype: torch.dtype, device: str | torch.device = "cpu") -> LoraAdapter:
    return LoraAdapter(
        {
            name: LoraLayer(lora.up.to(device, dtype), lora.down.to(device, dtype), lora.scale)
            for name, lora in adapter.layers.items()
        }
    )


def _fit_then_merge(adapters: list[LoraAdapter], workers: int | None = None) -> ShareFactors:
    """The first two adapters fitted at once, the third merged continually."""
    factors = ShareFactors.fit(adapters[:2], NAMES[:2], CONFIG, workers=workers)
    factors.merge(adapters[2], NAMES[2], workers=workers)
    return factors


def _assert_same_reconstructions(expected: ShareFactors, actual: ShareFactors, tolerance: float) -> None:
    assert list(actual.layers) == list(expected.layers)
    for layer in expected.layers:
        assert actual.layers[layer].basis_out.dtype == torch.float32
        assert actual.layers[layer].basis_out.device.type == "cpu"
        for name in NAMES:
            reference = expected.delta_weight(layer, name)
            assert relative_error(reference, actual.delta_weight(layer, name)) < tolerance


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_lora_merges_as_the_float64_copy_of_its_values(dtype):
    rounded = [_cast(adapter, dtype) for adapter in _adapters()]
    reference = _fit_then_merge([_cast(adapter, torch.float64) for adapter in rounded])
    _assert_same_reconstructions(reference, _fit_then_merge(rounded), 1e-6)


def test_canonical_form_is_computed_once_per_layer_per_merge(monkeypatch):
    pytest.importorskip("diffusers")
    from share_diffusers.flux_lora import FluxLora

    made = []
    original = adapters_module.CanonicalLora

    def counting(**tensors):
        made.append(tensors["U"].shape)
        return original(**tensors)

    monkeypatch.setattr(adapters_module, "CanonicalLora", counting)
    adapters = _adapters()
    factors = ShareFactors.fit(adapters[:2], NAMES[:2], CONFIG)
    made.clear()
    converted = FluxLora(transformer=dict(adapters[2].layers))
    energies = converted.energies()  # the loader asks for these first, then merges the same layers
    factors.merge(LoraAdapter(converted.transformer), NAMES[2])
    assert len(made) == len(SHAPES)
    for name, lora in adapters[2].layers.items():
        assert energies[name] == pytest.approx(float(lora.delta_weight().square().sum()), rel=1e-10)


def test_cached_canonical_form_follows_changes_of_the_factors():
    lora = random_adapter({"a": (12, 10)}, 3, seed=5).layers["a"]
    first = lora.canonical()
    assert lora.canonical() is first
    lora.up.mul_(2.0)  # in place: the tensor's version changes
    doubled = lora.canonical()
    assert doubled.energy == pytest.approx(4.0 * first.energy, rel=1e-12)
    lora.scale = 0.5 * lora.scale
    assert lora.canonical().energy == pytest.approx(first.energy, rel=1e-12)
    lora.down = torch.zeros_like(lora.down)  # replaced
    assert lora.canonical().energy == 0.0
    copy = LoraLayer(lora.up, lora.down, lora.scale)
    assert copy == lora  # the cache is not part of the value
    assert "canonical" not in repr(lora)


def test_layer_parallel_fit_and_merge_equal_the_serial_ones():
    adapters = _adapters()
    serial = _fit_then_merge(adapters, workers=1)
    parallel = _fit_then_merge(adapters, workers=3)
    assert list(parallel.layers) == list(serial.layers) == sorted(SHAPES)
    for layer in SHAPES:
        for field in [field for field in subspace_module.LAYER_TENSORS if field != "anchor"]:
            torch.testing.assert_close(
                getattr(parallel.layers[layer], field), getattr(serial.layers[layer], field), rtol=1e-12, atol=0
            )


def test_a_failing_layer_leaves_the_factors_unchanged_and_names_itself(monkeypatch):
    adapters = _adapters()
    factors = ShareFactors.fit(adapters[:2], NAMES[:2], CONFIG)
    layers_before, styles_before = dict(factors.layers), list(factors.styles)
    original = subspace_module.merge_layer

    def failing(layer, entry, rule):
        if layer.shape == SHAPES["b"]:
            raise RuntimeError("layer b broke")
        return original(layer, entry, rule)

    monkeypatch.setattr(factors_module, "merge_layer", failing)
    with pytest.raises(RuntimeError, match="layer b broke"):
        factors.merge(adapters[2], NAMES[2], workers=3)
    assert list(factors.layers) == list(layers_before) and factors.styles == styles_before
    assert all(factors.layers[name] is layer for name, layer in layers_before.items())


def test_map_layers_keeps_order_and_torch_threads_and_rejects_bad_worker_counts():
    items = list(range(23))
    threads = torch.get_num_threads()
    inside = factors_module.map_layers(lambda i: (i * i, torch.get_num_threads()), items, workers=4)
    assert [square for square, _ in inside] == [i * i for i in items]
    assert {count for _, count in inside} == {1}  # workers run their kernels single-threaded
    assert torch.get_num_threads() == threads
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [threads]  # threads started afterwards get torch's setting, not the workers'
    with pytest.raises(ValueError, match="workers"):
        factors_module.map_layers(lambda i: i, items, workers=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_lora_on_cuda_merges_as_the_cpu_float64_copy_of_its_values():
    rounded = [_cast(adapter, torch.bfloat16, "cuda") for adapter in _adapters()]
    reference = _fit_then_merge([_cast(adapter, torch.float64) for adapter in rounded])
    _assert_same_reconstructions(reference, _fit_then_merge(rounded), 1e-6)
    for adapter in rounded:  # the LoRA itself is left where it was
        assert all(lora.up.is_cuda and lora.up.dtype == torch.bfloat16 for lora in adapter.layers.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_subspace_maths_runs_on_the_device_of_consistent_float64_inputs():
    """Not the package's policy (CPU), but nothing in subspace.py may pin a tensor to the CPU."""
    rule = CONFIG.rule
    results = {}
    for device in ("cpu", "cuda"):
        entries = [
            subspace_module.CanonicalLora(**{k: v.to(device) for k, v in vars(adapter.layers["a"].canonical()).items()})
            for adapter in _adapters()
        ]
        layer = subspace_module.fit_layer(entries[:2], rule, CONFIG.pseudo_rank, center=True)
        layer = subspace_module.merge_layer(layer, entries[2], rule)
        stored = subspace_module.to_storage(layer)
        assert stored.basis_out.device.type == "cpu" and stored.basis_out.dtype == torch.float32
        layer = subspace_module.merge_layer(subspace_module.on_device(stored, device), None, rule)
        layer = subspace_module.delete_from_layer(layer, 1)
        empty = subspace_module.empty_layer(*SHAPES["a"], 0, CONFIG.pseudo_rank, True, False, device=device)
        grown = subspace_module.merge_layer(empty, entries[0], rule)
        results[device] = (layer, grown)
    for on_cpu, on_cuda in zip(results["cpu"], results["cuda"], strict=True):
        assert on_cuda.basis_out.is_cuda
        weights = torch.ones(on_cpu.num_styles, dtype=torch.float64)
        assert relative_error(on_cpu.delta_weight(weights), on_cuda.delta_weight(weights).cpu()) < 1e-10


HELD_SHAPES = {"a1": (40, 32), "a2": (40, 32), "b": (24, 36), "untouched": (24, 36)}
NEW_SHAPES = {"a1": (40, 32), "a2": (40, 32), "b": (24, 36), "added": (48, 20)}


def _bank_and_new_style() -> tuple[ShareFactors, LoraAdapter]:
    """Two styles held on four layers; a third style with a class of two layers (merged together), a layer
    alone, a layer the bank does not have yet, and one held layer it leaves alone."""
    held = [random_adapter(HELD_SHAPES, rank, seed=seed) for seed, rank in ((11, 4), (12, 5))]
    return ShareFactors.fit(held, NAMES[:2], CONFIG), random_adapter(NEW_SHAPES, 3, alpha=6, seed=13)


def _copy(factors: ShareFactors) -> ShareFactors:
    return ShareFactors(factors.config, dict(factors.layers), list(factors.styles))


def _record_merge_devices(monkeypatch) -> list[tuple[str, torch.device]]:
    """Which of merge_layers / merge_layer ran, with the device of the update they got."""
    seen = []
    for name in ("merge_layers", "merge_layer"):
        original = getattr(factors_module, name)

        def recording(layers, entries, *args, _original=original, _name=name, **kwargs):
            entry = entries[0] if _name == "merge_layers" else entries
            if entry is not None:
                seen.append((_name, entry.U.device))
            return _original(layers, entries, *args, **kwargs)

        monkeypatch.setattr(factors_module, name, recording)
    return seen


@pytest.mark.parametrize("batch_layers", [True, False])
def test_merge_device_argument_runs_the_same_maths_and_stores_on_the_cpu(monkeypatch, batch_layers):
    """``merge(device=...)``: with the CPU passed as if it were another device (``FIT_DEVICE`` patched away),
    the accelerator branch (copies of the stored layers, one thread, results brought back to CPU float32)
    gives exactly the default merge's factors, through the batched path, a new layer and an untouched one."""
    bank, lora = _bank_and_new_style()
    reference = _copy(bank)
    reference.merge(lora, NAMES[2], batch_layers=batch_layers)
    used = []
    original = factors_module.map_layers

    def recording(function, items, workers=None, **kwargs):
        used.append(workers)
        return original(function, items, workers, **kwargs)

    monkeypatch.setattr(factors_module, "FIT_DEVICE", torch.device("meta"))
    monkeypatch.setattr(factors_module, "map_layers", recording)
    seen = _record_merge_devices(monkeypatch)
    other = _copy(bank)
    fresh = LoraAdapter({name: LoraLayer(layer.up, layer.down, layer.scale) for name, layer in lora.layers.items()})
    other.merge(fresh, NAMES[2], batch_layers=batch_layers, device="cpu")
    assert used == [1]
    assert ("merge_layers" in {name for name, _ in seen}) == batch_layers  # a1 + a2 together
    assert list(other.layers) == list(reference.layers) == ["a1", "a2", "added", "b", "untouched"]
    for name, expected in reference.layers.items():
        got = other.layers[name]
        assert got.basis_out.device.type == "cpu" and got.basis_out.dtype == torch.float32
        for field in ("basis_out", "basis_in", "core_out", "core_in", "norm", "error"):
            torch.testing.assert_close(getattr(got, field), getattr(expected, field), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch_layers", [True, False])
def test_merge_with_its_maths_on_cuda_equals_the_cpu_merge(monkeypatch, batch_layers):
    """The stored results equal the CPU merge of the float64 copy of the LoRA's bf16 values, on the CPU in
    float32; the maths ran on the GPU (batched, a new layer, an untouched one)."""
    bank, lora = _bank_and_new_style()
    lora = _cast(lora, torch.bfloat16, "cuda")
    reference = _copy(bank)
    reference.merge(_cast(lora, torch.float64), NAMES[2], batch_layers=batch_layers)
    seen = _record_merge_devices(monkeypatch)
    on_cuda = _copy(bank)
    on_cuda.merge(lora, NAMES[2], batch_layers=batch_layers, device="cuda")
    assert seen and all(device.type == "cuda" for _, device in seen)
    assert ("merge_layers" in {name for name, _ in seen}) == batch_layers
    assert list(on_cuda.layers) == list(reference.layers)
    for layer in reference.layers:
        assert on_cuda.layers[layer].basis_out.device.type == "cpu"
        for name in NAMES:
            expected, got = reference.delta_weight(layer, name), on_cuda.delta_weight(layer, name)
            if not bool(expected.any()):  # a style that does not touch the layer
                assert not bool(got.any()), (layer, name)
                continue
            assert relative_error(expected, got) < 1e-6, (layer, name)
    assert all(layer.up.is_cuda and layer.up.dtype == torch.bfloat16 for layer in lora.layers.values())


def test_merge_on_cuda_without_cuda_is_one_clear_error_and_changes_nothing(monkeypatch):
    """README's ``share.merge(adapter, name, device="cuda")`` on a machine without CUDA: a ShareValueError naming the
    device, not torch's ``AssertionError: Torch not compiled with CUDA enabled``; the factors stay as they were."""
    from share_diffusers.core.errors import ShareValueError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    adapters = _adapters()
    factors = ShareFactors.fit(adapters[:2], NAMES[:2], CONFIG)
    with pytest.raises(ShareValueError, match="device 'cuda'.*CPU"):
        factors.merge(adapters[2], NAMES[2], device="cuda")
    assert factors.style_names == NAMES[:2]
    with pytest.raises(ShareValueError, match="device 'cuda:0'"):
        factors.merge(adapters[2], NAMES[2], device="cuda:0")
    assert factors.style_names == NAMES[:2]
