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
