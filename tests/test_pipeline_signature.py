"""``ShareFluxPipeline.__call__`` shows FluxPipeline's signature and, with no style, behaves as FluxPipeline.

Tools read a pipeline's signature: diffusers' own pipeline tests (``test_pipeline_call_signature``), its
LoRA test helpers (which look for ``joint_attention_kwargs``), ``help`` and IDEs. The signature is compared
with the installed diffusers' parameter by parameter, and calls through both pipelines are compared bit for
bit on the tiny Flux pipeline.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from flux_helpers import one_torch_thread, write_diffusers_lora

from share_diffusers import ShareFluxPipeline
from share_diffusers.pipeline_flux import DEFAULT_STYLE
from share_diffusers.tiny_flux import T5_MAX_LENGTH, build_tiny_flux_pipeline

FLUX_CALL = inspect.signature(FluxPipeline.__call__)
SHARE_CALL = inspect.signature(ShareFluxPipeline.__call__)
BASE = dict(height=32, width=32, num_inference_steps=2, max_sequence_length=16, output_type="np")

single_threaded = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def test_signature_is_flux_pipelines_then_style_and_style_scale():
    flux = list(FLUX_CALL.parameters.values())
    share = list(SHARE_CALL.parameters.values())
    assert len(share) == len(flux) + 2
    for expected, actual in zip(flux, share, strict=False):
        # name, kind, default and annotation, one by one (a failure names the parameter)
        assert (actual.name, actual.kind, actual.annotation) == (expected.name, expected.kind, expected.annotation)
        assert actual.default is expected.default or actual.default == expected.default, actual.name
    style, style_scale = share[len(flux) :]
    assert (style.name, style.kind, style.default) == ("style", inspect.Parameter.KEYWORD_ONLY, DEFAULT_STYLE)
    assert (style_scale.name, style_scale.kind, style_scale.default) == (
        "style_scale",
        inspect.Parameter.KEYWORD_ONLY,
        None,
    )
    assert SHARE_CALL.return_annotation == FLUX_CALL.return_annotation
    # On an instance (bound method, or the pipeline as a callable) ``self`` is gone, as on FluxPipeline.
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    assert list(inspect.signature(pipe.__call__).parameters)[0] == "prompt"
    assert inspect.signature(pipe) == inspect.signature(pipe.__call__)
    assert "FluxPipeline's documentation follows" in ShareFluxPipeline.__call__.__doc__


def test_diffusers_pipeline_signature_checks_hold():
    """What diffusers' ``test_pipeline_call_signature`` and LoRA test helpers read from ``__call__``."""
    parameters = inspect.signature(ShareFluxPipeline.__call__).parameters
    optional = {name for name, parameter in parameters.items() if parameter.default != inspect.Parameter.empty}
    # FluxPipelineFastTests.params and PipelineTesterMixin.required_optional_params
    assert {"prompt", "height", "width", "guidance_scale", "prompt_embeds", "pooled_prompt_embeds"} <= set(parameters)
    required_optional = {"num_inference_steps", "num_images_per_prompt", "generator", "latents", "output_type"}
    assert required_optional | {"return_dict", "callback_on_step_end", "callback_on_step_end_tensor_inputs"} <= optional
    assert {"ip_adapter_image", "ip_adapter_image_embeds"} <= set(parameters)
    # tests/lora/utils.py: determine_attention_kwargs_name
    names = ["cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs"]
    assert next(name for name in names if name in parameters) == "joint_attention_kwargs"


@pytest.fixture(scope="module")
def pipes():
    stock, share = build_tiny_flux_pipeline(0), build_tiny_flux_pipeline(0, ShareFluxPipeline)
    for pipe in (stock, share):
        pipe.set_progress_bar_config(disable=True)
    return stock, share


def images(output) -> torch.Tensor:
    """The images of a pipeline output (dataclass or ``return_dict=False`` tuple) as a tensor."""
    result = output[0] if isinstance(output, tuple) else output.images
    return torch.as_tensor(np.asarray(result))


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def recording_callback(calls: list):
    """A ``callback_on_step_end`` that records what it sees and changes the latents (diffusers applies them)."""

    def callback(pipe, step, timestep, tensors):
        calls.append((step, float(timestep), sorted(tensors), torch.is_grad_enabled()))
        return {"latents": tensors["latents"] * 0.9}

    return callback


CASES = {
    "joint_attention_kwargs": lambda: {"joint_attention_kwargs": {"scale": 1.0}},
    "output_type_pt": lambda: {"output_type": "pt"},
    "output_type_latent": lambda: {"output_type": "latent"},
    "return_dict_false": lambda: {"return_dict": False},
    "num_images_per_prompt": lambda: {"prompt": ["a cat", "a red dress"], "num_images_per_prompt": 2},
    "true_cfg": lambda: {"negative_prompt": "a dog", "true_cfg_scale": 2.0},
    "sigmas": lambda: {"sigmas": [1.0, 0.4]},
    "guidance_scale": lambda: {"guidance_scale": 7.0},
}


@pytest.mark.parametrize("case", list(CASES))
def test_no_style_is_stock_flux_bit_for_bit(pipes, case):
    stock, share = pipes
    arguments = {**BASE, "prompt": "a photo of a cat", **CASES[case]()}
    expected = images(stock(generator=generator(), **arguments))
    assert torch.equal(images(share(generator=generator(), **arguments)), expected)


def test_callbacks_see_the_same_steps_and_change_the_same_latents(pipes):
    stock, share = pipes
    arguments = {
        **BASE,
        "prompt": "a photo of a cat",
        "callback_on_step_end_tensor_inputs": ["latents", "prompt_embeds"],
    }
    calls = {"stock": [], "share": []}
    expected = images(
        stock(generator=generator(), callback_on_step_end=recording_callback(calls["stock"]), **arguments)
    )
    actual = images(share(generator=generator(), callback_on_step_end=recording_callback(calls["share"]), **arguments))
    assert torch.equal(actual, expected)
    assert calls["share"] == calls["stock"] and len(calls["share"]) == 2
    assert not any(grad for *_, grad in calls["share"])  # no-grad inside the denoising loop, as FluxPipeline


def test_prompt_embeds_instead_of_prompts(pipes):
    stock, share = pipes
    prompt_embeds, pooled, _ = stock.encode_prompt(["a cat", "a red dress"], None, max_sequence_length=16)
    arguments = {**BASE, "prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}
    expected = images(stock(generator=generator(), **arguments))
    assert torch.equal(images(share(generator=generator(), **arguments)), expected)


def test_positional_call_binds_as_on_flux_pipeline(pipes):
    stock, share = pipes
    # prompt, prompt_2, negative_prompt, negative_prompt_2, true_cfg_scale, height, width, num_inference_steps
    positional = ("a photo of a cat", None, None, None, 1.0, 32, 32, 2)
    expected = images(stock(*positional, generator=generator(), max_sequence_length=16, output_type="np"))
    assert torch.equal(
        images(share(*positional, generator=generator(), max_sequence_length=16, output_type="np")), expected
    )
    keywords = {"prompt": "a photo of a cat", **BASE}
    assert torch.equal(images(share(generator=generator(), **keywords)), expected)


def test_default_t5_length_is_the_tokenizers_when_shorter_than_512(pipes):
    stock, share = pipes
    arguments = {key: value for key, value in BASE.items() if key != "max_sequence_length"}
    expected = images(stock("a cat", generator=generator(), max_sequence_length=T5_MAX_LENGTH, **arguments))
    assert torch.equal(images(share("a cat", generator=generator(), **arguments)), expected)


def test_no_grad_even_when_the_caller_enables_it(pipes):
    _, share = pipes
    with torch.enable_grad():
        output = share("a cat", generator=generator(), **{**BASE, "output_type": "pt"})
    assert not output.images.requires_grad


def test_wrong_arguments_fail_as_on_flux_pipeline(pipes):
    _, share = pipes
    with pytest.raises(TypeError, match=r"ShareFluxPipeline.__call__\(\) got an unexpected keyword argument 'bogus'"):
        share("a cat", bogus=1)
    with pytest.raises(TypeError, match="multiple values for argument 'prompt'"):
        share("a cat", prompt="a dog")


@pytest.fixture(scope="module")
def styled(tmp_path_factory):
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.merge_lora(write_diffusers_lora(tmp_path_factory.mktemp("ink"), seed=1, rank=4, alpha=8), style_name="ink")
    return pipe


def test_styles_follow_positional_prompt_and_num_images_per_prompt(styled):
    """A positional ``num_images_per_prompt`` repeats each prompt's style as the keyword does."""
    prompts, styles = ["a cat", "a red dress"], ["ink", None]
    # prompt ... guidance_scale, num_images_per_prompt (the 11th parameter)
    positional = (prompts, None, None, None, 1.0, 32, 32, 2, None, 3.5, 2)
    keywords = dict(prompt=prompts, height=32, width=32, num_inference_steps=2, num_images_per_prompt=2)
    common = dict(max_sequence_length=16, output_type="np")
    by_position = images(styled(*positional, generator=generator(), style=styles, **common))
    by_keyword = images(styled(generator=generator(), style=styles, **keywords, **common))
    base = images(styled(generator=generator(), style=None, **keywords, **common))
    assert by_position.shape[0] == 4 and torch.equal(by_position, by_keyword)
    assert not torch.equal(by_position[:2], base[:2])  # both images of the first prompt in "ink"
    assert torch.equal(by_position[2:], base[2:])  # both of the second in the base model


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_from_pretrained_takes_either_dtype_keyword_without_a_warning(tmp_path, keyword):
    """diffusers 0.40 renamed torch_dtype to dtype (and warns on torch_dtype); older releases ignore dtype.
    Our class takes both names on every diffusers we support."""
    import warnings

    from share_diffusers.tiny_flux import save_tiny_flux_pipeline

    folder = save_tiny_flux_pipeline(str(tmp_path / "tiny"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe = ShareFluxPipeline.from_pretrained(folder, **{keyword: torch.bfloat16})
    assert pipe.transformer.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="pass dtype= or torch_dtype=, not both"):
        ShareFluxPipeline.from_pretrained(folder, dtype=torch.bfloat16, torch_dtype=torch.bfloat16)
