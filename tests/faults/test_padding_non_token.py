"""Fault suite: a padding mask over per-position outputs ``(N, T, D)`` under ``gaussian``
or ``bernoulli`` is refused by name (``(N, T)`` outputs warn: an ``(N, D)`` head with
``D = T`` looks the same): those likelihoods sum over every output,
so the padded positions counted in the Fisher (1.6-1.7x the unpadded batch's) and the
loss, with no warning. Only ``token_categorical`` leaves padding out (its labels carry it).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.engine.per_sample import mean_loss_grad

N, T, H, D = 2, 5, 3, 2
PHRASE = r"(?s)'attention_mask' \(2, 5\) marks padded positions.*one row per position.*CustomLikelihood"


class Tagger(nn.Module):
    def __init__(self, d: int | None = D) -> None:
        super().__init__()
        self.d = d
        self.emb = nn.Embedding(7, H)
        self.head = nn.Linear(H, d or 1)

    def forward(self, input_ids, attention_mask=None):
        out = self.head(torch.tanh(self.emb(input_ids)))
        return out if self.d else out.squeeze(-1)


def _batch(lik: str, d: int | None, pad: bool = True):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 7, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    if pad:
        mask[:, 3:] = 0
    shape = (N, T, d) if d else (N, T)
    y = torch.randn(shape, generator=g) if lik == "gaussian" else torch.randint(0, 2, shape, generator=g).float()
    return {"input_ids": ids, "attention_mask": mask, "labels": y}


PATHS = {
    "auto": lambda m, b, lik: natgrad.estimate_fisher(m, b, lik),
    "vmap": lambda m, b, lik: natgrad.estimate_fisher(m, b, lik, engine="vmap"),
    "exact": lambda m, b, lik: natgrad.estimate_fisher(m, b, lik, labels="exact"),
    "mc_no_labels": lambda m, b, lik: natgrad.estimate_fisher(
        m, {k: v for k, v in b.items() if k != "labels"}, lik, labels="mc"),
    "kfac": lambda m, b, lik: natgrad.estimate_curvature(m, b, lik, kind="kfac"),
    "per_sample_grads": lambda m, b, lik: natgrad.per_sample_grads(m, b, lik),
    "loss_grad": lambda m, b, lik: mean_loss_grad(m, b, lik, ["head.bias"]),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lik", ["gaussian", "bernoulli"])
def test_padded_positions_are_refused(lik, path):
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=PHRASE):
        PATHS[path](Tagger(D), _batch(lik, D), lik)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lik", ["gaussian", "bernoulli"])
def test_padded_positions_of_two_dimensional_outputs_warn(lik, path):
    # (N, T) outputs cannot be told from an (N, D) head whose D equals T by chance (a
    # pooled multi-label head, whose Fisher is right: refusing it broke runs that worked,
    # found by review): a warning naming both readings
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=PHRASE + r".*equals the mask's length by chance"):
        PATHS[path](Tagger(None), _batch(lik, None), lik)


@pytest.mark.parametrize("lik", ["gaussian", "bernoulli"])
def test_a_mask_without_padding_is_no_padding(lik):
    """A mask of ones pads nothing: the Fisher is the one without the mask."""
    torch.manual_seed(0)
    model = Tagger().double()
    b = _batch(lik, D, pad=False)
    b["labels"] = b["labels"].double()
    got = natgrad.estimate_fisher(model, b, lik, labels="exact")
    ref = natgrad.estimate_fisher(model, {k: v for k, v in b.items() if k != "attention_mask"},
                                  lik, labels="exact")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)


def test_custom_likelihood_reads_what_its_nll_reads():
    torch.manual_seed(0)
    lik = natgrad.CustomLikelihood(lambda f, y: 0.5 * ((f - y) ** 2).flatten(1).sum(1))
    natgrad.estimate_fisher(Tagger(), _batch("gaussian", D), lik)
