"""The studio's picture of the style bank: the 2-D style map (matplotlib, no Gradio, no pyplot).

The figure is built on ``matplotlib.figure.Figure`` directly, not through pyplot, so no global figure
state is shared between the studio's worker threads and nothing needs a display. The numbers come from
:mod:`share_diffusers.core.similarity` (``share-diffusers inspect --png`` draws the heat map of the same
similarities, in :mod:`share_diffusers.cli`).
"""

from __future__ import annotations

from ..core.similarity import StyleMap


def draw_style_map(axis, layout: StyleMap) -> None:
    """The styles as labelled points on ``axis``; nearby points are similar styles (see ``style_map``)."""
    points = layout.coordinates.numpy()
    xs = points[:, 0]
    ys = points[:, 1] if points.shape[1] > 1 else 0.0 * xs
    axis.scatter(xs, ys, s=40, color="tab:blue", zorder=2)
    # Styles at (nearly) one spot, such as a LoRA and a rescaled copy, share one label instead of overprinting.
    spots: list[tuple[float, float, list[str]]] = []
    for name, x, y in zip(layout.names, xs, ys, strict=True):
        spot = next((spot for spot in spots if abs(spot[0] - x) < 0.02 and abs(spot[1] - y) < 0.02), None)
        if spot is None:
            spots.append((float(x), float(y), [name]))
        else:
            spot[2].append(name)
    for x, y, names in spots:
        axis.annotate(", ".join(names), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=9)
    explained = layout.explained.tolist() + [0.0, 0.0]
    axis.set_xlabel(f"axis 1 ({explained[0]:.0%} of the spread)")
    axis.set_ylabel(f"axis 2 ({explained[1]:.0%} of the spread)")
    # Distances between unit-norm updates run from 0 (same style) to 2 (opposite): a fixed frame keeps
    # maps of different banks comparable, and equal aspect keeps distances true.
    reach = max(1.0, float(abs(points).max()) * 1.15) if points.size else 1.0
    axis.set_xlim(-reach, reach)
    axis.set_ylim(-reach, reach)
    axis.locator_params(nbins=5)
    axis.set_aspect("equal")
    axis.axhline(0.0, color="0.85", linewidth=0.8, zorder=1)
    axis.axvline(0.0, color="0.85", linewidth=0.8, zorder=1)
    axis.set_title("Style map (close = similar)")


def style_map_figure(layout: StyleMap, size: float = 4.5):
    """A figure holding only the 2-D style map (the studio's)."""
    from matplotlib.figure import Figure  # the app extra's

    figure = Figure(figsize=(size, size), layout="constrained")
    draw_style_map(figure.add_subplot(), layout)
    return figure
