"""The fast exact path: per-layer capture of inputs and output gradients.

For a layer ``z = W a + c`` (Linear; Conv and Embedding likewise), the per-sample
gradient of ``l_n`` is ``∂l_n/∂W = Σ_t b_nt a_ntᵀ`` with ``a_nt`` the layer input and
``b_nt = ∂l_n/∂z_nt`` the output gradient at position ``t``. One forward pass records
``a`` and adds a zero perturbation ``e`` to every layer output; one backward pass with
respect to the perturbations gives every ``b`` at once (no weight gradients are formed).
Then, for each label column ``u_j`` of the label source with weight ``w_j``,

* non-sequence inputs ``(N, D)``: ``Σ_n Σ_j w_j (b_nj a_nᵀ)² = (Σ_j w_j b_j²)ᵀ (a²)``,
  one matrix product per layer;
* sequence inputs ``(N, T, D)`` (and Conv, whose unfolded patches are a sequence):
  ``G_nj = B_njᵀ A_n`` per sample, squared and summed, in chunks of samples so that
  only one chunk of per-sample gradients exists at a time;
* Embedding: rows ``v`` of ``G_nj`` are ``Σ_{t: ids_nt = v} b_njt``, summed by
  (sample, token id) before squaring.

Only parameters that the capture can see exactly take this path: a parameter of a
standard ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Embedding`` whose module
runs once per forward, whose batch axis is the first axis of its input and output,
and which is used once in the graph (so tied weights used twice, or weights read by
``F.linear`` outside their module such as ``nn.MultiheadAttention``'s ``out_proj``,
are excluded). Pruned modules (``torch.nn.utils.prune``: ``weight_orig`` times the
``weight_mask`` buffer) are covered: ``∂l/∂weight_orig = mask ⊙ ∂l/∂weight``. Every
other parameter goes through the general ``vmap`` path of :mod:`natgrad.engine`,
with the same label draws, so both engines give the same Fisher.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from natgrad._batch import Batch, _is_batched
from natgrad.engine import _CHUNK_FLOATS, _Plan, square_sums

__all__ = ["ENGINES", "FastSplit", "split_params"]

ENGINES = ("auto", "vmap", "fast")
_FORWARDS = {
    nn.Linear: nn.Linear.forward,
    nn.Conv1d: nn.Conv1d.forward,
    nn.Conv2d: nn.Conv2d.forward,
    nn.Embedding: nn.Embedding.forward,
}


@dataclass
class _Slot:
    """One fast parameter: its name, its role in the module, its pruning mask buffer."""

    name: str
    role: str
    mask: str | None


@dataclass
class FastSplit:
    """Which parameters take the capture path (by module) and which take ``vmap``.

    Attributes:
        fast: ``{module: [slots]}`` for the capture path.
        rest: parameter names for the general ``vmap`` path.
    """

    fast: dict[nn.Module, list[_Slot]] = field(default_factory=dict)
    rest: list[str] = field(default_factory=list)

    @property
    def fast_names(self) -> list[str]:
        return [s.name for slots in self.fast.values() for s in slots]


def _supported(m: nn.Module) -> bool:
    base = next((t for t in _FORWARDS if isinstance(m, t)), None)
    if base is None or type(m).forward is not _FORWARDS[base]:
        return False
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if isinstance(m, nn.Embedding):
        return m.max_norm is None and not m.scale_grad_by_freq
    return True


def _candidates(plan: _Plan) -> dict[nn.Module, list[_Slot]]:
    name_of = {id(p): k for k, p in plan.params.items()}
    out: dict[nn.Module, list[_Slot]] = {}
    for m in plan.model.modules():
        if not _supported(m):
            continue
        for role in ("weight", "bias"):
            p, mask = m._parameters.get(role), None
            orig = m._parameters.get(f"{role}_orig")
            if p is None and orig is not None and f"{role}_mask" in m._buffers:
                p, mask = orig, f"{role}_mask"
            if p is not None and id(p) in name_of:
                out.setdefault(m, []).append(_Slot(name_of[id(p)], role, mask))
    return out


class _UseCounter(TorchFunctionMode):
    """Counts, per tensor id, the calls that use the tensor to build a differentiable result."""

    def __init__(self, ids: set[int]):
        super().__init__()
        self.ids, self.counts = ids, Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(out)):
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and id(t) in self.ids:
                    self.counts[id(t)] += 1
        return out


def _repeat_first(b: Batch, n: int) -> Batch:
    idx = torch.zeros(n, dtype=torch.long)
    take = lambda t: t[idx.to(t.device)] if _is_batched(t, b.size) else t  # noqa: E731
    return Batch(
        tuple(take(a) for a in b.args), {k: take(v) for k, v in b.kwargs.items()}, None, None, n
    )


def split_params(plan: _Plan, b: Batch) -> FastSplit:
    """Decide, with two probe forwards (1 and 2 copies of the first sample), which
    selected parameters the capture path computes exactly; the rest go to ``vmap``."""
    cands = _candidates(plan)
    named = plan.params
    ids = {id(named[s.name]) for slots in cands.values() for s in slots}
    ok = {m: True for m in cands}
    uses = []
    for n in (1, 2):
        seen: dict[nn.Module, list] = {m: [] for m in cands}

        def hook(m, inp, out, seen=seen):
            a = inp[0] if inp else None
            seen[m].append((a, out))

        handles = [m.register_forward_hook(hook) for m in cands]
        counter = _UseCounter(ids)
        try:
            probe = _repeat_first(b, n)
            with torch.enable_grad(), counter:
                plan.output_fn(plan.model(*probe.args, **probe.kwargs))
        finally:
            for h in handles:
                h.remove()
        uses.append(counter.counts)
        for m, calls in seen.items():
            good = len(calls) == 1 and all(
                isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == n for t in calls[0]
            )
            if good:
                calls[0] = tuple(t.shape[1:] for t in calls[0])
            ok[m] = ok[m] and good
            seen[m] = calls
        if n == 1:
            shapes1 = {m: seen[m][0] for m in cands if ok[m]}
        else:
            for m in cands:
                ok[m] = ok[m] and m in shapes1 and shapes1[m] == seen[m][0]
    split = FastSplit()
    for m, slots in cands.items():
        keep = [s for s in slots if ok[m] and all(u[id(named[s.name])] == 1 for u in uses)]
        if keep:
            split.fast[m] = keep
    fast = set(split.fast_names)
    split.rest = [k for k in named if k not in fast]
    return split


# -- squared per-sample gradients from captured (a, b) -------------------------------


def _work(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _seq_products(A: torch.Tensor, B: torch.Tensor, w: float) -> torch.Tensor:
    """``Σ_j Σ_n w (B_jnᵀ A_n)²`` for ``A (N, T, I)``, ``B (J, N, T, O)``: ``(O, I)``."""
    J, N, _, d_out = B.shape
    d_in = A.shape[-1]
    chunk = max(1, _CHUNK_FLOATS // max(J * d_out * d_in, 1))
    acc = torch.zeros(d_out, d_in, dtype=A.dtype, device=A.device)
    for s in range(0, N, chunk):
        G = torch.matmul(B[:, s : s + chunk].transpose(-1, -2), A[s : s + chunk])
        acc += (G * G).sum((0, 1))
    return acc * w


def _linear(m, a, B, w):
    a, B = _work(a), _work(B)
    if a.dim() == 2:
        b2 = (B * B).sum(0)  # (N, O)
        return {"weight": w * (b2.t() @ (a * a)), "bias": w * b2.sum(0)}
    N = a.shape[0]
    A = a.reshape(N, -1, a.shape[-1])
    Bs = B.reshape(B.shape[0], N, -1, B.shape[-1])
    res = {"weight": _seq_products(A, Bs, w)}
    if m.bias is not None or "bias_orig" in m._parameters:
        bb = Bs.sum(2)
        res["bias"] = w * (bb * bb).sum((0, 1))
    return res


def _conv(m, a, B, w):
    a, B = _work(a), _work(B)
    one = isinstance(m, nn.Conv1d)
    x = a.unsqueeze(2) if one else a
    pair = lambda v: (1, v[0]) if one else v  # noqa: E731
    pad = (0, m.padding[0]) if one else m.padding
    cols = F.unfold(
        x, pair(m.kernel_size), dilation=pair(m.dilation), padding=pad, stride=pair(m.stride)
    )
    A = cols.transpose(1, 2)  # (N, L, K)
    J, N, d_out = B.shape[:3]
    Bs = B.reshape(J, N, d_out, -1).transpose(-1, -2)  # (J, N, L, O)
    res = {"weight": _seq_products(A, Bs, w)}
    bb = Bs.sum(2)
    res["bias"] = w * (bb * bb).sum((0, 1))
    return res


def _embedding(m, ids, B, w):
    B = _work(B)
    V, D = m.num_embeddings, m.embedding_dim
    N = ids.shape[0]
    flat = ids.reshape(N, -1)
    keys = (torch.arange(N, device=ids.device).unsqueeze(1) * V + flat).reshape(-1)
    keep = None if m.padding_idx is None else flat.reshape(-1) != m.padding_idx
    if keep is not None:
        keys = keys[keep]
    uniq, inv = torch.unique(keys, return_inverse=True)
    acc = torch.zeros(V, D, dtype=B.dtype, device=B.device)
    for j in range(B.shape[0]):
        vals = B[j].reshape(-1, D)
        if keep is not None:
            vals = vals[keep]
        S = torch.zeros(len(uniq), D, dtype=B.dtype, device=B.device).index_add_(0, inv, vals)
        acc.index_add_(0, uniq % V, S * S)
    return {"weight": w * acc}


def _squares(m, a, B, w):
    if isinstance(m, nn.Linear):
        return _linear(m, a, B, w)
    if isinstance(m, nn.Embedding):
        return _embedding(m, a, B, w)
    return _conv(m, a, B, w)


# -- one batch ------------------------------------------------------------------------


def _pull(out: torch.Tensor, es: list[torch.Tensor], cols: torch.Tensor, retain: bool):
    """Output gradients ``b`` for every column of ``cols`` ``(J, *out.shape)``: ``[(J, ...)]``."""
    cols = cols.to(out.dtype)
    if cols.shape[0] == 1:
        gs = torch.autograd.grad(out, es, cols[0], retain_graph=retain, allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in gs]
    try:
        return list(
            torch.autograd.grad(
                out, es, cols, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        )
    except RuntimeError:  # a backward op without a batching rule: one column at a time
        per = [torch.autograd.grad(out, es, c, retain_graph=True, allow_unused=True) for c in cols]
        return [
            None if per[0][i] is None else torch.stack([p[i] for p in per]) for i in range(len(es))
        ]


def _columns(plan: _Plan, out: torch.Tensor, target, draws) -> Iterator[tuple[torch.Tensor, float]]:
    lik, o = plan.lik, out.detach()
    if plan.labels == "empirical":
        yield lik.output_grad(o, target).unsqueeze(0), 1.0
    elif plan.labels == "mc":
        yield torch.stack([lik.output_grad(o, draws[:, j]) for j in range(plan.k)]), 1.0 / plan.k
    else:
        K = lik.num_factor_columns(o)
        step = plan.exact_chunk or min(K, 32)
        for s in range(0, K, step):
            yield lik.factor_columns(o, s, min(s + step, K), target), 1.0


def fast_batch_sums(
    plan: _Plan, split: FastSplit, batch: Any, chunk_size: int | None
) -> tuple[int, dict[str, torch.Tensor]]:
    """``(N, Σ_n Σ_j w_j g_nj²)`` in float32 for one batch: capture path for
    ``split.fast``, ``vmap`` path for ``split.rest``, with shared label draws."""
    b, target = plan.parse(batch)
    store: dict[nn.Module, tuple] = {}

    def hook(m, inp, out):
        e = torch.zeros((), dtype=out.dtype, device=out.device).requires_grad_().expand(out.shape)
        store[m] = (inp[0].detach(), inp[0]._version, e)
        return out + e

    handles = [m.register_forward_hook(hook) for m in split.fast]
    try:
        with torch.enable_grad():
            out = plan.output_fn(plan.model(*b.args, **b.kwargs))
    finally:
        for h in handles:
            h.remove()
    if target is not None:
        plan.lik.check_target(out, target)
    draws = plan.draw(out, target) if plan.labels == "mc" else None
    acc = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in plan.params.items()}
    mods = list(split.fast)
    missing = [m for m in mods if m not in store]
    if missing:
        raise RuntimeError(
            f"The fast engine expected {type(missing[0]).__name__} to run in this forward pass, "
            "but it did not (the model's control flow changed between batches); use "
            "engine='vmap'."
        )
    es = [store[m][2] for m in mods]
    cols = list(_columns(plan, out, target, draws))
    for i, (c, w) in enumerate(cols):
        bs = _pull(out, es, c, retain=i < len(cols) - 1)
        for m, B in zip(mods, bs):
            if B is None:
                continue
            a, version, _ = store[m]
            if a._version != version:
                raise RuntimeError(
                    f"The input of {type(m).__name__} was modified in place after the layer "
                    "ran, so the captured input is stale; use engine='vmap' for this model."
                )
            sq = _squares(m, a, B, w)
            for s in split.fast[m]:
                v = sq[s.role]
                if s.mask is not None:
                    v = v * getattr(m, s.mask).to(v.dtype) ** 2
                acc[s.name] += v.reshape(acc[s.name].shape).float()
    store.clear()
    if split.rest:
        sub = plan.restrict(split.rest)
        for _, res in sub.run(b, target, draws, "squares", chunk_size):
            for k in sub.params:
                acc[k] += res[k].sum(0)
    return b.size, acc


def square_sums_auto(
    plan: _Plan, batches: Iterable[Any], chunk_size: int | None, engine: str
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Per batch ``(n, Σ_n Σ_j w_j g_nj²)`` by the chosen engine (see :func:`split_params`)."""
    if engine == "vmap":
        yield from square_sums(plan, batches, chunk_size)
        return
    split = None
    for batch in batches:
        if split is None:
            b, _ = plan.parse(batch)
            split = split_params(plan, b)
            if not split.fast and engine == "fast":
                raise ValueError(
                    "engine='fast' found no parameter it can compute exactly (it covers "
                    "parameters of nn.Linear, nn.Conv1d/2d and nn.Embedding used once per "
                    "forward); use engine='auto' or engine='vmap'."
                )
        if not split.fast:
            yield from square_sums(plan, [batch], chunk_size)
        else:
            yield fast_batch_sums(plan, split, batch, chunk_size)
