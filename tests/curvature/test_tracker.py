import pytest
import torch

from natgrad import FisherTracker, estimate_fisher
from tests.reference import assert_close_dict, exact_categorical_fisher_loop


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


def test_mc_updates_draw_new_labels_and_average_the_noise():
    """labels='mc' without a generator: every update of the same batch drew the same labels
    (a fresh generator seeded 0 each time), so the EMA stayed the one-draw estimate."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    exact = exact_categorical_fisher_loop(model, x)
    tr = FisherTracker(model, "categorical", decay=0.9, labels="mc")
    first = {k: v.clone() for k, v in tr.update("t", x).items()}
    second = tr.update("t", x)
    assert not torch.equal(first["weight"], second["weight"])  # new draws
    for _ in range(60):
        ema = tr.update("t", x)

    def err(f):
        return max(float((f[k] - exact[k]).norm() / exact[k].norm()) for k in exact)

    assert err(ema) < 0.6 * err(first), (err(ema), err(first))  # one draw each: equal


def test_mc_generator_state_round_trips():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 4).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    tr = FisherTracker(model, decay=0.5, labels="mc")
    tr.update("t", x)
    tr.update("t", x)
    state = tr.state_dict()
    tr2 = FisherTracker(model, decay=0.5, labels="mc")
    tr2.load_state_dict(state)
    a, b = tr.update("t", x), tr2.update("t", x)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the tracker's own generator, seeded once, is the documented sequence
    gen = torch.Generator().manual_seed(0)
    f = [estimate_fisher(model, x, labels="mc", generator=gen) for _ in range(3)]
    ema = {k: 0.5 * (0.5 * f[0][k] + 0.5 * f[1][k]) + 0.5 * f[2][k] for k in f[0]}
    assert_close_dict(dict(a), ema, rtol=1e-12, atol=0)


def test_bad_generator_state_is_named():
    model = torch.nn.Linear(3, 4)
    tr = FisherTracker(model, labels="mc")
    state = tr.state_dict()
    state["generator"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="'generator' is not the state of a cpu torch.Generator"):
        tr.load_state_dict(state)
