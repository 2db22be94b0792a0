import pytest

from natgrad import FisherTracker, estimate_fisher
from natgrad.metrics import (
    MetricContext,
    MissingContextError,
    SignatureType,
    UnknownMetricError,
    registry,
)
from tests.reference import assert_close_dict


def test_core_metrics_registered():
    for name, sig in [
        ("fisher_information", SignatureType.STANDARD),
        ("update_fisher_ema", SignatureType.CUSTOM),
        ("reset_fisher_ema", SignatureType.CUSTOM),
    ]:
        assert registry.describe(name)["signature"] == sig.value


def test_fisher_information_metric(mlp_case):
    model, x, y = mlp_case
    ctx = MetricContext(models=[model], batches=[(x, y)], tasks=["general"])
    F = registry.compute_with_context("fisher_information", ctx)
    assert_close_dict(dict(F), dict(estimate_fisher(model, (x, y))))
    assert ctx.fisher == {} and ctx.batch_fisher(0) is F  # cached apart from given ones
    exact = registry.compute_with_context("fisher_information", ctx, labels="exact")
    assert exact.labels == "exact"


def test_ema_metrics(mlp_case):
    model, x, y = mlp_case
    tr = FisherTracker(model, decay=0.5)
    ctx = MetricContext(
        models=[model], batches=[(x, y), (x[:3], y[:3])], tasks=["math", "general"], tracker=tr
    )
    assert registry.compute_with_context("update_fisher_ema", ctx) == {"math": 1, "general": 1}
    assert registry.compute_with_context("update_fisher_ema", ctx) == {"math": 2, "general": 2}
    assert registry.compute_with_context("reset_fisher_ema", ctx, task="math") == {
        "tasks": ["general"]
    }
    ctx.options["reset_fisher_ema"] = {"task": None}
    assert registry.compute_with_context("reset_fisher_ema", ctx) == {"tasks": []}


def test_unknown_metric_lists_names():
    with pytest.raises(
        UnknownMetricError,
        match="Unknown metric 'fisher_informaton'. Did you mean 'fisher_information'",
    ):
        registry.compute_with_context("fisher_informaton", MetricContext())


def test_missing_context_named():
    with pytest.raises(
        MissingContextError,
        match="lacks model: context.models\\[0\\].*batch: context.batches\\[0\\]",
    ):
        registry.compute_with_context("fisher_information", MetricContext())
    with pytest.raises(MissingContextError, match="tracker"):
        registry.compute_with_context("reset_fisher_ema", MetricContext())


def test_register_rejects_duplicates_and_unknown_needs():
    with pytest.raises(ValueError, match="already registered"):
        registry.register("fisher_information", "standard")(lambda ctx: None)
    with pytest.raises(ValueError, match="Unknown needs"):
        registry.register("x", "standard", needs=("gpu",))
    with pytest.raises(ValueError):
        registry.register("y", "not-a-signature")


def test_names_by_signature():
    assert "fisher_information" in registry.names(SignatureType.STANDARD)
    assert "fisher_information" not in registry.names("custom")


def test_description_defaults_to_the_docstrings_first_line():
    from natgrad.metrics import MetricRegistry

    reg = MetricRegistry()

    @reg.register("documented", "standard")
    def _documented(ctx):
        """First line.

        More detail."""

    @reg.register("bare", "custom", description="given")
    def _bare(ctx):
        """Ignored."""

    reg.register("silent", "custom")(lambda ctx: None)
    assert reg.describe("documented")["description"] == "First line."
    assert reg.describe("bare")["description"] == "given"
    assert reg.describe("silent")["description"] == ""
