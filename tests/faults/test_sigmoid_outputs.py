"""Fault suite: a model whose outputs are a sigmoid's probabilities (a final nn.Sigmoid or
torch.sigmoid) is refused by the bernoulli likelihood on every path a batch reaches it;
logits, even logits that happen to lie in [0, 1], and sigmoids inside the model are fine.

The bernoulli likelihood takes logits (as BCEWithLogitsLoss does); fed probabilities it
applied a second sigmoid and gave a wrong Fisher and loss without any error.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import natgrad
from natgrad.engine.per_sample import mean_loss_grad

N, D, K = 16, 3, 4
PHRASE = r"(?s)look like probabilities, not logits.*comes from a sigmoid.*Drop the model's final nn\.Sigmoid"


class Functional(nn.Module):
    """torch.sigmoid in forward, seen through a squeeze: outputs (N,)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, 1)

    def forward(self, x):
        return {"logits": torch.sigmoid(self.lin(x)).squeeze(-1)}


def _data(shape):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, 2, shape, generator=g).float()


PATHS = {
    "exact": lambda m, x, y: natgrad.estimate_fisher(m, x, "bernoulli", labels="exact"),
    "mc": lambda m, x, y: natgrad.estimate_fisher(m, x, "bernoulli", labels="mc"),
    "empirical": lambda m, x, y: natgrad.estimate_fisher(m, (x, y), "bernoulli"),
    "vmap": lambda m, x, y: natgrad.estimate_fisher(m, (x, y), "bernoulli", engine="vmap"),
    "vmap_exact": lambda m, x, y: natgrad.estimate_fisher(m, x, "bernoulli", labels="exact",
                                                          engine="vmap"),
    "kfac": lambda m, x, y: natgrad.estimate_curvature(m, (x, y), "bernoulli", kind="kfac"),
    "per_sample_grads": lambda m, x, y: natgrad.per_sample_grads(m, (x, y), "bernoulli"),
    "loss_grad": lambda m, x, y: mean_loss_grad(m, (x, y), "bernoulli", ["0.weight"]),
}


@pytest.mark.parametrize("path", PATHS)
def test_final_sigmoid_is_refused(path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, K), nn.Sigmoid())
    x, y = _data((N, K))
    with pytest.raises(ValueError, match=PHRASE):
        PATHS[path](model, x, y)


@pytest.mark.parametrize("labels", ["exact", "empirical"])
def test_functional_sigmoid_through_a_view_is_refused(labels):
    torch.manual_seed(0)
    x, y = _data((N,))
    batch = (x, y) if labels == "empirical" else x
    with pytest.raises(ValueError, match=PHRASE):
        natgrad.estimate_fisher(Functional(), batch, "bernoulli", labels=labels)


def test_logits_in_the_unit_interval_and_inner_sigmoids_are_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, K), nn.Sigmoid(), nn.Linear(K, K))
    with torch.no_grad():  # every logit in (0, 1): still logits, the last op is a Linear
        model[2].weight.mul_(0.01)
        model[2].bias.fill_(0.5)
    x, y = _data((N, K))
    assert bool(((model(x) > 0) & (model(x) < 1)).all())
    for labels in ("exact", "empirical"):
        natgrad.estimate_fisher(model, (x, y), "bernoulli", labels=labels)


def test_a_sigmoid_seen_through_a_multi_dim_squeeze_is_refused():
    # squeeze((1, 3)) makes a SqueezeBackward2 node, which the walk did not strip (review)
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return torch.sigmoid(self.lin(x))[:, None, :, None].squeeze((1, 3))

    x, y = torch.randn(4, 3), torch.randint(0, 2, (4, 2)).float()
    with pytest.raises(ValueError, match="look like probabilities"):
        natgrad.estimate_fisher(M(), (x, y), "bernoulli")
