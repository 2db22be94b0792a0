"""The fast exact path: per-layer capture of inputs and output gradients.

For a layer ``z = W a + c`` (Linear; Conv and Embedding likewise), the per-sample
gradient of ``l_n`` is ``∂l_n/∂W = Σ_t b_nt a_ntᵀ`` with ``a_nt`` the layer input and
``b_nt = ∂l_n/∂z_nt`` the output gradient at position ``t``. One forward pass records
``a`` and every layer output ``z``; one backward pass with respect to the outputs gives
every ``b`` (no weight gradients are formed). With one label column whose output
gradients are large (more than ``_GROUP_FLOATS`` floats), each layer's ``b`` is used by
a hook as soon as the backward pass forms it, and freed with the layer's ``a``, so that
the peak memory is that of the forward pass (see :func:`_stream_column`); a small
column is pulled back at once, which skips the hooks' fixed cost.
Then, for each label column ``u_j`` of the label source with weight ``w_j``,

* non-sequence inputs ``(N, D)``: ``Σ_n Σ_j w_j (b_nj a_nᵀ)² = (Σ_j w_j b_j²)ᵀ (a²)``,
  one matrix product per layer;
* sequence inputs ``(N, T, D)`` (and Conv, whose unfolded patches are a sequence):
  ``G_nj = B_njᵀ A_n`` per sample, squared and summed, in chunks of samples so that
  only one chunk of per-sample gradients exists at a time;
* Embedding: rows ``v`` of ``G_nj`` are ``Σ_{t: ids_nt = v} b_njt``, summed by
  (sample, token id) before squaring.

LayerNorm gives ``∂l_n/∂γ = Σ_t b_nt ⊙ x̂_nt`` and ``∂l_n/∂β = Σ_t b_nt``, and so does
eval-mode BatchNorm (``x̂`` from the running statistics; ``t`` runs over positions).
Grouped convolutions take the product per group. Self-attention
(``nn.MultiheadAttention``, packed projections, ``need_weights=False``) records its two
projections through a torch-function mode (see :mod:`natgrad.engine.capture_ops`), and a free
parameter added to a batched tensor through views (``x + pos[:T]``) is pulled back
through those views.

Only parameters that the capture can see exactly take this path: a parameter of a
standard ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Embedding`` /
``nn.LayerNorm`` / ``nn.MultiheadAttention`` or Hugging Face ``Conv1D`` (GPT-2; a Linear
with the weight stored as ``(in, out)``) whose module runs once per forward, whose
batch axis is the first axis of its input and output, and which is used once in the
graph (weights read by ``F.linear`` outside their module are excluded). A module
found running on rows that are not the batch's samples (index routing, a mixture of
experts' ``out[idx] = expert(x[idx])``) is moved to ``vmap`` for this and later calls. Two
relaxations: a module run on an input shared by the batch (position embeddings on ids
``(1, T)``) whose output is added once to a batched tensor gets its per-sample output
gradients from that sum, as if it had run per sample; a weight tied across such modules
(GPT-2's LM head and token embedding) gets the sum of its modules' per-sample gradients,
formed one chunk of samples at a time, before squaring. The output gradients are taken
at the layer outputs themselves; if a layer output is changed in place later
(``ReLU(inplace=True)``), the forward reruns with zero perturbations ``e`` instead. Pruned modules (``torch.nn.utils.prune``: ``weight_orig`` times the
``weight_mask`` buffer) are covered: ``∂l/∂weight_orig = mask ⊙ ∂l/∂weight``. Every
other parameter goes through the general ``vmap`` path of :mod:`natgrad.engine.per_sample`,
with the same label draws, so both engines give the same Fisher.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge
from torch.utils._pytree import tree_flatten

from natgrad.engine import capture_layers as layers
from natgrad.engine.batch import Batch
from natgrad.engine.capture_ops import CaptureMode, ProbeMode, zero_perturbation
from natgrad.engine.checks import check_int, random_module
from natgrad.engine.common import acc_dtype, global_forward_hooks, internal_pass, module_list
from natgrad.engine.options import ENGINES
from natgrad.engine.per_sample import Plan, hooked_output, square_sums

__all__ = ["ENGINES"]  # the rest is used by natgrad.curvature.estimate

logger = logging.getLogger(__name__)

# the layers the capture path computes, each only with its own class's forward
# (capture_layers.runs_own_forward)
_FORWARDS = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.MultiheadAttention,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_GROUP_FLOATS = 2**22  # output gradients of several label columns held at once (16 MiB)
_MHA_ROLES = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


@dataclass
class _Slot:
    """One fast parameter: its name, its role in the module, its pruning mask buffer."""

    name: str
    role: str
    mask: str | None = None


@dataclass
class FastSplit:
    """Which parameters take the capture path and which take ``vmap``.

    Attributes:
        fast: ``{module: [slots]}`` captured by module hooks (or, for attention, by
            the capture mode).
        free: names of parameters added to a batched tensor through views.
        rest: parameter names for the general ``vmap`` path.
    """

    fast: dict[nn.Module, list[_Slot]] = field(default_factory=dict)
    free: list[str] = field(default_factory=list)
    rest: list[str] = field(default_factory=list)
    # Modules of ``fast`` run on an input without the batch axis (position embeddings on
    # ids (1, T)), whose output is added to a batched tensor: module -> tracking key.
    shared: dict[nn.Module, str] = field(default_factory=dict)
    # Parameters of ``fast`` used by several modules (tied embedding and LM head).
    tied: dict[str, list[nn.Module]] = field(default_factory=dict)

    @property
    def fast_names(self) -> list[str]:
        return [s.name for slots in self.fast.values() for s in slots] + list(self.free)

    @property
    def has_fast(self) -> bool:
        """Whether any parameter takes the capture path (``fast_names`` is not empty: a
        module of ``fast`` keeps one slot at least)."""
        return bool(self.fast) or bool(self.free)

    @property
    def module_names(self) -> list[str]:
        """Parameters each of one module that runs on the batch (neither tied across
        modules nor of a module run on a shared input): the ones whose per-sample
        gradient a hook on their own module sees whole."""
        return [
            s.name
            for m, slots in self.fast.items()
            if m not in self.shared
            for s in slots
            if s.name not in self.tied
        ]


def _supported(m: nn.Module) -> bool:
    if layers.is_conv1d(m):
        return True
    base = next((t for t in _FORWARDS if isinstance(m, t)), None)
    if base is None or not layers.runs_own_forward(m, base):
        return False
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.padding_mode == "zeros" and not isinstance(m.padding, str)
    if isinstance(m, BATCH_NORMS):  # eval mode with running statistics: per-sample affine
        return m.affine and not m.training and m.running_mean is not None
    if isinstance(m, nn.Embedding):
        return m.max_norm is None and not m.scale_grad_by_freq
    if isinstance(m, nn.LayerNorm):
        return m.elementwise_affine
    if isinstance(m, nn.MultiheadAttention):
        return m._qkv_same_embed_dim and m.batch_first and m.bias_k is None
    return True


def _module_slots(m: nn.Module, name_of: dict[int, str]) -> list[_Slot]:
    if isinstance(m, nn.MultiheadAttention):
        ps = [m.in_proj_weight, m.in_proj_bias, m.out_proj.weight, m.out_proj.bias]
        return [_Slot(name_of[id(p)], r) for r, p in zip(_MHA_ROLES, ps, strict=True) if id(p) in name_of]
    slots = []
    for role in ("weight", "bias"):
        p, mask = m._parameters.get(role), None
        orig = m._parameters.get(f"{role}_orig")
        if p is None and orig is not None and f"{role}_mask" in m._buffers:
            p, mask = orig, f"{role}_mask"
        if p is not None and id(p) in name_of:
            slots.append(_Slot(name_of[id(p)], role, mask))
    return slots


def _repeat_first(b: Batch, n: int) -> Batch:
    return b.take(torch.zeros(n, dtype=torch.long))


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a ≈ b`` to ``√eps`` of their dtype, relative to the largest entry of ``b``."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    tol = torch.finfo(b.dtype).eps ** 0.5
    scale = max(float(b.abs().nan_to_num().max()), 1.0) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * scale, equal_nan=True))


def _two_samples(
    plan: Plan, b: Batch, modules: list[nn.Module]
) -> tuple[bool, set[nn.Module]]:
    """``(sample-wise, misaligned)`` from forwards of the first two samples alone and
    together, in both orders. Sample-wise: each row of a pair's output is that sample's
    own output (to ``√eps`` of the output dtype, relative to the largest output); the
    capture path needs it, since it differentiates one batched forward where ``vmap``
    runs one forward per sample (a model that reads another sample's row, ``temp[0]`` of
    a per-sample input, fails it). Misaligned: a module (of ``modules``) whose input in the pair forward
    ``(i, j)`` is not its inputs in the forwards of ``i`` and of ``j`` stacked, one row
    each: its rows are not the samples' (picked, reordered or routed by data, however
    the model spells it; one of the two orders shows any permutation), so the capture
    path would give a sample another's gradient. A module run on an input shared by the
    samples (one row, equal in every forward) is left to the split's own checks. Random
    models (train-mode dropout) and one-sample batches are not checked."""
    if b.size < 2 or random_module(plan.model) is not None:
        return True, set()
    seen: dict[nn.Module, list[Any]] = {m: [] for m in modules}

    def hook(m: nn.Module, inp: tuple[Any, ...], out: Any) -> None:
        seen[m].append(inp[0].detach() if inp and isinstance(inp[0], torch.Tensor) else None)

    handles = [m.register_forward_hook(hook, prepend=True) for m in modules]
    runs: dict[tuple[int, ...], tuple[torch.Tensor, dict[nn.Module, list[Any]]]] = {}
    try:
        for order in ((0,), (1,), (0, 1), (1, 0)):
            for v in seen.values():
                v.clear()
            sub = b.take(torch.tensor(order))
            runs[order] = (plan.forward(sub, full=b), {m: list(v) for m, v in seen.items()})
    finally:
        for h in handles:
            h.remove()
    ok = True
    for i in range(2):
        one, both = runs[(i,)][0], runs[(0, 1)][0]
        if not one.is_floating_point() or both.shape[1:] != one.shape[1:]:
            return False, set()
        ok = ok and _close(both[i : i + 1], one)
    if not ok:
        return False, set()
    bad: set[nn.Module] = set()
    for m in modules:
        calls = [runs[o][1][m] for o in ((0,), (1,), (0, 1), (1, 0))]
        if any(len(c) != 1 or c[0] is None for c in calls):
            continue  # not run once with a tensor: the split's probes decide
        s0, s1, p01, p10 = (c[0] for c in calls)
        if s0.dim() == 0:
            continue
        if s0.shape[0] == 1 and _close(s0, s1) and _close(p01, s0) and _close(p10, s0):
            continue  # shared by the samples
        for pair, (i, j) in ((p01, (s0, s1)), (p10, (s1, s0))):
            if not (i.shape[0] == 1 and j.shape[0] == 1 and _close(pair, torch.cat([i, j]))):
                bad.add(m)
                break
    return True, bad


def split_params(plan: Plan, b: Batch) -> FastSplit:
    """Decide which selected parameters the capture path computes exactly.

    Two probe forwards (1 and 2 copies of the first sample of ``b``) check, for each
    candidate, that its module runs once, that the batch is the first axis of its input
    and output (sequence-first layers are left out), and that each parameter feeds the
    graph through exactly one call. Two relaxations: a module whose input and output
    have batch axis 1 in both probes (shared by the samples) is kept when its output is
    used once, added to a batched tensor (see :func:`_shared_ok`); a parameter used by
    several candidate modules (tied weights) is kept when it is used once by each and
    every one of them has a per-sample gradient rule (:data:`_TIE_KINDS`). Every other
    parameter goes to ``vmap``, and every parameter does when the model is not
    sample-wise (see :func:`_two_samples`).
    """
    if global_forward_hooks():
        # a global forward hook runs before every module hook, so the layer's own output
        # cannot be read (nor a replaced one detected): every parameter on vmap
        logger.info("a global forward hook is registered: every parameter on vmap")
        return FastSplit(rest=list(plan.params))
    mods = [m for m in plan.model.modules() if _supported(m)]
    sample_wise, misaligned = _two_samples(plan, b, mods)
    if not sample_wise:
        logger.info("the batched forward is not sample-wise: every parameter on vmap")
        return FastSplit(rest=list(plan.params))
    name_of = {id(p): k for k, p in plan.params.items()}
    mod_names = {m: k for k, m in plan.model.named_modules()}
    attn = [m for m in mods if isinstance(m, nn.MultiheadAttention)]
    claimed = {s.name for m in attn for s in _module_slots(m, name_of)}
    cands: dict[nn.Module, list[_Slot]] = {}
    for m in mods:
        slots = _module_slots(m, name_of)
        if not isinstance(m, nn.MultiheadAttention):  # out_proj is read by F.linear
            slots = [s for s in slots if s.name not in claimed]
        if slots:
            cands[m] = slots
    in_mods = {s.name for slots in cands.values() for s in slots}
    free_ids = {id(p): k for k, p in plan.params.items() if k not in in_mods}
    ids = {id(plan.params[k]) for k in in_mods} | set(free_ids)
    ok = {m: True for m in cands}
    shared = {m: not isinstance(m, nn.MultiheadAttention) for m in cands}
    keys = {m: f"<output of {mod_names.get(m, type(m).__name__)}>" for m in cands}
    shapes: dict[nn.Module, tuple[torch.Size, ...]] = {}
    probes: list[ProbeMode] = []
    replaced: set[nn.Module] = set()  # a forward hook of the user's changed the output
    rerouted: set[nn.Module] = set()  # run on rows selected by data (index routing)
    for n in (1, 2):
        seen: dict[nn.Module, list[tuple[Any, Any]]] = {m: [] for m in cands}
        mode = ProbeMode(ids, free_ids, n)
        own: dict[nn.Module, tuple[Any, int]] = {}

        def first(
            m: nn.Module, inp: tuple[Any, ...], out: Any,
            own: dict[nn.Module, tuple[Any, int]] = own,
        ) -> None:
            o = _first(out)  # the layer's own output: this hook runs before every other
            own[m] = (o, o._version if isinstance(o, torch.Tensor) else -1)

        def hook(
            m: nn.Module,
            inp: tuple[Any, ...],
            out: Any,
            seen: dict[nn.Module, list[tuple[Any, Any]]] = seen,
            mode: ProbeMode = mode,
            n: int = n,
            own: dict[nn.Module, tuple[Any, int]] = own,
        ) -> None:
            o = _first(out)
            mine, version = own.pop(m, (None, -1))
            if o is not mine or (isinstance(o, torch.Tensor) and o._version != version):
                replaced.add(m)  # replaced or modified in place by a hook before this one
            if inp and inp[0] in mode.rerouted:
                rerouted.add(m)  # its rows were picked by data: not the samples
            seen[m].append((inp[0] if inp else None, o))
            if n == 2 and shared[m] and isinstance(o, torch.Tensor) and o.shape[:1] == (1,):
                mode.watch(keys[m], o)

        handles = [m.register_forward_hook(first, prepend=True) for m in cands]
        handles += [m.register_forward_hook(hook) for m in cands]
        try:
            probe = _repeat_first(b, n)
            mode.seed((probe.args, probe.kwargs))
            try:
                with torch.enable_grad(), mode, internal_pass():
                    raw = plan.model(*probe.args, **probe.kwargs)
            except Exception as exc:
                plan.probe_failed(exc, probe, b)
            plan.check_rows(plan.output_fn(raw), probe, b)
        finally:
            for h in handles:
                h.remove()
        probes.append(mode)
        for m, calls in seen.items():
            tensors = len(calls) == 1 and all(
                isinstance(t, torch.Tensor) and t.dim() >= 1 for t in calls[0]
            )
            good = tensors and all(t.shape[0] == n for t in calls[0])
            one = tensors and all(t.shape[0] == 1 for t in calls[0])
            if tensors and n == 1:
                shapes[m] = tuple(t.shape[1:] for t in calls[0])
            elif tensors:
                same = shapes.get(m) == tuple(t.shape[1:] for t in calls[0])
                good, one = good and same, one and same and _shared_ok(mode, keys[m])
            if isinstance(m, nn.MultiheadAttention):
                good = good and mode.attention.get(id(m.in_proj_weight), False)
            moved = m in replaced or m in rerouted or m in misaligned
            ok[m] = ok[m] and good and not moved
            shared[m] = shared[m] and one and not moved
    def uses(p: torch.Tensor, k: int = 1) -> bool:
        return all(pm.counts[id(p)] == k for pm in probes)

    split = FastSplit()
    holders: dict[str, list[nn.Module]] = {}
    for m, slots in cands.items():
        for s in slots:
            holders.setdefault(s.name, []).append(m)
    for name, ms in holders.items():
        if len(ms) > 1 and uses(plan.params[name], len(ms)) and all(
            ok[m] and (isinstance(m, _TIE_KINDS) or layers.is_conv1d(m)) for m in ms
        ) and all(s.mask is None for m in ms for s in cands[m] if s.name == name):
            split.tied[name] = ms
    for m, slots in cands.items():
        keep = [
            s for s in slots
            if s.name in split.tied
            or (ok[m] or shared[m]) and len(holders[s.name]) == 1 and uses(plan.params[s.name])
        ]  # fmt: skip
        if keep:
            split.fast[m] = keep
            if shared[m] and not ok[m]:
                split.shared[m] = keys[m]
    for k in free_ids.values():
        adds = [pm.adds.get(k, []) for pm in probes]
        if all(a == [True] for a in adds) and uses(plan.params[k]) and _chain_once(probes, k):
            split.free.append(k)
    fast = set(split.fast_names)
    split.rest = [k for k in plan.params if k not in fast]
    return split


# Module kinds whose per-sample weight gradients a tied parameter can sum (with HF Conv1D).
_TIE_KINDS = (nn.Linear, nn.Embedding)


def _shared_ok(mode: ProbeMode, key: str) -> bool:
    """The watched output ``key`` (of a module run on a shared input) is used exactly once,
    directly or through a chain of views each used once, in one addition to a tensor with
    the batch axis (the sum has that tensor's shape)."""
    outs = [o for k, _, o in mode.outputs.values() if k == key]
    return (
        len(outs) == 1
        and mode.counts[id(outs[0])] == 1
        and mode.adds.get(key, []) == [True]
        and _chain_once([mode], key)
    )


_SPLITS: weakref.WeakKeyDictionary[nn.Module, dict[Any, FastSplit]] = (
    weakref.WeakKeyDictionary()
)


def _leaf_signature(t: Any, per_sample: bool) -> Any:
    if isinstance(t, torch.Tensor):
        shape = tuple(t.shape[1:]) if per_sample else tuple(t.shape)
        return ("tensor", shape, t.dtype, t.device)
    return repr(t) if isinstance(t, (bool, int, float, str, type(None))) else type(t)


def _signature(t: Any, dim: int | None) -> Any:
    """What the split of one model input depends on: a per-sample tensor's (``dim`` 0)
    per-sample shape, dtype and device; a shared tensor's whole shape; a list, tuple or
    dict (any pytree) by its structure and the signature of every leaf inside it."""
    if isinstance(t, torch.Tensor):
        return _leaf_signature(t, dim == 0)
    leaves, spec = tree_flatten(t)
    return (spec, tuple(_leaf_signature(v, False) for v in leaves))


def input_signature(b: Batch) -> Any:
    """The signature of every input of ``b``, nested ones included (see :func:`_signature`),
    and whether it holds one sample (whose split checks nothing across samples, see
    :func:`_two_samples`): the part of :func:`split_key` that can change between the
    batches of one pass."""
    arg_dims, kw_dims = b.dims()
    return (
        tuple(_signature(a, d) for a, d in zip(b.args, arg_dims, strict=True)),
        tuple((k, _signature(v, kw_dims[k])) for k, v in sorted(b.kwargs.items())),
        min(b.size, 2),
    )


def _own_forward_key(m: nn.Module) -> Any:
    """What decides whether ``m`` runs its class's own forward
    (:func:`natgrad.engine.capture_layers.runs_own_forward`): the class's ``forward`` and
    ``_conv_forward`` (a class patched after a first call), and any instance ``forward`` or
    ``_conv_forward`` with the accelerate hook beside them. The objects themselves, not
    their ids: the key keeps them alive, so a freed function's id reused by a new one
    cannot match (found by review)."""
    cls = type(m)
    d = m.__dict__
    inst = ((d.get("forward"), d.get("_hf_hook"), d.get("_conv_forward"))
            if "forward" in d or "_conv_forward" in d else None)
    return cls.forward, getattr(cls, "_conv_forward", None), inst


_SIGNATURE = 3  # the place of the input signature in a split_key


def split_key(plan: Plan, b: Batch) -> Any:
    """The key :func:`cached_split` remembers a split under: the parameters, the module
    tree (types, instance forwards, train/eval mode, hooks), the global forward hooks,
    the output function and the :func:`input_signature`."""
    return (
        tuple((k, id(p)) for k, p in plan.params.items()),
        tuple(
            (id(m), type(m), _own_forward_key(m), m.training, tuple(m._forward_hooks),
             tuple(m._forward_pre_hooks))
            for m in module_list(plan.model)
        ),  # fmt: skip
        tuple(global_forward_hooks()),
        input_signature(b),
        plan.output_fn,
    )


def cached_split(plan: Plan, b: Batch) -> FastSplit:
    """:func:`split_params`, remembered per model under :func:`split_key` (same
    parameters, module tree, hooks and input signature, nested inputs included)."""
    return split_and_signature(plan, b)[0]


def split_and_signature(plan: Plan, b: Batch) -> tuple[FastSplit, Any]:
    """:func:`cached_split` and the :func:`input_signature` of ``b`` (part of its key)."""
    if b.size < 2 or _supported(plan.model):
        # one sample: _two_samples() cannot check the batch, so the split is not kept for
        # later batches; a model that is itself a layer: the split would hold the model
        # and keep it alive (the cache's key)
        return split_params(plan, b), input_signature(b)
    try:
        per_model = _SPLITS.get(plan.model)
        if per_model is None:
            per_model = _SPLITS.setdefault(plan.model, {})
        key = split_key(plan, b)
        split = per_model.get(key)  # one hash of the key (a tuple's is not remembered)
    except TypeError:  # a model that cannot be weakly referenced, an unhashable input
        return split_params(plan, b), input_signature(b)
    if split is None:
        if len(per_model) > 32:
            per_model.clear()
        split = per_model[key] = split_params(plan, b)
    return split, key[_SIGNATURE]


def forget_splits(model: nn.Module) -> None:
    """Drop the splits :func:`cached_split` remembers for ``model`` (its next call probes
    again)."""
    _SPLITS.pop(model, None)


def check_captured(
    model: nn.Module,
    twice: Iterable[Any],
    missing: Iterable[Any],
    inputs: Iterable[tuple[nn.Module, torch.Tensor, int]],
    size: int | None = None,
    batched: Iterable[tuple[nn.Module, torch.Tensor]] = (),
) -> None:
    """The one check of a capture pass's records (the Fisher's, per-sample gradients',
    the Laplace predictive's): raise RuntimeError, naming the module and
    ``engine='vmap'``, when a module ran more than once (the split checked it running
    once: the model's control flow changed since; the model's remembered splits are
    dropped, so the next call checks again), when an expected module (or free parameter)
    did not run, or when a module's input ``(module, input, version when it ran)`` was
    modified in place after it ran (the captured input is stale). A module of
    ``batched`` ``(module, its captured input)`` whose input's first axis is not the
    batch's ``size`` raises :class:`RowsNotSamples` (a RuntimeError)."""
    twice, missing = list(twice), list(missing)

    def name(m: Any) -> str:  # a module's name in the model, or a free parameter's
        if isinstance(m, str):
            return m
        return next((k for k, mod in model.named_modules() if mod is m), type(m).__name__)

    if twice:
        forget_splits(model)
        raise RuntimeError(
            f"The capture path checked {name(twice[0])!r} running once per forward, but it "
            "ran more than once in this one (the model's control flow changed since the "
            "check). The check is redone on the next call; or use engine='vmap'."
        )
    if missing:
        raise RuntimeError(
            f"The capture path expected {name(missing[0])!r} to take part in this forward "
            "pass, but it did not (the model's control flow changed between batches); use "
            "engine='vmap'."
        )
    for m, a, version in inputs:
        if a._version != version:
            raise RuntimeError(
                f"The input of {type(m).__name__} was modified in place after the layer ran, "
                "so the captured input is stale; use engine='vmap' for this model."
            )
    routed = [(m, a.shape[0]) for m, a in batched if a.dim() == 0 or a.shape[0] != size]
    if routed:
        m, rows = routed[0]
        raise RowsNotSamples(
            [m for m, _ in routed],
            f"The capture path checked {name(m)!r} running on the whole batch, but in this "
            f"forward it ran on {rows} rows for a batch of {size} samples: the model routes "
            "rows by index (a mixture of experts' out[idx] = expert(x[idx]), a gather of "
            "tokens), and the capture path cannot tell which sample a row belongs to. "
            "Use engine='vmap' (estimate_fisher, per_sample_grads and the Laplace "
            "predictive move such layers to vmap by themselves).",
        )


class RowsNotSamples(RuntimeError):
    """Captured modules ran on rows that are not the batch's samples (index routing):
    :attr:`modules` lists them."""

    def __init__(self, modules: list[nn.Module], message: str):
        super().__init__(message)
        self.modules = modules


def drop_modules(split: FastSplit, modules: Iterable[nn.Module], plan: Plan) -> None:
    """Move ``modules``' parameters (a tied parameter with all its modules) from the
    capture path to ``split.rest``, in place: the remembered split then sends them to
    ``vmap`` on later calls too."""
    names = {s.name for m in modules for s in split.fast.get(m, [])}
    for m in list(split.fast):
        split.fast[m] = [s for s in split.fast[m] if s.name not in names]
        if not split.fast[m]:
            del split.fast[m]
            split.shared.pop(m, None)
    for k in names:
        split.tied.pop(k, None)
    fast = set(split.fast_names)
    split.rest = [k for k in plan.params if k not in fast]


def _chain_once(probes: list[ProbeMode], name: str) -> bool:
    """Every view derived from the free parameter ``name`` is used exactly once."""
    for pm in probes:
        for i, (root, _, _) in pm.derived.items():
            if root == name and pm.counts[i] != 1:
                return False
    return True


# -- one batch ------------------------------------------------------------------------


def _module_squares(
    m: nn.Module, parts: dict[str, Any], Bs: dict[str, Any], w: float
) -> dict[str, torch.Tensor]:
    if isinstance(m, nn.MultiheadAttention):
        return layers.attention(parts, Bs, w)
    a, B = parts["main"][0], Bs["main"]
    if isinstance(m, nn.Linear):
        return layers.linear(a, B, w)
    if layers.is_conv1d(m):
        return layers.conv1d(a, B, w)
    if isinstance(m, nn.Embedding):
        return layers.embedding(m, a, B, w)
    if isinstance(m, nn.LayerNorm):
        return layers.layer_norm(m, a, B, w)
    if isinstance(m, BATCH_NORMS):
        return layers.batch_norm(m, a, B, w)
    return layers.conv(cast("nn.Conv1d | nn.Conv2d", m), a, B, w)  # _supported: conv only


def _direct(m: nn.Module, parts: dict[str, Any], slots: list[_Slot], acc: _Sums) -> bool:
    """A Linear or HF Conv1D on sequences whose squares can be added to the accumulators
    directly (:func:`natgrad.engine.capture_layers.linear_into`): no pruning mask, and
    accumulators of the dtype its products are computed in."""
    if not (isinstance(m, nn.Linear) or layers.is_conv1d(m)) or "main" not in parts:
        return False
    a = parts["main"][0]
    dtype = layers.work(a).dtype
    return a.dim() > 2 and all(
        s.mask is None and acc_dtype(acc.params[s.name].dtype) == dtype for s in slots
    )


def _tied_squares(
    acc: torch.Tensor,
    p: torch.Tensor,
    uses: list[tuple[nn.Module, torch.Tensor, torch.Tensor]],
    w: float,
) -> None:
    """Add ``w Σ_j Σ_n (Σ_u G_jnu)²`` to ``acc`` for a parameter tied across modules ``u``
    (input ``a``, output gradients ``B``): the per-sample gradient is the sum of the
    modules' per-sample gradients, formed one chunk of samples at a time in a scratch
    buffer."""
    J, N = uses[0][2].shape[:2]
    dtype = acc.dtype
    chunk = min(N, max(1, layers.PRODUCT_FLOATS // max(J * p.numel(), 1)))
    buf = layers.scratch(J * chunk * p.numel(), dtype, p.device)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        G = buf[: J * (e - s) * p.numel()].view(J, e - s, *p.shape)
        first = True
        for m, a, B in uses:  # Linear / Conv1D first: their products fill G
            if not isinstance(m, nn.Embedding):
                t = layers.is_conv1d(m)
                layers.linear_grads_into(G, a, B, s, e, transposed=t, first=first)
                first = False
        if first:
            G.zero_()
        for m, a, B in uses:
            if isinstance(m, nn.Embedding):
                layers.embedding_grads_into(G, m, a, B, s, e)
        for g in G.view(J * (e - s), *p.shape):
            acc.addcmul_(g, g, value=w)


class _Sums(dict[str, torch.Tensor]):
    """Square sums by parameter name, created on first use: the first contribution to a
    parameter, a fresh tensor, becomes its sum (no zero-filled accumulator of the
    parameter's size is written and then added to)."""

    def __init__(self, params: Mapping[str, torch.Tensor]):
        super().__init__()
        self.params = params

    def add(self, name: str, v: torch.Tensor) -> None:
        """``sum[name] += v``. ``v`` (the parameter's size, any shape) must be a tensor
        that nothing else holds: the first one is kept as the sum and added to later."""
        p = self.params[name]
        if v.shape != p.shape:
            v = v.reshape(p.shape)
        dtype = acc_dtype(p.dtype)
        if v.dtype != dtype:
            v = v.to(dtype)
        cur = self.get(name)
        if cur is not None:
            cur += v
        else:
            self[name] = v if v.is_contiguous() else v.contiguous()

    def zeros(self, name: str) -> torch.Tensor:
        """The sum of ``name``, created as zeros if nothing was added yet (for in-place
        accumulation)."""
        cur = self.get(name)
        if cur is None:
            p = self.params[name]
            cur = self[name] = torch.zeros(p.shape, dtype=acc_dtype(p.dtype), device=p.device)
        return cur

    def done(self) -> dict[str, torch.Tensor]:
        """Every parameter's sum, in the parameters' order (zeros where nothing was added)."""
        return {k: self.zeros(k) for k in self.params}


def _add_squares(
    acc: _Sums, m: nn.Module, slots: list[_Slot], sq: dict[str, torch.Tensor]
) -> None:
    for s in slots:
        if s.role in sq:
            v = sq[s.role]
            if s.mask is not None:  # ∂l/∂weight_orig = mask ⊙ ∂l/∂weight
                # Layer formulas may return a flattened shape (Conv: (O, C·k)).
                mask = getattr(m, s.mask)
                v = v.reshape(mask.shape) * mask.to(v.dtype) ** 2
            acc.add(s.name, v)


def _stack(ts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(ts)``, without a copy for one tensor."""
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


def _capture_forward(
    plan: Plan,
    split: FastSplit,
    b: Batch,
    store: dict[Any, Any],
    outputs: dict[nn.Module, torch.Tensor],
    taken: dict[nn.Module, int],
    *,
    perturb: bool,
) -> torch.Tensor:
    """The model's output on ``b``, recording into ``store`` each captured module's input
    and the tensor whose gradient is its output gradient: its output itself (version in
    ``taken``), or with ``perturb`` (or an output that does not require grad) a zero
    perturbation ``e`` added to it (one more tensor per layer output)."""

    def hook(m: nn.Module, inp: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
        if m in store:
            twice.add(m)
        if m in split.shared:  # perturbed where it is added to a batched tensor
            store[m] = {"main": (inp[0].detach(), inp[0]._version, None)}
            outputs[m] = out.detach()
            if mode is not None:
                mode.watch(split.shared[m], out)
            return None
        if not perturb and out.requires_grad:
            store[m] = {"main": (inp[0].detach(), inp[0]._version, out)}
            taken[m] = out._version
            return None
        e = zero_perturbation(out)
        store[m] = {"main": (inp[0].detach(), inp[0]._version, e)}
        return out + e

    hooked, attention = [], {}
    for m in split.fast:
        if isinstance(m, nn.MultiheadAttention):
            attention[id(m.in_proj_weight)] = m
        else:
            hooked.append(m)
    free_ids = {id(plan.params[k]): k for k in split.free}
    mode = (
        CaptureMode(attention, free_ids, store) if attention or free_ids or split.shared else None
    )
    twice: set[nn.Module] = set()
    out = hooked_output(
        plan.model, b, plan.output_fn, plan.where, [(m, hook) for m in hooked], mode
    )
    if twice:
        check_captured(plan.model, twice, [], [])
    return out


def _stream_column(
    out: torch.Tensor,
    es: list[torch.Tensor],
    index: list[tuple[Any, Any]],
    u: torch.Tensor,
    split: FastSplit,
    store: dict[Any, Any],
    module_step: Any,
    free_step: Any,
) -> None:
    """Pull one label column ``u`` back from ``out`` and use each layer's output gradient
    as soon as the backward pass has formed it: a hook on each captured tensor of ``es``
    (keys ``index``) runs ``module_step`` on a module once all its gradients are in (and
    ``free_step`` on a free parameter), then drops them and the module's captured input.

    The backward pass runs to the gradient edges of ``es``
    (``torch.autograd.graph.get_gradient_edge``), not to the tensors: nothing holds the
    layer outputs (``es`` is emptied and their entries in ``store`` set to None) or
    their gradients, so the graph's saved tensors are freed as in a plain backward, and
    only the gradients of layers still waiting for a part (attention's other
    projection, a tied weight's other module) are held, not every layer's at once.
    """
    grads: dict[tuple[Any, Any], torch.Tensor | None] = {}
    need: dict[nn.Module, set[tuple[Any, Any]]] = {}
    waiting: dict[tuple[Any, Any], list[nn.Module]] = {}
    for m in split.fast:
        need[m] = {(split.shared[m], None)} if m in split.shared else {(m, p) for p in store[m]}
        for key in need[m]:
            waiting.setdefault(key, []).append(m)
    free_keys = {(k, None) for k in split.free}
    left = set(split.fast)

    def step(m: nn.Module) -> None:
        module_step(m, grads)
        left.discard(m)
        for key in need[m]:
            if all(o not in left for o in waiting[key]):  # free keys never wait here
                grads.pop(key, None)
        store.pop(m, None)

    def on_grad(key: tuple[Any, Any]) -> Any:
        def hook(g: torch.Tensor) -> None:
            grads[key] = g.unsqueeze(0)
            if key in free_keys:
                free_step(key[0], grads.pop(key))
            for m in waiting.get(key, []):
                if m in left and all(k in grads for k in need[m]):
                    step(m)

        return hook

    handles = [
        e.register_hook(on_grad(key))  # type: ignore[no-untyped-call]  # torch: unannotated
        for key, e in zip(index, es, strict=True)
    ]
    edges = [get_gradient_edge(e) for e in es]
    es.clear()
    for k, part in index:  # drop the references to the layer outputs
        if part is None:
            store[k] = (*store[k][:2], None)
        else:
            store[k][part] = (*store[k][part][:2], None)
    try:
        torch.autograd.backward(out, u.to(out.dtype), inputs=edges)
    finally:
        for h in handles:
            h.remove()
    for m in list(left):  # gradients that never came are None
        step(m)


def fast_batch_sums(
    plan: Plan,
    split: FastSplit,
    rest: Plan | None,
    b: Batch,
    target: torch.Tensor | None,
    chunk_size: int | None,
) -> tuple[int, dict[str, torch.Tensor]]:
    """``(N, Σ_n Σ_j w_j g_nj²)`` for one parsed batch, in the accumulation dtype (float64
    for float64 parameters, else float32): the capture path for
    ``split.fast`` and ``split.free``, the ``vmap`` plan ``rest`` (``plan`` restricted to
    ``split.rest``, or None) for the other parameters, with shared label draws."""
    store: dict[Any, Any] = {}
    outputs: dict[nn.Module, torch.Tensor] = {}  # shared-input modules' outputs
    taken: dict[nn.Module, int] = {}  # outputs differentiated as they are: their versions
    out = _capture_forward(plan, split, b, store, outputs, taken, perturb=False)
    if any(store[m]["main"][2]._version != v for m, v in taken.items()):
        # A layer output was modified in place (ReLU(inplace=True)): the gradient with
        # respect to it as it is would be taken after that change. Run the forward again
        # with a zero perturbation added to every output, whose gradient is the right one.
        logger.debug("capture: a layer output is modified in place; perturbed forward")
        store.clear()
        outputs.clear()
        taken.clear()
        out = _capture_forward(plan, split, b, store, outputs, taken, perturb=True)
    adds = [*split.free, *split.shared.values()]
    missing: list[Any] = []
    inputs: list[tuple[nn.Module, torch.Tensor, int]] = []
    batched: list[tuple[nn.Module, torch.Tensor]] = []
    for m in split.fast:  # one walk for the three lists check_captured reads
        parts = store.get(m)
        if parts is None:
            missing.append(m)
            continue
        inputs.extend((m, a, version) for a, version, _ in parts.values())
        if m not in split.shared and "main" in parts:
            batched.append((m, parts["main"][0]))
    missing += [k for k in adds if k not in store]
    check_captured(plan.model, [], missing, inputs, b.size, batched)
    target = plan.check_target(out, target, b)
    draws = plan.draw(out, target) if plan.labels == "mc" else None
    acc = _Sums(plan.params)
    index = [
        (k, part) for k in split.fast if k not in split.shared for part in store[k]
    ] + [(k, None) for k in adds]
    es = [store[k][part][2] if part is not None else store[k][2] for k, part in index]
    # 2-D Linear inputs: (Σ_j w_j b_j² (N, O), the input as the product reads it (N, I))
    dense: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    cols = plan.column_list(out.detach(), target, draws)
    single = len(cols) == 1  # one label column: its products right away, streamed if large
    w = plan.weight
    Key = tuple[Any, Any]
    tied: dict[str, list[tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {}
    # each module's own slots (its parameters not tied to another module's), and whether
    # it is a Linear or a Hugging Face Conv1D (whose 2-D and sequence inputs have the
    # cheaper formulas of dense_squares and linear_into)
    own = split.fast if not split.tied else {
        m: [s for s in slots if s.name not in split.tied] for m, slots in split.fast.items()
    }  # fmt: skip
    linear = {m: isinstance(m, nn.Linear) or layers.is_conv1d(m) for m in split.fast}

    def module_step(m: nn.Module, grads: dict[Key, torch.Tensor | None]) -> None:
        """Add module ``m``'s squares (its tied parameters' uses go to ``tied``)."""
        parts = store[m]
        if m in split.shared:  # as if the module had run on every sample
            chain, d_shape, _ = store[split.shared[m]]
            B = grads.get((split.shared[m], None))
            if B is None:
                return
            a = parts["main"][0]
            parts = {"main": (a.expand(B.shape[1], *a.shape[1:]), None, None)}
            Bs: dict[str, Any] = {"main": layers.shared_output_grads(chain, outputs[m], d_shape, B)}
        else:
            Bs = {part: grads.get((m, part)) for part in parts}
        if all(B is None for B in Bs.values()):
            return
        if split.tied:
            for s in split.fast[m]:
                if s.name in split.tied:
                    tied.setdefault(s.name, []).append((m, parts["main"][0], Bs["main"]))
        slots = own[m]
        if not slots:
            return
        if linear[m] and "main" in parts and parts["main"][0].dim() == 2:
            # a Linear on (N, I) inputs (what _dense tests): Σ_j b_j² is all it needs
            prev = dense.get(m)
            b2 = layers.square_sum_into(None if prev is None else prev[0],
                                        layers.work(Bs["main"]))
            if single:  # the only column: the product now, and b2 freed at once
                dense_squares(m, b2, parts["main"][0])
            else:  # the input as parts holds it (a batch-shared input expanded to N rows)
                dense[m] = (b2, parts["main"][0])
            return
        if isinstance(m, nn.Embedding) and slots[0].mask is None:  # rows in the batch only
            rows, vals = layers.embedding_rows(m, parts["main"][0], Bs["main"], w)
            sums = acc.zeros(slots[0].name)
            sums.index_add_(0, rows, vals.to(sums.dtype))
            return
        if linear[m] and _direct(m, parts, slots, acc):  # Linear / Conv1D on sequences
            got = {s.role: acc.zeros(s.name) for s in slots}
            layers.linear_into(
                got.get("weight"), got.get("bias"), parts["main"][0], Bs["main"], w,
                transposed=layers.is_conv1d(m),
            )  # fmt: skip
            return
        _add_squares(acc, m, slots, _module_squares(m, parts, Bs, w))

    def dense_squares(m: nn.Module, b2: torch.Tensor, a: torch.Tensor) -> None:
        """Add the squares of a Linear on ``(N, I)`` inputs from ``b2 = Σ_j b_j²`` (ours):
        ``w (b2ᵀ a²)`` and ``w Σ_n b2``."""
        if w != 1.0:
            b2.mul_(w)
        sq: dict[str, torch.Tensor] = {}
        for s in own[m]:  # only the roles selected (params=... may leave one out)
            if s.role == "weight":
                a2 = layers.work(a).square()
                sq["weight"] = a2.t() @ b2 if layers.is_conv1d(m) else b2.t() @ a2
            elif s.role == "bias":
                sq["bias"] = b2.sum(0)
        _add_squares(acc, m, own[m], sq)

    def free_step(k: str, Bk: torch.Tensor | None) -> None:
        if Bk is not None:
            chain, d_shape, _ = store[k]
            acc.add(k, layers.free(chain, plan.params[k], d_shape, Bk, w))

    def flush_tied() -> None:
        """Add the squares of each tied parameter's uses, collected by ``module_step``."""
        for k, uses in tied.items():
            _tied_squares(acc.zeros(k), plan.params[k], uses, w)
        tied.clear()

    floats = sum(e.numel() for e in es)  # one column's output gradients
    # One column is streamed through the backward pass when its output gradients are
    # large (they are freed layer by layer) or a tied parameter needs its uses in the
    # backward order; small ones are pulled back at once as a group of one, which skips
    # the streaming's per-layer hooks (its fixed cost dominates a small batch's pass).
    if single and (floats > _GROUP_FLOATS or split.tied):
        _stream_column(out, es, index, cols[0], split, store, module_step, free_step)
        flush_tied()
    else:
        # Columns are pulled back one at a time (a vmapped is_grads_batched backward is
        # no faster on CPU and lacks batching rules for attention kernels), then their
        # output gradients are stacked in groups of about _GROUP_FLOATS floats for the
        # products.
        # An ungrouped convolution's columns are stacked sample-major, ``(N, J, ...)``, and
        # handed on as the ``(J, N, ...)`` view: its batched products read each sample's
        # ``J`` columns as one block, so they need no permuted copy (one column needs no
        # stacking at all).
        group = max(1, _GROUP_FLOATS // max(floats, 1))
        sample_major = set() if single else {
            (m, "main") for m in split.fast
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1 and m not in split.shared
        }  # fmt: skip
        for g0 in range(0, len(cols), group):
            per = [
                torch.autograd.grad(
                    out, es, u if u.dtype == out.dtype else u.to(out.dtype),
                    retain_graph=g0 + i < len(cols) - 1,
                    allow_unused=True,
                )  # fmt: skip
                for i, u in enumerate(cols[g0 : g0 + group])
            ]
            grads: dict[Key, torch.Tensor | None] = {
                key: None if per[0][i] is None
                else torch.stack([p[i] for p in per], 1).transpose(0, 1) if key in sample_major
                else _stack([p[i] for p in per])
                for i, key in enumerate(index)
            }  # fmt: skip
            del per
            for m in split.fast:
                module_step(m, grads)
            flush_tied()
            for k in split.free:
                free_step(k, grads[(k, None)])
    for m, (b2, a) in dense.items():  # b2 = Σ_j b_j², (N, O), of several columns
        dense_squares(m, b2, a)
    store.clear()
    layers.release_scratch()
    if rest is not None:
        for _, res in rest.run(b, target, draws, "squares", chunk_size):
            for k in rest.params:
                # detached: a vmap part closing over the capture path's parameters is tracked
                acc.add(k, res[k].sum(0).detach())
    return b.size, acc.done()


def square_sums_auto(
    plan: Plan, batches: Iterable[Any], chunk_size: int | None, engine: str
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Per batch ``(n, Σ_n Σ_j w_j g_nj²)`` by ``engine`` (see :func:`split_params`); a
    batch whose input signature (:func:`split_key`) differs from the previous batch's
    takes its own split.

    Raises:
        ValueError: an invalid ``chunk_size``, on every engine (before any batch is read).
    """
    check_int("chunk_size", chunk_size, 1, optional=True)
    if engine == "vmap":
        logger.info("engine='vmap': every parameter on the vmap path")
        yield from square_sums(plan, batches, chunk_size)
        return
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return
    b, target = plan.parse(first)
    split, sig = split_and_signature(plan, b)
    if not split.has_fast:
        if engine == "fast":
            raise ValueError(
                "engine='fast' found no parameter it can compute exactly (it covers "
                "nn.Linear, nn.Conv1d/2d, nn.Embedding, nn.LayerNorm, self-attention and "
                "Hugging Face Conv1D "
                "parameters used once per forward); use engine='auto' or engine='vmap'."
            )
        logger.info("engine=%r: no parameter fits the capture path; all on vmap", engine)
        yield from square_sums(plan, itertools.chain([first], batches), chunk_size)
        return
    # One restricted plan for the whole pass, so that its vmap fallback (plan.tier) sticks.
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "engine=%r: capture path for %d parameter tensors, vmap for %d%s",
            engine, len(split.fast_names), len(split.rest),
            f" ({', '.join(split.rest)})" if split.rest else "",
        )  # fmt: skip
    rest = plan.restrict(split.rest) if split.rest else None
    # within one pass only the inputs can change (the model and its hooks do not)
    for i, batch in enumerate(itertools.chain([first], batches)):
        if i:  # by position: the same batch object may come again (a list of epochs)
            b, target = plan.parse(batch)
            new_sig = input_signature(b)
            if new_sig != sig:  # another input signature (a list of another length): its split
                sig, new = new_sig, cached_split(plan, b)
                if new is not split:
                    split, rest = new, plan.restrict(new.rest) if new.rest else None
        routed = False
        while split.has_fast:
            try:
                yield fast_batch_sums(plan, split, rest, b, target, chunk_size)
                break
            except RowsNotSamples as exc:  # index routing: those layers on vmap from now on
                routed = True
                drop_modules(split, exc.modules, plan)
                logger.info("capture: %s", exc)
                rest = plan.restrict(split.rest) if split.rest else None
        else:
            if engine == "fast":
                why = (
                    "the capture layers ran on rows routed by index, not on the batch's "
                    "samples" if routed else f"batch {plan.batches_seen} has another "
                    "input signature (shapes, nested inputs), and none fits there"
                )  # fmt: skip
                raise ValueError(
                    f"engine='fast' found no parameter it can compute exactly: {why}; use "
                    "engine='auto' or engine='vmap'."
                )
            yield from square_sums(plan, [batch], chunk_size)
