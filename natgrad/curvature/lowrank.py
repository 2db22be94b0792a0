"""The exact mini-batch Fisher ``F = GᵀG/N`` applied through its ``N x N`` Gram system.

``G`` holds one row per per-sample gradient (``R = N`` rows for one label per sample,
``N·K`` rows for ``K`` factor columns per sample), so ``F = GᵀG/N`` is ``P x P`` but has
rank at most ``R``. With the Gram eigendecomposition ``GGᵀ = U S Uᵀ`` (``R x R``, never
``P x P``) and ``V = Gᵀ U S^-1/2`` (orthonormal columns spanning the row space of ``G``),

    ``(F + λI)^-1 g = V (S/N + λ)^-1 Vᵀ g + (g - V Vᵀ g) / λ``,

which equals the Woodbury form ``(g - Gᵀ (NλI + GGᵀ)^-1 G g) / λ`` but keeps its accuracy
as ``λ -> 0``: the row-space part is solved with the well-conditioned ``S/N + λ`` and
only the (numerically tiny, when ``g`` is a combination of per-sample gradients)
orthogonal remainder is divided by ``λ``. The two parts are combined as

    ``(F + λI)^-1 g = g/λ - Gᵀ U (Uᵀ G g / (N λ (S/N + λ)))``,

one product with ``G`` and one with ``Gᵀ``.

Precision: whatever ``G``'s dtype, the Gram matrix ``GGᵀ`` (cost ``R x R x P``), its
eigenpairs and the products ``G g`` and ``Gᵀ w`` (cost ``R x P``) are formed in float64,
converting ``G`` a block of columns at a time (never a full float64 copy). Dividing the
remainder by ``λ`` magnifies rounding errors by about ``1/λ``: in float32 arithmetic that
was a relative error near ``1e-4`` at ``λ = 1e-3`` and ``0.1`` at ``λ = 1e-6``; in float64
it stays below float32 round-off down to ``λ ≈ 1e-8`` (the result is returned in ``g``'s
dtype). Eigenvalues below ``R · eps64 · max(S)`` count as zero. The eigendecomposition
does not depend on ``λ``, so a damping schedule reuses it.

Example:
    >>> import torch
    >>> G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> eig = gram_eigen(G)
    >>> woodbury_solve(G, eig, torch.tensor([1.0, 1.0], dtype=torch.float64), 0.5, 2)
    tensor([1.0000, 0.4000], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from natgrad.engine.checks import check_finite

__all__ = ["gram_eigen", "woodbury_solve"]

# float64 entries of G converted at a time (32 MiB): bounds the extra memory of the
# float64 products whatever the number of parameters
_BLOCK_FLOATS = 2**22


def _column_blocks(G: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(columns, G[:, columns] in float64)`` over blocks of about ``_BLOCK_FLOATS`` entries."""
    width = max(1, _BLOCK_FLOATS // max(G.shape[0], 1))
    for j in range(0, G.shape[1], width):
        cols = slice(j, min(j + width, G.shape[1]))
        yield cols, G[:, cols].double()


def _gram64(G: torch.Tensor) -> torch.Tensor:
    """``G Gᵀ`` in float64."""
    K = torch.zeros(G.shape[0], G.shape[0], dtype=torch.float64, device=G.device)
    for _, B in _column_blocks(G):
        K.addmm_(B, B.T)
    return K


def _matvec64(G: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``G v`` in float64 (``v`` float64, ``(P,)``)."""
    out = torch.zeros(G.shape[0], dtype=torch.float64, device=G.device)
    for cols, B in _column_blocks(G):
        out.addmv_(B, v[cols])
    return out


def _rmatvec64(G: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``Gᵀ w`` in float64 (``w`` float64, ``(R,)``)."""
    return torch.cat([B.T @ w for _, B in _column_blocks(G)])


def gram_eigen(G: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eigenpairs of the Gram matrix ``GGᵀ`` with numerically positive eigenvalues.

    The Gram matrix is formed in float64 whatever ``G``'s dtype (see the module notes).

    Args:
        G: ``(R, P)`` per-sample gradients, one per row.

    Returns:
        ``{"U": (R, r), "S": (r,)}`` in float64, ``r <= R`` kept eigenpairs.

    Raises:
        FloatingPointError: NaN or Inf in ``G`` (seen on the diagonal of ``GGᵀ``, so the
            check costs ``R x R``, not ``R x P``).
    """
    K = _gram64(G)
    check_finite(
        "the per-sample gradients (their Gram matrix GGᵀ)",
        K,
        "Check the inputs; in training, the run has likely diverged: lower the learning rate "
        "or raise damping.",
    )
    S, U = torch.linalg.eigh(K)
    tol = S.abs().max() * G.shape[0] * torch.finfo(torch.float64).eps
    keep = S.gt(tol)
    return {"U": U[:, keep].contiguous(), "S": S[keep].contiguous()}


def woodbury_solve(
    G: torch.Tensor,
    eig: Mapping[str, torch.Tensor],
    g: torch.Tensor,
    damping: float,
    n_samples: int,
) -> torch.Tensor:
    """``(GᵀG/N + λI)^-1 g`` through the Gram eigenpairs of :func:`gram_eigen`.

    Computed in float64 (``G`` converted a block of columns at a time) as
    ``g/λ - Gᵀ U (Uᵀ G g / (N λ (S/N + λ)))``; see the module notes.

    Args:
        G: ``(R, P)`` per-sample gradients.
        eig: the output of ``gram_eigen(G)``.
        g: ``(P,)`` the vector to precondition.
        damping: ``λ > 0``.
        n_samples: ``N`` (the number of samples, not rows).

    Returns:
        ``(P,)`` in the dtype of ``g``.
    """
    U, S = eig["U"].double(), eig["S"].double()
    gd = g.double()
    if S.numel() == 0:
        return (gd / damping).to(g.dtype)
    c = U.T @ _matvec64(G, gd)
    w = U @ (c / (n_samples * damping * (S / n_samples + damping)))
    return (gd / damping - _rmatvec64(G, w)).to(g.dtype)
