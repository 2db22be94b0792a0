"""Gradual structured pruning (``prune_structured(rounds=k)``): the rounds against a chain
of one-step prunes, the re-fit against a one-step re-fit of the original, budgets against
hand counts, the shrunken model against the masked original."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import natgrad
from natgrad.pruning.attention import shrink_heads
from natgrad.pruning.search import build_cost_model
from natgrad.pruning.shrink import count_flops, count_params, shrink_model, tune_layers
from natgrad.pruning.structures import find_groups
from tests.conftest import TinyEncoder, mlp
from tests.pruning.test_structured import CASES, _batch, _caller, encoder_case, masked_output


def _mlp_task(seed=0):
    torch.manual_seed(seed)
    model = mlp((6, 20, 20, 3), act=nn.ReLU).double()
    x = torch.randn(120, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (120,))
    return model, x, y


def _removed(rep):
    return {k: torch.tensor(v, dtype=torch.long) for k, v in rep.removed.items()}


def test_rounds_one_is_the_one_step_prune():
    model, x, y = _mlp_task()
    a, ra = natgrad.prune_structured(model, (x, y), flops=0.5, measure=False)
    b, rb = natgrad.prune_structured(model, (x, y), flops=0.5, measure=False, rounds=1)
    assert ra.removed == rb.removed and ra.tuned_layers == rb.tuned_layers
    assert ra.predicted_loss_increase == rb.predicted_loss_increase
    assert ra.measured_loss_increase == rb.measured_loss_increase
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("criterion", ["fisher", "compensated", "magnitude", "random"])
def test_two_rounds_equal_a_chain_of_two_one_step_prunes(criterion):
    # without re-fit, round 2 is a one-step prune of round 1's model at keep·F0/F1 of its
    # FLOPs (min_keep a count, the same for both), seed + 1; indices map back through round 1
    model, x, y = _mlp_task()
    keep, kw = 0.4, {"tune": False, "measure": False, "min_keep": 1, "criterion": criterion}
    small, rep = natgrad.prune_structured(model, (x, y), flops=keep, rounds=2, **kw)
    m1, r1 = natgrad.prune_structured(model, (x, y), flops=keep ** 0.5, seed=0, **kw)
    m2, r2 = natgrad.prune_structured(
        m1, (x, y), flops=keep * r1.flops_before / r1.flops_after, seed=1, **kw
    )
    for g, (_, n) in r1.kept.items():
        alive = torch.tensor([i for i in range(n) if i not in r1.removed[g]])
        want = sorted(r1.removed[g] + alive[torch.tensor(r2.removed[g], dtype=torch.long)].tolist())
        assert rep.removed[g] == want
        assert rep.kept[g] == (n - len(want), n)
    torch.testing.assert_close(small(x), m2(x), rtol=1e-12, atol=1e-12)
    assert rep.predicted_loss_increase == pytest.approx(
        r1.predicted_loss_increase + r2.predicted_loss_increase, rel=1e-12, abs=1e-15
    )
    assert rep.predicted_loss_increase_diagonal == pytest.approx(
        r1.predicted_loss_increase_diagonal + r2.predicted_loss_increase_diagonal,
        rel=1e-12, abs=1e-15,
    )
    assert rep.flops_before == r1.flops_before and rep.flops_after == r2.flops_after


@pytest.mark.parametrize("scope, fit", [("consumers", "weights"), ("downstream", "weights")])
def test_refit_targets_the_original_model(scope, fit):
    # the last round re-fits every layer after pruned structures against the ORIGINAL
    # model's outputs, from scratch: the result is the one-step re-fit of the final structure
    model, x, y = _mlp_task(1)
    small, rep = natgrad.prune_structured(
        model, (x, y), flops=0.35, rounds=3, measure=False, tune_scope=scope, tune_fit=fit
    )
    groups, _ = find_groups(model, x)
    removed = _removed(rep)
    ref = shrink_model(copy.deepcopy(model), groups, removed)
    tuned = tune_layers(model, ref, groups, removed, (x, y), scope=scope, fit=fit)
    assert rep.tuned_layers == tuned
    torch.testing.assert_close(small(x), ref(x), rtol=1e-8, atol=1e-10)
    # the untuned loss is that of the same structures cut from the original, no re-fit
    cut = shrink_model(copy.deepcopy(model), groups, removed)
    ce = torch.nn.functional.cross_entropy
    with torch.no_grad():
        want = float(ce(cut(x), y)) - float(ce(model(x), y))
    assert rep.measured_loss_increase_untuned == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_mask_fit_rounds_reach_the_budget():
    model, x, y = _mlp_task(2)
    small, rep = natgrad.prune_structured(
        model, (x, y), flops=0.5, rounds=3, measure=False, tune_fit="masks"
    )
    assert rep.flops_after == count_flops(small, x) <= 0.5 * rep.flops_before
    assert rep.tuned_layers == ["2", "4"]


def test_flops_and_params_budgets_against_hand_counts():
    model, x, y = _mlp_task(3)
    small, rep = natgrad.prune_structured(model, (x, y), flops=0.3, rounds=4, measure=False)
    k0, k2 = rep.kept["0"][0], rep.kept["2"][0]
    assert small[0].out_features == k0 and small[2].out_features == k2
    assert rep.flops_before == 2 * (6 * 20 + 20 * 20 + 20 * 3)
    assert rep.flops_after == 2 * (6 * k0 + k0 * k2 + k2 * 3) == count_flops(small, x)
    assert rep.flops_after <= 0.3 * rep.flops_before
    small, rep = natgrad.prune_structured(model, (x, y), params=0.4, rounds=3, measure=False)
    k0, k2 = rep.kept["0"][0], rep.kept["2"][0]
    assert rep.params_after == 6 * k0 + k0 + k0 * k2 + k2 + k2 * 3 + 3 == count_params(small)
    assert rep.params_after <= 0.4 * rep.params_before


@pytest.mark.parametrize("case", ["mlp", "conv1d", "encoder", "bert", "gpt2"])
def test_gradual_prune_end_to_end(case):
    model, x, y = CASES[case]()
    data = _batch(x, y)
    before = copy.deepcopy(model.state_dict())
    small, rep = natgrad.prune_structured(
        model, data, flops=0.5, rounds=3, tune=False, measure=False, min_keep=0.2
    )
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert rep.flops_after == count_flops(small, data) <= 0.5 * rep.flops_before + 1e-9
    # no layer empties; min_keep is relative to the original widths
    assert all(k >= max(1, -(-n // 5)) for k, n in rep.kept.values())
    # without re-fit, the shrunken model is the original masked with every round's removals
    want = masked_output(model, data, rep.removed, x)
    torch.testing.assert_close(_caller(x)(small), want, rtol=1e-10, atol=1e-12)
    assert rep.measured_loss_increase == rep.measured_loss_increase_untuned


def test_cost_model_of_an_encoder_with_heads_removed():
    # per-head FLOPs and parameters read the residual width, not heads x head_dim
    model, x, _ = encoder_case()
    att = model.enc.layers[0].self_attn
    model.enc.layers[0].self_attn = shrink_heads(att, torch.tensor([1]))
    groups, _ = find_groups(model, x)
    cost = build_cost_model(model, groups, x)
    assert cost.total("flops") == count_flops(model, x)
    assert cost.total("params") == count_params(model)


def test_rounds_with_a_budget_that_removes_nothing_return_an_unchanged_copy():
    torch.manual_seed(3)
    model = TinyEncoder().double().eval()
    ids, mask = torch.randint(0, 13, (5, 6)), torch.ones(5, 6, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (5,))}
    pruned, rep = natgrad.prune_structured(model, batch, flops=1.0, rounds=3, measure=False)
    assert pruned is not model
    assert [type(m) for m in pruned.modules()] == [type(m) for m in model.modules()]
    assert all(not r for r in rep.removed.values()) and rep.tuned_layers == []
    assert torch.equal(pruned(ids, mask), model(ids, mask))
    assert rep.flops_after == rep.flops_before and rep.measured_loss_increase == 0.0
    assert rep.measured_loss_increase_untuned == 0.0 and rep.predicted_loss_increase == 0.0
