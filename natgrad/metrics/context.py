"""``MetricContext``: what a metric may draw on (models, batches, Fishers, masks, tracker)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from torch import nn

from natgrad.curvature.diagonal import DiagonalFisher
from natgrad.curvature.estimate import estimate_fisher
from natgrad.curvature.tracker import FisherTracker
from natgrad.engine.checks import check_batch_list, check_fishers_by_task, check_model_list
from natgrad.engine.likelihoods import Likelihood

__all__ = ["SignatureType", "MetricContext", "MissingContextError", "NEEDS"]


class SignatureType(str, Enum):
    """How a metric is called (the seed's signature types)."""

    STANDARD = "standard"  # (model, batch)
    DUAL_BATCH = "dual_batch"  # (model, batch_a, batch_b)
    FISHER_BASED = "fisher_based"  # precomputed Fisher(s), by task
    PREPROCESSED = "preprocessed"  # precomputed masks
    TWO_MODELS = "two_models"  # (model_1, model_2, Fishers)
    CUSTOM = "custom"  # anything else (e.g. acts on the tracker)


class MissingContextError(ValueError):
    """The context lacks something a metric needs."""


# What each need means, for error messages and `describe`.
NEEDS = {
    "model": "context.models[0] (a model)",
    "two_models": "two models in context.models",
    "batch": "context.batches[0] (a batch)",
    "two_batches": "two batches in context.batches (task A, task B)",
    "fisher": "a Fisher for the first task: context.fisher[task], the tracker, or a model and batch to estimate it",
    "two_fishers": "Fishers for two tasks (context.fisher, the tracker, or models and two batches)",
    "two_masks": "two mask sets in context.masks",
    "tracker": "context.tracker (a natgrad.FisherTracker)",
}


@dataclass
class MetricContext:
    """Everything metrics can use. Only what a metric needs must be present.

    Args:
        models: models; most metrics use ``models[0]``, merge metrics the first two.
        batches: batches, one per task; ``tasks[i]`` names ``batches[i]``.
        fisher: precomputed ``{task: DiagonalFisher}``; filled lazily when a metric
            estimates one from a model and a batch.
        masks: mask sets (``{name: bool tensor}``) for PREPROCESSED metrics.
        tasks: task names (default ``["task_0", "task_1", ...]``).
        tracker: a :class:`natgrad.FisherTracker` for the EMA metrics.
        likelihood: the likelihood of the Fishers the context estimates itself.
        labels: the label source of the Fishers the context estimates itself.
        options: ``{metric name: {keyword: value}}`` passed to that metric.

    Raises:
        TypeError: at construction, for a bare model (``models=model``), one bare batch
            (``batches=(x, y)``: wrap it in a list), or one Fisher not keyed by task.

    Example:
        >>> import torch
        >>> ctx = MetricContext(models=[torch.nn.Linear(2, 2)], tasks=["math", "general"])
        >>> ctx.task_names(2)
        ['math', 'general']
    """

    models: list[nn.Module] = field(default_factory=list)
    batches: list[Any] = field(default_factory=list)
    fisher: dict[str, DiagonalFisher] = field(default_factory=dict)
    masks: list[dict] | None = None
    tasks: list[str] | None = None
    tracker: FisherTracker | None = None
    likelihood: str | Likelihood = "categorical"
    labels: str = "empirical"
    options: dict[str, dict] = field(default_factory=dict)
    # the Fishers this context estimated itself with its own settings, by task
    _estimated: dict[str, DiagonalFisher] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.models = check_model_list(self.models, "models")
        self.batches = check_batch_list(self.batches, "batches")
        self.fisher = check_fishers_by_task(self.fisher, "fisher")

    def task_names(self, n: int | None = None) -> list[str]:
        n = max(len(self.batches), len(self.fisher), 2) if n is None else n
        names = list(self.tasks or [])
        known = list(self.fisher) + ([] if self.tracker is None else self.tracker.tasks())
        for t in known:
            if len(names) >= n:
                break
            if t not in names and not self.tasks:
                names.append(t)
        names += [f"task_{i}" for i in range(len(names), n)]
        return names[:n]

    # -- availability ------------------------------------------------------------------
    def _has_fisher(self, i: int) -> bool:
        task = self.task_names(i + 1)[i]
        if task in self.fisher or (self.tracker is not None and task in self.tracker):
            return True
        return bool(self.models) and len(self.batches) > i

    def provides(self, need: str) -> bool:
        checks = {
            "model": lambda: len(self.models) >= 1,
            "two_models": lambda: len(self.models) >= 2,
            "batch": lambda: len(self.batches) >= 1,
            "two_batches": lambda: len(self.batches) >= 2,
            "fisher": lambda: self._has_fisher(0),
            "two_fishers": lambda: self._has_fisher(0) and self._has_fisher(1),
            "two_masks": lambda: self.masks is not None and len(self.masks) >= 2,
            "tracker": lambda: self.tracker is not None,
        }
        if need not in checks:
            raise ValueError(f"Unknown need {need!r}; known: {sorted(checks)}.")
        return checks[need]()

    def missing(self, needs: tuple[str, ...]) -> list[str]:
        """The needs this context cannot serve, each with what would serve it."""
        return [f"{n}: {NEEDS[n]}" for n in needs if not self.provides(n)]

    # -- accessors -----------------------------------------------------------------------
    def get_fisher(self, i: int = 0) -> DiagonalFisher:
        """The Fisher of task ``i``: given, from the tracker, or estimated (and cached)."""
        task = self.task_names(i + 1)[i]
        if task in self.fisher:
            return self.fisher[task]
        if self.tracker is not None and task in self.tracker:
            return self.tracker.fisher(task)
        if self.models and len(self.batches) > i:
            return self.batch_fisher(i)
        raise MissingContextError(f"No Fisher for task {task!r}: give {NEEDS['fisher']}.")

    def batch_fisher(self, i: int = 0, **kwargs: Any) -> DiagonalFisher:
        """The Fisher of ``models[0]`` on ``batches[i]``, estimated with ``likelihood`` and
        ``labels`` (``kwargs`` go to :func:`natgrad.estimate_fisher`).

        The first estimate of a task is cached in ``fisher`` when that holds none; with
        the context's own settings (no ``kwargs``) it is estimated at most once.
        """
        task = self.task_names(i + 1)[i]
        own = self._estimated.get(task)
        if not kwargs and own is not None and self.fisher.get(task) is own:
            return own
        default = not kwargs
        kwargs.setdefault("labels", self.labels)
        f = estimate_fisher(self.models[0], self.batches[i], self.likelihood, **kwargs)
        if task not in self.fisher:
            self.fisher[task] = f
            if default:
                self._estimated[task] = f
        return f
