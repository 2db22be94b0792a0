"""Fisher-weighted damage: how much one SGD step on task B is expected to hurt task A.

Conventions (docs/design.md). Each task's loss is the *mean* per-sample negative
log-likelihood over its batch, ``L(θ) = (1/N) Σ_n l_n(θ)``, and ``∇L`` is its mean
gradient. The diagonal Fisher is the per-sample mean ``F_i = (1/N) Σ_n E_y[(∂l_n/∂θ_i)²]``,
which is the Gauss-Newton/Fisher approximation of the Hessian of the mean loss
``∇²L`` (equal to it for a linear model with Gaussian likelihood, exact labels).

One SGD step on B moves ``Δ = -η ∇L_B``. Task A's loss changes by

    ``L_A(θ + Δ) - L_A(θ) ≈ ∇L_A · Δ + ½ Σ_i F_A,i Δ_i²``

* ``first_order = ∇L_A · Δ`` (negative when the tasks' gradients agree);
* ``damage = ½ Σ_i F_A,i Δ_i²`` (the second-order term, always >= 0);
* ``predicted_increase = first_order + damage``;
* ``scale_free = Σ_i F_A,i Δ_i² / Σ_i Δ_i²``: the Fisher-weighted energy of B's step over
  its unweighted energy, a Rayleigh quotient of ``diag(F_A)`` in B's direction; it does
  not depend on ``η`` nor on the size of ``∇L_B``.

Any curvature: ``fisher_a`` may be any :class:`natgrad.Curvature` (Kronecker, low-rank,
...); then ``Σ_i F_A,i Δ_i²`` becomes ``quad_A(Δ) = Δᵀ F_A Δ`` (its off-diagonal curvature
included), per-layer values are ``quad_A`` of the step restricted to that module, and
``scale_free`` is the Rayleigh quotient ``Δᵀ F_A Δ / ΔᵀΔ``. For block-diagonal curvatures
(diagonal, Kronecker) the per-layer values sum to the total; a low-rank curvature's
cross-layer terms appear in the total only. A :class:`natgrad.DiagonalFisher` or dict
gives exactly the diagonal formulas above.

For a quadratic ``L_A`` whose Hessian is diagonal and equal to ``F_A``,
``predicted_increase`` is the exact increase; off-diagonal curvature is what the diagonal
leaves out. Per-layer values group parameters by module (the name up to its last dot).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard, cast

import torch
from torch import nn
from typing_extensions import Unpack

from natgrad.curvature.estimate import estimate_fisher
from natgrad.curvature.ops import check_curvature
from natgrad.curvature.protocol import Curvature
from natgrad.engine.batch import default_output_fn
from natgrad.engine.checks import (
    check_fisher_type,
    check_fixed_model,
    check_names_in,
    check_positive,
    check_same_structure,
)
from natgrad.engine.common import module_of
from natgrad.engine.deprecation import renamed_kwargs
from natgrad.engine.likelihoods import Likelihood, get_likelihood
from natgrad.engine.options import EstimatorOptions, LabelSource, Options, ParamSpec
from natgrad.engine.per_sample import mean_loss_grad, select_params
from natgrad.engine.report import Report

FisherLike = Mapping[str, torch.Tensor] | Curvature
"""A diagonal Fisher ``{name: tensor}`` or any :class:`natgrad.Curvature`."""

__all__ = [
    "DamageReport",
    "AsymmetryReport",
    "fisher_weighted_damage",
    "fisher_damage_asymmetry",
]


@dataclass
class DamageReport(Report):
    """Expected effect on task A's loss of one SGD step of size ``lr`` on task B.

    Attributes:
        damage: ``½ Σ_i F_A,i Δ_i²`` with ``Δ = -lr ∇L_B`` (second-order increase).
        scale_free: ``Σ_i F_A,i Δ_i² / Σ_i Δ_i²`` (independent of ``lr``); NaN if ``Δ = 0``.
        first_order: ``∇L_A · Δ``.
        predicted_increase: ``first_order + damage``.
        step_sq_norm: ``Σ_i Δ_i²``.
        lr: the step size ``η``.
        per_layer: ``{module: ½ Δ_mᵀ F_mm Δ_m}``, the damage of the module's own step
            alone; it sums to ``damage`` for block-diagonal curvatures (diagonal, K-FAC,
            EKFAC). A coupled curvature (low-rank) also holds cross terms between
            modules, which ``damage`` includes and no module's entry does.
        per_layer_first_order: ``{module: ∇L_A · Δ}`` restricted to that module.
        per_layer_scale_free: ``{module: Σ F Δ² / Σ Δ²}`` within that module.
        labels: label source of ``F_A``; n_samples_a / n_samples_b: batch sizes.
    """

    damage: float
    scale_free: float
    first_order: float
    predicted_increase: float
    step_sq_norm: float
    lr: float
    per_layer: dict[str, float] = field(default_factory=dict)
    per_layer_first_order: dict[str, float] = field(default_factory=dict)
    per_layer_scale_free: dict[str, float] = field(default_factory=dict)
    labels: str = "empirical"
    n_samples_a: int = 0
    n_samples_b: int = 0


@dataclass
class AsymmetryReport(Report):
    """Damage in both directions between two tasks (``first`` and ``second``).

    Attributes:
        names: the two task names, in argument order.
        damage_to_first: damage to the first task by a step on the second.
        damage_to_second: damage to the second task by a step on the first.
        ratio: ``damage_to_first / damage_to_second`` (inf when only the second is 0,
            1 when both are 0).
        log_ratio: ``log(damage_to_first) - log(damage_to_second)``; antisymmetric: it
            flips sign when the arguments are swapped.
        scale_free_log_ratio: the same for the scale-free forms.
        more_fragile: the name of the task that is damaged more, or ``"equal"``.
        first, second: the two full :class:`DamageReport` s (to first, to second).
    """

    names: tuple[str, str]
    damage_to_first: float
    damage_to_second: float
    ratio: float
    log_ratio: float
    scale_free_log_ratio: float
    more_fragile: str
    first: DamageReport
    second: DamageReport


def _names(
    model: nn.Module, fisher: FisherLike | None, params: ParamSpec, what: str = "fisher_a"
) -> list[str]:
    """The parameter names the damage covers: ``fisher``'s (checked) or ``params``'."""
    if fisher is None:
        return list(select_params(model, params))
    if params is not None:  # it would be ignored: the given Fisher's names decide
        raise ValueError(
            f"params= chooses the parameters of an estimated Fisher, but {what} was given, "
            f"and its names decide which parameters count. Drop params=, or pass {what} "
            "over those parameters only (a dict of them, or curvature.restrict(names))."
        )
    if _structured(fisher):
        return check_curvature(fisher, model, what)
    check_fisher_type(fisher, what)
    diag = cast(Mapping[str, torch.Tensor], fisher)  # checked above: a mapping
    named = dict(model.named_parameters())
    check_names_in(diag, named, what)
    check_same_structure(dict(diag), {k: named[k] for k in diag}, what, "the model")
    if not len(diag):
        raise ValueError(f"{what} is empty: it covers no parameters.")
    return list(diag)


def fisher_weighted_damage(
    model: nn.Module,
    task_a_batch: Any,
    task_b_batch: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    lr: float = 1.0,
    fisher_a: FisherLike | None = None,
    **options: Unpack[EstimatorOptions],
) -> DamageReport:
    """Expected increase of task A's loss after one SGD step on task B.

    ``Δ = -lr ∇L_B`` with ``∇L_B`` the mean gradient of B's per-sample NLL over
    ``task_b_batch``; ``damage = ½ Σ_i F_A,i Δ_i²``, ``first_order = ∇L_A · Δ``,
    ``scale_free = Σ_i F_A,i Δ_i² / Σ_i Δ_i²`` (see the module docstring for the
    conventions: mean losses, per-sample-mean Fisher ≈ Hessian of the mean loss).

    Args:
        model: the model (not modified; its train/eval mode is used as is).
        task_a_batch: task A's batch with labels (for ``∇L_A``, and for ``F_A`` unless given).
        task_b_batch: task B's batch with labels (for ``∇L_B``).
        likelihood: name or :class:`natgrad.engine.likelihoods.Likelihood`, used for both tasks.
        lr: the SGD step size ``η > 0``.
        fisher_a: task A's Fisher (a diagonal one, or any :class:`natgrad.Curvature`,
            used through ``quad``); when None a diagonal Fisher is estimated from
            ``task_a_batch`` with :func:`natgrad.estimate_fisher`. Its names decide
            which parameters count.
        **options: the estimator options (:class:`natgrad.EstimatorOptions`) for
            estimating ``F_A`` when ``fisher_a`` is None (``labels``, ``mc_samples``,
            ``params``: the parameters to cover, ...); ``output_fn`` also maps the model's
            outputs for both gradients. ``params`` with a given ``fisher_a`` is refused
            (it would be ignored).

    Returns:
        :class:`DamageReport` (floats; per-layer dicts keyed by module name).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``fisher_a`` is not a mapping.
        ValueError: a batch without labels, bad ``lr`` / labels, a ``fisher_a`` whose
            names or shapes differ from the model's, ``params`` with a given ``fisher_a``,
            or a random / batch-mixing model
            (train-mode dropout or BatchNorm: call ``model.eval()``; the damage is a
            curvature estimate and needs a deterministic model).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> a = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> b = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> r = fisher_weighted_damage(model, a, b, lr=0.1)
        >>> r.damage >= 0, sorted(r.per_layer)
        (True, ['bias', 'weight'])
    """
    check_fixed_model(model, "fisher_weighted_damage")
    lr = check_positive("lr", lr)
    opts = Options.resolve("fisher_weighted_damage", options)
    lik = get_likelihood(likelihood)
    output_fn = opts.output_fn or default_output_fn
    names = _names(model, fisher_a, opts.params)
    fisher_a = _fisher_or_estimate(model, task_a_batch, lik, fisher_a, names, opts)
    g_a, n_a = mean_loss_grad(
        model, task_a_batch, lik, names, output_fn=output_fn, what="task_a_batch"
    )
    g_b, n_b = mean_loss_grad(
        model, task_b_batch, lik, names, output_fn=output_fn, what="task_b_batch"
    )
    return _damage(fisher_a, g_a, g_b, n_a, n_b, lr, opts.labels)


def _fisher_or_estimate(
    model: nn.Module,
    batch: Any,
    lik: Likelihood,
    fisher: FisherLike | None,
    names: list[str],
    opts: Options,
) -> FisherLike:
    """``fisher`` itself, or the Fisher of ``names`` estimated on ``batch`` when it is None."""
    if fisher is not None:
        return fisher
    return estimate_fisher(model, batch, lik, **{**opts.keywords(), "params": names})


def _damage(
    fisher_a: FisherLike,
    g_a: Mapping[str, torch.Tensor],
    g_b: Mapping[str, torch.Tensor],
    n_a: int,
    n_b: int,
    lr: float,
    labels: LabelSource,
) -> DamageReport:
    """The report for ``Δ = -lr g_b`` over the parameters of ``fisher_a`` (grads given)."""
    weighted: dict[str, float] = {}
    energy: dict[str, float] = {}
    first: dict[str, float] = {}
    structured = _structured(fisher_a)
    total_quad = None
    if _structured(fisher_a):
        step = {k: -lr * g_b[k] for k in fisher_a.names()}
        total_quad = float(fisher_a.quad(step))
        for mod in dict.fromkeys(module_of(k) for k in step):
            part = {k: v for k, v in step.items() if module_of(k) == mod}
            weighted[mod] = float(fisher_a.quad(part))
        keys: list[str] = list(fisher_a.names())
    else:
        diag = cast(Mapping[str, torch.Tensor], fisher_a)  # not structured: a mapping
        keys = list(diag)
    for k in keys:
        if structured:
            d = -lr * g_b[k]
            mod = module_of(k)
            energy[mod] = energy.get(mod, 0.0) + float((d * d).sum())
            first[mod] = first.get(mod, 0.0) + float((g_a[k] * d).sum())
            continue
        d = -lr * g_b[k]
        f = torch.as_tensor(diag[k]).to(device=d.device, dtype=d.dtype)
        mod = module_of(k)
        weighted[mod] = weighted.get(mod, 0.0) + float((f * d * d).sum())
        energy[mod] = energy.get(mod, 0.0) + float((d * d).sum())
        first[mod] = first.get(mod, 0.0) + float((g_a[k] * d).sum())
    total_w, total_e = sum(weighted.values()), sum(energy.values())
    if total_quad is not None:
        total_w = total_quad  # includes cross-layer terms a low-rank curvature holds
    damage = 0.5 * total_w
    first_order = sum(first.values())
    return DamageReport(
        damage=damage,
        scale_free=total_w / total_e if total_e > 0 else math.nan,
        first_order=first_order,
        predicted_increase=first_order + damage,
        step_sq_norm=total_e,
        lr=lr,
        per_layer={m: 0.5 * w for m, w in weighted.items()},
        per_layer_first_order=first,
        per_layer_scale_free={
            m: (weighted[m] / energy[m] if energy[m] > 0 else math.nan) for m in weighted
        },
        labels=str(getattr(fisher_a, "labels", labels)),
        n_samples_a=n_a,
        n_samples_b=n_b,
    )


def _structured(fisher: object) -> TypeGuard[Curvature]:
    """A curvature other than a plain diagonal mapping: use its ``quad``."""
    return isinstance(fisher, Curvature) and not isinstance(fisher, Mapping)


def _log_ratio(a: float, b: float) -> float:
    if a == b:  # includes both zero
        return 0.0
    if b == 0:
        return math.inf
    if a == 0:
        return -math.inf
    return math.log(a) - math.log(b)


@renamed_kwargs(
    {
        "math_batch": "task_a_batch",
        "general_batch": "task_b_batch",
        "fisher_math": "fisher_a",
        "fisher_general": "fisher_b",
    }
)
def fisher_damage_asymmetry(
    model: nn.Module,
    task_a_batch: Any,
    task_b_batch: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    lr: float = 1.0,
    fisher_a: FisherLike | None = None,
    fisher_b: FisherLike | None = None,
    names: tuple[str, str] = ("A", "B"),
    **options: Unpack[EstimatorOptions],
) -> AsymmetryReport:
    """Damage in both directions between two tasks, and which one is more fragile.

    ``damage_to_first = ½ Σ F_first (lr ∇L_second)²`` and
    ``damage_to_second = ½ Σ F_second (lr ∇L_first)²`` (see
    :func:`fisher_weighted_damage`); ``log_ratio = log damage_to_first - log
    damage_to_second`` is antisymmetric and, like ``ratio``, independent of ``lr``.

    Args:
        model: the model (not modified).
        task_a_batch: the first task's labelled batch (was ``math_batch``, deprecated).
        task_b_batch: the second task's labelled batch (was ``general_batch``, deprecated).
        likelihood: as in :func:`fisher_weighted_damage`.
        lr: as in :func:`fisher_weighted_damage`.
        fisher_a: the first task's Fisher (estimated from ``task_a_batch`` when None).
        fisher_b: the second task's Fisher (estimated when None).
        names: names of the first and second task, used in ``more_fragile``.
        **options: as in :func:`fisher_weighted_damage`.

    Returns:
        :class:`AsymmetryReport`.

    Raises:
        ValueError: as :func:`fisher_weighted_damage`; two equal ``names``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> a = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> b = (3 * torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> r = fisher_damage_asymmetry(model, a, b)
        >>> r.more_fragile in ("A", "B")
        True
    """
    check_fixed_model(model, "fisher_damage_asymmetry")
    names = (str(names[0]), str(names[1]))
    if names[0] == names[1]:
        raise ValueError(f"names must differ, got {names}; e.g. names=('math', 'general').")
    lr = check_positive("lr", lr)
    opts = Options.resolve("fisher_damage_asymmetry", options)
    lik = get_likelihood(likelihood)
    output_fn = opts.output_fn or default_output_fn
    # each task's Fisher and mean gradient once, shared by the two directions
    names1 = _names(model, fisher_a, opts.params, "fisher_a")
    names2 = _names(model, fisher_b, opts.params, "fisher_b")
    f1 = _fisher_or_estimate(model, task_a_batch, lik, fisher_a, names1, opts)
    f2 = _fisher_or_estimate(model, task_b_batch, lik, fisher_b, names2, opts)
    both = list(dict.fromkeys(names1 + names2))
    g1, n1 = mean_loss_grad(model, task_a_batch, lik, both, output_fn=output_fn, what="task_a_batch")
    g2, n2 = mean_loss_grad(
        model, task_b_batch, lik, both, output_fn=output_fn, what="task_b_batch"
    )
    to_first = _damage(f1, g1, g2, n1, n2, lr, opts.labels)
    to_second = _damage(f2, g2, g1, n2, n1, lr, opts.labels)
    d1, d2 = to_first.damage, to_second.damage
    lr_ = _log_ratio(d1, d2)
    ratio = 1.0 if d1 == d2 else (math.inf if d2 == 0 else d1 / d2)
    return AsymmetryReport(
        names=names,
        damage_to_first=d1,
        damage_to_second=d2,
        ratio=ratio,
        log_ratio=lr_,
        scale_free_log_ratio=_log_ratio(to_first.scale_free, to_second.scale_free),
        more_fragile=names[0] if d1 > d2 else (names[1] if d2 > d1 else "equal"),
        first=to_first,
        second=to_second,
    )
