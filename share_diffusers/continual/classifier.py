"""A pretrained transformers backbone with one linear head per task, on pooled features.

Text backbones (BERT-like, e.g. all-MiniLM-L6-v2) are mean-pooled over real tokens; vision
backbones (e.g. MobileNetV2) use their pooled output. Share (or a PEFT LoRA) goes on the
backbone's attention linears, or on the 1x1 convolutions of a convolutional backbone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from ..core import ShareError
from ..core.inject import find_targets, matches_target

# Attention projections of BERT-like encoders; the 1x1 convolutions of MobileNetV2 blocks.
TEXT_TARGETS = ["query", "key", "value", "attention.output.dense"]
CONV_TARGETS = ["expand_1x1.convolution", "reduce_1x1.convolution"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_targets(backbone: nn.Module) -> list[str]:
    """The module-name suffixes Share and LoRA adapt on this backbone."""
    return CONV_TARGETS if getattr(backbone.config, "model_type", "") == "mobilenet_v2" else TEXT_TARGETS


class BackboneError(ShareError, ValueError):
    """The backbone does not load, does not take the tasks' kind of input, or lacks the layers to adapt."""


def load_backbone(path: str, modality: str):
    """``(backbone, tokenizer or None)`` from a transformers folder or repo id (weights as stored).

    Raises:
        BackboneError: ``path`` does not load (transformers' first line of why), or the model takes other input
            than ``modality``'s (token ids for text, pixel values for images).
    """
    try:
        config = AutoConfig.from_pretrained(path)
        backbone = AutoModel.from_pretrained(path, config=config)
    except (OSError, ValueError) as error:
        reason = _first_line(error)
        raise BackboneError(f"--model_name_or_path {path}: no transformers model loads from it ({reason})") from None
    wanted = {"text": "input_ids", "image": "pixel_values"}[modality]
    if backbone.main_input_name != wanted:
        raise BackboneError(
            f"--model_name_or_path {path} is a {config.model_type} model, which takes {backbone.main_input_name}; "
            f"{modality} tasks need a backbone that takes {wanted}"
        )
    tokenizer = None
    if modality == "text":
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            reason = _first_line(error)
            raise BackboneError(f"--model_name_or_path {path}: its tokenizer does not load ({reason})") from None
    return backbone, tokenizer


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def check_targets(backbone: nn.Module, targets: Sequence[str], share: bool = False) -> None:
    """Each of ``targets`` (PEFT's rule for a list: a whole module name or a suffix after a dot) names at least
    one linear or convolution of ``backbone``; PEFT would drop a misspelt one silently if another matched.

    ``share``: the targets carry a Share subspace, so every module they select must be one ``ShareLinear`` wraps
    (an ``nn.Linear``, or a 1x1 ``nn.Conv2d`` with ``groups=1`` and no padding): the first task's PEFT LoRA on a
    3x3 convolution could not be merged into the subspace once trained.

    Raises:
        BackboneError: naming the target and an example of the names there are (or the module Share cannot hold).
    """
    names = [name for name, module in backbone.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            example = names[0] if names else "none"
            raise BackboneError(
                f"--target_modules {target!r} matches no linear or convolution of the backbone (a module name or "
                f"its ending after a dot; the backbone has {len(names)}, e.g. {example!r})"
            )
        if share:
            wrappable = set(find_targets(backbone, [target]))
            other = next(
                (
                    (name, module)
                    for name, module in backbone.named_modules()
                    if matches_target(name, [target]) and name not in wrappable
                ),
                None,
            )
            if other is not None:
                name, module = other
                raise BackboneError(
                    f"--target_modules {target!r} selects {name!r}, a {_described(module)}; Share holds only linears "
                    "and 1x1 convolutions (groups=1, no padding): choose targets that select only those"
                )


def _described(module: nn.Module) -> str:
    """A module for a message: ``3x3 Conv2d (groups=1, padding=(1, 1))``, or its class name."""
    if not isinstance(module, nn.Conv2d):
        return type(module).__name__
    height, width = module.kernel_size
    return f"{height}x{width} Conv2d (groups={module.groups}, padding={module.padding})"


class ContinualClassifier(nn.Module):
    """``backbone`` -> pooled features ``(batch, hidden)`` -> ``heads[task]`` -> logits ``(batch, labels)``.

    Args:
        backbone: a transformers base model (``AutoModel``), adapted in place by Share or PEFT.
        modality: ``"text"`` (batch = tokenizer output) or ``"image"`` (batch = ``pixel_values``).
        num_labels: task name -> number of labels, in task order; all heads exist from the start
            (initialised from ``seed``) so the module's structure never changes between tasks.
    """

    def __init__(self, backbone: nn.Module, modality: str, num_labels: dict[str, int], seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.modality = modality
        hidden = self._feature_width()
        generator = torch.Generator().manual_seed(seed)
        self.heads = nn.ModuleDict()
        for task, count in num_labels.items():
            head = nn.Linear(hidden, count)
            with torch.no_grad():  # nn.Linear's default init, from our own generator
                bound = 1 / hidden**0.5
                head.weight.copy_(torch.empty(count, hidden).uniform_(-bound, bound, generator=generator))
                head.bias.copy_(torch.empty(count).uniform_(-bound, bound, generator=generator))
            self.heads[task] = head

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled backbone features, ``(batch, hidden)``."""
        if self.modality == "image":
            return self.backbone(pixel_values=batch["pixel_values"]).pooler_output.flatten(1)
        hidden = self.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        return self.heads[task](self.features(batch))

    @torch.no_grad()
    def _feature_width(self) -> int:
        if self.modality == "image":
            size = getattr(self.backbone.config, "image_size", 32)
            probe = {"pixel_values": torch.zeros(1, 3, size, size)}
        else:
            probe = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2)}
        training = self.backbone.training
        self.backbone.eval()
        width = self.features(probe).shape[-1]
        self.backbone.train(training)
        return width


class BatchEncoder:
    """Turns ``[(input, label), ...]`` into ``(batch dict, labels (batch,))`` for the backbone.

    Text: the tokenizer pads to the longest example, truncated at ``max_length`` tokens. Images: RGB,
    resized to ``resolution`` x ``resolution``, ImageNet-normalised.
    """

    def __init__(self, modality: str, tokenizer=None, max_length: int = 128, resolution: int = 112):
        self.modality, self.tokenizer, self.max_length, self.resolution = modality, tokenizer, max_length, resolution

    def __call__(self, examples: Sequence[tuple[str, int]]):
        inputs = [example for example, _ in examples]
        labels = torch.tensor([label for _, label in examples])
        if self.modality == "text":
            encoded = self.tokenizer(
                inputs, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}, labels
        return {"pixel_values": torch.stack([self._pixels(path) for path in inputs])}, labels

    def _pixels(self, path: str) -> torch.Tensor:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((self.resolution,) * 2, Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        return (pixels - mean) / std
