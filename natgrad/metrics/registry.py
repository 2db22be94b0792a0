"""The metric registry: every Fisher metric by name, with its signature type and needs."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from natgrad.metrics.context import NEEDS, MetricContext, MissingContextError, SignatureType

__all__ = ["MetricSpec", "MetricRegistry", "registry", "UnknownMetricError"]


class UnknownMetricError(KeyError, ValueError):
    """No metric has this name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: ``fn(context, **options)`` plus what it needs."""

    name: str
    fn: Callable[..., Any]
    signature: SignatureType
    needs: tuple[str, ...]
    description: str


class MetricRegistry:
    """Name -> metric. Metrics are computed from a :class:`MetricContext`.

    Example:
        >>> import torch
        >>> from natgrad.metrics import MetricContext, registry
        >>> model = torch.nn.Linear(3, 2)
        >>> batch = (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))
        >>> F = registry.compute_with_context("fisher_information", MetricContext([model], [batch]))
        >>> F.n_samples
        4
    """

    def __init__(self) -> None:
        self._specs: dict[str, MetricSpec] = {}

    def register(
        self,
        name: str,
        signature: SignatureType | str,
        *,
        needs: tuple[str, ...] = (),
        description: str = "",
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``fn(context, **options)`` under ``name``."""
        signature = SignatureType(signature)
        unknown = [n for n in needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"Unknown needs {unknown}; known: {sorted(NEEDS)}.")

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._specs:
                raise ValueError(f"A metric named {name!r} is already registered.")
            doc = description or (fn.__doc__ or "").strip().splitlines()[0:1]
            desc = doc if isinstance(doc, str) else (doc[0] if doc else "")
            self._specs[name] = MetricSpec(name, fn, signature, tuple(needs), desc)
            return fn

        return deco

    def spec(self, name: str) -> MetricSpec:
        if name not in self._specs:
            close = difflib.get_close_matches(name, list(self._specs), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownMetricError(
                f"Unknown metric {name!r}.{hint} Registered metrics: {', '.join(self.names())}."
            )
        return self._specs[name]

    def names(self, signature: SignatureType | str | None = None) -> list[str]:
        """Registered names (sorted), optionally only those of one signature type."""
        sig = None if signature is None else SignatureType(signature)
        return sorted(n for n, s in self._specs.items() if sig is None or s.signature == sig)

    def describe(self, name: str) -> dict[str, Any]:
        """``{"name", "signature", "needs", "description"}`` of one metric."""
        s = self.spec(name)
        return {
            "name": s.name,
            "signature": s.signature.value,
            "needs": {n: NEEDS[n] for n in s.needs},
            "description": s.description,
        }

    def compute_with_context(self, name: str, context: MetricContext, **options: Any) -> Any:
        """Compute metric ``name`` from ``context``.

        Options come from ``context.options[name]``, overridden by keyword arguments.

        Raises:
            UnknownMetricError: no such metric (the message lists the registered ones).
            MissingContextError: the context lacks something the metric needs (named).
        """
        s = self.spec(name)
        missing = context.missing(s.needs)
        if missing:
            raise MissingContextError(
                f"Metric {name!r} ({s.signature.value}) cannot run: the context lacks "
                + "; ".join(missing)
                + "."
            )
        kwargs = {**context.options.get(name, {}), **options}
        return s.fn(context, **kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def __len__(self) -> int:
        return len(self._specs)


registry = MetricRegistry()
