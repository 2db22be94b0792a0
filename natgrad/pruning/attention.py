"""Attention with a removable set of heads: the replacement for ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` requires ``num_heads · head_dim == embed_dim``, so it cannot
hold fewer heads of the same width while keeping ``embed_dim``. :class:`HeadAttention`
computes the same function with separate q/k/v projections of ``H · head_dim`` rows
(``H`` kept heads) and an output projection of ``H · head_dim`` columns back to
``embed_dim``:

    head_h = softmax(q_h k_hᵀ / √d + mask) v_h,    out = [m_1 head_1, …, m_H head_H] W_oᵀ + b_o

where ``m_h`` is the head's mask variable (1 unless a mask is attached for the Fisher).
It accepts ``nn.MultiheadAttention``'s call signature (``query, key, value,
key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal``) and
returns ``(output, weights)`` as it does: with ``need_weights=True`` (the default) the
attention weights ``softmax(q_h k_hᵀ / √d + mask)``, ``(N, Tq, Tk)`` averaged over the
heads (``average_attn_weights=True``) or ``(N, H, Tq, Tk)``; else None. It sets
``in_proj_bias = None`` so that ``nn.TransformerEncoderLayer`` takes its ordinary
(non-fused) path, which calls this module.

Inference fast path: for self-attention (``query is key is value``) without autograd,
without hooks on the projections and outside tracing, the three projections run as
one matrix product with the concatenated ``[W_q; W_k; W_v]`` (concatenated at each call)
and the output projection is called without the module
machinery: three fewer kernel launches and Python module calls per layer, the same
numbers up to float rounding.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from natgrad.engine.capture_layers import is_hf_conv1d

__all__ = [
    "HeadAttention", "from_multihead", "to_multihead", "shrink_heads", "attention_flops",
    "block_indices",
]


class HeadAttention(nn.Module):
    """Multi-head attention whose heads can be removed (see the module docstring).

    Args:
        embed_dim: model width ``E`` (input and output).
        num_heads: number ``H`` of heads kept.
        head_dim: width ``d`` of one head.
        batch_first: inputs are ``(N, T, E)`` (else ``(T, N, E)``).
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        head_dim: int,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        inner = num_heads * head_dim
        kw: dict[str, Any] = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.batch_first = batch_first
        self.q_proj = nn.Linear(embed_dim, inner, **kw)
        self.k_proj = nn.Linear(embed_dim, inner, **kw)
        self.v_proj = nn.Linear(embed_dim, inner, **kw)
        self.out_proj = nn.Linear(inner, embed_dim, **kw)
        # nn.TransformerEncoderLayer reads these to decide on its fused path; None turns it off.
        self._qkv_same_embed_dim = False
        self.in_proj_bias = None
        self.in_proj_weight = None
        self._natgrad_head_mask: torch.Tensor | None = None

    def _fast_path_ok(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Self-attention at inference, nothing watching the projections (see the module
        docstring)."""
        if not (query is key and key is value) or self._natgrad_head_mask is not None:
            return False
        if torch.is_grad_enabled() and (query.requires_grad or any(
            p.requires_grad for p in self.parameters()
        )):
            return False
        if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
            return False
        from torch.nn.modules import module as _m

        if _m._global_forward_hooks or _m._global_forward_pre_hooks:
            return False
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if lin._forward_hooks or lin._forward_pre_hooks or lin.bias is None:
                return False
        return True

    def _qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The concatenated q/k/v weight and bias, built at each call (a cache keyed on the
        parameters' versions would miss writes through ``.data``)."""
        return (torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]),
                torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(output, weights)`` as ``nn.MultiheadAttention`` returns them (weights None
        unless ``need_weights``); masks follow it too (bool: True = ignore)."""
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, tq, _ = query.shape
        tk = key.shape[1]
        h, d = self.num_heads, self.head_dim
        fast = self._fast_path_ok(query, key, value)
        if fast:
            w, b = self._qkv()
            q, k, v = F.linear(query, w, b).view(n, tq, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(query).view(n, tq, h, d).transpose(1, 2)
            k = self.k_proj(key).view(n, tk, h, d).transpose(1, 2)
            v = self.v_proj(value).view(n, tk, h, d).transpose(1, 2)
        bias = None
        if attn_mask is not None:
            am = attn_mask
            if am.dtype == torch.bool:
                am = torch.zeros(am.shape, dtype=q.dtype, device=q.device).masked_fill(am, float("-inf"))
            bias = am.to(q.dtype).view(-1, am.shape[-2], am.shape[-1]) if am.dim() == 3 else am.to(q.dtype)
            if bias.dim() == 3:
                bias = bias.view(n, h, tq, tk)
        if key_padding_mask is not None:
            kp = key_padding_mask
            if kp.dtype == torch.bool:
                kp = torch.zeros(kp.shape, dtype=q.dtype, device=q.device).masked_fill(kp, float("-inf"))
            kp = kp.to(q.dtype).view(n, 1, 1, tk)
            bias = kp if bias is None else bias + kp
        if is_causal and bias is None:
            causal = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1)
            bias = torch.zeros(tq, tk, dtype=q.dtype, device=q.device).masked_fill(causal, float("-inf"))
        # softmax(q kᵀ / √d + bias) v, fused  (N, H, Tq, d)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        m = self._natgrad_head_mask
        if m is not None:
            m = m.to(ctx.dtype)
            ctx = ctx * (m.view(m.shape[0], h, 1, 1) if m.dim() == 2 else m.view(1, h, 1, 1))
        flat = ctx.transpose(1, 2).reshape(n, tq, h * d)
        if fast:
            out = F.linear(flat, self.out_proj.weight, self.out_proj.bias)
        else:
            out = self.out_proj(flat)
        if not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:  # (N, H, Tq, Tk), as the fused product above computes them
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)
            weights = torch.softmax(scores if bias is None else scores + bias, dim=-1)
            if average_attn_weights:
                weights = weights.mean(1)
        return out, weights


def from_multihead(mha: nn.MultiheadAttention) -> HeadAttention:
    """A :class:`HeadAttention` computing what ``mha`` computes (same weights, copied).

    Raises:
        ValueError: for ``kdim``/``vdim`` != ``embed_dim``, no biases, ``add_bias_kv`` or
            ``add_zero_attn``, or dropout > 0 in train mode.
    """
    if not mha._qkv_same_embed_dim or mha.in_proj_bias is None:
        raise ValueError("from_multihead needs kdim == vdim == embed_dim and bias=True.")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("from_multihead does not support add_bias_kv or add_zero_attn.")
    w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
    e = mha.embed_dim
    new = HeadAttention(
        e, mha.num_heads, mha.head_dim, batch_first=mha.batch_first, device=w.device, dtype=w.dtype
    )
    with torch.no_grad():
        for i, lin in enumerate((new.q_proj, new.k_proj, new.v_proj)):
            lin.weight.copy_(w[i * e : (i + 1) * e])
            lin.bias.copy_(b[i * e : (i + 1) * e])
        new.out_proj.weight.copy_(mha.out_proj.weight.detach())
        new.out_proj.bias.copy_(mha.out_proj.bias.detach())
    for lin in (new.q_proj, new.k_proj, new.v_proj):  # frozen stays frozen
        lin.weight.requires_grad_(mha.in_proj_weight.requires_grad)
        lin.bias.requires_grad_(mha.in_proj_bias.requires_grad)
    new.out_proj.weight.requires_grad_(mha.out_proj.weight.requires_grad)
    new.out_proj.bias.requires_grad_(mha.out_proj.bias.requires_grad)
    new.train(mha.training)
    return new


def to_multihead(att: HeadAttention, like: nn.MultiheadAttention) -> nn.MultiheadAttention | None:
    """The inverse of :func:`from_multihead`: a copy of ``like`` holding ``att``'s weights,
    ``in_proj = [W_q; W_k; W_v]`` (and the biases alike), ``out_proj = W_o``.

    None when ``att`` no longer has ``like``'s shape (heads removed, or a width changed):
    ``nn.MultiheadAttention`` cannot hold fewer heads of the same width. When ``att`` is
    :func:`from_multihead` of ``like`` untouched, the copy equals ``like`` exactly (the
    weights are copied back, not recomputed). A ``torch.nn.utils.prune`` reparametrization
    of ``like`` (its ``in_proj_weight``, its ``out_proj.weight``, ...) is not carried: the
    copy holds plain parameters equal to ``att``'s weights
    (:func:`~natgrad.pruning.pruned.plain_copy`), so it computes what ``att`` computes.
    Each parameter keeps ``like``'s ``requires_grad``; the training flag is ``att``'s.
    """
    from natgrad.pruning.pruned import plain_copy

    e = like.embed_dim
    same = (
        att.embed_dim == e and att.num_heads == like.num_heads and att.head_dim == like.head_dim
        and att.batch_first == like.batch_first
        and all(tuple(p.weight.shape) == (e, e) for p in (att.q_proj, att.k_proj, att.v_proj,
                                                          att.out_proj))
    )
    if not same or like.in_proj_weight is None or like.in_proj_bias is None:
        return None
    new = cast(nn.MultiheadAttention, plain_copy(like))
    assert new.in_proj_weight is not None and new.in_proj_bias is not None  # as like's
    with torch.no_grad():
        for i, lin in enumerate((att.q_proj, att.k_proj, att.v_proj)):
            new.in_proj_weight[i * e : (i + 1) * e].copy_(lin.weight)
            new.in_proj_bias[i * e : (i + 1) * e].copy_(lin.bias)
        new.out_proj.weight.copy_(att.out_proj.weight)
        new.out_proj.bias.copy_(att.out_proj.bias)
    new.train(att.training)
    return new


def block_indices(keep: torch.Tensor, width: int) -> torch.Tensor:
    """The indices of the kept blocks of ``width`` consecutive rows (or columns):
    ``[k·width, …, k·width + width - 1]`` for each ``k`` of ``keep``, in order. For heads
    (``width = head_dim``): the kept rows of the q/k/v projections and the kept columns of
    the output projection.

    Args:
        keep: the kept block indices (ascending).
        width: rows (or columns) per block.

    Returns:
        ``(len(keep) · width,)`` indices.
    """
    return (keep[:, None] * width + torch.arange(width, device=keep.device)[None, :]).flatten()


def shrink_heads(att: HeadAttention, keep: torch.Tensor) -> HeadAttention:
    """A :class:`HeadAttention` with only the heads ``keep`` of ``att``."""
    d = att.head_dim
    idx = block_indices(keep, d).to(att.q_proj.weight.device)
    w = att.q_proj.weight
    new = HeadAttention(
        att.embed_dim, len(keep), d, batch_first=att.batch_first, device=w.device, dtype=w.dtype
    )
    with torch.no_grad():
        for src, dst in ((att.q_proj, new.q_proj), (att.k_proj, new.k_proj), (att.v_proj, new.v_proj)):
            dst.weight.copy_(src.weight[idx])
            dst.bias.copy_(src.bias[idx])
        new.out_proj.weight.copy_(att.out_proj.weight[:, idx])
        new.out_proj.bias.copy_(att.out_proj.bias)
    for p, q in zip(att.parameters(), new.parameters(), strict=True):  # frozen stays frozen
        q.requires_grad_(p.requires_grad)
    new.train(att.training)
    return new


def attention_flops(mod: nn.Module, total: list[float]) -> RemovableHandle | None:
    """A forward hook adding ``2 · 2 · Tq · Tk · H · d`` (``QKᵀ`` and ``AV``) to ``total[0]``
    for a :class:`HeadAttention` (its projections are Linear layers, counted as such);
    None for other modules. ``nn.MultiheadAttention`` is counted in full here, as it calls
    no Linear modules."""
    if isinstance(mod, HeadAttention):

        def hook(m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            tq, tk = _lengths(m, args, kwargs)
            total[0] += 4.0 * tq * tk * m.num_heads * m.head_dim

        return mod.register_forward_hook(hook, with_kwargs=True)
    bert = all(isinstance(getattr(mod, a, None), nn.Linear) for a in ("query", "key", "value"))
    modern = all(isinstance(getattr(mod, a, None), nn.Linear) for a in ("q_proj", "k_proj", "v_proj"))
    c_attn = getattr(mod, "c_attn", None)
    gpt2 = (
        isinstance(c_attn, nn.Module)
        and (isinstance(c_attn, nn.Linear) or is_hf_conv1d(c_attn))
        and isinstance(getattr(mod, "num_heads", None), int)
    )
    if gpt2:

        def gpt2_hook(m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            t = h.shape[-2]
            total[0] += 4.0 * t * t * m.num_heads * m.head_dim

        return mod.register_forward_hook(gpt2_hook, with_kwargs=True)
    if (bert or modern) and isinstance(getattr(mod, "num_attention_heads", None), int):
        # Hugging Face style self-attention: its projections are Linear layers

        def hf_hook(m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            h = args[0] if args else kwargs["hidden_states"]
            t = h.shape[-2]
            d = m.attention_head_size if bert else m.head_dim
            total[0] += 4.0 * t * t * m.num_attention_heads * d

        return mod.register_forward_hook(hf_hook, with_kwargs=True)
    if isinstance(mod, nn.MultiheadAttention):

        def mhook(m: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            tq, tk = _lengths(m, args, kwargs)
            e = m.embed_dim
            total[0] += 2.0 * (tq * e * e + 2 * tk * e * e + tq * e * e) + 4.0 * tq * tk * e

        return mod.register_forward_hook(mhook, with_kwargs=True)
    return None


def _lengths(m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, int]:
    """Query and key lengths of an attention call, positional or keyword arguments."""
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs.get("key", q)
    batched = q.dim() == 3
    tq = q.shape[1] if m.batch_first and batched else q.shape[0]
    tk = k.shape[1] if m.batch_first and batched else k.shape[0]
    return int(tq), int(tk)
