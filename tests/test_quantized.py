"""Share styles on quantized Flux bases (GGUF Q8_0 / Q4_0 and torchao int8 / float8 weight-only), on the CPU.

The reference for a styled quantized model is the float model whose every linear holds exactly what
the quantized layer applies (its dequantized weight, read through its own kernel) with the style's
dense ``dW`` fused in: Share must equal it to float32 rounding, per prompt, in a mixed batch. Against
the original float model with the LoRA (stock diffusers + PEFT), the styled quantized output must
stay within the quantization's own error.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
from flux_helpers import (
    generate,
    run_transformer,
    stock_pipeline,
    transformer_inputs,
    write_diffusers_lora,
)
from quant_helpers import dequantized_copy, quantized_bits, relative, with_factors

from share_diffusers import ShareFluxPipeline
from share_diffusers.core import QuantizedBaseError
from share_diffusers.core.quantized import compute_dtype, is_quantized, quantization_name
from share_diffusers.quantization import weight_bytes

gguf = pytest.importorskip("gguf")
pytest.importorskip("torchao")

from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig, TorchAoConfig  # noqa: E402
from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig  # noqa: E402

GGUF_TYPES = {
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_0": gguf.GGMLQuantizationType.Q4_0,
    "BF16": gguf.GGMLQuantizationType.BF16,
}


def write_gguf(transformer: torch.nn.Module, path, quant_type) -> None:
    """The transformer as a GGUF file, as city96's FLUX.1 files are made: 2-D weights quantized, the rest F32.

    Keys keep diffusers' names (diffusers converts BFL-named files, which real FLUX.1 GGUFs are, on load).
    """
    block = gguf.GGML_QUANT_SIZES[quant_type][0]
    writer = gguf.GGUFWriter(str(path), "flux")
    for key, tensor in transformer.state_dict().items():
        array = tensor.detach().float().numpy()
        if key.endswith(".weight") and array.ndim == 2 and array.shape[1] % block == 0:
            packed = gguf.quants.quantize(array, quant_type)
            writer.add_tensor(key, packed, raw_shape=packed.shape, raw_dtype=quant_type)
        else:
            writer.add_tensor(key, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-flux")
    stock_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return [write_diffusers_lora(root / f"style{seed}", seed=seed, rank=4, alpha=4, scale=0.5) for seed in (1, 2)]


def load_quantized(kind: str, tiny_dir, tmp_path) -> FluxTransformer2DModel:
    if kind in GGUF_TYPES:
        path = tmp_path / f"transformer-{kind}.gguf"
        write_gguf(FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer"), path, GGUF_TYPES[kind])
        return FluxTransformer2DModel.from_single_file(
            str(path),
            config=str(tiny_dir),
            subfolder="transformer",
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            torch_dtype=torch.float32,
        )
    if kind == "quanto-int8":
        pytest.importorskip("optimum.quanto")
        from diffusers import QuantoConfig

        with pytest.warns(FutureWarning, match="QuantoConfig` is deprecated"):  # diffusers 0.42 still loads it
            config = QuantoConfig(weights_dtype="int8")
        return FluxTransformer2DModel.from_pretrained(
            tiny_dir, subfolder="transformer", quantization_config=config, torch_dtype=torch.float32
        )
    config = {"int8": Int8WeightOnlyConfig(), "float8": Float8WeightOnlyConfig()}[kind]
    return FluxTransformer2DModel.from_pretrained(
        tiny_dir, subfolder="transformer", quantization_config=TorchAoConfig(config), torch_dtype=torch.float32
    )


@pytest.fixture(scope="module")
def share_pipe(tiny_dir, loras):
    """A float pipeline holding the two styles: its factors are what the quantized models get."""
    pipe = ShareFluxPipeline.from_pretrained(tiny_dir)
    for index, path in enumerate(loras):
        pipe.merge_lora(str(path), style_name=f"s{index}")
    return pipe


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "int8", "float8", "quanto-int8"])
def test_styled_quantized_transformer_equals_dequantized_base_plus_style(kind, tiny_dir, share_pipe, tmp_path):
    quantized = load_quantized(kind, tiny_dir, tmp_path)
    target = quantized.transformer_blocks[0].attn.to_q
    assert is_quantized(target) and compute_dtype(target) == torch.float32
    reference = dequantized_copy(quantized, FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer"))
    factors = share_pipe.share_factors
    share = with_factors(quantized, factors)
    assert type(share.layers["transformer_blocks.0.attn.to_q"].base_layer) is type(target)
    reference_share = with_factors(reference, factors)
    inputs = transformer_inputs(batch=3)

    base = run_transformer(quantized, inputs)
    assert torch.equal(base, run_transformer(quantized, inputs))
    rows = ["s0", "s1", {"s0": 0.5, "s1": 0.7}]
    with share.styles(rows):
        mixed = run_transformer(quantized, inputs)
    for row, style in enumerate(rows):
        reference_share.fuse_style(style)  # the dequantized weight + the style's dense dW
        expected = run_transformer(reference, inputs)[row]
        reference_share.unfuse_style()
        assert relative(expected, mixed[row]) < 2e-5, (kind, style)
        assert relative(expected, base[row]) > 1e-3  # the style does show
    # the quantized base itself was never touched
    assert torch.equal(run_transformer(quantized, inputs), base)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "int8"])
def test_styled_quantized_pipeline_within_quantization_error_of_float_lora(kind, tiny_dir, loras, tmp_path):
    """Per-prompt styles on a quantized pipeline against stock diffusers + PEFT on the float model."""
    pipe = ShareFluxPipeline.from_pretrained(tiny_dir, transformer=load_quantized(kind, tiny_dir, tmp_path))
    report = pipe.merge_lora(str(loras[0]), style_name="s0")
    assert report.layers_merged > 0
    pipe.merge_lora(str(loras[1]), style_name="s1")
    styled = generate(pipe, ["a cat", "a dog"], seeds=[5, 6], style=["s0", "s1"])
    base = generate(pipe, ["a cat", "a dog"], seeds=[5, 6])

    stock = stock_pipeline()
    stock_base = generate(stock, ["a cat", "a dog"], seeds=[5, 6])
    quantization_error = relative(stock_base, base)
    assert quantization_error > 0  # the base is really quantized
    for row, path in enumerate(loras):
        stock.load_lora_weights(str(path.parent), adapter_name=f"s{row}")
        stock.set_adapters(f"s{row}")
        expected = generate(stock, ["a cat", "a dog"], seeds=[5, 6])[row]
        error = relative(expected, styled[row])
        print(kind, row, f"style {relative(expected, stock_base[row]):.4f} quantization {quantization_error:.4f}")
        print(f"styled error {error:.4f} vs the quantized base {relative(expected, base[row]):.4f}")
        assert error < 2 * quantization_error, (kind, row)  # the style adds no error of its own
        assert error < 0.5 * relative(expected, base[row])  # and the style does show through the noise


def test_pipeline_from_pretrained_with_quantization_config(tiny_dir, loras):
    """``ShareFluxPipeline.from_pretrained(..., quantization_config=PipelineQuantizationConfig(...))``."""
    from diffusers.quantizers import PipelineQuantizationConfig

    config = PipelineQuantizationConfig(
        quant_mapping={"transformer": TorchAoConfig(Int8WeightOnlyConfig())},
    )
    pipe = ShareFluxPipeline.from_pretrained(tiny_dir, quantization_config=config, torch_dtype=torch.float32)
    assert is_quantized(pipe.transformer.transformer_blocks[0].attn.to_q)
    pipe.merge_lora(str(loras[0]), style_name="s0")
    pipe.merge_lora(str(loras[1]), style_name="s1")
    together = generate(pipe, ["a cat", "a dog"], seeds=[5, 6], style=["s1", "s0"])
    alone = generate(pipe, ["a dog"], seeds=[6], style="s0")
    np.testing.assert_allclose(together[1], alone[0], atol=2e-5)


@pytest.mark.parametrize("kind", ["Q4_0", "int8", "BF16"])
def test_fuse_on_quantized_base_is_refused_and_changes_nothing(kind, tiny_dir, share_pipe, tmp_path):
    """A GGUF BF16 file is not quantized but held as packed bytes: refused too, without the requantizing story."""
    quantized = load_quantized(kind, tiny_dir, tmp_path)
    share = with_factors(quantized, share_pipe.share_factors)
    inputs = transformer_inputs(batch=1)
    before = run_transformer(quantized, inputs)
    state = {key: quantized_bits(value) for key, value in quantized.state_dict().items()}
    why = {"BF16": "held as the GGUF file's packed BF16 bytes", "Q4_0": r"quantized \(GGUF Q4_0\)"}
    why["int8"] = r"quantized \(Int8Tensor\)"
    with pytest.raises(
        QuantizedBaseError,
        match=rf"cannot fuse a style into transformer_blocks\.0\.attn\.to_q: its weight is {why[kind]}",
    ):
        share.fuse_style("s0")
    assert share.fused_style is None
    for key, value in quantized.state_dict().items():
        assert torch.equal(quantized_bits(value), state[key]), key
    assert torch.equal(run_transformer(quantized, inputs), before)
    with share.styles("s0"):  # styles still apply unfused
        assert not torch.equal(run_transformer(quantized, inputs), before)


def test_quantizing_with_a_fused_style_is_refused_and_unfusing_a_quantized_weight_says_why(tiny_dir, share_pipe):
    """Quantized with a style fused, the style went into the int8 weights for good and unfuse_style /
    remove_share died in torchao ('Tensor' object has no attribute 'qdata'), fused_style still set."""
    from torchao.quantization import quantize_

    from share_diffusers.core.errors import ShareStateError
    from share_diffusers.quantization import quantize_in_place

    transformer = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    share = with_factors(transformer, share_pipe.share_factors)
    share.fuse_style("s0")
    weight = transformer.transformer_blocks[0].attn.to_q.base_layer.weight.clone()
    with pytest.raises(ShareStateError, match=re.escape("style 's0' is fused into the transformer; unfuse_style()")):
        quantize_in_place(transformer, "int8")
    assert torch.equal(transformer.transformer_blocks[0].attn.to_q.base_layer.weight, weight)  # not quantized
    quantize_(transformer, Int8WeightOnlyConfig())  # torchao itself does not know about Share
    with pytest.raises(QuantizedBaseError, match="the style is part of the quantized weight now and cannot be taken"):
        share.unfuse_style()
    with pytest.warns(UserWarning, match=r"layers \(e\.g\. transformer_blocks\.0\.attn\.to_q\) were quantized with a "):
        share.remove()  # the way out: the stock layers back, the style in them as quantized
    assert type(transformer.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert is_quantized(transformer.transformer_blocks[0].attn.to_q)


def test_bases_take_the_compute_dtype_of_diffusers_layerwise_casting(loras):
    """Weights stored in float8 and cast to bf16 for each forward: the bases were float32 (twice the memory,
    and a cast in every forward), or bf16 when the casting came after the merge."""
    from share_diffusers.tiny_flux import build_tiny_flux_pipeline

    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    torch.nn.Module.to(pipe.transformer, dtype=torch.bfloat16)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    pipe.merge_lora(str(loras[0]), style_name="s0")
    layer = pipe.share.layers["transformer_blocks.0.attn.to_q"]
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn
    assert layer.basis_out.dtype == layer.basis_in.dtype == torch.bfloat16


@pytest.mark.parametrize(("kind", "lost_at_least"), [("Q8_0", 0.3), ("Q4_0", 0.9)])
def test_requantizing_a_fused_style_loses_it(kind, lost_at_least):
    """Why fusing is refused: requantizing ``W + dW`` rounds a LoRA-sized ``dW`` away (measured, not assumed).

    A rank-16 delta of 1% of ``|W|`` on a Gaussian 768 x 768 weight: Q8_0 loses about half of it,
    Q4_0 all of it (at 3072 x 3072, FLUX.1's width: 53% and 106% relative error), while the unfused
    style on the same base is exact to float rounding (the tests above).
    """
    generator = np.random.default_rng(0)
    weight = generator.standard_normal((768, 768)).astype(np.float32) * 0.02
    delta = generator.standard_normal((768, 16)).astype(np.float32) @ generator.standard_normal((16, 768))
    delta = (delta * (0.01 * np.linalg.norm(weight) / np.linalg.norm(delta))).astype(np.float32)
    quant = GGUF_TYPES[kind]
    base = gguf.quants.dequantize(gguf.quants.quantize(weight, quant), quant)
    fused = gguf.quants.dequantize(gguf.quants.quantize(base + delta, quant), quant)
    assert relative(delta, fused - base) > lost_at_least


def share_bytes(share) -> int:
    """Bytes of the Share tensors a model holds (bases, cores, anchors) once styles are loaded."""
    return sum(
        tensor.numel() * tensor.element_size()
        for layer in share.layers.values()
        for tensor in (layer.basis_out, layer.basis_in, layer.cores_out, layer.cores_in, layer.anchor)
    )


def test_styles_take_the_same_memory_on_a_quantized_base(tiny_dir, share_pipe, tmp_path):
    quantized = load_quantized("Q4_0", tiny_dir, tmp_path)
    float_model = FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer")
    assert weight_bytes(quantized) < 0.5 * weight_bytes(float_model)
    factors = share_pipe.share_factors
    on_quantized, on_float = with_factors(quantized, factors), with_factors(float_model, factors)
    assert share_bytes(on_quantized) == share_bytes(on_float) > 0


def test_load_pipeline_quantized_demo_model_keeps_its_styles():
    """The runtime path the CLI, studio and server use: the embedded demo model, int8, its shipped styles; without
    diffusers' advice to load int8 in bfloat16 only (float32 works: this test)."""
    from share_diffusers.runtime import load_pipeline, load_styles

    float_pipe = load_pipeline(None, "cpu", "float32", progress=False)
    # diffusers' loggers do not propagate to pytest's: a handler of our own sees what passes the logger's filters.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("diffusers.quantizers.torchao.torchao_quantizer")
    logger.addHandler(handler)
    try:
        pipe = load_pipeline(None, "cpu", "float32", progress=False, quantize="int8")
    finally:
        logger.removeHandler(handler)
    assert not [record.getMessage() for record in records if "bfloat16" in record.getMessage()]
    assert weight_bytes(pipe.transformer) < 0.4 * weight_bytes(float_pipe.transformer)
    for each in (float_pipe, pipe):
        load_styles(each, None)
    style = pipe.list_styles()[0]
    kwargs = dict(height=32, width=32, num_inference_steps=2, output_type="np")
    images = {}
    for name, each in (("float", float_pipe), ("int8", pipe)):
        images[name, style] = each(prompt="a bag", style=style, generator=torch.Generator().manual_seed(0), **kwargs)
        images[name, None] = each(prompt="a bag", generator=torch.Generator().manual_seed(0), **kwargs)
    quantization_error = relative(images["float", None].images, images["int8", None].images)
    style_error = relative(images["float", style].images, images["int8", style].images)
    assert style_error < 2 * quantization_error + 1e-3
    assert relative(images["float", style].images, images["float", None].images) > 5 * style_error


def test_load_pipeline_from_a_gguf_transformer_file(tiny_dir, tmp_path):
    from share_diffusers.runtime import load_pipeline

    path = tmp_path / "transformer-Q8_0.gguf"
    write_gguf(FluxTransformer2DModel.from_pretrained(tiny_dir, subfolder="transformer"), path, GGUF_TYPES["Q8_0"])
    pipe = load_pipeline(str(tiny_dir), "cpu", "float32", progress=False, quantize=str(path))
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert is_quantized(layer) and "Q8_0" in quantization_name(layer)


def test_a_quantization_whose_package_is_missing_is_refused_before_loading(monkeypatch):
    """bitsandbytes missing gave importlib's bare PackageNotFoundError traceback from inside diffusers."""
    import importlib.util

    from share_diffusers import quantization
    from share_diffusers.runtime import load_pipeline

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    monkeypatch.setattr(quantization, "load_quantized_transformer", lambda *a: pytest.fail("loaded"))
    message = "quantize='nf4' needs bitsandbytes, which is not installed: pip install bitsandbytes, on a machine"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_pipeline(None, "cpu", "float32", progress=False, quantize="nf4")


@pytest.mark.parametrize(
    ("quantize", "error", "message"),
    [
        ("int4", ValueError, "unknown quantization 'int4': choose int8, float8, nf4 or a .gguf file"),
        ("/nowhere/flux1-dev-Q4_0.gguf", FileNotFoundError, "no GGUF file at /nowhere/flux1-dev-Q4_0.gguf"),
    ],
)
def test_load_pipeline_rejects_a_bad_quantization(quantize, error, message):
    from share_diffusers.runtime import load_pipeline

    with pytest.raises(error, match=re.escape(message)):
        load_pipeline(None, "cpu", "float32", progress=False, quantize=quantize)
