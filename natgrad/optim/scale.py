"""The diagonal natural gradient ``scale_by_fisher`` and the norms it changes.

``Δ = (F + λI)^-1 g`` with a diagonal Fisher is ``Δ_i = g_i / (F_i + λ)`` (docs/design.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from natgrad.curvature.diagonal import check_fisher
from natgrad.engine.batch import OutputFn
from natgrad.engine.checks import (
    GRAD_HINT,
    check_all_finite,
    check_fisher_type,
    check_model,
    check_names_in,
    check_positive,
    check_same_structure,
)
from natgrad.engine.common import module_of, to_acc
from natgrad.engine.likelihoods import Likelihood, get_likelihood
from natgrad.engine.per_sample import mean_loss_grad
from natgrad.engine.report import Report

__all__ = ["scale_by_fisher", "NaturalGradientNorms", "natural_gradient_norms"]


def scale_by_fisher(
    grads: Mapping[str, torch.Tensor] | nn.Module,
    fisher: Mapping[str, torch.Tensor],
    damping: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """The diagonal natural-gradient step ``Δ_i = g_i / (F_i + λ)``.

    Args:
        grads: ``{name: gradient}`` (every name must be in ``fisher``), or a model: then
            the ``.grad`` of each of its parameters named in ``fisher`` is rewritten in
            place with ``Δ`` (parameters without ``.grad`` or outside ``fisher`` are left
            as they are).
        fisher: ``{name: F}`` with the gradients' shapes, e.g. a :class:`DiagonalFisher`.
        damping: ``λ >= 0`` (``F + λ`` must be positive wherever it divides).

    Returns:
        ``{name: Δ}`` in each gradient's dtype (computed in float32, or float64).

    Raises:
        TypeError: ``fisher`` is not a mapping of tensors (e.g. a list of Fishers).
        ValueError: negative damping, names missing from ``fisher``, shapes that differ,
            negative Fisher entries, ``damping=0`` where a Fisher entry is 0, or a model
            none of whose parameters in ``fisher`` has a ``.grad``.
        FloatingPointError: NaN or Inf in a gradient or in the Fisher (named).

    Example:
        >>> import torch
        >>> scale_by_fisher({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.0, 1.0])}, 1.0)
        {'w': tensor([1., 1.])}
    """
    check_fisher_type(fisher)
    lam = check_positive("damping", damping, allow_zero=True)
    if isinstance(grads, nn.Module):
        named = dict(grads.named_parameters())
        check_names_in(fisher, named)
        live: dict[str, torch.Tensor] = {}
        for k in fisher:
            g = named[k].grad
            if g is not None:
                live[k] = g
        if not live:
            raise ValueError(
                f"None of the model's {len(fisher)} parameter(s) in the Fisher has a gradient "
                "(.grad is None), so there is nothing to scale: call loss.backward() before "
                "scale_by_fisher(model, fisher), or pass the gradients as {name: tensor}."
            )
        out = _scale(live, fisher, lam, "the gradient (.grad) of parameter")
        for k, v in out.items():
            live[k].copy_(v)
        return out
    missing = [k for k in grads if k not in fisher]
    if missing:
        raise ValueError(
            f"No Fisher for gradients {missing[:8]}; the Fisher holds {list(fisher)[:8]}. "
            "Estimate the Fisher with the same params, or drop those gradients."
        )
    return _scale(dict(grads), fisher, lam, "the gradient")


def _scale(
    grads: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor], lam: float, what: str
) -> dict[str, torch.Tensor]:
    """``g / (F + λ)`` after checking shapes, the Fisher's values and the gradients."""
    check_same_structure(grads, {k: fisher[k] for k in grads}, "the gradients", "the Fisher")
    check_fisher(fisher)
    check_all_finite(grads, what, GRAD_HINT)
    out = {}
    for k, g in grads.items():
        ga = to_acc(g)
        den = fisher[k].to(ga) + lam
        if lam == 0 and bool((den == 0).any()):
            raise ValueError(
                f"damping=0 but the Fisher entry {k!r} is 0 somewhere, so g / (F + damping) "
                "divides by zero; use damping > 0 (e.g. 1e-3)."
            )
        out[k] = (ga / den).to(g.dtype)
    return out


@dataclass
class NaturalGradientNorms(Report):
    """Norms of the gradient ``g`` and the natural gradient ``Δ = g / (F + λ)``.

    ``layers`` maps each module (parameter names up to the last dot) to
    ``{"grad_norm", "natgrad_norm", "ratio"}`` with ``ratio = ‖Δ‖ / ‖g‖`` (``None`` when
    ``‖g‖ = 0``); the ``total_*`` fields are over every parameter in the Fisher.
    """

    layers: dict[str, dict[str, float | None]]
    total_grad_norm: float
    total_natgrad_norm: float
    total_ratio: float | None
    damping: float


def natural_gradient_norms(
    model: nn.Module,
    batch: Any,
    fisher: Mapping[str, torch.Tensor],
    likelihood: str | Likelihood = "categorical",
    damping: float = 1e-3,
    output_fn: OutputFn | None = None,
) -> NaturalGradientNorms:
    """Gradient and diagonal natural-gradient norms, per layer and in total.

    ``g = ∇θ (1/N) Σ_n l_n`` on ``batch`` (``.grad`` is not touched) for the parameters in
    ``fisher``, and ``Δ = g / (F + λ)`` (:func:`scale_by_fisher`). As in the Fisher, tokens
    whose attention mask is 0 are left out of ``l_n`` (``token_categorical``).

    Args:
        model: the model.
        batch: ``(x, y)`` or a dict batch with labels.
        fisher: ``{name: F}`` (e.g. a :class:`DiagonalFisher`) for parameters of ``model``.
        likelihood: name or :class:`natgrad.engine.likelihoods.Likelihood`.
        damping: ``λ >= 0``.
        output_fn: maps model outputs to the output tensor.

    Returns:
        :class:`NaturalGradientNorms`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``fisher`` is not a mapping of tensors.
        ValueError: a batch without labels or with labels out of range, or Fisher names
            the model lacks.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> F = {"weight": torch.ones(2, 2), "bias": torch.ones(2)}
        >>> r = natural_gradient_norms(model, (torch.randn(4, 2), torch.tensor([0, 1, 0, 1])), F, damping=1.0)
        >>> round(r.total_ratio, 6)
        0.5
    """
    check_model(model, "natural_gradient_norms")
    check_fisher_type(fisher)
    lam = check_positive("damping", damping, allow_zero=True)
    lik = get_likelihood(likelihood)
    named = dict(model.named_parameters())
    check_names_in(fisher, named)
    names = list(fisher)
    grads, _ = mean_loss_grad(model, batch, lik, names, output_fn=output_fn, what="the batch")
    nat = scale_by_fisher(grads, fisher, lam)
    layers: dict[str, dict[str, float | None]] = {}
    sq_g: dict[str, float] = {}
    sq_d: dict[str, float] = {}
    for k in names:
        mod = module_of(k)
        sq_g[mod] = sq_g.get(mod, 0.0) + float(grads[k].double().pow(2).sum())
        sq_d[mod] = sq_d.get(mod, 0.0) + float(nat[k].double().pow(2).sum())
    for mod in sq_g:
        gn, dn = sq_g[mod] ** 0.5, sq_d[mod] ** 0.5
        layers[mod] = {"grad_norm": gn, "natgrad_norm": dn, "ratio": dn / gn if gn > 0 else None}
    tg, td = sum(sq_g.values()) ** 0.5, sum(sq_d.values()) ** 0.5
    return NaturalGradientNorms(layers, tg, td, td / tg if tg > 0 else None, lam)
