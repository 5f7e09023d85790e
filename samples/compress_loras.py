"""Compress a folder of LoRAs into one Share checkpoint, merge one more, inspect, export a style back.

Runs offline in seconds. The LoRAs are written by PEFT itself for a small attention-like model;
like LoRAs fine-tuned on related styles, they share most of a low-rank subspace, and each has its
own arbitrary gauge ``(B G, G^-1 A)`` and alpha.

    python samples/compress_loras.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from share_diffusers.cli import main as share_cli
from share_diffusers.core import load_factors

WIDTH, RANK, SHARED = 256, 8, 12


class Attention(nn.Module):
    """The four projections of one attention block (no softmax needed to show the weights)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(WIDTH, WIDTH) for _ in range(4))

    def forward(self, x):
        return self.to_out(self.to_q(x) * self.to_k(x) + self.to_v(x))


def write_loras(root: Path, count: int) -> list[Path]:
    """``count`` PEFT LoRAs sharing a rank-``SHARED`` subspace per layer, with random gauges and alphas."""
    generator = torch.Generator().manual_seed(0)
    shared = {
        name: (
            torch.linalg.qr(torch.randn(WIDTH, SHARED, generator=generator))[0],
            torch.linalg.qr(torch.randn(WIDTH, SHARED, generator=generator))[0],
        )
        for name in ("to_q", "to_k", "to_v", "to_out")
    }
    paths = []
    for index in range(count):
        alpha = [8, 16, 4][index % 3]
        model = get_peft_model(Attention(), LoraConfig(r=RANK, lora_alpha=alpha, target_modules=list(shared)))
        with torch.no_grad():
            for name, (out_basis, in_basis) in shared.items():
                layer = model.base_model.model.get_submodule(name)
                up = out_basis @ torch.randn(SHARED, RANK, generator=generator) + 0.005 * torch.randn(
                    WIDTH, RANK, generator=generator
                )
                down = torch.randn(RANK, SHARED, generator=generator) @ in_basis.T
                gauge = (
                    torch.diag(torch.logspace(-1, 1, RANK))
                    @ torch.linalg.qr(torch.randn(RANK, RANK, generator=generator))[0]
                )
                layer.lora_B["default"].weight.copy_(up @ gauge)
                layer.lora_A["default"].weight.copy_(torch.linalg.solve(gauge, down))
        path = root / f"style-{index:02d}"
        model.save_pretrained(str(path))
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write LoRAs and the checkpoint")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="share-demo-"))
    loras = write_loras(workdir / "loras", 9)
    checkpoint = workdir / "share"
    print(f"== compress 8 PEFT LoRAs (rank {RANK}) into {checkpoint}, k=16, p=8")
    assert (
        share_cli(["-q", "compress", *map(str, loras[:8]), "-o", str(checkpoint), "-k", "16", "-p", "8", "--overwrite"])
        == 0
    )
    print("\n== merge a ninth LoRA continually (the first eight are not needed)")
    assert share_cli(["-q", "merge", str(checkpoint), str(loras[8])]) == 0
    print("\n== inspect")
    assert share_cli(["inspect", str(checkpoint)]) == 0
    exported = workdir / "style-03-exported"
    print("\n== export style-03 as a plain PEFT LoRA and load it with stock PEFT")
    assert share_cli(["export", str(checkpoint), "style-03", "-o", str(exported)]) == 0
    x = torch.randn(4, WIDTH)
    torch.set_grad_enabled(False)
    original = PeftModel.from_pretrained(Attention(), str(loras[3]))(x)
    roundtrip = PeftModel.from_pretrained(Attention(), str(exported))(x)
    error = float((original - roundtrip).norm() / (original - Attention()(x)).norm())
    print(f"output of the exported LoRA vs the original LoRA: relative error of the update {error:.2e}")
    print(f"\nstyles: {load_factors(checkpoint).style_names}")


if __name__ == "__main__":
    main()
