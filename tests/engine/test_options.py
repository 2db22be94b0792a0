"""The estimator options bundle: one resolution for every Fisher-computing function."""

from __future__ import annotations

import pytest
import torch

import natgrad
from natgrad.engine.options import OPTION_NAMES, Options
from tests.reference import dense_from_mv, dense_label_fisher


def _task():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x, y = torch.randn(7, 3), torch.randint(0, 3, (7,))
    return model.double(), (x.double(), y)


def test_names_are_the_typed_dict_keys():
    assert OPTION_NAMES == (
        "labels", "mc_samples", "params", "chunk_size", "generator", "output_fn", "engine",
    )  # fmt: skip
    assert set(OPTION_NAMES) == set(natgrad.EstimatorOptions.__annotations__)


def test_defaults_and_overrides():
    o = Options.resolve("f", {})
    assert (o.labels, o.mc_samples, o.params, o.chunk_size, o.engine) == (
        "empirical", 1, None, None, "auto",
    )  # fmt: skip
    o = Options.resolve("f", {"mc_samples": 3}, labels="mc")
    assert (o.labels, o.mc_samples) == ("mc", 3)
    assert Options.resolve("f", {"labels": "exact"}, labels="mc").labels == "exact"
    with pytest.raises(Exception, match="cannot assign|frozen"):
        o.labels = "exact"  # type: ignore[misc]


def test_keywords_round_trip():
    g = torch.Generator().manual_seed(3)
    o = Options.resolve("f", {"labels": "mc", "generator": g, "chunk_size": 2})
    assert Options.resolve("g", o.keywords()) == o


def test_same_options_same_fisher_everywhere():
    """One bundle passed to two estimators: both match the dense exact-label Fisher."""
    model, (x, _) = _task()
    opts: natgrad.EstimatorOptions = {"labels": "exact", "chunk_size": 3}
    ref = dense_label_fisher(model, x, "categorical")
    shapes = {k: p.shape for k, p in model.named_parameters()}
    F = natgrad.estimate_fisher(model, x, **opts)
    lr = natgrad.estimate_curvature(model, x, kind="lowrank", **opts)
    torch.testing.assert_close(torch.cat([v.flatten() for v in F.values()]), ref.diagonal())
    torch.testing.assert_close(dense_from_mv(lr, shapes), ref)
