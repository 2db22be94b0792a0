"""The Fisher metrics registry.

Every use of the Fisher registers its metrics in a private module ``natgrad/metrics/_<use>.py``
(imported below, automatically); only the command line imports this package.
``registry.compute_with_context(name, MetricContext(...))`` runs one metric.
"""

import importlib
import pkgutil

from natgrad.metrics.context import MetricContext, MissingContextError, SignatureType
from natgrad.metrics.registry import MetricRegistry, MetricSpec, UnknownMetricError, registry

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_mod}")  # each registers its metrics

__all__ = [
    "MetricContext",
    "MetricRegistry",
    "MetricSpec",
    "MissingContextError",
    "SignatureType",
    "UnknownMetricError",
    "registry",
]
