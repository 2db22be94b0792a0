"""Natural-gradient metric: gradient vs diagonal natural-gradient norms."""

from __future__ import annotations

from natgrad.metrics.context import MetricContext, SignatureType
from natgrad.metrics.registry import registry
from natgrad.optim.scale import NaturalGradientNorms, natural_gradient_norms


@registry.register(
    "natural_gradient_norms",
    SignatureType.STANDARD,
    needs=("model", "batch", "fisher"),
    description=(
        "Norms of the mean-loss gradient g and of the diagonal natural gradient g / (F + damping)"
        " on batches[0], and their ratio, per layer and in total (option damping=1e-3)."
    ),
)
def _natural_gradient_norms(ctx: MetricContext, damping: float = 1e-3) -> NaturalGradientNorms:
    return natural_gradient_norms(
        ctx.models[0], ctx.batches[0], ctx.get_fisher(0), ctx.likelihood, damping=damping
    )


# Its first name promised the scaled gradient; the metric returns the norms.
registry.alias("scale_by_fisher", "natural_gradient_norms")
