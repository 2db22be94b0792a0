"""Online EWC when a task adds a head: the fold over the union of the parameters.

Every term's dense matrix is built by hand from the curvature's own statistics (the
diagonal values, the low-rank rows ``RᵀR/N``, the Kronecker factors ``G ⊗ A`` or the
EKFAC eigenbasis and eigenvalues), and the fold by the module docstring's formula:
exact ``γ F_old + F_new`` for diagonal and low-rank curvatures; for a Kronecker layer both
tasks cover ``(1 + γ)(d A₁ + (1-d) A₂) ⊗ (d G₁ + (1-d) G₂)`` (``d = γ/(1+γ)``; EKFAC:
eigenvalues ``diag(Qᵀ F_t Q)`` re-fitted in that eigenbasis), and exact ``γ F_old`` or
``F_new`` for a layer one task covers alone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from tests.reference import flatten_params

GAMMA = 0.7
LAM = 3.0


class Heads(nn.Module):
    """A shared body and one head per task; ``task`` selects the head that runs."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 5)
        self.heads = nn.ModuleDict({"t0": nn.Linear(5, 3)})
        self.task = "t0"

    def forward(self, x):
        return self.heads[self.task](torch.tanh(self.body(x)))


def _task_names(task):
    return ["body.weight", "body.bias", f"heads.{task}.weight", f"heads.{task}.bias"]


def _estimate(model, task, kind, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 4, generator=g).to(dtype)
    y = torch.randint(0, 3, (10,), generator=g)
    model.task = task
    return natgrad.estimate_curvature(model, (x, y), kind=kind, params=_task_names(task),
                                      labels="exact")


def _move(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g).to(p.dtype))


# -- the per-term dense matrices, by hand ------------------------------------------------
def _reorder(d_out, d_in):
    """Indices taking the row-major ``vec [W, b]`` of a layer to ``[vec W, b]``."""
    idx = torch.arange(d_out * (d_in + 1)).view(d_out, d_in + 1)
    return torch.cat([idx[:, :d_in].reshape(-1), idx[:, d_in]])


def _layer_states(curv):
    """``{layer: [A, G, D]}``: the factors and the dense ``[W, b]`` block (row-major vec)."""
    out = {}
    for layer, blk in curv.blocks.items():
        A, G = blk.A[0].double(), blk.G[0].double()
        if blk.s is None:
            D = torch.kron(G, A)
        else:
            Q = torch.kron(blk.QG[0].double(), blk.QA[0].double())
            D = Q @ torch.diag(blk.s[0].double().reshape(-1)) @ Q.T
        out[layer] = [A, G, D]
    return out


def _fold_layers(old, new, gamma, ekfac):
    """The documented Kronecker fold of two ``{layer: [A, G, D]}`` states."""
    d = gamma / (1 + gamma)
    out = {}
    for layer in [*old, *(k for k in new if k not in old)]:
        if layer in old and layer in new:
            (Ao, Go, Do), (An, Gn, Dn) = old[layer], new[layer]
            A, G = d * Ao + (1 - d) * An, d * Go + (1 - d) * Gn
            if ekfac:
                Q = torch.kron(torch.linalg.eigh(G).eigenvectors, torch.linalg.eigh(A).eigenvectors)
                s = d * (Q.T @ Do @ Q).diagonal() + (1 - d) * (Q.T @ Dn @ Q).diagonal()
                D = Q @ torch.diag(s) @ Q.T
            else:
                D = torch.kron(G, A)
            out[layer] = [A, (1 + gamma) * G, (1 + gamma) * D]
        elif layer in old:
            A, G, D = old[layer]
            out[layer] = [A, gamma * G, gamma * D]
        else:
            out[layer] = new[layer]
    return out


def _dense_of_layers(states, shapes):
    P = sum(s.numel() for s in shapes.values())
    M = torch.zeros(P, P, dtype=torch.float64)
    offsets, i = {}, 0
    for k, s in shapes.items():
        offsets[k] = i
        i += s.numel()
    for layer, (_, _, D) in states.items():
        d_out, d_in = shapes[f"{layer}.weight"]
        o = _reorder(d_out, d_in)
        j = offsets[f"{layer}.weight"]
        n = d_out * (d_in + 1)
        M[j : j + n, j : j + n] = D[o][:, o]
    return M


def _padded(curv, shapes):
    """A diagonal or low-rank term's dense matrix over ``shapes`` (zero off its names)."""
    P = sum(s.numel() for s in shapes.values())
    idx, i = {}, 0
    for k, s in shapes.items():
        idx[k] = torch.arange(i, i + s.numel())
        i += s.numel()
    cols = torch.cat([idx[k] for k in curv.names()])
    M = torch.zeros(P, P, dtype=torch.float64)
    if curv.kind == "lowrank":
        R = curv.rows.double()
        M[cols.unsqueeze(1), cols] = R.T @ R / curv.n_samples
    else:
        M[cols, cols] = torch.cat([curv[k].double().reshape(-1) for k in curv.names()])
    return M


# -- the test ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind,lam_scale", [
    ("diag", None), ("diag", 1e-3), ("kfac", None), ("ekfac", None), ("lowrank", None),
    ("lowrank", 1e-3),
])
def test_online_fold_with_late_heads_matches_a_dense_reference(kind, lam_scale, dtype):
    torch.manual_seed(0)
    model = Heads().to(dtype)
    curvs = [_estimate(model, "t0", kind, 1, dtype)]
    ewc = natgrad.EWC(model, curvs[0], lam=LAM, mode="online", gamma=GAMMA, lam_scale=lam_scale)
    for t, task in enumerate(["t1", "t2"], start=1):
        _move(model, 10 + t)  # trained on the previous task
        model.heads[task] = nn.Linear(5, 3).to(dtype)  # the late head
        curvs.append(_estimate(model, task, kind, 1 + t, dtype))
        ewc.consolidate(curvs[-1])
    assert ewc.num_tasks == 3
    shapes = {k: p.shape for k, p in model.named_parameters()}
    names = list(shapes)
    assert set(ewc.names) == set(names)
    if kind in ("kfac", "ekfac"):
        states = _layer_states(curvs[0])
        for c in curvs[1:]:
            states = _fold_layers(states, _layer_states(c), GAMMA, kind == "ekfac")
        F = _dense_of_layers(states, shapes)
    else:
        F = _padded(curvs[0], shapes)
        for c in curvs[1:]:
            F = GAMMA * F + _padded(c, shapes)
    lam = LAM
    if lam_scale is not None:  # λ = s · N · P / tr F, N decayed as F is
        n = float(curvs[0].n_samples)
        for c in curvs[1:]:
            n = GAMMA * n + c.n_samples
        lam = lam_scale * n * F.shape[0] / float(F.trace())
    star = flatten_params(dict(model.named_parameters()), names).double()
    _move(model, 20)
    d = flatten_params(dict(model.named_parameters()), names).double() - star
    pen = ewc.penalty()
    assert pen.dtype == dtype
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 1e-6}
    torch.testing.assert_close(pen.detach().double(), lam / 2 * d @ F @ d, **tol)
    # the folded term round-trips through state_dict
    again = natgrad.EWC(model, lam=LAM, mode="online", gamma=GAMMA, lam_scale=lam_scale)
    again.load_state_dict(ewc.state_dict())
    torch.testing.assert_close(again.penalty().detach(), pen.detach(), rtol=1e-12, atol=0)
    model.zero_grad()
    pen.backward()
    grad = flatten_params({k: p.grad for k, p in model.named_parameters()}, names).double()
    torch.testing.assert_close(grad, lam * F @ d, **tol)
    # every head is penalised: the late ones through F_new, the first through γ² F₁
    for task in ("t0", "t1", "t2"):
        assert float(model.heads[task].weight.grad.abs().sum()) > 0


@pytest.mark.parametrize("kind", ["diag", "kfac", "ekfac", "lowrank"])
def test_ema_union_over_the_same_names_is_ema(kind):
    model = Heads().double()
    a = _estimate(model, "t0", kind, 1, torch.float64)
    b = _estimate(model, "t0", kind, 2, torch.float64)
    from tests.reference import dense_from_mv

    shapes = {k: p.shape for k, p in model.named_parameters()}
    torch.testing.assert_close(dense_from_mv(a.ema_union(b, 0.3), shapes),
                               dense_from_mv(a.ema(b, 0.3), shapes))
    assert a.ema_union(b, 0.3).n_samples == a.n_samples + b.n_samples


@pytest.mark.parametrize("explicit", [False, True])
def test_a_name_only_the_old_term_covers_keeps_its_anchor_under_an_explicit_anchor(explicit):
    # no anchor: every covered name is anchored at the newest parameters (penalty 0
    # there); an explicit anchor for the new task's names leaves the old head's anchor
    model = Heads().double()
    c0 = _estimate(model, "t0", "lowrank", 1, torch.float64)
    ewc = natgrad.EWC(model, c0, lam=LAM, mode="online", gamma=GAMMA)
    star0 = {k: p.detach().clone() for k, p in model.named_parameters()}
    _move(model, 3)
    model.heads["t1"] = nn.Linear(5, 3).double()
    c1 = _estimate(model, "t1", "lowrank", 2, torch.float64)
    now = {k: p.detach().clone() for k, p in model.named_parameters()}
    ewc.consolidate(c1, {k: now[k] for k in _task_names("t1")} if explicit else None)
    pen = float(ewc.penalty().detach())
    if not explicit:
        assert pen == 0.0
        return
    shapes = {k: p.shape for k, p in model.named_parameters()}
    names = list(shapes)
    F = GAMMA * _padded(c0, shapes) + _padded(c1, shapes)
    d = torch.cat([(now[k] - star0[k]).reshape(-1) if k.startswith("heads.t0")
                   else torch.zeros(shapes[k].numel(), dtype=torch.float64) for k in names])
    assert pen > 0
    assert pen == pytest.approx(float(LAM / 2 * d @ F @ d), rel=1e-10)
