"""Distributed Fisher passes over ``torch.distributed``: each rank sums its own shard.

The Fisher is a mean over samples, ``F = (Σ_r S_r) / (Σ_r N_r)`` with ``S_r`` the sum of
squared per-sample gradients on rank ``r`` and ``N_r`` its sample count. Summing the
sums and the counts over ranks (one all-reduce) gives every rank the Fisher that one
process would compute on all the data.

Errors reach every rank: each rank runs its local part, catches its own exception, and
calls :func:`raise_if_any_rank_failed` (one all-reduce of a per-rank flag) before the
sums are reduced, so a bad batch on one rank makes every rank raise the same
:class:`DistributedError` at once instead of leaving the others waiting in the next
all-reduce until the process-group timeout (30 minutes by default).

A pass is a collective only when asked (:func:`resolve_distributed`): ``None``
(automatic when a process group with more than one rank is initialized, said once on
the ``"natgrad"`` logger), ``True`` (required) or ``False`` (local only).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

__all__ = [
    "DistributedError",
    "is_distributed",
    "all_reduce_sums",
    "resolve_distributed",
    "rank_and_world",
    "raise_if_any_rank_failed",
]

_log = logging.getLogger("natgrad")


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

    ``S = Σ_r S_r``, ``N = Σ_r N_r``. The sums are flattened into one buffer (float64 when
    any sum is float64, else float32) and reduced in one collective, the count in a second
    (int64, exact), so every rank receives identical results; each sum comes back in its
    own dtype. Pass each rank its own shard of the data.

    Args:
        sums: ``{name: tensor}``, the rank's sum of squared per-sample gradients (float32,
            or float64 for float64 models).
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
    wide = any(sums[k].dtype == torch.float64 for k in names)
    dtype = torch.float64 if wide else torch.float32
    flat = torch.cat([sums[k].reshape(-1).to(dtype) for k in names]) if names else ref.to(dtype)
    flat = flat.clone()
    # The count travels separately as int64 so it stays exact for any N.
    count = torch.tensor([int(n)], dtype=torch.int64, device=ref.device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    out, i = {}, 0
    for k in names:
        m = sums[k].numel()
        out[k] = flat[i : i + m].view_as(sums[k]).to(sums[k].dtype)
        i += m
    return out, int(count.item())


class DistributedError(RuntimeError):
    """A distributed pass failed on some rank; every rank raises this same error at once.

    Attributes:
        rank: the (first) failing rank.
        world_size: the number of ranks.
        failed: every failing rank.
    """

    def __init__(self, message: str, rank: int, world_size: int, failed: list[int]):
        super().__init__(message)
        self.rank, self.world_size, self.failed = rank, world_size, failed


_announced = False


def resolve_distributed(distributed: bool | None, what: str = "estimate_fisher") -> bool:
    """Whether a pass is a collective over ``torch.distributed`` ranks.

    ``None``: automatic, when a process group is initialized with more than one rank
    (logged once per process on the ``"natgrad"`` logger, level INFO); ``True``:
    required (an error without a process group); ``False``: local only, no collective.

    Raises:
        TypeError: ``distributed`` is not None, True or False.
        RuntimeError: ``distributed=True`` without an initialized process group.

    Example:
        >>> resolve_distributed(None), resolve_distributed(False)
        (False, False)
    """
    global _announced
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}.")
    if distributed is False:
        return False
    ready = is_distributed()
    if distributed is True:
        if not ready:
            raise RuntimeError(
                f"{what}(distributed=True), but torch.distributed is not initialized: call "
                "torch.distributed.init_process_group(...) on every rank first, or pass "
                "distributed=False (or None) for a local result."
            )
        return True
    if not ready or dist.get_world_size() <= 1:
        return False
    if not _announced:
        _announced = True
        _log.info(
            "%s: torch.distributed is initialized (world size %d), so results are summed over "
            "all ranks: every rank must make the same call, each with its own data shard. "
            "Pass distributed=False for a local result on one rank.",
            what,
            dist.get_world_size(),
        )
    return True


def rank_and_world(active: bool) -> tuple[int, int]:
    """``(rank, world size)`` of this process in a distributed pass, else ``(0, 1)``."""
    return (dist.get_rank(), dist.get_world_size()) if active else (0, 1)


def raise_if_any_rank_failed(
    error: BaseException | None,
    what: str = "estimate_fisher",
    group: dist.ProcessGroup | None = None,
) -> None:
    """Collective: every rank calls this after its local part, with the exception it
    caught (or None); if any rank failed, every rank raises the same
    :class:`DistributedError` carrying the first failing rank's message.

    One all-reduce of a per-rank flag vector (``world_size`` int64 values) in the
    normal case; on failure, one broadcast of the message. Without it, a rank that fails
    leaves the others waiting in the next all-reduce until the process-group timeout.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == "nccl"
        else torch.device("cpu")
    )
    flags = torch.zeros(world, dtype=torch.int64, device=device)
    if error is not None:
        flags[rank] = 1
    dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
    failed = [int(r) for r in flags.nonzero().flatten().tolist()]
    if not failed:
        return
    src = failed[0]
    box = [f"{type(error).__name__}: {error}" if rank == src else None]
    root = src if group is None else dist.get_global_rank(group, src)
    dist.broadcast_object_list(box, src=root, group=group)
    others = f" (ranks {failed} failed; the first is shown)" if len(failed) > 1 else ""
    raise DistributedError(
        f"{what} failed on rank {src} of {world}{others}: {box[0]} -- every rank stops with "
        f"this error; fix the cause on rank {src} (its data shard, checkpoint path or "
        "arguments).",
        src,
        world,
        failed,
    ) from error
