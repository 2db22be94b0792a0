"""OBS pruning against dense float64 references (brute-force inverses, closed forms)."""

from __future__ import annotations

import copy

import pytest
import torch

import natgrad
from tests.reference import DenseCurvature, flatten_params, unflatten_params


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()


def _shapes(model):
    return {k: p.shape for k, p in model.named_parameters()}


def _dense(model, seed=1, rank=None):
    shapes = _shapes(model)
    p = sum(s.numel() for s in shapes.values())
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(p, rank or 2 * p, generator=g, dtype=torch.float64)
    return DenseCurvature(a @ a.T / a.shape[1], shapes, 16)


def _theta(model):
    return flatten_params(dict(model.named_parameters()), list(_shapes(model)))


def _after(model):
    """The updated values (weight_orig for pruned tensors) in flat parameter order."""
    vals = {}
    for k, p in model.named_parameters():
        vals[k[: -len("_orig")] if k.endswith("_orig") else k] = p
    return flatten_params(vals, ["0.weight", "0.bias", "2.weight", "2.bias"])


def _offsets(shapes):
    out, i = {}, 0
    for k, s in shapes.items():
        out[k] = i
        i += s.numel()
    return out


def dense_obs(theta, h, q):
    """Brute force: δ = −H⁻¹E (EᵀH⁻¹E)⁻¹ Eᵀθ with a dense inverse; and ½ θ_Qᵀ(EᵀH⁻¹E)⁻¹θ_Q."""
    hinv = torch.linalg.inv(h)
    sub = hinv[q][:, q]
    coef = torch.linalg.solve(sub, theta[q])
    return -(hinv[:, q] @ coef), 0.5 * float(theta[q] @ coef)


def test_saliency_matches_closed_form():
    model = _model()
    curv = _dense(model)
    lam = 0.05
    sal = natgrad.obs_saliency(model, curv, damping=lam)
    hinv = torch.linalg.inv(curv.matrix + lam * torch.eye(curv.matrix.shape[0], dtype=torch.float64))
    theta = _theta(model)
    want = theta**2 / (2 * torch.diagonal(hinv))
    got = flatten_params(sal, list(_shapes(model)))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "cg"])
def test_single_weight_update_matches_dense_inverse(method):
    model = _model()
    curv = _dense(model)
    lam = 0.1
    shapes = _shapes(model)
    theta = _theta(model)
    sal = natgrad.obs_saliency(model, curv, damping=lam)
    # one weight of the first layer: the least salient one
    q = _offsets(shapes)["0.weight"] + int(sal["0.weight"].reshape(-1).argmin())
    h = curv.matrix + lam * torch.eye(theta.numel(), dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    # the textbook single-weight formula δ = −θ_q H⁻¹ e_q / [H⁻¹]_qq
    delta = -theta[q] * hinv[:, q] / hinv[q, q]
    r = natgrad.obs_prune(
        model, curv, 1 / 12, prune=["0.weight"], min_keep_per_layer=0, damping=lam,
        method=method, cg_tol=1e-12,
    )
    assert r.n_removed == 1 and r.method == method
    want = theta + delta
    torch.testing.assert_close(_after(model), want, rtol=1e-8, atol=1e-9)
    assert abs(want[q]) < 1e-12
    assert r.predicted_increase == pytest.approx(float(theta[q] ** 2 / (2 * hinv[q, q])), rel=1e-8)
    assert bool(model[0].weight_mask.reshape(-1)[q] == 0)


@pytest.mark.parametrize("method", ["exact", "cg"])
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_block_update_matches_dense_inverse(method, scope):
    model = _model(3)
    curv = _dense(model, seed=4, rank=8)  # rank 8 < P = 26: singular without damping
    lam = 0.02
    shapes = _shapes(model)
    theta = _theta(model)
    h = curv.matrix + lam * torch.eye(theta.numel(), dtype=torch.float64)
    r = natgrad.obs_prune(
        model, curv, 0.5, scope=scope, min_keep_per_layer=1, damping=lam, method=method,
        cg_tol=1e-13, cg_iters=500,
    )
    off = _offsets(shapes)
    q = torch.cat([
        off[k] + (~r.masks[k]).reshape(-1).nonzero().squeeze(1) for k in r.masks
    ])
    assert q.numel() == 10 == r.n_removed  # half of 12 + 8 weights
    delta, increase = dense_obs(theta, h, q)
    torch.testing.assert_close(_after(model), theta + delta, rtol=1e-7, atol=1e-8)
    assert r.predicted_increase == pytest.approx(increase, rel=1e-7)
    if scope == "layer":
        assert r.per_layer_sparsity == {"0.weight": 0.5, "2.weight": 0.5}


def test_selection_is_the_lowest_saliency():
    model = _model(5)
    curv = _dense(model, seed=6)
    lam = 0.1
    sal = natgrad.obs_saliency(model, curv, damping=lam)
    names = ["0.weight", "2.weight"]
    flat = torch.cat([sal[k].reshape(-1) for k in names])
    r = natgrad.obs_prune(model, curv, 0.3, min_keep_per_layer=0, damping=lam, method="none")
    removed = torch.cat([(~r.masks[k]).reshape(-1) for k in names])
    k = int(0.3 * 20 + 0.5)
    assert int(removed.sum()) == k
    assert set(removed.nonzero().squeeze(1).tolist()) == set(flat.argsort()[:k].tolist())
    # method="none": kept weights unchanged
    theta_after = _after(model)
    off = _offsets(_shapes(model))
    assert theta_after[off["0.bias"]] != 0


def test_diagonal_curvature_keeps_the_other_weights_and_ranks_by_obd():
    model = _model(7)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    diag = {k: torch.rand_like(p) + 0.1 for k, p in model.named_parameters()}
    fisher = natgrad.DiagonalFisher(diag, 10)
    lam = 0.01
    sal = natgrad.obs_saliency(model, fisher, damping=lam)
    for k in diag:
        torch.testing.assert_close(sal[k], before[k] ** 2 * (diag[k] + lam) / 2)
    r = natgrad.obs_prune(model, fisher, 0.5, damping=lam, min_keep_per_layer=0)
    for k, p in model.named_parameters():
        base = k[: -len("_orig")]
        if k.endswith("_orig"):
            kept = r.masks[base]
            torch.testing.assert_close(p[kept], before[base][kept], rtol=1e-12, atol=1e-12)
            assert bool((p[~kept] == 0).all())
        else:
            torch.testing.assert_close(p, before[k], rtol=1e-12, atol=1e-12)


def test_min_keep_never_empties_a_layer():
    model = _model(8)
    with torch.no_grad():
        model[2].weight.mul_(1e-4)  # global ranking would empty the last layer
    fisher = natgrad.DiagonalFisher({k: torch.ones_like(p) for k, p in model.named_parameters()}, 4)
    r0 = natgrad.obs_prune(_clone_scaled(), fisher, 0.5, min_keep_per_layer=0, damping=0.0)
    assert r0.per_layer_sparsity["2.weight"] == 1.0  # without protection: emptied
    r = natgrad.obs_prune(model, fisher, 0.5, min_keep_per_layer=0.25, damping=0.0)
    assert r.n_removed == 10
    assert int(r.masks["2.weight"].sum()) == 2  # ceil(0.25 * 8)
    assert int(r.masks["0.weight"].sum()) == 12 - 4


def _clone_scaled():
    m = _model(8)
    with torch.no_grad():
        m[2].weight.mul_(1e-4)
    return m


def test_gradual_rounds_match_a_dense_reference():
    torch.manual_seed(11)
    model = _model(9)
    ref = _model(9)
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    curv = DenseCurvature.estimate(model, (x, y))
    lam = 0.05
    r = natgrad.obs_prune(model, curv, 0.6, rounds=2, data=(x, y), damping=lam,
                          min_keep_per_layer=0, method="exact")
    assert r.rounds == 2 and r.n_removed == 12
    assert hasattr(model[0], "weight_orig") and hasattr(model[0], "weight_mask")
    # reference: two rounds by dense formulas
    shapes = _shapes(ref)
    names = list(shapes)
    off = _offsets(shapes)
    cand = torch.cat([off[k] + torch.arange(shapes[k].numel()) for k in ("0.weight", "2.weight")])
    removed = torch.zeros(0, dtype=torch.long)
    for target in (6, 12):
        c = DenseCurvature.estimate(ref, (x, y))
        h = c.matrix + lam * torch.eye(c.matrix.shape[0], dtype=torch.float64)
        theta = _theta(ref)
        sal = theta**2 / (2 * torch.diagonal(torch.linalg.inv(h)))
        alive = cand[~torch.isin(cand, removed)]
        new = alive[sal[alive].argsort()[: target - removed.numel()]]
        removed = torch.cat([removed, new])
        delta, _ = dense_obs(theta, h, removed)
        theta = theta + delta
        theta[removed] = 0.0
        with torch.no_grad():
            for k, v in unflatten_params(theta, shapes).items():
                dict(ref.named_parameters())[k].copy_(v)
    torch.testing.assert_close(_after(model), _theta(ref), rtol=1e-7, atol=1e-9)
    assert names  # parameter order used above



@pytest.mark.parametrize("kind", ["kfac", "lowrank"])
def test_gradual_rounds_reestimate_with_the_curvatures_likelihood_and_labels(kind):
    # the re-estimations used likelihood="categorical" and labels="empirical" whatever
    # the curvature was (here: bernoulli, exact labels, a rank-8 low-rank)
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)
    ).double()
    ref = copy.deepcopy(model)
    x = torch.randn(16, 3, dtype=torch.float64)
    opts = {"kind": kind, "likelihood": "bernoulli", "labels": "exact"}
    if kind == "lowrank":
        opts["rank"] = 8
    curv = natgrad.estimate_curvature(model, x, **opts)
    kw = {"damping": 0.01, "min_keep_per_layer": 0, "method": "exact"}
    natgrad.obs_prune(model, curv, 0.6, rounds=2, data=x, **kw)
    # reference: the two rounds as two calls, the curvature estimated as the first one was
    natgrad.obs_prune(ref, curv, 0.3, **kw)
    natgrad.make_permanent(ref)
    natgrad.obs_prune(ref, natgrad.estimate_curvature(ref, x, **opts), 0.6, **kw)
    natgrad.make_permanent(model)
    natgrad.make_permanent(ref)
    for (k, a), (_, b) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=k)


def test_model_output_uses_the_masks():
    model = _model(12)
    fisher = natgrad.DiagonalFisher({k: torch.ones_like(p) for k, p in model.named_parameters()}, 4)
    natgrad.obs_prune(model, fisher, 0.5, min_keep_per_layer=1)
    assert int((model[0].weight == 0).sum()) >= 6
    natgrad.make_permanent(model)
    assert not hasattr(model[0], "weight_orig")


needs_kron = pytest.mark.skipif(
    not {"kfac", "lowrank"} <= set(natgrad.CURVATURE_KINDS),
    reason="KroneckerFisher / LowRankFisher not registered in this build",
)


@needs_kron
@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank"])
@pytest.mark.parametrize("method", ["exact", "cg"])
def test_structured_curvatures_match_their_dense_matrix(kind, method):
    from tests.reference import dense_copy

    model = _model(13)
    x = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (20,))
    curv = natgrad.estimate_curvature(model, (x, y), kind=kind, labels="exact")
    dense = dense_copy(curv, _shapes(model))
    twin = _model(13)
    lam = 1e-2
    r1 = natgrad.obs_prune(model, curv, 0.5, damping=lam, method=method, min_keep_per_layer=1,
                           cg_tol=1e-12, cg_iters=1000)
    r2 = natgrad.obs_prune(twin, dense, 0.5, damping=lam, method=method, min_keep_per_layer=1,
                           cg_tol=1e-12, cg_iters=1000)
    for k in r1.masks:
        assert torch.equal(r1.masks[k], r2.masks[k])
    torch.testing.assert_close(_after(model), _after(twin), rtol=1e-7, atol=1e-9)
    assert r1.predicted_increase == pytest.approx(r2.predicted_increase, rel=1e-6)
    # a structured curvature moves the kept weights (a diagonal one would not)
    theta0 = _theta(_model(13))
    kept = torch.cat([r1.masks[k].reshape(-1) for k in ("0.weight",)])
    assert not torch.allclose(_after(model)[:12][kept], theta0[:12][kept])
