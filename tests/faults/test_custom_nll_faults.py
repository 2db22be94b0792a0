"""Fault suite: a CustomLikelihood (or Likelihood subclass) whose nll returns a batch
mean instead of one value per sample is refused by name on every path that calls it.

The capture path sums ``nll(out, y)`` over the whole batch for its output gradients, the
vmap path reads one sample at a time: with a scalar nll the default engine gave a Fisher
``1/N²`` too small while ``engine="vmap"`` was right, without an error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.engine.per_sample import mean_loss_grad

N = 6
PHRASE = r"(?s)nll\(output, target\) returned \(\) for an output of shape \((\d+), 1\).*shape \(\1,\)"


def _setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(N, 3, dtype=torch.float64)
    y = torch.randn(N, 1, dtype=torch.float64)
    return net, x, y


def _mean_nll(f, t):
    return 0.5 * ((f - t) ** 2).sum(-1).mean()


def _sampler(f, g):
    return f + torch.randn(f.shape, generator=g, dtype=f.dtype)


class MeanGaussian(natgrad.Likelihood):
    """A subclass with the default (autograd) output_grad and the same slip."""

    name = "mean_gaussian"

    def nll(self, output, target):
        return _mean_nll(output, target)

    def sample(self, output, generator, k, target=None):
        return torch.stack([_sampler(output, generator) for _ in range(k)])


LIKELIHOODS = {
    "custom": lambda: natgrad.CustomLikelihood(_mean_nll, _sampler, name="sq_mean"),
    "subclass": MeanGaussian,
}
PATHS = {
    "auto": lambda m, b, lik: natgrad.estimate_fisher(m, b, lik),
    "vmap": lambda m, b, lik: natgrad.estimate_fisher(m, b, lik, engine="vmap"),
    "mc": lambda m, b, lik: natgrad.estimate_fisher(m, b[0], lik, labels="mc"),
    "kfac": lambda m, b, lik: natgrad.estimate_curvature(m, b, lik, kind="kfac"),
    "per_sample_grads": lambda m, b, lik: natgrad.per_sample_grads(m, b, lik),
    "loss_grad": lambda m, b, lik: mean_loss_grad(m, b, lik, ["2.weight"]),
}


@pytest.mark.parametrize("path", [p for p in PATHS if p != "vmap"])
@pytest.mark.parametrize("kind", LIKELIHOODS)
def test_scalar_nll_is_refused(kind, path):
    net, x, y = _setup()
    lik = LIKELIHOODS[kind]()
    with pytest.raises(ValueError, match=PHRASE):
        PATHS[path](net, (x, y), lik)


@pytest.mark.parametrize("kind", LIKELIHOODS)
def test_scalar_nll_read_one_sample_at_a_time_is_right(kind):
    # the vmap engine calls nll on one sample, where a batch mean is that sample's loss:
    # accepted, and equal to the built-in gaussian's Fisher
    net, x, y = _setup()
    got = PATHS["vmap"](net, (x, y), LIKELIHOODS[kind]())
    ref = natgrad.estimate_fisher(net, (x, y), "gaussian")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("layout", ["keepdim", "squeezed"])
def test_one_value_per_sample_in_another_layout_is_accepted(layout):
    # an nll returning (N, 1) (a keepdim sum) or a scalar for one sample (a squeeze) holds
    # one value per sample; both were refused as "a batch mean" (found by review).
    # Reference: the same model under the built-in gaussian likelihood.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64)
    if layout == "keepdim":
        lik = natgrad.CustomLikelihood(lambda f, t: 0.5 * ((f - t) ** 2).sum(-1, keepdim=True))
    else:
        lik = natgrad.CustomLikelihood(lambda f, t: (0.5 * (f - t) ** 2).squeeze())
    ref = natgrad.estimate_fisher(model, (x, y), "gaussian")
    for engine in ("auto", "vmap"):
        for xb, yb in ((x, y), (x[:1], y[:1])):
            got = natgrad.estimate_fisher(model, (xb, yb), lik, engine=engine)
            want = ref if len(xb) == 6 else natgrad.estimate_fisher(model, (xb, yb), "gaussian")
            for k in want:
                torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-14)
