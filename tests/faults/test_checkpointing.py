"""Activation checkpointing, saved-tensor hooks and custom autograd.Functions without
``setup_context``, which torch.func cannot differentiate: named errors that say what
works, and the exact result of what works."""

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


# -- custom autograd.Functions -----------------------------------------------------------


class OldSquare(torch.autograd.Function):
    """``x²`` as an old-style Function (``forward(ctx, x)``, no ``setup_context``)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class FuncSquare(torch.autograd.Function):
    """The same Function written for torch.func, as the message says."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Squared(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.b, self.fn = nn.Linear(4, 6), nn.Linear(6, 3), fn

    def forward(self, x):
        return self.b(self.fn.apply(self.a(x)))


CUSTOM = (
    r"custom torch\.autograd\.Function \(.*OldSquare\) without a setup_context.*"
    r"Use engine='auto'.*setup_context\(ctx, inputs, output\).*generate_vmap_rule = True"
)


def test_custom_function_without_setup_context_on_vmap_is_named():
    x, y = data()
    with pytest.raises(RuntimeError, match=CUSTOM) as info:
        natgrad.estimate_fisher(Squared(OldSquare).double(), (x, y), engine="vmap")
    assert "must override the setup_context" in str(info.value.__cause__)  # torch.func's, chained


def test_custom_function_in_the_laplace_predictive_is_named():
    x, y = data()
    model = Squared(OldSquare).double()
    fisher = natgrad.estimate_fisher(model, (x, y), engine="auto")
    with pytest.raises(RuntimeError, match=CUSTOM):
        natgrad.fisher_uncertainty(model, x, fisher, n_data=5, engine="vmap")


@pytest.mark.parametrize("fn, engine", [(OldSquare, "auto"), (FuncSquare, "vmap")])
def test_what_the_custom_function_message_names_is_exact(fn, engine):
    """engine='auto' (the Function between two Linear layers), or the Function rewritten
    with setup_context and generate_vmap_rule=True."""
    x, y = data()
    model = Squared(fn).double()
    one = lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])  # noqa: E731
    ref = loop_grads_by(model, one, 5)
    got = natgrad.estimate_fisher(model, (x, y), engine=engine)
    assert_close_dict(dict(got), fisher_from_grads(ref), rtol=1e-10, atol=1e-12)
