"""``MetricContext``: what a metric may draw on (models, batches, Fishers, masks, tracker)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from natgrad.curvature.diagonal import DiagonalFisher
from natgrad.curvature.estimate import estimate_fisher
from natgrad.curvature.tracker import FisherTracker
from natgrad.engine.checkpoint import tensor_digest
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
    "fisher": "a Fisher for the metric's task (the first unless its option task= names another): context.fisher[task], the tracker, or a model and that task's batch to estimate it",
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
        fisher: the user's precomputed ``{task: DiagonalFisher}``. The context never
            writes here: Fishers it estimates are cached apart (see :meth:`batch_fisher`).
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

    models: Sequence[nn.Module] = field(default_factory=list)
    batches: Sequence[Any] = field(default_factory=list)
    fisher: Mapping[str, DiagonalFisher] = field(default_factory=dict)
    masks: list[dict[str, torch.Tensor]] | None = None
    tasks: list[str] | None = None
    tracker: FisherTracker | None = None
    likelihood: str | Likelihood = "categorical"
    labels: str = "empirical"
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Fishers the context estimated: {key: (what the key's ids refer to, Fisher)}
    _cache: dict[tuple[Any, ...], tuple[tuple[Any, ...], DiagonalFisher]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self.models = check_model_list(self.models, "models")
        self.batches = check_batch_list(self.batches, "batches")
        self.fisher = check_fishers_by_task(self.fisher, "fisher")

    def task_names(self, n: int | None = None) -> list[str]:
        """The name of each task position: ``tasks`` when given; else the Fishers' (and the
        tracker's) names, a default-style name ``task_<i>`` at its own position ``i`` and
        the others in the first free positions, then ``task_<i>`` for the rest (a name
        is never used twice: a Fisher given as ``task_1`` was also task 0's, found by
        review)."""
        full = max(len(self.batches), len(self.fisher), 2)
        n = full if n is None else n
        if not self.tasks and n < full:  # the positions do not depend on how many are asked
            return self.task_names(full)[:n]
        if self.tasks:
            names = list(self.tasks)
            return (names + [f"task_{i}" for i in range(len(names), n)
                             if f"task_{i}" not in names])[:n]
        known = list(dict.fromkeys(
            list(self.fisher) + ([] if self.tracker is None else self.tracker.tasks())))
        slots: list[str | None] = [None] * n
        rest = []
        for t in known:
            i = int(t[5:]) if t.startswith("task_") and t[5:].isdigit() else -1
            if 0 <= i < n and slots[i] is None:
                slots[i] = t
            else:
                rest.append(t)
        for t in rest:
            if None in slots:
                slots[slots.index(None)] = t
        taken = {t for t in slots if t is not None}
        out: list[str] = []
        for i, slot in enumerate(slots):
            name = slot
            if name is None:
                j = i
                while f"task_{j}" in taken:  # a default name another position holds
                    j += 1
                name = f"task_{j}"
                taken.add(name)
            out.append(name)
        return out

    def task_index(self, task: int | str) -> int:
        """The position of ``task``: an index ``>= 0`` as is, a name by :meth:`task_names`.

        Raises:
            ValueError: a negative index or a name that is not one of the context's tasks.
        """
        if isinstance(task, int):
            if task < 0:
                raise ValueError(f"task={task}: a task index is >= 0 (or pass the task's name).")
            return task
        names = self.task_names()
        if task not in names:
            raise ValueError(f"Unknown task {task!r}; the context's tasks are {names}.")
        return names.index(task)

    # -- availability ------------------------------------------------------------------
    def _has_fisher(self, i: int) -> bool:
        task = self.task_names(i + 1)[i]
        if task in self.fisher or (self.tracker is not None and task in self.tracker):
            return True
        return bool(self.models) and len(self.batches) > i

    def provides(self, need: str, task: int | str = 0) -> bool:
        """Whether the context serves ``need``; ``"fisher"`` for the task ``task`` (a
        metric's ``task=`` option, see :meth:`task_index`), the others whatever it is.

        Raises:
            ValueError: an unknown need; for ``"fisher"``, an unknown task.
        """
        checks = {
            "model": lambda: len(self.models) >= 1,
            "two_models": lambda: len(self.models) >= 2,
            "batch": lambda: len(self.batches) >= 1,
            "two_batches": lambda: len(self.batches) >= 2,
            "fisher": lambda: self._has_fisher(self.task_index(task)),
            "two_fishers": lambda: self._has_fisher(0) and self._has_fisher(1),
            "two_masks": lambda: self.masks is not None and len(self.masks) >= 2,
            "tracker": lambda: self.tracker is not None,
        }
        if need not in checks:
            raise ValueError(f"Unknown need {need!r}; known: {sorted(checks)}.")
        return checks[need]()

    def missing(self, needs: tuple[str, ...], task: int | str = 0) -> list[str]:
        """The needs this context cannot serve for the task ``task`` (see
        :meth:`provides`), each with what would serve it."""
        return [f"{n}: {NEEDS[n]}" for n in needs if not self.provides(n, task)]

    # -- accessors -----------------------------------------------------------------------
    def given_fisher(self, i: int = 0) -> DiagonalFisher | None:
        """Task ``i``'s Fisher from the user: ``fisher[task]``, else the tracker's; or None."""
        task = self.task_names(i + 1)[i]
        if task in self.fisher:
            return self.fisher[task]
        if self.tracker is not None and task in self.tracker:
            return self.tracker.fisher(task)
        return None

    def get_fisher(self, i: int = 0) -> DiagonalFisher:
        """The Fisher of task ``i``: given, from the tracker, or estimated (and cached)."""
        given = self.given_fisher(i)
        if given is not None:
            return given
        if self.models and len(self.batches) > i:
            return self.batch_fisher(i)
        task = self.task_names(i + 1)[i]
        raise MissingContextError(f"No Fisher for task {task!r}: give {NEEDS['fisher']}.")

    def batch_fisher(self, i: int = 0, *, model_index: int = 0, **kwargs: Any) -> DiagonalFisher:
        """The Fisher of ``models[model_index]`` on ``batches[i]``, estimated with
        ``likelihood`` and ``labels`` (``kwargs`` go to :func:`natgrad.estimate_fisher`).

        Estimates are cached apart from the user's ``fisher``, keyed by the model (its
        identity, the identity and exact contents of each parameter and buffer, its
        train/eval modes), the batch (identity and exact contents of its tensors), the
        likelihood and the options; a model changed in any way (trained in place, written
        through ``.data``, cast) or a changed batch is estimated anew. With a
        ``generator`` (a random source that advances) nothing is cached. The cache keeps
        the ``_CACHE_SIZE`` (8) most recently used estimates, so a context reused over a
        training loop does not hold every step's Fisher.
        """
        model, batch = self.models[model_index], self.batches[i]
        kwargs.setdefault("labels", self.labels)
        if "generator" in kwargs:
            return estimate_fisher(model, batch, self.likelihood, **kwargs)
        refs = (model, batch, self.likelihood, kwargs)  # keeps every id in the key alive
        key = (_state_key(model), _state_key(batch), _freeze(self.likelihood), _freeze(kwargs))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache[key] = self._cache.pop(key)  # most recently used last
            return hit[1]
        f = estimate_fisher(model, batch, self.likelihood, **kwargs)
        self._cache[key] = (refs, f)
        while len(self._cache) > _CACHE_SIZE:  # a context reused over training: the oldest go
            del self._cache[next(iter(self._cache))]
        return f


#: estimates a MetricContext keeps (the most recently used)
_CACHE_SIZE = 8


def _state_key(obj: Any) -> Any:
    """Identity plus the exact contents (SHA-256 of dtype, shape and bytes) of every tensor
    inside ``obj`` (hashable). Not the in-place version counter: writes through ``.data``
    (``p.data.mul_``, ``vector_to_parameters``) leave it unchanged, and a stale Fisher
    was reused after them (found by review)."""
    if isinstance(obj, torch.Tensor):
        return (id(obj), tensor_digest(obj))
    if isinstance(obj, nn.Module):
        tensors = [*obj.parameters(), *obj.buffers()]
        return (
            id(obj),
            tuple((id(t), tensor_digest(t)) for t in tensors),
            tuple(m.training for m in obj.modules()),
        )
    if isinstance(obj, Mapping):
        return (id(obj), tuple((k, _state_key(v)) for k, v in obj.items()))
    if isinstance(obj, (list, tuple)):
        return (id(obj), tuple(_state_key(v) for v in obj))
    return id(obj)


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an option value: equal plain values give equal keys."""
    if isinstance(value, (torch.Tensor, nn.Module)):
        return _state_key(value)
    if isinstance(value, Mapping):
        return tuple((k, _freeze(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value
