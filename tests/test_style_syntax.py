"""The text form of styles (``runtime.parse_style`` / ``format_style``) with per-block weights: what each form
means, that text and spec round-trip, the errors naming the entry at fault, and that a parsed per-block
style is the Python spec to the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from flux_helpers import generate

from share_diffusers import ShareFluxPipeline
from share_diffusers.core import StyleError
from share_diffusers.core.factors import validate_style_name
from share_diffusers.demo_styles import make_demo_styles
from share_diffusers.runtime import format_style, parse_block_weights, parse_style
from share_diffusers.tiny_flux import build_tiny_flux_pipeline

VECTOR = [1.0] * 19 + [0.5] * 37 + [0.0]  # FLUX.1's 57 blocks: double 0-18, then single 0-37

# (canonical text, spec): format_style(spec) is the text and parse_style(text) the spec.
FORMS = [
    ("ink[double=1,single=0.3]", {"ink": {"double": 1.0, "single": 0.3}}),
    ("ink[double.0-9=1,*=0.2]", {"ink": {"double.0-9": 1.0, "*": 0.2}}),
    ("ink[transformer_blocks.3=-0.5]", {"ink": {"transformer_blocks.3": -0.5}}),
    ("ink[1,1,0.5,0]", {"ink": [1.0, 1.0, 0.5, 0.0]}),
    ("ink[" + ",".join(f"{value:g}" for value in VECTOR) + "]", {"ink": VECTOR}),
    ("ink[double=1,single=0.3],neon=0.5", {"ink": {"double": 1.0, "single": 0.3}, "neon": 0.5}),
    ("neon=0.5,ink[single=1],sepia[0,1,0,1]", {"neon": 0.5, "ink": {"single": 1.0}, "sepia": [0.0, 1.0, 0.0, 1.0]}),
    ("ink[double=1]", {"ink": {"double": 1.0}}),  # one style with per-block weights stays a blend
    ("ink=0.1,neon=0.30000000000000004", {"ink": 0.1, "neon": 0.1 + 0.2}),  # exactly, not to 6 digits
    ("ink[double=1e-07,single=1.5e+30]", {"ink": {"double": 1e-7, "single": 1.5e30}}),
    ("ink=0.5,neon=0.25", {"ink": 0.5, "neon": 0.25}),
    ("ink", "ink"),
    ("none", None),
]


@pytest.mark.parametrize(("text", "spec"), FORMS)
def test_text_and_spec_round_trip(text, spec):
    assert parse_style(text) == spec
    assert format_style(spec) == text
    assert parse_style(format_style(spec)) == spec
    assert format_style(parse_style(text)) == text


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        (" ink [ double = 1 , single=0.3 ] , neon = 0.5 ", {"ink": {"double": 1.0, "single": 0.3}, "neon": 0.5}),
        ("ink[double=1,single=3e-1]", {"ink": {"double": 1.0, "single": 0.3}}),
        ("ink[ 1 , -1 ]", {"ink": [1.0, -1.0]}),
        ("ink=1", {"ink": 1.0}),
    ],
)
def test_spaces_and_number_forms(text, spec):
    assert parse_style(text) == spec


def test_format_takes_any_numbers_and_sequences():
    assert format_style({"ink": {"double": 1, "single": np.float32(0.5)}}) == "ink[double=1,single=0.5]"
    assert format_style({"ink": (1, 0.5)}) == "ink[1,0.5]"
    assert format_style({"ink": np.float64(1.0)}) == "ink"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ink[double=1", "blend entry 'ink[double=1' has no closing ']'"),
        ("ink[double=1,single=0.3", "blend entry 'ink[double=1,single=0.3' has no closing ']'"),
        ("ink],neon=1", "blend entry 'ink]' has a ']' without '['"),
        ("ink[double=[1]]", "blend entry 'ink[double=[1]]': brackets do not nest; one pair per style"),
        ("ink[double=1]x", "blend entry 'ink[double=1]x': nothing may follow the ']'"),
        ("ink[double=1] neon=1", "blend entry 'ink[double=1] neon=1': nothing may follow the ']'"),
        ("[double=1]", "blend entry '[double=1]' has no style name before '['"),
        (
            "ink=0.8[double=1]",
            "blend entry 'ink=0.8[double=1]': give 'ink' a weight (ink=0.5) or per-block weights "
            "(ink[double=1,single=0.3]), not both",
        ),
        ("ink[]", "the per-block weights of 'ink' are empty: give e.g. ink[double=1,single=0.3]"),
        ("ink[ ]", "the per-block weights of 'ink' are empty"),
        ("ink[double=1,]", "the per-block weights of 'ink' have an empty item: 'double=1,'"),
        ("ink[double=1,0.5]", "the per-block weights of 'ink' mix key=value items with a bare value ('0.5')"),
        ("ink[=1]", "per-block weight '=1' of 'ink' has no block key before '='"),
        ("ink[double=1,double=0]", "block key 'double' appears twice in the per-block weights of 'ink'"),
        ("ink[double=x]", "block weight 'double' of 'ink' must be a number, got 'x'"),
        ("ink[double=]", "block weight 'double' of 'ink' must be a number, got ''"),
        ("ink[single=nan]", "block weight 'single' of 'ink' must be finite, got 'nan'"),
        ("ink[1,x,1]", "value 2 of the block-weight vector of 'ink' must be a number, got 'x'"),
        ("ink[1,inf]", "value 2 of the block-weight vector of 'ink' must be finite, got 'inf'"),
        ("ink[double=1],neon", "blend entry 'neon' must be name=weight, e.g. ink=0.5"),
        ("ink[double=1],neon=x", "blend weight of 'neon' must be a number, got 'x'"),
        ("ink[double=1],ink=0.5", "style 'ink' appears twice in the blend 'ink[double=1],ink=0.5'"),
    ],
)
def test_bad_text_names_the_entry(text, message):
    with pytest.raises(ValueError) as error:
        parse_style(text)
    assert str(error.value).startswith(message), str(error.value)


def test_parse_block_weights_is_the_inside_of_the_brackets():
    assert parse_block_weights("ink", "double=1, single=0.3") == {"double": 1.0, "single": 0.3}
    assert parse_block_weights("ink", "1,0.5") == [1.0, 0.5]
    with pytest.raises(ValueError, match="^block weight 'x' of 'ink' must be a number, got 'y'$"):
        parse_block_weights("ink", "x=y")


@pytest.fixture(scope="module")
def pipe():
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    make_demo_styles(pipe)  # ink, neon, sepia
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_parsed_text_is_the_python_spec_to_the_pipeline(pipe):
    """One call with per-block text styles per prompt equals the call with the Python specs, and the block
    weights matter (the same blend with plain weights differs)."""
    texts = ["ink[double=1,single=0.3],neon=0.5", "sepia[1,0,0.5,2]", "neon[double.1=1,*=0.25]"]
    specs = [
        {"ink": {"double": 1.0, "single": 0.3}, "neon": 0.5},
        {"sepia": [1.0, 0.0, 0.5, 2.0]},
        {"neon": {"double.1": 1.0, "*": 0.25}},
    ]
    prompts = ["a photo of a sneaker"] * 3
    from_text = generate(pipe, prompts, style=[parse_style(text) for text in texts])
    np.testing.assert_array_equal(from_text, generate(pipe, prompts, style=specs))
    plain = generate(pipe, prompts, style=[{"ink": 1.0, "neon": 0.5}, "sepia", {"neon": 1.0}])
    for index in range(3):
        assert np.abs(from_text[index] - plain[index]).max() > 1e-3, texts[index]


def test_a_bad_block_key_in_text_is_the_pipeline_error(pipe):
    from share_diffusers.core import StyleError

    with pytest.raises(StyleError, match=r"block weight key 'double\.7' of style 'ink' selects no Share layer"):
        generate(pipe, ["a cat"], num_inference_steps=1, style=parse_style("ink[double.7=1]"))


@pytest.mark.parametrize(
    ("name", "message"),
    [("ink[v2]", r"contains '\['"), ("v2]", r"contains '\]'"), ("none", "reserved"), ("None", "reserved")],
)
def test_names_the_syntax_reads_otherwise_are_refused(name, message):
    """``ink[v2]`` reads as per-block weights and ``none`` as no style: such a style could never be selected."""
    assert parse_style("none") is None and isinstance(parse_style("ink[1]"), dict)
    with pytest.raises(StyleError, match=message):
        validate_style_name(name, [])
    assert validate_style_name("nonesuch", []) == "nonesuch"
