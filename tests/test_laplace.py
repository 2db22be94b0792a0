import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from natgrad import CustomLikelihood, DiagonalFisher, Gaussian, estimate_fisher
from natgrad.laplace import fisher_uncertainty, optimize_prior_precision

# -- references -----------------------------------------------------------------------------


def orthogonal_design(n=12, p=4, seed=0):
    """X with orthogonal columns (XᵀX diagonal), so the diagonal Laplace posterior is exact."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, p, generator=g, dtype=torch.float64))
    scales = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64)[:p]
    return q * scales


def blr_case(sigma=0.5, delta=2.0):
    """Bayesian linear regression: design, targets, MAP weights, posterior covariance."""
    X = orthogonal_design()
    g = torch.Generator().manual_seed(1)
    y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    y = y + sigma * torch.randn(len(X), generator=g, dtype=torch.float64)
    A = X.T @ X / sigma**2 + delta * torch.eye(X.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(A, X.T @ y / sigma**2)  # MAP = posterior mean
    model = nn.Linear(X.shape[1], 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w.view(1, -1))
    fisher = DiagonalFisher(
        {"weight": ((X**2).sum(0) / (len(X) * sigma**2)).view(1, -1)},
        len(X),
        labels="exact",
        likelihood="gaussian",
    )
    return X, y, model, fisher, torch.linalg.inv(A)


def jacobian_loop_variance(model, x, fisher, names, n, delta):
    """Σ_i J_ci² / (N F_i + δ) with one autograd call per sample and output."""
    named = dict(model.named_parameters())
    out = torch.zeros(len(x), model(x[:1]).shape[-1], dtype=torch.float64)
    for i in range(len(x)):
        f = model(x[i : i + 1])[0]
        for c in range(f.shape[0]):
            grads = torch.autograd.grad(f[c], [named[k] for k in names], retain_graph=True)
            out[i, c] = sum(
                (g.double() ** 2 / (n * fisher[k].double() + delta)).sum()
                for k, g in zip(names, grads, strict=True)
            )
    return out


def gauss_hermite_sigmoid(mu, var, order=80):
    """E[sigmoid(f)], f ~ N(mu, var), by Gauss-Hermite quadrature (exact to ~1e-12)."""
    nodes, weights = np.polynomial.hermite.hermgauss(order)
    f = mu[..., None] + np.sqrt(2 * var[..., None]) * nodes
    return (weights / (1 + np.exp(-f))).sum(-1) / np.sqrt(np.pi)


def random_fisher(model, n, seed=0, likelihood="categorical"):
    g = torch.Generator().manual_seed(seed)
    vals = {
        k: torch.rand(p.shape, generator=g, dtype=torch.float64)
        for k, p in model.named_parameters()
    }
    return DiagonalFisher(vals, n, likelihood=likelihood)


# -- closed forms ----------------------------------------------------------------------------


def test_blr_predictive_variance_matches_closed_form():
    sigma, delta = 0.5, 2.0
    X, y, model, fisher, cov = blr_case(sigma, delta)
    xt = torch.randn(7, 4, dtype=torch.float64)
    r = fisher_uncertainty(
        model, xt, fisher, prior_precision=delta, likelihood=Gaussian(sigma=sigma)
    )
    var_f = ((xt @ cov) * xt).sum(1)  # xᵀ Σ x with the dense exact posterior covariance
    torch.testing.assert_close(r.logit_variance[:, 0], var_f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r.predictive_variance[:, 0], var_f + sigma**2)
    torch.testing.assert_close(r.mean[:, 0], xt @ model.weight[0].detach())
    torch.testing.assert_close(
        r.entropy, 0.5 * torch.log(2 * math.pi * math.e * (var_f + sigma**2))
    )
    torch.testing.assert_close(r.epistemic, var_f)
    assert r.probs is None and r.epistemic_kind == "total_variance" and r.n_data == 12


def test_blr_engine_fisher_gives_the_same_predictive():
    sigma, delta = 0.5, 2.0
    X, y, model, fisher, cov = blr_case(sigma, delta)
    f_engine = estimate_fisher(model, (X, y.view(-1, 1)), Gaussian(sigma=sigma), labels="exact")
    xt = torch.randn(5, 4, dtype=torch.float64)
    r = fisher_uncertainty(
        model, xt, f_engine, prior_precision=delta, likelihood=Gaussian(sigma=sigma)
    )
    torch.testing.assert_close(r.logit_variance[:, 0], ((xt @ cov) * xt).sum(1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_logit_variance_matches_jacobian_loop(mlp_case, chunk_size):
    model, x, _ = mlp_case
    fisher = random_fisher(model, n=50)
    r = fisher_uncertainty(model, x, fisher, prior_precision=0.3, chunk_size=chunk_size)
    ref = jacobian_loop_variance(model, x, fisher, list(fisher), 50, 0.3)
    torch.testing.assert_close(r.logit_variance, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r.mean, model(x).detach())


def test_params_restricts_to_last_layer(mlp_case):
    model, x, _ = mlp_case
    fisher = random_fisher(model, n=20)
    r = fisher_uncertainty(model, x, fisher, params=[model[2]], n_data=30, prior_precision=2.0)
    ref = jacobian_loop_variance(model, x, fisher, ["2.weight", "2.bias"], 30, 2.0)
    torch.testing.assert_close(r.logit_variance, ref, rtol=1e-10, atol=1e-12)
    # a Fisher over the last layer only works without params=
    last = DiagonalFisher({k: fisher[k] for k in ("2.weight", "2.bias")}, 30)
    r2 = fisher_uncertainty(model, x, last, prior_precision=2.0)
    torch.testing.assert_close(r2.logit_variance, ref, rtol=1e-10, atol=1e-12)


def test_probit_sigmoid_matches_quadrature_and_mc_link_converges():
    torch.manual_seed(3)
    model = nn.Linear(3, 1).double()
    fisher = random_fisher(model, n=4, seed=1, likelihood="bernoulli")
    x = 2 * torch.randn(6, 3, dtype=torch.float64)
    probit = fisher_uncertainty(model, x, fisher, prior_precision=0.5)
    gen = torch.Generator().manual_seed(7)
    mc = fisher_uncertainty(
        model, x, fisher, prior_precision=0.5, link="mc", n_samples=40000, generator=gen
    )
    # closed form mean and variance of the linear model, then an exact 1-D integral
    w, b = model.weight.detach()[0], model.bias.detach()
    mu = (x @ w + b).numpy()
    var = ((x**2) @ (1 / (4 * fisher["weight"][0] + 0.5)) + 1 / (4 * fisher["bias"] + 0.5)).numpy()
    assert var.max() > 1.0  # the variances are large enough to matter
    np.testing.assert_allclose(probit.logit_variance[:, 0].numpy(), var, rtol=1e-10)
    ref = gauss_hermite_sigmoid(mu, var)
    # the probit approximation of the logistic-normal integral is within ~0.02
    np.testing.assert_allclose(probit.probs[:, 0].numpy(), ref, atol=0.02)
    # MC: 40000 draws, standard error <= 0.5/200 = 0.0025 -> 4 standard errors
    np.testing.assert_allclose(mc.probs[:, 0].numpy(), ref, atol=0.01)
    assert (mc.epistemic >= 0).all() and mc.epistemic_kind == "mutual_information"
    # the sigmoid predictive is pulled toward 1/2 compared with the MAP model
    map_p = torch.sigmoid(torch.as_tensor(mu))
    assert ((probit.probs[:, 0] - 0.5).abs() <= (map_p - 0.5).abs() + 1e-12).all()


def test_probit_softmax_matches_large_mc_estimate():
    torch.manual_seed(4)
    model = nn.Linear(4, 3).double()
    fisher = random_fisher(model, n=5, seed=2)
    x = torch.randn(5, 4, dtype=torch.float64)
    delta = 1.0
    r = fisher_uncertainty(model, x, fisher, prior_precision=delta)
    mc = fisher_uncertainty(
        model,
        x,
        fisher,
        prior_precision=delta,
        link="mc",
        n_samples=40000,
        generator=torch.Generator().manual_seed(11),
    )
    # closed-form logit moments of a linear model, then an independent numpy MC estimate
    W, b = model.weight.detach(), model.bias.detach()
    mu = (x @ W.T + b).numpy()
    var = (x**2) @ (1 / (5 * fisher["weight"] + delta)).T + 1 / (5 * fisher["bias"] + delta)
    var = var.numpy()
    np.testing.assert_allclose(r.logit_variance.numpy(), var, rtol=1e-10)
    rng = np.random.default_rng(0)
    z = mu + np.sqrt(var) * rng.standard_normal((200000, *mu.shape))
    e = np.exp(z - z.max(-1, keepdims=True))
    ref = (e / e.sum(-1, keepdims=True)).mean(0)
    np.testing.assert_allclose(mc.probs.numpy(), ref, atol=0.01)
    np.testing.assert_allclose(r.probs.numpy(), ref, atol=0.04)  # probit: an approximation
    torch.testing.assert_close(r.probs.sum(-1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(r.epistemic, r.logit_variance.sum(-1))
    ent = -(ref * np.log(ref)).sum(-1)
    np.testing.assert_allclose(mc.entropy.numpy(), ent, atol=0.02)


def test_float32_model_and_json_report(mlp_case):
    model, x, _ = mlp_case
    model = model.float()
    fisher = random_fisher(model, n=10).to(torch.float32)
    r = fisher_uncertainty(model, x.float(), fisher, link="mc", n_samples=8)
    assert r.probs.dtype == torch.float32 and r.probs.shape == (9, 4)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["link"] == "mc" and len(d["entropy"]) == 9


def test_inputs_not_mutated(mlp_case):
    model, x, _ = mlp_case
    fisher = random_fisher(model, n=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f_before = {k: v.clone() for k, v in fisher.items()}
    x0 = x.clone()
    fisher_uncertainty(model, x, fisher, link="mc", n_samples=4)
    optimize_prior_precision(model, fisher, (x, torch.zeros(9, dtype=torch.long)), grid=[1.0, 2.0])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for k, v in fisher.items():
        assert torch.equal(v, f_before[k])
    assert torch.equal(x, x0)


# -- prior precision ---------------------------------------------------------------------------


def test_grid_val_nll_matches_closed_form():
    sigma = 0.5
    X, y, model, fisher, _ = blr_case(sigma, 2.0)
    g = torch.Generator().manual_seed(5)
    xv = torch.randn(10, 4, generator=g, dtype=torch.float64)
    yv = xv @ model.weight[0].detach() + 0.7 * torch.randn(10, generator=g, dtype=torch.float64)
    grid = [0.01, 0.3, 2.0, 50.0]
    res = optimize_prior_precision(
        model, fisher, (xv, yv.view(-1, 1)), grid=grid, likelihood=Gaussian(sigma=sigma)
    )
    ref = []
    for d in grid:
        cov = torch.linalg.inv(X.T @ X / sigma**2 + d * torch.eye(4, dtype=torch.float64))
        v = ((xv @ cov) * xv).sum(1) + sigma**2
        m = xv @ model.weight[0].detach()
        ref.append(float((0.5 * torch.log(2 * math.pi * v) + (yv - m) ** 2 / (2 * v)).mean()))
    np.testing.assert_allclose(res.scores, ref, rtol=1e-10)
    assert res.prior_precision == grid[int(np.argmin(ref))] and res.score_name == "val_nll"
    assert json.loads(json.dumps(res.to_dict()))["method"] == "grid"


def test_grid_val_nll_categorical_matches_jacobian_loop(mlp_case):
    """Several candidates, several validation batches and chunks against a loop reference."""
    model, x, _ = mlp_case
    fisher = random_fisher(model, n=25)
    y = torch.arange(len(x)) % 4
    grid = [0.05, 1.0, 30.0]
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    res = optimize_prior_precision(model, fisher, batches, grid=grid, chunk_size=2)
    ref = []
    for d in grid:
        var = jacobian_loop_variance(model, x, fisher, list(fisher), 25, d)
        with torch.no_grad():
            probs = (model(x) / torch.sqrt(1 + math.pi / 8 * var)).softmax(-1)
        ref.append(float(-probs[torch.arange(len(y)), y].log().mean()))
    np.testing.assert_allclose(res.scores, ref, rtol=1e-10)
    assert res.prior_precision == grid[int(np.argmin(ref))]


def test_marglik_equals_exact_evidence_of_linear_regression():
    sigma, delta = 0.5, 2.0
    X, y, model, fisher, _ = blr_case(sigma, delta)
    res = optimize_prior_precision(
        model, fisher, method="marglik", grid=[delta], likelihood=Gaussian(sigma=sigma)
    )
    # exact evidence: y ~ N(0, σ² I + X Xᵀ / δ)
    cov = sigma**2 * torch.eye(len(X), dtype=torch.float64) + X @ X.T / delta
    exact = torch.distributions.MultivariateNormal(torch.zeros(len(X), dtype=torch.float64), cov)
    w = model.weight[0].detach()
    loglik = torch.distributions.Normal(X @ w, sigma).log_prob(y).sum()
    torch.testing.assert_close(
        torch.tensor(res.scores[0], dtype=torch.float64) + loglik, exact.log_prob(y)
    )


def test_marglik_optimum_satisfies_mackay_fixed_point():
    X, y, model, fisher, _ = blr_case()
    res = optimize_prior_precision(model, fisher, method="marglik", likelihood=Gaussian(sigma=0.5))
    nf = (len(X) * fisher["weight"]).double().flatten()
    d = res.prior_precision
    gamma = float((nf / (nf + d)).sum())
    theta_sq = float((model.weight.detach() ** 2).sum())
    assert d == pytest.approx(gamma / theta_sq, rel=1e-9)
    assert res.best_score >= max(res.scores) - 1e-12
    assert res.score_name == "log_marglik"


# -- errors ---------------------------------------------------------------------------------


def test_bad_inputs(mlp_case):
    model, x, _ = mlp_case
    fisher = random_fisher(model, n=10)
    with pytest.raises(ValueError, match="Unknown link 'logit'; expected one of 'probit', 'mc'"):
        fisher_uncertainty(model, x, fisher, link="logit")
    with pytest.raises(ValueError, match="Invalid prior_precision: 0"):
        fisher_uncertainty(model, x, fisher, prior_precision=0)
    tok = DiagonalFisher(dict(fisher), 10, likelihood="token_categorical")
    with pytest.raises(ValueError, match=r"token_categorical' needs logits of shape \(N, T, C\)"):
        fisher_uncertainty(model, x, tok)  # an (N, C) model: no tokens
    with pytest.raises(ValueError, match="supports likelihoods .* got 'sq'"):
        fisher_uncertainty(model, x, fisher, likelihood=CustomLikelihood(
            lambda f, y: ((f - y) ** 2).sum(-1), name="sq"))
    with pytest.raises(ValueError, match="estimated with likelihood 'categorical' but"):
        fisher_uncertainty(model, x, fisher, likelihood="bernoulli")
    partial = DiagonalFisher({"2.bias": fisher["2.bias"]}, 10)
    with pytest.raises(ValueError, match=r"params selects \['0.weight'.*does not cover"):
        fisher_uncertainty(model, x, partial, params=["0.weight", "2.bias"])
    with pytest.raises(ValueError, match="n_data is needed"):
        fisher_uncertainty(model, x, {k: v for k, v in fisher.items()})
    with pytest.raises(ValueError, match="Invalid n_data"):
        fisher_uncertainty(model, x, fisher, n_data=0)
    with pytest.raises(ValueError, match="Invalid chunk_size: 0"):
        fisher_uncertainty(model, x, fisher, chunk_size=0)
    with pytest.raises(ValueError, match="Invalid n_samples"):
        fisher_uncertainty(model, x, fisher, link="mc", n_samples=0)
    other = DiagonalFisher({"0.weight": torch.ones(3, 3)}, 10)
    with pytest.raises(ValueError, match="shapes differ"):
        fisher_uncertainty(model, x, other)
    with pytest.raises(ValueError, match="the model lacks"):
        fisher_uncertainty(model, x, DiagonalFisher({"zzz": torch.ones(2)}, 10))
    drop = nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.5), nn.Linear(5, 4)).double()
    with pytest.raises(ValueError, match="Dropout.*train mode.*model.eval"):
        fisher_uncertainty(drop, x, random_fisher(drop, 10))
    with pytest.raises(ValueError, match="Unknown method 'evidence'"):
        optimize_prior_precision(model, fisher, (x, x), method="evidence")
    with pytest.raises(ValueError, match="needs labelled validation data"):
        optimize_prior_precision(model, fisher)
    with pytest.raises(ValueError, match="has no labels"):
        optimize_prior_precision(model, fisher, x)
    with pytest.raises(ValueError, match="Invalid grid value"):
        optimize_prior_precision(model, fisher, (x, x), grid=[1.0, -1.0])
    zero = DiagonalFisher({k: torch.zeros_like(v) for k, v in fisher.items()}, 10)
    with pytest.raises(ValueError, match="no finite optimum"):
        optimize_prior_precision(model, zero, method="marglik")


# -- metric ---------------------------------------------------------------------------------


# -- DataLoader input and grid edges ---------------------------------------------------------


@pytest.mark.parametrize("link", ["probit", "mc"])
def test_dataloader_equals_per_batch_calls(mlp_case, link):
    """A DataLoader gives the per-batch results concatenated (mc: one generator throughout)."""
    model, x, _ = mlp_case
    fisher = random_fisher(model, n=25)
    y = torch.arange(len(x)) % 4
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    kw = dict(prior_precision=0.7, link=link, n_samples=20)
    whole = fisher_uncertainty(model, loader, fisher, generator=torch.Generator().manual_seed(3), **kw)
    gen = torch.Generator().manual_seed(3)
    parts = [fisher_uncertainty(model, b, fisher, generator=gen, **kw) for b in loader]
    for field in ("mean", "logit_variance", "probs", "entropy", "epistemic"):
        ref = torch.cat([getattr(p, field) for p in parts])
        assert getattr(whole, field).shape == ref.shape == (len(x), *ref.shape[1:])
        torch.testing.assert_close(getattr(whole, field), ref, rtol=0, atol=0)
    assert whole.predictive_variance is None and whole.epistemic_kind == parts[0].epistemic_kind
    # and the probit variances against the one-autograd-call-per-output loop
    ref_var = jacobian_loop_variance(model, x, fisher, list(fisher), 25, 0.7)
    torch.testing.assert_close(whole.logit_variance.double(), ref_var, rtol=1e-5, atol=1e-7)


def test_dataloader_of_gaussian_regression_matches_closed_form():
    sigma, delta = 0.5, 2.0
    X, _, model, fisher, cov = blr_case(sigma, delta)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X), batch_size=5)
    r = fisher_uncertainty(
        model, ([b] for b in X.split(5)), fisher, prior_precision=delta,
        likelihood=Gaussian(sigma=sigma),
    )
    torch.testing.assert_close(r.logit_variance[:, 0], ((X @ cov) * X).sum(1))
    torch.testing.assert_close(r.predictive_variance[:, 0], ((X @ cov) * X).sum(1) + sigma**2)
    assert r.probs is None and len(loader) == 3


def test_empty_iterable_is_refused(mlp_case):
    model, _, _ = mlp_case
    with pytest.raises(ValueError, match="yielded no batches"):
        fisher_uncertainty(model, [], random_fisher(model, n=25))


def _blr_validation(sigma=0.5):
    """The BLR case with validation data whose NLL is lowest near δ = 3 (interior)."""
    X, y, model, fisher, _ = blr_case(sigma, 2.0)
    g = torch.Generator().manual_seed(5)
    xv = torch.randn(10, 4, generator=g, dtype=torch.float64)
    yv = xv @ model.weight[0].detach() + 0.7 * torch.randn(10, generator=g, dtype=torch.float64)
    return model, fisher, (xv, yv.view(-1, 1)), Gaussian(sigma=sigma)


@pytest.mark.parametrize("grid, edge", [([0.01, 0.1], "largest"), ([100.0, 1000.0], "smallest")])
def test_grid_edge_warns_with_the_fix(grid, edge):
    model, fisher, val, lik = _blr_validation()
    res = optimize_prior_precision(model, fisher, val, grid=[0.1, 3.0, 100.0], likelihood=lik)
    assert res.prior_precision == 3.0  # the closed-form scores (test above) are lowest there
    with pytest.warns(UserWarning, match=f"the {edge} value of its grid.*Widen the grid"):
        res = optimize_prior_precision(model, fisher, val, grid=grid, likelihood=lik)
    assert res.prior_precision == (grid[1] if edge == "largest" else grid[0])


def test_interior_and_single_value_grids_do_not_warn(recwarn):
    model, fisher, val, lik = _blr_validation()
    optimize_prior_precision(model, fisher, val, grid=[0.1, 3.0, 100.0], likelihood=lik)
    optimize_prior_precision(model, fisher, val, grid=[3.0], likelihood=lik)
    optimize_prior_precision(model, fisher, method="marglik", likelihood=lik)
    assert not [w for w in recwarn if "grid" in str(w.message)]


class _MixedHead(nn.Module):
    """A float32 body and a float64 head: float64 outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(5, 6), nn.Linear(6, 3).double()

    def forward(self, x):
        return self.head(torch.tanh(self.body(x.float())).double())


def test_uncertainty_of_a_model_with_a_float64_head_is_float64():
    # the precision was taken from the first parameter (the float32 body): float32
    # variances for float64 outputs; found by review. Reference: the closed form
    # Var f_c = Σ_i J_ci² / (N F_i + δ) with float64 Jacobians of the head (last layer).
    model = _MixedHead()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    fisher = estimate_fisher(model, (x, y), labels="exact")
    r = fisher_uncertainty(model, x[:4], fisher, n_data=16, prior_precision=2.0,
                           subset="last_layer")
    assert r.logit_variance.dtype == torch.float64
    h = torch.tanh(model.body(x[:4])).double().detach()
    fw, fb = fisher["head.weight"], fisher["head.bias"]
    # ∂f_c/∂W_cj = h_j, ∂f_c/∂b_c = 1 (other rows zero)
    ref = (h**2) @ (1 / (16 * fw + 2.0)).T + (1 / (16 * fb + 2.0))
    torch.testing.assert_close(r.logit_variance, ref, rtol=1e-12, atol=1e-14)
