"""``estimate_fisher``: the diagonal Fisher of a model over a batch or a data loader."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any

import torch
from torch import nn

from natgrad.curvature.diagonal import DiagonalFisher
from natgrad.curvature.protocol import Curvature, curvature_class
from natgrad.engine.batch import OutputFn
from natgrad.engine.capture import ENGINES, square_sums_auto
from natgrad.engine.checkpoint import (
    check_same_run,
    load_checkpoint,
    run_fingerprint,
    save_checkpoint,
)
from natgrad.engine.checks import (
    check_choice,
    check_finite,
    check_fixed_model,
    check_int,
    check_not_python_numbers,
)
from natgrad.engine.common import acc_dtype
from natgrad.engine.distributed import all_reduce_sums
from natgrad.engine.likelihoods import Likelihood
from natgrad.engine.per_sample import ParamSpec, Plan

__all__ = ["estimate_curvature", "estimate_fisher", "is_single_batch", "iterate_batches"]


def is_single_batch(data: Any) -> bool:
    """True for one batch: a tensor, a dict, or a tuple/list whose first item is a tensor."""
    if isinstance(data, (torch.Tensor, Mapping)):
        return True
    return isinstance(data, (tuple, list)) and len(data) > 0 and isinstance(data[0], torch.Tensor)


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


def _progress(it: Iterable, data: Any, enabled: bool, max_batches: int | None, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    total = None
    if not is_single_batch(data) and hasattr(data, "__len__"):
        total = len(data) if max_batches is None else min(len(data), max_batches)
    return tqdm(it, total=total, desc=desc, unit="batch")


def estimate_fisher(
    model: nn.Module,
    data: Any,
    likelihood: str | Likelihood = "categorical",
    *,
    labels: str = "empirical",
    mc_samples: int = 1,
    params: ParamSpec = None,
    chunk_size: int | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    generator: torch.Generator | None = None,
    output_fn: OutputFn | None = None,
    engine: str = "auto",
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
) -> DiagonalFisher:
    """Estimate the diagonal Fisher ``F_i = (1/N) Σ_n E_y[(∂l_n/∂θ_i)²]`` from exact
    per-sample gradients.

    ``l_n = -log p(y_n | x_n, θ)``; ``E_y`` is over the label source: the data's labels
    (``"empirical"``), ``mc_samples`` draws from the model's predictive (``"mc"``), or
    the closed-form expectation (``"exact"``). Never the squared batch-mean gradient.

    Args:
        model: any ``nn.Module``, deterministic: BatchNorm and dropout in eval mode
            (a train-mode dropout Fisher would mix in mask noise, different on every
            call, so it is refused). It is not modified.
        data: one batch (``(x, y)``, ``x``, a dict), an iterable of batches or a DataLoader.
            Integer labels of any width (uint8, int32) are cast to int64, which is exact.
        likelihood: name or :class:`natgrad.engine.likelihoods.Likelihood`.
        labels: ``"empirical"``, ``"mc"`` or ``"exact"``.
        mc_samples: label draws per sample for ``"mc"``.
        params: parameters to cover (see :func:`natgrad.select_params`).
        chunk_size: samples per vmap chunk; memory ``≈ chunk_size × P`` floats.
        max_batches: stop after this many batches.
        progress: show a tqdm progress bar.
        generator: ``torch.Generator`` for ``"mc"`` (default: seeded with 0).
        output_fn: maps model outputs to the output tensor (default: tensor or ``.logits``).
        engine: ``"auto"`` (capture path for Linear/Conv/Embedding parameters, ``vmap``
            for the rest; see :mod:`natgrad.engine.capture`), ``"fast"`` (the same, but an error
            when no parameter qualifies) or ``"vmap"`` (general path for everything).
            The engines agree to float tolerance and use the same MC draws.
        checkpoint: file for resumable passes: partial sums are saved atomically every
            ``checkpoint_every`` batches, and a rerun with the same model and arguments
            skips the batches already done (see :mod:`natgrad.engine.checkpoint`). Under
            ``torch.distributed`` give each rank its own path.
        checkpoint_every: batches between checkpoints.

    When ``torch.distributed`` is initialized, each rank passes its own shard; the sums
    and counts are all-reduced, so every rank returns the Fisher of all shards.

    Returns:
        :class:`DiagonalFisher` with ``n_samples = N``: float64 values for float64
        parameters (summed in float64), float32 for float32, bfloat16 and float16
        parameters (summed in float32).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; inputs are Python lists.
        ValueError: empty data, train-mode BatchNorm or dropout, a meta-device model,
            labels out of range (the whole batch is checked, naming the sample and value),
            of the wrong dtype or shape, non-finite targets, a bad likelihood or engine,
            a checkpoint written by a different pass.
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
    check_fixed_model(model, "estimate_fisher")
    check_choice("engine", engine, ENGINES)
    plan = Plan(
        model, likelihood, labels, mc_samples, params, output_fn, generator,
        what="estimate_fisher",
    )
    sums = {k: torch.zeros_like(p, dtype=acc_dtype(p.dtype)) for k, p in plan.params.items()}
    n_total, done, every, fingerprint = 0, 0, 0, None
    if checkpoint is not None:
        every = check_int("checkpoint_every", checkpoint_every, 1)
        fingerprint = run_fingerprint(
            plan.params,
            labels=plan.labels,
            likelihood=repr(plan.lik),
            mc_samples=plan.k,
            engine=engine,
            max_batches=max_batches,
        )
        saved = load_checkpoint(checkpoint)
        if saved is not None:
            check_same_run(os.fspath(checkpoint), saved, fingerprint)
            sums = {k: saved["sums"][k].to(device=v.device, dtype=v.dtype) for k, v in sums.items()}
            n_total, done = int(saved["n_samples"]), int(saved["batches_done"])
            plan.generator.set_state(saved["generator_state"])
    batches = iterate_batches(data, max_batches)
    if done:
        batches = islice(batches, done, None)
    batches = _progress(batches, data, progress, max_batches, "Fisher")

    def save() -> None:
        state = {
            "fingerprint": fingerprint,
            "sums": {k: v.detach().cpu() for k, v in sums.items()},
            "n_samples": n_total,
            "batches_done": done,
            "generator_state": plan.generator.get_state(),
        }
        save_checkpoint(checkpoint, state)

    for n, acc in square_sums_auto(plan, batches, chunk_size, engine):
        for k in sums:
            sums[k] += acc[k]
        n_total += n
        done += 1
        if checkpoint is not None and done % every == 0:
            save()
    if checkpoint is not None:
        save()
    sums, n_total = all_reduce_sums(sums, n_total)
    if n_total == 0:
        raise ValueError(
            "No samples: `data` yielded no batches, so there is no Fisher to estimate."
        )
    # The sums are of squares (>= 0), so one NaN/Inf entry makes its tensor's total
    # non-finite: check the totals in one pass and name the culprit only on failure.
    if not torch.isfinite(torch.stack([v.sum() for v in sums.values()])).all():
        for k, v in sums.items():
            check_finite(
                f"the per-sample gradients of {k!r}",
                v,
                "Check the inputs for NaN/Inf, the model's outputs, and the labels.",
            )
    return DiagonalFisher(
        {k: v / n_total for k, v in sums.items()},
        n_total,
        labels=labels,
        likelihood=plan.lik.name,
    )


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
    check_fixed_model(model, f"estimate_curvature(kind={kind!r})")
    return curvature_class(kind).estimate(model, data, likelihood, kind=kind, **options)
