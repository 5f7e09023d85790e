"""The command line end to end on adapters written by PEFT itself, including bad input."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TinyNet, relative_error, write_peft_adapter
from peft import PeftModel
from safetensors.torch import load_file, save_file

from share_diffusers.cli import main
from share_diffusers.core import load_factors, save_factors
from share_diffusers.core.errors import ShareCheckpointError
from share_diffusers.lora_files import load_lora, save_lora


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [write_peft_adapter(root / f"style{i}", seed=i, rank=[4, 4, 2][i], alpha=[8, 4, 2][i]) for i in range(3)]


def run_cli(*args):
    return main([str(arg) for arg in args])


def _peft_delta(adapter_dir, layer):
    """dW of a PEFT adapter as PEFT itself applies it: merged weight minus base weight."""
    base = TinyNet()
    model = PeftModel.from_pretrained(TinyNet(), adapter_dir).merge_and_unload()
    return (
        (model.get_submodule(layer).weight - base.get_submodule(layer).weight)
        .detach()
        .reshape(base.get_submodule(layer).weight.shape[0], -1)
    )


def test_compress_inspect_merge_export_end_to_end(tmp_path, peft_adapters, capsys):
    out = tmp_path / "ckpt"
    assert run_cli("-q", "compress", *peft_adapters[:2], "-o", out, "-k", 10, "-p", 4, "--names", "ink", "neon") == 0
    factors = load_factors(out)
    assert factors.style_names == ["ink", "neon"]
    for adapter, name in zip(peft_adapters[:2], ["ink", "neon"], strict=True):
        for layer in ("to_q", "to_v", "mix"):
            assert relative_error(_peft_delta(adapter, layer), factors.delta_weight(layer, name)) < 1e-5

    assert run_cli("-q", "merge", out, peft_adapters[2], "--name", "sepia") == 0
    factors = load_factors(out)
    assert factors.style_names == ["ink", "neon", "sepia"]
    assert relative_error(_peft_delta(peft_adapters[2], "to_v"), factors.delta_weight("to_v", "sepia")) < 1e-5

    capsys.readouterr()
    assert run_cli("inspect", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert [style["name"] for style in info["styles"]] == ["ink", "neon", "sepia"]
    assert all(style["error"] < 1e-5 for style in info["styles"])
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in out.iterdir())
    assert run_cli("inspect", out) == 0
    assert "sepia" in capsys.readouterr().out

    # export as a PEFT folder: stock PeftModel reproduces the Share weights
    exported = tmp_path / "neon-peft"
    assert run_cli("export", out, "neon", "-o", exported) == 0
    for layer in ("to_q", "to_v", "mix"):
        assert relative_error(factors.delta_weight(layer, "neon"), _peft_delta(str(exported), layer)) < 1e-5
    # and as a diffusers-style .safetensors file, blend included
    blend_file = tmp_path / "blend.safetensors"
    assert run_cli("export", out, "ink=0.5,sepia=0.5", "-o", blend_file) == 0
    reread = load_lora(blend_file)
    expected = factors.delta_weight("to_q", {"ink": 0.5, "sepia": 0.5})
    assert relative_error(expected, reread.layers["to_q"].delta_weight()) < 1e-5
    # not a Flux checkpoint: the model's own module names, no "transformer." prefix
    assert sorted(load_file(blend_file)) == sorted(
        f"{layer}.lora_{ab}.weight" for layer in factors.layers for ab in "AB"
    )


def test_inspect_marks_fine_tuned_styles_and_a_checkpoint_larger_than_its_sources(tmp_path, peft_adapters, capsys):
    out = tmp_path / "ckpt"
    assert run_cli("-q", "compress", peft_adapters[0], "-o", out, "-k", 8, "-p", 4, "--names", "ink") == 0
    factors = load_factors(out)
    layer = factors.layers["to_q"]
    factors.replace_style("ink", {"to_q": (layer.core_out[0] * 2, layer.core_in[0])}, source={"steps": 7})
    save_factors(factors, out)
    capsys.readouterr()
    assert run_cli("inspect", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["styles"][0]["fine_tuned_steps"] == 7 and info["compression"] < 1  # one rank-4 LoRA kept at k=8
    assert run_cli("inspect", out) == 0
    text = capsys.readouterr().out
    assert re.search(r"ink +4 +\S+ +\S*style0\S* \(fine-tuned 7 steps\)", text), text
    assert f"{1 / info['compression']:.1f}x the size of the sources" in text


def test_inspect_counts_only_the_checkpoint_files(tmp_path, peft_adapters, capsys):
    """Orphans of an interrupted save (and unrelated files) in the folder are not the checkpoint's size."""
    out = tmp_path / "ckpt"
    assert run_cli("-q", "compress", peft_adapters[0], "-o", out, "-k", 8, "-p", 4, "--names", "ink") == 0
    weights_file = json.loads((out / "share_config.json").read_text())["weights_file"]
    expected = (out / "share_config.json").stat().st_size + (out / weights_file).stat().st_size
    capsys.readouterr()
    assert run_cli("inspect", out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["bytes_on_disk"] == expected

    save_file({"x": torch.zeros(1000)}, str(out / "share_factors-0123abcd.safetensors"))  # orphan tensor file
    (out / f".{weights_file}.tmp").write_bytes(b"\0" * 5000)  # an interrupted save's temporary file
    (out / "notes.txt").write_text("not part of the checkpoint")
    assert run_cli("inspect", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bytes_on_disk"] == expected
    assert run_cli("inspect", out) == 0
    assert f"storage: {expected:,} bytes on disk" in capsys.readouterr().out


def test_console_script_reports_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "share_diffusers.cli", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: no Share checkpoint folder at {tmp_path / 'missing'}"
    assert "Traceback" not in result.stderr


def test_commands_print_only_their_own_lines(tmp_path, peft_adapters):
    """Fresh processes (import notes come once a process) with the quant extra's torchao installed, as
    setup.sh installs it: no other library's import notes on stderr (torchao kernels for other Pythons,
    torch's pytree deprecation, diffusers' torchao note, transformers' PIL fallback). LoRAs of other models
    do not import diffusers at all (seconds of imports); a Flux LoRA does, quietly."""
    from flux_helpers import write_diffusers_lora

    def compress(*sources, output):
        script = (
            "import sys; from share_diffusers.cli import main; "
            f"code = main(['-q', 'compress', *{[str(source) for source in sources]!r}, '-o', {str(output)!r}]); "
            "print('diffusers imported:', 'diffusers' in sys.modules); sys.exit(code)"
        )
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        return result.stdout

    out = compress(*peft_adapters, output=tmp_path / "c")
    assert out.startswith("3 styles, 3 layers") and out.endswith("diffusers imported: False\n")
    flux_lora = write_diffusers_lora(tmp_path / "ink", seed=1, rank=4, alpha=8)
    assert compress(flux_lora, output=tmp_path / "flux").endswith("diffusers imported: True\n")


@pytest.mark.parametrize("name", ["ShareFluxPipeline", "build_tiny_flux_pipeline", "MergeReport"])
def test_importing_the_pipeline_prints_nothing(name):
    """README's first line, ``from share_diffusers import ShareFluxPipeline``, in a fresh process: printed seven
    lines of torchao, torch and transformers import notes."""
    script = f"import share_diffusers, sys; print('diffusers' in sys.modules); share_diffusers.{name}; print('ok')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "False\nok\n"  # the package itself does not import diffusers
    assert result.stderr == ""


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (ValueError("first line\n  second line"), "error: first line second line"),
        (ShareCheckpointError("share_config.json is truncated\n"), "error: share_config.json is truncated"),
        (OSError(28, "No space left on device"), "error: [Errno 28] No space left on device"),
    ],
)
def test_every_user_error_is_one_line(monkeypatch, tmp_path, capsys, error, line):
    """A ShareError, ValueError or OSError ends the command with ``error: <message>`` on one line, status 1."""
    from share_diffusers import cli

    def fail(args):
        raise error

    monkeypatch.setattr(cli, "cmd_inspect", fail)
    (tmp_path / "ckpt").mkdir()
    assert run_cli("inspect", tmp_path / "ckpt") == 1
    assert capsys.readouterr().err == line + "\n"


def _bad_inputs(tmp_path, peft_adapters):
    good = load_file(f"{peft_adapters[0]}/adapter_model.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    data = tmp_path / "full.safetensors"
    save_file(good, data)
    truncated.write_bytes(data.read_bytes()[:-40])
    nan = tmp_path / "nan.safetensors"
    save_file({k: v * float("nan") if "to_q.lora_A" in k else v for k, v in good.items()}, nan)
    mismatch = tmp_path / "mismatch.safetensors"
    save_file({k: torch.randn(3, 24) if "to_q.lora_A" in k else v for k, v in good.items()}, mismatch)
    pickled = tmp_path / "adapter.bin"
    marker = tmp_path / "unpickled-marker"
    pickled.write_bytes(pickle.dumps(_Exploit(str(marker))))
    no_lora = tmp_path / "plain.safetensors"
    save_file({"to_q.weight": torch.randn(24, 24)}, no_lora)
    other_model = tmp_path / "other.safetensors"
    save_file(
        {
            "base_model.model.to_q.lora_A.weight": torch.randn(4, 30),
            "base_model.model.to_q.lora_B.weight": torch.randn(24, 4),
            "base_model.model.to_q.alpha": torch.tensor(4.0),  # a PEFT file needs its scale (or its config)
        },
        other_model,
    )
    return {
        "truncated": (truncated, "truncated or corrupt"),
        "nan": (nan, "to_q.lora_A.weight contains NaN or Inf"),
        "shape": (mismatch, r"layer 'to_q' has lora_A \(3, 24\) and lora_B \(24, 4\)"),
        "pickle": (pickled, "pickle file"),
        "no-lora": (no_lora, "holds no LoRA tensors"),
        "missing": (tmp_path / "nowhere.safetensors", "neither an existing file or folder nor a Hub repo id"),
        "other-model": (
            other_model,
            r"size mismatch for to_q: the LoRA's update has shape \(24, 30\) "
            r"but the Share factors hold shape \(24, 24\)",
        ),
    }, marker


class _Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("case", ["truncated", "nan", "shape", "pickle", "no-lora", "missing", "other-model"])
def test_bad_lora_files_fail_cleanly_and_leave_the_checkpoint(tmp_path, peft_adapters, capsys, case):
    out = tmp_path / "ckpt"
    assert run_cli("-q", "compress", *peft_adapters[:2], "-o", out, "-k", 8, "-p", 4) == 0
    snapshot = {p.name: p.read_bytes() for p in out.iterdir()}
    cases, marker = _bad_inputs(tmp_path, peft_adapters)
    path, message = cases[case]
    capsys.readouterr()
    assert run_cli("-q", "merge", out, path, "--name", "new") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
    assert not marker.exists()  # the pickle was never opened
    if case == "other-model":  # a valid LoRA for another model: only merging into these factors is wrong
        return
    # compress refuses the same file without writing a checkpoint
    assert run_cli("-q", "compress", path, "-o", tmp_path / "fresh") == 1
    assert not (tmp_path / "fresh" / "share_config.json").exists()


@pytest.mark.parametrize(("names", "message"), [(["ink", "ink"], "already exists"), (["ink", " "], "non-empty")])
def test_duplicate_or_empty_style_names(tmp_path, peft_adapters, capsys, names, message):
    assert run_cli("-q", "compress", *peft_adapters[:2], "-o", tmp_path / "c", "--names", *names) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "c" / "share_config.json").exists()


def test_merge_with_taken_name_and_pickle_folder(tmp_path, peft_adapters, capsys):
    out = tmp_path / "ckpt"
    assert run_cli("-q", "compress", peft_adapters[0], "-o", out, "--names", "ink") == 0
    assert run_cli("-q", "merge", out, peft_adapters[1], "--name", "ink") == 1
    assert "a style named 'ink' already exists" in capsys.readouterr().err
    folder = tmp_path / "pickled-peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.bin").write_bytes(b"not really")
    assert run_cli("-q", "merge", out, folder) == 1
    assert "never unpickles" in capsys.readouterr().err
    assert run_cli("-q", "compress", peft_adapters[0], "-o", out) == 1
    assert "already holds a Share checkpoint" in capsys.readouterr().err
    assert load_factors(out).style_names == ["ink"]


def test_inspect_similarity_table_json_and_png(tmp_path, peft_adapters, capsys):
    """``inspect --similarity --png``: the pairwise table, near-duplicates, kept energy, and a heat-map PNG."""
    from PIL import Image

    from share_diffusers.core.similarity import kept_energy, style_similarity

    out = tmp_path / "ckpt"
    names = ["ink", "neon", "sepia"]
    assert run_cli("-q", "compress", *peft_adapters, "-o", out, "-k", 10, "-p", 4, "--names", *names) == 0
    copy = write_peft_adapter(tmp_path / "copy", seed=0, rank=4, alpha=2)  # ink's factors at a quarter of its alpha
    capsys.readouterr()
    assert run_cli("-q", "merge", out, copy, "--name", "ink again") == 0
    assert capsys.readouterr().err == (
        "warning: style 'ink again' is a near-duplicate of 'ink': the cosine similarity of their weight updates is "
        "1.000 (threshold 0.95), so 'ink again' is close to 'ink' at another strength; "
        f"'share-diffusers inspect {out} --similarity' compares all pairs\n"
    )
    factors = load_factors(out)
    similarity = style_similarity(factors)

    png = tmp_path / "maps" / "bank.png"
    assert run_cli("inspect", out, "--similarity", "--png", png) == 0
    text = capsys.readouterr().out
    for number, (name, row) in enumerate(zip(similarity.names, similarity.matrix.tolist(), strict=True), start=1):
        cells = r"\s+".join(re.escape(f"{value:.3f}") for value in row)
        assert re.search(rf"^  {number} {re.escape(name)}\s+{cells}$", text, re.MULTILINE), text
    assert "near-duplicates (similarity >= 0.95): 'ink' ~ 'ink again' (1.000)\n" in text
    assert re.search(r"^  style\s+mix\s+to_q\s+to_v$", text, re.MULTILINE), text
    assert re.search(r"^  ink again\s+100\.0%\s+100\.0%\s+100\.0%$", text, re.MULTILINE), text  # k = 10 holds all
    assert text.endswith(f"wrote {png} (heat map of the similarities)\n")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 400 and image.height > 300
        r, g, b = np.asarray(image.convert("RGB"), dtype=np.int16).transpose(2, 0, 1)
        assert int(((r > 90) & (g < 30) & (b < 50)).sum()) > 1000  # the dark red cells of similarity 1

    assert run_cli("inspect", out, "--json", "--similarity") == 0
    info = json.loads(capsys.readouterr().out)["similarity"]
    assert info["styles"] == names + ["ink again"]
    assert info["matrix"] == similarity.matrix.tolist()  # JSON floats round-trip exactly
    assert info["near_duplicates"] == [{"styles": ["ink", "ink again"], "similarity": pytest.approx(1.0, abs=1e-6)}]
    assert info["kept_energy"] == kept_energy(factors) and len(info["map"]["coordinates"]) == 4
    assert run_cli("inspect", out, "--json") == 0
    assert "similarity" not in json.loads(capsys.readouterr().out)  # only when asked for


def test_inspect_refuses_a_malformed_dtype_field_in_one_line(tmp_path, peft_adapters, capsys):
    """A JSON ``dtype`` of the wrong type is the checkpoint's error naming the field, not a TypeError traceback."""
    out = tmp_path / "ckpt"
    assert run_cli("-q", "compress", peft_adapters[0], "-o", out, "--names", "ink") == 0
    document = json.loads((out / "share_config.json").read_text())
    document["dtype"] = ["float32"]
    (out / "share_config.json").write_text(json.dumps(document))
    capsys.readouterr()
    assert run_cli("inspect", out) == 1
    err = capsys.readouterr().err
    assert err == (
        f"error: {out / 'share_config.json'}: field 'dtype' must be one of float32, bfloat16, float16, "
        "got ['float32']\n"
    )


def test_old_style_names_load_with_a_warning_and_rename_on_the_command_line(tmp_path, peft_adapters, capsys):
    """A checkpoint of the previous release with names the style syntax cannot address: inspect shows it and
    says how to rename; merge into it works; ``rename`` gives the names blends can use; export uses them."""
    out = tmp_path / "ckpt"
    assert run_cli("-q", "compress", *peft_adapters[:2], "-o", out, "-k", 10, "-p", 4, "--names", "ink", "neon") == 0
    document = json.loads((out / "share_config.json").read_text())
    document["styles"][0]["name"], document["styles"][1]["name"] = "ghibli, watercolor", "neon=v2"
    (out / "share_config.json").write_text(json.dumps(document))
    capsys.readouterr()

    assert run_cli("inspect", out) == 0
    captured = capsys.readouterr()
    assert "ghibli, watercolor" in captured.out and "neon=v2" in captured.out
    warnings_shown = captured.err.splitlines()
    assert len(warnings_shown) == 2 and all(line.startswith("warning: ") for line in warnings_shown)
    assert "style name 'ghibli, watercolor' contains ','" in warnings_shown[0]
    assert f"share-diffusers rename {out} 'ghibli, watercolor' NEW_NAME" in warnings_shown[0]
    assert f"share-diffusers rename {out} neon=v2 NEW_NAME" in warnings_shown[1]

    assert run_cli("-q", "merge", out, peft_adapters[2], "--name", "sepia") == 0  # the old names are kept
    capsys.readouterr()
    assert run_cli("rename", out, "ghibli, watercolor", "ghibli; v2") == 0
    assert capsys.readouterr().out == f"renamed 'ghibli, watercolor' to 'ghibli; v2' in {out}\n"
    assert run_cli("rename", out, "neon=v2", "neon,v2") == 1  # a new name follows the rule
    assert "style name 'neon,v2' contains ','" in capsys.readouterr().err
    assert run_cli("rename", out, "neon=v2", "neon v2") == 0
    capsys.readouterr()
    assert run_cli("inspect", out) == 0
    assert capsys.readouterr().err == ""  # nothing left to rename

    renamed = load_factors(out)
    assert renamed.style_names == ["ghibli; v2", "neon v2", "sepia"]
    for layer in ("to_q", "to_v", "mix"):  # the LoRAs PEFT applies, under the new names
        assert relative_error(_peft_delta(peft_adapters[0], layer), renamed.delta_weight(layer, "ghibli; v2")) < 1e-5
        assert relative_error(_peft_delta(peft_adapters[1], layer), renamed.delta_weight(layer, "neon v2")) < 1e-5
    exported = tmp_path / "blend.safetensors"
    assert run_cli("export", out, "ghibli; v2=0.5,neon v2=0.5", "-o", exported) == 0
    expected = (_peft_delta(peft_adapters[0], "to_q") + _peft_delta(peft_adapters[1], "to_q")) / 2
    assert relative_error(expected, load_lora(exported).layers["to_q"].delta_weight()) < 1e-5


def _checkpoint_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_compress_a_folder_of_loras_equals_compressing_its_loras_one_by_one(tmp_path, peft_adapters, capsys):
    """A folder stands for its .safetensors files and one-LoRA subfolders (PEFT, or one file as
    save_lora_weights writes), in name order, named after them; other things are left out, with a note for a
    subfolder of several files."""
    loras = tmp_path / "loras"
    shutil.copytree(peft_adapters[0], loras / "ink")  # a PEFT adapter folder
    save_lora(load_lora(peft_adapters[1]), loras / "neon" / "pytorch_lora_weights.safetensors")  # diffusers' name
    save_lora(load_lora(peft_adapters[2]), loras / "sepia.safetensors")
    save_lora(load_lora(peft_adapters[2]), loras / "several" / "a.safetensors")
    save_lora(load_lora(peft_adapters[2]), loras / "several" / "b.safetensors")
    (loras / "README.txt").write_text("my styles")
    (loras / "old.ckpt").write_bytes(pickle.dumps({"not": "read"}))

    assert run_cli("-q", "compress", loras, "-o", tmp_path / "from-folder", "-k", 10, "-p", 4) == 0
    assert capsys.readouterr().err == ""  # -q: no note either
    assert run_cli("compress", loras, "-o", tmp_path / "again", "-k", 10, "-p", 4) == 0
    assert f"note: skipped {loras / 'several'}: several .safetensors files" in capsys.readouterr().err
    one_by_one = [loras / "ink", loras / "neon", loras / "sepia.safetensors"]
    assert run_cli("-q", "compress", *one_by_one, "-o", tmp_path / "listed", "-k", 10, "-p", 4) == 0

    from_folder, listed = load_factors(tmp_path / "from-folder"), load_factors(tmp_path / "listed")
    assert from_folder.style_names == listed.style_names == ["ink", "neon", "sepia"]
    for name, adapter in zip(["ink", "neon", "sepia"], peft_adapters, strict=True):
        for layer in ("to_q", "to_v", "mix"):
            assert torch.equal(from_folder.delta_weight(layer, name), listed.delta_weight(layer, name))
            assert relative_error(_peft_delta(adapter, layer), from_folder.delta_weight(layer, name)) < 1e-5

    # --names counts the folder's LoRAs, and says what the folder expanded to
    assert run_cli("-q", "compress", loras, "-o", tmp_path / "named", "--names", "a", "b") == 1
    err = capsys.readouterr().err
    assert err.startswith("error: got 3 LoRAs but 2 names (with the folders expanded: ") and str(loras / "ink") in err
    assert not (tmp_path / "named").exists()


def test_compress_a_folder_without_loras_names_the_pickles_it_will_not_read(tmp_path, capsys):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "style.ckpt").write_bytes(pickle.dumps({"not": "read"}))
    (folder / "notes.txt").write_text("x")
    assert run_cli("-q", "compress", folder, "-o", tmp_path / "out") == 1
    assert capsys.readouterr().err == (
        f"error: {folder} holds no LoRA: no .safetensors file and no LoRA subfolder "
        "(pickle files are never read: style.ckpt)\n"
    )
    assert not (tmp_path / "out").exists()


def test_a_share_checkpoint_is_no_lora_of_a_folder(tmp_path, peft_adapters, capsys):
    """A checkpoint holds one .safetensors file, so it passed for a one-LoRA subfolder and failed with "holds
    no LoRA tensors"; beside LoRAs it is skipped with a note, given itself it is refused by name."""
    loras = tmp_path / "loras"
    shutil.copytree(peft_adapters[0], loras / "ink")
    assert run_cli("-q", "compress", peft_adapters[1], "-o", loras / "earlier-factors", "-k", 10, "-p", 4) == 0
    assert run_cli("compress", loras, "-o", tmp_path / "out", "-k", 10, "-p", 4) == 0
    assert f"note: skipped {loras / 'earlier-factors'}: a Share checkpoint, not a LoRA" in capsys.readouterr().err
    assert load_factors(tmp_path / "out").style_names == ["ink"]
    assert run_cli("-q", "compress", loras / "earlier-factors", "-o", tmp_path / "again") == 1
    assert capsys.readouterr().err.startswith(f"error: {loras / 'earlier-factors'} is a Share checkpoint, not a LoRA;")
    assert not (tmp_path / "again").exists()
    # Its tensor file given by path (or a Hub repo of one) read as a LoRA in "no known layout", listing basis keys.
    (tensor_file,) = (loras / "earlier-factors").glob("*.safetensors")
    assert run_cli("-q", "compress", tensor_file, "-o", tmp_path / "again") == 1
    assert capsys.readouterr().err.startswith(f"error: {tensor_file.name} is the tensor file of a Share checkpoint")
    assert not (tmp_path / "again").exists()


def test_delete_removes_styles_and_leaves_the_others_bit_for_bit(tmp_path, peft_adapters, capsys):
    out = tmp_path / "ckpt"
    names = ["ink", "neon", "sepia"]
    assert run_cli("-q", "compress", *peft_adapters, "-o", out, "-k", 10, "-p", 4, "--names", *names) == 0
    before = load_factors(out)
    capsys.readouterr()

    before_bytes = _checkpoint_bytes(out)
    assert run_cli("delete", out, "ink", "nope") == 1  # every name is checked before anything changes
    assert "'nope'" in capsys.readouterr().err
    assert _checkpoint_bytes(out) == before_bytes

    assert run_cli("delete", out, "ink", "sepia", "ink") == 0
    assert capsys.readouterr().out == f"deleted 'ink', 'sepia' from {out}; styles left: neon\n"
    after = load_factors(out)
    assert after.style_names == ["neon"]
    for layer in ("to_q", "to_v", "mix"):
        assert torch.equal(after.delta_weight(layer, "neon"), before.delta_weight(layer, "neon"))
    assert run_cli("delete", out, "neon") == 0
    assert "styles left: none" in capsys.readouterr().out
    assert load_factors(out).style_names == []
    assert run_cli("-q", "merge", out, peft_adapters[0], "--name", "ink") == 0  # the bases take new styles
    assert relative_error(_peft_delta(peft_adapters[0], "to_q"), load_factors(out).delta_weight("to_q", "ink")) < 1e-5


def test_push_uploads_the_checkpoint_with_its_options(tmp_path, peft_adapters, monkeypatch, capsys):
    """The upload itself is huggingface_hub's (no Hub write API offline): what it is handed, and what it
    uploads loads back equal."""
    from hub_server import recording_api
    from huggingface_hub import constants

    out = tmp_path / "ckpt"
    assert run_cli("-q", "compress", *peft_adapters[:2], "-o", out, "-k", 10, "-p", 4, "--names", "ink", "neon") == 0
    calls = recording_api(monkeypatch, tmp_path / "uploaded")
    capsys.readouterr()
    assert run_cli("push", out, "me/styles", "--private", "--revision", "dev", "--message", "two styles") == 0
    assert capsys.readouterr().out == (
        f"pushed 2 styles from {out} to me/styles: {constants.ENDPOINT}/me/styles/commit/{'0' * 40}\n"
    )
    assert calls[0] == ("create_repo", {"repo_id": "me/styles", "private": True, "exist_ok": True})
    assert calls[1] == ("create_branch", {"repo_id": "me/styles", "branch": "dev", "exist_ok": True})
    assert calls[2][1]["commit_message"] == "two styles" and calls[2][1]["revision"] == "dev"
    uploaded, local = load_factors(tmp_path / "uploaded"), load_factors(out)
    assert uploaded.style_names == ["ink", "neon"]
    assert torch.equal(uploaded.delta_weight("mix", "neon"), local.delta_weight("mix", "neon"))
    assert (tmp_path / "uploaded" / "README.md").is_file()

    assert run_cli("push", tmp_path / "missing", "me/styles") == 1
    assert capsys.readouterr().err == f"error: no Share checkpoint folder at {tmp_path / 'missing'}\n"


def test_merge_says_how_far_the_other_styles_moved(tmp_path, peft_adapters, capsys):
    """k too small for all three LoRAs: the merge turns the bases, and the line names the most moved style and
    by how much (the relative change of its dense update, the studio's "moved")."""
    out = tmp_path / "ckpt"
    assert run_cli("-q", "compress", *peft_adapters[:2], "-o", out, "-k", 4, "-p", 4, "--names", "ink", "neon") == 0
    before = load_factors(out)
    capsys.readouterr()
    assert run_cli("-q", "merge", out, peft_adapters[2], "--name", "sepia") == 0
    after = load_factors(out)
    moved = {}
    for name in ("ink", "neon"):
        old = torch.cat([before.delta_weight(layer, name).flatten() for layer in before.layers]).double()
        new = torch.cat([after.delta_weight(layer, name).flatten() for layer in after.layers]).double()
        moved[name] = float((new - old).norm() / old.norm())
    most = max(moved, key=moved.get)
    assert moved[most] > 0.01  # the case moves something
    line = capsys.readouterr().out
    assert line.startswith(f"merged 'sepia' (error {after.style_error('sepia'):.4f}); 3 styles in {out}")
    assert line.endswith(f"; the others moved at most {moved[most]:.1%} ({most!r})\n"), (line, moved)
