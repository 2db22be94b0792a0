import json
import math

import numpy as np
import pytest
import torch

from natgrad import DiagonalFisher, FisherTracker
from natgrad.engine.report import to_jsonable
from natgrad.metrics import (
    MetricContext,
    MetricRegistry,
    SignatureType,
    UnknownMetricError,
    registry,
)
from tests.reference import assert_close_dict, ce_sum, loop_grads


def _toy_registry(calls):
    reg = MetricRegistry()

    @reg.register("weight_norm", SignatureType.STANDARD, needs=("model",))
    def _norm(ctx, power=2):
        calls.append("weight_norm")
        return {
            k: float(p.detach().abs().pow(power).sum()) for k, p in ctx.models[0].named_parameters()
        }

    @reg.register("ema_tasks", SignatureType.CUSTOM, needs=("tracker",))
    def _tasks(ctx):
        calls.append("ema_tasks")
        return ctx.tracker.tasks()

    @reg.register("broken", SignatureType.STANDARD, needs=("model",))
    def _broken(ctx):
        calls.append("broken")
        raise RuntimeError("this metric always fails")

    @reg.register("wipe", SignatureType.CUSTOM, needs=("model",), mutates=True)
    def _wipe(ctx):
        calls.append("wipe")
        ctx.models.clear()
        return "wiped"

    return reg


def test_compute_all_runs_skips_and_records():
    calls = []
    reg = _toy_registry(calls)
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.fill_(3.0)
    ctx = MetricContext(models=[model], options={"weight_norm": {"power": 1}})
    out = reg.compute_all(ctx)
    assert out.results == {"weight_norm": {"weight": 3.0, "bias": 3.0}}
    assert out.skipped["ema_tasks"] == "lacks tracker: context.tracker (a natgrad.FisherTracker)"
    assert out.skipped["wipe"].startswith("changes the context (mutates=True)")
    assert out.failed == {"broken": "RuntimeError: this metric always fails"}
    assert set(out.seconds) == {"weight_norm", "broken"}
    assert sorted(calls) == ["broken", "weight_norm"]
    assert ctx.models == [model]  # the mutating metric did not run
    d = out.to_dict()
    assert json.loads(json.dumps(d))["results"]["weight_norm"] == {"weight": 3.0, "bias": 3.0}


def test_compute_all_names_exclude_and_raise():
    calls = []
    reg = _toy_registry(calls)
    ctx = MetricContext(models=[torch.nn.Linear(2, 1)])
    with pytest.raises(RuntimeError, match="always fails"):
        reg.compute_all(ctx, errors="raise")
    out = reg.compute_all(ctx, names=["weight_norm", "wipe"], exclude=["weight_norm"])
    assert out.results == {"wipe": "wiped"}
    assert out.skipped == {"weight_norm": "excluded"}
    assert ctx.models == []  # named explicitly, the mutating metric ran


def test_compute_all_bad_arguments():
    reg = _toy_registry([])
    with pytest.raises(UnknownMetricError, match="Unknown metric 'weight_nrm'.*'weight_norm'"):
        reg.compute_all(MetricContext(), names=["weight_nrm"])
    with pytest.raises(UnknownMetricError, match="Unknown metric 'nope'"):
        reg.compute_all(MetricContext(), exclude=["nope"])
    with pytest.raises(
        ValueError, match="Unknown errors 'ignore'; expected one of 'record', 'raise'"
    ):
        reg.compute_all(MetricContext(), errors="ignore")


def test_global_compute_all_accounts_for_every_metric(mlp_case):
    model, x, y = mlp_case
    tracker = FisherTracker(model)
    ctx = MetricContext(
        models=[model], batches=[(x[:5], y[:5]), (x[5:], y[5:])], tasks=["a", "b"], tracker=tracker
    )
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    out = registry.compute_all(ctx)
    for name in registry.names():
        assert [name in out.results, name in out.skipped, name in out.failed].count(True) == 1
    assert registry.describe("reset_fisher_ema")["mutates"] is True
    assert "reset_fisher_ema" in out.skipped and tracker.tasks() == []
    text = json.dumps(out.to_dict())  # JSON-serializable whatever the metrics return
    assert "fisher_information" in json.loads(text)["results"]
    # task a's Fisher equals the brute-force mean of squared per-sample gradients
    g = loop_grads(model, ce_sum, x[:5], y[:5])
    assert_close_dict(
        dict(out.results["fisher_information"]), {k: (v**2).mean(0) for k, v in g.items()}
    )
    assert_close_dict(before, dict(model.named_parameters()))


def test_to_jsonable_summaries():
    f = DiagonalFisher(
        {
            "l1.weight": torch.tensor([[1.0, 2.0]]),
            "l1.bias": torch.tensor([3.0]),
            "w": torch.ones(4),
        },
        n_samples=7,
        labels="exact",
    )
    s = to_jsonable(f)
    assert s == {
        "n_samples": 7,
        "labels": "exact",
        "likelihood": "categorical",
        "n_entries": 7,
        "total": 10.0,
        "layer_totals": {"l1": 6.0, "w": 4.0},
    }
    big = to_jsonable({"m": torch.tensor([[True, False], [True, True]])}, max_elements=3)
    assert big == {"m": {"shape": [2, 2], "dtype": "bool", "count_true": 3}}
    t = to_jsonable(torch.tensor([1.0, 2.0, 6.0]), max_elements=2)
    assert t == {"shape": [3], "dtype": "float32", "sum": 9.0, "mean": 3.0, "min": 1.0, "max": 6.0}
    assert to_jsonable(torch.tensor([1.0, 2.0])) == [1.0, 2.0]
    assert to_jsonable(torch.nn.Linear(3, 2)) == {"module": "Linear", "parameters": 8}
    assert to_jsonable(np.array([1.5, np.float32(2)])) == [1.5, 2.0]
    assert to_jsonable([math.inf, SignatureType.STANDARD]) == [None, "standard"]


def test_to_jsonable_uses_a_reports_own_summary():
    from dataclasses import dataclass

    from natgrad.engine.report import Report

    @dataclass
    class Big(Report):
        values: torch.Tensor

        def to_dict(self):
            return {"n": self.values.numel()}

    @dataclass
    class Plain(Report):
        values: torch.Tensor

    assert to_jsonable({"r": Big(torch.zeros(5))}) == {"r": {"n": 5}}
    assert to_jsonable([Plain(torch.ones(2))]) == [{"values": [1.0, 1.0]}]


def test_compute_all_estimates_each_task_fisher_once(mlp_case, monkeypatch):
    import natgrad.metrics.context as context

    model, x, y = mlp_case
    calls = []
    real = context.estimate_fisher

    def counted(*args, **kwargs):
        calls.append(kwargs.get("labels"))
        return real(*args, **kwargs)

    monkeypatch.setattr(context, "estimate_fisher", counted)
    ctx = MetricContext(models=[model], batches=[(x[:5], y[:5]), (x[5:], y[5:])])
    names = ["compare_task_fisher", "fisher_information", "fisher_uncertainty"]
    out = registry.compute_all(ctx, names=names, errors="raise")
    assert calls == ["empirical", "empirical"]  # one per task, shared by the three metrics
    assert out.results["fisher_information"] is ctx.batch_fisher(0)
    g = loop_grads(model, ce_sum, x[:5], y[:5])
    assert_close_dict(
        dict(out.results["fisher_information"]), {k: (v**2).mean(0) for k, v in g.items()}
    )
    # other settings are a different estimate: computed anew, the cached one kept
    exact = registry.compute_with_context("fisher_information", ctx, labels="exact")
    assert calls[-1] == "exact" and exact.labels == "exact"
    assert ctx.batch_fisher(0).labels == "empirical"
    # a Fisher the user gave is not what fisher_information returns
    given = MetricContext(models=[model], batches=[(x, y)], fisher={"task_0": exact})
    assert registry.compute_with_context("fisher_information", given).labels == "empirical"
