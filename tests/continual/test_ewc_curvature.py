"""EWC on any curvature: penalty and gradient against dense float64 quadratic forms."""

from __future__ import annotations

import pytest
import torch

import natgrad
from tests.reference import DenseCurvature, flatten_params, unflatten_params

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()


def _dense(model, seed, n=20):
    shapes = {k: p.shape for k, p in model.named_parameters()}
    p = sum(s.numel() for s in shapes.values())
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, 6, generator=g, dtype=torch.float64)  # rank 6: structured, singular
    return DenseCurvature(a @ a.T, shapes, n)


def _theta(model):
    return flatten_params(dict(model.named_parameters()), NAMES)


def _move(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _grad(model, value):
    model.zero_grad()
    value.backward()
    return flatten_params({k: p.grad for k, p in model.named_parameters()}, NAMES)


def _check_penalty_against(model, curv, mat, lam, seed):
    """EWC's penalty ``(λ/2) dᵀ M d`` and its gradient ``λ M d`` after a move ``d`` from
    the anchor, against the dense matrix ``mat``."""
    star = _theta(model)
    ewc = natgrad.EWC(model, curv, lam=lam)
    _move(model, seed)
    d = _theta(model) - star
    pen = ewc.penalty()
    assert float(pen.detach()) == pytest.approx(lam / 2 * float(d @ mat @ d), rel=1e-9)
    torch.testing.assert_close(_grad(model, pen), lam * mat @ d, rtol=1e-8, atol=1e-10)


def test_dense_penalty_and_gradient_match_the_quadratic_form():
    model = _model()
    curv = _dense(model, 1)
    star = _theta(model)
    ewc = natgrad.EWC(model, curv, lam=3.0)
    _move(model, 2)
    d = _theta(model) - star
    pen = ewc.penalty()
    assert float(pen.detach()) == pytest.approx(1.5 * float(d @ curv.matrix @ d), rel=1e-12)
    torch.testing.assert_close(_grad(model, pen), 3.0 * curv.matrix @ d, rtol=1e-10, atol=1e-12)


def test_separate_terms_add_and_online_folds_the_sum():
    model = _model(1)
    c1, c2 = _dense(model, 3), _dense(model, 4)
    a1 = _theta(model)
    sep = natgrad.EWC(model, c1, lam=2.0)
    onl = natgrad.EWC(model, c1, lam=2.0, mode="online", gamma=0.5)
    _move(model, 5)
    a2 = _theta(model)
    sep.consolidate(c2)
    onl.consolidate(c2)
    assert sep.num_tasks == onl.num_tasks == 2
    _move(model, 6)
    t = _theta(model)
    d1, d2 = t - a1, t - a2
    want_sep = d1 @ c1.matrix @ d1 + d2 @ c2.matrix @ d2
    assert float(sep.penalty()) == pytest.approx(float(want_sep), rel=1e-12)
    # online: F ← γ F₁ + F₂ around the newest anchor
    want_onl = d2 @ (0.5 * c1.matrix + c2.matrix) @ d2
    assert float(onl.penalty()) == pytest.approx(float(want_onl), rel=1e-12)


def test_suggest_lambda_closed_form_and_lam_scale():
    model = _model(2)
    curv = _dense(model, 7, n=50)
    p = curv.matrix.shape[0]
    want = 0.1 * 50 * p / float(torch.diagonal(curv.matrix).sum())
    assert natgrad.EWC.suggest_lambda(curv, 0.1) == pytest.approx(want, rel=1e-12)
    star = _theta(model)
    ewc = natgrad.EWC(model, curv, lam=123.0, lam_scale=0.1)
    _move(model, 8)
    d = _theta(model) - star
    assert float(ewc.penalty()) == pytest.approx(0.5 * want * float(d @ curv.matrix @ d), rel=1e-12)
    # scale-free: multiplying the curvature by 100 leaves the penalty unchanged
    ewc2 = natgrad.EWC(model, 100.0 * curv, lam_scale=0.1, anchor=dict(zip(NAMES, [
        star[0:12].reshape(4, 3), star[12:16], star[16:24].reshape(2, 4), star[24:26]], strict=True)))
    assert float(ewc2.penalty()) == pytest.approx(float(ewc.penalty()), rel=1e-10)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_online_lam_scale_decays_n_with_the_fisher(gamma):
    """Online with lam_scale: λ = s·(γN₁ + N₂)·P / tr(γF₁ + F₂), by hand from the
    Fisher vectors; N₁ counted at full weight (the old rule) gives another penalty
    whenever γ < 1. The decayed count survives a state round trip and a third fold."""
    model = _model(11)
    g = torch.Generator().manual_seed(12)
    f = [torch.rand(26, generator=g, dtype=torch.float64) for _ in range(3)]
    shapes = {k: p.shape for k, p in model.named_parameters()}
    fishers = [natgrad.DiagonalFisher(unflatten_params(v, shapes), n)
               for v, n in zip(f, (40, 10, 25), strict=True)]
    s = 1e-3
    ewc = natgrad.EWC(model, fishers[0], lam_scale=s, mode="online", gamma=gamma)
    _move(model, 15)
    ewc.consolidate(fishers[1])
    a2 = _theta(model)
    _move(model, 16)
    d = _theta(model) - a2
    F = gamma * f[0] + f[1]
    lam = s * (gamma * 40 + 10) * 26 / float(F.sum())
    assert float(ewc.penalty()) == pytest.approx(0.5 * lam * float((F * d * d).sum()), rel=1e-10)
    again = natgrad.EWC(model, lam_scale=s, mode="online", gamma=gamma)
    again.load_state_dict(ewc.state_dict())
    for e in (ewc, again):
        e.consolidate(fishers[2])
    a3 = _theta(model)
    _move(model, 17)
    d = _theta(model) - a3
    F = gamma * F + f[2]
    lam = s * (gamma * (gamma * 40 + 10) + 25) * 26 / float(F.sum())
    for e in (ewc, again):
        assert float(e.penalty()) == pytest.approx(0.5 * lam * float((F * d * d).sum()),
                                                   rel=1e-10)


def test_suggest_lambda_counts_zero_fisher_parameters_and_takes_n():
    F = natgrad.DiagonalFisher({"w": torch.tensor([1.0, 3.0, 0.0, 0.0])}, n_samples=10)
    assert natgrad.EWC.suggest_lambda(F, 0.5) == pytest.approx(0.5 * 10 * 4 / 4)
    assert natgrad.EWC.suggest_lambda(F, 0.5, n_samples=2.5) == pytest.approx(0.5 * 2.5 * 4 / 4)
    with pytest.raises(ValueError, match="n_samples=0"):
        natgrad.EWC.suggest_lambda(F, 0.5, n_samples=0.0)


def test_diagonal_fisher_with_lam_scale_equals_the_diagonal_path():
    model = _model(3)
    fisher = natgrad.DiagonalFisher(
        {k: torch.rand_like(p) for k, p in model.named_parameters()}, 40
    )
    lam = natgrad.EWC.suggest_lambda(fisher, 2.0)
    plain = natgrad.EWC(model, fisher, lam=lam)
    scaled = natgrad.EWC(model, fisher, lam_scale=2.0)
    _move(model, 9)
    assert float(scaled.penalty()) == pytest.approx(float(plain.penalty()), rel=1e-12)
    state = scaled.state_dict()
    again = natgrad.EWC(model, lam=7.0)
    again.load_state_dict(state)
    assert float(again.penalty()) == pytest.approx(float(scaled.penalty()), rel=1e-12)
    assert again.lam_scale == 2.0 and again.names == NAMES


def test_diagonal_fisher_without_lam_scale_keeps_the_old_path():
    model = _model(4)
    fisher = natgrad.DiagonalFisher({k: torch.rand_like(p) for k, p in model.named_parameters()}, 5)
    star = {k: p.detach().clone() for k, p in model.named_parameters()}
    ewc = natgrad.EWC(model, fisher, lam=4.0)
    _move(model, 10)
    want = 2.0 * sum(
        float((fisher[k] * (p.detach() - star[k]) ** 2).sum()) for k, p in model.named_parameters()
    )
    assert float(ewc.penalty()) == pytest.approx(want, rel=1e-12)
    assert ewc.state_dict()["curvature_terms"] == []


needs_kron = pytest.mark.skipif(
    not {"kfac", "lowrank"} <= set(natgrad.CURVATURE_KINDS),
    reason="KroneckerFisher / LowRankFisher not registered in this build",
)


def _kron(model, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (16,), generator=g)
    return natgrad.estimate_curvature(model, (x, y), kind=kind, labels="exact")


@needs_kron
@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank"])
def test_structured_penalty_and_gradient_match_the_dense_quadratic_form(kind):
    from tests.reference import dense_from_mv

    model = _model(5)
    curv = _kron(model, kind, 1)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    mat = dense_from_mv(curv, shapes)
    _check_penalty_against(model, curv, mat, lam=5.0, seed=11)


@needs_kron
def test_online_kronecker_fold_is_the_ema_of_factors():
    from tests.reference import dense_from_mv

    model = _model(6)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    c1, c2 = _kron(model, "kfac", 2), _kron(model, "kfac", 3)
    ewc = natgrad.EWC(model, c1, lam=1.0, mode="online", gamma=0.8)
    ewc.consolidate(c2)
    star = _theta(model)
    _move(model, 12)
    d = _theta(model) - star
    folded = dense_from_mv((1.8 * c1.ema(c2, 0.8 / 1.8)), shapes)
    assert float(ewc.penalty().detach()) == pytest.approx(0.5 * float(d @ folded @ d), rel=1e-9)
    # it approximates the exact sum γ F₁ + F₂ (the factors are averaged separately)
    exact = 0.8 * dense_from_mv(c1, shapes) + dense_from_mv(c2, shapes)
    rel = float(torch.linalg.norm(folded - exact) / torch.linalg.norm(exact))
    assert 0 < rel < 1


def _own_kfac_matrix(model, x):
    """``G ⊗ A`` per Linear layer of ``model`` (a Sequential) from its own definition,
    with exact labels: ``A = (1/N) Σ_n ã_n ã_nᵀ`` (``ã = [a; 1]``),
    ``G = (1/N) Σ_n Σ_c p_nc b_nc b_ncᵀ`` (``b_nc = ∂ log p_nc / ∂ s_n``); rows and columns
    in ``NAMES`` order (``[W, b]`` of a layer is row-major, the bias as last column)."""
    acts, outs, h = [], [], x
    for m in model:
        if isinstance(m, torch.nn.Linear):
            acts.append(torch.cat([h.detach(), torch.ones(len(x), 1, dtype=x.dtype)], 1))
            h = m(h)
            h.retain_grad()
            outs.append(h)
        else:
            h = m(h)
    logp = h.log_softmax(-1)
    p = logp.exp().detach()
    gs = [torch.zeros(o.shape[1], o.shape[1], dtype=x.dtype) for o in outs]
    for c in range(p.shape[1]):
        for o in outs:
            o.grad = None
        logp[:, c].sum().backward(retain_graph=True)  # sample n's term only reaches row n
        for g, o in zip(gs, outs, strict=True):
            g += (o.grad * p[:, c : c + 1]).T @ o.grad / len(x)
    blocks = []
    for a, g, o in zip(acts, gs, outs, strict=True):
        k = torch.kron(g, a.T @ a / len(x))  # index (out, in) of [W, b], row-major
        d_out, d_in = o.shape[1], a.shape[1] - 1
        idx = torch.arange(d_out * (d_in + 1)).view(d_out, d_in + 1)
        order = torch.cat([idx[:, :d_in].reshape(-1), idx[:, d_in]])  # [vec W, b]
        blocks.append(k[order][:, order])
    return torch.block_diag(*blocks)


@needs_kron
def test_kronecker_penalty_and_gradient_match_an_independent_kfac_matrix():
    # the reference is built from K-FAC's definition, not from the curvature's mv
    model = _model(6)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mat = _own_kfac_matrix(model, x)
    model.zero_grad()
    curv = natgrad.estimate_curvature(model, x, kind="kfac", labels="exact")
    _check_penalty_against(model, curv, mat, lam=4.0, seed=12)


@needs_kron
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_a_consolidated_curvature_is_a_snapshot(mode):
    # EWC stored a Kronecker curvature by reference: an in-place ema_ of the caller's
    # object afterwards silently changed the consolidated task's penalty
    from tests.reference import dense_from_mv

    model = _model(7)
    curv, other = _kron(model, "kfac", 1), _kron(model, "kfac", 2)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    mat = dense_from_mv(curv, shapes)
    star = _theta(model)
    ewc = natgrad.EWC(model, curv, lam=2.0, mode=mode)
    curv.ema_(other, 0.1)  # the caller keeps a running curvature
    assert not torch.allclose(dense_from_mv(curv, shapes), mat)  # it did change
    _move(model, 13)
    d = _theta(model) - star
    assert float(ewc.penalty().detach()) == pytest.approx(float(d @ mat @ d), rel=1e-9)
