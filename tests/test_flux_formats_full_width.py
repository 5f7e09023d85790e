"""Community Flux LoRA layouts at FLUX.1's real widths: converted, fitted to FLUX.1's layers, merged exactly.

diffusers' converters hard-code FLUX.1's widths for fused layouts (kohya's single-block ``linear1`` split
3072/3072/3072/12288, fused ``qkv`` in kohya, XLabs and BFL files), so the tiny test model cannot read
them. Here LoRA tensors are drawn in each layout's real key names and shapes (rank 4, the first and last
double and single blocks), converted by :func:`convert_flux_lora`, checked against a FLUX.1 transformer
built on the meta device (every real shape, no memory), merged into Share factors, and every layer's
reconstructed update is compared with the update the layout describes, computed here from the raw tensors.
A second test loads each file with stock ``FluxPipeline.load_lora_weights`` into a meta FLUX.1 and
compares the layers and scales PEFT builds with the converter's.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from flux_helpers import flux1_meta_transformer, one_torch_thread
from peft.tuners.lora import LoraLayer as PeftLoraLayer
from safetensors.torch import save_file

from share_diffusers import ShareFluxPipeline
from share_diffusers.core import LoraAdapter, ShareConfig, ShareFactors
from share_diffusers.core.subspace import to_fit
from share_diffusers.flux_lora import convert_flux_lora
from share_diffusers.loader import _check_lora_fits
from share_diffusers.lora_files import read_safetensors

W = 3072  # FLUX.1's hidden width: 24 heads x 128
MLP = 4 * W
RANK = 4
DOUBLE_BLOCKS = (0, 18)  # first and last: the converters loop over FLUX.1's 19 double ...
SINGLE_BLOCKS = (0, 37)  # ... and 38 single blocks
EXACT = ShareConfig(rank=32, pseudo_rank=32)  # k and p hold a rank-4 (sparse kohya: rank-16) LoRA exactly
TOLERANCE = 1e-6  # relative Frobenius error; float32 storage of the factors gives ~1e-7


def rows(*sizes: int) -> list[list[slice]]:
    """Consecutive row blocks of the given sizes, each as a one-slice list."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [[slice(start, start + size)] for start, size in zip(starts, sizes, strict=True)]


def split(layers: tuple[str, ...], sizes: tuple[int, ...]) -> list[tuple[str, list[slice]]]:
    return list(zip(layers, rows(*sizes), strict=True))


# A module of the original (BFL) FLUX.1 model -> its (n_out, d_in) and the diffusers layers its rows feed.
DOUBLE_MODULES = {
    "img_attn.qkv": ((3 * W, W), split(("attn.to_q", "attn.to_k", "attn.to_v"), (W, W, W))),
    "img_attn.proj": ((W, W), split(("attn.to_out.0",), (W,))),
    "txt_attn.qkv": ((3 * W, W), split(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), (W, W, W))),
    "txt_attn.proj": ((W, W), split(("attn.to_add_out",), (W,))),
    "img_mlp.0": ((MLP, W), split(("ff.net.0.proj",), (MLP,))),
    "img_mlp.2": ((W, MLP), split(("ff.net.2",), (W,))),
    "txt_mlp.0": ((MLP, W), split(("ff_context.net.0.proj",), (MLP,))),
    "txt_mlp.2": ((W, MLP), split(("ff_context.net.2",), (W,))),
    # BFL's Modulation and diffusers' AdaLayerNormZero chunk (shift, scale, gate) x 2 in the same order.
    "img_mod.lin": ((6 * W, W), split(("norm1.linear",), (6 * W,))),
    "txt_mod.lin": ((6 * W, W), split(("norm1_context.linear",), (6 * W,))),
}
SINGLE_MODULES = {
    "linear1": ((3 * W + MLP, W), split(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), (W, W, W, MLP))),
    "linear2": ((W, W + MLP), split(("proj_out",), (W,))),
    "modulation.lin": ((3 * W, W), split(("norm.linear",), (3 * W,))),
}
EMBEDDER_MODULES = {
    "img_in": ((W, 64), split(("x_embedder",), (W,))),
    "txt_in": ((W, 4096), split(("context_embedder",), (W,))),
    "time_in.in_layer": ((W, 256), split(("time_text_embed.timestep_embedder.linear_1",), (W,))),
    "time_in.out_layer": ((W, W), split(("time_text_embed.timestep_embedder.linear_2",), (W,))),
    "vector_in.in_layer": ((W, 768), split(("time_text_embed.text_embedder.linear_1",), (W,))),
    "vector_in.out_layer": ((W, W), split(("time_text_embed.text_embedder.linear_2",), (W,))),
    "guidance_in.in_layer": ((W, 256), split(("time_text_embed.guidance_embedder.linear_1",), (W,))),
    "guidance_in.out_layer": ((W, W), split(("time_text_embed.guidance_embedder.linear_2",), (W,))),
}
FINAL_MODULES = {
    "final_layer.linear": ((64, W), split(("proj_out",), (64,))),
    # BFL's final modulation gives (shift, scale); diffusers' AdaLayerNormContinuous takes (scale, shift).
    "final_layer.adaLN_modulation.1": ((2 * W, W), [("norm_out.linear", [slice(W, 2 * W), slice(0, W)])]),
}
# XLabs trains LoRAs inside its attention processors: qkv and proj of each stream, and in single blocks
# the qkv part of linear1 and all of linear2 (``proj_lora`` takes linear2's 15360-wide input).
XLABS_DOUBLE_MODULES = {
    "processor.qkv_lora1": DOUBLE_MODULES["img_attn.qkv"],
    "processor.proj_lora1": DOUBLE_MODULES["img_attn.proj"],
    "processor.qkv_lora2": DOUBLE_MODULES["txt_attn.qkv"],
    "processor.proj_lora2": DOUBLE_MODULES["txt_attn.proj"],
}
XLABS_SINGLE_MODULES = {
    "processor.qkv_lora": ((3 * W, W), split(("attn.to_q", "attn.to_k", "attn.to_v"), (W, W, W))),
    "processor.proj_lora": SINGLE_MODULES["linear2"],
}


def block_modules(
    double=DOUBLE_MODULES, single=SINGLE_MODULES, double_blocks=DOUBLE_BLOCKS, single_blocks=SINGLE_BLOCKS
):
    """``{BFL module path: (shape, [(diffusers layer path, row slices)])}`` over the given blocks."""
    modules = {}
    for i in double_blocks:
        for name, (shape, targets) in double.items():
            modules[f"double_blocks.{i}.{name}"] = (shape, [(f"transformer_blocks.{i}.{t}", r) for t, r in targets])
    for i in single_blocks:
        for name, (shape, targets) in single.items():
            modules[f"single_blocks.{i}.{name}"] = (
                shape,
                [(f"single_transformer_blocks.{i}.{t}", r) for t, r in targets],
            )
    return modules


def unfused(modules: dict) -> dict:
    """The same layers as diffusers-format LoRAs train them: one module per diffusers layer."""
    layers = {}
    for (_, d_in), targets in modules.values():
        for layer, slices in targets:
            n_out = sum(s.stop - s.start for s in slices)
            layers[layer] = ((n_out, d_in), [(layer, [slice(0, n_out)])])
    return layers


@dataclass
class Layout:
    """How a file of one layout names a module's tensors (``None``: the layout has no such key)."""

    key: Callable[[str], str]  # module path -> key stem
    down: str
    up: str
    alpha: str | None


LAYOUTS = {
    # kohya / sd-scripts; ComfyUI's 'lora_unet_' files are the same keys
    "kohya": Layout(
        lambda path: "lora_unet_" + path.replace(".", "_"), ".lora_down.weight", ".lora_up.weight", ".alpha"
    ),
    "comfyui": Layout(lambda path: f"diffusion_model.{path}", ".lora_down.weight", ".lora_up.weight", ".alpha"),
    "bfl": Layout(lambda path: f"diffusion_model.{path}", ".lora_A.weight", ".lora_B.weight", ".alpha"),
    # BFL names in a PEFT wrapper (fal's Kontext trainer): diffusers reads it only with every layer of every block
    "bfl-peft": Layout(lambda path: f"base_model.model.{path}", ".lora_A.weight", ".lora_B.weight", None),
    "xlabs": Layout(lambda path: path, ".down.weight", ".up.weight", None),
    "diffusers": Layout(lambda path: f"transformer.{path}", ".lora_A.weight", ".lora_B.weight", ".alpha"),
}


@dataclass
class Case:
    """One LoRA file to draw: its layout, its modules, their alphas (cycled; None writes no alpha)."""

    name: str
    layout: str
    modules: dict
    alphas: tuple = (None,)
    sparse: bool = False  # kohya split_qkv: fused modules' up matrices are block diagonal
    metadata: dict | None = None  # diffusers' ``lora_adapter_metadata`` (adapter config), written to the header
    extra: dict = field(default_factory=dict)  # further tensors the file holds that carry no update


ALPHAS = (8.0, 1.0, None, 16.0)  # scales 2, 0.25, 1 (no alpha key: alpha = rank), 4 at rank 4
ALL_BLOCKS = block_modules(double_blocks=range(19), single_blocks=range(38))
DIFFUSERS_LAYERS = unfused(block_modules())
CASES = [
    Case("kohya", "kohya", block_modules(), ALPHAS),
    Case("kohya-split-qkv", "kohya", block_modules(), (8.0, 12.0), sparse=True),
    Case("kohya-embedders", "kohya", EMBEDDER_MODULES, ALPHAS),
    Case("kohya-final-layer", "kohya", FINAL_MODULES),
    Case("kohya-final-layer-alpha", "kohya", FINAL_MODULES, (8.0,)),
    Case(
        "comfyui",
        "comfyui",
        block_modules(),
        ALPHAS,
        extra={"diffusion_model.double_blocks.0.img_attn.qkv.diff_b": torch.zeros(3 * W)},
    ),
    Case("bfl", "bfl", block_modules()),
    Case("bfl-peft", "bfl-peft", {**ALL_BLOCKS, "final_layer.linear": FINAL_MODULES["final_layer.linear"]}),
    Case("xlabs", "xlabs", block_modules(XLABS_DOUBLE_MODULES, XLABS_SINGLE_MODULES)),
    Case("diffusers", "diffusers", DIFFUSERS_LAYERS),
    # diffusers-format files give every layer an alpha or none: stock diffusers gives a layer without one the
    # most common alpha, not alpha = rank.
    Case("diffusers-alpha", "diffusers", DIFFUSERS_LAYERS, (8.0, 1.0, 16.0, 4.0)),
    Case(
        "diffusers-metadata",
        "diffusers",
        DIFFUSERS_LAYERS,
        metadata={"r": RANK, "lora_alpha": 8.0, "alpha_pattern": {"attn.to_q": 2.0}, "target_modules": None},
    ),
]

# Problems found here, for the lead to fix elsewhere; strict, so that a fix shows up as a failure to update.
BFL_NOT_READ = (
    "diffusers 0.42's FluxPipeline.lora_state_dict has no converter for BFL keys with lora_A/lora_B "
    "('diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight'): convert_flux_lora files the whole "
    "LoRA under a 'diffusion_model' component outside the transformer; stock load_lora_weights loads nothing"
)
KOHYA_UNPREFIXED = (
    "diffusers' kohya/ComfyUI converter writes img_in, txt_in, time_in, vector_in, guidance_in and final_layer "
    "as 'x_embedder.lora_A.weight'..., without 'transformer.': stock load_lora_weights drops them silently "
    "(convert_flux_lora moves them back into the transformer, with final_layer's alphas diffusers leaves out)"
)
CONVERSION_XFAIL: dict[str, str] = {}
STOCK_XFAIL = {
    "bfl": BFL_NOT_READ,
    "kohya-embedders": KOHYA_UNPREFIXED,
    "kohya-final-layer": KOHYA_UNPREFIXED,
    "kohya-final-layer-alpha": KOHYA_UNPREFIXED,
}


def params(xfail: dict) -> list:
    return [
        pytest.param(case, id=case.name, marks=[pytest.mark.xfail(strict=True, reason=xfail[case.name])])
        if case.name in xfail
        else pytest.param(case, id=case.name)
        for case in CASES
    ]


# -- drawing a file and describing its update -----------------------------------------------------------


@dataclass
class Drawn:
    """One module as the file holds it: ``dW = scale * up @ down`` with ``scale = alpha / rank`` (1 without alpha)."""

    up: torch.Tensor  # (n_out, r)
    down: torch.Tensor  # (r, d_in)
    alpha: float | None
    targets: list[tuple[str, list[slice]]]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


def draw(case: Case, seed: int = 0) -> dict[str, Drawn]:
    generator = torch.Generator().manual_seed(seed)
    drawn = {}
    for index, (path, ((n_out, d_in), targets)) in enumerate(case.modules.items()):
        alpha = case.alphas[index % len(case.alphas)]
        if case.sparse and len(targets) > 1:
            # sd-scripts' split_qkv: one rank-r LoRA per split, saved fused (rank r * splits, block-diagonal up).
            # The file's alpha is read over the fused rank, as diffusers and ComfyUI read it.
            rank = RANK * len(targets)
            up = torch.zeros(n_out, rank)
            for j, (_, slices) in enumerate(targets):
                up[slices[0], j * RANK : (j + 1) * RANK] = torch.randn(
                    slices[0].stop - slices[0].start, RANK, generator=generator
                )
        else:
            rank = RANK
            up = torch.randn(n_out, rank, generator=generator)
        down = torch.randn(rank, d_in, generator=generator) / math.sqrt(d_in)
        drawn[path] = Drawn(up, down, alpha, targets)
    return drawn


def write(case: Case, drawn: dict[str, Drawn], folder: Path) -> Path:
    """Write the drawn modules as a ``.safetensors`` file in the case's layout."""
    layout = LAYOUTS[case.layout]
    tensors = dict(case.extra)
    for path, module in drawn.items():
        stem = layout.key(path)
        tensors[stem + layout.down] = module.down
        tensors[stem + layout.up] = module.up
        if module.alpha is not None:
            assert layout.alpha is not None, f"{case.layout} files hold no alpha"
            tensors[stem + layout.alpha] = torch.tensor(module.alpha)
    metadata = None
    if case.metadata is not None:
        config = {**case.metadata, "target_modules": sorted(drawn)}
        metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    path = folder / f"{case.name}.safetensors"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata)
    return path


def described_updates(case: Case, drawn: dict[str, Drawn]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """diffusers layer -> ``(up, down)`` of the update the file describes (float64, scale folded into ``up``).

    Computed from the raw tensors: each module's ``scale * up @ down`` cut into the row blocks its diffusers
    layers take. With adapter metadata the scale is ``lora_alpha / r`` (``alpha_pattern`` per layer), as PEFT
    applies it.
    """
    updates = {}
    for path, module in drawn.items():
        scale = module.scale
        if case.metadata is not None:
            alpha = case.metadata["lora_alpha"]
            for pattern, value in case.metadata.get("alpha_pattern", {}).items():
                alpha = value if path.endswith("." + pattern) else alpha
            scale = alpha / case.metadata["r"]
        for layer, slices in module.targets:
            up = torch.cat([module.up[s] for s in slices]).double() * scale  # (rows, r)
            assert layer not in updates, f"{layer} is written twice"
            updates[layer] = (up, module.down.double())
    return updates


def relative_difference(
    expected: tuple[torch.Tensor, torch.Tensor], actual: tuple[torch.Tensor, torch.Tensor]
) -> float:
    """``||E - A||_F / ||E||_F`` for ``E = up @ down`` and ``A`` likewise, exactly, without forming either.

    ``E - A = [up_E, -up_A] @ [down_E; down_A]``, and the Frobenius norm of a product of two factors is that
    of the product of their QR triangles (``n x 2r`` QRs instead of ``n x d`` matrices: FLUX.1's 12288 x 3072
    layers would take seconds each in float64).
    """
    (up_e, down_e), (up_a, down_a) = expected, actual

    def norm(up: torch.Tensor, down: torch.Tensor) -> float:
        _, r_up = torch.linalg.qr(up)  # (r, r)
        _, r_down = torch.linalg.qr(down.T)  # (r, r)
        return float(torch.linalg.matrix_norm(r_up @ r_down.T))

    return norm(torch.cat([up_e, -up_a], 1), torch.cat([down_e, down_a], 0)) / norm(up_e, down_e)


def reconstructed(factors: ShareFactors, layer: str, style: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(up, down)`` of the style's reconstructed update: ``basis_out @ core`` and ``basis_in.T``."""
    share = to_fit(factors.layers[layer])
    core = share.cores(factors.style_vector({style: 1.0}))  # (k, k)
    return share.basis_out @ core, share.basis_in.T  # (n, k), (k, d)


def layer_shapes(transformer, names) -> dict[str, tuple[int, int]]:
    modules = dict(transformer.named_modules())
    return {name: tuple(modules[name].weight.shape) for name in names}


def in_compared_blocks(layer: str) -> bool:
    """Whether a layer is outside the blocks or in the blocks compared (the all-block file merges only those)."""
    block = re.match(r"(single_)?transformer_blocks\.(\d+)\.", layer)
    return block is None or int(block[2]) in (SINGLE_BLOCKS if block[1] else DOUBLE_BLOCKS)


@pytest.fixture(scope="module")
def flux1():
    return flux1_meta_transformer()


single_threaded = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


# -- tests -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", params(CONVERSION_XFAIL))
def test_layout_merges_exactly_at_flux1_width(case, flux1, tmp_path):
    drawn = draw(case)
    path = write(case, drawn, tmp_path)
    tensors, metadata = read_safetensors(path)
    converted = convert_flux_lora(tensors, metadata, origin=path.name)
    described = described_updates(case, drawn)
    assert sorted(converted.transformer) == sorted(described), "the converted layers are not the layers described"
    assert converted.other_energy == {}
    _check_lora_fits(flux1, converted.transformer, path.name)  # names and (n_out, d_in) of FLUX.1's layers

    compared = {layer: update for layer, update in described.items() if in_compared_blocks(layer)}
    factors = ShareFactors.empty(layer_shapes(flux1, compared), EXACT)
    factors.merge(LoraAdapter({layer: converted.transformer[layer] for layer in compared}), "style")
    errors = {
        layer: relative_difference(update, reconstructed(factors, layer, "style")) for layer, update in compared.items()
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, f"{worst}: relative error {errors[worst]:.2e}"


@pytest.mark.parametrize("case", params(STOCK_XFAIL))
def test_layout_scales_as_stock_diffusers(case, tmp_path):
    """Stock ``load_lora_weights`` on a meta FLUX.1: the same layers, factor shapes and ``scaling`` as ours."""
    path = write(case, draw(case), tmp_path)
    stock = FluxPipeline(
        transformer=flux1_meta_transformer(),
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    stock.load_lora_weights(str(path), adapter_name="style")
    peft_layers = {
        name: module for name, module in stock.transformer.named_modules() if isinstance(module, PeftLoraLayer)
    }
    assert peft_layers, "stock diffusers loaded no layer"
    converted = convert_flux_lora(*read_safetensors(path), origin=path.name).transformer
    assert sorted(converted) == sorted(peft_layers)
    for name, layer in converted.items():
        module = peft_layers[name]
        assert layer.scale == pytest.approx(float(module.scaling["style"]), rel=1e-12), name
        assert tuple(layer.down.shape) == tuple(module.lora_A["style"].weight.shape), name
        assert tuple(layer.up.shape) == tuple(module.lora_B["style"].weight.shape), name


def test_kohya_text_encoder_part_is_measured_outside_the_transformer():
    """A kohya file's CLIP-L part (``lora_te1_``) is no transformer layer; its energy is reported apart.

    diffusers' kohya converter writes those keys in its old attention-processor form
    (``text_encoder...self_attn.to_q_lora.down.weight``, alpha folded in), which convert_flux_lora reads too.
    """
    generator = torch.Generator().manual_seed(1)
    down, up = torch.randn(RANK, 768, generator=generator), torch.randn(768, RANK, generator=generator)
    tensors = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(RANK, W, generator=generator),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(W, RANK, generator=generator),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(2.0),
    }
    originals = {key: value.clone() for key, value in tensors.items()}
    converted = convert_flux_lora(tensors, origin="kohya-te")
    # diffusers' converter scales the text encoder's factors in place: the caller's tensors must not change
    assert all(torch.equal(value, originals[key]) for key, value in tensors.items())
    assert list(converted.transformer) == ["transformer_blocks.0.attn.to_out.0"]
    energy = float(((2.0 / RANK) * up.double() @ down.double()).square().sum())
    assert converted.other_energy["text_encoder"] == pytest.approx(energy, rel=1e-6)


def test_merge_lora_on_a_meta_flux1_pipeline(tmp_path):
    """The whole loader at FLUX.1 width: kohya fused qkv and linear1 through ``ShareFluxPipeline.merge_lora``."""
    case = Case("kohya", "kohya", block_modules(double_blocks=(0,), single_blocks=(0,)), ALPHAS)
    drawn = draw(case)
    path = write(case, drawn, tmp_path)
    pipe = ShareFluxPipeline(
        transformer=flux1_meta_transformer(),
        scheduler=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    described = described_updates(case, drawn)
    report = pipe.merge_lora(path, style_name="kohya", config=EXACT, target_modules="all-lora-layers")
    assert report.layers_merged == len(described) and report.outside == {}
    assert report.error < TOLERANCE
    factors = pipe.share_factors
    errors = {
        layer: relative_difference(update, reconstructed(factors, layer, "kohya"))
        for layer, update in described.items()
    }
    assert max(errors.values()) < TOLERANCE


def test_factored_difference_is_the_dense_one(tmp_path):
    """``relative_difference`` against dense ``ShareFactors.delta_weight`` on one FLUX.1 attention layer."""
    modules = block_modules({"img_attn.proj": DOUBLE_MODULES["img_attn.proj"]}, {}, (0,), ())
    case = Case("one", "kohya", modules, (8.0,))
    drawn = draw(case, seed=3)
    layer = "transformer_blocks.0.attn.to_out.0"
    (up, down) = described_updates(case, drawn)[layer]
    path = write(case, drawn, tmp_path)
    converted = convert_flux_lora(*read_safetensors(path), origin=path.name).transformer
    factors = ShareFactors.empty({layer: (W, W)}, ShareConfig(rank=8, pseudo_rank=2))  # p < r: a lossy fit
    factors.merge(LoraAdapter(converted), "style")
    dense_expected, dense_actual = up @ down, factors.delta_weight(layer, "style")
    dense = float((dense_expected - dense_actual).norm() / dense_expected.norm())
    assert dense > 1e-3  # the comparison sees a real difference
    assert relative_difference((up, down), reconstructed(factors, layer, "style")) == pytest.approx(dense, rel=1e-9)
