"""Fisher-weighted damage through ``quad`` against dense float64 quadratic forms."""

from __future__ import annotations

import pytest
import torch

import natgrad
from tests.reference import DenseCurvature, flatten_params

NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    ).double()
    a = (torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 3, (10,)))
    b = (2 * torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,)))
    return model, a, b


def _mean_grad(model, batch):
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    g = flatten_params({k: p.grad for k, p in model.named_parameters()}, NAMES)
    model.zero_grad()
    return g


def _dense(model, seed):
    shapes = {k: p.shape for k, p in model.named_parameters()}
    p = sum(s.numel() for s in shapes.values())
    a = torch.randn(p, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return DenseCurvature(a @ a.T, shapes, 10)


def test_damage_matches_the_dense_quadratic_form():
    model, a, b = _setup()
    curv = _dense(model, 1)
    r = natgrad.fisher_weighted_damage(model, a, b, lr=0.3, fisher_a=curv)
    ga, gb = _mean_grad(model, a), _mean_grad(model, b)
    d = -0.3 * gb
    assert r.damage == pytest.approx(0.5 * float(d @ curv.matrix @ d), rel=1e-10)
    assert r.first_order == pytest.approx(float(ga @ d), rel=1e-10)
    assert r.scale_free == pytest.approx(float(d @ curv.matrix @ d / (d @ d)), rel=1e-10)
    # per layer: the step restricted to the module's block
    m0 = curv.matrix[:16, :16]
    assert r.per_layer["0"] == pytest.approx(0.5 * float(d[:16] @ m0 @ d[:16]), rel=1e-10)


def test_dense_diagonal_curvature_equals_the_diagonal_fisher():
    model, a, b = _setup(1)
    vals = {k: torch.rand_like(p) for k, p in model.named_parameters()}
    fisher = natgrad.DiagonalFisher(vals, 10)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    dense = DenseCurvature(torch.diag(flatten_params(vals, NAMES)), shapes, 10)
    r1 = natgrad.fisher_weighted_damage(model, a, b, lr=0.2, fisher_a=fisher)
    r2 = natgrad.fisher_weighted_damage(model, a, b, lr=0.2, fisher_a=dense)
    assert r2.damage == pytest.approx(r1.damage, rel=1e-12)
    for m in r1.per_layer:
        assert r2.per_layer[m] == pytest.approx(r1.per_layer[m], rel=1e-12)
        assert r2.per_layer_scale_free[m] == pytest.approx(r1.per_layer_scale_free[m], rel=1e-12)


def test_asymmetry_with_dense_curvatures():
    model, a, b = _setup(2)
    c1, c2 = _dense(model, 3), _dense(model, 4)
    r = natgrad.fisher_damage_asymmetry(model, a, b, fisher_a=c1, fisher_b=c2)
    ga, gb = _mean_grad(model, a), _mean_grad(model, b)
    d1 = 0.5 * float(gb @ c1.matrix @ gb)
    d2 = 0.5 * float(ga @ c2.matrix @ ga)
    assert r.damage_to_first == pytest.approx(d1, rel=1e-10)
    assert r.damage_to_second == pytest.approx(d2, rel=1e-10)
    assert r.more_fragile == ("A" if d1 > d2 else "B")


@pytest.mark.skipif("kfac" not in natgrad.CURVATURE_KINDS, reason="no KroneckerFisher here")
def test_kronecker_damage_matches_its_dense_matrix():
    from tests.reference import dense_from_mv

    model, a, b = _setup(5)
    curv = natgrad.estimate_curvature(model, a, kind="kfac", labels="exact")
    shapes = {k: p.shape for k, p in model.named_parameters()}
    mat = dense_from_mv(curv, shapes)
    r = natgrad.fisher_weighted_damage(model, a, b, lr=0.5, fisher_a=curv)
    d = -0.5 * _mean_grad(model, b)
    assert r.damage == pytest.approx(0.5 * float(d @ mat @ d), rel=1e-9)
    assert sum(r.per_layer.values()) == pytest.approx(r.damage, rel=1e-9)  # block-diagonal
