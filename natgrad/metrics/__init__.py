"""The Fisher metrics registry.

Every use of the Fisher registers its metrics here; only the command line imports
this package. ``registry.compute_with_context(name, MetricContext(...))`` runs one.
"""

from natgrad.metrics import _core  # noqa: F401  (registers the core metrics)
from natgrad.metrics.context import MetricContext, MissingContextError, SignatureType
from natgrad.metrics.registry import MetricRegistry, MetricSpec, UnknownMetricError, registry

__all__ = [
    "MetricContext",
    "MetricRegistry",
    "MetricSpec",
    "MissingContextError",
    "SignatureType",
    "UnknownMetricError",
    "registry",
]
