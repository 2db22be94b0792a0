"""MetricContext: its Fisher cache follows every change of the model and batch, and its
task names never give one Fisher to two tasks (both found by review)."""

from __future__ import annotations

import pytest
import torch

import natgrad
from natgrad.metrics import MetricContext


def _case():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3).double()
    x = torch.randn(8, 5, dtype=torch.float64)
    return model, (x, torch.randint(0, 3, (8,)))


@pytest.mark.parametrize("change", ["data_mul", "vector_to_parameters", "batch_data", "cast"])
def test_cached_fisher_follows_changes_the_version_counter_misses(change):
    model, batch = _case()
    ctx = MetricContext(models=[model], batches=[batch])
    first = ctx.batch_fisher(0)
    torch.testing.assert_close(first["weight"], natgrad.estimate_fisher(model, batch)["weight"])
    if change == "data_mul":
        for p in model.parameters():
            p.data.mul_(3.0)
    elif change == "vector_to_parameters":
        torch.nn.utils.vector_to_parameters(
            torch.zeros(18, dtype=torch.float64), model.parameters())
    elif change == "batch_data":
        batch[0].data.mul_(0.1)
    else:
        model.float()
        ctx.batches = [(batch[0].float(), batch[1])]
        batch = ctx.batches[0]
    got = ctx.batch_fisher(0)
    want = natgrad.estimate_fisher(model, batch)
    torch.testing.assert_close(got["weight"], want["weight"])
    if change == "cast":
        assert got["weight"].dtype == torch.float32  # was the float64 Fisher
    else:
        assert not torch.allclose(got["weight"], first["weight"])


def test_task_names_place_default_style_names_at_their_position_and_never_twice():
    model, a = _case()
    b = (a[0] + 1.0, a[1])
    fb = natgrad.estimate_fisher(model, b)
    ctx = MetricContext(models=[model], batches=[a, b], fisher={"task_1": fb})
    assert ctx.task_names(2) == ["task_0", "task_1"]
    # task 0's Fisher is estimated on batches[0], not taken from task_1's
    torch.testing.assert_close(ctx.get_fisher(0)["weight"],
                               natgrad.estimate_fisher(model, a)["weight"])
    assert ctx.get_fisher(1) is fb
    ctx = MetricContext(models=[model], batches=[a, b], fisher={"B": fb, "task_0": fb})
    names = ctx.task_names(3)
    assert names == ["task_0", "B", "task_2"] and len(set(names)) == 3


def test_cache_keeps_only_the_recent_estimates():
    """A context reused over a training loop kept every step's Fisher (review); it keeps
    the most recently used ones, and an estimate still equals a fresh direct call."""
    keep = 8  # the documented cache size (MetricContext.batch_fisher)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    ctx = MetricContext(models=[model], batches=[(x, y)])
    for _ in range(3 * keep):
        with torch.no_grad():
            model[0].weight.add_(0.01)
        got = ctx.batch_fisher(0)
    assert len(ctx._cache) == keep
    ref = natgrad.estimate_fisher(model, (x, y))
    assert all(torch.equal(got[k], ref[k]) for k in ref)
