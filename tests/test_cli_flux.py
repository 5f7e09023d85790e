"""``share-diffusers compress`` / ``merge`` on community Flux layouts and Hub ids, loaded by the pipeline."""

from __future__ import annotations

import numpy as np
import torch
from flux_helpers import (
    fused_qkv_lora,
    run_transformer,
    stock_pipeline,
    transformer_inputs,
    write_diffusers_lora,
    write_fused_lora,
)

from share_diffusers import ShareFluxPipeline
from share_diffusers.cli import main
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
