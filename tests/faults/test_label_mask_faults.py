"""Fault suite: a padding mask that does not cover the labels' (N, T) positions is refused
by name (it was broadcast against the labels, or raised a raw broadcasting error), on the
Fisher, the loss gradient (EWC, damage) and the 4-D masks natgrad cannot read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.engine.per_sample import mean_loss_grad

N, V, H = 3, 5, 4


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.head = nn.Linear(H, V)

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None):
        ids = input_ids if decoder_input_ids is None else decoder_input_ids
        return {"logits": self.head(torch.tanh(self.emb(ids)))}


def _ids(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (N, t), generator=torch.Generator().manual_seed(seed))


PATHS = {
    "fisher": lambda m, b: natgrad.estimate_fisher(m, b, "token_categorical"),
    "fisher_vmap": lambda m, b: natgrad.estimate_fisher(m, b, "token_categorical", engine="vmap"),
    "loss_grad": lambda m, b: mean_loss_grad(m, b, "token_categorical", ["head.bias"]),
}


@pytest.mark.parametrize("path", PATHS)
def test_encoder_mask_of_another_length_than_the_labels(path):
    """The labels are a decoder's (3 positions), the mask the encoder's (4): without the
    decoder's inputs in the batch natgrad cannot tell, and says what to pass."""
    model = Tagger()
    batch = {"input_ids": _ids(3), "attention_mask": torch.ones(N, 4, dtype=torch.long),
             "labels": _ids(3, 1)}
    with pytest.raises(ValueError, match=r"(?s)'attention_mask' covers \(3, 4\).*labels have "
                       r"shape \(3, 3\).*decoder_input_ids"):
        PATHS[path](model, batch)


@pytest.mark.parametrize("path", PATHS)
def test_decoder_mask_of_another_length_than_the_labels(path):
    model = Tagger()
    batch = {"input_ids": _ids(4), "attention_mask": torch.ones(N, 4, dtype=torch.long),
             "decoder_input_ids": _ids(3), "decoder_attention_mask": torch.ones(N, 2),
             "labels": _ids(3, 1)}
    with pytest.raises(ValueError, match=r"'decoder_attention_mask' covers \(3, 2\)"):
        PATHS[path](model, batch)


@pytest.mark.parametrize(
    "mask",
    [
        torch.zeros(N, 1, 1, 4, dtype=torch.float64),  # additive 0 / -inf
        torch.ones(N, 1, 4, 4, dtype=torch.bool),  # per query (causal)
        torch.ones(N, 4, 1, dtype=torch.long),
    ],
    ids=["additive_float_4d", "per_query_4d", "3d"],
)
@pytest.mark.parametrize("labels", ["empirical", "mc"])
def test_unreadable_mask_is_named(mask, labels):
    model = Tagger()
    batch = {"input_ids": _ids(4), "attention_mask": mask}
    if labels == "empirical":
        batch["labels"] = _ids(4, 1)
    with pytest.raises(ValueError, match=r"(?s)'attention_mask' has shape.*takes an \(N, T\) "
                       r"mask.*mask\[:, None, None, :\]\.bool\(\)"):
        natgrad.estimate_fisher(model, batch, "token_categorical", labels=labels)
