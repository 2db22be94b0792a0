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


# -- the pruning metrics' needs, for the task they read ------------------------------------


def _fisher_of(model, seed):
    g = torch.Generator().manual_seed(seed)
    values = {k: torch.rand(p.shape, generator=g, dtype=p.dtype) for k, p in model.named_parameters()}
    return natgrad.DiagonalFisher(values, n_samples=4)


PRUNING = {"fisher_importance": {"task": "B"}, "fisher_pruning_masks": {"task": 1}}


def test_pruning_metrics_run_on_the_task_they_name():
    """A Fisher for task B alone, the metrics asked for B: they were skipped ('lacks
    fisher', checked for task 0)."""
    model, _, _ = _tiny()
    fb = _fisher_of(model, 1)
    ctx = MetricContext([model], fisher={"B": fb}, tasks=["A", "B"], options=PRUNING)
    out = registry.compute_all(ctx, names=list(PRUNING))
    assert out.skipped == {} and out.failed == {}, (out.skipped, out.failed)
    saliency = {k: 0.5 * fb[k] * p.detach() ** 2 for k, p in model.named_parameters()}
    total = sum(v.sum() for v in saliency.values())
    for k, v in out.results["fisher_importance"].items():
        torch.testing.assert_close(v, saliency[k] / total, rtol=1e-12, atol=0.0)
    # the masks of task B's Fisher (the direct call; the metric's default sparsity 0.5)
    expected = natgrad.fisher_pruning_masks(natgrad.fisher_importance(fb, model), sparsity=0.5)
    got = out.results["fisher_pruning_masks"]
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)


def test_pruning_metrics_without_their_tasks_fisher_are_skipped():
    """A Fisher for task A alone, the metrics asked for B: they ran and failed
    (MissingContextError); now skipped, naming what is missing."""
    model, _, _ = _tiny()
    ctx = MetricContext([model], fisher={"A": _fisher_of(model, 1)}, tasks=["A", "B"],
                        options=PRUNING)
    out = registry.compute_all(ctx, names=list(PRUNING))
    assert out.failed == {}, out.failed
    assert set(out.skipped) == set(PRUNING)
    assert all(r.startswith("lacks fisher: a Fisher for the metric's task") for r in out.skipped.values())
    with pytest.raises(natgrad.metrics.MissingContextError, match="lacks fisher"):
        registry.compute_with_context("fisher_importance", ctx)


def test_pruning_metric_for_an_unknown_task_fails_by_name():
    model, _, _ = _tiny()
    ctx = MetricContext([model], fisher={"A": _fisher_of(model, 1)}, tasks=["A", "B"],
                        options={"fisher_importance": {"task": "Z"}})
    out = registry.compute_all(ctx, names=["fisher_importance"])
    assert out.failed["fisher_importance"].startswith("ValueError: Unknown task 'Z'")
