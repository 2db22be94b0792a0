"""Physical shrinking of pruned structures, layer-wise mask tuning, and hand counts.

Shrinking replaces every producer by a smaller ``nn.Linear``/``nn.Conv`` holding the
kept output rows (and bias entries), slices the eval-mode BatchNorms in between, and
replaces the consumer by one that holds only the kept input columns. Removing a column
is the same as multiplying that input by 0, so before tuning the shrunken model
computes what the masked model computes.

Mask tuning re-fits each consumer of pruned structures by least squares so that its
output on a calibration set matches the unpruned model's:

    W' = argmin_W ||Y - X̃ Wᵀ||² + ε ||W||²,   Wᵀ = (X̃ᵀX̃ + εI)⁻¹ X̃ᵀ Y,

with ``Y`` the original layer output (bias included), ``X̃`` the layer's input in the
pruned model (kept columns, a column of ones for the bias; for a conv, the unfolded
patches), and ``X̃ᵀX̃`` the input Gram matrix (``N`` times the K-FAC ``A`` factor).
Layers are tuned in forward order, each on the inputs produced by the already tuned
layers before it, so errors do not pile up.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from natgrad.engine.batch import Batch, parse_batch
from natgrad.engine.capture_layers import is_hf_conv1d
from natgrad.engine.checks import check_choice
from natgrad.engine.common import psd_solve
from natgrad.engine.per_sample import hooked_output
from natgrad.pruning.attention import block_indices, shrink_heads
from natgrad.pruning.structures import UNPRUNED_CONVS, Group

if TYPE_CHECKING:
    from natgrad.pruning.attention import HeadAttention

__all__ = [
    "shrink_model",
    "tune_layers",
    "count_flops",
    "count_params",
    "least_squares",
    "design_rows",
]

_CONV = (nn.Conv1d, nn.Conv2d)
#: the layers whose rows / columns are sliced and tuned
Layer = nn.Linear | nn.Conv1d | nn.Conv2d


def _layer(model: nn.Module, name: str) -> Layer:
    """The Linear / Conv module ``name`` of ``model`` (groups only name such layers)."""
    return cast(Layer, model.get_submodule(name))


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def _rebuild(mod: Layer, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Module:
    """A new Linear/Conv holding ``weight[rows][:, cols]`` (None: all)."""
    w = mod.weight.detach()
    b = None if mod.bias is None else mod.bias.detach()
    if rows is not None:
        w, b = w[rows], (None if b is None else b[rows])
    if cols is not None:
        w = w[:, cols]
    kw: dict[str, Any] = dict(device=w.device, dtype=w.dtype)
    new: Layer
    if isinstance(mod, nn.Linear):
        new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, **kw)
    else:
        conv: Callable[..., Layer] = type(mod)  # the same Conv class (torch wants fixed tuples)
        new = conv(
            w.shape[1], w.shape[0], mod.kernel_size, stride=mod.stride, padding=mod.padding,
            dilation=mod.dilation, groups=1, bias=b is not None, padding_mode=mod.padding_mode,
            **kw,
        )
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            assert new.bias is not None  # built with bias=True
            new.bias.copy_(b)
    new.weight.requires_grad_(mod.weight.requires_grad)  # frozen stays frozen
    if new.bias is not None and mod.bias is not None:
        new.bias.requires_grad_(mod.bias.requires_grad)
    new.train(mod.training)
    return new


def _slice_norm(mod: nn.modules.batchnorm._BatchNorm, keep: torch.Tensor) -> nn.Module:
    # the dtype/device of its parameters, or of its running statistics when it has no
    # affine parameters (a float64 BatchNorm(affine=False) stays float64)
    ref = mod.weight if mod.affine else mod.running_mean
    new = type(mod)(
        len(keep), eps=mod.eps, momentum=mod.momentum, affine=mod.affine,
        track_running_stats=mod.track_running_stats,
        device=None if ref is None else ref.device,
        dtype=None if ref is None else ref.dtype,
    )
    with torch.no_grad():
        if mod.affine:
            new.weight.copy_(mod.weight[keep])
            new.bias.copy_(mod.bias[keep])
            new.weight.requires_grad_(mod.weight.requires_grad)
            new.bias.requires_grad_(mod.bias.requires_grad)
        if mod.track_running_stats:
            # a BatchNorm that tracks running statistics holds all three buffers
            assert mod.running_mean is not None and new.running_mean is not None
            assert mod.running_var is not None and new.running_var is not None
            assert mod.num_batches_tracked is not None and new.num_batches_tracked is not None
            new.running_mean.copy_(mod.running_mean[keep])
            new.running_var.copy_(mod.running_var[keep])
            new.num_batches_tracked.copy_(mod.num_batches_tracked)
    new.train(mod.training)
    return new


def kept_indices(group: Group, removed: torch.Tensor) -> torch.Tensor:
    """The kept structure indices of ``group`` (ascending)."""
    keep = torch.ones(group.size, dtype=torch.bool)
    keep[removed.cpu()] = False
    return torch.nonzero(keep).flatten()


def kept_rows(group: Group, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{module: kept output rows}`` of the modules whose rows the structures ``keep``
    of ``group`` own: the producer (or the Hugging Face q/k/v projections, ``row_repeat``
    rows per structure in each of ``row_blocks`` fused blocks), or for the heads of a
    :class:`~natgrad.pruning.attention.HeadAttention` its ``q_proj``/``k_proj``/``v_proj``
    (``head_dim`` rows per head)."""
    if group.consumer_kind == "attention":
        idx = block_indices(keep, group.head_dim)
        return {f"{group.consumer}.{p}": idx for p in ("q_proj", "k_proj", "v_proj")}
    idx = block_indices(keep, group.row_repeat)
    width = group.size * group.row_repeat
    rows = torch.cat([b * width + idx for b in range(group.row_blocks)])
    return {r: rows for r in group.row_modules}


def row_slices(groups: list[Group], removed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module: kept output rows}`` of every module that loses output rows (the q/k/v
    projections of pruned heads included)."""
    out = {}
    for g in groups:
        rem = removed.get(g.name)
        if rem is not None and rem.numel() > 0:
            out.update(kept_rows(g, kept_indices(g, rem)))
    return out


def shrink_model(
    model: nn.Module, groups: list[Group], removed: Mapping[str, torch.Tensor]
) -> nn.Module:
    """Remove the structures ``removed`` from ``model`` physically (in place); return it.

    Args:
        model: the model the groups were found on (modified: pass a copy).
        groups: from :func:`~natgrad.pruning.structures.find_groups`.
        removed: ``{group name: indices removed}``.
    """
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    for g in groups:
        rem = removed.get(g.name, torch.zeros(0, dtype=torch.long))
        if rem.numel() == 0:
            continue
        keep = kept_indices(g, rem)
        if g.consumer_kind == "attention":
            att_mod = cast("HeadAttention", model.get_submodule(g.name))  # consumer_kind says so
            _set_module(model, g.name, shrink_heads(att_mod, keep))
            continue
        dev = _layer(model, g.consumer).weight.device
        rows.update({r: idx.to(dev) for r, idx in kept_rows(g, keep).items()})
        cols[g.consumer] = block_indices(keep, g.repeat).to(dev)
        if g.heads_module:
            att = model.get_submodule(g.heads_module)
            for attr, per_head in g.heads_attrs:
                setattr(att, attr, len(keep) * per_head)
        for n in g.norms:
            norm = cast(nn.modules.batchnorm._BatchNorm, model.get_submodule(n))  # group.norms
            _set_module(model, n, _slice_norm(norm, keep.to(dev)))
    for name in set(rows) | set(cols):
        _set_module(model, name, _rebuild(_layer(model, name), rows.get(name), cols.get(name)))
    return model


# -- hand counts --------------------------------------------------------------------------


def count_params(model: nn.Module) -> int:
    """Number of parameter entries (shared parameters once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def count_flops(model: nn.Module, example: Any) -> float:
    """FLOPs per sample of one forward pass: ``2 ×`` the multiply-accumulates of Linear,
    Hugging Face ``Conv1D`` (``2 · nx · nf`` per position) and Conv layers (1-3 d, per
    output entry ``(in / groups) · Πk``; transposed: per input entry
    ``(out / groups) · Πk``) and of the attention matmuls (``QKᵀ`` and ``AV``); elementwise ops are not counted. Measured by hooks on one sample of ``example``, with every
    ``nn.TransformerEncoder``'s nested-tensor fast path off for the count (it would hand
    the attention hooks nested tensors, which have no sizes, and skip the layers' own
    forwards; ``use_nested_tensor`` is put back after).
    """
    from natgrad.pruning.attention import attention_flops

    b = parse_batch(example).select(0, 1)
    total = [0.0]
    handles = []
    encoders = [(m, m.use_nested_tensor) for m in model.modules()
                if isinstance(m, nn.TransformerEncoder) and hasattr(m, "use_nested_tensor")]
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            handles.append(
                mod.register_forward_hook(
                    lambda m, a, o: total.__setitem__(0, total[0] + 2.0 * m.in_features * o.numel())
                )
            )
        elif is_hf_conv1d(mod):  # o: (..., nf), nx inputs per output entry
            handles.append(
                mod.register_forward_hook(
                    lambda m, a, o: total.__setitem__(0, total[0] + 2.0 * m.nx * o.numel())
                )
            )
        elif isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            # each input entry meets weight[c] ((out / groups) · Πk entries)
            handles.append(
                mod.register_forward_hook(
                    lambda m, a, o: total.__setitem__(
                        0, total[0] + 2.0 * m.weight[0].numel() * a[0].numel()
                    )
                )
            )
        elif isinstance(mod, (*_CONV, *UNPRUNED_CONVS)):
            handles.append(
                mod.register_forward_hook(
                    lambda m, a, o: total.__setitem__(
                        0, total[0] + 2.0 * m.weight[0].numel() * o.numel()
                    )
                )
            )
        else:
            h = attention_flops(mod, total)
            if h is not None:
                handles.append(h)
    try:
        for enc, _ in encoders:
            enc.use_nested_tensor = False
        model(*b.args, **b.kwargs)
    finally:
        for h in handles:
            h.remove()
        for enc, flag in encoders:
            enc.use_nested_tensor = flag
    return total[0]


# -- least-squares layer tuning -----------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the input of interest is captured."""


def least_squares(gram: torch.Tensor, cross: torch.Tensor, damping: float) -> torch.Tensor:
    """``(G + εI)⁻¹ C`` with ``ε = damping · mean(diag G)`` (Cholesky); for a singular
    ``G + εI`` (e.g. ``damping=0`` and a rank-deficient Gram), the minimum-norm solution
    ``(G + εI)⁺ C`` from the symmetric pseudo-inverse: every minimizer gives the same
    fitted outputs (see :func:`natgrad.engine.common.psd_solve`)."""
    eps = damping * float(gram.diagonal().mean().clamp_min(1e-30))
    a = gram + eps * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return psd_solve(a, cross, singular=eps == 0)


def _explicit_padding(mod: nn.Conv1d | nn.Conv2d) -> list[tuple[int, int]]:
    """``(before, after)`` padding of each spatial dim, also for ``padding="same"`` /
    ``"valid"``: ``"same"`` pads ``dilation · (kernel - 1)`` in all, the extra one after
    (as ``torch.nn.functional.conv*d`` does)."""
    if mod.padding == "valid":
        return [(0, 0)] * len(mod.kernel_size)
    if mod.padding == "same":
        out = []
        for k, d in zip(mod.kernel_size, mod.dilation, strict=True):
            total = d * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    pads = cast(tuple[int, ...], mod.padding)
    return [(p, p) for p in pads]


def design_rows(mod: Layer, x: torch.Tensor) -> torch.Tensor:
    """The design matrix of a Linear/Conv: ``layer(x)`` flattened to ``(rows, out)`` equals
    ``design_rows(layer, x) @ [W | b]ᵀ``.

    For a conv the rows are the unfolded input patches (one per sample and output
    position), padded as the conv pads (its ``padding_mode``: zeros, reflect, replicate
    or circular), string paddings ``"same"``/``"valid"`` included; a column of ones is
    appended when the layer has a bias.

    Args:
        mod: the layer.
        x: its input.

    Returns:
        ``(rows, in_cols [+1])``.
    """
    if isinstance(mod, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    else:
        pads = _explicit_padding(mod)
        flat = [p for pair in reversed(pads) for p in pair]  # F.pad: last dim first
        if any(flat):  # as the conv pads: zeros, or reflect / replicate / circular
            mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
            x = F.pad(x, flat, mode=mode)
        k: tuple[int, ...]
        s: tuple[int, ...]
        d: tuple[int, ...]
        if isinstance(mod, nn.Conv1d):
            x2 = x.unsqueeze(-2)
            k, s, d = (1, *mod.kernel_size), (1, *mod.stride), (1, *mod.dilation)
        else:
            x2, k, s, d = x, mod.kernel_size, mod.stride, mod.dilation
        cols = F.unfold(x2, k, dilation=d, padding=0, stride=s)  # (N, C*k, L)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if mod.bias is not None:
        rows = torch.cat([rows, torch.ones_like(rows[:, :1])], 1)
    return rows


def _outputs(mod: Layer, y: torch.Tensor) -> torch.Tensor:
    if isinstance(mod, nn.Linear):
        return y.reshape(-1, y.shape[-1])
    return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])


def _call_order(model: nn.Module, batch: Batch) -> list[str]:
    """Names of the Linear/Conv modules of ``model`` in the order one forward of (one
    sample of) ``batch`` calls them; modules called more than once (shared) are left out."""
    calls: list[str] = []
    hooks = [
        (mod, lambda m, a, o, name=name: calls.append(name))
        for name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, *_CONV))
    ]
    hooked_output(model, batch.select(0, 1), lambda o: o, "the layer walk", hooks, grad=False)
    times = Counter(calls)
    return [n for n in calls if times[n] == 1]


def _capture(model: nn.Module, name: str, b: Batch) -> torch.Tensor:
    """The input of layer ``name`` in one forward of batch ``b`` (the forward stops there)."""
    cap: dict[str, torch.Tensor] = {}

    def pre(m: nn.Module, a: tuple[Any, ...]) -> None:
        cap["t"] = a[0].detach()
        raise _StopForward

    h = model.get_submodule(name).register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            model(*b.args, **b.kwargs)
    except _StopForward:
        pass
    finally:
        h.remove()
    return cap["t"]


def _targets(
    original: nn.Module,
    layers: list[str],
    batches: list[Batch],
    out_rows: Mapping[str, torch.Tensor],
) -> dict[str, list[torch.Tensor]]:
    """``{layer: [target rows of each batch]}``: each layer's output in ``original`` as
    ``(rows, out)`` (float64 for a float64 model, else float32), only the output rows kept
    in the pruned model (``out_rows``) and, for token inputs with an attention mask, only
    the real tokens. One hooked forward per batch collects every layer (``original`` does
    not change while the pruned layers are re-fitted); a layer called twice keeps its
    first output, as the pruned side's capture does."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    for b in batches:
        seen = _batch_targets(original, layers, b, out_rows)
        missing = [n for n in layers if n not in seen]
        if missing:
            raise ValueError(
                f"the calibration batch did not reach layer(s) {missing} of the original "
                "model: pass calibration inputs that run the whole model."
            )
        for n in layers:
            out[n].append(seen[n])
    return out


def _batch_targets(
    original: nn.Module, layers: list[str], b: Batch, out_rows: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The targets of :func:`_targets` for one batch, from one hooked forward."""
    seen: dict[str, torch.Tensor] = {}

    def keep(m: nn.Module, o: torch.Tensor, name: str) -> None:
        if name in seen:
            return
        dt = torch.float64 if o.dtype == torch.float64 else torch.float32
        # a copy: the forward goes on, and an in-place op after the layer (ReLU(inplace=True))
        # would otherwise change the stored target
        y = _outputs(cast(Layer, m), o.detach().to(dt, copy=True))
        if name in out_rows:
            y = y[:, out_rows[name].to(y.device)]
        real = _real_tokens(m, o, b.mask)
        seen[name] = y if real is None else y[real]

    hooks = [(original.get_submodule(n), lambda m, a, o, n=n: keep(m, o, n)) for n in layers]
    hooked_output(original, b, lambda o: o, "the re-fit targets", hooks, grad=False)
    return seen


def _real_tokens(
    mod: nn.Module, x: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor | None:
    """For a Linear reading ``(N, T, in)`` token inputs (or writing ``(N, T, out)``
    outputs: ``x`` is either) of a batch with an ``(N, T)`` attention mask: the rows of
    real (unpadded) tokens; None otherwise."""
    if mask is None or not isinstance(mod, nn.Linear) or x.dim() != 3:
        return None
    if tuple(x.shape[:2]) != tuple(mask.shape):
        return None
    return mask.reshape(-1).to(x.device) != 0


TUNE_SCOPES = ("consumers", "downstream")
TUNE_FITS = ("weights", "masks")


def check_tuning(scope: str, fit: str, prefix: str = "") -> None:
    """Check a re-fit's ``scope`` and ``fit`` (the one check of :func:`tune_layers` and
    :func:`~natgrad.prune_structured`).

    Args:
        scope: ``"consumers"`` or ``"downstream"``.
        fit: ``"weights"`` or ``"masks"``.
        prefix: put before the argument names in the messages (``"tune_"`` for
            ``prune_structured``'s ``tune_scope``/``tune_fit``).

    Raises:
        ValueError: for an unknown scope or fit, or ``fit="masks"`` with
            ``scope="downstream"``.
    """
    check_choice(f"{prefix}scope", scope, TUNE_SCOPES)
    check_choice(f"{prefix}fit", fit, TUNE_FITS)
    if fit == "masks" and scope != "consumers":
        raise ValueError(
            f"{prefix}fit='masks' scales the kept structures of pruned layers only: use it "
            f"with {prefix}scope='consumers' (or {prefix}fit='weights' for "
            f"{prefix}scope='downstream')."
        )


def tune_layers(
    original: nn.Module,
    pruned: nn.Module,
    groups: list[Group],
    removed: Mapping[str, torch.Tensor],
    calibration: Any,
    *,
    damping: float = 1e-3,
    scope: str = "consumers",
    fit: str = "weights",
    exclude: Iterable[str] = (),
) -> list[str]:
    """Re-fit layers of the pruned model by least squares (in place on ``pruned``).

    For each re-fitted layer ``c`` (in the order the forward calls them): ``Y`` = its
    output in ``original`` (the rows kept in ``pruned``), ``X̃`` = its input in
    ``pruned`` (after the layers before it were re-fitted); the new weight and bias solve
    ``(X̃ᵀX̃ + εI) Wᵀ = X̃ᵀ Y``, accumulated over the calibration batches.

    The targets ``Y`` of every re-fitted layer come from one forward of ``original`` per
    calibration batch and are held until the fit ends: memory of about (calibration rows)
    x (the re-fitted layers' kept outputs) floats, on the model's device (for
    ``scope="downstream"`` on a BERT-size encoder, about 3.5k floats per token per
    layer; pass fewer calibration batches if that does not fit).

    Args:
        original: the unpruned model.
        pruned: the shrunken model (modified).
        groups, removed: as given to :func:`shrink_model`.
        calibration: a batch or iterable of batches (inputs only are used). In dict
            batches with a per-sample ``attention_mask`` of shape ``(N, T)``, the padded
            token positions are left out of the fit of every Linear reading ``(N, T, in)``.
        damping: ``ε`` relative to the mean diagonal of the Gram matrix.
        scope: ``"consumers"``: only the layers reading pruned structures (each group's
            consumer; for attention heads, the attention's output projection);
            ``"downstream"``: every Linear/Conv from the first of those consumers on,
            the output layer included (each layer then also absorbs the errors left
            upstream, as in layer-wise reconstruction of the whole network); grouped
            convolutions are left out (they keep their weights).
        fit: ``"weights"``: the layer's whole weight and bias (above); ``"masks"``: one
            scale ``m_s`` per kept structure (Kwon et al. 2022's mask tuning), weight and
            bias otherwise fixed: with ``C_s = X̃_s W_sᵀ`` the structure's share of the
            output, ``m`` solves ``(M + εI) m = r + ε 1`` (a ridge towards 1), ``M_st =
            Σ ⟨C_s, C_t⟩ = Σ_{i∈s, j∈t} (X̃ᵀX̃)_ij (WᵀW)_ij``, ``r_s = Σ ⟨C_s, Y - b⟩``, all
            from the same Gram matrix; ``|kept|`` unknowns instead of ``in · out``, so
            it does not over-fit a small calibration set. Only with
            ``scope="consumers"``.
        exclude: module names never re-fitted (nor any layer inside them).

    Returns:
        the names of the tuned layers, in order.

    Raises:
        ValueError: for an unknown ``scope`` or ``fit``, or ``fit="masks"`` with
            ``scope="downstream"``; a calibration batch whose forward through
            ``original`` does not reach a re-fitted layer (data-dependent control flow).
    """
    from natgrad.curvature.estimate import iterate_batches

    check_tuning(scope, fit)
    batches = [parse_batch(b) for b in iterate_batches(calibration)]
    # {layer reading a pruned group's kept structures: its columns per structure}
    per_structure = dict(
        _consumer_layer(pruned, g) for g in groups
        if removed.get(g.name, torch.zeros(0)).numel() > 0
    )
    consumers = list(per_structure)
    if not consumers:
        return []
    out_rows = row_slices(groups, removed)
    order = _call_order(pruned, batches[0])
    order += [n for n in consumers if n not in order]
    if scope == "consumers":
        layers = sorted(consumers, key=order.index)
    else:
        first = min(order.index(n) for n in consumers)
        names = {n for n, _ in original.named_modules()}
        layers = [n for n in order[first:] if n in names]
    excluded = set(exclude)
    layers = [
        n for n in layers if not any(n == e or n.startswith(e + ".") for e in excluded)
        and getattr(_layer(pruned, n), "groups", 1) == 1  # a grouped conv keeps its weights
    ]
    if not layers:
        return []
    targets = _targets(original, layers, batches, out_rows)
    tuned = []
    for name in layers:
        mod_p = _layer(pruned, name)
        gram: torch.Tensor | None = None
        cross: torch.Tensor | None = None
        for b, y in zip(batches, targets[name], strict=True):
            xin = _capture(pruned, name, b).to(y.dtype)
            x = design_rows(mod_p, xin)
            real = _real_tokens(mod_p, xin, b.mask)
            if real is not None:  # padding positions are left out of the fit
                x = x[real]
            gram = x.T @ x if gram is None else gram + x.T @ x
            cross = x.T @ y if cross is None else cross + x.T @ y
        assert gram is not None and cross is not None  # calibration has a batch (checked)
        if fit == "masks":
            _fit_masks(mod_p, gram, cross, per_structure[name], damping)
            tuned.append(name)
            continue
        sol = least_squares(gram, cross, damping)  # (in [+1], out)
        with torch.no_grad():
            w = sol[: sol.shape[0] - (mod_p.bias is not None)].T
            mod_p.weight.copy_(w.reshape(mod_p.weight.shape).to(mod_p.weight.dtype))
            if mod_p.bias is not None:
                mod_p.bias.copy_(sol[-1].to(mod_p.bias.dtype))
        tuned.append(name)
    return tuned


def _fit_masks(
    mod: Layer, gram: torch.Tensor, cross: torch.Tensor, per: int, damping: float
) -> None:
    """Scale each block of ``per`` input columns of ``mod`` by the least-squares mask
    (see :func:`tune_layers`, ``fit="masks"``); ``gram``/``cross`` as there."""
    has_b = mod.bias is not None
    n_in = gram.shape[0] - has_b
    w = mod.weight.detach().reshape(mod.weight.shape[0], -1).to(gram.dtype)  # (out, in)
    gxx = gram[:n_in, :n_in]
    target = cross[:n_in]  # X̃ᵀY, (in, out)
    if has_b:
        assert mod.bias is not None
        target = target - gram[:n_in, -1:] * mod.bias.detach().to(gram.dtype)[None, :]
    k = n_in // per
    m_full = (gxx * (w.T @ w)).reshape(k, per, k, per).sum((1, 3))
    r = (target * w.T).sum(1).reshape(k, per).sum(1)
    # (M + εI) m = r + ε1 with m = 1 + δ: (M + εI) δ = r - M1, the shared damped solve
    # (its pseudo-inverse fallback covers a singular M, e.g. a structure silent on the calibration set)
    m = 1 + least_squares(m_full, (r - m_full.sum(1))[:, None], damping)[:, 0]
    with torch.no_grad():
        scale = m.repeat_interleave(per).to(mod.weight.dtype)
        flat = mod.weight.reshape(mod.weight.shape[0], -1) * scale[None, :]
        mod.weight.copy_(flat.reshape(mod.weight.shape))


# -- compensated (OBS) removal curves -------------------------------------------------------


def _consumer_layer(model: nn.Module, group: Group) -> tuple[str, int]:
    """The Linear/Conv that reads the group's structures and its columns per structure."""
    if group.consumer_kind == "attention":
        return f"{group.consumer}.out_proj", group.head_dim
    mod = _layer(model, group.consumer)
    per = group.repeat
    if isinstance(mod, _CONV):
        per *= int(torch.tensor(mod.kernel_size).prod())
    return group.consumer, per


def compensated_curves(
    model: nn.Module,
    groups: list[Group],
    data: Any,
    *,
    likelihood: Any = "categorical",
    labels: str = "empirical",
    mc_samples: int = 1,
    seed: int = 0,
    damping: float = 1e-3,
    max_batches: int | None = None,
    output_fn: Any = None,
    max_steps: int = 128,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Removal order and predicted loss increase of each group when the layer reading it
    is re-fitted by least squares (Optimal Brain Surgeon on the K-FAC Fisher).

    For the consumer ``W`` (``out × in``, bias as a last column of ones) with K-FAC factors
    ``A = E[x̃ x̃ᵀ]`` (its input rows; unfolded patches for a conv) and
    ``G = (1/N) Σ_{n,t} g_nt g_ntᵀ`` (``g`` = gradient of the per-sample loss wrt the
    layer's output at position ``t``), removing the input columns ``B`` of a structure with the best change of the
    other columns raises the loss by

        ΔL = ½ tr(G W_B [(A⁻¹)_BB]⁻¹ W_Bᵀ),   W ← W - W_B [(A⁻¹)_BB]⁻¹ (A⁻¹)_B:,

    and ``A⁻¹`` loses ``B`` by a Schur complement. In dict batches with an ``(N, T)``
    ``attention_mask``, the padded tokens are left out of ``A`` (its rows and their
    count) and of ``G`` for a Linear reading ``(N, T, in)`` tokens, as in the re-fit. The compensation is the least-squares
    re-fit that :func:`tune_layers` makes. Structures are removed one at a time (or
    ``⌈S / max_steps⌉`` at a time in large groups), always the cheapest; ``values[k]`` is the
    sum of the increments of the first ``k`` (the chunk's joint ``ΔL`` split in proportion).

    Args:
        model: the unpruned model (not modified).
        groups: from :func:`~natgrad.pruning.structures.find_groups`.
        data: a batch or an iterable of batches.
        likelihood: name or :class:`~natgrad.Likelihood`.
        labels: ``"empirical"`` (the data labels, for ``G``) or ``"mc"`` (``mc_samples``
            draws from the model, averaged).
        mc_samples: draws per sample for ``labels="mc"``.
        seed: seed of the draws.
        damping: ridge on ``A``, relative to its mean diagonal.
        max_batches: batches of ``data`` used.
        output_fn: model output -> logits.
        max_steps: at most this many removal steps per group.

    Returns:
        ``{group name: (order, values)}`` as :func:`~natgrad.pruning.search.nested_order`.
    """
    from natgrad.curvature.estimate import iterate_batches
    from natgrad.engine.batch import default_output_fn
    from natgrad.engine.likelihoods import get_likelihood

    lik = get_likelihood(likelihood)
    fn = output_fn or default_output_fn
    layers = {g.name: _consumer_layer(model, g) for g in groups}
    stats: dict[str, dict[str, Any]] = {
        name: {"A": None, "G": None, "rows": 0} for name, _ in layers.values()
    }
    n_samples = 0
    gen = torch.Generator().manual_seed(seed)
    for batch in iterate_batches(data, max_batches):
        b = parse_batch(batch)
        if b.target is None and labels == "empirical":
            raise ValueError(
                "labels='empirical' needs labels in the data: pass (x, y) batches, or use "
                "labels='mc'."
            )
        leaves: dict[str, torch.Tensor] = {}
        handles = []
        for lname in stats:

            def fwd(
                m: nn.Module,
                a: tuple[Any, ...],
                o: torch.Tensor,
                lname: str = lname,
                leaves: dict[str, torch.Tensor] = leaves,
                mask: torch.Tensor | None = b.mask,
            ) -> torch.Tensor:
                st = stats[lname]
                x = design_rows(cast(Layer, m), a[0].detach().double())
                real = _real_tokens(m, a[0], mask)
                if real is not None:  # padded tokens are left out, as in the re-fit
                    x = x[real]
                st["A"] = x.T @ x if st["A"] is None else st["A"] + x.T @ x
                st["rows"] += x.shape[0]
                # ∂loss/∂z = ∂loss/∂o for a zero z added to the output (frozen models too)
                z = torch.zeros_like(o, requires_grad=True)
                leaves[lname] = z
                return o + z

            # first among the layer's hooks: G at the layer's own output
            handles.append(_layer(model, lname).register_forward_hook(fwd, prepend=True))
        try:
            with torch.enable_grad():
                out = fn(model(*b.args, **b.kwargs))
                if labels == "empirical":
                    assert b.target is not None  # checked above
                    draws = [b.target]
                else:
                    draws = list(lik.sample(out.detach(), gen, mc_samples, b.target))
                names = list(leaves)
                for i, t in enumerate(draws):
                    loss = lik.nll(out, t).sum()
                    grads = torch.autograd.grad(
                        loss, [leaves[k] for k in names], retain_graph=i < len(draws) - 1,
                        allow_unused=True,
                    )
                    for k, gr in zip(names, grads, strict=True):
                        if gr is None:
                            continue
                        lay = _layer(model, k)
                        go = _outputs(lay, gr.double()) / math.sqrt(len(draws))
                        real = _real_tokens(lay, gr, b.mask)
                        if real is not None:
                            go = go[real]
                        st = stats[k]
                        st["G"] = go.T @ go if st["G"] is None else st["G"] + go.T @ go
        finally:
            for h in handles:
                h.remove()
        n_samples += b.size
    curves = {}
    for g in groups:
        lname, per = layers[g.name]
        st = stats[lname]
        if st["A"] is None or st["G"] is None:
            raise ValueError(f"no data reached layer {lname!r} of group {g.name!r}.")
        mod = _layer(model, lname)
        a = st["A"] / st["rows"]
        gm = st["G"] / n_samples
        w = mod.weight.detach().double().reshape(mod.weight.shape[0], -1)
        if mod.bias is not None:
            w = torch.cat([w, mod.bias.detach().double()[:, None]], 1)
        curves[g.name] = _obs_curve(w.cpu(), a.cpu(), gm.cpu(), g.size, per, damping, max_steps)
    return curves


def _obs_curve(
    w: torch.Tensor, a: torch.Tensor, gm: torch.Tensor, size: int, per: int, damping: float,
    max_steps: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """OBS removal along one layer's structures; see :func:`compensated_curves`.

    Kept up to date per step (``B`` the columns removed, ``C = [(A⁻¹)_BB]⁻¹ (A⁻¹)_B:``):
    ``W ← W - W_B C``, ``A⁻¹ ← A⁻¹ - (A⁻¹)_:B C`` restricted to the columns left (the
    Schur complement), and each structure's block ``H_s = W_sᵀ G W_s`` by the same
    rank-``|B|`` update (no ``O(out² · in)`` recompute).
    """
    eps = damping * float(a.diagonal().mean().clamp_min(1e-30))
    n = a.shape[0]
    ainv = torch.linalg.inv(a + eps * torch.eye(n, dtype=a.dtype))
    alive = torch.ones(size, dtype=torch.bool)
    order: list[int] = []
    values = [0.0]
    chunk = max(1, -(-size // max_steps))
    cols = torch.arange(size * per).view(size, per)  # structure s owns columns cols[s]
    pos = torch.arange(n)  # position of each original column in the live arrays (-1: gone)
    ws = w[:, : size * per].reshape(w.shape[0], size, per)
    hblk = torch.einsum("osp,oq,qsr->spr", ws, gm, ws)  # (S, per, per): W_sᵀ G W_s
    while len(order) < size:
        idx = torch.nonzero(alive).flatten()
        c = pos[cols[idx]]  # (m, per) live positions
        if per == 1:
            cost = 0.5 * hblk[idx, 0, 0] / ainv[c[:, 0], c[:, 0]]
        else:
            blocks = ainv[c[:, :, None], c[:, None, :]]  # (m, per, per)
            cost = 0.5 * (hblk[idx] * torch.linalg.inv(blocks).transpose(1, 2)).sum((1, 2))
        pick = torch.argsort(cost, stable=True)[: min(chunk, len(idx))]
        take = idx[pick]
        b = pos[cols[take].flatten()]
        bb = ainv[b][:, b]
        cmat = torch.linalg.solve(bb, ainv[b])  # (|B|, live)
        wb = w[:, b]
        gwb = gm @ wb  # (out, |B|)
        q = wb.T @ gwb  # W_Bᵀ G W_B
        joint = 0.5 * float((q * torch.linalg.inv(bb).T).sum())
        pmat = gwb.T @ w  # W_Bᵀ G W  (|B|, live)
        cs = cmat[:, c].permute(1, 0, 2)  # (m, |B|, per) for the alive structures
        ps = pmat[:, c].permute(1, 0, 2)
        ct_p = cs.transpose(1, 2) @ ps
        hblk[idx] = hblk[idx] - ct_p - ct_p.transpose(1, 2) + cs.transpose(1, 2) @ q @ cs
        w = w - wb @ cmat
        ainv = ainv - ainv[:, b] @ cmat
        live = torch.ones(ainv.shape[0], dtype=torch.bool)
        live[b] = False
        ainv = ainv[live][:, live]
        w = w[:, live]
        gone = torch.zeros(n, dtype=torch.bool)
        gone[cols[take].flatten()] = True
        pos = torch.where(gone, -1, pos - torch.cumsum((~live).long(), 0)[pos.clamp_min(0)])
        single = cost[pick].clamp_min(0)
        total = float(single.sum())
        share = single / total if total > 0 else torch.full_like(single, 1 / len(single))
        for t, sh in zip(take.tolist(), share.tolist(), strict=True):
            order.append(t)
            values.append(values[-1] + max(joint, 0.0) * sh)
        alive[take] = False
    return torch.tensor(order, dtype=torch.long), torch.tensor(values, dtype=torch.float64)
