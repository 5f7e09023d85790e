"""Reading, converting and writing LoRA files: PEFT adapters with their scale wherever they come from, keys
Share cannot hold refused by name, exact layer matching, exports stock diffusers loads, atomic PEFT exports."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import TinyNet, relative_error, write_peft_adapter
from flux_helpers import (
    fused_qkv_lora,
    run_transformer,
    stock_pipeline,
    transformer_inputs,
    write_diffusers_lora,
    write_fused_lora,
    write_peft_adapter_folder,
)
from peft import PeftModel
from safetensors.torch import load_file, save_file

from share_diffusers import ShareConfig, ShareFluxPipeline
from share_diffusers.core import LoraAdapter, LoraLayer, load_factors
from share_diffusers.core.errors import LoraFormatError, ShareIOError, ShareValueError
from share_diffusers.flux_lora import ALL_LORA_LAYERS
from share_diffusers.lora_files import load_lora, save_lora
from share_diffusers.tiny_flux import build_tiny_flux_pipeline

EXACT = ShareConfig(rank=32, pseudo_rank=8)  # k and p hold every fixture exactly


def _pipe():
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _peft_delta(adapter_dir, layer):
    """dW as PEFT itself applies it: merged weight minus base weight, flattened to (n_out, d_in)."""
    base = TinyNet()
    model = PeftModel.from_pretrained(TinyNet(), str(adapter_dir)).merge_and_unload()
    weight = model.get_submodule(layer).weight - base.get_submodule(layer).weight
    return weight.detach().reshape(weight.shape[0], -1)


def _dense(layer: LoraLayer) -> torch.Tensor:
    return layer.scale * layer.up.double() @ layer.down.double()


def _share_output(pipe, style, inputs):
    pipe.share.set_style(style)
    try:
        return run_transformer(pipe.transformer, inputs)
    finally:
        pipe.share.set_style(None)


def _max_difference(a, b) -> float:
    return float((a - b).abs().max())


# -- 1. a PEFT adapter's lora_alpha, from the folder, the file beside its config, or the Hub -------------------


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory):
    """PEFT's own save_pretrained at r=4, lora_alpha=16: scale 4, which the weights file alone does not hold."""
    return write_peft_adapter(tmp_path_factory.mktemp("peft") / "adapter", seed=7, rank=4, alpha=16)


@pytest.mark.parametrize("which", ["folder", "weights-file"])
def test_peft_adapter_scale_matches_peft(peft_adapter, which):
    path = peft_adapter if which == "folder" else f"{peft_adapter}/adapter_model.safetensors"
    adapter = load_lora(path)
    for layer in ("to_q", "to_v", "mix"):
        assert relative_error(_peft_delta(peft_adapter, layer), _dense(adapter.layers[layer])) < 1e-6, layer


def test_peft_weights_without_config_are_refused(peft_adapter, tmp_path):
    lonely = tmp_path / "adapter.safetensors"
    shutil.copy(f"{peft_adapter}/adapter_model.safetensors", lonely)
    with pytest.raises(
        LoraFormatError,
        match=r"adapter.safetensors holds PEFT adapter weights \('base_model.model.[\w.]+'\) without their "
        r"adapter_config.json: the adapter's lora_alpha, and so its scale, is unknown. Pass the adapter folder",
    ):
        load_lora(lonely)
    folder = tmp_path / "no-config"  # a folder whose config is missing is no better
    folder.mkdir()
    shutil.copy(lonely, folder / "adapter_model.safetensors")
    with pytest.raises(LoraFormatError, match="without their adapter_config.json"):
        load_lora(folder)


def test_peft_weights_with_alpha_tensors_need_no_config(peft_adapter, tmp_path):
    tensors = load_file(f"{peft_adapter}/adapter_model.safetensors")
    layers = {key.removesuffix(".lora_A.weight") for key in tensors if key.endswith(".lora_A.weight")}
    tensors.update({f"{layer}.alpha": torch.tensor(16.0) for layer in layers})
    save_file(tensors, str(tmp_path / "with-alpha.safetensors"))
    adapter = load_lora(tmp_path / "with-alpha.safetensors")
    assert relative_error(_peft_delta(peft_adapter, "to_q"), _dense(adapter.layers["to_q"])) < 1e-6


@pytest.fixture(scope="module")
def flux_peft(tmp_path_factory):
    """The same Flux LoRA as a diffusers file (stock diffusers' reference) and as a PEFT adapter folder."""
    root = tmp_path_factory.mktemp("flux-peft")
    diffusers_file = write_diffusers_lora(root / "diffusers", seed=11, rank=4, alpha=16)
    folder = write_peft_adapter_folder(diffusers_file, root / "peft-ink", rank=4, alpha=16)
    stock = stock_pipeline()
    inputs = transformer_inputs()
    stock.load_lora_weights(str(diffusers_file))
    return {"folder": folder, "reference": run_transformer(stock.transformer, inputs), "inputs": inputs}


@pytest.mark.parametrize("which", ["folder", "weights-file"])
def test_merge_lora_reads_a_local_peft_adapter_with_its_scale(flux_peft, which):
    folder = flux_peft["folder"]
    pipe = _pipe()
    report = pipe.merge_lora(folder if which == "folder" else folder / "adapter_model.safetensors", config=EXACT)
    assert report.style_name == "peft-ink" and report.outside == {}
    assert _max_difference(_share_output(pipe, "peft-ink", flux_peft["inputs"]), flux_peft["reference"]) < 1e-4


def test_merge_lora_downloads_a_hub_adapters_config(flux_peft, fake_hub, tmp_path):
    fake_hub.add_folder("artist/peft-ink", flux_peft["folder"])
    pipe = _pipe()
    report = pipe.merge_lora("artist/peft-ink", cache_dir=tmp_path, config=EXACT)
    assert report.source["weight_name"] == "adapter_model.safetensors"
    assert _max_difference(_share_output(pipe, "peft-ink", flux_peft["inputs"]), flux_peft["reference"]) < 1e-4


def test_hub_adapter_without_config_is_refused(flux_peft, fake_hub, tmp_path):
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    shutil.copy(flux_peft["folder"] / "adapter_model.safetensors", weights_only)
    fake_hub.add_folder("artist/peft-no-config", weights_only)
    pipe = _pipe()
    with pytest.raises(LoraFormatError, match="without their adapter_config.json"):
        pipe.merge_lora("artist/peft-no-config", cache_dir=tmp_path / "cache")
    assert pipe.share is None


# -- 2. keys Share cannot hold: refused by name; keys that carry nothing: listed in the report -----------------


@pytest.fixture(scope="module")
def fused_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    fused = fused_qkv_lora(seed=5, rank=3)
    return {
        "kohya": write_fused_lora(root / "kohya.safetensors", fused, "kohya", alpha=6),
        "diffusers": write_fused_lora(root / "diffusers.safetensors", fused, "diffusers", alpha=6),
    }


def _with_extra(tmp_path, source, name, extra):
    tensors = load_file(str(source))
    tensors.update(extra(tensors))
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path))
    return path


def _kohya_dora(tensors):
    return {
        key.replace(".lora_down.weight", ".dora_scale"): torch.rand(1, value.shape[1]) + 0.5
        for key, value in tensors.items()
        if key.endswith(".lora_down.weight")
    }


def _biases(value_of):
    def extra(tensors):
        return {
            key.replace(".weight", ".bias"): value_of(value.shape[0])
            for key, value in tensors.items()
            if key.endswith(".lora_B.weight")
        }

    return extra


REFUSED_KEYS = {
    "kohya-dora": (
        "kohya",
        _kohya_dora,
        r"kohya-dora.safetensors: 'lora_unet_double_blocks_0_\w+.dora_scale' is a DoRA magnitude vector; "
        r"DoRA adapters are not supported",
    ),
    "diffusers-bias": (
        "diffusers",
        _biases(torch.ones),
        r"diffusers-bias.safetensors: 'transformer.transformer_blocks.0.attn.\w+.lora_B.bias' is a LoRA bias; "
        r"Share holds the low-rank update lora_B @ lora_A only and would drop it",
    ),
    # LyCORIS next to plain LoRA layers: diffusers failed on the kohya one and dropped the diffusers-format one.
    "kohya-lokr": (
        "kohya",
        lambda tensors: {
            "lora_unet_double_blocks_0_img_attn_proj.lokr_w1": torch.rand(4, 4),
            "lora_unet_double_blocks_0_img_attn_proj.lokr_w2": torch.rand(8, 8),
        },
        r"kohya-lokr.safetensors: 'lora_unet_double_blocks_0_img_attn_proj.lokr_w1' is a LyCORIS LoKr factor; "
        r"LyCORIS adapters are not supported",
    ),
    "diffusers-loha": (
        "diffusers",
        lambda tensors: {
            f"transformer.transformer_blocks.0.attn.to_q.hada_w{side}_{part}": torch.rand(4, 4)
            for side in (1, 2)
            for part in "ab"
        },
        r"diffusers-loha.safetensors: 'transformer.transformer_blocks.0.attn.to_q.hada_w1_a' is a LyCORIS LoHa "
        r"factor; LyCORIS adapters are not supported",
    ),
    "kohya-diff_b": (
        "kohya",
        lambda tensors: {"lora_unet_double_blocks_0_img_attn_proj.diff_b": torch.ones(32)},
        r"kohya-diff_b.safetensors: 'lora_unet_double_blocks_0_img_attn_proj.diff_b' is a LoRA bias",
    ),
}


@pytest.mark.parametrize("name", list(REFUSED_KEYS))
def test_dora_and_biases_are_refused_by_key(fused_files, tmp_path, name):
    source, extra, message = REFUSED_KEYS[name]
    path = _with_extra(tmp_path, fused_files[source], name, extra)
    pipe = _pipe()
    with pytest.raises(LoraFormatError, match=message) as caught:
        pipe.merge_lora(path, style_name="bad", config=EXACT)
    assert "\n" not in str(caught.value)
    assert pipe.share is None


def test_a_zero_bias_is_dropped_and_listed(fused_files, tmp_path):
    path = _with_extra(tmp_path, fused_files["diffusers"], "zero-bias", _biases(torch.zeros))
    biases = sorted(key for key in load_file(str(path)) if key.endswith(".lora_B.bias"))
    pipe = _pipe()
    report = pipe.merge_lora(path, style_name="zero-bias", config=EXACT)
    assert report.dropped_keys == biases
    assert f"{len(biases)} key(s) of the file left out" in str(report)
    stock = stock_pipeline()
    stock.load_lora_weights(str(path))  # stock adds the (zero) bias: the same output
    inputs = transformer_inputs()
    expected = run_transformer(stock.transformer, inputs)
    assert _max_difference(_share_output(pipe, "zero-bias", inputs), expected) < 1e-4


# -- 3. layers matched by exact name, not PEFT's suffix rule ---------------------------------------------------


@pytest.fixture(scope="module")
def proj_out_loras(tmp_path_factory):
    """``a``: top-level proj_out and to_q; ``b``: also every single block's proj_out."""
    root = tmp_path_factory.mktemp("proj-out")
    full = write_diffusers_lora(root / "full", seed=1, rank=4, alpha=4, targets=["to_q", "proj_out"])
    tensors = load_file(str(full))
    a = root / "a.safetensors"
    save_file(
        {
            k: v
            for k, v in tensors.items()
            if not k.startswith("transformer.single_transformer_blocks.") or "proj_out" not in k
        },
        str(a),
    )
    b = write_diffusers_lora(root / "b", seed=2, rank=4, alpha=4, targets=["to_q", "proj_out"])
    return {"a": a, "b": b}


def _layers_of(path):
    return sorted({key.removeprefix("transformer.").split(".lora_")[0] for key in load_file(str(path))})


def test_all_lora_layers_wraps_exactly_the_loras_layers(proj_out_loras):
    pipe = _pipe()
    pipe.merge_lora(proj_out_loras["a"], style_name="a", target_modules=ALL_LORA_LAYERS, config=EXACT)
    assert sorted(pipe.share.layers) == _layers_of(proj_out_loras["a"])
    assert not any(name.startswith("single_transformer_blocks.") and "proj_out" in name for name in pipe.share.layers)


def test_layers_with_a_held_layers_suffix_are_reported_outside(proj_out_loras, tmp_path):
    pipe = _pipe()
    pipe.merge_lora(proj_out_loras["a"], style_name="a", target_modules=ALL_LORA_LAYERS, config=EXACT)
    pipe.save_share_factors(tmp_path / "ck")
    loaded = _pipe()
    loaded.load_share_factors(tmp_path / "ck")
    report = loaded.merge_lora(proj_out_loras["b"], style_name="b")
    tensors = load_file(str(proj_out_loras["b"]))  # scale alpha / r = 1

    def energy(name):
        up, down = tensors[f"transformer.{name}.lora_B.weight"], tensors[f"transformer.{name}.lora_A.weight"]
        return float((up.double() @ down.double()).square().sum())

    layers = _layers_of(proj_out_loras["b"])
    outside = [name for name in layers if name.startswith("single_transformer_blocks.") and "proj_out" in name]
    total = sum(energy(name) for name in layers)
    assert report.outside == pytest.approx({name: energy(name) / total for name in outside}, rel=1e-6)
    assert report.layers_merged == len(layers) - len(outside)
    assert loaded.list_styles() == ["a", "b"]


# -- 4. export_style_as_lora: what stock diffusers loads, for a folder and any case of .safetensors ----------


@pytest.mark.parametrize("target", ["ink-export", "ink.SAFETENSORS"])
def test_export_loads_in_stock_diffusers(tmp_path, target):
    pipe = _pipe()
    pipe.merge_lora(write_diffusers_lora(tmp_path / "ink", seed=1, rank=4, alpha=8), style_name="ink", config=EXACT)
    written = pipe.export_style_as_lora("ink", tmp_path / target)
    if target == "ink-export":
        assert written == tmp_path / "ink-export" / "pytorch_lora_weights.safetensors"
        assert sorted(p.name for p in written.parent.iterdir()) == ["pytorch_lora_weights.safetensors"]
    else:
        assert written == tmp_path / target and written.is_file()
    assert all(key.startswith("transformer.") for key in load_file(str(written)))
    stock = stock_pipeline()
    stock.load_lora_weights(str(tmp_path / target))
    inputs = transformer_inputs()
    assert _max_difference(run_transformer(stock.transformer, inputs), _share_output(pipe, "ink", inputs)) < 1e-4


def test_save_lora_refuses_a_key_prefix_for_a_peft_folder(tmp_path):
    adapter = LoraAdapter({"to_q": LoraLayer(up=torch.ones(4, 2), down=torch.ones(2, 4), scale=1.0)})
    with pytest.raises(ShareValueError, match=r"would be written as a PEFT adapter folder.*key_prefix='transformer.'"):
        save_lora(adapter, tmp_path / "folder", key_prefix="transformer.")
    assert not (tmp_path / "folder").exists()


# -- 5. a failed PEFT-folder export leaves the previous one as it was ------------------------------------------


def _adapter(rank: int, seed: int) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    up, down = torch.randn(16, rank, generator=generator), torch.randn(rank, 16, generator=generator)
    return LoraAdapter({"layer": LoraLayer(up=up, down=down, scale=0.5)})


def test_failed_peft_export_keeps_the_previous_one(tmp_path, monkeypatch):
    from share_diffusers import lora_files

    first = _adapter(4, seed=0)
    save_lora(first, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lora_files.os, "replace", full)
    with pytest.raises(ShareIOError, match=r"cannot write the LoRA to .*adapter_model.safetensors \(No space left"):
        save_lora(_adapter(8, seed=1), tmp_path / "adapter")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before  # no temporary file left
    reread = load_lora(tmp_path / "adapter")
    assert relative_error(_dense(first.layers["layer"]), _dense(reread.layers["layer"])) < 1e-6


def test_peft_export_replaces_weights_and_config_together(tmp_path):
    save_lora(_adapter(4, seed=0), tmp_path / "adapter")
    second = _adapter(8, seed=1)
    save_lora(second, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8
    reread = load_lora(tmp_path / "adapter")
    assert relative_error(_dense(second.layers["layer"]), _dense(reread.layers["layer"])) < 1e-6
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]


def test_cli_checkpoint_of_a_peft_file_keeps_its_scale(peft_adapter, tmp_path):
    """The CLI reads ``adapter_model.safetensors`` given alone with the config beside it, as the folder."""
    from share_diffusers.cli import main

    assert (
        main(
            [
                "-q",
                "compress",
                f"{peft_adapter}/adapter_model.safetensors",
                "-o",
                str(tmp_path / "ck"),
                "--names",
                "ink",
            ]
        )
        == 0
    )
    factors = load_factors(tmp_path / "ck")
    assert relative_error(_peft_delta(peft_adapter, "to_v"), factors.delta_weight("to_v", "ink")) < 1e-5


# -- 4. files whose scale or pairing is ambiguous ------------------------------------------------------------

PATTERN_LAYERS = [
    "transformer_blocks.0.attn.to_q",
    "transformer_blocks.0.attn.to_k",
    "transformer_blocks.0.attn.add_q_proj",
    "single_transformer_blocks.0.attn.to_q",
]


@pytest.mark.parametrize(
    "pattern",
    [
        "to_q",
        "attn\\.to_q",
        "to_q|to_k",
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks\\.0\\.attn\\.to_.",
        "add_q_proj",
    ],
)
def test_alpha_and_rank_patterns_select_the_layers_peft_selects(pattern):
    """A pattern is a regex matched against the name or a dotted tail of it (PEFT's rule): an escaped dot or an
    alternation selected nothing before, and those layers merged at lora_alpha / r instead of their own alpha."""
    from peft.utils.other import get_pattern_key

    from share_diffusers.lora_files import lora_layers_from_state_dict

    rank, alpha, special = 4, 4, 16
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name in PATTERN_LAYERS:
        r = 2 if get_pattern_key([pattern], name) == pattern else rank  # rank_pattern: the layers it selects
        tensors[f"{name}.lora_A.weight"] = torch.randn(r, 32, generator=generator)
        tensors[f"{name}.lora_B.weight"] = torch.randn(32, r, generator=generator)
    config = {"r": rank, "lora_alpha": alpha, "alpha_pattern": {pattern: special}, "rank_pattern": {pattern: 2}}
    layers, _ = lora_layers_from_state_dict(tensors, config, "patterns")
    selected = 0
    for name in PATTERN_LAYERS:
        chosen = get_pattern_key([pattern], name) == pattern  # PEFT's own function
        selected += chosen
        expected = (special / 2) if chosen else (alpha / rank)
        assert layers[name].scale == expected, (pattern, name, layers[name].scale, expected)
    assert selected > 0  # every pattern here selects some layer


def test_alpha_tensors_beside_adapter_metadata_are_refused(tmp_path):
    """Two scales for one layer (stock diffusers refuses the file: 'Both network_alphas and metadata')."""
    name = "transformer.transformer_blocks.0.attn.to_q"
    path = tmp_path / "both.safetensors"
    tensors = {f"{name}.lora_A.weight": torch.rand(4, 32), f"{name}.lora_B.weight": torch.rand(32, 4)}
    tensors[f"{name}.alpha"] = torch.tensor(8.0)
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.r": 4, "transformer.lora_alpha": 16})}
    save_file(tensors, str(path), metadata=metadata)
    pipe = _pipe()
    message = (
        r"both.safetensors gives its layers' scale twice: '.alpha' tensors \(e.g. "
        r"'transformer.transformer_blocks.0.attn.to_q.alpha' = 8\) and adapter metadata "
        r"\(lora_adapter_metadata: transformer.lora_alpha = 16\)"
    )
    with pytest.raises(LoraFormatError, match=message):
        pipe.merge_lora(path, style_name="both", config=EXACT)
    assert pipe.share is None
    del tensors[f"{name}.alpha"]  # the metadata alone is the scale: 16 / 4
    save_file(tensors, str(path), metadata=metadata)
    pipe.merge_lora(path, style_name="both", config=EXACT)
    adapter = pipe.share.factors
    assert adapter.style_names == ["both"]


@pytest.mark.parametrize(
    "keys, message",
    [
        (
            ("lora_A.one", "lora_B.one", "lora_A.two", "lora_B.two"),
            r"layer 'transformer_blocks.0.attn.to_q' holds factors of two adapters "
            r"\('transformer_blocks.0.attn.to_q.lora_A.one.weight' and "
            r"'transformer_blocks.0.attn.to_q.lora_A.two.weight'\)",
        ),
        (
            ("lora_A", "lora_B", "lora_B"),
            r"layer 'transformer_blocks.0.attn.to_q' has lora_B twice",
        ),
    ],
    ids=["two-adapters", "a-factor-twice"],
)
def test_a_layer_with_two_sets_of_factors_is_refused(tmp_path, keys, message):
    """Only the last adapter's factors were merged before, and nothing said so."""
    name = "transformer_blocks.0.attn.to_q"
    tensors = {}
    for index, key in enumerate(keys):
        # the repeated factor comes once with PEFT's prefix, as a state dict saved twice over would hold it
        prefix = "base_model.model." if index == 2 and key == "lora_B" else ""
        shape = (4, 32) if "lora_A" in key else (32, 4)
        tensors[f"{prefix}{name}.{key}.weight"] = torch.rand(*shape)
    from share_diffusers.lora_files import lora_layers_from_state_dict

    with pytest.raises(LoraFormatError, match=message):
        lora_layers_from_state_dict(tensors, {"r": 4, "lora_alpha": 4}, "two.safetensors")


def test_a_peft_lora_of_an_embedding_layer_is_refused_by_key(tmp_path):
    """PEFT's lora_embedding_A/B were ignored: the style kept only the linears' part, inspect said error 0."""
    from peft import LoraConfig, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)
            self.proj = torch.nn.Linear(8, 8)

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["embed", "proj"], init_lora_weights=False)
    get_peft_model(Net(), config).save_pretrained(tmp_path / "adapter")
    message = (
        r"adapter_model.safetensors: 'base_model.model.embed.lora_embedding_A' is a LoRA factor of an embedding "
        r"layer \(PEFT's lora_embedding_A/B\); Share holds LoRAs of linear layers and 1x1 convolutions only"
    )
    with pytest.raises(LoraFormatError, match=message):
        load_lora(tmp_path / "adapter")
    # the same key with PEFT's adapter name after it, as an in-memory state dict has it
    tensors = {"embed.lora_embedding_B.default": torch.ones(8, 2), "proj.lora_A.weight": torch.ones(2, 8)}
    save_file(tensors, str(tmp_path / "named.safetensors"))
    with pytest.raises(LoraFormatError, match="'embed.lora_embedding_B.default' is a LoRA factor of an embedding"):
        load_lora(tmp_path / "named.safetensors")
