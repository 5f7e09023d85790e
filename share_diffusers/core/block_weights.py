"""Per-block style weights: a style's weight as a number, a ``{blocks: weight}`` mapping, or a vector.

Flux users weight a LoRA per transformer block (ComfyUI's "LoRA Block Weight" and "Flux Block Lora
Select" nodes). In Share a per-block weight is only a different blend per layer, so it costs nothing
at run time: the per-layer weights are expanded once per request and the blended cores of all layers
come out of the same single batched product (:class:`~share_diffusers.core.layer.StyleSelection`).

A model's blocks are the children of its ``nn.ModuleList`` s that hold linears, in module order:
FLUX.1's ``transformer_blocks.0-18`` then ``single_transformer_blocks.0-37``, 57 blocks, the order of
ComfyUI's Flux block-weight vectors. A mapping's keys select layers by name:

- ``"transformer_blocks"`` or ``"transformer_blocks.3"``: every layer whose name starts with it;
- ``"single_transformer_blocks.0-9"``: a range of blocks, both ends included;
- ``"*"``: every layer no other key selects;
- aliases of known models: Flux's ``double`` / ``double_blocks`` and ``single`` / ``single_blocks``.

A layer takes the weight of the most specific key that selects it (the longest prefix: so
``{"double": 1.0, "double.0-3": 0.0}`` switches off the first four blocks), and weight 0 if none
does. A vector has one weight per block in the order above; layers outside every block (only
present when Share covers more than the blocks) keep weight 1.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from .errors import StyleError

# Short names for the block lists of models people weight per block, by model class name (so that
# this model-agnostic core imports no model library).
KNOWN_ALIASES: dict[str, dict[str, str]] = {
    "FluxTransformer2DModel": {
        "double": "transformer_blocks",
        "double_blocks": "transformer_blocks",
        "single": "single_transformer_blocks",
        "single_blocks": "single_transformer_blocks",
    },
}

_RANGE = re.compile(r"^(?P<base>.+)\.(?P<first>\d+)-(?P<last>\d+)$")


def is_block_weight(weight: object) -> bool:
    """True for a per-block weight (a mapping or a sequence), False for a plain number."""
    return isinstance(weight, Mapping) or (isinstance(weight, Sequence) and not isinstance(weight, str))


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of a model a per-block weight refers to.

    Attributes:
        blocks: block name prefixes (``"transformer_blocks.0"``) in module order: a vector's order.
        aliases: ``short name -> prefix`` (``"double" -> "transformer_blocks"``).
    """

    blocks: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, model: nn.Module) -> BlockLayout:
        """The blocks of ``model``: children of its outermost ``nn.ModuleList`` s that hold an ``nn.Linear``."""
        blocks: list[str] = []
        inside: list[str] = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.ModuleList) or any(name.startswith(outer + ".") for outer in inside):
                continue
            inside.append(name)
            for index, child in enumerate(module):
                if any(isinstance(sub, nn.Linear) for sub in child.modules()):
                    blocks.append(f"{name}.{index}" if name else str(index))
        return cls(tuple(blocks), dict(KNOWN_ALIASES.get(type(model).__name__, {})))

    def describe(self) -> str:
        """The blocks in short form for messages: ``"double.0-18, single.0-37"``."""
        short = {prefix: alias for alias, prefix in reversed(list(self.aliases.items()))}
        groups: dict[str, list[int]] = {}
        for block in self.blocks:
            base, _, index = block.rpartition(".")
            groups.setdefault(base, []).append(int(index))
        return ", ".join(f"{short.get(base, base)}.{min(ids)}-{max(ids)}" for base, ids in groups.items()) or "none"

    def multipliers(self, style: str, weight: object, layer_names: Sequence[str]) -> list[float]:
        """One weight per layer of ``layer_names`` for ``style``'s per-block ``weight`` (mapping or vector).

        Raises:
            StyleError: a key that selects no layer, a bad range, a vector of the wrong length, or a
                value that is not a finite number (each message names the style and the key).
        """
        if isinstance(weight, Mapping):
            return self._from_mapping(style, weight, layer_names)
        if len(weight) != len(self.blocks):
            raise StyleError(
                f"the block-weight vector of style {style!r} has {len(weight)} values; this model has "
                f"{len(self.blocks)} blocks ({self.describe()}), one value each in that order"
            )
        mapping = dict(zip(self.blocks, weight, strict=True))
        mapping["*"] = 1.0
        return self._from_mapping(style, mapping, layer_names)

    def _from_mapping(self, style: str, weight: Mapping, layer_names: Sequence[str]) -> list[float]:
        chosen = [0.0] * len(layer_names)
        specificity = [-2] * len(layer_names)  # of the key that set each layer; "*" is -1
        default = None
        for key, value in weight.items():
            value = _finite(style, key, value)
            if key == "*":
                default = value
                continue
            matched = False
            for prefix in self._prefixes(style, key):
                for index, name in enumerate(layer_names):
                    if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > specificity[index]:
                        chosen[index], specificity[index], matched = value, len(prefix), True
            if not matched:
                raise StyleError(
                    f"block weight key {key!r} of style {style!r} selects no Share layer of this model "
                    f"(its blocks: {self.describe()})"
                )
        if default is not None:
            chosen = [default if level == -2 else value for value, level in zip(chosen, specificity, strict=True)]
        return chosen

    def _prefixes(self, style: str, key: object) -> list[str]:
        if not isinstance(key, str) or not key:
            raise StyleError(f"block weight keys of style {style!r} are layer-name prefixes, got {key!r}")
        head, dot, rest = key.partition(".")
        key = self.aliases.get(head, head) + dot + rest
        found = _RANGE.match(key)
        if found is None:
            return [key]
        first, last = int(found["first"]), int(found["last"])
        if first > last:
            raise StyleError(f"block range {key!r} of style {style!r} runs backwards")
        return [f"{found['base']}.{index}" for index in range(first, last + 1)]


def _finite(style: str, key: object, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise StyleError(f"block weight {key!r} of style {style!r} must be a finite number, got {value!r}")
    return float(value)
