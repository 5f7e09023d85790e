"""The studio's text boxes: prompts one per line, style lines, the blend builder. No torch, no Gradio.

The prompt box holds one prompt per line and the style box one line per prompt, or a single line for
all; each style line is parsed by :func:`share_diffusers.runtime.parse_style` (``none``, a name, or a
blend ``ink=0.5,neon=0.5``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..runtime import NONE, StyleSpec, format_style, parse_style


def parse_prompts(text: str | None) -> list[str]:
    """One prompt per non-empty line, stripped."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("enter at least one prompt (one per line)")
    return prompts


def parse_style_lines(text: str | None, n_prompts: int) -> list[StyleSpec]:
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


def style_choices(styles: Sequence[str]) -> list[str]:
    """Dropdown choices: ``none`` first, then the styles held."""
    return [NONE, *styles]
