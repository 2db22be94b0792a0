"""The metrics of natgrad/metrics/uncertainty.py: fisher_uncertainty, top_fisher_directions."""

from __future__ import annotations

import torch

from natgrad.metrics import MetricContext, SignatureType, registry
from tests.conftest import mlp
from tests.reference import dense_label_fisher
from tests.test_laplace import jacobian_loop_variance, random_fisher


def test_fisher_uncertainty_metric_uses_context_fisher(mlp_case):
    model, x, y = mlp_case
    spec = registry.describe("fisher_uncertainty")
    assert spec["signature"] == SignatureType.STANDARD.value
    assert set(spec["needs"]) == {"model", "batch", "fisher"}
    fisher = random_fisher(model, n=40)
    ctx = MetricContext(models=[model], batches=[(x, y)], fisher={"task_0": fisher})
    r = registry.compute_with_context("fisher_uncertainty", ctx, prior_precision=0.5)
    ref = jacobian_loop_variance(model, x, fisher, list(fisher), 40, 0.5)
    torch.testing.assert_close(r.logit_variance, ref, rtol=1e-10, atol=1e-12)


def test_fisher_uncertainty_metric_estimates_fisher_when_absent():
    torch.manual_seed(0)
    model = mlp((3, 4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    ctx = MetricContext(models=[model], batches=[(x, y)])
    r = registry.compute_with_context("fisher_uncertainty", ctx)
    fisher = ctx.batch_fisher(0)
    ref = jacobian_loop_variance(model, x, fisher, list(fisher), 6, 1.0)
    torch.testing.assert_close(r.logit_variance, ref, rtol=1e-6, atol=1e-9)


def test_top_fisher_directions_metric(mlp_case):
    model, x, y = mlp_case
    spec = registry.describe("top_fisher_directions")
    assert spec["signature"] == SignatureType.STANDARD.value
    assert set(spec["needs"]) == {"model", "batch"}
    ctx = MetricContext(models=[model], batches=[(x, y)], labels="exact")
    d = registry.compute_with_context("top_fisher_directions", ctx, k=3)
    lam = torch.linalg.eigvalsh(dense_label_fisher(model, x, "categorical")).flip(0)[:3]
    torch.testing.assert_close(d.eigenvalues, lam, rtol=1e-5, atol=0)
    assert d.labels == "exact"
