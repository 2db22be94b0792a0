"""Fault suite: likelihood inputs that were silently misread or refused with the wrong
reason: a learned or per-output Gaussian σ (read once and frozen), token logits in
torch's (N, V, T) layout (the error blamed the labels only), and mc labels at logits
whose softmax is undefined (NaN, +inf, a row of -inf; -inf alone is fine)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad


@pytest.mark.parametrize(
    "sigma,what",
    [
        (nn.Parameter(torch.tensor(0.5)), "requires grad"),
        (torch.tensor(0.5, requires_grad=True), "requires grad"),
        (torch.tensor([0.5, 1.0]), "has 2 entries"),
    ],
    ids=["parameter", "requires_grad", "per_output"],
)
def test_gaussian_sigma_that_would_be_frozen(sigma, what):
    with pytest.raises(ValueError, match=rf"(?s)Gaussian\(sigma=\.\.\.\) takes one known σ.*{what}.*CustomLikelihood"):
        natgrad.Gaussian(sigma)
    with pytest.raises(ValueError, match="CustomLikelihood"):  # by name, with options
        natgrad.get_likelihood("gaussian", sigma=sigma)


def test_gaussian_sigma_as_a_plain_tensor_is_a_number():
    assert natgrad.Gaussian(torch.tensor(0.5)).sigma == 0.5


class NVT(nn.Module):
    """Token logits in torch's cross_entropy layout (N, V, T)."""

    def __init__(self, v: int) -> None:
        super().__init__()
        self.e = nn.Embedding(v, 3)
        self.h = nn.Linear(3, v)

    def forward(self, ids):
        return self.h(self.e(ids)).transpose(1, 2)


def test_token_logits_in_nvt_layout_hint_the_transpose():
    ids = torch.randint(0, 5, (3, 4))
    labels = torch.randint(0, 5, (3, 4))
    with pytest.raises(ValueError, match=r"(?s)labels' length 4 is the logits' last axis.*\(N, V, T\).*transpose\(1, 2\)"):
        natgrad.estimate_fisher(NVT(5), (ids, labels), "token_categorical")
    # the fix the message names
    natgrad.estimate_fisher(NVT(5), (ids, labels), "token_categorical",
                            output_fn=lambda out: out.transpose(1, 2))


class Fill(nn.Module):
    def __init__(self, value: float, row: bool) -> None:
        super().__init__()
        self.l = nn.Linear(3, 4)
        self.value, self.row = value, row

    def forward(self, x):
        out = self.l(x)
        mask = torch.zeros_like(out, dtype=torch.bool)
        if self.row:
            mask[0] = True
        else:
            mask[0, 1] = True
        return out.masked_fill(mask, self.value)


@pytest.mark.parametrize(
    "value,row",
    [(float("nan"), False), (float("inf"), False), (float("-inf"), True)],
    ids=["nan", "plus_inf", "row_of_minus_inf"],
)
@pytest.mark.parametrize("engine", ["auto", "vmap"])
def test_mc_refuses_undefined_softmax(value, row, engine):
    with pytest.raises(FloatingPointError, match=r"(?s)NaN or \+inf, or a row whose logits are all -inf.*labels='mc'"):
        natgrad.estimate_fisher(Fill(value, row), torch.randn(5, 3), labels="mc", engine=engine)
