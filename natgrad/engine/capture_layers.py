"""Squared per-sample gradients of one layer from its captured input ``a`` and output
gradients ``B`` (one per label column ``j``, weight ``w``): the formulas of
:mod:`natgrad.engine.capture`. Every function returns ``{role: Σ_j Σ_n w g_nj²}`` in float32 or
float64 (float64 models); ``B`` has shape ``(J, *layer_output.shape)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from natgrad.engine.common import to_acc, vjp_pair
from natgrad.engine.per_sample import CHUNK_FLOATS

PRODUCT_FLOATS = 2**22  # one chunk of per-sample products: about 16 MiB of float32


work = to_acc  # float64 stays float64; bf16, fp16 and fp32 are computed in float32


def seq_products(X: torch.Tensor, Y: torch.Tensor, w: float) -> torch.Tensor:
    """``w Σ_j Σ_n (X_jn Y_n)²`` for ``X (J, N, O, T)``, ``Y (N, T, I)``: shape ``(O, I)``.

    The per-sample products ``X_jn Y_n`` exist one chunk of samples at a time.
    """
    J, N, d_out, T = X.shape
    d_in = Y.shape[-1]
    chunk = max(1, PRODUCT_FLOATS // max(J * d_out * max(d_in, T), 1))
    acc = torch.zeros(J * d_out, d_in, dtype=Y.dtype, device=Y.device)
    for s in range(0, N, chunk):
        Xs = X[:, s : s + chunk].transpose(0, 1).reshape(-1, J * d_out, T)
        G = torch.bmm(Xs, Y[s : s + chunk])  # (chunk, J·O, I): one chunk of per-sample grads
        acc += G.square_().sum(0)
    return acc.view(J, d_out, d_in).sum(0) * w


def linear(a: torch.Tensor, B: torch.Tensor, w: float) -> dict[str, torch.Tensor]:
    """Linear ``z = W a + c`` with ``a (N, ..., I)``, ``B (J, N, ..., O)``."""
    a, B = work(a), work(B)
    if a.dim() == 2:
        b2 = (B * B).sum(0)  # (N, O)
        return {"weight": w * (b2.t() @ (a * a)), "bias": w * b2.sum(0)}
    N = a.shape[0]
    A = a.reshape(N, -1, a.shape[-1])
    Bs = B.reshape(B.shape[0], N, -1, B.shape[-1])
    bb = Bs.sum(2)
    return {"weight": seq_products(Bs.transpose(-1, -2), A, w), "bias": w * (bb * bb).sum((0, 1))}


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
    """Conv: per-sample ``G_n = B_n U_nᵀ`` with ``U_n`` the unfolded patches ``(C·k, L)``."""
    a, B = work(a), work(B)
    U = unfold(m, a)  # (N, K, L)
    J, N, d_out = B.shape[:3]
    Bs = B.reshape(J, N, d_out, -1)  # (J, N, O, L)
    bb = Bs.sum(-1)
    return {"weight": seq_products(Bs, U.transpose(1, 2), w), "bias": w * (bb * bb).sum((0, 1))}


def embedding(
    m: nn.Embedding, ids: torch.Tensor, B: torch.Tensor, w: float
) -> dict[str, torch.Tensor]:
    """Embedding: row ``v`` of ``G_nj`` is ``Σ_{t: ids_nt = v} b_njt``; summed by (n, v)."""
    B = work(B)
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


def layer_norm(
    m: nn.LayerNorm, a: torch.Tensor, B: torch.Tensor, w: float
) -> dict[str, torch.Tensor]:
    """LayerNorm ``z = x̂ ⊙ γ + β``: ``∂l_n/∂γ = Σ_t b_nt ⊙ x̂_nt``, ``∂l_n/∂β = Σ_t b_nt``."""
    xhat = work(F.layer_norm(a, m.normalized_shape, None, None, m.eps))
    B = work(B)
    J, N = B.shape[:2]
    gw = (B * xhat).reshape(J, N, -1, *m.normalized_shape).sum(2)
    gb = B.reshape(J, N, -1, *m.normalized_shape).sum(2)
    return {"weight": w * (gw * gw).sum((0, 1)), "bias": w * (gb * gb).sum((0, 1))}


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


def is_conv1d(m: nn.Module) -> bool:
    """A Hugging Face ``Conv1D`` (GPT-2): ``z = a W + c`` with ``W (I, O)``, the forward of
    its own class (found without importing ``transformers``)."""
    for base in type(m).__mro__:
        if base.__name__ == "Conv1D" and base.__module__ == "transformers.pytorch_utils":
            return type(m).forward is base.forward  # type: ignore[attr-defined]
    return False


def conv1d(a: torch.Tensor, B: torch.Tensor, w: float) -> dict[str, torch.Tensor]:
    """Hugging Face ``Conv1D``: :func:`linear` with the weight transposed to ``(I, O)``."""
    r = linear(a, B, w)
    return {"weight": r["weight"].t(), "bias": r["bias"]}


def linear_grads(a: torch.Tensor, B: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Per-sample weight gradients ``G_jn = Σ_t b_jnt a_ntᵀ`` of a Linear layer for the
    samples ``s:e``: ``(J, e - s, O, I)``."""
    a, B = work(a[s:e]), work(B[:, s:e])
    J, n = B.shape[:2]
    A = a.reshape(n, -1, a.shape[-1])  # (n, T, I)
    Bs = B.reshape(J, n, -1, B.shape[-1])  # (J, n, T, O)
    G = torch.matmul(Bs.transpose(-1, -2), A.unsqueeze(0))  # (J, n, O, I)
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
