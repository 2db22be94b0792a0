"""Natural-gradient preconditioning against dense solves, closed forms and brute-force loops,
plus the shared optimizer contract (STYLE.md point 7) for ``NaturalGradient``."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import natgrad
from natgrad import FisherPreconditioner, NaturalGradient, scale_by_fisher
from natgrad.curvature.protocol import flat_inner
from natgrad.engine.likelihoods import Gaussian
from natgrad.optim.precondition import kl_clip_scale
from natgrad.optim.scale import natural_gradient_norms
from tests.conftest import TinyEncoder, mlp
from tests.reference import assert_close_dict, ce_sum, fisher_from_grads, loop_grads

KINDS = ("diag", "kfac", "woodbury")


def _backward(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss


def _grads(model):
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


# -- scale_by_fisher --------------------------------------------------------------------------


def test_scale_by_fisher_dict_and_module():
    g = {"w": torch.tensor([2.0, -4.0], dtype=torch.float64), "b": torch.tensor([1.0])}
    Fd = {"w": torch.tensor([1.0, 3.0]), "b": torch.tensor([0.5])}
    out = scale_by_fisher(g, Fd, damping=1.0)
    torch.testing.assert_close(out["w"], torch.tensor([1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(out["b"], torch.tensor([1.0 / 1.5]))
    assert out["w"].dtype == torch.float64 and torch.equal(
        g["w"], torch.tensor([2.0, -4.0]).double()
    )

    model = nn.Linear(2, 1)
    model.weight.grad = torch.tensor([[2.0, 2.0]])
    model.bias.grad = torch.tensor([5.0])
    res = scale_by_fisher(model, {"weight": torch.tensor([[1.0, 3.0]])}, damping=1.0)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[1.0, 0.5]]))
    assert torch.equal(model.bias.grad, torch.tensor([5.0]))  # not in the Fisher: untouched
    assert set(res) == {"weight"}


def test_scale_by_fisher_errors():
    g = {"w": torch.ones(2)}
    with pytest.raises(ValueError, match="No Fisher for gradients \\['w'\\]"):
        scale_by_fisher(g, {"v": torch.ones(2)})
    with pytest.raises(ValueError, match="shapes differ"):
        scale_by_fisher(g, {"w": torch.ones(3)})
    with pytest.raises(ValueError, match="Invalid damping: -1"):
        scale_by_fisher(g, {"w": torch.ones(2)}, damping=-1)
    with pytest.raises(ValueError, match="parameters the model lacks"):
        scale_by_fisher(nn.Linear(2, 1), {"nope": torch.ones(1)})


# -- each kind against an independent reference -------------------------------------------------


def test_diag_equals_elementwise_division_by_loop_fisher(mlp_case):
    model, x, y = mlp_case
    pg = loop_grads(model, ce_sum, x, y)
    F_ref = {k: (v**2).mean(0) for k, v in pg.items()}
    _backward(model, x, y)
    g = _grads(model)
    pre = FisherPreconditioner(model, kind="diag", damping=0.3)
    info = pre.step((x, y))
    assert info.preconditioned and info.curvature_updated and info.damping == 0.3
    assert_close_dict(_grads(model), {k: g[k] / (F_ref[k] + 0.3) for k in g})


def test_kfac_single_linear_equals_dense_kronecker_solve():
    torch.manual_seed(5)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    with torch.no_grad():
        p = model(x).softmax(-1)
    xa = torch.cat([x, torch.ones(12, 1, dtype=torch.float64)], 1)
    b = p - F.one_hot(y, 3).double()
    A, G = xa.T @ xa / 12, b.T @ b / 12
    _backward(model, x, y)
    V = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)
    lam = 1e-2
    I3, I5 = torch.eye(3, dtype=torch.float64), torch.eye(5, dtype=torch.float64)
    pi = ((A.trace() / 5) / (G.trace() / 3)) ** 0.5
    dense = {
        "exact": torch.kron(G, A) + lam * torch.eye(15, dtype=torch.float64),
        "factored": torch.kron(G + lam**0.5 / pi * I3, A + pi * lam**0.5 * I5),
    }
    for mode, M in dense.items():
        ref = torch.linalg.solve(M, V.reshape(-1)).reshape(3, 5)
        model.weight.grad, model.bias.grad = V[:, :4].clone(), V[:, 4].clone()
        FisherPreconditioner(model, kind="kfac", damping=lam, kfac_damping=mode).step((x, y))
        torch.testing.assert_close(model.weight.grad, ref[:, :4], msg=mode)
        torch.testing.assert_close(model.bias.grad, ref[:, 4], msg=mode)


def test_kfac_other_parameters_use_the_diagonal():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    pg = loop_grads(model, ce_sum, x, y, names=["1.weight", "1.bias"])
    _backward(model, x, y)
    g = _grads(model)
    FisherPreconditioner(model, kind="kfac", damping=0.1).step((x, y))
    for k in ("1.weight", "1.bias"):
        torch.testing.assert_close(model.get_parameter(k).grad, g[k] / ((pg[k] ** 2).mean(0) + 0.1))


@pytest.mark.parametrize("n", [5, 40])  # N < P and N > P (P = 39)
def test_woodbury_equals_dense_solve(n, mlp_case):
    model, _, _ = mlp_case
    torch.manual_seed(n)
    x, y = torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 4, (n,))
    pg = loop_grads(model, ce_sum, x, y)
    Gm = torch.cat([v.reshape(n, -1) for v in pg.values()], 1)
    _backward(model, x, y)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    lam = 1e-2
    ref = torch.linalg.solve(Gm.T @ Gm / n + lam * torch.eye(Gm.shape[1], dtype=torch.float64), g)
    FisherPreconditioner(model, kind="woodbury", damping=lam).step((x, y))
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, ref)


def test_woodbury_exact_labels_equal_dense_solve_with_the_exact_fisher(mlp_case):
    # N·C rows (one per sample and class) but the Fisher divides by N: build the dense
    # F = (1/N) Σ_n Σ_c p_nc ∇log p_nc ∇log p_ncᵀ by one backward per sample and class
    model, x, y = mlp_case
    n, params = len(x), list(model.parameters())
    P = sum(p.numel() for p in params)
    Fd = torch.zeros(P, P, dtype=torch.float64)
    for i in range(n):
        logp = model(x[i : i + 1]).log_softmax(-1)[0]
        for c in range(logp.shape[0]):
            g = torch.autograd.grad(logp[c], params, retain_graph=True)
            v = torch.cat([t.reshape(-1) for t in g])
            Fd += logp[c].exp().detach() * torch.outer(v, v) / n
    _backward(model, x, y)
    g = torch.cat([p.grad.reshape(-1) for p in params])
    lam = 1e-2
    ref = torch.linalg.solve(Fd + lam * torch.eye(P, dtype=torch.float64), g)
    FisherPreconditioner(model, kind="woodbury", labels="exact", damping=lam).step((x, y))
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), ref)


def test_woodbury_least_squares_step_is_the_gauss_newton_step():
    torch.manual_seed(7)
    n, d = 50, 6
    X = torch.randn(n, d, dtype=torch.float64)
    Y = X @ torch.randn(d, 1, dtype=torch.float64) + 0.3 * torch.randn(n, 1, dtype=torch.float64)
    model = nn.Linear(d, 1).double()
    lik = Gaussian(sigma=1.0)
    pre = FisherPreconditioner(model, lik, kind="woodbury", labels="exact", damping=1e-9)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    opt.zero_grad()
    lik.nll(model(X), Y).mean().backward()
    pre.step((X, Y))
    opt.step()
    Xa = torch.cat([X, torch.ones(n, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(Xa, Y).solution[:, 0]
    torch.testing.assert_close(model.weight.detach()[0], sol[:d], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.bias.detach(), sol[d:], rtol=1e-5, atol=1e-5)


# -- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_outside_params_are_untouched(kind, mlp_case):
    model, x, y = mlp_case
    _backward(model, x, y)
    g = _grads(model)
    FisherPreconditioner(model, kind=kind, params=["0.weight", "0.bias"], damping=0.1).step((x, y))
    assert torch.equal(model[2].weight.grad, g["2.weight"])
    assert torch.equal(model[2].bias.grad, g["2.bias"])
    assert not torch.equal(model[0].weight.grad, g["0.weight"])


def test_warmup_update_every_and_ema(mlp_case):
    model, x, y = mlp_case
    d = 0.7
    pre = FisherPreconditioner(
        model, kind="diag", damping=0.1, warmup_steps=1, update_every=3, ema_decay=d
    )
    batches = [(x[i : i + 3], y[i : i + 3]) for i in range(0, 9, 3)] + [(x[:4], y[:4])]
    F_of = [
        {k: (v**2).mean(0) for k, v in loop_grads(model, ce_sum, bx, by).items()}
        for bx, by in batches
    ]
    expected_update = [True, True, False, False]  # warmup step 0, then t - 1 = 0, 3, ...
    for t, (bx, by) in enumerate(batches):
        _backward(model, bx, by)
        g = _grads(model)
        info = pre.step((bx, by))
        assert info.curvature_updated == expected_update[t] and info.step == t
        if t == 0:
            assert not info.preconditioned
            assert_close_dict(_grads(model), g)  # warmup: pass-through
            assert_close_dict(dict(pre.curvature.diagonal()), F_of[0])
    ema = {k: d * F_of[0][k] + (1 - d) * F_of[1][k] for k in F_of[0]}
    assert_close_dict(dict(pre.curvature.diagonal()), ema)  # not refreshed at steps 2, 3
    assert_close_dict(_grads(model), {k: g[k] / (ema[k] + 0.1) for k in g})


def test_damping_schedule_and_kl_clip(mlp_case):
    model, x, y = mlp_case
    sched = lambda t: 1.0 / (t + 1)
    pre = FisherPreconditioner(model, kind="diag", damping=sched)
    for t in range(2):
        _backward(model, x, y)
        assert pre.step((x, y)).damping == sched(t)
    bad = FisherPreconditioner(model, damping=lambda t: -1.0)
    with pytest.raises(ValueError, match="Invalid damping at step 0: -1.0"):
        bad.step((x, y))

    _backward(model, x, y)
    g = _grads(model)
    FisherPreconditioner(model, kind="kfac", damping=0.1).step((x, y))
    delta = _grads(model)
    vg = sum(float((delta[k] * g[k]).sum()) for k in g)
    lr, clip = 0.5, 1e-3
    nu = min(1.0, (clip / (lr**2 * vg)) ** 0.5)
    assert nu < 1.0
    for k, p in model.named_parameters():
        p.grad = g[k].clone()
    pre = FisherPreconditioner(model, kind="kfac", damping=0.1, kl_clip=clip)
    info = pre.step((x, y), lr=lr)
    assert info.kl_scale == pytest.approx(nu)
    assert_close_dict(_grads(model), {k: nu * v for k, v in delta.items()})


def _pieces(deltas, grads, lrs):
    return [(lrs[k] ** 2, flat_inner(grads[k], d)) for k, d in deltas.items()]


def test_kl_clip_scale_equals_hand_computation():
    # ν = min(1, sqrt(κ / |Σ_i lr_i² Δ_i g_i|)), by hand:
    # Σ = 0.5²·(1·3 + 2·4) + 0.1²·(-1·2) = 2.75 - 0.02 = 2.73
    deltas = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([-1.0], dtype=torch.float64)}
    grads = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([2.0], dtype=torch.float64)}
    lrs = {"a": 0.5, "b": 0.1}

    def nu(lrs, clip):
        return kl_clip_scale(_pieces(deltas, grads, lrs), clip, grads, deltas)

    assert nu(lrs, 1e-3) == pytest.approx((1e-3 / 2.73) ** 0.5)
    assert nu(lrs, 3.0) == 1.0  # inside the region: no clip
    assert nu(dict.fromkeys(lrs, 0.0), 1e-3) == 1.0  # sum 0
    # a matrix, its gradient non-contiguous and of another dtype: Σ += 0.2²·(1·1 + 2·3 + 3·2
    # + 4·4) = 0.04·29 = 1.16 (the gradient's transpose is [[1, 3], [2, 4]])
    deltas["c"] = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    grads["c"] = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).t()
    lrs["c"] = 0.2
    assert nu(lrs, 1e-3) == pytest.approx((1e-3 / 3.89) ** 0.5)
    assert kl_clip_scale([], 1e-3, {}, {}) == 1.0


def test_kl_clip_scale_overflow_of_finite_tensors_stops_the_step():
    # finite g and Δ whose inner product overflows float32: the KL model is +inf, ν = 0;
    # the same overflow under weight 0 counts as 0
    g = {"a": torch.full((4,), 1e20)}
    d = {"a": torch.full((4,), 1e20)}
    assert not torch.isfinite(flat_inner(g["a"], d["a"]))
    assert kl_clip_scale(_pieces(d, g, {"a": 0.1}), 1e-3, g, d) == 0.0
    assert kl_clip_scale(_pieces(d, g, {"a": 0.0}), 1e-3, g, d) == 1.0


@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac", "lowrank"])
def test_solve_inner_is_solve_and_the_weighted_inner_product(kind):
    # Δ against a dense float64 solve of (F + λI) built column by column from F v; the
    # pieces' Σ w·⟨v_S, Δ_S⟩ against a float64 loop over names, also when a layer's weight
    # and bias weigh differently and when a bias is absent from v
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    C = natgrad.estimate_curvature(model, (x, y), kind=kind, labels="exact",
                                   **({"damping_mode": "exact"} if kind == "kfac" else {}))
    shapes = {k: p.shape for k, p in model.named_parameters()}
    sizes = [p.numel() for p in model.parameters()]

    def unflat(z):
        return dict(zip(shapes, (t.reshape(s) for t, s in zip(z.split(sizes), shapes.values(),
                                                               strict=True)), strict=True))

    P = sum(sizes)
    dense = torch.stack([torch.cat([t.reshape(-1) for t in C.mv(unflat(e)).values()])
                         for e in torch.eye(P, dtype=torch.float64)], 1)
    v = {k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()}
    for names, weights in [
        (list(v), dict.fromkeys(v, 0.3)),
        (list(v), {"0.weight": 0.3, "0.bias": 0.7, "2.weight": 0.0, "2.bias": 2.0}),
        (["0.weight", "2.weight", "2.bias"], {"0.weight": 1.0, "2.weight": 0.5, "2.bias": 0.5}),
    ]:
        sub = {k: v[k] for k in names}
        full = torch.cat([(sub[k] if k in sub else torch.zeros(s, dtype=torch.float64))
                          .reshape(-1) for k, s in shapes.items()])
        ref = unflat(torch.linalg.solve(dense + 0.1 * torch.eye(P, dtype=torch.float64), full))
        deltas, pieces = C.solve_inner(sub, 0.1, weights)
        assert list(deltas) == names
        assert_close_dict(deltas, {k: ref[k] for k in names}, rtol=1e-8, atol=1e-10)
        total = sum(w * float(x) for w, x in pieces)
        expect = sum(weights[k] * float((sub[k] * ref[k]).sum()) for k in names)
        assert total == pytest.approx(expect, rel=1e-8)


def test_kl_clip_is_the_default_and_bounds_the_quadratic_kl(mlp_case):
    """With the default kl_clip the step -lr·Δ has ½ lr² Δᵀ(F + λI)Δ <= kl_clip / 2 for the
    diagonal Fisher, checked against the loop Fisher (dense reference) for a large lr."""
    model, x, y = mlp_case
    F_ref = fisher_from_grads(loop_grads(model, ce_sum, x, y))
    pre = FisherPreconditioner(model, kind="diag", update_every=1)
    assert pre.kl_clip == 1e-3
    _backward(model, x, y)
    g = _grads(model)
    lr = 10.0
    info = pre.step((x, y), lr=lr)
    assert info.kl_scale < 1.0
    lam = pre.damping_at(0)
    step = {k: lr * p.grad for k, p in model.named_parameters()}
    quad = sum(float((step[k] ** 2 * (F_ref[k] + lam)).sum()) for k in step)
    assert quad == pytest.approx(1e-3, rel=1e-4)  # clipped exactly onto the boundary
    unclipped = {k: g[k] / (F_ref[k] + lam) for k in g}
    assert_close_dict(_grads(model), {k: info.kl_scale * v for k, v in unclipped.items()})


def test_kl_clip_without_lr_warns_once_and_does_not_clip(mlp_case):
    model, x, y = mlp_case
    _backward(model, x, y)
    g = _grads(model)
    FisherPreconditioner(model, kind="diag", kl_clip=None).step((x, y))
    delta = _grads(model)
    pre = FisherPreconditioner(model, kind="diag")
    for t in range(2):
        for k, p in model.named_parameters():
            p.grad = g[k].clone()
        if t == 0:
            with pytest.warns(UserWarning, match="kl_clip=0.001 is not applied"):
                info = pre.step((x, y))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # only the first step warns
                info = pre.step((x, y))
        assert info.kl_scale == 1.0
        assert_close_dict(_grads(model), delta)


def test_kl_clip_lr_errors(mlp_case):
    model, x, y = mlp_case
    _backward(model, x, y)
    pre = FisherPreconditioner(model, kind="diag")
    with pytest.raises(ValueError, match="Invalid lr: -0.1"):
        pre.step((x, y), lr=-0.1)
    with pytest.raises(ValueError, match="no learning rate for parameters \\['0.bias'"):
        pre.step((x, y), lr={"0.weight": 0.1})
    assert pre.step((x, y), lr=0.1).step == 0  # the failed calls changed nothing


def test_natural_gradient_clips_with_each_groups_lr(mlp_case):
    """NaturalGradient reads every parameter's group lr: the update of parameter i is
    -lr_i ν Δ_i with ν from the hand formula over the groups' lrs."""
    model, x, y = mlp_case
    _backward(model, x, y)
    g = _grads(model)
    FisherPreconditioner(model, kind="diag", kl_clip=None).step((x, y))
    delta = _grads(model)
    first = [p for k, p in model.named_parameters() if k.startswith("0.")]
    rest = [p for k, p in model.named_parameters() if not k.startswith("0.")]
    lrs = {k: (2.0 if k.startswith("0.") else 0.5) for k, _ in model.named_parameters()}
    vg = sum(lrs[k] ** 2 * float((delta[k] * g[k]).sum()) for k in g)
    nu = min(1.0, (1e-3 / vg) ** 0.5)
    assert nu < 1.0
    opt = NaturalGradient(
        torch.optim.SGD([{"params": first, "lr": 2.0}, {"params": rest, "lr": 0.5}]),
        FisherPreconditioner(model, kind="diag"),
    )
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    for k, p in model.named_parameters():
        p.grad = g[k].clone()
    assert opt.param_lrs() == lrs
    opt.step(batch=(x, y))
    after = dict(model.named_parameters())
    assert_close_dict({k: before[k] - after[k].detach() for k in before},
                      {k: lrs[k] * nu * delta[k] for k in delta})


@pytest.mark.parametrize(
    "kind,labels,extra",
    [
        ("diag", "mc", {}),
        ("kfac", "empirical", {"update_every": 2, "warmup_steps": 1}),
        ("kfac", "exact", {"update_every": 2, "kfac_damping": "exact"}),
        ("woodbury", "mc", {"update_every": 2}),
    ],
)
def test_save_and_resume_mid_training_is_bit_exact(kind, labels, extra):
    torch.manual_seed(8)
    model0 = mlp((5, 7, 4))
    data = [(torch.randn(10, 5), torch.randint(0, 4, (10,))) for _ in range(6)]

    def make(model):
        pre = FisherPreconditioner(model, kind=kind, labels=labels, damping=0.05, **extra)
        return NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), pre)

    def run(model, opt, batches):
        for bx, by in batches:
            opt.zero_grad()
            F.cross_entropy(model(bx), by).backward()
            opt.step(batch=(bx, by))

    straight = copy.deepcopy(model0)
    run(straight, make(straight), data)

    first = copy.deepcopy(model0)
    opt = make(first)
    run(first, opt, data[:3])
    saved = copy.deepcopy((first.state_dict(), opt.state_dict()))
    resumed = mlp((5, 7, 4))
    resumed.load_state_dict(saved[0])
    opt2 = make(resumed)
    opt2.load_state_dict(saved[1])
    run(resumed, opt2, data[3:])
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_mismatches():
    model = mlp((5, 7, 4))
    diag = FisherPreconditioner(model, kind="diag")
    with pytest.raises(ValueError, match="kind='diag', but the preconditioner has kind='kfac'"):
        FisherPreconditioner(model, kind="kfac").load_state_dict(diag.state_dict())
    x, y = torch.randn(4, 5), torch.randint(0, 4, (4,))
    _backward(model, x, y)
    diag.step((x, y))
    other = FisherPreconditioner(model, kind="diag", params=["0.weight"])
    with pytest.raises(ValueError, match="only in the state_dict"):
        other.load_state_dict(diag.state_dict())


# -- shared optimizer contract (STYLE.md point 7) ---------------------------------------------------

BAD_OPTIONS = [
    ({"kind": "newton"}, ValueError, "Unknown kind 'newton'; expected one of 'diag', 'kfac'"),
    ({"damping": 0.0}, ValueError, "Invalid damping: 0.0; it must be finite and > 0"),
    ({"damping": "big"}, TypeError, "damping must be a number"),
    ({"update_every": 0}, ValueError, "Invalid update_every: 0; it must be an integer >= 1"),
    ({"warmup_steps": -1}, ValueError, "Invalid warmup_steps: -1; it must be an integer >= 0"),
    ({"ema_decay": 1.5}, ValueError, "Invalid ema_decay: 1.5; it must lie in \\[0, 1\\)"),
    ({"labels": "true"}, ValueError, "Unknown labels 'true'; expected one of 'empirical'"),
    ({"kl_clip": -1.0}, ValueError, "Invalid kl_clip: -1.0"),
    ({"params": ["nope"]}, ValueError, "Unknown parameter names \\['nope'\\]"),
    ({"likelihood": "poisson"}, ValueError, "Unknown likelihood 'poisson'"),
    ({"kfac_damping": "tikhonov"}, ValueError, "Unknown kfac_damping 'tikhonov'; expected one"),
]


@pytest.mark.parametrize("options,exc,msg", BAD_OPTIONS)
def test_error_table(options, exc, msg):
    with pytest.raises(exc, match=msg):
        FisherPreconditioner(mlp(), **options)


def test_wrapper_errors():
    model = mlp()
    pre = FisherPreconditioner(model)
    with pytest.raises(TypeError, match="needs a torch.nn.Module as model, got list: pass the model, not its parameters"):
        FisherPreconditioner(list(model.parameters()))
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        NaturalGradient(pre, pre)
    with pytest.raises(TypeError, match="preconditioner must be a natgrad.FisherPreconditioner"):
        NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1), "diag")
    opt = NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1), pre)
    with pytest.raises(ValueError, match="needs the batch the gradients came from"):
        opt.step()
    with pytest.raises(ValueError, match="Not a NaturalGradient state_dict"):
        opt.load_state_dict({"state": {}})


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05),
}


def _problem(dtype=torch.float64):
    torch.manual_seed(9)
    model = mlp((5, 8, 3)).to(dtype)
    x = torch.randn(30, 5, dtype=dtype)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return model, x, y


def _natgrad(model, kind, opt_name, **kw):
    pre = FisherPreconditioner(model, kind=kind, damping=0.1, **kw)
    return NaturalGradient(OPTIMIZERS[opt_name](model.parameters()), pre)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", KINDS)
def test_contract_loss_decreases_with_closure(kind, opt_name):
    model, x, y = _problem()
    opt = _natgrad(model, kind, opt_name)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = float(opt.step(closure, batch=(x, y)).detach())
    for _ in range(15):
        last = float(opt.step(closure, batch=(x, y)).detach())
    assert last < 0.7 * first


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", KINDS)
def test_contract_state_dict_round_trip_steps_identically(kind, opt_name):
    model, x, y = _problem()
    opt = _natgrad(model, kind, opt_name, update_every=2)
    for _ in range(3):
        _backward(model, x, y)
        opt.step(batch=(x, y))
    clone = copy.deepcopy(model)
    opt_clone = _natgrad(clone, kind, opt_name, update_every=2)
    opt_clone.load_state_dict(copy.deepcopy(opt.state_dict()))  # as torch.save would
    for m, o in ((model, opt), (clone, opt_clone)):
        for _ in range(2):
            _backward(m, x[:20], y[:20])
            o.step(batch=(x[:20], y[:20]))
    for a, b in zip(model.parameters(), clone.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("kind", KINDS)
def test_contract_zero_gradients_are_a_no_op(kind, opt_name):
    model, x, y = _problem()
    before = copy.deepcopy(model.state_dict())
    opt = _natgrad(model, kind, opt_name)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step(batch=(x, y))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_contract_dtype_preserved(kind, dtype):
    model, x, y = _problem(dtype)
    opt = _natgrad(model, kind, "sgd")
    model.zero_grad()
    F.cross_entropy(model(x).float(), y).backward()
    opt.step(batch=(x, y))
    for p in model.parameters():
        assert p.dtype == dtype and p.grad.dtype == dtype and torch.isfinite(p).all()


def test_wrapper_is_an_optimizer_for_schedulers():
    model, x, y = _problem()
    opt = _natgrad(model, "diag", "sgd")
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is opt.optimizer.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    _backward(model, x, y)
    opt.step(batch=(x, y))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# -- metric ----------------------------------------------------------------------------------------


def test_natural_gradient_norms_leave_out_padding():
    torch.manual_seed(11)
    model = TinyEncoder(per_token=True).double().eval()
    ids = torch.randint(0, 13, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 4:] = 0
    Fd = {k: torch.full_like(p, 3.0) for k, p in model.named_parameters()}
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    r = natural_gradient_norms(model, batch, Fd, "token_categorical", damping=1.0)
    # reference: cross-entropy summed over the kept tokens of each sequence, mean over N
    logits = model(ids, attention_mask=mask)
    keep = mask.bool()
    loss = F.cross_entropy(logits[keep], ids[keep], reduction="sum") / 3
    g = torch.autograd.grad(loss, list(model.parameters()))
    total = torch.cat([v.reshape(-1) for v in g]).norm()
    assert r.total_grad_norm == pytest.approx(float(total), rel=1e-9)
    assert r.total_natgrad_norm == pytest.approx(float(total) / 4, rel=1e-9)


def test_kfac_damping_schedule_refreshes_cached_inverses(mlp_case):
    model, x, y = mlp_case
    _backward(model, x, y)
    g = _grads(model)
    sched = FisherPreconditioner(model, kind="kfac", damping=lambda t: [0.1, 0.5][t])
    sched.step((x, y))
    for k, p in model.named_parameters():
        p.grad = g[k].clone()
    sched.step((x, y))  # same batch: the EMA of identical factors is unchanged
    got = _grads(model)
    for k, p in model.named_parameters():
        p.grad = g[k].clone()
    FisherPreconditioner(model, kind="kfac", damping=0.5).step((x, y))
    assert_close_dict(got, _grads(model))


@pytest.mark.parametrize(
    "kind,match",
    [
        ("kfac", "K-FAC factors of layer '0'.*Check the inputs"),
        ("woodbury", "per-sample gradients.*'0.weight'.*sample 0 .*inputs hold NaN or Inf"),
    ],
)
def test_non_finite_curvature_raises_clear_error(kind, match):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    torch.nn.functional.cross_entropy(model(x), y).backward()  # finite .grad
    x[0, 0] = float("inf")  # only the curvature batch is bad
    pre = FisherPreconditioner(model, kind=kind)
    with pytest.raises(FloatingPointError, match=match):
        pre.step((x, y))


# -- every registered kind through the registry ------------------------------------------------


def test_ekfac_step_equals_its_curvature_solve():
    # the preconditioner's step is curvature.solve(g, λ) of estimate_curvature on the batch
    import natgrad

    torch.manual_seed(21)
    model = mlp((5, 6, 3)).double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    _backward(model, x, y)
    g = _grads(model)
    C = natgrad.estimate_curvature(model, (x, y), kind="ekfac")
    ref = C.solve(g, 0.1)
    pre = FisherPreconditioner(model, kind="ekfac", damping=0.1)
    pre.step((x, y))
    assert pre.curvature.structure() == C.structure()
    assert_close_dict(_grads(model), ref, rtol=1e-10, atol=1e-12)


def test_new_kind_needs_only_a_curvature_class_and_a_registry_entry():
    from natgrad.curvature import protocol
    from natgrad.curvature.diagonal import DiagonalFisher

    @protocol.register_curvature("diag_x2_test")
    class Doubled(DiagonalFisher):  # F' = 2F, through the protocol only
        kind = "diag_x2_test"

        @classmethod
        def estimate(cls, model, data, likelihood="categorical", **options):
            F_ = DiagonalFisher.estimate(model, data, likelihood, **options)
            return cls({k: 2 * v for k, v in F_.items()}, F_.n_samples)

        def ema(self, other, decay):
            return type(self)({k: decay * self[k] + (1 - decay) * other[k] for k in self},
                              self.n_samples + other.n_samples)

        @classmethod
        def from_state_dict(cls, state):
            f = DiagonalFisher.from_state_dict(state)
            return cls(dict(f.items()), f.n_samples)

    try:
        torch.manual_seed(22)
        model = mlp((4, 5, 3)).double()
        x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
        pg = loop_grads(model, ce_sum, x, y)
        _backward(model, x, y)
        g = _grads(model)
        pre = FisherPreconditioner(model, kind="diag_x2_test", damping=0.2)
        pre.step((x, y))
        ref = {k: g[k] / (2 * (pg[k] ** 2).mean(0) + 0.2) for k in g}
        assert_close_dict(_grads(model), ref, rtol=1e-10, atol=1e-12)
        again = FisherPreconditioner(model, kind="diag_x2_test")
        again.load_state_dict(pre.state_dict())
        assert isinstance(again.curvature, Doubled)
    finally:
        del protocol.CURVATURE_KINDS["diag_x2_test"]


# -- source="backward" -----------------------------------------------------------------------------


def test_backward_kfac_single_linear_equals_dense_kronecker_solve():
    # A, G from the definitions, with per-sample output grads p - onehot (no 1/N)
    torch.manual_seed(23)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    with torch.no_grad():
        p = model(x).softmax(-1)
    xa = torch.cat([x, torch.ones(12, 1, dtype=torch.float64)], 1)
    b = p - F.one_hot(y, 3).double()
    A, G = xa.T @ xa / 12, b.T @ b / 12
    lam = 1e-2
    pre = FisherPreconditioner(model, kind="kfac", damping=lam, kfac_damping="exact",
                               source="backward")
    _backward(model, x, y)  # mean-reduced loss: grads rescaled by N
    V = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)
    ref = torch.linalg.solve(torch.kron(G, A) + lam * torch.eye(15, dtype=torch.float64),
                             V.reshape(-1)).reshape(3, 5)
    assert pre.step().curvature_updated
    torch.testing.assert_close(model.weight.grad, ref[:, :4])
    torch.testing.assert_close(model.bias.grad, ref[:, 4])


def _cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 5 * 5, 4)).double()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("kind", ["kfac", "diag"])
def test_backward_equals_batch_source_with_empirical_labels(kind, arch, reduction):
    torch.manual_seed(24)
    model = mlp((5, 7, 4)).double() if arch == "mlp" else _cnn()
    x = torch.randn(8, 5, dtype=torch.float64) if arch == "mlp" else torch.randn(
        8, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    twin = copy.deepcopy(model)
    pb = FisherPreconditioner(model, kind=kind, damping=0.05, source="backward",
                              loss_reduction=reduction, ema_decay=0.5)
    pa = FisherPreconditioner(twin, kind=kind, damping=0.05, ema_decay=0.5)
    for step in range(2):
        xs, ys = x + step, y
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(xs), ys, reduction=reduction).backward()
        pb.step()
        pa.step((xs, ys))
        assert_close_dict(_grads(model), _grads(twin), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["diag", "kfac"])
@pytest.mark.parametrize("pattern", ["fgsm", "probe_same_forward", "assign_grads"])
def test_backward_leaves_out_autograd_grad_calls(kind, pattern):
    """A ``torch.autograd.grad`` through the recorded model writes no ``.grad``: its output
    gradients are not the training step's. FGSM's clean forward (input gradient) and a
    gradient-norm probe on the same forward were counted (curvature 4x too large; found
    by review). A loop that assigns ``p.grad`` from ``torch.autograd.grad`` itself still
    counts its one backward. Reference: ``source="batch"`` on the trained loss's batch
    (itself checked against per-sample loops above)."""
    torch.manual_seed(5)
    model = mlp((5, 7, 4)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 4, (8,))
    pb = FisherPreconditioner(model, kind=kind, damping=0.05, source="backward", kl_clip=None)
    pa = FisherPreconditioner(twin, kind=kind, damping=0.05, kl_clip=None)
    x_used = x
    if pattern == "fgsm":
        xr = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
        x_used = (x + 0.1 * gx.sign()).detach()
        F.cross_entropy(model(x_used), y).backward()
    elif pattern == "probe_same_forward":
        loss = F.cross_entropy(model(x), y)
        torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        loss.backward()
    else:
        gs = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        for p, g in zip(model.parameters(), gs, strict=True):
            p.grad = g
    pb.step()
    F.cross_entropy(twin(x_used), y).backward()
    pa.step((x_used, y))
    assert_close_dict(_grads(model), _grads(twin), rtol=1e-9, atol=1e-12)


def test_backward_diag_equals_per_sample_loop(mlp_case):
    model, x, y = mlp_case
    model = model.double()
    x = x.double()
    pg = loop_grads(model, ce_sum, x, y)
    pre = FisherPreconditioner(model, kind="diag", damping=0.3, source="backward")
    _backward(model, x, y)
    g = _grads(model)
    pre.step()
    ref = {k: g[k] / ((pg[k] ** 2).mean(0) + 0.3) for k in g}
    assert_close_dict(_grads(model), ref, rtol=1e-9, atol=1e-12)


def test_backward_two_forwards_pool_their_samples():
    # gradient accumulation with summed losses: the union batch's Fisher
    torch.manual_seed(25)
    model = mlp((5, 6, 3)).double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    twin = copy.deepcopy(model)
    pb = FisherPreconditioner(model, kind="kfac", source="backward", loss_reduction="sum")
    model.zero_grad()
    for sl in (slice(0, 4), slice(4, 10)):
        F.cross_entropy(model(x[sl]), y[sl], reduction="sum").backward()
    pa = FisherPreconditioner(twin, kind="kfac")
    twin.zero_grad()
    F.cross_entropy(twin(x), y, reduction="sum").backward()
    pb.step()
    pa.step((x, y))
    assert pb.curvature.n_samples == 10
    assert_close_dict(_grads(model), _grads(twin), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "diag"])
@pytest.mark.parametrize("how", ["accumulate", "one_backward", "own_buffer"])
def test_backward_mean_loss_over_several_forwards_is_the_union_batch(kind, how):
    # gradient accumulation as the HF Trainer / Lightning do it (each micro-batch's mean
    # loss divided by their number), or one backward through the mean of two means: the
    # same preconditioned gradient as one forward of the union batch (batch source)
    torch.manual_seed(27)
    model = mlp((5, 6, 3)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    twin = copy.deepcopy(model)
    pb = FisherPreconditioner(model, kind=kind, damping=0.05, source="backward")
    parts = (slice(0, 4), slice(4, 8), slice(8, 12))
    if how == "accumulate":
        for sl in parts:
            (F.cross_entropy(model(x[sl]), y[sl]) / len(parts)).backward()
    elif how == "own_buffer":  # the loop moves each micro-batch's gradients out (.grad None)
        buf = {k: torch.zeros_like(p) for k, p in model.named_parameters()}
        for sl in parts:
            (F.cross_entropy(model(x[sl]), y[sl]) / len(parts)).backward()
            for k, p in model.named_parameters():
                buf[k] += p.grad
                p.grad = None
        for k, p in model.named_parameters():
            p.grad = buf[k]
    else:
        sum(F.cross_entropy(model(x[sl]), y[sl]) for sl in parts[:2]).__truediv__(2).backward()
        x, y = x[:8], y[:8]
    pa = FisherPreconditioner(twin, kind=kind, damping=0.05)
    F.cross_entropy(twin(x), y).backward()
    assert_close_dict(_grads(model), _grads(twin), rtol=1e-9, atol=1e-12)  # same gradient
    pb.step(lr=0.1)
    pa.step((x, y), lr=0.1)
    assert_close_dict(_grads(model), _grads(twin), rtol=1e-9, atol=1e-12)


def test_backward_with_a_grad_scaler_reads_the_unscaled_gradients():
    # a torch.amp.GradScaler multiplies the loss by its scale: the recorded output
    # gradients are divided back, so the step equals the one without a scaler
    torch.manual_seed(28)
    model = mlp((5, 6, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt2 = torch.optim.SGD(twin.parameters(), lr=0.1)
    pb = FisherPreconditioner(model, kind="kfac", damping=0.05, source="backward")
    pb.grad_scaler = scaler  # set after construction, as with the HF Trainer's scaler
    pa = FisherPreconditioner(twin, kind="kfac", damping=0.05, source="backward")
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        pb.step(lr=0.1)
        scaler.step(opt)
        scaler.update()
        opt2.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        pa.step(lr=0.1)
        opt2.step()
        assert_close_dict(dict(model.named_parameters()), dict(twin.named_parameters()),
                          rtol=1e-9, atol=1e-12)


def test_grad_scaler_overflow_step_is_skipped_and_changes_nothing():
    torch.manual_seed(29)
    model = mlp((5, 6, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    pre = FisherPreconditioner(model, kind="kfac", damping=0.05, source="backward",
                               grad_scaler=scaler)
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("inf")  # an overflow
    before = _grads(model)
    info = pre.step(lr=0.1)
    assert not info.preconditioned and not info.curvature_updated
    assert pre.curvature is None and pre.state_dict()["step"] == 0
    assert all(not r for r in pre._capture._records.values())  # the overflowed records
    for k, g in _grads(model).items():
        assert torch.equal(g, before[k])
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()  # the next step refreshes from its own records
    assert pre.step(lr=0.1).curvature_updated


@pytest.mark.parametrize("zero", ["optimizer", "model"])
def test_natural_gradient_with_grad_scaler_skipped_step_leaves_no_stale_records(zero):
    # scaler.step skips an overflowed NaturalGradient step entirely (pre.step never runs);
    # the optimizer's zero_grad, or the model's (the HF Trainer calls model.zero_grad()),
    # drops that backward's records, so the next refresh equals a clean run's
    torch.manual_seed(30)
    model = mlp((5, 6, 3)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    twin = copy.deepcopy(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    ng = NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1),
                         FisherPreconditioner(model, kind="kfac", damping=0.05,
                                              source="backward", grad_scaler=scaler))
    ng.zero_grad()
    scaler.scale(F.cross_entropy(model(x + 3), y)).backward()
    model[2].bias.grad[0] = float("nan")  # an overflow: the scaler skips the step
    scaler.step(ng)
    scaler.update()
    assert ng.preconditioner.curvature is None  # pre.step never ran
    zero_grad = ng.zero_grad if zero == "optimizer" else model.zero_grad
    zero_grad()
    out = model(x)  # a forward before zero_grad keeps its record (its backward comes later)
    zero_grad()
    scaler.scale(F.cross_entropy(out, y)).backward()
    scaler.step(ng)
    ref = FisherPreconditioner(twin, kind="kfac", damping=0.05)
    F.cross_entropy(twin(x), y).backward()
    ref.step((x, y))
    C, R = ng.preconditioner.curvature, ref.curvature
    assert C.n_samples == 8
    for k in R.blocks:
        torch.testing.assert_close(C.blocks[k].A, R.blocks[k].A, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(C.blocks[k].G, R.blocks[k].G, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["diag", "kfac", "woodbury"])
def test_batch_refresh_runs_in_eval_mode_and_restores_train_mode(kind):
    # a train-mode dropout/BatchNorm model in a training loop: the refresh's own pass is
    # the eval-mode model's (no BatchNorm statistics update), and every module's mode is
    # restored; the curvature equals the one estimated on the model in eval mode
    torch.manual_seed(31)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(6, 3)).double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    model.train()
    F.cross_entropy(model(x), y).backward()
    model[3].eval()  # a module the user left in eval mode stays so
    stats = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
    pre = FisherPreconditioner(model, kind=kind, damping=0.1, kl_clip=None)
    g = _grads(model)
    pre.step((x, y))
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True]
    assert torch.equal(model[1].running_mean, stats[0])
    assert torch.equal(model[1].num_batches_tracked, stats[1])
    opts = {"damping_mode": "factored"} if kind == "kfac" else {}  # the preconditioner's
    ref = natgrad.estimate_curvature(copy.deepcopy(model).eval(), (x, y),
                                     kind=pre.curvature_kind, labels="empirical", **opts)
    assert_close_dict(_grads(model), ref.solve(g, 0.1), rtol=1e-9, atol=1e-12)


def test_backward_records_only_when_a_refresh_is_due():
    torch.manual_seed(26)
    model = mlp((5, 6, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    pre = FisherPreconditioner(model, kind="kfac", source="backward", update_every=3)
    flags = []
    for _ in range(4):
        flags.append(pre._capture.armed)
        _backward(model, x, y)
        assert all(not r for r in pre._capture._records.values()) or pre._capture.armed
        assert pre.step().curvature_updated == flags[-1]
    assert flags == [True, False, False, True]
    with torch.no_grad():  # an eval forward under no_grad records nothing
        model(x)
    assert all(not r for r in pre._capture._records.values())
    pre.close()
    assert pre._capture is None


def test_natural_gradient_step_closure_without_batch_with_backward_source():
    model, x, y = _problem()
    pre = FisherPreconditioner(model, kind="kfac", damping=0.1, source="backward")
    opt = NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.2), pre)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    first = float(opt.step(closure).detach())
    for _ in range(15):
        last = float(opt.step(closure).detach())
    assert last < 0.8 * first
    assert pre.state_dict()["step"] == 16


def test_natural_gradient_calls_every_torch_optimizer_hook():
    model, x, y = _problem()
    opt = _natgrad(model, "kfac", "sgd")
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("step_pre", o is opt)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("step_post", o is opt)))
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre", o is opt)))

    def sd_post(o, sd):
        calls.append(("sd_post", o is opt))
        return {**sd, "extra": 1}

    opt.register_state_dict_post_hook(sd_post)

    def load_pre(o, sd):
        calls.append(("load_pre", "extra" in sd))
        sd = dict(sd)
        del sd["extra"]
        return sd

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load_post", o is opt)))
    glob = register_optimizer_step_pre_hook(
        lambda o, a, k: calls.append(("global_pre", type(o).__name__)))
    try:
        _backward(model, x, y)
        opt.step(batch=(x, y))
    finally:
        glob.remove()
    sd = opt.state_dict()
    assert sd["extra"] == 1
    opt.load_state_dict(sd)
    # the global hook also sees the wrapped SGD's own step, inside ours
    assert calls == [("global_pre", "NaturalGradient"), ("step_pre", True),
                     ("global_pre", "SGD"), ("step_post", True),
                     ("sd_pre", True), ("sd_post", True), ("load_pre", True),
                     ("load_post", True)]
    # the wrapped optimizer's groups and state are untouched by the wrapper's init
    assert opt.param_groups is opt.optimizer.param_groups and len(opt.param_groups) == 1


# -- source="backward" for EKFAC and low-rank: dense float64 references ------------------------


class _PooledSeq(nn.Module):
    """``l1`` on (N, T, 4) tokens, tanh, mean over T, ``l2`` head: per-sample gradients of
    ``l1`` sum over the T positions."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)).mean(1))


class _Mlp(_PooledSeq):
    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def _seq_case(n=7, T=3):
    torch.manual_seed(31)
    model = _PooledSeq().double()
    x = torch.randn(n, T, 4, dtype=torch.float64)
    return model, x, torch.randint(0, 3, (n,))


def _reference_factors(model, x, y):
    """A = (1/(N·T)) Σ ã ãᵀ and G = (1/N) Σ_{n,t} b bᵀ per layer, with the output
    gradients b_nt = ∂l_n/∂s_nt from one autograd call per sample."""
    n, T = x.shape[:2]
    one = torch.ones(n, T, 1, dtype=x.dtype)
    with torch.no_grad():
        m = torch.tanh(model.l1(x)).mean(1)
    a1 = torch.cat([x, one], -1).reshape(n * T, -1)
    a2 = torch.cat([m, one[:, 0]], -1)
    b1, b2 = [], []
    for i in range(n):
        s1 = model.l1(x[i : i + 1])
        s2 = model.l2(torch.tanh(s1).mean(1))
        g1, g2 = torch.autograd.grad(F.cross_entropy(s2, y[i : i + 1], reduction="sum"), [s1, s2])
        b1.append(g1.reshape(T, -1))
        b2.append(g2.reshape(1, -1))
    b1, b2 = torch.cat(b1), torch.cat(b2)
    return {"l1": (a1.T @ a1 / (n * T), b1.T @ b1 / n), "l2": (a2.T @ a2 / n, b2.T @ b2 / n)}


def _blockvec(pg, lay, i=None):
    """The block matrix [W, b] of layer ``lay``: per sample (``i`` None) or of a dict."""
    if i is None:
        return torch.cat([pg[f"{lay}.weight"], pg[f"{lay}.bias"][..., None]], -1)
    return torch.cat([pg[f"{lay}.weight"][i], pg[f"{lay}.bias"][i][:, None]], 1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", ["seq", "mlp"])
def test_backward_ekfac_equals_dense_reference(case, reduction):
    # EKFAC: F = K diag(s) Kᵀ, K = Q_G ⊗ Q_A of the factors' eigenbases, with
    # s = (1/N) Σ_n (Q_Gᵀ g_n Q_A)² from brute-force per-sample gradients g_n
    if case == "seq":
        model, x, y = _seq_case()
        fac = _reference_factors(model, x, y)
    else:
        torch.manual_seed(32)
        model = _Mlp().double()
        x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
        fac = _reference_factors(model, x[:, None], y)  # T = 1 (uses l1, l2 only)
    pg = loop_grads(model, ce_sum, x, y)
    lam = 0.05
    pre = FisherPreconditioner(model, kind="ekfac", damping=lam, source="backward",
                               loss_reduction=reduction)
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    g = _grads(model)
    assert pre.step().curvature_updated
    for lay, (A, G) in fac.items():
        dA, QA = torch.linalg.eigh(A)
        dG, QG = torch.linalg.eigh(G)
        gn = _blockvec(pg, lay)  # (N, d_G, d_A)
        s = ((QG.T @ gn @ QA) ** 2).mean(0)
        K = torch.kron(QG, QA)
        Fd = K @ torch.diag(s.reshape(-1)) @ K.T
        V = _blockvec(g, lay, None)
        ref = torch.linalg.solve(Fd + lam * torch.eye(len(Fd), dtype=Fd.dtype),
                                 V.reshape(-1)).reshape(V.shape)
        torch.testing.assert_close(_blockvec(_grads(model), lay), ref, rtol=1e-8, atol=1e-11)
        # and the curvature's own diagonal is diag F
        D = pre.curvature.diagonal()
        torch.testing.assert_close(_blockvec(D, lay), Fd.diagonal().reshape(V.shape),
                                   rtol=1e-8, atol=1e-12)
        assert not torch.allclose(ref, V)  # the solve did something


@pytest.mark.parametrize("case", ["seq", "cnn"])
def test_backward_lowrank_equals_dense_per_sample_fisher(case):
    # F = RᵀR/N over every parameter, rows = brute-force per-sample gradients
    if case == "seq":
        model, x, y = _seq_case()
    else:
        torch.manual_seed(33)
        model = _cnn()
        x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 4, (6,))
    names = [k for k, _ in model.named_parameters()]
    pg = loop_grads(model, ce_sum, x, y)
    R = torch.cat([pg[k].reshape(len(y), -1) for k in names], 1)
    Fd = R.T @ R / len(y)
    lam = 0.1
    pre = FisherPreconditioner(model, kind="woodbury", damping=lam, source="backward")
    _backward(model, x, y)
    g = _grads(model)
    vg = torch.cat([g[k].reshape(-1) for k in names])
    ref = torch.linalg.solve(Fd + lam * torch.eye(len(Fd), dtype=Fd.dtype), vg)
    assert pre.step().curvature_updated
    got = torch.cat([model.get_parameter(k).grad.reshape(-1) for k in names])
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-11)
    assert pre.curvature.n_samples == len(y)


@pytest.mark.parametrize("kind", ["ekfac", "lowrank"])
def test_backward_ekfac_lowrank_equal_batch_source_over_steps(kind):
    # several refreshes (EKFAC: EMA in the pooled eigenbasis) match source="batch"
    model, x, y = _seq_case()
    twin = copy.deepcopy(model)
    pb = FisherPreconditioner(model, kind=kind, damping=0.05, source="backward", ema_decay=0.5)
    pa = FisherPreconditioner(twin, kind=kind, damping=0.05, ema_decay=0.5)
    for step in range(3):
        xs = x + 0.3 * step
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(xs), y).backward()
        pb.step()
        pa.step((xs, y))
        assert_close_dict(_grads(model), _grads(twin), rtol=1e-9, atol=1e-12)
    assert pb.curvature.structure() == pa.curvature.structure()


class _TwoReaders(nn.Module):
    """``q`` and ``k`` read the same input tensor (one A computed for both), or, with
    ``other``, ``k`` reads another tensor (2x), so their A differ."""

    def __init__(self, other):
        super().__init__()
        self.q, self.k, self.h = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 2)
        self.other = other

    def forward(self, x):
        u = torch.tanh(self.q(x))
        return self.h(u * self.k(2.0 * x if self.other else x))


@pytest.mark.parametrize("source", ["backward", "batch"])
@pytest.mark.parametrize("other", [False, True])
def test_layers_reading_one_input_share_its_factor(other, source):
    torch.manual_seed(34)
    model = _TwoReaders(other).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    pre = FisherPreconditioner(model, kind="kfac", source=source)
    _backward(model, x, y)
    pre.step((x, y))
    A = {k: pre.curvature.blocks[k].A[0] for k in ("q", "k")}
    xa = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)
    xk = torch.cat([2 * x if other else x, torch.ones(6, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(A["q"], xa.T @ xa / 6)
    torch.testing.assert_close(A["k"], xk.T @ xk / 6)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_backward_max_factor_dim_keeps_the_large_side_diagonal(kind):
    # a 6-output layer with max_factor_dim=5: G = diag((1/N) Σ_n b_n²), A full; the
    # solve is that of diag(G) ⊗ A (EKFAC: s re-fitted in the basis I ⊗ Q_A)
    torch.manual_seed(35)
    model = nn.Linear(4, 6).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 6, (10,))
    with torch.no_grad():
        p = model(x).softmax(-1)
    xa = torch.cat([x, torch.ones(10, 1, dtype=torch.float64)], 1)
    b = p - F.one_hot(y, 6).double()
    A, G = xa.T @ xa / 10, torch.diag((b * b).mean(0))
    if kind == "kfac":
        Fd = torch.kron(G, A)
    else:
        QA = torch.linalg.eigh(A)[1].contiguous()
        K = torch.kron(torch.eye(6, dtype=torch.float64), QA)
        gn = b[:, :, None] * xa[:, None, :]  # per-sample [∇W, ∇b]
        s = ((gn @ QA) ** 2).mean(0)
        Fd = K @ torch.diag(s.reshape(-1)) @ K.T
    lam = 1e-2
    pre = FisherPreconditioner(model, kind=kind, damping=lam, kfac_damping="exact",
                               source="backward", max_factor_dim=5)
    _backward(model, x, y)
    V = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)
    ref = torch.linalg.solve(Fd + lam * torch.eye(30, dtype=torch.float64),
                             V.reshape(-1)).reshape(6, 5)
    pre.step()
    assert pre.curvature.blocks[""].G.shape == (1, 6)  # kept as its diagonal
    torch.testing.assert_close(model.weight.grad, ref[:, :4])
    torch.testing.assert_close(model.bias.grad, ref[:, 4])


@pytest.mark.parametrize("source", ["backward", "batch"])
def test_kfac_reduce_factors_equal_their_definition(source):
    # K-FAC-reduce: A = (1/N) Σ_n ā ā ᵀ (ā = mean over t of ã_nt), G = (1/N) Σ_n b̄ b̄ᵀ
    # (b̄ = Σ_t b_nt), output gradients from one autograd call per sample; the head
    # (T = 1) gets the expand factors, which agree there
    model, x, y = _seq_case()
    n, T = x.shape[:2]
    ref = _reference_factors(model, x, y)  # expand; b_nt per sample below
    xa = torch.cat([x, torch.ones(n, T, 1, dtype=x.dtype)], -1).mean(1)
    bbar = []
    for i in range(n):
        s1 = model.l1(x[i : i + 1])
        loss = F.cross_entropy(model.l2(torch.tanh(s1).mean(1)), y[i : i + 1], reduction="sum")
        bbar.append(torch.autograd.grad(loss, s1)[0].sum(1))
    bbar = torch.cat(bbar)
    pre = FisherPreconditioner(model, kind="kfac", source=source, kfac_approx="reduce")
    _backward(model, x, y)
    pre.step((x, y))
    blk = pre.curvature.blocks
    torch.testing.assert_close(blk["l1"].A[0], xa.T @ xa / n)
    torch.testing.assert_close(blk["l1"].G[0], bbar.T @ bbar / n)
    torch.testing.assert_close(blk["l2"].A[0], ref["l2"][0])
    torch.testing.assert_close(blk["l2"].G[0], ref["l2"][1])
    assert not torch.allclose(blk["l1"].G[0], ref["l1"][1])  # reduce differs from expand
    with pytest.raises(ValueError, match="kfac_approx"):
        FisherPreconditioner(model, kind="kfac", kfac_approx="sum")


def _linear_factors(model, x, y):
    """Brute-force K-FAC factors of one Linear with empirical labels (mean-loss scale)."""
    n = x.shape[0]
    with torch.no_grad():
        p = model(x).softmax(-1)
    xa = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1)
    b = p - F.one_hot(y, p.shape[1]).to(x.dtype)
    return xa.T @ xa / n, b.T @ b / n


@pytest.mark.parametrize("mode", ["factored", "exact"])
def test_kfac_ema_refresh_updates_the_held_factors_in_place(mode):
    """With nothing else holding the curvature, a refresh lerps its factors in place
    (same object, same storage) to d·A₁ + (1-d)·A₂, and the next solve uses them (no
    stale cached inverse): the dense Kronecker solve with the hand-averaged factors."""
    torch.manual_seed(41)
    model = nn.Linear(4, 3).double()
    d, lam = 0.8, 1e-2
    xs = [torch.randn(9, 4, dtype=torch.float64) for _ in range(2)]
    ys = [torch.randint(0, 3, (9,)) for _ in range(2)]
    pre = FisherPreconditioner(model, kind="kfac", damping=lam, update_every=1, ema_decay=d,
                               kfac_damping=mode)
    _backward(model, xs[0], ys[0])
    pre.step((xs[0], ys[0]))
    held = pre._curvature  # inspected without handing it out (see the `curvature` property)
    ptr = (held.blocks[""].A.data_ptr(), held.blocks[""].G.data_ptr())
    del held
    (A1, G1), (A2, G2) = (_linear_factors(model, x, y) for x, y in zip(xs, ys, strict=True))
    _backward(model, xs[1], ys[1])
    V = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)
    pre.step((xs[1], ys[1]))
    blk = pre.curvature.blocks[""]
    assert (blk.A.data_ptr(), blk.G.data_ptr()) == ptr and pre.curvature.n_samples == 18
    A, G = d * A1 + (1 - d) * A2, d * G1 + (1 - d) * G2
    torch.testing.assert_close(blk.A[0], A)
    torch.testing.assert_close(blk.G[0], G)
    if mode == "exact":
        M = torch.kron(G, A) + lam * torch.eye(15, dtype=torch.float64)
    else:
        pi = ((A.trace() / 5) / (G.trace() / 3)) ** 0.5
        M = torch.kron(G + lam**0.5 / pi * torch.eye(3, dtype=torch.float64),
                       A + pi * lam**0.5 * torch.eye(5, dtype=torch.float64))
    ref = torch.linalg.solve(M, V.reshape(-1)).reshape(3, 5)
    torch.testing.assert_close(model.weight.grad, ref[:, :4])
    torch.testing.assert_close(model.bias.grad, ref[:, 4])


def _state_tensors(state, prefix=""):
    if torch.is_tensor(state):
        return [(prefix, state)]
    if isinstance(state, dict):
        return [t for k, v in state.items() for t in _state_tensors(v, f"{prefix}.{k}")]
    return []


@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac"])
def test_ema_refresh_leaves_a_held_curvature_alone(kind, mlp_case):
    """``snapshot = pre.curvature`` is not changed by the next refresh (a new curvature
    is built), which equals the same preconditioner's in-place refresh."""
    model, x, y = mlp_case
    kw = dict(kind=kind, damping=0.1, update_every=1, ema_decay=0.7)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]
    pa, pb = FisherPreconditioner(model, **kw), FisherPreconditioner(model, **kw)
    for p in (pa, pb):
        _backward(model, *batches[0])
        p.step(batches[0])
    snapshot = pa.curvature
    before = {k: v.clone() for k, v in _state_tensors(snapshot.state_dict())}
    assert before
    before_diag = snapshot.diagonal()
    scaled = snapshot * 2.0  # derived, may share the snapshot's tensors
    scaled_diag = scaled.diagonal()
    first_b = id(pb._curvature)  # not handed out: pb refreshes in place
    for p in (pa, pb):
        _backward(model, *batches[1])
        p.step(batches[1])
    assert pa.curvature is not snapshot and id(pb.curvature) == first_b
    assert_close_dict(snapshot.diagonal(), before_diag, rtol=0, atol=0)
    assert_close_dict(scaled.diagonal(), scaled_diag, rtol=0, atol=0)
    for k, v in _state_tensors(snapshot.state_dict()):
        assert torch.equal(v, before[k]), k
    assert_close_dict(pa.curvature.diagonal(), pb.curvature.diagonal(), rtol=1e-12, atol=1e-14)
    assert pa.curvature.n_samples == pb.curvature.n_samples == len(y)


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_ema_refresh_leaves_a_derived_curvature_alone(kind, mlp_case):
    """``scaled = 2 * pre.curvature`` (the curvature itself not kept) may share its
    tensors; the next refresh must not change it (a reference count of the curvature
    object alone cannot see this)."""
    model, x, y = mlp_case
    pre = FisherPreconditioner(model, kind=kind, damping=0.1, update_every=1, ema_decay=0.7)
    _backward(model, x[:5], y[:5])
    pre.step((x[:5], y[:5]))
    scaled = pre.curvature * 2.0
    before = {k: v.clone() for k, v in _state_tensors(scaled.state_dict())}
    _backward(model, x[5:], y[5:])
    pre.step((x[5:], y[5:]))
    for k, v in _state_tensors(scaled.state_dict()):
        assert torch.equal(v, before[k]), k


def test_backward_hooks_are_on_the_model_only_while_armed():
    # an unarmed capture leaves the modules unhooked (a hooked call costs more even when
    # its hook returns at once); arming puts them back
    torch.manual_seed(27)
    model = mlp((5, 6, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    pre = FisherPreconditioner(model, kind="kfac", source="backward", update_every=2)
    seen = []
    for _ in range(4):
        seen.append((pre._capture.armed, [len(m._forward_hooks) for m in linears],
                     len(model._forward_pre_hooks)))
        _backward(model, x, y)
        pre.step(lr=0.1)
    # the first armed window also holds the one-time hook keeping the first call's inputs
    # for the outside-use check (removed at that call)
    assert seen == [(True, [1, 1], 2), (False, [0, 0], 0), (True, [1, 1], 1), (False, [0, 0], 0)]
    pre.close()
    assert all(not m._forward_hooks for m in linears) and not model._forward_pre_hooks


@pytest.mark.parametrize("user_hook_first", [True, False])
def test_backward_capture_sees_the_layer_output_under_a_user_hook(user_hook_first):
    """A forward hook of the user's, added before or after the preconditioner, replaces the
    layer's output with 2·s; K-FAC's G is of the gradient at the layer's own output s,
    computed here by hand: b_n = ∂l_n/∂s_n = 2 (softmax(2 s_n) - e_{y_n}),
    G = (1/N) Σ b_n b_nᵀ."""
    torch.manual_seed(28)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    if user_hook_first:
        model.register_forward_hook(lambda m, args, out: 2 * out)
    pre = FisherPreconditioner(model, kind="kfac", source="backward", kl_clip=None)
    if not user_hook_first:
        model.register_forward_hook(lambda m, args, out: 2 * out)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    with torch.no_grad():
        s = x @ model.weight.T + model.bias
        b = 2 * (torch.softmax(2 * s, 1) - F.one_hot(y, 3).double())
        a = torch.cat([x, torch.ones(7, 1, dtype=torch.float64)], 1)
    (blk,) = pre.curvature.blocks.values()
    torch.testing.assert_close(blk.G[0], b.T @ b / 7)
    torch.testing.assert_close(blk.A[0], a.T @ a / 7)


def test_backward_ema_of_layers_reading_one_input():
    """Two layers read the same input, so their K-FAC A factor is computed once; each
    block must still own it: the in-place EMA of a refresh updates the blocks one by one
    (a shared A was averaged twice, d²·A_old + (1 - d²)·A_new). Against the EMA by hand."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.l1(x) + self.l2(x)

    torch.manual_seed(29)
    model = Two().double()
    pre = FisherPreconditioner(model, kind="kfac", source="backward", update_every=1,
                               ema_decay=0.5, kl_clip=None)
    refs = []
    for _ in range(2):
        x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        a = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)
        refs.append(a.T @ a / 6)
    want = 0.5 * refs[0] + 0.5 * refs[1]
    blocks = list(pre._curvature.blocks.values())
    assert len(blocks) == 2 and blocks[0].A.data_ptr() != blocks[1].A.data_ptr()
    for blk in blocks:
        torch.testing.assert_close(blk.A[0], want)


@pytest.mark.parametrize("call", ["per_sample_grads", "fisher", "fisher_vmap", "kfac", "laplace"])
def test_natgrads_own_passes_are_not_recorded_by_the_backward_source(call):
    # a Fisher, per-sample gradients or a predictive computed between backward() and
    # step() (e.g. for logging) ran forwards and backwards that the backward source
    # recorded as the user's: K-FAC's G 514x off, silently (or a vmap crash)
    import copy

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))

    def factors(extra):
        m = copy.deepcopy(base)
        pre = natgrad.FisherPreconditioner(m, kind="kfac", source="backward", update_every=1,
                                           kl_clip=None)
        nn.functional.cross_entropy(m(x), y).backward()
        if extra == "per_sample_grads":
            natgrad.per_sample_grads(m, (x, y))
        elif extra == "fisher":
            natgrad.estimate_fisher(m, (x, y))
        elif extra == "fisher_vmap":
            natgrad.estimate_fisher(m, (x, y), engine="vmap")
        elif extra == "kfac":
            natgrad.estimate_curvature(m, (x, y), kind="kfac")
        elif extra == "laplace":
            d = natgrad.estimate_fisher(m, (x, y), labels="exact")
            natgrad.fisher_uncertainty(m, x[:4], d, prior_precision=1.0)
        pre.step()
        return {k: (b.A.clone(), b.G.clone()) for k, b in pre.curvature.blocks.items()}

    want, got = factors(None), factors(call)
    for k in want:
        torch.testing.assert_close(got[k][0], want[k][0], rtol=0, atol=0)
        torch.testing.assert_close(got[k][1], want[k][1], rtol=0, atol=0)


def test_backward_source_warns_once_under_a_global_forward_hook():
    # A global hook that replaces the outputs (here doubles each Linear's) runs before the
    # capture's layer hooks: the recorded output gradient is the doubled output's, half
    # the layer's own (a diagonal Fisher 4x too small, silently, before this warning).
    torch.manual_seed(26)
    model = mlp((5, 6, 3)).double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))

    def double(mod, inp, out):
        return out * 2 if isinstance(mod, nn.Linear) else None

    pre = FisherPreconditioner(model, kind="diag", damping=0.3, source="backward")
    h = torch.nn.modules.module.register_module_forward_hook(double)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(2):  # two recorded forwards, two steps: one warning
                _backward(model, x, y)
                pre.step()
    finally:
        h.remove()
    ours = [w for w in seen if "global forward hook" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, UserWarning)
    assert "source='backward'" in str(ours[0].message)
    assert "Remove the hook" in str(ours[0].message) and "kind='diag'" in str(ours[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no hook: no warning
        _backward(model, x, y)
        pre.step()


def test_load_state_dict_moves_the_curvature_to_the_models_dtype():
    """A float32 run's K-FAC state loaded into the float64 copy of the model solves in
    float64, like a refresh there would: equal to the dense float64 solve
    ((G ⊗ A + λI)⁻¹ vec[W b], with the saved factors cast to float64, PSD parts) to 1e-10.
    The curvature stayed float32: a relative error of ~1e-5, silently."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    pre = FisherPreconditioner(model, kind="kfac", kfac_damping="exact", kl_clip=None,
                               update_every=100)
    _backward(model, x, y)
    pre.step((x, y))
    state = pre.state_dict()
    model64 = copy.deepcopy(model).double()
    lam = 1e-3
    pre64 = FisherPreconditioner(model64, kind="kfac", kfac_damping="exact", kl_clip=None,
                                 damping=lam, update_every=100)
    pre64.load_state_dict(state)
    x64 = torch.randn(16, 5, dtype=torch.float64)
    _backward(model64, x64, y)
    g = {k: p.grad.clone() for k, p in model64.named_parameters()}
    assert not pre64.step((x64, y)).curvature_updated
    assert all(t.dtype == torch.float64 for t in pre64.curvature.diagonal().values())
    def psd(M):  # the factor's PSD part (a saved float32 G of a softmax has ~-3e-8 eigenvalues)
        e, Q = torch.linalg.eigh(M.double())
        return Q @ torch.diag(e.clamp(min=0)) @ Q.T

    for i in (0, 2):
        A = psd(state["curvature"]["layers"][str(i)]["A"][0])
        G = psd(state["curvature"]["layers"][str(i)]["G"][0])
        M = torch.cat([g[f"{i}.weight"], g[f"{i}.bias"][:, None]], 1)
        dense = torch.kron(G, A) + lam * torch.eye(G.shape[0] * A.shape[0], dtype=torch.float64)
        ref = torch.linalg.solve(dense, M.reshape(-1)).reshape(M.shape)
        torch.testing.assert_close(model64[i].weight.grad, ref[:, :-1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(model64[i].bias.grad, ref[:, -1], rtol=1e-10, atol=1e-10)


def test_construction_log_counts_the_layers_the_refresh_puts_in_kronecker_form(caplog):
    """The INFO line at construction counts Embedding and grouped-conv layers as Kronecker
    (it counted only Linear and plain convolutions: "0 layers in Kronecker form" for an
    Embedding + grouped Conv1d model that K-FAC covers fully); reference: the curvature's
    own structure() after a refresh."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4)
            self.conv = nn.Conv1d(4, 4, 3, groups=2)
            self.head = nn.Linear(4, 3)

        def forward(self, ids):
            return self.head(self.conv(self.emb(ids).transpose(1, 2)).mean(2))

    torch.manual_seed(0)
    model = Net()
    with caplog.at_level("INFO", logger="natgrad.optim.precondition"):
        pre = FisherPreconditioner(model, kind="kfac", kl_clip=None)
    (line,) = [r.getMessage() for r in caplog.records if "Kronecker form" in r.getMessage()]
    ids, y = torch.randint(0, 9, (6, 5)), torch.randint(0, 3, (6,))
    F.cross_entropy(model(ids), y).backward()
    pre.step((ids, y))
    structure = pre.curvature.structure()
    n_kron = len({k.rsplit(".", 1)[0] for k, s in structure.items() if s == "kfac"})
    n_diag = sum(s == "diag" for s in structure.values())
    assert (n_kron, n_diag) == (3, 0)
    assert f"{n_kron} layers in Kronecker form; {n_diag} parameter tensors left diagonal" in line


def test_backward_source_ignores_a_deep_copy_of_the_model():
    """copy.deepcopy(model) while the capture's hooks are on copies them; the copy's passes
    (a twin trained alongside, an ensemble member) were recorded as extra samples of the
    original's layers (parameters off by 0.17 after 3 K-FAC steps). Reference: the same
    training without the twin, bit for bit."""
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    runs = []
    for with_twin in (False, True):
        torch.manual_seed(1)
        model = mlp((5, 8, 3)).double()
        pre = FisherPreconditioner(model, kind="kfac", source="backward", update_every=1,
                                   kl_clip=None)
        twin = copy.deepcopy(model) if with_twin else None
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if twin is not None:
                loss = loss + F.cross_entropy(twin(x + 0.1), y)
            loss.backward()
            pre.step()
            opt.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac"])
def test_a_state_loaded_before_the_model_is_cast_follows_the_model(kind):
    """Lightning restores callback states before it casts and moves the module: a state
    loaded into a float32 model that is then made float64 continues in float64, equal to
    the uninterrupted float64 run (the curvature was cast at load, to float32, and kept
    that dtype: 3e-3 apart after 6 steps for diag)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = [(torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,)))
            for _ in range(6)]  # fmt: skip

    def run(model, pre, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            _backward(model, x, y)
            pre.step((x, y))
            opt.step()

    def make(model):
        pre = FisherPreconditioner(model, kind=kind, damping=1e-4, update_every=1,
                                   kl_clip=None)  # fmt: skip
        return pre, torch.optim.SGD(model.parameters(), lr=0.1)

    whole = copy.deepcopy(base)
    pre, opt = make(whole)
    run(whole, pre, opt, data)
    first = copy.deepcopy(base)
    pre1, opt1 = make(first)
    run(first, pre1, opt1, data[:3])
    state, opt_state = pre1.state_dict(), opt1.state_dict()
    resumed = copy.deepcopy(first).float()  # built in float32 as a framework does
    pre2, opt2 = make(resumed)
    pre2.load_state_dict(state)  # loaded first ...
    resumed.double()  # ... then the model is cast (and its weights loaded)
    resumed.load_state_dict(first.state_dict())
    opt2.load_state_dict(opt_state)
    run(resumed, pre2, opt2, data[3:])
    for (k, p), q in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), k


def test_a_loaded_curvature_read_before_a_step_is_on_the_parameters():
    """`pre.curvature` read right after a load is on the parameters' dtype, as after a
    step (the placement happens where the parameters are first read)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    pre = FisherPreconditioner(model, kind="kfac", kl_clip=None, update_every=100)
    _backward(model, x, y)
    pre.step((x, y))
    pre64 = FisherPreconditioner(copy.deepcopy(model).double(), kind="kfac", kl_clip=None)
    pre64.load_state_dict(pre.state_dict())
    assert {t.dtype for t in pre64.curvature.diagonal().values()} == {torch.float64}


class _Parts(nn.Module):
    """A model whose training step may call its parts (``body``, ``head``) directly; the
    head can be checkpointed (``ckpt``: ``use_reentrant``)."""

    def __init__(self, ckpt=None):
        super().__init__()
        self.l1, self.l2, self.ckpt = nn.Linear(5, 6), nn.Linear(6, 3), ckpt

    def body(self, x):
        return torch.tanh(self.l1(x))

    def head(self, h):
        if self.ckpt is None:
            return self.l2(h)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.l2, h, use_reentrant=self.ckpt)

    def forward(self, x):
        return self.head(self.body(x))


def _parts_factors(model, x, y):
    """Brute-force K-FAC factors of ``_Parts`` (empirical labels, one autograd call per
    sample): A = (1/N) Σ ã ãᵀ, G = (1/N) Σ b bᵀ with b_n = ∂l_n/∂s_n."""
    n, one = x.shape[0], torch.ones(x.shape[0], 1, dtype=x.dtype)
    bs = {"l1": [], "l2": []}
    hs = []
    for i in range(n):
        s1 = model.l1(x[i : i + 1])
        h = torch.tanh(s1)
        s2 = model.l2(h)
        g1, g2 = torch.autograd.grad(F.cross_entropy(s2, y[i : i + 1], reduction="sum"), [s1, s2])
        bs["l1"].append(g1)
        bs["l2"].append(g2)
        hs.append(h.detach())
    a = {"l1": torch.cat([x, one], 1), "l2": torch.cat([torch.cat(hs), one], 1)}
    out = {}
    for k in ("l1", "l2"):
        b = torch.cat(bs[k])
        out[k] = (a[k].T @ a[k] / n, b.T @ b / n)
    return out


@pytest.mark.parametrize(
    ("how", "ckpt"),
    [("model", None), ("parts", None), ("parts", False), ("parts", True), ("model", True),
     ("shared", None), ("shared", False)],
)  # fmt: skip
def test_backward_forwards_are_told_apart_without_a_model_call_and_shared_layers_left_out(
    how, ckpt
):
    """Gradient accumulation over two micro-batches of 4 gives the K-FAC factors of the
    8-sample batch (brute-force per-sample reference) however the step reaches the layers:
    ``model(x)``; the model's parts called directly (``model.head(model.body(x))``, as a
    LightningModule's training_step does), where the two micro-batches were pooled as
    positions of 4 samples (factors 0.16 off); with the head checkpointed (reentrant or
    not); and with layer ``l1`` shared with another model that trains in the same step,
    whose rows were counted as this model's (0.07 off; now left out with a warning)."""
    torch.manual_seed(3)
    model = _Parts(ckpt).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    ref = _parts_factors(model, x, y)
    other = nn.Sequential(model.l1, nn.Tanh(), nn.Linear(6, 2)).double()
    pre = FisherPreconditioner(model, kind="kfac", source="backward", update_every=1,
                               kl_clip=None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for xs, ys in zip(x.split(4), y.split(4), strict=True):
            out = model.head(model.body(xs)) if how == "parts" else model(xs)
            if how == "shared":
                other(torch.randn(4, 5, dtype=torch.float64)).square().mean().backward()
            (F.cross_entropy(out, ys) / 2).backward()
        pre.step()
    shared = [w for w in seen if "outside the model's own forward" in str(w.message)]
    assert len(shared) == (1 if how == "shared" else 0)
    for k, (A, G) in ref.items():
        blk = pre.curvature.blocks[k]
        torch.testing.assert_close(blk.A[0], A)
        torch.testing.assert_close(blk.G[0], G)


@pytest.mark.parametrize("sizes", [(4, 4), (6, 2)])
def test_backward_unequal_micro_batches_read_as_the_mean_over_all_samples_and_warn(sizes):
    """Micro-batches whose summed losses are divided by the total count give the K-FAC
    factors of the whole batch (brute-force reference) for any sizes; unequal sizes warn
    once, since a loop dividing each micro-batch's mean by their number instead (as
    Lightning does) would be silently off (the factor G of a 6 + 2 split, 0.31 off
    relative here)."""
    torch.manual_seed(5)
    model = _Parts().double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    ref = _parts_factors(model, x, y)
    pre = FisherPreconditioner(model, kind="kfac", source="backward", update_every=1,
                               kl_clip=None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):  # the warning is given once
            model.zero_grad()
            for xs, ys in zip(x.split(list(sizes)), y.split(list(sizes)), strict=True):
                (F.cross_entropy(model(xs), ys, reduction="sum") / 8).backward()
            pre.step()
            for k, (A, G) in ref.items():
                blk = pre.curvature.blocks[k]
                torch.testing.assert_close(blk.A[0], A)
                torch.testing.assert_close(blk.G[0], G)
    unequal = [w for w in seen if "unequal sizes" in str(w.message)]
    assert len(unequal) == (1 if sizes[0] != sizes[1] else 0)
    if unequal:
        assert "drop_last=True" in str(unequal[0].message)


def _accumulate(model, x, y, call, k=2, scaler=None):
    """Back-propagate ``k`` micro-batches of (x, y), each its mean loss over ``k``."""
    for xs, ys in zip(x.chunk(k), y.chunk(k), strict=True):
        loss = F.cross_entropy(call(xs), ys) / k
        (scaler.scale(loss) if scaler is not None else loss).backward()


def _assert_parts_factors(pre, ref):
    for k, (A, G) in ref.items():
        blk = pre.curvature.blocks[k]
        torch.testing.assert_close(blk.A[0], A)
        torch.testing.assert_close(blk.G[0], G)


def _fresh_parts(ckpt=None):
    torch.manual_seed(3)
    model = _Parts(ckpt).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    ref = _parts_factors(model, x, y)  # before the preconditioner records anything
    pre = FisherPreconditioner(model, kind="kfac", source="backward", update_every=1,
                               kl_clip=None)
    return model, x, y, pre, ref


def test_backward_after_an_interrupted_forward_counts_forwards_afresh():
    """A KeyboardInterrupt inside the model's forward (torch then skips its closing hooks)
    left the capture believing every later call was the model calling itself: the next
    step's micro-batches were pooled as positions (K-FAC factors 0.5 off)."""
    model, x, y, pre, ref = _fresh_parts()

    def boom(module, args):
        raise KeyboardInterrupt

    handle = model.l2.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        model(x)
    handle.remove()
    _accumulate(model, x, y, model)
    pre.step()
    _assert_parts_factors(pre, ref)


def test_backward_parts_pattern_reads_the_grad_scalers_scale():
    """With a training step that calls the model's parts, the loss scale was never read
    (a diagonal 1024² too large); it is read when each forward starts."""
    model, x, y, pre, ref = _fresh_parts()
    pre.grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _accumulate(model, x, y, lambda xs: model.head(model.body(xs)), scaler=pre.grad_scaler)
    pre.step()
    _assert_parts_factors(pre, ref)


def test_backward_evaluation_call_starts_no_forward():
    """A model call under torch.no_grad (a validation step, another batch size) opened a
    forward that the next parts-pattern records joined: a confusing batch-size error, or
    with reentrant checkpointing the recomputed layers dropped as 'shared' (0.83 off)."""
    for ckpt in (None, True):
        model, x, y, pre, ref = _fresh_parts(ckpt)
        with torch.no_grad():
            model(torch.randn(5, 5, dtype=torch.float64))
        _accumulate(model, x, y, lambda xs, m=model: m.head(m.body(xs)))
        pre.step()
        _assert_parts_factors(pre, ref)


def test_backward_one_forward_back_propagated_in_two_calls_sums_them():
    """``l1.backward(retain_graph=True); l2.backward()`` on one forward: the recorded output
    gradient was the last call's only (0.75 off); it is their sum."""
    model, x, y, pre, ref = _fresh_parts()
    out = model(x)
    (F.cross_entropy(out, y) * 0.25).backward(retain_graph=True)
    (F.cross_entropy(out, y) * 0.75).backward()
    pre.step()
    _assert_parts_factors(pre, ref)


def test_backward_reentrant_recomputation_across_several_forwards_is_refused():
    """Reentrant checkpointing recomputes layers inside the backward; one backward through
    two forwards cannot tell whose samples they are (they were pooled as positions, 0.5
    off, or a misleading 'reached in some forwards' error): a named error. Non-reentrant
    checkpointing records no recomputation and stays exact."""
    for ckpt in (True, False):
        model, x, y, pre, ref = _fresh_parts(ckpt)
        (sum(F.cross_entropy(model(xs), ys) for xs, ys in zip(x.chunk(2), y.chunk(2),
                                                              strict=True)) / 2).backward()
        if ckpt:
            with pytest.raises(ValueError, match="recomputed .*use_reentrant=False"):
                pre.step()
        else:
            pre.step()
            _assert_parts_factors(pre, ref)


@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac"])
def test_model_cast_after_a_refresh_continues_in_the_new_dtype(kind):
    """model.double() after the first refresh: the EMA kept averaging into the float32
    curvature (relative error ~1e-7 against float64; found by review). It now continues
    in the parameters' dtype: with ema_decay=0 the step equals a fresh float64
    preconditioner's."""
    torch.manual_seed(3)
    model = mlp((5, 7, 4))
    x, y = torch.randn(8, 5), torch.randint(0, 4, (8,))
    pre = FisherPreconditioner(model, kind=kind, damping=0.05, update_every=1, ema_decay=0.0,
                               kl_clip=None)
    _backward(model, x, y)
    pre.step((x, y))
    model.double()
    twin = copy.deepcopy(model)
    fresh = FisherPreconditioner(twin, kind=kind, damping=0.05, kl_clip=None)
    xd = x.double()
    for m, p in ((model, pre), (twin, fresh)):
        m.zero_grad(set_to_none=True)
        F.cross_entropy(m(xd), y).backward()
        p.step((xd, y))
    assert all(v.dtype == torch.float64 for v in pre.curvature.diagonal().values())
    assert_close_dict(_grads(model), _grads(twin), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac"])
def test_reading_the_curvature_does_not_change_the_trajectory(kind):
    """Reading ``pre.curvature`` makes the next refresh average out of place (``ema``)
    instead of in place (``ema_``); the two rounded differently, so logging the curvature
    moved the parameters by ~1e-7 after 10 steps (found by review). Now bit-identical."""
    torch.manual_seed(4)
    x, y = torch.randn(16, 5), torch.randint(0, 4, (16,))
    runs = []
    for read in (False, True):
        torch.manual_seed(0)
        model = mlp((5, 7, 4))
        pre = FisherPreconditioner(model, kind=kind, update_every=2)
        opt = NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1), pre)
        for _ in range(8):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step(batch=(x, y))
            if read:
                pre.curvature  # noqa: B018  # the read is the point
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_a_second_backward_preconditioner_replaces_the_first_hooks():
    """Lightning's second fit (or lr_find) rebuilds the preconditioner in
    configure_optimizers: the first one's capture kept its hooks and recorded every later
    batch, never taken (memory grew without bound; found by review). One capture per
    model: the older one's hooks are removed, with a warning; the new one is exact."""
    torch.manual_seed(0)
    model = mlp((5, 7, 4)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 4, (8,))
    hooks = lambda: len(model._forward_pre_hooks) + sum(  # noqa: E731
        len(m._forward_hooks) for m in model.modules())
    bare = hooks()
    first = FisherPreconditioner(model, source="backward", kl_clip=None)
    armed = hooks()
    with pytest.warns(UserWarning, match="already had one; the older one's hooks are removed"):
        second = FisherPreconditioner(model, source="backward", kl_clip=None)
    assert hooks() == armed > bare  # not twice
    twin = copy.deepcopy(model)
    ref = FisherPreconditioner(twin, kl_clip=None)
    _backward(model, x, y)
    second.step()
    _backward(twin, x, y)
    ref.step((x, y))
    assert_close_dict(_grads(model), _grads(twin), rtol=1e-10, atol=1e-12)
    second.close()
    assert hooks() == bare
    del first


@pytest.mark.parametrize("kind", ["diag", "kfac"])
@pytest.mark.parametrize("lik", ["bernoulli", "gaussian"])
def test_backward_element_mean_reads_torch_default_losses(kind, lik):
    """``nn.BCEWithLogitsLoss()`` / ``nn.MSELoss()`` with their default reduction average
    over every one of the ``N·D`` outputs; ``loss_reduction="element_mean"`` scales the
    recorded gradients by ``N·D`` (read as ``"mean"`` they were ``1/D²`` too small, found by
    review). Reference: ``source="batch"`` with the empirical labels of the same
    likelihood (checked against per-sample loops elsewhere); MSE is the Gaussian NLL with
    σ² = 1/2, i.e. ``Gaussian(sigma=0.5 ** 0.5)``."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    twin = copy.deepcopy(model)
    x = torch.randn(8, 3, dtype=torch.float64)
    if lik == "bernoulli":
        y = torch.randint(0, 2, (8, 5)).double()
        likelihood, loss_fn = "bernoulli", F.binary_cross_entropy_with_logits
    else:
        y = torch.randn(8, 5, dtype=torch.float64)
        likelihood, loss_fn = natgrad.Gaussian(sigma=0.5 ** 0.5), F.mse_loss
    pb = FisherPreconditioner(model, likelihood, kind=kind, damping=0.05, source="backward",
                              loss_reduction="element_mean", kl_clip=None)
    pa = FisherPreconditioner(twin, likelihood, kind=kind, damping=0.05, kl_clip=None)
    for m in (model, twin):
        m.zero_grad(set_to_none=True)
        loss_fn(m(x), y).backward()
    pb.step()
    pa.step((x, y))
    assert_close_dict(_grads(model), _grads(twin), rtol=1e-9, atol=1e-12)
