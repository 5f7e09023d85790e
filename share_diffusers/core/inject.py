"""Putting ``ShareLinear`` layers into any ``nn.Module`` by target names, and taking them out again."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

from torch import nn

from .errors import QuantizedBaseError, ShapeMismatchError, ShareStateError
from .layer import ShareLinear, StyleSelection, is_pointwise_conv


def _is_wrappable(module: nn.Module) -> bool:
    """What ``ShareLinear`` wraps: an ``nn.Linear`` or a 1x1 ``nn.Conv2d`` with ``groups=1`` and no padding."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and is_pointwise_conv(module)


def matches_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's ``target_modules`` rule: a string is a regex that must match the whole module name; a
    list matches a module whose name equals an entry or ends with ``"." + entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` / 1x1 ``nn.Conv2d`` modules of ``model`` that ``target_modules`` selects."""
    return [
        name
        for name, module in model.named_modules()
        if name and _is_wrappable(module) and matches_target(name, target_modules)
    ]


def layer_shapes(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``(n_out, d_in)`` of each named linear/1x1-conv module (or its base if already wrapped)."""
    modules = dict(model.named_modules())
    shapes = {}
    for name in names:
        module = modules.get(name)
        if isinstance(module, ShareLinear):
            module = module.base_layer
        if module is None or not _is_wrappable(module):
            raise ShapeMismatchError(
                f"the model has no nn.Linear or 1x1 nn.Conv2d (groups=1, no padding) named {name!r}"
            )
        if isinstance(module, nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
        else:
            shapes[name] = (module.out_channels, module.in_channels)
    return shapes


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def wrap_modules(model: nn.Module, names: Sequence[str], selection: StyleSelection) -> dict[str, ShareLinear]:
    """Replace each named module by a ``ShareLinear`` around it (no factors yet); returns them by name.

    All names are checked before the first replacement, so a bad name changes nothing.
    """
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if module is None:
            raise ShapeMismatchError(f"the model has no module named {name!r}")
        if isinstance(module, ShareLinear):
            raise ShareStateError(f"{name!r} already carries Share factors; remove_share() first")
        if not _is_wrappable(module):
            raise ShapeMismatchError(
                f"{name!r} is a {type(module).__name__}, not an nn.Linear or 1x1 nn.Conv2d (groups=1, no padding)"
            )
    wrapped = {}
    for name in names:
        layer = ShareLinear(modules[name], selection)
        _set_submodule(model, name, layer)
        wrapped[name] = layer
    return wrapped


def remove_share(model: nn.Module) -> list[str]:
    """Put every wrapped module back; the model's module tree is exactly the original again.

    A fused layer is unfused first; one whose weight was quantized after the fuse cannot be (the style is part of
    its quantized weight now) and is put back as it is, with a warning. Returns the names restored.
    """
    restored, kept_fused = [], []
    for name, module in list(model.named_modules()):
        if isinstance(module, ShareLinear):
            try:
                module.unfuse()
            except QuantizedBaseError:
                module.drop_fused_state()
                kept_fused.append(name)
            _set_submodule(model, name, module.base_layer)
            restored.append(name)
    if kept_fused:
        warnings.warn(
            f"{len(kept_fused)} layers (e.g. {kept_fused[0]}) were quantized with a style fused into them and keep "
            "it: load the base model again for its own weights",
            stacklevel=2,
        )
    return restored
