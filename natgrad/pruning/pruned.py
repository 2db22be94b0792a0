"""Names of pruned parameters: ``torch.nn.utils.prune`` reparametrizations.

A module pruned by ``torch.nn.utils.prune`` holds ``<name>_orig`` (the parameter) and
``<name>_mask`` (a buffer); its forward pre-hook sets ``<name> = <name>_orig * <name>_mask``.
natgrad keys importance and masks by the *effective* name ``<module>.<name>``, the
tensor the forward pass uses, so that masks of a pruned and an unpruned model compare.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import prune


def pruned_names(module: nn.Module) -> set[str]:
    """Attribute names that ``torch.nn.utils.prune`` reparametrizes on ``module``.

    Read through public routes only: ``prune.is_pruned`` and the documented layout of a
    pruned tensor ``<a>``: a parameter ``<a>_orig`` and a buffer ``<a>_mask`` on the module.
    """
    if not prune.is_pruned(module):
        return set()
    buffers = {b for b, _ in module.named_buffers(recurse=False)}
    return {
        attr[: -len("_orig")]
        for attr, _ in module.named_parameters(recurse=False)
        if attr.endswith("_orig") and f"{attr[: -len('_orig')]}_mask" in buffers
    }


def effective_params(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """``{effective name: (parameter name, effective value)}`` in parameter order.

    For an unpruned parameter both names agree and the value is the parameter; for
    ``"<m>.<a>_orig"`` with a pruning hook on ``<a>``, the effective name is ``"<m>.<a>"``
    and the value ``<a>_orig * <a>_mask`` (what the forward pass uses). Values are detached.
    """
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for mod_name, module in model.named_modules():
        hooked = pruned_names(module)
        for attr, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{attr}" if mod_name else attr
            base = attr[: -len("_orig")] if attr.endswith("_orig") else None
            if base is not None and base in hooked:
                mask = getattr(module, f"{base}_mask")
                eff = f"{mod_name}.{base}" if mod_name else base
                out[eff] = (full, (p.detach() * mask.to(p.dtype)))
            else:
                out[full] = (full, p.detach())
    return out


def mask_buffer_names(model: nn.Module) -> set[str]:
    """Full names of the ``<a>_mask`` buffers of pruned tensors."""
    out = set()
    for mod_name, module in model.named_modules():
        for attr in pruned_names(module):
            out.add(f"{mod_name}.{attr}_mask" if mod_name else f"{attr}_mask")
    return out


def plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (:func:`deepcopy_model`) with every ``torch.nn.utils.prune``
    reparametrization made permanent (``prune.remove``): each pruned ``<a>`` becomes a plain
    parameter holding ``<a>_orig * <a>_mask`` (the ``<a>_orig`` parameter object, so its
    ``requires_grad`` is kept). A value copied into ``<a>`` is then what the copy computes
    with, which it is not while a pre-hook recomputes ``<a>`` at each forward. Input
    untouched."""
    out = deepcopy_model(model)
    for module in out.modules():
        for attr in sorted(pruned_names(module)):
            prune.remove(module, attr)  # type: ignore[no-untyped-call]  # torch: unannotated
    return out


def refresh_pruned(model: nn.Module) -> None:
    """Recompute every pruned ``<a> = <a>_orig * <a>_mask`` (as the forward pre-hook does)."""
    for module in model.modules():
        for attr in pruned_names(module):
            orig = getattr(module, f"{attr}_orig")
            mask = getattr(module, f"{attr}_mask")
            setattr(module, attr, orig * mask.to(dtype=orig.dtype))


def deepcopy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works on pruned models (input untouched).

    The pre-hook's ``<a> = <a>_orig * <a>_mask`` is a non-leaf tensor, which
    ``deepcopy`` refuses; it is copied detached and recomputed in the copy.
    """
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for attr in pruned_names(module):
            t = module.__dict__.get(attr)
            if isinstance(t, torch.Tensor):
                memo[id(t)] = t.detach().clone()
    out = copy.deepcopy(model, memo)
    refresh_pruned(out)
    return out
