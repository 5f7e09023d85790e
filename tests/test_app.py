"""The style studio (``share_diffusers.studio``): its text parsing and helpers (no server), its demo styles,
its error handling, then its API through ``gradio_client`` against the app running in a subprocess."""

from __future__ import annotations

import re
import threading
import zipfile
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flux_helpers import generate, write_diffusers_lora

from share_diffusers import ShareFluxPipeline, load_factors
from share_diffusers.core import BlockLayout, LoraFormatError, StyleError
from share_diffusers.demo_styles import make_demo_styles, write_demo_lora
from share_diffusers.fashion.data import CLASS_NAMES, prompt_for
from share_diffusers.runtime import DEFAULT_PROMPTS, format_style, parse_style
from share_diffusers.studio.engine import PREVIEW_PROMPT, merge_source, pick_seed, zip_folder
from share_diffusers.studio.text import blend_text, parse_prompts, parse_style_lines
from share_diffusers.tiny_flux import build_tiny_flux_pipeline

SNEAKER = "a photo of a sneaker"

# -- parsing ------------------------------------------------------------------------------------


def test_parse_prompts_keeps_non_empty_lines():
    assert parse_prompts(" a cat \n\n a castle\n") == ["a cat", "a castle"]


@pytest.mark.parametrize("text", ["", "  \n \n", None])
def test_parse_prompts_needs_one(text):
    with pytest.raises(ValueError, match=r"^enter at least one prompt \(one per line\)$"):
        parse_prompts(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", None),
        ("none", None),
        (" None ", None),
        ("ink", "ink"),
        ("ink=1", {"ink": 1.0}),
        ("ink=0.5, neon=0.25", {"ink": 0.5, "neon": 0.25}),
        ("ink=-0.5,neon=1e-1", {"ink": -0.5, "neon": 0.1}),
    ],
)
def test_parse_style(text, expected):
    assert parse_style(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("ink=0.5,neon", "blend entry 'neon' must be name=weight, e.g. ink=0.5"),
        ("=0.5", "blend entry '=0.5' must be name=weight, e.g. ink=0.5"),
        ("ink=abc", "blend weight of 'ink' must be a number, got 'abc'"),
        ("ink=", "blend weight of 'ink' must be a number, got ''"),
        ("ink=nan", "blend weight of 'ink' must be finite, got 'nan'"),
        ("ink=0.5,ink=0.5", "style 'ink' appears twice in the blend 'ink=0.5,ink=0.5'"),
        ("ink,neon", "'ink,neon': give a blend with weights, e.g. ink=0.5,neon=0.5"),
    ],
)
def test_parse_style_rejects(text, message):
    with pytest.raises(ValueError) as error:
        parse_style(text)
    assert str(error.value) == message


def test_style_lines_one_per_prompt_or_one_for_all():
    assert parse_style_lines("", 3) == [None, None, None]
    assert parse_style_lines("ink\n", 2) == ["ink", "ink"]
    assert parse_style_lines("ink\n\nnone\na=0.5,b=0.5", 3) == ["ink", None, {"a": 0.5, "b": 0.5}]


@pytest.mark.parametrize(
    "text, prompts, message",
    [
        ("ink\nneon", 3, "got 2 style lines for 3 prompts; give one line per prompt, or a single line for all"),
        ("ink\na=x", 2, "style line 2: blend weight of 'a' must be a number, got 'x'"),
    ],
)
def test_style_lines_reject(text, prompts, message):
    with pytest.raises(ValueError) as error:
        parse_style_lines(text, prompts)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "slots, expected",
    [
        ([("ink", 1.0), (None, 0.5), (None, 0.5)], "ink"),
        ([("ink", 0.5), ("neon", 0.5), ("none", 1.0)], "ink=0.5,neon=0.5"),
        ([("ink", 0.6), ("neon", 0.0), ("sepia", 0.4)], "ink=0.6,sepia=0.4"),
        ([("ink", 1.0), ("ink", 0.5)], "ink=1.5"),
        ([("ink", 0.3), ("ink", 0.6)], "ink=0.9"),  # the sum as the sliders mean it, not ink=0.8999999999999999
        ([("ink", 0.1), ("neon", 0.5), ("ink", 0.2)], "ink=0.3,neon=0.5"),  # not ink=0.30000000000000004
        ([(None, 1.0), ("none", 1.0)], "none"),
        ([], "none"),
    ],
)
def test_blend_builder_writes_a_style_line(slots, expected):
    text = blend_text(slots)
    assert text == expected
    assert format_style(parse_style(text)) == text  # the style box reads it back unchanged


@pytest.mark.parametrize(
    "slots, expected",
    [
        ([("ink", 1.0, "double=1,single=0.3"), (None, 0.5, "")], "ink[double=1,single=0.3]"),
        ([("ink", 0.5, "double=1, single=0.3"), ("neon", 0.5, "")], "ink[double=0.5,single=0.15],neon=0.5"),
        ([("ink", 0.8, "[double.0-9=1,*=0.3]")], "ink[double.0-9=0.8,*=0.24]"),  # no float noise (0.24000000000000002)
        ([("ink", 1.0, "1,0,0.5,2"), ("neon", 0.0, "double=1")], "ink[1,0,0.5,2]"),
        ([("ink", 0.5, " "), ("ink", 0.5, None)], "ink"),
    ],
)
def test_blend_builder_with_per_block_weights(slots, expected):
    text = blend_text(slots)
    assert text == expected
    assert format_style(parse_style(text)) == text


def test_blend_builder_scales_a_vector_as_the_mapping_it_stands_for():
    """A vector leaves layers outside the blocks at 1; scaled by a slot weight they must get the weight too."""
    layout = BlockLayout.of(build_tiny_flux_pipeline(0).transformer)
    text = blend_text([("ink", 0.5, "1,1,0.5,0.25")], layout)
    assert text == "ink[double.0-1=0.5,single.0=0.25,single.1=0.125,*=0.5]"
    names = [f"{block}.attn.to_q" for block in layout.blocks] + ["proj_out"]
    spec = parse_style(text)["ink"]
    assert layout.multipliers("ink", spec, names) == pytest.approx([0.5, 0.5, 0.25, 0.125, 0.5])
    assert blend_text([("ink", 1.0, "1,1,0.5,0.25")], layout) == "ink[1,1,0.5,0.25]"  # weight 1: as typed
    with pytest.raises(ValueError, match="the block vector of 'ink' needs slot weight 1: scale its values instead"):
        blend_text([("ink", 0.5, "1,1,0.5,0.25")])
    with pytest.raises(StyleError, match=r"block-weight vector of style 'ink' has 2 values; this model has 4 blocks"):
        blend_text([("ink", 0.5, "1,1")], layout)


@pytest.mark.parametrize(
    "slots, message",
    [
        ([("ink", 1.0, "double=x")], "block weight 'double' of 'ink' must be a number, got 'x'"),
        ([("ink", 1.0, "double=1,0.5")], "the per-block weights of 'ink' mix key=value items with a bare value"),
        (
            [("ink", 1.0, "double=1"), ("ink", 0.5, "")],
            "style 'ink' is in two blend slots, one with per-block weights; keep one slot",
        ),
        ([("ink", 1.0, ""), ("ink", 0.5, "single=1")], "style 'ink' is in two blend slots"),
    ],
)
def test_blend_builder_rejects_bad_per_block_weights(slots, message):
    with pytest.raises(ValueError) as error:
        blend_text(slots)
    assert str(error.value).startswith(message), str(error.value)


def test_blend_builder_per_block_line_generates_the_python_spec():
    """The page's blend builder (its handler, in process): a per-block slot writes the style line, and the
    images of that line are the pipeline's images for the same Python spec; errors reach the page as one line."""
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    import gradio as gr

    from share_diffusers.runtime import TINY_RANDOM, call_arguments, defaults_for
    from share_diffusers.studio.engine import StyleStudio
    from share_diffusers.studio.ui import BLEND_SLOTS, Handlers

    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    make_demo_styles(pipe)
    pipe.set_progress_bar_config(disable=True)
    studio = StyleStudio(pipe, defaults_for(pipe, TINY_RANDOM))
    assert studio.blocks() == "double.0-1, single.0-1"
    handlers = Handlers(studio)
    slots = ["ink", 0.5, "double=1,single=0.3", "neon", 0.5, "", None, 0.5, ""]
    assert len(slots) == 3 * BLEND_SLOTS
    line = handlers.blend(*slots)
    assert line == "ink[double=0.5,single=0.15],neon=0.5"
    scaled_vector = handlers.blend("sepia", 0.5, "1,1,0.5,0.25", *slots[3:])  # named with the pipeline's blocks
    assert scaled_vector == "sepia[double.0-1=0.5,single.0=0.25,single.1=0.125,*=0.5],neon=0.5"

    prompts = f"{SNEAKER}\n{SNEAKER}"
    settings = dict(style_scale=1.0, seed=3, randomize=False, steps=2, width=32, height=32, guidance=3.5)
    gallery, seed = handlers.generate(prompts, f"{line}\nsepia[1,0,0.5,2]", *settings.values())
    assert seed == 3
    assert [caption for _, caption in gallery] == [f"{SNEAKER} · {line}", f"{SNEAKER} · sepia[1,0,0.5,2]"]
    specs = [{"ink": {"double": 0.5, "single": 0.15}, "neon": 0.5}, {"sepia": [1.0, 0.0, 0.5, 2.0]}]
    arguments = call_arguments(pipe, studio.defaults, 2, steps=2, width=32, height=32, guidance=3.5)
    generators = [torch.Generator().manual_seed(3) for _ in range(2)]
    expected = pipe(prompt=[SNEAKER] * 2, style=specs, generator=generators, **arguments).images
    for (image, _), reference in zip(gallery, expected, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(reference))
    plain, _ = handlers.generate(SNEAKER, "ink=0.5,neon=0.5", *settings.values())
    assert not np.array_equal(np.asarray(plain[0][0]), np.asarray(gallery[0][0]))  # the block weights matter

    with pytest.raises(gr.Error) as error:
        handlers.blend("ink", 1.0, "double=x", *slots[3:])
    assert error.value.message == "block weight 'double' of 'ink' must be a number, got 'x'"
    with pytest.raises(gr.Error) as error:
        handlers.generate(SNEAKER, "ink[double.7=1]", *settings.values())
    assert error.value.message == (
        "block weight key 'double.7' of style 'ink' selects no Share layer of this model "
        "(its blocks: double.0-1, single.0-1)"
    )


# -- engine helpers -----------------------------------------------------------------------------


def test_pick_seed():
    assert pick_seed(7, False) == 7 and pick_seed(7.0, False) == 7
    assert 0 <= pick_seed(7, True) < 2**32
    with pytest.raises(ValueError, match="enter a seed, or tick 'Randomize seed'"):
        pick_seed(None, False)
    with pytest.raises(ValueError, match="the seed must be a whole number from 0 to 4294967295, got 1.5"):
        pick_seed(1.5, False)
    for seed in (float("inf"), float("nan"), -1, 2**32, True):
        with pytest.raises(ValueError, match="the seed must be a whole number"):
            pick_seed(seed, False)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(guidance=float("nan")), "guidance must be a finite number from 0, got nan"),  # drew a black image
        (dict(guidance=float("inf")), "guidance must be a finite number from 0, got inf"),
        (dict(guidance=-1.0), "guidance must be a finite number from 0, got -1.0"),
        (dict(guidance=31), "guidance must be from 0 to 30, got 31"),
        (dict(steps=2.5), "steps must be a whole number, got 2.5"),  # torch's TypeError from inside diffusers
        (dict(seed=2**64), "the seed must be a whole number from 0 to 4294967295, got 18446744073709551616"),
        (dict(seed=-1), "the seed must be a whole number from 0 to 4294967295, got -1"),
        (dict(seed=1.0), "the seed must be a whole number from 0 to 4294967295, got 1.0"),
    ],
)
def test_studio_generate_refuses_bad_settings_from_python(settings, message, monkeypatch):
    studio = tiny_studio()

    def no_call(*args, **kwargs):
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(ShareFluxPipeline, "__call__", no_call)
    call = dict(seed=0, steps=2, width=32, height=32) | settings
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        studio.generate(["a cat"], ["ink"], **call)


def test_default_prompts_are_what_the_demo_model_draws():
    """The studio starts with prompts of classes the demo model learned, captioned as in its training."""
    captions = {prompt_for(label) for label in range(len(CLASS_NAMES))}
    assert len(DEFAULT_PROMPTS) >= 2 and set(DEFAULT_PROMPTS) <= captions
    assert PREVIEW_PROMPT in captions


@pytest.mark.parametrize(
    "hub_id, upload, name, message",
    [
        ("user/lora", "/x/style.safetensors", "", "give a Hub repo id or upload a file, not both"),
        (" ", None, "", "give a Hub repo id (user/name) or upload a .safetensors LoRA file"),
        ("not a repo", None, "", "'not a repo' is not a Hub repo id like 'user/name'"),
        ("a/b/c", None, "", "'a/b/c' is not a Hub repo id like 'user/name'"),
        (None, "/x/style.txt", "s", "style.txt: only .safetensors LoRA files can be merged"),
        (
            None,
            "/x/pytorch_lora_weights.safetensors",
            " ",
            "give a style name: the file name pytorch_lora_weights.safetensors says nothing about the style",
        ),
    ],
)
def test_merge_source_rejects(hub_id, upload, name, message):
    with pytest.raises(ValueError) as error:
        merge_source(hub_id, upload, name)
    assert str(error.value) == message


def test_a_hub_merge_advises_in_the_page_s_words(tmp_path, fake_hub, monkeypatch):
    """The library's advice named Python arguments the page does not have ("pass weight_name=...", "pass
    token=..."); a file named for a Hub repo beside an upload was ignored and the upload merged."""
    import gradio as gr
    from huggingface_hub import constants

    from share_diffusers.studio.ui import Handlers

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    pipe = build_tiny_flux_pipeline(0)
    for name in ("a", "b"):
        write_demo_lora(pipe.transformer, tmp_path / "two" / name, seed=3, rank=2, alpha=2.0).rename(
            tmp_path / "two" / f"{name}.safetensors"
        )
    fake_hub.add_folder("artist/two", tmp_path / "two")
    studio = tiny_studio()
    handlers = Handlers(studio)
    quiet = dict(progress=lambda *args, **kwargs: None)
    with pytest.raises(gr.Error) as error:
        handlers.merge_lora("artist/two", "", None, "x", **quiet)
    assert error.value.message.endswith(
        "holds several .safetensors files (a.safetensors, b.safetensors); name one in 'File in the repo'"
    )
    with pytest.raises(gr.Error) as error:
        handlers.merge_lora("artist/nothing-here", "", None, "x", **quiet)
    assert error.value.message == (
        "no Hub repo 'artist/nothing-here' (or it is private: the studio reads HF_TOKEN from where it runs)"
    )
    upload = tmp_path / "two" / "a.safetensors"
    with pytest.raises(gr.Error) as error:
        handlers.merge_lora("", "b.safetensors", str(upload), "x", **quiet)
    assert (
        error.value.message
        == "'File in the repo' ('b.safetensors') picks a file of a Hub repo; clear it to merge the upload"
    )
    assert studio.styles() == ["ink", "neon", "sepia"]
    assert handlers.merge_lora("artist/two", " b.safetensors ", None, "b", **quiet).startswith("merged")


def test_merge_source_refuses_pickles_by_name():
    with pytest.raises(LoraFormatError, match="is a pickle file"):
        merge_source(None, "/x/style.bin", "s")


def test_merge_source_accepts():
    assert merge_source(" user/flux-lora ", None, "") == ("user/flux-lora", None)
    assert merge_source("", "/x/ink.safetensors", "") == ("/x/ink.safetensors", "ink")
    assert merge_source(None, "/x/pytorch_lora_weights.safetensors", " pencil ") == (
        "/x/pytorch_lora_weights.safetensors",
        "pencil",
    )


def test_zip_folder(tmp_path):
    folder = tmp_path / "share-factors"
    (folder / "sub").mkdir(parents=True)
    (folder / "share_config.json").write_text("{}")
    (folder / "sub" / "w.safetensors").write_bytes(b"123")
    archive = zip_folder(folder, tmp_path / "out.zip")
    with zipfile.ZipFile(archive) as opened:
        assert sorted(opened.namelist()) == ["share-factors/share_config.json", "share-factors/sub/w.safetensors"]
        assert opened.read("share-factors/sub/w.safetensors") == b"123"


# -- demo styles --------------------------------------------------------------------------------


def test_demo_styles_are_exact_and_deterministic():
    pipes = [build_tiny_flux_pipeline(0, ShareFluxPipeline) for _ in range(2)]
    reports = [make_demo_styles(pipe) for pipe in pipes]
    assert [r.style_name for r in reports[0]] == ["ink", "neon", "sepia"] == pipes[0].list_styles()
    assert max(r.error for r in reports[0]) < 1e-5  # k = 16 holds ranks 4 + 8 + 2
    for layer in pipes[0].share_factors.layers:
        assert torch.equal(
            pipes[0].share_factors.delta_weight(layer, "neon"), pipes[1].share_factors.delta_weight(layer, "neon")
        )


def test_demo_lora_is_an_ordinary_diffusers_lora(tmp_path):
    """Stock ``load_lora_weights`` on the demo file gives the picture the merged Share style gives."""
    path = write_demo_lora(build_tiny_flux_pipeline(0).transformer, tmp_path, seed=5, rank=4, alpha=8.0)
    stock = build_tiny_flux_pipeline(0)
    stock.load_lora_weights(str(path))
    share = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    make_demo_styles(share, names=["a"], seed=5)  # the first demo LoRA: rank 4, alpha 8, this seed
    expected = generate(stock, ["a photo of a cat"])
    assert np.abs(generate(share, ["a photo of a cat"], style="a") - expected).max() < 1e-4
    assert np.abs(generate(share, ["a photo of a cat"]) - expected).max() > 1e-2  # the style matters


# -- the map of the styles ----------------------------------------------------------------------


def test_style_overview_follows_merges_and_deletes(tmp_path):
    """The studio's map and table of kept energy: the demo styles, a rescaled copy flagged, a delete."""
    from share_diffusers.core.similarity import NearDuplicateStyleWarning, style_similarity
    from share_diffusers.runtime import TINY_RANDOM, defaults_for
    from share_diffusers.studio.engine import StyleStudio

    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    make_demo_styles(pipe)
    studio = StyleStudio(pipe, defaults_for(pipe, TINY_RANDOM))
    overview = studio.overview()
    assert overview.similarity.names == ["ink", "neon", "sepia"] == overview.layout.names
    assert torch.equal(overview.similarity.matrix, style_similarity(pipe.share_factors).matrix)
    assert overview.layout.coordinates.shape == (3, 2)
    assert overview.kept == {name: pytest.approx(1.0, abs=1e-9) for name in ["ink", "neon", "sepia"]}  # k = 16: exact
    assert set(overview.kept_by_group["ink"]) == {"single_transformer_blocks", "transformer_blocks"}
    lines = overview.markdown().splitlines()
    assert lines[0] == "| style | kept | double-stream blocks | single-stream blocks | most similar |"
    assert re.fullmatch(r"\| ink \| 100\.0% \| 100\.0% \| 100\.0% \| (neon|sepia) \(-?0\.\d\d\) \|", lines[2]), lines

    copy = write_demo_lora(build_tiny_flux_pipeline(0).transformer, tmp_path / "ink-copy", seed=0, rank=4, alpha=16.0)
    with pytest.warns(NearDuplicateStyleWarning, match="style 'ink x2' is a near-duplicate of 'ink'"):
        report = studio.merge(str(copy), "ink x2")  # ink's LoRA at twice its alpha
    assert "near-duplicate of 'ink' (1.000)" in str(report)
    overview = studio.overview()
    assert overview.nearest("ink x2") == ("ink", pytest.approx(1.0, abs=1e-5))
    assert "| ink x2 | " in overview.markdown() and "ink (1.00) **near-duplicate** |" in overview.markdown()
    studio.delete("neon")
    assert studio.overview().similarity.names == ["ink", "sepia", "ink x2"]

    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from matplotlib.figure import Figure

    from share_diffusers.studio.ui import Handlers

    figure, table = Handlers(studio).style_overview()
    assert isinstance(figure, Figure) and table == studio.overview().markdown()
    labels = [text.get_text() for text in figure.axes[0].texts]
    assert sorted(labels) == ["ink, ink x2", "sepia"]  # a style and its rescaled copy share one spot


# -- errors in the page --------------------------------------------------------------------------


def test_errors_reach_the_page_as_one_line():
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    import gradio as gr

    from share_diffusers.core.errors import StyleError
    from share_diffusers.studio.ui import user_errors

    def failing(error):
        @user_errors
        def handler():
            raise error

        with pytest.raises(gr.Error) as raised:
            handler()
        return raised.value.message

    assert failing(StyleError("unknown style 'x'")) == "unknown style 'x'"
    assert failing(ValueError("a\n  b")) == "a b"
    assert failing(RuntimeError("boom\nsecond line")) == "RuntimeError: boom second line"  # not a bare "Error"


def test_a_failed_merge_leaves_its_message_in_the_report_box():
    """The page's report box shows ``error: <message>`` after a failed merge (the toast fades)."""
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from types import SimpleNamespace

    import gradio as gr

    from share_diffusers.core.errors import StyleError
    from share_diffusers.studio.ui import Handlers

    def merge(source, name, weight_name=None):
        raise StyleError(f"a style named {name!r} already exists; pick another name or delete it first")

    handlers = Handlers(SimpleNamespace(merge=merge))
    alice, bob = SimpleNamespace(session_hash="alice"), SimpleNamespace(session_hash="bob")
    with pytest.raises(gr.Error):
        handlers.merge_lora("user/ink", "", None, "ink", request=alice, progress=lambda *a, **k: None)
    assert handlers.merge_failed(bob) == "error: the merge failed"  # another session's error stays its own
    expected = "error: a style named 'ink' already exists; pick another name or delete it first"
    assert handlers.merge_failed(alice) == expected


def test_main_reports_bad_factors_in_one_line(tmp_path, capsys):
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.studio.ui import main

    missing = tmp_path / "missing"
    assert main(["--factors", str(missing), "--device", "cpu"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last == f"error: {str(missing)!r} is neither a local Share checkpoint folder nor a Hub repo id like 'user/name'"
    )


# -- the studio on its own: empty bank, limits, stop, read-only, saving, captions ------------------


def tiny_studio(defaults=None, **options):
    """A studio on the random tiny pipeline with its three exact demo styles (ink, neon, sepia)."""
    from share_diffusers.runtime import TINY_RANDOM, defaults_for
    from share_diffusers.studio.engine import StyleStudio

    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    make_demo_styles(pipe)
    pipe.set_progress_bar_config(disable=True)
    return StyleStudio(pipe, defaults or defaults_for(pipe, TINY_RANDOM), **options)


def page_error(handler, *args, **kwargs) -> str:
    """The one-line message ``handler`` shows in the page."""
    import gradio as gr

    with pytest.raises(gr.Error) as error:
        handler(*args, **kwargs)
    return error.value.message


NO_PROGRESS = dict(progress=lambda *args, **kwargs: None)


def test_overview_of_a_bank_whose_last_style_was_deleted():
    """Deleting every style leaves layers with no style: the map and table say so instead of failing."""
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.studio.ui import Handlers

    studio = tiny_studio()
    for name in studio.styles():
        studio.delete(name)
    assert studio.pipe.share_factors is not None and studio.styles() == []
    overview = studio.overview()
    assert overview.similarity.names == [] and overview.similarity.matrix.shape == (0, 0)
    assert overview.layout.coordinates.shape == (0, 2) and overview.kept == {} == overview.kept_by_group
    assert Handlers(studio).style_overview() == (None, "No styles held yet: merge a LoRA.")
    assert Handlers(studio).style_gallery(**NO_PROGRESS) == []


def test_the_compare_menu_keeps_typed_blends_of_styles_still_held():
    """After a merge, undo or delete the style menus are refreshed: the Compare selection keeps its blends (they
    were dropped, being no menu choice) and loses only what names a deleted style."""
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.studio.ui import Handlers

    studio = tiny_studio()
    handlers = Handlers(studio)
    selection = ["none", "ink", "ink=0.5,neon=0.5", "neon[double=1]", "sepia=0.5,ink=0.5", "sepia", "ink,neon"]
    assert handlers.style_menus(selection)[3]["value"] == selection[:-1]  # "ink,neon" does not parse
    studio.delete("sepia")
    update = handlers.style_menus(selection)[3]
    assert update["choices"] == ["none", "ink", "neon"]
    assert update["value"] == ["none", "ink", "ink=0.5,neon=0.5", "neon[double=1]"]


def test_demo_limits_are_what_the_demo_model_draws():
    """The demo model draws at its training size only (32x32; at 48 it tiles, at 64 it draws next to
    nothing), and one call's work is bounded; the page's sliders follow the limits."""
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    import gradio as gr

    from share_diffusers.fashion.model import RESOLUTION
    from share_diffusers.runtime import DEMO_DEFAULTS, FLUX_DEV_DEFAULTS, FLUX_SCHNELL_DEFAULTS, TINY_RANDOM_DEFAULTS
    from share_diffusers.studio.ui import build_demo

    assert DEMO_DEFAULTS.max_size == RESOLUTION == DEMO_DEFAULTS.width == DEMO_DEFAULTS.height == 32
    assert DEMO_DEFAULTS.max_work == 16 * 32 * 32 * 32  # a full batch at 32 steps: 3.4 s on 2 idle CPU cores
    for defaults in (DEMO_DEFAULTS, TINY_RANDOM_DEFAULTS, FLUX_DEV_DEFAULTS, FLUX_SCHNELL_DEFAULTS):
        # A full batch at the default size and steps, and a chunk of previews, are allowed.
        defaults.check_call(defaults.max_batch, defaults.steps, defaults.width, defaults.height)
        defaults.check_call(defaults.max_batch, defaults.steps, defaults.preview_size, defaults.preview_size)
    # What one request held the server with before: 16 images of 256x256 at 50 steps (about 14 minutes).
    assert DEMO_DEFAULTS.max_batch * DEMO_DEFAULTS.max_steps * DEMO_DEFAULTS.max_size**2 <= 1_000_000

    studio = tiny_studio(replace(DEMO_DEFAULTS, size_step=4))
    demo = build_demo(studio)
    sliders = {block.label: block for block in demo.blocks.values() if isinstance(block, gr.Slider)}
    assert (sliders["Width"].minimum, sliders["Width"].maximum, sliders["Width"].step) == (4, 32, 4)
    assert sliders["Height"].maximum == 32 and sliders["Steps"].maximum == DEMO_DEFAULTS.max_steps


@pytest.mark.parametrize(
    "prompts, steps, width, height, message",
    [
        (
            "\n".join([SNEAKER] * 16),
            50,
            32,
            32,
            "too much work for one call: 50 steps x 16 images x 32x32 pixels = 819,200 pixel-steps, over this "
            "model's limit of 524,288; use fewer steps, fewer images or a smaller size",
        ),
        (SNEAKER, 51, 32, 32, "steps must be from 1 to 50, got 51"),
        (SNEAKER, 16, 64, 32, "the width must be from 4 to 32 pixels on this model, got 64"),
        ("\n".join([SNEAKER] * 17), 1, 4, 4, "at most 16 images per call, got 17"),
    ],
)
def test_a_call_over_the_limits_is_refused_before_it_runs(prompts, steps, width, height, message, monkeypatch):
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.runtime import DEMO_DEFAULTS
    from share_diffusers.studio.ui import Handlers

    studio = tiny_studio(replace(DEMO_DEFAULTS, size_step=4))

    def no_call(*args, **kwargs):
        raise AssertionError("the pipeline ran")

    monkeypatch.setattr(ShareFluxPipeline, "__call__", no_call)
    handlers = Handlers(studio)
    settings = (1.0, 0, False, steps, width, height, 3.0)
    assert page_error(handlers.generate, prompts, "ink", *settings) == message
    if len(prompts.splitlines()) == 16:  # Compare counts its styles as images
        assert page_error(handlers.compare, SNEAKER, ["ink"] * 16, *settings) == message


@pytest.mark.parametrize(
    "width, height, message",
    [
        (33, 32, "the width must be a multiple of 4 (this model's size step), got 33: use 32 or 36"),
        (32, 30, "the height must be a multiple of 4 (this model's size step), got 30: use 28 or 32"),
    ],
)
def test_a_size_off_the_size_step_is_refused_not_resized(width, height, message):
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.studio.ui import Handlers

    handlers = Handlers(tiny_studio())
    assert page_error(handlers.generate, SNEAKER, "ink", 1.0, 0, False, 2, width, height, 3.5) == message


@pytest.mark.parametrize(
    "steps, width, height, guidance, message",
    [
        (2.5, 32, 32, 3.5, "steps must be a whole number, got 2.5"),  # ran 2 steps, captioned as asked
        (2, 32.5, 32, 3.5, "the width must be a whole number, got 32.5"),
        (2, 32, float("nan"), 3.5, "the height must be a whole number, got nan"),
        (None, 32, 32, 3.5, "steps must be a whole number, got None"),  # was "TypeError: int() argument must be..."
    ],
)
def test_page_settings_that_are_not_whole_numbers_are_refused_not_cut(steps, width, height, guidance, message):
    """A slider sends floats (the API any number): a fraction of a step or pixel is refused, never truncated."""
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.studio.ui import Handlers

    handlers = Handlers(tiny_studio())
    settings = (1.0, 0, False, steps, width, height, guidance)
    assert page_error(handlers.generate, SNEAKER, "ink", *settings) == message
    assert page_error(handlers.compare, SNEAKER, ["ink"], *settings) == message
    gallery, _ = handlers.generate(SNEAKER, "ink", 1.0, 0, False, 2.0, 32.0, 32.0, 3)  # whole floats are fine
    assert len(gallery) == 1


class _SetAfter:
    """A stop event that reads as set from its ``calls``-th look on (the studio looks once before the first
    step, then after every step)."""

    def __init__(self, calls: int):
        self.calls, self.looks = calls, 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.calls


def test_stop_ends_a_generation_between_steps_and_frees_the_pipeline():
    from share_diffusers.studio.engine import GenerationStopped

    studio = tiny_studio()
    with pytest.raises(GenerationStopped, match=r"^stopped after step 2 of 40$"):
        studio.generate([SNEAKER], ["ink"], 0, steps=40, stop=_SetAfter(3))
    with pytest.raises(GenerationStopped, match=r"^stopped before it started$"):
        studio.generate([SNEAKER], ["ink"], 0, steps=40, stop=_SetAfter(1))
    # The style state was undone and the lock released: the next call is the unstopped picture.
    image = studio.generate([SNEAKER], ["ink"], 0, steps=2, stop=threading.Event())[0]
    assert np.array_equal(np.asarray(image), np.asarray(studio.generate([SNEAKER], ["ink"], 0, steps=2)[0]))


def test_the_stop_button_stops_only_its_own_session():
    """``Handlers.stop`` sets the stop events of the caller's session; the page's Stop buttons also cancel
    queued generate and compare calls (Gradio's ``cancels``)."""
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.studio.engine import GenerationStopped
    from share_diffusers.studio.ui import Handlers, build_demo

    started = threading.Event()

    def generate(prompts, specs, seed, style_scale, stop, **settings):
        started.set()
        if not stop.wait(timeout=30):
            raise AssertionError("never stopped")
        raise GenerationStopped("stopped after step 1 of 50")

    handlers = Handlers(SimpleNamespace(generate=generate))
    alice, bob = SimpleNamespace(session_hash="alice"), SimpleNamespace(session_hash="bob")
    messages = []
    worker = threading.Thread(
        target=lambda: messages.append(
            page_error(handlers.generate, SNEAKER, "ink", 1.0, 0, False, 50, 32, 32, 3.5, request=alice)
        )
    )
    worker.start()
    assert started.wait(timeout=30)
    handlers.stop(bob)
    worker.join(timeout=0.3)
    assert worker.is_alive()  # another session's Stop does not touch it
    handlers.stop(alice)
    worker.join(timeout=30)
    assert messages == ["stopped after step 1 of 50"]

    demo = build_demo(tiny_studio())
    dependencies = demo.config["dependencies"]
    index = {dependency["api_name"]: number for number, dependency in enumerate(dependencies)}
    cancelling = [dependency for dependency in dependencies if dependency["cancels"]]
    assert len(cancelling) == 2  # one Stop button in Generate, one in Compare
    assert all(sorted(dependency["cancels"]) == [index["generate"], index["compare"]] for dependency in cancelling)


def test_queue_and_cache_are_bounded(tmp_path, capsys):
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.studio.ui import DELETE_CACHE, MAX_QUEUE, build_demo, build_parser, main

    demo = build_demo(tiny_studio(), max_queue=3)
    assert demo._queue.max_size == 3
    assert demo.delete_cache == DELETE_CACHE == (3600, 3600)
    assert build_parser().parse_args([]).max_queue == MAX_QUEUE == 16
    assert main(["--max-queue", "0", "--factors", str(tmp_path / "never-loaded")]) == 1
    assert capsys.readouterr().err.strip() == "error: --max-queue must be at least 1, got 0"


def test_read_only_studio_refuses_merge_and_delete(tmp_path):
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    import gradio as gr

    from share_diffusers.studio.engine import READ_ONLY_MESSAGE
    from share_diffusers.studio.ui import Handlers, build_demo, build_parser

    assert build_parser().parse_args(["--read-only"]).read_only and not build_parser().parse_args([]).read_only
    studio = tiny_studio(read_only=True)
    handlers = Handlers(studio)
    lora = write_demo_lora(build_tiny_flux_pipeline(0).transformer, tmp_path / "pencil", seed=3, rank=2, alpha=2.0)
    expected = "this studio is read-only: merging and deleting styles are turned off (started with --read-only)"
    assert READ_ONLY_MESSAGE == expected
    assert page_error(handlers._merge_lora, "", "", str(lora), "pencil", NO_PROGRESS["progress"]) == expected
    assert page_error(handlers.delete_style, "ink") == expected
    assert studio.styles() == ["ink", "neon", "sepia"]
    assert zipfile.is_zipfile(handlers.save_factors())  # saving is still allowed

    demo = build_demo(studio)
    buttons = {block.value: block for block in demo.blocks.values() if isinstance(block, gr.Button)}
    for name in ("Merge", "Delete"):
        assert not buttons[name].interactive
        parent = buttons[name].parent
        while parent is not None and getattr(parent, "visible", True):
            parent = parent.parent
        assert parent is not None, f"the {name} button is on show"
    assert "Save factors" in buttons and buttons["Generate"].interactive is not False
    blocks = build_demo(tiny_studio()).blocks.values()
    writable = {block.value: block for block in blocks if isinstance(block, gr.Button)}
    assert writable["Merge"].interactive is not False and writable["Delete"].interactive is not False


def _space_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "app" / "space.py"
    spec = importlib.util.spec_from_file_location("space_entry", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, ["--host", "127.0.0.1", "--port", "7860"]),  # python app/space.py on one's own machine
        ({"SPACE_ID": "someone/share-studio"}, ["--host", "0.0.0.0", "--port", "7860"]),
        ({"SPACE_ID": ""}, ["--host", "127.0.0.1", "--port", "7860"]),
        ({"GRADIO_SERVER_NAME": "10.0.0.5", "GRADIO_SERVER_PORT": "8000"}, ["--host", "10.0.0.5", "--port", "8000"]),
        (
            {"SPACE_ID": "someone/share-studio", "SHARE_STUDIO_READ_ONLY": "1"},
            ["--host", "0.0.0.0", "--port", "7860", "--read-only"],
        ),
    ],
)
def test_space_entry_listens_on_every_interface_only_on_a_space(environ, expected):
    space = _space_module()
    assert space.studio_arguments(environ) == expected
    assert space.studio_arguments(environ, ["--model", "tiny-random"])[-2:] == ["--model", "tiny-random"]


def test_space_entry_refuses_a_read_only_value_it_cannot_read():
    """SHARE_STUDIO_READ_ONLY=y (or "enabled") started the Space open to every visitor's merges and deletes."""
    space = _space_module()
    for value in ("y", "enabled", "read-only"):
        with pytest.raises(ValueError, match=rf"^SHARE_STUDIO_READ_ONLY='{value}' is neither of 1, true, yes, on"):
            space.studio_arguments({"SPACE_ID": "someone/share-studio", "SHARE_STUDIO_READ_ONLY": value})
    for value, read_only in ((" TRUE ", True), ("off", False), ("", False), ("0", False)):
        arguments = space.studio_arguments({"SHARE_STUDIO_READ_ONLY": value})
        assert ("--read-only" in arguments) is read_only


def test_merge_report_shows_how_the_other_styles_errors_moved(tmp_path):
    """A merge turns the shared bases: the report gives each other style's error before and after."""
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.studio.ui import Handlers

    studio = tiny_studio()
    factors = studio.pipe.share_factors
    before = {name: factors.style_error(name) for name in studio.styles()}
    assert max(before.values()) < 1e-6  # exact demo styles
    lora = write_diffusers_lora(tmp_path / "pencil", seed=11, rank=4, alpha=4)
    report = Handlers(studio)._merge_lora("", "", str(lora), "pencil", NO_PROGRESS["progress"])
    factors = studio.pipe.share_factors
    after = {name: factors.style_error(name) for name in before}
    assert all(after[name] > 1e-3 for name in before)  # more than k = 16 holds: every style loses a little
    order = sorted(before, key=lambda name: before[name] - after[name])
    # The styles were exact, so how far each moved (style_drift, from the k x k cores) is its error after.
    changes = ", ".join(
        f"{name} {before[name]:.2g} -> {after[name]:.2g} (moved {100 * after[name]:.1f}%)" for name in order
    )
    assert report.endswith(f"; other styles' error: {changes}"), report
    assert report.startswith("merged 'pencil': 22 layers, relative error ")


def test_merge_outcome_text():
    from share_diffusers.loader import MergeReport
    from share_diffusers.studio.engine import MergeOutcome

    report = MergeReport("new", 0.1, 4, 0.0)
    assert str(MergeOutcome(report)) == "merged 'new': 4 layers, relative error 1.00e-01"  # the first style
    unchanged = MergeOutcome(report, {"tint": (0.321, 0.3211)})
    assert str(unchanged).endswith("; other styles' error unchanged")
    errors = {f"s{i}": (0.1, 0.1 + 0.01 * i) for i in range(1, 9)}
    text = str(MergeOutcome(report, {"tint": (0.321, 0.681), **errors}))
    assert text.endswith(
        "; other styles' error: tint 0.32 -> 0.68, s8 0.1 -> 0.18, s7 0.1 -> 0.17, s6 0.1 -> 0.16, "
        "s5 0.1 -> 0.15, s4 0.1 -> 0.14, 3 more"
    ), text
    report.moved = {"tint": 0.5, "ink": 0.0004}
    moved = MergeOutcome(report, {"tint": (0.321, 0.681), "ink": (0.1, 0.2)})
    assert str(moved).endswith("; other styles' error: tint 0.32 -> 0.68 (moved 50.0%), ink 0.1 -> 0.2 (moved <0.1%)")


def test_repeated_saves_leave_one_zip_and_no_folders():
    studio = tiny_studio()
    first = studio.save_factors_zip()
    workdir = first.parents[1]

    def left() -> list[str]:
        return sorted(str(path.relative_to(workdir)) for path in workdir.rglob("*") if path.is_file())

    stamp = first.stat().st_mtime_ns
    for _ in range(3):
        assert studio.save_factors_zip() == first
    assert first.stat().st_mtime_ns == stamp  # the same bank: not written again
    assert left() == [str(first.relative_to(workdir))]
    assert not any(path.name == "share-factors" for path in workdir.rglob("*"))  # the unzipped folder is gone

    studio.delete("neon")
    second = studio.save_factors_zip()
    assert second != first and not first.exists()
    assert left() == [str(second.relative_to(workdir))]
    with zipfile.ZipFile(second) as opened:
        assert "share-factors/share_config.json" in opened.namelist()
        opened.extractall(workdir / "check")
    assert load_factors(workdir / "check" / "share-factors").style_names == ["ink", "sepia"]


def test_compare_refuses_a_prompt_of_several_lines():
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.studio.text import parse_single_prompt
    from share_diffusers.studio.ui import Handlers

    assert parse_single_prompt("  a cat \n\n") == "a cat"
    handlers = Handlers(tiny_studio())
    message = page_error(handlers.compare, "a cat\na dog", ["ink"], 1.0, 0, False, 2, 32, 32, 3.5)
    assert message == "Compare takes one prompt, got 2 lines; keep one (Generate takes one prompt per line)"


def test_captions_give_the_style_strength():
    """A caption reproduces its image: at a strength other than 1 it says so (``tint`` at 0.5 is not ``tint``)."""
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.runtime import style_caption
    from share_diffusers.studio.ui import Handlers

    assert style_caption("ink") == "ink" and style_caption("ink", 0.5) == "ink · strength 0.5"
    assert style_caption(None, 0.5) == "none"
    assert style_caption({"ink": 0.5, "neon": 1.0}, 2) == "ink=0.5,neon=1 · strength 2"
    handlers = Handlers(tiny_studio())
    settings = (0.5, 3, False, 2, 32, 32, 3.5)
    gallery, _ = handlers.generate(f"{SNEAKER}\n{SNEAKER}", "ink\nnone", *settings)
    assert [caption for _, caption in gallery] == [f"{SNEAKER} · ink · strength 0.5", f"{SNEAKER} · none"]
    compared, _ = handlers.compare(SNEAKER, ["ink", "none"], *settings)
    assert [caption for _, caption in compared] == ["ink · strength 0.5", "none"]
    full, _ = handlers.generate(SNEAKER, "ink", 1.0, *settings[1:])
    assert [caption for _, caption in full] == [f"{SNEAKER} · ink"]


# -- the API, on the running app ----------------------------------------------------------------

SETTINGS = dict(style_scale=1.0, seed=3, randomize=False, steps=2, width=32, height=32, guidance=3.5)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    gradio_client = pytest.importorskip("gradio_client", reason="the app extra (gradio) is not installed")
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.studio.testing import SERVER_ENV, running_studio

    home = tmp_path_factory.mktemp("studio")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in SERVER_ENV.items():
            patch.setenv(key, value)
        # The random tiny pipeline with its three random demo LoRAs: fast, and styles of known numerics.
        with running_studio("--model", "tiny-random", log_path=home / "studio.log", home=home) as url:
            yield gradio_client.Client(url, verbose=False, download_files=str(home / "downloads"))


def gallery_images(gallery) -> list[tuple[np.ndarray, str]]:
    from PIL import Image

    return [(np.asarray(Image.open(item["image"]).convert("RGB"), dtype=np.int16), item["caption"]) for item in gallery]


def app_error(client, *args, api_name: str) -> str:
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as error:
        client.predict(*args, api_name=api_name)
    return str(error.value)


def test_generate_blend_in_one_batch(client):
    gallery, seed = client.predict(SNEAKER + "\n" + SNEAKER, "ink=0.5,neon=0.5\nnone", **SETTINGS, api_name="/generate")
    styled = gallery_images(gallery)
    base, _ = client.predict(SNEAKER + "\n" + SNEAKER, "none", **SETTINGS, api_name="/generate")
    base = gallery_images(base)
    assert seed == 3
    assert [caption for _, caption in styled] == [f"{SNEAKER} · ink=0.5,neon=0.5", f"{SNEAKER} · none"]
    assert styled[0][0].shape == (32, 32, 3)
    assert np.abs(styled[0][0] - base[0][0]).mean() > 2  # the blend changes the picture
    assert np.abs(styled[1][0] - base[1][0]).max() <= 1  # the un-styled prompt of the batch does not change


def test_generate_per_block_style_line(client):
    """A per-block line through the API: its caption is the line, and it differs from the plain blend."""
    per_block, _ = client.predict(SNEAKER, "ink[double=2,single=0.3],neon=0.5", **SETTINGS, api_name="/generate")
    plain, _ = client.predict(SNEAKER, "ink=1,neon=0.5", **SETTINGS, api_name="/generate")
    (image, caption), (plain_image, _) = gallery_images(per_block)[0], gallery_images(plain)[0]
    assert caption == f"{SNEAKER} · ink[double=2,single=0.3],neon=0.5"
    assert np.abs(image - plain_image).mean() > 2  # about 15 (the tiny model's double blocks weigh most)


def test_style_strength_zero_is_the_base_model(client):
    settings = {**SETTINGS, "style_scale": 0.0}
    styled, _ = client.predict(SNEAKER, "ink", **settings, api_name="/generate")
    base, _ = client.predict(SNEAKER, "none", **settings, api_name="/generate")
    assert np.abs(gallery_images(styled)[0][0] - gallery_images(base)[0][0]).max() <= 1


def test_randomized_seed_is_returned(client):
    _, seed = client.predict(SNEAKER, "none", **{**SETTINGS, "randomize": True}, api_name="/generate")
    assert isinstance(seed, int | float) and seed == int(seed) and 0 <= seed < 2**32


def test_compare_one_image_per_style(client):
    gallery, _ = client.predict(SNEAKER, ["none", "ink", "neon=0.5,sepia=0.5"], **SETTINGS, api_name="/compare")
    images = gallery_images(gallery)
    assert [caption for _, caption in images] == ["none", "ink", "neon=0.5,sepia=0.5"]
    for first in range(3):
        for second in range(first + 1, 3):
            assert np.abs(images[first][0] - images[second][0]).mean() > 2


@pytest.mark.parametrize(
    "prompts, styles, message",
    [
        (SNEAKER, "nope", "unknown style 'nope'; styles held: 'ink', 'neon'"),
        (SNEAKER, "ink=x", "style line 1: blend weight of 'ink' must be a number, got 'x'"),
        (SNEAKER, "ink[double=1", "style line 1: blend entry 'ink[double=1' has no closing ']'"),
        (SNEAKER, "ink[double.7=1]", "block weight key 'double.7' of style 'ink' selects no Share layer"),
        ("a\nb\nc", "ink\nneon", "got 2 style lines for 3 prompts; give one line per prompt, or a single line for all"),
        ("  ", "ink", "enter at least one prompt (one per line)"),
    ],
)
def test_generate_shows_the_error(client, prompts, styles, message):
    assert message in app_error(client, prompts, styles, *SETTINGS.values(), api_name="/generate")


def test_merge_a_lora_file(client, tmp_path):
    from gradio_client import handle_file

    lora = write_diffusers_lora(tmp_path / "pencil", seed=11, rank=4, alpha=4)
    report = client.predict("", "", handle_file(str(lora)), "pencil", api_name="/merge_lora")
    other = r"(ink|neon|sepia) [0-9.e+-]+ -> [0-9.e+-]+ \(moved (\d+\.\d%|<0\.1%)\)"
    pattern = rf"merged 'pencil': 22 layers, relative error [0-9.]+e[+-]\d+; other styles' error: {other}(, {other})*"
    assert re.fullmatch(pattern, report), report
    captions = [caption for _, caption in gallery_images(client.predict(api_name="/styles"))]
    assert [caption.split(" · ")[0] for caption in captions] == ["ink", "neon", "sepia", "pencil"]
    assert re.fullmatch(r"pencil · error \d\.\de-\d\d", captions[-1]), captions
    styled, _ = client.predict(SNEAKER, "pencil", **SETTINGS, api_name="/generate")
    base, _ = client.predict(SNEAKER, "none", **SETTINGS, api_name="/generate")
    assert np.abs(gallery_images(styled)[0][0] - gallery_images(base)[0][0]).mean() > 2
    message = app_error(client, "", "", handle_file(str(lora)), "", api_name="/merge_lora")
    assert message == "give a style name: the file name pytorch_lora_weights.safetensors says nothing about the style"
    message = app_error(client, "", "", handle_file(str(lora)), "pencil", api_name="/merge_lora")
    assert message == "a style named 'pencil' already exists; pick another name or delete it first"


def test_merge_a_bad_hub_id_is_a_readable_error(client):
    message = app_error(client, "not-a/real-repo", "", None, "", api_name="/merge_lora")
    assert "not-a/real-repo" in message and "not in the local cache" in message, message
    assert "Traceback" not in message


def test_delete_style(client):
    status = client.predict("sepia", api_name="/delete_style")
    assert re.match(r"deleted 'sepia'; styles left: ink, neon\b", status), status
    captions = [caption for _, caption in gallery_images(client.predict(api_name="/styles"))]
    assert not any(caption.startswith("sepia ") for caption in captions)
    assert app_error(client, "sepia", api_name="/delete_style").startswith("unknown style 'sepia'; styles held:")


def test_delete_a_style_merged_after_start_up(client, tmp_path):
    """The API (a fresh session, the page's first choices) deletes a style merged after the page was built."""
    from gradio_client import handle_file

    lora = write_diffusers_lora(tmp_path / "charcoal", seed=12, rank=2, alpha=2)
    assert client.predict("", "", handle_file(str(lora)), "charcoal", api_name="/merge_lora").startswith("merged")
    status = client.predict("charcoal", api_name="/delete_style")
    assert status.startswith("deleted 'charcoal'; styles left:") and "charcoal" not in status.split(":", 1)[1]


def test_save_factors_zip_loads(client, tmp_path):
    archive = client.predict(api_name="/save_factors")
    with zipfile.ZipFile(archive) as opened:
        assert "share-factors/share_config.json" in opened.namelist()
        opened.extractall(tmp_path)
    held = [caption.split(" · ")[0] for _, caption in gallery_images(client.predict(api_name="/styles"))]
    assert load_factors(tmp_path / "share-factors").style_names == held


def test_style_map_endpoint_flags_a_near_duplicate(client, tmp_path):
    """``/style_map``: the map (a PNG plot) and the table, which a merged rescaled copy of a style updates."""
    import base64
    import io

    from gradio_client import handle_file
    from PIL import Image

    plot, table = client.predict(api_name="/style_map")
    header, data = plot["plot"].split(",", 1)
    assert plot["type"] == "matplotlib" and header == "data:image/png;base64"
    assert Image.open(io.BytesIO(base64.b64decode(data))).format == "PNG"
    held = [caption.split(" · ")[0] for _, caption in gallery_images(client.predict(api_name="/styles"))]
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in rows] == held

    copy = write_demo_lora(build_tiny_flux_pipeline(0).transformer, tmp_path / "ink-copy", seed=0, rank=4, alpha=16.0)
    report = client.predict("", "", handle_file(str(copy)), "ink x2", api_name="/merge_lora")
    # Earlier tests merged more styles than k = 16 holds: the copy is then a near-, not an exact, duplicate.
    duplicate = r"; near-duplicate of 'ink' \((0\.9[5-9]\d|1\.000)\) \(cosine similarity\); other styles' error"
    assert re.search(duplicate, report), report
    _, table = client.predict(api_name="/style_map")
    pattern = r"^\| ink x2 \| .* \| ink \((0\.9[5-9]|1\.00)\) \*\*near-duplicate\*\* \|$"
    assert re.search(pattern, table, re.MULTILINE), table
    assert client.predict("ink x2", api_name="/delete_style").startswith("deleted 'ink x2'")
    _, table = client.predict(api_name="/style_map")
    assert "ink x2" not in table


def test_a_hub_merge_downloads_before_it_takes_the_pipeline(tmp_path, fake_hub, monkeypatch):
    """While a Hub LoRA downloads, generations go on (the pipeline lock is free); a file over the studio's limit
    is refused from its size alone, before any byte of it is fetched."""
    from huggingface_hub import constants

    from share_diffusers.hub import HubFileTooLargeError

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    lora = write_demo_lora(build_tiny_flux_pipeline(0).transformer, tmp_path / "pencil", seed=3, rank=2, alpha=2.0)
    fake_hub.add_folder("artist/pencil-lora", lora.parent)
    studio = tiny_studio()
    downloading, release = threading.Event(), threading.Event()
    serve = fake_hub._serve

    def slow_weights(handler, body):
        if body and handler.path.endswith(".safetensors"):
            downloading.set()
            release.wait(30)
        serve(handler, body)

    monkeypatch.setattr(fake_hub, "_serve", slow_weights)
    outcome = {}
    merging = threading.Thread(target=lambda: outcome.update(report=studio.merge("artist/pencil-lora", "pencil")))
    merging.start()
    try:
        assert downloading.wait(30), "the download never started"
        images = studio.generate(["a cat"], ["ink"], seed=0, steps=1)  # the pipeline is free meanwhile
        assert len(images) == 1 and studio.styles() == ["ink", "neon", "sepia"]
    finally:
        release.set()
        merging.join(60)
    assert outcome["report"].report.source["repo_id"] == "artist/pencil-lora"
    assert studio.styles() == ["ink", "neon", "sepia", "pencil"]

    small = tiny_studio(max_merge_mb=lora.stat().st_size / 2**20 / 2)
    fake_hub.requests.clear()
    with pytest.raises(HubFileTooLargeError, match=r"^artist/pencil-lora: pytorch_lora_weights.safetensors is "):
        small.merge("artist/pencil-lora", "pencil")
    weights = "/artist/pencil-lora/resolve/main/pytorch_lora_weights.safetensors"
    assert f"HEAD {weights}" in fake_hub.requests and f"GET {weights}" not in fake_hub.requests
    assert small.styles() == ["ink", "neon", "sepia"]


def test_undo_last_merge_puts_the_bank_back(tmp_path):
    """The studio's undo: the merged style gone and the others' errors and pictures as before it, bit for bit;
    only the bank's last change, and not on a read-only studio."""
    from share_diffusers.studio.engine import READ_ONLY_MESSAGE, UNDO_NOTHING_MESSAGE
    from share_diffusers.studio.ui import Handlers

    expected = "nothing to undo: only a merge can be undone, while it is the bank's last change (no delete since)"
    assert UNDO_NOTHING_MESSAGE == expected
    studio = tiny_studio()
    handlers = Handlers(studio)
    with pytest.raises(ValueError, match=f"^{re.escape(UNDO_NOTHING_MESSAGE)}$"):
        studio.undo_merge()
    lora = write_demo_lora(build_tiny_flux_pipeline(0).transformer, tmp_path / "wide", seed=8, rank=16, alpha=16.0)
    before = studio._style_errors()
    picture = studio.generate(["a cat"], ["ink"], seed=0, steps=1)[0]
    outcome = studio.merge(str(lora), "wide")  # k = 16 cannot hold it beside the others: their errors move
    assert any(after != error for error, after in outcome.other_errors.values())
    assert studio.generate(["a cat"], ["ink"], seed=0, steps=1)[0].tobytes() != picture.tobytes()
    report = handlers.undo_merge()
    assert report == "undid the merge of 'wide': the other styles are as they were before it; styles: ink, neon, sepia"
    assert studio._style_errors() == before
    assert studio.generate(["a cat"], ["ink"], seed=0, steps=1)[0].tobytes() == picture.tobytes()
    assert page_error(handlers.undo_merge) == UNDO_NOTHING_MESSAGE  # once

    studio.merge(str(lora), "wide")
    studio.delete("wide")
    with pytest.raises(ValueError, match=re.escape(UNDO_NOTHING_MESSAGE)):
        studio.undo_merge()
    assert studio.styles() == ["ink", "neon", "sepia"]
    with pytest.raises(ValueError, match=re.escape(READ_ONLY_MESSAGE)):
        tiny_studio(read_only=True).undo_merge()


def test_undo_of_the_merge_that_created_the_subspace_removes_it(tmp_path):
    from share_diffusers.runtime import TINY_RANDOM, defaults_for
    from share_diffusers.studio.engine import StyleStudio

    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    studio = StyleStudio(pipe, defaults_for(pipe, TINY_RANDOM))
    base = studio.generate(["a cat"], [None], seed=0, steps=1)[0]
    lora = write_demo_lora(pipe.transformer, tmp_path / "first", seed=8, rank=4, alpha=4.0)
    studio.merge(str(lora), "first")
    assert studio.undo_merge() == "first"
    assert pipe.share is None and studio.styles() == []
    assert studio.generate(["a cat"], [None], seed=0, steps=1)[0].tobytes() == base.tobytes()


def test_a_studio_without_styles_says_so_in_its_own_words(tmp_path):
    """No bank yet (started without styles, or the first merge undone): generate with a style, delete and save say
    what to do in the page (they gave the Python API's "call load_share_factors(...) or merge_lora(...) first")."""
    pytest.importorskip("gradio", reason="the app extra (gradio) is not installed")
    from share_diffusers.runtime import TINY_RANDOM, defaults_for
    from share_diffusers.studio.engine import StyleStudio
    from share_diffusers.studio.ui import Handlers

    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    studio = StyleStudio(pipe, defaults_for(pipe, TINY_RANDOM))
    handlers = Handlers(studio)
    for undone in (False, True):
        if undone:
            studio.merge(str(write_demo_lora(pipe.transformer, tmp_path / "first", seed=8, rank=4, alpha=4.0)), "first")
            studio.undo_merge()
        settings = (1.0, 0, False, 1, 32, 32, 3.5)
        message = "no styles held yet: merge a LoRA first (or use the style none)"
        assert page_error(handlers.generate, SNEAKER, "first", *settings) == message
        assert page_error(handlers.compare, SNEAKER, ["none", "first=0.5"], *settings) == message
        held = "no styles held yet: merge a LoRA first"
        assert page_error(handlers.delete_style, "first") == f"unknown style 'first'; {held}"
        assert page_error(handlers.save_factors) == f"nothing to save: {held}"
        gallery, _ = handlers.generate(SNEAKER, "none", *settings)  # no style still draws
        assert len(gallery) == 1 and pipe.share is None
