"""What every demo section shares: the configuration, the state and the section record."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from natgrad.cli.demo.setup import DemoNet, Progress, Task
from natgrad.datasets import Split
from natgrad.engine.report import Report

#: Every file the demo writes into its output directory (``natgrad demo`` refuses to
#: overwrite any of them without ``--force``; :meth:`State.path` accepts only these).
OUTPUTS = (
    "report.md",
    "metrics.json",
    "fisher_layer_mass.png",
    "forgetting_curves.png",
    "accuracy_vs_sparsity.png",
    "accuracy_vs_sparsity_fine_tuned.png",
    "reliability.png",
    "training_curves.png",
    "training_curves_time.png",
    "fisher_task_A.safetensors",
    "fisher_task_B.safetensors",
)

# Fisher similarity everywhere in the demo and `natgrad report` uses the Jaccard index
# of the top 5% of coordinates (a fraction, so it means the same for any model size).
TOP_FRACTION = 0.05


@dataclass
class Config:
    """Sizes of the demo; ``quick`` shrinks everything to run in seconds (CI)."""

    quick: bool
    seed: int
    base_epochs: int
    task_epochs: int
    fisher_samples: int
    eval_samples: int
    sparsities: tuple[float, ...]

    @classmethod
    def make(cls, quick: bool, seed: int) -> Config:
        if quick:
            return cls(quick, seed, 8, 4, 1000, 500, (0.5, 0.8, 0.9))
        return cls(quick, seed, 30, 10, 4000, 1000, (0.5, 0.7, 0.8, 0.9, 0.95))


@dataclass
class State:
    """Data, models and Fishers handed from one section to the next."""

    cfg: Config
    out: str
    log: Progress
    data: Split
    tasks: dict[str, Task]
    models: dict[str, DemoNet] = field(default_factory=dict)
    fishers: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, name: str) -> str:
        """``out/name`` for a file listed in :data:`OUTPUTS`."""
        if name not in OUTPUTS:
            raise ValueError(f"demo output {name!r} is not listed in OUTPUTS; add it there.")
        return os.path.join(self.out, name)

    def task_batch(self, task: str, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` training samples of a task (labels remapped), for Fishers."""
        t = self.tasks[task]
        n = self.cfg.fisher_samples if n is None else n
        return t.x_train[:n], t.y_train[:n]


@dataclass
class Section(Report):
    """One part of the demo: table rows, plots and data for metrics.json."""

    key: str
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    seconds: float = 0.0
