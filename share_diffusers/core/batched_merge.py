"""Merging one LoRA into many layers of one class at once: :func:`~.subspace.merge_layer`'s maths, batched.

A model's target layers fall into a few classes of equal shape and state (FLUX.1's 266 attention linears
are one; :func:`merge_class_key`). :func:`merge_layers` merges a class with one batched call per step
instead of one call per layer, which is what makes a merge at FLUX.1 scale fast on a CPU; it gives what
:func:`~.subspace.merge_layer` gives layer by layer, to float64 rounding (``tests/test_merge_batched.py``).
Read :func:`~.subspace.merge_layer` first: the steps and names here are its.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapters import FIT_DTYPE, CanonicalLora, all_finite
from .errors import FactorValueError, ShapeMismatchError
from .subspace import (
    LayerShare,
    PrincipalDecomposition,
    RankRule,
    _core,
    _decompose_stack,
    _finish,
    _merged_energy,
    _squared_norms,
)

# A merge turns the held styles' cores in groups of layers of at most this many bytes (float64), to stay in cache:
# see _turn_held_cores.
TURN_GROUP_BYTES = 2**20


def merge_class_key(layer: LayerShare, rank: int) -> tuple:
    """Layers with equal keys can be merged together by :func:`merge_layers` (given entries of rank ``rank``)."""
    return (
        layer.shape,
        layer.k,
        layer.num_styles,
        layer.pseudo_rank,
        layer.anchor is not None,
        layer.normalize,
        layer.basis_out.dtype,
        layer.core_out.dtype,
        layer.norm.device,
        rank,
    )


def merge_layers(
    layers: Sequence[LayerShare], entries: Sequence[CanonicalLora], rule: RankRule, dtype: torch.dtype = FIT_DTYPE
) -> list[LayerShare]:
    """:func:`~.subspace.merge_layer` of ``L`` layers of one class at once, every step one batched call for all of them.

    The maths is :func:`~.subspace.merge_layer`'s, step for step, on tensors with a leading ``(L, ...)`` dimension: one
    QR of the ``(L, n, k + r)`` stacks, one batched eigenproblem, batched products. A model's target layers
    fall into a few classes (FLUX.1's 266 attention linears are one), so a merge makes a few hundred torch
    calls per chunk of layers instead of a few hundred per layer (FLUX.1, 266 layers: 15k calls instead of
    67k). Each call holds the GIL while Python dispatches it, so fewer calls leave the threads of
    :func:`~.factors.map_layers` more of their time in kernels. The arithmetic stays the same: at FLUX.1
    width two Householder QRs of ``n x 48`` are half of it, and one thread did the merge in ~10% less CPU
    time (2-core EPYC); at small widths, where dispatch is all there is, 5-6x less.

    Args:
        layers: one class (equal :func:`merge_class_key`): same shape, ``k``, styles held, pseudo-rank,
            options and dtypes.
        entries: each layer's new update, all of one rank and all non-zero (a layer the style does not
            touch goes through :func:`~.subspace.append_absent_style`).
        rule: how many basis vectors each layer keeps; under a variance rule layers whose ``k`` comes out
            different are finished in separate batches.
        dtype: of the result, converted once for all layers: float64 as :func:`~.subspace.merge_layer`, or
            ``STORE_DTYPE`` for what :func:`~.subspace.to_storage` gives. Each layer's tensors own their storage
            (contiguous, row-major), so they can be saved and freed one by one.

    Raises:
        FactorValueError: a result is not finite in ``dtype`` (the caller names the layer by merging the
            class one layer at a time).
    """
    if len(layers) != len(entries) or not layers:
        raise ValueError(f"merge_layers needs one entry per layer, got {len(layers)} layers and {len(entries)} entries")
    first = layers[0]
    rank = entries[0].S.numel()
    key = merge_class_key(first, rank)
    for layer, entry in zip(layers, entries, strict=True):
        if merge_class_key(layer, entry.S.numel()) != key:
            raise ValueError("merge_layers needs layers of one class (see merge_class_key) and entries of one rank")
        if entry.U.shape[0] != layer.shape[0] or entry.V.shape[0] != layer.shape[1]:
            shape = (entry.U.shape[0], entry.V.shape[0])
            raise ShapeMismatchError(f"an update of shape {shape} for a layer of shape {layer.shape}")
    orthonormalize = first.basis_out.dtype != FIT_DTYPE
    normalize = first.normalize
    n_out, d_in = first.shape
    k_old, p = first.k, first.pseudo_rank

    def stacked(name: str) -> torch.Tensor:
        return torch.stack([getattr(layer, name) for layer in layers]).to(FIT_DTYPE)

    gram_out_old, gram_in_old = stacked("gram_out"), stacked("gram_in")  # (L, k_old, k_old)
    norm_old, error_old, truncated_old = stacked("norm"), stacked("error"), stacked("truncated")  # (L, t)
    anchor_old = stacked("anchor") if first.anchor is not None else None  # (L, k_old, k_old)
    s = torch.stack([entry.S for entry in entries])  # (L, r)
    norm_new = (s**2).sum(-1).sqrt()  # (L,)
    weight = 1.0 / norm_new if normalize else torch.ones_like(norm_new)

    decompositions = []
    for side, old_gram, size in (("out", gram_out_old, n_out), ("in", gram_in_old, d_in)):
        # [old_basis, span] of every layer, as the (L, k + r, n) transpose that .mT views column-major: one
        # copy from the per-layer tensors, the stored float32 basis promoted exactly (as _convert would).
        parts = [
            part.mT
            for layer, entry in zip(layers, entries, strict=True)
            for part in ((layer.basis_out, entry.U) if side == "out" else (layer.basis_in, entry.V))
        ]
        stack = torch.cat(parts, dim=0).view(len(layers), k_old + rank, size).mT  # (L, n, k_old + r)
        inner = torch.zeros(len(layers), k_old + rank, k_old + rank, dtype=FIT_DTYPE, device=s.device)
        inner[:, :k_old, :k_old] = old_gram
        inner[:, k_old:, k_old:] = torch.diag_embed((weight[:, None] * s) ** 2)  # block_diag(gram, (w S)^2)
        decompositions.append(_decompose_stack(stack, inner, k_old if orthonormalize else None))

    cap = min(k_old + rank, n_out, d_in)
    if rule.rank is not None:  # a fixed k looks at the spectrum only for its numerical rank
        ranks = [rule.choose(eigenvalues, cap=cap) for eigenvalues in decompositions[0].eigenvalues]
    else:
        totals = _merged_energy(norm_old, normalize, truncated_old, norm_new, weight).tolist()
        ranks = [
            rule.choose(eigenvalues, cap=cap, total=total)
            for eigenvalues, total in zip(decompositions[0].eigenvalues, totals, strict=True)
        ]
    results: list[LayerShare | None] = [None] * len(layers)
    for k_new in sorted(set(ranks)):
        if len(set(ranks)) == 1:
            index, pick = list(range(len(layers))), (lambda tensor: tensor)
        else:  # layers whose k came out differently, in separate batches
            index = [i for i, k in enumerate(ranks) if k == k_new]
            rows = torch.tensor(index, device=s.device)

            def pick(tensor: torch.Tensor, rows: torch.Tensor = rows) -> torch.Tensor:
                return tensor.index_select(0, rows)

        merged = _merge_stacked(
            [PrincipalDecomposition(*(pick(part) for part in decomposition)) for decomposition in decompositions],
            k_new,
            k_old,
            [layers[i].core_out for i in index],
            [layers[i].core_in for i in index],
            pick(gram_out_old),
            pick(gram_in_old),
            pick(norm_old),
            pick(error_old),
            pick(truncated_old),
            pick(anchor_old) if anchor_old is not None else None,
            pick(s),
            pick(norm_new),
            pick(weight),
            p,
            normalize,
            dtype,
        )
        for i, layer in zip(index, merged, strict=True):
            results[i] = layer
    return results  # type: ignore[return-value]


def _merge_stacked(
    decompositions: list[PrincipalDecomposition],
    k_new: int,
    k_old: int,
    core_out_old: Sequence[torch.Tensor],
    core_in_old: Sequence[torch.Tensor],
    gram_out_old: torch.Tensor,
    gram_in_old: torch.Tensor,
    norm_old: torch.Tensor,
    error_old: torch.Tensor,
    truncated_old: torch.Tensor,
    anchor_old: torch.Tensor | None,
    s: torch.Tensor,
    norm_new: torch.Tensor,
    weight: torch.Tensor,
    p: int,
    normalize: bool,
    dtype: torch.dtype,
) -> list[LayerShare]:
    """The part of :func:`merge_layers` after the decompositions, for layers that keep the same ``k_new``.

    Line for line :func:`~.subspace.merge_layer`'s, with ``(L, ...)`` tensors, except the held cores: each layer's
    ``(t, k_old, p)`` cores as stored, turned in groups of layers that fit in cache (:func:`_turn_held_cores`).
    Returns the merged layers in ``dtype``.
    """
    bases, projections = [], []
    for decomposition in decompositions:
        basis, coordinates = decomposition.basis(k_new)  # (L, n, k_new), (L, m, k_new)
        bases.append(basis)
        projections.append(coordinates.mT @ decomposition.r)  # (L, k_new, k_old + r)
    basis_out, basis_in = bases
    # (L, k_new, k_old), (L, k_new, r)
    rotate_out, projected_out = projections[0][..., :k_old], projections[0][..., k_old:]
    rotate_in, projected_in = projections[1][..., :k_old], projections[1][..., k_old:]
    turned_anchor = rotate_out @ anchor_old @ rotate_in.mT if anchor_old is not None else None  # (L, k_new, k_new)
    present = norm_old > 0  # (L, t)

    # The new style: exact core, then rank p (about the anchor when centred).
    core_new = _core(projected_out, s, projected_in)  # (L, k_new, k_new)
    anchor = turned_anchor
    if anchor is not None:  # the first style on a centred layer anchors it
        anchor = torch.where(present.any(-1)[:, None, None], anchor, core_new)
    finished = _finish(core_new.unsqueeze(1), norm_new.unsqueeze(1), basis_out, basis_in, p, anchor, normalize)

    # Earlier styles: their reconstructions projected onto the new bases (see merge_layer).
    core_out, core_in, before, after = _turn_held_cores(
        core_out_old, core_in_old, rotate_out, rotate_in, anchor_old, turned_anchor, present, finished, dtype
    )
    drift = (before - after).clamp_min(0.0).sqrt()
    safe_norm = torch.where(present, norm_old, torch.ones_like(norm_old))
    bound = torch.minimum(error_old + drift / safe_norm, 1.0 + after.clamp_min(0.0).sqrt() / safe_norm)
    error = torch.where(present, bound, error_old)

    stacked = {
        "basis_out": basis_out,
        "basis_in": basis_in,
        "gram_out": rotate_out @ gram_out_old @ rotate_out.mT + finished.gram_out,
        "gram_in": rotate_in @ gram_in_old @ rotate_in.mT + finished.gram_in,
        "norm": torch.cat([norm_old, norm_new.unsqueeze(1)], dim=1),
        "error": torch.cat([error, finished.error], dim=1),
        "truncated": torch.cat([truncated_old, finished.truncated], dim=1),
        "anchor": anchor,
    }
    return _unstack(stacked, dtype, {"core_out": core_out, "core_in": core_in}, normalize)


def _turn_held_cores(
    core_out_old: Sequence[torch.Tensor],
    core_in_old: Sequence[torch.Tensor],
    rotate_out: torch.Tensor,
    rotate_in: torch.Tensor,
    anchor_old: torch.Tensor | None,
    turned_anchor: torch.Tensor | None,
    present: torch.Tensor,
    finished: LayerShare,
    dtype: torch.dtype,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Each layer's held cores turned into its new bases, stored with the new style's after them.

    ``core_*_old``: per layer ``(t, k_old, p)``, as stored; ``rotate_*``: ``(L, k_new, k_old)``; ``finished``:
    the new style's stacked state (``core_*``: ``(L, 1, k_new, p)``). Returns per layer the ``(t + 1, k_new, p)``
    cores in ``dtype``, row-major, and the held styles' squared reconstruction norms before and after, ``(L, t)``
    each (:func:`_squared_norms`, in float64).

    In float64, in the transposed ``(t, p, k)`` layout: one ``(t p, k_old) @ (k_old, k_new)`` product per layer
    turns every style and the Gram products of ``_squared_norms`` need no copies (broadcasting ``rotate`` over
    ``(t, k, p)`` cores copied it once per style). Layers go in groups of at most ``TURN_GROUP_BYTES`` of
    float64 cores, so that a group's steps stay in cache: with 500 styles held a layer alone is 1 MB, and
    the same steps on a merge chunk's stack of 7 layers went to memory and back five times; with few styles
    all layers go together. (FLUX.1's 266 layers on 2 cores, what 490 more styles held add to a merge: 0.87 s
    with broadcasting on stacks, 0.29 s so; benchmarks/bench_core.py.)
    """
    count, styles, k_old, p = len(core_out_old), *core_out_old[0].shape
    group = max(1, TURN_GROUP_BYTES // max(1, styles * k_old * p * 8))
    before, after, stored_out, stored_in = [], [], [], []
    for start in range(0, count, group):
        rows = slice(start, start + group)
        held_out_t = _stack_transposed(core_out_old[rows])  # (G, t, p, k_old)
        held_in_t = _stack_transposed(core_in_old[rows])
        turned_out_t = (held_out_t.flatten(1, 2) @ rotate_out[rows].mT).unflatten(1, (styles, p))  # (G, t, p, k_new)
        turned_in_t = (held_in_t.flatten(1, 2) @ rotate_in[rows].mT).unflatten(1, (styles, p))
        anchors = (None, None) if anchor_old is None else (anchor_old[rows], turned_anchor[rows])
        before.append(_squared_norms(held_out_t.mT, held_in_t.mT, anchors[0], present[rows]))
        after.append(_squared_norms(turned_out_t.mT, turned_in_t.mT, anchors[1], present[rows]))
        for turned_t, new, stored, name in (
            (turned_out_t, finished.core_out[rows], stored_out, "core_out"),
            (turned_in_t, finished.core_in[rows], stored_in, "core_in"),
        ):
            cores = torch.cat([turned_t.mT, new], dim=1).to(dtype)  # (G, t + 1, k_new, p), strided
            _check_finite(cores, name, dtype)
            stored.extend(part.clone(memory_format=torch.contiguous_format) for part in cores.unbind(0))
    return stored_out, stored_in, torch.cat(before), torch.cat(after)


def _stack_transposed(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``G`` layers' ``(t, k, p)`` cores as one ``(G, t, p, k)`` float64 tensor, converted and transposed at once."""
    stack = torch.empty(len(cores), *cores[0].mT.shape, dtype=FIT_DTYPE, device=cores[0].device)
    for row, core in zip(stack, cores, strict=True):
        row.copy_(core.mT)
    return stack


def _check_finite(tensor: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if not all_finite(tensor):
        raise FactorValueError(f"the merge gives {name} values beyond {str(dtype).removeprefix('torch.')}'s range")


def _unstack(
    stacked: dict[str, torch.Tensor | None],
    dtype: torch.dtype,
    per_layer: dict[str, list[torch.Tensor]],
    normalize: bool,
) -> list[LayerShare]:
    """Per-layer ``LayerShare`` of stacked ``(L, ...)`` tensors (by ``LAYER_TENSORS`` name, None for no anchor)
    and ``per_layer`` ones already stored as they will be kept, in ``dtype``, each tensor contiguous in storage
    of its own.

    Converted once for the stack; then one copy per tensor and layer: views into one block would share
    storage (safetensors refuses to save such tensors, and one layer would keep all of them alive).
    """
    converted = dict(per_layer)
    for name, tensor in stacked.items():
        if tensor is None:
            continue
        # Cast first, then lay out row-major while copying each layer out (see subspace._convert for why).
        tensor = tensor.to(dtype)
        _check_finite(tensor, name, dtype)
        converted[name] = [part.clone(memory_format=torch.contiguous_format) for part in tensor.unbind(0)]
    count = len(next(iter(converted.values())))
    return [
        LayerShare(**{name: parts[i] for name, parts in converted.items()}, normalize=normalize) for i in range(count)
    ]
