"""K-FAC factors against closed forms, brute-force loops and dense Kronecker solves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from natgrad import select_params
from natgrad.curvature.kfac import (
    kfac_eigen,
    kfac_factored_inverses,
    kfac_factors,
    kfac_layers,
    kfac_solve,
    layer_matrix,
    split_layer_matrix,
)
from tests.conftest import mlp
from tests.reference import ce_sum, loop_grads


def _aug(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def test_single_linear_closed_form_empirical_and_exact():
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    with torch.no_grad():
        p = model(x).softmax(-1)
    xa = _aug(x)
    A_ref = xa.T @ xa / 10
    b = p - F.one_hot(y, 3).double()
    f = kfac_factors(model, (x, y))[""]
    torch.testing.assert_close(f.A, A_ref)
    torch.testing.assert_close(f.G, b.T @ b / 10)
    assert (f.n_samples, f.positions) == (10, 1)
    exact = kfac_factors(model, (x, y), labels="exact")[""]
    G_exact = sum(torch.diag(pn) - torch.outer(pn, pn) for pn in p) / 10
    torch.testing.assert_close(exact.G, G_exact)


def test_gaussian_exact_G_is_identity_over_sigma2():
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    from natgrad.engine.likelihoods import Gaussian

    f = kfac_factors(model, (x, y), Gaussian(sigma=0.5), labels="exact")[""]
    torch.testing.assert_close(f.G, torch.eye(2, dtype=torch.float64) / 0.25)


def test_one_sample_kronecker_equals_outer_product_of_loop_gradient(mlp_case):
    model, x, y = mlp_case
    x1, y1 = x[:1], y[:1]
    fac = kfac_factors(model, (x1, y1))
    g = loop_grads(model, ce_sum, x1, y1)
    layers, rest = kfac_layers(model, select_params(model))
    assert rest == [] and set(layers) == {"0", "2"}
    for name, lay in layers.items():
        V = layer_matrix(lay, {k: v[0] for k, v in g.items()}, torch.float64).reshape(-1)
        dense = torch.kron(fac[name].G, fac[name].A)
        torch.testing.assert_close(dense, torch.outer(V, V))


def test_mc_converges_to_exact():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=torch.float64).repeat(800, 1)
    y = torch.zeros(len(x), dtype=torch.long)
    mc = kfac_factors(model, (x, y), labels="mc", generator=torch.Generator().manual_seed(3))[""]
    exact = kfac_factors(model, (x, y), labels="exact")[""]
    torch.testing.assert_close(mc.G, exact.G, atol=0.01, rtol=0.0)
    torch.testing.assert_close(mc.A, exact.A)


def test_mc_draws_are_the_seeded_predictive_samples():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    with torch.no_grad():
        p = model(x).softmax(-1)
    draws = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(5))[:, 0]
    mc = kfac_factors(model, x, labels="mc", generator=torch.Generator().manual_seed(5))[""]
    b = p - F.one_hot(draws, 4).double()
    torch.testing.assert_close(mc.G, b.T @ b / 6)


def _patches_1d(x, k, s, p):
    xp = F.pad(x, (p, p))
    L = (xp.shape[-1] - k) // s + 1
    return torch.stack([xp[:, :, t * s : t * s + k].reshape(x.shape[0], -1) for t in range(L)], 1)


def _patches_2d(x, k, s, p):
    xp = F.pad(x, (p, p, p, p))
    H = (xp.shape[-2] - k) // s + 1
    W = (xp.shape[-1] - k) // s + 1
    cols = [
        xp[:, :, i * s : i * s + k, j * s : j * s + k].reshape(x.shape[0], -1)
        for i in range(H)
        for j in range(W)
    ]
    return torch.stack(cols, 1)


def _ref_factors(a, b):
    """Expand convention from explicit (N, T, d) patches and (N, T, d_out) output grads."""
    n, t = a.shape[:2]
    a = torch.cat([a, torch.ones(n, t, 1, dtype=a.dtype)], -1).reshape(n * t, -1)
    b = b.reshape(n * t, -1)
    return a.T @ a / (n * t), b.T @ b / n


def test_conv2d_factors_match_explicit_patch_loop(cnn_case):
    model, x, y = cnn_case
    c1, c2, fc = model.c1, model.c2, model.fc
    s1 = F.conv2d(x, c1.weight, c1.bias, padding=1)
    s1.retain_grad()
    h1 = torch.relu(s1)
    s2 = F.conv2d(h1, c2.weight, c2.bias, stride=2)
    s2.retain_grad()
    s3 = F.linear(torch.relu(s2).flatten(1), fc.weight, fc.bias)
    s3.retain_grad()
    ce_sum(s3, y).backward()
    model.zero_grad(set_to_none=True)
    refs = {
        "c1": _ref_factors(_patches_2d(x, 3, 1, 1), s1.grad.flatten(2).transpose(1, 2)),
        "c2": _ref_factors(_patches_2d(h1.detach(), 3, 2, 0), s2.grad.flatten(2).transpose(1, 2)),
        "fc": _ref_factors(torch.relu(s2).detach().flatten(1)[:, None], s3.grad[:, None]),
    }
    fac = kfac_factors(model, (x, y))
    for name, (A, G) in refs.items():
        torch.testing.assert_close(fac[name].A, A, msg=name)
        torch.testing.assert_close(fac[name].G, G, msg=name)
    assert fac["c1"].positions == 64 and fac["c2"].positions == 9


class _Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(2, 3, 3, stride=2, padding=1, dilation=1)
        self.fc = nn.Linear(3 * 4, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.c(x)).flatten(1))


def test_conv1d_factors_match_explicit_patch_loop():
    torch.manual_seed(2)
    model = _Conv1dNet().double()
    x, y = torch.randn(5, 2, 8, dtype=torch.float64), torch.randint(0, 2, (5,))
    s = F.conv1d(x, model.c.weight, model.c.bias, stride=2, padding=1)
    s.retain_grad()
    ce_sum(model.fc(torch.tanh(s).flatten(1)), y).backward()
    A, G = _ref_factors(_patches_1d(x, 3, 2, 1), s.grad.transpose(1, 2))
    f = kfac_factors(model, (x, y))["c"]
    torch.testing.assert_close(f.A, A)
    torch.testing.assert_close(f.G, G)


def test_sequence_linear_and_inplace_relu_and_repeated_call():
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self, inplace):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.act = nn.ReLU(inplace=inplace)
            self.head = nn.Linear(3, 2)

        def forward(self, x):  # x: (N, T, 3); lin used twice
            h = self.act(self.lin(x))
            h = self.act(self.lin(h))
            return self.head(h.mean(1))

    a, b = Net(False).double(), Net(True).double()
    b.load_state_dict(a.state_dict())
    x, y = torch.randn(4, 5, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    fa, fb = kfac_factors(a, (x, y)), kfac_factors(b, (x, y))
    for n in fa:
        torch.testing.assert_close(fa[n].A, fb[n].A)
        torch.testing.assert_close(fa[n].G, fb[n].G)
    assert fa["lin"].positions == 10
    # reference for `lin`: both calls' inputs and output gradients, by hand
    s1 = F.linear(x, a.lin.weight, a.lin.bias)
    s1.retain_grad()
    h1 = torch.relu(s1)
    s2 = F.linear(h1, a.lin.weight, a.lin.bias)
    s2.retain_grad()
    ce_sum(a.head(torch.relu(s2).mean(1)), y).backward()
    A, G = _ref_factors(torch.cat([x, h1.detach()], 1), torch.cat([s1.grad, s2.grad], 1))
    torch.testing.assert_close(fa["lin"].A, A)
    torch.testing.assert_close(fa["lin"].G, G)


def test_kfac_solve_equals_dense_kronecker_solve():
    torch.manual_seed(4)
    MA, MG = torch.randn(5, 5, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    A, G = MA @ MA.T / 5, MG @ MG.T / 3
    V = torch.randn(3, 5, dtype=torch.float64)
    for lam in (1e-3, 0.5):
        dense = torch.kron(G, A) + lam * torch.eye(15, dtype=torch.float64)
        ref = torch.linalg.solve(dense, V.reshape(-1)).reshape(3, 5)
        torch.testing.assert_close(kfac_solve(kfac_eigen(A, G), V, lam), ref)
        pi = ((A.trace() / 5) / (G.trace() / 3)) ** 0.5
        s = lam**0.5
        fact = torch.kron(G + s / pi * torch.eye(3).double(), A + s * pi * torch.eye(5).double())
        ref = torch.linalg.solve(fact, V.reshape(-1)).reshape(3, 5)
        torch.testing.assert_close(kfac_solve(kfac_eigen(A, G), V, lam, "factored"), ref)
    with pytest.raises(ValueError, match="Unknown K-FAC damping mode 'both'"):
        kfac_solve(kfac_eigen(A, G), V, 0.1, "both")


def test_layer_selection_rules():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 3), nn.Linear(3, 3)
    )
    sel = select_params(model, ["0.weight", "2.weight", "3.weight", "3.bias"])
    layers, rest = kfac_layers(model, sel)
    assert set(layers) == {"2", "3"} and rest == ["0.weight"]
    assert layers["2"].bias is None and layers["3"].bias == "3.bias"
    f = kfac_factors(model, torch.randn(3, 2, 3, 3), labels="exact", params=list(sel))
    assert f["2"].A.shape == (4, 4) and f["3"].A.shape == (4, 4)
    # tied weights go to the diagonal
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))
    tied[2].weight = tied[0].weight
    layers, rest = kfac_layers(tied, select_params(tied))
    assert layers == {} and rest == ["0.weight", "0.bias", "2.bias"]


def test_layer_matrix_round_trip():
    model = nn.Linear(3, 2)
    layers, _ = kfac_layers(model, select_params(model))
    lay = layers[""]
    grads = {"weight": torch.randn(2, 3), "bias": torch.randn(2)}
    back = split_layer_matrix(lay, layer_matrix(lay, grads))
    assert torch.equal(back["weight"], grads["weight"]) and torch.equal(back["bias"], grads["bias"])


def test_unused_layer_gets_zero_factors_and_errors():
    model = mlp((3, 4, 2))
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="Unknown labels 'bogus'; expected one of"):
        kfac_factors(model, (x, y), labels="bogus")
    with pytest.raises(ValueError, match="needs the data's labels"):
        kfac_factors(model, x)
    with pytest.raises(ValueError, match="categorical labels must be integer class indices"):
        kfac_factors(model, (x, y.double()))
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="train mode"):
        kfac_factors(bn, (x, y))

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    f = kfac_factors(Skip(), (x, y))
    assert f["unused"].positions == 0 and not f["unused"].A.any() and f["used"].G.any()


def test_factored_inverses_match_the_factored_dense_solve():
    torch.manual_seed(10)
    MA, MG = torch.randn(4, 6, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    A, G, V = MA @ MA.T / 6, MG @ MG.T / 5, torch.randn(3, 4, dtype=torch.float64)
    Ginv, Ainv = kfac_factored_inverses(A, G, 0.04)
    pi = ((A.trace() / 4) / (G.trace() / 3)) ** 0.5
    dense = torch.kron(G + 0.2 / pi * torch.eye(3).double(), A + 0.2 * pi * torch.eye(4).double())
    ref = torch.linalg.solve(dense, V.reshape(-1)).reshape(3, 4)
    torch.testing.assert_close(Ginv @ V @ Ainv, ref)
