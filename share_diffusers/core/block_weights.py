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
``{"double": 1.0, "double.0-3": 0.0}`` switches off the first four blocks; one block beats a range
over it and a narrower range a wider one, in any order of the keys; of two as specific, the later key),
and weight 0 if none does. A key that selects no Share layer is
an error (a typo), unless it names blocks of the model that Share does not cover.

A vector has one weight per block in the order above; layers outside every block (only present when
Share covers more than the blocks) keep weight 1, or take the vector's leading BASE value when it has
one more value than blocks (ComfyUI Inspire Pack's FLUX vectors: BASE, 19 double, 38 single).
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
# Keys one per-block mapping may have: far more than any model's blocks and layer groups, and a bound on the
# work a request (a server's, say) can ask for: each key is matched against every Share layer.
MAX_BLOCK_KEYS = 1024


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
        described = [f"{short.get(base, base)}.{min(ids)}-{max(ids)}".lstrip(".") for base, ids in groups.items()]
        return ", ".join(described) or "none"

    def vector_as_mapping(self, style: str, values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
        """The mapping a block vector (times ``scale``) stands for, in short keys: runs of equal values become ranges.

        FLUX.1's ``[1]*19 + [0.5]*38`` -> ``{"double.0-18": 1.0, "single.0-37": 0.5, "*": 1.0}``; the vector's
        layers outside every block (``"*"``) get its leading BASE value, or 1, times ``scale``.

        Raises:
            StyleError: a vector of the wrong length.
        """
        outside, values = self._split_vector(style, values)
        short = {prefix: alias for alias, prefix in reversed(list(self.aliases.items()))}
        runs: list[tuple[str, int, int, float]] = []  # (list name, first, last, value)
        for block, value in zip(self.blocks, values, strict=True):
            base, _, index = block.rpartition(".")
            value = float(value) * scale
            if runs and base and runs[-1][0] == base and runs[-1][3] == value and runs[-1][2] == int(index) - 1:
                runs[-1] = (base, runs[-1][1], int(index), value)
            else:
                runs.append((base, int(index), int(index), value))
        mapping = {}
        for base, first, last, value in runs:
            name = f"{short.get(base, base)}." if base else ""
            mapping[f"{name}{first}" if first == last else f"{name}{first}-{last}"] = value
        mapping["*"] = float(outside) * scale
        return mapping

    def _split_vector(self, style: str, values: Sequence[float]) -> tuple[float, Sequence[float]]:
        """``(weight outside the blocks, one weight per block)`` of a vector with or without a leading BASE value."""
        if len(values) == len(self.blocks):
            return 1.0, values
        if len(values) == len(self.blocks) + 1:
            return values[0], values[1:]
        raise StyleError(
            f"the block-weight vector of style {style!r} has {len(values)} values; this model has "
            f"{len(self.blocks)} blocks ({self.describe()}), one value each in that order (or "
            f"{len(self.blocks) + 1} with a leading BASE value for the layers outside them)"
        )

    def multipliers(self, style: str, weight: object, layer_names: Sequence[str]) -> list[float]:
        """One weight per layer of ``layer_names`` for ``style``'s per-block ``weight`` (mapping or vector).

        Raises:
            StyleError: a key that selects no layer, a bad range, a vector of the wrong length, or a
                value that is not a finite number (each message names the style and the key).
        """
        if isinstance(weight, Mapping):
            if len(weight) > MAX_BLOCK_KEYS:
                raise StyleError(
                    f"the per-block weights of style {style!r} have {len(weight)} keys; at most {MAX_BLOCK_KEYS}"
                )
            return self._from_mapping(style, weight, layer_names)
        outside, values = self._split_vector(style, weight)
        mapping = dict(zip(self.blocks, values, strict=True))
        mapping["*"] = outside
        return self._from_mapping(style, mapping, layer_names)

    def _from_mapping(self, style: str, weight: Mapping, layer_names: Sequence[str]) -> list[float]:
        chosen = [0.0] * len(layer_names)
        # Rank of the key that set each layer: (prefix length, minus the blocks it spans, 1 for one block /
        # 0 for a range); a later key wins a tie, so a one-block key beats a range over it and a narrower
        # range a wider one whatever the order of the keys.
        rank = [(-1, 0, -1)] * len(layer_names)
        default = None
        for key, value in weight.items():
            value = _finite(style, key, value)
            if key == "*":
                default = value
                continue
            prefixes, is_range = self._prefixes(style, key)
            selects = False
            for prefix in prefixes:
                key_rank = (len(prefix), -len(prefixes), 0 if is_range else 1)
                for index, name in enumerate(layer_names):
                    if name == prefix or name.startswith(prefix + "."):
                        selects = True
                        if key_rank >= rank[index]:
                            chosen[index], rank[index] = value, key_rank
            # A key naming a block of the model is no typo even when Share covers none of its layers
            # (a block vector names every block).
            if not selects and not all(prefix in self.blocks for prefix in prefixes):
                raise StyleError(
                    f"block weight key {key!r} of style {style!r} selects no Share layer of this model "
                    f"(its blocks: {self.describe()})"
                )
        if default is not None:
            chosen = [default if level[0] == -1 else value for value, level in zip(chosen, rank, strict=True)]
        return chosen

    def _prefixes(self, style: str, key: object) -> tuple[list[str], bool]:
        """The layer-name prefixes ``key`` stands for, and whether it is a block range."""
        if not isinstance(key, str) or not key:
            raise StyleError(f"block weight keys of style {style!r} are layer-name prefixes, got {key!r}")
        head, dot, rest = key.partition(".")
        key = self.aliases.get(head, head) + dot + rest
        found = _RANGE.match(key)
        if found is None:
            return [key], False
        first, last = int(found["first"]), int(found["last"])
        if first > last:
            raise StyleError(f"block range {key!r} of style {style!r} runs backwards")
        # Checked before the prefixes are listed: a range's size is the request's, not the model's.
        known = [int(block.rpartition(".")[2]) for block in self.blocks if block.rpartition(".")[0] == found["base"]]
        if not known:
            raise StyleError(
                f"block range {key!r} of style {style!r}: {found['base']!r} is not a block list of this model "
                f"(its blocks: {self.describe()})"
            )
        if last > max(known):
            raise StyleError(
                f"block range {key!r} of style {style!r} runs past the model's last block "
                f"'{found['base']}.{max(known)}' (its blocks: {self.describe()})"
            )
        return [f"{found['base']}.{index}" for index in range(first, last + 1)], True


def _finite(style: str, key: object, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise StyleError(f"block weight {key!r} of style {style!r} must be a finite number, got {value!r}")
    return float(value)
