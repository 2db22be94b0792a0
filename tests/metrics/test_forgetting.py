"""The metrics of natgrad/metrics/forgetting.py: damage, asymmetry, compare_task_fisher."""

from __future__ import annotations

import pytest
import torch

from natgrad import (
    DiagonalFisher,
    compare_task_fisher,
    estimate_fisher,
    fisher_damage_asymmetry,
    fisher_weighted_damage,
)
from natgrad.metrics import MetricContext, registry


def test_damage_metrics(mlp_case):
    model, x, y = mlp_case
    a, b = (x[:4], y[:4]), (x[4:], y[4:])
    assert registry.describe("fisher_weighted_damage")["signature"] == "dual_batch"
    assert registry.describe("fisher_damage_asymmetry")["signature"] == "dual_batch"
    ctx = MetricContext(models=[model], batches=[a, b], tasks=["math", "general"])
    r = registry.compute_with_context("fisher_weighted_damage", ctx, lr=0.1)
    assert r.damage == pytest.approx(fisher_weighted_damage(model, a, b, lr=0.1).damage)
    s = registry.compute_with_context("fisher_damage_asymmetry", ctx)
    assert s.names == ("math", "general")
    assert s.log_ratio == pytest.approx(fisher_damage_asymmetry(model, a, b).log_ratio)
    F = estimate_fisher(model, a, labels="exact")
    ctx2 = MetricContext(models=[model], batches=[a, b], fisher={"task_0": F})
    r2 = registry.compute_with_context("fisher_weighted_damage", ctx2)
    assert r2.labels == "exact"
    # the context estimates each task's Fisher once and caches it for the other metrics
    assert ctx.fisher == {}  # cached apart from the user's Fishers
    cached = [ctx.batch_fisher(0), ctx.batch_fisher(1)]
    registry.compute_with_context("fisher_weighted_damage", ctx, lr=0.1)
    assert ctx.batch_fisher(0) is cached[0] and ctx.batch_fisher(1) is cached[1]
    # options that change the estimate: the metric estimates its own, the cache stays
    ctx3 = MetricContext(models=[model], batches=[a, b])
    r3 = registry.compute_with_context("fisher_weighted_damage", ctx3, labels="exact")
    assert r3.labels == "exact" and ctx3.fisher == {}
    assert r3.damage == pytest.approx(fisher_weighted_damage(model, a, b, fisher_a=F).damage)


def test_compare_task_fisher_metric():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    a = (torch.randn(12, 4), torch.randint(0, 3, (12,)))
    b = (torch.randn(12, 4) + 2, torch.randint(0, 3, (12,)))
    F1, F2 = estimate_fisher(model, a), estimate_fisher(model, b)
    assert isinstance(F1, DiagonalFisher)
    direct = compare_task_fisher(F1, F2, top_k=10)
    assert registry.describe("compare_task_fisher")["signature"] == "fisher_based"
    ctx = MetricContext(fisher={"math": F1, "general": F2}, tasks=["math", "general"])
    via = registry.compute_with_context("compare_task_fisher", ctx, top_k=10)
    assert via.to_dict() == direct.to_dict()
    est = MetricContext(models=[model], batches=[a, b])
    assert registry.compute_with_context("compare_task_fisher", est, top_k=10).to_dict() == (
        direct.to_dict()
    )
