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
from typing import Any, cast

import torch
from torch import nn

from natgrad.engine.batch import parse_batch
from natgrad.engine.capture_layers import is_hf_conv1d
from natgrad.pruning.structures import UNPRUNED_CONVS, Group

__all__ = [
    "BudgetError",
    "CostModel",
    "build_cost_model",
    "greedy_search",
    "rearrange",
    "nested_order",
    "knapsack_search",
    "curve_greedy_search",
]

_CONV = (nn.Conv1d, nn.Conv2d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


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
        index = self.__dict__.setdefault("_index", {})
        if (kind, name) not in index:
            index[(kind, name)] = [(c, gs) for c, gs in self.terms(kind) if name in gs]
        out = 0.0
        for c, gs in index[(kind, name)]:
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
        if isinstance(mod, (nn.Linear, *_CONV, *UNPRUNED_CONVS)) or is_hf_conv1d(mod):

            def hook(
                m: nn.Module, args: tuple[Any, ...], out: torch.Tensor, name: str = name
            ) -> None:
                last = isinstance(m, nn.Linear) or is_hf_conv1d(m)
                if isinstance(m, _TRANSPOSED):  # MACs: input positions x weight entries
                    out = args[0]
                channels = out.shape[-1] if last else out.shape[1]
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
            # the residual width (not heads x head_dim: that is smaller once heads went)
            e = int(getattr(mod, "embed_dim", g.size * g.head_dim))
            hd = g.head_dim
            # q/k/v and out projections + the two attention matmuls, linear in the heads
            per_head = 2 * (tq * e * hd + 2 * tk * e * hd + tq * hd * e) + 2 * 2 * tq * tk * hd
            flops.append((float(per_head), (g.name,)))
            params.append((float(4 * e * hd + 3 * hd), (g.name,)))
            params.append((float(e), ()))  # out_proj bias
            for p in mod.parameters():
                counted.add(id(p))
            continue
        if isinstance(mod, (nn.Linear, *_CONV, *UNPRUNED_CONVS)):
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
            if id(mod.weight) not in counted:  # a weight tied to another layer counts once
                params.append((w / div, links))
                counted.add(id(mod.weight))
            if mod.bias is not None and id(mod.bias) not in counted:
                out_link = (produced[name].name,) if name in produced else ()
                params.append((mod.bias.numel() / (produced[name].size if out_link else 1), out_link))
                counted.add(id(mod.bias))
        elif is_hf_conv1d(mod):  # never pruned (groups see it converted): a constant
            weight = cast(torch.Tensor, mod.weight)
            flops.append((2.0 * weight.numel() * positions.get(name, 0), ()))
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


def rearrange(
    block: torch.Tensor, removed: torch.Tensor, max_swaps: int = 1000, candidates: int = 16
) -> torch.Tensor:
    """Swap removed/kept structures of one group while ``½ 1_Rᵀ F_RR 1_R`` decreases.

    With ``r = F 1_R``, swapping ``i ∈ R`` for ``j ∉ R`` changes ``1_Rᵀ F 1_R`` by
    ``-2 r_i + F_ii + 2 r_j - 2 F_ij + F_jj``. Each step takes the ``candidates`` best
    ``i`` (largest ``2 r_i - F_ii``) and ``j`` (smallest ``2 r_j + F_jj``), makes the best
    of their swaps while it is negative, and updates ``r`` in place (``O(S)`` per swap).

    Args:
        block: the group's ``(S, S)`` block Fisher.
        removed: indices removed (the count stays fixed).
        max_swaps: at most this many swaps.
        candidates: ``i`` and ``j`` examined per swap (all of them when the group is small).

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
    r = f[:, inr].sum(1)
    inf = torch.tensor(math.inf, dtype=torch.float64)
    for _ in range(max_swaps):
        gain_i = torch.where(inr, -2 * r + d, inf)  # contribution of leaving R
        cost_j = torch.where(inr, inf, 2 * r + d)  # contribution of joining R
        out_i = torch.topk(gain_i, min(candidates, k), largest=False).indices
        in_j = torch.topk(cost_j, min(candidates, s - k), largest=False).indices
        delta = gain_i[out_i][:, None] + cost_j[in_j][None, :] - 2 * f[out_i][:, in_j]
        best = int(torch.argmin(delta))
        val = float(delta.flatten()[best])
        scale = float(r[inr].sum().abs()) + 1e-300
        if val >= -1e-12 * scale:
            break
        i, j = int(out_i[best // len(in_j)]), int(in_j[best % len(in_j)])
        inr[i], inr[j] = False, True
        r += f[:, j] - f[:, i]
    return torch.nonzero(inr).flatten()


def nested_order(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A removal order of one group's structures and the block prediction of each prefix.

    Structures are added to the removed set ``R`` one at a time, each time the one that
    raises ``1_Rᵀ F 1_R`` least (``F_ii + 2 Σ_{j∈R} F_ij``), so the curve uses the
    off-diagonal block Fisher, not just ``F_ii``.

    Args:
        block: the group's ``(S, S)`` block score matrix (a diagonal matrix for scores
            without interactions).

    Returns:
        ``(order, values)``: ``order`` the ``S`` indices in removal order; ``values`` of
        length ``S + 1``, ``values[k] = ½ 1_Rᵀ F 1_R`` for ``R`` the first ``k``.
    """
    f = block.double().cpu()
    s = f.shape[0]
    d = f.diagonal().clone()
    r = torch.zeros(s, dtype=torch.float64)  # r_i = Σ_{j∈R} F_ij
    free = torch.ones(s, dtype=torch.bool)
    order = torch.empty(s, dtype=torch.long)
    values = torch.zeros(s + 1, dtype=torch.float64)
    for k in range(s):
        inc = torch.where(free, d + 2 * r, torch.full_like(d, math.inf))
        i = int(torch.argmin(inc))
        order[k] = i
        values[k + 1] = values[k] + 0.5 * float(inc[i])
        free[i] = False
        r += f[:, i]
    return order, values


def knapsack_search(
    curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    cost: CostModel,
    *,
    kind: str,
    keep: float,
    min_keep: Mapping[str, int],
    bins: int = 2000,
    rounds: int = 8,
) -> dict[str, torch.Tensor]:
    """Choose how many structures each group loses: a multiple-choice knapsack on the
    predicted loss increase under the budget.

    Each group ``g`` has a removal order and a curve ``v_g(j)`` (the predicted loss
    increase of removing its first ``j``; :func:`nested_order`). The search minimizes
    ``Σ_g v_g(j_g)`` subject to ``cost(k) <= keep · cost_full`` with ``k_g = S_g - j_g >=
    min_keep_g``, by dynamic programming over the groups with the cost saved discretized
    into ``bins`` steps of ``(cost_full - target) / bins`` (rounded down, so a solution of
    the discretized problem is feasible for its linearized costs).

    The cost polynomial couples groups (a Linear between two pruned layers costs
    ``k_in · k_out``), so each group's saving per structure is linearized at the current
    solution (secant from full width, with the other groups at their current kept
    counts) and the knapsack is solved again, ``rounds`` times at most; structures are
    then removed greedily (smallest ``Δv / Δcost``) until the exact cost is within budget.

    Args:
        curves: ``{group name: (order, values)}`` from :func:`nested_order`.
        cost: the cost model.
        kind: ``"flops"`` or ``"params"``.
        keep: fraction of the cost to keep, in ``(0, 1]``.
        min_keep: the smallest kept count of each group.
        bins: resolution of the dynamic program.
        rounds: linearization rounds.

    Returns:
        ``{group name: indices removed (ascending)}``.

    Raises:
        BudgetError: when the minimums keep the cost above the budget.
    """
    names = list(curves)
    full = cost.total(kind)
    target = keep * full
    floor_kept = {g: min_keep[g] for g in names}
    floor = cost.total(kind, {**cost.sizes, **floor_kept})
    if floor > target * (1 + 1e-12):
        raise BudgetError(
            f"The {kind} budget keep={keep:g} is out of reach: with every prunable layer "
            f"at its minimum (min_keep) the model keeps {floor / full:.3f} of its {kind}. Pass a "
            f"budget >= {floor / full:.3f}, or lower min_keep."
        )
    need = full - target
    removed_n = {g: 0 for g in names}
    if need <= 0:
        return {g: torch.zeros(0, dtype=torch.long) for g in names}
    values = {g: curves[g][1].double().cpu() for g in names}
    seen: set[tuple[int, ...]] = set()
    best: dict[str, int] | None = None
    best_val = math.inf
    for _ in range(rounds):
        kept = {g: cost.sizes[g] - removed_n[g] for g in names}
        per = {}
        for g in names:
            at_full = cost.total(kind, {**kept, g: cost.sizes[g]})
            if removed_n[g] > 0:
                per[g] = (at_full - cost.total(kind, kept)) / removed_n[g]
            else:
                per[g] = cost.saving(kind, g, {**kept, g: cost.sizes[g]})
        choice = _mck(names, values, per, cost.sizes, min_keep, need, bins)
        key = tuple(choice[g] for g in names)
        if key in seen:
            break
        seen.add(key)
        removed_n = choice
        # the linearized costs are off where groups couple: make the choice exactly feasible
        # (remove more), then give back what still fits; keep the best over the rounds
        fixed = _restore(values, cost, kind, keep, _fill(values, cost, kind, keep, min_keep, dict(choice)))
        val = sum(float(values[g][fixed[g]]) for g in names)
        if val < best_val:
            best, best_val = fixed, val
    assert best is not None  # the first round always gives a candidate
    return {g: torch.sort(curves[g][0][: best[g]].cpu()).values.to(torch.long) for g in names}


def _restore(
    values: Mapping[str, torch.Tensor],
    cost: CostModel,
    kind: str,
    keep: float,
    removed_n: dict[str, int],
) -> dict[str, int]:
    """Put back the last removed structure of a group, largest ``Δv / Δcost`` first, while
    the cost stays within budget."""
    target = keep * cost.total(kind) * (1 + 1e-12)
    kept = {g: cost.sizes[g] - removed_n[g] for g in values}
    while True:
        cand, cand_val = None, -math.inf
        for g in values:
            j = removed_n[g]
            if j == 0:
                continue
            trial = {**kept, g: kept[g] + 1}
            extra = cost.total(kind, trial) - cost.total(kind, kept)
            if cost.total(kind, trial) > target:
                continue
            val = float(values[g][j] - values[g][j - 1]) / max(extra, 1e-300)
            if val > cand_val:
                cand, cand_val = g, val
        if cand is None:
            return removed_n
        removed_n[cand] -= 1
        kept[cand] += 1


def curve_greedy_search(
    curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    cost: CostModel,
    *,
    kind: str,
    keep: float,
    min_keep: Mapping[str, int],
) -> dict[str, torch.Tensor]:
    """Greedy search along removal curves: repeatedly take the next structure of the group
    whose curve rises least per unit of cost saved, ``(v_g(j+1) - v_g(j)) / Δcost_g``,
    until the cost is within budget; then put back, largest ``Δv / Δcost`` first, what
    still fits (one removal can overshoot the budget by a lot).

    Args:
        curves: ``{group name: (order, values)}`` (:func:`nested_order`).
        cost: the cost model.
        kind: ``"flops"`` or ``"params"``.
        keep: fraction of the cost to keep, in ``(0, 1]``.
        min_keep: the smallest kept count of each group.

    Returns:
        ``{group name: indices removed (ascending)}``.

    Raises:
        BudgetError: when the minimums keep the cost above the budget.
    """
    values = {g: c[1].double().cpu() for g, c in curves.items()}
    removed_n = _fill(values, cost, kind, keep, min_keep, {g: 0 for g in curves})
    removed_n = _restore(values, cost, kind, keep, removed_n)
    return {
        g: torch.sort(curves[g][0][: removed_n[g]].cpu()).values.to(torch.long) for g in curves
    }


def _fill(
    values: Mapping[str, torch.Tensor],
    cost: CostModel,
    kind: str,
    keep: float,
    min_keep: Mapping[str, int],
    removed_n: dict[str, int],
) -> dict[str, int]:
    """Remove more structures, smallest ``Δv / Δcost`` first, until within budget."""
    target = keep * cost.total(kind)
    kept = {g: cost.sizes[g] - removed_n[g] for g in values}
    while cost.total(kind, kept) > target * (1 + 1e-12):
        cand, cand_val = None, math.inf
        for g in values:
            if kept[g] <= min_keep[g]:
                continue
            save = cost.saving(kind, g, kept)
            if save <= 0:
                continue
            j = removed_n[g]
            val = float(values[g][j + 1] - values[g][j]) / save
            if val < cand_val:
                cand, cand_val = g, val
        if cand is None:
            floor = cost.total(kind, kept) / cost.total(kind)
            raise BudgetError(
                f"The {kind} budget keep={keep:g} is out of reach: with every prunable layer "
                f"at its minimum (min_keep) the model keeps {floor:.3f} of its {kind}. Pass a "
                f"budget >= {floor:.3f}, or lower min_keep."
            )
        removed_n[cand] += 1
        kept[cand] -= 1
    return removed_n


def _mck(
    names: list[str],
    values: Mapping[str, torch.Tensor],
    per: Mapping[str, float],
    sizes: Mapping[str, int],
    min_keep: Mapping[str, int],
    need: float,
    bins: int,
) -> dict[str, int]:
    """Multiple-choice knapsack: ``j_g`` removed per group, minimizing ``Σ v_g(j_g)`` with
    ``Σ floor(j_g · per_g / unit) >= bins`` (``unit = need / bins``); the cheapest way to
    save as much as possible when ``bins`` cannot be reached."""
    unit = need / bins
    inf = math.inf
    dp = torch.full((bins + 1,), inf, dtype=torch.float64)
    dp[0] = 0.0
    choice = []
    prev = []
    for g in names:
        jmax = sizes[g] - min_keep[g]
        new = dp.clone()  # j = 0
        ch = torch.zeros(bins + 1, dtype=torch.long)
        pv = torch.arange(bins + 1)
        v = values[g]
        for j in range(1, jmax + 1):
            s = min(bins, int(math.floor(j * per[g] / unit + 1e-9))) if per[g] > 0 else 0
            cand = dp + float(v[j])
            if s == 0:
                better = cand < new
                new = torch.where(better, cand, new)
                ch = torch.where(better, torch.full_like(ch, j), ch)
                pv = torch.where(better, torch.arange(bins + 1), pv)
                continue
            # bins b < bins - s move to b + s; the rest reach the cap
            lo = cand[: bins + 1 - s]
            tgt = new[s:]
            better = lo < tgt
            new[s:] = torch.where(better, lo, tgt)
            ch[s:] = torch.where(better, torch.full_like(lo, j, dtype=torch.long), ch[s:])
            pv[s:] = torch.where(better, torch.arange(bins + 1 - s), pv[s:])
            tail = cand[bins + 1 - s :]
            if tail.numel():
                i = int(torch.argmin(tail))
                if float(tail[i]) < float(new[bins]):
                    new[bins] = tail[i]
                    ch[bins] = j
                    pv[bins] = bins + 1 - s + i
        dp = new
        choice.append(ch)
        prev.append(pv)
    finite = torch.nonzero(torch.isfinite(dp)).flatten()
    b = int(finite.max())  # the full saving when reachable, else the largest reachable
    out = {}
    for gi in range(len(names) - 1, -1, -1):
        out[names[gi]] = int(choice[gi][b])
        b = int(prev[gi][b])
    return out
