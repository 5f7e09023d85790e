"""Fitting and continual merging against independent dense computations."""

from __future__ import annotations

import pytest
import torch
from conftest import random_adapter, relative_error, shared_adapters

from share_diffusers.core import LoraAdapter, LoraLayer, ShareConfig, ShareFactors, StyleError
from share_diffusers.core import subspace as subspace_module
from share_diffusers.core.errors import FactorValueError, ShapeMismatchError

SHAPES = {"a": (40, 32), "b": (24, 36)}


def _adapters():
    return [
        random_adapter(SHAPES, rank, alpha, seed) for seed, (rank, alpha) in enumerate([(4, 8), (6, None), (3, 1.5)])
    ]


def _dense(adapter: LoraAdapter, layer: str) -> torch.Tensor:
    return adapter.layers[layer].delta_weight()


@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_full_rank_reconstructs_every_style_exactly(center, normalize):
    adapters = _adapters()
    total = sum(adapter.rank for adapter in adapters)  # 13: k holds everything
    # With centring each deviation can reach rank k, so p = k keeps it exact.
    p = total if center else max(adapter.rank for adapter in adapters)
    factors = ShareFactors.fit(
        adapters, ["x", "y", "z"], ShareConfig(rank=total, pseudo_rank=p, center=center, normalize=normalize)
    )
    for adapter, name in zip(adapters, ["x", "y", "z"], strict=True):
        for layer in SHAPES:
            assert relative_error(_dense(adapter, layer), factors.delta_weight(layer, name)) < 1e-5
        assert factors.style_error(name) < 1e-5


def test_truncation_error_is_the_singular_value_tail():
    """Proposition 1: projecting the stacked updates on the top-k basis loses exactly the tail energy."""
    adapters = _adapters()
    k = 5
    factors = ShareFactors.fit(adapters, ["x", "y", "z"], ShareConfig(rank=k, pseudo_rank=k))
    for layer in SHAPES:
        stacked = torch.cat([_dense(adapter, layer) for adapter in adapters], dim=1)  # (n, t d)
        singular_values = torch.linalg.svdvals(stacked)
        tail = float((singular_values[k:] ** 2).sum())
        basis = factors.layers[layer].basis_out.double()
        residual = stacked - basis @ (basis.T @ stacked)
        assert float((residual**2).sum()) == pytest.approx(tail, rel=1e-4)
        stacked_in = torch.cat([_dense(adapter, layer).T for adapter in adapters], dim=1)  # (d, t n)
        basis_in = factors.layers[layer].basis_in.double()
        residual_in = stacked_in - basis_in @ (basis_in.T @ stacked_in)
        tail_in = float((torch.linalg.svdvals(stacked_in)[k:] ** 2).sum())
        assert float((residual_in**2).sum()) == pytest.approx(tail_in, rel=1e-4)


def test_reported_errors_match_dense_errors_under_truncation():
    adapters = _adapters()
    factors = ShareFactors.fit(adapters, ["x", "y", "z"], ShareConfig(rank=6, pseudo_rank=3))
    for adapter, name in zip(adapters, ["x", "y", "z"], strict=True):
        for layer, reported in factors.layer_errors(name).items():
            dense = relative_error(_dense(adapter, layer), factors.delta_weight(layer, name))
            assert reported == pytest.approx(dense, rel=1e-4)
            assert 0.05 < dense < 1.0


def test_gauge_does_not_change_any_reconstruction():
    adapters = _adapters()
    generator = torch.Generator().manual_seed(7)
    scrambled = []
    for adapter in adapters:
        layers = {}
        for name, lora in adapter.layers.items():
            gauge = torch.randn(lora.rank, lora.rank, generator=generator, dtype=torch.float64)
            gauge = gauge + 3 * torch.eye(lora.rank, dtype=torch.float64)
            layers[name] = LoraLayer(
                lora.up.double() @ gauge, torch.linalg.solve(gauge, lora.down.double()), lora.scale
            )
        scrambled.append(LoraAdapter(layers))
    config = ShareConfig(rank=6, pseudo_rank=3)  # truncated, so the gauge would matter if it leaked in
    plain = ShareFactors.fit(adapters, ["x", "y", "z"], config)
    gauged = ShareFactors.fit(scrambled, ["x", "y", "z"], config)
    for name in ["x", "y", "z"]:
        for layer in SHAPES:
            assert relative_error(plain.delta_weight(layer, name), gauged.delta_weight(layer, name)) < 1e-5


def test_alpha_scales_the_cores():
    base = random_adapter(SHAPES, 4, alpha=4, seed=3)
    stronger = LoraAdapter({n: LoraLayer(l.up, l.down, 2.5 * l.scale) for n, l in base.layers.items()})
    factors = ShareFactors.fit([base, stronger], ["weak", "strong"], ShareConfig(rank=4, pseudo_rank=4))
    for layer in factors.layers.values():
        cores = layer.cores()
        assert relative_error(2.5 * cores[0], cores[1]) < 1e-5
    # and alpha / r is folded in: the reconstruction is scale * up @ down, not up @ down
    dense = stronger.layers["a"].delta_weight()
    assert relative_error(dense, factors.delta_weight("a", "strong")) < 1e-5


def test_mixed_ranks_and_disjoint_layers():
    first = random_adapter({"a": (40, 32)}, 8, seed=1)
    second = random_adapter({"b": (24, 36)}, 2, seed=2)
    third = random_adapter(SHAPES, 5, alpha=10, seed=3)
    factors = ShareFactors.fit([first, second, third], ["f", "s", "t"], ShareConfig(rank=13, pseudo_rank=8))
    layer_b = factors.layers["b"]
    assert torch.count_nonzero(layer_b.cores()[0]) == 0  # "f" does not touch b
    assert not bool(layer_b.present[0]) and bool(layer_b.present[1])
    assert torch.count_nonzero(factors.layers["a"].cores()[1]) == 0
    assert relative_error(_dense(first, "a"), factors.delta_weight("a", "f")) < 1e-5
    assert relative_error(_dense(second, "b"), factors.delta_weight("b", "s")) < 1e-5
    assert factors.layer_errors("f").keys() == {"a"}


def test_variance_rule_picks_k_per_layer():
    adapters = shared_adapters(6, {"a": (64, 48), "b": (32, 40)}, rank=4, shared_rank=3, noise=0.01)
    factors = ShareFactors.fit(adapters, [f"s{i}" for i in range(6)], ShareConfig(variance=0.9, pseudo_rank=4))
    for layer in factors.layers.values():
        assert 1 <= layer.k <= 6
    explained = factors.explained_variance()
    assert all(value >= 0.9 - 1e-6 for value in explained.values())
    # one fewer basis vector must fall below the threshold (k is the smallest that reaches it)
    for name, layer in factors.layers.items():
        smaller = (
            ShareFactors.fit(adapters, [f"s{i}" for i in range(6)], ShareConfig(rank=layer.k - 1, pseudo_rank=4))
            if layer.k > 1
            else None
        )
        if smaller is not None:
            assert smaller.explained_variance()[name] < 0.9


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("batch_layers", [False, True])
def test_variance_rule_does_not_shrink_k_over_continual_merges(normalize, batch_layers):
    """Each merge measures the fraction against all the styles' energy, not just what earlier merges kept:
    measured against its own spectrum, k went 4, 7, 9, ..., 13 at 0.9 (batch fit: 21) with twice the error."""
    shapes = {"a": (64, 48), "b": (64, 48)}  # two layers of one shape: the batched merge's per-layer k too
    adapters = [random_adapter(shapes, 4, seed=seed) for seed in range(8)]
    names = [f"s{i}" for i in range(8)]
    config = ShareConfig(variance=0.9, pseudo_rank=8, normalize=normalize)
    batch = ShareFactors.fit(adapters, names, config)
    merged = ShareFactors.fit(adapters[:1], names[:1], config)
    ranks = [merged.layers["a"].k]
    for adapter, name in zip(adapters[1:], names[1:], strict=True):
        merged.merge(adapter, name, batch_layers=batch_layers)
        ranks.append(merged.layers["a"].k)
    assert ranks == sorted(ranks)
    assert ranks[-1] >= batch.layers["a"].k - 2

    def overall_error(factors: ShareFactors) -> float:
        pairs = [
            (_dense(adapter, "a"), factors.delta_weight("a", name))
            for adapter, name in zip(adapters, names, strict=True)
        ]
        return (
            sum(float((d - r).pow(2).sum()) for d, r in pairs) / sum(float(d.pow(2).sum()) for d, _ in pairs)
        ) ** 0.5

    assert overall_error(merged) < overall_error(batch) + 0.05


def test_normalize_balances_weak_and_strong_styles():
    strong = [random_adapter({"a": (48, 48)}, 4, seed=seed) for seed in (1, 2, 3)]
    weak = random_adapter({"a": (48, 48)}, 4, seed=9)
    weak = LoraAdapter({"a": LoraLayer(weak.layers["a"].up * 1e-3, weak.layers["a"].down, 1.0)})
    adapters = [*strong, weak]
    names = ["s1", "s2", "s3", "weak"]
    # k = 12 of the 16 directions: energy-weighted fitting spends all of them on the strong styles.
    plain = ShareFactors.fit(adapters, names, ShareConfig(rank=12, pseudo_rank=4))
    balanced = ShareFactors.fit(adapters, names, ShareConfig(rank=12, pseudo_rank=4, normalize=True))
    assert plain.style_error("weak") > 0.95
    assert balanced.style_error("weak") < plain.style_error("weak") - 0.2


def test_bf16_factors_are_fitted_in_high_precision():
    adapter = random_adapter(SHAPES, 4, seed=4, dtype=torch.bfloat16)
    factors = ShareFactors.fit([adapter], ["x"], ShareConfig(rank=4, pseudo_rank=4))
    exact = adapter.layers["a"].delta_weight(torch.float64)  # of the bf16 values, computed in float64
    assert relative_error(exact, factors.delta_weight("a", "x")) < 1e-5


@pytest.mark.parametrize("scramble", [False, True])
def test_continual_merge_agrees_with_batch_fit_when_k_holds_everything(scramble):
    adapters = shared_adapters(4, SHAPES, rank=3, shared_rank=4, noise=0.1, scramble=scramble)
    names = ["w", "x", "y", "z"]
    config = ShareConfig(rank=12, pseudo_rank=3)
    batch = ShareFactors.fit(adapters, names, config)
    continual = ShareFactors.fit(adapters[:1], names[:1], config)
    for adapter, name in zip(adapters[1:], names[1:], strict=True):
        continual.merge(adapter, name)
    for adapter, name in zip(adapters, names, strict=True):
        for layer in SHAPES:
            assert relative_error(_dense(adapter, layer), continual.delta_weight(layer, name)) < 1e-5
            assert relative_error(batch.delta_weight(layer, name), continual.delta_weight(layer, name)) < 1e-5
        assert continual.style_error(name) < 1e-4
    # same subspaces: the projectors agree
    for layer in SHAPES:
        p_batch = batch.layers[layer].basis_out.double()
        p_cont = continual.layers[layer].basis_out.double()
        assert relative_error(p_batch @ p_batch.T, p_cont @ p_cont.T) < 1e-5


def test_continual_merge_close_to_batch_fit_when_truncated():
    adapters = shared_adapters(8, SHAPES, rank=4, shared_rank=5, noise=0.02, scramble=True, seed=3)
    names = [f"s{i}" for i in range(8)]
    config = ShareConfig(rank=6, pseudo_rank=4)
    batch = ShareFactors.fit(adapters, names, config)
    continual = ShareFactors.fit(adapters[:2], names[:2], config)
    for adapter, name in zip(adapters[2:], names[2:], strict=True):
        continual.merge(adapter, name)
    for adapter, name in zip(adapters, names, strict=True):
        for layer in SHAPES:
            dense = _dense(adapter, layer)
            batch_error = relative_error(dense, batch.delta_weight(layer, name))
            continual_error = relative_error(dense, continual.delta_weight(layer, name))
            assert batch_error < 0.15
            assert continual_error < batch_error + 0.03
            # the reported error is exact at merge time and an upper bound afterwards
            assert continual.layer_errors(name)[layer] >= continual_error - 1e-5


def test_merge_work_does_not_grow_with_styles_held(monkeypatch):
    shapes = {"a": (64, 48)}
    calls = []
    original = subspace_module.principal_decomposition

    def recording(spans, inner, **kwargs):
        calls.append(tuple(torch.cat(spans, dim=1).shape))
        return original(spans, inner, **kwargs)

    factors = ShareFactors.fit([random_adapter(shapes, 4, seed=0)], ["s0"], ShareConfig(rank=8, pseudo_rank=2))
    monkeypatch.setattr(subspace_module, "principal_decomposition", recording)
    sizes = {}
    for count in range(1, 30):
        calls.clear()
        factors.merge(random_adapter(shapes, 4, seed=count), f"s{count}")
        sizes[count + 1] = list(calls)
    # After k fills up, every merge decomposes the same two matrices: n x (k + r) and d x (k + r).
    assert sizes[10] == sizes[29] == [(64, 12), (48, 12)]
    assert factors.layers["a"].num_styles == 30


def test_delete_and_rename_styles():
    adapters = _adapters()
    factors = ShareFactors.fit(adapters, ["x", "y", "z"], ShareConfig(rank=13, pseudo_rank=6))
    before = factors.delta_weight("a", "z")
    bases = {name: (layer.basis_out.clone(), layer.basis_in.clone()) for name, layer in factors.layers.items()}
    factors.delete_style("y")
    assert factors.style_names == ["x", "z"]
    assert torch.equal(before, factors.delta_weight("a", "z"))  # the others' reconstructions bit for bit
    for name, layer in factors.layers.items():
        assert torch.equal(layer.basis_out, bases[name][0]) and torch.equal(layer.basis_in, bases[name][1])
    factors.rename_style("z", "zeta")
    assert relative_error(before, factors.delta_weight("a", "zeta")) < 1e-6
    with pytest.raises(StyleError, match="unknown style 'y'"):
        factors.delete_style("y")
    with pytest.raises(StyleError, match="already exists"):
        factors.rename_style("x", "zeta")
    # the Gram summary lost y's share: merging y back gives the same reconstruction as before
    factors.merge(adapters[1], "y")
    assert relative_error(_dense(adapters[1], "a"), factors.delta_weight("a", "y")) < 1e-5


def _stored_summaries(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_i w_i^2 R_i R_i.T`` and ``sum_i w_i^2 R_i.T R_i`` of the cores as stored, computed directly."""
    weights = 1.0 / layer.norm.clamp_min(1e-30) if layer.normalize else torch.ones_like(layer.norm)
    cores = (weights * layer.present)[:, None, None].double() * layer.cores().double()
    return (cores @ cores.mT).sum(0), (cores.mT @ cores).sum(0)


@pytest.mark.parametrize("normalize", [False, True])
def test_summaries_hold_the_styles_as_stored_so_a_delete_leaves_no_trace(normalize):
    """With p below the LoRAs' rank the cut drops part of every core: the summaries hold what is stored
    (fit, merges, batched merges), ``truncated`` what was dropped, and a delete leaves exactly the summaries of
    the styles left (summaries of the full cores kept the deleted style's dropped part, which steered later
    merges). k holds every LoRA whole here: a merge that truncates turns the summaries with the bases, which
    holds them only approximately on the side whose change of basis is not an isometry (as it always did)."""
    shapes = {"a": (48, 40), "b": (48, 40)}
    adapters = [random_adapter(shapes, 6, seed=seed) for seed in range(5)]
    config = ShareConfig(rank=30, pseudo_rank=3, normalize=normalize)
    factors = ShareFactors.fit(adapters[:3], ["s0", "s1", "s2"], config)
    factors.merge(adapters[3], "s3")
    factors.merge(adapters[4], "s4", batch_layers=True)
    for layer in factors.layers.values():
        gram_out, gram_in = _stored_summaries(layer)
        assert relative_error(gram_out, layer.gram_out) < 1e-6 and relative_error(gram_in, layer.gram_in) < 1e-6
        assert bool((layer.truncated > 0).all())
    # the newest style's truncated energy: what its rank-p cut dropped from its exact core in the bases
    layer = factors.layers["a"]
    basis_out, basis_in = layer.basis_out.double(), layer.basis_in.double()
    exact = basis_out.T @ _dense(adapters[4], "a").double() @ basis_in
    weight = 1.0 / float(layer.norm[4]) if normalize else 1.0
    dropped = weight**2 * float((exact - layer.cores()[4].double()).pow(2).sum())
    assert float(layer.truncated[4]) == pytest.approx(dropped, rel=1e-4)

    factors.delete_style("s1")
    for layer in factors.layers.values():
        gram_out, gram_in = _stored_summaries(layer)
        assert relative_error(gram_out, layer.gram_out) < 1e-6 and relative_error(gram_in, layer.gram_in) < 1e-6
    assert factors.layers["a"].truncated.shape == (4,)


def test_a_merge_spends_no_direction_on_what_earlier_cuts_dropped():
    """Room for every style as stored plus the new LoRA: the styles held do not move at all, and the new one
    is as good as rank p allows (its singular-value tail). With summaries of the full cores the dropped
    parts took directions, and both moved."""
    shapes = {"a": (64, 56)}
    adapters = [random_adapter(shapes, 8, seed=seed) for seed in range(3)]
    factors = ShareFactors.fit(adapters[:2], ["s0", "s1"], ShareConfig(rank=16, pseudo_rank=4))  # exact: k = 8 + 8
    before = {name: factors.delta_weight("a", name).double() for name in ("s0", "s1")}
    factors.merge(adapters[2], "s2")  # stored: 4 + 4 directions, the new LoRA 8: 16
    for name, reconstruction in before.items():  # (full summaries: moved 23% and 15%)
        assert relative_error(reconstruction, factors.delta_weight("a", name).double()) < 1e-6
    singular_values = torch.linalg.svdvals(_dense(adapters[2], "a").double())
    tail = float(singular_values[4:].pow(2).sum().sqrt() / singular_values.pow(2).sum().sqrt())
    assert factors.style_error("s2") == pytest.approx(tail, rel=1e-5)  # (full summaries: 0.558 for 0.530)


@pytest.mark.parametrize("center", [False, True])
def test_explained_variance_is_the_two_sided_projection_energy(center):
    """What the bases keep of the LoRAs before the rank-p cut: the summaries (after the cut) plus ``truncated``
    (with an anchor the cut is of the deviation: the cross term with the anchor counts too, else above 1)."""
    shapes = {"a": (48, 40)}
    adapters = shared_adapters(4, shapes, rank=6, shared_rank=6, noise=0.0) if center else None
    adapters = adapters or [random_adapter(shapes, 6, seed=seed) for seed in range(3)]
    names = [f"s{i}" for i in range(len(adapters))]
    config = ShareConfig(rank=24 if center else 10, pseudo_rank=2 if center else 3, center=center)
    factors = ShareFactors.fit(adapters, names, config)
    layer = factors.layers["a"]
    basis_out, basis_in = layer.basis_out.double(), layer.basis_in.double()
    dense = [_dense(adapter, "a").double() for adapter in adapters]
    kept = sum(float((basis_out.T @ update @ basis_in).pow(2).sum()) for update in dense)
    total = sum(float(update.pow(2).sum()) for update in dense)
    assert factors.explained_variance()["a"] == pytest.approx(kept / total, rel=1e-5)
    assert factors.explained_variance()["a"] <= 1.0 + 1e-9
    assert float(torch.trace(layer.gram_out)) < kept * 0.99  # the summaries alone: after the cut


def test_replacing_a_styles_cores_changes_only_that_style_and_its_share_of_the_summary():
    adapters = _adapters()
    factors = ShareFactors.fit(adapters, ["x", "y", "z"], ShareConfig(rank=13, pseudo_rank=6))  # exact: Gram known
    before = {(layer, name): factors.delta_weight(layer, name) for layer in SHAPES for name in "xyz"}
    bases = {name: layer.basis_out.clone() for name, layer in factors.layers.items()}
    bases_in = {name: layer.basis_in.clone() for name, layer in factors.layers.items()}
    generator = torch.Generator().manual_seed(9)
    core_out, core_in = torch.randn(13, 6, generator=generator), torch.randn(13, 6, generator=generator)
    factors.replace_style("y", {"a": (core_out, core_in)}, source={"steps": 5})

    layer = factors.layers["a"]
    expected = layer.basis_out.double() @ (core_out @ core_in.T).double() @ layer.basis_in.double().T
    assert relative_error(expected, factors.delta_weight("a", "y")) < 1e-6
    for key, reference in before.items():
        if key != ("a", "y"):
            assert torch.equal(reference, factors.delta_weight(*key))
    assert all(torch.equal(bases[name], layer.basis_out) for name, layer in factors.layers.items())
    assert all(torch.equal(bases_in[name], layer.basis_in) for name, layer in factors.layers.items())
    assert float(layer.error[1]) == 0.0 and float(layer.norm[1]) == pytest.approx(float(expected.norm()), rel=1e-5)
    # the summary holds every style as it is now: what a later merge weighs
    cores = layer.cores().double()
    assert relative_error((cores @ cores.transpose(1, 2)).sum(0), layer.gram_out) < 1e-5
    assert relative_error((cores.transpose(1, 2) @ cores).sum(0), layer.gram_in) < 1e-5
    assert factors.styles[1].source["fine_tuned"] == {"steps": 5}
    factors.replace_style("y", {"a": (core_out, 2 * core_in)}, source={"steps": 3})
    assert factors.styles[1].source["fine_tuned"] == {"steps": 3, "previous": {"steps": 5}}


@pytest.mark.parametrize("normalize", [False, True])
def test_a_merge_after_a_replacement_weighs_the_replaced_style(normalize):
    """Truncating fit (k < total rank, p < rank): y replaced by twice its stored core, then w merged; the merge's
    reported errors stay true (the summaries the merge reads are consistent after a replacement)."""
    adapters = _adapters()
    config = ShareConfig(rank=6, pseudo_rank=3, normalize=normalize)
    factors = ShareFactors.fit(adapters, ["x", "y", "z"], config)
    layer = factors.layers["a"]
    factors.replace_style("y", {"a": (2 * layer.core_out[1], layer.core_in[1])})
    new_y = factors.delta_weight("a", "y")
    assert relative_error(2 * layer.delta_weight(torch.tensor([0.0, 1.0, 0.0])), new_y) < 1e-5  # layer: before
    w = random_adapter(SHAPES, 2, seed=11)
    factors.merge(w, "w")
    # y keeps what it holds now up to the drift the merge reports, and w lands with the error it reports
    assert relative_error(new_y, factors.delta_weight("a", "y")) <= factors.layers["a"].error[1] + 1e-6
    error_w = relative_error(_dense(w, "a"), factors.delta_weight("a", "w"))
    assert error_w == pytest.approx(float(factors.layers["a"].error[3]), rel=1e-3)


def test_bad_replacements_leave_factors_unchanged():
    adapters = _adapters()
    factors = ShareFactors.fit(adapters[:2], ["x", "y"], ShareConfig(rank=8, pseudo_rank=4))
    factors.merge(random_adapter({"a": (40, 32)}, 2, seed=7), "only-a")
    before = {(layer, name): factors.delta_weight(layer, name) for layer in SHAPES for name in factors.style_names}
    good = (torch.ones(8, 4), torch.ones(8, 4))
    with pytest.raises(ShapeMismatchError, match=r"b: core_in of the new style has shape \(8, 3\), expected \(8, 4\)"):
        factors.replace_style("y", {"a": good, "b": (torch.ones(8, 4), torch.ones(8, 3))})
    with pytest.raises(ShapeMismatchError, match="the factors hold no layer 'c'"):
        factors.replace_style("y", {"a": good, "c": good})
    with pytest.raises(StyleError, match="style 'only-a' does not touch b"):
        factors.replace_style("only-a", {"b": good})
    with pytest.raises(StyleError, match="unknown style 'w'"):
        factors.replace_style("w", {"a": good})
    with pytest.raises(FactorValueError, match="a: core_out of the new style contains NaN or Inf"):
        factors.replace_style("y", {"a": (torch.full((8, 4), float("nan")), good[1])})
    with pytest.raises(FactorValueError, match="b: the new style's cores are all zero; delete the style instead"):
        factors.replace_style("y", {"a": good, "b": (torch.zeros(8, 4), good[1])})
    for key, reference in before.items():
        assert torch.equal(reference, factors.delta_weight(*key))
    assert "fine_tuned" not in factors.styles[1].source


def test_bad_merges_leave_factors_unchanged():
    adapters = _adapters()
    factors = ShareFactors.fit(adapters[:2], ["x", "y"], ShareConfig(rank=8, pseudo_rank=4))
    snapshot = {name: layer.basis_out.clone() for name, layer in factors.layers.items()}
    with pytest.raises(StyleError, match="already exists"):
        factors.merge(adapters[2], "x")
    with pytest.raises(StyleError, match="non-empty"):
        factors.merge(adapters[2], "  ")
    wrong = random_adapter({"a": (40, 31)}, 2)
    with pytest.raises(ShapeMismatchError, match=r"size mismatch for a: .*\(40, 31\).*\(40, 32\)"):
        factors.merge(wrong, "w")
    assert factors.style_names == ["x", "y"]
    for name, layer in factors.layers.items():
        assert torch.equal(layer.basis_out, snapshot[name])
        assert layer.num_styles == 2


def test_merge_into_new_layer_creates_it_with_zero_cores_for_earlier_styles():
    factors = ShareFactors.fit([random_adapter({"a": (40, 32)}, 4)], ["x"], ShareConfig(rank=8, pseudo_rank=4))
    extra = random_adapter({"a": (40, 32), "c": (16, 20)}, 3, seed=5)
    factors.merge(extra, "y")
    assert set(factors.layers) == {"a", "c"}
    assert torch.count_nonzero(factors.layers["c"].cores()[0]) == 0
    assert relative_error(_dense(extra, "c"), factors.delta_weight("c", "y")) < 1e-5


def test_merge_leaves_the_layers_it_does_not_touch_bit_for_bit():
    adapters = _adapters()
    factors = ShareFactors.fit(adapters, ["x", "y", "z"], ShareConfig(rank=6, pseudo_rank=3))
    before = {(layer, name): factors.delta_weight(layer, name) for layer in SHAPES for name in "xyz"}
    bases = {name: (layer.basis_out.clone(), layer.basis_in.clone()) for name, layer in factors.layers.items()}
    factors.merge(LoraAdapter({"a": adapters[0].layers["a"]}), "only_a")
    # no re-orthonormalisation of stored bases where nothing is merged: "b" keeps every bit
    assert torch.equal(factors.layers["b"].basis_out, bases["b"][0])
    assert torch.equal(factors.layers["b"].basis_in, bases["b"][1])
    for name in "xyz":
        assert torch.equal(factors.delta_weight("b", name), before[("b", name)])
    assert not factors.layers["b"].present[3]
    assert factors.layers["a"].present[3]


@pytest.mark.parametrize("shape", [(4, 12), (12, 4)])
def test_lora_rank_above_a_layer_dimension_fits_and_merges_exactly(shape):
    """FLUX's x_embedder (d_in 64) and proj_out (n_out 64) meet "all layers" LoRAs of rank 128: the thin SVD."""
    n, d = shape
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(min(n, d), d, dtype=torch.float64, generator=g)  # both updates live in these row/col spaces
    cols = torch.randn(n, min(n, d), dtype=torch.float64, generator=g)

    def wide(seed: int) -> LoraAdapter:  # rank 8 > min(n, d) = 4
        g = torch.Generator().manual_seed(seed)
        up = cols @ torch.randn(min(n, d), 8, dtype=torch.float64, generator=g)
        down = torch.randn(8, min(n, d), dtype=torch.float64, generator=g) @ rows
        # Two layers of one shape: the merge's batched canonical forms (adapters.canonical_forms) run too.
        return LoraAdapter(
            {name: LoraLayer(up.float(), down.float(), scale) for name, scale in (("narrow", 1.0), ("twin", 2.0))}
        )

    first, second = wide(1), wide(2)
    canonical = first.layers["narrow"].canonical()
    assert canonical.U.shape[1] == canonical.S.numel() == canonical.V.shape[1] == min(n, d)
    factors = ShareFactors.fit([first], ["a"], ShareConfig(rank=min(n, d), pseudo_rank=min(n, d)))
    factors.merge(second, "b")
    for adapter, name in ((first, "a"), (second, "b")):
        for layer in ("narrow", "twin"):
            assert relative_error(_dense(adapter, layer), factors.delta_weight(layer, name)) < 1e-5
