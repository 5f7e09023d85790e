"""The on-disk format: exact round trip, each kind of corruption refused, atomic saves."""

from __future__ import annotations

import json
import os
import stat
import warnings

import pytest
import torch
from conftest import random_adapter
from safetensors.torch import load_file, save_file

from share_diffusers.core import (
    FactorValueError,
    ShareCheckpointError,
    ShareConfig,
    ShareFactors,
    ShareIOError,
    StyleError,
    load_factors,
    save_factors,
)
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
    # the formula counts bases and cores; summaries add 2 k^2 (+ k^2 anchor) and 3 numbers a style per layer
    # (norm, error, truncated)
    extra = sum(
        2 * l.k * l.k + 3 * l.num_styles + (l.k * l.k if l.anchor is not None else 0) for l in factors.layers.values()
    )
    assert factors.storage_numbers() == factors.formula_numbers() + extra


def test_format_1_checkpoints_load_with_nothing_truncated_and_take_merges(tmp_path, factors):
    """Format 1 had no ``truncated`` tensors (its summaries held the full cores): it loads with zeros, the
    styles as they were, and the next save writes the current format."""
    save_factors(factors, tmp_path)
    weights = _weights_file(tmp_path)
    save_file({key: value for key, value in load_file(weights).items() if not key.endswith(".truncated")}, weights)
    with pytest.raises(ShareCheckpointError, match=r"tensor 'blocks.0.to_q.truncated' is missing"):
        load_factors(tmp_path)
    _edit_json(tmp_path, format_version=1)
    loaded = load_factors(tmp_path)
    for name, layer in loaded.layers.items():
        assert torch.equal(layer.truncated, torch.zeros(2))
        assert torch.equal(layer.gram_out, factors.layers[name].gram_out)
    assert torch.equal(loaded.delta_weight("blocks.0.to_q", "neon"), factors.delta_weight("blocks.0.to_q", "neon"))
    loaded.merge(random_adapter(SHAPES, 2, seed=7), "sepia")
    save_factors(loaded, tmp_path)
    assert json.loads((tmp_path / "share_config.json").read_text())["format_version"] == 2
    assert load_factors(tmp_path).layers["blocks.0.to_q"].truncated[:2].eq(0).all()


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
        (
            lambda d, w: _edit_json(d, dtype="bfloat16"),
            "'blocks.0.to_q.basis_out' has dtype torch.float32, but share_config.json says the bases and cores are "
            "stored in bfloat16",
        ),
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
        "dtype-not-as-described",
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("center", [False, True], ids=["plain", "centered"])
def test_a_half_precision_save_counts_its_rounding_in_the_stored_errors(tmp_path, dtype, center):
    """A lossless bank saved in bfloat16 stored errors of 2e-8 for styles 3.6e-3 off as read (float16: 3.7e-4),
    and later merges started their bound from there. The stored error now bounds the style both as the layer
    applies it (the bases as read) and as a merge starts from it (re-orthonormalised), tightly."""
    from share_diffusers.core.subspace import to_fit

    shapes = {"a": (40, 32), "b": (24, 36)}
    adapters = [random_adapter(shapes, 4, seed=seed) for seed in range(3)]
    factors = ShareFactors.fit(adapters[:2], ["s0", "s1"], ShareConfig(rank=16, pseudo_rank=16, center=center))
    assert max(float(layer.error.max()) for layer in factors.layers.values()) < 1e-6
    save_factors(factors, tmp_path / "half", dtype=dtype)
    loaded = load_factors(tmp_path / "half")
    summary = {
        style["name"]: style["error"]
        for style in json.loads((tmp_path / "half" / checkpoint_module.CONFIG_NAME).read_text())["styles"]
    }

    def applied(bank, layer_name, index, fit=False):
        layer = to_fit(bank.layers[layer_name]) if fit else bank.layers[layer_name]
        return layer.basis_out.double() @ layer.cores().double()[index] @ layer.basis_in.double().T

    for index, name in enumerate(["s0", "s1"]):
        for layer_name in shapes:
            truth = adapters[index].layers[layer_name].delta_weight()
            stored = float(loaded.layers[layer_name].error[index])
            for fit in (False, True):
                actual = float((applied(loaded, layer_name, index, fit) - truth).norm() / truth.norm())
                # 1e-7: the float32 floor the fit's own stored error has (its bases stored in float32)
                assert actual - 1e-7 <= stored <= 2 * actual + 1e-6, (name, layer_name, fit, stored, actual)
        assert summary[name] == pytest.approx(loaded.style_error(name), rel=1e-6) and summary[name] > 1e-4
    loaded.merge(adapters[2], "s2")  # the bound carries through a merge
    for index in range(2):
        for layer_name in shapes:
            truth = adapters[index].layers[layer_name].delta_weight()
            actual = float((applied(loaded, layer_name, index) - truth).norm() / truth.norm())
            assert actual - 1e-7 <= float(loaded.layers[layer_name].error[index])
    save_factors(loaded, tmp_path / "float32", dtype=torch.float32)  # no rounding: the errors as they are
    assert all(
        torch.equal(layer.error, loaded.layers[name].error)
        for name, layer in load_factors(tmp_path / "float32").layers.items()
    )


# -- a checkpoint folder is a closed world (issue 19) -------------------------------------------------


@pytest.mark.parametrize("kind", ["absolute", "parent", "own-json", "subfolder"])
def test_weights_file_must_be_a_plain_name_of_ours(tmp_path, factors, kind):
    """A JSON naming a path (or any file not of the saver's pattern) is refused; saves never delete it."""
    folder = tmp_path / "checkpoint"
    save_factors(factors, folder)
    victim = tmp_path / "victim.safetensors"
    victim.write_bytes(_weights_file(folder).read_bytes())  # a valid tensor file, outside the folder
    (folder / "sub").mkdir()
    inner = folder / "sub" / "share_factors-00000000.safetensors"
    inner.write_bytes(victim.read_bytes())
    name = {
        "absolute": str(victim),
        "parent": "../victim.safetensors",
        "own-json": "share_config.json",
        "subfolder": "sub/share_factors-00000000.safetensors",
    }[kind]
    _edit_json(folder, weights_file=name)
    with pytest.raises(ShareCheckpointError, match="field 'weights_file' must be a plain file name") as caught:
        load_factors(folder)
    assert "never a path" in str(caught.value)
    save_factors(factors, folder)  # reports success and means it
    assert victim.is_file() and inner.is_file()
    assert load_factors(folder).style_names == ["ink", "neon"]
    assert len(list(folder.glob("*.safetensors"))) == 1  # the tensor file the bad JSON hid is removed: it was ours


def test_checkpoint_with_inf_summary_is_refused_naming_the_key(tmp_path, factors):
    save_factors(factors, tmp_path)
    _corrupt_tensor(_weights_file(tmp_path), "blocks.0.to_q.gram_out", lambda t: t * float("inf"))
    with pytest.raises(ShareCheckpointError, match="'blocks.0.to_q.gram_out' contains NaN or Inf"):
        load_factors(tmp_path)


def _edit_style(index, **changes):
    def edit(document):
        document["styles"][index].update(changes)

    return edit


def _edit_layer(**changes):
    def edit(document):
        document["layers"]["blocks.0.to_q"].update(changes)

    return edit


def _set(key, value):
    def edit(document):
        document[key] = value

    return edit


def _set_config(**changes):
    def edit(document):
        document["config"].update(changes)

    return edit


BAD_FIELDS = {
    "weights-number": (_set("weights_file", 5), "field 'weights_file' must be a plain file name"),
    "weights-null": (_set("weights_file", None), "field 'weights_file' must be a plain file name"),
    "styles-string": (_set("styles", "ink,neon"), "field 'styles' must be a list, got 'ink,neon'"),
    "style-number": (_set("styles", [5]), r"field 'styles\[0\]' must be an object, got 5"),
    "style-name-number": (_edit_style(0, name=5), r"field 'styles\[0\].name' must be a string, got 5"),
    "style-name-empty": (_edit_style(1, name=""), "style name must be a non-empty string, got ''"),
    "style-name-duplicate": (_edit_style(1, name="ink"), "a style named 'ink' already exists"),
    "style-rank-string": (_edit_style(0, rank="3"), r"field 'styles\[0\].rank' must be a non-negative integer"),
    "style-source-list": (_edit_style(0, source=[]), r"field 'styles\[0\].source' must be an object"),
    "style-error-nan": (_edit_style(0, error=float("nan")), r"field 'styles\[0\].error' must be a non-negative"),
    "style-unknown-key": (_edit_style(0, colour="red"), r"unknown field 'styles\[0\].colour'"),
    "layers-list": (_set("layers", []), "field 'layers' must be an object"),
    "layer-shape-string": (_edit_layer(shape="32x24"), r"field \"layers\['blocks.0.to_q'\].shape\" must be"),
    "layer-k-float": (_edit_layer(k=2.5), r"layers\['blocks.0.to_q'\].k\" must be an integer from 0 to 24"),
    "layer-k-too-big": (_edit_layer(k=99), r"must be an integer from 0 to 24, got 99"),
    "layer-conv-string": (_edit_layer(conv="yes"), "must be true or false"),
    "config-list": (_set("config", []), "field 'config' must be an object"),
    "config-center-string": (_set_config(center="yes"), "field 'config.center' must be a bool, got 'yes'"),
    "config-rank-bool": (_set_config(rank=True), "field 'config.rank' must be an int, got True"),
    "config-p-zero": (_set_config(pseudo_rank=0), "pseudo_rank p must be >= 1"),
    "config-unknown": (_set_config(alpha=1), "unknown field 'config.alpha'"),
    "dtype-number": (_set("dtype", 3), "field 'dtype' must be one of float32"),
    "dtype-list": (
        _set("dtype", ["float32"]),
        r"field 'dtype' must be one of float32, bfloat16, float16, got \['float32'\]",
    ),
    "base-model-number": (_set("base_model", 7), "field 'base_model' must be a string or null"),
    "targets-string": (_set("target_modules", "to_q"), "field 'target_modules' must be a list"),
}


@pytest.mark.parametrize("case", list(BAD_FIELDS))
def test_json_fields_of_the_wrong_type_are_refused_naming_the_field(tmp_path, factors, case):
    edit, message = BAD_FIELDS[case]
    save_factors(factors, tmp_path)
    document = json.loads((tmp_path / "share_config.json").read_text())
    edit(document)
    (tmp_path / "share_config.json").write_text(json.dumps(document))
    with pytest.raises(ShareCheckpointError, match=message) as caught:
        load_factors(tmp_path)
    assert str(tmp_path / "share_config.json") in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ShareCheckpointError, match=message):
        checkpoint_module.read_document(tmp_path / "share_config.json")  # what the Hub path checks before downloading
    # a save over the malformed JSON commits a good checkpoint and raises nothing afterwards
    save_factors(factors, tmp_path)
    assert load_factors(tmp_path).style_names == ["ink", "neon"]


def test_interrupted_saves_are_cleaned_up_by_the_next_save(tmp_path, factors):
    save_factors(factors, tmp_path)
    current = _weights_file(tmp_path)
    leftovers = [
        ".share_factors-deadbeef.safetensors.tmp",  # killed while writing tensors
        "share_factors-deadbeef.safetensors",  # killed between the tensor rename and the JSON commit
        ".share_config.json.abc123_x.tmp",  # killed while writing the JSON
    ]
    for name in leftovers:
        (tmp_path / name).write_bytes(current.read_bytes())
    unrelated = ["README.md", "share_factors-notes.txt", ".share_factors-x.safetensors", "my.tmp"]
    for name in unrelated:
        (tmp_path / name).write_text("keep me")
    # loads ignore the leftovers, and the checkpoint's files are the JSON and its tensor file only
    assert load_factors(tmp_path).style_names == ["ink", "neon"]
    assert checkpoint_module.checkpoint_files(tmp_path) == [tmp_path / "share_config.json", current]
    save_factors(factors, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["share_config.json", _weights_file(tmp_path).name, *unrelated])
    assert all((tmp_path / name).read_text() == "keep me" for name in unrelated)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_default_mode_for_new_files(tmp_path, factors, umask):
    previous = os.umask(umask)
    try:
        save_factors(factors, tmp_path)
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    for path in checkpoint_module.checkpoint_files(tmp_path):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name


def test_unsavable_factors_are_refused_before_writing(tmp_path, factors):
    factors.layers["blocks.0.to_q"].core_out[0, 0, 0] = float("inf")
    with pytest.raises(FactorValueError, match="'blocks.0.to_q.core_out' holds NaN or Inf"):
        save_factors(factors, tmp_path / "new")
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())
    factors.layers["blocks.0.to_q"].core_out[0, 0, 0] = 1e6  # fine in float32, overflows float16
    with pytest.raises(FactorValueError, match="holds NaN or Inf in torch.float16; save in float32"):
        save_factors(factors, tmp_path / "half", dtype=torch.float16)
    factors.styles[1].name = "ink"
    with pytest.raises(StyleError, match="cannot save: a style named 'ink' already exists"):
        save_factors(factors, tmp_path / "names")
    factors.styles[1].name = " "
    with pytest.raises(StyleError, match="cannot save: style name must be a non-empty string, got ' '"):
        save_factors(factors, tmp_path / "names")
    assert not (tmp_path / "names").exists()


@pytest.mark.parametrize("failure", ["folder", "write"])
def test_a_failed_save_leaves_the_storage_dtype(tmp_path, factors, monkeypatch, failure):
    """``factors.storage_dtype`` follows a save only once it is committed: a refused bfloat16 save does not make
    the next plain save bfloat16."""
    if failure == "folder":
        (tmp_path / "a-file").write_text("")
        target = tmp_path / "a-file" / "sub"  # a folder cannot be made under a file
    else:
        target = tmp_path / "full-disk"

        def no_space(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(checkpoint_module, "save_file", no_space)
    with pytest.raises(checkpoint_module.ShareIOError, match="cannot"):
        save_factors(factors, target, dtype=torch.bfloat16)
    assert factors.storage_dtype == torch.float32
    monkeypatch.undo()
    save_factors(factors, tmp_path / "next")
    assert json.loads((tmp_path / "next" / "share_config.json").read_text())["dtype"] == "float32"
    assert {t.dtype for t in load_file(_weights_file(tmp_path / "next")).values()} == {torch.float32}
    save_factors(factors, tmp_path / "half", dtype=torch.bfloat16)  # a committed save does set it
    assert factors.storage_dtype == torch.bfloat16
    assert load_factors(tmp_path / "half").storage_dtype == torch.bfloat16


OLD_NAMES = {"ink": "ghibli, watercolor", "neon": "neon=v2"}  # names a previous release wrote


def _with_old_names(directory):
    """The checkpoint in ``directory`` as the previous release wrote it: style names the style syntax cannot address."""
    document = json.loads((directory / "share_config.json").read_text())
    for style in document["styles"]:
        style["name"] = OLD_NAMES[style["name"]]
    (directory / "share_config.json").write_text(json.dumps(document))


def test_checkpoint_with_old_style_names_loads_warns_and_renames(tmp_path, factors):
    """The previous release's names (same format version) load with a warning that says how to rename them; new
    names still follow the rule; after renaming, the styles are the original ones under their new names."""
    save_factors(factors, tmp_path)
    _with_old_names(tmp_path)
    with pytest.warns(checkpoint_module.UnaddressableStyleNameWarning) as caught:
        loaded = load_factors(tmp_path)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 2
    assert "style name 'ghibli, watercolor' contains ','" in messages[0]
    assert f"share-diffusers rename {tmp_path} 'ghibli, watercolor' NEW_NAME" in messages[0]
    assert "factors.rename_style('ghibli, watercolor', 'NEW_NAME')" in messages[0]
    assert "style name 'neon=v2' contains '='" in messages[1]
    assert loaded.style_names == ["ghibli, watercolor", "neon=v2"]
    layer = "blocks.0.to_q"
    assert torch.equal(loaded.delta_weight(layer, "ghibli, watercolor"), factors.delta_weight(layer, "ink"))

    with pytest.raises(StyleError, match="style name 'ghibli; watercolor, v2' contains ','"):
        loaded.rename_style("ghibli, watercolor", "ghibli; watercolor, v2")  # a new name follows the rule
    loaded.rename_style("ghibli, watercolor", "ghibli watercolor")
    save_factors(loaded, tmp_path)  # one name renamed, the other still old: the save keeps it as it is
    with pytest.warns(checkpoint_module.UnaddressableStyleNameWarning, match="neon=v2") as caught:
        again = load_factors(tmp_path)
    assert len(caught) == 1
    again.rename_style("neon=v2", "neon v2")
    save_factors(again, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        renamed = load_factors(tmp_path)
    assert renamed.style_names == ["ghibli watercolor", "neon v2"]
    for name, old in zip(renamed.style_names, ["ink", "neon"], strict=True):
        for layer in factors.layers:
            assert torch.equal(renamed.delta_weight(layer, name), factors.delta_weight(layer, old)), (name, layer)
    blend = {"ghibli watercolor": 0.5, "neon v2": 0.5}
    assert torch.equal(renamed.delta_weight(layer, blend), factors.delta_weight(layer, {"ink": 0.5, "neon": 0.5}))


def test_concurrent_saves_into_one_folder_leave_a_loadable_checkpoint(tmp_path, factors):
    """Saves take turns on the folder, so one save's cleanup never removes another's fresh tensor file."""
    import threading

    errors = []

    def save_repeatedly():
        try:
            for _ in range(5):
                save_factors(factors, tmp_path)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=save_repeatedly) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert load_factors(tmp_path).style_names == ["ink", "neon"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["share_config.json", _weights_file(tmp_path).name]


# -- found by trying to break it: concurrent edits, a full disk, look-alike names, hostile JSON --------------------


def test_two_edits_of_one_checkpoint_at_once_do_not_lose_one(tmp_path, factors):
    """Two ``share-diffusers merge`` of one folder: each loaded, edited and saved, and the second save dropped the
    first one's style with both commands reporting success."""
    save_factors(factors, tmp_path)
    first, second = load_factors(tmp_path), load_factors(tmp_path)
    first.merge(random_adapter(SHAPES, 2, seed=7), "ocean")
    save_factors(first, tmp_path)
    save_factors(first, tmp_path)  # the same factors saved again: their own save is the version on disk
    second.merge(random_adapter(SHAPES, 2, seed=8), "forest")
    committed = _weights_file(tmp_path).read_bytes()
    with pytest.raises(ShareIOError, match="another save changed it after these factors were loaded"):
        save_factors(second, tmp_path)
    assert _weights_file(tmp_path).read_bytes() == committed
    assert load_factors(tmp_path).style_names == ["ink", "neon", "ocean"]
    save_factors(second, tmp_path / "elsewhere")  # another folder: nothing to lose there
    assert load_factors(tmp_path / "elsewhere").style_names == ["ink", "neon", "forest"]


def test_a_full_disk_while_writing_tensors_is_one_line_and_changes_nothing(tmp_path, factors, monkeypatch):
    from safetensors import SafetensorError

    from share_diffusers.core import style_as_lora
    from share_diffusers.lora_files import save_lora

    save_factors(factors, tmp_path)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(checkpoint_module, "save_file", full)
    with pytest.raises(ShareIOError, match=r"No space left on device.*; the previous one is unchanged"):
        save_factors(load_factors(tmp_path), tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    monkeypatch.setattr("safetensors.torch.save_file", full)
    with pytest.raises(ShareIOError, match=r"cannot write the LoRA to .*out.safetensors \(.*No space left"):
        save_lora(style_as_lora(factors, "ink"), tmp_path / "out.safetensors")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("ink\u200b", "invisible or non-UTF-8 character '\\\\u200b'"),
        ("caf\udce9", "invisible or non-UTF-8 character '\\\\udce9'"),
        ("ne\u0301on", "the same text in another Unicode form"),  # NFD of an NFC name held
    ],
)
def test_look_alike_and_unwritable_style_names_are_refused(factors, name, message):
    factors.rename_style("neon", "néon")
    with pytest.raises(StyleError, match=message):
        factors.merge(random_adapter(SHAPES, 2, seed=7), name)
    assert factors.style_names == ["ink", "néon"]
    assert factors.style_index("ne\u0301on") == 1  # typed in the other form, still found


@pytest.mark.parametrize(
    "text", ['{"format": ' + "[" * 100_000 + "]" * 100_000 + "}", '{"format_version": ' + "9" * 5000 + "}"]
)
def test_hostile_json_is_a_checkpoint_error(tmp_path, factors, text):
    save_factors(factors, tmp_path)
    (tmp_path / "share_config.json").write_text(text)
    with pytest.raises(ShareCheckpointError, match="share_config.json is not valid JSON"):
        load_factors(tmp_path)


def test_an_exported_blend_is_labelled_as_written(factors):
    """A negative weight was labelled '0.5*ink+-0.7*neon' in the exported LoRA's metadata."""
    from share_diffusers.core import style_as_lora

    assert style_as_lora(factors, {"ink": 0.5, "neon": -0.7}).source["share_style"] == "0.5*ink-0.7*neon"
    assert style_as_lora(factors, {"neon": -1, "ink": 2}).source["share_style"] == "-1*neon+2*ink"
    assert style_as_lora(factors, "ink").source["share_style"] == "ink"
