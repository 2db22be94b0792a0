"""Forgetting metrics: Fisher-weighted damage, its asymmetry, and task Fisher comparison."""

from __future__ import annotations

from natgrad.compare import compare_task_fisher
from natgrad.damage import fisher_damage_asymmetry, fisher_weighted_damage
from natgrad.metrics.context import MetricContext, SignatureType
from natgrad.metrics.registry import registry


@registry.register(
    "fisher_weighted_damage",
    SignatureType.DUAL_BATCH,
    needs=("model", "two_batches"),
    description=(
        "Expected second-order increase of task A's loss (batches[0]) after one SGD step on "
        "task B (batches[1]): 0.5 * sum F_A (lr grad L_B)^2, scale-free form, first-order term."
    ),
)
def _fisher_weighted_damage(ctx: MetricContext, **options):
    options.setdefault("labels", ctx.labels)
    task_a = ctx.task_names(2)[0]
    if "fisher_a" not in options and task_a in ctx.fisher:
        options["fisher_a"] = ctx.fisher[task_a]
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
def _fisher_damage_asymmetry(ctx: MetricContext, **options):
    options.setdefault("labels", ctx.labels)
    names = ctx.task_names(2)
    options.setdefault("names", tuple(names))
    for key, task in (("fisher_math", names[0]), ("fisher_general", names[1])):
        if key not in options and task in ctx.fisher:
            options[key] = ctx.fisher[task]
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
def _compare_task_fisher(ctx: MetricContext, **options):
    return compare_task_fisher(ctx.get_fisher(0), ctx.get_fisher(1), **options)
