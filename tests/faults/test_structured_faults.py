"""Faults of structured pruning: bad budgets, unsupported couplings, bad inputs.

Every case raises a named error with a message that says what to do, or (for couplings
that are left out) reports the reason and never returns a broken model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.pruning.attention import from_multihead
from natgrad.pruning.search import BudgetError
from natgrad.pruning.structured import convert_attention
from natgrad.pruning.structures import UnsupportedStructureError, find_groups
from tests.conftest import mlp


def _data(n=12, d=5, c=4):
    torch.manual_seed(0)
    return torch.randn(n, d), torch.randint(0, c, (n,))


def _mlp():
    torch.manual_seed(0)
    return mlp((5, 8, 6, 4), act=nn.ReLU)


# -- budgets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({}, "exactly one budget"),
        ({"flops": 0.5, "params": 0.5}, "exactly one budget"),
        ({"flops": 0.0}, r"must lie in \(0, 1\]"),
        ({"flops": -0.2}, r"must lie in \(0, 1\]"),
        ({"params": 1.5}, r"must lie in \(0, 1\]"),
        ({"flops": float("nan")}, r"must lie in \(0, 1\]"),
        ({"latency": "fast"}, "must be a number"),
    ],
)
def test_bad_budgets(kwargs, phrase):
    x, y = _data()
    with pytest.raises(BudgetError, match=phrase):
        natgrad.prune_structured(_mlp(), (x, y), measure=False, **kwargs)


@pytest.mark.parametrize("make", [lambda b: iter(b), lambda b: (t for t in b)])
def test_one_pass_iterator_data_is_refused_up_front(make):
    # the data is read several times: a generator was consumed by the example batch and
    # the error said the data held no batch
    x, y = _data()
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    with pytest.raises(TypeError, match=r"one-pass iterator.*list of batches or a DataLoader"):
        natgrad.prune_structured(_mlp(), make(batches), flops=0.6, measure=False)
    small, _ = natgrad.prune_structured(_mlp(), batches, flops=0.6, measure=False)  # a list
    assert small is not None


def test_budget_out_of_reach_names_the_floor():
    x, y = _data()
    with pytest.raises(BudgetError, match=r"out of reach.*keeps 0\.\d+ of its flops"):
        natgrad.prune_structured(_mlp(), (x, y), flops=0.01, min_keep=0.5, measure=False)


@pytest.mark.parametrize("min_keep, err", [(0, ValueError), (1.0, ValueError), ("1", TypeError)])
def test_bad_min_keep(min_keep, err):
    x, y = _data()
    with pytest.raises(err, match="min_keep"):
        natgrad.prune_structured(_mlp(), (x, y), flops=0.5, min_keep=min_keep, measure=False)


def test_budget_of_one_keeps_everything():
    x, y = _data()
    model = _mlp()
    small, rep = natgrad.prune_structured(model, (x, y), flops=1.0, measure=False)
    assert rep.flops_after == rep.flops_before
    torch.testing.assert_close(small(x), model(x))


# -- unsupported couplings ---------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 4)

    def forward(self, x):
        return self.b(x + torch.relu(self.a(x)))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 3)
        self.c = nn.Linear(6, 4)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


class ReshapeFixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(1, 4, 3, padding=1)
        self.b = nn.Linear(4 * 5, 4)

    def forward(self, x):
        h = torch.relu(self.a(x.unsqueeze(1)))
        return self.b(h.reshape(-1, 20))


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.b = nn.Linear(8, 4)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(torch.relu(self.a(x)))))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 4)
        self.c = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) * self.c(h)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace it
            x = -x
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize(
    "model, module, phrase",
    [
        (Residual(), "a", "residual"),
        (Concat(), "a", "torch.cat"),
        (ReshapeFixed(), "a", "reshape"),
        (WithLayerNorm(), "a", "LayerNorm"),
        (Shared(), "a", "shared weights"),
        (Branchy(), "a", "2 users"),
    ],
)
def test_couplings_are_left_out_with_the_reason(model, module, phrase):
    x, y = _data()
    groups, skipped = find_groups(model, (x, y))
    assert module not in {g.name for g in groups}
    assert phrase in skipped[module]
    if not groups:
        with pytest.raises(UnsupportedStructureError, match="Nothing in .* can be pruned"):
            natgrad.prune_structured(model, (x, y), flops=0.5, measure=False)


def test_untraceable_model_raises_named_error():
    x, y = _data()
    with pytest.raises(UnsupportedStructureError, match="tracing Untraceable failed"):
        natgrad.prune_structured(Untraceable(), (x, y), flops=0.5, measure=False)


def test_unsupported_multihead_attention_is_left_out():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=4, batch_first=True)
    with pytest.raises(ValueError, match="kdim == vdim == embed_dim"):
        from_multihead(mha)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = mha
            self.head = nn.Linear(8, 3)

        def forward(self, q, kv):
            return self.head(self.att(q, kv, kv)[0].mean(1))

    m = M()
    assert convert_attention(m) == []
    groups, skipped = find_groups(m, {"q": torch.randn(2, 3, 8), "kv": torch.randn(2, 3, 4)})
    assert groups == [] and "kdim/vdim" in skipped["att"]


def test_only_excluded_structures_left_raises():
    x, y = _data()
    with pytest.raises(UnsupportedStructureError, match="0: excluded"):
        natgrad.prune_structured(_mlp(), (x, y), flops=0.5, exclude=["0", "2"], measure=False)


# -- bad inputs ---------------------------------------------------------------------------------


def test_train_mode_batchnorm_and_dropout_raise():
    x, y = _data()
    bn = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4)).train()
    with pytest.raises(ValueError, match="train mode"):
        natgrad.prune_structured(bn, (x, y), flops=0.5, measure=False)
    dr = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 4)).train()
    with pytest.raises(ValueError, match="train mode"):
        natgrad.prune_structured(dr, (x, y), flops=0.5, measure=False)


def test_unknown_options_raise():
    x, y = _data()
    with pytest.raises(ValueError, match="Unknown criterion"):
        natgrad.prune_structured(_mlp(), (x, y), flops=0.5, criterion="taylor", measure=False)
    with pytest.raises(ValueError, match="Unknown labels"):
        natgrad.prune_structured(_mlp(), (x, y), flops=0.5, labels="exact", measure=False)


def test_empirical_labels_need_labels():
    x, _ = _data()
    with pytest.raises(ValueError, match="labels='empirical' needs labels"):
        natgrad.prune_structured(_mlp(), x, flops=0.5, measure=False)
    # with mc labels, unlabeled data works and the measured loss is n/a
    small, rep = natgrad.prune_structured(_mlp(), x, flops=0.5, labels="mc", measure=False)
    assert rep.measured_loss_increase is None and "n/a" in str(rep)


def test_empty_data_raises():
    with pytest.raises(ValueError, match="data holds no batch"):
        natgrad.prune_structured(_mlp(), [], flops=0.5, measure=False)


def test_wrong_label_shape_raises():
    x, _ = _data()
    with pytest.raises(ValueError, match="first dimension must be the batch size"):
        natgrad.prune_structured(_mlp(), (x, torch.zeros(3, dtype=torch.long)), flops=0.5, measure=False)


def test_non_finite_fisher_raises():
    x, y = _data()
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="mask Fisher"):
        natgrad.prune_structured(model, (x, y), flops=0.5, measure=False)


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"finetune_steps": -1}, "finetune_steps"),
        ({"finetune_steps": 2.5}, "finetune_steps"),
        ({"finetune_lr": 0.0}, "finetune_lr"),
        ({"finetune_lr": float("nan")}, "finetune_lr"),
        ({"search": "beam"}, "search"),
        ({"criterion": "obs"}, "criterion"),
    ],
)
def test_bad_finetune_and_search_options(kwargs, phrase):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match=phrase):
        natgrad.prune_structured(model, (x, y), flops=0.5, measure=False, **kwargs)


def test_latency_clock_is_checked():
    from natgrad.pruning.structured import measure_latency

    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="clock"):
        measure_latency(model, x, [1], 2, clock="cpu")
    out = measure_latency(model, x, [1, 4], 3, clock="thread")
    assert set(out) == {1, 4} and all(v >= 0 for v in out.values())


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        ({"tune_scope": "all"}, "Unknown tune_scope 'all'"),
        ({"tune_fit": "scales"}, "Unknown tune_fit 'scales'"),
        ({"tune_fit": "masks", "tune_scope": "downstream"}, "use it with tune_scope='consumers'"),
    ],
)
def test_bad_tuning_options(kwargs, phrase):
    x, y = _data()
    with pytest.raises(ValueError, match=phrase):
        natgrad.prune_structured(_mlp(), (x, y), flops=0.6, measure=False, **kwargs)


# -- re-fit calibration ----------------------------------------------------------------------------


class _Gated(nn.Module):
    """``fc2(relu(fc1(x)))``, except that with ``gate`` set, a batch with an entry above
    it takes the ``bypass`` layer and never reaches ``fc1``/``fc2`` (data-dependent control
    flow: torch.fx traces the model with ``gate=None`` only)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.bypass = nn.Linear(5, 8), nn.Linear(8, 4), nn.Linear(5, 4)
        self.gate: float | None = None

    def forward(self, x):
        if self.gate is not None and bool((x.abs() > self.gate).any()):
            return self.bypass(x)
        return self.fc2(torch.relu(self.fc1(x)))


def test_refit_calibration_batch_that_skips_a_consumer_is_named():
    # prune_structured traces the model with torch.fx, which cannot follow the gate, so
    # the situation is built where the re-fit meets it: tune_layers on a shrunk model,
    # with a second calibration batch whose forward bypasses the consumer fc2
    from natgrad.pruning.shrink import shrink_model, tune_layers

    original = _Gated()
    x, y = _data()
    groups, _ = find_groups(original, x)
    assert [(g.producer, g.consumer) for g in groups] == [("fc1", "fc2")]
    removed = {groups[0].name: torch.tensor([0, 3])}
    pruned = shrink_model(_Gated(), groups, removed)
    original.gate = pruned.gate = 10.0
    assert tune_layers(original, pruned, groups, removed, [(x, y)]) == ["fc2"]  # reached
    far = x.clone()
    far[0, 0] = 100.0  # this batch takes the bypass
    with pytest.raises(
        ValueError,
        match=r"calibration batch did not reach layer\(s\) \['fc2'\] of the original model: "
        r"pass calibration inputs that run the whole model",
    ):
        tune_layers(original, pruned, groups, removed, [(x, y), (far, y)])


def test_finetune_of_a_fully_frozen_model_is_refused_before_pruning():
    # rebuilt layers now keep requires_grad, so a frozen model has nothing to fine-tune:
    # refused up front with the fix, not a raw optimizer error after the pruning work
    torch.manual_seed(0)
    model = mlp().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x, y = torch.randn(32, 5), torch.randint(0, 4, (32,))
    with pytest.raises(ValueError, match="nothing to fine-tune.*finetune_steps=0"):
        natgrad.prune_structured(model, (x, y), flops=0.6, measure=False, finetune_steps=3)


@pytest.mark.parametrize("rounds", [0, -2, 2.5, "3", True, None])
def test_bad_rounds(rounds):
    x, y = _data()
    with pytest.raises(ValueError, match=r"Invalid rounds.*integer >= 1"):
        natgrad.prune_structured(_mlp(), (x, y), flops=0.5, rounds=rounds, measure=False)


def test_gradual_latency_budget_raises():
    x, y = _data()
    with pytest.raises(BudgetError, match=r"rounds=2 with a latency budget is not supported"):
        natgrad.prune_structured(_mlp(), (x, y), latency=0.5, rounds=2, measure=False)


def test_gradual_budget_out_of_reach_names_the_floor():
    x, y = _data()
    with pytest.raises(BudgetError, match=r"out of reach.*keeps 0\.\d+ of its flops"):
        natgrad.prune_structured(
            _mlp(), (x, y), flops=0.01, min_keep=0.5, rounds=3, measure=False
        )


# -- cases found by review ----------------------------------------------------------------


def test_a_consumer_input_without_the_sample_axis_is_named():
    from natgrad.pruning.structures import Group, mask_grads
    from tests.pruning.test_structures import SeqFirstMLP

    torch.manual_seed(0)
    model = SeqFirstMLP().eval()
    x, y = torch.randn(4, 5, 6), torch.randint(0, 3, (4,))  # l2 reads (5, 4, 12)
    wrong = Group(name="l1", kind="neuron", size=12, producer="l1", consumer="l2", batch_dim=0)
    with pytest.raises(UnsupportedStructureError, match="sample axis could not be found"):
        mask_grads(model, [wrong], (x, y))


class UsesAttentionWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(6, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16 + 5, 3)

    def forward(self, x):
        o, w = self.att(self.emb(x), self.emb(x), self.emb(x))  # w: (N, T, T)
        return self.head(torch.cat([o.mean(1), w.mean(1)], -1))


def test_attention_whose_weights_are_used_is_left_out_by_name():
    torch.manual_seed(0)
    x, y = torch.randn(8, 5, 6), torch.randint(0, 3, (8,))
    with pytest.raises(UnsupportedStructureError, match="uses its attention weights"):
        natgrad.prune_structured(UsesAttentionWeights().eval(), (x, y), flops=0.7, measure=False)
