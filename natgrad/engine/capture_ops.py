"""Op-level capture for the fast path: torch-function modes that see calls which no
module hook sees.

* ``nn.MultiheadAttention`` reads its projection weights inside
  ``F.multi_head_attention_forward``. For plain self-attention (packed projection,
  ``need_weights=False``, no extra key/value biases, no dropout) the capture mode runs
  the same computation as its own composition of ``F.linear`` and
  ``F.scaled_dot_product_attention``, recording both projections' inputs and adding zero
  perturbations to their outputs.
* A free parameter added to a batched tensor through views (``x + pos[:T]``) gets a
  zero perturbation on the sum; its per-sample gradient is pulled back through the views.

:class:`ProbeMode` only watches (use counts, supported calls); :class:`CaptureMode`
changes what runs, and is active only during the fast path's own forward pass.
"""

from __future__ import annotations

import inspect
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from natgrad.engine.checks import mark_user_error

_MHA = F.multi_head_attention_forward
_MHA_SIG = inspect.signature(_MHA)

# A view chain from a free parameter: (parameter name, replay on a substitute, tensor).
Root = tuple[str, Callable[[torch.Tensor], torch.Tensor], torch.Tensor]
VIEWS = {
    torch.Tensor.__getitem__,
    torch.Tensor.view,
    torch.Tensor.reshape,
    torch.reshape,
    torch.Tensor.unsqueeze,
    torch.unsqueeze,
    torch.Tensor.expand,
}
ADDS = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
# Conversions that return their input itself when there is nothing to convert (GPT-2's
# ``position_embeds.to(device)``): such a call is no use of the tensor.
PASSTHROUGH = {torch.Tensor.to, torch.Tensor.contiguous, torch.Tensor.type_as}


# Row selection by data along the first axis: its result's rows are not the batch's
# samples (a mixture of experts' ``x[idx]``, a sorted batch's ``x[perm]``). Each entry:
# the positions and names of (source, dim, index) in the call; dim None: the flat or
# first axis.
_SELECT_ROWS: dict[Callable[..., Any], tuple[tuple[int, str], tuple[int, str] | None,
                                             tuple[int, str] | None]] = {
    torch.Tensor.index_select: ((0, "input"), (1, "dim"), (2, "index")),
    torch.index_select: ((0, "input"), (1, "dim"), (2, "index")),
    torch.Tensor.gather: ((0, "input"), (1, "dim"), (2, "index")),
    torch.gather: ((0, "input"), (1, "dim"), (2, "index")),
    torch.Tensor.take_along_dim: ((0, "input"), (2, "dim"), (1, "indices")),
    torch.take_along_dim: ((0, "input"), (2, "dim"), (1, "indices")),
    torch.Tensor.masked_select: ((0, "input"), None, None),
    torch.masked_select: ((0, "input"), None, None),
    torch.Tensor.take: ((0, "input"), None, None),
    torch.take: ((0, "input"), None, None),
    F.embedding: ((1, "weight"), None, None),  # the batch as the table: rows by ids
}
# Splitting the batch axis into pieces (to recombine them in another order or route
# them): every piece counts as rows picked by data.
_SPLIT_ROWS: dict[Callable[..., Any], int] = {
    torch.Tensor.unbind: 1, torch.unbind: 1, torch.Tensor.split: 2, torch.split: 2,
    torch.Tensor.chunk: 2, torch.chunk: 2, torch.Tensor.tensor_split: 2,
    torch.tensor_split: 2,
}  # the position of the dim argument (default 0)
# Reorderings of an axis (the position and default of the dim argument): along the batch
# axis they move rows to other samples' places (``x.sort(0).values``, ``x.flip(0)``).
_REORDER_ROWS: dict[Callable[..., Any], tuple[int, str, Any]] = {
    torch.Tensor.sort: (1, "dim", -1), torch.sort: (1, "dim", -1),
    torch.Tensor.topk: (2, "dim", -1), torch.topk: (2, "dim", -1),
    torch.msort: (1, "dim", 0), torch.Tensor.msort: (1, "dim", 0),
    torch.Tensor.flip: (1, "dims", None), torch.flip: (1, "dims", None),
    torch.Tensor.roll: (2, "dims", None), torch.roll: (2, "dims", None),
}
# Writes into a destination tensor by index: the result is aligned as the destination is
# (``out[idx] = expert(x[idx])`` puts the rows back).
_WRITE_ROWS = {
    torch.Tensor.__setitem__, torch.Tensor.index_put_, torch.Tensor.index_put, torch.index_put,
    torch.Tensor.index_copy_, torch.Tensor.index_copy, torch.index_copy,
    torch.Tensor.index_add_, torch.Tensor.index_add, torch.index_add,
    torch.Tensor.scatter_, torch.Tensor.scatter, torch.scatter,
    torch.Tensor.scatter_add_, torch.Tensor.scatter_add, torch.scatter_add,
    torch.Tensor.masked_scatter_, torch.Tensor.masked_scatter, torch.masked_scatter,
}  # fmt: skip


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], where: tuple[int, str] | None) -> Any:
    """The argument at ``where`` (position, name) of a call, or None."""
    if where is None:
        return None
    i, name = where
    return args[i] if len(args) > i else kwargs.get(name)


_STRUCTURAL_VIEWS = VIEWS | {torch.Tensor.to, torch.Tensor.long, torch.Tensor.int}


class _Refs:
    """A set of tensors by identity (``id`` with a weak reference, so a reused ``id`` of
    a freed tensor is not taken for it)."""

    def __init__(self) -> None:
        self.refs: dict[int, weakref.ref[torch.Tensor]] = {}

    def add(self, t: object) -> None:
        if isinstance(t, torch.Tensor):
            self.refs[id(t)] = weakref.ref(t)

    def __contains__(self, t: object) -> bool:
        r = self.refs.get(id(t))
        return r is not None and r() is t


def passthrough(func: Callable[..., Any], args: tuple[Any, ...], out: object) -> bool:
    """``func(*args)`` returned its first argument unchanged (a no-op conversion)."""
    return func in PASSTHROUGH and bool(args) and out is args[0]


def zero_perturbation(out: torch.Tensor) -> torch.Tensor:
    """A zero tensor shaped like ``out`` whose gradient is ``∂loss/∂out`` (no memory)."""
    return torch.zeros((), dtype=out.dtype, device=out.device).requires_grad_().expand(out.shape)


def mha_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """Bound arguments of a supported ``multi_head_attention_forward`` call, else None."""
    a = _MHA_SIG.bind(*args, **kwargs)
    a.apply_defaults()
    v = a.arguments
    q = v["query"]
    ok = (
        q is v["key"]
        and q is v["value"]
        and isinstance(q, torch.Tensor)
        and q.dim() == 3
        and not v["use_separate_proj_weight"]
        and v["in_proj_weight"] is not None
        and v["bias_k"] is None
        and v["bias_v"] is None
        and not v["add_zero_attn"]
        and (v["dropout_p"] == 0.0 or not v["training"])
        and not v["need_weights"]
        and not v["is_causal"]
        and v["static_k"] is None
        and v["static_v"] is None
    )
    return v if ok else None


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)


def self_attention(v: dict[str, Any], store: dict[str, Any]) -> tuple[torch.Tensor, None]:
    """Multi-head self-attention with packed projections, recording ``(input, e)`` of
    the input projection (``store["in"]``) and the output projection (``store["out"]``).

    ``x (L, N, E)``; ``[q, k, v] = x W_inᵀ + b_in``; heads attend with
    ``softmax(q kᵀ/√d + mask) v``; ``out = o W_outᵀ + b_out``. Boolean masks (True =
    blocked) become ``-inf``; a key padding mask ``(N, S)`` and an attention mask
    ``(L, S)`` or ``(N·H, L, S)`` are added.
    """
    x = v["query"]
    L, N, E = x.shape
    H = v["num_heads"]
    qkv = F.linear(x, v["in_proj_weight"], v["in_proj_bias"])
    e_in = zero_perturbation(qkv)
    store["in"] = (x.detach(), x._version, e_in)
    qkv = qkv + e_in
    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(L, N, H, E // H).permute(1, 2, 0, 3)

    q, k, val = (heads(t) for t in qkv.chunk(3, dim=-1))
    mask = None
    am = _additive(v["attn_mask"], q.dtype)
    if am is not None:
        mask = am.view(1, 1, L, -1) if am.dim() == 2 else am.view(N, H, L, -1)
    kpm = _additive(v["key_padding_mask"], q.dtype)
    if kpm is not None:
        kpm = kpm.view(N, 1, 1, -1)
        mask = kpm if mask is None else mask + kpm
    o = F.scaled_dot_product_attention(q, k, val, attn_mask=mask)
    o = o.permute(2, 0, 1, 3).reshape(L, N, E)
    out = F.linear(o, v["out_proj_weight"], v["out_proj_bias"])
    e_out = zero_perturbation(out)
    store["out"] = (o.detach(), o._version, e_out)
    return out + e_out, None


def _replay(
    chain: Callable[[torch.Tensor], torch.Tensor],
    func: Callable[..., Any],
    rest: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The view chain extended by ``func(·, *rest, **kwargs)``."""
    return lambda q: func(chain(q), *rest, **kwargs)


def _identity(q: torch.Tensor) -> torch.Tensor:
    return q


class _Tracker(TorchFunctionMode):
    """Shared bookkeeping: tensors derived by views from free parameters, and from the
    outputs of shared-input modules (:meth:`watch`)."""

    def __init__(self, free_ids: dict[int, str]):
        super().__init__()
        self.free_ids = free_ids
        self.derived: dict[int, Root] = {}  # id -> (name, chain, tensor ref)
        self.outputs: dict[int, Root] = {}  # id -> (key, identity, output ref)

    def watch(self, key: str, out: torch.Tensor) -> None:
        """Track ``out``, the output of a module run on an input without the batch axis
        (``position_embeddings(position_ids)`` with ids ``(1, T)``), like a free parameter."""
        self.outputs[id(out)] = (key, _identity, out)

    def root(self, t: object) -> Root | None:
        if not isinstance(t, torch.Tensor):
            return None
        if id(t) in self.free_ids:
            return (self.free_ids[id(t)], _identity, t)
        if id(t) in self.outputs:
            return self.outputs[id(t)]
        return self.derived.get(id(t))

    def view_of(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], out: object
    ) -> None:
        r = self.root(args[0]) if args else None
        if r is not None and func in VIEWS and isinstance(out, torch.Tensor):
            name, chain, _ = r
            rest = args[1:]
            self.derived[id(out)] = (
                name,
                _replay(chain, func, rest, kwargs),
                out,
            )

    def add_operands(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Root, torch.Tensor] | None:
        """``(root, other)`` for an add of a free-parameter view to another tensor."""
        if func not in ADDS or len(args) != 2 or kwargs:
            return None
        ra, rb = self.root(args[0]), self.root(args[1])
        if (ra is None) == (rb is None):
            return None
        if ra is not None:
            r, other = ra, args[1]
        elif rb is not None:
            r, other = rb, args[0]
        else:  # excluded above: exactly one operand is a parameter view
            return None
        return (r, other) if isinstance(other, torch.Tensor) else None


class ProbeMode(_Tracker):
    """Counts differentiable uses of watched tensors; records supported attention calls
    and free-parameter additions with their batch-axis checks for batch size ``n``."""

    def __init__(self, ids: set[int], free_ids: dict[int, str], n: int):
        super().__init__(free_ids)
        self.ids, self.n = ids, n
        self.counts: Counter[int] = Counter()
        self.attention: dict[int, bool] = {}  # id(in_proj_weight) -> supported
        self.adds: dict[str, list[bool]] = {}
        self.rerouted = _Refs()  # rows selected by data: not the batch's samples
        self.structural = _Refs()  # torch.arange and its views (an index that is no data)
        self.batched = _Refs()  # the model's inputs and what is computed from them

    def seed(self, inputs: Any) -> None:
        """Mark the probe's input tensors as batched (selections from them count)."""
        for t in tree_leaves(inputs):
            self.batched.add(t)

    def _data_index(self, idx: Any) -> bool:
        """Whether ``idx`` (of a ``__getitem__``/``__setitem__``) picks along the first
        axis by data: a tensor (not a ``torch.arange``), list or array there, after any
        leading ``None``."""
        if isinstance(idx, tuple):  # the entry for the first axis, after leading None
            idx = next((e for e in idx if e is not None), None)
        if isinstance(idx, torch.Tensor):
            return idx not in self.structural
        return isinstance(idx, list) or type(idx).__name__ == "ndarray"

    def _selects_rows(self, func: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> bool:
        """Whether ``func`` picks rows of a batched tensor along its first axis by data
        (a table that is not computed from the inputs, e.g. a buffer read by ids,
        follows its index and is no selection)."""
        if func is torch.Tensor.__getitem__:
            src = args[0] if args else None
            return src in self.batched and self._data_index(args[1] if len(args) > 1 else None)
        if func in _SPLIT_ROWS:
            src = _arg(args, kwargs, (0, "input"))
            dim = _arg(args, kwargs, (_SPLIT_ROWS[func], "dim"))
            return src in self.batched and int(dim or 0) % max(src.dim(), 1) == 0
        if func in _REORDER_ROWS:
            src = _arg(args, kwargs, (0, "input"))
            i, name, default = _REORDER_ROWS[func]
            dim = _arg(args, kwargs, (i, name))
            if src not in self.batched or not isinstance(src, torch.Tensor) or src.dim() == 0:
                return False
            if func in (torch.Tensor.flip, torch.flip) and len(args) > 2:
                dim = args[1:]  # x.flip(0, 1)
            dims = [default] if dim is None else dim if isinstance(dim, (list, tuple)) else [dim]
            if dims == [None]:  # roll without dims: the flattened tensor, every axis moves
                return True
            return any(int(d) % src.dim() == 0 for d in dims)
        if func not in _SELECT_ROWS:
            return False
        where_src, where_dim, where_index = _SELECT_ROWS[func]
        src = _arg(args, kwargs, where_src)
        if src not in self.batched or not isinstance(src, torch.Tensor) or src.dim() == 0:
            return False
        if where_dim is None:
            return True  # masked_select, take, embedding: a selection by data
        dim = _arg(args, kwargs, where_dim)
        on_rows = dim is None or int(dim) % max(src.dim(), 1) == 0
        return on_rows and _arg(args, kwargs, where_index) not in self.structural

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except Exception as exc:  # the user's forward's own operation failed
            mark_user_error(exc)
            raise
        self._track_rows(func, args, kwargs, out)
        if passthrough(func, args, out):
            return out
        if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(out)):
            return out
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and (
                id(t) in self.ids or id(t) in self.derived or id(t) in self.outputs
            ):
                self.counts[id(t)] += 1
        if func is _MHA:
            v = mha_args(args, kwargs)
            w = _MHA_SIG.bind(*args, **kwargs).arguments.get("in_proj_weight")
            if w is not None:
                self.attention[id(w)] = v is not None and v["query"].shape[1] == self.n
        self.view_of(func, args, kwargs, out)
        add = self.add_operands(func, args, kwargs)
        if add is not None:
            (name, _, d), other = add
            ok = (
                other.dim() >= 1
                and other.shape[0] == self.n
                and tuple(out.shape) == tuple(other.shape)
                and (d.dim() < other.dim() or d.shape[0] == 1)
            )
            self.adds.setdefault(name, []).append(ok)
        return out


    def _track_rows(self, func: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any], out: object) -> None:
        """Propagate the marks to ``out``: *batched* when it is computed from a batched
        tensor; *rerouted* when ``func`` picks rows of a batched tensor by data or reads a
        rerouted tensor (a write by index follows its destination; a write of rerouted
        rows through a slice marks the destination); *structural* for ``torch.arange``
        and its views."""
        if func is torch.arange:
            self.structural.add(out)
            return
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func in _STRUCTURAL_VIEWS and args and args[0] in self.structural and not (
            func is torch.Tensor.__getitem__
            and any(isinstance(e, (torch.Tensor, list)) for e in tree_leaves(args[1:]))
        ):  # arange[perm] is data, not structure
            self.structural.add(out)
        batched = any(t in self.batched for t in leaves)
        if func is torch.Tensor.__setitem__ and len(args) > 2:
            dest, key, value = args[0], args[1], args[2]
            if value in self.batched:
                self.batched.add(dest)
            if value in self.rerouted and not self._data_index(key):
                self.rerouted.add(dest)  # rerouted rows copied in place (buf[:] = x[perm])
            return
        if func in _WRITE_ROWS:
            rerouted = bool(args) and args[0] in self.rerouted
        else:
            rerouted = self._selects_rows(func, args, kwargs) or any(
                t in self.rerouted for t in leaves
            )  # fmt: skip
        for t in tree_leaves(out):
            if batched:
                self.batched.add(t)
            if rerouted:
                self.rerouted.add(t)


class CaptureMode(_Tracker):
    """Runs captured attention calls and perturbs free-parameter additions."""

    def __init__(
        self, attention: Mapping[int, object], free_ids: dict[int, str], store: dict[Any, Any]
    ):
        super().__init__(free_ids)
        self.attention, self.store = attention, store

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is _MHA:
            v = mha_args(args, kwargs)
            unit = None if v is None else self.attention.get(id(v["in_proj_weight"]))
            if v is not None and unit is not None:
                parts = self.store.setdefault(unit, {})
                return self_attention(v, parts)
        out = func(*args, **kwargs)
        if passthrough(func, args, out):
            return out
        self.view_of(func, args, kwargs, out)
        add = self.add_operands(func, args, kwargs)
        if add is not None:
            (name, chain, d), _ = add
            e = zero_perturbation(out)
            self.store[name] = (chain, d.shape, e)
            return out + e
        return out
