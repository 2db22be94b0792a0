"""Models with one output per sample returned as ``(N,)`` (a squeezed regression or binary
head) under ``gaussian`` and ``bernoulli``: every path reads them as ``(N, 1)``.

The empirical Fisher accepted them while the exact Fisher (Bernoulli's factor columns),
K-FAC with exact labels, and the loss gradient (EWC, damage, natural-gradient norms)
raised a raw IndexError. References: one float64 backward per sample (and closed-form
label expectation), or the same model returning ``(N, 1)``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.engine.per_sample import mean_loss_grad
from natgrad.optim.scale import natural_gradient_norms
from tests.reference import assert_close_dict, fisher_from_grads, loop_grads_by

N = 6


class Head(nn.Module):
    def __init__(self, squeeze: bool) -> None:
        super().__init__()
        self.squeeze = squeeze
        self.l1 = nn.Linear(3, 4)
        self.l2 = nn.Linear(4, 1)

    def forward(self, x):
        out = self.l2(torch.tanh(self.l1(x)))
        return out.squeeze(-1) if self.squeeze else out


def _setup(lik):
    torch.manual_seed(0)
    vec = Head(True).double()
    col = Head(False).double()
    col.load_state_dict(vec.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, generator=g, dtype=torch.float64)
    y = (torch.randn(N, generator=g, dtype=torch.float64) if lik == "gaussian"
         else torch.randint(0, 2, (N,), generator=g).double())
    return vec, col, x, y


def _nll(lik, f, y):
    if lik == "gaussian":
        return 0.5 * ((f - y) ** 2).sum()
    return F.binary_cross_entropy_with_logits(f, y, reduction="sum")


def _brute(model, lik, x, y, labels):
    """Empirical: (1/N) Σ g_n²; exact: (1/N) Σ_n λ_n (∇θ f_n)², λ = 1 or p(1 - p)."""
    if labels == "empirical":
        return fisher_from_grads(loop_grads_by(model, lambda i: _nll(lik, model(x[i : i + 1]), y[i : i + 1]), N))
    jac = loop_grads_by(model, lambda i: model(x[i : i + 1]).sum(), N)
    with torch.no_grad():
        p = model(x).sigmoid()
    lam = torch.ones(N, dtype=torch.float64) if lik == "gaussian" else p * (1 - p)
    return {k: (lam.view(-1, *[1] * (j.dim() - 1)) * j**2).mean(0) for k, j in jac.items()}


@pytest.mark.parametrize("engine", ["auto", "vmap"])
@pytest.mark.parametrize("labels", ["empirical", "exact"])
@pytest.mark.parametrize("lik", ["gaussian", "bernoulli"])
def test_fisher_of_vector_outputs(lik, labels, engine):
    vec, _, x, y = _setup(lik)
    got = natgrad.estimate_fisher(vec, (x, y), lik, labels=labels, engine=engine)
    assert_close_dict(dict(got), _brute(vec, lik, x, y, labels), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("lik", ["gaussian", "bernoulli"])
def test_kfac_and_mc_of_vector_outputs_are_the_column_models(lik):
    vec, col, x, y = _setup(lik)
    for labels in ("exact", "mc"):
        a = natgrad.estimate_curvature(vec, (x, y), lik, kind="kfac", labels=labels)
        b = natgrad.estimate_curvature(col, (x, y.view(-1, 1)), lik, kind="kfac", labels=labels)
        for k, blk in a.blocks.items():
            torch.testing.assert_close(blk.A, b.blocks[k].A, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(blk.G, b.blocks[k].G, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("lik", ["gaussian", "bernoulli"])
def test_loss_gradient_of_vector_outputs(lik):
    vec, col, x, y = _setup(lik)
    names = [k for k, _ in vec.named_parameters()]
    got, n = mean_loss_grad(vec, (x, y), lik, names)
    ref = torch.autograd.grad(_nll(lik, vec(x), y) / N, list(vec.parameters()))
    assert n == N
    assert_close_dict(got, dict(zip(names, ref, strict=True)), rtol=1e-12, atol=1e-15)
    fisher = natgrad.estimate_fisher(vec, (x, y), lik)
    a = natural_gradient_norms(vec, (x, y), fisher, lik)
    b = natural_gradient_norms(col, (x, y.view(-1, 1)), fisher, lik)
    assert a == b
    d1 = natgrad.fisher_weighted_damage(vec, (x, y), (x, y), lik, fisher_a=fisher)
    d2 = natgrad.fisher_weighted_damage(col, (x, y.view(-1, 1)), (x, y.view(-1, 1)), lik,
                                        fisher_a=fisher)
    assert d1.damage == pytest.approx(d2.damage, rel=1e-12)
    assert d1.first_order == pytest.approx(d2.first_order, rel=1e-12)
