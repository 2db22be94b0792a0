"""KroneckerFisher (K-FAC, EKFAC) against brute-force per-sample loops and dense matrices.

References are independent of natgrad's capture: one backward per sample for the output
gradients ``b`` and per-sample gradients, explicit slicing loops for convolution patches,
Python loops for token counts, and dense float64 Kronecker / EKFAC constructions.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import natgrad
from natgrad.curvature.kronecker import KroneckerBlock, KroneckerFisher
from natgrad.engine.likelihoods import TokenCategorical, get_likelihood
from tests.conftest import TinyCNN, mlp
from tests.reference import (
    assert_close_dict,
    ce_sum,
    check_against_dense,
    dense_fisher,
    dense_from_mv,
    dense_label_fisher,
    loop_grads,
)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def _est(model, data, lik="categorical", **kw):
    return _quiet(natgrad.estimate_curvature, model, data, lik, **kw)


# -- brute-force factor references ------------------------------------------------------
def _loop_out_grads(model, modules, x, y, loss_fn):
    """Per sample: inputs and output gradients of ``modules`` (one backward per sample)."""
    rec = {m: [] for m in modules}
    res = []
    for i in range(x.shape[0]):
        ins, outs = {}, {}
        hs = []
        for m in modules:
            def hook(mod, args, out, m=m, ins=ins, outs=outs):
                ins[m] = args[0].detach()
                outs[m] = out
            hs.append(m.register_forward_hook(hook))
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        for h in hs:
            h.remove()
        gs = torch.autograd.grad(loss, [outs[m] for m in modules])
        res.append({m: (ins[m], g.detach()) for m, g in zip(modules, gs, strict=True)})
    for r in res:
        for m in modules:
            rec[m].append(r[m])
    return rec


def _tok_ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def _aug(a):
    return torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)


class SeqMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 5)
        self.l2 = nn.Linear(5, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def test_linear_sequence_factors_are_the_martens_grosse_definitions():
    """``A = (1/(N·T)) Σ ã ãᵀ``, ``G = (1/N) Σ_{n,t} b bᵀ`` on (N, T, d) inputs."""
    torch.manual_seed(0)
    model = SeqMLP().double()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5, 3))
    curv = _est(model, (x, y), TokenCategorical(), kind="kfac")
    rec = _loop_out_grads(model, [model.l1, model.l2], x, y, _tok_ce)
    for name, m in (("l1", model.l1), ("l2", model.l2)):
        a = torch.cat([_aug(i[0]) for i, _ in rec[m]])  # (N*T, d+1)
        b = torch.cat([g[0] for _, g in rec[m]])
        blk = curv.blocks[name]
        torch.testing.assert_close(blk.A[0], a.T @ a / (5 * 3))
        torch.testing.assert_close(blk.G[0], b.T @ b / 5)
    assert curv.structure() == {k: "kfac" for k, _ in model.named_parameters()}


def _conv_patches_loop(xp, m):
    """Patches of a padded input by explicit slicing (no unfold): (N, T, C*kh*kw)."""
    kh, kw = m.kernel_size
    sh, sw = m.stride
    dh, dw = m.dilation
    H = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    W = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for i in range(H):
        for j in range(W):
            win = xp[:, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh,
                     j * sw : j * sw + dw * (kw - 1) + 1 : dw]
            rows.append(win.reshape(xp.shape[0], -1))
    return torch.stack(rows, 1)


@pytest.mark.parametrize(
    "mode,padding,groups",
    [("zeros", 1, 1), ("zeros", "same", 2), ("reflect", 1, 2), ("circular", 2, 1),
     ("replicate", "same", 3)],
)
def test_conv2d_factors_groups_and_padding_modes(mode, padding, groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, (3, 2) if padding == "same" else 3, padding=padding,
                     padding_mode=mode, groups=groups)
    model = nn.Sequential(conv, nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 3)).double()
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    curv = _est(model, (x, y), kind="kfac")
    assert curv.structure()["0.weight"] == "kfac" and curv.blocks["0"].groups == groups
    rec = _loop_out_grads(model, [conv], x, y, ce_sum)[conv]
    # the padding this conv applies, as torch defines padding_mode (explicit F.pad)
    if padding == "same":
        pads = [0, 1, 1, 1]  # kernel (3, 2): width total 1 -> (0, 1); height total 2 -> (1, 1)
    else:
        pads = [padding] * 4
    fmode = "constant" if mode == "zeros" else mode
    a = torch.cat([_conv_patches_loop(F.pad(i, pads, mode=fmode), conv) for i, _ in rec])
    b = torch.cat([g.flatten(2).transpose(1, 2) for _, g in rec])  # (N, T, C_out)
    N, T = a.shape[0], a.shape[1]
    cin, cout = 6 // groups, 6 // groups
    k = conv.weight[0].numel()
    blk = curv.blocks["0"]
    for g in range(groups):
        ag = _aug(a[:, :, g * k : (g + 1) * k].reshape(N * T, k))
        bg = b[:, :, g * cout : (g + 1) * cout].reshape(N * T, cout)
        torch.testing.assert_close(blk.A[g], ag.T @ ag / (N * T))
        torch.testing.assert_close(blk.G[g], bg.T @ bg / N)
    assert cin * conv.weight.shape[2] * conv.weight.shape[3] == k
    # the block layout of [W, b] reproduces every per-sample gradient: Σ_t b_t ã_tᵀ
    grads = loop_grads(model, ce_sum, x, y, ["0.weight", "0.bias"])
    for n in range(N):
        for g in range(groups):
            an = _aug(a[n, :, g * k : (g + 1) * k])
            bn = b[n, :, g * cout : (g + 1) * cout]
            W = grads["0.weight"][n][g * cout : (g + 1) * cout].reshape(cout, -1)
            Vb = torch.cat([W, grads["0.bias"][n][g * cout : (g + 1) * cout, None]], 1)
            torch.testing.assert_close(bn.T @ an, Vb)


def test_conv_kfac_methods_against_dense_kronecker():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2, padding=1, padding_mode="circular"),
                          nn.Tanh(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 4, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    for kind in ("kfac", "ekfac"):
        curv = _est(model, (x, y), kind=kind)
        shapes = {k: p.shape for k, p in model.named_parameters()}
        check_against_dense(curv, shapes, _dense_kronecker(curv, model, x, y, ce_sum))


# -- dense constructions -------------------------------------------------------------------
def _blk_to_flat(blk, V):
    """Block matrices (g, dG, dA) -> flat index order of [weight, bias] (model layout)."""
    from natgrad.curvature.kfac import split_weight_blocks

    W, b = split_weight_blocks(blk.shape, blk.transposed, blk.bias is not None, V)
    return torch.cat([W.reshape(-1)] + ([] if b is None else [b.reshape(-1)]))


def _block_basis(blk):
    """Columns = the Kronecker eigenvectors of the block, in the parameters' flat layout,
    for every (group, i, j); plus the index of each in ``s``."""
    QA, _, QG, _ = blk.bases()
    g = blk.groups
    dG, dA = blk.G.shape[1], blk.A.shape[1]
    cols = []
    for gi in range(g):
        qa = torch.eye(dA, dtype=torch.float64) if QA is None else QA[gi].double()
        qg = torch.eye(dG, dtype=torch.float64) if QG is None else QG[gi].double()
        for i in range(dG):
            for j in range(dA):
                V = torch.zeros(g, dG, dA, dtype=torch.float64)
                V[gi] = torch.outer(qg[:, i], qa[:, j])
                cols.append(_blk_to_flat(blk, V))
    return torch.stack(cols, 1)


def _dense_kronecker(curv, model, x, y, loss_fn, grads=None):
    """Dense float64 operator: K-FAC ``blockdiag(G ⊗ A)``, or EKFAC
    ``K diag(s) Kᵀ`` with ``s = (1/N) Σ_n (Kᵀ g_n)²`` from brute-force per-sample grads."""
    names = list(curv.structure())
    shapes = {k: p.shape for k, p in model.named_parameters() if k in names}
    offs, i = {}, 0
    for k, s in shapes.items():
        offs[k] = (i, i + s.numel())
        i += s.numel()
    D = torch.zeros(i, i, dtype=torch.float64)
    if grads is None:
        grads = loop_grads(model, loss_fn, x, y, names)
    N = x.shape[0]
    for blk in curv.blocks.values():
        idx = torch.cat([torch.arange(*offs[n]) for n in blk.names])
        if curv.kind == "kfac":
            g, dG, dA = blk.groups, blk.G.shape[1], blk.A.shape[1]
            sub = torch.zeros(len(idx), len(idx), dtype=torch.float64)
            Afull = torch.diag_embed(blk.A) if blk.A.dim() == 2 else blk.A
            Gfull = torch.diag_embed(blk.G) if blk.G.dim() == 2 else blk.G
            cols = []
            for gi in range(g):
                for r in range(dG):
                    for c in range(dA):
                        V = torch.zeros(g, dG, dA, dtype=torch.float64)
                        V[gi, r, c] = 1.0
                        cols.append(_blk_to_flat(blk, V))
            E = torch.stack(cols, 1)  # block coordinates -> flat
            K = torch.block_diag(*[torch.kron(Gfull[gi], Afull[gi]).double() for gi in range(g)])
            sub = E @ K @ E.T
        else:
            Kb = _block_basis(blk)
            gn = torch.cat([grads[n].reshape(N, -1).double() for n in blk.names], 1)
            s = ((gn @ Kb) ** 2).mean(0)
            torch.testing.assert_close(s, blk.s.reshape(-1).double())
            sub = Kb @ torch.diag(s) @ Kb.T
        D[idx[:, None], idx[None, :]] = sub
    for k, v in curv.diag.items():
        a, b = offs[k]
        g = grads[k].reshape(N, -1).double()
        torch.testing.assert_close(v.reshape(-1).double(), (g * g).mean(0), rtol=1e-5, atol=1e-8)
        D[a:b, a:b] = torch.diag((g * g).mean(0))
    return D


def test_ekfac_equals_dense_construction_from_per_sample_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 3)).double()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    curv = _est(model, (x, y), kind="ekfac")
    assert curv.structure() == {"0.weight": "ekfac", "0.bias": "ekfac", "2.weight": "diag",
                                "2.bias": "diag", "3.weight": "ekfac", "3.bias": "ekfac"}
    kfac = _est(model, (x, y), kind="kfac")
    for k, blk in curv.blocks.items():  # the eigenbasis is that of the K-FAC factors
        QA = blk.QA[0]
        torch.testing.assert_close(QA.T @ kfac.blocks[k].A[0] @ QA,
                                   torch.diag(torch.linalg.eigvalsh(kfac.blocks[k].A[0])))
    shapes = {k: p.shape for k, p in model.named_parameters()}
    dense = _dense_kronecker(curv, model, x, y, ce_sum)
    check_against_dense(curv, shapes, dense)
    # EKFAC's diagonal is the Fisher's diagonal in its eigenbasis: on one layer, its
    # eigenbasis entries q_kᵀ F q_k equal the exact Fisher's
    ref = dense_fisher(loop_grads(model, ce_sum, x, y), list(shapes))
    blk = curv.blocks["0"]
    Kb = _block_basis(blk)
    torch.testing.assert_close((Kb.T @ ref[:25, :25] @ Kb).diagonal(), blk.s.reshape(-1))


def test_kfac_of_one_sample_is_its_exact_fisher_for_every_likelihood_and_label_source():
    """For one sample and one position, ``Σ_j (b_j b_jᵀ) ⊗ (ã ãᵀ) = Σ_j g_j g_jᵀ`` on each
    layer's block (K-FAC is block-diagonal over layers)."""
    torch.manual_seed(0)
    model = mlp((3, 4, 3)).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    targets = {"categorical": torch.tensor([1]), "gaussian": torch.randn(1, 3).double(),
               "bernoulli": torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)}
    shapes = {k: p.shape for k, p in model.named_parameters()}
    layer = torch.tensor([0] * 16 + [1] * 15)
    same_layer = (layer[:, None] == layer[None, :]).double()
    for lik, y in targets.items():
        for labels in ("empirical", "mc", "exact"):
            kw = {"mc_samples": 3, "generator": torch.Generator().manual_seed(5)}
            kw = kw if labels == "mc" else {}
            curv = _est(model, (x, y), lik, kind="kfac", labels=labels, **kw)
            if labels == "exact":
                ref = dense_label_fisher(model, x, lik)
            else:
                if labels == "mc":
                    out = model(x).detach()
                    draws = get_likelihood(lik).sample(out, torch.Generator().manual_seed(5), 3)
                    draws = draws.movedim(0, 1)
                else:
                    draws = y.unsqueeze(1)
                ref = dense_label_fisher(model, x, lik, draws=draws)
            torch.testing.assert_close(dense_from_mv(curv, shapes), ref * same_layer,
                                       msg=lambda m, lik=lik, labels=labels: f"{lik}/{labels}: {m}")


def test_backpack_kflr_is_the_exact_label_kfac():
    backpack = pytest.importorskip("backpack")
    from backpack.extensions import KFLR

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    curv = _est(model, (x, y), kind="kfac", labels="exact")
    bmodel = backpack.extend(nn.Sequential(*model).double())
    lossf = backpack.extend(nn.CrossEntropyLoss(reduction="mean"))
    with backpack.backpack(KFLR()):
        lossf(bmodel(x), y).backward()
    for name, layer in (("0", bmodel[0]), ("2", bmodel[2])):
        G_bp, A_bp = layer.weight.kflr
        blk = curv.blocks[name]
        d = A_bp.shape[0]
        torch.testing.assert_close(torch.kron(blk.G[0], blk.A[0][:d, :d]), torch.kron(G_bp, A_bp))
        (Gb,) = layer.bias.kflr  # bias block: G ⊗ A_bias,bias (= G · 1)
        torch.testing.assert_close(blk.G[0] * blk.A[0][d, d], Gb)


# -- transformers Conv1D and Embedding ----------------------------------------------------------
def test_hf_conv1d_factors_and_transposed_layout():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)).double()
    x, y = torch.randn(4, 2, 4, dtype=torch.float64), torch.randint(0, 3, (4, 2))
    curv = _est(model, (x, y), TokenCategorical(), kind="kfac")
    assert set(curv.structure().values()) == {"kfac"} and transformers is not None
    rec = _loop_out_grads(model, [model[0]], x, y, _tok_ce)[model[0]]
    a = torch.cat([_aug(i[0]) for i, _ in rec])
    b = torch.cat([g[0] for _, g in rec])
    torch.testing.assert_close(curv.blocks["0"].A[0], a.T @ a / 8)
    torch.testing.assert_close(curv.blocks["0"].G[0], b.T @ b / 4)
    # weight stored (in, out): the block matrix is [Wᵀ, b]; one sample, one position:
    # the K-FAC operator is the sample's exact empirical Fisher g gᵀ
    x1, y1 = x[:1, :1], y[:1, :1]
    one = _est(model, (x1, y1), TokenCategorical(), kind="kfac")
    shapes = {k: p.shape for k, p in model.named_parameters()}
    ref = dense_fisher(loop_grads(model, _tok_ce, x1, y1), list(shapes))
    layer = torch.tensor([0] * 25 + [1] * 18)
    torch.testing.assert_close(dense_from_mv(one, shapes), ref * (layer[:, None] == layer).double())
    for kind in ("kfac", "ekfac"):
        c = _est(model, (x, y), TokenCategorical(), kind=kind)
        check_against_dense(c, shapes, _dense_kronecker(c, model, x, y, _tok_ce))


class TokModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 3, padding_idx=0)
        self.head = nn.Linear(3, 4)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def test_embedding_factors_token_frequencies_and_dense():
    torch.manual_seed(0)
    model = TokModel().double()
    ids = torch.tensor([[1, 2, 2, 0], [3, 0, 1, 1], [6, 6, 6, 5]])
    y = torch.randint(0, 4, (3, 4))
    curv = _est(model, (ids, y), TokenCategorical(), kind="kfac")
    blk = curv.blocks["emb"]
    assert blk.A.shape == (1, 7) and blk.G.shape == (1, 3, 3) and blk.transposed
    counts = torch.zeros(7, dtype=torch.float64)
    for t in ids.reshape(-1).tolist():
        if t != 0:  # the padding row gets no gradient
            counts[t] += 1
    torch.testing.assert_close(blk.A[0], counts / 12)
    rec = _loop_out_grads(model, [model.emb], ids, y, _tok_ce)[model.emb]
    b = torch.cat([g[0] for _, g in rec])
    torch.testing.assert_close(blk.G[0], b.T @ b / 3)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    for kind in ("kfac", "ekfac"):
        c = _est(model, (ids, y), TokenCategorical(), kind=kind)
        check_against_dense(c, shapes, _dense_kronecker(c, model, ids, y, _tok_ce))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_param_shapes_from_the_blocks_are_the_diagonal_and_model_shapes(kind):
    """Grouped convolution, transposed embedding block, diagonal-stored factor sides
    (max_factor_dim) and a diagonal-part LayerNorm: the shapes read off the blocks equal
    the computed diagonal's and the parameters'."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2, padding=1), nn.Tanh(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.LayerNorm(4),
                         nn.Linear(4, 3)).double()
    cases = [
        (conv, (torch.randn(5, 4, 6, dtype=torch.float64), torch.randint(0, 3, (5,))), {}),
        (mlp((4, 8, 3)).double(),
         (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))),
         {"max_factor_dim": 5}),
        (TokModel().double(), (torch.tensor([[1, 2, 0], [3, 1, 1]]), torch.randint(0, 4, (2, 3))),
         {"lik": TokenCategorical()}),
    ]
    for model, data, kw in cases:
        curv = _est(model, data, kind=kind, **kw)
        shapes = curv.param_shapes()
        assert list(shapes) == curv.names()
        assert shapes == {k: tuple(v.shape) for k, v in curv.diagonal().items()}
        named = dict(model.named_parameters())
        assert shapes == {k: tuple(named[k].shape) for k in curv.names()}


# -- options: max_factor_dim, memory guard ------------------------------------------------------
def test_max_factor_dim_keeps_large_sides_diagonal():
    torch.manual_seed(0)
    model = mlp((4, 8, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    full = _est(model, (x, y), kind="kfac")
    small = _est(model, (x, y), kind="kfac", max_factor_dim=5)
    b0, b2 = small.blocks["0"], small.blocks["2"]
    assert b0.G.shape == (1, 8) and b0.A.shape == (1, 5, 5)  # d_G = 8 > 5; d_A = 5
    assert b2.A.shape == (1, 9) and b2.G.shape == (1, 3, 3)  # d_A = 9 > 5
    torch.testing.assert_close(b0.G[0], full.blocks["0"].G[0].diagonal())
    torch.testing.assert_close(b2.A[0], full.blocks["2"].A[0].diagonal())
    torch.testing.assert_close(b0.A, full.blocks["0"].A)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    check_against_dense(small, shapes, _dense_kronecker(small, model, x, y, ce_sum))
    ek = _est(model, (x, y), kind="ekfac", max_factor_dim=5)
    assert ek.blocks["0"].QG is None and ek.blocks["2"].QA is None
    check_against_dense(ek, shapes, _dense_kronecker(ek, model, x, y, ce_sum))


# -- data, combination, state ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_dataloader_batches_pool_sample_weighted(kind):
    torch.manual_seed(0)
    model = TinyCNN().double()
    x, y = torch.randn(7, 1, 8, 8, dtype=torch.float64), torch.randint(0, 4, (7,))
    one = _est(model, (x, y), kind=kind)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    many = _est(model, loader, kind=kind)
    assert many.n_samples == 7 and many.structure() == one.structure()
    for k, blk in one.blocks.items():
        other = many.blocks[k]
        torch.testing.assert_close(other.A, blk.A)
        torch.testing.assert_close(other.G, blk.G)
        if kind == "ekfac":  # eigenvector signs may differ: compare the block operators
            op = [_block_basis(b) @ torch.diag(b.s.reshape(-1)) @ _block_basis(b).T
                  for b in (blk, other)]
            torch.testing.assert_close(op[1], op[0])


def test_ekfac_sum_refits_in_the_pooled_eigenbasis():
    torch.manual_seed(0)
    model = mlp((3, 4, 3)).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 3, (10,))
    a = _est(model, (x[:6], y[:6]), kind="ekfac")
    b = _est(model, (x[6:], y[6:]), kind="ekfac")
    shapes = {k: p.shape for k, p in model.named_parameters()}
    Da, Db = dense_from_mv(a, shapes), dense_from_mv(b, shapes)
    both = a + b
    pooled = _est(model, (x, y), kind="kfac")
    mix = (6 * Da + 4 * Db) / 10
    assert both.n_samples == 10
    i = 0
    for k, blk in both.blocks.items():
        torch.testing.assert_close(blk.A, pooled.blocks[k].A)  # pooled factors
        torch.testing.assert_close(blk.G, pooled.blocks[k].G)
        Kb = _block_basis(blk)
        n = Kb.shape[0]
        sub = mix[i : i + n, i : i + n]
        torch.testing.assert_close(blk.s.reshape(-1), (Kb.T @ sub @ Kb).diagonal())
        i += n
    e = a.ema(b, 0.25)
    assert e.n_samples == 10
    torch.testing.assert_close(e.blocks["0"].A, 0.25 * a.blocks["0"].A + 0.75 * b.blocks["0"].A)


def _two_curvatures(kind):
    """Curvatures of ``kind`` on 8 and on the first 3 samples of one small model (a
    Linear, a LayerNorm, a Linear) and the model's parameter shapes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    shapes = {k: p.shape for k, p in model.named_parameters()}
    return _est(model, (x, y), kind=kind), _est(model, (x[:3], y[:3]), kind=kind), shapes


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_ema_to_state_and_files(kind, tmp_path):
    c, d, shapes = _two_curvatures(kind)
    dense = dense_from_mv(c, shapes)
    e = c.ema(d, 0.9)
    assert e.n_samples == 11
    if kind == "kfac":
        torch.testing.assert_close(e.blocks["0"].G, 0.9 * c.blocks["0"].G + 0.1 * d.blocks["0"].G)
        torch.testing.assert_close(e.diag["1.weight"], 0.9 * c.diag["1.weight"] + 0.1 * d.diag["1.weight"])
    f32 = c.to(torch.float32)
    assert f32.blocks["0"].A.dtype == torch.float32 and f32.diag["1.bias"].dtype == torch.float32
    torch.testing.assert_close(dense_from_mv(f32.to(torch.float64), shapes), dense, rtol=1e-5, atol=1e-6)
    clone = KroneckerFisher.from_state_dict(c.state_dict())
    assert clone.structure() == c.structure() and clone.n_samples == 8
    torch.testing.assert_close(dense_from_mv(clone, shapes), dense, atol=0, rtol=0)
    target = d  # a curvature of the same structure, estimated on 3 samples
    target.load_state_dict(c.state_dict())
    torch.testing.assert_close(dense_from_mv(target, shapes), dense, atol=0, rtol=0)
    c.save(tmp_path / "k.safetensors")
    back = KroneckerFisher.load(tmp_path / "k.safetensors")
    assert back.kind == kind and back.diag_reasons == c.diag_reasons
    torch.testing.assert_close(dense_from_mv(back, shapes), dense, atol=0, rtol=0)
    for lam in (0.1, 1.0):
        torch.testing.assert_close(back.logdet(lam), c.logdet(lam), atol=0, rtol=0)


def test_one_warning_names_the_diagonal_parameters_and_reasons(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    with warnings.catch_warnings(record=True) as rec, caplog.at_level("INFO", logger="natgrad"):
        warnings.simplefilter("always")
        natgrad.estimate_curvature(model, (x, y), kind="kfac")
    msgs = [str(w.message) for w in rec if "diagonal" in str(w.message)]
    assert len(msgs) == 1
    assert "keeps 2 parameter(s) diagonal" in msgs[0]
    assert "LayerNorm has no K-FAC form: 1.weight, 1.bias" in msgs[0]
    assert any("1.weight" in r.getMessage() for r in caplog.records)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fully covered: no warning at all
        natgrad.estimate_curvature(model, (x, y), kind="kfac", params=[model[0], model[2]])


def test_tiny_gpt2_conv1d_layers_are_kfac_and_tied_embedding_is_diagonal():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=100, n_positions=16, n_embd=32, n_layer=2,
                                  n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 100, (3, 8))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        curv = natgrad.estimate_curvature(model, {"input_ids": ids, "labels": ids},
                                          TokenCategorical(shift=True), kind="kfac")
    st = curv.structure()
    conv = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    assert len(conv) == 8
    for n in conv:
        assert st[f"{n}.weight"] == "kfac" and st[f"{n}.bias"] == "kfac"
    assert st["transformer.wte.weight"] == "diag"
    msgs = [str(w.message) for w in rec if "diagonal" in str(w.message)]
    assert len(msgs) == 1
    tied = "weight shared by transformer.wte.weight and lm_head.weight (tied): transformer.wte.weight"
    assert tied in msgs[0]
    assert "called without the batch as first dimension: transformer.wpe.weight" in msgs[0]
    # c_fc: A from the layer's own inputs (hooked here), T = 8 positions
    m = model.transformer.h[0].mlp.c_fc
    seen = []
    h = m.register_forward_hook(lambda mod, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    a = _aug(seen[0].reshape(-1, 32).float())
    torch.testing.assert_close(curv.blocks["transformer.h.0.mlp.c_fc"].A[0], a.T @ a / 24)
    assert curv.blocks["transformer.h.0.mlp.c_fc"].G.shape == (1, 128, 128)


# -- the products on partial vectors, and their per-call cost ---------------------------------
def _partial_models():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    conv = nn.Sequential(nn.Conv1d(4, 4, 3, groups=2, padding=1), nn.Tanh(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    xc = torch.randn(5, 4, 6, dtype=torch.float64)
    out = [(lin, x, y, ce_sum), (conv, xc, torch.randint(0, 3, (5,)), ce_sum)]
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return out
    tr = nn.Sequential(Conv1D(5, 4), nn.Tanh(), Conv1D(3, 5)).double()
    out.append((tr, torch.randn(4, 2, 4, dtype=torch.float64), torch.randint(0, 3, (4, 2)),
                _tok_ce))
    return out


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_products_of_partial_vectors_against_the_dense_operator(kind):
    """mv/solve/quad of vectors naming one tensor of a layer (weight only, bias only) for
    one-group Linear, transposed Conv1D and grouped Conv1d layers: the dense float64
    operator applied to the vector with zeros elsewhere, restricted to the given names;
    a float32 vector gets float32 results; a second solve with another damping."""
    for model, x, y, loss in _partial_models():
        lik = "categorical" if loss is ce_sum else TokenCategorical()
        curv = _est(model, (x, y), lik, kind=kind)
        shapes = {k: p.shape for k, p in model.named_parameters()}
        D = _dense_kronecker(curv, model, x, y, loss)
        eye = torch.eye(D.shape[0], dtype=torch.float64)
        offs, i = {}, 0
        for k, s in shapes.items():
            offs[k] = slice(i, i + s.numel())
            i += s.numel()
        gen = torch.Generator().manual_seed(3)
        for k, s in shapes.items():
            full = torch.zeros(D.shape[0], dtype=torch.float64)
            full[offs[k]] = torch.randn(s.numel(), dtype=torch.float64, generator=gen)
            v = {k: full[offs[k]].reshape(s)}
            for lam in (0.3, 2.0):
                ref = torch.linalg.solve(D + lam * eye, full)[offs[k]].reshape(s)
                got = curv.solve(v, lam)
                assert list(got) == [k]
                torch.testing.assert_close(got[k], ref)
            torch.testing.assert_close(curv.mv(v)[k], (D @ full)[offs[k]].reshape(s))
            torch.testing.assert_close(curv.quad(v), full @ D @ full)
            v32 = {k: v[k].float()}
            got32 = curv.mv(v32)[k]
            assert got32.dtype == torch.float32 and got32.is_contiguous()
            torch.testing.assert_close(got32, (D @ full)[offs[k]].reshape(s).float())
            assert curv.quad(v32).dtype == torch.float32


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_small_layer_products_are_plain_matrix_products(kind):
    """One Linear layer (one group): after the first call, mv/solve/quad issue the matrix
    products and a few views/copies of the block, no batched-matmul expansion, dtype
    conversion or per-call recomputation of ``1/(S + λ)``; the results are the dense
    operator's. (Before: 21-42 ATen calls per product on this layer.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 5, (9,))
    curv = _est(model, (x, y), kind=kind)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    check_against_dense(curv, shapes, _dense_kronecker(curv, model, x, y, ce_sum))
    v = {k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()}
    budget = {"mv": 12, "solve": 12, "quad": 10}
    for name, fn in (("mv", lambda: curv.mv(v)), ("solve", lambda: curv.solve(v, 0.3)),
                     ("quad", lambda: curv.quad(v))):
        fn()
        with _CountOps() as c:
            fn()
        assert c.n <= budget[name], f"{name}: {c.n} ATen calls"


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_ema_in_place_equals_ema_and_drops_the_cached_solves(kind):
    """``c.ema_(d, δ)`` overwrites c's factors with δ·A_c + (1-δ)·A_d (K-FAC: by hand)
    and gives the operator of ``c.ema(d, δ)``; products cached before (eigenbases,
    1/(S + λ), factored Cholesky) are not reused afterwards."""
    c, d, shapes = _two_curvatures(kind)
    A0, G0, D0 = c.blocks["0"].A.clone(), c.blocks["0"].G.clone(), c.diag["1.weight"].clone()
    ref = c.ema(d, 0.9)
    v = {k: torch.randn(s, dtype=torch.float64) for k, s in shapes.items()}
    c.solve(v, 0.3), c.mv(v), c.logdet(0.3)  # fill the caches
    c.damping_mode = "factored"
    c.solve(v, 0.3)
    c.damping_mode = "exact"
    ptr = c.blocks["0"].A.data_ptr()
    assert c.ema_(d, 0.9) is c and c.blocks["0"].A.data_ptr() == ptr and c.n_samples == 11
    if kind == "kfac":
        torch.testing.assert_close(c.blocks["0"].A, 0.9 * A0 + 0.1 * d.blocks["0"].A)
        torch.testing.assert_close(c.blocks["0"].G, 0.9 * G0 + 0.1 * d.blocks["0"].G)
    torch.testing.assert_close(c.diag["1.weight"], 0.9 * D0 + 0.1 * d.diag["1.weight"])
    check_against_dense(c, shapes, dense_from_mv(ref, shapes))
    if kind == "kfac":
        c.damping_mode = ref.damping_mode = "factored"
        torch.testing.assert_close(c.solve(v, 0.3), ref.solve(v, 0.3))


@pytest.mark.parametrize("small_inverse", [1024, 0])  # explicit inverses / Cholesky solves
def test_factored_solve_equals_the_damped_kronecker_solve(small_inverse, monkeypatch):
    """``damping_mode="factored"``: (G + (√λ/π) I)⁻¹ [W b] (A + π√λ I)⁻¹ per layer, by a
    dense float64 solve of the damped Kronecker product, both for factors kept as explicit
    inverses (small) and for factors applied by Cholesky solves (large)."""
    monkeypatch.setattr("natgrad.curvature.kronecker._SMALL_INVERSE", small_inverse)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    c = _est(model, (x, y), kind="kfac")
    c.damping_mode = "factored"
    v = {k: torch.randn(p.shape, dtype=torch.float64) for k, p in model.named_parameters()}
    lam = 0.05
    got = c.solve(v, lam)
    for layer in ("0", "2"):
        A, G = c.blocks[layer].A[0], c.blocks[layer].G[0]
        pi = ((A.diagonal().mean() / G.diagonal().mean()) ** 0.5).item()
        s = lam**0.5
        Gd = G + s / pi * torch.eye(G.shape[0], dtype=G.dtype)
        Ad = A + s * pi * torch.eye(A.shape[0], dtype=A.dtype)
        R = torch.cat([v[f"{layer}.weight"], v[f"{layer}.bias"][:, None]], 1)
        # row-major vec: vec(Gd X Ad) = (Gd ⊗ Ad) vec(X) for symmetric Ad
        ref = torch.linalg.solve(torch.kron(Gd, Ad), R.reshape(-1)).reshape(R.shape)
        torch.testing.assert_close(got[f"{layer}.weight"], ref[:, :-1])
        torch.testing.assert_close(got[f"{layer}.bias"], ref[:, -1])


@pytest.mark.parametrize("pending", [64 * 2**20, 0])  # statuses read together / one by one
@pytest.mark.parametrize("small_inverse", [1024, 0])
def test_factored_solve_of_mixed_layers_prepared_together(pending, small_inverse, monkeypatch):
    """The factored damped factors of all layers are prepared together (one host sync for
    their traces, one for their Cholesky statuses): each layer still gets its own sides,
    by a dense float64 reference per layer. Layers: one whose damped ``A`` is indefinite
    (its Cholesky fails: the pseudo-inverse), one with a diagonal ``A`` side, one without
    a bias; every combination of inverses / Cholesky solves and of status batching."""
    monkeypatch.setattr("natgrad.curvature.kronecker._SMALL_INVERSE", small_inverse)
    monkeypatch.setattr("natgrad.curvature.kronecker._PENDING_BYTES", pending)
    torch.manual_seed(7)
    dt = torch.float64

    def spd(n):
        X = torch.randn(n, 2 * n, dtype=dt)
        return X @ X.T / (2 * n) + 0.1 * torch.eye(n, dtype=dt)

    Q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=dt))
    indefinite = Q @ torch.diag(torch.tensor([-2.0, 1.0, 2.0, 3.0, 4.0], dtype=dt)) @ Q.T
    blocks = {
        "a": KroneckerBlock("a.weight", "a.bias", (3, 4), False, 1, indefinite[None], spd(3)[None]),
        "b": KroneckerBlock("b.weight", "b.bias", (2, 3), False, 1,
                            torch.rand(1, 4, dtype=dt) + 0.5, spd(2)[None]),
        "c": KroneckerBlock("c.weight", None, (2, 2), False, 1, spd(2)[None], spd(2)[None]),
    }
    c = KroneckerFisher(blocks, {}, 10, damping_mode="factored")
    shapes = {"a.weight": (3, 4), "a.bias": (3,), "b.weight": (2, 3), "b.bias": (2,),
              "c.weight": (2, 2)}
    v = {k: torch.randn(s, dtype=dt) for k, s in shapes.items()}
    lam = 0.05
    got = c.solve(v, lam)
    for layer, blk in blocks.items():
        A, G = blk.A[0], blk.G[0]
        dA = A if A.dim() == 1 else A.diagonal()
        pi = ((dA.mean() / G.diagonal().mean()) ** 0.5).item()
        s = lam**0.5
        Gd = G + s / pi * torch.eye(G.shape[0], dtype=dt)
        Ad = torch.diag(A + s * pi) if A.dim() == 1 else A + s * pi * torch.eye(A.shape[0], dtype=dt)
        assert (torch.linalg.eigvalsh(Ad).min() < 0) == (layer == "a")
        V = v[f"{layer}.weight"]
        if blk.bias is not None:
            V = torch.cat([V, v[f"{layer}.bias"][:, None]], 1)
        ref = torch.linalg.solve(Gd, V) @ torch.linalg.pinv(Ad, hermitian=True)
        torch.testing.assert_close(got[f"{layer}.weight"], ref[:, : shapes[f"{layer}.weight"][1]])
        if blk.bias is not None:
            torch.testing.assert_close(got[f"{layer}.bias"], ref[:, -1])


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_restrict_keeps_whole_layers_and_diagonal_entries(kind):
    """``restrict`` to a LayerNorm (the diagonal part) and the last Linear: every method
    equals the dense float64 block of the whole curvature on those parameters; the
    curvature itself is unchanged; a name set splitting a layer's [W, b] is refused."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 3)).double()
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    curv = _est(model, (x, y), kind=kind)
    shapes = {k: p.shape for k, p in model.named_parameters()}
    dense = dense_from_mv(curv, shapes)
    keep = ["1.weight", "1.bias", "3.weight", "3.bias"]
    sub = curv.restrict(list(reversed(keep)))  # returned in model order whatever the order asked
    assert sub.structure() == {"1.weight": "diag", "1.bias": "diag", "3.weight": kind,
                               "3.bias": kind}
    assert sub.diag_reasons == {k: curv.diag_reasons[k] for k in ("1.weight", "1.bias")}
    offs, o = {}, 0
    for k, s in shapes.items():
        offs[k], o = range(o, o + s.numel()), o + s.numel()
    idx = torch.tensor([i for k in keep for i in offs[k]])
    check_against_dense(sub, {k: shapes[k] for k in keep}, dense[idx][:, idx])
    torch.testing.assert_close(dense_from_mv(curv, shapes), dense, atol=0, rtol=0)
    with pytest.raises(ValueError, match="cut through the Kronecker block of layer '3'"):
        curv.restrict(["1.weight", "3.weight"])


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_kronecker_factors_see_the_layer_output_under_a_users_forward_hook(kind):
    # K-FAC's capture hook ran after a hook of the user's that doubles the output, and took
    # the doubled output's gradient as the layer's: F off by 4x. One sample: K-FAC is exact
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4)).double().eval()
    m[0].register_forward_hook(lambda mod, i, o: o * 2.0)
    x, y = torch.randn(1, 3, dtype=torch.float64), torch.tensor([1])
    g = natgrad.per_sample_grads(m, (x, y), engine="vmap")
    v = {k: torch.randn_like(p) for k, p in m.named_parameters()}
    gv = sum((g[j][0] * v[j]).sum() for j in g)
    c = natgrad.estimate_curvature(m, (x, y), kind=kind)
    assert_close_dict(c.mv(v), {k: g[k][0] * gv for k in g}, rtol=1e-10, atol=1e-14)


def test_kfac_warns_under_a_global_forward_hook():
    # a global hook runs before K-FAC's capture: a replaced output would go unseen
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    h = torch.nn.modules.module.register_module_forward_hook(lambda mod, i, o: None)
    try:
        with pytest.warns(UserWarning, match="global forward hook.*kind='diag'"):
            natgrad.estimate_curvature(m, x, kind="kfac", labels="exact")
    finally:
        h.remove()


class _ReadOutside(nn.Module):
    """Layers whose parameters the forward also reads outside the layer's own call: ``l``
    again through ``F.linear``, ``direct`` run as ``direct.forward(h)`` (no hooks), and a
    nanoGPT-style head tied to the embedding through ``F.linear(h, emb.weight)``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.l = nn.Linear(5, 5)
        self.direct = nn.Linear(5, 5)
        self.o = nn.Linear(5, 3)

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.tanh(self.l(h)) + torch.tanh(F.linear(h, self.l.weight))
        h = torch.tanh(self.direct.forward(h)).mean(1)
        return self.o(h) + F.linear(h, self.emb.weight)[:, :3]


def test_layers_read_outside_their_call_are_left_diagonal():
    """K-FAC's factors see a layer's own calls only; a layer whose weight is read elsewhere
    too is kept diagonal (exact). With one sample and one position, K-FAC is exact for a
    layer called once (``g gᵀ = (b bᵀ) ⊗ (ã ãᵀ)``), so every diagonal entry must equal
    the loop's ``g²`` (before: the missed uses gave l.weight / emb.weight errors of 70%+)."""
    torch.manual_seed(0)
    model = _ReadOutside().double()
    ids, y = torch.tensor([[3]]), torch.tensor([2])
    with pytest.warns(UserWarning, match="read outside the layer's own call"):
        K = natgrad.estimate_curvature(model, (ids, y), kind="kfac")
    s = K.structure()
    assert s["o.weight"] == s["o.bias"] == "kfac"
    for k in ("emb.weight", "l.weight", "l.bias", "direct.weight", "direct.bias"):
        assert s[k] == "diag", k
    g = loop_grads(model, ce_sum, ids, y)
    assert_close_dict(K.diagonal(), {k: v.pow(2).mean(0) for k, v in g.items()}, rtol=1e-10)


def test_layer_read_outside_its_call_in_a_later_layer_mix():
    """The same with several samples and a DataLoader: the diagonal part equals the loop's
    exact diagonal Fisher, and the layer read only through its call stays Kronecker."""
    torch.manual_seed(1)
    model = _ReadOutside().double()
    ids, y = torch.randint(0, 7, (6, 4)), torch.randint(0, 3, (6,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, y), batch_size=4)
    K = _est(model, loader, kind="ekfac")
    g = loop_grads(model, ce_sum, ids, y)
    ref = {k: v.pow(2).mean(0) for k, v in g.items()}
    diag = K.diagonal()
    assert K.structure()["o.weight"] == "ekfac"
    assert_close_dict({k: diag[k] for k in ("emb.weight", "l.weight", "direct.bias")},
                      {k: ref[k] for k in ("emb.weight", "l.weight", "direct.bias")}, rtol=1e-10)


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_ema_of_a_float32_and_a_float64_curvature_is_the_float64_ema(kind):
    """EKFAC's ``ema`` of curvatures of two dtypes raised a raw dtype error (the re-fit
    projected a float32 block on float64 bases; found by review); both orders now give the
    ema of the float64 copies (whose ema is checked against dense references above)."""
    torch.manual_seed(0)
    m64 = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    m32 = copy.deepcopy(m64).float()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    c32 = natgrad.estimate_curvature(m32, (x, y), kind=kind, labels="exact")
    c64 = natgrad.estimate_curvature(m64, (x.double(), y), kind=kind, labels="exact")
    v = {k: torch.randn_like(p) for k, p in m64.named_parameters()}
    for got, ref in ((c32.ema(c64, 0.4), c32.to(torch.float64).ema(c64, 0.4)),
                     (c64.ema(c32, 0.4), c64.ema(c32.to(torch.float64), 0.4))):
        out, want = got.mv(v), ref.mv(v)
        for k in v:
            assert out[k].dtype == torch.float64
            torch.testing.assert_close(out[k], want[k])


class _Tagger(nn.Module):
    """A per-token model taking Hugging Face-style keywords."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb, self.l1, self.head = nn.Embedding(6, 3), nn.Linear(3, 4), nn.Linear(4, 6)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.head(torch.tanh(self.l1(self.emb(input_ids))))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("source", ["batch", "backward"])
def test_kfac_input_factor_averages_every_position_padding_included(source, approx):
    """The documented convention (docs/concepts/curvature.md): ``A`` averages ``ã ãᵀ`` over
    all ``N·T`` positions a layer sees, padded ones included, for both sources and both
    approximations. Reference: ``A`` by hand from the layers' inputs (float64)."""
    model = _Tagger().double()
    ids = torch.tensor([[1, 4, 2, 0, 0], [5, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.where(mask.bool(), torch.tensor([[2, 0, 5, 1, 1], [1, 4, 3, 3, 3]]), -100)
    b = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if source == "batch":
        curv = natgrad.estimate_curvature(model, b, "token_categorical", kind="kfac",
                                          approx=approx)
    else:
        pre = natgrad.FisherPreconditioner(model, "token_categorical", kind="kfac",
                                           source="backward", loss_reduction="token_mean",
                                           update_every=1, kl_clip=None, kfac_approx=approx)
        F.cross_entropy(model(**b).reshape(-1, 6), labels.reshape(-1)).backward()
        pre.step()
        curv = pre.curvature
        pre.close()
    with torch.no_grad():
        h0 = model.emb(ids)
        h1 = torch.tanh(model.l1(h0))
    for name, h in (("l1", h0), ("head", h1)):
        a = torch.cat([h, torch.ones(*h.shape[:2], 1, dtype=h.dtype)], -1)  # [a; 1]
        if approx == "expand":
            flat = a.reshape(-1, a.shape[-1])
            ref = flat.T @ flat / flat.shape[0]
        else:
            bar = a.mean(1)
            ref = bar.T @ bar / 2
        torch.testing.assert_close(curv.blocks[name].A.reshape(ref.shape), ref,
                                   rtol=1e-12, atol=1e-14)
