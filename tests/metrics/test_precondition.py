"""The metric of natgrad/metrics/precondition.py: natural_gradient_norms."""

from __future__ import annotations

import pytest
import torch

from natgrad.metrics import MetricContext, registry
from tests.reference import ce_sum, loop_grads


def test_natural_gradient_norms_metric_matches_manual_norms(mlp_case):
    model, x, y = mlp_case
    pg = loop_grads(model, ce_sum, x, y)
    g = {k: v.mean(0) for k, v in pg.items()}
    Fd = {k: (v**2).mean(0).float() for k, v in pg.items()}
    ctx = MetricContext(models=[model], batches=[(x, y)], fisher={"task_0": Fd})
    r = registry.compute_with_context("natural_gradient_norms", ctx, damping=0.2)
    assert registry.describe("natural_gradient_norms")["signature"] == "standard"
    for layer in ("0", "2"):
        gn = torch.cat([g[f"{layer}.{s}"].reshape(-1) for s in ("weight", "bias")]).norm()
        dn = torch.cat(
            [
                (g[f"{layer}.{s}"] / (Fd[f"{layer}.{s}"] + 0.2)).reshape(-1)
                for s in ("weight", "bias")
            ]
        ).norm()
        assert r.layers[layer]["grad_norm"] == pytest.approx(float(gn), rel=1e-6)
        assert r.layers[layer]["natgrad_norm"] == pytest.approx(float(dn), rel=1e-5)
        assert r.layers[layer]["ratio"] == pytest.approx(float(dn / gn), rel=1e-5)
    total = torch.cat([v.reshape(-1) for v in g.values()]).norm()
    assert r.total_grad_norm == pytest.approx(float(total), rel=1e-6)
    assert r.to_dict()["damping"] == 0.2
    with pytest.raises(ValueError, match="batch has none"):
        registry.compute_with_context(
            "natural_gradient_norms", MetricContext([model], [x], fisher={"task_0": Fd})
        )
