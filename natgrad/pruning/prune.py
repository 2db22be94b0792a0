"""Fisher pruning: OBD saliency ``½ F_i θ_i²`` and the boolean masks it selects.

Masks are ``{effective parameter name: bool tensor}`` with ``True`` = keep; apply them
with :func:`natgrad.apply_masks` (through ``torch.nn.utils.prune``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from natgrad.curvature.diagonal import check_fisher
from natgrad.engine.checks import (
    check_all_finite,
    check_choice,
    check_fisher_type,
    check_fraction,
    check_int,
    check_model,
    check_names_in,
    check_positive,
)
from natgrad.pruning.pruned import effective_params

__all__ = ["fisher_importance", "fisher_pruning_masks", "prune_candidates"]

Scope = Literal["global", "layer"]
Structured = Literal["channel"]
Prunable = Literal["weights", "all"]


def fisher_importance(
    fisher: Mapping[str, torch.Tensor], model: nn.Module, *, normalize: bool = True
) -> dict[str, torch.Tensor]:
    """The OBD saliency ``s_i = ½ F_i θ_i²`` of every parameter the Fisher covers.

    ``s_i`` is the second-order increase of the loss when ``θ_i`` is set to zero, with
    the diagonal Fisher as the curvature. With ``normalize=True`` the result is
    ``s_i / Σ_j s_j`` (it sums to one over the model).

    Pruned models: a Fisher estimated on a model pruned by ``torch.nn.utils.prune``
    holds ``"<m>.weight_orig"``; its importance is reported under the effective name
    ``"<m>.weight"`` with ``θ = weight_orig * weight_mask`` (entries already pruned score 0),
    so importance and masks of pruned and unpruned models share names. A Fisher
    estimated before pruning (keys ``"<m>.weight"``) is accepted for the pruned model too.

    Args:
        fisher: ``{parameter name: F}`` (a :class:`natgrad.DiagonalFisher` or a dict),
            names from ``model.named_parameters()``.
        model: the model whose parameters ``θ`` are scored (not modified).
        normalize: divide by the total so the saliencies sum to one.

    Returns:
        ``{effective name: tensor}``, each of the parameter's shape, float32 (float64 when
        the Fisher or the parameter is float64), on the Fisher's device.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``fisher`` is not a mapping of tensors.
        ValueError: Fisher names missing from the model or shapes that differ (named);
            negative Fisher entries; ``normalize=True`` when every saliency is zero.
        FloatingPointError: NaN or Inf in the Fisher or the parameters (named).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        >>> fisher_importance({"weight": torch.tensor([[2.0, 1.0]])}, model)["weight"]
        tensor([[0.3333, 0.6667]])
    """
    check_model(model, "fisher_importance")
    check_fisher_type(fisher)
    eff = effective_params(model)
    by_param = {pname: (ename, v) for ename, (pname, v) in eff.items()}
    by_param.update(
        {ename: (ename, v) for ename, (_, v) in eff.items()}
    )  # Fisher from before pruning
    check_names_in(fisher, by_param)
    check_fisher(fisher)
    check_all_finite(
        {by_param[k][0]: by_param[k][1] for k in fisher},
        "the model's parameter",
        "NaN/Inf weights have no meaningful saliency: restore a finite checkpoint first.",
    )
    out: dict[str, torch.Tensor] = {}
    for k, F in fisher.items():
        ename, theta = by_param[k]
        F = F.detach()
        if tuple(F.shape) != tuple(theta.shape):
            raise ValueError(
                f"Fisher entry {k!r} has shape {tuple(F.shape)} but the parameter has "
                f"{tuple(theta.shape)}. Estimate the Fisher on this model."
            )
        dtype = torch.promote_types(torch.promote_types(F.dtype, theta.dtype), torch.float32)
        out[ename] = 0.5 * F.to(dtype) * theta.to(F.device, dtype) ** 2
    if normalize:
        total = sum(float(v.sum()) for v in out.values())
        if not total > 0:
            raise ValueError(
                "Every saliency ½ F θ² is zero (the Fisher or the parameters are zero), so it "
                "cannot be normalized; pass normalize=False."
            )
        out = {k: v / total for k, v in out.items()}
    return out


def fisher_pruning_masks(
    importance: Mapping[str, torch.Tensor],
    *,
    sparsity: float | None = None,
    threshold: float | None = None,
    scope: Scope = "global",
    min_keep: int = 1,
    structured: Structured | None = None,
    prune: Prunable | Sequence[str] = "weights",
    channel_bias: Literal["remove", "keep"] = "remove",
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks (``True`` = keep) that remove the least important entries.

    Exactly one criterion:

    * ``sparsity`` ``f``: remove exactly ``k = floor(f · n + ½)`` of the ``n`` candidate
      units (round half up), the ``k`` with the smallest importance. Ties go by
      position: tensor order, then flat index; the earlier one is removed first.
    * ``threshold`` ``t``: remove units whose *normalized* importance ``s / Σ s`` is
      below ``t`` (``Σ`` over every tensor of ``importance`` for ``scope="global"``,
      over the unit's own tensor for ``scope="layer"``).

    ``scope="global"`` ranks all candidates together; ``"layer"`` ranks and removes
    within each tensor (``k`` per tensor).

    ``min_keep``: each pruned tensor keeps at least ``min(min_keep, units)`` units, its
    most important ones. In global scope with ``sparsity`` the count stays exact: the
    protected units are skipped and the next least important units elsewhere are
    removed instead (a ValueError when fewer than ``k`` unprotected units exist). In
    layer scope (and with ``threshold``) ``min_keep`` caps the removal, so a tiny tensor
    may end up less sparse than asked.

    ``structured="channel"``: a unit is an output row/filter (index along dim 0, as in
    ``torch.nn.utils.prune.ln_structured(dim=0)``) scored by its summed importance;
    whole rows are masked together and ``sparsity`` counts rows. With
    ``channel_bias="remove"`` the bias ``"<m>.bias"`` of a pruned ``"<m>.weight"`` (shape
    ``(rows,)``) is masked with its rows and its importance is added to the row score,
    so a removed channel outputs exactly zero (a BatchNorm after the layer still adds
    its constant ``β − γμ/√(σ² + ε)``: :func:`natgrad.prune_structured` removes both);
    ``"keep"`` leaves biases alone (use it for ``ConvTranspose``, whose dim 0 is the input channels).

    Args:
        importance: ``{name: saliency}`` (e.g. :func:`fisher_importance`), non-negative.
        sparsity: fraction of candidate units to remove, in ``[0, 1)``.
        threshold: normalized-importance cut-off, ``>= 0``.
        scope: ``"global"`` or ``"layer"``.
        min_keep: units each pruned tensor keeps, ``>= 0``.
        structured: ``None`` (single entries) or ``"channel"``.
        prune: candidate tensors: ``"weights"`` (default: tensors with ``dim >= 2``, the
            weights of Linear/Conv/Embedding layers), ``"all"``, or a list of names.
        channel_bias: with ``structured="channel"``: ``"remove"`` or ``"keep"`` biases.

    Returns:
        ``{name: bool tensor}`` for every pruned tensor (and paired biases), each of the
        tensor's shape, on its device. Tensors that are not candidates are left out
        (that is, kept whole).

    Raises:
        ValueError: both or neither criterion, bad values, unknown names in ``prune``,
            no candidate tensors, negative importance, or sparsity too high for
            ``min_keep``.

    Example:
        >>> import torch
        >>> imp = {"w": torch.tensor([[0.1, 0.4], [0.3, 0.2]])}
        >>> fisher_pruning_masks(imp, sparsity=0.5)["w"]
        tensor([[False,  True],
                [ True, False]])
        >>> fisher_pruning_masks(imp, sparsity=0.5, structured="channel")["w"]
        tensor([[False, False],
                [ True,  True]])
    """
    if (sparsity is None) == (threshold is None):
        raise ValueError(
            "Give exactly one of sparsity= (fraction to remove) or threshold= (normalized "
            f"importance cut-off); got sparsity={sparsity!r}, threshold={threshold!r}."
        )
    if sparsity is not None:
        sparsity = check_fraction("sparsity", sparsity)
    if threshold is not None:
        threshold = check_positive("threshold", threshold, allow_zero=True)
    check_choice("scope", scope, ("global", "layer"))
    if structured is not None:
        check_choice("structured", structured, ("channel",))
    check_choice("channel_bias", channel_bias, ("remove", "keep"))
    min_keep = check_int("min_keep", min_keep, 0)
    if not importance:
        raise ValueError("importance is empty: there is nothing to prune.")
    for k, v in importance.items():
        if bool((v < 0).any()) or not bool(torch.isfinite(v).all()):
            raise ValueError(
                f"importance[{k!r}] has negative or non-finite entries; pass saliencies "
                "such as fisher_importance(...) (>= 0)."
            )

    names = prune_candidates({k: v.shape for k, v in importance.items()}, prune)
    bias_of = _paired_biases(importance, names) if structured and channel_bias == "remove" else {}
    names = [k for k in names if k not in bias_of.values()]  # a paired bias follows its rows
    # units: one score per unit of each candidate tensor (entries, or rows)
    scores: dict[str, torch.Tensor] = {}
    for k in names:
        v = importance[k].detach().double()
        if structured is None:
            scores[k] = v.reshape(-1)
            continue
        scores[k] = v.reshape(v.shape[0], -1).sum(1) if v.dim() > 0 else v.reshape(1)
        if k in bias_of:
            scores[k] = scores[k] + importance[bias_of[k]].detach().double().to(v.device)

    if threshold is not None:
        keep_units = _by_threshold(scores, importance, threshold, scope, min_keep)
    elif scope == "layer":
        assert sparsity is not None  # exactly one of sparsity / threshold (checked above)
        keep_units = {
            k: _remove_lowest({k: s}, _round(sparsity * s.numel()), min_keep)[k]
            for k, s in scores.items()
        }
    else:
        assert sparsity is not None  # exactly one of sparsity / threshold (checked above)
        total = sum(s.numel() for s in scores.values())
        keep_units = _remove_lowest(scores, _round(sparsity * total), min_keep, exact=True)

    masks: dict[str, torch.Tensor] = {}
    for k in names:
        shape, dev = importance[k].shape, importance[k].device
        u = keep_units[k].to(dev)
        if structured is None:
            masks[k] = u.reshape(shape)
        else:
            masks[k] = u.reshape((-1,) + (1,) * max(len(shape) - 1, 0)).expand(shape).clone()
            if k in bias_of:
                masks[bias_of[k]] = u.clone()
    return masks


def _round(x: float) -> int:
    return int(x + 0.5)


def prune_candidates(
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    prune: Prunable | Sequence[str],
    what: str = "importance",
    fix: str = "Use names from fisher_importance's result.",
) -> list[str]:
    """The tensors a pruning method may prune, in ``shapes`` order (one home for
    :func:`fisher_pruning_masks` and :func:`~natgrad.obs_prune`).

    Args:
        shapes: ``{name: shape}`` of the tensors ``what`` covers.
        prune: ``"weights"`` (tensors with ``dim >= 2``), ``"all"``, or a list of names.
        what: what holds the names, as named in errors (``"importance"``, ``"the curvature"``).
        fix: how to fix names ``what`` lacks.

    Raises:
        ValueError: an unknown choice, no tensor selected, or names ``what`` lacks.
    """
    if isinstance(prune, str):
        check_choice("prune", prune, ("weights", "all"))
        names = [k for k, v in shapes.items() if prune == "all" or len(v) >= 2]
        if not names:
            raise ValueError(
                f"No tensor to prune: prune={prune!r} selects tensors with dim >= 2 and "
                f"{what} holds only {[(k, tuple(v)) for k, v in shapes.items()][:8]}"
                "; pass prune='all' or a list of names."
            )
        return names
    wanted = list(prune)
    unknown = [k for k in wanted if k not in shapes]
    if unknown or not wanted:
        raise ValueError(
            f"prune lists names not in {what}: {unknown} ({what} does not cover them); "
            f"{what} has {list(shapes)[:8]}. {fix}"
        )
    keep = set(wanted)
    return [k for k in shapes if k in keep]


def _protected(scores: torch.Tensor, min_keep: int) -> torch.Tensor:
    """The ``min(min_keep, n)`` most important units of one tensor (ties: later position)."""
    m = scores.numel()
    out = torch.zeros(m, dtype=torch.bool)
    keep = min(min_keep, m)
    if keep:
        # most important first; among ties the later position is protected, mirroring
        # "the earlier position is removed first"
        order = torch.sort(scores.cpu().flip(0), descending=True, stable=True).indices
        out[m - 1 - order[:keep]] = True
    return out


def _paired_biases(importance: Mapping[str, torch.Tensor], names: list[str]) -> dict[str, str]:
    """``{"<m>.weight": "<m>.bias"}`` for candidate weights (dim >= 2) with a ``(rows,)`` bias."""
    out: dict[str, str] = {}
    for k in names:
        v = importance[k]
        b = k[: -len("weight")] + "bias" if k == "weight" or k.endswith(".weight") else None
        if b is not None and v.dim() >= 2 and b in importance and tuple(importance[b].shape) == (v.shape[0],):
            out[k] = b
    return out


def _remove_lowest(
    scores: dict[str, torch.Tensor], k: int, min_keep: int, exact: bool = False
) -> dict[str, torch.Tensor]:
    """Keep-masks over units that remove the ``k`` lowest scores, each tensor's top
    ``min_keep`` protected; ties by position. ``exact`` raises if ``k`` cannot be met."""
    names = list(scores)
    flat = torch.cat([scores[n].cpu() for n in names])
    protected = torch.cat([_protected(scores[n], min_keep) for n in names])
    free = (~protected).nonzero().squeeze(1)
    if k > free.numel():
        if exact:
            raise ValueError(
                f"sparsity asks to remove {k} of {flat.numel()} units, but min_keep={min_keep} "
                f"protects {int(protected.sum())} of them; lower the sparsity or min_keep."
            )
        k = free.numel()
    order = torch.sort(flat[free], stable=True).indices[:k]
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[free[order]] = False
    return dict(zip(names, torch.split(keep, [scores[n].numel() for n in names]), strict=True))


def _by_threshold(
    scores: Mapping[str, torch.Tensor],
    importance: Mapping[str, torch.Tensor],
    threshold: float,
    scope: Scope,
    min_keep: int,
) -> dict[str, torch.Tensor]:
    """Remove units whose normalized score is below ``threshold``, except protected ones."""
    total = sum(float(v.double().sum()) for v in importance.values())
    out = {}
    for k, s in scores.items():
        denom = float(s.sum()) if scope == "layer" else total
        norm = (s / denom if denom > 0 else torch.zeros_like(s)).cpu()
        out[k] = ~((norm < threshold) & ~_protected(s, min_keep))
    return out
