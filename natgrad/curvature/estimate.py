"""``estimate_fisher``: the diagonal Fisher of a model over a batch or a data loader."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from itertools import islice
from typing import Any

import torch
from torch import nn
from typing_extensions import Unpack

from natgrad.curvature.diagonal import DiagonalFisher
from natgrad.curvature.protocol import Curvature, curvature_class
from natgrad.engine.capture import square_sums_auto
from natgrad.engine.checkpoint import (
    DataCheck,
    check_state,
    checkpoint_lock,
    load_checkpoint,
    run_fingerprint,
    save_checkpoint,
)
from natgrad.engine.checks import (
    check_all_finite,
    check_fixed_model,
    check_int,
    check_not_python_numbers,
)
from natgrad.engine.common import acc_dtype, callable_digest, with_autograd
from natgrad.engine.distributed import (
    all_reduce_sums,
    describe_call,
    generator_digest,
    raise_if_any_rank_failed,
    rank_and_world,
    resolve_distributed,
)
from natgrad.engine.likelihoods import Likelihood
from natgrad.engine.options import EstimatorOptions, Options
from natgrad.engine.per_sample import Plan, select_params

__all__ = [
    "estimate_curvature",
    "estimate_fisher",
    "is_single_batch",
    "iterate_batches",
    "one_batch_reading",
]

logger = logging.getLogger(__name__)


def is_single_batch(data: Any) -> bool:
    """True for one batch: a tensor, a dict, a tuple/list whose first item is a tensor, or
    ``(inputs, y)`` with a dict of inputs and a label tensor (a list of dict batches is
    not one batch: its second item is a dict too).

    A list whose first item is a tensor is one batch ``[x, y]`` because that is what a
    ``DataLoader`` yields (``default_collate`` makes lists); so ``[x_a, x_b]`` is the batch
    ``(x_a, y=x_b)``, not two batches. Several batches: a list of tuples
    ``[(x_a,), (x_b,)]``, a generator or a ``DataLoader``."""
    if isinstance(data, (torch.Tensor, Mapping)):
        return True
    if not isinstance(data, (tuple, list)) or len(data) == 0:
        return False
    if isinstance(data[0], torch.Tensor):
        return True
    return (len(data) == 2 and isinstance(data[0], Mapping)
            and isinstance(data[1], torch.Tensor))


_SEVERAL = (
    "to pass several batches, pass a list of tuples [(x1, y1), (x2, y2)] (or [(x1,), (x2,)]), "
    "a generator or a DataLoader; a tuple (x, y) marks one batch."
)


def _tensor_list(data: Any) -> bool:
    """``data`` is a list (not a tuple) of two or more tensors."""
    return (isinstance(data, list) and len(data) >= 2
            and all(isinstance(t, torch.Tensor) for t in data))


@contextmanager
def one_batch_reading(data: Any, labels: str) -> Iterator[None]:
    """Say how a list of tensors was read: as ONE batch ``(x, y, ...)``, not as batches.

    A list whose items are tensors is one ``DataLoader``-style batch ``[x, y]``. When that
    reading fails (a ``ValueError``, e.g. float "labels" under a categorical likelihood),
    the error is re-raised (same type) with the reading and the way to pass several
    batches. When the pass succeeds but the labels were not read (``labels="exact"`` or
    ``"mc"``) and the list looks like two batches (two tensors of the same shape and
    dtype), a ``UserWarning`` says the second tensor was taken as the (ignored) labels.
    A tuple ``(x, y)`` is never warned about.

    Args:
        data: the ``data`` argument as the user passed it.
        labels: the label source (``"empirical"``, ``"mc"`` or ``"exact"``).

    Raises:
        ValueError: the body's ``ValueError``, its message extended, when ``data`` is a
            list of two or more tensors.
    """
    try:
        yield
    except ValueError as exc:
        if not _tensor_list(data) or "was read as one" in str(exc):
            raise
        msg = (f"{exc} (data, a list of {len(data)} tensors, was read as one (x, y) batch; "
               f"{_SEVERAL})")
        try:
            new = type(exc)(msg)
        except Exception:
            new = ValueError(msg)
        raise (new if str(new) == msg else ValueError(msg)) from exc
    if (_tensor_list(data) and labels in ("exact", "mc") and len(data) == 2
            and all(t.shape == data[0].shape and t.dtype == data[0].dtype for t in data)):
        warnings.warn(
            f"data, a list of 2 tensors of shape {tuple(data[0].shape)}, was read as one "
            f"batch (x, y); its second tensor is ignored as labels under labels={labels!r}. "
            f"If it holds two batches of inputs: {_SEVERAL}",
            UserWarning,
            stacklevel=4,
        )


def iterate_batches(data: Any, max_batches: int | None = None) -> Iterable[Any]:
    """Yield batches from one batch, an iterable of batches or a DataLoader."""
    max_batches = check_int("max_batches", max_batches, 1, optional=True)
    if is_single_batch(data):
        return iter([data])
    if isinstance(data, (tuple, list)) and data:
        check_not_python_numbers(data[0], "The data's first input")
    try:
        it = iter(data)
    except TypeError:
        raise TypeError(
            f"data must be a batch or an iterable of batches (e.g. a DataLoader), got "
            f"{type(data).__name__}."
        ) from None
    return islice(it, max_batches) if max_batches is not None else it


def with_progress(
    it: Iterable[Any], data: Any, enabled: bool, max_batches: int | None, desc: str
) -> Iterable[Any]:
    """``it`` wrapped in a tqdm bar (total from ``data``'s length when known) when ``enabled``."""
    if not enabled:
        return it
    from tqdm.auto import tqdm

    total = None
    if not is_single_batch(data) and hasattr(data, "__len__"):
        total = len(data) if max_batches is None else min(len(data), max_batches)
    bar: Iterable[Any] = tqdm(it, total=total, desc=desc, unit="batch")
    return bar


@with_autograd
def estimate_fisher(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    max_batches: int | None = None,
    progress: bool = False,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = 10,
    distributed: bool | None = None,
    **options: Unpack[EstimatorOptions],
) -> DiagonalFisher:
    """Estimate the diagonal Fisher ``F_i = (1/N) Σ_n E_y[(∂l_n/∂θ_i)²]`` from exact
    per-sample gradients.

    ``l_n = -log p(y_n | x_n, θ)``; ``E_y`` is over the label source: the data's labels
    (``"empirical"``), ``mc_samples`` draws from the model's predictive (``"mc"``), or
    the closed-form expectation (``"exact"``). Never the squared batch-mean gradient.

    Args:
        model: any ``nn.Module``, deterministic: BatchNorm and dropout in eval mode
            (a train-mode dropout Fisher would mix in mask noise, different on every
            call, so it is refused). natgrad does not modify it; its own forward may (an
            ``nn.Embedding(max_norm=...)`` renormalizes the rows it looks up in place
            on every call, this pass's forwards included).
        data: one batch (``(x, y)``, ``x``, a dict), an iterable of batches or a DataLoader.
            A tuple or list whose first item is a tensor is one batch ``(x, y, ...)``
            (a DataLoader's batches are lists): several batches are a list of tuples,
            a generator or a DataLoader; a failure of that reading says so.
            Integer labels of any width (uint8, int32) are cast to int64, which is exact.
            Inputs without the batch dimension (a ``(T, T)`` mask), or wrapped in
            :func:`natgrad.shared`, reach the model whole in every per-sample forward.
        likelihood: name or :class:`natgrad.engine.likelihoods.Likelihood`.
        max_batches: stop after this many batches.
        progress: show a tqdm progress bar.
        checkpoint: file for resumable passes: partial sums are saved atomically every
            ``checkpoint_every`` batches, and a rerun with the same model, arguments,
            generator and data skips the batches already done (it reads and hashes them
            to check they are the same; a shuffling DataLoader needs a seeded generator
            to resume). The file is locked for the pass (one process per path). See :mod:`natgrad.engine.checkpoint`. Under ``torch.distributed``
            give each rank its own path.
        checkpoint_every: batches between checkpoints.
        distributed: sum over ``torch.distributed`` ranks. ``None`` (default):
            automatic, when a process group with more than one rank is initialized (said
            once on the ``"natgrad"`` logger); then every rank must call
            ``estimate_fisher`` with its own shard, and every rank returns the Fisher of
            all shards ``F = (Σ_r S_r) / (Σ_r N_r)``. ``True``: required (an error
            without a process group). ``False``: this process's data only, no
            collective (e.g. on rank 0 alone). An error on any rank makes every rank
            raise :class:`natgrad.DistributedError` at once.
        **options: the estimator options (:class:`natgrad.EstimatorOptions`):
            ``labels``, ``mc_samples``, ``params``, ``chunk_size``, ``generator``,
            ``output_fn``, ``engine``. The engines agree to float tolerance and use the
            same MC draws.

    Returns:
        :class:`DiagonalFisher` with ``n_samples = N``: float64 values for float64
        parameters (summed in float64), float32 for float32, bfloat16 and float16
        parameters (summed in float32).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; inputs are Python lists.
        ValueError: empty data, train-mode BatchNorm or dropout, a meta-device model,
            labels out of range (the whole batch is checked, naming the sample and value),
            of the wrong dtype or shape, non-finite targets, a bad likelihood or engine.
        natgrad.CheckpointMismatchError: (a ValueError) the checkpoint belongs to another
            pass: other options, model, generator, rank, world size or data.
        natgrad.CorruptFileError: (a ValueError) the checkpoint's state is malformed or
            its sums have wrong shapes, NaN/Inf or negative entries.
        natgrad.CheckpointLockedError: another pass holds the checkpoint's lock.
        natgrad.DistributedError: some rank failed (raised on every rank).
        FloatingPointError: NaN or Inf in the per-sample gradients.
        Exception: the model's own forward failure, re-raised (same type) naming the
            batch index, the inputs' shapes and dtypes and the parameters' dtypes.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> F = estimate_fisher(model, (x, y))
        >>> F.n_samples, F["weight"].shape
        (8, torch.Size([3, 4]))
    """
    opts = Options.resolve("estimate_fisher", options)
    active = resolve_distributed(distributed)
    rank, world = rank_and_world(active)
    config = stream = None
    try:
        if active:  # what every rank must share, and the MC label stream (see distributed)
            opts, config, stream = rank_options(opts, rank, "estimate_fisher", model, likelihood)
        with one_batch_reading(data, opts.labels):
            sums, n_total, plan = _local_sums(
                model, data, likelihood, opts, max_batches, progress, checkpoint,
                checkpoint_every, rank, world,
            )  # fmt: skip
    except Exception as exc:
        if not active:
            raise
        raise_if_any_rank_failed(exc)  # every rank raises the same error, at once
        raise  # unreachable: the call above raises on every rank
    if active:
        raise_if_any_rank_failed(None, config=config, stream=stream)
        sums, n_total = all_reduce_sums(sums, n_total)
    if n_total == 0:
        raise ValueError(
            "No samples: `data` yielded no batches, so there is no Fisher to estimate."
        )
    # Sums of squares are >= 0 by construction, so finiteness is the one thing to check:
    # one maximum per tensor (never -inf: their largest entry decides) and one host sync,
    # the culprit located only on failure.
    check_all_finite(
        sums,
        "the per-sample gradients of",
        "Check the inputs for NaN/Inf, the model's outputs, and the labels.",
        nonneg=True,
    )
    # ours, in the accumulation dtype (detached: a vmap part may be tracked)
    values = [v.detach() if v.requires_grad else v for v in sums.values()]
    torch._foreach_div_(values, n_total)  # one call for every tensor
    return DiagonalFisher.from_checked(
        dict(zip(sums, values, strict=True)),
        n_total,
        labels=opts.labels,
        likelihood=plan.lik.name,
    )


def rank_options(
    opts: Options, rank: int, what: str, model: nn.Module, likelihood: Any, **extra: Any
) -> tuple[Options, str, str | None]:
    """A distributed pass's options on this rank, its :func:`describe_call` and the MC
    stream digest: with ``labels="mc"`` and no generator, natgrad's default generator is
    seeded with the rank (seed 0 on every rank drew the same labels on all of them)."""
    if opts.labels == "mc" and opts.generator is None:
        opts = replace(opts, generator=torch.Generator().manual_seed(rank))
    lik = likelihood if isinstance(likelihood, str) else getattr(likelihood, "name", "custom")
    config = describe_call(what, select_params(model, opts.params), labels=opts.labels,
                           mc_samples=opts.mc_samples, likelihood=lik, **extra)
    stream = (generator_digest(opts.generator)
              if opts.labels == "mc" and opts.generator is not None else None)
    return opts, config, stream


@with_autograd
def estimate_curvature(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    kind: str = "diag",
    **options: Any,
) -> Curvature:
    """Estimate a curvature of ``model`` on ``data`` (a batch or an iterable of batches).

    ``kind`` picks a registered :class:`~natgrad.Curvature` class
    (``natgrad.CURVATURE_KINDS``: ``"diag"``, and the structured kinds registered
    beside it); the other keyword options (``labels``, ``mc_samples``, ``params``,
    ``generator``, ``progress``, ...) go to that class's ``estimate``. ``kind="diag"``
    is :func:`estimate_fisher`.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: an unknown ``kind``; a random or batch-mixing model (train-mode
            dropout or BatchNorm: every kind needs a deterministic model, so call
            ``model.eval()``); the errors of the kind's ``estimate`` (bad labels, ...).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> c = estimate_curvature(model, (x, y), kind="diag")
        >>> c.structure()
        {'weight': 'diag', 'bias': 'diag'}
    """
    cls = curvature_class(kind)
    if not cls.CHECKS_MODEL:  # else its estimate checks the model: once per call
        check_fixed_model(model, f"estimate_curvature(kind={kind!r})")
    if kind == "diag":  # estimate_fisher says how a list of tensors was read
        return cls.estimate(model, data, likelihood, kind=kind, **options)
    with one_batch_reading(data, str(options.get("labels", "empirical"))):
        return cls.estimate(model, data, likelihood, kind=kind, **options)


def _local_sums(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood,
    opts: Options,
    max_batches: int | None,
    progress: bool,
    checkpoint: str | os.PathLike[str] | None,
    checkpoint_every: int,
    rank: int,
    world: int,
) -> tuple[dict[str, torch.Tensor], int, Plan]:
    """This process's ``(Σ_n Σ_j w_j g_nj², N, plan)``, resumed from and saved to
    ``checkpoint`` (locked for the pass) when one is given."""
    check_fixed_model(model, "estimate_fisher")
    plan = Plan.from_options(model, likelihood, opts, what="estimate_fisher", checked=True)
    chunk_size, engine = opts.chunk_size, opts.engine
    logger.info(
        "estimate_fisher: %d parameter tensors (%d values), labels=%s, likelihood=%s, "
        "engine=%s",
        len(plan.params), plan.P, plan.labels, plan.lik.name, engine,
    )  # fmt: skip
    if checkpoint is None:
        return _pass(plan, data, chunk_size, max_batches, progress, engine) + (plan,)
    every = check_int("checkpoint_every", checkpoint_every, 1)
    path = os.fspath(checkpoint)
    fingerprint = run_fingerprint(
        plan.params,
        buffers=dict(model.named_buffers()),
        generator=plan.generator if plan.labels == "mc" else None,
        rank=rank,
        world_size=world,
        labels=plan.labels,
        likelihood=repr(plan.lik),
        output_fn=callable_digest(opts.output_fn),
        mc_samples=plan.k,
        engine=engine,
        max_batches=max_batches,
    )
    with checkpoint_lock(path):
        saved = load_checkpoint(path)
        start: _Start | None = None
        check = DataCheck(path)
        if saved is not None:
            check_state(path, saved, plan.params, fingerprint)
            start = (saved["sums"], saved["n_samples"], saved["batches_done"])
            plan.generator.set_state(saved["generator_state"])
            logger.info(
                "estimate_fisher: resuming from %s after %d batches (%d samples)",
                path, saved["batches_done"], saved["n_samples"],
            )
            check = DataCheck(path, saved["data"], bool(saved.get("finished", False)))

        def save(
            sums: dict[str, torch.Tensor], n_total: int, done: int, finished: bool = False
        ) -> None:
            state = {
                "fingerprint": fingerprint,
                "sums": {k: v.detach().cpu() for k, v in sums.items()},
                "n_samples": n_total,
                "batches_done": done,
                "generator_state": plan.generator.get_state(),
                "data": check.state(done),
                "finished": finished,
            }
            save_checkpoint(path, state)

        sums, n_total = _pass(
            plan, data, chunk_size, max_batches, progress, engine, start, check.batches,
            (every, save),
        )  # fmt: skip
    return sums, n_total, plan


# A resumed pass: (square sums, samples, batches done).
_Start = tuple[dict[str, torch.Tensor], int, int]


def _pass(
    plan: Plan,
    data: Any,
    chunk_size: int | None,
    max_batches: int | None,
    progress: bool,
    engine: str,
    start: _Start | None = None,
    skip: Callable[[Iterable[Any]], Iterator[Any]] | None = None,
    saving: tuple[int, Callable[..., None]] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Accumulate the square sums over the batches (after ``start``'s, when resuming)."""
    def zeros() -> dict[str, torch.Tensor]:
        return {k: torch.zeros_like(p, dtype=acc_dtype(p.dtype)) for k, p in plan.params.items()}

    sums: dict[str, torch.Tensor] | None = None  # the first batch's sums, which are ours
    n_total, done = 0, 0
    if start is not None:
        restored, n_total, done = start
        sums = {k: restored[k].to(v) for k, v in zeros().items()}
    batches = iterate_batches(data, max_batches)
    if skip is not None:
        batches = skip(batches)
    batches = with_progress(batches, data, progress, max_batches, "Fisher")
    for n, acc in square_sums_auto(plan, batches, chunk_size, engine):
        if sums is None:
            sums = {k: acc[k] for k in plan.params}
        else:
            for k in sums:
                sums[k] += acc[k]
        n_total += n
        done += 1
        if saving is not None and done % saving[0] == 0:
            saving[1](sums, n_total, done)
    if sums is None:
        sums = zeros()
    if saving is not None:
        saving[1](sums, n_total, done, finished=True)
    logger.info("estimate_fisher: done, N=%d samples from %d batches", n_total, done)
    return sums, n_total
