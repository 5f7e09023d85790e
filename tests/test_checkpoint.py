"""The on-disk format: exact round trip, each kind of corruption refused, atomic saves."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_adapter
from safetensors.torch import load_file, save_file

from share_diffusers.core import ShareCheckpointError, ShareConfig, ShareFactors, load_factors, save_factors
from share_diffusers.core import checkpoint as checkpoint_module

SHAPES = {"blocks.0.to_q": (32, 24), "blocks.1.to_k": (16, 24)}


@pytest.fixture(params=[False, True], ids=["plain", "centered"])
def factors(request):
    adapters = [random_adapter(SHAPES, rank, seed=seed) for seed, rank in enumerate([3, 5])]
    adapters[0].source = {"repo_id": "someone/ink", "revision": "main"}
    config = ShareConfig(rank=6, pseudo_rank=3, center=request.param)
    return ShareFactors.fit(adapters, ["ink", "neon"], config, base_model="tiny/flux")


def _weights_file(directory):
    return directory / json.loads((directory / "share_config.json").read_text())["weights_file"]


def test_round_trip_is_exact(tmp_path, factors):
    save_factors(factors, tmp_path)
    loaded = load_factors(tmp_path)
    assert loaded.style_names == factors.style_names
    assert loaded.base_model == "tiny/flux"
    assert loaded.config == factors.config
    assert loaded.styles[0].source == {"repo_id": "someone/ink", "revision": "main"}
    for name, layer in factors.layers.items():
        other = loaded.layers[name]
        for tensor_name in checkpoint_module.TENSOR_NAMES:
            assert torch.equal(getattr(layer, tensor_name), getattr(other, tensor_name)), tensor_name
        assert (layer.anchor is None) == (other.anchor is None)
        if layer.anchor is not None:
            assert torch.equal(layer.anchor, other.anchor)
    document = json.loads((tmp_path / "share_config.json").read_text())
    assert document["format_version"] == checkpoint_module.FORMAT_VERSION
    assert document["styles"][1]["error"] == pytest.approx(factors.style_error("neon"))


def test_storage_matches_the_formula(tmp_path, factors):
    save_factors(factors, tmp_path)
    tensor_bytes = sum(t.numel() * t.element_size() for t in load_file(_weights_file(tmp_path)).values())
    assert tensor_bytes == factors.storage_numbers() * 4
    # the formula counts bases and cores; summaries add 2 k^2 (+ k^2 anchor) and 2 numbers a style per layer
    extra = sum(
        2 * l.k * l.k + 2 * l.num_styles + (l.k * l.k if l.anchor is not None else 0) for l in factors.layers.values()
    )
    assert factors.storage_numbers() == factors.formula_numbers() + extra


def _corrupt_tensor(path, key, value):
    tensors = load_file(path)
    tensors[key] = value(tensors[key])
    save_file(tensors, path, metadata={"format": "share-diffusers", "format_version": "1"})


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d, w: _corrupt_tensor(w, "blocks.0.to_q.core_in", lambda t: t[:, :, :2].contiguous()),
            r"'blocks.0.to_q.core_in' has shape \(2, 6, 2\), expected \(2, 6, 3\)",
        ),
        (
            lambda d, w: _corrupt_tensor(w, "blocks.1.to_k.basis_out", lambda t: t * float("nan")),
            "'blocks.1.to_k.basis_out' contains NaN or Inf",
        ),
        (
            lambda d, w: save_file({k: v for k, v in load_file(w).items() if k != "blocks.0.to_q.gram_in"}, w),
            "'blocks.0.to_q.gram_in' is missing",
        ),
        (lambda d, w: w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2]), "truncated or corrupt"),
        (lambda d, w: w.unlink(), "which is missing"),
        (lambda d, w: (d / "share_config.json").write_text("{not json"), "not valid JSON"),
        (lambda d, w: _edit_json(d, format_version=99), "format_version 99, newer than"),
        (lambda d, w: _edit_json(d, format_version="one"), "unknown format_version 'one'"),
        (lambda d, w: _edit_json(d, format="something-else"), "not a share-diffusers checkpoint"),
        (lambda d, w: (d / "share_config.json").unlink(), "share_config.json is missing"),
    ],
    ids=[
        "shape",
        "nan",
        "missing-tensor",
        "truncated",
        "missing-file",
        "bad-json",
        "newer",
        "unknown-version",
        "not-ours",
        "no-config",
    ],
)
def test_corrupt_checkpoints_are_refused(tmp_path, factors, damage, message):
    save_factors(factors, tmp_path)
    damage(tmp_path, _weights_file(tmp_path) if (tmp_path / "share_config.json").exists() else None)
    with pytest.raises(ShareCheckpointError, match=message):
        load_factors(tmp_path)


def _edit_json(directory, **changes):
    path = directory / "share_config.json"
    document = json.loads(path.read_text())
    document.update(changes)
    path.write_text(json.dumps(document))


def test_base_model_mismatch_is_refused(tmp_path, factors):
    save_factors(factors, tmp_path)
    with pytest.raises(ShareCheckpointError, match="for base model 'tiny/flux', not 'other/model'"):
        load_factors(tmp_path, base_model="other/model")
    assert load_factors(tmp_path, base_model="tiny/flux").style_names == ["ink", "neon"]


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, factors, monkeypatch):
    save_factors(factors, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    factors.merge(random_adapter(SHAPES, 2, seed=9), "sepia")

    def crash(*args, **kwargs):
        raise OSError("disk full")

    # crash while the tensors are written, then while the JSON is replaced
    for target in ("save_file", "_atomic_write_text"):
        with monkeypatch.context() as patch:
            patch.setattr(checkpoint_module, target, crash)
            with pytest.raises(OSError, match="disk full"):
                save_factors(factors, tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no stray or half-written files
        assert load_factors(tmp_path).style_names == ["ink", "neon"]
    save_factors(factors, tmp_path)
    assert load_factors(tmp_path).style_names == ["ink", "neon", "sepia"]
    assert len(list(tmp_path.glob("*.safetensors"))) == 1  # the old tensor file is cleaned up


def test_interrupted_save_between_files_leaves_a_readable_checkpoint(tmp_path, factors, monkeypatch):
    """A kill after the new tensor file landed but before the JSON commit: the old checkpoint loads."""
    save_factors(factors, tmp_path)
    factors.merge(random_adapter(SHAPES, 2, seed=9), "sepia")

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(checkpoint_module.os, "fsync", killed)  # dies right after the tensor file is written
    with pytest.raises(Killed):
        save_factors(factors, tmp_path)
    monkeypatch.undo()
    assert load_factors(tmp_path).style_names == ["ink", "neon"]


def test_bfloat16_storage_halves_the_bulk_and_reloads_close(tmp_path, factors):
    save_factors(factors, tmp_path / "fp32")
    save_factors(factors, tmp_path / "bf16", dtype=torch.bfloat16)
    size = {kind: _weights_file(tmp_path / kind).stat().st_size for kind in ("fp32", "bf16")}
    # bases and cores take half the bytes; the small float32 summaries stay (header sizes differ by a few bytes)
    bulk = sum(
        getattr(layer, n).numel()
        for layer in factors.layers.values()
        for n in checkpoint_module.FACTOR_NAMES
        if getattr(layer, n) is not None
    )
    assert abs((size["fp32"] - size["bf16"]) - 2 * bulk) < 256
    loaded = load_factors(tmp_path / "bf16")
    assert loaded.storage_dtype == torch.bfloat16
    for name in ("ink", "neon"):
        for layer in SHAPES:
            exact, rounded = factors.delta_weight(layer, name), loaded.delta_weight(layer, name)
            assert 1e-5 < float((exact - rounded).norm() / exact.norm()) < 2e-2
    save_factors(loaded, tmp_path / "again")  # keeps its dtype
    assert json.loads((tmp_path / "again" / "share_config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="storage dtype must be one of"):
        save_factors(factors, tmp_path / "int", dtype=torch.int8)
