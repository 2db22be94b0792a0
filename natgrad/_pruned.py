"""Names of pruned parameters: ``torch.nn.utils.prune`` reparametrizations.

A module pruned by ``torch.nn.utils.prune`` holds ``<name>_orig`` (the parameter) and
``<name>_mask`` (a buffer); its forward pre-hook sets ``<name> = <name>_orig * <name>_mask``.
natgrad keys importance and masks by the *effective* name ``<module>.<name>``, the
tensor the forward pass uses, so that masks of a pruned and an unpruned model compare.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune


def pruned_names(module: nn.Module) -> set[str]:
    """Attribute names that a ``torch.nn.utils.prune`` hook reparametrizes on ``module``."""
    return {
        h._tensor_name
        for h in module._forward_pre_hooks.values()
        if isinstance(h, prune.BasePruningMethod)
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
