"""Natural gradient vs Adam on MNIST-1D: steps and wall-clock to each target.

Methods, each with a grid of ``len(LRS[method])`` learning rates (the same size for all):

* ``adam`` / ``adamw``: ``torch.optim.Adam`` (MLP, CNN) / ``AdamW`` (weight decay 0.01,
  the transformer), default betas;
* ``kfac``: SGD with momentum 0.9 preconditioned by ``natgrad.FisherPreconditioner(model,
  kind="kfac", source="backward")`` with every other setting at its documented default.

Workloads (benchmarks/workloads.py): the MNIST-1D MLP and CNN (targets: full-train-set
loss <= 0.1, test accuracy >= 65% / 90%), and a 4-layer pre-LN transformer encoder on the
MNIST-1D signal as a sequence of 10 tokens of 4 samples (target: train loss <= 0.5).
Batch 100.

Phase 1 (steps to target; load independent): every method x lr x seed (3 seeds), on one
thread (several runs at once with ``--jobs``), evaluated every 10 steps.
Phase 2 (wall-clock; ``--threads`` torch threads, 2 by default): per seed, the best lr of
each method (fewest steps) for each target, re-run with the runs in lockstep: 10 steps of
one run, then 10 of the next, round robin, each with its own clock (evaluation excluded),
so the machine's load hits every method alike. Reported: wall-clock per method, the ratio
kfac / adam per seed and its median (target <= 2/3), and the steps.

Run:  python -m benchmarks.exp_natural_gradient            (writes results/natural_gradient.md)
      python -m benchmarks.exp_natural_gradient --quick    (one seed, 2 lrs, short budgets;
                                                            prints only)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.workloads import (
    evaluate,
    load_note,
    machine_line,
    mnist1d_cnn,
    mnist1d_mlp,
    run_experiment,
)
from natgrad import FisherPreconditioner
from natgrad.datasets import load_mnist1d

LOAD_NOTE = load_note()  # measured before the run starts

BATCH = 100
EVAL_EVERY = 10
SEEDS = (0, 1, 2)
LRS = {
    "adam": (1e-3, 3e-3, 1e-2, 3e-2),
    "adamw": (3e-4, 1e-3, 3e-3, 1e-2),
    "kfac": (0.01, 0.03, 0.1, 0.3),
}
BASELINE = {"mlp": "adam", "cnn": "adam", "transformer": "adamw"}
TARGETS = {  # name: {target: threshold}; loss: <=, acc: >=
    "mlp": {"loss": 0.1, "acc": 0.65},
    "cnn": {"loss": 0.1, "acc": 0.90},
    "transformer": {"loss": 0.5},
}
MAX_STEPS = {"mlp": 2000, "cnn": 2000, "transformer": 3000}


class Block(nn.Module):
    """Pre-LN transformer block with explicit Linear projections (no LayerNorm affine)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.h = heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d, elementwise_affine=False)
        self.ln2 = nn.LayerNorm(d, elementwise_affine=False)
        self.ff1, self.ff2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(n, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        x = x + self.o(a)
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class SignalTransformer(nn.Module):
    """4-layer encoder on an MNIST-1D signal (N, 40) read as 10 tokens of 4 samples:
    linear token embedding + position embedding, mean-pooled linear head."""

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 4, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.embed = nn.Linear(patch, d)
        self.pos = nn.Embedding(40 // patch, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d, elementwise_affine=False)
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tok = x.reshape(x.shape[0], -1, self.patch)
        # position ids (N, T): batch-first, as source="backward" needs of every layer
        pos = torch.arange(tok.shape[1], device=x.device).expand(tok.shape[:2])
        h = self.embed(tok) + self.pos(pos)
        return self.head(self.ln(self.blocks(h)).mean(1))


MODELS = {"mlp": mnist1d_mlp, "cnn": mnist1d_cnn, "transformer": SignalTransformer}


class Stepper:
    """One training step of a method: zero_grad, forward, backward, (precondition), step."""

    def __init__(self, method: str, model: nn.Module, lr: float):
        self.model = model
        self.pre = None
        if method == "adam":
            self.opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        elif method == "adamw":
            self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        elif method == "kfac":  # the documented defaults; the statistics from the backward
            self.opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
            self.pre = FisherPreconditioner(model, kind="kfac", source="backward")
        else:
            raise ValueError(method)
        self.lr = lr

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(x), y).backward()
        if self.pre is not None:
            self.pre.step(lr=self.lr)
        self.opt.step()


@dataclass
class Run:
    """A training run that can be advanced a few steps at a time (for lockstep timing)."""

    method: str
    workload: str
    lr: float
    seed: int
    need: tuple[str, ...]  # the targets to reach before stopping
    max_steps: int
    step: int = 0
    clock: float = 0.0
    hit: dict[str, tuple[int, float]] = field(default_factory=dict)
    status: str = "running"

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        self.model = MODELS[self.workload]()
        self.stepper = Stepper(self.method, self.model, self.lr)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.order: list[torch.Tensor] = []

    def done(self) -> bool:
        return self.status != "running"

    def advance(self, data, n_steps: int) -> None:
        """Train ``n_steps`` (timed), then evaluate (untimed) and record targets reached."""
        t0 = time.perf_counter()
        for _ in range(n_steps):
            if not self.order:
                perm = torch.randperm(len(data.x_train), generator=self.gen)
                self.order = list(perm.split(BATCH))
            idx = self.order.pop(0)
            try:
                self.stepper(data.x_train[idx], data.y_train[idx])
            except FloatingPointError:  # natgrad refuses NaN/Inf gradients
                self.status = "diverged"
                return
            self.step += 1
        self.clock += time.perf_counter() - t0
        acc_tr, loss = evaluate(self.model, data.x_train, data.y_train)
        acc, _ = evaluate(self.model, data.x_test, data.y_test)
        if not math.isfinite(loss):
            self.status = "diverged"
            return
        for key, value in (("loss", loss), ("acc", acc)):
            thr = TARGETS[self.workload].get(key)
            ok = thr is not None and (value <= thr if key == "loss" else value >= thr)
            if ok and key not in self.hit:
                self.hit[key] = (self.step, self.clock)
        if all(k in self.hit for k in self.need):
            self.status = "ok"
        elif self.step >= self.max_steps:
            self.status = "budget"


def steps_job(args: tuple[str, str, float, int, int]) -> tuple[tuple, dict, str]:
    """Phase 1 worker: one run on one thread; the steps to each target."""
    method, workload, lr, seed, max_steps = args
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    data = load_mnist1d()
    run = Run(method, workload, lr, seed, tuple(TARGETS[workload]), max_steps)
    while not run.done():
        run.advance(data, EVAL_EVERY)
    return (method, workload, lr, seed), {k: v[0] for k, v in run.hit.items()}, run.status


def lockstep(runs: list[Run], data) -> None:
    """Advance the runs round robin, EVAL_EVERY steps each, until all are done."""
    while not all(r.done() for r in runs):
        for r in runs:
            if not r.done():
                r.advance(data, EVAL_EVERY)


def per_step_cost(workload: str, data, methods: list[str], rounds: int, steps: int):
    """Median time of one step of each method (interleaved rounds), in ms."""
    x, y = data.x_train[:BATCH], data.y_train[:BATCH]
    steppers = {}
    for m in methods:
        torch.manual_seed(0)
        steppers[m] = Stepper(m, MODELS[workload](), 1e-5)  # tiny steps: the cost is timed
        steppers[m](x, y)
    times: dict[str, list[float]] = {m: [] for m in steppers}
    for _ in range(rounds):
        for m, s in steppers.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                s(x, y)
            times[m].append((time.perf_counter() - t0) / steps * 1e3)
    return {m: statistics.median(v) for m, v in times.items()}


def report(args) -> str:
    data = load_mnist1d()
    seeds = SEEDS[:1] if args.quick else SEEDS
    workloads = args.workloads
    lrs = {m: (v[1:3] if args.quick else v) for m, v in LRS.items()}
    max_steps = {k: (600 if args.quick else v) for k, v in MAX_STEPS.items()}
    # -- phase 1: steps to target, every grid point --------------------------------------
    jobs = [(m, w, lr, s, max_steps[w]) for w in workloads for m in (BASELINE[w], "kfac")
            for lr in lrs[m] for s in seeds]
    steps: dict[tuple, tuple[dict, str]] = {}
    t1 = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        for key, hit, status in pool.map(steps_job, jobs):
            steps[key] = (hit, status)
            print("steps", key, hit, status, flush=True)
    t1 = time.time() - t1
    # -- phase 2: wall-clock of each method's best lr, in lockstep -------------------------
    torch.set_num_threads(args.threads)
    t2 = time.time()
    best: dict[tuple, float | None] = {}  # (workload, method, seed, target) -> lr
    wall: dict[tuple, tuple[int, float] | None] = {}
    for w in workloads:
        for s in seeds:
            runs: dict[tuple[str, float], Run] = {}
            for m in (BASELINE[w], "kfac"):
                for tgt in TARGETS[w]:
                    cands = [(steps[(m, w, lr, s)][0][tgt], lr) for lr in lrs[m]
                             if tgt in steps[(m, w, lr, s)][0]]
                    best[(w, m, s, tgt)] = lr = min(cands)[1] if cands else None
                    if lr is None:
                        continue
                    key = (m, lr)
                    if key not in runs:
                        runs[key] = Run(m, w, lr, s, (), max_steps[w])
                    runs[key].need = tuple(sorted({*runs[key].need, tgt}))
            lockstep(list(runs.values()), data)
            for (m, lr), r in runs.items():
                print("wall", w, s, m, lr, r.hit, r.status, flush=True)
                for tgt in r.need:
                    if best[(w, m, s, tgt)] == lr:
                        wall[(w, m, s, tgt)] = r.hit.get(tgt)
    t2 = time.time() - t2
    # -- the report ------------------------------------------------------------------------
    cmd = "python -m benchmarks.exp_natural_gradient" + (" --quick" if args.quick else "")
    if args.threads != 2:
        cmd += f" --threads {args.threads}"
    lines = [
        "## Natural gradient on MNIST-1D",
        "",
        machine_line(),
        "",
        f"Command: `{cmd}`. {LOAD_NOTE}. Phase 1 (steps, one thread per run, "
        f"{args.jobs} runs at once) took {t1:.0f} s; phase 2 (wall-clock, {args.threads} "
        f"torch threads, runs in lockstep) {t2:.0f} s.",
        "",
        "Setup: batch 100, 4000 train / 1000 test, evaluation every 10 steps (excluded "
        "from the clock). `kfac`: SGD (momentum 0.9) + `FisherPreconditioner(model, "
        "kind=\"kfac\", source=\"backward\")`, every other setting its documented default. "
        "`adam`: torch Adam; `adamw`: AdamW, weight decay 0.01. Learning-rate grids "
        "(same size for every method): "
        + "; ".join(f"{m} {list(lrs[m])}" for m in lrs)
        + f". Seeds {list(seeds)}. Per seed and target, each method's lr is the grid "
        "point with the fewest steps to the target (phase 1, load independent); phase 2 "
        "re-runs those in lockstep (10 steps of each run in turn, each with its own clock) "
        f"with {args.threads} torch threads for the wall-clock. Budget "
        + ", ".join(f"{w}: {max_steps[w]} steps" for w in workloads) + ".",
        "",
        "| workload | target | seed | baseline lr: steps, wall | kfac lr: steps, wall | "
        "wall ratio kfac / baseline | steps ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = []
    for w in workloads:
        base = BASELINE[w]
        for tgt, thr in TARGETS[w].items():
            ratios, sratios = [], []
            for s in seeds:
                cells = []
                for m in (base, "kfac"):
                    lr = best[(w, m, s, tgt)]
                    h = wall.get((w, m, s, tgt))
                    cells.append("not reached" if h is None else
                                 f"{m} {lr:g}: {h[0]}, {h[1]:.2f} s")
                hb, hk = wall.get((w, base, s, tgt)), wall.get((w, "kfac", s, tgt))
                r = sr = None
                if hb and hk:
                    r, sr = hk[1] / hb[1], hk[0] / hb[0]
                    ratios.append(r)
                    sratios.append(sr)
                name = f"{'loss <=' if tgt == 'loss' else 'test acc >='} {thr:g}"
                lines.append(f"| {w} | {name} | {s} | {cells[0]} | {cells[1]} | "
                             f"{'—' if r is None else f'{r:.2f}'} | "
                             f"{'—' if sr is None else f'{sr:.2f}'} |")
            if ratios:
                summary.append(f"{w} {tgt}: median wall ratio {statistics.median(ratios):.2f} "
                               f"(max {max(ratios):.2f}), median steps ratio "
                               f"{statistics.median(sratios):.2f}"
                               + ("" if len(ratios) == len(seeds) else
                                  f" ({len(seeds) - len(ratios)} seeds not reached)"))
            else:
                summary.append(f"{w} {tgt}: not reached by both methods")
    lines += ["", "Summary (target: wall ratio <= 0.67): " + "; ".join(summary) + ".", ""]
    lines += ["Phase 1, steps to each target per lr (median over seeds; `—`: not reached "
              "by every seed):", "", "| workload | method | " +
              " | ".join(f"lr #{i + 1}" for i in range(len(lrs["kfac"]))) + " |",
              "|---|---|" + "---|" * len(lrs["kfac"])]
    for w in workloads:
        for m in (BASELINE[w], "kfac"):
            cells = []
            for lr in lrs[m]:
                parts = []
                for tgt in TARGETS[w]:
                    got = [steps[(m, w, lr, s)][0].get(tgt) for s in seeds]
                    ok = all(g is not None for g in got)
                    parts.append(f"{tgt} {statistics.median(got) if ok else '—'}")
                cells.append(f"{lr:g}: " + ", ".join(parts))
            lines.append(f"| {w} | {m} | " + " | ".join(cells) + " |")
    cost = {w: per_step_cost(w, data, [BASELINE[w], "kfac"], 3 if args.quick else 7, 10)
            for w in workloads}
    lines += ["", f"Per-step cost ({args.threads} threads, median of interleaved rounds, "
              "the curvature refreshed at its default interval): "
              + "; ".join(f"{w}: " + ", ".join(f"{m} {t:.2f} ms" for m, t in c.items())
                          + f" (kfac / {BASELINE[w]} {c['kfac'] / c[BASELINE[w]]:.2f}x)"
                          for w, c in cost.items()) + "."]
    return "\n".join(lines)


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, 2 lrs (smoke run)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in phase 2")
    ap.add_argument("--jobs", type=int, default=2, help="phase-1 runs at once")
    ap.add_argument("--workloads", nargs="+", default=["mlp", "cnn"], choices=list(MODELS),
                    help="mlp, cnn (default both), transformer (not in the default run: "
                    "about 30x the MLP's cost per step)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    return run_experiment("natural_gradient", report, args)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
