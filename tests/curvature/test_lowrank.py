"""LowRankFisher against dense float64 Fishers built by one backward per sample and label."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad import LowRankFisher
from natgrad.engine.likelihoods import TokenCategorical, get_likelihood
from tests.conftest import mlp
from tests.reference import (
    ce_sum,
    check_against_dense,
    dense_fisher,
    dense_from_mv,
    dense_label_fisher,
    loop_grads,
)


def _case(n=5):
    torch.manual_seed(0)
    model = mlp((3, 4, 3)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    return model, x


@pytest.mark.parametrize("lik", ["categorical", "gaussian", "bernoulli"])
@pytest.mark.parametrize("labels", ["empirical", "mc", "exact"])
def test_every_likelihood_and_label_source_against_brute_force(lik, labels):
    model, x = _case()
    y = {"categorical": torch.tensor([0, 2, 1, 1, 0]),
         "gaussian": torch.randn(5, 3, dtype=torch.float64),
         "bernoulli": torch.randint(0, 2, (5, 3)).double()}[lik]
    kw = {"mc_samples": 2, "generator": torch.Generator().manual_seed(3)} if labels == "mc" else {}
    curv = natgrad.estimate_curvature(model, (x, y), lik, kind="lowrank", labels=labels, **kw)
    if labels == "exact":
        ref = dense_label_fisher(model, x, lik)
    elif labels == "mc":
        draws = get_likelihood(lik).sample(model(x).detach(), torch.Generator().manual_seed(3), 2)
        ref = dense_label_fisher(model, x, lik, draws=draws.movedim(0, 1))
    else:
        ref = dense_label_fisher(model, x, lik, draws=y.unsqueeze(1))
    shapes = {k: p.shape for k, p in model.named_parameters()}
    assert curv.structure() == {k: "lowrank" for k in shapes} and curv.n_samples == 5
    check_against_dense(curv, shapes, ref)


def test_token_categorical_rows_are_per_sequence_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(6, 3), nn.Tanh(), nn.Linear(3, 6)).double()
    ids, y = torch.randint(0, 6, (4, 5)), torch.randint(0, 6, (4, 5))
    y[0, 3:] = -100  # ignored tokens

    def tok(out, t):
        return nn.functional.cross_entropy(out.reshape(-1, 6), t.reshape(-1), reduction="sum")

    curv = natgrad.estimate_curvature(model, (ids, y), TokenCategorical(), kind="lowrank")
    shapes = {k: p.shape for k, p in model.named_parameters()}
    ref = dense_fisher(loop_grads(model, tok, ids, y), list(shapes))
    check_against_dense(curv, shapes, ref)


def test_rank_k_keeps_the_top_eigenpairs():
    model, x = _case(8)
    y = torch.randint(0, 3, (8,))
    shapes = {k: p.shape for k, p in model.named_parameters()}
    ref = dense_fisher(loop_grads(model, ce_sum, x, y), list(shapes))
    e, Q = torch.linalg.eigh(ref)
    top = Q[:, -3:] @ torch.diag(e[-3:]) @ Q[:, -3:].T
    curv = natgrad.estimate_curvature(model, (x, y), kind="lowrank", rank=3)
    assert curv.rows.shape[0] == 3
    check_against_dense(curv, shapes, top)
    both = curv + curv  # stays within rank 3
    assert both.rows.shape[0] == 3 and both.n_samples == 16
    torch.testing.assert_close(dense_from_mv(both, shapes), top)


def test_float32_model_solve_stays_accurate_as_damping_vanishes():
    torch.manual_seed(0)
    model = mlp((6, 8, 4))  # float32
    x, y = torch.randn(6, 6), torch.randint(0, 4, (6,))
    curv = natgrad.estimate_curvature(model, (x, y), kind="lowrank")
    R = curv.rows.double()  # the float32 rows, exactly, in float64
    g = R.sum(0).float().double()  # a vector in the row space (a summed gradient), as float32
    shapes = {k: p.shape for k, p in model.named_parameters()}
    v = {}
    i = 0
    for k, s in shapes.items():
        v[k] = g[i : i + s.numel()].reshape(s).float()
        i += s.numel()
    for lam in (1e-2, 1e-6, 1e-9):
        F = R.T @ R / 6 + lam * torch.eye(R.shape[1], dtype=torch.float64)
        ref = torch.linalg.lstsq(F, g.unsqueeze(1)).solution.squeeze(1)
        got = torch.cat([t.reshape(-1).double() for t in curv.solve(v, lam).values()])
        rel = (got - ref).norm() / ref.norm()
        assert rel < 1e-4, (lam, float(rel))


def test_batches_sum_ema_scale_to_state_and_files(tmp_path):
    model, x = _case(7)
    y = torch.randint(0, 3, (7,))
    shapes = {k: p.shape for k, p in model.named_parameters()}
    one = natgrad.estimate_curvature(model, (x, y), kind="lowrank")
    dense = dense_from_mv(one, shapes)
    many = natgrad.estimate_curvature(model, [(x[:3], y[:3]), (x[3:], y[3:])], kind="lowrank")
    assert many.n_samples == 7
    torch.testing.assert_close(dense_from_mv(many, shapes), dense)
    a = natgrad.estimate_curvature(model, (x[:3], y[:3]), kind="lowrank")
    b = natgrad.estimate_curvature(model, (x[3:], y[3:]), kind="lowrank")
    Da, Db = dense_from_mv(a, shapes), dense_from_mv(b, shapes)
    torch.testing.assert_close(dense_from_mv(a + b, shapes), dense)
    e = a.ema(b, 0.3)
    assert e.n_samples == 7
    torch.testing.assert_close(dense_from_mv(e, shapes), 0.3 * Da + 0.7 * Db)
    torch.testing.assert_close(dense_from_mv(0.5 * a, shapes), 0.5 * Da)
    f32 = one.to(torch.float32)
    assert f32.rows.dtype == torch.float32
    clone = LowRankFisher.from_state_dict(one.state_dict())
    torch.testing.assert_close(dense_from_mv(clone, shapes), dense, atol=0, rtol=0)
    one.save(tmp_path / "l.safetensors")
    back = LowRankFisher.load(tmp_path / "l.safetensors")
    torch.testing.assert_close(dense_from_mv(back, shapes), dense, atol=0, rtol=0)
    torch.testing.assert_close(back.logdet(0.1), one.logdet(0.1), atol=0, rtol=0)


def test_combining_lowrank_fishers_over_the_same_names_in_another_order():
    """``ema`` and ``+`` of two LowRankFishers listing the same parameters in different
    orders stacked rows of different column layouts (ema 0.53, + 0.30 off); the second is
    laid out as the first. Reference: dense float64 ``RᵀR/N`` combined by hand."""
    g = torch.Generator().manual_seed(0)
    Ra = torch.randn(3, 5, generator=g, dtype=torch.float64)
    Rb = torch.randn(2, 5, generator=g, dtype=torch.float64)
    a = LowRankFisher(Ra, 3, {"x": (2,), "y": (3,)})
    perm = torch.tensor([2, 3, 4, 0, 1])
    b = LowRankFisher(Rb[:, perm], 2, {"y": (3,), "x": (2,)})  # columns in order y, x
    Fa, Fb = Ra.T @ Ra / 3, Rb.T @ Rb / 2
    shapes = {"x": torch.Size([2]), "y": torch.Size([3])}
    torch.testing.assert_close(dense_from_mv(a.ema(b, 0.3), shapes), 0.3 * Fa + 0.7 * Fb)
    torch.testing.assert_close(dense_from_mv(a + b, shapes), (3 * Fa + 2 * Fb) / 5)


@pytest.mark.parametrize("op", ["add", "ema", "ema_union"])
def test_combining_float32_and_float64_promotes_to_float64(op):
    # the result took self's dtype (float32 for f32 + f64) while diag and K-FAC promote;
    # found by review. Reference: the float64 rows stacked by hand.
    torch.manual_seed(1)
    shapes = {"w": (3,)}
    r32, r64 = torch.randn(2, 3), torch.randn(4, 3, dtype=torch.float64)
    a, b = LowRankFisher(r32, 2, shapes), LowRankFisher(r64, 4, shapes)
    out = a + b if op == "add" else getattr(a, op)(b, 0.25)
    assert out.rows.dtype == torch.float64
    if op == "add":
        rows = torch.cat([r32.double(), r64])
        ref = rows.T @ rows / 6
    else:
        ref = 0.25 * r32.double().T @ r32.double() / 2 + 0.75 * r64.T @ r64 / 4
    torch.testing.assert_close(out.rows.T @ out.rows / out.n_samples, ref, rtol=1e-12, atol=1e-14)
