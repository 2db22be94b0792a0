"""Which rows are the samples: a shared tensor listed first in a batch without labels,
and model outputs or labels whose first dimension is not the batch size."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.engine.batch import parse_batch
from tests.faults.test_exactness import MaskedAttention, causal, rel_err
from tests.reference import exact_categorical_fisher_by

ENGINES = ("vmap", "auto")


class PositionSum(nn.Module):
    """``x (N, T, D)`` plus a position embedding read at ``position_ids (1, T)``."""

    def __init__(self, T=3, D=5, classes=3):
        super().__init__()
        self.pos = nn.Embedding(T, D)
        self.f = nn.Linear(D, classes)

    def forward(self, position_ids, x):
        return self.f(torch.tanh(x + self.pos(position_ids)).mean(1))


# -- a shared tensor listed first, no labels ------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("N", [6, 3])
def test_square_mask_listed_first_without_labels_is_refused(engine, N):
    """N = 6 with T = 2: the (T, T) mask was read as a batch of 2 and the Fisher was 18x off."""
    x, mask = torch.randn(N, 2, 4, dtype=torch.float64), causal(2)
    model = MaskedAttention().double()
    with pytest.raises(ValueError, match=r"'mask' of shape \(2, 2\).*natgrad\.shared"):
        natgrad.estimate_fisher(model, {"mask": mask, "x": x}, labels="exact", engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_broadcast_row_listed_first_without_labels_is_refused(engine):
    """position_ids (1, T) before x (N, T, D): it was read as a batch of one sample."""
    batch = {"position_ids": torch.arange(3)[None], "x": torch.randn(4, 3, 5)}
    with pytest.raises(ValueError, match=r"'position_ids' looks shared.*natgrad\.shared"):
        natgrad.estimate_fisher(PositionSum(), batch, labels="exact", engine=engine)


def test_broadcast_row_before_same_rank_input_is_refused():
    """position_ids (1, T) before input_ids (N, T): as many dimensions, first dimension 1."""
    with pytest.raises(ValueError, match="natgrad.shared"):
        parse_batch({"position_ids": torch.arange(3)[None], "input_ids": torch.zeros(4, 3).long()})


@pytest.mark.parametrize(
    "batch, n",
    [
        # per-sample input first: the documented rule, N from the first tensor
        ({"x": torch.randn(6, 2, 4), "mask": torch.zeros(2, 2)}, 6),
        ({"input_ids": torch.zeros(4, 3).long(), "position_ids": torch.arange(3)[None]}, 4),
        # one sample with a shared (T, T) mask after it: fewer dimensions, kept shared
        ({"x": torch.randn(1, 3, 4), "mask": torch.zeros(3, 3)}, 1),
        ({"x": torch.randn(5, 4), "temp": torch.ones(2)}, 5),
        # the shared tensor wrapped, or labels: N is known
        ({"mask": natgrad.shared(torch.zeros(2, 2)), "x": torch.randn(6, 2, 4)}, 6),
        ({"mask": torch.zeros(2, 2), "x": torch.randn(6, 2, 4), "labels": torch.zeros(6)}, 6),
    ],
)
def test_batch_size_when_the_first_tensor_is_not_refused(batch, n):
    assert parse_batch(batch).size == n


@pytest.mark.parametrize("engine", ENGINES)
def test_wrapped_mask_listed_first_is_exact(engine):
    torch.manual_seed(0)
    model = MaskedAttention().double()
    x, mask = torch.randn(6, 2, 4, dtype=torch.float64), causal(2)
    batch = {"mask": natgrad.shared(mask), "x": x}
    got = natgrad.estimate_fisher(model, batch, labels="exact", engine=engine)
    ref = exact_categorical_fisher_by(model, lambda i: model(x[i : i + 1], mask)[0], 6)
    assert got.n_samples == 6
    assert rel_err(got, ref) < 1e-10
