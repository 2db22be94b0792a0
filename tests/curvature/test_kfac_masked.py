"""K-FAC / EKFAC on layers pruned with ``torch.nn.utils.prune`` (``W = W_orig ⊙ M``).

Every reference is built here by hand in float64: the layer inputs and per-sample output
gradients are recorded by an ordinary forward hook and one backward per sample, the factors
``A``, ``G`` are formed from them, and the masked Fisher ``D_M (G ⊗ A) D_M`` is a dense
matrix (row-major ``vec`` of the block matrix ``[W, b]``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import natgrad
from natgrad.curvature.kfac import kfac_factors

LAM = 0.3


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    prune.random_unstructured(m[0], "weight", 0.4)
    prune.random_unstructured(m[2], "weight", 0.3)
    prune.random_unstructured(m[2], "bias", 0.5)  # a pruned bias too
    return m


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()
    prune.random_unstructured(m[0], "weight", 0.5)
    prune.random_unstructured(m[0], "bias", 0.34)
    prune.ln_structured(m[2], "weight", 0.5, n=1, dim=0)  # a whole output channel
    return m


def _data(conv: bool, n: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 2, 4, 4) if conv else (n, 4), generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def _layers(model):
    return [(k, m) for k, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _names(model, k, m):
    """The layer's parameter names as the model names them (``weight_orig`` when pruned)."""
    pre = f"{k}." if k else ""
    own = dict(m.named_parameters(recurse=False))
    w = pre + ("weight_orig" if "weight_orig" in own else "weight")
    b = pre + ("bias_orig" if "bias_orig" in own else "bias")
    return w, b


def _mask(m) -> torch.Tensor:
    """``[M_W, m_b]`` as a (d_out, d_in + 1) matrix (ones where not pruned)."""
    mw = getattr(m, "weight_mask", torch.ones_like(m.weight)).reshape(m.weight.shape[0], -1)
    mb = getattr(m, "bias_mask", torch.ones(m.weight.shape[0], dtype=mw.dtype))
    return torch.cat([mw, mb.reshape(-1, 1)], 1).to(torch.float64)


def hand_factors(model, x, y):
    """``{layer: (A, G)}`` from recorded inputs and per-sample output gradients."""
    rec: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, k=k: rec.setdefault(k, []).append((a[0], o)))
             for k, m in _layers(model)]
    out = model(x)
    for h in hooks:
        h.remove()
    n = x.shape[0]
    res = {}
    for k, m in _layers(model):
        (inp, o), = rec[k]
        if isinstance(m, nn.Conv2d):
            p = F.unfold(inp.detach(), m.kernel_size, padding=m.padding, stride=m.stride)
            a = p.transpose(1, 2)  # (N, T, C k k)
        else:
            a = inp.detach().unsqueeze(1)
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], -1)
        T = a.shape[1]
        A = torch.einsum("nti,ntj->ij", a, a) / (n * T)
        G = torch.zeros(o.shape[1], o.shape[1], dtype=torch.float64)
        for i in range(n):
            li = F.cross_entropy(out[i : i + 1], y[i : i + 1], reduction="sum")
            b = torch.autograd.grad(li, o, retain_graph=True)[0][i]
            b = b.reshape(b.shape[0], -1).T  # (T, d_out)
            G += b.T @ b
        res[k] = (A, G / n)
    return res


def _dense(factors, model, k, m, lam=None, project=False):
    A, G = factors[k]
    Fd = torch.kron(G, A)
    d = _mask(m).reshape(-1)
    if lam is None:
        return d[:, None] * Fd * d[None, :]
    inv = torch.linalg.inv(Fd + lam * torch.eye(Fd.shape[0], dtype=Fd.dtype))
    return d[:, None] * inv * d[None, :] if project else inv


def _block(v, model, k, m):
    w, b = _names(model, k, m)
    return torch.cat([v[w].reshape(v[w].shape[0], -1), v[b].reshape(-1, 1)], 1).reshape(-1)


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_factors_of_pruned_layers_equal_hand_factors(conv):
    model = _cnn() if conv else _mlp()
    x, y = _data(conv)
    ref = hand_factors(model, x, y)
    got = kfac_factors(model, (x, y))
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k].A, ref[k][0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got[k].G, ref[k][1], rtol=1e-10, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pruned parameter is in Kronecker form
        C = natgrad.estimate_curvature(model, (x, y), kind="kfac")
    assert set(C.structure().values()) == {"kfac"}
    pruned = {k for k, _ in model.named_parameters() if k.endswith("_orig")}
    assert pruned and pruned <= set(C.structure())


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_mv_quad_diagonal_equal_dense_masked_fisher(conv):
    model = _cnn() if conv else _mlp()
    x, y = _data(conv)
    ref = hand_factors(model, x, y)
    C = natgrad.estimate_curvature(model, (x, y), kind="kfac")
    g = torch.Generator().manual_seed(3)
    v = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in C.param_shapes().items()}
    mv, diag = C.mv(v), C.diagonal()
    quad = torch.zeros((), dtype=torch.float64)
    for k, m in _layers(model):
        D = _dense(ref, model, k, m)
        vec = _block(v, model, k, m)
        torch.testing.assert_close(_block(mv, model, k, m), D @ vec, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(_block(diag, model, k, m), D.diagonal(), rtol=1e-9, atol=1e-12)
        quad = quad + vec @ D @ vec
    torch.testing.assert_close(C.quad(v), quad, rtol=1e-9, atol=1e-12)
    # pruned entries carry no curvature at all
    for k, m in _layers(model):
        if hasattr(m, "weight_mask"):
            w, _ = _names(model, k, m)
            assert (diag[w][m.weight_mask == 0] == 0).all()


@pytest.mark.parametrize("mode", ["exact", "factored"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_solve_is_the_dense_projected_solve(conv, mode):
    model = _cnn() if conv else _mlp()
    x, y = _data(conv)
    ref = hand_factors(model, x, y)
    C = natgrad.estimate_curvature(model, (x, y), kind="kfac", damping_mode=mode)
    g = torch.Generator().manual_seed(4)
    v = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in C.param_shapes().items()}
    sol, inv_diag = C.solve(v, LAM), C.inverse_diagonal(LAM)
    for k, m in _layers(model):
        A, G = ref[k]
        eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
        if mode == "exact":
            inv = torch.linalg.inv(torch.kron(G, A) + LAM * eye(G.shape[0] * A.shape[0]))
        else:
            pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])) ** 0.5
            s = LAM**0.5
            inv = torch.kron(torch.linalg.inv(G + s / pi * eye(G.shape[0])),
                             torch.linalg.inv(A + s * pi * eye(A.shape[0])))
        d = _mask(m).reshape(-1)
        P = d[:, None] * inv * d[None, :]  # M ⊙ (F + λI)⁻¹ (M ⊙ ·)
        torch.testing.assert_close(_block(sol, model, k, m), P @ _block(v, model, k, m),
                                   rtol=1e-9, atol=1e-12)
        if mode == "exact":
            full = _dense(ref, model, k, m, LAM, project=True)
            torch.testing.assert_close(_block(inv_diag, model, k, m), full.diagonal(),
                                       rtol=1e-9, atol=1e-12)


def test_ekfac_masked_mv_and_refit_against_hand_gradients():
    model = _mlp()
    x, y = _data(False)
    ref = hand_factors(model, x, y)
    C = natgrad.estimate_curvature(model, [(x, y)], kind="ekfac")
    # per-sample gradients of the effective weights, by one backward per sample
    rec = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, k=k: rec.__setitem__(k, (a[0], o)))
             for k, m in _layers(model)]
    out = model(x)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(5)
    v = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in C.param_shapes().items()}
    mv = C.mv(v)
    for k, m in _layers(model):
        blk = C.blocks[k]
        QA, QG = blk.QA[0], blk.QG[0]
        # the factors' eigenbases: A Q_A = Q_A diag, as hand A gives
        A, G = ref[k]
        torch.testing.assert_close(QA.T @ A @ QA, torch.diag((QA.T @ A @ QA).diagonal()),
                                   atol=1e-10, rtol=0)
        inp, o = rec[k]
        a = torch.cat([inp.detach(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
        s = torch.zeros_like(blk.s[0])
        for i in range(len(x)):
            li = F.cross_entropy(out[i : i + 1], y[i : i + 1], reduction="sum")
            b = torch.autograd.grad(li, o, retain_graph=True)[0][i]
            s += (QG.T @ torch.outer(b, a[i]) @ QA) ** 2
        s /= len(x)
        torch.testing.assert_close(blk.s[0], s, rtol=1e-9, atol=1e-12)
        Fe = torch.kron(QG, QA) @ torch.diag(s.reshape(-1)) @ torch.kron(QG, QA).T
        d = _mask(m).reshape(-1)
        D = d[:, None] * Fe * d[None, :]
        torch.testing.assert_close(_block(mv, model, k, m), D @ _block(v, model, k, m),
                                   rtol=1e-9, atol=1e-12)


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {k: p.grad.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("source", ["batch", "backward"])
@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_preconditioned_step_is_the_dense_projected_solve(conv, source):
    model = _cnn() if conv else _mlp()
    x, y = _data(conv)
    ref = hand_factors(model, x, y)
    pre = natgrad.FisherPreconditioner(model, kind="kfac", damping=LAM, kl_clip=None,
                                       kfac_damping="exact", source=source)
    g = _grads(model, x, y)
    pre.step((x, y))
    assert set(pre.curvature.structure().values()) == {"kfac"}
    named = dict(model.named_parameters())
    for k, m in _layers(model):
        P = _dense(ref, model, k, m, LAM, project=True)
        step = _block({n: named[n].grad for n in named}, model, k, m)
        torch.testing.assert_close(step, P @ _block(g, model, k, m), rtol=1e-9, atol=1e-12)
    pre.close()


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("source", ["batch", "backward"])
def test_pruned_entries_stay_zero_over_preconditioned_steps(opt, source):
    model = _cnn()
    x, y = _data(True, n=8)
    orig = {k: p.detach().clone() for k, p in model.named_parameters()}
    masks = {k: b.clone() for k, b in model.named_buffers() if k.endswith("_mask")}
    pre = natgrad.FisherPreconditioner(model, kind="kfac", damping=0.1, source=source,
                                       update_every=2)
    o = (torch.optim.SGD(model.parameters(), lr=0.1) if opt == "sgd"
         else torch.optim.Adam(model.parameters(), lr=0.01))
    for _ in range(5):
        o.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step((x, y), lr=o.param_groups[0]["lr"])
        o.step()
    pre.close()
    named = dict(model.named_parameters())
    moved = 0
    for mk, mask in masks.items():
        pname = mk[: -len("_mask")] + "_orig"
        p = named[pname].detach()
        # the pruned entries of the parameter never move, so of the effective weight
        # (W_orig ⊙ M) they are exactly zero; the kept entries do move
        assert torch.equal(p[mask == 0], orig[pname][mask == 0])
        eff = model.get_submodule(mk.rsplit(".", 1)[0])
        assert (getattr(eff, mk.rsplit(".", 1)[1][: -len("_mask")])[mask == 0] == 0).all()
        moved += int((p[mask != 0] != orig[pname][mask != 0]).sum())
    assert moved > 0


def test_state_dict_round_trip_keeps_the_mask():
    model = _mlp()
    x, y = _data(False)
    C = natgrad.estimate_curvature(model, (x, y), kind="kfac")
    C2 = type(C).from_state_dict(copy.deepcopy(C.state_dict()))
    g = torch.Generator().manual_seed(6)
    v = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in C.param_shapes().items()}
    for a, b in ((C.mv(v), C2.mv(v)), (C.solve(v, LAM), C2.solve(v, LAM))):
        for k in a:
            assert torch.equal(a[k], b[k])
    # the preconditioner's state continues identically
    m1, m2 = _mlp(), _mlp()
    p1 = natgrad.FisherPreconditioner(m1, kind="kfac", damping=0.1, kl_clip=None)
    _grads(m1, x, y)
    p1.step((x, y))
    p2 = natgrad.FisherPreconditioner(m2, kind="kfac", damping=0.1, kl_clip=None,
                                      update_every=100)
    p2.load_state_dict(copy.deepcopy(p1.state_dict()))
    p1.update_every = 100  # both only solve now
    g1, g2 = _grads(m1, x, y), _grads(m2, x, y)
    assert all(torch.equal(g1[k], g2[k]) for k in g1)
    p1.step((x, y))
    p2.step((x, y))
    for (k, a), b in zip(m1.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), k
    assert "mask" in p1.state_dict()["curvature"]["layers"]["0"]


def test_ema_takes_the_newer_mask():
    model = _mlp()
    x, y = _data(False)
    C1 = natgrad.estimate_curvature(model, (x, y), kind="kfac")
    prune.random_unstructured(model[0], "weight", 0.3)  # prune more
    C2 = natgrad.estimate_curvature(model, (x, y), kind="kfac")
    newer = C1.ema(C2, 0.5).blocks["0"].mask[0, :, :-1]
    torch.testing.assert_close(newer, model[0].weight_mask.double())
    assert not torch.equal(C1.blocks["0"].mask[0, :, :-1], newer)
    # a regrowth: the newer mask keeps entries the older one pruned, and so does the EMA
    # (in place too), whose mv is then M_new ⊙ F̄ (M_new ⊙ V) with F̄ the averaged factors
    for ema in (lambda a, b: a.ema(b, 0.5), lambda a, b: a.ema_(b, 0.5)):
        C1 = natgrad.estimate_curvature(model, (x, y), kind="kfac")
        grown = torch.ones_like(model[0].weight_mask)
        grown[0] = 0
        prune.remove(model[0], "weight")
        prune.custom_from_mask(model[0], "weight", grown)
        C2 = natgrad.estimate_curvature(model, (x, y), kind="kfac")
        f1, f2 = hand_factors(model, x, y), (C1.blocks["0"].A[0], C1.blocks["0"].G[0])
        A = 0.5 * f2[0] + 0.5 * f1["0"][0]
        G = 0.5 * f2[1] + 0.5 * f1["0"][1]
        E = ema(C1, C2)
        d = _mask(model[0]).reshape(-1)
        D = d[:, None] * torch.kron(G, A) * d[None, :]
        v = {k: torch.randn(s, dtype=torch.float64) for k, s in E.param_shapes().items()}
        out = E.mv(v)
        torch.testing.assert_close(_block(out, model, "0", model[0]),
                                   D @ _block(v, model, "0", model[0]), rtol=1e-10, atol=1e-12)
        model = _mlp()


def test_adding_curvatures_of_different_masks_is_refused():
    model = _mlp()
    x, y = _data(False)
    C1 = natgrad.estimate_curvature(model, (x, y), kind="kfac")
    C1 + C1  # same masks: fine
    prune.random_unstructured(model[0], "weight", 0.3)
    C2 = natgrad.estimate_curvature(model, (x, y), kind="kfac")
    with pytest.raises(ValueError, match="pruned with different masks"):
        C1 + C2


def test_with_masks_puts_the_model_masks_on_a_curvature():
    model = _mlp()
    x, y = _data(False)
    C = natgrad.estimate_curvature(model, (x, y), kind="kfac")
    ref = hand_factors(model, x, y)
    new = torch.ones_like(model[0].weight_mask)
    new[:, 1] = 0
    prune.remove(model[0], "weight")
    prune.custom_from_mask(model[0], "weight", new)
    from natgrad.curvature.kfac import kfac_layers
    lay = kfac_layers(model, dict(model.named_parameters()), masked=True)[0]["0"]
    C2 = C.with_masks({"0": lay.mask_block()})
    v = {k: torch.randn(s, dtype=torch.float64) for k, s in C.param_shapes().items()}
    P = _dense(ref, model, "0", model[0], LAM, project=True)  # factors unchanged, new mask
    torch.testing.assert_close(_block(C2.solve(v, LAM), model, "0", model[0]),
                               P @ _block(v, model, "0", model[0]), rtol=1e-9, atol=1e-12)
    assert C.blocks["0"].mask is not C2.blocks["0"].mask  # the original keeps its mask
    assert C2.masked_names() == ["0.weight_orig", "0.bias", "2.weight_orig", "2.bias_orig"]
    with pytest.raises(ValueError, match="not masked blocks"):
        C.with_masks({"0": lay.mask_block()[..., :-1]})


@pytest.mark.parametrize("source", ["batch", "backward"])
@pytest.mark.parametrize("change", ["regrow", "in_place", "data", "load_state"])
def test_preconditioner_follows_the_model_masks(source, change):
    """After a regrowth (prune.remove + custom_from_mask), a mask edited in place (also
    through ``.data``, which leaves no version trace: the stale mask was used, found by
    review), or a state saved under another mask, the step is the dense projected solve with the
    model's current mask: regrown entries move at once."""
    x, y = _data(False, n=8)
    model = _mlp()
    kw = dict(kind="kfac", damping=LAM, kl_clip=None, kfac_damping="exact", source=source,
              update_every=100)
    pre = natgrad.FisherPreconditioner(model, **kw)
    _grads(model, x, y)
    pre.step((x, y))  # the curvature of the old mask; later steps only solve
    ref = hand_factors(model, x, y)  # the factors do not depend on the mask
    old = model[0].weight_mask.clone()
    new = 1 - old  # every entry pruned before is kept now
    new[0] = 0
    if change == "regrow":
        prune.remove(model[0], "weight")
        prune.custom_from_mask(model[0], "weight", new)
    elif change == "in_place":
        with torch.no_grad():
            model[0].weight_mask.copy_(new)
    elif change == "data":
        model[0].weight_mask.data.copy_(new)
    else:
        other = _mlp()
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            other[0].weight_mask.copy_(new)
        state = pre.state_dict()
        pre.close()
        model = other
        pre = natgrad.FisherPreconditioner(model, **kw)
        pre.load_state_dict(state)
    g = _grads(model, x, y)
    pre.step((x, y))
    named = dict(model.named_parameters())
    P = _dense(ref, model, "0", model[0], LAM, project=True)
    step = _block({n: named[n].grad for n in named}, model, "0", model[0])
    torch.testing.assert_close(step, P @ _block(g, model, "0", model[0]), rtol=1e-9, atol=1e-12)
    regrown = ((new == 1) & (old == 0)).reshape(-1)
    assert (named["0.weight_orig"].grad.reshape(-1)[regrown] != 0).all()
    assert pre.curvature.blocks["0"].mask[0, :, :-1].equal(new.double())
    pre.close()


def _backward_step(model, kind, conv):
    """One ``source="backward"`` step of ``kind`` on the pruned ``model``; returns the
    preconditioner, the brute-force per-sample gradients of the batch, and its inputs."""
    from tests.reference import ce_sum, loop_grads

    x, y = _data(conv)
    ref = loop_grads(model, ce_sum, x, y)
    pre = natgrad.FisherPreconditioner(model, kind=kind, damping=0.1, source="backward",
                                       kl_clip=None)
    _grads(model, x, y)
    pre.step((x, y))
    return pre, ref, x


def test_backward_source_diagonal_fisher_of_pruned_parameters_is_brute_force():
    """``kind="diag"`` from the recorded inputs/output gradients: the per-sample gradient
    of ``weight_orig`` is ``M ⊙ g_n`` (zero at pruned entries), as a per-sample loop gives."""
    model = _cnn()
    pre, ref, _ = _backward_step(model, "diag", True)
    diag = pre.curvature.diagonal()
    assert set(diag) == set(ref)
    for k, g in ref.items():
        torch.testing.assert_close(diag[k], (g * g).mean(0), rtol=1e-9, atol=1e-12)
    assert (diag["0.weight_orig"][model[0].weight_mask == 0] == 0).all()
    pre.close()


def test_backward_source_lowrank_of_pruned_parameters_is_brute_force():
    """``kind="lowrank"`` from the records: its rows are the per-sample gradients
    ``M ⊙ g_n`` of the pruned parameters, so its ``mv`` is the brute-force Fisher's."""
    model = _mlp()
    pre, ref, x = _backward_step(model, "lowrank", False)
    names = list(ref)
    Gm = torch.cat([ref[k].reshape(len(x), -1) for k in names], 1)
    Fd = Gm.T @ Gm / len(x)
    g = torch.Generator().manual_seed(7)
    v = {k: torch.randn(ref[k].shape[1:], generator=g, dtype=torch.float64) for k in names}
    mv = pre.curvature.mv(v)
    got = torch.cat([mv[k].reshape(-1) for k in names])
    torch.testing.assert_close(got, Fd @ torch.cat([v[k].reshape(-1) for k in names]),
                               rtol=1e-9, atol=1e-12)
    pre.close()


class _Tokens(nn.Module):
    """Embedding -> transformers' Conv1D -> Conv1d -> mean -> logits."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(7, 4)
        self.proj = Conv1D(5, 4)  # weight stored (in, out)
        self.conv = nn.Conv1d(5, 3, 2)

    def forward(self, ids):
        h = torch.tanh(self.proj(self.emb(ids)))  # (N, T, 5)
        return self.conv(h.transpose(1, 2)).mean(-1)


def test_embedding_conv1d_t_and_conv1d_blocks_are_masked_like_the_unpruned_curvature():
    """Other layouts (``Wᵀ`` blocks, diagonal ``A``): the pruned curvature is
    ``M ⊙ F(M ⊙ ·)`` of the curvature of the same effective weights made permanent."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _Tokens().double()
    for name in ("emb", "proj", "conv"):
        prune.random_unstructured(getattr(model, name), "weight", 0.4)
    prune.random_unstructured(model.conv, "bias", 0.34)
    ids = torch.randint(0, 7, (6, 5))
    y = torch.randint(0, 3, (6,))
    from natgrad.pruning.pruned import deepcopy_model

    plain = natgrad.make_permanent(deepcopy_model(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        C = natgrad.estimate_curvature(model, (ids, y), kind="kfac")
    Cp = natgrad.estimate_curvature(plain, (ids, y), kind="kfac")
    assert set(C.structure().values()) == {"kfac"}
    masks = {k[: -len("_mask")] + "_orig": b for k, b in model.named_buffers()}
    ren = {k: k.replace("_orig", "") for k in C.structure()}
    g = torch.Generator().manual_seed(8)
    v = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in C.param_shapes().items()}
    mv = C.mv(v)
    masked_v = {ren[k]: x * masks.get(k, 1) for k, x in v.items()}
    ref = Cp.mv(masked_v)
    dref, d = Cp.diagonal(), C.diagonal()
    for k in v:
        m = masks.get(k, 1)
        torch.testing.assert_close(mv[k], ref[ren[k]] * m, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(d[k], dref[ren[k]] * m, rtol=1e-9, atol=1e-12)


def test_file_round_trip_keeps_the_mask(tmp_path):
    model = _mlp()
    x, y = _data(False)
    C = natgrad.estimate_curvature(model, [(x, y)], kind="ekfac")
    C.save(tmp_path / "c.safetensors")
    C2 = natgrad.Curvature.load(tmp_path / "c.safetensors")
    for k, blk in C.blocks.items():
        assert (blk.mask is None) == (C2.blocks[k].mask is None)
        if blk.mask is not None:
            assert torch.equal(blk.mask, C2.blocks[k].mask)
    g = torch.Generator().manual_seed(9)
    v = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in C.param_shapes().items()}
    a, b = C.solve(v, LAM), C2.solve(v, LAM)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_curvature_does_not_change_when_the_model_mask_is_edited_later():
    """On a bias-free pruned layer the block mask was a view of the module's
    ``weight_mask`` (no bias column forced a copy): editing the model's mask in place
    changed a curvature estimated before (its diagonal 5e-2 off; found by review). The
    reference is the same curvature's diagonal before the edit, and the dense masked one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3)).double()
    prune.random_unstructured(model[0], "weight", amount=0.4)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    C = natgrad.estimate_curvature(model, (x, y), kind="kfac", labels="empirical")
    before = {k: v.clone() for k, v in C.diagonal().items()}
    with torch.no_grad():
        model[0].weight_mask.fill_(1)
    after = C.diagonal()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert (before["0.weight_orig"][C.blocks["0"].mask[0] == 0] == 0).all()
    assert (C.blocks["0"].mask == 0).any()  # the mask it was estimated with, not all-ones
