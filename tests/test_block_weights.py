"""Per-block style weights: the layout of a model's blocks, the mapping rules, and Share against stock
diffusers loading the same LoRA file with its up-factors scaled (or zeroed) block by block."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flux_helpers import (
    flux1_meta_transformer,
    generate,
    run_transformer,
    stock_pipeline,
    transformer_inputs,
    write_diffusers_lora,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from share_diffusers import ShareConfig, ShareFluxPipeline
from share_diffusers.core import StyleError
from share_diffusers.core.block_weights import BlockLayout
from share_diffusers.serving.engine import fold_scale
from share_diffusers.tiny_flux import build_tiny_flux_pipeline

EXACT = ShareConfig(rank=32, pseudo_rank=8)
TINY_BLOCKS = (
    "transformer_blocks.0",
    "transformer_blocks.1",
    "single_transformer_blocks.0",
    "single_transformer_blocks.1",
)


def relative(reference, value) -> float:
    reference, value = torch.as_tensor(reference).double(), torch.as_tensor(value).double()
    return float((reference - value).norm() / reference.norm())


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return write_diffusers_lora(tmp_path_factory.mktemp("block-lora") / "ink", seed=1, rank=4, alpha=8, scale=0.5)


@pytest.fixture(scope="module")
def share_pipe(lora, tmp_path_factory):
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.merge_lora(lora, style_name="ink", config=EXACT)
    other = write_diffusers_lora(tmp_path_factory.mktemp("block-lora-2") / "neon", seed=2, rank=2, alpha=2)
    pipe.merge_lora(other, style_name="neon")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def block_of(key: str) -> str:
    found = re.search(r"(single_transformer_blocks|transformer_blocks)\.(\d+)\.", key)
    return f"{found[1]}.{found[2]}"


def stock_with_block_scales(lora_path, scales: dict[str, float], tmp_path):
    """Stock diffusers + PEFT with the LoRA file's ``lora_B`` of each block multiplied by ``scales[block]``."""
    tensors = load_file(str(lora_path))
    with safe_open(str(lora_path), "pt") as file:
        metadata = file.metadata()  # the adapter's r and lora_alpha: the LoRA's scale
    scaled = {key: value * scales[block_of(key)] if ".lora_B." in key else value for key, value in tensors.items()}
    path = tmp_path / "scaled.safetensors"
    save_file(scaled, str(path), metadata=metadata)
    pipe = stock_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path), adapter_name="scaled")
    return pipe


def test_layout_of_tiny_flux_and_flux1():
    layout = BlockLayout.of(build_tiny_flux_pipeline(0).transformer)
    assert layout.blocks == TINY_BLOCKS
    assert layout.describe() == "double.0-1, single.0-1"
    full = BlockLayout.of(flux1_meta_transformer())
    assert len(full.blocks) == 57  # ComfyUI's Flux block-weight vectors: 19 double then 38 single blocks
    assert full.blocks[18] == "transformer_blocks.18" and full.blocks[19] == "single_transformer_blocks.0"
    assert full.describe() == "double.0-18, single.0-37"


NAMES = [f"{block}.attn.to_q" for block in TINY_BLOCKS] + ["proj_out"]


@pytest.mark.parametrize(
    ("weight", "expected"),
    [
        ({"double": 1.0, "single": 0.3}, [1.0, 1.0, 0.3, 0.3, 0.0]),
        ({"double_blocks.1": 2.0}, [0.0, 2.0, 0.0, 0.0, 0.0]),
        ({"single.0-1": 0.5, "*": 0.25}, [0.25, 0.25, 0.5, 0.5, 0.25]),
        ({"double": 1.0, "double.0-0": -1.0}, [-1.0, 1.0, 0.0, 0.0, 0.0]),  # the more specific key wins
        ({"transformer_blocks": 1.0}, [1.0, 1.0, 0.0, 0.0, 0.0]),  # a prefix stops at a dot
        ([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4, 1.0]),  # a vector; layers outside the blocks keep 1
        # One block beats a range over it in either order of the keys; equal keys: the later one.
        ({"double.0-1": 1.0, "double.1": 0.0}, [1.0, 0.0, 0.0, 0.0, 0.0]),
        ({"double.1": 0.0, "double.0-1": 1.0}, [1.0, 0.0, 0.0, 0.0, 0.0]),
        ({"double.1": 0.5, "transformer_blocks.1": 2.0}, [0.0, 2.0, 0.0, 0.0, 0.0]),
        # A narrower range beats a wider one over it in either order (it went by the order of the keys).
        ({"double.0-1": 1.0, "double.1-1": 0.0}, [1.0, 0.0, 0.0, 0.0, 0.0]),
        ({"double.1-1": 0.0, "double.0-1": 1.0}, [1.0, 0.0, 0.0, 0.0, 0.0]),
        ({"single.0-1": 0.5, "double.1-1": 0.0, "*": 0.25}, [0.25, 0.0, 0.5, 0.5, 0.25]),
    ],
)
def test_multipliers_follow_the_rules(weight, expected):
    layout = BlockLayout.of(build_tiny_flux_pipeline(0).transformer)
    assert layout.multipliers("ink", weight, NAMES) == pytest.approx(expected)


def test_blocks_share_does_not_cover_are_no_error():
    """A vector names every block, and a block key names a real block, even where Share has no layer."""
    layout = BlockLayout.of(build_tiny_flux_pipeline(0).transformer)
    without_double_1 = [name for name in NAMES if not name.startswith("transformer_blocks.1.")]
    assert layout.multipliers("ink", [0.1, 0.2, 0.3, 0.4], without_double_1) == pytest.approx([0.1, 0.3, 0.4, 1.0])
    assert layout.multipliers("ink", {"double.1": 5.0, "single": 1.0}, without_double_1) == [0.0, 1.0, 1.0, 0.0]
    with pytest.raises(StyleError, match="key 'double' of style 'ink' selects no Share layer"):
        layout.multipliers("ink", {"double": 1.0}, NAMES[2:])
    # The server folds style_scale into a vector by rewriting it as the mapping it stands for.
    folded = fold_scale({"ink": [0.1, 0.2, 0.3, 0.4]}, 2.0, layout)["ink"]
    assert layout.multipliers("ink", folded, without_double_1) == pytest.approx([0.2, 0.6, 0.8, 2.0])
    with_base = fold_scale({"ink": [0.5, 0.1, 0.2, 0.3, 0.4]}, 2.0, layout)["ink"]  # a leading BASE value
    assert layout.multipliers("ink", with_base, without_double_1) == pytest.approx([0.2, 0.6, 0.8, 1.0])


def test_vectors_with_a_leading_base_value_as_comfyui_writes_them():
    """ComfyUI Inspire Pack's FLUX vectors: BASE (the layers outside the blocks), 19 double, 38 single."""
    full = BlockLayout.of(flux1_meta_transformer())
    names = [f"{block}.attn.to_q" for block in full.blocks] + ["proj_out"]
    inspire = [0.0] + [1.0] * 19 + [0.5] * 38
    assert full.multipliers("ink", inspire, names) == [1.0] * 19 + [0.5] * 38 + [0.0]
    assert full.multipliers("ink", inspire[1:], names) == [1.0] * 19 + [0.5] * 38 + [1.0]
    assert full.vector_as_mapping("ink", inspire) == {"double.0-18": 1.0, "single.0-37": 0.5, "*": 0.0}
    assert full.vector_as_mapping("ink", inspire[1:], scale=0.5) == {"double.0-18": 0.5, "single.0-37": 0.25, "*": 0.5}
    with pytest.raises(StyleError, match=r"has 56 values; this model has 57 blocks .* \(or 58 with a leading BASE"):
        full.multipliers("ink", inspire[2:], names)


@pytest.mark.parametrize(
    ("weight", "message"),
    [
        (
            {"double.7": 1.0},
            "block weight key 'double.7' of style 'ink' selects no Share layer of this model "
            "(its blocks: double.0-1, single.0-1)",
        ),
        ({"single.1-0": 1.0}, "block range 'single_transformer_blocks.1-0' of style 'ink' runs backwards"),
        (
            {f"double.0.attn.k{index}": 1.0 for index in range(1025)},  # bounded work per request
            "the per-block weights of style 'ink' have 1025 keys; at most 1024",
        ),
        (
            {"single.0-999999999999": 1.0},  # refused before any prefix is listed
            "block range 'single_transformer_blocks.0-999999999999' of style 'ink' runs past the model's last block",
        ),
        (
            {"transformer_blocks.0.attn.0-3": 1.0},
            "block range 'transformer_blocks.0.attn.0-3' of style 'ink': 'transformer_blocks.0.attn' is not a "
            "block list of this model (its blocks: double.0-1, single.0-1)",
        ),
        (
            {"single.0-5": 1.0},
            "block range 'single_transformer_blocks.0-5' of style 'ink' runs past the model's last block "
            "'single_transformer_blocks.1' (its blocks: double.0-1, single.0-1)",
        ),
        ({"double": "1"}, "block weight 'double' of style 'ink' must be a finite number, got '1'"),
        ({"double": float("nan")}, "block weight 'double' of style 'ink' must be a finite number, got nan"),
        (
            [1.0, 1.0],
            "the block-weight vector of style 'ink' has 2 values; this model has 4 blocks "
            "(double.0-1, single.0-1), one value each in that order (or 5 with a leading BASE value",
        ),
    ],
)
def test_bad_block_weights_are_refused_everywhere_and_change_nothing(share_pipe, tmp_path, weight, message):
    share_pipe.set_style("neon")
    selected = share_pipe.share.selection.weights
    for call in (
        lambda: generate(share_pipe, ["a cat"], num_inference_steps=1, style={"ink": weight}),
        lambda: share_pipe.set_style({"ink": weight}),
        lambda: share_pipe.fuse_style({"ink": weight}),
        lambda: share_pipe.export_style_as_lora({"ink": weight}, tmp_path / "x.safetensors"),
    ):
        with pytest.raises(StyleError, match=re.escape(message)):
            call()
    assert share_pipe.share.fused_style is None and share_pipe.share.selection.weights is selected
    assert not (tmp_path / "x.safetensors").exists()
    share_pipe.set_style(None)


def test_huge_block_weight_is_refused(share_pipe):
    with pytest.raises(StyleError, match=r"style 'ink' would get weight 2e\+06"):
        share_pipe.share.set_style({"ink": {"double": 1.0, "single": 2e6}})


@pytest.mark.parametrize(
    ("weight", "scales"),
    [
        ({"double": 1.0, "single": 0.3}, {b: 1.0 if b.startswith("transformer") else 0.3 for b in TINY_BLOCKS}),
        ({"double.1": 1.0}, {b: float(b == "transformer_blocks.1") for b in TINY_BLOCKS}),
        ([0.5, -0.5, 1.5, 0.0], dict(zip(TINY_BLOCKS, [0.5, -0.5, 1.5, 0.0], strict=True))),
    ],
)
def test_per_block_style_equals_stock_diffusers_with_scaled_blocks(share_pipe, lora, tmp_path, weight, scales):
    stock = stock_with_block_scales(lora, scales, tmp_path)
    inputs = transformer_inputs()
    with share_pipe.share.styles({"ink": weight}):
        styled = run_transformer(share_pipe.transformer, inputs)
    expected = run_transformer(stock.transformer, inputs)
    assert relative(expected, styled) < 1e-4
    with share_pipe.share.styles("ink"):
        assert relative(expected, run_transformer(share_pipe.transformer, inputs)) > 1e-3  # per block differs


def test_per_block_styles_per_prompt_in_one_batch(share_pipe, lora, tmp_path):
    """A mixed batch (per-block, plain blend, none) equals separate calls, and the per-block row equals stock."""
    per_block = {"ink": {"double": 1.0, "single": 0.3}, "neon": 0.5}
    styles = [per_block, {"ink": 0.5}, None]
    prompts = ["a photo of a sneaker", "a red cat", "a castle"]
    batch = generate(share_pipe, prompts, seeds=[0, 1, 2], style=styles)
    for index, (prompt, style) in enumerate(zip(prompts, styles, strict=True)):
        alone = generate(share_pipe, [prompt], seeds=[index], style=style)
        np.testing.assert_allclose(batch[index : index + 1], alone, atol=2e-5)
    stock = stock_with_block_scales(
        lora, {b: 1.0 if b.startswith("transformer") else 0.3 for b in TINY_BLOCKS}, tmp_path
    )
    ink_only = generate(share_pipe, [prompts[0]], seeds=[0], style={"ink": {"double": 1.0, "single": 0.3}})
    assert relative(generate(stock, [prompts[0]], seeds=[0]), ink_only) < 1e-4


def test_fuse_and_export_per_block(share_pipe, lora, tmp_path):
    weight = {"ink": {"double": 1.0, "single": 0.3}}
    inputs = transformer_inputs()
    with share_pipe.share.styles(weight, scale=0.8):
        unfused = run_transformer(share_pipe.transformer, inputs)
    share_pipe.fuse_style(weight, style_scale=0.8)
    try:
        assert relative(unfused, run_transformer(share_pipe.transformer, inputs)) < 1e-5
    finally:
        share_pipe.unfuse_style()
    path = share_pipe.export_style_as_lora(weight, tmp_path / "per-block.safetensors")
    stock = stock_pipeline()
    stock.load_lora_weights(str(path))
    with share_pipe.share.styles(weight):
        assert (
            relative(run_transformer(share_pipe.transformer, inputs), run_transformer(stock.transformer, inputs)) < 1e-4
        )


def test_switching_per_block_weights_is_one_batched_product(share_pipe):
    """The per-request work stays one product per layer group: no per-layer Python work per step."""
    share = share_pipe.share
    share.set_style([{"ink": [1.0, 0.0, 0.5, 0.5]}, "neon"])
    weights = share.selection.weights
    assert weights.shape == (len(share.layers), 2, 2)  # (layers, rows, styles)
    blocks = [name.split(".attn")[0] for name in share.layers]
    expected = [dict(zip(TINY_BLOCKS, [1.0, 0.0, 0.5, 0.5], strict=True))[block] for block in blocks]
    assert weights[:, 0, 0].tolist() == pytest.approx(expected)
    assert weights[:, 1].tolist() == [[0.0, 1.0]] * len(share.layers)
    for name, layer in share.layers.items():
        position = list(share.layers).index(name)
        expected_core = layer.blend(weights[position, 0])
        torch.testing.assert_close(layer.blended_cores[0].float(), expected_core, rtol=1e-5, atol=1e-6)
    share.set_style(None)


def test_export_expands_per_block_weights_over_the_layers_it_is_given(share_pipe):
    """Per-layer weights are looked up by name, whatever order the model lists its layers in."""
    from share_diffusers.core.export import style_as_lora

    share = share_pipe.share
    weight = {"ink": [1.0, 0.0, 0.5, 0.25]}
    plain = style_as_lora(share.factors, weight, layout=share.block_layout)
    reordered = style_as_lora(share.factors, weight, layout=share.block_layout, layer_names=list(share.layers)[::-1])
    assert list(plain.layers) == list(reordered.layers)
    for name, layer in plain.layers.items():
        torch.testing.assert_close(layer.up @ layer.down, reordered.layers[name].up @ reordered.layers[name].down)
    assert not any(name.startswith("transformer_blocks.1.") for name in plain.layers)  # weight 0: left out
    with pytest.raises(ValueError, match="layer_names must include every layer of the factors; missing"):
        style_as_lora(share.factors, weight, layout=share.block_layout, layer_names=list(share.layers)[1:])


def test_ranges_over_a_block_list_with_gaps_and_top_level_lists():
    """A ModuleList child without linears is no block: a range may still run over its index."""
    layout = BlockLayout(("blocks.0", "blocks.1", "blocks.3"))
    names = ["blocks.0.fc", "blocks.1.fc", "blocks.3.fc"]
    assert layout.describe() == "blocks.0-3"
    assert layout.multipliers("ink", {"blocks.0-2": 1.0}, names) == [1.0, 1.0, 0.0]
    assert BlockLayout(("0", "1")).describe() == "0-1"  # a model that is itself a ModuleList
