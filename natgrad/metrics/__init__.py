"""The Fisher metrics registry.

Every use of the Fisher registers its metrics in a module ``natgrad/metrics/<use>.py``
(imported below, automatically: every module here but ``context`` and ``registry``); adding a
metric is one decorated function in one of them.
``registry.compute_with_context(name, MetricContext(...))`` runs one metric.
"""

import importlib
import pkgutil

from natgrad.metrics.context import MetricContext, MissingContextError, SignatureType
from natgrad.metrics.registry import (
    MetricRegistry,
    MetricResults,
    MetricSpec,
    UnknownMetricError,
    registry,
)

_INFRASTRUCTURE = {"context", "registry"}
for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _INFRASTRUCTURE):
    importlib.import_module(f"{__name__}.{_mod}")  # each registers its metrics

__all__ = [
    "MetricContext",
    "MetricRegistry",
    "MetricResults",
    "MetricSpec",
    "MissingContextError",
    "SignatureType",
    "UnknownMetricError",
    "registry",
]
