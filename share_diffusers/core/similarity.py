"""A map of the style bank: exact similarities between styles, a 2-D embedding, kept energy, near-duplicates.

Every style is a set of ``k x k`` cores in shared orthonormal bases (DESIGN 1), so on layer ``l``

    <dW_il, dW_jl>_F = <basis_out C_il basis_in.T, basis_out C_jl basis_in.T>_F = <C_il, C_jl>_F

and comparing two styles over a whole model costs ``O(k^2)`` numbers a layer instead of two dense
``(n_out, d_in)`` updates. ``C_il`` is the style's dense core as the model applies it
(:meth:`~.subspace.LayerShare.cores`: ``core_out @ core_in.T`` plus the layer's anchor where the style is
present); a style that does not touch a layer has a zero update there. The numbers describe the styles
as held, i.e. their reconstructions; when ``k`` holds every LoRA (relative error ~0) they are those of
the original LoRAs.

Bases are stored in float32, orthonormal to about 1e-7, so the identity above holds to about that
relative precision; the sums are taken in float64. Nothing here depends on diffusers, matplotlib or a model.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch

from .errors import ShareValueError, StyleError
from .factors import ShareFactors
from .subspace import LayerShare

NEAR_DUPLICATE_THRESHOLD = 0.95
"""Cosine similarity at or above which a new style is reported as a near-duplicate of a held one.

A LoRA and a copy of it at another strength (alpha, scale) have similarity 1; two LoRAs trained
independently on different data are near 0 on wide layers (random directions in ``n_out * d_in``
dimensions). 0.95 means the two updates differ by about 30% of their size after the best rescaling
(``sqrt(1 - 0.95^2) = 0.31``): the second style adds little the first cannot give at another weight.
"""


class NearDuplicateStyleWarning(UserWarning):
    """A style merged into a bank is nearly a rescaled copy of a style already held."""


class StyleSimilarity(NamedTuple):
    """Pairwise cosine similarities of styles (see :func:`style_similarity`).

    Attributes:
        names: the styles, in the order of the matrix's rows and columns.
        matrix: ``(t, t)`` float64, symmetric, in ``[-1, 1]``.
    """

    names: list[str]
    matrix: torch.Tensor

    def to_json(self) -> dict:
        return {"styles": list(self.names), "matrix": self.matrix.tolist()}


class StyleMap(NamedTuple):
    """Coordinates of the styles for a 2-D (or ``dims``-D) map (see :func:`style_map`).

    Attributes:
        names: the styles, in the order of the rows.
        coordinates: ``(t, dims)`` float64.
        explained: ``(dims,)``, the share of the styles' total spread each axis shows (sums to 1 when
            ``dims`` axes hold all of it).
    """

    names: list[str]
    coordinates: torch.Tensor
    explained: torch.Tensor

    def to_json(self) -> dict:
        return {
            "styles": list(self.names),
            "coordinates": self.coordinates.tolist(),
            "explained": self.explained.tolist(),
        }


def style_similarity(
    factors: ShareFactors, styles: Sequence[str] | None = None, layers: Iterable[str] | None = None
) -> StyleSimilarity:
    """Cosine similarity of the styles' whole weight updates.

    For styles ``i`` and ``j`` over the layers ``l``::

        s_ij = sum_l <C_il, C_jl>_F / sqrt(sum_l ||C_il||_F^2 * sum_l ||C_jl||_F^2)

    which is exactly the cosine of the two dense updates of all layers flattened and concatenated,
    ``cos(vec[dW_i1, dW_i2, ...], vec[dW_j1, dW_j2, ...])`` (bases orthonormal). It is *not* the mean of
    the per-layer cosines ``<C_il, C_jl> / (||C_il|| ||C_jl||)``: that would give a layer where a style
    barely writes the same say as its main layers. Layers weigh by the styles' energy there, as they do
    in the images. The sign is kept: a LoRA and its negation have similarity -1.

    Args:
        factors: the bank.
        styles: which styles, in this order (default: all, in the bank's order).
        layers: layer names to compare on (default: all), e.g. one group from :func:`layer_group`.

    Returns:
        :class:`StyleSimilarity` ``(names, matrix)``. A style with no energy on the chosen layers has
        similarity 0 to every style, itself included (its cosine is undefined); any other has 1 with itself.
        A bank that holds no style (every one deleted) gives no names and a ``(0, 0)`` matrix.
    """
    names = _style_names(factors, styles)
    indices = [factors.style_index(name) for name in names]
    inner, energy = _inner_products(factors, indices, indices, layers)  # (t, t), (t,)
    matrix = _cosines(0.5 * (inner + inner.T), energy, energy)  # symmetric bit for bit (BLAS's X X.T is not)
    matrix.diagonal().copy_((energy > 0).to(matrix.dtype))  # exactly 1, not 1 - 1e-16
    return StyleSimilarity(names, matrix)


def style_map(similarity: StyleSimilarity, dims: int = 2) -> StyleMap:
    """Coordinates of the styles such that distances on the map approximate distances between styles.

    The distance between styles ``i`` and ``j`` is that of their unit-norm updates,
    ``sqrt(2 - 2 s_ij)`` (the chord between the directions, 0 for rescaled copies, sqrt 2 for unrelated
    styles, 2 for a negated copy): a Euclidean distance, so classical multidimensional scaling on it is
    exact and equals PCA of the unit-norm updates: the top ``dims`` eigenvectors of the double-centred
    similarity matrix ``J S J`` (``J = I - 1 1.T / t``), scaled by the square roots of their eigenvalues.
    Computed from the ``t x t`` matrix alone. Each axis's sign is fixed (its largest-magnitude coordinate
    positive), so a map is deterministic.

    Args:
        similarity: from :func:`style_similarity`.
        dims: number of axes (2 for a map).
    """
    if dims < 1:
        raise ShareValueError(f"dims must be >= 1, got {dims}")
    gram = similarity.matrix.to(torch.float64)
    t = gram.shape[0]
    coordinates = torch.zeros(t, dims, dtype=torch.float64)
    explained = torch.zeros(dims, dtype=torch.float64)
    if t == 0:
        return StyleMap(list(similarity.names), coordinates, explained)
    centring = torch.eye(t, dtype=torch.float64) - 1.0 / t
    centred = centring @ gram @ centring  # (t, t)
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (centred + centred.T))
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, eigenvectors = eigenvalues[order].clamp_min(0.0), eigenvectors[:, order]
    total = float(eigenvalues.sum())
    count = min(dims, t)
    axes = eigenvectors[:, :count] * eigenvalues[:count].sqrt()  # (t, count)
    pivot = axes.abs().argmax(dim=0)
    signs = torch.sign(axes[pivot, torch.arange(count)])
    signs[signs == 0] = 1.0
    coordinates[:, :count] = axes * signs
    if total > 0:
        explained[:count] = eigenvalues[:count] / total
    return StyleMap(list(similarity.names), coordinates, explained)


_INDEX = re.compile(r"\d+")


# Display names of the layer groups of FLUX.1's transformer (:func:`layer_group`), double-stream blocks first.
GROUP_LABELS = {"transformer_blocks": "double-stream blocks", "single_transformer_blocks": "single-stream blocks"}


def group_order(group: str) -> tuple[int, str]:
    """Sort key of layer groups for display: FLUX.1's double-stream blocks, its single-stream ones, then any
    other group by name."""
    labelled = list(GROUP_LABELS)
    return (labelled.index(group), "") if group in labelled else (len(labelled), group)


def layer_group(layer_name: str) -> str:
    """The group a layer belongs to: its name up to the first numeric index, else its first component.

    ``transformer_blocks.3.attn.to_q`` -> ``transformer_blocks`` and ``single_transformer_blocks.10.proj_out``
    -> ``single_transformer_blocks`` (FLUX.1's double- and single-stream blocks); ``encoder.layer.2.query``
    -> ``encoder.layer``; ``x_embedder`` -> ``x_embedder``; ``norm_out.linear`` -> ``norm_out``.
    """
    parts = layer_name.split(".")
    for position, part in enumerate(parts):
        if _INDEX.fullmatch(part):
            return ".".join(parts[:position]) if position else part
    return parts[0]


def kept_energy(
    factors: ShareFactors, styles: Sequence[str] | None = None, group: Callable[[str], str] = layer_group
) -> dict[str, dict[str, float]]:
    """Per style and per layer group, the share of the original LoRA's energy the bank reproduces.

    ``kept = 1 - sum_l err_l^2 ||dW_l||^2 / sum_l ||dW_l||^2`` over the group's layers, with ``err_l`` the
    stored relative error of the style on layer ``l`` (:meth:`ShareFactors.layer_errors`) and
    ``||dW_l||`` its source's norm there: one minus the squared relative error of the group, the ``R^2``
    of the reconstruction. Without centring the reconstruction is an orthogonal projection of the update
    (onto the bases, then the rank-``p`` cut of the core), so this is exactly
    ``||dW_hat||^2 / ||dW||^2``, the explained-variance view of the paper per style. Over all layers it is
    ``1 - style_error(name)^2``. Stored errors become upper bounds once later merges turn the bases
    (DESIGN 3), so the value is then a lower bound; it is clamped at 0. A fine-tuned style keeps 1 on the
    layers it was tuned on (it *is* what is stored).

    Args:
        styles: which styles (default: all).
        group: maps a layer name to its group (default :func:`layer_group`); ``lambda name: "all"`` gives one
            number per style.

    Returns:
        ``{style: {group: kept}}``, groups sorted by name; a group the style does not touch is left out.
    """
    names = _style_names(factors, styles)
    result: dict[str, dict[str, float]] = {}
    for name in names:
        index = factors.style_index(name)
        squared_error: dict[str, float] = {}
        energy: dict[str, float] = {}
        for layer_name, layer in factors.layers.items():
            norm = float(layer.norm[index])
            if norm <= 0:
                continue
            key = group(layer_name)
            squared_error[key] = squared_error.get(key, 0.0) + (float(layer.error[index]) * norm) ** 2
            energy[key] = energy.get(key, 0.0) + norm**2
        result[name] = {key: max(0.0, 1.0 - squared_error[key] / energy[key]) for key in sorted(energy)}
    return result


def style_drift(before, after) -> dict[str, float]:
    """How far each style held in both banks moved between them (e.g. around a merge), exactly.

    ``before``, ``after``: :class:`ShareFactors` or :class:`~.factors.FactorsSnapshot` of one model (anything
    with ``layers`` and ``style_names``). Per style, ``sqrt(sum_l ||R'_l - R_l||^2) / sqrt(sum_l ||R_l||^2)``,
    ``R_l = basis_out C_l basis_in.T`` its reconstruction on layer ``l`` before and ``R'_l`` after:
    ``||R' - R||^2 = ||R'||^2 + ||R||^2 - 2 <C', (B'_out.T B_out) C (B_in.T B'_in)>`` with ``||R||^2`` from the
    bases' Grams (:func:`_reconstruction_energy`), so only ``k x k`` products. This is what a merge does to the
    other styles' pictures; their stored errors after it are only upper bounds (DESIGN 3). A style with no
    update before gets 0.
    """
    names = [name for name in after.style_names if name in before.style_names]
    old_rows = torch.tensor([before.style_names.index(name) for name in names], dtype=torch.long)
    new_rows = torch.tensor([after.style_names.index(name) for name in names], dtype=torch.long)
    moved = torch.zeros(len(names), dtype=torch.float64)
    energy = torch.zeros(len(names), dtype=torch.float64)
    half_before, half_after = (
        getattr(bank, "storage_dtype", torch.float32) != torch.float32 for bank in (before, after)
    )
    for layer_name in sorted(set(before.layers) | set(after.layers)):
        old, new = before.layers.get(layer_name), after.layers.get(layer_name)
        old_cores = old.cores()[old_rows].to(torch.float64) if old is not None and old.k > 0 else None
        new_cores = new.cores()[new_rows].to(torch.float64) if new is not None and new.k > 0 else None
        old_energy = _reconstruction_energy(old, old_cores, half_before) if old_cores is not None else 0.0
        new_energy = _reconstruction_energy(new, new_cores, half_after) if new_cores is not None else 0.0
        moved += old_energy + new_energy
        energy += old_energy
        if old_cores is not None and new_cores is not None:
            # The n-sized products in the stored dtype, at least float32 (float32: ~0.1 s at FLUX.1 size, a tenth
            # of a merge); the round-off then puts a floor of ~5e-4 under the drift, below what is shown (0.1%).
            dtype = torch.promote_types(torch.promote_types(new.basis_out.dtype, old.basis_out.dtype), torch.float32)
            to_new_out = (new.basis_out.to(dtype).T @ old.basis_out.to(dtype)).to(torch.float64)  # (k', k)
            to_new_in = (old.basis_in.to(dtype).T @ new.basis_in.to(dtype)).to(torch.float64)  # (k, k')
            moved -= 2 * (new_cores * (to_new_out @ old_cores @ to_new_in)).sum(dim=(1, 2))
    return {
        name: math.sqrt(max(float(moved[i]), 0.0) / float(energy[i])) if float(energy[i]) > 0 else 0.0
        for i, name in enumerate(names)
    }


def _reconstruction_energy(layer, cores: torch.Tensor, from_half: bool) -> torch.Tensor:
    """``||basis_out C basis_in.T||^2`` of each ``(k, k)`` core, ``(t,)``: ``||C||^2`` for orthonormal bases.

    Bases read back from a bfloat16 / float16 checkpoint (``from_half``) are orthonormal only to their rounding
    (Grams off the identity by up to 8e-4), and the drift, a square root of a difference of such energies, then
    showed 1-2% for styles that had moved 0.05%: there ``<C, G_out C G_in>`` with the bases' Grams (two more
    n-sized products a layer, which float32 banks do not pay).
    """
    if not from_half:
        return (cores**2).sum(dim=(1, 2))
    dtype = torch.promote_types(layer.basis_out.dtype, torch.float32)
    gram_out = (layer.basis_out.to(dtype).T @ layer.basis_out.to(dtype)).to(torch.float64)
    gram_in = (layer.basis_in.to(dtype).T @ layer.basis_in.to(dtype)).to(torch.float64)
    return (cores * (gram_out @ cores @ gram_in)).sum(dim=(1, 2))


def near_duplicates(
    factors: ShareFactors,
    name: str,
    threshold: float = NEAR_DUPLICATE_THRESHOLD,
    layers: Iterable[str] | None = None,
) -> dict[str, float]:
    """The other styles whose similarity to ``name`` (:func:`style_similarity`) is at least ``threshold``.

    Costs one row of the similarity matrix. Returns ``{style: similarity}``, most similar first.
    """
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool) or not math.isfinite(threshold):
        raise ShareValueError(f"threshold must be a finite number, got {threshold!r}")
    index = factors.style_index(name)
    everyone = list(range(len(factors.styles)))
    inner, energy = _inner_products(factors, [index], everyone, layers)  # (1, t), (t,)
    cosines = _cosines(inner, energy[index : index + 1], energy)[0]  # (t,)
    found = {
        factors.styles[i].name: float(cosines[i]) for i in everyone if i != index and float(cosines[i]) >= threshold
    }
    return dict(sorted(found.items(), key=lambda item: -item[1]))


def near_duplicate_message(name: str, other: str, similarity: float, threshold: float) -> str:
    """What a warning says about a new style ``name`` that nearly duplicates the held style ``other``."""
    return (
        f"style {name!r} is a near-duplicate of {other!r}: the cosine similarity of their weight updates is "
        f"{similarity:.3f} (threshold {threshold:g}), so {name!r} is close to {other!r} at another strength"
    )


def warn_near_duplicates(
    factors: ShareFactors, name: str, threshold: float = NEAR_DUPLICATE_THRESHOLD, stacklevel: int = 2
) -> dict[str, float]:
    """Issue one :class:`NearDuplicateStyleWarning` per held style that ``name`` nearly duplicates.

    Called right after ``name`` was merged (the merge itself stands). Returns what
    :func:`near_duplicates` found.
    """
    found = near_duplicates(factors, name, threshold)
    for other, similarity in found.items():
        warnings.warn(
            f"{near_duplicate_message(name, other, similarity, threshold)}; if it is the same LoRA, delete one of "
            f"them (delete_style({name!r}))",
            NearDuplicateStyleWarning,
            stacklevel=stacklevel + 1,
        )
    return found


# ----------------------------------------------------------------------------------------------


def _style_names(factors: ShareFactors, styles: Sequence[str] | None) -> list[str]:
    if styles is None:
        return factors.style_names
    if isinstance(styles, str):
        raise StyleError(f"styles must be a list of style names, not the string {styles!r}")
    names = list(styles)
    for name in names:
        factors.style_index(name)  # an unknown name raises, listing the styles held
    repeated = next((name for position, name in enumerate(names) if name in names[:position]), None)
    if repeated is not None:
        raise StyleError(f"style {repeated!r} is listed twice")
    return names


def _layers(factors: ShareFactors, layers: Iterable[str] | None) -> list[LayerShare]:
    if layers is None:
        return list(factors.layers.values())
    if isinstance(layers, str):
        raise ShareValueError(f"layers must be a list of layer names, not the string {layers!r}")
    chosen = []
    for layer_name in layers:
        if layer_name not in factors.layers:
            raise ShareValueError(f"the factors hold no layer {layer_name!r}")
        chosen.append(factors.layers[layer_name])
    return chosen


# Largest stacked core tensor formed at once, in numbers (float64: 32 MiB). Layers sharing (k, p) are stacked
# so that a bank costs a few batched products, not ~10 small operations per layer (each of which paid for
# OpenMP's thread wake-ups on a loaded machine). Measured single-threaded on a 2-core CPU, 266 layers of
# k = 32, p = 8: 20 styles 0.04 s for the matrix, 0.03 s for one row (the check after a merge); 500 styles
# 3.8 s and 0.65 s (the t^2 k^2 products of the matrix dominate).
_CHUNK_NUMBERS = 2**22


def _dense_cores(layers: Sequence[LayerShare], indices: torch.Tensor) -> torch.Tensor:
    """Dense cores of the styles ``indices`` on ``layers`` (same ``k`` and ``p``), as the model applies them.

    The batched form of :meth:`~.subspace.LayerShare.cores`: ``core_out[i] @ core_in[i].T``, plus the layer's
    anchor where the style is present. Returns ``(L, s, k^2)`` float64.
    """
    core_out = torch.stack([layer.core_out[indices] for layer in layers]).to(torch.float64)  # (L, s, k, p)
    core_in = torch.stack([layer.core_in[indices] for layer in layers]).to(torch.float64)  # (L, s, k, p)
    cores = core_out @ core_in.transpose(-1, -2)  # (L, s, k, k)
    if layers[0].anchor is not None:
        anchors = torch.stack([layer.anchor for layer in layers]).to(torch.float64)  # (L, k, k)
        present = torch.stack([layer.present[indices] for layer in layers]).to(torch.float64)  # (L, s)
        cores = cores + present[:, :, None, None] * anchors[:, None]
    return cores.reshape(len(layers), len(indices), -1)


def _inner_products(
    factors: ShareFactors, rows: Sequence[int], columns: Sequence[int], layers: Iterable[str] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_l <C_il, C_jl>_F`` for ``i`` in ``rows`` and ``j`` in ``columns`` (``rows`` among ``columns``).

    Returns the ``(len(rows), len(columns))`` inner products and the columns' ``sum_l ||C_jl||_F^2``
    (``(len(columns),)``), float64; each layer's cores are formed once.
    """
    position = {index: p for p, index in enumerate(columns)}
    row_at = torch.tensor([position[i] for i in rows], dtype=torch.long)
    column_indices = torch.tensor(list(columns), dtype=torch.long)
    inner = torch.zeros(len(rows), len(columns), dtype=torch.float64)
    energy = torch.zeros(len(columns), dtype=torch.float64)
    if not columns:  # no style held: nothing to form (a (L, 0, k^2) stack cannot be reshaped)
        return inner, energy
    groups: dict[tuple[int, int, bool], list[LayerShare]] = {}
    for layer in _layers(factors, layers):
        if layer.k > 0:  # k = 0: no style touches the layer yet
            groups.setdefault((layer.k, layer.pseudo_rank, layer.anchor is not None), []).append(layer)
    for (k, _, _), group in groups.items():
        size = max(1, _CHUNK_NUMBERS // max(1, len(columns) * k * k))
        for start in range(0, len(group), size):
            cores = _dense_cores(group[start : start + size], column_indices)  # (L, c, k^2)
            inner += (cores[:, row_at] @ cores.transpose(1, 2)).sum(dim=0)
            energy += (cores**2).sum(dim=(0, 2))
    return inner, energy


def _cosines(inner: torch.Tensor, row_energy: torch.Tensor, column_energy: torch.Tensor) -> torch.Tensor:
    """``inner[i, j] / sqrt(row_energy[i] column_energy[j])``, 0 where either energy is 0, clamped to ``[-1, 1]``."""
    scale = (row_energy.clamp_min(0.0)[:, None] * column_energy.clamp_min(0.0)[None, :]).sqrt()
    cosines = torch.where(scale > 0, inner / torch.where(scale > 0, scale, torch.ones_like(scale)), 0.0)
    return cosines.clamp(-1.0, 1.0)
