"""``prune_structured``: Fisher-guided removal of neurons, channels and heads under a budget.

Steps (Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers",
with physical removal in the spirit of Torch-Pruning):

1. Copy the model; replace each ``nn.MultiheadAttention`` by the equivalent
   :class:`~natgrad.pruning.attention.HeadAttention` and each Hugging Face ``Conv1D`` by
   the equivalent ``nn.Linear`` (put back at the end where pruning left their shape); find the prunable groups by tracing with ``torch.fx``
   (:func:`~natgrad.pruning.structures.find_groups`), or, for Hugging Face models that
   cannot be traced, by their module layout (BERT/RoBERTa, ViT and GPT-2 style heads and
   feed-forward neurons; :func:`~natgrad.pruning.structures.hf_groups`). Transformers 5
   has no ``prune_heads``, so heads are removed by rebuilding the projections and
   updating the attention's head count.
2. Estimate the mask Fisher ``F_g = (1/N) Σ_n g_n g_nᵀ``, ``g_n = ∂l_n/∂m_g`` (exact
   per-sample gradients, per-layer blocks).
3. Search: remove structures by smallest ``F_ss / cost saved`` until the kept FLOPs or
   parameters are within the budget, each layer keeping ``min_keep``; rearrange each
   layer's removed set to lower ``½ 1_Rᵀ F_RR 1_R``. Or (``criterion="compensated"``)
   per-layer curves of the loss increase after the least-squares re-fit (OBS on the
   K-FAC Fisher). ``search="knapsack"`` picks how many structures each layer loses by
   a multiple-choice knapsack over the layers' curves.
4. Shrink: new smaller Linear/Conv/attention modules, sliced BatchNorms; check that the
   shrunken model computes what the masked model computes.
5. Tune (optional): least-squares re-fit of each layer after pruned structures, on a
   calibration set, from its input Gram matrix.
6. Gradual (``rounds=k > 1``): steps 2-5 are repeated ``k`` times on the current model,
   the cost kept going down geometrically to the budget, every re-fit reconstructing the
   original model's layer outputs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args, overload

import torch
from torch import nn

from natgrad.engine.batch import OutputFn, default_output_fn, parse_batch
from natgrad.engine.checks import (
    check_choice,
    check_int,
    check_no_batch_mixing,
    check_no_train_dropout,
)
from natgrad.engine.likelihoods import Likelihood, get_likelihood
from natgrad.engine.options import LabelSource
from natgrad.engine.report import Report
from natgrad.pruning.attention import HeadAttention, from_multihead, to_multihead
from natgrad.pruning.pruned import plain_copy
from natgrad.pruning.search import (
    BudgetError,
    CostModel,
    build_cost_model,
    curve_greedy_search,
    greedy_search,
    knapsack_search,
    nested_order,
    rearrange,
)
from natgrad.pruning.shrink import (
    check_tuning,
    compensated_curves,
    count_flops,
    count_params,
    kept_indices,
    shrink_model,
    tune_layers,
)
from natgrad.pruning.structures import (
    Group,
    MaskFisher,
    UnsupportedStructureError,
    apply_masks_to,
    estimate_mask_fisher,
    find_groups,
)

__all__ = ["prune_structured", "StructuredPruningReport", "CRITERIA", "SEARCHES"]

Criterion = Literal["fisher", "compensated", "magnitude", "random"]
CRITERIA: tuple[Criterion, ...] = get_args(Criterion)
Search = Literal["greedy", "knapsack"]
SEARCHES: tuple[Search, ...] = get_args(Search)


@dataclass
class StructuredPruningReport(Report):
    """What :func:`prune_structured` did, with measured costs and losses.

    Attributes:
        budget: ``(kind, fraction kept)``, kind ``"flops"``, ``"params"`` or ``"latency"``.
        criterion: ``"fisher"``, ``"magnitude"`` or ``"random"``.
        flops_before, flops_after: FLOPs per sample (2 × multiply-accumulates of Linear,
            Conv and attention matmuls), counted by hooks.
        params_before, params_after: parameter counts.
        latency_before, latency_after: ``{batch size: median seconds per forward}``
            (empty when not measured).
        predicted_loss_increase: ``Σ_g ½ 1_Rᵀ F_g[R,R] 1_R`` (block mask Fisher); with
            ``rounds > 1`` the sum over the rounds of each round's prediction (its own
            Fisher, on the model that round pruned, for the structures it removed).
        predicted_loss_increase_diagonal: ``Σ_g ½ Σ_{s∈R} F_g[s,s]`` (summed the same way).
        measured_loss_increase: mean loss after minus before on the data (after tuning);
            None without labels.
        measured_loss_increase_untuned: the same before tuning; with ``rounds > 1``, of
            the original model with every round's structures removed and nothing re-fitted.
        kept: ``{group: (kept, total)}`` (total: the original width).
        removed: ``{group: indices removed}`` (indices into the unpruned layer, every
            round's removals together).
        skipped: ``{module: reason}`` for Linear/Conv/attention modules not pruned.
        tuned_layers: layers re-fitted by least squares.
        seconds: wall time of the whole call (without the latency measurements).

    ``to_dict()`` gives these fields as plain JSON values (``latency_*`` keyed by the
    batch size as a string).
    """

    budget: tuple[str, float]
    criterion: str
    flops_before: float
    flops_after: float
    params_before: int
    params_after: int
    latency_before: dict[int, float] = field(default_factory=dict)
    latency_after: dict[int, float] = field(default_factory=dict)
    predicted_loss_increase: float = 0.0
    predicted_loss_increase_diagonal: float = 0.0
    measured_loss_increase: float | None = None
    measured_loss_increase_untuned: float | None = None
    kept: dict[str, tuple[int, int]] = field(default_factory=dict)
    removed: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    tuned_layers: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def flops_kept(self) -> float:
        """``flops_after / flops_before``."""
        return self.flops_after / self.flops_before

    @property
    def params_kept(self) -> float:
        """``params_after / params_before``."""
        return self.params_after / self.params_before

    @property
    def speedup(self) -> dict[int, float]:
        """``{batch size: latency_before / latency_after}``."""
        return {b: self.latency_before[b] / self.latency_after[b] for b in self.latency_after}

    def __str__(self) -> str:
        lines = [
            f"structured pruning ({self.criterion}, keep {self.budget[1]:g} of {self.budget[0]})",
            f"  FLOPs  {self.flops_before:,.0f} -> {self.flops_after:,.0f} ({self.flops_kept:.3f})",
            f"  params {self.params_before:,} -> {self.params_after:,} ({self.params_kept:.3f})",
        ]
        for b, s in self.speedup.items():
            lines.append(
                f"  latency batch {b}: {self.latency_before[b] * 1e3:.3f} ms -> "
                f"{self.latency_after[b] * 1e3:.3f} ms ({s:.2f}x)"
            )
        lines.append(
            f"  loss increase: predicted {self.predicted_loss_increase:.4g} (diagonal "
            f"{self.predicted_loss_increase_diagonal:.4g}), measured "
            f"{_fmt(self.measured_loss_increase_untuned)} untuned, "
            f"{_fmt(self.measured_loss_increase)} tuned"
        )
        for g, (k, n) in self.kept.items():
            lines.append(f"  {g}: kept {k}/{n}")
        for m, why in self.skipped.items():
            lines.append(f"  skipped {m}: {why}")
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _check_budget(
    flops: float | None, params: float | None, latency: float | None
) -> tuple[str, float]:
    given = {k: v for k, v in (("flops", flops), ("params", params), ("latency", latency)) if v is not None}
    if len(given) != 1:
        raise BudgetError(
            "Give exactly one budget, as the fraction to keep: flops=..., params=... or "
            f"latency=... (e.g. flops=0.5 keeps half the FLOPs); got {sorted(given) or 'none'}."
        )
    (kind, value), = given.items()
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BudgetError(f"The {kind} budget must be a number in (0, 1], got {value!r}.") from None
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise BudgetError(
            f"Invalid {kind} budget {value!r}: it is the fraction to keep and must lie in "
            f"(0, 1] (e.g. {kind}=0.5 removes half)."
        )
    return kind, v


def _min_keep(groups: list[Group], min_keep: float | int) -> dict[str, int]:
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)):
        raise TypeError(f"min_keep must be an int (count) or a float fraction, got {min_keep!r}.")
    if isinstance(min_keep, float) and not 0.0 < min_keep < 1.0:
        raise ValueError(f"min_keep as a fraction must lie in (0, 1), got {min_keep}.")
    if isinstance(min_keep, int) and min_keep < 1:
        raise ValueError(f"min_keep as a count must be >= 1 (no layer may empty), got {min_keep}.")
    out = {}
    for g in groups:
        k = math.ceil(min_keep * g.size) if isinstance(min_keep, float) else min_keep
        out[g.name] = max(1, min(g.size, k))
    return out


def convert_attention(model: nn.Module) -> list[str]:
    """Replace (in place) every supported ``nn.MultiheadAttention`` by the equivalent
    :class:`~natgrad.pruning.attention.HeadAttention`, and every Hugging Face ``Conv1D``
    (GPT-2's transposed Linear, ``y = x W + b``) by the equivalent ``nn.Linear`` with weight
    ``Wᵀ``; return the names of the attention modules converted."""
    return [k for k, what in _convert(model).items() if what == "attention"]


def _convert(model: nn.Module) -> dict[str, str]:
    """:func:`convert_attention`, returning ``{name: "attention" | "conv1d"}`` of every
    module it replaced."""
    done: dict[str, str] = {}
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ == "Conv1D" and hasattr(mod, "nf") and hasattr(mod, "nx"):
            w = mod.weight.detach()
            lin = nn.Linear(mod.nx, mod.nf, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                lin.weight.copy_(w.T)
                lin.bias.copy_(mod.bias.detach())
            lin.weight.requires_grad_(mod.weight.requires_grad)  # frozen stays frozen
            lin.bias.requires_grad_(mod.bias.requires_grad)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, lin)
            done[name] = "conv1d"
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder):
            # its nested-tensor fast path would hand nested tensors to the replacement
            mod.use_nested_tensor = False
    for name, mod in list(model.named_modules()):
        if (
            isinstance(mod, nn.MultiheadAttention)
            and mod._qkv_same_embed_dim
            and mod.in_proj_bias is not None
            and mod.bias_k is None
            and not mod.add_zero_attn
        ):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, from_multihead(mod))
            done[name] = "attention"
    return done


def restore_converted(pruned: nn.Module, model: nn.Module, converted: dict[str, str]) -> list[str]:
    """Put each module :func:`convert_attention` replaced back to its original type where
    pruning left its shape: a :class:`~natgrad.pruning.attention.HeadAttention` that kept
    every head becomes ``nn.MultiheadAttention`` again (``in_proj = [W_q; W_k; W_v]``), and
    every ``nn.Linear`` that stood for a Hugging Face ``Conv1D`` becomes a ``Conv1D`` again
    (weight ``Wᵀ``; of the shrunken shape where rows or columns were removed), each holding
    the pruned model's values (equal to the original exactly when nothing removed or
    re-fitted them). An ``nn.TransformerEncoder``
    none of whose attention modules stays converted gets its ``use_nested_tensor`` back.
    A restored module computes exactly with the pruned model's values: a
    ``torch.nn.utils.prune`` reparametrization of the original (``weight_orig`` /
    ``weight_mask`` and its pre-hook) is not carried over on any path (the conversion
    already baked ``weight_orig * weight_mask`` into the converted module's weight, and a
    re-fit may change pruned entries); a shape kept keeps the original's type and other
    attributes (:func:`~natgrad.pruning.pruned.plain_copy`), a shrunken ``Conv1D`` is new.
    Modifies ``pruned`` in place; returns the names restored.
    """
    restored = []
    for name, what in converted.items():
        orig = model.get_submodule(name)
        try:
            cur = pruned.get_submodule(name)
        except AttributeError:  # its parent was replaced: leave it
            continue
        new: nn.Module | None = None
        if what == "attention" and isinstance(cur, HeadAttention):
            new = to_multihead(cur, cast(nn.MultiheadAttention, orig))
        elif what == "conv1d" and isinstance(cur, nn.Linear) and cur.bias is not None:
            w = cast(torch.Tensor, orig.weight)
            if tuple(cur.weight.shape) == tuple(w.shape[::-1]):
                new = plain_copy(orig)  # a pruning reparametrization made permanent
            else:  # rows or columns removed: a Conv1D(nf, nx) of the new shape
                with torch.random.fork_rng(devices=[]):  # its random init: RNG untouched
                    new = type(orig)(cur.out_features, cur.in_features).to(w.device, w.dtype)
            with torch.no_grad():
                cast(torch.Tensor, new.weight).copy_(cur.weight.T)
                cast(torch.Tensor, new.bias).copy_(cur.bias)
            cast(torch.Tensor, new.weight).requires_grad_(cur.weight.requires_grad)
            cast(torch.Tensor, new.bias).requires_grad_(cur.bias.requires_grad)
            new.train(cur.training)
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(pruned.get_submodule(parent) if parent else pruned, attr, new)
            restored.append(name)
    for name, enc in pruned.named_modules():
        if isinstance(enc, nn.TransformerEncoder) and not any(
            isinstance(m, HeadAttention) for m in enc.modules()
        ):
            enc.use_nested_tensor = cast(nn.TransformerEncoder, model.get_submodule(name)).use_nested_tensor
    return restored


def magnitude_scores(model: nn.Module, groups: list[Group]) -> dict[str, torch.Tensor]:
    """L1 norm of each structure's outgoing weights (producer rows; q/k/v rows and out_proj
    columns for heads), divided by the group's mean so that layers compare."""
    out: dict[str, torch.Tensor] = {}

    def weight(m: nn.Module, attr: str | None = None) -> torch.Tensor:
        w = getattr(m, attr) if attr is not None else m
        t = w.weight
        assert isinstance(t, torch.Tensor)
        return t.detach().abs()

    for g in groups:
        mod = model.get_submodule(g.producer)
        if g.consumer_kind == "attention":
            d = g.head_dim
            w = torch.stack([
                weight(mod, a).view(g.size, d, -1).sum((1, 2))
                for a in ("q_proj", "k_proj", "v_proj")
            ]).sum(0)
            w = w + weight(mod, "out_proj").view(-1, g.size, d).sum((0, 2))
        else:
            # rows of structure s in each of row_blocks fused blocks (GPT-2's [q; k; v])
            w = torch.stack([
                weight(model.get_submodule(r)).reshape(g.row_blocks, g.size, -1).sum((0, 2))
                for r in g.row_modules
            ]).sum(0)
        w = w.double().cpu()
        out[g.name] = w / w.mean().clamp_min(1e-30)
    return out


@overload
def measure_latency(
    models: nn.Module, batch: Any, batch_sizes: Iterable[int], repeats: int = 20,
    clock: str = "wall",
) -> dict[int, float]: ...


@overload
def measure_latency(
    models: list[nn.Module], batch: Any, batch_sizes: Iterable[int], repeats: int = 20,
    clock: str = "wall",
) -> list[dict[int, float]]: ...


@torch.no_grad()
def measure_latency(
    models: nn.Module | list[nn.Module],
    batch: Any,
    batch_sizes: Iterable[int],
    repeats: int = 20,
    clock: str = "wall",
) -> dict[int, float] | list[dict[int, float]]:
    """Median seconds of one forward pass at each batch size (inputs tiled from ``batch``).

    With a list of models, their forwards are interleaved (one of each per repeat), so that
    a change of machine load hits all of them alike; returns one dict per model.
    ``clock="thread"`` times the calling thread's CPU time (``time.thread_time``) instead
    of wall time: on a machine shared by many processes a millisecond forward is often
    descheduled, which wall time counts and CPU time does not (meaningful with
    ``torch.set_num_threads(1)`` on CPU, where all the work runs in the calling thread).
    """
    check_choice("clock", clock, ("wall", "thread"))
    now = time.perf_counter if clock == "wall" else time.thread_time
    many = isinstance(models, (list, tuple))
    mods: list[nn.Module] = list(models) if isinstance(models, (list, tuple)) else [models]
    b = parse_batch(batch)
    out: list[dict[int, float]] = [{} for _ in mods]
    for bs in batch_sizes:
        reps = -(-bs // b.size)

        def tile(t: Any, reps: int = reps, bs: int = bs) -> Any:
            if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == b.size:
                return t.repeat(reps, *([1] * (t.dim() - 1)))[:bs]
            return t

        args = tuple(tile(a) for a in b.args)
        kwargs = {k: tile(v) for k, v in b.kwargs.items()}
        times: list[list[float]] = [[] for _ in mods]
        dev = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        cuda = dev is not None and dev.type == "cuda"

        def sync(cuda: bool = cuda) -> None:
            if cuda:
                torch.cuda.synchronize()
        for _ in range(3):
            for m in mods:
                m(*args, **kwargs)
        for _ in range(repeats):
            for i, m in enumerate(mods):
                sync()
                t0 = now()
                m(*args, **kwargs)
                sync()
                times[i].append(now() - t0)
        for i, t in enumerate(times):
            out[i][bs] = sorted(t)[len(t) // 2]
    return out if many else out[0]


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    data: Any,
    lik: Likelihood,
    output_fn: OutputFn | None = None,
    max_batches: int | None = None,
) -> float | None:
    """Mean per-sample loss over the data, or None when the data has no labels."""
    from natgrad.curvature.estimate import iterate_batches

    total, n = 0.0, 0
    for batch in iterate_batches(data, max_batches):
        b = parse_batch(batch)
        if b.target is None:
            return None
        out = (output_fn or default_output_fn)(model(*b.args, **b.kwargs))
        total += float(lik.nll(out, b.target).sum())
        n += b.size
    return total / max(n, 1)


def _select(
    criterion: str,
    search: str,
    fisher: MaskFisher,
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]] | None,
    model: nn.Module,
    groups: list[Group],
    cost: CostModel,
    kind: str,
    keep: float,
    mins: dict[str, int],
    do_rearrange: bool,
    seed: int,
) -> dict[str, torch.Tensor]:
    if criterion == "compensated":
        assert curves is not None  # computed by prune_structured for this criterion
        if search == "knapsack":
            return knapsack_search(curves, cost, kind=kind, keep=keep, min_keep=mins)
        return curve_greedy_search(curves, cost, kind=kind, keep=keep, min_keep=mins)
    if criterion == "fisher":
        scores = {g.name: fisher.diagonal(g.name) for g in groups}
    elif criterion == "magnitude":
        scores = magnitude_scores(model, groups)
    else:
        gen = torch.Generator().manual_seed(seed)
        scores = {g.name: torch.rand(g.size, generator=gen, dtype=torch.float64) for g in groups}
    if search == "knapsack":
        if criterion == "fisher":
            ladder = {g.name: nested_order(fisher.blocks[g.name]) for g in groups}
        else:
            ladder = {g: nested_order(torch.diag(s)) for g, s in scores.items()}
        removed = knapsack_search(ladder, cost, kind=kind, keep=keep, min_keep=mins)
    else:
        removed = greedy_search(scores, cost, kind=kind, keep=keep, min_keep=mins)
    if criterion == "fisher" and do_rearrange:
        removed = {g: rearrange(fisher.blocks[g], r) for g, r in removed.items()}
    return removed


@dataclass
class _Gradual:
    """What :func:`_prune_gradually` hands back to :func:`prune_structured`."""

    pruned: nn.Module
    untuned: nn.Module
    removed: dict[str, torch.Tensor]
    tuned: list[str]
    predicted: float
    predicted_diagonal: float


def _prune_gradually(
    work: nn.Module,
    groups: list[Group],
    cost: CostModel,
    example: Any,
    data: Any,
    calibration: Any,
    *,
    kind: str,
    keep: float,
    rounds: int,
    mins: dict[str, int],
    exclude: Iterable[str],
    lik: Likelihood,
    labels: LabelSource,
    mc_samples: int,
    seed: int,
    damping: float,
    max_batches: int | None,
    output_fn: OutputFn | None,
    criterion: str,
    search: str,
    rearrange_masks: bool,
    tune: bool,
    tune_scope: str,
    tune_fit: str,
) -> _Gradual:
    """The ``rounds > 1`` schedule of :func:`prune_structured` (see its docstring).

    ``work`` (the converted copy of the input, never modified) and its ``groups``/``cost``
    are the original model; each round finds the groups of the current model again (the
    same module names, smaller sizes), maps their indices back to the original's, and
    re-fits against ``work``'s layer outputs.
    """
    full = cost.total(kind)
    floor = cost.total(kind, mins)
    if floor > keep * full * (1 + 1e-12):
        raise BudgetError(
            f"The {kind} budget keep={keep:g} is out of reach: with every prunable layer at "
            f"its minimum (min_keep) the model keeps {floor / full:.3f} of its {kind}. Pass a "
            f"budget >= {floor / full:.3f}, or lower min_keep."
        )
    by_name = {g.name: g for g in groups}
    # original indices of the structures still kept, per group
    alive = {g.name: torch.arange(g.size) for g in groups}
    current, cur_groups, cur_cost = work, groups, cost
    predicted = predicted_diag = 0.0
    tuned: list[str] = []
    for r in range(1, rounds + 1):
        if r > 1:
            cur_groups, _ = find_groups(current, example, exclude=exclude)
            for cg in cur_groups:
                if cg.name not in by_name or cg.size != alive[cg.name].numel():
                    raise UnsupportedStructureError(
                        f"Round {r} of the gradual schedule found group {cg.name!r} "
                        f"(size {cg.size}) in the shrunken model, which does not match the "
                        "original model's groups; pass rounds=1."
                    )
            cur_cost = build_cost_model(current, cur_groups, example)
        # this round's budget is keep^(r/rounds) of the ORIGINAL cost
        target = keep * full if r == rounds else full * keep ** (r / rounds)
        keep_r = min(1.0, target / cur_cost.total(kind))
        fisher = estimate_mask_fisher(
            current, cur_groups, data, likelihood=lik, labels=labels, mc_samples=mc_samples,
            seed=seed + r - 1, max_batches=max_batches, output_fn=output_fn,
        )
        curves = (
            compensated_curves(
                current, cur_groups, data, likelihood=lik, labels=labels,
                mc_samples=mc_samples, seed=seed + r - 1, damping=damping,
                max_batches=max_batches, output_fn=output_fn,
            )
            if criterion == "compensated"
            else None
        )
        # the minimums are counts of the original widths, which the current groups carry
        cur_mins = {cg.name: mins[cg.name] for cg in cur_groups}
        removed_r = _select(
            criterion, search, fisher, curves, current, cur_groups, cur_cost, kind, keep_r,
            cur_mins, rearrange_masks, seed + r - 1,
        )
        shrunk = shrink_model(_copy(current), cur_groups, removed_r)
        _verify(current, shrunk, cur_groups, removed_r, example, output_fn)
        predicted += fisher.predicted_increase(removed_r, block=True)
        predicted_diag += fisher.predicted_increase(removed_r, block=False)
        for cg in cur_groups:
            alive[cg.name] = alive[cg.name][kept_indices(cg, removed_r[cg.name])]
        removed = {g.name: _complement(alive[g.name], g.size) for g in groups}
        if tune:
            # targets: the original model's layer outputs (the kept rows, original indices)
            tuned = tune_layers(
                work, shrunk, groups, removed, calibration,
                damping=damping, scope=tune_scope, fit=tune_fit, exclude=exclude,
            )
        current = shrunk
    # the same structures removed from the original in one step, not re-fitted: the
    # report's untuned loss, and a check of the index bookkeeping across the rounds
    untuned = shrink_model(_copy(work), groups, removed)
    _verify(work, untuned, groups, removed, example, output_fn)
    return _Gradual(current, untuned, removed, tuned, predicted, predicted_diag)


def _complement(kept: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[kept] = False
    return torch.nonzero(mask).flatten()


def _equal_outputs(a: torch.Tensor, b: torch.Tensor) -> bool:
    tol = {torch.float64: 1e-7, torch.float32: 1e-4}.get(a.dtype, 3e-2)
    scale = float(b.abs().max().clamp_min(1.0))
    return bool((a - b).abs().max() <= tol * scale)


def prune_structured(
    model: nn.Module,
    data: Any,
    *,
    flops: float | None = None,
    params: float | None = None,
    latency: float | None = None,
    rounds: int = 1,
    likelihood: str | Likelihood = "categorical",
    labels: LabelSource = "empirical",
    mc_samples: int = 1,
    calibration: Any = None,
    tune: bool = True,
    tune_scope: str = "consumers",
    tune_fit: str = "weights",
    damping: float = 1e-3,
    criterion: Criterion = "fisher",
    search: Search = "greedy",
    rearrange_masks: bool = True,
    min_keep: float | int = 0.05,
    exclude: Iterable[str] = (),
    max_batches: int | None = None,
    measure: bool = True,
    latency_batch_sizes: Iterable[int] = (1, 32),
    latency_repeats: int = 20,
    seed: int = 0,
    output_fn: OutputFn | None = None,
    finetune_steps: int = 0,
    finetune_lr: float = 1e-4,
) -> tuple[nn.Module, StructuredPruningReport]:
    """Remove neurons, channels and attention heads of ``model`` to fit a budget.

    The mask Fisher ``F_g = (1/N) Σ_n g_n g_nᵀ`` (``g_n = ∂l_n/∂m_g``, exact per-sample
    gradients wrt a mask ``m_s`` on each structure's output) predicts the loss increase
    of removing a set ``R`` as ``½ 1_Rᵀ F_RR 1_R``; a greedy search removes the structures
    with the smallest ``F_ss`` per FLOP (or parameter) saved, each layer keeps
    ``min_keep``, and the removed set of each layer is rearranged to lower the block
    prediction. The model is then shrunk physically and, with ``tune=True``, the layers
    reading pruned structures are re-fitted by least squares,
    ``Wᵀ = (X̃ᵀX̃ + εI)⁻¹ X̃ᵀ Y``, to reproduce the original layer outputs ``Y`` on the
    calibration data.

    Gradual schedule (``rounds=k > 1``): round ``r = 1..k`` keeps at most
    ``C_r = keep^(r/k) · C_0`` of the original model's cost ``C_0`` (FLOPs or parameters),
    so each round keeps about the same fraction ``keep^(1/k)`` of what is left and the
    last one ends within the budget, ``C_k = keep · C_0``. Each round re-estimates the
    criterion (mask Fisher, compensated curves, magnitudes; random scores and
    ``labels="mc"`` draws with seed ``seed + r - 1``) on the current model (shrunken and re-fitted by the rounds before),
    searches for the structures to remove until the current cost is within ``C_r``,
    each layer keeping ``min_keep`` of its *original* width, shrinks, and with
    ``tune=True`` re-fits. The re-fit targets are the *original* dense model's layer
    outputs ``Y`` (restricted to the rows still kept), not the previous round's: its
    least squares only needs the targets and the pruned model's inputs, so fitting to
    the original keeps the reconstruction errors of one round from becoming the targets
    of the next. With ``tune_fit="weights"`` the last round's re-fit is therefore the
    one-step re-fit of the final structure; the rounds change *which* structures go
    (each criterion sees the compensated model). The report compares the original and
    the final model; its predicted loss increase is the sum over the rounds of each
    round's prediction on its own model; ``finetune_steps`` runs once, after the last
    round. Cost: about ``k`` times the criterion and re-fit of one step.

    Args:
        model: the trained model (not modified). Eval mode: no train-mode BatchNorm or
            dropout. Its forward must be traceable by ``torch.fx``, or it is a Hugging Face
            BERT/ViT/GPT-2 style model (then only heads and feed-forward neurons are pruned).
        data: a batch ``(x, y)`` or an iterable of batches for the Fisher (and the
            measured loss).
        flops: the fraction of FLOPs to keep in ``(0, 1]`` (exactly one budget is given).
        params: the fraction of parameters to keep in ``(0, 1]``.
        latency: the fraction of the measured latency to keep, at the largest of
            ``latency_batch_sizes`` (bisection over FLOPs budgets, each shrunk and timed).
        rounds: prune in this many rounds (the gradual schedule above; 1, the default:
            in one step). Not with a ``latency`` budget.
        likelihood: ``"categorical"`` etc. or a :class:`~natgrad.Likelihood`.
        labels: ``"empirical"`` (data labels) or ``"mc"`` (``mc_samples`` draws).
        calibration: batches for mask tuning (default: ``data``).
        tune: re-fit layers by least squares after shrinking.
        tune_scope: ``"consumers"`` (the layers reading pruned structures) or
            ``"downstream"`` (every Linear/Conv from the first of them on, the output layer
            included; grouped convolutions are not re-fitted, and ``skipped`` says so); see
            :func:`~natgrad.pruning.shrink.tune_layers`.
        tune_fit: ``"weights"`` (each re-fitted layer's weight and bias) or ``"masks"``
            (one least-squares scale per kept structure, Kwon et al. 2022; only with
            ``tune_scope="consumers"``).
        damping: ridge ``ε`` of the least squares, relative to the Gram's mean diagonal.
        criterion: ``"fisher"`` (the diagonal mask Fisher, Kwon et al. 2022),
            ``"compensated"`` (per-layer removal curves of the loss increase *after* the
            least-squares re-fit: Optimal Brain Surgeon on the K-FAC Fisher of the layer
            reading the structures, :func:`~natgrad.pruning.shrink.compensated_curves`),
            ``"magnitude"`` (L1 of each structure's weights, per-layer normalized) or
            ``"random"``.
        search: ``"greedy"`` (one structure at a time, smallest predicted increase per
            unit of cost saved) or ``"knapsack"`` (a multiple-choice knapsack over the
            layers' removal curves, :func:`~natgrad.pruning.search.knapsack_search`); the
            same search serves every criterion.
        rearrange_masks: swap within layers to lower the block-Fisher prediction.
        min_keep: per layer, a fraction (float) or a count (int) of structures kept.
        exclude: modules (and the modules inside them) whose own structures (output
            channels, neurons, heads) are never removed and whose weights are never
            re-fitted; the input columns that read a pruned layer before them still go
            (Torch-Pruning's ``ignored_layers``), e.g. ``exclude=["classifier"]``.
        max_batches: batches of ``data`` used.
        measure: measure latency before and after (``latency_repeats`` forwards per size).
        seed: for ``labels="mc"`` and ``criterion="random"``.
        output_fn: model output -> logits (default: tensor, ``.logits`` or ``["logits"]``).
        finetune_steps: optional short fine-tune after shrinking (and tuning): this many
            Adam steps on the mean loss over the batches of ``data`` (cycled), in eval mode
            (BatchNorm statistics stay fixed). 0 (default): no gradient steps.
        finetune_lr: the Adam learning rate of the fine-tune.

    Returns:
        ``(pruned_model, report)``: a new model (same class, smaller modules; each
        parameter keeps its ``requires_grad``, so frozen layers stay frozen) and a
        :class:`StructuredPruningReport`. When the budget removes nothing, the new model
        is a deep copy of ``model`` (same module types: attention is not converted to
        :class:`~natgrad.pruning.attention.HeadAttention`; fine-tuned if
        ``finetune_steps``). Otherwise an ``nn.MultiheadAttention`` that lost no head
        (and every Hugging Face ``Conv1D``, shrunken or not) keeps its type: the
        converted module is put back (:func:`restore_converted`), equal to the original
        exactly unless a re-fit (``tune_scope="downstream"``) changed its weights; only
        an attention that lost heads is a ``HeadAttention``.

    Raises:
        BudgetError: no budget, several, one outside ``(0, 1]``, one the per-layer
            minimums make unreachable, or a latency budget with ``rounds > 1``.
        UnsupportedStructureError: a model that cannot be traced, that has nothing to
            prune, or whose shrunken form would not compute what the masked model computes.
        ValueError: train-mode BatchNorm/dropout, unknown options, ``rounds`` not an
            integer >= 1.
        TypeError: ``data`` is a one-pass iterator (a generator): it is read several
            times, so pass a list of batches or a DataLoader.

    Example:
        >>> import torch, natgrad
        >>> torch.manual_seed(0) and None
        >>> m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> small, rep = natgrad.prune_structured(m, (x, y), params=0.7, measure=False)
        >>> small[0].out_features < 8, rep.params_after <= 0.7 * rep.params_before
        (True, True)
    """
    t_start = time.perf_counter()
    kind, keep = _check_budget(flops, params, latency)
    rounds = check_int("rounds", rounds, 1)
    if rounds > 1 and kind == "latency":
        raise BudgetError(
            f"rounds={rounds} with a latency budget is not supported: the latency search "
            "shrinks and times the model at each of its FLOPs budgets, which a gradual "
            "schedule would turn into a whole multi-round prune per probe. Pass flops=... or "
            "params=... with rounds > 1, or rounds=1 with latency=...."
        )
    finetune_steps = check_int("finetune_steps", finetune_steps, 0)
    if finetune_steps and not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            f"finetune_steps={finetune_steps}, but no parameter of the model requires grad, "
            "so there is nothing to fine-tune: unfreeze the layers to fine-tune "
            "(p.requires_grad_(True)), or pass finetune_steps=0."
        )
    if not (isinstance(finetune_lr, (int, float)) and math.isfinite(finetune_lr) and finetune_lr > 0):
        raise ValueError(f"finetune_lr must be a finite number > 0, got {finetune_lr!r}.")
    check_choice("criterion", criterion, CRITERIA)
    check_choice("search", search, SEARCHES)
    check_tuning(tune_scope, tune_fit, "tune_")
    check_choice("labels", labels, ("empirical", "mc"))
    check_no_batch_mixing(model)
    check_no_train_dropout(model, "structured pruning")
    lik = get_likelihood(likelihood)
    from natgrad.curvature.estimate import iterate_batches
    from natgrad.pruning.pruned import deepcopy_model

    if isinstance(data, Iterator):
        raise TypeError(
            f"data is a one-pass iterator ({type(data).__name__}), but structured pruning "
            "reads the data several times (an example batch, the Fisher, the re-fit and the "
            "loss before and after): pass a list of batches or a DataLoader, e.g. "
            "list(data)."
        )
    exclude = tuple(exclude)  # read twice (groups, re-fit): a generator would run dry
    work = deepcopy_model(model)
    converted = _convert(work)
    example = next(iter(iterate_batches(data)), None)
    if example is None:
        raise ValueError("data holds no batch: structured pruning needs data for the Fisher.")
    groups, skipped = find_groups(work, example, exclude=exclude)
    if not groups:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "it has no Linear/Conv/attention"
        raise UnsupportedStructureError(
            f"Nothing in {type(model).__name__} can be pruned structurally ({why}). "
            "Supported: a Linear/Conv whose outputs reach one Linear/Conv through activations, "
            "dropout, eval BatchNorm, pooling or a flatten; attention heads."
        )
    mins = _min_keep(groups, min_keep)
    cost = build_cost_model(work, groups, example)
    sizes = sorted(set(int(b) for b in latency_batch_sizes))
    calib = calibration if calibration is not None else data
    loss_before = mean_loss(work, data, lik, output_fn, max_batches)
    tuned: list[str] = []
    if rounds > 1:
        gr = _prune_gradually(
            work, groups, cost, example, data, calib, kind=kind, keep=keep, rounds=rounds,
            mins=mins, exclude=exclude, lik=lik, labels=labels, mc_samples=mc_samples,
            seed=seed, damping=damping, max_batches=max_batches, output_fn=output_fn,
            criterion=criterion, search=search, rearrange_masks=rearrange_masks, tune=tune,
            tune_scope=tune_scope, tune_fit=tune_fit,
        )
        pruned, removed, tuned = gr.pruned, gr.removed, gr.tuned
        predicted, predicted_diag = gr.predicted, gr.predicted_diagonal
        if not any(len(r) for r in removed.values()):
            # nothing removed: the model itself, its attention modules unconverted
            pruned, tuned = deepcopy_model(model), []
        else:  # attention / Conv1D whose shape pruning left: original types
            restore_converted(pruned, model, converted)
        loss_untuned = mean_loss(gr.untuned, data, lik, output_fn, max_batches)
    else:
        # the Fisher is estimated for every criterion: its predictions go into the report
        fisher: MaskFisher = estimate_mask_fisher(
            work, groups, data, likelihood=lik, labels=labels, mc_samples=mc_samples,
            seed=seed, max_batches=max_batches, output_fn=output_fn,
        )
        curves = (
            compensated_curves(
                work, groups, data, likelihood=lik, labels=labels, mc_samples=mc_samples,
                seed=seed, damping=damping, max_batches=max_batches, output_fn=output_fn,
            )
            if criterion == "compensated"
            else None
        )
        lat_dense = (
            measure_latency(work, example, sizes, latency_repeats) if kind == "latency" else {}
        )

        def build(kind_: str, keep_: float) -> tuple[dict[str, torch.Tensor], nn.Module]:
            removed_ = _select(
                criterion, search, fisher, curves, work, groups, cost, kind_, keep_, mins,
                rearrange_masks, seed,
            )
            return removed_, shrink_model(_copy(work), groups, removed_)

        if kind == "latency":
            removed, pruned = _latency_search(
                build, cost, keep, lat_dense, example, sizes, latency_repeats
            )
        else:
            removed, pruned = build(kind, keep)
        untouched = not any(len(r) for r in removed.values())
        if untouched:  # nothing removed: the model itself, its attention modules unconverted
            pruned = deepcopy_model(model)
        else:
            _verify(work, pruned, groups, removed, example, output_fn)
        loss_untuned = mean_loss(pruned, data, lik, output_fn, max_batches)
        if tune and not untouched:
            tuned = tune_layers(
                work, pruned, groups, removed, calib,
                damping=damping, scope=tune_scope, fit=tune_fit, exclude=exclude,
            )
        if not untouched:  # attention / Conv1D whose shape pruning left: original types
            restore_converted(pruned, model, converted)
        predicted = fisher.predicted_increase(removed, block=True)
        predicted_diag = fisher.predicted_increase(removed, block=False)
    if finetune_steps:
        finetune(pruned, data, lik, steps=finetune_steps, lr=finetune_lr, output_fn=output_fn)
    loss_after = (
        mean_loss(pruned, data, lik, output_fn, max_batches)
        if tune or finetune_steps
        else loss_untuned
    )
    if tune and tune_scope == "downstream":
        for name, mod in pruned.named_modules():
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.groups != 1:
                note = "not re-fitted by tune_scope='downstream' (a grouped convolution keeps its weights)"
                skipped[name] = f"{skipped[name]}; {note}" if name in skipped else note
    seconds = time.perf_counter() - t_start
    lat_before, lat_after = (
        measure_latency([work, pruned], example, sizes, latency_repeats) if measure else ({}, {})
    )
    report = StructuredPruningReport(
        budget=(kind, keep),
        criterion=criterion,
        flops_before=count_flops(work, example),
        flops_after=count_flops(pruned, example),
        params_before=count_params(work),
        params_after=count_params(pruned),
        latency_before=lat_before,
        latency_after=lat_after,
        predicted_loss_increase=predicted,
        predicted_loss_increase_diagonal=predicted_diag,
        measured_loss_increase=(
            None if loss_before is None or loss_after is None else loss_after - loss_before
        ),
        measured_loss_increase_untuned=(
            None if loss_before is None or loss_untuned is None else loss_untuned - loss_before
        ),
        kept={g.name: (g.size - len(removed[g.name]), g.size) for g in groups},
        removed={g: r.tolist() for g, r in removed.items()},
        skipped=skipped,
        tuned_layers=tuned,
        seconds=seconds,
    )
    return pruned, report


def finetune(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    steps: int,
    lr: float = 1e-4,
    output_fn: OutputFn | None = None,
) -> nn.Module:
    """A short fine-tune in place: ``steps`` Adam steps on the mean negative log-likelihood
    of the batches of ``data`` (cycled), the model staying in its current (eval) mode.

    Args:
        model: the model to update (modified).
        data: a batch ``(x, y)`` or an iterable of batches (labels needed).
        likelihood: name or :class:`~natgrad.Likelihood`.
        steps: number of Adam steps.
        lr: Adam learning rate.
        output_fn: model output -> logits.

    Returns:
        ``model``.

    Raises:
        ValueError: when a batch has no labels.
    """
    from natgrad.curvature.estimate import iterate_batches

    lik = get_likelihood(likelihood)
    fn = output_fn or default_output_fn
    batches = [parse_batch(b) for b in iterate_batches(data)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    for step in range(steps):
        b = batches[step % len(batches)]
        if b.target is None:
            raise ValueError("finetune needs labels: pass (x, y) batches.")
        opt.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = lik.nll(fn(model(*b.args, **b.kwargs)), b.target).mean()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
    return model


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def _latency_search(
    build: Callable[[str, float], tuple[dict[str, torch.Tensor], nn.Module]],
    cost: CostModel,
    keep: float,
    lat_before: dict[int, float],
    example: Any,
    sizes: list[int],
    repeats: int,
) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """Largest FLOPs budget whose shrunken model runs within ``keep`` of the latency at the
    largest batch size (bisection, 8 steps)."""
    bs = max(sizes)
    target = keep * lat_before[bs]
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(8):
        mid = (lo + hi) / 2
        try:
            removed, pruned = build("flops", mid)
        except BudgetError:
            lo = mid
            continue
        t = measure_latency(pruned, example, [bs], repeats)[bs]
        if t <= target:
            best, lo = (removed, pruned), mid
        else:
            hi = mid
    if best is None:
        raise BudgetError(
            f"The latency budget keep={keep:g} was not reached: even the smallest FLOPs budget "
            f"tried ({hi:.3f}) ran slower than {target * 1e3:.3f} ms at batch {bs}. Pass a "
            "larger latency fraction, or a flops budget."
        )
    return best


def _verify(
    work: nn.Module,
    pruned: nn.Module,
    groups: list[Group],
    removed: dict[str, torch.Tensor],
    example: Any,
    output_fn: OutputFn | None,
) -> None:
    """Raise unless the shrunken model computes what the masked model computes."""
    b = parse_batch(example)
    fn = output_fn or default_output_fn
    ref = next(iter(work.parameters()))
    masks = {}
    for g in groups:
        m = torch.ones(g.size, dtype=ref.dtype, device=ref.device)
        m[removed[g.name].to(ref.device)] = 0
        masks[g.name] = m
    with torch.no_grad(), apply_masks_to(work, groups, masks):
        want = fn(work(*b.args, **b.kwargs))
    with torch.no_grad():
        got = fn(pruned(*b.args, **b.kwargs))
    if got.shape != want.shape or not _equal_outputs(got, want):
        raise UnsupportedStructureError(
            "The shrunken model does not compute what the masked model computes (max "
            f"difference {float((got - want).abs().max()) if got.shape == want.shape else 'shape'}); "
            "some coupling between layers was not found by tracing. Exclude the layers "
            "involved with exclude=[...]."
        )
