"""The demo's data, model, training loop and scores (MNIST-1D split into two tasks)."""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from natgrad.datasets import Split, load_mnist1d

TASK_CLASSES = {"A": (0, 1, 2, 3, 4), "B": (5, 6, 7, 8, 9)}


class Progress:
    """Step lines on stderr: ``[  3.2s] message``."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(
                f"[{time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True
            )


class DemoNet(nn.Module):
    """MLP 40-100-100-10 whose ``classes`` attribute selects the logits it returns.

    ``classes=None`` gives all ten digits; ``classes=(5, ..., 9)`` gives task B's
    logits only (a head per task, as in task-incremental continual learning).
    """

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.head = nn.Linear(hidden, 10)
        self.classes: tuple[int, ...] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.body(x))
        return out if self.classes is None else out[:, list(self.classes)]

    def on(self, task: str | None) -> DemoNet:
        """Select task ``"A"``/``"B"`` (or ``None``: all digits); returns ``self``."""
        self.classes = None if task is None else TASK_CLASSES[task]
        return self


@dataclass
class Task:
    """One task's data, labels remapped to 0..len(classes)-1."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_tasks(seed: int, n_train: int | None = None) -> tuple[Split, dict[str, Task]]:
    """MNIST-1D (all digits) and the two tasks A (digits 0-4) and B (digits 5-9)."""
    data = load_mnist1d(seed=42 + seed)
    if n_train is not None:
        data = Split(data.x_train[:n_train], data.y_train[:n_train], data.x_test, data.y_test)
    tasks = {}
    for name, classes in TASK_CLASSES.items():
        s = data.subset(classes)
        lo = classes[0]
        tasks[name] = Task(name, s.x_train, s.y_train - lo, s.x_test, s.y_test - lo)
    return data, tasks


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(-1) == y).float().mean())


@torch.no_grad()
def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(model(x), y))


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
    batch_size: int = 100,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    before_step: Callable[[tuple[torch.Tensor, torch.Tensor]], None] | None = None,
    on_epoch: Callable[[int], None] | None = None,
) -> list[float]:
    """Minibatch training (Adam lr 1e-3 unless ``optimizer``); returns the loss per step.

    ``penalty(model)`` is added to the loss (EWC); ``before_step(batch)`` runs between
    ``backward`` and ``optimizer.step`` (a preconditioner); ``on_epoch(e)`` after each epoch.
    """
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            losses.append(float(loss.detach()))
            if penalty is not None:
                loss = loss + penalty(model)
            loss.backward()  # type: ignore[no-untyped-call]  # Tensor.backward is unannotated in torch
            if before_step is not None:
                before_step((x[idx], y[idx]))
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return losses


def clone(model: DemoNet) -> DemoNet:
    return copy.deepcopy(model)


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Area under the ROC curve for "out scores higher than in": P(s_out > s_in) + ½ P(=).

    Computed from all pairs (Mann-Whitney U), so it is exact for small sets.
    """
    a = in_scores.double().reshape(-1, 1)
    b = out_scores.double().reshape(1, -1)
    return float(((b > a).double() + 0.5 * (b == a).double()).mean())


def calibration(probs: torch.Tensor, y: torch.Tensor, bins: int = 10) -> tuple[float, float]:
    """(mean negative log-likelihood, expected calibration error with equal-width bins)."""
    nll = float(-probs[torch.arange(len(y)), y].clamp_min(1e-12).log().mean())
    conf, pred = probs.max(-1)
    correct = (pred == y).double()
    edges = torch.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += float(m.double().mean() * (conf[m].double().mean() - correct[m].mean()).abs())
    return nll, ece
