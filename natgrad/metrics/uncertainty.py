"""Uncertainty and direction metrics: the Laplace predictive and the top Fisher eigenpairs."""

from __future__ import annotations

from typing import Any

from natgrad.directions import FisherDirections, top_fisher_directions
from natgrad.engine.likelihoods import Likelihood
from natgrad.laplace import UncertaintyReport, fisher_uncertainty
from natgrad.metrics.context import MetricContext, SignatureType
from natgrad.metrics.registry import registry


@registry.register(
    "fisher_uncertainty",
    SignatureType.STANDARD,
    needs=("model", "batch", "fisher"),
    description=(
        "Linearized Laplace predictive of models[0] on batches[0] with the diagonal posterior "
        "precision N·F + δ (F: the first task's Fisher); per-sample logit variances, "
        "probabilities, entropy and an epistemic score."
    ),
)
def _fisher_uncertainty(ctx: MetricContext, **options: Any) -> UncertaintyReport:
    if isinstance(ctx.likelihood, Likelihood):  # carries options such as Gaussian's sigma
        options.setdefault("likelihood", ctx.likelihood)
    return fisher_uncertainty(ctx.models[0], ctx.batches[0], ctx.get_fisher(0), **options)


@registry.register(
    "top_fisher_directions",
    SignatureType.STANDARD,
    needs=("model", "batch"),
    description=(
        "Top-k eigenvalues of the Fisher GᵀG/N of models[0] on batches[0] and their "
        "eigenvectors as parameter dicts (Gram matrix or Lanczos). Without option k, "
        "k=10 lowered to the rank bound min(R, P) on a small batch (clip_k=True); an "
        "explicit k above it raises."
    ),
)
def _top_fisher_directions(ctx: MetricContext, **options: Any) -> FisherDirections:
    options.setdefault("clip_k", "k" not in options)  # the default k fits a small context
    options.setdefault("likelihood", ctx.likelihood)
    options.setdefault("labels", ctx.labels)
    return top_fisher_directions(ctx.models[0], ctx.batches[0], **options)
