"""On a CUDA device: bf16 pipeline calls with styles, merges of CUDA tensors, fuse/unfuse, no host traffic.

Run with ``pytest -m gpu`` on a machine with a GPU; skipped everywhere else (CI has none).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from conftest import random_adapter, relative_error
from flux_helpers import run_transformer, transformer_inputs

from share_diffusers import ShareFluxPipeline
from share_diffusers.core import ShareConfig, ShareFactors, ShareModel
from share_diffusers.tiny_flux import build_tiny_flux_pipeline

# SHARE_GPU_TEST_DEVICE=cpu dry-runs these tests on the CPU (bf16 there too) before a GPU session.
DEVICE = os.environ.get("SHARE_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
NAMES = ["ink", "neon", "sepia"]
BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


def _styled_pipeline(device: str, dtype: torch.dtype) -> tuple[ShareFluxPipeline, ShareModel]:
    """The tiny pipeline with three random styles merged from LoRA tensors living on ``device``."""
    pipe = build_tiny_flux_pipeline(0, ShareFluxPipeline)
    pipe.to(device, dtype)
    share = pipe.new_share_subspace(config=ShareConfig(rank=16, pseudo_rank=4))
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in share.layers.items()}
    for index, name in enumerate(NAMES):
        adapter = random_adapter(shapes, rank=4, seed=10 + index)
        for lora in adapter.layers.values():  # LoRA factors on the GPU in the model's dtype, as PEFT holds them
            lora.up, lora.down = lora.up.to(device, dtype), lora.down.to(device, dtype)
        share.merge(adapter, name)
    return pipe, share


def _inputs(device, dtype, batch=2):
    return {
        key: value.to(device, dtype) if torch.is_tensor(value) and value.is_floating_point() else value
        for key, value in transformer_inputs(batch=batch).items()
    }


def test_cuda_merge_equals_cpu_float64_fit():
    _, share = _styled_pipeline(DEVICE, torch.bfloat16)
    reference = ShareFactors.empty(
        {name: layer.shape for name, layer in share.factors.layers.items()}, share.factors.config
    )
    shapes = {name: (layer.out_features, layer.in_features) for name, layer in share.layers.items()}
    for index, name in enumerate(NAMES):
        adapter = random_adapter(shapes, rank=4, seed=10 + index)
        for lora in adapter.layers.values():  # the same bf16-rounded values, on the CPU
            lora.up, lora.down = lora.up.to(torch.bfloat16), lora.down.to(torch.bfloat16)
        reference.merge(adapter, name)
    for layer_name in share.factors.layers:
        for name in NAMES:
            expected = reference.delta_weight(layer_name, name)
            assert relative_error(expected, share.factors.delta_weight(layer_name, name)) < 1e-6


def test_bf16_styles_on_cuda_match_float32_on_cpu_and_mix_per_sample():
    gpu_pipe, gpu_share = _styled_pipeline(DEVICE, torch.bfloat16)
    cpu_pipe, cpu_share = _styled_pipeline("cpu", torch.float32)
    styles = ["ink", {"neon": 0.6, "sepia": 0.4}]
    floor = relative_error(  # what bf16 alone changes: the base model in both precisions
        run_transformer(cpu_pipe.transformer, _inputs("cpu", torch.float32)),
        run_transformer(gpu_pipe.transformer, _inputs(DEVICE, torch.bfloat16)).float().cpu(),
    )
    gpu_share.set_style(styles)
    cpu_share.set_style(styles)
    gpu = run_transformer(gpu_pipe.transformer, _inputs(DEVICE, torch.bfloat16)).float().cpu()
    cpu = run_transformer(cpu_pipe.transformer, _inputs("cpu", torch.float32))
    assert relative_error(cpu, gpu) < 2 * floor, floor
    # one mixed batch equals each style alone, on the GPU
    singles = []
    for index, style in enumerate(styles):
        gpu_share.set_style(style)
        row = {k: v[index : index + 1] if k in BATCHED else v for k, v in _inputs(DEVICE, torch.bfloat16).items()}
        singles.append(run_transformer(gpu_pipe.transformer, row).float().cpu())
    assert relative_error(torch.cat(singles), gpu) < 1e-2


def test_styled_forward_makes_no_host_to_device_copy():
    pipe, share = _styled_pipeline(DEVICE, torch.bfloat16)
    inputs = _inputs(DEVICE, torch.bfloat16)
    share.set_style(["ink", "neon"])
    run_transformer(pipe.transformer, inputs)  # warm up
    _sync()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_transformer(pipe.transformer, inputs)
        _sync()
    copies = [event.name for event in prof.events() if "Memcpy HtoD" in event.name or "memcpy" in event.name.lower()]
    host_to_device = [name for name in copies if "HtoD" in name]
    assert host_to_device == [], host_to_device


def test_fuse_unfuse_on_cuda_stays_on_device_and_restores_bits():
    pipe, share = _styled_pipeline(DEVICE, torch.bfloat16)
    inputs = _inputs(DEVICE, torch.bfloat16)
    originals = {name: layer.base_layer.weight.detach().clone() for name, layer in share.layers.items()}
    share.set_style("ink")
    styled = run_transformer(pipe.transformer, inputs).float()
    share.fuse_style("ink")
    assert all(layer._unfused_weight.device.type == DEVICE for layer in share.layers.values())
    fused = run_transformer(pipe.transformer, inputs).float()
    assert relative_error(styled, fused) < 2e-2
    share.unfuse_style()
    for name, layer in share.layers.items():
        assert torch.equal(layer.base_layer.weight, originals[name]), name


def test_pipeline_call_in_bf16_on_cuda_with_per_prompt_styles():
    pipe, _ = _styled_pipeline(DEVICE, torch.bfloat16)
    generator = [torch.Generator(DEVICE).manual_seed(s) for s in (0, 1)]
    images = pipe(
        prompt=["a cat", "a dog"],
        style=["ink", {"neon": 0.5, "sepia": 0.5}],
        num_inference_steps=2,
        height=32,
        width=32,
        generator=generator,
        output_type="pt",
    ).images
    assert images.shape[0] == 2 and torch.isfinite(images).all()


def test_compiled_transformer_switches_styles_without_recompiling_on_cuda():
    pipe, share = _styled_pipeline(DEVICE, torch.bfloat16)
    inputs = _inputs(DEVICE, torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(pipe.transformer)
    # inductor rounds bf16 differently from eager: the base model's own difference is the yardstick
    floor = relative_error(run_transformer(pipe.transformer, inputs), run_transformer(compiled, inputs))
    share.set_style("ink", batch_size=2)
    run_transformer(compiled, inputs)  # the styled graph: compiled once
    torch._dynamo.config.error_on_recompile = True
    try:
        for style in ("sepia", {"ink": 0.5, "sepia": 0.5}, ["ink", "sepia"]):
            share.set_style(style, batch_size=2)
            out = run_transformer(compiled, inputs)  # raises if switching styles forced a recompile
            eager = run_transformer(pipe.transformer, inputs)
            assert relative_error(eager, out) < 2 * floor + 1e-3, (style, floor)  # the new blend reached the graph
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
