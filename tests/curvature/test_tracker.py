import pytest
import torch

from natgrad import FisherTracker, estimate_fisher
from tests.reference import assert_close_dict


def test_ema_follows_formula(mlp_case):
    model, x, y = mlp_case
    tr = FisherTracker(model, "categorical", decay=0.8)
    b1, b2 = (x[:4], y[:4]), (x[4:], y[4:])
    tr.update("math", b1)
    tr.update("math", b2)
    tr.update("general", b2)
    f1, f2 = estimate_fisher(model, b1), estimate_fisher(model, b2)
    assert_close_dict(dict(tr.fisher("math")), {k: 0.8 * f1[k] + 0.2 * f2[k] for k in f1})
    assert_close_dict(dict(tr.fisher("general")), dict(f2))
    assert tr.tasks() == ["math", "general"] and tr.num_updates("math") == 2
    assert tr.fisher("math").n_samples == len(x)


def test_reset_cleanup_and_errors(mlp_case):
    model, x, y = mlp_case
    tr = FisherTracker(model, decay=0.5)
    tr.update("a", (x, y))
    tr.update("b", (x, y))
    tr.reset("a")
    assert tr.tasks() == ["b"]
    with pytest.raises(KeyError, match="No Fisher for task 'a'.*\\['b'\\]"):
        tr.fisher("a")
    tr.cleanup()
    assert tr.tasks() == []
    with pytest.raises(ValueError, match="decay"):
        FisherTracker(model, decay=2.0)


def test_state_dict_round_trip(mlp_case):
    model, x, y = mlp_case
    tr = FisherTracker(model, decay=0.7)
    tr.update("a", (x[:5], y[:5]))
    tr2 = FisherTracker(model, decay=0.1)
    tr2.load_state_dict(tr.state_dict())
    tr.update("a", (x[5:], y[5:]))
    tr2.update("a", (x[5:], y[5:]))
    assert tr2.decay == 0.7
    assert all(torch.equal(tr.fisher("a")[k], tr2.fisher("a")[k]) for k in tr.fisher("a"))
