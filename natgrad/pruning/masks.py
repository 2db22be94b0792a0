"""Pruning masks on models and between each other: apply, make permanent, overlap.

Masks are ``{parameter name: bool tensor}`` with ``True`` = keep, as made by
:func:`natgrad.fisher_pruning_masks`. Models are pruned through ``torch.nn.utils.prune``
so users keep its semantics (``weight_orig`` parameter, ``weight_mask`` buffer, a
forward pre-hook, ``prune.remove``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

from natgrad.engine.checks import check_same_structure
from natgrad.engine.deprecation import deprecated_alias
from natgrad.engine.report import Report
from natgrad.pruning.pruned import pruned_names

__all__ = ["apply_masks", "make_permanent", "mask_overlap", "fisher_overlap", "MaskOverlap", "SetOverlap"]


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Prune ``model`` in place with ``torch.nn.utils.prune.custom_from_mask``.

    For each ``"<m>.<a>"`` in ``masks`` the module ``<m>`` gets the parameter
    ``<a>_orig``, the buffer ``<a>_mask`` and a forward pre-hook computing
    ``<a> = <a>_orig * <a>_mask``; undo the reparametrization (keeping the zeros) with
    :func:`make_permanent` or ``prune.remove``. A tensor that is already pruned gets the
    product of its old and new masks (``torch.nn.utils.prune``'s rule). Names may also
    be given as ``"<m>.<a>_orig"``. A tied parameter (one tensor held by several
    modules, e.g. an LM head sharing the token embedding) is masked in every module that
    holds it. Every name is checked before the model is changed.

    Args:
        model: the model to prune (MODIFIED in place).
        masks: ``{name: mask}``, bool or 0/1 tensors of the parameter's shape (moved to
            the parameter's device).

    Returns:
        ``model`` itself.

    Raises:
        ValueError: a name that is no parameter of the model, or a shape that differs.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> _ = apply_masks(model, {"0.weight": torch.tensor([[True, False], [False, True]])})
        >>> sorted(n for n, _ in model.named_buffers())
        ['0.weight_mask']
        >>> (model[0].weight == 0).sum().item()
        2
    """
    plan: dict[int, tuple[list[tuple[nn.Module, str]], torch.Tensor]] = {}
    for name, mask in masks.items():
        module, attr = _locate(model, name)
        current = getattr(module, attr)
        if tuple(mask.shape) != tuple(current.shape):
            raise ValueError(
                f"Mask {name!r} has shape {tuple(mask.shape)} but the parameter has "
                f"{tuple(current.shape)}; make masks from this model's importance."
            )
        keep = mask.detach().to(current.device) != 0
        param = _parameter(module, attr)
        if id(param) in plan:  # two names of one tied parameter: both masks hold
            keep = keep & plan[id(param)][1]
        plan[id(param)] = (_uses(model, param), keep)
    for uses, mask in plan.values():
        # a tied parameter (e.g. an LM head sharing the token embedding) is masked in
        # every module that holds it, or the others would still compute with all of it;
        # a holder already pruned (by torch's prune directly) adds its old mask for all
        for module, attr in uses:
            if attr in pruned_names(module):
                mask = mask & (getattr(module, f"{attr}_mask") != 0)
        for module, attr in uses:
            # torch ships prune without annotations
            prune.custom_from_mask(module, attr, mask)  # type: ignore[no-untyped-call]
    return model


def _parameter(module: nn.Module, attr: str) -> nn.Parameter:
    """The parameter object behind ``module.<attr>`` (``<attr>_orig`` when pruned)."""
    p = module._parameters.get(attr)
    if p is None:
        p = module._parameters[f"{attr}_orig"]
    assert p is not None  # _locate found it
    return p


def _uses(model: nn.Module, param: nn.Parameter) -> list[tuple[nn.Module, str]]:
    """Every ``(module, attribute)`` of ``model`` holding ``param`` (tied weights)."""
    out = []
    for module in model.modules():
        hooked = pruned_names(module)
        for attr, p in module._parameters.items():
            if p is param:
                base = attr[: -len("_orig")] if attr.endswith("_orig") else None
                out.append((module, base if base is not None and base in hooked else attr))
    return out


def _locate(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module and attribute a mask name refers to (``_orig`` names mapped back)."""
    mod_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(mod_name)
    except AttributeError:
        module = None
    if module is not None:
        if attr.endswith("_orig") and attr[: -len("_orig")] in pruned_names(module):
            attr = attr[: -len("_orig")]
        if attr in module._parameters or attr in pruned_names(module):
            return module, attr
    names = [n[: -len("_orig")] if n.endswith("_orig") else n for n, _ in model.named_parameters()]
    raise ValueError(
        f"Mask {name!r} names no parameter of the model; it has {names[:8]}"
        + (" ..." if len(names) > 8 else "")
        + ". Use names from model.named_parameters()."
    )


def make_permanent(model: nn.Module) -> nn.Module:
    """Remove every ``torch.nn.utils.prune`` reparametrization, keeping the zeros.

    Each pruned ``<a>`` becomes an ordinary parameter again with value
    ``<a>_orig * <a>_mask``; ``<a>_orig``, ``<a>_mask`` and the hook are removed
    (``prune.remove``). Modules that are not pruned are untouched.

    Args:
        model: the model (MODIFIED in place).

    Returns:
        ``model`` itself.

    Example:
        >>> import torch
        >>> model = apply_masks(torch.nn.Linear(2, 1), {"weight": torch.tensor([[1, 0]])})
        >>> _ = make_permanent(model)
        >>> sorted(n for n, _ in model.named_parameters()), model.weight[0, 1].item() == 0
        (['bias', 'weight'], True)
    """
    for module in model.modules():
        for attr in sorted(pruned_names(module)):
            prune.remove(module, attr)  # type: ignore[no-untyped-call]  # torch: unannotated
    return model


@dataclass
class SetOverlap(Report):
    """Overlap of two kept sets ``A`` and ``B``.

    ``jaccard = |A∩B| / |A∪B|`` (1 when both are empty); ``overlap = |A∩B| / min(|A|, |B|)``
    (the Szymkiewicz-Simpson coefficient; 1 when either set is empty, as the empty set
    is a subset of the other).
    """

    jaccard: float
    overlap: float
    kept1: int
    kept2: int
    intersection: int
    union: int
    size: int


@dataclass
class MaskOverlap(Report):
    """:func:`mask_overlap`'s result: the whole model and each tensor."""

    total: SetOverlap
    per_tensor: dict[str, SetOverlap] = field(default_factory=dict)


def _set_overlap(a: int, b: int, inter: int, union: int, size: int) -> SetOverlap:
    jac = inter / union if union else 1.0
    ovl = inter / min(a, b) if min(a, b) else 1.0
    return SetOverlap(jac, ovl, a, b, inter, union, size)


def mask_overlap(
    masks1: Mapping[str, torch.Tensor], masks2: Mapping[str, torch.Tensor]
) -> MaskOverlap:
    """Jaccard index and overlap coefficient of the entries two mask sets keep.

    With ``A``, ``B`` the kept (``True`` / nonzero) entries: ``|A∩B| / |A∪B|`` and
    ``|A∩B| / min(|A|, |B|)``, over all tensors together and per tensor.

    Args:
        masks1: ``{name: mask}``.
        masks2: ``{name: mask}`` with the same names and shapes as ``masks1``.

    Returns:
        :class:`MaskOverlap` (``.total``, ``.per_tensor[name]``; ``to_dict()`` for JSON).

    Raises:
        ValueError: names or shapes differ (the message names them).

    Example:
        >>> import torch
        >>> a = {"w": torch.tensor([True, True, False, False])}
        >>> b = {"w": torch.tensor([True, False, True, False])}
        >>> r = mask_overlap(a, b)
        >>> round(r.total.jaccard, 4), r.total.overlap
        (0.3333, 0.5)
    """
    check_same_structure(masks1, masks2, "masks1", "masks2")
    per, sums = {}, [0, 0, 0, 0, 0]
    for k in masks1:
        a = masks1[k].detach() != 0
        b = masks2[k].detach().to(a.device) != 0
        counts = [
            int(a.sum()),
            int(b.sum()),
            int((a & b).sum()),
            int((a | b).sum()),
            a.numel(),
        ]
        per[k] = _set_overlap(*counts)
        sums = [s + c for s, c in zip(sums, counts, strict=True)]
    return MaskOverlap(_set_overlap(*sums), per)


#: Deprecated name of :func:`mask_overlap` (it compares masks, never a Fisher).
fisher_overlap = deprecated_alias(mask_overlap, "fisher_overlap")
