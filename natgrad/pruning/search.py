"""Cost model and budgeted mask search for structured pruning.

The cost of a model after pruning is a polynomial in the kept counts ``k_g`` of the
groups: every Linear/Conv contributes ``c · Π_{g linked} k_g`` (its input and output
widths are the kept counts of the groups it consumes and produces), every norm and bias
of a pruned width ``c · k_g``, everything else a constant. FLOPs are counted as
``2 × multiply-accumulates`` of Linear and Conv layers (and the attention matmuls), per
sample, forward pass only; elementwise operations are not counted.

The search removes, one at a time, the structure with the smallest predicted loss
increase per unit of cost saved, ``F_ss / Δcost_g``, where ``Δcost_g`` is the cost of one
more structure of group ``g`` at the current kept counts, until the cost is within the
budget; every group keeps at least ``min_keep`` structures. Then, within each group,
the removed set is *rearranged* (Kwon et al. 2022): with the number removed fixed,
single swaps of a removed and a kept structure are made while they lower the block
prediction ``½ 1_Rᵀ F_RR 1_R``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from natgrad.engine.batch import parse_batch
from natgrad.pruning.structures import Group

__all__ = ["BudgetError", "CostModel", "build_cost_model", "greedy_search", "rearrange"]

_CONV = (nn.Conv1d, nn.Conv2d)


class BudgetError(ValueError):
    """A budget that is malformed or that the per-layer minimums make unreachable."""


@dataclass
class CostModel:
    """``cost(k) = Σ_terms c · Π_{g ∈ term} k_g`` for FLOPs and for parameters.

    Attributes:
        flops_terms: ``[(coefficient, group names)]``.
        params_terms: the same for the parameter count.
        sizes: ``{group name: full size}``.
    """

    flops_terms: list[tuple[float, tuple[str, ...]]]
    params_terms: list[tuple[float, tuple[str, ...]]]
    sizes: dict[str, int]

    def terms(self, kind: str) -> list[tuple[float, tuple[str, ...]]]:
        return self.flops_terms if kind == "flops" else self.params_terms

    def total(self, kind: str, kept: Mapping[str, int] | None = None) -> float:
        """The cost at kept counts ``kept`` (default: nothing removed)."""
        kept = self.sizes if kept is None else kept
        return sum(c * math.prod(kept[g] for g in gs) for c, gs in self.terms(kind))

    def saving(self, kind: str, name: str, kept: Mapping[str, int]) -> float:
        """Cost saved by removing one more structure of group ``name``."""
        out = 0.0
        for c, gs in self.terms(kind):
            if name in gs:
                out += c * math.prod(kept[g] for g in gs if g != name) * gs.count(name)
        return out


def build_cost_model(model: nn.Module, groups: list[Group], example: Any) -> CostModel:
    """The FLOPs and parameter polynomials of ``model`` pruned along ``groups``.

    One sample of ``example`` is run through the model to find each layer's number of
    output positions (tokens, or spatial positions of a conv).
    """
    b = parse_batch(example).select(0, 1)
    produced = {r: g for g in groups for r in g.row_modules}
    consumed = {g.consumer: g for g in groups if g.consumer_kind != "attention"}
    normed = {n: g for g in groups for n in g.norms}
    heads = {g.producer: g for g in groups if g.consumer_kind == "attention"}
    hf_heads = [g for g in groups if g.kind == "head" and g.consumer_kind != "attention"]
    positions: dict[str, int] = {}  # output positions of each Linear / conv
    attn_positions: dict[str, tuple[int, int]] = {}  # (query, key) lengths of attention
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, *_CONV)):

            def hook(
                m: nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name
            ) -> None:
                channels = out.shape[-1] if isinstance(m, nn.Linear) else out.shape[1]
                positions[name] = positions.get(name, 0) + out.numel() // channels

            handles.append(mod.register_forward_hook(hook))
        if isinstance(mod, nn.MultiheadAttention) or hasattr(mod, "_natgrad_head_mask"):

            def ahook(
                m: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                out: Any,
                name: str = name,
            ) -> None:
                q = args[0] if args else kwargs["query"]
                k = args[1] if len(args) > 1 else kwargs.get("key", q)
                batch_first = getattr(m, "batch_first", True)
                tq = q.shape[1] if batch_first and q.dim() == 3 else q.shape[0]
                tk = k.shape[1] if batch_first and k.dim() == 3 else k.shape[0]
                attn_positions[name] = (tq, tk)

            handles.append(mod.register_forward_hook(ahook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*b.args, **b.kwargs)
    finally:
        for h in handles:
            h.remove()
    flops: list[tuple[float, tuple[str, ...]]] = []
    params: list[tuple[float, tuple[str, ...]]] = []
    counted: set[int] = set()
    for name, mod in model.named_modules():
        if any(name.startswith(h + ".") for h in heads):
            continue  # the projections of a head group are in its per-head term
        if name in heads:
            g = heads[name]
            tq, tk = attn_positions.get(name, (0, 0))
            e = g.size * g.head_dim
            hd = g.head_dim
            # q/k/v and out projections + the two attention matmuls, linear in the heads
            per_head = 2 * (tq * e * hd + 2 * tk * e * hd + tq * hd * e) + 2 * 2 * tq * tk * hd
            flops.append((float(per_head), (g.name,)))
            params.append((float(4 * e * hd + 3 * hd), (g.name,)))
            params.append((float(e), ()))  # out_proj bias
            for p in mod.parameters():
                counted.add(id(p))
            continue
        if isinstance(mod, (nn.Linear, *_CONV)):
            links: tuple[str, ...] = ()
            div = 1
            if name in produced:
                links += (produced[name].name,)
                div *= produced[name].size
            if name in consumed:
                links += (consumed[name].name,)
                div *= consumed[name].size
            w = mod.weight.numel()
            flops.append((2.0 * w * positions.get(name, 0) / div, links))
            params.append((w / div, links))
            counted.add(id(mod.weight))
            if mod.bias is not None:
                out_link = (produced[name].name,) if name in produced else ()
                params.append((mod.bias.numel() / (produced[name].size if out_link else 1), out_link))
                counted.add(id(mod.bias))
        elif name in normed:
            g = normed[name]
            for p in mod.parameters(recurse=False):
                params.append((p.numel() / g.size, (g.name,)))
                counted.add(id(p))
    for g in hf_heads:  # QKᵀ and AV of a Hugging Face style self-attention, per head
        t = positions.get(g.rows[0], 0)
        flops.append((4.0 * t * t * g.head_dim, (g.name,)))
    rest = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    if rest:
        params.append((float(rest), ()))
    return CostModel(flops, params, {g.name: g.size for g in groups})


def greedy_search(
    scores: Mapping[str, torch.Tensor],
    cost: CostModel,
    *,
    kind: str,
    keep: float,
    min_keep: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """Remove structures by smallest ``score / cost saved`` until ``cost <= keep · cost_full``.

    Args:
        scores: ``{group name: (S,)}`` predicted loss increase of removing each structure
            (the diagonal mask Fisher, or a baseline score).
        cost: the cost model.
        kind: ``"flops"`` or ``"params"``.
        keep: fraction of the cost to keep, in ``(0, 1]``.
        min_keep: the smallest kept count of each group.

    Returns:
        ``{group name: indices removed (ascending)}``.

    Raises:
        BudgetError: when the minimums keep the cost above the budget.
    """
    target = keep * cost.total(kind)
    kept = dict(cost.sizes)
    order = {g: torch.argsort(s.double().cpu(), stable=True).tolist() for g, s in scores.items()}
    sc = {g: s.double().cpu().tolist() for g, s in scores.items()}
    removed: dict[str, list[int]] = {g: [] for g in scores}
    total = cost.total(kind, kept)
    while total > target * (1 + 1e-12):
        best, best_val = None, math.inf
        for g in scores:
            if kept[g] <= min_keep[g]:
                continue
            save = cost.saving(kind, g, kept)
            if save <= 0:
                continue
            val = sc[g][order[g][len(removed[g])]] / save
            if val < best_val:
                best, best_val = g, val
        if best is None:
            floor = cost.total(kind, kept) / cost.total(kind)
            raise BudgetError(
                f"The {kind} budget keep={keep:g} is out of reach: with every prunable layer "
                f"at its minimum (min_keep) the model keeps {floor:.3f} of its {kind}. Pass a "
                f"budget >= {floor:.3f}, or lower min_keep."
            )
        removed[best].append(order[best][len(removed[best])])
        kept[best] -= 1
        total = cost.total(kind, kept)
    return {g: torch.tensor(sorted(r), dtype=torch.long) for g, r in removed.items()}


def rearrange(block: torch.Tensor, removed: torch.Tensor, max_swaps: int = 1000) -> torch.Tensor:
    """Swap removed/kept structures of one group while ``½ 1_Rᵀ F_RR 1_R`` decreases.

    With ``r = F 1_R``, swapping ``i ∈ R`` for ``j ∉ R`` changes ``1_Rᵀ F 1_R`` by
    ``-2 r_i + F_ii + 2 r_j - 2 F_ij + F_jj``; the best swap is made while it is negative.

    Args:
        block: the group's ``(S, S)`` block Fisher.
        removed: indices removed (the count stays fixed).

    Returns:
        the rearranged removed indices (ascending).
    """
    s = block.shape[0]
    k = removed.numel()
    if k == 0 or k == s:
        return removed.clone()
    f = block.double().cpu()
    inr = torch.zeros(s, dtype=torch.bool)
    inr[removed.cpu()] = True
    d = f.diagonal()
    for _ in range(max_swaps):
        r = f[:, inr].sum(1)
        out_i = torch.nonzero(inr).flatten()
        in_j = torch.nonzero(~inr).flatten()
        delta = (
            (-2 * r[out_i] + d[out_i])[:, None]
            + (2 * r[in_j] + d[in_j])[None, :]
            - 2 * f[out_i][:, in_j]
        )
        best = int(torch.argmin(delta))
        val = float(delta.flatten()[best])
        scale = float(f[inr][:, inr].sum().abs()) + 1e-300
        if val >= -1e-12 * scale:
            break
        i, j = out_i[best // len(in_j)], in_j[best % len(in_j)]
        inr[i], inr[j] = False, True
    return torch.nonzero(inr).flatten()
