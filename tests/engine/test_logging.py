"""The ``natgrad`` logger records the engine's decisions (off unless the user enables it)."""

import logging

import pytest
import torch
from torch import nn

import natgrad


class ScaledLinear(nn.Module):
    """A Linear (capture path) and a free parameter (vmap path, not a K-FAC layer)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.lin(x) * self.scale


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def test_estimate_logs_engine_split_and_sample_count(caplog, batch):
    with caplog.at_level(logging.DEBUG, logger="natgrad"):
        natgrad.estimate_fisher(ScaledLinear(), batch)
    text = caplog.text
    assert "labels=empirical" in text and "engine=auto" in text
    assert "capture path for 2 parameter tensors, vmap for 1 (scale)" in text
    assert "in chunks of 8 samples" in text
    assert "done, N=8 samples from 1 batches" in text
    assert all(r.name.startswith("natgrad.") for r in caplog.records)


def test_forced_vmap_is_logged(caplog, batch):
    with caplog.at_level(logging.INFO, logger="natgrad"):
        natgrad.estimate_fisher(ScaledLinear(), batch, engine="vmap")
    assert "every parameter on the vmap path" in caplog.text


def test_kfac_logs_parameters_left_diagonal(caplog):
    with caplog.at_level(logging.INFO, logger="natgrad"):
        natgrad.FisherPreconditioner(ScaledLinear(), kind="kfac")
    assert "1 layers in Kronecker form; 1 parameter tensors left diagonal (scale)" in caplog.text


def test_silent_by_default(capsys, batch):
    natgrad.estimate_fisher(ScaledLinear(), batch)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


class Branchy(nn.Module):
    """Branches on a tensor's value: vmap cannot trace it, the per-sample loop can."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        h = x * self.scale
        return h if h.sum() > -1e9 else -h


def test_loop_fallback_is_logged(caplog, batch):
    x, _ = batch
    y = torch.randint(0, 4, (8,))
    with caplog.at_level(logging.INFO, logger="natgrad"), pytest.warns(RuntimeWarning):
        natgrad.estimate_fisher(Branchy(), (x, y))
    assert "vmap cannot trace Branchy: it branches on tensor values" in caplog.text
    assert "exact per-sample loop from now on for this pass" in caplog.text
