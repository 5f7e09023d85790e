"""The batched merge (layers of one class merged together) against the per-layer merge it replaces.

``merge_layers`` must give what ``merge_layer`` gives layer by layer, to float64 rounding, and
``ShareFactors.merge`` what it gave with ``batch_layers=False``, on layer sets that mix classes, layers the
LoRA does not touch, layers new to the bank, rank-deficient and zero updates, 1x1 convolutions, centred and
normalised configurations and a variance rule that gives the layers of one class different ``k``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import random_adapter, relative_error
from launch_helpers import run_benchmark

from share_diffusers.core import LoraAdapter, LoraLayer, ShareConfig, ShareFactors
from share_diffusers.core import adapters as adapters_module
from share_diffusers.core import batched_merge as batched_merge_module
from share_diffusers.core import factors as factors_module
from share_diffusers.core import subspace as subspace_module
from share_diffusers.core.batched_merge import merge_layers
from share_diffusers.core.errors import FactorValueError
from share_diffusers.core.subspace import LAYER_TENSORS, fit_layer, merge_layer, to_storage

# Held by the bank: three classes (a*, b*, and c alone); n* are new to the bank.
HELD = {**{f"a{i}": (40, 32) for i in range(4)}, **{f"b{i}": (24, 36) for i in range(3)}, "c": (48, 20)}
NEW = {f"n{i}": (30, 28) for i in range(3)}

CONFIGS = {
    "truncating": ShareConfig(rank=6, pseudo_rank=3),
    "holds-all": ShareConfig(rank=16, pseudo_rank=16),
    "centred": ShareConfig(rank=6, pseudo_rank=3, center=True),
    "normalised": ShareConfig(rank=6, pseudo_rank=3, normalize=True),
    "centred-normalised": ShareConfig(rank=7, pseudo_rank=4, center=True, normalize=True),
    "variance": ShareConfig(variance=0.6, max_rank=10, pseudo_rank=3),
}


def _assert_same_layer(expected, actual, rtol: float, what: str = "") -> None:
    """Two layer states equal within ``rtol`` of each tensor's largest entry.

    The rank-p factors of a rank-deficient core carry ``sqrt`` of singular values at rounding level on arbitrary
    directions (~1e-8 relative, in either path), so the cores are compared through what they define: the dense
    cores ``core_out @ core_in.T`` (anchor included) and the factors' Grams ``core.T @ core``.
    """
    assert actual.normalize == expected.normalize
    for field in LAYER_TENSORS:
        want, got = getattr(expected, field), getattr(actual, field)
        if want is None or got is None:
            assert want is None and got is None, f"{what}{field}"
            continue
        assert got.shape == want.shape and got.dtype == want.dtype, f"{what}{field}: {got.shape} vs {want.shape}"
        if field in ("core_out", "core_in"):
            want, got = want.mT @ want, got.mT @ got
        # An error is sqrt(||dW||^2 - 2 <C, C_hat> + ||C_hat||^2) / ||dW||: rounding in the difference shows at
        # sqrt(eps) ~ 1e-8 where the error itself is near zero (k holding everything), in either path; what a
        # cut drops is then rounding too (~eps^2 ||dW||^2).
        floor = {"error": 1e-7, "truncated": 1e-20 * float((expected.norm**2).max())}.get(field, 0.0)
        _assert_close(want, got, rtol, f"{what}{field}", floor=floor)
    _assert_close(expected.cores(), actual.cores(), rtol, f"{what}dense cores")


def _assert_close(want: torch.Tensor, got: torch.Tensor, rtol: float, what: str, floor: float = 0.0) -> None:
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=0, atol=max(rtol * scale, floor, 1e-300), msg=what)


def _rank_deficient(adapter: LoraAdapter, names: list[str]) -> LoraAdapter:
    """The adapter with the update on ``names`` made rank-deficient: its last columns of up repeat the first."""
    layers = dict(adapter.layers)
    for name in names:
        lora = layers[name]
        up = lora.up.clone()
        half = up.shape[1] // 2
        up[:, half:] = up[:, : up.shape[1] - half]
        layers[name] = LoraLayer(up, lora.down, lora.scale, lora.conv)
    return LoraAdapter(layers)


def _copy(factors: ShareFactors) -> ShareFactors:
    return ShareFactors(
        factors.config, dict(factors.layers), list(factors.styles), factors.base_model, set(factors.conv_layers)
    )


def _bank(config: ShareConfig) -> ShareFactors:
    adapters = [random_adapter(HELD, rank, alpha, seed) for seed, (rank, alpha) in enumerate([(4, 8), (5, None)])]
    factors = ShareFactors.fit(adapters, ["x", "y"], config)
    factors.merge(random_adapter({"a0": (40, 32), "b1": (24, 36)}, 3, seed=7), "partial")  # styles absent on most
    return factors


def _new_style() -> LoraAdapter:
    """Touches a*, b0, b1 (not b2), c, and the new n*; rank-deficient on a1 and b0; conv layers among the a*."""
    shapes = {name: shape for name, shape in {**HELD, **NEW}.items() if name != "b2"}
    adapter = _rank_deficient(random_adapter(shapes, 4, 6.0, seed=11), ["a1", "b0"])
    layers = {
        name: LoraLayer(lora.up, lora.down, lora.scale, conv=name in ("a2", "a3"))
        for name, lora in adapter.layers.items()
    }
    return LoraAdapter(layers)


def _merge_both(factors: ShareFactors, adapter: LoraAdapter, name: str, **kwargs) -> tuple[ShareFactors, ShareFactors]:
    per_layer, batched = _copy(factors), _copy(factors)
    per_layer.merge(adapter, name, batch_layers=False, **kwargs)
    batched.merge(adapter, name, **kwargs)
    return per_layer, batched


class _Recorder:
    """Wraps factors.merge_layers to record the size of each batch."""

    def __init__(self, monkeypatch):
        self.sizes: list[int] = []
        original = factors_module.merge_layers

        def recording(layers, entries, rule, **kwargs):
            self.sizes.append(len(layers))
            return original(layers, entries, rule, **kwargs)

        monkeypatch.setattr(factors_module, "merge_layers", recording)


# ----------------------------------------------------------------------------------------------
# merge_layers against merge_layer, in float64


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("stored", [True, False], ids=["float32-stored", "float64"])
@pytest.mark.parametrize("turn_group", [None, 1, 2], ids=["held-cores-together", "one-by-one", "in-pairs"])
def test_merge_layers_equals_merge_layer_in_float64(config, stored, turn_group, monkeypatch):
    shapes = {f"l{i}": (40, 32) for i in range(5)}
    held = [random_adapter(shapes, rank, None, seed) for seed, rank in enumerate([4, 5, 3])]
    # Fitted with the config's k (a variance rule's layers with a fixed k, so that they form one class).
    fit_rule = config.rule if config.variance is None else ShareConfig(rank=6).rule
    layers = []
    for name in shapes:
        entries = [adapter.layers[name].canonical() for adapter in held]
        layer = fit_layer(entries, fit_rule, config.pseudo_rank, config.center, config.normalize)
        layers.append(to_storage(layer) if stored else layer)
    new = _rank_deficient(random_adapter(shapes, 4, 2.0, seed=21), ["l2"])
    entries = [new.layers[name].canonical() for name in shapes]
    expected = [merge_layer(layer, entry, config.rule) for layer, entry in zip(layers, entries, strict=True)]
    if turn_group is not None:  # the held cores turned in groups of this many layers (the last one short)
        group_bytes = turn_group * layers[0].core_out[0].numel() * 3 * 8
        monkeypatch.setattr(batched_merge_module, "TURN_GROUP_BYTES", group_bytes)
    actual = merge_layers(layers, entries, config.rule)
    for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
        _assert_same_layer(want, got, 1e-10, f"layer {index}: ")
        for tensor in (got.basis_out, got.core_out, got.core_in, got.gram_out):
            assert tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.nbytes


def test_variance_rule_gives_layers_of_one_class_different_k_and_still_agrees():
    config = ShareConfig(variance=0.5, max_rank=12, pseudo_rank=3)
    shapes = {f"l{i}": (40, 32) for i in range(4)}
    layers = [
        to_storage(fit_layer([random_adapter(shapes, 6, None, 0).layers[name].canonical()], config.rule, 3))
        for name in shapes
    ]
    assert len({layer.k for layer in layers}) == 1  # one class
    # Updates of very different spectra: one dominated by a single direction, one flat.
    entries = []
    for index, name in enumerate(shapes):
        lora = random_adapter(shapes, 6, None, 30 + index).layers[name]
        weights = torch.logspace(0, -3, 6) if index % 2 else torch.ones(6)
        entries.append(LoraLayer(lora.up * weights * 20, lora.down, 1.0).canonical())
    expected = [merge_layer(layer, entry, config.rule) for layer, entry in zip(layers, entries, strict=True)]
    assert len({layer.k for layer in expected}) > 1  # the batch is finished in parts, one per k
    actual = merge_layers(layers, entries, config.rule)
    for want, got in zip(expected, actual, strict=True):
        _assert_same_layer(want, got, 1e-10)


def test_merge_layers_from_new_layers_with_a_rank_deficient_update():
    """k = 0 layers take the update's rank; where the update is rank-deficient the extra directions are arbitrary
    (in both paths), so the reconstructions, norms and errors are compared."""
    shapes = {f"n{i}": (30, 28) for i in range(3)}
    rule = ShareConfig(rank=6).rule
    layers = [subspace_module.empty_layer(30, 28, 2, 3, False, False) for _ in shapes]
    entries = [lora.canonical() for lora in _rank_deficient(random_adapter(shapes, 4, None, 5), ["n1"]).layers.values()]
    expected = [merge_layer(layer, entry, rule) for layer, entry in zip(layers, entries, strict=True)]
    actual = merge_layers(layers, entries, rule)
    weights = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    for want, got in zip(expected, actual, strict=True):
        assert relative_error(want.delta_weight(weights), got.delta_weight(weights)) < 1e-12
        torch.testing.assert_close(got.norm, want.norm, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.error, want.error, rtol=0, atol=1e-12)


def test_merge_layers_refuses_mixed_classes():
    layers = [
        subspace_module.empty_layer(30, 28, 0, 3, False, False),
        subspace_module.empty_layer(30, 29, 0, 3, False, False),
    ]
    entries = [random_adapter({"x": shape}, 2).layers["x"].canonical() for shape in ((30, 28), (30, 29))]
    with pytest.raises(ValueError, match="one class"):
        merge_layers(layers, entries, ShareConfig(rank=4).rule)


def test_canonical_forms_equal_the_per_layer_ones_and_are_cached():
    adapter = random_adapter({f"l{i}": (40, 32) for i in range(4)}, 5, 3.0, seed=3, dtype=torch.bfloat16)
    twin = LoraAdapter({name: LoraLayer(lora.up, lora.down, lora.scale) for name, lora in adapter.layers.items()})
    forms = adapters_module.canonical_forms(list(adapter.layers.values()))
    for form, (name, lora) in zip(forms, adapter.layers.items(), strict=True):
        assert lora.canonical() is form  # cached as canonical() caches
        reference = twin.layers[name].canonical()
        for field in ("U", "S", "V"):
            torch.testing.assert_close(getattr(form, field), getattr(reference, field), rtol=0, atol=1e-12)
        assert form.U.dtype == torch.float64 and form.U.device.type == "cpu"


def test_all_finite_agrees_with_the_entrywise_test():
    big = torch.full((4, 4), 3e38)  # finite entries whose float32 sum overflows
    for tensor in (torch.ones(3), torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), -float("inf")]), big):
        assert adapters_module.all_finite(tensor) == bool(torch.isfinite(tensor).all())
    assert adapters_module.all_finite(torch.zeros(0))


# ----------------------------------------------------------------------------------------------
# ShareFactors.merge: batched against per-layer


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
@pytest.mark.parametrize("workers", [1, 3])
def test_batched_merge_equals_the_per_layer_merge(config, workers, monkeypatch):
    recorder = _Recorder(monkeypatch)
    factors = _bank(config)
    per_layer, batched = _merge_both(factors, _new_style(), "new", workers=workers)
    assert max(recorder.sizes) > 1  # the batched path ran
    assert list(batched.layers) == list(per_layer.layers) == sorted({**HELD, **NEW})
    for name, expected in per_layer.layers.items():
        # Stored in float32: the two float64 results agree to rounding, so their float32 copies within one unit.
        _assert_same_layer(expected, batched.layers[name], 1e-6, f"{name}: ")
    assert batched.layers["b2"].basis_out is factors.layers["b2"].basis_out  # untouched: not even copied
    assert torch.equal(batched.layers["b2"].core_out[:-1], factors.layers["b2"].core_out)
    assert batched.conv_layers == per_layer.conv_layers == {"a2", "a3"}
    assert [style.name for style in batched.styles] == ["x", "y", "partial", "new"]


def test_small_chunks_and_many_threads_give_the_same_result(monkeypatch):
    recorder = _Recorder(monkeypatch)
    monkeypatch.setattr(factors_module, "MERGE_CHUNK_BYTES", 2 * 8 * 40 * (6 + 4))  # two a-layers a chunk
    config = CONFIGS["centred"]
    factors = _bank(config)
    per_layer, batched = _merge_both(factors, _new_style(), "new", workers=4)
    assert max(recorder.sizes) == 2
    for name, expected in per_layer.layers.items():
        _assert_same_layer(expected, batched.layers[name], 1e-6, f"{name}: ")


def test_a_zero_update_in_a_class_is_merged_as_absent_there(monkeypatch):
    factors = _bank(CONFIGS["truncating"])
    adapter = random_adapter(HELD, 3, None, seed=12)
    adapter.layers["a2"] = LoraLayer(torch.zeros(40, 3), adapter.layers["a2"].down, 1.0)
    per_layer, batched = _merge_both(factors, adapter, "new")
    assert not bool(batched.layers["a2"].present[-1]) and bool(batched.layers["a1"].present[-1])
    for name, expected in per_layer.layers.items():
        _assert_same_layer(expected, batched.layers[name], 1e-6, f"{name}: ")


def test_mixed_ranks_and_dtypes_split_the_classes(monkeypatch):
    recorder = _Recorder(monkeypatch)
    factors = _bank(CONFIGS["truncating"])
    adapter = random_adapter(HELD, 3, None, seed=13)
    wide = random_adapter(HELD, 5, None, seed=14, dtype=torch.bfloat16)
    for name in ("a0", "a1"):
        adapter.layers[name] = wide.layers[name]
    per_layer, batched = _merge_both(factors, adapter, "new")
    assert sorted(recorder.sizes) == [2, 2, 2]  # a0+a1 (rank 5, bf16), a2+a3, b0+b1+b2 in chunks
    for name, expected in per_layer.layers.items():
        _assert_same_layer(expected, batched.layers[name], 1e-6, f"{name}: ")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("nan", r"a2: the LoRA's up \(lora_B\) factor contains NaN or Inf"),
        ("huge", r"a2: merging style 'new': its update's energy \|\|dW\|\|\^2 = \S+ is beyond float32's range"),
        # out of float64's range too: linalg.eigh "failed to converge" before
        ("overflowing", r"a2: merging style 'new': its update's energy \|\|dW\|\|\^2 = inf is beyond float32"),
    ],
)
def test_a_bad_layer_in_a_batch_is_named_and_nothing_changes(damage, message):
    factors = _bank(CONFIGS["truncating"])
    layers_before, styles_before = dict(factors.layers), list(factors.styles)
    adapter = random_adapter(HELD, 3, None, seed=15)
    lora = adapter.layers["a2"]
    up = lora.up.clone().double() if damage == "overflowing" else lora.up.clone()
    if damage == "nan":
        up[0, 0] = float("nan")
    else:
        up = up * (1e30 if damage == "huge" else 1e200)
    adapter.layers["a2"] = LoraLayer(up, lora.down, lora.scale)
    with pytest.raises(FactorValueError, match=message):
        factors.merge(adapter, "new")
    assert factors.styles == styles_before
    assert all(factors.layers[name] is layer for name, layer in layers_before.items())


def test_batched_merge_work_does_not_grow_with_styles_held(monkeypatch):
    shapes = {f"l{i}": (64, 48) for i in range(3)}
    calls = []
    original = batched_merge_module._decompose_stack

    def recording(stack, inner, orthonormalize_first):
        calls.append(tuple(stack.shape))
        return original(stack, inner, orthonormalize_first)

    factors = ShareFactors.fit([random_adapter(shapes, 4, seed=0)], ["s0"], ShareConfig(rank=8, pseudo_rank=2))
    monkeypatch.setattr(batched_merge_module, "_decompose_stack", recording)
    sizes = {}
    for count in range(1, 20):
        calls.clear()
        factors.merge(random_adapter(shapes, 4, seed=count), f"s{count}", workers=1)
        sizes[count + 1] = list(calls)
    # Once k is full, every merge decomposes the same two stacks: 3 x n x (k + r) and 3 x d x (k + r).
    assert sizes[10] == sizes[19] == [(3, 64, 12), (3, 48, 12)]


def test_bench_merge_quick_runs_and_reports_every_variant():
    pytest.importorskip("diffusers")
    result = run_benchmark("bench_merge.py", "--quick", "--rounds", "2", "--threads", "1", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for variant in ("Share, per layer (28 layers)", "Share, batched (28 layers)", "PEFT load_lora_adapter (28 layers)"):
        assert f"| {variant} |" in result.stdout
    assert "the per-layer wall time" in result.stdout


@pytest.mark.parametrize("workers", [1, 4])
def test_the_error_names_the_first_bad_layer_in_layer_order(workers):
    """Chunks interleave classes (a0+a2 at rank 5, a1+a3 at rank 3): a1 fails before a2, as per layer."""
    factors = _bank(CONFIGS["truncating"])
    adapter = random_adapter(HELD, 3, None, seed=16)
    wide = random_adapter(HELD, 5, None, seed=17)
    for name in ("a0", "a2"):
        adapter.layers[name] = wide.layers[name]
    for name in ("a1", "a2"):
        lora = adapter.layers[name]
        adapter.layers[name] = LoraLayer(lora.up * 1e30, lora.down, lora.scale)
    for batch_layers in (False, True):
        with pytest.raises(FactorValueError, match=r"^a1: merging style 'new': its update's energy"):
            factors.merge(adapter, "new", workers=workers, batch_layers=batch_layers)


def test_k_counts_only_directions_that_hold_energy(monkeypatch):
    """One rank-4 LoRA merged five more times spans 4 directions; k grew to 24, twenty of them round-off
    (eigenvalues 1e-16 of the largest), each costing k (n + d) stored numbers and forward work."""
    recorder = _Recorder(monkeypatch)
    shapes = {f"a{i}": (40, 32) for i in range(3)}
    ink = random_adapter(shapes, 4, seed=0)
    config = ShareConfig(rank=32, pseudo_rank=4)
    fitted = ShareFactors.fit([ink] * 6, [f"copy{i}" for i in range(6)], config)
    assert {layer.k for layer in fitted.layers.values()} == {4}
    merged = ShareFactors.fit([ink], ["copy0"], config)
    per_layer = _copy(merged)
    for i in range(1, 6):
        per_layer.merge(ink, f"copy{i}", batch_layers=False)
        merged.merge(ink, f"copy{i}")
    assert max(recorder.sizes) > 1  # the batched path ran
    for bank in (merged, per_layer):
        assert {layer.k for layer in bank.layers.values()} == {4}
        for name in shapes:
            for style in bank.style_names:  # every copy is still the LoRA itself
                assert relative_error(ink.layers[name].delta_weight(), bank.delta_weight(name, style)) < 1e-6
    # a second, independent LoRA still opens its own directions
    merged.merge(random_adapter(shapes, 3, seed=1), "other")
    assert {layer.k for layer in merged.layers.values()} == {7}
