"""Fault suite: a model whose outputs are probabilities (a final ``nn.Softmax``) is refused by
the categorical likelihoods on every path a target reaches them; log-probabilities are fine.

The softmax likelihoods take logits; fed probabilities they would apply a second softmax and
give a wrong Fisher and loss without any error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.engine.checks import check_class_labels, check_not_probabilities
from natgrad.metrics import MetricContext, registry

N, D, C = 8, 4, 3
PHRASE = r"(?s)look like probabilities, not logits.*Drop the model's final nn\.Softmax.*log-probabilities"


def _mlp(*tail: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C), *tail)


def _data():
    torch.manual_seed(1)
    return torch.randn(N, D), torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])


def _ones_fisher(model: nn.Module) -> natgrad.DiagonalFisher:
    return natgrad.DiagonalFisher({k: torch.ones_like(p) for k, p in model.named_parameters()}, 10)


PATHS = {
    "estimate_fast": lambda m, b: natgrad.estimate_fisher(m, b, engine="fast"),
    "estimate_vmap": lambda m, b: natgrad.estimate_fisher(m, b, engine="vmap"),
    "estimate_mc": lambda m, b: natgrad.estimate_fisher(m, b, labels="mc"),
    "estimate_exact": lambda m, b: natgrad.estimate_fisher(m, b, labels="exact"),
    "curvature_kfac": lambda m, b: natgrad.estimate_curvature(m, b, kind="kfac"),
    "curvature_ekfac": lambda m, b: natgrad.estimate_curvature(m, b, kind="ekfac"),
    "curvature_lowrank": lambda m, b: natgrad.estimate_curvature(m, b, kind="lowrank", rank=2),
    "per_sample_grads": lambda m, b: natgrad.per_sample_grads(m, b),
    "per_sample_grads_vmap": lambda m, b: natgrad.per_sample_grads(m, b, engine="vmap"),
    "laplace_prior_grid": lambda m, b: natgrad.optimize_prior_precision(
        m, _ones_fisher(m), b, method="grid"
    ),
    "prune_structured": lambda m, b: natgrad.prune_structured(
        m, b, params=0.8, measure=False, tune=False
    ),
    "metrics": lambda m, b: registry.compute_with_context(
        "fisher_information", MetricContext(models=[m], batches=[b])
    ),
    # paths that read no labels: the output is checked on its own
    "estimate_mc_no_labels": lambda m, b: natgrad.estimate_fisher(m, b[0], labels="mc"),
    "estimate_exact_no_labels_vmap": lambda m, b: natgrad.estimate_fisher(
        m, b[0], labels="exact", engine="vmap"
    ),
    "curvature_kfac_exact_no_labels": lambda m, b: natgrad.estimate_curvature(
        m, b[0], kind="kfac", labels="exact"
    ),
    "precond_mc_no_labels": lambda m, b: _pre_mc(m, b),
    "prune_structured_mc": lambda m, b: natgrad.prune_structured(
        m, b, params=0.8, measure=False, tune=False, labels="mc"
    ),
    "fisher_uncertainty": lambda m, b: natgrad.fisher_uncertainty(m, b[0], _ones_fisher(m)),
}


def _pre_mc(model, batch):
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return natgrad.FisherPreconditioner(model, labels="mc").step(batch[0])


@pytest.mark.parametrize("path", sorted(PATHS))
def test_softmax_outputs_refused_every_path(path):
    with pytest.raises(ValueError, match=PHRASE):
        PATHS[path](_mlp(nn.Softmax(-1)), _data())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_softmax_outputs_refused_any_dtype(dtype):
    # bfloat16 probabilities sum to 1 only within its epsilon (2^-7): the tolerance scales with it
    with pytest.raises(ValueError, match=PHRASE):
        x, y = _data()
        natgrad.estimate_fisher(_mlp(nn.Softmax(-1)).to(dtype), (x.to(dtype), y))


def test_softmax_outputs_refused_token_categorical():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 7), nn.Softmax(-1))
    ids = torch.randint(0, 7, (3, 4))
    with pytest.raises(ValueError, match=PHRASE):
        natgrad.estimate_fisher(model, (ids, ids), likelihood="token_categorical")


def test_log_softmax_outputs_give_the_logit_models_fisher():
    # softmax(log softmax(f)) = softmax(f): the same Fisher as the logit model's
    x, y = _data()
    logits = _mlp()
    logprobs = nn.Sequential(logits, nn.LogSoftmax(-1))
    for labels in ("empirical", "exact"):
        got = natgrad.estimate_fisher(logprobs, (x, y), labels=labels)
        want = natgrad.estimate_fisher(logits, (x, y), labels=labels)
        for k, v in want.items():
            torch.testing.assert_close(got[f"0.{k}"], v, rtol=1e-5, atol=1e-7)


def test_rows_summing_to_one_with_a_negative_entry_are_logits():
    y = torch.tensor([0, 1])
    check_class_labels(y, 2, "categorical", logits=torch.tensor([[1.5, -0.5], [0.25, 0.75]]))


def test_non_negative_rows_not_all_summing_to_one_are_logits():
    y = torch.tensor([0, 1])
    check_class_labels(y, 2, "categorical", logits=torch.tensor([[0.5, 0.5], [0.5, 0.6]]))


def test_one_class_outputs_are_not_refused():
    # with one class every softmax is 1: a single-logit output summing to 1 is no evidence
    check_class_labels(torch.tensor([0, 0]), 1, "categorical", logits=torch.ones(2, 1))


def test_label_error_still_named_with_logits_given():
    with pytest.raises(ValueError, match=r"out of range.*sample 1"):
        check_class_labels(torch.tensor([0, 3]), 2, "categorical", logits=torch.randn(2, 2))


def test_one_hot_logit_rows_are_not_probabilities():
    # exactly one-hot logits (a zero entry) are possible logits; softmax outputs are positive
    check_class_labels(torch.tensor([0, 1]), 3, "categorical",
                       logits=torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    x = torch.cat([torch.eye(3)[:1], 3 * torch.randn(3, 3)])
    for engine in ("fast", "vmap"):  # the vmap probe sees only the first row [1, 0, 0]
        natgrad.estimate_fisher(model, (x, torch.tensor([0, 1, 2, 1])), engine=engine)


def test_low_precision_logits_near_one_are_not_probabilities():
    # bfloat16 two-class logits summing to 1.05 are logits: the tolerance is the rounding
    # of a bf16 softmax (eps/2), not a multiple of it
    check_not_probabilities(torch.tensor([[0.3, 0.75]], dtype=torch.bfloat16), "categorical")
    probs = torch.tensor([[0.3, 0.75]]).softmax(-1).to(torch.bfloat16)
    with pytest.raises(ValueError, match=PHRASE):
        check_not_probabilities(probs, "categorical")
