"""Laplace with any curvature against a dense float64 posterior and brute-force Jacobians."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

import natgrad
from tests.reference import DenseCurvature, flatten_params

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    ).double().eval()


def _shapes(m):
    return {k: p.shape for k, p in m.named_parameters()}


def _dense(m, seed, n=25, kind="dense", block=False):
    shapes = _shapes(m)
    p = sum(s.numel() for s in shapes.values())
    a = torch.randn(p, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    mat = a @ a.T
    if block:
        mask = torch.zeros_like(mat)
        mask[:16, :16] = 1
        mask[16:, 16:] = 1
        mat = mat * mask
    return DenseCurvature(mat, shapes, n, kind)


def _jacobian(model, x):
    """(N, D, P) by one backward per sample and output."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(len(x)):
        out = model(x[i : i + 1])[0]
        per_out = []
        for c in range(out.shape[0]):
            g = torch.autograd.grad(out[c], list(params.values()), retain_graph=True)
            per_out.append(flatten_params(dict(zip(params, g, strict=True)), NAMES))
        rows.append(torch.stack(per_out))
    return torch.stack(rows)


def test_predictive_variance_matches_the_dense_posterior():
    model = _model()
    curv = _dense(model, 1)
    x = torch.randn(5, 3, dtype=torch.float64)
    delta = 0.7
    r = natgrad.fisher_uncertainty(model, x, curv, prior_precision=delta)
    j = _jacobian(model, x)
    cov = torch.linalg.inv(25 * curv.matrix + delta * torch.eye(31, dtype=torch.float64))
    want = torch.einsum("ndp,pq,ndq->nd", j, cov, j)
    torch.testing.assert_close(r.logit_variance, want, rtol=1e-9, atol=1e-12)
    mean = model(x).detach()
    torch.testing.assert_close(
        r.probs, torch.softmax(mean / torch.sqrt(1 + math.pi / 8 * want), -1), rtol=1e-9, atol=1e-12
    )
    # MC link: the same draws as a dense reimplementation with the same generator; the
    # logits are jointly Gaussian with the full covariance J Σ Jᵀ (principal square root)
    r_mc = natgrad.fisher_uncertainty(
        model, x, curv, prior_precision=delta, link="mc", n_samples=50,
        generator=torch.Generator().manual_seed(3),
    )
    full = torch.einsum("ndp,pq,neq->nde", j, cov, j)
    torch.testing.assert_close(r_mc.logit_covariance, full, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r_mc.logit_variance, want, rtol=1e-9, atol=1e-12)
    root = torch.stack([torch.from_numpy(np.real(scipy.linalg.sqrtm(c.numpy()))) for c in full])
    eps = torch.randn((50, 5, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    probs = torch.softmax(mean + torch.einsum("nde,sne->snd", root, eps), -1).mean(0)
    torch.testing.assert_close(r_mc.probs, probs, rtol=1e-7, atol=1e-9)
    assert r.logit_covariance is None  # probit needs the variances only


def test_last_layer_of_a_block_diagonal_curvature():
    model = _model(1)
    curv = _dense(model, 2, kind="kfac", block=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    r = natgrad.fisher_uncertainty(model, x, curv, prior_precision=2.0, subset="last_layer")
    j = _jacobian(model, x)[..., 16:]
    cov = torch.linalg.inv(25 * curv.matrix[16:, 16:] + 2.0 * torch.eye(15, dtype=torch.float64))
    want = torch.einsum("ndp,pq,ndq->nd", j, cov, j)
    torch.testing.assert_close(r.logit_variance, want, rtol=1e-9, atol=1e-12)


def test_subset_of_a_coupled_curvature_is_refused():
    model = _model(2)
    curv = _dense(model, 3)  # kind "dense": couples the layers
    with pytest.raises(ValueError, match="estimate the curvature on the chosen parameters"):
        natgrad.fisher_uncertainty(model, torch.zeros(1, 3, dtype=torch.float64), curv,
                                   subset="last_layer")


def test_dense_diagonal_equals_the_diagonal_fisher():
    model = _model(3)
    vals = {k: torch.rand_like(p) for k, p in model.named_parameters()}
    fisher = natgrad.DiagonalFisher(vals, 25)
    dense = DenseCurvature(torch.diag(flatten_params(vals, NAMES)), _shapes(model), 25, "diag")
    x = torch.randn(6, 3, dtype=torch.float64)
    a = natgrad.fisher_uncertainty(model, x, fisher, prior_precision=0.3)
    b = natgrad.fisher_uncertainty(model, x, dense, prior_precision=0.3)
    torch.testing.assert_close(b.logit_variance, a.logit_variance, rtol=1e-10, atol=1e-14)
    y = torch.randint(0, 3, (6,))
    ga = natgrad.optimize_prior_precision(model, fisher, (x, y), grid=[0.1, 1.0, 10.0])
    gb = natgrad.optimize_prior_precision(model, dense, (x, y), grid=[0.1, 1.0, 10.0])
    assert gb.scores == pytest.approx(ga.scores, rel=1e-10)
    ma = natgrad.optimize_prior_precision(model, fisher, method="marglik")
    mb = natgrad.optimize_prior_precision(model, dense, method="marglik")
    assert mb.prior_precision == pytest.approx(ma.prior_precision, rel=1e-8)
    assert mb.best_score == pytest.approx(ma.best_score, rel=1e-8)


def test_marglik_matches_the_dense_formula():
    model = _model(4)
    curv = _dense(model, 5)
    theta = flatten_params(dict(model.named_parameters()), NAMES)
    p = theta.numel()

    def log_z(d):
        sld = torch.linalg.slogdet(25 * curv.matrix + d * torch.eye(p, dtype=torch.float64))[1]
        return float(-0.5 * d * theta @ theta + 0.5 * p * math.log(d) - 0.5 * sld)

    r = natgrad.optimize_prior_precision(model, curv, method="marglik", grid=[0.1, 1.0, 10.0])
    assert r.scores == pytest.approx([log_z(g) for g in (0.1, 1.0, 10.0)], rel=1e-10)
    best = r.prior_precision
    assert r.best_score == pytest.approx(log_z(best), rel=1e-10)
    # a maximum: the dense log Z is lower on both sides
    assert log_z(best * 1.01) < r.best_score and log_z(best / 1.01) < r.best_score


needs_kron = pytest.mark.skipif(
    not {"kfac", "lowrank"} <= set(natgrad.CURVATURE_KINDS),
    reason="KroneckerFisher / LowRankFisher not registered in this build",
)


@needs_kron
@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank"])
def test_structured_predictive_matches_the_dense_posterior(kind):
    from tests.reference import dense_from_mv

    model = _model(7)
    g = torch.Generator().manual_seed(8)
    xt = torch.randn(30, 3, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (30,), generator=g)
    curv = natgrad.estimate_curvature(model, (xt, yt), kind=kind, labels="exact")
    mat = dense_from_mv(curv, _shapes(model))
    x = torch.randn(4, 3, dtype=torch.float64)
    r = natgrad.fisher_uncertainty(model, x, curv, prior_precision=0.5)
    j = _jacobian(model, x)
    cov = torch.linalg.inv(30 * mat + 0.5 * torch.eye(31, dtype=torch.float64))
    want = torch.einsum("ndp,pq,ndq->nd", j, cov, j)
    torch.testing.assert_close(r.logit_variance, want, rtol=1e-8, atol=1e-12)
    if kind != "lowrank":  # block-diagonal: the last layer's block is its posterior
        r_ll = natgrad.fisher_uncertainty(model, x, curv, prior_precision=0.5,
                                          subset="last_layer")
        cov_ll = torch.linalg.inv(30 * mat[16:, 16:] + 0.5 * torch.eye(15, dtype=torch.float64))
        want_ll = torch.einsum("ndp,pq,ndq->nd", j[..., 16:], cov_ll, j[..., 16:])
        torch.testing.assert_close(r_ll.logit_variance, want_ll, rtol=1e-8, atol=1e-12)
    m = natgrad.optimize_prior_precision(model, curv, method="marglik", grid=[1.0])
    theta = flatten_params(dict(model.named_parameters()), NAMES)
    sld = torch.linalg.slogdet(30 * mat + torch.eye(31, dtype=torch.float64))[1]
    want_score = float(-0.5 * theta @ theta - 0.5 * sld)
    assert m.scores[0] == pytest.approx(want_score, rel=1e-8)


@needs_kron
@pytest.mark.parametrize("kind", ["kfac", "ekfac", "diag"])
def test_last_layer_marglik_of_a_whole_model_block_diagonal_curvature(kind):
    """``subset="last_layer"`` on a curvature of every layer: the marginal likelihood of
    the last layer's posterior, against the dense float64 formula on the last layer's block
    of the curvature's dense form (``P``, ``‖θ*‖²``: the last layer's only)."""
    from tests.reference import dense_from_mv

    model = _model(9)
    g = torch.Generator().manual_seed(10)
    xt = torch.randn(30, 3, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (30,), generator=g)
    curv = natgrad.estimate_curvature(model, (xt, yt), kind=kind, labels="exact")
    sub = dense_from_mv(curv, _shapes(model))[16:, 16:]  # 2.weight, 2.bias: 15 entries
    assert torch.count_nonzero(dense_from_mv(curv, _shapes(model))[16:, :16]) == 0
    theta = flatten_params(dict(model.named_parameters()), NAMES)[16:]
    eye = torch.eye(15, dtype=torch.float64)

    def log_z(d):
        sld = torch.linalg.slogdet(30 * sub + d * eye)[1]
        return float(-0.5 * d * theta @ theta + 0.5 * 15 * math.log(d) - 0.5 * sld)

    grid = [0.1, 1.0, 10.0]
    r = natgrad.optimize_prior_precision(model, curv, xt, method="marglik", grid=grid,
                                         subset="last_layer")  # xt: checks what runs last
    assert r.scores == pytest.approx([log_z(d) for d in grid], rel=1e-9)
    best = r.prior_precision
    assert r.best_score == pytest.approx(log_z(best), rel=1e-9)
    # the dense optimum: γ(δ)/δ = ‖θ*‖² with γ = P − δ tr (N F + δ I)⁻¹
    gamma = 15 - best * torch.linalg.inv(30 * sub + best * eye).trace()
    assert float(gamma) / best == pytest.approx(float(theta @ theta), rel=1e-7)
    assert log_z(best * 1.01) < r.best_score and log_z(best / 1.01) < r.best_score
    # params= naming the whole last layer is the same subset
    same = natgrad.optimize_prior_precision(model, curv, method="marglik", grid=grid,
                                            params=["2.weight", "2.bias"])
    assert same.prior_precision == pytest.approx(best, rel=1e-12)


@pytest.mark.parametrize("how", ["subset", "params"])
def test_last_layer_laplace_next_to_a_pruned_layer(how):
    """A masked K-FAC block (layer 0 pruned by torch.nn.utils.prune) outside the chosen
    parameters does not stop the last-layer posterior: the predictive variance and the
    marginal likelihood against the dense float64 formulas on the last layer's block."""
    from torch.nn.utils import prune

    from tests.reference import dense_from_mv

    model = _model(11)
    prune.random_unstructured(model[0], "weight", 0.5)
    g = torch.Generator().manual_seed(12)
    xt = torch.randn(30, 3, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (30,), generator=g)
    curv = natgrad.estimate_curvature(model, (xt, yt), kind="kfac", labels="exact")
    shapes = _shapes(model)
    sub = dense_from_mv(curv, shapes)[16:, 16:]  # 2.weight, 2.bias: 15 entries
    kw = {"subset": "last_layer"} if how == "subset" else {"params": ["2.weight", "2.bias"]}
    x = torch.randn(4, 3, dtype=torch.float64)
    r = natgrad.fisher_uncertainty(model, x, curv, prior_precision=2.0, **kw)
    last = [model[2].weight, model[2].bias]
    j = torch.stack([torch.stack([
        torch.cat([t.reshape(-1) for t in torch.autograd.grad(model(x[i : i + 1])[0, c], last)])
        for c in range(3)]) for i in range(4)])
    eye = torch.eye(15, dtype=torch.float64)
    cov = torch.linalg.inv(30 * sub + 2.0 * eye)
    want = torch.einsum("ndp,pq,ndq->nd", j, cov, j)
    torch.testing.assert_close(r.logit_variance, want, rtol=1e-9, atol=1e-12)
    theta = torch.cat([t.detach().reshape(-1) for t in last])
    extra = {"val_data": x} if how == "subset" else {}  # subset: checks the last layer runs last
    m = natgrad.optimize_prior_precision(model, curv, method="marglik", grid=[1.0], **kw, **extra)
    sld = torch.linalg.slogdet(30 * sub + eye)[1]
    assert m.scores[0] == pytest.approx(float(-0.5 * theta @ theta - 0.5 * sld), rel=1e-9)
    with pytest.raises(ValueError, match="masked Kronecker blocks"):  # the pruned layer chosen
        natgrad.fisher_uncertainty(model, x, curv, params=["0.weight_orig", "0.bias"])


def test_lowrank_uncertainty_of_a_grouped_conv_matches_vmap():
    # found by review: the low-rank capture path raised a shape error on a grouped conv
    torch.manual_seed(0)
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3))
    m = m.double().eval()
    x, y = torch.randn(6, 4, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    curv = natgrad.estimate_curvature(m, (x, y), kind="lowrank", rank=4)
    got = natgrad.fisher_uncertainty(m, x, curv, prior_precision=0.7)
    want = natgrad.fisher_uncertainty(m, x, curv, prior_precision=0.7, engine="vmap")
    torch.testing.assert_close(got.logit_variance, want.logit_variance, rtol=1e-9, atol=1e-12)
