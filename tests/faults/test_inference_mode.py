"""torch.inference_mode around natgrad's calls, and inputs made under it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from tests.reference import assert_close_dict, fisher_from_grads, loop_grads_by

ENGINES = ("vmap", "auto")


def case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    one = lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])  # noqa: E731
    return model, x, y, loop_grads_by(model, one, 5)


@pytest.mark.parametrize("engine", ENGINES)
def test_estimate_fisher_inside_inference_mode(engine):
    """engine='auto' raised torch's 'Inference tensors do not track version counter'."""
    model, x, y, ref = case()
    with torch.inference_mode():
        got = natgrad.estimate_fisher(model, (x, y), engine=engine)
        grads = natgrad.per_sample_grads(model, (x, y), engine=engine)
        kfac = natgrad.estimate_curvature(model, (x, y), kind="kfac")
    assert_close_dict(dict(got), fisher_from_grads(ref), rtol=1e-10, atol=1e-12)
    assert_close_dict(grads, ref, rtol=1e-10, atol=1e-12)
    assert not any(v.is_inference() for v in got.values())
    assert kfac.n_samples == 5


@pytest.mark.parametrize("engine", ENGINES)
def test_inputs_made_under_inference_mode(engine):
    """Cached evaluation features are inference tensors, which cannot be saved for
    backward: natgrad copies them (the error blamed the model's forward)."""
    model, x, y, ref = case()
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
    got = natgrad.estimate_fisher(model, (xi, yi), engine=engine)
    assert_close_dict(dict(got), fisher_from_grads(ref), rtol=1e-10, atol=1e-12)
    assert xi.is_inference()  # the caller's tensor is left as it is


def test_other_entry_points_refuse_inference_mode_by_name():
    model, x, y, _ = case()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode\(False\)"):
        natgrad.top_fisher_directions(model, (x, y), k=2, method="lanczos")


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_laplace_inside_inference_mode(kind):
    """fisher_uncertainty and optimize_prior_precision in an evaluation loop under
    torch.inference_mode() (Lightning's default), on inputs made there: the same
    predictive and prior as outside (they were refused by name; review)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    curv = natgrad.estimate_curvature(model, (x, y), kind=kind, labels="exact")
    ref = natgrad.fisher_uncertainty(model, x, curv)
    grid = [0.01, 0.1, 1.0, 10.0, 100.0]
    ref_delta = natgrad.optimize_prior_precision(model, curv, val_data=(x, y), grid=grid)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        got = natgrad.fisher_uncertainty(model, xi, curv)
        delta = natgrad.optimize_prior_precision(model, curv, val_data=(xi, yi), grid=grid)
    assert torch.equal(got.logit_variance, ref.logit_variance) and delta == ref_delta


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_ewc_consolidated_inside_inference_mode_trains_outside(kind):
    """An EWC built in an evaluation loop under torch.inference_mode() (the end of a task
    in a Lightning validation step): its copies were inference tensors and the next task's
    penalty().backward() raised (review). The penalty and its gradient equal an EWC built
    outside."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    with torch.inference_mode():
        curv = natgrad.estimate_curvature(model, (x, y), kind=kind)
        inside = natgrad.EWC(model, curv, lam=3.0)
    ref = natgrad.EWC(model, natgrad.estimate_curvature(model, (x, y), kind=kind), lam=3.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    grads = []
    for ewc in (inside, ref):
        model.zero_grad()
        value = ewc.penalty()
        value.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert float(inside.penalty()) == float(ref.penalty()) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
