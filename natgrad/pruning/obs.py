"""Optimal Brain Surgeon pruning on any curvature: OBS saliency and the weight update.

With the loss near a minimum modelled by the quadratic ``½ δᵀ (F + λI) δ`` (``F`` a
:class:`~natgrad.Curvature`, ``λ`` a damping), removing weight ``q`` (forcing
``θ_q + δ_q = 0``) at the least cost gives (Hassibi and Stork, 1993)

* cost (saliency) ``s_q = θ_q² / (2 [(F + λI)⁻¹]_qq)``, from ``inverse_diagonal(λ)``;
* update ``δθ = −θ_q (F + λI)⁻¹ e_q / [(F + λI)⁻¹]_qq`` of every other weight.

Removing a set ``Q`` at once (``E`` its columns of the identity, ``H = F + λI``):

    ``δθ = −H⁻¹ E (Eᵀ H⁻¹ E)⁻¹ Eᵀ θ``,  predicted increase ``½ θ_Qᵀ (Eᵀ H⁻¹ E)⁻¹ θ_Q``.

Two ways to compute it, equal in exact arithmetic (block elimination / Schur complement):

* ``"exact"``: ``|Q|`` solves ``H⁻¹ e_q`` through ``curvature.solve`` and one dense
  ``|Q| × |Q|`` system (for small removal sets; any curvature);
* ``"cg"``: the kept weights ``K`` solve ``H_KK δ_K = −H_KQ δ_Q = F_KQ θ_Q`` (the
  minimiser of the quadratic with ``δ_Q = −θ_Q`` fixed) by conjugate gradients on
  ``curvature.mv``, with a Jacobi preconditioner. For a diagonal ``F``, ``F_KQ = 0`` and
  the kept weights do not move (OBS-diag ranks by ``θ² (F + λ) / 2``); for Kronecker
  and low-rank curvatures they move with the correlations ``F`` holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from natgrad.curvature.kronecker import KroneckerFisher
from natgrad.curvature.ops import check_curvature, conjugate_gradient, dict_dot, warn_unconverged
from natgrad.curvature.protocol import Curvature
from natgrad.engine.checks import check_choice, check_fraction, check_int, check_positive
from natgrad.engine.common import acc_dtype
from natgrad.engine.likelihoods import get_likelihood
from natgrad.engine.options import LABEL_SOURCES
from natgrad.engine.report import Report
from natgrad.pruning.masks import apply_masks
from natgrad.pruning.prune import prune_candidates
from natgrad.pruning.pruned import pruned_names

__all__ = ["ObsReport", "obs_prune", "obs_saliency"]

UPDATE_METHODS = ("auto", "exact", "cg", "none")
#: the largest ``|Q| · P`` for which ``method="auto"`` builds ``H⁻¹ E`` densely
EXACT_MAX_FLOATS = 2**24


@dataclass
class ObsReport(Report):
    """What :func:`obs_prune` did.

    Attributes:
        target_sparsity: the fraction of candidate weights asked to be removed.
        sparsity: the fraction actually removed (over the candidates).
        n_removed / n_candidates: counts over the candidate tensors.
        per_layer_sparsity: ``{name: fraction removed}`` per candidate tensor.
        predicted_increase: ``½ δᵀ (F + λI) δ`` of the last round's update (the
            quadratic model's loss increase; with ``method="none"``, of ``δ = −θ_Q``).
        damping: ``λ``.
        method: the update method used in the last round (``"exact"``, ``"cg"``, ``"none"``).
        rounds: number of prune rounds.
        cg_iterations / cg_residual: last round's conjugate-gradient count and relative
            residual (0 when not used).
        masks: ``{name: bool keep-mask}`` applied through ``torch.nn.utils.prune``.
    """

    target_sparsity: float
    sparsity: float
    n_removed: int
    n_candidates: int
    per_layer_sparsity: dict[str, float]
    predicted_increase: float
    damping: float
    method: str
    rounds: int
    cg_iterations: int = 0
    cg_residual: float = 0.0
    masks: dict[str, torch.Tensor] = field(default_factory=dict)


def obs_saliency(
    model: nn.Module, curvature: Curvature, *, damping: float | None = None
) -> dict[str, torch.Tensor]:
    """The OBS cost ``s_q = θ_q² / (2 [(F + λI)⁻¹]_qq)`` of removing each weight alone.

    Args:
        model: the model (not modified).
        curvature: any :class:`natgrad.Curvature` over the model's parameters.
        damping: ``λ >= 0`` (default: ``1e-2 ×`` the mean of ``diag F``, see :func:`obs_prune`).

    Returns:
        ``{name: tensor}`` for every covered parameter, float32 (float64 for float64 models).

    Raises:
        ValueError: a :class:`natgrad.KroneckerFisher` with masked blocks (layers pruned
            by ``torch.nn.utils.prune``): the OBS cost of a kept weight needs
            ``[(F_KK + λI)⁻¹]_qq`` over the kept set ``K``, which has no Kronecker form
            (the block's ``inverse_diagonal`` is of its masked-projection solve, zero at
            the pruned entries).

    Example:
        >>> import torch, natgrad
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> _ = model.weight.data.copy_(torch.tensor([[1.0, 2.0]]))
        >>> F = natgrad.DiagonalFisher({"weight": torch.tensor([[4.0, 1.0]])}, 1)
        >>> obs_saliency(model, F, damping=0.0)["weight"]  # θ² F / 2 for a diagonal F
        tensor([[2., 2.]])
    """
    names = check_curvature(curvature, model)
    masked = curvature.masked_names() if isinstance(curvature, KroneckerFisher) else []
    if masked:
        raise ValueError(
            f"obs_saliency: the curvature holds masked Kronecker blocks of layers pruned by "
            f"torch.nn.utils.prune ({masked[:8]}): the OBS cost of a kept weight needs "
            "[(F_KK + λI)⁻¹]_qq over the kept entries K, which has no Kronecker form (the "
            "block's inverse_diagonal is of its masked projection, zero at pruned entries). "
            "Use kind='diag' or 'lowrank' on the pruned model, or natgrad.make_permanent("
            "model) and re-estimate (the pruned weights are then zeros of the curvature)."
        )
    lam = _damping(curvature, damping)
    named = dict(model.named_parameters())
    inv = curvature.inverse_diagonal(lam)
    out = {}
    for k in names:
        p = named[k].detach()
        dt = acc_dtype(p.dtype)
        out[k] = p.to(dt) ** 2 / (2 * inv[k].to(device=p.device, dtype=dt))
    return out


def obs_prune(
    model: nn.Module,
    curvature: Curvature,
    sparsity: float,
    *,
    scope: Literal["global", "layer"] = "global",
    rounds: int = 1,
    data: Any = None,
    likelihood: Any = None,
    estimate_options: Mapping[str, Any] | None = None,
    prune: Literal["weights", "all"] | Sequence[str] = "weights",
    min_keep_per_layer: int | float = 0.01,
    damping: float | None = None,
    method: Literal["auto", "exact", "cg", "none"] = "auto",
    cg_iters: int = 300,
    cg_tol: float = 1e-5,
) -> ObsReport:
    """Prune ``model`` IN PLACE by Optimal Brain Surgeon with any curvature.

    Each round removes the weights with the smallest OBS saliency
    ``θ_q² / (2 [(F + λI)⁻¹]_qq)`` and moves the kept ones by the joint OBS update
    ``δθ = −H⁻¹ E (Eᵀ H⁻¹ E)⁻¹ Eᵀ θ`` (``H = F + λI``; see the module docstring for the
    ``"exact"`` and ``"cg"`` computations). Weights removed in earlier rounds stay at
    zero (they are part of ``Q`` with ``θ_q = 0``). Finally the masks are applied with
    ``torch.nn.utils.prune.custom_from_mask`` (``weight_orig`` holds the updated values,
    ``weight_mask`` the keep-mask), as :func:`natgrad.apply_masks` does.

    Gradual schedule (``rounds = k > 1``): round ``r`` targets sparsity ``s · r / k``,
    and before rounds 2..k the curvature is re-estimated on ``data`` at the current
    weights with ``type(curvature).estimate(model, data, likelihood, **estimate_options)``
    (same kind; it must cover the same names). The label source, the likelihood and a
    low-rank curvature's ``rank`` default to those the curvature records, so every round
    estimates the same quantity; a likelihood whose name does not say everything
    (``"gaussian"``'s ``σ``, ``"token_categorical"``'s ``shift``, a custom one) must be
    passed as ``likelihood=``.

    Allocation: with ``scope="global"`` all candidates are ranked together; with
    ``"layer"`` each tensor loses ``round(s · n)`` of its ``n`` weights. Either way each
    tensor keeps at least ``min_keep_per_layer`` weights (an int: a count; a float in
    ``(0, 1)``: that fraction of the tensor, rounded up, and at least 1), its most
    salient ones, so no layer is emptied; the global count stays exact (the next least
    salient weights elsewhere go instead), and a ValueError says when that is impossible.

    Damping: ``λ`` defaults to ``10⁻² · mean(diag F)`` (it regularises ``H``; for a
    low-rank or Kronecker ``F`` of ``N < P`` samples ``F`` alone is singular).

    Args:
        model: the model (MODIFIED: values updated, masks applied). It must not already
            be pruned on the candidate tensors (``natgrad.make_permanent`` first).
        curvature: any :class:`natgrad.Curvature` covering the candidate tensors; the
            update moves every covered parameter (biases included).
        sparsity: fraction of candidate weights to remove, in ``[0, 1)``.
        scope: ``"global"`` or ``"layer"``.
        rounds: ``k >= 1`` prune rounds; ``k > 1`` needs ``data``.
        data: a batch or iterable of batches for re-estimating the curvature.
        likelihood: passed to the re-estimation (default: the curvature's, see above).
        estimate_options: passed to the re-estimation (``labels`` and a low-rank
            ``rank`` default to the curvature's).
        prune: candidates: ``"weights"`` (covered tensors with ``dim >= 2``), ``"all"``,
            or a list of names.
        min_keep_per_layer: least weights each candidate tensor keeps (int or fraction).
        damping: ``λ >= 0`` or None (relative default above).
        method: ``"auto"`` (``"exact"`` when ``|Q| · P <= 2²⁴``, else ``"cg"``),
            ``"exact"``, ``"cg"``, or ``"none"`` (masks only, no update).
        cg_iters: conjugate-gradient budget (matrix-vector products).
        cg_tol: conjugate-gradient relative residual.

    Returns:
        :class:`ObsReport`.

    Raises:
        TypeError: ``curvature`` is not a :class:`natgrad.Curvature`.
        ValueError: bad arguments, names or shapes that differ from the model, an
            already-pruned candidate, ``rounds > 1`` without ``data``, a re-estimated
            curvature covering other names, or a sparsity ``min_keep_per_layer`` forbids.
        FloatingPointError: a non-finite update (a singular ``H``: raise ``damping``).

    Warns:
        UserWarning: ``method="cg"`` stopped above ``cg_tol``: the update is approximate.

    Example:
        >>> import torch, natgrad
        >>> model = torch.nn.Linear(4, 2)
        >>> F = natgrad.DiagonalFisher({k: torch.ones_like(p) for k, p in model.named_parameters()}, 8)
        >>> r = natgrad.obs_prune(model, F, 0.5, min_keep_per_layer=1)
        >>> r.n_removed, int((model.weight == 0).sum())
        (4, 4)
    """
    sparsity = check_fraction("sparsity", sparsity)
    check_choice("scope", scope, ("global", "layer"))
    check_choice("method", method, UPDATE_METHODS)
    rounds = check_int("rounds", rounds, 1)
    cg_iters = check_int("cg_iters", cg_iters, 1)
    cg_tol = check_positive("cg_tol", cg_tol)
    if rounds > 1 and data is None:
        raise ValueError(
            f"rounds={rounds} re-estimates the curvature between rounds and needs data=: "
            "pass a batch or iterable of batches, or use rounds=1."
        )
    names = check_curvature(curvature, model)
    if rounds > 1:
        likelihood = _reestimate_likelihood(curvature, likelihood)
    named = dict(model.named_parameters())
    cands = prune_candidates(
        {k: named[k].shape for k in names}, prune, "the curvature", "Pass covered parameter names."
    )
    _check_not_pruned(model, cands)
    keep_min = {k: _min_keep(min_keep_per_layer, named[k].numel()) for k in cands}
    removed = {k: torch.zeros(named[k].shape, dtype=torch.bool, device=named[k].device)
               for k in cands}
    n_total = sum(named[k].numel() for k in cands)
    last: dict[str, Any] = {}
    for r in range(1, rounds + 1):
        if r > 1:
            curvature = _reestimate(curvature, model, data, likelihood, estimate_options, names)
        lam = _damping(curvature, damping)
        target = sparsity * r / rounds
        sal = obs_saliency(model, curvature, damping=lam)
        removed = _select(sal, removed, cands, target, scope, keep_min, n_total)
        last = _update(model, curvature, names, removed, lam, method, cg_iters, cg_tol)
    masks = {k: ~removed[k] for k in cands}
    with torch.no_grad():
        for k in cands:
            named[k].mul_(masks[k].to(named[k].dtype))
    apply_masks(model, masks)
    n_removed = sum(int(v.sum()) for v in removed.values())
    return ObsReport(
        target_sparsity=sparsity,
        sparsity=n_removed / n_total,
        n_removed=n_removed,
        n_candidates=n_total,
        per_layer_sparsity={k: float(removed[k].float().mean()) for k in cands},
        predicted_increase=last["increase"],
        damping=last["damping"],
        method=last["method"],
        rounds=rounds,
        cg_iterations=last["cg_iterations"],
        cg_residual=last["cg_residual"],
        masks=masks,
    )


# -- pieces ----------------------------------------------------------------------------------


def _damping(curvature: Curvature, damping: float | None) -> float:
    if damping is not None:
        return check_positive("damping", damping, allow_zero=True)
    diag = curvature.diagonal()
    total = sum(float(v.double().sum()) for v in diag.values())
    count = sum(v.numel() for v in diag.values())
    lam = 1e-2 * total / max(count, 1)
    if not lam > 0:
        raise ValueError(
            "The curvature's diagonal is zero everywhere, so the default damping "
            "(1e-2 × mean diag F) is 0; pass damping= > 0 or estimate the curvature on data."
        )
    return lam


def _check_not_pruned(model: nn.Module, cands: list[str]) -> None:
    for k in cands:
        mod_name, _, attr = k.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        base = attr[: -len("_orig")] if attr.endswith("_orig") else attr
        if base in pruned_names(module):
            raise ValueError(
                f"{k!r} is already pruned by torch.nn.utils.prune; obs_prune updates the "
                "weights themselves. Call natgrad.make_permanent(model) (and re-estimate the "
                "curvature) first, or use rounds= for a gradual schedule."
            )


def _min_keep(spec: int | float, n: int) -> int:
    if isinstance(spec, bool):
        raise ValueError(f"Invalid min_keep_per_layer: {spec!r}; an int >= 0 or a float in (0, 1).")
    if isinstance(spec, int):
        return min(check_int("min_keep_per_layer", spec, 0), n)
    f = float(spec)
    if not 0 < f < 1:
        raise ValueError(
            f"Invalid min_keep_per_layer: {spec!r}; an int count >= 0 or a float fraction in (0, 1)."
        )
    return min(max(1, math.ceil(f * n)), n)


def _select(
    sal: Mapping[str, torch.Tensor],
    removed: Mapping[str, torch.Tensor],
    cands: list[str],
    target: float,
    scope: str,
    keep_min: Mapping[str, int],
    n_total: int,
) -> dict[str, torch.Tensor]:
    """The removal masks after this round: the old ones plus the least salient alive weights."""
    out = {k: v.clone() for k, v in removed.items()}
    if scope == "layer":
        for k in cands:
            n = removed[k].numel()
            want = min(int(target * n + 0.5), n - keep_min[k])
            _remove(out, {k: sal[k]}, {k: want - int(removed[k].sum())}, keep_min)
        return out
    want = int(target * n_total + 0.5)
    extra = want - sum(int(v.sum()) for v in removed.values())
    _remove(out, {k: sal[k] for k in cands}, extra, keep_min)
    return out


def _remove(
    out: dict[str, torch.Tensor],
    scores: Mapping[str, torch.Tensor],
    count: int | Mapping[str, int],
    keep_min: Mapping[str, int],
) -> None:
    """Mark ``count`` least salient alive, unprotected entries of ``scores`` as removed."""
    if isinstance(count, Mapping):
        count = sum(count.values())
    if count <= 0:
        return
    names = list(scores)
    flats, free = [], []
    for k in names:
        s = scores[k].detach().reshape(-1).double().cpu()
        dead = out[k].reshape(-1).cpu()
        alive = (~dead).nonzero().squeeze(1)
        protect = torch.zeros_like(dead)
        m = min(keep_min[k], alive.numel())
        if m:
            order = torch.sort(s[alive], descending=True, stable=True).indices[:m]
            protect[alive[order]] = True
        flats.append(s)
        free.append(~dead & ~protect)
    s_all = torch.cat(flats)
    f_all = torch.cat(free)
    idx = f_all.nonzero().squeeze(1)
    if count > idx.numel():
        raise ValueError(
            f"The sparsity asks to remove {count} more weights but only {idx.numel()} are "
            "neither removed nor protected by min_keep_per_layer; lower the sparsity or "
            "min_keep_per_layer."
        )
    chosen = idx[torch.sort(s_all[idx], stable=True).indices[:count]]
    flat_removed = torch.zeros_like(f_all)
    flat_removed[chosen] = True
    for k, part in zip(names, torch.split(flat_removed, [scores[k].numel() for k in names]), strict=True):
        out[k] |= part.reshape(out[k].shape).to(out[k].device)


def _update(
    model: nn.Module,
    curvature: Curvature,
    names: list[str],
    removed: Mapping[str, torch.Tensor],
    lam: float,
    method: str,
    cg_iters: int,
    cg_tol: float,
) -> dict[str, Any]:
    """Apply the joint OBS update for the removal set ``removed``; return its statistics."""
    named = dict(model.named_parameters())
    ref = named[names[0]]
    dt = acc_dtype(ref.dtype)
    theta = {k: named[k].detach().to(dt) for k in names}
    # u: the removed weights' values (δ_Q = −θ_Q), zero elsewhere
    u = {
        k: theta[k] * removed[k].to(dt) if k in removed else torch.zeros_like(theta[k])
        for k in names
    }
    k_q = sum(int(v.sum()) for v in removed.values())
    p_total = sum(v.numel() for v in theta.values())
    if method == "auto":
        method = "exact" if k_q * p_total <= EXACT_MAX_FLOATS else "cg"
    stats: dict[str, Any] = {"method": method, "damping": lam, "cg_iterations": 0, "cg_residual": 0.0}
    if k_q == 0:
        stats["increase"] = 0.0
        return stats
    if method == "none":
        delta = {k: -u[k] for k in names}
    elif method == "exact":
        delta = _exact_delta(curvature, theta, removed, lam, dt)
    else:
        keep = {k: (~removed[k]).to(dt) if k in removed else torch.ones_like(theta[k])
                for k in names}
        fu = curvature.mv(u)
        b = {k: fu[k].to(dt) for k in names}

        def op(v: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            fv = curvature.mv(v)
            return {k: fv[k].to(dt) + lam * v[k] for k in v}

        diag = curvature.diagonal()
        pre = {k: diag[k].to(device=theta[k].device, dtype=dt) + lam for k in names}
        if lam == 0:
            pre = {k: torch.where(v > 0, v, torch.ones_like(v)) for k, v in pre.items()}
        res = conjugate_gradient(op, b, precond=pre, mask=keep, max_iter=cg_iters, tol=cg_tol)
        warn_unconverged(
            res, cg_tol, "obs_prune's weight update",
            "raise cg_iters= or damping=, or pass method='exact'",
        )  # fmt: skip
        delta = {k: res.x[k] - u[k] for k in names}
        stats["cg_iterations"], stats["cg_residual"] = res.iterations, res.residual
    for k, v in delta.items():
        if not bool(torch.isfinite(v).all()):
            raise FloatingPointError(
                f"The OBS update of {k!r} is not finite: F + λI is (numerically) singular "
                f"at damping λ={lam:g}; pass a larger damping=."
            )
    with torch.no_grad():
        for k in names:
            new = theta[k] + delta[k]
            if k in removed:
                new = new.masked_fill(removed[k], 0.0)
            named[k].copy_(new.to(named[k].dtype))
    quad = float(curvature.quad(delta)) + lam * float(dict_dot(delta, delta))
    stats["increase"] = 0.5 * quad
    return stats


def _exact_delta(
    curvature: Curvature,
    theta: Mapping[str, torch.Tensor],
    removed: Mapping[str, torch.Tensor],
    lam: float,
    dt: torch.dtype,
) -> dict[str, torch.Tensor]:
    """``−H⁻¹ E (Eᵀ H⁻¹ E)⁻¹ Eᵀ θ`` by one ``solve`` per removed weight."""
    names = list(theta)
    shapes = {k: theta[k].shape for k in names}
    sizes = [theta[k].numel() for k in names]
    offsets = dict(zip(names, torch.tensor([0] + sizes[:-1]).cumsum(0).tolist(), strict=True))
    q_index = torch.cat([
        offsets[k] + removed[k].reshape(-1).nonzero().squeeze(1).cpu() for k in removed
    ])
    device = theta[names[0]].device
    cols = []
    for q in q_index.tolist():
        e = torch.zeros(sum(sizes), dtype=dt, device=device)
        e[q] = 1.0
        parts = dict(zip(names, torch.split(e, sizes), strict=True))
        sol = curvature.solve({k: parts[k].reshape(shapes[k]) for k in names}, lam)
        cols.append(torch.cat([sol[k].reshape(-1).to(dt) for k in names]))
    s = torch.stack(cols, 1).double()  # H⁻¹ E, (P, |Q|)
    m = s[q_index.to(device)]  # Eᵀ H⁻¹ E
    m = 0.5 * (m + m.T)
    flat_theta = torch.cat([theta[k].reshape(-1) for k in names]).double()
    coef = torch.linalg.solve(m, flat_theta[q_index.to(device)])
    flat = -(s @ coef)
    return {k: t.reshape(shapes[k]).to(dt) for k, t in zip(names, torch.split(flat, sizes), strict=True)}


def _reestimate_likelihood(curvature: Curvature, likelihood: Any) -> Any:
    """The likelihood of the re-estimations: the curvature's own when it is fully named
    by its name, else the one passed (whose name must match the curvature's)."""
    stored = getattr(curvature, "likelihood", None)
    if likelihood is None:
        if stored in (None, "categorical", "bernoulli"):
            return stored or "categorical"
        raise ValueError(
            f"rounds > 1 re-estimates the curvature, which was estimated with the "
            f"likelihood {stored!r}; its name does not carry its settings (sigma, shift, "
            "ignore_index, ...): pass likelihood= the one you estimated it with."
        )
    name = get_likelihood(likelihood).name
    if stored is not None and name != stored:
        raise ValueError(
            f"likelihood={name!r} differs from the curvature's {stored!r}: the rounds would "
            "estimate different curvatures; pass the likelihood you estimated it with."
        )
    return likelihood


def _reestimate(
    curvature: Curvature,
    model: nn.Module,
    data: Any,
    likelihood: Any,
    options: Mapping[str, Any] | None,
    names: Sequence[str],
) -> Curvature:
    """The same kind of curvature, estimated again at the current weights (with the
    curvature's own label source and low-rank ``rank`` unless ``options`` say otherwise)."""
    opts = dict(options or {})
    opts.setdefault("kind", curvature.kind or type(curvature).kind)
    labels = getattr(curvature, "labels", None)
    if labels in LABEL_SOURCES:
        opts.setdefault("labels", labels)
    if getattr(curvature, "rank", None) is not None:
        opts.setdefault("rank", curvature.rank)  # type: ignore[attr-defined]
    new: Curvature = type(curvature).estimate(model, data, likelihood, **opts)
    if list(new.names()) != list(names):
        raise ValueError(
            f"The re-estimated curvature covers {new.names()[:8]}, the first one "
            f"{names[:8]}; pass estimate_options= that select the same parameters "
            "(e.g. params=...)."
        )
    return new
