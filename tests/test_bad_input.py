"""Bad input through the pipeline and the core is refused with one ``ShareError`` naming what is wrong,
before anything changes (issue 19: NaN/Inf/huge alphas, blend weights and scales, zero LoRAs, names
the style syntax cannot address, fused state)."""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
import torch
from conftest import random_adapter
from flux_helpers import fused_qkv_lora, generate, write_diffusers_lora, write_fused_lora
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from share_diffusers import ShareConfig, ShareFluxPipeline
from share_diffusers.core import (
    ShareError,
    ShareFactors,
    ShareLinear,
    StyleError,
    load_factors,
    save_factors,
    style_as_lora,
)
from share_diffusers.core.errors import (
    FactorValueError,
    LoraFormatError,
    ShareIOError,
    ShareStateError,
    ShareValueError,
)
from share_diffusers.core.factors import validate_style_name
from share_diffusers.hub import HubError
from share_diffusers.tiny_flux import build_tiny_flux_pipeline

EXACT = ShareConfig(rank=32, pseudo_rank=8)
SHAPES = {"blocks.0.to_q": (32, 24), "blocks.1.to_k": (16, 24)}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input-loras")
    good = write_diffusers_lora(root / "ink", seed=1, rank=4, alpha=8)
    files = {"ink": good, "sepia": write_diffusers_lora(root / "sepia", seed=3, rank=3, alpha=1.5)}
    tensors = load_file(str(good))
    with safe_open(str(good), "pt") as handle:
        metadata = handle.metadata()

    def with_alpha(name, alpha):  # the alpha diffusers stores in the file's adapter metadata
        adapter = json.loads(metadata["lora_adapter_metadata"])
        adapter["transformer.lora_alpha"] = alpha
        files[name] = root / f"{name}.safetensors"
        save_file(tensors, str(files[name]), metadata={**metadata, "lora_adapter_metadata": json.dumps(adapter)})

    with_alpha("nan-alpha", float("nan"))
    with_alpha("inf-alpha", float("inf"))
    with_alpha("huge-alpha", 4e34)
    fused = fused_qkv_lora(seed=5, rank=3)
    files["kohya-nan-alpha"] = write_fused_lora(
        root / "kohya-nan-alpha.safetensors", fused, "kohya", alpha=float("nan")
    )
    files["kohya-inf-alpha"] = write_fused_lora(
        root / "kohya-inf-alpha.safetensors", fused, "kohya", alpha=float("inf")
    )
    key = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"
    files["nan-factor"] = root / "nan-factor.safetensors"
    save_file({k: v * float("nan") if k == key else v for k, v in tensors.items()}, str(files["nan-factor"]))
    files["zero"] = root / "zero.safetensors"
    save_file({k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in tensors.items()}, str(files["zero"]))
    return files


def _pipe():
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def pipe(loras):
    pipe = _pipe()
    pipe.merge_lora(loras["ink"], style_name="ink", config=EXACT)
    return pipe


def _state(pipe):
    """Styles, every stored tensor, and the injected layers: what a refused call must leave as it was."""
    factors = pipe.share_factors
    tensors = {
        f"{name}.{key}": value.clone()
        for name, layer in factors.layers.items()
        for key, value in vars(layer).items()
        if isinstance(value, torch.Tensor)
    }
    return pipe.list_styles(), tensors, sorted(pipe.share.layers)


def _assert_unchanged(pipe, before):
    styles, tensors, layers = _state(pipe)
    assert styles == before[0] and layers == before[2]
    assert tensors.keys() == before[1].keys()
    assert all(torch.equal(tensors[key], before[1][key]) for key in tensors)


BAD_LORAS = [
    ("nan-alpha", LoraFormatError, r"nan-alpha.safetensors: lora_alpha in the file's lora_adapter_metadata is nan"),
    ("inf-alpha", LoraFormatError, r"inf-alpha.safetensors: lora_alpha in the file's lora_adapter_metadata is inf"),
    (
        "kohya-nan-alpha",
        LoraFormatError,
        r"kohya-nan-alpha.safetensors: tensor 'lora_unet_double_blocks_0_\w+\.alpha' holds a NaN or Inf alpha",
    ),
    (
        "kohya-inf-alpha",
        LoraFormatError,
        r"kohya-inf-alpha.safetensors: tensor 'lora_unet_double_blocks_0_\w+\.alpha' holds a NaN or Inf alpha",
    ),
    (
        "nan-factor",
        LoraFormatError,
        r"nan-factor.safetensors: tensor 'transformer.transformer_blocks.0.attn.to_q.lora_B.weight' contains NaN",
    ),
    (
        "huge-alpha",
        FactorValueError,
        r"huge-alpha.safetensors: [\w.]+: merging style 'bad': its update's energy \|\|dW\|\|\^2 = \S+ is beyond "
        r"float32's range; "
        r"the LoRA's scale \(alpha / rank\) is out of range",
    ),
    ("zero", FactorValueError, r"zero.safetensors: the LoRA's update is zero"),
]


@pytest.mark.parametrize(("case", "error", "message"), BAD_LORAS, ids=[case for case, _, _ in BAD_LORAS])
def test_failed_first_merge_leaves_a_usable_pipeline(loras, case, error, message):
    """A refused first merge takes its subspace away again: later merges and stock LoRA loading work."""
    pipe = _pipe()
    with pytest.raises(error, match=message) as caught:
        pipe.merge_lora(loras[case], style_name="bad")
    assert "\n" not in str(caught.value)
    assert pipe.share is None and pipe.share_factors is None
    assert not any(isinstance(module, ShareLinear) for module in pipe.transformer.modules())
    pipe.merge_lora(loras["ink"], style_name="ink", config=EXACT)
    assert pipe.list_styles() == ["ink"]
    pipe.remove_share()
    pipe.load_lora_weights(str(loras["ink"]), adapter_name="ink")  # stock diffusers, on the plain transformer
    pipe.unload_lora_weights()


@pytest.mark.parametrize(("case", "error", "message"), BAD_LORAS, ids=[case for case, _, _ in BAD_LORAS])
def test_failed_later_merge_changes_nothing(pipe, loras, tmp_path, case, error, message):
    before = _state(pipe)
    with pytest.raises(error, match=message):
        pipe.merge_lora(loras[case], style_name="bad")
    _assert_unchanged(pipe, before)
    # the checkpoint saved afterwards loads and takes further merges (a huge alpha used to poison it)
    pipe.save_share_factors(tmp_path / "factors")
    reloaded = _pipe()
    reloaded.load_share_factors(tmp_path / "factors")
    reloaded.merge_lora(loras["sepia"], style_name="sepia")
    assert reloaded.list_styles() == ["ink", "sepia"]


def test_huge_scale_is_refused_in_the_core_with_factors_unchanged():
    factors = ShareFactors.fit([random_adapter(SHAPES, 3, seed=0)], ["ink"], ShareConfig(rank=6, pseudo_rank=3))
    before = {name: layer.gram_out.clone() for name, layer in factors.layers.items()}
    with pytest.raises(FactorValueError, match=r"blocks.0.to_q: merging style 'huge': its update's energy"):
        factors.merge(random_adapter(SHAPES, 3, alpha=3 * 4e34, seed=1), "huge")
    assert factors.style_names == ["ink"]
    assert all(torch.equal(layer.gram_out, before[name]) for name, layer in factors.layers.items())
    # with several LoRAs the message names the one at fault (it said "the LoRA's scale is out of range")
    fine = [random_adapter(SHAPES, 3, seed=seed) for seed in (2, 3)]
    with pytest.raises(FactorValueError, match=r"blocks\.0\.to_q: style 'huge': its update's energy \|\|dW\|\|\^2 = "):
        ShareFactors.fit([fine[0], random_adapter(SHAPES, 3, alpha=3 * 4e34, seed=1), fine[1]], ["a", "huge", "b"])
    broken = random_adapter(SHAPES, 3, seed=4)
    broken.layers["blocks.0.to_q"].up[0, 0] = float("nan")
    with pytest.raises(FactorValueError, match=r"blocks\.0\.to_q: style 'nan': the LoRA's up \(lora_B\) factor"):
        ShareFactors.fit([fine[0], broken, fine[1]], ["a", "nan", "b"])
    with pytest.raises(FactorValueError, match="scale .* must be a finite number"):
        random_adapter(SHAPES, 3, alpha=float("nan"))


def test_factors_that_are_no_real_tensors_are_refused_by_name():
    """Complex factors lost their imaginary part with a torch warning only; meta tensors gave torch's "Cannot
    copy out of meta tensor"; a dict for an adapter gave an AttributeError."""
    from share_diffusers.core import LoraLayer

    with pytest.raises(FactorValueError, match=r"up \(lora_B\) factor must be a real floating-point tensor, got "):
        LoraLayer(torch.randn(8, 2, dtype=torch.complex64), torch.randn(2, 6, dtype=torch.complex64))
    with pytest.raises(FactorValueError, match=r"down \(lora_A\) factor must be a real floating-point tensor, got "):
        LoraLayer(torch.randn(8, 2), torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(FactorValueError, match=r"factor has no data \(it is on the meta device\)"):
        LoraLayer(torch.randn(8, 2, device="meta"), torch.randn(2, 6, device="meta"))
    factors = ShareFactors.fit([random_adapter(SHAPES, 3, seed=0)], ["ink"], ShareConfig(rank=6, pseudo_rank=3))
    with pytest.raises(ShareValueError, match="merge takes a LoraAdapter .*, got dict"):
        factors.merge({"blocks.0.to_q": 1}, "x")
    with pytest.raises(ShareValueError, match="fit takes LoraAdapters .*, got dict"):
        ShareFactors.fit([{"blocks.0.to_q": 1}], ["x"])
    assert factors.style_names == ["ink"]


def test_zero_lora_is_refused_in_the_core():
    factors = ShareFactors.fit([random_adapter(SHAPES, 3, seed=0)], ["ink"], ShareConfig(rank=6, pseudo_rank=3))
    zero = random_adapter(SHAPES, 3, seed=1)
    for layer in zero.layers.values():
        layer.up.zero_()
    with pytest.raises(FactorValueError, match="the LoRA's update is zero"):
        factors.merge(zero, "zero")
    with pytest.raises(FactorValueError, match="the LoRA's update is zero"):
        ShareFactors.fit([random_adapter(SHAPES, 3, seed=0), zero], ["ink", "zero"])
    assert factors.style_names == ["ink"]


# -- style weights and scales ------------------------------------------------------------------------

BAD_REQUESTS = [
    ({"style": {"ink": float("inf")}}, "must be a finite number, got inf"),
    ({"style": {"ink": float("nan")}}, "must be a finite number, got nan"),
    ({"style": "ink", "style_scale": float("nan")}, "style scale must be a finite number, got nan"),
    ({"style": {"ink": 1e30}}, r"style 'ink' would get weight 1e\+30 .* within \+-1000"),
    ({"style": "ink", "style_scale": 1e30}, r"style scale 1e\+30 is out of range"),
    ({"style": [{"ink": 0.5}, {"ink": -1e4}]}, r"style 'ink' would get weight -10000"),
]


@pytest.mark.parametrize(
    ("request_", "message"), BAD_REQUESTS, ids=["inf", "nan", "nan-scale", "huge", "huge-scale", "huge-in-list"]
)
def test_bad_weights_and_scales_are_refused_by_every_path(pipe, tmp_path, request_, message):
    prompts = ["a red cat"] * (len(request_["style"]) if isinstance(request_["style"], list) else 1)
    with pytest.raises(StyleError, match=message):
        generate(pipe, prompts, num_inference_steps=1, **request_)
    with pytest.raises(StyleError, match=message):
        pipe.set_style(request_["style"], request_.get("style_scale", 1.0))
    if isinstance(request_["style"], dict) or "style_scale" in request_:
        with pytest.raises(StyleError, match=message):
            pipe.fuse_style(request_["style"], request_.get("style_scale", 1.0))
        assert pipe.share.fused_style is None
    if isinstance(request_["style"], dict):
        with pytest.raises(StyleError, match=message):
            pipe.export_style_as_lora(request_["style"], tmp_path / "exported.safetensors")
        with pytest.raises(StyleError, match=message):
            style_as_lora(pipe.share_factors, request_["style"])  # was a bare _LinAlgError for NaN
        assert not (tmp_path / "exported.safetensors").exists()


def test_numpy_weights_are_numbers(pipe):
    as_numpy = generate(pipe, ["a red cat"], num_inference_steps=1, style={"ink": np.float32(0.5)})
    as_float = generate(pipe, ["a red cat"], num_inference_steps=1, style={"ink": 0.5})
    np.testing.assert_array_equal(as_numpy, as_float)
    assert np.isfinite(as_numpy).all()


def test_zero_blend_export_is_refused(pipe, tmp_path):
    with pytest.raises(FactorValueError, match="zero on every layer: there is no update to export"):
        pipe.export_style_as_lora({"ink": 0.0}, tmp_path / "zero.safetensors")


# -- names and state -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("x=1,y", "contains '='"),
        ("a,b", "contains ','"),
        ("a\nb", r"contains '\\n'"),
        ("tab\there", r"contains '\\t'"),
        (" a ", "starts or ends with whitespace; use 'a'"),
        ("a ", "starts or ends with whitespace"),
        ("", "non-empty"),
        ("   ", "non-empty"),
        (7, "non-empty string"),
    ],
)
def test_names_the_style_syntax_cannot_address_are_refused(pipe, loras, name, message):
    with pytest.raises(StyleError, match=message):
        validate_style_name(name, [])
    with pytest.raises(StyleError, match=message):
        pipe.merge_lora(loras["sepia"], style_name=name)
    with pytest.raises(StyleError, match=message):
        pipe.rename_style("ink", name)
    assert pipe.list_styles() == ["ink"]


def test_addressable_names_are_accepted():
    for name in ("oil paint", "ink-2", "Ölfarbe", "水墨", "a.b_c"):
        assert validate_style_name(name, []) == name


def test_rename_moves_the_default_style(pipe, loras):
    pipe.merge_lora(loras["sepia"], style_name="sepia")
    pipe.set_style({"ink": 0.5, "sepia": 0.5})
    pipe.rename_style("ink", "ink v2")
    renamed = generate(pipe, ["a red cat"], num_inference_steps=1)  # the default style: must not fail
    explicit = generate(pipe, ["a red cat"], num_inference_steps=1, style={"ink v2": 0.5, "sepia": 0.5})
    np.testing.assert_array_equal(renamed, explicit)
    pipe.set_style("sepia")
    pipe.rename_style("sepia", "sepia v2")
    np.testing.assert_array_equal(
        generate(pipe, ["a red cat"], num_inference_steps=1),
        generate(pipe, ["a red cat"], num_inference_steps=1, style="sepia v2"),
    )


def test_set_style_is_refused_while_a_style_is_fused(pipe):
    pipe.fuse_style("ink")
    with pytest.raises(ShareStateError, match="fused; unfuse_style"):
        pipe.set_style("ink")
    pipe.set_style(None)  # the base (here: the fused weights) is always allowed
    pipe.unfuse_style()
    pipe.set_style("ink")


def test_a_style_renamed_while_fused_is_named_by_its_new_name(pipe):
    """The refusals while a style is fused name it; after a rename (typed in another Unicode form: the bank's
    spelling is what is stored) they named the old name, which no longer exists."""
    pipe.rename_style("ink", "encre caf\u00e9")
    pipe.fuse_style({"encre cafe\u0301": 0.5})  # decomposed: the same style
    pipe.rename_style("encre cafe\u0301", "ink v2")
    with pytest.raises(ShareStateError, match=re.escape("style {'ink v2': 0.5} is fused; unfuse_style()")):
        pipe.set_style("ink v2")
    with pytest.raises(ShareStateError, match=re.escape("while style {'ink v2': 0.5} is fused")):
        pipe.delete_style("ink v2")
    pipe.unfuse_style()
    pipe.set_style("ink v2")


@pytest.mark.parametrize("name", [None, 3, 1.5])
def test_a_style_name_that_is_no_string_is_a_style_error(pipe, tmp_path, name):
    """unicodedata's bare TypeError ("normalize() argument 2 must be str") before: not a ShareError."""
    message = rf"a style name is a string, got {name!r} \({type(name).__name__}\)"
    for call in (
        lambda: generate(pipe, ["a cat"], style={name: 1.0}),
        lambda: pipe.delete_style(name),
        lambda: pipe.rename_style(name, "x"),
        lambda: pipe.export_style_as_lora({name: 1.0}, tmp_path / "x.safetensors"),
    ):
        with pytest.raises(StyleError, match=message):
            call()
    assert pipe.list_styles() == ["ink"]


def test_refusals_are_share_errors_and_builtin_kinds():
    """The CLI and the app catch ShareError; code that caught ValueError / RuntimeError still does."""
    assert issubclass(LoraFormatError, ShareError) and issubclass(LoraFormatError, ValueError)
    assert issubclass(FactorValueError, ShareError) and issubclass(FactorValueError, ValueError)
    assert issubclass(ShareStateError, ShareError) and issubclass(ShareStateError, RuntimeError)
    assert issubclass(StyleError, ShareError)


def test_checkpoint_written_after_refusals_round_trips(pipe, loras, tmp_path):
    for case in ("nan-alpha", "huge-alpha", "zero"):
        with pytest.raises(ShareError):
            pipe.merge_lora(loras[case], style_name="bad")
    pipe.save_share_factors(tmp_path)
    assert load_factors(tmp_path).style_names == ["ink"]


def test_exported_lora_gets_the_default_mode(pipe, tmp_path):
    previous = os.umask(0o022)
    try:
        path = pipe.export_style_as_lora("ink", tmp_path / "ink.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ink.safetensors"]


def test_write_failures_are_one_line_share_errors(pipe, tmp_path, monkeypatch):
    from share_diffusers.core import checkpoint

    pipe.save_share_factors(tmp_path / "factors")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(
        ShareIOError, match=r"cannot save the checkpoint to .*factors \(No space left on device\); the prev"
    ):
        pipe.save_share_factors(tmp_path / "factors")
    monkeypatch.undo()
    assert load_factors(tmp_path / "factors").style_names == ["ink"]
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ShareIOError, match="cannot create"):
        pipe.save_share_factors(blocker / "factors")
    with pytest.raises(ShareIOError, match="cannot write the LoRA"):
        pipe.export_style_as_lora("ink", blocker / "ink.safetensors")


def test_hub_and_path_mistakes_are_share_errors(pipe, loras):
    with pytest.raises(HubError, match="'a/b c' is not a valid Hub repo id"):
        pipe.merge_lora("a/b c", weight_name="x.safetensors", style_name="x")
    with pytest.raises(HubError, match="has no subfolder 'nope'"):
        pipe.merge_lora(loras["ink"].parent, subfolder="nope", style_name="x")
    assert pipe.list_styles() == ["ink"]


def test_a_file_name_that_is_no_style_name_asks_for_one(tmp_path, loras):
    odd = tmp_path / "ink, v2.safetensors"
    odd.write_bytes(loras["ink"].read_bytes())
    pipe = _pipe()
    with pytest.raises(StyleError, match=r"contains ','.*\(the name comes from ink, v2.safetensors\); pass style_name"):
        pipe.merge_lora(odd)
    pipe.merge_lora(odd, style_name="ink v2")
    assert pipe.list_styles() == ["ink v2"]


def test_share_layers_injected_by_hand_are_not_silently_replaced(loras, tmp_path):
    from share_diffusers.core import ShareModel

    pipe = _pipe()
    by_hand = ShareModel.inject(pipe.transformer, target_modules=["to_q"])
    for call in (
        lambda: pipe.merge_lora(loras["ink"], style_name="ink"),
        lambda: pipe.new_share_subspace(),
    ):
        with pytest.raises(ShareStateError, match="holds Share layers this pipeline did not load"):
            call()
    assert ShareModel.of(pipe.transformer) is by_hand and len(by_hand.layers) > 0
    by_hand.remove()
    pipe.merge_lora(loras["ink"], style_name="ink")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rank": True}, "rank must be an integer, got True"),
        ({"rank": "8"}, "rank must be an integer, got '8'"),
        ({"rank": 0}, "rank k must be >= 1"),
        ({"pseudo_rank": 2.5}, "pseudo_rank must be an integer"),
        ({"rank": None, "variance": float("nan")}, "variance must be a number"),
        ({"center": "yes"}, "center must be True or False"),
    ],
)
def test_config_values_are_checked(fields, message):
    with pytest.raises(ShareValueError, match=message):
        ShareConfig(**fields)


def test_numpy_integers_make_a_saveable_config(tmp_path):
    config = ShareConfig(rank=np.int64(6), pseudo_rank=np.int32(3))
    assert type(config.rank) is int and type(config.pseudo_rank) is int
    factors = ShareFactors.fit([random_adapter(SHAPES, 3, seed=0)], ["ink"], config)
    save_factors(factors, tmp_path)
    assert load_factors(tmp_path).config == config


def _peft_folder(path, config, tensors=None):
    path.mkdir()
    generator = torch.Generator().manual_seed(0)
    tensors = tensors or {
        "base_model.model.blocks.0.to_q.lora_A.weight": torch.randn(2, 24, generator=generator),
        "base_model.model.blocks.0.to_q.lora_B.weight": torch.randn(32, 2, generator=generator),
    }
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"r": 2, "lora_alpha": float("nan")}, r"layer 'blocks.0.to_q' has lora_alpha nan in its adapter config"),
        ({"r": 2, "lora_alpha": float("inf")}, r"layer 'blocks.0.to_q' has lora_alpha inf"),
        ({"r": 2, "lora_alpha": "16"}, r"has lora_alpha '16'"),
        ({"r": "2", "lora_alpha": 4}, r"adapter_config.json says r='2'"),
        ({"r": 2, "alpha_pattern": ["to_q"]}, "alpha_pattern in the adapter config must map"),
        ({"r": 2, "rank_pattern": {"(": 2}}, r"rank_pattern '\(' is not a valid pattern"),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_peft_folders_with_bad_scales_are_refused(tmp_path, config, message):
    from share_diffusers.lora_files import load_lora

    folder = _peft_folder(tmp_path / "adapter", config)
    with pytest.raises(LoraFormatError, match=message) as caught:
        load_lora(folder)
    assert "adapter" in str(caught.value)


def test_alpha_tensor_nan_is_refused_in_a_plain_file(tmp_path):
    from share_diffusers.lora_files import load_lora

    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "lora.safetensors"
    tensors = {
        "blocks.0.to_q.lora_A.weight": torch.randn(2, 24, generator=generator),
        "blocks.0.to_q.lora_B.weight": torch.randn(32, 2, generator=generator),
        "blocks.0.to_q.alpha": torch.tensor(float("nan")),
    }
    save_file(tensors, str(path))
    with pytest.raises(LoraFormatError, match=r"lora.safetensors: tensor 'blocks.0.to_q.alpha' holds alpha nan"):
        load_lora(path)


def _foreign_files(root, loras):
    """LoRA files with no Flux transformer layer Share could merge, and what the refusal must say."""
    generator = torch.Generator().manual_seed(0)

    def pair(stem, n_out, d_in, down="lora_A", up="lora_B"):
        return {
            f"{stem}.{down}.weight": torch.randn(4, d_in, generator=generator),
            f"{stem}.{up}.weight": torch.randn(n_out, 4, generator=generator),
        }

    kohya_te = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    kohya_unet = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    files = {
        "text-encoder": pair("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 32, 32),
        "kohya-text-encoder": {
            **pair(kohya_te, 32, 32, "lora_down", "lora_up"),
            f"{kohya_te}.alpha": torch.tensor(2.0),
        },
        "unet": pair("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640, 640),
        "kohya-unet": {
            **pair(kohya_unet, 640, 640, "lora_down", "lora_up"),
            f"{kohya_unet}.alpha": torch.tensor(4.0),
        },
        "unprefixed": pair("transformer_blocks.0.attn.to_q", 32, 32),
        "empty": {},
        "no-share-layer": load_file(str(loras["ff"])),
    }
    paths = {}
    for name, tensors in files.items():
        paths[name] = root / f"{name}.safetensors"
        save_file(tensors, str(paths[name]))
    return paths


FOREIGN = [
    ("text-encoder", r"text-encoder.safetensors holds only text-encoder layers \(e.g. 'text_encoder.text_model[^)]+\)"),
    ("kohya-text-encoder", r"kohya-text-encoder.safetensors holds only text-encoder layers \(e.g. 'lora_te1_"),
    ("unet", r"unet.safetensors holds UNet layers .* it is a LoRA for another model \(Stable Diffusion / SDXL\)"),
    ("kohya-unet", r"kohya-unet.safetensors: .*its keys name UNet blocks .*a LoRA for another model"),
    (
        "unprefixed",
        r"unprefixed.safetensors: its keys lack diffusers' 'transformer.' prefix \(e.g. "
        r"'transformer_blocks.0.attn.to_q.lora_A.weight', expected 'transformer.transformer_blocks.0.attn.to_q",
    ),
    ("empty", r"empty.safetensors holds no tensors \(an empty safetensors file\)"),
    (
        "no-share-layer",
        r"no-share-layer.safetensors: none of the LoRA's 2 transformer layer\(s\) \(e.g. "
        r"'transformer_blocks.0.ff.net.2'\) is one of the \d+ Share layer\(s\)",
    ),
]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory, loras):
    root = tmp_path_factory.mktemp("foreign")
    loras = {**loras, "ff": write_diffusers_lora(root / "ff", seed=4, rank=2, alpha=2, targets=["ff.net.2"])}
    return _foreign_files(root, loras)


@pytest.mark.parametrize(("case", "message"), FOREIGN, ids=[case for case, _ in FOREIGN])
def test_loras_without_flux_transformer_layers_say_what_they_hold(pipe, foreign, case, message):
    before = _state(pipe)
    with pytest.raises(ShareError, match=message) as caught:
        pipe.merge_lora(foreign[case], style_name="bad")
    assert "\n" not in str(caught.value) and "'no transformer layer'" not in str(caught.value)
    _assert_unchanged(pipe, before)


def test_an_alpha_of_several_values_is_refused_by_key(tmp_path):
    """A vector ``alpha`` was ignored by the plain reader (the LoRA merged at scale 1) and gave torch's bare
    "only one element tensors can be converted to Python scalars" in the Flux reader."""
    from share_diffusers.flux_lora import convert_flux_lora
    from share_diffusers.lora_files import load_lora

    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "lora.safetensors"
    tensors = {
        "blocks.0.to_q.lora_A.weight": torch.randn(2, 24, generator=generator),
        "blocks.0.to_q.lora_B.weight": torch.randn(32, 2, generator=generator),
        "blocks.0.to_q.alpha": torch.tensor([4.0, 4.0, 4.0]),
    }
    save_file(tensors, str(path))
    message = r"lora.safetensors: tensor 'blocks.0.to_q.alpha' holds 3 values; an alpha is one number"
    with pytest.raises(LoraFormatError, match=message):
        load_lora(path)
    flux = load_file(str(write_diffusers_lora(tmp_path / "ink", seed=1, rank=4, alpha=8)))
    alpha_key = next(key for key in flux if key.endswith(".lora_A.weight")).removesuffix(".lora_A.weight") + ".alpha"
    flux[alpha_key] = torch.tensor([8.0, 8.0])
    with pytest.raises(LoraFormatError, match=f"ink.safetensors: tensor '{alpha_key}' holds 2 values; an alpha is"):
        convert_flux_lora(flux, origin="ink.safetensors")
