"""Fisher-weighted model merging: ``θ* = (Σ_m w_m F_m)⁻¹ Σ_m w_m F_m θ_m``.

Diagonal Fishers merge elementwise. Any other :class:`natgrad.Curvature` (Kronecker,
low-rank, ...) merges by solving the linear system, per layer exactly where that is cheap
and by conjugate gradients on ``mv`` otherwise (see :func:`fisher_weighted_merge`).
RegMean (Jin et al., 2023) is the Kronecker case with ``G = I``: each linear layer's
rows are merged with the input Gram matrices ``A_m`` alone (:func:`regmean_merge`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal, cast, get_args

import torch
from torch import nn

from natgrad.curvature.kfac import split_weight_blocks, weight_blocks
from natgrad.curvature.kronecker import KroneckerBlock, KroneckerFisher, eig_scale
from natgrad.curvature.lowrank import LowRankFisher
from natgrad.curvature.ops import check_curvature, conjugate_gradient, warn_unconverged
from natgrad.curvature.protocol import BLOCK_KINDS, Curvature
from natgrad.engine.checks import (
    check_all_finite,
    check_choice,
    check_finite,
    check_int,
    check_model_list,
    check_positive,
    check_same_structure,
)
from natgrad.engine.common import acc_dtype, psd_solve
from natgrad.pruning.pruned import deepcopy_model, mask_buffer_names, refresh_pruned

__all__ = ["fisher_weighted_merge", "regmean_merge"]

MergeMethod = Literal["auto", "dense", "cg"]
MERGE_METHODS: tuple[MergeMethod, ...] = get_args(MergeMethod)
MergePreconditioner = Literal["kronecker", "jacobi"]
MERGE_PRECONDITIONERS: tuple[MergePreconditioner, ...] = get_args(MergePreconditioner)

FisherLike = Mapping[str, torch.Tensor] | Curvature
"""A diagonal Fisher ``{name: tensor}`` or any :class:`natgrad.Curvature`."""
Vec = dict[str, torch.Tensor]


def fisher_weighted_merge(
    models: Sequence[nn.Module] | nn.Module,
    fishers: Sequence[FisherLike] | nn.Module,
    fisher_weights: Sequence[FisherLike] | None = None,
    *,
    weights: Sequence[float] | None = None,
    floor: float = 1e-8,
    normalize: bool = False,
    method: MergeMethod = "auto",
    dense_max: int = 2048,
    cg_iters: int = 500,
    cg_tol: float = 1e-8,
    preconditioner: MergePreconditioner = "kronecker",
    params: Iterable[str] | None = None,
) -> nn.Module:
    """Merge models by Fisher-weighted averaging into a NEW model (inputs untouched).

    For every parameter entry ``i``:
    ``θ*_i = Σ_m w_m F̃_m,i θ_m,i / Σ_m w_m F̃_m,i`` with ``F̃ = max(F, floor)``.
    Where the denominator is zero (every Fisher zero with ``floor=0``) the entry is the
    weighted mean ``Σ_m w_m θ_m,i``. Parameters that no Fisher covers get the weighted
    mean; floating buffers are averaged with the weights, other buffers (integer
    counters, bool flags, pruning ``*_mask`` buffers) are copied from the first model. The weights are rescaled to
    sum to one. ``normalize=True`` first divides each Fisher by its trace ``Σ_i F_m,i``
    (unit-trace Fishers: models then weigh equally overall, whatever their loss scale
    or number of samples); the floor applies after that.

    Structured curvatures (any :class:`natgrad.Curvature` that is not a plain diagonal
    mapping, e.g. Kronecker ``G ⊗ A`` or low-rank): the merge solves

        ``(Σ_m w_m F_m + ε I) θ* = Σ_m w_m F_m θ_m + ε θ̄``,   ``θ̄ = Σ_m w_m θ_m``,

    i.e. ``θ* = θ̄ + (Σ w F + εI)⁻¹ Σ_m w_m F_m (θ_m − θ̄)`` with ``ε = floor`` as a ridge:
    directions no Fisher sees keep the weighted mean (the diagonal path's fallback).
    Block-diagonal kinds (``"diag"``, ``"kfac"``, ``"ekfac"``) give one system per module;
    any other kind couples everything into one system. A system of at most ``dense_max``
    unknowns is solved exactly (``method="auto"`` or ``"dense"``: its matrix read off
    through ``mv`` on unit vectors (in the curvature's dtype), then a float64 Cholesky solve, or for a singular
    system (``ε = 0``) the minimum-norm solution from the symmetric pseudo-inverse, so
    directions no Fisher sees keep the weighted mean there too); larger ones
    by conjugate gradients on ``mv`` (``"cg"``) to relative residual ``cg_tol`` or
    ``cg_iters`` products (with ``ε = 0`` on a singular system, a preconditioned run
    solves it but need not return the minimum-norm solution: keep ``floor > 0`` there).
    "No Fisher sees" holds to the curvature's own precision: the factors of a float32
    curvature carry round-off of about ``1e-7`` times their scale in directions the exact
    Fisher does not see (a softmax head's shift of every logit), which the default
    ``ε = 1e-8`` does not outweigh, so such a direction moves (the merged head's bias
    sum 0.89 or -1.37 instead of the mean's 0.05 on a small MLP; the outputs, which the
    shift does not change, agree to 1e-8). Estimate the curvatures in float64 (a float64
    model), or raise ``floor`` to about ``1e-6`` times the curvatures' mean diagonal.

    Low-rank curvatures (every one a :class:`natgrad.LowRankFisher`, ``F_m = R_mᵀR_m/N_m``
    from its rows) are solved exactly by ``method="auto"``, whatever their size: with the
    stacked scaled rows ``Z = [√(w_m/N_m) R_m]`` (``R`` rows in all), the system is
    ``(ZᵀZ + εI) x = Zᵀ c`` with ``c_m = √(w_m/N_m) R_m (θ_m − θ̄)``, whose solution is
    ``x = Zᵀ (ZZᵀ + εI)⁺ c`` (push-through identity): one ``R x R`` float64 eigensolve
    (eigenvalues below ``R · eps · max`` count as zero, so ``ε = 0`` gives the
    minimum-norm solution), never a ``P x P`` matrix or an iteration. The Gram matrix
    squares the condition number of ``Z``: the solution is accurate to float64
    round-off while ``cond(Z)² ≪ 1/(R · eps)`` (singular values of ``Z`` within about
    ``10⁻⁶`` of the largest); with ``ε = 0``, directions below that are dropped, so an
    ill-conditioned minimum-norm merge needs ``floor > 0`` (as ``method="dense"`` does).

    The conjugate-gradient preconditioner (``preconditioner=``): ``"kronecker"`` uses, on a
    layer that every curvature holds as one Kronecker block (K-FAC or EKFAC factors
    ``G_m``, ``A_m``), the inverse of ``Ḡ ⊗ Ā + εI`` with ``Ḡ = Σ_m w_m G_m``,
    ``Ā = Σ_m w_m A_m`` (weights summing to one), applied through the eigenbases of ``Ḡ``
    and ``Ā``. Since ``Σ_m w_m G_m ⊗ A_m − Ḡ ⊗ Ā = ½ Σ_{m,n} w_m w_n (G_m − G_n) ⊗ (A_m − A_n)``,
    it is exact when all ``A_m`` or all ``G_m`` are equal (one iteration); elsewhere
    (other kinds, mixed blocks) and with ``"jacobi"`` it is the diagonal
    ``ε + Σ_m w_m diag F_m``.

    Two call forms:

    * ``fisher_weighted_merge([m1, m2, ...], [F1, F2, ...])``;
    * the two-model form ``fisher_weighted_merge(m1, m2, (F1, F2))``: when the first
      argument is a module, the second must be the other module and the third (or
      ``fisher_weights=``) the pair of Fishers.

    Args:
        models: models of one architecture (same parameter and buffer names and shapes).
            Models pruned by ``torch.nn.utils.prune`` are merged on their ``*_orig``
            parameters and the merge keeps the first model's ``*_mask`` buffers.
        fishers: one Fisher per model, ``{parameter name: F}`` (e.g. DiagonalFisher),
            all covering the same names.
        fisher_weights: the Fishers in the two-model form.
        weights: ``w_m >= 0`` (default equal); at least one must be positive.
        floor: ``ε >= 0``, the least value of every Fisher entry.
        normalize: use unit-trace Fishers.
        method: structured curvatures: ``"auto"``, ``"dense"`` or ``"cg"`` (see above).
        dense_max: the largest system solved densely by ``"auto"``.
        cg_iters: conjugate-gradient budget (matrix-vector products).
        cg_tol: conjugate-gradient relative residual.
        preconditioner: ``"kronecker"`` or ``"jacobi"`` (see above).
        params: merge only these parameter names (each in every model, of one shape):
            the other parameters, and the buffers whose names or shapes differ between
            the models, keep ``models[0]``'s values; the Fishers are read on ``params``
            only (a structured curvature through ``Curvature.restrict``: whole blocks).
            For fine-tunes with different heads: the names outside the head. Default:
            every parameter (the models must then have the same names and shapes).

    Returns:
        A deep copy of ``models[0]`` holding the merged parameters and buffers.

    Raises:
        ValueError: parameter names or shapes differ between models (named, with the
            ``params=`` that merges the parameters they share); ``params`` empty, or
            naming a parameter some model lacks or whose shapes differ; Fishers that
            do not match the models, counts that disagree, bad weights or floor, or an
            all-zero Fisher with ``normalize=True``, an empty ``models``.
        TypeError: a two-model call whose second argument is not a module; ``models``
            not a list, or an entry that is not an ``nn.Module``.

    Warns:
        UserWarning: conjugate gradients stopped above ``cg_tol`` (the layer is named):
            the merged values are approximate.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = a.weight.fill_(1.0), b.weight.fill_(4.0)
        >>> Fa, Fb = {"weight": torch.tensor([[3.0]])}, {"weight": torch.tensor([[1.0]])}
        >>> fisher_weighted_merge([a, b], [Fa, Fb]).weight.item()  # (3*1 + 1*4) / 4
        1.75
        >>> fisher_weighted_merge(a, b, (Fa, Fb)).weight.item()
        1.75
    """
    models, fishers = _dispatch(models, fishers, fisher_weights)
    w = _weights(weights, len(models))
    floor = check_positive("floor", floor, allow_zero=True)
    keep = _check_models(models, params, restrictable=True)
    if keep is not None:
        fishers = [_restrict(f, keep, i) for i, f in enumerate(fishers)]
    if any(isinstance(f, Curvature) and not isinstance(f, Mapping) for f in fishers):
        check_choice("method", method, MERGE_METHODS)
        dense_max = check_int("dense_max", dense_max, 0)
        cg_iters = check_int("cg_iters", cg_iters, 1)
        cg_tol = check_positive("cg_tol", cg_tol)
        check_choice("preconditioner", preconditioner, MERGE_PRECONDITIONERS)
        return _curvature_merge(
            models, fishers, w, floor, normalize, method, dense_max, cg_iters, cg_tol,
            preconditioner, keep,
        )
    fishers = _check_fishers(fishers, models[0], normalize)

    merged = deepcopy_model(models[0])
    named = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, target in merged.named_parameters():
            if keep is not None and name not in keep:
                continue  # models[0]'s value
            thetas = [p[name].detach() for p in named]
            if name in fishers[0]:
                value = _fisher_mean(thetas, [f[name] for f in fishers], w, floor)
            else:
                value = _mean(thetas, w)
            target.copy_(value.to(target.dtype))
        _average_buffers(merged, models, w, keep)
    return merged


def _average_buffers(
    merged: nn.Module, models: Sequence[nn.Module], w: list[float], keep: set[str] | None = None
) -> None:
    """The merged model's floating buffers (BatchNorm statistics, ...) as the models'
    weighted mean, pruning masks left as they are; then the pruned tensors recomputed.

    With ``keep`` (``params=``), a buffer of a module whose parameters are all left out
    (a head's BatchNorm statistics) keeps ``models[0]``'s value, as its parameters do
    (see :func:`_merged_module`); so does a buffer whose name or shape differs between
    the models."""
    buffers = [dict(m.named_buffers()) for m in models]
    masks = mask_buffer_names(merged)
    for name, buf in merged.named_buffers():
        if any(name not in b or b[name].shape != buf.shape for b in buffers):
            continue  # differs between the models (with params=): models[0]'s value
        if keep is not None and not _merged_module(merged, name, keep):
            continue  # its module is not merged: models[0]'s value
        if name not in masks and (buf.is_floating_point() or buf.is_complex()):
            buf.copy_(_mean([b[name].detach() for b in buffers], w).to(buf.dtype))
    refresh_pruned(merged)


def _dispatch(
    models: Sequence[nn.Module] | nn.Module,
    fishers: Sequence[FisherLike] | nn.Module,
    fisher_weights: Sequence[FisherLike] | None,
) -> tuple[list[nn.Module], list[FisherLike]]:
    if isinstance(models, nn.Module):
        if not isinstance(fishers, nn.Module):
            raise TypeError(
                "Two-model form: fisher_weighted_merge(model1, model2, (fisher1, fisher2)); "
                f"the second argument must be a module, got {type(fishers).__name__}. Or "
                "pass lists: fisher_weighted_merge([model1, model2], [fisher1, fisher2])."
            )
        if fisher_weights is None:
            raise ValueError(
                "Two-model form needs the Fishers: fisher_weighted_merge(model1, model2, "
                "(fisher1, fisher2))."
            )
        return [models, fishers], list(fisher_weights)
    if fisher_weights is not None:
        raise ValueError(
            "fisher_weights is only for the two-model form fisher_weighted_merge(model1, "
            "model2, (fisher1, fisher2)); with a list of models pass the Fishers second."
        )
    if isinstance(fishers, nn.Module):
        raise TypeError(
            "fishers must be a list with one Fisher per model, got an nn.Module; the "
            "two-model form is fisher_weighted_merge(model1, model2, (fisher1, fisher2))."
        )
    model_list = list(check_model_list(models, "models", non_empty=True))
    fisher_list = list(fishers)
    if len(fisher_list) != len(model_list):
        raise ValueError(
            f"Got {len(model_list)} models but {len(fisher_list)} Fishers; give one Fisher "
            "per model."
        )
    return model_list, fisher_list


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [check_positive(f"weights[{i}]", v, allow_zero=True) for i, v in enumerate(weights)]
    if len(w) != n:
        raise ValueError(f"Got {len(w)} weights for {n} models; give one weight per model.")
    total = sum(w)
    if total <= 0:
        raise ValueError(f"Invalid weights {list(weights)}: at least one must be positive.")
    return [v / total for v in w]


def _check_models(
    models: list[nn.Module], params: Iterable[str] | None = None, restrictable: bool = False
) -> set[str] | None:
    """Check that the models can be merged (on ``params``); return ``params`` as a set.
    ``restrictable``: the merge takes ``params=`` (its error then shows the argument)."""
    first = dict(models[0].named_parameters())
    keep = None
    if params is not None:
        if isinstance(params, str):
            params = [params]
        keep = set(params)
        if not keep:
            raise ValueError("params= is empty: name the parameters to merge (or pass None).")
        for j, m in enumerate(models):
            named = dict(m.named_parameters())
            missing = sorted(k for k in keep if k not in named)
            if missing:
                raise ValueError(
                    f"params= names parameters that models[{j}] lacks: {missing[:8]}; it has "
                    f"{list(named)[:8]}. Pass names every model has."
                )
    for i, m in enumerate(models[1:], start=1):
        other = dict(m.named_parameters())
        if keep is None:
            differ = sorted(
                k for k, p in first.items() if k not in other or other[k].shape != p.shape
            )
            shared = len(first) - len(differ)
            if not restrictable:
                fix = "Merge models of one architecture."
            elif shared == 0:
                fix = (f"models[0] and models[{i}] share no parameter (by name and shape), "
                       "so params= cannot select any: merge models of one architecture.")
            elif len(differ) <= 8:
                shown = "{" + ", ".join(repr(k) for k in differ) + "}"
                fix = ("To merge the parameters the models share (e.g. fine-tunes with "
                       "different heads) and keep models[0]'s others, pass params=[k for k, _ "
                       f"in models[0].named_parameters() if k not in {shown}]; or merge "
                       "models of one architecture.")
            else:
                fix = (f"To merge the {shared} parameters models[0] shares with models[{i}] "
                       "(by name and shape) and keep models[0]'s others, pass params= their "
                       "names; or merge models of one architecture.")
            check_same_structure(first, other, "models[0]", f"models[{i}]", fix=fix)
            check_same_structure(
                dict(models[0].named_buffers()), dict(m.named_buffers()), "models[0]",
                f"models[{i}]",
            )  # fmt: skip
            continue
        check_same_structure(
            {k: first[k] for k in keep}, {k: other[k] for k in keep}, "models[0]",
            f"models[{i}]", fix="Leave those out of params=.",
        )  # fmt: skip
    for i, m in enumerate(models[1:], start=1):
        other = dict(m.named_parameters())
        mixed = [f"{k}: {first[k].dtype} vs {other[k].dtype}" for k in first
                 if (keep is None or k in keep) and other[k].dtype != first[k].dtype]
        if mixed:  # the merge would silently take models[0]'s precision
            raise ValueError(
                f"models[0] and models[{i}] hold parameters of different dtypes ({mixed[0]}"
                f"{f', and {len(mixed) - 1} more' if len(mixed) > 1 else ''}): convert the "
                "models to one dtype first (e.g. model.to(torch.float64) for every model)."
            )
    for i, m in enumerate(models):
        check_all_finite(
            dict(m.named_parameters()),
            f"models[{i}]'s parameter",
            "A merge of non-finite weights is not finite: merge finite checkpoints (this "
            "model's training has likely diverged).",
        )
    return keep


def _restrict(f: FisherLike, keep: set[str], i: int) -> FisherLike:
    """Fisher ``i`` on the names of ``keep`` it covers (a structured curvature through
    ``restrict``); anything else is returned as it is, for the checks to name."""
    if isinstance(f, Mapping):
        return {k: v for k, v in f.items() if k in keep}
    if isinstance(f, Curvature):
        names = f.names()
        if set(names) <= keep:
            return f
        try:
            return f.restrict([k for k in names if k in keep])
        except ValueError as exc:
            raise ValueError(f"fishers[{i}] cannot be read on params= alone: {exc}") from exc
    return f  # neither: refused by the checks that follow


def _check_fishers(
    fishers: Sequence[object], model: nn.Module, normalize: bool
) -> list[dict[str, torch.Tensor]]:
    named = dict(model.named_parameters())
    out: list[dict[str, torch.Tensor]] = []
    for i, f in enumerate(fishers):
        if not isinstance(f, Mapping):
            raise TypeError(
                f"fishers[{i}] is a {type(f).__name__}; expected a DiagonalFisher or a dict "
                "{parameter name: tensor}."
            )
        unknown = [k for k in f if k not in named]
        if unknown:
            raise ValueError(
                f"fishers[{i}] has parameters the models lack: {unknown[:8]}; the models have "
                f"{list(named)[:8]}. Estimate the Fishers on these models."
            )
        check_same_structure(
            dict(f), {k: named[k] for k in f}, f"fishers[{i}]", "the models' parameters"
        )
        if i:
            check_same_structure(out[0], dict(f), "fishers[0]", f"fishers[{i}]")
        vals = {k: v.detach() for k, v in f.items()}
        for k, v in vals.items():
            check_finite(f"fishers[{i}][{k!r}]", v)
            if bool((v < 0).any()):
                raise ValueError(f"fishers[{i}][{k!r}] has negative entries; a Fisher is >= 0.")
        if normalize:
            total = sum(float(v.double().sum()) for v in vals.values())
            if total <= 0:
                raise ValueError(
                    f"fishers[{i}] is zero everywhere, so normalize=True cannot give it unit "
                    "trace; pass normalize=False (and floor > 0 or another Fisher)."
                )
            vals = {k: v / total for k, v in vals.items()}
        out.append(vals)
    return out


def _mean(thetas: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    dt = acc_dtype(thetas[0].dtype)
    # thetas is never empty, so the sum is a tensor (sum starts at the int 0)
    return cast(torch.Tensor, sum(wm * t.to(dt) for wm, t in zip(w, thetas, strict=True)))


def _fisher_mean(
    thetas: list[torch.Tensor], fs: list[torch.Tensor], w: list[float], floor: float
) -> torch.Tensor:
    dt = torch.promote_types(acc_dtype(thetas[0].dtype), fs[0].dtype)
    dev = thetas[0].device
    num = torch.zeros(thetas[0].shape, dtype=dt, device=dev)
    den = torch.zeros_like(num)
    for wm, t, f in zip(w, thetas, fs, strict=True):
        fm = wm * f.to(dev, dt).clamp_min(floor)
        num += fm * t.to(dev, dt)
        den += fm
    fallback = _mean([t.to(dev) for t in thetas], w).to(dt)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), fallback)


# -- structured curvatures ----------------------------------------------------------------


def _curvature_merge(
    models: list[nn.Module],
    given: Sequence[object],
    w: list[float],
    floor: float,
    normalize: bool,
    method: str,
    dense_max: int,
    cg_iters: int,
    cg_tol: float,
    preconditioner: str = "kronecker",
    keep: set[str] | None = None,
) -> nn.Module:
    names = check_curvature(given[0], models[0], "curvatures[0]")
    for i, c in enumerate(given[1:], start=1):
        other = check_curvature(c, models[0], f"curvatures[{i}]")
        if other != names:
            raise ValueError(
                f"curvatures[{i}] covers {other[:8]} but curvatures[0] covers {names[:8]}; "
                "estimate every model's curvature on the same parameters."
            )
    # every entry passed check_curvature, so each is a Curvature
    curvs = [c for c in given if isinstance(c, Curvature)]
    if normalize:
        scaled = []
        for i, c in enumerate(curvs):
            trace = sum(float(v.double().sum()) for v in c.diagonal().values())
            if not trace > 0:
                raise ValueError(
                    f"curvatures[{i}] has zero trace, so normalize=True cannot give it unit "
                    "trace; pass normalize=False."
                )
            scaled.append((1.0 / trace) * c)
        curvs = scaled
    merged = deepcopy_model(models[0])
    params = [dict(m.named_parameters()) for m in models]
    target = {k: t for k, t in merged.named_parameters() if keep is None or k in keep}
    dt = torch.promote_types(acc_dtype(target[names[0]].dtype), torch.float32)
    mean = {k: _mean([p[k].detach() for p in params], w).to(dt) for k in target}
    lowrank = [c for c in curvs if isinstance(c, LowRankFisher)]
    if method == "auto" and len(lowrank) == len(curvs):
        diffs = [{k: p[k].detach() - mean[k] for k in names} for p in params]
        exact = _lowrank_solve(lowrank, w, floor, diffs, mean)
        return _write(merged, models, w, mean, exact, keep)
    # rhs: Σ_m w_m F_m (θ_m − θ̄)
    rhs = {k: torch.zeros_like(mean[k]) for k in names}
    for wm, c, p in zip(w, curvs, params, strict=True):
        if wm == 0:
            continue
        fv = c.mv({k: p[k].detach().to(dt) - mean[k] for k in names})
        for k in names:
            rhs[k] = rhs[k] + wm * fv[k].to(rhs[k])

    def op(v: Vec) -> Vec:
        out = {k: floor * x for k, x in v.items()}
        for wm, c in zip(w, curvs, strict=True):
            if wm:
                fv = c.mv(v)
                for k in v:
                    out[k] = out[k] + wm * fv[k].to(out[k])
        return out

    kinds = [c.structure() for c in curvs]
    block_diag = all(kd[k] in BLOCK_KINDS for kd in kinds for k in names)
    if block_diag:
        blocks: dict[str, list[str]] = {}
        for k in names:
            blocks.setdefault(k.rpartition(".")[0], []).append(k)
        groups = list(blocks.values())
    else:
        groups = [names]
    diags = [c.diagonal() for c in curvs]
    correction: Vec = {}
    for group in groups:
        size = sum(mean[k].numel() for k in group)
        b = {k: rhs[k] for k in group}
        if method == "dense" or (method == "auto" and size <= dense_max):
            correction.update(_dense_solve(op, b, group, mean, singular=floor == 0))
        else:
            pre: Vec | Callable[[Vec], Vec] | None = (
                _kronecker_preconditioner(curvs, w, floor, group, mean)
                if preconditioner == "kronecker" else None
            )
            if pre is None:
                # Jacobi: floor + Σ_m w_m diag F_m (a tensor: there is at least one model)
                jac = {
                    k: floor + cast(torch.Tensor, sum(
                        wm * d[k].to(mean[k]) for wm, d in zip(w, diags, strict=True)))
                    for k in group
                }
                pre = {k: torch.where(v > 0, v, torch.ones_like(v)) for k, v in jac.items()}
            res = conjugate_gradient(op, b, precond=pre, max_iter=cg_iters, tol=cg_tol)
            where = (
                f"layer {group[0].rpartition('.')[0] or group[0]!r}" if block_diag
                else "the one system coupling every parameter"
            )
            warn_unconverged(
                res, cg_tol, f"fisher_weighted_merge of {where}",
                "raise cg_iters= or floor=, or pass method='dense' (with a larger dense_max)",
            )  # fmt: skip
            correction.update(res.x)
    return _write(merged, models, w, mean, correction, keep)


def _merged_module(model: nn.Module, buffer: str, keep: set[str]) -> bool:
    """Whether the buffer ``buffer`` belongs to merged parameters: the nearest module
    holding it (itself, then its parents, below the model itself) that has parameters in
    its subtree decides, merged when any of them is in ``keep`` (a head's buffer beside
    the head's layers follows the head); a buffer of a parameter-free module directly
    under the model (a ``BatchNorm(affine=False)`` of a flat ``nn.Sequential``) is merged
    only when every parameter is."""
    parts = buffer.split(".")[:-1]
    while parts:
        prefix = ".".join(parts)
        names = [k for k, _ in model.get_submodule(prefix).named_parameters(prefix=prefix)]
        if names:
            return any(k in keep for k in names)
        parts.pop()
    # a parameter-free module of the model itself (a top-level BatchNorm(affine=False)):
    # merged only with the whole model, else it stays with models[0]'s parameters
    return all(k in keep for k, _ in model.named_parameters())


def _write(
    merged: nn.Module,
    models: Sequence[nn.Module],
    w: list[float],
    mean: Vec,
    correction: Vec,
    keep: set[str] | None = None,
) -> nn.Module:
    """Set ``merged``'s parameters of ``mean`` to ``θ̄ + x`` (``θ̄`` where no correction)
    and average the buffers (see :func:`_average_buffers` for ``keep``); return it."""
    with torch.no_grad():
        for k, t in merged.named_parameters():
            if k not in mean:
                continue  # outside params=: models[0]'s value
            value = mean[k] + correction[k] if k in correction else mean[k]
            check_finite(f"the merged parameter {k!r}", value, "Raise floor= (the ridge).")
            t.copy_(value.to(t.dtype))
        _average_buffers(merged, models, w, keep)
    return merged


def _lowrank_solve(
    curvs: Sequence[LowRankFisher], w: list[float], floor: float, diffs: list[Vec], like: Vec
) -> Vec:
    """``x = Zᵀ (ZZᵀ + εI)⁺ c``, the exact solution of ``(Σ_m w_m F_m + εI) x = Σ_m w_m F_m
    d_m`` for ``F_m = R_mᵀR_m/N_m`` (see :func:`fisher_weighted_merge`), in float64.

    The parameters are flattened in the curvatures' own order (``shapes``); ``Z`` is never
    formed: the Gram ``ZZᵀ``, ``c`` and ``Zᵀy`` are summed over blocks of columns."""
    shapes = curvs[0].shapes
    order = list(shapes)
    sizes = [math.prod(shapes[k]) for k in order]
    dev = curvs[0].rows.device
    used = [
        (math.sqrt(wm / c.n_samples), c.rows, torch.cat(
            [d[k].reshape(-1).to(dev) for k in order]))  # float64 a block at a time
        for wm, c, d in zip(w, curvs, diffs, strict=True)
        if wm > 0 and c.n_samples > 0 and c.rows.shape[0] > 0
    ]  # fmt: skip
    P = sum(sizes)
    x = torch.zeros(P, dtype=torch.float64, device=dev)
    if used:
        R = sum(rows.shape[0] for _, rows, _ in used)
        width = max(1, 2**22 // R)  # float64 columns of Z converted at a time (32 MiB)
        blocks = [slice(j, min(j + width, P)) for j in range(0, P, width)]
        K = torch.zeros(R, R, dtype=torch.float64, device=dev)
        c = torch.zeros(R, dtype=torch.float64, device=dev)
        spans, i = [], 0
        for _, rows, _ in used:
            spans.append(slice(i, i + rows.shape[0]))
            i += rows.shape[0]
        for cols in blocks:
            Zb = torch.cat([s * rows[:, cols].double() for s, rows, _ in used])
            K += Zb @ Zb.T
            for span, (_, _, d) in zip(spans, used, strict=True):
                c[span] += Zb[span] @ d[cols].double()
        lam, Q = torch.linalg.eigh(0.5 * (K + K.T))
        keep = lam > R * torch.finfo(torch.float64).eps * max(float(lam.max()), 0.0)
        y = Q[:, keep] @ ((Q[:, keep].T @ c) / (lam[keep] + floor))
        for cols in blocks:
            x[cols] = torch.cat([s * rows[:, cols].double() for s, rows, _ in used]).T @ y
    parts = torch.split(x, sizes)
    return {k: t.reshape(shapes[k]).to(like[k]) for k, t in zip(order, parts, strict=True)}


def _kronecker_preconditioner(
    curvs: Sequence[Curvature],
    w: list[float],
    floor: float,
    group: list[str],
    like: Mapping[str, torch.Tensor],
) -> Callable[[Vec], Vec] | None:
    """``v ↦ (Ḡ ⊗ Ā + εI)⁻¹ v`` on ``group`` (``Ḡ = Σ w_m G_m``, ``Ā = Σ w_m A_m``), or
    None when some curvature does not hold ``group`` as exactly one Kronecker block."""
    blocks: list[KroneckerBlock] = []
    for c in curvs:
        if not isinstance(c, KroneckerFisher):
            return None
        found = [b for b in c.blocks.values() if sorted(b.names) == sorted(group)]
        if len(found) != 1 or found[0].mask is not None:  # pruned: no Kronecker preconditioner
            return None
        blocks.append(found[0])
    first = blocks[0]
    if any(b.layout() != first.layout() for b in blocks[1:]):
        return None
    dt = like[group[0]].dtype
    # Ḡ ⊗ Ā as a K-FAC block of the same layout, in float64: its bases() are the
    # eigendecompositions of Ā and Ḡ (eigenvalues clamped at 0; a diagonal side stays one)
    mean_blk = replace(
        first,
        A=_mean([b.A.to(torch.float64) for b in blocks], w),
        G=_mean([b.G.to(torch.float64) for b in blocks], w),
        s=None, QA=None, QG=None, eig={},
    )
    QA, _, QG, _ = mean_blk.bases()
    den = mean_blk.eigenvalues() + floor
    # a zero eigenvalue with no ridge: keep the preconditioner finite (CG still converges
    # on the range of the operator)
    den = den.clamp_min(max(float(den.max()) * 1e-12, torch.finfo(torch.float64).tiny))
    inv = (1.0 / den).to(dt)
    qa = None if QA is None else QA.to(dt)
    qg = None if QG is None else QG.to(dt)

    def apply(v: Vec) -> Vec:
        V = weight_blocks(
            first.shape, first.transposed, first.groups, v[first.weight].to(dt),
            None if first.bias is None else v[first.bias].to(dt),
        )
        R = eig_scale(V, inv, qa, qg)
        W, bias = split_weight_blocks(first.shape, first.transposed, first.bias is not None, R)
        out = {first.weight: W}
        if first.bias is not None and bias is not None:
            out[first.bias] = bias
        return out

    return apply


def _dense_solve(
    op: Callable[[Vec], Vec], b: Vec, group: list[str], like: Mapping[str, torch.Tensor],
    *, singular: bool,
) -> Vec:
    """Solve ``op x = b`` on ``group`` by reading the matrix off ``op`` on unit vectors
    (``singular``: no ridge, the minimum-norm solution; see ``psd_solve``)."""
    shapes = {k: like[k].shape for k in group}
    sizes = [like[k].numel() for k in group]
    total = sum(sizes)
    cols = []
    for i in range(total):
        e = torch.zeros(total, dtype=like[group[0]].dtype, device=like[group[0]].device)
        e[i] = 1.0
        v = {k: t.reshape(shapes[k]) for k, t in zip(group, torch.split(e, sizes), strict=True)}
        out = op(v)
        cols.append(torch.cat([out[k].reshape(-1) for k in group]).double())
    m = torch.stack(cols, 1)
    m = 0.5 * (m + m.T)
    rhs = torch.cat([b[k].reshape(-1) for k in group]).double()
    x = psd_solve(m, rhs.unsqueeze(1), singular=singular).squeeze(1) if total else rhs
    parts = torch.split(x.to(like[group[0]].dtype), sizes)
    return {k: t.reshape(shapes[k]) for k, t in zip(group, parts, strict=True)}


# -- RegMean ------------------------------------------------------------------------------


def regmean_merge(
    models: Sequence[nn.Module],
    data: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    alpha: float = 1.0,
    floor: float = 1e-8,
    normalize: bool = False,
) -> nn.Module:
    """RegMean: merge each linear and convolution layer by its input Gram matrices (K-FAC with ``G = I``).

    For a layer with augmented inputs ``ã = [x, 1]`` (bias) and weights ``W̃ = [W, b]``,
    model ``m`` contributes the Gram ``A_m = Σ_n ã_n ã_nᵀ`` over its data. For
    ``nn.Linear`` (and transformers' ``Conv1D``) every leading dimension of the input
    counts as a sample; for ``nn.Conv1d`` / ``nn.Conv2d`` the inputs are the unfolded
    patches (``ã`` of length ``C_in/groups · k + 1``, every output position a sample)
    and ``W̃`` the weight reshaped to ``(C_out/groups, C_in/groups · k)`` per group: the
    Gram is the K-FAC ``A`` factor of the layer (up to the ``1/(N·T)`` scale). The merge
    solves, per layer and group,

        ``W̃* = (Σ_m w_m W̃_m Â_m) (Σ_m w_m Â_m + ε I)⁻¹``,  ``Â = α A + (1 − α) diag(A)``,

    the least-squares fit of every model's layer outputs on its own inputs (Jin et al.,
    2023). In the Kronecker language ``F_m ≈ G_m ⊗ A_m``: :func:`fisher_weighted_merge`
    with ``G_m = I`` gives this (``α = 1``). ``normalize=True`` first divides each model's
    Grams by the trace of its ``I ⊗ A`` curvature over the merged layers,
    ``Σ_layers d_out/groups · Σ_groups tr A`` (unit-trace, as ``normalize`` of
    :func:`fisher_weighted_merge`). Other parameters (those of other layers, tied or
    shared weights) and floating buffers get the weighted mean. ``α < 1`` shrinks the
    off-diagonal Gram entries (RegMean's default is 0.9 in its paper).

    Args:
        models: models of one architecture.
        data: one batch or iterable of batches per model (its inputs; labels unused).
        weights: ``w_m >= 0`` (default equal), rescaled to sum to one.
        alpha: ``α`` in ``[0, 1]``.
        floor: ``ε >= 0``, a ridge on the merged Gram.
        normalize: use unit-trace Grams.

    Returns:
        A deep copy of ``models[0]`` with the merged parameters (inputs untouched).

    Raises:
        ValueError: counts that disagree, models of different architectures, bad
            ``alpha`` / ``floor`` / weights, a layer that sees no input, or a model whose
            Grams are all zero with ``normalize=True``, an empty ``models``, a model with
            a train-mode BatchNorm or dropout (call ``model.eval()``).
        TypeError: ``models`` a bare module or not a list, or an entry that is not an
            ``nn.Module``.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
        >>> _ = a.weight.data.fill_(1.0), b.weight.data.fill_(4.0)
        >>> xa, xb = torch.tensor([[3.0]]), torch.tensor([[1.0]])  # Grams 9 and 1
        >>> round(regmean_merge([a, b], [xa, xb]).weight.item(), 6)  # (9*1 + 1*4) / 10
        1.3
    """
    from natgrad.curvature.estimate import iterate_batches
    from natgrad.curvature.kfac import kfac_coverage, patches
    from natgrad.engine.batch import parse_batch
    from natgrad.engine.checks import check_fixed_model, check_fraction

    models = list(check_model_list(models, "models", non_empty=True))
    data = list(data)
    if len(data) != len(models):
        raise ValueError(
            f"Got {len(models)} models but {len(data)} data sets; give one batch (or "
            "iterable of batches) per model."
        )
    w = _weights(weights, len(models))
    alpha = check_fraction("alpha", alpha, closed=True)
    floor = check_positive("floor", floor, allow_zero=True)
    _check_models(models)
    for i, m in enumerate(models):
        # the Grams are of the models' forwards: no batch statistics, no dropout (and no
        # BatchNorm running statistics updated in the inputs)
        check_fixed_model(m, f"regmean_merge's models[{i}]")
    covered, _ = kfac_coverage(models[0], dict(models[0].named_parameters()), extended=True)
    layers = {k: lay for k, lay in covered.items() if lay.kind != "embedding"}
    grams: list[dict[str, torch.Tensor]] = []
    for i, (m, d) in enumerate(zip(models, data, strict=True)):
        acc: dict[str, torch.Tensor] = {}
        hooks = []
        mods = dict(m.named_modules())

        def hook(
            name: str, acc: dict[str, torch.Tensor] = acc
        ) -> Callable[[nn.Module, tuple[Any, ...]], None]:
            def fn(module: nn.Module, inputs: tuple[Any, ...]) -> None:
                # (N, T, groups, d_A) patches with the bias column; layout of models[0]'s
                # layer (the same configuration in every model)
                a = patches(layers[name], inputs[0].detach()).to(torch.float64)
                g = torch.einsum("ntga,ntgb->gab", a, a)
                acc[name] = acc[name] + g if name in acc else g

            return fn

        for n in layers:
            hooks.append(mods[n].register_forward_pre_hook(hook(n)))
        try:
            with torch.no_grad():
                for batch in iterate_batches(d):
                    b = parse_batch(batch)
                    m(*b.args, **b.kwargs)
        finally:
            for h in hooks:
                h.remove()
        missing = [n for n in layers if n not in acc]
        if missing:
            raise ValueError(
                f"Layers {missing[:8]} saw no input on the data of one model; pass data "
                "that runs through every linear and convolution layer."
            )
        if normalize:
            trace = sum(
                float(a.diagonal(dim1=-2, dim2=-1).sum()) * layers[n].dims()[1]
                for n, a in acc.items()
            )
            if not trace > 0:
                raise ValueError(
                    f"models[{i}]'s input Grams are zero, so normalize=True cannot give them "
                    "unit trace; pass normalize=False."
                )
            acc = {n: a / trace for n, a in acc.items()}
        grams.append(acc)
    merged = deepcopy_model(models[0])
    params = [dict(m.named_parameters()) for m in models]
    target = dict(merged.named_parameters())
    done: set[str] = set()
    with torch.no_grad():
        for n, lay in layers.items():
            shape = tuple(target[lay.weight].shape)
            num: torch.Tensor | None = None
            den: torch.Tensor | None = None
            for wm, g, p in zip(w, grams, params, strict=True):
                a = g[n]
                a = alpha * a + (1 - alpha) * torch.diag_embed(a.diagonal(dim1=-2, dim2=-1))
                V = weight_blocks(
                    shape, lay.transposed, lay.groups, p[lay.weight].detach().to(torch.float64),
                    None if lay.bias is None else p[lay.bias].detach().to(torch.float64),
                )
                num = wm * V @ a if num is None else num + wm * V @ a
                den = wm * a if den is None else den + wm * a
            assert num is not None and den is not None  # models is not empty (checked)
            den = den + floor * torch.eye(den.shape[-1], dtype=torch.float64, device=den.device)
            # W̃* = num den⁻¹ per group (den symmetric; the minimum-norm solution if singular)
            sol = psd_solve(den, num.transpose(-1, -2), singular=floor == 0).transpose(-1, -2)
            check_finite(f"the merged layer {n!r}", sol, "Raise floor= (the ridge).")
            W, bias = split_weight_blocks(shape, lay.transposed, lay.bias is not None, sol)
            target[lay.weight].copy_(W.to(target[lay.weight].dtype))
            done.add(lay.weight)
            if lay.bias is not None and bias is not None:
                target[lay.bias].copy_(bias.to(target[lay.bias].dtype))
                done.add(lay.bias)
        for k, t in target.items():
            if k not in done:
                t.copy_(_mean([p[k].detach() for p in params], w).to(t.dtype))
        _average_buffers(merged, models, w)
    return merged
