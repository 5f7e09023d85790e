"""The embedded demo model: real Fashion-MNIST data, style transforms, shipped pipeline, judges and styles,
and the training scripts that make them."""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from launch_helpers import CPU_ENV, accelerate_launch

from share_diffusers import ShareFluxPipeline
from share_diffusers.continual.report import accuracy_table
from share_diffusers.core import save_factors
from share_diffusers.fashion.data import CLASS_NAMES, FashionDataError, load_fashion_mnist, prompt_for
from share_diffusers.fashion.evaluation import generate, judge_scores
from share_diffusers.fashion.judges import Judge, load_judge, save_judge
from share_diffusers.fashion.model import (
    DEMO_GUIDANCE,
    DEMO_PIPELINE_DIR,
    DEMO_STYLES_DIR,
    build_fashion_flux_components,
    load_demo_pipeline,
)
from share_diffusers.fashion.styles import JUDGE_CLASSES, STYLE_NAMES, apply_style
from share_diffusers.loader import same_base_model
from share_diffusers.pipeline_flux import guidance_arguments
from share_diffusers.tiny_flux import build_tiny_flux_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def demo_pipe():
    return load_demo_pipeline()


@pytest.fixture(scope="module")
def judges():
    return load_judge("classes"), load_judge("styles")


# -- data and styles ----------------------------------------------------------------------------


def test_fashion_mnist_loads_real_photos():
    images, labels = load_fashion_mnist("test", limit=500)
    assert images.shape == (500, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (500,) and set(labels.tolist()) == set(range(10))
    assert images[:, :, :2].max() == 0 and 0.99 < images.max() <= 1.0  # black padding, full range
    assert torch.equal(images[:, 0], images[:, 2])  # grey photos in three channels
    assert prompt_for(7) == "a photo of a sneaker" and prompt_for(9) == "a photo of an ankle boot"
    assert prompt_for(1) == "a photo of trousers" and prompt_for(3) == "a photo of a dress"


def test_fashion_mnist_errors_name_the_file(tmp_path):
    with pytest.raises(FashionDataError, match=r"t10k-images-idx3-ubyte.gz not found: install Debian's"):
        load_fashion_mnist("test", tmp_path)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as file:
        file.write(b"not an idx file at all")
    with pytest.raises(FashionDataError, match="is not an IDX file of 3-d unsigned bytes"):
        load_fashion_mnist("test", tmp_path)
    with pytest.raises(ValueError, match="split must be 'train' or 'test', not 'dev'"):
        load_fashion_mnist("dev")


def test_style_transforms_do_what_their_names_say():
    images, _ = load_fashion_mnist("test", limit=8)
    assert torch.allclose(apply_style(apply_style(images, "inverted"), "inverted"), images)
    tinted = apply_style(images, "tint")
    assert tinted[:, 2].max() < 0.06 and tinted[:, 0].max() > 0.9  # orange: red high, blue nearly none
    striped = apply_style(images, "stripes")
    assert torch.allclose(striped[:, :, 0:3], images[:, :, 0:3]) and torch.allclose(
        striped[:, :, 3:6], 0.2 * images[:, :, 3:6]
    )
    flat = torch.full((1, 3, 32, 32), 0.7)
    assert apply_style(flat, "outlines")[:, :, 1:-1, 1:-1].abs().max() < 1e-6  # no edges inside a flat image
    assert apply_style(images, "outlines").amax(dim=(1, 2, 3)).min() > 0.5  # every garment has an outline
    with pytest.raises(ValueError, match="unknown demo style 'sepia'; known: plain, inverted"):
        apply_style(images, "sepia")


# -- judges -------------------------------------------------------------------------------------


def test_shipped_class_judge_reaches_88_percent_on_the_real_test_split(judges):
    class_judge, style_judge = judges
    images, labels = load_fashion_mnist("test")  # all 10,000 photos of the real test split
    assert (class_judge.predict(images) == labels).float().mean() >= 0.88
    for index, style in enumerate(JUDGE_CLASSES):  # the style judge tells every look of real photos apart
        assert (style_judge.predict(apply_style(images[:500], style)) == index).float().mean() >= 0.95, style


def test_judge_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    judge = Judge(["a", "b", "c"]).eval()
    save_judge(judge, tmp_path / "j.safetensors")
    loaded = load_judge(tmp_path / "j.safetensors")
    images = torch.rand(4, 3, 32, 32)
    assert loaded.labels == ("a", "b", "c") and torch.equal(loaded(images), judge(images))
    with pytest.raises(FileNotFoundError, match="no judge at .*nope.safetensors"):
        load_judge(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="has no 'labels' in its metadata"):
        load_judge(tmp_path / "bare.safetensors")


# -- the shipped pipeline and styles ------------------------------------------------------------


def test_shipped_pipeline_draws_recognisable_classes_and_random_weights_do_not(demo_pipe, judges):
    labels = [0, 1, 5, 7, 8] * 4  # t-shirt, trousers, sandal, sneaker, bag
    trained = generate(demo_pipe, labels, seed=0, num_inference_steps=8)
    random_pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    random_pipe.set_progress_bar_config(disable=True)
    untrained = generate(random_pipe, labels, seed=0, num_inference_steps=8, max_sequence_length=16)
    looks = ["plain"] * len(labels)
    trained_score = judge_scores(*judges, trained, labels, looks)["class_accuracy"]
    random_score = judge_scores(*judges, untrained, labels, looks)["class_accuracy"]
    assert trained_score >= 0.7, trained_score
    assert trained_score >= random_score + 0.4, (trained_score, random_score)


def test_shipped_styles_in_one_mixed_batch(demo_pipe, judges):
    """Every prompt of one batch asks for its own style: the style judge recognises every style, the class
    judge still names most styled garments, and the un-styled prompts are exactly what the base model draws."""
    looks = [None, *STYLE_NAMES]
    labels = [label for label in (7, 1, 8) for _ in looks]  # sneaker, trousers, bag in every look
    styles = looks * 3
    demo_pipe.load_share_factors(DEMO_STYLES_DIR)
    try:
        assert demo_pipe.list_styles() == list(STYLE_NAMES)
        mixed = generate(demo_pipe, labels, styles, seed=0, num_inference_steps=8)
        base = generate(demo_pipe, labels, [None] * len(labels), seed=0, num_inference_steps=8)
    finally:
        demo_pipe.remove_share()
    predicted = [judges[1].labels[index] for index in judges[1].predict(mixed)]
    assert predicted == [style or "plain" for style in styles]
    styled_rows = [i for i, style in enumerate(styles) if style is not None]
    garments = judges[0].predict(mixed[styled_rows])
    assert (garments == torch.tensor([labels[i] for i in styled_rows])).sum() >= 8, garments  # measured: 10 of 12
    plain_rows = [i for i, style in enumerate(styles) if style is None]
    assert torch.allclose(mixed[plain_rows], base[plain_rows], atol=1e-5)
    for style in STYLE_NAMES:
        rows = [i for i, requested in enumerate(styles) if requested == style]
        assert (mixed[rows] - base[rows]).abs().mean() > 0.05, style


def test_generate_command_defaults_to_the_demo_model_and_styles(tmp_path, demo_pipe):
    from PIL import Image

    from share_diffusers.cli import main

    output = tmp_path / "bag.png"
    assert (
        main(["-q", "generate", "--prompt", "a photo of a bag", "--style", "tint", "--steps", "8", "-o", str(output)])
        == 0
    )
    demo_pipe.load_share_factors(DEMO_STYLES_DIR)
    try:
        generator = torch.Generator().manual_seed(0)
        expected = demo_pipe(
            **guidance_arguments(demo_pipe, DEMO_GUIDANCE, 1),
            prompt="a photo of a bag",
            style="tint",
            height=32,
            width=32,
            num_inference_steps=8,
            generator=generator,
        )
    finally:
        demo_pipe.remove_share()
    assert np.array_equal(np.asarray(Image.open(output)), np.asarray(expected.images[0]))


def test_shipped_assets_are_small_and_say_how_they_were_made():
    total = sum(path.stat().st_size for path in DEMO_PIPELINE_DIR.parent.rglob("*") if path.is_file())
    assert total < 16 * 2**20, f"the shipped demo assets take {total / 2**20:.1f} MiB"
    training = json.loads((DEMO_PIPELINE_DIR / "training.json").read_text())
    assert training["photos"] == 60000 and training["loss_every_50_steps"][-1] < training["loss_every_50_steps"][0]


def test_shipped_styles_are_recorded_for_the_shipped_model_wherever_it_is_loaded_from(tmp_path, monkeypatch, caplog):
    """No "made for another model" note for the demo pairing, from any folder; one for a real mismatch."""
    monkeypatch.chdir(tmp_path)  # as a user runs it: the recorded relative path does not exist here
    pipe = ShareFluxPipeline.from_pretrained(DEMO_PIPELINE_DIR)
    with caplog.at_level(logging.INFO, logger="share_diffusers.loader"):
        pipe.load_share_factors(DEMO_STYLES_DIR)
    assert pipe.share_factors.base_model == "share_diffusers/fashion/assets/fashion-flux"
    assert "were made for" not in caplog.text

    factors = pipe.share_factors
    factors.base_model = "someone/another-flux"
    save_factors(factors, tmp_path / "elsewhere")
    with caplog.at_level(logging.INFO, logger="share_diffusers.loader"):
        pipe.load_share_factors(tmp_path / "elsewhere")
    assert f"Share factors were made for someone/another-flux; this pipeline is {DEMO_PIPELINE_DIR}" in caplog.text


@pytest.mark.parametrize(
    ("recorded", "loaded", "same"),
    [
        ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-dev", True),
        ("black-forest-labs/flux.1-dev", "black-forest-labs/FLUX.1-dev", True),  # Hub ids ignore case
        ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell", False),
        ("share_diffusers/fashion/assets/fashion-flux", str(DEMO_PIPELINE_DIR), True),
        ("assets/fashion-flux", str(DEMO_PIPELINE_DIR), True),
        ("other/fashion-flux", str(DEMO_PIPELINE_DIR), False),
        (str(DEMO_PIPELINE_DIR.parent / "other"), str(DEMO_PIPELINE_DIR), False),
        ("share_diffusers/fashion/assets/fashion-flux", None, False),
        (str(DEMO_PIPELINE_DIR), os.path.relpath(DEMO_PIPELINE_DIR), True),  # absolute recorded, relative loaded
    ],
)
def test_same_base_model(recorded, loaded, same):
    assert same_base_model(recorded, loaded) is same


# -- the training scripts -----------------------------------------------------------------------


def test_train_tiny_flux_writes_a_loadable_pipeline_and_resumes_where_it_stopped(tmp_path):
    """16 photos in batches of 8: 2 steps an epoch, so the checkpoint at step 3 sits mid-epoch."""

    def train(out, *extra):
        command = [
            *accelerate_launch(1),
            str(ROOT / "training" / "train_tiny_flux.py"),
            *("--output_dir", str(out), "--train_limit", "16", "--vae_steps", "3", "--vae_batch_size", "8"),
            *("--max_train_steps", "5", "--train_batch_size", "8", "--lr_warmup_steps", "1", *extra),
        ]
        result = subprocess.run(command, cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((out / "training.json").read_text())

    summary = train(tmp_path / "fashion-flux", "--checkpointing_steps", "3")
    assert summary["photos"] == 16 and len(summary["loss_every_50_steps"]) == 1
    checkpoint = tmp_path / "fashion-flux-state" / "checkpoint-3"
    assert (checkpoint / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = ShareFluxPipeline.from_pretrained(str(tmp_path / "fashion-flux"))
    assert pipe.vae.config.scaling_factor == pytest.approx(summary["latent_scale"])
    assert pipe.tokenizer_2.model_max_length == 16
    image = pipe("a photo of a bag", height=32, width=32, num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()

    resumed_summary = train(tmp_path / "resumed", "--resume_from_checkpoint", str(checkpoint))
    resumed = ShareFluxPipeline.from_pretrained(str(tmp_path / "resumed"))
    assert resumed_summary["latent_scale"] == summary["latent_scale"]
    assert resumed_summary["vae_loss_every_50_steps"] == summary["vae_loss_every_50_steps"]
    for name, module in (("vae", pipe.vae), ("transformer", pipe.transformer)):
        other = getattr(resumed, name).state_dict()
        for key, value in module.state_dict().items():
            assert torch.allclose(value, other[key], atol=1e-6), (name, key)
    untrained = build_fashion_flux_components(0)["transformer"]  # the script's initialisation (seed 0)
    assert any(
        not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), untrained.parameters(), strict=True)
    )


def test_train_tiny_flux_names_missing_data(tmp_path):
    command = [sys.executable, str(ROOT / "training" / "train_tiny_flux.py"), "--output_dir", str(tmp_path / "o")]
    result = subprocess.run(
        [*command, "--data_dir", str(tmp_path)], cwd=ROOT, env=CPU_ENV, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path}/train-images-idx3-ubyte.gz not found")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--train_limit", "0"], "--train_limit must be at least 1, got 0"),
        (["--vae_steps", "0"], "--vae_steps must be at least 1, got 0"),
        (["--train_batch_size", "0"], "--train_batch_size must be at least 1, got 0"),
        (["--vae_learning_rate", "nan"], "--vae_learning_rate must be a finite number above 0, got nan"),
        (["--learning_rate", "-1"], "--learning_rate must be a finite number above 0, got -1.0"),
        (["--kl_weight=-1e-5"], "--kl_weight must be a finite number, at least 0, got -1e-05"),
        (["--caption_dropout", "1.5"], "--caption_dropout must be in [0, 1], got 1.5"),
        (["--ema_decay", "2"], "--ema_decay must be in [0, 1], got 2.0"),
        (["--lr_scheduler", "cosine_typo"], "--lr_scheduler 'cosine_typo' is not one of linear, cosine"),
        (["--seed", "-1"], "--seed must be from 0 to "),
        (["--report_to", "nope"], "--report_to 'nope' is not one of accelerate's trackers"),
    ],
)
def test_train_tiny_flux_refuses_bad_options_before_loading_data(tmp_path, extra, message, capsys, monkeypatch):
    """Bad options ran into tracebacks (or trained with them: a caption dropout of 1.5, a negative KL weight)."""
    sys.path.insert(0, str(ROOT / "training"))
    try:
        import train_tiny_flux
    finally:
        sys.path.remove(str(ROOT / "training"))

    def no_data(*args, **kwargs):
        raise AssertionError("the data loaded before the options were checked")

    monkeypatch.setattr(train_tiny_flux, "load_fashion_mnist", no_data)
    assert train_tiny_flux.cli(["--output_dir", str(tmp_path / "o"), *extra]) == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and message in stderr, stderr
    assert not (tmp_path / "o").exists()


def test_make_fashion_styles_writes_captioned_training_folders(tmp_path):
    sys.path.insert(0, str(ROOT / "training"))
    try:
        from make_fashion_styles import main as make_styles
        from train_share_flux import CaptionedImages
    finally:
        sys.path.remove(str(ROOT / "training"))
    assert make_styles(["--output_dir", str(tmp_path), "--per_style", "5", "--styles", "tint", "stripes"]) == 0
    images, labels = load_fashion_mnist("train", limit=10)
    for number, style in enumerate(["tint", "stripes"]):
        data = CaptionedImages(str(tmp_path / style), 32)
        assert len(data) == 5
        pixels, caption, _ = data[2]
        expected = apply_style(images[5 * number + 2 : 5 * number + 3], style)[0] * 2 - 1
        assert (pixels - expected).abs().max() < 1 / 127  # 8-bit PNG of the styled photo
        assert caption == prompt_for(labels[5 * number + 2].item())


def test_accuracy_table_shows_the_secondary_score():
    table = accuracy_table([[0.9], [0.85, 0.95]], ["a", "b"], secondary=[[0.7], [0.71, 0.72]])
    assert "| b | 85.0 ↓5.0 (71.0) | 95.0 (72.0) | 90.0 | -5.0 |" in table
    assert len(CLASS_NAMES) == 10


def test_demo_report_checks_each_target_and_names_fine_tuned_styles():
    sys.path.insert(0, str(ROOT / "training"))
    try:
        from evaluate_fashion_demo import report
    finally:
        sys.path.remove(str(ROOT / "training"))

    def scores(style, klass):
        return {"style_accuracy": style, "class_accuracy": klass}

    results = {
        "styles": ["a", "b"],
        "base": scores(0.0, 0.95),
        "base_per_class": dict.fromkeys(CLASS_NAMES, 0.95),
        "untrained": scores(0.0, 0.1),
        "style_matrix": [[1.0], [0.97, 0.80]],
        "class_matrix": [[0.85], [0.84, 0.86]],
        "lora": {"a": scores(1.0, 0.85), "b": scores(0.89, 0.80)},
        "share_bytes": 700 * 1024,
        "lora_bytes": {"a": 500 * 1024, "b": 500 * 1024},
        "fine_tuned_steps": {"b": 300},
    }
    args = argparse.Namespace(num_inference_steps=16, base_per_class=100, style_per_class=10)
    text = report(results, args)
    assert "| no earlier style falls > 5 points after later ones | worst forgetting 3.0 points | met |" in text
    assert "| Share within 5 points of one LoRA per style | worst gap +9.0 points | **missed** |" in text
    assert "| class accuracy under a style drops <= 15 points | worst drop 11.0 points | met |" in text
    assert "700 KiB (one checkpoint, 0.70x the LoRAs)" in text
    assert "bases after learning (paper Step 3, `--fine_tune_style`): b (300 steps)." in text
    assert "Fine-tuned" not in report({**results, "fine_tuned_steps": {}}, args)
