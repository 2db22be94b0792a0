import json
import math

import pytest
import torch
from torch import nn

from natgrad import (
    AsymmetryReport,
    DamageReport,
    estimate_fisher,
    fisher_damage_asymmetry,
    fisher_weighted_damage,
)
from natgrad.engine.likelihoods import Gaussian
from tests.conftest import mlp
from tests.reference import ce_sum, exact_categorical_fisher_loop, loop_grads

SIGMA = 0.7


def _hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _orthogonal_design():
    """8 samples whose feature columns are orthogonal and centered: X^T X / N is diagonal."""
    h = _hadamard(8)[:, 1:4]  # +-1 columns, each orthogonal to the all-ones column
    return h * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)


def _mean_gauss_loss(W, b, x, y):
    """Closed-form mean Gaussian NLL without the constant: mean_n ||y - W x - b||^2 / (2 s^2)."""
    r = y - x @ W.T - b
    return float((r**2).sum(1).mean() / (2 * SIGMA**2))


def _linear(seed):
    torch.manual_seed(seed)
    return nn.Linear(3, 2).double()


def test_quadratic_loss_damage_is_exact_increase():
    model = _linear(0)
    g = torch.Generator().manual_seed(1)
    xa = _orthogonal_design()
    ya = torch.randn(8, 2, generator=g, dtype=torch.float64)
    xb = torch.randn(6, 3, generator=g, dtype=torch.float64)
    yb = torch.randn(6, 2, generator=g, dtype=torch.float64)
    lr = 0.3
    r = fisher_weighted_damage(model, (xa, ya), (xb, yb), Gaussian(SIGMA), lr=lr, labels="exact")
    W, b = model.weight.detach(), model.bias.detach()
    # hand-written gradient of B's mean loss and the step
    rb = xb @ W.T + b - yb
    gW, gb = rb.T @ xb / (6 * SIGMA**2), rb.mean(0) / SIGMA**2
    W2, b2 = W - lr * gW, b - lr * gb
    true_increase = _mean_gauss_loss(W2, b2, xa, ya) - _mean_gauss_loss(W, b, xa, ya)
    ra = xa @ W.T + b - ya
    first = float(((ra.T @ xa / (8 * SIGMA**2)) * (-lr * gW)).sum()) + float(
        ((ra.mean(0) / SIGMA**2) * (-lr * gb)).sum()
    )
    assert r.predicted_increase == pytest.approx(true_increase, rel=1e-5)
    assert r.first_order == pytest.approx(first, rel=1e-5)
    assert r.damage == pytest.approx(true_increase - first, rel=1e-5)
    assert r.lr == lr and r.n_samples_a == 8 and r.n_samples_b == 6 and r.labels == "exact"


def test_quadratic_loss_general_design_keeps_only_the_diagonal():
    """With a non-orthogonal design the damage is 1/2 sum_i H_ii delta_i^2 (H by hand)."""
    model = _linear(0)
    g = torch.Generator().manual_seed(2)
    xa = torch.randn(10, 3, generator=g, dtype=torch.float64)
    ya = torch.randn(10, 2, generator=g, dtype=torch.float64)
    xb = torch.randn(7, 3, generator=g, dtype=torch.float64)
    yb = torch.randn(7, 2, generator=g, dtype=torch.float64)
    r = fisher_weighted_damage(model, (xa, ya), (xb, yb), Gaussian(SIGMA), lr=0.2, labels="exact")
    W, b = model.weight.detach(), model.bias.detach()
    rb = xb @ W.T + b - yb
    dW, db = -0.2 * rb.T @ xb / (7 * SIGMA**2), -0.2 * rb.mean(0) / SIGMA**2
    hW = (xa**2).mean(0) / SIGMA**2  # Hessian diagonal of the mean loss, per input feature
    expected = 0.5 * float((hW * dW**2).sum()) + 0.5 * float((db**2).sum()) / SIGMA**2
    assert r.damage == pytest.approx(expected, rel=1e-5)
    assert sum(r.per_layer.values()) == pytest.approx(r.damage)
    assert r.per_layer["bias"] == pytest.approx(0.5 * float((db**2).sum()) / SIGMA**2, rel=1e-5)


def _increase(model, x, y, step):
    def loss():
        with torch.no_grad():
            return float(nn.functional.cross_entropy(model(x), y))

    before = loss()
    with torch.no_grad():
        for p, d in zip(model.parameters(), step, strict=True):
            p.add_(d)
    after = loss()
    with torch.no_grad():
        for p, d in zip(model.parameters(), step, strict=True):
            p.sub_(d)
    return after - before


def test_mlp_small_lr_prediction_matches_measured_increase():
    torch.manual_seed(0)
    model = mlp((5, 16, 4)).double()
    g = torch.Generator().manual_seed(3)
    xa, ya = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (40,))
    xb, yb = torch.randn(40, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (40,))
    lr = 0.05
    r = fisher_weighted_damage(model, (xa, ya), (xb, yb), lr=lr, labels="exact")
    gb = {k: v.mean(0) for k, v in loop_grads(model, ce_sum, xb, yb).items()}
    step = [-lr * gb[k] for k, _ in model.named_parameters()]
    measured = _increase(model, xa, ya, step)
    assert abs(r.predicted_increase - measured) <= 0.1 * abs(measured)
    # the report's terms against brute-force references
    ga = {k: v.mean(0) for k, v in loop_grads(model, ce_sum, xa, ya).items()}
    F = exact_categorical_fisher_loop(model, xa)
    dmg = 0.5 * sum(float((F[k] * (lr * gb[k]) ** 2).sum()) for k in F)
    first = sum(float((ga[k] * -lr * gb[k]).sum()) for k in ga)
    assert r.damage == pytest.approx(dmg, rel=1e-6)
    assert r.first_order == pytest.approx(first, rel=1e-6)
    energy = sum(float(((lr * gb[k]) ** 2).sum()) for k in gb)
    assert r.scale_free == pytest.approx(2 * dmg / energy, rel=1e-6)
    assert r.step_sq_norm == pytest.approx(energy, rel=1e-9)


def test_scaling_per_layer_and_given_fisher(mlp_case):
    model, x, y = mlp_case
    a, b = (x[:5], y[:5]), (x[5:], y[5:])
    r1 = fisher_weighted_damage(model, a, b, lr=1.0)
    r2 = fisher_weighted_damage(model, a, b, lr=0.1)
    assert r2.damage == pytest.approx(0.01 * r1.damage, rel=1e-9)
    assert r2.first_order == pytest.approx(0.1 * r1.first_order, rel=1e-9)
    assert r2.scale_free == pytest.approx(r1.scale_free, rel=1e-9)
    assert sorted(r1.per_layer) == ["0", "2"]
    assert sum(r1.per_layer.values()) == pytest.approx(r1.damage)
    assert sum(r1.per_layer_first_order.values()) == pytest.approx(r1.first_order)
    F = estimate_fisher(model, a, labels="mc", mc_samples=3)
    r3 = fisher_weighted_damage(model, a, b, fisher_a=F)
    assert r3.labels == "mc"
    assert r3.damage != pytest.approx(r1.damage)
    r4 = fisher_weighted_damage(model, a, b, labels="mc", mc_samples=3)
    assert r4.damage == pytest.approx(r3.damage, rel=1e-9)
    only = fisher_weighted_damage(model, a, b, fisher_a={"2.weight": F["2.weight"]})
    assert list(only.per_layer) == ["2"]
    json.dumps(r1.to_dict())


def test_model_and_inputs_not_modified(mlp_case):
    model, x, y = mlp_case
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    xc, yc = x.clone(), y.clone()
    fisher_damage_asymmetry(model, (x[:4], y[:4]), (x[4:], y[4:]))
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]) and p.grad is None
    assert torch.equal(x, xc) and torch.equal(y, yc)


def test_asymmetry_is_antisymmetric(mlp_case):
    model, x, y = mlp_case
    a, b = (x[:4], y[:4]), (3 * x[4:], y[4:])
    r = fisher_damage_asymmetry(model, a, b, lr=0.5, names=("a", "b"))
    s = fisher_damage_asymmetry(model, b, a, lr=0.5, names=("b", "a"))
    assert isinstance(r, AsymmetryReport) and isinstance(r.first, DamageReport)
    assert r.log_ratio == pytest.approx(-s.log_ratio, rel=1e-9)
    assert r.scale_free_log_ratio == pytest.approx(-s.scale_free_log_ratio, rel=1e-9)
    assert r.ratio == pytest.approx(1 / s.ratio, rel=1e-9)
    assert r.more_fragile == s.more_fragile
    assert r.damage_to_first == pytest.approx(
        fisher_weighted_damage(model, a, b, lr=0.5).damage, rel=1e-12
    )
    assert r.log_ratio == pytest.approx(math.log(r.damage_to_first / r.damage_to_second))
    assert r.more_fragile == ("a" if r.damage_to_first > r.damage_to_second else "b")
    r2 = fisher_damage_asymmetry(model, a, b, lr=0.05, names=("a", "b"))
    assert r2.log_ratio == pytest.approx(r.log_ratio, rel=1e-9)  # lr cancels
    json.dumps(r.to_dict())


def _brute_damage(model, fisher, batch_a, batch_b, lr):
    """(damage, first_order) of a step on b for a, from loop gradients and a given Fisher."""
    ga = {k: v.mean(0) for k, v in loop_grads(model, ce_sum, *batch_a).items()}
    gb = {k: v.mean(0) for k, v in loop_grads(model, ce_sum, *batch_b).items()}
    dmg = 0.5 * sum(float((fisher[k] * (lr * gb[k]) ** 2).sum()) for k in fisher)
    first = sum(float((ga[k] * -lr * gb[k]).sum()) for k in fisher)
    return dmg, first


def test_asymmetry_against_brute_force(mlp_case):
    model, x, y = mlp_case
    a, b = (x[:4], y[:4]), (3 * x[4:], y[4:])
    r = fisher_damage_asymmetry(model, a, b, lr=0.3, labels="exact", names=("a", "b"))
    Fa, Fb = exact_categorical_fisher_loop(model, a[0]), exact_categorical_fisher_loop(model, b[0])
    d1, f1 = _brute_damage(model, Fa, a, b, 0.3)
    d2, f2 = _brute_damage(model, Fb, b, a, 0.3)
    assert r.damage_to_first == pytest.approx(d1, rel=1e-6)
    assert r.damage_to_second == pytest.approx(d2, rel=1e-6)
    assert r.first.first_order == pytest.approx(f1, rel=1e-6)
    assert r.second.first_order == pytest.approx(f2, rel=1e-6)
    assert r.log_ratio == pytest.approx(math.log(d1) - math.log(d2), rel=1e-6)
    assert (r.first.n_samples_a, r.first.n_samples_b) == (4, 5)
    assert (r.second.n_samples_a, r.second.n_samples_b) == (5, 4)
    # given Fishers that cover different parameters: each direction uses its own
    sub_a, sub_b = {"0.weight": Fa["0.weight"]}, {"2.bias": Fb["2.bias"]}
    s = fisher_damage_asymmetry(model, a, b, lr=0.3, fisher_a=sub_a, fisher_b=sub_b)
    assert s.damage_to_first == pytest.approx(_brute_damage(model, sub_a, a, b, 0.3)[0], rel=1e-6)
    assert s.damage_to_second == pytest.approx(_brute_damage(model, sub_b, b, a, 0.3)[0], rel=1e-6)
    assert list(s.first.per_layer) == ["0"] and list(s.second.per_layer) == ["2"]


def test_asymmetry_equal_tasks(mlp_case):
    model, x, y = mlp_case
    r = fisher_damage_asymmetry(model, (x, y), (x, y))
    assert r.log_ratio == 0.0 and r.ratio == 1.0 and r.more_fragile == "equal"


def test_errors(mlp_case):
    model, x, y = mlp_case
    with pytest.raises(ValueError, match="task_b_batch has no labels"):
        fisher_weighted_damage(model, (x, y), x, labels="exact")
    with pytest.raises(ValueError, match="Invalid lr: 0"):
        fisher_weighted_damage(model, (x, y), (x, y), lr=0)
    with pytest.raises(ValueError, match="Unknown labels 'true'"):
        fisher_weighted_damage(model, (x, y), (x, y), labels="true")
    with pytest.raises(ValueError, match="fisher_a has parameters the model lacks: \\['fc.w'\\]"):
        fisher_weighted_damage(model, (x, y), (x, y), fisher_a={"fc.w": torch.ones(1)})
    with pytest.raises(ValueError, match="Parameter names or shapes differ between fisher_a"):
        fisher_weighted_damage(model, (x, y), (x, y), fisher_a={"0.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="names must differ"):
        fisher_damage_asymmetry(model, (x, y), (x, y), names=("t", "t"))
