"""Shared fixtures: random and structured LoRA adapters, PEFT-written adapter folders, a local fake Hub."""

from __future__ import annotations

import os
import socket

# Before anything imports huggingface_hub: every Hub call of the test session goes to a local
# stand-in (tests/hub_server.py), never to the internet.
with socket.socket() as _probe:
    _probe.bind(("127.0.0.1", 0))
    HUB_PORT = _probe.getsockname()[1]
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from share_diffusers.core import LoraAdapter, LoraLayer  # noqa: E402


def random_adapter(
    shapes: dict[str, tuple[int, int]],
    rank: int,
    alpha: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> LoraAdapter:
    """Random LoRA factors on the given layers (``name -> (n_out, d_in)``), scale ``alpha / rank``."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name, (n_out, d_in) in shapes.items():
        up = torch.randn(n_out, rank, generator=generator, dtype=torch.float64)
        down = torch.randn(rank, d_in, generator=generator, dtype=torch.float64) / d_in**0.5
        layers[name] = LoraLayer(up.to(dtype), down.to(dtype), (alpha if alpha is not None else rank) / rank)
    return LoraAdapter(layers)


def shared_adapters(
    count: int,
    shapes: dict[str, tuple[int, int]],
    rank: int,
    shared_rank: int,
    noise: float = 0.05,
    scramble: bool = False,
    seed: int = 0,
) -> list[LoraAdapter]:
    """Adapters whose updates lie mostly in a common subspace of ``shared_rank`` per side, plus noise.

    ``scramble`` multiplies each adapter's gauge: ``(B G, G^-1 A)`` with a random ill-conditioned ``G``,
    as independently trained LoRAs have.
    """
    generator = torch.Generator().manual_seed(seed)
    bases = {
        name: (
            torch.linalg.qr(torch.randn(n, shared_rank, generator=generator, dtype=torch.float64))[0],
            torch.linalg.qr(torch.randn(d, shared_rank, generator=generator, dtype=torch.float64))[0],
        )
        for name, (n, d) in shapes.items()
    }
    adapters = []
    for _ in range(count):
        layers = {}
        for name, (n, d) in shapes.items():
            out_basis, in_basis = bases[name]
            up = out_basis @ torch.randn(shared_rank, rank, generator=generator, dtype=torch.float64)
            up = up + noise * torch.randn(n, rank, generator=generator, dtype=torch.float64)
            down = torch.randn(rank, shared_rank, generator=generator, dtype=torch.float64) @ in_basis.T
            down = down + noise * torch.randn(rank, d, generator=generator, dtype=torch.float64)
            if scramble:
                gauge = torch.diag(torch.logspace(-1.5, 1.5, rank, dtype=torch.float64))
                gauge = gauge @ torch.linalg.qr(torch.randn(rank, rank, generator=generator, dtype=torch.float64))[0]
                up, down = up @ gauge, torch.linalg.solve(gauge, down)
            layers[name] = LoraLayer(up.float(), down.float(), 1.0)
        adapters.append(LoraAdapter(layers))
    return adapters


def relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    reference, value = reference.detach().double(), value.detach().double()
    return float((reference - value).norm() / reference.norm())


class TinyNet(nn.Module):
    """Two attention-like linears and a 1x1 conv, enough to exercise injection and PEFT."""

    def __init__(self, width: int = 24, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.to_q = nn.Linear(width, width)
        self.to_v = nn.Linear(width, 2 * width, bias=False)
        self.mix = nn.Conv2d(2 * width, width, kernel_size=1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, width)
        hidden = torch.relu(self.to_v(self.to_q(x)))  # (b, 2 width)
        hidden = self.mix(hidden[:, :, None, None])[:, :, 0, 0]  # (b, width)
        return self.head(hidden)


TINY_SHAPES = {"to_q": (24, 24), "to_v": (48, 24), "mix": (24, 48)}


@pytest.fixture
def tiny_net() -> TinyNet:
    return TinyNet()


def write_peft_adapter(directory, seed: int, rank: int = 4, alpha: int = 8, targets=("to_q", "to_v", "mix")) -> str:
    """Train-free PEFT adapter: PEFT wraps ``TinyNet``, random non-zero LoRA weights, ``save_pretrained``."""
    from peft import LoraConfig, get_peft_model

    model = TinyNet()
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="session")
def fake_hub():
    from hub_server import FakeHub

    hub = FakeHub(HUB_PORT)
    yield hub
    hub.close()


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where CUDA is (``pytest -m gpu`` on a GPU machine); CI skips them."""
    if torch.cuda.is_available() or os.environ.get("SHARE_GPU_TEST_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
