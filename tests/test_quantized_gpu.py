"""Share styles on bitsandbytes (NF4, int8) and torchao float8 bases: CUDA only (``pytest -m gpu``).

The same check as tests/test_quantized.py on the CPU: per-sample styles on the quantized transformer
equal, within bf16 rounding, the bf16 model holding the quantized layers' own dequantized weights with
each style fused in. bitsandbytes' int8 layers also quantize their inputs (LLM.int8), so for them
only the distance to the float model with the style is bounded by the base's own quantization error.
"""

from __future__ import annotations

import os

import pytest
import torch
from flux_helpers import run_transformer, stock_pipeline, transformer_inputs, write_diffusers_lora
from quant_helpers import dequantized_copy, relative, with_factors

from share_diffusers import ShareFluxPipeline
from share_diffusers.core.quantized import is_quantized

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("SHARE_GPU_TEST_DEVICE", "cuda")  # "cpu": a dry run of the test code, as in test_gpu.py
DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-flux")
    stock_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def factors(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    pipe = ShareFluxPipeline.from_pretrained(tiny_dir)
    for seed in (1, 2):
        path = write_diffusers_lora(root / f"style{seed}", seed=seed, rank=4, alpha=4, scale=0.5)
        pipe.merge_lora(str(path), style_name=f"s{seed - 1}")
    return pipe.share_factors


def quantization_config(kind: str):
    from diffusers import BitsAndBytesConfig, TorchAoConfig

    if kind in ("nf4", "int8-bnb") and DEVICE != "cuda":
        pytest.skip("diffusers quantizes with bitsandbytes only on a GPU")
    if kind == "nf4":
        pytest.importorskip("bitsandbytes")
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPE)
    if kind == "int8-bnb":
        pytest.importorskip("bitsandbytes")
        return BitsAndBytesConfig(load_in_8bit=True)
    pytest.importorskip("torchao")
    if DEVICE == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9 or newer")
    from torchao.quantization import Float8WeightOnlyConfig

    return TorchAoConfig(Float8WeightOnlyConfig())


def load(kind: str, tiny_dir):
    from diffusers import FluxTransformer2DModel

    config = quantization_config(kind)
    return FluxTransformer2DModel.from_pretrained(
        tiny_dir, subfolder="transformer", quantization_config=config, torch_dtype=DTYPE, device_map=DEVICE
    )


def on_device(inputs: dict) -> dict:
    return {
        key: value.to(DEVICE, DTYPE if value.is_floating_point() else value.dtype) if torch.is_tensor(value) else value
        for key, value in inputs.items()
    }


@pytest.mark.parametrize("kind", ["nf4", "float8"])
def test_styled_quantized_equals_dequantized_base_plus_style_on_cuda(kind, tiny_dir, factors):
    from diffusers import FluxTransformer2DModel

    quantized = load(kind, tiny_dir)
    assert is_quantized(quantized.transformer_blocks[0].attn.to_q)
    float_model = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer", torch_dtype=DTYPE)
    reference = dequantized_copy(quantized, float_model.to(DEVICE))
    share, reference_share = with_factors(quantized, factors), with_factors(reference, factors)
    inputs = on_device(transformer_inputs(batch=2))
    base = run_transformer(quantized, inputs)
    with share.styles(["s0", "s1"]):
        mixed = run_transformer(quantized, inputs)
    for row, style in enumerate(["s0", "s1"]):
        reference_share.fuse_style(style)
        expected = run_transformer(reference, inputs)[row]
        reference_share.unfuse_style()
        assert relative(expected, mixed[row]) < 2e-2, (kind, style)  # bf16 rounding of W + dW and activations
        assert relative(expected, base[row]) > 5 * relative(expected, mixed[row])


def test_styled_bnb_int8_within_quantization_error(tiny_dir, factors):
    from diffusers import FluxTransformer2DModel

    quantized = load("int8-bnb", tiny_dir)
    float_model = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer", torch_dtype=DTYPE)
    float_model.to(DEVICE)
    inputs = on_device(transformer_inputs(batch=2))
    quantization_error = relative(run_transformer(float_model, inputs), run_transformer(quantized, inputs))
    share, float_share = with_factors(quantized, factors), with_factors(float_model, factors)
    with share.styles(["s0", "s1"]), float_share.styles(["s0", "s1"]):
        styled, expected = run_transformer(quantized, inputs), run_transformer(float_model, inputs)
    assert relative(expected, styled) < 2 * quantization_error + 1e-2
