"""Core metrics: the Fisher itself and the per-task EMA tracker."""

from __future__ import annotations

from typing import Any

from natgrad.curvature.diagonal import DiagonalFisher
from natgrad.curvature.tracker import FisherTracker
from natgrad.metrics.context import MetricContext, SignatureType
from natgrad.metrics.registry import registry


@registry.register(
    "fisher_information",
    SignatureType.STANDARD,
    needs=("model", "batch"),
    description="Diagonal Fisher of models[0] on batches[0] (per-sample mean, exact per-sample gradients).",
)
def _fisher_information(ctx: MetricContext, **kwargs: Any) -> DiagonalFisher:
    return ctx.batch_fisher(0, **kwargs)  # reuses the estimate another metric made


@registry.register(
    "update_fisher_ema",
    SignatureType.CUSTOM,
    needs=("tracker", "batch"),
    mutates=True,
    description="Fold each batch's Fisher into its task's EMA in context.tracker; returns update counts.",
)
def _update_fisher_ema(ctx: MetricContext, **_: Any) -> dict[str, int]:
    tracker = _tracker(ctx)
    names = ctx.task_names(len(ctx.batches))
    for task, batch in zip(names, ctx.batches, strict=True):
        tracker.update(task, batch)
    return {t: tracker.num_updates(t) for t in names}


def _tracker(ctx: MetricContext) -> FisherTracker:
    """``ctx.tracker``; the registry runs these metrics only when it is set (``needs``)."""
    assert ctx.tracker is not None
    return ctx.tracker


@registry.register(
    "reset_fisher_ema",
    SignatureType.CUSTOM,
    needs=("tracker",),
    mutates=True,
    description="Reset context.tracker's EMA for option task=... (every task when omitted).",
)
def _reset_fisher_ema(ctx: MetricContext, task: str | None = None) -> dict[str, list[str]]:
    tracker = _tracker(ctx)
    tracker.reset(task)
    return {"tasks": tracker.tasks()}
