"""The diagonal-Fisher methods compared in ``test_fisher_speed.py`` and their peak memory.

Every method computes, for one batch of the DESIGN.md workloads, a sum (or mean) of
squared per-sample gradients, or the plain forward+backward baseline:

* ``plain``: one forward + backward of the mean cross-entropy (the baseline);
* ``natgrad empirical|mc|exact``: :func:`natgrad.estimate_fisher` (``engine="auto"``);
* ``natgrad vmap``: the same with ``engine="vmap"`` (empirical labels);
* ``BackPACK SumGradSquared|DiagGGNMC|DiagGGNExact``: BackPACK extensions on a copy;
* ``Opacus``: ``GradSampleModule`` per-sample gradients, squared and summed.

Peak memory is measured in a fresh subprocess per method, on the second call (the
first loads kernels and code pages lazily): on CPU the growth of
the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over the
resident set before the call; on CUDA ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.workloads import design_workloads, forward_backward
from natgrad import estimate_fisher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = (
    "plain",
    "natgrad empirical",
    "natgrad mc",
    "natgrad exact",
    "natgrad vmap",
    "BackPACK SumGradSquared",
    "BackPACK DiagGGNMC",
    "BackPACK DiagGGNExact",
    "Opacus",
)


def _backpack(model: nn.Module, batch, ext_name: str) -> Callable[[], None] | None:
    if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
        return None  # BackPACK has no attention extension: it would silently skip it
    try:
        import backpack
        from backpack import extensions
    except ImportError:
        return None
    m = backpack.extend(copy.deepcopy(model))
    lossf = backpack.extend(nn.CrossEntropyLoss(reduction="sum"))
    ext = getattr(extensions, ext_name)()
    x, y = batch

    def run():
        m.zero_grad(set_to_none=True)
        with backpack.backpack(ext):
            lossf(m(x), y).backward()

    try:
        run()
    except Exception:  # BackPACK does not support this architecture
        return None
    return run


def _opacus(model: nn.Module, batch) -> Callable[[], None] | None:
    try:
        from opacus import GradSampleModule
    except ImportError:
        return None
    try:
        m = GradSampleModule(copy.deepcopy(model))
    except Exception:
        return None
    x, y = batch
    lossf = nn.CrossEntropyLoss(reduction="sum")

    def run():
        m.zero_grad(set_to_none=True)
        lossf(m(x), y).backward()
        for p in m.parameters():
            if getattr(p, "grad_sample", None) is not None:
                (p.grad_sample.float() ** 2).sum(0)
                p.grad_sample = None

    try:
        run()
    except Exception:
        return None
    return run


def make_method(name: str, model: nn.Module, batch) -> Callable[[], None] | None:
    """A zero-argument callable running ``name`` on ``(model, batch)``, or None if unsupported."""
    if name == "plain":
        return lambda: forward_backward(model, batch)
    if name.startswith("natgrad"):
        labels = name.split()[1]
        if labels == "vmap":
            return lambda: estimate_fisher(model, batch, engine="vmap")
        return lambda: estimate_fisher(model, batch, labels=labels)
    if name.startswith("BackPACK"):
        return _backpack(model, batch, name.split()[1])
    if name == "Opacus":
        return _opacus(model, batch)
    raise ValueError(f"Unknown method {name!r}; expected one of {METHODS}.")


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _peak_child(workload: str, method: str) -> dict:
    torch.set_num_threads(2)
    model, batch = design_workloads()[workload]
    run = make_method(method, model, batch)
    if run is None:
        return {"supported": False}
    run()  # warm-up: lazily loaded kernels and code pages are not the method's memory
    model.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        run()
        return {"supported": True, "peak_mb": torch.cuda.max_memory_allocated() / 2**20}
    before = _reset_peak_rss()
    run()
    return {"supported": True, "peak_mb": max(_status_mb("VmHWM") - before, 0.0)}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (``/proc/self/clear_refs``, Linux >= 4.0); return
    the current RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_mb("VmRSS")


def peak_memory_mb(workload: str, method: str) -> float | None:
    """Peak memory growth (MiB) of one call of ``method`` on ``workload``, in a fresh process."""
    code = (
        "import json, sys; from benchmarks.fisher_methods import _peak_child; "
        f"print(json.dumps(_peak_child({workload!r}, {method!r})))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return res["peak_mb"] if res["supported"] else None
