"""The exact mini-batch Fisher ``F = GᵀG/N`` applied through its ``N x N`` Gram system.

``G`` holds one row per per-sample gradient (``R = N`` rows for one label per sample,
``N·K`` rows for ``K`` factor columns per sample), so ``F = GᵀG/N`` is ``P x P`` but has
rank at most ``R``. With the Gram eigendecomposition ``GGᵀ = U S Uᵀ`` (``R x R``, never
``P x P``) and ``V = Gᵀ U S^-1/2`` (orthonormal columns spanning the row space of ``G``),

    ``(F + λI)^-1 g = V (S/N + λ)^-1 Vᵀ g + (g - V Vᵀ g) / λ``,

which equals the Woodbury form ``(g - Gᵀ (NλI + GGᵀ)^-1 G g) / λ`` but keeps its accuracy
as ``λ -> 0``: the row-space part is solved with the well-conditioned ``S/N + λ`` and
only the (numerically tiny, when ``g`` is a combination of per-sample gradients)
orthogonal remainder is divided by ``λ``. Eigenvalues below ``R · eps · max(S)`` count
as zero. The eigendecomposition does not depend on ``λ``, so a damping schedule reuses it.

Example:
    >>> import torch
    >>> G = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    >>> eig = gram_eigen(G)
    >>> woodbury_solve(G, eig, torch.tensor([1.0, 1.0], dtype=torch.float64), 0.5, 2)
    tensor([1.0000, 0.4000], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from natgrad.engine.checks import check_finite

__all__ = ["gram_eigen", "woodbury_solve"]


def gram_eigen(G: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eigenpairs of the Gram matrix ``GGᵀ`` with numerically positive eigenvalues.

    Args:
        G: ``(R, P)`` per-sample gradients, one per row.

    Returns:
        ``{"U": (R, r), "S": (r,)}`` in float64, ``r <= R`` kept eigenpairs.

    Raises:
        FloatingPointError: NaN or Inf in ``G`` (seen on the diagonal of ``GGᵀ``, so the
            check costs ``R x R``, not ``R x P``).
    """
    K = (G @ G.T).double()
    check_finite(
        "the per-sample gradients (their Gram matrix GGᵀ)",
        K,
        "Check the inputs; in training, the run has likely diverged: lower the learning rate "
        "or raise damping.",
    )
    S, U = torch.linalg.eigh(K)
    eps = torch.finfo(G.dtype).eps
    tol = S.abs().max() * G.shape[0] * eps
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

    Args:
        G: ``(R, P)`` per-sample gradients.
        eig: the output of ``gram_eigen(G)``.
        g: ``(P,)`` the vector to precondition.
        damping: ``λ > 0``.
        n_samples: ``N`` (the number of samples, not rows).

    Returns:
        ``(P,)`` in the dtype of ``g``.
    """
    U, S = eig["U"].to(g.dtype), eig["S"].to(g.dtype)
    if S.numel() == 0:
        return g / damping
    c = U.T @ (G @ g)
    proj = G.T @ (U @ (c / S))
    inside = G.T @ (U @ (c / (S * (S / n_samples + damping))))
    return inside + (g - proj) / damping
