"""laplace-torch as a test-only oracle for the Laplace predictive (where it computes the
same thing; see benchmarks/results/laplace_speed.md for where the definitions differ).

* Diagonal: laplace-torch's diagonal GGN (BackPACK backend) is natgrad's exact-label
  diagonal Fisher for the softmax cross-entropy; both posteriors are ``N F + δ I``.
* Kronecker: on bias-free layers laplace-torch's K-FAC (Curvlinops, type-2 GGN, "expand")
  is natgrad's ``kind="kfac", labels="exact"``; with biases it keeps a separate bias
  block, natgrad a joint ``[W, b]`` block, so only bias-free models are compared.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import natgrad

laplace = pytest.importorskip("laplace")
DataLoader = torch.utils.data.DataLoader
TensorDataset = torch.utils.data.TensorDataset


def _data(d=6, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def _theirs(model, x, y, xt, structure, subset="all", backend=None, delta=0.7):
    la = laplace.Laplace(model, "classification", subset_of_weights=subset,
                         hessian_structure=structure, backend=backend, prior_precision=delta)
    la.fit(DataLoader(TensorDataset(x, y), batch_size=10))
    f_mu, f_var = la._glm_predictive_distribution(xt)
    probs = la(xt, pred_type="glm", link_approx="probit")
    return torch.diagonal(f_var, dim1=-2, dim2=-1), probs


def _ours(model, x, y, xt, kind, subset="all", delta=0.7):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        c = natgrad.estimate_curvature(model, (x, y), kind=kind, labels="exact")
    return natgrad.fisher_uncertainty(model, xt, c, prior_precision=delta, subset=subset)


def test_diagonal_predictive_agrees_with_laplace_torch():
    backpack = pytest.importorskip("laplace.curvature").BackPackGGN
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    x, y = _data()
    xt = _data(seed=1)[0][:7]
    var, probs = _theirs(model, x, y, xt, "diag", backend=backpack)
    r = _ours(model, x, y, xt, "diag")
    torch.testing.assert_close(r.logit_variance, var, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.probs, probs, rtol=0, atol=1e-10)


@pytest.mark.parametrize("subset", ["all", "last_layer"])
def test_kronecker_predictive_agrees_with_laplace_torch_on_bias_free_layers(subset):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(6, 8, bias=False), nn.Tanh(), nn.Linear(8, 5, bias=False), nn.ReLU(),
        nn.Linear(5, 3, bias=False),
    ).double().eval()
    x, y = _data(seed=2)
    xt = _data(seed=3)[0][:7]
    var, probs = _theirs(model, x, y, xt, "kron", subset=subset)
    r = _ours(model, x, y, xt, "kfac", subset=subset)
    torch.testing.assert_close(r.logit_variance, var, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r.probs, probs, rtol=0, atol=1e-10)


def test_full_logit_covariance_agrees_with_laplace_torch():
    """laplace-torch's GLM output covariance is the full ``D x D`` ``J Σ Jᵀ``; natgrad's
    ``logit_covariance`` (``link="mc"``) is the same matrix (diagonal and K-FAC posteriors)."""
    backpack = pytest.importorskip("laplace.curvature").BackPackGGN
    torch.manual_seed(2)
    x, y = _data(seed=4)
    xt = _data(seed=5)[0][:6]
    for kind, structure, backend, bias in (("diag", "diag", backpack, True),
                                           ("kfac", "kron", None, False)):
        model = nn.Sequential(nn.Linear(6, 7, bias=bias), nn.Tanh(),
                              nn.Linear(7, 4, bias=bias)).double().eval()
        la = laplace.Laplace(model, "classification", subset_of_weights="all",
                             hessian_structure=structure, backend=backend, prior_precision=0.5)
        la.fit(DataLoader(TensorDataset(x, y % 4), batch_size=10))
        _, f_var = la._glm_predictive_distribution(xt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            c = natgrad.estimate_curvature(model, (x, y % 4), kind=kind, labels="exact")
        r = natgrad.fisher_uncertainty(model, xt, c, prior_precision=0.5, link="mc", n_samples=4)
        assert (f_var - torch.diag_embed(f_var.diagonal(dim1=1, dim2=2))).abs().max() > 1e-4
        torch.testing.assert_close(r.logit_covariance, f_var, rtol=1e-9, atol=1e-12)


def _cnn() -> nn.Sequential:
    """A small 1-D CNN like ``benchmarks.workloads.Mnist1dCNN`` (two Conv1d, a Linear head;
    a Sequential of modules BackPACK supports, on ``(N, 1, 10)`` inputs)."""
    return nn.Sequential(
        nn.Conv1d(1, 3, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3, 3),
    )


def test_cnn_diagonal_predictive_agrees_with_laplace_torch():
    """Conv1d layers (several positions per sample): the diagonal GGN posterior on all
    weights, logit variances and probit predictive, within 1e-4 (float64: far closer)."""
    backpack = pytest.importorskip("laplace.curvature").BackPackGGN
    torch.manual_seed(3)
    model = _cnn().double().eval()
    x, y = _data(d=10, seed=6)
    x = x.unsqueeze(1)
    xt = _data(d=10, seed=7)[0][:7].unsqueeze(1)
    var, probs = _theirs(model, x, y, xt, "diag", backend=backpack)
    r = _ours(model, x, y, xt, "diag")
    assert var.min() > 1e-3  # the variances are large enough to compare
    torch.testing.assert_close(r.logit_variance, var, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(r.probs, probs, rtol=0, atol=1e-4)
    err = float((r.probs - probs).abs().max())
    assert err < 1e-10, err
