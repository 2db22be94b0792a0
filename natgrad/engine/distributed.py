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

The same check compares what the ranks compute: each rank passes a description of its
call (:func:`describe_call`: the options and the parameters' names, shapes and dtypes),
whose digest travels in the same all-reduce; ranks that disagree (different ``params=``,
labels, kind or model dtype) raise a :class:`DistributedError` naming the first
difference, instead of summing unrelated statistics position by position (a silently
mixed result) or aborting in a collective whose sizes differ. With ``labels="mc"``, the
digest of each rank's label generator at the start of the pass travels too: ranks whose
generators are in one state draw correlated labels (the same ones on equal batches), so
their Monte Carlo noise does not average out as it should, and a warning says so
(natgrad's default generator is seeded with the rank in a distributed pass, and
:class:`natgrad.FisherPreconditioner` offsets its ``seed`` by the rank).

A pass is a collective only when asked (:func:`resolve_distributed`): ``None``
(automatic when a process group with more than one rank is initialized, said once on
the ``"natgrad"`` logger), ``True`` (required) or ``False`` (local only).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistributedError",
    "is_distributed",
    "all_reduce_sums",
    "resolve_distributed",
    "rank_and_world",
    "raise_if_any_rank_failed",
    "describe_call",
    "generator_digest",
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


def describe_call(what: str, params: Mapping[str, torch.Tensor], **options: Any) -> str:
    """What one rank's part of a distributed call computes, as text every rank must share
    (compared by :func:`raise_if_any_rank_failed`): ``what``, the options (by their
    ``repr``) and the parameters' names, shapes and dtypes.

    Example:
        >>> print(describe_call("estimate_fisher", {"w": torch.zeros(2)}, labels="mc"))
        call: estimate_fisher
        labels: 'mc'
        parameter w: shape (2,), torch.float32
    """
    lines = [f"call: {what}"] + [f"{k}: {options[k]!r}" for k in sorted(options)]
    lines += [f"parameter {k}: shape {tuple(p.shape)}, {p.dtype}" for k, p in params.items()]
    return "\n".join(lines)


def generator_digest(generator: torch.Generator) -> str:
    """A digest of a generator's state (compared across ranks before MC label draws)."""
    return hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()


def _code(text: str | None) -> tuple[int, int]:
    """Two positive 56-bit integers from ``text``'s SHA-256, ``(0, 0)`` for None."""
    if text is None:
        return 0, 0
    d = hashlib.sha256(text.encode()).digest()
    return 1 + int.from_bytes(d[:7], "big"), 1 + int.from_bytes(d[7:14], "big")


def raise_if_any_rank_failed(
    error: BaseException | None,
    what: str = "estimate_fisher",
    group: dist.ProcessGroup | None = None,
    *,
    config: str | None = None,
    stream: str | None = None,
) -> None:
    """Collective: every rank calls this after its local part, with the exception it
    caught (or None); if any rank failed, every rank raises the same
    :class:`DistributedError` carrying the first failing rank's message.

    ``config`` (:func:`describe_call`): when every rank passes one and they differ, every
    rank raises a :class:`DistributedError` naming the first differing line (ranks that
    disagree would reduce unrelated statistics). ``stream``
    (:func:`generator_digest` of the MC label generator at the start): when every rank
    passes one and all are equal, a ``UserWarning`` says the ranks draw the same labels.

    One all-reduce of a per-rank table (``world_size x 5`` int64 values) in the normal
    case; on failure or disagreement, one broadcast or gather of the messages. Without
    it, a rank that fails leaves the others waiting in the next all-reduce until the
    process-group timeout.
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(group) == "nccl"
        else torch.device("cpu")
    )
    table = torch.zeros(world, 5, dtype=torch.int64, device=device)
    table[rank] = torch.tensor([int(error is not None), *_code(config), *_code(stream)])
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    rows = table.tolist()
    failed = [r for r in range(world) if rows[r][0]]
    if not failed:
        configs = {tuple(row[1:3]) for row in rows}
        if len(configs) > 1 and (0, 0) not in configs:
            _raise_disagreement(config, what, group, world)
        streams = {tuple(row[3:5]) for row in rows}
        if len(streams) == 1 and (0, 0) not in streams and world > 1:
            warnings.warn(
                f"{what}: every rank's label generator is in the same state, so the ranks "
                "draw correlated Monte Carlo labels (the same ones on equal batches) and "
                "their noise does not average out. Seed each rank's generator differently, "
                "e.g. torch.Generator().manual_seed(seed + rank).",
                UserWarning,
                stacklevel=3,
            )
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


def _raise_disagreement(config: str | None, what: str, group: Any, world: int) -> None:
    """Every rank: raise a :class:`DistributedError` naming the first line in which a
    rank's :func:`describe_call` differs from rank 0's."""
    every: list[Any] = [None] * world
    dist.all_gather_object(every, config, group=group)
    first = str(every[0]).split("\n")
    for r in range(1, world):
        mine = str(every[r]).split("\n")
        diff = next((i for i, (a, b) in enumerate(zip(first, mine, strict=False)) if a != b),
                    min(len(first), len(mine)))
        if mine != first:
            a = first[diff] if diff < len(first) else "(nothing)"
            b = mine[diff] if diff < len(mine) else "(nothing)"
            raise DistributedError(
                f"{what}: the ranks do not compute the same thing (rank 0 has '{a[:200]}', "
                f"rank {r} has '{b[:200]}'), so their statistics cannot be summed. Every rank "
                "must make the same call (same model and dtype, parameters and options), "
                "each with its own data shard.",
                r,
                world,
                [r],
            )
