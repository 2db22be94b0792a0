"""Helpers the uses share on top of the :class:`~natgrad.Curvature` protocol.

Vectors are ``{parameter name: tensor}`` dicts. :func:`conjugate_gradient` solves a
symmetric positive-definite system given only its product (``curvature.mv`` plus a
damping, optionally restricted to a mask), which is how the uses reach any curvature
where no closed-form inverse of the combined operator exists.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from natgrad.curvature.protocol import Curvature

__all__ = [
    "CGResult",
    "check_curvature",
    "conjugate_gradient",
    "dict_dot",
    "full_vector",
]

Vec = dict[str, torch.Tensor]


def check_curvature(curvature: object, model: nn.Module | None, what: str = "curvature") -> list[str]:
    """The covered names of ``curvature``; raises when it is no Curvature or misfits ``model``.

    Raises:
        TypeError: ``curvature`` is not a :class:`natgrad.Curvature` (a plain dict of
            diagonal values can be wrapped as ``natgrad.DiagonalFisher(values, n)``).
        ValueError: names the model lacks, or shapes that differ from the parameters.
    """
    if not isinstance(curvature, Curvature):
        raise TypeError(
            f"{what} must be a natgrad.Curvature (DiagonalFisher, KroneckerFisher, "
            f"LowRankFisher, ...), got {type(curvature).__name__}. Wrap a dict of diagonal "
            "values as natgrad.DiagonalFisher(values, n_samples), or estimate one with "
            "natgrad.estimate_curvature(model, data, kind=...)."
        )
    names = curvature.names()
    if not names:
        raise ValueError(f"{what} covers no parameters; estimate it on the model's parameters.")
    if model is not None:
        named = dict(model.named_parameters())
        missing = [k for k in names if k not in named]
        if missing:
            raise ValueError(
                f"{what} covers parameters the model lacks: {missing[:8]}; the model has "
                f"{list(named)[:8]}. Estimate the curvature on this model (a pruned model "
                "names its weights '<m>.weight_orig'; call natgrad.make_permanent first)."
            )
        shapes = curvature.param_shapes()
        bad = [
            f"{k}: {shapes[k]} vs {tuple(named[k].shape)}"
            for k in names
            if shapes[k] != tuple(named[k].shape)
        ]
        if bad:
            raise ValueError(
                f"{what} has shapes that differ from the model's parameters: {bad[:8]}. "
                "Estimate the curvature on this architecture."
            )
    return names


def full_vector(
    shapes: Mapping[str, torch.Size],
    dtype: torch.dtype,
    device: torch.device | str | None,
    values: Mapping[str, torch.Tensor] | None = None,
) -> Vec:
    """``{name: zeros(shape)}`` over ``shapes``, overwritten by ``values`` where given."""
    out = {k: torch.zeros(s, dtype=dtype, device=device) for k, s in shapes.items()}
    for k, v in (values or {}).items():
        out[k] = v.to(dtype=dtype, device=device)
    return out


def dict_dot(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``Σ_k ⟨a_k, b_k⟩`` over the names of ``a`` (a 0-dim tensor)."""
    return torch.stack([(a[k] * b[k].to(a[k])).sum() for k in a]).sum()


@dataclass
class CGResult:
    """The solution ``x``, the iterations used and the final relative residual."""

    x: Vec
    iterations: int
    residual: float


def conjugate_gradient(
    matvec: Callable[[Vec], Mapping[str, torch.Tensor]],
    b: Vec,
    *,
    precond: Mapping[str, torch.Tensor] | Callable[[Vec], Mapping[str, torch.Tensor]] | None = None,
    mask: Mapping[str, torch.Tensor] | None = None,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> CGResult:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` known by ``matvec``.

    Preconditioned conjugate gradients (Hestenes and Stiefel) on ``{name: tensor}``
    vectors. With ``mask`` (``{name: 0/1 tensor}``) the system is the masked one
    ``P A P x = P b`` with ``P = diag(mask)``, whose solution is zero off the mask;
    ``precond`` is a positive diagonal ``M`` (a ``{name: tensor}``) or a callable that
    applies ``M⁻¹`` (symmetric positive definite), and the iteration uses ``M⁻¹ r``. Stops when
    ``‖r‖ <= tol ‖b‖`` or after ``max_iter`` products.

    Returns:
        :class:`CGResult`.
    """

    def op(v: Vec) -> Vec:
        out = matvec(v)
        return {k: out[k] * mask[k] for k in v} if mask is not None else {k: out[k] for k in v}

    def apply_m(r: Vec) -> Vec:
        if precond is None:
            return r
        if callable(precond):
            z = precond(r)
            return {k: z[k].to(r[k]) for k in r}
        return {k: r[k] / precond[k].to(r[k]) for k in r}

    if mask is not None:
        b = {k: b[k] * mask[k] for k in b}
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    b_norm = float(dict_dot(b, b).sqrt())
    if b_norm == 0.0:
        return CGResult(x, 0, 0.0)
    r = {k: v.clone() for k, v in b.items()}
    z = apply_m(r)
    p = {k: v.clone() for k, v in z.items()}
    rz = dict_dot(r, z)
    res = 1.0
    it = 0
    while it < max_iter:
        it += 1
        ap = op(p)
        pap = dict_dot(p, ap)
        if not float(pap) > 0:
            break  # p is (numerically) in the null space: nothing more to gain
        alpha = rz / pap
        for k in x:
            x[k] = x[k] + alpha * p[k]
            r[k] = r[k] - alpha * ap[k]
        res = float(dict_dot(r, r).sqrt()) / b_norm
        if res <= tol:
            break
        z = apply_m(r)
        rz_new = dict_dot(r, z)
        beta = rz_new / rz
        rz = rz_new
        for k in p:
            p[k] = z[k] + beta * p[k]
    return CGResult(x, it, res)


def warn_unconverged(res: CGResult, tol: float, what: str, fix: str) -> None:
    """Warn (``UserWarning``) when conjugate gradients stopped above the tolerance
    (the product budget ran out, or the system is singular), so the result is approximate."""
    if res.residual > tol:
        warnings.warn(
            f"{what}: conjugate gradients stopped after {res.iterations} products at "
            f"relative residual {res.residual:.3g} > cg_tol={tol:g}, so the result is "
            f"approximate; {fix}",
            UserWarning,
            stacklevel=4,
        )
