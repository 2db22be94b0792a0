"""Shared workloads for benchmarks and experiments (DESIGN.md's table, MNIST-1D models).

Timing benchmarks (pytest-benchmark) live in ``benchmarks/test_*.py``; experiments that
print accuracy tables live in ``benchmarks/exp_*.py`` and write a markdown fragment to
``benchmarks/results/<name>.md``, which is collected into ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

# -- DESIGN.md timing workloads -------------------------------------------------------


def design_mlp() -> nn.Module:
    """MLP 40-512-512-10 (ReLU)."""
    return nn.Sequential(
        nn.Linear(40, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def design_cnn() -> nn.Module:
    """2 conv + linear on 1x16x16 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


class DesignTransformer(nn.Module):
    """2-layer transformer encoder, d=128, T=32, vocab 1000, mean-pooled 10-class head."""

    def __init__(self, vocab: int = 1000, d: int = 128, classes: int = 10, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(32, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, 4, dim_feedforward=4 * d, dropout=0.0, batch_first=True
        )
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids):
        h = self.enc(self.emb(ids) + self.pos[: ids.shape[1]])
        return self.head(h.mean(1))


def design_workloads(
    seed: int = 0,
) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    """``{name: (model, (x, y))}`` for the three DESIGN.md workloads."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return {
        "mlp": (
            design_mlp(),
            (torch.randn(256, 40, generator=g), torch.randint(0, 10, (256,), generator=g)),
        ),
        "cnn": (
            design_cnn(),
            (torch.randn(128, 1, 16, 16, generator=g), torch.randint(0, 10, (128,), generator=g)),
        ),
        "transformer": (
            DesignTransformer().eval(),
            (
                torch.randint(0, 1000, (64, 32), generator=g),
                torch.randint(0, 10, (64,), generator=g),
            ),
        ),
    }


def forward_backward(model: nn.Module, batch) -> None:
    """The baseline: one plain forward + backward of the mean cross-entropy."""
    x, y = batch
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


# -- MNIST-1D models and training ---------------------------------------------------------


def mnist1d_mlp() -> nn.Module:
    """MLP 40-100-100-10 (ReLU)."""
    return nn.Sequential(
        nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10)
    )


class Mnist1dCNN(nn.Module):
    """3 Conv1d layers of 25 channels (stride 2) + linear, on (N, 40) signals."""

    def __init__(self, channels: int = 25, classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv1d(1, channels, 5, stride=2, padding=2)
        self.c2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.c3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.fc = nn.Linear(channels * 5, classes)

    def forward(self, x):
        h = torch.relu(self.c1(x.unsqueeze(1)))
        h = torch.relu(self.c2(h))
        h = torch.relu(self.c3(h))
        return self.fc(h.flatten(1))


def mnist1d_cnn() -> nn.Module:
    return Mnist1dCNN()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on (x, y)."""
    out = model(x)
    return float((out.argmax(-1) == y).float().mean()), float(nn.functional.cross_entropy(out, y))


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 100,
    make_opt: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    seed: int = 0,
    loss_fn: Callable | None = None,
) -> nn.Module:
    """Plain minibatch training (Adam lr 1e-3 by default); ``loss_fn(model, out, y)`` may add terms."""
    opt = (make_opt or (lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)))(model)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            out = model(x[idx])
            loss = nn.functional.cross_entropy(out, y[idx])
            if loss_fn is not None:
                loss = loss + loss_fn(model, out, y[idx])
            loss.backward()
            opt.step()
    return model


# -- reporting ---------------------------------------------------------------------------


def machine_line() -> str:
    """Date, torch version and machine, for RESULTS.md headers."""
    return (
        f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {platform.machine()} "
        f"{os.cpu_count()} cores ({torch.get_num_threads()} torch threads), Python {platform.python_version()}"
    )


def load_note(when: str = "at the start") -> str:
    """The machine's 1-minute load average now, for timing notes in RESULTS.md.

    Args:
        when: when in the run it is read, as the note says it (``"at the start"``,
            ``"at the end"``); read it then.
    """
    load = os.getloadavg()[0]
    quiet = "a quiet machine" if load < 1.5 else "a loaded machine: timings are noisy"
    return f"1-minute load average {when}: {load:.1f} on {os.cpu_count()} cores ({quiet})"


def write_fragment(name: str, text: str) -> str:
    """Write ``benchmarks/results/<name>.md`` (a section of RESULTS.md); return its path."""
    path = os.path.join(os.path.dirname(__file__), "results", f"{name}.md")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text.rstrip() + "\n")
    return path


def publish(name: str, text: str, quick: bool) -> None:
    """Print a report; write it as the fragment ``name`` unless ``quick`` (a smoke run never
    overwrites recorded results)."""
    print(text)
    if not quick:
        print("wrote", write_fragment(name, text))


def run_experiment(name: str, run: Callable, args) -> str:
    """``run(args)``, :func:`publish` its text as the fragment ``name``, print the total
    time."""
    t0 = time.time()
    text = run(args)
    publish(name, text, args.quick)
    print(f"total {time.time() - t0:.0f}s")
    return text
