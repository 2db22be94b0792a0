"""``FisherTracker``: one exponential-moving-average diagonal Fisher per task."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from natgrad.curvature.diagonal import DiagonalFisher
from natgrad.curvature.estimate import estimate_fisher
from natgrad.engine.checks import check_fixed_model, check_fraction, check_model
from natgrad.engine.likelihoods import Likelihood

__all__ = ["FisherTracker"]


class FisherTracker:
    """Per-task EMA of the diagonal Fisher: ``F_task ← decay · F_task + (1 - decay) · F_batch``.

    The first update of a task stores the batch Fisher as is (no bias toward zero).

    Args:
        model: the model whose Fisher is tracked.
        likelihood: name or :class:`natgrad.engine.likelihoods.Likelihood`.
        decay: EMA decay in ``[0, 1]``; 0 keeps only the newest batch.
        **estimate_kwargs: passed to :func:`natgrad.estimate_fisher` (``labels``, ``params``,
            ``mc_samples``, ``chunk_size``, ...). ``generator`` (the ``labels="mc"``
            draws) is one generator kept across updates, so that every update draws
            new labels and the EMA averages the Monte Carlo noise out; without one the
            tracker makes its own, seeded with 0 once, at construction. Its state is
            part of :meth:`state_dict`, so a restored tracker continues the same draws.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2)
        >>> tr = FisherTracker(model, "categorical", decay=0.9)
        >>> _ = tr.update("math", (torch.randn(4, 2), torch.tensor([0, 1, 1, 0])))
        >>> tr.tasks(), tr.fisher("math").n_samples
        (['math'], 4)
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str | Likelihood = "categorical",
        decay: float = 0.95,
        **estimate_kwargs: Any,
    ):
        self.model = check_model(model, "FisherTracker")
        self.likelihood = likelihood
        self.decay = check_fraction("decay", decay, closed=True)
        generator = estimate_kwargs.pop("generator", None)
        self.generator: torch.Generator = (
            torch.Generator().manual_seed(0) if generator is None else generator
        )
        self.estimate_kwargs = estimate_kwargs
        self._fishers: dict[str, DiagonalFisher] = {}
        self._updates: dict[str, int] = {}

    def update(self, task: str, batch: Any) -> DiagonalFisher:
        """Estimate the Fisher on ``batch`` and fold it into ``task``'s EMA; return the EMA.

        Raises:
            ValueError: as :func:`natgrad.estimate_fisher`, e.g. train-mode dropout or
                BatchNorm (call ``model.eval()`` before updating) or labels out of range.
        """
        check_fixed_model(self.model, "FisherTracker.update")
        new = estimate_fisher(
            self.model, batch, self.likelihood, generator=self.generator, **self.estimate_kwargs
        )
        old = self._fishers.get(task)
        self._fishers[task] = new if old is None else old.ema(new, self.decay)
        self._updates[task] = self._updates.get(task, 0) + 1
        return self._fishers[task]

    def fisher(self, task: str) -> DiagonalFisher:
        """The current EMA Fisher of ``task``."""
        if task not in self._fishers:
            raise KeyError(
                f"No Fisher for task {task!r}; tracked tasks: {self.tasks()}. Call update(task, batch) first."
            )
        return self._fishers[task]

    def __contains__(self, task: str) -> bool:
        return task in self._fishers

    def tasks(self) -> list[str]:
        """Names of the tracked tasks, in insertion order."""
        return list(self._fishers)

    def num_updates(self, task: str) -> int:
        return self._updates.get(task, 0)

    def reset(self, task: str | None = None) -> None:
        """Forget ``task``'s EMA (every task when ``None``)."""
        if task is None:
            self._fishers.clear()
            self._updates.clear()
            return
        if task not in self._fishers:
            raise KeyError(f"No Fisher for task {task!r}; tracked tasks: {self.tasks()}.")
        del self._fishers[task]
        self._updates.pop(task, None)

    def cleanup(self) -> None:
        """Release every task's tensors (the tracker stays usable)."""
        self.reset(None)

    def state_dict(self) -> dict[str, Any]:
        """The EMAs, their update counts, the decay and the MC generator's state."""
        return {
            "decay": self.decay,
            "tasks": {t: f.state_dict() for t, f in self._fishers.items()},
            "updates": dict(self._updates),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; every task's Fisher is checked against the
        model (names it lacks, shapes that differ) and for its values before anything
        changes. The MC generator continues from the stored state (a state_dict without
        one, from an older natgrad, leaves the generator as it is).

        Raises:
            ValueError: not a FisherTracker state_dict, or a task's Fisher that does not fit
                the model (the task and the parameters are named), or negative values, or
                a generator state that is not one of this tracker's generator.
            FloatingPointError: NaN or Inf in a stored Fisher.
        """
        keys = ("decay", "tasks", "updates")
        if not isinstance(state, Mapping) or not set(keys) <= set(state):
            raise ValueError(
                f"Not a FisherTracker state_dict: expected keys {list(keys)} (from "
                "FisherTracker.state_dict())."
            )
        decay = check_fraction("decay", state["decay"], closed=True)
        fishers = {}
        for task, s in state["tasks"].items():
            try:
                f = DiagonalFisher.from_state_dict(s)
                f.check_model(self.model)
            except (ValueError, FloatingPointError) as exc:
                raise type(exc)(f"FisherTracker state_dict, task {task!r}: {exc}") from None
            fishers[task] = f
        gen_state = state.get("generator")
        if gen_state is not None:
            probe = torch.Generator(device=self.generator.device)
            try:
                probe.set_state(gen_state)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(
                    f"FisherTracker state_dict: 'generator' is not the state of a "
                    f"{self.generator.device} torch.Generator ({exc}); pass the state_dict "
                    "of a FisherTracker whose generator is on the same device."
                ) from None
            self.generator.set_state(gen_state)
        self.decay = decay
        self._fishers = fishers
        self._updates = {t: int(v) for t, v in state["updates"].items()}
