"""``Curvature.ema_union``: ``d F_a + (1-d) F_b`` over the union of the parameters, each
curvature zero off its own, against the dense float64 matrices of the two terms
(every protocol method of the result through ``check_against_dense``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from tests.reference import check_against_dense, dense_from_mv


class Heads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, 4)
        self.h0 = nn.Linear(4, 2)
        self.h1 = nn.Linear(4, 2)
        self.task = "h0"

    def forward(self, x):
        return getattr(self, self.task)(torch.tanh(self.body(x)))


def _curv(model, kind, task, params, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    model.task = task
    return natgrad.estimate_curvature(model, x, kind=kind, labels="exact", params=params)


def _embed(curv, shapes):
    """The term's dense matrix placed in the union's coordinates (zero elsewhere)."""
    own = {k: shapes[k] for k in curv.names()}
    small = dense_from_mv(curv, own)
    idx, i = {}, 0
    for k, s in shapes.items():
        idx[k] = torch.arange(i, i + s.numel())
        i += s.numel()
    cols = torch.cat([idx[k] for k in own])
    out = torch.zeros(i, i, dtype=torch.float64)
    out[cols.unsqueeze(1), cols] = small
    return out


BODY = ["body.weight", "body.bias"]
H0, H1 = ["h0.weight", "h0.bias"], ["h1.weight", "h1.bias"]


@pytest.mark.parametrize("kind,shared", [
    ("diag", True), ("lowrank", True), ("diag", False), ("lowrank", False),
    ("kfac", False), ("ekfac", False),
])
def test_ema_union_is_the_padded_average(kind, shared):
    # exact cases: diagonal and low-rank always, Kronecker when no layer is shared
    model = Heads().double()
    a = _curv(model, kind, "h0", (BODY if shared else []) + H0, 1)
    b = _curv(model, kind, "h1", (BODY if shared else []) + H1, 2)
    u = a.ema_union(b, 0.3)
    shapes = {k: p.shape for k, p in model.named_parameters() if k in u.names()}
    shapes = {k: shapes[k] for k in u.names()}
    assert u.names() == [*a.names(), *[k for k in b.names() if k not in a.names()]]
    assert u.n_samples == a.n_samples + b.n_samples
    dense = 0.3 * _embed(a, shapes) + 0.7 * _embed(b, shapes)
    check_against_dense(u, shapes, dense, lam=0.2, tol=1e-9)


def test_kronecker_ema_union_keeps_a_one_task_layer_exact():
    model = Heads().double()
    a = _curv(model, "kfac", "h0", BODY + H0, 1)
    b = _curv(model, "kfac", "h1", BODY + H1, 2)
    u = a.ema_union(b, 0.25)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    shapes = {k: shapes[k] for k in u.names()}
    got = dense_from_mv(u, shapes)
    want = 0.25 * _embed(a, shapes) + 0.75 * _embed(b, shapes)
    # the heads' blocks (one task each) are exact; the shared body averages its factors
    torch.testing.assert_close(got[15:, 15:], want[15:, 15:], rtol=1e-10, atol=1e-12)
    shared = u.restrict(BODY)
    ab, bb = a.blocks["body"], b.blocks["body"]
    A, G = 0.25 * ab.A[0] + 0.75 * bb.A[0], 0.25 * ab.G[0] + 0.75 * bb.G[0]
    torch.testing.assert_close(shared.blocks["body"].A[0], A)
    torch.testing.assert_close(shared.blocks["body"].G[0], G)


def test_ema_union_faults():
    model = Heads().double()
    d = _curv(model, "diag", "h0", BODY + H0, 1)
    k = _curv(model, "kfac", "h1", BODY + H1, 2)
    with pytest.raises(TypeError, match="needs another DiagonalFisher"):
        d.ema_union(k, 0.5)
    with pytest.raises(TypeError, match="combine curvatures of one kind"):
        k.ema_union(_curv(model, "ekfac", "h0", BODY + H0, 1), 0.5)
    with pytest.raises(ValueError, match="Invalid decay"):
        k.ema_union(k, 1.5)
