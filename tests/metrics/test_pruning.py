"""The metrics of natgrad/metrics/pruning.py: importance, masks, overlap, merging."""

from __future__ import annotations

import torch

from natgrad import (
    DiagonalFisher,
    estimate_fisher,
    fisher_importance,
    fisher_pruning_masks,
    fisher_weighted_merge,
    mask_overlap,
)
from natgrad.metrics import MetricContext, SignatureType, registry
from tests.conftest import mlp
from tests.reference import assert_close_dict, random_diag_fisher


def test_pruning_metrics(mlp_case):
    model, x, y = mlp_case
    for name, sig in [
        ("fisher_importance", SignatureType.FISHER_BASED),
        ("fisher_pruning_masks", SignatureType.FISHER_BASED),
        ("mask_overlap", SignatureType.PREPROCESSED),
    ]:
        assert registry.describe(name)["signature"] == sig.value
    F = DiagonalFisher(random_diag_fisher(model), 9)
    ctx = MetricContext(models=[model], fisher={"general": F}, tasks=["general"])
    imp = registry.compute_with_context("fisher_importance", ctx)
    assert_close_dict(imp, fisher_importance(F, model), rtol=0, atol=0)
    masks = registry.compute_with_context("fisher_pruning_masks", ctx)  # default sparsity 0.5
    assert sum(int((~m).sum()) for m in masks.values()) == int(0.5 * (35 + 28) + 0.5)
    ctx.options["fisher_pruning_masks"] = {"threshold": 1e-2, "scope": "layer"}
    thr = registry.compute_with_context("fisher_pruning_masks", ctx)
    expected = fisher_pruning_masks(fisher_importance(F, model), threshold=1e-2, scope="layer")
    assert all(torch.equal(thr[k], expected[k]) for k in expected)
    # estimated from models[0] and the batch when no Fisher is given
    est = MetricContext(models=[model], batches=[(x, y)])
    imp2 = registry.compute_with_context("fisher_importance", est, normalize=False)
    assert_close_dict(
        imp2, fisher_importance(estimate_fisher(model, (x, y)), model, normalize=False)
    )
    ov = registry.compute_with_context("mask_overlap", MetricContext(masks=[masks, thr]))
    assert ov.total.jaccard == mask_overlap(masks, thr).total.jaccard


def test_merge_metric(mlp_case):
    model, x, y = mlp_case
    torch.manual_seed(3)
    other = mlp().double()
    assert registry.describe("fisher_weighted_merge")["signature"] == SignatureType.TWO_MODELS.value
    # no Fishers in the context: model i's Fisher on batch i
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    ctx = MetricContext(models=[model, other], batches=batches)
    merged = registry.compute_with_context("fisher_weighted_merge", ctx, floor=0.0)
    fishers = [estimate_fisher(model, batches[0]), estimate_fisher(other, batches[1])]
    ref = fisher_weighted_merge([model, other], fishers, floor=0.0)
    assert_close_dict(dict(merged.named_parameters()), dict(ref.named_parameters()), rtol=0, atol=0)
    assert ctx.fisher == {}  # model-i Fishers are not cached as models[0]'s
    # given Fishers are used as they are
    given = [
        DiagonalFisher({"0.weight": random_diag_fisher(m, seed)["0.weight"]}, 1)
        for seed, m in enumerate((model, other))
    ]
    ctx = MetricContext(
        models=[model, other], fisher={"a": given[0], "b": given[1]}, tasks=["a", "b"]
    )
    merged = registry.compute_with_context("fisher_weighted_merge", ctx)
    ref = fisher_weighted_merge([model, other], given)
    assert_close_dict(dict(merged.named_parameters()), dict(ref.named_parameters()), rtol=0, atol=0)
