"""The studio's text boxes: prompts one per line, style lines, the blend builder. No torch, no Gradio.

The prompt box holds one prompt per line and the style box one line per prompt, or a single line for
all; each style line is parsed by :func:`share_diffusers.runtime.parse_style` (``none``, a name, a
blend ``ink=0.5,neon=0.5``, per-block weights ``ink[double=1,single=0.3]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..runtime import NONE, BlockWeight, StyleSpec, format_style, parse_block_weights, parse_style

if TYPE_CHECKING:
    from ..core.block_weights import BlockLayout


def parse_prompts(text: str | None) -> list[str]:
    """One prompt per non-empty line, stripped."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("enter at least one prompt (one per line)")
    return prompts


def parse_single_prompt(text: str | None) -> str:
    """The one prompt of a box that takes one (Compare); several non-empty lines are refused, not cut to the first."""
    prompts = parse_prompts(text)
    if len(prompts) > 1:
        raise ValueError(
            f"Compare takes one prompt, got {len(prompts)} lines; keep one (Generate takes one prompt per line)"
        )
    return prompts[0]


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


def blend_text(
    slots: Sequence[tuple[str | None, float] | tuple[str | None, float, str | None]],
    layout: BlockLayout | None = None,
) -> str:
    """The style line for the blend builder's ``(style, weight)`` or ``(style, weight, blocks)`` slots.

    ``blocks``, optional, is what goes inside the style's brackets (``double=1,single=0.3``,
    ``double.0-9=1,*=0``, or one value per block), each value multiplied by the weight. Empty or zero
    slots are left out; a style in two plain slots adds up its weights (``0.3 + 0.6`` is written ``0.9``). A
    vector keeps the layers outside every block at weight 1, so at a slot weight other than 1 it is written as the
    mapping it stands for (``layout``, the model's blocks, names them: ``ink[double.0-18=0.5,single.0-37=0.4,*=0.5]``).

    ``[("ink", 1.0)]`` -> ``"ink"``; ``[("ink", 0.5), ("neon", 0.5)]`` -> ``"ink=0.5,neon=0.5"``;
    ``[("ink", 0.5, "double=1,single=0.3")]`` -> ``"ink[double=0.5,single=0.15]"``; nothing chosen -> ``"none"``.

    Raises:
        ValueError: blocks that do not parse, a style with per-block weights in two slots, or a vector at
            a slot weight other than 1 without ``layout``.
        StyleError: a vector of the wrong length for ``layout``.
    """
    blend: dict[str, BlockWeight] = {}
    for name, weight, *rest in slots:
        blocks = (rest[0] if rest else None) or ""
        blocks = blocks.strip().removeprefix("[").removesuffix("]").strip()
        if not name or name == NONE or not weight:
            continue
        if blocks:
            if name in blend:
                raise ValueError(f"style {name!r} is in two blend slots, one with per-block weights; keep one slot")
            blend[name] = _times(name, parse_block_weights(name, blocks), float(weight), layout)
        elif isinstance(blend.get(name, 0.0), dict | list):
            raise ValueError(f"style {name!r} is in two blend slots, one with per-block weights; keep one slot")
        else:
            blend[name] = _decimal(blend.get(name, 0.0) + float(weight))
    return format_style(blend or None)


def _times(
    name: str, blocks: dict[str, float] | list[float], weight: float, layout: BlockLayout | None
) -> dict[str, float] | list[float]:
    """Per-block weights times the slot's weight, without float noise in the text (0.8 x 0.3 -> 0.24)."""
    if weight == 1.0:
        return blocks
    if isinstance(blocks, list):
        if layout is None:
            raise ValueError(f"the block vector of {name!r} needs slot weight 1: scale its values instead")
        blocks = layout.vector_as_mapping(name, blocks)
    return {key: _decimal(value * weight) for key, value in blocks.items()}


def _decimal(value: float) -> float:
    """``value`` without float noise, as the slots' decimal weights mean it (0.3 + 0.6: 0.9, not 0.8999999999999999)."""
    return float(f"{value:.12g}")


def style_choices(styles: Sequence[str]) -> list[str]:
    """Dropdown choices: ``none`` first, then the styles held."""
    return [NONE, *styles]


def held_selection(selection: Sequence[str] | None, styles: Sequence[str]) -> list[str]:
    """The entries of the Compare menu that still hold: a style, ``none`` or a typed blend (``ink=0.5,neon=0.5``,
    ``ink[double=1]``) whose every style is in ``styles``; an entry naming a deleted style is dropped."""
    return [entry for entry in selection or [] if _names_held(entry, set(styles))]


def _names_held(entry: str, styles: set[str]) -> bool:
    try:
        spec = parse_style(entry)
    except ValueError:
        return False
    return spec is None or ({spec} if isinstance(spec, str) else set(spec)) <= styles


# The library's advice names Python arguments; the page has a box (or the server's environment) for each.
_PAGE_TERMS = {
    "pass weight_name=...": "name one in 'File in the repo'",
    "pass token=...": "the studio reads HF_TOKEN from where it runs",
}


def in_page_terms(message: str) -> str:
    """A Hub error's ``message`` with its advice in the page's words (``pass weight_name=...`` -> the box)."""
    for python, page in _PAGE_TERMS.items():
        message = message.replace(python, page)
    return message
