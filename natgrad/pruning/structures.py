"""Structures of a model, their mask variables and the mask Fisher.

A *structure* is a unit that can be removed physically: a neuron of a Linear layer,
an output channel of a Conv1d/Conv2d, an attention head. Every structure ``s`` gets a
mask variable ``m_s`` (1 in the trained model) that multiplies its output where the
output enters the next layer (after its activation, pooling and BatchNorm). Removing
``s`` is ``m_s = 0``.

The mask Fisher of one layer's ``S`` structures is the ``S x S`` matrix

    F = (1/N) Σ_n E_y[g_n g_nᵀ],   g_n = ∂l_n/∂m  at m = 1,

with ``l_n = -log p(y_n | x_n)`` the per-sample loss. ``g_n`` is exact: every sample
gets its own copy of the masks (shape ``(N, S)``), so one backward pass of ``Σ_n l_n``
returns all per-sample gradients at once (a sample's loss depends only on its own
copy). For a structure whose output ``o_s`` enters the next layer,
``∂l_n/∂m_s = Σ_positions <o_s, ∂l_n/∂o_s>``.

The second-order prediction of the loss increase of removing a set ``R`` (``m_R = 0``)
from ``m = 1`` is ``½ 1_Rᵀ F_RR 1_R`` with the per-layer block Fisher, or
``½ Σ_{s∈R} F_ss`` with its diagonal (Kwon et al. 2022, "A Fast Post-Training Pruning
Framework for Transformers").

Which structures exist is found by tracing the model with ``torch.fx``: a Linear/Conv
*producer* whose output reaches exactly one Linear/Conv *consumer* through
channel-wise operations only (activations, dropout, eval-mode BatchNorm, pooling, a
flatten into a Linear) forms a group. Outputs that reach anything else (a residual
``add``, ``cat``, a reshape, LayerNorm over the channels, the model output) are
coupled in ways this module does not shrink; they are left out with the reason.
Attention heads of ``nn.MultiheadAttention`` form a group of their own.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.hooks import RemovableHandle

from natgrad.engine.batch import OutputFn, default_output_fn, parse_batch
from natgrad.engine.checks import (
    check_choice,
    check_finite,
    check_int,
    check_no_batch_mixing,
    check_output_rows,
)
from natgrad.engine.common import acc_dtype
from natgrad.engine.likelihoods import Likelihood, get_likelihood
from natgrad.engine.options import LabelSource

__all__ = [
    "UnsupportedStructureError",
    "UNPRUNED_CONVS",
    "Group",
    "find_groups",
    "apply_masks_to",
    "mask_grads",
    "MaskFisher",
    "estimate_mask_fisher",
]


class UnsupportedStructureError(ValueError):
    """A structure (or its coupling to other layers) that structured pruning cannot remove."""


_CONV = (nn.Conv1d, nn.Conv2d)
#: convolutions never pruned: their FLOPs and parameters are a constant cost
UNPRUNED_CONVS = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_UNPRUNED_REASON = "Conv3d and transposed convolutions are not pruned (counted as a constant cost)"
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.LeakyReLU,
    nn.ELU,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Softplus,
    nn.Dropout,
    nn.Identity,
)
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu,
    torch.tanh,
    torch.sigmoid,
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.mish,
    F.tanh,
    F.sigmoid,
    F.leaky_relu,
    F.elu,
    F.hardtanh,
    F.hardswish,
    F.softplus,
    F.dropout,
}
_POOL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
}
_ELEMENTWISE_METHODS = {"relu", "tanh", "sigmoid", "contiguous"}


@dataclass
class Group:
    """The structures of one layer, pruned together under one mask vector.

    Attributes:
        name: the group's name (the producer module's name).
        kind: ``"neuron"`` (Linear outputs), ``"channel"`` (Conv outputs) or ``"head"``.
        size: the number ``S`` of structures.
        producer: name of the module whose outputs are the structures (its rows are removed).
        consumer: name of the module that reads them (its input columns are removed); for
            heads, the attention module itself.
        norms: eval-mode BatchNorm modules between producer and consumer (sliced too).
        repeat: input columns of the consumer per structure (a Conv channel flattened into a
            Linear spans ``repeat`` positions; 1 otherwise).
        consumer_kind: ``"linear"``, ``"conv"`` or ``"attention"`` (a
            :class:`~natgrad.pruning.attention.HeadAttention`, masked inside).
        head_dim: for heads, the width of one head.
        rows: the modules whose output rows are removed, when not just ``producer`` (the
            query/key/value projections of a Hugging Face style self-attention).
        row_repeat: output rows of each of ``rows`` per structure (``head_dim`` for heads).
        row_blocks: fused blocks in each of ``rows`` (3 for GPT-2's fused q/k/v ``c_attn``),
            each ``size · row_repeat`` rows wide.
        heads_module: a Hugging Face style attention whose head-count attributes follow the
            kept heads: ``heads_attrs`` lists ``(attribute, width per head)``.
        batch_dim: the sample axis of the consumer's input (1 for a sequence-first
            ``(T, N, F)`` input, e.g. in ``nn.TransformerEncoderLayer(batch_first=False)``).
    """

    name: str
    kind: str
    size: int
    producer: str
    consumer: str
    norms: list[str] = field(default_factory=list)
    repeat: int = 1
    consumer_kind: str = "linear"
    head_dim: int = 0
    rows: list[str] = field(default_factory=list)
    row_repeat: int = 1
    row_blocks: int = 1
    heads_module: str = ""
    heads_attrs: tuple[tuple[str, int], ...] = ()
    batch_dim: int = 0

    @property
    def row_modules(self) -> list[str]:
        """Modules whose output rows this group's structures own."""
        if self.consumer_kind == "attention":
            return []
        return self.rows or [self.producer]


# -- finding the groups -----------------------------------------------------------------


def _module_target(node: fx.Node) -> str:
    """The module path of a ``call_module`` node (fx stores it as a ``str`` target)."""
    return cast(str, node.target)


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(gm.get_submodule(_module_target(node))).__name__})"
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        if node.target in (operator.add, torch.add, operator.iadd):
            return "an add (a residual connection couples these channels to another layer)"
        if node.target is torch.cat:
            return "torch.cat (concatenated channels)"
        return f"function {name}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "output":
        return "the model output"
    return f"{node.op} {node.target}"


def _first_arg_only(user: fx.Node, node: fx.Node) -> bool:
    if not user.args or user.args[0] is not node:
        return False
    rest = list(user.args[1:]) + list(user.kwargs.values())
    return all(r is not node for r in fx.node.map_arg(rest, lambda n: n) or [])


def _flatten_start(user: fx.Node, gm: fx.GraphModule) -> int | None:
    """``start_dim`` of a full flatten (``end_dim=-1``) node, else None."""
    if user.op == "call_module":
        mod = gm.get_submodule(_module_target(user))
        if isinstance(mod, nn.Flatten) and mod.end_dim == -1:
            return mod.start_dim
        return None
    if (user.op == "call_function" and user.target is torch.flatten) or (
        user.op == "call_method" and user.target == "flatten"
    ):
        start = user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0)
        end = user.args[2] if len(user.args) > 2 else user.kwargs.get("end_dim", -1)
        return start if end == -1 and isinstance(start, int) else None
    return None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _follow(
    gm: fx.GraphModule, node: fx.Node, producer: nn.Module, used: dict[str, int]
) -> Group | str:
    """Follow a producer's output to its consumer; a Group, or the reason there is none."""
    is_conv = isinstance(producer, _CONV)
    size = int(getattr(producer, "out_channels" if is_conv else "out_features"))
    norms: list[str] = []
    repeat = 1
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            what = "no user" if not users else f"{len(users)} users"
            return (
                f"its output has {what} after {_describe(cur, gm)} (a branch or residual "
                "couples the channels to other layers)"
            )
        u = users[0]
        if not _first_arg_only(u, cur):
            return f"its output reaches {_describe(u, gm)}, which combines it with other tensors"
        if u.op == "call_module":
            target = _module_target(u)
            mod = gm.get_submodule(target)
            if used.get(target, 0) > 1:
                return f"module {u.target!r} is called more than once (shared weights)"
            if isinstance(mod, _ELEMENTWISE_MODULES) or (is_conv and isinstance(mod, _POOL_MODULES)):
                cur = u
                continue
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                shape = _shape(cur)
                if mod.num_features != size or (not is_conv and shape is not None and len(shape) != 2):
                    return f"BatchNorm {u.target!r} does not normalize over these {size} channels"
                norms.append(target)
                cur = u
                continue
            start = _flatten_start(u, gm)
            if start is not None:
                if not is_conv or start != 1 or repeat != 1:
                    return f"its output is reshaped by {_describe(u, gm)}"
                shape = _shape(cur)
                if shape is None:
                    return "the shapes could not be propagated"
                repeat = math.prod(shape[2:])
                cur = u
                continue
            if isinstance(mod, nn.Linear):
                cur_shape = _shape(cur)
                if is_conv and repeat == 1 and cur_shape is not None and len(cur_shape) > 2:
                    return f"Linear {u.target!r} reads the spatial axis of a conv output"
                if mod.in_features != size * repeat:
                    return f"Linear {u.target!r} expects {mod.in_features} inputs, not {size * repeat}"
                return Group(
                    name="", kind="channel" if is_conv else "neuron", size=size, producer="",
                    consumer=target, norms=norms, repeat=repeat, consumer_kind="linear",
                    batch_dim=int(cur.meta.get("natgrad_batch_dim", 0)),
                )
            if isinstance(mod, _CONV):
                if not is_conv or repeat != 1:
                    return f"conv {u.target!r} reads these outputs along a non-channel axis"
                if mod.groups != 1 or mod.in_channels != size:
                    return f"conv {u.target!r} is grouped or does not read these {size} channels"
                if mod.padding_mode != "zeros":
                    return f"conv {u.target!r} uses padding_mode={mod.padding_mode!r}"
                return Group(
                    name="", kind="channel", size=size, producer="", consumer=target,
                    norms=norms, repeat=1, consumer_kind="conv",
                )
            return f"its output reaches {_describe(u, gm)}, which this pruner cannot shrink"
        if u.op == "call_function" and (
            u.target in _ELEMENTWISE_FUNCTIONS or (is_conv and u.target in _POOL_FUNCTIONS)
        ):
            cur = u
            continue
        if u.op == "call_method" and u.target in _ELEMENTWISE_METHODS:
            cur = u
            continue
        start = _flatten_start(u, gm)
        if start is not None and is_conv and start == 1 and repeat == 1:
            shape = _shape(cur)
            if shape is None:
                return "the shapes could not be propagated"
            repeat = math.prod(shape[2:])
            cur = u
            continue
        return f"its output reaches {_describe(u, gm)}, which this pruner cannot shrink"


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(
            m, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerEncoder)
        ) or hasattr(m, "_natgrad_head_mask"):
            return True
        return super().is_leaf_module(m, qualname)


def find_groups(
    model: nn.Module, example: Any, *, exclude: Iterable[str] = ()
) -> tuple[list[Group], dict[str, str]]:
    """The prunable groups of ``model`` and, for every other Linear/Conv, why it is not one.

    Args:
        model: the model (not modified).
        example: one batch the model accepts (``x``, ``(x, y)`` or a dict); only its shapes
            matter.
        exclude: modules whose own structures are never removed (see
            :func:`natgrad.prune_structured`).

    Returns:
        ``(groups, skipped)``: the groups in forward order, and ``{module name: reason}``.

    Raises:
        UnsupportedStructureError: when the model cannot be traced with ``torch.fx``.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    exclude = set(exclude)
    batch = parse_batch(example)
    # forward arguments the batch does not give are traced as their defaults (e.g. None)
    import inspect

    concrete: dict[str, Any] = {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    for i, p in enumerate(params):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        given = i < len(batch.args) or p.name in batch.kwargs
        if not given and p.default is not p.empty:
            concrete[p.name] = p.default
    try:
        graph = _Tracer().trace(model, concrete_args=concrete or None)
        gm = fx.GraphModule(model, graph)
    except Exception as err:  # noqa: BLE001 - any tracing failure gets one named error
        hf = hf_groups(model, exclude)
        if hf[0]:
            return hf
        raise UnsupportedStructureError(
            f"Structured pruning traces the model with torch.fx to find which layers feed "
            f"which, and tracing {type(model).__name__} failed ({type(err).__name__}: {err}). "
            "Make the forward traceable (no Python control flow on tensor values) or prune "
            "a traceable submodule."
        ) from None
    args = tuple(a[:2] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in batch.args)
    kwargs = {k: v[:2] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in batch.kwargs.items()}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [p.name for p in params if p.name not in concrete]
    flat = list(args) + [kwargs.get(nm) for nm in names[len(args):]]
    _mark_batch_axes(gm, batch, names, len(placeholders))
    with torch.no_grad():
        ShapeProp(gm).propagate(*flat[: len(placeholders)])
    used: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            used[n.target] = used.get(n.target, 0) + 1
    groups: list[Group] = []
    skipped: dict[str, str] = {}
    consumed: set[str] = set()
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(n.target)
        if isinstance(mod, nn.TransformerEncoder):
            for i, layer in enumerate(mod.layers):
                lname = f"{n.target}.layers.{i}"
                if lname in exclude:
                    skipped[lname] = "excluded"
                else:
                    groups.extend(_layer_groups(lname, layer, exclude, skipped))
            continue
        if isinstance(mod, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) or hasattr(
            mod, "_natgrad_head_mask"
        ):
            if n.target in exclude:
                skipped[n.target] = "excluded"
            elif not isinstance(mod, nn.TransformerEncoderLayer) and _weights_used(n):
                skipped[n.target] = (
                    "the model uses its attention weights (need_weights=True): removing heads "
                    "would change their average over the heads; call it with "
                    "need_weights=False, or exclude it"
                )
            else:
                found_layer = _layer_groups(n.target, mod, exclude, skipped)
                groups.extend(found_layer)
            continue
        if isinstance(mod, UNPRUNED_CONVS):
            skipped[n.target] = "excluded" if n.target in exclude else _UNPRUNED_REASON
            continue
        if not isinstance(mod, (nn.Linear, *_CONV)):
            continue
        if n.target in exclude:
            skipped[n.target] = "excluded"
            continue
        if used[n.target] > 1:
            skipped[n.target] = "called more than once (shared weights)"
            continue
        if isinstance(mod, _CONV) and (mod.groups != 1):
            skipped[n.target] = "grouped convolution (output channels are coupled to input groups)"
            continue
        found = _follow(gm, n, mod, used)
        if isinstance(found, str):
            skipped[n.target] = found
            continue
        if found.consumer in consumed:
            skipped[n.target] = f"its consumer {found.consumer!r} reads several pruned layers"
            continue
        found.name = found.producer = n.target
        consumed.add(found.consumer)
        groups.append(found)
    return _drop_tied(model, _drop_excluded(groups, exclude, skipped), skipped), skipped


def _drop_excluded(groups: list[Group], exclude: set[str], skipped: dict[str, str]) -> list[Group]:
    """The groups that remove no structure of an excluded module (or of a module inside
    one): its output rows, its norm's channels, an attention's heads; the others go to
    ``skipped`` with the reason. An excluded consumer may still lose the input columns
    that read a pruned producer (Torch-Pruning's ``ignored_layers`` convention: a kept
    head's inputs shrink with the layer before it); it is never re-fitted
    (:func:`~natgrad.pruning.shrink.tune_layers` ``exclude``)."""
    kept = []
    for g in groups:
        touched = [g.consumer] if g.consumer_kind == "attention" else [*g.row_modules, *g.norms]
        hit = next(
            (t for t in touched for e in exclude if t == e or t.startswith(e + ".") or e.startswith(t + ".")),
            None,
        )
        if hit is None:
            kept.append(g)
        else:
            skipped[g.name] = f"module {hit!r}, which pruning it would change, is excluded"
    return kept


def _drop_tied(model: nn.Module, groups: list[Group], skipped: dict[str, str]) -> list[Group]:
    """The groups none of whose modules (producer rows, consumer, norms; a head-attention
    module with its projections) holds a parameter that a module outside the group holds
    too; the others go to ``skipped`` with the reason (shrinking one holder of a tied
    weight would rebuild it alone and break the tie)."""
    holders: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            holders.setdefault(id(p), []).append(name)
    if all(len(h) == 1 for h in holders.values()):
        return groups
    kept = []
    for g in groups:
        touched = [g.consumer] if g.consumer_kind == "attention" else [*g.row_modules, g.consumer, *g.norms]

        def inside(name: str, touched: list[str] = touched) -> bool:
            return any(name == t or name.startswith(t + ".") for t in touched)

        clash = next(
            ((t, other) for t in touched for p in model.get_submodule(t).parameters()
             for other in holders.get(id(p), []) if not inside(other)),
            None,
        )
        if clash is None:
            kept.append(g)
            continue
        skipped[g.name] = (
            f"module {clash[0]!r} shares a parameter with module {clash[1]!r} (tied weights): "
            "shrinking one holder would break the tie; untie them, or exclude the group"
        )
    return kept


def _weights_used(node: fx.Node) -> bool:
    """Whether anything reads the attention weights (``out[1]``, or the whole tuple) of
    the attention call ``node``."""
    for u in node.users:
        getitem = u.op == "call_function" and u.target is operator.getitem and len(u.args) > 1
        if getitem and (u.args[1] == 0 or not u.users):
            continue
        return True
    return False


def _mark_batch_axes(gm: fx.GraphModule, batch: Any, names: list[str], n_inputs: int) -> None:
    """Store in each node's ``meta["natgrad_batch_dim"]`` its sample axis: the one axis
    whose size differs between a 1-sample and a 2-sample shape propagation (nothing when
    the batch has one sample, or the two differ in no axis or in several)."""
    from torch.fx.passes.shape_prop import ShapeProp

    shapes = []
    for k in (1, 2):
        args = [a[:k] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in batch.args]
        kw = {n: v[:k] if isinstance(v, torch.Tensor) and v.dim() > 0 else v for n, v in batch.kwargs.items()}
        flat = args + [kw.get(nm) for nm in names[len(args):]]
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*flat[:n_inputs])
        except Exception:  # noqa: BLE001 - a model that needs 2 samples: axes left unmarked
            return
        shapes.append({n: _shape(n) for n in gm.graph.nodes})
    for n in gm.graph.nodes:
        one, two = shapes[0][n], shapes[1][n]
        if one is None or two is None or len(one) != len(two):
            continue
        diff = [i for i, (a, b) in enumerate(zip(one, two, strict=True)) if a != b]
        if len(diff) == 1:
            n.meta["natgrad_batch_dim"] = diff[0]


def _layer_groups(
    name: str, mod: nn.Module, exclude: set[str], skipped: dict[str, str]
) -> list[Group]:
    """Groups inside an attention module or a ``nn.TransformerEncoderLayer`` (a leaf of the
    trace): the heads of its attention and the hidden neurons of its feed-forward block."""
    out: list[Group] = []
    if isinstance(mod, nn.TransformerEncoderLayer):
        attn_name = f"{name}.self_attn"
        if isinstance(mod.self_attn, nn.MultiheadAttention):
            # its fused fast path would bypass the feed-forward masks: convert first
            skipped[name] = (
                "its self_attn is an nn.MultiheadAttention; convert it with "
                "natgrad.pruning.attention.from_multihead first (prune_structured does)"
            )
            return out
        if attn_name not in exclude:
            out.extend(_layer_groups(attn_name, mod.self_attn, exclude, skipped))
        else:
            skipped[attn_name] = "excluded"
        lin1 = f"{name}.linear1"
        if lin1 in exclude:
            skipped[lin1] = "excluded"
        else:
            # linear1 -> activation (elementwise by nn.TransformerEncoderLayer's contract)
            # -> dropout -> linear2 (see its _ff_block)
            out.append(
                Group(
                    name=lin1, kind="neuron", size=int(mod.linear1.out_features),
                    producer=lin1,
                    consumer=f"{name}.linear2", consumer_kind="linear",
                    batch_dim=0 if getattr(mod.self_attn, "batch_first", True) else 1,  # (T, N, E) if not
                )
            )
        return out
    if isinstance(mod, nn.MultiheadAttention):
        skipped[name] = (
            "nn.MultiheadAttention holds num_heads * head_dim == embed_dim, so it cannot lose "
            "heads; convert it with natgrad.pruning.attention.from_multihead (prune_structured "
            "does) — kdim/vdim != embed_dim, bias=False, add_bias_kv and add_zero_attn are "
            "not supported"
        )
        return out
    out.append(
        Group(
            name=name, kind="head", size=cast(int, mod.num_heads), producer=name,
            consumer=name, consumer_kind="attention", head_dim=cast(int, mod.head_dim),
        )
    )
    return out


def _is_hf_self_attention(m: nn.Module) -> bool:
    return (
        all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value"))
        and isinstance(getattr(m, "attention_head_size", None), int)
        and isinstance(getattr(m, "num_attention_heads", None), int)
    )


def hf_groups(model: nn.Module, exclude: Iterable[str] = ()) -> tuple[list[Group], dict[str, str]]:
    """Groups of Hugging Face BERT-style models (BERT, RoBERTa, ViT, ...), found by their
    module layout, for models ``torch.fx`` cannot trace:

    * heads: a self-attention with ``query``/``key``/``value`` Linears and
      ``num_attention_heads``, ``attention_head_size``, whose parent's ``output.dense``
      reads the concatenated heads (BertAttention); or an attention with
      ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``num_attention_heads`` and ``head_dim``
      (ViTAttention in transformers 5; grouped-query attention is left out); or GPT-2's
      attention with fused ``c_attn`` and ``c_proj`` (after its ``Conv1D`` layers are
      converted to ``nn.Linear``, which :func:`~natgrad.prune_structured` does);
    * feed-forward neurons: ``intermediate.dense`` (then an elementwise activation) read by
      ``output.dense`` of the same layer (BertLayer); ``fc1 -> activation_fn -> fc2``
      (ViTMLP); ``c_fc -> act -> c_proj`` (GPT2MLP).

    Every other Linear is reported in ``skipped``.
    """
    exclude = set(exclude)
    groups: list[Group] = []
    used: set[str] = set()
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""
        out = getattr(mod, "output", None)
        dense = getattr(out, "dense", None) if out is not None else None
        if not isinstance(dense, nn.Linear):
            continue
        for attr, child in mod.named_children():
            if _is_hf_self_attention(child) and not getattr(child, "is_cross_attention", False):
                hname = f"{pre}{attr}"
                d, h = child.attention_head_size, child.num_attention_heads
                if hname in exclude or dense.in_features != h * d or child.query.out_features != h * d:
                    continue
                groups.append(
                    Group(
                        name=hname, kind="head", size=h, producer=hname,
                        consumer=f"{pre}output.dense", repeat=d, consumer_kind="linear",
                        head_dim=d, rows=[f"{hname}.{p}" for p in ("query", "key", "value")],
                        row_repeat=d, heads_module=hname,
                        heads_attrs=(("num_attention_heads", 1), ("all_head_size", d)),
                    )
                )
                used.update([f"{hname}.query", f"{hname}.key", f"{hname}.value", f"{pre}output.dense"])
        inter = getattr(getattr(mod, "intermediate", None), "dense", None)
        if isinstance(inter, nn.Linear) and dense.in_features == inter.out_features:
            pname = f"{pre}intermediate.dense"
            if pname in exclude:
                continue
            groups.append(
                Group(
                    name=pname, kind="neuron", size=inter.out_features, producer=pname,
                    consumer=f"{pre}output.dense", consumer_kind="linear",
                )
            )
            used.update([pname, f"{pre}output.dense"])
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""
        found = [getattr(mod, a, None) for a in ("q_proj", "k_proj", "v_proj", "o_proj")]
        projs = [p for p in found if isinstance(p, nn.Linear)]
        d, h = getattr(mod, "head_dim", None), getattr(mod, "num_attention_heads", None)
        if (
            len(projs) == 4
            and isinstance(d, int)
            and isinstance(h, int)
            and all(p.out_features == h * d for p in projs[:3])  # no grouped-query sharing
            and projs[3].in_features == h * d
            and name not in exclude
        ):
            groups.append(
                Group(
                    name=name, kind="head", size=h, producer=name, consumer=f"{pre}o_proj",
                    repeat=d, consumer_kind="linear", head_dim=d,
                    rows=[f"{pre}{p}" for p in ("q_proj", "k_proj", "v_proj")], row_repeat=d,
                    heads_module=name, heads_attrs=(("num_attention_heads", 1),),
                )
            )
            used.update(f"{pre}{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        c_attn, c_proj = getattr(mod, "c_attn", None), getattr(mod, "c_proj", None)
        nh, hd = getattr(mod, "num_heads", None), getattr(mod, "head_dim", None)
        if (  # GPT-2 attention (its Conv1D converted to Linear): fused q/k/v in c_attn
            isinstance(c_attn, nn.Linear)
            and isinstance(c_proj, nn.Linear)
            and isinstance(nh, int)
            and isinstance(hd, int)
            and getattr(mod, "split_size", None) == nh * hd
            and c_attn.out_features == 3 * nh * hd
            and c_proj.in_features == nh * hd
            and not getattr(mod, "is_cross_attention", False)
            and name not in exclude
        ):
            groups.append(
                Group(
                    name=name, kind="head", size=nh, producer=name, consumer=f"{pre}c_proj",
                    repeat=hd, consumer_kind="linear", head_dim=hd, rows=[f"{pre}c_attn"],
                    row_repeat=hd, row_blocks=3, heads_module=name,
                    heads_attrs=(("num_heads", 1), ("split_size", hd)),
                )
            )
            used.update([f"{pre}c_attn", f"{pre}c_proj"])
        # feed-forward blocks: producer -> activation -> consumer (GPT-2: c_fc/act/c_proj;
        # ViT-style: fc1/activation_fn/fc2)
        for up, act, down in (("c_fc", "act", "c_proj"), ("fc1", "activation_fn", "fc2")):
            first, second = getattr(mod, up, None), getattr(mod, down, None)
            if (
                isinstance(first, nn.Linear)
                and isinstance(second, nn.Linear)
                and second.in_features == first.out_features
                and callable(getattr(mod, act, None))
                and f"{pre}{up}" not in exclude
            ):
                groups.append(
                    Group(
                        name=f"{pre}{up}", kind="neuron", size=first.out_features,
                        producer=f"{pre}{up}", consumer=f"{pre}{down}", consumer_kind="linear",
                    )
                )
                used.update([f"{pre}{up}", f"{pre}{down}"])
    tied: dict[str, str] = {}
    groups = _drop_tied(model, _drop_excluded(groups, exclude, tied), tied)
    skipped = {
        n: "excluded" if n in exclude else (
            "the model cannot be traced by torch.fx; only BERT-style attention heads and "
            "feed-forward neurons are pruned"
        )
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, *_CONV)) and n not in used
    }
    skipped.update({
        n: "excluded" if n in exclude else _UNPRUNED_REASON
        for n, m in model.named_modules() if isinstance(m, UNPRUNED_CONVS)
    })
    skipped.update(tied)
    return groups, skipped


# -- masks -------------------------------------------------------------------------------


def _expand_mask(group: Group, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Broadcast ``mask`` ((S,) shared or (N, S) per sample) onto the consumer input ``x``."""
    m = mask.to(x.dtype)
    if group.repeat > 1:
        m = m.repeat_interleave(group.repeat, dim=-1)
    if group.consumer_kind == "linear":
        if m.dim() == 2:
            axis = group.batch_dim if x.dim() > 2 else 0
            if x.shape[axis] != m.shape[0]:
                raise UnsupportedStructureError(
                    f"The input of {group.consumer!r} has {x.shape[axis]} entries on axis "
                    f"{axis}, taken as the sample axis, but the batch has {m.shape[0]} samples: "
                    "its sample axis could not be found. Exclude the layer with "
                    f"exclude=[{group.name!r}], or feed the layer batch-first inputs."
                )
            shape = [1] * x.dim()
            shape[axis], shape[-1] = m.shape[0], m.shape[1]
            m = m.view(shape)
        return m
    # conv: channels on dim 1
    tail = [1] * (x.dim() - 2)
    return m.view(m.shape[0], m.shape[1], *tail) if m.dim() == 2 else m.view(m.shape[0], *tail)


@contextlib.contextmanager
def apply_masks_to(
    model: nn.Module, groups: list[Group], masks: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Within the block, ``model`` multiplies each structure's output by its mask.

    Args:
        model: the model the groups were found on.
        groups: from :func:`find_groups`.
        masks: ``{group name: mask}``, a mask of shape ``(S,)`` (all samples) or ``(N, S)``
            (one row per sample, for per-sample gradients). Groups not named stay unmasked.
    """
    handles: list[RemovableHandle | _HeadMaskHandle] = []
    try:
        for g in groups:
            if g.name not in masks:
                continue
            mod = model.get_submodule(g.consumer)
            if g.consumer_kind == "attention":
                handles.append(_attach_head_mask(mod, masks[g.name]))
            else:
                handles.append(mod.register_forward_pre_hook(_input_mask_hook(g, masks[g.name])))
        yield
    finally:
        for h in handles:
            h.remove()


def _input_mask_hook(
    group: Group, mask: torch.Tensor
) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (x * _expand_mask(group, mask, x),) + tuple(args[1:])

    return hook


class _HeadMaskHandle:
    def __init__(self, mod: nn.Module) -> None:
        self.mod = mod

    def remove(self) -> None:
        # torch types Module.__setattr__ values as Tensor | Module; a plain None is fine
        self.mod._natgrad_head_mask = None  # type: ignore[assignment]


def _attach_head_mask(mod: nn.Module, mask: torch.Tensor) -> _HeadMaskHandle:
    if not hasattr(mod, "_natgrad_head_mask"):
        raise UnsupportedStructureError(
            f"{type(mod).__name__} takes head masks only after conversion to "
            "natgrad.pruning.attention.HeadAttention (prune_structured converts it)."
        )
    mod._natgrad_head_mask = mask
    return _HeadMaskHandle(mod)


# -- per-sample mask gradients and the mask Fisher ---------------------------------------


def _labels_for(
    lik: Likelihood,
    out: torch.Tensor,
    target: torch.Tensor | None,
    labels: LabelSource,
    mc_samples: int,
    generator: torch.Generator | None,
) -> list[torch.Tensor]:
    if labels != "empirical":
        lik.check_output(out)
    if labels == "empirical":
        if target is None:
            raise ValueError(
                "labels='empirical' needs labels in the data: pass (x, y) batches, or use "
                "labels='mc' to draw them from the model."
            )
        return [target]
    # no generator: one seeded with 0, as the engine's Plan does (reproducible by default)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    draws = lik.sample(out.detach(), gen, mc_samples, target)
    return list(draws)


def mask_grads(
    model: nn.Module,
    groups: list[Group],
    batch: Any,
    *,
    likelihood: str | Likelihood = "categorical",
    labels: LabelSource = "empirical",
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    output_fn: OutputFn | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Exact per-sample gradients ``∂l_n/∂m`` at ``m = 1``, one dict per label draw.

    Every sample gets its own mask row, so one backward of ``Σ_n l_n`` gives all rows.

    Returns:
        a list (one entry per label: the data labels, or ``mc_samples`` draws) of
        ``{group name: (N, S)}`` tensors in the accumulation dtype.
    """
    lik = get_likelihood(likelihood)
    check_choice("labels", labels, ("empirical", "mc"))
    check_no_batch_mixing(model)
    b = parse_batch(batch)
    ref = next(iter(model.parameters()))
    dtype = acc_dtype(ref.dtype)
    masks = {
        g.name: torch.ones(b.size, g.size, dtype=ref.dtype, device=ref.device, requires_grad=True)
        for g in groups
    }
    out_fn = output_fn or default_output_fn
    with torch.enable_grad(), apply_masks_to(model, groups, masks):
        out = out_fn(model(*b.args, **b.kwargs))
        check_output_rows(out, b.size)
        targets = _labels_for(lik, out, b.target, labels, mc_samples, generator)
        result = []
        for i, t in enumerate(targets):
            if b.target is not None and labels == "empirical":
                lik.check_target(out, t)
            loss = lik.nll(out, t).sum()
            grads = torch.autograd.grad(
                loss, [masks[g.name] for g in groups], retain_graph=i < len(targets) - 1,
                allow_unused=True,
            )
            result.append(
                {
                    g.name: (torch.zeros_like(masks[g.name]) if gr is None else gr).to(dtype)
                    for g, gr in zip(groups, grads, strict=True)
                }
            )
    return result


class MaskFisher:
    """Per-layer block mask Fisher ``F_g = (1/N) Σ_n E_y[g_n g_nᵀ]`` for every group.

    Attributes:
        blocks: ``{group name: (S, S)}`` block Fisher (symmetric PSD).
        n_samples: the number ``N`` of samples averaged.
    """

    def __init__(self, blocks: dict[str, torch.Tensor], n_samples: int):
        self.blocks = blocks
        self.n_samples = n_samples

    def diagonal(self, name: str) -> torch.Tensor:
        """``F_ss`` of the group ``name``, shape ``(S,)``."""
        return self.blocks[name].diagonal().clone()

    def predicted_increase(
        self, removed: Mapping[str, torch.Tensor], *, block: bool = True
    ) -> float:
        """Second-order loss increase of setting the masks of ``removed`` to 0.

        ``Σ_g ½ 1_Rᵀ F_g[R, R] 1_R`` (``block=True``) or ``Σ_g ½ Σ_{s∈R} F_g[s, s]``.

        Args:
            removed: ``{group name: indices removed}``.
        """
        total = 0.0
        for name, idx in removed.items():
            idx = torch.as_tensor(idx, dtype=torch.long)
            if idx.numel() == 0:
                continue
            f = self.blocks[name]
            total += 0.5 * float(
                f[idx][:, idx].sum() if block else f.diagonal()[idx].sum()
            )
        return total


def estimate_mask_fisher(
    model: nn.Module,
    groups: list[Group],
    data: Any,
    *,
    likelihood: str | Likelihood = "categorical",
    labels: LabelSource = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
    max_batches: int | None = None,
    output_fn: OutputFn | None = None,
) -> MaskFisher:
    """The block mask Fisher of every group from exact per-sample mask gradients.

    ``F_g = (1/N) Σ_n (1/K) Σ_k g_nk g_nkᵀ`` with ``g_nk = ∂l(x_n, y_k)/∂m_g`` (``K = 1`` and
    ``y`` the data label for ``labels="empirical"``, ``K = mc_samples`` draws
    ``y ~ p(y|x_n)`` for ``labels="mc"``).

    Args:
        model: a model in eval mode (no train-mode BatchNorm).
        groups: from :func:`find_groups`.
        data: a batch or an iterable of batches.
        likelihood: name or :class:`~natgrad.Likelihood`.
        labels: ``"empirical"`` or ``"mc"``.
        mc_samples: draws per sample for ``labels="mc"``.
        seed: seed of the label draws.
        max_batches: stop after this many batches.

    Returns:
        a :class:`MaskFisher`.

    Raises:
        ValueError: for empty data, unknown ``labels`` or a model that mixes samples.
    """
    from natgrad.curvature.estimate import iterate_batches

    mc_samples = check_int("mc_samples", mc_samples, 1)
    gen = torch.Generator().manual_seed(seed)
    ref = next(iter(model.parameters()))
    dtype = acc_dtype(ref.dtype)
    blocks = {g.name: torch.zeros(g.size, g.size, dtype=dtype, device=ref.device) for g in groups}
    n = 0
    for batch in iterate_batches(data, max_batches):
        per_label = mask_grads(
            model, groups, batch, likelihood=likelihood, labels=labels,
            mc_samples=mc_samples, generator=gen, output_fn=output_fn,
        )
        for grads in per_label:
            for name, g in grads.items():
                blocks[name] += g.T @ g / len(per_label)
        n += next(iter(per_label[0].values())).shape[0]
    if n == 0:
        raise ValueError("data holds no batch: the mask Fisher needs at least one sample.")
    for k, v in blocks.items():
        check_finite(
            f"the mask Fisher of {k!r}", v,
            "The per-sample losses or their gradients overflowed: check the data, the labels "
            "and the model's outputs (a bfloat16 model may need float32).",
        )
    return MaskFisher({k: v / n for k, v in blocks.items()}, n)
