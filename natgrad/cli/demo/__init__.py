"""``natgrad demo``: every use of the Fisher on MNIST-1D, in one run.

The demo generates MNIST-1D locally (no download), splits it into task A (digits 0-4)
and task B (digits 5-9), and shows: the diagonal Fisher with each label source,
damage and asymmetry between the tasks, forgetting with and without EWC, Fisher vs
magnitude pruning, Fisher vs plain merging, natural gradient vs Adam, Laplace
uncertainty on out-of-distribution inputs, and every registered metric. It writes
``report.md``, ``metrics.json`` and PNG plots into the output directory.

It sits at the top layer (with the command line), so it may import every use and the
metrics registry. It needs the ``demo`` extra: ``pip install 'natgrad[demo]'``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from natgrad.cli.demo.common import Config, Section, State
from natgrad.cli.demo.setup import Progress, make_tasks
from natgrad.engine.report import Report

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult(Report):
    """What :func:`run_demo` produced.

    Attributes:
        out_dir: the output directory.
        table: the results table (markdown).
        files: paths written (report.md, metrics.json, plots).
        seconds: total wall-clock time.
        sections: ``{key: Section}``, the rows and data of each part.
        metrics: ``registry.compute_all(...).to_dict()`` on the demo's context.
    """

    out_dir: str
    table: str
    files: list[str]
    seconds: float
    sections: dict[str, Section] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def _sections() -> list[tuple[str, Callable[[State], Section]]]:
    """The demo's parts, in order: ``(key, function(state) -> Section)``."""
    from natgrad.cli.demo import basics, compress, forgetting, ngd, uncertain

    return [
        ("base", basics.base_model),
        ("fisher", basics.fisher_sources),
        ("interference", forgetting.interference),
        ("forgetting", forgetting.forgetting),
        ("pruning", compress.pruning),
        ("merging", compress.merging),
        ("uncertainty", uncertain.uncertainty),
        ("natural_gradient", ngd.natural_gradient),
    ]


def run_demo(
    out_dir: str | os.PathLike[str] = "natgrad-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Run the demo and write ``report.md``, ``metrics.json`` and plots into ``out_dir``.

    Args:
        out_dir: output directory (created if missing).
        quick: smaller models, data and epochs (about 20 s on 2 CPU cores instead of ~2 min).
        seed: seeds data generation, initialization and training.
        progress: print step lines on stderr.

    Returns:
        :class:`DemoResult` (the table, the files written, each section's numbers).

    Raises:
        ImportError: ``mnist1d`` or ``matplotlib`` is missing (the message says what to install).
        OSError: ``out_dir`` cannot be created or written.

    Example (not run here: it trains several models)::

        from natgrad.cli.demo import run_demo
        result = run_demo("natgrad-demo", quick=True)
        print(result.table)
    """
    from natgrad.cli.demo import plots, write
    from natgrad.cli.demo.metrics import all_metrics

    plots.pyplot()  # fail early, before training, when matplotlib is missing
    start = time.perf_counter()
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    log = Progress(progress)
    cfg = Config.make(quick, seed)
    torch.manual_seed(seed)
    log(f"generating MNIST-1D (seed {seed}){' [quick]' if quick else ''}")
    data, tasks = make_tasks(seed)
    st = State(cfg, out, log, data, tasks)
    sections: list[Section] = []
    threads = torch.get_num_threads()
    # The demo's models are tiny: one thread avoids the (large) cost of
    # intra-op thread synchronization, especially on a busy machine.
    torch.set_num_threads(1)
    try:
        for _, fn in _sections():
            t0 = time.perf_counter()
            sec = fn(st)
            sec.seconds = time.perf_counter() - t0
            sections.append(sec)
        t0 = time.perf_counter()
        msec, metrics = all_metrics(st)
        msec.seconds = time.perf_counter() - t0
        sections.append(msec)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    header = {
        "quick": quick,
        "seed": seed,
        "torch": torch.__version__,
        "torch threads": 1,
        "seconds": round(seconds, 1),
    }
    saved = []
    # The two Fishers compared in the interference section (both of the task-A model),
    # so that `natgrad report fisher_task_*.safetensors` gives the demo's similarities.
    for task, key in (("A", "A"), ("B", "B_at_A")):
        if key in st.fishers:
            saved.append(st.path(f"fisher_task_{task}.safetensors"))
            # its own output name: `natgrad demo` refused it without --force already
            st.fishers[key].save(saved[-1], overwrite=True)
    files = write.write_outputs(out, sections, header, {}, metrics)
    files += [os.path.join(out, p) for s in sections for p in s.plots] + saved
    log(f"wrote {len(files)} files to {out}")
    return DemoResult(
        out, write.table(sections), files, seconds, {s.key: s for s in sections}, metrics
    )
