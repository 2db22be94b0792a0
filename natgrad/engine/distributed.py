"""Distributed Fisher passes over ``torch.distributed``: each rank sums its own shard.

The Fisher is a mean over samples, ``F = (Σ_r S_r) / (Σ_r N_r)`` with ``S_r`` the sum of
squared per-sample gradients on rank ``r`` and ``N_r`` its sample count. Summing the
sums and the counts over ranks (one all-reduce) gives every rank the Fisher that one
process would compute on all the data.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "all_reduce_sums"]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a process group is initialized.

    Example:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized()


def all_reduce_sums(
    sums: dict[str, torch.Tensor], n: int, group: object | None = None
) -> tuple[dict[str, torch.Tensor], int]:
    """Sum per-rank Fisher sums and sample counts over all ranks (identity when not distributed).

    ``S = Σ_r S_r``, ``N = Σ_r N_r``. The sums are flattened into one float32 buffer and reduced
    in one collective, the count in a second (int64, exact), so every rank receives
    identical results. Pass each rank its own shard of the data.

    Args:
        sums: ``{name: float32 tensor}``, the rank's sum of squared per-sample gradients.
        n: the rank's number of samples.
        group: process group (default: the world).

    Returns:
        ``(summed dict, total count)``; the input tensors are not modified.

    Example:
        >>> import torch
        >>> s, n = all_reduce_sums({"w": torch.ones(2)}, 3)
        >>> s["w"], n
        (tensor([1., 1.]), 3)
    """
    if not is_distributed():
        return dict(sums), int(n)
    names = list(sums)
    ref = sums[names[0]] if names else torch.zeros(0)
    flat = torch.cat([sums[k].reshape(-1).float() for k in names]) if names else ref.float()
    flat = flat.clone()
    # The count travels separately as int64 so it stays exact for any N.
    count = torch.tensor([int(n)], dtype=torch.int64, device=ref.device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    out, i = {}, 0
    for k in names:
        m = sums[k].numel()
        out[k] = flat[i : i + m].view_as(sums[k])
        i += m
    return out, int(count.item())
