"""Merging with structured curvatures and RegMean against dense float64 solves."""

from __future__ import annotations

import copy

import pytest
import torch

import natgrad
from tests.reference import DenseCurvature, flatten_params

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()


def _shapes(m):
    return {k: p.shape for k, p in m.named_parameters()}


def _dense(m, seed, rank=8, kind="dense"):
    shapes = _shapes(m)
    p = sum(s.numel() for s in shapes.values())
    a = torch.randn(p, rank, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return DenseCurvature(a @ a.T, shapes, 10, kind)


def _theta(m):
    return flatten_params(dict(m.named_parameters()), NAMES)


def _reference(models, curvs, w, floor):
    """(Σ w F + εI) θ* = Σ w F θ + ε θ̄ by one dense solve."""
    p = curvs[0].matrix.shape[0]
    lhs = floor * torch.eye(p, dtype=torch.float64)
    mean = sum(wm * _theta(m) for wm, m in zip(w, models, strict=True))
    rhs = floor * mean
    for wm, m, c in zip(w, models, curvs, strict=True):
        lhs = lhs + wm * c.matrix
        rhs = rhs + wm * c.matrix @ _theta(m)
    return torch.linalg.solve(lhs, rhs)


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_structured_merge_matches_a_dense_solve(method):
    models = [_model(s) for s in range(3)]
    curvs = [_dense(m, 10 + i) for i, m in enumerate(models)]
    before = [_theta(m).clone() for m in models]
    merged = natgrad.fisher_weighted_merge(
        models, curvs, weights=[1.0, 2.0, 1.0], floor=1e-3, method=method, cg_tol=1e-13,
        cg_iters=2000,
    )
    want = _reference(models, curvs, [0.25, 0.5, 0.25], 1e-3)
    torch.testing.assert_close(_theta(merged), want, rtol=1e-7, atol=1e-8)
    for m, b in zip(models, before, strict=True):
        torch.testing.assert_close(_theta(m), b, rtol=0, atol=0)  # inputs untouched


def test_block_diagonal_kinds_are_solved_per_module():
    models = [_model(s) for s in (4, 5)]
    curvs = []
    for i in range(2):
        c = _dense(models[0], 20 + i, rank=30)
        mask = torch.zeros_like(c.matrix)
        mask[:16, :16] = 1
        mask[16:, 16:] = 1  # two modules: no cross-module curvature
        curvs.append(DenseCurvature(c.matrix * mask, _shapes(models[0]), 10, "kfac"))
    merged = natgrad.fisher_weighted_merge(models, curvs, floor=1e-6, method="dense")
    want = _reference(models, curvs, [0.5, 0.5], 1e-6)
    torch.testing.assert_close(_theta(merged), want, rtol=1e-7, atol=1e-8)


def test_diagonal_dense_curvature_equals_the_elementwise_merge():
    models = [_model(s) for s in (6, 7)]
    vals = [{k: torch.rand_like(p) + 0.1 for k, p in m.named_parameters()} for m in models]
    fishers = [natgrad.DiagonalFisher(v, 5) for v in vals]
    dense = [
        DenseCurvature(torch.diag(flatten_params(v, NAMES)), _shapes(models[0]), 5, "diag")
        for v in vals
    ]
    a = natgrad.fisher_weighted_merge(models, fishers, floor=0.0)
    b = natgrad.fisher_weighted_merge(models, dense, floor=0.0)
    torch.testing.assert_close(_theta(b), _theta(a), rtol=1e-10, atol=1e-12)


def _gram(x):
    xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    return xt.T @ xt


def test_regmean_matches_dense_gram_solves():
    models = [_model(s) for s in (8, 9, 10)]
    xs = [torch.randn(7 + i, 3, dtype=torch.float64) for i in range(3)]
    merged = natgrad.regmean_merge(models, xs, alpha=0.9, floor=0.0)
    w = 1 / 3
    for layer in (0, 2):
        num, den = 0, 0
        for m, x in zip(models, xs, strict=True):
            h = x if layer == 0 else torch.tanh(m[0](x)).detach()
            a = _gram(h)
            a = 0.9 * a + 0.1 * torch.diag(torch.diagonal(a))
            wt = torch.cat([m[layer].weight, m[layer].bias.unsqueeze(1)], 1).detach()
            num = num + w * wt @ a
            den = den + w * a
        want = torch.linalg.solve(den, num.T).T
        got = torch.cat([merged[layer].weight, merged[layer].bias.unsqueeze(1)], 1)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_regmean_is_the_kronecker_merge_with_identity_g():
    torch.manual_seed(11)
    models = [torch.nn.Linear(3, 2).double() for _ in range(2)]
    xs = [torch.randn(6, 3, dtype=torch.float64) for _ in range(2)]
    shapes = {"weight": (2, 3), "bias": (2,)}
    curvs = []
    for x in xs:
        a = _gram(x)  # acts on [W, b] rows: F = I ⊗ A in the [W, b] row-major order
        f = torch.kron(torch.eye(2, dtype=torch.float64), a)
        # reorder from [W row0, b0, W row1, b1] to the flat (weight, bias) order
        order = [0, 1, 2, 4, 5, 6, 3, 7]
        f = f[order][:, order]
        curvs.append(DenseCurvature(f, shapes, 6, "kfac"))
    a = natgrad.regmean_merge(models, xs, floor=0.0)
    b = natgrad.fisher_weighted_merge(models, curvs, floor=0.0, method="dense")
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-9, atol=1e-10)


needs_kron = pytest.mark.skipif(
    not {"kfac", "lowrank"} <= set(natgrad.CURVATURE_KINDS),
    reason="KroneckerFisher / LowRankFisher not registered in this build",
)


@needs_kron
def _curvatures_and_dense(models, kind, seed, n):
    """Each model's exact-label curvature of ``kind`` on its own ``n`` random samples
    (generator seeds ``seed``, ``seed + 1``, ...), and its dense float64 matrix."""
    from tests.reference import dense_copy

    curvs, dense = [], []
    for i, m in enumerate(models):
        g = torch.Generator().manual_seed(seed + i)
        x = torch.randn(n, 3, generator=g, dtype=torch.float64)
        y = torch.randint(0, 2, (n,), generator=g)
        c = natgrad.estimate_curvature(m, (x, y), kind=kind, labels="exact")
        curvs.append(c)
        dense.append(dense_copy(c, _shapes(m)))
    return curvs, dense


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank"])
@pytest.mark.parametrize("method", ["dense", "cg"])
def test_kronecker_merge_matches_a_dense_solve(kind, method):
    models = [_model(s) for s in (20, 21)]
    curvs, dense = _curvatures_and_dense(models, kind, seed=30, n=12)
    merged = natgrad.fisher_weighted_merge(
        models, curvs, floor=1e-4, method=method, cg_tol=1e-13, cg_iters=3000
    )
    want = _reference(models, dense, [0.5, 0.5], 1e-4)
    torch.testing.assert_close(_theta(merged), want, rtol=1e-6, atol=1e-8)


def _count_mv(curv):
    """Wrap ``curv.mv`` to count its calls (an instance attribute shadows the method)."""
    calls = [0]
    inner = curv.mv

    def mv(v):
        calls[0] += 1
        return inner(v)

    curv.mv = mv
    return calls


@needs_kron
@pytest.mark.parametrize("preconditioner", ["kronecker", "jacobi"])
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_preconditioned_cg_merge_matches_a_dense_solve(kind, preconditioner):
    models = [_model(s) for s in (40, 41, 42)]
    curvs, dense = _curvatures_and_dense(models, kind, seed=50, n=15)
    merged = natgrad.fisher_weighted_merge(
        models, curvs, weights=[1.0, 3.0, 2.0], floor=1e-5, method="cg", cg_tol=1e-13,
        cg_iters=3000, preconditioner=preconditioner,
    )
    want = _reference(models, dense, [1 / 6, 3 / 6, 2 / 6], 1e-5)
    torch.testing.assert_close(_theta(merged), want, rtol=1e-6, atol=1e-8)


@needs_kron
def test_kronecker_preconditioner_is_exact_when_the_a_factors_agree():
    # one Linear layer fed the same inputs: every model has the same A, its own G, so
    # Σ w G_m ⊗ A = (Σ w G_m) ⊗ A and the preconditioned CG ends after one product
    torch.manual_seed(3)
    models = [torch.nn.Linear(4, 3).double() for _ in range(3)]
    g = torch.Generator().manual_seed(9)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)
    shapes = {"weight": (3, 4), "bias": (3,)}
    curvs = [natgrad.estimate_curvature(m, (x, y), kind="kfac", labels="exact") for m in models]
    from tests.reference import dense_copy

    dense = [dense_copy(c, shapes) for c in curvs]
    counts = [_count_mv(c) for c in curvs]
    merged = natgrad.fisher_weighted_merge(
        models, curvs, floor=1e-6, method="cg", cg_tol=1e-12, preconditioner="kronecker"
    )
    # one product for the right-hand side, one CG iteration
    assert [c[0] for c in counts] == [2, 2, 2]
    want = _reference_named(models, dense, [1 / 3] * 3, 1e-6, ["weight", "bias"])
    got = flatten_params(dict(merged.named_parameters()), ["weight", "bias"])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    counts_j = [_count_mv(c) for c in curvs]
    natgrad.fisher_weighted_merge(
        models, curvs, floor=1e-6, method="cg", cg_tol=1e-12, preconditioner="jacobi"
    )
    assert counts_j[0][0] > 2  # the diagonal preconditioner needs more iterations


def _reference_named(models, curvs, w, floor, names):
    p = curvs[0].matrix.shape[0]
    lhs = floor * torch.eye(p, dtype=torch.float64)
    thetas = [flatten_params(dict(m.named_parameters()), names) for m in models]
    rhs = floor * sum(wm * t for wm, t in zip(w, thetas, strict=True))
    for wm, t, c in zip(w, thetas, curvs, strict=True):
        lhs = lhs + wm * c.matrix
        rhs = rhs + wm * c.matrix @ t
    return torch.linalg.solve(lhs, rhs)


# -- RegMean on convolutions ----------------------------------------------------------------


def _least_squares_merge(layer_fn, inputs, thetas, w):
    """argmin_θ Σ_m w_m ‖f(h_m; θ) − f(h_m; θ_m)‖² by a dense float64 Hessian solve
    (the layer is linear in θ, so the objective is exactly quadratic)."""

    def q(theta):
        return sum(
            wm * (layer_fn(h, theta) - layer_fn(h, tm)).pow(2).sum()
            for wm, h, tm in zip(w, inputs, thetas, strict=True)
        )

    zero = torch.zeros_like(thetas[0])
    g = torch.func.grad(q)(zero)
    hess = torch.func.hessian(q)(zero)
    return torch.linalg.solve(hess, -g)


def _flat(conv):
    return torch.cat([conv.weight.detach().reshape(-1), conv.bias.detach()])


def _conv_fn(conv, functional):
    nw = conv.weight.numel()

    def fn(h, theta):
        return functional(
            h, theta[:nw].reshape(conv.weight.shape), theta[nw:], stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
        )

    return fn


def test_regmean_merges_conv1d_layers_as_a_least_squares_fit_of_their_outputs():
    F = torch.nn.functional

    def model(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Conv1d(2, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv1d(4, 3, 2, dilation=2),
        ).double()

    models = [model(s) for s in (60, 61, 62)]
    g = torch.Generator().manual_seed(63)
    xs = [torch.randn(5 + i, 2, 11, generator=g, dtype=torch.float64) for i in range(3)]
    merged = natgrad.regmean_merge(models, xs, weights=[1.0, 2.0, 1.0], floor=0.0)
    w = [0.25, 0.5, 0.25]
    for layer in (0, 2):
        hs = [x if layer == 0 else torch.relu(m[0](x)).detach() for m, x in zip(models, xs, strict=True)]
        want = _least_squares_merge(
            _conv_fn(models[0][layer], F.conv1d), hs, [_flat(m[layer]) for m in models], w
        )
        torch.testing.assert_close(_flat(merged[layer]), want, rtol=1e-8, atol=1e-10)


def test_regmean_merges_grouped_conv2d_layers_as_a_least_squares_fit_of_their_outputs():
    F = torch.nn.functional
    models = []
    for s in (70, 71):
        torch.manual_seed(s)
        models.append(torch.nn.Conv2d(4, 6, 3, padding=1, stride=2, groups=2).double())
    g = torch.Generator().manual_seed(72)
    xs = [torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    merged = natgrad.regmean_merge(models, xs, floor=0.0)
    want = _least_squares_merge(
        _conv_fn(models[0], F.conv2d), xs, [_flat(m) for m in models], [0.5, 0.5]
    )
    torch.testing.assert_close(_flat(merged), want, rtol=1e-8, atol=1e-10)


def test_regmean_normalize_uses_unit_trace_grams():
    models = [_model(s) for s in (80, 81)]
    g = torch.Generator().manual_seed(82)
    xs = [torch.randn(9, 3, generator=g, dtype=torch.float64) * (1 + 3 * i) for i in range(2)]
    merged = natgrad.regmean_merge(models, xs, floor=0.0, normalize=True)
    grams, traces = [], []
    for m, x in zip(models, xs, strict=True):
        per = [_gram(x), _gram(torch.tanh(m[0](x)).detach())]
        grams.append(per)
        # trace of I ⊗ A: d_out · tr A per layer
        traces.append(4 * float(per[0].trace()) + 2 * float(per[1].trace()))
    for j, layer in enumerate((0, 2)):
        num, den = 0, 0
        for m, per, t in zip(models, grams, traces, strict=True):
            a = per[j] / t
            wt = torch.cat([m[layer].weight, m[layer].bias.unsqueeze(1)], 1).detach()
            num, den = num + 0.5 * wt @ a, den + 0.5 * a
        want = torch.linalg.solve(den, num.T).T
        got = torch.cat([merged[layer].weight, merged[layer].bias.unsqueeze(1)], 1)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    plain = natgrad.regmean_merge(models, xs, floor=0.0)
    assert not torch.allclose(plain[0].weight, merged[0].weight)  # the scaling mattered


@needs_kron
@pytest.mark.parametrize("preconditioner", ["kronecker", "jacobi"])
def test_kronecker_merge_of_convolutions_matches_a_dense_solve(preconditioner):
    from tests.reference import dense_copy

    def model(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Conv1d(2, 4, 3, padding=1), torch.nn.Tanh(),
            torch.nn.Conv1d(4, 4, 3, stride=2, groups=2), torch.nn.Flatten(),
            torch.nn.Linear(12, 3),
        ).double()

    models = [model(s) for s in (90, 91, 92)]
    names = [k for k, _ in models[0].named_parameters()]
    shapes = {k: p.shape for k, p in models[0].named_parameters()}
    curvs, dense = [], []
    for i, m in enumerate(models):
        g = torch.Generator().manual_seed(93 + i)
        x = torch.randn(10, 2, 8, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (10,), generator=g)
        c = natgrad.estimate_curvature(m, (x, y), kind="kfac", labels="exact")
        assert set(c.structure().values()) == {"kfac"}  # the grouped conv is a K-FAC block
        curvs.append(c)
        dense.append(dense_copy(c, shapes))
    merged = natgrad.fisher_weighted_merge(
        models, curvs, floor=1e-5, method="cg", cg_tol=1e-13, cg_iters=3000,
        preconditioner=preconditioner,
    )
    p = dense[0].matrix.shape[0]
    thetas = [flatten_params(dict(m.named_parameters()), names) for m in models]
    lhs = 1e-5 * torch.eye(p, dtype=torch.float64) + sum(c.matrix for c in dense) / 3
    rhs = 1e-5 * sum(thetas) / 3 + sum(c.matrix @ t for c, t in zip(dense, thetas, strict=True)) / 3
    want = torch.linalg.solve(lhs, rhs)
    got = flatten_params(dict(merged.named_parameters()), names)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8)


@needs_kron
@pytest.mark.parametrize("floor", [1e-4, 0.0])
@pytest.mark.parametrize("rank", [None, 3])
def test_lowrank_merge_is_exact_without_iterations(floor, rank):
    """``method="auto"`` solves a low-rank merge through the stacked rows' Gram system:
    no conjugate gradients (no ``mv``, no warning), even with ``dense_max=0``, and equal
    to a dense float64 solve (``floor=0``: the minimum-norm solution, by pseudo-inverse)."""
    import warnings

    models = [_model(s) for s in (60, 61, 62)]
    curvs, dense = _curvatures_and_dense(models, "lowrank", seed=70, n=5)
    if rank is not None:
        curvs = [natgrad.LowRankFisher(c.rows, c.n_samples, c.shapes, rank=rank) for c in curvs]
        dense = [
            DenseCurvature(c.rows.T.double() @ c.rows.double() / c.n_samples, _shapes(m), 5,
                           "lowrank")
            for c, m in zip(curvs, models, strict=True)
        ]  # fmt: skip
    counts = [_count_mv(c) for c in curvs]
    w = [1.0, 0.0, 3.0]  # a zero weight drops that model's rows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = natgrad.fisher_weighted_merge(models, curvs, weights=w, floor=floor, dense_max=0)
    assert [c[0] for c in counts] == [0, 0, 0]
    wn = [0.25, 0.0, 0.75]
    mean = sum(wm * _theta(m) for wm, m in zip(wn, models, strict=True))
    lhs = floor * torch.eye(mean.numel(), dtype=torch.float64)
    rhs = torch.zeros_like(mean)
    for wm, m, c in zip(wn, models, dense, strict=True):
        lhs = lhs + wm * c.matrix
        rhs = rhs + wm * c.matrix @ (_theta(m) - mean)
    want = mean + torch.linalg.pinv(lhs, hermitian=True, rtol=1e-10) @ rhs
    torch.testing.assert_close(_theta(merged), want, rtol=1e-7, atol=1e-9)


def test_rank_deficient_merge_with_floor_zero_is_the_minimum_norm_solution():
    """``floor=0`` on a singular system (K-FAC curvatures of 3 samples each on a
    243-parameter MLP): the dense path gives ``θ̄ + S⁺ (Σ w F θ − S θ̄)``, which
    solves the normal equations and keeps the mean where no Fisher looks
    (``torch.linalg.lstsq``'s default CPU driver missed the system by 15-19%, found by
    review)."""
    from tests.reference import dense_copy

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(20, 10), torch.nn.Tanh(),
                                  torch.nn.Linear(10, 3)).double()]
    models.append(copy.deepcopy(models[0]))
    with torch.no_grad():
        for p in models[1].parameters():
            p.add_(0.2 * torch.randn_like(p))
    names = [k for k, _ in models[0].named_parameters()]
    shapes = _shapes(models[0])
    y = torch.randint(0, 3, (3,))
    curvs = [natgrad.estimate_curvature(m, (torch.randn(3, 20, dtype=torch.float64), y),
                                        kind="kfac") for m in models]
    S = sum(0.5 * dense_copy(c, shapes).matrix for c in curvs)
    assert torch.linalg.matrix_rank(S) < S.shape[0]  # singular: the case under test
    thetas = [flatten_params(dict(m.named_parameters()), names) for m in models]
    rhs = sum(0.5 * dense_copy(c, shapes).matrix @ t for c, t in zip(curvs, thetas, strict=True))
    mean = 0.5 * (thetas[0] + thetas[1])
    want = mean + torch.linalg.pinv(S, hermitian=True) @ (rhs - S @ mean)
    for method in ("dense", "auto"):
        merged = natgrad.fisher_weighted_merge(models, curvs, floor=0.0, method=method)
        got = flatten_params(dict(merged.named_parameters()), names)
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
        assert torch.linalg.norm(S @ got - rhs) <= 1e-10 * torch.linalg.norm(rhs)


class _ConvHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c = torch.nn.Conv2d(4, 6, 3, padding=1, groups=2)
        self.bn = torch.nn.BatchNorm2d(6)
        self.fc = torch.nn.Linear(6 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.c(x))).flatten(1))


def test_regmean_with_a_singular_gram_and_floor_zero_is_the_minimum_norm_fit():
    """Fewer samples (16) than the head's inputs (151): its merged Gram is singular and
    ``floor=0`` gives ``num · den⁺``, the minimum-norm solution of the normal equations
    (``torch.linalg.lstsq``'s default CPU driver missed them by 1.6%, found by review)."""
    torch.manual_seed(0)
    models = [_ConvHead().double().eval() for _ in range(2)]
    with torch.no_grad():
        models[1].bn.running_mean.add_(1.0)
    xs = [torch.randn(7, 4, 5, 5, dtype=torch.float64), torch.randn(9, 4, 5, 5, dtype=torch.float64)]
    merged = natgrad.regmean_merge(models, xs, weights=[0.4, 0.6], floor=0.0)
    num = den = 0
    for w, m, x in zip([0.4, 0.6], models, xs, strict=True):
        with torch.no_grad():
            h = torch.relu(m.bn(m.c(x))).flatten(1)
        a = _gram(h)
        num = num + w * torch.cat([m.fc.weight, m.fc.bias.unsqueeze(1)], 1).detach() @ a
        den = den + w * a
    assert torch.linalg.matrix_rank(den) < den.shape[0]
    want = num @ torch.linalg.pinv(den, hermitian=True)
    got = torch.cat([merged.fc.weight, merged.fc.bias.unsqueeze(1)], 1).detach()
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert torch.linalg.norm(got @ den - num) <= 1e-9 * torch.linalg.norm(num)
