"""Likelihoods: each one's per-sample gradients against one backward pass per sample
(token_categorical with ignore_index, attention masks and causal shift; gaussian,
bernoulli and custom)."""

import pytest
import torch
import torch.nn.functional as F

from natgrad import CustomLikelihood, per_sample_grads
from tests.conftest import TinyEncoder
from tests.reference import assert_close_dict, loop_grads


def test_token_categorical_ignore_index_and_mask():
    torch.manual_seed(1)
    model = TinyEncoder(per_token=True).double().eval()
    ids = torch.randint(0, 13, (4, 5))
    labels = torch.randint(0, 13, (4, 5))
    labels[0, 1] = -100
    mask = torch.ones(4, 5, dtype=torch.long)
    mask[2, 3:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    got = per_sample_grads(model, batch, "token_categorical")
    masked = torch.where(mask == 0, torch.full_like(labels, -100), labels)

    def loss(out, yy):
        return F.cross_entropy(out.flatten(0, 1), yy.flatten(), ignore_index=-100, reduction="sum")

    ref = loop_grads(model, loss, {"input_ids": ids, "attention_mask": mask}, masked)
    assert_close_dict(got, ref)


def test_token_categorical_shift_for_causal_lm():
    torch.manual_seed(2)
    model = TinyEncoder(per_token=True).double().eval()
    ids = torch.randint(0, 13, (3, 6))
    got = per_sample_grads(model, {"input_ids": ids, "labels": ids}, natgrad_lik(shift=True))

    def loss(out, yy):
        return F.cross_entropy(out[:, :-1].flatten(0, 1), yy[:, 1:].flatten(), reduction="sum")

    assert_close_dict(got, loop_grads(model, loss, {"input_ids": ids}, ids))


def natgrad_lik(**kw):
    from natgrad import TokenCategorical

    return TokenCategorical(**kw)


@pytest.mark.parametrize(
    "lik,target_fn,loss",
    [
        (
            "gaussian",
            lambda n: torch.randn(n, 4, dtype=torch.float64),
            lambda o, y: 0.5 * ((o - y) ** 2).sum(),
        ),
        (
            "bernoulli",
            lambda n: torch.randint(0, 2, (n, 4)).double(),
            lambda o, y: F.binary_cross_entropy_with_logits(o, y, reduction="sum"),
        ),
    ],
)
def test_other_likelihoods(mlp_case, lik, target_fn, loss):
    model, x, _ = mlp_case
    y = target_fn(len(x))
    assert_close_dict(per_sample_grads(model, (x, y), lik), loop_grads(model, loss, x, y))


def test_custom_likelihood(mlp_case):
    model, x, _ = mlp_case
    y = torch.randn(len(x), 4, dtype=torch.float64)
    lik = CustomLikelihood(lambda f, t: (torch.abs(f - t) ** 3).flatten(1).sum(1), name="cubic")
    ref = loop_grads(model, lambda o, t: (torch.abs(o - t) ** 3).sum(), x, y)
    assert_close_dict(per_sample_grads(model, (x, y), lik), ref)
