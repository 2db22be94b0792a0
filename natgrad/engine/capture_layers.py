"""Squared per-sample gradients of one layer from its captured input ``a`` and output
gradients ``B`` (one per label column ``j``, weight ``w``): the formulas of
:mod:`natgrad.engine.capture`. Every function returns ``{role: Σ_j Σ_n w g_nj²}`` in float32 or
float64 (float64 models); ``B`` has shape ``(J, *layer_output.shape)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from natgrad.engine.common import to_acc, vjp_pair
from natgrad.engine.per_sample import CHUNK_FLOATS

PRODUCT_FLOATS = 2**22  # one chunk of per-sample products: about 16 MiB of float32
_CACHE_FLOATS = 2**20  # a chunk of per-sample products near cache size (4 MiB)


def _grouped_faster(rows: int, positions: int, per: int, c_in: int, dims: int) -> bool:
    """Whether one grouped convolution weight-gradient with the samples as groups beats
    unfolded patches and batched products, for per-sample gradients of ``rows = C/g·k``
    columns, ``per`` entries, and ``positions`` output positions. From a sweep of 12
    layer shapes (Conv1d/2d, 1 to 256 channels, 5 to 1024 positions, CPU time at one
    thread, torch 2.13) and the design CNN end to end (where the unfolded copies also
    cost fresh memory): grouped from 128 positions, and below for narrow kernels
    (``rows < 16``: products too small to batch well); otherwise unfolded at few
    positions (the products' inner dimension) or large per-sample gradients. A 2-D
    convolution reading at most 4 channels per group (an image stem) always takes the
    unfolded patches: its samples-as-groups weight gradient takes 2.5-7 ms at 2 threads
    against 1-2 ms unfolded (3 -> 16 channels, 32x32, N=32), and oneDNN's kernel for it
    stalled to ~125 ms in some runs."""
    if dims == 2 and 0 < c_in <= 4:
        return False
    if positions >= 128 or rows < 16:
        return True
    return positions >= 32 and per <= 16384


work = to_acc  # float64 stays float64; bf16, fp16 and fp32 are computed in float32


class _Scratch(threading.local):
    buf: torch.Tensor | None = None


_SCRATCH = _Scratch()


def scratch(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reused flat buffer of ``numel`` elements (this thread's; its contents are
    undefined). Writing per-sample products into one buffer, instead of a fresh
    allocation per chunk, saves the page faults of touching new memory, which cost as
    much as the products themselves on CPU. Freed by :func:`release_scratch`."""
    buf = _SCRATCH.buf
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        _SCRATCH.buf = None  # free the old buffer before allocating the new one
        buf = _SCRATCH.buf = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_scratch() -> None:
    """Free this thread's :func:`scratch` buffer."""
    _SCRATCH.buf = None


def square_sum_into(acc: torch.Tensor | None, B: torch.Tensor) -> torch.Tensor:
    """``acc + Σ_j B_j²`` over the first axis of ``B (J, ...)``; ``acc`` None: a new tensor
    (no zero-filled start), else added to in place and returned."""
    for j in range(B.shape[0]):
        if acc is None:
            acc = B[j].square()
        else:
            acc.addcmul_(B[j], B[j])
    assert acc is not None  # J >= 1: one label column at least
    return acc


def scaled(t: torch.Tensor, w: float) -> torch.Tensor:
    """``w t`` (``t`` itself when ``w == 1``)."""
    return t if w == 1.0 else t * w


def squares_into(
    out: torch.Tensor, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], w: float
) -> torch.Tensor:
    """``out += w Σ_(X, Y) Σ_n (X_n Y_n)²`` for pairs ``X (N, R, T)``, ``Y (N, T, C)`` and a
    contiguous ``out (R, C)``; returns ``out``.

    The per-sample products ``X_n Y_n`` exist one chunk of samples at a time, in a
    :func:`scratch` buffer (strided ``X`` and ``Y`` go to ``bmm`` as they are, no copy);
    each chunk is squared in place and summed over samples by one matrix-vector product.
    """
    R, C = out.shape
    flat = out.view(1, R * C)
    for X, Y in pairs:
        N = X.shape[0]
        chunk = min(N, max(1, PRODUCT_FLOATS // max(R * C, 1)))
        buf = scratch(chunk * R * C, out.dtype, out.device)
        ones = torch.ones(1, chunk, dtype=out.dtype, device=out.device)
        for s in range(0, N, chunk):
            n = min(chunk, N - s)
            G = buf[: n * R * C].view(n, R, C)
            torch.bmm(X[s : s + n], Y[s : s + n], out=G)  # one chunk of per-sample grads
            flat.addmm_(ones[:, :n], G.square_().view(n, R * C), alpha=w)
    return out


def seq_products(X: torch.Tensor, Y: torch.Tensor, w: float) -> torch.Tensor:
    """``w Σ_j Σ_n (X_jn Y_n)²`` for ``X (J, N, O, T)``, ``Y (N, T, I)``: shape ``(O, I)``
    (see :func:`squares_into`)."""
    J, _, d_out, _ = X.shape
    acc = torch.zeros(d_out, Y.shape[-1], dtype=Y.dtype, device=Y.device)
    return squares_into(acc, ((X[j], Y) for j in range(J)), w)


def linear_into(
    acc_w: torch.Tensor | None,
    acc_b: torch.Tensor | None,
    a: torch.Tensor,
    B: torch.Tensor,
    w: float,
    *,
    transposed: bool = False,
) -> None:
    """Add the squares of a Linear layer on sequences ``a (N, ..., I)``, ``B (J, N, ..., O)``
    to the accumulators of its weight ``(O, I)`` (``(I, O)`` with ``transposed``: HF
    Conv1D) and bias ``(O,)`` (either may be None), with no intermediate result of the
    weight's size."""
    a, B = work(a), work(B)
    J, N = B.shape[:2]
    A = a.reshape(N, -1, a.shape[-1])  # (N, T, I)
    Bs = B.reshape(J, N, -1, B.shape[-1])  # (J, N, T, O)
    if acc_w is not None:
        pairs = (
            (A.transpose(1, 2), Bs[j]) if transposed else (Bs[j].transpose(1, 2), A)
            for j in range(J)
        )
        squares_into(acc_w, pairs, w)
    if acc_b is not None:
        bb = Bs.sum(2)
        acc_b += scaled((bb * bb).sum((0, 1)), w).to(acc_b.dtype)


def linear(a: torch.Tensor, B: torch.Tensor, w: float) -> dict[str, torch.Tensor]:
    """Linear ``z = W a + c`` with ``a (N, ..., I)``, ``B (J, N, ..., O)``."""
    a, B = work(a), work(B)
    if a.dim() == 2:
        b2 = (B * B).sum(0)  # (N, O)
        return {"weight": scaled(b2.t() @ (a * a), w), "bias": scaled(b2.sum(0), w)}
    N = a.shape[0]
    A = a.reshape(N, -1, a.shape[-1])
    Bs = B.reshape(B.shape[0], N, -1, B.shape[-1])
    bb = Bs.sum(2)
    bias = scaled((bb * bb).sum((0, 1)), w)
    return {"weight": seq_products(Bs.transpose(-1, -2), A, w), "bias": bias}


def unfold(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """Patches of ``a`` as ``(N, C·k, L)`` in the weight's ``(C, *kernel)`` order (one copy
    of a strided view; faster than ``F.unfold`` on CPU)."""
    nd = a.dim() - 2
    # str padding ('same'/'valid') never reaches here: capture accepts int padding only
    padding = cast(tuple[int, ...], m.padding)
    pad = [p for q in reversed(padding) for p in (q, q)]
    x = F.pad(a, pad) if any(pad) else a
    out = [
        (x.shape[2 + i] - m.dilation[i] * (m.kernel_size[i] - 1) - 1) // m.stride[i] + 1
        for i in range(nd)
    ]
    st = x.stride()
    view = x.as_strided(
        (*x.shape[:2], *m.kernel_size, *out),
        (st[0], st[1], *(st[2 + i] * m.dilation[i] for i in range(nd)),
         *(st[2 + i] * m.stride[i] for i in range(nd))),
    )  # fmt: skip
    return view.reshape(x.shape[0], -1, _prod(out))


def _prod(xs: Iterable[int]) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


def conv(
    m: nn.Conv1d | nn.Conv2d, a: torch.Tensor, B: torch.Tensor, w: float
) -> dict[str, torch.Tensor]:
    """Conv with ``g`` groups: per-sample ``G_n = B_n U_nᵀ`` per group, ``U_n`` the
    unfolded patches ``(C/g·k, L)`` of the group's input channels, ``B_n (O/g, L)``."""
    a, B = work(a), work(B)
    J, N, d_out = B.shape[:3]
    res = {"weight": conv_weight_squares(m, a, B, w)}
    if m.bias is not None:
        bb = B.reshape(J, N, d_out, -1).sum(-1)
        res["bias"] = w * (bb * bb).sum((0, 1))
    return res


def add_square_sum(acc: torch.Tensor, G: torch.Tensor) -> None:
    """``acc += Σ_n G_n²`` for ``G (n, P)``, a temporary that is overwritten: one fused
    multiply-add per row for one or two rows, else squared in place and summed."""
    if G.shape[0] <= 2:
        for row in G:
            acc.addcmul_(row, row)
    else:
        acc += G.square_().sum(0)


def conv_weight_squares(
    m: nn.Conv1d | nn.Conv2d, a: torch.Tensor, B: torch.Tensor, w: float
) -> torch.Tensor:
    """``w Σ_j Σ_n G_nj²`` for a conv weight, shape ``(O, C/g, *k)``.

    One label column, where :func:`_grouped_faster` says so: the per-sample gradients of
    a chunk of samples are one grouped convolution weight-gradient, the samples stacked
    as groups (no unfolded copy of the input). Otherwise unfolded patches and batched
    products ``B_nj U_nᵀ`` (all columns at once), squared and summed in chunks small
    enough to stay in cache.
    """
    J, N, d_out = B.shape[:3]
    g = m.groups
    c_in = a.shape[1] // g
    kk = _prod(m.kernel_size)
    positions = _prod(B.shape[3:])
    if J == 1 and _grouped_faster(c_in * kk, positions, d_out * c_in * kk, c_in,
                                  len(m.kernel_size)):
        per = d_out * c_in * kk
        acc = torch.zeros(per, dtype=a.dtype, device=a.device)
        chunk = max(1, PRODUCT_FLOATS // per)
        for s in range(0, N, chunk):
            gw = _samples_as_groups(m, a[s : s + chunk], B[0, s : s + chunk]).reshape(-1, per)
            add_square_sum(acc, gw)
        return (acc * w).view(d_out, c_in, *m.kernel_size)
    K, og = c_in * kk, d_out // g
    U = unfold(m, a).view(N, g, K, positions)
    Bs = B.reshape(J, N, g, og, positions)
    per = g * J * og * K
    acc = torch.zeros(per, dtype=a.dtype, device=a.device)
    chunk = min(N, max(1, _CACHE_FLOATS // per))
    buf = scratch(chunk * per, a.dtype, a.device)  # reused: no fresh memory per chunk
    for s in range(0, N, chunk):
        n = min(N, s + chunk) - s
        X = Bs[:, s : s + n].permute(1, 2, 0, 3, 4).reshape(n * g, J * og, positions)
        Y = U[s : s + n].reshape(n * g, K, positions).transpose(1, 2)
        G = buf[: n * per].view(n * g, J * og, K)  # one chunk of per-sample grads
        torch.bmm(X, Y, out=G)
        add_square_sum(acc, G.view(n, per))  # (n, g, J, O/g, K)
    return (acc.view(g, J, og, K).sum(1) * w).view(d_out, c_in, *m.kernel_size)


def embedding_rows(
    m: nn.Embedding, ids: torch.Tensor, B: torch.Tensor, w: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embedding: row ``v`` of ``G_nj`` is ``Σ_{t: ids_nt = v} b_njt``, summed by (n, v).
    Returns ``(rows, values)`` such that ``Σ_j Σ_n w G_nj² = zeros.index_add(0, rows,
    values)``: only rows that occur in the batch (no pass over the whole table)."""
    B = work(B)
    V, D = m.num_embeddings, m.embedding_dim
    N = ids.shape[0]
    flat = ids.reshape(N, -1)
    keys = (torch.arange(N, device=ids.device).unsqueeze(1) * V + flat).reshape(-1)
    keep = None if m.padding_idx is None else flat.reshape(-1) != m.padding_idx
    if keep is not None:
        keys = keys[keep]
    uniq, inv = torch.unique(keys, return_inverse=True)
    rows, vals = [], []
    for j in range(B.shape[0]):
        bj = B[j].reshape(-1, D)
        if keep is not None:
            bj = bj[keep]
        S = torch.zeros(len(uniq), D, dtype=B.dtype, device=B.device).index_add_(0, inv, bj)
        rows.append(uniq % V)
        vals.append(scaled(S.square_(), w))
    return torch.cat(rows), torch.cat(vals)


def embedding(
    m: nn.Embedding, ids: torch.Tensor, B: torch.Tensor, w: float
) -> dict[str, torch.Tensor]:
    """Embedding: :func:`embedding_rows` added into a ``(V, D)`` table."""
    rows, vals = embedding_rows(m, ids, B, w)
    acc = torch.zeros(m.num_embeddings, m.embedding_dim, dtype=vals.dtype, device=vals.device)
    return {"weight": acc.index_add_(0, rows, vals)}


def layer_norm(
    m: nn.LayerNorm, a: torch.Tensor, B: torch.Tensor, w: float
) -> dict[str, torch.Tensor]:
    """LayerNorm ``z = x̂ ⊙ γ + β``: ``∂l_n/∂γ = Σ_t b_nt ⊙ x̂_nt``, ``∂l_n/∂β = Σ_t b_nt``."""
    xhat = work(F.layer_norm(a, m.normalized_shape, None, None, m.eps))
    B = work(B)
    J, N = B.shape[:2]
    gw = (B * xhat).reshape(J, N, -1, *m.normalized_shape).sum(2)
    gb = B.reshape(J, N, -1, *m.normalized_shape).sum(2)
    return {"weight": scaled((gw * gw).sum((0, 1)), w), "bias": scaled((gb * gb).sum((0, 1)), w)}


def batch_norm(
    m: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d,
    a: torch.Tensor,
    B: torch.Tensor,
    w: float,
) -> dict[str, torch.Tensor]:
    """Eval-mode BatchNorm ``z = x̂ ⊙ γ + β`` with ``x̂ = (x - μ) / √(σ² + ε)`` from the
    running statistics: ``∂l_n/∂γ_c = Σ_t b_nct x̂_nct``, ``∂l_n/∂β_c = Σ_t b_nct``."""
    gw, gb = batch_norm_grads(m, a, B)
    return {"weight": w * (gw * gw).sum((0, 1)), "bias": w * (gb * gb).sum((0, 1))}


def batch_norm_grads(
    m: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d, a: torch.Tensor, B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(∂l_nj/∂γ, ∂l_nj/∂β)`` of an eval-mode BatchNorm, each ``(J, N, C)``."""
    a, B = work(a), work(B)
    assert m.running_mean is not None and m.running_var is not None  # capture: eval only
    J, N, C = B.shape[:3]
    scale = torch.rsqrt(work(m.running_var) + m.eps)
    xc = a.reshape(N, C, -1) - work(m.running_mean).view(1, C, 1)  # x - μ, centred once
    Bs = B.reshape(J, N, C, -1)
    gb = Bs.sum(-1)
    gw = (Bs * xc).sum(-1) * scale  # Σ_t b (x - μ), then the scale
    return gw, gb


def attention(
    parts: dict[str, Any], Bs: dict[str, torch.Tensor | None], w: float
) -> dict[str, torch.Tensor]:
    """``nn.MultiheadAttention``'s packed input and output projections (sequence-first
    captures ``(L, N, E)``, moved to batch-first)."""
    res = {}
    for part, prefix in (("in", "in_proj_"), ("out", "out_proj.")):
        a, B = parts[part][0], Bs[part]
        if B is None:
            continue
        r = linear(a.transpose(0, 1), B.transpose(1, 2), w)
        res[prefix + "weight"], res[prefix + "bias"] = r["weight"], r["bias"]
    return res


def _broadcast_sum(B: torch.Tensor, d_shape: torch.Size) -> torch.Tensor:
    """``B (J, N, *S)``, the gradient of a sum ``D + X`` with ``D`` broadcast to ``S``, as
    per-sample gradients of ``D``: summed over the broadcast axes, ``(J·N, *d_shape)``."""
    J, N = B.shape[:2]
    g = B.reshape(J * N, *B.shape[2:])
    lead = g.dim() - 1 - len(d_shape)
    if lead > 0:
        g = g.sum(tuple(range(1, 1 + lead)))
    elif lead < 0:  # D has leading axes of size 1 (the batch axis of a shared input)
        g = g.reshape(g.shape[0], *[1] * -lead, *g.shape[1:])
    axes = [1 + i for i, s in enumerate(d_shape) if s == 1 and g.shape[1 + i] != 1]
    if axes:
        g = g.sum(axes, keepdim=True)
    return g


def _pullbacks(
    chain: Callable[[torch.Tensor], torch.Tensor], p: torch.Tensor, g: torch.Tensor
) -> Iterable[torch.Tensor]:
    """Chunks of ``g (M, *chain(p).shape)`` pulled back through ``chain``: ``(m, *p.shape)``."""
    _, pull = vjp_pair(chain, work(p.detach()))
    chunk = max(1, CHUNK_FLOATS // max(p.numel(), 1))
    for s in range(0, g.shape[0], chunk):
        (gp,) = vmap(pull)(g[s : s + chunk])
        yield gp


def free(
    chain: Callable[[torch.Tensor], torch.Tensor],
    p: torch.Tensor,
    d_shape: torch.Size,
    B: torch.Tensor,
    w: float,
) -> torch.Tensor:
    """A parameter added to a batched tensor through views ``D = chain(p)``: per-sample
    ``∂l_n/∂D`` is ``b_n`` summed over the broadcast axes, pulled back through ``chain``."""
    g = _broadcast_sum(work(B), d_shape)
    acc = torch.zeros(p.shape, dtype=g.dtype, device=g.device)
    for gp in _pullbacks(chain, p, g):
        acc += (gp * gp).sum(0)
    return w * acc


def shared_output_grads(
    chain: Callable[[torch.Tensor], torch.Tensor],
    out: torch.Tensor,
    d_shape: torch.Size,
    B: torch.Tensor,
) -> torch.Tensor:
    """Per-sample gradients of a module output ``out`` with batch axis 1 (its input is
    shared by all samples) that is added, through views ``D = chain(out)``, to a batched
    tensor: ``B (J, N, ...)`` summed over the broadcast axes and pulled back through
    ``chain``. Returns ``(J, N, *out.shape[1:])``, as if the module had run per sample."""
    B = work(B)
    J, N = B.shape[:2]
    g = _broadcast_sum(B, d_shape)
    if tuple(d_shape) != tuple(out.shape) or chain(out) is not out:
        g = torch.cat(list(_pullbacks(chain, out, g)))
    return g.reshape(J, N, *out.shape[1:])


def _hf_conv1d_base(m: nn.Module) -> type | None:
    """The Hugging Face ``Conv1D`` class among ``m``'s bases (without importing
    ``transformers``), or None."""
    return next((b for b in type(m).__mro__ if b.__name__ == "Conv1D"
                 and b.__module__ == "transformers.pytorch_utils"), None)


def is_hf_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is a Hugging Face ``Conv1D`` (GPT-2's transposed Linear, ``W (nx, nf)``),
    whatever its forward (what counting its FLOPs needs)."""
    return _hf_conv1d_base(m) is not None


def is_conv1d(m: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (GPT-2): ``z = a W + c`` with ``W (I, O)``, the forward of
    its own class (what computing with its formula needs)."""
    base = _hf_conv1d_base(m)
    return base is not None and runs_own_forward(m, base)


def _placing_hook(hook: Any) -> bool:
    """An accelerate hook that only moves tensors between devices (values unchanged)."""
    t = type(hook)
    if t.__module__ != "accelerate.hooks":
        return False
    if t.__name__ == "SequentialHook":
        return all(_placing_hook(h) for h in getattr(hook, "hooks", ()))
    return t.__name__ in ("AlignDevicesHook", "CpuOffload")


def runs_own_forward(m: nn.Module, base: type) -> bool:
    """Whether ``m`` computes ``base``'s own forward: its class keeps ``base.forward`` (a
    convolution also ``base._conv_forward``) and no ``forward`` (nor ``_conv_forward``) is
    set on the instance.

    A subclass or a patched instance may transform the weight before using it (weight
    standardization, a scaled layer, an adapter's patch), which a formula for ``base``'s
    layer would not see: such a module is left to the general engine (or, for K-FAC, to
    the diagonal part). An instance forward that wraps the class's own one with a
    Hugging Face accelerate hook that only places tensors (``device_map`` dispatch and
    offload: ``AlignDevicesHook``, ``CpuOffload``, or a ``SequentialHook`` of them;
    ``_old_forward`` the bound ``base.forward``) counts as own; any other hook may change
    the inputs, weights or output (a casting or user ``ModelHook``)."""
    if "_conv_forward" in m.__dict__:  # an instance patch of what Conv*.forward calls
        return False
    if "forward" in m.__dict__:
        old = getattr(m, "_old_forward", None)
        if (not _placing_hook(getattr(m, "_hf_hook", None))
                or getattr(old, "__func__", None) is not base.forward):  # type: ignore[attr-defined]
            return False
    if type(m).forward is not base.forward:  # type: ignore[attr-defined]
        return False
    conv = getattr(base, "_conv_forward", None)
    return conv is None or getattr(type(m), "_conv_forward", None) is conv


def conv1d(a: torch.Tensor, B: torch.Tensor, w: float) -> dict[str, torch.Tensor]:
    """Hugging Face ``Conv1D``: :func:`linear` with the weight transposed to ``(I, O)``."""
    r = linear(a, B, w)
    return {"weight": r["weight"].t(), "bias": r["bias"]}


def linear_grads_into(
    G: torch.Tensor,
    a: torch.Tensor,
    B: torch.Tensor,
    s: int,
    e: int,
    *,
    transposed: bool = False,
    first: bool = True,
) -> torch.Tensor:
    """Per-sample weight gradients ``G_jn = Σ_t b_jnt a_ntᵀ`` of a Linear layer for the
    samples ``s:e``, written into (``first``) or added to ``G (J, e - s, O, I)``; with
    ``transposed`` (HF Conv1D), ``G_jnᵀ`` into ``G (J, e - s, I, O)``."""
    a, B = work(a[s:e]), work(B[:, s:e])
    J, n = B.shape[:2]
    A = a.reshape(n, -1, a.shape[-1])  # (n, T, I)
    for j in range(J):
        Bj = B[j].reshape(n, -1, B.shape[-1])  # (n, T, O)
        X, Y = (A.transpose(1, 2), Bj) if transposed else (Bj.transpose(1, 2), A)
        if first:
            torch.bmm(X, Y, out=G[j])
        else:
            G[j].baddbmm_(X, Y)
    return G


def embedding_grads_into(
    G: torch.Tensor, m: nn.Embedding, ids: torch.Tensor, B: torch.Tensor, s: int, e: int
) -> torch.Tensor:
    """Add the per-sample weight gradients of an Embedding (rows ``v``:
    ``Σ_{t: ids_nt = v} b_nt``) for the samples ``s:e`` into ``G (J, e - s, V, D)``."""
    B = work(B[:, s:e])
    J, n = B.shape[:2]
    V, D = m.num_embeddings, m.embedding_dim
    flat = ids[s:e].reshape(n, -1)
    rows = (torch.arange(J * n, device=ids.device).view(J, n, 1) * V + flat.unsqueeze(0))
    vals = B.reshape(J, n, -1, D)
    if m.padding_idx is not None:
        vals = vals * (flat != m.padding_idx).unsqueeze(-1).to(vals.dtype)
    G.view(J * n * V, D).index_add_(0, rows.reshape(-1), vals.reshape(-1, D))
    return G


# -- per-sample gradients (not squared): natgrad.per_sample_grads on the capture path ------
#
# Each returns ``{role: g}`` with ``g`` of shape ``(N, J, *param.shape)`` in the working
# dtype (float64 stays float64, else float32), from the captured input ``a`` and the
# output gradients ``B (J, *layer_output.shape)``.


def linear_grads(a: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """Linear: ``g_nj = Σ_t b_njt a_ntᵀ`` (one position for 2-D inputs), bias ``Σ_t b_njt``."""
    a, B = work(a), work(B)
    J, N = B.shape[:2]
    A = a.reshape(N, -1, a.shape[-1])  # (N, T, I)
    Bs = B.reshape(J, N, -1, B.shape[-1])  # (J, N, T, O)
    if A.shape[1] == 1:  # one outer product per sample and column, written once
        weight = Bs[:, :, 0].transpose(0, 1).unsqueeze(-1) * A[:, 0].view(N, 1, 1, -1)
    else:
        weight = torch.einsum("jnto,nti->njoi", Bs, A)
    return {"weight": weight, "bias": Bs.sum(2).transpose(0, 1)}


def conv_grads(m: nn.Conv1d | nn.Conv2d, a: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """Conv with ``g`` groups: ``g_nj`` per group is ``B_nj U_nᵀ`` (see :func:`conv`),
    computed as one grouped convolution weight-gradient per label column (the samples
    stacked as groups, where :func:`_grouped_faster` says so), or from unfolded patches."""
    a, B = work(a), work(B)
    J, N, d_out = B.shape[:3]
    g = m.groups
    c_in = a.shape[1] // g
    kk = _prod(m.kernel_size)
    shape = (d_out, c_in, *m.kernel_size)
    if _grouped_faster(c_in * kk, _prod(B.shape[3:]), d_out * c_in * kk, c_in,
                       len(m.kernel_size)):
        weight = torch.stack([_samples_as_groups(m, a, B[j]) for j in range(J)], 1)
    else:
        U = unfold(m, a).view(N, g, c_in * kk, -1)  # (N, g, C/g·k, L)
        Bs = B.reshape(J, N, g, d_out // g, -1)  # (J, N, g, O/g, L)
        weight = torch.einsum("jngol,ngkl->njgok", Bs, U)
    res = {"weight": weight.reshape(N, J, *shape)}
    if m.bias is not None:
        res["bias"] = B.reshape(J, N, d_out, -1).sum(-1).transpose(0, 1)
    return res


def _samples_as_groups(m: nn.Conv1d | nn.Conv2d, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample weight gradients ``(n, O, C/g, *k)`` of a conv with input ``x (n, C, ...)``
    and output gradient ``b (n, O, ...)``: one weight-gradient of a convolution with
    ``n·g`` groups over the samples laid side by side as channels."""
    n, c, d_out = x.shape[0], x.shape[1], b.shape[1]
    gw: torch.Tensor
    _, gw, _ = torch.ops.aten.convolution_backward(
        b.reshape(1, n * d_out, *b.shape[2:]),
        x.reshape(1, n * c, *x.shape[2:]),
        x.new_empty((n * d_out, c // m.groups, *m.kernel_size)),
        None, m.stride, m.padding, m.dilation, False, [0] * len(m.kernel_size),
        n * m.groups, [False, True, False],
    )  # fmt: skip
    return gw.view(n, d_out, c // m.groups, *m.kernel_size)


def batch_norm_per_sample(
    m: nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d, a: torch.Tensor, B: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Eval-mode BatchNorm (see :func:`batch_norm_grads`), ``(N, J, C)`` each."""
    gw, gb = batch_norm_grads(m, a, B)
    return {"weight": gw.transpose(0, 1), "bias": gb.transpose(0, 1)}


def layer_norm_grads(m: nn.LayerNorm, a: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """LayerNorm: ``g_nj(γ) = Σ_t b_njt ⊙ x̂_nt``, ``g_nj(β) = Σ_t b_njt``."""
    xhat = work(F.layer_norm(a, m.normalized_shape, None, None, m.eps))
    B = work(B)
    J, N = B.shape[:2]
    gw = (B * xhat).reshape(J, N, -1, *m.normalized_shape).sum(2)
    gb = B.reshape(J, N, -1, *m.normalized_shape).sum(2)
    return {"weight": gw.transpose(0, 1), "bias": gb.transpose(0, 1)}


def embedding_grads(m: nn.Embedding, ids: torch.Tensor, B: torch.Tensor) -> dict[str, torch.Tensor]:
    """Embedding: row ``v`` of ``g_nj`` is ``Σ_{t: ids_nt = v} b_njt`` (the padding row: 0)."""
    B = work(B)
    J, N = B.shape[:2]
    V, D = m.num_embeddings, m.embedding_dim
    flat = ids.reshape(N, -1)
    rows = (torch.arange(N, device=ids.device).unsqueeze(1) * V + flat).reshape(-1)
    vals = B.reshape(J, -1, D)
    if m.padding_idx is not None:
        keep = flat.reshape(-1) != m.padding_idx
        rows, vals = rows[keep], vals[:, keep]
    out = torch.zeros(J, N * V, D, dtype=B.dtype, device=B.device)
    for j in range(J):
        out[j].index_add_(0, rows, vals[j])
    return {"weight": out.view(J, N, V, D).transpose(0, 1)}
