"""ShareFluxPipeline against stock diffusers on the tiny Flux pipeline (CPU, no downloads)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flux_helpers import (
    ATTENTION,
    fused_qkv_lora,
    generate,
    run_transformer,
    stock_pipeline,
    transformer_inputs,
    write_diffusers_lora,
    write_fused_lora,
)
from safetensors.torch import load_file, save_file

from share_diffusers import ShareConfig, ShareFluxPipeline
from share_diffusers.core import LoraFormatError, ShapeMismatchError, ShareLinear, ShareStateError, StyleError
from share_diffusers.flux_lora import ALL_LORA_LAYERS
from share_diffusers.tiny_flux import build_tiny_flux_pipeline, save_tiny_flux_pipeline

EXACT = ShareConfig(rank=32, pseudo_rank=8)  # k and p hold every fixture exactly


def relative(reference, value) -> float:
    reference, value = torch.as_tensor(reference).double(), torch.as_tensor(value).double()
    return float((reference - value).norm() / reference.norm())


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux-loras")
    fused = fused_qkv_lora(seed=5, rank=3)
    return {
        "ink": write_diffusers_lora(root / "ink", seed=1, rank=4, alpha=8),
        "neon": write_diffusers_lora(root / "neon", seed=2, rank=2, alpha=2, targets=ATTENTION + ["proj_mlp"]),
        "sepia": write_diffusers_lora(root / "sepia", seed=3, rank=3, alpha=1.5, targets=["to_q", "to_v"]),
        "fused-diffusers": write_fused_lora(root / "fused-diffusers.safetensors", fused, "diffusers", alpha=6),
        "fused-kohya": write_fused_lora(root / "fused-kohya.safetensors", fused, "kohya", alpha=6),
        "fused-xlabs": write_fused_lora(root / "fused-xlabs.safetensors", fused, "xlabs"),
    }


@pytest.fixture
def share_pipe(loras):
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.merge_lora(loras["ink"], style_name="ink", config=EXACT)
    pipe.merge_lora(loras["sepia"], style_name="sepia")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stock_with(*named_files):
    pipe = stock_pipeline()
    pipe.set_progress_bar_config(disable=True)
    for name, path in named_files:
        pipe.load_lora_weights(str(path), adapter_name=name)
    return pipe


@pytest.mark.parametrize("layout", ["diffusers", "kohya", "xlabs"])
def test_style_matches_stock_diffusers_in_every_layout(loras, layout):
    path = loras[f"fused-{layout}"]
    share = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    share.set_progress_bar_config(disable=True)
    report = share.merge_lora(path, style_name="style", config=EXACT)
    assert report.layers_merged == 16 and report.error < 1e-6 and report.outside == {}
    stock = stock_with(("style", path))
    inputs = transformer_inputs()
    share._share.set_style("style")
    assert relative(run_transformer(stock.transformer, inputs), run_transformer(share.transformer, inputs)) < 1e-4
    share._share.set_style(None)
    images = generate(share, ["a photo of a sneaker"], style="style")
    assert relative(generate(stock, ["a photo of a sneaker"]), images) < 1e-4
    # and the LoRA visibly changes the picture (the comparison is not between two base models)
    assert relative(generate(stock_pipeline(), ["a photo of a sneaker"]), images) > 1e-3


def test_peft_written_loras_match_and_mixed_ranks_alphas(share_pipe, loras):
    inputs = transformer_inputs()
    for name in ("ink", "sepia"):
        stock = stock_with((name, loras[name]))
        share_pipe.share.set_style(name)
        assert (
            relative(run_transformer(stock.transformer, inputs), run_transformer(share_pipe.transformer, inputs)) < 1e-4
        )
    share_pipe.share.set_style(None)


def test_mixed_batch_equals_separate_calls(share_pipe):
    prompts = ["a photo of a sneaker", "a red cat", "a castle"]
    styles = ["ink", {"ink": 0.5, "sepia": 0.5}, None]
    batch = generate(share_pipe, prompts, seeds=range(6), style=styles, num_images_per_prompt=2)
    assert batch.shape[0] == 6
    for index, (prompt, style) in enumerate(zip(prompts, styles, strict=True)):
        alone = generate(share_pipe, [prompt], seeds=[2 * index, 2 * index + 1], style=style, num_images_per_prompt=2)
        np.testing.assert_allclose(batch[2 * index : 2 * index + 2], alone, atol=2e-5)


def test_blend_and_strength_equal_stock_set_adapters(share_pipe, loras):
    stock = stock_with(("ink", loras["ink"]), ("sepia", loras["sepia"]))
    prompts = ["a photo of a sneaker"]
    stock.set_adapters(["ink", "sepia"], [0.5, 0.5])
    assert relative(generate(stock, prompts), generate(share_pipe, prompts, style={"ink": 0.5, "sepia": 0.5})) < 1e-4
    stock.set_adapters("ink", 0.6)
    assert relative(generate(stock, prompts), generate(share_pipe, prompts, style={"ink": 0.6})) < 1e-4
    assert relative(generate(stock, prompts), generate(share_pipe, prompts, style="ink", style_scale=0.6)) < 1e-4


def test_joint_attention_kwargs_scale_scales_the_style_as_it_scales_a_stock_lora(share_pipe, loras):
    stock = stock_with(("ink", loras["ink"]))
    prompts = ["a photo of a sneaker"]
    half = {"joint_attention_kwargs": {"scale": 0.5}}
    assert relative(generate(stock, prompts, **half), generate(share_pipe, prompts, style="ink", **half)) < 1e-4
    stock.set_adapters("ink", 0.6)  # the two strengths multiply, in stock diffusers and here
    assert (
        relative(generate(stock, prompts, **half), generate(share_pipe, prompts, style="ink", style_scale=0.6, **half))
        < 1e-4
    )
    with pytest.raises(StyleError, match=r"joint_attention_kwargs\['scale'\] .* must be a number, got 'half'"):
        generate(share_pipe, prompts, style="ink", joint_attention_kwargs={"scale": "half"})


def test_style_none_is_stock_flux_bit_for_bit(share_pipe):
    prompts = ["a photo of a sneaker", "a red cat"]
    stock = stock_pipeline()
    stock.set_progress_bar_config(disable=True)
    assert np.array_equal(generate(stock, prompts), generate(share_pipe, prompts, style=None))
    assert np.array_equal(generate(stock, prompts), generate(share_pipe, prompts))  # no default style set


def test_default_style_applies_when_style_is_omitted(share_pipe):
    prompts = ["a red cat"]
    share_pipe.set_style("sepia")
    assert np.array_equal(generate(share_pipe, prompts), generate(share_pipe, prompts, style="sepia"))
    share_pipe.set_style(None)
    with pytest.raises(StyleError, match="unknown style 'nope'"):
        share_pipe.set_style("nope")


def test_true_cfg_and_prompt_embeds_keep_styles_per_prompt(share_pipe):
    prompts = ["a photo of a sneaker", "a red cat"]
    styles = ["ink", "sepia"]
    cfg = dict(negative_prompt=["blurry", "dark"], true_cfg_scale=2.0)
    batch = generate(share_pipe, prompts, seeds=[0, 1], style=styles, **cfg)
    for index in range(2):
        alone = generate(
            share_pipe,
            [prompts[index]],
            seeds=[index],
            style=styles[index],
            negative_prompt=[cfg["negative_prompt"][index]],
            true_cfg_scale=2.0,
        )
        np.testing.assert_allclose(batch[index : index + 1], alone, atol=2e-5)
    embeds, pooled, _ = share_pipe.encode_prompt(prompt=prompts, prompt_2=None, max_sequence_length=16)
    via_embeds = share_pipe(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        style=styles,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    np.testing.assert_allclose(via_embeds, generate(share_pipe, prompts, style=styles), atol=2e-5)


def test_export_round_trip_through_stock_load_lora_weights(share_pipe, tmp_path):
    inputs = transformer_inputs()
    for style in ("ink", {"ink": 0.3, "sepia": 0.7}):
        path = share_pipe.export_style_as_lora(style, tmp_path / "exported.safetensors")
        stock = stock_with(("exported", path))
        share_pipe.share.set_style(style)
        assert (
            relative(run_transformer(share_pipe.transformer, inputs), run_transformer(stock.transformer, inputs)) < 1e-4
        )
    share_pipe.share.set_style(None)


def test_fuse_equals_unfused_and_unfuse_restores(share_pipe):
    prompts = ["a photo of a sneaker"]
    unfused = generate(share_pipe, prompts, style="ink")
    base = generate(share_pipe, prompts)
    share_pipe.fuse_style("ink")
    assert relative(unfused, generate(share_pipe, prompts)) < 1e-4
    with pytest.raises(ShareStateError, match="fused"):
        generate(share_pipe, prompts, style="sepia")
    share_pipe.unfuse_style()
    assert relative(base, generate(share_pipe, prompts)) < 1e-6


def test_fuse_is_refused_while_a_default_style_is_set(share_pipe):
    """The fuse went through, then every call without style= raised "style 'sepia' is fused; unfuse_style() before
    selecting styles" though the call selected none (the default did)."""
    weights = {name: layer.base_layer.weight.clone() for name, layer in share_pipe.share.layers.items()}
    unfused = generate(share_pipe, ["a red cat"], style="sepia")
    share_pipe.set_style("ink")
    with pytest.raises(ShareStateError, match=r"default style 'ink' is set.*set_style\(None\) before fuse_style"):
        share_pipe.fuse_style("sepia")
    assert share_pipe.share.fused_style is None and share_pipe._default_style == "ink"
    assert all(torch.equal(weights[name], layer.base_layer.weight) for name, layer in share_pipe.share.layers.items())
    share_pipe.set_style(None)
    share_pipe.fuse_style("sepia")
    assert relative(unfused, generate(share_pipe, ["a red cat"])) < 1e-4


def test_merge_report_measures_energy_outside_targets(loras):
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    report = pipe.merge_lora(loras["neon"], style_name="neon", config=EXACT)
    state = load_file(str(loras["neon"]))
    scale = 2 / 2  # alpha / r of the fixture

    def energy(name):
        down = state[f"transformer.{name}.lora_A.weight"].double()
        up = state[f"transformer.{name}.lora_B.weight"].double()
        return float(((scale * up @ down) ** 2).sum())

    layers = sorted({key.removeprefix("transformer.").split(".lora_")[0] for key in state})
    outside = [name for name in layers if "proj_mlp" in name]
    expected = sum(energy(name) for name in outside) / sum(energy(name) for name in layers)
    assert report.outside_energy_fraction == pytest.approx(expected, rel=1e-6)
    assert set(report.outside) == set(outside)
    # widening the targets takes proj_mlp in, and the style then matches stock diffusers exactly
    wide = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    report = wide.merge_lora(loras["neon"], style_name="neon", target_modules=ALL_LORA_LAYERS, config=EXACT)
    assert report.outside == {} and report.layers_merged == len(layers)
    inputs = transformer_inputs()
    wide._share.set_style("neon")
    stock = stock_with(("neon", loras["neon"]))
    assert relative(run_transformer(stock.transformer, inputs), run_transformer(wide.transformer, inputs)) < 1e-4


def _snapshot(pipe):
    inputs = transformer_inputs(batch=1)
    pipe.share.set_style("ink")
    styled = run_transformer(pipe.transformer, inputs)
    pipe.share.set_style(None)
    return pipe.list_styles(), styled, {name: layer.basis_out.clone() for name, layer in pipe._share.layers.items()}


def _bad_files(tmp_path, loras):
    good = load_file(str(loras["ink"]))
    files = {}
    key = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    files["other-model"] = {k: (torch.randn(4, 48) if k == key else v) for k, v in good.items()}
    files["unknown-layout"] = {"model.layers.0.weird_adapter.weight": torch.randn(4, 4)}
    files["nan"] = {k: (v * float("nan") if k == key else v) for k, v in good.items()}
    paths = {}
    for name, tensors in files.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(paths[name]))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(loras["ink"].read_bytes()[:-100])
    paths["truncated"] = truncated
    pickled = tmp_path / "lora.bin"
    pickled.write_bytes(b"\x80\x04not a pickle anyone should open")
    paths["pickle"] = pickled
    return paths


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        (
            "other-model",
            ShapeMismatchError,
            r"size mismatch for transformer_blocks.0.attn.to_q: the LoRA's update is "
            r"\(32, 48\) but the transformer's layer is \(32, 32\)",
        ),
        ("unknown-layout", LoraFormatError, "no LoRA layers in a known layout"),
        ("nan", LoraFormatError, "contains NaN or Inf"),
        ("truncated", LoraFormatError, "truncated or corrupt"),
        ("pickle", LoraFormatError, "never unpickles"),
    ],
)
def test_bad_loras_raise_and_change_nothing(share_pipe, loras, tmp_path, case, error, message):
    before = _snapshot(share_pipe)
    path = _bad_files(tmp_path, loras)[case]
    with pytest.raises(error, match=message):
        share_pipe.merge_lora(path, style_name="bad")
    after = _snapshot(share_pipe)
    assert after[0] == before[0]
    assert torch.equal(after[1], before[1])
    assert all(torch.equal(after[2][name], before[2][name]) for name in before[2])


@pytest.mark.parametrize(("name", "message"), [("ink", "already exists"), ("", "non-empty")])
def test_bad_style_names(share_pipe, loras, name, message):
    with pytest.raises(StyleError, match=message):
        share_pipe.merge_lora(loras["fused-diffusers"], style_name=name)
    assert share_pipe.list_styles() == ["ink", "sepia"]


def test_failed_first_merge_leaves_a_plain_transformer(loras, tmp_path):
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    bad = _bad_files(tmp_path, loras)["other-model"]
    with pytest.raises(ShapeMismatchError):
        pipe.merge_lora(bad, style_name="bad")
    assert pipe.share_factors is None
    assert not any(isinstance(module, ShareLinear) for module in pipe.transformer.modules())


def test_diffusers_lora_api_and_share_refuse_to_mix(share_pipe, loras):
    with pytest.raises(ShareStateError, match="holds Share styles"):
        share_pipe.load_lora_weights(str(loras["ink"]))
    plain = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    plain.load_lora_weights(str(loras["ink"]), adapter_name="ink")
    with pytest.raises(RuntimeError, match="unload_lora_weights"):
        plain.merge_lora(loras["sepia"], style_name="sepia")
    plain.unload_lora_weights()
    plain.merge_lora(loras["sepia"], style_name="sepia")
    assert plain.list_styles() == ["sepia"]


def test_save_load_delete_and_misfit_factors(share_pipe, tmp_path):
    share_pipe.save_share_factors(tmp_path / "factors")
    reloaded = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    reloaded.set_progress_bar_config(disable=True)
    reloaded.load_share_factors(tmp_path / "factors")
    assert reloaded.list_styles() == ["ink", "sepia"]
    prompts = ["a red cat"]
    np.testing.assert_array_equal(
        generate(reloaded, prompts, style="sepia"), generate(share_pipe, prompts, style="sepia")
    )
    reloaded.delete_style("ink")
    assert reloaded.list_styles() == ["sepia"]
    np.testing.assert_allclose(
        generate(reloaded, prompts, style="sepia"), generate(share_pipe, prompts, style="sepia"), atol=1e-6
    )
    # factors for another (wider) transformer are refused before the pipeline changes
    from share_diffusers.core import ShareFactors, save_factors
    from share_diffusers.core.subspace import empty_layer, to_storage

    wrong = ShareFactors(
        EXACT, {"transformer_blocks.0.attn.to_q": to_storage(empty_layer(64, 32, 0, 8, False, False))}, []
    )
    save_factors(wrong, tmp_path / "wrong")
    with pytest.raises(ShapeMismatchError, match=r"size mismatch for transformer_blocks.0.attn.to_q"):
        reloaded.load_share_factors(tmp_path / "wrong")
    assert reloaded.list_styles() == ["sepia"]


def test_pipeline_folder_round_trip_and_switch_without_recompiling(tmp_path, loras):
    save_tiny_flux_pipeline(str(tmp_path / "tiny"))
    pipe = ShareFluxPipeline.from_pretrained(str(tmp_path / "tiny"))
    pipe.merge_lora(loras["ink"], style_name="ink", config=EXACT)
    pipe.merge_lora(loras["sepia"], style_name="sepia")
    inputs = transformer_inputs()
    pipe.share.set_style("ink", batch_size=2)
    eager = run_transformer(pipe.transformer, inputs)
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(pipe.transformer, backend="eager")
    torch._dynamo.config.error_on_recompile = True
    try:
        assert relative(eager, run_transformer(compiled, inputs)) < 1e-6
        # per-block weights too: their (layers, rows, t) selection must not be guarded on either
        for style in ("sepia", {"ink": 0.5, "sepia": 0.5}, ["ink", "sepia"], {"ink": {"double": 1, "single": 0.5}}):
            pipe.share.set_style(style, batch_size=2)
            run_transformer(compiled, inputs)  # raises if switching styles forced a recompile
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def test_text_encoder_part_is_reported_not_merged(loras, tmp_path):
    state = load_file(str(loras["ink"]))
    generator = torch.Generator().manual_seed(4)
    key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    down, up = torch.randn(4, 32, generator=generator), torch.randn(32, 4, generator=generator)
    state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = down, up
    path = tmp_path / "with-text-encoder.safetensors"
    save_file(state, str(path))
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    report = pipe.merge_lora(path, style_name="ink", config=EXACT)
    text_energy = float(((up.double() @ down.double()) ** 2).sum())  # no alpha: scale 1, as diffusers loads it
    transformer_energy = sum(
        # re-saved without diffusers' metadata, so no alpha: scale 1 here too, as stock diffusers would load it
        float(((state[k.replace("lora_A", "lora_B")].double() @ state[k].double()) ** 2).sum())
        for k in state
        if k.startswith("transformer.") and k.endswith("lora_A.weight")
    )
    assert report.outside == pytest.approx({"text_encoder": text_energy / (text_energy + transformer_energy)}, rel=1e-6)
    assert report.layers_merged == 22 and "text_encoder" in str(report)


def test_a_saved_pipeline_folder_loads_in_stock_diffusers(share_pipe, tmp_path):
    """The folder's model_index.json named ShareFluxPipeline: DiffusionPipeline.from_pretrained raised
    "module diffusers has no attribute ShareFluxPipeline"."""
    import json

    from diffusers import DiffusionPipeline, FluxPipeline

    share_pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    prompts = ["a red cat"]
    base = generate(share_pipe, prompts, style=None)
    for cls in (DiffusionPipeline, ShareFluxPipeline):
        reloaded = cls.from_pretrained(tmp_path / "saved")
        reloaded.set_progress_bar_config(disable=True)
        assert type(reloaded) is (FluxPipeline if cls is DiffusionPipeline else ShareFluxPipeline)
        np.testing.assert_allclose(generate(reloaded, prompts), base, atol=1e-6)


def test_a_compiled_transformer_takes_merges_and_factors(loras, tmp_path):
    """``pipe.transformer = torch.compile(pipe.transformer)``, as diffusers documents it: merge_lora said the LoRA
    targets layers "this transformer does not have" and load_share_factors "made for another model" (the compiled
    wrapper names its layers ``_orig_mod.*``), where stock load_lora_weights works."""
    import torch._dynamo

    plain = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    plain.merge_lora(loras["ink"], style_name="ink", config=EXACT)
    plain.merge_lora(loras["sepia"], style_name="sepia")
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    try:
        pipe.merge_lora(loras["ink"], style_name="ink", config=EXACT)
        pipe.merge_lora(loras["sepia"], style_name="sepia")
        pipe.save_share_factors(tmp_path / "factors")
        pipe.load_share_factors(tmp_path / "factors")
        inputs = transformer_inputs()
        for share in (plain.share, pipe.share):  # per-block keys too: the model's blocks are found through the wrapper
            share.set_style(["ink", {"sepia": {"double": 1.0, "single": 0.5}}])
        assert relative(run_transformer(plain.transformer, inputs), run_transformer(pipe.transformer, inputs)) < 1e-5
    finally:
        torch._dynamo.reset()
