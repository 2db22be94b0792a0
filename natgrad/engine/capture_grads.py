"""Per-sample gradients on the capture path (:func:`natgrad.per_sample_grads`).

The capture forward of :mod:`natgrad.engine.capture` records each layer's input ``a`` and
adds a zero perturbation to its output; one backward pass per label column ``u_j`` gives
the output gradients ``b_nj`` of every layer at once, and the per-sample gradient follows
from ``a`` and ``b`` without a per-sample forward:

* Linear: ``g_nj = Σ_t b_njt a_ntᵀ``; Conv: the same over unfolded patches, per group;
* eval-mode BatchNorm: ``∂l_nj/∂γ = Σ_t b_njt x̂_nt``, ``∂l_nj/∂β = Σ_t b_njt``; LayerNorm
  likewise; Embedding: ``b_njt`` added into the row of token ``ids_nt``.

Parameters of other modules (and modules the probe of :func:`split_params` rejects) go
through ``torch.func`` (:meth:`natgrad.engine.per_sample.Plan.run`) with the same label
columns, so the result does not depend on which path computed a parameter.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from natgrad.engine import capture_layers as layers
from natgrad.engine.batch import Batch
from natgrad.engine.capture import BATCH_NORMS, FastSplit, cached_split, check_captured
from natgrad.engine.capture_ops import zero_perturbation
from natgrad.engine.checks import random_module
from natgrad.engine.per_sample import Plan, hooked_output

__all__ = ["capture_grads", "grads_split"]

logger = logging.getLogger(__name__)

# Modules with a per-sample gradient rule here; attention and free parameters take vmap.
_GRAD_RULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, *BATCH_NORMS)


def grads_split(plan: Plan, b: Batch, engine: str) -> FastSplit | None:
    """The parameters whose per-sample gradients the capture path computes, or None when
    it computes none (or ``engine="vmap"``). With a random model (train-mode dropout) the
    capture path is used only when it covers every parameter: one forward then draws each
    sample's mask, where ``vmap`` would draw other masks for the remaining parameters.

    Raises:
        ValueError: ``engine="fast"`` and no parameter fits the capture path.
    """
    if engine == "vmap":
        return None
    full = cached_split(plan, b)
    split = FastSplit()
    for m, slots in full.fast.items():
        if isinstance(m, _GRAD_RULES) and m not in full.shared:
            kept = [s for s in slots if s.name not in full.tied]
            if kept:
                split.fast[m] = kept
    fast = set(split.fast_names)
    split.rest = [k for k in plan.params if k not in fast]
    if not split.fast:
        if engine == "fast":
            raise ValueError(
                "engine='fast' found no parameter whose per-sample gradient the capture path "
                "computes (it covers nn.Linear, nn.Conv1d/2d, nn.Embedding, nn.LayerNorm and "
                "eval-mode BatchNorm parameters used once per forward); use engine='auto' or "
                "engine='vmap'."
            )
        return None
    if split.rest and random_module(plan.model) is not None:
        logger.info("per_sample_grads: random model with parameters off the capture path: vmap")
        return None
    return split


def capture_forward(
    plan: Plan, split: FastSplit, b: Batch
) -> tuple[torch.Tensor, dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    """One forward pass recording, for every module of ``split.fast`` (hooked layers
    only), its input and a zero perturbation ``e`` added to its output:
    ``(output, {module: (input, e)})``.

    Raises:
        RuntimeError: a captured module did not run, or its input was modified in place
            after it ran (the captured input would be stale).
    """
    store: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, int]] = {}
    twice: set[nn.Module] = set()

    def hook(m: nn.Module, inp: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if m in store:
            twice.add(m)
        e = zero_perturbation(out)
        store[m] = (inp[0].detach(), e, inp[0]._version)
        return out + e

    out = hooked_output(plan.model, b, plan.output_fn, plan.where, [(m, hook) for m in split.fast])
    check_captured(
        plan.model, twice, [m for m in split.fast if m not in store],
        [(m, a, version) for m, (a, _, version) in store.items()],
        b.size, [(m, a) for m, (a, _, _) in store.items()],
    )  # fmt: skip
    return out, {m: (a, e) for m, (a, e, _) in store.items()}


def capture_grads(
    plan: Plan,
    split: FastSplit,
    b: Batch,
    target: torch.Tensor | None,
    chunk_size: int | None,
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Per-sample gradients ``(N, J, *param.shape)`` in the parameters' dtypes: the capture
    path for ``split.fast``, ``torch.func`` for ``split.rest``, with shared label columns
    (MC labels drawn once, from the capture forward's output); and the names of the
    Linear and Conv parameters whose gradients are finite by a bound (see
    :func:`_finite_by_bound`), which need no check of every entry."""
    out, store = capture_forward(plan, split, b)
    target = plan.check_target(out, target, b)
    draws = plan.draw(out, target) if plan.labels == "mc" else None
    cols = plan.all_columns(out.detach(), target, draws).to(out.dtype)
    J = cols.shape[0]
    mods = list(store)
    es = [store[m][1] for m in mods]
    per = [
        torch.autograd.grad(out, es, cols[j], retain_graph=j < J - 1, allow_unused=True)
        for j in range(J)
    ]
    grads: dict[str, torch.Tensor] = {}
    finite: set[str] = set()
    for i, m in enumerate(mods):
        a, e = store[m]
        zero = torch.zeros((), dtype=e.dtype, device=e.device).expand(e.shape)
        cols_i = [zero if p[i] is None else p[i] for p in per]
        B = cols_i[0].unsqueeze(0) if J == 1 else torch.stack(cols_i)  # (J, *out.shape)
        res = _module_grads(m, a, B)
        proven = _finite_by_bound(m, a, B)
        for s in split.fast[m]:
            if proven and torch.finfo(plan.params[s.name].dtype).max > 2 * proven:
                finite.add(s.name)
            g = res[s.role]
            if s.mask is not None:  # ∂l/∂weight_orig = mask ⊙ ∂l/∂weight
                g = g * getattr(m, s.mask).to(g.dtype)
            grads[s.name] = g.reshape(b.size, J, *plan.params[s.name].shape)
    del per, store
    if split.rest:
        rest = plan.restrict(split.rest)
        chunks = [r for _, r in rest.run(b, target, draws, "grads", chunk_size)]
        for k in split.rest:
            grads[k] = torch.cat([c[k] for c in chunks])
    return {k: grads[k].to(p.dtype) for k, p in plan.params.items()}, finite


def _finite_by_bound(m: nn.Module, a: torch.Tensor, B: torch.Tensor) -> float:
    """For Linear and Conv, a bound on every entry of the per-sample gradients: each is
    a sum of at most ``T`` products ``b·a`` (``T`` positions; bias: ``T`` terms ``b``),
    so ``|g| <= T · max|b| · max(max|a|, 1)``. ``0.0`` (no bound) for other modules, or
    when ``a`` or ``b`` holds NaN or Inf (then every entry is checked)."""
    if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return 0.0
    terms = a.numel() // a.shape[0] // a.shape[-1] if isinstance(m, nn.Linear) else None
    if terms is None:
        terms = B[0, 0, 0].numel()  # output positions of the conv
    amax = float(layers.work(a).abs().amax()) if a.numel() else 0.0
    bmax = float(layers.work(B).abs().amax()) if B.numel() else 0.0
    bound = terms * bmax * max(amax, 1.0)
    return bound if math.isfinite(bound) else 0.0


def _module_grads(m: nn.Module, a: torch.Tensor, B: torch.Tensor) -> dict[str, Any]:
    if isinstance(m, nn.Linear):
        return layers.linear_grads(a, B)
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return layers.conv_grads(m, a, B)
    if isinstance(m, BATCH_NORMS):
        return layers.batch_norm_per_sample(m, a, B)
    if isinstance(m, nn.LayerNorm):
        return layers.layer_norm_grads(m, a, B)
    assert isinstance(m, nn.Embedding)  # grads_split keeps _GRAD_RULES modules only
    return layers.embedding_grads(m, a, B)
