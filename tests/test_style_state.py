"""The per-call style state (``StyleSelection`` owned by ``ShareModel``): work once per request, none per step.

The GPU properties of a styled step (no host-device copies, at most 4 extra kernels a layer, nothing
recomputed) are held here on the CPU by counting the ATen operations a forward dispatches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_SHAPES, TinyNet, random_adapter, relative_error
from flux_helpers import run_transformer, transformer_inputs
from torch.utils._python_dispatch import TorchDispatchMode

from share_diffusers import ShareFluxPipeline
from share_diffusers.core import LoraAdapter, ShareConfig, ShareFactors, ShareLinear, ShareModel
from share_diffusers.core.errors import ShapeMismatchError, ShareStateError, StyleError
from share_diffusers.tiny_flux import build_tiny_flux_pipeline

NAMES = ["ink", "neon", "sepia"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# Ops that only reinterpret memory: no kernel runs for them on any device.
_NO_KERNEL = {torch.ops.aten._unsafe_view.default, torch.ops.aten.lift_fresh.default}


class KernelCounter(TorchDispatchMode):
    """Counts the ATen operations that launch work (views excluded) and the copies among them."""

    def __init__(self):
        super().__init__()
        self.kernels: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in _NO_KERNEL:
            self.kernels.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))

    @property
    def copies(self) -> list[str]:
        return [name for name in self.kernels if name in ("_to_copy", "copy_", "to", "_copy_from")]


def _count(fn) -> KernelCounter:
    with torch.no_grad(), KernelCounter() as counter:
        fn()
    return counter


def _flux_with_styles(num_styles: int = 3, rank: int = 8):
    """The tiny Flux transformer with ``num_styles`` random rank-4 LoRAs merged on its attention linears."""
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    share = pipe.new_share_subspace(config=ShareConfig(rank=rank, pseudo_rank=4))
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in share.layers.items()}
    for index in range(num_styles):
        share.merge(random_adapter(shapes, rank=4, seed=10 + index), NAMES[index])
    return pipe, share


@pytest.mark.parametrize(
    "style",
    ["ink", {"ink": 0.5, "neon": 0.7}, ["ink", {"neon": 1.0, "sepia": -0.5}]],
    ids=["one-style", "blend", "mixed-batch"],
)
def test_styled_step_adds_at_most_four_kernels_a_layer_and_copies_nothing(style):
    pipe, share = _flux_with_styles()
    transformer = pipe.transformer
    inputs = transformer_inputs(batch=2)
    base = _count(lambda: run_transformer(transformer, inputs))
    share.set_style(style, batch_size=2)
    styled = _count(lambda: run_transformer(transformer, inputs))
    styled_layers = len(share.layers)
    extra = len(styled.kernels) - len(base.kernels)
    assert styled_layers == sum(isinstance(module, ShareLinear) for module in transformer.modules()) > 0
    assert extra <= 4 * styled_layers, f"{extra / styled_layers:.1f} extra kernels per styled layer"
    assert extra == 3 * styled_layers  # project, per-sample cores, project back fused with the add
    assert styled.copies == base.copies  # no host-device (or dtype) copy added by a style
    # a second step of the same request recomputes nothing
    again = _count(lambda: run_transformer(transformer, inputs))
    assert again.kernels == styled.kernels


def test_switching_blends_once_for_all_layers_not_per_layer():
    _, share = _flux_with_styles()
    share.set_style(["ink", "neon"])  # parsed once; later switches to it are cache hits
    share.set_style("sepia")
    switch = _count(lambda: share.set_style(["ink", "neon"]))
    # one group (every attention linear has the same k, t p, device, dtype): a few batched ops for all
    assert switch.kernels == ["repeat_interleave", "mul", "bmm", "copy_"] or len(switch.kernels) <= 6, switch.kernels
    views = {layer.blended_cores.data_ptr() for layer in share.layers.values()}
    first = next(iter(share.layers.values())).blended_cores
    share.set_style(["sepia", {"ink": 2.0}])  # same row count: written in place, no rebinding
    assert next(iter(share.layers.values())).blended_cores is first
    assert {layer.blended_cores.data_ptr() for layer in share.layers.values()} == views


def test_blended_cores_equal_the_factors_blend():
    _, share = _flux_with_styles()
    specs = [{"ink": 0.3, "sepia": -1.2}, "neon"]
    share.set_style(specs)
    for name, layer in share.layers.items():
        for row, spec in enumerate(specs):
            blend = {spec: 1.0} if isinstance(spec, str) else spec
            state = share.factors.layers[name]
            expected = state.cores(share.factors.style_vector(blend).to(state.core_out.dtype))
            assert relative_error(expected, layer.blended_cores[row]) < 1e-6, name


def test_styles_context_restores_the_previous_selection():
    pipe, share = _flux_with_styles()
    assert ShareModel.of(pipe.transformer) is share is pipe.share
    inputs = transformer_inputs(batch=2)
    share.set_style("neon")
    neon = run_transformer(pipe.transformer, inputs)
    with share.styles(["ink", "sepia"]) as active:
        assert active is share
        mixed = run_transformer(pipe.transformer, inputs)
    assert torch.equal(run_transformer(pipe.transformer, inputs), neon)
    share.set_style(None)
    base = run_transformer(pipe.transformer, inputs)
    with pytest.raises(StyleError, match="unknown style 'nope'"):
        with share.styles("nope"):
            pass
    assert torch.equal(run_transformer(pipe.transformer, inputs), base)  # a refused request changes nothing
    assert not torch.equal(mixed, base)
    share.remove()
    assert ShareModel.of(pipe.transformer) is None


def test_repeat_follows_num_images_per_prompt_order():
    _, share = _flux_with_styles()
    share.set_style(["ink", "neon"], repeat=2)
    weights = share.selection.weights
    ink, neon = share.factors.style_index("ink"), share.factors.style_index("neon")
    assert weights.shape == (4, 3)
    assert weights[:, ink].tolist() == [1.0, 1.0, 0.0, 0.0] and weights[:, neon].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_merge_and_model_moves_recompute_the_blend():
    pipe, share = _flux_with_styles(num_styles=2, rank=16)  # k holds all three styles: ink stays exact
    inputs = transformer_inputs(batch=2)
    share.set_style("ink")
    before = run_transformer(pipe.transformer, inputs)
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in share.layers.items()}
    share.merge(random_adapter(shapes, rank=4, seed=99), "sepia")  # the bank grows: selection cleared
    assert share.selection.weights is None
    share.set_style("ink")
    after = run_transformer(pipe.transformer, inputs)
    assert relative_error(before, after) < 1e-5
    pipe.transformer.to(torch.float64)  # .to() replaces every buffer: the blend is redone on the next request
    share.set_style("ink")
    as_double = run_transformer(
        pipe.transformer,
        {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()},
    )
    assert as_double.dtype == torch.float64
    assert relative_error(after, as_double) < 1e-5


def test_refused_style_values_name_the_problem():
    _, share = _flux_with_styles()
    with pytest.raises(StyleError, match="finite"):
        share.set_style({"ink": float("inf")})
    with pytest.raises(StyleError, match="finite"):
        share.set_style("ink", scale=float("nan"))
    with pytest.raises(StyleError, match="must lie within"):
        share.set_style({"ink": 1e30, "neon": 1e30})
    import numpy as np

    share.set_style({"ink": np.float32(0.5)})  # numpy scalars are numbers too
    assert share.selection.weights[0, share.factors.style_index("ink")] == 0.5
    # True == 1 and hashes alike: a cached {"ink": 1} must not let {"ink": True} through
    share.set_style({"ink": 1}, scale=1)
    with pytest.raises(StyleError, match="blend weight for style 'ink' must be a finite number, got True"):
        share.set_style({"ink": True})
    with pytest.raises(StyleError, match="style scale must be a finite number, got True"):
        share.set_style({"ink": 1}, scale=True)
    with pytest.raises(StyleError, match="blend weight for style 'ink' must be a finite number, got np.True_"):
        share.set_style({"ink": np.True_})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_exact_and_inexact_unfuse(dtype):
    net = TinyNet().to(dtype)
    adapters = [random_adapter(TINY_SHAPES, 3, seed=seed) for seed in range(2)]
    factors = ShareFactors.fit(adapters, NAMES[:2], ShareConfig(rank=8, pseudo_rank=3))
    share = ShareModel.inject(net, factors)
    originals = {name: layer.base_layer.weight.detach().clone() for name, layer in share.layers.items()}
    share.fuse_style({"ink": 0.7, "neon": 0.4})
    share.unfuse_style()
    for name, layer in share.layers.items():
        assert torch.equal(layer.base_layer.weight, originals[name]), name  # exact: bit for bit
    share.fuse_style("ink", exact=False)
    assert all(layer._unfused_weight is None for layer in share.layers.values())  # nothing kept
    share.unfuse_style()
    tolerance = 1e-6 if dtype == torch.float32 else 2e-2  # bf16: the rounding of the fused weight
    for name, layer in share.layers.items():
        assert relative_error(originals[name], layer.base_layer.weight) < tolerance, name
        assert layer.base_layer.weight.dtype == dtype


def test_single_layer_without_a_model_reads_a_fresh_blend():
    """A ``ShareLinear`` used on its own (no ShareModel): loading factors re-blends on the next selection."""
    from share_diffusers.core import StyleSelection

    factors = ShareFactors.fit(
        [random_adapter({"layer": (12, 10)}, 2, seed=s) for s in range(2)], NAMES[:2], ShareConfig(rank=4)
    )
    layer = ShareLinear(torch.nn.Linear(10, 12), StyleSelection())
    layer.load_share(factors.layers["layer"])
    layer.selection.set(factors.style_vector({"ink": 1.0}))
    x = torch.randn(2, 3, 10)
    dense = factors.delta_weight("layer", "ink").float()
    assert relative_error(layer.base_layer(x) + x @ dense.T, layer(x)) < 1e-5
    adapter = LoraAdapter({"layer": random_adapter({"layer": (12, 10)}, 2, seed=5).layers["layer"]})
    factors.merge(adapter, "sepia")
    layer.load_share(factors.layers["layer"])
    layer.selection.set(factors.style_vector({"sepia": 1.0}))
    dense = factors.delta_weight("layer", "sepia").float()
    assert relative_error(layer.base_layer(x) + x @ dense.T, layer(x)) < 1e-5


@pytest.mark.parametrize("quantize", [None, "int8"], ids=["float", "torchao-int8"])
def test_per_block_and_quantized_styled_steps_add_three_kernels_a_layer(quantize):
    """Per-block weights and a quantized base keep the styled step's cost: 3 kernels a layer, no copies."""
    pipe, share = _flux_with_styles()
    if quantize is not None:
        pytest.importorskip("torchao")
        from share_diffusers.core.quantized import is_quantized
        from share_diffusers.quantization import quantize_in_place

        share.remove()  # quantize the plain transformer, then put the same factors back
        quantize_in_place(pipe.transformer, quantize)
        share = ShareModel.inject(pipe.transformer, share.factors)
        assert all(is_quantized(layer.base_layer) for layer in share.layers.values())
    transformer = pipe.transformer
    inputs = transformer_inputs(batch=2)
    base = _count(lambda: run_transformer(transformer, inputs))
    share.set_style([{"ink": {"double": 1.0, "single": 0.3}}, {"neon": [1.0, 0.0, 0.5, 0.5], "sepia": 0.2}])
    assert share.selection.weights.ndim == 3  # per layer
    styled = _count(lambda: run_transformer(transformer, inputs))
    assert len(styled.kernels) - len(base.kernels) == 3 * len(share.layers)
    assert styled.copies == base.copies


def test_restore_undoes_a_merge_bit_for_bit_where_a_delete_does_not():
    """A merge turns the shared bases (k = 8 holds three rank-4 styles only approximately), so every earlier
    style's output moves; deleting the new style keeps the turn, restoring the snapshot taken before undoes it."""
    pipe, share = _flux_with_styles()
    inputs = transformer_inputs()

    def outputs() -> dict[str, torch.Tensor]:
        result = {}
        for name in NAMES:
            share.set_style(name)
            result[name] = run_transformer(pipe.transformer, inputs)
        share.set_style(None)
        return result

    before, errors = outputs(), {name: share.factors.style_error(name) for name in NAMES}
    bank = share.snapshot()
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in share.layers.items()}
    share.merge(random_adapter(shapes, rank=4, seed=99), "late")
    share.set_style("ink")
    moved = outputs()
    assert all(not torch.equal(moved[name], before[name]) for name in NAMES)
    share.delete_style("late")
    assert share.style_names == NAMES and not torch.equal(outputs()["ink"], before["ink"])  # the turn stays

    share.rename_style("neon", "glow")  # changed in place: the snapshot keeps its own style records
    share.restore(bank)
    assert share.style_names == NAMES == bank.style_names
    assert share.selection.weights is None  # cleared, as after a merge
    restored = outputs()
    assert all(torch.equal(restored[name], before[name]) for name in NAMES)
    assert {name: share.factors.style_error(name) for name in NAMES} == errors


def test_restore_refuses_a_snapshot_of_another_model_and_a_fused_style():
    pipe, share = _flux_with_styles()
    bank = share.snapshot()
    model = TinyNet()
    other = ShareModel.inject(model, target_modules=list(TINY_SHAPES))
    other.merge(random_adapter(TINY_SHAPES, rank=2, seed=1), "tiny")
    with pytest.raises(ShapeMismatchError, match=r"the Share factors hold \d+ layer\(s\) the model does not have"):
        other.restore(bank)
    assert other.style_names == ["tiny"]
    share.fuse_style("ink")
    with pytest.raises(ShareStateError, match="restore a snapshot"):
        share.restore(bank)
    share.unfuse_style()
    share.restore(bank)
    assert share.style_names == NAMES


def test_a_style_named_twice_in_a_blend_is_refused():
    """Two Unicode spellings of one name are one style: added (plain) or dropped (next to per-block) before."""
    pipe, share = _flux_with_styles()
    share.rename_style("ink", "caf\u00e9")  # composed é
    decomposed = "cafe\u0301"
    share.set_style("neon")
    before = share.selection.weights.clone()
    for blend in ({"caf\u00e9": 0.5, decomposed: 0.5}, {"caf\u00e9": 0.5, decomposed: {"*": 0.5}}):
        with pytest.raises(
            StyleError, match=r"style 'café' appears twice in a blend, spelt 'caf\\xe9' and 'cafe\\u0301'"
        ):
            share.set_style(blend)
    assert torch.equal(share.selection.weights, before)  # the refused blends changed nothing
    share.set_style({decomposed: 0.5})  # one spelling alone is the style
    assert share.selection.weights[0, share.factors.style_index("caf\u00e9")] == 0.5


def test_a_bank_edit_inside_a_styles_block_is_kept_and_a_users_error_is_not_replaced():
    pipe, share = _flux_with_styles(num_styles=2)
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in share.layers.items()}
    inputs = transformer_inputs(batch=1)
    share.set_style("neon")
    with share.styles("ink"):  # the merge clears the selection: the one before selected another bank's styles
        share.merge(random_adapter(shapes, rank=4, seed=30), "sepia")
    assert share.selection.weights is None
    share.set_style("neon")
    with pytest.raises(KeyboardInterrupt, match="the user's own"):
        with share.styles("ink"):
            share.delete_style("sepia")
            raise KeyboardInterrupt("the user's own")
    assert share.selection.weights is None
    base = run_transformer(pipe.transformer, inputs)
    share.set_style("neon")
    with share.styles("ink"):  # a style fused inside the block is not styled once more after it
        share.fuse_style("ink")
    assert share.selection.weights is None
    fused = run_transformer(pipe.transformer, inputs)
    share.unfuse_style()
    with share.styles("ink"):
        assert torch.allclose(run_transformer(pipe.transformer, inputs), fused, atol=1e-5)
    assert not torch.allclose(fused, base)


def test_the_default_style_follows_a_rename_and_a_delete_in_any_unicode_form():
    pipe, share = _flux_with_styles()
    share.rename_style("ink", "caf\u00e9")
    decomposed = "cafe\u0301"
    pipe.set_style(decomposed)  # resolves to the style held as "café" (composed)
    pipe.rename_style(decomposed, "ink")
    assert pipe._default_style == "ink"
    pipe.rename_style("ink", decomposed)  # stored as given... and followed as stored
    pipe.set_style({decomposed: 0.5, "neon": 0.5})
    pipe.delete_style("caf\u00e9")
    assert pipe._default_style is None  # a default naming a deleted style is dropped


def test_the_models_state_dict_and_save_pretrained_stay_the_base_models(tmp_path):
    """ShareLinear's wrapping left `<layer>.base_layer.weight` keys: a stock reload of a saved model dropped every
    attention weight (left on the meta device, a logger line only)."""
    from diffusers import FluxTransformer2DModel

    stock = build_tiny_flux_pipeline(0).transformer
    pipe, share = _flux_with_styles()
    saved = {key: value.clone() for key, value in pipe.transformer.state_dict().items()}  # not the live weights
    assert list(saved) == list(stock.state_dict())  # same names, same order
    assert all(torch.equal(saved[key], value) for key, value in stock.state_dict().items())
    inputs = transformer_inputs(batch=1)
    share.set_style("ink")
    styled = run_transformer(pipe.transformer, inputs)
    share.set_style(None)
    share.fuse_style("ink")  # a fused style is saved in the weights, as stock diffusers reads them
    pipe.transformer.save_pretrained(tmp_path / "fused")
    share.unfuse_style()
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "fused")
    assert relative_error(styled, run_transformer(reloaded, inputs)) < 1e-5
    # and back: a stock state dict (here: the fused one) loads into the wrapped layers, strictly
    base = run_transformer(pipe.transformer, inputs)
    pipe.transformer.load_state_dict(reloaded.state_dict(), strict=True)
    assert relative_error(styled, run_transformer(pipe.transformer, inputs)) < 1e-5
    pipe.transformer.load_state_dict(saved, strict=True)
    assert torch.equal(run_transformer(pipe.transformer, inputs), base)


def test_an_explicit_style_none_is_the_base_model_whatever_is_selected():
    """``pipe(style=None)`` inside ``with pipe.share.styles(...)`` or after ``share.set_style`` drew the selection."""
    from flux_helpers import generate

    pipe, share = _flux_with_styles()
    pipe.set_progress_bar_config(disable=True)
    base = generate(pipe, ["a cat"], style=None)
    share.set_style("ink")
    assert np.array_equal(generate(pipe, ["a cat"], style=None), base)
    assert not np.allclose(generate(pipe, ["a cat"]), base)  # left out: the selection, as documented
    with share.styles("neon"):
        assert np.array_equal(generate(pipe, ["a cat"], style=None), base)
    assert share.selection.weights is not None  # the call put the selection back
