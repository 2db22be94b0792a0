"""The metric registry on small contexts: documented behaviour, never a recorded failure
for a default option (``natgrad/metrics``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import natgrad
from natgrad.metrics import MetricContext, registry
from tests.reference import dense_fisher, loop_grads


def _tiny():
    """Linear(3, 2) in float64 (P = 8) on N = 4 samples: at most 4 nonzero eigenvalues."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    return model, x, y


def _top_eigenvalues(model, x, y, k):
    def ce(out, t):
        return F.cross_entropy(out, t, reduction="sum")

    grads = loop_grads(model, ce, x, y)
    return torch.linalg.eigvalsh(dense_fisher(grads, list(grads))).flip(0)[:k]


def test_default_k_is_lowered_to_the_rank_bound_on_a_small_context():
    """k=10 by default exceeded min(R, P) = 4 and compute_all recorded a failure."""
    model, x, y = _tiny()
    out = registry.compute_all(MetricContext([model], [(x, y)]))
    assert "top_fisher_directions" not in out.failed, out.failed
    got = out.results["top_fisher_directions"].eigenvalues
    torch.testing.assert_close(got, _top_eigenvalues(model, x, y, 4), rtol=1e-10, atol=1e-12)


def test_an_explicit_k_above_the_rank_bound_still_raises():
    model, x, y = _tiny()
    ctx = MetricContext([model], [(x, y)], options={"top_fisher_directions": {"k": 10}})
    out = registry.compute_all(ctx, names=["top_fisher_directions"])
    assert "exceeds the rank bound" in out.failed["top_fisher_directions"]


@pytest.mark.parametrize("method", ["gram", "lanczos"])
def test_clip_k_gives_the_eigenpairs_the_fisher_has(method):
    model, x, y = _tiny()
    d = natgrad.top_fisher_directions(model, (x, y), k=10, method=method, clip_k=True)
    assert len(d.eigenvectors) == 4
    torch.testing.assert_close(d.eigenvalues, _top_eigenvalues(model, x, y, 4),
                               rtol=1e-8, atol=1e-10)
