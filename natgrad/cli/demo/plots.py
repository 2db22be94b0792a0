"""PNG plots for the demo and ``natgrad report`` (matplotlib, Agg backend: no display)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any


def pyplot() -> Any:  # the matplotlib.pyplot module
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "Plots need matplotlib: pip install matplotlib (or pip install 'natgrad[demo]')."
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return os.path.basename(path)


def layer_mass(path: str, totals: Mapping[str, Mapping[str, float]], title: str) -> str:
    """Grouped bars: the share of ``Σ_i F_i`` per layer, one group per Fisher."""
    plt = pyplot()
    layers = list(dict.fromkeys(k for t in totals.values() for k in t))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(layers) + 2), 3.4))
    width = 0.8 / max(1, len(totals))
    for j, (name, t) in enumerate(totals.items()):
        s = sum(t.values()) or 1.0
        xs = [i + j * width for i in range(len(layers))]
        ax.bar(xs, [t.get(k, 0.0) / s for k in layers], width, label=name)
    ax.set_xticks([i + width * (len(totals) - 1) / 2 for i in range(len(layers))])
    ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("share of Fisher trace")
    ax.set_title(title)
    if len(totals) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def curves(
    path: str,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    logy: bool = False,
    styles: Mapping[str, Mapping[str, object]] | None = None,
    chance: float | None = None,
) -> str:
    """Line plot of ``{label: (xs, ys)}``.

    ``styles`` gives matplotlib line keywords per label (marker, linestyle, ...), so that
    curves differ by more than colour; ``chance`` draws a dotted horizontal line there.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, (xs, ys) in series.items():
        kw: dict[str, Any] = {"marker": "o" if len(xs) <= 20 else None, "ms": 3}
        kw.update((styles or {}).get(label, {}))
        ax.plot(list(xs), list(ys), label=label, **kw)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:g})")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def reliability(
    path: str, probs: Mapping[str, Any], y: Any, *, bins: int = 10, title: str
) -> str:
    """Reliability diagram: accuracy against confidence in ``bins`` equal-width bins.

    ``probs`` maps a label to an ``(N, C)`` tensor of predictive probabilities; ``y`` the
    ``(N,)`` labels. A calibrated predictor lies on the diagonal; the marker area is the
    share of samples in the bin.
    """
    import torch

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="calibrated")
    y = torch.as_tensor(y)
    edges = torch.linspace(0, 1, bins + 1)
    styles = itertools.cycle((("o", "-"), ("s", "--"), ("^", "-.")))
    for (label, p), (marker, ls) in zip(probs.items(), styles, strict=False):
        conf, pred = torch.as_tensor(p).max(-1)
        correct = (pred == y).double()
        xs, ys, share = [], [], []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            m = (conf > lo) & (conf <= hi)
            if m.any():
                xs.append(float(conf[m].double().mean()))
                ys.append(float(correct[m].mean()))
                share.append(float(m.double().mean()))
        ax.plot(xs, ys, marker=marker, linestyle=ls, label=label)
        ax.scatter(xs, ys, s=[400 * v for v in share], alpha=0.2)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max predicted probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)
