"""K-FAC: Kronecker factors of the Fisher for Linear, Conv, Conv1D and Embedding layers.

For a layer ``s = W a (+ b)`` with per-sample loss ``l_n`` and output gradient
``b_n = ∂l_n/∂s_n``, the per-sample weight gradient is ``g_n = b_n ãₙᵀ`` where
``ã = [a; 1]`` when the layer has a (selected) bias, so weight and bias form one matrix
``[W, b]`` of shape ``(d_out, d_in [+1])``. K-FAC approximates the Fisher of that matrix,
flattened row-major (``V.reshape(-1)``, PyTorch's order), by

    ``F ≈ G ⊗ A``,   ``A = (1/(N·T)) Σ_{n,t} ã_{n,t} ã_{n,t}ᵀ``,   ``G = (1/N) Σ_{n,t} Σ_j b_{n,t,j} b_{n,t,j}ᵀ``

(``torch.kron(G, A)``; in column-major ``vec`` notation this is the usual ``A ⊗ G``).

* ``t`` runs over the ``T`` positions sharing the weight: ``T = 1`` for a Linear layer on
  ``(N, d_in)``, the tokens of ``(N, *, d_in)`` inputs, and the output locations of a
  convolution, whose inputs ``a_{n,t}`` are the unfolded patches (``F.unfold``; ordering
  ``(C_in, k_h, k_w)`` as in ``W.reshape(d_out, -1)``). This is the "expand" convention
  (KFC, Grosse & Martens 2016; Eschenhagen et al. 2023): positions act like extra samples
  in ``G`` and are averaged in ``A``. A module called several times in one forward pass
  contributes each call's positions.
* ``j`` runs over the label source's output cotangents, with weights ``w_j``: the data
  label (``empirical``), ``k`` predictive draws (``mc``, ``w_j = 1/k``), or the columns
  ``s_j`` of the output Fisher's factor (``exact``), so that ``Σ_j b_j b_jᵀ`` is
  ``E_y[b bᵀ]`` in closed form.

Layers (:func:`kfac_coverage`; :func:`kfac_layers` with ``extended=False`` keeps the
original set of Linear and plain convolutions):

* ``nn.Linear`` on ``(N, *, d_in)``;
* ``nn.Conv1d`` / ``nn.Conv2d``, any ``padding_mode`` (the input is padded explicitly as
  the convolution does, then unfolded) and ``padding="same"``; with ``groups = g`` the
  weight ``(C_out, C_in/g, *k)`` splits into ``g`` independent blocks
  ``(C_out/g, C_in/g·k [+1])`` with their own ``A_i``, ``G_i`` (block-diagonal over groups);
* transformers' ``Conv1D`` (``y = x W + b``, weight stored ``(in, out)``): the block
  matrix is ``[Wᵀ, b]``, so ``G`` is over the outputs and ``A`` over the inputs as for
  ``nn.Linear``;
* ``nn.Embedding`` (weight ``(V, D)``): the block matrix is ``Wᵀ`` ``(D, V)``, the inputs
  are one-hot token indicators, so ``A = diag(counts / (N·T))`` is diagonal (stored as a
  vector; the ``padding_idx`` row, whose gradient is zero, counts nothing) and ``G`` is the
  full ``D x D`` output-gradient factor. ``max_norm``, ``scale_grad_by_freq`` and sparse
  embeddings are not covered.

A layer pruned by ``torch.nn.utils.prune`` (``W = W_orig ⊙ M``, weight and/or bias) is
covered where the caller asks (``masked=True``, see :func:`kfac_coverage`): it computes
``s = (W_orig ⊙ M) a``, so ``A`` and ``G`` are defined as above, and the per-sample gradient
of ``W_orig`` is ``M ⊙ (b ãᵀ)``.

A weight used by several modules (a tied embedding and LM head) is never covered: the
two uses' statistics cannot form one Kronecker product. Nor is a layer whose weight or
bias the forward also reads outside the layer's own call (a head tied through
``F.linear(h, emb.weight)``, ``x @ lin.weight.T``, ``lin.forward(x)``): the factors see
the module's calls only, and would silently leave out the other uses' gradient terms;
:class:`OutsideUses` finds such layers on the first batch. Everything not covered is left
to the diagonal Fisher, with the reason (see :func:`kfac_coverage`).

The factors are captured in one forward pass, whose output also gives the ``mc`` draws
(module forward hooks record the inputs; each hooked output is replaced by a clone so
that in-place activations after it do not disturb its gradient), and one backward pass
per cotangent with ``torch.autograd.grad`` with respect to the layer outputs;
parameters' ``.grad`` are never touched.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    >>> f = kfac_factors(model, (x, y))
    >>> f["0"].A.shape, f["0"].G.shape, f["2"].A.shape
    (torch.Size([4, 4]), torch.Size([4, 4]), torch.Size([5, 5]))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from natgrad.engine.batch import OutputFn
from natgrad.engine.capture_layers import is_conv1d, runs_own_forward
from natgrad.engine.checks import check_choice, check_fixed_model, mark_user_error
from natgrad.engine.common import global_forward_hooks, to_acc
from natgrad.engine.likelihoods import Likelihood
from natgrad.engine.options import LabelSource, ParamSpec
from natgrad.engine.per_sample import Plan, hooked_output
from natgrad.engine.report import Report

__all__ = [
    "LAYER_KINDS",
    "Captured",
    "capture",
    "factor_stats",
    "layer_patches",
    "per_sample_blocks",
    "block_dims",
    "weight_blocks",
    "split_weight_blocks",
    "layer_kind",
    "kfac_coverage",
    "OUTSIDE_REASON",
    "OutsideUses",
    "KFACLayer",
    "KroneckerFactors",
    "kfac_layers",
    "kfac_factors",
    "kfac_eigen",
    "kfac_solve",
    "KFAC_DAMPING",
    "KfacApprox",
    "KFAC_APPROX",
    "kfac_factored_inverses",
    "layer_matrix",
    "split_layer_matrix",
    "mask_reparam",
]


KfacDamping = Literal["factored", "exact"]
KFAC_DAMPING: tuple[KfacDamping, ...] = get_args(KfacDamping)
#: how the positions ``t`` of a weight-sharing layer enter the factors (see
#: :func:`factor_stats`): ``"expand"`` (positions as extra samples) or ``"reduce"``
KfacApprox = Literal["expand", "reduce"]
KFAC_APPROX: tuple[KfacApprox, ...] = get_args(KfacApprox)

#: K-FAC layer kinds: how a module's weight maps onto the ``[W, b]`` block matrix.
LAYER_KINDS = ("linear", "conv", "conv1d_t", "embedding")


@dataclass
class KFACLayer:
    """A layer K-FAC covers: module name, module, weight name, bias name (or None).

    ``kind`` is one of :data:`LAYER_KINDS`: ``"linear"`` (``nn.Linear``), ``"conv"``
    (``nn.Conv1d`` / ``nn.Conv2d``, ``groups`` blocks), ``"conv1d_t"`` (transformers'
    ``Conv1D``, weight stored ``(in, out)``) or ``"embedding"`` (``nn.Embedding``, weight
    ``(vocabulary, dim)``; ``A`` is diagonal: token frequencies).
    """

    name: str
    module: nn.Module
    weight: str
    bias: str | None
    kind: str = "linear"
    groups: int = 1
    #: the weight (``mask_w``) / covered bias (``mask_b``) is pruned by
    #: ``torch.nn.utils.prune``: the parameter named ``weight`` is ``<m>.weight_orig``
    #: and the layer computes with ``weight_orig ⊙ weight_mask`` (see :meth:`mask_block`)
    mask_w: bool = False
    mask_b: bool = False

    @property
    def module_weight(self) -> torch.Tensor:
        """The module's (effective) weight tensor: every covered kind has a ``weight``
        parameter, or, pruned, the tensor ``weight_orig * weight_mask`` of that shape."""
        return cast(torch.Tensor, self.module.weight)

    def mask_block(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The pruning mask as a block matrix ``M = [M_W, m_b]`` ``(groups, d_G, d_A)``.

        Read from the module's ``weight_mask`` / ``bias_mask`` buffers now (ones where a
        part is not pruned), in ``dtype`` (default: the accumulation dtype); None when
        neither the weight nor the covered bias is pruned.

        Raises:
            ValueError: a mask holding values other than 0 and 1 (``prune.custom_from_mask``
                does not check): ``W_orig ⊙ M`` then scales entries, and the masked forms
                (``diag = M ⊙ diag F``, the per-sample gradient ``M ⊙ g``) would be off.
        """
        if not (self.mask_w or self.mask_b):
            return None
        w = self.module_weight
        dt = dtype or to_acc(w.detach()).dtype
        parts = [("weight_mask", self.mask_w), ("bias_mask", self.mask_b)]
        for attr, on in parts:
            m = cast(torch.Tensor, getattr(self.module, attr)) if on else None
            if m is not None and bool(((m != 0) & (m != 1)).any()):
                raise ValueError(
                    f"Layer {self.name!r}: its torch.nn.utils.prune mask {attr} holds values "
                    "other than 0 and 1, so W_orig * mask scales entries instead of pruning "
                    "them, which the masked Kronecker form does not model. Use a 0/1 mask "
                    "(prune.custom_from_mask(module, name, mask != 0)), or "
                    "natgrad.make_permanent(model) to bake the scaling into the weights."
                )
        mw = cast(torch.Tensor, self.module.weight_mask) if self.mask_w else torch.ones_like(w)
        mb = None
        if self.bias is not None:
            d_out = w.shape[1] if self.transposed else w.shape[0]
            mb = (cast(torch.Tensor, self.module.bias_mask) if self.mask_b
                  else torch.ones(d_out, device=w.device))
            mb = mb.to(dt)
        M = weight_blocks(tuple(w.shape), self.transposed, self.groups, mw.to(dt), mb)
        # a copy, never a view of the module's buffer: a curvature must not change when
        # the model's mask is edited later (the preconditioner re-reads it; see there)
        return M.clone() if M.data_ptr() == mw.data_ptr() else M

    @property
    def transposed(self) -> bool:
        """Whether the weight is stored ``(in, out)``, so the block matrix is ``Wᵀ``."""
        return self.kind in ("conv1d_t", "embedding")

    def dims(self) -> tuple[int, int, int]:
        """``(groups, d_G, d_A)``: the block matrix of each group is ``(d_G, d_A)``.

        ``d_A`` counts the bias column when the bias is covered.
        """
        shape = tuple(self.module_weight.shape)
        return block_dims(shape, self.transposed, self.groups, self.bias is not None)


def block_dims(
    shape: tuple[int, ...], transposed: bool, groups: int, has_bias: bool
) -> tuple[int, int, int]:
    """``(groups, d_G, d_A)`` of the ``[W, b]`` block matrix of a weight of ``shape``.

    Example:
        >>> block_dims((6, 2, 3, 3), False, 2, True)  # Conv2d(4, 6, 3, groups=2)
        (2, 3, 19)
        >>> block_dims((5, 7), True, 1, True)  # transformers Conv1D(nf=7, nx=5)
        (1, 7, 6)
    """
    if transposed:
        d_out, d_in = shape[1], shape[0]
    else:
        d_out = shape[0]
        d_in = 1
        for s in shape[1:]:
            d_in *= int(s)
    return groups, d_out // groups, d_in + (1 if has_bias else 0)


@dataclass
class KroneckerFactors(Report):
    """``A`` ``(d_in[+1], d_in[+1])`` and ``G`` ``(d_out, d_out)`` of one layer.

    float32 (float64 for float64 models). For a layer with ``groups > 1`` both carry a
    leading group dimension; an Embedding's ``A`` is a vector (its diagonal).

    ``n_samples`` is ``N``; ``positions`` is ``T`` (summed over calls of the module).
    """

    A: torch.Tensor
    G: torch.Tensor
    n_samples: int
    positions: int


def _explicit_padding(m: nn.Conv1d | nn.Conv2d) -> list[int] | None:
    """``F.pad`` amounts (last dimension first) for a convolution, or None when it cannot
    be expressed (a string padding with stride > 1)."""
    k, d = m.kernel_size, m.dilation
    if isinstance(m.padding, str):
        if m.padding == "valid":
            return [0] * (2 * len(k))
        if any(s != 1 for s in m.stride):
            return None
        pads: list[int] = []
        for kk, dd in zip(reversed(k), reversed(d), strict=True):
            total = dd * (kk - 1)
            pads += [total // 2, total - total // 2]
        return pads
    pads = []
    for p in reversed(m.padding):
        pads += [p, p]
    return pads


def _is_hf_conv1d(m: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` running its own forward (:func:`is_conv1d`) whose weight
    (or pruned ``weight_orig``) has its ``(nx, nf)`` shape."""
    if not is_conv1d(m):
        return False
    w = getattr(m, "weight", None)
    if not isinstance(w, nn.Parameter):  # pruned by torch.nn.utils.prune
        w = m._parameters.get("weight_orig")
    return isinstance(w, nn.Parameter) and tuple(w.shape) == (getattr(m, "nx", -1), getattr(m, "nf", -1))


def mask_reparam(m: nn.Module, attr: str) -> nn.Parameter | str | None:
    """How ``torch.nn.utils.prune`` reparametrizes ``m.<attr>``.

    Returns the parameter ``<attr>_orig`` when ``m`` holds it with a buffer ``<attr>_mask``
    of its shape and a forward pre-hook of ``torch.nn.utils.prune`` that computes
    ``<attr> = <attr>_orig * <attr>_mask`` (a pruning method or container whose
    ``apply_mask`` and ``__call__`` are torch's own): the layer then computes with
    ``W_orig ⊙ M``, a masked Kronecker form. Returns a reason (str) when ``<attr>_orig``
    exists but the reparametrization is anything else (a pruning method that overrides
    ``apply_mask``, no such hook, a mask of another shape), and None when ``m.<attr>`` is
    not reparametrized at all.
    """
    orig = m._parameters.get(f"{attr}_orig")
    if orig is None:
        return None
    mask = m._buffers.get(f"{attr}_mask")
    hooks = [h for h in m._forward_pre_hooks.values()
             if isinstance(h, prune.BasePruningMethod) and getattr(h, "_tensor_name", None) == attr]
    if mask is None or tuple(mask.shape) != tuple(orig.shape) or len(hooks) != 1:
        return (f"its {attr} is reparametrized through {attr}_orig without a "
                f"torch.nn.utils.prune mask {attr}_mask of its shape")
    h = type(hooks[0])
    if (h.apply_mask is not prune.BasePruningMethod.apply_mask
            or h.__call__ is not prune.BasePruningMethod.__call__):
        return (f"its {attr} is computed by the custom pruning method {h.__name__} (not "
                f"{attr}_orig * {attr}_mask), which has no Kronecker form")
    return orig


def layer_kind(m: nn.Module, extended: bool = True) -> tuple[str | None, str]:
    """``(kind, "")`` for a module K-FAC covers, else ``(None, reason)``.

    With ``extended=False`` only the original set is covered: ``nn.Linear`` and
    ``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1``, ``padding_mode='zeros'`` and integer
    padding (what :class:`natgrad.FisherPreconditioner` handles).
    """
    base = next((t for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding) if isinstance(m, t)),
                None)
    if base is not None and not runs_own_forward(m, base):
        return None, (f"{type(m).__name__} does not run {base.__name__}'s own forward (a "
                      "subclass's, or one set on the instance, may transform the weight)")
    if isinstance(m, nn.Linear):
        return "linear", ""
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        if not extended:
            ok = m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)
            return ("conv", "") if ok else (None, "grouped or padded convolution")
        if _explicit_padding(m) is None:
            return None, f"convolution with padding={m.padding!r} and stride {m.stride}"
        return "conv", ""
    if not extended:
        return None, f"{type(m).__name__} is not a Linear/Conv layer"
    if _is_hf_conv1d(m):
        return "conv1d_t", ""
    if isinstance(m, nn.Embedding):
        if m.max_norm is not None:
            return None, "nn.Embedding with max_norm (it rescales the weight in place)"
        if m.scale_grad_by_freq or m.sparse:
            return None, "nn.Embedding with scale_grad_by_freq or sparse gradients"
        return "embedding", ""
    return None, f"{type(m).__name__} has no K-FAC form"


def kfac_coverage(
    model: nn.Module, selected: Mapping[str, nn.Parameter], *, extended: bool = True,
    masked: bool = False,
) -> tuple[dict[str, KFACLayer], dict[str, str]]:
    """Split the selected parameters into K-FAC layers and the rest, with reasons.

    A module of a covered kind (see :func:`layer_kind`) is a K-FAC layer when its
    weight is selected and used by no other module; its bias joins it when selected and
    not shared. Everything else is returned with the reason it is not covered.

    With ``masked=True`` a layer pruned by ``torch.nn.utils.prune`` (weight and/or bias
    ``<a> = <a>_orig ⊙ <a>_mask``, see :func:`mask_reparam`) is covered too: its layer
    parameters are ``weight_orig`` / ``bias_orig`` (as the model names them) and the
    :class:`KFACLayer` carries ``mask_w`` / ``mask_b``. The layer still computes
    ``s = (W_orig ⊙ M) a``, so its ``A`` and ``G`` are defined as for an unpruned layer;
    the per-sample gradient of ``W_orig`` is ``M ⊙ (b ãᵀ)``. Only callers that apply
    the mask (:class:`natgrad.KroneckerFisher`, :func:`kfac_factors`, the
    preconditioner) ask for it. A reparametrization that is not such a mask is never
    covered (its reason says so).

    Args:
        model: the model.
        selected: ``{name: parameter}`` as from :func:`natgrad.select_params`.
        extended: cover transformers' ``Conv1D``, ``nn.Embedding``, grouped convolutions
            and every padding mode too (False: Linear and plain convolutions only).
        masked: cover layers pruned by ``torch.nn.utils.prune`` (see above).

    Returns:
        ``({module name: KFACLayer}, {other parameter name: reason})`` in model order.
    """
    name_of = {id(p): k for k, p in selected.items()}
    users: dict[int, list[str]] = {}
    for mname, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            users.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    layers: dict[str, KFACLayer] = {}
    reasons: dict[str, str] = {}
    # nn.MultiheadAttention uses its out_proj's weight directly, never calling the module,
    # so no hook sees that layer's input: it cannot be a K-FAC layer
    not_called = {id(m.out_proj) for m in model.modules()
                  if isinstance(m, nn.MultiheadAttention)}
    for mname, m in model.named_modules():
        w = getattr(m, "weight", None)
        mask_w = mask_b = False
        if masked and not isinstance(w, nn.Parameter):
            rep = mask_reparam(m, "weight")
            w, mask_w = (rep, True) if isinstance(rep, nn.Parameter) else (w, False)
        if not isinstance(w, nn.Parameter) or id(w) not in name_of:
            continue
        kind, why = layer_kind(m, extended)
        if kind is None:
            continue
        if id(m) in not_called:
            why = "MultiheadAttention applies out_proj's weight without calling the module"
            for p in (w, getattr(m, "bias", None)):
                if isinstance(p, nn.Parameter) and id(p) in name_of:
                    reasons[name_of[id(p)]] = why
            continue
        if len(users[id(w)]) > 1:
            why = f"weight shared by {' and '.join(users[id(w)])} (tied)"
            reasons[name_of[id(w)]] = why
            continue
        bias = getattr(m, "bias", None)
        if masked and bias is not None and not isinstance(bias, nn.Parameter):
            rep = mask_reparam(m, "bias")
            bias, mask_b = (rep, True) if isinstance(rep, nn.Parameter) else (bias, False)
        bias = bias if isinstance(bias, nn.Parameter) else None
        bname = name_of.get(id(bias)) if bias is not None else None
        if bname is not None and len(users[id(bias)]) > 1:
            reasons[bname] = f"bias shared by {' and '.join(users[id(bias)])}"
            bname = None
        groups = m.groups if kind == "conv" else 1
        layers[mname] = KFACLayer(mname, m, name_of[id(w)], bname, kind, groups,
                                  mask_w, mask_b and bname is not None)
    covered = {n for lay in layers.values() for n in (lay.weight, lay.bias) if n}
    owner: dict[int, nn.Module] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            owner.setdefault(id(p), m)
    out: dict[str, str] = {}
    for k, p in selected.items():
        if k in covered:
            continue
        if k in reasons:
            out[k] = reasons[k]
            continue
        m = owner.get(id(p))
        kind, why = layer_kind(m, extended) if m is not None else (None, "a free parameter")
        if kind is not None:
            why = "its layer's weight is not selected"
            reps = [] if m is None else [
                (a, mask_reparam(m, a)) for a in ("weight", "bias") if f"{a}_orig" in m._parameters]
            custom = [r for _, r in reps if isinstance(r, str)]
            if custom:  # reparametrized, but not by a mask: no Kronecker form
                why = (f"{custom[0]}; natgrad.make_permanent(model) or prune.remove first, "
                       "or kind='diag' / 'lowrank'")
            elif reps and not masked:  # a torch.nn.utils.prune mask this use does not apply
                why = (
                    "its layer is pruned by torch.nn.utils.prune (<a> = <a>_orig * <a>_mask), "
                    "whose masked Kronecker form this use does not take; "
                    "natgrad.make_permanent(model) first, or kind='diag' / 'lowrank'"
                )
        out[k] = why
    return layers, out


def kfac_layers(
    model: nn.Module, selected: Mapping[str, nn.Parameter], *, extended: bool = False,
    masked: bool = False,
) -> tuple[dict[str, KFACLayer], list[str]]:
    """Split the selected parameters into K-FAC layers and the rest.

    A supported module (see :func:`layer_kind`; ``extended=False``: ``nn.Linear`` and
    plain ``nn.Conv1d`` / ``nn.Conv2d``) is a K-FAC layer when its weight is selected;
    its bias joins it when selected too. Weights shared by several modules, and every
    other selected parameter, are returned in the rest (names, model order).

    Args:
        model: the model.
        selected: ``{name: parameter}`` as from :func:`natgrad.select_params`.
        extended: also cover Conv1D, Embedding, grouped and padded convolutions.
        masked: also cover layers pruned by ``torch.nn.utils.prune`` (see
            :func:`kfac_coverage`).

    Returns:
        ``({module name: KFACLayer}, [other parameter names])``.

    Example:
        >>> import torch
        >>> from natgrad import select_params
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.LayerNorm(3))
        >>> layers, rest = kfac_layers(model, select_params(model))
        >>> list(layers), rest
        (['0'], ['1.weight', '1.bias'])
    """
    layers, rest = kfac_coverage(model, selected, extended=extended, masked=masked)
    return layers, list(rest)


def _patches(layer: KFACLayer, x: torch.Tensor) -> torch.Tensor:
    """Layer inputs as ``(N, T, groups, d_A)`` in the accumulation dtype (unfolded
    patches for convolutions, a column of ones appended for a covered bias); for an
    Embedding, the token ids ``(N, T)``."""
    if layer.kind == "embedding":
        return x.reshape(x.shape[0], -1)
    if layer.kind in ("linear", "conv1d_t"):
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    else:
        m = cast("nn.Conv1d | nn.Conv2d", layer.module)  # kind "conv"
        pads = _explicit_padding(m)
        assert pads is not None  # layers with inexpressible padding are not selected
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        k: tuple[int, ...]
        d: tuple[int, ...]
        s: tuple[int, ...]
        if any(pads):
            x = F.pad(x, pads, mode=mode)
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(2)
            k, d, s = (1, m.kernel_size[0]), (1, m.dilation[0]), (1, m.stride[0])
        else:
            k, d, s = m.kernel_size, m.dilation, m.stride
        a = F.unfold(x, k, dilation=d, stride=s).transpose(1, 2)
    a = to_acc(a)
    a = a.reshape(a.shape[0], a.shape[1], layer.groups, -1)
    if layer.bias is not None:  # the column of ones (one op: pad with ones)
        a = F.pad(a, (0, 1), value=1.0)
    return a


def _out_grads(layer: KFACLayer, g: torch.Tensor) -> torch.Tensor:
    """Output gradients as ``(N, T, groups, d_G)`` in the accumulation dtype."""
    if layer.kind == "conv":
        g = g.flatten(2).transpose(1, 2)
    else:
        g = g.reshape(g.shape[0], -1, g.shape[-1])
    g = to_acc(g)
    return g.reshape(g.shape[0], g.shape[1], layer.groups, -1)


#: public names of the two layout helpers (used by :mod:`natgrad.curvature.backward`)
patches = _patches
out_grads = _out_grads


def layer_patches(
    layer: KFACLayer, xs: list[torch.Tensor], cache: dict[Any, torch.Tensor] | None = None
) -> torch.Tensor:
    """The patches of every call's input ``xs`` of one layer, concatenated over positions.

    Linear-like layers (``nn.Linear``, ``Conv1D``) that read the very same input tensor
    (same storage, layout and version: e.g. the query, key and value projections of an
    attention block) share one result through ``cache``, so their ``A`` factors can be
    computed once (see :func:`factor_stats`'s ``A`` argument).
    """
    key = None
    if cache is not None and layer.kind in ("linear", "conv1d_t"):
        key = (layer.kind, layer.bias is not None, tuple(
            (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x._version)
            for x in xs))
        if key in cache:
            return cache[key]
    parts = [_patches(layer, x) for x in xs]
    a = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    if key is not None and cache is not None:
        cache[key] = a
    return a


def _cotangents(
    plan: Plan, out: torch.Tensor, target: torch.Tensor | None, draws: torch.Tensor | None
) -> list[tuple[float, torch.Tensor]]:
    """``[(w_j, u_j)]``: the label columns of the plan's label source and their weights."""
    return [(plan.weight, c) for c in plan.all_columns(out.detach(), target, draws).unbind(0)]


@dataclass
class Captured:
    """One batch's K-FAC capture: per layer the inputs and the weighted output gradients.

    ``inputs[name]``: ``(N, T, groups, d_A)`` patches (token ids ``(N, T)`` for an
    Embedding); ``grads[name]``: ``[(w_j, (N, T, groups, d_G))]`` per label column;
    ``unbatched``: layers called without the batch as their first dimension (their
    per-sample statistics cannot be read off); ``outside``: layers whose weight or bias
    the forward also reads outside the layer's own call (checked when ``capture`` is
    asked to; see :class:`OutsideUses`).
    """

    n: int
    inputs: dict[str, torch.Tensor]
    grads: dict[str, list[tuple[float, torch.Tensor]]]
    unbatched: list[str]
    outside: list[str] = field(default_factory=list)


#: Why a layer whose parameters are read outside its own call is left diagonal.
OUTSIDE_REASON = (
    "its weight or bias is also read outside the layer's own call (e.g. "
    "F.linear(x, layer.weight), x @ layer.weight.T, or layer.forward(x) called directly), "
    "a use K-FAC's factors cannot see"
)


class OutsideUses(TorchFunctionMode):
    """Find the K-FAC layers whose parameters the forward reads outside the layer's call.

    K-FAC's factors come from the inputs and output gradients of the layer's own calls
    (module hooks), so the per-sample gradient they describe is ``Σ_t b_t ã_tᵀ`` over
    those calls only. A parameter that also enters the graph elsewhere (a tied head
    written ``F.linear(h, emb.weight)``, ``x @ lin.weight.T``, ``lin.forward(x)``, which
    runs no hooks) has gradient terms the factors miss. This mode records every
    differentiable torch function that reads a watched parameter while none of its
    layer's calls is running; ``active`` is kept by the forward pre-hooks and hooks of
    :meth:`hooks`.
    """

    def __init__(self, layers: Mapping[str, KFACLayer]):
        super().__init__()
        self.watched: dict[int, str] = {}
        for k, lay in layers.items():
            # the module's own parameters (``weight_orig`` / ``bias_orig`` when pruned: the
            # masked product is recomputed inside each call)
            for p in lay.module.parameters(recurse=False):
                self.watched[id(p)] = k
        self.active: dict[str, int] = dict.fromkeys(layers, 0)
        self.outside: set[str] = set()
        self._layers = layers

    def hooks(self) -> list[Any]:
        """Register the pre-hooks and hooks that mark each layer's call as running;
        returns their handles (remove them after the pass)."""
        handles = []
        for k, lay in self._layers.items():
            def enter(m: nn.Module, args: Any, k: str = k) -> None:
                self.active[k] += 1

            def leave(m: nn.Module, args: Any, out: Any, k: str = k) -> None:
                self.active[k] -= 1

            handles.append(lay.module.register_forward_pre_hook(enter, prepend=True))
            handles.append(lay.module.register_forward_hook(leave, always_call=True))
        return handles

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
        except Exception as exc:  # the forward's own error, not this mode's
            mark_user_error(exc)
            raise
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(out)):
            for t in tree_leaves((args, kwargs)):
                k = self.watched.get(id(t)) if isinstance(t, torch.Tensor) else None
                if k is not None and not self.active[k]:
                    self.outside.add(k)
        return out


def capture(
    plan: Plan, batch: Any, layers: Mapping[str, KFACLayer], *, check_outside: bool = False
) -> Captured:
    """One forward pass recording every layer's inputs, one backward per label column
    recording its output gradients (``torch.autograd.grad``; ``.grad`` untouched).

    A module called several times contributes every call's positions. MC draws come
    from ``plan.generator`` (``plan.k`` per sample, weight ``1/k``). With
    ``check_outside``, the forward runs under :class:`OutsideUses` and
    ``Captured.outside`` names the layers whose parameters are read elsewhere too (one
    check per estimate suffices: the forward's structure does not change between
    batches, and the mode costs Python time per operation).
    """
    b, target = plan.parse(batch)
    n = b.size
    inputs: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    outputs: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    unbatched: set[str] = set()

    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]:
        def fn(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                raise ValueError(
                    f"Layer {name!r}'s output does not require grad, so K-FAC cannot capture "
                    "its output gradient; select only parameters with requires_grad=True."
                )
            if args[0].dim() == 0 or args[0].shape[0] != n or output.shape[0] != n:
                unbatched.add(name)
            inputs[name].append(args[0].detach())
            outputs[name].append(output)
            return output.clone()

        return fn

    hooks = [(lay.module, hook(k)) for k, lay in layers.items()]
    if global_forward_hooks():
        warnings.warn(
            "A global forward hook is registered (register_module_forward_hook): it runs "
            "before K-FAC's capture, so if it replaces a layer's output, K-FAC takes the "
            "replaced output's gradient as the layer's. Remove it while estimating, or use "
            "kind='diag' (whose capture path then runs on vmap).",
            UserWarning,
            stacklevel=2,
        )
    uses = OutsideUses(layers) if check_outside else None
    marks = uses.hooks() if uses is not None else []
    try:
        out = hooked_output(plan.model, b, plan.output_fn, plan.where, hooks, uses)
    finally:
        for h in marks:
            h.remove()
    outside = sorted(uses.outside) if uses is not None else []
    target = plan.check_target(out, target, b)
    draws = plan.draw(out, target) if plan.labels == "mc" else None
    names = [k for k in layers if outputs[k] and k not in unbatched and k not in outside]
    flat_outs = [o for k in names for o in outputs[k]]
    pcache: dict[Any, torch.Tensor] = {}
    acts = {k: layer_patches(layers[k], inputs[k], pcache) for k in names}
    grads: dict[str, list[tuple[float, torch.Tensor]]] = {k: [] for k in names}
    cots = _cotangents(plan, out, target, draws) if flat_outs else []
    for j, (w, cot) in enumerate(cots):
        gs = torch.autograd.grad(
            out,
            flat_outs,
            grad_outputs=cot.to(out.dtype),
            retain_graph=j < len(cots) - 1,
            allow_unused=True,
        )
        i = 0
        for k in names:
            parts = [
                _out_grads(layers[k], torch.zeros_like(o) if g is None else g)
                for o, g in zip(outputs[k], gs[i : i + len(outputs[k])], strict=True)
            ]
            i += len(outputs[k])
            grads[k].append((w, torch.cat(parts, 1)))
    return Captured(n, acts, grads, sorted(unbatched), outside)


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``Σ_{n,t} x_ntg x_ntgᵀ`` per group, ``(groups, d, d)``, of ``x`` ``(N, T, groups, d)``
    (one group: one matrix product, cheaper than the batched ``einsum``)."""
    if x.shape[2] == 1:
        x2 = x.reshape(-1, x.shape[3])
        return (x2.mT @ x2).unsqueeze(0)
    return torch.einsum("ntgi,ntgj->gij", x, x)


def factor_stats(
    layer: KFACLayer, a: torch.Tensor, grads: list[tuple[float, torch.Tensor]], n: int,
    diag_A: bool, diag_G: bool, A: torch.Tensor | None = None, approx: KfacApprox = "expand",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch's ``A = (1/(N·T)) Σ ã ãᵀ`` and ``G = (1/N) Σ_{n,t} Σ_j w_j b bᵀ``.

    Shapes ``(groups, d, d)``, or ``(groups, d)`` (the diagonal) for a diagonal side; an
    Embedding's ``A`` is always diagonal: ``A_vv = (1/(N·T)) #{(n, t): id_nt = v}`` (the
    padding index excluded, as its gradient is zero). ``A`` given (of the same patches
    ``a``, e.g. another layer reading the same input) is returned as is.

    ``approx="reduce"`` (K-FAC-reduce, Eschenhagen et al. 2023; not for an Embedding,
    which keeps the above) reduces over the ``T`` positions before the outer products:
    ``A = (1/N) Σ_n ā_n ā_nᵀ`` with ``ā_n = (1/T) Σ_t ã_nt`` and
    ``G = (1/N) Σ_n Σ_j w_j b̄_nj b̄_njᵀ`` with ``b̄_nj = Σ_t b_ntj``: ``N`` instead of
    ``N·T`` outer products. Both are exact for ``T = 1``.
    """
    if approx == "reduce" and layer.kind != "embedding" and a.shape[1] > 1:
        a = a.mean(1, keepdim=True)
        grads = [(w, b.sum(1, keepdim=True)) for w, b in grads]
    T = a.shape[1]
    if A is not None:
        pass
    elif layer.kind == "embedding":
        m = cast(nn.Embedding, layer.module)
        ids = a.reshape(-1)
        if m.padding_idx is not None:
            ids = ids[ids != m.padding_idx]
        counts = torch.bincount(ids, minlength=m.num_embeddings)
        dt = grads[0][1].dtype if grads else to_acc(layer.module_weight.detach()).dtype
        A = (counts.to(dt) / (n * T)).unsqueeze(0)
    elif diag_A:
        A = (a * a).sum((0, 1)) / (n * T)
    else:
        A = _gram(a).div_(n * T)  # a new tensor: divided in place
    G: torch.Tensor | None = None
    for w, b in grads:
        gg = (b * b).sum((0, 1)) if diag_G else _gram(b)
        gg = gg * w if w != 1.0 else gg
        G = gg if G is None else G + gg
    assert G is not None  # capture() records at least one label column
    return A, G.div_(n)  # G: a new tensor (a sum or product made here)


def per_sample_blocks(
    layer: KFACLayer, a: torch.Tensor, b: torch.Tensor,
    QA: torch.Tensor | None = None, QG: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact per-sample gradients ``g_n = Σ_t b_nt ã_ntᵀ`` as block matrices
    ``(N, groups, d_G, d_A)``, rotated to ``Q_Gᵀ g_n Q_A`` when the eigenbases are given
    (``None``: identity)."""
    if QG is not None:
        b = torch.einsum("ntgi,gij->ntgj", b, QG)
    if layer.kind == "embedding":
        m = cast(nn.Embedding, layer.module)
        ids = a
        if m.padding_idx is not None:
            b = b * (ids != m.padding_idx).unsqueeze(-1).unsqueeze(-1).to(b.dtype)
        n, T = ids.shape
        dG = b.shape[-1]
        out = b.new_zeros(n, m.num_embeddings, dG)
        out.scatter_add_(1, ids.unsqueeze(-1).expand(n, T, dG), b[:, :, 0])
        g = out.transpose(1, 2).unsqueeze(1)
        return g if QA is None else g @ QA
    if QA is not None:
        a = torch.einsum("ntgi,gij->ntgj", a, QA)
    return torch.einsum("ntgi,ntgj->ngij", b, a)


def kfac_factors(
    model: nn.Module,
    batch: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    labels: LabelSource = "empirical",
    params: ParamSpec = None,
    generator: torch.Generator | None = None,
    output_fn: OutputFn | None = None,
    layers: Mapping[str, KFACLayer] | None = None,
) -> dict[str, KroneckerFactors]:
    """K-FAC factors ``A``, ``G`` of every supported layer, from one batch.

    See the module docstring for the definitions (``F ≈ G ⊗ A`` row-major, "expand"
    convention for convolutions and sequences). A layer pruned by
    ``torch.nn.utils.prune`` (``W = W_orig ⊙ M``) is covered, its factors those of the
    effective weight (its inputs and output gradients); the Fisher of ``W_orig`` is then
    ``D_M (G ⊗ A) D_M`` with ``D_M = diag(vec M)`` (:class:`natgrad.KroneckerFisher`
    applies the mask).

    Args:
        model: the model (BatchNorm in eval mode); not modified.
        batch: ``(x, y)``, ``x`` or a dict batch.
        likelihood: name or :class:`natgrad.engine.likelihoods.Likelihood`.
        labels: ``"empirical"``, ``"mc"`` (one draw per sample) or ``"exact"``.
        params: parameters to cover (see :func:`natgrad.select_params`).
        generator: for ``"mc"`` draws (default: seeded with 0).
        output_fn: maps model outputs to the output tensor.
        layers: the layers to capture, as from :func:`kfac_layers` (default: computed from
            ``params``; pass them to skip that work when calling repeatedly).

    Returns:
        ``{module name: KroneckerFactors}``; a layer the forward pass never called gets
        zero factors. With ``groups = 1`` the factors are matrices; grouped convolutions
        carry a leading group dimension; an Embedding's ``A`` is its diagonal.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: train-mode BatchNorm or dropout (K-FAC needs a deterministic model:
            call ``model.eval()``), bad labels (checked on the whole batch), a batch
            without labels for ``"empirical"``, a layer output that does not depend on
            the parameters, or a layer called without the batch as its first dimension.
    """
    check_fixed_model(model, "kfac_factors")
    plan = Plan(model, likelihood, labels, 1, params, output_fn, generator, what="kfac_factors",
                checked=True)
    if layers is None:
        layers, _ = kfac_layers(model, plan.params, masked=True)
    cap = capture(plan, batch, layers, check_outside=True)
    if cap.unbatched:
        raise ValueError(
            f"Layers {cap.unbatched} were called without the batch as the first dimension "
            "of their input, so their per-sample K-FAC statistics cannot be read off; "
            "leave them out of `params`."
        )
    if cap.outside:
        raise ValueError(
            f"Layers {cap.outside}: {OUTSIDE_REASON}; leave them out of `params` (their "
            "diagonal Fisher: natgrad.estimate_fisher)."
        )
    result = {}
    for k, lay in layers.items():
        g, dG, dA = lay.dims()
        emb = lay.kind == "embedding"
        if k in cap.inputs:
            A, Gk = factor_stats(lay, cap.inputs[k], cap.grads[k], cap.n, False, False)
            T = cap.inputs[k].shape[1]
        else:
            T = 0
            dt = to_acc(lay.module_weight.detach()).dtype
            dev = lay.module_weight.device
            A = torch.zeros((g, dA) if emb else (g, dA, dA), device=dev, dtype=dt)
            Gk = torch.zeros(g, dG, dG, device=dev, dtype=dt)
        if g == 1:
            A, Gk = A[0], Gk[0]
        result[k] = KroneckerFactors(A, Gk, cap.n, T)
    return result


def weight_blocks(
    shape: tuple[int, ...], transposed: bool, groups: int,
    gw: torch.Tensor, gb: torch.Tensor | None, *, squeeze: bool = False,
) -> torch.Tensor:
    """``[W, b]`` as ``(groups, d_G, d_A)`` block matrices for a weight of ``shape``
    (stored ``(in, out)`` when ``transposed``); ``gb=None`` for no bias column.
    ``squeeze``: one group is returned as ``(d_G, d_A)``, without its group dimension
    (plain matrix products on it cost less dispatch than batched ones)."""
    if squeeze and groups == 1:
        if transposed:
            V = gw.reshape(shape).T
        else:
            V = gw if gw.dim() == 2 else gw.reshape(shape[0], -1)
        col = None if gb is None else gb.reshape(-1, 1)
    else:
        if transposed:  # a transposed weight has one group
            V = gw.reshape(shape).T.unsqueeze(0)
        else:
            V = gw.reshape(groups, shape[0] // groups, -1)
        col = None if gb is None else gb.reshape(groups, -1, 1)
    if col is None:
        return V
    return torch.cat([V, col if col.dtype == V.dtype else col.to(V.dtype)], dim=-1)


def split_weight_blocks(
    shape: tuple[int, ...], transposed: bool, has_bias: bool, V: torch.Tensor,
    *, bias: bool = True, contiguous: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`weight_blocks` (``V`` with its group dimension or, for one
    group, without): ``(weight shaped like shape, bias or None)``, contiguous unless
    ``contiguous=False`` (then views of ``V`` where the shapes allow); ``bias=False``:
    the bias is not built (None)."""
    b = None
    if has_bias and bias:
        b = V[..., -1]
        b = b if b.dim() == 1 else b.reshape(-1)
        if contiguous:
            b = b.contiguous()
    W = V[..., :-1] if has_bias else V
    if transposed:  # a transposed weight has one group
        W = (W[0] if W.dim() == 3 else W).T
    if W.shape != shape:
        W = W.reshape(shape)
    return (W.contiguous() if contiguous and not W.is_contiguous() else W), b


def layer_matrix(
    layer: KFACLayer, grads: Mapping[str, torch.Tensor | None], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The layer's gradient as the matrix ``[∇W, ∇b]`` of shape ``(d_out, d_in[+1])``
    (``(groups, d_out/groups, d_in[+1])`` for a grouped convolution; ``Wᵀ`` for weights
    stored ``(in, out)``).

    Missing (``None``) gradients count as zeros.

    Example:
        >>> import torch
        >>> lay = KFACLayer("", torch.nn.Linear(2, 1), "weight", "bias")
        >>> layer_matrix(lay, {"weight": torch.ones(1, 2), "bias": torch.tensor([3.0])})
        tensor([[1., 1., 3.]])
    """
    w = layer.module_weight
    gw = grads.get(layer.weight)
    gw = torch.zeros_like(w) if gw is None else gw
    gb = None
    if layer.bias is not None:
        gb = grads.get(layer.bias)
        d_out = w.shape[1] if layer.transposed else w.shape[0]
        gb = torch.zeros(d_out, device=w.device, dtype=dtype) if gb is None else gb
    return weight_blocks(tuple(w.shape), layer.transposed, layer.groups, gw.to(dtype), gb,
                         squeeze=True)


def split_layer_matrix(layer: KFACLayer, V: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inverse of :func:`layer_matrix`: ``{weight name: ..., bias name: ...}``.

    Example:
        >>> import torch
        >>> lay = KFACLayer("", torch.nn.Linear(2, 1), "weight", "bias")
        >>> split_layer_matrix(lay, torch.tensor([[1.0, 2.0, 3.0]]))
        {'weight': tensor([[1., 2.]]), 'bias': tensor([3.])}
    """
    shape = tuple(layer.module_weight.shape)
    W, b = split_weight_blocks(shape, layer.transposed, layer.bias is not None, V)
    if b is None or layer.bias is None:  # b is None exactly when the bias is not covered
        return {layer.weight: W}
    return {layer.weight: W, layer.bias: b}


def kfac_eigen(A: torch.Tensor, G: torch.Tensor) -> dict[str, torch.Tensor]:
    """Eigendecompositions ``A = Q_A diag(d_A) Q_Aᵀ``, ``G = Q_G diag(d_G) Q_Gᵀ``.

    Eigenvalues are clamped at zero (the factors are positive semi-definite).

    Returns:
        ``{"QA", "dA", "QG", "dG"}``.

    Example:
        >>> import torch
        >>> kfac_eigen(torch.diag(torch.tensor([2.0, 1.0])), torch.eye(1))["dA"]
        tensor([1., 2.])
    """
    dA, QA = torch.linalg.eigh(A)
    dG, QG = torch.linalg.eigh(G)
    return {"QA": QA, "dA": dA.clamp_min(0), "QG": QG, "dG": dG.clamp_min(0)}





def _pi(ma: float, mg: float) -> float:
    return (ma / mg) ** 0.5 if ma > 0 and mg > 0 else 1.0


def kfac_factored_inverses(
    A: torch.Tensor, G: torch.Tensor, damping: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((G + (√λ/π) I)^-1, (A + π√λ I)^-1)`` for factored Tikhonov damping.

    ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (1 when either trace is 0). Then
    ``Ginv @ V @ Ainv`` equals ``kfac_solve(kfac_eigen(A, G), V, λ, "factored")`` (both
    factors are symmetric), at the cost of two Cholesky factorizations instead of two
    eigendecompositions.

    Example:
        >>> import torch
        >>> Ginv, Ainv = kfac_factored_inverses(torch.eye(2), torch.eye(1), 0.25)
        >>> Ginv, Ainv.diagonal()
        (tensor([[0.6667]]), tensor([0.6667, 0.6667]))
    """
    s = damping**0.5
    pi = _pi(float(A.diagonal().mean()), float(G.diagonal().mean()))

    def inv(M: torch.Tensor, shift: float) -> torch.Tensor:
        Ms = M + shift * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
        L, info = torch.linalg.cholesky_ex(Ms)
        if int(info) == 0:
            return torch.cholesky_inverse(L)
        pinv: torch.Tensor = torch.linalg.pinv(Ms, hermitian=True)
        return pinv

    return inv(G, s / pi), inv(A, s * pi)


def kfac_solve(
    eig: Mapping[str, torch.Tensor], V: torch.Tensor, damping: float, mode: str = "exact"
) -> torch.Tensor:
    """Solve with the damped Kronecker factors; returns a matrix like ``V``.

    With the eigendecompositions of :func:`kfac_eigen` and row-major ``vec``:

    * ``mode="exact"``: ``(G ⊗ A + λI)^-1 vec(V)``, damping added to every eigenvalue
      ``d_G,i d_A,j`` of the Kronecker product: ``Q_G [(Q_Gᵀ V Q_A) / (d_G d_Aᵀ + λ)] Q_Aᵀ``.
    * ``mode="factored"`` (factored Tikhonov damping, Martens & Grosse 2015, §6.3):
      ``((G + (√λ/π) I) ⊗ (A + π√λ I))^-1 vec(V)`` with
      ``π = sqrt((tr A / dim A) / (tr G / dim G))`` (``π = 1`` when either trace is 0), i.e.
      denominators ``(d_G,i + √λ/π)(d_A,j + π√λ)``. It damps low-curvature directions
      more strongly than ``exact``.

    Raises:
        ValueError: unknown ``mode``.

    Example:
        >>> import torch
        >>> eig = kfac_eigen(torch.eye(2) * 2, torch.eye(1) * 3)
        >>> kfac_solve(eig, torch.ones(1, 2), 0.0)
        tensor([[0.1667, 0.1667]])
    """
    check_choice("K-FAC damping mode", mode, KFAC_DAMPING)
    QA, dA, QG, dG = eig["QA"], eig["dA"], eig["QG"], eig["dG"]
    V = V.to(QA.dtype)
    inner = QG.T @ V @ QA
    if mode == "exact":
        denom = dG.unsqueeze(1) * dA.unsqueeze(0) + damping
    else:
        pi = _pi(float(dA.mean()), float(dG.mean()))
        s = damping**0.5
        denom = (dG + s / pi).unsqueeze(1) * (dA + s * pi).unsqueeze(0)
    return QG @ (inner / denom) @ QA.T
