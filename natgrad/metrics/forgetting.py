"""Forgetting metrics: Fisher-weighted damage, its asymmetry, and task Fisher comparison."""

from __future__ import annotations

from typing import Any

from natgrad.continual.compare import FisherComparison, compare_task_fisher
from natgrad.continual.damage import (
    AsymmetryReport,
    DamageReport,
    fisher_damage_asymmetry,
    fisher_weighted_damage,
)
from natgrad.curvature.diagonal import DiagonalFisher
from natgrad.metrics.context import MetricContext, SignatureType
from natgrad.metrics.registry import registry

# options that change how a Fisher is estimated: with any of them the context's Fisher
# (estimated with its own settings) does not fit, and the metric estimates its own
_ESTIMATE_OPTIONS = ("labels", "params", "mc_samples", "output_fn")


def _context_fisher(
    ctx: MetricContext, i: int, options: dict[str, Any]
) -> DiagonalFisher | None:
    """Task i's Fisher from the user (given or tracked), else the context's cached estimate
    with its own settings; None when the metric's own estimate options apply (it then
    estimates with them, as its direct call does)."""
    given = ctx.given_fisher(i)
    if given is not None:
        return given
    if any(k in options for k in _ESTIMATE_OPTIONS):
        return None
    return ctx.batch_fisher(i)


@registry.register(
    "fisher_weighted_damage",
    SignatureType.DUAL_BATCH,
    needs=("model", "two_batches"),
    description=(
        "Expected second-order increase of task A's loss (batches[0]) after one SGD step on "
        "task B (batches[1]): 0.5 * sum F_A (lr grad L_B)^2, scale-free form, first-order term."
    ),
)
def _fisher_weighted_damage(ctx: MetricContext, **options: Any) -> DamageReport:
    if "fisher_a" not in options:
        options["fisher_a"] = _context_fisher(ctx, 0, options)
    options.setdefault("labels", ctx.labels)
    return fisher_weighted_damage(
        ctx.models[0], ctx.batches[0], ctx.batches[1], ctx.likelihood, **options
    )


@registry.register(
    "fisher_damage_asymmetry",
    SignatureType.DUAL_BATCH,
    needs=("model", "two_batches"),
    description=(
        "Damage in both directions between the tasks of batches[0] and batches[1], their "
        "ratio and log-ratio, and which task is more fragile."
    ),
)
def _fisher_damage_asymmetry(ctx: MetricContext, **options: Any) -> AsymmetryReport:
    for i, key in enumerate(("fisher_a", "fisher_b")):
        if key not in options:
            options[key] = _context_fisher(ctx, i, options)
    options.setdefault("labels", ctx.labels)
    options.setdefault("names", tuple(ctx.task_names(2)))
    return fisher_damage_asymmetry(
        ctx.models[0], ctx.batches[0], ctx.batches[1], ctx.likelihood, **options
    )


@registry.register(
    "compare_task_fisher",
    SignatureType.FISHER_BASED,
    needs=("two_fishers",),
    description=(
        "Cosine similarity, Task2Vec distance, Frechet overlap and top-k Jaccard of two "
        "tasks' diagonal Fishers, globally and per layer."
    ),
)
def _compare_task_fisher(ctx: MetricContext, **options: Any) -> FisherComparison:
    return compare_task_fisher(ctx.get_fisher(0), ctx.get_fisher(1), **options)
