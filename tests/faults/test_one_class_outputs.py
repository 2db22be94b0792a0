"""Fault suite: a softmax likelihood over one class (a one-logit binary classifier under
the default ``"categorical"``) is refused by name, pointing to ``likelihood="bernoulli"``.

A softmax over one logit is 1 whatever the logit: the Fisher was exactly zero, without an
error, for every label source.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad

N = 8
PHRASE = r"(?s)one class \(output shape \(\d+, (\d+, )?1\)\).*Fisher would be exactly zero.*likelihood='bernoulli'"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 1)


def _x() -> torch.Tensor:
    return torch.randn(N, 3, generator=torch.Generator().manual_seed(1))


PATHS = {
    "exact": lambda m, x: natgrad.estimate_fisher(m, x, labels="exact"),
    "mc": lambda m, x: natgrad.estimate_fisher(m, x, labels="mc"),
    "empirical_zeros": lambda m, x: natgrad.estimate_fisher(m, (x, torch.zeros(N, dtype=torch.long))),
    "vmap": lambda m, x: natgrad.estimate_fisher(m, x, labels="exact", engine="vmap"),
    "kfac": lambda m, x: natgrad.estimate_curvature(m, x, kind="kfac", labels="exact"),
    "per_sample_grads": lambda m, x: natgrad.per_sample_grads(m, (x, torch.zeros(N, dtype=torch.long))),
}


@pytest.mark.parametrize("path", PATHS)
def test_one_logit_categorical_is_refused(path):
    with pytest.raises(ValueError, match=PHRASE):
        PATHS[path](_model(), _x())


@pytest.mark.parametrize("labels", ["exact", "empirical"])
def test_one_class_token_logits_are_refused(labels):
    class OneVocab(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(4, 1)

        def forward(self, input_ids):
            return self.emb(input_ids)  # (N, T, 1)

    ids = torch.randint(0, 4, (3, 5))
    batch = {"input_ids": ids, "labels": torch.zeros(3, 5, dtype=torch.long)}
    if labels == "exact":
        batch.pop("labels")
    with pytest.raises(ValueError, match=PHRASE):
        natgrad.estimate_fisher(OneVocab(), batch, "token_categorical", labels=labels)

