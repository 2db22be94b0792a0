"""Pruning and merging metrics: Fisher importance, pruning masks, mask overlap, merge."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from natgrad.curvature.diagonal import DiagonalFisher
from natgrad.merging import fisher_weighted_merge
from natgrad.metrics.context import MetricContext, SignatureType
from natgrad.metrics.registry import registry
from natgrad.pruning.masks import MaskOverlap, mask_overlap
from natgrad.pruning.prune import fisher_importance, fisher_pruning_masks


@registry.register(
    "fisher_importance",
    SignatureType.FISHER_BASED,
    needs=("fisher", "model"),
    task_option="task",
    description="OBD saliency ½ F_i θ_i² of models[0] with the task's Fisher (option task=, "
    "normalize=True: sums to one).",
)
def _fisher_importance(
    ctx: MetricContext, task: int | str = 0, normalize: bool = True
) -> dict[str, torch.Tensor]:
    fisher = ctx.get_fisher(ctx.task_index(task))
    return fisher_importance(fisher, ctx.models[0], normalize=normalize)


@registry.register(
    "fisher_pruning_masks",
    SignatureType.FISHER_BASED,
    needs=("fisher", "model"),
    task_option="task",
    description="Keep-masks of models[0] from the task's Fisher importance (options as "
    "natgrad.fisher_pruning_masks; sparsity=0.5 when neither sparsity nor threshold is given).",
)
def _fisher_pruning_masks(
    ctx: MetricContext, task: int | str = 0, **options: Any
) -> dict[str, torch.Tensor]:
    if options.get("sparsity") is None and options.get("threshold") is None:
        options["sparsity"] = 0.5
        options.pop("threshold", None)
    fisher = ctx.get_fisher(ctx.task_index(task))
    return fisher_pruning_masks(fisher_importance(fisher, ctx.models[0]), **options)


@registry.register(
    "mask_overlap",
    SignatureType.PREPROCESSED,
    needs=("two_masks",),
    description="Jaccard index and overlap coefficient of the kept entries of context.masks[0] "
    "and context.masks[1], total and per tensor.",
)
def _mask_overlap(ctx: MetricContext) -> MaskOverlap:
    masks = ctx.masks
    assert masks is not None  # the registry runs this metric only with two mask sets
    return mask_overlap(masks[0], masks[1])


# It compares boolean masks and never touches a Fisher.
registry.alias("fisher_overlap", "mask_overlap")


def _merge_fisher(ctx: MetricContext, i: int) -> DiagonalFisher:
    """Task i's given or tracked Fisher; else models[i]'s Fisher on batches[i] (cached
    under models[i], so never confused with models[0]'s estimate on that batch)."""
    given = ctx.given_fisher(i)
    return given if given is not None else ctx.batch_fisher(i, model_index=i)


@registry.register(
    "fisher_weighted_merge",
    SignatureType.TWO_MODELS,
    needs=("two_models", "two_fishers"),
    description="Fisher-weighted average of models[0] and models[1] (a new model). Fisher i is "
    "task i's given/tracked Fisher, else models[i]'s Fisher on batches[i].",
)
def _fisher_weighted_merge(ctx: MetricContext, **options: Any) -> nn.Module:
    fishers = [_merge_fisher(ctx, i) for i in range(2)]
    return fisher_weighted_merge(ctx.models[:2], fishers, **options)
