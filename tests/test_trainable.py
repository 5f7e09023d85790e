"""Learning a new style from data (temporary factors / coefficients only) and merging it continually."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_SHAPES, TinyNet, random_adapter, relative_error

from share_diffusers.core import ShareConfig, ShareFactors, ShareModel, StyleError
from share_diffusers.core.trainable import (
    attach_style_cores,
    attach_trainable,
    count_parameters,
    detach_trainable,
    lora_parameter_count,
    trained_adapter,
    trained_cores,
)


def _share(tiny_net):
    adapters = [random_adapter(TINY_SHAPES, 3, seed=seed) for seed in range(3)]
    factors = ShareFactors.fit(adapters, ["a", "b", "c"], ShareConfig(rank=16, pseudo_rank=3))  # room to merge
    return ShareModel.inject(tiny_net, factors), adapters


def _outputs_per_style(share, tiny_net, x):
    """``name -> tiny_net(x)`` with each held style selected; leaves no style selected."""
    outputs = {}
    for name in share.style_names:
        share.set_style(name)
        outputs[name] = tiny_net(x).detach()
    share.set_style(None)
    return outputs


def _fit_teacher(share, tiny_net, teacher, steps=300):
    """Regress the Share model on a teacher network's outputs; returns the first and last losses."""
    parameters = [p for module in share.layers.values() for p in module.trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=3e-2)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, 24, generator=generator)
        loss = torch.nn.functional.mse_loss(tiny_net(x), teacher(x).detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses[0], losses[-1]


@pytest.mark.parametrize("coefficients_only", [False, True])
def test_learning_a_style_from_data_and_merging_keeps_earlier_styles(tiny_net, coefficients_only):
    share, adapters = _share(tiny_net)
    x = torch.randn(6, 24)
    before = _outputs_per_style(share, tiny_net, x)
    base = tiny_net(x).detach()
    trainables = attach_trainable(share.layers, pseudo_rank=2, phi=4, coefficients_only=coefficients_only, seed=0)
    sizes = [(layer.out_features, layer.in_features, layer.basis_out.shape[1]) for layer in share.layers.values()]
    assert torch.equal(tiny_net(x), base)  # core_out starts at zero: training starts from the model as it is
    # teacher: the base net with a blend of the existing styles (reachable inside the subspace)
    teacher = TinyNet()
    with torch.no_grad():
        for layer_name, module in (("to_q", teacher.to_q), ("to_v", teacher.to_v), ("mix", teacher.mix)):
            delta = (
                0.7 * adapters[0].layers[layer_name].delta_weight()
                - 0.5 * adapters[2].layers[layer_name].delta_weight()
            )
            module.weight += delta.float().reshape(module.weight.shape)
    first, last = _fit_teacher(share, tiny_net, teacher)
    assert last < 0.2 * first
    trained_output = tiny_net(x).detach()
    adapter = trained_adapter(share.layers, source={"trained_from": "teacher"})
    detach_trainable(share.layers)
    share.merge(adapter, "learned")
    share.set_style("learned")
    assert relative_error(trained_output, tiny_net(x)) < 1e-4  # the merged style is what was trained
    for name, output in before.items():
        share.set_style(name)
        error_bound = max(share.factors.layer_errors(name).values())
        assert relative_error(output, tiny_net(x)) <= 1e-4 + 2 * error_bound
        if coefficients_only:  # the update lies inside the subspace: earlier styles do not move at all
            assert relative_error(output, tiny_net(x)) < 1e-5
    # paper: phi (n + d + 2p) a layer with temporary factors, 2 k p with coefficients only
    if coefficients_only:
        expected = sum(2 * k * 2 for _, _, k in sizes)
        assert expected < lora_parameter_count(share.layers, rank=1)
    else:
        expected = sum(4 * (n + d + 2 * 2) for n, d, _ in sizes)
    assert count_parameters(trainables) == expected


def test_attach_twice_and_coefficients_only_without_basis_are_refused(tiny_net):
    share, _ = _share(tiny_net)
    attach_trainable(share.layers, pseudo_rank=2)
    with pytest.raises(RuntimeError, match="already has factors being trained"):
        attach_trainable(share.layers, pseudo_rank=2)
    detach_trainable(share.layers)
    empty = ShareModel.inject(TinyNet(), target_modules=["to_q"], config=ShareConfig(rank=4, pseudo_rank=2))
    with pytest.raises(ValueError, match="needs an existing subspace"):
        attach_trainable(empty.layers, pseudo_rank=2, coefficients_only=True)
    attach_trainable(empty.layers, pseudo_rank=2, phi=3)  # temporary factors start from random directions
    assert empty.layers["to_q"].trainable.basis_out.shape == (24, 3)


def test_a_refused_attach_leaves_every_layer_untouched(tiny_net):
    # The check used to come layer by layer: layers before the refused one kept trainable factors.
    shapes = {name: shape for name, shape in TINY_SHAPES.items() if name != "mix"}
    factors = ShareFactors.fit([random_adapter(shapes, 3)], ["a"], ShareConfig(rank=8, pseudo_rank=2))
    share = ShareModel.inject(tiny_net, factors, target_modules=["to_q", "to_v", "mix"])
    assert list(share.layers) == ["to_q", "to_v", "mix"]  # "mix" is wrapped but holds no basis
    with pytest.raises(ValueError, match="^mix has no basis yet"):
        attach_trainable(share.layers, pseudo_rank=2, coefficients_only=True)
    assert all(layer.trainable is None for layer in share.layers.values())
    attach_trainable({"to_v": share.layers["to_v"]}, pseudo_rank=2)
    for attach in (
        lambda: attach_trainable(share.layers, pseudo_rank=2),
        lambda: attach_style_cores(share.layers, share.factors, "a"),
    ):
        with pytest.raises(RuntimeError, match="^to_v already has factors being trained"):
            attach()
        assert share.layers["to_q"].trainable is None


def test_fine_tuning_a_held_style_starts_from_it_and_replaces_only_it(tiny_net):
    share, adapters = _share(tiny_net)
    x = torch.randn(6, 24)
    before = _outputs_per_style(share, tiny_net, x)
    bases = {name: layer.basis_out.clone() for name, layer in share.factors.layers.items()}
    trainables = attach_style_cores(share.layers, share.factors, "b")
    assert relative_error(before["b"], tiny_net(x)) < 1e-5  # the trainable cores start as the stored style
    assert count_parameters(trainables) == sum(2 * layer.k * 3 for layer in share.factors.layers.values())
    teacher = TinyNet()
    with torch.no_grad():  # the base net plus style a: b's cores must move to reach it
        for layer_name, module in (("to_q", teacher.to_q), ("to_v", teacher.to_v), ("mix", teacher.mix)):
            module.weight += adapters[0].layers[layer_name].delta_weight().float().reshape(module.weight.shape)
    first, last = _fit_teacher(share, tiny_net, teacher)
    assert last < 0.2 * first
    trained_output = tiny_net(x).detach()
    cores = trained_cores(share.layers)
    detach_trainable(share.layers)
    share.replace_style("b", cores, source={"trained_from": "teacher"})
    share.set_style("b")
    assert relative_error(trained_output, tiny_net(x)) < 1e-5  # the stored style is what was trained
    for name in ("a", "c"):
        share.set_style(name)
        assert torch.equal(before[name], tiny_net(x).detach())
    assert all(torch.equal(bases[name], layer.basis_out) for name, layer in share.factors.layers.items())
    assert share.factors.styles[1].source["fine_tuned"] == {"trained_from": "teacher"}


def test_fine_tuning_refuses_unknown_styles_and_centred_factors(tiny_net):
    share, adapters = _share(tiny_net)
    with pytest.raises(StyleError, match="unknown style 'd'; styles held: 'a', 'b', 'c'"):
        attach_style_cores(share.layers, share.factors, "d")
    centred = ShareFactors.fit(adapters, ["a", "b", "c"], ShareConfig(rank=16, pseudo_rank=3, center=True))
    share = ShareModel.inject(TinyNet(), centred)
    with pytest.raises(StyleError, match="centred factors"):
        attach_style_cores(share.layers, share.factors, "a")
    assert all(layer.trainable is None for layer in share.layers.values())


def test_a_first_style_learned_on_a_conv_exports_as_a_peft_conv_lora(tiny_net, tmp_path):
    from peft import PeftModel

    from share_diffusers.core import style_as_lora
    from share_diffusers.lora_files import save_lora

    share = ShareModel.inject(tiny_net, target_modules=["to_q", "mix"], config=ShareConfig(rank=4, pseudo_rank=2))
    trainables = attach_trainable(share.layers, pseudo_rank=2, phi=2, seed=0)
    with torch.no_grad():
        for trainable in trainables.values():
            trainable.core_out.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 24)
    learned = tiny_net(x).detach()
    adapter = trained_adapter(share.layers)
    assert adapter.layers["mix"].conv and not adapter.layers["to_q"].conv
    detach_trainable(share.layers)
    share.merge(adapter, "learned")
    assert share.factors.conv_layers == {"mix"}
    # exported with (r, d, 1, 1) kernels for the 1x1 conv: stock PEFT loads it (2-D ones were a size mismatch)
    save_lora(style_as_lora(share.factors, "learned"), tmp_path / "peft")
    peft_model = PeftModel.from_pretrained(TinyNet(), tmp_path / "peft")
    assert relative_error(learned, peft_model(x).detach()) < 1e-5
