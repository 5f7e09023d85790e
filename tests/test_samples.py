"""Every sample runs end to end, so none rots."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_compress_loras_sample(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SAMPLES / "compress_loras.py"), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "9 styles, 4 layers" in result.stdout
    error = float(re.search(r"relative error of the update ([0-9.e+-]+)", result.stdout).group(1))
    assert error < 0.05
    assert (tmp_path / "style-03-exported" / "adapter_config.json").is_file()


def test_flux_styles_sample(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SAMPLES / "flux_styles.py"), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    errors = [float(value) for value in re.findall(r"relative error ([0-9.e+-]+)", result.stdout)]
    assert len(errors) == 3 and max(errors) < 1e-5
    assert (tmp_path / "batch.png").is_file() and (tmp_path / "factors" / "share_config.json").is_file()
    from PIL import Image

    assert Image.open(tmp_path / "batch.png").size == (4 * 4 * 32, 4 * 32)


def test_merge_from_hub_sample(tmp_path, fake_hub):
    """The sample runs unchanged against the local stand-in Hub (HF_ENDPOINT is set by conftest)."""
    from flux_helpers import write_diffusers_lora

    for name, seed in (("ink", 1), ("sepia", 3)):
        fake_hub.add_folder(f"sample-artist/{name}-lora", write_diffusers_lora(tmp_path / name, seed, 4, 8).parent)
    command = [
        sys.executable,
        str(SAMPLES / "merge_from_hub.py"),
        "--lora",
        "sample-artist/ink-lora",
        "--lora",
        "sample-artist/sepia-lora:pytorch_lora_weights.safetensors",
        "-o",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "2 styles saved" in result.stdout and "ink-lora, sepia-lora" in result.stdout
    assert (tmp_path / "out" / "share_config.json").is_file()


def test_merge_from_hub_sample_says_a_missing_lora_in_one_line(tmp_path, fake_hub):
    """A Hub id that cannot be fetched ends the sample with one ``error:`` line, not a HubError traceback."""
    command = [sys.executable, str(SAMPLES / "merge_from_hub.py"), "--lora", "sample-artist/missing-lora", "-o"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([*command, str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "sample-artist/missing-lora" in result.stderr
    assert not (tmp_path / "out").exists()


def test_train_style_sample(tmp_path):
    """The training launch sample: accelerate runs train_share_flux.py, and the new style changes the image."""
    result = subprocess.run(
        [sys.executable, str(SAMPLES / "train_style.py"), "--workdir", str(tmp_path), "--steps", "6"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accelerate.commands.launch" in result.stdout
    assert "styles in the trained factors: ['red-square'] (trained 6 steps)" in result.stdout
    change = float(re.search(r"mean pixel change from the style: ([0-9.]+)", result.stdout).group(1))
    assert change > 1.0
    from PIL import Image

    assert Image.open(tmp_path / "base-vs-style.png").size == (64, 32)


def test_fashion_styles_sample(tmp_path):
    """The demo model's sample: one mixed-style batch, and an exported style equals stock LoRA loading."""
    result = subprocess.run(
        [sys.executable, str(SAMPLES / "fashion_styles.py"), "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "styles: ['inverted', 'tint', 'stripes', 'outlines']" in result.stdout
    from PIL import Image

    assert Image.open(tmp_path / "batch.png").size == (6 * 32 * 4, 3 * 32 * 4)
    difference = float(re.search(r"largest pixel difference: ([0-9.e+-]+)", result.stdout).group(1))
    assert difference < 1e-4
