"""The Share subspace of one layer: fitting from adapters, continual merging, deleting a style.

Paper symbols (DESIGN.md section 1) and their names here:

=================  ==============  ===========================================
paper              code            shape
=================  ==============  ===========================================
beta               ``basis_out``   ``(n_out, k)``, orthonormal columns
alpha              ``basis_in``    ``(d_in, k)``, orthonormal columns
eps_beta[i]        ``core_out[i]``  ``(k, p)``
eps_alpha[i]       ``core_in[i]``   ``(k, p)``
C_i                style core       ``core_out[i] @ core_in[i].T`` (``k x k``)
=================  ==============  ===========================================

``dW_i ~= basis_out @ (anchor + core_out[i] @ core_in[i].T) @ basis_in.T`` where ``anchor`` is the
mean core kept by ``center=True`` (zero otherwise).

Device and dtype: layers are stored in float32 on the CPU (:func:`to_storage`, the checkpoint form, which
brings results back from wherever they were computed) and computed in float64 (:func:`to_fit`); the
canonical forms handed in are float64, made so once per LoRA layer by :meth:`~.adapters.LoraLayer.canonical`
from factors on any device and in any dtype, on the CPU unless a merge asks for another device. Apart
from :func:`to_storage`, the functions here never choose a device: every tensor they create takes the
device (and dtype) of their inputs (:func:`on_device` copies a stored layer to where a merge runs).
Nothing here depends on diffusers or a model. :mod:`.batched_merge` runs :func:`merge_layer` on many layers
of one class at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .adapters import FIT_DEVICE, FIT_DTYPE, CanonicalLora
from .errors import FactorValueError, ShapeMismatchError

STORE_DTYPE = torch.float32


NUMERICAL_RANK_TOLERANCE = 1e-15  # of the largest eigenvalue: an exactly low-rank stack measured 1e-16 (40 x 32) to
# 1e-32 (3072 x 3072); a real direction a style trained with clipped gradients added held 1e-14 to 1e-13


@dataclass(frozen=True)
class RankRule:
    """How many basis vectors ``k`` a layer keeps.

    Args:
        rank: a fixed ``k`` (capped by what the adapters span, numerically: directions holding less than
            ``NUMERICAL_RANK_TOLERANCE`` of the largest one's energy do not count, and by the layer's size).
        variance: instead of ``rank``, the smallest ``k`` whose explained variance (share of the
            adapters' energy captured by the projection) reaches this fraction, per layer.
        max_rank: upper bound on ``k`` when ``variance`` is used.
    """

    rank: int | None = 32
    variance: float | None = None
    max_rank: int = 64

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.variance is None):
            raise ValueError("give exactly one of rank (k) and variance (explained-variance fraction)")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank k must be >= 1, got {self.rank}")
        if self.variance is not None and not 0.0 < self.variance <= 1.0:
            raise ValueError(f"variance must be a fraction in (0, 1], got {self.variance}")

    def choose(self, eigenvalues: torch.Tensor, cap: int, total: float | None = None) -> int:
        """``k`` for a layer whose stacked energy spectrum (descending) is ``eigenvalues``.

        ``total`` is the energy the fraction is taken of when the spectrum does not hold all of it: a merge's
        spectrum holds only what earlier merges kept, so measuring against its own sum would let every merge
        drop another ``1 - variance`` of the styles' energy and ``k`` shrink (see :func:`_merged_energy`).
        """
        # Directions whose energy is round-off (the same LoRA merged twice, an exported style merged back) would
        # cost k (n + d) stored numbers and forward work each while holding nothing.
        if eigenvalues.numel() and float(eigenvalues[0]) > 0.0:
            cap = min(cap, int((eigenvalues > float(eigenvalues[0]) * NUMERICAL_RANK_TOLERANCE).sum()))
        if self.rank is not None:
            return max(1, min(self.rank, cap))
        total = float(eigenvalues.sum()) if total is None else max(float(total), float(eigenvalues.sum()))
        if total <= 0.0:
            return 1
        cumulative = torch.cumsum(eigenvalues, 0) / total
        # A small slack so that variance=1.0 does not chase round-off in an exactly low-rank stack.
        k = int((cumulative < self.variance - 1e-12).sum()) + 1
        return max(1, min(k, self.max_rank, cap))


@dataclass
class LayerShare:
    """Share state of one layer (see the module docstring for the symbols).

    Attributes:
        basis_out: ``(n_out, k)``.
        basis_in: ``(d_in, k)``.
        core_out: ``(t, k, p)``, one slice per style held.
        core_in: ``(t, k, p)``.
        gram_out: ``(k, k)``, running ``sum_i w_i^2 C_i C_i.T`` of the cores as stored (rank p, plus the
            anchor): the summary that lets a new adapter be merged without the old ones (DESIGN 3). What
            the rank-p cut dropped is not in it, so no later basis spends a direction on energy no style
            keeps. Exact after a fit; a merge that truncates turns it with the bases (``R G R.T``), which
            matches the re-projected cores only where the other side's change of basis is an isometry.
            (Checkpoints of format 1 summed the full cores; they load as they are, with ``truncated`` 0.)
        gram_in: ``(k, k)``, running ``sum_i w_i^2 C_i.T C_i``.
        norm: ``(t,)``, ``||dW_i||_F`` of each style's source on this layer; 0 means the style does
            not touch the layer (its core is zero and it gets no anchor).
        error: ``(t,)``, relative Frobenius error ``||dW_i - dW_i_hat|| / ||dW_i||``; exact when the style
            was merged, an upper bound (triangle inequality) after later merges moved the bases.
        truncated: ``(t,)``, ``w_i^2 (||C_i||^2 - ||C_i_hat||^2)``: the weighted energy of each style's projected
            core that its rank-p cut dropped when it was added (0 for a fine-tuned style, stored exactly; with an
            anchor it may be slightly negative: the cut is of the deviation, not of the core). What the
            summaries lack against the full cores: ``explained_variance`` adds it back, the variance rule takes
            it out of the total it measures against (no basis can hold it any more).
        anchor: ``(k, k)``, the mean core added to every style present here (``center=True``), or None.
        normalize: whether each adapter is weighted to unit energy (``w_i = 1 / norm_i``) in the Gram.
    """

    basis_out: torch.Tensor
    basis_in: torch.Tensor
    core_out: torch.Tensor
    core_in: torch.Tensor
    gram_out: torch.Tensor
    gram_in: torch.Tensor
    norm: torch.Tensor
    error: torch.Tensor
    truncated: torch.Tensor
    anchor: torch.Tensor | None = None
    normalize: bool = False

    @property
    def k(self) -> int:
        return self.basis_out.shape[1]

    @property
    def pseudo_rank(self) -> int:
        return self.core_out.shape[2]

    @property
    def num_styles(self) -> int:
        return self.core_out.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_out, d_in)`` of the layer's weight."""
        return self.basis_out.shape[0], self.basis_in.shape[0]

    @property
    def present(self) -> torch.Tensor:
        """``(t,)`` bool: which styles touch this layer."""
        return self.norm > 0

    def cores(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Dense style cores ``C_i`` (``(t, k, k)``), or their blend ``sum_i weights[i] C_i`` (``(k, k)``)."""
        cores = self.core_out @ self.core_in.transpose(1, 2)  # (t, k, k)
        if self.anchor is not None:
            cores = cores + self.present[:, None, None].to(cores.dtype) * self.anchor
        if weights is None:
            return cores
        return torch.einsum("t,tij->ij", weights.to(dtype=cores.dtype, device=cores.device), cores)

    def delta_weight(self, weights: torch.Tensor) -> torch.Tensor:
        """Dense ``dW`` of a blend, ``(n_out, d_in)``; ``weights: (t,)``. For tests, fusing and export."""
        core = self.cores(weights)
        return self.basis_out @ core @ self.basis_in.T

    def storage_numbers(self) -> int:
        """Numbers this layer stores: bases, cores, Gram summaries, per-style norm/error/truncated, anchor."""
        k, t = self.k, self.num_styles
        n, d = self.shape
        return (
            k * (n + d) + 2 * t * k * self.pseudo_rank + 2 * k * k + 3 * t + (k * k if self.anchor is not None else 0)
        )

    def select(self, keep: torch.Tensor) -> LayerShare:
        """A copy holding only the styles at indices ``keep`` (bases and summaries unchanged)."""
        return LayerShare(
            basis_out=self.basis_out,
            basis_in=self.basis_in,
            core_out=self.core_out[keep],
            core_in=self.core_in[keep],
            gram_out=self.gram_out,
            gram_in=self.gram_in,
            norm=self.norm[keep],
            error=self.error[keep],
            truncated=self.truncated[keep],
            anchor=self.anchor,
            normalize=self.normalize,
        )


LAYER_TENSORS = (  # every tensor field of a LayerShare (anchor may be None)
    "basis_out",
    "basis_in",
    "core_out",
    "core_in",
    "gram_out",
    "gram_in",
    "norm",
    "error",
    "truncated",
    "anchor",
)


# ----------------------------------------------------------------------------------------------
# Linear algebra shared by fitting and merging


class PrincipalDecomposition(NamedTuple):
    """``Y @ inner @ Y.T = q @ E @ diag(eigenvalues) @ E.T @ q.T`` for a stack ``Y = q @ r`` of shape ``(n, R)``.

    ``q`` is kept as LAPACK's Householder reflectors (``torch.geqrf``) and never formed: only the few
    directions kept are, by applying the reflectors to their coordinates (``torch.ormqr``). At FLUX.1
    width that halves the time of a merge's decomposition (forming ``q`` costs as much as the QR itself).

    Attributes:
        reflectors: ``(n, m)``, the Householder vectors of ``q`` below the diagonal (``m = min(n, R)``).
        tau: ``(m,)``, their scalar factors.
        r: ``(m, R)``, ``Y``'s coordinates in ``q``: ``Y = q @ r``.
        eigenvectors: ``E``, ``(m, m)``, columns sorted by decreasing eigenvalue.
        eigenvalues: ``(m,)``, descending, clamped at 0.
    """

    reflectors: torch.Tensor
    tau: torch.Tensor
    r: torch.Tensor
    eigenvectors: torch.Tensor
    eigenvalues: torch.Tensor

    def basis(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top ``count`` principal directions and their coordinates in ``q``.

        Only the kept columns are formed: at FLUX.1 width a fit stacks ``R = t r`` columns (hundreds)
        and keeps ``k = 32``, so this is ``O(n m k)`` instead of ``O(n m^2)``.

        Returns:
            ``(directions, coordinates)``: ``(n, count)`` orthonormal columns with fixed signs, and the
            ``(m, count)`` matrix with ``directions = q @ coordinates``. So any span of the stack projects
            onto the directions in ``O(m k R)``, with no ``n``-sized product:
            ``directions.T @ Y = coordinates.T @ r``.
        """
        coordinates = self.eigenvectors[..., :count]  # (m, count), fewer columns if count > m
        n, m = self.reflectors.shape[-2:]
        padded = coordinates.new_zeros(*coordinates.shape[:-2], n, coordinates.shape[-1])
        padded[..., :m, :] = coordinates
        directions, signs = _fix_signs(torch.ormqr(self.reflectors, self.tau, padded))  # q @ coordinates: (n, count)
        return directions, coordinates * signs.unsqueeze(-2)

    def directions(self, count: int) -> torch.Tensor:
        """The top ``count`` principal directions, ``(n, count)`` with fixed signs."""
        return self.basis(count)[0]


def principal_decomposition(
    spans: list[torch.Tensor], inner: torch.Tensor, orthonormalize_first: bool = False
) -> PrincipalDecomposition:
    """Eigen-decomposition of ``Y @ inner @ Y.T`` where ``Y = [spans...]``, without forming the ``n x n`` matrix.

    Fitting and merging both reduce to this: ``Y`` holds the directions (``U_i`` of each adapter, or
    the current basis), ``inner`` their energies. QR of ``Y`` costs ``O(n R^2)`` with ``R`` the total
    width, and the eigenproblem is only ``R x R``. Every tensor may carry leading batch dimensions
    (``(L, n, r_j)`` spans, ``(L, R, R)`` inner): then ``L`` problems are solved by one call each of
    the QR and the eigensolver, as :func:`~.batched_merge.merge_layers` does.

    Args:
        spans: tensors ``(n, r_j)``; their concatenation ``Y`` is ``(n, R)``.
        inner: ``(R, R)`` symmetric positive semi-definite.
        orthonormalize_first: ``spans[0]`` is a nearly orthonormal basis (held in float32): decompose
            the stack with it re-orthonormalised as :func:`to_fit` does, i.e. ``Y = q @ r`` holds that
            orthonormal basis (``q @ r[:, :k]``) in place of ``spans[0]``. The leading columns of a QR are
            a QR of ``spans[0]`` alone, so this costs no QR of its own.
    """
    # Stacked as Y.T (R, n) then viewed as (n, R) column-major, the layout LAPACK's QR works in: this
    # saves a transposing copy of the whole stack inside linalg.qr.
    # (A float32 basis among float64 spans is promoted by the concatenation itself: exact.)
    stack = torch.cat([span.mT for span in spans], dim=-2).mT  # (n, R)
    return _decompose_stack(stack, inner, spans[0].shape[-1] if orthonormalize_first else None)


def _decompose_stack(
    stack: torch.Tensor, inner: torch.Tensor, orthonormalize_first: int | None
) -> PrincipalDecomposition:
    """:func:`principal_decomposition` of the concatenated ``(n, R)`` stack (column-major is fastest); with
    ``orthonormalize_first = k``, the stack's first ``k`` columns are a basis to re-orthonormalise."""
    packed, tau = torch.geqrf(stack)  # q's reflectors below the diagonal of (n, R), r on and above it
    m = tau.shape[-1]
    r = packed[..., :m, :].triu()  # (m, R)
    if orthonormalize_first is not None:
        # Y[:, :k] = q[:, :k] @ r[:k, :k]; _orthonormalize(Y[:, :k]) = q[:, :k] * signs(diag r[:k, :k]). With
        # that basis in place of Y[:, :k], the stack's QR keeps q and gets diag(signs) as its top-left block.
        k = orthonormalize_first
        signs = torch.sign(torch.diagonal(r[..., :k, :k], dim1=-2, dim2=-1))
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        r[..., :k, :k] = torch.diag_embed(signs)
    small = r @ inner @ r.mT  # (m, m)
    small = 0.5 * (small + small.mT)
    eigenvalues, eigenvectors = torch.linalg.eigh(small)
    # Stable, so that equal eigenvalues keep one order whether layers are decomposed alone or in a batch.
    order = torch.argsort(eigenvalues, dim=-1, descending=True, stable=True)
    eigenvectors = torch.take_along_dim(eigenvectors, order.unsqueeze(-2), dim=-1)
    eigenvalues = torch.take_along_dim(eigenvalues, order, dim=-1)
    return PrincipalDecomposition(packed[..., :m], tau, r, eigenvectors, eigenvalues.clamp_min(0.0))


def principal_directions(spans: list[torch.Tensor], inner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All principal directions of ``Y @ inner @ Y.T`` (see :func:`principal_decomposition`).

    Returns:
        ``(directions, eigenvalues)``: ``(n, m)`` orthonormal columns sorted by decreasing eigenvalue,
        and the ``(m,)`` eigenvalues (clamped at 0), ``m = min(n, R)``.
    """
    decomposition = principal_decomposition(spans, inner)
    return decomposition.directions(decomposition.eigenvalues.numel()), decomposition.eigenvalues


def _fix_signs(basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip columns so each one's largest-magnitude entry is positive: a deterministic basis.

    Returns the flipped ``(n, k)`` basis and the ``(k,)`` signs applied (leading batch dimensions allowed).
    """
    pivot = basis.abs().argmax(dim=-2, keepdim=True)  # (1, k): the first largest entry of each column
    signs = torch.sign(torch.take_along_dim(basis, pivot, dim=-2)).squeeze(-2)  # (k,)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return basis * signs.unsqueeze(-2), signs


def split_core(core: torch.Tensor, pseudo_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-p factors of ``(t, k, k)`` cores: ``core ~= out @ in.T`` with ``out, in: (t, k, p)``.

    The truncated SVD gives the best rank-p approximation; ``sqrt`` of the singular values goes to
    each side so neither factor dominates (DESIGN 2.3). Leading batch dimensions are allowed.
    """
    u, s, vh = torch.linalg.svd(core)  # (t, k, k), (t, k), (t, k, k)
    p = min(pseudo_rank, core.shape[-1])
    root = s[..., :p].sqrt().unsqueeze(-2)  # (t, 1, p)
    core_out = u[..., :p] * root
    core_in = vh[..., :p, :].mT * root
    if p < pseudo_rank:  # layers narrower than p keep the common (k, p) shape with zero columns
        pad = pseudo_rank - p
        core_out = torch.nn.functional.pad(core_out, (0, pad))
        core_in = torch.nn.functional.pad(core_in, (0, pad))
    return core_out, core_in


def project_adapter(entry: CanonicalLora, basis_out: torch.Tensor, basis_in: torch.Tensor) -> torch.Tensor:
    """Least-squares core ``basis_out.T @ dW @ basis_in`` (``(k, k)``) for orthonormal bases."""
    return _core(basis_out.T @ entry.U, entry.S, basis_in.T @ entry.V)


def _core(projected_out: torch.Tensor, singular_values: torch.Tensor, projected_in: torch.Tensor) -> torch.Tensor:
    """``(basis_out.T @ U) diag(S) (basis_in.T @ V).T``: ``(k, k)`` from ``(k, r)``, ``(r,)``, ``(k, r)``."""
    return (projected_out * singular_values.unsqueeze(-2)) @ projected_in.mT


def _squared_norms(
    core_out: torch.Tensor, core_in: torch.Tensor, anchor: torch.Tensor | None, present: torch.Tensor
) -> torch.Tensor:
    """``||anchor + core_out[i] @ core_in[i].T||_F^2`` per style without forming ``k x k`` cores: ``(t,)``.

    ``core_out, core_in: (t, k, p)``, ``anchor: (k, k)``, ``present: (t,)``; leading batch dimensions allowed.
    """
    # ||B A^T||^2 = <B^T B, A^T A>, O(k p^2) per style.
    norms = ((core_out.mT @ core_out) * (core_in.mT @ core_in)).sum(dim=(-2, -1))
    if anchor is not None:
        cross = ((anchor.unsqueeze(-3) @ core_in) * core_out).sum(dim=(-2, -1))  # <anchor, B A^T>
        norms = norms + present.to(norms.dtype) * (2.0 * cross + (anchor**2).sum(dim=(-2, -1)).unsqueeze(-1))
    return norms


def _relative_errors(exact: torch.Tensor, approx: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Relative error of ``basis_out @ approx @ basis_in.T`` against ``dW`` whose projection is ``exact``.

    With orthonormal bases, ``||dW - R||^2 = ||dW||^2 - 2 <C, C_hat> + ||C_hat||^2`` where ``C`` is the
    exact projection: no dense ``n x d`` matrix is needed. ``exact, approx: (t, k, k)``, ``norm: (t,)``.
    """
    squared = norm**2 - 2.0 * (exact * approx).sum(dim=(-2, -1)) + (approx**2).sum(dim=(-2, -1))
    safe = torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.where(norm > 0, squared.clamp_min(0.0).sqrt() / safe, torch.zeros_like(norm))


def _style_weights(norm: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Weight of each style in the Gram summaries: 1, or ``1 / ||dW_i||`` with ``normalize``."""
    if not normalize:
        return (norm > 0).to(norm.dtype)
    return torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(norm))


def _merged_energy(
    norm: torch.Tensor,
    normalize: bool,
    truncated: torch.Tensor,
    norm_new: torch.Tensor,
    weight_new: torch.Tensor | float,
) -> torch.Tensor:
    """``sum_i w_i^2 ||dW_i||^2`` over the styles held (``norm: (..., t)``) and the new one, less what the held
    styles' rank-p cuts dropped (``truncated: (..., t)``, which no basis can hold any more): the energy a merged
    layer's variance rule is measured against (leading batch dimensions allowed; ``(...,)``)."""
    held = ((_style_weights(norm, normalize) * norm) ** 2).sum(-1) - truncated.sum(-1)
    return held + (weight_new * norm_new) ** 2


def _finish(
    cores: torch.Tensor,
    norm: torch.Tensor,
    basis_out: torch.Tensor,
    basis_in: torch.Tensor,
    pseudo_rank: int,
    anchor: torch.Tensor | None,
    normalize: bool,
) -> LayerShare:
    """Split exact cores ``(t, k, k)`` into rank-p factors, record errors, Gram summaries of what is kept and
    what the cut dropped.

    Leading batch dimensions are allowed (``(L, t, k, k)`` cores, ``(L, t)`` norms, ``(L, k, k)`` anchor):
    the result then holds stacked tensors, as :func:`~.batched_merge.merge_layers` uses it.
    """
    present = (norm > 0)[..., None, None].to(cores.dtype)  # (t, 1, 1)
    anchor_each = anchor.unsqueeze(-3) if anchor is not None else None  # (1, k, k)
    deviations = cores - present * anchor_each if anchor is not None else cores
    core_out, core_in = split_core(deviations, pseudo_rank)
    approx = core_out @ core_in.mT
    if anchor is not None:
        approx = approx + present * anchor_each
    weights = _style_weights(norm, normalize)[..., None, None]
    weighted = weights * approx
    dropped = cores - approx
    # ||C||^2 - ||C_hat||^2 = ||C - C_hat||^2 + 2 <C_hat, C - C_hat>; the cross term vanishes for a plain rank-p
    # cut (orthogonal to what it keeps) and is the anchor's otherwise: <anchor, D - D_p>.
    lost = dropped.pow(2).sum(dim=(-2, -1))
    if anchor is not None:
        lost = lost + 2.0 * (approx * dropped).sum(dim=(-2, -1))
    return LayerShare(
        basis_out=basis_out,
        basis_in=basis_in,
        core_out=core_out,
        core_in=core_in,
        gram_out=(weighted @ weighted.mT).sum(-3),
        gram_in=(weighted.mT @ weighted).sum(-3),
        norm=norm,
        error=_relative_errors(cores, approx, norm),
        truncated=weights[..., 0, 0] ** 2 * lost,
        anchor=anchor,
        normalize=normalize,
    )


# ----------------------------------------------------------------------------------------------
# Fitting (DESIGN 2) and merging (DESIGN 3)


def fit_layer(
    entries: list[CanonicalLora | None], rule: RankRule, pseudo_rank: int, center: bool = False, normalize: bool = False
) -> LayerShare:
    """Fit one layer's subspace from the canonical forms of ``t`` adapters (None: adapter absent here).

    ``basis_out`` is the top-k left singular vectors of ``[w_1 U_1 S_1, ..., w_t U_t S_t]``, i.e. the
    eigenvectors of ``sum_i w_i^2 dW_i dW_i.T``; ``basis_in`` the same for ``V_i``. Independent of each
    adapter's gauge. With ``center``, the energy is taken about the adapters' mean ``M`` (paper) plus
    ``M M.T`` itself, so the mean stays representable; the mean core becomes the layer's anchor and
    only each style's deviation from it is truncated to rank p.

    Returns the layer's state in float64; callers convert with :func:`to_storage`.
    """
    present = [i for i, entry in enumerate(entries) if entry is not None and entry.energy > 0]
    if not present:
        raise ValueError("a layer needs at least one adapter with a non-zero update")
    used = [entries[i] for i in present]
    like = {"dtype": used[0].S.dtype, "device": used[0].S.device}
    norms = torch.tensor([entry.energy**0.5 for entry in used], **like)
    weights = 1.0 / norms if normalize else torch.ones_like(norms)
    n_out, d_in = used[0].U.shape[0], used[0].V.shape[0]
    width = sum(entry.S.numel() for entry in used)
    k = None
    bases, projections = [], []
    for side in ("out", "in"):
        spans = [entry.U if side == "out" else entry.V for entry in used]
        partners = [entry.V if side == "out" else entry.U for entry in used]
        scaled = torch.cat([w * entry.S for w, entry in zip(weights, used, strict=True)])  # (R,)
        inner = torch.diag(scaled**2)
        if center and len(used) > 1:
            # Energy about the mean, plus the mean's own: Y P (I - (t-1)/t^2 Z.T Z) P Y.T, P = diag(w S).
            z = torch.cat(partners, dim=1)  # (d, R)
            inner = inner - (len(used) - 1) / len(used) ** 2 * scaled[:, None] * (z.T @ z) * scaled[None, :]
        decomposition = principal_decomposition(spans, inner)
        if k is None:
            k = rule.choose(decomposition.eigenvalues, cap=min(width, n_out, d_in))
        basis, coordinates = decomposition.basis(k)
        bases.append(basis)
        projections.append(coordinates.T @ decomposition.r)  # (k, R): basis.T @ [spans...], no n-sized product
    basis_out, basis_in = bases
    projected_out, projected_in = projections

    t = len(entries)
    cores = torch.zeros(t, k, k, **like)
    norm = torch.zeros(t, **like)
    start = 0
    for i, entry in zip(present, used, strict=True):
        columns = slice(start, start + entry.S.numel())
        cores[i] = _core(projected_out[:, columns], entry.S, projected_in[:, columns])
        norm[i] = entry.energy**0.5
        start = columns.stop
    anchor = cores[present].mean(0) if center else None
    return _finish(cores, norm, basis_out, basis_in, pseudo_rank, anchor, normalize)


def empty_layer(
    n_out: int,
    d_in: int,
    num_styles: int,
    pseudo_rank: int,
    center: bool,
    normalize: bool,
    device: torch.device | str = FIT_DEVICE,
) -> LayerShare:
    """A layer no style touches yet: ``k = 0``; a later merge that touches it gives it a basis. Float64."""

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, dtype=FIT_DTYPE, device=device)

    return LayerShare(
        basis_out=zeros(n_out, 0),
        basis_in=zeros(d_in, 0),
        core_out=zeros(num_styles, 0, pseudo_rank),
        core_in=zeros(num_styles, 0, pseudo_rank),
        gram_out=zeros(0, 0),
        gram_in=zeros(0, 0),
        norm=zeros(num_styles),
        error=zeros(num_styles),
        truncated=zeros(num_styles),
        anchor=zeros(0, 0) if center else None,
        normalize=normalize,
    )


def merge_layer(layer: LayerShare, entry: CanonicalLora | None, rule: RankRule) -> LayerShare:
    """Add one style to a layer without the adapters merged before it (DESIGN 3).

    The new bases are the top eigenvectors of ``basis_out @ gram_out @ basis_out.T + w^2 U S^2 U.T``:
    one QR of the ``n x (k + r)`` matrix ``[basis_out, U]`` and a ``(k + r)`` eigenproblem, whatever
    the number of styles held. Earlier styles are re-projected through the ``k x k`` change of basis
    (``O(t k^2 p)``); their rank-p factors stay rank p, so no per-style SVD is needed.

    ``entry`` None means the new style does not touch this layer: only its zero core is appended and
    the bases stay exactly as stored. Returns a new float64 ``LayerShare``; ``layer`` is not modified.
    ``entry`` must be on ``layer``'s device (both on the CPU under the package's policy).
    """
    # float32 -> float64 is exact; bases stored in float32 are re-orthonormalised (see to_fit) below,
    # inside the QR the merge needs anyway, instead of by a QR of their own.
    orthonormalize = layer.basis_out.dtype != FIT_DTYPE
    layer = _convert(layer, FIT_DTYPE)
    p = layer.pseudo_rank
    like = {"dtype": layer.norm.dtype, "device": layer.norm.device}
    if entry is None or entry.energy == 0.0:
        return append_absent_style(layer)
    norm_new = entry.energy**0.5
    weight = 1.0 / norm_new if layer.normalize else 1.0
    n_out, d_in = layer.shape
    cap = min(layer.k + entry.S.numel(), n_out, d_in)
    k_old = layer.k
    k_new = None
    bases, projections = [], []
    for old_basis, old_gram, span in (
        (layer.basis_out, layer.gram_out, entry.U),
        (layer.basis_in, layer.gram_in, entry.V),
    ):
        inner = torch.block_diag(old_gram, torch.diag((weight * entry.S) ** 2))  # (k + r, k + r)
        decomposition = principal_decomposition([old_basis, span], inner, orthonormalize_first=orthonormalize)
        if k_new is None:
            total = _merged_energy(layer.norm, layer.normalize, layer.truncated, torch.tensor(norm_new, **like), weight)
            k_new = rule.choose(decomposition.eigenvalues, cap=cap, total=float(total))
        basis, coordinates = decomposition.basis(k_new)
        bases.append(basis)
        # new_basis.T @ [old_basis, span] from the QR's small factors, (k_new, k_old + r): no n-sized
        # product, and old_basis as re-orthonormalised by the decomposition.
        projections.append(coordinates.T @ decomposition.r)
    basis_out, basis_in = bases
    rotate_out, projected_out = projections[0][:, :k_old], projections[0][:, k_old:]  # (k_new, k_old), (k_new, r)
    rotate_in, projected_in = projections[1][:, :k_old], projections[1][:, k_old:]

    # Earlier styles: their reconstructions projected onto the new bases (a projection, so the
    # drift is the energy it removes, and their factors stay rank p).
    core_out = rotate_out @ layer.core_out  # (t, k_new, p)
    core_in = rotate_in @ layer.core_in
    anchor = rotate_out @ layer.anchor @ rotate_in.T if layer.anchor is not None else None
    present = layer.present
    before = _squared_norms(layer.core_out, layer.core_in, layer.anchor, present)
    after = _squared_norms(core_out, core_in, anchor, present)
    drift = (before - after).clamp_min(0.0).sqrt()
    safe_norm = torch.where(present, layer.norm, torch.ones_like(layer.norm))
    # Triangle inequality twice: ||dW - R'|| <= ||dW - R|| + ||R - R'|| and <= ||dW|| + ||R'||.
    bound = torch.minimum(layer.error + drift / safe_norm, 1.0 + after.clamp_min(0.0).sqrt() / safe_norm)
    error = torch.where(present, bound, layer.error)

    # The new style: exact core, then rank p (about the anchor when centred).
    core_new = _core(projected_out, entry.S, projected_in)  # (k_new, k_new), = project_adapter(entry, ...)
    norm_tensor = torch.tensor([norm_new], **like)
    if anchor is not None and not bool(present.any()):  # the first style on a centred layer anchors it
        anchor = core_new.clone()
    finished = _finish(core_new[None], norm_tensor, basis_out, basis_in, p, anchor, layer.normalize)
    return LayerShare(
        basis_out=basis_out,
        basis_in=basis_in,
        core_out=torch.cat([core_out, finished.core_out]),
        core_in=torch.cat([core_in, finished.core_in]),
        # The earlier styles' summaries turn with the bases (see LayerShare.gram_out for how closely).
        gram_out=rotate_out @ layer.gram_out @ rotate_out.T + finished.gram_out,
        gram_in=rotate_in @ layer.gram_in @ rotate_in.T + finished.gram_in,
        norm=torch.cat([layer.norm, norm_tensor]),
        error=torch.cat([error, finished.error]),
        truncated=torch.cat([layer.truncated, finished.truncated]),
        anchor=anchor,
        normalize=layer.normalize,
    )


def append_absent_style(layer: LayerShare) -> LayerShare:
    """The layer with one more style that does not touch it: a zero core, norm and error; all else as it is.

    Works in the layer's own dtype: appending zeros to a stored float32 layer gives the same bits as the round
    trip through float64 that :func:`merge_layer` makes, without the conversions.
    """
    like = {"dtype": layer.norm.dtype, "device": layer.norm.device}
    zeros = torch.zeros(1, layer.k, layer.pseudo_rank, dtype=layer.core_out.dtype, device=layer.core_out.device)
    return LayerShare(
        basis_out=layer.basis_out,
        basis_in=layer.basis_in,
        core_out=torch.cat([layer.core_out, zeros]),
        core_in=torch.cat([layer.core_in, zeros]),
        gram_out=layer.gram_out,
        gram_in=layer.gram_in,
        norm=torch.cat([layer.norm, torch.zeros(1, **like)]),
        error=torch.cat([layer.error, torch.zeros(1, **like)]),
        truncated=torch.cat([layer.truncated, torch.zeros(1, **like)]),
        anchor=layer.anchor,
        normalize=layer.normalize,
    )


def delete_from_layer(layer: LayerShare, index: int) -> LayerShare:
    """Drop style ``index``: its cores and its share of the Gram summaries as it is stored (rank p). After a fit
    the summaries are then exactly those of the styles left; after merges that truncated, as close as the
    summaries were (see ``LayerShare.gram_out``); format-1 summaries of full cores keep what the style's cut
    had dropped.

    The bases are kept as they are: the remaining styles' reconstructions do not change at all.
    """
    stored = layer
    layer = to_fit(layer)
    keep = torch.tensor([i for i in range(layer.num_styles) if i != index], dtype=torch.long, device=layer.norm.device)
    core = layer.cores()[index]  # (k, k)
    weight = float(_style_weights(layer.norm, layer.normalize)[index])
    result = layer.select(keep)
    # The stored bases, not to_fit's re-orthonormalised ones (as replace_in_layer): the others stay bit for bit.
    result.basis_out, result.basis_in = stored.basis_out.to(FIT_DTYPE), stored.basis_in.to(FIT_DTYPE)
    result.gram_out = _clip_psd(layer.gram_out - weight**2 * core @ core.T)
    result.gram_in = _clip_psd(layer.gram_in - weight**2 * core.T @ core)
    return result


def replace_in_layer(layer: LayerShare, index: int, core_out: torch.Tensor, core_in: torch.Tensor) -> LayerShare:
    """Give style ``index`` new rank-p factors in the layer's fixed bases (the paper's Step 3 fine-tuning).

    ``core_out, core_in: (k, p)``. The bases and every other style stay exactly as they are. The style
    becomes exactly what is stored, so its norm is its new core's, its error and ``truncated`` 0; its
    share of the Gram summaries (as stored, as :func:`delete_from_layer` removes it) is swapped for the
    new core's, so later merges weigh the fine-tuned style.
    """
    expected = (layer.k, layer.pseudo_rank)
    for side, core in (("core_out", core_out), ("core_in", core_in)):
        if tuple(core.shape) != expected:
            raise ShapeMismatchError(f"{side} of the new style has shape {tuple(core.shape)}, expected {expected}")
        if not bool(torch.isfinite(core).all()):
            raise FactorValueError(f"{side} of the new style contains NaN or Inf")
    if not bool(core_out.any()) or not bool(core_in.any()):
        raise FactorValueError("the new style's cores are all zero; delete the style instead")
    stored = layer
    layer = to_fit(layer)
    old_core = layer.cores()[index]  # (k, k)
    old_weight = float(_style_weights(layer.norm, layer.normalize)[index])
    core_outs, core_ins = layer.core_out.clone(), layer.core_in.clone()
    like = {"dtype": layer.core_out.dtype, "device": layer.core_out.device}
    core_outs[index], core_ins[index] = core_out.detach().to(**like), core_in.detach().to(**like)
    new_core = core_outs[index] @ core_ins[index].T
    if layer.anchor is not None and bool(layer.present[index]):
        new_core = new_core + layer.anchor
    norm, error, truncated = layer.norm.clone(), layer.error.clone(), layer.truncated.clone()
    norm[index], error[index], truncated[index] = torch.linalg.matrix_norm(new_core), 0.0, 0.0
    new_weight = float(_style_weights(norm, layer.normalize)[index])
    return LayerShare(
        # The stored bases, not to_fit's re-orthonormalised ones: the other styles stay bit for bit.
        basis_out=stored.basis_out.to(FIT_DTYPE),
        basis_in=stored.basis_in.to(FIT_DTYPE),
        core_out=core_outs,
        core_in=core_ins,
        gram_out=_clip_psd(
            layer.gram_out - old_weight**2 * old_core @ old_core.T + new_weight**2 * new_core @ new_core.T
        ),
        gram_in=_clip_psd(
            layer.gram_in - old_weight**2 * old_core.T @ old_core + new_weight**2 * new_core.T @ new_core
        ),
        norm=norm,
        error=error,
        truncated=truncated,
        anchor=layer.anchor,
        normalize=layer.normalize,
    )


def _clip_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Nearest positive semi-definite matrix (negative eigenvalues from round-off set to 0)."""
    if matrix.numel() == 0:
        return matrix
    eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (eigenvectors * eigenvalues.clamp_min(0.0)) @ eigenvectors.T


def _convert(layer: LayerShare, dtype: torch.dtype | None, device: torch.device | str | None = None) -> LayerShare:
    """The layer's tensors in ``dtype`` (None: as they are) on ``device`` (None: where they are), contiguous."""

    def cast(tensor: torch.Tensor | None) -> torch.Tensor | None:
        # Cast, then make contiguous: bases are computed column-major, and torch's casting copy into a
        # row-major layout took 3x longer than the cast and a float32 transpose (0.24 vs 0.08 ms at 3072 x 32).
        return None if tensor is None else tensor.to(device=device, dtype=dtype).contiguous()

    return LayerShare(
        basis_out=cast(layer.basis_out),
        basis_in=cast(layer.basis_in),
        core_out=cast(layer.core_out),
        core_in=cast(layer.core_in),
        gram_out=cast(layer.gram_out),
        gram_in=cast(layer.gram_in),
        norm=cast(layer.norm),
        error=cast(layer.error),
        truncated=cast(layer.truncated),
        anchor=cast(layer.anchor),
        normalize=layer.normalize,
    )


def to_fit(layer: LayerShare) -> LayerShare:
    """The layer in float64 for computation, its bases re-orthonormalised.

    Bases held in float32 are orthonormal only to ~1e-7; the merge's drift estimate subtracts
    squared norms, which would turn that into ~3e-4 of spurious error. A QR (``O(n k^2)``) of each
    basis fixes it while moving the bases by ~1e-7 only.
    """
    if layer.basis_out.dtype == FIT_DTYPE:
        return layer
    result = _convert(layer, FIT_DTYPE)
    result.basis_out = _orthonormalize(result.basis_out)
    result.basis_in = _orthonormalize(result.basis_in)
    return result


def _orthonormalize(basis: torch.Tensor) -> torch.Tensor:
    """Q of the QR of a nearly orthonormal ``(n, k)`` basis, signs chosen so that ``Q ~= basis``."""
    if basis.shape[1] == 0:
        return basis
    q, r = torch.linalg.qr(basis)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def to_storage(layer: LayerShare) -> LayerShare:
    """The layer in float32 on the CPU, as it is held and saved: contiguous (row-major), whatever layout and
    device it was computed in."""
    return _convert(layer, STORE_DTYPE, device="cpu")


def on_device(layer: LayerShare, device: torch.device | str) -> LayerShare:
    """The layer's tensors copied to ``device`` (dtypes kept): a stored layer brought to where a merge runs."""
    return layer if layer.basis_out.device == torch.device(device) else _convert(layer, None, device)
