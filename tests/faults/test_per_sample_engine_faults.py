"""Bad ``engine`` / ``chunk_size`` arguments of per_sample_grads, and in-place edits of a
captured input."""

import pytest
import torch
from torch import nn

import natgrad


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return x * self.w


def _batch():
    return torch.randn(4, 3), torch.tensor([0, 1, 2, 0])


def test_unknown_engine():
    with pytest.raises(ValueError, match="engine"):
        natgrad.per_sample_grads(nn.Linear(3, 3), _batch(), engine="gpu")


def test_fast_engine_without_covered_parameters():
    with pytest.raises(ValueError, match="engine='fast' found no parameter"):
        natgrad.per_sample_grads(Scale(), _batch(), engine="fast")


@pytest.mark.parametrize("engine", ["auto", "fast", "vmap"])
def test_bad_chunk_size(engine):
    with pytest.raises(ValueError, match="chunk_size"):
        natgrad.per_sample_grads(nn.Linear(3, 3), _batch(), chunk_size=0, engine=engine)


def test_input_modified_in_place_after_the_layer():
    class Inplace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = x * 1.0
            out = self.fc(h)
            h.mul_(2.0)  # the captured input of fc is now stale
            return out + h

    with pytest.raises(RuntimeError, match="modified in place"):
        natgrad.per_sample_grads(Inplace(), _batch(), engine="fast")
