"""Faults in the uses layer (issue 11): NaN/Inf, negative Fishers, Woodbury precision,
the metrics cache, and state loaded into another model.

Each case asserts the exception type and a phrase of its message, or the exact result
against an independent reference (a dense float64 solve, a per-sample loop, a closed form
or the direct call of the same function).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping

import pytest
import torch
from torch import nn

import natgrad
from natgrad.metrics import MetricContext, registry
from tests.reference import loop_grads

KINDS = ("diag", "kfac", "woodbury")


def _mlp(dtype=torch.float64, sizes=(4, 5, 3), seed=0):
    torch.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(dtype)


def _batch(n=8, d=4, c=3, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, c, (n,), generator=g)


def _backward(model, batch):
    model.zero_grad(set_to_none=True)
    x, y = batch
    nn.functional.cross_entropy(model(x), y).backward()


# -- NaN / Inf ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_grad_in_preconditioner_is_named(kind, bad):
    model, batch = _mlp(), _batch()
    pre = natgrad.FisherPreconditioner(model, kind=kind, damping=0.1)
    _backward(model, batch)
    with torch.no_grad():
        model[2].weight.grad[1, 2] = bad
    with pytest.raises(FloatingPointError, match=r"(?s)'2\.weight'.*clip"):
        pre.step(batch)
    assert math.isnan(model[2].weight.grad[1, 2]) or math.isinf(model[2].weight.grad[1, 2])
    assert pre.state_dict()["step"] == 0 and pre.state_dict()["curvature"] is None


def test_nonfinite_grad_during_warmup_is_named():
    model, batch = _mlp(), _batch()
    pre = natgrad.FisherPreconditioner(model, warmup_steps=5)
    _backward(model, batch)
    model[0].bias.grad[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"gradient.*'0\.bias'"):
        pre.step(batch)


def test_nonfinite_grad_in_natural_gradient_leaves_weights():
    model, batch = _mlp(), _batch()
    opt = natgrad.NaturalGradient(
        torch.optim.SGD(model.parameters(), lr=0.1), natgrad.FisherPreconditioner(model)
    )
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    def closure():
        opt.zero_grad()
        x, y = batch
        loss = nn.functional.cross_entropy(model(x), y) * float("nan")
        loss.backward()
        return loss

    with pytest.raises(FloatingPointError, match="check the loss"):
        opt.step(closure, batch=batch)
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]), k


def test_ewc_nan_anchor_is_named():
    model = _mlp()
    F = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    anchor = {k: p.detach().clone() for k, p in model.named_parameters()}
    anchor["0.weight"][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"anchor.*'0\.weight'"):
        natgrad.EWC(model, F, anchor=anchor)
    # the Curvature path stored it, and the penalty blamed the model (found by review)
    curv = natgrad.estimate_curvature(model, _batch(), kind="kfac")
    with pytest.raises(FloatingPointError, match=r"anchor.*'0\.weight'"):
        natgrad.EWC(model, curv, anchor=anchor)


def test_ewc_nan_current_weight_is_named():
    model = _mlp()
    F = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    ewc = natgrad.EWC(model, F)
    with torch.no_grad():
        model[2].bias[1] = float("inf")
    with pytest.raises(FloatingPointError, match=r"current value.*'2\.bias'"):
        ewc.penalty()


def test_ewc_inf_fisher_is_named():
    model = _mlp()
    F = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    F["2.bias"][0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"'2\.bias'"):
        natgrad.EWC(model, F)


def test_ewc_load_state_nan_anchor_is_named():
    model = _mlp()
    ewc = natgrad.EWC(model, {k: torch.ones_like(p) for k, p in model.named_parameters()})
    state = ewc.state_dict()
    state["terms"][0]["anchor"]["0.bias"][2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"anchor.*'0\.bias'"):
        ewc.load_state_dict(state)


def test_merge_nan_weights_names_model_and_parameter():
    a, b = _mlp(seed=0), _mlp(seed=1)
    with torch.no_grad():
        b[0].weight[3, 1] = float("nan")
    F = {k: torch.ones_like(p) for k, p in a.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"models\[1\].*'0\.weight'"):
        natgrad.fisher_weighted_merge([a, b], [F, F])


def test_scale_by_fisher_nan_fisher_is_named():
    g = {"w": torch.ones(3)}
    with pytest.raises(FloatingPointError, match=r"'w'"):
        natgrad.scale_by_fisher(g, {"w": torch.tensor([1.0, float("nan"), 2.0])}, 1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_diagonal_fisher_refuses_nonfinite(bad):
    with pytest.raises(FloatingPointError, match=r"'b'.*index \(1, 0\)"):
        natgrad.DiagonalFisher({"a": torch.ones(2), "b": torch.tensor([[1.0], [bad]])}, 4)


def test_fisher_importance_nan_fisher_is_named():
    model = _mlp()
    F = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    F["0.bias"][1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'0\.bias'"):
        natgrad.fisher_importance(F, model, normalize=False)


@pytest.mark.parametrize("clip", [1e-3, None])
@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_grad_on_a_solve_only_step_is_named(kind, clip):
    # after the refresh (step 0) a step that only solves reads finiteness from its result
    # (the kl_clip inner products, or Δ); it must still name the parameter, change nothing
    model, batch = _mlp(), _batch()
    pre = natgrad.FisherPreconditioner(model, kind=kind, damping=0.1, kl_clip=clip)
    _backward(model, batch)
    pre.step(batch, lr=0.1)
    _backward(model, batch)
    with torch.no_grad():
        model[0].bias.grad[1] = float("inf")
    before = {k: p.grad.clone() for k, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"(?s)gradient \(\.grad\) of parameter '0\.bias'"):
        pre.step(batch, lr=0.1)
    for k, p in model.named_parameters():
        assert torch.equal(p.grad, before[k]) or k == "0.bias"
    assert torch.isinf(model[0].bias.grad[1])
    assert pre.state_dict()["step"] == 1


@pytest.mark.parametrize("source", ["batch", "backward"])
def test_preconditioner_step_before_backward_warns_and_skips(source):
    # no .grad at all: a mistake, or a batch the loop skipped (Lightning's training_step
    # returning None), so a warning and a skipped step, not an error
    model, batch = _mlp(), _batch()
    pre = natgrad.FisherPreconditioner(model, kind="kfac", source=source)
    with pytest.warns(UserWarning, match=r"has a \.grad, so the step is skipped.*loss\.backward"):
        info = pre.step(batch, lr=0.1)
    assert not info.preconditioned and not info.curvature_updated
    assert pre.state_dict()["step"] == 0 and pre.curvature is None


def test_disabled_grad_scaler_does_not_hide_nan_gradients():
    # a disabled scaler never skips a step, so a NaN gradient must still raise
    model, batch = _mlp(), _batch()
    pre = natgrad.FisherPreconditioner(model, kind="kfac", source="backward",
                                       grad_scaler=torch.amp.GradScaler("cpu", enabled=False))
    _backward(model, batch)
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'0\.weight'"):
        pre.step(lr=0.1)


def test_natural_gradient_refuses_a_preconditioner_of_another_model():
    model, other = _mlp(), _mlp(seed=1)
    with pytest.raises(ValueError, match="none of the optimizer's"):
        natgrad.NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1),
                                natgrad.FisherPreconditioner(other))


def test_grad_scaler_without_get_scale_is_refused():
    with pytest.raises(TypeError, match="GradScaler"):
        natgrad.FisherPreconditioner(_mlp(), kind="kfac", source="backward", grad_scaler=2.0)
    pre = natgrad.FisherPreconditioner(_mlp(), kind="kfac", source="backward")
    with pytest.raises(TypeError, match="GradScaler"):
        pre.grad_scaler = "scaler"


def test_preconditioner_of_frozen_parameters_only_is_refused():
    model = _mlp()
    for p in model[2].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"(?s)Every selected parameter is frozen.*'2\.weight'"):
        natgrad.FisherPreconditioner(model, kind="kfac", params=["2.weight", "2.bias"])


@pytest.mark.parametrize("clip", [1e-3, None])
@pytest.mark.parametrize("lr", [0.1, None])
def test_nonfinite_preconditioned_gradient_is_named(clip, lr):
    # a finite gradient whose solve is not finite: the curvature is at fault, not the data
    # (with the trust region on or off, with or without the learning rate)
    model, batch = _mlp(), _batch()
    pre = natgrad.FisherPreconditioner(model, kind="diag", damping=0.1, kl_clip=clip)
    _backward(model, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kl_clip without lr
        pre.step(batch, lr=lr)
        _backward(model, batch)
        pre.curvature["2.weight"][0, 1] = float("nan")  # the tensor the solve uses
        before = model[2].weight.grad.clone()
        with pytest.raises(FloatingPointError,
                           match=r"(?s)preconditioned gradient.*'2\.weight'.*damping"):
            pre.step(batch, lr=lr)
    assert torch.equal(model[2].weight.grad, before)


def test_scale_by_fisher_nan_grad_is_named():
    model = _mlp()
    _backward(model, _batch())
    model[0].weight.grad[2, 3] = float("nan")
    F = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"\.grad\) of parameter '0\.weight'.*index \(2, 3\)"):
        natgrad.scale_by_fisher(model, F)


def test_fisher_importance_nan_weight_is_named():
    model = _mlp()
    F = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    with torch.no_grad():
        model[2].weight[0, 4] = float("-inf")
    with pytest.raises(FloatingPointError, match=r"parameter '2\.weight'"):
        natgrad.fisher_importance(F, model)


def test_kfac_state_nan_factor_refused():
    a = _mlp()
    pre = natgrad.FisherPreconditioner(a, kind="kfac")
    _backward(a, _batch())
    pre.step(_batch())
    state = pre.state_dict()
    state["curvature"]["layers"]["0"]["A"][0, 1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"curvature tensor 'layers\.0\.A'"):
        natgrad.FisherPreconditioner(a, kind="kfac").load_state_dict(state)


# -- negative Fisher values -------------------------------------------------------------------


def test_scale_by_fisher_negative_fisher_refused():
    # was [-2.004, inf]: (1 / (-0.499 + 1e-3)) and 1 / (-1e-3 + 1e-3)
    g = {"w": torch.tensor([1.0, 1.0])}
    with pytest.raises(ValueError, match=r"'w'.*negative"):
        natgrad.scale_by_fisher(g, {"w": torch.tensor([-0.499, -1e-3])}, 1e-3)


def test_scale_by_fisher_zero_fisher_is_exact():
    g = {"w": torch.tensor([2.0, -3.0], dtype=torch.float64)}
    out = natgrad.scale_by_fisher(g, {"w": torch.tensor([0.0, 1.0], dtype=torch.float64)}, 0.5)
    torch.testing.assert_close(out["w"], torch.tensor([4.0, -2.0], dtype=torch.float64))


def test_fisher_importance_negative_refused():
    model = _mlp()
    F = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    F["2.weight"][0, 0] = -1.0
    with pytest.raises(ValueError, match=r"'2\.weight' has negative"):
        natgrad.fisher_importance(F, model, normalize=False)


def test_diagonal_fisher_refuses_negative():
    with pytest.raises(ValueError, match=r"'w'.*negative.*-0\.5.*index \(2,\)"):
        natgrad.DiagonalFisher({"w": torch.tensor([0.0, 1.0, -0.5])}, 3)


@pytest.mark.parametrize("c", [-1.0, float("nan"), float("inf")])
def test_diagonal_fisher_scale_must_be_nonnegative(c):
    f = natgrad.DiagonalFisher({"w": torch.tensor([1.0, 2.0])}, 2)
    with pytest.raises(ValueError, match="scale"):
        f * c
    with pytest.raises(ValueError, match="scale"):
        c * f


def test_diagonal_fisher_scale_overflow_refused():
    f = natgrad.DiagonalFisher({"w": torch.tensor([1e30, 2.0])}, 2)
    with pytest.raises(FloatingPointError, match=r"'w'"):
        f * 1e10


def test_diagonal_fisher_cast_overflow_refused():
    f = natgrad.DiagonalFisher({"w": torch.tensor([1e6, 2.0])}, 2)
    with pytest.raises(FloatingPointError, match=r"'w'"):
        f.to(torch.float16)


def test_scale_by_fisher_zero_damping_on_zero_fisher_refused():
    g = {"w": torch.tensor([1.0, 1.0])}
    with pytest.raises(ValueError, match="divides by zero; use damping > 0"):
        natgrad.scale_by_fisher(g, {"w": torch.tensor([0.0, 2.0])}, 0.0)
    out = natgrad.scale_by_fisher(g, {"w": torch.tensor([4.0, 2.0])}, 0.0)
    assert torch.equal(out["w"], torch.tensor([0.25, 0.5]))


def test_diagonal_fisher_scale_exact():
    f = natgrad.DiagonalFisher({"w": torch.tensor([1.0, 2.0])}, 2)
    assert torch.equal((f * 0.5)["w"], torch.tensor([0.5, 1.0]))
    assert torch.equal((0 * f)["w"], torch.zeros(2))


def test_diagonal_fisher_state_negative_refused():
    f = natgrad.DiagonalFisher({"w": torch.tensor([1.0, 2.0])}, 2)
    state = f.state_dict()
    state["values"]["w"][1] = -3.0
    with pytest.raises(ValueError, match="negative"):
        f.load_state_dict(state)
    assert torch.equal(f["w"], torch.tensor([1.0, 2.0]))  # unchanged
    state["values"]["w"][1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"'w'"):
        natgrad.DiagonalFisher.from_state_dict(state)


def test_ewc_negative_fisher_refused():
    model = _mlp()
    F = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    F["0.weight"][1, 1] = -2.0
    with pytest.raises(ValueError, match=r"'0\.weight' has negative"):
        natgrad.EWC(model, F)


# -- Woodbury in float32 at small damping --------------------------------------------------------


@pytest.mark.parametrize("lam", [1e-3, 1e-6])
@pytest.mark.parametrize("vector", ["mean_grad", "random"])
def test_woodbury_float32_matches_dense_float64_solve(lam, vector):
    model = _mlp(torch.float32, sizes=(6, 8, 4))
    x, y = _batch(n=10, d=6, c=4, dtype=torch.float32)
    pre = natgrad.FisherPreconditioner(model, kind="woodbury", damping=lam)
    names = [k for k, _ in model.named_parameters()]
    _backward(model, (x, y))
    if vector == "random":
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    pre.step((x, y))
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()
    # the per-sample gradients the preconditioner used agree with a per-sample loop ...
    G = pre.curvature.rows
    assert G.dtype == torch.float32
    ref_rows = loop_grads(model, lambda o, t: nn.functional.cross_entropy(o, t, reduction="sum"), x, y)
    ref_G = torch.cat([ref_rows[k].reshape(len(x), -1) for k in names], 1)
    torch.testing.assert_close(G, ref_G, rtol=1e-4, atol=1e-6)
    # ... and the solve with exactly those rows equals a dense float64 solve
    Gd = G.double()
    F = Gd.T @ Gd / len(x)
    ref = torch.linalg.solve(F + lam * torch.eye(F.shape[0], dtype=torch.float64), g)
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 1e-5, rel


# -- metrics registry: cached estimates ------------------------------------------------------


def _same(a, b, path="result"):
    """Equal values: tensors to float64 round-off, dicts/lists/dataclasses recursively."""
    if isinstance(a, nn.Module):
        _same(a.state_dict(), b.state_dict(), path)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, Mapping):
        assert set(a) == set(b), (path, sorted(a), sorted(b))
        for k in a:
            _same(a[k], b[k], f"{path}[{k!r}]")
        if isinstance(a, natgrad.DiagonalFisher):
            assert (a.n_samples, a.labels) == (b.n_samples, b.labels), path
    elif dataclasses.is_dataclass(a):
        _same(vars(a), vars(b), path)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _same(u, v, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12, nan_ok=True), path
    else:
        assert a == b, path


def _direct(name, m0, m1, b0, b1):
    """Each metric by a direct call of the public function (its own estimates)."""
    try:
        from natgrad.optim.scale import natural_gradient_norms
    except ImportError:  # before the restructure
        from natgrad.scale import natural_gradient_norms

    est = natgrad.estimate_fisher
    F0, F1 = est(m0, b0), est(m0, b1)
    return {
        "fisher_information": lambda: est(m0, b0, labels="exact"),
        "fisher_importance": lambda: natgrad.fisher_importance(F0, m0, normalize=False),
        "fisher_pruning_masks": lambda: natgrad.fisher_pruning_masks(
            natgrad.fisher_importance(F0, m0), sparsity=0.5
        ),
        "compare_task_fisher": lambda: natgrad.compare_task_fisher(F0, F1),
        "fisher_weighted_damage": lambda: natgrad.fisher_weighted_damage(
            m0, b0, b1, labels="exact", lr=0.1
        ),
        "fisher_damage_asymmetry": lambda: natgrad.fisher_damage_asymmetry(
            m0, b0, b1, names=("task_0", "task_1")
        ),
        "fisher_uncertainty": lambda: natgrad.fisher_uncertainty(m0, b0, F0),
        "natural_gradient_norms": lambda: natural_gradient_norms(m0, b0, F0),
        "top_fisher_directions": lambda: natgrad.top_fisher_directions(m0, b0, k=3),
        "fisher_weighted_merge": lambda: natgrad.fisher_weighted_merge(
            [m0, m1], [F0, est(m1, b1)]
        ),
    }[name]()


_METRICS = [
    "fisher_information",  # with labels="exact": must not become the others' Fisher
    "fisher_weighted_damage",  # with labels="exact"
    "compare_task_fisher",  # caches models[0]'s Fisher of task 1 ...
    "fisher_weighted_merge",  # ... which is not models[1]'s (was off by 0.34)
    "fisher_importance",
    "fisher_pruning_masks",
    "fisher_damage_asymmetry",
    "fisher_uncertainty",
    "natural_gradient_norms",
    "top_fisher_directions",
]


@pytest.fixture(scope="module")
def compute_all_case():
    m0, m1 = _mlp(seed=0), _mlp(seed=5)
    b0, b1 = _batch(seed=1), _batch(seed=2)
    ctx = MetricContext(
        models=[m0, m1],
        batches=[b0, b1],
        options={
            "fisher_information": {"labels": "exact"},
            "fisher_weighted_damage": {"labels": "exact", "lr": 0.1},
            "fisher_importance": {"normalize": False},
            "top_fisher_directions": {"k": 3},
        },
    )
    out = registry.compute_all(ctx, names=_METRICS, errors="raise")
    return ctx, out, (m0, m1, b0, b1)


@pytest.mark.parametrize("name", _METRICS)
def test_compute_all_equals_direct_call(compute_all_case, name):
    ctx, out, (m0, m1, b0, b1) = compute_all_case
    _same(out.results[name], _direct(name, m0, m1, b0, b1), name)


def test_compute_all_keeps_user_fishers_apart(compute_all_case):
    ctx, _, (m0, m1, b0, b1) = compute_all_case
    assert ctx.fisher == {}  # estimates are cached apart from the user's Fishers
    given = natgrad.estimate_fisher(m0, b1, labels="exact")
    ctx2 = MetricContext(models=[m0], batches=[b0], fisher={"task_0": given})
    imp = registry.compute_with_context("fisher_importance", ctx2, normalize=False)
    _same(imp, natgrad.fisher_importance(given, m0, normalize=False))
    info = registry.compute_with_context("fisher_information", ctx2)
    _same(info, natgrad.estimate_fisher(m0, b0))  # the batch's Fisher, not the given one
    assert ctx2.fisher == {"task_0": given}


def test_metric_cache_follows_new_batch_and_new_weights():
    m0 = _mlp()
    ctx = MetricContext(models=[m0], batches=[_batch(seed=1)])
    registry.compute_with_context("fisher_information", ctx)
    ctx.batches[0] = _batch(seed=7)
    _same(
        registry.compute_with_context("fisher_importance", ctx),
        natgrad.fisher_importance(natgrad.estimate_fisher(m0, ctx.batches[0]), m0),
    )
    with torch.no_grad():
        m0[0].weight.mul_(2.0)  # trained in place between two calls
    _same(
        registry.compute_with_context("fisher_information", ctx),
        natgrad.estimate_fisher(m0, ctx.batches[0]),
    )


# -- state loaded into another model -------------------------------------------------------------


def test_tracker_state_into_other_model_refused_on_load():
    a, b = _mlp(sizes=(4, 5, 3)), _mlp(sizes=(4, 6, 3))
    tr = natgrad.FisherTracker(a)
    tr.update("t", _batch())
    other = natgrad.FisherTracker(b)
    with pytest.raises(ValueError, match=r"shapes differ.*0\.weight: \(5, 4\) vs \(6, 4\)"):
        other.load_state_dict(tr.state_dict())
    assert other.tasks() == []


def test_tracker_state_with_foreign_names_refused_on_load():
    a = _mlp()
    tr = natgrad.FisherTracker(a)
    tr.update("t", _batch())
    b = nn.Sequential(nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match=r"parameters the model lacks.*2\.weight"):
        natgrad.FisherTracker(b).load_state_dict(tr.state_dict())


def test_kfac_state_same_names_other_shapes_refused():
    a, b = _mlp(sizes=(4, 5, 3)), _mlp(sizes=(4, 7, 3))
    pre = natgrad.FisherPreconditioner(a, kind="kfac")
    _backward(a, _batch())
    pre.step(_batch())
    other = natgrad.FisherPreconditioner(b, kind="kfac")
    with pytest.raises(ValueError, match=r"curvature.*shapes differ.*0\.weight: \(7, 4\) vs \(5, 4\)"):
        other.load_state_dict(pre.state_dict())
    assert other.state_dict()["step"] == 0 and other.state_dict()["curvature"] is None


def test_kfac_state_missing_layer_refused():
    a = _mlp()
    pre = natgrad.FisherPreconditioner(a, kind="kfac")
    _backward(a, _batch())
    pre.step(_batch())
    state = pre.state_dict()
    del state["curvature"]["layers"]["2"]
    with pytest.raises(ValueError, match=r"order must list every covered parameter once"):
        natgrad.FisherPreconditioner(a, kind="kfac").load_state_dict(state)


def test_diag_state_other_shapes_refused():
    a, b = _mlp(sizes=(4, 5, 3)), _mlp(sizes=(4, 5, 2))
    pre = natgrad.FisherPreconditioner(a)
    _backward(a, _batch())
    pre.step(_batch())
    with pytest.raises(ValueError, match=r"shapes differ.*2\.bias"):
        natgrad.FisherPreconditioner(b).load_state_dict(pre.state_dict())


def test_diag_state_negative_refused():
    a = _mlp()
    pre = natgrad.FisherPreconditioner(a)
    _backward(a, _batch())
    pre.step(_batch())
    state = pre.state_dict()
    state["curvature"]["values"]["0.bias"][0] = -1.0
    with pytest.raises(ValueError, match=r"'0\.bias' has negative"):
        natgrad.FisherPreconditioner(a).load_state_dict(state)


def test_woodbury_state_other_model_refused():
    a, b = _mlp(sizes=(4, 5, 3)), _mlp(sizes=(4, 6, 3))
    pre = natgrad.FisherPreconditioner(a, kind="woodbury")
    _backward(a, _batch())
    pre.step(_batch())
    with pytest.raises(ValueError, match=r"state_dict's curvature.*shapes differ.*0\.weight: \(6, 4\) vs \(5, 4\)"):
        natgrad.FisherPreconditioner(b, kind="woodbury").load_state_dict(pre.state_dict())


def test_woodbury_state_inconsistent_refused():
    a = _mlp()
    pre = natgrad.FisherPreconditioner(a, kind="woodbury")
    _backward(a, _batch())
    pre.step(_batch())
    state = pre.state_dict()
    state["curvature"]["rows"] = state["curvature"]["rows"][:, :-1]
    with pytest.raises(ValueError, match=r"rows must have shape \(R, 43\).*got \(8, 42\)"):
        natgrad.FisherPreconditioner(a, kind="woodbury").load_state_dict(state)


def test_natural_gradient_state_into_other_model_leaves_optimizer():
    a, b = _mlp(sizes=(4, 5, 3)), _mlp(sizes=(4, 7, 3))
    opt_a = natgrad.NaturalGradient(
        torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9),
        natgrad.FisherPreconditioner(a, kind="kfac"),
    )
    _backward(a, _batch())
    opt_a.step(batch=_batch())
    sgd_b = torch.optim.SGD(b.parameters(), lr=0.5, momentum=0.9)
    opt_b = natgrad.NaturalGradient(sgd_b, natgrad.FisherPreconditioner(b, kind="kfac"))
    with pytest.raises(ValueError, match="shapes differ"):
        opt_b.load_state_dict(opt_a.state_dict())
    assert sgd_b.param_groups[0]["lr"] == 0.5 and len(sgd_b.state) == 0


def test_ewc_state_anchor_wrong_shape_refused():
    model = _mlp()
    ewc = natgrad.EWC(model, {k: torch.ones_like(p) for k, p in model.named_parameters()})
    state = ewc.state_dict()
    state["terms"][0]["anchor"]["2.weight"] = torch.zeros(3, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"anchor.*2\.weight: \(3, 6\) vs \(3, 5\)"):
        ewc.load_state_dict(state)


def test_ewc_state_into_other_model_refused():
    a, b = _mlp(sizes=(4, 5, 3)), _mlp(sizes=(4, 6, 3))
    ewc = natgrad.EWC(a, {k: torch.ones_like(p) for k, p in a.named_parameters()})
    with pytest.raises(ValueError, match=r"shapes differ.*0\.weight"):
        natgrad.EWC(b).load_state_dict(ewc.state_dict())


def test_ewc_failed_load_changes_nothing():
    model = _mlp()
    ewc = natgrad.EWC(model, {k: torch.ones_like(p) for k, p in model.named_parameters()})
    state = ewc.state_dict()
    state["lam"] = 7.0
    state["terms"][0]["fisher"]["0.bias"] = -torch.ones(5, dtype=torch.float64)
    before = float(ewc.penalty().detach())
    with pytest.raises(ValueError, match=r"'0\.bias' has negative"):
        ewc.load_state_dict(state)
    assert ewc.lam == 1.0 and float(ewc.penalty().detach()) == before


def test_preconditioner_state_not_a_state_dict():
    pre = natgrad.FisherPreconditioner(_mlp())
    with pytest.raises(ValueError, match="Not a FisherPreconditioner state_dict"):
        pre.load_state_dict({"kind": "diag"})
    state = pre.state_dict()
    state["generator"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="generator state is corrupt"):
        pre.load_state_dict(state)


def test_tracker_not_a_state_dict():
    with pytest.raises(ValueError, match="Not a FisherTracker state_dict"):
        natgrad.FisherTracker(_mlp()).load_state_dict({"tasks": {}})


def test_ewc_penalty_other_architecture_names_mismatch():
    a = _mlp(sizes=(4, 5, 3))
    ewc = natgrad.EWC(a, {k: torch.ones_like(p) for k, p in a.named_parameters()})
    other = nn.Sequential(nn.Linear(4, 6), nn.Tanh()).double()
    with pytest.raises(ValueError, match=r"only in EWC.*2\.bias.*shapes differ.*0\.weight"):
        ewc.penalty(other)


def test_ewc_penalty_model_with_extra_head_is_exact():
    a = _mlp(sizes=(4, 5, 3))
    F = {k: torch.full_like(p, 2.0) for k, p in a.named_parameters()}
    ewc = natgrad.EWC(a, F, lam=3.0)
    b = nn.Sequential(*list(_mlp(sizes=(4, 5, 3), seed=9)), nn.Linear(3, 2).double())
    ref = sum(
        (F[k] * (p.detach() - dict(a.named_parameters())[k].detach()) ** 2).sum()
        for k, p in b.named_parameters()
        if k in F
    )
    assert float(ewc.penalty(b).detach()) == pytest.approx(1.5 * float(ref), rel=1e-12)


def test_scale_by_fisher_model_without_grads_refused():
    # was {} without a word: nothing was scaled
    model = _mlp()
    F = {k: torch.ones_like(p) for k, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"(?s)has a gradient.*call loss\.backward\(\) before"):
        natgrad.scale_by_fisher(model, F)


def test_scale_by_fisher_model_with_some_grads_scales_those():
    model = _mlp()
    F = {k: torch.full_like(p, 3.0) for k, p in model.named_parameters()}
    model[0].bias.grad = torch.ones_like(model[0].bias)
    out = natgrad.scale_by_fisher(model, F, damping=1.0)
    assert list(out) == ["0.bias"]
    torch.testing.assert_close(model[0].bias.grad, torch.full_like(model[0].bias, 0.25))
    assert model[0].weight.grad is None


def _two_heads():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    b = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    Fa = {k: torch.rand_like(p) for k, p in a.named_parameters()}
    Fb = {k: torch.rand_like(p) for k, p in b.named_parameters()}
    return a, b, Fa, Fb


def test_merge_of_different_heads_names_them_and_the_params_argument():
    a, b, Fa, Fb = _two_heads()
    with pytest.raises(
        ValueError,
        match=r"2\.bias: \(3,\) vs \(5,\), 2\.weight: \(3, 6\) vs \(5, 6\)\. .*pass "
        r"params=\[k for k, _ in models\[0\]\.named_parameters\(\) if k not in "
        r"\{'2\.bias', '2\.weight'\}\]",
    ):
        natgrad.fisher_weighted_merge([a, b], [Fa, Fb])


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (["0.weight", "nope"], r"params= names parameters that models\[0\] lacks: \['nope'\]"),
        (["0.weight", "2.weight"], r"2\.weight: \(3, 6\) vs \(5, 6\)\. Leave those out of params="),
        ([], r"params= is empty"),
    ],
)
def test_merge_params_that_cannot_be_merged(params, match):
    a, b, Fa, Fb = _two_heads()
    with pytest.raises(ValueError, match=match):
        natgrad.fisher_weighted_merge([a, b], [Fa, Fb], params=params)


def test_damage_refuses_params_with_a_given_fisher():
    """``params=`` was ignored when ``fisher_a`` was given (the damage covered every
    parameter of the Fisher, not the ones asked for); now refused by name, for both
    damage functions and either Fisher."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    a = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    b = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    fa = natgrad.estimate_fisher(model, a)
    with pytest.raises(ValueError, match="params= chooses the parameters of an estimated"):
        natgrad.fisher_weighted_damage(model, a, b, fisher_a=fa, params=["weight"])
    with pytest.raises(ValueError, match="fisher_b was given"):
        natgrad.fisher_damage_asymmetry(model, a, b, fisher_b=fa, params=["weight"])
    # params= alone still selects, and equals a Fisher of those parameters given
    r1 = natgrad.fisher_weighted_damage(model, a, b, params=["weight"])
    r2 = natgrad.fisher_weighted_damage(model, a, b, fisher_a={"weight": fa["weight"]})
    assert sorted(r1.per_layer) == ["weight"] and r1.damage == pytest.approx(r2.damage, rel=1e-12)


def _tiny(h=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, h), nn.Tanh(), nn.Linear(h, 4)).double()


def _xy():
    torch.manual_seed(1)
    return torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))


@pytest.mark.parametrize("setting,saved,now", [
    ("max_factor_dim", 4, None),
    ("labels", "mc", "empirical"),
    ("kfac_approx", "reduce", "expand"),
    ("likelihood", "categorical", "bernoulli"),
])
def test_preconditioner_state_of_other_settings_is_refused_by_name(setting, saved, now):
    # a state saved with max_factor_dim=4 loaded into max_factor_dim=None and failed 5
    # steps later ("different layouts"); labels/likelihood loaded without a word (review)
    model = _tiny()
    x, y = _xy()
    kw = {"kind": "kfac", "kl_clip": None, "update_every": 1}
    pre = natgrad.FisherPreconditioner(model, **kw, **{setting: saved})
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step((x, y))
    state = pre.state_dict()
    other = natgrad.FisherPreconditioner(model, **kw, **{setting: now})
    with pytest.raises(ValueError, match=rf"saved by a preconditioner built with {setting}="
                                         rf".*this one has {setting}=.*damping, update_every"):
        other.load_state_dict(state)
    assert other.curvature is None  # nothing replaced
    # the schedule may change on resume
    same = natgrad.FisherPreconditioner(model, **{**kw, "update_every": 5, "damping": 0.1},
                                        **{setting: saved})
    same.load_state_dict(state)


def test_ewc_state_with_a_curvature_of_another_model_or_nan_is_refused():
    # a K-FAC curvature of a hidden-16 model with hidden-8 anchors loaded and failed at the
    # penalty with torch's shape message; NaN in A loaded (EKFAC: silently); review
    x, y = _xy()
    small, big = _tiny(8), _tiny(16)
    curv = natgrad.estimate_curvature(big, (x, y), kind="kfac")
    ewc = natgrad.EWC(big, curv, lam=1.0)
    state = ewc.state_dict()
    state["curvature_terms"][0]["anchor"] = {k: p.detach().clone()
                                             for k, p in small.named_parameters()}
    target = natgrad.EWC(small, natgrad.estimate_curvature(small, (x, y), kind="kfac"), lam=3.0)
    with pytest.raises(ValueError, match=r"curvature term 0's entry '0.weight' has shape "
                                         r"\(16, 6\) but the parameter has \(8, 6\)"):
        target.load_state_dict(state)
    assert target.lam == 3.0  # nothing replaced
    for kind in ("kfac", "ekfac"):
        ewc = natgrad.EWC(small, natgrad.estimate_curvature(small, (x, y), kind=kind))
        state = ewc.state_dict()
        state["curvature_terms"][0]["curvature"]["layers"]["0"]["A"][0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match=r"curvature term 0's layers.0.A"):
            natgrad.EWC(small, natgrad.estimate_curvature(small, (x, y), kind=kind)
                        ).load_state_dict(state)


@pytest.mark.parametrize("kind,saved,now,loads", [
    ("diag", {"kfac_approx": "reduce"}, {}, True),  # unused by the diagonal
    ("diag", {"max_factor_dim": 4}, {}, True),
    ("kfac", {"loss_reduction": "sum"}, {}, True),  # source='batch' does not read it
    ("kfac", {"labels": "mc"}, {"labels": "exact"}, True),  # one Fisher
    ("diag", {"likelihood": natgrad.Gaussian(sigma=1.0)},
     {"likelihood": natgrad.Gaussian(sigma=2.0)}, False),  # a Fisher 4x smaller
])
def test_preconditioner_settings_that_do_not_change_the_curvature_load(kind, saved, now, loads):
    model = _tiny()
    x = _xy()[0]
    y = torch.randn(16, 4, dtype=torch.float64)
    kw = {"kind": kind, "kl_clip": None, "update_every": 1, "likelihood": "gaussian"}
    pre = natgrad.FisherPreconditioner(model, **{**kw, **saved})
    model.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    pre.step((x, y))
    other = natgrad.FisherPreconditioner(model, **{**kw, **now})
    if loads:
        other.load_state_dict(pre.state_dict())
        assert other.curvature is not None
    else:
        with pytest.raises(ValueError, match=r"likelihood='Gaussian\(sigma=1.0\)'"):
            other.load_state_dict(pre.state_dict())
