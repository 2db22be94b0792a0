"""Laplace with ``likelihood="token_categorical"`` against a dense float64 posterior.

The reference: per-token Jacobians ``J_nt`` (``C x P``) by one backward per sample and
output, the exact Fisher by a brute-force loop over samples and kept tokens,
``F = (1/N) Σ_n Σ_t J_ntᵀ (diag p_nt - p_nt p_ntᵀ) J_nt`` (``N`` counts sequences), the
explicit posterior ``Σ = (N F + δ I)⁻¹`` (``P x P``), and per token the Gaussian logits
``N(f_t, J_t Σ J_tᵀ)`` pushed through the probit or MC link.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import natgrad
from tests.reference import dense_from_mv, output_jacobian

T, C, V = 4, 3, 6
LAST = ["head.weight", "head.bias"]


class Seq(nn.Module):
    """Embedding, a causal convolution over the tokens, and a per-token linear head: each
    token's logits depend on the previous token too."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 3)
        self.conv = nn.Conv1d(3, 4, 2, padding=1)
        self.head = nn.Linear(4, C)

    def forward(self, x):
        h = self.emb(x).transpose(1, 2)
        h = torch.tanh(self.conv(h)[..., : x.shape[1]]).transpose(1, 2)
        return self.head(h)


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return Seq().to(dtype).eval()


def _data(seed, n=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (n, T), generator=g)
    y = torch.randint(0, C, (n, T), generator=g)
    y[0, 1] = y[n - 1, 0] = -100  # ignored tokens
    return x, y


def _names(model):
    return [k for k, _ in model.named_parameters()]


def _jac(model, x, names):
    """``(N, T, C, P)``: every token's logit Jacobian."""
    return output_jacobian(model, x, names).reshape(len(x), T, C, -1).double()


def _dense_fisher(model, x, y, names):
    """The exact token Fisher by a loop over sequences and kept tokens (float64)."""
    J = _jac(model, x, names)
    p = model(x).detach().double().softmax(-1)
    F = torch.zeros(J.shape[-1], J.shape[-1], dtype=torch.float64)
    for n in range(len(x)):
        for t in range(T):
            if y[n, t] == -100:
                continue
            H = torch.diag(p[n, t]) - torch.outer(p[n, t], p[n, t])
            F += J[n, t].T @ H @ J[n, t]
    return F / len(x)


def _idx(model, chosen):
    out, i = [], 0
    for k, p in model.named_parameters():
        if k in chosen:
            out.append(torch.arange(i, i + p.numel()))
        i += p.numel()
    return torch.cat(out)


def _estimate(model, kind, params=None):
    x, y = _data(1)
    return natgrad.estimate_curvature(model, (x, y), kind=kind, likelihood="token_categorical",
                                      labels="exact", params=params)


def _reference_matrix(model, kind, curv, subset):
    """The curvature's ``P x P`` matrix over the chosen parameters, checked against the
    brute-force Fisher where the kind is exact (diag: its diagonal; lowrank: all of it)."""
    x, y = _data(1)
    names = _names(model)
    dense = _dense_fisher(model, x, y, names)
    chosen = names if subset == "all" else LAST
    ii = _idx(model, chosen)
    if kind == "diag":
        mine = torch.diag(torch.cat([curv[k].double().reshape(-1) for k in names]))
        torch.testing.assert_close(mine.diagonal(), dense.diagonal(), rtol=1e-5, atol=1e-8)
        return torch.diag(dense.diagonal())[ii][:, ii], chosen
    if kind == "lowrank":  # exact: the brute-force Fisher itself (of the chosen block)
        shapes = {k: p.shape for k, p in model.named_parameters() if k in curv.names()}
        torch.testing.assert_close(dense_from_mv(curv, shapes), dense[ii][:, ii],
                                   rtol=1e-5, atol=1e-8)
        return dense[ii][:, ii], chosen
    shapes = {k: p.shape for k, p in model.named_parameters()}
    return dense_from_mv(curv, shapes)[ii][:, ii], chosen  # K-FAC: its own matrix


def _sqrt_psd(c):
    lam, U = torch.linalg.eigh(c)
    return (U * lam.clamp_min(0).sqrt().unsqueeze(-2)) @ U.mT


@pytest.mark.parametrize("engine", ["auto", "vmap"])
@pytest.mark.parametrize("subset", ["all", "last_layer"])
@pytest.mark.parametrize("kind", ["diag", "kfac", "lowrank"])
def test_token_predictive_matches_the_dense_posterior(kind, subset, engine):
    model = _model()
    # a low-rank curvature couples its parameters: for the last layer, estimate it there
    params = LAST if kind == "lowrank" and subset == "last_layer" else None
    curv = _estimate(model, kind, params)
    mat, chosen = _reference_matrix(model, kind, curv, subset)
    delta, n = 0.8, 8  # N: the training sequences (the curvature's n_samples)
    assert curv.n_samples == n
    sigma = torch.linalg.inv(n * mat + delta * torch.eye(len(mat), dtype=torch.float64))
    xq, _ = _data(7, n=3)
    J = _jac(model, xq, _names(model))[..., _idx(model, chosen)]
    cov = torch.einsum("ntcp,pq,nteq->ntce", J, sigma, J)  # (N, T, C, C)
    var = cov.diagonal(dim1=-2, dim2=-1)
    mean = model(xq).detach()

    r = natgrad.fisher_uncertainty(model, xq, curv, prior_precision=delta, subset=subset,
                                   engine=engine)
    torch.testing.assert_close(r.mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.logit_variance, var, rtol=1e-8, atol=1e-12)
    probs = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)
    torch.testing.assert_close(r.probs, probs, rtol=1e-8, atol=1e-12)
    ent = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(r.entropy, ent, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(r.epistemic, var.sum(-1), rtol=1e-8, atol=1e-12)
    assert r.logit_covariance is None

    # MC: the draws of a dense reimplementation with the same generator, one row per token
    s = 40
    rm = natgrad.fisher_uncertainty(model, xq, curv, prior_precision=delta, subset=subset,
                                    link="mc", n_samples=s, engine=engine,
                                    generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(rm.logit_covariance, cov, rtol=1e-8, atol=1e-12)
    eps = torch.randn((s, 3 * T, C), generator=torch.Generator().manual_seed(5),
                      dtype=torch.float64)
    rows = mean.reshape(-1, C)
    draws = torch.softmax(rows + torch.einsum("rce,sre->src", _sqrt_psd(cov.reshape(-1, C, C)),
                                              eps), -1)
    pm = draws.mean(0)
    torch.testing.assert_close(rm.probs, pm.reshape(3, T, C), rtol=1e-8, atol=1e-12)
    h = -(pm * pm.log()).sum(-1)
    mi = h - (-(draws * draws.log()).sum(-1)).mean(0)
    torch.testing.assert_close(rm.epistemic, mi.clamp_min(0).reshape(3, T), rtol=1e-7, atol=1e-10)
    assert rm.epistemic_kind == "mutual_information"


@pytest.mark.filterwarnings("ignore:optimize_prior_precision chose")
@pytest.mark.parametrize("shift", [False, True])
def test_token_grid_scores_the_mean_nll_per_kept_token(shift):
    model = _model()
    curv = _estimate(model, "diag")
    mat, _ = _reference_matrix(model, "diag", curv, "all")
    xv, yv = _data(9, n=5)
    J = _jac(model, xv, _names(model))
    mean = model(xv).detach()
    lik = natgrad.TokenCategorical(shift=shift)
    grid = [0.1, 1.0, 10.0]
    r = natgrad.optimize_prior_precision(model, curv, (xv, yv), grid=grid, likelihood=lik)
    want = []
    for d in grid:
        sigma = torch.linalg.inv(8 * mat + d * torch.eye(len(mat), dtype=torch.float64))
        var = torch.einsum("ntcp,pq,ntcq->ntc", J, sigma, J)
        p = torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * var), -1)
        total, count = 0.0, 0
        for n in range(5):
            for t in range(T - 1 if shift else T):
                label = int(yv[n, t + 1 if shift else t])
                if label == -100:
                    continue
                total -= math.log(float(p[n, t, label]))
                count += 1
        want.append(total / count)
    assert r.scores == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_token_marglik_counts_sequences(kind):
    # N F is the GGN of every sequence's summed token log-likelihood: N = n_samples, the
    # sequences, not the tokens (the per-sample Fisher already sums a sequence's tokens)
    model = _model()
    curv = _estimate(model, kind)
    mat, _ = _reference_matrix(model, kind, curv, "all")
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    P = len(theta)
    grid = [0.3, 3.0]
    r = natgrad.optimize_prior_precision(model, curv, method="marglik", grid=grid)
    for d, got in zip(grid, r.scores, strict=True):
        sld = torch.linalg.slogdet(8 * mat + d * torch.eye(P, dtype=torch.float64))[1]
        want = float(-0.5 * d * theta @ theta + 0.5 * P * math.log(d) - 0.5 * sld)
        assert got == pytest.approx(want, rel=1e-9)


def test_token_predictive_in_float32():
    model = _model(torch.float32)
    curv = _estimate(model, "kfac")
    r = natgrad.fisher_uncertainty(model, _data(7, n=2)[0], curv, prior_precision=1.0)
    assert r.probs.dtype == torch.float32 and r.probs.shape == (2, T, C)
    ref = model.double()
    want = natgrad.fisher_uncertainty(ref, _data(7, n=2)[0], curv.to(torch.float64),
                                      prior_precision=1.0)
    torch.testing.assert_close(r.logit_variance.double(), want.logit_variance, rtol=1e-4,
                               atol=1e-6)


def test_token_batches_concatenate_along_the_samples():
    model = _model()
    curv = _estimate(model, "diag")
    x, _ = _data(7, n=4)
    whole = natgrad.fisher_uncertainty(model, x, curv, link="mc", n_samples=7)
    parts = natgrad.fisher_uncertainty(model, iter([x[:1], x[1:]]), curv, link="mc",
                                       n_samples=7)
    torch.testing.assert_close(parts.logit_covariance, whole.logit_covariance)
    assert parts.probs.shape == (4, T, C) and parts.entropy.shape == (4, T)
