"""Text forms of prompts and styles in the studio: parsing, blend building, captions. No torch, no Gradio.

A style line is ``none`` (or empty), a style name, or a blend ``ink=0.5,neon=0.5``; the prompt box
holds one prompt per line and the style box one line per prompt, or a single line for all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

StyleSpec = str | dict[str, float] | None

NONE = "none"


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line, stripped."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("enter at least one prompt (one per line)")
    return prompts


def parse_style(text: str) -> StyleSpec:
    """``none`` or empty -> None; ``name`` -> name; ``a=0.5,b=0.5`` -> ``{"a": 0.5, "b": 0.5}``."""
    text = (text or "").strip()
    if not text or text.lower() == NONE:
        return None
    if "=" not in text:
        if "," in text:
            raise ValueError(f"{text!r}: give a blend with weights, e.g. ink=0.5,neon=0.5")
        return text
    blend: dict[str, float] = {}
    for part in text.split(","):
        name, equals, weight = (piece.strip() for piece in part.partition("="))
        if not equals or not name:
            raise ValueError(f"blend entry {part.strip()!r} must be name=weight, e.g. ink=0.5")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"blend weight of {name!r} must be a number, got {weight!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"blend weight of {name!r} must be finite, got {weight!r}")
        if name in blend:
            raise ValueError(f"style {name!r} appears twice in the blend {text!r}")
        blend[name] = value
    return blend


def parse_style_lines(text: str, n_prompts: int) -> list[StyleSpec]:
    """One style per prompt: one line each, a single line for all, or nothing (no style)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return [None] * n_prompts
    if len(lines) not in (1, n_prompts):
        raise ValueError(
            f"got {len(lines)} style lines for {n_prompts} prompts; give one line per prompt, or a single line for all"
        )
    specs = []
    for number, line in enumerate(lines, start=1):
        try:
            specs.append(parse_style(line))
        except ValueError as error:
            raise ValueError(f"style line {number}: {error}") from None
    return specs * n_prompts if len(specs) == 1 else specs


def blend_text(slots: Sequence[tuple[str | None, float]]) -> str:
    """The style line for the blend builder's ``(style, weight)`` slots; empty or zero slots are left out.

    ``[("ink", 1.0)]`` -> ``"ink"``; ``[("ink", 0.5), ("neon", 0.5)]`` -> ``"ink=0.5,neon=0.5"``;
    nothing chosen -> ``"none"``. A style in two slots adds up its weights.
    """
    blend: dict[str, float] = {}
    for name, weight in slots:
        if name and name != NONE and weight:
            blend[name] = blend.get(name, 0.0) + float(weight)
    return format_style(blend or None)


def format_style(spec: StyleSpec) -> str:
    """The text form of a style, for captions and the style box; ``parse_style`` reads it back."""
    if spec is None:
        return NONE
    if isinstance(spec, str):
        return spec
    if len(spec) == 1 and next(iter(spec.values())) == 1.0:
        return next(iter(spec))
    return ",".join(f"{name}={weight:g}" for name, weight in spec.items())


def style_choices(styles: Sequence[str]) -> list[str]:
    """Dropdown choices: ``none`` first, then the styles held."""
    return [NONE, *styles]
