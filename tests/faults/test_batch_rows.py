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
ROWS = "one output row per sample"


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
    with pytest.raises(ValueError, match=r"one output row per sample.*'x' reached every sample "
                                         r"whole.*natgrad\.shared"):
        natgrad.estimate_fisher(model, {"mask": mask, "x": x}, labels="exact", engine=engine)


SHARED_FIRST = (
    r"'x' reached every sample whole \(shared\): its first axis is not the batch axis, "
    r"whose size N was read from 'position_ids'.*natgrad\.shared"
)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("tupled", [False, True])
def test_broadcast_row_listed_first_without_labels_is_refused(engine, tupled):
    """position_ids (1, T) before x (N, T, D): it was read as a batch of one sample (the
    capture path's probe of two samples then raised torch's raw broadcast error)."""
    batch = {"position_ids": torch.arange(3)[None], "x": torch.randn(4, 3, 5)}
    with pytest.raises(ValueError, match=f"{ROWS}.*{SHARED_FIRST}"):
        natgrad.estimate_fisher(
            PositionSum(), (batch,) if tupled else batch, labels="exact", engine=engine
        )


class PooledPositionSum(PositionSum):
    """One output row for the whole of ``x``: the probe of one sample has one row."""

    def forward(self, position_ids, x):
        return super().forward(position_ids, x).sum(0, keepdim=True)


def test_probe_that_cannot_run_names_the_shared_entries():
    """The capture path's probe of two copies of the first sample fails on a shape error
    from the model (the whole batch runs): the error names the entries passed whole."""
    batch = {"position_ids": torch.arange(3)[None], "x": torch.randn(4, 3, 5)}
    with pytest.raises(RuntimeError, match=r"cut from batch 0.*must match the size.*" + SHARED_FIRST):
        natgrad.estimate_fisher(PooledPositionSum(), batch, labels="exact", engine="auto")


@pytest.mark.parametrize(
    "batch, n",
    [
        # per-sample input first: the documented rule, N from the first tensor
        ({"x": torch.randn(6, 2, 4), "mask": torch.zeros(2, 2)}, 6),
        ({"input_ids": torch.zeros(4, 3).long(), "position_ids": torch.arange(3)[None]}, 4),
        # one sample with a shared (T, T) mask after it: fewer dimensions, kept shared
        ({"x": torch.randn(1, 3, 4), "mask": torch.zeros(3, 3)}, 1),
        ({"x": torch.randn(5, 4), "temp": torch.ones(2)}, 5),
        # valid batches an earlier shape rule refused (review): a loader's last batch of
        # one sample with shared prototypes, a 4-D shared bias after the inputs
        ({"x": torch.randn(1, 4), "protos": torch.randn(5, 4)}, 1),
        ({"x": torch.randn(3, 4), "bias": torch.zeros(1, 1, 6, 6)}, 3),
        ({"position_ids": torch.arange(3)[None], "input_ids": torch.zeros(4, 3).long()}, 1),
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


# -- model outputs and labels with one row per sample --------------------------------


class FlatTokens(nn.Module):
    """A token classifier returning ``logits.view(-1, C)``: ``N·T`` rows, not ``N``."""

    def __init__(self, V=7, D=5, classes=3, flat=True):
        super().__init__()
        self.e = nn.Embedding(V, D)
        self.f = nn.Linear(D, classes)
        self.flat = flat

    def forward(self, ids):
        logits = self.f(torch.tanh(self.e(ids)))
        return logits.view(-1, logits.shape[-1]) if self.flat else logits


class PairRows(nn.Module):
    """A regressor whose output ``(2N, 2)`` has two rows per sample."""

    def __init__(self):
        super().__init__()
        self.f = nn.Linear(5, 4)

    def forward(self, x):
        return self.f(x).view(-1, 2)



@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("labels", ["exact", "mc"])
def test_flat_token_logits_without_labels_are_refused(engine, labels):
    ids = torch.randint(0, 7, (4, 3))
    with pytest.raises(ValueError, match=f"{ROWS}.*token_categorical"):
        natgrad.estimate_fisher(FlatTokens(), ids, labels=labels, engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_flat_token_logits_with_one_label_per_sample_are_refused(engine):
    """torch's cross_entropy refuses (12, C) logits with 4 labels; natgrad read one
    label per sample on its first row and the rest label-free."""
    ids, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"shape \(3, 3\): 3 rows.*" + ROWS):
        natgrad.per_sample_grads(FlatTokens(), (ids, y), engine=engine)
    with pytest.raises(ValueError, match=ROWS):
        natgrad.estimate_fisher(FlatTokens(), (ids, y), engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
def test_gaussian_output_with_two_rows_per_sample_is_refused(engine):
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    with pytest.raises(ValueError, match=ROWS):
        natgrad.estimate_fisher(PairRows(), (x, y), "gaussian", engine=engine)


def test_kfac_refuses_flat_token_logits():
    ids = torch.randint(0, 7, (4, 3))
    with pytest.raises(ValueError, match=ROWS):
        natgrad.estimate_curvature(FlatTokens(), ids, kind="kfac", labels="exact")


@pytest.mark.parametrize(
    "lik, out, target",
    [
        ("categorical", torch.randn(12, 3), torch.randint(0, 3, (4,))),
        ("gaussian", torch.randn(8, 2), torch.randn(4, 2)),
        ("bernoulli", torch.randn(8, 2), torch.rand(4, 2)),
        ("token_categorical", torch.randn(8, 3, 5), torch.randint(0, 5, (4, 3))),
    ],
)
def test_likelihoods_refuse_outputs_without_one_row_per_label(lik, out, target):
    with pytest.raises(ValueError, match=r"a batch of 4 samples.*" + ROWS):
        natgrad.engine.likelihoods.get_likelihood(lik).prepare_target(out, target)


def test_mask_grads_refuses_flat_token_logits():
    from natgrad.pruning.structures import Group, mask_grads

    model = FlatTokens()
    ids, y = torch.randint(0, 7, (4, 3)), torch.randint(0, 3, (4,))
    groups = [Group(name="e", kind="neuron", producer="e", consumer="f", size=5)]
    with pytest.raises(ValueError, match=ROWS):
        mask_grads(model, groups, (ids, y))


@pytest.mark.parametrize("engine", ENGINES)
def test_the_named_fix_token_logits_are_exact(engine):
    """The fix the message names: logits (N, T, C) with likelihood='token_categorical'
    give the per-token exact Fisher (a loop over samples and tokens, float64)."""
    torch.manual_seed(0)
    model = FlatTokens(flat=False).double()
    ids = torch.randint(0, 7, (4, 3))
    got = natgrad.estimate_fisher(model, ids, "token_categorical", labels="exact", engine=engine)
    named = dict(model.named_parameters())
    ref = {k: torch.zeros_like(p) for k, p in named.items()}
    for n in range(4):
        for t in range(3):

            def token_logits(_, n=n, t=t):
                return model(ids[n : n + 1])[0, t]

            one = exact_categorical_fisher_by(model, token_logits, 1)
            ref = {k: ref[k] + one[k] / 4 for k in ref}
    assert rel_err(got, ref) < 1e-10
