"""What the benchmarks share: FLUX.1's attention layout, reporting and timing helpers, random LoRAs, Flux inputs.

``bench_core.py`` uses the layout and the reporting helpers; ``bench_flux.py`` (CPU, FLUX.1 widths,
few blocks) and ``bench_gpu.py`` (one GPU, the full FLUX.1 size) also share the statistics, the
random LoRAs and the transformer inputs, so the two Flux benchmarks measure the same things the same
way. Imports torch and ``share_diffusers.core`` only; diffusers is imported where a function needs it.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from share_diffusers.core import LoraAdapter, LoraLayer, ShareModel

# ----------------------------------------------------------------------------------------------
# FLUX.1's layout and the seeds of the random models, inputs and LoRAs

FULL_DOUBLE_BLOCKS = 19  # FLUX.1
FULL_SINGLE_BLOCKS = 38
# The attention linears Share targets by default (``share_diffusers.flux_lora.FLUX_ATTENTION_TARGETS``).
DOUBLE_LINEARS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
SINGLE_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v")
LINEARS_PER_DOUBLE = len(DOUBLE_LINEARS)
LINEARS_PER_SINGLE = len(SINGLE_LINEARS)
FULL_LAYERS = FULL_DOUBLE_BLOCKS * LINEARS_PER_DOUBLE + FULL_SINGLE_BLOCKS * LINEARS_PER_SINGLE  # 266
MODEL_SEED = 0
INPUT_SEED = 1
LORA_SEED = 100
LORA_UP_STD = 0.01  # lora_B entries; lora_A entries have std 1/sqrt(d_in): dW is ~7% of W0 per entry


def flux_layer_names(double_blocks: int, single_blocks: int) -> list[str]:
    """Module paths of the attention linears: 8 per double block, then 3 per single block."""
    names = [f"transformer_blocks.{i}.{linear}" for i in range(double_blocks) for linear in DOUBLE_LINEARS]
    names += [f"single_transformer_blocks.{i}.{linear}" for i in range(single_blocks) for linear in SINGLE_LINEARS]
    return names


# ----------------------------------------------------------------------------------------------
# Reporting


def log(message: str) -> None:
    """Progress to stderr, so stdout holds only the report."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.2f} MiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.3f}" if seconds < 0.01 else f"{seconds * 1e3:,.1f}"


def us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def ratio(value: float) -> str:
    """``12x`` for large ratios, ``0.25x`` for small ones."""
    return f"{value:,.0f}x" if value >= 10 else f"{value:.2f}x"


# ----------------------------------------------------------------------------------------------
# Repeated timings


@dataclass(frozen=True)
class Stats:
    """Summary of repeated timings in seconds: median and a spread (p10..p90, or min..max under 20 repeats)."""

    median: float
    low: float
    high: float
    count: int
    samples: tuple[float, ...]  # in the order measured

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        ordered = sorted(samples)
        if len(ordered) >= 20:
            low, high = ordered[len(ordered) // 10], ordered[-(len(ordered) // 10) - 1]
        else:
            low, high = ordered[0], ordered[-1]
        return cls(statistics.median(ordered), low, high, len(ordered), tuple(samples))

    @property
    def spread_label(self) -> str:
        return "p10-p90" if self.count >= 20 else "min-max"

    @property
    def spread(self) -> float:
        """``(high - low) / median``: the relative noise of these repeats."""
        return (self.high - self.low) / self.median if self.median > 0 else 0.0


def interleave(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round in a fixed order (A B C A B C ...); each returns its own seconds."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            samples[name].append(run())
    return samples


def rounds_table(stats: dict[str, Stats]) -> str:
    """Every timed round in seconds, one row per variant (to see drift and interference in noisy runs)."""
    count = max(stat.count for stat in stats.values())
    rows = [[name, *(f"{value:.3f}" for value in stat.samples)] for name, stat in stats.items()]
    return table(["round (s)", *(str(i + 1) for i in range(count))], rows)


def relative(reference: torch.Tensor, value: torch.Tensor) -> float:
    """``||value - reference|| / ||reference||`` in float64 (on the tensors' device)."""
    reference, value = reference.double(), value.double()
    return float((value - reference).norm() / reference.norm())


# ----------------------------------------------------------------------------------------------
# Flux transformer inputs


def flux_inputs(
    batch: int,
    latent_side: int,
    text_tokens: int,
    joint_dim: int,
    pooled_dim: int,
    timestep: float,
    guidance: float = 3.5,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Inputs of one transformer call, as ``FluxPipeline`` builds them, without VAE or text encoders.

    ``hidden_states (batch, latent_side**2, 64)`` (packed latents: a 1024 x 1024 image is 64 x 64 of
    them), ``encoder_hidden_states (batch, text_tokens, joint_dim)``, ``pooled_projections (batch,
    pooled_dim)``, timestep and guidance ``(batch,)``, ``img_ids (latent_side**2, 3)`` from
    ``FluxPipeline._prepare_latent_image_ids``, ``txt_ids (text_tokens, 3)`` zeros.

    Row ``b`` is the same whatever ``batch`` (drawn row by row from one CPU generator, then moved to
    ``device``), so a batch-of-4 call and four batch-1 calls see the same prompts, on any device.
    """
    from diffusers import FluxPipeline

    generator = torch.Generator().manual_seed(INPUT_SEED)
    rows = [
        (
            torch.randn(latent_side**2, 64, generator=generator),
            torch.randn(text_tokens, joint_dim, generator=generator),
            torch.randn(pooled_dim, generator=generator),
        )
        for _ in range(batch)
    ]
    inputs = {
        "hidden_states": torch.stack([row[0] for row in rows]),
        "encoder_hidden_states": torch.stack([row[1] for row in rows]),
        "pooled_projections": torch.stack([row[2] for row in rows]),
        "timestep": torch.full((batch,), timestep),
        "guidance": torch.full((batch,), guidance),
        "img_ids": FluxPipeline._prepare_latent_image_ids(batch, latent_side, latent_side, "cpu", torch.float32),
        "txt_ids": torch.zeros(text_tokens, 3),
    }
    inputs = {key: value.to(device, dtype) for key, value in inputs.items()}
    return {**inputs, "return_dict": False}


BATCHED_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")


def row_of(inputs: dict, index: int) -> dict:
    """The batch-1 inputs of row ``index`` of a batched input dict."""
    return {key: value[index : index + 1] if key in BATCHED_INPUTS else value for key, value in inputs.items()}


def forward(transformer: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """One denoising step of the transformer: ``(batch, image_tokens, 64)``."""
    with torch.no_grad():
        return transformer(**inputs)[0]


# ----------------------------------------------------------------------------------------------
# Random LoRAs, and the memory each side holds


@dataclass
class Style:
    """One random LoRA: the same factors as a diffusers/PEFT state dict and as a Share adapter.

    ``state_dict``: ``"<layer>.lora_A.weight" (r, d_in)`` and ``"<layer>.lora_B.weight" (n_out, r)``
    with no prefix and no alpha (scale 1 in diffusers); ``adapter`` shares those tensors.
    """

    name: str
    state_dict: dict[str, torch.Tensor]
    adapter: LoraAdapter

    def fresh_adapter(self) -> LoraAdapter:
        """The same factors in new ``LoraLayer`` objects (nothing cached from an earlier merge)."""
        layers = {
            name: LoraLayer(up=lora.up, down=lora.down, scale=lora.scale) for name, lora in self.adapter.layers.items()
        }
        return LoraAdapter(layers, source=dict(self.adapter.source))


def make_styles(
    num_styles: int,
    rank: int,
    layers: dict[str, torch.nn.Linear],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[Style]:
    """N random rank-``rank`` LoRAs on ``layers`` (name -> linear), deterministic per style index.

    Drawn on ``device`` (a CUDA generator there: fast at FLUX.1 size), then held on the CPU in
    ``dtype``, where a LoRA file would be read to. On the CPU in float32 the draws do not depend on
    ``device``/``dtype`` arguments.
    """
    styles = []
    for index in range(num_styles):
        generator = torch.Generator(device=device).manual_seed(LORA_SEED + index)
        state_dict, lora_layers = {}, {}
        for name, linear in layers.items():
            down = torch.randn(rank, linear.in_features, generator=generator, device=device) / linear.in_features**0.5
            up = torch.randn(linear.out_features, rank, generator=generator, device=device) * LORA_UP_STD
            down, up = down.to("cpu", dtype), up.to("cpu", dtype)
            state_dict[f"{name}.lora_A.weight"] = down
            state_dict[f"{name}.lora_B.weight"] = up
            lora_layers[name] = LoraLayer(up=up, down=down, scale=1.0)
        name = f"s{index}"
        styles.append(Style(name, state_dict, LoraAdapter(lora_layers, source={"benchmark": name})))
    return styles


def peft_lora_bytes(transformer: torch.nn.Module, adapter_names: Sequence[str]) -> int:
    """Bytes of the ``lora_A`` / ``lora_B`` parameters of the named PEFT adapters."""
    total = 0
    for name, parameter in transformer.named_parameters():
        parts = name.split(".")
        if any(f"lora_{side}" in parts for side in "AB") and any(a in parts for a in adapter_names):
            total += parameter.numel() * parameter.element_size()
    return total


def share_buffer_bytes(share: ShareModel) -> int:
    """Bytes of the buffers of every ``ShareLinear`` layer (bases, cores, anchor, presence, and the
    views of the selection's blended cores once styles were selected) and, once styles were selected,
    the dense ``(layers, t, k^2)`` cores the selection keeps for its blends (no layer's buffer, but
    memory Share holds to serve the styles), each tensor counted once."""
    seen: dict[int, int] = {}
    tensors = [buffer for layer in share.layers.values() for buffer in layer.buffers(recurse=False)]
    for group in share.selection._groups or ():  # None until the first selection after a change
        tensors += [group.dense_cores, group.positions]
    for tensor in tensors:
        seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def flux1_transformer(double_blocks: int, single_blocks: int, heads: int, joint_dim: int, pooled_dim: int):
    """A ``FluxTransformer2DModel`` with FLUX.1's configuration but these block counts and widths (hidden
    = ``heads`` x 128), built where torch's default device says (``with torch.device("meta"):`` costs no
    memory), in the default dtype, with diffusers' own initialisation."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=double_blocks,
        num_single_layers=single_blocks,
        attention_head_dim=128,
        num_attention_heads=heads,
        joint_attention_dim=joint_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    )


@torch.no_grad()
def fill_random_(model: torch.nn.Module, device: torch.device, seed: int) -> None:
    """Weights ~ N(0, 0.5 / sqrt(fan_in)), norm weights 1, biases 0, drawn on ``device``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, parameter in model.named_parameters():
        if parameter.ndim >= 2:
            parameter.normal_(0.0, 0.5 / parameter[0].numel() ** 0.5, generator=generator)
        elif name.endswith("bias"):
            parameter.zero_()
        else:
            parameter.fill_(1.0)
    for name, buffer in model.named_buffers():  # FluxTransformer2DModel has none; to_empty left them unset
        log(f"warning: buffer {name} set to zero")
        buffer.zero_()


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor stores; a quantized tensor subclass (torchao's ``Int8Tensor``, ``Float8Tensor``) counts its
    components (``qdata``, ``scale``, ...), whatever dtype it reports."""
    names = getattr(tensor, "tensor_data_names", None)
    if names:
        names = [*names, *(getattr(tensor, "optional_tensor_data_names", None) or ())]
        parts = (getattr(tensor, name, None) for name in names)
        return sum(tensor_bytes(part) for part in parts if isinstance(part, torch.Tensor))
    return tensor.numel() * tensor.element_size()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (quantized ones by their stored components), each counted once."""
    seen: dict[int, int] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        seen[id(tensor)] = tensor_bytes(tensor)
    return sum(seen.values())
