"""The map of the style bank (``share_diffusers.core.similarity``): similarities against dense updates,
the 2-D map, kept energy against errors computed from the original LoRAs, and the near-duplicate warning
of ``merge_lora``."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from conftest import random_adapter, shared_adapters
from flux_helpers import write_diffusers_lora

from share_diffusers.core import LoraAdapter, LoraLayer, ShareConfig, ShareFactors, StyleError
from share_diffusers.core import similarity as similarity_module
from share_diffusers.core.errors import ShareValueError
from share_diffusers.core.similarity import (
    NEAR_DUPLICATE_THRESHOLD,
    NearDuplicateStyleWarning,
    kept_energy,
    layer_group,
    near_duplicates,
    style_map,
    style_similarity,
)

# Two layer groups with two layers each, plus a layer without an index (its own group).
SHAPES = {
    "blocks.0.to_q": (24, 20),
    "blocks.1.to_q": (24, 20),
    "single.0.proj": (16, 24),
    "single.1.proj": (16, 24),
    "head": (20, 16),
}
GROUPS = {"blocks": ["blocks.0.to_q", "blocks.1.to_q"], "single": ["single.0.proj", "single.1.proj"], "head": ["head"]}


def bank_adapters() -> list[LoraAdapter]:
    """Four LoRAs sharing part of their directions, one of them missing the ``single`` group."""
    adapters = shared_adapters(3, SHAPES, rank=4, shared_rank=3, noise=0.3, scramble=True, seed=1)
    partial = random_adapter({k: v for k, v in SHAPES.items() if not k.startswith("single")}, rank=3, seed=7)
    return [*adapters, partial]


NAMES = ["ink", "neon", "sepia", "partial"]


def dense_vector(values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every layer's dense update flattened and concatenated in a fixed layer order (zeros where absent)."""
    return torch.cat(
        [values[name].flatten() if name in values else torch.zeros(math.prod(SHAPES[name])) for name in sorted(SHAPES)]
    ).double()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def lora_vector(adapter: LoraAdapter) -> torch.Tensor:
    return dense_vector({name: layer.delta_weight() for name, layer in adapter.layers.items()})


def reconstruction_vector(factors: ShareFactors, style: str) -> torch.Tensor:
    return dense_vector({name: factors.delta_weight(name, style) for name in factors.layers})


# -- similarity ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        ShareConfig(rank=5, pseudo_rank=3),
        ShareConfig(rank=5, pseudo_rank=3, center=True),
        ShareConfig(rank=6, pseudo_rank=6, normalize=True),
        ShareConfig(variance=0.8, max_rank=8, pseudo_rank=3),  # k differs between layers
    ],
    ids=["truncated", "centred", "normalized", "k-per-layer"],
)
@pytest.mark.parametrize("chunk", [None, 1], ids=["stacked", "layer-by-layer"])
def test_similarity_is_the_cosine_of_the_dense_reconstructions(config, chunk, monkeypatch):
    """Cores in orthonormal bases give the cosine of the whole dense updates (anchor and absent layers included)."""
    if chunk is not None:
        monkeypatch.setattr(similarity_module, "_CHUNK_NUMBERS", chunk)
    factors = ShareFactors.fit(bank_adapters(), NAMES, config)
    if config.variance is not None:
        assert len(set(factors.ranks().values())) > 1
    names, matrix = style_similarity(factors)
    assert names == NAMES
    vectors = [reconstruction_vector(factors, name) for name in NAMES]
    expected = torch.tensor([[cosine(a, b) for b in vectors] for a in vectors], dtype=torch.float64)
    assert torch.allclose(matrix, expected, atol=1e-6), (matrix, expected)
    assert torch.equal(matrix, matrix.T)
    assert torch.equal(torch.diagonal(matrix), torch.ones(len(NAMES), dtype=torch.float64))  # a style with itself


def blend_lora(first: LoraAdapter, second: LoraAdapter, weight: float) -> LoraAdapter:
    """The LoRA of ``dW_first + weight * dW_second`` (factors side by side), on the first's layers."""
    layers = {}
    for name, a in first.layers.items():
        b = second.layers[name]
        up = torch.cat([a.up.double() * a.scale, b.up.double() * (b.scale * weight)], dim=1)
        layers[name] = LoraLayer(up, torch.cat([a.down.double(), b.down.double()]), 1.0)
    return LoraAdapter(layers)


def test_similarity_of_exact_merges_is_that_of_the_original_loras():
    """Merged one at a time with k holding every LoRA, the similarities are those of the LoRAs themselves."""
    ink, neon, _, partial = bank_adapters()
    adapters = [ink, neon, blend_lora(ink, neon, 0.5), partial]
    names = ["ink", "neon", "ink+neon/2", "partial"]
    factors = ShareFactors.fit(adapters[:1], names[:1], ShareConfig(rank=16, pseudo_rank=16))
    for adapter, name in zip(adapters[1:], names[1:], strict=True):
        factors.merge(adapter, name)
    assert max(factors.style_error(name) for name in names) < 1e-5
    vectors = [lora_vector(adapter) for adapter in adapters]
    _, matrix = style_similarity(factors)
    for i in range(len(names)):
        for j in range(len(names)):
            assert matrix[i, j] == pytest.approx(cosine(vectors[i], vectors[j]), abs=1e-5)
    assert float(matrix[0, 2]) > 0.8  # a blend is close to its main part: not a test of zeros only


def test_similarity_on_chosen_styles_and_layers():
    factors = ShareFactors.fit(bank_adapters(), NAMES, ShareConfig(rank=5, pseudo_rank=3))
    names, matrix = style_similarity(factors, styles=["sepia", "ink"], layers=GROUPS["blocks"])
    vectors = {
        style: torch.cat([factors.delta_weight(layer, style).flatten() for layer in GROUPS["blocks"]])
        for style in names
    }
    assert names == ["sepia", "ink"]
    assert float(matrix[0, 1]) == pytest.approx(cosine(vectors["sepia"], vectors["ink"]), abs=1e-6)
    # A style with no energy on the chosen layers: 0 with everything, itself included.
    _, matrix = style_similarity(factors, styles=["ink", "partial"], layers=GROUPS["single"])
    assert matrix.tolist() == [[1.0, 0.0], [0.0, 0.0]]
    with pytest.raises(StyleError, match="unknown style 'nope'"):
        style_similarity(factors, styles=["ink", "nope"])
    with pytest.raises(StyleError, match="style 'ink' is listed twice"):
        style_similarity(factors, styles=["ink", "ink"])
    with pytest.raises(ShareValueError, match="the factors hold no layer 'blocks.9.to_q'"):
        style_similarity(factors, layers=["blocks.9.to_q"])


def orthogonal_pair() -> list[LoraAdapter]:
    """Two LoRAs on the same layers writing to orthogonal output directions: <dW_1, dW_2>_F = 0 exactly."""
    generator = torch.Generator().manual_seed(3)
    adapters = []
    for half in range(2):
        layers = {}
        for name, (n_out, d_in) in SHAPES.items():
            up = torch.zeros(n_out, 3, dtype=torch.float64)
            rows = slice(half * (n_out // 2), (half + 1) * (n_out // 2))
            up[rows] = torch.randn(n_out // 2, 3, generator=generator, dtype=torch.float64)
            down = torch.randn(3, d_in, generator=generator, dtype=torch.float64)
            layers[name] = LoraLayer(up, down, 1.0)
        adapters.append(LoraAdapter(layers))
    return adapters


def test_orthogonal_loras_have_similarity_zero_and_a_negated_copy_minus_one():
    first, second = orthogonal_pair()
    assert abs(cosine(lora_vector(first), lora_vector(second))) < 1e-12  # orthogonal by construction
    negated = LoraAdapter({name: LoraLayer(-layer.up, layer.down, layer.scale) for name, layer in first.layers.items()})
    elsewhere = random_adapter({"head": SHAPES["head"]}, rank=2, seed=4)
    factors = ShareFactors.fit(
        [first, second, negated, elsewhere], ["a", "b", "minus a", "head only"], ShareConfig(rank=16, pseudo_rank=16)
    )
    similarity = style_similarity(factors)
    assert abs(float(similarity.matrix[0, 1])) < 1e-6
    assert float(similarity.matrix[0, 2]) == pytest.approx(-1.0, abs=1e-6)
    assert near_duplicates(factors, "a") == {}  # a negated copy is no duplicate
    # Layers a style does not touch count as zero update: a LoRA on "head" only shares nothing with the rest
    # there but "head" itself, so its similarity is that of the "head" layer weighted by energy.
    head = {style: factors.delta_weight("head", style).flatten() for style in ("a", "head only")}
    expected = float(head["a"] @ head["head only"]) / (
        float(reconstruction_vector(factors, "a").norm()) * float(head["head only"].norm())
    )
    assert float(similarity.matrix[0, 3]) == pytest.approx(expected, abs=1e-6)


# -- the map ------------------------------------------------------------------------------------


def test_style_map_keeps_the_distances_of_three_styles_and_is_deterministic():
    """Three unit-norm updates span a plane after centring: the map is exact, with distances sqrt(2 - 2 s)."""
    factors = ShareFactors.fit(bank_adapters()[:3], NAMES[:3], ShareConfig(rank=5, pseudo_rank=3))
    similarity = style_similarity(factors)
    layout = style_map(similarity)
    assert layout.names == NAMES[:3] and layout.coordinates.shape == (3, 2)
    assert float(layout.explained.sum()) == pytest.approx(1.0)
    for i in range(3):
        for j in range(3):
            distance = float((layout.coordinates[i] - layout.coordinates[j]).norm())
            assert distance == pytest.approx(math.sqrt(max(0.0, 2 - 2 * float(similarity.matrix[i, j]))), abs=1e-9)
    # Each axis's largest-magnitude coordinate is positive; the same bank gives the same map.
    pivot = layout.coordinates.abs().argmax(dim=0)
    assert bool((layout.coordinates[pivot, torch.arange(2)] > 0).all())
    assert torch.equal(style_map(style_similarity(factors)).coordinates, layout.coordinates)
    lone = style_map(style_similarity(factors, styles=["ink"]))
    assert lone.coordinates.tolist() == [[0.0, 0.0]]


def test_a_bank_with_every_style_deleted_has_an_empty_similarity_and_map():
    """Deleting the last style keeps the layers (their bases) with no style: a ``0 x 0`` answer, not an
    error, for the studio's map and ``share-diffusers inspect --similarity`` alike."""
    from share_diffusers.cli import similarity_summary

    factors = ShareFactors.fit(bank_adapters()[:2], NAMES[:2], ShareConfig(rank=5, pseudo_rank=3))
    for name in NAMES[:2]:
        factors.delete_style(name)
    assert factors.style_names == [] and factors.layers
    similarity = style_similarity(factors)
    assert similarity.names == [] and similarity.matrix.shape == (0, 0)
    assert similarity.matrix.dtype == torch.float64
    layout = style_map(similarity)
    assert layout.names == [] and layout.coordinates.shape == (0, 2) and layout.explained.tolist() == [0.0, 0.0]
    assert style_similarity(factors, layers=list(GROUPS["head"])).matrix.shape == (0, 0)
    assert kept_energy(factors) == {}
    summary = similarity_summary(factors)
    assert (summary["styles"], summary["matrix"], summary["near_duplicates"]) == ([], [], [])


# -- kept energy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("transformer_blocks.3.attn.to_q", "transformer_blocks"),
        ("single_transformer_blocks.10.proj_out", "single_transformer_blocks"),
        ("encoder.layer.2.attention.self.query", "encoder.layer"),
        ("x_embedder", "x_embedder"),
        ("norm_out.linear", "norm_out"),
        ("0.weight", "0"),
    ],
)
def test_layer_group(name, expected):
    assert layer_group(name) == expected


def test_kept_energy_is_one_minus_the_squared_relative_error_of_the_original_loras():
    """Per style and group: 1 - ||dW - dW_hat||^2 / ||dW||^2 from dense matrices, and (an orthogonal
    projection, no centring) the energy share ||dW_hat||^2 / ||dW||^2 of the reconstruction."""
    adapters = bank_adapters()
    factors = ShareFactors.fit(adapters, NAMES, ShareConfig(rank=4, pseudo_rank=3))
    kept = kept_energy(factors)
    for adapter, name in zip(adapters, NAMES, strict=True):
        touched = {group: layers for group, layers in GROUPS.items() if layers[0] in adapter.layers}
        assert sorted(kept[name]) == sorted(touched)
        for group, layers in touched.items():
            original = {layer: adapter.layers[layer].delta_weight() for layer in layers}
            energy = sum(float(dw.norm() ** 2) for dw in original.values())
            residual = sum(
                float((dw - factors.delta_weight(layer, name)).norm() ** 2) for layer, dw in original.items()
            )
            held = sum(float(factors.delta_weight(layer, name).norm() ** 2) for layer in layers)
            assert kept[name][group] == pytest.approx(1 - residual / energy, abs=1e-5)
            assert kept[name][group] == pytest.approx(held / energy, abs=1e-5)
        assert 0.3 < min(kept[name].values()) < 0.999  # k = 4 truncates: a real test
    overall = kept_energy(factors, group=lambda layer: "all")
    assert overall == {name: {"all": pytest.approx(1 - factors.style_error(name) ** 2)} for name in NAMES}
    assert kept_energy(factors, styles=["neon"]) == {"neon": kept["neon"]}


# -- near-duplicates ----------------------------------------------------------------------------


def scaled(adapter: LoraAdapter, factor: float) -> LoraAdapter:
    return LoraAdapter(
        {name: LoraLayer(layer.up, layer.down, layer.scale * factor) for name, layer in adapter.layers.items()}
    )


def test_near_duplicates_finds_a_rescaled_copy():
    adapters = bank_adapters()
    factors = ShareFactors.fit(adapters[:3], NAMES[:3], ShareConfig(rank=8, pseudo_rank=8))
    factors.merge(scaled(adapters[1], 2.5), "neon x2.5")
    found = near_duplicates(factors, "neon x2.5")
    # k = 8 truncates these rank-4 LoRAs: the two reconstructions differ a little, as held.
    assert list(found) == ["neon"] and 0.98 < found["neon"] <= 1.0
    assert near_duplicates(factors, "neon") == {"neon x2.5": found["neon"]}
    assert near_duplicates(factors, "ink") == {}
    everything = near_duplicates(factors, "ink", threshold=-1.0)
    assert sorted(everything) == ["neon", "neon x2.5", "sepia"]
    assert list(everything.values()) == sorted(everything.values(), reverse=True)
    with pytest.raises(ShareValueError, match="threshold must be a finite number"):
        near_duplicates(factors, "ink", threshold=float("nan"))
    with pytest.raises(StyleError, match="unknown style 'nope'"):
        near_duplicates(factors, "nope")


def test_merge_lora_warns_when_the_new_lora_is_a_rescaled_copy(tmp_path):
    from share_diffusers import ShareFluxPipeline
    from share_diffusers.tiny_flux import build_tiny_flux_pipeline

    ink = write_diffusers_lora(tmp_path / "ink", seed=1, rank=4, alpha=4)
    neon = write_diffusers_lora(tmp_path / "neon", seed=2, rank=4, alpha=4)
    stronger_ink = write_diffusers_lora(tmp_path / "ink-strong", seed=1, rank=4, alpha=4, scale=0.6)  # dW x4
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NearDuplicateStyleWarning)  # unrelated LoRAs: no warning
        pipe.merge_lora(ink, style_name="ink")
        report = pipe.merge_lora(neon, style_name="neon")
    assert report.near_duplicates == {}
    with pytest.warns(NearDuplicateStyleWarning) as caught:
        report = pipe.merge_lora(stronger_ink, style_name="ink strong")
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller's merge_lora line
    assert str(caught[0].message) == (
        "style 'ink strong' is a near-duplicate of 'ink': the cosine similarity of their weight updates is "
        f"1.000 (threshold {NEAR_DUPLICATE_THRESHOLD:g}), so 'ink strong' is close to 'ink' at another strength; "
        "if it is the same LoRA, delete one of them (delete_style('ink strong'))"
    )
    assert list(report.near_duplicates) == ["ink"] and report.near_duplicates["ink"] == pytest.approx(1.0, abs=1e-5)
    assert re.search(r"; near-duplicate of 'ink' \(1\.000\) \(cosine similarity\)$", str(report)), str(report)
    assert pipe.list_styles() == ["ink", "neon", "ink strong"]  # a warning: the merge stands


@pytest.mark.parametrize(
    "config", [ShareConfig(rank=6, pseudo_rank=3), ShareConfig(rank=6, pseudo_rank=3, center=True)]
)
def test_style_drift_is_the_change_of_the_dense_reconstructions(config):
    """A merge into a full subspace (k = 6 < the LoRAs' ranks) turns the bases: each earlier style's drift is
    ``||dW_after - dW_before|| / ||dW_before||`` of its dense reconstructions over all layers."""
    from share_diffusers.core import style_drift

    adapters = bank_adapters()
    factors = ShareFactors.fit(adapters[:3], NAMES[:3], config)
    before = factors.snapshot()
    dense_before = {
        name: dense_vector({k: factors.delta_weight(k, name) for k in factors.layers}) for name in NAMES[:3]
    }
    factors.merge(adapters[3], "partial")
    drift = style_drift(before, factors)
    assert list(drift) == NAMES[:3]
    for name in NAMES[:3]:
        after = dense_vector({k: factors.delta_weight(k, name) for k in factors.layers})
        expected = float((after - dense_before[name]).norm() / dense_before[name].norm())
        assert expected > 1e-3  # the merge moved it
        assert drift[name] == pytest.approx(expected, rel=1e-3, abs=1e-4), name
    assert style_drift(factors, factors) == {name: pytest.approx(0.0, abs=1e-3) for name in NAMES}


def test_style_drift_of_a_half_precision_checkpoint_is_not_its_rounding(tmp_path):
    """Bases read back from bfloat16 are orthonormal only to their rounding: with ``||C||`` for ``||R||`` a merge
    that moved nothing but that rounding (k holds every style) reported 1-2% for the earlier style."""
    from share_diffusers.core import load_factors, save_factors, style_drift

    adapters = [random_adapter({"a": (256, 192)}, 2, seed=seed) for seed in range(8)]
    save_factors(ShareFactors.fit(adapters[:1], ["s0"], ShareConfig(rank=64, pseudo_rank=2)), tmp_path, torch.bfloat16)
    for index in range(1, 8):
        factors = load_factors(tmp_path)
        before, dense_before = factors.snapshot(), factors.delta_weight("a", "s0")
        factors.merge(adapters[index], f"s{index}")
        expected = float((factors.delta_weight("a", "s0") - dense_before).norm() / dense_before.norm())
        assert expected < 1e-3  # the earlier style stays (up to the re-orthonormalised rounding)
        assert style_drift(before, factors)["s0"] == pytest.approx(expected, abs=1e-3), index
        save_factors(factors, tmp_path)
