"""Activation checkpointing and saved-tensor hooks, which torch.func cannot differentiate:
named errors that say what works, and the exact result of what works."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import natgrad
from tests.reference import assert_close_dict, fisher_from_grads, loop_grads_by


class Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(4, 6), nn.Linear(6, 3), reentrant

    def forward(self, x):
        h = checkpoint(lambda z: torch.tanh(self.a(z)), x, use_reentrant=self.reentrant)
        return self.b(h)


class Hooked(nn.Module):
    """Runs its first layer under saved-tensor hooks (as CPU offloading does)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            h = torch.tanh(self.a(x))
        return self.b(h)


def data():
    torch.manual_seed(0)
    return torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))


@pytest.mark.parametrize("engine", ["vmap", "auto"])
def test_reentrant_checkpoint_is_refused_naming_what_works(engine):
    x, y = data()
    with pytest.raises(
        RuntimeError, match=r"use_reentrant=True.*use_reentrant=False with engine='auto'"
    ):
        natgrad.estimate_fisher(Checkpointed(True).double(), (x, y), engine=engine)


def test_non_reentrant_checkpoint_on_vmap_is_refused_naming_what_works():
    x, y = data()
    with pytest.raises(
        RuntimeError, match=r"checkpoint \(use_reentrant=False\).*Use engine='auto'"
    ):
        natgrad.estimate_fisher(Checkpointed(False).double(), (x, y), engine="vmap")


def test_saved_tensor_hooks_are_named():
    x, y = data()
    with pytest.raises(RuntimeError, match="saved-tensor hooks"):
        natgrad.per_sample_grads(Hooked().double(), (x, y), engine="vmap")


def test_non_reentrant_checkpoint_with_engine_auto_is_exact():
    """What the messages name: use_reentrant=False with engine='auto'."""
    x, y = data()
    model = Checkpointed(False).double()
    one = lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])  # noqa: E731
    ref = loop_grads_by(model, one, 5)
    got = natgrad.estimate_fisher(model, (x, y), engine="auto")
    assert_close_dict(dict(got), fisher_from_grads(ref), rtol=1e-10, atol=1e-12)
