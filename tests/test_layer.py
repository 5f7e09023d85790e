"""ShareLinear and injection against dense ``W0 x + dW x`` computed directly."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SHAPES, TinyNet, random_adapter, relative_error
from torch import nn

from share_diffusers.core import ShareConfig, ShareFactors, ShareLinear, ShareModel, StyleSelection
from share_diffusers.core.errors import ShapeMismatchError, ShareError, ShareStateError, ShareValueError, StyleError

NAMES = ["ink", "neon", "sepia"]


def _factors(shapes=TINY_SHAPES, center=False):
    adapters = [random_adapter(shapes, rank, seed=seed) for seed, rank in enumerate([3, 4, 2])]
    config = ShareConfig(rank=16, pseudo_rank=16 if center else 4, center=center)
    return ShareFactors.fit(adapters, NAMES, config), adapters


def _layer(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "linear":
        base = nn.Linear(24, 48).to(dtype)
        shapes = {"layer": (48, 24)}
    else:
        base = nn.Conv2d(24, 48, kernel_size=1).to(dtype)
        shapes = {"layer": (48, 24)}
    factors, adapters = _factors(shapes)
    selection = StyleSelection()
    layer = ShareLinear(base, selection)
    layer.load_share(factors.layers["layer"])
    return layer, selection, factors, adapters


def _input(kind: str, batch: int = 3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    if kind == "linear":
        return torch.randn(batch, 5, 24, generator=generator).to(dtype)  # (b, tokens, d)
    return torch.randn(batch, 24, 4, 3, generator=generator).to(dtype)  # (b, c, h, w)


def _dense_forward(layer: ShareLinear, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W0 x + b + dW x`` with a dense weight, computed independently of ShareLinear."""
    base = layer.base_layer
    weight = base.weight.double().reshape(base.weight.shape[0], -1) + delta.double()
    if isinstance(base, nn.Conv2d):
        return torch.nn.functional.conv2d(x.double(), weight[:, :, None, None], base.bias.double())
    return torch.nn.functional.linear(x.double(), weight, base.bias.double())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_style_equals_dense_forward(kind):
    layer, selection, factors, adapters = _layer(kind)
    x = _input(kind)
    for index, name in enumerate(NAMES):
        selection.set(factors.style_vector({name: 1.0}))
        exact = _dense_forward(layer, x, adapters[index].layers["layer"].delta_weight())
        assert relative_error(exact, layer(x)) < 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_mixed_batch_equals_separate_forwards(kind):
    layer, selection, factors, _ = _layer(kind)
    x = _input(kind, batch=4)
    specs = [{"ink": 1.0}, {"neon": 0.5, "sepia": 0.5}, {}, {"ink": 0.6}]
    selection.set(torch.stack([factors.style_vector(spec) for spec in specs]))
    mixed = layer(x)
    for row, spec in enumerate(specs):
        selection.set(factors.style_vector(spec) if spec else None)
        alone = layer(x[row : row + 1])
        assert torch.allclose(mixed[row : row + 1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_blend_equals_weighted_sum_of_updates(kind):
    layer, selection, factors, adapters = _layer(kind)
    x = _input(kind)
    selection.set(factors.style_vector({"ink": 0.3, "sepia": 0.7}))
    delta = 0.3 * adapters[0].layers["layer"].delta_weight() + 0.7 * adapters[2].layers["layer"].delta_weight()
    assert relative_error(_dense_forward(layer, x, delta), layer(x)) < 1e-5


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_no_style_is_bit_identical_to_base(kind):
    layer, selection, factors, _ = _layer(kind)
    x = _input(kind)
    reference = layer.base_layer(x)
    selection.set(None)
    assert torch.equal(layer(x), reference)
    # a row with no style inside a styled batch is the base output too
    selection.set(
        torch.stack(
            [
                factors.style_vector({"ink": 1.0}),
                torch.zeros(3, dtype=torch.float64),
                factors.style_vector({"neon": 1.0}),
            ]
        )
    )
    assert torch.equal(layer(x)[1], reference[1])


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_equals_unfused_and_unfuse_restores(kind, dtype):
    layer, selection, factors, _ = _layer(kind, dtype)
    x = _input(kind, dtype=dtype)
    original = layer.base_layer.weight.detach().clone()
    weights = factors.style_vector({"neon": 0.8, "ink": 0.4})
    selection.set(weights)
    unfused = layer(x)
    selection.set(None)
    layer.fuse(weights)
    fused = layer(x)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert relative_error(unfused, fused) < tolerance
    selection.set(weights)
    with pytest.raises(ShareStateError, match="fused"):
        layer(x)
    selection.set(None)
    layer.unfuse()
    if dtype == torch.float32:
        assert relative_error(original, layer.base_layer.weight) < 1e-6
    else:
        assert torch.equal(original, layer.base_layer.weight)  # half precision keeps an exact copy


def test_selection_batch_mismatch_is_a_clear_error():
    layer, selection, factors, _ = _layer("linear")
    selection.set(torch.stack([factors.style_vector({"ink": 1.0})] * 2))
    with pytest.raises(ValueError, match="2 rows but the layer got a batch of 3"):
        layer(_input("linear", batch=3))


@pytest.mark.parametrize(
    "weights, message",
    [
        (torch.ones(1, 1, 1, 3), r"or \(layers, batch, num_styles\), got \(1, 1, 1, 3\)"),
        (torch.ones(2, 1, 3), r"must have one set per layer \(1\), got 2"),
        (torch.tensor([1.0, float("nan"), 0.0]), "must be finite numbers"),
        (torch.tensor([[0.5, float("inf"), 0.0]]), "must be finite numbers"),
        (torch.ones(2, 2), "covers 2 styles but the layers hold 3"),
    ],
)
def test_selection_refuses_bad_weights_and_keeps_the_current_ones(weights, message):
    """A ShareError (still a ValueError for older callers); the selected styles and the layer's output stay."""
    layer, selection, factors, _ = _layer("linear")
    selection.set(factors.style_vector({"ink": 1.0}))
    x = _input("linear")
    before, selected = layer(x), selection.weights
    with pytest.raises(ShareValueError, match=message) as error:
        selection.set(weights)
    assert isinstance(error.value, ShareError) and isinstance(error.value, ValueError)
    assert selection.weights is selected
    assert torch.equal(layer(x), before)


def test_conv_wrapper_refuses_non_pointwise_convolutions():
    with pytest.raises(ShapeMismatchError, match="1x1"):
        ShareLinear(nn.Conv2d(4, 4, kernel_size=3), StyleSelection())


def test_a_padded_pointwise_conv_is_no_target_and_a_refused_inject_changes_nothing():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain = nn.Conv2d(4, 8, kernel_size=1)
            self.padded = nn.Conv2d(8, 8, kernel_size=1, padding=1)  # not linear over channels: a border of bias

    net = Net()
    share = ShareModel.inject(net, target_modules=["plain", "padded"], config=ShareConfig(rank=2, pseudo_rank=1))
    assert set(share.layers) == {"plain"} and type(net.padded) is nn.Conv2d
    share.remove()
    factors = ShareFactors.fit(
        [random_adapter({"plain": (8, 4), "padded": (8, 8)}, 2)], ["ink"], ShareConfig(rank=2, pseudo_rank=1)
    )
    message = r"no nn.Linear or 1x1 nn.Conv2d \(groups=1, no padding\) named 'padded'"
    with pytest.raises(ShapeMismatchError, match=message):
        ShareModel.inject(net, factors)
    assert type(net.plain) is nn.Conv2d and type(net.padded) is nn.Conv2d  # nothing wrapped before the refusal
    assert ShareModel.of(net) is None


def test_inject_and_remove_restore_the_module_tree(tiny_net):
    factors, adapters = _factors()
    x = torch.randn(5, 24)
    reference = tiny_net(x)
    before = [(name, type(module)) for name, module in tiny_net.named_modules()]
    state = {key: value.clone() for key, value in tiny_net.state_dict().items()}
    share = ShareModel.inject(tiny_net, factors)
    assert isinstance(tiny_net.to_q, ShareLinear) and isinstance(tiny_net.mix, ShareLinear)
    assert torch.equal(tiny_net(x), reference)  # no style selected: exactly the base model

    share.set_style("neon")
    styled = tiny_net(x)
    # independent reference: the same net with dW added to each dense weight
    dense = TinyNet()
    with torch.no_grad():
        dense.to_q.weight += adapters[1].layers["to_q"].delta_weight().float()
        dense.to_v.weight += adapters[1].layers["to_v"].delta_weight().float()
        dense.mix.weight += adapters[1].layers["mix"].delta_weight().float()[:, :, None, None]
    assert relative_error(dense(x), styled) < 1e-5

    share.remove()
    assert [(name, type(module)) for name, module in tiny_net.named_modules()] == before
    assert all(torch.equal(value, state[key]) for key, value in tiny_net.state_dict().items())
    assert torch.equal(tiny_net(x), reference)


def test_injecting_twice_is_a_state_error_and_changes_nothing(tiny_net):
    factors, _ = _factors()
    share = ShareModel.inject(tiny_net, factors)
    modules = [(name, id(module)) for name, module in tiny_net.named_modules()]
    with pytest.raises(ShareStateError, match="'to_q' already carries Share factors; remove_share\\(\\) first"):
        ShareModel.inject(tiny_net, factors)
    assert [(name, id(module)) for name, module in tiny_net.named_modules()] == modules
    assert ShareModel.of(tiny_net) is share
    share.remove()


def test_switching_styles_writes_only_the_shared_selection(tiny_net):
    factors, _ = _factors()
    share = ShareModel.inject(tiny_net, factors)
    layers = list(share.layers.values())
    assert all(layer.selection is share.selection for layer in layers)
    versions = share.selection.version
    buffers = [layer.basis_out.data_ptr() for layer in layers]
    share.set_style(["ink", {"neon": 0.5, "sepia": 0.5}, None])
    assert share.selection.version == versions + 1
    assert [layer.basis_out.data_ptr() for layer in layers] == buffers
    assert share.selection.weights.shape == (3, 3)


def test_inject_by_regex_and_bad_targets(tiny_net):
    share = ShareModel.inject(tiny_net, target_modules=r"to_(q|v)", config=ShareConfig(rank=4, pseudo_rank=2))
    assert set(share.layers) == {"to_q", "to_v"}
    share.merge(random_adapter({"to_q": (24, 24)}, 2), "first")
    with pytest.raises(ShapeMismatchError, match="not Share targets"):
        share.merge(random_adapter({"mix": (24, 48)}, 2), "second")
    assert share.style_names == ["first"]
    share.remove()
    with pytest.raises(ShapeMismatchError, match="matches target_modules"):
        ShareModel.inject(tiny_net, target_modules=["nothing_here"])
    wrong, _ = _factors({"to_q": (24, 23)})
    with pytest.raises(ShapeMismatchError, match="size mismatch for to_q"):
        ShareModel.inject(tiny_net, wrong)
    assert not any(isinstance(module, ShareLinear) for module in tiny_net.modules())


def test_style_requests_are_validated(tiny_net):
    factors, _ = _factors()
    share = ShareModel.inject(tiny_net, factors)
    with pytest.raises(StyleError, match="unknown style 'nope'"):
        share.set_style(["ink", "nope"])
    with pytest.raises(ValueError, match="3 styles for a batch of 2"):
        share.set_style(["ink", "neon", None], batch_size=2)
    share.fuse_style({"ink": 0.5})
    with pytest.raises(ShareStateError, match="fused"):
        share.set_style("neon")
    share.unfuse_style()


@pytest.mark.parametrize("center", [False, True])
def test_merge_through_share_model_updates_layers(tiny_net, center):
    factors, adapters = _factors(center=center)
    share = ShareModel.inject(tiny_net, factors)
    x = torch.randn(2, 24)
    new = random_adapter(TINY_SHAPES, 2, seed=11)
    share.merge(new, "fresh")
    share.set_style("fresh")
    dense = TinyNet()
    with torch.no_grad():
        for name, module in (("to_q", dense.to_q), ("to_v", dense.to_v), ("mix", dense.mix)):
            module.weight += new.layers[name].delta_weight().float().reshape(module.weight.shape)
    assert relative_error(dense(x), tiny_net(x)) < 1e-4


def test_casting_the_model_after_injection_keeps_the_style_bank_float32(tiny_net):
    factors, _ = _factors()
    share = ShareModel.inject(tiny_net, factors)
    tiny_net.to(torch.bfloat16)
    layer = share.layers["to_q"]
    assert layer.basis_out.dtype == torch.bfloat16  # the bases follow the model's compute dtype
    assert layer.cores_out.dtype == layer.cores_in.dtype == layer.present.dtype == torch.float32
    blend = {"neon": 0.8, "ink": -0.4}
    reference = layer.base_layer.weight.float() + factors.delta_weight("to_q", blend).float()
    share.fuse_style(blend)  # was: "expected m1 and m2 to have the same dtype" from a bf16 core
    assert relative_error(reference, layer.base_layer.weight.float()) < 1e-2
    share.unfuse_style()


def test_a_fuse_failing_half_way_leaves_the_model_as_it_was(tiny_net, monkeypatch):
    factors, _ = _factors()
    share = ShareModel.inject(tiny_net, factors)
    share.set_style("neon")
    x = torch.randn(2, 24)
    styled = tiny_net(x)
    weights = {name: layer.base_layer.weight.detach().clone() for name, layer in share.layers.items()}
    last = list(share.layers.values())[-1]

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated: no room for the exact copy")

    monkeypatch.setattr(last, "fuse", out_of_memory)
    for exact in (True, False):
        with pytest.raises(torch.OutOfMemoryError, match="simulated"):
            share.fuse_style("ink", exact=exact)
        assert share.fused_style is None
        for name, layer in share.layers.items():
            assert layer.fused_weights is None and layer._unfused_weight is None
            if exact:
                assert torch.equal(layer.base_layer.weight, weights[name]), name
            else:  # subtracted again, as an inexact unfuse does
                assert relative_error(weights[name], layer.base_layer.weight) < 1e-6, name
        # the selection is back: the model still draws "neon"
        assert torch.equal(tiny_net(x), styled) if exact else relative_error(styled, tiny_net(x)) < 1e-5
    monkeypatch.undo()
    share.merge(random_adapter(TINY_SHAPES, 2, seed=12), "after")  # the bank is still usable
    assert share.style_names[-1] == "after"
