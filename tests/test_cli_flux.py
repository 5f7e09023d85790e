"""``share-diffusers compress`` / ``merge`` on community Flux layouts and Hub ids, loaded by the pipeline;
``export`` loaded by stock diffusers; ``generate`` and its defaults."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from flux_helpers import (
    fused_qkv_lora,
    generate,
    run_transformer,
    stock_pipeline,
    transformer_inputs,
    write_diffusers_lora,
    write_fused_lora,
)
from safetensors.torch import load_file, save_file

from share_diffusers import ShareFluxPipeline
from share_diffusers.cli import build_parser, main
from share_diffusers.runtime import DEMO_DEFAULTS, TINY_RANDOM, TINY_RANDOM_DEFAULTS, call_arguments, defaults_for
from share_diffusers.tiny_flux import build_tiny_flux_pipeline


def test_cli_checkpoint_of_kohya_xlabs_and_hub_loras_loads_in_the_pipeline(tmp_path, fake_hub, capsys):
    kohya = write_fused_lora(tmp_path / "kohya-style.safetensors", fused_qkv_lora(seed=5, rank=3), "kohya", alpha=6)
    xlabs = write_fused_lora(tmp_path / "xlabs-style.safetensors", fused_qkv_lora(seed=6, rank=2), "xlabs")
    ink = write_diffusers_lora(tmp_path / "ink", seed=1, rank=4, alpha=8)
    fake_hub.add_folder("artist/cli-ink", ink.parent)
    out = tmp_path / "factors"
    assert main(["-q", "compress", str(kohya), str(xlabs), "-o", str(out), "-k", "32", "-p", "8"]) == 0
    assert main(["-q", "merge", str(out), "artist/cli-ink", "--name", "ink"]) == 0
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.load_share_factors(out)
    assert pipe.list_styles() == ["kohya-style", "xlabs-style", "ink"]
    inputs = transformer_inputs()
    for style, path in (("kohya-style", kohya), ("xlabs-style", xlabs), ("ink", ink)):
        stock = stock_pipeline()
        stock.load_lora_weights(str(path), adapter_name="x")
        pipe.share.set_style(style)
        expected, got = run_transformer(stock.transformer, inputs), run_transformer(pipe.transformer, inputs)
        assert float((expected - got).norm() / expected.norm()) < 1e-4, style
    pipe.share.set_style(None)
    capsys.readouterr()
    assert main(["-q", "merge", str(out), "artist/does-not-exist"]) == 1
    assert "no Hub repo 'artist/does-not-exist'" in capsys.readouterr().err
    assert torch.equal(run_transformer(pipe.transformer, inputs), run_transformer(stock_pipeline().transformer, inputs))


def test_generate_command_writes_the_styled_image(tmp_path, capsys):
    from PIL import Image

    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.merge_lora(write_diffusers_lora(tmp_path / "ink", seed=1, rank=4, alpha=8), style_name="ink")
    pipe.save_share_factors(tmp_path / "factors")
    args = [
        "-q",
        "generate",
        "--model",
        "tiny-random",
        "--factors",
        str(tmp_path / "factors"),
        "--prompt",
        "a red cat",
        "--steps",
        "2",
        "--seed",
        "0",
    ]
    assert main([*args, "--style", "ink", "-o", str(tmp_path / "ink.png")]) == 0
    assert main([*args, "--style", "none", "-o", str(tmp_path / "base.png")]) == 0

    def expected(style):
        image = pipe(
            prompt="a red cat",
            style=style,
            height=32,
            width=32,
            num_inference_steps=2,
            guidance_scale=3.5,
            generator=torch.Generator().manual_seed(0),
        ).images[0]
        return np.asarray(image)

    assert np.array_equal(np.asarray(Image.open(tmp_path / "ink.png")), expected("ink"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "base.png")), expected(None))
    assert not np.array_equal(expected("ink"), expected(None))
    capsys.readouterr()
    assert main([*args, "--style", "nope", "-o", str(tmp_path / "x.png")]) == 1
    assert "unknown style 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("text", "style_scale", "spec"),
    [
        ("ink[double=1,single=0.3]", "1", {"ink": {"double": 1.0, "single": 0.3}}),
        ("ink[1,-0.5,0,2],neon=0.5", "0.5", {"ink": [1.0, -0.5, 0.0, 2.0], "neon": 0.5}),
    ],
    ids=["mapping", "vector-blend-scaled"],
)
def test_generate_with_per_block_weights_is_the_python_spec(tmp_path, capsys, text, style_scale, spec):
    """``generate --style 'ink[double=1,single=0.3]'`` writes the image of ``pipe(style={"ink": {...}})``."""
    from PIL import Image

    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.merge_lora(write_diffusers_lora(tmp_path / "ink", seed=1, rank=4, alpha=8), style_name="ink")
    pipe.merge_lora(write_diffusers_lora(tmp_path / "neon", seed=2, rank=2, alpha=2), style_name="neon")
    pipe.save_share_factors(tmp_path / "factors")
    output = tmp_path / "styled.png"
    args = ["-q", "generate", "--model", "tiny-random", "--factors", str(tmp_path / "factors"), "--style", text]
    args += ["--style-scale", style_scale, "--prompt", "a red cat", "--steps", "2", "--seed", "0", "-o", str(output)]
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == f"wrote {output} (32x32, style {text})"
    call = dict(prompt="a red cat", height=32, width=32, num_inference_steps=2, guidance_scale=3.5)
    expected = pipe(**call, style=spec, style_scale=float(style_scale), generator=torch.Generator().manual_seed(0))
    assert np.array_equal(np.asarray(Image.open(output)), np.asarray(expected.images[0]))
    plain = {name: 1.0 if isinstance(weight, dict | list) else weight for name, weight in spec.items()}
    other = pipe(**call, style=plain, style_scale=float(style_scale), generator=torch.Generator().manual_seed(0))
    assert not np.array_equal(np.asarray(other.images[0]), np.asarray(expected.images[0]))  # the blocks matter


def test_generate_on_a_quantized_transformer(tmp_path, capsys):
    """``generate --quantize int8``: the image of the int8 transformer with the style, bit for bit."""
    pytest.importorskip("torchao")
    from PIL import Image

    from share_diffusers.core.quantized import is_quantized
    from share_diffusers.quantization import quantize_in_place

    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.merge_lora(write_diffusers_lora(tmp_path / "ink", seed=1, rank=4, alpha=8), style_name="ink")
    pipe.save_share_factors(tmp_path / "factors")
    args = ["-q", "generate", "--model", "tiny-random", "--factors", str(tmp_path / "factors"), "--quantize", "int8"]
    args += ["--prompt", "a red cat", "--steps", "2", "--seed", "0", "--style", "ink", "-o", str(tmp_path / "q.png")]
    assert main(args) == 0
    quantized = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    quantize_in_place(quantized.transformer, "int8")
    quantized.load_share_factors(tmp_path / "factors")
    assert is_quantized(quantized.transformer.transformer_blocks[0].attn.to_q.base_layer)
    call = dict(prompt="a red cat", height=32, width=32, num_inference_steps=2, guidance_scale=3.5)
    expected = quantized(**call, style="ink", generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "q.png")), np.asarray(expected))
    float_image = pipe(**call, style="ink", generator=torch.Generator().manual_seed(0)).images[0]
    assert not np.array_equal(np.asarray(float_image), np.asarray(expected))  # it really ran quantized


@pytest.fixture(scope="module")
def flux_factors(tmp_path_factory):
    """A Share checkpoint of two diffusers Flux LoRAs on the tiny pipeline, and the pipeline holding it."""
    root = tmp_path_factory.mktemp("flux-factors")
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.merge_lora(write_diffusers_lora(root / "ink", seed=1, rank=4, alpha=8), style_name="ink")
    pipe.merge_lora(write_diffusers_lora(root / "sepia", seed=3, rank=2, alpha=2), style_name="sepia")
    pipe.save_share_factors(root / "factors")
    return pipe, root / "factors"


def test_inspect_names_flux_block_groups_in_model_order(flux_factors, capsys):
    capsys.readouterr()
    assert main(["inspect", str(flux_factors[1]), "--similarity"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[lines.index(next(line for line in lines if line.startswith("kept energy"))) + 1]
    assert header.split() == ["style", "double-stream", "blocks", "single-stream", "blocks"]


@pytest.mark.parametrize(
    ("style", "output"),
    [("ink", "ink.safetensors"), ({"ink": 0.5, "sepia": 0.5}, "blend-folder")],
    ids=["file", "blend-as-folder"],
)
def test_exported_flux_style_loads_in_stock_diffusers(tmp_path, flux_factors, capsys, style, output):
    """``export`` of a Flux checkpoint writes what stock ``FluxPipeline.load_lora_weights`` loads: its images
    are the style's images through ShareFluxPipeline."""
    pipe, factors = flux_factors
    text = style if isinstance(style, str) else ",".join(f"{name}={weight}" for name, weight in style.items())
    assert main(["-q", "export", str(factors), text, "-o", str(tmp_path / output)]) == 0
    assert "diffusers Flux LoRA" in capsys.readouterr().out
    file = (
        tmp_path / output if output.endswith(".safetensors") else tmp_path / output / "pytorch_lora_weights.safetensors"
    )
    keys = load_file(file)
    assert keys and all(key.startswith("transformer.") for key in keys)
    stock = stock_pipeline()
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(tmp_path / output))  # a file, or a folder as save_lora_weights writes it
    assert stock.transformer.peft_config  # something was loaded (stock diffusers ignores unknown keys)
    prompts = ["a photo of a sneaker", "a photo of a bag"]
    expected = generate(pipe, prompts, style=style)
    assert np.abs(generate(stock, prompts) - expected).max() < 1e-4
    assert np.abs(generate(pipe, prompts) - expected).max() > 1e-2  # the style changes the images


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("ink[double=1,single=0.3]", {"ink": {"double": 1.0, "single": 0.3}}),
        ("ink[1,0,0.5,2],sepia=0.5", {"ink": [1.0, 0.0, 0.5, 2.0], "sepia": 0.5}),
        ("sepia[double.1=1,*=-0.5]", {"sepia": {"double.1": 1.0, "*": -0.5}}),
    ],
    ids=["mapping", "vector-blend", "range-rest"],
)
def test_export_with_per_block_weights(tmp_path, flux_factors, capsys, text, spec):
    """``export`` of per-block text, with no model loaded (the blocks read off the layer names), writes the
    file ``pipe.export_style_as_lora`` writes for the Python spec; stock diffusers draws the style's images."""
    pipe, factors = flux_factors
    output = tmp_path / "blocks.safetensors"
    assert main(["-q", "export", str(factors), text, "-o", str(output)]) == 0
    assert f"({text}, rank " in capsys.readouterr().out
    reference = load_file(pipe.export_style_as_lora(spec, tmp_path / "reference.safetensors"))
    exported = load_file(output)
    assert exported.keys() == reference.keys()
    assert all(torch.equal(exported[key], reference[key]) for key in reference)
    stock = stock_pipeline()
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(output))
    prompts = ["a photo of a sneaker", "a photo of a bag"]
    np.testing.assert_allclose(generate(stock, prompts), generate(pipe, prompts, style=spec), rtol=0, atol=1e-4)


def test_checkpoint_block_layout_is_the_models(flux_factors):
    """The blocks ``export`` reads off a Flux checkpoint are the ones the model's layout finds (a vector's order)."""
    from share_diffusers.cli import checkpoint_block_layout
    from share_diffusers.core import load_factors

    pipe, factors = flux_factors
    layout = checkpoint_block_layout(load_factors(factors))
    assert layout.blocks == pipe.share.block_layout.blocks
    assert layout.describe() == pipe.share.block_layout.describe() == "double.0-1, single.0-1"


def test_a_flux1_checkpoint_of_single_blocks_takes_flux1_block_weights(tmp_path, capsys):
    """A LoRA of single blocks only: export refused FLUX.1's 57-value vectors and single-block ranges past the
    checkpoint's last block, which the pipeline on FLUX.1 takes; the recorded base model says the blocks."""
    from conftest import random_adapter

    from share_diffusers.core import ShareConfig, ShareFactors, save_factors

    shapes = {f"single_transformer_blocks.{index}.attn.to_q": (8, 8) for index in range(3)}
    for base_model, code in (("black-forest-labs/FLUX.1-dev", 0), (None, 1)):
        factors = ShareFactors.fit(
            [random_adapter(shapes, 2)], ["ink"], ShareConfig(rank=2, pseudo_rank=2), base_model=base_model
        )
        folder = save_factors(factors, tmp_path / str(base_model).replace("/", "-")).parent
        vector = ",".join(["0"] * 19 + ["1", "0.5"] + ["0"] * 36)
        for style in ("ink[single.0-37=1,single.1=0.5,single.2=0]", f"ink[{vector}]"):
            output = tmp_path / "ink.safetensors"
            assert main(["-q", "export", str(folder), style, "-o", str(output)]) == code, capsys.readouterr().err
        if code == 0:  # blocks 0 and 1 at 1 and 0.5; block 2 at 0, so left out
            exported = load_file(output)
            for index, weight in ((0, 1.0), (1, 0.5)):
                name = f"single_transformer_blocks.{index}.attn.to_q"
                up, down = (exported[f"transformer.{name}.lora_{kind}.weight"] for kind in "BA")
                assert torch.allclose(up @ down, weight * factors.delta_weight(name, "ink").float(), atol=1e-6)
            assert not any(".2." in key for key in exported)
        else:
            assert "this model has 3 blocks" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("style", "message"),
    [
        ("ink=0.5,sepia", "blend entry 'sepia' must be name=weight, e.g. ink=0.5"),
        ("ink=nan", "blend weight of 'ink' must be finite, got 'nan'"),
        ("none", "give a style name or a blend like ink=0.5,neon=0.5 to export, not none"),
        ("nope", "unknown style 'nope'"),
        ("ink[double=1", "blend entry 'ink[double=1' has no closing ']'"),
        (
            "ink[double.7=1]",
            "block weight key 'double.7' of style 'ink' selects no Share layer of this model "
            "(its blocks: double.0-1, single.0-1)",
        ),
        ("ink[1,1]", "the block-weight vector of style 'ink' has 2 values; this model has 4 blocks"),
    ],
)
def test_export_refuses_bad_styles_in_one_line(tmp_path, flux_factors, capsys, style, message):
    capsys.readouterr()
    assert main(["-q", "export", str(flux_factors[1]), style, "-o", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.safetensors").exists()


def test_generate_defaults_have_one_source(capsys):
    """``generate --help`` states the defaults the runtime applies (16 steps on the demo model, not 20)."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: {DEMO_DEFAULTS.steps} on the demo model, {TINY_RANDOM_DEFAULTS.steps} on {TINY_RANDOM}" in text
    assert DEMO_DEFAULTS.steps == 16
    assert f"default: {DEMO_DEFAULTS.guidance} on the demo model" in text
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    defaults = defaults_for(pipe, TINY_RANDOM)
    assert call_arguments(pipe, defaults, 1) == dict(
        num_inference_steps=TINY_RANDOM_DEFAULTS.steps, width=32, height=32, guidance_scale=3.5
    )
    assert call_arguments(pipe, defaults, 1, steps=2, guidance=1.0)["num_inference_steps"] == 2


def test_a_model_of_the_demo_architecture_gets_the_demo_defaults(tmp_path):
    """The demo folder given by path (or one train_tiny_flux.py wrote) got FLUX.1's 1024x1024 and 4 steps."""
    from diffusers import FluxPipeline

    from share_diffusers.fashion.model import DEMO_PIPELINE_DIR, build_fashion_flux_components
    from share_diffusers.runtime import load_pipeline

    FluxPipeline(**build_fashion_flux_components(3)).save_pretrained(tmp_path / "my-fashion-flux")
    for folder in (DEMO_PIPELINE_DIR, tmp_path / "my-fashion-flux"):
        pipe = load_pipeline(str(folder), device="cpu")
        assert defaults_for(pipe, str(folder)) == defaults_for(pipe, None)
        assert defaults_for(pipe, None).width == DEMO_DEFAULTS.width == 32
    tiny = build_tiny_flux_pipeline(0, ShareFluxPipeline)  # another architecture: the FLUX.1 defaults
    assert defaults_for(tiny, "someone/flux-like").width == 1024


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--style", "ink=0.5,neon"], "blend entry 'neon' must be name=weight, e.g. ink=0.5"),
        (["--model", "/no/such/folder"], "'/no/such/folder' is neither a local diffusers pipeline folder nor a Hub"),
        (["--model", "{tmp}"], "{tmp} holds no diffusers pipeline (model_index.json missing)"),
        (["--device", "nowhere:0"], "unknown torch device 'nowhere:0'; use e.g. cpu, cuda or cuda:1"),
        (["--quantize", "int4"], "unknown quantization 'int4': choose int8, float8, nf4 or a .gguf file"),
        (["-o", "{tmp}/x"], "-o {tmp}/x: name an image file ending in .png, .jpg, .jpeg, .webp"),
        (
            ["--style", "ink=0.5[double=1]"],
            "blend entry 'ink=0.5[double=1]': give 'ink' a weight (ink=0.5) or per-block weights",
        ),
        (["--seed", "-1"], "the seed must be a whole number from 0 to 4294967295, got -1"),
        (["--seed", str(2**64)], "the seed must be a whole number from 0 to 4294967295, got 18446744073709551616"),
        (["--guidance", "nan"], "guidance must be a finite number from 0, got nan"),  # drew a black image
        # torch's own "Torch not compiled with CUDA enabled" came as an AssertionError traceback, after loading
        pytest.param(
            ["--device", "cuda:0"],
            "device 'cuda:0': this torch is a CPU build; use cpu",
            marks=pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA build of torch"),
        ),
    ],
    ids=[
        "style",
        "missing-folder",
        "not-a-pipeline",
        "device",
        "quantize",
        "no-image-suffix",
        "per-block-style",
        "negative-seed",
        "huge-seed",
        "nan-guidance",
        "cuda-on-a-cpu-build",
    ],
)
def test_generate_refuses_bad_input_before_loading_in_one_line(tmp_path, capsys, extra, message):
    extra = [arg.replace("{tmp}", str(tmp_path)) for arg in extra]
    assert main(["-q", "generate", "--prompt", "a photo of a bag", "-o", str(tmp_path / "x.png"), *extra]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.replace("{tmp}", str(tmp_path))) and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--height", "48"], "the height must be from 4 to 32 pixels on this model, got 48"),
        (["--width", "30"], "the width must be a multiple of 4 (this model's size step), got 30: use 28 or 32"),
    ],
    ids=["past-the-demo-size", "resized-silently"],
)
def test_generate_holds_the_studio_limits(tmp_path, capsys, extra, message):
    """The demo model draws only at its training size (README); generate wrote a 32x48 image before."""
    assert main(["-q", "generate", "--prompt", "a photo of a bag", "-o", str(tmp_path / "x.png"), *extra]) == 1
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "x.png").exists()


def test_default_style_names_are_the_pipelines(tmp_path, capsys):
    """``compress`` / ``merge`` name a LoRA as ``pipe.merge_lora`` does: the folder of a generic
    ``pytorch_lora_weights.safetensors``, a file's own stem otherwise."""
    ink = write_diffusers_lora(tmp_path / "ink", seed=1, rank=4, alpha=8)
    neon = write_diffusers_lora(tmp_path / "neon", seed=2, rank=2, alpha=2)
    sepia = write_diffusers_lora(tmp_path / "sepia", seed=3, rank=2, alpha=2)
    kohya = write_fused_lora(tmp_path / "kohya-style.safetensors", fused_qkv_lora(seed=5, rank=3), "kohya", alpha=6)
    out = tmp_path / "factors"
    assert main(["-q", "compress", str(ink), str(neon), "-o", str(out)]) == 0
    assert main(["-q", "merge", str(out), str(sepia)]) == 0
    assert main(["-q", "merge", str(out), str(kohya)]) == 0
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    expected = [pipe.merge_lora(path).style_name for path in (ink, neon, sepia.parent, kohya)]
    assert expected == ["ink", "neon", "sepia", "kohya-style"]
    loaded = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    loaded.load_share_factors(out)
    assert loaded.list_styles() == expected
    capsys.readouterr()
    other = write_diffusers_lora(tmp_path / "elsewhere" / "ink", seed=4, rank=2, alpha=2)
    assert main(["-q", "compress", str(ink), str(other), "-o", str(tmp_path / "twice")]) == 1
    assert "two LoRAs would both be named 'ink' (after their files or folders); pass --names" in capsys.readouterr().err


@pytest.fixture
def flux_checkpoint(tmp_path):
    """A CLI checkpoint of one diffusers Flux LoRA for FLUX.1-dev, and its bytes on disk."""
    ink = write_diffusers_lora(tmp_path / "ink", seed=1, rank=4, alpha=8)
    out = tmp_path / "factors"
    assert main(["-q", "compress", str(ink), "-o", str(out), "--base-model", "black-forest-labs/FLUX.1-dev"]) == 0
    return out, {path.name: path.read_bytes() for path in out.iterdir()}


def _sd_lora(path):
    """A LoRA of a Stable Diffusion UNet, in PEFT keys."""
    generator = torch.Generator().manual_seed(0)
    layer = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {
            f"{layer}.lora_A.weight": torch.randn(4, 640, generator=generator),
            f"{layer}.lora_B.weight": torch.randn(640, 4, generator=generator),
        },
        str(path),
    )
    return path


def _flux_layers_plus(path, flux_lora, extra: dict):
    """The Flux LoRA's factors in plain PEFT keys (no "transformer." prefix), plus ``extra`` tensors."""
    tensors = {key.removeprefix("transformer."): value for key, value in load_file(flux_lora).items()}
    save_file({**tensors, **extra}, str(path))
    return path


def _peft_folder(path, flux_lora, base_model):
    """The Flux LoRA as a PEFT adapter folder whose config names ``base_model``."""
    path.mkdir()
    tensors = {"base_model.model." + key.removeprefix("transformer."): v for key, v in load_file(flux_lora).items()}
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": base_model}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda tmp, ink: _sd_lora(tmp / "sdxl_style.safetensors"),
            r"{tmp}/sdxl_style.safetensors: none of the LoRA's layers are in the checkpoint: the LoRA has "
            r"'unet\.down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q', the checkpoint "
            r"'single_transformer_blocks\.0\.attn\.to_k', .* \(of 22\); is the LoRA for another model\?",
        ),
        (
            lambda tmp, ink: _flux_layers_plus(
                tmp / "mixed.safetensors",
                ink,
                {
                    "unet.mid_block.to_q.lora_A.weight": torch.ones(2, 8),
                    "unet.mid_block.to_q.lora_B.weight": torch.ones(8, 2),
                },
            ),
            r"{tmp}/mixed.safetensors: the LoRA has layers that are not in a Flux transformer "
            r"\('unet\.mid_block\.to_q'\), and this checkpoint is for one \(its layers: "
            r"'single_transformer_blocks\.0\.attn\.to_k', ",
        ),
        (
            lambda tmp, ink: _peft_folder(tmp / "sdxl-peft", ink, "stabilityai/stable-diffusion-xl-base-1.0"),
            r"{tmp}/sdxl-peft: the LoRA was made for 'stabilityai/stable-diffusion-xl-base-1\.0' but the checkpoint "
            r"holds styles for 'black-forest-labs/FLUX\.1-dev'",
        ),
    ],
    ids=["no-common-layer", "layers-outside-flux", "other-base-model"],
)
def test_merge_refuses_a_lora_for_another_model(tmp_path, flux_checkpoint, capsys, make, message):
    """``merge`` checks the LoRA is for the checkpoint's model before merging: one line naming the file and
    layers on both sides (or both base models); the checkpoint stays as it was and loads in the pipeline."""
    out, before = flux_checkpoint
    source = make(tmp_path, tmp_path / "ink" / "pytorch_lora_weights.safetensors")
    capsys.readouterr()
    assert main(["-q", "merge", str(out), str(source)]) == 1
    err = capsys.readouterr().err
    assert re.fullmatch("error: " + message.replace("{tmp}", re.escape(str(tmp_path))) + ".*\n", err), err
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.load_share_factors(out)
    assert pipe.list_styles() == ["ink"]


def test_merge_takes_a_lora_of_the_same_base_model(tmp_path, flux_checkpoint):
    out, _ = flux_checkpoint
    ink = tmp_path / "ink" / "pytorch_lora_weights.safetensors"
    assert (
        main(["-q", "merge", str(out), str(_peft_folder(tmp_path / "dev-peft", ink, "black-forest-labs/FLUX.1-dev"))])
        == 0
    )
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.load_share_factors(out)
    assert pipe.list_styles() == ["ink", "dev-peft"]


def test_generate_refuses_a_model_folder_of_pickle_weights(tmp_path, capsys, monkeypatch):
    """A local pipeline whose transformer and VAE are ``.bin`` files is refused naming them; nothing is
    unpickled."""
    model = tmp_path / "pickled-flux"
    build_tiny_flux_pipeline(0).save_pretrained(str(model), safe_serialization=False)
    assert (model / "transformer" / "diffusion_pytorch_model.bin").is_file()
    loads = []
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: loads.append(args))
    capsys.readouterr()
    args = ["-q", "generate", "--model", str(model), "--prompt", "a red cat", "-o", str(tmp_path / "x.png")]
    assert main(args) == 1
    assert capsys.readouterr().err == (
        f"error: {model / 'transformer'} holds its weights only as pickle files (diffusion_pytorch_model.bin); "
        "share-diffusers loads .safetensors only, never torch.load (unpickling can run arbitrary code). Convert the "
        "pipeline: load it where you trust the files and save_pretrained(..., safe_serialization=True)\n"
    )
    assert loads == [] and not (tmp_path / "x.png").exists()


def test_generate_with_a_model_the_hub_does_not_have_says_so(tmp_path, fake_hub, capsys, monkeypatch):
    """diffusers' own error for a repo it could not fetch says "not fully cached locally ... Please check out the root
    cause in the stacktrace above" whatever the cause, and no one-line error shows that stack: the cause is said."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    args = ["-q", "generate", "--model", "nobody/no-flux", "--prompt", "a red cat", "-o", str(tmp_path / "x.png")]
    assert main(args) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == "error: no Hub repo 'nobody/no-flux' (or it is private: pass token=...)"
    assert not (tmp_path / "x.png").exists()
    from share_diffusers.hub import HubError

    with pytest.raises(HubError, match=r"^no Hub repo 'nobody/no-flux' \(or it is private"):  # in Python too
        ShareFluxPipeline.from_pretrained("nobody/no-flux")


def test_pipelines_load_with_use_safetensors(monkeypatch):
    """Every ``from_pretrained`` of the runtime asks for safetensors (a Hub repo of .bin files is refused too)."""
    from share_diffusers import runtime

    calls = []

    def record(model, **kwargs):
        calls.append((model, kwargs))
        raise OSError("recorded")

    monkeypatch.setattr(ShareFluxPipeline, "from_pretrained", record)
    monkeypatch.setattr(runtime, "load_quantized_transformer", lambda *args: "quantized transformer")
    for quantize in (None, "int8"):
        with pytest.raises(OSError, match="recorded"):
            runtime.load_pipeline("someone/flux-model", "cpu", "float32", progress=False, quantize=quantize)
    assert [model for model, _ in calls] == ["someone/flux-model"] * 2
    assert all(kwargs["use_safetensors"] is True for _, kwargs in calls)


def test_demo_styles_with_factors_on_the_demo_model_is_refused(tmp_path):
    """``app --demo-styles --factors X`` on the demo model started with X alone, the flag ignored (on
    tiny-random the random demo LoRAs are merged into X)."""
    from share_diffusers.runtime import load_styles

    class Untouched:
        def __getattr__(self, name):
            pytest.fail(f"the pipeline was used ({name})")

    with pytest.raises(ValueError, match=r"--demo-styles with --factors: the demo model's styles are a Share"):
        load_styles(Untouched(), None, str(tmp_path), demo_styles=True)
