"""The metric registry: every Fisher metric by name, with its signature type and needs."""

from __future__ import annotations

import difflib
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from natgrad.engine.checks import check_choice
from natgrad.engine.report import Report, to_jsonable
from natgrad.metrics.context import NEEDS, MetricContext, MissingContextError, SignatureType

__all__ = ["MetricSpec", "MetricRegistry", "MetricResults", "registry", "UnknownMetricError"]


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
    mutates: bool = False
    task_option: str | None = None

    def task(self, options: Mapping[str, Any]) -> int | str:
        """The task whose needs are checked: the option ``task_option`` when the metric
        has one and it is given, else task 0."""
        task: int | str = 0
        if self.task_option is not None:
            task = options.get(self.task_option, 0)
        return task


@dataclass
class MetricResults(Report):
    """What :meth:`MetricRegistry.compute_all` returns.

    Attributes:
        results: ``{metric name: value}`` for every metric that ran.
        skipped: ``{metric name: reason}`` for metrics the context cannot serve (the
            reason names what is missing) or that change the context (``mutates``).
        failed: ``{metric name: "ErrorType: message"}`` for metrics that raised.
        seconds: ``{metric name: wall-clock seconds}`` for metrics that ran or failed.
    """

    results: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self, max_elements: int | None = 64) -> dict[str, Any]:
        """JSON-serializable values; tensors with more than ``max_elements`` entries are
        summarized (shape, dtype, sum, mean, min, max), Fishers as totals per layer.
        ``max_elements=None`` keeps every entry."""
        out: dict[str, Any] = to_jsonable(
            {
                "results": self.results,
                "skipped": self.skipped,
                "failed": self.failed,
                "seconds": self.seconds,
            },
            max_elements=max_elements,
        )
        return out


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
        self._aliases: dict[str, str] = {}

    def register(
        self,
        name: str,
        signature: SignatureType | str,
        *,
        needs: tuple[str, ...] = (),
        description: str = "",
        mutates: bool = False,
        task_option: str | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: register ``fn(context, **options)`` under ``name``.

        Args:
            name: the metric's name (unique).
            signature: a :class:`SignatureType` (or its value).
            needs: what the context must provide (keys of ``NEEDS``).
            description: one line; defaults to the first line of ``fn``'s docstring.
            mutates: the metric changes the context's state (e.g. resets the tracker);
                :meth:`compute_all` runs it only when named explicitly.
            task_option: the metric's option naming the task it reads (e.g. ``"task"``):
                its ``"fisher"`` need is checked for that task (task 0 when the option is
                not given), not for task 0 alone.
        """
        signature = SignatureType(signature)
        unknown = [n for n in needs if n not in NEEDS]
        if unknown:
            raise ValueError(f"Unknown needs {unknown}; known: {sorted(NEEDS)}.")

        def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._specs:
                raise ValueError(f"A metric named {name!r} is already registered.")
            desc = description or next(iter((fn.__doc__ or "").strip().splitlines()), "")
            self._specs[name] = MetricSpec(
                name, fn, signature, tuple(needs), desc, bool(mutates), task_option
            )
            return fn

        return deco

    def alias(self, old: str, new: str) -> None:
        """Keep ``old`` working as a deprecated name of metric ``new`` for one release.

        The alias is not listed by :meth:`names` nor run by :meth:`compute_all`; using it
        warns (DeprecationWarning) and runs ``new``.
        """
        self.spec(new)
        if old in self._specs or old in self._aliases:
            raise ValueError(f"A metric or alias named {old!r} is already registered.")
        self._aliases[old] = new

    def spec(self, name: str) -> MetricSpec:
        if name in self._aliases:
            warnings.warn(
                f"The metric name {name!r} is deprecated and will be removed in the next "
                f"release; use {self._aliases[name]!r}.",
                DeprecationWarning,
                stacklevel=3,
            )
            name = self._aliases[name]
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
        """``{"name", "signature", "needs", "description", "mutates"}`` of one metric."""
        s = self.spec(name)
        return {
            "name": s.name,
            "signature": s.signature.value,
            "needs": {n: NEEDS[n] for n in s.needs},
            "description": s.description,
            "mutates": s.mutates,
        }

    def compute_with_context(self, name: str, context: MetricContext, **options: Any) -> Any:
        """Compute metric ``name`` from ``context``.

        Options come from ``context.options[name]``, overridden by keyword arguments.

        Raises:
            UnknownMetricError: no such metric (the message lists the registered ones).
            MissingContextError: the context lacks something the metric needs (named).
        """
        s = self.spec(name)
        kwargs = {**context.options.get(name, {}), **options}
        missing = context.missing(s.needs, s.task(kwargs))
        if missing:
            raise MissingContextError(
                f"Metric {name!r} ({s.signature.value}) cannot run: the context lacks "
                + "; ".join(missing)
                + "."
            )
        return s.fn(context, **kwargs)

    def compute_all(
        self,
        context: MetricContext,
        *,
        names: Iterable[str] | None = None,
        exclude: Iterable[str] = (),
        errors: Literal["record", "raise"] = "record",
    ) -> MetricResults:
        """Run every metric ``context`` can serve; report the others with the reason.

        A metric runs when the context provides all its ``needs``; its options come from
        ``context.options[name]``. Metrics registered with ``mutates=True`` (they change
        the context, e.g. reset the tracker) are skipped unless listed in ``names``.
        A Fisher the context estimates is cached apart from the user's ``context.fisher``,
        keyed by model, batch (identity and exact contents) and estimate options
        (:meth:`MetricContext.batch_fisher`), and reused only where all three agree, so
        each metric's value equals its direct call.

        Args:
            context: the :class:`MetricContext`.
            names: only these metrics (default: every registered one, sorted).
            exclude: metrics to leave out (reported as skipped).
            errors: ``"record"`` puts a metric that raises into ``failed`` and goes on;
                ``"raise"`` re-raises its error.

        Returns:
            :class:`MetricResults` with ``results``, ``skipped``, ``failed``, ``seconds``;
            ``to_dict()`` is JSON-serializable.

        Raises:
            UnknownMetricError: a name in ``names`` or ``exclude`` is not registered.
            ValueError: ``errors`` is not ``"record"`` or ``"raise"``.

        Example:
            >>> import torch
            >>> from natgrad.metrics import MetricContext, registry
            >>> ctx = MetricContext([torch.nn.Linear(3, 2)], [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))])
            >>> out = registry.compute_all(ctx)
            >>> out.results["fisher_information"].n_samples
            4
            >>> out.skipped["reset_fisher_ema"]
            'lacks tracker: context.tracker (a natgrad.FisherTracker)'
        """
        check_choice("errors", errors, ("record", "raise"))
        explicit = names is not None
        selected = sorted(self._specs) if names is None else list(dict.fromkeys(names))
        excluded = set(exclude)
        for n in [*selected, *excluded]:
            self.spec(n)  # unknown names raise with suggestions
        out = MetricResults()
        for name in selected:
            s = self._specs[name]
            options = context.options.get(name, {})
            if name in excluded:
                out.skipped[name] = "excluded"
                continue
            try:
                missing = context.missing(s.needs, s.task(options))
            except ValueError as exc:  # an unknown task in the options: a failure
                if errors == "raise":
                    raise
                out.failed[name] = f"{type(exc).__name__}: {exc}"
                continue
            if missing:
                out.skipped[name] = "lacks " + "; ".join(missing)
            elif s.mutates and not explicit:
                out.skipped[name] = (
                    "changes the context (mutates=True); run it by name: "
                    f"compute_all(context, names=[{name!r}])"
                )
            else:
                start = time.perf_counter()
                try:
                    out.results[name] = s.fn(context, **options)
                except Exception as exc:
                    if errors == "raise":
                        raise
                    out.failed[name] = f"{type(exc).__name__}: {exc}"
                out.seconds[name] = time.perf_counter() - start
        return out

    def __contains__(self, name: str) -> bool:
        return name in self._specs or name in self._aliases

    def __len__(self) -> int:
        return len(self._specs)


registry = MetricRegistry()
