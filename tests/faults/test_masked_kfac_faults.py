"""A weight reparametrized by something that is not a ``torch.nn.utils.prune`` mask has no
Kronecker form: K-FAC names it and keeps it diagonal, ``source="backward"`` refuses it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import natgrad


class _Doubled(prune.BasePruningMethod):
    """A custom reparametrization through ``weight_orig``: ``2 · weight_orig ⊙ mask``."""

    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        return default_mask

    def apply_mask(self, module):
        name = self._tensor_name
        return 2 * getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask")


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    _Doubled.apply(m[0], "weight")
    prune.random_unstructured(m[2], "weight", 0.5)  # a true mask: covered
    x = torch.randn(5, 3, dtype=torch.float64)
    return m, (x, torch.randint(0, 3, (5,)))


def test_custom_reparametrization_stays_diagonal_with_its_reason():
    model, batch = _model()
    with pytest.warns(UserWarning, match="custom pruning method _Doubled") as rec:
        C = natgrad.estimate_curvature(model, batch, kind="kfac")
    assert "no Kronecker form" in str(rec[0].message)
    s = C.structure()
    assert s["0.weight_orig"] == "diag" and s["0.bias"] == "diag"
    assert s["2.weight_orig"] == "kfac"


def test_custom_reparametrization_refused_by_backward_source():
    model, _ = _model()
    with pytest.raises(ValueError, match="custom pruning method _Doubled"):
        natgrad.FisherPreconditioner(model, kind="kfac", source="backward")


def test_laplace_refuses_masked_kronecker_blocks():
    model, batch = _model()
    with pytest.warns(UserWarning):
        C = natgrad.estimate_curvature(model, batch, kind="kfac")
    with pytest.raises(ValueError, match="masked Kronecker blocks.*kind='diag'"):
        natgrad.fisher_uncertainty(model, batch[0], C, n_data=5)


def test_non_binary_mask_is_refused():
    """``prune.custom_from_mask`` accepts a 0.5 entry: ``W_orig ⊙ M`` then scales it, and
    the masked forms (``M ⊙ diag F``, per-sample gradient ``M ⊙ g``) would be 2x off."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    mask = torch.ones(5, 4, dtype=torch.float64)
    mask[0], mask[1] = 0.5, 0
    prune.custom_from_mask(m[0], "weight", mask)
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    for kind in ("kfac", "ekfac"):
        with pytest.raises(ValueError, match="values other than 0 and 1"):
            natgrad.estimate_curvature(m, (x, y), kind=kind)
    for kind in ("kfac", "diag"):  # the backward-source diagonal reads the mask too
        pre = natgrad.FisherPreconditioner(m, kind=kind, source="backward", kl_clip=None)
        torch.nn.functional.cross_entropy(m(x), y).backward()
        with pytest.raises(ValueError, match="values other than 0 and 1"):
            pre.step()
        pre.close()
        m.zero_grad()


@pytest.mark.parametrize("source", ["batch", "backward"])
@pytest.mark.parametrize("kind", ["kfac", "diag"])
@pytest.mark.parametrize("change", ["pruned", "removed", "made_permanent"])
def test_pruning_changed_after_the_preconditioner_was_built(source, kind, change):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    if change != "pruned":
        prune.random_unstructured(m[0], "weight", 0.5)
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    pre = natgrad.FisherPreconditioner(m, kind=kind, source=source, kl_clip=None,
                                       update_every=1)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    pre.step((x, y))
    if change == "pruned":
        prune.l1_unstructured(m[0], "weight", 0.5)
    elif change == "removed":
        prune.remove(m[0], "weight")
    else:
        natgrad.make_permanent(m)
    m.zero_grad()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    with pytest.raises(ValueError, match="pruning changed since this FisherPreconditioner was "
                                         "built.*Build a new FisherPreconditioner"):
        pre.step((x, y))
    pre.close()


def test_obs_saliency_refuses_masked_kronecker_blocks():
    """Its inverse diagonal would be of the masked projection (inf saliency at pruned
    entries, kept ones off [(F_KK + λI)⁻¹]_qq)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    prune.l1_unstructured(m[0], "weight", 0.5)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    for kind in ("kfac", "ekfac"):
        C = natgrad.estimate_curvature(m, (x, y), kind=kind)
        with pytest.raises(ValueError, match="obs_saliency: the curvature holds masked"):
            natgrad.obs_saliency(m, C, damping=0.1)
    natgrad.obs_saliency(m, natgrad.estimate_curvature(m, (x, y), kind="diag"), damping=0.1)


@pytest.mark.parametrize("kind, source", [("diag", "backward"), ("diag", "batch"),
                                          ("lowrank", "batch")])
def test_regrowth_under_a_kind_of_w_orig_is_refused(kind, source):
    """``kind="diag"`` / ``"lowrank"`` hold the Fisher of ``weight_orig``, 0 at pruned
    entries: after a regrowth the step divided those entries' gradient by the damping
    alone (1000x the gradient at damping 1e-3; noticed in session 8). Refused now, by
    name; further pruning is not; a new preconditioner after the regrowth works."""
    import torch.nn.functional as F
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3)).double()
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.double)
    prune.custom_from_mask(m[0], "weight", mask)
    x, y = torch.randn(16, 4, dtype=torch.double), torch.randint(0, 3, (16,))
    pre = natgrad.FisherPreconditioner(m, kind=kind, source=source, update_every=10,
                                       damping=1e-3, kl_clip=None)

    def step():
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        return pre.step((x, y) if source == "batch" else None)

    for _ in range(2):
        step()
    m[0].weight_mask[0, 0] = 0.0  # more pruning: fine
    step()
    m[0].weight_mask[0, 1] = 1.0  # regrowth of an entry pruned at the last refresh
    with pytest.raises(ValueError, match=r"pruned at the last refresh.*kind='kfac'"):
        step()
    m[0].weight_mask[0, 1] = 0.0
    step()  # back to the refresh's mask: accepted
    m[0].weight_mask[0, 1] = 1.0
    pre.close()
    pre = natgrad.FisherPreconditioner(m, kind=kind, source=source, damping=1e-3,
                                       kl_clip=None)
    step()
    g = m[0].weight_orig.grad
    assert torch.isfinite(g).all() and bool((g[0, 1] != 0).item())


def test_regrowth_at_a_replacing_refresh_is_accepted():
    """With ema_decay=0 and a refresh at the step, the curvature is replaced by one
    measured under the new mask: a regrowth there is exact (it was refused; review). The
    step then equals a fresh preconditioner's on the regrown model."""
    import torch.nn.functional as F
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3)).double()
    prune.custom_from_mask(m[0], "weight", torch.tensor(
        [[1, 0, 1, 1], [1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.double))
    x, y = torch.randn(16, 4, dtype=torch.double), torch.randint(0, 3, (16,))
    pre = natgrad.FisherPreconditioner(m, kind="diag", update_every=1, ema_decay=0.0,
                                       damping=1e-3, kl_clip=None)
    for _ in range(2):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        pre.step((x, y))
    m[0].weight_mask.fill_(1.0)  # regrow everything
    twin = nn.Sequential(nn.Linear(4, 3)).double()
    prune.custom_from_mask(twin[0], "weight", torch.ones(3, 4, dtype=torch.double))
    with torch.no_grad():
        twin[0].weight_orig.copy_(m[0].weight_orig)
        twin[0].bias.copy_(m[0].bias)
    fresh = natgrad.FisherPreconditioner(twin, kind="diag", damping=1e-3, kl_clip=None)
    for model, p in ((m, pre), (twin, fresh)):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        p.step((x, y))
    torch.testing.assert_close(m[0].weight_orig.grad, twin[0].weight_orig.grad,
                               rtol=1e-12, atol=1e-15)
